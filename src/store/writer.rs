//! The writer: one thread that owns every change to the store.
//!
//! It takes whatever requests are waiting (see [`super::gather`]), applies them
//! to one `sled::Batch` (atomic) and flushes once. Upstream sled's flush
//! ends in `sync_file_range`, which is not an fsync (sled issue #1452);
//! herald's copy counts a log write stable only once an `fdatasync`
//! covers it, one per group (vendor/sled/HERALD.md), so the flush
//! returning means durable. Only then
//! does it answer, so a 202 always means "on disk". Being the only writer, it can read-modify-write records
//! without locks; an overlay makes writes earlier in the same group visible
//! to later ones.
//!
//! A group commit that fails (a full disk, a failing device) is answered
//! with errors, never 202, and leaves nothing behind: sled applies a batch
//! whole or not at all. sled then refuses every later write until the
//! database is opened again, so the writer does that itself
//! ([`recover`]) and goes on: no restart needed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::chunk;
use super::depth::{self, Depth, Moves};
use super::event_format;
use super::event_page::{self, Page};
use super::gather::{Gatherer, OUTCOME_LINGER};
use super::handle::{self, Handle};
use super::keys::{self, ScheduleKey};
use super::watermark::{self, Watermark};
use super::{
    current_event, decode, encode, settle_delivered, Accepted, CollectFrom, Collected, Due, Home,
    Next, Outcome, StoreError,
};
use crate::model::{
    AttemptLog, DeadLetter, DeliveryState, DeviceOrder, EventRecord, ScheduledDelivery,
};

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub(super) enum Command {
    Enqueue {
        events: Vec<EventRecord>,
        reply: Reply<Vec<Accepted>>,
    },
    /// Each outcome is recorded (or fails) on its own; one reply for all.
    Record {
        outcomes: Vec<Outcome>,
        reply: Reply<Vec<Result<(), StoreError>>>,
    },
    Collect {
        cutoff_ms: u64,
        budget: usize,
        from: Option<CollectFrom>,
        reply: Reply<Collected>,
    },
    Unpark {
        key: Vec<u8>,
        reply: Reply<bool>,
    },
    Link {
        change: Box<super::links::LinkChange>,
        reply: Reply<super::links::LinkOutcome>,
    },
    Replay {
        ids: Vec<(Uuid, Uuid)>,
        now_ms: u64,
        reply: Reply<(Vec<super::replay::Replayed>, u64)>,
    },
    Purge {
        id: Uuid,
        reply: Reply<bool>,
    },
    Shutdown {
        reply: Reply<()>,
    },
}

/// What the writer publishes for readers on other threads.
pub(super) struct Shared {
    /// See [`super::Store::visible_commit`].
    pub visible: Arc<AtomicU64>,
    pub depth: Arc<Depth>,
}

/// What the writer needs to open the store again after a failed commit.
pub(super) struct Reopen {
    pub dir: PathBuf,
    pub config: sled::Config,
    /// Where readers find the database.
    pub handle: Handle,
}

impl Reopen {
    fn open(&self) -> Result<(sled::Db, Watermark), StoreError> {
        let db = super::open_sled(&self.config, &self.dir)?;
        let watermark = Watermark::open(&self.dir, &db).map_err(|reason| StoreError::Open {
            path: self.dir.clone(),
            reason,
        })?;
        Ok((db, watermark))
    }
}

pub(super) fn spawn(
    db: sled::Db,
    reopen: Reopen,
    watermark: Watermark,
    last_event: Uuid,
    shared: Shared,
    rx: mpsc::Receiver<Command>,
) -> std::io::Result<()> {
    // The gatherer's timer is built on the writer's own thread: a runtime
    // must not be dropped on an async one, as it would be if spawning failed.
    let (started, ready) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("herald-store-writer".into())
        .spawn(move || match Gatherer::new(OUTCOME_LINGER) {
            Ok(gatherer) => {
                let _ = started.send(Ok(()));
                let writing = || {
                    let opened = Opened { db, watermark };
                    run(opened, reopen, last_event, shared, gatherer, rx)
                };
                crate::supervise::run_or(writing, || crate::supervise::exit("the store writer"));
            }
            Err(e) => drop(started.send(Err(e))),
        })?;
    ready
        .recv()
        .map_err(|_| std::io::Error::other("the writer thread ended before it started"))?
}

/// The open database and its commit watermark.
struct Opened {
    db: sled::Db,
    watermark: Watermark,
}

