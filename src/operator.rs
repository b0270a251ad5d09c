//! The operator commands (`herald dlq`, `replays`, `events`, `partners`,
//! `audit`): a thin client of a running herald's admin API, for on-call at
//! a terminal.
//!
//! Each command makes one request and prints the answer as an aligned
//! table (comfy-table), or with `--json` as the answer's JSON, for
//! scripts. Where herald is (`--url`, `HERALD_URL`) and the operator token
//! (`HERALD_TOKEN`, or the variable `--token-env` names) come from flags or
//! the environment. Any failure is one line on stderr and a non-zero exit:
//! 2 for a mistake on the command line, 1 for a herald that cannot be
//! reached or refuses (a problem document is shown by its `detail`).

use std::process::ExitCode;

use clap::Subcommand;
use comfy_table::{presets, Table};
use serde_json::{json, Value};

/// Where the running herald is, how to authenticate to it, how to print.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The running herald's base URL.
    #[arg(
        long,
        env = "HERALD_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// The environment variable holding an operator token (default
    /// HERALD_TOKEN; with neither set: no token, for a loopback herald
    /// without [[tokens]]).
    #[arg(long, value_name = "VAR", global = true)]
    pub token_env: Option<String>,
    /// Print the answer's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Which dead letters a command takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Filters {
    #[arg(long)]
    pub partner: Option<String>,
    #[arg(long = "type")]
    pub event_type: Option<String>,
    #[arg(long, value_parser = ["critical", "normal"])]
    pub priority: Option<String>,
    #[arg(long = "device")]
    pub device_id: Option<String>,
    /// Letters whose reason contains this text.
    #[arg(long)]
    pub reason: Option<String>,
    /// RFC 3339: only letters that died at or after it.
    #[arg(long)]
    pub since: Option<String>,
    /// RFC 3339: only letters that died before it.
    #[arg(long)]
    pub until: Option<String>,
    /// Only letters already replayed (`true`) or not yet (`false`).
    #[arg(long, value_parser = ["true", "false"])]
    pub replayed: Option<String>,
}

