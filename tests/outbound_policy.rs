//! The outbound address policy at connect time, end to end: herald
//! in-process on a temp data dir and real platform mocks over loopback.
//! Addresses herald must not reach are written where the policy cannot see
//! them before connect time (a link stored while `allow_private` was on,
//! a service-account key's `token_uri`); each is refused when dialled, the
//! dead letter names the address and its range, and the listening mock
//! receives nothing, so no token leaves herald.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use adapters::google::service_account::ServiceAccount;
use adapters::mock::{MockHandle, MockPartner as PlatformMock, Scenario};
use common::*;
use herald::clock::Clock;
use herald::model::DeliveryState;
use serde_json::{json, Value};

const GOOGLE_KEY: &str = include_str!("../fixtures/google/service-account.test.json");

fn env(name: &str) -> Option<String> {
    match name {
        "TEST_CLIENT_ID" => Some("herald-client".into()),
        "TEST_CLIENT_SECRET" => Some("herald-client-secret".into()),
        other => test_env(other),
    }
}

fn smartthings_toml(dir: &std::path::Path, allow_private: bool) -> String {
    let partner = format!(
        r#"
[partners.smartthings]
adapter = "smartthings"
client_id_env = "TEST_CLIENT_ID"
client_secret_env = "TEST_CLIENT_SECRET"
allow_private = {allow_private}
timeout_ms = 2000
retry = {{ initial_ms = 100, multiplier = 2.0, max_interval_ms = 10000, max_age = "1h" }}
"#
    );
    config_toml(dir, &partner, "")
}

/// A SmartThings link whose callback and token URLs are on `host:port`,
/// with a user's access token that must never reach a refused address.
fn smartthings_link(host: &str, port: u16) -> Value {
    json!({
        "external_id": "lock-42",
        "account": "user-7",
        "callback_url": format!("http://{host}:{port}/device/events"),
        "token_url": format!("http://{host}:{port}/oauth/token"),
        "credentials": {
            "access_token": "at-0",
            "refresh_token": "rt-0",
            "expires_at": "2027-06-01T00:00:00Z",
        },
    })
}

async fn start(toml: &str) -> TestHerald {
    TestHerald::start_with_env(toml, Clock::manual(START_MS), &|name| env(name)).await
}

async fn put_link(h: &TestHerald, partner: &str, device: &str, body: &Value) -> (u16, Value) {
    let response = h
        .http
        .put(h.url(&format!("/v1/links/{partner}/{device}")))
        .bearer_auth(OPERATOR_TOKEN)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("herald answers");
    read(response).await
}

/// A forced-open door on `device`, routed by its link; the event id.
async fn alert(h: &TestHerald, device: &str) -> String {
    let (status, body) = h
        .post_events(&format!(
            r#"{{"device_id":"{device}","type":"door.forced_open","priority":"critical","data":{{"capability":"lock","attribute":"lock","value":"forced_open","kind":"forced_open"}}}}"#
        ))
        .await;
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().expect("id").to_string()
}

/// Waits until the event's delivery is a dead letter; the letter as the
/// operator API shows it.
async fn dead_letter(h: &TestHerald, event: &str) -> Value {
    let record = h
        .wait_event(event, "a dead letter", |e| {
            e.deliveries[0].state == DeliveryState::Dead
        })
        .await;
    let id = record.deliveries[0].dead_letter.expect("a dead letter id");
    let (status, letter) = h.get(&format!("/v1/dead-letters/{id}")).await;
    assert_eq!(status, 200, "{letter}");
    letter
}

/// Counts the connections a raw listener accepts (none should come).
fn count_accepts(listener: tokio::net::TcpListener) -> Arc<AtomicUsize> {
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    accepted
}

