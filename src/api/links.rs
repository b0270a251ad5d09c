//! Device links over HTTP: `PUT`, `GET` and `DELETE /v1/links/{partner}/{device_id}`,
//! and `GET /v1/links/{partner}` for a page of a partner's links.
//!
//! The device maker's account service puts a link when a user connects a
//! device to a platform (and again whenever the platform hands out new
//! tokens); herald then routes the device's events there and keeps the
//! tokens fresh. Credentials belong to the link's grant (see
//! [`crate::links`]): a `PUT` with credentials replaces them for every link
//! of the same account, and one without leaves the account's as they are.
//! Operator role only. No answer ever carries a credential: the view names
//! the grant, says whether it holds credentials and when its access token
//! expires.

use std::sync::Arc;

use adapters::Credentials;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::admin::store_failed;
use super::auth::Operator;
use super::ingest::{check_text, parse_json, MAX_DEVICE_ID};
use super::paging::{next_cursor, page_limit, read_query};
use super::problem::Problem;
use super::AppState;
use crate::clock::rfc3339;
use crate::config::{check_url, PartnerConfig};
use crate::links::{Link, LinkError, StoredView};
use crate::model::StoredLink;

/// Bounds on what a link may hold: generous for any platform's tokens.
const MAX_FIELD: usize = 256;
const MAX_URL: usize = 2048;
const MAX_TOKEN: usize = 8192;
/// The largest a link's `options` may be, as JSON: with the other capped
/// fields, a link record stays far below sled's ~128 KiB blob threshold
/// (see [`super::ingest::MAX_EVENT_BYTES`]).
pub const MAX_OPTIONS_BYTES: usize = 16 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkBody {
    external_id: String,
    #[serde(default)]
    account: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    callback_url: Option<String>,
    #[serde(default)]
    token_url: Option<String>,
    #[serde(default)]
    credentials: Option<CredentialsBody>,
    #[serde(default)]
    options: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsBody {
    access_token: String,
    #[serde(default)]
    refresh_token: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    expires_at: Option<String>,
}

/// A link as the API shows it: never a secret.
#[derive(Serialize)]
struct LinkView<'a> {
    partner: &'a str,
    device_id: &'a str,
    external_id: &'a str,
    account: Option<&'a str>,
    region: Option<&'a str>,
    callback_url: Option<&'a str>,
    token_url: Option<&'a str>,
    /// The grant whose credentials the link presents: `account/<account>`,
    /// shared by the account's links, or `device/<device_id>`.
    grant: String,
    /// Whether the grant holds credentials (sealed at rest).
    has_credentials: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    options: Option<&'a RawValue>,
    generation: u64,
    updated_at: String,
}

impl<'a> From<&'a StoredView> for LinkView<'a> {
    fn from(view: &'a StoredView) -> Self {
        let l = &view.link;
        LinkView {
            partner: &l.partner,
            device_id: &l.device_id,
            external_id: &l.external_id,
            account: l.account.as_deref(),
            region: l.region.as_deref(),
            callback_url: l.callback_url.as_deref(),
            token_url: l.token_url.as_deref(),
            grant: l.grant(),
            has_credentials: view.has_credentials(),
            expires_at: view
                .expires_at_unix()
                .map(|s| rfc3339(s.saturating_mul(1000))),
            options: l.options.as_deref(),
            generation: l.generation,
            updated_at: rfc3339(l.updated_ms),
        }
    }
}

fn partner<'a>(state: &'a AppState, name: &str) -> Result<&'a PartnerConfig, Problem> {
    state
        .config
        .partner(name)
        .ok_or_else(|| Problem::not_found(format!("no partner {name:?} in the config")))
}

fn link_failed(e: LinkError) -> Problem {
    match e {
        LinkError::Store(e) => store_failed(e),
        LinkError::NoKey => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no-link-key",
            "herald cannot store link credentials",
            e.to_string(),
        ),
        LinkError::Unsealable { .. } => Problem::internal(e.to_string()),
    }
}

