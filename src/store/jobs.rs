//! Bulk replay jobs and the audit log, as the store keeps them.
//!
//! A job (`j` + job id) is made with its audit entry in one group commit.
//! Each batch it replays and the job's own progress (its cursor, its
//! counts, `done`) are written by one writer command, so they commit
//! together or not at all: a job stopped by a crash goes on after its last
//! committed batch, and a letter it replayed is marked with its new
//! delivery in that same commit, so no later batch replays it again.
//!
//! Audit entries (`h` + entry id) are written by the command that does
//! what they record: a replay, a purge, a job made.

use uuid::Uuid;

use super::keys;
use super::replay::{self, Replayed};
use super::writer::{Command, Pending};
use super::{decode, encode, Store, StoreError};
use crate::model::{AuditEntry, DeadLetter, ReplayJob, ReplayJobState};

/// The most dead letters one read of a job's page walks past: a filter
/// that matches few letters among many does not hold a task for long.
const MAX_SCANNED: usize = 10_000;

/// Writes `entry` under an id the writer gives it now.
pub(super) fn put_audit(p: &mut Pending<'_>, entry: &AuditEntry) {
    let entry = AuditEntry {
        id: p.new_id(entry.at_ms),
        ..entry.clone()
    };
    p.put(keys::audit(entry.id).to_vec(), encode(&entry));
}

/// Writes a new job, under an id the writer gives it now, with the audit
/// entry that records it (naming the job); the job as written.
pub(super) fn start(p: &mut Pending<'_>, mut job: ReplayJob, audit: &AuditEntry) -> ReplayJob {
    job.id = p.new_id(job.created_ms);
    p.put(keys::replay_job(job.id).to_vec(), encode(&job));
    let audit = AuditEntry {
        target: Some(job.id),
        ..audit.clone()
    };
    put_audit(p, &audit);
    job
}

/// What one batch of a job did: each letter's replay, and the job as it
/// stands after it.
pub(crate) type BatchDone = (Vec<Replayed>, Box<ReplayJob>);

/// One batch of a replay job: the letters it replays and where the job
/// stands after them.
#[derive(Debug)]
pub(crate) struct JobBatch {
    /// The job's id.
    pub job: Uuid,
    /// The dead letters this batch replays.
    pub letters: Vec<Uuid>,
    /// The last letter read past: where the job goes on from.
    pub cursor: Option<Uuid>,
    /// Nothing is left after this batch: the job is done.
    pub done: bool,
    pub now_ms: u64,
}

/// Replays the batch's letters and moves its job to the batch's cursor
/// (done, if it is the last), in the same group. `None` when there is no
/// such job; a job already done replays nothing.
pub(super) fn batch(p: &mut Pending<'_>, batch: JobBatch) -> Result<Option<BatchDone>, StoreError> {
    let JobBatch {
        job: id,
        letters: ids,
        cursor,
        done,
        now_ms,
    } = batch;
    let key = keys::replay_job(id);
    let Some(mut job) = p.get_json::<ReplayJob>(&key)? else {
        return Ok(None);
    };
    if job.state == ReplayJobState::Done {
        return Ok(Some((Vec::new(), Box::new(job))));
    }
    let replayed = replay::replay_all(p, ids, now_ms);
    for r in &replayed {
        match r {
            Replayed::Scheduled(_) => job.replayed += 1,
            Replayed::Already(_) | Replayed::Missing | Replayed::Failed(_) => job.skipped += 1,
        }
    }
    if cursor.is_some() {
        job.cursor = cursor;
    }
    if done {
        job.state = ReplayJobState::Done;
    }
    job.updated_ms = now_ms;
    p.put(key.to_vec(), encode(&job));
    Ok(Some((replayed, Box::new(job))))
}

/// One page of the dead letters a job takes.
#[derive(Debug, Default)]
pub(crate) struct LetterPage {
    pub letters: Vec<DeadLetter>,
    /// The last letter read past, matched or not: where the next page starts.
    pub cursor: Option<Uuid>,
    /// Nothing is left up to the job's last letter.
    pub end: bool,
}

impl Store {
    /// Writes a new job and its audit entry in one durable group; the job
    /// with the id the writer gave it.
    pub(crate) async fn start_replay_job(
        &self,
        job: ReplayJob,
        audit: AuditEntry,
    ) -> Result<ReplayJob, StoreError> {
        self.call(|reply| Command::StartJob {
            job: Box::new(job),
            audit: Box::new(audit),
            reply,
        })
        .await
    }

    /// Replays one batch of job `id` (each dead letter as a new delivery)
    /// and records the job's progress with it, in one durable group.
    /// `None` when the job is gone.
    pub(crate) async fn replay_batch(
        &self,
        batch: JobBatch,
    ) -> Result<Option<BatchDone>, StoreError> {
        self.call(|reply| Command::ReplayBatch { batch, reply })
            .await
    }

