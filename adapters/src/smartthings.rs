//! Samsung SmartThings, through st-schema (documented publicly).
//!
//! - Device state goes as a `stateCallback` to the link's
//!   `callbackUrls.stateCallback` (`LinkView::callback_url`), which
//!   SmartThings hands out per user in `grantCallbackAccess`.
//! - The bearer token travels in the body (`authentication.token`), not in a
//!   header. `headers.requestId` is the delivery id (stable across retries);
//!   a batch's is derived from all its delivery ids.
//! - `refreshAccessTokens` goes to the link's `callbackUrls.oauthToken`
//!   (`LinkView::token_url`) with the partner's client id and secret; the
//!   answer may rotate the refresh token.
//! - At most [`MAX_STATES`] states per callback (SmartThings' guidance).
//!
//! Assumed: the HTTP status of error answers (SmartThings documents the
//! `globalError` / `deviceError` enums, not statuses), so both are read.

use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::credentials::RefreshVerdict;
use crate::oauth::{require_link_field, required, unix};
use crate::state::DeviceData;
use crate::{
    event_time, ids, mapping, retry_after, snippet, Adapter, Answer, BuildError, Credentials,
    DeliveryContext, LinkView, Method, OutboundRequest, PartnerSettings, SetupError, Verdict,
};

pub const PLATFORM: &str = "smartthings";
/// States per callback, at most.
pub const MAX_STATES: usize = 50;

pub struct SmartThings {
    client_id: Option<String>,
    client_secret: Option<String>,
}

impl SmartThings {
    pub fn boxed(settings: &PartnerSettings) -> Result<Box<dyn Adapter>, SetupError> {
        crate::oauth::require_client(settings, PLATFORM, true)?;
        Ok(Box::new(SmartThings {
            client_id: settings.client_id.clone(),
            client_secret: settings.client_secret.clone(),
        }))
    }

    fn state(ctx: &DeliveryContext<'_>) -> Result<Value, BuildError> {
        let data = DeviceData::of(&ctx.event)?;
        let change = data.require_state(PLATFORM)?;
        let mapped = mapping::translate(PLATFORM, change)?;
        let mut state = Map::new();
        state.insert("component".into(), change.component.clone().into());
        state.insert("capability".into(), mapped.name.into());
        let attribute = mapped.property.ok_or_else(|| {
            BuildError(format!(
                "the {PLATFORM} mapping of {:?} has no property",
                change.capability
            ))
        })?;
        state.insert("attribute".into(), attribute.into());
        state.insert("value".into(), mapped.value);
        if let Some(unit) = mapped.unit {
            state.insert("unit".into(), unit.into());
        }
        state.insert(
            "timestamp".into(),
            event_time::unix_ms(ctx.event.occurred_at)?.into(),
        );
        Ok(Value::Object(state))
    }

    fn callback(
        request_id: &str,
        link: &LinkView<'_>,
        states: Vec<Value>,
    ) -> Result<OutboundRequest, BuildError> {
        let url = required(link.callback_url, "callback_url (stateCallback)", PLATFORM)?;
        let token = required(link.access_token, "access token", PLATFORM)?;
        let body = json!({
            "headers": {
                "schema": "st-schema",
                "version": "1.0",
                "interactionType": "stateCallback",
                "requestId": request_id,
            },
            "authentication": {"tokenType": "Bearer", "token": token},
            "deviceState": [{"externalDeviceId": link.external_id, "states": states}],
        });
        st_post(url, &body, "callback")
    }
}

fn link<'a>(ctx: &DeliveryContext<'a>) -> Result<LinkView<'a>, BuildError> {
    ctx.link
        .ok_or_else(|| BuildError(format!("{PLATFORM} deliveries need a device link")))
}

