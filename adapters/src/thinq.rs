//! LG ThinQ. LG's public ThinQ Connect API (and its SDK,
//! thinq-connect/pythinqconnect `thinqconnect/thinq_api.py`) is for reading
//! and controlling a user's devices; LG publishes no inbound (partner →
//! ThinQ) event API. The call itself is therefore **assumed**; the headers
//! follow LG's SDK.
//!
//! Followed (from `thinq_api.py` `_generate_headers`):
//! - `Authorization: Bearer <token>`;
//! - `x-message-id`: base64url of a UUID, no padding, 22 characters, new for
//!   every call. herald derives it from the delivery id, the attempt and the
//!   send within the attempt, so the resend after a token refresh gets a new
//!   one too; receivers dedupe on the body's `eventId`, never on it;
//! - `x-country`: the link's `region`, upper-cased (a country code);
//! - `x-client-id`: the partner's client id;
//! - `x-api-key`: the partner secret, when one is configured (the SDK sends
//!   its own fixed key here);
//! - `x-service-phase: OP`.
//!
//! Answers carry `responseCode` (assumed to be read as in LG's partner
//! APIs): `"0000"` OK; 1103 invalid token (refresh); 1104 invalid message
//! id and 2000 server error (retry); 12xx not registered (park); 13xx no
//! authority or, 1306, the API quota spent (herald's setup: retried and
//! alerted, never parked).
//!
//! Assumed:
//! - the call: `POST {base}/devices/{externalId}/events` (base: the link's
//!   `callback_url`, else the partner `url`) with
//!   `{"deviceId", "eventId", "timestamp", "state": {<resource>: {<property>: value}}, "alert"?}`;
//! - auth: a partner-wide OAuth2 client-credentials token
//!   ([`TokenScope::Partner`]) from the partner's `token_url`, else
//!   `{url}/oauth2/token`. LG's SDK instead uses the user's own token (a
//!   personal access token): a per-user token would be the link's;
//! - answers: `responseCode` as read by `classify` (LG's SDK reads
//!   `error.code` with its own code table, in which `0000` is an unknown
//!   error).

use std::time::SystemTime;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::oauth::{client_credentials_form, require_link_field, required};
use crate::state::DeviceData;
use crate::{
    event_time, ids, mapping, retry_after, snippet, Adapter, Answer, BuildError, DeliveryContext,
    LinkView, Method, OutboundRequest, PartnerSettings, SetupError, TokenScope, Verdict,
};

pub const PLATFORM: &str = "thinq";

pub struct ThinQ {
    url: String,
    token_url: String,
    client_id: String,
    client_secret: String,
    api_key: Option<String>,
}

impl ThinQ {
    pub fn boxed(settings: &PartnerSettings) -> Result<Box<dyn Adapter>, SetupError> {
        let client_id = settings.client_id.clone().ok_or(SetupError {
            key: "client_id_env",
            reason: "a thinq partner needs its OAuth client id".into(),
        })?;
        let client_secret = settings.client_secret.clone().ok_or(SetupError {
            key: "client_secret_env",
            reason: "a thinq partner needs its OAuth client secret".into(),
        })?;
        let url = settings.url.trim_end_matches('/').to_string();
        let token_url = match (&settings.token_url, url.is_empty()) {
            (Some(t), _) => t.clone(),
            (None, false) => format!("{url}/oauth2/token"),
            (None, true) => {
                return Err(SetupError {
                    key: "url",
                    reason: "a thinq partner needs a url or a token_url".into(),
                })
            }
        };
        Ok(Box::new(ThinQ {
            url,
            token_url,
            client_id,
            client_secret,
            api_key: settings.secret.clone(),
        }))
    }
}

