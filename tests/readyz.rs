//! `/readyz` as a platform's probe sees it: 503 with the reason in the
//! body, within 10 s, when the dispatcher stalls (the test hook
//! `Dispatcher::hold_for_test` holds every lane), when the data dir's
//! filesystem turns read-only (ext4 on a loop device, made to abort as it
//! does on a disk error: `mount -o remount,abort`), and when free space
//! falls under `server.min_free_disk` (a small tmpfs filled by a file);
//! `/healthz` stays 200 throughout. A partner that is down, with its
//! breaker open, is not a stall.
//!
//! The mounts need root; without it, those tests say so loudly and pass.
//!
//! Each test names its partner differently: the metrics recorder is
//! process-wide, and a runner that puts these tests in one process would
//! otherwise mix their series (the disk's gauges are the process's still:
//! nextest, which `scripts/test` uses, runs each test in its own).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{config_toml, partner_toml, setup, MockPartner, TestHerald, OPERATOR_TOKEN, START_MS};
use herald::clock::Clock;

/// The status and body of `path`, without a token (probes carry none).
async fn probe(h: &TestHerald, path: &str) -> (u16, String) {
    let response = h
        .http
        .get(h.url(path))
        .send()
        .await
        .expect("herald answers");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// Polls `/readyz` (real time) until it answers `status`; how long that
/// took, or a panic naming the last answer after `limit`.
async fn ready_turns(h: &TestHerald, status: u16, limit: Duration) -> (Duration, String) {
    let started = Instant::now();
    loop {
        let (now, body) = probe(h, "/readyz").await;
        if now == status {
            return (started.elapsed(), body);
        }
        assert!(
            started.elapsed() < limit,
            "/readyz still answers {now} ({body}) after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the first sample of `series` (name and labels, as written).
async fn metric(h: &TestHerald, series: &str) -> f64 {
    let text = h
        .http
        .get(h.url("/metrics"))
        .bearer_auth(OPERATOR_TOKEN)
        .send()
        .await
        .expect("herald answers")
        .text()
        .await
        .expect("body");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_dispatcher_fails_readyz_and_going_on_again_clears_it() {
    let (h, mock, _dir) = setup("", "stall_after = \"30s\"").await;
    assert_eq!(probe(&h, "/readyz").await, (200, "ready".to_string()));

    h.herald.dispatcher().hold_for_test(true);
    h.send_one("acme", "critical").await;
    // Due, not yet stale: work that has just arrived is not a stall.
    assert_eq!(probe(&h, "/readyz").await.0, 200);
    h.clock.advance(Duration::from_secs(31));
    let (took, why) = ready_turns(&h, 503, Duration::from_secs(10)).await;
    println!("/readyz failed {took:?} after the stall was due: {why}");
    assert!(
        why.contains("dispatcher stalled") && why.contains("acme"),
        "{why}"
    );
    assert!(why.contains("server.stall_after"), "{why}");
    assert_eq!(probe(&h, "/healthz").await.0, 200, "the process is up");
    assert_eq!(
        metric(&h, "herald_dispatch_stalled{partner=\"acme\"}").await,
        1.0
    );
    assert!(mock.requests().is_empty(), "nothing was sent while held");

    h.herald.dispatcher().hold_for_test(false);
    mock.wait_for(1).await;
    let (took, _) = ready_turns(&h, 200, Duration::from_secs(10)).await;
    println!("/readyz ready again {took:?} after the dispatcher went on");
    assert_eq!(
        metric(&h, "herald_dispatch_stalled{partner=\"acme\"}").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_that_is_down_behind_its_breaker_is_not_a_stall() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (h, mock) = start_in(
        dir.path(),
        "globex",
        "breaker = { failures = 1, cool_down = \"1h\", max_cool_down = \"1h\" }",
        "stall_after = \"30s\"",
    )
    .await;
    mock.refuse_connections().await;
    h.send_one("globex", "critical").await;
    // The first attempt fails and opens the breaker; its retry comes due
    // and waits behind it, longer than stall_after.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&h, "herald_partner_breaker_state{partner=\"globex\"}").await != 1.0 {
        assert!(Instant::now() < deadline, "the breaker never opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.clock.advance(Duration::from_secs(120));
    common::settle().await;
    assert_eq!(probe(&h, "/readyz").await, (200, "ready".to_string()));
    assert_eq!(
        metric(&h, "herald_dispatch_stalled{partner=\"globex\"}").await,
        0.0
    );
}

/// A filesystem mounted for one test, unmounted when dropped (a panic
/// included; lazily, since the herald of a failed test may hold files).
struct Mount {
    point: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mount {
    /// `mount` with `args` then the mount point; `None` (after saying why,
    /// loudly) where this machine cannot mount.
    fn new(dir: tempfile::TempDir, what: &str, args: &[&str]) -> Option<Mount> {
        let point = dir.path().join("mnt");
        std::fs::create_dir(&point).expect("mount point");
        match Command::new("mount").args(args).arg(&point).output() {
            Ok(out) if out.status.success() => Some(Mount { point, _dir: dir }),
            Ok(out) => {
                eprintln!(
                    "SKIPPED: cannot mount {what} (needs root): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount for {what}: {e}");
                None
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.point).status();
    }
}

/// A herald with one partner at a fresh mock, its data dir in `dir`.
async fn start_in(
    dir: &Path,
    partner: &str,
    partner_extra: &str,
    server_extra: &str,
) -> (TestHerald, MockPartner) {
    let clock = Clock::manual(START_MS);
    let mock = MockPartner::start(clock.clone()).await;
    let toml = config_toml(
        dir,
        &partner_toml(partner, &mock.url, partner_extra),
        server_extra,
    );
    (TestHerald::start(&toml, clock).await, mock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_turned_read_only_fails_readyz() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(64 << 20))
        .expect("image file");
    let made = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&image)
        .output();
    if !made.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: cannot make an ext4 filesystem (mkfs.ext4): {made:?}");
        return;
    }
    let image_arg = image.display().to_string();
    let Some(mount) = Mount::new(
        dir,
        "an ext4 loop device for the read-only test",
        &["-o", "loop,errors=remount-ro", &image_arg],
    ) else {
        return;
    };
    let data = mount.point.join("data");
    let (h, mock) = start_in(&data, "initech", "", "min_free_disk = \"1MiB\"").await;
    h.send_one("initech", "normal").await;
    mock.wait_for(1).await;
    assert_eq!(probe(&h, "/readyz").await, (200, "ready".to_string()));

    // What a disk error does to ext4 with errors=remount-ro: every later
    // write is refused (EROFS), files open for writing included.
    let aborted = Command::new("mount")
        .args(["-o", "remount,abort"])
        .arg(&mount.point)
        .output()
        .expect("mount runs");
    assert!(
        aborted.status.success(),
        "{}",
        String::from_utf8_lossy(&aborted.stderr)
    );
    let (took, why) = ready_turns(&h, 503, Duration::from_secs(10)).await;
    println!("/readyz failed {took:?} after the data dir turned read-only: {why}");
    assert!(why.contains("store"), "{why}");
    assert_eq!(probe(&h, "/healthz").await.0, 200, "the process is up");
    let (status, body) = h
        .post_events(
            r#"{"device_id":"lock-7f3a","type":"door.forced_open","partners":["initech"]}"#,
        )
        .await;
    assert_eq!(status, 503, "no event is taken on a read-only disk: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_space_under_the_limit_fails_readyz() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(mount) = Mount::new(
        dir,
        "a tmpfs for the disk-limit test",
        &["-t", "tmpfs", "-o", "size=48m", "tmpfs"],
    ) else {
        return;
    };
    let data = mount.point.join("data");
    let (h, _mock) = start_in(&data, "umbrella", "", "min_free_disk = \"16MiB\"").await;
    assert_eq!(probe(&h, "/readyz").await, (200, "ready".to_string()));
    let limit = metric(&h, "herald_disk_min_free_bytes").await;
    assert_eq!(limit, (16 << 20) as f64);

    // A file beside the data dir leaves 8 MiB free.
    let free = herald::disk::measure(&mount.point).expect("statvfs").free;
    let filler = std::fs::File::create(mount.point.join("filler")).expect("filler");
    // tmpfs allocates on write: written out, not a sparse length.
    std::io::Write::write_all(
        &mut std::io::BufWriter::new(&filler),
        &vec![0u8; (free - (8 << 20)) as usize],
    )
    .expect("filler written");
    let (took, why) = ready_turns(&h, 503, Duration::from_secs(10)).await;
    println!("/readyz failed {took:?} after the free space fell under the limit: {why}");
    assert!(
        why.contains("disk low") && why.contains("min_free_disk"),
        "{why}"
    );
    assert!(metric(&h, "herald_disk_free_bytes").await < limit);
    assert_eq!(probe(&h, "/healthz").await.0, 200, "the process is up");

    drop(filler);
    std::fs::remove_file(mount.point.join("filler")).expect("filler removed");
    ready_turns(&h, 200, Duration::from_secs(10)).await;
}
