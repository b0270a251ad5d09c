//! Dead letters, acted on: replay one, replay many, purge one or many.
//!
//! On-call replays once the cause is fixed (the partner is back, the link
//! was put again): `POST /v1/dead-letters/{id}/replay` gives the event a new
//! delivery to the same partner, which its lane reads at once;
//! `POST /v1/replays` makes a durable bulk replay job of every letter a
//! filter selects, worked at a capped rate (see [`crate::replays`]), and
//! `GET /v1/replays/{id}` shows how far it got. `POST
//! /v1/dead-letters/replay` is the older bulk replay, up to `limit` letters
//! in one call. A letter is replayed at most once and keeps its story;
//! `DELETE /v1/dead-letters/{id}` purges it for good, `POST
//! /v1/dead-letters/purge` every letter a filter selects. Each replay, job
//! and purge writes its audit entry in the same commit (see
//! [`super::audit`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::admin::{parse_id, parse_time, store_failed, DeadLetterQuery};
use super::auth::{Caller, Operator};
use super::paging::{next_cursor, page_limit, read_query, IdPage};
use super::problem::Problem;
use super::AppState;
use crate::clock::rfc3339;
use crate::model::{
    AuditAction, AuditEntry, DeadLetter, DeadLetterFilter, Priority, ReplayJob, ReplayJobState,
};
use crate::replays::{DEFAULT_RATE, MAX_RATE};
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

/// An audit entry of `action` by `caller`, now; the writer gives it its
/// id and sets its count from what the action did.
fn audit(state: &AppState, caller: &Caller, action: AuditAction) -> AuditEntry {
    AuditEntry {
        id: Uuid::nil(),
        at_ms: state.clock.now_ms(),
        token: caller.name.clone(),
        action,
        filter: None,
        target: None,
        event_id: None,
        count: 0,
    }
}

/// Replays `ids` (with `audit`, written if any was replayed) and tells
/// the lanes of the new deliveries.
async fn replay(
    state: &AppState,
    ids: &[Uuid],
    audit: AuditEntry,
) -> Result<Vec<Replayed>, Problem> {
    let done = state
        .store
        .replay(ids.to_vec(), state.clock.now_ms(), Some(audit))
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
    // Only for the audit entry: the writer reads the letter for the replay
    // and says what is wrong with it.
    let letter = state.store.dead_letter(id).ok().flatten();
    let entry = AuditEntry {
        target: Some(id),
        event_id: letter.map(|l| l.event.id),
        ..audit(&state, &caller, AuditAction::Replay)
    };
    let done = replay(&state, &[id], entry).await?;
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
    let filter = q.filter()?;
    let chosen = state
        .store
        .dead_letters(None, limit, &|d| {
            d.replayed_as.is_none() && filter.matches(d)
        })
        .map_err(store_failed)?;
    let ids: Vec<Uuid> = chosen.iter().map(|d| d.id).collect();
    let entry = AuditEntry {
        filter: Some(filter.clone()),
        ..audit(&state, &caller, AuditAction::Replay)
    };
    let done = replay(&state, &ids, entry).await?;
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
    let not_found = || Problem::not_found(format!("no dead letter {id}"));
    let letter = state
        .store
        .dead_letter(id)
        .map_err(store_failed)?
        .ok_or_else(not_found)?;
    let entry = AuditEntry {
        target: Some(id),
        event_id: Some(letter.event.id),
        ..audit(&state, &caller, AuditAction::Purge)
    };
    if state
        .store
        .purge(vec![id], Some(entry))
        .await
        .map_err(write_failed)?
        == 0
    {
        return Err(not_found());
    }
    tracing::info!(dead_letter = %id, caller = %caller.name, "dead letter purged");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// What a bulk request's body asks for: a filter, a dry run, a rate.
struct BulkRequest {
    filter: DeadLetterFilter,
    dry_run: bool,
    rate_per_second: Option<u32>,
}

/// Reads a bulk request's body: a JSON object of the filter's fields,
/// `dry_run`, and for a replay `rate_per_second` (and a partner that is
/// configured: a replay needs its lane; a purge may clear the letters of a
/// partner since removed). An unknown field or a bad value is refused
/// naming it; nothing is guessed.
fn read_bulk(state: &AppState, body: &Bytes, for_replay: bool) -> Result<BulkRequest, Problem> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        Problem::bad_json(format!(
            "the body must be a JSON object of filters ({{}} takes every dead letter): {e}"
        ))
    })?;
    let serde_json::Value::Object(fields) = value else {
        return Err(Problem::invalid(
            "",
            "the body must be a JSON object of filters ({} takes every dead letter)",
        ));
    };
    let mut request = BulkRequest {
        filter: DeadLetterFilter::default(),
        dry_run: false,
        rate_per_second: None,
    };
    for (name, value) in &fields {
        let pointer = format!("/{name}");
        let text = || -> Result<String, Problem> {
            match value.as_str() {
                Some(t) if !t.is_empty() => Ok(t.to_string()),
                _ => Err(Problem::invalid(
                    pointer.as_str(),
                    format!("{name} must be a non-empty string"),
                )),
            }
        };
        match name.as_str() {
            "partner" => {
                let partner = text()?;
                if for_replay && state.config.partner(&partner).is_none() {
                    return Err(Problem::invalid(
                        pointer,
                        format!("no partner {partner:?} in the config"),
                    ));
                }
                request.filter.partner = Some(partner);
            }
            "type" => request.filter.event_type = Some(text()?),
            "device_id" => request.filter.device_id = Some(text()?),
            "reason" => request.filter.reason = Some(text()?),
            "priority" => {
                request.filter.priority = Some(match text()?.as_str() {
                    "critical" => Priority::Critical,
                    "normal" => Priority::Normal,
                    other => {
                        return Err(Problem::invalid(
                            pointer,
                            format!("priority is \"critical\" or \"normal\", not {other:?}"),
                        ))
                    }
                })
            }
            "since" => request.filter.since_ms = Some(parse_time(&text()?, &pointer)?),
            "until" => request.filter.until_ms = Some(parse_time(&text()?, &pointer)?),
            "replayed" => {
                let replayed = value.as_bool().ok_or_else(|| {
                    Problem::invalid(pointer.as_str(), "replayed must be true or false")
                })?;
                // A replay takes only letters not yet replayed (each is
                // replayed at most once): `true` would select nothing.
                if for_replay && replayed {
                    return Err(Problem::invalid(
                        pointer,
                        "a replay takes only dead letters not yet replayed: leave replayed out, or false",
                    ));
                }
                request.filter.replayed = Some(replayed);
            }
            "dry_run" => {
                request.dry_run = value.as_bool().ok_or_else(|| {
                    Problem::invalid(pointer.as_str(), "dry_run must be true or false")
                })?
            }
            "rate_per_second" if for_replay => {
                let asked = value
                    .as_u64()
                    .filter(|r| (1..=u64::from(MAX_RATE)).contains(r))
                    .ok_or_else(|| {
                        Problem::invalid(
                            pointer.as_str(),
                            format!("rate_per_second must be a whole number from 1 to {MAX_RATE}"),
                        )
                    })?;
                request.rate_per_second = Some(asked as u32);
            }
            _ => {
                let known = match for_replay {
                    true => "partner, type, priority, device_id, reason, since, until, replayed, dry_run, rate_per_second",
                    false => "partner, type, priority, device_id, reason, since, until, replayed, dry_run",
                };
                return Err(Problem::invalid(
                    pointer,
                    format!("unknown field {name:?}; known: {known}"),
                ));
            }
        }
    }
    if let (Some(since), Some(until)) = (request.filter.since_ms, request.filter.until_ms) {
        if until <= since {
            return Err(Problem::invalid("/until", "until must be after since"));
        }
    }
    Ok(request)
}

