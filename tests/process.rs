//! The `herald` binary as an operator meets it: bad configs and unusable
//! data dirs are refused with a message naming what is wrong (never a panic
//! or a hang), and SIGTERM finishes cleanly without losing what was queued.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use herald::bench::process::{HeraldProcess, TOKEN};

const HERALD: &str = env!("CARGO_BIN_EXE_herald");
const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

/// Runs herald to its end (at most 30 s): exit code and stderr.
fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut child = Command::new(HERALD)
        .args(args)
        .envs(env.iter().copied())
        .env("HERALD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("herald starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("herald {args:?} did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (read_all(child.stdout.take()), read_all(child.stderr.take()));
    assert!(!err.contains("panicked"), "herald panicked: {err}");
    (status.code(), format!("{out}{err}"))
}

/// Everything left in a child's pipe.
fn read_all(pipe: Option<impl Read>) -> String {
    let mut text = String::new();
    pipe.expect("piped").read_to_string(&mut text).unwrap();
    text
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Environment variables a case sets.
type Env = &'static [(&'static str, &'static str)];

#[test]
fn bad_configs_exit_2_and_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let partner = |extra: &str| {
        format!(
            "[partners.acme]\nadapter = \"webhook\"\nurl = \"https://hooks.example/h\"\nsecret_env = \"ACME_SECRET\"\n{extra}\n"
        )
    };
    let cases: Vec<(String, Env, &str)> = vec![
        ("[server]\ncolour = \"red\"\n".into(), &[], "server.colour"),
        ("[server]\nlisten = \"nowhere\"\n".into(), &[], "server.listen"),
        ("this is = = not toml".into(), &[], "expected"),
        (
            partner("rate = { per_second = 0, burst = 1 }"),
            &[("ACME_SECRET", SECRET)],
            "partners.acme.rate.per_second: must be at least 1",
        ),
        (
            partner(""),
            &[],
            "partners.acme.secret_env: the environment variable ACME_SECRET is not set",
        ),
        (
            partner(""),
            &[("ACME_SECRET", "hunter2")],
            "partners.acme.secret_env: the secret is not whsec_",
        ),
        (
            partner("retry = { max_age = \"forever\" }"),
            &[("ACME_SECRET", SECRET)],
            "partners.acme.retry.max_age",
        ),
        (
            partner("breaker = { cool_down = \"1m\", max_cool_down = \"10s\" }"),
            &[("ACME_SECRET", SECRET)],
            "partners.acme.breaker.max_cool_down: must be at least breaker.cool_down",
        ),
        (
            partner("max_in_flight = -1"),
            &[("ACME_SECRET", SECRET)],
            "partners.acme.max_in_flight",
        ),
        (
            "[partners.acme]\nadapter = \"smoke-signals\"\nurl = \"https://x.example\"\nsecret_env = \"S\"\n".into(),
            &[("S", SECRET)],
            "partners.acme.adapter: unknown adapter \"smoke-signals\"",
        ),
        (
            "[[tokens]]\nname = \"a\"\nrole = \"admin\"\ntoken_env = \"T\"\n".into(),
            &[("T", "0123456789abcdef")],
            "tokens[0].role",
        ),
    ];
    for (i, (text, env, expected)) in cases.iter().enumerate() {
        let path = write(dir.path(), &format!("bad-{i}.toml"), text);
        for command in ["check", "serve"] {
            let (code, output) = run(&[command, "--config", &path], env);
            assert_eq!(code, Some(2), "{command} {text:?}: {output}");
            assert!(
                output.contains(expected),
                "{command} {text:?}: expected {expected:?} in {output:?}"
            );
        }
    }
    let (code, output) = run(&["check", "--config", "/no/such/herald.toml"], &[]);
    assert_eq!(code, Some(2));
    assert!(
        output.contains("/no/such/herald.toml: cannot read"),
        "{output}"
    );
    let (code, output) = run(&["bench", "--events", "0"], &[]);
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("'0' for '--events"), "{output}");
    let (code, output) = run(&["serve", "--listen-everywhere"], &[]);
    assert_eq!(code, Some(2), "clap refuses unknown flags: {output}");
    assert!(output.contains("--listen-everywhere"), "{output}");
}

#[test]
fn check_accepts_the_shipped_config() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/config/herald.toml");
    let (code, output) = run(
        &["check", "--config", fixture],
        &[
            ("HERALD_TOKEN_DOOR", "door-token-0123456789"),
            ("HERALD_TOKEN_ONCALL", "oncall-token-0123456789"),
            ("ACME_WEBHOOK_SECRET", SECRET),
            (
                "HERALD_LINK_KEY",
                "aGVyYWxkLXRlc3QtbGluay1rZXktMzItYnl0ZXMhISE=",
            ),
            ("ST_CLIENT_ID", "st-client"),
            ("ST_CLIENT_SECRET", "st-client-secret"),
            ("ALEXA_CLIENT_ID", "alexa-client"),
            ("ALEXA_CLIENT_SECRET", "alexa-client-secret"),
        ],
    );
    assert_eq!(code, Some(0), "{output}");
    assert!(
        output.contains("config ok: 3 partners, 2 tokens"),
        "{output}"
    );
}

