//! What the integration tests share: a real mock partner (an axum server on
//! loopback that records every request and answers from a script, and can
//! stop listening to refuse connections), a herald started in-process on a
//! temp data dir with a driven clock, and a seeded random source.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use herald::clock::Clock;
use herald::config::Config;
use herald::Herald;
use tokio::sync::Notify;

pub const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
pub const INGEST_TOKEN: &str = "ingest-token-0123456789abcdef";
pub const OPERATOR_TOKEN: &str = "operator-token-0123456789abcdef";
/// base64 of 32 bytes: seals link credentials in tests.
pub const LINK_KEY: &str = "aGVyYWxkLXRlc3QtbGluay1rZXktMzItYnl0ZXMhISE=";
/// 2026-11-25T06:00:00Z: where driven clocks start.
pub const START_MS: u64 = 1_795_586_400_000;

/// One request as the partner saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub webhook_id: String,
    pub timestamp: String,
    pub signature: String,
    pub raw: Bytes,
    pub body: serde_json::Value,
    /// On the shared clock, when the request arrived.
    pub at_ms: u64,
    /// The status the mock answered with; `None` while it hangs.
    pub answered: Option<u16>,
}

/// How the mock answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    WithHeader(u16, &'static str, String),
    /// Never answers (until the test ends).
    Hang,
}

impl Reply {
    /// The status it answers with; `None` for one that never answers.
    fn status(&self) -> Option<u16> {
        match self {
            Reply::Status(code) | Reply::WithHeader(code, _, _) => Some(*code),
            Reply::Hang => None,
        }
    }
}

/// Answers a request from what it carries: given it and every request so
/// far (it included), the reply, or `None` for the default.
pub type Responder = Arc<dyn Fn(&Recorded, &[Recorded]) -> Option<Reply> + Send + Sync>;

struct MockState {
    clock: Clock,
    recorded: Mutex<Vec<Recorded>>,
    script: Mutex<VecDeque<Reply>>,
    /// Consulted when the script is empty, before the default.
    responder: Mutex<Option<Responder>>,
    /// The answer when the script is empty.
    default: Mutex<Reply>,
    arrived: Notify,
}

