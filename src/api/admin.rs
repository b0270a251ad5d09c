//! What on-call reads: an event with each delivery's story, and dead letters.
//!
//! Views are built for people: times as RFC 3339, every attempt with its
//! status, latency and a bounded snippet of the partner's answer.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use super::auth::Operator;
use super::paging::{next_cursor, read_query, IdPage};
use super::problem::Problem;
use super::AppState;
use crate::clock::rfc3339;
use crate::model::{
    Attempt, AttemptLog, DeadLetterFilter, DeliveryRecord, DeliveryState, EventRecord, Priority,
};

#[derive(Serialize)]
struct EventView<'a> {
    id: String,
    device_id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    priority: Priority,
    occurred_at: &'a str,
    received_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<&'a str>,
    data: &'a RawValue,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    deliveries: Vec<DeliveryView>,
}

#[derive(Serialize)]
struct DeliveryView {
    id: String,
    partner: String,
    state: DeliveryState,
    attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_attempt_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_letter: Option<String>,
    /// The newer delivery that carried this one's state instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    superseded_by: Option<String>,
    history: Vec<AttemptView>,
    #[serde(skip_serializing_if = "is_zero")]
    history_omitted: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Serialize)]
struct AttemptView {
    number: u32,
    at: String,
    at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    latency_ms: u64,
    outcome: crate::model::AttemptOutcome,
    #[serde(skip_serializing_if = "String::is_empty")]
    detail: String,
}

impl From<&Attempt> for AttemptView {
    fn from(a: &Attempt) -> Self {
        AttemptView {
            number: a.number,
            at: rfc3339(a.at_ms),
            at_ms: a.at_ms,
            status: a.status,
            latency_ms: a.latency_ms,
            outcome: a.outcome,
            detail: a.detail.clone(),
        }
    }
}

/// A path's id: a malformed one is the caller's mistake (400, naming the
/// parameter), not a resource that is missing (404).
pub(super) fn parse_id(text: &str, what: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(text).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "bad-path-parameter",
            "A path parameter is malformed",
            format!("the path parameter id ({text:?}) is not a {what} id, a UUID: {e}"),
        )
        .with_field("/id")
    })
}

pub(super) fn store_failed(e: crate::store::StoreError) -> Problem {
    tracing::error!(error = %e, "an admin read failed");
    Problem::internal(format!("the store could not be read: {e}"))
}

pub async fn get_event(
    _: Operator,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "event")?;
    let event = state
        .store
        .event(id)
        .map_err(store_failed)?
        .ok_or_else(|| {
            Problem::not_found(format!(
                "no event {id} (never accepted, or past server.retention)"
            ))
        })?;
    let mut deliveries = Vec::with_capacity(event.deliveries.len());
    for d in &event.deliveries {
        deliveries.push(delivery_view(&state, d)?);
    }
    Ok(Json(event_view(&event, deliveries)).into_response())
}

fn event_view(event: &EventRecord, deliveries: Vec<DeliveryView>) -> EventView<'_> {
    EventView {
        id: event.id.to_string(),
        device_id: &event.device_id,
        event_type: &event.event_type,
        priority: event.priority,
        occurred_at: &event.occurred_at,
        received_at: rfc3339(event.received_ms),
        idempotency_key: event.idempotency_key.as_deref(),
        data: &event.data,
        deliveries,
    }
}

fn delivery_view(state: &AppState, d: &DeliveryRecord) -> Result<DeliveryView, Problem> {
    // The full log lives with the dead letter, or under the delivery once it
    // failed at least once; a first-try success has only its last attempt.
    let log: Option<AttemptLog> = match d.dead_letter {
        Some(dead) => state
            .store
            .dead_letter(dead)
            .map_err(store_failed)?
            .map(|l| l.attempts),
        None if d.attempts > 1 || d.state == DeliveryState::Pending => {
            state.store.attempt_log(d.id).map_err(store_failed)?
        }
        None => None,
    };
    let (history, omitted) = match log {
        Some(log) => (
            log.attempts.iter().map(AttemptView::from).collect(),
            log.omitted,
        ),
        None => (d.last_attempt.iter().map(AttemptView::from).collect(), 0),
    };
    Ok(DeliveryView {
        id: d.id.to_string(),
        partner: d.partner.clone(),
        state: d.state,
        attempts: d.attempts,
        next_attempt_at: d
            .next_due_ms
            .filter(|_| d.state == DeliveryState::Pending)
            .map(rfc3339),
        dead_letter: d.dead_letter.map(|u| u.to_string()),
        superseded_by: d.superseded_by.map(|u| u.to_string()),
        history,
        history_omitted: omitted,
    })
}

