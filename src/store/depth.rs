//! Queue depth per partner: how many deliveries wait in the schedule index.
//!
//! On-call reads it from `GET /v1/partners`, so it must not cost a scan of
//! a backlog that may hold millions. It is counted once when the store
//! opens (before the writer starts, so nothing moves under the count); from
//! then on the writer moves it by exactly the entries each group commit
//! adds and settles, once that commit is durable.

use std::collections::HashMap;
use std::sync::Mutex;

/// The depth of every partner with deliveries in the index.
#[derive(Default)]
pub(super) struct Depth(Mutex<HashMap<String, u64>>);

impl Depth {
    pub fn new(counted: HashMap<String, u64>) -> Depth {
        Depth(Mutex::new(counted))
    }

    pub fn of(&self, partner: &str) -> u64 {
        self.lock().get(partner).copied().unwrap_or(0)
    }

    /// Applies what one durable group commit changed.
    pub fn apply(&self, moves: Moves) {
        if moves.0.is_empty() {
            return;
        }
        let mut depth = self.lock();
        for (partner, by) in moves.0 {
            let d = depth.entry(partner).or_default();
            *d = d.saturating_add_signed(by);
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
    pub fn add(&mut self, partner: &str, by: i64) {
        match self.0.get_mut(partner) {
            Some(n) => *n += by,
            None => {
                self.0.insert(partner.to_string(), by);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_apply_per_partner_and_never_below_zero() {
        let depth = Depth::new(HashMap::from([("acme".to_string(), 2)]));
        let mut moves = Moves::default();
        moves.add("acme", 3);
        moves.add("acme", -1);
        moves.add("globex", 1);
        depth.apply(moves);
        assert_eq!(depth.of("acme"), 4);
        assert_eq!(depth.of("globex"), 1);
        let mut moves = Moves::default();
        moves.add("globex", -5);
        depth.apply(moves);
        assert_eq!(depth.of("globex"), 0);
        assert_eq!(depth.of("initech"), 0);
    }
}
