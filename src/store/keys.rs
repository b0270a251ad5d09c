//! Every key herald writes to sled, and its byte layout.
//!
//! sled orders keys bytewise, so numbers are big-endian and each record kind
//! has a one-byte prefix. The schedule index sorts one partner's deliveries
//! by (priority, due time, delivery id): a lane reads the head of its
//! critical range, then of its normal range, and finds what is due first.

use uuid::Uuid;

use crate::model::Priority;

/// `e` + event id (UUIDv7, so events sort by arrival): an event stored on
/// its own, put back by a replay after retention took its page (and
/// rewritten in place).
pub(crate) const EVENT: u8 = b'e';
/// `b` + the id of its first event: a page of events one group commit
/// accepted, as accepted (see [`super::event_page`]).
pub(crate) const EVENT_PAGE: u8 = b'b';
/// `r` + event id: the record of an event from a page, rewritten since it
/// was accepted (a retry, a dead letter, a replay); it wins over the page's copy.
pub(crate) const REWRITTEN: u8 = b'r';
/// `i` + idempotency key: the event id it produced.
pub(crate) const IDEMPOTENCY: u8 = b'i';
/// `s` + partner + priority + due + delivery id: a delivery waiting for an
/// attempt; or, with a chunk's id, the first attempts of one group commit.
pub(crate) const SCHEDULE: u8 = b's';
/// `a` + delivery id: the attempt log of a delivery that failed at least once.
pub(crate) const ATTEMPTS: u8 = b'a';
/// `d` + dead letter id (UUIDv7): a delivery that will not be retried.
pub(crate) const DEAD: u8 = b'd';
/// `o` + delivery id: the attempt that delivered it, for a delivery with
/// an entry of its own (a retry, a replay, an ordered one). Written instead
/// of rewriting the whole event record; a first attempt from a chunk is
/// recorded in the chunk's state instead (see [`CHUNK_STATE`]).
pub(crate) const DELIVERED: u8 = b'o';
/// `p` + partner + device id: a route to a partner that answered "gone"
/// (410, integration deleted); deliveries on it become dead letters.
pub(crate) const PARKED: u8 = b'p';
/// `q` + partner + device + seq + delivery id: an unsettled delivery of a
/// partner that wants each device's events in order. Only the first of a
/// device's keys may be sent.
pub(crate) const DEVICE_QUEUE: u8 = b'q';
/// `c` + partner + device + state key: the delivery id of the latest state
/// event for that attribute; an older one still waiting is superseded.
pub(crate) const LATEST_STATE: u8 = b'c';
/// `k` + partner + device id: the device's link into that partner platform.
pub(crate) const LINK: u8 = b'k';
/// `l` + device id + partner: which partners a device is linked to, for
/// routing events that name no partners.
pub(crate) const DEVICE_LINK: u8 = b'l';
/// `t` + partner + grant id: the credentials the links of one grant share
/// (one user's tokens at a platform, see [`crate::links`]).
pub(crate) const GRANT: u8 = b't';
/// `u` + partner + grant id + device id: which links use a grant, so the
/// last link's delete removes it and a new token clears all their parked routes.
pub(crate) const GRANT_LINK: u8 = b'u';
/// `g` + chunk id: the state of a schedule chunk's members (see
/// [`super::chunk`]); the chunk's own entry is an `s` key with its id.
pub(crate) const CHUNK_STATE: u8 = b'g';
/// `j` + job id (UUIDv7, so jobs sort by when they were made): a bulk
/// replay job, its filter and how far it got (see [`super::jobs`]).
pub(crate) const REPLAY_JOB: u8 = b'j';
/// `h` + entry id (UUIDv7, so entries sort by time): one audit entry, who
/// replayed or purged which dead letters.
pub(crate) const AUDIT: u8 = b'h';
/// The sequence number of the last group commit (see [`super::watermark`]).
pub(crate) const COMMITS: &[u8] = b"mcommits";
/// `mdepth/` + partner: the partner's queue depth as of the last group
/// commit (see [`super::depth`]).
pub(crate) const DEPTH_PREFIX: &[u8] = b"mdepth/";
/// Present once the depth records are kept: a new store, or one whose
/// depth records do not read, is counted once by a scan of the schedule.
pub(crate) const DEPTH_KEPT: &[u8] = b"mdepth-kept";
/// The store's format version, one byte (see [`super::format`]).
pub(crate) const FORMAT: &[u8] = b"mformat";
/// Present in every store herald 0.1.0 started: its links' credentials
/// lived in grants. No longer written; read only to tell a store of a build
/// before 0.1.0 (see [`super::format`]).
pub(crate) const GRANTS_KEPT: &[u8] = b"mgrants-kept";