/// The letters up to the newest one now that `keep` accepts: their ids,
/// how many of each partner, and the newest letter (where a job stops).
struct Matched {
    ids: Vec<Uuid>,
    partners: BTreeMap<String, u64>,
    last: Option<Uuid>,
}

/// Reads every letter up to the newest one (off the async workers: there
/// may be many).
async fn matching(
    state: &AppState,
    keep: impl Fn(&DeadLetter) -> bool + Send + 'static,
) -> Result<Matched, Problem> {
    let store = state.store.clone();
    let read = move || {
        let mut matched = Matched {
            ids: Vec::new(),
            partners: BTreeMap::new(),
            last: store.newest_dead_letter()?,
        };
        let Some(last) = matched.last else {
            return Ok(matched);
        };
        let mut cursor = None;
        loop {
            let page = store.dead_letter_page(cursor, last, 1_000, &keep)?;
            for letter in page.letters {
                matched.ids.push(letter.id);
                *matched.partners.entry(letter.partner).or_default() += 1;
            }
            if page.end {
                return Ok(matched);
            }
            cursor = page.cursor;
        }
    };
    tokio::task::spawn_blocking(read)
        .await
        .map_err(|e| Problem::internal(format!("reading the dead letters failed: {e}")))?
        .map_err(store_failed)
}

fn dry_run_answer(matched: &Matched) -> Response {
    Json(json!({
        "dry_run": true,
        "matched": matched.ids.len(),
        "partners": matched.partners,
    }))
    .into_response()
}

/// A filter as the API shows it: times as RFC 3339.
#[derive(Serialize, Deserialize)]
pub(super) struct FilterView {
    #[serde(skip_serializing_if = "Option::is_none")]
    partner: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    event_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<Priority>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    until: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replayed: Option<bool>,
}

impl From<&DeadLetterFilter> for FilterView {
    fn from(f: &DeadLetterFilter) -> Self {
        FilterView {
            partner: f.partner.clone(),
            event_type: f.event_type.clone(),
            priority: f.priority,
            device_id: f.device_id.clone(),
            reason: f.reason.clone(),
            since: f.since_ms.map(rfc3339),
            until: f.until_ms.map(rfc3339),
            replayed: f.replayed,
        }
    }
}

