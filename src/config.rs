//! The TOML contract (see ARCHITECTURE.md, *The public contract*, and
//! fixtures/config/herald.toml) and its validation.
//!
//! Everything is checked at start, so a bad file fails there, naming the key
//! and the reason, and never at 3 a.m. Secrets never sit in the file: the
//! file names environment variables, and they are read here, once.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::dispatch::breaker::BreakerPolicy;
use crate::dispatch::retry::RetryPolicy;

/// herald's settings with no `--config`: loopback only, data in `./herald-data`.
pub(crate) const EMBEDDED_DEFAULT: &str = r#"
[server]
listen = "127.0.0.1:8080"
data_dir = "./herald-data"
"#;

/// What is wrong, and where: `key` is the dotted path in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub tokens: Vec<TokenConfig>,
    pub partners: Vec<PartnerConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// sled's page cache; its own default is 1 GiB.
    pub cache_bytes: u64,
    /// Ingest requests waiting for the writer before herald answers 503.
    pub ingest_queue: usize,
    pub max_batch: usize,
    pub max_body_bytes: usize,
    /// How long finished events (and their idempotency keys) stay findable.
    pub retention: Duration,
    /// Seals link credentials at rest; `None` when neither `link_key_env`
    /// nor `HERALD_LINK_KEY` is set (then links carry no credentials).
    pub link_key: Option<crate::links::LinkKey>,
    /// How long shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
    /// How long due work may wait with no outcome recorded for its partner
    /// before `/readyz` calls the dispatcher stalled.
    pub stall_after: Duration,
    /// `min_free_disk` and `critical_disk_reserve` (see src/disk.rs).
    pub disk: crate::disk::DiskPolicy,
    /// Timeouts, the connection cap and per-token limits (src/api/guard.rs).
    pub http: HttpPolicy,
}

/// How the HTTP server treats its clients: how long each may take, how many
/// may be connected, how fast one ingest token may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpPolicy {
    /// From a connection's open (or its previous answer) to a complete
    /// request header; also how long an idle keep-alive connection stays.
    pub header_timeout: Duration,
    /// From a request's header to the end of its body.
    pub body_timeout: Duration,
    pub max_connections: usize,
    /// Requests per second (and burst) each token may send to ingest;
    /// `None`: no rate limit.
    pub token_rate: Option<Rate>,
    /// Requests one ingest token may have in flight at once.
    pub token_concurrency: usize,
    /// Whether `/metrics` needs an operator token when tokens are configured.
    pub metrics_auth: bool,
}

#[derive(Clone)]
pub struct TokenConfig {
    pub name: String,
    pub role: Role,
    pub secret: String,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenConfig({}, {:?}, <redacted>)", self.name, self.role)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// May only `POST /v1/events`.
    Ingest,
    /// May do everything.
    Operator,
}

#[derive(Debug, Clone)]
pub struct PartnerConfig {
    pub name: String,
    pub adapter: adapters::PartnerSettings,
    pub adapter_kind: String,
    pub rate: Option<Rate>,
    pub max_in_flight: usize,
    /// Learn the in-flight limit (AIMD, between 1 and `max_in_flight`)
    /// instead of always allowing `max_in_flight`.
    pub adaptive_concurrency: bool,
    /// `ordering = "per_device"`: a device's events go out one at a time,
    /// each after the previous one settled.
    pub ordered_per_device: bool,
    /// `coalesce_state = true`: a newer normal state event for the same
    /// device and attribute replaces an older one not yet sent.
    pub coalesce_state: bool,
    pub timeout: Duration,
    pub allow_private: bool,
    pub retry: RetryPolicy,
    pub breaker: BreakerPolicy,
    /// Event types this partner receives when an event names no partners
    /// (`"*"` for all, `"door.*"` for a prefix).
    pub subscribe: Vec<String>,
    /// Keep-alive refresh: a grant's refresh token is refreshed without an
    /// event once `lifetime - ahead` has passed since it was issued. `None`:
    /// no keep-alive (the platform's refresh tokens do not expire, or
    /// `refresh_token_lifetime = "off"`).
    pub keep_alive: Option<KeepAlive>,
}

/// When a grant's refresh token is refreshed before it dies unused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    /// How long a refresh token lives after it was issued.
    pub lifetime: Duration,
    /// How long before the end of `lifetime` herald refreshes it.
    pub ahead: Duration,
}

impl KeepAlive {
    /// How old a refresh token may grow before herald refreshes it.
    pub(crate) fn refresh_at_age(&self) -> Duration {
        self.lifetime.saturating_sub(self.ahead)
    }
}