impl Adapter for ThinQ {
    fn kind(&self) -> &'static str {
        PLATFORM
    }

    fn check_link(&self, link: &LinkView<'_>) -> Result<(), SetupError> {
        require_link_field(link.region, "region", "region (country code)", PLATFORM)
    }

    fn token_scope(&self) -> TokenScope {
        TokenScope::Partner
    }

    fn build(&self, ctx: &DeliveryContext<'_>) -> Result<OutboundRequest, BuildError> {
        let link = ctx.link_for(PLATFORM)?;
        let token = required(link.access_token, "partner token", PLATFORM)?;
        let country = required(link.region, "region (country code)", PLATFORM)?;
        let base = link.base_url(&self.url, PLATFORM)?;
        let data = DeviceData::of(&ctx.event)?;
        let mut body = Map::new();
        body.insert("deviceId".into(), link.external_id.into());
        body.insert("eventId".into(), ctx.delivery_id.into());
        body.insert(
            "timestamp".into(),
            event_time::unix_ms(ctx.event.occurred_at)?.into(),
        );
        if let Some(change) = &data.state {
            let mapped = mapping::translate(PLATFORM, change)?;
            let property = mapped.property.ok_or_else(|| {
                BuildError(format!(
                    "the thinq mapping of {:?} has no property",
                    change.capability
                ))
            })?;
            body.insert(
                "state".into(),
                json!({ mapped.name: { property: mapped.value } }),
            );
        }
        if let Some(kind) = &data.kind {
            body.insert(
                "alert".into(),
                json!({"type": kind, "priority": ctx.event.priority}),
            );
        }
        let mut headers = vec![
            ("authorization".into(), format!("Bearer {token}")),
            ("content-type".into(), "application/json".into()),
            ("x-message-id".into(), message_id(ctx)),
            ("x-country".into(), country.to_ascii_uppercase()),
            ("x-client-id".into(), self.client_id.clone()),
            ("x-service-phase".into(), "OP".into()),
        ];
        if let Some(key) = &self.api_key {
            headers.push(("x-api-key".into(), key.clone()));
        }
        Ok(OutboundRequest {
            method: Method::Post,
            url: format!("{base}/devices/{}/events", link.external_id),
            headers,
            body: serde_json::to_vec(&Value::Object(body))
                .map_err(|e| BuildError(format!("cannot encode the event: {e}")))?,
        })
    }

    fn classify(&self, answer: &Answer<'_>, now: SystemTime) -> Verdict {
        let Answer::Http {
            status,
            headers,
            body,
        } = *answer
        else {
            return crate::classify_http(answer, now);
        };
        let code = serde_json::from_slice::<ThinQAnswer>(body)
            .ok()
            .and_then(|a| a.response_code);
        let reason = format!("HTTP {status}: {}", snippet(body));
        let retry = || Verdict::Retry {
            after: retry_after::from_headers(headers, now),
            reason: reason.clone(),
        };
        match code.as_deref() {
            Some("0000") if (200..300).contains(&status) => Verdict::Delivered,
            Some("1103") => Verdict::Refresh { reason },
            // The message id was refused: the next attempt gets a new one.
            Some("1104") | Some("2000") => retry(),
            // 12xx: the user or device is not registered with ThinQ.
            Some(c) if c.starts_with("12") => Verdict::Park { reason },
            // 13xx: herald's service is not allowed the call (its service
            // key or client's authority), 1306 EXCEEDED_API_CALLS its quota:
            // herald's setup, every user alike. Retried, and on-call alerted.
            Some(c) if c.starts_with("13") => Verdict::Misconfigured {
                after: retry_after::from_headers(headers, now),
                reason,
            },
            Some(c) if c.starts_with('1') => Verdict::Permanent { reason },
            _ => match status {
                401 => Verdict::Refresh { reason },
                _ => crate::classify_http(answer, now),
            },
        }
    }

    fn partner_token_request(&self, _now_unix: u64) -> Result<Option<OutboundRequest>, BuildError> {
        Ok(Some(client_credentials_form(
            &self.token_url,
            &self.client_id,
            &self.client_secret,
        )))
    }
}

