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
pub struct Held(Arc<Mutex<HashSet<Uuid>>>);

impl Held {
    pub fn contains(&self, id: Uuid) -> bool {
        self.lock().contains(&id)
    }

    pub fn release(&self, id: Uuid) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<Uuid>> {
        crate::sync::lock(&self.0)
    }
}

/// What the lane's loop knows of its window before it takes work.
#[derive(Debug, Clone, Copy, Default)]
pub struct Look {
    /// The window is down to half its capacity or less.
    pub low: bool,
    /// The index may hold critical (normal) work the window lacks.
    pub critical_stale: bool,
    pub normal_stale: bool,
    /// Something said critical work was left to the index.
    pub lacks_critical: bool,
    /// The partner wants each device's events in order.
    pub ordered: bool,
    /// A scan of the normal range is running off the loop.
    pub scanning_apart: bool,
}

/// What the loop does about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The priorities to read from the index on the loop, now.
    pub refill: &'static [Priority],
    /// Start a scan of the normal range off the loop.
    pub scan_apart: bool,
}

/// The window's decision, a pure function of what the loop sees: a window
/// running low refills what may be missing (ordered partners read both
/// ranges on the loop, the others read a normal backlog apart, so sends go
/// on meanwhile); whatever its level, critical work the window may lack is
/// read at once, never after the normal work drains.
pub fn plan(look: Look) -> Plan {
    let low = look.low && (look.critical_stale || look.normal_stale);
    let critical_only: &'static [Priority] = &[Priority::Critical];
    let refill: &'static [Priority] = if low && look.ordered {
        &Priority::ALL
    } else if (low && look.critical_stale) || (!low && look.lacks_critical) {
        critical_only
    } else {
        &[]
    };
    Plan {
        refill,
        scan_apart: low && !look.ordered && look.normal_stale && !look.scanning_apart,
    }
}

/// How many deliveries a window of `capacity` may hold when it takes work
/// of `priority`: critical work may overfill it by one capacity, so it
/// never waits for normal work to drain first. The one capacity rule: the
/// window's hand-overs and refills and the lane's inbox all apply it.
pub fn limit_for(priority: Priority, capacity: usize) -> usize {
    match priority {
        Priority::Critical => 2 * capacity,
        Priority::Normal => capacity,
    }
}

pub struct Window {
    partner: String,
    capacity: usize,
    critical: VecDeque<Due>,
    normal: VecDeque<Due>,
    held: Held,
    /// The earliest due time of what is still on disk, as of the last scan.
    /// Per priority (critical, normal): scans of one priority run apart
    /// from scans of the other.
    next_due_ms: [Option<u64>; 2],
    /// Per priority (critical, normal): the index may hold due entries the
    /// window has not taken, so the next refill must scan it.
    stale: [bool; 2],
    /// Partners that keep per-device order scan every time: an entry becomes
    /// sendable when the one before it settles, which nothing hands over.
    always_scan: bool,
    /// The store's visible commit when the latest scan ended: an entry
    /// handed over from a commit up to it may have been found by that scan.
    scanned_through: u64,
    /// A scan of the normal range runs beside the lane (see
    /// [`Window::scan_apart`]); normal hand-overs are left to the index
    /// meanwhile.
    scanning: bool,
}

/// A scan of the normal range that runs off the lane's loop: its result
/// goes back through [`Window::merge`].
pub struct Scan {
    pub partner: String,
    pub now_ms: u64,
    pub room: usize,
    pub held: Held,
}

impl Scan {
    /// Reads the index (blocking), then the store's visible commit.
    pub fn run(self, store: &Store) -> Result<(DueScan, u64), StoreError> {
        let found = store.due(
            &self.partner,
            &[Priority::Normal],
            self.now_ms,
            self.room,
            &|id| self.held.contains(id),
        )?;
        Ok((found, store.visible_commit()))
    }
}

