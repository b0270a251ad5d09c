//! The circuit breaker: a partner that is down is left alone, not hammered.
//!
//! After `failures` sends in a row that say the partner is unwell (a
//! timeout, a connection error, 408 or 5xx), the lane stops sending. After a
//! cool-down exactly one probe goes out; if it is answered, sending resumes,
//! otherwise the breaker opens again for twice as long (up to a cap).
//! Deliveries held meanwhile stay in the schedule untouched, so the time
//! spent waiting never uses up their retry attempts. A 429 says nothing
//! about health (the rate limiter's business) and a 4xx means the partner
//! is up. The state machine is pure: every call takes the time, so tests
//! drive it with herald's clock.

use std::sync::Mutex;
use std::time::Duration;

/// From the partner's `breaker` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Unhealthy answers in a row that open the breaker.
    pub failures: u32,
    pub cool_down: Duration,
    pub max_cool_down: Duration,
}

/// What one send said about the partner's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Up,
    Down,
    /// 429, or no send happened: says nothing either way.
    Unknown,
}

impl Health {
    /// `None` for a timeout or a connection error.
    pub fn of(status: Option<u16>) -> Health {
        match status {
            None | Some(408) => Health::Down,
            Some(429) => Health::Unknown,
            Some(s) if s >= 500 => Health::Down,
            Some(_) => Health::Up,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

/// Whether the lane may send now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Send,
    /// The one send allowed while half-open.
    Probe,
    /// Not before this time (ms); `None`: until a probe's answer comes back.
    Wait(Option<u64>),
}

#[derive(Debug)]
struct Inner {
    state: State,
    failures_in_a_row: u32,
    cool_down: Duration,
    open_until_ms: u64,
}

#[derive(Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    inner: Mutex<Inner>,
}

/// A change of state, for the log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    /// While open: how long until the next probe.
    pub cool_down: Option<Duration>,
}

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Breaker {
        Breaker {
            inner: Mutex::new(Inner {
                state: State::Closed,
                failures_in_a_row: 0,
                cool_down: policy.cool_down,
                open_until_ms: 0,
            }),
            policy,
        }
    }

    pub fn state(&self) -> State {
        self.lock().state
    }

    /// While open: when the next probe may go (ms).
    pub fn next_probe_ms(&self) -> Option<u64> {
        let inner = self.lock();
        (inner.state == State::Open).then_some(inner.open_until_ms)
    }

    /// Asked before each send.
    pub fn admit(&self, now_ms: u64) -> (Admit, Option<Transition>) {
        let mut inner = self.lock();
        match inner.state {
            State::Closed => (Admit::Send, None),
            State::HalfOpen => (Admit::Wait(None), None),
            State::Open if now_ms < inner.open_until_ms => {
                (Admit::Wait(Some(inner.open_until_ms)), None)
            }
            State::Open => {
                inner.state = State::HalfOpen;
                let t = Transition {
                    from: State::Open,
                    to: State::HalfOpen,
                    cool_down: None,
                };
                (Admit::Probe, Some(t))
            }
        }
    }

    /// A probe that could not go out after all (the lane stopped): let the
    /// next admit send one.
    pub fn probe_abandoned(&self) {
        let mut inner = self.lock();
        if inner.state == State::HalfOpen {
            inner.state = State::Open;
        }
    }

    /// Told after each send with what it said about the partner; `probe`:
    /// this was the send [`Admit::Probe`] allowed.
    pub fn record(&self, health: Health, now_ms: u64, probe: bool) -> Option<Transition> {
        let mut inner = self.lock();
        let from = inner.state;
        match (health, from) {
            // Late answers to sends made before it opened: only an "up" counts.
            (Health::Down | Health::Unknown, State::HalfOpen) if !probe => None,
            (Health::Unknown, State::HalfOpen) => {
                // A 429 to the probe: the partner is there; probe again soon.
                inner.state = State::Open;
                inner.open_until_ms = now_ms + inner.cool_down.as_millis() as u64;
                None
            }
            (Health::Unknown, _) => None,
            (Health::Up, _) => {
                inner.failures_in_a_row = 0;
                inner.cool_down = self.policy.cool_down;
                inner.state = State::Closed;
                (from != State::Closed).then_some(Transition {
                    from,
                    to: State::Closed,
                    cool_down: None,
                })
            }
            (Health::Down, State::Closed) => {
                inner.failures_in_a_row += 1;
                if self.policy.failures == 0 || inner.failures_in_a_row < self.policy.failures {
                    return None;
                }
                Some(open(&mut inner, from, now_ms))
            }
            (Health::Down, State::HalfOpen) => {
                // The probe failed: wait longer next time.
                inner.cool_down = (inner.cool_down * 2).min(self.policy.max_cool_down);
                Some(open(&mut inner, from, now_ms))
            }
            // Sends that were already in flight when it opened.
            (Health::Down, State::Open) => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        crate::sync::lock(&self.inner)
    }
}

