//! The promise that matters most: an event that got a 202 is delivered, even
//! if herald is SIGKILLed at any moment.
//!
//! The real `herald` binary runs against a real partner on loopback while
//! four clients post events; it is killed at random moments (the seed is
//! printed; `HERALD_CRASH_SEED=<n>` replays a run), restarted on the same
//! data dir each time, and in the end every accepted event id must have
//! reached the partner. A delivery may arrive twice only if a kill fell
//! between its two arrivals (it was in flight when herald died): the first
//! arrived before herald was started again, the second after.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use herald::bench::process::{HeraldProcess, TOKEN};

const KILLS: usize = 6;
const CLIENTS: usize = 4;

/// What the partner saw: each delivery id's arrival times, and event ids.
#[derive(Default)]
struct Seen {
    arrivals: HashMap<String, Vec<Instant>>,
    events: HashSet<String>,
}

async fn receive(
    State(seen): State<Arc<Mutex<Seen>>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let delivery = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut seen = seen.lock().unwrap();
    seen.arrivals
        .entry(delivery)
        .or_default()
        .push(Instant::now());
    if let Some(id) = event["id"].as_str() {
        seen.events.insert(id.to_string());
    }
    StatusCode::OK
}

/// Posts batches of 1..=8 events until `stop`; returns the ids that got a 202.
async fn client(
    n: usize,
    url: String,
    stop: Arc<AtomicBool>,
    seq: Arc<AtomicU64>,
) -> HashSet<String> {
    let http = reqwest::Client::new();
    let mut accepted = HashSet::new();
    let mut size = n % 8;
    while !stop.load(Ordering::Relaxed) {
        size = size % 8 + 1;
        let events: Vec<serde_json::Value> = (0..size)
            .map(|_| {
                let i = seq.fetch_add(1, Ordering::Relaxed);
                serde_json::json!({
                    "device_id": format!("dev-{n}-{}", i % 50),
                    "type": "sensor.temperature",
                    "data": {"n": i},
                    "partners": ["sink"],
                })
            })
            .collect();
        // Single objects and arrays both: the two ingest shapes.
        let body = if size == 1 {
            events[0].clone()
        } else {
            serde_json::Value::Array(events)
        };
        let Some(ids) =
            common::post_accepted(&http, &url, TOKEN, &body, Duration::from_secs(5)).await
        else {
            continue;
        };
        accepted.extend(ids);
    }
    accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_event_survives_sigkill() {
    let seed = common::seed_from_env("HERALD_CRASH_SEED");
    let mut rng = common::Rng(seed);

    let seen = Arc::new(Mutex::new(Seen::default()));
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(Arc::clone(&seen));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let partner = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let mut herald = HeraldProcess::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_herald")),
        &partner,
        // Slower than the clients, so every kill finds a backlog on disk.
        r#"rate = { per_second = 800, burst = 50 }
retry = { initial_ms = 50, max_interval_ms = 500, max_age = "1h" }"#,
    )
    .await
    .expect("herald starts");

    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            tokio::spawn(client(
                n,
                herald.url.clone(),
                Arc::clone(&stop),
                Arc::clone(&seq),
            ))
        })
        .collect();

    let mut kills = Vec::new();
    for k in 0..KILLS {
        let after = Duration::from_millis(100 + rng.below(600));
        tokio::time::sleep(after).await;
        herald.kill().expect("herald was running until the kill");
        // A request written just before the kill may be read by the partner
        // after the process is gone; what tells the two processes' requests
        // apart is when the next one starts, so that waits a little.
        tokio::time::sleep(Duration::from_millis(50)).await;
        kills.push(Instant::now());
        println!(
            "kill {} after {after:?}: {} events posted so far",
            k + 1,
            seq.load(Ordering::Relaxed)
        );
        herald.restart_stopped().expect("herald restarts");
        herald
            .wait_ready(Duration::from_secs(30))
            .await
            .expect("herald comes back on the same data dir");
    }
    // Some traffic after the last restart too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut accepted = HashSet::new();
    for c in clients {
        accepted.extend(c.await.expect("client task"));
    }
    assert!(
        accepted.len() > 100,
        "too few events accepted ({}) for the test to mean anything",
        accepted.len()
    );

    // Everything accepted reaches the partner, in bounded real time.
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let missing: Vec<String> = {
            let seen = seen.lock().unwrap();
            accepted
                .iter()
                .filter(|id| !seen.events.contains(*id))
                .cloned()
                .collect()
        };
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        missing.is_empty(),
        "seed {seed}: {} of {} accepted events never reached the partner, e.g. {:?}",
        missing.len(),
        accepted.len(),
        &missing[..missing.len().min(5)]
    );

    // A second arrival of one delivery needs a kill between the two.
    let seen = seen.lock().unwrap();
    let mut duplicates = 0;
    for (delivery, times) in &seen.arrivals {
        for pair in times.windows(2) {
            duplicates += 1;
            assert!(
                kills.iter().any(|k| pair[0] <= *k && *k <= pair[1]),
                "seed {seed}: delivery {delivery} arrived twice with no kill in between"
            );
        }
    }
    println!(
        "{} events accepted, {} delivered, {duplicates} redelivered after a kill",
        accepted.len(),
        seen.events.len()
    );
    drop(seen);
    herald.stop().expect("SIGTERM ends herald with exit 0");
}
