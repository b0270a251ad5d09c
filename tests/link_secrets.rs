//! A link's secrets stay secret: herald runs as a real process with debug
//! logs, refreshes a SmartThings user's token and dead-letters a delivery
//! to a removed integration, and then neither its logs, nor any API answer,
//! nor the dead letters, nor the bytes of its data dir hold a token or the
//! OAuth client secret, while the mock partner did receive them.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use adapters::mock::{MockHandle, MockPartner, Scenario};
use serde_json::{json, Value};

const HERALD: &str = env!("CARGO_BIN_EXE_herald");
const OPERATOR: &str = "operator-token-0123456789abcdef";
const LINK_KEY: &str = "aGVyYWxkLXRlc3QtbGluay1rZXktMzItYnl0ZXMhISE=";
/// Every token the mock issues starts with one of these stems.
const ACCESS_STEM: &str = "stAccessS3cr3t";
const REFRESH_STEM: &str = "stRefreshS3cr3t";
const CLIENT_SECRET: &str = "clientS3cr3tValue";

struct Running {
    child: Child,
    url: String,
    http: reqwest::Client,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, String) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(OPERATOR);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let Ok(response) = request.send().await else {
            return (0, "no answer".into());
        };
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }
}

async fn mock(scenario: Scenario) -> (String, MockHandle) {
    let scenario = Scenario {
        access_token: format!("{ACCESS_STEM}-0"),
        refresh_token: format!("{REFRESH_STEM}-0"),
        ..scenario
    };
    let (addr, handle) = MockPartner::start("smartthings", scenario)
        .await
        .expect("mock starts");
    (format!("http://{addr}"), handle)
}

fn start(dir: &Path, port: u16) -> Running {
    let config = dir.join("herald.toml");
    let partner = |name: &str| {
        format!(
            "[partners.{name}]\nadapter = \"smartthings\"\nclient_id_env = \"ST_ID\"\nclient_secret_env = \"ST_SECRET\"\nallow_private = true\ntimeout_ms = 2000\n"
        )
    };
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nmin_free_disk = \"16MiB\"\n\n[[tokens]]\nname = \"on-call\"\nrole = \"operator\"\ntoken_env = \"OPS_TOKEN\"\n\n{}\n{}",
            dir.join("data").display(),
            partner("st"),
            partner("st_gone"),
        ),
    )
    .expect("config written");
    let log = std::fs::File::create(dir.join("herald.log")).expect("log file");
    let child = Command::new(HERALD)
        .args(["serve", "--config"])
        .arg(&config)
        .env("HERALD_LOG", "debug")
        .env("HERALD_LINK_KEY", LINK_KEY)
        .env("OPS_TOKEN", OPERATOR)
        .env("ST_ID", "herald-client")
        .env("ST_SECRET", CLIENT_SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("herald starts");
    Running {
        child,
        url: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::new(),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn link(base: &str) -> Value {
    json!({
        "external_id": "lock-42",
        "callback_url": format!("{base}/device/events"),
        "token_url": format!("{base}/oauth/token"),
        "credentials": {
            "access_token": format!("{ACCESS_STEM}-0"),
            "refresh_token": format!("{REFRESH_STEM}-0"),
            "expires_at": "2030-01-01T00:00:00Z"
        }
    })
}

/// Polls `GET path` (real time, bounded) until `done` holds for its body.
async fn wait_until(herald: &Running, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..400 {
        let (status, text) = herald.call(reqwest::Method::GET, path, None).await;
        if status == 200 {
            let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            if done(&body) {
                return body;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{path} never reached the expected state");
}

fn holds_a_secret(text: &[u8]) -> Option<&'static str> {
    [ACCESS_STEM, REFRESH_STEM, CLIENT_SECRET]
        .into_iter()
        .find(|s| text.windows(s.len()).any(|w| w == s.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_secrets_never_leave_herald_in_clear() {
    adapters_provider();
    let (ok_base, ok) = mock(Scenario::default()).await;
    let (gone_base, gone) = mock(Scenario {
        terminal: true,
        ..Scenario::default()
    })
    .await;
    // The first delivery meets an expired token: herald must refresh it.
    ok.expire_token();
    let dir = tempfile::tempdir().expect("temp dir");
    let herald = start(dir.path(), free_port());
    wait_until(&herald, "/readyz", |_| true).await;

    let mut answers = Vec::new();
    for (partner, base) in [("st", &ok_base), ("st_gone", &gone_base)] {
        let (status, text) = herald
            .call(
                reqwest::Method::PUT,
                &format!("/v1/links/{partner}/lock-7f3a"),
                Some(link(base)),
            )
            .await;
        assert_eq!(status, 201, "{text}");
        answers.push(text);
    }
    let (status, text) = herald
        .call(
            reqwest::Method::POST,
            "/v1/events",
            Some(json!({
                "device_id": "lock-7f3a", "type": "door.forced_open", "priority": "critical",
                "data": {"capability": "lock", "attribute": "lock", "value": "forced_open", "kind": "forced_open"}
            })),
        )
        .await;
    assert_eq!(status, 202, "{text}");
    let accepted: Value = serde_json::from_str(&text).expect("json");
    let event_path = format!("/v1/events/{}", accepted["id"].as_str().expect("id"));
    let event = wait_until(&herald, &event_path, |e| {
        let states: Vec<&str> = e["deliveries"]
            .as_array()
            .map(|d| d.iter().filter_map(|d| d["state"].as_str()).collect())
            .unwrap_or_default();
        states.len() == 2 && !states.contains(&"pending")
    })
    .await;
    answers.push(event.to_string());

    // The secrets were really in play: sent, refreshed, rotated.
    assert_eq!(ok.refreshes(), 1, "one refresh");
    assert_eq!(ok.accepted().len(), 1);
    assert!(ok.access_token().starts_with(ACCESS_STEM));
    assert_eq!(gone.accepted().len(), 0);

    for path in [
        "/v1/links/st/lock-7f3a",
        "/v1/links/st_gone/lock-7f3a",
        "/v1/dead-letters",
        "/v1/partners",
        "/v1/partners/st_gone/parked",
        "/metrics",
    ] {
        let (status, text) = herald.call(reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "{path}: {text}");
        answers.push(text);
    }
    let letters: Value = serde_json::from_str(&answers[answers.len() - 4]).expect("json");
    let letter = letters["items"][0]["id"]
        .as_str()
        .expect("a dead letter for the removed integration")
        .to_string();
    let (_, text) = herald
        .call(
            reqwest::Method::GET,
            &format!("/v1/dead-letters/{letter}"),
            None,
        )
        .await;
    assert!(text.contains("INTEGRATION-DELETED"), "{text}");
    answers.push(text);
    for answer in &answers {
        assert_eq!(
            holds_a_secret(answer.as_bytes()),
            None,
            "an API answer: {answer}"
        );
    }

    drop(herald);
    let log = std::fs::read(dir.path().join("herald.log")).expect("log");
    assert!(
        String::from_utf8_lossy(&log).contains("link token refreshed"),
        "the debug log covers the refresh"
    );
    assert_eq!(holds_a_secret(&log), None, "herald's log");
    for entry in walk(&dir.path().join("data")) {
        let bytes = std::fs::read(&entry).expect("data file");
        assert_eq!(
            holds_a_secret(&bytes),
            None,
            "{} holds a secret in clear",
            entry.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("data dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn adapters_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
