//! A full disk, as it happens: herald's data dir on a small tmpfs this test
//! mounts, filled by a file beside it, with the real binary and a partner
//! on loopback.
//!
//! With `server.min_free_disk` set, ingest stops before the disk is full
//! (503, `Retry-After`, a problem saying why), critical events still use
//! their reserve down to the floor, the backlog drains, and ingest comes
//! back by itself once the space does. With the check off, sled meets the
//! full disk inside a group commit: the write is refused, never answered
//! 202, and the store opens again by itself once there is room.
//!
//! Needs root (to mount); without it, each test says so loudly and passes.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{json, Value};

const TOKEN: &str = "disk-full-operator-token-0123456789";
const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const MIB: u64 = 1 << 20;

/// A tmpfs of a given size, unmounted when dropped (a panic included).
struct Mount {
    point: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mount {
    /// `None` (after saying why, loudly) where this machine cannot mount.
    fn tmpfs(size_mib: u64) -> Option<Mount> {
        let dir = tempfile::tempdir().expect("temp dir");
        let point = dir.path().join("mnt");
        std::fs::create_dir(&point).expect("mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(&point)
            .output();
        match mounted {
            Ok(out) if out.status.success() => Some(Mount { point, _dir: dir }),
            Ok(out) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs for the disk-full test (needs root): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount for the disk-full test: {e}");
                None
            }
        }
    }

    fn free(&self) -> u64 {
        herald::disk::measure(&self.point).expect("statvfs").free
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let done = Command::new("umount").arg(&self.point).status();
        if !done.is_ok_and(|s| s.success()) {
            // Something still has a file open there: detach it now, freed when closed.
            let _ = Command::new("umount").arg("-l").arg(&self.point).status();
        }
    }
}

/// A file that takes the disk's space, grown and shrunk by the test.
struct Filler {
    path: PathBuf,
}

impl Filler {
    /// Grows or shrinks it until the disk has about `free` bytes free.
    fn leave_free(&self, mount: &Mount, free: u64) {
        let now = mount.free();
        if now > free {
            self.grow(now - free);
        } else {
            let len = std::fs::metadata(&self.path).map_or(0, |m| m.len());
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.path)
                .expect("filler");
            file.set_len(len.saturating_sub(free - now))
                .expect("shrink the filler");
        }
    }

    /// Appends `bytes` of real data (tmpfs keeps no sparse holes for it);
    /// stops early, without an error, at a full disk.
    fn grow(&self, bytes: u64) {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)
            .expect("filler");
        let chunk = vec![0x5a_u8; 64 * 1024];
        let mut written = 0;
        while written < bytes {
            let n = chunk.len().min((bytes - written) as usize);
            if file.write_all(&chunk[..n]).is_err() {
                return;
            }
            written += n as u64;
        }
    }

    /// Grows it until the disk is full.
    fn fill(&self) {
        self.grow(u64::MAX);
    }

    fn remove(&self) {
        std::fs::remove_file(&self.path).expect("remove the filler");
    }
}

/// The partner: down (503) or up (200); records the events it took.
#[derive(Default)]
struct Partner {
    up: bool,
    delivered: HashMap<String, usize>,
}

async fn receive(State(partner): State<Arc<Mutex<Partner>>>, body: Bytes) -> StatusCode {
    let event: Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut partner = partner.lock().unwrap();
    if !partner.up {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    if let Some(id) = event["id"].as_str() {
        *partner.delivered.entry(id.to_string()).or_default() += 1;
    }
    StatusCode::OK
}

async fn start_partner() -> (String, Arc<Mutex<Partner>>) {
    let partner = Arc::new(Mutex::new(Partner::default()));
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(Arc::clone(&partner));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await.expect("partner serves") });
    (url, partner)
}

/// herald as a real process, its data dir on the mount.
struct Herald {
    child: Child,
    url: String,
    config: PathBuf,
    log: PathBuf,
    http: reqwest::Client,
}

