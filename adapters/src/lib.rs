//! The adapter contract: how herald speaks one partner platform.
//!
//! An adapter only translates and classifies. It turns one delivery (an
//! event bound for one partner) into that partner's HTTP request, and it reads
//! the partner's answer into a [`Verdict`]. It never sleeps, retries, counts
//! attempts or touches the store: rate limits, retries and breakers belong to
//! herald's lanes, which wrap every adapter the same way.
//!
//! This crate depends on nothing of herald's `src/`; adding a platform is one
//! module here, its golden fixtures, and one line in [`REGISTRY`].

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::value::RawValue;

pub mod alexa;
pub mod clova;
pub mod credentials;
pub mod event_time;
pub mod genie;
pub mod golden;
pub mod google;
pub mod ids;
pub mod json;
pub mod kakao;
pub mod mapping;
#[cfg(feature = "mock")]
pub mod mock;
pub mod oauth;
pub mod retry_after;
pub mod smartthings;
pub mod state;
pub mod thinq;
pub mod webhook;

pub use credentials::{Credentials, RefreshVerdict, TokenScope};

/// How many bytes of a partner's answer herald keeps in an attempt record.
pub const ANSWER_SNIPPET_BYTES: usize = 256;

/// The event as an adapter sees it: borrowed from herald's stored record.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EventView<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub event_type: &'a str,
    pub device_id: &'a str,
    pub priority: &'a str,
    pub occurred_at: &'a str,
    pub data: &'a RawValue,
}

/// The device's link into the partner platform (`PUT /v1/links/...`), as an
/// adapter sees it. Secrets are in clear here and must never be logged.
#[derive(Clone, Copy)]
pub struct LinkView<'a> {
    /// The device's id on the platform (SmartThings `externalDeviceId`,
    /// Alexa `endpointId`, Google device id).
    pub external_id: &'a str,
    /// The platform-side user (Google `agentUserId`), when it needs one.
    pub account: Option<&'a str>,
    pub region: Option<&'a str>,
    /// Per-link endpoints, for platforms that hand them out per user.
    pub callback_url: Option<&'a str>,
    pub token_url: Option<&'a str>,
    pub access_token: Option<&'a str>,
    /// Anything adapter-specific, as given in the link's `options`.
    pub options: Option<&'a RawValue>,
}

impl fmt::Debug for LinkView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkView")
            .field("external_id", &self.external_id)
            .field("account", &self.account)
            .field("region", &self.region)
            .field("callback_url", &self.callback_url)
            .field("token_url", &self.token_url)
            .field("access_token", &self.access_token.map(|_| "<redacted>"))
            .finish()
    }
}

impl<'a> LinkView<'a> {
    /// Where this link's events go: its own `callback_url`, else the
    /// partner's `url`, without a trailing slash.
    pub fn base_url<'b>(&self, partner_url: &'b str, platform: &str) -> Result<&'b str, BuildError>
    where
        'a: 'b,
    {
        let base = self
            .callback_url
            .unwrap_or(partner_url)
            .trim_end_matches('/');
        if base.is_empty() {
            return Err(BuildError(format!(
                "the {platform} link has no callback_url and the partner no url"
            )));
        }
        Ok(base)
    }
}

/// One delivery attempt to build a request for.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryContext<'a> {
    /// Stable across every attempt of this delivery: partners drop duplicates by it.
    pub delivery_id: &'a str,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Which send within this attempt: 0 for the first, 1 for the resend
    /// after a token refresh. With `delivery_id` and `attempt` it names one
    /// call, for platforms that want a new id per call (ThinQ
    /// `x-message-id`); deduplication stays on `delivery_id`.
    pub send: u32,
    /// Unix seconds of this attempt, from herald's clock.
    pub now_unix: u64,
    pub event: EventView<'a>,
    /// The link the delivery goes through; `None` for partners addressed
    /// by their configured `url` alone (plain webhooks).
    pub link: Option<LinkView<'a>>,
}

