//! Credentials for platform partners, kept fresh on a lane's behalf.
//!
//! Adapters build token requests and read the answers; this module decides
//! when to send them and what to do with the result. However many
//! deliveries hit an expired token at once, one refresh is in flight per
//! grant (a user's tokens, shared by all their devices' links; per partner
//! for a partner-wide token): the others wait for it and find the token
//! already renewed. A renewed grant is stored, sealed and durable, before
//! anything uses it, because a rotated refresh token may be the only one
//! that still works. Partner-wide tokens (client
//! credentials, service-account JWT) live in memory only: they are minted
//! again after a restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adapters::{Adapter, LinkView, RefreshVerdict, TokenScope, Verdict};
use backon::{ExponentialBuilder, Retryable};

use super::client::exchange;
use crate::clock::Clock;
use crate::config::KeepAlive;
use crate::links::{Link, LinkError, Links};
use crate::store::StoreError;
use crate::sync::lock;

/// A token with this little life left is renewed before it is used.
const EXPIRY_MARGIN_SECS: u64 = 60;

/// Grants read at a time by a keep-alive pass.
const KEEP_ALIVE_PAGE: usize = 256;

/// A link ready for a send: the link and the access token to present.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub link: Link,
    token: Option<String>,
}

impl Prepared {
    /// What the adapter sees: the link with the token to use.
    pub(crate) fn view(&self) -> LinkView<'_> {
        LinkView {
            access_token: self.token.as_deref(),
            ..self.link.view()
        }
    }
}

pub(crate) struct Tokens {
    partner: String,
    links: Links,
    client: super::client::Client,
    clock: Clock,
    timeout: Duration,
    /// One refresh at a time per grant (by grant id).
    gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The partner-wide token, for adapters with [`TokenScope::Partner`]:
    /// read by every delivery under a plain lock held for a clone.
    partner_token: Mutex<Option<PartnerToken>>,
    /// Held while one is minted: the single flight of the mint.
    minting: tokio::sync::Mutex<()>,
}

struct PartnerToken {
    access_token: String,
    expires_at_unix: Option<u64>,
}

impl Tokens {
    pub(crate) fn new(
        partner: &str,
        links: Links,
        client: super::client::Client,
        clock: Clock,
        timeout: Duration,
    ) -> Tokens {
        Tokens {
            partner: partner.to_string(),
            links,
            client,
            clock,
            timeout,
            gates: Mutex::new(HashMap::new()),
            partner_token: Mutex::new(None),
            minting: tokio::sync::Mutex::new(()),
        }
    }

    /// `device_id`'s link with a token good for a send now, renewing one
    /// that is about to expire; `None` when the device has no link here.
    /// The error is the verdict for the delivery (retry, park, permanent).
    pub(crate) async fn prepare(
        &self,
        adapter: &dyn Adapter,
        device_id: &str,
    ) -> Result<Option<Prepared>, Verdict> {
        let Some(link) = self.read(device_id)? else {
            return Ok(None);
        };
        match adapter.token_scope() {
            TokenScope::Partner => {
                let token = self.partner_token(adapter, None).await?;
                Ok(Some(Prepared {
                    link,
                    token: Some(token),
                }))
            }
            TokenScope::Link => {
                let expiring = link.credentials.as_ref().is_some_and(|c| {
                    c.refresh_token.is_some()
                        && c.expires_at_unix
                            .is_some_and(|at| at <= self.now_unix() + EXPIRY_MARGIN_SECS)
                });
                let prepared = Prepared::own(link);
                if expiring {
                    return self.renew(adapter, &prepared).await.map(Some);
                }
                Ok(Some(prepared))
            }
        }
    }

