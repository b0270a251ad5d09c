//! The store: herald's only state, and the only code that touches sled.
//!
//! Reads go straight to sled from any task. Every write goes through one
//! writer thread ([`writer`]) that applies many requests as one atomic batch
//! and makes it durable with one flush ending in fdatasync (group commit),
//! so an accepted event costs a fraction of an fsync and no write is ever
//! half-applied.
//! The key layout lives in [`keys`]; nothing outside this module knows it.
//! `docs/store-format.md` has every record's layout and life (what writes
//! it, what removes it) in one table, and what the store assumes of the disk.
//! First attempts travel in [`chunk`]s, one index key per group commit and
//! partner, and events in [`event_page`]s, because sled's cost (time and
//! memory) is per key.

// herald needs vendor/sled, its patched copy of sled: herald answers 202
// once `flush()` returns, and upstream sled's flush is not durable (no
// fdatasync, blobs and new files not synced), so a power cut would lose
// accepted events. The published crate lacks this item: building herald
// against it fails here, on the line the compiler shows.
// See vendor/sled/HERALD.md.
const _: () = sled::HERALD_DURABLE_FLUSH; // needs vendor/sled; upstream flush() is not durable: vendor/sled/HERALD.md

mod backlog;
mod checkpoint;
mod chunk;
mod collect;
mod data_dir;
mod depth;
mod enqueue;
mod event_format;
mod event_page;
mod format;
mod gather;
mod handle;
mod ids;
mod jobs;
pub(crate) use jobs::{JobBatch, LetterPage};
pub(crate) mod keys;
mod tally;
pub use backlog::QueueView;
pub(crate) use replay::Replayed;
mod links;
mod record;
mod replay;
mod watermark;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{BlockingRetryable, ConstantBuilder};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::model::{
    Attempt, AttemptLog, DeadLetter, DeliveryState, EventRecord, ParkedRoute, Priority,
    ScheduledDelivery,
};
use keys::ScheduleKey;
use writer::Command;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The writer's queue is full: answer 503 and let the caller retry.
    #[error("the store's write queue is full")]
    Busy,
    #[error("the store is shut down")]
    Closed,
    #[error("data dir {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("store I/O failed: {0}")]
    Io(String),
    #[error("corrupt record under key {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

impl StoreError {
    /// The record under `key` cannot be read, and why.
    pub(crate) fn corrupt(key: &[u8], reason: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            key: keys::describe(key),
            reason: reason.into(),
        }
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// What ingest learns about one event it handed to the store.
#[derive(Debug, Clone)]
pub(crate) struct Accepted {
    pub id: Uuid,
    pub deliveries: Vec<(String, Uuid)>,
    /// The idempotency key had been seen: this is the first event's answer.
    pub duplicate: bool,
    /// The schedule entries this event created (none for a duplicate):
    /// which lanes to tell that their index changed.
    pub scheduled: Vec<Scheduled>,
}

/// A delivery a write made due: the lane it belongs to reads it from the
/// index (see `dispatch::Lane::due_written`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scheduled {
    pub partner: String,
    pub priority: Priority,
    pub delivery: Uuid,
    pub event: Uuid,
}

/// A lane's report of one attempt, and what should happen next. It carries
/// the claim it settles back to the store, which alone reads the claim's
/// keys.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    key: ScheduleKey,
    entry: ScheduledDelivery,
    pub attempt: Attempt,
    pub next: Next,
    /// The answer said the route is gone: park it in the same write.
    pub park: Option<Box<ParkedRoute>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Next {
    Delivered,
    RetryAt(u64),
    Dead(String),
    /// Not sent: this newer delivery carries the same attribute's state.
    Superseded(Uuid),
}

impl Outcome {
    /// What the attempt on `claim` came to.
    pub(crate) fn new(
        claim: Due,
        attempt: Attempt,
        next: Next,
        park: Option<Box<ParkedRoute>>,
    ) -> Self {
        Outcome {
            key: claim.key,
            entry: claim.entry,
            attempt,
            next,
            park,
        }
    }

    pub(crate) fn delivery(&self) -> Uuid {
        self.key.delivery
    }

    pub(crate) fn priority(&self) -> Priority {
        self.key.priority
    }

    pub(crate) fn event_id(&self) -> Uuid {
        self.entry.event
    }
}

/// A claim on one due delivery, as the store hands it to a lane: opaque
/// (what the store needs to find it again stays inside) and given back in
/// the [`Outcome`] that settles it.
#[derive(Debug, Clone)]
pub(crate) struct Due {
    key: ScheduleKey,
    entry: ScheduledDelivery,
    /// The event, once read (a scan reads a chunk's events together);
    /// `None` until then.
    event: Option<Arc<EventRecord>>,
}

impl Due {
    pub(crate) fn delivery(&self) -> Uuid {
        self.key.delivery
    }

    pub(crate) fn priority(&self) -> Priority {
        self.key.priority
    }

    /// Attempts made so far (0: never tried).
    pub(crate) fn attempts(&self) -> u32 {
        self.entry.attempts
    }

    /// When the delivery was created (a replay's is the replay's time):
    /// where its retry window starts.
    pub(crate) fn created_ms(&self) -> u64 {
        self.entry.created_ms
    }

    /// Keeps the event read for it, so its send does not read it again.
    pub(crate) fn keep_event(&mut self, event: Arc<EventRecord>) {
        self.event = Some(event);
    }

    /// The event to build the request from: the one read already, else the
    /// stored record.
    pub(crate) fn event(&self, store: &Store) -> Result<Option<Arc<EventRecord>>, StoreError> {
        match &self.event {
            Some(event) => Ok(Some(Arc::clone(event))),
            None => Ok(store.event_payload(self.entry.event)?.map(Arc::new)),
        }
    }
}

/// What one scan of a partner's schedule found.
#[derive(Debug, Default)]
pub(crate) struct DueScan {
    pub found: Vec<Due>,
    /// The earliest future due time in the ranges read to their end.
    pub next_due_ms: Option<u64>,
    /// The priorities whose due entries were all read (none left behind
    /// for lack of room).
    pub exhausted: Vec<Priority>,
}

/// What one garbage-collection pass did.
#[derive(Debug, Clone, Default)]
pub(crate) struct Collected {
    pub removed: usize,
    /// Where the next pass should start; `None` when this one reached the cutoff.
    pub resume: Option<CollectFrom>,
}

/// Where a garbage-collection pass goes on: after this event, among the
/// events stored alone or among the pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CollectFrom {
    Alone(Uuid),
    Pages(Uuid),
}

#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    pub cache_bytes: u64,
    pub queue: usize,
}

#[derive(Clone)]
pub struct Store {
    /// Read through [`Store::db`]: the writer swaps it after a failed write.
    db: handle::Handle,
    commands: mpsc::Sender<Command>,
    /// The number of the latest durable group commit.
    durable: Arc<AtomicU64>,
    depth: Arc<depth::Depth>,
    backlog: Arc<backlog::Backlog>,
    progress: Arc<tally::Progress>,
    last_commit: Arc<tally::LastCommit>,
    /// Stops the checkpoint thread when the last handle goes.
    _checkpoints: Arc<checkpoint::Checkpoints>,
}

