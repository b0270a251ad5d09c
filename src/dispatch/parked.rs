//! Parked routes: the devices a partner said are gone for good.
//!
//! A 410 (or a platform's "integration deleted") means sending again is
//! pointless and, for some platforms, unwelcome. The route is parked in the
//! store with the reason, and every later delivery on it becomes a dead
//! letter naming that reason without being sent, so on-call sees each one
//! instead of events vanishing. The lane keeps the partner's parked routes
//! in memory (few, and read on every send); the store holds the truth.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::model::ParkedRoute;
use crate::store::{Store, StoreError};

#[derive(Default)]
pub struct Parked {
    routes: Mutex<HashMap<String, ParkedRoute>>,
}

impl Parked {
    /// What the store holds for `partner`.
    pub(crate) fn load(store: &Store, partner: &str) -> Result<Parked, StoreError> {
        let routes = store
            .parked(partner)?
            .into_iter()
            .map(|r| (r.device_id.clone(), r))
            .collect();
        Ok(Parked {
            routes: Mutex::new(routes),
        })
    }

    pub(crate) fn get(&self, device_id: &str) -> Option<ParkedRoute> {
        self.lock().get(device_id).cloned()
    }

    /// Called once the store has the route parked.
    pub(crate) fn insert(&self, route: ParkedRoute) {
        self.lock().insert(route.device_id.clone(), route);
    }

    pub(crate) fn remove(&self, device_id: &str) {
        self.lock().remove(device_id);
    }

    /// Oldest first.
    pub(crate) fn list(&self) -> Vec<ParkedRoute> {
        let mut all: Vec<ParkedRoute> = self.lock().values().cloned().collect();
        all.sort_by(|a, b| (a.parked_ms, &a.device_id).cmp(&(b.parked_ms, &b.device_id)));
        all
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ParkedRoute>> {
        crate::sync::lock(&self.routes)
    }
}
