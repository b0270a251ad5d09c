//! Bulk replay jobs at work: one task per running job.
//!
//! A job (made by `POST /v1/replays`, kept in the store) takes the dead
//! letters its filter matched when it was made, in the order they died, a
//! batch at a time, no faster than its `rate_per_second` on herald's clock.
//! Each batch's replays and the job's progress are one writer command
//! ([`Store::replay_batch`]), so a job cut off by a crash goes on after its
//! last committed batch at the next start, and no letter is replayed twice.
//! The new deliveries go into the schedule index, due now, and are handed
//! to their lanes as a single replay's are: they pass the partner's rate
//! limit and breaker like any other delivery.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::clock::Clock;
use crate::dispatch::Dispatcher;
use crate::model::{ReplayJob, ReplayJobState};
use crate::store::{JobBatch, Replayed, Store, StoreError};

/// The rate a job gets when none is asked for.
pub const DEFAULT_RATE: u32 = 100;
/// The fastest a job may go: a partner's own limit bounds its sends anyway,
/// this bounds how fast a job fills the schedule.
pub const MAX_RATE: u32 = 10_000;
/// How long a job waits before trying a batch again after the store
/// refused it.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Letters per batch: about ten batches a second, one at least, and a
/// group commit that stays small.
fn batch_size(rate_per_second: u32) -> usize {
    (rate_per_second / 10).clamp(1, 1_000) as usize
}

pub struct ReplayJobs {
    store: Store,
    dispatcher: Arc<Dispatcher>,
    clock: Clock,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl ReplayJobs {
    pub fn new(store: Store, dispatcher: Arc<Dispatcher>, clock: Clock) -> ReplayJobs {
        ReplayJobs {
            store,
            dispatcher,
            clock,
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// Starts a task for every job still running in the store; how many.
    pub fn resume(&self) -> Result<usize, StoreError> {
        let running = self.store.running_replay_jobs()?;
        let count = running.len();
        for job in running {
            tracing::info!(job = %job.id, replayed = job.replayed, matched = job.matched, "resuming a replay job");
            self.run(job);
        }
        Ok(count)
    }

    /// Works `job` in a task of its own until it is done or herald stops.
    pub fn run(&self, job: ReplayJob) {
        let worker = Worker {
            store: self.store.clone(),
            dispatcher: Arc::clone(&self.dispatcher),
            clock: self.clock.clone(),
            stop: self.stop.clone(),
        };
        self.tasks.spawn(worker.work(job));
    }

    /// Stops every job where it is (its last batch committed or not) and
    /// waits for their tasks; the next start resumes them.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

struct Worker {
    store: Store,
    dispatcher: Arc<Dispatcher>,
    clock: Clock,
    stop: CancellationToken,
}

impl Worker {
    /// Waits until `deadline_ms` on herald's clock; false if herald stops first.
    async fn wait_until(&self, deadline_ms: u64) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = self.clock.sleep_until_ms(deadline_ms) => !self.stop.is_cancelled(),
        }
    }

    async fn work(self, job: ReplayJob) {
        let id = job.id;
        let rate = u64::from(job.rate_per_second.clamp(1, MAX_RATE));
        let size = batch_size(job.rate_per_second);
        // As when it was made: a letter of a partner without a lane is not taken.
        let keep = {
            let filter = job.filter.clone();
            let dispatcher = Arc::clone(&self.dispatcher);
            move |d: &crate::model::DeadLetter| {
                d.replayed_as.is_none()
                    && filter.matches(d)
                    && dispatcher.lane(&d.partner).is_some()
            }
        };
        // Paced from where this run starts: a job resumed after a restart
        // does not rush to make up for the time herald was down.
        let started_ms = self.clock.now_ms();
        let mut sent: u64 = 0;
        let mut cursor = job.cursor;
        loop {
            if !self.wait_until(started_ms + sent * 1_000 / rate).await {
                return;
            }
            let page = match job.last {
                Some(last) => self.store.dead_letter_page(cursor, last, size, &keep),
                // There was no dead letter when it was made: nothing to do.
                None => Ok(crate::store::LetterPage {
                    end: true,
                    ..Default::default()
                }),
            };
            let page = match page {
                Ok(page) => page,
                Err(e) => {
                    tracing::error!(job = %id, error = %e, "a replay job cannot read its dead letters; trying again");
                    if !self
                        .wait_until(self.clock.now_ms() + RETRY_AFTER.as_millis() as u64)
                        .await
                    {
                        return;
                    }
                    continue;
                }
            };
            let ids: Vec<Uuid> = page.letters.iter().map(|d| d.id).collect();
            let count = ids.len() as u64;
            let now_ms = self.clock.now_ms();
            match self
                .store
                .replay_batch(JobBatch {
                    job: id,
                    letters: ids,
                    cursor: page.cursor,
                    done: page.end,
                    now_ms,
                })
                .await
            {
                Ok(Some((done, now))) => {
                    let scheduled: Vec<_> = done
                        .into_iter()
                        .filter_map(|r| match r {
                            Replayed::Scheduled(s) => Some(s),
                            _ => None,
                        })
                        .collect();
                    self.dispatcher.due_written(&scheduled);
                    cursor = page.cursor;
                    sent += count;
                    if now.state == ReplayJobState::Done {
                        tracing::info!(job = %id, matched = now.matched, replayed = now.replayed,
                            skipped = now.skipped, "replay job done");
                        return;
                    }
                }
                Ok(None) => {
                    tracing::error!(job = %id, "a replay job's record is gone; it stops");
                    return;
                }
                Err(e) => {
                    if self.stop.is_cancelled() {
                        return;
                    }
                    tracing::warn!(job = %id, error = %e, "a replay job's batch was not written; trying again");
                    if !self
                        .wait_until(self.clock.now_ms() + RETRY_AFTER.as_millis() as u64)
                        .await
                    {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_a_tenth_of_a_second_of_the_rate_within_bounds() {
        assert_eq!(batch_size(1), 1);
        assert_eq!(batch_size(100), 10);
        assert_eq!(batch_size(500), 50);
        assert_eq!(batch_size(MAX_RATE), 1_000);
        assert_eq!(batch_size(u32::MAX), 1_000);
    }
}
