//! Every metric herald exports at `/metrics`: its name, labels, help text
//! and unit, declared once here, and the small functions the rest of the
//! code records through.
//!
//! Names follow Prometheus' conventions: counters end in `_total`, times
//! are `_seconds` and sizes `_bytes` (base units), a label holds one of a
//! small fixed set of values (never free text). At start, [`register`]
//! writes every series of every configured partner × priority × outcome
//! with a zero, so a dashboard or an alert sees a partner before its first
//! event and `rate()` has a first sample to start from.
//!
//! Deliveries, dead letters, replays, latencies and queue depths are
//! counted where their outcome is settled: by the store writer, once the
//! group commit holding them is durable (see `store::writer`), so a send
//! whose outcome could not be written is not counted until it is.
//!
//! The process-wide recorder is installed by [`crate::metrics_handle`];
//! several heralds in one process (tests) share it.

use std::time::Duration;

use metrics::Unit;

use crate::config::Config;
use crate::model::Priority;

// ---- ingest -----------------------------------------------------------------
pub const INGEST_REQUESTS: &str = "herald_ingest_requests_total";
pub const INGEST_EVENTS: &str = "herald_ingest_events_total";
// ---- store ------------------------------------------------------------------
pub const STORE_COMMIT_SECONDS: &str = "herald_store_group_commit_seconds";
pub const STORE_COMMIT_REQUESTS: &str = "herald_store_group_commit_requests";
pub const STORE_FSYNCS: &str = "herald_store_fsyncs_total";
pub const STORE_COMMIT_FAILURES: &str = "herald_store_commit_failures_total";
// ---- deliveries ---------------------------------------------------------------
pub const DELIVERIES: &str = "herald_deliveries_total";
pub const DELIVERY_LATENCY: &str = "herald_delivery_latency_seconds";
pub const QUEUE_DEPTH: &str = "herald_queue_depth";
pub const OLDEST_AGE: &str = "herald_oldest_undelivered_age_seconds";
pub const DEAD_LETTERS: &str = "herald_dead_letters_total";
pub const REPLAYS: &str = "herald_replays_total";
pub const DISPATCH_STALLED: &str = "herald_dispatch_stalled";
// ---- lanes --------------------------------------------------------------------
pub const RATE_LIMIT_WAITS: &str = "herald_rate_limit_waits_total";
pub const BREAKER_STATE: &str = "herald_partner_breaker_state";
pub const CONCURRENCY_LIMIT: &str = "herald_partner_concurrency_limit";
pub const PARKED_ROUTES: &str = "herald_parked_routes";
pub const MISCONFIGURED: &str = "herald_partner_misconfigured";
pub const TOKEN_REQUESTS: &str = "herald_token_requests_total";
pub const ATTEMPTS: &str = "herald_attempts_total";
pub const SUPERSEDED: &str = "herald_superseded_total";
pub const MISCONFIGURED_TOTAL: &str = "herald_partner_misconfigured_total";
pub const KEEP_ALIVE_REFRESHES: &str = "herald_keep_alive_refreshes_total";
// ---- HTTP ---------------------------------------------------------------------
pub const HTTP_CONNECTIONS: &str = "herald_http_connections";
pub const HTTP_CONNECTIONS_REFUSED: &str = "herald_http_connections_refused_total";
pub const HTTP_ACCEPT_ERRORS: &str = "herald_http_accept_errors_total";
pub const HTTP_RATE_LIMITED: &str = "herald_http_rate_limited_total";
// ---- store, continued -----------------------------------------------------------
pub const STORE_REOPENS: &str = "herald_store_reopens_total";
pub const STORE_CHECKPOINT_SECONDS: &str = "herald_store_checkpoint_seconds";
pub const STORE_DISK: &str = "herald_store_disk_bytes";
// ---- disk ---------------------------------------------------------------------
pub const DISK_FREE: &str = "herald_disk_free_bytes";
pub const DISK_TOTAL: &str = "herald_disk_total_bytes";
pub const DISK_MIN_FREE: &str = "herald_disk_min_free_bytes";
pub const DISK_INTAKE: &str = "herald_disk_intake";

