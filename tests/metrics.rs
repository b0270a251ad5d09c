//! `/metrics` as Prometheus scrapes it, after a scripted run against
//! webhook partners on loopback, on a driven clock: every configured
//! partner's series are there at zero before any traffic; queue depth and
//! the age of the oldest undelivered delivery grow while a partner is down
//! and go back to zero once it recovers and drains; dead letters show
//! under their reason; token refreshes show by outcome and a partner that
//! refuses herald's setup shows as misconfigured, against SmartThings
//! mocks (the adapters crate's `mock` feature). Every scrape is checked by Prometheus' own parser
//! (`promtool check metrics`; CI installs it, and without it the check is
//! skipped saying so loudly).
//!
//! The partners speak Standard Webhooks (herald's `webhook` adapter): a
//! 2xx is delivered, 410 Gone tells the sender to stop sending to that
//! endpoint, every other answer is retried, and a status the partner lists
//! in `permanent_statuses` is not
//! (https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md,
//! "Delivery behavior": 410 disables the endpoint).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{config_toml, partner_toml, MockPartner, Reply, TestHerald, OPERATOR_TOKEN, START_MS};
use herald::clock::Clock;

/// One sample of an exposition: its name, labels and value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scrape, by sample.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    /// The value of the one sample of `name` whose labels include `labels`;
    /// panics naming it when there is none.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).unwrap_or_else(|| {
            panic!(
                "no sample {name}{labels:?} in the scrape:\n{}",
                self.text
                    .lines()
                    .filter(|l| l.starts_with(name))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
    }

    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }
}

/// Reads a text exposition's samples (after promtool accepted its format).
fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample line has a value");
        let value: f64 = value.parse().expect("a sample's value is a number");
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with }");
                let labels = body
                    .split("\",")
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// `promtool check metrics` on `text`: Prometheus' parser and linter.
fn promtool_accepts(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            eprintln!(
                "SKIPPED: promtool is not installed ({e}); the exposition was not checked by \
                 Prometheus' parser (apt-get install prometheus; CI does)"
            );
            return;
        }
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("promtool reads the exposition");
    let out = child.wait_with_output().expect("promtool ends");
    assert!(
        out.status.success(),
        "promtool check metrics refused the exposition: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn scrape(h: &TestHerald) -> Scrape {
    let response = h
        .http
        .get(h.url("/metrics"))
        .bearer_auth(OPERATOR_TOKEN)
        .send()
        .await
        .expect("herald answers");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("body");
    promtool_accepts(&text);
    Scrape {
        samples: samples(&text),
        text,
    }
}

