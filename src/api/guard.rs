//! What every request passes before a handler reads a byte of its body:
//! the origin and `Host` checks (when no tokens are configured), the role
//! its route needs, the per-token rate and concurrency limits, and a
//! deadline on the body.
//!
//! It runs as a middleware in front of the router's handlers, so an
//! unauthenticated client is answered 401 from its header alone: its body is
//! never read, and it cannot make herald hold `max_body_bytes` for it.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http_body::Frame;
use tokio::sync::Semaphore;

use super::problem::Problem;
use super::AppState;
use crate::clock::Clock;
use crate::config::{Config, HttpPolicy, Role};

type Limiter = RateLimiter<NotKeyed, InMemoryState, Clock, NoOpMiddleware<governor::nanos::Nanos>>;

/// One token's share of ingest: its request rate and its requests in flight.
struct TokenLimits {
    rate: Option<Limiter>,
    in_flight: Arc<Semaphore>,
}

pub struct Guard {
    policy: HttpPolicy,
    /// Whether `[[tokens]]` are configured; without them herald is loopback
    /// only and refuses what a web page in a local browser could send.
    open: bool,
    /// The `Host` values that name the listen address (open mode only).
    hosts: Vec<String>,
    clock: Clock,
    /// By caller name: every configured token and "anonymous".
    limits: HashMap<String, TokenLimits>,
}

impl Guard {
    pub fn new(config: &Config, addr: SocketAddr, clock: Clock) -> Guard {
        let policy = config.server.http;
        let quota = policy.token_rate.map(|rate| {
            Quota::per_second(nonzero(rate.per_second)).allow_burst(nonzero(rate.burst))
        });
        let limits = config
            .tokens
            .iter()
            .map(|t| t.name.clone())
            .chain(["anonymous".to_string()])
            .map(|name| {
                let limits = TokenLimits {
                    rate: quota.map(|q| RateLimiter::direct_with_clock(q, clock.clone())),
                    in_flight: Arc::new(Semaphore::new(policy.token_concurrency)),
                };
                (name, limits)
            })
            .collect();
        Guard {
            policy,
            open: config.tokens.is_empty(),
            hosts: host_names(addr),
            clock,
            limits,
        }
    }

    /// 421 unless `Host` names the listen address; 403 for a cross-site
    /// request; 415 for a write whose body is not declared JSON.
    fn check_open(&self, method: &Method, headers: &HeaderMap) -> Result<(), Problem> {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            return Err(Problem::new(
                StatusCode::MISDIRECTED_REQUEST,
                "wrong-host",
                "This herald does not answer for that host",
                format!(
                    "Host {host:?} does not name this herald; with no [[tokens]] configured it answers only for {}",
                    self.hosts.join(", ")
                ),
            ));
        }
        let cross_site = |why: String| {
            Problem::new(
                StatusCode::FORBIDDEN,
                "cross-origin",
                "Cross-origin requests are refused",
                format!("{why}; with no [[tokens]] configured herald refuses requests a web page could send"),
            )
        };
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            let same = origin
                .strip_prefix("http://")
                .is_some_and(|o| self.hosts.iter().any(|h| h.eq_ignore_ascii_case(o)));
            if !same {
                return Err(cross_site(format!(
                    "the request comes from Origin {origin:?}"
                )));
            }
        }
        if let Some(site) = headers.get("sec-fetch-site") {
            let site = site.to_str().unwrap_or("");
            if !matches!(site, "same-origin" | "none") {
                return Err(cross_site(format!("Sec-Fetch-Site is {site:?}")));
            }
        }
        let writes = matches!(
            *method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        );
        if writes && has_body(headers) && !is_json(headers) {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-json",
                "The body must be JSON",
                "a request with a body must say Content-Type: application/json",
            ));
        }
        Ok(())
    }

    /// Takes one request from `caller`'s rate and a slot of its concurrency;
    /// the slot is held until the permit is dropped.
    fn admit(&self, caller: &str) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, Problem> {
        let Some(limits) = self.limits.get(caller) else {
            return Ok(None);
        };
        let limited = |detail: String, secs: u64| {
            metrics::counter!(crate::telemetry::HTTP_RATE_LIMITED).increment(1);
            Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "This token is over its limit",
                detail,
            )
            .retry_after(secs)
        };
        // The slot first: a request refused for concurrency takes no rate.
        let slot = match Arc::clone(&limits.in_flight).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                return Err(limited(
                    format!(
                    "token {caller:?} already has {} requests in flight (server.token_concurrency)",
                    self.policy.token_concurrency
                ),
                    1,
                ))
            }
        };
        if let (Some(limiter), Some(rate)) = (&limits.rate, self.policy.token_rate) {
            if let Err(not_until) = limiter.check() {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(&self.clock));
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                return Err(limited(
                    format!(
                        "token {caller:?} is over server.token_rate ({} requests/s, burst {})",
                        rate.per_second, rate.burst
                    ),
                    secs.max(1),
                ));
            }
        }
        Ok(Some(slot))
    }
}

/// The role a route needs, or `None` for the open endpoints.
fn needed_role(method: &Method, route: Option<&str>, metrics_auth: bool) -> Option<Role> {
    match route? {
        "/healthz" | "/readyz" => None,
        // Static content: its data comes from the API, with the token.
        "/console" | "/console/{asset}" => None,
        "/metrics" => metrics_auth.then_some(Role::Operator),
        "/v1/events" if method == Method::POST => Some(Role::Ingest),
        _ => Some(Role::Operator),
    }
}