/// `outcome` of [`INGEST_REQUESTS`]: 202; a 4xx for the request's content;
/// a 503 (shutting down, the store busy or out, the disk low).
pub const INGEST_REQUEST_OUTCOMES: [&str; 3] = ["accepted", "rejected", "unavailable"];
/// `outcome` of [`INGEST_EVENTS`]: stored, or answered with the event an
/// earlier request stored under the same `idempotency_key`.
pub const INGEST_EVENT_OUTCOMES: [&str; 2] = ["accepted", "duplicate"];
/// `outcome` of [`TOKEN_REQUESTS`] (see `dispatch::tokens`).
pub const TOKEN_OUTCOMES: [&str; 4] = ["renewed", "retry", "refused", "misconfigured"];

/// How a delivery's attempt ended, as [`DELIVERIES`] counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryOutcome {
    Delivered,
    /// Failed and scheduled again.
    Retried,
    DeadLettered,
    /// Not sent: a newer state of the same device replaced it.
    Superseded,
}

impl DeliveryOutcome {
    pub const ALL: [DeliveryOutcome; 4] = [
        DeliveryOutcome::Delivered,
        DeliveryOutcome::Retried,
        DeliveryOutcome::DeadLettered,
        DeliveryOutcome::Superseded,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DeliveryOutcome::Delivered => "delivered",
            DeliveryOutcome::Retried => "retried",
            DeliveryOutcome::DeadLettered => "dead_lettered",
            DeliveryOutcome::Superseded => "superseded",
        }
    }
}

/// Why a delivery became a dead letter: the `reason` label of
/// [`DEAD_LETTERS`]. The letter itself keeps the full text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadReason {
    /// The retry policy gave up (`retry.max_attempts`, `retry.max_age`,
    /// `retry.critical_max_age`).
    RetriesExhausted,
    /// The partner answered that it will never take it.
    Rejected,
    /// The partner answered that the device's user or integration is gone
    /// (this delivery parked the route).
    RouteGone,
    /// Not sent: the device's route was parked by an earlier answer.
    RouteParked,
    /// Not sent: herald could not make a request of it (no link, a link
    /// the platform cannot use, an address the outbound policy refuses,
    /// its event record missing).
    NotSendable,
}

/// The text [`crate::dispatch::retry`] starts a give-up with.
const GAVE_UP: &str = "gave up after ";
/// The text a delivery on a parked route is dead-lettered with.
const ROUTE_PARKED: &str = "not sent: the route was parked";

impl DeadReason {
    pub const ALL: [DeadReason; 5] = [
        DeadReason::RetriesExhausted,
        DeadReason::Rejected,
        DeadReason::RouteGone,
        DeadReason::RouteParked,
        DeadReason::NotSendable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DeadReason::RetriesExhausted => "retries_exhausted",
            DeadReason::Rejected => "rejected",
            DeadReason::RouteGone => "route_gone",
            DeadReason::RouteParked => "route_parked",
            DeadReason::NotSendable => "not_sendable",
        }
    }

    /// The reason of a dead letter written with `text`, after an attempt
    /// answered with `status` (none: nothing was answered), that parked
    /// its route or not.
    pub fn of(text: &str, status: Option<u16>, parks: bool) -> DeadReason {
        if text.starts_with(GAVE_UP) {
            DeadReason::RetriesExhausted
        } else if parks {
            DeadReason::RouteGone
        } else if text.starts_with(ROUTE_PARKED) {
            DeadReason::RouteParked
        } else if status.is_some() {
            DeadReason::Rejected
        } else {
            DeadReason::NotSendable
        }
    }
}

/// The `priority` label.
pub fn priority_label(priority: Priority) -> &'static str {
    match priority {
        Priority::Critical => "critical",
        Priority::Normal => "normal",
    }
}

/// Buckets of [`DELIVERY_LATENCY`]: a millisecond to an hour, since a
/// delivery after an outage waits for the partner to come back.
const LATENCY_BUCKETS: [f64; 20] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0, 3600.0,
];
/// Buckets of [`STORE_COMMIT_SECONDS`]: one fdatasync is about a millisecond.
const COMMIT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Buckets of [`STORE_COMMIT_REQUESTS`]: requests in one group commit.
const COMMIT_SIZE_BUCKETS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

/// Buckets of [`STORE_CHECKPOINT_SECONDS`].
const CHECKPOINT_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0];

