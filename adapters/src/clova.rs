//! Naver Clova. **Assumed throughout**: the public Clova Home Extension API
//! is pull-only (Clova sends directives to the partner and reads its
//! answers) and closed to new registrations; NAVER documents no push
//! (partner → Clova) call. Nothing below is Clova's documented format.
//!
//! Assumed:
//! - `POST {base}/events` (base: the link's `callback_url`, else the partner
//!   `url`) with a per-link OAuth2 user token in `Authorization: Bearer`,
//!   `x-request-id` = the delivery id (stable: the receiver dedupes on it);
//! - the body `{"ts": <unix ms>, "payload": {"user_id": <account>, "devices":
//!   [{"id": <externalId>, "capabilities": [{"name", "property", "value"}]}]}}`,
//!   plus `"alert": <kind>` on alerts. This is the shape of another
//!   platform's state callback (Yandex smart home's `ts` / `payload.user_id`
//!   / `devices`), not one Clova defines;
//! - capability names and values from the mapping table (`LockState`,
//!   `lockState`, `locked` / `unlocked`...): herald's own, not values taken
//!   from Clova's Home Extension interface;
//! - refresh: RFC 6749 `refresh_token` grant at the link's `token_url` (else
//!   the partner's), client id and secret in the form;
//! - answers: 2xx delivered, 401 refresh, 403 park, 429/5xx retry.

use std::time::SystemTime;

use serde_json::{json, Map, Value};

use crate::oauth::{classify_bearer, require_link_field, required, OAuthClient};
use crate::state::DeviceData;
use crate::{
    event_time, mapping, Adapter, Answer, BuildError, DeliveryContext, LinkView, OutboundRequest,
    PartnerSettings, SetupError, Verdict,
};

pub const PLATFORM: &str = "clova";

pub struct Clova {
    url: String,
    token_url: Option<String>,
    client: OAuthClient,
}

impl Clova {
    pub fn boxed(settings: &PartnerSettings) -> Result<Box<dyn Adapter>, SetupError> {
        crate::oauth::require_client(settings, PLATFORM, false)?;
        Ok(Box::new(Clova {
            url: settings.url.trim_end_matches('/').to_string(),
            token_url: settings.token_url.clone(),
            client: OAuthClient::of(settings),
        }))
    }
}

impl Adapter for Clova {
    fn kind(&self) -> &'static str {
        PLATFORM
    }

    fn check_link(&self, link: &LinkView<'_>) -> Result<(), SetupError> {
        require_link_field(link.account, "account", "account (user_id)", PLATFORM)
    }

    fn build(&self, ctx: &DeliveryContext<'_>) -> Result<OutboundRequest, BuildError> {
        let link = ctx.link_for(PLATFORM)?;
        let token = required(link.access_token, "access token", PLATFORM)?;
        let user = required(link.account, "account (user_id)", PLATFORM)?;
        let base = link.base_url(&self.url, PLATFORM)?;
        let data = DeviceData::of(&ctx.event)?;
        let change = data.require_state(PLATFORM)?;
        let mapped = mapping::translate(PLATFORM, change)?;
        let mut device = Map::new();
        device.insert("id".into(), link.external_id.into());
        device.insert(
            "capabilities".into(),
            json!([{"name": mapped.name, "property": mapped.property, "value": mapped.value}]),
        );
        let mut body = json!({
            "ts": event_time::unix_ms(ctx.event.occurred_at)?,
            "payload": {"user_id": user, "devices": [Value::Object(device)]},
        });
        if let Some(kind) = &data.kind {
            body["alert"] = kind.clone().into();
        }
        let mut request =
            OutboundRequest::bearer_json(format!("{base}/events"), token, &body, "event")?;
        request
            .headers
            .push(("x-request-id".into(), ctx.delivery_id.into()));
        Ok(request)
    }

    fn classify(&self, answer: &Answer<'_>, now: SystemTime) -> Verdict {
        classify_bearer(answer, now)
    }

    fn refresh_request(
        &self,
        link: &LinkView<'_>,
        refresh_token: &str,
        _now_unix: u64,
    ) -> Result<Option<OutboundRequest>, BuildError> {
        self.client
            .refresh(PLATFORM, link, self.token_url.as_deref(), refresh_token)
    }
}
