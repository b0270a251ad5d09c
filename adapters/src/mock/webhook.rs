//! A plain Standard Webhooks receiver
//! (standard-webhooks/standard-webhooks `spec/standard-webhooks.md`): no
//! tokens; every request's signature is checked with the Standard Webhooks
//! project's own Rust library (`standardwebhooks`), not with herald's
//! signing code, so a request herald signs wrongly is refused.

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use super::dialect::{Dialect, Incoming, Reply};

pub struct Webhook {
    verifier: standardwebhooks::Webhook,
}

impl Webhook {
    /// A receiver that takes requests signed with `secret` (`whsec_...`).
    pub fn new(secret: &str) -> Result<Webhook, String> {
        standardwebhooks::Webhook::new(secret)
            .map(|verifier| Webhook { verifier })
            .map_err(|e| format!("the webhook mock's signing secret is not usable: {e}"))
    }
}

impl Dialect for Webhook {
    fn platform(&self) -> &'static str {
        "webhook"
    }

    /// A webhook endpoint has no token endpoint.
    fn is_token_request(&self, _req: &Incoming) -> bool {
        false
    }

    fn uses_tokens(&self) -> bool {
        false
    }

    /// The signature over `webhook-id`, `webhook-timestamp` and the raw body,
    /// the timestamp within the library's tolerance of now (spec, "Verifying
    /// signatures"); the payload a JSON object (spec, "Payload structure").
    fn validate(&self, req: &Incoming) -> Result<(), String> {
        let mut headers = HeaderMap::new();
        for (name, value) in &req.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::try_from(name.as_str()),
                HeaderValue::try_from(value.as_str()),
            ) {
                headers.append(name, value);
            }
        }
        self.verifier
            .verify(&req.body, &headers)
            .map_err(|e| format!("the signature does not verify: {e}"))?;
        match req.json() {
            Some(body) if body.is_object() => Ok(()),
            _ => Err("the payload is not a JSON object".into()),
        }
    }

    /// `webhook-id` is the idempotency key (spec, "Webhook metadata").
    fn request_id(&self, req: &Incoming) -> Option<String> {
        req.header("webhook-id").map(str::to_string)
    }

    /// Any 2xx is success (spec, "Delivery success and failure").
    fn ok(&self, _req: &Incoming) -> Reply {
        Reply::empty(204)
    }

    fn bad_request(&self, why: &str) -> Reply {
        Reply {
            status: 400,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: why.as_bytes().to_vec(),
        }
    }

    /// `429 Too Many Requests`: a rate limit was met (spec, "Delivery
    /// success and failure"); the engine adds `Retry-After`.
    fn throttled(&self) -> Reply {
        Reply::empty(429)
    }

    /// `503 Service Unavailable`, which the spec names as one that may carry
    /// `Retry-After`; a plain failure otherwise.
    fn server_error(&self) -> Reply {
        Reply::empty(503)
    }

    /// `410 Gone`: the receiver wants no more webhooks from this source
    /// (spec, "Delivery success and failure").
    fn terminal(&self) -> Reply {
        Reply::empty(410)
    }
}
