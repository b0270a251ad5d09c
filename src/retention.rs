//! Retention: finished events leave the store once `server.retention` has
//! passed, with their idempotency keys and attempt logs, so disk use under a
//! steady load stays flat. Pending deliveries are never collected, however
//! old; dead letters stay until on-call purges them.

use std::time::Duration;

use crate::clock::Clock;
use crate::store::Store;

/// Events looked at per writer request: keeps each group short.
const BUDGET: usize = 5_000;

pub(crate) async fn run(store: Store, clock: Clock, retention: Duration) {
    let every = (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    loop {
        clock.sleep(every).await;
        if let Err(e) = collect_once(&store, &clock, retention).await {
            tracing::warn!(error = %e, "retention pass failed; trying again later");
        }
    }
}

/// One full pass: every finished event older than the retention goes.
pub async fn collect_once(
    store: &Store,
    clock: &Clock,
    retention: Duration,
) -> Result<usize, crate::store::StoreError> {
    let cutoff = clock.now_ms().saturating_sub(retention.as_millis() as u64);
    let mut removed = 0;
    let mut resume = None;
    loop {
        let done = store.collect(cutoff, BUDGET, resume).await?;
        removed += done.removed;
        match done.resume {
            Some(from) => resume = Some(from),
            None => break,
        }
    }
    if removed > 0 {
        tracing::debug!(removed, "retention pass");
    }
    Ok(removed)
}
