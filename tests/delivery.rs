//! Delivery against a real mock partner over loopback, on a driven clock:
//! first-try success, retries and their spacing, Retry-After, permanent
//! failures, timeouts, max age, restart, retention.

mod common;

use std::time::Duration;

use common::{
    config_toml, partner_toml, setup, setup_on, MockPartner, Reply, TestHerald, SECRET, START_MS,
};
use herald::clock::Clock;
use herald::dispatch::retry::RetryPolicy;
use herald::model::DeliveryState;
use uuid::Uuid;

fn policy(h: &TestHerald) -> RetryPolicy {
    h.config.partner("acme").expect("acme").retry.clone()
}

#[tokio::test]
async fn delivered_first_try_signed_per_standard_webhooks() {
    let (h, mock, _dir) = setup("", "").await;
    let (event_id, delivery_id) = h.send_one("acme", "critical").await;

    let got = mock.wait_for(1).await;
    let request = &got[0];
    assert_eq!(request.webhook_id, delivery_id);
    assert_eq!(request.body["id"], event_id.as_str());
    assert_eq!(request.body["type"], "door.forced_open");
    assert_eq!(request.body["device_id"], "lock-7f3a");
    assert_eq!(request.body["priority"], "critical");
    assert_eq!(request.body["data"]["value"], "forced_open");
    assert_eq!(request.timestamp, (START_MS / 1000).to_string());
    let key = adapters::webhook::decode_secret(SECRET).expect("secret");
    let expected = adapters::webhook::sign(&key, &delivery_id, START_MS / 1000, &request.raw);
    assert_eq!(
        request.signature, expected,
        "the signature verifies with the partner's secret"
    );

    h.wait_event(&event_id, "delivered", |e| {
        e.deliveries[0].state == DeliveryState::Delivered
    })
    .await;
    let (status, view) = h.get(&format!("/v1/events/{event_id}")).await;
    assert_eq!(status, 200);
    let delivery = &view["deliveries"][0];
    assert_eq!(delivery["state"], "delivered");
    assert_eq!(delivery["attempts"], 1);
    assert_eq!(delivery["history"][0]["status"], 200);
    assert_eq!(mock.requests().len(), 1, "delivered exactly once");
}

