//! Kakao: the KakaoTalk memo API (documented) and the assumed Kakao Home
//! event endpoint; Kakao error bodies (`code`), `KOE322` for dead grants.

use serde_json::json;

use super::dialect::{Dialect, Incoming, Reply};
use crate::kakao::{error_body, MEMO_PATH};

pub struct Kakao;

fn error(status: u16, code: i64, msg: &str) -> Reply {
    Reply::json(status, error_body(code, msg))
}

fn is_memo(req: &Incoming) -> bool {
    req.path.ends_with(MEMO_PATH)
}

impl Dialect for Kakao {
    fn platform(&self) -> &'static str {
        "kakao"
    }

    fn validate(&self, req: &Incoming) -> Result<(), String> {
        if is_memo(req) {
            let template = req.form("template_object").ok_or("no template_object")?;
            let template: serde_json::Value =
                serde_json::from_str(&template).map_err(|_| "template_object is not JSON")?;
            if template["object_type"] != "text" || !template["link"].is_object() {
                return Err("not a text template with a link".into());
            }
            let text = template["text"].as_str().ok_or("no text")?;
            if text.chars().count() > 200 {
                return Err("text over 200 chars".into());
            }
            return Ok(());
        }
        let body = req.json().ok_or("body is not JSON")?;
        body["eventId"].as_str().ok_or("no eventId")?;
        body["deviceId"].as_str().ok_or("no deviceId")?;
        if body["states"].as_array().is_none_or(|s| s.is_empty()) {
            return Err("no states".into());
        }
        Ok(())
    }

    fn request_id(&self, req: &Incoming) -> Option<String> {
        if is_memo(req) {
            return None;
        }
        req.json()?["eventId"].as_str().map(str::to_string)
    }

    fn ok(&self, req: &Incoming) -> Reply {
        if is_memo(req) {
            Reply::json(200, json!({"result_code": 0}))
        } else {
            Reply::json(200, json!({}))
        }
    }

    fn bad_request(&self, why: &str) -> Reply {
        error(400, -2, why)
    }

    fn expired(&self) -> Reply {
        error(401, -401, "this access token does not exist")
    }

    fn throttled(&self) -> Reply {
        error(429, -10, "API limit has been exceeded")
    }

    fn server_error(&self) -> Reply {
        error(500, -1, "internal error")
    }

    fn terminal(&self) -> Reply {
        error(403, -402, "insufficient scopes: talk_message")
    }

    /// Kakao REST API response codes
    /// (https://developers.kakao.com/docs/latest/en/rest-api/reference#response-code):
    /// -3, HTTP 403, the API is not enabled for the app (herald's app).
    fn misconfigured(&self) -> Option<Reply> {
        Some(error(
            403,
            -3,
            "App disabled [talk_message] scopes for [talk_memo_default_send] API on developers.kakao.com. Enable it first.",
        ))
    }

    /// Kakao Login error codes
    /// (https://developers.kakao.com/docs/latest/en/kakaologin/trouble-shooting):
    /// KOE010, a wrong client secret, with RFC 6749 `invalid_client`.
    fn client_refused(&self) -> Reply {
        Reply::json(
            401,
            json!({"error": "invalid_client", "error_description": "Bad client credentials", "error_code": "KOE010"}),
        )
    }

    fn grant_dead(&self, why: &str) -> Reply {
        Reply::json(
            400,
            json!({"error": "invalid_grant", "error_description": why, "error_code": "KOE322"}),
        )
    }
}
