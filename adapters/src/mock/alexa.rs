//! The Alexa event gateway: bearer in the header and in `endpoint.scope`,
//! 202 on success, `System.Exception` bodies; LWA for tokens (RFC 6749).

use super::dialect::{Dialect, Incoming, Reply};
use crate::alexa::error_body;

pub struct Alexa;

fn error(status: u16, code: &str) -> Reply {
    Reply::json(status, error_body(code, "mock"))
}

impl Dialect for Alexa {
    fn platform(&self) -> &'static str {
        "alexa"
    }

    fn validate(&self, req: &Incoming) -> Result<(), String> {
        let body = req.json().ok_or("body is not JSON")?;
        let event = &body["event"];
        let header = &event["header"];
        if header["namespace"] != "Alexa"
            || header["name"] != "ChangeReport"
            || header["payloadVersion"] != "3"
        {
            return Err("not an Alexa.ChangeReport v3".into());
        }
        header["messageId"].as_str().ok_or("no messageId")?;
        let scope = &event["endpoint"]["scope"];
        if scope["type"] != "BearerToken" || scope["token"].as_str() != req.bearer().as_deref() {
            return Err("endpoint.scope.token differs from the bearer token".into());
        }
        event["endpoint"]["endpointId"]
            .as_str()
            .ok_or("no endpointId")?;
        let properties = event["payload"]["change"]["properties"]
            .as_array()
            .ok_or("no change.properties")?;
        for p in properties {
            if !p["namespace"].is_string() || !p["timeOfSample"].is_string() {
                return Err(format!("bad property {p}"));
            }
        }
        if properties.is_empty() || !body["context"]["properties"].is_array() {
            return Err("empty change or no context.properties".into());
        }
        Ok(())
    }

    fn request_id(&self, req: &Incoming) -> Option<String> {
        req.json()?["event"]["header"]["messageId"]
            .as_str()
            .map(str::to_string)
    }

    fn ok(&self, _req: &Incoming) -> Reply {
        Reply::empty(202)
    }

    fn bad_request(&self, _why: &str) -> Reply {
        error(400, "INVALID_REQUEST_EXCEPTION")
    }

    fn expired(&self) -> Reply {
        error(401, "INVALID_ACCESS_TOKEN_EXCEPTION")
    }

    fn throttled(&self) -> Reply {
        error(429, "THROTTLING_EXCEPTION")
    }

    fn server_error(&self) -> Reply {
        error(503, "SERVICE_UNAVAILABLE_EXCEPTION")
    }

    /// "Send Events to the Alexa Event Gateway", Error codes
    /// (https://developer.amazon.com/en-US/docs/alexa/smarthome/send-events-to-the-alexa-event-gateway.html#error-codes):
    /// 403 SKILL_DISABLED_EXCEPTION, the user disabled the skill.
    fn terminal(&self) -> Reply {
        error(403, "SKILL_DISABLED_EXCEPTION")
    }

    /// Same table: 403 INSUFFICIENT_PERMISSION_EXCEPTION, the skill lacks
    /// the permission to send Alexa events.
    fn misconfigured(&self) -> Option<Reply> {
        Some(error(403, "INSUFFICIENT_PERMISSION_EXCEPTION"))
    }

    /// Login with Amazon, "Access Token Errors"
    /// (https://developer.amazon.com/docs/login-with-amazon/authorization-code-grant.html#access-token-errors):
    /// 401 `invalid_client`.
    fn client_refused(&self) -> Reply {
        Reply::json(
            401,
            serde_json::json!({"error": "invalid_client", "error_description": "Client authentication failed"}),
        )
    }
}