/// herald's histograms with their buckets (the exporter renders a
/// histogram without buckets as a summary, which cannot be aggregated).
pub fn buckets() -> [(&'static str, &'static [f64]); 4] {
    [
        (DELIVERY_LATENCY, &LATENCY_BUCKETS),
        (STORE_COMMIT_SECONDS, &COMMIT_BUCKETS),
        (STORE_COMMIT_REQUESTS, &COMMIT_SIZE_BUCKETS),
        (STORE_CHECKPOINT_SECONDS, &CHECKPOINT_BUCKETS),
    ]
}

/// Help texts and units of every metric; then a zero for every series of
/// every partner in `config`.
pub fn register(config: &Config) {
    describe();
    for outcome in INGEST_REQUEST_OUTCOMES {
        metrics::counter!(INGEST_REQUESTS, "outcome" => outcome).increment(0);
    }
    for outcome in INGEST_EVENT_OUTCOMES {
        metrics::counter!(INGEST_EVENTS, "outcome" => outcome).increment(0);
    }
    metrics::counter!(STORE_FSYNCS).increment(0);
    metrics::counter!(STORE_COMMIT_FAILURES).increment(0);
    let _ = metrics::histogram!(STORE_COMMIT_SECONDS);
    let _ = metrics::histogram!(STORE_COMMIT_REQUESTS);
    for partner in &config.partners {
        let name = partner.name.clone();
        for outcome in DeliveryOutcome::ALL {
            metrics::counter!(DELIVERIES, "partner" => name.clone(), "outcome" => outcome.label())
                .increment(0);
        }
        for reason in DeadReason::ALL {
            metrics::counter!(DEAD_LETTERS, "partner" => name.clone(), "reason" => reason.label())
                .increment(0);
        }
        for priority in Priority::ALL {
            let priority = priority_label(priority);
            let _ = metrics::histogram!(DELIVERY_LATENCY, "partner" => name.clone(), "priority" => priority);
            metrics::gauge!(QUEUE_DEPTH, "partner" => name.clone(), "priority" => priority)
                .set(0.0);
            metrics::gauge!(OLDEST_AGE, "partner" => name.clone(), "priority" => priority).set(0.0);
        }
        for outcome in TOKEN_OUTCOMES {
            metrics::counter!(TOKEN_REQUESTS, "partner" => name.clone(), "outcome" => outcome)
                .increment(0);
        }
        metrics::counter!(REPLAYS, "partner" => name.clone()).increment(0);
        metrics::counter!(RATE_LIMIT_WAITS, "partner" => name.clone()).increment(0);
        metrics::gauge!(DISPATCH_STALLED, "partner" => name.clone()).set(0.0);
        metrics::gauge!(CONCURRENCY_LIMIT, "partner" => name.clone())
            .set(partner.max_in_flight as f64);
    }
}

