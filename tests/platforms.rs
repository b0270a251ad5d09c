//! Every platform end to end: herald in-process on a temp data dir, a
//! device link put through the API, and that platform's mock partner over
//! loopback. Per platform: delivered by the link alone; an expired token
//! refreshed once and the rotated token still in use after a restart;
//! a throttled answer retried no sooner than its Retry-After; a terminal
//! code parks the link and later events become dead letters saying why.

mod common;

use std::time::Duration;

use adapters::google::service_account::ServiceAccount;
use adapters::mock::{MockHandle, MockPartner as PlatformMock, RetryAfter, Scenario};
use common::*;
use herald::clock::Clock;
use herald::model::{DeliveryState, EventRecord};
use serde_json::{json, Value};

const GOOGLE_KEY: &str = include_str!("../fixtures/google/service-account.test.json");
const DEVICE: &str = "lock-7f3a";
const ROTATED_SECRET: &str = "herald-client-secret-rotated";

/// Platforms whose token is one for the whole partner (minted by herald),
/// not the link's own user token.
fn partner_scoped(platform: &str) -> bool {
    matches!(platform, "google" | "thinq")
}

fn platform_toml(platform: &str, base: &str, extra: &str) -> String {
    let lines = match platform {
        "smartthings" => String::new(),
        "alexa" => format!(
            "gateways = {{ na = \"{base}/na/v3/events\", eu = \"{base}/eu/v3/events\", fe = \"{base}/fe/v3/events\" }}"
        ),
        "google" => format!(
            "url = \"{base}/v1/devices:reportStateAndNotification\"\ntoken_url = \"{base}/token\"\nservice_account_key_env = \"TEST_GOOGLE_KEY\""
        ),
        "thinq" => format!(
            "url = \"{base}\"\ntoken_url = \"{base}/oauth2/token\"\nsecret_env = \"TEST_THINQ_API_KEY\""
        ),
        _ => format!("url = \"{base}\""),
    };
    format!(
        r#"
[partners.{platform}]
adapter = "{platform}"
{lines}
client_id_env = "TEST_CLIENT_ID"
client_secret_env = "TEST_CLIENT_SECRET"
allow_private = true
timeout_ms = 2000
max_in_flight = 128
retry = {{ initial_ms = 100, multiplier = 2.0, max_interval_ms = 10000, max_age = "1h" }}
{extra}
"#
    )
}

/// The link body for `platform` with its endpoints at the mock `base`.
pub fn link_body(platform: &str, base: &str, access: &str, refresh: &str) -> Value {
    let mut link = json!({ "external_id": "lock-42", "account": "user-7" });
    let region = match platform {
        "alexa" => Some("eu"),
        "thinq" => Some("kr"),
        _ => None,
    };
    if let Some(region) = region {
        link["region"] = region.into();
    }
    match platform {
        "smartthings" => {
            link["callback_url"] = format!("{base}/device/events").into();
            link["token_url"] = format!("{base}/oauth/token").into();
        }
        "alexa" => link["token_url"] = format!("{base}/auth/o2/token").into(),
        "kakao" | "clova" | "genie" => link["token_url"] = format!("{base}/oauth/token").into(),
        _ => {}
    }
    if platform == "kakao" {
        link["options"] = json!({ "web_url": "https://app.devicemaker.example/alerts" });
    }
    if !partner_scoped(platform) {
        link["credentials"] = json!({
            "access_token": access,
            "refresh_token": refresh,
            "expires_at": "2027-06-01T00:00:00Z",
        });
    }
    link
}

fn env(name: &str) -> Option<String> {
    match name {
        "TEST_CLIENT_ID" => Some("herald-client".into()),
        "TEST_CLIENT_SECRET" => Some("herald-client-secret".into()),
        // The secret after the platform rotated it: what on-call puts in
        // the config to fix a refused client.
        "TEST_ROTATED_CLIENT_SECRET" => Some(ROTATED_SECRET.into()),
        "TEST_GOOGLE_KEY" => Some(GOOGLE_KEY.into()),
        "TEST_THINQ_API_KEY" => Some("thinq-api-key".into()),
        other => test_env(other),
    }
}

/// One platform's mock and a herald linked to it.
struct Stage {
    platform: &'static str,
    /// `None` only while restarting.
    herald: Option<TestHerald>,
    mock: MockHandle,
    base: String,
    toml: String,
    _dir: tempfile::TempDir,
}

impl Stage {
    async fn start(platform: &'static str, scenario: Scenario) -> Stage {
        Stage::start_with(platform, scenario, "").await
    }

