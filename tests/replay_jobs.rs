//! A bulk replay as on-call runs it against the real `herald` binary: five
//! thousand dead letters replayed by one job through a partner limited to
//! 500 a second, herald SIGKILLed while the job is half way and started
//! again. The job goes on where its last committed batch left it: every
//! event reaches the partner once more, none twice, and the job ends done
//! with every letter it matched replayed.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use herald::bench::process::{HeraldProcess, TOKEN};
use serde_json::{json, Value};

const HERALD: &str = env!("CARGO_BIN_EXE_herald");
/// The secret `HeraldProcess` gives partner "sink".
const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const LETTERS: usize = 5_000;
/// The partner's own limit in herald's config, and its burst.
const PARTNER_RATE: u64 = 500;
const PARTNER_BURST: u64 = 1;

/// One request as the partner saw it.
struct Arrival {
    webhook_id: String,
    event_id: String,
    at: Instant,
    accepted: bool,
}

/// A Standard Webhooks receiver: it checks each request's signature with
/// the Standard Webhooks project's own library, and refuses (400) until
/// told to accept.
struct Receiver {
    verifier: standardwebhooks::Webhook,
    accepting: AtomicBool,
    arrivals: Mutex<Vec<Arrival>>,
    unsigned: Mutex<usize>,
}

async fn receive(
    State(partner): State<Arc<Receiver>>,
    headers: HeaderMap,
    raw: Bytes,
) -> StatusCode {
    if partner.verifier.verify(&raw, &headers).is_err() {
        *partner.unsigned.lock().unwrap() += 1;
        // https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md
        // ("Verifying webhook authenticity"): a request that does not verify is rejected.
        return StatusCode::UNAUTHORIZED;
    }
    let body: Value = serde_json::from_slice(&raw).unwrap_or_default();
    let accepted = partner.accepting.load(Ordering::SeqCst);
    partner.arrivals.lock().unwrap().push(Arrival {
        webhook_id: headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        event_id: body["id"].as_str().unwrap_or_default().to_string(),
        at: Instant::now(),
        accepted,
    });
    // The spec's "Consuming webhooks": a 2xx says it was received; any
    // other status is a failure the sender may retry (herald is told 400
    // is for good, `permanent_statuses`).
    match accepted {
        true => StatusCode::NO_CONTENT,
        false => StatusCode::BAD_REQUEST,
    }
}

