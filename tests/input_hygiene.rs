//! Careless and hostile input answered precisely: a secret sent in the
//! wrong shape is never repeated, oversize fields are named, malformed path
//! ids and unknown partners are the caller's error, and a config whose
//! tokens are ambiguous or carry stray whitespace is refused by `herald check`.

mod common;

use common::*;
use serde_json::{json, Value};

const LEAKED: &str = "sk-live-Leaked-Secret-0123456789";

async fn send(
    h: &TestHerald,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<String>,
) -> (u16, Value) {
    let mut request = h.http.request(method, h.url(path)).bearer_auth(token);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    read(request.send().await.expect("herald answers")).await
}

async fn put_link(h: &TestHerald, device: &str, body: &Value) -> (u16, Value) {
    send(
        h,
        reqwest::Method::PUT,
        &format!("/v1/links/acme/{device}"),
        OPERATOR_TOKEN,
        Some(body.to_string()),
    )
    .await
}

/// Every shape a secret can be sent in by mistake: as the whole
/// credentials object, as a token that is a number-like string in the wrong
/// place, nested one level too deep. The answer names the field and the
/// expected type and never the value.
#[tokio::test]
async fn a_secret_sent_in_the_wrong_shape_is_never_repeated() {
    let (h, _mock, _dir) = setup("", "").await;
    let cases = [
        (
            json!({"external_id": "lock-42", "credentials": LEAKED}),
            "/credentials",
        ),
        (
            json!({"external_id": "lock-42", "credentials": {"access_token": [LEAKED]}}),
            "/credentials/access_token",
        ),
        (
            json!({"external_id": "lock-42", "credentials": {"access_token": "a", "refresh_token": {"v": LEAKED}}}),
            "/credentials/refresh_token",
        ),
        (
            json!({"external_id": "lock-42", "credentials": {"access_token": LEAKED, "expires_at": 17}}),
            "/credentials/expires_at",
        ),
        (
            json!({"external_id": "lock-42", "credentials": {"access_token": LEAKED, "refresh_token": 7}}),
            "/credentials/refresh_token",
        ),
    ];
    for (body, field) in cases {
        let (status, problem) = put_link(&h, "lock-7f3a", &body).await;
        assert_eq!(status, 422, "{body} → {problem}");
        assert_eq!(problem["field"], field, "{problem}");
        let text = problem.to_string();
        assert!(!text.contains(LEAKED), "the secret is repeated: {text}");
        assert!(
            !text.contains("sk-live"),
            "part of the secret is repeated: {text}"
        );
        assert!(
            problem["detail"]
                .as_str()
                .unwrap_or("")
                .contains("expected"),
            "the expected type is kept: {problem}"
        );
    }
    // A field that holds no secret still quotes what was sent.
    let (status, problem) = put_link(
        &h,
        "lock-7f3a",
        &json!({"external_id": ["lock-42-sent-as-list"]}),
    )
    .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["field"], "/external_id");
    assert!(problem["detail"]
        .as_str()
        .unwrap_or("")
        .contains("expected a string"));
}

#[tokio::test]
async fn link_options_are_capped_and_the_answer_names_the_field() {
    let (h, _mock, _dir) = setup("", "").await;
    let big = "x".repeat(7 * 1024 * 1024);
    let (status, problem) = put_link(
        &h,
        "lock-7f3a",
        &json!({"external_id": "lock-42", "options": {"blob": big}}),
    )
    .await;
    assert_eq!(status, 413, "{problem}");
    assert_eq!(problem["field"], "/options", "{problem}");
    assert!(
        problem["detail"].as_str().unwrap_or("").contains("16384"),
        "the limit is named: {problem}"
    );
    // Nothing was stored.
    let (status, _) = send(
        &h,
        reqwest::Method::GET,
        "/v1/links/acme/lock-7f3a",
        OPERATOR_TOKEN,
        None,
    )
    .await;
    assert_eq!(status, 404);
    // Just under the cap is taken.
    let fits = "x".repeat(16 * 1024 - 64);
    let (status, problem) = put_link(
        &h,
        "lock-7f3a",
        &json!({"external_id": "lock-42", "options": {"blob": fits}}),
    )
    .await;
    assert_eq!(status, 201, "{problem}");
}

#[tokio::test]
async fn an_oversize_device_id_is_named_in_the_413() {
    let (h, _mock, _dir) = setup("", "").await;
    let long = "d".repeat(100 * 1024);
    let event = json!({"device_id": long, "type": "door.opened", "data": {"v": 1}});
    let (status, problem) = h.post_events(&event.to_string()).await;
    assert_eq!(status, 413, "{problem}");
    assert!(!problem.to_string().contains("ddddd"), "{problem}");
    assert_eq!(problem["field"], "/device_id", "{problem}");
    let (status, problem) = h
        .post_events(
            &json!([{"device_id": "lock-1", "type": "t", "partners": ["acme"]}, event]).to_string(),
        )
        .await;
    assert_eq!(status, 413, "{problem}");
    assert_eq!(problem["field"], "/1/device_id", "{problem}");
    let (status, problem) = h
        .post_events(&json!({"device_id": "lock-1", "type": "t", "data": {"v": long}}).to_string())
        .await;
    assert_eq!(status, 413, "{problem}");
    assert_eq!(problem["field"], "/data", "{problem}");
}

