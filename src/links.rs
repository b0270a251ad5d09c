//! Device links: which partner platforms a device is linked into, and the
//! credentials herald presents there on the user's behalf.
//!
//! Platforms issue tokens per user, not per device, so credentials belong
//! to a grant: the links of one partner that name the same `account` share
//! one (`account/<account>`), and a link without an account has one of its
//! own (`device/<device_id>`). One refresh renews the tokens of all the
//! user's devices, and a single-use refresh token is spent once.
//!
//! A grant's tokens are someone's access to their home, so they are sealed
//! before they reach the store (AES-256-GCM, key from `HERALD_LINK_KEY` or
//! the variable `[server] link_key_env` names, bound to the partner and
//! grant so a sealed blob cannot be moved to another) and opened only
//! when a delivery needs them. Nothing here logs them; [`Link`]'s `Debug`
//! and every API view leave them out.

use std::fmt;
use std::sync::Arc;

use adapters::{Credentials, LinkView};
use base64::Engine;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::model::{StoredGrant, StoredLink};
use crate::store::{Store, StoreError};

/// The environment variable holding the link key when the config names none.
pub(crate) const DEFAULT_KEY_ENV: &str = "HERALD_LINK_KEY";

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("link credentials need a key: set {DEFAULT_KEY_ENV} (or the variable [server] link_key_env names) to the base64 of 32 random bytes")]
    NoKey,
    /// `owner` is `grant <grant id>`.
    #[error("the credentials of {owner} at {partner} cannot be opened: {reason}")]
    Unsealable {
        partner: String,
        owner: String,
        reason: String,
    },
}

/// The key that seals link credentials.
#[derive(Clone)]
pub struct LinkKey(Arc<LessSafeKey>);

impl fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LinkKey(<redacted>)")
    }
}

impl LinkKey {
    /// From the base64 text of 32 bytes; the error says what is wrong.
    pub(crate) fn from_base64(text: &str) -> Result<LinkKey, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| format!("is not base64 ({e})"))?;
        if bytes.len() != 32 {
            return Err(format!(
                "decodes to {} bytes; it must be 32 (for example: head -c 32 /dev/urandom | base64)",
                bytes.len()
            ));
        }
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| "is not a valid key")?;
        Ok(LinkKey(Arc::new(LessSafeKey::new(key))))
    }

    fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<String, String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| "no randomness for a nonce".to_string())?;
        let mut sealed = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut sealed,
            )
            .map_err(|_| "sealing failed".to_string())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(base64::engine::general_purpose::STANDARD.encode(out))
    }

    fn open(&self, aad: &[u8], text: &str) -> Result<Vec<u8>, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| format!("not base64: {e}"))?;
        if bytes.len() < NONCE_LEN + aead::AES_256_GCM.tag_len() {
            return Err("too short".into());
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce")?;
        let mut sealed = sealed.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(aad), &mut sealed)
            .map_err(|_| "wrong key, or the record was altered".to_string())?;
        Ok(plain.to_vec())
    }
}

/// The sealed form's plain text.
#[derive(Serialize, Deserialize)]
struct SealedCredentials {
    access_token: String,
    refresh_token: Option<String>,
    expires_at_unix: Option<u64>,
}

/// A link as herald uses it, its grant's credentials opened.
#[derive(Clone)]
pub struct Link {
    /// The link as stored (its generation set by the store). It holds no
    /// credentials of its own: `credentials` is what the link presents.
    pub record: StoredLink,
    /// The grant's credentials: on a `PUT`, the grant's new ones (none:
    /// keep the account's grant as it is).
    pub credentials: Option<Credentials>,
    /// The store's count of writes to the link's grant when it was read (0:
    /// none stored): a refresh stores its tokens only if it is unchanged.
    pub grant_generation: u64,
    /// When the grant's refresh token was obtained (herald's clock, ms).
    pub refresh_obtained_ms: u64,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("partner", &self.record.partner)
            .field("device_id", &self.record.device_id)
            .field("external_id", &self.record.external_id)
            .field("grant", &self.grant())
            .field("credentials", &self.credentials)
            .field("generation", &self.record.generation)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// What an adapter sees, with the link's own access token.
    pub(crate) fn view(&self) -> LinkView<'_> {
        let r = &self.record;
        LinkView {
            external_id: &r.external_id,
            account: r.account.as_deref(),
            region: r.region.as_deref(),
            callback_url: r.callback_url.as_deref(),
            token_url: r.token_url.as_deref(),
            access_token: self.credentials.as_ref().map(|c| c.access_token.as_str()),
            options: r.options.as_deref(),
        }
    }

    /// The id of the grant whose credentials this link presents.
    pub(crate) fn grant(&self) -> String {
        self.record.grant()
    }
}