/// A config whose data dir is `data`, under `dir`.
fn serve_config(dir: &Path, data: &Path) -> String {
    write(
        dir,
        "herald.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nmin_free_disk = \"16MiB\"\n",
            data.display()
        ),
    )
}

#[test]
fn unusable_data_dirs_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = serve_config(dir.path(), &data);

    // A file where the directory should be.
    std::fs::write(&data, "not a directory").unwrap();
    let (code, output) = run(&["serve", "--config", &config], &[]);
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains(&format!(
            "data dir {}: it exists but is not a directory",
            data.display()
        )),
        "{output}"
    );

    // sled's files replaced by noise.
    std::fs::remove_file(&data).unwrap();
    std::fs::create_dir(&data).unwrap();
    let noise: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(data.join("db"), &noise).unwrap();
    std::fs::write(data.join("conf"), &noise[..300]).unwrap();
    let (code, output) = run(&["serve", "--config", &config], &[]);
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains(&format!("data dir {}:", data.display())),
        "{output}"
    );
}

#[test]
fn data_dirs_that_are_not_heralds_are_refused_and_never_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let refusal = |data: &Path| {
        let config = serve_config(dir.path(), data);
        let (code, output) = run(&["serve", "--config", &config], &[]);
        assert_eq!(code, Some(1), "{output}");
        assert!(
            output.contains(&format!("data dir {}: it holds", data.display())),
            "{output}"
        );
        assert!(
            !data.join("herald-commits").exists(),
            "herald adopted {}: {output}",
            data.display()
        );
        output
    };

    // Another program's sled database, made by sled itself.
    let other_sled = dir.path().join("other-sled");
    {
        let db = sled::open(&other_sled).unwrap();
        db.insert(b"user:1", b"someone else's").unwrap();
        db.flush().unwrap();
    }
    let output = refusal(&other_sled);
    assert!(
        output.contains("a sled database that is not herald's"),
        "{output}"
    );

    // A directory of unrelated files: refused, and left as it was.
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::fs::write(home.join("notes.txt"), "mine").unwrap();
    std::fs::write(home.join("photo.jpg"), "mine too").unwrap();
    let output = refusal(&home);
    assert!(
        output.contains("files that are not herald's (notes.txt, photo.jpg)"),
        "{output}"
    );
    assert_eq!(std::fs::read_dir(&home).unwrap().count(), 2);

    // herald's own store whose marker was deleted: not started empty over.
    let store_dir = dir.path().join("herald-store");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let options = herald::store::StoreOptions {
            cache_bytes: 1 << 20,
            queue: 16,
        };
        let store = herald::store::Store::open(&store_dir, options).unwrap();
        store.shutdown().await.unwrap();
    });
    std::fs::remove_file(store_dir.join("herald-commits")).unwrap();
    let output = refusal(&store_dir);
    assert!(
        output.contains("or a herald store whose marker was deleted"),
        "{output}"
    );
}

/// A partner that answers 200 and counts, on a port chosen by the caller.
async fn partner_on(addr: std::net::SocketAddr) -> (Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let count = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&count);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let seen = Arc::clone(&seen);
            async move {
                seen.fetch_add(1, Ordering::Relaxed);
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (count, server)
}

async fn post(herald: &HeraldProcess, body: serde_json::Value) -> serde_json::Value {
    let answer = reqwest::Client::new()
        .post(format!("{}/v1/events", herald.url))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap()
}

