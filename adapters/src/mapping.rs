//! herald capabilities -> each platform's, from `data/capabilities.toml`.
//!
//! The table is data so that adding a capability is one entry, reviewed as
//! such. It is parsed once; a file that does not parse is reported as a build
//! error on every delivery (and fails this module's tests), never a panic.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::{Number, Value};

use crate::state::StateChange;
use crate::BuildError;

const TABLE: &str = include_str!("../data/capabilities.toml");

/// How a mapped value is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Form {
    #[default]
    Plain,
    /// A number in °C, converted from °F when the event says so.
    Celsius,
    /// Alexa's `{"value": n, "scale": "CELSIUS" | "FAHRENHEIT"}`.
    AlexaTemperature,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub name: String,
    pub property: Option<String>,
    pub values: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    pub form: Form,
}

/// platform -> "capability.attribute" -> target.
pub type Mapping = BTreeMap<String, BTreeMap<String, Target>>;

/// One state change in a platform's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    /// The platform's capability / interface / trait / resource.
    pub name: String,
    /// `None`: `value` is an object of the trait's fields.
    pub property: Option<String>,
    pub value: Value,
    /// The unit the value is in, when the platform carries one beside it.
    pub unit: Option<String>,
}

/// The parsed table.
pub fn table() -> Result<&'static Mapping, BuildError> {
    static PARSED: OnceLock<Result<Mapping, String>> = OnceLock::new();
    PARSED
        .get_or_init(|| toml::from_str(TABLE).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| BuildError(format!("data/capabilities.toml does not parse: {e}")))
}

/// Translates one state change for `platform`.
pub fn translate(platform: &str, state: &StateChange) -> Result<Mapped, BuildError> {
    let key = format!("{}.{}", state.capability, state.attribute);
    let target = table()?
        .get(platform)
        .and_then(|t| t.get(&key))
        .ok_or_else(|| {
            BuildError(format!(
                "capability {key:?} has no mapping for platform {platform:?}"
            ))
        })?;
    let value = match &target.values {
        Some(values) => {
            let herald = match &state.value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            values.get(&herald).cloned().ok_or_else(|| {
                BuildError(format!(
                    "value {herald:?} of capability {key:?} has no mapping for platform {platform:?}"
                ))
            })?
        }
        None => state.value.clone(),
    };
    let (value, unit) = shape(target.form, value, state.unit.as_deref())
        .map_err(|why| BuildError(format!("capability {key:?} for {platform:?}: {why}")))?;
    Ok(Mapped {
        name: target.name.clone(),
        property: target.property.clone(),
        value,
        unit,
    })
}

fn shape(form: Form, value: Value, unit: Option<&str>) -> Result<(Value, Option<String>), String> {
    match form {
        Form::Plain => Ok((value, unit.map(str::to_string))),
        Form::Celsius => {
            let celsius = celsius(&value, unit)?;
            Ok((number(celsius)?, Some("C".into())))
        }
        Form::AlexaTemperature => {
            let n = value.as_f64().ok_or("the value is not a number")?;
            let scale = match unit.unwrap_or("C") {
                "C" => "CELSIUS",
                "F" => "FAHRENHEIT",
                other => return Err(format!("unit {other:?} is neither C nor F")),
            };
            let mut object = serde_json::Map::new();
            object.insert("value".into(), number(n)?);
            object.insert("scale".into(), Value::String(scale.into()));
            Ok((Value::Object(object), None))
        }
    }
}

fn celsius(value: &Value, unit: Option<&str>) -> Result<f64, String> {
    let n = value.as_f64().ok_or("the value is not a number")?;
    match unit.unwrap_or("C") {
        "C" => Ok(n),
        // Rounded to 0.1 °C so a conversion does not invent precision.
        "F" => Ok(((n - 32.0) * 5.0 / 9.0 * 10.0).round() / 10.0),
        other => Err(format!("unit {other:?} is neither C nor F")),
    }
}

fn number(n: f64) -> Result<Value, String> {
    Number::from_f64(n)
        .map(Value::Number)
        .ok_or_else(|| format!("{n} is not a finite number"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn state(capability: &str, attribute: &str, value: Value, unit: Option<&str>) -> StateChange {
        StateChange {
            capability: capability.into(),
            attribute: attribute.into(),
            value,
            unit: unit.map(str::to_string),
            component: "main".into(),
        }
    }

    #[test]
    fn the_table_parses_and_covers_every_platform() {
        let table = table().expect("data/capabilities.toml must parse");
        for &platform in crate::PLATFORMS {
            let entries = table.get(platform).expect(platform);
            for key in ["lock.lock", "temperatureMeasurement.temperature"] {
                assert!(entries.contains_key(key), "{platform} lacks {key}");
            }
        }
    }

    #[test]
    fn every_lock_value_is_mapped_everywhere() {
        for (platform, entries) in table().unwrap() {
            let values = entries["lock.lock"].values.as_ref().unwrap();
            for v in ["locked", "unlocked", "jammed", "forced_open"] {
                assert!(values.contains_key(v), "{platform} lock lacks {v}");
            }
        }
    }

    #[test]
    fn translates_values_and_units() {
        let lock = state("lock", "lock", json!("forced_open"), None);
        assert_eq!(translate("alexa", &lock).unwrap().value, json!("UNLOCKED"));
        assert_eq!(
            translate("google", &lock).unwrap().value,
            json!({"isJammed": false, "isLocked": false})
        );
        let hot = state(
            "temperatureMeasurement",
            "temperature",
            json!(98.6),
            Some("F"),
        );
        assert_eq!(translate("google", &hot).unwrap().value, json!(37.0));
        assert_eq!(
            translate("alexa", &hot).unwrap().value,
            json!({"value": 98.6, "scale": "FAHRENHEIT"})
        );
        assert_eq!(
            translate("smartthings", &hot).unwrap().unit.as_deref(),
            Some("F")
        );
    }

    #[test]
    fn unmapped_capabilities_and_values_name_the_platform() {
        let battery = state("battery", "battery", json!(80), None);
        let err = translate("alexa", &battery).unwrap_err();
        assert!(
            err.0.contains("battery.battery") && err.0.contains("alexa"),
            "{err}"
        );
        let odd = state("lock", "lock", json!("ajar"), None);
        let err = translate("smartthings", &odd).unwrap_err();
        assert!(
            err.0.contains("ajar") && err.0.contains("smartthings"),
            "{err}"
        );
        let words = state("temperatureMeasurement", "temperature", json!("warm"), None);
        assert!(translate("google", &words).is_err());
    }
}