/// The server while it listens: what stops it, and its task.
struct Listening {
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

pub struct MockPartner {
    pub url: String,
    addr: SocketAddr,
    state: Arc<MockState>,
    listening: Mutex<Option<Listening>>,
}

impl MockPartner {
    /// Starts on a free loopback port; answers 200 unless scripted otherwise.
    pub async fn start(clock: Clock) -> MockPartner {
        let state = Arc::new(MockState {
            clock,
            recorded: Mutex::new(Vec::new()),
            script: Mutex::new(VecDeque::new()),
            responder: Mutex::new(None),
            default: Mutex::new(Reply::Status(200)),
            arrived: Notify::new(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let listening = serve(listener, Arc::clone(&state));
        MockPartner {
            url: format!("http://{addr}/hook"),
            addr,
            state,
            listening: Mutex::new(Some(listening)),
        }
    }

    /// Stops listening, so that connecting is refused, and closes the open
    /// connections once their requests are answered (waiting up to 5 s).
    pub async fn refuse_connections(&self) {
        let Some(listening) = self.listening.lock().unwrap().take() else {
            return;
        };
        let _ = listening.stop.send(());
        // The listener is closed first; a request left hanging only keeps
        // its own connection open.
        let _ = tokio::time::timeout(Duration::from_secs(5), listening.server).await;
    }

    /// Listens again on the same port after [`MockPartner::refuse_connections`].
    pub async fn accept_connections(&self) {
        if self.listening.lock().unwrap().is_some() {
            return;
        }
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("the mock partner's port is free again");
        let listening = serve(listener, Arc::clone(&self.state));
        *self.listening.lock().unwrap() = Some(listening);
    }

    /// The next requests get these answers, in order; then 200 again.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().unwrap().extend(replies);
    }

    /// A partner that answers by content: a type it refuses, an event it
    /// fails a few times before taking it.
    pub fn answer_with(
        &self,
        responder: impl Fn(&Recorded, &[Recorded]) -> Option<Reply> + Send + Sync + 'static,
    ) {
        *self.state.responder.lock().unwrap() = Some(Arc::new(responder));
    }

    /// Every request after the script gets this answer (a partner down, or back).
    pub fn answer_by_default(&self, reply: Reply) {
        *self.state.default.lock().unwrap() = reply;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.recorded.lock().unwrap().clone()
    }

    /// Waits (real time, bounded) until at least `n` requests arrived.
    pub async fn wait_for(&self, n: usize) -> Vec<Recorded> {
        match self.wait_within(n, Duration::from_secs(20)).await {
            Some(seen) => seen,
            None => panic!(
                "expected {n} requests at the mock partner, got {}",
                self.requests().len()
            ),
        }
    }

    /// Waits up to `limit` (real time) for at least `n` requests; `None` if they never came.
    pub async fn wait_within(&self, n: usize, limit: Duration) -> Option<Vec<Recorded>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.state.arrived.notified();
            let seen = self.requests();
            if seen.len() >= n {
                return Some(seen);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

fn serve(listener: tokio::net::TcpListener, state: Arc<MockState>) -> Listening {
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(state);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
            .expect("mock partner serves");
    });
    Listening { stop, server }
}

async fn receive(State(state): State<Arc<MockState>>, headers: HeaderMap, raw: Bytes) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let at_ms = state.clock.now_ms();
    let body = serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null);
    let mut recorded = Recorded {
        webhook_id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        body,
        raw,
        at_ms,
        answered: None,
    };
    let scripted = state.script.lock().unwrap().pop_front();
    let reply = match scripted {
        Some(reply) => {
            recorded.answered = reply.status();
            state.recorded.lock().unwrap().push(recorded);
            reply
        }
        None => {
            let responder = state.responder.lock().unwrap().clone();
            let mut seen = state.recorded.lock().unwrap();
            seen.push(recorded);
            let by_content = {
                let (this, all) = (seen.last().expect("just pushed"), seen.as_slice());
                responder.and_then(|respond| respond(this, all))
            };
            let reply = by_content.unwrap_or_else(|| state.default.lock().unwrap().clone());
            if let Some(this) = seen.last_mut() {
                this.answered = reply.status();
            }
            reply
        }
    };
    state.arrived.notify_waiters();
    match reply {
        Reply::Status(code) => status(code).into_response(),
        Reply::WithHeader(code, name, value) => {
            (status(code), [(name, value)], "slow down").into_response()
        }
        Reply::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
    }
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).expect("valid status")
}

/// A partner's TOML table for a mock at `url`, with fast, small retries.
pub fn partner_toml(name: &str, url: &str, extra: &str) -> String {
    format!(
        r#"
[partners.{name}]
adapter = "webhook"
url = "{url}"
secret_env = "TEST_WEBHOOK_SECRET"
allow_private = true
timeout_ms = 1000
{extra}
"#
    )
}

pub fn config_toml(data_dir: &std::path::Path, partners: &str, server_extra: &str) -> String {
    // The host's disk is not what these tests are about: with the default
    // (5 % of the filesystem) a nearly full test machine would refuse every
    // event. tests/disk_full.rs sets its own.
    let disk = match server_extra.contains("min_free_disk") {
        true => "",
        false => "min_free_disk = \"16MiB\"",
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{}"
shutdown_grace = "2s"
{disk}
{server_extra}

[[tokens]]
name = "door-service"
role = "ingest"
token_env = "TEST_INGEST_TOKEN"

[[tokens]]
name = "on-call"
role = "operator"
token_env = "TEST_OPERATOR_TOKEN"
{partners}
"#,
        data_dir.display()
    )
}