impl Adapter for SmartThings {
    fn kind(&self) -> &'static str {
        PLATFORM
    }

    fn check_link(&self, link: &LinkView<'_>) -> Result<(), SetupError> {
        require_link_field(
            link.callback_url,
            "callback_url",
            "callback_url (stateCallback)",
            PLATFORM,
        )?;
        require_link_field(
            link.token_url,
            "token_url",
            "token_url (oauthToken)",
            PLATFORM,
        )
    }

    fn build(&self, ctx: &DeliveryContext<'_>) -> Result<OutboundRequest, BuildError> {
        let link = link(ctx)?;
        SmartThings::callback(ctx.delivery_id, &link, vec![SmartThings::state(ctx)?])
    }

    fn max_batch(&self) -> usize {
        MAX_STATES
    }

    fn build_batch(&self, ctxs: &[DeliveryContext<'_>]) -> Result<OutboundRequest, BuildError> {
        let first = ctxs
            .first()
            .ok_or_else(|| BuildError("an empty batch".into()))?;
        if ctxs.len() > MAX_STATES {
            return Err(BuildError(format!(
                "{} states in one callback; {PLATFORM} takes at most {MAX_STATES}",
                ctxs.len()
            )));
        }
        let link = link(first)?;
        let mut states = Vec::with_capacity(ctxs.len());
        for ctx in ctxs {
            let other = self::link(ctx)?;
            if other.external_id != link.external_id || other.callback_url != link.callback_url {
                return Err(BuildError("a batch must go through one link".into()));
            }
            states.push(SmartThings::state(ctx)?);
        }
        let request_id = match ctxs {
            [one] => one.delivery_id.to_string(),
            _ => ids::uuid(&ctxs.iter().map(|c| c.delivery_id).collect::<Vec<_>>()),
        };
        SmartThings::callback(&request_id, &link, states)
    }

    fn classify(&self, answer: &Answer<'_>, now: SystemTime) -> Verdict {
        let (status, headers, body) = match *answer {
            Answer::Http {
                status,
                headers,
                body,
            } => (status, headers, body),
            _ => return crate::classify_http(answer, now),
        };
        let parsed: StAnswer = serde_json::from_slice(body).unwrap_or_default();
        if let Some(error) = parsed.global_error {
            return by_enum(&error, status, headers, now);
        }
        let device_error = parsed
            .device_state
            .into_iter()
            .flat_map(|d| d.device_error)
            .next();
        if let Some(error) = device_error {
            return by_enum(&error, status, headers, now);
        }
        match status {
            401 => Verdict::Refresh {
                reason: format!("HTTP 401: {}", snippet(body)),
            },
            _ => crate::classify_http(answer, now),
        }
    }

    /// "A refresh token expires in 30 days" and "is invalidated after being
    /// used to successfully obtain a new access token":
    /// https://smartthings.developer.samsung.com/docs/how-to/refresh-token.html
    fn refresh_token_lifetime(&self) -> Option<Duration> {
        Some(Duration::from_secs(30 * 24 * 3600))
    }

    fn refresh_request(
        &self,
        link: &LinkView<'_>,
        refresh_token: &str,
        now_unix: u64,
    ) -> Result<Option<OutboundRequest>, BuildError> {
        let url = required(link.token_url, "token_url (oauthToken)", PLATFORM)?;
        let (Some(client_id), Some(client_secret)) = (&self.client_id, &self.client_secret) else {
            return Err(BuildError(format!(
                "the {PLATFORM} partner has no OAuth client (client_id_env, client_secret_env)"
            )));
        };
        let body = json!({
            "headers": {
                "schema": "st-schema",
                "version": "1.0",
                "interactionType": "refreshAccessTokens",
                "requestId": ids::uuid(&[link.external_id, &now_unix.to_string(), "refresh"]),
            },
            "callbackAuthentication": {
                "grantType": "refresh_token",
                "refreshToken": refresh_token,
                "clientId": client_id,
                "clientSecret": client_secret,
            },
        });
        st_post(url, &body, "refresh").map(Some)
    }

    fn read_refresh(&self, answer: &Answer<'_>, now: SystemTime) -> RefreshVerdict {
        let (status, headers, body) = match *answer {
            Answer::Http {
                status,
                headers,
                body,
            } => (status, headers, body),
            _ => return crate::oauth::read_token_answer(answer, now),
        };
        if status == 429 || status >= 500 {
            return RefreshVerdict::Retry {
                after: retry_after::from_headers(headers, now),
                reason: format!("oauthToken HTTP {status}: {}", snippet(body)),
            };
        }
        let parsed: StAnswer = serde_json::from_slice(body).unwrap_or_default();
        match parsed.callback_authentication {
            Some(StTokens {
                access_token: Some(access_token),
                refresh_token,
                expires_in,
            }) if (200..300).contains(&status) => RefreshVerdict::Renewed(Credentials {
                access_token,
                refresh_token,
                expires_at_unix: expires_in.map(|s| unix(now) + s),
            }),
            _ => match parsed.global_error {
                // herald's connector is refused, not the user.
                Some(e)
                    if matches!(
                        e.error_enum.as_str(),
                        "INVALID-CLIENT" | "INVALID-CLIENT-SECRET" | "UNSUPPORTED-GRANT-TYPE"
                    ) =>
                {
                    RefreshVerdict::Misconfigured {
                        after: retry_after::from_headers(headers, now),
                        reason: format!("oauthToken {}: {}", e.error_enum, e.detail),
                    }
                }
                Some(e) => RefreshVerdict::Park {
                    reason: format!("oauthToken {}: {}", e.error_enum, e.detail),
                },
                // A bare 400 or 401: st-schema-nodejs's refresh only checks
                // the status (`lib/callbacks/RefreshTokenRequest.js` through
                // `checkFetchStatus`: a non-2xx throws), so the
                // SmartThings token endpoint need not say more than that the
                // refresh token is refused. The user must link again.
                None if matches!(status, 400 | 401) => RefreshVerdict::Park {
                    reason: format!(
                        "oauthToken HTTP {status}: the refresh token was refused: {}",
                        snippet(body)
                    ),
                },
                // Neither tokens nor an st-schema error: not a verdict on the grant.
                None => RefreshVerdict::Retry {
                    after: None,
                    reason: format!(
                        "oauthToken HTTP {status} without tokens or an error: {}",
                        snippet(body)
                    ),
                },
            },
        }
    }
}