impl PartnerConfig {
    pub(crate) fn subscribes_to(&self, event_type: &str) -> bool {
        self.subscribe
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => event_type.starts_with(prefix),
                None => pattern == event_type,
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

// ---- the file as written -------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: FileServer,
    #[serde(default)]
    tokens: Vec<FileToken>,
    #[serde(default)]
    partners: BTreeMap<String, FilePartner>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileServer {
    listen: String,
    data_dir: PathBuf,
    cache_mb: u64,
    ingest_queue: usize,
    max_batch: usize,
    max_body_bytes: usize,
    retention: String,
    shutdown_grace: String,
    stall_after: String,
    /// The variable holding the link key (default `HERALD_LINK_KEY`).
    link_key_env: Option<String>,
    min_free_disk: String,
    /// Default: half of `min_free_disk`.
    critical_disk_reserve: Option<String>,
    header_timeout: String,
    body_timeout: String,
    max_connections: usize,
    token_rate: Option<FileRate>,
    token_concurrency: usize,
    metrics_auth: bool,
}

impl Default for FileServer {
    fn default() -> Self {
        FileServer {
            listen: "127.0.0.1:8080".into(),
            data_dir: "./herald-data".into(),
            cache_mb: 32,
            ingest_queue: 4096,
            max_batch: 1000,
            max_body_bytes: 8 * 1024 * 1024,
            retention: "24h".into(),
            shutdown_grace: "10s".into(),
            stall_after: "30s".into(),
            link_key_env: None,
            min_free_disk: "5%".into(),
            critical_disk_reserve: None,
            header_timeout: "10s".into(),
            body_timeout: "30s".into(),
            max_connections: 1024,
            token_rate: None,
            token_concurrency: 64,
            metrics_auth: true,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToken {
    name: String,
    role: Role,
    token_env: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePartner {
    adapter: String,
    /// Optional for platforms whose links carry their endpoints or that
    /// publish one; a plain webhook partner needs it.
    #[serde(default)]
    url: String,
    #[serde(default)]
    secret_env: Option<String>,
    /// The platform's OAuth client, for token refreshes and mints.
    #[serde(default)]
    client_id_env: Option<String>,
    #[serde(default)]
    client_secret_env: Option<String>,
    /// A partner-wide token endpoint (client credentials), or an override
    /// of the one the platform or its service-account key names.
    #[serde(default)]
    token_url: Option<String>,
    /// The variable holding a service-account key's JSON (Google).
    #[serde(default)]
    service_account_key_env: Option<String>,
    #[serde(default)]
    rate: Option<FileRate>,
    #[serde(default = "default_in_flight")]
    max_in_flight: usize,
    #[serde(default)]
    concurrency: Concurrency,
    #[serde(default)]
    ordering: DeviceOrdering,
    #[serde(default)]
    coalesce_state: bool,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default)]
    allow_private: bool,
    #[serde(default)]
    retry: FileRetry,
    #[serde(default)]
    breaker: FileBreaker,
    #[serde(default)]
    subscribe: Vec<String>,
    /// Webhook partners: statuses to dead-letter at once instead of retrying.
    #[serde(default)]
    permanent_statuses: Vec<u16>,
    /// Per-region endpoints for platforms that route links by region (Alexa).
    #[serde(default)]
    gateways: std::collections::BTreeMap<String, String>,
    /// A refresh token's lifetime (`"30d"`), or `"off"`; default: the
    /// platform's documented one, if any.
    #[serde(default)]
    refresh_token_lifetime: Option<String>,
    /// How long before that lifetime ends herald refreshes (default 7d).
    #[serde(default)]
    refresh_ahead: Option<String>,
}

/// `refresh_ahead` where a partner sets none.
const DEFAULT_REFRESH_AHEAD: Duration = Duration::from_secs(7 * 86_400);

/// `concurrency = "fixed"` (always up to `max_in_flight`) or `"adaptive"`.
#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Concurrency {
    #[default]
    Fixed,
    Adaptive,
}

/// `ordering = "none"` (default) or `"per_device"`.
#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum DeviceOrdering {
    #[default]
    None,
    PerDevice,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileBreaker {
    /// 0 turns the breaker off.
    failures: u32,
    cool_down: String,
    max_cool_down: String,
}

impl Default for FileBreaker {
    fn default() -> Self {
        FileBreaker {
            failures: 5,
            cool_down: "10s".into(),
            max_cool_down: "5m".into(),
        }
    }
}

fn default_in_flight() -> usize {
    32
}
fn default_timeout_ms() -> u64 {
    5000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRate {
    per_second: u32,
    #[serde(default)]
    burst: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileRetry {
    initial_ms: u64,
    multiplier: f64,
    max_interval_ms: u64,
    max_age: String,
    critical_max_age: String,
    max_attempts: Option<u32>,
}

impl Default for FileRetry {
    fn default() -> Self {
        FileRetry {
            initial_ms: 1000,
            multiplier: 2.0,
            max_interval_ms: 600_000,
            max_age: "72h".into(),
            critical_max_age: "72h".into(),
            max_attempts: None,
        }
    }
}

// ---- loading -------------------------------------------------------------

impl Config {
    /// Parses and validates a config file's text, reading secrets through `env`.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let file: FileConfig = parse_toml(text)?;
        let server = server_config(file.server, env)?;
        let mut tokens = Vec::new();
        for (i, t) in file.tokens.into_iter().enumerate() {
            let key = format!("tokens[{i}].token_env");
            let secret = read_secret(env, &key, &t.token_env)?;
            // A value pasted with its newline could never match what a
            // client sends: refused, not trimmed, so the value herald holds
            // is exactly the variable's.
            if secret.trim() != secret {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "the token in ${} has leading or trailing whitespace (a newline left by `echo` or a file?); set it without",
                        t.token_env
                    ),
                ));
            }
            if secret.len() < 16 {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "the token in ${} is shorter than 16 characters",
                        t.token_env
                    ),
                ));
            }
            // One secret under two names (or two roles) would make the
            // caller's identity a matter of order: refused, by name.
            if let Some(twin) = tokens
                .iter()
                .find(|other: &&TokenConfig| other.secret == secret)
            {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "tokens {:?} and {:?} have the same secret (${}); give each its own",
                        twin.name, t.name, t.token_env
                    ),
                ));
            }
            tokens.push(TokenConfig {
                name: t.name,
                role: t.role,
                secret,
            });
        }
        if tokens.is_empty() && !server.listen.ip().is_loopback() {
            return Err(ConfigError::new(
                "server.listen",
                format!(
                    "{} is not a loopback address and no [[tokens]] are configured: \
                     herald refuses to serve an open API beyond this machine",
                    server.listen
                ),
            ));
        }
        let mut partners = Vec::new();
        for (name, p) in file.partners {
            partners.push(partner_config(&name, p, env)?);
        }
        if server.link_key.is_none() {
            if let Some(p) = partners.iter().find(|p| p.adapter_kind != "webhook") {
                return Err(ConfigError::new(
                    "server.link_key_env",
                    format!(
                        "partner {:?} is a {} platform, whose links hold user tokens sealed at rest: set {} to the base64 of 32 random bytes (head -c 32 /dev/urandom | base64), or name another variable here",
                        p.name,
                        p.adapter_kind,
                        crate::links::DEFAULT_KEY_ENV
                    ),
                ));
            }
        }
        Ok(Config {
            server,
            tokens,
            partners,
        })
    }

    /// Reads a file, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&std::path::Path>) -> Result<Config, ConfigError> {
        let env = |name: &str| std::env::var(name).ok();
        match path {
            None => Config::parse(EMBEDDED_DEFAULT, &env),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::new(path.display().to_string(), format!("cannot read: {e}"))
                })?;
                Config::parse(&text, &env)
            }
        }
    }

    pub fn partner(&self, name: &str) -> Option<&PartnerConfig> {
        self.partners.iter().find(|p| p.name == name)
    }
}

