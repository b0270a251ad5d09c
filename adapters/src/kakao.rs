//! Kakao: alerts as a KakaoTalk "send to me" message (documented publicly),
//! device state to Kakao Home (**assumed shape**: no public C2C push API).
//!
//! Documented:
//! - an event with an alert `kind` becomes
//!   `POST https://kapi.kakao.com/v2/api/talk/memo/default/send` with the form
//!   field `template_object` (a text template), under the user's access token
//!   (consent `talk_message`);
//! - refresh: `grant_type=refresh_token` at `https://kauth.kakao.com/oauth/token`
//!   with the app's REST API key as `client_id` (and `client_secret` when the
//!   app enables it); a new refresh token comes back only when less than a
//!   month is left: herald persists it when it does;
//! - `KOE322` / `invalid_grant` on refresh: the user must log in again (park);
//!   401 (code -401) on an expired access token; -402 missing consent.
//!
//! Assumed:
//! - state events: `POST {base}/v1/home/devices/{externalId}/events` (or the
//!   link's `callback_url`) with the same user token and
//!   `{"eventId", "deviceId", "timestamp", "states": [{"capability", "property", "value"}]}`;
//! - a non-empty partner `url` replaces `https://kapi.kakao.com` (tests);
//! - the message's link is the link option `web_url` (Kakao requires a link
//!   object; an empty one opens nothing). Text templates hold 200 chars.
//! - KakaoTalk messages carry no request id: a retried alert after a lost
//!   answer can arrive twice (there is nothing to dedupe on).

use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::oauth::{required, OAuthClient};
use crate::state::DeviceData;
use crate::{
    event_time, mapping, retry_after, snippet, Adapter, Answer, BuildError, DeliveryContext,
    LinkView, Method, OutboundRequest, PartnerSettings, SetupError, Verdict,
};

pub const PLATFORM: &str = "kakao";
pub const API_BASE: &str = "https://kapi.kakao.com";
pub const TOKEN_URL: &str = "https://kauth.kakao.com/oauth/token";
pub const MEMO_PATH: &str = "/v2/api/talk/memo/default/send";
/// Characters a text template holds.
const TEXT_MAX: usize = 200;

pub struct Kakao {
    base: String,
    token_url: String,
    client: OAuthClient,
}

impl Kakao {
    pub fn boxed(settings: &PartnerSettings) -> Result<Box<dyn Adapter>, SetupError> {
        crate::oauth::require_client(settings, PLATFORM, false)?;
        Ok(Box::new(Kakao {
            base: if settings.url.is_empty() {
                API_BASE.into()
            } else {
                settings.url.trim_end_matches('/').into()
            },
            token_url: settings
                .token_url
                .clone()
                .unwrap_or_else(|| TOKEN_URL.into()),
            client: OAuthClient::of(settings),
        }))
    }

    fn memo(
        &self,
        ctx: &DeliveryContext<'_>,
        link: &LinkView<'_>,
        data: &DeviceData,
        kind: &str,
    ) -> Result<(String, String, Vec<u8>), BuildError> {
        let text = match &data.message {
            Some(message) => message.clone(),
            None => format!(
                "[{}] {kind}: {} ({}) at {}",
                ctx.event.priority, link.external_id, ctx.event.event_type, ctx.event.occurred_at
            ),
        };
        let text: String = text.chars().take(TEXT_MAX).collect();
        let web_url = link
            .options
            .and_then(|o| serde_json::from_str::<LinkOptions>(o.get()).ok())
            .and_then(|o| o.web_url);
        let link_object = match web_url {
            Some(url) => json!({"web_url": url, "mobile_web_url": url}),
            None => json!({}),
        };
        let template = json!({"object_type": "text", "text": text, "link": link_object});
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("template_object", &template.to_string())
            .finish();
        Ok((
            format!("{}{MEMO_PATH}", self.base),
            "application/x-www-form-urlencoded;charset=utf-8".into(),
            body.into_bytes(),
        ))
    }

    fn home_state(
        &self,
        ctx: &DeliveryContext<'_>,
        link: &LinkView<'_>,
        data: &DeviceData,
    ) -> Result<(String, String, Vec<u8>), BuildError> {
        let change = data.require_state(PLATFORM)?;
        let mapped = mapping::translate(PLATFORM, change)?;
        let body = json!({
            "eventId": ctx.delivery_id,
            "deviceId": link.external_id,
            "timestamp": event_time::unix_ms(ctx.event.occurred_at)?,
            "states": [{
                "capability": mapped.name,
                "property": mapped.property,
                "value": mapped.value,
            }],
        });
        let url = match link.callback_url {
            Some(url) => url.to_string(),
            None => format!("{}/v1/home/devices/{}/events", self.base, link.external_id),
        };
        Ok((
            url,
            "application/json".into(),
            serde_json::to_vec(&body)
                .map_err(|e| BuildError(format!("cannot encode the event: {e}")))?,
        ))
    }
}

#[derive(Deserialize)]
struct LinkOptions {
    web_url: Option<String>,
}