#[derive(Deserialize)]
pub struct DeadLetterQuery {
    pub(super) partner: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    priority: Option<Priority>,
    device_id: Option<String>,
    /// Only dead letters whose reason contains this text.
    reason: Option<String>,
    /// Only dead letters that died at or after this time (RFC 3339).
    since: Option<String>,
    /// Only dead letters that died before this time (RFC 3339).
    until: Option<String>,
    /// Only dead letters already replayed (`true`) or not yet (`false`).
    replayed: Option<bool>,
    /// The `next` cursor of the previous page.
    pub(super) after: Option<String>,
    pub(super) limit: Option<usize>,
}

/// An RFC 3339 time as unix milliseconds; the error names `pointer`.
pub(super) fn parse_time(text: &str, pointer: &str) -> Result<u64, Problem> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64)
        .map_err(|e| Problem::invalid(pointer, format!("{text:?} is not an RFC 3339 time ({e})")))
}

impl DeadLetterQuery {
    /// The query's filters (partner, type, priority, device_id, reason,
    /// since, until, replayed); the error names the bad one.
    pub(super) fn filter(&self) -> Result<DeadLetterFilter, Problem> {
        Ok(DeadLetterFilter {
            partner: self.partner.clone(),
            event_type: self.event_type.clone(),
            priority: self.priority,
            device_id: self.device_id.clone(),
            reason: self.reason.clone(),
            since_ms: self
                .since
                .as_deref()
                .map(|t| parse_time(t, "/since"))
                .transpose()?,
            until_ms: self
                .until
                .as_deref()
                .map(|t| parse_time(t, "/until"))
                .transpose()?,
            replayed: self.replayed,
        })
    }
}

#[derive(Serialize)]
struct DeadLetterSummary {
    id: String,
    partner: String,
    event_id: String,
    delivery_id: String,
    device_id: String,
    #[serde(rename = "type")]
    event_type: String,
    priority: Priority,
    died_at: String,
    attempts: u32,
    reason: String,
    /// The delivery a replay made of it, once replayed.
    #[serde(skip_serializing_if = "Option::is_none")]
    replayed_as: Option<String>,
}

#[derive(Serialize)]
struct DeadLetterPage {
    items: Vec<DeadLetterSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

pub async fn list_dead_letters(
    _: Operator,
    State(state): State<Arc<AppState>>,
    query: Result<Query<DeadLetterQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = read_query(query)?;
    let page = IdPage::read(q.after.as_deref(), q.limit, "dead letter")?;
    let filter = q.filter()?;
    let found = state
        .store
        .dead_letters(page.after, page.limit, &|d| filter.matches(d))
        .map_err(store_failed)?;
    let next = next_cursor(&found, page.limit, |d| d.id.to_string());
    let items = found
        .into_iter()
        .map(|d| DeadLetterSummary {
            id: d.id.to_string(),
            event_id: d.event.id.to_string(),
            delivery_id: d.delivery_id.to_string(),
            device_id: d.event.device_id.clone(),
            event_type: d.event.event_type.clone(),
            priority: d.event.priority,
            died_at: rfc3339(d.died_ms),
            attempts: d.attempts.attempts.len() as u32 + d.attempts.omitted,
            reason: d.reason,
            partner: d.partner,
            replayed_as: d.replayed_as.map(|id| id.to_string()),
        })
        .collect();
    Ok(Json(DeadLetterPage { items, next }).into_response())
}

#[derive(Serialize)]
struct DeadLetterView<'a> {
    id: String,
    partner: &'a str,
    delivery_id: String,
    reason: &'a str,
    died_at: String,
    event: EventView<'a>,
    attempts: Vec<AttemptView>,
    #[serde(skip_serializing_if = "is_zero")]
    attempts_omitted: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    replayed_as: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replayed_at: Option<String>,
}

pub async fn get_dead_letter(
    _: Operator,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "dead letter")?;
    let dead = state
        .store
        .dead_letter(id)
        .map_err(store_failed)?
        .ok_or_else(|| Problem::not_found(format!("no dead letter {id}")))?;
    let view = DeadLetterView {
        id: dead.id.to_string(),
        partner: &dead.partner,
        delivery_id: dead.delivery_id.to_string(),
        reason: &dead.reason,
        died_at: rfc3339(dead.died_ms),
        event: event_view(&dead.event, Vec::new()),
        attempts: dead
            .attempts
            .attempts
            .iter()
            .map(AttemptView::from)
            .collect(),
        attempts_omitted: dead.attempts.omitted,
        replayed_as: dead.replayed_as.map(|id| id.to_string()),
        replayed_at: dead.replayed_ms.map(rfc3339),
    };
    Ok(Json(view).into_response())
}
