//! Whose directory this is: herald opens a data dir only if it is empty or
//! already herald's, so a mistyped `data_dir` never adopts another
//! program's files and never starts an empty store over a herald store
//! whose files went missing.
//!
//! The mark of a herald store is the commit watermark file
//! ([`watermark::FILE_NAME`]): every herald data dir has held it since its
//! first open. An empty (or new) directory is claimed by creating that file
//! and syncing the directory *before* sled writes anything, so no crash or
//! power cut can leave sled's files without it. A directory with anything
//! else in it and no watermark file is refused with what was found.

use std::fs::{File, OpenOptions};
use std::path::Path;

use super::watermark;

/// How many of a foreign directory's entries the refusal names.
const NAMES_SHOWN: usize = 5;

/// Makes sure `dir` exists and is herald's, claiming it if it is empty.
/// The error says what was found, for the operator.
pub(crate) fn claim(dir: &Path) -> Result<(), String> {
    if dir.exists() && !dir.is_dir() {
        return Err("it exists but is not a directory".into());
    }
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create it: {e}"))?;
        // The new directory's own entry, in its parent.
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| format!("cannot list it: {e}"))? {
        let entry = entry.map_err(|e| format!("cannot list it: {e}"))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    if names.iter().any(|n| n == watermark::FILE_NAME) {
        return Ok(());
    }
    if names.is_empty() {
        let marker = dir.join(watermark::FILE_NAME);
        // An empty watermark file reads as "no commit yet".
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("cannot create {}: {e}", marker.display()))?;
        return sync_dir(dir);
    }
    names.sort();
    let shown = names
        .iter()
        .take(NAMES_SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let more = match names.len().saturating_sub(NAMES_SHOWN) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    let what = if names.iter().any(|n| n == "db") && names.iter().any(|n| n == "conf") {
        "a sled database that is not herald's, or a herald store whose marker was deleted"
    } else {
        "files that are not herald's"
    };
    Err(format!(
        "it holds {what} ({shown}{more}) and no {} file. herald does not adopt a directory \
         it did not create: point server.data_dir at an empty or new directory, or restore \
         {} from a backup if this is herald's store",
        watermark::FILE_NAME,
        watermark::FILE_NAME
    ))
}

/// Makes a directory's entries durable (a new file's name survives a power
/// cut only once its directory is synced).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync directory {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_or_empty_directory_is_claimed_and_then_reopened() {
        let parent = tempfile::tempdir().expect("temp dir");
        let dir = parent.path().join("data");
        claim(&dir).expect("a new directory is claimed");
        assert!(dir.join(watermark::FILE_NAME).exists());
        claim(&dir).expect("herald's own directory opens again");
    }

    #[test]
    fn a_foreign_directory_is_refused_naming_what_it_holds() {
        let dir = tempfile::tempdir().expect("temp dir");
        for name in ["photos", "a.txt", "b.txt", "c.txt", "d.txt", "e.txt"] {
            std::fs::write(dir.path().join(name), b"x").expect("write");
        }
        let message = claim(dir.path()).expect_err("refused");
        assert!(message.contains("files that are not herald's"), "{message}");
        assert!(
            message.contains("(a.txt, b.txt, c.txt, d.txt, e.txt and 1 more)"),
            "{message}"
        );
        assert!(
            !dir.path().join(watermark::FILE_NAME).exists(),
            "never adopted"
        );
    }
}