impl Adapter for Kakao {
    fn kind(&self) -> &'static str {
        PLATFORM
    }

    fn build(&self, ctx: &DeliveryContext<'_>) -> Result<OutboundRequest, BuildError> {
        let link = ctx.link_for(PLATFORM)?;
        let token = required(link.access_token, "access token", PLATFORM)?;
        let data = DeviceData::of(&ctx.event)?;
        let (url, content_type, body) = match &data.kind {
            Some(kind) => self.memo(ctx, &link, &data, kind)?,
            None => self.home_state(ctx, &link, &data)?,
        };
        Ok(OutboundRequest {
            method: Method::Post,
            url,
            headers: vec![
                ("authorization".into(), format!("Bearer {token}")),
                ("content-type".into(), content_type),
            ],
            body,
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
        let code = serde_json::from_slice::<KakaoError>(body)
            .ok()
            .and_then(|e| e.code);
        let reason = format!("HTTP {status}: {}", snippet(body));
        // Kakao's API answers, from "REST API reference: Response code"
        // (https://developers.kakao.com/docs/latest/en/rest-api/reference#response-code).
        // The code decides; the HTTP status only where no code came.
        match (status, code) {
            (200..=299, _) => Verdict::Delivered,
            // -401: the access token is invalid or expired.
            (_, Some(-401)) => Verdict::Refresh { reason },
            // -402: the user has not agreed (or withdrew) the talk_message
            // scope; -406, -501: the account cannot receive (a minor's
            // account, not a KakaoTalk user). The user's doing: park.
            (_, Some(-402 | -406 | -501)) => Verdict::Park { reason },
            // -3: the API is not enabled for the app; -5: the app lacks the
            // permission; -12: the API is blocked for the app (e.g. the
            // app's platform or domain settings). herald's app, every user.
            (_, Some(-3 | -5 | -12)) => Verdict::Misconfigured {
                after: retry_after::from_headers(headers, now),
                reason,
            },
            // -1: an internal error at Kakao; -7: the service is under
            // maintenance; -10: the app's quota is spent for now. All come
            // with HTTP 400 and all say "try again".
            (_, Some(-1 | -7 | -10)) | (429 | 500..=599, _) => Verdict::Retry {
                after: retry_after::from_headers(headers, now),
                reason,
            },
            (401, _) => Verdict::Refresh { reason },
            // 403 without a code: the user blocked the app.
            (403, None) => Verdict::Park { reason },
            // -2: an invalid parameter, and anything else: the request
            // herald built.
            _ => Verdict::Permanent { reason },
        }
    }

    /// Kakao's user refresh token is valid for two months and is replaced
    /// (the old one expiring) by a refresh made when less than one month is
    /// left: https://developers.kakao.com/docs/latest/ko/kakaologin/rest-api#refresh-token
    /// ("refresh_token_expires_in"; restated by Kakao's developer support at
    /// https://devtalk.kakao.com/t/koe322-expired-or-invalid-refresh-token/126899).
    /// Two months counted as 60 days: the shorter reading, so a keep-alive
    /// comes early rather than late.
    fn refresh_token_lifetime(&self) -> Option<Duration> {
        Some(Duration::from_secs(60 * 24 * 3600))
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
struct KakaoError {
    code: Option<i64>,
}

/// A Kakao API error body (the mock answers with it too).
pub fn error_body(code: i64, msg: &str) -> Value {
    json!({"msg": msg, "code": code})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RefreshVerdict;

    fn adapter() -> Box<dyn Adapter> {
        Kakao::boxed(&PartnerSettings {
            client_id: Some("herald".into()),
            client_secret: Some("secret".into()),
            ..PartnerSettings::default()
        })
        .unwrap()
    }

    #[test]
    fn refresh_tokens_live_two_months() {
        assert_eq!(
            adapter().refresh_token_lifetime(),
            Some(Duration::from_secs(60 * 86_400))
        );
    }

    fn classify(status: u16, code: i64) -> Verdict {
        let body = serde_json::to_vec(&error_body(code, "x")).unwrap();
        adapter().classify(
            &Answer::Http {
                status,
                headers: &[],
                body: &body,
            },
            SystemTime::UNIX_EPOCH,
        )
    }

    #[test]
    fn reads_kakao_codes() {
        assert!(matches!(classify(401, -401), Verdict::Refresh { .. }));
        assert!(matches!(classify(403, -402), Verdict::Park { .. }));
        assert!(matches!(classify(400, -10), Verdict::Retry { .. }));
        assert!(matches!(classify(400, -2), Verdict::Permanent { .. }));
        for retried in [-1, -7, -10] {
            assert!(
                matches!(classify(400, retried), Verdict::Retry { .. }),
                "{retried}"
            );
        }
        for setup in [-3, -5, -12] {
            assert!(
                matches!(classify(403, setup), Verdict::Misconfigured { .. }),
                "{setup}"
            );
        }
    }

    #[test]
    fn koe322_parks_the_link() {
        let body = br#"{"error":"invalid_grant","error_description":"refresh token not found","error_code":"KOE322"}"#;
        let verdict = adapter().read_refresh(
            &Answer::Http {
                status: 400,
                headers: &[],
                body,
            },
            SystemTime::UNIX_EPOCH,
        );
        match verdict {
            RefreshVerdict::Park { reason } => assert!(reason.contains("KOE322"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
}
