//! One attempt: the deliveries a send carries, the request the adapter
//! builds for them, the answer, and the outcome each one gets.
//!
//! Most sends carry one delivery. A platform that takes several states in
//! one callback (SmartThings, up to 50) gets the link's other queued
//! deliveries with it; the answer's verdict then applies to every one.
//! Before anything is sent, a delivery may already be settled here: its
//! event gone, a newer state in its place, or its route parked.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use adapters::{DeliveryContext, EventView, OutboundRequest, Verdict};

use super::super::client::exchange;
use super::super::retry;
use super::super::tokens::Prepared;
use super::{outcome_label, reason_only, Lane};
use crate::clock::rfc3339;
use crate::model::{Attempt, AttemptOutcome, EventRecord, ParkedRoute, Priority};
use crate::store::{Due, Next, Outcome};

/// `DeliveryContext::send` of an attempt's first send.
const FIRST_SEND: u32 = 0;
/// `DeliveryContext::send` of the resend after a token refresh: the same
/// delivery and attempt, a new call.
const RESEND_AFTER_REFRESH: u32 = 1;

/// A request that went out: when, and the status that came back (none on
/// a timeout or a network error). What the lane learns the partner's health
/// and latency from, whatever the deliveries it carried became.
pub(super) struct Sent {
    pub started_ms: u64,
    pub status: Option<u16>,
    /// When the request itself went out (after any token was prepared).
    pub sent_ms: u64,
    /// Whether it carried a delivery never tried before (what the breaker
    /// counts, see [`super::super::breaker`]).
    pub first_try: bool,
}

/// A delivery about to be sent, with its event and attempt number.
pub(super) struct Sendable {
    pub due: Due,
    pub event: Arc<EventRecord>,
    pub number: u32,
}

impl Lane {
    /// One real send for `dues` (all for one device) and its verdicts, as
    /// outcomes for the store, with the send itself when one went out.
    pub(super) async fn attempt(&self, dues: Vec<Due>) -> (Vec<Outcome>, Option<Sent>) {
        let started_ms = self.clock.now_ms();
        let mut outcomes = Vec::with_capacity(dues.len());
        let mut batch = Vec::with_capacity(dues.len());
        for due in dues {
            match self.sendable(due, started_ms) {
                Ok(s) => batch.push(s),
                Err(settled) => outcomes.push(*settled),
            }
        }
        let Some(first) = batch.first() else {
            return (outcomes, None);
        };
        let device_id = first.event.device_id.clone();
        let link = if self.adapter.needs_link() {
            match self.tokens.prepare(&*self.adapter, &device_id).await {
                Ok(Some(link)) => Some(link),
                Ok(None) => {
                    let reason = format!(
                        "the device has no link to {0}: PUT /v1/links/{0}/{1} first",
                        self.partner.name, device_id
                    );
                    outcomes.extend(self.conclude_all(
                        batch,
                        started_ms,
                        None,
                        reason_only(&reason),
                    ));
                    return (outcomes, None);
                }
                // The link's token could not be made good: no send.
                Err(verdict) => {
                    outcomes.extend(self.conclude_all(batch, started_ms, None, verdict));
                    return (outcomes, None);
                }
            }
        } else {
            None
        };
        let Some(request) =
            self.build_or_split(&mut batch, link.as_ref(), started_ms, &mut outcomes)
        else {
            return (outcomes, None);
        };
        let first_try = batch.iter().any(|s| s.number == 1);
        let sent_ms = self.clock.now_ms();
        let (verdict, status) = match self.send(request, &batch).await {
            Ok(answered) => answered,
            // Nothing went out: not a send the partner's health learns from.
            Err(refused) => {
                outcomes.extend(self.conclude_all(batch, started_ms, None, refused));
                return (outcomes, None);
            }
        };
        let (verdict, status) = match (verdict, &link) {
            (Verdict::Refresh { reason }, Some(used)) => {
                self.refresh_and_resend(&batch, used, reason, status).await
            }
            (verdict, _) => (verdict, status),
        };
        outcomes.extend(self.conclude_all(batch, started_ms, status, verdict));
        let sent = Sent {
            started_ms,
            status,
            sent_ms,
            first_try,
        };
        (outcomes, Some(sent))
    }

