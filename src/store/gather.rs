//! How the writer gathers one group commit.
//!
//! Whatever is waiting goes into the group. A group of nothing but outcomes
//! (sends that finished) then waits a little for more: no service waits on
//! an outcome's fsync the way it waits on its 202, and at full load most
//! commits were outcome-only groups of a few dozen, each paying a flush, an
//! fsync and a rewrite of its chunk states. Anything else that arrives (an
//! ingest request, an operator's change, shutdown) ends the wait at once,
//! and so does an outcome something waits on: a per-device ordered delivery
//! (the device's next event goes out only once it settles) or a critical
//! one. An outcome held back is not yet durable, so a crash in that window
//! sends its delivery again: at least once, as always.
//!
//! The wait is on the machine's clock, not herald's injectable one: it only
//! bounds how long a write is held back, it schedules nothing, and a test's
//! stopped clock must not stall the store.

use std::time::Duration;

use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::time::Instant;

use super::writer::Command;
use crate::model::Priority;

/// Most requests applied in one group: bounds the latency of the group's
/// first request and the size of one batch.
const MAX_GROUP: usize = 2048;

/// How long an outcome-only group waits for company.
pub(super) const OUTCOME_LINGER: Duration = Duration::from_millis(2);

/// Outcomes enough for one group: it stops waiting with this many.
const OUTCOME_TARGET: usize = 512;

pub(super) struct Gatherer {
    /// A timer for the wait; the writer runs on a thread of its own.
    timer: tokio::runtime::Runtime,
    linger: Duration,
}

impl Gatherer {
    pub(crate) fn new(linger: Duration) -> std::io::Result<Gatherer> {
        let timer = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        Ok(Gatherer { timer, linger })
    }

    /// The next group; `None` once every sender is gone and nothing is left.
    pub(crate) fn next(&self, rx: &mut mpsc::Receiver<Command>) -> Option<Vec<Command>> {
        let mut group = vec![rx.blocking_recv()?];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(c) => group.push(c),
                Err(_) => break,
            }
        }
        if !group.iter().all(may_wait) {
            return Some(group);
        }
        let deadline = Instant::now() + self.linger;
        let mut gathered: usize = group.iter().map(outcomes).sum();
        while group.len() < MAX_GROUP && gathered < OUTCOME_TARGET {
            let next = match rx.try_recv() {
                Ok(c) => c,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    let waited = self
                        .timer
                        .block_on(async { tokio::time::timeout_at(deadline, rx.recv()).await });
                    match waited {
                        Ok(Some(c)) => c,
                        // Closed, or the deadline passed.
                        Ok(None) | Err(_) => break,
                    }
                }
            };
            let more = may_wait(&next);
            gathered += outcomes(&next);
            group.push(next);
            if !more {
                break;
            }
        }
        Some(group)
    }
}

impl Gatherer {
    /// The next request to arrive within `wait`: `Ok(None)` if none did,
    /// `Err(())` once every sender is gone.
    pub(crate) fn next_within(
        &self,
        rx: &mut mpsc::Receiver<Command>,
        wait: Duration,
    ) -> Result<Option<Command>, ()> {
        let waited = self
            .timer
            .block_on(async { tokio::time::timeout(wait, rx.recv()).await });
        match waited {
            Ok(Some(command)) => Ok(Some(command)),
            Ok(None) => Err(()),
            Err(_) => Ok(None),
        }
    }
}

/// Whether `command` can wait for company: outcomes nobody waits on.
fn may_wait(command: &Command) -> bool {
    match command {
        Command::Record { outcomes, .. } => outcomes
            .iter()
            .all(|o| o.entry.order.is_none() && o.key.priority == Priority::Normal),
        _ => false,
    }
}

