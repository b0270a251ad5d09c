//! Property tests at scale of the ingest body parser and the link body
//! parser, over loopback against a real herald: whatever body a client
//! sends, herald answers 202 or a precise 4xx problem (never a 5xx, never
//! a dropped connection), stores nothing on a 4xx, and never repeats a
//! secret sent in a credentials field, whatever its shape.
//!
//! CI runs a short pass (96 bodies per property). The long run:
//!
//! ```text
//! PROPTEST_CASES=10000 cargo test --test fuzz_ingest
//! ```

mod common;

use common::*;
use proptest::prelude::*;
use serde_json::{json, Value};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A JSON value of any shape, small.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A text field as careless clients fill it: good, empty, blank, with
/// control characters, oversize, any string, or not a string at all.
fn text_field(good: &'static str) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        24 => Just(Some(Value::from(good))),
        1 => Just(None),
        1 => Just(Some(Value::from(""))),
        1 => Just(Some(Value::from("   "))),
        1 => Just(Some(Value::from(format!("{good}\n\u{0}")))),
        1 => (250usize..1200).prop_map(|n| Some(Value::from("x".repeat(n)))),
        1 => any::<String>().prop_map(|s| Some(Value::from(s))),
        1 => any_json().prop_map(Some),
    ]
}

/// An event, each field good or broken in one of the ways above.
fn event() -> impl Strategy<Value = Value> {
    (
        text_field("lock-7f3a"),
        text_field("door.forced_open"),
        prop_oneof![
            6 => Just(None),
            1 => prop::sample::select(vec!["normal", "critical", "urgent", "", "CRITICAL"])
                .prop_map(|p| Some(Value::from(p))),
            1 => any_json().prop_map(Some),
        ],
        prop_oneof![
            6 => Just(None),
            6 => Just(Some(Value::from("2026-11-25T06:00:00Z"))),
            1 => any::<String>().prop_map(|s| Some(Value::from(s))),
            1 => any_json().prop_map(Some),
        ],
        prop_oneof![
            16 => Just(Some(json!(["acme"]))),
            1 => Just(None),
            1 => Just(Some(json!([]))),
            1 => Just(Some(json!(["acme", "initech"]))),
            1 => any_json().prop_map(Some),
        ],
        prop_oneof![
            16 => Just(Some(json!({"value": "forced_open"}))),
            1 => Just(None),
            1 => any_json().prop_map(Some),
            1 => (60_000usize..70_000).prop_map(|n| Some(json!({"blob": "y".repeat(n)}))),
        ],
        prop_oneof![
            12 => Just(None),
            1 => text_field("idem-1"),
            1 => ("[a-z]{1,6}", any_json()).prop_map(|(k, v)| Some(json!({ k: v }))),
        ],
    )
        .prop_map(|(device, kind, priority, at, partners, data, extra)| {
            let mut event = serde_json::Map::new();
            for (name, value) in [
                ("device_id", device),
                ("type", kind),
                ("priority", priority),
                ("occurred_at", at),
                ("partners", partners),
                ("data", data),
            ] {
                if let Some(value) = value {
                    event.insert(name.into(), value);
                }
            }
            match extra {
                Some(Value::Object(unknown)) => event.extend(unknown),
                Some(key) => {
                    event.insert("idempotency_key".into(), key);
                }
                None => {}
            }
            Value::Object(event)
        })
}

/// Bodies: one event, a batch, broken JSON made by cutting a good body,
/// arbitrary bytes, any JSON at all.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => event().prop_map(|e| e.to_string().into_bytes()),
        2 => prop::collection::vec(event(), 0..6).prop_map(|b| Value::Array(b).to_string().into_bytes()),
        1 => (event(), any::<prop::sample::Index>()).prop_map(|(e, cut)| {
            let text = e.to_string().into_bytes();
            text[..cut.index(text.len())].to_vec()
        }),
        1 => prop::collection::vec(any::<u8>(), 0..300),
        1 => any_json().prop_map(|v| v.to_string().into_bytes()),
    ]
}

/// Events in the store. Read from the store itself: deliveries of the
/// accepted cases settle while later cases run, so no API count holds still.
fn stored_events(h: &TestHerald) -> usize {
    h.records('e')
}

