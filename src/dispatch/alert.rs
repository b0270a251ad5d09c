//! A partner's alert condition: the platform refuses herald's own setup.
//!
//! Some answers say nothing about the user and everything about herald: a
//! rotated client secret (`invalid_client`), a skill without the permission
//! to send events, a Google project without Home Graph access, an app over
//! its API quota. Parking the link would dead-letter every device's safety
//! alerts until someone cleared each one, so those deliveries are retried
//! under the partner's policy instead ([`adapters::Verdict::Misconfigured`])
//! and this condition tells on-call: in `GET /v1/partners`, in the metrics
//! (`herald_partner_misconfigured` 1 while raised,
//! `herald_partner_misconfigured_total` per answer) and in the log, once
//! when raised and once when cleared. The next delivered answer clears it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::clock::rfc3339;
use crate::sync::lock;

/// What on-call sees while the condition holds.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct AlertView {
    /// The platform's latest answer that raised it.
    pub reason: String,
    /// When the first such answer came (RFC 3339).
    pub since: String,
    /// Answers of this kind since then.
    pub count: u64,
}

struct Raised {
    reason: String,
    since_ms: u64,
    count: u64,
}

pub struct PartnerAlert {
    partner: String,
    /// Whether `raised` holds one: every delivered answer asks, so the
    /// common case (nothing raised) reads an atomic, not the lock.
    is_raised: AtomicBool,
    raised: Mutex<Option<Raised>>,
}

impl PartnerAlert {
    pub(crate) fn new(partner: &str) -> PartnerAlert {
        metrics::gauge!(crate::telemetry::MISCONFIGURED, "partner" => partner.to_string()).set(0.0);
        PartnerAlert {
            partner: partner.to_string(),
            is_raised: AtomicBool::new(false),
            raised: Mutex::new(None),
        }
    }

    /// A delivery got a misconfiguration answer at `now_ms`.
    pub(crate) fn raise(&self, reason: &str, now_ms: u64) {
        metrics::counter!(crate::telemetry::MISCONFIGURED_TOTAL, "partner" => self.partner.clone())
            .increment(1);
        let mut raised = lock(&self.raised);
        match raised.as_mut() {
            Some(held) => {
                held.count += 1;
                reason.clone_into(&mut held.reason);
            }
            None => {
                tracing::error!(partner = %self.partner, %reason,
                    "the platform refuses herald's own setup (client, secret, permission, region or quota); deliveries are retried, not parked, until it is fixed");
                metrics::gauge!(crate::telemetry::MISCONFIGURED, "partner" => self.partner.clone())
                    .set(1.0);
                *raised = Some(Raised {
                    reason: reason.to_string(),
                    since_ms: now_ms,
                    count: 1,
                });
                self.is_raised.store(true, Ordering::Release);
            }
        }
    }

    /// A delivery was taken: whatever was wrong is fixed.
    pub(crate) fn clear(&self) {
        if !self.is_raised.load(Ordering::Acquire) {
            return;
        }
        let mut raised = lock(&self.raised);
        self.is_raised.store(false, Ordering::Release);
        if let Some(held) = raised.take() {
            tracing::info!(partner = %self.partner, answers = held.count,
                "the platform takes herald's deliveries again; the misconfiguration alert is cleared");
            metrics::gauge!(crate::telemetry::MISCONFIGURED, "partner" => self.partner.clone())
                .set(0.0);
        }
    }

    pub(crate) fn view(&self) -> Option<AlertView> {
        lock(&self.raised).as_ref().map(|held| AlertView {
            reason: held.reason.clone(),
            since: rfc3339(held.since_ms),
            count: held.count,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raised_once_counted_and_cleared_by_a_delivery() {
        let alert = PartnerAlert::new("alexa");
        assert_eq!(alert.view(), None);
        alert.raise("HTTP 403 INSUFFICIENT_PERMISSION_EXCEPTION", 1_000);
        alert.raise("HTTP 403 INSUFFICIENT_PERMISSION_EXCEPTION", 5_000);
        let view = alert.view().expect("raised");
        assert_eq!(view.count, 2);
        assert_eq!(view.since, rfc3339(1_000), "since the first answer");
        alert.clear();
        assert_eq!(alert.view(), None);
    }
}