pub fn test_env(name: &str) -> Option<String> {
    match name {
        "TEST_WEBHOOK_SECRET" => Some(SECRET.to_string()),
        "TEST_INGEST_TOKEN" => Some(INGEST_TOKEN.to_string()),
        "TEST_OPERATOR_TOKEN" => Some(OPERATOR_TOKEN.to_string()),
        "HERALD_LINK_KEY" => Some(LINK_KEY.to_string()),
        _ => None,
    }
}

/// A herald in this process, on a temp data dir.
pub struct TestHerald {
    pub herald: Herald,
    pub clock: Clock,
    pub config: Config,
    pub http: reqwest::Client,
}

impl TestHerald {
    pub async fn start(toml: &str, clock: Clock) -> TestHerald {
        TestHerald::start_with_env(toml, clock, &test_env).await
    }

    /// With secrets from `env` instead of [`test_env`].
    pub async fn start_with_env(
        toml: &str,
        clock: Clock,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> TestHerald {
        let config = Config::parse(toml, env).expect("test config is valid");
        let herald = herald::start(config.clone(), clock.clone())
            .await
            .expect("herald starts");
        TestHerald {
            herald,
            clock,
            config,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.herald.url())
    }

    /// POSTs a body to /v1/events with the ingest token: (status, JSON answer).
    pub async fn post_events(&self, body: &str) -> (u16, serde_json::Value) {
        let response = self
            .http
            .post(self.url("/v1/events"))
            .bearer_auth(INGEST_TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("herald answers");
        read(response).await
    }

    /// GETs an admin path with the operator token.
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(OPERATOR_TOKEN)
            .send()
            .await
            .expect("herald answers");
        read(response).await
    }

    /// Posts one event to `partner` and returns (event id, delivery id).
    pub async fn send_one(&self, partner: &str, priority: &str) -> (String, String) {
        let (status, body) = self
            .post_events(&format!(
                r#"{{"device_id":"lock-7f3a","type":"door.forced_open","priority":"{priority}","data":{{"value":"forced_open"}},"partners":["{partner}"]}}"#
            ))
            .await;
        assert_eq!(status, 202, "{body}");
        (
            body["id"].as_str().expect("id").to_string(),
            body["deliveries"][0]["id"]
                .as_str()
                .expect("delivery id")
                .to_string(),
        )
    }

    /// How many records of one kind (key prefix, see `store::keys`) the store holds.
    pub fn records(&self, prefix: char) -> usize {
        self.herald
            .store()
            .record_counts()
            .into_iter()
            .find(|(p, _)| *p == prefix)
            .map_or(0, |(_, n)| n)
    }

    /// Every delivery herald has made or holds, as on-call reads it: each
    /// partner's `queued` plus `sent` in `GET /v1/partners`. An event that
    /// was refused adds nothing to it.
    pub async fn deliveries_held_or_sent(&self) -> u64 {
        let (status, body) = self.get("/v1/partners").await;
        assert_eq!(status, 200, "{body}");
        body["partners"]
            .as_array()
            .expect("partners")
            .iter()
            .map(|p| p["queued"].as_u64().unwrap_or(0) + p["sent"].as_u64().unwrap_or(0))
            .sum()
    }

    /// Waits (real time, bounded) until the store counts `n` deliveries
    /// queued for `partner`, and checks that a full scan agrees.
    pub async fn wait_queued(&self, partner: &str, n: u64) {
        for _ in 0..400 {
            if self.herald.store().queued(partner) == n {
                let scanned = self.herald.store().scheduled_count(partner) as u64;
                assert_eq!(scanned, n, "the kept count and a scan of the index agree");
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!(
            "expected {n} queued for {partner}, the store counts {}",
            self.herald.store().queued(partner)
        );
    }

    /// Waits until herald is quiet: no send started or finished and no
    /// commit made for 20 polls in a row (real time, bounded; a send may
    /// still wait for a rate-limit token meanwhile). What a "nothing more happens" check asserts
    /// after, instead of after a fixed sleep that a loaded machine outruns.
    pub async fn quiesce(&self) {
        let activity = || {
            let sent: u64 = self
                .herald
                .dispatcher()
                .lanes()
                .map(|lane| lane.stats.sent.load(std::sync::atomic::Ordering::Relaxed))
                .sum();
            let in_flight: usize = self
                .herald
                .dispatcher()
                .lanes()
                .map(|l| l.in_flight())
                .sum();
            (sent, in_flight, self.herald.store().durable_commit())
        };
        let mut last = activity();
        let mut quiet = 0;
        for _ in 0..2000 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let now = activity();
            quiet = if now == last { quiet + 1 } else { 0 };
            if quiet >= 20 {
                return;
            }
            last = now;
        }
        panic!("herald never went quiet: (sent, in flight, commit) = {last:?}");
    }

    /// Polls the store (real time, bounded) until `check` holds for the event.
    pub async fn wait_event(
        &self,
        id: &str,
        what: &str,
        check: impl Fn(&herald::model::EventRecord) -> bool,
    ) -> herald::model::EventRecord {
        let id = uuid::Uuid::parse_str(id).expect("uuid");
        for _ in 0..2000 {
            if let Some(event) = self.herald.store().event(id).expect("store reads") {
                if check(&event) {
                    return event;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("event {id} never reached: {what}");
    }
}

/// A herald on a driven clock with one webhook partner `acme` at a fresh mock.
pub async fn setup(
    partner_extra: &str,
    server_extra: &str,
) -> (TestHerald, MockPartner, tempfile::TempDir) {
    setup_on(Clock::manual(START_MS), partner_extra, server_extra).await
}

/// [`setup`] on `clock`.
pub async fn setup_on(
    clock: Clock,
    partner_extra: &str,
    server_extra: &str,
) -> (TestHerald, MockPartner, tempfile::TempDir) {
    let mock = MockPartner::start(clock.clone()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let toml = config_toml(
        dir.path(),
        &partner_toml("acme", &mock.url, partner_extra),
        server_extra,
    );
    (TestHerald::start(&toml, clock).await, mock, dir)
}

/// Real time for the lane to act on a clock step it could act on.
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(150)).await;
}

pub async fn read(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("body");
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
    });
    (status, json)
}

/// The seed for a randomised test: `var` from the environment to replay a
/// run, else the time; printed so that a failure can be replayed.
pub fn seed_from_env(var: &str) -> u64 {
    let seed = std::env::var(var)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
        // xorshift never leaves 0.
        | 1;
    println!("seed: {seed} ({var}={seed} replays it)");
    seed
}

/// xorshift64*: enough randomness for fault timings, reproducible from a seed.
pub struct Rng(pub u64);

impl Rng {
    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }

    /// A duration in `from..to` milliseconds.
    pub fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

/// Posts `body` (one event or a batch) to herald's ingest at `url` and
/// returns the ids of the events a `202` accepted; `None` if herald was
/// down or refused (after a short pause), or if a kill cut the `202`'s body
/// off (herald answered only once the events were on disk, but without the
/// body their ids are unknown, so the caller does not count them).
pub async fn post_accepted(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> Option<Vec<String>> {
    let answer = http
        .post(format!("{url}/v1/events"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .timeout(timeout)
        .send()
        .await;
    let answer = match answer {
        Ok(answer) if answer.status() == reqwest::StatusCode::ACCEPTED => answer,
        _ => {
            tokio::time::sleep(Duration::from_millis(20)).await;
            return None;
        }
    };
    let body = answer.bytes().await.ok()?;
    let body: serde_json::Value = serde_json::from_slice(&body).expect("a 202 carries a JSON body");
    let answered = match body {
        serde_json::Value::Array(items) => items,
        one => vec![one],
    };
    let ids = answered
        .iter()
        .map(|item| {
            item["id"]
                .as_str()
                .expect("202 names the event id")
                .to_string()
        })
        .collect();
    Some(ids)
}