/// A series' kind, as /metrics types it.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every series herald writes, with its unit and help text: described once
/// at start, so a scrape says what each means before its first sample.
const SERIES: &[(&str, Kind, Unit, &str)] = &[
    (INGEST_REQUESTS, Kind::Counter, Unit::Count, "POST /v1/events requests by outcome: accepted (202), rejected (4xx for the request's content), unavailable (503). Requests the guard refused first (token, limits) are not counted here."),
    (INGEST_EVENTS, Kind::Counter, Unit::Count, "Events in accepted requests: accepted (stored), duplicate (an idempotency_key seen before)."),
    (STORE_COMMIT_SECONDS, Kind::Histogram, Unit::Seconds, "Time of one store group commit, from gathering its requests to its fdatasync."),
    (STORE_COMMIT_REQUESTS, Kind::Histogram, Unit::Count, "Requests (ingests, outcomes, link changes) in one store group commit."),
    (STORE_FSYNCS, Kind::Counter, Unit::Count, "Store flushes ended by fdatasync, one per group commit."),
    (STORE_COMMIT_FAILURES, Kind::Counter, Unit::Count, "Store group commits that failed (a full or read-only disk); their requests were answered with errors."),
    (DELIVERIES, Kind::Counter, Unit::Count, "Delivery outcomes made durable, by partner: delivered, retried, dead_lettered, superseded."),
    (DELIVERY_LATENCY, Kind::Histogram, Unit::Seconds, "From an event's acceptance (or a replay) to its delivery, by partner and priority."),
    (QUEUE_DEPTH, Kind::Gauge, Unit::Count, "Deliveries waiting in the schedule (in flight included), by partner and priority."),
    (OLDEST_AGE, Kind::Gauge, Unit::Seconds, "Age of the oldest delivery not yet delivered (since its acceptance, to the second), by partner and priority; 0 when none waits."),
    (DEAD_LETTERS, Kind::Counter, Unit::Count, "Dead letters written, by partner and reason: retries_exhausted, rejected, route_gone, route_parked, not_sendable."),
    (REPLAYS, Kind::Counter, Unit::Count, "Dead letters replayed as new deliveries, by partner."),
    (DISPATCH_STALLED, Kind::Gauge, Unit::Count, "1 while a partner with its breaker closed has work due for longer than server.stall_after and no outcome recorded for as long."),
    (RATE_LIMIT_WAITS, Kind::Counter, Unit::Count, "Sends that waited for the partner's rate limit."),
    (BREAKER_STATE, Kind::Gauge, Unit::Count, "The partner's circuit breaker: 0 closed, 1 open, 2 half-open."),
    (CONCURRENCY_LIMIT, Kind::Gauge, Unit::Count, "Sends the partner may have in flight now (learned with concurrency = \"adaptive\")."),
    (PARKED_ROUTES, Kind::Gauge, Unit::Count, "Devices whose route to the partner is parked (the platform said the user or integration is gone)."),
    (MISCONFIGURED, Kind::Gauge, Unit::Count, "1 while the partner refuses herald's own setup (GET /v1/partners shows its alert)."),
    (TOKEN_REQUESTS, Kind::Counter, Unit::Count, "OAuth token refreshes by partner and outcome: renewed, retry, refused, misconfigured."),
    (DISK_FREE, Kind::Gauge, Unit::Bytes, "Free space on the data dir's filesystem."),
    (DISK_TOTAL, Kind::Gauge, Unit::Bytes, "Size of the data dir's filesystem."),
    (ATTEMPTS, Kind::Counter, Unit::Count, "Delivery attempts by partner and outcome: delivered, retry, failed (a dead letter)."),
    (SUPERSEDED, Kind::Counter, Unit::Count, "Deliveries not sent because a newer state of the same device replaced them."),
    (MISCONFIGURED_TOTAL, Kind::Counter, Unit::Count, "Answers in which the partner refused herald's own setup."),
    (KEEP_ALIVE_REFRESHES, Kind::Counter, Unit::Count, "Keep-alive refreshes of grants whose refresh token nears its lifetime, by partner and outcome: renewed, failed."),
    (HTTP_CONNECTIONS, Kind::Gauge, Unit::Count, "Open HTTP connections to herald's API."),
    (HTTP_CONNECTIONS_REFUSED, Kind::Counter, Unit::Count, "Connections answered 503 over server.max_connections."),
    (HTTP_ACCEPT_ERRORS, Kind::Counter, Unit::Count, "Errors accepting a connection (descriptors exhausted, ...)."),
    (HTTP_RATE_LIMITED, Kind::Counter, Unit::Count, "Requests answered 429 over a token's limits."),
    (STORE_REOPENS, Kind::Counter, Unit::Count, "Times the store was opened again by itself after a failed write."),
    (STORE_CHECKPOINT_SECONDS, Kind::Histogram, Unit::Seconds, "Time of one store checkpoint."),
    (STORE_DISK, Kind::Gauge, Unit::Bytes, "Bytes the data dir takes on disk."),
    (DISK_INTAKE, Kind::Gauge, Unit::Count, "Which events ingest takes for the disk's free space: 0 all, 1 critical only, 2 none."),
    (DISK_MIN_FREE, Kind::Gauge, Unit::Bytes, "server.min_free_disk on this filesystem: under it ingest takes critical events only (0: no limit)."),
];

fn describe() {
    for &(name, kind, unit, help) in SERIES {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, unit, help),
            Kind::Gauge => metrics::describe_gauge!(name, unit, help),
            Kind::Histogram => metrics::describe_histogram!(name, unit, help),
        }
    }
}

/// A delivery's outcome, durable now.
pub fn delivery(partner: &str, outcome: DeliveryOutcome) {
    metrics::counter!(DELIVERIES, "partner" => partner.to_string(), "outcome" => outcome.label())
        .increment(1);
}

/// A delivery delivered `latency` after its acceptance.
pub fn delivered_after(partner: &str, priority: Priority, latency: Duration) {
    metrics::histogram!(DELIVERY_LATENCY, "partner" => partner.to_string(), "priority" => priority_label(priority))
        .record(latency.as_secs_f64());
}