impl Filters {
    fn pairs(&self) -> Vec<(&'static str, String)> {
        [
            ("partner", &self.partner),
            ("type", &self.event_type),
            ("priority", &self.priority),
            ("device_id", &self.device_id),
            ("reason", &self.reason),
            ("since", &self.since),
            ("until", &self.until),
            ("replayed", &self.replayed),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect()
    }

    /// The filters as a bulk request's body fields.
    fn body(&self) -> serde_json::Map<String, Value> {
        self.pairs()
            .into_iter()
            .map(|(k, v)| {
                let value = match k {
                    // A boolean in a body, as the API takes it.
                    "replayed" => Value::Bool(v == "true"),
                    _ => Value::String(v),
                };
                (k.to_string(), value)
            })
            .collect()
    }
}

#[derive(Debug, Subcommand)]
pub enum Dlq {
    /// List dead letters, oldest first.
    List {
        #[command(flatten)]
        filters: Filters,
        /// The cursor a previous page printed.
        #[arg(long)]
        after: Option<String>,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
        limit: Option<u64>,
    },
    /// Show one dead letter: the event, every attempt, why it died.
    Show { id: String },
    /// Replay one dead letter, or with --all every one the filters select
    /// (a durable job, worked at --rate letters a second).
    Replay {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        filters: Filters,
        /// Say how many would be replayed, and of which partners; change nothing.
        #[arg(long, requires = "all")]
        dry_run: bool,
        /// Letters a second the job replays (herald's default when absent).
        #[arg(long, requires = "all")]
        rate: Option<u32>,
    },
    /// Remove one dead letter for good, or with --all every one the
    /// filters select.
    Purge {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        filters: Filters,
        /// Say how many would be purged; change nothing.
        #[arg(long, requires = "all")]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum Events {
    /// Show one event: each delivery's state and attempts.
    Show { id: String },
}

/// One command of the operator CLI.
#[derive(Debug)]
pub enum Command {
    Dlq(Dlq),
    /// One replay job, or all of them (`None`).
    Replays(Option<String>),
    Events(Events),
    Partners,
    Audit {
        after: Option<String>,
        limit: Option<u64>,
    },
}

/// Why a command failed: the one line to print, and the exit code.
struct Failure {
    line: String,
    code: u8,
}

impl Failure {
    fn usage(line: impl Into<String>) -> Failure {
        Failure {
            line: line.into(),
            code: 2,
        }
    }
    fn failed(line: impl Into<String>) -> Failure {
        Failure {
            line: line.into(),
            code: 1,
        }
    }
}

/// Runs `command` against the herald `target` names.
pub async fn run(target: &Target, command: &Command) -> ExitCode {
    match execute(target, command).await {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            // One line, whatever the cause carried.
            let line = failure.line.replace(['\n', '\r'], " ");
            eprintln!("herald: {line}");
            ExitCode::from(failure.code)
        }
    }
}

/// A request to make: method, path, query, body.
struct Call {
    method: reqwest::Method,
    path: String,
    query: Vec<(&'static str, String)>,
    body: Option<Value>,
}

impl Call {
    fn get(path: impl Into<String>) -> Call {
        Call {
            method: reqwest::Method::GET,
            path: path.into(),
            query: Vec::new(),
            body: None,
        }
    }
    fn post(path: impl Into<String>, body: Option<Value>) -> Call {
        Call {
            method: reqwest::Method::POST,
            path: path.into(),
            query: Vec::new(),
            body,
        }
    }
}

async fn execute(target: &Target, command: &Command) -> Result<String, Failure> {
    let call = plan(command)?;
    let answer = send(target, call).await?;
    if target.json {
        return Ok(match answer {
            Value::Null => String::new(),
            json => format!(
                "{}\n",
                serde_json::to_string_pretty(&json).unwrap_or_default()
            ),
        });
    }
    Ok(render(command, &answer))
}

/// The request a command makes; a command line that means nothing is
/// refused before anything is sent.
fn plan(command: &Command) -> Result<Call, Failure> {
    Ok(match command {
        Command::Dlq(Dlq::List {
            filters,
            after,
            limit,
        }) => {
            let mut call = Call::get("/v1/dead-letters");
            call.query = filters.pairs();
            if let Some(after) = after {
                call.query.push(("after", after.clone()));
            }
            if let Some(limit) = limit {
                call.query.push(("limit", limit.to_string()));
            }
            call
        }
        Command::Dlq(Dlq::Show { id }) => Call::get(format!("/v1/dead-letters/{}", segment(id)?)),
        Command::Dlq(Dlq::Replay {
            id: Some(_),
            filters,
            ..
        })
        | Command::Dlq(Dlq::Purge {
            id: Some(_),
            filters,
            ..
        }) if !filters.pairs().is_empty() => {
            return Err(Failure::usage(
                "filters select letters for --all; with an id they mean nothing",
            ))
        }
        Command::Dlq(Dlq::Replay { id: Some(id), .. }) => {
            Call::post(format!("/v1/dead-letters/{}/replay", segment(id)?), None)
        }
        Command::Dlq(Dlq::Replay {
            id: None,
            filters,
            dry_run,
            rate,
            ..
        }) => {
            let mut body = filters.body();
            body.insert("dry_run".into(), Value::Bool(*dry_run));
            if let Some(rate) = rate {
                body.insert("rate_per_second".into(), json!(rate));
            }
            Call::post("/v1/replays", Some(Value::Object(body)))
        }
        Command::Dlq(Dlq::Purge { id: Some(id), .. }) => Call {
            method: reqwest::Method::DELETE,
            path: format!("/v1/dead-letters/{}", segment(id)?),
            query: Vec::new(),
            body: None,
        },
        Command::Dlq(Dlq::Purge {
            id: None,
            filters,
            dry_run,
            ..
        }) => {
            let mut body = filters.body();
            body.insert("dry_run".into(), Value::Bool(*dry_run));
            Call::post("/v1/dead-letters/purge", Some(Value::Object(body)))
        }
        Command::Replays(None) => Call::get("/v1/replays"),
        Command::Replays(Some(id)) => Call::get(format!("/v1/replays/{}", segment(id)?)),
        Command::Events(Events::Show { id }) => Call::get(format!("/v1/events/{}", segment(id)?)),
        Command::Partners => Call::get("/v1/partners"),
        Command::Audit { after, limit } => {
            let mut call = Call::get("/v1/audit");
            if let Some(after) = after {
                call.query.push(("after", after.clone()));
            }
            if let Some(limit) = limit {
                call.query.push(("limit", limit.to_string()));
            }
            call
        }
    })
}

/// An id as one path segment: herald's ids are UUIDs, and anything that
/// would change the path is refused here rather than sent.
fn segment(id: &str) -> Result<&str, Failure> {
    match !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        true => Ok(id),
        false => Err(Failure::usage(format!("{id:?} is not an id"))),
    }
}

/// The operator token: the variable `--token-env` names, else
/// `HERALD_TOKEN`, else none.
fn token(target: &Target) -> Result<Option<String>, Failure> {
    match &target.token_env {
        Some(var) => match std::env::var(var) {
            Ok(token) if !token.is_empty() => Ok(Some(token)),
            _ => Err(Failure::usage(format!(
                "the environment variable {var} (--token-env) is not set"
            ))),
        },
        None => Ok(std::env::var("HERALD_TOKEN").ok().filter(|t| !t.is_empty())),
    }
}

/// The innermost cause of an error: what went wrong, without the layers
/// that only say where ("error sending request for url ...").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut inner = e;
    while let Some(next) = inner.source() {
        inner = next;
    }
    inner.to_string()
}

