//! Home Graph Report State: bearer from a service-account JWT (no refresh
//! token), Google API error bodies, `eventId` dedupes.

use serde_json::json;

use super::dialect::{Dialect, Incoming, Reply};
use crate::google::error_body;

pub struct Google;

fn error(status: u16, code: &str) -> Reply {
    Reply::json(status, error_body(status, code, "mock"))
}

impl Dialect for Google {
    fn platform(&self) -> &'static str {
        "google"
    }

    fn validate(&self, req: &Incoming) -> Result<(), String> {
        let body = req.json().ok_or("body is not JSON")?;
        body["requestId"].as_str().ok_or("no requestId")?;
        body["agentUserId"].as_str().ok_or("no agentUserId")?;
        let devices = &body["payload"]["devices"];
        let states = devices["states"].as_object().map(|s| s.len()).unwrap_or(0);
        let notifications = devices["notifications"]
            .as_object()
            .map(|s| s.len())
            .unwrap_or(0);
        if states + notifications == 0 {
            return Err("no states and no notifications".into());
        }
        Ok(())
    }

    fn request_id(&self, req: &Incoming) -> Option<String> {
        req.json()?["eventId"].as_str().map(str::to_string)
    }

    fn ok(&self, req: &Incoming) -> Reply {
        let id = req
            .json()
            .map(|b| b["requestId"].clone())
            .unwrap_or_default();
        Reply::json(200, json!({"requestId": id}))
    }

    fn bad_request(&self, _why: &str) -> Reply {
        error(400, "INVALID_ARGUMENT")
    }

    fn expired(&self) -> Reply {
        error(401, "UNAUTHENTICATED")
    }

    fn throttled(&self) -> Reply {
        error(429, "RESOURCE_EXHAUSTED")
    }

    fn server_error(&self) -> Reply {
        error(503, "UNAVAILABLE")
    }

    /// Home Graph answers an agentUserId it does not know (the user
    /// unlinked) with google.rpc NOT_FOUND, HTTP 404
    /// (https://cloud.google.com/apis/design/errors#handling_errors).
    fn terminal(&self) -> Reply {
        Reply::json(
            404,
            error_body(404, "NOT_FOUND", "Requested entity was not found."),
        )
    }

    /// PERMISSION_DENIED, HTTP 403: the service account may not call Home
    /// Graph for this project (same source).
    fn misconfigured(&self) -> Option<Reply> {
        Some(Reply::json(
            403,
            error_body(
                403,
                "PERMISSION_DENIED",
                "The caller does not have permission",
            ),
        ))
    }

    fn issued(&self, access_token: &str, _refresh: Option<&str>, expires_in: u64) -> Reply {
        // Service-account tokens come without a refresh token.
        Reply::json(
            200,
            json!({"access_token": access_token, "expires_in": expires_in, "token_type": "Bearer"}),
        )
    }
}