#[tokio::test]
async fn a_malformed_uuid_in_a_path_is_a_400_naming_the_parameter() {
    let (h, _mock, _dir) = setup("", "").await;
    for (method, path) in [
        (reqwest::Method::GET, "/v1/events/not-a-uuid"),
        (reqwest::Method::GET, "/v1/dead-letters/not-a-uuid"),
        (reqwest::Method::DELETE, "/v1/dead-letters/not-a-uuid"),
        (reqwest::Method::POST, "/v1/dead-letters/not-a-uuid/replay"),
    ] {
        let (status, problem) = send(&h, method.clone(), path, OPERATOR_TOKEN, None).await;
        assert_eq!(status, 400, "{method} {path}: {problem}");
        assert_eq!(problem["field"], "/id", "{problem}");
        assert!(
            problem["detail"].as_str().unwrap_or("").contains("id"),
            "{problem}"
        );
    }
    // A well-formed id that names nothing is still a 404.
    let (status, _) = h
        .get("/v1/events/0190d9a0-0000-7000-8000-000000000000")
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_bulk_replay_for_an_unknown_partner_is_refused_by_name() {
    let (h, _mock, _dir) = setup("", "").await;
    let (status, problem) = send(
        &h,
        reqwest::Method::POST,
        "/v1/dead-letters/replay?partner=acmee",
        OPERATOR_TOKEN,
        None,
    )
    .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["field"], "/partner");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or("")
            .contains("\"acmee\""),
        "{problem}"
    );
    let (status, problem) = send(
        &h,
        reqwest::Method::POST,
        "/v1/dead-letters/replay?partner=acme",
        OPERATOR_TOKEN,
        None,
    )
    .await;
    assert_eq!(status, 202, "{problem}");
}

/// `herald check` run as an operator runs it, on a config file and secrets
/// in the environment: exit status 2 and a message naming what is wrong.
fn herald_check(toml: &str, env: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("herald.toml");
    std::fs::write(&path, toml).expect("config written");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_herald"));
    command.arg("check").arg("--config").arg(&path);
    for (name, value) in env {
        command.env(name, value);
    }
    let out = command.output().expect("herald runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn two_tokens(second_role: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "/tmp/herald-check-unused"

[[tokens]]
name = "door-service"
role = "ingest"
token_env = "CHECK_TOKEN_A"

[[tokens]]
name = "on-call"
role = "{second_role}"
token_env = "CHECK_TOKEN_B"
"#
    )
}

#[test]
fn herald_check_refuses_two_tokens_with_one_secret_by_name() {
    const SHARED: &str = "shared-secret-0123456789abcdef";
    for role in ["operator", "ingest"] {
        let (code, text) = herald_check(
            &two_tokens(role),
            &[("CHECK_TOKEN_A", SHARED), ("CHECK_TOKEN_B", SHARED)],
        );
        assert_eq!(code, 2, "{text}");
        assert!(
            text.contains("door-service") && text.contains("on-call"),
            "{text}"
        );
        assert!(text.contains("same secret"), "{text}");
        assert!(!text.contains(SHARED), "the secret is printed: {text}");
    }
    let (code, text) = herald_check(
        &two_tokens("operator"),
        &[
            ("CHECK_TOKEN_A", "first-secret-0123456789abcdef"),
            ("CHECK_TOKEN_B", "second-secret-0123456789abcdef"),
        ],
    );
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("config ok"), "{text}");
}

#[test]
fn herald_check_refuses_a_token_with_surrounding_whitespace() {
    for padded in [
        "door-secret-0123456789abcdef\n",
        " door-secret-0123456789abcdef",
        "door-secret-0123456789abcdef\t",
        "door-secret-0123456789abcdef\r\n",
    ] {
        let (code, text) = herald_check(
            &two_tokens("operator"),
            &[
                ("CHECK_TOKEN_A", padded),
                ("CHECK_TOKEN_B", "second-secret-0123456789abcdef"),
            ],
        );
        assert_eq!(code, 2, "{padded:?}: {text}");
        assert!(text.contains("tokens[0].token_env"), "{text}");
        assert!(text.contains("$CHECK_TOKEN_A"), "{text}");
        assert!(text.contains("whitespace"), "{text}");
        assert!(
            !text.contains("door-secret"),
            "the secret is printed: {text}"
        );
    }
}
