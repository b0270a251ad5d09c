//! Partners as on-call sees them: queue depth, limits, breaker, counts,
//! parked routes.
//!
//! `GET /v1/partners` answers "is this partner OK right now?" (its
//! `alert`, when present, says the platform refuses herald's own setup);
//! `GET /v1/partners/{name}/parked` lists the devices whose route the
//! partner said is gone, and `DELETE .../parked/{device_id}` clears one once
//! the integration is back, so deliveries to it are sent again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::admin::store_failed;
use super::auth::Operator;
use super::problem::Problem;
use super::AppState;
use crate::clock::rfc3339;
use crate::dispatch::lane::Lane;
use crate::model::{ParkedRoute, Priority};

/// One partner as on-call sees it: its limits, its breaker, what it did.
#[derive(Serialize)]
struct PartnerView {
    name: String,
    adapter: String,
    breaker: crate::dispatch::breaker::State,
    /// While the breaker is open: when it lets one probe through.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_probe_at: Option<String>,
    /// Deliveries waiting in the schedule, in flight included.
    queued: u64,
    /// The same by priority, with the age of the oldest waiting one.
    queues: Queues,
    in_flight: usize,
    max_in_flight: usize,
    /// What may be in flight now: learned with `concurrency = "adaptive"`.
    concurrency_limit: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_per_second: Option<u32>,
    /// Since this process started.
    sent: u64,
    delivered: u64,
    retried: u64,
    dead: u64,
    /// Replaced by a newer state before being sent (`coalesce_state`).
    superseded: u64,
    /// Present while the platform refuses herald's own setup (client
    /// secret, permission, region, quota): deliveries are retried, not
    /// parked, until someone fixes the config.
    #[serde(skip_serializing_if = "Option::is_none")]
    alert: Option<crate::dispatch::alert::AlertView>,
    /// Delivered and failed in each of the last 60 minutes (herald's
    /// clock), oldest first, ending with the current minute; since this
    /// process started.
    last_hour: Vec<MinuteView>,
}

#[derive(Serialize)]
struct MinuteView {
    /// The minute's start.
    minute: String,
    delivered: u64,
    /// Attempts that failed: retried later, or dead-lettered.
    failed: u64,
}

/// A partner's waiting deliveries by priority.
#[derive(Serialize)]
struct Queues {
    critical: QueueAge,
    normal: QueueAge,
}

#[derive(Serialize)]
struct QueueAge {
    depth: u64,
    /// When the oldest waiting delivery was enqueued (to the second), and
    /// how long ago that is on herald's clock: what
    /// `herald_oldest_undelivered_age_seconds` says.
    #[serde(skip_serializing_if = "Option::is_none")]
    oldest_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    oldest_age_seconds: Option<f64>,
}

impl QueueAge {
    fn of(view: crate::store::QueueView, now_ms: u64) -> QueueAge {
        QueueAge {
            depth: view.depth,
            oldest_at: view.oldest_ms.map(rfc3339),
            oldest_age_seconds: view
                .oldest_ms
                .map(|at| now_ms.saturating_sub(at) as f64 / 1000.0),
        }
    }
}

pub async fn list_partners(_: Operator, State(state): State<Arc<AppState>>) -> Response {
    let count = |n: &AtomicU64| n.load(Ordering::Relaxed);
    let now_ms = state.clock.now_ms();
    let mut partners: Vec<PartnerView> = state
        .dispatcher
        .lanes()
        .map(|lane| PartnerView {
            name: lane.partner.name.clone(),
            adapter: lane.partner.adapter_kind.clone(),
            breaker: lane.breaker.state(),
            next_probe_at: lane.breaker.next_probe_ms().map(rfc3339),
            queued: state.store.queued(&lane.partner.name),
            queues: Queues {
                critical: QueueAge::of(
                    state.store.queue(&lane.partner.name, Priority::Critical),
                    now_ms,
                ),
                normal: QueueAge::of(
                    state.store.queue(&lane.partner.name, Priority::Normal),
                    now_ms,
                ),
            },
            in_flight: lane.in_flight(),
            max_in_flight: lane.partner.max_in_flight,
            concurrency_limit: lane.concurrency_limit(),
            rate_per_second: lane.partner.rate.map(|r| r.per_second),
            sent: count(&lane.stats.sent),
            delivered: count(&lane.stats.delivered),
            retried: count(&lane.stats.retried),
            dead: count(&lane.stats.dead),
            superseded: count(&lane.stats.superseded),
            alert: lane.alert.view(),
            last_hour: lane
                .stats
                .minutes
                .last_hour(now_ms)
                .into_iter()
                .map(|m| MinuteView {
                    minute: rfc3339(m.start_ms()),
                    delivered: m.delivered,
                    failed: m.failed,
                })
                .collect(),
        })
        .collect();
    partners.sort_by(|a, b| a.name.cmp(&b.name));
    Json(serde_json::json!({ "partners": partners })).into_response()
}

#[derive(Serialize)]
struct ParkedView<'a> {
    device_id: &'a str,
    reason: &'a str,
    parked_at: String,
    delivery_id: String,
    event_id: String,
}

impl<'a> From<&'a ParkedRoute> for ParkedView<'a> {
    fn from(r: &'a ParkedRoute) -> Self {
        ParkedView {
            device_id: &r.device_id,
            reason: &r.reason,
            parked_at: rfc3339(r.parked_ms),
            delivery_id: r.delivery_id.to_string(),
            event_id: r.event_id.to_string(),
        }
    }
}

fn lane<'a>(state: &'a AppState, name: &str) -> Result<&'a Arc<Lane>, Problem> {
    state
        .dispatcher
        .lane(name)
        .ok_or_else(|| Problem::not_found(format!("no partner {name:?} in the config")))
}

pub async fn list_parked(
    _: Operator,
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    let routes = lane(&state, &name)?.parked.list();
    let items: Vec<ParkedView> = routes.iter().map(ParkedView::from).collect();
    Ok(Json(serde_json::json!({ "partner": name, "parked": items })).into_response())
}

pub async fn clear_parked(
    Operator(caller): Operator,
    State(state): State<Arc<AppState>>,
    Path((name, device_id)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    let lane = lane(&state, &name)?;
    if !lane.unpark(&device_id).await.map_err(store_failed)? {
        return Err(Problem::not_found(format!(
            "{device_id:?} is not parked at {name:?}"
        )));
    }
    tracing::info!(partner = %name, device = %device_id, caller = %caller.name, "parked route cleared by an operator");
    Ok(StatusCode::NO_CONTENT)
}
