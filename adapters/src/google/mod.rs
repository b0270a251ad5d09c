//! Google Home: Home Graph Report State (documented publicly).
//!
//! - `POST https://homegraph.googleapis.com/v1/devices:reportStateAndNotification`
//!   (a non-empty partner `url` replaces it: tests, proxies).
//! - Auth is partner-wide ([`TokenScope::Partner`]): a service-account JWT
//!   (RS256, scope `homegraph`) traded at the key's `token_uri` (or the partner's `token_url`) for a
//!   one-hour bearer token. There is no refresh token: herald mints again.
//! - Body: `requestId` (the delivery id), `eventId` (the event id: Home Graph
//!   dedupes on it), `agentUserId` (the link's `account`), and the device's
//!   full trait state under `payload.devices.states.<external_id>` with
//!   `online: true` (Home Graph overwrites a trait whole, so every field of
//!   the trait is sent: the mapping table holds them).
//! - 404 can be transient for a few seconds after a SYNC: it is retried for
//!   the first [`NOT_FOUND_ATTEMPTS`] attempts, then the link is parked
//!   ([`Adapter::classify_attempt`]).
//!
//! Assumed: nothing; alerts travel as state (Home Graph notifications exist
//! only for a few traits and need a `notificationSupportedByAgent` device).

pub mod service_account;

use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::oauth::{require_link_field, required};
use crate::state::DeviceData;
use crate::{
    mapping, retry_after, snippet, Adapter, Answer, BuildError, DeliveryContext, LinkView,
    OutboundRequest, PartnerSettings, SetupError, TokenScope, Verdict,
};
use service_account::{ServiceAccount, HOMEGRAPH_SCOPE};

pub const PLATFORM: &str = "google";
pub const REPORT_STATE_URL: &str =
    "https://homegraph.googleapis.com/v1/devices:reportStateAndNotification";
/// Attempts on which a 404 is still taken for SYNC lag rather than a gone user.
pub const NOT_FOUND_ATTEMPTS: u32 = 3;
const NOT_FOUND_DELAY: Duration = Duration::from_secs(5);

pub struct Google {
    url: String,
    account: ServiceAccount,
}

impl Google {
    pub fn boxed(settings: &PartnerSettings) -> Result<Box<dyn Adapter>, SetupError> {
        let key = settings.service_account_key.as_deref().ok_or(SetupError {
            key: "service_account_key_env",
            reason: "a google partner needs a service-account key (JSON)".into(),
        })?;
        let mut account = ServiceAccount::from_json(key).map_err(|reason| SetupError {
            key: "service_account_key_env",
            reason,
        })?;
        if let Some(token_url) = &settings.token_url {
            // The partner's `token_url` wins over the key's `token_uri` as
            // where the request goes (a proxy, a test double); the JWT's
            // `aud` stays the key's.
            account.token_uri = token_url.clone();
        }
        Ok(Box::new(Google {
            url: if settings.url.is_empty() {
                REPORT_STATE_URL.to_string()
            } else {
                settings.url.clone()
            },
            account,
        }))
    }
}

impl Adapter for Google {
    fn kind(&self) -> &'static str {
        PLATFORM
    }

    fn check_link(&self, link: &LinkView<'_>) -> Result<(), SetupError> {
        require_link_field(link.account, "account", "account (agentUserId)", PLATFORM)
    }

    fn token_scope(&self) -> TokenScope {
        TokenScope::Partner
    }

    fn build(&self, ctx: &DeliveryContext<'_>) -> Result<OutboundRequest, BuildError> {
        let link = ctx.link_for(PLATFORM)?;
        let token = required(link.access_token, "partner token", PLATFORM)?;
        let agent_user_id = required(link.account, "account (agentUserId)", PLATFORM)?;
        let data = DeviceData::of(&ctx.event)?;
        let change = data.require_state(PLATFORM)?;
        let mapped = mapping::translate(PLATFORM, change)?;
        let mut state = Map::new();
        state.insert("online".into(), true.into());
        match (mapped.property, mapped.value) {
            (Some(field), value) => {
                state.insert(field, value);
            }
            (None, Value::Object(fields)) => state.extend(fields),
            (None, _) => {
                return Err(BuildError(format!(
                    "the google mapping of {:?} has neither a property nor an object of fields",
                    change.capability
                )))
            }
        }
        let mut states = Map::new();
        states.insert(link.external_id.to_string(), Value::Object(state));
        let body = json!({
            "requestId": ctx.delivery_id,
            "eventId": ctx.event.id,
            "agentUserId": agent_user_id,
            "payload": {"devices": {"states": states}},
        });
        OutboundRequest::bearer_json(self.url.clone(), token, &body, "report")
    }

    fn classify(&self, answer: &Answer<'_>, now: SystemTime) -> Verdict {
        self.classify_attempt(1, answer, now)
    }

    fn classify_attempt(&self, attempt: u32, answer: &Answer<'_>, now: SystemTime) -> Verdict {
        let Answer::Http {
            status,
            headers,
            body,
        } = *answer
        else {
            return crate::classify_http(answer, now);
        };
        let code = serde_json::from_slice::<GoogleError>(body)
            .ok()
            .and_then(|e| e.error.status)
            .unwrap_or_default();
        let reason = format!("HTTP {status} {code}: {}", snippet(body));
        // Home Graph's answers: google.rpc codes as Google APIs return them
        // ("Errors", https://cloud.google.com/apis/design/errors; Report
        // State troubleshooting,
        // https://developers.home.google.com/cloud-to-cloud/integration/report-state).
        match status {
            200..=299 => Verdict::Delivered,
            // UNAUTHENTICATED: the service-account token expired.
            401 => Verdict::Refresh { reason },
            // PERMISSION_DENIED: the service account has no Home Graph
            // access in this project (its key, its role, the API not
            // enabled): herald's setup, the same for every user.
            403 => Verdict::Misconfigured {
                after: retry_after::from_headers(headers, now),
                reason,
            },
            // NOT_FOUND: no such agentUserId. Right after a SYNC Home Graph
            // may not know the user yet, so only a lasting 404 parks.
            404 if attempt < NOT_FOUND_ATTEMPTS => Verdict::Retry {
                after: Some(NOT_FOUND_DELAY),
                reason,
            },
            404 => Verdict::Park { reason },
            429 | 500..=599 => Verdict::Retry {
                after: retry_after::from_headers(headers, now),
                reason,
            },
            _ => Verdict::Permanent { reason },
        }
    }

    fn partner_token_request(&self, now_unix: u64) -> Result<Option<OutboundRequest>, BuildError> {
        self.account
            .token_request(HOMEGRAPH_SCOPE, now_unix)
            .map(Some)
    }
}

