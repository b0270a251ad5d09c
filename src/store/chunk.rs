//! Schedule chunks: the first attempts one group commit accepted, under one
//! index key per partner and priority.
//!
//! sled pays mostly per key: every insert lands in a 32-entry leaf
//! that splits, and every remove rewrites one. An entry and a delivered
//! marker per delivery made the store the costliest part of a send. So the
//! writer files the deliveries a group accepts in chunks of up to
//! [`MAX_MEMBERS`]: one schedule entry (`s`, whose id is the chunk's) lists
//! them, and one state record (`g` + chunk id) holds a slot per member:
//! pending, delivered (with its attempt), or left. A member leaves when its
//! first attempt did not deliver it: it gets an entry of its own, and its
//! event record speaks for it from then on. Outcomes rewrite the state
//! record once per group however many members they settle. The entry goes
//! when no member is pending; the state record when no member needs it any
//! more (each delivered member's event collected, the others left).
//!
//! Deliveries that keep per-device order or replace older states keep an
//! entry each: their entries take part in per-device bookkeeping.
//!
//! Both records are small fixed-layout binary, not JSON: they are rewritten
//! often, and a chunk entry's first byte ([`FORMAT`]) tells it apart from a
//! single delivery's JSON entry (which starts with `{`).

use std::collections::HashMap;

use uuid::Uuid;

use super::keys::{self, ScheduleKey};
use super::StoreError;
use crate::model::{Attempt, AttemptOutcome, ChunkRef, Priority, ScheduledDelivery};

/// Most members in one chunk: keeps both records a few KiB, far under
/// sled's blob threshold, and a rewrite of the state cheap.
pub(crate) const MAX_MEMBERS: usize = 128;

/// Members whose due times differ by no more than this share a chunk; all
/// first attempts ingest writes are due "now", give or take the handlers.
const DUE_SPREAD_MS: u64 = 1_000;

/// The first byte of both records: the layout's version.
pub(crate) const FORMAT: u8 = 1;

/// Bytes of one state slot: tag, attempt number, at, latency, status.
const SLOT_BYTES: usize = 1 + 4 + 8 + 4 + 2;
/// Bytes before the slots: format, live count, member count.
const STATE_HEADER: usize = 1 + 2 + 2;

const PENDING: u8 = 0;
const DELIVERED: u8 = 1;
const LEFT: u8 = 2;

/// Whether a schedule entry's value is a chunk's.
pub(crate) fn is_chunk(value: &[u8]) -> bool {
    value.first() == Some(&FORMAT)
}

/// A chunk entry's members: (delivery, event), in slot order. They were
/// created when the chunk came due: its key's due time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Members {
    pub list: Vec<(Uuid, Uuid)>,
}

