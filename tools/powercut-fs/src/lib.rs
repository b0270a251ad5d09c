//! A FUSE filesystem for tests that loses, at a simulated power cut, what a
//! real disk may lose: every write not yet covered by `fsync`/`fdatasync`,
//! and every name change not yet covered by an `fsync` of its directory.
//!
//! It passes through to a backing directory, which only ever holds what a
//! disk would have kept after a cut at that moment (the model of LazyFS).
//!
//! # What it models
//!
//! - **File data.** Each file's writes and size changes (`write`,
//!   `ftruncate`, `O_TRUNC`) since its last `fsync` or `fdatasync` are kept
//!   in memory, in order; reads see them merged over the backing file.
//!   `fsync` and `fdatasync` (both: either must make the data and the size
//!   durable) write them to the backing file.
//! - **Names.** `create`, `mknod`, `mkdir`, `unlink`, `rmdir` and `rename`
//!   take effect in the backing directory at once (a removed or replaced
//!   file is moved to a hidden trash folder), and are recorded. A change
//!   counts as durable once its directory has been fsynced after it; a
//!   rename between two directories once both have. With
//!   [`MetadataModel::Ordered`] any fsync makes every earlier name change
//!   durable instead, as a single ordered journal does (ext4, XFS).
//! - **The cut** ([`Mounted::cut`]). Every unsynced write and size change
//!   is dropped, and every name change not durable is undone, newest
//!   first: a file created since is removed (with what it holds), one
//!   removed or replaced comes back from the trash with its durable data.
//!   With a `keep_share` above 0 a seeded random share survives instead:
//!   each unsynced write split into 4 KiB pieces, each piece and each size
//!   change kept with that probability (torn and reordered writes), and a
//!   prefix of the name changes kept in order.
//!
//! # What it does not model
//!
//! - Anything a cut does to synced data (bit rot, lying drives).
//! - Metadata other than names: modes, owners and times pass through at
//!   once and always survive.
//! - Hard links and symlinks (refused), `fallocate` (unsupported),
//!   writable shared `mmap` (the kernel's page cache is not seen).
//! - A cut while requests are in flight from a live process: the process
//!   writing to the mount is meant to be killed first (as power takes the
//!   program down with the disk); requests after the cut fail with `EIO`.
//! - A cut of the serving process itself (SIGKILL): the undo of name
//!   changes happens in the cut; the backing directory of a killed server
//!   keeps the name changes made since the last fsync of their directory
//!   (unsynced data is lost all the same).
//!
//! The backing directory is never fsynced on the host: the host does not
//! lose power, only this layer does.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

/// How long the kernel may cache names and attributes. Nothing changes
/// behind the kernel's back while mounted (a cut ends the mount).
const TTL: Duration = Duration::from_secs(1);
/// In the backing root, hidden from the mount: removed and replaced files
/// wait here until their removal is durable or undone.
const TRASH: &str = ".powercut-trash";
/// The unit a torn write is kept or lost in.
const PIECE: u64 = 4096;

/// When a name change becomes durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetadataModel {
    /// Once its directory is fsynced (POSIX's promise, and all a portable
    /// program may count on).
    Strict,
    /// Once anything is fsynced (a single ordered journal: ext4, XFS).
    Ordered,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub metadata: MetadataModel,
    /// Threads serving the kernel's requests.
    pub threads: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            metadata: MetadataModel::Strict,
            threads: 4,
        }
    }
}

/// What a cut dropped and kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Files that had unsynced writes or size changes.
    pub files_unsynced: u64,
    /// Unsynced pieces of writes (4 KiB at most) and size changes lost.
    pub writes_dropped: u64,
    pub bytes_dropped: u64,
    /// Unsynced pieces and size changes that survived (`keep_share` > 0).
    pub writes_kept: u64,
    pub bytes_kept: u64,
    /// Name changes undone, and not-yet-durable ones kept (`keep_share` > 0).
    pub names_undone: u64,
    pub names_kept: u64,
    /// Undos that no longer applied (their directory was gone too).
    pub undo_skipped: u64,
}