/// Scrapes (real time, bounded) until `check` holds; that scrape.
async fn wait_scrape(h: &TestHerald, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(h).await;
        if check(&s) {
            return s;
        }
        if Instant::now() >= deadline {
            let nonzero: Vec<&str> = s
                .text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.ends_with(" 0") && !l.contains("_bucket"))
                .collect();
            panic!(
                "never saw {what}; the samples not at zero:\n{}",
                nonzero.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

const PARTNERS: [&str; 2] = ["acme", "globex"];
const PRIORITIES: [&str; 2] = ["critical", "normal"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_an_outage_its_recovery_and_dead_letters_from_zero() {
    let clock = Clock::manual(START_MS);
    let acme = MockPartner::start(clock.clone()).await;
    let globex = MockPartner::start(clock.clone()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let partners = partner_toml(
        "acme",
        &acme.url,
        "retry = { initial_ms = 1000, multiplier = 2.0, max_interval_ms = 4000 }\n\
         breaker = { failures = 3, cool_down = \"5s\", max_cool_down = \"5s\" }",
    ) + &partner_toml(
        "globex",
        &globex.url,
        "permanent_statuses = [422]\nconcurrency = \"adaptive\"\nmax_in_flight = 8",
    );
    let h = TestHerald::start(&config_toml(dir.path(), &partners, ""), clock.clone()).await;

    // Before any traffic: every partner's series, at zero.
    let s = scrape(&h).await;
    for partner in PARTNERS {
        for outcome in ["delivered", "retried", "dead_lettered", "superseded"] {
            let labels = [("partner", partner), ("outcome", outcome)];
            assert_eq!(s.value("herald_deliveries_total", &labels), 0.0);
        }
        for reason in [
            "retries_exhausted",
            "rejected",
            "route_gone",
            "route_parked",
            "not_sendable",
        ] {
            let labels = [("partner", partner), ("reason", reason)];
            assert_eq!(s.value("herald_dead_letters_total", &labels), 0.0);
        }
        for priority in PRIORITIES {
            let labels = [("partner", partner), ("priority", priority)];
            assert_eq!(s.value("herald_queue_depth", &labels), 0.0);
            assert_eq!(
                s.value("herald_oldest_undelivered_age_seconds", &labels),
                0.0
            );
            assert_eq!(
                s.value("herald_delivery_latency_seconds_count", &labels),
                0.0
            );
            let le = [("partner", partner), ("priority", priority), ("le", "60")];
            assert_eq!(s.value("herald_delivery_latency_seconds_bucket", &le), 0.0);
        }
        for outcome in ["renewed", "retry", "refused", "misconfigured"] {
            let labels = [("partner", partner), ("outcome", outcome)];
            assert_eq!(s.value("herald_token_requests_total", &labels), 0.0);
        }
        let labels = [("partner", partner)];
        assert_eq!(s.value("herald_partner_breaker_state", &labels), 0.0);
        assert_eq!(s.value("herald_partner_misconfigured", &labels), 0.0);
        assert_eq!(s.value("herald_parked_routes", &labels), 0.0);
        assert_eq!(s.value("herald_replays_total", &labels), 0.0);
        assert_eq!(s.value("herald_rate_limit_waits_total", &labels), 0.0);
        assert_eq!(s.value("herald_dispatch_stalled", &labels), 0.0);
        assert!(s.value("herald_partner_concurrency_limit", &labels) >= 1.0);
    }
    // A fixed limit is max_in_flight; an adaptive one starts at 1.
    let limit = |partner| s.value("herald_partner_concurrency_limit", &[("partner", partner)]);
    assert_eq!(limit("acme"), 32.0);
    assert_eq!(limit("globex"), 1.0);
    for outcome in ["accepted", "rejected", "unavailable"] {
        assert_eq!(
            s.value("herald_ingest_requests_total", &[("outcome", outcome)]),
            0.0
        );
    }
    assert_eq!(
        s.value("herald_ingest_events_total", &[("outcome", "accepted")]),
        0.0
    );
    assert!(s.value("herald_disk_free_bytes", &[]) > 0.0);
    assert_eq!(
        s.value("herald_disk_min_free_bytes", &[]),
        16.0 * 1024.0 * 1024.0
    );
    s.value("herald_store_fsyncs_total", &[]);
    s.value("herald_store_commit_failures_total", &[]);
    s.value("herald_store_group_commit_seconds_count", &[]);
    s.value("herald_store_group_commit_requests_count", &[]);

    // acme goes down: two critical events and a normal one wait, and age.
    acme.refuse_connections().await;
    h.send_one("acme", "critical").await;
    h.send_one("acme", "critical").await;
    h.send_one("acme", "normal").await;
    let retried = [("partner", "acme"), ("outcome", "retried")];
    wait_scrape(&h, "each first attempt retried", |s| {
        s.value("herald_deliveries_total", &retried) >= 3.0
    })
    .await;
    clock.advance(Duration::from_secs(90));
    let critical = [("partner", "acme"), ("priority", "critical")];
    let normal = [("partner", "acme"), ("priority", "normal")];
    let s = scrape(&h).await;
    assert_eq!(s.value("herald_queue_depth", &critical), 2.0);
    assert_eq!(s.value("herald_queue_depth", &normal), 1.0);
    let age = s.value("herald_oldest_undelivered_age_seconds", &critical);
    assert!((90.0..92.0).contains(&age), "critical oldest age {age}");
    assert!(s.value("herald_oldest_undelivered_age_seconds", &normal) >= 90.0);
    // GET /v1/partners says the same, for the console and for scripts.
    let (status, body) = h.get("/v1/partners").await;
    assert_eq!(status, 200);
    let queues = body["partners"]
        .as_array()
        .and_then(|all| all.iter().find(|p| p["name"] == "acme"))
        .map(|acme| acme["queues"].clone())
        .expect("acme in /v1/partners");
    assert_eq!(queues["critical"]["depth"], 2, "{queues}");
    assert_eq!(queues["normal"]["depth"], 1, "{queues}");
    let listed_age = queues["critical"]["oldest_age_seconds"]
        .as_f64()
        .expect("an age while critical work waits");
    assert!((90.0..92.0).contains(&listed_age), "{queues}");
    assert_eq!(
        s.value(
            "herald_deliveries_total",
            &[("partner", "acme"), ("outcome", "delivered")]
        ),
        0.0
    );
    let breaker = [("partner", "acme")];
    wait_scrape(&h, "acme's breaker open", |s| {
        s.value("herald_partner_breaker_state", &breaker) == 1.0
    })
    .await;

    // acme is back: the backlog drains and the gauges return to zero.
    acme.accept_connections().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let delivered = [("partner", "acme"), ("outcome", "delivered")];
    let s = loop {
        clock.advance(Duration::from_secs(1));
        let s = scrape(&h).await;
        if s.value("herald_deliveries_total", &delivered) == 3.0
            && s.value("herald_queue_depth", &critical) == 0.0
            && s.value("herald_queue_depth", &normal) == 0.0
        {
            break s;
        }
        assert!(Instant::now() < deadline, "acme's backlog never drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        s.value("herald_oldest_undelivered_age_seconds", &critical),
        0.0
    );
    assert_eq!(
        s.value("herald_oldest_undelivered_age_seconds", &normal),
        0.0
    );
    assert_eq!(s.value("herald_partner_breaker_state", &breaker), 0.0);
    let (_, body) = h.get("/v1/partners").await;
    let acme = body["partners"]
        .as_array()
        .and_then(|all| all.iter().find(|p| p["name"] == "acme"))
        .expect("acme");
    assert_eq!(acme["queues"]["critical"]["depth"], 0);
    assert!(
        acme["queues"]["critical"]
            .get("oldest_age_seconds")
            .is_none(),
        "nothing waits: no age"
    );
    // The last hour per minute (the console's chart) holds every outcome
    // of this run, which is shorter than an hour on herald's clock.
    let minutes = acme["last_hour"].as_array().expect("last_hour");
    assert_eq!(minutes.len(), 60, "{acme}");
    let sum = |kind: &str| -> u64 { minutes.iter().filter_map(|m| m[kind].as_u64()).sum() };
    let count = |kind: &str| acme[kind].as_u64().unwrap_or(0);
    assert_eq!(sum("delivered"), count("delivered"), "{acme}");
    assert_eq!(sum("failed"), count("retried") + count("dead"), "{acme}");
    assert!(sum("failed") > 0, "the outage's failed attempts: {acme}");
    assert_eq!(
        s.value("herald_delivery_latency_seconds_count", &critical),
        2.0
    );
    assert_eq!(
        s.value("herald_delivery_latency_seconds_count", &normal),
        1.0
    );
    // Delivered after the outage: over 90 s each, none within a minute.
    assert!(s.value("herald_delivery_latency_seconds_sum", &critical) >= 180.0);
    let within_a_minute = [("partner", "acme"), ("priority", "critical"), ("le", "60")];
    assert_eq!(
        s.value("herald_delivery_latency_seconds_bucket", &within_a_minute),
        0.0
    );

    // globex refuses one for good (422, listed permanent), says the
    // device's endpoint is gone for another (410), and the next one for
    // that device is not sent at all.
    globex.script([Reply::Status(422), Reply::Status(410)]);
    let dead = |reason: &'static str| [("partner", "globex"), ("reason", reason)];
    h.send_one("globex", "normal").await;
    wait_scrape(&h, "a rejected dead letter", |s| {
        s.value("herald_dead_letters_total", &dead("rejected")) == 1.0
    })
    .await;
    h.send_one("globex", "normal").await;
    wait_scrape(&h, "a dead letter for a gone route", |s| {
        s.value("herald_dead_letters_total", &dead("route_gone")) == 1.0
    })
    .await;
    h.send_one("globex", "normal").await;
    let s = wait_scrape(&h, "a dead letter on the parked route", |s| {
        s.value("herald_dead_letters_total", &dead("route_parked")) == 1.0
    })
    .await;
    assert_eq!(
        globex.requests().len(),
        2,
        "the parked route was not sent to"
    );
    assert_eq!(
        s.value("herald_dead_letters_total", &dead("retries_exhausted")),
        0.0
    );
    assert_eq!(
        s.value("herald_dead_letters_total", &dead("not_sendable")),
        0.0
    );
    let dead_lettered = [("partner", "globex"), ("outcome", "dead_lettered")];
    assert_eq!(s.value("herald_deliveries_total", &dead_lettered), 3.0);
    assert_eq!(
        s.value("herald_parked_routes", &[("partner", "globex")]),
        1.0
    );

    // Ingest by outcome: six accepted, one refused for its content.
    let (status, _) = h.post_events(r#"{"device_id":"lock-7f3a"}"#).await;
    assert_eq!(status, 422);
    let s = scrape(&h).await;
    let ingest = |outcome| s.value("herald_ingest_requests_total", &[("outcome", outcome)]);
    assert_eq!(ingest("accepted"), 6.0);
    assert_eq!(ingest("rejected"), 1.0);
    assert_eq!(ingest("unavailable"), 0.0);
    assert_eq!(
        s.value("herald_ingest_events_total", &[("outcome", "accepted")]),
        6.0
    );
    assert!(s.value("herald_store_fsyncs_total", &[]) >= 6.0);
    assert!(s.value("herald_store_group_commit_seconds_count", &[]) >= 6.0);

    // The alert rules and the dashboard read only series herald exports.
    let exported: std::collections::HashSet<&str> =
        s.samples.iter().map(|s| s.name.as_str()).collect();
    for file in ["ops/prometheus/herald-rules.yml", "ops/grafana/herald.json"] {
        let text = std::fs::read_to_string(file).expect("ops file");
        for name in metric_names(&text) {
            assert!(
                exported.contains(name.as_str()),
                "{file} reads {name}, which herald does not export"
            );
        }
    }
}

/// Every `herald_...` name in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("herald_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

/// A SmartThings partner named `name` at the mock `base`, retried fast.
fn smartthings_toml(name: &str) -> String {
    format!(
        r#"
[partners.{name}]
adapter = "smartthings"
client_id_env = "TEST_CLIENT_ID"
client_secret_env = "TEST_CLIENT_SECRET"
allow_private = true
timeout_ms = 2000
retry = {{ initial_ms = 100, multiplier = 2.0, max_interval_ms = 1000 }}
"#
    )
}

fn platform_env(name: &str) -> Option<String> {
    match name {
        "TEST_CLIENT_ID" => Some("herald-client".into()),
        "TEST_CLIENT_SECRET" => Some("herald-client-secret".into()),
        other => common::test_env(other),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_refreshes_and_a_refused_setup_show_per_partner_against_smartthings_mocks() {
    use adapters::mock::{MockPartner as PlatformMock, Scenario};
    // Two SmartThings whose access token has expired (they answer 401 and
    // take a refresh); the second has rotated herald's client secret, so
    // its token endpoint refuses herald's own setup (RFC 6749
    // `invalid_client`). The mocks answer as SmartThings documents
    // (adapters/src/mock/smartthings.rs names the sources).
    let expired = Scenario {
        access_token: "at-0".into(),
        expire_after: Some(0),
        ..Scenario::default()
    };
    let refusing = Scenario {
        access_token: "at-0".into(),
        expire_after: Some(0),
        client_secret: Some("herald-client-secret-rotated".into()),
        ..Scenario::default()
    };
    let (fresh_addr, fresh) = PlatformMock::start("smartthings", expired)
        .await
        .expect("mock");
    let (refusing_addr, _refusing) = PlatformMock::start("smartthings", refusing)
        .await
        .expect("mock");
    let dir = tempfile::tempdir().expect("temp dir");
    let partners = smartthings_toml("smartthings") + &smartthings_toml("st_staging");
    let toml = config_toml(dir.path(), &partners, "");
    let h = TestHerald::start_with_env(&toml, Clock::manual(START_MS), &platform_env).await;
    let s = scrape(&h).await;
    for partner in ["smartthings", "st_staging"] {
        assert_eq!(
            s.value(
                "herald_token_requests_total",
                &[("partner", partner), ("outcome", "renewed")]
            ),
            0.0
        );
        assert_eq!(
            s.value("herald_partner_misconfigured", &[("partner", partner)]),
            0.0
        );
    }
    for (partner, addr) in [("smartthings", fresh_addr), ("st_staging", refusing_addr)] {
        let base = format!("http://{addr}");
        let link = serde_json::json!({
            "external_id": "lock-42",
            "account": "user-7",
            "callback_url": format!("{base}/device/events"),
            "token_url": format!("{base}/oauth/token"),
            "credentials": {"access_token": "at-0", "refresh_token": "rt-0", "expires_at": "2027-06-01T00:00:00Z"},
        });
        let response = h
            .http
            .put(h.url(&format!("/v1/links/{partner}/lock-7f3a")))
            .bearer_auth(OPERATOR_TOKEN)
            .header("content-type", "application/json")
            .body(link.to_string())
            .send()
            .await
            .expect("herald answers");
        assert_eq!(response.status(), 201);
    }
    // Routed by the device's links: one delivery to each.
    let (status, body) = h
        .post_events(r#"{"device_id":"lock-7f3a","type":"door.forced_open","priority":"critical","data":{"capability":"lock","attribute":"lock","value":"forced_open","kind":"forced_open"}}"#)
        .await;
    assert_eq!(status, 202, "{body}");
    let s = wait_scrape(&h, "the refresh and the refused setup", |s| {
        s.value(
            "herald_deliveries_total",
            &[("partner", "smartthings"), ("outcome", "delivered")],
        ) == 1.0
            && s.value("herald_partner_misconfigured", &[("partner", "st_staging")]) == 1.0
    })
    .await;
    assert_eq!(fresh.refreshes(), 1);
    let renewed = [("partner", "smartthings"), ("outcome", "renewed")];
    assert_eq!(s.value("herald_token_requests_total", &renewed), 1.0);
    assert_eq!(
        s.value(
            "herald_partner_misconfigured",
            &[("partner", "smartthings")]
        ),
        0.0
    );
    let refused = [("partner", "st_staging"), ("outcome", "misconfigured")];
    assert!(s.value("herald_token_requests_total", &refused) >= 1.0);
    let retried = [("partner", "st_staging"), ("outcome", "retried")];
    assert!(s.value("herald_deliveries_total", &retried) >= 1.0);
    let waiting = [("partner", "st_staging"), ("priority", "critical")];
    assert_eq!(s.value("herald_queue_depth", &waiting), 1.0);
}
