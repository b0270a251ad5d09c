//! When to try a failed delivery again: a pure function of what is persisted.
//!
//! The delay depends only on the policy, the attempt number and the delivery
//! id (which seeds the jitter), so a restart recomputes the same schedule and
//! tests can predict it exactly. Exponential growth from `initial_ms`, capped
//! at `max_interval_ms`, with full jitter between `initial_ms` and that cap
//! (a floor of `initial_ms`, so a failing partner is never retried
//! instantly). A partner's `Retry-After` raises the delay, never lowers it,
//! and is itself clamped to `max_interval_ms`.

use std::time::Duration;

use uuid::Uuid;

use crate::model::Priority;

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub initial_ms: u64,
    pub multiplier: f64,
    pub max_interval_ms: u64,
    /// A normal delivery older than this is dead-lettered instead of retried.
    pub max_age_ms: u64,
    /// The same for a critical delivery, whose only limit it is.
    pub critical_max_age_ms: u64,
    /// Optional cap on real sends of a normal delivery.
    pub max_attempts: Option<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_ms: 1000,
            multiplier: 2.0,
            max_interval_ms: 600_000,
            max_age_ms: 72 * 3600 * 1000,
            critical_max_age_ms: 72 * 3600 * 1000,
            max_attempts: None,
        }
    }
}

/// What happens after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Next {
    RetryAt(u64),
    GiveUp(String),
}

impl RetryPolicy {
    /// The un-jittered ceiling for the delay after `failures` failed sends (≥ 1).
    pub fn ceiling_ms(&self, failures: u32) -> u64 {
        let exponent = failures.saturating_sub(1).min(1024) as i32;
        let grown = self.initial_ms as f64 * self.multiplier.powi(exponent);
        if grown.is_finite() && grown < self.max_interval_ms as f64 {
            (grown as u64).max(self.initial_ms)
        } else {
            self.max_interval_ms
        }
    }

    /// The delay after `failures` failed sends of delivery `id`.
    pub fn delay_ms(&self, id: Uuid, failures: u32) -> u64 {
        let ceiling = self.ceiling_ms(failures);
        let span = ceiling - self.initial_ms.min(ceiling);
        let unit = unit_interval(seed(id, failures));
        self.initial_ms.min(ceiling) + (span as f64 * unit) as u64
    }

    /// Decides the next step after a failed send made at `now_ms`. A
    /// critical delivery ends only by its own max age: a safety alert is
    /// never given up on for having been tried often.
    pub(crate) fn next(
        &self,
        id: Uuid,
        failures: u32,
        created_ms: u64,
        now_ms: u64,
        retry_after: Option<Duration>,
        priority: Priority,
    ) -> Next {
        let critical = priority == Priority::Critical;
        if let (Some(max), false) = (self.max_attempts, critical) {
            if failures >= max {
                return Next::GiveUp(format!(
                    "gave up after {failures} attempts (retry.max_attempts)"
                ));
            }
        }
        let asked = retry_after
            .map(|d| (d.as_millis() as u64).min(self.max_interval_ms))
            .unwrap_or(0);
        let due = now_ms.saturating_add(self.delay_ms(id, failures).max(asked));
        let (max_age_ms, key) = match critical {
            true => (self.critical_max_age_ms, "retry.critical_max_age"),
            false => (self.max_age_ms, "retry.max_age"),
        };
        if due.saturating_sub(created_ms) > max_age_ms {
            return Next::GiveUp(format!(
                "gave up after {failures} attempts: the next one would be past {key} ({})",
                humantime::format_duration(Duration::from_millis(max_age_ms))
            ));
        }
        Next::RetryAt(due)
    }
}

