//! SmartThings st-schema callbacks: the token is in the body, errors are
//! `globalError` enums, the token exchange is `refreshAccessTokens`.

use serde_json::{json, Value};

use super::dialect::{Dialect, Grant, Incoming, Reply};

pub struct SmartThings;

fn result(status: u16, error_enum: &str, detail: &str) -> Reply {
    Reply::json(
        status,
        json!({
            "headers": {"schema": "st-schema", "version": "1.0", "interactionType": "interactionResult", "requestId": "mock"},
            "globalError": {"errorEnum": error_enum, "detail": detail},
        }),
    )
}

impl Dialect for SmartThings {
    fn platform(&self) -> &'static str {
        "smartthings"
    }

    fn token(&self, req: &Incoming) -> Option<String> {
        let body = req.json()?;
        if body["authentication"]["tokenType"] != "Bearer" {
            return None;
        }
        body["authentication"]["token"].as_str().map(str::to_string)
    }

    fn validate(&self, req: &Incoming) -> Result<(), String> {
        let body = req.json().ok_or("body is not JSON")?;
        let headers = &body["headers"];
        if headers["schema"] != "st-schema" || headers["version"] != "1.0" {
            return Err("headers.schema/version".into());
        }
        if headers["interactionType"] != "stateCallback" {
            return Err("headers.interactionType is not stateCallback".into());
        }
        headers["requestId"]
            .as_str()
            .ok_or("no headers.requestId")?;
        let devices = body["deviceState"].as_array().ok_or("no deviceState")?;
        let mut states = 0;
        for device in devices {
            device["externalDeviceId"]
                .as_str()
                .ok_or("no externalDeviceId")?;
            for state in device["states"].as_array().ok_or("no states")? {
                states += 1;
                let capability = state["capability"].as_str().unwrap_or_default();
                if !capability.starts_with("st.")
                    || !state["attribute"].is_string()
                    || state["value"].is_null()
                {
                    return Err(format!("bad state {state}"));
                }
            }
        }
        if states == 0 || states > 50 {
            return Err(format!("{states} states (1 to 50 allowed)"));
        }
        Ok(())
    }

    fn request_id(&self, req: &Incoming) -> Option<String> {
        req.json()?["headers"]["requestId"]
            .as_str()
            .map(str::to_string)
    }

    fn grant(&self, req: &Incoming) -> Grant {
        let Some(body) = req.json() else {
            return Grant::Unreadable("body is not JSON".into());
        };
        let auth = &body["callbackAuthentication"];
        match (
            body["headers"]["interactionType"].as_str(),
            auth["grantType"].as_str(),
            auth["refreshToken"].as_str(),
        ) {
            (Some("refreshAccessTokens"), Some("refresh_token"), Some(token))
                if auth["clientId"].is_string() && auth["clientSecret"].is_string() =>
            {
                Grant::Refresh(token.to_string())
            }
            _ => Grant::Unreadable("not a refreshAccessTokens request".into()),
        }
    }

    fn ok(&self, _req: &Incoming) -> Reply {
        Reply::empty(202)
    }

    fn bad_request(&self, why: &str) -> Reply {
        result(400, "BAD-REQUEST", why)
    }

    fn expired(&self) -> Reply {
        result(401, "TOKEN-EXPIRED", "the access token has expired")
    }

    fn throttled(&self) -> Reply {
        Reply::empty(429)
    }

    fn server_error(&self) -> Reply {
        Reply::empty(503)
    }

    fn terminal(&self) -> Reply {
        result(
            400,
            "INTEGRATION-DELETED",
            "the user removed the integration",
        )
    }

    fn issued(&self, access_token: &str, refresh_token: Option<&str>, expires_in: u64) -> Reply {
        let mut auth =
            json!({"tokenType": "Bearer", "accessToken": access_token, "expiresIn": expires_in});
        if let Some(refresh) = refresh_token {
            auth["refreshToken"] = Value::from(refresh);
        }
        Reply::json(
            200,
            json!({
                "headers": {"schema": "st-schema", "version": "1.0", "interactionType": "accessTokenResponse", "requestId": "mock"},
                "callbackAuthentication": auth,
            }),
        )
    }

    /// The connector's client secret refused: st-schema's
    /// `INVALID-CLIENT-SECRET` global error (st-schema-nodejs
    /// `lib/errors/global-error-types.js`; the status is assumed).
    fn client_refused(&self) -> Reply {
        result(
            401,
            "INVALID-CLIENT-SECRET",
            "the client secret is not valid",
        )
    }

    fn client_secret(&self, req: &Incoming) -> Option<String> {
        req.json()?["callbackAuthentication"]["clientSecret"]
            .as_str()
            .map(str::to_string)
    }

    fn grant_dead(&self, why: &str) -> Reply {
        result(401, "INVALID-TOKEN", why)
    }
}
