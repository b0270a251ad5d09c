//! The HTTP server against hostile and careless clients, over loopback:
//! unauthenticated bodies cost herald nothing, slow headers and bodies are
//! cut at their timeouts, a flood of idle sockets meets a connection cap
//! (answered 503, logged) instead of locking everyone out, one token's burst
//! does not starve another's, and with no tokens configured a web page in a
//! local browser cannot drive herald.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    config_toml, partner_toml, MockPartner, TestHerald, INGEST_TOKEN, OPERATOR_TOKEN, START_MS,
};
use herald::bench::process::HeraldProcess;
use herald::clock::Clock;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HERALD: &str = env!("CARGO_BIN_EXE_herald");
const BODY_BYTES: usize = 8 * 1024 * 1024;

/// Sends `request` on a fresh connection and reads the answer to its end:
/// (status, body). Status 0 when the connection closed without one.
async fn raw(addr: &str, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer));
    read.await.expect("answered within 10 s").expect("read");
    parse(&answer)
}

fn parse(answer: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(answer);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

fn addr_of(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unauthenticated_unfinished_bodies_take_no_memory_and_get_401_before_the_body_ends() {
    herald::dispatch::client::install_crypto_provider();
    let herald = HeraldProcess::start(Path::new(HERALD), "http://127.0.0.1:9/hook", "")
        .await
        .expect("herald starts");
    let addr = addr_of(&herald.url);
    let (_, peak_before) = herald.rss_mib();

    // 48 connections, no token, each announcing an 8 MiB body and sending
    // all of it but the last byte, so the body never ends.
    let mut clients = Vec::new();
    for _ in 0..48 {
        let addr = addr.clone();
        clients.push(tokio::spawn(async move {
            let stream = TcpStream::connect(&addr).await.expect("connect");
            let (mut reader, mut writer) = stream.into_split();
            let head = format!(
                "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {BODY_BYTES}\r\n\r\n"
            );
            writer.write_all(head.as_bytes()).await.expect("head");
            let sender = tokio::spawn(async move {
                let chunk = vec![b' '; 64 * 1024];
                let mut sent = 0;
                while sent + chunk.len() < BODY_BYTES {
                    if writer.write_all(&chunk).await.is_err() {
                        break;
                    }
                    sent += chunk.len();
                }
                // The last bytes are never sent; keep the socket open a while.
                tokio::time::sleep(Duration::from_secs(3)).await;
                sent
            });
            let mut answer = vec![0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), reader.read(&mut answer))
                .await
                .expect("an answer within 10 s while the body is unfinished")
                .expect("read");
            let body_unfinished = !sender.is_finished();
            let (status, body) = parse(&answer[..n]);
            (status, body, body_unfinished, sender)
        }));
    }
    let mut senders = Vec::new();
    for client in clients {
        let (status, body, body_unfinished, sender) = client.await.expect("client");
        assert_eq!(status, 401, "{body}");
        assert!(
            body_unfinished,
            "the 401 came while the body was still being sent"
        );
        assert!(body.contains("unauthorized"), "{body}");
        senders.push(sender);
    }
    for sender in senders {
        let sent = sender.await.expect("sender");
        assert!(sent < BODY_BYTES, "the body was never finished");
    }
    let (_, peak_after) = herald.rss_mib();
    let grown = peak_after - peak_before;
    println!("peak RSS {peak_before:.1} MiB -> {peak_after:.1} MiB (+{grown:.1} MiB)");
    assert!(
        grown < 64.0,
        "48 unauthenticated bodies grew herald's peak RSS by {grown:.1} MiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_header_or_idle_connection_is_closed_within_the_header_timeout_while_good_clients_are_served(
) {
    let partner = MockPartner::start(Clock::system()).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = config_toml(
        dir.path(),
        &partner_toml("acme", &partner.url, ""),
        "header_timeout = \"2s\"",
    );
    let herald = TestHerald::start(&toml, Clock::system()).await;
    let addr = herald.herald.addr().to_string();

    let started = Instant::now();
    let mut slow = TcpStream::connect(&addr).await.expect("connect");
    slow.write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\ncontent-")
        .await
        .expect("half a header");
    let mut idle = TcpStream::connect(&addr).await.expect("connect");
    // A keep-alive connection that was answered once, then goes quiet.
    let mut kept = TcpStream::connect(&addr).await.expect("connect");
    let health = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    kept.write_all(health.as_bytes()).await.expect("request");
    let mut first = vec![0u8; 1024];
    let n = kept.read(&mut first).await.expect("answer");
    assert_eq!(parse(&first[..n]).0, 200);

    // A good client meanwhile is served at once.
    let (status, body) = herald
        .post_events(r#"{"device_id":"lock-7f3a","type":"door.opened","partners":["acme"]}"#)
        .await;
    assert_eq!(status, 202, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "served while the unfinished header was still open"
    );

    for (what, stream) in [
        ("half a header", &mut slow),
        ("nothing", &mut idle),
        ("nothing after its answer", &mut kept),
    ] {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest));
        assert!(
            read.await.is_ok(),
            "the connection that sent {what} was closed within 5 s"
        );
    }
    let took = started.elapsed();
    // A header past 16 KiB is refused, not buffered.
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nx-filler: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    assert_eq!(raw(&addr, &big).await.0, 431);
    assert!(
        took >= Duration::from_millis(1900),
        "closed only after the timeout: {took:?}"
    );
    println!("unfinished header closed after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_cut_at_the_body_timeout() {
    let partner = MockPartner::start(Clock::system()).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = config_toml(
        dir.path(),
        &partner_toml("acme", &partner.url, ""),
        "body_timeout = \"1s\"",
    );
    let herald = TestHerald::start(&toml, Clock::system()).await;
    let addr = herald.herald.addr().to_string();
    let mut stream = TcpStream::connect(&addr).await.expect("connect");
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nauthorization: Bearer {INGEST_TOKEN}\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    let started = Instant::now();
    let trickle = async {
        // One byte every 100 ms: never idle for long, never finished in time.
        loop {
            if stream.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if started.elapsed() > Duration::from_secs(8) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(8), trickle).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer)).await;
    let (status, body) = parse(&answer);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("server.body_timeout"), "{body}");
}

