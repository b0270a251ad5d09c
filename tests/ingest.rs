//! Ingest over real HTTP: what a calling service sees for good and bad
//! requests, and that a rejected request stores nothing.

mod common;

use common::{config_toml, partner_toml, MockPartner, TestHerald, INGEST_TOKEN, START_MS};
use herald::clock::Clock;

async fn setup() -> (TestHerald, MockPartner, tempfile::TempDir) {
    let clock = Clock::manual(START_MS);
    let mock = MockPartner::start(clock.clone()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let partners = partner_toml("acme", &mock.url, r#"subscribe = ["door.*"]"#)
        + &partner_toml("globex", &mock.url, "");
    let toml = config_toml(dir.path(), &partners, "max_batch = 50");
    (TestHerald::start(&toml, clock).await, mock, dir)
}

#[tokio::test]
async fn bad_bodies_get_a_problem_naming_the_field_and_store_nothing() {
    let (h, _mock, _dir) = setup().await;
    let big = "x".repeat(70 * 1024);
    let cases: Vec<(String, u16, Option<&str>, &str)> = vec![
        ("this is not json".into(), 400, None, "JSON"),
        ("{\"device_id\": ".into(), 400, None, "JSON"),
        (r#"{"type":"door.forced_open","partners":["acme"]}"#.into(), 422, Some("/device_id"), "missing field"),
        (r#"{"device_id":"lock-1","type":"door.forced_open","priority":"urgent","partners":["acme"]}"#.into(), 422, Some("/priority"), "urgent"),
        (r#"{"device_id":"","type":"door.forced_open","partners":["acme"]}"#.into(), 422, Some("/device_id"), "empty"),
        (r#"{"device_id":"lock-1","type":"door.forced_open","occurred_at":"yesterday","partners":["acme"]}"#.into(), 422, Some("/occurred_at"), "RFC 3339"),
        (r#"{"device_id":"lock-1","type":"door.forced_open","data":[1,2],"partners":["acme"]}"#.into(), 422, Some("/data"), "object"),
        (r#"{"device_id":"lock-1","type":"door.forced_open","partners":["acme","initech"]}"#.into(), 422, Some("/partners/1"), "initech"),
        (r#"{"device_id":"lock-1","type":"motion"}"#.into(), 422, Some("/partners"), "no partner subscribes"),
        (format!(r#"{{"device_id":"lock-1","type":"door.forced_open","data":{{"blob":"{big}"}},"partners":["acme"]}}"#), 413, Some("/data"), "limit"),
        (
            r#"[{"device_id":"a","type":"door.forced_open","partners":["acme"]},{"device_id":"b","partners":["acme"]}]"#.into(),
            422,
            Some("/1/type"),
            "missing field",
        ),
        (format!("[{}]", vec![r#"{"device_id":"a","type":"t","partners":["acme"]}"#; 51].join(",")), 413, None, "max_batch"),
        ("[]".into(), 422, Some(""), "empty"),
    ];
    for (body, status, field, words) in cases {
        let (got, problem) = h.post_events(&body).await;
        let shown = &body[..body.len().min(80)];
        assert_eq!(got, status, "{shown}: {problem}");
        assert_eq!(problem["status"], status, "{shown}");
        assert!(
            problem["type"].as_str().unwrap().starts_with("/problems/"),
            "{problem}"
        );
        if let Some(field) = field {
            assert_eq!(problem["field"], field, "{shown}: {problem}");
        }
        assert!(
            problem["detail"].as_str().unwrap().contains(words),
            "{shown}: {problem}"
        );
        assert_eq!(
            h.deliveries_held_or_sent().await,
            0,
            "{shown}: nothing is stored"
        );
    }
}

#[tokio::test]
async fn tokens_are_required_and_roles_enforced() {
    let (h, _mock, _dir) = setup().await;
    let body = r#"{"device_id":"lock-1","type":"door.forced_open","partners":["acme"]}"#;
    for auth in [None, Some("Bearer not-a-real-token"), Some("Basic abc")] {
        let mut request = h.http.post(h.url("/v1/events")).body(body);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let (status, problem) = common::read(request.send().await.unwrap()).await;
        assert_eq!(status, 401, "{auth:?}: {problem}");
    }
    assert_eq!(h.deliveries_held_or_sent().await, 0);
    let response = h
        .http
        .get(h.url("/v1/dead-letters"))
        .bearer_auth(INGEST_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        403,
        "ingest tokens cannot read dead letters"
    );
}

#[tokio::test]
async fn an_idempotency_key_reused_creates_nothing_new() {
    let (h, mock, _dir) = setup().await;
    let body = r#"{"device_id":"lock-1","type":"door.forced_open","idempotency_key":"lock-1/88412","partners":["acme"]}"#;
    let (status, first) = h.post_events(body).await;
    assert_eq!(status, 202, "{first}");
    assert!(first.get("duplicate").is_none());
    let (status, again) = h.post_events(body).await;
    assert_eq!(status, 202);
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["deliveries"], first["deliveries"]);
    assert_eq!(again["duplicate"], true);
    // The same key twice in one batch: one event.
    let batch = format!("[{body},{body}]");
    let (status, answers) = h.post_events(&batch).await;
    assert_eq!(status, 202);
    assert_eq!(answers[0]["id"], first["id"]);
    assert_eq!(answers[1]["id"], first["id"]);

    mock.wait_for(1).await;
    h.quiesce().await;
    assert_eq!(mock.requests().len(), 1, "delivered once");
    assert_eq!(
        h.deliveries_held_or_sent().await,
        1,
        "one delivery made, none queued"
    );
}

#[tokio::test]
async fn a_batch_answers_one_entry_per_event_in_order_and_routes_by_subscription() {
    let (h, mock, _dir) = setup().await;
    let (status, answers) = h
        .post_events(
            r#"[{"device_id":"a","type":"door.opened"},
                {"device_id":"b","type":"temp.high","partners":["globex"]},
                {"device_id":"c","type":"door.closed","partners":["acme","globex","acme"]}]"#,
        )
        .await;
    assert_eq!(status, 202, "{answers}");
    let partners = |i: usize| -> Vec<String> {
        answers[i]["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["partner"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(partners(0), ["acme"], "door.* subscription");
    assert_eq!(partners(1), ["globex"]);
    assert_eq!(partners(2), ["acme", "globex"], "duplicates collapse");
    let got = mock.wait_for(4).await;
    let mut devices: Vec<&str> = got
        .iter()
        .map(|r| r.body["device_id"].as_str().unwrap())
        .collect();
    devices.sort();
    assert_eq!(devices, ["a", "b", "c", "c"]);
    for (i, device) in ["a", "b", "c"].iter().enumerate() {
        let id = answers[i]["id"].as_str().unwrap();
        let (status, view) = h.get(&format!("/v1/events/{id}")).await;
        assert_eq!(status, 200);
        assert_eq!(view["device_id"], *device);
    }
}

#[tokio::test]
async fn unknown_ids_and_paths_are_problems_too() {
    let (h, _mock, _dir) = setup().await;
    let (status, problem) = h.get("/v1/events/not-a-uuid").await;
    assert_eq!(status, 400, "a malformed id is the caller's error");
    assert_eq!(problem["type"], "/problems/bad-path-parameter");
    let (status, _) = h.get(&format!("/v1/events/{}", uuid::Uuid::now_v7())).await;
    assert_eq!(status, 404);
    let (status, _) = h.get("/v1/nothing-here").await;
    assert_eq!(status, 404);
    let (status, problem) = h.get("/v1/dead-letters?limit=0").await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["field"], "/limit");
    let (status, problem) = h.get("/v1/dead-letters?priority=urgent").await;
    assert_eq!(status, 422, "{problem}");
}
