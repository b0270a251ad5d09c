//! `herald dlq ...`: the operator commands, a thin client of a running
//! herald's admin API, for on-call at a terminal.
//!
//! Each command makes one request and prints the answer's JSON. A problem
//! document is printed as its `detail` (and field) on stderr, with a
//! non-zero exit, so scripts can tell.

use std::process::ExitCode;

use clap::Subcommand;

/// Which dead letters a list or a bulk replay takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Filters {
    #[arg(long)]
    pub partner: Option<String>,
    #[arg(long = "type")]
    pub event_type: Option<String>,
    #[arg(long, value_parser = ["critical", "normal"])]
    pub priority: Option<String>,
    /// RFC 3339: only letters that died at or after it.
    #[arg(long)]
    pub since: Option<String>,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub limit: Option<u64>,
}

impl Filters {
    fn query(&self) -> Vec<(&'static str, String)> {
        [
            ("partner", self.partner.clone()),
            ("type", self.event_type.clone()),
            ("priority", self.priority.clone()),
            ("since", self.since.clone()),
            ("limit", self.limit.map(|l| l.to_string())),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }
}

#[derive(Debug, Subcommand)]
pub enum Dlq {
    /// List dead letters, oldest first.
    List {
        #[command(flatten)]
        filters: Filters,
        /// The `next` cursor a previous page printed.
        #[arg(long)]
        after: Option<String>,
    },
    /// Show one dead letter: the event, every attempt, why it died.
    Show { id: String },
    /// Replay one dead letter, or with --all every one the filters select.
    Replay {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        filters: Filters,
    },
    /// Remove one dead letter for good.
    Purge { id: String },
}

/// Where the running herald is and how to authenticate to it.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The running herald's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The environment variable holding an operator token (none: no token,
    /// for a loopback herald without [[tokens]]).
    #[arg(long, value_name = "VAR")]
    pub token_env: Option<String>,
}

pub async fn dlq(target: &Target, command: &Dlq) -> ExitCode {
    crate::dispatch::client::install_crypto_provider();
    let token = match &target.token_env {
        None => None,
        Some(var) => match std::env::var(var) {
            Ok(token) if !token.is_empty() => Some(token),
            _ => {
                eprintln!("herald: the environment variable {var} (--token-env) is not set");
                return ExitCode::from(2);
            }
        },
    };
    let base = target.url.trim_end_matches('/');
    let (method, path, query) = match command {
        Dlq::List { filters, after } => {
            let mut query = filters.query();
            if let Some(after) = after {
                query.push(("after", after.clone()));
            }
            (reqwest::Method::GET, "/v1/dead-letters".to_string(), query)
        }
        Dlq::Show { id } => (
            reqwest::Method::GET,
            format!("/v1/dead-letters/{id}"),
            Vec::new(),
        ),
        Dlq::Replay {
            id: Some(_),
            filters,
            ..
        } if !filters.query().is_empty() => {
            eprintln!(
                "herald: filters select letters for `replay --all`; with an id they mean nothing"
            );
            return ExitCode::from(2);
        }
        Dlq::Replay { id: Some(id), .. } => (
            reqwest::Method::POST,
            format!("/v1/dead-letters/{id}/replay"),
            Vec::new(),
        ),
        Dlq::Replay {
            id: None, filters, ..
        } => (
            reqwest::Method::POST,
            "/v1/dead-letters/replay".to_string(),
            filters.query(),
        ),
        Dlq::Purge { id } => (
            reqwest::Method::DELETE,
            format!("/v1/dead-letters/{id}"),
            Vec::new(),
        ),
    };
    let client = match reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("herald: cannot build the HTTP client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let parsed = match query.is_empty() {
        true => url::Url::parse(&format!("{base}{path}")),
        false => url::Url::parse_with_params(&format!("{base}{path}"), &query),
    };
    let url = match parsed {
        Ok(url) => url,
        Err(e) => {
            eprintln!("herald: {base:?} (--url) is not a URL: {e}");
            return ExitCode::from(2);
        }
    };
    let mut request = client.request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("herald: cannot reach {base}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let status = response.status();
    let body = response.bytes().await.unwrap_or_default();
    let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    if status.is_success() {
        match json {
            Some(json) => println!(
                "{}",
                serde_json::to_string_pretty(&json).unwrap_or_default()
            ),
            None if status == reqwest::StatusCode::NO_CONTENT => println!("done"),
            None => println!("{}", String::from_utf8_lossy(&body)),
        }
        return ExitCode::SUCCESS;
    }
    let detail = json
        .as_ref()
        .and_then(|j| j["detail"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    match json.as_ref().and_then(|j| j["field"].as_str()) {
        Some(field) => eprintln!("herald: {status}: {detail} (at {field})"),
        None => eprintln!("herald: {status}: {detail}"),
    }
    ExitCode::FAILURE
}