pub(crate) fn depth(partner: &str) -> Vec<u8> {
    [DEPTH_PREFIX, partner.as_bytes()].concat()
}

pub(crate) fn event(id: Uuid) -> [u8; 17] {
    prefixed_id(EVENT, id)
}

pub(crate) fn event_page(first: Uuid) -> [u8; 17] {
    prefixed_id(EVENT_PAGE, first)
}

pub(crate) fn rewritten(id: Uuid) -> [u8; 17] {
    prefixed_id(REWRITTEN, id)
}

pub(crate) fn attempts(delivery: Uuid) -> [u8; 17] {
    prefixed_id(ATTEMPTS, delivery)
}

pub(crate) fn delivered(delivery: Uuid) -> [u8; 17] {
    prefixed_id(DELIVERED, delivery)
}

pub(crate) fn chunk_state(chunk: Uuid) -> [u8; 17] {
    prefixed_id(CHUNK_STATE, chunk)
}

pub(crate) fn dead_letter(id: Uuid) -> [u8; 17] {
    prefixed_id(DEAD, id)
}

pub(crate) fn replay_job(id: Uuid) -> [u8; 17] {
    prefixed_id(REPLAY_JOB, id)
}

pub(crate) fn audit(id: Uuid) -> [u8; 17] {
    prefixed_id(AUDIT, id)
}

pub(crate) fn idempotency(key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + key.len());
    out.push(IDEMPOTENCY);
    out.extend_from_slice(key.as_bytes());
    out
}

/// Every parked route of `partner`: the prefix of their keys.
pub(crate) fn parked_prefix(partner: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + partner.len());
    out.push(PARKED);
    out.push(partner.len() as u8);
    out.extend_from_slice(partner.as_bytes());
    out
}

pub(crate) fn parked(partner: &str, device_id: &str) -> Vec<u8> {
    let mut out = parked_prefix(partner);
    out.extend_from_slice(device_id.as_bytes());
    out
}

pub(crate) fn link(partner: &str, device_id: &str) -> Vec<u8> {
    let mut out = parked(partner, device_id);
    out[0] = LINK;
    out
}

/// Every grant of `partner`: the prefix of their keys.
pub(crate) fn grants_prefix(partner: &str) -> Vec<u8> {
    let mut out = parked_prefix(partner);
    out[0] = GRANT;
    out
}

pub(crate) fn grant(partner: &str, grant: &str) -> Vec<u8> {
    let mut out = grants_prefix(partner);
    out.extend_from_slice(grant.as_bytes());
    out
}

/// Every link using `grant`: the prefix of their `u` keys.
pub(crate) fn grant_links_prefix(partner: &str, grant: &str) -> Vec<u8> {
    let mut out = parked_prefix(partner);
    out[0] = GRANT_LINK;
    // Grant ids are an account or a device id, both capped far below 64 KiB.
    out.extend_from_slice(&(grant.len() as u16).to_be_bytes());
    out.extend_from_slice(grant.as_bytes());
    out
}

pub(crate) fn grant_link(partner: &str, grant: &str, device_id: &str) -> Vec<u8> {
    let mut out = grant_links_prefix(partner, grant);
    out.extend_from_slice(device_id.as_bytes());
    out
}

/// Every link of `device_id`: the prefix of its `l` keys.
pub(crate) fn device_links_prefix(device_id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 + device_id.len());
    out.push(DEVICE_LINK);
    // Device ids are capped at ingest far below 64 KiB.
    out.extend_from_slice(&(device_id.len() as u16).to_be_bytes());
    out.extend_from_slice(device_id.as_bytes());
    out
}

pub(crate) fn device_link(device_id: &str, partner: &str) -> Vec<u8> {
    let mut out = device_links_prefix(device_id);
    out.extend_from_slice(partner.as_bytes());
    out
}

/// The prefix of one device's queue at one partner.
pub(crate) fn device_queue_prefix(partner: &str, device: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + partner.len() + device.len() + 24);
    out.push(DEVICE_QUEUE);
    out.push(partner.len() as u8);
    out.extend_from_slice(partner.as_bytes());
    // Device ids are capped at ingest far below 64 KiB.
    out.extend_from_slice(&(device.len() as u16).to_be_bytes());
    out.extend_from_slice(device.as_bytes());
    out
}