    async fn start_with(platform: &'static str, mut scenario: Scenario, extra: &str) -> Stage {
        scenario.access_token = if partner_scoped(platform) {
            "partner-token-0".into()
        } else {
            "at-0".into()
        };
        if platform == "google" {
            let key = ServiceAccount::from_json(GOOGLE_KEY).expect("test key");
            scenario.public_key_der = Some(key.public_key_der());
        }
        let (addr, mock) = PlatformMock::start(platform, scenario)
            .await
            .expect("mock starts");
        let base = format!("http://{addr}");
        let dir = tempfile::tempdir().expect("temp dir");
        let toml = config_toml(dir.path(), &platform_toml(platform, &base, extra), "");
        let herald = start_herald(&toml).await;
        let stage = Stage {
            platform,
            herald: Some(herald),
            mock,
            base,
            toml,
            _dir: dir,
        };
        let (status, body) = stage
            .put_link(&link_body(platform, &stage.base, "at-0", "rt-0"))
            .await;
        assert_eq!(status, 201, "{body}");
        stage
    }

    async fn put_link(&self, body: &Value) -> (u16, Value) {
        self.put_link_of(DEVICE, body).await
    }

    async fn put_link_of(&self, device: &str, body: &Value) -> (u16, Value) {
        let response = self
            .h()
            .http
            .put(
                self.h()
                    .url(&format!("/v1/links/{}/{device}", self.platform)),
            )
            .bearer_auth(OPERATOR_TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("herald answers");
        read(response).await
    }

    fn h(&self) -> &TestHerald {
        self.herald.as_ref().expect("herald is running")
    }

    /// Stops herald cleanly and starts it again on the same data dir.
    async fn restart(&mut self) {
        let old = self.herald.take().expect("herald is running");
        let clock = old.clock.clone();
        old.herald.shutdown().await.expect("clean shutdown");
        self.herald = Some(start_herald_on(&self.toml, clock).await);
    }

    /// A forced-open door, routed by the device's link (no `partners`).
    async fn alert(&self) -> String {
        self.alert_of(DEVICE).await
    }

    async fn alert_of(&self, device: &str) -> String {
        let (status, body) = self
            .h()
            .post_events(&format!(
                r#"{{"device_id":"{device}","type":"door.forced_open","priority":"critical","data":{{"capability":"lock","attribute":"lock","value":"forced_open","kind":"forced_open"}}}}"#
            ))
            .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["deliveries"][0]["partner"], self.platform, "{body}");
        body["id"].as_str().expect("id").to_string()
    }

    /// An alert from each device at once, then waits until all delivered.
    async fn alert_each_until_delivered(&self, devices: &[&str]) {
        let mut ids = Vec::new();
        for device in devices {
            ids.push(self.alert_of(device).await);
        }
        for id in &ids {
            self.wait_state(id, DeliveryState::Delivered).await;
        }
    }

    async fn wait_state(&self, id: &str, state: DeliveryState) -> EventRecord {
        self.h()
            .wait_event(id, &format!("{state:?} at {}", self.platform), |e| {
                e.deliveries[0].state == state
            })
            .await
    }