async fn api(
    herald: &HeraldProcess,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", herald.url))
        .bearer_auth(TOKEN);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let answer = request.send().await.expect("herald answers");
    let status = answer.status().as_u16();
    let bytes = answer.bytes().await.expect("a body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Event ids the partner accepted, by the distinct webhook-ids (deliveries)
/// that carried them: the spec's `webhook-id` is the idempotency key a
/// receiver dedupes on.
fn accepted_deliveries(partner: &Receiver) -> HashMap<String, HashSet<String>> {
    let mut out: HashMap<String, HashSet<String>> = HashMap::new();
    for a in partner
        .arrivals
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a.accepted)
    {
        out.entry(a.event_id.clone())
            .or_default()
            .insert(a.webhook_id.clone());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_replay_keeps_to_the_partners_rate_and_survives_sigkill_without_sending_twice() {
    let partner = Arc::new(Receiver {
        verifier: standardwebhooks::Webhook::new(SECRET).expect("the secret"),
        accepting: AtomicBool::new(false),
        arrivals: Mutex::new(Vec::new()),
        unsigned: Mutex::new(0),
    });
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(Arc::clone(&partner));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // First every event dies: the partner refuses it for good.
    let mut herald = HeraldProcess::start(Path::new(HERALD), &url, "permanent_statuses = [400]")
        .await
        .expect("herald starts");
    let mut events = HashSet::new();
    for batch in 0..LETTERS / 1_000 {
        let body: Vec<Value> = (0..1_000)
            .map(|i| {
                json!({"device_id": format!("lock-{}", i % 100), "type": "door.opened",
                "data": {"n": batch * 1_000 + i}, "partners": ["sink"]})
            })
            .collect();
        let (status, answer) = api(
            &herald,
            reqwest::Method::POST,
            "/v1/events",
            Some(Value::Array(body)),
        )
        .await;
        assert_eq!(status, 202, "{answer}");
        for item in answer.as_array().expect("one answer an event") {
            events.insert(item["id"].as_str().expect("id").to_string());
        }
    }
    assert_eq!(events.len(), LETTERS);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, dry) = api(
            &herald,
            reqwest::Method::POST,
            "/v1/replays",
            Some(json!({"dry_run": true})),
        )
        .await;
        if dry["matched"] == LETTERS {
            assert_eq!(dry["partners"], json!({"sink": LETTERS}), "{dry}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the letters never all died: {dry}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The partner is fixed and limited to 500 a second.
    herald.stop().expect("a clean stop");
    herald
        .extend_partner_config(&format!(
            "rate = {{ per_second = {PARTNER_RATE}, burst = {PARTNER_BURST} }}"
        ))
        .expect("config");
    partner.accepting.store(true, Ordering::SeqCst);
    herald.restart_stopped().expect("restart");
    herald
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("ready");

    let started = Instant::now();
    let (status, job) = api(
        &herald,
        reqwest::Method::POST,
        "/v1/replays",
        Some(json!({"rate_per_second": 1000})),
    )
    .await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["matched"], LETTERS, "{job}");
    let id = job["id"].as_str().expect("job id").to_string();

    tokio::time::sleep(Duration::from_millis(2_500)).await;
    herald.kill().expect("herald was running until the kill");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let killed = Instant::now();
    herald.restart_stopped().expect("restart");
    herald
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("ready again");
    let (_, resumed) = api(
        &herald,
        reqwest::Method::GET,
        &format!("/v1/replays/{id}"),
        None,
    )
    .await;
    let at_restart = resumed["replayed"].as_u64().expect("replayed");
    assert_eq!(
        resumed["state"], "running",
        "the kill fell during the job: {resumed}"
    );
    assert!(
        at_restart > 0,
        "the batches before the kill stayed committed: {resumed}"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    while accepted_deliveries(&partner).len() < LETTERS {
        assert!(
            Instant::now() < deadline,
            "only {} of {LETTERS} events came back",
            accepted_deliveries(&partner).len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    // Two processes, a burst each: the rest waits for the partner's rate.
    let bound =
        Duration::from_secs_f64((LETTERS as u64 - 2 * PARTNER_BURST) as f64 / PARTNER_RATE as f64);
    assert!(
        took >= bound,
        "{LETTERS} replays through a {PARTNER_RATE}/s partner took {took:?}"
    );

    let done = loop {
        let (_, job) = api(
            &herald,
            reqwest::Method::GET,
            &format!("/v1/replays/{id}"),
            None,
        )
        .await;
        if job["state"] == "done" {
            break job;
        }
        assert!(Instant::now() < deadline, "the job never finished: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(done["replayed"], LETTERS, "{done}");
    assert_eq!(done["skipped"], 0, "{done}");

    let deliveries = accepted_deliveries(&partner);
    assert_eq!(
        deliveries.keys().cloned().collect::<HashSet<_>>(),
        events,
        "every event came back"
    );
    for (event, carried) in &deliveries {
        assert_eq!(
            carried.len(),
            1,
            "event {event} was replayed as {carried:?}"
        );
    }
    // A delivery that arrived twice was in flight at the kill: sent by the
    // killed process, and again by the next one (the lane's at-least-once).
    let arrivals = partner.arrivals.lock().unwrap();
    let mut by_delivery: HashMap<&str, Vec<Instant>> = HashMap::new();
    for a in arrivals.iter().filter(|a| a.accepted) {
        by_delivery.entry(&a.webhook_id).or_default().push(a.at);
    }
    let mut again = 0;
    for (delivery, times) in &by_delivery {
        assert!(
            times.len() <= 2,
            "delivery {delivery} arrived {} times",
            times.len()
        );
        if let [first, second] = times[..] {
            again += 1;
            assert!(
                first <= killed && killed <= second,
                "delivery {delivery} arrived twice with no kill between"
            );
        }
    }
    assert_eq!(
        *partner.unsigned.lock().unwrap(),
        0,
        "every request verified"
    );
    println!(
        "{LETTERS} replayed in {took:?}; {at_restart} before the kill; {again} sent again after it"
    );
    drop(arrivals);
    herald.stop().expect("SIGTERM ends herald with exit 0");
}