pub async fn put_link(
    Operator(caller): Operator,
    State(state): State<Arc<AppState>>,
    Path((name, device_id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, Problem> {
    let partner = partner(&state, &name)?;
    let link = validate(
        partner,
        &device_id,
        &body,
        state.config.server.link_key.is_some(),
    )?;
    if let Some(lane) = state.dispatcher.lane(&name) {
        lane.check_link(&link)
            .map_err(|e| Problem::invalid(format!("/{}", e.key), e.reason))?;
    }
    let put = state.links.put(link).await.map_err(link_failed)?;
    let created = put.created;
    if let Some(lane) = state.dispatcher.lane(&name) {
        for device in &put.relinked {
            lane.relinked(device);
        }
    }
    tracing::info!(partner = %name, device = %device_id, caller = %caller.name, created, "link put");
    let stored = stored(&state, &name, &device_id)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(LinkView::from(&stored))).into_response())
}

#[derive(Deserialize)]
pub struct LinkPageQuery {
    /// The `next` of the previous page: a device id.
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/links/{partner}`: the partner's links in device order, a page
/// at a time, without secrets.
pub async fn list_links(
    _: Operator,
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    query: Result<Query<LinkPageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    partner(&state, &name)?;
    let q = read_query(query)?;
    let limit = page_limit(q.limit, 100, 1000)?;
    let links = state
        .links
        .page_stored(&name, q.after.as_deref(), limit)
        .map_err(link_failed)?;
    let next = next_cursor(&links, limit, |l| l.link.device_id.clone());
    let views: Vec<LinkView> = links.iter().map(LinkView::from).collect();
    Ok(Json(serde_json::json!({ "partner": name, "links": views, "next": next })).into_response())
}

pub async fn get_link(
    _: Operator,
    State(state): State<Arc<AppState>>,
    Path((name, device_id)): Path<(String, String)>,
) -> Result<Response, Problem> {
    partner(&state, &name)?;
    let stored = stored(&state, &name, &device_id)?;
    Ok(Json(LinkView::from(&stored)).into_response())
}

pub async fn delete_link(
    Operator(caller): Operator,
    State(state): State<Arc<AppState>>,
    Path((name, device_id)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    partner(&state, &name)?;
    if !state
        .links
        .delete(&name, &device_id)
        .await
        .map_err(link_failed)?
    {
        return Err(no_link(&name, &device_id));
    }
    tracing::info!(partner = %name, device = %device_id, caller = %caller.name, "link deleted");
    Ok(StatusCode::NO_CONTENT)
}

fn stored(state: &AppState, partner: &str, device_id: &str) -> Result<StoredView, Problem> {
    state
        .links
        .get_stored(partner, device_id)
        .map_err(link_failed)?
        .ok_or_else(|| no_link(partner, device_id))
}

fn no_link(partner: &str, device_id: &str) -> Problem {
    Problem::not_found(format!("{device_id:?} has no link to {partner:?}"))
}

/// The link a `PUT` body describes, or the problem naming the bad field.
fn validate(
    partner: &PartnerConfig,
    device_id: &str,
    body: &[u8],
    can_seal: bool,
) -> Result<Link, Problem> {
    let invalid = |(field, detail): (String, String)| Problem::invalid(field, detail);
    check_text("/device_id", device_id, MAX_DEVICE_ID).map_err(invalid)?;
    let text =
        std::str::from_utf8(body).map_err(|_| Problem::bad_json("the body is not UTF-8 text"))?;
    // Syntax first, so a broken body is a 400 and a bad field a 422.
    serde_json::from_str::<&RawValue>(text).map_err(|e| Problem::bad_json(e.to_string()))?;
    let b: LinkBody = parse_json(text).map_err(invalid)?;
    check_text("/external_id", &b.external_id, MAX_FIELD).map_err(invalid)?;
    for (field, value) in [("/account", &b.account), ("/region", &b.region)] {
        if let Some(v) = value {
            check_text(field, v, MAX_FIELD).map_err(invalid)?;
        }
    }
    for (field, value) in [
        ("/callback_url", &b.callback_url),
        ("/token_url", &b.token_url),
    ] {
        if let Some(v) = value {
            check_text(field, v, MAX_URL).map_err(invalid)?;
            check_url(field, v, partner.allow_private)
                .map_err(|e| Problem::invalid(field, e.reason))?;
        }
    }
    if let Some(options) = &b.options {
        if !options.get().trim_start().starts_with('{') {
            return Err(Problem::invalid("/options", "must be a JSON object"));
        }
        if options.get().len() > MAX_OPTIONS_BYTES {
            return Err(Problem::too_large(format!(
                "options is {} bytes of JSON; the limit is {MAX_OPTIONS_BYTES}",
                options.get().len()
            ))
            .with_field("/options"));
        }
    }
    let credentials = match b.credentials {
        None => None,
        Some(c) => {
            if !can_seal {
                return Err(link_failed(LinkError::NoKey).with_field("/credentials"));
            }
            check_secret("/credentials/access_token", &c.access_token)?;
            if let Some(r) = &c.refresh_token {
                check_secret("/credentials/refresh_token", r)?;
            }
            let expires_at_unix = match &c.expires_at {
                None => None,
                Some(at) => Some(parse_time(at).ok_or_else(|| {
                    Problem::invalid(
                        "/credentials/expires_at",
                        format!("{at:?} is not an RFC 3339 time like 2026-11-26T06:00:00Z"),
                    )
                })?),
            };
            Some(Credentials {
                access_token: c.access_token,
                refresh_token: c.refresh_token,
                expires_at_unix,
            })
        }
    };
    Ok(Link {
        // Generation and time are the store's and the clock's to set.
        record: StoredLink {
            partner: partner.name.clone(),
            device_id: device_id.to_string(),
            external_id: b.external_id,
            account: b.account,
            region: b.region,
            callback_url: b.callback_url,
            token_url: b.token_url,
            sealed_credentials: None,
            expires_at_unix: None,
            options: b.options,
            generation: 0,
            updated_ms: 0,
            refresh_obtained_ms: None,
        },
        credentials,
        grant_generation: 0,
        refresh_obtained_ms: 0,
    })
}

/// A token: present, bounded, printable; the message never echoes it.
fn check_secret(field: &str, value: &str) -> Result<(), Problem> {
    if value.is_empty() {
        return Err(Problem::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_TOKEN {
        return Err(Problem::invalid(
            field,
            format!("is {} bytes; the limit is {MAX_TOKEN}", value.len()),
        ));
    }
    if value.chars().any(|c| c.is_control() || c == ' ') {
        return Err(Problem::invalid(
            field,
            "must not contain spaces or control characters",
        ));
    }
    Ok(())
}

fn parse_time(text: &str) -> Option<u64> {
    let at =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(at.unix_timestamp()).ok()
}
