//! herald's records: what an event, a delivery, an attempt and a dead letter
//! are, on disk and in the API.
//!
//! Disk records are JSON (serde_json); a field marked `#[serde(default)]`
//! with `skip_serializing_if` is left out when empty and reads back as
//! empty (store format 1, `docs/store-format.md`); the event record
//! alone, most of what the store writes, has a compact layout of its own
//! (`store::event_format`). Event payloads stay raw JSON from ingest to the
//! wire.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Safety alerts: overtake everything else for the same partner.
    Critical,
    #[default]
    Normal,
}

impl Priority {
    pub(crate) const ALL: [Priority; 2] = [Priority::Critical, Priority::Normal];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Normal => "normal",
        }
    }

    /// Its byte in the schedule key: critical sorts first.
    pub(crate) fn rank(self) -> u8 {
        match self {
            Priority::Critical => 0,
            Priority::Normal => 1,
        }
    }

    pub(crate) fn from_rank(rank: u8) -> Option<Priority> {
        match rank {
            0 => Some(Priority::Critical),
            1 => Some(Priority::Normal),
            _ => None,
        }
    }
}

/// An accepted event with the state of each of its deliveries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRecord {
    /// Given by the store's writer when it accepts the event (whatever a
    /// caller put here is replaced), rising in the order events are stored.
    pub id: Uuid,
    pub device_id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub priority: Priority,
    pub occurred_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub data: Box<RawValue>,
    pub received_ms: u64,
    pub deliveries: Vec<DeliveryRecord>,
}

impl EventRecord {
    pub fn is_finished(&self) -> bool {
        self.deliveries
            .iter()
            .all(|d| d.state != DeliveryState::Pending)
    }

    pub(crate) fn delivery_mut(&mut self, id: Uuid) -> Option<&mut DeliveryRecord> {
        self.deliveries.iter_mut().find(|d| d.id == id)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryRecord {
    /// Given by the store's writer, like the event's.
    pub id: Uuid,
    pub partner: String,
    pub state: DeliveryState,
    /// Sends made so far (time held by a rate limiter does not count).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// When the next attempt is due, while pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_due_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt: Option<Attempt>,
    /// Set once the delivery died: the dead letter that keeps its story.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<Uuid>,
    /// The partner wants this device's events in order (`ordering =
    /// "per_device"`): sent only once the device's earlier ones settled.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ordered: bool,
    /// `component/capability/attribute` of a normal state event, for a
    /// partner with `coalesce_state = true`: a newer one replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coalesce: Option<String>,
    /// The delivery that superseded this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<Uuid>,
    /// While its first attempt is due: the schedule chunk that carries it,
    /// whose state record says whether that attempt delivered it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<ChunkRef>,
}

impl DeliveryRecord {
    /// A new delivery to `partner`, due at `due_ms`, not tried yet.
    pub(crate) fn pending(id: Uuid, partner: String, due_ms: u64) -> DeliveryRecord {
        DeliveryRecord {
            id,
            partner,
            state: DeliveryState::Pending,
            attempts: 0,
            next_due_ms: Some(due_ms),
            last_attempt: None,
            dead_letter: None,
            ordered: false,
            coalesce: None,
            superseded_by: None,
            chunk: None,
        }
    }

    /// `attempt` delivered it.
    pub(crate) fn mark_delivered(&mut self, attempt: Attempt) {
        self.state = DeliveryState::Delivered;
        self.next_due_ms = None;
        self.attempts = attempt.number;
        self.last_attempt = Some(attempt);
    }
}

/// Defaults are left out of JSON records (a dead letter carries its event,
/// and the API shows them).
fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    Pending,
    Delivered,
    Dead,
    /// A newer state event for the same device and attribute took its
    /// place before it was sent (`coalesce_state = true`).
    Superseded,
}

/// One real send to a partner and what came of it. Also written by
/// postcard inside event records (`store::event_format`), which has no
/// field names: no `skip_serializing_if` here or in [`ChunkRef`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub number: u32,
    pub at_ms: u64,
    /// The HTTP status, when an answer came back at all.
    pub status: Option<u16>,
    pub latency_ms: u64,
    pub outcome: AttemptOutcome,
    /// Why, with a bounded snippet of the partner's answer.
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    Delivered,
    Retry,
    Failed,
}

