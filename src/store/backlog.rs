//! Queue depth and the oldest undelivered delivery, per partner × priority,
//! kept by the writer as it adds and settles schedule entries: what
//! `herald_queue_depth` and `herald_oldest_undelivered_age_seconds` show,
//! at no cost to a scrape, however long the backlog.
//!
//! The oldest enqueue time needs more than a count: when the oldest entry
//! settles, the next oldest must be known without a scan. Each partner ×
//! priority keeps an ordered multiset of enqueue times (a `BTreeMap` from
//! time to how many entries hold it), so adding, settling and reading the
//! oldest are each O(log n). The times are kept to the second: entries
//! enqueued in the same second share one slot, so the map holds one slot
//! per second of backlog (a day-long outage: 86,400 slots, about 4 MiB
//! per partner at most), not one per delivery, and the heap stays flat
//! however many events an outage queues — the promise `ARCHITECTURE.md`
//! makes of lanes. The age shown is therefore up to a second older than
//! the oldest entry, never younger.
//!
//! A retry keeps its delivery's enqueue time (its age runs from the
//! event's acceptance); a replay starts a fresh one, as the delivery it
//! makes does. Nothing of this is on disk: it is counted from the
//! schedule index once at open, then moved by each durable group commit.
//! That pass costs what `depth.rs` keeps its counts on disk to avoid:
//! about 45 ms per 200,000 deliveries queued in chunks (a warm page cache),
//! so seconds before the first delivery with ten million queued. Kept on
//! disk instead, the enqueue-second counts would add records to every
//! group commit; the pass at open is the price chosen until a restart
//! with such a backlog says otherwise (`herald bench`'s outage scenario
//! measures restart to first delivery).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use super::keys::{self, ScheduleKey};
use super::{chunk, decode, entry_depth, StoreError};
use crate::model::{Priority, ScheduledDelivery};

/// The enqueue time's slot: its second.
fn slot(created_ms: u64) -> u64 {
    created_ms / 1000
}

/// One partner × priority's waiting deliveries.
#[derive(Default, Debug, Clone, PartialEq)]
struct Queue {
    depth: u64,
    /// Enqueue second → how many deliveries enqueued then still wait.
    enqueued: BTreeMap<u64, u64>,
}

impl Queue {
    fn apply(&mut self, second: u64, by: i64) {
        self.depth = self.depth.saturating_add_signed(by);
        let held = self.enqueued.entry(second).or_default();
        *held = held.saturating_add_signed(by);
        if *held == 0 {
            self.enqueued.remove(&second);
        }
    }
}

type Queues = HashMap<String, [Queue; 2]>;

/// Every partner's queues, as the last durable commit left them.
#[derive(Default)]
pub(super) struct Backlog(Mutex<Queues>);

/// One partner × priority as a reader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueView {
    pub depth: u64,
    /// When the oldest waiting delivery was enqueued, to the second (ms).
    pub oldest_ms: Option<u64>,
}

impl Backlog {
    /// Counts the schedule index: every entry (a chunk's pending members
    /// each) under its partner, priority and enqueue time. A standalone
    /// entry that cannot be read counts as enqueued when it was due.
    pub fn count(db: &sled::Db) -> Result<Backlog, StoreError> {
        let mut queues = Queues::new();
        for item in db.scan_prefix([keys::SCHEDULE]) {
            let (k, v) = item?;
            let Some(key) = ScheduleKey::decode(&k) else {
                continue;
            };
            let (n, created_ms) = match chunk::is_chunk(&v) {
                // A chunk's members were enqueued when they were due.
                true => (entry_depth(db, &k, &v), key.due_ms),
                false => match decode::<ScheduledDelivery>(&k, &v) {
                    Ok(entry) => (1, entry.created_ms),
                    Err(_) => (1, key.due_ms),
                },
            };
            if n == 0 {
                continue;
            }
            let queue = &mut queues.entry(key.partner).or_default()[key.priority.rank() as usize];
            queue.apply(slot(created_ms), n as i64);
        }
        Ok(Backlog(Mutex::new(queues)))
    }