    /// [`Stage::wait_state`], moving herald's clock on a second at a time
    /// so retries (Google's grace for a 404) come due.
    async fn wait_state_advancing(&self, id: &str, state: DeliveryState) -> EventRecord {
        let uuid = uuid::Uuid::parse_str(id).expect("uuid");
        for _ in 0..600 {
            let event = self.h().herald.store().event(uuid).expect("store reads");
            if let Some(event) = event.filter(|e| e.deliveries[0].state == state) {
                return event;
            }
            self.h().clock.advance(Duration::from_secs(1));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{}: event {id} never reached {state:?}", self.platform);
    }

    fn deliveries_seen(&self) -> usize {
        self.mock
            .requests()
            .iter()
            .filter(|r| !r.token_request)
            .count()
    }

    /// Waits (real time, bounded) until the mock saw `n` deliveries.
    async fn wait_deliveries(&self, n: usize) {
        for _ in 0..2000 {
            if self.deliveries_seen() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!(
            "{}: expected {n} deliveries at the mock, saw {}",
            self.platform,
            self.deliveries_seen()
        );
    }

    /// The link's credentials as the store holds them, opened with the key.
    fn stored_credentials(&self) -> Option<adapters::Credentials> {
        self.stored_credentials_of(DEVICE)
    }

    fn stored_credentials_of(&self, device: &str) -> Option<adapters::Credentials> {
        let config = herald::config::Config::parse(&self.toml, &env).expect("config");
        let links = herald::links::Links::new(
            self.h().herald.store().clone(),
            config.server.link_key,
            self.h().clock.clone(),
        );
        links
            .get(self.platform, device)
            .expect("link reads")
            .expect("link exists")
            .credentials
    }
}

async fn start_herald(toml: &str) -> TestHerald {
    start_herald_on(toml, Clock::manual(START_MS)).await
}

async fn start_herald_on(toml: &str, clock: Clock) -> TestHerald {
    TestHerald::start_with_env(toml, clock, &env).await
}

async fn delivered_and_refreshed_once_then_persisted(platform: &'static str) {
    let mut stage = Stage::start(platform, Scenario::default()).await;
    if partner_scoped(platform) {
        // herald mints the partner token before its first send.
        let first = stage.alert().await;
        stage.wait_state(&first, DeliveryState::Delivered).await;
        assert_eq!(stage.mock.refreshes(), 1, "{platform}: one mint");
    }
    let issued = stage.mock.refreshes();
    stage.mock.expire_token();
    let id = stage.alert().await;
    let event = stage.wait_state(&id, DeliveryState::Delivered).await;
    assert_eq!(
        stage.mock.refreshes(),
        issued + 1,
        "{platform}: exactly one refresh for one expired token"
    );
    let last = event.deliveries[0].last_attempt.as_ref().expect("attempt");
    assert_eq!(
        last.number, 1,
        "{platform}: the resend after a refresh is the same attempt"
    );
    if platform == "thinq" {
        // LG wants a new x-message-id on every call
        // (thinq-connect/pythinqconnect thinqconnect/thinq_api.py
        // `_generate_message_id`), the resend after the refresh included.
        let message_ids: Vec<String> = stage
            .mock
            .requests()
            .iter()
            .filter(|r| !r.token_request)
            .filter_map(|r| r.request.header("x-message-id").map(str::to_string))
            .collect();
        assert!(message_ids.len() >= 3, "{message_ids:?}");
        let distinct: std::collections::HashSet<&String> = message_ids.iter().collect();
        assert_eq!(distinct.len(), message_ids.len(), "{message_ids:?}");
    }
    if !partner_scoped(platform) {
        let stored = stage.stored_credentials().expect("credentials");
        assert_eq!(stored.access_token, stage.mock.access_token(), "{platform}");
        assert_eq!(
            stored.refresh_token.as_deref(),
            Some(stage.mock.refresh_token().as_str()),
            "{platform}: the rotated refresh token is stored"
        );
    }
    stage.restart().await;
    let after = stage.mock.refreshes();
    let id = stage.alert().await;
    stage.wait_state(&id, DeliveryState::Delivered).await;
    let expected = if partner_scoped(platform) {
        // A partner token lives in memory: minted again after the restart.
        after + 1
    } else {
        // The rotated token came back from disk: no refresh needed.
        after
    };
    assert_eq!(stage.mock.refreshes(), expected, "{platform} after restart");
    assert_eq!(stage.mock.duplicates(), 0, "{platform}");
}

async fn throttled_waits_for_retry_after(platform: &'static str) {
    let scenario = Scenario {
        throttle: 1,
        retry_after: RetryAfter::Seconds(2),
        ..Scenario::default()
    };
    let stage = Stage::start(platform, scenario).await;
    let id = stage.alert().await;
    stage.wait_deliveries(1).await;
    let event = stage
        .h()
        .wait_event(&id, "the 429 recorded", |e| e.deliveries[0].attempts == 1)
        .await;
    let d = &event.deliveries[0];
    assert_eq!(d.state, DeliveryState::Pending, "{platform}");
    let last = d.last_attempt.as_ref().expect("attempt");
    assert_eq!(last.status, Some(429), "{platform}: {}", last.detail);
    let due = d.next_due_ms.expect("retry scheduled");
    assert!(
        due >= last.at_ms + 2000,
        "{platform}: retry at +{} ms, before Retry-After",
        due - last.at_ms
    );
    stage.h().clock.advance(Duration::from_millis(1500));
    settle().await;
    assert_eq!(stage.deliveries_seen(), 1, "{platform}: retried too early");
    stage.h().clock.advance(Duration::from_millis(600));
    stage.wait_state(&id, DeliveryState::Delivered).await;
    assert_eq!(stage.deliveries_seen(), 2, "{platform}");
}

async fn terminal_code_parks_the_link(platform: &'static str) {
    let scenario = Scenario {
        terminal: true,
        ..Scenario::default()
    };
    let stage = Stage::start(platform, scenario).await;
    let first = stage.alert().await;
    let event = stage
        .wait_state_advancing(&first, DeliveryState::Dead)
        .await;
    let reason = event.deliveries[0]
        .last_attempt
        .as_ref()
        .expect("attempt")
        .detail
        .clone();
    let (status, parked) = stage
        .h()
        .get(&format!("/v1/partners/{platform}/parked"))
        .await;
    assert_eq!(status, 200, "{parked}");
    assert_eq!(
        parked["parked"][0]["device_id"], DEVICE,
        "{platform}: {parked}"
    );
    let later = stage.alert().await;
    let event = stage.wait_state(&later, DeliveryState::Dead).await;
    let letter_id = event.deliveries[0].dead_letter.expect("a dead letter");
    let (_, letter) = stage
        .h()
        .get(&format!("/v1/dead-letters/{letter_id}"))
        .await;
    let why = letter["reason"].as_str().unwrap_or_default();
    assert!(
        why.contains("parked") && why.contains(reason.as_str()),
        "{platform}: {why:?} should say the route is parked and why ({reason:?})"
    );
    let sends_before_parking = if platform == "google" {
        adapters::google::NOT_FOUND_ATTEMPTS as usize
    } else {
        1
    };
    assert_eq!(
        stage.deliveries_seen(),
        sends_before_parking,
        "{platform}: nothing sent once parked"
    );
    // Putting the link again is how on-call says it works now.
    let (status, body) = stage
        .put_link(&link_body(platform, &stage.base, "at-0", "rt-0"))
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, parked) = stage
        .h()
        .get(&format!("/v1/partners/{platform}/parked"))
        .await;
    assert_eq!(parked["parked"], json!([]), "{platform}");
}

/// The user revoked the grant: the refresh's terminal answer parks the link.
async fn revoked_grant_parks_the_link(platform: &'static str) {
    let scenario = Scenario {
        expire_after: Some(0),
        refresh_terminal: true,
        ..Scenario::default()
    };
    let stage = Stage::start(platform, scenario).await;
    let id = stage.alert().await;
    let event = stage.wait_state(&id, DeliveryState::Dead).await;
    let detail = &event.deliveries[0]
        .last_attempt
        .as_ref()
        .expect("attempt")
        .detail;
    assert!(detail.contains("refresh"), "{platform}: {detail}");
    let (_, parked) = stage
        .h()
        .get(&format!("/v1/partners/{platform}/parked"))
        .await;
    assert_eq!(
        parked["parked"][0]["device_id"], DEVICE,
        "{platform}: {parked}"
    );
}

/// A partner-wide token belongs to herald, not to a user: the platform
/// refusing it says herald's own credentials are wrong, so deliveries wait
/// and the partner's alert is raised; no device's route is parked.
async fn refused_partner_token_alerts_and_parks_nothing(platform: &'static str) {
    let scenario = Scenario {
        refresh_terminal: true,
        ..Scenario::default()
    };
    let stage = Stage::start(platform, scenario).await;
    let id = stage.alert().await;
    let partner = stage.wait_alert(true).await;
    let reason = partner["alert"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("partner credentials"),
        "{platform}: {partner}"
    );
    let event = stage
        .h()
        .wait_event(&id, "the refused mint recorded", |e| {
            e.deliveries[0].attempts >= 1
        })
        .await;
    assert_eq!(
        event.deliveries[0].state,
        DeliveryState::Pending,
        "{platform}: kept for a retry"
    );
    assert_eq!(
        stage.deliveries_seen(),
        0,
        "{platform}: nothing sent without a token"
    );
    let (_, parked) = stage
        .h()
        .get(&format!("/v1/partners/{platform}/parked"))
        .await;
    assert_eq!(parked["parked"], json!([]), "{platform}: {parked}");
}

impl Stage {
    /// The partner's `alert` in `GET /v1/partners`, waited for (real time,
    /// bounded) until it is present (`true`) or absent (`false`).
    async fn wait_alert(&self, present: bool) -> Value {
        for _ in 0..1000 {
            let (status, body) = self.h().get("/v1/partners").await;
            assert_eq!(status, 200, "{body}");
            let partner = body["partners"]
                .as_array()
                .and_then(|all| all.iter().find(|p| p["name"] == self.platform))
                .cloned()
                .expect("the partner is listed");
            if partner.get("alert").is_some() == present {
                return partner;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "{}: the alert never became present={present}",
            self.platform
        );
    }

    async fn assert_nothing_parked(&self) {
        let (_, parked) = self
            .h()
            .get(&format!("/v1/partners/{}/parked", self.platform))
            .await;
        assert_eq!(parked["parked"], json!([]), "{}: {parked}", self.platform);
    }
}

/// The platform rotated herald's client secret: the refresh is answered
/// with the platform's "client refused" (RFC 6749 `invalid_client`, LWA's
/// and Kakao's KOE010 form, st-schema `INVALID-CLIENT-SECRET`). Nothing is
/// parked, the partner shows the alert, and once on-call puts the new
/// secret in the config and restarts, the queued alert is delivered.
async fn refused_client_parks_nothing(platform: &'static str) {
    let scenario = Scenario {
        expire_after: Some(0),
        client_secret: Some(ROTATED_SECRET.into()),
        ..Scenario::default()
    };
    let mut stage = Stage::start(platform, scenario).await;
    let id = stage.alert().await;
    let partner = stage.wait_alert(true).await;
    let reason = partner["alert"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("client"), "{platform}: {partner}");
    stage.assert_nothing_parked().await;
    let event = stage.h().herald.store().event(id.parse().expect("uuid"));
    let event = event.expect("store reads").expect("event");
    assert_eq!(
        event.deliveries[0].state,
        DeliveryState::Pending,
        "{platform}"
    );

    stage.toml = stage
        .toml
        .replace("TEST_CLIENT_SECRET", "TEST_ROTATED_CLIENT_SECRET");
    stage.restart().await;
    stage
        .wait_state_advancing(&id, DeliveryState::Delivered)
        .await;
    stage.wait_alert(false).await;
}

/// The platform refuses herald's setup on every delivery, as it documents
/// it (Alexa 403 INSUFFICIENT_PERMISSION_EXCEPTION, Google 403
/// PERMISSION_DENIED, Kakao -3, ThinQ 1306; the answers are in
/// adapters/src/mock). Nothing is parked, the alert shows, and once the
/// platform side is fixed the alert is delivered and the alert cleared.
async fn refused_setup_parks_nothing(platform: &'static str) {
    let scenario = Scenario {
        misconfigured: true,
        ..Scenario::default()
    };
    let stage = Stage::start(platform, scenario).await;
    let id = stage.alert().await;
    let partner = stage.wait_alert(true).await;
    assert!(partner["alert"]["count"].as_u64() >= Some(1), "{partner}");
    stage.assert_nothing_parked().await;
    stage.mock.set_misconfigured(false);
    stage
        .wait_state_advancing(&id, DeliveryState::Delivered)
        .await;
    stage.wait_alert(false).await;
}

/// One test per platform of `$case`, in a module per platform.
macro_rules! per_platform {
    ($test:ident, $case:ident, [$($platform:ident),* $(,)?]) => {$(
        mod $platform {
            use super::super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                $case(stringify!($platform)).await;
            }
        }
    )*};
}

mod refused_client {
    per_platform!(
        a_refused_client_parks_nothing_and_delivers_once_fixed,
        refused_client_parks_nothing,
        [smartthings, alexa, thinq, kakao, clova, genie]
    );
}

mod refused_setup {
    per_platform!(
        a_refused_setup_parks_nothing_and_delivers_once_fixed,
        refused_setup_parks_nothing,
        [alexa, google, thinq, kakao]
    );
}

/// SmartThings' token endpoint answers a dead refresh token with a bare
/// 401 (st-schema-nodejs `lib/callbacks/RefreshTokenRequest.js` checks
/// only the status): the link is parked, not retried for days.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_401_from_the_smartthings_token_endpoint_parks_the_link() {
    let scenario = Scenario {
        expire_after: Some(0),
        refresh_answer: Some(adapters::mock::Reply::empty(401)),
        ..Scenario::default()
    };
    let stage = Stage::start("smartthings", scenario).await;
    let id = stage.alert().await;
    stage.wait_state(&id, DeliveryState::Dead).await;
    let (_, parked) = stage.h().get("/v1/partners/smartthings/parked").await;
    assert_eq!(parked["parked"][0]["device_id"], DEVICE, "{parked}");
}