async fn sent_count(h: &TestHerald, partner: &str) -> u64 {
    let (status, body) = h.get("/v1/partners").await;
    assert_eq!(status, 200, "{body}");
    body.as_array()
        .or_else(|| body["partners"].as_array())
        .and_then(|all| all.iter().find(|p| p["name"] == partner))
        .and_then(|p| p["sent"].as_u64())
        .unwrap_or_else(|| panic!("no sent count for {partner} in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_put_while_private_was_allowed_is_not_dialled_after_a_restart_without_it() {
    let (addr, mock) = PlatformMock::start(
        "smartthings",
        Scenario {
            access_token: "at-0".into(),
            ..Scenario::default()
        },
    )
    .await
    .expect("mock starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let h = start(&smartthings_toml(dir.path(), true)).await;
    let (status, body) = put_link(
        &h,
        "smartthings",
        "lock-7f3a",
        &smartthings_link("127.0.0.1", addr.port()),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // While allowed, the link works: the mock is really there.
    let first = alert(&h, "lock-7f3a").await;
    h.wait_event(&first, "delivered", |e| {
        e.deliveries[0].state == DeliveryState::Delivered
    })
    .await;
    assert_eq!(accepted_with_token(&mock), 1);
    let seen_before = mock.requests().len();
    h.herald.shutdown().await.expect("clean shutdown");

    // The same data dir, the link as stored, allow_private now off.
    let h = start(&smartthings_toml(dir.path(), false)).await;
    let second = alert(&h, "lock-7f3a").await;
    let letter = dead_letter(&h, &second).await;
    let reason = letter["reason"].as_str().expect("reason");
    assert!(
        reason.contains(
            "not sent: the outbound address policy refuses 127.0.0.1 in 127.0.0.0/8 (loopback)"
        ),
        "{letter}"
    );
    assert!(reason.contains("allow_private = true"), "{letter}");
    let attempt = &letter["attempts"][0];
    assert_eq!(attempt["detail"].as_str(), Some(reason), "{letter}");
    assert!(attempt.get("status").is_none(), "no answer came: {letter}");
    assert_eq!(
        mock.requests().len(),
        seen_before,
        "nothing reached the mock, so the user's token stayed in herald"
    );
    assert_eq!(sent_count(&h, "smartthings").await, 0, "nothing was sent");
    h.herald.shutdown().await.expect("clean shutdown");
}

/// Callbacks that carried the user's access token (SmartThings puts it in
/// the body, `authentication.token`).
fn accepted_with_token(mock: &MockHandle) -> usize {
    mock.requests()
        .iter()
        .filter(|r| {
            !r.token_request
                && r.request
                    .json()
                    .is_some_and(|body| body["authentication"]["token"] == "at-0")
        })
        .count()
}

/// Every address form, in a link's callback and token URLs, with what the
/// refusal must name. The loopback forms carry the mock's port: dialled,
/// they would reach it (or the IPv6 listener beside it).
const FORMS: &[(&str, &str)] = &[
    ("127.0.0.1", "127.0.0.1 in 127.0.0.0/8 (loopback)"),
    ("127.1.2.3", "127.1.2.3 in 127.0.0.0/8 (loopback)"),
    ("[::1]", "::1 in ::1/128 (loopback)"),
    (
        "[::ffff:127.0.0.1]",
        "::ffff:127.0.0.1 carries 127.0.0.1 (IPv4-mapped, ::ffff:0:0/96) in 127.0.0.0/8 (loopback)",
    ),
    (
        "[::127.0.0.1]",
        "::7f00:1 carries 127.0.0.1 (IPv4-compatible, ::/96) in 127.0.0.0/8 (loopback)",
    ),
    (
        "[64:ff9b::127.0.0.1]",
        "carries 127.0.0.1 (NAT64, 64:ff9b::/96) in 127.0.0.0/8 (loopback)",
    ),
    (
        "[64:ff9b:1::7f00:1]",
        "carries 127.0.0.1 (local NAT64, 64:ff9b:1::/48) in 127.0.0.0/8 (loopback)",
    ),
    (
        "[2002:7f00:1::1]",
        "carries 127.0.0.1 (6to4, 2002::/16) in 127.0.0.0/8 (loopback)",
    ),
    (
        "[2001:0:7f00:1::f7f7:f7f7]",
        "carries 127.0.0.1 (Teredo server, 2001::/32) in 127.0.0.0/8 (loopback)",
    ),
    ("10.0.0.1", "10.0.0.1 in 10.0.0.0/8 (private, RFC 1918)"),
    (
        "172.16.0.1",
        "172.16.0.1 in 172.16.0.0/12 (private, RFC 1918)",
    ),
    (
        "192.168.1.1",
        "192.168.1.1 in 192.168.0.0/16 (private, RFC 1918)",
    ),
    (
        "169.254.169.254",
        "169.254.169.254 in 169.254.0.0/16 (link-local)",
    ),
    (
        "100.64.0.1",
        "100.64.0.1 in 100.64.0.0/10 (shared address space, carrier-grade NAT)",
    ),
    ("198.18.0.1", "198.18.0.1 in 198.18.0.0/15 (benchmarking)"),
    (
        "192.0.2.1",
        "192.0.2.1 in 192.0.2.0/24 (documentation, TEST-NET-1)",
    ),
    (
        "198.51.100.1",
        "198.51.100.1 in 198.51.100.0/24 (documentation, TEST-NET-2)",
    ),
    (
        "203.0.113.1",
        "203.0.113.1 in 203.0.113.0/24 (documentation, TEST-NET-3)",
    ),
    ("240.0.0.1", "240.0.0.1 in 240.0.0.0/4 (reserved)"),
    ("[fd00::1]", "fd00::1 in fc00::/7 (unique local)"),
    ("[fe80::1]", "fe80::1 in fe80::/10 (link-local)"),
    ("[fec0::1]", "fec0::1 in fec0::/10 (site-local, deprecated)"),
    (
        "[2001:db8::1]",
        "2001:db8::1 in 2001:db8::/32 (documentation)",
    ),
    (
        "[64:ff9b::10.0.0.1]",
        "carries 10.0.0.1 (NAT64, 64:ff9b::/96) in 10.0.0.0/8 (private, RFC 1918)",
    ),
    (
        "[2002:c0a8:101::1]",
        "carries 192.168.1.1 (6to4, 2002::/16) in 192.168.0.0/16 (private, RFC 1918)",
    ),
    (
        "[2001:0:808:808::f5ff:fffe]",
        "carries 10.0.0.1 (Teredo client, 2001::/32) in 10.0.0.0/8 (private, RFC 1918)",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_address_form_in_a_stored_link_is_refused_at_connect_time_and_named() {
    let (addr, mock) = PlatformMock::start(
        "smartthings",
        Scenario {
            access_token: "at-0".into(),
            ..Scenario::default()
        },
    )
    .await
    .expect("mock starts");
    // [::1] on the mock's port too, where the machine has IPv6 loopback.
    let v6_accepts = match tokio::net::TcpListener::bind(("::1", addr.port())).await {
        Ok(listener) => Some(count_accepts(listener)),
        Err(e) => {
            eprintln!(
                "NOTE: cannot listen on [::1]:{} ({e}); the IPv6 loopback forms are checked by their refusal alone",
                addr.port()
            );
            None
        }
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let h = start(&smartthings_toml(dir.path(), true)).await;
    for (i, (host, _)) in FORMS.iter().enumerate() {
        let (status, body) = put_link(
            &h,
            "smartthings",
            &format!("lock-{i}"),
            &smartthings_link(host, addr.port()),
        )
        .await;
        assert_eq!(status, 201, "{host}: {body}");
    }
    h.herald.shutdown().await.expect("clean shutdown");

    let h = start(&smartthings_toml(dir.path(), false)).await;
    let mut events = Vec::new();
    for i in 0..FORMS.len() {
        events.push(alert(&h, &format!("lock-{i}")).await);
    }
    for ((host, names), event) in FORMS.iter().zip(&events) {
        let letter = dead_letter(&h, event).await;
        let reason = letter["reason"].as_str().expect("reason");
        assert!(
            reason.starts_with("not sent: the outbound address policy refuses "),
            "{host}: {reason}"
        );
        assert!(reason.contains(names), "{host}: {reason}");
        assert!(
            letter["attempts"][0].get("status").is_none(),
            "{host}: {letter}"
        );
    }
    assert!(
        mock.requests().is_empty(),
        "a refused address reached the mock: {:?}",
        mock.requests()
            .iter()
            .map(|r| r.request.path.clone())
            .collect::<Vec<_>>()
    );
    if let Some(accepts) = v6_accepts {
        assert_eq!(accepts.load(Ordering::SeqCst), 0, "[::1] was dialled");
    }
    assert_eq!(sent_count(&h, "smartthings").await, 0, "nothing was sent");
    h.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_key_whose_token_uri_is_loopback_sends_no_assertion() {
    let key = ServiceAccount::from_json(GOOGLE_KEY).expect("test key");
    let (addr, mock) = PlatformMock::start(
        "google",
        Scenario {
            access_token: "partner-token-0".into(),
            public_key_der: Some(key.public_key_der()),
            ..Scenario::default()
        },
    )
    .await
    .expect("mock starts");
    let base = format!("http://{addr}");
    let mut key_file: Value = serde_json::from_str(GOOGLE_KEY).expect("key JSON");
    key_file["token_uri"] = format!("{base}/token").into();
    let key_json = key_file.to_string();
    let env = |name: &str| match name {
        "TEST_GOOGLE_KEY" => Some(key_json.clone()),
        other => env(other),
    };
    let google_toml = |dir: &std::path::Path, allow_private: bool, url: &str| {
        let partner = format!(
            r#"
[partners.google]
adapter = "google"
{url}
service_account_key_env = "TEST_GOOGLE_KEY"
allow_private = {allow_private}
timeout_ms = 2000
retry = {{ initial_ms = 100, multiplier = 2.0, max_interval_ms = 10000, max_age = "1h" }}
"#
        );
        config_toml(dir, &partner, "")
    };
    let link = json!({ "external_id": "lock-42", "account": "user-7" });

    // With allow_private, the key's token_uri is where the assertion goes.
    let allowed_dir = tempfile::tempdir().expect("temp dir");
    let toml = google_toml(
        allowed_dir.path(),
        true,
        &format!("url = \"{base}/v1/devices:reportStateAndNotification\""),
    );
    let h = TestHerald::start_with_env(&toml, Clock::manual(START_MS), &env).await;
    let (status, body) = put_link(&h, "google", "lock-7f3a", &link).await;
    assert_eq!(status, 201, "{body}");
    let event = alert(&h, "lock-7f3a").await;
    h.wait_event(&event, "delivered", |e| {
        e.deliveries[0].state == DeliveryState::Delivered
    })
    .await;
    h.herald.shutdown().await.expect("clean shutdown");
    let token_requests = || mock.requests().iter().filter(|r| r.token_request).count();
    assert_eq!(
        token_requests(),
        1,
        "the assertion went to the key's token_uri"
    );
    let seen = mock.requests().len();

    // Without it (Google's own endpoint for deliveries), the same key.
    let dir = tempfile::tempdir().expect("temp dir");
    let h = TestHerald::start_with_env(
        &google_toml(dir.path(), false, ""),
        Clock::manual(START_MS),
        &env,
    )
    .await;
    let (status, body) = put_link(&h, "google", "lock-7f3a", &link).await;
    assert_eq!(status, 201, "{body}");
    let event = alert(&h, "lock-7f3a").await;
    let letter = dead_letter(&h, &event).await;
    let reason = letter["reason"].as_str().expect("reason");
    assert!(
        reason.starts_with("minting the partner token: not sent: the outbound address policy refuses 127.0.0.1 in 127.0.0.0/8 (loopback)"),
        "{letter}"
    );
    assert_eq!(
        mock.requests().len(),
        seen,
        "the token endpoint received nothing: no signed assertion left herald"
    );
    h.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_are_also_refused_by_name_when_a_config_is_read_or_a_link_is_put() {
    // A partner URL at a refused literal: the config names the key and range.
    for (url, names) in [
        ("http://10.0.0.1/hook", "10.0.0.1 in 10.0.0.0/8"),
        (
            "http://[::ffff:127.0.0.1]:8080/hook",
            "carries 127.0.0.1 (IPv4-mapped, ::ffff:0:0/96) in 127.0.0.0/8 (loopback)",
        ),
        (
            "http://[64:ff9b::a9fe:a9fe]/hook",
            "carries 169.254.169.254 (NAT64, 64:ff9b::/96) in 169.254.0.0/16 (link-local)",
        ),
        (
            "http://198.18.0.1/hook",
            "198.18.0.1 in 198.18.0.0/15 (benchmarking)",
        ),
        (
            "http://localhost:8080/hook",
            "127.0.0.1 in 127.0.0.0/8 (loopback)",
        ),
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let toml = config_toml(
            dir.path(),
            &partner_toml("acme", url, "").replace("allow_private = true", ""),
            "",
        );
        let err = herald::config::Config::parse(&toml, &env).expect_err(url);
        let text = err.to_string();
        assert!(text.contains("partners.acme.url"), "{url}: {text}");
        assert!(text.contains(names), "{url}: {text}");
    }

    // Addresses no partner can be at are refused even with allow_private.
    let dir = tempfile::tempdir().expect("temp dir");
    let h = start(&smartthings_toml(dir.path(), true)).await;
    for (host, names) in [
        ("0.0.0.0", "0.0.0.0 in 0.0.0.0/8"),
        ("[::]", ":: in ::/128 (unspecified)"),
        ("224.0.0.1", "224.0.0.1 in 224.0.0.0/4 (multicast)"),
        ("[ff02::1]", "ff02::1 in ff00::/8 (multicast)"),
        (
            "255.255.255.255",
            "255.255.255.255 in 255.255.255.255/32 (broadcast)",
        ),
        (
            "[::ffff:0.0.0.0]",
            "carries 0.0.0.0 (IPv4-mapped, ::ffff:0:0/96) in 0.0.0.0/8",
        ),
    ] {
        let (status, body) = put_link(
            &h,
            "smartthings",
            "lock-7f3a",
            &smartthings_link(host, 8080),
        )
        .await;
        assert_eq!(status, 422, "{host}: {body}");
        let detail = body.to_string();
        assert!(detail.contains("/callback_url"), "{host}: {detail}");
        assert!(detail.contains(names), "{host}: {detail}");
        assert!(detail.contains("herald never dials"), "{host}: {detail}");
    }
    h.herald.shutdown().await.expect("clean shutdown");
}
