//! The store's format version, checked at every open.
//!
//! Every data dir this herald opens is marked with [`VERSION`] under
//! [`keys::FORMAT`]. A data dir marked with another version was written by
//! a herald whose layouts this one does not know: it is refused by name
//! rather than read wrong. A store without the mark is new, or was written
//! by herald 0.1.0 (which kept no mark and wrote only format 1's layouts),
//! and is marked; unless it holds a layout only a build before 0.1.0 wrote,
//! which this herald no longer reads: then it is refused, naming what it
//! holds, and nothing is written to it.

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
            let signs = pre_release(db)
                .map_err(|e| format!("cannot read the store to tell its format: {e}"))?;
            if !signs.is_empty() {
                return Err(format!(
                    "it was written by a pre-release build of herald (it has no format mark and holds {}); \
                     this herald reads store format {VERSION}: run the build that wrote it, \
                     or move the directory aside to start empty",
                    signs.join(", ")
                ));
            }
            db.insert(keys::FORMAT, &[VERSION])
                .and_then(|_| db.flush())
                .map_err(|e| format!("cannot mark the store's format: {e}"))?;
            Ok(())
        }
    }
}

/// What an unmarked store holds that only a build before 0.1.0 wrote:
/// empty for a new store and for one herald 0.1.0 wrote. Read once, before
/// the first mark, so the scan of events and links costs one open.
fn pre_release(db: &sled::Db) -> sled::Result<Vec<&'static str>> {
    let mut signs = Vec::new();
    if db.first()?.is_none() {
        return Ok(signs);
    }
    // 0.1.0 wrote event records as postcard; JSON ones start with `{`.
    // Pages came after postcard, so only `e` and `r` can hold them.
    let mut json_events = false;
    for prefix in [keys::EVENT, keys::REWRITTEN] {
        for item in db.scan_prefix([prefix]) {
            let (_, value) = item?;
            if value.first() == Some(&b'{') {
                json_events = true;
                break;
            }
        }
    }
    if json_events {
        signs.push("event records in JSON");
    }
    let mut links = false;
    let mut own_credentials = false;
    for item in db.scan_prefix([keys::LINK]) {
        let (_, value) = item?;
        links = true;
        // A link before grants sealed its own credentials; a value that
        // is not JSON is left for the reader to report with its key.
        let own = serde_json::from_slice::<serde_json::Value>(&value)
            .is_ok_and(|v| v.get("sealed_credentials").is_some_and(|c| !c.is_null()));
        if own {
            own_credentials = true;
            break;
        }
    }
    if own_credentials {
        signs.push("links that hold their own credentials");
    } else if links && db.get(keys::GRANTS_KEPT)?.is_none() {
        signs.push("links not moved onto grants");
    }
    // Every open of 0.1.0 left the marker of kept depths.
    if db.get(keys::DEPTH_KEPT)?.is_none() {
        signs.push("no queue depth records");
    }
    Ok(signs)
}