fn parse_toml(text: &str) -> Result<FileConfig, ConfigError> {
    let line_of = |span: Option<std::ops::Range<usize>>| {
        span.map(|s| {
            format!(
                " (line {})",
                text[..s.start.min(text.len())].lines().count().max(1)
            )
        })
        .unwrap_or_default()
    };
    let de = toml::Deserializer::parse(text)
        .map_err(|e| ConfigError::new("(file)", format!("{}{}", e.message(), line_of(e.span()))))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        ConfigError::new(
            if key == "." {
                "(file)".to_string()
            } else {
                key
            },
            format!("{}{}", inner.message(), line_of(inner.span())),
        )
    })
}

fn server_config(
    s: FileServer,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ServerConfig, ConfigError> {
    let listen = s.listen.parse::<SocketAddr>().map_err(|e| {
        ConfigError::new(
            "server.listen",
            format!("{:?} is not an address like 127.0.0.1:8080 ({e})", s.listen),
        )
    })?;
    if s.data_dir.as_os_str().is_empty() {
        return Err(ConfigError::new("server.data_dir", "must not be empty"));
    }
    if s.cache_mb == 0 {
        return Err(ConfigError::new("server.cache_mb", "must be at least 1"));
    }
    for (key, value) in [
        ("server.ingest_queue", s.ingest_queue),
        ("server.max_batch", s.max_batch),
    ] {
        if value == 0 {
            return Err(ConfigError::new(key, "must be at least 1"));
        }
    }
    if s.max_body_bytes < crate::api::ingest::MAX_EVENT_BYTES {
        return Err(ConfigError::new(
            "server.max_body_bytes",
            format!(
                "must be at least {} (one event)",
                crate::api::ingest::MAX_EVENT_BYTES
            ),
        ));
    }
    let http = http_policy(&s)?;
    Ok(ServerConfig {
        listen,
        data_dir: s.data_dir,
        cache_bytes: s.cache_mb.checked_mul(1024 * 1024).ok_or_else(|| {
            ConfigError::new(
                "server.cache_mb",
                format!("{} MiB is too large", s.cache_mb),
            )
        })?,
        ingest_queue: s.ingest_queue,
        max_batch: s.max_batch,
        max_body_bytes: s.max_body_bytes,
        retention: parse_duration("server.retention", &s.retention)?,
        shutdown_grace: parse_duration("server.shutdown_grace", &s.shutdown_grace)?,
        stall_after: match parse_duration("server.stall_after", &s.stall_after)? {
            zero if zero.is_zero() => {
                return Err(ConfigError::new(
                    "server.stall_after",
                    "must be above 0: due work always waits a moment",
                ))
            }
            after => after,
        },
        link_key: link_key(s.link_key_env.as_deref(), env)?,
        disk: disk_policy(&s.min_free_disk, s.critical_disk_reserve.as_deref())?,
        http,
    })
}

/// `server.header_timeout`, `body_timeout`, `max_connections`,
/// `token_rate`, `token_concurrency` and `metrics_auth`.
fn http_policy(s: &FileServer) -> Result<HttpPolicy, ConfigError> {
    let positive = |key: &'static str, text: &str| {
        let value = parse_duration(key, text)?;
        match value.is_zero() {
            true => Err(ConfigError::new(key, "must be more than 0s")),
            false => Ok(value),
        }
    };
    for (key, value) in [
        ("server.max_connections", s.max_connections),
        ("server.token_concurrency", s.token_concurrency),
    ] {
        if value == 0 {
            return Err(ConfigError::new(key, "must be at least 1"));
        }
    }
    let token_rate = match &s.token_rate {
        None => None,
        Some(r) => {
            if r.per_second == 0 {
                return Err(ConfigError::new(
                    "server.token_rate.per_second",
                    "must be at least 1",
                ));
            }
            let burst = r.burst.unwrap_or(r.per_second);
            if burst == 0 {
                return Err(ConfigError::new(
                    "server.token_rate.burst",
                    "must be at least 1",
                ));
            }
            Some(Rate {
                per_second: r.per_second,
                burst,
            })
        }
    };
    Ok(HttpPolicy {
        header_timeout: positive("server.header_timeout", &s.header_timeout)?,
        body_timeout: positive("server.body_timeout", &s.body_timeout)?,
        max_connections: s.max_connections,
        token_rate,
        token_concurrency: s.token_concurrency,
        metrics_auth: s.metrics_auth,
    })
}

