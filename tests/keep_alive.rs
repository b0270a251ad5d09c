//! Keep-alive refresh over loopback: herald on a driven clock and a real
//! sled dir, the SmartThings mock partner, and a link whose refresh token
//! nears the lifetime SmartThings documents (30 days).

mod common;

use std::time::Duration;

use adapters::mock::{MockPartner as PlatformMock, Scenario};
use common::*;
use herald::clock::Clock;
use herald::model::DeliveryState;
use serde_json::json;

const DEVICE: &str = "lock-1";

fn env(name: &str) -> Option<String> {
    match name {
        "TEST_CLIENT_ID" => Some("herald-client".into()),
        "TEST_CLIENT_SECRET" => Some("herald-client-secret".into()),
        other => test_env(other),
    }
}

/// The device's link as `GET /v1/links/smartthings/{DEVICE}` shows it.
async fn link_view(herald: &TestHerald) -> serde_json::Value {
    let response = herald
        .http
        .get(herald.url(&format!("/v1/links/smartthings/{DEVICE}")))
        .bearer_auth(OPERATOR_TOKEN)
        .send()
        .await
        .expect("herald answers");
    let (status, body) = read(response).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn a_refresh_token_near_its_lifetime_is_refreshed_with_no_event_sent() {
    let scenario = Scenario {
        access_token: "at-0".into(),
        ..Scenario::default()
    };
    let (addr, mock) = PlatformMock::start("smartthings", scenario)
        .await
        .expect("mock starts");
    let base = format!("http://{addr}");
    let dir = tempfile::tempdir().expect("temp dir");
    // No refresh_token_lifetime: the platform's 30 days, 7 days ahead.
    let partner = r#"
[partners.smartthings]
adapter = "smartthings"
client_id_env = "TEST_CLIENT_ID"
client_secret_env = "TEST_CLIENT_SECRET"
allow_private = true
timeout_ms = 2000
"#;
    let toml = config_toml(dir.path(), partner, "");
    let herald = TestHerald::start_with_env(&toml, Clock::manual(START_MS), &env).await;
    let original_refresh = mock.refresh_token();
    let link = json!({
        "external_id": "leak-42",
        "callback_url": format!("{base}/device/events"),
        "token_url": format!("{base}/oauth/token"),
        "credentials": {
            "access_token": "at-0",
            "refresh_token": mock.refresh_token(),
            "expires_at": "2027-06-01T00:00:00Z",
        },
    });
    let response = herald
        .http
        .put(herald.url(&format!("/v1/links/smartthings/{DEVICE}")))
        .bearer_auth(OPERATOR_TOKEN)
        .header("content-type", "application/json")
        .body(link.to_string())
        .send()
        .await
        .expect("herald answers");
    let (status, body) = read(response).await;
    assert_eq!(status, 201, "{body}");
    let put_view = link_view(&herald).await;
    assert!(put_view["expires_at"].is_string(), "{put_view}");

    // Three weeks on: not yet inside the week before the 30 days end.
    herald.clock.advance(Duration::from_secs(21 * 86_400));
    settle().await;
    assert_eq!(mock.refreshes(), 0, "too early for a keep-alive");

    // Past 23 days: the keep-alive refreshes, and sends nothing.
    herald.clock.advance(Duration::from_secs(3 * 86_400));
    for _ in 0..2000 {
        if mock.refreshes() > 0 {
            break;
        }
        herald.clock.advance(Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(mock.refreshes(), 1, "one keep-alive refresh");
    assert!(
        mock.requests().iter().all(|r| r.token_request),
        "no event was sent"
    );
    assert_ne!(mock.access_token(), "at-0");
    // SmartThings refresh tokens are single-use: the old one is dead now.
    assert_ne!(mock.refresh_token(), original_refresh);
    // The mock has rotated the pair; herald's copy is stored a moment
    // later. Wait for it, as a delivery made meanwhile would still present
    // the old pair (and its refresh token is dead).
    let mut stored = serde_json::Value::Null;
    for _ in 0..2000 {
        stored = link_view(&herald).await;
        if stored["expires_at"] != put_view["expires_at"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_ne!(
        stored["expires_at"], put_view["expires_at"],
        "herald never stored the rotated pair: {stored}"
    );

    // The next delivery presents the rotated pair: the mock takes it at
    // once, with no second refresh.
    let (status, body) = herald
        .post_events(&format!(
            r#"{{"device_id":"{DEVICE}","type":"door.forced_open","priority":"critical","data":{{"capability":"lock","attribute":"lock","value":"forced_open","kind":"forced_open"}}}}"#
        ))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    herald
        .wait_event(&id, "settled", |e| {
            e.deliveries[0].state != DeliveryState::Pending
        })
        .await;
    let event = herald
        .herald
        .store()
        .event(uuid::Uuid::parse_str(&id).expect("uuid"))
        .expect("reads")
        .expect("event");
    assert_eq!(
        event.deliveries[0].state,
        DeliveryState::Delivered,
        "{:?}",
        event.deliveries[0]
    );
    assert_eq!(mock.refreshes(), 1, "the rotated token was used as stored");
    assert_eq!(mock.accepted().len(), 1);

    // The rotated refresh token's age was stored with it: after a restart
    // on the same data dir and another day, no second keep-alive is due.
    let clock = herald.clock.clone();
    herald.herald.shutdown().await.expect("clean shutdown");
    let herald = TestHerald::start_with_env(&toml, clock, &env).await;
    herald.clock.advance(Duration::from_secs(86_400));
    settle().await;
    assert_eq!(
        mock.refreshes(),
        1,
        "a fresh refresh token is not refreshed again"
    );
    herald.herald.shutdown().await.expect("clean shutdown");
}
