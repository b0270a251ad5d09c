//! KT GiGA Genie Home Skills push (assumed, like the adapter): OAuth2 bearer,
//! `{deviceId, capability, resource, value, eventTime}`.

use serde_json::json;

use super::dialect::{Dialect, Incoming, Reply};

pub struct Genie;

impl Dialect for Genie {
    fn platform(&self) -> &'static str {
        "genie"
    }

    fn validate(&self, req: &Incoming) -> Result<(), String> {
        req.header("x-request-id").ok_or("no x-request-id")?;
        let body = req.json().ok_or("body is not JSON")?;
        for field in ["deviceId", "capability", "resource", "eventTime"] {
            body[field].as_str().ok_or(format!("no {field}"))?;
        }
        if body["value"].is_null() {
            return Err("no value".into());
        }
        Ok(())
    }

    fn request_id(&self, req: &Incoming) -> Option<String> {
        req.header("x-request-id").map(str::to_string)
    }

    fn ok(&self, _req: &Incoming) -> Reply {
        Reply::json(200, json!({"result": "ok"}))
    }

    fn bad_request(&self, why: &str) -> Reply {
        Reply::json(
            400,
            json!({"error": "invalid_request", "error_description": why}),
        )
    }

    fn expired(&self) -> Reply {
        Reply::json(401, json!({"error": "invalid_token"}))
    }

    fn throttled(&self) -> Reply {
        Reply::json(429, json!({"error": "too_many_requests"}))
    }

    fn server_error(&self) -> Reply {
        Reply::json(503, json!({"error": "unavailable"}))
    }

    fn terminal(&self) -> Reply {
        Reply::json(
            403,
            json!({"error": "access_denied", "error_description": "the user unlinked the account"}),
        )
    }
}