/// A reply to send once the group is durable (or failed).
enum Answer {
    Enqueue(Reply<Vec<Accepted>>, Result<Vec<Accepted>, StoreError>),
    Record(
        Reply<Vec<Result<(), StoreError>>>,
        Result<Vec<Result<(), StoreError>>, StoreError>,
    ),
    Collect(Reply<Collected>, Result<Collected, StoreError>),
    Unpark(Reply<bool>, Result<bool, StoreError>),
    Link(
        Reply<super::links::LinkOutcome>,
        Result<super::links::LinkOutcome, StoreError>,
    ),
    Replay(
        Reply<(Vec<super::replay::Replayed>, u64)>,
        Result<(Vec<super::replay::Replayed>, u64), StoreError>,
    ),
    Purge(Reply<bool>, Result<bool, StoreError>),
    Shutdown(Reply<()>),
}

fn run(
    opened: Opened,
    reopen: Reopen,
    mut last_event: Uuid,
    shared: Shared,
    gatherer: Gatherer,
    mut rx: mpsc::Receiver<Command>,
) {
    let Opened {
        mut db,
        mut watermark,
    } = opened;
    while let Some(group) = gatherer.next(&mut rx) {
        let started = Instant::now();
        let mut pending = Pending::new(&db, watermark.next(), last_event);
        let mut answers = Vec::with_capacity(group.len());
        let mut stop = false;
        let size = group.len();
        for command in group {
            match command {
                Command::Enqueue { events, reply } => {
                    let result = enqueue(&mut pending, events);
                    answers.push(Answer::Enqueue(reply, result));
                }
                Command::Record { outcomes, reply } => {
                    let results = outcomes
                        .into_iter()
                        .map(|o| pending.atomically(|p| record(p, o)));
                    answers.push(Answer::Record(reply, Ok(results.collect())));
                }
                Command::Collect {
                    cutoff_ms,
                    budget,
                    from,
                    reply,
                } => {
                    let result = pending.atomically(|p| collect(p, cutoff_ms, budget, from));
                    answers.push(Answer::Collect(reply, result));
                }
                Command::Unpark { key, reply } => {
                    let result = pending.get(&key).map(|found| {
                        pending.remove(key);
                        found.is_some()
                    });
                    answers.push(Answer::Unpark(reply, result));
                }
                Command::Link { change, reply } => {
                    // All of a link change or none: a link without the
                    // grant index entry it needs would strand its grant.
                    let result = pending.atomically(|p| super::links::apply(p, *change));
                    answers.push(Answer::Link(reply, result));
                }
                Command::Replay { ids, now_ms, reply } => {
                    let commit = pending.commit_number();
                    let done = super::replay::replay_all(&mut pending, ids, now_ms);
                    answers.push(Answer::Replay(reply, Ok((done, commit))));
                }
                Command::Purge { id, reply } => {
                    let result = super::replay::purge(&mut pending, id);
                    answers.push(Answer::Purge(reply, result));
                }
                Command::Shutdown { reply } => {
                    stop = true;
                    answers.push(Answer::Shutdown(reply));
                }
            }
        }
        // The new depths commit with the changes they count.
        let depths = shared.depth.after(std::mem::take(&mut pending.moves));
        for (partner, depth) in &depths {
            pending.put(keys::depth(partner), depth::encode(*depth).to_vec());
        }
        // Ids given to a group that then failed stay given: still rising.
        last_event = pending.pages.last();
        let number = pending.commit_number();
        let durable = pending.commit(&db, &mut watermark, &shared.visible);
        let mut unsure = None;
        match durable {
            Ok(()) => shared.depth.set(depths),
            Err(_) => unsure = Some(depths),
        }
        metrics::histogram!("herald_store_group_size").record(size as f64);
        metrics::histogram!("herald_store_group_seconds").record(started.elapsed().as_secs_f64());
        for answer in answers {
            let failed =
                |e: &StoreError| StoreError::Io(format!("the write was not made durable: {e}"));
            match (answer, &durable) {
                (Answer::Enqueue(r, result), Ok(())) => drop(r.send(result)),
                (Answer::Enqueue(r, _), Err(e)) => drop(r.send(Err(failed(e)))),
                (Answer::Record(r, result), Ok(())) => drop(r.send(result)),
                (Answer::Record(r, _), Err(e)) => drop(r.send(Err(failed(e)))),
                (Answer::Collect(r, result), Ok(())) => drop(r.send(result)),
                (Answer::Collect(r, _), Err(e)) => drop(r.send(Err(failed(e)))),
                (Answer::Unpark(r, result), Ok(())) => drop(r.send(result)),
                (Answer::Unpark(r, _), Err(e)) => drop(r.send(Err(failed(e)))),
                (Answer::Link(r, result), Ok(())) => drop(r.send(result)),
                (Answer::Link(r, _), Err(e)) => drop(r.send(Err(failed(e)))),
                (Answer::Replay(r, result), Ok(())) => drop(r.send(result)),
                (Answer::Replay(r, _), Err(e)) => drop(r.send(Err(failed(e)))),
                (Answer::Purge(r, result), Ok(())) => drop(r.send(result)),
                (Answer::Purge(r, _), Err(e)) => drop(r.send(Err(failed(e)))),
                (Answer::Shutdown(r), Ok(())) => drop(r.send(Ok(()))),
                (Answer::Shutdown(r), Err(e)) => drop(r.send(Err(failed(e)))),
            }
        }
        if let Err(e) = &durable {
            tracing::error!(error = %e, "store group commit failed; its requests were answered with errors");
            reopen.handle.failed.notify_one();
        }
        if let (Err(e), false) = (&durable, stop) {
            let Some(again) = recover(&reopen, db, e, &gatherer, &mut rx) else {
                tracing::info!("store writer stopped while the store was out");
                return;
            };
            // sled applies a batch whole or not at all: if the failed one
            // is on disk after all, so are its changes to the queue depth.
            let landed = again.watermark.next() > number;
            if let (true, Some(depths)) = (landed, unsure) {
                shared.depth.set(depths);
            }
            Opened { db, watermark } = again;
            continue;
        }
        if stop {
            rx.close();
            // Whatever slipped in after the shutdown request is refused, not lost silently.
            while let Ok(late) = rx.try_recv() {
                refuse(late);
            }
            tracing::info!("store writer stopped");
            return;
        }
    }
}

