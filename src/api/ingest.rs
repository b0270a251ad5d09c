//! `POST /v1/events`: validate, resolve deliveries, make durable, answer.
//!
//! A request is all or nothing: one bad event in a batch rejects the batch
//! with the pointer of the bad field, and nothing is stored. A 202 is sent
//! only once the store's group commit holding the events is on disk.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::sync::Arc;

use super::auth::Ingest;
use super::problem::Problem;
use super::AppState;
use crate::clock::rfc3339;
use crate::model::{DeliveryRecord, EventRecord, Priority};
use crate::store::{Accepted, StoreError};

/// The largest one event may be, as JSON: keeps every record far below
/// sled's ~128 KiB blob threshold, where a log item leaves the segment
/// for a file of its own (one open, write and sync of a file and its
/// directory each, in herald's sled).
pub const MAX_EVENT_BYTES: usize = 64 * 1024;
pub(super) const MAX_DEVICE_ID: usize = 256;
const MAX_TYPE: usize = 128;
const MAX_IDEMPOTENCY_KEY: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IncomingEvent {
    device_id: String,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    priority: Priority,
    #[serde(default)]
    occurred_at: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    partners: Option<Vec<String>>,
}

#[derive(Serialize)]
pub struct AcceptedBody {
    id: String,
    deliveries: Vec<DeliveryRef>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

#[derive(Serialize)]
struct DeliveryRef {
    partner: String,
    id: String,
}

impl From<Accepted> for AcceptedBody {
    fn from(a: Accepted) -> Self {
        AcceptedBody {
            id: a.id.to_string(),
            deliveries: a
                .deliveries
                .into_iter()
                .map(|(partner, id)| DeliveryRef {
                    partner,
                    id: id.to_string(),
                })
                .collect(),
            duplicate: a.duplicate,
        }
    }
}

pub async fn post_events(
    caller: Ingest,
    state: State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let answer = accept(caller, state, body).await;
    let status = match &answer {
        Ok(response) => response.status().as_u16(),
        Err(problem) => problem.status,
    };
    crate::telemetry::ingest_request(status);
    answer
}

async fn accept(
    Ingest(caller): Ingest,
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    if state.is_draining() {
        return Err(Problem::unavailable("herald is shutting down"));
    }
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => Problem::too_large(format!(
            "the body is over server.max_body_bytes ({} bytes)",
            state.config.server.max_body_bytes
        )),
        _ => Problem::bad_json(format!("cannot read the body: {e}")),
    })?;
    let (events, batch) = split(&body, state.config.server.max_batch)?;
    let now_ms = state.clock.now_ms();
    let mut records = Vec::with_capacity(events.len());
    for (index, raw) in events.iter().enumerate() {
        let at = |field: &str| match batch {
            true => format!("/{index}{field}"),
            false => field.to_string(),
        };
        if raw.get().len() > MAX_EVENT_BYTES {
            return Err(Problem::too_large(format!(
                "the event is {} bytes; the limit is {MAX_EVENT_BYTES}",
                raw.get().len()
            ))
            .with_field(at(&largest_member(raw.get()))));
        }
        let incoming = parse_json::<IncomingEvent>(raw.get())
            .map_err(|(field, detail)| Problem::invalid(at(&field), detail))?;
        let record = validate(&state, incoming, now_ms).map_err(|r| match r {
            Rejected::Invalid(field, detail) => Problem::invalid(at(&field), detail),
            Rejected::Unavailable(detail) => Problem::unavailable(detail),
        })?;
        records.push(record);
    }
    let all_critical = records.iter().all(|r| r.priority == Priority::Critical);
    if let Some(why) = state.disk.refusal(all_critical) {
        return Err(Problem::disk_low(why));
    }
    if let Some(why) = state.store.out_because() {
        // Answered now rather than after the writer's wait for the store.
        return Err(Problem::unavailable(format!(
            "the store is being opened again after a failed write ({why})"
        )));
    }
    let count = records.len();
    let accepted = state.store.enqueue(records).await.map_err(|e| match e {
        StoreError::Busy => Problem::unavailable("the write queue is full; retry shortly"),
        StoreError::Closed => Problem::unavailable("herald is shutting down"),
        other => {
            tracing::error!(error = %other, "an ingest write failed; answered 503");
            // sled may have made the batch durable and still reported
            // the failure: its lanes read the whole schedule again soon.
            state.dispatcher.rescan_soon();
            Problem::unavailable(format!("the events could not be stored: {other}"))
        }
    })?;
    for a in &accepted {
        state.dispatcher.due_written(&a.scheduled);
    }
    let fresh = accepted.iter().filter(|a| !a.duplicate).count();
    crate::telemetry::ingest_events(fresh as u64, (accepted.len() - fresh) as u64);
    tracing::debug!(caller = %caller.name, events = count, "accepted");
    let answer: Vec<AcceptedBody> = accepted.into_iter().map(AcceptedBody::from).collect();
    Ok(if batch {
        (StatusCode::ACCEPTED, Json(answer)).into_response()
    } else {
        let single = answer
            .into_iter()
            .next()
            .ok_or_else(|| Problem::internal("no answer for the event"))?;
        (StatusCode::ACCEPTED, Json(single)).into_response()
    })
}