impl<'a> DeliveryContext<'a> {
    /// The link a platform delivery goes through: without one there is no
    /// one to address it to.
    pub fn link_for(&self, platform: &str) -> Result<LinkView<'a>, BuildError> {
        self.link
            .ok_or_else(|| BuildError(format!("{platform} deliveries need a device link")))
    }
}

/// The HTTP request an adapter wants sent. herald's lane sends it with the
/// shared client; the adapter never does I/O.
///
/// It carries credentials (a bearer header, SmartThings' token in the body,
/// a refresh token in a form): its `Debug` shows neither header values that
/// authenticate nor the body.
#[derive(Clone, PartialEq, Eq)]
pub struct OutboundRequest {
    pub method: Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl OutboundRequest {
    /// A JSON `POST` with a bearer token, the request most platforms take;
    /// `what` names the body in the error if it cannot be encoded.
    pub fn bearer_json(
        url: String,
        token: &str,
        body: &serde_json::Value,
        what: &str,
    ) -> Result<OutboundRequest, BuildError> {
        Ok(OutboundRequest {
            method: Method::Post,
            url,
            headers: vec![
                ("authorization".into(), format!("Bearer {token}")),
                ("content-type".into(), "application/json".into()),
            ],
            body: serde_json::to_vec(body)
                .map_err(|e| BuildError(format!("cannot encode the {what}: {e}")))?,
        })
    }
}

/// Headers whose values are credentials.
const SECRET_HEADERS: &[&str] = &["authorization", "x-api-key", "cookie", "webhook-signature"];

impl fmt::Debug for OutboundRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(name, value)| {
                let secret = SECRET_HEADERS.iter().any(|s| name.eq_ignore_ascii_case(s));
                (
                    name.as_str(),
                    if secret { "<redacted>" } else { value.as_str() },
                )
            })
            .collect();
        f.debug_struct("OutboundRequest")
            .field("method", &self.method)
            .field("url", &self.url)
            .field("headers", &headers)
            .field("body", &format_args!("<{} bytes>", self.body.len()))
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Post,
    Put,
}

/// What came back from the partner, or why nothing did.
#[derive(Debug, Clone, Copy)]
pub enum Answer<'a> {
    Http {
        status: u16,
        headers: &'a [(String, String)],
        /// At most the first few KiB of the body.
        body: &'a [u8],
    },
    /// No answer within the partner's `timeout_ms`.
    Timeout,
    /// Connection refused or reset, DNS failure, TLS failure...
    Network(&'a str),
}

/// The adapter's reading of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Try again; `after` is the partner's own minimum delay (Retry-After).
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// Never going to work as sent: dead-letter it now.
    Permanent {
        reason: String,
    },
    /// The link's credentials are expired or revoked: refresh them, then
    /// send again once.
    Refresh {
        reason: String,
    },
    /// herald's own setup is refused (its OAuth client or secret, its
    /// project's permissions, the wrong region's gateway, its API quota):
    /// no user did anything and no user can fix it. Retry under the
    /// partner's policy like [`Verdict::Retry`], and raise the partner's
    /// alert condition for on-call; never park a link for it, or one
    /// rotated secret would park every device.
    Misconfigured {
        after: Option<Duration>,
        reason: String,
    },
    /// The route itself is gone (HTTP 410, the platform's "integration
    /// deleted"): park the link; this delivery and every later one to it
    /// become dead letters with this reason until the link is put again.
    Park {
        reason: String,
    },
}

/// Why a request could not be built. Always permanent for that delivery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BuildError(pub String);

/// Why a partner's adapter could not be set up from its config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct SetupError {
    /// The config key at fault, relative to the partner's table (`url`, `secret_env`).
    pub key: &'static str,
    pub reason: String,
}

