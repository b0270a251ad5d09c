//! Plain webhook receivers, signed per Standard Webhooks
//! (<https://www.standardwebhooks.com/>).
//!
//! `webhook-id` is the delivery id, so it stays the same across retries and
//! receivers can drop duplicates; `webhook-timestamp` is this attempt's time;
//! `webhook-signature` is `v1,` + base64 HMAC-SHA256 of `id.timestamp.body`
//! under the key that follows `whsec_` in the partner's secret.

use std::time::SystemTime;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{
    classify_http, retry_after, snippet, Adapter, Answer, BuildError, DeliveryContext, Method,
    OutboundRequest, PartnerSettings, SetupError, Verdict,
};

pub struct WebhookAdapter {
    url: String,
    key: Vec<u8>,
    /// Statuses the receiver's owner asked to be dead letters at once
    /// (`permanent_statuses`); every other non-2xx but 410 is retried.
    permanent_statuses: Vec<u16>,
}

impl WebhookAdapter {
    pub fn new(url: &str, secret: &str) -> Result<Self, SetupError> {
        Ok(WebhookAdapter {
            url: url.to_string(),
            key: decode_secret(secret)?,
            permanent_statuses: Vec::new(),
        })
    }

    pub fn boxed(settings: &PartnerSettings) -> Result<Box<dyn Adapter>, SetupError> {
        let secret = settings.secret.as_deref().ok_or(SetupError {
            key: "secret_env",
            reason: "a webhook partner needs a signing secret (whsec_...)".into(),
        })?;
        let mut adapter = WebhookAdapter::new(&settings.url, secret)?;
        adapter.permanent_statuses = settings.permanent_statuses.clone();
        Ok(Box::new(adapter))
    }
}

/// The raw key behind a `whsec_<base64>` secret.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, SetupError> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = BASE64.decode(encoded).map_err(|e| SetupError {
        key: "secret_env",
        reason: format!("the secret is not whsec_ followed by base64 ({e})"),
    })?;
    if key.len() < 16 {
        return Err(SetupError {
            key: "secret_env",
            reason: format!(
                "the secret's key is {} bytes; at least 16 are needed",
                key.len()
            ),
        });
    }
    Ok(key)
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
pub fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

impl Adapter for WebhookAdapter {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    fn needs_link(&self) -> bool {
        false
    }

    fn build(&self, ctx: &DeliveryContext<'_>) -> Result<OutboundRequest, BuildError> {
        let body = serde_json::to_vec(&ctx.event)
            .map_err(|e| BuildError(format!("could not encode the event: {e}")))?;
        let signature = sign(&self.key, ctx.delivery_id, ctx.now_unix, &body);
        Ok(OutboundRequest {
            method: Method::Post,
            url: self.url.clone(),
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("webhook-id".into(), ctx.delivery_id.to_string()),
                ("webhook-timestamp".into(), ctx.now_unix.to_string()),
                ("webhook-signature".into(), signature),
            ],
            body,
        })
    }

    /// The Standard Webhooks verdict table (the specification's "Retry
    /// schedule" and "Disabling failing endpoints",
    /// https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md):
    ///
    /// | answer | verdict |
    /// |---|---|
    /// | 2xx | delivered |
    /// | 410 Gone | park: the receiver says the endpoint is gone for good |
    /// | a status in the partner's `permanent_statuses` | permanent |
    /// | any other status (3xx, 401, 404, 429, 5xx...), a timeout, a network error | retry under the partner's policy, with its Retry-After |
    ///
    /// A receiver mid-deploy (404), mid secret rotation (401) or behind a
    /// misconfigured redirect (3xx) is retried, not dead-lettered.
    fn classify(&self, answer: &Answer<'_>, now: SystemTime) -> Verdict {
        match *answer {
            Answer::Http {
                status,
                headers,
                body,
            } => match status {
                // Read as every HTTP partner's are.
                200..=299 | 410 => classify_http(answer, now),
                _ if self.permanent_statuses.contains(&status) => Verdict::Permanent {
                    reason: format!(
                        "HTTP {status} (in the partner's permanent_statuses): {}",
                        snippet(body)
                    ),
                },
                _ => Verdict::Retry {
                    after: retry_after::from_headers(headers, now),
                    reason: match status {
                        300..=399 => format!("HTTP {status}: redirects are not followed"),
                        _ => format!("HTTP {status}: {}", snippet(body)),
                    },
                },
            },
            _ => classify_http(answer, now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventView;
    use serde_json::value::RawValue;

    #[test]
    fn standard_webhooks_published_test_vector() {
        // From the Standard Webhooks specification's reference libraries.
        let key = decode_secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let signature = sign(
            &key,
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        );
        assert_eq!(signature, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
    }

    #[test]
    fn every_non_2xx_but_410_is_retried_unless_named_permanent() {
        let mut adapter =
            WebhookAdapter::new("http://x", "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let verdict = |adapter: &WebhookAdapter, status| {
            adapter.classify(
                &Answer::Http {
                    status,
                    headers: &[],
                    body: b"x",
                },
                SystemTime::UNIX_EPOCH,
            )
        };
        assert_eq!(verdict(&adapter, 204), Verdict::Delivered);
        assert!(matches!(verdict(&adapter, 410), Verdict::Park { .. }));
        for retried in [302, 400, 401, 403, 404, 422, 429, 500, 503] {
            assert!(
                matches!(verdict(&adapter, retried), Verdict::Retry { .. }),
                "{retried}"
            );
        }
        adapter.permanent_statuses = vec![400, 422];
        assert!(matches!(verdict(&adapter, 422), Verdict::Permanent { .. }));
        assert!(matches!(verdict(&adapter, 404), Verdict::Retry { .. }));
    }

    #[test]
    fn bad_secrets_name_the_key() {
        for bad in ["whsec_***", "whsec_c2hvcnQ="] {
            let err = WebhookAdapter::new("http://x", bad)
                .err()
                .expect("must fail");
            assert_eq!(err.key, "secret_env", "{bad}");
        }
    }

    #[test]
    fn request_carries_the_contract_headers_and_body() {
        let adapter = WebhookAdapter::new(
            "http://127.0.0.1:9/hook",
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
        )
        .unwrap();
        let data = RawValue::from_string(r#"{"value":"forced_open"}"#.into()).unwrap();
        let ctx = DeliveryContext {
            delivery_id: "d-1",
            attempt: 2,
            send: 0,
            now_unix: 1_700_000_000,
            event: EventView {
                id: "e-1",
                event_type: "door.forced_open",
                device_id: "lock-7f3a",
                priority: "critical",
                occurred_at: "2026-11-25T06:00:00Z",
                data: &data,
            },
            link: None,
        };
        let req = adapter.build(&ctx).unwrap();
        assert_eq!(
            String::from_utf8(req.body.clone()).unwrap(),
            r#"{"id":"e-1","type":"door.forced_open","device_id":"lock-7f3a","priority":"critical","occurred_at":"2026-11-25T06:00:00Z","data":{"value":"forced_open"}}"#
        );
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(header("webhook-id"), "d-1");
        assert_eq!(header("webhook-timestamp"), "1700000000");
        assert_eq!(
            header("webhook-signature"),
            sign(&adapter.key, "d-1", 1_700_000_000, &req.body)
        );
    }
}