/// herald as a child process with `server_extra` in its `[server]` table and,
/// where given, a descriptor limit; its log at warn in `dir/herald.log`.
struct ChildHerald {
    child: Child,
    addr: String,
    log: std::path::PathBuf,
}

impl ChildHerald {
    async fn start(dir: &Path, server_extra: &str, descriptors: Option<u64>) -> ChildHerald {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let text = config_toml(&dir.join("data"), "", server_extra)
            .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
        let config = dir.join("herald.toml");
        std::fs::write(&config, text).expect("config");
        let log = dir.join("herald.log");
        let mut command = Command::new(HERALD);
        command
            .args(["serve", "--config"])
            .arg(&config)
            .env("TEST_INGEST_TOKEN", INGEST_TOKEN)
            .env("TEST_OPERATOR_TOKEN", OPERATOR_TOKEN)
            .env("HERALD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"));
        if let Some(limit) = descriptors {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs here.
            unsafe {
                command.pre_exec(move || {
                    nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_NOFILE,
                        limit,
                        limit,
                    )
                    .map_err(std::io::Error::from)
                });
            }
        }
        let mut herald = ChildHerald {
            child: command.spawn().expect("herald starts"),
            addr: format!("127.0.0.1:{port}"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let health = format!(
                "GET /healthz HTTP/1.1\r\nHost: {}\r\nconnection: close\r\n\r\n",
                herald.addr
            );
            if TcpStream::connect(&herald.addr).await.is_ok()
                && raw(&herald.addr, &health).await.0 == 200
            {
                break;
            }
            if let Ok(Some(status)) = herald.child.try_wait() {
                panic!("herald exited with {status}: {}", herald.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "herald did not start: {}",
                herald.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        herald
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildHerald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens 300 idle sockets, then a good client calls /healthz: it must be
/// served or refused with a clean 503, never hang or be cut.
async fn flood_then_good_client(herald: &ChildHerald) {
    let mut idle = Vec::new();
    for _ in 0..300 {
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&herald.addr)).await {
            Ok(Ok(stream)) => idle.push(stream),
            _ => break, // the kernel's backlog is full: the flood is as big as it gets
        }
    }
    assert!(idle.len() > 200, "opened {} idle sockets", idle.len());
    let health = format!(
        "GET /healthz HTTP/1.1\r\nHost: {}\r\nconnection: close\r\n\r\n",
        herald.addr
    );
    let started = Instant::now();
    let (status, body) = raw(&herald.addr, &health).await;
    println!(
        "at the cap a good client got {status} after {:?}",
        started.elapsed()
    );
    assert!(
        status == 200 || (status == 503 && body.contains("server.max_connections")),
        "served or refused cleanly, got {status}: {body}"
    );
    drop(idle);
    // Once the flood is gone, everyone is served again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = raw(&herald.addr, &health).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not served again after the flood: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_a_good_client_is_refused_cleanly_and_the_cap_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let herald = ChildHerald::start(
        dir.path(),
        "max_connections = 16\nheader_timeout = \"30s\"",
        None,
    )
    .await;
    flood_then_good_client(&herald).await;
    let log = herald.log_text();
    assert!(log.contains("connection cap reached"), "{log}");
    let metrics = format!(
        "GET /metrics HTTP/1.1\r\nHost: {}\r\nauthorization: Bearer {OPERATOR_TOKEN}\r\nconnection: close\r\n\r\n",
        herald.addr
    );
    let (status, text) = raw(&herald.addr, &metrics).await;
    assert_eq!(status, 200, "{text}");
    let refused: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("herald_http_connections_refused_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the refusals are counted");
    assert!(refused > 0.0, "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_256_descriptor_limit_idle_sockets_do_not_lock_clients_out() {
    let dir = tempfile::tempdir().unwrap();
    // The default max_connections (1024) does not fit under 256 descriptors.
    let herald = ChildHerald::start(dir.path(), "header_timeout = \"30s\"", Some(256)).await;
    let log = herald.log_text();
    assert!(log.contains("the connection cap is lowered"), "{log}");
    flood_then_good_client(&herald).await;
    let log = herald.log_text();
    assert!(log.contains("connection cap reached"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_token_limits_answer_429_with_retry_after() {
    let partner = MockPartner::start(Clock::manual(START_MS)).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = config_toml(
        dir.path(),
        &partner_toml("acme", &partner.url, ""),
        "token_rate = { per_second = 1, burst = 2 }\ntoken_concurrency = 1",
    );
    // The driven clock stands still: the bucket does not refill.
    let herald = TestHerald::start(&toml, Clock::manual(START_MS)).await;
    let event = r#"{"device_id":"lock-7f3a","type":"door.opened","partners":["acme"]}"#;
    let post = |token: &'static str| {
        herald
            .http
            .post(herald.url("/v1/events"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(event)
            .send()
    };
    for _ in 0..2 {
        assert_eq!(post(INGEST_TOKEN).await.expect("post").status(), 202);
    }
    let refused = post(INGEST_TOKEN).await.expect("post");
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    let problem: serde_json::Value =
        serde_json::from_str(&refused.text().await.expect("problem")).expect("json");
    assert_eq!(problem["type"], "/problems/rate-limited");
    let detail = problem["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("door-service") && detail.contains("server.token_rate"),
        "{detail}"
    );
    // Another token is not starved by this one.
    assert_eq!(post(OPERATOR_TOKEN).await.expect("post").status(), 202);

    herald.herald.shutdown().await.expect("shutdown");

    // Concurrency (no rate this time): one request in flight, its body
    // unfinished, holds the operator token's only slot.
    let dir = tempfile::tempdir().unwrap();
    let toml = config_toml(
        dir.path(),
        &partner_toml("acme", &partner.url, ""),
        "token_concurrency = 1",
    );
    let herald = TestHerald::start(&toml, Clock::manual(START_MS)).await;
    let post = |token: &'static str| {
        herald
            .http
            .post(herald.url("/v1/events"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(event)
            .send()
    };
    let addr = herald.herald.addr().to_string();
    let mut held = TcpStream::connect(&addr).await.expect("connect");
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nauthorization: Bearer {OPERATOR_TOKEN}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        event.len()
    );
    held.write_all(head.as_bytes()).await.expect("head");
    // Until herald has taken the held request, a second one may pass.
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let answer = post(OPERATOR_TOKEN).await.expect("post");
        if answer.status() == 429 {
            break answer;
        }
        assert_eq!(answer.status(), 202);
        assert!(
            Instant::now() < deadline,
            "the held request never took its slot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(refused.headers()["retry-after"], "1");
    let problem: serde_json::Value =
        serde_json::from_str(&refused.text().await.expect("problem")).expect("json");
    let detail = problem["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("on-call") && detail.contains("server.token_concurrency"),
        "{detail}"
    );
    // The ingest token has its own slot.
    assert_eq!(post(INGEST_TOKEN).await.expect("post").status(), 202);
    held.write_all(event.as_bytes()).await.expect("body");
    let mut answer = vec![0u8; 4096];
    let n = held.read(&mut answer).await.expect("answer");
    assert_eq!(parse(&answer[..n]).0, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_tokens_cross_origin_posts_and_foreign_hosts_are_refused() {
    let partner = MockPartner::start(Clock::system()).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nmin_free_disk = \"16MiB\"\n{}",
        dir.path().display(),
        partner_toml("acme", &partner.url, "")
    );
    let herald = TestHerald::start(&toml, Clock::system()).await;
    let addr = herald.herald.addr().to_string();
    let port = herald.herald.addr().port();
    let event = r#"{"device_id":"lock-7f3a","type":"door.forced_open","priority":"critical","partners":["acme"]}"#;
    let post = |host: &str, extra: &str, content_type: &str| {
        format!(
            "POST /v1/events HTTP/1.1\r\nHost: {host}\r\n{extra}content-type: {content_type}\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{event}",
            event.len()
        )
    };
    let cases = [
        (post(&addr, "Origin: http://evil.example\r\n", "text/plain"), 403, "cross-origin"),
        (post(&addr, "Origin: http://evil.example\r\n", "application/json"), 403, "cross-origin"),
        (post(&addr, "Sec-Fetch-Site: cross-site\r\n", "application/json"), 403, "cross-origin"),
        (post(&addr, "", "text/plain"), 415, "not-json"),
        (post(&format!("evil.example:{port}"), "", "application/json"), 421, "wrong-host"),
        (
            format!("GET /v1/partners HTTP/1.1\r\nHost: rebound.example:{port}\r\nconnection: close\r\n\r\n"),
            421,
            "wrong-host",
        ),
    ];
    for (request, expected, kind) in &cases {
        let (status, body) = raw(&addr, request).await;
        assert_eq!(status, *expected, "{request}\n{body}");
        assert!(body.contains(kind), "{body}");
    }
    assert_eq!(
        herald.deliveries_held_or_sent().await,
        0,
        "nothing refused was stored"
    );
    // What a local service or curl sends is still served.
    let (status, body) = raw(&addr, &post(&addr, "", "application/json")).await;
    assert_eq!(status, 202, "{body}");
    let partners =
        format!("GET /v1/partners HTTP/1.1\r\nHost: localhost:{port}\r\nconnection: close\r\n\r\n");
    assert_eq!(raw(&addr, &partners).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_an_operator_token_unless_metrics_auth_is_off() {
    let dir = tempfile::tempdir().unwrap();
    for (metrics_auth, none, ingest, operator) in
        [("", 401, 403, 200), ("metrics_auth = false", 200, 200, 200)]
    {
        let data = dir.path().join(format!("data{none}"));
        let herald =
            TestHerald::start(&config_toml(&data, "", metrics_auth), Clock::system()).await;
        let get = |token: Option<&str>| {
            let request = herald.http.get(herald.url("/metrics"));
            match token {
                Some(token) => request.bearer_auth(token).send(),
                None => request.send(),
            }
        };
        assert_eq!(
            get(None).await.expect("get").status(),
            none,
            "{metrics_auth:?}, no token"
        );
        assert_eq!(
            get(Some(INGEST_TOKEN)).await.expect("get").status(),
            ingest,
            "{metrics_auth:?}"
        );
        assert_eq!(
            get(Some(OPERATOR_TOKEN)).await.expect("get").status(),
            operator,
            "{metrics_auth:?}"
        );
        herald.herald.shutdown().await.expect("shutdown");
    }
}

#[test]
fn bad_client_limits_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (extra, expected) in [
        (
            "header_timeout = \"0s\"",
            "server.header_timeout: must be more than 0s",
        ),
        (
            "body_timeout = \"soon\"",
            "server.body_timeout: \"soon\" is not a duration",
        ),
        (
            "max_connections = 0",
            "server.max_connections: must be at least 1",
        ),
        (
            "token_concurrency = 0",
            "server.token_concurrency: must be at least 1",
        ),
        (
            "token_rate = { per_second = 0 }",
            "server.token_rate.per_second: must be at least 1",
        ),
        (
            "token_rate = { per_second = 5, burst = 0 }",
            "server.token_rate.burst: must be at least 1",
        ),
        ("metrics_auth = \"yes\"", "metrics_auth"),
    ] {
        let toml = config_toml(dir.path(), "", extra);
        let error = herald::config::Config::parse(&toml, &common::test_env)
            .expect_err(extra)
            .to_string();
        assert!(error.contains(expected), "{extra}: {error}");
    }
}