/// A dead letter written, durable now.
pub fn dead_letter(partner: &str, reason: DeadReason) {
    metrics::counter!(DEAD_LETTERS, "partner" => partner.to_string(), "reason" => reason.label())
        .increment(1);
}

/// A dead letter replayed, durable now.
pub fn replayed(partner: &str) {
    metrics::counter!(REPLAYS, "partner" => partner.to_string()).increment(1);
}

/// A partner × priority's queue as the writer keeps it.
pub fn queue(partner: &str, priority: Priority, depth: u64) {
    metrics::gauge!(QUEUE_DEPTH, "partner" => partner.to_string(), "priority" => priority_label(priority))
        .set(depth as f64);
}

/// The age of a partner × priority's oldest delivery not yet delivered.
pub fn oldest_age(partner: &str, priority: Priority, age: Duration) {
    metrics::gauge!(OLDEST_AGE, "partner" => partner.to_string(), "priority" => priority_label(priority))
        .set(age.as_secs() as f64);
}

/// Whether the partner's due work is stalled (see `api::ready`).
pub fn stalled(partner: &str, stalled: bool) {
    metrics::gauge!(DISPATCH_STALLED, "partner" => partner.to_string()).set(if stalled {
        1.0
    } else {
        0.0
    });
}

/// A send found the partner's rate limit spent and waited for a token.
pub fn rate_limit_wait(partner: &str) {
    metrics::counter!(RATE_LIMIT_WAITS, "partner" => partner.to_string()).increment(1);
}

/// One ingest request's outcome, by its answer's status.
pub fn ingest_request(status: u16) {
    let outcome = match status {
        200..=299 => "accepted",
        503 => "unavailable",
        _ => "rejected",
    };
    metrics::counter!(INGEST_REQUESTS, "outcome" => outcome).increment(1);
}

/// Events of an accepted request: `fresh` stored, `duplicates` not again.
pub fn ingest_events(fresh: u64, duplicates: u64) {
    metrics::counter!(INGEST_EVENTS, "outcome" => "accepted").increment(fresh);
    metrics::counter!(INGEST_EVENTS, "outcome" => "duplicate").increment(duplicates);
}

/// One store group commit of `requests`, taking `took`, durable or not.
pub fn group_commit(requests: usize, took: Duration, durable: bool) {
    metrics::histogram!(STORE_COMMIT_REQUESTS).record(requests as f64);
    metrics::histogram!(STORE_COMMIT_SECONDS).record(took.as_secs_f64());
    if !durable {
        metrics::counter!(STORE_COMMIT_FAILURES).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::retry::{Next, RetryPolicy};

    #[test]
    fn a_dead_letters_reason_is_one_of_a_few_labels_read_from_what_wrote_it() {
        // The give-up texts as the retry policy writes them.
        let policy = RetryPolicy {
            max_attempts: Some(2),
            ..RetryPolicy::default()
        };
        let id = uuid::Uuid::now_v7();
        let Next::GiveUp(attempts) = policy.next(id, 2, 0, 0, None, Priority::Normal) else {
            panic!("two failures of two allowed give up");
        };
        let late = 1_000 * 3600 * 24 * 365;
        let Next::GiveUp(age) = policy.next(id, 1, 0, late, None, Priority::Critical) else {
            panic!("a year late gives up");
        };
        for text in [attempts, age] {
            let reason = DeadReason::of(&format!("{text}; last: HTTP 503"), Some(503), false);
            assert_eq!(reason, DeadReason::RetriesExhausted, "{text}");
        }
        assert_eq!(
            DeadReason::of("HTTP 410 Gone", Some(410), true),
            DeadReason::RouteGone
        );
        assert_eq!(
            DeadReason::of(
                "not sent: the route was parked at 2026-11-25T06:00:00Z (HTTP 410)",
                None,
                false
            ),
            DeadReason::RouteParked
        );
        assert_eq!(
            DeadReason::of("HTTP 400: bad payload", Some(400), false),
            DeadReason::Rejected
        );
        assert_eq!(
            DeadReason::of("the device has no link to st", None, false),
            DeadReason::NotSendable
        );
        let labels: std::collections::HashSet<_> =
            DeadReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), DeadReason::ALL.len());
    }
}