#[tokio::test]
async fn server_errors_are_retried_with_the_same_id_on_the_policys_schedule() {
    let (h, mock, _dir) = setup(
        "retry = { initial_ms = 1000, multiplier = 2.0, max_interval_ms = 60000 }",
        "",
    )
    .await;
    mock.script([Reply::Status(500), Reply::Status(500)]);
    let (event_id, delivery_id) = h.send_one("acme", "normal").await;
    let delivery = Uuid::parse_str(&delivery_id).unwrap();
    let policy = policy(&h);

    for failures in 1..=2u32 {
        let got = mock.wait_for(failures as usize).await;
        let event = h
            .wait_event(&event_id, "retry scheduled", |e| {
                e.deliveries[0].attempts == failures && e.deliveries[0].next_due_ms.is_some()
            })
            .await;
        let attempt_at = got[failures as usize - 1].at_ms;
        let due = event.deliveries[0].next_due_ms.unwrap();
        assert_eq!(
            due - attempt_at,
            policy.delay_ms(delivery, failures),
            "delay after failure {failures}"
        );
        assert!(
            due - attempt_at >= policy.initial_ms
                && due - attempt_at <= policy.ceiling_ms(failures)
        );

        // One millisecond early: nothing goes out.
        h.clock
            .advance(Duration::from_millis(due - h.clock.now_ms() - 1));
        h.quiesce().await;
        assert_eq!(
            mock.requests().len(),
            failures as usize,
            "no retry before it is due"
        );
        h.clock.advance(Duration::from_millis(1));
    }
    let got = mock.wait_for(3).await;
    assert!(
        got.iter().all(|r| r.webhook_id == delivery_id),
        "webhook-id is stable across retries"
    );
    let event = h
        .wait_event(&event_id, "delivered", |e| {
            e.deliveries[0].state == DeliveryState::Delivered
        })
        .await;
    assert_eq!(event.deliveries[0].attempts, 3);

    let (_, view) = h.get(&format!("/v1/events/{event_id}")).await;
    let history = view["deliveries"][0]["history"]
        .as_array()
        .expect("history")
        .clone();
    let statuses: Vec<u64> = history
        .iter()
        .map(|a| a["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [500, 500, 200]);
    assert!(history[0]["detail"].as_str().unwrap().contains("HTTP 500"));
}

#[tokio::test]
async fn retry_after_is_honoured_as_a_minimum() {
    let (h, mock, _dir) = setup("retry = { initial_ms = 100, max_interval_ms = 60000 }", "").await;
    mock.script([Reply::WithHeader(429, "retry-after", "2".into())]);
    let (event_id, _) = h.send_one("acme", "normal").await;

    let first = mock.wait_for(1).await[0].at_ms;
    let event = h
        .wait_event(&event_id, "retry scheduled", |e| {
            e.deliveries[0].attempts == 1
        })
        .await;
    assert_eq!(
        event.deliveries[0].next_due_ms,
        Some(first + 2000),
        "the partner's 2 s, not the policy's 100 ms"
    );

    h.clock.advance(Duration::from_millis(1999));
    h.quiesce().await;
    assert_eq!(mock.requests().len(), 1, "no retry before Retry-After");
    h.clock.advance(Duration::from_millis(1));
    let got = mock.wait_for(2).await;
    assert_eq!(got[1].at_ms - got[0].at_ms, 2000);
    h.wait_event(&event_id, "delivered", |e| {
        e.deliveries[0].state == DeliveryState::Delivered
    })
    .await;
}

#[tokio::test]
async fn retry_after_as_http_date_is_read_on_herald_clock() {
    let (h, mock, _dir) = setup("retry = { initial_ms = 100, max_interval_ms = 60000 }", "").await;
    let in_five_seconds =
        httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_millis(START_MS + 5000));
    mock.script([Reply::WithHeader(503, "retry-after", in_five_seconds)]);
    let (event_id, _) = h.send_one("acme", "normal").await;
    mock.wait_for(1).await;
    let event = h
        .wait_event(&event_id, "retry scheduled", |e| {
            e.deliveries[0].attempts == 1
        })
        .await;
    assert_eq!(event.deliveries[0].next_due_ms, Some(START_MS + 5000));
}

#[tokio::test]
async fn a_status_the_partner_names_permanent_is_a_dead_letter_at_once() {
    let (h, mock, _dir) = setup("permanent_statuses = [400]", "").await;
    mock.script([Reply::Status(400)]);
    let (event_id, delivery_id) = h.send_one("acme", "critical").await;
    mock.wait_for(1).await;
    let event = h
        .wait_event(&event_id, "dead", |e| {
            e.deliveries[0].state == DeliveryState::Dead
        })
        .await;
    let dead_id = event.deliveries[0].dead_letter.expect("dead letter id");

    let (status, dead) = h.get(&format!("/v1/dead-letters/{dead_id}")).await;
    assert_eq!(status, 200, "{dead}");
    assert_eq!(dead["delivery_id"], delivery_id.as_str());
    assert_eq!(dead["partner"], "acme");
    assert!(
        dead["reason"].as_str().unwrap().contains("HTTP 400"),
        "{dead}"
    );
    assert_eq!(dead["event"]["id"], event_id.as_str());
    assert_eq!(dead["event"]["data"]["value"], "forced_open");
    let attempts = dead["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["status"], 400);
    assert!(attempts[0]["latency_ms"].is_u64());

    let (status, page) = h
        .get("/v1/dead-letters?partner=acme&priority=critical")
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["items"][0]["id"], dead_id.to_string().as_str());
    let (_, other) = h.get("/v1/dead-letters?partner=nobody").await;
    assert_eq!(other["items"].as_array().unwrap().len(), 0);

    // Nothing more is sent for it, whatever time passes.
    h.clock.advance(Duration::from_secs(3600));
    h.quiesce().await;
    assert_eq!(mock.requests().len(), 1);
    assert_eq!(h.herald.store().scheduled_count("acme"), 0);
}

#[tokio::test]
async fn a_partner_that_does_not_answer_times_out_on_herald_clock() {
    let (h, mock, _dir) = setup("retry = { initial_ms = 500, max_interval_ms = 60000 }", "").await;
    mock.script([Reply::Hang]);
    let (event_id, _) = h.send_one("acme", "normal").await;
    mock.wait_for(1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let event = h
        .herald
        .store()
        .event(Uuid::parse_str(&event_id).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(
        event.deliveries[0].attempts, 0,
        "still waiting for the answer"
    );

    h.clock.advance(Duration::from_millis(1000)); // timeout_ms
    let event = h
        .wait_event(&event_id, "timed out", |e| e.deliveries[0].attempts == 1)
        .await;
    let last = event.deliveries[0].last_attempt.clone().unwrap();
    assert_eq!(last.status, None);
    assert!(last.detail.contains("timed out"), "{}", last.detail);
    assert_eq!(last.latency_ms, 1000);

    let due = event.deliveries[0].next_due_ms.unwrap();
    h.clock
        .advance(Duration::from_millis(due - h.clock.now_ms()));
    mock.wait_for(2).await;
    h.wait_event(&event_id, "delivered", |e| {
        e.deliveries[0].state == DeliveryState::Delivered
    })
    .await;
}

#[tokio::test]
async fn unreachable_partner_is_retried_until_max_age_then_dead() {
    // Nothing listens on this port: connection refused on every attempt.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    let clock = Clock::manual(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let partner = partner_toml(
        "acme",
        &url,
        // The breaker off: this is about the retry schedule alone.
        r#"retry = { initial_ms = 1000, max_interval_ms = 4000, max_age = "20s" }
breaker = { failures = 0 }"#,
    );
    let h = TestHerald::start(&config_toml(dir.path(), &partner, ""), clock).await;
    let (event_id, _) = h.send_one("acme", "normal").await;

    let mut failures = 0;
    loop {
        let event = h
            .wait_event(&event_id, "next attempt recorded", |e| {
                e.deliveries[0].attempts > failures
            })
            .await;
        failures = event.deliveries[0].attempts;
        match event.deliveries[0].next_due_ms {
            Some(due) if event.deliveries[0].state == DeliveryState::Pending => {
                h.clock
                    .advance(Duration::from_millis(due.saturating_sub(h.clock.now_ms())));
            }
            _ => break,
        }
        assert!(failures < 50, "never gave up");
    }
    let event = h
        .wait_event(&event_id, "dead", |e| {
            e.deliveries[0].state == DeliveryState::Dead
        })
        .await;
    assert!(failures >= 5, "retried a few times first ({failures})");
    let dead = h
        .herald
        .store()
        .dead_letter(event.deliveries[0].dead_letter.unwrap())
        .unwrap()
        .unwrap();
    assert!(dead.reason.contains("max_age"), "{}", dead.reason);
    assert_eq!(
        dead.attempts.attempts.len() as u32,
        failures,
        "every attempt is kept"
    );
    assert!(dead
        .attempts
        .attempts
        .iter()
        .all(|a| a.status.is_none() && a.detail.contains("network error")));
    assert!(h.clock.now_ms() - START_MS <= 20_000 + 4_000);
}

#[tokio::test]
async fn in_flight_work_survives_a_restart() {
    let clock = Clock::manual(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let hanging = MockPartner::start(clock.clone()).await;
    hanging.script((0..10).map(|_| Reply::Hang));
    let toml = config_toml(dir.path(), &partner_toml("acme", &hanging.url, ""), "");
    let h = TestHerald::start(&toml, clock.clone()).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(h.send_one("acme", "normal").await.0);
    }
    hanging.wait_for(3).await;
    h.herald.shutdown().await.expect("clean shutdown");

    let fresh = MockPartner::start(clock.clone()).await;
    let toml = config_toml(dir.path(), &partner_toml("acme", &fresh.url, ""), "");
    let h = TestHerald::start(&toml, clock).await;
    let got = fresh.wait_for(3).await;
    let mut delivered: Vec<String> = got
        .iter()
        .map(|r| r.body["id"].as_str().unwrap().to_string())
        .collect();
    delivered.sort();
    ids.sort();
    assert_eq!(delivered, ids);
    for id in &ids {
        h.wait_event(id, "delivered", |e| {
            e.deliveries[0].state == DeliveryState::Delivered
        })
        .await;
    }
}

#[tokio::test]
async fn finished_events_leave_the_store_after_retention() {
    let (h, mock, _dir) = setup("", r#"retention = "10s""#).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(h.send_one("acme", "normal").await.0);
    }
    mock.wait_for(20).await;
    for id in &ids {
        h.wait_event(id, "delivered", |e| e.is_finished()).await;
    }
    h.wait_queued("acme", 0).await;

    h.clock.advance(Duration::from_secs(11));
    herald::retention::collect_once(h.herald.store(), &h.clock, Duration::from_secs(10))
        .await
        .unwrap();
    // What each record kind does at retention is checked in the store's
    // own tests; here, what on-call sees: the events are gone.
    for id in &ids {
        let (status, _) = h.get(&format!("/v1/events/{id}")).await;
        assert_eq!(status, 404, "{id} is collected");
    }
}

#[tokio::test]
async fn the_rate_limit_spaces_sends_on_herald_clock() {
    let (h, mock, _dir) = setup("rate = { per_second = 10, burst = 1 }", "").await;
    for _ in 0..5 {
        h.send_one("acme", "normal").await;
    }
    mock.wait_for(1).await;
    h.quiesce().await;
    assert_eq!(
        mock.requests().len(),
        1,
        "burst 1: one send, then wait for a token"
    );
    for sent in 2..=5 {
        h.clock.advance(Duration::from_millis(100));
        mock.wait_for(sent).await;
    }
    let at: Vec<u64> = mock.requests().iter().map(|r| r.at_ms).collect();
    assert!(at.windows(2).all(|w| w[1] - w[0] == 100), "{at:?}");
}

#[tokio::test]
async fn one_batch_shares_a_chunk_and_each_delivery_keeps_its_own_outcome() {
    let clock = Clock::manual(START_MS);
    let mock = MockPartner::start(clock.clone()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let toml = config_toml(
        dir.path(),
        &partner_toml(
            "acme",
            &mock.url,
            "max_in_flight = 1\nretry = { initial_ms = 1000, multiplier = 2.0, max_interval_ms = 1000 }\npermanent_statuses = [400]",
        ),
        r#"retention = "1h""#,
    );
    let h = TestHerald::start(&toml, clock.clone()).await;
    let script = [200, 500, 400, 200, 200, 500, 200, 200, 200, 400];
    mock.script(script.iter().map(|&s| Reply::Status(s)));
    let batch: Vec<String> = (0..script.len())
        .map(|i| {
            format!(
                r#"{{"device_id":"lock-{i}","type":"door.forced_open","data":{{"n":{i}}},"partners":["acme"]}}"#
            )
        })
        .collect();
    let (status, body) = h.post_events(&format!("[{}]", batch.join(","))).await;
    assert_eq!(status, 202, "{body}");
    let events: Vec<String> = body
        .as_array()
        .expect("one answer per event")
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect();

    // The mock answered in arrival order: what each delivery was told.
    let first = mock.wait_for(script.len()).await;
    let told: std::collections::HashMap<String, u16> = first
        .iter()
        .zip(script)
        .map(|(r, s)| (r.body["id"].as_str().expect("event id").to_string(), s))
        .collect();
    for id in &events {
        let want = match told[id] {
            200 => DeliveryState::Delivered,
            400 => DeliveryState::Dead,
            _ => DeliveryState::Pending,
        };
        let event = h
            .wait_event(id, "its first attempt recorded", |e| {
                e.deliveries[0].last_attempt.is_some()
                    || e.deliveries[0].state != DeliveryState::Pending
            })
            .await;
        assert_eq!(
            event.deliveries[0].state, want,
            "event {id} was told {}",
            told[id]
        );
        assert_eq!(event.deliveries[0].attempts, 1);
    }
    let (_, dead) = h.get("/v1/dead-letters?partner=acme").await;
    assert_eq!(dead["items"].as_array().map(Vec::len), Some(2), "{dead}");
    h.wait_queued("acme", 2).await;
    let (_, partners) = h.get("/v1/partners").await;
    assert_eq!(partners["partners"][0]["queued"], 2, "the two retries wait");

    // What the chunk knows survives a restart: nothing delivered is sent again.
    h.herald.shutdown().await.expect("clean shutdown");
    let h = TestHerald::start(&toml, clock).await;

    h.wait_queued("acme", 2).await;

    // The two retried ones leave the chunk, come due and go through.
    h.clock.advance(Duration::from_millis(1_100));
    let all = mock.wait_for(script.len() + 2).await;
    assert_eq!(all.len(), script.len() + 2, "nothing delivered twice");
    for id in &events {
        let event = h.wait_event(id, "finished", |e| e.is_finished()).await;
        if told[id] == 500 {
            assert_eq!(event.deliveries[0].state, DeliveryState::Delivered);
            assert_eq!(event.deliveries[0].attempts, 2);
        }
    }
    h.wait_queued("acme", 0).await;

    h.clock.advance(Duration::from_secs(3_601));
    herald::retention::collect_once(h.herald.store(), &h.clock, Duration::from_secs(3_600))
        .await
        .unwrap();
    for id in &events {
        let (status, _) = h.get(&format!("/v1/events/{id}")).await;
        assert_eq!(status, 404, "{id} is collected");
    }
}

/// Standard Webhooks asks senders to retry every non-2xx answer and to stop
/// only at 410 Gone (the specification's "Retry schedule" and "Disabling
/// failing endpoints"): a receiver mid-deploy (404), mid secret rotation
/// (401) or behind a stray redirect (302) must not cost an alert. Every
/// request is checked with the Standard Webhooks project's own library.
#[tokio::test]
async fn a_receiver_answering_404_401_302_500_is_retried_until_it_takes_the_event() {
    // The library checks the timestamp against the real time (five
    // minutes either way), so herald's driven clock starts at it.
    let real_now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64;
    let (h, mock, _dir) = setup_on(
        Clock::manual(real_now_ms),
        "retry = { initial_ms = 1000, multiplier = 2.0, max_interval_ms = 4000 }",
        "",
    )
    .await;
    let clock = h.clock.clone();
    mock.script([404, 401, 302, 500, 200].map(Reply::Status));
    let (event_id, delivery_id) = h.send_one("acme", "critical").await;
    let id = Uuid::parse_str(&event_id).expect("uuid");
    let mut delivered = false;
    for _ in 0..400 {
        let event = h.herald.store().event(id).expect("store reads");
        if event.is_some_and(|e| e.deliveries[0].state == DeliveryState::Delivered) {
            delivered = true;
            break;
        }
        clock.advance(Duration::from_millis(500));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(delivered, "requests: {:?}", answered(&mock));
    assert_eq!(answered(&mock), [404, 401, 302, 500, 200]);

    // Gone for good: the route is parked and nothing is retried.
    mock.script([Reply::Status(410)]);
    let (gone_event, _) = h.send_one("acme", "critical").await;
    h.wait_event(&gone_event, "dead", |e| {
        e.deliveries[0].state == DeliveryState::Dead
    })
    .await;
    let (_, parked) = h.get("/v1/partners/acme/parked").await;
    assert_eq!(parked["parked"][0]["device_id"], "lock-7f3a", "{parked}");

    let verifier = standardwebhooks::Webhook::new(SECRET).expect("the test secret");
    let requests = mock.requests();
    assert_eq!(requests.len(), 6);
    for (n, request) in requests.iter().enumerate() {
        if n < 5 {
            assert_eq!(
                request.webhook_id, delivery_id,
                "the same webhook-id on every try"
            );
        }
        let mut headers = axum::http::HeaderMap::new();
        for (name, value) in [
            ("webhook-id", &request.webhook_id),
            ("webhook-timestamp", &request.timestamp),
            ("webhook-signature", &request.signature),
        ] {
            headers.insert(name, value.parse().expect("a header value"));
        }
        if let Err(e) = verifier.verify(&request.raw, &headers) {
            panic!("request {n} does not verify with standardwebhooks: {e}");
        }
    }
}

fn answered(mock: &MockPartner) -> Vec<u16> {
    mock.requests().iter().filter_map(|r| r.answered).collect()
}
