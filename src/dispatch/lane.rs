//! A lane: everything between one partner's due work and its HTTP endpoint.
//!
//! The lane owns the partner's limits so adapters don't have to: an in-flight
//! cap (a semaphore), then the rate limiter (governor, on herald's clock),
//! taken in that order so a token is spent only right before a real send.
//! Each send runs as its own task; its outcome (delivered, retry at T, dead)
//! goes back to the store, and only then is the delivery released from the
//! window.
//!
//! Due work reaches the lane one way: the lane reads the store's schedule
//! index. Whatever writes to the index (ingest, a replay, an unpark, a
//! retry's time coming, a device's turn coming) only says which range may
//! have changed ([`Lane::due_written`]); each range is read by one scan at a
//! time on tokio's blocking pool ([`Window::scan`]), so sends go on while a
//! backlog is read.

mod admission;
mod attempt;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use adapters::{Adapter, Verdict};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::breaker::{Answer, Breaker, Health, State, Transition};
use super::concurrency::{Aimd, AimdPolicy};
use super::parked::Parked;
use super::tokens::Tokens;
use super::window::{self, Held, Window};
use crate::clock::Clock;
use crate::config::PartnerConfig;
use crate::links::Links;
use crate::model::{AttemptOutcome, Priority};
use crate::store::{Due, DueScan, Next, Outcome, Store, StoreError};
use crate::sync::lock;
use admission::Admission;

/// The window holds this many due deliveries per in-flight permit.
const WINDOW_PER_PERMIT: usize = 16;

/// A scan of one range of the index on tokio's blocking pool.
type ScanTask = tokio::task::JoinHandle<Result<DueScan, StoreError>>;

type Limiter = RateLimiter<NotKeyed, InMemoryState, Clock, NoOpMiddleware<governor::nanos::Nanos>>;

/// What a lane shares with its send tasks and with the API.
pub struct Lane {
    pub partner: PartnerConfig,
    adapter: Box<dyn Adapter>,
    client: super::client::Client,
    store: Store,
    clock: Clock,
    limiter: Option<Limiter>,
    in_flight: Arc<Semaphore>,
    /// With `concurrency = "adaptive"`: the learned limit under `max_in_flight`.
    adaptive: Option<std::sync::Mutex<Aimd>>,
    /// Rung when a send finishes: room under the adaptive limit.
    freed: Notify,
    held: Held,
    /// Rung by writes to the index (new work) and by finished sends (room
    /// in the window).
    wake: Notify,
    /// Per priority (critical, normal): set when work of that priority was
    /// written to the index; the lane's loop marks the range stale. Critical
    /// work is looked for before the next send, however full the window is.
    written: [AtomicBool; 2],
    /// Rung with critical work written: interrupts a normal send's wait for a
    /// rate-limit token, so the critical one takes that token instead.
    critical_arrived: Notify,
    /// The earliest retry time of a critical delivery this lane sent
    /// (u64::MAX: none): a full window of normal work must not hide it.
    critical_retry_at: AtomicU64,
    /// The earliest retry time of any delivery this lane sent since its
    /// last look (u64::MAX: none): retries are written to the index only,
    /// so the window must scan for them when they come due.
    retry_at: AtomicU64,
    /// Outcomes of finished sends, written back together.
    recording: std::sync::Mutex<Recording>,
    /// How many deliveries the window holds (see [`super::window::limit_for`]).
    capacity: usize,
    pub breaker: Breaker,
    /// Devices whose route to this partner is gone (410): not sent to.
    pub parked: Parked,
    /// Raised while the platform refuses herald's own setup.
    pub alert: super::alert::PartnerAlert,
    /// The links' credentials, kept fresh for platform adapters.
    tokens: Tokens,
    pub stats: LaneStats,
}

#[derive(Default)]
pub struct LaneStats {
    pub sent: AtomicU64,
    pub superseded: AtomicU64,
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
    /// Delivered and failed per minute over the last hour.
    pub(crate) minutes: super::minutes::PerMinute,
}

/// The longest wait between keep-alive passes.
const KEEP_ALIVE_MAX_INTERVAL: Duration = Duration::from_secs(3600);