fn open(inner: &mut Inner, from: State, now_ms: u64) -> Transition {
    inner.state = State::Open;
    inner.open_until_ms = now_ms + inner.cool_down.as_millis() as u64;
    Transition {
        from,
        to: State::Open,
        cool_down: Some(inner.cool_down),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerPolicy {
            failures: 3,
            cool_down: Duration::from_secs(10),
            max_cool_down: Duration::from_secs(25),
        })
    }

    #[test]
    fn opens_after_the_configured_run_of_failures() {
        let b = breaker();
        assert_eq!(b.record(Health::Down, 0, false), None);
        assert_eq!(b.record(Health::Down, 0, false), None);
        // A success in between resets the run.
        assert_eq!(b.record(Health::Up, 0, false), None);
        assert_eq!(b.record(Health::Down, 0, false), None);
        assert_eq!(b.record(Health::Down, 0, false), None);
        let t = b.record(Health::Down, 1_000, false).expect("opens");
        assert_eq!((t.from, t.to), (State::Closed, State::Open));
        assert_eq!(b.admit(5_000).0, Admit::Wait(Some(11_000)));
    }

    #[test]
    fn one_probe_after_the_cool_down_and_longer_cool_downs_while_it_fails() {
        let b = breaker();
        for _ in 0..3 {
            b.record(Health::Down, 0, false);
        }
        assert_eq!(b.admit(9_999).0, Admit::Wait(Some(10_000)));
        assert_eq!(b.admit(10_000).0, Admit::Probe);
        assert_eq!(b.admit(10_001).0, Admit::Wait(None), "one probe at a time");
        // An older send failing now is not the probe's answer.
        assert_eq!(b.record(Health::Down, 10_100, false), None);
        assert_eq!(b.admit(10_200).0, Admit::Wait(None));
        let t = b.record(Health::Down, 10_500, true).expect("reopens");
        assert_eq!(t.cool_down, Some(Duration::from_secs(20)));
        assert_eq!(b.admit(30_499).0, Admit::Wait(Some(30_500)));
        assert_eq!(b.admit(30_500).0, Admit::Probe);
        let t = b.record(Health::Down, 31_000, true).expect("reopens");
        assert_eq!(t.cool_down, Some(Duration::from_secs(25)), "capped");
        assert_eq!(b.admit(56_000).0, Admit::Probe);
        let t = b.record(Health::Up, 56_100, true).expect("closes");
        assert_eq!((t.from, t.to), (State::HalfOpen, State::Closed));
        assert_eq!(b.admit(56_100).0, Admit::Send);
        // Cool-down starts over after a recovery.
        for _ in 0..3 {
            b.record(Health::Down, 60_000, false);
        }
        assert_eq!(b.admit(60_000).0, Admit::Wait(Some(70_000)));
    }

    #[test]
    fn rate_limits_and_client_errors_are_not_failures() {
        assert_eq!(Health::of(Some(429)), Health::Unknown);
        assert_eq!(Health::of(Some(404)), Health::Up);
        assert_eq!(Health::of(Some(200)), Health::Up);
        assert_eq!(Health::of(Some(503)), Health::Down);
        assert_eq!(Health::of(Some(408)), Health::Down);
        assert_eq!(Health::of(None), Health::Down);
        let b = breaker();
        for _ in 0..10 {
            assert_eq!(b.record(Health::Unknown, 0, false), None);
        }
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn a_late_failure_while_open_changes_nothing() {
        let b = breaker();
        for _ in 0..3 {
            b.record(Health::Down, 0, false);
        }
        assert_eq!(b.record(Health::Down, 5_000, false), None);
        assert_eq!(b.admit(10_000).0, Admit::Probe);
    }
}
