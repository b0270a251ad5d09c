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
use crate::store::{Due, DueScan, Store, StoreError};

/// Deliveries taken from the index and not yet settled, shared with the
/// tasks that send them.
#[derive(Clone, Default)]
pub(crate) struct Held(Arc<Mutex<HashSet<Uuid>>>);

impl Held {
    pub(crate) fn contains(&self, id: Uuid) -> bool {
        self.lock().contains(&id)
    }

    pub(crate) fn release(&self, id: Uuid) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<Uuid>> {
        crate::sync::lock(&self.0)
    }
}

/// What the lane's loop knows of its window before it takes work.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Look {
    /// The window is down to half its capacity or less.
    pub low: bool,
    /// The index may hold critical (normal) work the window lacks.
    pub critical_stale: bool,
    pub normal_stale: bool,
    /// Something said critical work was written to the index.
    pub lacks_critical: bool,
    /// A scan of the critical (normal) range is under way.
    pub scanning_critical: bool,
    pub scanning_normal: bool,
}

/// Which ranges of the index the loop starts reading now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Plan {
    pub scan_critical: bool,
    pub scan_normal: bool,
}

impl Plan {
    /// The priorities to start a scan of, critical first.
    pub(crate) fn priorities(self) -> impl Iterator<Item = Priority> {
        [
            (self.scan_critical, Priority::Critical),
            (self.scan_normal, Priority::Normal),
        ]
        .into_iter()
        .filter_map(|(scan, priority)| scan.then_some(priority))
    }
}

/// The window's decision, a pure function of what the loop sees: a window
/// running low reads what may be missing from the index; whatever its
/// level, critical work that was written is read at once, never after the
/// normal work drains. One scan per range at a time.
pub(crate) fn plan(look: Look) -> Plan {
    Plan {
        scan_critical: !look.scanning_critical
            && (look.lacks_critical || (look.low && look.critical_stale)),
        scan_normal: !look.scanning_normal && look.low && look.normal_stale,
    }
}

/// How many deliveries a window of `capacity` may hold when it takes work
/// of `priority`: critical work may overfill it by one capacity, so it
/// never waits for normal work to drain first. The one capacity rule.
pub(crate) fn limit_for(priority: Priority, capacity: usize) -> usize {
    match priority {
        Priority::Critical => 2 * capacity,
        Priority::Normal => capacity,
    }
}

/// What the window knows of one priority's range of the index.
#[derive(Debug, Clone, Copy)]
struct Range {
    /// The earliest due time of what is still on disk, as of the last scan.
    next_due_ms: Option<u64>,
    /// The index may hold due entries the window has not taken, so the
    /// next scan must read it.
    stale: bool,
    /// A scan of this range is under way.
    scanning: bool,
}

pub(crate) struct Window {
    partner: String,
    capacity: usize,
    critical: VecDeque<Due>,
    normal: VecDeque<Due>,
    held: Held,
    /// Per priority (critical, normal): a scan of one runs apart from a
    /// scan of the other.
    ranges: [Range; 2],
}

/// A scan of one priority's range of the index, run on tokio's blocking
/// pool so sends go on while it reads: its result goes back through
/// [`Window::merge`].
pub(crate) struct Scan {
    pub partner: String,
    pub priority: Priority,
    pub now_ms: u64,
    pub room: usize,
    pub held: Held,
}

impl Scan {
    /// Reads the index (blocking).
    pub(crate) fn run(self, store: &Store) -> Result<DueScan, StoreError> {
        store.due(
            &self.partner,
            &[self.priority],
            self.now_ms,
            self.room,
            &|id| self.held.contains(id),
        )
    }
}

impl Window {
    pub(crate) fn new(partner: &str, capacity: usize, held: Held) -> Window {
        Window {
            partner: partner.to_string(),
            capacity: capacity.max(1),
            critical: VecDeque::new(),
            normal: VecDeque::new(),
            held,
            // What is on disk at start has been seen by no one.
            ranges: [Range {
                next_due_ms: None,
                stale: true,
                scanning: false,
            }; 2],
        }
    }

