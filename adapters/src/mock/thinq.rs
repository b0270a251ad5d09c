//! LG ThinQ partner conventions (assumed, like the adapter): `x-message-id`
//! checked for shape, `responseCode` bodies, client-credentials tokens.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use super::dialect::{Dialect, Incoming, Reply};
use crate::thinq::answer_body;

pub struct ThinQ;

fn answer(status: u16, code: &str) -> Reply {
    Reply::json(status, answer_body(code, "mock"))
}

impl Dialect for ThinQ {
    fn platform(&self) -> &'static str {
        "thinq"
    }

    fn validate(&self, req: &Incoming) -> Result<(), String> {
        let message_id = req.header("x-message-id").ok_or("no x-message-id")?;
        let raw = URL_SAFE_NO_PAD
            .decode(message_id)
            .map_err(|_| "x-message-id is not base64url without padding")?;
        if message_id.len() > 22 || raw.len() != 16 {
            return Err("x-message-id is not a 16-byte id in 22 chars".into());
        }
        // The headers LG's SDK sends on every call:
        // thinq-connect/pythinqconnect thinqconnect/thinq_api.py `_generate_headers`.
        let country = req.header("x-country").ok_or("no x-country")?;
        if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err("x-country is not two capitals".into());
        }
        req.header("x-client-id").ok_or("no x-client-id")?;
        if req.header("x-service-phase") != Some("OP") {
            return Err("x-service-phase is not OP".into());
        }
        let body = req.json().ok_or("body is not JSON")?;
        body["deviceId"].as_str().ok_or("no deviceId")?;
        body["eventId"].as_str().ok_or("no eventId")?;
        body["timestamp"].as_i64().ok_or("no timestamp")?;
        if !body["state"].is_object() && !body["alert"].is_object() {
            return Err("neither state nor alert".into());
        }
        Ok(())
    }

    fn request_id(&self, req: &Incoming) -> Option<String> {
        req.json()?["eventId"].as_str().map(str::to_string)
    }

    fn ok(&self, _req: &Incoming) -> Reply {
        answer(200, "0000")
    }

    fn bad_request(&self, _why: &str) -> Reply {
        answer(400, "1000")
    }

    fn expired(&self) -> Reply {
        answer(401, "1103")
    }

    fn throttled(&self) -> Reply {
        Reply::empty(429)
    }

    fn server_error(&self) -> Reply {
        answer(500, "2000")
    }

    fn terminal(&self) -> Reply {
        // 12xx: the device is not registered (any more).
        answer(404, "1201")
    }

    /// 13xx, here 1306 EXCEEDED_API_CALLS: herald's service is over its
    /// API quota (LG ThinQ Connect error codes; the status is assumed).
    fn misconfigured(&self) -> Option<Reply> {
        Some(answer(429, "1306"))
    }
}