#[derive(Serialize)]
struct JobView {
    id: String,
    state: ReplayJobState,
    filter: FilterView,
    rate_per_second: u32,
    matched: u64,
    replayed: u64,
    /// Letters replayed or purged by someone else before the job reached them.
    skipped: u64,
    created_at: String,
    updated_at: String,
    created_by: String,
}

impl From<&ReplayJob> for JobView {
    fn from(job: &ReplayJob) -> Self {
        JobView {
            id: job.id.to_string(),
            state: job.state,
            filter: FilterView::from(&job.filter),
            rate_per_second: job.rate_per_second,
            matched: job.matched,
            replayed: job.replayed,
            skipped: job.skipped,
            created_at: rfc3339(job.created_ms),
            updated_at: rfc3339(job.updated_ms),
            created_by: job.created_by.clone(),
        }
    }
}

/// `POST /v1/replays`: a durable bulk replay of what the filter selects
/// (letters not replayed yet), or with `dry_run` how many and of which
/// partners, nothing written.
pub async fn create_job(
    Operator(caller): Operator,
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, Problem> {
    let request = read_bulk(&state, &body, true)?;
    let filter = request.filter;
    // A letter of a partner no longer configured has no lane to go through.
    let matched = matching(&state, {
        let (filter, config) = (filter.clone(), Arc::clone(&state.config));
        move |d| {
            d.replayed_as.is_none() && filter.matches(d) && config.partner(&d.partner).is_some()
        }
    })
    .await?;
    if request.dry_run {
        return Ok(dry_run_answer(&matched));
    }
    let now_ms = state.clock.now_ms();
    let count = matched.ids.len() as u64;
    let job = ReplayJob {
        // Given by the writer.
        id: Uuid::nil(),
        // Nothing to replay: done as it is made.
        state: match count {
            0 => ReplayJobState::Done,
            _ => ReplayJobState::Running,
        },
        filter: filter.clone(),
        rate_per_second: request.rate_per_second.unwrap_or(DEFAULT_RATE),
        matched: count,
        replayed: 0,
        skipped: 0,
        cursor: None,
        last: matched.last,
        created_ms: now_ms,
        updated_ms: now_ms,
        created_by: caller.name.clone(),
    };
    let entry = AuditEntry {
        filter: Some(filter),
        // The job's id, once the writer gives it.
        target: None,
        count,
        ..audit(&state, &caller, AuditAction::ReplayJob)
    };
    let job = state
        .store
        .start_replay_job(job, entry)
        .await
        .map_err(write_failed)?;
    tracing::info!(job = %job.id, matched = count, rate = job.rate_per_second, caller = %caller.name, "replay job made");
    if job.state == ReplayJobState::Running {
        state.replays.run(job.clone());
    }
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/replays/{}", job.id))],
        Json(JobView::from(&job)),
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct JobQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/replays`: jobs newest first, paged.
pub async fn list_jobs(
    _: Operator,
    State(state): State<Arc<AppState>>,
    query: Result<Query<JobQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = read_query(query)?;
    let page = IdPage::read(q.after.as_deref(), q.limit, "replay job")?;
    let jobs = state
        .store
        .replay_jobs(page.after, page.limit)
        .map_err(store_failed)?;
    let next = next_cursor(&jobs, page.limit, |j| j.id.to_string());
    let items: Vec<JobView> = jobs.iter().map(JobView::from).collect();
    Ok(Json(json!({ "items": items, "next": next })).into_response())
}

/// `GET /v1/replays/{id}`: one job and how far it got.
pub async fn get_job(
    _: Operator,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "replay job")?;
    let job = state
        .store
        .replay_job(id)
        .map_err(store_failed)?
        .ok_or_else(|| Problem::not_found(format!("no replay job {id}")))?;
    Ok(Json(JobView::from(&job)).into_response())
}

/// `POST /v1/dead-letters/purge`: removes every letter the filter selects
/// (replayed or not), or with `dry_run` says how many it would.
pub async fn purge_many(
    Operator(caller): Operator,
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, Problem> {
    let request = read_bulk(&state, &body, false)?;
    let filter = request.filter;
    let matched = matching(&state, {
        let filter = filter.clone();
        move |d| filter.matches(d)
    })
    .await?;
    if request.dry_run {
        return Ok(dry_run_answer(&matched));
    }
    let entry = AuditEntry {
        filter: Some(filter),
        ..audit(&state, &caller, AuditAction::PurgeFilter)
    };
    let purged = state
        .store
        .purge(matched.ids, Some(entry))
        .await
        .map_err(write_failed)?;
    tracing::info!(purged, caller = %caller.name, "dead letters purged by filter");
    Ok(Json(json!({ "purged": purged })).into_response())
}
