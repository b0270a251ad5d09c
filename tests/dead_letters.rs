//! Dead letters as on-call acts on them: replay one once the cause is
//! fixed, replay many by filter, purge one; each refused cleanly when it
//! cannot be done.

mod common;

use common::*;
use herald::model::DeliveryState;
use serde_json::Value;

async fn call(h: &TestHerald, method: reqwest::Method, path: &str, token: &str) -> (u16, Value) {
    let response = h
        .http
        .request(method, h.url(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("herald answers");
    read(response).await
}

/// The partner's config: its receiver's 400 means "never" (webhook
/// receivers are otherwise retried on every non-2xx but 410).
const REFUSES_400: &str = "permanent_statuses = [400]";

/// Posts an event the partner refuses for good (400); its dead letter id.
async fn dead_one(h: &TestHerald, mock: &MockPartner, event_type: &str) -> (String, String) {
    mock.script([Reply::Status(400)]);
    let (status, body) = h
        .post_events(&format!(
            r#"{{"device_id":"lock-7f3a","type":"{event_type}","partners":["acme"]}}"#
        ))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    let event = h
        .wait_event(&id, "dead", |e| {
            e.deliveries[0].state == DeliveryState::Dead
        })
        .await;
    let letter = event.deliveries[0].dead_letter.expect("a dead letter");
    (id, letter.to_string())
}

#[tokio::test]
async fn a_replayed_dead_letter_is_delivered_once_and_cannot_be_replayed_twice() {
    let (h, mock, _dir) = setup(REFUSES_400, "").await;
    let (event_id, letter) = dead_one(&h, &mock, "door.forced_open").await;
    let path = format!("/v1/dead-letters/{letter}/replay");
    let (status, body) = call(&h, reqwest::Method::POST, &path, OPERATOR_TOKEN).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["event_id"], event_id.as_str());
    let delivery = body["delivery_id"]
        .as_str()
        .expect("new delivery")
        .to_string();
    let event = h
        .wait_event(&event_id, "replayed and delivered", |e| {
            e.deliveries.len() == 2 && e.deliveries[1].state == DeliveryState::Delivered
        })
        .await;
    assert_eq!(
        event.deliveries[0].state,
        DeliveryState::Dead,
        "the first stays dead"
    );
    assert_eq!(event.deliveries[1].id.to_string(), delivery);
    let sent = mock.wait_for(2).await;
    assert_eq!(
        sent[1].body["id"],
        event_id.as_str(),
        "the same event again"
    );
    assert_ne!(sent[0].webhook_id, sent[1].webhook_id, "a new delivery id");

    let (status, problem) = call(&h, reqwest::Method::POST, &path, OPERATOR_TOKEN).await;
    assert_eq!(status, 409, "{problem}");
    assert!(problem["detail"]
        .as_str()
        .unwrap_or_default()
        .contains(&delivery));
    let (_, shown) = h.get(&format!("/v1/dead-letters/{letter}")).await;
    assert_eq!(shown["replayed_as"], delivery.as_str(), "{shown}");
    settle().await;
    assert_eq!(mock.requests().len(), 2, "the second replay sent nothing");
    h.wait_queued("acme", 0).await;
}

#[tokio::test]
async fn bulk_replay_takes_what_the_filters_select_and_purge_removes_one() {
    let (h, mock, _dir) = setup(REFUSES_400, "").await;
    let (_, first) = dead_one(&h, &mock, "door.forced_open").await;
    let (_, second) = dead_one(&h, &mock, "door.forced_open").await;
    let (_, other) = dead_one(&h, &mock, "motion").await;
    let (status, body) = call(
        &h,
        reqwest::Method::POST,
        "/v1/dead-letters/replay?type=door.forced_open&partner=acme",
        OPERATOR_TOKEN,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["replayed"], 2);
    assert_eq!(body["more"], false);
    mock.wait_for(5).await;
    for (letter, replayed) in [(&first, true), (&second, true), (&other, false)] {
        let (_, shown) = h.get(&format!("/v1/dead-letters/{letter}")).await;
        assert_eq!(shown["replayed_as"].is_string(), replayed, "{shown}");
    }
    // The list tells replayed letters from those still waiting for a look.
    let ids = |page: &Value| -> Vec<String> {
        let items = page["items"].as_array().expect("a page of items");
        items
            .iter()
            .map(|d| d["id"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let (_, waiting) = h.get("/v1/dead-letters?replayed=false").await;
    assert_eq!(ids(&waiting), vec![other.clone()], "{waiting}");
    let (_, replayed) = h.get("/v1/dead-letters?replayed=true").await;
    assert_eq!(
        ids(&replayed),
        [first.clone(), second.clone()],
        "{replayed}"
    );
    let (status, problem) = h.get("/v1/dead-letters?replayed=maybe").await;
    assert_eq!(status, 422, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("replayed"),
        "the refusal names the filter: {problem}"
    );
    // Again: nothing left to replay for that filter.
    let (_, body) = call(
        &h,
        reqwest::Method::POST,
        "/v1/dead-letters/replay?type=door.forced_open",
        OPERATOR_TOKEN,
    )
    .await;
    assert_eq!(body["replayed"], 0, "{body}");

    let path = format!("/v1/dead-letters/{other}");
    let (status, _) = call(&h, reqwest::Method::DELETE, &path, OPERATOR_TOKEN).await;
    assert_eq!(status, 204);
    let (status, _) = h.get(&path).await;
    assert_eq!(status, 404);
    let (status, _) = call(&h, reqwest::Method::DELETE, &path, OPERATOR_TOKEN).await;
    assert_eq!(status, 404);
    let (status, _) = call(
        &h,
        reqwest::Method::POST,
        &format!("{path}/replay"),
        OPERATOR_TOKEN,
    )
    .await;
    assert_eq!(status, 404, "a purged letter cannot be replayed");
}

#[tokio::test]
async fn bad_replay_requests_are_refused_by_name() {
    let (h, _mock, _dir) = setup(REFUSES_400, "").await;
    let cases = [
        ("/v1/dead-letters/replay?limit=0", 422, "/limit"),
        ("/v1/dead-letters/replay?limit=10001", 422, "/limit"),
        ("/v1/dead-letters/replay?since=yesterday", 422, "/since"),
        (
            "/v1/dead-letters/replay?after=01936b2a-5c00-7000-8000-00000000d001",
            422,
            "/after",
        ),
        ("/v1/dead-letters/replay?priority=urgent", 422, ""),
    ];
    for (path, status, field) in cases {
        let (got, problem) = call(&h, reqwest::Method::POST, path, OPERATOR_TOKEN).await;
        assert_eq!(got, status, "{path}: {problem}");
        if !field.is_empty() {
            assert_eq!(problem["field"], field, "{path}: {problem}");
        }
    }
    let (status, _) = call(
        &h,
        reqwest::Method::POST,
        "/v1/dead-letters/not-an-id/replay",
        OPERATOR_TOKEN,
    )
    .await;
    assert_eq!(status, 400, "a malformed id is the caller's error");
    let (status, _) = call(
        &h,
        reqwest::Method::POST,
        "/v1/dead-letters/01936b2a-5c00-7000-8000-00000000d001/replay",
        OPERATOR_TOKEN,
    )
    .await;
    assert_eq!(status, 404);
    for (method, path) in [
        (reqwest::Method::POST, "/v1/dead-letters/replay"),
        (
            reqwest::Method::POST,
            "/v1/dead-letters/01936b2a-5c00-7000-8000-00000000d001/replay",
        ),
        (
            reqwest::Method::DELETE,
            "/v1/dead-letters/01936b2a-5c00-7000-8000-00000000d001",
        ),
    ] {
        let (status, _) = call(&h, method, path, INGEST_TOKEN).await;
        assert_eq!(status, 403, "{path}");
    }
}

/// A request with a JSON body and the operator token.
async fn post_json(h: &TestHerald, path: &str, body: Value) -> (u16, Value, Option<String>) {
    let response = h
        .http
        .post(h.url(path))
        .bearer_auth(OPERATOR_TOKEN)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("herald answers");
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (status, body) = read(response).await;
    (status, body, location)
}

/// The dead letters' ids as `GET /v1/dead-letters` lists them, whole.
async fn listed(h: &TestHerald) -> Value {
    let (status, body) = h.get("/v1/dead-letters?limit=1000").await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn audit(h: &TestHerald) -> Vec<Value> {
    let (status, body) = h.get("/v1/audit").await;
    assert_eq!(status, 200, "{body}");
    assert!(body["next"].is_null(), "one page: {body}");
    body["entries"].as_array().expect("entries").clone()
}

/// Polls the job (real time, bounded) until `check` holds.
async fn wait_job(h: &TestHerald, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let mut job = Value::Null;
    for _ in 0..1000 {
        let (status, body) = h.get(&format!("/v1/replays/{id}")).await;
        assert_eq!(status, 200, "{body}");
        job = body;
        if check(&job) {
            return job;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("job {id} never reached: {what}; last {job}");
}

#[tokio::test]
async fn dry_runs_change_nothing_purge_by_filter_takes_exactly_its_set_and_each_act_is_audited() {
    let (h, mock, _dir) = setup(REFUSES_400, "").await;
    let mut doors = Vec::new();
    for _ in 0..3 {
        doors.push(dead_one(&h, &mock, "door.forced_open").await.1);
    }
    let mut motions = Vec::new();
    for _ in 0..2 {
        motions.push(dead_one(&h, &mock, "motion").await.1);
    }
    let before = listed(&h).await;

    let (status, body, _) = post_json(
        &h,
        "/v1/replays",
        serde_json::json!({"type": "door.forced_open", "dry_run": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        serde_json::json!({"dry_run": true, "matched": 3, "partners": {"acme": 3}})
    );
    let (status, body, _) = post_json(
        &h,
        "/v1/dead-letters/purge",
        serde_json::json!({"type": "motion", "dry_run": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["matched"], 2, "{body}");
    assert_eq!(listed(&h).await, before, "a dry run changes nothing");
    assert!(audit(&h).await.is_empty(), "a dry run is not audited");
    let (_, jobs) = h.get("/v1/replays").await;
    assert_eq!(jobs["items"], serde_json::json!([]), "no job was made");
    settle().await;
    assert_eq!(mock.requests().len(), 5, "nothing was sent again");

    let (status, body, _) = post_json(
        &h,
        "/v1/dead-letters/purge",
        serde_json::json!({"type": "motion"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, serde_json::json!({"purged": 2}));
    let left: Vec<String> = listed(&h).await["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|d| d["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(left, doors, "exactly the motion letters went");

    // One replayed by hand, then a job for the door letters takes the rest.
    let path = format!("/v1/dead-letters/{}/replay", doors[0]);
    let (status, body) = call(&h, reqwest::Method::POST, &path, OPERATOR_TOKEN).await;
    assert_eq!(status, 202, "{body}");
    let replayed_event = body["event_id"].as_str().expect("event id").to_string();
    let (status, job, location) = post_json(
        &h,
        "/v1/replays",
        serde_json::json!({"type": "door.forced_open", "rate_per_second": 1000}),
    )
    .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("job id").to_string();
    assert_eq!(
        location.as_deref(),
        Some(format!("/v1/replays/{id}").as_str())
    );
    assert_eq!(
        job["matched"], 2,
        "the one replayed already is not taken: {job}"
    );
    assert_eq!(job["created_by"], "on-call");
    assert_eq!(
        job["filter"],
        serde_json::json!({"type": "door.forced_open"})
    );
    let done = wait_job(&h, &id, "done", |j| j["state"] == "done").await;
    assert_eq!(done["replayed"], 2, "{done}");
    mock.wait_for(8).await;

    let path = format!("/v1/dead-letters/{}", doors[1]);
    let (status, _) = call(&h, reqwest::Method::DELETE, &path, OPERATOR_TOKEN).await;
    assert_eq!(status, 204);

    let entries = audit(&h).await;
    let shape: Vec<(String, u64)> = entries
        .iter()
        .map(|e| {
            assert_eq!(e["token"], "on-call", "the token's name: {e}");
            assert!(e["at"].as_str().is_some_and(|t| t.ends_with('Z')), "{e}");
            (
                e["action"].as_str().expect("action").to_string(),
                e["count"].as_u64().expect("count"),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            ("purge_filter".to_string(), 2),
            ("replay".to_string(), 1),
            ("replay_job".to_string(), 2),
            ("purge".to_string(), 1),
        ]
    );
    assert_eq!(entries[0]["filter"], serde_json::json!({"type": "motion"}));
    assert_eq!(entries[1]["target"], doors[0].as_str());
    assert_eq!(entries[1]["event_id"], replayed_event.as_str());
    assert_eq!(entries[2]["target"], id.as_str());
    assert_eq!(entries[3]["target"], doors[1].as_str());
    let text = serde_json::to_string(&entries).expect("json");
    assert!(!text.contains(OPERATOR_TOKEN), "never the secret");

    let (_, page) = h.get("/v1/audit?limit=3").await;
    let next = page["next"].as_str().expect("a second page");
    let (_, rest) = h.get(&format!("/v1/audit?after={next}")).await;
    assert_eq!(rest["entries"][0]["action"], "purge", "{rest}");
    assert!(rest["next"].is_null());
}

#[tokio::test]
async fn a_replay_job_keeps_to_its_rate_on_the_driven_clock() {
    let (h, mock, _dir) = setup(REFUSES_400, "").await;
    let mut events = Vec::new();
    for _ in 0..25 {
        events.push(dead_one(&h, &mock, "door.forced_open").await.0);
    }
    // Ten a second: one letter a batch, a batch every 100 ms of herald's clock.
    let (status, job, _) = post_json(
        &h,
        "/v1/replays",
        serde_json::json!({"rate_per_second": 10}),
    )
    .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id").to_string();
    wait_job(&h, &id, "the first batch", |j| j["replayed"] == 1).await;
    h.quiesce().await;
    let (_, job) = h.get(&format!("/v1/replays/{id}")).await;
    assert_eq!(job["replayed"], 1, "the clock stands still: {job}");

    h.clock.advance(std::time::Duration::from_millis(1_000));
    wait_job(&h, &id, "a second's worth", |j| j["replayed"] == 11).await;
    h.quiesce().await;
    let (_, job) = h.get(&format!("/v1/replays/{id}")).await;
    assert_eq!(job["replayed"], 11, "no more than the rate allows: {job}");
    assert_eq!(job["state"], "running");

    h.clock.advance(std::time::Duration::from_millis(1_400));
    let done = wait_job(&h, &id, "done", |j| j["state"] == "done").await;
    assert_eq!(done["replayed"], 25, "{done}");
    let sent = mock.wait_for(50).await;
    for event in &events {
        let times = sent
            .iter()
            .filter(|r| r.body["id"] == event.as_str() && r.answered == Some(200))
            .count();
        assert_eq!(times, 1, "event {event} delivered once by the job");
    }
    let (_, jobs) = h.get("/v1/replays").await;
    assert_eq!(jobs["items"][0]["id"], id.as_str());
}

#[tokio::test]
async fn a_replay_job_goes_on_after_a_restart_where_it_stopped() {
    let clock = herald::clock::Clock::manual(START_MS);
    let mock = MockPartner::start(clock.clone()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let toml = config_toml(
        dir.path(),
        &partner_toml("acme", &mock.url, REFUSES_400),
        "",
    );
    let h = TestHerald::start(&toml, clock.clone()).await;
    let mut events = Vec::new();
    for _ in 0..12 {
        events.push(dead_one(&h, &mock, "door.forced_open").await.0);
    }
    let (status, job, _) = post_json(
        &h,
        "/v1/replays",
        serde_json::json!({"rate_per_second": 10}),
    )
    .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id").to_string();
    clock.advance(std::time::Duration::from_millis(400));
    wait_job(&h, &id, "five replayed", |j| j["replayed"] == 5).await;
    h.quiesce().await;
    h.herald.shutdown().await.expect("clean shutdown");

    let h = TestHerald::start(&toml, clock.clone()).await;
    let (_, job) = h.get(&format!("/v1/replays/{id}")).await;
    assert_eq!(job["state"], "running", "{job}");
    clock.advance(std::time::Duration::from_millis(1_000));
    let done = wait_job(&h, &id, "done", |j| j["state"] == "done").await;
    assert_eq!(done["replayed"], 12, "{done}");
    assert_eq!(done["matched"], 12, "{done}");
    let sent = mock.wait_for(24).await;
    h.quiesce().await;
    for event in &events {
        let delivered = mock
            .requests()
            .iter()
            .filter(|r| r.body["id"] == event.as_str() && r.answered == Some(200))
            .count();
        assert_eq!(delivered, 1, "event {event} once: {} requests", sent.len());
    }
}

#[tokio::test]
async fn bad_bulk_bodies_are_refused_by_field() {
    let (h, _mock, _dir) = setup(REFUSES_400, "").await;
    let cases = [
        ("/v1/replays", r#"{"colour": "red"}"#, 422, "/colour"),
        (
            "/v1/replays",
            r#"{"rate_per_second": 0}"#,
            422,
            "/rate_per_second",
        ),
        (
            "/v1/replays",
            r#"{"rate_per_second": 1000000}"#,
            422,
            "/rate_per_second",
        ),
        (
            "/v1/replays",
            r#"{"rate_per_second": "fast"}"#,
            422,
            "/rate_per_second",
        ),
        ("/v1/replays", r#"{"since": "yesterday"}"#, 422, "/since"),
        (
            "/v1/replays",
            r#"{"until": "2026-11-25T06:00:00Z", "since": "2026-11-25T07:00:00Z"}"#,
            422,
            "/until",
        ),
        ("/v1/replays", r#"{"priority": "urgent"}"#, 422, "/priority"),
        ("/v1/replays", r#"{"partner": "nobody"}"#, 422, "/partner"),
        ("/v1/replays", r#"{"partner": 7}"#, 422, "/partner"),
        ("/v1/replays", r#"{"dry_run": "yes"}"#, 422, "/dry_run"),
        ("/v1/replays", r#"{"replayed": true}"#, 422, "/replayed"),
        (
            "/v1/dead-letters/purge",
            r#"{"replayed": "no"}"#,
            422,
            "/replayed",
        ),
        ("/v1/replays", r#"["partner"]"#, 422, ""),
        ("/v1/replays", r#"{"partner": "#, 400, ""),
        (
            "/v1/dead-letters/purge",
            r#"{"rate_per_second": 5}"#,
            422,
            "/rate_per_second",
        ),
        (
            "/v1/dead-letters/purge",
            r#"{"device": "lock-1"}"#,
            422,
            "/device",
        ),
    ];
    for (path, body, status, field) in cases {
        let response = h
            .http
            .post(h.url(path))
            .bearer_auth(OPERATOR_TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("herald answers");
        let (got, problem) = read(response).await;
        assert_eq!(got, status, "{path} {body}: {problem}");
        if !field.is_empty() {
            assert_eq!(problem["field"], field, "{path} {body}: {problem}");
        }
    }
    for path in ["/v1/replays", "/v1/dead-letters/purge"] {
        let response = h
            .http
            .post(h.url(path))
            .bearer_auth(INGEST_TOKEN)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .expect("herald answers");
        assert_eq!(response.status(), 403, "{path}");
    }
    for (path, status) in [
        ("/v1/replays/not-an-id", 400),
        ("/v1/replays/01936b2a-5c00-7000-8000-00000000d001", 404),
        ("/v1/audit?after=nope", 400),
        ("/v1/audit?limit=0", 422),
    ] {
        let (got, problem) = h.get(path).await;
        assert_eq!(got, status, "{path}: {problem}");
        if path.contains("after=") {
            assert_eq!(problem["field"], "/after", "{path}: {problem}");
        }
    }
    assert!(
        audit(&h).await.is_empty(),
        "refused requests leave no entry"
    );
    let (_, jobs) = h.get("/v1/replays").await;
    assert_eq!(jobs["items"], serde_json::json!([]));
}

#[tokio::test]
async fn letters_of_a_partner_since_removed_are_not_replayed_but_can_be_purged() {
    let clock = herald::clock::Clock::manual(START_MS);
    let mock = MockPartner::start(clock.clone()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let both = format!(
        "{}{}",
        partner_toml("acme", &mock.url, REFUSES_400),
        partner_toml("beta", &mock.url, REFUSES_400)
    );
    let h = TestHerald::start(&config_toml(dir.path(), &both, ""), clock.clone()).await;
    dead_one(&h, &mock, "door.forced_open").await;
    mock.script([Reply::Status(400)]);
    let (status, body) = h
        .post_events(r#"{"device_id":"lock-7f3a","type":"motion","partners":["beta"]}"#)
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    h.wait_event(&id, "dead", |e| {
        e.deliveries[0].state == DeliveryState::Dead
    })
    .await;
    h.herald.shutdown().await.expect("clean shutdown");

    // beta leaves the config; its letter stays.
    let only_acme = partner_toml("acme", &mock.url, REFUSES_400);
    let h = TestHerald::start(&config_toml(dir.path(), &only_acme, ""), clock).await;
    let (_, all) = h.get("/v1/dead-letters").await;
    assert_eq!(all["items"].as_array().map(Vec::len), Some(2), "{all}");
    let (status, dry, _) = post_json(&h, "/v1/replays", serde_json::json!({"dry_run": true})).await;
    assert_eq!(status, 200, "{dry}");
    assert_eq!(dry["partners"], serde_json::json!({"acme": 1}), "{dry}");
    let (status, problem, _) =
        post_json(&h, "/v1/replays", serde_json::json!({"partner": "beta"})).await;
    assert_eq!(status, 422, "{problem}");
    let (status, purged, _) = post_json(
        &h,
        "/v1/dead-letters/purge",
        serde_json::json!({"partner": "beta"}),
    )
    .await;
    assert_eq!(status, 200, "{purged}");
    assert_eq!(purged["purged"], 1);
    let (_, left) = h.get("/v1/dead-letters").await;
    assert_eq!(left["items"][0]["partner"], "acme", "{left}");
    assert_eq!(left["items"].as_array().map(Vec::len), Some(1), "{left}");
}