macro_rules! platform_tests {
    ($($module:ident: $platform:literal),* $(,)?) => {$(
        mod $module {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn delivered_refreshed_once_and_the_token_survives_a_restart() {
                delivered_and_refreshed_once_then_persisted($platform).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn throttled_is_retried_after_retry_after() {
                throttled_waits_for_retry_after($platform).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_terminal_code_parks_the_link() {
                terminal_code_parks_the_link($platform).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_revoked_grant_parks_the_link_and_a_refused_partner_token_alerts() {
                if partner_scoped($platform) {
                    refused_partner_token_alerts_and_parks_nothing($platform).await;
                } else {
                    revoked_grant_parks_the_link($platform).await;
                }
            }
        }
    )*};
}

platform_tests! {
    smartthings: "smartthings",
    alexa: "alexa",
    google: "google",
    thinq: "thinq",
    kakao: "kakao",
    clova: "clova",
    genie: "genie",
}

/// `n` temperature readings for the linked device, in one POST; their ids.
async fn readings(stage: &Stage, n: usize) -> Vec<String> {
    let events: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"device_id":"{DEVICE}","type":"temperature.reading","data":{{"capability":"temperatureMeasurement","attribute":"temperature","value":{},"unit":"C"}}}}"#,
                20 + i % 5
            )
        })
        .collect();
    let (status, body) = stage
        .h()
        .post_events(&format!("[{}]", events.join(",")))
        .await;
    assert_eq!(status, 202, "{body}");
    body.as_array()
        .expect("batch answer")
        .iter()
        .map(|a| a["id"].as_str().expect("id").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_deliveries_on_an_expired_link_refresh_once() {
    // Alexa takes one report per request: a hundred sends at once.
    let stage = Stage::start("alexa", Scenario::default()).await;
    stage.mock.expire_token();
    for id in readings(&stage, 100).await {
        stage.wait_state(&id, DeliveryState::Delivered).await;
    }
    assert_eq!(stage.mock.refreshes(), 1, "one refresh for the whole link");
    assert_eq!(stage.mock.accepted().len(), 100);
    assert_eq!(stage.mock.duplicates(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smartthings_takes_a_links_queued_states_in_callbacks_of_at_most_fifty() {
    let stage = Stage::start("smartthings", Scenario::default()).await;
    let ids = readings(&stage, 120).await;
    for id in &ids {
        stage.wait_state(id, DeliveryState::Delivered).await;
    }
    let callbacks = stage.mock.accepted();
    let sizes = states_per_callback(&stage.mock);
    assert_eq!(
        sizes.iter().sum::<usize>(),
        120,
        "every state sent once: {sizes:?}"
    );
    assert!(sizes.iter().all(|&n| (1..=50).contains(&n)), "{sizes:?}");
    assert!(
        callbacks.len() < 120,
        "queued states for one link share callbacks: {sizes:?}"
    );
    assert_eq!(stage.mock.duplicates(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_for_a_platform_without_a_link_is_a_dead_letter_naming_it() {
    let stage = Stage::start("alexa", Scenario::default()).await;
    let (status, body) = stage
        .h()
        .post_events(
            r#"{"device_id":"unlinked-9","type":"door.forced_open","priority":"critical","data":{"capability":"lock","attribute":"lock","value":"forced_open"},"partners":["alexa"]}"#,
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id");
    let event = stage.wait_state(id, DeliveryState::Dead).await;
    let detail = &event.deliveries[0]
        .last_attempt
        .as_ref()
        .expect("attempt")
        .detail;
    assert!(
        detail.contains("no link") && detail.contains("unlinked-9"),
        "{detail}"
    );
    assert_eq!(stage.deliveries_seen(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_missing_what_its_platform_needs_is_refused_by_field() {
    let cases = [
        ("smartthings", "callback_url", "/callback_url"),
        ("smartthings", "token_url", "/token_url"),
        ("google", "account", "/account"),
        ("thinq", "region", "/region"),
        ("clova", "account", "/account"),
    ];
    for (platform, drop, field) in cases {
        let stage = Stage::start(platform, Scenario::default()).await;
        let mut body = link_body(platform, &stage.base, "at-0", "rt-0");
        body.as_object_mut().expect("object").remove(drop);
        let (status, problem) = stage.put_link(&body).await;
        assert_eq!(status, 422, "{platform} without {drop}: {problem}");
        assert_eq!(problem["field"], field, "{platform}: {problem}");
    }
    let stage = Stage::start("alexa", Scenario::default()).await;
    // The region picks the gateway: it must be one Alexa has.
    let mut body = link_body("alexa", &stage.base, "at-0", "rt-0");
    body["region"] = "mars".into();
    let (status, problem) = stage.put_link(&body).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["field"], "/region", "{problem}");
    // Amazon's model.EndpointId: letters, digits and _-=#;:?@& only.
    let mut body = link_body("alexa", &stage.base, "at-0", "rt-0");
    body["external_id"] = "front door".into();
    let (status, problem) = stage.put_link(&body).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["field"], "/external_id", "{problem}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_of_one_user_spend_a_single_use_refresh_token_once() {
    // SmartThings callback tokens belong to the connector installation, one
    // user, and a refresh answers a new refresh token that replaces the old
    // one (st-schema-nodejs lib/callbacks/RefreshTokenRequest.js; "the
    // refresh token is single-use", smartthings.developer.samsung.com
    // docs/how-to/refresh-token.html). The mock is that user: it accepts
    // only the newest refresh token.
    const SECOND: &str = "window-2c1d";
    let mut stage = Stage::start("smartthings", Scenario::default()).await;
    // The account service puts the user's two devices with the same
    // account and token pair, the access token expired an hour ago.
    let mut expired = link_body("smartthings", &stage.base, "at-0", "rt-0");
    expired["credentials"]["expires_at"] = "2026-11-25T05:00:00Z".into();
    for device in [DEVICE, SECOND] {
        let (status, body) = stage.put_link_of(device, &expired).await;
        assert!(status == 200 || status == 201, "{body}");
    }
    for device in [DEVICE, SECOND] {
        let (status, link) = stage
            .h()
            .get(&format!("/v1/links/smartthings/{device}"))
            .await;
        assert_eq!(status, 200, "{link}");
        assert_eq!(link["grant"], "account/user-7", "{link}");
        assert_eq!(link["has_credentials"], true, "{link}");
        assert!(!link.to_string().contains("rt-0"), "{link}");
    }
    stage.alert_each_until_delivered(&[DEVICE, SECOND]).await;
    assert_eq!(
        stage.mock.refreshes(),
        1,
        "one refresh for the user's two devices"
    );
    for device in [DEVICE, SECOND] {
        let stored = stage.stored_credentials_of(device).expect("credentials");
        assert_eq!(stored.access_token, stage.mock.access_token(), "{device}");
        assert_eq!(
            stored.refresh_token.as_deref(),
            Some(stage.mock.refresh_token().as_str()),
            "{device}: the rotated pair is what the store holds"
        );
    }
    stage.restart().await;
    stage.alert_each_until_delivered(&[DEVICE, SECOND]).await;
    assert_eq!(
        stage.mock.refreshes(),
        1,
        "the rotated pair came back from disk"
    );
    assert_eq!(stage.mock.duplicates(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_sealed_under_another_key_is_not_sent_and_says_why() {
    let mut stage = Stage::start("smartthings", Scenario::default()).await;
    let old = stage.herald.take().expect("running");
    let clock = old.clock.clone();
    old.herald.shutdown().await.expect("clean shutdown");
    // The operator rotated HERALD_LINK_KEY without re-putting the links.
    let other_key = |name: &str| match name {
        "HERALD_LINK_KEY" => Some("b3RoZXIta2V5LW90aGVyLWtleS1vdGhlci1rZXktMzI=".to_string()),
        other => env(other),
    };
    stage.herald = Some(TestHerald::start_with_env(&stage.toml, clock, &other_key).await);
    let id = stage.alert().await;
    let event = stage
        .h()
        .wait_event(&id, "the failed open recorded", |e| {
            e.deliveries[0].attempts == 1
        })
        .await;
    let d = &event.deliveries[0];
    assert_eq!(d.state, DeliveryState::Pending, "kept for a retry");
    let detail = &d.last_attempt.as_ref().expect("attempt").detail;
    assert!(
        detail.contains("grant account/user-7 at smartthings") && detail.contains("wrong key"),
        "{detail}"
    );
    assert_eq!(stage.deliveries_seen(), 0, "nothing sent without its token");
    let (status, link) = stage
        .h()
        .get(&format!("/v1/links/smartthings/{DEVICE}"))
        .await;
    assert_eq!(
        (status, link["has_credentials"].clone()),
        (200, json!(true))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_unmappable_state_does_not_sink_the_callback_it_rides_in() {
    let stage = Stage::start("smartthings", Scenario::default()).await;
    let mut events: Vec<String> = (0..10)
        .map(|i| {
            format!(
                r#"{{"device_id":"{DEVICE}","type":"temperature.reading","data":{{"capability":"temperatureMeasurement","attribute":"temperature","value":{i},"unit":"C"}}}}"#
            )
        })
        .collect();
    events.insert(
        3,
        format!(
            r#"{{"device_id":"{DEVICE}","type":"teleport.done","data":{{"capability":"teleporter","attribute":"state","value":"arrived"}}}}"#
        ),
    );
    let (status, body) = stage
        .h()
        .post_events(&format!("[{}]", events.join(",")))
        .await;
    assert_eq!(status, 202, "{body}");
    let ids: Vec<String> = body
        .as_array()
        .expect("batch")
        .iter()
        .map(|a| a["id"].as_str().expect("id").to_string())
        .collect();
    let odd = stage.wait_state(&ids[3], DeliveryState::Dead).await;
    let detail = &odd.deliveries[0]
        .last_attempt
        .as_ref()
        .expect("attempt")
        .detail;
    assert!(
        detail.contains("teleporter"),
        "names the capability: {detail}"
    );
    for (i, id) in ids.iter().enumerate().filter(|(i, _)| *i != 3) {
        let event = stage.wait_state(id, DeliveryState::Delivered).await;
        assert_eq!(
            event.deliveries[0].state,
            DeliveryState::Delivered,
            "event {i}"
        );
    }
    assert_eq!(states_per_callback(&stage.mock).iter().sum::<usize>(), 10);
}

/// How many states each SmartThings callback the mock accepted carried.
fn states_per_callback(mock: &MockHandle) -> Vec<usize> {
    mock.accepted()
        .iter()
        .map(|r| {
            let body: Value = serde_json::from_slice(&r.request.body).expect("json");
            body["deviceState"][0]["states"]
                .as_array()
                .map_or(0, Vec::len)
        })
        .collect()
}

/// Amazon's message schema (fixtures/alexa/schema, JSON5 as published).
fn alexa_schema() -> jsonschema::Validator {
    let text = include_str!("../fixtures/alexa/schema/alexa_smart_home_message_schema.json");
    let schema: Value = json5::from_str(text).expect("Amazon's schema reads as JSON5");
    jsonschema::draft4::new(&schema).expect("Amazon's schema compiles")
}

/// Links in `na`, `eu` and `fe` each reach their own region's gateway (one
/// mock path per region), and an event whose `occurred_at` has
/// microseconds arrives as a ChangeReport that validates against Amazon's
/// published schema (its `timeOfSample` takes at most milliseconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alexa_links_reach_their_regions_gateway_with_bodies_amazons_schema_takes() {
    let stage = Stage::start("alexa", Scenario::default()).await;
    for region in ["na", "fe"] {
        let mut body = link_body("alexa", &stage.base, "at-0", "rt-0");
        body["region"] = region.into();
        let (status, answer) = stage.put_link_of(&format!("lock-{region}"), &body).await;
        assert_eq!(status, 201, "{answer}");
    }
    for device in ["lock-na", DEVICE, "lock-fe"] {
        let (status, body) = stage
            .h()
            .post_events(&format!(
                r#"{{"device_id":"{device}","type":"door.forced_open","priority":"critical","occurred_at":"2026-11-25T06:00:00.123456+09:00","data":{{"capability":"lock","attribute":"lock","value":"forced_open"}}}}"#
            ))
            .await;
        assert_eq!(status, 202, "{body}");
    }
    stage.wait_deliveries(3).await;
    let schema = alexa_schema();
    let mut paths = Vec::new();
    for request in stage.mock.accepted() {
        let body: Value = serde_json::from_slice(&request.request.body).expect("JSON");
        let endpoint = body["event"]["endpoint"]["endpointId"].clone();
        paths.push((endpoint, request.request.path.clone()));
        let errors: Vec<String> = schema.iter_errors(&body).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "Amazon's schema refuses {body}: {errors:?}"
        );
        let sample = &body["event"]["payload"]["change"]["properties"][0]["timeOfSample"];
        assert_eq!(sample, "2026-11-24T21:00:00.123Z", "{body}");
    }
    paths.sort_by_key(|(_, path)| path.clone());
    assert_eq!(
        paths,
        [
            (json!("lock-42"), "/eu/v3/events".to_string()),
            (json!("lock-42"), "/fe/v3/events".to_string()),
            (json!("lock-42"), "/na/v3/events".to_string()),
        ]
    );
}

/// Amazon's schema also refuses what herald must not send: the check above
/// would pass on anything if the schema accepted every body.
#[test]
fn amazons_schema_refuses_microsecond_samples() {
    let schema = alexa_schema();
    let body = json!({
        "event": {
            "header": {"namespace": "Alexa", "name": "ChangeReport", "messageId": "m-1", "payloadVersion": "3"},
            "endpoint": {"scope": {"type": "BearerToken", "token": "t"}, "endpointId": "lock-42"},
            "payload": {"change": {"cause": {"type": "PHYSICAL_INTERACTION"}, "properties": [{
                "namespace": "Alexa.LockController", "name": "lockState", "value": "JAMMED",
                "timeOfSample": "2026-11-24T21:00:00.123456Z", "uncertaintyInMilliseconds": 0
            }]}}
        },
        "context": {"properties": []}
    });
    assert!(!schema.is_valid(&body));
}
