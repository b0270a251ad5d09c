//! KT GiGA Genie Home Skills push (assumed, like the adapter): OAuth2 bearer,
//! `{deviceId, capability, resource, value, eventTime}`.

use super::dialect::{Dialect, Incoming};

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
}