    pub(crate) fn queued(&self) -> usize {
        self.critical.len() + self.normal.len()
    }

    /// Whether the window wants more from disk: below half full.
    pub(crate) fn is_low(&self) -> bool {
        self.queued() <= self.capacity / 2
    }

    /// What the loop's plan is made from, at `now_ms`.
    pub(crate) fn look(&self, now_ms: u64) -> Look {
        Look {
            low: self.is_low(),
            critical_stale: self.is_stale(Priority::Critical, now_ms),
            normal_stale: self.is_stale(Priority::Normal, now_ms),
            lacks_critical: self.lacks_critical(),
            scanning_critical: self.ranges[slot(Priority::Critical)].scanning,
            scanning_normal: self.ranges[slot(Priority::Normal)].scanning,
        }
    }

    /// When the next entry on disk comes due, as of the last scans, in the
    /// ranges no scan is reading now (a scan's end wakes the loop anyway).
    pub(crate) fn next_due_ms(&self) -> Option<u64> {
        self.ranges
            .iter()
            .filter(|r| !r.scanning)
            .filter_map(|r| r.next_due_ms)
            .min()
    }

    /// Whether the index may hold due work of `priority` the window lacks.
    pub(crate) fn is_stale(&self, priority: Priority, now_ms: u64) -> bool {
        let range = &self.ranges[slot(priority)];
        range.stale || range.next_due_ms.is_some_and(|due| due <= now_ms)
    }

    /// Whether the index may hold critical work the window lacks, by what
    /// the window was told (not by due times): the lane scans the critical
    /// range at once for it, however full the window is of normal work.
    pub(crate) fn lacks_critical(&self) -> bool {
        self.ranges[slot(Priority::Critical)].stale
    }

    /// Something was written to the index (an event accepted, a retry come
    /// due, a device's turn come): read it before trusting the window
    /// again. Marked while a scan of the range runs, the range stays stale
    /// after it: the scan may have read the index before the write.
    pub(crate) fn mark_stale(&mut self, priority: Priority) {
        self.ranges[slot(priority)].stale = true;
    }

    /// Starts a scan of `priority`'s range due at `now_ms`, to run apart
    /// from the lane: `None` when the window has no room for that priority.
    pub(crate) fn scan(&mut self, priority: Priority, now_ms: u64) -> Option<Scan> {
        let room = limit_for(priority, self.capacity).saturating_sub(self.queued());
        if room == 0 {
            return None;
        }
        let range = &mut self.ranges[slot(priority)];
        range.scanning = true;
        range.stale = false;
        Some(Scan {
            partner: self.partner.clone(),
            priority,
            now_ms,
            room,
            held: self.held.clone(),
        })
    }

    /// Takes what a scan of `priority` found; how many it took. An entry
    /// taken meanwhile (held already) is not taken twice.
    pub(crate) fn merge(&mut self, priority: Priority, scan: DueScan) -> usize {
        let range = &mut self.ranges[slot(priority)];
        range.scanning = false;
        range.stale |= !scan.exhausted.contains(&priority);
        range.next_due_ms = scan.next_due_ms;
        let mut taken = 0;
        let mut set = self.held.lock();
        for due in scan.found {
            if !set.insert(due.delivery()) {
                continue;
            }
            taken += 1;
            match due.priority() {
                Priority::Critical => self.critical.push_back(due),
                Priority::Normal => self.normal.push_back(due),
            }
        }
        taken
    }

    /// A scan of `priority` failed: its range is looked at again later.
    pub(crate) fn scan_failed(&mut self, priority: Priority) {
        let range = &mut self.ranges[slot(priority)];
        range.scanning = false;
        range.stale = true;
    }

    /// The next delivery to send: critical before normal.
    pub(crate) fn pop(&mut self) -> Option<Due> {
        self.critical
            .pop_front()
            .or_else(|| self.normal.pop_front())
    }

