//! The circuit breaker: a partner that is down is left alone, not hammered.
//!
//! It judges the partner, not one event. When `failures` different
//! deliveries in a row fail in a way that says the partner is unwell (a
//! timeout, a connection error, 408 or 5xx), the lane stops sending. After a
//! cool-down one probe goes out; if it is answered, sending resumes,
//! otherwise the breaker opens again for twice as long (up to a cap).
//! Deliveries held meanwhile stay in the schedule untouched, so the time
//! spent waiting never uses up their retry attempts. A 429 says nothing
//! about health (the rate limiter's business) and a 4xx means the partner
//! is up.
//!
//! What counts toward the run, and why:
//!
//! - **A delivery's first try only.** A failure counts when the send carried
//!   a delivery never tried before; a retry failing again adds nothing. Its
//!   first failure counted already, and what makes it fail again may be the
//!   event itself (a type the partner refuses, a payload it chokes on):
//!   that is its retry policy's business, which spaces its tries out and
//!   ends it as a dead letter. Counted, the retries of one refused type
//!   (each a different delivery, more of them the longer it goes on) made
//!   runs by themselves and held every other type behind them. "Tried" is
//!   the attempt count stored with the delivery, so it needs no memory of
//!   ids and reads the same after a restart.
//! - **A failure nothing contradicts.** An answer that says the partner is
//!   up (2xx, 4xx) from any delivery ends the run, and a send that was out
//!   while such an answer came back does not count when it fails: the
//!   partner was up meanwhile. Of a burst of concurrent sends, the refused
//!   ones, answered last or timing out, do not add up while the rest are
//!   taken.
//! - **A run, not a rate.** A failure rate over a window with a minimum of
//!   sends was the alternative. Its window of earlier successes keeps it
//!   closed for a while after the partner truly goes down (half the window,
//!   with steady traffic), every send meanwhile spending an attempt, and a
//!   backlog of retries weighs in it however they are deduplicated. The run
//!   opens after `failures` sends as before when the partner is down: the
//!   deliveries an outage holds were never tried, so they count.
//!
//! The probe carries a delivery never tried before when the lane's window
//! holds one: a refused event as the probe would keep shut a partner that
//! answers everything else, and double the wait each time. A failed probe
//! of a delivery tried before reopens the breaker for the same cool-down,
//! not twice as long: it says nothing new. Any answer saying the partner
//! is up closes it, whichever delivery it came from.
//!
//! What it deliberately does not do: read event types or keep state per
//! type or per delivery. A type that is most of a partner's traffic and
//! always fails can still make a run (`failures` first tries of it with no
//! other answer between) and open it; the probe then most likely carries
//! another type and closes it after one cool-down. Retries alone never open
//! it: a partner that goes down while only retries are due gets each of
//! them on its own backoff, until first tries fail too.
//!
//! The state machine is pure: every call takes the time, so tests drive it
//! with herald's clock.

use std::sync::Mutex;
use std::time::Duration;

/// From the partner's `breaker` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Deliveries failing their first try in a row that open the breaker.
    pub failures: u32,
    pub cool_down: Duration,
    pub max_cool_down: Duration,
}

/// What one send said about the partner's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    Up,
    Down,
    /// 429, or no send happened: says nothing either way.
    Unknown,
}

impl Health {
    /// `None` for a timeout or a connection error.
    pub(crate) fn of(status: Option<u16>) -> Health {
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
pub(crate) enum State {
    Closed,
    Open,
    HalfOpen,
}

/// One send's answer, as the breaker weighs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Answer {
    pub health: Health,
    /// When the send went out (ms).
    pub sent_ms: u64,
    /// Whether it carried a delivery never tried before.
    pub first_try: bool,
}

/// Whether the lane may send now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    Send,
    /// The one send allowed while half-open.
    Probe,
    /// Not before this time (ms); `None`: until a probe's answer comes back.
    Wait(Option<u64>),
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// First tries failed since the last answer that said the partner is up.
    failures_in_a_row: u32,
    cool_down: Duration,
    open_until_ms: u64,
    /// When an answer last said the partner is up (ms).
    up_at_ms: Option<u64>,
}

#[derive(Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    inner: Mutex<Inner>,
}