/// Until the store opens again, requests wait this long before they are
/// answered with an error: opening usually takes a moment, and an outcome
/// refused is a delivery sent again.
const RECOVERY_GRACE: Duration = Duration::from_secs(1);

/// The longest wait between two attempts at opening the store again.
const MAX_REOPEN_DELAY: Duration = Duration::from_secs(1);

/// The free space an attempt at opening the store again waits for: sled
/// writes out the rest of its last log segment (512 KiB) as it recovers,
/// and a snapshot. Reading a large store back is not tried again and
/// again on a disk that certainly cannot take that.
const REOPEN_ROOM: u64 = 2 * 512 * 1024;

/// How often the free space is looked at while there is too little of it.
const ROOM_POLL: Duration = Duration::from_millis(100);

/// Opens the store again after a group commit failed with `cause`: takes
/// the database away from readers, waits for the last of them to let go of
/// it, and opens the directory anew, as often as it takes (a disk that is
/// still full fails the opening too: sled writes as it recovers).
/// Requests that arrive meanwhile wait [`RECOVERY_GRACE`], then are
/// answered with the error; `None` if shutdown was asked for first.
fn recover(
    reopen: &Reopen,
    db: sled::Db,
    cause: &StoreError,
    gatherer: &Gatherer,
    rx: &mut mpsc::Receiver<Command>,
) -> Option<Opened> {
    let mut reason = cause.to_string();
    drop(reopen.handle.take(reason.clone()));
    drop(db);
    let started = Instant::now();
    let mut delay = Duration::from_millis(10);
    let mut reported: Option<Instant> = None;
    loop {
        let room = crate::disk::measure(&reopen.dir).map_or(u64::MAX, |space| space.free);
        let no_room = room < REOPEN_ROOM;
        let opened = match no_room {
            true => Err(StoreError::Io(format!(
                "waiting for {} KiB free on its disk ({} KiB now)",
                REOPEN_ROOM / 1024,
                room / 1024
            ))),
            false => reopen.open(),
        };
        match opened {
            Ok((db, watermark)) => {
                reopen.handle.put(db.clone());
                metrics::counter!("herald_store_reopens_total").increment(1);
                tracing::warn!(after = ?started.elapsed(), cause = %cause,
                    "the store was opened again after a failed write; writes go on");
                return Some(Opened { db, watermark });
            }
            Err(e) => {
                reason = format!("{cause}; opening it again: {e}");
                reopen.handle.explain(reason.clone());
                if reported.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                    tracing::error!(error = %e, "cannot open the store again yet; retrying");
                    reported = Some(Instant::now());
                }
            }
        }
        // Free space is cheap to look at again; a failed opening is not.
        let wait = if no_room { ROOM_POLL } else { delay };
        let until = Instant::now() + wait;
        if started.elapsed() < RECOVERY_GRACE {
            std::thread::sleep(wait);
        } else {
            // Answer what arrives until the next attempt.
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                match gatherer.next_within(rx, left) {
                    Ok(Some(Command::Shutdown { reply })) => {
                        drop(reply.send(Err(handle::out(&reason))));
                        return None;
                    }
                    Ok(Some(command)) => refuse_with(command, handle::out(&reason)),
                    Ok(None) => break,
                    Err(()) => return None,
                }
            }
        }
        if !no_room {
            delay = (delay * 2).min(MAX_REOPEN_DELAY);
        }
    }
}