/// A link as stored, with its grant: what a view shows, no secret opened.
#[derive(Debug, Clone)]
pub(crate) struct StoredView {
    pub link: StoredLink,
    pub grant: Option<StoredGrant>,
}

impl StoredView {
    pub(crate) fn has_credentials(&self) -> bool {
        self.grant.is_some()
    }

    pub(crate) fn expires_at_unix(&self) -> Option<u64> {
        self.grant.as_ref().and_then(|grant| grant.expires_at_unix)
    }
}

/// What a `PUT` of a link did.
#[derive(Debug)]
pub(crate) struct PutOutcome {
    pub created: bool,
    /// The devices whose parked routes are cleared: the link's, and with
    /// new credentials every other link of its grant.
    pub relinked: Vec<String>,
}

/// Links in the store, sealed on the way in and opened on the way out.
#[derive(Clone)]
pub struct Links {
    store: Store,
    key: Option<LinkKey>,
    clock: Clock,
}

impl Links {
    pub fn new(store: Store, key: Option<LinkKey>, clock: Clock) -> Links {
        Links { store, key, clock }
    }

    /// The link with its grant's credentials opened.
    pub fn get(&self, partner: &str, device_id: &str) -> Result<Option<Link>, LinkError> {
        let Some(link) = self.store.link(partner, device_id)? else {
            return Ok(None);
        };
        let grant = self.store.grant(partner, &link.grant())?;
        self.open(StoredView { link, grant }).map(Some)
    }

    /// The stored form, for views: no secrets to open.
    pub(crate) fn get_stored(
        &self,
        partner: &str,
        device_id: &str,
    ) -> Result<Option<StoredView>, LinkError> {
        let Some(link) = self.store.link(partner, device_id)? else {
            return Ok(None);
        };
        let grant = self.store.grant(partner, &link.grant())?;
        Ok(Some(StoredView { link, grant }))
    }

