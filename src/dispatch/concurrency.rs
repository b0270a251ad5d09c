//! Adaptive concurrency: how many sends a partner takes at once, learned.
//!
//! Many partners publish no rate limit; a fixed `max_in_flight` is then
//! either too low (slow) or too high (429s and timeouts as routine). This is
//! an AIMD controller in the spirit of Vector's adaptive request concurrency
//! and TCP Vegas: it watches each answer's round-trip time and back
//! pressure (429, 503, a timeout, a refused connection) and, once per
//! round trip, adds one to the limit while latency stays at its baseline and
//! the limit was actually used, or cuts the limit by 10 % on back pressure
//! or when latency rises more than 10 % over the baseline (the partner is
//! queueing: the limit is past what it serves in parallel). Reacting to the
//! queueing before the partner sheds load is what keeps 429s rare.
//!
//! The baseline is the lowest window mean of the last [`MEMORY`] windows: a
//! limit oscillating around the partner's capacity keeps visiting it, and a
//! partner that really became slower is followed once the old minimum ages
//! out. Pure: every call takes the time, so tests drive it with a simulated
//! partner.

use std::collections::VecDeque;

/// From the partner's config: the bounds the limit moves in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AimdPolicy {
    pub min: usize,
    pub max: usize,
}

/// Cut on back pressure or queueing.
const DECREASE: f64 = 0.9;
/// How far over the baseline a window's mean latency may be before the
/// partner is taken to be queueing.
const RISE: f64 = 1.1;
/// Windows the baseline remembers.
const MEMORY: usize = 32;

#[derive(Debug, Clone)]
pub(crate) struct Aimd {
    policy: AimdPolicy,
    limit: usize,
    /// The last windows' mean latencies; the baseline is their minimum.
    recent_ms: VecDeque<f64>,
    window_start_ms: u64,
    /// Answers to sends made before this (the last change) describe the
    /// old limit: they are left out of the window.
    changed_ms: u64,
    window_sum_ms: f64,
    window_answers: u32,
    back_pressure: bool,
    /// Whether sends reached the limit this window: growing a limit that
    /// is not used would say nothing about the partner.
    limited: bool,
}