/// A new `x-message-id` for every call: derived from the delivery, the
/// attempt and the send within it (the resend after a token refresh is a
/// new call). A first send keeps the id it has always had.
fn message_id(ctx: &DeliveryContext<'_>) -> String {
    let attempt = ctx.attempt.to_string();
    let send = ctx.send.to_string();
    if ctx.send == 0 {
        ids::uuid_base64url(&[ctx.delivery_id, &attempt])
    } else {
        ids::uuid_base64url(&[ctx.delivery_id, &attempt, &send])
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ThinQAnswer {
    response_code: Option<String>,
}

/// A ThinQ-convention answer body (the mock answers with it too).
pub fn answer_body(code: &str, message: &str) -> Value {
    if code == "0000" {
        json!({"responseCode": code, "response": {}})
    } else {
        json!({"responseCode": code, "response": {"error": {"message": message}}})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter() -> Box<dyn Adapter> {
        ThinQ::boxed(&PartnerSettings {
            url: "http://x".into(),
            client_id: Some("c".into()),
            client_secret: Some("s".into()),
            ..PartnerSettings::default()
        })
        .unwrap()
    }

    fn classify(status: u16, code: &str) -> Verdict {
        let adapter = adapter();
        let body = serde_json::to_vec(&answer_body(code, "x")).unwrap();
        adapter.classify(
            &Answer::Http {
                status,
                headers: &[],
                body: &body,
            },
            SystemTime::UNIX_EPOCH,
        )
    }

    #[test]
    fn every_call_gets_a_new_message_id_and_the_event_id_stays() {
        let adapter = adapter();
        let data = serde_json::value::RawValue::from_string(
            r#"{"capability":"lock","attribute":"lock","value":"locked"}"#.into(),
        )
        .unwrap();
        let link = LinkView {
            external_id: "lock-42",
            account: None,
            region: Some("kr"),
            callback_url: None,
            token_url: None,
            access_token: Some("at-0"),
            options: None,
        };
        let call = |attempt: u32, send: u32| {
            let request = adapter
                .build(&DeliveryContext {
                    delivery_id: "d-1",
                    attempt,
                    send,
                    now_unix: 1_700_000_000,
                    event: crate::EventView {
                        id: "e-1",
                        event_type: "lock.changed",
                        device_id: "lock-7f3a",
                        priority: "normal",
                        occurred_at: "2026-11-25T06:00:00Z",
                        data: &data,
                    },
                    link: Some(link),
                })
                .unwrap();
            let message_id = request
                .headers
                .iter()
                .find(|(name, _)| name == "x-message-id")
                .map(|(_, value)| value.clone())
                .expect("an x-message-id");
            let body: Value = serde_json::from_slice(&request.body).unwrap();
            (message_id, body["eventId"].clone())
        };
        let (first, first_event) = call(1, 0);
        let (resent, resent_event) = call(1, 1);
        let (retried, _) = call(2, 0);
        assert_eq!(first.len(), 22, "{first}");
        assert_ne!(first, resent, "the resend after a refresh is a new call");
        assert_ne!(first, retried);
        assert_ne!(resent, retried);
        assert_eq!(first_event, resent_event, "receivers dedupe on eventId");
    }

    #[test]
    fn reads_response_codes() {
        assert_eq!(classify(200, "0000"), Verdict::Delivered);
        assert!(matches!(classify(401, "1103"), Verdict::Refresh { .. }));
        assert!(matches!(classify(500, "2000"), Verdict::Retry { .. }));
        assert!(matches!(classify(400, "1104"), Verdict::Retry { .. }));
        assert!(matches!(classify(404, "1201"), Verdict::Park { .. }));
        assert!(matches!(
            classify(403, "1301"),
            Verdict::Misconfigured { .. }
        ));
        assert!(matches!(
            classify(429, "1306"),
            Verdict::Misconfigured { .. }
        ));
        assert!(matches!(classify(400, "1000"), Verdict::Permanent { .. }));
    }
}
