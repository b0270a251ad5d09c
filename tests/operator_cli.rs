//! The operator commands as on-call meets them at a terminal: the real
//! `herald` binary against a running herald process. Tables have a header
//! and aligned columns, `--json` is the answer's JSON, filters are flags,
//! `HERALD_URL` and `HERALD_TOKEN` say where and who; a refused token or a
//! herald that is not there is one line on stderr and a failing exit.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use herald::bench::process::{HeraldProcess, TOKEN};
use serde_json::Value;

const HERALD: &str = env!("CARGO_BIN_EXE_herald");

struct Ran {
    code: Option<i32>,
    out: String,
    err: String,
}

/// Runs `herald args...` to its end with only `env` of herald's own
/// variables set.
fn herald(args: &[&str], env: &[(&str, &str)]) -> Ran {
    let output = Command::new(HERALD)
        .args(args)
        .env_remove("HERALD_URL")
        .env_remove("HERALD_TOKEN")
        .env_remove("HERALD_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("herald runs");
    let ran = Ran {
        code: output.status.code(),
        out: String::from_utf8_lossy(&output.stdout).into_owned(),
        err: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert!(
        !ran.err.contains("panicked") && !ran.err.contains("RUST_BACKTRACE"),
        "herald {args:?} panicked: {}",
        ran.err
    );
    ran
}

/// Where each column of a header line starts: after a gap of two or more
/// spaces (a name such as "DIED AT" holds one).
fn column_starts(header: &str) -> Vec<usize> {
    let chars: Vec<char> = header.chars().collect();
    (0..chars.len())
        .filter(|&i| {
            !chars[i].is_whitespace()
                && (i == 0 || (chars[i - 1] == ' ' && (i == 1 || chars[i - 2] == ' ')))
        })
        .collect()
}

/// The cells of a table's rows under the named headers. Checks that the
/// header line has them in order, and that in every row each column's
/// value starts exactly where its header does, with a gap before it.
fn aligned(table: &str, header: &[&str]) -> Vec<Vec<String>> {
    let lines: Vec<&str> = table.lines().collect();
    let head = lines
        .iter()
        .position(|l| header.iter().all(|h| l.contains(h)))
        .unwrap_or_else(|| panic!("no header {header:?} in:\n{table}"));
    let all = column_starts(lines[head]);
    let starts: Vec<usize> = header
        .iter()
        .map(|h| {
            let at = lines[head].find(h).expect("in the header");
            assert!(
                all.contains(&at),
                "{h} is not a column of {:?}",
                lines[head]
            );
            at
        })
        .collect();
    assert!(
        starts.windows(2).all(|w| w[0] < w[1]),
        "columns in order: {starts:?}"
    );
    let mut rows = Vec::new();
    for line in lines[head + 1..].iter().filter(|l| !l.trim().is_empty()) {
        if line.starts_with("more:") {
            continue;
        }
        let chars: Vec<char> = line.chars().collect();
        let mut cells = Vec::new();
        for (name, &start) in header.iter().zip(&starts) {
            assert!(
                chars.get(start).is_some_and(|c| !c.is_whitespace()),
                "column {name} does not start at {start} in {line:?}\n{table}"
            );
            assert!(
                start == 0 || chars[start - 1] == ' ',
                "column {name} runs into the one before in {line:?}"
            );
            let end = all
                .iter()
                .find(|&&s| s > start)
                .copied()
                .unwrap_or(chars.len())
                .min(chars.len());
            cells.push(
                chars[start..end]
                    .iter()
                    .collect::<String>()
                    .trim()
                    .to_string(),
            );
        }
        rows.push(cells);
    }
    rows
}

fn json(ran: &Ran) -> Value {
    assert_eq!(ran.code, Some(0), "{}{}", ran.out, ran.err);
    serde_json::from_str(&ran.out)
        .unwrap_or_else(|e| panic!("--json is not JSON ({e}): {}", ran.out))
}

/// A partner that answers 200 to everything, on `addr`; how many it took.
async fn partner_on(addr: std::net::SocketAddr) -> Arc<AtomicU64> {
    let count = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&count);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let seen = Arc::clone(&seen);
            async move {
                seen.fetch_add(1, Ordering::Relaxed);
                // A 2xx is "received" (Standard Webhooks, "Consuming webhooks").
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    count
}

async fn post(herald: &HeraldProcess, body: Value) {
    let answer = reqwest::Client::new()
        .post(format!("{}/v1/events", herald.url))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
}

/// Polls (real time, bounded) until `check` holds for `herald args`' JSON.
async fn until(
    args: &[&str],
    env: &[(&str, &str)],
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = json(&herald(args, env));
        if check(&answer) {
            return answer;
        }
        assert!(Instant::now() < deadline, "never {what}: {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_commands_print_tables_and_json_and_work_dead_letters() {
    // The partner is not there yet: one attempt each, and they die.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let herald_process = HeraldProcess::start(
        Path::new(HERALD),
        &format!("http://{addr}/hook"),
        "retry = { initial_ms = 100, max_interval_ms = 100, max_attempts = 1 }",
    )
    .await
    .expect("herald starts");
    for event_type in ["door.opened", "door.opened", "motion"] {
        post(
            &herald_process,
            serde_json::json!({"device_id": "lock-1", "type": event_type, "partners": ["sink"]}),
        )
        .await;
    }
    let env = [
        ("HERALD_URL", herald_process.url.as_str()),
        ("HERALD_TOKEN", TOKEN),
    ];
    let listed = until(
        &["dlq", "list", "--json"],
        &env,
        "three dead letters",
        |l| l["items"].as_array().is_some_and(|i| i.len() == 3),
    )
    .await;
    let letters: Vec<&str> = listed["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|d| d["id"].as_str().expect("id"))
        .collect();

    let ran = herald(&["dlq", "list"], &env);
    assert_eq!(ran.code, Some(0), "{}", ran.err);
    let rows = aligned(
        &ran.out,
        &[
            "ID", "PARTNER", "TYPE", "PRIORITY", "DEVICE", "DIED AT", "ATTEMPTS",
        ],
    );
    let ids: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        ids, letters,
        "the table lists what the JSON does:\n{}",
        ran.out
    );
    assert!(
        rows.iter().all(|r| r[1] == "sink" && r[6] == "1"),
        "{}",
        ran.out
    );
    let ran = herald(&["dlq", "list", "--type", "motion"], &env);
    let rows = aligned(&ran.out, &["ID", "PARTNER", "TYPE"]);
    assert_eq!(rows.len(), 1, "{}", ran.out);
    assert_eq!(rows[0][2], "motion");

    let shown = json(&herald(&["dlq", "show", letters[0], "--json"], &env));
    assert!(shown["reason"].is_string(), "{shown}");
    let ran = herald(&["dlq", "show", letters[0]], &env);
    assert_eq!(ran.code, Some(0), "{}", ran.err);
    aligned(&ran.out, &["#", "AT", "STATUS", "LATENCY MS", "OUTCOME"]);

    // A dry run says what a job would take; nothing changes.
    let ran = herald(
        &[
            "dlq",
            "replay",
            "--all",
            "--type",
            "door.opened",
            "--dry-run",
        ],
        &env,
    );
    assert_eq!(ran.code, Some(0), "{}", ran.err);
    assert!(
        ran.out.starts_with("2 dead letters would be replayed"),
        "{}",
        ran.out
    );
    let rows = aligned(&ran.out, &["PARTNER", "LETTERS"]);
    assert_eq!(rows, [["sink".to_string(), "2".to_string()]]);
    let dry = json(&herald(
        &["dlq", "--json", "replay", "--all", "--dry-run"],
        &env,
    ));
    assert_eq!(dry["matched"], 3, "{dry}");
    assert_eq!(
        json(&herald(&["replays", "--json"], &env))["items"],
        serde_json::json!([])
    );

    // The partner is back: a job replays the door letters.
    let delivered = partner_on(addr).await;
    let ran = herald(
        &[
            "dlq",
            "replay",
            "--all",
            "--type",
            "door.opened",
            "--rate",
            "50",
        ],
        &env,
    );
    assert_eq!(ran.code, Some(0), "{}", ran.err);
    let job = ran
        .out
        .strip_prefix("replay job ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no job id in {:?}", ran.out))
        .trim_end_matches(':')
        .to_string();
    let done = until(&["replays", &job, "--json"], &env, "done", |j| {
        j["state"] == "done"
    })
    .await;
    assert_eq!(done["replayed"], 2, "{done}");
    assert_eq!(done["rate_per_second"], 50, "{done}");
    let ran = herald(&["replays"], &env);
    let rows = aligned(
        &ran.out,
        &[
            "ID",
            "STATE",
            "MATCHED",
            "REPLAYED",
            "SKIPPED",
            "RATE/S",
            "CREATED AT",
            "BY",
        ],
    );
    assert_eq!(
        rows[0][..4],
        [job.clone(), "done".into(), "2".into(), "2".into()]
    );
    assert_eq!(rows[0][7], "bench", "the token's name");
    let ran = herald(&["replays", &job], &env);
    assert!(ran.out.contains("type=door.opened"), "{}", ran.out);

    let deadline = Instant::now() + Duration::from_secs(20);
    while delivered.load(Ordering::Relaxed) < 2 {
        assert!(Instant::now() < deadline, "the replays never arrived");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // The door letters are replayed now; the motion letter waits.
    let ran = herald(&["dlq", "list", "--replayed", "false"], &env);
    let rows = aligned(&ran.out, &["ID", "PARTNER", "TYPE"]);
    let waiting: Vec<&str> = rows.iter().map(|r| r[2].as_str()).collect();
    assert_eq!(waiting, ["motion"], "{}", ran.out);
    let replayed = json(&herald(
        &["dlq", "list", "--replayed", "true", "--json"],
        &env,
    ));
    assert_eq!(
        replayed["items"].as_array().map(Vec::len),
        Some(2),
        "{replayed}"
    );

    let event = shown["event"]["id"].as_str().expect("event id");
    let ran = herald(&["events", "show", event], &env);
    assert_eq!(ran.code, Some(0), "{}", ran.err);
    let rows = aligned(&ran.out, &["DELIVERY", "PARTNER", "STATE", "ATTEMPTS"]);
    let states: Vec<&str> = rows.iter().map(|r| r[2].as_str()).collect();
    assert_eq!(states, ["dead", "delivered"], "{}", ran.out);
    let event_json = json(&herald(&["events", "show", event, "--json"], &env));
    assert_eq!(event_json["id"], event);

    let ran = herald(&["partners"], &env);
    let rows = aligned(
        &ran.out,
        &["NAME", "ADAPTER", "BREAKER", "QUEUED", "IN FLIGHT"],
    );
    assert_eq!(rows[0][..2], ["sink".to_string(), "webhook".to_string()]);
    assert_eq!(
        json(&herald(&["partners", "--json"], &env))["partners"][0]["name"],
        "sink"
    );

    // Purge by filter: exactly the motion letter.
    let ran = herald(
        &["dlq", "purge", "--all", "--type", "motion", "--dry-run"],
        &env,
    );
    assert!(
        ran.out.starts_with("1 dead letter would be purged"),
        "{}",
        ran.out
    );
    let ran = herald(&["dlq", "purge", "--all", "--type", "motion"], &env);
    assert_eq!(ran.out, "1 dead letter purged\n", "{}", ran.err);
    let left = json(&herald(&["dlq", "list", "--json"], &env));
    assert_eq!(left["items"].as_array().map(Vec::len), Some(2), "{left}");
    assert!(left["items"]
        .as_array()
        .expect("items")
        .iter()
        .all(|d| d["type"] == "door.opened"));

    let audit = json(&herald(&["audit", "--json"], &env));
    let actions: Vec<(&str, u64, &str)> = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or(""),
                e["count"].as_u64().unwrap_or(0),
                e["token"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [("replay_job", 2, "bench"), ("purge_filter", 1, "bench")]
    );
    let ran = herald(&["audit"], &env);
    let rows = aligned(
        &ran.out,
        &["AT", "TOKEN", "ACTION", "COUNT", "TARGET", "FILTER"],
    );
    assert_eq!(rows[0][2], "replay_job");
    assert_eq!(rows[0][4], job);
    assert_eq!(rows[1][5], "type=motion");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_or_an_absent_herald_is_one_line_and_a_failing_exit() {
    let herald_process = HeraldProcess::start(Path::new(HERALD), "http://127.0.0.1:9/hook", "")
        .await
        .expect("herald starts");
    let url = herald_process.url.as_str();
    let one_line = |ran: &Ran, expected: &str| {
        assert_eq!(ran.code, Some(1), "{}{}", ran.out, ran.err);
        assert_eq!(ran.out, "", "nothing on stdout");
        assert_eq!(ran.err.lines().count(), 1, "one line: {:?}", ran.err);
        assert!(ran.err.contains(expected), "{expected:?} in {:?}", ran.err);
    };
    for args in [
        &["dlq", "list"][..],
        &["dlq", "list", "--json"],
        &["replays"],
        &["partners"],
        &["audit"],
    ] {
        let ran = herald(
            args,
            &[
                ("HERALD_URL", url),
                ("HERALD_TOKEN", "not-the-token-0123456789"),
            ],
        );
        one_line(&ran, "refused the token (401 Unauthorized: unknown token)");
        let ran = herald(args, &[("HERALD_URL", url)]);
        one_line(
            &ran,
            "refused the token (401 Unauthorized: no Authorization header)",
        );
    }
    let ran = herald(
        &["dlq", "list", "--token-env", "MY_TOKEN"],
        &[("HERALD_URL", url), ("MY_TOKEN", "wrong-token-0123456789")],
    );
    one_line(&ran, "set MY_TOKEN to an operator token");

    // A closed port: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let absent = format!("http://{closed}");
    for args in [
        &["dlq", "list"][..],
        &["replays", "--json"],
        &["events", "show", "01936b2a-5c00-7000-8000-00000000d001"],
    ] {
        let ran = herald(
            args,
            &[("HERALD_URL", absent.as_str()), ("HERALD_TOKEN", TOKEN)],
        );
        one_line(
            &ran,
            &format!("cannot reach herald at {absent}: Connection refused"),
        );
    }
    let ran = herald(&["partners", "--url", &absent], &[("HERALD_TOKEN", TOKEN)]);
    one_line(&ran, "cannot reach herald");

    // Mistakes on the command line exit 2, also in one line.
    let ran = herald(&["audit", "--url", "not a url"], &[]);
    assert_eq!(ran.code, Some(2), "{}", ran.err);
    assert_eq!(ran.err.lines().count(), 1, "{:?}", ran.err);
    let ran = herald(
        &["dlq", "show", "../../v1/partners"],
        &[("HERALD_URL", url), ("HERALD_TOKEN", TOKEN)],
    );
    assert_eq!(ran.code, Some(2), "{}", ran.err);
    assert!(ran.err.contains("is not an id"), "{}", ran.err);
    // And a good token works against the same herald.
    let ran = herald(
        &["replays"],
        &[("HERALD_URL", url), ("HERALD_TOKEN", TOKEN)],
    );
    assert_eq!(ran.out, "no replay jobs\n", "{}", ran.err);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_token_is_refused_in_one_line() {
    let (h, _mock, _dir) = common::setup("", "").await;
    let url = h.herald.url();
    for args in [
        &["dlq", "list"][..],
        &["audit", "--json"],
        &["dlq", "replay", "--all", "--dry-run"],
    ] {
        let ran = herald(
            args,
            &[
                ("HERALD_URL", url.as_str()),
                ("HERALD_TOKEN", common::INGEST_TOKEN),
            ],
        );
        assert_eq!(ran.code, Some(1), "{}{}", ran.out, ran.err);
        assert_eq!(ran.out, "");
        assert_eq!(ran.err.lines().count(), 1, "one line: {:?}", ran.err);
        assert!(
            ran.err.contains(
                "refused the token (403 Forbidden: token \"door-service\" has the ingest role"
            ),
            "{:?}",
            ran.err
        );
    }
    let ran = herald(
        &["partners", "--json"],
        &[
            ("HERALD_URL", url.as_str()),
            ("HERALD_TOKEN", common::OPERATOR_TOKEN),
        ],
    );
    assert_eq!(json(&ran)["partners"][0]["name"], "acme");
}