/// The answer is a problem document a client can act on.
fn check_problem(status: u16, problem: &Value) -> Result<(), TestCaseError> {
    prop_assert!(
        [400, 413, 422].contains(&status),
        "status {status}: {problem}"
    );
    prop_assert_eq!(&problem["status"], &json!(status));
    let kind = problem["type"].as_str().unwrap_or("");
    prop_assert!(kind.starts_with("/problems/"), "{problem}");
    let detail = problem["detail"].as_str().unwrap_or("");
    prop_assert!(!detail.trim().is_empty(), "{problem}");
    // A syntax error's line and column help; a field error names the field.
    if status == 422 {
        prop_assert!(
            !detail.contains(" at line "),
            "a position, not a field: {problem}"
        );
    }
    if let Some(field) = problem.get("field") {
        let field = field.as_str().unwrap_or("?");
        prop_assert!(
            field.is_empty() || field.starts_with('/'),
            "not a JSON pointer: {problem}"
        );
    }
    Ok(())
}

#[test]
fn any_ingest_body_gets_a_202_or_a_precise_problem_and_a_4xx_stores_nothing() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (h, _mock, _dir) = runtime.block_on(setup("", ""));
    let accepted = std::sync::atomic::AtomicU64::new(0);
    let refused = std::sync::atomic::AtomicU64::new(0);
    proptest!(config(), |(body in body())| {
        let before = stored_events(&h);
        let (status, answer) = runtime.block_on(async {
            let response = h
                .http
                .post(h.url("/v1/events"))
                .bearer_auth(INGEST_TOKEN)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .expect("herald answers every body");
            read(response).await
        });
        if status == 202 {
            accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            prop_assert!(answer.is_object() || answer.is_array(), "{answer}");
        } else {
            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            check_problem(status, &answer)?;
            prop_assert_eq!(stored_events(&h), before, "a {} stored something", status);
        }
    });
    let (accepted, refused) = (accepted.into_inner(), refused.into_inner());
    eprintln!("ingest bodies: {accepted} accepted, {refused} refused");
    assert!(
        accepted > 0 && refused > 0,
        "the generator covers both sides"
    );
}

/// A credentials object with the secret put somewhere, in some shape.
fn credentials_with(secret: String) -> impl Strategy<Value = Value> {
    let shaped = prop_oneof![
        Just(Value::from(secret.clone())),
        Just(json!([secret.clone()])),
        Just(json!({ "v": secret.clone() })),
        Just(json!([[secret.clone(), 1]])),
    ];
    let secret_again = secret.clone();
    prop_oneof![
        Just(Value::from(secret.clone())),
        Just(json!([secret.clone(), 7])),
        shaped.clone().prop_map(|s| json!({ "access_token": s })),
        shaped
            .clone()
            .prop_map(move |s| json!({ "access_token": secret_again.clone(), "refresh_token": s })),
        any_json()
            .prop_map(move |other| json!({ "access_token": secret.clone(), "expires_at": other })),
    ]
}

#[test]
fn a_secret_in_any_shape_in_a_link_body_is_never_repeated() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (h, _mock, _dir) = runtime.block_on(setup("", ""));
    let strategy = "[A-Za-z0-9._~+/-]{12,40}".prop_flat_map(|secret| {
        (
            Just(secret.clone()),
            credentials_with(format!("SeCrEt{secret}")),
        )
    });
    proptest!(config(), |((secret, credentials) in strategy)| {
        let secret = format!("SeCrEt{secret}");
        let body = json!({ "external_id": "lock-42", "credentials": credentials });
        let (status, answer) = runtime.block_on(async {
            let response = h
                .http
                .put(h.url("/v1/links/acme/lock-7f3a"))
                .bearer_auth(OPERATOR_TOKEN)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .expect("herald answers");
            read(response).await
        });
        prop_assert!([200, 201, 400, 413, 422].contains(&status), "{status}: {answer}");
        let text = answer.to_string();
        prop_assert!(!text.contains(&secret), "the secret is repeated: {text}");
        prop_assert!(!text.contains("SeCrEt"), "part of the secret is repeated: {text}");
        if status >= 400 {
            check_problem(status, &answer)?;
        }
    });
}