impl Herald {
    async fn start(work: &Path, data_dir: &Path, partner_url: &str, server_extra: &str) -> Herald {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = work.join("herald.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[server]
listen = "127.0.0.1:{port}"
data_dir = "{data}"
cache_mb = 8
shutdown_grace = "2s"
{server_extra}

[[tokens]]
name = "test"
role = "operator"
token_env = "HERALD_TEST_TOKEN"

[partners.sink]
adapter = "webhook"
url = "{partner_url}"
secret_env = "HERALD_TEST_SECRET"
allow_private = true
max_in_flight = 16
timeout_ms = 2000
retry = {{ initial_ms = 100, max_interval_ms = 500, max_age = "1h" }}
breaker = {{ failures = 5, cool_down = "200ms", max_cool_down = "1s" }}
"#,
                data = data_dir.display()
            ),
        )
        .expect("config");
        let mut herald = Herald {
            child: spawn(&config, &work.join("herald.log")),
            url: format!("http://127.0.0.1:{port}"),
            config,
            log: work.join("herald.log"),
            http: {
                herald::dispatch::client::install_crypto_provider();
                reqwest::Client::new()
            },
        };
        herald.wait_up().await;
        herald
    }

    /// Waits for /healthz: /readyz may rightly say "not ready" on a full disk.
    async fn wait_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("herald exited with {status}; log:\n{}", self.log_text());
            }
            let up = self.http.get(format!("{}/healthz", self.url)).send().await;
            if up.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("herald did not come up; log:\n{}", self.log_text());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, a clean exit, and a start on the same data dir.
    async fn restart(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let status = self.child.wait().expect("wait");
        assert!(
            status.success(),
            "herald exited with {status}; log:\n{}",
            self.log_text()
        );
        self.child = spawn(&self.config, &self.log);
        self.wait_up().await;
    }

    async fn post(&self, body: &Value) -> Answer {
        let response = self
            .http
            .post(format!("{}/v1/events", self.url))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("herald answers");
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = response.bytes().await.unwrap_or_default();
        let body: Value = serde_json::from_slice(&body).unwrap_or_default();
        Answer {
            status,
            retry_after,
            body,
        }
    }

    /// Posts `events` and notes every id answered 202 in `accepted`.
    async fn post_noting(&self, events: Vec<Value>, accepted: &mut Vec<String>) -> Answer {
        let answer = self.post(&Value::Array(events)).await;
        if answer.status == 202 {
            for item in answer.body.as_array().expect("a batch's answer is a list") {
                accepted.push(item["id"].as_str().expect("an id").to_string());
            }
        }
        answer
    }

    async fn ready(&self) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}/readyz", self.url))
            .send()
            .await
            .expect("readyz");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    }

    /// `GET /v1/partners`: the sink's queue depth as herald counts it.
    async fn queued(&self) -> u64 {
        let r = self
            .http
            .get(format!("{}/v1/partners", self.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("partners");
        let body: Value = serde_json::from_slice(&r.bytes().await.expect("body")).expect("json");
        body["partners"][0]["queued"].as_u64().expect("queued")
    }

    /// The event as herald shows it, or the status it answered.
    async fn event(&self, id: &str) -> Result<Value, u16> {
        let r = self
            .http
            .get(format!("{}/v1/events/{id}", self.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("get event");
        match r.status().as_u16() {
            200 => Ok(serde_json::from_slice(&r.bytes().await.expect("body")).expect("json")),
            other => Err(other),
        }
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("HERALD_TEST_TOKEN", TOKEN)
        .env("HERALD_TEST_SECRET", SECRET)
        .env("HERALD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("herald starts")
}

struct Answer {
    status: u16,
    retry_after: Option<u64>,
    body: Value,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (Retry-After {:?}) {}",
            self.status, self.retry_after, self.body
        )
    }
}

/// `n` normal events of about 1.5 KB each.
fn normal_events(n: usize, seq: &mut u64) -> Vec<Value> {
    (0..n)
        .map(|_| {
            *seq += 1;
            json!({
                "device_id": format!("thermo-{}", *seq % 40),
                "type": "sensor.temperature",
                "data": {"n": *seq, "pad": "t".repeat(1500)},
                "partners": ["sink"],
            })
        })
        .collect()
}

fn critical_event(seq: &mut u64) -> Value {
    *seq += 1;
    json!({
        "device_id": format!("lock-{}", *seq % 5),
        "type": "door.forced_open",
        "priority": "critical",
        "data": {"n": *seq},
        "partners": ["sink"],
    })
}

/// Polls `check` every 100 ms for up to `limit`; how long it took.
async fn within<F, Fut>(limit: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < limit {
        if check().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Every id in `accepted` reached the partner (waits up to a minute).
async fn all_delivered(partner: &Mutex<Partner>, accepted: &[String]) -> Duration {
    let took = within(Duration::from_secs(60), || async {
        let partner = partner.lock().unwrap();
        accepted.iter().all(|id| partner.delivered.contains_key(id))
    })
    .await;
    let missing: Vec<&String> = {
        let partner = partner.lock().unwrap();
        accepted
            .iter()
            .filter(|id| !partner.delivered.contains_key(*id))
            .collect()
    };
    took.unwrap_or_else(|| {
        panic!(
            "{} of {} accepted events not delivered within a minute, e.g. {:?}",
            missing.len(),
            accepted.len(),
            &missing[..missing.len().min(3)]
        )
    })
}

/// Every id answered 202 is in the store, each delivery delivered, and
/// herald's count of the queue (kept across the failed writes) is back to 0.
async fn all_stored_and_delivered(herald: &Herald, accepted: &[String]) {
    let drained = within(Duration::from_secs(10), || async {
        herald.queued().await == 0
    })
    .await;
    assert!(
        drained.is_some(),
        "queue depth {} with everything delivered",
        herald.queued().await
    );
    for id in accepted {
        let event = herald
            .event(id)
            .await
            .unwrap_or_else(|status| panic!("event {id} answered 202 but reads {status}"));
        for d in event["deliveries"].as_array().expect("deliveries") {
            assert_eq!(d["state"], "delivered", "event {id}: {d}");
        }
    }
}

fn assert_disk_low(answer: &Answer, words: &str) {
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.body["type"], "/problems/disk-low", "{answer:?}");
    assert!(
        answer.retry_after.is_some_and(|s| s > 0),
        "503 without Retry-After: {answer:?}"
    );
    let detail = answer.body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(words), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_stops_at_the_limit_critical_events_keep_a_reserve_and_the_backlog_drains() {
    let Some(mount) = Mount::tmpfs(48) else {
        return;
    };
    let work = tempfile::tempdir().expect("work dir");
    let filler = Filler {
        path: mount.point.join("filler"),
    };
    let (partner_url, partner) = start_partner().await;
    let herald = Herald::start(
        work.path(),
        &mount.point.join("data"),
        &partner_url,
        "min_free_disk = \"16MiB\"\ncritical_disk_reserve = \"8MiB\"",
    )
    .await;
    let mut herald = herald;
    assert_eq!(herald.ready().await.0, 200);
    let mut seq = 0;
    let mut accepted = Vec::new();

    // A few MiB above the limit, then normal events until ingest stops.
    filler.leave_free(&mount, 22 * MIB);
    let mut refused = None;
    for _ in 0..400 {
        let answer = herald
            .post_noting(normal_events(50, &mut seq), &mut accepted)
            .await;
        if answer.status != 202 {
            refused = Some(answer);
            break;
        }
    }
    let refused = refused.expect("ingest never stopped");
    let free = mount.free();
    println!(
        "{} events accepted before ingest stopped with {:.1} MiB free",
        accepted.len(),
        free as f64 / MIB as f64
    );
    assert!(!accepted.is_empty(), "nothing accepted before the limit");
    assert_disk_low(&refused, "server.min_free_disk");
    assert!(
        free > 8 * MIB,
        "ingest overshot the limit into the floor: {free} bytes free"
    );
    let (status, why) = herald.ready().await;
    assert_eq!(status, 503, "{why}");
    assert!(
        why.contains("disk low") && why.contains("min_free_disk"),
        "{why}"
    );
    let free_metric = herald
        .metric("herald_disk_free_bytes")
        .await
        .expect("metric");
    assert!(free_metric < (16 * MIB) as f64, "{free_metric}");
    let store_bytes = herald
        .metric("herald_store_disk_bytes")
        .await
        .expect("metric");
    assert!(store_bytes > MIB as f64, "{store_bytes}");

    // Below the limit: critical events still go in, normal ones (alone or
    // in a batch with a critical one) do not.
    let mut criticals = Vec::new();
    for _ in 0..3 {
        let answer = herald
            .post_noting(vec![critical_event(&mut seq)], &mut criticals)
            .await;
        assert_eq!(
            answer.status, 202,
            "a critical event below the limit: {answer:?}"
        );
    }
    let normal = herald.post(&normal_events(1, &mut seq)[0]).await;
    assert_disk_low(&normal, "only critical events");
    let mixed = vec![
        critical_event(&mut seq),
        normal_events(1, &mut seq).remove(0),
    ];
    assert_disk_low(
        &herald.post(&Value::Array(mixed)).await,
        "only critical events",
    );

    // Under the floor: critical events are refused too.
    filler.leave_free(&mount, 5 * MIB);
    let floor = within(Duration::from_secs(5), || async {
        herald.post(&critical_event(&mut 0)).await.status == 503
    })
    .await;
    assert!(
        floor.is_some(),
        "critical events still accepted under the floor"
    );
    assert_disk_low(&herald.post(&critical_event(&mut seq)).await, "floor");
    assert!(herald.ready().await.1.contains("disk full"));

    // The partner comes back while the disk stays low: the whole backlog
    // drains, no restart, and ingest still refuses normal events.
    partner.lock().unwrap().up = true;
    accepted.extend(criticals);
    let took = all_delivered(&partner, &accepted).await;
    println!(
        "{} accepted events delivered {:.1} s after the partner came back, {:.1} MiB free",
        accepted.len(),
        took.as_secs_f64(),
        mount.free() as f64 / MIB as f64
    );
    assert_eq!(
        herald.post(&normal_events(1, &mut seq)[0]).await.status,
        503
    );

    // Space returns: ingest takes everything again within seconds.
    filler.remove();
    let back = within(Duration::from_secs(10), || async {
        herald
            .post(&Value::Array(normal_events(1, &mut 0)))
            .await
            .status
            == 202
    })
    .await
    .expect("ingest still refused 10 s after the space came back");
    println!(
        "ingest accepted again {:.2} s after the filler went",
        back.as_secs_f64()
    );
    assert!(back < Duration::from_secs(5), "{back:?}");
    assert_eq!(herald.ready().await, (200, "ready".to_string()));
    let answer = herald
        .post_noting(normal_events(20, &mut seq), &mut accepted)
        .await;
    assert_eq!(answer.status, 202, "{answer:?}");
    all_delivered(&partner, &accepted).await;
    all_stored_and_delivered(&herald, &accepted).await;

    // The store opens after a restart, with everything in it.
    herald.restart().await;
    assert_eq!(herald.ready().await.0, 200);
    all_stored_and_delivered(&herald, &accepted).await;
    let log = herald.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_commit_that_meets_a_full_disk_is_refused_and_the_store_recovers_by_itself() {
    let Some(mount) = Mount::tmpfs(48) else {
        return;
    };
    let work = tempfile::tempdir().expect("work dir");
    let filler = Filler {
        path: mount.point.join("filler"),
    };
    let (partner_url, partner) = start_partner().await;
    // The check off: sled itself meets the full disk.
    let mut herald = Herald::start(
        work.path(),
        &mount.point.join("data"),
        &partner_url,
        "min_free_disk = \"0\"",
    )
    .await;
    let mut seq = 0;
    let mut accepted = Vec::new();
    filler.leave_free(&mount, 6 * MIB);

    let mut failed = None;
    for _ in 0..400 {
        let answer = herald
            .post_noting(normal_events(50, &mut seq), &mut accepted)
            .await;
        if answer.status != 202 {
            failed = Some(answer);
            break;
        }
    }
    let failed = failed.expect("the disk never filled");
    println!(
        "{} events accepted before a write failed: {failed:?}",
        accepted.len()
    );
    assert_eq!(failed.status, 503, "{failed:?}");
    assert!(failed.retry_after.is_some(), "{failed:?}");
    let detail = failed.body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("could not be stored"), "{failed:?}");
    filler.fill();
    // While the disk is full: nothing more is answered 202, herald stays up.
    let mut later = HashSet::new();
    for _ in 0..10 {
        let answer = herald
            .post_noting(normal_events(10, &mut seq), &mut accepted)
            .await;
        later.insert(answer.status);
    }
    assert_eq!(
        later,
        HashSet::from([503]),
        "answers while the disk is full"
    );
    let (status, why) = herald.ready().await;
    assert_eq!(status, 503, "{why}");
    assert!(
        why.contains("store unavailable") && why.contains("No space left on device"),
        "{why}"
    );
    assert_eq!(
        herald
            .http
            .get(format!("{}/healthz", herald.url))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .ok(),
        Some(200)
    );

    // Space returns and the partner with it: ingest comes back without a
    // restart, and everything answered 202 is delivered.
    filler.remove();
    partner.lock().unwrap().up = true;
    let back = within(Duration::from_secs(10), || async {
        herald
            .post(&Value::Array(normal_events(1, &mut 0)))
            .await
            .status
            == 202
    })
    .await
    .expect("ingest still refused 10 s after the space came back");
    println!(
        "ingest accepted again {:.2} s after the filler went",
        back.as_secs_f64()
    );
    assert!(back < Duration::from_secs(5), "{back:?}");
    let answer = herald
        .post_noting(normal_events(20, &mut seq), &mut accepted)
        .await;
    assert_eq!(answer.status, 202, "{answer:?}");
    let took = all_delivered(&partner, &accepted).await;
    println!(
        "{} accepted events delivered within {:.1} s",
        accepted.len(),
        took.as_secs_f64()
    );
    all_stored_and_delivered(&herald, &accepted).await;
    assert_eq!(
        herald
            .metric("herald_store_reopens_total")
            .await
            .map(|n| n >= 1.0),
        Some(true),
        "the store was never opened again"
    );

    herald.restart().await;
    assert_eq!(herald.ready().await.0, 200);
    all_stored_and_delivered(&herald, &accepted).await;
}

#[test]
fn a_limit_the_filesystem_cannot_meet_is_refused_at_start_and_creates_nothing() {
    let work = tempfile::tempdir().expect("work dir");
    let data = work.path().join("data");
    let config = work.path().join("herald.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nmin_free_disk = \"5%\"\ncritical_disk_reserve = \"1000TiB\"\n",
            data.display()
        ),
    )
    .expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env("HERALD_LOG", "warn")
        .output()
        .expect("herald runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "herald: cannot start: server.critical_disk_reserve: 1000.0 TiB is not below \
             server.min_free_disk ("
        ),
        "{stderr}"
    );
    assert!(!data.exists(), "a data dir was created for a refused start");
}