/// Every attempt of one delivery, bounded so a record stays well under
/// sled's blob threshold: the first [`AttemptLog::HEAD`] and the last
/// [`AttemptLog::TAIL`] are kept, and the ones between are counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptLog {
    pub attempts: Vec<Attempt>,
    #[serde(default)]
    pub omitted: u32,
}

impl AttemptLog {
    pub(crate) const HEAD: usize = 20;
    pub(crate) const TAIL: usize = 100;

    pub(crate) fn push(&mut self, attempt: Attempt) {
        if self.attempts.len() == Self::HEAD + Self::TAIL {
            self.attempts.remove(Self::HEAD);
            self.omitted += 1;
        }
        self.attempts.push(attempt);
    }
}

/// A delivery that will not be retried, with everything needed to judge and
/// replay it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: Uuid,
    pub delivery_id: Uuid,
    pub partner: String,
    pub reason: String,
    pub died_ms: u64,
    pub event: EventRecord,
    pub attempts: AttemptLog,
    /// Set once on-call replayed it: the new delivery of the same event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replayed_as: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replayed_ms: Option<u64>,
}

/// A device's route to a partner that answered that it is gone for good
/// (HTTP 410, the platform's "integration deleted"). Until on-call clears
/// it (or the link is put again), deliveries on it become dead letters
/// with this reason instead of being sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ParkedRoute {
    pub partner: String,
    pub device_id: String,
    pub reason: String,
    pub parked_ms: u64,
    /// The delivery whose answer parked it.
    pub delivery_id: Uuid,
    pub event_id: Uuid,
}

/// A device's link into a partner platform, as the store keeps it
/// (`PUT /v1/links/{partner}/{device_id}`). The credentials are sealed by
/// [`crate::links`] before they get here: the store never sees them in clear.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredLink {
    pub partner: String,
    pub device_id: String,
    pub external_id: String,
    pub account: Option<String>,
    pub region: Option<String>,
    pub callback_url: Option<String>,
    pub token_url: Option<String>,
    /// Never set: a link's credentials live in its grant. Only builds
    /// before 0.1.0 wrote it, and their data dirs are refused at open
    /// (`store::format`); the field stays until the API stops naming it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_credentials: Option<String>,
    /// Never set, like `sealed_credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_unix: Option<u64>,
    /// Adapter-specific, as given; kept raw so a send reads it as is.
    pub options: Option<Box<RawValue>>,
    /// Raised by every write: a token refresh stores its result only if
    /// nobody put the link again meanwhile.
    pub generation: u64,
    pub updated_ms: u64,
    /// Never set, like `sealed_credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_obtained_ms: Option<u64>,
}

impl StoredLink {
    /// The grant whose credentials this link presents: `account/<account>`,
    /// or `device/<device_id>` for a grant of its own when it names no account.
    pub(crate) fn grant(&self) -> String {
        match &self.account {
            Some(account) => format!("account/{account}"),
            None => format!("device/{}", self.device_id),
        }
    }
}

/// One user's credentials at one platform, shared by every link that
/// names the same account (a link without one has a grant of its own).
/// Platforms issue tokens per user, and a single-use refresh token spent
/// by one link would otherwise strand every other copy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredGrant {
    pub partner: String,
    /// See [`StoredLink::grant`].
    pub grant: String,
    /// base64 of nonce and AEAD ciphertext of the credentials' JSON, bound
    /// to this partner and grant id.
    pub sealed_credentials: String,
    /// When the access token expires (unix seconds), in clear for views.
    pub expires_at_unix: Option<u64>,
    /// Raised by every write: a token refresh stores its result only if
    /// nobody put new credentials meanwhile.
    pub generation: u64,
    pub updated_ms: u64,
    /// When the current refresh token was obtained (herald's clock, ms),
    /// for the keep-alive refresh.
    pub refresh_obtained_ms: u64,
}

