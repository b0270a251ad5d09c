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
