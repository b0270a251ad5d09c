//! What a group commit settled, counted once it is durable: delivery
//! outcomes, latencies, dead letters by reason and replays (see
//! [`crate::telemetry`]), and each partner's last recorded outcome, which
//! `/readyz` reads to tell a stalled dispatcher from an idle one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::model::Priority;
use crate::telemetry::{self, DeadReason, DeliveryOutcome};

enum Counted {
    Outcome(String, DeliveryOutcome),
    Delivered(String, Priority, Duration),
    Dead(String, DeadReason),
    Replayed(String),
    /// The partner's outcome recorded, on herald's clock.
    Progress(String, u64),
}

/// One group's counts, published only if it commits.
#[derive(Default)]
pub(super) struct Tally(Vec<Counted>);

impl Tally {
    /// A delivery of `partner` settled as `outcome` when herald's clock
    /// read `at_ms`.
    pub fn outcome(&mut self, partner: &str, outcome: DeliveryOutcome, at_ms: u64) {
        self.0.push(Counted::Outcome(partner.to_string(), outcome));
        self.0.push(Counted::Progress(partner.to_string(), at_ms));
    }

    /// Delivered `latency` after it was enqueued.
    pub fn delivered(&mut self, partner: &str, priority: Priority, latency: Duration) {
        self.0
            .push(Counted::Delivered(partner.to_string(), priority, latency));
    }

    pub fn dead(&mut self, partner: &str, reason: DeadReason) {
        self.0.push(Counted::Dead(partner.to_string(), reason));
    }

    pub fn replayed(&mut self, partner: &str) {
        self.0.push(Counted::Replayed(partner.to_string()));
    }

    /// How many counts it holds: where [`Tally::truncate`] takes it back to.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Forgets the counts of a request whose changes were taken back.
    pub fn truncate(&mut self, len: usize) {
        self.0.truncate(len);
    }

    /// Publishes the counts of a durable commit.
    pub fn publish(self, progress: &Progress) {
        let mut latest: HashMap<String, u64> = HashMap::new();
        for counted in self.0 {
            match counted {
                Counted::Outcome(partner, outcome) => telemetry::delivery(&partner, outcome),
                Counted::Delivered(partner, priority, latency) => {
                    telemetry::delivered_after(&partner, priority, latency)
                }
                Counted::Dead(partner, reason) => telemetry::dead_letter(&partner, reason),
                Counted::Replayed(partner) => telemetry::replayed(&partner),
                Counted::Progress(partner, at_ms) => {
                    let at = latest.entry(partner).or_default();
                    *at = (*at).max(at_ms);
                }
            }
        }
        if !latest.is_empty() {
            progress.advance(latest);
        }
    }
}

/// Each partner's latest recorded outcome, on herald's clock.
#[derive(Default)]
pub(super) struct Progress(Mutex<HashMap<String, u64>>);

impl Progress {
    fn advance(&self, latest: HashMap<String, u64>) {
        let mut progress = crate::sync::lock(&self.0);
        for (partner, at_ms) in latest {
            let at = progress.entry(partner).or_default();
            *at = (*at).max(at_ms);
        }
    }

    pub fn of(&self, partner: &str) -> Option<u64> {
        crate::sync::lock(&self.0).get(partner).copied()
    }
}

/// The latest group commit that wrote something: when (real time: how
/// recent a proof of writing is, not a schedule), and its error if it
/// failed.
#[derive(Default)]
pub(super) struct LastCommit(Mutex<Option<(std::time::Instant, Option<String>)>>);

impl LastCommit {
    pub fn set(&self, error: Option<String>) {
        *crate::sync::lock(&self.0) = Some((std::time::Instant::now(), error));
    }

    pub fn get(&self) -> Option<(std::time::Instant, Option<String>)> {
        crate::sync::lock(&self.0).clone()
    }
}
