//! Device links and their grants in the store, written through the writer
//! like everything else so a link change is durable before it is answered.
//!
//! A link is one record per (partner, device) with an index by device. Its
//! credentials live in its grant (one record per (partner, grant id), see
//! [`crate::model::StoredGrant`]), with an index of the links using each
//! grant: a link's change and its grant's are one atomic change, so a link
//! never points at a grant its index does not know, and the last link to
//! leave a grant removes it.
//!
//! The store only keeps what [`crate::links`] hands it: credentials arrive
//! sealed. What this module adds is the generation check that lets a token
//! refresh lose cleanly to an operator's `PUT` made while it ran.

use super::keys;
use super::writer::Pending;
use super::{decode, encode, get_json, Store, StoreError};
use crate::model::{StoredGrant, StoredLink};

/// A change to links and grants, applied by the writer.
// It travels boxed in the writer's command, so a large variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum LinkChange {
    /// Creates or replaces the link and clears a parked route of the
    /// device, since putting the link again is how on-call says it works
    /// now. With `grant`, the grant's credentials are replaced for all its
    /// links, and their parked routes cleared too (the user linked again);
    /// without, a link of its own grant (no account) is left without
    /// credentials, as its `PUT` said.
    Put {
        link: StoredLink,
        grant: Option<StoredGrant>,
    },
    Delete {
        partner: String,
        device_id: String,
    },
    /// Stores the grant only if it is still at `generation` (a grant not
    /// stored yet is at 0).
    Rotate(StoredGrant),
}

/// What a link change did.
#[derive(Debug, Default)]
pub(crate) struct LinkOutcome {
    /// Put: the link is new. Delete: there was one. Rotate: stored.
    pub applied: bool,
    /// The devices whose parked routes a `Put` cleared.
    pub relinked: Vec<String>,
}

/// Applies `change`.
pub(super) fn apply(p: &mut Pending<'_>, change: LinkChange) -> Result<LinkOutcome, StoreError> {
    match change {
        LinkChange::Put { link, grant } => put(p, link, grant),
        LinkChange::Delete { partner, device_id } => {
            let key = keys::link(&partner, &device_id);
            let current: Option<StoredLink> = p.get_json(&key)?;
            p.remove(key);
            p.remove(keys::device_link(&device_id, &partner));
            if let Some(current) = &current {
                leave_grant(p, &partner, &current.grant(), &device_id)?;
            }
            Ok(LinkOutcome {
                applied: current.is_some(),
                relinked: Vec::new(),
            })
        }
        LinkChange::Rotate(mut grant) => {
            let key = keys::grant(&grant.partner, &grant.grant);
            let current: Option<StoredGrant> = p.get_json(&key)?;
            let stored_generation = current.map_or(0, |c| c.generation);
            let applied = stored_generation == grant.generation;
            if applied {
                grant.generation += 1;
                p.put(key, encode(&grant));
            }
            Ok(LinkOutcome {
                applied,
                relinked: Vec::new(),
            })
        }
    }
}

fn put(
    p: &mut Pending<'_>,
    mut link: StoredLink,
    grant: Option<StoredGrant>,
) -> Result<LinkOutcome, StoreError> {
    let key = keys::link(&link.partner, &link.device_id);
    let current: Option<StoredLink> = p.get_json(&key)?;
    link.generation = current.as_ref().map_or(0, |c| c.generation) + 1;
    let partner = link.partner.clone();
    let device_id = link.device_id.clone();
    let grant_id = link.grant();
    if let Some(current) = &current {
        let left = current.grant();
        if left != grant_id {
            leave_grant(p, &partner, &left, &device_id)?;
        }
    }
    p.put(keys::device_link(&device_id, &partner), Vec::new());
    p.put(
        keys::grant_link(&partner, &grant_id, &device_id),
        Vec::new(),
    );
    p.remove(keys::parked(&partner, &device_id));
    let mut relinked = vec![device_id.clone()];
    let grant_key = keys::grant(&partner, &grant_id);
    match grant {
        Some(mut grant) => {
            let stored: Option<StoredGrant> = p.get_json(&grant_key)?;
            grant.generation = stored.map_or(0, |g| g.generation) + 1;
            p.put(grant_key, encode(&grant));
            // New credentials for the user: every device of theirs works again.
            let prefix = keys::grant_links_prefix(&partner, &grant_id);
            for index_key in p.keys_with_prefix(&prefix)? {
                let other = device_of(&index_key, prefix.len())?;
                if other != device_id {
                    p.remove(keys::parked(&partner, &other));
                    relinked.push(other);
                }
            }
        }
        None if link.account.is_none() => p.remove(grant_key),
        None => {}
    }
    p.put(key, encode(&link));
    Ok(LinkOutcome {
        applied: current.is_none(),
        relinked,
    })
}

