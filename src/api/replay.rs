//! Dead letters, acted on: replay one, replay many, purge one.
//!
//! On-call replays once the cause is fixed (the partner is back, the link
//! was put again): `POST /v1/dead-letters/{id}/replay` gives the event a new
//! delivery to the same partner, which its lane reads at once;
//! `POST /v1/dead-letters/replay` does it for every letter the list's
//! filters (`partner`, `type`, `priority`, `since`) select, up to `limit`
//! per call. A letter is replayed at most once and keeps its story;
//! `DELETE /v1/dead-letters/{id}` purges it for good.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use uuid::Uuid;

use super::admin::{parse_id, store_failed, DeadLetterQuery};
use super::auth::Operator;
use super::paging::{page_limit, read_query};
use super::problem::Problem;
use super::AppState;
use crate::store::{Replayed, StoreError};

/// Most letters one bulk call replays: one group commit stays small.
const MAX_BULK: usize = 10_000;

fn write_failed(e: StoreError) -> Problem {
    match e {
        StoreError::Busy | StoreError::Closed => {
            Problem::unavailable(format!("cannot replay now: {e}")).retry_after(1)
        }
        other => store_failed(other),
    }
}

/// Replays `ids` and hands the new deliveries to their lanes.
async fn replay(state: &AppState, ids: &[Uuid]) -> Result<Vec<Replayed>, Problem> {
    let done = state
        .store
        .replay(ids.to_vec(), state.clock.now_ms())
        .await
        .map_err(write_failed)?;
    let scheduled: Vec<_> = done
        .iter()
        .filter_map(|r| match r {
            Replayed::Scheduled(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    state.dispatcher.due_written(&scheduled);
    Ok(done)
}

pub async fn replay_one(
    Operator(caller): Operator,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "dead letter")?;
    let done = replay(&state, &[id]).await?;
    match done.into_iter().next() {
        Some(Replayed::Scheduled(due)) => {
            tracing::info!(dead_letter = %id, delivery = %due.delivery, partner = %due.partner,
                caller = %caller.name, "dead letter replayed");
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({
                    "dead_letter": id.to_string(),
                    "event_id": due.event.to_string(),
                    "partner": due.partner,
                    "delivery_id": due.delivery.to_string(),
                })),
            )
                .into_response())
        }
        Some(Replayed::Already(delivery)) => Err(Problem::new(
            StatusCode::CONFLICT,
            "already-replayed",
            "This dead letter was replayed before",
            format!("dead letter {id} was already replayed as delivery {delivery}; GET /v1/events shows how it went"),
        )),
        Some(Replayed::Failed(reason)) => Err(Problem::internal(format!(
            "dead letter {id} could not be replayed: {reason}"
        ))),
        Some(Replayed::Missing) | None => Err(Problem::not_found(format!("no dead letter {id}"))),
    }
}

pub async fn replay_many(
    Operator(caller): Operator,
    State(state): State<Arc<AppState>>,
    query: Result<Query<DeadLetterQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = read_query(query)?;
    let limit = page_limit(q.limit, 1000, MAX_BULK)?;
    if q.after.is_some() {
        return Err(Problem::invalid(
            "/after",
            "replays always start from the oldest letter not yet replayed; leave it out",
        ));
    }
    if let Some(partner) = &q.partner {
        if state.config.partner(partner).is_none() {
            return Err(Problem::invalid(
                "/partner",
                format!("no partner {partner:?} in the config"),
            ));
        }
    }
    let keep = q.filter()?;
    let chosen = state
        .store
        .dead_letters(None, limit, &|d| d.replayed_as.is_none() && keep(d))
        .map_err(store_failed)?;
    let ids: Vec<Uuid> = chosen.iter().map(|d| d.id).collect();
    let done = replay(&state, &ids).await?;
    let count = done
        .iter()
        .filter(|r| matches!(r, Replayed::Scheduled(_)))
        .count();
    let failed: Vec<String> = ids
        .iter()
        .zip(&done)
        .filter(|(_, r)| matches!(r, Replayed::Failed(_)))
        .map(|(id, _)| id.to_string())
        .collect();
    tracing::info!(replayed = count, failed = failed.len(), caller = %caller.name, "dead letters replayed in bulk");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "replayed": count, "failed": failed, "more": ids.len() == limit })),
    )
        .into_response())
}

pub async fn purge_one(
    Operator(caller): Operator,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "dead letter")?;
    if !state.store.purge(id).await.map_err(write_failed)? {
        return Err(Problem::not_found(format!("no dead letter {id}")));
    }
    tracing::info!(dead_letter = %id, caller = %caller.name, "dead letter purged");
    Ok(StatusCode::NO_CONTENT.into_response())
}
