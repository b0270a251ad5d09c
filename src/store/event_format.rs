//! How an event record is laid out on disk.
//!
//! Event records are most of the bytes herald writes (one per accepted
//! event), and sled writes a leaf's records out again on every split and
//! consolidation, so each byte of a record is paid several times over:
//! 300 bytes more per record cost about 7 % of delivered/s in `herald
//! bench --only batched`. So they are a format byte and postcard (serde,
//! no field names, UUIDs as a length byte and 16 bytes, integers as varints): 326 bytes
//! for the bench's event against 570 as JSON. Every other record
//! stays JSON. Builds before 0.1.0 wrote event records as JSON; their data
//! dirs are refused at open (`super::format`), and a record starting with
//! `{` is reported as corrupt.
//!
//! postcard has no field names: a field is added by a new format byte
//! whose decoder fills it in, never by changing [`Stored`] in place, and
//! the enums it holds only ever gain variants at the end.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use super::StoreError;
use crate::model::{Attempt, ChunkRef, DeliveryRecord, DeliveryState, EventRecord, Priority};

/// The first byte of a record in this layout.
const POSTCARD_V1: u8 = 1;

/// [`EventRecord`] with every field always present, borrowed on the way out.
#[derive(Serialize, Deserialize)]
struct Stored<'a> {
    id: Uuid,
    device_id: Cow<'a, str>,
    event_type: Cow<'a, str>,
    priority: Priority,
    occurred_at: Cow<'a, str>,
    idempotency_key: Option<Cow<'a, str>>,
    /// The payload's JSON text, as accepted.
    data: Cow<'a, str>,
    received_ms: u64,
    deliveries: Vec<StoredDelivery<'a>>,
}

#[derive(Serialize, Deserialize)]
struct StoredDelivery<'a> {
    id: Uuid,
    partner: Cow<'a, str>,
    state: DeliveryState,
    attempts: u32,
    next_due_ms: Option<u64>,
    last_attempt: Option<Cow<'a, Attempt>>,
    dead_letter: Option<Uuid>,
    ordered: bool,
    coalesce: Option<Cow<'a, str>>,
    superseded_by: Option<Uuid>,
    chunk: Option<ChunkRef>,
}

pub(super) fn encode(event: &EventRecord) -> Vec<u8> {
    let stored = Stored {
        id: event.id,
        device_id: Cow::Borrowed(&event.device_id),
        event_type: Cow::Borrowed(&event.event_type),
        priority: event.priority,
        occurred_at: Cow::Borrowed(&event.occurred_at),
        idempotency_key: event.idempotency_key.as_deref().map(Cow::Borrowed),
        data: Cow::Borrowed(event.data.get()),
        received_ms: event.received_ms,
        deliveries: event
            .deliveries
            .iter()
            .map(|d| StoredDelivery {
                id: d.id,
                partner: Cow::Borrowed(&d.partner),
                state: d.state,
                attempts: d.attempts,
                next_due_ms: d.next_due_ms,
                last_attempt: d.last_attempt.as_ref().map(Cow::Borrowed),
                dead_letter: d.dead_letter,
                ordered: d.ordered,
                coalesce: d.coalesce.as_deref().map(Cow::Borrowed),
                superseded_by: d.superseded_by,
                chunk: d.chunk,
            })
            .collect(),
    };
    let mut out = Vec::with_capacity(64 + event.data.get().len());
    out.push(POSTCARD_V1);
    // Strings, numbers, UUIDs and enums into a Vec: postcard cannot fail.
    postcard::to_extend(&stored, out).expect("an event record always serializes")
}