fn refuse_with(command: Command, error: StoreError) {
    match command {
        Command::Enqueue { reply, .. } => drop(reply.send(Err(error))),
        Command::Record { reply, .. } => drop(reply.send(Err(error))),
        Command::Collect { reply, .. } => drop(reply.send(Err(error))),
        Command::Unpark { reply, .. } => drop(reply.send(Err(error))),
        Command::Link { reply, .. } => drop(reply.send(Err(error))),
        Command::Replay { reply, .. } => drop(reply.send(Err(error))),
        Command::Purge { reply, .. } => drop(reply.send(Err(error))),
        Command::Shutdown { reply } => drop(reply.send(Err(error))),
    }
}

fn refuse(command: Command) {
    match command {
        Command::Enqueue { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
        Command::Record { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
        Command::Collect { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
        Command::Unpark { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
        Command::Link { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
        Command::Replay { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
        Command::Purge { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
        Command::Shutdown { reply } => drop(reply.send(Ok(()))),
    }
}

/// One step [`Pending::atomically`] can take back.
enum Undo {
    /// A key was written; what the overlay held for it before (`None`: nothing).
    Write(Vec<u8>, Option<Option<Vec<u8>>>),
    Moved(String, i64),
}

/// One group's writes: an overlay that later requests of the group read
/// through, turned into one sled batch at commit.
pub(super) struct Pending<'a> {
    db: &'a sled::Db,
    overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// The schedule chunks this group's first attempts go in.
    chunks: chunk::Filling,
    /// The event pages this group's accepted events go in.
    pages: event_page::Filling,
    /// How this group changes each partner's queue depth.
    moves: Moves,
    /// While a request runs [`Pending::atomically`]: how to undo what it
    /// changed so far, newest last.
    undo: Option<Vec<Undo>>,
    /// The number this group will commit as.
    commit: u64,
    /// The next device-queue sequence number: the commit number in the
    /// high bits, so it keeps rising across groups and restarts.
    next_seq: u64,
}

impl<'a> Pending<'a> {
    fn new(db: &'a sled::Db, commit: u64, last_event: Uuid) -> Self {
        Pending {
            db,
            overlay: HashMap::new(),
            chunks: chunk::Filling::default(),
            pages: event_page::Filling::new(last_event),
            moves: Moves::default(),
            undo: None,
            commit,
            next_seq: commit << 24,
        }
    }

    /// The number this group commits as.
    pub(super) fn commit_number(&self) -> u64 {
        self.commit
    }

    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    pub(super) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        Ok(self.db.get(key)?.map(|v| v.to_vec()))
    }

    pub(super) fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match self.get(key)? {
            None => Ok(None),
            Some(v) => decode(key, &v).map(Some),
        }
    }

    /// The keys under `prefix` as they stand, this group's writes
    /// included, in key order.
    pub(super) fn keys_with_prefix(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut found = std::collections::BTreeSet::new();
        for item in self.db.scan_prefix(prefix) {
            let (key, _) = item?;
            if !matches!(self.overlay.get(key.as_ref()), Some(None)) {
                found.insert(key.to_vec());
            }
        }
        for (key, value) in &self.overlay {
            if value.is_some() && key.starts_with(prefix) {
                found.insert(key.clone());
            }
        }
        Ok(found.into_iter().collect())
    }

    /// Event `id` as it stands, this group's writes included (see
    /// [`current_event`]), and where a rewrite of it goes.
    pub(super) fn event(&self, id: Uuid) -> Result<Option<(EventRecord, Home)>, StoreError> {
        // Accepted in this group: nothing can have rewritten it yet.
        if let Some(event) = self.pages.get(id)? {
            return Ok(Some((event, Home::Paged)));
        }
        current_event(self.db, id, |key| self.get(key))
    }

    /// Writes `event`'s record where [`Pending::event`] said it lives.
    pub(super) fn put_event(&mut self, home: Home, event: &EventRecord) {
        let key = match home {
            Home::Alone => keys::event(event.id),
            Home::Paged => keys::rewritten(event.id),
        };
        self.put(key.to_vec(), event_format::encode(event));
    }

    pub(super) fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.write(key, Some(value));
    }

    pub(super) fn remove(&mut self, key: Vec<u8>) {
        self.write(key, None);
    }

    fn write(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        match &mut self.undo {
            Some(undo) => {
                let before = self.overlay.insert(key.clone(), value);
                undo.push(Undo::Write(key, before));
            }
            None => {
                self.overlay.insert(key, value);
            }
        }
    }

    /// `partner`'s queue depth changes by `by` if this group commits.
    pub(super) fn moved(&mut self, partner: &str, by: i64) {
        self.moves.add(partner, by);
        if let Some(undo) = &mut self.undo {
            undo.push(Undo::Moved(partner.to_string(), by));
        }
    }

    /// Runs one request's changes as a unit: if it fails part way, what it
    /// wrote is taken back, so the group commits none of it rather than,
    /// say, a removed schedule entry without the retry that replaces it.
    fn atomically<T>(
        &mut self,
        change: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.undo = Some(Vec::new());
        let result = change(self);
        let undo = self.undo.take().unwrap_or_default();
        if result.is_err() {
            for step in undo.into_iter().rev() {
                match step {
                    Undo::Write(key, Some(before)) => {
                        self.overlay.insert(key, before);
                    }
                    Undo::Write(key, None) => {
                        self.overlay.remove(&key);
                    }
                    Undo::Moved(partner, by) => self.moves.add(&partner, -by),
                }
            }
        }
        result
    }

    /// The state of chunk `id`, for a change that [`Pending::put`] or
    /// [`Pending::remove`] then writes. Rebuilt from the chunk's entry (all
    /// pending) if its state record is missing or unreadable, so no member
    /// is stranded; `None` when neither is there (settled long ago).
    fn chunk_state(
        &self,
        member: &ScheduleKey,
        id: Uuid,
    ) -> Result<Option<chunk::State>, StoreError> {
        let key = keys::chunk_state(id);
        let found = self
            .get(&key)?
            .map(|bytes| chunk::State::from_bytes(&key, bytes));
        let unreadable = match found {
            Some(Ok(state)) => return Ok(Some(state)),
            Some(Err(e)) => Some(e),
            None => None,
        };
        let entry_key = chunk::entry_key(member, id);
        match (unreadable, self.get(&entry_key)?) {
            (None, None) => Ok(None),
            (Some(e), None) => Err(e),
            (_, Some(entry)) => {
                let members = chunk::Members::decode(&entry_key, &entry)?;
                tracing::error!(chunk = %id, "schedule chunk without a readable state record; rebuilt with every member pending");
                Ok(Some(chunk::State::new(members.list.len())))
            }
        }
    }

    fn commit(
        self,
        db: &sled::Db,
        watermark: &mut Watermark,
        visible: &AtomicU64,
    ) -> Result<(), StoreError> {
        let Pending {
            mut overlay,
            chunks,
            pages,
            commit,
            ..
        } = self;
        for (key, value) in chunks.finish().into_iter().chain(pages.finish()) {
            overlay.insert(key, Some(value));
        }
        if overlay.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (key, value) in overlay {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        batch.insert(keys::COMMITS, &watermark::encode(commit));
        // Published before the writes can be seen, never after.
        visible.fetch_max(commit, Ordering::SeqCst);
        db.apply_batch(batch)?;
        // Durable on return: herald's sled counts a log buffer stable only
        // once an fdatasync covers it (vendor/sled/HERALD.md).
        db.flush()?;
        metrics::counter!("herald_store_fsyncs_total").increment(1);
        // The commit stands either way; a stale watermark only weakens the check.
        if let Err(e) = watermark.advance() {
            tracing::warn!(error = %e, "cannot record the commit watermark");
        }
        Ok(())
    }
}

fn accepted(record: &EventRecord, duplicate: bool) -> Accepted {
    Accepted {
        id: record.id,
        deliveries: record
            .deliveries
            .iter()
            .map(|d| (d.partner.clone(), d.id))
            .collect(),
        duplicate,
        scheduled: Vec::new(),
        commit: 0,
    }
}

fn enqueue(p: &mut Pending<'_>, events: Vec<EventRecord>) -> Result<Vec<Accepted>, StoreError> {
    // Look everything up first, so a failed read leaves nothing half-staged.
    let mut staged = Vec::with_capacity(events.len());
    let mut seen_in_request: HashMap<String, Accepted> = HashMap::new();
    for mut event in events {
        if let Some(key) = &event.idempotency_key {
            if let Some(first) = seen_in_request.get(key) {
                staged.push(Err(Accepted {
                    duplicate: true,
                    ..first.clone()
                }));
                continue;
            }
            if let Some(id) = p.get(&keys::idempotency(key))? {
                let id = Uuid::from_slice(&id).map_err(|e| StoreError::Corrupt {
                    key: format!("idempotency key {key:?}"),
                    reason: e.to_string(),
                })?;
                if let Some((first, _)) = p.event(id)? {
                    staged.push(Err(accepted(&first, true)));
                    continue;
                }
            }
        }
        event.id = p.pages.assign(event.id);
        if let Some(key) = &event.idempotency_key {
            seen_in_request.insert(key.clone(), accepted(&event, true));
        }
        staged.push(Ok(event));
    }
    let mut out = Vec::with_capacity(staged.len());
    for item in staged {
        let mut event = match item {
            Err(duplicate) => {
                out.push(duplicate);
                continue;
            }
            Ok(event) => event,
        };
        let mut answer = accepted(&event, false);
        answer.commit = p.commit;
        for d in &mut event.deliveries {
            p.moved(&d.partner, 1);
            let due_ms = d.next_due_ms.unwrap_or(event.received_ms);
            if !d.ordered && d.coalesce.is_none() {
                // A plain first attempt: one member of this group's chunk.
                let (key, chunk) = p
                    .chunks
                    .add(&d.partner, event.priority, due_ms, d.id, event.id);
                d.chunk = Some(chunk);
                let entry = chunk::entry(d.id, event.id, key.due_ms, chunk);
                answer.scheduled.push(Due {
                    key,
                    entry,
                    event: None,
                });
                continue;
            }
            let key = ScheduleKey {
                partner: d.partner.clone(),
                priority: event.priority,
                due_ms,
                delivery: d.id,
            };
            let order = d.ordered.then(|| DeviceOrder {
                device: event.device_id.clone(),
                seq: p.seq(),
            });
            if let Some(o) = &order {
                p.put(
                    keys::device_queue(&d.partner, &o.device, o.seq, d.id),
                    Vec::new(),
                );
            }
            if let Some(state) = &d.coalesce {
                // Names the newest: an older one still waiting is superseded.
                let latest = keys::latest_state(&d.partner, &event.device_id, state);
                p.put(latest, d.id.as_bytes().to_vec());
            }
            let entry = ScheduledDelivery {
                delivery: d.id,
                event: event.id,
                attempts: 0,
                created_ms: event.received_ms,
                order,
                chunk: None,
            };
            p.put(key.encode(), encode(&entry));
            answer.scheduled.push(Due {
                key,
                entry,
                event: None,
            });
        }
        if let Some(key) = &event.idempotency_key {
            p.put(keys::idempotency(key), event.id.as_bytes().to_vec());
        }
        p.pages.add(&event);
        let event = Arc::new(event);
        for due in &mut answer.scheduled {
            due.event = Some(Arc::clone(&event));
        }
        out.push(answer);
    }
    Ok(out)
}

fn record(p: &mut Pending<'_>, outcome: Outcome) -> Result<(), StoreError> {
    let Outcome {
        key,
        entry,
        attempt,
        next,
        park,
    } = outcome;
    if let Some(chunk) = entry.chunk {
        // A chunk member: its slot says whether it was settled already.
        let state_key = keys::chunk_state(chunk.id);
        let Some(mut state) = p.chunk_state(&key, chunk.id)? else {
            return Ok(());
        };
        let delivered = (next == Next::Delivered).then_some(&attempt);
        if !state.settle(chunk.slot as usize, delivered) {
            // Already settled (a duplicate report): nothing to move.
            return Ok(());
        }
        p.moved(&key.partner, -1);
        if !state.any_pending() {
            p.remove(chunk::entry_key(&key, chunk.id));
        }
        if state.live() == 0 {
            p.remove(state_key.to_vec());
        } else {
            p.put(state_key.to_vec(), state.into_bytes());
        }
        if next == Next::Delivered {
            // The slot is the whole record of a first-time success.
            return Ok(());
        }
    } else {
        let schedule_key = key.encode();
        if p.get(&schedule_key)?.is_none() {
            // Already settled (a duplicate report): nothing to move, and a
            // second success must not log its attempt twice or leave a
            // marker behind an event retention already collected.
            return Ok(());
        }
        p.moved(&key.partner, -1);
        p.remove(schedule_key);
    }
    if let (Some(o), Next::Delivered | Next::Dead(_) | Next::Superseded(_)) = (&entry.order, &next)
    {
        // Settled: the device's next delivery may go.
        p.remove(keys::device_queue(
            &key.partner,
            &o.device,
            o.seq,
            entry.delivery,
        ));
    }
    if let Some(route) = park {
        p.put(
            keys::parked(&route.partner, &route.device_id),
            encode(&route),
        );
    }
    let log_key = keys::attempts(entry.delivery);
    let has_log = entry.attempts > 0;
    if next == Next::Delivered {
        // The event record stays as accepted: a small marker says delivered.
        if has_log {
            let mut log: AttemptLog = p.get_json(&log_key)?.unwrap_or_default();
            log.push(attempt.clone());
            p.put(log_key.to_vec(), encode(&log));
        }
        p.put(keys::delivered(entry.delivery).to_vec(), encode(&attempt));
        return Ok(());
    }
    let Some((mut event, home)) = p.event(entry.event)? else {
        tracing::error!(delivery = %entry.delivery, event = %entry.event, "delivery without its event record; dropped from the schedule");
        return Ok(());
    };
    // The record is rewritten below: let it carry its siblings' successes.
    settle_delivered(&mut event, |key| p.get(key))?;
    let mut log: AttemptLog = if has_log {
        p.get_json(&log_key)?.unwrap_or_default()
    } else {
        AttemptLog::default()
    };
    log.push(attempt.clone());
    let Some(delivery) = event.delivery_mut(entry.delivery) else {
        tracing::error!(delivery = %entry.delivery, "event record lacks this delivery; dropped from the schedule");
        return Ok(());
    };
    // Out of its chunk (if it was in one): the record speaks for it now.
    delivery.chunk = None;
    if let Next::Superseded(by) = next {
        delivery.state = DeliveryState::Superseded;
        delivery.superseded_by = Some(by);
        delivery.next_due_ms = None;
        if has_log {
            p.remove(log_key.to_vec());
        }
        p.put_event(home, &event);
        return Ok(());
    }
    delivery.attempts = attempt.number;
    delivery.last_attempt = Some(attempt);
    match next {
        // Handled above, without touching the event record.
        Next::Delivered => {}
        // Handled above: nothing was sent.
        Next::Superseded(_) => {}
        Next::RetryAt(due_ms) => {
            delivery.next_due_ms = Some(due_ms);
            p.moved(&key.partner, 1);
            let retry = ScheduleKey { due_ms, ..key };
            let entry = ScheduledDelivery {
                attempts: entry.attempts + 1,
                chunk: None,
                ..entry
            };
            p.put(retry.encode(), encode(&entry));
            p.put(log_key.to_vec(), encode(&log));
        }
        Next::Dead(reason) => {
            let dead_id = Uuid::now_v7();
            delivery.state = DeliveryState::Dead;
            delivery.next_due_ms = None;
            delivery.dead_letter = Some(dead_id);
            let died_ms = delivery.last_attempt.as_ref().map_or(0, |a| a.at_ms);
            let dead = DeadLetter {
                id: dead_id,
                delivery_id: entry.delivery,
                partner: key.partner.clone(),
                reason,
                died_ms,
                event: event.clone(),
                attempts: log,
                replayed_as: None,
                replayed_ms: None,
            };
            p.put(keys::dead_letter(dead_id).to_vec(), encode(&dead));
            if has_log {
                p.remove(log_key.to_vec());
            }
        }
    }
    p.put_event(home, &event);
    Ok(())
}

/// Removes finished events received before `cutoff_ms`, looking at about
/// `budget` events: first those stored alone, in id order, then the pages.
fn collect(
    p: &mut Pending<'_>,
    cutoff_ms: u64,
    budget: usize,
    from: Option<CollectFrom>,
) -> Result<Collected, StoreError> {
    let mut done = Collected::default();
    let pages_after = match from {
        Some(CollectFrom::Pages(after)) => Some(after),
        alone => {
            let after = match alone {
                Some(CollectFrom::Alone(id)) => Some(id),
                _ => None,
            };
            if !collect_alone(p, cutoff_ms, budget, after, &mut done)? {
                return Ok(done);
            }
            None
        }
    };
    collect_pages(p, cutoff_ms, budget, pages_after, &mut done)?;
    Ok(done)
}

/// Collects among events stored alone (`e`): true once past the last one
/// old enough, false when the budget ran out first (`done` says where to
/// go on).
fn collect_alone(
    p: &mut Pending<'_>,
    cutoff_ms: u64,
    budget: usize,
    after: Option<Uuid>,
    done: &mut Collected,
) -> Result<bool, StoreError> {
    let mut looked = 0;
    for item in p.db.range(keys::ids_after(keys::EVENT, after)) {
        let (k, v) = item?;
        if let Some(mut event) = unless_corrupt(event_format::decode(&k, &v))? {
            if event.received_ms >= cutoff_ms {
                // Those after it are younger still; pages hold only later ids.
                break;
            }
            let settled = unless_corrupt(settle_delivered(&mut event, |key| p.get(key)))?;
            if settled.is_some() && event.is_finished() {
                p.remove(k.to_vec());
                forget(p, &event)?;
                done.removed += 1;
            }
        }
        looked += 1;
        if looked >= budget {
            done.resume = keys::id_of(&k).map(CollectFrom::Alone);
            return Ok(false);
        }
    }
    Ok(true)
}

/// Collects among the pages (`b`): a page goes when all its events do, and
/// is rewritten without those that went before that. A page holding an
/// event received at or after the cutoff ends the pass.
fn collect_pages(
    p: &mut Pending<'_>,
    cutoff_ms: u64,
    budget: usize,
    after: Option<Uuid>,
    done: &mut Collected,
) -> Result<(), StoreError> {
    let mut looked = 0;
    for item in p.db.range(keys::ids_after(keys::EVENT_PAGE, after)) {
        let (key, _) = item?;
        // Read through the overlay: an earlier request may have rewritten it.
        let Some(value) = p.get(&key)? else {
            continue;
        };
        let Some(page) = unless_corrupt(Page::parse(&key, &value))? else {
            looked += 1;
            continue;
        };
        // Each event as it stands and settled; `None`: unreadable, so kept.
        let mut events = Vec::with_capacity(page.len());
        for i in 0..page.len() {
            let rewritten = keys::rewritten(page.id(i));
            let read = match p.get(&rewritten)? {
                Some(v) => event_format::decode(&rewritten, &v).map(|e| (e, true)),
                None => page.record(i).map(|e| (e, false)),
            };
            let Some((mut event, was_rewritten)) = unless_corrupt(read)? else {
                events.push(None);
                continue;
            };
            if event.received_ms >= cutoff_ms {
                return Ok(());
            }
            let settled = unless_corrupt(settle_delivered(&mut event, |key| p.get(key)))?;
            events.push(settled.map(|()| (event, was_rewritten)));
        }
        let (going, kept): (Vec<_>, Vec<_>) = events
            .into_iter()
            .enumerate()
            .partition(|(_, found)| found.as_ref().is_some_and(|(e, _)| e.is_finished()));
        // What the page keeps is read before anything goes: a page that
        // cannot be cut is left whole.
        let records = (!going.is_empty()).then(|| {
            kept.iter()
                .map(|&(i, _)| page.raw(i).map(|raw| (page.id(i), raw)))
                .collect::<Result<Vec<_>, _>>()
        });
        if let Some(records) = unless_corrupt(records.transpose())?.flatten() {
            for (event, was_rewritten) in going.into_iter().filter_map(|(_, found)| found) {
                if was_rewritten {
                    p.remove(keys::rewritten(event.id).to_vec());
                }
                forget(p, &event)?;
                done.removed += 1;
            }
            match records.is_empty() {
                true => p.remove(key.to_vec()),
                // Same key: the events it keeps still sort after it.
                false => p.put(key.to_vec(), event_page::encode(records.into_iter())),
            }
        }
        looked += page.len();
        if looked >= budget {
            done.resume = page.last_id().map(CollectFrom::Pages);
            return Ok(());
        }
    }
    Ok(())
}

/// A record retention cannot read stays where it is (its reads report it
/// to on-call): the pass goes on past it instead of stopping there for
/// good, and the store's disk with it.
fn unless_corrupt<T>(read: Result<T, StoreError>) -> Result<Option<T>, StoreError> {
    match read {
        Ok(value) => Ok(Some(value)),
        Err(e @ StoreError::Corrupt { .. }) => {
            tracing::error!(error = %e, "retention passed over an unreadable record");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// What a collected event leaves behind besides its record: its
/// idempotency key, what marks its deliveries delivered, the latest-state
/// pointers that still name it.
fn forget(p: &mut Pending<'_>, event: &EventRecord) -> Result<(), StoreError> {
    if let Some(key) = &event.idempotency_key {
        p.remove(keys::idempotency(key));
    }
    for d in &event.deliveries {
        match (d.state, d.chunk) {
            // Delivered from its chunk: one reader fewer of the chunk's state.
            (DeliveryState::Delivered, Some(c)) => forget_member(p, c.id)?,
            (DeliveryState::Delivered, None) => {
                p.remove(keys::delivered(d.id).to_vec());
                if d.attempts > 1 {
                    p.remove(keys::attempts(d.id).to_vec());
                }
            }
            _ => {}
        }
        if let Some(state) = &d.coalesce {
            // Still naming this finished delivery: nothing to compare with any more.
            let latest = keys::latest_state(&d.partner, &event.device_id, state);
            if p.get(&latest)?.as_deref() == Some(d.id.as_bytes().as_slice()) {
                p.remove(latest);
            }
        }
    }
    Ok(())
}

/// A delivered member's event was collected: its chunk's state has one
/// reader fewer, and goes with the last.
fn forget_member(p: &mut Pending<'_>, chunk: Uuid) -> Result<(), StoreError> {
    let key = keys::chunk_state(chunk);
    let Some(bytes) = p.get(&key)? else {
        return Ok(());
    };
    let mut state = chunk::State::from_bytes(&key, bytes)?;
    state.forget_one();
    if state.live() == 0 {
        p.remove(key.to_vec());
    } else {
        p.put(key.to_vec(), state.into_bytes());
    }
    Ok(())
}