impl fmt::Display for CutReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} files had unsynced data: {} writes ({} bytes) dropped, {} ({} bytes) kept; \
             {} name changes undone, {} kept",
            self.files_unsynced,
            self.writes_dropped,
            self.bytes_dropped,
            self.writes_kept,
            self.bytes_kept,
            self.names_undone,
            self.names_kept
        )
    }
}

/// A write or size change not yet synced.
enum DataOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

struct Node {
    /// Relative to the backing root; in the trash once removed.
    path: PathBuf,
    kind: FileType,
    /// The backing file, while open or holding unsynced data.
    file: Option<File>,
    open_handles: u64,
    pending: Vec<DataOp>,
    /// The size the mount shows, while `pending` is not empty.
    size: u64,
}

/// A name change, and how to undo it.
enum NameChange {
    /// A file or directory made at `parent`/`name`.
    Created { parent: u64, name: OsString },
    /// `parent`/`name` removed, now at `trash`.
    Removed {
        parent: u64,
        name: OsString,
        trash: PathBuf,
    },
    /// Moved; what it replaced is at `replaced`.
    Renamed {
        from_parent: u64,
        from_name: OsString,
        to_parent: u64,
        to_name: OsString,
        replaced: Option<PathBuf>,
    },
}

struct Journaled {
    change: NameChange,
    /// Directories still to be fsynced before the change is durable.
    waits_for: Vec<u64>,
}

struct State {
    backing: PathBuf,
    model: MetadataModel,
    nodes: HashMap<u64, Node>,
    /// Live names (relative paths) to inodes.
    by_path: HashMap<PathBuf, u64>,
    next_ino: u64,
    journal: Vec<Journaled>,
    trash_seq: u64,
    /// Set by a cut or an unmount: every request after it fails.
    frozen: bool,
}

type Result<T> = std::result::Result<T, Errno>;

fn errno(e: io::Error) -> Errno {
    Errno::from(e)
}

impl State {
    fn new(backing: PathBuf, model: MetadataModel) -> State {
        let mut nodes = HashMap::new();
        nodes.insert(
            INodeNo::ROOT.0,
            Node {
                path: PathBuf::new(),
                kind: FileType::Directory,
                file: None,
                open_handles: 0,
                pending: Vec::new(),
                size: 0,
            },
        );
        let mut by_path = HashMap::new();
        by_path.insert(PathBuf::new(), INodeNo::ROOT.0);
        State {
            backing,
            model,
            nodes,
            by_path,
            next_ino: INodeNo::ROOT.0 + 1,
            journal: Vec::new(),
            trash_seq: 0,
            frozen: false,
        }
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        self.backing.join(rel)
    }

    fn node(&self, ino: u64) -> Result<&Node> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    /// The relative path of `name` in directory `parent`.
    fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf> {
        let dir = self.node(parent)?;
        if dir.kind != FileType::Directory {
            return Err(Errno::ENOTDIR);
        }
        if parent == INodeNo::ROOT.0 && name == TRASH {
            return Err(Errno::EACCES);
        }
        Ok(dir.path.join(name))
    }

    /// The inode for a live name, made on first sight.
    fn ino_for(&mut self, rel: PathBuf, kind: FileType) -> u64 {
        if let Some(&ino) = self.by_path.get(&rel) {
            return ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.by_path.insert(rel.clone(), ino);
        self.nodes.insert(
            ino,
            Node {
                path: rel,
                kind,
                file: None,
                open_handles: 0,
                pending: Vec::new(),
                size: 0,
            },
        );
        ino
    }

    fn attr(&self, ino: u64) -> Result<FileAttr> {
        let node = self.node(ino)?;
        let meta = match &node.file {
            Some(file) => file.metadata(),
            None => fs::symlink_metadata(self.abs(&node.path)),
        }
        .map_err(errno)?;
        let size = match node.pending.is_empty() {
            true => meta.len(),
            false => node.size,
        };
        let time = |secs: i64, nanos: i64| {
            UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos.clamp(0, 999_999_999) as u32)
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time(meta.atime(), meta.atime_nsec()),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind: FileType::from_std(meta.file_type()).unwrap_or(node.kind),
            perm: (meta.mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: meta.rdev() as u32,
            blksize: 4096,
            flags: 0,
        })
    }

