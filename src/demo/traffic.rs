//! The demo's traffic: a mix of normal and critical events posted to
//! `POST /v1/events` as an internal service would, with a progress bar (or,
//! when stdout is not a terminal, a line every few seconds), then the wait
//! for herald's backlog to settle.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use super::stage::{Stage, DEVICES};

/// Events posted per second.
pub const EVENTS_PER_SECOND: u64 = 20;
/// One event in this many is critical.
const CRITICAL_EVERY: u64 = 10;
/// Without a terminal, a progress line this often.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// One event herald answered `202` for.
pub struct SentEvent {
    pub id: String,
    pub critical: bool,
}

/// What the sending phase did.
#[derive(Default)]
pub struct Sent {
    pub accepted: Vec<SentEvent>,
    /// Events herald did not take, each with why.
    pub refused: Vec<String>,
    pub took: Duration,
}

impl Sent {
    pub fn critical(&self) -> usize {
        self.accepted.iter().filter(|e| e.critical).count()
    }
}

/// The `i`th event of the mix: which device, what type, how urgent.
fn event(i: u64) -> (Value, bool) {
    if i % CRITICAL_EVERY == CRITICAL_EVERY - 1 {
        let body = match (i / CRITICAL_EVERY) % 2 {
            0 => json!({
                "device_id": DEVICES[0], "type": "door.forced_open", "priority": "critical",
                "data": {"capability": "lock", "attribute": "lock", "value": "forced_open"},
            }),
            _ => json!({
                "device_id": DEVICES[2], "type": "temperature.abnormal", "priority": "critical",
                "data": {"capability": "temperatureMeasurement", "attribute": "temperature",
                         "value": 31.5, "unit": "C", "room": "nursery"},
            }),
        };
        return (body, true);
    }
    let body = match i % 4 {
        0 => json!({
            "device_id": DEVICES[0], "type": "door.lock",
            "data": {"capability": "lock", "attribute": "lock",
                     "value": if i % 8 == 0 { "locked" } else { "unlocked" }},
        }),
        1 => json!({
            "device_id": DEVICES[1], "type": "door.contact",
            "data": {"capability": "contactSensor", "attribute": "contact",
                     "value": if i % 8 == 1 { "open" } else { "closed" }},
        }),
        2 => json!({
            "device_id": DEVICES[2], "type": "temperature.reading",
            "data": {"capability": "temperatureMeasurement", "attribute": "temperature",
                     "value": 20.0 + (i % 30) as f64 / 10.0, "unit": "C"},
        }),
        _ => json!({
            "device_id": DEVICES[3], "type": "motion.detected",
            "data": {"capability": "motionSensor", "attribute": "motion",
                     "value": if i % 8 == 3 { "active" } else { "inactive" }},
        }),
    };
    (body, false)
}

/// Herald's counts across partners, from `GET /v1/partners`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub delivered: u64,
    pub retried: u64,
    pub dead: u64,
    pub queued: u64,
}

pub async fn totals(stage: &Stage) -> Result<Totals, String> {
    let partners = super::report::get_json(stage, "/v1/partners").await?;
    let mut totals = Totals::default();
    for p in partners["partners"].as_array().into_iter().flatten() {
        let n = |key: &str| p[key].as_u64().unwrap_or(0);
        totals.delivered += n("delivered");
        totals.retried += n("retried");
        totals.dead += n("dead");
        totals.queued += n("queued");
    }
    Ok(totals)
}

/// A bar on a terminal; lines every few seconds elsewhere.
pub struct Progress {
    bar: Option<ProgressBar>,
    last_line: Option<Instant>,
}

impl Progress {
    pub fn new(duration: Duration) -> Progress {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(
                Some(duration.as_millis() as u64),
                ProgressDrawTarget::stdout(),
            );
            let style = ProgressStyle::with_template("{prefix:>9} [{bar:30}] {msg}")
                .map(|s| s.progress_chars("=> "))
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Progress {
            bar,
            last_line: None,
        }
    }