/// `device_id` no longer uses `grant`; the grant goes with its last link.
fn leave_grant(
    p: &mut Pending<'_>,
    partner: &str,
    grant: &str,
    device_id: &str,
) -> Result<(), StoreError> {
    p.remove(keys::grant_link(partner, grant, device_id));
    if p.keys_with_prefix(&keys::grant_links_prefix(partner, grant))?
        .is_empty()
    {
        p.remove(keys::grant(partner, grant));
    }
    Ok(())
}

/// The device id at the end of a grant index key.
fn device_of(index_key: &[u8], prefix_len: usize) -> Result<String, StoreError> {
    std::str::from_utf8(&index_key[prefix_len..])
        .map(str::to_string)
        .map_err(|e| StoreError::corrupt(index_key, e.to_string()))
}

impl Store {
    /// Creates or replaces a link (its generation is set by the store) and,
    /// with `grant`, its grant's credentials (see [`LinkChange::Put`]).
    pub(crate) async fn put_link(
        &self,
        link: StoredLink,
        grant: Option<StoredGrant>,
    ) -> Result<LinkOutcome, StoreError> {
        self.link_change(LinkChange::Put { link, grant }).await
    }

    /// Removes a link, and its grant if no other link uses it; false if
    /// there was none.
    pub(crate) async fn delete_link(
        &self,
        partner: &str,
        device_id: &str,
    ) -> Result<bool, StoreError> {
        let outcome = self
            .link_change(LinkChange::Delete {
                partner: partner.to_string(),
                device_id: device_id.to_string(),
            })
            .await?;
        Ok(outcome.applied)
    }

    /// Stores `grant` if the stored one is still at `grant.generation`;
    /// false if it changed (or went) meanwhile.
    pub(crate) async fn rotate_grant(&self, grant: StoredGrant) -> Result<bool, StoreError> {
        let outcome = self.link_change(LinkChange::Rotate(grant)).await?;
        Ok(outcome.applied)
    }

    async fn link_change(&self, change: LinkChange) -> Result<LinkOutcome, StoreError> {
        self.call(|reply| super::writer::Command::Link {
            change: Box::new(change),
            reply,
        })
        .await
    }

    pub(crate) fn link(
        &self,
        partner: &str,
        device_id: &str,
    ) -> Result<Option<StoredLink>, StoreError> {
        get_json(&self.db()?, &keys::link(partner, device_id))
    }

    pub(crate) fn grant(
        &self,
        partner: &str,
        grant: &str,
    ) -> Result<Option<StoredGrant>, StoreError> {
        get_json(&self.db()?, &keys::grant(partner, grant))
    }

    /// Up to `limit` links of `partner` in device order, after device
    /// `after` when given: a page of the partner's links.
    pub(crate) fn links_page(
        &self,
        partner: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredLink>, StoreError> {
        let prefix = keys::link(partner, "");
        let start = after.map(|device| keys::link(partner, device));
        self.page(&prefix, start, limit)
    }

    /// Up to `limit` grants of `partner` in id order, after grant `after`
    /// when given.
    pub(crate) fn grants_page(
        &self,
        partner: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredGrant>, StoreError> {
        let prefix = keys::grants_prefix(partner);
        let start = after.map(|grant| keys::grant(partner, grant));
        self.page(&prefix, start, limit)
    }

    /// Up to `limit` devices whose links use `grant`, in device order.
    pub(crate) fn grant_links(
        &self,
        partner: &str,
        grant: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let prefix = keys::grant_links_prefix(partner, grant);
        let mut out = Vec::new();
        for item in self.db()?.scan_prefix(&prefix).take(limit) {
            let (key, _) = item?;
            out.push(device_of(&key, prefix.len())?);
        }
        Ok(out)
    }

    /// Up to `limit` records under `prefix` in key order, strictly after
    /// key `after` when given.
    fn page<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &[u8],
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<Vec<T>, StoreError> {
        let start = match after {
            // Just past `after`'s key: the next record in byte order.
            Some(mut key) => {
                key.push(0);
                key
            }
            None => prefix.to_vec(),
        };
        let mut out = Vec::new();
        for item in self.db()?.range(start..).take(limit) {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// The partners `device_id` is linked to, by name.
    pub(crate) fn linked_partners(&self, device_id: &str) -> Result<Vec<String>, StoreError> {
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