impl Lane {
    pub(crate) fn new(
        partner: PartnerConfig,
        adapter: Box<dyn Adapter>,
        client: super::client::Client,
        store: Store,
        links: Links,
        clock: Clock,
        parked: Parked,
    ) -> Lane {
        let limiter = partner.rate.map(|rate| {
            let quota =
                Quota::per_second(nonzero(rate.per_second)).allow_burst(nonzero(rate.burst));
            RateLimiter::direct_with_clock(quota, clock.clone())
        });
        metrics::gauge!("herald_partner_breaker_state", "partner" => partner.name.clone()).set(0.0);
        let breaker = Breaker::new(partner.breaker);
        let adaptive = partner.adaptive_concurrency.then(|| {
            let policy = AimdPolicy {
                min: 1,
                max: partner.max_in_flight,
            };
            std::sync::Mutex::new(Aimd::new(policy, clock.now_ms()))
        });
        let tokens = Tokens::new(
            &partner.name,
            links,
            client.clone(),
            clock.clone(),
            partner.timeout,
        );
        Lane {
            alert: super::alert::PartnerAlert::new(&partner.name),
            tokens,
            // Each refill walks from the head of the due range past chunks
            // still held: with 4 per permit a backlog came 128 at a time,
            // and delivered/s was about a tenth lower (herald bench --only
            // batched).
            capacity: (partner.max_in_flight * WINDOW_PER_PERMIT).max(64),
            retry_at: AtomicU64::new(u64::MAX),
            recording: std::sync::Mutex::new(Recording::default()),
            adaptive,
            freed: Notify::new(),
            in_flight: Arc::new(Semaphore::new(partner.max_in_flight)),
            partner,
            adapter,
            client,
            store,
            clock,
            limiter,
            held: Held::default(),
            wake: Notify::new(),
            written: [AtomicBool::new(false), AtomicBool::new(false)],
            critical_arrived: Notify::new(),
            critical_retry_at: AtomicU64::new(u64::MAX),
            breaker,
            parked,
            stats: LaneStats::default(),
        }
    }

    /// The schedule may hold work this lane was not told of and will not be
    /// woken for (a write that failed, or failed to say it landed): the
    /// lane scans all of it in a second, when a store being opened again
    /// after a failed write is likely back (a scan that fails is tried
    /// again each second).
    pub(crate) fn rescan_soon(&self) {
        let at = self.clock.now_ms() + 1_000;
        self.retry_at.fetch_min(at, Ordering::AcqRel);
        self.critical_retry_at.fetch_min(at, Ordering::AcqRel);
        self.wake.notify_one();
    }

    /// Work of `priority` was made durable in the index: the lane reads
    /// that range before trusting its window again (at once for critical
    /// work; when the window runs low for normal work).
    pub(crate) fn due_written(&self, priority: Priority) {
        self.written[slot(priority)].store(true, Ordering::Release);
        if priority == Priority::Critical {
            // A normal send waiting for a token gives the token up to it.
            self.critical_arrived.notify_one();
        }
        self.wake.notify_one();
    }

    /// Clears a parked route: deliveries to the device are sent again.
    /// False if it was not parked.
    pub(crate) async fn unpark(&self, device_id: &str) -> Result<bool, crate::store::StoreError> {
        let found = self.store.unpark(&self.partner.name, device_id).await?;
        self.parked.remove(device_id);
        metrics::gauge!("herald_parked_routes", "partner" => self.partner.name.clone())
            .set(self.parked.len() as f64);
        Ok(found)
    }

    /// The device's link was put again: its parked route (already cleared
    /// in the store by the same write) is cleared here too.
    pub(crate) fn relinked(&self, device_id: &str) {
        self.parked.remove(device_id);
        metrics::gauge!("herald_parked_routes", "partner" => self.partner.name.clone())
            .set(self.parked.len() as f64);
    }

    /// Whether `link` has what this partner's adapter needs (see
    /// [`Adapter::check_link`]).
    pub(crate) fn check_link(&self, link: &crate::links::Link) -> Result<(), adapters::SetupError> {
        self.adapter.check_link(&link.view())
    }

    pub fn in_flight(&self) -> usize {
        self.partner.max_in_flight - self.in_flight.available_permits()
    }

    /// How many sends may be in flight now: learned, or `max_in_flight`.
    pub(crate) fn concurrency_limit(&self) -> usize {
        match &self.adaptive {
            Some(aimd) => lock(aimd).limit(),
            None => self.partner.max_in_flight,
        }
    }

