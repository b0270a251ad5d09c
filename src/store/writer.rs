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
//!
//! This file holds the loop, the commit and [`Pending`], the group's
//! overlay; each command's changes live in a file of their own:
//! [`super::enqueue`], [`super::record`], [`super::collect`],
//! [`super::links`], [`super::replay`] and [`super::jobs`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::backlog::{AgeMoves, Backlog};
use super::chunk;
use super::depth::{self, Depth, Moves};
use super::event_format;
use super::event_page::{self};
use super::gather::{Gatherer, OUTCOME_LINGER};
use super::handle::{self, Handle};
use super::keys::{self, ScheduleKey};
use super::tally::{LastCommit, Progress, Tally};
use super::watermark::{self, Watermark};
use super::{current_event, decode, Accepted, CollectFrom, Collected, Home, Outcome, StoreError};
use crate::model::{AuditEntry, EventRecord, Priority, ReplayJob};

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
        ids: Vec<Uuid>,
        now_ms: u64,
        audit: Option<AuditEntry>,
        reply: Reply<Vec<super::replay::Replayed>>,
    },
    Purge {
        ids: Vec<Uuid>,
        audit: Option<AuditEntry>,
        reply: Reply<usize>,
    },
    StartJob {
        job: Box<ReplayJob>,
        audit: Box<AuditEntry>,
        reply: Reply<ReplayJob>,
    },
    /// One batch of a replay job and the job's progress, as one change.
    ReplayBatch {
        batch: super::jobs::JobBatch,
        reply: Reply<Option<super::jobs::BatchDone>>,
    },
    /// Commits even with nothing to write: proof that the store writes.
    Probe {
        reply: Reply<()>,
    },
    Shutdown {
        reply: Reply<()>,
    },
}