/// The middleware: everything here runs on the request's header alone.
/// The caller it lets through goes with the request, for the handler's
/// role extractor ([`super::auth::Operator`], [`super::auth::Ingest`]).
pub async fn guard(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let guard = &state.guard;
    if guard.open {
        if let Err(problem) = guard.check_open(request.method(), request.headers()) {
            return problem.into_response();
        }
    }
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let Some(role) = needed_role(request.method(), route, guard.policy.metrics_auth) else {
        return next
            .run(with_deadline(request, guard.policy.body_timeout))
            .await;
    };
    let caller = match state.tokens.authorize(request.headers(), role) {
        Ok(caller) => caller,
        Err(problem) => return problem.into_response(),
    };
    let _slot = match role {
        Role::Ingest => match guard.admit(&caller.name) {
            Ok(slot) => slot,
            Err(problem) => return problem.into_response(),
        },
        Role::Operator => None,
    };
    request.extensions_mut().insert(caller);
    next.run(with_deadline(request, guard.policy.body_timeout))
        .await
}

fn with_deadline(request: Request, limit: Duration) -> Request {
    request.map(|body| {
        Body::new(DeadlineBody {
            inner: body,
            deadline: Box::pin(tokio::time::sleep(limit)),
            limit,
        })
    })
}

/// A request body that fails once `limit` has passed since the header,
/// however slowly its bytes trickle in.
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("the body did not arrive within server.body_timeout ({})", humantime::format_duration(*.0))]
struct BodyTimedOut(Duration);

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut(this.limit)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// `Host` values naming `addr`: its address, and `localhost` for loopback.
fn host_names(addr: SocketAddr) -> Vec<String> {
    let port = addr.port();
    let ip = match addr {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    };
    let mut names = vec![format!("{ip}:{port}"), format!("localhost:{port}")];
    if port == 80 {
        names.extend([ip, "localhost".to_string()]);
    }
    names
}

fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

fn nonzero(n: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\n{extra}\n\
             [[tokens]]\nname = \"door\"\nrole = \"ingest\"\ntoken_env = \"T\"\n"
        );
        Config::parse(&toml, &|name| {
            (name == "T").then(|| "door-token-0123456789abcdef".to_string())
        })
        .expect("valid config")
    }

    #[test]
    fn rate_answers_429_with_retry_after_on_the_driven_clock() {
        let clock = Clock::manual(1_000_000);
        let config = config("token_rate = { per_second = 2, burst = 2 }");
        let guard = Guard::new(&config, "127.0.0.1:8080".parse().unwrap(), clock.clone());
        assert!(guard.admit("door").is_ok());
        assert!(guard.admit("door").is_ok());
        let refused = guard
            .admit("door")
            .expect_err("the third within the burst is refused");
        assert_eq!(refused.status, 429);
        assert_eq!(refused.retry_after_secs, Some(1));
        assert!(
            refused.detail.contains("server.token_rate"),
            "{}",
            refused.detail
        );
        // Another token is not held back by this one.
        assert!(guard.admit("anonymous").is_ok());
        clock.advance(Duration::from_millis(500));
        assert!(
            guard.admit("door").is_ok(),
            "half a second later one more is allowed"
        );
        assert!(guard.admit("door").is_err());
    }

    #[test]
    fn concurrency_is_per_token_and_released_with_the_slot() {
        let clock = Clock::manual(1_000_000);
        let config = config("token_concurrency = 1");
        let guard = Guard::new(&config, "127.0.0.1:8080".parse().unwrap(), clock);
        let slot = guard.admit("door").expect("first");
        let refused = guard
            .admit("door")
            .expect_err("second while the first is in flight");
        assert!(
            refused.detail.contains("server.token_concurrency"),
            "{}",
            refused.detail
        );
        assert_eq!(refused.retry_after_secs, Some(1));
        drop(slot);
        assert!(guard.admit("door").is_ok());
    }

    #[test]
    fn routes_need_their_roles() {
        let post = Method::POST;
        assert_eq!(
            needed_role(&post, Some("/v1/events"), true),
            Some(Role::Ingest)
        );
        assert_eq!(
            needed_role(&Method::GET, Some("/v1/events/{id}"), true),
            Some(Role::Operator)
        );
        assert_eq!(
            needed_role(&Method::GET, Some("/metrics"), true),
            Some(Role::Operator)
        );
        assert_eq!(needed_role(&Method::GET, Some("/metrics"), false), None);
        assert_eq!(needed_role(&Method::GET, Some("/healthz"), true), None);
        assert_eq!(needed_role(&Method::GET, Some("/console"), true), None);
        assert_eq!(
            needed_role(&Method::GET, Some("/console/{asset}"), true),
            None
        );
    }

    #[test]
    fn hosts_name_the_listen_address() {
        assert_eq!(
            host_names("127.0.0.1:8080".parse().unwrap()),
            ["127.0.0.1:8080", "localhost:8080"]
        );
        assert_eq!(
            host_names("[::1]:80".parse().unwrap()),
            ["[::1]:80", "localhost:80", "[::1]", "localhost"]
        );
    }
}
