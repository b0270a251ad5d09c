//! The writer's `Record` command: one send's outcome (delivered, retry at
//! T, dead letter, superseded, parked) written back, all of it or none.

use super::chunk;
use super::keys::{self, ScheduleKey};
use super::writer::Pending;
use super::{encode, settle_delivered, Next, Outcome, StoreError};
use crate::model::{Attempt, AttemptLog, DeadLetter, DeliveryState, ScheduledDelivery};
use crate::telemetry::{DeadReason, DeliveryOutcome};

/// Counts a settled delivery's outcome (published if the group commits).
fn count(
    p: &mut Pending<'_>,
    key: &ScheduleKey,
    entry: &ScheduledDelivery,
    attempt: &Attempt,
    next: &Next,
    parks: bool,
) {
    let settled_ms = attempt.at_ms.saturating_add(attempt.latency_ms);
    let outcome = match next {
        Next::Delivered => {
            let waited = settled_ms.saturating_sub(entry.created_ms);
            p.tally.delivered(
                &key.partner,
                key.priority,
                std::time::Duration::from_millis(waited),
            );
            DeliveryOutcome::Delivered
        }
        Next::RetryAt(_) => DeliveryOutcome::Retried,
        Next::Superseded(_) => DeliveryOutcome::Superseded,
        Next::Dead(reason) => {
            let reason = DeadReason::of(reason, attempt.status, parks);
            p.tally.dead(&key.partner, reason);
            DeliveryOutcome::DeadLettered
        }
    };
    p.tally.outcome(&key.partner, outcome, settled_ms);
}

pub(super) fn record(p: &mut Pending<'_>, outcome: Outcome) -> Result<(), StoreError> {
    let Outcome {
        key,
        entry,
        attempt,
        next,
        park,
    } = outcome;
    if let Some(chunk) = entry.chunk {
        // A chunk member: its slot says whether it was settled already.
        let state_key = keys::chunk_state(chunk.id);
        let Some(mut state) = p.chunk_state(&key, chunk.id)? else {
            return Ok(());
        };
        let delivered = (next == Next::Delivered).then_some(&attempt);
        if !state.settle(chunk.slot as usize, delivered) {
            // Already settled (a duplicate report): nothing to move.
            return Ok(());
        }
        p.moved(&key.partner, key.priority, entry.created_ms, -1);
        count(p, &key, &entry, &attempt, &next, park.is_some());
        if !state.any_pending() {
            p.remove(chunk::entry_key(&key, chunk.id));
        }
        if state.live() == 0 {
            p.remove(state_key.to_vec());
        } else {
            p.put(state_key.to_vec(), state.into_bytes());
        }
        if next == Next::Delivered {
            // The slot is the whole record of a first-time success.
            return Ok(());
        }
    } else {
        let schedule_key = key.encode();
        if p.get(&schedule_key)?.is_none() {
            // Already settled (a duplicate report): nothing to move, and a
            // second success must not log its attempt twice or leave a
            // marker behind an event retention already collected.
            return Ok(());
        }
        p.moved(&key.partner, key.priority, entry.created_ms, -1);
        count(p, &key, &entry, &attempt, &next, park.is_some());
        p.remove(schedule_key);
    }
    if let (Some(o), Next::Delivered | Next::Dead(_) | Next::Superseded(_)) = (&entry.order, &next)
    {
        // Settled: the device's next delivery may go.
        p.remove(keys::device_queue(
            &key.partner,
            &o.device,
            o.seq,
            entry.delivery,
        ));
    }
    if let Some(route) = park {
        p.put(
            keys::parked(&route.partner, &route.device_id),
            encode(&route),
        );
    }
    let log_key = keys::attempts(entry.delivery);
    let has_log = entry.attempts > 0;
    if next == Next::Delivered {
        // The event record stays as accepted: a small marker says delivered.
        if has_log {
            let mut log: AttemptLog = p.get_json(&log_key)?.unwrap_or_default();
            log.push(attempt.clone());
            p.put(log_key.to_vec(), encode(&log));
        }
        p.put(keys::delivered(entry.delivery).to_vec(), encode(&attempt));
        return Ok(());
    }
    let Some((mut event, home)) = p.event(entry.event)? else {
        tracing::error!(delivery = %entry.delivery, event = %entry.event, "delivery without its event record; dropped from the schedule");
        return Ok(());
    };
    // The record is rewritten below: let it carry its siblings' successes.
    settle_delivered(&mut event, |key| p.get(key))?;
    let mut log: AttemptLog = if has_log {
        p.get_json(&log_key)?.unwrap_or_default()
    } else {
        AttemptLog::default()
    };
    log.push(attempt.clone());
    let Some(delivery) = event.delivery_mut(entry.delivery) else {
        tracing::error!(delivery = %entry.delivery, "event record lacks this delivery; dropped from the schedule");
        return Ok(());
    };
    // Out of its chunk (if it was in one): the record speaks for it now.
    delivery.chunk = None;
    if let Next::Superseded(by) = next {
        delivery.state = DeliveryState::Superseded;
        delivery.superseded_by = Some(by);
        delivery.next_due_ms = None;
        if has_log {
            p.remove(log_key.to_vec());
        }
        p.put_event(home, &event);
        return Ok(());
    }
    delivery.attempts = attempt.number;
    let attempted_ms = attempt.at_ms;
    delivery.last_attempt = Some(attempt);
    match next {
        // Handled above, without touching the event record.
        Next::Delivered => {}
        // Handled above: nothing was sent.
        Next::Superseded(_) => {}
        Next::RetryAt(due_ms) => {
            delivery.next_due_ms = Some(due_ms);
            p.moved(&key.partner, key.priority, entry.created_ms, 1);
            let retry = ScheduleKey { due_ms, ..key };
            let entry = ScheduledDelivery {
                attempts: entry.attempts + 1,
                chunk: None,
                ..entry
            };
            p.put(retry.encode(), encode(&entry));
            p.put(log_key.to_vec(), encode(&log));
        }
        Next::Dead(reason) => {
            let dead_id = p.new_id(attempted_ms);
            delivery.state = DeliveryState::Dead;
            delivery.next_due_ms = None;
            delivery.dead_letter = Some(dead_id);
            let died_ms = delivery.last_attempt.as_ref().map_or(0, |a| a.at_ms);
            let dead = DeadLetter {
                id: dead_id,
                delivery_id: entry.delivery,
                partner: key.partner.clone(),
                reason,
                died_ms,
                event: event.clone(),
                attempts: log,
                replayed_as: None,
                replayed_ms: None,
            };
            p.put(keys::dead_letter(dead_id).to_vec(), encode(&dead));
            if has_log {
                p.remove(log_key.to_vec());
            }
        }
    }
    p.put_event(home, &event);
    Ok(())
}
