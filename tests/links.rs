//! `/v1/links` as the account service and on-call use it: every bad field
//! named, nothing half-written, routing by link, and who may call it.

mod common;

use common::*;
use herald::clock::Clock;
use serde_json::{json, Value};

async fn call(
    h: &TestHerald,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<String>,
) -> (u16, Value) {
    let mut request = h.http.request(method, h.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    read(request.send().await.expect("herald answers")).await
}

async fn put(h: &TestHerald, path: &str, body: &Value) -> (u16, Value) {
    call(
        h,
        reqwest::Method::PUT,
        path,
        Some(OPERATOR_TOKEN),
        Some(body.to_string()),
    )
    .await
}

fn good_link() -> Value {
    json!({
        "external_id": "lock-42",
        "account": "user-7",
        "callback_url": "https://c2c-eu.smartthings.example/device/events",
        "credentials": {
            "access_token": "acc-T0ken-never-shown",
            "refresh_token": "ref-T0ken-never-shown",
            "expires_at": "2026-11-26T06:00:00Z"
        },
        "options": { "tier": "gold" }
    })
}

#[tokio::test]
async fn links_are_put_shown_without_secrets_and_deleted() {
    let (h, mock, _dir) = setup("", "").await;
    let (status, body) = put(&h, "/v1/links/acme/lock-7f3a", &good_link()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["external_id"], "lock-42");
    assert_eq!(body["has_credentials"], true);
    assert_eq!(body["expires_at"], "2026-11-26T06:00:00Z");
    assert_eq!(body["generation"], 1);
    assert!(!body.to_string().contains("T0ken"), "{body}");
    let (status, again) = put(&h, "/v1/links/acme/lock-7f3a", &good_link()).await;
    assert_eq!((status, again["generation"].clone()), (200, json!(2)));

    let (status, shown) = h.get("/v1/links/acme/lock-7f3a").await;
    assert_eq!(status, 200);
    assert_eq!(shown["options"], json!({ "tier": "gold" }));
    assert!(!shown.to_string().contains("T0ken"), "{shown}");

    // An event naming no partner goes to the device's links.
    let (status, accepted) = h
        .post_events(r#"{"device_id":"lock-7f3a","type":"door.forced_open"}"#)
        .await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["deliveries"][0]["partner"], "acme");
    mock.wait_for(1).await;

    let (status, _) = call(
        &h,
        reqwest::Method::DELETE,
        "/v1/links/acme/lock-7f3a",
        Some(OPERATOR_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, gone) = h.get("/v1/links/acme/lock-7f3a").await;
    assert_eq!(status, 404, "{gone}");
    let (status, again) = call(
        &h,
        reqwest::Method::DELETE,
        "/v1/links/acme/lock-7f3a",
        Some(OPERATOR_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 404, "{again}");
    // Unlinked, with nobody subscribed: nowhere to send it.
    let (status, refused) = h
        .post_events(r#"{"device_id":"lock-7f3a","type":"door.forced_open"}"#)
        .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["field"], "/partners");
}

#[tokio::test]
async fn links_of_one_account_share_its_grant_and_a_link_without_one_has_its_own() {
    let (h, _mock, _dir) = setup("", "").await;
    let delete = |path: &'static str| {
        let h = &h;
        async move {
            call(h, reqwest::Method::DELETE, path, Some(OPERATOR_TOKEN), None)
                .await
                .0
        }
    };
    let with_tokens = |access: &str, expires_at: &str| {
        json!({
            "external_id": "lock-42",
            "account": "user-7",
            "credentials": { "access_token": access, "refresh_token": "ref-T0ken", "expires_at": expires_at }
        })
    };
    let (status, first) = put(
        &h,
        "/v1/links/acme/lock-1",
        &with_tokens("acc-T0ken-A", "2026-11-26T06:00:00Z"),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["grant"], "account/user-7", "{first}");

    // The user's second device: the account service names the account and
    // needs no tokens of its own.
    let (status, second) = put(
        &h,
        "/v1/links/acme/lock-2",
        &json!({ "external_id": "window-9", "account": "user-7" }),
    )
    .await;
    assert_eq!(status, 201, "{second}");
    assert_eq!(second["grant"], "account/user-7", "{second}");
    assert_eq!(second["has_credentials"], true, "{second}");
    assert_eq!(second["expires_at"], "2026-11-26T06:00:00Z", "{second}");

    // New tokens put with either link are the account's, for both.
    let (status, _) = put(
        &h,
        "/v1/links/acme/lock-2",
        &with_tokens("acc-T0ken-B", "2026-12-01T00:00:00Z"),
    )
    .await;
    assert_eq!(status, 200);
    let (_, first) = h.get("/v1/links/acme/lock-1").await;
    assert_eq!(first["expires_at"], "2026-12-01T00:00:00Z", "{first}");
    assert!(!first.to_string().contains("T0ken"), "{first}");

    // Without an account a link has a grant of its own, and a PUT without
    // credentials leaves it with none, as before grants.
    let own = json!({ "external_id": "cam-1", "credentials": { "access_token": "acc-T0ken-C" } });
    let (_, third) = put(&h, "/v1/links/acme/cam-1", &own).await;
    assert_eq!(
        (third["grant"].clone(), third["has_credentials"].clone()),
        (json!("device/cam-1"), json!(true)),
        "{third}"
    );
    let (_, third) = put(
        &h,
        "/v1/links/acme/cam-1",
        &json!({ "external_id": "cam-1" }),
    )
    .await;
    assert_eq!(third["has_credentials"], false, "{third}");

    // The grant stays while a link uses it and goes with the last one.
    assert_eq!(delete("/v1/links/acme/lock-1").await, 204);
    let (_, second) = h.get("/v1/links/acme/lock-2").await;
    assert_eq!(second["has_credentials"], true, "{second}");
    assert_eq!(delete("/v1/links/acme/lock-2").await, 204);
    let (_, later) = put(
        &h,
        "/v1/links/acme/lock-3",
        &json!({ "external_id": "lock-43", "account": "user-7" }),
    )
    .await;
    assert_eq!(later["has_credentials"], false, "{later}");
}

#[tokio::test]
async fn bad_links_name_the_field_and_change_nothing() {
    let (h, _mock, _dir) = setup("", "").await;
    let (status, _) = put(&h, "/v1/links/acme/lock-7f3a", &good_link()).await;
    assert_eq!(status, 201);
    let with = |pointer: &str, value: Value| {
        let mut link = good_link();
        let mut at = &mut link;
        let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
        for part in &parts[..parts.len() - 1] {
            at = &mut at[*part];
        }
        at[parts[parts.len() - 1]] = value;
        link
    };
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (json!({}), 422, "/external_id", "missing field"),
        (
            with("/external_id", json!("")),
            422,
            "/external_id",
            "empty",
        ),
        (
            with("/external_id", json!(7)),
            422,
            "/external_id",
            "invalid type",
        ),
        (
            with("/colour", json!("red")),
            422,
            "",
            "unknown field `colour`",
        ),
        (
            with("/callback_url", json!("ftp://x.example/")),
            422,
            "/callback_url",
            "http",
        ),
        (
            with("/callback_url", json!("not a url")),
            422,
            "/callback_url",
            "not a URL",
        ),
        (
            with("/token_url", json!("mailto:x@y.example")),
            422,
            "/token_url",
            "http",
        ),
        (with("/options", json!([1])), 422, "/options", "object"),
        (
            with("/credentials/access_token", json!("")),
            422,
            "/credentials/access_token",
            "empty",
        ),
        (
            with("/credentials/refresh_token", json!("two words")),
            422,
            "/credentials/refresh_token",
            "spaces",
        ),
        (
            with("/credentials/expires_at", json!("tomorrow")),
            422,
            "/credentials/expires_at",
            "RFC 3339",
        ),
        (
            with("/account", json!("x".repeat(300))),
            422,
            "/account",
            "limit",
        ),
    ];
    for (body, status, field, detail) in cases {
        let (got, problem) = put(&h, "/v1/links/acme/lock-7f3a", &body).await;
        assert_eq!(got, status, "{body} -> {problem}");
        if !field.is_empty() {
            assert_eq!(problem["field"], field, "{body} -> {problem}");
        }
        let text = problem["detail"].as_str().unwrap_or_default();
        assert!(
            text.contains(detail),
            "{body}: {text:?} should say {detail:?}"
        );
        assert!(!problem.to_string().contains("T0ken"), "{problem}");
    }
    let (status, problem) = call(
        &h,
        reqwest::Method::PUT,
        "/v1/links/acme/lock-7f3a",
        Some(OPERATOR_TOKEN),
        Some("{not json".into()),
    )
    .await;
    assert_eq!(status, 400, "{problem}");
    let long_device = format!("/v1/links/acme/{}", "d".repeat(300));
    let (status, problem) = put(&h, &long_device, &good_link()).await;
    assert_eq!(
        (status, problem["field"].clone()),
        (422, json!("/device_id"))
    );
    let (status, problem) = put(&h, "/v1/links/nobody/lock-7f3a", &good_link()).await;
    assert_eq!(status, 404, "{problem}");
    assert!(problem["detail"]
        .as_str()
        .unwrap_or_default()
        .contains("nobody"));
    // Nothing of the refused bodies stuck.
    let (_, shown) = h.get("/v1/links/acme/lock-7f3a").await;
    assert_eq!(shown["generation"], 1, "{shown}");
    assert_eq!(shown["external_id"], "lock-42");
}

#[tokio::test]
async fn only_operators_touch_links() {
    let (h, _mock, _dir) = setup("", "").await;
    let body = Some(good_link().to_string());
    let path = "/v1/links/acme/lock-7f3a";
    let (status, _) = call(&h, reqwest::Method::PUT, path, None, body.clone()).await;
    assert_eq!(status, 401);
    let (status, _) = call(&h, reqwest::Method::PUT, path, Some(INGEST_TOKEN), body).await;
    assert_eq!(status, 403);
    let (status, _) = call(&h, reqwest::Method::GET, path, Some(INGEST_TOKEN), None).await;
    assert_eq!(status, 403);
    let (status, _) = call(&h, reqwest::Method::DELETE, path, Some(INGEST_TOKEN), None).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn credentials_without_a_link_key_are_refused_not_stored_in_clear() {
    let clock = Clock::manual(START_MS);
    let mock = MockPartner::start(clock.clone()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let toml = config_toml(dir.path(), &partner_toml("acme", &mock.url, ""), "");
    let env = |name: &str| match name {
        "HERALD_LINK_KEY" => None,
        other => test_env(other),
    };
    let h = TestHerald::start_with_env(&toml, clock, &env).await;
    assert!(h.config.server.link_key.is_none());
    let (status, problem) = put(&h, "/v1/links/acme/lock-7f3a", &good_link()).await;
    assert_eq!(status, 503, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("HERALD_LINK_KEY"),
        "{problem}"
    );
    let (status, _) = h.get("/v1/links/acme/lock-7f3a").await;
    assert_eq!(status, 404, "nothing was stored");
    // A link without credentials needs no key.
    let mut bare = good_link();
    bare.as_object_mut().expect("object").remove("credentials");
    let (status, body) = put(&h, "/v1/links/acme/lock-7f3a", &bare).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["has_credentials"], false);
}

#[tokio::test]
async fn a_partners_links_are_listed_a_page_at_a_time_without_secrets() {
    let (h, _mock, _dir) = setup("", "").await;
    for device in ["door-1", "door-2", "thermo-9"] {
        let (status, _) = put(&h, &format!("/v1/links/acme/{device}"), &good_link()).await;
        assert_eq!(status, 201);
    }
    let (status, page) = h.get("/v1/links/acme?limit=2").await;
    assert_eq!(status, 200, "{page}");
    let devices = |page: &Value| -> Vec<String> {
        page["links"]
            .as_array()
            .expect("links")
            .iter()
            .map(|l| l["device_id"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(devices(&page), ["door-1", "door-2"]);
    assert_eq!(page["next"], "door-2");
    assert!(!page.to_string().contains("T0ken"), "{page}");
    let (_, rest) = h.get("/v1/links/acme?limit=2&after=door-2").await;
    assert_eq!(devices(&rest), ["thermo-9"]);
    assert_eq!(rest["next"], Value::Null);
    let (status, problem) = h.get("/v1/links/acme?limit=0").await;
    assert_eq!((status, problem["field"].clone()), (422, json!("/limit")));
    let (status, _) = h.get("/v1/links/nobody").await;
    assert_eq!(status, 404);
}