/// The body's events, as raw JSON, and whether it was a batch.
fn split(body: &[u8], max_batch: usize) -> Result<(Vec<&RawValue>, bool), Problem> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        Some(b'[') => {
            let events: Vec<&RawValue> = serde_json::from_slice(body).map_err(|e| {
                Problem::bad_json(format!("the body is not a JSON array of events: {e}"))
            })?;
            if events.is_empty() {
                return Err(Problem::invalid("", "the batch is empty"));
            }
            if events.len() > max_batch {
                return Err(Problem::too_large(format!(
                    "the batch has {} events; the limit is {max_batch} (server.max_batch)",
                    events.len()
                )));
            }
            Ok((events, true))
        }
        Some(b'{') => {
            let event: &RawValue = serde_json::from_slice(body)
                .map_err(|e| Problem::bad_json(format!("the body is not a JSON object: {e}")))?;
            Ok((vec![event], false))
        }
        _ => Err(Problem::bad_json(
            "the body must be a JSON object (one event) or an array of them",
        )),
    }
}

/// The pointer of an oversize event's largest member (`/device_id`, `/data`),
/// so the caller knows what to shorten; empty when the event is not an object.
fn largest_member(event: &str) -> String {
    serde_json::from_str::<std::collections::BTreeMap<String, &RawValue>>(event)
        .ok()
        .and_then(|members| {
            members
                .into_iter()
                .max_by_key(|(_, value)| value.get().len())
                .map(|(name, _)| format!("/{name}"))
        })
        .unwrap_or_default()
}

/// Whether a field may hold a secret (a token, a key, credentials): a
/// problem about it must not repeat the value sent.
fn holds_secret(pointer: &str) -> bool {
    pointer.split('/').any(|segment| {
        let segment = segment.to_ascii_lowercase();
        ["credentials", "token", "secret", "password"]
            .iter()
            .any(|word| segment.contains(word))
    })
}

/// A serde message without the value it quotes: `invalid type: string
/// "s3cr3t", expected a map` becomes `invalid type: string, expected a map`.
/// The field's path and the expected type stay; the value never does.
fn redact_value(message: &str) -> String {
    // These quote a field's name, not its value.
    if message.starts_with("missing field") || message.starts_with("unknown field") {
        return message.to_string();
    }
    let expected = message
        .find(", expected ")
        .map(|at| &message[at..])
        .unwrap_or("");
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let kind = rest
                .split([' ', ','])
                .next()
                .filter(|kind| kind.chars().all(|c| c.is_ascii_alphabetic()))
                .unwrap_or("value");
            return format!(
                "{prefix}{kind}{expected} (the value is not repeated: the field holds a secret)"
            );
        }
    }
    if message.contains(['"', '`', '\'']) {
        return format!(
            "bad value{expected} (the value is not repeated: the field holds a secret)"
        );
    }
    message.to_string()
}