impl Aimd {
    pub(crate) fn new(policy: AimdPolicy, now_ms: u64) -> Aimd {
        let min = policy.min.max(1);
        Aimd {
            policy: AimdPolicy {
                min,
                max: policy.max.max(min),
            },
            limit: min,
            recent_ms: VecDeque::with_capacity(MEMORY),
            window_start_ms: now_ms,
            changed_ms: now_ms,
            window_sum_ms: 0.0,
            window_answers: 0,
            back_pressure: false,
            limited: false,
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Told after each send goes out, with the sends now in flight.
    pub(crate) fn sent(&mut self, in_flight: usize) {
        if in_flight >= self.limit {
            self.limited = true;
        }
    }

    /// Told after each answer (or timeout) to a send made at `sent_ms`.
    /// Returns the new limit when it changed.
    pub(crate) fn answered(
        &mut self,
        sent_ms: u64,
        back_pressure: bool,
        now_ms: u64,
    ) -> Option<usize> {
        if sent_ms < self.changed_ms {
            return None;
        }
        self.back_pressure |= back_pressure;
        if !back_pressure {
            self.window_sum_ms += now_ms.saturating_sub(sent_ms) as f64;
            self.window_answers += 1;
        }
        let baseline_ms = self.recent_ms.iter().copied().reduce(f64::min);
        let window_ms = baseline_ms.unwrap_or(0.0).max(1.0);
        // A window is a round trip and a full round of the limit's sends:
        // the queued ones answer last and are the ones that tell.
        let elapsed = now_ms.saturating_sub(self.window_start_ms) as f64;
        let round = self.window_answers as usize >= self.limit;
        if (elapsed < window_ms || !round) && !self.back_pressure {
            return None;
        }
        let before = self.limit;
        let mean =
            (self.window_answers > 0).then(|| self.window_sum_ms / self.window_answers as f64);
        let queueing = matches!((mean, baseline_ms), (Some(m), Some(b)) if m > b * RISE);
        if self.back_pressure || queueing {
            self.limit = ((self.limit as f64 * DECREASE) as usize).max(self.policy.min);
        } else if self.limited && self.limit < self.policy.max {
            self.limit += 1;
        }
        if let Some(mean) = mean {
            if self.recent_ms.len() == MEMORY {
                self.recent_ms.pop_front();
            }
            self.recent_ms.push_back(mean);
        }
        self.window_start_ms = now_ms;
        if self.limit != before {
            self.changed_ms = now_ms;
        }
        self.window_sum_ms = 0.0;
        self.window_answers = 0;
        self.back_pressure = false;
        self.limited = false;
        (self.limit != before).then_some(self.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Reverse;
    use std::collections::{BinaryHeap, VecDeque};

    /// A partner that serves `servers` requests at once in `service_ms`
    /// each, queues a quarter as many more, and answers 429 beyond that. Driven in
    /// virtual time (µs) against the controller; returns (mean limit over
    /// the second half, share of answers that were 429).
    fn simulate(servers: usize, service_ms: u64, requests: usize) -> (f64, f64) {
        let service = service_ms * 1000;
        let mut aimd = Aimd::new(AimdPolicy { min: 1, max: 256 }, 0);
        // (finish time µs, sent at µs, was 429)
        let mut done: BinaryHeap<Reverse<(u64, u64, bool)>> = BinaryHeap::new();
        let mut queue: VecDeque<u64> = VecDeque::new();
        let (mut busy, mut in_flight, mut sent, mut answered, mut rejected) = (0, 0, 0, 0, 0);
        let mut now = 0u64;
        let mut limits = Vec::new();
        while answered < requests {
            while in_flight < aimd.limit() && sent < requests {
                sent += 1;
                in_flight += 1;
                aimd.sent(in_flight);
                if busy < servers {
                    busy += 1;
                    done.push(Reverse((now + service, now, false)));
                } else if queue.len() < (servers / 4).max(1) {
                    queue.push_back(now);
                } else {
                    done.push(Reverse((now + 200, now, true)));
                }
            }
            let Some(Reverse((at, sent_at, was_429))) = done.pop() else {
                break;
            };
            now = at;
            in_flight -= 1;
            answered += 1;
            if was_429 {
                rejected += 1;
            } else if let Some(waiting_since) = queue.pop_front() {
                done.push(Reverse((now + service, waiting_since, false)));
            } else {
                busy -= 1;
            }
            aimd.answered(sent_at / 1000, was_429, now / 1000);
            if answered > requests / 2 {
                limits.push(aimd.limit() as f64);
            }
        }
        let mean = limits.iter().sum::<f64>() / limits.len().max(1) as f64;
        (mean, rejected as f64 / answered as f64)
    }

    #[test]
    fn converges_near_a_hidden_concurrency_limit_with_rare_429s() {
        for (servers, service_ms) in [(4, 20), (16, 10), (40, 5), (100, 8)] {
            let (limit, rate_429) = simulate(servers, service_ms, 60_000);
            let off = (limit - servers as f64).abs() / servers as f64;
            eprintln!(
                "hidden limit {servers}: mean limit {limit:.1}, 429s {:.3} %",
                rate_429 * 100.0
            );
            assert!(
                off <= 0.2,
                "hidden limit {servers}: settled at {limit:.1} ({:.0} % off)",
                off * 100.0
            );
            assert!(
                rate_429 < 0.01,
                "hidden limit {servers}: {:.2} % of answers were 429",
                rate_429 * 100.0
            );
        }
    }

    #[test]
    fn back_pressure_cuts_and_the_bounds_hold() {
        let mut aimd = Aimd::new(AimdPolicy { min: 2, max: 4 }, 0);
        assert_eq!(aimd.limit(), 2);
        for t in 1..100 {
            aimd.sent(aimd.limit());
            aimd.answered(t * 20 - 10, false, t * 20);
        }
        assert_eq!(aimd.limit(), 4, "grows while latency is flat, up to max");
        assert_eq!(aimd.answered(1_990, true, 2_000), Some(3));
        for t in 0..20 {
            aimd.answered(3_000 + t, true, 3_000 + t);
        }
        assert_eq!(aimd.limit(), 2, "never below min");
    }

    #[test]
    fn an_unused_limit_does_not_grow() {
        let mut aimd = Aimd::new(AimdPolicy { min: 1, max: 64 }, 0);
        for t in 1..100 {
            aimd.answered(t * 20 - 10, false, t * 20);
        }
        assert_eq!(aimd.limit(), 1);
    }
}