/// `server.min_free_disk` and `server.critical_disk_reserve`: each a size
/// or a share of the filesystem, the reserve below the limit. Where one is
/// a size and the other a share, that is checked at start, on the
/// filesystem's real size.
fn disk_policy(
    min_free: &str,
    reserve: Option<&str>,
) -> Result<crate::disk::DiskPolicy, ConfigError> {
    use crate::disk::{DiskPolicy, Limit};
    let min_free =
        Limit::parse(min_free).map_err(|e| ConfigError::new("server.min_free_disk", e))?;
    let reserve = reserve
        .map(Limit::parse)
        .transpose()
        .map_err(|e| ConfigError::new("server.critical_disk_reserve", e))?;
    if let Some(reserve) = reserve {
        if !reserve.is_zero() && reserve.at_least(min_free) == Some(true) {
            return Err(ConfigError::new(
                "server.critical_disk_reserve",
                format!(
                    "{reserve} is not below server.min_free_disk ({min_free}): the reserve is \
                     the part of min_free_disk that critical events may still use"
                ),
            ));
        }
    }
    Ok(DiskPolicy {
        min_free,
        critical_reserve: reserve,
    })
}

/// `permanent_statuses`: only for webhook partners (platforms have their
/// own verdict tables), and only statuses a retry could otherwise be spent
/// on: not 2xx (delivered) and not 410 (which parks the route).
fn check_permanent_statuses(key: &str, adapter: &str, statuses: &[u16]) -> Result<(), ConfigError> {
    if statuses.is_empty() {
        return Ok(());
    }
    if adapter != "webhook" {
        return Err(ConfigError::new(
            key,
            format!("only webhook partners take it; the {adapter} adapter reads its platform's answers by the platform's documents"),
        ));
    }
    for &status in statuses {
        let why = match status {
            200..=299 => Some("is a success"),
            410 => Some("already parks the route"),
            300..=599 => None,
            _ => Some("is not an HTTP status a receiver answers (300 to 599)"),
        };
        if let Some(why) = why {
            return Err(ConfigError::new(key, format!("{status} {why}")));
        }
    }
    Ok(())
}

