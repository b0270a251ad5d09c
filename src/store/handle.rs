//! The sled database behind a store, and its swap after a failed write.
//!
//! sled 0.34 keeps the first I/O error of any write (a full disk, say) as
//! a global error, and from then on fails every write of that `Db` until
//! the process opens it again; its memory may also hold the failed batch,
//! which is not on disk. So after a failed group commit the writer takes
//! the database out of this handle (readers get
//! [`StoreError::Io`] meanwhile rather than a view of writes that never
//! happened), waits for the last reader to let go of it (sled's file lock
//! goes with the last clone), opens the directory again and puts the new
//! one in. Readers clone the `Db` (a reference count) for the length of one
//! read, so the swap never waits on more than the reads in progress.

use std::sync::{Arc, RwLock};

use super::StoreError;

#[derive(Default)]
struct Slot {
    db: Option<sled::Db>,
    /// Why the store is out, while it is.
    out_because: Option<String>,
}

/// Shared by the store's readers and its writer.
#[derive(Clone)]
pub(super) struct Handle {
    slot: Arc<RwLock<Slot>>,
    /// Rung on every failed group commit (see [`super::Store::write_failed`]).
    pub failed: Arc<tokio::sync::Notify>,
}

impl Handle {
    pub(crate) fn new(db: sled::Db) -> Handle {
        Handle {
            slot: Arc::new(RwLock::new(Slot {
                db: Some(db),
                out_because: None,
            })),
            failed: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// The database to read, or why there is none now.
    pub(crate) fn db(&self) -> Result<sled::Db, StoreError> {
        let slot = self.slot.read().unwrap_or_else(|e| e.into_inner());
        match &slot.db {
            Some(db) => Ok(db.clone()),
            None => Err(out(slot
                .out_because
                .as_deref()
                .unwrap_or("no reason recorded"))),
        }
    }

    /// Says why the store is still out (the latest attempt to open it).
    pub(crate) fn explain(&self, reason: String) {
        let mut slot = self.slot.write().unwrap_or_else(|e| e.into_inner());
        if slot.db.is_none() {
            slot.out_because = Some(reason);
        }
    }

    /// Takes the database out: reads fail with `reason` until [`Handle::put`].
    pub(crate) fn take(&self, reason: String) -> Option<sled::Db> {
        let mut slot = self.slot.write().unwrap_or_else(|e| e.into_inner());
        slot.out_because = Some(reason);
        slot.db.take()
    }

    /// Puts the reopened database in.
    pub(crate) fn put(&self, db: sled::Db) {
        let mut slot = self.slot.write().unwrap_or_else(|e| e.into_inner());
        slot.db = Some(db);
        slot.out_because = None;
    }

    /// Why the store is out, while it is.
    pub(crate) fn out_because(&self) -> Option<String> {
        let slot = self.slot.read().unwrap_or_else(|e| e.into_inner());
        slot.out_because.clone()
    }
}

/// What a read or write gets while the store is out, and why.
pub(super) fn out(reason: &str) -> StoreError {
    StoreError::Io(format!(
        "the store is being opened again after a failed write ({reason})"
    ))
}
