//! The injectable clock.
//!
//! Every place in herald that stamps a time or waits for one (retry
//! schedules, rate limits, partner timeouts, retention) asks a [`Clock`], so
//! tests drive hours of schedule in milliseconds with [`Clock::manual`]
//! instead of sleeping. Times are unix milliseconds (what the store keeps);
//! the rate limiter reads nanoseconds from the same source.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

#[derive(Clone)]
pub struct Clock {
    source: Arc<Source>,
}

enum Source {
    System {
        origin: Instant,
        origin_unix_nanos: u64,
    },
    Manual {
        now_nanos: AtomicU64,
        ticks: watch::Sender<u64>,
    },
}

impl Clock {
    /// The machine's clock: unix time, advancing monotonically from start.
    pub fn system() -> Clock {
        let origin_unix_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Clock::from_source(Source::System {
            origin: Instant::now(),
            origin_unix_nanos,
        })
    }

    /// A clock that stands still until [`Clock::advance`] moves it.
    pub fn manual(start_unix_ms: u64) -> Clock {
        let nanos = start_unix_ms * 1_000_000;
        let (ticks, _) = watch::channel(nanos);
        Clock::from_source(Source::Manual {
            now_nanos: AtomicU64::new(nanos),
            ticks,
        })
    }

    fn from_source(source: Source) -> Clock {
        Clock {
            source: Arc::new(source),
        }
    }

    pub(crate) fn now_nanos(&self) -> u64 {
        match &*self.source {
            Source::System {
                origin,
                origin_unix_nanos,
            } => origin_unix_nanos + origin.elapsed().as_nanos() as u64,
            Source::Manual { now_nanos, .. } => now_nanos.load(Ordering::Acquire),
        }
    }

    /// Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.now_nanos() / 1_000_000
    }

    pub(crate) fn now_system_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.now_nanos())
    }

    /// Moves a manual clock forward and wakes whoever waits on it.
    /// On the system clock it does nothing: real time cannot be pushed.
    pub fn advance(&self, by: Duration) {
        if let Source::Manual { now_nanos, ticks } = &*self.source {
            let now =
                now_nanos.fetch_add(by.as_nanos() as u64, Ordering::AcqRel) + by.as_nanos() as u64;
            ticks.send_replace(now);
        }
    }

    /// Waits until the clock reads `deadline_ms` (unix milliseconds) or later.
    pub(crate) async fn sleep_until_ms(&self, deadline_ms: u64) {
        let deadline_nanos = deadline_ms.saturating_mul(1_000_000);
        self.sleep_until_nanos(deadline_nanos).await
    }

    pub(crate) async fn sleep(&self, d: Duration) {
        let deadline = self.now_nanos().saturating_add(d.as_nanos() as u64);
        self.sleep_until_nanos(deadline).await
    }

    async fn sleep_until_nanos(&self, deadline: u64) {
        match &*self.source {
            Source::System { .. } => {
                let now = self.now_nanos();
                if deadline > now {
                    tokio::time::sleep(Duration::from_nanos(deadline - now)).await;
                }
            }
            Source::Manual { ticks, .. } => {
                let mut rx = ticks.subscribe();
                loop {
                    if *rx.borrow_and_update() >= deadline {
                        return;
                    }
                    if rx.changed().await.is_err() {
                        // The clock is gone with its owner: nothing will ever wake us.
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }
}

/// governor reads the same clock, so a driven clock drives the rate limiters too.
impl governor::clock::Clock for Clock {
    type Instant = governor::nanos::Nanos;

    fn now(&self) -> Self::Instant {
        governor::nanos::Nanos::from(self.now_nanos())
    }
}

/// Unix milliseconds as an RFC 3339 UTC timestamp, as the API shows times.
pub fn rfc3339(unix_ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(unix_ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix_ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times_as_rfc3339() {
        assert_eq!(rfc3339(1_764_050_400_000), "2025-11-25T06:00:00Z");
    }

    #[tokio::test]
    async fn manual_sleepers_wake_only_when_advanced_far_enough() {
        let clock = Clock::manual(1_000);
        let sleeper = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep_until_ms(1_500).await }
        });
        clock.advance(Duration::from_millis(499));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_millis(1));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("woken")
            .expect("task ok");
        assert_eq!(clock.now_ms(), 1_500);
    }
}
