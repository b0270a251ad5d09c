//! Amazon Alexa: `ChangeReport` to the Alexa event gateway (documented
//! publicly).
//!
//! - `POST /v3/events` on the link's region: `na` → api.amazonalexa.com,
//!   `eu`/`in` → api.eu.amazonalexa.com, `fe`/`au`/`jp` →
//!   api.fe.amazonalexa.com ("Send Events to the Alexa Event Gateway").
//!   The partner's `gateways = { na = "...", eu = "...", fe = "..." }`
//!   replaces a region's gateway (tests, proxies); a single partner `url`
//!   is refused, since it would send every region's users to one gateway
//!   and Alexa answers the others SKILL_NEVER_ENABLED_EXCEPTION.
//! - `endpointId` must match Amazon's `model.EndpointId` (1 to 256 of
//!   `a-zA-Z0-9_-=#;:?@&`), checked when the link is put.
//! - The LWA access token goes both in `Authorization: Bearer` and in
//!   `event.endpoint.scope.token`. `messageId` is the delivery id.
//! - `cause` is `PERIODIC_POLL` for numeric readings and
//!   `PHYSICAL_INTERACTION` otherwise (a person or the device changed it).
//! - Refresh: `grant_type=refresh_token` at LWA's token URL with the skill's
//!   client id and secret; a rotated refresh token comes back in the answer.
//!
//! Assumed: nothing beyond the choice of `cause`.

use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::oauth::{required, OAuthClient};
use crate::state::DeviceData;
use crate::{
    event_time, mapping, retry_after, snippet, Adapter, Answer, BuildError, DeliveryContext,
    LinkView, OutboundRequest, PartnerSettings, SetupError, Verdict,
};

pub const PLATFORM: &str = "alexa";
/// Login with Amazon's token endpoint.
pub const LWA_TOKEN_URL: &str = "https://api.amazon.com/auth/o2/token";
/// Alexa asks for at least a second between retries of throttled calls.
const MIN_RETRY: Duration = Duration::from_secs(1);

pub struct Alexa {
    /// `na`, `eu`, `fe` → the gateway configured for that region.
    gateways: std::collections::BTreeMap<String, String>,
    token_url: String,
    client: OAuthClient,
}

impl Alexa {
    pub fn boxed(settings: &PartnerSettings) -> Result<Box<dyn Adapter>, SetupError> {
        crate::oauth::require_client(settings, PLATFORM, true)?;
        if !settings.url.is_empty() {
            return Err(SetupError {
                key: "url",
                reason: "alexa routes each link to its region's gateway; one url would send every region's users to one of them. Name a gateway per region instead: gateways = { na = \"...\", eu = \"...\", fe = \"...\" }".into(),
            });
        }
        if let Some(other) = settings
            .gateways
            .keys()
            .find(|r| !matches!(r.as_str(), "na" | "eu" | "fe"))
        {
            return Err(SetupError {
                key: "gateways",
                reason: format!(
                    "{other:?} is not an Alexa gateway region; the regions are na, eu and fe"
                ),
            });
        }
        Ok(Box::new(Alexa {
            gateways: settings.gateways.clone(),
            token_url: settings
                .token_url
                .clone()
                .unwrap_or_else(|| LWA_TOKEN_URL.to_string()),
            client: OAuthClient::of(settings),
        }))
    }

    fn gateway(&self, link: &LinkView<'_>) -> Result<String, BuildError> {
        let region = required(link.region, "region (na, eu, fe)", PLATFORM)?;
        let (gateway_region, host) = match region.to_ascii_lowercase().as_str() {
            "na" | "us" => ("na", "api.amazonalexa.com"),
            "eu" | "in" => ("eu", "api.eu.amazonalexa.com"),
            "fe" | "au" | "jp" => ("fe", "api.fe.amazonalexa.com"),
            other => {
                return Err(BuildError(format!(
                    "alexa region {other:?} is none of na, us, eu, in, fe, au, jp"
                )))
            }
        };
        Ok(match self.gateways.get(gateway_region) {
            Some(url) => url.clone(),
            None => format!("https://{host}/v3/events"),
        })
    }
}

/// Amazon's `model.EndpointId`: `^[a-zA-Z0-9_\-=#;:?@&]*$`, 1 to 256 long
/// (alexa/alexa-smarthome, validation_schemas/alexa_smart_home_message_schema.json).
fn check_endpoint_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 256 {
        return Err(format!(
            "an Alexa endpointId is 1 to 256 characters; this one is {}",
            id.len()
        ));
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_-=#;:?@&".contains(*c)))
    {
        Some(bad) => Err(format!(
            "an Alexa endpointId takes letters, digits and _-=#;:?@& only; {bad:?} is not one"
        )),
        None => Ok(()),
    }
}

