//! Critical lane and partner protection, on a driven clock against a real
//! mock partner: critical work overtakes a backlog at the window and at the
//! rate limiter; a down partner trips the breaker, is probed, not hammered,
//! and nothing it holds is lost or spends attempts.

mod common;

use std::time::Duration;

use common::{config_toml, partner_toml, settle, setup, Reply};
use herald::clock::Clock;
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
    h.wait_queued("acme", 20).await;

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
    h.wait_queued("acme", 0).await;
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

#[tokio::test]
async fn a_critical_retry_is_not_hidden_behind_a_full_window_of_normal_work() {
    let (h, mock, _dir) = setup(
        r#"rate = { per_second = 10, burst = 1 }
max_in_flight = 1
retry = { initial_ms = 1000, max_interval_ms = 1000 }"#,
        "",
    )
    .await;
    queue_normal(&h, 200).await;
    mock.wait_for(1).await;
    // The alert's first send fails; its retry is due one second later.
    mock.script([Reply::Status(503)]);
    let (critical_id, _) = h.send_one("acme", "critical").await;
    settle().await;
    h.clock.advance(Duration::from_millis(100));
    let failed = mock.wait_for(2).await[1].clone();
    assert_eq!(failed.body["priority"], "critical");
    // Its outcome recorded before the clock moves on: the retry is due at +1 s exactly.
    h.wait_event(&critical_id, "retry scheduled", |e| {
        e.deliveries[0].attempts == 1
    })
    .await;
    // ...and known to the lane, which learns the retry time once the store
    // has answered (counted as retried right after): the store alone can be
    // ahead of it on a loaded machine.
    let lane = h.herald.dispatcher().lane("acme").expect("lane");
    for _ in 0..2000 {
        if lane
            .stats
            .retried
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let retry_due = failed.at_ms + 1000;
    let mut seen = 2;
    while h.clock.now_ms() < retry_due + 100 {
        h.clock.advance(Duration::from_millis(100));
        seen = mock.wait_for(seen + 1).await.len();
    }
    let again = mock
        .requests()
        .into_iter()
        .skip(2)
        .find(|r| r.webhook_id == failed.webhook_id)
        .unwrap_or_else(|| {
            panic!(
                "the retry, due at {retry_due}, did not go: {:?}",
                mock.requests()
                    .iter()
                    .map(|r| (r.at_ms, r.body["priority"].clone()))
                    .collect::<Vec<_>>()
            )
        });
    assert!(
        again.at_ms <= retry_due + 100,
        "retried {} ms late",
        again.at_ms - retry_due
    );
}

/// Posts one normal event of `device` to `acme`: its event id.
async fn send_for(h: &common::TestHerald, device: &str) -> String {
    let (status, body) = h
        .post_events(&format!(
            r#"{{"device_id":"{device}","type":"lock.state","data":{{"value":"locked"}},"partners":["acme"]}}"#
        ))
        .await;
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().expect("id").to_string()
}

#[tokio::test]
async fn a_gone_route_is_parked_and_later_events_to_it_are_dead_letters_with_the_reason() {
    let clock = Clock::manual(common::START_MS);
    let dir = tempfile::tempdir().expect("temp dir");
    let mock = common::MockPartner::start(clock.clone()).await;
    let toml = config_toml(dir.path(), &partner_toml("acme", &mock.url, ""), "");
    let h = common::TestHerald::start(&toml, clock.clone()).await;
    mock.script([Reply::Status(410)]);
    let first = send_for(&h, "lock-gone").await;
    mock.wait_for(1).await;
    let dead = |e: &herald::model::EventRecord| e.deliveries[0].state == DeliveryState::Dead;
    h.wait_event(&first, "dead", dead).await;
    let (status, parked) = h.get("/v1/partners/acme/parked").await;
    assert_eq!(status, 200);
    assert_eq!(parked["parked"][0]["device_id"], "lock-gone", "{parked}");
    assert!(
        parked["parked"][0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("410"),
        "{parked}"
    );

    // Parked across a restart: later events to that device are not sent,
    // they are dead letters naming why; other devices flow.
    h.herald.shutdown().await.expect("clean shutdown");
    let h = common::TestHerald::start(&toml, clock.clone()).await;
    let later = send_for(&h, "lock-gone").await;
    let other = send_for(&h, "lock-fine").await;
    h.wait_event(&other, "delivered", |e| {
        e.deliveries[0].state == DeliveryState::Delivered
    })
    .await;
    let event = h.wait_event(&later, "dead", dead).await;
    assert_eq!(mock.requests().len(), 2, "nothing sent to the parked route");
    let dead_id = event.deliveries[0].dead_letter.expect("dead letter id");
    let (_, letter) = h.get(&format!("/v1/dead-letters/{dead_id}")).await;
    let reason = letter["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("parked") && reason.contains("410"),
        "an on-call engineer reads why: {letter}"
    );

    // On-call clears it once the integration is back: sent again.
    let clear = |device: &str| {
        h.http
            .delete(h.url(&format!("/v1/partners/acme/parked/{device}")))
            .bearer_auth(common::OPERATOR_TOKEN)
            .send()
    };
    assert_eq!(clear("lock-gone").await.expect("answer").status(), 204);
    assert_eq!(clear("lock-gone").await.expect("answer").status(), 404);
    let (status, _) = h.get("/v1/partners/nobody/parked").await;
    assert_eq!(status, 404);
    let again = send_for(&h, "lock-gone").await;
    h.wait_event(&again, "delivered", |e| {
        e.deliveries[0].state == DeliveryState::Delivered
    })
    .await;
    assert_eq!(mock.requests().len(), 3);
}

/// Polls /v1/partners (real time, bounded) until `acme` shows `check`.
async fn wait_partner(
    h: &common::TestHerald,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    for _ in 0..2000 {
        let (_, view) = h.get("/v1/partners").await;
        if check(&view["partners"][0]) {
            return view["partners"][0].clone();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("acme never showed {what}");
}

#[tokio::test]
async fn a_partner_down_for_a_day_is_probed_not_hammered_and_then_drained_at_its_limit() {
    const PER_SECOND: u64 = 50;
    let (h, mock, _dir) = setup(
        r#"rate = { per_second = 50, burst = 5 }
retry = { initial_ms = 1000, max_interval_ms = 600000, max_age = "72h", critical_max_age = "72h" }
breaker = { failures = 5, cool_down = "10s", max_cool_down = "5m" }"#,
        // Kept past the simulated day, so the events can be looked at after it.
        r#"retention = "7d""#,
    )
    .await;
    mock.answer_by_default(Reply::Status(503));
    queue_normal(&h, 500).await;
    let mut critical = Vec::new();
    for _ in 0..20 {
        critical.push(h.send_one("acme", "critical").await.0);
    }
    // The burst's five sends fail: the breaker opens and nothing else goes.
    mock.wait_for(5).await;
    wait_partner(&h, "an open breaker", |p| p["breaker"] == "open").await;
    settle().await;
    assert_eq!(mock.requests().len(), 5);

    // 24 hours down. Probes come at the configured cadence (10 s doubling to
    // 5 min) and are the only sends.
    let day_ends = common::START_MS + 24 * 3_600_000;
    let mut cool_down = 10_000;
    let mut probes = 0;
    loop {
        let last_failure = mock.requests().last().map_or(0, |r| r.at_ms);
        let probe_at = last_failure + cool_down;
        if probe_at > day_ends {
            break;
        }
        let partner = wait_partner(&h, "the next probe time", |p| {
            p["breaker"] == "open"
                && p["next_probe_at"] == herald::clock::rfc3339(probe_at).as_str()
        })
        .await;
        assert_eq!(partner["dead"], 0);
        if probes < 3 {
            advance_to(&h, probe_at - 1);
            settle().await;
            assert_eq!(
                mock.requests().len(),
                5 + probes,
                "nothing before the probe is due"
            );
        }
        advance_to(&h, probe_at);
        probes += 1;
        mock.wait_for(5 + probes).await;
        cool_down = (cool_down * 2).min(300_000);
    }
    assert!(probes > 280, "{probes} probes in a day");
    assert_eq!(
        mock.requests().len(),
        5 + probes,
        "only the probes were sent"
    );
    let (_, dead) = h.get("/v1/dead-letters").await;
    assert_eq!(dead["items"].as_array().map_or(0, Vec::len), 0, "{dead}");

    // The partner is back: the next probe is answered and the backlog
    // drains at the partner's limit, one token every 20 ms of herald's clock.
    mock.answer_by_default(Reply::Status(200));
    let before = mock.requests().len();
    let probe_at = mock.requests()[before - 1].at_ms + 300_000;
    wait_partner(&h, "the last probe time", |p| p["breaker"] == "open").await;
    advance_to(&h, probe_at);
    mock.wait_for(before + 1).await;
    wait_partner(&h, "a closed breaker", |p| p["breaker"] == "closed").await;
    let mut seen = before + 1;
    loop {
        h.clock.advance(Duration::from_millis(1000 / PER_SECOND));
        match mock.wait_within(seen + 1, Duration::from_secs(1)).await {
            Some(now) => seen = now.len(),
            None => break,
        }
    }
    let drained = &mock.requests()[before..];
    let mut per_second = std::collections::BTreeMap::<u64, u64>::new();
    for r in drained {
        *per_second.entry((r.at_ms - probe_at) / 1000).or_default() += 1;
    }
    let full_seconds: Vec<u64> = per_second
        .range(..per_second.len() as u64 - 1)
        .map(|(_, n)| *n)
        .collect();
    assert!(full_seconds.len() >= 8, "{per_second:?}");
    assert!(
        full_seconds
            .iter()
            .all(|n| (PER_SECOND - 1..=PER_SECOND + 5).contains(n)),
        "sends per second while draining: {per_second:?}"
    );

    // What the probes tried again is due within the retry cap: all of it arrives.
    h.clock.advance(Duration::from_secs(11 * 60));
    for _ in 0..200 {
        h.clock.advance(Duration::from_millis(1000 / PER_SECOND));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let partner = wait_partner(&h, "every event delivered", |p| p["delivered"] == 520).await;
    assert_eq!(partner["dead"], 0);
    for id in &critical {
        h.wait_event(id, "delivered", |e| {
            e.deliveries[0].state == DeliveryState::Delivered
        })
        .await;
    }
    let ids: std::collections::HashSet<String> = mock
        .requests()
        .iter()
        .filter(|r| r.at_ms >= probe_at)
        .map(|r| r.webhook_id.clone())
        .collect();
    assert_eq!(ids.len(), 520, "each event delivered once after the outage");
}

/// Moves the driven clock forward to `ms`.
fn advance_to(h: &common::TestHerald, ms: u64) {
    h.clock
        .advance(Duration::from_millis(ms.saturating_sub(h.clock.now_ms())));
}

#[tokio::test]
async fn per_device_order_holds_under_retries_while_other_devices_flow() {
    let (h, mock, _dir) = setup(
        r#"ordering = "per_device"
retry = { initial_ms = 1000, max_interval_ms = 1000 }"#,
        "",
    )
    .await;
    let post = |device: &'static str, n: u32| {
        let h = &h;
        async move {
            let (status, body) = h
                .post_events(&format!(
                    r#"{{"device_id":"{device}","type":"temp","data":{{"n":{n}}},"partners":["acme"]}}"#
                ))
                .await;
            assert_eq!(status, 202, "{body}");
        }
    };
    // The first event of the door lock fails; it must still arrive before
    // the lock's later events, while the thermostat's flow meanwhile.
    mock.script([Reply::Status(503)]);
    post("lock", 1).await;
    mock.wait_for(1).await;
    for n in 2..=4 {
        post("lock", n).await;
        post("thermostat", n).await;
    }
    mock.wait_for(4).await;
    settle().await;
    let sent = |mock: &common::MockPartner| -> Vec<(String, u64)> {
        mock.requests()
            .iter()
            .map(|r| {
                (
                    r.body["device_id"].as_str().unwrap_or("?").to_string(),
                    r.body["data"]["n"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    let so_far = sent(&mock);
    assert_eq!(
        so_far.len(),
        4,
        "the lock waits, the thermostat's three went: {so_far:?}"
    );
    assert!(
        so_far[1..].iter().all(|(d, _)| d == "thermostat"),
        "{so_far:?}"
    );

    // Its retry is taken; then the lock's others, in order.
    h.clock.advance(Duration::from_millis(1000));
    mock.wait_for(8).await;
    let lock: Vec<u64> = sent(&mock)
        .into_iter()
        .filter(|(d, _)| d == "lock")
        .map(|(_, n)| n)
        .collect();
    assert_eq!(lock, vec![1, 1, 2, 3, 4], "the lock's events in order");
    let thermostat: Vec<u64> = sent(&mock)
        .into_iter()
        .filter(|(d, _)| d == "thermostat")
        .map(|(_, n)| n)
        .collect();
    assert_eq!(thermostat, vec![2, 3, 4]);
    h.wait_queued("acme", 0).await;
}

#[tokio::test]
async fn a_newer_state_supersedes_an_older_one_still_waiting_and_says_so() {
    let (h, mock, _dir) = setup(
        "coalesce_state = true\nrate = { per_second = 10, burst = 1 }",
        "",
    )
    .await;
    let post = |body: String| {
        let h = &h;
        async move {
            let (status, answer) = h.post_events(&body).await;
            assert_eq!(status, 202, "{answer}");
            (
                answer["id"].as_str().unwrap_or_default().to_string(),
                answer["deliveries"][0]["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        }
    };
    let reading = |attribute: &str, value: u32, priority: &str| {
        format!(
            r#"{{"device_id":"thermo-1","type":"state","priority":"{priority}","partners":["acme"],
               "data":{{"capability":"temperatureMeasurement","attribute":"{attribute}","value":{value}}}}}"#
        )
    };
    // The first goes out at once (burst 1); the others wait for tokens.
    post(reading("temperature", 20, "normal")).await;
    mock.wait_for(1).await;
    let (older, _) = post(reading("temperature", 21, "normal")).await;
    let (_, newer_delivery) = post(reading("temperature", 22, "normal")).await;
    post(reading("humidity", 40, "normal")).await;
    post(reading("temperature", 99, "critical")).await;
    // Three tokens for the three that still matter: the replaced one takes none.
    for _ in 0..3 {
        h.clock.advance(Duration::from_millis(100));
        settle().await;
    }
    let values: Vec<(String, u64)> = mock
        .requests()
        .iter()
        .map(|r| {
            (
                r.body["data"]["attribute"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string(),
                r.body["data"]["value"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(values.len(), 4, "21 was never sent: {values:?}");
    assert!(!values.iter().any(|(_, v)| *v == 21), "{values:?}");
    for expected in [20, 22, 40, 99] {
        assert!(
            values.iter().any(|(_, v)| *v == expected),
            "{expected} missing: {values:?}"
        );
    }
    // Recorded, not dropped: on-call sees what replaced it.
    let (_, event) = h.get(&format!("/v1/events/{older}")).await;
    assert_eq!(event["deliveries"][0]["state"], "superseded", "{event}");
    assert_eq!(
        event["deliveries"][0]["superseded_by"],
        newer_delivery.as_str()
    );
    let (_, partners) = h.get("/v1/partners").await;
    assert_eq!(partners["partners"][0]["superseded"], 1);
    assert_eq!(partners["partners"][0]["delivered"], 4);
    h.wait_queued("acme", 0).await;
}

#[tokio::test]
async fn an_adaptive_lane_starts_at_one_in_flight_and_delivers_everything() {
    let (h, mock, _dir) = setup("concurrency = \"adaptive\"\nmax_in_flight = 16", "").await;
    let (_, partners) = h.get("/v1/partners").await;
    assert_eq!(
        partners["partners"][0]["concurrency_limit"], 1,
        "{partners}"
    );
    queue_normal(&h, 300).await;
    mock.wait_for(300).await;
    // On a clock that does not move every round trip takes 0 ms: the
    // controller never sees a full window, so the limit holds at its start.
    let partner = wait_partner(&h, "all delivered", |p| p["delivered"] == 300).await;
    assert_eq!(partner["concurrency_limit"], 1, "{partner}");
    assert_eq!(partner["max_in_flight"], 16);
}
