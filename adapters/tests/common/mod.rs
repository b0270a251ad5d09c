//! Sample events, links and partner settings shared by the golden and mock
//! tests: fixed ids and times, so requests are the same bytes every run.
#![allow(dead_code)]

use adapters::{DeliveryContext, EventView, LinkView, PartnerSettings};
use serde_json::value::RawValue;

pub use adapters::PLATFORMS;

pub const DELIVERY_ID: &str = "01936b2a-5c00-7000-8000-00000000d001";
pub const NOW_UNIX: u64 = 1_795_586_405;
pub const GOOGLE_KEY: &str = include_str!("../../../fixtures/google/service-account.test.json");

/// One sample event, owned so contexts can borrow it.
pub struct Sample {
    pub id: &'static str,
    pub event_type: &'static str,
    pub device_id: &'static str,
    pub priority: &'static str,
    pub occurred_at: &'static str,
    pub data: Box<RawValue>,
}

impl Sample {
    /// A lock forced open: a state (the lock reads unlocked) and an alert.
    pub fn lock_alert() -> Sample {
        Sample {
            id: "01936b2a-5c00-7000-8000-00000000e001",
            event_type: "door.forced_open",
            device_id: "lock-7f3a",
            priority: "critical",
            occurred_at: "2026-11-25T06:00:00Z",
            data: RawValue::from_string(
                r#"{"capability":"lock","attribute":"lock","value":"forced_open","kind":"forced_open"}"#
                    .into(),
            )
            .unwrap(),
        }
    }

    /// A plain temperature reading, with a non-UTC offset.
    pub fn temperature() -> Sample {
        Sample {
            id: "01936b2a-5c00-7000-8000-00000000e002",
            event_type: "temperature.reading",
            device_id: "thermo-19c2",
            priority: "normal",
            occurred_at: "2026-11-25T15:00:00.250+09:00",
            data: RawValue::from_string(
                r#"{"capability":"temperatureMeasurement","attribute":"temperature","value":22.5,"unit":"C","room":"nursery"}"#
                    .into(),
            )
            .unwrap(),
        }
    }

    pub fn view(&self) -> EventView<'_> {
        EventView {
            id: self.id,
            event_type: self.event_type,
            device_id: self.device_id,
            priority: self.priority,
            occurred_at: self.occurred_at,
            data: &self.data,
        }
    }
}

/// A link's fields, owned, with endpoints that may point at a mock.
#[derive(Clone)]
pub struct Link {
    pub external_id: String,
    pub account: Option<String>,
    pub region: Option<String>,
    pub callback_url: Option<String>,
    pub token_url: Option<String>,
    pub access_token: String,
    pub options: Option<Box<RawValue>>,
}

impl Link {
    pub fn view(&self) -> LinkView<'_> {
        LinkView {
            external_id: &self.external_id,
            account: self.account.as_deref(),
            region: self.region.as_deref(),
            callback_url: self.callback_url.as_deref(),
            token_url: self.token_url.as_deref(),
            access_token: Some(&self.access_token),
            options: self.options.as_deref(),
        }
    }
}

/// The sample link for `platform`; `base` is where its endpoints live
/// (`None`: the sample's production-looking hosts).
pub fn link(platform: &str, external_id: &str, base: Option<&str>) -> Link {
    let at = |path: &str, default: &str| match base {
        Some(base) => format!("{base}{path}"),
        None => format!("{default}{path}"),
    };
    let (callback_url, token_url, region) = match platform {
        "smartthings" => (
            Some(at("/device/events", "https://c2c-eu.smartthings.example")),
            Some(at("/oauth/token", "https://c2c-eu.smartthings.example")),
            None,
        ),
        "alexa" => (None, base.map(|b| format!("{b}/auth/o2/token")), Some("eu")),
        "thinq" => (None, None, Some("kr")),
        "clova" | "genie" => (
            None,
            Some(at(
                "/oauth/token",
                &format!("https://auth.{platform}.example"),
            )),
            None,
        ),
        _ => (None, base.map(|b| format!("{b}/oauth/token")), None),
    };
    Link {
        external_id: external_id.into(),
        account: Some("user-7".into()),
        region: region.map(str::to_string),
        callback_url,
        token_url,
        access_token: if platform == "google" || platform == "thinq" {
            "partner-token-0".into()
        } else {
            "at-0".into()
        },
        options: (platform == "kakao").then(|| {
            RawValue::from_string(r#"{"web_url":"https://app.devicemaker.example/alerts"}"#.into())
                .unwrap()
        }),
    }
}

/// The partner settings for `platform`; `base` replaces the platform's
/// public endpoints (a mock), `None` keeps them.
pub fn settings(platform: &str, base: Option<&str>) -> PartnerSettings {
    let mut s = PartnerSettings {
        name: format!("{platform}-sample"),
        url: base.unwrap_or_default().to_string(),
        client_id: Some(format!("herald-{platform}")),
        client_secret: Some(format!("{platform}-client-secret")),
        ..PartnerSettings::default()
    };
    match platform {
        "google" => {
            let mut key: serde_json::Value = serde_json::from_str(GOOGLE_KEY).unwrap();
            if let Some(base) = base {
                key["token_uri"] = format!("{base}/token").into();
                s.url = format!("{base}/v1/devices:reportStateAndNotification");
            }
            s.service_account_key = Some(key.to_string());
        }
        "alexa" => {
            // Alexa takes a gateway per region, never one url.
            s.url.clear();
            if let Some(base) = base {
                for region in ["na", "eu", "fe"] {
                    s.gateways
                        .insert(region.into(), format!("{base}/{region}/v3/events"));
                }
            }
        }
        "thinq" => {
            if base.is_none() {
                s.url = "https://partner-api.thinq.example/v1".into();
            }
            s.secret = Some("thinq-api-key".into());
        }
        "clova" if base.is_none() => s.url = "https://clova-push.example/herald".into(),
        "genie" if base.is_none() => s.url = "https://genie-homeskills.example/herald".into(),
        _ => {}
    }
    s
}

pub fn context<'a>(
    delivery_id: &'a str,
    attempt: u32,
    sample: &'a Sample,
    link: &'a Link,
) -> DeliveryContext<'a> {
    DeliveryContext {
        delivery_id,
        attempt,
        send: 0,
        now_unix: NOW_UNIX,
        event: sample.view(),
        link: Some(link.view()),
    }
}