    /// Puts a popped entry back at the head of its queue, still held (the
    /// breaker said wait).
    pub(crate) fn put_back(&mut self, due: Due) {
        match due.priority() {
            Priority::Critical => self.critical.push_front(due),
            Priority::Normal => self.normal.push_front(due),
        }
    }

    /// Takes the first queued entry never tried before, critical first: the
    /// breaker's probe (it stays held).
    pub(crate) fn take_untried(&mut self) -> Option<Due> {
        for queue in [&mut self.critical, &mut self.normal] {
            if let Some(i) = queue.iter().position(|d| d.attempts() == 0) {
                return queue.remove(i);
            }
        }
        None
    }

    /// Takes up to `limit` queued entries that `matches` accepts, critical
    /// first, looking at no more than `look` of each queue: the companions
    /// of a send that carries several deliveries. They stay held. `matches`
    /// may fill in what it looked up (the event) for the entries it keeps.
    pub(crate) fn take_matching(
        &mut self,
        limit: usize,
        look: usize,
        mut matches: impl FnMut(&mut Due) -> bool,
    ) -> Vec<Due> {
        let mut taken = Vec::new();
        for queue in [&mut self.critical, &mut self.normal] {
            let mut i = 0;
            let mut looked = 0;
            while i < queue.len() && looked < look && taken.len() < limit {
                looked += 1;
                if matches(&mut queue[i]) {
                    if let Some(due) = queue.remove(i) {
                        taken.push(due);
                    }
                } else {
                    i += 1;
                }
            }
        }
        taken
    }

    /// Gives an entry back unsent (shutdown): it stays on disk for next time.
    pub(crate) fn unhold(&mut self, due: &Due) {
        self.held.release(due.delivery());
    }
}

