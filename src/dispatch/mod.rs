//! Delivery: from the schedule index on disk to each partner's endpoint.
//!
//! One [`lane::Lane`] per partner pulls its due work through a bounded
//! [`window::Window`], applies the partner's limits and sends with the
//! shared [`client::Clients`]; [`retry`] decides when a failure is tried
//! again. Shutdown: stop taking work, let sends in flight finish within the
//! grace period, and leave everything else in the index for the next start.

pub(crate) mod alert;
pub(crate) mod breaker;
pub mod client;
pub(crate) mod concurrency;
pub(crate) mod lane;
pub(crate) mod minutes;
pub(crate) mod parked;
pub mod retry;
pub(crate) mod tokens;
pub(crate) mod window;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::config::Config;
use crate::links::Links;
use crate::store::Store;
use lane::Lane;

pub struct Dispatcher {
    lanes: HashMap<String, Arc<Lane>>,
    hold: Arc<Hold>,
    stop: CancellationToken,
    abandon: CancellationToken,
    sends: TaskTracker,
    loops: TaskTracker,
}

impl Dispatcher {
    pub(crate) fn start(
        config: &Config,
        store: Store,
        links: Links,
        clock: Clock,
    ) -> Result<Dispatcher, String> {
        let clients =
            client::Clients::new().map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let stop = CancellationToken::new();
        let abandon = CancellationToken::new();
        let sends = TaskTracker::new();
        let loops = TaskTracker::new();
        let mut lanes = HashMap::new();
        let hold = Arc::new(Hold::default());
        for partner in &config.partners {
            let adapter = adapters::build_adapter(&partner.adapter_kind, &partner.adapter)
                .map_err(|e| format!("partners.{}.{e}", partner.name))?;
            let parked = parked::Parked::load(&store, &partner.name)
                .map_err(|e| format!("cannot read the parked routes of {}: {e}", partner.name))?;
            let lane = Arc::new(Lane::new(
                partner.clone(),
                adapter,
                clients.for_partner(partner.allow_private).clone(),
                store.clone(),
                links.clone(),
                clock.clone(),
                parked,
            ));
            if partner.keep_alive.is_some() {
                loops.spawn(Arc::clone(&lane).keep_alive(stop.clone()));
            }
            metrics::gauge!(crate::telemetry::PARKED_ROUTES, "partner" => partner.name.clone())
                .set(lane.parked.len() as f64);
            // The adaptive limit starts below max_in_flight.
            metrics::gauge!(crate::telemetry::CONCURRENCY_LIMIT, "partner" => partner.name.clone())
                .set(lane.concurrency_limit() as f64);
            let running = Arc::clone(&lane).run(
                stop.clone(),
                abandon.clone(),
                sends.clone(),
                Arc::clone(&hold),
            );
            let name = partner.name.clone();
            loops.spawn(crate::supervise::run_task_or(running, move || {
                crate::supervise::exit(&format!("the lane of partner {name}"))
            }));
            lanes.insert(partner.name.clone(), lane);
        }
        loops.close();
        Ok(Dispatcher {
            lanes,
            hold,
            stop,
            abandon,
            sends,
            loops,
        })
    }

    /// Every lane scans its whole schedule soon (see [`Lane::rescan_soon`]).
    pub(crate) fn rescan_soon(&self) {
        self.lanes.values().for_each(|lane| lane.rescan_soon());
    }

    /// Tells the lanes of freshly durable deliveries that their index
    /// ranges changed (see [`Lane::due_written`]).
    pub(crate) fn due_written(&self, scheduled: &[crate::store::Scheduled]) {
        for s in scheduled {
            match self.lanes.get(&s.partner) {
                Some(lane) => lane.due_written(s.priority),
                None => {
                    tracing::error!(partner = %s.partner, "a delivery for a partner without a lane")
                }
            }
        }
    }

    /// A test hook: while `held`, no lane takes due work (what a stalled
    /// dispatcher looks like from outside: `/readyz` says so once work has
    /// waited `server.stall_after`); sends already under way go on. Not
    /// part of herald's contract; nothing in herald calls it.
    #[doc(hidden)]
    pub fn hold_for_test(&self, held: bool) {
        self.hold.set(held);
    }

    pub fn lane(&self, partner: &str) -> Option<&Arc<Lane>> {
        self.lanes.get(partner)
    }

    pub fn lanes(&self) -> impl Iterator<Item = &Arc<Lane>> {
        self.lanes.values()
    }

    /// Stops taking work and waits up to `grace` for sends in flight. Sends
    /// still running after that are dropped; their deliveries stay
    /// scheduled and go out again after restart.
    pub(crate) async fn shutdown(&self, grace: Duration) {
        self.stop.cancel();
        self.loops.wait().await;
        self.sends.close();
        if tokio::time::timeout(grace, self.sends.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                abandoned = self.sends.len(),
                "sends still in flight after the grace period; they will be retried after restart"
            );
            self.abandon.cancel();
            self.sends.wait().await;
        }
    }
}

/// See [`Dispatcher::hold_for_test`].
#[derive(Default)]
pub struct Hold {
    held: std::sync::atomic::AtomicBool,
    released: tokio::sync::Notify,
}

impl Hold {
    fn set(&self, held: bool) {
        self.held.store(held, std::sync::atomic::Ordering::SeqCst);
        if !held {
            self.released.notify_waiters();
        }
    }

    pub fn is_held(&self) -> bool {
        self.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves once not held.
    pub async fn released(&self) {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if !self.is_held() {
                return;
            }
            released.await;
        }
    }
}
