//! Mock partners: one real HTTP server per platform on loopback, speaking
//! that platform's protocol (auth where the platform puts it, its answers and
//! error codes), with faults injected per [`Scenario`]. Every request is
//! recorded for tests to assert on. Beside the platforms, `webhook` is a
//! plain Standard Webhooks receiver that checks each request's signature.
//!
//! A mock is one user of its platform: one token pair, however many of
//! the user's devices are linked with it. With [`Scenario::rotate_refresh`]
//! (the default) each refresh hands out a new refresh token and the old one
//! is refused, as SmartThings documents its single-use refresh tokens
//! (smartthings.developer.samsung.com/docs/how-to/refresh-token.html), so
//! two links refreshing one user's pair apart lose one of them.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use adapters::mock::{MockPartner, Scenario};
//! let (addr, handle) = MockPartner::start("smartthings", Scenario::named("flaky").unwrap()).await?;
//! // point a link's callback_url at http://{addr}/device/events ...
//! handle.stop().await;
//! # Ok(()) }
//! ```
//!
//! `herald mock-partner --platform P --port N --scenario S` is meant to be a
//! thin wrapper over [`MockPartner::start_on`].

mod alexa;
mod clova;
pub mod dialect;
mod genie;
mod google;
mod kakao;
pub mod scenario;
mod smartthings;
mod thinq;
mod webhook;

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use dialect::{Dialect, Grant, Incoming, Reply};
pub use scenario::{RetryAfter, Scenario};

/// The platforms a mock exists for: all of them.
pub use crate::PLATFORMS;

/// Access tokens the mock hands out last this long (what it tells clients).
pub const TOKEN_LIFETIME_SECS: u64 = 3600;

/// One request as received, with what the mock made of it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub at: SystemTime,
    pub request: Incoming,
    /// What the mock answered.
    pub status: u16,
    /// A token request (refresh, mint) rather than a delivery.
    pub token_request: bool,
    /// A delivery whose request id had been accepted before.
    pub duplicate: bool,
}

#[derive(Debug, Default)]
struct Tokens {
    access: String,
    refresh: String,
    expired: bool,
    accepted_with_current: u32,
    issued: u32,
}

struct State {
    scenario: Scenario,
    tokens: Tokens,
    server_errors_left: u32,
    throttle_left: u32,
    /// Deliveries received, for `Scenario::intermittent`.
    deliveries_received: u32,
    seen: HashSet<String>,
    /// token -> (window start, requests in it), for `rate_per_second`.
    windows: HashMap<String, (Instant, u32)>,
    recorded: Vec<Recorded>,
}