/// A change of state, for the log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transition {
    pub from: State,
    pub to: State,
    /// While open: how long until the next probe.
    pub cool_down: Option<Duration>,
}

impl Breaker {
    pub(crate) fn new(policy: BreakerPolicy) -> Breaker {
        Breaker {
            inner: Mutex::new(Inner {
                state: State::Closed,
                failures_in_a_row: 0,
                cool_down: policy.cool_down,
                open_until_ms: 0,
                up_at_ms: None,
            }),
            policy,
        }
    }

    pub(crate) fn state(&self) -> State {
        self.lock().state
    }

    /// While open: when the next probe may go (ms).
    pub(crate) fn next_probe_ms(&self) -> Option<u64> {
        let inner = self.lock();
        (inner.state == State::Open).then_some(inner.open_until_ms)
    }

    /// Asked before each send.
    pub(crate) fn admit(&self, now_ms: u64) -> (Admit, Option<Transition>) {
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
    pub(crate) fn probe_abandoned(&self) {
        let mut inner = self.lock();
        if inner.state == State::HalfOpen {
            inner.state = State::Open;
        }
    }

    /// Told after each send with what it said about the partner; `probe`:
    /// this was the send [`Admit::Probe`] allowed.
    pub(crate) fn record(&self, answer: Answer, now_ms: u64, probe: bool) -> Option<Transition> {
        let mut inner = self.lock();
        let from = inner.state;
        match (answer.health, from) {
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
                inner.up_at_ms = Some(inner.up_at_ms.map_or(now_ms, |at| at.max(now_ms)));
                (from != State::Closed).then_some(Transition {
                    from,
                    to: State::Closed,
                    cool_down: None,
                })
            }
            (Health::Down, State::Closed) => {
                // The partner answered while this send was out: it was up.
                let contradicted = inner.up_at_ms.is_some_and(|up| up > answer.sent_ms);
                if !answer.first_try || contradicted {
                    return None;
                }
                inner.failures_in_a_row += 1;
                if self.policy.failures == 0 || inner.failures_in_a_row < self.policy.failures {
                    return None;
                }
                Some(open(&mut inner, from, now_ms))
            }
            (Health::Down, State::HalfOpen) => {
                // The probe failed: wait longer next time, unless it was a
                // delivery that had failed before, which says nothing new.
                if answer.first_try {
                    inner.cool_down = (inner.cool_down * 2).min(self.policy.max_cool_down);
                }
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
    use crate::clock::Clock;

    fn breaker() -> Breaker {
        Breaker::new(BreakerPolicy {
            failures: 3,
            cool_down: Duration::from_secs(10),
            max_cool_down: Duration::from_secs(25),
        })
    }

    /// 2026-11-25T06:00:00Z, where the driven clock starts.
    fn clock() -> Clock {
        Clock::manual(1_795_586_400_000)
    }

    /// A send of a delivery never tried before, made at `sent_ms`.
    fn first_try(health: Health, sent_ms: u64) -> Answer {
        Answer {
            health,
            sent_ms,
            first_try: true,
        }
    }

    /// A send of a delivery that was tried before, made at `sent_ms`.
    fn retry(health: Health, sent_ms: u64) -> Answer {
        Answer {
            health,
            sent_ms,
            first_try: false,
        }
    }

    /// One send made now and answered `ms` later.
    fn answered(
        b: &Breaker,
        clock: &Clock,
        answer: fn(Health, u64) -> Answer,
        health: Health,
        ms: u64,
    ) -> Option<Transition> {
        let sent = clock.now_ms();
        clock.advance(Duration::from_millis(ms));
        b.record(answer(health, sent), clock.now_ms(), false)
    }

    #[test]
    fn opens_after_the_configured_run_of_first_tries() {
        let (b, clock) = (breaker(), clock());
        assert_eq!(answered(&b, &clock, first_try, Health::Down, 5), None);
        assert_eq!(answered(&b, &clock, first_try, Health::Down, 5), None);
        // A success in between resets the run.
        assert_eq!(answered(&b, &clock, first_try, Health::Up, 5), None);
        assert_eq!(answered(&b, &clock, first_try, Health::Down, 5), None);
        assert_eq!(answered(&b, &clock, first_try, Health::Down, 5), None);
        let t = answered(&b, &clock, first_try, Health::Down, 5).expect("opens");
        assert_eq!((t.from, t.to), (State::Closed, State::Open));
        let opened = clock.now_ms();
        clock.advance(Duration::from_secs(4));
        assert_eq!(
            b.admit(clock.now_ms()).0,
            Admit::Wait(Some(opened + 10_000))
        );
    }

    #[test]
    fn one_delivery_failing_again_and_again_never_opens_it() {
        let (b, clock) = (breaker(), clock());
        assert_eq!(answered(&b, &clock, first_try, Health::Down, 5), None);
        // Its retries, on its own backoff, for as long as its policy says.
        for _ in 0..50 {
            clock.advance(Duration::from_secs(1));
            assert_eq!(answered(&b, &clock, retry, Health::Down, 5), None);
        }
        assert_eq!(b.state(), State::Closed);
        // Nor does a backlog of retries of many deliveries, one after another.
        for _ in 0..500 {
            assert_eq!(answered(&b, &clock, retry, Health::Down, 1), None);
        }
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.admit(clock.now_ms()).0, Admit::Send);
        // The first try it counted is still in the run: two more open it.
        assert_eq!(answered(&b, &clock, first_try, Health::Down, 5), None);
        let t = answered(&b, &clock, first_try, Health::Down, 5).expect("opens");
        assert_eq!(t.to, State::Open);
    }

    #[test]
    fn a_refused_type_among_answered_ones_keeps_it_closed() {
        let (b, clock) = (breaker(), clock());
        // Other types at 5/s, one refused type at 5/s between them, each
        // refused event retried four times.
        for _ in 0..300 {
            assert_eq!(answered(&b, &clock, first_try, Health::Up, 3), None);
            clock.advance(Duration::from_millis(97));
            assert_eq!(answered(&b, &clock, first_try, Health::Down, 3), None);
            for _ in 0..4 {
                assert_eq!(answered(&b, &clock, retry, Health::Down, 3), None);
            }
            clock.advance(Duration::from_millis(85));
        }
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn a_failure_of_a_send_that_was_out_while_the_partner_answered_does_not_count() {
        let (b, clock) = (breaker(), clock());
        // A burst of concurrent first tries: one is taken, the rest refused
        // after it came back.
        let burst_sent = clock.now_ms();
        clock.advance(Duration::from_millis(4));
        assert_eq!(
            b.record(first_try(Health::Up, burst_sent), clock.now_ms(), false),
            None
        );
        for _ in 0..10 {
            clock.advance(Duration::from_millis(1));
            assert_eq!(
                b.record(first_try(Health::Down, burst_sent), clock.now_ms(), false),
                None
            );
        }
        assert_eq!(b.state(), State::Closed);
        // Sends made after that answer and failing are the partner's.
        assert_eq!(answered(&b, &clock, first_try, Health::Down, 5), None);
        assert_eq!(answered(&b, &clock, first_try, Health::Down, 5), None);
        let t = answered(&b, &clock, first_try, Health::Down, 5).expect("opens");
        assert_eq!(t.to, State::Open);
    }

    #[test]
    fn one_probe_after_the_cool_down_and_longer_cool_downs_while_it_fails() {
        let (b, clock) = (breaker(), clock());
        let start = clock.now_ms();
        for _ in 0..3 {
            b.record(first_try(Health::Down, start), start, false);
        }
        assert_eq!(b.admit(start + 9_999).0, Admit::Wait(Some(start + 10_000)));
        assert_eq!(b.admit(start + 10_000).0, Admit::Probe);
        assert_eq!(
            b.admit(start + 10_001).0,
            Admit::Wait(None),
            "one probe at a time"
        );
        // An older send failing now is not the probe's answer.
        assert_eq!(
            b.record(first_try(Health::Down, start), start + 10_100, false),
            None
        );
        assert_eq!(b.admit(start + 10_200).0, Admit::Wait(None));
        let t = b
            .record(
                first_try(Health::Down, start + 10_000),
                start + 10_500,
                true,
            )
            .expect("reopens");
        assert_eq!(t.cool_down, Some(Duration::from_secs(20)));
        assert_eq!(b.admit(start + 30_499).0, Admit::Wait(Some(start + 30_500)));
        assert_eq!(b.admit(start + 30_500).0, Admit::Probe);
        let t = b
            .record(
                first_try(Health::Down, start + 30_500),
                start + 31_000,
                true,
            )
            .expect("reopens");
        assert_eq!(t.cool_down, Some(Duration::from_secs(25)), "capped");
        assert_eq!(b.admit(start + 56_000).0, Admit::Probe);
        let t = b
            .record(first_try(Health::Up, start + 56_000), start + 56_100, true)
            .expect("closes");
        assert_eq!((t.from, t.to), (State::HalfOpen, State::Closed));
        assert_eq!(b.admit(start + 56_100).0, Admit::Send);
        // Cool-down starts over after a recovery.
        for _ in 0..3 {
            b.record(
                first_try(Health::Down, start + 60_000),
                start + 60_000,
                false,
            );
        }
        assert_eq!(b.admit(start + 60_000).0, Admit::Wait(Some(start + 70_000)));
    }

    #[test]
    fn a_failed_probe_of_a_retry_keeps_the_cool_down_and_any_answer_closes() {
        let (b, clock) = (breaker(), clock());
        for _ in 0..3 {
            answered(&b, &clock, first_try, Health::Down, 5);
        }
        assert_eq!(b.state(), State::Open);
        // The only delivery waiting had failed before: its failure as the
        // probe says nothing new, so the wait does not grow.
        clock.advance(Duration::from_secs(10));
        assert_eq!(b.admit(clock.now_ms()).0, Admit::Probe);
        let sent = clock.now_ms();
        clock.advance(Duration::from_millis(5));
        let t = b
            .record(retry(Health::Down, sent), clock.now_ms(), true)
            .expect("reopens");
        assert_eq!(t.cool_down, Some(Duration::from_secs(10)), "not doubled");
        // A first try as the probe failing doubles it.
        clock.advance(Duration::from_secs(10));
        assert_eq!(b.admit(clock.now_ms()).0, Admit::Probe);
        let sent = clock.now_ms();
        clock.advance(Duration::from_millis(5));
        let t = b
            .record(first_try(Health::Down, sent), clock.now_ms(), true)
            .expect("reopens");
        assert_eq!(t.cool_down, Some(Duration::from_secs(20)));
        // Half-open again: an answer from a send other than the probe (one
        // made before it opened) closes it too.
        clock.advance(Duration::from_secs(20));
        assert_eq!(b.admit(clock.now_ms()).0, Admit::Probe);
        let t = b
            .record(retry(Health::Up, sent), clock.now_ms(), false)
            .expect("closes");
        assert_eq!((t.from, t.to), (State::HalfOpen, State::Closed));
        assert_eq!(b.admit(clock.now_ms()).0, Admit::Send);
    }

    #[test]
    fn rate_limits_and_client_errors_are_not_failures() {
        assert_eq!(Health::of(Some(429)), Health::Unknown);
        assert_eq!(Health::of(Some(404)), Health::Up);
        assert_eq!(Health::of(Some(200)), Health::Up);
        assert_eq!(Health::of(Some(503)), Health::Down);
        assert_eq!(Health::of(Some(408)), Health::Down);
        assert_eq!(Health::of(None), Health::Down);
        let (b, clock) = (breaker(), clock());
        for _ in 0..10 {
            assert_eq!(answered(&b, &clock, first_try, Health::Unknown, 5), None);
        }
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn a_late_failure_while_open_changes_nothing() {
        let (b, clock) = (breaker(), clock());
        let start = clock.now_ms();
        for _ in 0..3 {
            b.record(first_try(Health::Down, start), start, false);
        }
        assert_eq!(
            b.record(first_try(Health::Down, start), start + 5_000, false),
            None
        );
        assert_eq!(b.admit(start + 10_000).0, Admit::Probe);
    }

    #[test]
    fn zero_failures_turns_it_off() {
        let b = Breaker::new(BreakerPolicy {
            failures: 0,
            cool_down: Duration::from_secs(10),
            max_cool_down: Duration::from_secs(25),
        });
        let clock = clock();
        for _ in 0..100 {
            assert_eq!(answered(&b, &clock, first_try, Health::Down, 5), None);
        }
        assert_eq!(b.admit(clock.now_ms()).0, Admit::Send);
    }
}
