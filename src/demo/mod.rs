//! `herald demo`: herald at work on one machine with no config. Mock
//! partners on loopback (a healthy Standard Webhooks receiver, a SmartThings
//! whose tokens expire, a flaky webhook, one that is down), a herald in this
//! process on a temp data dir, devices linked through the API and events
//! posted to it for a while; then a summary read back from herald's API and
//! the mocks, which exits non-zero unless every event is accounted for.
//!
//! - [`stage`]: the mocks, the generated config, herald, the links.
//! - [`traffic`]: the events, the progress bar, the wait for the backlog.
//! - [`report`]: what herald and the mocks say, checked and summarised.

mod report;
mod stage;
mod traffic;

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use stage::Stage;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long events are posted.
    pub duration: Duration,
    /// Leave herald and the mocks running after the summary, until Ctrl-C.
    pub keep: bool,
    /// How long, after posting stops, herald's backlog may take to settle.
    pub settle_limit: Duration,
}

/// Runs the demo: its own temp dir (kept when something did not add up),
/// its log there, its own runtime.
pub fn main(options: &DemoOptions) -> ExitCode {
    if options.duration.is_zero() {
        eprintln!(
            "herald demo: --duration must be longer than 0s: it is how long events are posted"
        );
        return ExitCode::from(2);
    }
    let dir = match tempfile::Builder::new().prefix("herald-demo-").tempdir() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("herald demo: cannot make a temp dir: {e}");
            return ExitCode::FAILURE;
        }
    };
    let log = dir.path().join("herald.log");
    match std::fs::File::create(&log) {
        Ok(file) => tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG")
                    .unwrap_or_else(|_| "info".into()),
            )
            .with_writer(std::sync::Mutex::new(file))
            .with_ansi(false)
            .init(),
        Err(e) => eprintln!(
            "herald demo: cannot write {} ({e}); herald's log is off",
            log.display()
        ),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("herald demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options, dir.path())) {
        Outcome::Accounted => ExitCode::SUCCESS,
        Outcome::Interrupted => {
            eprintln!("herald demo: interrupted");
            ExitCode::from(130)
        }
        Outcome::NotAccounted => {
            let kept = dir.keep();
            eprintln!(
                "herald demo: its data dir, config and log are kept in {}",
                kept.display()
            );
            ExitCode::FAILURE
        }
    }
}

enum Outcome {
    /// Every event accounted for, and herald stopped cleanly.
    Accounted,
    NotAccounted,
    /// Ctrl-C (or SIGTERM) before the summary.
    Interrupted,
}

async fn run(options: &DemoOptions, dir: &Path) -> Outcome {
    let stage = match Stage::start(dir).await {
        Ok(stage) => stage,
        Err(e) => {
            eprintln!("herald demo: {e}");
            return Outcome::NotAccounted;
        }
    };
    println!(
        "herald demo: herald on {}, data, config and log in {}",
        stage.herald.url(),
        dir.display()
    );
    let roles = stage::partners();
    for (partner, url) in &stage.mock_urls {
        let role = roles
            .iter()
            .find(|p| p.name == *partner)
            .map_or("", |p| p.role.as_str());
        println!("  {partner:<12} {role:<36} {url}");
    }
    println!(
        "{} devices linked to smartthings; posting {} events a second for {}",
        stage::DEVICES.len(),
        traffic::EVENTS_PER_SECOND,
        humantime::format_duration(options.duration)
    );

    let findings = tokio::select! {
        findings = observe(&stage, options) => Some(findings),
        _ = wait_for_signal() => None,
    };
    let Some(mut findings) = findings else {
        if let Err(e) = stage.stop().await {
            eprintln!("herald demo: {e}");
        }
        return Outcome::Interrupted;
    };
    println!();
    print!("{}", findings.render(&stage, options.keep));
    let accounted = findings.accounted();

    if options.keep {
        println!("\nthe mocks:");
        for (partner, url) in &stage.mock_urls {
            println!("  {partner:<12} {url}");
        }
        println!("herald's config: {}", stage.config_path.display());
        println!("herald's log:    {}", dir.join("herald.log").display());
        println!(
            "ingest token (POST /v1/events): {}",
            stage.secrets.ingest_token
        );
        wait_for_signal().await;
    }
    match stage.stop().await {
        Ok(()) if accounted => Outcome::Accounted,
        Ok(()) => Outcome::NotAccounted,
        Err(e) => {
            eprintln!("herald demo: {e}");
            Outcome::NotAccounted
        }
    }
}

/// Posts the events, waits for the backlog, and reads what became of them.
async fn observe(stage: &Stage, options: &DemoOptions) -> report::Findings {
    let mut progress = traffic::Progress::new(options.duration);
    let sent = traffic::send(stage, options.duration, &mut progress).await;
    progress.finish();
    println!(
        "posted {} events; waiting up to {} for every delivery to settle",
        sent.accepted.len(),
        humantime::format_duration(options.settle_limit)
    );
    let settled = traffic::settle(stage, options.settle_limit, &mut progress).await;
    progress.finish();
    report::gather(stage, &sent, settled).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