    fn show(&mut self, prefix: String, position: Option<u64>, message: String) {
        match &self.bar {
            Some(bar) => {
                bar.set_prefix(prefix);
                if let Some(position) = position {
                    bar.set_position(position);
                }
                bar.set_message(message);
            }
            None => {
                if self.last_line.is_none_or(|at| at.elapsed() >= LINE_EVERY) {
                    self.last_line = Some(Instant::now());
                    println!("{prefix:>9}  {message}");
                }
            }
        }
    }

    /// From here on a spinner (on a terminal): the wait has no known length.
    pub fn spin(&mut self) {
        self.finish();
        if std::io::stdout().is_terminal() {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
            if let Ok(style) = ProgressStyle::with_template("{prefix:>9} {spinner} {msg}") {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(120));
            self.bar = Some(bar);
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.last_line = None;
    }
}

fn describe(sent: usize, t: &Totals) -> String {
    format!(
        "sent {sent} · delivered {} · retries {} · dead letters {} · queued {}",
        t.delivered, t.retried, t.dead, t.queued
    )
}

/// Posts the mix for `duration`, one event at a time.
pub async fn send(stage: &Stage, duration: Duration, progress: &mut Progress) -> Sent {
    let started = Instant::now();
    let mut sent = Sent::default();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / EVENTS_PER_SECOND));
    // A late tick (a slow answer, a read of the totals) is made up, so the
    // rate holds on average.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut last = Totals::default();
    let mut last_read = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < duration {
        tick.tick().await;
        let (body, critical) = event(i);
        i += 1;
        match post_event(stage, &body).await {
            Ok(id) => sent.accepted.push(SentEvent { id, critical }),
            Err(why) => sent.refused.push(why),
        }
        if last_read.elapsed() >= Duration::from_millis(500) {
            last_read = Instant::now();
            if let Ok(t) = totals(stage).await {
                last = t;
            }
        }
        let elapsed = started.elapsed().min(duration);
        progress.show(
            format!("{}s/{}s", elapsed.as_secs(), duration.as_secs()),
            Some(elapsed.as_millis() as u64),
            describe(sent.accepted.len(), &last),
        );
    }
    sent.took = started.elapsed();
    sent
}

/// Posts one event; the id herald gave it, or why it was not taken.
async fn post_event(stage: &Stage, body: &Value) -> Result<String, String> {
    let answer = stage
        .http
        .post(stage.url("/v1/events"))
        .bearer_auth(&stage.secrets.ingest_token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| format!("POST /v1/events failed: {e}"))?;
    let status = answer.status();
    let text = answer
        .text()
        .await
        .map_err(|e| format!("POST /v1/events: the answer was cut: {e}"))?;
    if status != reqwest::StatusCode::ACCEPTED {
        return Err(format!("POST /v1/events answered {status}: {text}"));
    }
    let answer: Value = serde_json::from_str(&text)
        .map_err(|e| format!("POST /v1/events: a 202 that is not JSON ({e}): {text}"))?;
    answer["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("POST /v1/events: a 202 without an id: {text}"))
}

/// Waits (real time, up to `limit`) until no delivery is queued at any
/// partner; the last totals read, and whether the backlog settled.
pub async fn settle(stage: &Stage, limit: Duration, progress: &mut Progress) -> (Totals, bool) {
    progress.spin();
    let started = Instant::now();
    let mut last = Totals::default();
    loop {
        match totals(stage).await {
            Ok(t) => {
                last = t;
                if t.queued == 0 {
                    return (t, true);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read /v1/partners while settling"),
        }
        if started.elapsed() >= limit {
            return (last, false);
        }
        progress.show(
            "settling".into(),
            None,
            format!(
                "{} deliveries still queued ({}s of at most {}s)",
                last.queued,
                started.elapsed().as_secs(),
                limit.as_secs()
            ),
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
