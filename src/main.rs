//! The `herald` command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use herald::clock::Clock;
use herald::config::Config;
use mimalloc::MiMalloc;

// glibc's malloc spent a fifth of herald's CPU in arena locks and
// consolidation under load (perf, `herald bench`); mimalloc does not.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "Delivers device events to every smart-home platform a device is linked to"
)]
struct Cli {
    /// How herald logs to stderr: lines for people, or one JSON object a
    /// line for a log shipper. `HERALD_LOG` sets the levels (default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Try herald with no config: mock partners on loopback, a herald on a
    /// temp dir, events for a while, then a summary; exits 0 only if every
    /// event is accounted for.
    Demo {
        /// How long events are posted ("30s", "2m").
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// After the summary, leave herald and the mocks running until Ctrl-C.
        #[arg(long)]
        keep: bool,
        /// How long, once posting stops, the backlog may take to settle.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        settle_limit: std::time::Duration,
    },
    /// Run the service (with no --config: 127.0.0.1:8080, data in ./herald-data).
    Serve {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Measure herald against same-run references (loopback only).
    Bench {
        /// Events per end-to-end scenario.
        #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
        events: u64,
        /// A small run (under a minute) that checks every accepted event is delivered.
        #[arg(long)]
        quick: bool,
        /// Events accepted while the partner is down (outage scenario).
        #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
        outage_events: u64,
        /// Concurrent ingest clients for the batched scenario.
        #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        clients: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Run only this scenario (repeatable); all of them by default.
        #[arg(long, value_enum)]
        only: Vec<herald::bench::Scenario>,
    },
    /// Run a mock partner platform on loopback, for trying herald by hand:
    /// it speaks the platform's protocol and injects the scenario's faults.
    MockPartner {
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(adapters::PLATFORMS))]
        platform: String,
        #[arg(long, default_value_t = 9101)]
        port: u16,
        #[arg(long, default_value = "ok", value_parser = clap::builder::PossibleValuesParser::new(adapters::mock::scenario::NAMES))]
        scenario: String,
    },
    /// Dead letters on a running herald: list, show, replay, purge.
    Dlq {
        #[command(flatten)]
        target: herald::operator::Target,
        #[command(subcommand)]
        command: herald::operator::Dlq,
    },
    /// Bulk replay jobs on a running herald: all of them, or one by id.
    Replays {
        id: Option<String>,
        #[command(flatten)]
        target: herald::operator::Target,
    },
    /// Events on a running herald.
    Events {
        #[command(flatten)]
        target: herald::operator::Target,
        #[command(subcommand)]
        command: herald::operator::Events,
    },
    /// The partners of a running herald: queue depth, breaker, counts.
    Partners {
        #[command(flatten)]
        target: herald::operator::Target,
    },
    /// Who replayed or purged which dead letters, oldest first.
    Audit {
        /// The cursor a previous page printed.
        #[arg(long)]
        after: Option<String>,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
        limit: Option<u64>,
        #[command(flatten)]
        target: herald::operator::Target,
    },
    /// Check a config file and its secrets, then exit.
    Check {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    // mimalloc asks for transparent huge pages, which count 2 MiB resident
    // for every touched arena chunk: herald's RSS was half huge pages.
    let _ = nix::sys::prctl::set_thp_disable(true);
    let cli = Cli::parse();
    if let Command::Demo {
        duration,
        keep,
        settle_limit,
    } = cli.command
    {
        // The demo logs to a file in its temp dir, away from its summary.
        return herald::demo::main(&herald::demo::DemoOptions {
            duration,
            keep,
            settle_limit,
        });
    }
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    match cli.command {
        // Handled above, before logging is set up.
        Command::Demo { .. } => ExitCode::SUCCESS,
        Command::Check { config } => match Config::load(config.as_deref()) {
            Ok(c) => {
                println!(
                    "config ok: {} partners, {} tokens",
                    c.partners.len(),
                    c.tokens.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("herald: config error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Bench {
            events,
            quick,
            outage_events,
            clients,
            json,
            only,
        } => bench(events, quick, outage_events, clients, json, only),
        Command::Dlq { target, command } => {
            operator(&target, herald::operator::Command::Dlq(command))
        }
        Command::Replays { id, target } => {
            operator(&target, herald::operator::Command::Replays(id))
        }
        Command::Events { target, command } => {
            operator(&target, herald::operator::Command::Events(command))
        }
        Command::Partners { target } => operator(&target, herald::operator::Command::Partners),
        Command::Audit {
            after,
            limit,
            target,
        } => operator(&target, herald::operator::Command::Audit { after, limit }),
        Command::MockPartner {
            platform,
            port,
            scenario,
        } => {
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            runtime.block_on(mock_partner(&platform, port, &scenario))
        }
        Command::Serve { config } => {
            let config = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("herald: config error: {e}");
                    return ExitCode::from(2);
                }
            };
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            runtime.block_on(serve(config))
        }
    }
}

fn bench(
    events: u64,
    quick: bool,
    outage_events: u64,
    clients: usize,
    json: bool,
    only: Vec<herald::bench::Scenario>,
) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("herald: cannot find my own binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = herald::bench::BenchOptions {
        events: if quick { events.min(5_000) } else { events },
        outage_events: if quick {
            outage_events.min(10_000)
        } else {
            outage_events
        },
        quick,
        clients,
        exe,
        only,
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(herald::bench::run(&options)) {
        Ok(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", herald::bench::render(&report));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("herald bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One operator command against a running herald.
fn operator(target: &herald::operator::Target, command: herald::operator::Command) -> ExitCode {
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(herald::operator::run(target, &command))
}

/// The multi-threaded runtime, or `None` once the reason is printed.
fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new()
        .map_err(|e| eprintln!("herald: cannot start the runtime: {e}"))
        .ok()
}

async fn serve(config: Config) -> ExitCode {
    let herald = match herald::start(config, Clock::system()).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("herald: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    wait_for_signal().await;
    tracing::info!("shutting down: no new events; finishing what is in flight");
    match herald.shutdown().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: the store did not shut down cleanly: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn mock_partner(platform: &str, port: u16, scenario: &str) -> ExitCode {
    use adapters::mock::{endpoints, MockPartner, Scenario};
    // clap only lets known names through.
    let Some(faults) = Scenario::named(scenario) else {
        eprintln!("herald: unknown scenario {scenario:?}");
        return ExitCode::from(2);
    };
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let (addr, mock) = match MockPartner::start_on(platform, faults.clone(), addr).await {
        Ok(started) => started,
        Err(e) => {
            eprintln!("herald: cannot start the {platform} mock on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{platform} mock partner on http://{addr} (scenario {scenario})");
    for (what, value) in endpoints(platform, &format!("http://{addr}")) {
        println!("  {what:<28} {value}");
    }
    println!(
        "  accepts access token {:?}, refresh token {:?}",
        faults.access_token, faults.refresh_token
    );
    wait_for_signal().await;
    let requests = mock.requests();
    let tokens = requests.iter().filter(|r| r.token_request).count();
    println!(
        "{} requests: {} deliveries accepted, {} token requests, {} duplicates",
        requests.len(),
        mock.accepted().len(),
        tokens,
        mock.duplicates()
    );
    mock.stop().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers, Ctrl-C is still honoured.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
