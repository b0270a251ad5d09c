//! LG ThinQ. **Assumed shape**: LG publishes no inbound (partner → ThinQ)
//! device API; this follows the conventions of LG's published partner APIs
//! and is meant to be swapped for the real spec when a partner agreement
//! brings it.
//!
//! Documented conventions used: `Authorization: Bearer`, `x-message-id`
//! (base64url of a UUIDv4, no padding, 22 chars, unique per call),
//! `x-country-code`, `x-service-id`, `x-api-key`; answers carry
//! `responseCode` (`"0000"` OK; 1103 invalid token; 1104 invalid message id;
//! 12xx not registered (park); 13xx no authority or, 1306, the API quota
//! spent (herald's setup: retried and alerted, never parked); 2000 server
//! error).
//!
//! Assumed:
//! - the call: `POST {base}/devices/{externalId}/events` (base: the link's
//!   `callback_url`, else the partner `url`) with
//!   `{"deviceId", "eventId", "timestamp", "state": {<resource>: {<property>: value}}, "alert"?}`;
//!   `eventId` (the delivery id) is what a receiver dedupes on, since
//!   `x-message-id` changes every call (derived from delivery id + attempt);
//! - auth: a partner-wide OAuth2 client-credentials token
//!   ([`TokenScope::Partner`]) from the partner's `token_url`, else
//!   `{url}/oauth2/token`; `x-service-id` is the client id, `x-api-key` the
//!   partner secret when one is configured;
//! - `x-country-code`: the link's `region`, upper-cased.

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
            (
                "x-message-id".into(),
                ids::uuid_base64url(&[ctx.delivery_id, &ctx.attempt.to_string()]),
            ),
            ("x-country-code".into(), country.to_ascii_uppercase()),
            ("x-service-id".into(), self.client_id.clone()),
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

    fn classify(status: u16, code: &str) -> Verdict {
        let adapter = ThinQ::boxed(&PartnerSettings {
            url: "http://x".into(),
            client_id: Some("c".into()),
            client_secret: Some("s".into()),
            ..PartnerSettings::default()
        })
        .unwrap();
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
