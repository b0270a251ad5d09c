//! The store's format version, checked at every open.
//!
//! Every data dir this herald opens is marked with [`VERSION`] under
//! [`keys::FORMAT`]. A data dir marked with another version was written by
//! a herald whose layouts this one does not know: it is refused by name
//! rather than read wrong. A store without the mark (new, or written before
//! it was kept) holds only layouts this herald reads, and is marked.

use super::keys;

/// The layouts `docs/store-format.md` describes.
pub(crate) const VERSION: u8 = 1;

/// Checks the mark, or writes it (durably) where there is none.
pub(super) fn check(db: &sled::Db) -> Result<(), String> {
    let mark = db
        .get(keys::FORMAT)
        .map_err(|e| format!("cannot read the store's format: {e}"))?;
    match mark.as_deref() {
        Some([VERSION]) => Ok(()),
        Some([other]) => Err(format!(
            "it holds herald store format {other}, and this herald reads format {VERSION}: \
             run a herald that reads format {other}, or move the directory aside to start empty"
        )),
        Some(bytes) => Err(format!(
            "its format mark is damaged ({} bytes where one is kept); this herald reads format {VERSION}",
            bytes.len()
        )),
        None => {
            db.insert(keys::FORMAT, &[VERSION])
                .and_then(|_| db.flush())
                .map_err(|e| format!("cannot mark the store's format: {e}"))?;
            Ok(())
        }
    }
}
