//! Crash-only for the loops herald cannot run without.
//!
//! The store writer and each partner's lane loop run for the life of the
//! process. If one of them panics (a bug), herald would go on answering
//! /readyz with part of itself gone: no event accepted or recorded, or one
//! partner never sent to again. Instead it logs the panic and exits with
//! [`EXIT_STATUS`], so its supervisor starts it again on the same data dir,
//! where every accepted event is kept. Requests in flight were never
//! answered 202, so their senders try again; deliveries in flight are sent
//! again (at least once, as always).

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;

/// EX_SOFTWARE: herald stopped on a bug of its own.
pub const EXIT_STATUS: i32 = 70;

/// Logs that `what` died and ends the process.
pub fn exit(what: &str) -> ! {
    tracing::error!("{what} stopped on a bug (its panic is above); herald exits so it can be started again on its data dir");
    std::process::exit(EXIT_STATUS)
}

/// Runs `body` on this thread; if it panics, calls `on_panic` (in herald,
/// [`exit`]).
pub fn run_or(body: impl FnOnce(), on_panic: impl FnOnce()) {
    if std::panic::catch_unwind(AssertUnwindSafe(body)).is_err() {
        on_panic();
    }
}

/// The same for a loop that runs as a task.
pub async fn run_task_or(body: impl Future<Output = ()>, on_panic: impl FnOnce()) {
    if AssertUnwindSafe(body).catch_unwind().await.is_err() {
        on_panic();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_panics_calls_for_the_exit_and_one_that_ends_does_not() {
        let mut exited = false;
        run_or(|| panic!("a bug in the writer"), || exited = true);
        assert!(exited, "a panic must end the process");
        let mut exited = false;
        run_or(|| {}, || exited = true);
        assert!(!exited, "a clean stop is not an exit");
    }

    #[tokio::test]
    async fn a_task_that_panics_calls_for_the_exit_and_one_that_ends_does_not() {
        let mut exited = false;
        run_task_or(async { panic!("a bug in a lane") }, || exited = true).await;
        assert!(exited, "a panic must end the process");
        let mut exited = false;
        run_task_or(async {}, || exited = true).await;
        assert!(!exited, "a clean stop is not an exit");
    }
}