    /// `due` ready to send, or already settled without a send.
    fn sendable(&self, due: Due, started_ms: u64) -> Result<Sendable, Box<Outcome>> {
        let number = due.attempts() + 1;
        let unsent = |due, reason: &str| {
            Box::new(self.settle(due, number, started_ms, None, reason_only(reason)))
        };
        let event = match due.event(&self.store) {
            Ok(Some(event)) => event,
            Ok(None) => return Err(unsent(due, "the event record is missing")),
            Err(e) => return Err(unsent(due, &e.to_string())),
        };
        if let Some(newer) = self.superseded_by(&event, due.delivery()) {
            metrics::counter!("herald_superseded_total", "partner" => self.partner.name.clone())
                .increment(1);
            // Not kept: nothing was sent.
            let attempt = Attempt {
                number,
                at_ms: started_ms,
                status: None,
                latency_ms: 0,
                outcome: AttemptOutcome::Failed,
                detail: format!("superseded by {newer}"),
            };
            return Err(Box::new(Outcome::new(
                due,
                attempt,
                Next::Superseded(newer),
                None,
            )));
        }
        if let Some(route) = self.parked.get(&event.device_id) {
            let reason = format!(
                "not sent: the route was parked at {} ({})",
                rfc3339(route.parked_ms),
                route.reason
            );
            return Err(unsent(due, &reason));
        }
        Ok(Sendable { due, event, number })
    }

    /// The platform refused `used`'s token: renew it (once for every
    /// delivery that hit it) and send `batch` again, once. A second refusal
    /// is a retry, not another refresh.
    async fn refresh_and_resend(
        &self,
        batch: &[Sendable],
        used: &Prepared,
        reason: String,
        status: Option<u16>,
    ) -> (Verdict, Option<u16>) {
        let renewed = match self.tokens.renew(&*self.adapter, used).await {
            Ok(renewed) => renewed,
            Err(verdict) => return (verdict, status),
        };
        let request = match self.build(batch, Some(&renewed), RESEND_AFTER_REFRESH) {
            Ok(request) => request,
            Err(why) => return (reason_only(&why), None),
        };
        self.wait_for_token().await;
        match self.send(request, batch).await {
            Err(refused) => (refused, None),
            Ok((Verdict::Refresh { reason: again }, status)) => {
                let reason = format!(
                    "the platform refused the renewed token too ({again}); first: {reason}"
                );
                (
                    Verdict::Retry {
                        after: None,
                        reason,
                    },
                    status,
                )
            }
            Ok(answered) => answered,
        }
    }

    /// The request for `batch`. When several deliveries cannot go as one,
    /// those that cannot be built alone are settled here (permanent, with
    /// their own reason) and the rest go together; `None` when none is left.
    fn build_or_split(
        &self,
        batch: &mut Vec<Sendable>,
        link: Option<&Prepared>,
        started_ms: u64,
        outcomes: &mut Vec<Outcome>,
    ) -> Option<OutboundRequest> {
        let give_up = |batch: Vec<Sendable>, reason: &str, outcomes: &mut Vec<Outcome>| {
            outcomes.extend(self.conclude_all(batch, started_ms, None, reason_only(reason)));
        };
        let reason = match self.build(batch, link, FIRST_SEND) {
            Ok(request) => return Some(request),
            Err(reason) if batch.len() > 1 => reason,
            Err(reason) => {
                give_up(std::mem::take(batch), &reason, outcomes);
                return None;
            }
        };
        // One delivery that cannot be built must not sink the others.
        for s in std::mem::take(batch) {
            match self.build(std::slice::from_ref(&s), link, FIRST_SEND) {
                Ok(_) => batch.push(s),
                Err(own) => give_up(vec![s], &own, outcomes),
            }
        }
        if batch.is_empty() {
            return None;
        }
        match self.build(batch, link, FIRST_SEND) {
            Ok(request) => Some(request),
            Err(_) => {
                give_up(std::mem::take(batch), &reason, outcomes);
                None
            }
        }
    }

