//! Checkpoints: how long a restart takes does not grow with how long herald
//! ran before it.
//!
//! sled recovers by reading its last snapshot of the page table and
//! replaying the log written after it, and sled 0.34 writes that snapshot
//! only while opening. A herald that ran for days through a partner outage
//! therefore replayed its whole log at the next start: with 10,000,000
//! events queued (a 6 GB log), sled's open alone took 3.4 s with the log in
//! the page cache and 16 s from a cold disk, all of it before the first
//! alert could go out. A thread beside the writer asks sled for a snapshot
//! ([`sled::Db::checkpoint`], a patch in vendor/sled) every [`INTERVAL`]
//! while commits are being made, so a restart replays at most that much of
//! the log. A checkpoint runs beside the writer and never blocks it; one
//! that fails is logged and tried again at the next interval (recovery then
//! just replays more).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::handle::Handle;

/// How often a checkpoint is taken while the store is written to.
pub(crate) const INTERVAL: Duration = Duration::from_secs(5);

/// Owns the checkpoint thread: dropped with the last handle on the store,
/// it stops the thread and waits for a checkpoint in progress to finish.
pub(crate) struct Checkpoints {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpoints {
    /// Starts checkpointing the store's database whenever the latest durable
    /// commit has moved on. It takes the database from `handle` for each
    /// checkpoint only, so a reopen after a failed write is never kept
    /// waiting for sled's file lock.
    pub(super) fn start(
        handle: Handle,
        durable_commit: Arc<AtomicU64>,
    ) -> std::io::Result<Checkpoints> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("herald-checkpoint".into())
            .spawn(move || {
                let mut checkpointed_at = durable_commit.load(Ordering::Acquire);
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(INTERVAL) {
                    let commit = durable_commit.load(Ordering::Acquire);
                    if commit == checkpointed_at {
                        continue;
                    }
                    let started = Instant::now();
                    // While the store is out, the next interval tries again.
                    let Ok(db) = handle.db() else { continue };
                    match db.checkpoint() {
                        Ok(true) => {
                            checkpointed_at = commit;
                            metrics::histogram!(crate::telemetry::STORE_CHECKPOINT_SECONDS)
                                .record(started.elapsed().as_secs_f64());
                        }
                        Ok(false) => tracing::debug!("checkpoint deferred: a page was being made"),
                        Err(e) => tracing::warn!(
                            error = %e,
                            "cannot write a checkpoint; the next start replays more of the log"
                        ),
                    }
                }
            })?;
        Ok(Checkpoints {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use crate::model::Priority;
    use crate::store::testing;
    use crate::store::{Store, StoreOptions};

    /// The data dir as a crash leaves it: every file as it stands, taken
    /// while the writer is idle.
    fn crash_image(from: &std::path::Path, to: &std::path::Path) {
        for entry in walk(from) {
            let target = to.join(entry.strip_prefix(from).expect("inside"));
            if entry.is_dir() {
                std::fs::create_dir_all(&target).expect("mkdir");
            } else {
                std::fs::copy(&entry, &target).expect("copy");
            }
        }
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut found = vec![dir.to_path_buf()];
        let mut i = 0;
        while i < found.len() {
            if found[i].is_dir() {
                for entry in std::fs::read_dir(&found[i]).expect("list") {
                    found.push(entry.expect("entry").path());
                }
            }
            i += 1;
        }
        found
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_recovered_from_checkpoints_taken_under_writes_keeps_every_event() {
        let (dir, store) = testing::open();
        // Checkpoints as fast as they go, while groups are committed.
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let checkpointing = {
            let (db, stop) = (store.db().expect("open"), std::sync::Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut taken = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if db.checkpoint().expect("checkpoint") {
                        taken += 1;
                    }
                }
                taken
            })
        };
        let mut ids = Vec::new();
        for batch in 0..300 {
            let events = (0..20)
                .map(|n| testing::event(&format!("lock-{batch}-{n}"), Priority::Normal))
                .collect();
            for accepted in store.enqueue(events).await.expect("enqueue") {
                ids.push(accepted.id);
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let taken = checkpointing.join().expect("checkpoint thread");
        assert!(taken > 0, "no checkpoint was taken");
        // Commits after the last checkpoint: recovery replays them on top.
        for batch in 0..20 {
            let events = vec![testing::event(&format!("late-{batch}"), Priority::Critical)];
            for accepted in store.enqueue(events).await.expect("enqueue") {
                ids.push(accepted.id);
            }
        }

        let image = tempfile::tempdir().expect("temp dir");
        crash_image(dir.path(), image.path());
        let snapshots = std::fs::read_dir(image.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("snap."))
            .count();
        assert_eq!(snapshots, 1, "one snapshot left after {taken} checkpoints");

        let options = StoreOptions {
            cache_bytes: 1 << 20,
            queue: 16,
        };
        let recovered = Store::open(image.path(), options).expect("the image opens");
        for id in &ids {
            assert!(
                recovered.event(*id).expect("read").is_some(),
                "event {id} lost"
            );
        }
        assert_eq!(recovered.queued("acme"), ids.len() as u64);
        assert_eq!(recovered.scheduled_count("acme"), ids.len());
    }
}