    /// The backing file of a regular file, opened if need be.
    fn open_backing(&mut self, ino: u64) -> Result<&File> {
        let abs = self.abs(&self.node(ino)?.path);
        let node = self.node_mut(ino)?;
        if node.kind != FileType::RegularFile {
            return Err(Errno::EISDIR);
        }
        if node.file.is_none() {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(abs)
                .map_err(errno)?;
            node.file = Some(file);
        }
        node.file.as_ref().ok_or(Errno::EIO)
    }

    /// Records an unsynced write or size change.
    fn push(&mut self, ino: u64, op: DataOp) -> Result<()> {
        let durable_size = self.open_backing(ino)?.metadata().map_err(errno)?.len();
        let node = self.node_mut(ino)?;
        if node.pending.is_empty() {
            node.size = durable_size;
        }
        match &op {
            DataOp::Write { offset, data } => {
                let (start, end) = (*offset, offset + data.len() as u64);
                node.size = node.size.max(end);
                // An earlier write this one covers can no longer be read;
                // past a size change the order matters, so stop there.
                let mut keep_from = node.pending.len();
                while keep_from > 0 {
                    match &node.pending[keep_from - 1] {
                        DataOp::SetLen(_) => break,
                        DataOp::Write { .. } => keep_from -= 1,
                    }
                }
                let mut i = keep_from;
                while i < node.pending.len() {
                    let covered = matches!(&node.pending[i],
                        DataOp::Write { offset, data }
                            if *offset >= start && offset + data.len() as u64 <= end);
                    match covered {
                        true => {
                            node.pending.remove(i);
                        }
                        false => i += 1,
                    }
                }
            }
            DataOp::SetLen(len) => {
                node.size = *len;
                if *len == 0 {
                    node.pending.clear();
                }
            }
        }
        node.pending.push(op);
        Ok(())
    }

    /// What the mount shows of `ino` from `offset`: the backing file with
    /// the unsynced changes laid over it.
    fn read(&mut self, ino: u64, offset: u64, len: usize) -> Result<Vec<u8>> {
        let file = self.open_backing(ino)?;
        let durable_size = file.metadata().map_err(errno)?.len();
        let mut buf = vec![0u8; len];
        if offset < durable_size {
            let want = ((durable_size - offset) as usize).min(len);
            read_full_at(file, &mut buf[..want], offset).map_err(errno)?;
        }
        let node = self.node(ino)?;
        let size = match node.pending.is_empty() {
            true => durable_size,
            false => node.size,
        };
        let end = offset + len as u64;
        for op in &node.pending {
            match op {
                DataOp::Write { offset: at, data } => {
                    let (from, to) = ((*at).max(offset), (at + data.len() as u64).min(end));
                    if from < to {
                        buf[(from - offset) as usize..(to - offset) as usize]
                            .copy_from_slice(&data[(from - at) as usize..(to - at) as usize]);
                    }
                }
                DataOp::SetLen(cut) if *cut < end => {
                    let from = cut.saturating_sub(offset) as usize;
                    buf[from..].fill(0);
                }
                DataOp::SetLen(_) => {}
            }
        }
        buf.truncate(size.saturating_sub(offset).min(len as u64) as usize);
        Ok(buf)
    }

    /// fsync/fdatasync: the file's unsynced changes go to the backing file.
    fn sync_file(&mut self, ino: u64) -> Result<()> {
        let node = self.node_mut(ino)?;
        let pending = std::mem::take(&mut node.pending);
        if let Some(file) = &node.file {
            for op in &pending {
                match op {
                    DataOp::Write { offset, data } => file.write_all_at(data, *offset),
                    DataOp::SetLen(len) => file.set_len(*len),
                }
                .map_err(errno)?;
            }
        }
        self.close_if_idle(ino);
        if self.model == MetadataModel::Ordered {
            self.commit_all();
        }
        Ok(())
    }

