//! Critical lane and partner protection, on a driven clock against a real
//! mock partner: critical work overtakes a backlog at the window and at the
//! rate limiter; a down partner trips the breaker, is probed, not hammered,
//! and nothing it holds is lost or spends attempts.

mod common;

use std::time::Duration;

use common::{settle, setup, Reply};
use herald::model::DeliveryState;

/// Posts `n` normal events to `acme`, 100 per request.
async fn queue_normal(h: &common::TestHerald, n: usize) {
    for start in (0..n).step_by(100) {
        let batch: Vec<String> = (start..(start + 100).min(n))
            .map(|i| format!(r#"{{"device_id":"t-{i}","type":"temp","partners":["acme"]}}"#))
            .collect();
        let (status, body) = h.post_events(&format!("[{}]", batch.join(","))).await;
        assert_eq!(status, 202, "{body}");
    }
}

fn priorities(mock: &common::MockPartner) -> Vec<String> {
    mock.requests()
        .iter()
        .map(|r| r.body["priority"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[tokio::test]
async fn a_critical_event_takes_the_next_token_behind_ten_thousand_normal_ones() {
    let (h, mock, _dir) = setup("rate = { per_second = 100, burst = 1 }", "").await;
    queue_normal(&h, 10_000).await;
    mock.wait_for(1).await;
    settle().await;
    assert_eq!(
        mock.requests().len(),
        1,
        "burst 1: one send, the rest wait for tokens"
    );

    let enqueued_ms = h.clock.now_ms();
    let (critical_id, _) = h.send_one("acme", "critical").await;
    settle().await;
    // One token every 10 ms: two token intervals on the driven clock.
    for sent in 2..=3 {
        h.clock.advance(Duration::from_millis(10));
        mock.wait_for(sent).await;
    }
    let requests = mock.requests();
    let critical = requests
        .iter()
        .position(|r| r.body["priority"] == "critical")
        .unwrap_or_else(|| panic!("no critical send in {:?}", priorities(&mock)));
    assert!(
        requests[critical].at_ms <= enqueued_ms + 20,
        "sent {} ms after it was enqueued",
        requests[critical].at_ms - enqueued_ms
    );
    // Not just within two: the very next token, ahead of the normal send already waiting for it.
    assert_eq!(critical, 1, "sent in order {:?}", priorities(&mock));
    h.wait_event(&critical_id, "delivered", |e| {
        e.deliveries[0].state == DeliveryState::Delivered
    })
    .await;
    // The backlog keeps flowing after it.
    h.clock.advance(Duration::from_millis(10));
    mock.wait_for(4).await;
}

#[tokio::test]
async fn a_critical_event_overtakes_a_queued_backlog() {
    let (h, mock, _dir) = setup(
        "rate = { per_second = 10, burst = 1 }\nmax_in_flight = 1",
        "",
    )
    .await;
    // More than the lane's window holds (64), so the window is full.
    let backlog: Vec<String> = (0..100)
        .map(|i| format!(r#"{{"device_id":"t-{i}","type":"temp","partners":["acme"]}}"#))
        .collect();
    let (status, _) = h.post_events(&format!("[{}]", backlog.join(","))).await;
    assert_eq!(status, 202);
    mock.wait_for(1).await;
    let (critical_id, _) = h.send_one("acme", "critical").await;
    // One token interval at a time: the alert goes within the next two sends
    // (the normal send already holding the next token may go first).
    for sent in 2..=3 {
        h.clock.advance(Duration::from_millis(100));
        mock.wait_for(sent).await;
    }
    let priorities: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| r.body["priority"].as_str().unwrap().to_string())
        .collect();
    assert!(
        priorities[1..3].iter().any(|p| p == "critical"),
        "sent in order {priorities:?}"
    );
    h.wait_event(&critical_id, "delivered", |e| {
        e.deliveries[0].state == DeliveryState::Delivered
    })
    .await;
}

#[tokio::test]
async fn a_down_partner_opens_the_breaker_and_held_deliveries_keep_their_attempts() {
    let (h, mock, _dir) = setup(
        r#"max_in_flight = 1
retry = { initial_ms = 1000, max_interval_ms = 1000, max_attempts = 3 }
breaker = { failures = 3, cool_down = "10s", max_cool_down = "60s" }"#,
        "",
    )
    .await;
    // Three failures open it; the first probe fails too; the second is answered.
    mock.script([
        Reply::Status(503),
        Reply::Status(503),
        Reply::Status(503),
        Reply::Status(503),
    ]);
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(h.send_one("acme", "critical").await.0);
    }
    mock.wait_for(3).await;
    let breaker = |view: serde_json::Value| view["partners"][0]["breaker"].clone();
    let (_, partners) = h.get("/v1/partners").await;
    assert_eq!(breaker(partners), "open");

    // Held: nothing goes out before the cool-down ends, however long the retries' due times passed.
    h.clock.advance(Duration::from_millis(9_999));
    settle().await;
    assert_eq!(mock.requests().len(), 3, "an open breaker sends nothing");
    h.clock.advance(Duration::from_millis(1));
    mock.wait_for(4).await;
    settle().await;
    assert_eq!(mock.requests().len(), 4, "exactly one probe");
    // That probe failed: the next cool-down is twice as long.
    h.clock.advance(Duration::from_millis(19_999));
    settle().await;
    assert_eq!(mock.requests().len(), 4);
    h.clock.advance(Duration::from_millis(1));
    mock.wait_for(24).await;
    settle().await;
    assert_eq!(
        mock.requests().len(),
        24,
        "4 failures, then each event once"
    );

    let (_, partners) = h.get("/v1/partners").await;
    assert_eq!(breaker(partners.clone()), "closed");
    assert_eq!(partners["partners"][0]["delivered"], 20);
    assert_eq!(partners["partners"][0]["dead"], 0);
    for id in &ids {
        let event = h
            .wait_event(id, "delivered", |e| {
                e.deliveries[0].state == DeliveryState::Delivered
            })
            .await;
        // max_attempts = 3 was never reached: waiting behind the breaker is not an attempt.
        assert!(
            event.deliveries[0].attempts <= 3,
            "{:?}",
            event.deliveries[0]
        );
    }
    let (_, dead) = h.get("/v1/dead-letters").await;
    assert_eq!(dead["items"].as_array().map_or(0, Vec::len), 0, "{dead}");
}