    /// Applies a durable commit's moves; each partner × priority whose
    /// depth changed, with its new depth.
    pub fn apply(&self, moves: AgeMoves) -> Vec<(String, Priority, u64)> {
        let mut queues = crate::sync::lock(&self.0);
        let mut changed = Vec::new();
        for (partner, by_priority) in moves.0 {
            let queues = queues.entry(partner.clone()).or_default();
            for (rank, by_second) in by_priority.into_iter().enumerate() {
                if by_second.is_empty() {
                    continue;
                }
                let queue = &mut queues[rank];
                let before = queue.depth;
                for (second, by) in by_second {
                    if by != 0 {
                        queue.apply(second, by);
                    }
                }
                if let (true, Some(priority)) =
                    (queue.depth != before, Priority::from_rank(rank as u8))
                {
                    changed.push((partner.clone(), priority, queue.depth));
                }
            }
        }
        changed
    }

    pub fn view(&self, partner: &str, priority: Priority) -> QueueView {
        let queues = crate::sync::lock(&self.0);
        let Some(queue) = queues.get(partner).map(|q| &q[priority.rank() as usize]) else {
            return QueueView {
                depth: 0,
                oldest_ms: None,
            };
        };
        QueueView {
            depth: queue.depth,
            oldest_ms: queue.enqueued.keys().next().map(|s| s * 1000),
        }
    }
}

/// One group commit's changes to the queues, applied only once durable.
#[derive(Default)]
pub(super) struct AgeMoves(HashMap<String, [BTreeMap<u64, i64>; 2]>);

impl AgeMoves {
    /// `by` deliveries of `partner` × `priority`, enqueued at `created_ms`,
    /// were added (positive) or settled (negative).
    pub fn add(&mut self, partner: &str, priority: Priority, created_ms: u64, by: i64) {
        let by_priority = match self.0.get_mut(partner) {
            Some(found) => found,
            None => self.0.entry(partner.to_string()).or_default(),
        };
        *by_priority[priority.rank() as usize]
            .entry(slot(created_ms))
            .or_default() += by;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_moves_to_the_next_when_it_settles_and_depth_follows() {
        let backlog = Backlog::default();
        let mut moves = AgeMoves::default();
        moves.add("acme", Priority::Critical, 5_400, 1);
        moves.add("acme", Priority::Critical, 5_900, 1);
        moves.add("acme", Priority::Critical, 9_000, 1);
        moves.add("acme", Priority::Normal, 1_000, 1);
        let mut changed = backlog.apply(moves);
        changed.sort_by_key(|c| c.1.rank());
        assert_eq!(
            changed,
            [
                ("acme".to_string(), Priority::Critical, 3),
                ("acme".to_string(), Priority::Normal, 1)
            ]
        );
        let view = backlog.view("acme", Priority::Critical);
        assert_eq!(view.depth, 3);
        assert_eq!(view.oldest_ms, Some(5_000), "to the second");
        // One of the two enqueued in second 5 settles: the second still waits.
        let mut moves = AgeMoves::default();
        moves.add("acme", Priority::Critical, 5_400, -1);
        backlog.apply(moves);
        assert_eq!(
            backlog.view("acme", Priority::Critical).oldest_ms,
            Some(5_000)
        );
        let mut moves = AgeMoves::default();
        moves.add("acme", Priority::Critical, 5_900, -1);
        // Retried: settled and added again under its own enqueue time.
        moves.add("acme", Priority::Critical, 9_000, -1);
        moves.add("acme", Priority::Critical, 9_000, 1);
        assert_eq!(
            backlog.apply(moves),
            [("acme".to_string(), Priority::Critical, 1)]
        );
        assert_eq!(
            backlog.view("acme", Priority::Critical),
            QueueView {
                depth: 1,
                oldest_ms: Some(9_000)
            }
        );
        let mut moves = AgeMoves::default();
        moves.add("acme", Priority::Critical, 9_000, -1);
        backlog.apply(moves);
        assert_eq!(
            backlog.view("acme", Priority::Critical),
            QueueView {
                depth: 0,
                oldest_ms: None
            }
        );
        assert_eq!(backlog.view("acme", Priority::Normal).depth, 1);
        assert_eq!(backlog.view("globex", Priority::Normal).depth, 0);
    }
}
