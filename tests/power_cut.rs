//! A power cut loses no event that got a 202, and herald opens the store
//! the cut left behind.
//!
//! The real `herald` binary runs with its data dir on the power-cut
//! filesystem (tools/powercut-fs): each file's writes since its last
//! fsync/fdatasync are held in memory, and a name change (create, rename,
//! unlink, mkdir) is durable only once its directory is fsynced. Four
//! clients post events of 200 bytes to 64 KiB (single and in batches) and
//! a loopback partner records what it receives. At seeded random moments
//! the power is cut: herald is SIGKILLed, everything not durable is dropped
//! (at half the cuts all of it, at the others all but a random share, kept
//! in 4 KiB pieces: torn writes), and herald restarts on what the disk kept,
//! on a fresh mount of the same backing dir. After the last cut every event
//! answered 202 must be in the store (GET /v1/events/{id}) and at the
//! partner, and every restart must have opened the store. A restart herald
//! refuses is counted, and the run goes on with the commit watermark
//! emptied (or, if herald still refuses, on an empty data dir) so the
//! losses can be counted too.
//!
//! CI form (6 cuts):
//!
//! ```text
//! cargo nextest run --test power_cut --no-capture
//! ```
//!
//! Long form, 50 cuts:
//!
//! ```text
//! HERALD_POWER_CUTS=50 cargo nextest run --test power_cut --no-capture
//! ```
//!
//! `HERALD_POWER_CUT_SEED=<n>` replays a run's choices (the timing of
//! herald's own writes still varies); `HERALD_POWER_CUT_METADATA=ordered`
//! makes any fsync commit every earlier name change, as ext4's and XFS's
//! journals do. Needs root and /dev/fuse; skipped with a message where the
//! machine cannot mount FUSE.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use futures::StreamExt;
use herald::bench::process::{HeraldProcess, TOKEN};
use powercut_fs::{MetadataModel, Mounted, Options};

const CI_CUTS: usize = 6;
const CLIENTS: usize = 4;
/// herald's cap on one event's JSON (`api::ingest::MAX_EVENT_BYTES`), less
/// room for the fields around the payload.
const MAX_PAYLOAD: usize = 64 * 1024 - 512;
const MIN_PAYLOAD: usize = 200;

async fn receive(State(seen): State<Arc<Mutex<HashSet<String>>>>, body: Bytes) -> StatusCode {
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if let Some(id) = event["id"].as_str() {
        seen.lock().unwrap().insert(id.to_string());
    }
    StatusCode::OK
}

/// A payload length from 200 bytes to 64 KiB, even on a log scale: as many
/// events of a few hundred bytes as of tens of KiB.
fn payload_len(rng: &mut fastrand::Rng) -> usize {
    let (low, high) = ((MIN_PAYLOAD as f64).ln(), (MAX_PAYLOAD as f64).ln());
    ((low + rng.f64() * (high - low)).exp() as usize).clamp(MIN_PAYLOAD, MAX_PAYLOAD)
}

/// Posts singles and batches of 2..=4 until `stop`; returns the ids answered 202.
async fn client(
    url: Arc<Mutex<String>>,
    seed: u64,
    stop: Arc<AtomicBool>,
    posted: Arc<AtomicU64>,
) -> HashSet<String> {
    let http = reqwest::Client::new();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut accepted = HashSet::new();
    while !stop.load(Ordering::Relaxed) {
        let size = match rng.u8(0..4) {
            0 => rng.usize(2..=4),
            _ => 1,
        };
        let events: Vec<serde_json::Value> = (0..size)
            .map(|_| {
                let n = posted.fetch_add(1, Ordering::Relaxed);
                let fill = rng.alphanumeric();
                serde_json::json!({
                    "device_id": format!("meter-{}", n % 64),
                    "type": "meter.reading",
                    "data": {"n": n, "payload": fill.to_string().repeat(payload_len(&mut rng))},
                    "partners": ["sink"],
                })
            })
            .collect();
        let body = match size {
            1 => events[0].clone(),
            _ => serde_json::Value::Array(events),
        };
        let base = url.lock().unwrap().clone();
        let Some(ids) =
            common::post_accepted(&http, &base, TOKEN, &body, Duration::from_secs(10)).await
        else {
            continue;
        };
        accepted.extend(ids);
    }
    accepted
}