/// A partner's settings, resolved by herald from its config and environment.
/// Every secret here is the value itself (not the variable's name).
#[derive(Clone, Default)]
pub struct PartnerSettings {
    pub name: String,
    /// The partner's endpoint. Platform adapters treat it as an override of
    /// the platform's public endpoint (tests, proxies); empty means "the
    /// platform's own", for platforms that publish one.
    pub url: String,
    /// The signing secret, when the adapter needs one (webhook).
    pub secret: Option<String>,
    /// The platform OAuth client (`client_id_env` / `client_secret_env`).
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    /// A partner-level token endpoint (client-credentials flows), when it
    /// differs from the adapter's default.
    pub token_url: Option<String>,
    /// A service-account key file's JSON (Google Home Graph).
    pub service_account_key: Option<String>,
    /// Webhook receivers: statuses to dead-letter at once instead of
    /// retrying (`permanent_statuses`).
    pub permanent_statuses: Vec<u16>,
    /// Per-region endpoints (`gateways = { na = "...", ... }`), for
    /// platforms that route each link by its region (Alexa).
    pub gateways: std::collections::BTreeMap<String, String>,
}

impl fmt::Debug for PartnerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("PartnerSettings")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("secret", &redacted(&self.secret))
            .field("client_id", &self.client_id)
            .field("client_secret", &redacted(&self.client_secret))
            .field("token_url", &self.token_url)
            .field("service_account_key", &redacted(&self.service_account_key))
            .finish()
    }
}