/// Parses one JSON document (an event, a link); on failure, the field's
/// JSON pointer and what is wrong.
pub(super) fn parse_json<T: serde::de::DeserializeOwned>(
    json: &str,
) -> Result<T, (String, String)> {
    // Tracking the path costs on every value; only a failure needs it, so
    // a document that parses is parsed once, plainly.
    if let Ok(value) = serde_json::from_str(json) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let mut pointer: String = e
            .path()
            .iter()
            .map(|segment| match segment {
                serde_path_to_error::Segment::Seq { index } => format!("/{index}"),
                serde_path_to_error::Segment::Map { key } => format!("/{key}"),
                serde_path_to_error::Segment::Enum { variant } => format!("/{variant}"),
                serde_path_to_error::Segment::Unknown => "/?".to_string(),
            })
            .collect();
        let message = e.inner().to_string();
        // serde reports a missing field at its parent: name the field itself.
        if let Some(missing) = message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
        {
            pointer.push('/');
            pointer.push_str(missing);
        }
        let message = strip_position(&message);
        let message = match holds_secret(&pointer) {
            true => redact_value(&message),
            false => message,
        };
        (pointer, message)
    })
}

/// serde_json's "at line 1 column 40" means nothing to a caller who sent one event.
fn strip_position(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// Why an event is not taken: bad input (422), or herald cannot tell now (503).
enum Rejected {
    Invalid(String, String),
    Unavailable(String),
}

impl From<(String, String)> for Rejected {
    fn from((field, detail): (String, String)) -> Self {
        Rejected::Invalid(field, detail)
    }
}

fn validate(state: &AppState, e: IncomingEvent, now_ms: u64) -> Result<EventRecord, Rejected> {
    let bad = |field: &str, detail: String| Err(Rejected::Invalid(field.to_string(), detail));
    check_text("/device_id", &e.device_id, MAX_DEVICE_ID)?;
    check_text("/type", &e.event_type, MAX_TYPE)?;
    if let Some(key) = &e.idempotency_key {
        check_text("/idempotency_key", key, MAX_IDEMPOTENCY_KEY)?;
    }
    let occurred_at = match e.occurred_at {
        Some(text) => {
            match time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
            {
                Ok(_) => text,
                Err(err) => {
                    return bad(
                        "/occurred_at",
                        format!(
                            "{text:?} is not an RFC 3339 time like 2026-11-25T06:00:00Z ({err})"
                        ),
                    )
                }
            }
        }
        None => rfc3339(now_ms),
    };
    let data = match e.data {
        Some(data) if data.get().trim_start().starts_with('{') => data,
        Some(_) => return bad("/data", "must be a JSON object".into()),
        None => RawValue::from_string("{}".into())
            .map_err(|err| Rejected::Invalid("/data".to_string(), err.to_string()))?,
    };
    let partners = match e.partners {
        Some(names) => {
            if names.is_empty() {
                return bad(
                    "/partners",
                    "is empty; leave it out to use the device's links and the partners subscribed to this type".into(),
                );
            }
            let mut chosen: Vec<String> = Vec::with_capacity(names.len());
            for (i, name) in names.into_iter().enumerate() {
                if state.config.partner(&name).is_none() {
                    return bad(
                        &format!("/partners/{i}"),
                        format!("unknown partner {name:?}"),
                    );
                }
                if !chosen.contains(&name) {
                    chosen.push(name);
                }
            }
            chosen
        }
        None => {
            // The device's links, then the partners subscribed to its type.
            let mut chosen: Vec<String> = state
                .store
                .linked_partners(&e.device_id)
                .map_err(|err| {
                    tracing::error!(error = %err, "cannot read a device's links; answered 503");
                    Rejected::Unavailable(format!("cannot read the device's links: {err}"))
                })?
                .into_iter()
                // A link left from a partner since removed from the config.
                .filter(|name| state.config.partner(name).is_some())
                .collect();
            for p in &state.config.partners {
                if p.subscribes_to(&e.event_type) && !chosen.contains(&p.name) {
                    chosen.push(p.name.clone());
                }
            }
            if chosen.is_empty() {
                return bad(
                    "/partners",
                    format!(
                        "the device has no links and no partner subscribes to events of type {:?}; link the device or name the partners",
                        e.event_type
                    ),
                );
            }
            chosen
        }
    };
    let coalesced = partners
        .iter()
        .any(|name| state.config.partner(name).is_some_and(|p| p.coalesce_state));
    let state_key = match e.priority {
        // Read only for a partner that folds states: it parses `data` again.
        Priority::Normal if coalesced => state_key(&data),
        // A safety alert is never folded into another event.
        _ => None,
    };
    Ok(EventRecord {
        // The store's writer gives the event and its deliveries their ids.
        id: uuid::Uuid::nil(),
        device_id: e.device_id,
        event_type: e.event_type,
        priority: e.priority,
        occurred_at,
        idempotency_key: e.idempotency_key,
        data,
        received_ms: now_ms,
        deliveries: partners
            .into_iter()
            .map(|partner| {
                let config = state.config.partner(&partner);
                DeliveryRecord {
                    ordered: config.is_some_and(|p| p.ordered_per_device),
                    coalesce: state_key
                        .clone()
                        .filter(|_| config.is_some_and(|p| p.coalesce_state)),
                    ..DeliveryRecord::pending(uuid::Uuid::nil(), partner, now_ms)
                }
            })
            .collect(),
    })
}

/// `component/capability/attribute` of a device-state event (`data` with
/// string `capability` and `attribute`; `component` defaults to `main`).
fn state_key(data: &RawValue) -> Option<String> {
    #[derive(Deserialize)]
    struct State<'a> {
        #[serde(borrow)]
        capability: Option<&'a str>,
        #[serde(borrow)]
        attribute: Option<&'a str>,
        #[serde(borrow)]
        component: Option<&'a str>,
    }
    let s: State = serde_json::from_str(data.get()).ok()?;
    Some(format!(
        "{}/{}/{}",
        s.component.unwrap_or("main"),
        s.capability?,
        s.attribute?
    ))
}