/// The value of a schedule entry: what a lane needs to make the next attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ScheduledDelivery {
    pub delivery: Uuid,
    pub event: Uuid,
    /// Sends made before this one.
    pub attempts: u32,
    /// When the delivery was created: its age decides when it gives up.
    pub created_ms: u64,
    /// Its place in its device's queue, when the partner wants order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<DeviceOrder>,
    /// Set when it is one member of a schedule chunk rather than an entry
    /// of its own (never on disk: a chunk stores its members compactly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<ChunkRef>,
}

/// One delivery's place in a schedule chunk: many first attempts that one
/// group commit wrote under one index key (see `store::chunk`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: Uuid,
    pub slot: u16,
}

/// A delivery's place in the queue of one device at one partner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DeviceOrder {
    pub device: String,
    /// Rises with every delivery the store accepts: the order of arrival.
    pub seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(number: u32) -> Attempt {
        Attempt {
            number,
            at_ms: number as u64,
            status: Some(500),
            latency_ms: 1,
            outcome: AttemptOutcome::Retry,
            detail: String::new(),
        }
    }

    #[test]
    fn attempt_log_keeps_head_and_tail() {
        let mut log = AttemptLog::default();
        for n in 1..=500 {
            log.push(attempt(n));
        }
        assert_eq!(log.attempts.len(), AttemptLog::HEAD + AttemptLog::TAIL);
        assert_eq!(log.omitted, 500 - 120);
        assert_eq!(log.attempts[0].number, 1);
        assert_eq!(log.attempts[AttemptLog::HEAD - 1].number, 20);
        assert_eq!(log.attempts[AttemptLog::HEAD].number, 401);
        assert_eq!(log.attempts.last().map(|a| a.number), Some(500));
    }
}

/// Which dead letters a bulk replay, a purge by filter or a list takes.
/// Every field set must match; none set takes every letter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Letters whose reason contains this text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Letters that died at or after this time (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    /// Letters that died before this time (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
    /// Letters already replayed (`true`) or not yet (`false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replayed: Option<bool>,
}

impl DeadLetterFilter {
    pub fn matches(&self, d: &DeadLetter) -> bool {
        self.partner.as_ref().is_none_or(|p| &d.partner == p)
            && self
                .event_type
                .as_ref()
                .is_none_or(|t| &d.event.event_type == t)
            && self.priority.is_none_or(|p| d.event.priority == p)
            && self
                .device_id
                .as_ref()
                .is_none_or(|id| &d.event.device_id == id)
            && self
                .reason
                .as_ref()
                .is_none_or(|r| d.reason.contains(r.as_str()))
            && self.since_ms.is_none_or(|since| d.died_ms >= since)
            && self.until_ms.is_none_or(|until| d.died_ms < until)
            && self
                .replayed
                .is_none_or(|replayed| d.replayed_as.is_some() == replayed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayJobState {
    Running,
    Done,
}

/// A bulk replay as the store keeps it: what it takes, how far it got.
/// It takes the letters its filter matched when it was made and not yet
/// replayed, up to `last` (letters that die later, its own replays
/// included, are not its business), in the order they died.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplayJob {
    pub id: Uuid,
    pub state: ReplayJobState,
    pub filter: DeadLetterFilter,
    pub rate_per_second: u32,
    /// Letters it was made for.
    pub matched: u64,
    /// Letters it replayed so far.
    pub replayed: u64,
    /// Letters it found replayed or purged by someone else meanwhile.
    #[serde(default)]
    pub skipped: u64,
    /// The last dead letter it has read past; `None` before the first batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<Uuid>,
    /// The newest dead letter when it was made; `None` when there was none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Uuid>,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// The name of the token that made it.
    pub created_by: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    /// One dead letter replayed, or many by one `POST /v1/dead-letters/replay`.
    Replay,
    /// A bulk replay job made.
    ReplayJob,
    /// One dead letter purged.
    Purge,
    /// The dead letters a filter selects, purged.
    PurgeFilter,
}

/// Who did what to dead letters, and when: written with the change itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: Uuid,
    pub at_ms: u64,
    /// The caller's token name from the config (never its secret).
    pub token: String,
    pub action: AuditAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<DeadLetterFilter>,
    /// The dead letter acted on (one replay, one purge) or the job made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Uuid>,
    /// The event of the one dead letter acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<Uuid>,
    /// How many dead letters it took (for a job: how many it was made for).
    pub count: u64,
}