impl Adapter for Alexa {
    fn kind(&self) -> &'static str {
        PLATFORM
    }

    fn check_link(&self, link: &LinkView<'_>) -> Result<(), SetupError> {
        check_endpoint_id(link.external_id).map_err(|reason| SetupError {
            key: "external_id",
            reason,
        })?;
        self.gateway(link).map(|_| ()).map_err(|e| SetupError {
            key: "region",
            reason: e.0,
        })
    }

    fn build(&self, ctx: &DeliveryContext<'_>) -> Result<OutboundRequest, BuildError> {
        let link = ctx.link_for(PLATFORM)?;
        let token = required(link.access_token, "access token", PLATFORM)?;
        let data = DeviceData::of(&ctx.event)?;
        let change = data.require_state(PLATFORM)?;
        let mapped = mapping::translate(PLATFORM, change)?;
        let name = mapped.property.ok_or_else(|| {
            BuildError(format!(
                "the alexa mapping of {:?} has no property",
                change.capability
            ))
        })?;
        let cause = if change.value.is_number() {
            "PERIODIC_POLL"
        } else {
            "PHYSICAL_INTERACTION"
        };
        let body = json!({
            "event": {
                "header": {
                    "namespace": "Alexa",
                    "name": "ChangeReport",
                    "messageId": ctx.delivery_id,
                    "payloadVersion": "3",
                },
                "endpoint": {
                    "scope": {"type": "BearerToken", "token": token},
                    "endpointId": link.external_id,
                },
                "payload": {
                    "change": {
                        "cause": {"type": cause},
                        "properties": [{
                            "namespace": mapped.name,
                            "name": name,
                            "value": mapped.value,
                            "timeOfSample": event_time::utc_millis(ctx.event.occurred_at)?,
                            "uncertaintyInMilliseconds": 0,
                        }],
                    },
                },
            },
            "context": {"properties": []},
        });
        OutboundRequest::bearer_json(self.gateway(&link)?, token, &body, "ChangeReport")
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
        let code = serde_json::from_slice::<AlexaError>(body)
            .ok()
            .and_then(|e| e.payload.code)
            .unwrap_or_default();
        let reason = format!("HTTP {status} {code}: {}", snippet(body));
        let retry_after = || {
            Some(
                retry_after::from_headers(headers, now)
                    .unwrap_or(MIN_RETRY)
                    .max(MIN_RETRY),
            )
        };
        // The Event Gateway's answers, from "Send Events to the Alexa Event
        // Gateway", Error codes
        // (https://developer.amazon.com/en-US/docs/alexa/smarthome/send-events-to-the-alexa-event-gateway.html#error-codes).
        match (status, code.as_str()) {
            // 202 Accepted.
            (200..=299, _) => Verdict::Delivered,
            // 401 INVALID_ACCESS_TOKEN_EXCEPTION: the user's token expired.
            (401, _) => Verdict::Refresh { reason },
            // 403 INSUFFICIENT_PERMISSION_EXCEPTION: the skill lacks the
            // permission to send events (the skill's setup, every user alike).
            // 404 SKILL_NEVER_ENABLED_EXCEPTION: the user never enabled the
            // skill *in this region*: herald sent to the wrong gateway.
            (403, "INSUFFICIENT_PERMISSION_EXCEPTION") | (404, "SKILL_NEVER_ENABLED_EXCEPTION") => {
                Verdict::Misconfigured {
                    after: retry_after(),
                    reason,
                }
            }
            // 403 SKILL_DISABLED_EXCEPTION: the user disabled the skill.
            // 404 ACCOUNT_NOT_FOUND_EXCEPTION: the token's account is gone.
            (403 | 404, _) => Verdict::Park { reason },
            // 429 THROTTLING_EXCEPTION, 500 INTERNAL_SERVICE_EXCEPTION,
            // 503 SERVICE_UNAVAILABLE_EXCEPTION: retry, at least a second apart.
            (429 | 500..=599, _) => Verdict::Retry {
                after: retry_after(),
                reason,
            },
            // 400 INVALID_REQUEST_EXCEPTION, 413 REQUEST_ENTITY_TOO_LARGE_EXCEPTION:
            // the body herald built cannot be taken.
            _ => Verdict::Permanent { reason },
        }
    }

    fn refresh_request(
        &self,
        link: &LinkView<'_>,
        refresh_token: &str,
        _now_unix: u64,
    ) -> Result<Option<OutboundRequest>, BuildError> {
        self.client
            .refresh(PLATFORM, link, Some(&self.token_url), refresh_token)
    }
}

#[derive(Deserialize)]
struct AlexaError {
    payload: AlexaErrorPayload,
}

#[derive(Deserialize)]
struct AlexaErrorPayload {
    code: Option<String>,
}

/// An Alexa error body, as the gateway sends it (the mock uses it too).
pub fn error_body(code: &str, description: &str) -> Value {
    json!({
        "header": {"namespace": "System", "name": "Exception", "messageId": "0", "payloadVersion": "3"},
        "payload": {"code": code, "description": description},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(status: u16, code: &str) -> Verdict {
        let adapter = Alexa::boxed(&PartnerSettings {
            client_id: Some("herald".into()),
            client_secret: Some("secret".into()),
            ..PartnerSettings::default()
        })
        .unwrap();
        let body = serde_json::to_vec(&error_body(code, "x")).unwrap();
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
    fn reads_the_gateway_answers() {
        assert_eq!(classify(202, ""), Verdict::Delivered);
        assert!(matches!(
            classify(401, "INVALID_ACCESS_TOKEN_EXCEPTION"),
            Verdict::Refresh { .. }
        ));
        assert!(matches!(
            classify(403, "SKILL_DISABLED_EXCEPTION"),
            Verdict::Park { .. }
        ));
        assert!(matches!(
            classify(404, "ACCOUNT_NOT_FOUND_EXCEPTION"),
            Verdict::Park { .. }
        ));
        assert!(matches!(
            classify(400, "INVALID_REQUEST_EXCEPTION"),
            Verdict::Permanent { .. }
        ));
        assert!(matches!(
            classify(403, "INSUFFICIENT_PERMISSION_EXCEPTION"),
            Verdict::Misconfigured { .. }
        ));
        assert!(matches!(
            classify(404, "SKILL_NEVER_ENABLED_EXCEPTION"),
            Verdict::Misconfigured { .. }
        ));
        assert_eq!(
            classify(429, "THROTTLING_EXCEPTION"),
            Verdict::Retry {
                after: Some(MIN_RETRY),
                reason: format!(
                    "HTTP 429 THROTTLING_EXCEPTION: {}",
                    serde_json::to_string(&error_body("THROTTLING_EXCEPTION", "x")).unwrap()
                )
            }
        );
    }
}