/// Reads st-schema's error enums; the HTTP status only breaks ties. The
/// enums are st-schema's `GlobalErrorEnum` / `DeviceErrorEnum`
/// (SmartThingsCommunity/st-schema-nodejs, `lib/errors/global-error-types.js`
/// and `lib/errors/device-error-types.js`).
fn by_enum(error: &StError, status: u16, headers: &[(String, String)], now: SystemTime) -> Verdict {
    let reason = format!("{}: {}", error.error_enum, error.detail);
    let after = retry_after::from_headers(headers, now);
    match error.error_enum.as_str() {
        // The user's callback token expired or was replaced.
        "TOKEN-EXPIRED" | "INVALID-TOKEN" => Verdict::Refresh { reason },
        // The user removed the integration or the device.
        "INTEGRATION-DELETED" | "DEVICE-DELETED" => Verdict::Park { reason },
        "DEVICE-UNAVAILABLE" | "DEVICE-OFFLINE" => Verdict::Retry { after, reason },
        // herald's connector credentials (client id, secret) are refused:
        // the same for every user until the config is fixed.
        "INVALID-CLIENT" | "INVALID-CLIENT-SECRET" => Verdict::Misconfigured { after, reason },
        // The request herald built (shape, capability, limits): no retry fixes it.
        "BAD-REQUEST"
        | "CAPABILITY-NOT-SUPPORTED"
        | "RESOURCE-CONSTRAINT-VIOLATION"
        | "INVALID-INTERACTION-TYPE" => Verdict::Permanent { reason },
        _ if status == 429 || status >= 500 => Verdict::Retry { after, reason },
        _ => Verdict::Permanent { reason },
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct StAnswer {
    global_error: Option<StError>,
    #[serde(default)]
    device_state: Vec<StDeviceState>,
    callback_authentication: Option<StTokens>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StError {
    error_enum: String,
    #[serde(default)]
    detail: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StDeviceState {
    #[serde(default)]
    device_error: Vec<StError>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StTokens {
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_in: Option<u64>,
}

/// An st-schema interaction: a JSON `POST` whose credentials travel in the
/// body, not in a header.
fn st_post(url: &str, body: &Value, what: &str) -> Result<OutboundRequest, BuildError> {
    Ok(OutboundRequest {
        method: Method::Post,
        url: url.to_string(),
        headers: vec![(
            "content-type".into(),
            "application/json; charset=utf-8".into(),
        )],
        body: serde_json::to_vec(body)
            .map_err(|e| BuildError(format!("cannot encode the {what}: {e}")))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADAPTER: SmartThings = SmartThings {
        client_id: None,
        client_secret: None,
    };

    fn http(status: u16, body: &str) -> Answer<'_> {
        Answer::Http {
            status,
            headers: &[],
            body: body.as_bytes(),
        }
    }

    /// An st-schema answer carrying one global error.
    fn global(error_enum: &str) -> String {
        format!(r#"{{"globalError":{{"errorEnum":"{error_enum}","detail":"x"}}}}"#)
    }

    fn classify(status: u16, body: &str) -> Verdict {
        ADAPTER.classify(&http(status, body), SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn refresh_tokens_live_thirty_days() {
        assert_eq!(
            ADAPTER.refresh_token_lifetime(),
            Some(Duration::from_secs(30 * 86_400))
        );
    }

    #[test]
    fn reads_global_and_device_errors() {
        assert!(matches!(
            classify(401, &global("TOKEN-EXPIRED")),
            Verdict::Refresh { .. }
        ));
        assert!(matches!(
            classify(200, &global("INTEGRATION-DELETED")),
            Verdict::Park { .. }
        ));
        assert!(matches!(
            classify(400, &global("BAD-REQUEST")),
            Verdict::Permanent { .. }
        ));
        assert!(matches!(
            classify(503, &global("SOMETHING-NEW")),
            Verdict::Retry { .. }
        ));
        let device = r#"{"deviceState":[{"externalDeviceId":"x","deviceError":[{"errorEnum":"DEVICE-DELETED"}]}]}"#;
        assert!(matches!(classify(200, device), Verdict::Park { .. }));
        assert!(matches!(classify(401, ""), Verdict::Refresh { .. }));
        assert!(matches!(classify(429, ""), Verdict::Retry { .. }));
        assert_eq!(classify(200, "{}"), Verdict::Delivered);
        for setup in ["INVALID-CLIENT", "INVALID-CLIENT-SECRET"] {
            assert!(
                matches!(classify(401, &global(setup)), Verdict::Misconfigured { .. }),
                "{setup}"
            );
        }
    }

    fn read_refresh(status: u16, body: &str) -> RefreshVerdict {
        ADAPTER.read_refresh(&http(status, body), SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn reads_the_token_endpoints_answers() {
        assert!(matches!(read_refresh(401, ""), RefreshVerdict::Park { .. }));
        assert!(matches!(
            read_refresh(400, "Bad Request"),
            RefreshVerdict::Park { .. }
        ));
        assert!(matches!(
            read_refresh(401, &global("INVALID-CLIENT-SECRET")),
            RefreshVerdict::Misconfigured { .. }
        ));
        assert!(matches!(
            read_refresh(400, &global("INVALID-TOKEN")),
            RefreshVerdict::Park { .. }
        ));
        assert!(matches!(
            read_refresh(503, ""),
            RefreshVerdict::Retry { .. }
        ));
        assert!(matches!(
            read_refresh(403, "<html>proxy</html>"),
            RefreshVerdict::Retry { .. }
        ));
    }
}
