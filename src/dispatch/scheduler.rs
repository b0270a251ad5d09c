//! The window: the bounded slice of a partner's due work held in memory.
//!
//! The backlog lives on disk in the schedule index; a lane keeps at most
//! `capacity` entries here, critical ones first. An entry taken into the
//! window is "held" until its outcome is written back, so a rescan of the
//! index never hands the same delivery out twice; whatever is held when the
//! process dies is still in the index and is sent again after restart.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::model::Priority;
use crate::store::{Due, Store, StoreError};

/// Deliveries taken from the index and not yet settled, shared with the
/// tasks that send them.
#[derive(Clone, Default)]
pub struct Held(Arc<Mutex<HashSet<Uuid>>>);

impl Held {
    pub fn contains(&self, id: Uuid) -> bool {
        self.lock().contains(&id)
    }

    pub fn release(&self, id: Uuid) {
        self.lock().remove(&id);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<Uuid>> {
        // A panic while holding this lock cannot leave the set inconsistent.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub struct Window {
    partner: String,
    capacity: usize,
    critical: VecDeque<Due>,
    normal: VecDeque<Due>,
    held: Held,
    /// The earliest due time of what is still on disk, as of the last refill.
    next_due_ms: Option<u64>,
}

impl Window {
    pub fn new(partner: &str, capacity: usize, held: Held) -> Window {
        Window {
            partner: partner.to_string(),
            capacity: capacity.max(1),
            critical: VecDeque::new(),
            normal: VecDeque::new(),
            held,
            next_due_ms: None,
        }
    }

    pub fn queued(&self) -> usize {
        self.critical.len() + self.normal.len()
    }

    /// Whether the window wants more from disk: below half full.
    pub fn is_low(&self) -> bool {
        self.queued() <= self.capacity / 2
    }

    pub fn next_due_ms(&self) -> Option<u64> {
        self.next_due_ms
    }

    /// Tops the window up with entries of `priorities` due at `now_ms`, in
    /// that order. Critical work may overfill the window by one capacity:
    /// it must never wait for normal work to drain first.
    pub fn refill(
        &mut self,
        store: &Store,
        now_ms: u64,
        priorities: &[Priority],
    ) -> Result<usize, StoreError> {
        let limit = match priorities {
            [Priority::Critical] => 2 * self.capacity,
            _ => self.capacity,
        };
        let room = limit.saturating_sub(self.queued());
        if room == 0 {
            return Ok(0);
        }
        let held = self.held.clone();
        let (found, next_due) = {
            let set = held.lock();
            store.due(&self.partner, priorities, now_ms, room, &|id| {
                set.contains(&id)
            })?
        };
        self.next_due_ms = next_due;
        let taken = found.len();
        {
            let mut set = held.lock();
            for due in found {
                set.insert(due.key.delivery);
                match due.key.priority {
                    Priority::Critical => self.critical.push_back(due),
                    Priority::Normal => self.normal.push_back(due),
                }
            }
        }
        Ok(taken)
    }

    /// The next delivery to send: critical before normal.
    pub fn pop(&mut self) -> Option<Due> {
        self.critical
            .pop_front()
            .or_else(|| self.normal.pop_front())
    }

    /// Puts a popped entry back at the head of its queue, still held (the
    /// breaker said wait).
    pub fn put_back(&mut self, due: Due) {
        match due.key.priority {
            Priority::Critical => self.critical.push_front(due),
            Priority::Normal => self.normal.push_front(due),
        }
    }

    /// Gives an entry back unsent (shutdown): it stays on disk for next time.
    pub fn unhold(&mut self, due: &Due) {
        self.held.release(due.key.delivery);
    }
}