/// Makes the call; the answer's JSON (`Null` for an empty answer).
async fn send(target: &Target, call: Call) -> Result<Value, Failure> {
    crate::dispatch::client::install_crypto_provider();
    let token = token(target)?;
    let base = target.url.trim_end_matches('/');
    let url = match url::Url::parse(&format!("{base}{}", call.path)) {
        Ok(mut url) if matches!(url.scheme(), "http" | "https") => {
            if !call.query.is_empty() {
                url.query_pairs_mut().extend_pairs(&call.query);
            }
            url
        }
        Ok(_) => {
            return Err(Failure::usage(format!(
                "{base:?} (--url, HERALD_URL) is not an http:// or https:// URL"
            )))
        }
        Err(e) => {
            return Err(Failure::usage(format!(
                "{base:?} (--url, HERALD_URL) is not a URL: {e}"
            )))
        }
    };
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| Failure::failed(format!("cannot build the HTTP client: {e}")))?;
    let mut request = client.request(call.method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = call.body {
        request = request
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.map_err(|e| {
        let why = match e.is_timeout() {
            true => "no answer within 30 s".to_string(),
            false => root_cause(&e),
        };
        Failure::failed(format!("cannot reach herald at {base}: {why}"))
    })?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| {
        Failure::failed(format!(
            "herald at {base} answered {status} but the body was cut off: {}",
            root_cause(&e)
        ))
    })?;
    let json: Option<Value> = serde_json::from_slice(&body).ok();
    if status.is_success() {
        return Ok(json.unwrap_or(Value::Null));
    }
    let detail = json
        .as_ref()
        .and_then(|j| j["detail"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
    if matches!(status.as_u16(), 401 | 403) {
        let var = target.token_env.as_deref().unwrap_or("HERALD_TOKEN");
        return Err(Failure::failed(format!(
            "herald at {base} refused the token ({status}: {detail}); set {var} to an operator token of this herald"
        )));
    }
    Err(Failure::failed(
        match json.as_ref().and_then(|j| j["field"].as_str()) {
            Some(field) if !field.is_empty() => format!("{status}: {detail} (at {field})"),
            _ => format!("{status}: {detail}"),
        },
    ))
}

/// A table with a header row, columns aligned, no borders.
fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header(header.to_vec());
    table
}

/// Field and value pairs, aligned, no header.
fn fields(rows: &[(&str, String)]) -> String {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    for (name, value) in rows {
        table.add_row(vec![name.to_string(), value.clone()]);
    }
    format!("{}\n", table.trim_fmt())
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// At most `max` characters of `s`, marked when cut.
fn clip(s: &str, max: usize) -> String {
    match s.chars().count() > max {
        true => format!("{}…", s.chars().take(max - 1).collect::<String>()),
        false => s.to_string(),
    }
}

/// A filter object as `key=value` words; `-` for none.
fn filter_words(filter: &Value) -> String {
    let words: Vec<String> = filter
        .as_object()
        .map(|f| f.iter().map(|(k, v)| format!("{k}={}", text(v))).collect())
        .unwrap_or_default();
    match words.is_empty() {
        true => "(all)".to_string(),
        false => words.join(" "),
    }
}

/// "1 dead letter", "2 dead letters": `count` is the answer's number.
fn letters(count: &Value) -> String {
    match count.as_u64() {
        Some(1) => "1 dead letter".to_string(),
        _ => format!("{} dead letters", text(count)),
    }
}

fn items(answer: &Value, key: &str) -> Vec<Value> {
    answer[key].as_array().cloned().unwrap_or_default()
}

fn with_table(table: Table) -> String {
    format!("{}\n", table.trim_fmt())
}

fn next_page(answer: &Value, how: &str) -> String {
    match answer["next"].as_str() {
        Some(next) => format!("more: {how} --after {next}\n"),
        None => String::new(),
    }
}

fn partner_counts(answer: &Value) -> String {
    let mut counts = table(&["PARTNER", "LETTERS"]);
    if let Some(partners) = answer["partners"].as_object() {
        for (name, count) in partners {
            counts.add_row(vec![name.clone(), text(count)]);
        }
    }
    with_table(counts)
}

/// How one cell of a table, or one value of a record, is read from an
/// object of herald's answer.
enum Cell {
    /// The field's value as text (`-` for none).
    Field(&'static str),
    /// A field of an object under the row: `("event", "id")`.
    Nested(&'static str, &'static str),
    /// The field's text, cut to at most so many characters.
    Clipped(&'static str, usize),
    /// A filter object as `key=value` words; `-` where there is none.
    Filter(&'static str),
    /// Worked out from the whole row.
    Computed(fn(&Value) -> String),
}

impl Cell {
    fn read(&self, row: &Value) -> String {
        match self {
            Cell::Field(key) => text(&row[key]),
            Cell::Nested(outer, key) => text(&row[outer][key]),
            Cell::Clipped(key, max) => clip(&text(&row[key]), *max),
            Cell::Filter(key) => match &row[key] {
                Value::Null => "-".to_string(),
                filter => filter_words(filter),
            },
            Cell::Computed(work_out) => work_out(row),
        }
    }
}

/// One line per row under the columns' headers, aligned.
fn rows_table(rows: &[Value], columns: &[(&str, Cell)]) -> String {
    let mut t = table(
        &columns
            .iter()
            .map(|(header, _)| *header)
            .collect::<Vec<_>>(),
    );
    for row in rows {
        t.add_row(
            columns
                .iter()
                .map(|(_, cell)| cell.read(row))
                .collect::<Vec<_>>(),
        );
    }
    with_table(t)
}

/// The rows under `key` of the answer as a table, or `none` when there
/// are none.
fn listing(answer: &Value, key: &str, none: &str, columns: &[(&str, Cell)]) -> String {
    let rows = items(answer, key);
    match rows.is_empty() {
        true => format!("{none}\n"),
        false => rows_table(&rows, columns),
    }
}

/// One object as name and value lines.
fn record(object: &Value, lines: &[(&str, Cell)]) -> String {
    fields(
        &lines
            .iter()
            .map(|(name, cell)| (*name, cell.read(object)))
            .collect::<Vec<_>>(),
    )
}

fn job_record(job: &Value) -> String {
    use Cell::*;
    record(
        job,
        &[
            ("id", Field("id")),
            ("state", Field("state")),
            ("filter", Filter("filter")),
            ("rate_per_second", Field("rate_per_second")),
            ("matched", Field("matched")),
            ("replayed", Field("replayed")),
            ("skipped", Field("skipped")),
            ("created_at", Field("created_at")),
            ("updated_at", Field("updated_at")),
            ("created_by", Field("created_by")),
        ],
    )
}

/// A delivery's last answer: its status and outcome, or why none came.
fn last_answer(delivery: &Value) -> String {
    delivery["history"]
        .as_array()
        .and_then(|h| h.last())
        .map(|a| match a["status"].as_u64() {
            Some(status) => format!("{status} {}", text(&a["outcome"])),
            None => clip(&text(&a["detail"]), 40),
        })
        .unwrap_or_else(|| "-".to_string())
}

/// A partner's alert reason, `-` while it has none.
fn alert_reason(partner: &Value) -> String {
    match &partner["alert"] {
        Value::Null => "-".to_string(),
        alert => clip(&text(&alert["reason"]), 50),
    }
}

/// The answer to `command` as a person reads it.
fn render(command: &Command, answer: &Value) -> String {
    use Cell::*;
    match command {
        Command::Dlq(Dlq::List { .. }) => {
            let columns = [
                ("ID", Field("id")),
                ("PARTNER", Field("partner")),
                ("TYPE", Field("type")),
                ("PRIORITY", Field("priority")),
                ("DEVICE", Field("device_id")),
                ("DIED AT", Field("died_at")),
                ("ATTEMPTS", Field("attempts")),
                ("REPLAYED AS", Field("replayed_as")),
                ("REASON", Clipped("reason", 60)),
            ];
            listing(answer, "items", "no dead letters match", &columns)
                + &next_page(answer, "herald dlq list")
        }
        Command::Dlq(Dlq::Show { .. }) => {
            let lines = [
                ("id", Field("id")),
                ("partner", Field("partner")),
                ("delivery_id", Field("delivery_id")),
                ("reason", Field("reason")),
                ("died_at", Field("died_at")),
                ("event", Nested("event", "id")),
                ("device_id", Nested("event", "device_id")),
                ("type", Nested("event", "type")),
                ("priority", Nested("event", "priority")),
                ("replayed_as", Field("replayed_as")),
                ("replayed_at", Field("replayed_at")),
            ];
            let attempts = [
                ("#", Field("number")),
                ("AT", Field("at")),
                ("STATUS", Field("status")),
                ("LATENCY MS", Field("latency_ms")),
                ("OUTCOME", Field("outcome")),
                ("DETAIL", Clipped("detail", 60)),
            ];
            record(answer, &lines) + "\n" + &rows_table(&items(answer, "attempts"), &attempts)
        }
        Command::Dlq(Dlq::Replay { id: Some(id), .. }) => format!(
            "dead letter {id} replayed as delivery {} (event {}, partner {})\n",
            text(&answer["delivery_id"]),
            text(&answer["event_id"]),
            text(&answer["partner"]),
        ),
        Command::Dlq(Dlq::Replay { id: None, .. }) if answer["dry_run"] == true => format!(
            "{} would be replayed (dry run: nothing changed)\n{}",
            letters(&answer["matched"]),
            partner_counts(answer)
        ),
        Command::Dlq(Dlq::Replay { id: None, .. }) => {
            let id = text(&answer["id"]);
            format!(
                "replay job {id} started: {} at up to {} a second\nfollow it: herald replays {id}\n",
                letters(&answer["matched"]),
                text(&answer["rate_per_second"]),
            )
        }
        Command::Dlq(Dlq::Purge { id: Some(id), .. }) => format!("dead letter {id} purged\n"),
        Command::Dlq(Dlq::Purge { id: None, .. }) if answer["dry_run"] == true => format!(
            "{} would be purged (dry run: nothing changed)\n{}",
            letters(&answer["matched"]),
            partner_counts(answer)
        ),
        Command::Dlq(Dlq::Purge { id: None, .. }) => {
            format!("{} purged\n", letters(&answer["purged"]))
        }
        Command::Replays(None) => {
            let columns = [
                ("ID", Field("id")),
                ("STATE", Field("state")),
                ("MATCHED", Field("matched")),
                ("REPLAYED", Field("replayed")),
                ("SKIPPED", Field("skipped")),
                ("RATE/S", Field("rate_per_second")),
                ("CREATED AT", Field("created_at")),
                ("BY", Field("created_by")),
                ("FILTER", Filter("filter")),
            ];
            listing(answer, "items", "no replay jobs", &columns)
        }
        Command::Replays(Some(_)) => job_record(answer),
        Command::Events(Events::Show { .. }) => {
            let lines = [
                ("id", Field("id")),
                ("device_id", Field("device_id")),
                ("type", Field("type")),
                ("priority", Field("priority")),
                ("occurred_at", Field("occurred_at")),
                ("received_at", Field("received_at")),
                ("idempotency_key", Field("idempotency_key")),
            ];
            let deliveries = [
                ("DELIVERY", Field("id")),
                ("PARTNER", Field("partner")),
                ("STATE", Field("state")),
                ("ATTEMPTS", Field("attempts")),
                ("NEXT ATTEMPT", Field("next_attempt_at")),
                ("DEAD LETTER", Field("dead_letter")),
                ("LAST ANSWER", Computed(last_answer)),
            ];
            record(answer, &lines) + "\n" + &rows_table(&items(answer, "deliveries"), &deliveries)
        }
        Command::Partners => {
            let columns = [
                ("NAME", Field("name")),
                ("ADAPTER", Field("adapter")),
                ("BREAKER", Field("breaker")),
                ("QUEUED", Field("queued")),
                ("IN FLIGHT", Field("in_flight")),
                ("LIMIT", Field("concurrency_limit")),
                ("RATE/S", Field("rate_per_second")),
                ("SENT", Field("sent")),
                ("DELIVERED", Field("delivered")),
                ("RETRIED", Field("retried")),
                ("DEAD", Field("dead")),
                ("ALERT", Computed(alert_reason)),
            ];
            rows_table(&items(answer, "partners"), &columns)
        }
        Command::Audit { .. } => {
            let columns = [
                ("AT", Field("at")),
                ("TOKEN", Field("token")),
                ("ACTION", Field("action")),
                ("COUNT", Field("count")),
                ("TARGET", Field("target")),
                ("FILTER", Filter("filter")),
            ];
            listing(answer, "entries", "no audit entries", &columns)
                + &next_page(answer, "herald audit")
        }
    }
}
