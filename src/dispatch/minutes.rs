//! A partner's deliveries and failures per minute over the last hour, on
//! herald's clock: what `GET /v1/partners` shows as `last_hour` and the
//! console's chart draws.
//!
//! Kept in memory by the lane as each outcome is made durable, so it
//! starts empty with the process (the counts since start are in
//! `/metrics`). A minute is counted under a lock held for a few additions:
//! outcomes of one partner are recorded one group commit at a time, so it
//! is not contended.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Minutes kept, the current one included.
pub(crate) const KEPT: usize = 60;
const MINUTE_MS: u64 = 60_000;

/// One minute's counts: `index` is the minute since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Minute {
    pub(crate) index: u64,
    pub(crate) delivered: u64,
    /// Attempts that failed: a retry scheduled, or a dead letter.
    pub(crate) failed: u64,
}

impl Minute {
    pub(crate) fn start_ms(&self) -> u64 {
        self.index * MINUTE_MS
    }
}

#[derive(Default)]
pub(crate) struct PerMinute {
    /// Minutes with something counted, oldest first, none older than
    /// `KEPT` minutes before the newest.
    counted: Mutex<VecDeque<Minute>>,
}

impl PerMinute {
    pub(crate) fn delivered(&self, now_ms: u64) {
        self.count(now_ms, |m| m.delivered += 1);
    }

    pub(crate) fn failed(&self, now_ms: u64) {
        self.count(now_ms, |m| m.failed += 1);
    }

    fn count(&self, now_ms: u64, add: impl FnOnce(&mut Minute)) {
        let index = now_ms / MINUTE_MS;
        let mut counted = self.counted.lock().unwrap_or_else(|e| e.into_inner());
        // Outcomes arrive in clock order but for a clock moved back: such an
        // outcome counts in the newest minute, never re-opens an old one.
        match counted.back_mut() {
            Some(last) if last.index >= index => add(last),
            _ => {
                let mut minute = Minute {
                    index,
                    delivered: 0,
                    failed: 0,
                };
                add(&mut minute);
                counted.push_back(minute);
                while counted
                    .front()
                    .is_some_and(|m| m.index + (KEPT as u64) <= index)
                {
                    counted.pop_front();
                }
            }
        }
    }

    /// The `KEPT` minutes ending with the one `now_ms` is in, oldest
    /// first, minutes with nothing counted at zero.
    pub(crate) fn last_hour(&self, now_ms: u64) -> Vec<Minute> {
        let now = now_ms / MINUTE_MS;
        let first = (now + 1).saturating_sub(KEPT as u64);
        let counted = self.counted.lock().unwrap_or_else(|e| e.into_inner());
        (first..=now)
            .map(|index| {
                counted
                    .iter()
                    .find(|m| m.index == index)
                    .copied()
                    .unwrap_or(Minute {
                        index,
                        delivered: 0,
                        failed: 0,
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000_000; // a minute boundary: 30,000,000 minutes

    #[test]
    fn outcomes_count_in_their_minute_and_the_hour_ends_now() {
        let minutes = PerMinute::default();
        minutes.delivered(T0);
        minutes.delivered(T0 + 59_999);
        minutes.failed(T0 + 30_000);
        minutes.failed(T0 + 60_000);
        let hour = minutes.last_hour(T0 + 90_000);
        assert_eq!(hour.len(), KEPT);
        let last = hour[KEPT - 1];
        assert_eq!(
            (last.start_ms(), last.delivered, last.failed),
            (T0 + 60_000, 0, 1)
        );
        let before = hour[KEPT - 2];
        assert_eq!(
            (before.start_ms(), before.delivered, before.failed),
            (T0, 2, 1)
        );
        assert!(hour[..KEPT - 2]
            .iter()
            .all(|m| m.delivered == 0 && m.failed == 0));
        assert!(hour.windows(2).all(|w| w[1].index == w[0].index + 1));
    }

    #[test]
    fn a_minute_an_hour_old_is_forgotten() {
        let minutes = PerMinute::default();
        minutes.delivered(T0);
        let hour = minutes.last_hour(T0 + 59 * MINUTE_MS);
        assert_eq!(hour[0].delivered, 1, "59 minutes on, still shown");
        let hour = minutes.last_hour(T0 + 60 * MINUTE_MS);
        assert!(hour.iter().all(|m| m.delivered == 0), "an hour on, gone");
        minutes.failed(T0 + 61 * MINUTE_MS);
        assert_eq!(minutes.counted.lock().map(|c| c.len()).ok(), Some(1));
    }

    #[test]
    fn a_clock_moved_back_counts_in_the_newest_minute() {
        let minutes = PerMinute::default();
        minutes.delivered(T0 + MINUTE_MS);
        minutes.delivered(T0);
        let hour = minutes.last_hour(T0 + MINUTE_MS);
        assert_eq!(hour[KEPT - 1].delivered, 2);
        assert_eq!(hour[KEPT - 2].delivered, 0);
    }
}