#[derive(Deserialize)]
struct GoogleError {
    error: GoogleErrorBody,
}

#[derive(Deserialize)]
struct GoogleErrorBody {
    status: Option<String>,
}

/// A Google API error body (the mock answers with it too).
pub fn error_body(code: u16, status: &str, message: &str) -> Value {
    json!({"error": {"code": code, "message": message, "status": status}})
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = include_str!("../../../fixtures/google/service-account.test.json");

    fn adapter() -> Box<dyn Adapter> {
        Google::boxed(&PartnerSettings {
            service_account_key: Some(KEY.into()),
            ..PartnerSettings::default()
        })
        .unwrap()
    }

    fn classify(attempt: u32, status: u16) -> Verdict {
        let body = serde_json::to_vec(&error_body(status, "X", "x")).unwrap();
        adapter().classify_attempt(
            attempt,
            &Answer::Http {
                status,
                headers: &[],
                body: &body,
            },
            SystemTime::UNIX_EPOCH,
        )
    }

    #[test]
    fn not_found_is_retried_briefly_then_parks() {
        assert!(matches!(classify(1, 404), Verdict::Retry { .. }));
        assert!(matches!(
            classify(NOT_FOUND_ATTEMPTS - 1, 404),
            Verdict::Retry { .. }
        ));
        assert!(matches!(
            classify(NOT_FOUND_ATTEMPTS, 404),
            Verdict::Park { .. }
        ));
        assert!(matches!(classify(1, 401), Verdict::Refresh { .. }));
        assert!(matches!(classify(1, 403), Verdict::Misconfigured { .. }));
        assert!(matches!(classify(1, 400), Verdict::Permanent { .. }));
        assert!(matches!(classify(1, 429), Verdict::Retry { .. }));
    }

    #[test]
    fn the_assertion_verifies_with_the_public_key() {
        let account = ServiceAccount::from_json(KEY).unwrap();
        let jwt = account.assertion(HOMEGRAPH_SCOPE, 1_700_000_000).unwrap();
        let claims = service_account::verify(&jwt, &account.public_key_der()).unwrap();
        assert_eq!(claims["scope"], HOMEGRAPH_SCOPE);
        assert_eq!(claims["exp"], 1_700_003_600u64);
        assert_eq!(claims["aud"], "https://oauth2.googleapis.com/token");
        let mut tampered = jwt.clone();
        tampered.insert(10, 'x');
        assert!(service_account::verify(&tampered, &account.public_key_der()).is_err());
    }

    #[test]
    fn a_token_url_override_moves_the_request_not_the_audience() {
        let account = {
            let adapter = Google::boxed(&PartnerSettings {
                service_account_key: Some(KEY.into()),
                token_url: Some("https://token-proxy.example/token".into()),
                ..PartnerSettings::default()
            })
            .unwrap();
            adapter
                .partner_token_request(1_700_000_000)
                .unwrap()
                .unwrap()
        };
        assert_eq!(account.url, "https://token-proxy.example/token");
        let body = String::from_utf8(account.body).unwrap();
        let jwt = form_urlencoded::parse(body.as_bytes())
            .find(|(k, _)| k == "assertion")
            .map(|(_, v)| v.into_owned())
            .unwrap();
        let public = ServiceAccount::from_json(KEY).unwrap().public_key_der();
        let claims = service_account::verify(&jwt, &public).unwrap();
        assert_eq!(claims["aud"], "https://oauth2.googleapis.com/token");
    }

    #[test]
    fn a_bad_key_names_the_setting() {
        let err = Google::boxed(&PartnerSettings {
            service_account_key: Some(r#"{"client_email":"a","private_key":"nope"}"#.into()),
            ..PartnerSettings::default()
        })
        .err()
        .unwrap();
        assert_eq!(err.key, "service_account_key_env");
        assert!(!format!("{err}").contains("nope"));
    }
}
