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
use super::{encode, Due, Home, Store, StoreError};
use crate::model::{DeadLetter, DeliveryRecord, ScheduledDelivery};

/// What one replay did.
#[derive(Debug, Clone)]
pub enum Replayed {
    /// Scheduled as a new delivery; the lane can take it straight away.
    Scheduled(Box<Due>),
    /// Replayed before, as this delivery.
    Already(Uuid),
    Missing,
    /// Its records could not be read; nothing of it was written.
    Failed(String),
}

/// Replays each `(dead letter, new delivery)`, due at `now_ms`, in order (a
/// later one sees an earlier one's writes to a shared event). One that
/// cannot be read is reported as failed and the others still go: every read
/// of a replay comes before its writes, so a failure leaves nothing of it.
pub(super) fn replay_all(
    p: &mut Pending<'_>,
    ids: Vec<(Uuid, Uuid)>,
    now_ms: u64,
) -> Vec<Replayed> {
    ids.into_iter()
        .map(|(id, new)| {
            replay(p, id, new, now_ms).unwrap_or_else(|e| {
                tracing::error!(dead_letter = %id, error = %e, "cannot replay a dead letter");
                Replayed::Failed(e.to_string())
            })
        })
        .collect()
}

/// Replays dead letter `id` as delivery `new_delivery`, due at `now_ms`.
fn replay(
    p: &mut Pending<'_>,
    id: Uuid,
    new_delivery: Uuid,
    now_ms: u64,
) -> Result<Replayed, StoreError> {
    let letter_key = keys::dead_letter(id);
    let Some(mut letter) = p.get_json::<DeadLetter>(&letter_key)? else {
        return Ok(Replayed::Missing);
    };
    if let Some(already) = letter.replayed_as {
        return Ok(Replayed::Already(already));
    }
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
    Ok(Replayed::Scheduled(Box::new(Due {
        key,
        entry,
        event: Some(std::sync::Arc::new(event)),
    })))
}

/// Removes dead letter `id`; false if there was none.
pub(super) fn purge(p: &mut Pending<'_>, id: Uuid) -> Result<bool, StoreError> {
    let key = keys::dead_letter(id);
    let found = p.get(&key)?.is_some();
    p.remove(key.to_vec());
    Ok(found)
}

impl Store {
    /// Replays each `(dead letter, new delivery id)` at `now_ms`, in one
    /// durable group; with the commit that made them durable, for handing
    /// the new deliveries to their lanes.
    pub async fn replay(
        &self,
        ids: Vec<(Uuid, Uuid)>,
        now_ms: u64,
    ) -> Result<(Vec<Replayed>, u64), StoreError> {
        self.call(|reply| super::writer::Command::Replay { ids, now_ms, reply })
            .await
    }

    /// Removes a dead letter; false if there was none.
    pub async fn purge(&self, id: Uuid) -> Result<bool, StoreError> {
        self.call(|reply| super::writer::Command::Purge { id, reply })
            .await
    }
}
