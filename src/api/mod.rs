//! herald's HTTP API: ingest for internal services, admin views for on-call,
//! and the health and metrics endpoints for the platform.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod console;
pub mod guard;
pub mod ingest;
pub mod links;
pub mod paging;
pub mod partners;
pub mod problem;
pub mod ready;
pub mod replay;
pub mod serve;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::clock::Clock;
use crate::config::Config;
use crate::disk::DiskWatch;
use crate::dispatch::Dispatcher;
use crate::links::Links;
use crate::store::Store;

pub struct AppState {
    pub config: Arc<Config>,
    pub store: Store,
    pub links: Links,
    pub dispatcher: Arc<Dispatcher>,
    pub clock: Clock,
    pub tokens: auth::Tokens,
    /// Origin, role and per-token limits, checked before a body is read.
    pub guard: guard::Guard,
    pub metrics: Option<PrometheusHandle>,
    /// The data dir's free space: which events ingest takes now.
    pub disk: Arc<DiskWatch>,
    /// Bulk replay jobs at work.
    pub replays: crate::replays::ReplayJobs,
    /// When this herald started, on its clock: no partner is stalled
    /// before `server.stall_after` has passed since.
    pub started_ms: u64,
    draining: AtomicBool,
}

impl AppState {
    /// `addr` is where the listener is bound (its port may differ from
    /// `server.listen`'s 0): the `Host` the open mode answers for.
    #[allow(clippy::too_many_arguments)] // one per piece start() wires together
    pub fn new(
        config: Arc<Config>,
        store: Store,
        links: Links,
        dispatcher: Arc<Dispatcher>,
        clock: Clock,
        metrics: Option<PrometheusHandle>,
        disk: Arc<DiskWatch>,
        addr: std::net::SocketAddr,
    ) -> AppState {
        AppState {
            tokens: auth::Tokens::new(&config.tokens),
            guard: guard::Guard::new(&config, addr, clock.clone()),
            replays: crate::replays::ReplayJobs::new(
                store.clone(),
                Arc::clone(&dispatcher),
                clock.clone(),
            ),
            config,
            store,
            links,
            dispatcher,
            clock: clock.clone(),
            metrics,
            disk,
            started_ms: clock.now_ms(),
            draining: AtomicBool::new(false),
        }
    }

    /// From now on, ingest answers 503: herald is shutting down.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let max_body = state.config.server.max_body_bytes;
    Router::new()
        .route("/v1/events", post(ingest::post_events))
        .route("/v1/events/{id}", get(admin::get_event))
        .route("/v1/dead-letters", get(admin::list_dead_letters))
        .route("/v1/dead-letters/replay", post(replay::replay_many))
        .route("/v1/dead-letters/purge", post(replay::purge_many))
        .route(
            "/v1/replays",
            post(replay::create_job).get(replay::list_jobs),
        )
        .route("/v1/replays/{id}", get(replay::get_job))
        .route("/v1/audit", get(audit::list_audit))
        .route(
            "/v1/dead-letters/{id}",
            get(admin::get_dead_letter).delete(replay::purge_one),
        )
        .route("/v1/dead-letters/{id}/replay", post(replay::replay_one))
        .route("/v1/partners", get(partners::list_partners))
        .route("/v1/partners/{name}/parked", get(partners::list_parked))
        .route(
            "/v1/partners/{name}/parked/{device_id}",
            axum::routing::delete(partners::clear_parked),
        )
        .route("/v1/links/{partner}", get(links::list_links))
        .route(
            "/v1/links/{partner}/{device_id}",
            get(links::get_link)
                .put(links::put_link)
                .delete(links::delete_link),
        )
        .route("/console", get(console::page))
        .route("/console/{asset}", get(console::asset))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready::readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { problem::Problem::not_found("no such endpoint").into_response() })
        .layer(DefaultBodyLimit::max(max_body))
        // After routing (it reads the matched route), before any handler.
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            guard::guard,
        ))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match &state.metrics {
        Some(handle) => {
            ready::refresh_gauges(&state);
            handle.render().into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            "metrics are not recorded in this process",
        )
            .into_response(),
    }
}