fn env_parse<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The last lines of herald's log, for a refused restart.
fn log_tail(herald: &HeraldProcess) -> String {
    let log = std::fs::read_to_string(herald.log_path()).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(3)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_accepted_event_is_lost_to_a_power_cut() {
    if let Err(why) = powercut_fs::can_mount() {
        eprintln!("SKIPPED power_cut: the power-cut filesystem cannot be mounted here: {why}");
        return;
    }
    let cuts: usize = env_parse("HERALD_POWER_CUTS").unwrap_or(CI_CUTS);
    let seed: u64 = env_parse("HERALD_POWER_CUT_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let metadata = match std::env::var("HERALD_POWER_CUT_METADATA").as_deref() {
        Ok("ordered") => MetadataModel::Ordered,
        _ => MetadataModel::Strict,
    };
    println!(
        "power cut seed: {seed} (HERALD_POWER_CUT_SEED={seed} replays it), {cuts} cuts, \
         {metadata:?} metadata"
    );
    let mut rng = fastrand::Rng::with_seed(seed);

    let root = tempfile::tempdir().expect("temp dir");
    let backing = root.path().join("backing");
    let mountpoint = root.path().join("mount");
    std::fs::create_dir(&backing).expect("backing dir");
    std::fs::create_dir(&mountpoint).expect("mount point");
    let options = Options {
        metadata,
        ..Options::default()
    };
    let mut mounted =
        Mounted::mount(&backing, &mountpoint, &options).expect("the power-cut filesystem mounts");
    let data_dir: PathBuf = mountpoint.join("data");

    let seen = Arc::new(Mutex::new(HashSet::new()));
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(Arc::clone(&seen));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let partner = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let mut herald = HeraldProcess::start_on(
        Path::new(env!("CARGO_BIN_EXE_herald")),
        &partner,
        // Slower than the clients, so every cut finds a backlog on disk.
        r#"rate = { per_second = 300, burst = 20 }
retry = { initial_ms = 50, max_interval_ms = 500, max_age = "1h" }"#,
        Some(&data_dir),
    )
    .await
    .expect("herald starts on the power-cut filesystem");

    let url = Arc::new(Mutex::new(herald.url.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let posted = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            tokio::spawn(client(
                Arc::clone(&url),
                seed.wrapping_add(n as u64 + 1),
                Arc::clone(&stop),
                Arc::clone(&posted),
            ))
        })
        .collect();

    let started = Instant::now();
    let mut refused = 0;
    for cut in 1..=cuts {
        let after = Duration::from_millis(rng.u64(300..1500));
        tokio::time::sleep(after).await;
        herald.kill().expect("herald was running until the cut");
        let keep_share = match rng.bool() {
            true => 0.0,
            false => rng.f64(),
        };
        let report = mounted
            .cut(rng.u64(..), keep_share)
            .expect("the power-cut filesystem cuts and unmounts");
        println!(
            "cut {cut} after {after:?}, {} events posted so far, keeping {:.0} %: {report}",
            posted.load(Ordering::Relaxed),
            keep_share * 100.0
        );
        mounted = Mounted::mount(&backing, &mountpoint, &options)
            .expect("the power-cut filesystem mounts again");
        herald.restart_stopped().expect("herald restarts");
        if let Err(e) = herald.wait_ready(Duration::from_secs(60)).await {
            refused += 1;
            println!("cut {cut}: restart refused: {e}\n{}", log_tail(&herald));
            // Go on with the commit watermark emptied ("no commit yet"; the
            // file also marks the dir as herald's), so the losses can be
            // counted.
            let _ = std::fs::write(data_dir.join("herald-commits"), b"");
            herald.restart_stopped().expect("herald restarts");
            if let Err(e) = herald.wait_ready(Duration::from_secs(60)).await {
                println!(
                    "cut {cut}: refused with the watermark emptied too: {e}\n{}\n\
                     going on with an empty data dir",
                    log_tail(&herald)
                );
                std::fs::rename(&data_dir, mountpoint.join(format!("data.refused-{cut}")))
                    .expect("the refused data dir moves aside");
                herald.restart_stopped().expect("herald restarts");
                herald
                    .wait_ready(Duration::from_secs(60))
                    .await
                    .expect("herald starts on an empty data dir");
            }
        }
    }
    // Some traffic after the last restart too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = HashSet::new();
    for c in clients {
        acked.extend(c.await.expect("client task"));
    }
    let cutting = started.elapsed();
    assert!(
        acked.len() > 100,
        "too few events acked ({}) for the test to mean anything",
        acked.len()
    );

    // Every acked event reaches the partner: waited for while deliveries
    // still arrive (the backlog drains at the partner's rate), in bounded
    // real time.
    let mut last_progress = (0, Instant::now());
    let undelivered: HashSet<String> = loop {
        let (undelivered, delivered): (HashSet<String>, usize) = {
            let seen = seen.lock().unwrap();
            (acked.difference(&seen).cloned().collect(), seen.len())
        };
        if delivered > last_progress.0 {
            last_progress = (delivered, Instant::now());
        }
        if undelivered.is_empty() || last_progress.1.elapsed() > Duration::from_secs(10) {
            break undelivered;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // And every acked event is in the store.
    let http = reqwest::Client::new();
    let base = herald.url.clone();
    let absent: HashSet<String> = futures::stream::iter(acked.iter().cloned())
        .map(|id| {
            let (http, base) = (http.clone(), base.clone());
            async move {
                let status = http
                    .get(format!("{base}/v1/events/{id}"))
                    .bearer_auth(TOKEN)
                    .send()
                    .await
                    .map(|r| r.status());
                (id, status)
            }
        })
        .buffer_unordered(16)
        .filter_map(|(id, status)| async move {
            match status {
                Ok(StatusCode::OK) => None,
                Ok(StatusCode::NOT_FOUND) => Some(id),
                other => panic!("GET /v1/events/{id}: {other:?}"),
            }
        })
        .collect()
        .await;
    let missing: HashSet<&String> = undelivered.union(&absent).collect();
    println!(
        "power cut (seed {seed}): {cuts} cuts in {cutting:.1?}, {} events acked, {} missing \
         ({} not in the store, {} never delivered), {refused} restarts refused",
        acked.len(),
        missing.len(),
        absent.len(),
        undelivered.len()
    );
    herald.stop().expect("SIGTERM ends herald with exit 0");
    mounted
        .unmount()
        .expect("the power-cut filesystem unmounts");
    assert_eq!(
        refused, 0,
        "seed {seed}: herald refused {refused} of {cuts} restarts after a power cut"
    );
    assert!(
        missing.is_empty(),
        "seed {seed}: {} of {} acked events lost to {cuts} power cuts, e.g. {:?}",
        missing.len(),
        acked.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
}