/// The link key from the named variable (which must then be set) or from
/// `HERALD_LINK_KEY` when it is.
fn link_key(
    var: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<crate::links::LinkKey>, ConfigError> {
    let key = "server.link_key_env";
    let (var, text) = match var {
        Some(var) => (var, read_secret(env, key, var)?),
        None => match env(crate::links::DEFAULT_KEY_ENV) {
            Some(text) if !text.is_empty() => (crate::links::DEFAULT_KEY_ENV, text),
            _ => return Ok(None),
        },
    };
    crate::links::LinkKey::from_base64(&text)
        .map(Some)
        .map_err(|reason| ConfigError::new(key, format!("the key in ${var} {reason}")))
}

fn partner_config(
    name: &str,
    p: FilePartner,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PartnerConfig, ConfigError> {
    let key = |k: &str| format!("partners.{name}.{k}");
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ConfigError::new(
            format!("partners.{name}"),
            "a partner name is 1 to 64 letters, digits, '-' or '_'",
        ));
    }
    if !p.url.is_empty() || p.adapter == "webhook" {
        check_url(&key("url"), &p.url, p.allow_private)?;
    }
    if let Some(token_url) = &p.token_url {
        check_url(&key("token_url"), token_url, p.allow_private)?;
    }
    if !p.gateways.is_empty() && p.adapter != "alexa" {
        return Err(ConfigError::new(
            key("gateways"),
            format!(
                "only Alexa partners route links by region; the {} adapter takes url",
                p.adapter
            ),
        ));
    }
    for (region, url) in &p.gateways {
        check_url(&key(&format!("gateways.{region}")), url, p.allow_private)?;
    }
    let secret_of = |name: &str, var: &Option<String>| match var {
        Some(var) => read_secret(env, &key(name), var).map(Some),
        None => Ok(None),
    };
    let secret = secret_of("secret_env", &p.secret_env)?;
    let client_id = secret_of("client_id_env", &p.client_id_env)?;
    let client_secret = secret_of("client_secret_env", &p.client_secret_env)?;
    let service_account_key = secret_of("service_account_key_env", &p.service_account_key_env)?;
    let rate = match p.rate {
        None => None,
        Some(r) => {
            if r.per_second == 0 {
                return Err(ConfigError::new(
                    key("rate.per_second"),
                    "must be at least 1",
                ));
            }
            let burst = r.burst.unwrap_or(r.per_second.clamp(1, 50));
            if burst == 0 {
                return Err(ConfigError::new(key("rate.burst"), "must be at least 1"));
            }
            Some(Rate {
                per_second: r.per_second,
                burst,
            })
        }
    };
    if p.max_in_flight == 0 || p.max_in_flight > 10_000 {
        return Err(ConfigError::new(
            key("max_in_flight"),
            "must be between 1 and 10000",
        ));
    }
    if p.timeout_ms == 0 {
        return Err(ConfigError::new(key("timeout_ms"), "must be at least 1"));
    }
    let r = p.retry;
    if r.initial_ms == 0 {
        return Err(ConfigError::new(
            key("retry.initial_ms"),
            "must be at least 1",
        ));
    }
    if !(r.multiplier.is_finite() && r.multiplier >= 1.0) {
        return Err(ConfigError::new(
            key("retry.multiplier"),
            "must be a number of at least 1.0",
        ));
    }
    if r.max_interval_ms < r.initial_ms {
        return Err(ConfigError::new(
            key("retry.max_interval_ms"),
            "must be at least retry.initial_ms",
        ));
    }
    if r.max_attempts == Some(0) {
        return Err(ConfigError::new(
            key("retry.max_attempts"),
            "must be at least 1",
        ));
    }
    let retry = RetryPolicy {
        initial_ms: r.initial_ms,
        multiplier: r.multiplier,
        max_interval_ms: r.max_interval_ms,
        max_age_ms: parse_duration(&key("retry.max_age"), &r.max_age)?.as_millis() as u64,
        critical_max_age_ms: parse_duration(&key("retry.critical_max_age"), &r.critical_max_age)?
            .as_millis() as u64,
        max_attempts: r.max_attempts,
    };
    let b = p.breaker;
    let breaker = BreakerPolicy {
        failures: b.failures,
        cool_down: parse_duration(&key("breaker.cool_down"), &b.cool_down)?,
        max_cool_down: parse_duration(&key("breaker.max_cool_down"), &b.max_cool_down)?,
    };
    if breaker.cool_down.is_zero() {
        return Err(ConfigError::new(
            key("breaker.cool_down"),
            "must be longer than zero",
        ));
    }
    if breaker.max_cool_down < breaker.cool_down {
        return Err(ConfigError::new(
            key("breaker.max_cool_down"),
            "must be at least breaker.cool_down",
        ));
    }
    check_permanent_statuses(
        &key("permanent_statuses"),
        &p.adapter,
        &p.permanent_statuses,
    )?;
    let settings = adapters::PartnerSettings {
        name: name.to_string(),
        url: p.url.clone(),
        secret,
        client_id,
        client_secret,
        token_url: p.token_url.clone(),
        service_account_key,
        permanent_statuses: p.permanent_statuses.clone(),
        gateways: p.gateways.clone(),
    };
    // Build it once now so a bad secret or unknown adapter fails at start.
    let adapter = adapters::build_adapter(&p.adapter, &settings)
        .map_err(|e| ConfigError::new(key(e.key), e.reason))?;
    let keep_alive = keep_alive(
        &key,
        p.refresh_token_lifetime.as_deref(),
        p.refresh_ahead.as_deref(),
        adapter.refresh_token_lifetime(),
    )?;
    Ok(PartnerConfig {
        name: name.to_string(),
        adapter: settings,
        adapter_kind: p.adapter,
        rate,
        max_in_flight: p.max_in_flight,
        adaptive_concurrency: p.concurrency == Concurrency::Adaptive,
        ordered_per_device: p.ordering == DeviceOrdering::PerDevice,
        coalesce_state: p.coalesce_state,
        timeout: Duration::from_millis(p.timeout_ms),
        allow_private: p.allow_private,
        retry,
        breaker,
        subscribe: p.subscribe,
        keep_alive,
    })
}

/// A partner's keep-alive from its `refresh_token_lifetime` and
/// `refresh_ahead`, the adapter's documented lifetime as the default.
fn keep_alive(
    key: &dyn Fn(&str) -> String,
    lifetime: Option<&str>,
    ahead: Option<&str>,
    platform_lifetime: Option<Duration>,
) -> Result<Option<KeepAlive>, ConfigError> {
    let lifetime = match lifetime {
        Some("off") => None,
        Some(text) => {
            let lifetime = parse_duration(&key("refresh_token_lifetime"), text)?;
            if lifetime.is_zero() {
                return Err(ConfigError::new(
                    key("refresh_token_lifetime"),
                    "must be longer than zero (or \"off\")",
                ));
            }
            Some(lifetime)
        }
        None => platform_lifetime,
    };
    let Some(lifetime) = lifetime else {
        if ahead.is_some() {
            return Err(ConfigError::new(
                key("refresh_ahead"),
                "this partner has no refresh token lifetime to refresh ahead of; \
                 set refresh_token_lifetime too",
            ));
        }
        return Ok(None);
    };
    let ahead = match ahead {
        Some(text) => parse_duration(&key("refresh_ahead"), text)?,
        None => DEFAULT_REFRESH_AHEAD,
    };
    if ahead.is_zero() || ahead >= lifetime {
        return Err(ConfigError::new(
            key("refresh_ahead"),
            format!(
                "must be longer than zero and shorter than the refresh token lifetime ({})",
                humantime::format_duration(lifetime)
            ),
        ));
    }
    Ok(Some(KeepAlive { lifetime, ahead }))
}