    /// Drops the backing fd once nothing needs it.
    fn close_if_idle(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            if node.open_handles == 0 && node.pending.is_empty() {
                node.file = None;
            }
        }
    }

    /// fsync of a directory: the name changes in it become durable.
    fn sync_dir(&mut self, ino: u64) {
        if self.model == MetadataModel::Ordered {
            self.commit_all();
            return;
        }
        for entry in &mut self.journal {
            entry.waits_for.retain(|dir| *dir != ino);
        }
        let (durable, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.journal)
            .into_iter()
            .partition(|entry| entry.waits_for.is_empty());
        self.journal = waiting;
        for entry in durable {
            self.forget_trash(&entry.change);
        }
    }

    fn commit_all(&mut self) {
        for entry in std::mem::take(&mut self.journal) {
            self.forget_trash(&entry.change);
        }
    }

    /// A durable removal: what it removed is gone for good.
    fn forget_trash(&self, change: &NameChange) {
        let trash = match change {
            NameChange::Removed { trash, .. } => trash,
            NameChange::Renamed {
                replaced: Some(trash),
                ..
            } => trash,
            _ => return,
        };
        let abs = self.abs(trash);
        // Gone already is as good; the trash folder is emptied at mount.
        let _ = fs::remove_file(&abs).or_else(|_| fs::remove_dir_all(&abs));
    }

    fn record(&mut self, change: NameChange) {
        let mut waits_for = match &change {
            NameChange::Created { parent, .. } | NameChange::Removed { parent, .. } => {
                vec![*parent]
            }
            NameChange::Renamed {
                from_parent,
                to_parent,
                ..
            } => vec![*from_parent, *to_parent],
        };
        waits_for.dedup();
        self.journal.push(Journaled { change, waits_for });
    }

    /// Moves the live name `rel` into the trash; returns where it went.
    fn move_to_trash(&mut self, rel: &Path) -> Result<PathBuf> {
        self.trash_seq += 1;
        let trash = Path::new(TRASH).join(self.trash_seq.to_string());
        fs::rename(self.abs(rel), self.abs(&trash)).map_err(errno)?;
        self.move_names(rel, &trash);
        Ok(trash)
    }

    /// Nodes at `from` and below (live or in the trash) now live at `to`.
    fn move_names(&mut self, from: &Path, to: &Path) {
        for (ino, node) in self.nodes.iter_mut() {
            let Ok(rest) = node.path.strip_prefix(from) else {
                continue;
            };
            let new = match rest.as_os_str().is_empty() {
                true => to.to_path_buf(),
                false => to.join(rest),
            };
            if self.by_path.get(&node.path) == Some(ino) {
                self.by_path.remove(&node.path);
            }
            // Names in the trash are not live.
            if !new.starts_with(TRASH) {
                self.by_path.insert(new.clone(), *ino);
            }
            node.path = new;
        }
    }

    /// Forgets the names at `rel` and below (their creation was undone).
    fn drop_names(&mut self, rel: &Path) {
        self.by_path.retain(|p, _| !p.starts_with(rel));
        for node in self.nodes.values_mut() {
            if node.path.starts_with(rel) {
                // Matches no later move.
                node.path = Path::new(TRASH).join("undone");
            }
        }
    }

    fn lookup(&mut self, parent: u64, name: &OsStr) -> Result<FileAttr> {
        let rel = self.child(parent, name)?;
        let meta = fs::symlink_metadata(self.abs(&rel)).map_err(errno)?;
        let kind = FileType::from_std(meta.file_type()).ok_or(Errno::EIO)?;
        let ino = self.ino_for(rel, kind);
        self.attr(ino)
    }

    fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        open: bool,
    ) -> Result<FileAttr> {
        let rel = self.child(parent, name)?;
        let abs = self.abs(&rel);
        let existed = fs::symlink_metadata(&abs).is_ok();
        if existed && flags & libc_o_excl() != 0 {
            return Err(Errno::EEXIST);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(mode & 0o7777)
            .open(&abs)
            .map_err(errno)?;
        if !existed {
            self.record(NameChange::Created {
                parent,
                name: name.to_os_string(),
            });
        }
        let ino = self.ino_for(rel, FileType::RegularFile);
        let node = self.node_mut(ino)?;
        node.file = Some(file);
        if open {
            node.open_handles += 1;
        }
        if existed && flags & libc_o_trunc() != 0 {
            self.push(ino, DataOp::SetLen(0))?;
        }
        if !open {
            self.close_if_idle(ino);
        }
        self.attr(ino)
    }

    fn mkdir(&mut self, parent: u64, name: &OsStr, mode: u32) -> Result<FileAttr> {
        let rel = self.child(parent, name)?;
        fs::DirBuilder::new()
            .mode(mode & 0o7777)
            .create(self.abs(&rel))
            .map_err(errno)?;
        self.record(NameChange::Created {
            parent,
            name: name.to_os_string(),
        });
        let ino = self.ino_for(rel, FileType::Directory);
        self.attr(ino)
    }

    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<()> {
        let rel = self.child(parent, name)?;
        let abs = self.abs(&rel);
        let meta = fs::symlink_metadata(&abs).map_err(errno)?;
        match (dir, meta.is_dir()) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            (true, true) => {
                if fs::read_dir(&abs).map_err(errno)?.next().is_some() {
                    return Err(Errno::ENOTEMPTY);
                }
            }
            (false, false) => {}
        }
        let trash = self.move_to_trash(&rel)?;
        self.record(NameChange::Removed {
            parent,
            name: name.to_os_string(),
            trash,
        });
        Ok(())
    }

    fn rename(
        &mut self,
        from_parent: u64,
        from_name: &OsStr,
        to_parent: u64,
        to_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<()> {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return Err(Errno::EINVAL);
        }
        let from = self.child(from_parent, from_name)?;
        let to = self.child(to_parent, to_name)?;
        let from_meta = fs::symlink_metadata(self.abs(&from)).map_err(errno)?;
        if from == to {
            return Ok(());
        }
        if to.starts_with(&from) {
            return Err(Errno::EINVAL);
        }
        let replaced = match fs::symlink_metadata(self.abs(&to)) {
            Err(_) => None,
            Ok(_) if flags.contains(RenameFlags::RENAME_NOREPLACE) => return Err(Errno::EEXIST),
            Ok(to_meta) => {
                match (from_meta.is_dir(), to_meta.is_dir()) {
                    (true, false) => return Err(Errno::ENOTDIR),
                    (false, true) => return Err(Errno::EISDIR),
                    (true, true) => {
                        if fs::read_dir(self.abs(&to)).map_err(errno)?.next().is_some() {
                            return Err(Errno::ENOTEMPTY);
                        }
                    }
                    (false, false) => {}
                }
                Some(self.move_to_trash(&to)?)
            }
        };
        if let Err(e) = fs::rename(self.abs(&from), self.abs(&to)) {
            if let Some(trash) = &replaced {
                // Put the target back: the rename did not happen.
                let _ = fs::rename(self.abs(trash), self.abs(&to));
                self.move_names(trash, &to);
            }
            return Err(errno(e));
        }
        self.move_names(&from, &to);
        self.record(NameChange::Renamed {
            from_parent,
            from_name: from_name.to_os_string(),
            to_parent,
            to_name: to_name.to_os_string(),
            replaced,
        });
        Ok(())
    }

    fn readdir(&mut self, ino: u64) -> Result<Vec<(u64, FileType, OsString)>> {
        let dir = self.node(ino)?;
        if dir.kind != FileType::Directory {
            return Err(Errno::ENOTDIR);
        }
        let rel = dir.path.clone();
        let mut names = Vec::new();
        for entry in fs::read_dir(self.abs(&rel)).map_err(errno)? {
            let entry = entry.map_err(errno)?;
            let name = entry.file_name();
            if ino == INodeNo::ROOT.0 && name == TRASH {
                continue;
            }
            let kind = entry
                .file_type()
                .ok()
                .and_then(FileType::from_std)
                .unwrap_or(FileType::RegularFile);
            names.push((name, kind));
        }
        names.sort_by(|a, b| a.0.cmp(&b.0));
        let mut entries = vec![
            (ino, FileType::Directory, OsString::from(".")),
            (ino, FileType::Directory, OsString::from("..")),
        ];
        for (name, kind) in names {
            let child = self.ino_for(rel.join(&name), kind);
            entries.push((child, kind, name));
        }
        Ok(entries)
    }

    /// Every unsynced change made durable (an orderly shutdown).
    fn sync_everything(&mut self) -> Result<()> {
        let inos: Vec<u64> = self.nodes.keys().copied().collect();
        for ino in inos {
            self.sync_file(ino)?;
        }
        self.commit_all();
        Ok(())
    }

    /// The power cut: see the module doc.
    fn cut(&mut self, seed: u64, keep_share: f64) -> CutReport {
        let mut rng = fastrand::Rng::with_seed(seed);
        let keep_share = keep_share.clamp(0.0, 1.0);
        let mut keep = move || keep_share > 0.0 && rng.f64() < keep_share;
        let mut report = CutReport::default();
        let mut inos: Vec<u64> = self.nodes.keys().copied().collect();
        // Files in the order they were first seen, not the map's.
        inos.sort_unstable();
        for ino in inos {
            let Some(node) = self.nodes.get_mut(&ino) else {
                continue;
            };
            if node.pending.is_empty() {
                continue;
            }
            report.files_unsynced += 1;
            let pending = std::mem::take(&mut node.pending);
            for op in pending {
                match op {
                    DataOp::SetLen(len) => match keep() {
                        true => {
                            report.writes_kept += 1;
                            if let Some(file) = &node.file {
                                let _ = file.set_len(len);
                            }
                        }
                        false => report.writes_dropped += 1,
                    },
                    DataOp::Write { offset, data } => {
                        let mut at = offset;
                        let end = offset + data.len() as u64;
                        while at < end {
                            let piece_end = ((at / PIECE + 1) * PIECE).min(end);
                            let piece =
                                &data[(at - offset) as usize..(piece_end - offset) as usize];
                            match keep() {
                                true => {
                                    report.writes_kept += 1;
                                    report.bytes_kept += piece.len() as u64;
                                    if let Some(file) = &node.file {
                                        let _ = file.write_all_at(piece, at);
                                    }
                                }
                                false => {
                                    report.writes_dropped += 1;
                                    report.bytes_dropped += piece.len() as u64;
                                }
                            }
                            at = piece_end;
                        }
                    }
                }
            }
        }
        // Name changes survive in order, as a journal replays: a prefix.
        let journal = std::mem::take(&mut self.journal);
        let mut kept = 0;
        while kept < journal.len() && keep() {
            kept += 1;
        }
        report.names_kept = kept as u64;
        let mut journal = journal.into_iter();
        for entry in journal.by_ref().take(kept) {
            self.forget_trash(&entry.change);
        }
        let undone: Vec<Journaled> = journal.collect();
        for entry in undone.into_iter().rev() {
            report.names_undone += 1;
            if self.undo(&entry.change).is_err() {
                report.undo_skipped += 1;
            }
        }
        for node in self.nodes.values_mut() {
            node.file = None;
        }
        report
    }

    fn undo(&mut self, change: &NameChange) -> Result<()> {
        match change {
            NameChange::Created { parent, name } => {
                let rel = self.node(*parent)?.path.join(name);
                let abs = self.abs(&rel);
                let meta = fs::symlink_metadata(&abs).map_err(errno)?;
                match meta.is_dir() {
                    true => fs::remove_dir_all(&abs),
                    false => fs::remove_file(&abs),
                }
                .map_err(errno)?;
                self.drop_names(&rel);
            }
            NameChange::Removed {
                parent,
                name,
                trash,
            } => {
                let rel = self.node(*parent)?.path.join(name);
                fs::rename(self.abs(trash), self.abs(&rel)).map_err(errno)?;
                self.move_names(trash, &rel);
            }
            NameChange::Renamed {
                from_parent,
                from_name,
                to_parent,
                to_name,
                replaced,
            } => {
                let from = self.node(*from_parent)?.path.join(from_name);
                let to = self.node(*to_parent)?.path.join(to_name);
                fs::rename(self.abs(&to), self.abs(&from)).map_err(errno)?;
                self.move_names(&to, &from);
                if let Some(trash) = replaced {
                    fs::rename(self.abs(trash), self.abs(&to)).map_err(errno)?;
                    self.move_names(trash, &to);
                }
            }
        }
        Ok(())
    }
}