/// What the writer publishes for readers on other threads.
pub(super) struct Shared {
    /// The number of the latest durable group commit: the checkpoint
    /// thread checkpoints when it moves.
    pub durable: Arc<AtomicU64>,
    pub depth: Arc<Depth>,
    pub backlog: Arc<Backlog>,
    pub progress: Arc<Progress>,
    pub last_commit: Arc<LastCommit>,
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
        Reply<Vec<super::replay::Replayed>>,
        Result<Vec<super::replay::Replayed>, StoreError>,
    ),
    Purge(Reply<usize>, Result<usize, StoreError>),
    StartJob(Reply<ReplayJob>, ReplayJob),
    ReplayBatch(
        Reply<Option<super::jobs::BatchDone>>,
        Result<Option<super::jobs::BatchDone>, StoreError>,
    ),
    Probe(Reply<()>),
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
    // The writer alone gives out ids (events, deliveries, dead letters):
    // they rise in the order it writes them.
    let ids = super::ids::Ids::new();
    while let Some(group) = gatherer.next(&mut rx) {
        let started = Instant::now();
        let mut pending = Pending::new(&db, watermark.next(), last_event, &ids);
        let mut answers = Vec::with_capacity(group.len());
        let mut stop = false;
        let size = group.len();
        for command in group {
            match command {
                Command::Enqueue { events, reply } => {
                    let result = super::enqueue::enqueue(&mut pending, events);
                    answers.push(Answer::Enqueue(reply, result));
                }
                Command::Record { outcomes, reply } => {
                    let results = outcomes
                        .into_iter()
                        .map(|o| pending.atomically(|p| super::record::record(p, o)));
                    answers.push(Answer::Record(reply, Ok(results.collect())));
                }
                Command::Collect {
                    cutoff_ms,
                    budget,
                    from,
                    reply,
                } => {
                    let result =
                        pending.atomically(|p| super::collect::collect(p, cutoff_ms, budget, from));
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
                Command::Replay {
                    ids,
                    now_ms,
                    audit,
                    reply,
                } => {
                    let done = super::replay::replay_all(&mut pending, ids, now_ms);
                    super::replay::audit_replayed(&mut pending, &done, audit);
                    answers.push(Answer::Replay(reply, Ok(done)));
                }
                Command::Purge { ids, audit, reply } => {
                    let result = super::replay::purge_all(&mut pending, ids, audit);
                    answers.push(Answer::Purge(reply, result));
                }
                Command::StartJob { job, audit, reply } => {
                    let job = super::jobs::start(&mut pending, *job, &audit);
                    answers.push(Answer::StartJob(reply, job));
                }
                Command::ReplayBatch { batch, reply } => {
                    let result = super::jobs::batch(&mut pending, batch);
                    answers.push(Answer::ReplayBatch(reply, result));
                }
                Command::Probe { reply } => {
                    pending.force = true;
                    answers.push(Answer::Probe(reply));
                }
                Command::Shutdown { reply } => {
                    stop = true;
                    answers.push(Answer::Shutdown(reply));
                }
            }
        }
        // The new depths commit with the changes they count.
        let depths = shared.depth.after(std::mem::take(&mut pending.moves));
        let ages = std::mem::take(&mut pending.ages);
        let tally = std::mem::take(&mut pending.tally);
        let writes = pending.writes();
        for (partner, depth) in &depths {
            pending.put(keys::depth(partner), depth::encode(*depth).to_vec());
        }
        // Ids given to a group that then failed stay given: still rising.
        last_event = pending.pages.last();
        let number = pending.commit_number();
        let durable = pending.commit(&db, &mut watermark, &shared.durable);
        let mut unsure = None;
        match &durable {
            Ok(()) => {
                shared.depth.set(depths);
                publish_queues(&shared.backlog, ages);
                tally.publish(&shared.progress);
            }
            Err(_) => unsure = Some((depths, ages, tally)),
        }
        if writes {
            shared
                .last_commit
                .set(durable.as_ref().err().map(|e| e.to_string()));
        }
        crate::telemetry::group_commit(size, started.elapsed(), durable.is_ok());
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
                (Answer::StartJob(r, job), Ok(())) => drop(r.send(Ok(job))),
                (Answer::StartJob(r, _), Err(e)) => drop(r.send(Err(failed(e)))),
                (Answer::ReplayBatch(r, result), Ok(())) => drop(r.send(result)),
                (Answer::ReplayBatch(r, _), Err(e)) => drop(r.send(Err(failed(e)))),
                (Answer::Probe(r), Ok(())) => drop(r.send(Ok(()))),
                (Answer::Probe(r), Err(e)) => drop(r.send(Err(failed(e)))),
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
            if let (true, Some((depths, ages, tally))) = (landed, unsure) {
                shared.depth.set(depths);
                publish_queues(&shared.backlog, ages);
                tally.publish(&shared.progress);
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

/// Moves the queues by a durable commit's changes and shows them.
fn publish_queues(backlog: &Backlog, ages: AgeMoves) {
    for (partner, priority, depth) in backlog.apply(ages) {
        crate::telemetry::queue(&partner, priority, depth);
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
                metrics::counter!(crate::telemetry::STORE_REOPENS).increment(1);
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
        Command::StartJob { reply, .. } => drop(reply.send(Err(error))),
        Command::ReplayBatch { reply, .. } => drop(reply.send(Err(error))),
        Command::Probe { reply } => drop(reply.send(Err(error))),
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
        Command::StartJob { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
        Command::ReplayBatch { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
        Command::Probe { reply } => drop(reply.send(Err(StoreError::Closed))),
        Command::Shutdown { reply } => drop(reply.send(Ok(()))),
    }
}

/// One step [`Pending::atomically`] can take back.
enum Undo {
    /// A key was written; what the overlay held for it before (`None`: nothing).
    Write(Vec<u8>, Option<Option<Vec<u8>>>),
    Moved(String, Priority, u64, i64),
}

/// One group's writes: an overlay that later requests of the group read
/// through, turned into one sled batch at commit.
pub(super) struct Pending<'a> {
    pub(super) db: &'a sled::Db,
    overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// The schedule chunks this group's first attempts go in.
    pub(super) chunks: chunk::Filling,
    /// The event pages this group's accepted events go in.
    pub(super) pages: event_page::Filling,
    /// How this group changes each partner's queue depth.
    moves: Moves,
    /// The same per partner × priority and enqueue time.
    ages: AgeMoves,
    /// What this group settled, counted once it is durable.
    pub(super) tally: Tally,
    /// Commit even with nothing to write (a probe).
    force: bool,
    /// While a request runs [`Pending::atomically`]: how to undo what it
    /// changed so far, newest last.
    undo: Option<Vec<Undo>>,
    /// The number this group will commit as.
    commit: u64,
    /// The next device-queue sequence number: the commit number in the
    /// high bits, so it keeps rising across groups and restarts.
    next_seq: u64,
    /// Where this group's ids come from (see [`Pending::new_id`]).
    ids: &'a super::ids::Ids,
}

impl<'a> Pending<'a> {
    fn new(db: &'a sled::Db, commit: u64, last_event: Uuid, ids: &'a super::ids::Ids) -> Self {
        Pending {
            db,
            overlay: HashMap::new(),
            chunks: chunk::Filling::default(),
            pages: event_page::Filling::new(last_event),
            moves: Moves::default(),
            ages: AgeMoves::default(),
            tally: Tally::default(),
            force: false,
            undo: None,
            commit,
            next_seq: commit << 24,
            ids,
        }
    }

    /// A new id stamped `at_ms` for an event, delivery or dead letter
    /// this group writes (see `store::ids`). Event ids go through
    /// `pages.assign` too, which keeps them rising across restarts.
    pub(super) fn new_id(&self, at_ms: u64) -> Uuid {
        self.ids.at(at_ms)
    }

    /// The number this group commits as.
    pub(super) fn commit_number(&self) -> u64 {
        self.commit
    }

    pub(super) fn seq(&mut self) -> u64 {
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

    /// `partner`'s queue depth changes by `by` deliveries of `priority`
    /// enqueued at `created_ms` if this group commits.
    pub(super) fn moved(&mut self, partner: &str, priority: Priority, created_ms: u64, by: i64) {
        self.moves.add(partner, by);
        self.ages.add(partner, priority, created_ms, by);
        if let Some(undo) = &mut self.undo {
            undo.push(Undo::Moved(partner.to_string(), priority, created_ms, by));
        }
    }

    /// Whether committing this group writes to the disk.
    fn writes(&self) -> bool {
        self.force || !self.overlay.is_empty() || !self.chunks.is_empty() || !self.pages.is_empty()
    }

    /// Runs one request's changes as a unit: if it fails part way, what it
    /// wrote is taken back, so the group commits none of it rather than,
    /// say, a removed schedule entry without the retry that replaces it.
    fn atomically<T>(
        &mut self,
        change: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.undo = Some(Vec::new());
        let counted = self.tally.len();
        let result = change(self);
        let undo = self.undo.take().unwrap_or_default();
        if result.is_err() {
            self.tally.truncate(counted);
            for step in undo.into_iter().rev() {
                match step {
                    Undo::Write(key, Some(before)) => {
                        self.overlay.insert(key, before);
                    }
                    Undo::Write(key, None) => {
                        self.overlay.remove(&key);
                    }
                    Undo::Moved(partner, priority, created_ms, by) => {
                        self.moves.add(&partner, -by);
                        self.ages.add(&partner, priority, created_ms, -by);
                    }
                }
            }
        }
        result
    }

    /// The state of chunk `id`, for a change that [`Pending::put`] or
    /// [`Pending::remove`] then writes. Rebuilt from the chunk's entry (all
    /// pending) if its state record is missing or unreadable, so no member
    /// is stranded; `None` when neither is there (settled long ago).
    pub(super) fn chunk_state(
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
        durable: &AtomicU64,
    ) -> Result<(), StoreError> {
        let Pending {
            mut overlay,
            chunks,
            pages,
            commit,
            force,
            ..
        } = self;
        for (key, value) in chunks.finish().into_iter().chain(pages.finish()) {
            overlay.insert(key, Some(value));
        }
        if overlay.is_empty() && !force {
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
        db.apply_batch(batch)?;
        // Durable on return: herald's sled counts a log buffer stable only
        // once an fdatasync covers it (vendor/sled/HERALD.md).
        db.flush()?;
        durable.fetch_max(commit, Ordering::Release);
        metrics::counter!(crate::telemetry::STORE_FSYNCS).increment(1);
        // The commit stands either way; a stale watermark only weakens the check.
        if let Err(e) = watermark.advance() {
            tracing::warn!(error = %e, "cannot record the commit watermark");
        }
        Ok(())
    }
}
