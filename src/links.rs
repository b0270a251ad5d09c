//! Device links: which partner platforms a device is linked into, and the
//! credentials herald presents there on the user's behalf.
//!
//! A link's tokens are someone's access to their home, so they are sealed
//! before they reach the store (AES-256-GCM, key from `HERALD_LINK_KEY` or
//! the variable `[server] link_key_env` names, bound to the partner and
//! device so a sealed blob cannot be moved to another link) and opened only
//! when a delivery needs them. Nothing here logs them; [`Link`]'s `Debug`
//! and every API view leave them out.

use std::fmt;
use std::sync::Arc;

use adapters::{Credentials, LinkView};
use base64::Engine;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::clock::Clock;
use crate::model::StoredLink;
use crate::store::{Store, StoreError};

/// The environment variable holding the link key when the config names none.
pub const DEFAULT_KEY_ENV: &str = "HERALD_LINK_KEY";

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("link credentials need a key: set {DEFAULT_KEY_ENV} (or the variable [server] link_key_env names) to the base64 of 32 random bytes")]
    NoKey,
    #[error("the credentials of link {partner}/{device_id} cannot be opened: {reason}")]
    Unsealable {
        partner: String,
        device_id: String,
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
    pub fn from_base64(text: &str) -> Result<LinkKey, String> {
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

/// A link as herald uses it, credentials opened.
#[derive(Clone)]
pub struct Link {
    pub partner: String,
    pub device_id: String,
    pub external_id: String,
    pub account: Option<String>,
    pub region: Option<String>,
    pub callback_url: Option<String>,
    pub token_url: Option<String>,
    pub credentials: Option<Credentials>,
    pub options: Option<Box<RawValue>>,
    /// The store's count of writes to this link; a new link's is set by
    /// the store (see [`Links::rotate`]).
    pub generation: u64,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("partner", &self.partner)
            .field("device_id", &self.device_id)
            .field("external_id", &self.external_id)
            .field("credentials", &self.credentials)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// What an adapter sees, with the link's own access token.
    pub fn view(&self) -> LinkView<'_> {
        LinkView {
            external_id: &self.external_id,
            account: self.account.as_deref(),
            region: self.region.as_deref(),
            callback_url: self.callback_url.as_deref(),
            token_url: self.token_url.as_deref(),
            access_token: self.credentials.as_ref().map(|c| c.access_token.as_str()),
            options: self.options.as_deref(),
        }
    }
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

    pub fn get(&self, partner: &str, device_id: &str) -> Result<Option<Link>, LinkError> {
        match self.store.link(partner, device_id)? {
            Some(stored) => self.open(stored).map(Some),
            None => Ok(None),
        }
    }

    /// The stored form, for views: no secrets to open.
    pub fn get_stored(
        &self,
        partner: &str,
        device_id: &str,
    ) -> Result<Option<StoredLink>, LinkError> {
        Ok(self.store.link(partner, device_id)?)
    }

    /// Up to `limit` of `partner`'s links after device `after`, stored
    /// form (see [`Store::links_page`]).
    pub fn page_stored(
        &self,
        partner: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredLink>, LinkError> {
        Ok(self.store.links_page(partner, after, limit)?)
    }

    /// Creates or replaces a link; true if it is new. Durable when it returns.
    pub async fn put(&self, link: Link) -> Result<bool, LinkError> {
        let obtained = link
            .credentials
            .as_ref()
            .and_then(|c| c.refresh_token.as_ref())
            .map(|_| self.clock.now_ms());
        let stored = self.seal(link, obtained)?;
        Ok(self.store.put_link(stored).await?)
    }

    pub async fn delete(&self, partner: &str, device_id: &str) -> Result<bool, LinkError> {
        Ok(self.store.delete_link(partner, device_id).await?)
    }

    /// Stores refreshed credentials unless the link changed since
    /// `generation` (a `PUT` meanwhile wins); a refresh token the platform
    /// did not rotate is kept. Durable before it returns, because a rotated
    /// refresh token may be the only one that still works.
    pub async fn rotate(
        &self,
        partner: &str,
        device_id: &str,
        generation: u64,
        fresh: Credentials,
    ) -> Result<bool, LinkError> {
        let Some(stored) = self.store.link(partner, device_id)? else {
            return Ok(false);
        };
        // A refresh token the platform did not rotate keeps its age.
        let obtained = match fresh.refresh_token {
            Some(_) => Some(self.clock.now_ms()),
            None => Some(stored.refresh_obtained_ms()),
        };
        let mut link = self.open(stored)?;
        if link.generation != generation {
            return Ok(false);
        }
        let kept = link.credentials.and_then(|c| c.refresh_token);
        link.credentials = Some(Credentials {
            refresh_token: fresh.refresh_token.or(kept),
            ..fresh
        });
        let stored = self.seal(link, obtained)?;
        Ok(self.store.replace_link(stored).await?)
    }

    fn seal(&self, link: Link, refresh_obtained_ms: Option<u64>) -> Result<StoredLink, LinkError> {
        let expires_at_unix = link.credentials.as_ref().and_then(|c| c.expires_at_unix);
        let sealed_credentials = match link.credentials {
            None => None,
            Some(c) => {
                let key = self.key.as_ref().ok_or(LinkError::NoKey)?;
                let unsealable = |reason: String| LinkError::Unsealable {
                    partner: link.partner.clone(),
                    device_id: link.device_id.clone(),
                    reason,
                };
                let plain = serde_json::to_vec(&SealedCredentials {
                    access_token: c.access_token,
                    refresh_token: c.refresh_token,
                    expires_at_unix: c.expires_at_unix,
                })
                .map_err(|e| unsealable(e.to_string()))?;
                Some(
                    key.seal(&aad(&link.partner, &link.device_id), &plain)
                        .map_err(unsealable)?,
                )
            }
        };
        Ok(StoredLink {
            options: link.options,
            partner: link.partner,
            device_id: link.device_id,
            external_id: link.external_id,
            account: link.account,
            region: link.region,
            callback_url: link.callback_url,
            token_url: link.token_url,
            sealed_credentials,
            expires_at_unix,
            generation: link.generation,
            updated_ms: self.clock.now_ms(),
            refresh_obtained_ms,
        })
    }

    fn open(&self, stored: StoredLink) -> Result<Link, LinkError> {
        let unsealable = |reason: String| LinkError::Unsealable {
            partner: stored.partner.clone(),
            device_id: stored.device_id.clone(),
            reason,
        };
        let credentials = match &stored.sealed_credentials {
            None => None,
            Some(text) => {
                let key = self.key.as_ref().ok_or(LinkError::NoKey)?;
                let plain = key
                    .open(&aad(&stored.partner, &stored.device_id), text)
                    .map_err(unsealable)?;
                let c: SealedCredentials =
                    serde_json::from_slice(&plain).map_err(|e| unsealable(e.to_string()))?;
                Some(Credentials {
                    access_token: c.access_token,
                    refresh_token: c.refresh_token,
                    expires_at_unix: c.expires_at_unix,
                })
            }
        };
        Ok(Link {
            partner: stored.partner,
            device_id: stored.device_id,
            external_id: stored.external_id,
            account: stored.account,
            region: stored.region,
            callback_url: stored.callback_url,
            token_url: stored.token_url,
            credentials,
            options: stored.options,
            generation: stored.generation,
        })
    }
}

/// Binds a sealed blob to its link.
fn aad(partner: &str, device_id: &str) -> Vec<u8> {
    let mut out = b"herald-link\0".to_vec();
    out.extend_from_slice(partner.as_bytes());
    out.push(0);
    out.extend_from_slice(device_id.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> LinkKey {
        LinkKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([7u8; 32])).unwrap()
    }

    #[test]
    fn sealed_credentials_open_only_for_their_link_and_key() {
        let k = key();
        let sealed = k.seal(&aad("st", "lock-1"), b"secret-token").unwrap();
        assert!(!sealed.contains("secret-token"));
        assert_eq!(
            k.open(&aad("st", "lock-1"), &sealed).unwrap(),
            b"secret-token"
        );
        assert!(k.open(&aad("st", "lock-2"), &sealed).is_err());
        let other =
            LinkKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([8u8; 32]))
                .unwrap();
        assert!(other.open(&aad("st", "lock-1"), &sealed).is_err());
        assert!(k.open(&aad("st", "lock-1"), "AAAA").is_err());
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