    /// Up to `limit` of `partner`'s links after device `after`, stored
    /// form (see [`Store::links_page`]).
    pub(crate) fn page_stored(
        &self,
        partner: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredView>, LinkError> {
        let mut out = Vec::new();
        for link in self.store.links_page(partner, after, limit)? {
            let grant = self.store.grant(partner, &link.grant())?;
            out.push(StoredView { link, grant });
        }
        Ok(out)
    }

    /// Up to `limit` of `partner`'s grants after grant `after`.
    pub(crate) fn grants_page(
        &self,
        partner: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredGrant>, LinkError> {
        Ok(self.store.grants_page(partner, after, limit)?)
    }

    /// One link that uses `grant`, opened: what a refresh of the grant
    /// is built from when no delivery asks for it.
    pub(crate) fn a_link_of(&self, partner: &str, grant: &str) -> Result<Option<Link>, LinkError> {
        for device_id in self.store.grant_links(partner, grant, 1)? {
            if let Some(link) = self.get(partner, &device_id)? {
                return Ok(Some(link));
            }
        }
        Ok(None)
    }

    /// Creates or replaces a link and, when it carries credentials, its
    /// grant's (for every link of the grant). Durable when it returns.
    pub(crate) async fn put(&self, link: Link) -> Result<PutOutcome, LinkError> {
        let now_ms = self.clock.now_ms();
        let grant = match &link.credentials {
            None => None,
            Some(credentials) => Some(self.seal_grant(
                &link.record.partner,
                &link.grant(),
                credentials,
                0,
                now_ms,
            )?),
        };
        let stored = StoredLink {
            updated_ms: now_ms,
            ..link.record
        };
        let outcome = self.store.put_link(stored, grant).await?;
        Ok(PutOutcome {
            created: outcome.applied,
            relinked: outcome.relinked,
        })
    }

    /// Removes a link (and its grant, with the grant's last link).
    pub(crate) async fn delete(&self, partner: &str, device_id: &str) -> Result<bool, LinkError> {
        Ok(self.store.delete_link(partner, device_id).await?)
    }

    /// Stores refreshed credentials for `refreshed`'s grant unless the
    /// grant changed since it was read (a `PUT` meanwhile wins); a refresh
    /// token the platform did not rotate is kept, with its age. Durable
    /// before it returns, because a rotated refresh token may be the only
    /// one that still works.
    pub(crate) async fn rotate(
        &self,
        refreshed: &Link,
        fresh: Credentials,
    ) -> Result<bool, LinkError> {
        let kept = refreshed
            .credentials
            .as_ref()
            .and_then(|c| c.refresh_token.clone());
        let obtained_ms = match fresh.refresh_token {
            Some(_) => self.clock.now_ms(),
            None => refreshed.refresh_obtained_ms,
        };
        let credentials = Credentials {
            refresh_token: fresh.refresh_token.or(kept),
            ..fresh
        };
        let grant = self.seal_grant(
            &refreshed.record.partner,
            &refreshed.grant(),
            &credentials,
            refreshed.grant_generation,
            obtained_ms,
        )?;
        Ok(self.store.rotate_grant(grant).await?)
    }

    fn seal_grant(
        &self,
        partner: &str,
        grant: &str,
        credentials: &Credentials,
        generation: u64,
        refresh_obtained_ms: u64,
    ) -> Result<StoredGrant, LinkError> {
        let key = self.key.as_ref().ok_or(LinkError::NoKey)?;
        let unsealable = |reason: String| LinkError::Unsealable {
            partner: partner.to_string(),
            owner: format!("grant {grant}"),
            reason,
        };
        let plain = serde_json::to_vec(&SealedCredentials {
            access_token: credentials.access_token.clone(),
            refresh_token: credentials.refresh_token.clone(),
            expires_at_unix: credentials.expires_at_unix,
        })
        .map_err(|e| unsealable(e.to_string()))?;
        let sealed_credentials = key
            .seal(&grant_aad(partner, grant), &plain)
            .map_err(unsealable)?;
        Ok(StoredGrant {
            partner: partner.to_string(),
            grant: grant.to_string(),
            sealed_credentials,
            expires_at_unix: credentials.expires_at_unix,
            generation,
            updated_ms: self.clock.now_ms(),
            refresh_obtained_ms,
        })
    }

    fn open(&self, stored: StoredView) -> Result<Link, LinkError> {
        let StoredView { link, grant } = stored;
        // The grant's; a link without one (no account, put without
        // credentials) presents none.
        let (credentials, grant_generation, refresh_obtained_ms) = match &grant {
            Some(grant) => (
                Some(self.open_sealed(
                    &link.partner,
                    &format!("grant {}", grant.grant),
                    &grant_aad(&grant.partner, &grant.grant),
                    &grant.sealed_credentials,
                )?),
                grant.generation,
                grant.refresh_obtained_ms,
            ),
            None => (None, 0, link.updated_ms),
        };
        Ok(Link {
            record: link,
            credentials,
            grant_generation,
            refresh_obtained_ms,
        })
    }

    fn open_sealed(
        &self,
        partner: &str,
        owner: &str,
        aad: &[u8],
        text: &str,
    ) -> Result<Credentials, LinkError> {
        let unsealable = |reason: String| LinkError::Unsealable {
            partner: partner.to_string(),
            owner: owner.to_string(),
            reason,
        };
        let key = self.key.as_ref().ok_or(LinkError::NoKey)?;
        let plain = key.open(aad, text).map_err(unsealable)?;
        let c: SealedCredentials =
            serde_json::from_slice(&plain).map_err(|e| unsealable(e.to_string()))?;
        Ok(Credentials {
            access_token: c.access_token,
            refresh_token: c.refresh_token,
            expires_at_unix: c.expires_at_unix,
        })
    }
}

/// Binds a sealed blob to its grant, so it cannot be moved to another.
fn grant_aad(partner: &str, grant: &str) -> Vec<u8> {
    let mut out = b"herald-grant\0".to_vec();
    out.extend_from_slice(partner.as_bytes());
    out.push(0);
    out.extend_from_slice(grant.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> LinkKey {
        LinkKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([7u8; 32])).unwrap()
    }

    #[test]
    fn sealed_credentials_open_only_for_their_grant_and_key() {
        let k = key();
        let sealed = k
            .seal(&grant_aad("st", "account/user-1"), b"secret-token")
            .unwrap();
        assert!(!sealed.contains("secret-token"));
        assert_eq!(
            k.open(&grant_aad("st", "account/user-1"), &sealed).unwrap(),
            b"secret-token"
        );
        assert!(k.open(&grant_aad("st", "account/user-2"), &sealed).is_err());
        let other =
            LinkKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([8u8; 32]))
                .unwrap();
        assert!(other
            .open(&grant_aad("st", "account/user-1"), &sealed)
            .is_err());
        assert!(k.open(&grant_aad("st", "account/user-1"), "AAAA").is_err());
    }

    #[test]
    fn bad_keys_say_what_is_wrong() {
        assert!(LinkKey::from_base64("not base64!")
            .unwrap_err()
            .contains("base64"));
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
        assert!(LinkKey::from_base64(&short)
            .unwrap_err()
            .contains("16 bytes"));
    }
}