impl Window {
    pub fn new(partner: &str, capacity: usize, held: Held, always_scan: bool) -> Window {
        Window {
            partner: partner.to_string(),
            capacity: capacity.max(1),
            critical: VecDeque::new(),
            normal: VecDeque::new(),
            held,
            next_due_ms: [None; 2],
            // What is on disk at start has been seen by no one.
            stale: [true; 2],
            always_scan,
            scanned_through: 0,
            scanning: false,
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
        self.next_due_ms.iter().flatten().min().copied()
    }

    /// When the next entry of `priority` on disk comes due, as of its last scan.
    pub fn next_due_ms_of(&self, priority: Priority) -> Option<u64> {
        self.next_due_ms[slot(priority)]
    }

    /// Whether the index may hold due work of `priority` the window lacks.
    pub fn is_stale(&self, priority: Priority, now_ms: u64) -> bool {
        self.always_scan
            || self.stale[slot(priority)]
            || self.next_due_ms[slot(priority)].is_some_and(|due| due <= now_ms)
    }

    /// Whether the index may hold critical work the window lacks, by what
    /// the window was told (not by due times): the lane scans the critical
    /// range at once for it, however full the window is of normal work.
    pub fn lacks_critical(&self) -> bool {
        self.stale[slot(Priority::Critical)]
    }

    /// Something was written to the index that was not handed over (a
    /// retry came due, a hand-over found no room): scan before trusting
    /// the window again.
    pub fn mark_stale(&mut self, priority: Priority) {
        self.stale[slot(priority)] = true;
    }

    /// Takes a delivery handed over right after `commit` made it durable,
    /// saving a scan of the index. When a scan may have seen it already, or
    /// there is no room, it is left to the index (and the next scan), and
    /// the answer is false.
    pub fn offer(&mut self, due: Due, commit: u64) -> bool {
        let priority = due.key.priority;
        let mut held = self.held.lock();
        if held.contains(&due.key.delivery) {
            return true;
        }
        let limit = limit_for(priority, self.capacity);
        let scanning = self.scanning && priority == Priority::Normal;
        if scanning || commit <= self.scanned_through || self.queued() >= limit {
            drop(held);
            self.mark_stale(priority);
            return false;
        }
        held.insert(due.key.delivery);
        match priority {
            Priority::Critical => self.critical.push_back(due),
            Priority::Normal => self.normal.push_back(due),
        }
        true
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
        // The limit of the least urgent priority the refill takes.
        let least = match priorities {
            [Priority::Critical] => Priority::Critical,
            _ => Priority::Normal,
        };
        let limit = limit_for(least, self.capacity);
        let room = limit.saturating_sub(self.queued());
        if room == 0 {
            return Ok(0);
        }
        let held = self.held.clone();
        let scan = {
            let set = held.lock();
            store.due(&self.partner, priorities, now_ms, room, &|id| {
                set.contains(&id)
            })?
        };
        Ok(self.merge(priorities, scan, store.visible_commit()))
    }

    /// Starts a refill of the normal range to run apart from the lane (it
    /// reads and decodes up to half a window of events): `None` when the
    /// window has no room. Until [`Window::merge`] takes its result, normal
    /// hand-overs are left to the index; whatever marks the range stale
    /// meanwhile (a refused hand-over, a retry come due) keeps it stale
    /// after the merge.
    pub fn scan_apart(&mut self, now_ms: u64) -> Option<Scan> {
        let room = self.capacity.saturating_sub(self.queued());
        if room == 0 {
            return None;
        }
        self.scanning = true;
        self.stale[slot(Priority::Normal)] = false;
        Some(Scan {
            partner: self.partner.clone(),
            now_ms,
            room,
            held: self.held.clone(),
        })
    }

    /// Takes what a scan of `priorities` found, read up to the store's
    /// visible commit `scanned_through`; how many it took. An entry taken
    /// meanwhile (held already) is not taken twice.
    pub fn merge(&mut self, priorities: &[Priority], scan: DueScan, scanned_through: u64) -> usize {
        // What was marked stale while a scan apart ran stays stale.
        let apart = self.scanning && priorities == [Priority::Normal].as_slice();
        let marked = apart && self.stale[slot(Priority::Normal)];
        self.scanning &= !apart;
        // Scans apart and on the loop may end out of order: never lower it.
        self.scanned_through = self.scanned_through.max(scanned_through);
        for &p in priorities {
            self.stale[slot(p)] = !scan.exhausted.contains(&p) || marked;
        }
        // A scan of both gives one earliest time for both: at worst the
        // other priority is looked at once too early.
        for &p in priorities {
            self.next_due_ms[slot(p)] = scan.next_due_ms;
        }
        let mut taken = 0;
        let mut set = self.held.lock();
        for due in scan.found {
            if !set.insert(due.key.delivery) {
                continue;
            }
            taken += 1;
            match due.key.priority {
                Priority::Critical => self.critical.push_back(due),
                Priority::Normal => self.normal.push_back(due),
            }
        }
        taken
    }

    /// A scan apart failed: its range is looked at again later.
    pub fn scan_failed(&mut self) {
        self.scanning = false;
        self.mark_stale(Priority::Normal);
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

    /// Takes the first queued entry never tried before, critical first: the
    /// breaker's probe (it stays held).
    pub fn take_untried(&mut self) -> Option<Due> {
        for queue in [&mut self.critical, &mut self.normal] {
            if let Some(i) = queue.iter().position(|d| d.entry.attempts == 0) {
                return queue.remove(i);
            }
        }
        None
    }

    /// Takes up to `limit` queued entries that `matches` accepts, critical
    /// first, looking at no more than `look` of each queue: the companions
    /// of a send that carries several deliveries. They stay held. `matches`
    /// may fill in what it looked up (the event) for the entries it keeps.
    pub fn take_matching(
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
    pub fn unhold(&mut self, due: &Due) {
        self.held.release(due.key.delivery);
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

    /// Stores one event; its hand-over and commit number.
    async fn accept(store: &Store, priority: Priority) -> (Due, u64) {
        let mut accepted = store.enqueue(vec![event(priority)]).await.expect("enqueue");
        let a = accepted.pop().expect("one answer");
        (a.scheduled.into_iter().next().expect("scheduled"), a.commit)
    }

    #[tokio::test]
    async fn a_hand_over_is_taken_once_and_spares_a_scan() {
        let (_dir, store) = open();
        let held = Held::default();
        let mut window = Window::new("acme", 4, held.clone(), false);
        let (first, first_commit) = accept(&store, Priority::Normal).await;
        assert!(
            window.is_stale(Priority::Normal, 2_000),
            "nothing scanned yet"
        );

        // The scan finds the first delivery before its hand-over arrives.
        assert_eq!(
            window.refill(&store, 2_000, &Priority::ALL).expect("scan"),
            1
        );
        assert!(
            !window.is_stale(Priority::Normal, 2_000),
            "the index was read to its end"
        );
        assert!(window.offer(first, first_commit), "in the window already");
        assert_eq!(window.queued(), 1, "taken by the scan: not taken twice");

        // Written after the scan: taken from the hand-over, no scan needed.
        let (second, second_commit) = accept(&store, Priority::Normal).await;
        assert!(window.offer(second.clone(), second_commit));
        assert_eq!(window.queued(), 2);
        assert!(held.contains(second.key.delivery));
        assert!(!window.is_stale(Priority::Normal, 2_000));
        assert!(second.event.is_some(), "the event travels with it");
    }

    #[tokio::test]
    async fn a_scan_apart_leaves_normal_hand_overs_to_the_index_and_takes_nothing_twice() {
        let (_dir, store) = open();
        let held = Held::default();
        let mut window = Window::new("acme", 4, held.clone(), false);
        let (first, _) = accept(&store, Priority::Normal).await;
        let scan = window.scan_apart(2_000).expect("room");
        let (found, through) = scan.run(&store).expect("scan");
        assert_eq!(found.found.len(), 1, "the scan reads the index");
        assert_eq!(window.queued(), 0, "nothing is taken before the merge");

        // Written while the scan ran: the scan may or may not have seen it.
        let (second, second_commit) = accept(&store, Priority::Normal).await;
        assert!(!window.offer(second, second_commit), "left to the index");
        // A critical one is another range: it is taken as usual.
        let (alert, alert_commit) = accept(&store, Priority::Critical).await;
        assert!(window.offer(alert, alert_commit));

        assert_eq!(window.merge(&[Priority::Normal], found, through), 1);
        assert!(held.contains(first.key.delivery));
        assert!(
            window.is_stale(Priority::Normal, 2_000),
            "read to its end, but a hand-over was refused meanwhile"
        );

        // A scan that found the first one before it was taken (as one that
        // ran beside a hand-over would): the merge does not take it twice.
        window.scan_apart(2_000).expect("room");
        let blind = Scan {
            partner: "acme".into(),
            now_ms: 2_000,
            room: 4,
            held: Held::default(),
        };
        let (found, through) = blind.run(&store).expect("scan");
        assert!(found
            .found
            .iter()
            .any(|d| d.key.delivery == first.key.delivery));
        assert_eq!(
            window.merge(&[Priority::Normal], found, through),
            1,
            "only the second one"
        );
        assert_eq!(window.queued(), 3, "first, second and the alert, once each");
        assert!(!window.is_stale(Priority::Normal, 2_000));
    }

    #[tokio::test]
    async fn a_hand_over_a_scan_may_have_seen_is_left_to_the_index() {
        let (_dir, store) = open();
        let held = Held::default();
        let mut window = Window::new("acme", 4, held.clone(), false);
        let (due, commit) = accept(&store, Priority::Normal).await;
        // A scan that found it, sent it, and saw it settled: not held any more.
        window.refill(&store, 2_000, &Priority::ALL).expect("scan");
        let taken = window.pop().expect("found by the scan");
        window.unhold(&taken);
        assert!(!window.offer(due, commit), "left to the index");
        assert_eq!(window.queued(), 0, "an old hand-over is not trusted");
        assert!(
            window.is_stale(Priority::Normal, 2_000),
            "the index decides"
        );
    }

    #[tokio::test]
    async fn a_full_window_leaves_hand_overs_to_the_index() {
        let (_dir, store) = open();
        let mut window = Window::new("acme", 2, Held::default(), false);
        window.refill(&store, 2_000, &Priority::ALL).expect("scan");
        let mut taken = Vec::new();
        for _ in 0..3 {
            let (due, commit) = accept(&store, Priority::Normal).await;
            taken.push(window.offer(due, commit));
        }
        assert_eq!(taken, [true, true, false], "no room for the third");
        assert_eq!(window.queued(), 2, "capacity 2");
        assert!(window.is_stale(Priority::Normal, 2_000));
        assert!(!window.is_stale(Priority::Critical, 2_000));
        // Critical work may take a second capacity.
        let (due, commit) = accept(&store, Priority::Critical).await;
        assert!(window.offer(due, commit));
        assert_eq!(
            window.pop().map(|d| d.key.priority),
            Some(Priority::Critical)
        );
    }

    #[tokio::test]
    async fn a_critical_hand_over_a_scan_may_have_seen_says_so_and_a_critical_scan_finds_it() {
        let (_dir, store) = open();
        let mut window = Window::new("acme", 4, Held::default(), false);
        // A window of normal work, far from low enough to refill.
        for _ in 0..3 {
            let (due, commit) = accept(&store, Priority::Normal).await;
            assert!(window.offer(due, commit));
        }
        let (alert, commit) = accept(&store, Priority::Critical).await;
        // A scan ran while the alert's group was being written: the window
        // cannot tell whether it saw the alert, so the hand-over is refused.
        window
            .refill(&store, 2_000, &[Priority::Normal])
            .expect("scan");
        assert!(!window.offer(alert.clone(), commit), "left to the index");
        assert!(!window.is_low(), "normal work would not refill for a while");
        assert!(window.lacks_critical(), "the lane must scan for it now");
        // What the lane does on that answer: scan the critical range now.
        window
            .refill(&store, 2_000, &[Priority::Critical])
            .expect("critical scan");
        assert!(
            !window.lacks_critical(),
            "the critical range was read to its end"
        );
        let next = window.pop().expect("due work");
        assert_eq!(
            next.key.delivery, alert.key.delivery,
            "the alert goes first"
        );
    }

    #[test]
    fn the_plan_reads_critical_work_at_once_and_a_normal_backlog_apart() {
        let nothing: &[Priority] = &[];
        let critical: &[Priority] = &[Priority::Critical];
        // A full window with nothing missing: nothing to read.
        assert_eq!(plan(Look::default()).refill, nothing);
        // Full of normal work, but critical work was left to the index.
        let full = Look {
            lacks_critical: true,
            normal_stale: true,
            ..Look::default()
        };
        assert_eq!(
            plan(full),
            Plan {
                refill: critical,
                scan_apart: false
            }
        );
        // Low, normal work behind: read apart, once.
        let low = Look {
            low: true,
            normal_stale: true,
            ..Look::default()
        };
        assert_eq!(
            plan(low),
            Plan {
                refill: nothing,
                scan_apart: true
            }
        );
        let scanning = Look {
            scanning_apart: true,
            ..low
        };
        assert!(!plan(scanning).scan_apart, "one scan apart at a time");
        // Low with critical work behind too: critical on the loop now.
        let both = Look {
            critical_stale: true,
            ..low
        };
        assert_eq!(
            plan(both),
            Plan {
                refill: critical,
                scan_apart: true
            }
        );
        // An ordered partner reads both ranges on the loop, never apart.
        let ordered = Look {
            ordered: true,
            ..both
        };
        assert_eq!(
            plan(ordered),
            Plan {
                refill: &Priority::ALL,
                scan_apart: false
            }
        );
        // Low but nothing stale: nothing to read.
        let idle = Look {
            low: true,
            ..Look::default()
        };
        assert_eq!(
            plan(idle),
            Plan {
                refill: nothing,
                scan_apart: false
            }
        );
    }
}