    /// After the platform refused `used`'s token: the same link with a
    /// renewed token. Only the first of many callers refreshes; the others
    /// get its result.
    pub(crate) async fn renew(
        &self,
        adapter: &dyn Adapter,
        used: &Prepared,
    ) -> Result<Prepared, Verdict> {
        match adapter.token_scope() {
            TokenScope::Partner => {
                let token = self.partner_token(adapter, used.token.as_deref()).await?;
                Ok(Prepared {
                    link: used.link.clone(),
                    token: Some(token),
                })
            }
            TokenScope::Link => {
                let grant = used.link.grant();
                let gate = self.gate(&grant);
                let renewed = {
                    let _turn = gate.lock().await;
                    self.refresh_link(adapter, &used.link.record.device_id, used.token.as_deref())
                        .await
                };
                self.release_gate(&grant, gate);
                renewed
            }
        }
    }

    /// One keep-alive pass: every grant whose refresh token is older than
    /// `keep_alive` allows is refreshed, one at a time, through the same
    /// single flight as a delivery's refresh, and no event is sent. The
    /// caller paces the refreshes with `pace` (the partner's rate limit).
    /// Returns how many were refreshed.
    pub(crate) async fn keep_alive<F, Fut>(
        &self,
        adapter: &dyn Adapter,
        keep_alive: KeepAlive,
        mut pace: F,
    ) -> Result<u64, LinkError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        if adapter.token_scope() != TokenScope::Link {
            return Ok(0);
        }
        let refresh_at_age_ms = keep_alive.refresh_at_age().as_millis() as u64;
        let mut refreshed = 0;
        let mut after: Option<String> = None;
        loop {
            let page = self
                .links
                .grants_page(&self.partner, after.as_deref(), KEEP_ALIVE_PAGE)?;
            let Some(last) = page.last() else {
                return Ok(refreshed);
            };
            after = Some(last.grant.clone());
            for stored in page {
                let age_ms = self
                    .clock
                    .now_ms()
                    .saturating_sub(stored.refresh_obtained_ms);
                if age_ms < refresh_at_age_ms {
                    continue;
                }
                // The refresh is built from one of the grant's links: they
                // all carry the user's callback and token URLs.
                let Some(link) = self.links.a_link_of(&self.partner, &stored.grant)? else {
                    continue;
                };
                if link
                    .credentials
                    .as_ref()
                    .is_none_or(|c| c.refresh_token.is_none())
                {
                    continue;
                }
                if !pace().await {
                    return Ok(refreshed);
                }
                let outcome = match self.renew(adapter, &Prepared::own(link)).await {
                    Ok(_) => {
                        refreshed += 1;
                        tracing::info!(partner = %self.partner, grant = %stored.grant,
                            age_s = age_ms / 1000, "keep-alive: refreshed a grant's token before its refresh token expires");
                        "renewed"
                    }
                    Err(verdict) => {
                        tracing::warn!(partner = %self.partner, grant = %stored.grant, ?verdict,
                            "keep-alive: refreshing a grant's token failed; the next pass tries again");
                        "failed"
                    }
                };
                metrics::counter!(crate::telemetry::KEEP_ALIVE_REFRESHES, "partner" => self.partner.clone(), "outcome" => outcome)
                    .increment(1);
            }
        }
    }

    /// Refreshes the token of the device's grant unless someone already
    /// did since `used`.
    async fn refresh_link(
        &self,
        adapter: &dyn Adapter,
        device_id: &str,
        used: Option<&str>,
    ) -> Result<Prepared, Verdict> {
        let link = self.read(device_id)?.ok_or_else(|| Verdict::Permanent {
            reason: "the device's link was deleted".into(),
        })?;
        let credentials = link.credentials.clone();
        let current = credentials.as_ref().map(|c| c.access_token.as_str());
        if current.is_some() && current != used {
            // Renewed (or put again) while this delivery waited its turn.
            return Ok(Prepared::own(link));
        }
        let Some(refresh_token) = credentials.and_then(|c| c.refresh_token) else {
            return Err(Verdict::Park {
                reason: "the platform refused the link's access token and the link has no refresh token; put the link again with new credentials".into(),
            });
        };
        let now_unix = self.now_unix();
        let request = adapter
            .refresh_request(&link.view(), &refresh_token, now_unix)
            .map_err(|e| Verdict::Permanent {
                reason: format!("cannot build the token refresh: {e}"),
            })?
            .ok_or_else(|| Verdict::Park {
                reason: format!(
                    "the platform refused the link's access token and herald cannot refresh {} tokens; put the link again with new credentials",
                    adapter.kind()
                ),
            })?;
        let answer = exchange(&self.client, request, self.timeout, &self.clock).await;
        if let Some(refused) = answer.refusal() {
            return Err(Verdict::Permanent {
                reason: format!("refreshing the link's token: {refused}"),
            });
        }
        let verdict = adapter.read_refresh(&answer.as_answer(), self.clock.now_system_time());
        self.count(&verdict);
        match verdict {
            RefreshVerdict::Renewed(fresh) => {
                // The platform may have rotated the refresh token already: a
                // failed write loses the only one that works, so it is tried
                // again a few times before the delivery gives up for now.
                let store = || self.links.rotate(&link, fresh.clone());
                let clock = self.clock.clone();
                let stored = store
                    .retry(
                        ExponentialBuilder::default()
                            .with_min_delay(Duration::from_millis(20))
                            .with_max_times(5),
                    )
                    // On herald's clock, like every other wait.
                    .sleep(move |wait| {
                        let clock = clock.clone();
                        async move { clock.sleep(wait).await }
                    })
                    .when(|e| matches!(e, LinkError::Store(e) if !matches!(e, StoreError::Closed)))
                    .await
                    .map_err(|e| {
                        tracing::error!(partner = %self.partner, device = %device_id, error = %e,
                            "a refreshed token could not be stored; if the platform rotated the refresh token, the link must be put again");
                        Verdict::Retry {
                            after: None,
                            reason: format!("cannot store the refreshed token: {e}"),
                        }
                    })?;
                if !stored {
                    tracing::info!(partner = %self.partner, device = %device_id, grant = %link.grant(),
                        "the grant got new credentials while its token was refreshed; using them");
                }
                // What is stored now: ours, or the PUT that won over it.
                let link = self.read(device_id)?.ok_or_else(|| Verdict::Permanent {
                    reason: "the device's link was deleted".into(),
                })?;
                tracing::info!(partner = %self.partner, device = %device_id, grant = %link.grant(), "link token refreshed");
                Ok(Prepared::own(link))
            }
            RefreshVerdict::Retry { after, reason } => Err(Verdict::Retry {
                after,
                reason: format!("refreshing the link's token: {reason}"),
            }),
            RefreshVerdict::Park { reason } => Err(Verdict::Park {
                reason: format!("the platform refused to refresh the link's token: {reason}"),
            }),
            RefreshVerdict::Misconfigured { after, reason } => {
                tracing::error!(partner = %self.partner, device = %device_id, %reason,
                    "the platform refused herald's OAuth client while refreshing a link's token; check client_id_env and client_secret_env");
                Err(Verdict::Misconfigured {
                    after,
                    reason: format!("the platform refused herald's OAuth client: {reason}"),
                })
            }
        }
    }

    /// The partner-wide token, minted when there is none, when it is about
    /// to expire, or when `refused` is the one held (the platform refused it).
    async fn partner_token(
        &self,
        adapter: &dyn Adapter,
        refused: Option<&str>,
    ) -> Result<String, Verdict> {
        if let Some(token) = self.held_partner_token(refused) {
            return Ok(token);
        }
        let _minting = self.minting.lock().await;
        // Whoever minted while this one waited left a usable token.
        if let Some(token) = self.held_partner_token(refused) {
            return Ok(token);
        }
        let now_unix = self.now_unix();
        let request = adapter
            .partner_token_request(now_unix)
            .map_err(|e| Verdict::Permanent {
                reason: format!("cannot build the partner token request: {e}"),
            })?
            .ok_or_else(|| Verdict::Permanent {
                reason: format!("the {} adapter mints no partner token", adapter.kind()),
            })?;
        let answer = exchange(&self.client, request, self.timeout, &self.clock).await;
        if let Some(refused) = answer.refusal() {
            tracing::error!(partner = %self.partner, %refused,
                "the partner token endpoint is refused by the outbound address policy; check token_url or the key's token_uri");
            return Err(Verdict::Permanent {
                reason: format!("minting the partner token: {refused}"),
            });
        }
        let verdict = adapter.read_partner_token(&answer.as_answer(), self.clock.now_system_time());
        self.count(&verdict);
        match verdict {
            RefreshVerdict::Renewed(fresh) => {
                tracing::info!(partner = %self.partner, "partner token minted");
                let token = fresh.access_token.clone();
                *lock(&self.partner_token) = Some(PartnerToken {
                    access_token: fresh.access_token,
                    expires_at_unix: fresh.expires_at_unix,
                });
                Ok(token)
            }
            RefreshVerdict::Retry { after, reason } => Err(Verdict::Retry {
                after,
                reason: format!("minting the partner token: {reason}"),
            }),
            // herald's own client credentials are refused: a config problem
            // for on-call, not a reason to park every device. Deliveries
            // wait and retry until the credentials are fixed.
            RefreshVerdict::Park { reason } => Err(self.partner_refused(None, reason)),
            RefreshVerdict::Misconfigured { after, reason } => {
                Err(self.partner_refused(after, reason))
            }
        }
    }

    /// The verdict for deliveries when the platform refuses herald's
    /// partner-wide credentials.
    fn partner_refused(&self, after: Option<Duration>, reason: String) -> Verdict {
        tracing::error!(partner = %self.partner, %reason,
            "the platform refused herald's partner credentials; check client_id_env, client_secret_env or service_account_key_env");
        Verdict::Misconfigured {
            after,
            reason: format!("the platform refused herald's partner credentials: {reason}"),
        }
    }

    /// The partner token held, unless it is about to expire or is the one
    /// the platform just `refused`.
    fn held_partner_token(&self, refused: Option<&str>) -> Option<String> {
        let slot = lock(&self.partner_token);
        let held = slot.as_ref()?;
        let fresh = held
            .expires_at_unix
            .is_none_or(|at| at > self.now_unix() + EXPIRY_MARGIN_SECS);
        (fresh && refused != Some(held.access_token.as_str())).then(|| held.access_token.clone())
    }

    fn read(&self, device_id: &str) -> Result<Option<Link>, Verdict> {
        self.links
            .get(&self.partner, device_id)
            .map_err(|e| Verdict::Retry {
                after: None,
                reason: format!("cannot read the device's link: {e}"),
            })
    }

    fn gate(&self, grant: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = lock(&self.gates);
        Arc::clone(gates.entry(grant.to_string()).or_default())
    }

    /// Forgets a grant's gate once nobody waits on it.
    fn release_gate(&self, grant: &str, gate: Arc<tokio::sync::Mutex<()>>) {
        let mut gates = lock(&self.gates);
        // Ours and the map's: nobody else holds or waits on it.
        if Arc::strong_count(&gate) == 2 {
            gates.remove(grant);
        }
    }

    fn count(&self, verdict: &RefreshVerdict) {
        let outcome = match verdict {
            RefreshVerdict::Renewed(_) => "renewed",
            RefreshVerdict::Retry { .. } => "retry",
            RefreshVerdict::Park { .. } => "refused",
            RefreshVerdict::Misconfigured { .. } => "misconfigured",
        };
        metrics::counter!(crate::telemetry::TOKEN_REQUESTS, "partner" => self.partner.clone(), "outcome" => outcome)
            .increment(1);
    }

    fn now_unix(&self) -> u64 {
        self.clock.now_ms() / 1000
    }
}

impl Prepared {
    /// The link with its own access token.
    fn own(link: Link) -> Prepared {
        let token = link.credentials.as_ref().map(|c| c.access_token.clone());
        Prepared { link, token }
    }
}