impl Members {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 2 + 32 * self.list.len());
        out.push(FORMAT);
        out.extend_from_slice(&(self.list.len() as u16).to_be_bytes());
        for (delivery, event) in &self.list {
            out.extend_from_slice(delivery.as_bytes());
            out.extend_from_slice(event.as_bytes());
        }
        out
    }

    pub(crate) fn decode(key: &[u8], value: &[u8]) -> Result<Members, StoreError> {
        let corrupt = |reason: &str| StoreError::corrupt(key, reason);
        if value.first() != Some(&FORMAT) || value.len() < 3 {
            return Err(corrupt("not a schedule chunk"));
        }
        let n = u16::from_be_bytes([value[1], value[2]]) as usize;
        let body = &value[3..];
        if body.len() != n * 32 {
            return Err(corrupt("member list of the wrong length"));
        }
        let list = body
            .chunks_exact(32)
            .map(|m| {
                let delivery = Uuid::from_slice(&m[..16]).map_err(|_| corrupt("delivery id"))?;
                let event = Uuid::from_slice(&m[16..]).map_err(|_| corrupt("event id"))?;
                Ok((delivery, event))
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(Members { list })
    }

    /// The schedule entry of slot `slot` of the chunk under `chunk`.
    pub(crate) fn entry(&self, chunk: &ScheduleKey, slot: usize) -> Option<ScheduledDelivery> {
        let &(delivery, event) = self.list.get(slot)?;
        let place = ChunkRef {
            id: chunk.delivery,
            slot: slot as u16,
        };
        Some(entry(delivery, event, chunk.due_ms, place))
    }
}

/// The schedule entry of a chunk member due (and created) at `due_ms`.
pub(crate) fn entry(
    delivery: Uuid,
    event: Uuid,
    due_ms: u64,
    place: ChunkRef,
) -> ScheduledDelivery {
    ScheduledDelivery {
        delivery,
        event,
        attempts: 0,
        created_ms: due_ms,
        order: None,
        chunk: Some(place),
    }
}

/// A chunk's state record, read and changed in place.
pub(crate) struct State(Vec<u8>);

impl State {
    /// Every member pending.
    pub(crate) fn new(members: usize) -> State {
        let mut out = vec![0u8; STATE_HEADER + members * SLOT_BYTES];
        out[0] = FORMAT;
        out[1..3].copy_from_slice(&(members as u16).to_be_bytes());
        out[3..5].copy_from_slice(&(members as u16).to_be_bytes());
        State(out)
    }

    pub(crate) fn from_bytes(key: &[u8], bytes: Vec<u8>) -> Result<State, StoreError> {
        if bytes.first() != Some(&FORMAT) || bytes.len() < STATE_HEADER {
            return Err(StoreError::corrupt(key, "not a chunk state"));
        }
        let n = u16::from_be_bytes([bytes[3], bytes[4]]) as usize;
        if bytes.len() != STATE_HEADER + n * SLOT_BYTES {
            return Err(StoreError::corrupt(key, "chunk state of the wrong length"));
        }
        Ok(State(bytes))
    }

    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    pub(crate) fn members(&self) -> usize {
        u16::from_be_bytes([self.0[3], self.0[4]]) as usize
    }

    /// Members whose records still need this state.
    pub(crate) fn live(&self) -> u16 {
        u16::from_be_bytes([self.0[1], self.0[2]])
    }

    fn set_live(&mut self, live: u16) {
        self.0[1..3].copy_from_slice(&live.to_be_bytes());
    }

    fn slot(&self, slot: usize) -> Option<&[u8]> {
        let start = STATE_HEADER + slot * SLOT_BYTES;
        self.0.get(start..start + SLOT_BYTES)
    }

    pub(crate) fn is_pending(&self, slot: usize) -> bool {
        self.slot(slot).is_some_and(|s| s[0] == PENDING)
    }

    pub(crate) fn any_pending(&self) -> bool {
        (0..self.members()).any(|s| self.is_pending(s))
    }

    pub(crate) fn pending_count(&self) -> usize {
        (0..self.members()).filter(|&s| self.is_pending(s)).count()
    }

    /// The attempt that delivered slot `slot`, if one did.
    pub(crate) fn delivered(&self, slot: usize) -> Option<Attempt> {
        let s = self.slot(slot)?;
        if s[0] != DELIVERED {
            return None;
        }
        let status = u16::from_be_bytes([s[17], s[18]]);
        Some(Attempt {
            number: u32::from_be_bytes(s[1..5].try_into().ok()?),
            at_ms: u64::from_be_bytes(s[5..13].try_into().ok()?),
            latency_ms: u32::from_be_bytes(s[13..17].try_into().ok()?) as u64,
            status: (status != 0).then_some(status),
            outcome: AttemptOutcome::Delivered,
            detail: String::new(),
        })
    }

    /// Settles pending slot `slot`: delivered by `attempt`, or (`None`)
    /// left for an entry of its own. False if it was not pending.
    pub(crate) fn settle(&mut self, slot: usize, attempt: Option<&Attempt>) -> bool {
        if !self.is_pending(slot) {
            return false;
        }
        let start = STATE_HEADER + slot * SLOT_BYTES;
        let s = &mut self.0[start..start + SLOT_BYTES];
        match attempt {
            Some(a) => {
                s[0] = DELIVERED;
                s[1..5].copy_from_slice(&a.number.to_be_bytes());
                s[5..13].copy_from_slice(&a.at_ms.to_be_bytes());
                let latency = u32::try_from(a.latency_ms).unwrap_or(u32::MAX);
                s[13..17].copy_from_slice(&latency.to_be_bytes());
                s[17..19].copy_from_slice(&a.status.unwrap_or(0).to_be_bytes());
            }
            None => {
                s[0] = LEFT;
                self.forget_one();
            }
        }
        true
    }

    /// One member's record no longer needs this state.
    pub(crate) fn forget_one(&mut self) {
        let live = self.live().saturating_sub(1);
        self.set_live(live);
    }
}

/// The chunks one group commit is filling, per partner and priority.
#[derive(Default)]
pub(crate) struct Filling {
    open: HashMap<(String, Priority), Open>,
    full: Vec<Open>,
}

struct Open {
    key: ScheduleKey,
    members: Members,
}

impl Filling {
    /// Files delivery `delivery` of `event`, due at `due_ms`, in a chunk:
    /// its key (with the member's id) and its place in the chunk.
    pub(crate) fn add(
        &mut self,
        partner: &str,
        priority: Priority,
        due_ms: u64,
        delivery: Uuid,
        event: Uuid,
    ) -> (ScheduleKey, ChunkRef) {
        let slot = (partner.to_string(), priority);
        let fits = |open: &Open| {
            open.members.list.len() < MAX_MEMBERS
                && due_ms.abs_diff(open.key.due_ms) <= DUE_SPREAD_MS
        };
        if self.open.get(&slot).is_some_and(|o| !fits(o)) {
            if let Some(done) = self.open.remove(&slot) {
                self.full.push(done);
            }
        }
        let open = self.open.entry(slot).or_insert_with(|| Open {
            key: ScheduleKey {
                partner: partner.to_string(),
                priority,
                due_ms,
                delivery: Uuid::now_v7(),
            },
            members: Members { list: Vec::new() },
        });
        let chunk = ChunkRef {
            id: open.key.delivery,
            slot: open.members.list.len() as u16,
        };
        open.members.list.push((delivery, event));
        let key = ScheduleKey {
            delivery,
            ..open.key.clone()
        };
        (key, chunk)
    }

    /// Whether no delivery was filed.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty() && self.full.is_empty()
    }

    /// Every chunk filled, as records for the batch: (key, value) of each
    /// chunk's entry and of its state.
    pub(crate) fn finish(self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.full
            .into_iter()
            .chain(self.open.into_values())
            .flat_map(|chunk| {
                let state = State::new(chunk.members.list.len());
                [
                    (chunk.key.encode(), chunk.members.encode()),
                    (
                        keys::chunk_state(chunk.key.delivery).to_vec(),
                        state.into_bytes(),
                    ),
                ]
            })
            .collect()
    }
}

