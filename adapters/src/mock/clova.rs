//! Naver Clova push (assumed, like the adapter): OAuth2 bearer, `{ts, payload}`.

use super::dialect::{Dialect, Incoming};

pub struct Clova;

impl Dialect for Clova {
    fn platform(&self) -> &'static str {
        "clova"
    }

    fn validate(&self, req: &Incoming) -> Result<(), String> {
        req.header("x-request-id").ok_or("no x-request-id")?;
        let body = req.json().ok_or("body is not JSON")?;
        body["ts"].as_i64().ok_or("no ts")?;
        body["payload"]["user_id"]
            .as_str()
            .ok_or("no payload.user_id")?;
        let devices = body["payload"]["devices"]
            .as_array()
            .ok_or("no payload.devices")?;
        if devices.is_empty() || devices.iter().any(|d| !d["id"].is_string()) {
            return Err("devices without ids".into());
        }
        Ok(())
    }
}