pub(crate) fn latest_state(partner: &str, device: &str, state: &str) -> Vec<u8> {
    let mut out = device_queue_prefix(partner, device);
    out[0] = LATEST_STATE;
    out.extend_from_slice(state.as_bytes());
    out
}

pub(crate) fn device_queue(partner: &str, device: &str, seq: u64, delivery: Uuid) -> Vec<u8> {
    let mut out = device_queue_prefix(partner, device);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(delivery.as_bytes());
    out
}

/// The keys of one id-named kind (`e`, `b`...) after `after`'s (all of
/// them, for `None`).
pub(crate) fn ids_after(prefix: u8, after: Option<Uuid>) -> std::ops::Range<Vec<u8>> {
    let start = match after {
        Some(id) => {
            let mut k = prefixed_id(prefix, id).to_vec();
            k.push(0);
            k
        }
        None => vec![prefix],
    };
    start..vec![prefix + 1]
}

fn prefixed_id(prefix: u8, id: Uuid) -> [u8; 17] {
    let mut out = [0u8; 17];
    out[0] = prefix;
    out[1..].copy_from_slice(id.as_bytes());
    out
}

/// A key as an error message shows it: `e/<uuid>` for a record named by an
/// id, `s/<partner>/<priority>/<due_ms>/<delivery>` for a schedule entry,
/// else its printable bytes with the rest escaped. Keys are binary, and a
/// lossy UTF-8 rendering of one told on-call nothing.
pub(crate) fn describe(key: &[u8]) -> String {
    let Some(&prefix) = key.first() else {
        return "(empty key)".to_string();
    };
    if let (Some(k), Some(id)) = (
        [
            EVENT,
            EVENT_PAGE,
            REWRITTEN,
            ATTEMPTS,
            DEAD,
            DELIVERED,
            CHUNK_STATE,
            REPLAY_JOB,
            AUDIT,
        ]
        .contains(&prefix)
        .then_some(prefix),
        id_of(key),
    ) {
        return format!("{}/{id}", k as char);
    }
    if let Some(s) = ScheduleKey::decode(key) {
        return format!(
            "s/{}/{}/{}/{}",
            s.partner,
            s.priority.as_str(),
            s.due_ms,
            s.delivery
        );
    }
    key.escape_ascii().to_string()
}

/// The id in a key of a prefix byte and a UUID (`e`, `b`, `r`, `a`, `d`,
/// `o`, `g`, `j`, `h`).
pub(crate) fn id_of(key: &[u8]) -> Option<Uuid> {
    let bytes: [u8; 16] = key.get(1..17)?.try_into().ok()?;
    (key.len() == 17).then(|| Uuid::from_bytes(bytes))
}

/// One entry of the schedule index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ScheduleKey {
    pub partner: String,
    pub priority: Priority,
    pub due_ms: u64,
    pub delivery: Uuid,
}

impl ScheduleKey {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = partner_priority_prefix(&self.partner, self.priority);
        out.extend_from_slice(&self.due_ms.to_be_bytes());
        out.extend_from_slice(self.delivery.as_bytes());
        out
    }

    /// Just the delivery id of an encoded key (its last 16 bytes): enough
    /// to skip entries already taken without decoding the rest.
    pub(crate) fn delivery_of(key: &[u8]) -> Option<Uuid> {
        let tail = key.len().checked_sub(16)?;
        Some(Uuid::from_bytes(key.get(tail..)?.try_into().ok()?))
    }

    pub(crate) fn decode(key: &[u8]) -> Option<ScheduleKey> {
        let (&prefix, rest) = key.split_first()?;
        if prefix != SCHEDULE {
            return None;
        }
        let (&len, rest) = rest.split_first()?;
        let len = len as usize;
        if rest.len() != len + 1 + 8 + 16 {
            return None;
        }
        let partner = std::str::from_utf8(&rest[..len]).ok()?.to_string();
        let priority = Priority::from_rank(rest[len])?;
        let due_ms = u64::from_be_bytes(rest[len + 1..len + 9].try_into().ok()?);
        let delivery = Uuid::from_bytes(rest[len + 9..].try_into().ok()?);
        Some(ScheduleKey {
            partner,
            priority,
            due_ms,
            delivery,
        })
    }
}

