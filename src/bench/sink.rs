//! The bench's partner: a loopback HTTP sink that counts what it receives.
//!
//! It reads the send time the load generator put in each event's
//! `data.t` (nanoseconds on the bench's own clock) to measure end-to-end
//! latency, counts unique deliveries by `webhook-id`, and keeps per-second
//! arrival counts so a partner's rate limit can be checked where it matters:
//! at the partner.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;

use crate::sync::lock;

/// How the sink answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Accept = 0,
    Unavailable = 1,
}

pub struct SinkState {
    epoch: Instant,
    mode: AtomicU8,
    pub received: AtomicU64,
    /// One lock per request: the sink shares the CPUs it measures herald on.
    tracked: Mutex<Tracked>,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
}

#[derive(Default)]
struct Tracked {
    unique: HashSet<String>,
    latencies_ns: Vec<u64>,
    critical_latencies_ns: Vec<u64>,
    per_second: Vec<u64>,
}

pub struct Sink {
    pub addr: SocketAddr,
    pub state: Arc<SinkState>,
    server: tokio::task::JoinHandle<()>,
}

/// What the sink saw.
#[derive(Debug, Clone, Default)]
pub struct SinkReport {
    pub received: u64,
    pub unique: u64,
    pub latencies_ns: Vec<u64>,
    pub critical_latencies_ns: Vec<u64>,
    pub per_second: Vec<u64>,
    pub first_ns: u64,
    pub last_ns: u64,
}

impl Sink {
    /// `track` parses bodies for latency; the ceiling run leaves it off.
    pub async fn start(epoch: Instant, track: bool) -> std::io::Result<Sink> {
        Sink::start_on(epoch, track, "127.0.0.1:0").await
    }

    /// Starts on a given address (to come back on a port herald already knows).
    pub async fn start_on(epoch: Instant, track: bool, addr: &str) -> std::io::Result<Sink> {
        let state = Arc::new(SinkState {
            epoch,
            mode: AtomicU8::new(Mode::Accept as u8),
            received: AtomicU64::new(0),
            tracked: Mutex::new(Tracked::default()),
            first_ns: AtomicU64::new(u64::MAX),
            last_ns: AtomicU64::new(0),
        });
        let app = if track {
            Router::new().route("/hook", post(receive_tracked))
        } else {
            Router::new().route("/hook", post(receive_plain))
        }
        .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("bench sink stopped: {e}");
            }
        });
        Ok(Sink {
            addr,
            state,
            server,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.mode.store(mode as u8, Ordering::SeqCst);
    }

    pub fn unique(&self) -> u64 {
        lock(&self.state.tracked).unique.len() as u64
    }

    pub fn report(&self) -> SinkReport {
        let s = &self.state;
        let tracked = lock(&s.tracked);
        SinkReport {
            received: s.received.load(Ordering::Relaxed),
            unique: tracked.unique.len() as u64,
            latencies_ns: tracked.latencies_ns.clone(),
            critical_latencies_ns: tracked.critical_latencies_ns.clone(),
            per_second: tracked.per_second.clone(),
            first_ns: s.first_ns.load(Ordering::Relaxed),
            last_ns: s.last_ns.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn receive_plain(State(state): State<Arc<SinkState>>) -> StatusCode {
    state.received.fetch_add(1, Ordering::Relaxed);
    StatusCode::OK
}

async fn receive_tracked(
    State(state): State<Arc<SinkState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    if state.mode.load(Ordering::SeqCst) == Mode::Unavailable as u8 {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let now = state.epoch.elapsed().as_nanos() as u64;
    state.received.fetch_add(1, Ordering::Relaxed);
    state.first_ns.fetch_min(now, Ordering::Relaxed);
    state.last_ns.fetch_max(now, Ordering::Relaxed);
    let second = (now / 1_000_000_000) as usize;
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    // Parsed outside the lock; only a first arrival's latency is kept.
    let sent = sent_at(&body);
    let mut tracked = lock(&state.tracked);
    if tracked.per_second.len() <= second {
        tracked.per_second.resize(second + 1, 0);
    }
    tracked.per_second[second] += 1;
    if tracked.unique.insert(id) {
        if let Some((sent, critical)) = sent {
            let latency = now.saturating_sub(sent);
            if critical {
                tracked.critical_latencies_ns.push(latency);
            } else {
                tracked.latencies_ns.push(latency);
            }
        }
    }
    StatusCode::OK
}

/// The load generator's send time and whether the event was critical.
fn sent_at(body: &[u8]) -> Option<(u64, bool)> {
    #[derive(serde::Deserialize)]
    struct Probe {
        priority: String,
        data: ProbeData,
    }
    #[derive(serde::Deserialize)]
    struct ProbeData {
        t: u64,
    }
    let probe: Probe = serde_json::from_slice(body).ok()?;
    Some((probe.data.t, probe.priority == "critical"))
}
