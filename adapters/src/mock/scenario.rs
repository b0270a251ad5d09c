//! What a mock partner does wrong, and when.

use std::time::Duration;

/// How a throttled answer says when to come back (RFC 9110 allows both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfter {
    Seconds(u64),
    /// An HTTP-date this many seconds from now.
    Date(u64),
}

/// The faults a mock partner injects. Faults apply in this order to each
/// delivery: latency, 5xx burst, throttling, intermittent 5xx/429, rate
/// limit, misconfiguration, terminal code, token check, shape (and, for the
/// webhook mock, signature) check, duplicate check.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The access token the partner accepts at start (per-link user token,
    /// or the partner-wide token for Google and ThinQ).
    pub access_token: String,
    /// The refresh token the partner accepts at start.
    pub refresh_token: String,
    /// Deliveries accepted with one access token before it expires; `Some(0)`
    /// means expired from the start. After a refresh the count starts again.
    pub expire_after: Option<u32>,
    /// Whether a refresh also hands out a new refresh token (the old one dies).
    pub rotate_refresh: bool,
    /// The first this-many deliveries get 5xx.
    pub server_errors: u32,
    /// The next this-many deliveries get 429 with `retry_after`.
    pub throttle: u32,
    /// Of every this-many deliveries after those, one gets the platform's
    /// 5xx and the next one 429 with `retry_after` (a partner that fails
    /// part of the time, for good); under 2: off.
    pub intermittent: Option<u32>,
    pub retry_after: RetryAfter,
    /// Requests per second one token may make; beyond it, 429.
    pub rate_per_second: Option<u32>,
    /// Every answer waits this long.
    pub latency: Duration,
    /// Every delivery gets the platform's terminal code (integration deleted,
    /// skill disabled, ...).
    pub terminal: bool,
    /// Every refresh gets the platform's dead-grant code (KOE322, invalid_grant).
    pub refresh_terminal: bool,
    /// Google only: the DER `RSAPublicKey` assertions must verify against.
    pub public_key_der: Option<Vec<u8>>,
    /// Every delivery gets the platform's documented answer for "herald's
    /// own setup is refused" (a skill without the permission, a project
    /// without the API, an app without the feature), until
    /// `MockHandle::set_misconfigured(false)`.
    pub misconfigured: bool,
    /// The client secret the token endpoint takes; another one is answered
    /// with the platform's "client refused" (RFC 6749 `invalid_client`).
    pub client_secret: Option<String>,
    /// Every token request gets exactly this answer (a platform's answer
    /// that no dialect method covers, e.g. a bare status).
    pub refresh_answer: Option<super::Reply>,
    /// The `webhook` mock only: the Standard Webhooks secret (`whsec_...`)
    /// every delivery's signature must verify with. The library also wants
    /// `webhook-timestamp` within five minutes of this machine's clock, so
    /// a sender on a driven clock far from now is refused.
    pub signing_secret: Option<String>,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            access_token: "at-0".into(),
            refresh_token: "rt-0".into(),
            expire_after: None,
            rotate_refresh: true,
            server_errors: 0,
            throttle: 0,
            intermittent: None,
            retry_after: RetryAfter::Seconds(1),
            rate_per_second: None,
            latency: Duration::ZERO,
            terminal: false,
            refresh_terminal: false,
            public_key_der: None,
            misconfigured: false,
            client_secret: None,
            refresh_answer: None,
            signing_secret: None,
        }
    }
}

/// The names `herald mock-partner --scenario` takes.
pub const NAMES: &[&str] = &[
    "ok",
    "flaky",
    "expiring",
    "throttled",
    "rate-limited",
    "slow",
    "terminal",
    "revoked",
];

impl Scenario {
    /// A named scenario, for running a mock by hand.
    pub fn named(name: &str) -> Option<Scenario> {
        let base = Scenario::default();
        Some(match name {
            "ok" => base,
            // A 5xx burst, then a throttle, then fine.
            "flaky" => Scenario {
                server_errors: 3,
                throttle: 2,
                retry_after: RetryAfter::Seconds(2),
                ..base
            },
            // Tokens die every 5 deliveries; refreshes rotate.
            "expiring" => Scenario {
                expire_after: Some(5),
                ..base
            },
            "throttled" => Scenario {
                throttle: 10,
                retry_after: RetryAfter::Date(5),
                ..base
            },
            "rate-limited" => Scenario {
                rate_per_second: Some(5),
                ..base
            },
            "slow" => Scenario {
                latency: Duration::from_secs(3),
                ..base
            },
            "terminal" => Scenario {
                terminal: true,
                ..base
            },
            // The token is expired and the user revoked the grant.
            "revoked" => Scenario {
                expire_after: Some(0),
                refresh_terminal: true,
                ..base
            },
            _ => return None,
        })
    }
}