/// `text` as an http(s) URL a partner may be sent to: an IP literal (or
/// `localhost`) only where the outbound address policy allows it. The error names `key`.
pub(crate) fn check_url(key: &str, text: &str, allow_private: bool) -> Result<(), ConfigError> {
    let url = url::Url::parse(text)
        .map_err(|e| ConfigError::new(key, format!("{text:?} is not a URL ({e})")))?;
    if url.scheme() != "https" && url.scheme() != "http" {
        return Err(ConfigError::new(key, "must be http:// or https://"));
    }
    // The same policy every connection is put to; checked here too so a
    // config or a link naming a refused address is an error at once.
    if let Some(ip) = url_ip(&url) {
        crate::outbound::check(ip, allow_private)
            .map_err(|refused| ConfigError::new(key, refused.to_string()))?;
    }
    Ok(())
}

fn url_ip(url: &url::Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
        url::Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
        url::Host::Domain(d) if d.eq_ignore_ascii_case("localhost") => {
            Some(IpAddr::from([127, 0, 0, 1]))
        }
        url::Host::Domain(_) => None,
    }
}

fn read_secret(
    env: &dyn Fn(&str) -> Option<String>,
    key: &str,
    var: &str,
) -> Result<String, ConfigError> {
    match env(var) {
        Some(v) if !v.is_empty() => Ok(v),
        Some(_) => Err(ConfigError::new(
            key,
            format!("the environment variable {var} is empty"),
        )),
        None => Err(ConfigError::new(
            key,
            format!("the environment variable {var} is not set"),
        )),
    }
}