/// The key of chunk `chunk`'s entry, from one member's schedule key.
pub(crate) fn entry_key(member: &ScheduleKey, chunk: Uuid) -> Vec<u8> {
    ScheduleKey {
        delivery: chunk,
        ..member.clone()
    }
    .encode()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn attempt(at_ms: u64, status: Option<u16>) -> Attempt {
        Attempt {
            number: 1,
            at_ms,
            status,
            latency_ms: 12,
            outcome: AttemptOutcome::Delivered,
            detail: String::new(),
        }
    }

    proptest! {
        #[test]
        fn members_round_trip(ids in prop::collection::vec((any::<u128>(), any::<u128>()), 0..MAX_MEMBERS)) {
            let members = Members {
                list: ids.iter().map(|&(d, e)| (Uuid::from_u128(d), Uuid::from_u128(e))).collect(),
            };
            let bytes = members.encode();
            prop_assert!(is_chunk(&bytes));
            prop_assert_eq!(Members::decode(b"s", &bytes)?, members);
        }

        #[test]
        fn a_slot_keeps_the_attempt_that_settled_it(n in 1usize..MAX_MEMBERS, at in any::<u64>(), status in prop::option::of(1u16..600)) {
            let mut state = State::new(n);
            let slot = n / 2;
            prop_assert!(state.settle(slot, Some(&attempt(at, status))));
            prop_assert!(!state.settle(slot, None), "settled once only");
            let state = State::from_bytes(b"g", state.into_bytes())?;
            prop_assert_eq!(state.delivered(slot), Some(attempt(at, status)));
            prop_assert_eq!(state.pending_count(), n - 1);
            prop_assert_eq!(state.live() as usize, n);
        }
    }

    #[test]
    fn leaving_frees_the_state_and_delivering_does_not() {
        let mut state = State::new(2);
        assert!(state.settle(0, None));
        assert_eq!(state.live(), 1);
        assert!(state.settle(1, Some(&attempt(5, Some(200)))));
        assert!(!state.any_pending());
        assert_eq!(
            state.live(),
            1,
            "the delivered member's event still reads it"
        );
        state.forget_one();
        assert_eq!(state.live(), 0);
    }

    #[test]
    fn a_single_entry_is_not_a_chunk_and_garbage_does_not_decode() {
        assert!(!is_chunk(br#"{"delivery":"x"}"#));
        assert!(Members::decode(b"s", &[FORMAT, 0]).is_err());
        assert!(Members::decode(b"s", &[FORMAT, 0, 2, 1]).is_err());
        assert!(State::from_bytes(b"g", vec![FORMAT, 0, 1, 0, 2]).is_err());
    }

    #[test]
    fn a_group_fills_chunks_per_partner_and_priority_and_splits_full_ones() {
        let mut filling = Filling::default();
        let mut chunks = std::collections::HashSet::new();
        for i in 0..(MAX_MEMBERS + 1) {
            let (key, chunk) = filling.add(
                "acme",
                Priority::Normal,
                1_000,
                Uuid::now_v7(),
                Uuid::now_v7(),
            );
            assert_eq!(key.due_ms, 1_000);
            assert_eq!(chunk.slot as usize, i % MAX_MEMBERS);
            chunks.insert(chunk.id);
        }
        let (_, other) = filling.add(
            "acme",
            Priority::Critical,
            1_000,
            Uuid::now_v7(),
            Uuid::now_v7(),
        );
        let (_, late) = filling.add(
            "acme",
            Priority::Critical,
            5_000,
            Uuid::now_v7(),
            Uuid::now_v7(),
        );
        assert_ne!(
            other.id, late.id,
            "due times far apart do not share a chunk"
        );
        chunks.insert(other.id);
        chunks.insert(late.id);
        assert_eq!(chunks.len(), 4);
        assert_eq!(filling.finish().len(), 8, "an entry and a state each");
    }
}