/// One partner platform's translation and classification.
pub trait Adapter: Send + Sync + 'static {
    /// The registry name (`webhook`, `smartthings`...).
    fn kind(&self) -> &'static str;

    /// Whether deliveries go through a device link (`PUT /v1/links`):
    /// every platform; a plain webhook is addressed by its partner's `url`.
    fn needs_link(&self) -> bool {
        true
    }

    /// Whether a link has what this platform's deliveries need, checked
    /// when the link is put so a missing field is the caller's 422, not a
    /// dead letter later. The error's `key` is the link field at fault.
    fn check_link(&self, _link: &LinkView<'_>) -> Result<(), SetupError> {
        Ok(())
    }

    /// The request for one attempt of one delivery.
    fn build(&self, ctx: &DeliveryContext<'_>) -> Result<OutboundRequest, BuildError>;

    /// What the answer means. `now` lets an HTTP-date Retry-After be read.
    fn classify(&self, answer: &Answer<'_>, now: SystemTime) -> Verdict;

    /// [`Adapter::classify`] for the `attempt`-th attempt (1-based), for
    /// platforms whose answer means something else on a later attempt
    /// (Google's 404 right after a SYNC). herald's lanes call this one.
    fn classify_attempt(&self, _attempt: u32, answer: &Answer<'_>, now: SystemTime) -> Verdict {
        self.classify(answer, now)
    }

    /// Whose token [`LinkView::access_token`] carries: the link's own user
    /// token (refreshed per link) or one partner-wide token (minted with
    /// [`Adapter::partner_token_request`] and handed to every link).
    fn token_scope(&self) -> TokenScope {
        TokenScope::Link
    }

    /// The request that trades a link's refresh token for new credentials.
    /// `None`: this adapter has no per-link refresh.
    ///
    /// herald sends at most one of these per link at a time; deliveries that
    /// got [`Verdict::Refresh`] meanwhile wait for its outcome.
    fn refresh_request(
        &self,
        _link: &LinkView<'_>,
        _refresh_token: &str,
        _now_unix: u64,
    ) -> Result<Option<OutboundRequest>, BuildError> {
        Ok(None)
    }

    /// How long one of this platform's refresh tokens lives after it was
    /// issued, for herald's keep-alive refresh: a grant whose deliveries are
    /// rare is refreshed before its refresh token dies unused. `None`: the
    /// platform's refresh tokens do not expire, or their lifetime is not
    /// documented (a partner's `refresh_token_lifetime` can still set one).
    fn refresh_token_lifetime(&self) -> Option<Duration> {
        None
    }

    /// What the answer to [`Adapter::refresh_request`] means.
    fn read_refresh(&self, answer: &Answer<'_>, now: SystemTime) -> RefreshVerdict {
        oauth::read_token_answer(answer, now)
    }

    /// The request that mints a partner-wide token (client credentials,
    /// service-account JWT). `None`: this adapter uses per-link tokens only.
    fn partner_token_request(&self, _now_unix: u64) -> Result<Option<OutboundRequest>, BuildError> {
        Ok(None)
    }

    /// What the answer to [`Adapter::partner_token_request`] means.
    fn read_partner_token(&self, answer: &Answer<'_>, now: SystemTime) -> RefreshVerdict {
        oauth::read_token_answer(answer, now)
    }

    /// How many deliveries for one link [`Adapter::build_batch`] takes at
    /// once; 1 means "not batchable".
    fn max_batch(&self) -> usize {
        1
    }

    /// One request carrying several deliveries for the same link (all of
    /// `ctxs` share one link). The answer's verdict applies to every one.
    fn build_batch(&self, ctxs: &[DeliveryContext<'_>]) -> Result<OutboundRequest, BuildError> {
        match ctxs {
            [one] => self.build(one),
            _ => Err(BuildError(format!(
                "the {} adapter does not batch deliveries",
                self.kind()
            ))),
        }
    }
}

type Constructor = fn(&PartnerSettings) -> Result<Box<dyn Adapter>, SetupError>;

/// Every adapter herald knows, by the name used in `adapter = "..."`.
pub const REGISTRY: &[(&str, Constructor)] = &[
    ("webhook", webhook::WebhookAdapter::boxed),
    ("smartthings", smartthings::SmartThings::boxed),
    ("alexa", alexa::Alexa::boxed),
    ("google", google::Google::boxed),
    ("thinq", thinq::ThinQ::boxed),
    ("kakao", kakao::Kakao::boxed),
    ("clova", clova::Clova::boxed),
    ("genie", genie::Genie::boxed),
];

/// The smart-home platforms: every adapter but the plain webhook. Each has
/// a mapping table entry, golden requests and a mock partner.
pub const PLATFORMS: &[&str] = &[
    "smartthings",
    "alexa",
    "google",
    "thinq",
    "kakao",
    "clova",
    "genie",
];

/// Builds the adapter named `kind` for one partner.
pub fn build_adapter(
    kind: &str,
    settings: &PartnerSettings,
) -> Result<Box<dyn Adapter>, SetupError> {
    match REGISTRY.iter().find(|(name, _)| *name == kind) {
        Some((_, construct)) => construct(settings),
        None => Err(SetupError {
            key: "adapter",
            reason: format!(
                "unknown adapter {kind:?}; known: {}",
                REGISTRY
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// The classification most HTTP partners share: 2xx delivered; 408, 429 and
/// 5xx retried (with the partner's Retry-After); 410 Gone parks the link;
/// 3xx and other 4xx permanent. Timeouts and network errors are retried.
pub fn classify_http(answer: &Answer<'_>, now: SystemTime) -> Verdict {
    match *answer {
        Answer::Timeout => Verdict::Retry {
            after: None,
            reason: "timed out waiting for the partner".into(),
        },
        Answer::Network(err) => Verdict::Retry {
            after: None,
            reason: format!("network error: {err}"),
        },
        Answer::Http {
            status,
            headers,
            body,
        } => match status {
            200..=299 => Verdict::Delivered,
            408 | 429 | 500..=599 => Verdict::Retry {
                after: retry_after::from_headers(headers, now),
                reason: format!("HTTP {status}: {}", snippet(body)),
            },
            300..=399 => Verdict::Permanent {
                reason: format!("HTTP {status}: redirects are not followed"),
            },
            410 => Verdict::Park {
                reason: format!("HTTP 410 Gone: {}", snippet(body)),
            },
            _ => Verdict::Permanent {
                reason: format!("HTTP {status}: {}", snippet(body)),
            },
        },
    }
}

/// The first [`ANSWER_SNIPPET_BYTES`] of a body, as text, cut on a char boundary.
pub fn snippet(body: &[u8]) -> String {
    let cut = &body[..body.len().min(ANSWER_SNIPPET_BYTES)];
    let text = String::from_utf8_lossy(cut);
    let mut out = text.trim().to_string();
    if body.len() > ANSWER_SNIPPET_BYTES {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16, headers: &[(String, String)]) -> Verdict {
        classify_http(
            &Answer::Http {
                status,
                headers,
                body: b"nope",
            },
            SystemTime::UNIX_EPOCH,
        )
    }

    #[test]
    fn classifies_statuses_like_the_contract_says() {
        assert_eq!(http(200, &[]), Verdict::Delivered);
        assert_eq!(http(204, &[]), Verdict::Delivered);
        for retried in [408, 429, 500, 502, 503, 504] {
            assert!(
                matches!(http(retried, &[]), Verdict::Retry { .. }),
                "{retried}"
            );
        }
        assert!(matches!(http(410, &[]), Verdict::Park { .. }));
        for permanent in [301, 400, 401, 403, 404, 422] {
            assert!(
                matches!(http(permanent, &[]), Verdict::Permanent { .. }),
                "{permanent}"
            );
        }
    }

    #[test]
    fn retry_keeps_the_partners_delay() {
        let headers = [("Retry-After".to_string(), "2".to_string())];
        assert_eq!(
            http(429, &headers),
            Verdict::Retry {
                after: Some(Duration::from_secs(2)),
                reason: "HTTP 429: nope".into()
            }
        );
    }

    #[test]
    fn every_registered_adapter_but_webhook_is_a_platform() {
        let registered: Vec<&str> = REGISTRY.iter().map(|(name, _)| *name).collect();
        let mut expected = vec!["webhook"];
        expected.extend_from_slice(PLATFORMS);
        assert_eq!(registered, expected);
    }

    #[test]
    fn unknown_adapter_names_the_known_ones() {
        let settings = PartnerSettings {
            name: "x".into(),
            url: "http://127.0.0.1:1/".into(),
            ..PartnerSettings::default()
        };
        let err = build_adapter("carrier-pigeon", &settings)
            .err()
            .expect("must fail");
        assert_eq!(err.key, "adapter");
        assert!(err.reason.contains("webhook"), "{err}");
    }

    #[test]
    fn debug_forms_never_show_secrets() {
        let settings = PartnerSettings {
            name: "p".into(),
            secret: Some("whsec-SECRET".into()),
            client_id: Some("client".into()),
            client_secret: Some("client-SECRET".into()),
            service_account_key: Some("-----BEGIN PRIVATE KEY----- SECRET".into()),
            ..PartnerSettings::default()
        };
        let request = OutboundRequest {
            method: Method::Post,
            url: "https://x/y".into(),
            headers: vec![
                ("Authorization".into(), "Bearer SECRET".into()),
                ("x-api-key".into(), "SECRET".into()),
                ("content-type".into(), "application/json".into()),
            ],
            body: br#"{"authentication":{"token":"SECRET"}}"#.to_vec(),
        };
        let creds = Credentials {
            access_token: "SECRET".into(),
            refresh_token: Some("SECRET".into()),
            expires_at_unix: Some(1),
        };
        for shown in [
            format!("{settings:?}"),
            format!("{request:?}"),
            format!("{creds:?}"),
        ] {
            assert!(!shown.contains("SECRET"), "{shown}");
        }
        assert!(format!("{request:?}").contains("application/json"));
    }

    #[test]
    fn snippet_is_bounded_and_safe_on_utf8() {
        let long = "é".repeat(400);
        let s = snippet(long.as_bytes());
        assert!(s.len() <= ANSWER_SNIPPET_BYTES + '…'.len_utf8());
        assert!(s.ends_with('…'));
    }
}