fn parse_duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text).map_err(|e| {
        ConfigError::new(
            key,
            format!("{text:?} is not a duration like \"72h\" or \"500ms\" ({e})"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

    const LINK_KEY: &str = "aGVyYWxkLXRlc3QtbGluay1rZXktMzItYnl0ZXMhISE=";

    fn env(name: &str) -> Option<String> {
        match name {
            "ACME_SECRET" => Some(SECRET.into()),
            "DOOR_TOKEN" => Some("door-service-token-0123456789".into()),
            "SHORT_TOKEN" => Some("short".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, &env)
    }

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:0"
data_dir = "/tmp/x"

[[tokens]]
name = "door-service"
role = "ingest"
token_env = "DOOR_TOKEN"

[partners.acme]
adapter = "webhook"
url = "https://hooks.acme.example/herald"
secret_env = "ACME_SECRET"
rate = { per_second = 200, burst = 50 }
max_in_flight = 32
timeout_ms = 5000
retry = { initial_ms = 1000, multiplier = 2.0, max_interval_ms = 600000, max_age = "72h" }
"#;

    fn keep_alive_of(keys: &str) -> Result<Option<KeepAlive>, ConfigError> {
        let text = format!(
            // Any set variable serves as the OAuth client here.
            "[partners.st]\nadapter = \"smartthings\"\n\
             client_id_env = \"DOOR_TOKEN\"\nclient_secret_env = \"ACME_SECRET\"\n{keys}\n"
        );
        let env = |name: &str| match name {
            "HERALD_LINK_KEY" => Some(LINK_KEY.to_string()),
            other => env(other),
        };
        Ok(Config::parse(&text, &env)?
            .partner("st")
            .expect("st")
            .keep_alive)
    }

    #[test]
    fn keep_alive_defaults_to_the_platforms_lifetime_and_a_week_ahead() {
        let day = Duration::from_secs(86_400);
        assert_eq!(
            keep_alive_of("").expect("valid"),
            Some(KeepAlive {
                lifetime: 30 * day,
                ahead: 7 * day
            })
        );
        let config = parse(GOOD).expect("valid");
        assert_eq!(config.partner("acme").expect("acme").keep_alive, None);
        let set = keep_alive_of("refresh_token_lifetime = \"10d\"\nrefresh_ahead = \"2d\"")
            .expect("valid")
            .expect("on");
        assert_eq!(set.refresh_at_age(), 8 * day);
        assert_eq!(
            keep_alive_of("refresh_token_lifetime = \"off\"").expect("valid"),
            None
        );
    }

    #[test]
    fn keep_alive_errors_name_the_key() {
        for (keys, at, says) in [
            (
                "refresh_token_lifetime = \"soon\"",
                "partners.st.refresh_token_lifetime",
                "not a duration",
            ),
            (
                "refresh_token_lifetime = \"0s\"",
                "partners.st.refresh_token_lifetime",
                "longer than zero",
            ),
            (
                "refresh_ahead = \"30d\"",
                "partners.st.refresh_ahead",
                "shorter than the refresh token lifetime (30days)",
            ),
            (
                "refresh_ahead = \"0s\"",
                "partners.st.refresh_ahead",
                "longer than zero",
            ),
            (
                "refresh_token_lifetime = \"off\"\nrefresh_ahead = \"1d\"",
                "partners.st.refresh_ahead",
                "no refresh token lifetime",
            ),
        ] {
            let err = keep_alive_of(keys).expect_err(keys);
            let shown = err.to_string();
            assert!(
                shown.contains(at) && shown.contains(says),
                "{keys}: {shown}"
            );
        }
    }

    #[test]
    fn the_contracts_example_parses() {
        let config = parse(GOOD).expect("valid");
        let acme = config.partner("acme").expect("acme");
        assert_eq!(
            acme.rate,
            Some(Rate {
                per_second: 200,
                burst: 50
            })
        );
        assert_eq!(acme.retry.max_age_ms, 72 * 3600 * 1000);
        assert_eq!(config.tokens[0].role, Role::Ingest);
    }

    #[test]
    fn the_documented_example_file_parses() {
        let env = |name: &str| match name {
            "ACME_WEBHOOK_SECRET" => Some(SECRET.to_string()),
            "HERALD_LINK_KEY" => Some(LINK_KEY.to_string()),
            other => Some(format!("{other}-secret-value")),
        };
        let config =
            Config::parse(include_str!("../fixtures/config/herald.toml"), &env).expect("valid");
        assert_eq!(config.tokens.len(), 2);
        assert!(config
            .partner("acme")
            .expect("acme")
            .subscribes_to("door.forced_open"));
        let st = config.partner("smartthings").expect("smartthings");
        assert_eq!(
            st.adapter.client_id.as_deref(),
            Some("ST_CLIENT_ID-secret-value")
        );
        assert!(config.server.link_key.is_some());
    }

    #[test]
    fn platform_partners_need_a_link_key_and_bad_keys_are_named() {
        let platform = |server: &str, env: &dyn Fn(&str) -> Option<String>| {
            Config::parse(
                &format!(
                    "[server]\n{server}\n[partners.st]\nadapter = \"smartthings\"\nclient_id_env = \"ID\"\nclient_secret_env = \"SECRET\"\n"
                ),
                env,
            )
        };
        let with = |key: &'static str| {
            move |name: &str| match name {
                "ID" | "SECRET" => Some("value".to_string()),
                "HERALD_LINK_KEY" | "OTHER_KEY" => Some(key.to_string()),
                _ => None,
            }
        };
        let none = |name: &str| match name {
            "ID" | "SECRET" => Some("value".to_string()),
            _ => None,
        };
        let err = platform("", &none).expect_err("no key");
        assert_eq!(err.key, "server.link_key_env");
        assert!(
            err.reason.contains("HERALD_LINK_KEY") && err.reason.contains("\"st\""),
            "{err}"
        );
        assert!(platform("", &with(LINK_KEY)).is_ok());
        assert!(platform("link_key_env = \"OTHER_KEY\"", &with(LINK_KEY)).is_ok());
        let err = platform("link_key_env = \"MISSING\"", &with(LINK_KEY)).expect_err("unset");
        assert_eq!(err.key, "server.link_key_env");
        assert!(err.reason.contains("MISSING is not set"), "{err}");
        let err = platform("", &with("c2hvcnQ=")).expect_err("short");
        assert!(err.reason.contains("5 bytes"), "{err}");
        let err = platform("", &with("not*base64")).expect_err("not base64");
        assert!(err.reason.contains("not base64"), "{err}");
        // Without its OAuth client a link's token could not be refreshed:
        // refused at start, not at the first expiry.
        let err = Config::parse(
            "[partners.st]\nadapter = \"smartthings\"\nclient_id_env = \"ID\"\n",
            &with(LINK_KEY),
        )
        .expect_err("no client secret");
        assert_eq!(err.key, "partners.st.client_secret_env");
        let err = Config::parse("[partners.k]\nadapter = \"kakao\"\n", &with(LINK_KEY))
            .expect_err("no client");
        assert_eq!(err.key, "partners.k.client_id_env");
        // Without its OAuth client a thinq partner cannot mint tokens.
        let err = Config::parse(
            "[partners.lg]\nadapter = \"thinq\"\nurl = \"https://thinq.example\"\n",
            &with(LINK_KEY),
        )
        .expect_err("no client");
        assert_eq!(err.key, "partners.lg.client_id_env");
        // A plain webhook still needs its url.
        let err = Config::parse(
            "[partners.hook]\nadapter = \"webhook\"\nsecret_env = \"ID\"\n",
            &with(LINK_KEY),
        )
        .expect_err("no url");
        assert_eq!(err.key, "partners.hook.url");
    }

    #[test]
    fn the_embedded_default_parses() {
        let config = parse(EMBEDDED_DEFAULT).expect("valid");
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
        assert!(config.partners.is_empty());
    }

    fn error_for(from: &str, to: &str) -> ConfigError {
        assert!(GOOD.contains(from), "{from}");
        parse(&GOOD.replace(from, to)).expect_err("must be rejected")
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "per_second = 200",
                "per_second = 0",
                "partners.acme.rate.per_second",
            ),
            (
                "per_second = 200",
                "per_second = -3",
                "partners.acme.rate.per_second",
            ),
            (
                "per_second = 200",
                "per_secnd = 200",
                "partners.acme.rate.per_secnd",
            ),
            (
                "adapter = \"webhook\"",
                "adapter = \"pigeon\"",
                "partners.acme.adapter",
            ),
            (
                "https://hooks.acme.example/herald",
                "not a url",
                "partners.acme.url",
            ),
            (
                "https://hooks.acme.example/herald",
                "http://127.0.0.1:9/x",
                "partners.acme.url",
            ),
            ("ACME_SECRET", "MISSING_VAR", "partners.acme.secret_env"),
            ("ACME_SECRET", "EMPTY", "partners.acme.secret_env"),
            ("DOOR_TOKEN", "SHORT_TOKEN", "tokens[0].token_env"),
            ("role = \"ingest\"", "role = \"admin\"", "tokens[0].role"),
            (
                "max_age = \"72h\"",
                "max_age = \"forever\"",
                "partners.acme.retry.max_age",
            ),
            (
                "max_age = \"72h\"",
                "max_age = \"72h\", critical_max_age = \"a while\"",
                "partners.acme.retry.critical_max_age",
            ),
            (
                "multiplier = 2.0",
                "multiplier = 0.5",
                "partners.acme.retry.multiplier",
            ),
            (
                "max_interval_ms = 600000",
                "max_interval_ms = 10",
                "partners.acme.retry.max_interval_ms",
            ),
            (
                "max_in_flight = 32",
                "max_in_flight = 0",
                "partners.acme.max_in_flight",
            ),
            (
                "max_in_flight = 32",
                "max_in_flight = 32\nconcurrency = \"elastic\"",
                "partners.acme.concurrency",
            ),
            (
                "max_in_flight = 32",
                "max_in_flight = 32\nordering = \"per_user\"",
                "partners.acme.ordering",
            ),
            (
                "max_in_flight = 32",
                "max_in_flight = 32\npermanent_statuses = [400, 410]",
                "partners.acme.permanent_statuses",
            ),
            (
                "max_in_flight = 32",
                "max_in_flight = 32\npermanent_statuses = [204]",
                "partners.acme.permanent_statuses",
            ),
            (
                "max_in_flight = 32",
                "max_in_flight = 32\ngateways = { na = \"https://gw.example/v3/events\" }",
                "partners.acme.gateways",
            ),
            (
                "timeout_ms = 5000",
                "timeout_ms = \"soon\"",
                "partners.acme.timeout_ms",
            ),
            (
                "listen = \"127.0.0.1:0\"",
                "listen = \"localhost\"",
                "server.listen",
            ),
            ("[server]", "[sever]", "sever"),
            (
                "data_dir = \"/tmp/x\"",
                "data_dir = \"/tmp/x\"\nmin_free_disk = \"lots\"",
                "server.min_free_disk",
            ),
            (
                "data_dir = \"/tmp/x\"",
                "data_dir = \"/tmp/x\"\nmin_free_disk = 5",
                "server.min_free_disk",
            ),
            (
                "data_dir = \"/tmp/x\"",
                "data_dir = \"/tmp/x\"\ncritical_disk_reserve = \"120%\"",
                "server.critical_disk_reserve",
            ),
        ];
        for (from, to, key) in cases {
            let err = error_for(from, to);
            assert_eq!(err.key, *key, "{to}: {err}");
            assert!(!err.reason.is_empty());
        }
    }

    #[test]
    fn disk_limits_are_sizes_or_shares_with_the_reserve_inside_the_limit() {
        use crate::disk::Limit;
        let server = |keys: &str| parse(&format!("[server]\n{keys}\n"));
        let config = parse(EMBEDDED_DEFAULT).expect("valid");
        assert_eq!(config.server.disk.min_free, Limit::Percent(5.0));
        assert_eq!(config.server.disk.critical_reserve, None);
        let config = server("min_free_disk = \"256MiB\"\ncritical_disk_reserve = \"64 MiB\"")
            .expect("valid");
        assert_eq!(config.server.disk.min_free, Limit::Bytes(256 << 20));
        assert_eq!(
            config.server.disk.critical_reserve,
            Some(Limit::Bytes(64 << 20))
        );
        // A size against a share depends on the filesystem: checked at start.
        assert!(server("min_free_disk = \"5%\"\ncritical_disk_reserve = \"1GiB\"").is_ok());
        assert!(server("min_free_disk = \"0\"\ncritical_disk_reserve = \"0\"").is_ok());

        let err = server("min_free_disk = \"5%\"\ncritical_disk_reserve = \"5%\"")
            .expect_err("reserve as large as the limit");
        assert_eq!(err.key, "server.critical_disk_reserve");
        assert_eq!(
            err.reason,
            "5% is not below server.min_free_disk (5%): the reserve is the part of \
             min_free_disk that critical events may still use"
        );
        let err = server("min_free_disk = \"0\"\ncritical_disk_reserve = \"1MiB\"")
            .expect_err("a reserve with the check off");
        assert_eq!(err.key, "server.critical_disk_reserve");
        let err = server("min_free_disk = \"256 parsecs\"").expect_err("bad unit");
        assert_eq!(err.key, "server.min_free_disk");
        assert_eq!(
            err.reason,
            "\"256 parsecs\" is not a size like \"256MiB\" or a share of the filesystem like \"5%\""
        );
        let err = server("min_free_disk = \"100%\"").expect_err("all of it");
        assert!(err.reason.contains("under 100%"), "{err}");
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let err = parse("[server]\nlisten = \n").expect_err("must fail");
        assert!(err.reason.contains("line 2"), "{err}");
    }

    #[test]
    fn no_tokens_means_loopback_only() {
        let err = parse("[server]\nlisten = \"0.0.0.0:8080\"\n").expect_err("must fail");
        assert_eq!(err.key, "server.listen");
        assert!(err.reason.contains("no [[tokens]]"), "{err}");
    }

    #[test]
    fn subscriptions_match_exactly_or_by_prefix() {
        let mut config = parse(GOOD).expect("valid");
        let acme = &mut config.partners[0];
        acme.subscribe = vec!["door.*".into(), "temp.high".into()];
        assert!(acme.subscribes_to("door.forced_open"));
        assert!(acme.subscribes_to("temp.high"));
        assert!(!acme.subscribes_to("temp.highest"));
        assert!(!acme.subscribes_to("motion"));
    }
}
