//! The commit watermark: how herald notices that sled lost committed writes.
//!
//! sled recovers a damaged log by keeping what precedes the first bad
//! record, and a truncated or replaced `db` file simply opens as an empty
//! store: either way accepted events would vanish without a word. So every
//! group commit also writes its sequence number into the batch (key
//! [`keys::COMMITS`]), and after the fsync the writer copies that number
//! into a small file beside sled's. The file is written only once sled holds
//! the number durably, so in a healthy directory sled's number is never
//! below the file's; if it is, sled lost commits and herald refuses to
//! start rather than run on silently shortened data.
//!
//! The file must itself survive a power cut for the check to see one, but
//! an fdatasync of it in every group commit would double the disk round
//! trips an accepted event waits for. A thread beside the writer syncs it
//! instead, every [`SYNC_INTERVAL`] while it has changed: the durable copy
//! lags sled by at most that interval plus one sync, so a power cut that
//! costs sled commits older than that is caught at the next start, and the
//! file can still never run ahead of sled.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::keys;

/// The file beside sled's own, in the data dir.
pub(crate) const FILE_NAME: &str = "herald-commits";

/// How often the file is synced while commits advance it.
pub(crate) const SYNC_INTERVAL: Duration = Duration::from_millis(50);

pub(crate) struct Watermark {
    file: Arc<File>,
    path: PathBuf,
    /// The sequence number of the last durable commit.
    last: u64,
    /// The number last written into the file, for the syncing thread.
    written: Arc<AtomicU64>,
    /// Dropped with the watermark: the syncing thread syncs once more and ends.
    _stop_syncing: mpsc::Sender<()>,
}

impl Watermark {
    /// Checks sled's commit number against the file's, and opens the file
    /// for the writer. The error says what is wrong, for the operator.
    pub(crate) fn open(dir: &Path, db: &sled::Db) -> Result<Watermark, String> {
        let path = dir.join(FILE_NAME);
        let in_sled = match db
            .get(keys::COMMITS)
            .map_err(|e| format!("cannot read the commit number: {e}"))?
        {
            None => 0,
            Some(v) => decode(&v).ok_or_else(|| {
                format!(
                    "the commit number in the store is {} bytes, not 8: the store is corrupt",
                    v.len()
                )
            })?,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let in_file = match bytes.len() {
            // New directory, or the process died before the first commit's copy.
            0 => 0,
            _ => decode(&bytes).ok_or_else(|| {
                format!(
                    "{} holds {} bytes, not 8: it is damaged (it only guards against data loss; \
                     empty it (truncate to 0 bytes) to start without that check)",
                    path.display(),
                    bytes.len()
                )
            })?,
        };
        if in_sled < in_file {
            return Err(format!(
                "the store is damaged: it recovered to commit {in_sled} but commit {in_file} \
                 had been made durable, so accepted events would be missing. herald will not \
                 run on it; restore the directory from a backup, or move it aside to start empty"
            ));
        }
        let file = Arc::new(file);
        let written = Arc::new(AtomicU64::new(in_file));
        let (stop_syncing, stopped) = mpsc::channel();
        let syncing = Syncing {
            file: Arc::clone(&file),
            path: path.clone(),
            written: Arc::clone(&written),
            synced: in_file,
        };
        std::thread::Builder::new()
            .name("herald-watermark".into())
            .spawn(move || syncing.run(stopped))
            .map_err(|e| format!("cannot start the watermark's sync thread: {e}"))?;
        Ok(Watermark {
            file,
            path,
            last: in_sled,
            written,
            _stop_syncing: stop_syncing,
        })
    }

    /// The number the next commit writes into its batch.
    pub(crate) fn next(&self) -> u64 {
        self.last + 1
    }

    /// Called after the commit numbered [`Watermark::next`] is durable in sled.
    /// No fsync here (the syncing thread's job): the file may lag behind
    /// sled, never run ahead of it.
    pub(crate) fn advance(&mut self) -> Result<(), String> {
        self.last += 1;
        self.file
            .write_all_at(&self.last.to_be_bytes(), 0)
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        self.written.store(self.last, Ordering::Release);
        Ok(())
    }
}

/// The thread that makes the file's latest number durable.
struct Syncing {
    file: Arc<File>,
    path: PathBuf,
    written: Arc<AtomicU64>,
    /// The number the last successful sync covered.
    synced: u64,
}

impl Syncing {
    fn run(mut self, stop: mpsc::Receiver<()>) {
        loop {
            let stopping = !matches!(
                stop.recv_timeout(SYNC_INTERVAL),
                Err(mpsc::RecvTimeoutError::Timeout)
            );
            self.sync_if_changed();
            if stopping {
                return;
            }
        }
    }

    fn sync_if_changed(&mut self) {
        // Read before the sync: the sync covers at least this number.
        let written = self.written.load(Ordering::Acquire);
        if written == self.synced {
            return;
        }
        match self.file.sync_data() {
            Ok(()) => self.synced = written,
            // The check weakens until a later sync succeeds; commits go on.
            Err(e) => tracing::warn!(
                error = %e,
                path = %self.path.display(),
                "cannot sync the commit watermark"
            ),
        }
    }
}

pub(crate) fn encode(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn decode(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}
