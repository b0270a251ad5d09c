//! The demo's world: four partners on loopback (the `adapters` crate's mock
//! partners, and one port nothing listens on), a generated config pointing
//! at them, a herald started in this process on a temp data dir, and the
//! devices linked to SmartThings through `PUT /v1/links/...`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use adapters::mock::{MockHandle, MockPartner, RetryAfter, Scenario};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::json;

use crate::clock::{rfc3339, Clock};
use crate::config::Config;
use crate::Herald;

/// The SmartThings mock's access token expires after this many deliveries.
pub const EXPIRE_AFTER: u32 = 25;
/// Of every this-many deliveries the flaky partner gets, one is answered
/// 503 and the next one 429.
pub const FLAKY_PERIOD: u32 = 6;
/// The down partner's retry budget: normal deliveries, in attempts.
pub const DOWN_MAX_ATTEMPTS: u32 = 3;
/// The down partner's retry budget: critical deliveries, by age.
pub const DOWN_CRITICAL_MAX_AGE: &str = "3s";

/// The devices the demo links and sends events for.
pub const DEVICES: &[&str] = &["front-door", "back-door", "nursery-thermo", "hall-motion"];

/// One partner of the demo and what it does.
pub struct Partner {
    pub name: &'static str,
    pub role: String,
    /// Whether it takes deliveries at all (the down one never does).
    pub live: bool,
}

/// The demo's partners, in the order the summary shows them.
pub fn partners() -> Vec<Partner> {
    vec![
        Partner {
            name: "acme",
            role: "healthy Standard Webhooks receiver".into(),
            live: true,
        },
        Partner {
            name: "smartthings",
            role: format!("token expires every {EXPIRE_AFTER} deliveries"),
            live: true,
        },
        Partner {
            name: "flaky",
            role: format!("503, then 429, once in every {FLAKY_PERIOD}"),
            live: true,
        },
        Partner {
            name: "down",
            role: "refuses connections".into(),
            live: false,
        },
    ]
}

/// The secrets of one run, random each time.
pub struct Secrets {
    pub ingest_token: String,
    pub operator_token: String,
    webhook_secret: String,
    link_key: String,
    client_secret: String,
}

impl Secrets {
    pub fn generate() -> Result<Secrets, String> {
        let random = SystemRandom::new();
        let bytes = |n: usize| -> Result<Vec<u8>, String> {
            let mut buf = vec![0u8; n];
            random
                .fill(&mut buf)
                .map_err(|_| "the system's random source failed".to_string())?;
            Ok(buf)
        };
        let hex = |b: Vec<u8>| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        Ok(Secrets {
            ingest_token: format!("demo-ingest-{}", hex(bytes(16)?)),
            operator_token: format!("demo-operator-{}", hex(bytes(16)?)),
            webhook_secret: format!("whsec_{}", BASE64.encode(bytes(24)?)),
            link_key: BASE64.encode(bytes(32)?),
            client_secret: hex(bytes(16)?),
        })
    }

    /// What the config's `*_env` keys resolve to.
    fn env(&self, name: &str) -> Option<String> {
        match name {
            "DEMO_INGEST_TOKEN" => Some(self.ingest_token.clone()),
            "DEMO_OPERATOR_TOKEN" => Some(self.operator_token.clone()),
            "DEMO_WEBHOOK_SECRET" => Some(self.webhook_secret.clone()),
            "DEMO_LINK_KEY" => Some(self.link_key.clone()),
            "DEMO_ST_CLIENT_ID" => Some("herald-demo".into()),
            "DEMO_ST_CLIENT_SECRET" => Some(self.client_secret.clone()),
            _ => None,
        }
    }
}

/// The running partners and herald.
pub struct Stage {
    pub herald: Herald,
    pub acme: MockHandle,
    pub smartthings: MockHandle,
    pub flaky: MockHandle,
    /// Held so that the down partner's port stays refused.
    _down_port: tokio::net::TcpSocket,
    pub mock_urls: Vec<(&'static str, String)>,
    pub config_path: PathBuf,
    pub secrets: Secrets,
    pub http: reqwest::Client,
}

impl Stage {
    /// Starts the mocks and herald in `dir`, and links the devices.
    pub async fn start(dir: &Path) -> Result<Stage, String> {
        crate::dispatch::client::install_crypto_provider();
        let secrets = Secrets::generate()?;
        let webhook = |intermittent| Scenario {
            signing_secret: Some(secrets.webhook_secret.clone()),
            intermittent,
            retry_after: RetryAfter::Seconds(1),
            ..Scenario::default()
        };
        let mock = |platform: &'static str, scenario: Scenario| async move {
            MockPartner::start(platform, scenario)
                .await
                .map_err(|e| format!("cannot start the {platform} mock partner: {e}"))
        };
        let (acme_addr, acme) = mock("webhook", webhook(None)).await?;
        let (flaky_addr, flaky) = mock("webhook", webhook(Some(FLAKY_PERIOD))).await?;
        let (st_addr, smartthings) = mock(
            "smartthings",
            Scenario {
                expire_after: Some(EXPIRE_AFTER),
                client_secret: Some(secrets.client_secret.clone()),
                ..Scenario::default()
            },
        )
        .await?;
        let (down_port, down_addr) = refusing_port()?;
        let data_dir = dir.join("data");
        let toml = config_toml(&data_dir, acme_addr, flaky_addr, down_addr);
        let config_path = dir.join("herald.toml");
        std::fs::write(&config_path, &toml)
            .map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;
        let config = Config::parse(&toml, &|name| secrets.env(name))
            .map_err(|e| format!("the demo's own config is refused: {e}"))?;
        let herald = crate::start(config, Clock::system())
            .await
            .map_err(|e| format!("herald cannot start: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        let stage = Stage {
            herald,
            acme,
            smartthings,
            flaky,
            _down_port: down_port,
            mock_urls: vec![
                ("acme", format!("http://{acme_addr}/hook")),
                ("smartthings", format!("http://{st_addr}/device/events")),
                ("flaky", format!("http://{flaky_addr}/hook")),
                ("down", format!("http://{down_addr}/hook (refused)")),
            ],
            config_path,
            secrets,
            http,
        };
        stage.link_devices(st_addr).await?;
        Ok(stage)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.herald.url())
    }

