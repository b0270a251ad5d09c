//! Dead letters after the fact: replay and purge, applied by the writer.
//!
//! A replay gives the dead letter's event a new delivery to the same
//! partner, scheduled now with a fresh age, and marks the letter with it so
//! the same letter cannot be replayed twice by accident. The letter itself
//! stays: it is the story of what failed. When retention already removed
//! the event record, the letter's copy of it is put back. Replayed
//! deliveries go out in arrival order of the replay, outside any
//! per-device queue.

use uuid::Uuid;

use super::keys::{self, ScheduleKey};
use super::writer::Pending;
use super::{encode, Home, Scheduled, Store, StoreError};
use crate::model::{AuditEntry, DeadLetter, DeliveryRecord, ScheduledDelivery};

/// What one replay did.
#[derive(Debug, Clone)]
pub(crate) enum Replayed {
    /// Scheduled as a new delivery; the lane can take it straight away.
    Scheduled(Scheduled),
    /// Replayed before, as this delivery.
    Already(Uuid),
    Missing,
    /// Its records could not be read; nothing of it was written.
    Failed(String),
}

/// Replays each dead letter as a new delivery due at `now_ms`, in order (a
/// later one sees an earlier one's writes to a shared event). One that
/// cannot be read is reported as failed and the others still go: every read
/// of a replay comes before its writes, so a failure leaves nothing of it.
pub(super) fn replay_all(p: &mut Pending<'_>, ids: Vec<Uuid>, now_ms: u64) -> Vec<Replayed> {
    ids.into_iter()
        .map(|id| {
            replay(p, id, now_ms).unwrap_or_else(|e| {
                tracing::error!(dead_letter = %id, error = %e, "cannot replay a dead letter");
                Replayed::Failed(e.to_string())
            })
        })
        .collect()
}

/// Replays dead letter `id` as a new delivery, due at `now_ms`.
fn replay(p: &mut Pending<'_>, id: Uuid, now_ms: u64) -> Result<Replayed, StoreError> {
    let letter_key = keys::dead_letter(id);
    let Some(mut letter) = p.get_json::<DeadLetter>(&letter_key)? else {
        return Ok(Replayed::Missing);
    };
    if let Some(already) = letter.replayed_as {
        return Ok(Replayed::Already(already));
    }
    let new_delivery = p.new_id(now_ms);
    let (mut event, home) = match p.event(letter.event.id)? {
        Some(found) => found,
        // Collected by retention: the letter kept a copy, stored alone now.
        None => (letter.event.clone(), Home::Alone),
    };
    event.deliveries.push(DeliveryRecord::pending(
        new_delivery,
        letter.partner.clone(),
        now_ms,
    ));
    let key = ScheduleKey {
        partner: letter.partner.clone(),
        priority: event.priority,
        due_ms: now_ms,
        delivery: new_delivery,
    };
    let entry = ScheduledDelivery {
        delivery: new_delivery,
        event: event.id,
        attempts: 0,
        // A fresh age: the replay gets the partner's whole retry window.
        created_ms: now_ms,
        order: None,
        chunk: None,
    };
    p.put(key.encode(), encode(&entry));
    p.moved(&key.partner, key.priority, now_ms, 1);
    p.tally.replayed(&key.partner);
    p.put_event(home, &event);
    letter.replayed_as = Some(new_delivery);
    letter.replayed_ms = Some(now_ms);
    p.put(letter_key.to_vec(), encode(&letter));
    Ok(Replayed::Scheduled(Scheduled {
        partner: key.partner,
        priority: key.priority,
        delivery: new_delivery,
        event: entry.event,
    }))
}

/// Removes the dead letters `ids`, with `audit` (its count set to how
/// many were there) when any was; how many were there.
pub(super) fn purge_all(
    p: &mut Pending<'_>,
    ids: Vec<Uuid>,
    audit: Option<AuditEntry>,
) -> Result<usize, StoreError> {
    let mut found = Vec::with_capacity(ids.len());
    // Every read before any write: a failed read leaves nothing of it.
    for id in ids {
        let key = keys::dead_letter(id);
        if p.get(&key)?.is_some() {
            found.push(key);
        }
    }
    let count = found.len();
    for key in found {
        p.remove(key.to_vec());
    }
    if let (Some(mut entry), true) = (audit, count > 0) {
        entry.count = count as u64;
        super::jobs::put_audit(p, &entry);
    }
    Ok(count)
}

/// The audit entry of a replay that scheduled something, its count set.
pub(super) fn audit_replayed(p: &mut Pending<'_>, done: &[Replayed], audit: Option<AuditEntry>) {
    let count = done
        .iter()
        .filter(|r| matches!(r, Replayed::Scheduled(_)))
        .count();
    if let (Some(mut entry), true) = (audit, count > 0) {
        entry.count = count as u64;
        super::jobs::put_audit(p, &entry);
    }
}

impl Store {
    /// Replays each dead letter as a new delivery due at `now_ms`, in one
    /// durable group, with `audit` (its count set) if any was scheduled.
    pub(crate) async fn replay(
        &self,
        ids: Vec<Uuid>,
        now_ms: u64,
        audit: Option<AuditEntry>,
    ) -> Result<Vec<Replayed>, StoreError> {
        self.call(|reply| super::writer::Command::Replay {
            ids,
            now_ms,
            audit,
            reply,
        })
        .await
    }

    /// Removes dead letters, with `audit` (its count set) if any was
    /// there; how many were.
    pub(crate) async fn purge(
        &self,
        ids: Vec<Uuid>,
        audit: Option<AuditEntry>,
    ) -> Result<usize, StoreError> {
        self.call(|reply| super::writer::Command::Purge { ids, audit, reply })
            .await
    }
}