struct Shared {
    dialect: Box<dyn Dialect>,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not take every later answer down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Starts mock partners.
pub struct MockPartner;

impl MockPartner {
    /// A mock for `platform` on an ephemeral loopback port.
    pub async fn start(platform: &str, scenario: Scenario) -> io::Result<(SocketAddr, MockHandle)> {
        MockPartner::start_on(platform, scenario, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// A mock for `platform` on `addr` (port 0: any free port).
    pub async fn start_on(
        platform: &str,
        scenario: Scenario,
        addr: SocketAddr,
    ) -> io::Result<(SocketAddr, MockHandle)> {
        let dialect = dialect_for(platform, &scenario)?;
        let state = State {
            tokens: Tokens {
                access: scenario.access_token.clone(),
                refresh: scenario.refresh_token.clone(),
                expired: scenario.expire_after == Some(0),
                ..Tokens::default()
            },
            server_errors_left: scenario.server_errors,
            throttle_left: scenario.throttle,
            deliveries_received: 0,
            scenario,
            seen: HashSet::new(),
            windows: HashMap::new(),
            recorded: Vec::new(),
        };
        let shared = Arc::new(Shared {
            dialect,
            state: Mutex::new(state),
        });
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let router = Router::new().fallback(handle).with_state(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok((
            addr,
            MockHandle {
                shared,
                stop: Some(stop),
                task: Some(task),
            },
        ))
    }
}

/// Where a mock at `base` (`http://127.0.0.1:9101`) takes each kind of
/// request, as (what to configure, value): for `herald mock-partner` to print
/// and for demo configs. Token endpoints are any path ending in `/token`.
pub fn endpoints(platform: &str, base: &str) -> Vec<(&'static str, String)> {
    let at = |path: &str| format!("{base}{path}");
    match platform {
        "smartthings" => vec![
            ("link callback_url", at("/device/events")),
            ("link token_url", at("/oauth/token")),
        ],
        "alexa" => vec![
            ("partner gateways.na", at("/na/v3/events")),
            ("partner gateways.eu", at("/eu/v3/events")),
            ("partner gateways.fe", at("/fe/v3/events")),
            ("link token_url", at("/auth/o2/token")),
        ],
        "google" => vec![
            ("partner url", at("/v1/devices:reportStateAndNotification")),
            ("service-account token_uri", at("/token")),
        ],
        "thinq" => vec![
            ("partner url", base.to_string()),
            ("partner token_url", at("/oauth2/token")),
        ],
        "kakao" => vec![
            ("partner url", base.to_string()),
            ("link token_url", at("/oauth/token")),
        ],
        "clova" | "genie" => vec![
            ("partner url", base.to_string()),
            ("link token_url", at("/oauth/token")),
        ],
        _ => Vec::new(),
    }
}

/// The dialect for `platform`; `webhook` (a Standard Webhooks receiver,
/// not a platform) needs `Scenario::signing_secret`.
fn dialect_for(platform: &str, scenario: &Scenario) -> io::Result<Box<dyn Dialect>> {
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
    Ok(match platform {
        "webhook" => {
            let secret = scenario
                .signing_secret
                .as_deref()
                .ok_or_else(|| invalid("the webhook mock needs Scenario::signing_secret".into()))?;
            Box::new(webhook::Webhook::new(secret).map_err(invalid)?)
        }
        "smartthings" => Box::new(smartthings::SmartThings),
        "alexa" => Box::new(alexa::Alexa),
        "google" => Box::new(google::Google),
        "thinq" => Box::new(thinq::ThinQ),
        "kakao" => Box::new(kakao::Kakao),
        "clova" => Box::new(clova::Clova),
        "genie" => Box::new(genie::Genie),
        _ => {
            return Err(invalid(format!(
                "no mock for platform {platform:?}; known: {}, webhook",
                PLATFORMS.join(", ")
            )))
        }
    })
}

/// A running mock: what it saw, its token state, and a way to stop it.
pub struct MockHandle {
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MockHandle {
    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().recorded.clone()
    }

    /// Deliveries the mock accepted (duplicates included).
    pub fn accepted(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| !r.token_request && (200..300).contains(&r.status))
            .collect()
    }

    /// Token requests answered with new tokens.
    pub fn refreshes(&self) -> usize {
        self.shared.lock().tokens.issued as usize
    }

    pub fn duplicates(&self) -> usize {
        self.requests().iter().filter(|r| r.duplicate).count()
    }

    /// The access token the mock accepts now.
    pub fn access_token(&self) -> String {
        self.shared.lock().tokens.access.clone()
    }

    /// The refresh token the mock accepts now.
    pub fn refresh_token(&self) -> String {
        self.shared.lock().tokens.refresh.clone()
    }

    /// Makes the platform refuse (or stop refusing) herald's setup on
    /// every delivery (`Scenario::misconfigured`).
    pub fn set_misconfigured(&self, misconfigured: bool) {
        self.shared.lock().scenario.misconfigured = misconfigured;
    }

    /// Expires the current access token now.
    pub fn expire_token(&self) {
        self.shared.lock().tokens.expired = true;
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn handle(
    AxumState(shared): AxumState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = Incoming {
        method: method.to_string(),
        path: uri.path().to_string(),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
    };
    let at = SystemTime::now();
    let latency = shared.lock().scenario.latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let token_request = shared.dialect.is_token_request(&request);
    let (reply, duplicate) = if token_request {
        (answer_token(&shared, &request), false)
    } else {
        answer_delivery(&shared, &request)
    };
    shared.lock().recorded.push(Recorded {
        at,
        request,
        status: reply.status,
        token_request,
        duplicate,
    });
    respond(reply)
}

fn answer_delivery(shared: &Shared, req: &Incoming) -> (Reply, bool) {
    let dialect = &*shared.dialect;
    let mut state = shared.lock();
    if state.server_errors_left > 0 {
        state.server_errors_left -= 1;
        return (dialect.server_error(), false);
    }
    if state.throttle_left > 0 {
        state.throttle_left -= 1;
        return (throttled(dialect, state.scenario.retry_after), false);
    }
    state.deliveries_received = state.deliveries_received.wrapping_add(1);
    if let Some(period) = state.scenario.intermittent.filter(|p| *p >= 2) {
        match state.deliveries_received % period {
            0 => return (dialect.server_error(), false),
            1 => return (throttled(dialect, state.scenario.retry_after), false),
            _ => {}
        }
    }
    let token = dialect.token(req);
    if let (Some(limit), Some(token)) = (state.scenario.rate_per_second, &token) {
        let now = Instant::now();
        let window = state.windows.entry(token.clone()).or_insert((now, 0));
        if now.duration_since(window.0) >= Duration::from_secs(1) {
            *window = (now, 0);
        }
        window.1 += 1;
        if window.1 > limit {
            return (throttled(dialect, RetryAfter::Seconds(1)), false);
        }
    }
    if state.scenario.misconfigured {
        if let Some(reply) = dialect.misconfigured() {
            return (reply, false);
        }
    }
    if state.scenario.terminal {
        return (dialect.terminal(), false);
    }
    let token_refused =
        token.as_deref() != Some(state.tokens.access.as_str()) || state.tokens.expired;
    if dialect.uses_tokens() && token_refused {
        return (dialect.expired(), false);
    }
    if let Err(why) = dialect.validate(req) {
        return (dialect.bad_request(&why), false);
    }
    let duplicate = match dialect.request_id(req) {
        Some(id) => !state.seen.insert(id),
        None => false,
    };
    state.tokens.accepted_with_current += 1;
    if let Some(limit) = state.scenario.expire_after {
        if state.tokens.accepted_with_current >= limit {
            state.tokens.expired = true;
        }
    }
    (dialect.ok(req), duplicate)
}

fn throttled(dialect: &dyn Dialect, retry_after: RetryAfter) -> Reply {
    let value = match retry_after {
        RetryAfter::Seconds(s) => s.to_string(),
        RetryAfter::Date(s) => httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(s)),
    };
    dialect.throttled().with_header("retry-after", value)
}

fn answer_token(shared: &Shared, req: &Incoming) -> Reply {
    let dialect = &*shared.dialect;
    let mut state = shared.lock();
    if let Some(reply) = &state.scenario.refresh_answer {
        return reply.clone();
    }
    if let Some(expected) = &state.scenario.client_secret {
        if dialect.client_secret(req).as_ref() != Some(expected) {
            return dialect.client_refused();
        }
    }
    if state.scenario.refresh_terminal {
        return dialect.grant_dead("the user revoked the grant");
    }
    match dialect.grant(req) {
        Grant::Refresh(presented) => {
            if presented != state.tokens.refresh {
                return dialect.grant_dead("unknown or rotated refresh token");
            }
        }
        Grant::Assertion(jwt) => {
            if let Some(key) = &state.scenario.public_key_der {
                if let Err(why) = crate::google::service_account::verify(&jwt, key) {
                    return dialect.grant_dead(&format!("assertion rejected: {why}"));
                }
            }
        }
        Grant::ClientCredentials => {}
        Grant::Unreadable(why) => return dialect.bad_request(&why),
    }
    state.tokens.issued += 1;
    let n = state.tokens.issued;
    state.tokens.access = format!("{}-{n}", stem(&state.scenario.access_token));
    state.tokens.expired = false;
    state.tokens.accepted_with_current = 0;
    let rotated = state.scenario.rotate_refresh.then(|| {
        state.tokens.refresh = format!("{}-{n}", stem(&state.scenario.refresh_token));
        state.tokens.refresh.clone()
    });
    dialect.issued(
        &state.tokens.access,
        rotated.as_deref(),
        TOKEN_LIFETIME_SECS,
    )
}

/// `at-0` -> `at`, so issued tokens read `at-1`, `at-2`...
fn stem(token: &str) -> &str {
    token.rsplit_once('-').map(|(s, _)| s).unwrap_or(token)
}

fn respond(reply: Reply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, reply.body).into_response();
    for (name, value) in reply.headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::try_from(name),
            axum::http::HeaderValue::try_from(value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}
