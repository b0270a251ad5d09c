//! The model, checked through a real mount: what was synced survives a cut,
//! what was not is gone, and reads before the cut see everything written.
//! Needs root and /dev/fuse; skips with a message where they are missing.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use powercut_fs::{MetadataModel, Mounted, Options};

/// Backing dir and mount point, in one temp dir.
struct Dirs {
    _root: tempfile::TempDir,
    backing: std::path::PathBuf,
    mount: std::path::PathBuf,
}

fn dirs() -> Dirs {
    let root = tempfile::tempdir().expect("temp dir");
    let backing = root.path().join("backing");
    let mount = root.path().join("mount");
    fs::create_dir(&backing).expect("backing dir");
    fs::create_dir(&mount).expect("mount point");
    Dirs {
        _root: root,
        backing,
        mount,
    }
}

/// Mounts, or says loudly why this machine cannot.
fn mount(dirs: &Dirs, metadata: MetadataModel) -> Option<Mounted> {
    if let Err(why) = powercut_fs::can_mount() {
        eprintln!("SKIPPED: the power-cut filesystem cannot be mounted here: {why}");
        return None;
    }
    let options = Options {
        metadata,
        ..Options::default()
    };
    match Mounted::mount(&dirs.backing, &dirs.mount, &options) {
        Ok(mounted) => Some(mounted),
        Err(e) => panic!("cannot mount the power-cut filesystem: {e}"),
    }
}

fn sync_dir(dir: &Path) {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .expect("fsync of a directory");
}

fn read(path: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
}

#[test]
fn a_cut_drops_unsynced_writes_and_keeps_synced_ones() {
    let dirs = dirs();
    let Some(fs1) = mount(&dirs, MetadataModel::Strict) else {
        return;
    };
    let log = dirs.mount.join("log");
    let mut file = File::create(&log).expect("create");
    sync_dir(&dirs.mount);
    file.write_all(b"synced-").expect("write");
    file.sync_data().expect("fdatasync");
    file.write_all(b"lost").expect("write");
    // Overwrites inside the synced part and beyond the end, unsynced.
    file.write_all_at(b"S", 0).expect("write");
    file.write_all_at(b"!", 20).expect("write");
    let mut expected = b"Synced-lost".to_vec();
    expected.resize(20, 0);
    expected.push(b'!');
    assert_eq!(read(&log), expected, "reads see every write, synced or not");
    assert_eq!(fs::metadata(&log).expect("stat").len(), 21);
    let (files, bytes) = fs1.unsynced();
    assert_eq!((files, bytes), (1, 6));
    drop(file);

    let report = fs1.cut(1, 0.0).expect("cut");
    assert_eq!(report.files_unsynced, 1);
    assert_eq!(report.bytes_dropped, 6);
    assert_eq!(report.bytes_kept, 0);

    let fs2 = mount(&dirs, MetadataModel::Strict).expect("mounts again");
    assert_eq!(read(&log), b"synced-", "only the synced write survived");
    fs2.unmount().expect("unmount");
}

#[test]
fn a_cut_drops_an_unsynced_truncation() {
    let dirs = dirs();
    let Some(fs1) = mount(&dirs, MetadataModel::Strict) else {
        return;
    };
    let path = dirs.mount.join("state");
    let mut file = File::create(&path).expect("create");
    sync_dir(&dirs.mount);
    file.write_all(b"0123456789").expect("write");
    file.sync_all().expect("fsync");
    file.set_len(3).expect("truncate");
    file.write_all_at(b"x", 5).expect("write");
    assert_eq!(read(&path), b"012\0\0x");
    drop(file);
    // Truncating through open(O_TRUNC), unsynced, too.
    let mut again = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .expect("open with O_TRUNC");
    again.write_all(b"new").expect("write");
    assert_eq!(read(&path), b"new");
    drop(again);
    fs1.cut(1, 0.0).expect("cut");

    let fs2 = mount(&dirs, MetadataModel::Strict).expect("mounts again");
    assert_eq!(read(&path), b"0123456789");
    fs2.unmount().expect("unmount");
}

