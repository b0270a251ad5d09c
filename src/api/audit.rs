//! `GET /v1/audit`: who replayed or purged which dead letters, and when.
//!
//! Entries are written by the store in the same commit as what they
//! record (see `store::jobs`), and read here oldest first, paged like the
//! dead-letter list. An entry names the caller's token by its name in the
//! config, never its secret.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::admin::store_failed;
use super::auth::Operator;
use super::paging::{next_cursor, read_query, IdPage};
use super::problem::Problem;
use super::replay::FilterView;
use super::AppState;
use crate::clock::rfc3339;
use crate::model::{AuditAction, AuditEntry};

#[derive(Deserialize)]
pub struct AuditQuery {
    /// The `next` cursor of the previous page.
    after: Option<String>,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct EntryView {
    id: String,
    at: String,
    token: String,
    action: AuditAction,
    #[serde(skip_serializing_if = "Option::is_none")]
    filter: Option<FilterView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<String>,
    count: u64,
}

impl From<&AuditEntry> for EntryView {
    fn from(e: &AuditEntry) -> Self {
        EntryView {
            id: e.id.to_string(),
            at: rfc3339(e.at_ms),
            token: e.token.clone(),
            action: e.action,
            filter: e.filter.as_ref().map(FilterView::from),
            target: e.target.map(|t| t.to_string()),
            event_id: e.event_id.map(|t| t.to_string()),
            count: e.count,
        }
    }
}

#[derive(Serialize)]
struct AuditPage {
    entries: Vec<EntryView>,
    next: Option<String>,
}

pub async fn list_audit(
    _: Operator,
    State(state): State<Arc<AppState>>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = read_query(query)?;
    let page = IdPage::read(q.after.as_deref(), q.limit, "audit entry")?;
    let found = state
        .store
        .audit_entries(page.after, page.limit)
        .map_err(store_failed)?;
    let next = next_cursor(&found, page.limit, |e| e.id.to_string());
    let entries = found.iter().map(EntryView::from).collect();
    Ok(Json(AuditPage { entries, next }).into_response())
}