fn slot(priority: Priority) -> usize {
    match priority {
        Priority::Critical => 0,
        Priority::Normal => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EventRecord;
    use crate::store::testing::{self, open};

    fn event(priority: Priority) -> EventRecord {
        testing::event("lock-1", priority)
    }

    /// Stores one event; its delivery's id.
    async fn accept(store: &Store, priority: Priority) -> Uuid {
        let mut accepted = store.enqueue(vec![event(priority)]).await.expect("enqueue");
        let a = accepted.pop().expect("one answer");
        a.scheduled.first().expect("scheduled").delivery
    }

    /// A scan of `priority` run to its end, as the lane runs one apart.
    fn scan_now(window: &mut Window, store: &Store, priority: Priority) -> usize {
        let Some(scan) = window.scan(priority, 2_000) else {
            return 0;
        };
        let found = scan.run(store).expect("scan");
        window.merge(priority, found)
    }

    #[tokio::test]
    async fn a_scan_takes_each_delivery_once_and_reads_the_index_to_its_end() {
        let (_dir, store) = open();
        let held = Held::default();
        let mut window = Window::new("acme", 4, held.clone());
        let first = accept(&store, Priority::Normal).await;
        assert!(
            window.is_stale(Priority::Normal, 2_000),
            "nothing scanned yet"
        );
        assert_eq!(scan_now(&mut window, &store, Priority::Normal), 1);
        assert!(held.contains(first));
        assert!(
            !window.is_stale(Priority::Normal, 2_000),
            "the index was read to its end"
        );
        // Scanned again with the first one in the window: not taken twice.
        let second = accept(&store, Priority::Normal).await;
        window.mark_stale(Priority::Normal);
        assert_eq!(scan_now(&mut window, &store, Priority::Normal), 1);
        assert_eq!(window.queued(), 2);
        assert!(held.contains(second));
        let popped = window.pop().expect("due work");
        assert_eq!(popped.delivery(), first, "oldest first");
        assert_eq!(
            popped
                .event(&store)
                .expect("read")
                .map(|e| e.device_id.clone()),
            Some("lock-1".to_string()),
            "its event is read with it or when sent"
        );
    }

    #[tokio::test]
    async fn a_write_while_a_scan_runs_keeps_its_range_stale_after_the_merge() {
        let (_dir, store) = open();
        let mut window = Window::new("acme", 4, Held::default());
        accept(&store, Priority::Normal).await;
        let scan = window.scan(Priority::Normal, 2_000).expect("room");
        assert!(window.look(2_000).scanning_normal);
        let found = scan.run(&store).expect("scan");
        // Written after the scan read the index: the scan did not see it.
        accept(&store, Priority::Normal).await;
        window.mark_stale(Priority::Normal);
        assert_eq!(window.merge(Priority::Normal, found), 1);
        assert!(
            window.is_stale(Priority::Normal, 2_000),
            "read to its end, but written to meanwhile"
        );
        assert_eq!(scan_now(&mut window, &store, Priority::Normal), 1);
        assert!(!window.is_stale(Priority::Normal, 2_000));
        assert_eq!(window.queued(), 2);
    }

    #[tokio::test]
    async fn a_full_window_still_takes_a_second_capacity_of_critical_work() {
        let (_dir, store) = open();
        let mut window = Window::new("acme", 2, Held::default());
        for _ in 0..3 {
            accept(&store, Priority::Normal).await;
        }
        assert_eq!(scan_now(&mut window, &store, Priority::Normal), 2);
        assert!(
            window.is_stale(Priority::Normal, 2_000),
            "one left behind for lack of room"
        );
        assert!(window.scan(Priority::Normal, 2_000).is_none(), "no room");
        let alert = accept(&store, Priority::Critical).await;
        window.mark_stale(Priority::Critical);
        assert!(!window.is_low());
        assert!(window.lacks_critical(), "the lane must scan for it now");
        assert_eq!(scan_now(&mut window, &store, Priority::Critical), 1);
        assert!(!window.lacks_critical());
        assert_eq!(
            window.pop().map(|d| d.delivery()),
            Some(alert),
            "the alert goes first"
        );
    }

    #[tokio::test]
    async fn a_failed_scan_leaves_its_range_to_be_read_again() {
        let (_dir, store) = open();
        let mut window = Window::new("acme", 4, Held::default());
        accept(&store, Priority::Normal).await;
        let _lost = window.scan(Priority::Normal, 2_000).expect("room");
        window.scan_failed(Priority::Normal);
        let look = window.look(2_000);
        assert!(!look.scanning_normal);
        assert!(look.normal_stale);
        assert_eq!(scan_now(&mut window, &store, Priority::Normal), 1);
    }

    #[test]
    fn the_plan_reads_critical_work_at_once_and_normal_work_when_low() {
        // A full window with nothing missing: nothing to read.
        assert_eq!(plan(Look::default()), Plan::default());
        // Full of normal work, but critical work was written.
        let full = Look {
            lacks_critical: true,
            critical_stale: true,
            normal_stale: true,
            ..Look::default()
        };
        assert_eq!(
            plan(full),
            Plan {
                scan_critical: true,
                scan_normal: false
            }
        );
        // Low, normal work behind.
        let low = Look {
            low: true,
            normal_stale: true,
            ..Look::default()
        };
        assert_eq!(
            plan(low),
            Plan {
                scan_critical: false,
                scan_normal: true
            }
        );
        let scanning = Look {
            scanning_normal: true,
            ..low
        };
        assert!(!plan(scanning).scan_normal, "one scan per range at a time");
        // Low with critical work behind too (a retry came due): both, critical first.
        let both = Look {
            critical_stale: true,
            ..low
        };
        assert_eq!(
            plan(both).priorities().collect::<Vec<_>>(),
            [Priority::Critical, Priority::Normal]
        );
        // Full, a critical retry due by time only: waits for the window to run low.
        let retry_due = Look {
            critical_stale: true,
            ..Look::default()
        };
        assert_eq!(plan(retry_due), Plan::default());
        // Low but nothing stale: nothing to read.
        let idle = Look {
            low: true,
            ..Look::default()
        };
        assert_eq!(plan(idle), Plan::default());
    }
}