fn seed(id: Uuid, failures: u32) -> u64 {
    let (hi, lo) = id.as_u64_pair();
    splitmix64(hi ^ lo.rotate_left(17) ^ (failures as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A number in [0, 1] from 53 bits of the seed.
fn unit_interval(x: u64) -> f64 {
    (x >> 11) as f64 / ((1u64 << 53) - 1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> impl Strategy<Value = RetryPolicy> {
        (
            1u64..10_000,
            1.0f64..10.0,
            0u64..10_000_000,
            1u64..1_000_000_000,
        )
            .prop_map(|(initial_ms, multiplier, extra, max_age_ms)| RetryPolicy {
                initial_ms,
                multiplier,
                max_interval_ms: initial_ms + extra,
                max_age_ms,
                critical_max_age_ms: max_age_ms,
                max_attempts: None,
            })
    }

    fn uuid() -> impl Strategy<Value = Uuid> {
        any::<u128>().prop_map(Uuid::from_u128)
    }

    proptest! {
        #[test]
        fn delay_stays_within_initial_and_ceiling(p in policy(), id in uuid(), failures in 1u32..200) {
            let d = p.delay_ms(id, failures);
            prop_assert!(d >= p.initial_ms);
            prop_assert!(d <= p.ceiling_ms(failures));
            prop_assert!(d <= p.max_interval_ms);
        }

        #[test]
        fn ceiling_grows_monotonically_up_to_the_cap(p in policy(), failures in 1u32..200) {
            prop_assert!(p.ceiling_ms(failures) <= p.ceiling_ms(failures + 1));
            prop_assert!(p.ceiling_ms(failures) <= p.max_interval_ms);
            prop_assert_eq!(p.ceiling_ms(1), p.initial_ms);
        }

        #[test]
        fn delay_is_a_pure_function(p in policy(), id in uuid(), failures in 1u32..50) {
            prop_assert_eq!(p.delay_ms(id, failures), p.delay_ms(id, failures));
        }

        #[test]
        fn retry_after_is_a_clamped_minimum(p in policy(), id in uuid(), failures in 1u32..50, asked in 0u64..100_000_000) {
            let now = 1_000_000u64;
            let policy = RetryPolicy { max_age_ms: u64::MAX / 4, ..p };
            let Next::RetryAt(due) = policy.next(id, failures, now, now, Some(Duration::from_millis(asked)), Priority::Normal) else {
                return Err(TestCaseError::fail("must retry"));
            };
            prop_assert!(due - now >= asked.min(policy.max_interval_ms));
            prop_assert!(due - now >= policy.delay_ms(id, failures));
            prop_assert!(due - now <= policy.max_interval_ms);
        }

        #[test]
        fn nothing_is_scheduled_past_max_age(p in policy(), id in uuid(), failures in 1u32..50, age in 0u64..2_000_000_000) {
            let created = 10u64;
            match p.next(id, failures, created, created + age, None, Priority::Normal) {
                Next::RetryAt(due) => prop_assert!(due - created <= p.max_age_ms),
                Next::GiveUp(reason) => prop_assert!(reason.contains("max_age")),
            }
        }
    }

    #[test]
    fn jitter_spreads_over_the_range() {
        let p = RetryPolicy {
            initial_ms: 100,
            max_interval_ms: 100_000,
            ..RetryPolicy::default()
        };
        let delays: Vec<u64> = (0..2000u128)
            .map(|i| p.delay_ms(Uuid::from_u128(i * 7919), 8))
            .collect();
        let ceiling = p.ceiling_ms(8);
        assert_eq!(ceiling, 12_800);
        let low = delays
            .iter()
            .filter(|&&d| d < 100 + (ceiling - 100) / 4)
            .count();
        let high = delays
            .iter()
            .filter(|&&d| d > 100 + 3 * (ceiling - 100) / 4)
            .count();
        // Full jitter: each quarter of the range gets about a quarter of the draws.
        assert!((400..600).contains(&low), "low quarter: {low}");
        assert!((400..600).contains(&high), "high quarter: {high}");
    }

    #[test]
    fn max_attempts_gives_up() {
        let p = RetryPolicy {
            max_attempts: Some(3),
            ..RetryPolicy::default()
        };
        assert!(matches!(
            p.next(Uuid::nil(), 2, 0, 0, None, Priority::Normal),
            Next::RetryAt(_)
        ));
        assert!(matches!(
            p.next(Uuid::nil(), 3, 0, 0, None, Priority::Normal),
            Next::GiveUp(_)
        ));
    }

    #[test]
    fn critical_ends_only_by_its_own_max_age() {
        let hour = 3_600_000;
        let p = RetryPolicy {
            max_attempts: Some(3),
            max_age_ms: hour,
            critical_max_age_ms: 72 * hour,
            ..RetryPolicy::default()
        };
        let critical =
            |failures, age| p.next(Uuid::nil(), failures, 0, age, None, Priority::Critical);
        assert!(matches!(critical(500, 24 * hour), Next::RetryAt(_)));
        assert!(matches!(
            p.next(Uuid::nil(), 1, 0, 2 * hour, None, Priority::Normal),
            Next::GiveUp(_)
        ));
        match critical(500, 72 * hour) {
            Next::GiveUp(why) => assert!(why.contains("retry.critical_max_age (3days)"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