pub(super) fn check_text(field: &str, value: &str, max: usize) -> Result<(), (String, String)> {
    if value.trim().is_empty() {
        return Err((field.to_string(), "must not be empty".into()));
    }
    if value.len() > max {
        return Err((
            field.to_string(),
            format!("is {} bytes; the limit is {max}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err((
            field.to_string(),
            "must not contain control characters".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_point_at_the_field() {
        let cases = [
            (r#"{"type":"x"}"#, "/device_id", "missing field"),
            (
                r#"{"device_id":"d","type":"x","priority":"urgent"}"#,
                "/priority",
                "unknown variant",
            ),
            (
                r#"{"device_id":7,"type":"x"}"#,
                "/device_id",
                "invalid type",
            ),
            (
                r#"{"device_id":"d","type":"x","partners":["a",3]}"#,
                "/partners/1",
                "invalid type",
            ),
            (
                r#"{"device_id":"d","type":"x","colour":"red"}"#,
                "/colour",
                "unknown field",
            ),
        ];
        for (json, pointer, words) in cases {
            let Err((field, detail)) = parse_json::<IncomingEvent>(json) else {
                panic!("{json} must fail");
            };
            assert_eq!(field, pointer, "{json}: {detail}");
            assert!(detail.contains(words), "{json}: {detail}");
            assert!(!detail.contains("line 1"), "{detail}");
        }
    }

    #[test]
    fn split_tells_batches_from_single_events() {
        let (events, batch) = split(br#" [{"a":1},{"b":2}]"#, 10).expect("batch");
        assert!(batch);
        assert_eq!(events.len(), 2);
        let (events, batch) = split(br#"{"a":1}"#, 10).expect("single");
        assert!(!batch);
        assert_eq!(events[0].get(), r#"{"a":1}"#);
        assert_eq!(split(b"[]", 10).err().map(|p| p.status), Some(422));
        assert_eq!(split(b"[1,2,3]", 2).err().map(|p| p.status), Some(413));
        assert_eq!(split(b"hello", 10).err().map(|p| p.status), Some(400));
        assert_eq!(split(b"{\"a\":", 10).err().map(|p| p.status), Some(400));
    }
}