    /// Sends one request for `batch`; the verdict on its answer and the
    /// status, or, when the outbound address policy refused to dial, the
    /// permanent verdict saying so (nothing was sent).
    async fn send(
        &self,
        request: OutboundRequest,
        batch: &[Sendable],
    ) -> Result<(Verdict, Option<u16>), Verdict> {
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        let answer = exchange(&self.client, request, self.partner.timeout, &self.clock).await;
        if let Some(reason) = answer.refusal() {
            // Counted while it was under way (as every send is); it never went out.
            self.stats.sent.fetch_sub(1, Ordering::Relaxed);
            return Err(reason_only(reason));
        }
        // The answer is read as one for the batch's most-tried delivery.
        let number = batch.iter().map(|s| s.number).max().unwrap_or(1);
        let verdict = self.adapter.classify_attempt(
            number,
            &answer.as_answer(),
            self.clock.now_system_time(),
        );
        Ok((verdict, answer.status()))
    }

    /// A rate-limit token for a send the lane did not plan (the one after a
    /// token refresh): it waits its turn like any other.
    async fn wait_for_token(&self) {
        let Some(limiter) = &self.limiter else { return };
        while let Err(not_until) = limiter.check() {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(&self.clock));
            self.clock.sleep(wait).await;
        }
    }

    /// Every delivery of `batch` settled by the one `verdict`; the route
    /// parked when it says so.
    fn conclude_all(
        &self,
        batch: Vec<Sendable>,
        started_ms: u64,
        status: Option<u16>,
        verdict: Verdict,
    ) -> Vec<Outcome> {
        // The partner's alert follows answers, not deliveries: a batch's
        // one answer is counted once.
        match &verdict {
            Verdict::Delivered => self.alert.clear(),
            Verdict::Misconfigured { reason, .. } => self.alert.raise(reason, self.clock.now_ms()),
            _ => {}
        }
        let parks = matches!(verdict, Verdict::Park { .. });
        batch
            .into_iter()
            .map(|s| {
                let mut outcome = self.settle(s.due, s.number, started_ms, status, verdict.clone());
                if let (true, Next::Dead(reason)) = (parks, &outcome.next) {
                    outcome.park = Some(Box::new(ParkedRoute {
                        partner: self.partner.name.clone(),
                        device_id: s.event.device_id.clone(),
                        reason: reason.clone(),
                        parked_ms: outcome.attempt.at_ms,
                        delivery_id: outcome.delivery(),
                        event_id: s.event.id,
                    }));
                }
                outcome
            })
            .collect()
    }

    /// Whether a newer state replaced this delivery (checked again when it
    /// is settled).
    pub(super) fn is_replaced(&self, due: &Due) -> bool {
        if due.priority() == Priority::Critical {
            return false;
        }
        match due.event(&self.store) {
            Ok(Some(event)) => self.superseded_by(&event, due.delivery()).is_some(),
            _ => false,
        }
    }

    /// The newer delivery of the same device and attribute, if this one
    /// carries a state that one replaced before it was sent.
    fn superseded_by(&self, event: &EventRecord, delivery: uuid::Uuid) -> Option<uuid::Uuid> {
        let d = event.deliveries.iter().find(|d| d.id == delivery)?;
        let state = d.coalesce.as_deref()?;
        match self
            .store
            .latest_state(&self.partner.name, &event.device_id, state)
        {
            Ok(Some(latest)) if latest != delivery => Some(latest),
            Ok(_) => None,
            Err(e) => {
                // Sending a stale state is better than dropping a fresh one.
                tracing::warn!(partner = %self.partner.name, error = %e, "cannot read the latest state; sending");
                None
            }
        }
    }

    /// The request for `batch` (one delivery, or several for one link
    /// where the platform takes them together).
    fn build(
        &self,
        batch: &[Sendable],
        link: Option<&Prepared>,
        send: u32,
    ) -> Result<OutboundRequest, String> {
        let ids: Vec<(String, String)> = batch
            .iter()
            .map(|s| (s.event.id.to_string(), s.due.delivery().to_string()))
            .collect();
        let now_unix = self.clock.now_ms() / 1000;
        let view = link.map(Prepared::view);
        let ctxs: Vec<DeliveryContext<'_>> = batch
            .iter()
            .zip(&ids)
            .map(|(s, (event_id, delivery_id))| DeliveryContext {
                delivery_id,
                attempt: s.number,
                send,
                now_unix,
                event: EventView {
                    id: event_id,
                    event_type: &s.event.event_type,
                    device_id: &s.event.device_id,
                    priority: s.event.priority.as_str(),
                    occurred_at: &s.event.occurred_at,
                    data: &s.event.data,
                },
                link: view,
            })
            .collect();
        let built = match ctxs.as_slice() {
            [one] => self.adapter.build(one),
            many => self.adapter.build_batch(many),
        };
        built.map_err(|e| format!("cannot build the request: {e}"))
    }

    /// The next step after a failed send, by the partner's retry policy.
    fn retry_or_give_up(
        &self,
        due: &Due,
        number: u32,
        now_ms: u64,
        after: Option<Duration>,
        reason: String,
    ) -> (AttemptOutcome, Next, String) {
        let policy = &self.partner.retry;
        match policy.next(
            due.delivery(),
            number,
            due.created_ms(),
            now_ms,
            after,
            due.priority(),
        ) {
            retry::Next::RetryAt(at) => (AttemptOutcome::Retry, Next::RetryAt(at), reason),
            retry::Next::GiveUp(why) => (
                AttemptOutcome::Failed,
                Next::Dead(format!("{why}; last: {reason}")),
                reason,
            ),
        }
    }

    /// Turns a verdict into the attempt record and the delivery's next step.
    pub(super) fn settle(
        &self,
        due: Due,
        number: u32,
        started_ms: u64,
        status: Option<u16>,
        verdict: Verdict,
    ) -> Outcome {
        let now_ms = self.clock.now_ms();
        let (outcome, next, detail) = match verdict {
            Verdict::Delivered => (AttemptOutcome::Delivered, Next::Delivered, String::new()),
            Verdict::Permanent { reason } => {
                (AttemptOutcome::Failed, Next::Dead(reason.clone()), reason)
            }
            // A refresh the lane could not act on (no link) is a plain retry.
            Verdict::Refresh { reason } => {
                self.retry_or_give_up(&due, number, now_ms, None, reason)
            }
            Verdict::Park { reason } => {
                (AttemptOutcome::Failed, Next::Dead(reason.clone()), reason)
            }
            Verdict::Retry { after, reason } => {
                self.retry_or_give_up(&due, number, now_ms, after, reason)
            }
            Verdict::Misconfigured { after, reason } => {
                self.retry_or_give_up(&due, number, now_ms, after, reason)
            }
        };
        metrics::counter!("herald_attempts_total", "partner" => self.partner.name.clone(), "outcome" => outcome_label(outcome))
            .increment(1);
        if let Next::Dead(reason) = &next {
            tracing::warn!(partner = %self.partner.name, delivery = %due.delivery(), attempts = number, %reason, "dead letter");
        }
        let attempt = Attempt {
            number,
            at_ms: started_ms,
            status,
            latency_ms: now_ms.saturating_sub(started_ms),
            outcome,
            detail,
        };
        Outcome::new(due, attempt, next, None)
    }
}