    pub(crate) fn replay_job(&self, id: Uuid) -> Result<Option<ReplayJob>, StoreError> {
        super::get_json(&self.db()?, &keys::replay_job(id))
    }

    /// Jobs newest first, after `after` in that order, at most `limit`.
    pub(crate) fn replay_jobs(
        &self,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<ReplayJob>, StoreError> {
        let end = match after {
            Some(id) => keys::replay_job(id).to_vec(),
            None => vec![keys::REPLAY_JOB + 1],
        };
        let mut out = Vec::new();
        for item in self
            .db()?
            .range(vec![keys::REPLAY_JOB]..end)
            .rev()
            .take(limit)
        {
            let (k, v) = item?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Every job still running, oldest first: what a start resumes. One
    /// that cannot be read is reported and left.
    pub(crate) fn running_replay_jobs(&self) -> Result<Vec<ReplayJob>, StoreError> {
        let mut out = Vec::new();
        for item in self.db()?.scan_prefix([keys::REPLAY_JOB]) {
            let (k, v) = item?;
            match decode::<ReplayJob>(&k, &v) {
                Ok(job) if job.state == ReplayJobState::Running => out.push(job),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "an unreadable replay job is not resumed"),
            }
        }
        Ok(out)
    }

    /// The id of the newest dead letter, if any.
    pub(crate) fn newest_dead_letter(&self) -> Result<Option<Uuid>, StoreError> {
        let last = self
            .db()?
            .range(vec![keys::DEAD]..vec![keys::DEAD + 1])
            .next_back()
            .transpose()?;
        Ok(last.and_then(|(k, _)| keys::id_of(&k)))
    }

    /// Up to `limit` letters that `keep` accepts, after `after` and up to
    /// `last` (inclusive), in the order they died. A letter that cannot be
    /// read is reported and passed over, so it cannot hold a job up.
    pub(crate) fn dead_letter_page(
        &self,
        after: Option<Uuid>,
        last: Uuid,
        limit: usize,
        keep: &dyn Fn(&DeadLetter) -> bool,
    ) -> Result<LetterPage, StoreError> {
        let range = keys::ids_after(keys::DEAD, after);
        let upto = keys::dead_letter(last).to_vec();
        if range.start > upto {
            return Ok(LetterPage {
                cursor: after,
                end: true,
                ..LetterPage::default()
            });
        }
        let mut page = LetterPage {
            cursor: after,
            end: true,
            ..LetterPage::default()
        };
        for (scanned, item) in self.db()?.range(range.start..=upto).enumerate() {
            if page.letters.len() >= limit || scanned >= MAX_SCANNED {
                page.end = false;
                break;
            }
            let (k, v) = item?;
            page.cursor = keys::id_of(&k).or(page.cursor);
            match decode::<DeadLetter>(&k, &v) {
                Ok(letter) if keep(&letter) => page.letters.push(letter),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "skipping an unreadable dead letter"),
            }
        }
        Ok(page)
    }

    /// Audit entries oldest first, after `after`, at most `limit`.
    pub(crate) fn audit_entries(
        &self,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db()?
            .range(keys::ids_after(keys::AUDIT, after))
            .take(limit)
        {
            let (k, v) = item?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Attempt, AttemptOutcome, AuditAction, DeadLetterFilter, Priority};
    use crate::store::testing;
    use crate::store::{Next, Outcome};

    /// Three events whose deliveries died: their dead letters' ids.
    async fn three_dead(store: &Store) -> Vec<Uuid> {
        let events = (0..3)
            .map(|n| testing::event(&format!("lock-{n}"), Priority::Normal))
            .collect();
        store.enqueue(events).await.expect("enqueue");
        let due = store
            .due("acme", &Priority::ALL, 2_000, 100, &|_| false)
            .expect("scan")
            .found;
        for d in &due {
            let outcome = Outcome {
                key: d.key.clone(),
                entry: d.entry.clone(),
                attempt: Attempt {
                    number: 1,
                    at_ms: 1_500,
                    status: Some(400),
                    latency_ms: 3,
                    outcome: AttemptOutcome::Failed,
                    detail: "400".into(),
                },
                next: Next::Dead("refused".into()),
                park: None,
            };
            store.record(outcome).await.expect("recorded");
        }
        let letters = store.dead_letters(None, 10, &|_| true).expect("read");
        assert_eq!(letters.len(), 3);
        letters.iter().map(|d| d.id).collect()
    }

    fn job(last: Option<Uuid>) -> ReplayJob {
        ReplayJob {
            id: Uuid::now_v7(),
            state: ReplayJobState::Running,
            filter: DeadLetterFilter::default(),
            rate_per_second: 10,
            matched: 3,
            replayed: 0,
            skipped: 0,
            cursor: None,
            last,
            created_ms: 1_000,
            updated_ms: 1_000,
            created_by: "on-call".into(),
        }
    }

    fn audit() -> AuditEntry {
        AuditEntry {
            id: Uuid::nil(),
            at_ms: 1_000,
            token: "on-call".into(),
            action: AuditAction::ReplayJob,
            filter: Some(DeadLetterFilter::default()),
            target: None,
            event_id: None,
            count: 3,
        }
    }

    #[tokio::test]
    async fn a_batch_moves_the_job_with_its_replays_and_a_letter_is_replayed_once() {
        let (dir, store) = testing::open();
        let letters = three_dead(&store).await;
        let last = store.newest_dead_letter().expect("read");
        assert_eq!(last, letters.last().copied());
        let made = store
            .start_replay_job(job(last), audit())
            .await
            .expect("made");
        assert_eq!(store.running_replay_jobs().expect("read").len(), 1);

        let keep = |d: &DeadLetter| d.replayed_as.is_none();
        let page = store
            .dead_letter_page(None, letters[2], 2, &keep)
            .expect("page");
        assert_eq!(page.letters.len(), 2);
        assert_eq!(page.cursor, Some(letters[1]));
        assert!(!page.end);
        let ids: Vec<Uuid> = page.letters.iter().map(|d| d.id).collect();
        let done = store
            .replay_batch(JobBatch {
                job: made.id,
                letters: ids.clone(),
                cursor: page.cursor,
                done: false,
                now_ms: 2_000,
            })
            .await
            .expect("written");
        let (replayed, now) = done.expect("the job is there");
        let pairs: Vec<(Uuid, Uuid)> = ids
            .iter()
            .zip(&replayed)
            .map(|(&id, r)| match r {
                Replayed::Scheduled(s) => (id, s.delivery),
                other => panic!("{id} not replayed: {other:?}"),
            })
            .collect();
        assert_eq!((now.replayed, now.skipped), (2, 0));

        // Read back after a restart: the letters and the job's progress together.
        store.shutdown().await.expect("shutdown");
        drop(store);
        let store = testing::reopen(&dir);
        let job_now = store.replay_job(made.id).expect("read").expect("kept");
        assert_eq!(job_now.cursor, Some(letters[1]));
        assert_eq!(job_now.replayed, 2);
        for (id, delivery) in &pairs {
            let letter = store.dead_letter(*id).expect("read").expect("kept");
            assert_eq!(letter.replayed_as, Some(*delivery));
        }

        // The same letters again (a batch written twice) replay nothing.
        let done = store
            .replay_batch(JobBatch {
                job: made.id,
                letters: ids,
                cursor: page.cursor,
                done: false,
                now_ms: 2_100,
            })
            .await
            .expect("written");
        let (_, now) = done.expect("the job");
        assert_eq!((now.replayed, now.skipped), (2, 2));

        let rest = store
            .dead_letter_page(job_now.cursor, letters[2], 2, &keep)
            .expect("page");
        assert_eq!(rest.letters.len(), 1);
        assert!(rest.end);
        let done = store
            .replay_batch(JobBatch {
                job: made.id,
                letters: vec![rest.letters[0].id],
                cursor: rest.cursor,
                done: true,
                now_ms: 2_200,
            })
            .await
            .expect("written");
        let (_, now) = done.expect("the job");
        assert_eq!(now.state, ReplayJobState::Done);
        assert_eq!(now.replayed, 3);
        assert!(store.running_replay_jobs().expect("read").is_empty());
        let done = store
            .replay_batch(JobBatch {
                job: Uuid::now_v7(),
                letters: Vec::new(),
                cursor: None,
                done: true,
                now_ms: 2_300,
            })
            .await
            .expect("written");
        assert!(done.is_none(), "no such job");
        let entries = store.audit_entries(None, 10).expect("read");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].target, Some(made.id));
    }

    #[tokio::test]
    async fn an_unreadable_letter_is_passed_over_and_the_page_moves_past_it() {
        let (_dir, store) = testing::open();
        let letters = three_dead(&store).await;
        store
            .db()
            .expect("open")
            .insert(keys::dead_letter(letters[1]), &b"not json"[..])
            .expect("write");
        let page = store
            .dead_letter_page(None, letters[2], 10, &|_| true)
            .expect("a damaged letter is no error");
        let ids: Vec<Uuid> = page.letters.iter().map(|d| d.id).collect();
        assert_eq!(ids, [letters[0], letters[2]]);
        assert_eq!(page.cursor, Some(letters[2]));
        assert!(page.end);
        let past = store
            .dead_letter_page(Some(letters[2]), letters[2], 10, &|_| true)
            .expect("page");
        assert!(past.letters.is_empty() && past.end);
    }
}