/// The prefix under which all of one partner's entries of one priority sort.
/// The partner name is length-prefixed, so "ab" never falls inside "a"'s range.
pub(crate) fn partner_priority_prefix(partner: &str, priority: Priority) -> Vec<u8> {
    let name = partner.as_bytes();
    debug_assert!(
        name.len() <= u8::MAX as usize,
        "config limits partner names to 64 bytes"
    );
    let mut out = Vec::with_capacity(2 + name.len() + 1 + 8 + 16);
    out.push(SCHEDULE);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.push(priority.rank());
    out
}

/// Keys of one partner and priority that are due at or before `now_ms`:
/// the range `[prefix, prefix + (now_ms + 1))`.
pub(crate) fn due_range(partner: &str, priority: Priority, now_ms: u64) -> (Vec<u8>, Vec<u8>) {
    let start = partner_priority_prefix(partner, priority);
    let mut end = start.clone();
    match now_ms.checked_add(1) {
        Some(after) => end.extend_from_slice(&after.to_be_bytes()),
        // Everything of this priority: the range ends where the next rank starts.
        None => *end.last_mut().expect("prefix is never empty") += 1,
    }
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_described_so_on_call_can_find_its_record() {
        let id = Uuid::now_v7();
        assert_eq!(describe(&event(id)), format!("e/{id}"));
        assert_eq!(describe(&dead_letter(id)), format!("d/{id}"));
        assert_eq!(describe(&replay_job(id)), format!("j/{id}"));
        assert_eq!(describe(&audit(id)), format!("h/{id}"));
        let entry = ScheduleKey {
            partner: "acme".into(),
            priority: Priority::Critical,
            due_ms: 1_500,
            delivery: id,
        };
        assert_eq!(
            describe(&entry.encode()),
            format!("s/acme/critical/1500/{id}")
        );
        assert_eq!(describe(b"k\x01acme\xff"), "k\\x01acme\\xff");
        assert_eq!(describe(b""), "(empty key)");
    }
    use proptest::prelude::*;

    fn schedule_key() -> impl Strategy<Value = ScheduleKey> {
        (
            "[a-z0-9_-]{1,12}",
            prop::bool::ANY,
            any::<u64>(),
            any::<u128>(),
        )
            .prop_map(|(partner, critical, due_ms, id)| ScheduleKey {
                partner,
                priority: if critical {
                    Priority::Critical
                } else {
                    Priority::Normal
                },
                due_ms,
                delivery: Uuid::from_u128(id),
            })
    }

    proptest! {
        #[test]
        fn schedule_keys_round_trip(k in schedule_key()) {
            prop_assert_eq!(ScheduleKey::decode(&k.encode()), Some(k));
        }

        #[test]
        fn one_partners_keys_sort_by_priority_then_due_then_id(a in schedule_key(), b in schedule_key()) {
            let b = ScheduleKey { partner: a.partner.clone(), ..b };
            let by_bytes = a.encode().cmp(&b.encode());
            let by_fields = (a.priority, a.due_ms, a.delivery).cmp(&(b.priority, b.due_ms, b.delivery));
            prop_assert_eq!(by_bytes, by_fields);
        }

        #[test]
        fn delivery_of_reads_the_id_of_any_encoded_key(k in schedule_key()) {
            prop_assert_eq!(ScheduleKey::delivery_of(&k.encode()), Some(k.delivery));
        }

        #[test]
        fn due_range_holds_exactly_the_due_keys_of_that_partner_and_priority(k in schedule_key(), other in "[a-z0-9_-]{1,12}", now in any::<u64>()) {
            let (start, end) = due_range(&k.partner, k.priority, now);
            let key = k.encode();
            let inside = key >= start && key < end;
            prop_assert_eq!(inside, k.due_ms <= now);
            if other != k.partner {
                let (start, end) = due_range(&other, k.priority, u64::MAX);
                prop_assert!(!(key >= start && key < end), "{} leaked into {}", k.partner, other);
            }
        }

        #[test]
        fn event_keys_sort_like_their_ids(a in any::<u128>(), b in any::<u128>()) {
            let (ia, ib) = (Uuid::from_u128(a), Uuid::from_u128(b));
            prop_assert_eq!(event(ia).cmp(&event(ib)), ia.cmp(&ib));
            prop_assert_eq!(id_of(&event(ia)), Some(ia));
        }
    }

    #[test]
    fn garbage_does_not_decode() {
        assert_eq!(ScheduleKey::decode(b""), None);
        assert_eq!(ScheduleKey::decode(b"s\x05ab"), None);
        assert_eq!(ScheduleKey::decode(b"e0123456789abcdef"), None);
        assert_eq!(id_of(b"e123"), None);
    }
}