fn outcomes(command: &Command) -> usize {
    match command {
        Command::Record { outcomes, .. } => outcomes.len(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc as std_mpsc;

    use tokio::sync::oneshot;
    use uuid::Uuid;

    use super::*;
    use crate::model::{DeviceOrder, ScheduledDelivery};
    use crate::store::keys::ScheduleKey;
    use crate::store::{testing, Next, Outcome};

    fn outcome(priority: Priority, ordered: bool) -> Outcome {
        let delivery = Uuid::now_v7();
        Outcome {
            key: ScheduleKey {
                partner: "acme".into(),
                priority,
                due_ms: 1_000,
                delivery,
            },
            entry: ScheduledDelivery {
                delivery,
                event: Uuid::now_v7(),
                attempts: 0,
                created_ms: 1_000,
                order: ordered.then(|| DeviceOrder {
                    device: "lock-1".into(),
                    seq: 1,
                }),
                chunk: None,
            },
            attempt: testing::delivered_attempt(),
            next: Next::Delivered,
            park: None,
        }
    }

    fn record(priority: Priority, ordered: bool) -> Command {
        Command::Record {
            outcomes: vec![outcome(priority, ordered)],
            reply: oneshot::channel().0,
        }
    }

    fn collect() -> Command {
        Command::Collect {
            cutoff_ms: 0,
            budget: 1,
            from: None,
            reply: oneshot::channel().0,
        }
    }

    fn kinds(group: &[Command]) -> Vec<&'static str> {
        group
            .iter()
            .map(|c| match c {
                Command::Record { .. } => "record",
                Command::Collect { .. } => "collect",
                _ => "other",
            })
            .collect()
    }

    /// Runs `next` on a thread of its own and fails, instead of hanging,
    /// if it has not returned in ten seconds.
    fn gather(
        linger: Duration,
        rx: mpsc::Receiver<Command>,
    ) -> std_mpsc::Receiver<(Option<Vec<Command>>, mpsc::Receiver<Command>)> {
        let (done, result) = std_mpsc::channel();
        std::thread::spawn(move || {
            let mut rx = rx;
            let gatherer = Gatherer::new(linger).expect("timer");
            let group = gatherer.next(&mut rx);
            let _ = done.send((group, rx));
        });
        result
    }

    const HANG: Duration = Duration::from_secs(10);
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn outcomes_others_wait_on_do_not_linger() {
        for (priority, ordered) in [(Priority::Critical, false), (Priority::Normal, true)] {
            let (tx, rx) = mpsc::channel(8);
            tx.try_send(record(priority, ordered)).expect("queued");
            let (group, _) = gather(HOUR, rx).recv_timeout(HANG).expect("no linger");
            assert_eq!(kinds(&group.expect("a group")), ["record"]);
        }
    }

    #[test]
    fn anything_but_an_outcome_ends_the_wait_and_joins_the_group() {
        let (tx, rx) = mpsc::channel(8);
        tx.try_send(record(Priority::Normal, false))
            .expect("queued");
        let result = gather(HOUR, rx);
        tx.try_send(record(Priority::Normal, false))
            .expect("queued");
        tx.try_send(collect()).expect("queued");
        let (group, _) = result.recv_timeout(HANG).expect("the wait ended");
        assert_eq!(
            kinds(&group.expect("a group")),
            ["record", "record", "collect"]
        );
    }

    #[test]
    fn an_outcome_alone_is_committed_once_the_linger_passes() {
        let (tx, rx) = mpsc::channel(8);
        tx.try_send(record(Priority::Normal, false))
            .expect("queued");
        let (group, _) = gather(Duration::from_millis(20), rx)
            .recv_timeout(HANG)
            .expect("the deadline ended the wait");
        assert_eq!(kinds(&group.expect("a group")), ["record"]);
        drop(tx);
    }

    #[test]
    fn a_closed_channel_ends_the_wait_and_then_the_writer() {
        let (tx, rx) = mpsc::channel(8);
        tx.try_send(record(Priority::Normal, false))
            .expect("queued");
        let result = gather(HOUR, rx);
        drop(tx);
        let (group, mut rx) = result.recv_timeout(HANG).expect("the wait ended");
        assert_eq!(kinds(&group.expect("a group")), ["record"]);
        let gatherer = Gatherer::new(HOUR).expect("timer");
        assert!(
            gatherer.next(&mut rx).is_none(),
            "nothing left: the writer stops"
        );
    }

    #[test]
    fn a_full_group_stops_waiting() {
        let (tx, rx) = mpsc::channel(OUTCOME_TARGET + 1);
        for _ in 0..OUTCOME_TARGET {
            tx.try_send(record(Priority::Normal, false))
                .expect("queued");
        }
        let (group, _) = gather(HOUR, rx).recv_timeout(HANG).expect("no linger");
        assert_eq!(group.expect("a group").len(), OUTCOME_TARGET);
        drop(tx);
    }
}