impl Store {
    /// Opens (or creates) the store in `dir` and starts its writer thread.
    /// A lock still held by a dying process is waited for briefly; a corrupt
    /// directory is an error naming it, never a panic.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: dir.to_path_buf(),
            reason,
        };
        data_dir::claim(dir).map_err(open_err)?;
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(options.cache_bytes)
            .mode(sled::Mode::HighThroughput)
            // herald flushes after each group itself; sled's timer would add fsyncs.
            .flush_every_ms(None);
        let open_once = || open_sled(&config, dir);
        let opening = std::time::Instant::now();
        let db = open_once
            .retry(
                ConstantBuilder::default()
                    .with_delay(Duration::from_millis(200))
                    .with_max_times(10),
            )
            .when(|e| matches!(e, StoreError::Io(_)))
            .call()
            .map_err(|e| match e {
                StoreError::Io(reason) => open_err(reason),
                other => other,
            })?;
        let sled_opened = opening.elapsed();
        let watermark = watermark::Watermark::open(dir, &db).map_err(open_err)?;
        format::check(&db).map_err(open_err)?;
        let last_event = event_page::last_stored(&db)
            .map_err(|e| open_err(format!("cannot read the last event stored: {e}")))?;
        let depths = match depth::read(&db) {
            Ok(Some(kept)) => kept,
            found => {
                if let Err(e) = found {
                    tracing::error!(error = %e, "the queue depths on disk are unreadable; counting the schedule");
                }
                let counted = count_scheduled(&db)
                    .map_err(|e| open_err(format!("cannot count the schedule: {e}")))?;
                depth::write_counted(&db, &counted)
                    .map_err(|e| open_err(format!("cannot write the queue depths: {e}")))?;
                counted
            }
        };
        let depth = Arc::new(depth::Depth::new(depths));
        let backlog = Arc::new(
            backlog::Backlog::count(&db)
                .map_err(|e| open_err(format!("cannot count the schedule's ages: {e}")))?,
        );
        let progress = Arc::new(tally::Progress::default());
        let last_commit = Arc::new(tally::LastCommit::default());
        let (commands, rx) = mpsc::channel(options.queue.max(1));
        let durable = Arc::new(AtomicU64::new(0));
        let shared = writer::Shared {
            durable: Arc::clone(&durable),
            depth: Arc::clone(&depth),
            backlog: Arc::clone(&backlog),
            progress: Arc::clone(&progress),
            last_commit: Arc::clone(&last_commit),
        };
        let reopen = writer::Reopen {
            dir: dir.to_path_buf(),
            config,
            handle: handle::Handle::new(db.clone()),
        };
        let handle = reopen.handle.clone();
        writer::spawn(db, reopen, watermark, last_event, shared, rx)
            .map_err(|e| open_err(format!("cannot start the writer: {e}")))?;
        let checkpoints = checkpoint::Checkpoints::start(handle.clone(), Arc::clone(&durable))
            .map_err(|e| open_err(format!("cannot start checkpoints: {e}")))?;
        // A restart's time to the first delivery starts with this.
        tracing::info!(
            sled_ms = sled_opened.as_millis() as u64,
            total_ms = opening.elapsed().as_millis() as u64,
            "store opened"
        );
        Ok(Store {
            db: handle,
            commands,
            durable,
            depth,
            backlog,
            progress,
            last_commit,
            _checkpoints: Arc::new(checkpoints),
        })
    }

    /// The database to read now; an error while the writer opens it
    /// again after a failed write (see [`handle`]).
    fn db(&self) -> Result<sled::Db, StoreError> {
        self.db.db()
    }

    /// Resolves once a group commit has failed since the last call (a
    /// full disk, a failing device): the moment to look at the disk again.
    pub(crate) async fn write_failed(&self) {
        self.db.failed.notified().await
    }

    /// Why the store cannot be read or written now, while the writer opens
    /// it again after a failed write; `None` when it is open.
    pub(crate) fn out_because(&self) -> Option<String> {
        self.db.out_because()
    }

    // ---- writes: through the writer ----------------------------------------

    /// Makes `events` durable with their deliveries scheduled now. Answers only
    /// after the group holding them is on disk. `Busy` when the queue is full.
    pub(crate) async fn enqueue(
        &self,
        events: Vec<EventRecord>,
    ) -> Result<Vec<Accepted>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .try_send(Command::Enqueue { events, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => StoreError::Busy,
                mpsc::error::TrySendError::Closed(_) => StoreError::Closed,
            })?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Records one attempt's outcome and moves the delivery on.
    #[cfg(test)]
    pub(crate) async fn record(&self, outcome: Outcome) -> Result<(), StoreError> {
        let mut results = self.record_all(vec![outcome]).await?;
        results.pop().unwrap_or(Err(StoreError::Closed))
    }

    /// Records many outcomes in one group commit: a result for each, in
    /// order (one that cannot be applied does not fail the others).
    pub(crate) async fn record_all(
        &self,
        outcomes: Vec<Outcome>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        self.call(|reply| Command::Record { outcomes, reply }).await
    }

    /// Clears a parked route; false if it was not parked.
    pub(crate) async fn unpark(&self, partner: &str, device_id: &str) -> Result<bool, StoreError> {
        let key = keys::parked(partner, device_id);
        self.call(|reply| Command::Unpark { key, reply }).await
    }

    /// Every parked route of `partner`.
    pub(crate) fn parked(&self, partner: &str) -> Result<Vec<ParkedRoute>, StoreError> {
        let mut out = Vec::new();
        for item in self.db()?.scan_prefix(keys::parked_prefix(partner)) {
            let (k, v) = item?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Removes finished events received before `cutoff_ms`, looking at
    /// about `budget` events, going on `from` where the last pass stopped.
    pub(crate) async fn collect(
        &self,
        cutoff_ms: u64,
        budget: usize,
        from: Option<CollectFrom>,
    ) -> Result<Collected, StoreError> {
        self.call(|reply| Command::Collect {
            cutoff_ms,
            budget,
            from,
            reply,
        })
        .await
    }

    /// Flushes what is pending and stops the writer. Later writes get `Closed`.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        self.call(|reply| Command::Shutdown { reply }).await
    }

    async fn call<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Command,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    // ---- reads: straight from sled ------------------------------------------

    /// The number of the latest durable group commit: it moves with every
    /// write herald makes (what "herald is quiet" is told by).
    pub fn durable_commit(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// The event with every delivery's current state.
    pub fn event(&self, id: Uuid) -> Result<Option<EventRecord>, StoreError> {
        let db = self.db()?;
        let get = |key: &[u8]| Ok(db.get(key)?.map(|v| v.to_vec()));
        let Some((mut event, _)) = current_event(&db, id, get)? else {
            return Ok(None);
        };
        settle_delivered(&mut event, get)?;
        Ok(Some(event))
    }

    /// The event as accepted, for building a request: delivery states may be
    /// stale (a success is kept apart, see [`keys::DELIVERED`] and
    /// [`keys::CHUNK_STATE`], and a later change in [`keys::REWRITTEN`]).
    pub(crate) fn event_payload(&self, id: Uuid) -> Result<Option<EventRecord>, StoreError> {
        let db = self.db()?;
        if let Some(event) = event_page::find(&db, id)? {
            return Ok(Some(event));
        }
        let key = keys::event(id);
        match db.get(key)? {
            None => Ok(None),
            Some(v) => event_format::decode(&key, &v).map(Some),
        }
    }

    pub fn attempt_log(&self, delivery: Uuid) -> Result<Option<AttemptLog>, StoreError> {
        get_json(&self.db()?, &keys::attempts(delivery))
    }

    pub fn dead_letter(&self, id: Uuid) -> Result<Option<DeadLetter>, StoreError> {
        get_json(&self.db()?, &keys::dead_letter(id))
    }

    /// Dead letters in the order they died, after `after`, at most `limit`
    /// of those that `keep` accepts.
    pub(crate) fn dead_letters(
        &self,
        after: Option<Uuid>,
        limit: usize,
        keep: &dyn Fn(&DeadLetter) -> bool,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let start = match after {
            Some(id) => {
                let mut k = keys::dead_letter(id).to_vec();
                k.push(0);
                k
            }
            None => vec![keys::DEAD],
        };
        let mut out = Vec::new();
        for item in self.db()?.range(start..vec![keys::DEAD + 1]) {
            let (k, v) = item?;
            let dead: DeadLetter = decode(&k, &v)?;
            if keep(&dead) {
                out.push(dead);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Up to `limit` of `partner`'s entries due at `now_ms`, critical ones
    /// first, skipping those `held` says are already taken (`held` may
    /// change during the scan: an entry is read after `held` is asked about
    /// it, so one settled and released meanwhile is not found); for each
    /// priority whose due range was read to its end, also the earliest due
    /// time still in the future (when to look again).
    pub(crate) fn due(
        &self,
        partner: &str,
        priorities: &[Priority],
        now_ms: u64,
        limit: usize,
        held: &dyn Fn(Uuid) -> bool,
    ) -> Result<DueScan, StoreError> {
        let db = self.db()?;
        let mut scan = DueScan::default();
        for &priority in priorities {
            let (start, end) = keys::due_range(partner, priority, now_ms);
            let mut exhausted = true;
            for item in db.range(start.clone()..end.clone()) {
                if scan.found.len() >= limit {
                    exhausted = false;
                    break;
                }
                let (k, v) = item?;
                // Most of what a refill walks past is in flight: skip it cheaply.
                if ScheduleKey::delivery_of(&k).is_some_and(held) {
                    continue;
                }
                let Some(key) = ScheduleKey::decode(&k) else {
                    tracing::error!(key = ?k, "skipping an undecodable schedule key");
                    continue;
                };
                if chunk::is_chunk(&v) {
                    let room = limit - scan.found.len();
                    let before = scan.found.len();
                    let all_in = self.due_members(key, &k, &v, room, held, &mut scan.found)?;
                    self.read_events(&mut scan.found[before..])?;
                    if !all_in {
                        exhausted = false;
                        break;
                    }
                    continue;
                }
                match decode::<ScheduledDelivery>(&k, &v) {
                    Ok(entry) if !self.is_first_of_device(partner, &entry)? => {}
                    // Settled (and released) since the walk read it.
                    Ok(_) if !db.contains_key(&k)? => {}
                    Ok(entry) => scan.found.push(Due {
                        key,
                        entry,
                        event: None,
                    }),
                    Err(e) => tracing::error!(error = %e, "skipping a corrupt schedule entry"),
                }
            }
            if !exhausted {
                continue;
            }
            scan.exhausted.push(priority);
            let (_, all) = keys::due_range(partner, priority, u64::MAX);
            if let Some(item) = db.range(end..all).next() {
                let (k, _) = item?;
                if let Some(key) = ScheduleKey::decode(&k) {
                    scan.next_due_ms =
                        Some(scan.next_due_ms.map_or(key.due_ms, |n| n.min(key.due_ms)));
                }
            }
        }
        Ok(scan)
    }

    /// Adds chunk `chunk`'s pending members that `held` does not name to
    /// `found`, at most `room`; false if some were left for lack of room.
    fn due_members(
        &self,
        chunk: ScheduleKey,
        key: &[u8],
        value: &[u8],
        room: usize,
        held: &dyn Fn(Uuid) -> bool,
        found: &mut Vec<Due>,
    ) -> Result<bool, StoreError> {
        let members = match chunk::Members::decode(key, value) {
            Ok(members) => members,
            Err(e) => {
                tracing::error!(error = %e, "skipping a corrupt schedule chunk");
                return Ok(true);
            }
        };
        let free: Vec<usize> = (0..members.list.len())
            .filter(|&slot| !held(members.list[slot].0))
            .collect();
        if free.is_empty() {
            return Ok(true);
        }
        // Read after `held` was asked: a member released meanwhile was
        // settled before its release, so the state says so.
        let state = chunk_state(&self.db()?, chunk.delivery, members.list.len())?;
        // A state that is gone reads as all pending: that holds only while
        // the entry is still there (the last settle removes both).
        if !self.db()?.contains_key(key)? {
            return Ok(true);
        }
        let mut added = 0;
        for slot in free {
            let delivery = members.list[slot].0;
            if !state.is_pending(slot) {
                continue;
            }
            if added == room {
                return Ok(false);
            }
            if let Some(entry) = members.entry(&chunk, slot) {
                let key = ScheduleKey {
                    delivery,
                    ..chunk.clone()
                };
                found.push(Due {
                    key,
                    entry,
                    event: None,
                });
                added += 1;
            }
        }
        Ok(true)
    }

    /// Reads the events of `dues`, one chunk's members, in one walk of the
    /// event pages instead of a lookup each when they are sent: a chunk's
    /// events were accepted by one group commit, so they share a few pages.
    /// The walk stops once it has read many more pages than it could need
    /// (other groups' between them); a due left without its event reads it
    /// by itself when sent, as does one whose record will not decode (and
    /// reports it then).
    fn read_events(&self, dues: &mut [Due]) -> Result<(), StoreError> {
        if dues.len() < 2 {
            return Ok(());
        }
        let mut wanted: HashMap<Uuid, usize> = HashMap::with_capacity(dues.len());
        for (i, due) in dues.iter().enumerate() {
            if due.event.is_none() {
                wanted.insert(due.entry.event, i);
            }
        }
        let (Some(&first), Some(&last)) = (wanted.keys().min(), wanted.keys().max()) else {
            return Ok(());
        };
        let Some((start, _)) = event_page::page_for(&self.db()?, first)? else {
            return Ok(());
        };
        let budget = wanted.len() + 8;
        let pages = self
            .db()?
            .range(start..=sled::IVec::from(&keys::event_page(last)));
        for item in pages.take(budget) {
            let (key, value) = item?;
            let Ok(page) = event_page::Page::parse(&key, &value) else {
                continue;
            };
            for i in 0..page.len() {
                let Some(at) = wanted.remove(&page.id(i)) else {
                    continue;
                };
                if let Ok(event) = page.record(i) {
                    dues[at].event = Some(Arc::new(event));
                }
            }
            if wanted.is_empty() {
                break;
            }
        }
        Ok(())
    }

    /// The latest state delivery of `device`'s `state` attribute at `partner`.
    pub(crate) fn latest_state(
        &self,
        partner: &str,
        device: &str,
        state: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        let key = keys::latest_state(partner, device, state);
        Ok(self
            .db()?
            .get(&key)?
            .and_then(|v| Uuid::from_slice(&v).ok()))
    }

    /// Whether nothing of the same device is ahead of this delivery (always,
    /// for a partner that does not ask for order).
    fn is_first_of_device(
        &self,
        partner: &str,
        entry: &ScheduledDelivery,
    ) -> Result<bool, StoreError> {
        let Some(order) = &entry.order else {
            return Ok(true);
        };
        let first = self
            .db()?
            .scan_prefix(keys::device_queue_prefix(partner, &order.device))
            .next()
            .transpose()?;
        Ok(first.is_none_or(|(k, _)| k.ends_with(entry.delivery.as_bytes())))
    }

    /// How many deliveries of `partner` wait in the schedule (in flight
    /// included), as the writer keeps count: no scan.
    pub fn queued(&self, partner: &str) -> u64 {
        self.depth.of(partner)
    }

    /// `partner` × `priority`'s waiting deliveries and the enqueue time of
    /// the oldest, as the writer keeps them: no scan.
    pub fn queue(&self, partner: &str, priority: Priority) -> backlog::QueueView {
        self.backlog.view(partner, priority)
    }

    /// When (herald's clock) the latest outcome of `partner` was made
    /// durable since the store opened; `None` before the first.
    pub fn last_outcome_ms(&self, partner: &str) -> Option<u64> {
        self.progress.of(partner)
    }

    /// Whether `partner`'s schedule holds a delivery due at or before
    /// `cutoff_ms` (one read per priority, at the head of its range).
    pub fn has_due_by(&self, partner: &str, cutoff_ms: u64) -> Result<bool, StoreError> {
        let db = self.db()?;
        for priority in Priority::ALL {
            let (start, end) = keys::due_range(partner, priority, cutoff_ms);
            if db.range(start..end).next().transpose()?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The latest group commit that wrote: how long ago, and its error if
    /// it failed; `None` before the first.
    pub fn last_commit(&self) -> Option<(Duration, Option<String>)> {
        self.last_commit
            .get()
            .map(|(at, error)| (at.elapsed(), error))
    }

    /// Makes a group commit of nothing but the commit record, through the
    /// writer and its fdatasync: whether the store can write now.
    pub async fn probe(&self) -> Result<(), StoreError> {
        self.call(|reply| Command::Probe { reply }).await
    }

    /// The same, counted by a full scan of `partner`'s range: for tests and
    /// tooling, not for hot paths.
    pub fn scheduled_count(&self, partner: &str) -> usize {
        let Ok(db) = self.db() else { return 0 };
        Priority::ALL
            .iter()
            .map(|&p| {
                let (start, end) = keys::due_range(partner, p, u64::MAX);
                db.range(start..end)
                    .filter_map(Result::ok)
                    .map(|(k, v)| entry_depth(&db, &k, &v))
                    .sum::<usize>()
            })
            .sum()
    }

    /// How many records of each kind the store holds, by key prefix; for
    /// `e`, how many events (stored alone or in pages).
    pub fn record_counts(&self) -> Vec<(char, usize)> {
        let Ok(db) = self.db() else {
            return Vec::new();
        };
        let paged: usize = db
            .scan_prefix([keys::EVENT_PAGE])
            .filter_map(Result::ok)
            .filter_map(|(k, v)| event_page::Page::parse(&k, &v).ok().map(|p| p.len()))
            .sum();
        [
            keys::EVENT,
            keys::EVENT_PAGE,
            keys::REWRITTEN,
            keys::IDEMPOTENCY,
            keys::SCHEDULE,
            keys::ATTEMPTS,
            keys::DELIVERED,
            keys::CHUNK_STATE,
            keys::DEAD,
            keys::REPLAY_JOB,
            keys::AUDIT,
        ]
        .iter()
        .map(|&p| {
            let stored = db.scan_prefix([p]).count();
            (p as char, stored + if p == keys::EVENT { paged } else { 0 })
        })
        .collect()
    }
}

/// One attempt at opening sled in `dir`. sled 0.34 panics on some
/// corruptions instead of returning an error: that is an error naming the
/// directory too. `Io` (a lock still held, a full disk) may pass if tried
/// again.
fn open_sled(config: &sled::Config, dir: &Path) -> Result<sled::Db, StoreError> {
    let open_err = |reason: String| StoreError::Open {
        path: dir.to_path_buf(),
        reason,
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open())) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(sled::Error::Io(e))) => Err(StoreError::Io(e.to_string())),
        Ok(Err(e)) => Err(open_err(format!("sled cannot open it: {e}"))),
        Err(_) => Err(open_err(
            "sled panicked reading it: the data is corrupt".into(),
        )),
    }
}

/// The state of a chunk of `members`; all pending if its record is missing
/// or unreadable (the writer rebuilds it so when it records an outcome):
/// sending again beats stranding a delivery.
fn chunk_state(db: &sled::Db, chunk: Uuid, members: usize) -> Result<chunk::State, StoreError> {
    let key = keys::chunk_state(chunk);
    let Some(bytes) = db.get(key)? else {
        return Ok(chunk::State::new(members));
    };
    match chunk::State::from_bytes(&key, bytes.to_vec()) {
        Ok(state) if state.members() == members => Ok(state),
        Ok(_) | Err(_) => {
            tracing::error!(%chunk, "unreadable chunk state; its members are taken as pending");
            Ok(chunk::State::new(members))
        }
    }
}

/// How many deliveries one schedule entry holds: one, or a chunk's pending
/// members (none if it cannot be read: the scan skips it too).
fn entry_depth(db: &sled::Db, key: &[u8], value: &[u8]) -> usize {
    if !chunk::is_chunk(value) {
        return 1;
    }
    let Some(id) = ScheduleKey::delivery_of(key) else {
        return 0;
    };
    chunk::Members::decode(key, value)
        .and_then(|m| chunk_state(db, id, m.list.len()))
        .map_or(0, |state| state.pending_count())
}

/// Every partner's deliveries in the schedule, by a scan of the index.
fn count_scheduled(db: &sled::Db) -> Result<std::collections::HashMap<String, u64>, StoreError> {
    let mut counted = std::collections::HashMap::new();
    for item in db.scan_prefix([keys::SCHEDULE]) {
        let (k, v) = item?;
        let Some(key) = ScheduleKey::decode(&k) else {
            continue;
        };
        *counted.entry(key.partner).or_default() += entry_depth(db, &k, &v) as u64;
    }
    Ok(counted)
}

/// Where an event's record lives: where a rewrite of it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Home {
    /// Its own `e` record (see [`keys::EVENT`]).
    Alone,
    /// A page, rewritten (or to be) under `r` (see [`keys::REWRITTEN`]).
    Paged,
}

/// Event `id` as it stands: its rewrite, else its page's copy, else its
/// own record; and where a rewrite of it goes. `get` reads a record (from
/// sled, or through the writer's pending group, where retention may have
/// rewritten the page).
fn current_event(
    db: &sled::Db,
    id: Uuid,
    get: impl Fn(&[u8]) -> Result<Option<Vec<u8>>, StoreError>,
) -> Result<Option<(EventRecord, Home)>, StoreError> {
    let rewritten = keys::rewritten(id);
    if let Some(v) = get(&rewritten)? {
        return Ok(Some((event_format::decode(&rewritten, &v)?, Home::Paged)));
    }
    if let Some((key, _)) = event_page::page_for(db, id)? {
        if let Some(value) = get(&key)? {
            let page = event_page::Page::parse(&key, &value)?;
            if let Some(i) = page.find(id) {
                return Ok(Some((page.record(i)?, Home::Paged)));
            }
        }
    }
    let key = keys::event(id);
    match get(&key)? {
        Some(v) => Ok(Some((event_format::decode(&key, &v)?, Home::Alone))),
        None => Ok(None),
    }
}

/// Applies what delivered `event`'s pending deliveries to it: a chunk
/// slot, or a delivered marker. `get` reads a record (from sled, or
/// through the writer's pending group).
fn settle_delivered(
    event: &mut EventRecord,
    get: impl Fn(&[u8]) -> Result<Option<Vec<u8>>, StoreError>,
) -> Result<(), StoreError> {
    for d in &mut event.deliveries {
        if d.state != DeliveryState::Pending {
            continue;
        }
        let attempt = match d.chunk {
            Some(c) => {
                let key = keys::chunk_state(c.id);
                match get(&key)?.map(|bytes| chunk::State::from_bytes(&key, bytes)) {
                    Some(Ok(state)) => state.delivered(c.slot as usize),
                    // Shown as pending, and sent again: not a failed read.
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "unreadable chunk state");
                        None
                    }
                    None => None,
                }
            }
            None => {
                let key = keys::delivered(d.id);
                match get(&key)? {
                    Some(bytes) => Some(decode::<Attempt>(&key, &bytes)?),
                    None => None,
                }
            }
        };
        if let Some(attempt) = attempt {
            d.mark_delivered(attempt);
        }
    }
    Ok(())
}

