//! Queue depth per partner: how many deliveries wait in the schedule index.
//!
//! On-call reads it from `GET /v1/partners`, so it must not cost a scan of
//! a backlog that may hold millions. The writer moves it by exactly the
//! entries each group commit adds and settles, and writes each changed
//! partner's new depth into that same commit (`mdepth/` + partner), so the
//! depth on disk always matches the schedule it counts and a restart reads
//! it instead of scanning: with 10,000,000 events queued that scan read
//! every chunk's member list, 3 s with the data in the page cache and 10 s
//! from a cold disk before the first delivery. A new store (no `mdepth-kept`
//! key yet), or one whose depth records do not read, is counted once by
//! that scan, before the writer starts, and the counts are written then.

use std::collections::HashMap;
use std::sync::Mutex;

/// The depth of every partner with deliveries in the index.
#[derive(Default)]
pub(super) struct Depth(Mutex<HashMap<String, u64>>);

impl Depth {
    pub(crate) fn new(counted: HashMap<String, u64>) -> Depth {
        Depth(Mutex::new(counted))
    }

    pub(crate) fn of(&self, partner: &str) -> u64 {
        self.lock().get(partner).copied().unwrap_or(0)
    }

    /// Every changed partner's depth once `moves` are applied: what the
    /// group commit holding them writes, and then [`Depth::set`]s.
    pub(crate) fn after(&self, moves: Moves) -> Vec<(String, u64)> {
        let depth = self.lock();
        moves
            .0
            .into_iter()
            .filter(|(_, by)| *by != 0)
            .map(|(partner, by)| {
                let now = depth.get(&partner).copied().unwrap_or(0);
                (partner, now.saturating_add_signed(by))
            })
            .collect()
    }

    /// Takes the depths a durable group commit wrote.
    pub(crate) fn set(&self, depths: Vec<(String, u64)>) {
        let mut depth = self.lock();
        for (partner, d) in depths {
            depth.insert(partner, d);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        crate::sync::lock(&self.0)
    }
}

/// The changes of one group commit, applied only if it is made durable.
#[derive(Default)]
pub(super) struct Moves(HashMap<String, i64>);

impl Moves {
    /// `partner`'s index gained (positive) or lost (negative) `by` deliveries.
    pub(crate) fn add(&mut self, partner: &str, by: i64) {
        match self.0.get_mut(partner) {
            Some(n) => *n += by,
            None => {
                self.0.insert(partner.to_string(), by);
            }
        }
    }
}

/// The depth record's value.
pub(super) fn encode(depth: u64) -> [u8; 8] {
    depth.to_be_bytes()
}

/// Every partner's depth as the last commit wrote it; `None` for a new store,
/// which keeps none yet. An unreadable record is an error naming it.
pub(super) fn read(
    db: &sled::Db,
) -> Result<Option<HashMap<String, u64>>, crate::store::StoreError> {
    use crate::store::{keys, StoreError};
    if db.get(keys::DEPTH_KEPT)?.is_none() {
        return Ok(None);
    }
    let mut depths = HashMap::new();
    for item in db.scan_prefix(keys::DEPTH_PREFIX) {
        let (key, value) = item?;
        let depth = <[u8; 8]>::try_from(value.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::corrupt(&key, format!("{} bytes, not 8", value.len())))?;
        let partner = String::from_utf8_lossy(&key[keys::DEPTH_PREFIX.len()..]).into_owned();
        depths.insert(partner, depth);
    }
    Ok(Some(depths))
}

/// Writes counted depths (a new store, or one that kept a depth it cannot
/// read) and marks them kept. Every stored depth is replaced: one
/// left unreadable for a partner with nothing scheduled would otherwise
/// fail the next open's read again and force the same scan.
pub(super) fn write_counted(
    db: &sled::Db,
    counted: &HashMap<String, u64>,
) -> Result<(), crate::store::StoreError> {
    use crate::store::keys;
    let mut batch = sled::Batch::default();
    for item in db.scan_prefix(keys::DEPTH_PREFIX) {
        let (key, _) = item?;
        batch.remove(key);
    }
    for (partner, depth) in counted {
        batch.insert(keys::depth(partner), &encode(*depth));
    }
    batch.insert(keys::DEPTH_KEPT, &[]);
    db.apply_batch(batch)?;
    db.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_give_each_partners_new_depth_never_below_zero() {
        let depth = Depth::new(HashMap::from([("acme".to_string(), 2)]));
        let mut moves = Moves::default();
        moves.add("acme", 3);
        moves.add("acme", -1);
        moves.add("globex", 1);
        let mut after = depth.after(moves);
        after.sort();
        assert_eq!(after, [("acme".to_string(), 4), ("globex".to_string(), 1)]);
        assert_eq!(depth.of("acme"), 2, "unchanged until the commit is durable");
        depth.set(after);
        assert_eq!(depth.of("acme"), 4);
        assert_eq!(depth.of("globex"), 1);
        let mut moves = Moves::default();
        moves.add("globex", -5);
        moves.add("initech", 0);
        let after = depth.after(moves);
        assert_eq!(
            after,
            [("globex".to_string(), 0)],
            "no record for no change"
        );
        depth.set(after);
        assert_eq!(depth.of("globex"), 0);
        assert_eq!(depth.of("initech"), 0);
    }
}