#[test]
fn names_are_durable_only_once_their_directory_is_fsynced() {
    let dirs = dirs();
    let Some(fs1) = mount(&dirs, MetadataModel::Strict) else {
        return;
    };
    let m = &dirs.mount;
    // Durable: written, synced, its directory synced.
    fs::write(m.join("kept"), b"old").expect("write");
    File::open(m.join("kept"))
        .and_then(|f| f.sync_all())
        .expect("fsync");
    fs::create_dir(m.join("sub")).expect("mkdir");
    sync_dir(m);
    fs::write(m.join("sub/inner"), b"inner").expect("write");
    File::open(m.join("sub/inner"))
        .and_then(|f| f.sync_all())
        .expect("fsync");
    sync_dir(&m.join("sub"));

    // Not durable: the file is synced but its directory is not.
    let mut orphan = File::create(m.join("orphan")).expect("create");
    orphan.write_all(b"data").expect("write");
    orphan.sync_all().expect("fsync");
    drop(orphan);
    // Replaced by a rename, unsynced: the old content comes back.
    fs::write(m.join("kept.tmp"), b"new").expect("write");
    File::open(m.join("kept.tmp"))
        .and_then(|f| f.sync_all())
        .expect("fsync");
    fs::rename(m.join("kept.tmp"), m.join("kept")).expect("rename");
    // Removed, unsynced: it comes back.
    fs::remove_file(m.join("sub/inner")).expect("unlink");
    fs::create_dir(m.join("newdir")).expect("mkdir");
    fs::write(m.join("newdir/x"), b"x").expect("write");
    sync_dir(&m.join("newdir"));
    assert_eq!(read(&m.join("kept")), b"new");
    assert!(!m.join("sub/inner").exists());

    let report = fs1.cut(1, 0.0).expect("cut");
    // newdir/x was made durable (its directory synced), but not newdir.
    assert_eq!(report.names_undone, 5, "{report}");

    let fs2 = mount(&dirs, MetadataModel::Strict).expect("mounts again");
    assert!(
        !m.join("orphan").exists(),
        "a name whose directory was not synced is lost"
    );
    assert!(!m.join("kept.tmp").exists());
    assert_eq!(
        read(&m.join("kept")),
        b"old",
        "the unsynced rename is undone"
    );
    assert_eq!(
        read(&m.join("sub/inner")),
        b"inner",
        "the unsynced unlink is undone"
    );
    assert!(
        !m.join("newdir").exists(),
        "a directory never made durable is gone with its contents"
    );
    let mut names: Vec<_> = fs::read_dir(m)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["kept", "sub"], "the trash stays hidden");
    fs2.unmount().expect("unmount");
    assert!(
        !dirs.backing.join(".powercut-trash").exists(),
        "nothing of the layer is left in the backing dir"
    );
}

#[test]
fn under_the_ordered_model_any_fsync_makes_earlier_names_durable() {
    let dirs = dirs();
    let Some(fs1) = mount(&dirs, MetadataModel::Ordered) else {
        return;
    };
    let mut file = File::create(dirs.mount.join("f")).expect("create");
    file.write_all(b"f").expect("write");
    file.sync_data().expect("fdatasync");
    drop(file);
    fs::write(dirs.mount.join("later"), b"later").expect("write");
    fs1.cut(1, 0.0).expect("cut");

    let fs2 = mount(&dirs, MetadataModel::Ordered).expect("mounts again");
    assert_eq!(read(&dirs.mount.join("f")), b"f");
    assert!(!dirs.mount.join("later").exists());
    fs2.unmount().expect("unmount");
}

#[test]
fn a_torn_cut_keeps_a_seeded_share_and_an_orderly_unmount_keeps_everything() {
    let dirs = dirs();
    let Some(fs1) = mount(&dirs, MetadataModel::Strict) else {
        return;
    };
    let path = dirs.mount.join("big");
    File::create(&path).expect("create");
    sync_dir(&dirs.mount);
    let data: Vec<u8> = (0..64 * 4096u32).map(|i| (i / 4096) as u8 + 1).collect();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(&data))
        .expect("write");
    let report = fs1.cut(7, 0.5).expect("cut");
    assert_eq!(report.writes_kept + report.writes_dropped, 64, "{report}");
    assert!(
        report.writes_kept > 0 && report.writes_dropped > 0,
        "{report}"
    );

    let fs2 = mount(&dirs, MetadataModel::Strict).expect("mounts again");
    let after = read(&path);
    // Each 4 KiB piece is there whole or not at all (zeros).
    let mut kept = 0;
    for (i, piece) in after.chunks(4096).enumerate() {
        let whole = piece.iter().all(|b| *b == i as u8 + 1);
        let absent = piece.iter().all(|b| *b == 0);
        assert!(whole || absent, "piece {i} is torn inside");
        kept += u64::from(whole);
    }
    assert!(kept <= report.writes_kept);
    // Unsynced, then an orderly unmount: all of it stays.
    fs::write(dirs.mount.join("clean"), b"kept").expect("write");
    fs2.unmount().expect("unmount");
    assert_eq!(read(&dirs.backing.join("clean")), b"kept");
}

/// The command line: `mounted` once serving, SIGUSR1 cuts and exits.
#[test]
fn the_command_cuts_on_sigusr1() {
    let dirs = dirs();
    if let Err(why) = powercut_fs::can_mount() {
        eprintln!("SKIPPED: the power-cut filesystem cannot be mounted here: {why}");
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_powercut-fs"))
        .arg("--backing")
        .arg(&dirs.backing)
        .arg("--mount")
        .arg(&dirs.mount)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("powercut-fs starts");
    let mut line = [0u8; 8];
    child
        .stdout
        .as_mut()
        .expect("stdout")
        .read_exact(&mut line)
        .expect("it says it is mounted");
    assert_eq!(&line, b"mounted\n");
    fs::write(dirs.mount.join("unsynced"), b"gone").expect("write");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .expect("signal");
    let out = child.wait_with_output().expect("it exits");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("1 name changes undone"), "{said}");
    assert!(!dirs.backing.join("unsynced").exists());
}