fn get_json<T: serde::de::DeserializeOwned>(
    db: &sled::Db,
    key: &[u8],
) -> Result<Option<T>, StoreError> {
    match db.get(key)? {
        None => Ok(None),
        Some(v) => decode(key, &v).map(Some),
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::corrupt(key, e.to_string()))
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Our records are plain structs with string keys: serializing cannot fail.
    serde_json::to_vec(value).expect("herald's records always serialize")
}

/// A store in a temp dir and events to put in it, for unit tests here and
/// in the dispatcher.
#[cfg(test)]
pub(crate) mod testing {
    use serde_json::value::RawValue;
    use uuid::Uuid;

    use super::{Store, StoreOptions};
    use crate::model::{Attempt, AttemptOutcome, DeliveryRecord, EventRecord, Priority};

    /// A small store in a fresh temp dir (kept while the dir lives).
    pub(crate) fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = StoreOptions {
            cache_bytes: 1 << 20,
            queue: 16,
        };
        let store = Store::open(dir.path(), options).expect("store");
        (dir, store)
    }

    /// An event of `device` with one delivery to `acme`, due at 1,000 ms.
    pub(crate) fn event(device: &str, priority: Priority) -> EventRecord {
        EventRecord {
            id: Uuid::now_v7(),
            device_id: device.into(),
            event_type: "door.forced_open".into(),
            priority,
            occurred_at: "2026-11-25T06:00:00Z".into(),
            idempotency_key: None,
            data: RawValue::from_string("{}".into()).expect("json"),
            received_ms: 1_000,
            deliveries: vec![DeliveryRecord::pending(
                Uuid::now_v7(),
                "acme".into(),
                1_000,
            )],
        }
    }

    /// The store in `dir` again, as a restart opens it.
    pub(crate) fn reopen(dir: &tempfile::TempDir) -> Store {
        let options = StoreOptions {
            cache_bytes: 1 << 20,
            queue: 16,
        };
        Store::open(dir.path(), options).expect("store")
    }

    /// A first attempt that delivered, at 1,500 ms.
    pub(crate) fn delivered_attempt() -> Attempt {
        Attempt {
            number: 1,
            at_ms: 1_500,
            status: Some(200),
            latency_ms: 3,
            outcome: AttemptOutcome::Delivered,
            detail: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::open;
    use super::*;
    use crate::model::AttemptOutcome;

    fn event(n: u32) -> EventRecord {
        testing::event(&format!("lock-{n}"), Priority::Normal)
    }

    fn due_now(store: &Store) -> Vec<Due> {
        store
            .due("acme", &Priority::ALL, 2_000, 100, &|_| false)
            .expect("scan")
            .found
    }

    async fn deliver(store: &Store, due: &Due) {
        let outcome = Outcome {
            key: due.key.clone(),
            entry: due.entry.clone(),
            attempt: testing::delivered_attempt(),
            next: Next::Delivered,
            park: None,
        };
        store.record(outcome).await.expect("recorded");
    }

    /// `due`'s first attempt answered 503: retried at 5 s.
    fn retried(due: &Due) -> Outcome {
        Outcome {
            key: due.key.clone(),
            entry: due.entry.clone(),
            attempt: Attempt {
                number: 1,
                at_ms: 1_500,
                status: Some(503),
                latency_ms: 3,
                outcome: AttemptOutcome::Retry,
                detail: "503".into(),
            },
            next: Next::RetryAt(5_000),
            park: None,
        }
    }

    #[tokio::test]
    async fn queues_by_priority_and_their_oldest_follow_commits_and_are_counted_again_at_open() {
        let (dir, store) = open();
        let at = |ms: u64, priority: Priority| {
            let mut e = testing::event("lock-1", priority);
            e.received_ms = ms;
            e.deliveries[0].next_due_ms = None;
            e
        };
        // Chunk members (first attempts) and a critical one.
        store
            .enqueue(vec![
                at(1_000, Priority::Normal),
                at(1_200, Priority::Normal),
            ])
            .await
            .expect("enqueue");
        store
            .enqueue(vec![
                at(3_000, Priority::Normal),
                at(4_000, Priority::Critical),
            ])
            .await
            .expect("enqueue");
        let normal = store.queue("acme", Priority::Normal);
        assert_eq!((normal.depth, normal.oldest_ms), (3, Some(1_000)));
        let critical = store.queue("acme", Priority::Critical);
        assert_eq!((critical.depth, critical.oldest_ms), (1, Some(4_000)));
        let mut due: Vec<Due> = store
            .due("acme", &[Priority::Normal], 10_000, 100, &|_| false)
            .expect("scan")
            .found;
        due.sort_by_key(|d| d.entry.created_ms);
        // The oldest two: one retried (keeps its age, out of its chunk),
        // one delivered.
        store.record(retried(&due[0])).await.expect("retried");
        deliver(&store, &due[1]).await;
        let normal = store.queue("acme", Priority::Normal);
        assert_eq!(
            (normal.depth, normal.oldest_ms),
            (2, Some(1_000)),
            "the retry is still the oldest"
        );
        let counted = |store: &Store| {
            Priority::ALL.map(|p| {
                let q = store.queue("acme", p);
                (q.depth, q.oldest_ms)
            })
        };
        let kept = counted(&store);
        store.shutdown().await.expect("shutdown");
        drop(store);
        let store = testing::reopen(&dir);
        assert_eq!(
            counted(&store),
            kept,
            "a scan at open finds what commits kept"
        );
        assert_eq!(kept, [(1, Some(4_000)), (2, Some(1_000))]);
    }

    /// Three events accepted in one group: their chunk's id.
    async fn three_in_a_chunk(store: &Store) -> (Vec<Uuid>, Uuid) {
        let accepted = store
            .enqueue((0..3).map(event).collect())
            .await
            .expect("enqueue");
        let due = store
            .due("acme", &Priority::ALL, 2_000, 100, &|_| false)
            .expect("scan");
        let chunks: std::collections::HashSet<Uuid> = due
            .found
            .iter()
            .filter_map(|d| d.entry.chunk.map(|c| c.id))
            .collect();
        assert_eq!(chunks.len(), 1, "one group, one chunk");
        let ids = accepted.iter().map(|a| a.id).collect();
        (ids, chunks.into_iter().next().expect("a chunk"))
    }

    /// Records `first` as retried (due at 5,000 ms) and finds its retry,
    /// an entry of its own, in the schedule once due.
    async fn retried_and_due(store: &Store, first: &Due) -> Due {
        store.record(retried(first)).await.expect("retry recorded");
        store
            .due("acme", &Priority::ALL, 6_000, 100, &|_| false)
            .expect("scan")
            .found
            .into_iter()
            .find(|d| d.key.delivery == first.key.delivery)
            .expect("the retry is scheduled")
    }

    /// Replaces event `id`'s record in its page with bytes that do not decode.
    fn damage_in_its_page(store: &Store, id: Uuid) {
        let (key, value) = event_page::page_for(&store.db().expect("open"), id)
            .expect("read")
            .expect("its page");
        let page = event_page::Page::parse(&key, &value).expect("parse");
        let records: Vec<(Uuid, &[u8])> = (0..page.len())
            .map(|i| {
                let raw = if page.id(i) == id {
                    &b"{not json"[..]
                } else {
                    page.raw(i).expect("raw")
                };
                (page.id(i), raw)
            })
            .collect();
        let damaged = event_page::encode(records.into_iter());
        store
            .db()
            .expect("open")
            .insert(key, damaged)
            .expect("write");
    }

    #[tokio::test]
    async fn a_scan_reads_a_chunks_events_and_leaves_an_unreadable_one_to_report_itself() {
        let (_dir, store) = open();
        let (events, _) = three_in_a_chunk(&store).await;
        damage_in_its_page(&store, events[1]);
        let mut dues = due_now(&store);
        dues.sort_by_key(|d| d.entry.event);
        let carried: Vec<Option<Uuid>> = dues
            .iter()
            .map(|d| d.event.as_ref().map(|e| e.id))
            .collect();
        let mut expected = events.clone();
        expected.sort();
        let by_id = |id: Uuid| events.iter().position(|e| *e == id).expect("one of ours");
        for (due, carried) in dues.iter().zip(&carried) {
            if by_id(due.entry.event) == 1 {
                assert_eq!(*carried, None, "the corrupt record is not handed over");
                let read = due.event(&store);
                assert!(matches!(read, Err(StoreError::Corrupt { .. })), "{read:?}");
            } else {
                assert_eq!(*carried, Some(due.entry.event), "read in the scan");
            }
        }
        let found: Vec<Uuid> = dues.iter().map(|d| d.entry.event).collect();
        assert_eq!(found, expected, "every member is due");
    }

    #[tokio::test]
    async fn a_chunk_emptied_after_a_scan_read_its_entry_is_not_sent_again() {
        let (_dir, store) = open();
        three_in_a_chunk(&store).await;
        // What a scan's walk read just before the last members settled.
        let (start, end) = keys::due_range("acme", Priority::Normal, 2_000);
        let (k, v) = store
            .db()
            .expect("open")
            .range(start..end)
            .next()
            .expect("the chunk's entry")
            .expect("read");
        // Each fails once: out of the chunk (gone with its state) into a
        // retry of its own.
        for due in due_now(&store) {
            store.record(retried(&due)).await.expect("recorded");
        }
        assert!(due_now(&store).is_empty(), "the retries are not due yet");
        let chunk = ScheduleKey::decode(&k).expect("a schedule key");
        let mut found = Vec::new();
        store
            .due_members(chunk, &k, &v, 100, &|_| false, &mut found)
            .expect("scan");
        assert!(
            found.is_empty(),
            "settled members found again: {}",
            found.len()
        );
    }

    #[tokio::test]
    async fn an_outcome_that_fails_part_way_leaves_its_delivery_scheduled() {
        let (_dir, store) = open();
        let (events, _) = three_in_a_chunk(&store).await;
        let first = due_now(&store).remove(0);
        // An unreadable rewrite of its event: the retry cannot be recorded.
        store
            .db()
            .expect("open")
            .insert(keys::rewritten(first.entry.event), &b"{not json"[..])
            .expect("write");
        let failed = store.record(retried(&first)).await;
        assert!(
            matches!(failed, Err(StoreError::Corrupt { .. })),
            "{failed:?}"
        );
        // Nothing of it was written: still in its chunk, still counted, sent again.
        let again = due_now(&store);
        assert_eq!(again.len(), 3);
        assert!(again.iter().any(|d| d.key.delivery == first.key.delivery));
        assert_eq!(store.queued("acme"), 3);
        assert_eq!(store.scheduled_count("acme"), 3);
        assert_eq!(events.len(), 3);
    }

    #[tokio::test]
    async fn an_idempotency_key_seen_before_stores_no_second_event() {
        let (_dir, store) = open();
        let keyed = || {
            let mut e = event(0);
            e.idempotency_key = Some("lock-1/88412".into());
            e
        };
        let first = store.enqueue(vec![keyed()]).await.expect("enqueue");
        let again = store
            .enqueue(vec![keyed(), keyed()])
            .await
            .expect("enqueue");
        assert!(again.iter().all(|a| a.duplicate && a.id == first[0].id));
        let counts: HashMap<char, usize> = store.record_counts().into_iter().collect();
        assert_eq!(counts[&'e'], 1, "one event: {counts:?}");
        assert_eq!(counts[&'i'], 1, "one key: {counts:?}");
        assert_eq!(store.queued("acme"), 1);
    }

    #[tokio::test]
    async fn a_data_dir_of_another_store_format_is_refused_by_name() {
        let (dir, store) = open();
        let db = store.db().expect("open");
        assert_eq!(
            db.get(keys::FORMAT).expect("read").as_deref(),
            Some(&[format::VERSION][..]),
            "a new store is marked"
        );
        db.insert(keys::FORMAT, &[2u8]).expect("write");
        drop(db);
        store.shutdown().await.expect("shutdown");
        drop(store);
        let options = StoreOptions {
            cache_bytes: 1 << 20,
            queue: 16,
        };
        let refused = Store::open(dir.path(), options).err().expect("refused");
        let text = refused.to_string();
        assert!(
            text.contains("format 2") && text.contains("reads format 1"),
            "{text}"
        );
    }

    /// Every key and value of the sled database in `dir`, opened directly.
    fn raw_contents(dir: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
        let db = sled::open(dir).expect("sled opens");
        db.iter()
            .map(|item| item.map(|(k, v)| (k.to_vec(), v.to_vec())))
            .collect::<Result<_, _>>()
            .expect("reads")
    }

    #[tokio::test]
    async fn a_data_dir_of_a_pre_release_build_is_refused_by_name_and_left_as_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(watermark::FILE_NAME), b"").expect("marker");
        let old = event(1);
        let link = serde_json::json!({
            "partner": "st", "device_id": "lock-1", "external_id": "x",
            "account": null, "region": null, "callback_url": null, "token_url": null,
            "sealed_credentials": "c2VhbGVk", "expires_at_unix": 1, "options": null,
            "generation": 3, "updated_ms": 1234
        });
        {
            // As a build before 0.1.0 left it: a JSON event stored alone, a
            // link holding its own credentials, no format mark.
            let db = sled::open(dir.path()).expect("sled opens");
            db.insert(keys::event(old.id), encode(&old)).expect("write");
            db.insert(keys::link("st", "lock-1"), encode(&link))
                .expect("write");
            db.flush().expect("flush");
        }
        let before = raw_contents(dir.path());
        let commits = std::fs::read(dir.path().join(watermark::FILE_NAME)).expect("reads");
        let options = StoreOptions {
            cache_bytes: 1 << 20,
            queue: 16,
        };
        let refused = Store::open(dir.path(), options).err().expect("refused");
        let text = refused.to_string();
        for expected in [
            "pre-release build of herald",
            "no format mark",
            "event records in JSON",
            "links that hold their own credentials",
            "no queue depth records",
            "reads store format 1",
        ] {
            assert!(text.contains(expected), "{expected:?} in {text}");
        }
        assert_eq!(raw_contents(dir.path()), before, "nothing is written");
        assert_eq!(
            std::fs::read(dir.path().join(watermark::FILE_NAME)).expect("reads"),
            commits
        );

        // A store as herald 0.1.0 left it (no mark, format 1's layouts) is
        // read and marked.
        let released = tempfile::tempdir().expect("tempdir");
        std::fs::write(released.path().join(watermark::FILE_NAME), b"").expect("marker");
        {
            let db = sled::open(released.path()).expect("sled opens");
            db.insert(keys::event(old.id), event_format::encode(&old))
                .expect("write");
            db.insert(keys::DEPTH_KEPT, &[]).expect("write");
            db.flush().expect("flush");
        }
        let store = Store::open(released.path(), options).expect("opens");
        assert_eq!(
            store
                .db()
                .expect("open")
                .get(keys::FORMAT)
                .expect("read")
                .as_deref(),
            Some(&[format::VERSION][..]),
            "marked"
        );
        assert_eq!(
            store.event(old.id).expect("read").map(|e| e.id),
            Some(old.id)
        );
        store.shutdown().await.expect("shutdown");
    }

    #[tokio::test]
    async fn a_success_reported_twice_is_recorded_once() {
        let (_dir, store) = open();
        three_in_a_chunk(&store).await;
        let first = due_now(&store).remove(0);
        let retry = retried_and_due(&store, &first).await;
        deliver(&store, &retry).await;
        deliver(&store, &retry).await;
        let log = store
            .attempt_log(retry.entry.delivery)
            .expect("reads")
            .expect("a log");
        assert_eq!(log.attempts.len(), 2, "the retry and one success: {log:?}");
        assert_eq!(store.queued("acme"), 2, "moved once");
    }

    #[tokio::test]
    async fn an_unreadable_or_missing_chunk_state_sends_again_and_is_rebuilt() {
        for damage in ["garbage", "missing"] {
            let (_dir, store) = open();
            let (events, chunk) = three_in_a_chunk(&store).await;
            let first = due_now(&store);
            assert_eq!(first.len(), 3);
            deliver(&store, &first[0]).await;
            assert_eq!(due_now(&store).len(), 2, "{damage}: one delivered");

            let key = keys::chunk_state(chunk);
            match damage {
                "garbage" => drop(
                    store
                        .db()
                        .expect("open")
                        .insert(key, &b"\x01not a state"[..])
                        .expect("write"),
                ),
                _ => drop(store.db().expect("open").remove(key).expect("remove")),
            }
            // Nothing is stranded: all members are sent again (at least once).
            let again = due_now(&store);
            assert_eq!(again.len(), 3, "{damage}: taken as pending");
            let event = store
                .event(events[1])
                .expect("a failed chunk read is not an error");
            assert_eq!(
                event.expect("event").deliveries[0].state,
                DeliveryState::Pending
            );

            // The next outcome rebuilds the state, and it counts from there.
            deliver(&store, &again[1]).await;
            let left = due_now(&store);
            assert_eq!(left.len(), 2, "{damage}: rebuilt, one settled");
            let delivered = store.event(events[1]).expect("read").expect("event");
            assert_eq!(delivered.deliveries[0].state, DeliveryState::Delivered);
            for due in &left {
                deliver(&store, due).await;
            }
            assert!(due_now(&store).is_empty(), "{damage}: all settled");
            assert_eq!(
                store.scheduled_count("acme"),
                0,
                "{damage}: the entry is gone"
            );
        }
    }

    fn count(store: &Store, prefix: char) -> usize {
        store
            .record_counts()
            .into_iter()
            .find(|(p, _)| *p == prefix)
            .map_or(0, |(_, n)| n)
    }

    async fn collect_all(store: &Store, cutoff_ms: u64, budget: usize) -> (usize, usize) {
        let (mut removed, mut passes) = (0, 0);
        let mut from = None;
        loop {
            let done = store
                .collect(cutoff_ms, budget, from)
                .await
                .expect("collect");
            removed += done.removed;
            passes += 1;
            match done.resume {
                Some(next) => from = Some(next),
                None => return (removed, passes),
            }
        }
    }

    #[tokio::test]
    async fn successes_are_kept_in_the_chunk_or_a_marker_and_leave_with_their_events() {
        let (_dir, store) = open();
        three_in_a_chunk(&store).await;
        let mut due = due_now(&store);
        let retried_one = due.remove(0);
        for first_time in &due {
            deliver(&store, first_time).await;
        }
        assert_eq!(
            count(&store, 'o'),
            0,
            "a first-time success writes no marker"
        );
        assert_eq!(
            count(&store, 'g'),
            1,
            "the chunk's state says who it delivered"
        );
        let retry = retried_and_due(&store, &retried_one).await;
        let second_attempt = Attempt {
            number: 2,
            ..testing::delivered_attempt()
        };
        let outcome = Outcome {
            key: retry.key.clone(),
            entry: retry.entry.clone(),
            attempt: second_attempt,
            next: Next::Delivered,
            park: None,
        };
        store.record(outcome).await.expect("recorded");
        assert_eq!(count(&store, 's'), 0, "nothing pending, no entry left");
        assert_eq!(count(&store, 'o'), 1, "a retried success has its marker");
        let (removed, _) = collect_all(&store, u64::MAX, 100).await;
        assert_eq!(removed, 3);
        for kind in ['e', 'g', 'o', 'a'] {
            assert_eq!(
                count(&store, kind),
                0,
                "{kind} records leave with their events"
            );
        }
    }

    #[tokio::test]
    async fn events_stored_alone_are_read_rewritten_in_place_and_collected() {
        let (dir, store) = open();
        // Made first, so ingest's id for it sorts below the older record's.
        let new = event(1);
        let old = event(2);
        assert!(new.id < old.id);
        let d = &old.deliveries[0];
        let key = ScheduleKey {
            partner: "acme".into(),
            priority: Priority::Normal,
            due_ms: 1_000,
            delivery: d.id,
        };
        let entry = ScheduledDelivery {
            delivery: d.id,
            event: old.id,
            attempts: 0,
            created_ms: 1_000,
            order: None,
            chunk: None,
        };
        store
            .db()
            .expect("open")
            .insert(keys::event(old.id), event_format::encode(&old))
            .expect("write");
        store
            .db()
            .expect("open")
            .insert(key.encode(), encode(&entry))
            .expect("write");
        store.shutdown().await.expect("shutdown");
        drop(store);
        let store = testing::reopen(&dir);

        let accepted = store.enqueue(vec![new.clone()]).await.expect("enqueue");
        assert!(
            accepted[0].id > old.id,
            "new events sort after every stored one"
        );
        let read = store.event(accepted[0].id).expect("read").expect("event");
        assert_eq!(read.device_id, new.device_id);

        let dues = due_now(&store);
        assert_eq!(dues.len(), 2);
        let old_due = dues
            .iter()
            .find(|d| d.entry.event == old.id)
            .expect("the old event's delivery is due");
        assert_eq!(
            old_due.event(&store).expect("read").map(|e| e.id),
            Some(old.id)
        );
        store.record(retried(old_due)).await.expect("recorded");
        assert!(
            store
                .db()
                .expect("open")
                .get(keys::rewritten(old.id))
                .expect("read")
                .is_none(),
            "a record stored alone is rewritten where it is"
        );
        let read = store.event(old.id).expect("read").expect("event");
        assert_eq!(read.deliveries[0].attempts, 1);
        for due in dues.iter().filter(|d| d.entry.event != old.id) {
            deliver(&store, due).await;
        }
        let retry = store
            .due("acme", &Priority::ALL, 6_000, 100, &|_| false)
            .expect("scan")
            .found;
        assert_eq!(retry.len(), 1);
        deliver(&store, &retry[0]).await;

        assert_eq!(count(&store, 'e'), 2);
        let (removed, passes) = collect_all(&store, 2_000, 1).await;
        assert_eq!(removed, 2, "both finished events are collected");
        assert!(passes >= 2, "a budget of one goes on where it stopped");
        assert_eq!(count(&store, 'e'), 0);
        assert_eq!(count(&store, 'b'), 0);
        assert_eq!(count(&store, 'o'), 0, "with the retried one's marker");
    }

    #[tokio::test]
    async fn a_page_keeps_its_pending_events_and_goes_with_the_last() {
        let (_dir, store) = open();
        let (events, _) = three_in_a_chunk(&store).await;
        assert_eq!(count(&store, 'b'), 1, "one group, one page");
        let dues = due_now(&store);
        deliver(&store, &dues[0]).await;
        deliver(&store, &dues[1]).await;
        let waiting = dues[2].entry.event;
        store.record(retried(&dues[2])).await.expect("recorded");
        assert_eq!(
            count(&store, 'r'),
            1,
            "the retried event's record is rewritten"
        );

        let (removed, _) = collect_all(&store, 2_000, 100).await;
        assert_eq!(removed, 2);
        assert_eq!(count(&store, 'e'), 1);
        assert_eq!(
            count(&store, 'b'),
            1,
            "the page stays for its pending event"
        );
        for id in &events {
            let read = store.event(*id).expect("read");
            match *id == waiting {
                true => assert_eq!(read.expect("kept").deliveries[0].attempts, 1),
                false => assert!(read.is_none(), "collected"),
            }
        }
        let again = store.enqueue(vec![event(9)]).await.expect("enqueue");
        assert!(again[0].id > waiting);

        let retry = store
            .due("acme", &Priority::ALL, 6_000, 100, &|_| false)
            .expect("scan")
            .found;
        let retry = retry
            .iter()
            .find(|d| d.entry.event == waiting)
            .expect("the retry");
        deliver(&store, retry).await;
        let (removed, _) = collect_all(&store, 1_001, 100).await;
        assert_eq!(
            removed, 1,
            "the page's last event goes; the new one is pending"
        );
        assert_eq!(count(&store, 'r'), 0);
        assert_eq!(count(&store, 'e'), 1);
        assert!(store.event(waiting).expect("read").is_none());
        assert!(store.event(again[0].id).expect("read").is_some());
    }

    /// The queue depth of `acme` as its record on disk says.
    fn depth_on_disk(store: &Store) -> Option<u64> {
        let on_disk = store
            .db()
            .expect("open")
            .get(keys::depth("acme"))
            .expect("read")?;
        Some(u64::from_be_bytes(
            on_disk.as_ref().try_into().expect("8 bytes"),
        ))
    }

    #[tokio::test]
    async fn queue_depth_commits_with_the_schedule_and_is_read_back_at_open() {
        let (dir, store) = open();
        store
            .enqueue((0..3).map(event).collect())
            .await
            .expect("enqueue");
        let due = due_now(&store);
        deliver(&store, &due[0]).await;
        assert_eq!(store.queued("acme"), 2);
        assert_eq!(depth_on_disk(&store), Some(2));
        store.shutdown().await.expect("shutdown");
        drop(store);

        // Read back, not counted: a depth record that disagrees with the
        // schedule is what the next open reports.
        let store = testing::reopen(&dir);
        assert_eq!(store.queued("acme"), 2);
        store
            .db()
            .expect("open")
            .insert(keys::depth("acme"), &7u64.to_be_bytes()[..])
            .expect("write");
        store.shutdown().await.expect("shutdown");
        drop(store);
        let store = testing::reopen(&dir);
        assert_eq!(store.queued("acme"), 7, "the record is what is read");

        // A store from before the depth was kept is counted once.
        store
            .db()
            .expect("open")
            .remove(keys::DEPTH_KEPT)
            .expect("remove");
        store.shutdown().await.expect("shutdown");
        drop(store);
        let store = testing::reopen(&dir);
        assert_eq!(store.queued("acme"), 2, "counted from the schedule");
        assert!(store
            .db()
            .expect("open")
            .get(keys::DEPTH_KEPT)
            .expect("read")
            .is_some());
        assert_eq!(depth_on_disk(&store), Some(2));

        // An unreadable depth of a partner with nothing queued is counted
        // over once and gone, not read (and counted again) at every open.
        store
            .db()
            .expect("open")
            .insert(keys::depth("gone"), &b"bad"[..])
            .expect("write");
        store.shutdown().await.expect("shutdown");
        drop(store);
        let store = testing::reopen(&dir);
        assert_eq!(store.queued("acme"), 2, "counted from the schedule");
        let db = store.db().expect("open");
        assert_eq!(db.get(keys::depth("gone")).expect("read"), None);
        assert!(depth::read(&db).expect("readable now").is_some());
    }

    #[tokio::test]
    async fn after_a_restart_new_events_still_sort_after_every_stored_page() {
        let (dir, store) = open();
        // As if the wall clock stepped back across the restart: the later
        // event was received at an earlier time than the stored one.
        let ahead = EventRecord {
            received_ms: 2_000_000,
            ..event(2)
        };
        let behind = EventRecord {
            received_ms: 1_000_000,
            ..event(1)
        };
        let stored = store.enqueue(vec![ahead]).await.expect("enqueue");
        store.shutdown().await.expect("shutdown");
        drop(store);
        let store = testing::reopen(&dir);
        let later = store.enqueue(vec![behind]).await.expect("enqueue");
        assert!(later[0].id > stored[0].id);
        for id in [stored[0].id, later[0].id] {
            let read = store.event(id).expect("read").expect("found");
            assert_eq!(read.id, id);
        }
        assert_eq!(count(&store, 'b'), 2);
    }

    #[tokio::test]
    async fn a_damaged_newest_page_does_not_keep_the_store_from_opening() {
        let (dir, store) = open();
        let stored = store.enqueue(vec![event(1)]).await.expect("enqueue");
        store
            .db()
            .expect("open")
            .insert(keys::event_page(stored[0].id), &b"\x07garbage"[..])
            .expect("write");
        store.shutdown().await.expect("shutdown");
        drop(store);
        let store = testing::reopen(&dir);
        let read = store.event(stored[0].id);
        let Err(StoreError::Corrupt { key, reason }) = read else {
            panic!("{read:?}");
        };
        assert_eq!(key, format!("b/{}", stored[0].id));
        assert!(reason.contains("unknown format byte 0x07"), "{reason}");
        let later = store.enqueue(vec![event(2)]).await.expect("enqueue");
        assert!(later[0].id > stored[0].id);
        assert!(store.event(later[0].id).expect("read").is_some());
    }

    #[tokio::test]
    async fn retention_passes_over_unreadable_records_and_collects_the_rest() {
        let (_dir, store) = open();
        let (events, _) = three_in_a_chunk(&store).await;
        for due in due_now(&store) {
            deliver(&store, &due).await;
        }
        damage_in_its_page(&store, events[1]);
        let stray = keys::event(Uuid::now_v7());
        store
            .db()
            .expect("open")
            .insert(stray, &b"\x09garbage"[..])
            .expect("write");

        let (removed, _) = collect_all(&store, 2_000, 100).await;
        assert_eq!(removed, 2, "the readable finished events go");
        assert_eq!(
            count(&store, 'b'),
            1,
            "the page stays for its unreadable event"
        );
        assert!(
            store
                .db()
                .expect("open")
                .get(stray)
                .expect("read")
                .is_some(),
            "an unreadable record is left for on-call"
        );
        let read = store.event(events[1]);
        assert!(matches!(read, Err(StoreError::Corrupt { .. })), "{read:?}");
        for id in [events[0], events[2]] {
            assert!(store.event(id).expect("read").is_none(), "collected");
        }
    }
}
