//! The bench's load generator: internal services posting events to herald.
//!
//! Each event carries its send time in `data.t` (nanoseconds since the
//! bench's epoch) so the sink can measure end-to-end latency. A 503 or 429
//! is backed off and retried: only a 202 counts as accepted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub events: u64,
    pub batch: usize,
    pub clients: usize,
    pub priority: &'static str,
    /// Events per second across all clients; `None` for as fast as herald takes them.
    pub rate: Option<f64>,
}

#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub accepted: u64,
    pub refused: u64,
    pub errors: u64,
    pub seconds: f64,
    pub ingest_latencies_ns: Vec<u64>,
}

/// The JSON of one bench event: about 300 bytes, like a real state report.
pub fn event_json(seq: u64, sent_ns: u64, priority: &str) -> String {
    format!(
        r#"{{"device_id":"thermo-{:05}","type":"temperature.reading","priority":"{priority}","data":{{"t":{sent_ns},"seq":{seq},"capability":"temperatureMeasurement","attribute":"temperature","value":22.5,"unit":"C","component":"main","room":"living-room","firmware":"4.2.1-build.8841"}},"partners":["sink"]}}"#,
        seq % 50_000
    )
}

pub async fn run(url: &str, token: &str, spec: &LoadSpec, epoch: Instant) -> LoadReport {
    let client = match reqwest::Client::builder().no_proxy().build() {
        Ok(c) => c,
        Err(_) => return LoadReport::default(),
    };
    let next = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut ingest_latencies_ns = Vec::new();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..spec.clients.max(1) {
        let (client, spec, url, token) = (
            client.clone(),
            spec.clone(),
            format!("{url}/v1/events"),
            token.to_string(),
        );
        let (next, accepted, refused, errors) = (
            Arc::clone(&next),
            Arc::clone(&accepted),
            Arc::clone(&refused),
            Arc::clone(&errors),
        );
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let first = next.fetch_add(spec.batch as u64, Ordering::Relaxed);
                if first >= spec.events {
                    break;
                }
                let count = (spec.events - first).min(spec.batch as u64);
                if let Some(rate) = spec.rate {
                    // Paced: event `first` is due at first / rate seconds.
                    let due = started + Duration::from_secs_f64(first as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                loop {
                    let sent_ns = epoch.elapsed().as_nanos() as u64;
                    let body = if spec.batch == 1 {
                        event_json(first, sent_ns, spec.priority)
                    } else {
                        let events: Vec<String> = (first..first + count)
                            .map(|n| event_json(n, sent_ns, spec.priority))
                            .collect();
                        format!("[{}]", events.join(","))
                    };
                    let t0 = Instant::now();
                    let answer = client
                        .post(&url)
                        .bearer_auth(&token)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await;
                    match answer.map(|r| r.status().as_u16()) {
                        Ok(202) => {
                            mine.push(t0.elapsed().as_nanos() as u64);
                            accepted.fetch_add(count, Ordering::Relaxed);
                            break;
                        }
                        Ok(429) | Ok(503) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            if errors.load(Ordering::Relaxed) > 1000 {
                                return mine;
                            }
                        }
                    }
                }
            }
            mine
        }));
    }
    for task in tasks {
        if let Ok(mine) = task.await {
            ingest_latencies_ns.extend(mine);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    LoadReport {
        accepted: accepted.load(Ordering::Relaxed),
        refused: refused.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        seconds,
        ingest_latencies_ns,
    }
}