async fn get(herald: &HeraldProcess, path: &str) -> serde_json::Value {
    let answer = reqwest::Client::new()
        .get(format!("{}{path}", herald.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "{path}");
    serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap()
}

/// Starts herald again on its data dir, expects it to exit instead of
/// becoming ready, and returns its log.
async fn refused_start(herald: &mut HeraldProcess) -> String {
    herald.restart_stopped().unwrap();
    assert!(
        herald.wait_ready(Duration::from_secs(30)).await.is_err(),
        "herald ran on a damaged store"
    );
    std::fs::read_to_string(herald.log_path()).unwrap()
}

/// Queued while the partner is down, SIGTERM (exit 0), then a restart once
/// it is back: everything arrives, and the API shows it delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_the_backlog_for_the_next_start() {
    // A port with nobody listening: connection refused until the partner starts.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut herald = HeraldProcess::start(
        Path::new(HERALD),
        &format!("http://{addr}/hook"),
        "retry = { initial_ms = 100, max_interval_ms = 300 }",
    )
    .await
    .expect("herald starts");
    let events: Vec<serde_json::Value> = (0..40)
        .map(|i| {
            serde_json::json!({
                "device_id": format!("door-{i}"),
                "type": "door.opened",
                "priority": if i % 4 == 0 { "critical" } else { "normal" },
                "partners": ["sink"],
            })
        })
        .collect();
    let accepted = post(&herald, serde_json::Value::Array(events)).await;
    let ids: Vec<String> = accepted
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 40);
    // It fails against the closed port until the breaker opens.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let partners = get(&herald, "/v1/partners").await;
        if partners["partners"][0]["breaker"] == "open" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the breaker never opened: {partners}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The breaker opens on the answers in memory; the attempts that opened
    // it are written right after, so wait for the first one's record.
    let first = loop {
        let first = get(&herald, &format!("/v1/events/{}", ids[0])).await;
        if first["deliveries"][0]["attempts"].as_u64() >= Some(1) {
            break first;
        }
        assert!(
            Instant::now() < deadline,
            "the first event's failed attempt was never recorded: {first}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(first["deliveries"][0]["state"], "pending", "{first}");

    herald.stop().expect("SIGTERM: exit 0");
    let (count, _server) = partner_on(addr).await;
    herald.restart_stopped().unwrap();
    herald
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("herald restarts on its data dir");

    let deadline = Instant::now() + Duration::from_secs(30);
    for id in &ids {
        loop {
            let view = get(&herald, &format!("/v1/events/{id}")).await;
            let delivery = &view["deliveries"][0];
            if delivery["state"] == "delivered" {
                let history = delivery["history"].as_array().unwrap();
                assert_eq!(history.last().unwrap()["status"], 200, "{view}");
                if id == &ids[0] {
                    assert!(history.len() >= 2, "the failures are kept too: {view}");
                }
                break;
            }
            assert!(Instant::now() < deadline, "{id} never delivered: {view}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(count.load(Ordering::Relaxed), 40, "each event once");

    // Damaged after a clean stop: refused, naming the dir, never run on.
    herald.stop().expect("SIGTERM: exit 0");
    let data = herald.dir.path().join("data");
    std::fs::write(data.join("db"), b"").unwrap();
    let log = refused_start(&mut herald).await;
    assert!(
        log.contains(&format!(
            "herald: cannot start: data dir {}:",
            data.display()
        )),
        "{log}"
    );
    // sled's log and snapshots gone: sled alone would start empty.
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name == "db" || name.starts_with("snap.") {
            std::fs::remove_file(&path).unwrap();
        }
    }
    let log = refused_start(&mut herald).await;
    assert!(
        log.contains(&format!(
            "data dir {}: the store is damaged: it recovered to commit 0",
            data.display()
        )),
        "{log}"
    );
}

/// `herald mock-partner` by hand: it says where to point a link, speaks the
/// platform's protocol (a stale token gets SmartThings' TOKEN-EXPIRED), and
/// sums up what it saw when stopped. A platform it does not know is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_partner_runs_by_hand() {
    let (code, output) = run(&["mock-partner", "--platform", "pigeon"], &[]);
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains("smartthings"),
        "names the known ones: {output}"
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(HERALD)
        .args(["mock-partner", "--platform", "smartthings", "--port"])
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mock starts");
    let url = format!("http://127.0.0.1:{port}/device/events");
    herald::dispatch::client::install_crypto_provider();
    let http = reqwest::Client::new();
    let body = serde_json::json!({
        "headers": {"schema": "st-schema", "version": "1.0", "interactionType": "stateCallback", "requestId": "r-1"},
        "authentication": {"tokenType": "Bearer", "token": "not-the-token"},
        "deviceState": [{"externalDeviceId": "lock-42", "states": []}]
    });
    let mut answer = None;
    for _ in 0..100 {
        let request = http.post(&url).header("content-type", "application/json");
        if let Ok(r) = request.body(body.to_string()).send().await {
            answer = Some((r.status().as_u16(), r.text().await.unwrap_or_default()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, text) = answer.expect("the mock answers");
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("TOKEN-EXPIRED"), "{text}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let out = read_all(child.stdout.take());
    assert!(status.success(), "{out}");
    assert!(
        out.contains(&format!("http://127.0.0.1:{port}/device/events")),
        "{out}"
    );
    assert!(out.contains("1 requests: 0 deliveries accepted"), "{out}");
}

/// `herald dlq` against a running herald: a delivery dies (its partner is
/// down, one attempt allowed), on-call lists and shows it, replays it once
/// the partner is back, cannot replay it twice, and purges it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_lists_shows_replays_and_purges_from_the_command_line() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let herald = HeraldProcess::start(
        Path::new(HERALD),
        &format!("http://{addr}/hook"),
        "retry = { initial_ms = 100, max_interval_ms = 100, max_attempts = 1 }",
    )
    .await
    .expect("herald starts");
    post(
        &herald,
        serde_json::json!({"device_id": "lock-1", "type": "door.opened", "partners": ["sink"]}),
    )
    .await;
    let mut letters = serde_json::Value::Null;
    for _ in 0..200 {
        letters = get(&herald, "/v1/dead-letters").await;
        if letters["items"].as_array().is_some_and(|i| !i.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let id = letters["items"][0]["id"]
        .as_str()
        .expect("a dead letter")
        .to_string();
    let env = [("OPS_TOKEN", TOKEN)];
    let dlq = |args: &[&str]| {
        let mut all = vec![
            "dlq",
            "--url",
            herald.url.as_str(),
            "--token-env",
            "OPS_TOKEN",
        ];
        all.extend_from_slice(args);
        run(&all, &env)
    };
    let (code, out) = dlq(&["list", "--partner", "sink"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&id), "{out}");
    let (code, out) = dlq(&["show", &id, "--json"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("\"reason\""), "{out}");

    let (count, _partner) = partner_on(addr).await;
    let (code, out) = dlq(&["replay", &id]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("replayed as delivery"), "{out}");
    for _ in 0..200 {
        if count.load(Ordering::Relaxed) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(count.load(Ordering::Relaxed), 1, "the replay was delivered");
    let (code, out) = dlq(&["replay", &id]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("already replayed"), "{out}");
    let (code, out) = dlq(&["replay", &id, "--partner", "sink"]);
    assert_eq!(code, Some(2), "filters go with --all: {out}");
    let (code, out) = dlq(&["purge", &id]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = dlq(&["show", &id]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("no dead letter"), "{out}");
    let (code, out) = dlq(&["list", "--priority", "urgent"]);
    assert_eq!(code, Some(2), "{out}");
    let (code, out) = run(
        &[
            "dlq",
            "--url",
            &herald.url,
            "--token-env",
            "NOT_SET",
            "list",
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("NOT_SET"), "{out}");
}

/// `--log-format json`: every line herald logs is one JSON object, and each
/// delivery outcome is one line naming the event, partner, attempt, status
/// and latency, with no secret in any line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_one_line_per_delivery_outcome_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let partner_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (delivered, _partner) = partner_on(partner_addr).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = write(
        dir.path(),
        "herald.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nmin_free_disk = \"16MiB\"\n\
             [[tokens]]\nname = \"ops\"\nrole = \"operator\"\ntoken_env = \"OPS_TOKEN\"\n\
             [partners.sink]\nadapter = \"webhook\"\nurl = \"http://{partner_addr}/hook\"\n\
             secret_env = \"SINK_SECRET\"\nallow_private = true\n",
            dir.path().join("data").display()
        ),
    );
    let log_path = dir.path().join("herald.log");
    let mut child = Command::new(HERALD)
        .args(["serve", "--config", &config, "--log-format", "json"])
        .env("OPS_TOKEN", TOKEN)
        .env("SINK_SECRET", SECRET)
        .env("HERALD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("herald starts");
    let url = format!("http://127.0.0.1:{port}");
    herald::dispatch::client::install_crypto_provider();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get(format!("{url}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "herald never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer = client
        .post(format!("{url}/v1/events"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(
            serde_json::json!({"device_id": "lock-1", "type": "door.opened", "partners": ["sink"]})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    let event: serde_json::Value = serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap();
    let event_id = event["id"].as_str().expect("an event id").to_string();
    let outcome = loop {
        let log = std::fs::read_to_string(&log_path).unwrap();
        let found = log
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|line| {
                line["message"] == "delivery outcome" && line["event"] == event_id.as_str()
            });
        if let Some(line) = found {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "no outcome line for {event_id} ({} delivered): {log}",
            delivered.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());

    assert_eq!(outcome["partner"], "sink", "{outcome}");
    assert_eq!(outcome["outcome"], "delivered", "{outcome}");
    assert_eq!(outcome["attempt"], 1, "{outcome}");
    assert_eq!(outcome["status"], 200, "{outcome}");
    assert!(outcome["latency_ms"].is_u64(), "{outcome}");
    assert!(outcome["delivery"].is_string(), "{outcome}");
    assert_eq!(outcome["level"], "INFO", "{outcome}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    let outcomes = log.matches("\"delivery outcome\"").count();
    assert_eq!(outcomes, 1, "one line per outcome: {log}");
    for line in log.lines() {
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
        assert!(
            parsed.is_ok_and(|v| v.is_object()),
            "not one JSON object: {line}"
        );
        assert!(
            !line.contains(TOKEN) && !line.contains(SECRET),
            "a secret in the log: {line}"
        );
        assert!(
            !line.contains("door.opened"),
            "the event's content in the log: {line}"
        );
    }
}