    /// Waits until a send fits under the adaptive limit; false if stopped.
    async fn room_under_limit(&self, stop: &CancellationToken) -> bool {
        if self.adaptive.is_none() {
            return true;
        }
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.in_flight() < self.concurrency_limit() {
                return true;
            }
            tokio::select! {
                _ = freed => {}
                _ = stop.cancelled() => return false,
            }
        }
    }

    /// Tells the adaptive controller about one real send's answer.
    fn learn(&self, started_ms: u64, status: Option<u16>) {
        let Some(aimd) = &self.adaptive else { return };
        let back_pressure = matches!(status, None | Some(429) | Some(503));
        let changed = lock(aimd).answered(started_ms, back_pressure, self.clock.now_ms());
        if let Some(limit) = changed {
            metrics::gauge!("herald_partner_concurrency_limit", "partner" => self.partner.name.clone())
                .set(limit as f64);
            tracing::debug!(partner = %self.partner.name, limit, "adaptive concurrency limit changed");
        }
    }

    /// The partner's keep-alive: every `interval` on herald's clock, the
    /// links whose refresh token nears its lifetime are refreshed, each
    /// refresh taking one of the partner's rate-limit tokens like a send.
    pub(crate) async fn keep_alive(self: Arc<Self>, stop: CancellationToken) {
        let Some(keep_alive) = self.partner.keep_alive else {
            return;
        };
        // Often enough that a refresh comes well inside `ahead`.
        let interval =
            (keep_alive.ahead / 4).clamp(Duration::from_secs(1), KEEP_ALIVE_MAX_INTERVAL);
        loop {
            let pace = || async {
                matches!(
                    self.take_token(&stop, Priority::Normal, false).await,
                    Token::Taken
                )
            };
            if let Err(e) = self
                .tokens
                .keep_alive(self.adapter.as_ref(), keep_alive, pace)
                .await
            {
                tracing::warn!(partner = %self.partner.name, error = %e,
                    "keep-alive: cannot read the partner's links; the next pass tries again");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.clock.sleep(interval) => {}
            }
        }
    }

    /// Takes due work and sends it until `stop`; sends run on `tracker` so
    /// shutdown can wait for them, and are dropped when `abandon` fires.
    pub(crate) async fn run(
        self: Arc<Self>,
        stop: CancellationToken,
        abandon: CancellationToken,
        tracker: TaskTracker,
        hold: Arc<super::Hold>,
    ) {
        let mut window = Window::new(&self.partner.name, self.capacity, self.held.clone());
        // At most one scan per range (critical, normal) runs at a time.
        let mut scans: [Option<ScanTask>; 2] = [None, None];
        loop {
            if stop.is_cancelled() {
                return;
            }
            if hold.is_held() {
                tokio::select! {
                    _ = hold.released() => continue,
                    _ = stop.cancelled() => return,
                }
            }
            for priority in Priority::ALL {
                if self.written[slot(priority)].swap(false, Ordering::AcqRel) {
                    window.mark_stale(priority);
                }
                let task = &mut scans[slot(priority)];
                if let Some(scan) = task.take_if(|scan| scan.is_finished()) {
                    if !self.merge(&mut window, priority, scan.await, &stop).await {
                        return;
                    }
                }
            }
            let now = self.clock.now_ms();
            if came_due(&self.retry_at, now) {
                Priority::ALL.iter().for_each(|&p| window.mark_stale(p));
            }
            if self.critical_retry_came_due() {
                window.mark_stale(Priority::Critical);
            }
            for priority in window::plan(window.look(now)).priorities() {
                if let Some(scan) = window.scan(priority, now) {
                    let store = self.store.clone();
                    scans[slot(priority)] =
                        Some(tokio::task::spawn_blocking(move || scan.run(&store)));
                }
            }
            // Critical work being read goes before any normal send: the
            // scan of a critical range is short, and waited for.
            if let Some(scan) = scans[slot(Priority::Critical)].take() {
                let read = tokio::select! {
                    read = scan => read,
                    _ = stop.cancelled() => return,
                };
                if !self
                    .merge(&mut window, Priority::Critical, read, &stop)
                    .await
                {
                    return;
                }
                continue;
            }
            let Some(due) = window.pop() else {
                let retry_at = self.retry_at.load(Ordering::Acquire);
                let next_due = match (window.next_due_ms(), retry_at) {
                    (due, u64::MAX) => due,
                    (due, at) => Some(due.map_or(at, |d| d.min(at))),
                };
                let [_, normal_scan] = &mut scans;
                tokio::select! {
                    _ = self.wake.notified() => {}
                    read = join(normal_scan) => {
                        *normal_scan = None;
                        if !self.merge(&mut window, Priority::Normal, read, &stop).await {
                            return;
                        }
                    }
                    _ = self.clock.sleep_until_ms(next_due.unwrap_or(u64::MAX)), if next_due.is_some() => {}
                    _ = stop.cancelled() => return,
                }
                continue;
            };
            let (mut due, ticket) = match self.admit(&mut window, due, &stop).await {
                Admission::Go(due, ticket) => (due, ticket),
                Admission::Again => continue,
                Admission::Stopped => return,
            };
            let companions = self.companions(&mut window, &mut due);
            let (permit, probe) = ticket.send();
            let lane = Arc::clone(&self);
            let abandon = abandon.clone();
            tracker.spawn(async move {
                // Dropped mid-send, the deliveries simply stay scheduled.
                tokio::select! {
                    _ = lane.deliver(due, companions, permit, probe) => {}
                    _ = abandon.cancelled() => {}
                }
            });
        }
    }

    /// Takes a finished scan of `priority` into the window; on failure,
    /// waits a second (false if stopped meanwhile) and leaves the range stale.
    async fn merge(
        &self,
        window: &mut Window,
        priority: Priority,
        result: Result<Result<DueScan, StoreError>, tokio::task::JoinError>,
        stop: &CancellationToken,
    ) -> bool {
        let error = match result {
            Ok(Ok(scan)) => {
                window.merge(priority, scan);
                return true;
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("the scan did not finish: {e}"),
        };
        window.scan_failed(priority);
        tracing::error!(partner = %self.partner.name, error = %error, "cannot read the schedule; trying again in a second");
        tokio::select! {
            _ = self.clock.sleep(Duration::from_secs(1)) => true,
            _ = stop.cancelled() => false,
        }
    }

    /// Whether a critical retry is due now; if so, it is looked for once.
    fn critical_retry_came_due(&self) -> bool {
        came_due(&self.critical_retry_at, self.clock.now_ms())
    }

    /// Waits for a rate-limit token for a send of `priority`. A normal
    /// send gives up its wait when critical work arrives or comes due.
    async fn take_token(&self, stop: &CancellationToken, priority: Priority, skip: bool) -> Token {
        let Some(limiter) = self.limiter.as_ref().filter(|_| !skip) else {
            return Token::Taken;
        };
        let yields = priority == Priority::Normal;
        loop {
            match limiter.check() {
                Ok(()) => return Token::Taken,
                Err(not_until) => {
                    crate::telemetry::rate_limit_wait(&self.partner.name);
                    let wait = not_until.wait_time_from(governor::clock::Clock::now(&self.clock));
                    let retry_at = self.critical_retry_at.load(Ordering::Acquire);
                    // Biased: when a critical send and the token are both
                    // ready at one wake-up, the critical one gets the token.
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => return Token::Stopped,
                        _ = self.critical_arrived.notified(), if yields => return Token::Preempted,
                        _ = self.clock.sleep_until_ms(retry_at), if yields && retry_at != u64::MAX => {
                            return Token::Preempted
                        }
                        _ = self.clock.sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Other queued deliveries for `due`'s device that can ride in the same
    /// request, for platforms that batch (see [`Adapter::max_batch`]).
    fn companions(&self, window: &mut Window, due: &mut Due) -> Vec<Due> {
        let room = self.adapter.max_batch().saturating_sub(1);
        if room == 0 {
            return Vec::new();
        }
        let Ok(Some(first)) = due.event(&self.store) else {
            return Vec::new();
        };
        // Kept on the entry: its send reads it again otherwise.
        due.keep_event(Arc::clone(&first));
        window.take_matching(room, 2 * self.adapter.max_batch(), |d| {
            match d.event(&self.store) {
                Ok(Some(event)) => {
                    let same = event.device_id == first.device_id;
                    // Read once: the send needs it too, whenever it goes.
                    d.keep_event(event);
                    same
                }
                _ => false,
            }
        })
    }

    async fn deliver(
        self: Arc<Self>,
        due: Due,
        companions: Vec<Due>,
        permit: OwnedSemaphorePermit,
        probe: bool,
    ) {
        let mut dues = Vec::with_capacity(1 + companions.len());
        dues.push(due);
        dues.extend(companions);
        let (outcomes, sent) = self.attempt(dues).await;
        drop(permit);
        self.freed.notify_one();
        if let Some(sent) = &sent {
            self.learn(sent.started_ms, sent.status);
        }
        let now_ms = self.clock.now_ms();
        let answer = match &sent {
            Some(s) => Answer {
                health: Health::of(s.status),
                sent_ms: s.sent_ms,
                first_try: s.first_try,
            },
            // Nothing went out: nothing learned.
            None => Answer {
                health: Health::Unknown,
                sent_ms: now_ms,
                first_try: false,
            },
        };
        let transition = self.breaker.record(answer, now_ms, probe);
        self.note(transition);
        self.record(outcomes).await;
        self.wake.notify_one();
    }

    /// Writes outcomes back, then releases their deliveries from the
    /// window. Sends finishing together share one write: while one send
    /// task writes, the others leave their outcomes to it and end, so the
    /// store sees one request (and answers once) for many outcomes.
    async fn record(&self, outcomes: Vec<Outcome>) {
        for outcome in &outcomes {
            if let Some(route) = &outcome.park {
                // Parked before the write is visible: no later send slips
                // through, and whoever sees the dead letter sees the park.
                self.parked.insert(route.as_ref().clone());
            }
        }
        let Some(mut writing) = Recording::join(&self.recording, outcomes) else {
            return;
        };
        while let Some(batch) = writing.next() {
            let settled: Vec<_> = batch.iter().map(Settled::of).collect();
            let results = match self.store.record_all(batch).await {
                Ok(results) => results,
                Err(e) => settled.iter().map(|_| Err(e.clone())).collect(),
            };
            for (settled, recorded) in settled.into_iter().zip(results) {
                self.recorded(settled, recorded);
            }
        }
    }

    /// What follows one outcome's write.
    fn recorded(&self, settled: Settled, recorded: Result<(), crate::store::StoreError>) {
        let (id, priority, park) = (settled.delivery, settled.priority, settled.park.clone());
        // Released before a retry time is published: a scan that time wakes
        // must be able to take the retry, not skip it as still in flight.
        self.held.release(id);
        match recorded {
            Ok(()) => {
                if self.partner.ordered_per_device {
                    // The device's next delivery may now be first of its
                    // device: only a scan of the index can tell.
                    self.written
                        .iter()
                        .for_each(|w| w.store(true, Ordering::Release));
                }
                settled.log(&self.partner.name);
                if let Some(route) = park {
                    tracing::warn!(partner = %route.partner, device = %route.device_id, reason = %route.reason,
                        "route parked: later deliveries to this device become dead letters until it is cleared");
                    metrics::gauge!("herald_parked_routes", "partner" => self.partner.name.clone())
                        .set(self.parked.len() as f64);
                }
                let now_ms = self.clock.now_ms();
                let counter = match settled.next {
                    Next::Delivered => {
                        self.stats.minutes.delivered(now_ms);
                        &self.stats.delivered
                    }
                    Next::RetryAt(at) => {
                        self.retry_at.fetch_min(at, Ordering::AcqRel);
                        if priority == Priority::Critical {
                            self.critical_retry_at.fetch_min(at, Ordering::AcqRel);
                        }
                        self.stats.minutes.failed(now_ms);
                        &self.stats.retried
                    }
                    Next::Dead(_) => {
                        self.stats.minutes.failed(now_ms);
                        &self.stats.dead
                    }
                    Next::Superseded(_) => &self.stats.superseded,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            // The entry stays in the index: it is sent again (at least once),
            // once a scan finds it.
            Err(e) => {
                self.rescan_soon();
                if let Some(route) = park {
                    self.parked.remove(&route.device_id);
                }
                tracing::error!(partner = %self.partner.name, delivery = %id, error = %e, "cannot record an outcome")
            }
        }
    }

    /// Logs and counts a change of the breaker's state.
    fn note(&self, transition: Option<Transition>) {
        let Some(t) = transition else { return };
        let partner = &self.partner.name;
        let value = match t.to {
            State::Closed => 0.0,
            State::Open => 1.0,
            State::HalfOpen => 2.0,
        };
        metrics::gauge!("herald_partner_breaker_state", "partner" => partner.clone()).set(value);
        match (t.to, t.cool_down) {
            (State::Open, Some(wait)) => tracing::warn!(
                %partner, from = ?t.from, next_probe_in = ?wait,
                "breaker opened: the partner looks down; its deliveries wait without using attempts"
            ),
            (State::HalfOpen, _) => {
                tracing::info!(%partner, "breaker half-open: sending one probe")
            }
            (State::Closed, _) => {
                tracing::info!(%partner, "breaker closed: the partner answers again")
            }
            (State::Open, None) => {}
        }
    }
}

/// What a lane keeps of an outcome while the store writes it: enough to
/// release it, publish its retry and log it once durable.
struct Settled {
    delivery: uuid::Uuid,
    event: uuid::Uuid,
    priority: Priority,
    attempt: u32,
    status: Option<u16>,
    latency_ms: u64,
    next: Next,
    park: Option<Box<crate::model::ParkedRoute>>,
}

impl Settled {
    fn of(outcome: &Outcome) -> Settled {
        Settled {
            delivery: outcome.delivery(),
            event: outcome.event_id(),
            priority: outcome.priority(),
            attempt: outcome.attempt.number,
            status: outcome.attempt.status,
            latency_ms: outcome.attempt.latency_ms,
            next: outcome.next.clone(),
            park: outcome.park.clone(),
        }
    }

    /// The one log line of a delivery outcome, once it is durable (target
    /// `herald::delivery`, so `HERALD_LOG=info,herald::delivery=warn` quiets
    /// it): ids, partner, attempt, the answer's status and latency. It names
    /// no header or body, so no secret or payload reaches the log.
    fn log(&self, partner: &str) {
        let (outcome, detail) = match &self.next {
            Next::Delivered => ("delivered", None),
            Next::RetryAt(at) => ("retry", Some(crate::clock::rfc3339(*at))),
            Next::Dead(reason) => ("dead_letter", Some(reason.clone())),
            Next::Superseded(by) => ("superseded", Some(by.to_string())),
        };
        tracing::info!(
            target: "herald::delivery",
            event = %self.event,
            delivery = %self.delivery,
            partner,
            priority = self.priority.as_str(),
            attempt = self.attempt,
            status = self.status,
            latency_ms = self.latency_ms,
            outcome,
            detail,
            "delivery outcome"
        );
    }
}

/// Outcomes waiting to be written, and whether a send task is writing them.
#[derive(Default)]
struct Recording {
    queued: Vec<Outcome>,
    writing: bool,
}

/// Held by the send task that writes queued outcomes; whatever ends that
/// task (done, or dropped at shutdown) lets the next one take over.
struct Writing<'a> {
    recording: &'a std::sync::Mutex<Recording>,
    done: bool,
}

impl Writing<'_> {
    /// Everything queued, to write; `None` (and the writing ends) when
    /// nothing is. Checked under the lock, so no outcome is left queued
    /// with nobody writing it.
    fn next(&mut self) -> Option<Vec<Outcome>> {
        let mut r = lock(self.recording);
        if r.queued.is_empty() {
            r.writing = false;
            self.done = true;
            return None;
        }
        Some(std::mem::take(&mut r.queued))
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        if !self.done {
            lock(self.recording).writing = false;
        }
    }
}

impl Recording {
    /// Queues `outcomes`; the writer's guard if nobody is writing yet.
    fn join(this: &std::sync::Mutex<Recording>, outcomes: Vec<Outcome>) -> Option<Writing<'_>> {
        let mut r = lock(this);
        r.queued.extend(outcomes);
        if r.writing {
            return None;
        }
        r.writing = true;
        Some(Writing {
            recording: this,
            done: false,
        })
    }
}

/// The end of a scan under way; never, when none is.
async fn join(
    scan: &mut Option<ScanTask>,
) -> Result<Result<DueScan, StoreError>, tokio::task::JoinError> {
    match scan {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// The index of `priority`'s entry in arrays kept per priority.
fn slot(priority: Priority) -> usize {
    match priority {
        Priority::Critical => 0,
        Priority::Normal => 1,
    }
}

/// Whether the time in `at` has come; if so, it is cleared (looked at once).
fn came_due(at: &AtomicU64, now_ms: u64) -> bool {
    at.fetch_update(Ordering::AcqRel, Ordering::Acquire, |at| {
        (at <= now_ms).then_some(u64::MAX)
    })
    .is_ok()
}

fn reason_only(reason: &str) -> Verdict {
    Verdict::Permanent {
        reason: reason.to_string(),
    }
}

fn outcome_label(outcome: AttemptOutcome) -> &'static str {
    match outcome {
        AttemptOutcome::Delivered => "delivered",
        AttemptOutcome::Retry => "retry",
        AttemptOutcome::Failed => "failed",
    }
}

fn nonzero(n: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN)
}

enum Token {
    Taken,
    /// Critical work arrived while a normal send waited.
    Preempted,
    Stopped,
}
