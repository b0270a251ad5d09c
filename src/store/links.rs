//! Device links in the store: one record per (partner, device) and an index
//! by device, written through the writer like everything else so a link
//! change is durable before it is answered.
//!
//! The store only keeps what [`crate::links`] hands it: credentials arrive
//! sealed. What this module adds is the generation check that lets a token
//! refresh lose cleanly to an operator's `PUT` made while it ran.

use super::keys;
use super::writer::Pending;
use super::{decode, encode, get_json, Store, StoreError};
use crate::model::StoredLink;

/// A change to one link, applied by the writer.
pub(super) enum LinkChange {
    /// Creates or replaces the link; clears a parked route of the device,
    /// since putting the link again is how on-call says it works now.
    Put(StoredLink),
    Delete {
        partner: String,
        device_id: String,
    },
    /// Stores `0` only if the link is still at `0.generation`.
    Replace(StoredLink),
}

/// Applies `change`; the answer is: created (Put), found (Delete), applied (Replace).
pub(super) fn apply(p: &mut Pending<'_>, change: LinkChange) -> Result<bool, StoreError> {
    match change {
        LinkChange::Put(mut link) => {
            let key = keys::link(&link.partner, &link.device_id);
            let current: Option<StoredLink> = p.get_json(&key)?;
            link.generation = current.as_ref().map_or(0, |c| c.generation) + 1;
            p.put(
                keys::device_link(&link.device_id, &link.partner),
                Vec::new(),
            );
            p.remove(keys::parked(&link.partner, &link.device_id));
            p.put(key, encode(&link));
            Ok(current.is_none())
        }
        LinkChange::Delete { partner, device_id } => {
            let key = keys::link(&partner, &device_id);
            let found = p.get(&key)?.is_some();
            p.remove(key);
            p.remove(keys::device_link(&device_id, &partner));
            Ok(found)
        }
        LinkChange::Replace(mut link) => {
            let key = keys::link(&link.partner, &link.device_id);
            let current: Option<StoredLink> = p.get_json(&key)?;
            match current {
                Some(c) if c.generation == link.generation => {
                    link.generation += 1;
                    p.put(key, encode(&link));
                    Ok(true)
                }
                _ => Ok(false),
            }
        }
    }
}

impl Store {
    /// Creates or replaces a link (its generation is set by the store);
    /// true if it is new.
    pub async fn put_link(&self, link: StoredLink) -> Result<bool, StoreError> {
        self.link_change(LinkChange::Put(link)).await
    }

    /// Removes a link; false if there was none.
    pub async fn delete_link(&self, partner: &str, device_id: &str) -> Result<bool, StoreError> {
        self.link_change(LinkChange::Delete {
            partner: partner.to_string(),
            device_id: device_id.to_string(),
        })
        .await
    }

    /// Stores `link` if the stored one is still at `link.generation`;
    /// false if it changed (or went) meanwhile.
    pub async fn replace_link(&self, link: StoredLink) -> Result<bool, StoreError> {
        self.link_change(LinkChange::Replace(link)).await
    }

    async fn link_change(&self, change: LinkChange) -> Result<bool, StoreError> {
        self.call(|reply| super::writer::Command::Link {
            change: Box::new(change),
            reply,
        })
        .await
    }

    pub fn link(&self, partner: &str, device_id: &str) -> Result<Option<StoredLink>, StoreError> {
        get_json(&self.db()?, &keys::link(partner, device_id))
    }

    /// Up to `limit` links of `partner` in device order, after device
    /// `after` when given: a page of the partner's links.
    pub fn links_page(
        &self,
        partner: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredLink>, StoreError> {
        let prefix = keys::link(partner, "");
        let start = match after {
            // Just past `after`'s key: the next device in byte order.
            Some(device) => {
                let mut k = keys::link(partner, device);
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        for item in self.db()?.range(start..).take(limit) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// The partners `device_id` is linked to, by name.
    pub fn linked_partners(&self, device_id: &str) -> Result<Vec<String>, StoreError> {
        let prefix = keys::device_links_prefix(device_id);
        let mut out = Vec::new();
        for item in self.db()?.scan_prefix(&prefix) {
            let (k, _) = item?;
            let partner = std::str::from_utf8(&k[prefix.len()..])
                .map_err(|e| StoreError::corrupt(&k, e.to_string()))?;
            out.push(partner.to_string());
        }
        Ok(out)
    }
}
