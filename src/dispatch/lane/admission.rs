//! Admission: whether the delivery the window hands out goes now.
//!
//! One step, in a fixed order: the breaker (is the partner healthy, or is
//! this the probe?), the adaptive concurrency limit, an in-flight permit,
//! then a rate-limit token, so a token is spent only right before a real
//! send. What passes gets a [`Ticket`]: it owns the permit and, for the
//! probe, the breaker's one half-open send. A ticket dropped before its
//! send goes out gives both back, so no exit path can leak a permit or
//! leave the breaker waiting on a probe that never left.

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::super::breaker::{Admit, Breaker, State};
use super::{Lane, Token};
use crate::store::Due;
use crate::sync::lock;

/// The breaker's probe, held by a delivery until it is sent or given back.
struct ProbeHeld<'a>(Option<&'a Breaker>);

impl ProbeHeld<'_> {
    fn is_probe(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for ProbeHeld<'_> {
    fn drop(&mut self) {
        if let Some(breaker) = self.0.take() {
            breaker.probe_abandoned();
        }
    }
}

/// A delivery's leave to be sent: its in-flight permit and whether it is
/// the breaker's probe.
pub(super) struct Ticket<'a> {
    permit: OwnedSemaphorePermit,
    probe: ProbeHeld<'a>,
}

impl Ticket<'_> {
    /// The send goes out: what it carries off (the permit, and whether it
    /// is the probe whose answer the breaker waits for).
    pub(super) fn send(mut self) -> (OwnedSemaphorePermit, bool) {
        let probe = self.probe.0.take().is_some();
        (self.permit, probe)
    }
}

/// What admission made of a delivery.
// Matched once, right where it is made: boxing the delivery to shrink it
// would cost an allocation per send for nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Admission<'a> {
    /// Send it now.
    Go(Due, Ticket<'a>),
    /// Not now: it is back in the window; look again.
    Again,
    /// The lane is stopping: it is released from the window.
    Stopped,
}

impl Lane {
    /// Runs `due` (just popped from `window`) through admission.
    pub(super) async fn admit(
        &self,
        window: &mut super::Window,
        mut due: Due,
        stop: &CancellationToken,
    ) -> Admission<'_> {
        let (admit, transition) = self.breaker.admit(self.clock.now_ms());
        self.note(transition);
        let probe = match admit {
            Admit::Send => ProbeHeld(None),
            Admit::Probe => {
                // A delivery that failed before may be one the partner
                // refuses whatever its health: probe with one never tried,
                // if the window holds one.
                if due.attempts() > 0 {
                    if let Some(untried) = window.take_untried() {
                        window.put_back(std::mem::replace(&mut due, untried));
                    }
                }
                ProbeHeld(Some(&self.breaker))
            }
            Admit::Wait(until) => {
                // Held by the breaker: nothing is sent, no attempt is used.
                window.put_back(due);
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = self.clock.sleep_until_ms(until.unwrap_or(u64::MAX)), if until.is_some() => {}
                    _ = stop.cancelled() => return Admission::Stopped,
                }
                return Admission::Again;
            }
        };
        if !self.room_under_limit(stop).await {
            window.unhold(&due);
            return Admission::Stopped;
        }
        let permit = tokio::select! {
            permit = self.in_flight.clone().acquire_owned() => permit.ok(),
            _ = stop.cancelled() => None,
        };
        let Some(permit) = permit else {
            window.unhold(&due);
            return Admission::Stopped;
        };
        let ticket = Ticket { permit, probe };
        // A delivery a newer state replaced goes nowhere: it needs no token.
        let replaced = self.partner.coalesce_state && self.is_replaced(&due);
        match self.take_token(stop, due.priority(), replaced).await {
            Token::Taken => {}
            Token::Preempted => {
                // A critical delivery arrived: it takes this token.
                window.put_back(due);
                return Admission::Again;
            }
            Token::Stopped => {
                window.unhold(&due);
                return Admission::Stopped;
            }
        }
        if !ticket.probe.is_probe() && self.breaker.state() != State::Closed {
            // The breaker opened while this send waited for its turn: it
            // waits with the rest instead of going out anyway.
            window.put_back(due);
            return Admission::Again;
        }
        if let Some(aimd) = &self.adaptive {
            lock(aimd).sent(self.in_flight());
        }
        Admission::Go(due, ticket)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::Semaphore;

    use super::*;
    use crate::clock::Clock;
    use crate::dispatch::breaker::{Answer, BreakerPolicy, Health};

    /// A breaker that opened on three failures and is due for its probe.
    fn half_open() -> (Breaker, Clock) {
        let breaker = Breaker::new(BreakerPolicy {
            failures: 3,
            cool_down: Duration::from_secs(10),
            max_cool_down: Duration::from_secs(25),
        });
        let clock = Clock::manual(1_795_586_400_000);
        for _ in 0..3 {
            let answer = Answer {
                health: Health::Down,
                sent_ms: clock.now_ms(),
                first_try: true,
            };
            breaker.record(answer, clock.now_ms(), false);
        }
        assert_eq!(breaker.state(), State::Open);
        clock.advance(Duration::from_secs(10));
        assert_eq!(breaker.admit(clock.now_ms()).0, Admit::Probe);
        (breaker, clock)
    }

    /// The probe's ticket, holding the one permit of `permits`.
    fn probe_ticket<'a>(breaker: &'a Breaker, permits: &Arc<Semaphore>) -> Ticket<'a> {
        Ticket {
            permit: Arc::clone(permits).try_acquire_owned().expect("a permit"),
            probe: ProbeHeld(Some(breaker)),
        }
    }

    #[test]
    fn a_ticket_dropped_unsent_gives_its_permit_and_the_probe_back() {
        let (breaker, _clock) = half_open();
        let permits = Arc::new(Semaphore::new(1));
        let ticket = probe_ticket(&breaker, &permits);
        assert_eq!(permits.available_permits(), 0);
        drop(ticket);
        assert_eq!(permits.available_permits(), 1, "the permit is back");
        assert_eq!(breaker.state(), State::Open, "the probe is given back");
    }

    #[test]
    fn a_ticket_sent_keeps_the_probe_for_its_answer() {
        let (breaker, _clock) = half_open();
        let permits = Arc::new(Semaphore::new(1));
        let ticket = probe_ticket(&breaker, &permits);
        let (permit, probe) = ticket.send();
        assert!(probe);
        assert_eq!(
            breaker.state(),
            State::HalfOpen,
            "waiting for the probe's answer"
        );
        drop(permit);
        assert_eq!(permits.available_permits(), 1);
    }
}
