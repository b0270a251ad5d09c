//! The writer's `Collect` command: retention's removal of finished events,
//! stored alone or in pages, with what only they kept alive.

use uuid::Uuid;

use super::chunk;
use super::event_format;
use super::event_page::{self, Page};
use super::keys::{self};
use super::writer::Pending;
use super::{settle_delivered, CollectFrom, Collected, StoreError};
use crate::model::{DeliveryState, EventRecord};

/// Removes finished events received before `cutoff_ms`, looking at about
/// `budget` events: first those stored alone, in id order, then the pages.
pub(super) fn collect(
    p: &mut Pending<'_>,
    cutoff_ms: u64,
    budget: usize,
    from: Option<CollectFrom>,
) -> Result<Collected, StoreError> {
    let mut done = Collected::default();
    let pages_after = match from {
        Some(CollectFrom::Pages(after)) => Some(after),
        alone => {
            let after = match alone {
                Some(CollectFrom::Alone(id)) => Some(id),
                _ => None,
            };
            if !collect_alone(p, cutoff_ms, budget, after, &mut done)? {
                return Ok(done);
            }
            None
        }
    };
    collect_pages(p, cutoff_ms, budget, pages_after, &mut done)?;
    Ok(done)
}

/// Collects among events stored alone (`e`): true once past the last one
/// old enough, false when the budget ran out first (`done` says where to
/// go on).
fn collect_alone(
    p: &mut Pending<'_>,
    cutoff_ms: u64,
    budget: usize,
    after: Option<Uuid>,
    done: &mut Collected,
) -> Result<bool, StoreError> {
    let mut looked = 0;
    for item in p.db.range(keys::ids_after(keys::EVENT, after)) {
        let (k, v) = item?;
        if let Some(mut event) = unless_corrupt(event_format::decode(&k, &v))? {
            if event.received_ms >= cutoff_ms {
                // Those after it are younger still; pages hold only later ids.
                break;
            }
            let settled = unless_corrupt(settle_delivered(&mut event, |key| p.get(key)))?;
            if settled.is_some() && event.is_finished() {
                p.remove(k.to_vec());
                forget(p, &event)?;
                done.removed += 1;
            }
        }
        looked += 1;
        if looked >= budget {
            done.resume = keys::id_of(&k).map(CollectFrom::Alone);
            return Ok(false);
        }
    }
    Ok(true)
}

/// Collects among the pages (`b`): a page goes when all its events do, and
/// is rewritten without those that went before that. A page holding an
/// event received at or after the cutoff ends the pass.
fn collect_pages(
    p: &mut Pending<'_>,
    cutoff_ms: u64,
    budget: usize,
    after: Option<Uuid>,
    done: &mut Collected,
) -> Result<(), StoreError> {
    let mut looked = 0;
    for item in p.db.range(keys::ids_after(keys::EVENT_PAGE, after)) {
        let (key, _) = item?;
        // Read through the overlay: an earlier request may have rewritten it.
        let Some(value) = p.get(&key)? else {
            continue;
        };
        let Some(page) = unless_corrupt(Page::parse(&key, &value))? else {
            looked += 1;
            continue;
        };
        // Each event as it stands and settled; `None`: unreadable, so kept.
        let mut events = Vec::with_capacity(page.len());
        for i in 0..page.len() {
            let rewritten = keys::rewritten(page.id(i));
            let read = match p.get(&rewritten)? {
                Some(v) => event_format::decode(&rewritten, &v).map(|e| (e, true)),
                None => page.record(i).map(|e| (e, false)),
            };
            let Some((mut event, was_rewritten)) = unless_corrupt(read)? else {
                events.push(None);
                continue;
            };
            if event.received_ms >= cutoff_ms {
                return Ok(());
            }
            let settled = unless_corrupt(settle_delivered(&mut event, |key| p.get(key)))?;
            events.push(settled.map(|()| (event, was_rewritten)));
        }
        let (going, kept): (Vec<_>, Vec<_>) = events
            .into_iter()
            .enumerate()
            .partition(|(_, found)| found.as_ref().is_some_and(|(e, _)| e.is_finished()));
        // What the page keeps is read before anything goes: a page that
        // cannot be cut is left whole.
        let records = (!going.is_empty()).then(|| {
            kept.iter()
                .map(|&(i, _)| page.raw(i).map(|raw| (page.id(i), raw)))
                .collect::<Result<Vec<_>, _>>()
        });
        if let Some(records) = unless_corrupt(records.transpose())?.flatten() {
            for (event, was_rewritten) in going.into_iter().filter_map(|(_, found)| found) {
                if was_rewritten {
                    p.remove(keys::rewritten(event.id).to_vec());
                }
                forget(p, &event)?;
                done.removed += 1;
            }
            match records.is_empty() {
                true => p.remove(key.to_vec()),
                // Same key: the events it keeps still sort after it.
                false => p.put(key.to_vec(), event_page::encode(records.into_iter())),
            }
        }
        looked += page.len();
        if looked >= budget {
            done.resume = page.last_id().map(CollectFrom::Pages);
            return Ok(());
        }
    }
    Ok(())
}

/// A record retention cannot read stays where it is (its reads report it
/// to on-call): the pass goes on past it instead of stopping there for
/// good, and the store's disk with it.
fn unless_corrupt<T>(read: Result<T, StoreError>) -> Result<Option<T>, StoreError> {
    match read {
        Ok(value) => Ok(Some(value)),
        Err(e @ StoreError::Corrupt { .. }) => {
            tracing::error!(error = %e, "retention passed over an unreadable record");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// What a collected event leaves behind besides its record: its
/// idempotency key, what marks its deliveries delivered, the latest-state
/// pointers that still name it.
fn forget(p: &mut Pending<'_>, event: &EventRecord) -> Result<(), StoreError> {
    if let Some(key) = &event.idempotency_key {
        p.remove(keys::idempotency(key));
    }
    for d in &event.deliveries {
        match (d.state, d.chunk) {
            // Delivered from its chunk: one reader fewer of the chunk's state.
            (DeliveryState::Delivered, Some(c)) => forget_member(p, c.id)?,
            (DeliveryState::Delivered, None) => {
                p.remove(keys::delivered(d.id).to_vec());
                if d.attempts > 1 {
                    p.remove(keys::attempts(d.id).to_vec());
                }
            }
            _ => {}
        }
        if let Some(state) = &d.coalesce {
            // Still naming this finished delivery: nothing to compare with any more.
            let latest = keys::latest_state(&d.partner, &event.device_id, state);
            if p.get(&latest)?.as_deref() == Some(d.id.as_bytes().as_slice()) {
                p.remove(latest);
            }
        }
    }
    Ok(())
}

/// A delivered member's event was collected: its chunk's state has one
/// reader fewer, and goes with the last.
fn forget_member(p: &mut Pending<'_>, chunk: Uuid) -> Result<(), StoreError> {
    let key = keys::chunk_state(chunk);
    let Some(bytes) = p.get(&key)? else {
        return Ok(());
    };
    let mut state = chunk::State::from_bytes(&key, bytes)?;
    state.forget_one();
    if state.live() == 0 {
        p.remove(key.to_vec());
    } else {
        p.put(key.to_vec(), state.into_bytes());
    }
    Ok(())
}
