//! KT GiGA Genie. **Assumed throughout**: KT's "Home Skills" connect
//! third-party IoT servers over OAuth 2.0 with a Capability / Resource /
//! Value model, but KT publishes no push (partner → Genie) API; nothing below
//! is KT's documented format.
//!
//! Assumed:
//! - `POST {base}/events` (base: the link's `callback_url`, else the partner
//!   `url`) with a per-link OAuth2 user token in `Authorization: Bearer`,
//!   `x-request-id` = the delivery id (the receiver dedupes on it), and
//!   `{"deviceId", "capability", "resource", "value", "eventTime", "alert"?}`
//!   (`eventTime` in RFC 3339 UTC; capability/resource names and values from
//!   herald's mapping table, not from KT);
//! - refresh: RFC 6749 `refresh_token` grant at the link's `token_url` (else
//!   the partner's), client id and secret in the form;
//! - answers: 2xx delivered, 401 refresh, 403 park, 429/5xx retry.

use std::time::SystemTime;

use serde_json::{Map, Value};

use crate::oauth::{classify_bearer, required, OAuthClient};
use crate::state::DeviceData;
use crate::{
    event_time, mapping, Adapter, Answer, BuildError, DeliveryContext, LinkView, OutboundRequest,
    PartnerSettings, SetupError, Verdict,
};

pub const PLATFORM: &str = "genie";

pub struct Genie {
    url: String,
    token_url: Option<String>,
    client: OAuthClient,
}

impl Genie {
    pub fn boxed(settings: &PartnerSettings) -> Result<Box<dyn Adapter>, SetupError> {
        crate::oauth::require_client(settings, PLATFORM, false)?;
        Ok(Box::new(Genie {
            url: settings.url.trim_end_matches('/').to_string(),
            token_url: settings.token_url.clone(),
            client: OAuthClient::of(settings),
        }))
    }
}

impl Adapter for Genie {
    fn kind(&self) -> &'static str {
        PLATFORM
    }

    fn build(&self, ctx: &DeliveryContext<'_>) -> Result<OutboundRequest, BuildError> {
        let link = ctx.link_for(PLATFORM)?;
        let token = required(link.access_token, "access token", PLATFORM)?;
        let base = link.base_url(&self.url, PLATFORM)?;
        let data = DeviceData::of(&ctx.event)?;
        let change = data.require_state(PLATFORM)?;
        let mapped = mapping::translate(PLATFORM, change)?;
        let mut body = Map::new();
        body.insert("deviceId".into(), link.external_id.into());
        body.insert("capability".into(), mapped.name.into());
        body.insert("resource".into(), mapped.property.into());
        body.insert("value".into(), mapped.value);
        body.insert(
            "eventTime".into(),
            event_time::utc(ctx.event.occurred_at)?.into(),
        );
        if let Some(kind) = &data.kind {
            body.insert("alert".into(), kind.clone().into());
        }
        let body = Value::Object(body);
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