fn libc_o_excl() -> i32 {
    nix::fcntl::OFlag::O_EXCL.bits()
}

fn libc_o_trunc() -> i32 {
    nix::fcntl::OFlag::O_TRUNC.bits()
}

fn read_full_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => break,
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The FUSE side: each request locks the state and works on it.
struct PowerCutFs {
    state: Arc<Mutex<State>>,
}

impl PowerCutFs {
    fn state(&self) -> Result<MutexGuard<'_, State>> {
        // A panic in one request leaves the state as consistent as any
        // other failed request would.
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.frozen {
            true => Err(Errno::EIO),
            false => Ok(state),
        }
    }
}

impl Filesystem for PowerCutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.state().and_then(|mut s| s.lookup(parent.0, name)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().and_then(|s| s.attr(ino.0)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = self.state().and_then(|mut s| {
            let abs = s.abs(&s.node(ino.0)?.path);
            if let Some(mode) = mode {
                fs::set_permissions(&abs, fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(errno)?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::lchown(&abs, uid, gid).map_err(errno)?;
            }
            if atime.is_some() || mtime.is_some() {
                let at = |t: TimeOrNow| match t {
                    TimeOrNow::SpecificTime(t) => t,
                    TimeOrNow::Now => SystemTime::now(),
                };
                let mut times = fs::FileTimes::new();
                if let Some(t) = atime {
                    times = times.set_accessed(at(t));
                }
                if let Some(t) = mtime {
                    times = times.set_modified(at(t));
                }
                File::open(&abs)
                    .and_then(|f| f.set_times(times))
                    .map_err(errno)?;
            }
            if let Some(size) = size {
                s.push(ino.0, DataOp::SetLen(size))?;
            }
            s.attr(ino.0)
        });
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & nix::sys::stat::SFlag::S_IFMT.bits() != nix::sys::stat::SFlag::S_IFREG.bits() {
            reply.error(Errno::EPERM);
            return;
        }
        let exclusive = libc_o_excl();
        match self
            .state()
            .and_then(|mut s| s.create(parent.0, name, mode & !umask, exclusive, false))
        {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match self
            .state()
            .and_then(|mut s| s.mkdir(parent.0, name, mode & !umask))
        {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .state()
            .and_then(|mut s| s.remove(parent.0, name, false))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .state()
            .and_then(|mut s| s.remove(parent.0, name, true))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self
            .state()
            .and_then(|mut s| s.rename(parent.0, name, newparent.0, newname, flags))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let result = self.state().and_then(|mut s| {
            s.open_backing(ino.0)?;
            s.node_mut(ino.0)?.open_handles += 1;
            if flags.0 & libc_o_trunc() != 0 {
                s.push(ino.0, DataOp::SetLen(0))?;
            }
            Ok(())
        });
        match result {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self
            .state()
            .and_then(|mut s| s.read(ino.0, offset, size as usize))
        {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let op = DataOp::Write {
            offset,
            data: data.to_vec(),
        };
        match self.state().and_then(|mut s| s.push(ino.0, op)) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) promises nothing about durability.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Ok(mut s) = self.state() {
            if let Ok(node) = s.node_mut(ino.0) {
                node.open_handles = node.open_handles.saturating_sub(1);
            }
            s.close_if_idle(ino.0);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.state().and_then(|mut s| s.sync_file(ino.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.state().and_then(|mut s| s.readdir(ino.0)) {
            Ok(entries) => {
                for (i, (child, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(*child), i as u64 + 1, *kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.state() {
            Ok(mut s) => {
                s.sync_dir(ino.0);
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let result = self.state().and_then(|s| {
            nix::sys::statvfs::statvfs(&s.backing).map_err(|e| Errno::from_i32(e as i32))
        });
        match result {
            Ok(v) => reply.statfs(
                v.blocks(),
                v.blocks_free(),
                v.blocks_available(),
                v.files(),
                v.files_free(),
                v.block_size() as u32,
                v.name_max() as u32,
                v.fragment_size() as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self
            .state()
            .and_then(|mut s| s.create(parent.0, name, mode & !umask, flags, true))
        {
            Ok(attr) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }
}

/// Whether this machine lets this process mount the filesystem: root (the
/// mount is made with mount(2), without the setuid `fusermount`) and a
/// /dev/fuse that opens. The error says what is missing.
pub fn can_mount() -> std::result::Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("mounting FUSE without fusermount needs root".into());
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map(|_| ())
        .map_err(|e| format!("/dev/fuse cannot be opened ({e}): no FUSE on this machine"))
}

/// A mounted powercut filesystem. Dropping it unmounts in order (as
/// [`Mounted::unmount`]): nothing is lost then.
pub struct Mounted {
    session: Option<BackgroundSession>,
    state: Arc<Mutex<State>>,
    mountpoint: PathBuf,
}

impl Mounted {
    /// Mounts `backing` at `mountpoint` (an existing directory). Needs root
    /// (or the right to mount FUSE) and /dev/fuse.
    pub fn mount(backing: &Path, mountpoint: &Path, options: &Options) -> io::Result<Mounted> {
        let backing = backing.canonicalize()?;
        let trash = backing.join(TRASH);
        // Left by a server that was killed: removals it never undid.
        if trash.exists() {
            fs::remove_dir_all(&trash)?;
        }
        fs::create_dir(&trash)?;
        let state = Arc::new(Mutex::new(State::new(backing.clone(), options.metadata)));
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName(format!("powercut:{}", backing.display())),
            MountOption::Subtype("powercut".into()),
        ];
        config.n_threads = Some(options.threads.max(1));
        let fs = PowerCutFs {
            state: Arc::clone(&state),
        };
        let session = fuser::spawn_mount(fs, mountpoint, &config)?;
        Ok(Mounted {
            session: Some(session),
            state,
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// (files, bytes) written and not yet synced.
    pub fn unsynced(&self) -> (u64, u64) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut files = 0;
        let mut bytes = 0;
        for node in state.nodes.values().filter(|n| !n.pending.is_empty()) {
            files += 1;
            for op in &node.pending {
                if let DataOp::Write { data, .. } = op {
                    bytes += data.len() as u64;
                }
            }
        }
        (files, bytes)
    }

    /// Cuts the power: what was not durable is lost (all of it with a
    /// `keep_share` of 0; otherwise that share of it survives, chosen by
    /// `seed`), then the filesystem unmounts. The processes using it should
    /// be dead already: their later requests fail.
    pub fn cut(mut self, seed: u64, keep_share: f64) -> io::Result<CutReport> {
        let report = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.frozen = true;
            state.cut(seed, keep_share)
        };
        self.end()?;
        Ok(report)
    }

    /// Unmounts in order: everything written is kept, as after a clean
    /// shutdown.
    pub fn unmount(mut self) -> io::Result<()> {
        self.sync_and_freeze()?;
        self.end()
    }

    fn sync_and_freeze(&self) -> io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.frozen {
            return Ok(());
        }
        state.frozen = true;
        let synced = state.sync_everything();
        for node in state.nodes.values_mut() {
            node.file = None;
        }
        synced.map_err(|e| io::Error::from_raw_os_error(i32::from(e)))
    }

    fn end(&mut self) -> io::Result<()> {
        let trash = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.backing.join(TRASH)
        };
        if let Some(session) = self.session.take() {
            session.umount_and_join()?;
        }
        match fs::remove_dir_all(&trash) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.session.is_some() {
            let _ = self.sync_and_freeze();
            let _ = self.end();
        }
    }
}
