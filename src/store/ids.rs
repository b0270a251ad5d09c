//! The ids the writer gives out: events, deliveries, dead letters.
//!
//! Only the writer makes ids, so they rise in the order it stores what they
//! name: event pages are keyed by event id and must rise from commit to
//! commit (`event_page::Filling::assign` moves the rare one that does not,
//! after a wall clock stepped back), and delivery ids sorting in order keeps
//! sled's leaves full (vendor/sled/HERALD.md).

use uuid::{ContextV7, Timestamp, Uuid};

/// A UUIDv7 source for one writer thread.
pub(super) struct Ids(ContextV7);

impl Ids {
    pub(super) fn new() -> Ids {
        Ids(ContextV7::new())
    }

    /// A new UUIDv7 stamped `at_ms` (a time herald's clock gave the
    /// request), above every id given before within that millisecond (a
    /// counter in the random bits orders those).
    pub(super) fn at(&self, at_ms: u64) -> Uuid {
        let at = Timestamp::from_unix(&self.0, at_ms / 1_000, ((at_ms % 1_000) * 1_000_000) as u32);
        Uuid::new_v7(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_of_one_millisecond_sort_in_creation_order_and_carry_its_time() {
        let ids = Ids::new();
        let given: Vec<Uuid> = (0..1_000).map(|_| ids.at(1_764_050_400_000)).collect();
        assert!(given.windows(2).all(|w| w[0] < w[1]), "ids out of order");
        let (secs, nanos) = given[999].get_timestamp().expect("v7").to_unix();
        assert_eq!(
            secs * 1_000 + u64::from(nanos) / 1_000_000,
            1_764_050_400_000
        );
        assert!(ids.at(1_764_050_400_001) > given[999]);
    }
}
