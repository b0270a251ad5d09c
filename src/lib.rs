//! herald: a durable multi-platform webhook dispatcher for device events.
//!
//! [`start`] wires the pieces together (store → links → dispatcher → API)
//! and hands back a [`Herald`] whose [`Herald::shutdown`] takes them down in
//! the safe order. The binary and the integration tests both go through here.
//!
//! # Layout
//!
//! - `api`: the HTTP API. `api::guard` runs before every handler (role,
//!   limits, origin); one file per resource: `ingest`, `links`, `admin`,
//!   `replay`, `partners`.
//! - [`store`]: herald's only state and the only code that names sled; every
//!   write goes through its one writer thread (group commit).
//! - [`dispatch`]: one [`dispatch::lane::Lane`] per partner, composing the
//!   window, breaker, adaptive concurrency, rate limit, retries and tokens
//!   around the partner's adapter (the `adapters` crate).
//! - [`links`]: device links and their grants, credentials sealed at rest.
//! - [`config`], [`clock`], [`model`]: the contract, the injectable time and
//!   the records.
//! - [`disk`], [`retention`], `supervise`, `outbound`: free space, old
//!   events, crash-only loops, the outbound address policy.
//! - [`replays`]: bulk replay jobs, one task each, resumed at start.
//! - [`telemetry`]: every metric `/metrics` exports, declared once and
//!   zeroed for every configured partner at start.
//! - [`mod@bench`], [`demo`], [`operator`]: `herald bench`, `herald demo`
//!   and the operator commands (`herald dlq`, `replays`, `events`,
//!   `partners`, `audit`).
//!
//! `ARCHITECTURE.md` at the repository root has the flow of one event and
//! the invariants each part keeps. Modules nothing outside herald needs
//! (`api`, `outbound`, `supervise`, `sync`) are private to the crate; the
//! public ones are what the binary, the bench and the integration tests use.
//!
//! # Shutdown
//!
//! Ingest answers 503, the HTTP server and the lanes stop taking work, sends
//! in flight get `server.shutdown_grace`, then the store flushes and stops.
//! Whatever was not sent stays in the schedule for the next start.

pub(crate) mod api;
pub mod bench;
pub mod clock;
pub mod config;
pub mod demo;
pub mod disk;
pub mod dispatch;
pub mod links;
pub mod model;
pub mod operator;
pub(crate) mod outbound;
pub mod replays;
pub mod retention;
pub mod store;
pub(crate) mod supervise;
pub(crate) mod sync;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use api::AppState;
use clock::Clock;
use config::Config;
use dispatch::Dispatcher;
use store::{Store, StoreError, StoreOptions};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
    #[error("{0}")]
    Dispatch(String),
    #[error("{0}")]
    Disk(String),
}

/// A running herald.
pub struct Herald {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop_http: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
    retention: JoinHandle<()>,
    disk_watch: JoinHandle<()>,
}

/// The process-wide Prometheus recorder (installed once, shared by every
/// herald started in this process).
pub fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new();
            for (name, buckets) in telemetry::buckets() {
                builder = builder
                    .set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(name.to_string()),
                        buckets,
                    )
                    .ok()?;
            }
            builder.install_recorder().ok()
        })
        .clone()
}

/// Opens the store, starts a lane per partner and serves the API.
pub async fn start(config: Config, clock: Clock) -> Result<Herald, StartError> {
    let config = Arc::new(config);
    // Every series exists, at zero, before the first event.
    let _ = metrics_handle();
    telemetry::register(&config);
    // Before the store: a policy the filesystem cannot meet creates nothing.
    let disk = disk::DiskWatch::new(&config.server.data_dir, config.server.disk)
        .map_err(StartError::Disk)?;
    let store = Store::open(
        &config.server.data_dir,
        StoreOptions {
            cache_bytes: config.server.cache_bytes,
            queue: config.server.ingest_queue,
        },
    )?;
    for partner in &config.partners {
        for priority in model::Priority::ALL {
            let queue = store.queue(&partner.name, priority);
            telemetry::queue(&partner.name, priority, queue.depth);
        }
    }
    let links = links::Links::new(store.clone(), config.server.link_key.clone(), clock.clone());
    let dispatcher = Arc::new(
        Dispatcher::start(&config, store.clone(), links.clone(), clock.clone())
            .map_err(StartError::Dispatch)?,
    );
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| StartError::Listen {
            addr: config.server.listen,
            reason: e.to_string(),
        })?;
    let addr = listener.local_addr().map_err(|e| StartError::Listen {
        addr: config.server.listen,
        reason: e.to_string(),
    })?;
    let state = Arc::new(AppState::new(
        Arc::clone(&config),
        store.clone(),
        links,
        dispatcher,
        clock.clone(),
        metrics_handle(),
        Arc::clone(&disk),
        addr,
    ));
    // Bulk replays a stop or a crash cut off go on where they were.
    let resumed = state.replays.resume()?;
    if resumed > 0 {
        tracing::info!(jobs = resumed, "replay jobs resumed");
    }
    let stop_http = CancellationToken::new();
    let server = tokio::spawn({
        let app = api::router(Arc::clone(&state));
        let stop = stop_http.clone();
        let header_timeout = config.server.http.header_timeout;
        let cap = api::serve::connection_cap(&config);
        api::serve::serve(listener, app, header_timeout, cap, stop)
    });
    let disk_watch = tokio::spawn(disk.run(store.clone()));
    let retention = tokio::spawn(retention::run(store, clock, config.server.retention));
    tracing::info!(%addr, partners = config.partners.len(), data_dir = %config.server.data_dir.display(), "herald is serving");
    Ok(Herald {
        addr,
        state,
        stop_http,
        server,
        retention,
        disk_watch,
    })
}

impl Herald {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.state.dispatcher
    }

    /// Stops accepting events (503), lets requests and sends in flight finish
    /// within `server.shutdown_grace`, then flushes the store and stops it.
    pub async fn shutdown(self) -> Result<(), StoreError> {
        let grace = self.state.config.server.shutdown_grace;
        self.state.start_draining();
        self.stop_http.cancel();
        // Before the lanes stop: a job's batch is written whole or not at all.
        self.state.replays.shutdown().await;
        let http = async {
            match tokio::time::timeout(grace, self.server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::error!(error = %e, "the HTTP server failed"),
                Ok(Err(e)) => tracing::error!(error = %e, "the HTTP server task failed"),
                Err(_) => tracing::warn!("requests still open after the grace period were cut"),
            }
        };
        tokio::join!(http, self.state.dispatcher.shutdown(grace));
        self.retention.abort();
        self.disk_watch.abort();
        // Joined so their handles on the store are gone before it stops.
        let _ = self.retention.await;
        let _ = self.disk_watch.await;
        let result = self.state.store.shutdown().await;
        tracing::info!("herald stopped");
        result
    }
}

/// How long a clean shutdown may take in all, for callers that wait on it.
pub fn shutdown_budget(config: &Config) -> Duration {
    config.server.shutdown_grace * 2 + Duration::from_secs(5)
}
