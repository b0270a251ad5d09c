//! `/readyz` and what `/metrics` computes at a scrape.
//!
//! Ready means herald can take an event and get it delivered: not shutting
//! down, the store writing (the latest commit succeeded less than a second
//! ago, or a probe commit succeeds now), the disk above
//! `server.min_free_disk`, and no partner's due work stalled. `/healthz`
//! says only that the process is up.
//!
//! Stalled: a partner whose breaker is closed has a delivery in its
//! schedule due more than `server.stall_after` ago, and no outcome of it
//! was made durable for that long (nor since herald started). A partner
//! that is down is not stalled (its breaker is open: herald waits on
//! purpose, and the breaker's metric pages for it); one draining a backlog
//! is not either (its outcomes keep coming, however old the backlog).
//! Partners with `ordering = "per_device"` are not watched: their due work
//! may wait behind a device's earlier delivery.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::dispatch::breaker::State as Breaker;
use crate::model::Priority;

/// A successful commit this recent proves the store writes: no probe.
const RECENT_COMMIT: Duration = Duration::from_secs(1);
/// How long a probe commit may take before the store counts as not writing.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// 200 "ready", or 503 and every reason why not, one a line.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let mut why = Vec::new();
    if state.is_draining() {
        why.push("draining".to_string());
    }
    if let Some(store) = store_cannot_write(&state).await {
        why.push(store);
    }
    if let Some(disk) = state.disk.not_ready() {
        why.push(disk);
    }
    why.extend(stalled(&state).into_iter().map(|(_, why)| why));
    match why.is_empty() {
        true => "ready".into_response(),
        false => (StatusCode::SERVICE_UNAVAILABLE, why.join("\n")).into_response(),
    }
}

async fn store_cannot_write(state: &AppState) -> Option<String> {
    if let Some(why) = state.store.out_because() {
        return Some(format!(
            "store unavailable: it is being opened again after a failed write ({why})"
        ));
    }
    if let Some((ago, None)) = state.store.last_commit() {
        if ago < RECENT_COMMIT {
            return None;
        }
    }
    match tokio::time::timeout(PROBE_TIMEOUT, state.store.probe()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("store cannot write: {e}")),
        Err(_) => Some(format!(
            "store cannot write: a probe write did not complete within {PROBE_TIMEOUT:?}"
        )),
    }
}

/// Each partner whose due work is stalled, with why.
fn stalled(state: &AppState) -> Vec<(String, String)> {
    let now = state.clock.now_ms();
    let after = state.config.server.stall_after;
    let Some(cutoff) = now.checked_sub(after.as_millis() as u64) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for lane in state.dispatcher.lanes() {
        let partner = &lane.partner.name;
        if lane.breaker.state() != Breaker::Closed {
            continue;
        }
        // With `ordering = "per_device"` due work may rightly wait behind
        // its device's earlier delivery, retried later: not a stall. A
        // stalled dispatcher stalls the other partners' lanes too.
        if lane.partner.ordered_per_device {
            continue;
        }
        let since = state
            .store
            .last_outcome_ms(partner)
            .unwrap_or(0)
            .max(state.started_ms);
        if since > cutoff {
            continue;
        }
        match state.store.has_due_by(partner, cutoff) {
            Ok(true) => found.push((
                partner.clone(),
                format!(
                    "dispatcher stalled: partner {partner} has deliveries due over {} ago and no outcome recorded for as long (server.stall_after)",
                    humantime::format_duration(after)
                ),
            )),
            Ok(false) => {}
            // The store's own check says why it is out.
            Err(_) => {}
        }
    }
    found
}

/// Brings the gauges a scrape computes up to now: each partner ×
/// priority's oldest undelivered age, and whether its work is stalled.
pub fn refresh_gauges(state: &AppState) {
    let now = state.clock.now_ms();
    let stalled: Vec<String> = stalled(state).into_iter().map(|(p, _)| p).collect();
    for partner in &state.config.partners {
        let name = &partner.name;
        for priority in Priority::ALL {
            let queue = state.store.queue(name, priority);
            let age = queue
                .oldest_ms
                .map_or(0, |oldest| now.saturating_sub(oldest));
            crate::telemetry::oldest_age(name, priority, Duration::from_millis(age));
        }
        crate::telemetry::stalled(name, stalled.contains(name));
    }
}