    /// Links every device to SmartThings for one user: the first link
    /// carries the user's tokens, the others share them by `account`.
    async fn link_devices(&self, st_addr: SocketAddr) -> Result<(), String> {
        let expires = rfc3339(Clock::system().now_ms() + 3_600_000);
        for (i, device) in DEVICES.iter().enumerate() {
            let mut body = json!({
                "external_id": format!("st-{device}"),
                "account": "demo-user",
                "callback_url": format!("http://{st_addr}/device/events"),
                "token_url": format!("http://{st_addr}/oauth/token"),
            });
            if i == 0 {
                let scenario = Scenario::default();
                body["credentials"] = json!({
                    "access_token": scenario.access_token,
                    "refresh_token": scenario.refresh_token,
                    "expires_at": expires,
                });
            }
            let answer = self
                .http
                .put(self.url(&format!("/v1/links/smartthings/{device}")))
                .bearer_auth(&self.secrets.operator_token)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .map_err(|e| format!("PUT /v1/links/smartthings/{device}: {e}"))?;
            let status = answer.status();
            if !status.is_success() {
                let text = answer.text().await.unwrap_or_default();
                return Err(format!(
                    "PUT /v1/links/smartthings/{device} answered {status}: {text}"
                ));
            }
        }
        Ok(())
    }

    /// Stops herald, then the mocks.
    pub async fn stop(self) -> Result<(), String> {
        let result = self
            .herald
            .shutdown()
            .await
            .map_err(|e| format!("herald did not shut down cleanly: {e}"));
        self.acme.stop().await;
        self.smartthings.stop().await;
        self.flaky.stop().await;
        result
    }
}

/// A loopback port that refuses connections: bound but never listening,
/// so it stays this demo's (a port let go could be taken by another
/// server on the machine, which would then get the down partner's sends).
fn refusing_port() -> Result<(tokio::net::TcpSocket, SocketAddr), String> {
    let failed = |e: std::io::Error| format!("cannot reserve a loopback port: {e}");
    let socket = tokio::net::TcpSocket::new_v4().map_err(failed)?;
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .map_err(failed)?;
    let addr = socket.local_addr().map_err(failed)?;
    Ok((socket, addr))
}

fn config_toml(data_dir: &Path, acme: SocketAddr, flaky: SocketAddr, down: SocketAddr) -> String {
    format!(
        r#"# Generated by `herald demo`: partners at its loopback mocks. Secrets
# are the demo's own, random per run; the *_env names are resolved by it.

[server]
listen = "127.0.0.1:0"
data_dir = {data_dir}
shutdown_grace = "2s"
link_key_env = "DEMO_LINK_KEY"
# The machine's disk is not what the demo shows.
min_free_disk = "16MiB"

[[tokens]]
name = "demo-service"
role = "ingest"
token_env = "DEMO_INGEST_TOKEN"

[[tokens]]
name = "on-call"
role = "operator"
token_env = "DEMO_OPERATOR_TOKEN"

[partners.acme]
adapter = "webhook"
url = "http://{acme}/hook"
secret_env = "DEMO_WEBHOOK_SECRET"
allow_private = true
subscribe = ["*"]

[partners.smartthings]
adapter = "smartthings"
client_id_env = "DEMO_ST_CLIENT_ID"
client_secret_env = "DEMO_ST_CLIENT_SECRET"
allow_private = true
retry = {{ initial_ms = 200, multiplier = 2.0, max_interval_ms = 2000 }}

[partners.flaky]
adapter = "webhook"
url = "http://{flaky}/hook"
secret_env = "DEMO_WEBHOOK_SECRET"
allow_private = true
subscribe = ["*"]
retry = {{ initial_ms = 200, multiplier = 2.0, max_interval_ms = 2000 }}

# A short retry budget, so that its deliveries become dead letters within
# the demo; the breaker is off so that each one spends its attempts.
[partners.down]
adapter = "webhook"
url = "http://{down}/hook"
secret_env = "DEMO_WEBHOOK_SECRET"
allow_private = true
subscribe = ["*"]
timeout_ms = 1000
retry = {{ initial_ms = 100, multiplier = 2.0, max_interval_ms = 1000, max_attempts = {DOWN_MAX_ATTEMPTS}, critical_max_age = "{DOWN_CRITICAL_MAX_AGE}" }}
breaker = {{ failures = 0 }}
"#,
        data_dir = toml::Value::String(data_dir.display().to_string())
    )
}