pub(super) fn decode(key: &[u8], bytes: &[u8]) -> Result<EventRecord, StoreError> {
    let corrupt = |reason: String| StoreError::corrupt(key, reason);
    match bytes.first() {
        Some(&POSTCARD_V1) => {}
        Some(other) => {
            return Err(corrupt(format!(
                "not an event record: unknown format byte {other:#04x}"
            )))
        }
        None => return Err(corrupt("not an event record: empty".to_string())),
    }
    let (stored, rest): (Stored<'static>, &[u8]) = postcard::take_from_bytes(&bytes[1..])
        .map_err(|e| corrupt(format!("event record: {e}")))?;
    if !rest.is_empty() {
        return Err(corrupt(format!(
            "event record: {} stray bytes after its end",
            rest.len()
        )));
    }
    let data = RawValue::from_string(stored.data.into_owned())
        .map_err(|e| corrupt(format!("event record: payload is not JSON: {e}")))?;
    Ok(EventRecord {
        id: stored.id,
        device_id: stored.device_id.into_owned(),
        event_type: stored.event_type.into_owned(),
        priority: stored.priority,
        occurred_at: stored.occurred_at.into_owned(),
        idempotency_key: stored.idempotency_key.map(Cow::into_owned),
        data,
        received_ms: stored.received_ms,
        deliveries: stored
            .deliveries
            .into_iter()
            .map(|d| DeliveryRecord {
                id: d.id,
                partner: d.partner.into_owned(),
                state: d.state,
                attempts: d.attempts,
                next_due_ms: d.next_due_ms,
                last_attempt: d.last_attempt.map(Cow::into_owned),
                dead_letter: d.dead_letter,
                ordered: d.ordered,
                coalesce: d.coalesce.map(Cow::into_owned),
                superseded_by: d.superseded_by,
                chunk: d.chunk,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AttemptOutcome;

    fn full_event() -> EventRecord {
        let mut event = crate::store::testing::event("door-1", Priority::Critical);
        event.data = RawValue::from_string(r#"{"door":"front","forced":true,"t":-40.5}"#.into())
            .expect("json");
        event.idempotency_key = Some("key-\u{1F510}".to_string());
        let mut delivery = DeliveryRecord::pending(Uuid::now_v7(), "acme".into(), 7);
        delivery.state = DeliveryState::Dead;
        delivery.attempts = 3;
        delivery.last_attempt = Some(Attempt {
            number: 3,
            at_ms: 1_796_232_929_385,
            status: Some(503),
            latency_ms: 12,
            outcome: AttemptOutcome::Failed,
            detail: "503: \"busy\"".to_string(),
        });
        delivery.dead_letter = Some(Uuid::now_v7());
        delivery.ordered = true;
        delivery.coalesce = Some("main/lock/state".to_string());
        delivery.superseded_by = Some(Uuid::now_v7());
        delivery.chunk = Some(ChunkRef {
            id: Uuid::now_v7(),
            slot: 65_535,
        });
        event.deliveries.push(delivery);
        event
    }

    /// Compared through JSON: every field, and the payload's text exactly.
    fn json(event: &EventRecord) -> String {
        serde_json::to_string(event).expect("serializes")
    }

    #[test]
    fn every_field_comes_back_as_written() {
        for event in [
            full_event(),
            crate::store::testing::event("t-1", Priority::Normal),
        ] {
            let bytes = encode(&event);
            let back = decode(b"e-test", &bytes).expect("decodes");
            assert_eq!(json(&back), json(&event));
        }
    }

    #[test]
    fn it_is_smaller_than_the_json_it_replaces() {
        let event = full_event();
        let (binary, text) = (encode(&event).len(), super::super::encode(&event).len());
        assert!(
            binary * 10 < text * 8,
            "{binary} bytes against {text} as JSON"
        );
    }

    proptest::proptest! {
        #[test]
        fn any_event_comes_back_as_written(
            device in ".{0,40}",
            key in proptest::option::of(".{1,40}"),
            text in "[a-z\u{e9}\u{1F6AA} \\\\\"]{0,30}",
            received_ms in proptest::num::u64::ANY,
            next_due_ms in proptest::option::of(proptest::num::u64::ANY),
            attempts in proptest::num::u32::ANY,
            slot in proptest::num::u16::ANY,
        ) {
            let mut event = full_event();
            event.device_id = device;
            event.idempotency_key = key;
            event.received_ms = received_ms;
            event.data = serde_json::value::to_raw_value(&serde_json::json!({ "text": text }))
                .expect("json");
            let d = &mut event.deliveries[0];
            d.next_due_ms = next_due_ms;
            d.attempts = attempts;
            d.chunk = Some(ChunkRef { id: Uuid::now_v7(), slot });
            let back = decode(b"e-prop", &encode(&event)).expect("decodes");
            proptest::prop_assert_eq!(json(&back), json(&event));
        }
    }

    #[test]
    fn a_damaged_record_is_reported_with_its_key_and_what_is_wrong() {
        let bytes = encode(&full_event());
        let cases: [(&[u8], &str); 5] = [
            (&[], "empty"),
            (&[7, 1, 2], "unknown format byte 0x07"),
            (&bytes[..bytes.len() / 2], "event record:"),
            (&[bytes.as_slice(), b"xx"].concat(), "2 stray bytes"),
            (b"{\"id\":1}", "unknown format byte 0x7b"),
        ];
        for (damaged, expected) in cases {
            match decode(b"e-damaged", damaged) {
                Err(StoreError::Corrupt { key, reason }) => {
                    assert_eq!(key, "e-damaged");
                    assert!(
                        reason.contains(expected),
                        "{reason:?} should say {expected:?}"
                    );
                }
                other => panic!("{damaged:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_payload_that_is_not_json_is_refused() {
        let event = full_event();
        let mut bytes = encode(&event);
        // The payload's opening brace, turned into something JSON never starts with.
        let at = bytes
            .windows(2)
            .position(|w| w == b"{\"")
            .expect("the payload's text is in the record");
        bytes[at] = b'#';
        match decode(b"e-1", &bytes) {
            Err(StoreError::Corrupt { reason, .. }) => {
                assert!(reason.contains("payload is not JSON"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
}
