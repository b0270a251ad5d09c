//! herald's normalized device state: what an event's `data` says.
//!
//! ```json
//! {"capability": "lock", "attribute": "lock", "value": "unlocked",
//!  "component": "main", "kind": "forced_open"}
//! {"capability": "temperatureMeasurement", "attribute": "temperature",
//!  "value": 22.5, "unit": "C"}
//! ```
//!
//! `capability`/`attribute`/`value` is one state change; `unit` and
//! `component` (default `main`) qualify it. `kind` marks the event as an
//! alert of that kind (`forced_open`, `intrusion`, `abnormal_temperature`):
//! platforms with an alert channel use it, the others send the state alone.
//! An alert may come without a state (`{"kind": "tamper"}`). Other fields are
//! ignored, so producers can add context without breaking adapters.

use serde::Deserialize;
use serde_json::Value;

use crate::{BuildError, EventView};

/// One event's device data, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceData {
    pub state: Option<StateChange>,
    /// The alert kind, when the event is an alert.
    pub kind: Option<String>,
    /// A human-readable text for alerts, when the producer gave one.
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StateChange {
    pub capability: String,
    pub attribute: String,
    pub value: Value,
    pub unit: Option<String>,
    pub component: String,
}

#[derive(Deserialize)]
struct Raw {
    capability: Option<String>,
    attribute: Option<String>,
    value: Option<Value>,
    unit: Option<String>,
    component: Option<String>,
    kind: Option<String>,
    message: Option<String>,
}

impl DeviceData {
    /// Parses the event's `data`; the error names the missing field.
    pub fn of(event: &EventView<'_>) -> Result<Self, BuildError> {
        let raw: Raw = serde_json::from_str(event.data.get())
            .map_err(|e| BuildError(format!("event data is not a device state: {e}")))?;
        let state = match (raw.capability, raw.attribute, raw.value) {
            (Some(capability), Some(attribute), Some(value)) => Some(StateChange {
                capability,
                attribute,
                value,
                unit: raw.unit,
                component: raw.component.unwrap_or_else(|| "main".into()),
            }),
            (None, None, None) => None,
            (capability, attribute, value) => {
                let missing = [
                    ("capability", capability.is_none()),
                    ("attribute", attribute.is_none()),
                    ("value", value.is_none()),
                ]
                .iter()
                .filter(|(_, m)| *m)
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ");
                return Err(BuildError(format!(
                    "event data has a partial state: missing {missing}"
                )));
            }
        };
        if state.is_none() && raw.kind.is_none() {
            return Err(BuildError(
                "event data has neither a state (capability, attribute, value) nor an alert kind"
                    .into(),
            ));
        }
        Ok(DeviceData {
            state,
            kind: raw.kind,
            message: raw.message,
        })
    }

    /// The state, or an error saying `platform` cannot carry a bare alert.
    pub fn require_state(&self, platform: &str) -> Result<&StateChange, BuildError> {
        self.state.as_ref().ok_or_else(|| {
            BuildError(format!(
                "{platform} has no channel for an alert without a state (kind {:?})",
                self.kind.as_deref().unwrap_or_default()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn parse(data: &str) -> Result<DeviceData, BuildError> {
        let data = RawValue::from_string(data.into()).unwrap();
        DeviceData::of(&EventView {
            id: "e",
            event_type: "t",
            device_id: "d",
            priority: "normal",
            occurred_at: "2026-01-01T00:00:00Z",
            data: &data,
        })
    }

    #[test]
    fn a_state_defaults_to_the_main_component() {
        let d = parse(r#"{"capability":"lock","attribute":"lock","value":"locked","room":"x"}"#)
            .unwrap();
        assert_eq!(d.state.unwrap().component, "main");
        assert_eq!(d.kind, None);
    }

    #[test]
    fn an_alert_may_have_no_state() {
        let d = parse(r#"{"kind":"tamper"}"#).unwrap();
        assert!(d.state.is_none());
        assert!(d.require_state("smartthings").is_err());
    }

    #[test]
    fn partial_states_name_what_is_missing() {
        let err = parse(r#"{"capability":"lock"}"#).unwrap_err();
        assert!(err.0.contains("attribute, value"), "{err}");
        assert!(parse(r#"{}"#).is_err());
        assert!(parse(r#"[1]"#).is_err());
    }
}
