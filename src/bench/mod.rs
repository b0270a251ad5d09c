//! `herald bench`: herald's speed, measured against references taken in the
//! same run on the same machine, on loopback only and bounded in time.
//!
//! Every scenario starts herald as a real process on a fresh temp data dir
//! and drives it like production would: services posting events, a partner
//! taking deliveries. The references (a bare HTTP loop, raw fsyncs) say what
//! the machine can do at all, so herald's figures read as a share of that.

mod load;
pub mod process;
mod reference;
mod sink;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use load::LoadSpec;
use process::HeraldProcess;
use sink::Sink;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Events per end-to-end scenario.
    pub events: u64,
    pub quick: bool,
    /// Concurrent ingest clients.
    pub clients: usize,
    /// Events accepted while the partner is down in the outage scenario.
    pub outage_events: u64,
    /// The herald binary to start (normally this one).
    pub exe: PathBuf,
    /// Run only these scenarios (all when empty).
    pub only: Vec<Scenario>,
}

/// The scenarios, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    Ceiling,
    Fsync,
    Batched,
    Single,
    Throttled,
    Outage,
}

/// One figure of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub scenario: String,
    pub figure: String,
    pub value: f64,
    pub unit: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub machine: String,
    pub figures: Vec<Figure>,
}

struct Table {
    scenario: String,
    figures: Vec<Figure>,
}

impl Table {
    fn add(&mut self, figure: &str, value: f64, unit: &'static str) {
        self.figures.push(Figure {
            scenario: self.scenario.clone(),
            figure: figure.to_string(),
            value,
            unit,
        });
    }
}

pub async fn run(options: &BenchOptions) -> Result<BenchReport, String> {
    crate::dispatch::client::install_crypto_provider();
    let wanted = |s: Scenario| options.only.is_empty() || options.only.contains(&s);
    let mut figures = Vec::new();
    // Each table goes to stderr as it finishes, so a long run shows progress.
    let mut done = |part: Vec<Figure>| {
        eprint!("{}", render_figures(&part));
        figures.extend(part);
    };
    let epoch = Instant::now();
    let body = load::event_json(0, 0, "normal").into_bytes();

    let mut ceiling = None;
    if wanted(Scenario::Ceiling) || wanted(Scenario::Batched) || wanted(Scenario::Single) {
        let mut t = table("ceiling: hyper client loop → loopback sink");
        let requests = if options.quick {
            5_000
        } else {
            options.events.min(200_000)
        };
        let reference = Ceiling {
            requests,
            body: body.clone(),
            latest: reference::http_ceiling(requests, 64, body.clone()).await?,
        };
        t.add("requests/s", reference.latest, "req/s");
        ceiling = Some(reference);
        done(t.figures);
    }

    if wanted(Scenario::Fsync) {
        let mut t = table("fsync: appends of 64-byte records");
        let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
        let budget = Duration::from_millis(if options.quick { 300 } else { 2000 });
        t.add(
            "one fsync each",
            reference::fsync_rate(scratch.path(), 64, 1, budget)?,
            "records/s",
        );
        t.add(
            "fsync per 256",
            reference::fsync_rate(scratch.path(), 64, 256, budget)?,
            "records/s",
        );
        done(t.figures);
    }

    let batched = LoadSpec {
        events: options.events,
        batch: 100,
        clients: options.clients,
        priority: "normal",
        rate: None,
    };
    if wanted(Scenario::Batched) {
        let scenario = "end to end, batches of 100";
        done(healthy(options, scenario, &batched, epoch, ceiling.as_mut()).await?);
    }
    if wanted(Scenario::Single) {
        let single = LoadSpec {
            events: if options.quick {
                options.events
            } else {
                options.events / 4
            },
            batch: 1,
            clients: 16,
            ..batched
        };
        let scenario = "end to end, single events";
        done(healthy(options, scenario, &single, epoch, ceiling.as_mut()).await?);
    }
    if wanted(Scenario::Throttled) {
        done(throttled(options, epoch).await?);
    }
    if wanted(Scenario::Outage) {
        done(outage(options, epoch).await?);
    }

    Ok(BenchReport {
        machine: machine(),
        figures,
    })
}

/// The ceiling as last measured, and how to measure it again.
struct Ceiling {
    requests: u64,
    body: Vec<u8>,
    latest: f64,
}

impl Ceiling {
    /// Measures the ceiling again, right after a scenario; returns the
    /// measurements before and after it. A VM's speed drifts within
    /// minutes, so a ratio against their mean says more than one against
    /// a figure taken at the start of the run.
    async fn bracket(&mut self) -> Result<(f64, f64), String> {
        let before = self.latest;
        self.latest = reference::http_ceiling(self.requests, 64, self.body.clone()).await?;
        Ok((before, self.latest))
    }
}

fn table(scenario: &str) -> Table {
    eprintln!("bench: {scenario}...");
    Table {
        scenario: scenario.to_string(),
        figures: Vec::new(),
    }
}

/// A healthy partner answering 200 as fast as it can.
async fn healthy(
    options: &BenchOptions,
    scenario: &str,
    spec: &LoadSpec,
    epoch: Instant,
    ceiling: Option<&mut Ceiling>,
) -> Result<Vec<Figure>, String> {
    let mut t = table(scenario);
    let sink = Sink::start(epoch, true).await.map_err(|e| e.to_string())?;
    let mut herald = HeraldProcess::start(&options.exe, &sink.url(), "").await?;
    let cpu_before = herald.cpu_seconds();
    let started_ns = epoch.elapsed().as_nanos() as u64;
    let load = load::run(&herald.url, process::TOKEN, spec, epoch).await;
    wait_delivered(
        &sink,
        load.accepted,
        Duration::from_secs(60 + spec.events / 2_000),
    )
    .await?;
    let report = sink.report();
    let metrics = herald.metrics().await;
    let (_, peak_rss) = herald.rss_mib();
    let cpu = herald.cpu_seconds() - cpu_before;
    herald.stop()?;

    let delivered_seconds = (report.last_ns.saturating_sub(started_ns)) as f64 / 1e9;
    let delivered_rate = report.unique as f64 / delivered_seconds.max(1e-9);
    t.add("events", load.accepted as f64, "events");
    t.add(
        "accepted/s",
        load.accepted as f64 / load.seconds.max(1e-9),
        "events/s",
    );
    t.add("delivered/s", delivered_rate, "events/s");
    if let Some(ceiling) = ceiling {
        let (before, after) = ceiling.bracket().await?;
        t.add("ceiling right before", before, "req/s");
        t.add("ceiling right after", after, "req/s");
        t.add(
            "delivered/s ÷ ceiling",
            delivered_rate / ((before + after) / 2.0) * 100.0,
            "%",
        );
    }
    let mut ingest = load.ingest_latencies_ns;
    let mut e2e = report.latencies_ns;
    for (name, q) in [("p50", 0.50), ("p99", 0.99), ("p999", 0.999)] {
        t.add(
            &format!("ingest latency {name}"),
            percentile_ms(&mut ingest, q),
            "ms",
        );
    }
    for (name, q) in [("p50", 0.50), ("p99", 0.99), ("p999", 0.999)] {
        t.add(
            &format!("end-to-end latency {name}"),
            percentile_ms(&mut e2e, q),
            "ms",
        );
    }
    let fsyncs = metrics
        .get("herald_store_fsyncs_total")
        .copied()
        .unwrap_or(0.0);
    let accepted = metrics
        .get("herald_ingest_events_total{outcome=\"accepted\"}")
        .copied()
        .unwrap_or(0.0);
    t.add(
        "fsyncs per accepted event",
        fsyncs / accepted.max(1.0),
        "fsyncs",
    );
    t.add("503s answered", load.refused as f64, "requests");
    t.add("ingest errors", load.errors as f64, "requests");
    t.add("herald peak RSS", peak_rss, "MiB");
    t.add("herald CPU", cpu, "s");
    t.add(
        "duplicates at partner",
        (report.received - report.unique) as f64,
        "requests",
    );
    Ok(t.figures)
}

/// A partner limited to 1,000/s with a deep backlog of normal events, and
/// critical events arriving at a low rate: how long do the critical ones wait?
async fn throttled(options: &BenchOptions, epoch: Instant) -> Result<Vec<Figure>, String> {
    const LIMIT: f64 = 1000.0;
    const BURST: f64 = 10.0;
    let mut t = table("throttled partner (1,000/s) with a critical lane");
    let (backlog, critical) = if options.quick {
        (3_000, 20)
    } else {
        (20_000, 100)
    };
    let sink = Sink::start(epoch, true).await.map_err(|e| e.to_string())?;
    let herald = HeraldProcess::start(
        &options.exe,
        &sink.url(),
        "rate = { per_second = 1000, burst = 10 }",
    )
    .await?;
    let normal = LoadSpec {
        events: backlog,
        batch: 100,
        clients: 4,
        priority: "normal",
        rate: None,
    };
    let normal = load::run(&herald.url, process::TOKEN, &normal, epoch).await;
    let alerts = LoadSpec {
        events: critical,
        batch: 1,
        clients: 2,
        priority: "critical",
        rate: Some(20.0),
    };
    let alerts = load::run(&herald.url, process::TOKEN, &alerts, epoch).await;
    let waiting = sink.report().latencies_ns.len() as u64;
    let total = normal.accepted + alerts.accepted;
    wait_delivered(&sink, total, Duration::from_secs(60 + backlog / 500)).await?;
    let mut herald = herald;
    herald.stop()?;
    let report = sink.report();
    let mut latencies = report.critical_latencies_ns.clone();
    let busiest = report.per_second.iter().copied().max().unwrap_or(0);
    let over = report
        .per_second
        .iter()
        .filter(|&&n| n as f64 > LIMIT + BURST)
        .count();
    t.add("normal backlog", normal.accepted as f64, "events");
    t.add(
        "normal still queued when alerts began",
        (normal.accepted.saturating_sub(waiting)) as f64,
        "events",
    );
    t.add("critical events", alerts.accepted as f64, "events");
    t.add(
        "critical end-to-end p50",
        percentile_ms(&mut latencies, 0.50),
        "ms",
    );
    t.add(
        "critical end-to-end p99",
        percentile_ms(&mut latencies, 0.99),
        "ms",
    );
    // A safety alert's worst case: with 100 alerts, p99 is the second worst.
    t.add(
        "critical end-to-end max",
        percentile_ms(&mut latencies, 1.0),
        "ms",
    );
    t.add("busiest second at the partner", busiest as f64, "requests");
    t.add("seconds over the limit + burst", over as f64, "seconds");
    Ok(t.figures)
}

/// The least-squares slope of `points` (x, y); 0 for fewer than two.
fn slope(points: &[(f64, f64)]) -> f64 {
    if points.len() < 2 {
        return 0.0;
    }
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for &(x, y) in points {
        sxy += (x - mean_x) * (y - mean_y);
        sxx += (x - mean_x) * (x - mean_x);
    }
    if sxx == 0.0 {
        return 0.0;
    }
    sxy / sxx
}

/// The partner down (connection refused, then 503) while events pile up on
/// disk; then it comes back: memory during the backlog, restart with the
/// backlog on disk, and the drain.
async fn outage(options: &BenchOptions, epoch: Instant) -> Result<Vec<Figure>, String> {
    const LIMIT: f64 = 10_000.0;
    let mut t = table("outage and recovery (partner limit 10,000/s)");
    let events = options.outage_events;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let extra = "rate = { per_second = 10000, burst = 100 }\nretry = { initial_ms = 1000, max_interval_ms = 5000, max_age = \"72h\" }";
    let mut herald = HeraldProcess::start(&options.exe, &url, extra).await?;
    // RSS is read after each twentieth of the backlog: one reading per
    // quarter made the growth figure swing with whatever the allocator
    // held at that instant.
    const STEPS: u64 = 20;
    let mut rss: Vec<(f64, f64)> = Vec::new();
    let mut sink = None;
    let step = (events / STEPS).max(1);
    let mut accepted = 0;
    let mut seconds = 0.0;
    for part in 0..STEPS {
        if part == STEPS / 2 {
            // Half way: the partner's host is back, but answers 503.
            let down = Sink::start_on(epoch, true, &format!("127.0.0.1:{port}"))
                .await
                .map_err(|e| e.to_string())?;
            down.set_mode(sink::Mode::Unavailable);
            sink = Some(down);
        }
        let spec = LoadSpec {
            events: step,
            batch: 100,
            clients: options.clients,
            priority: "normal",
            rate: None,
        };
        let load = load::run(&herald.url, process::TOKEN, &spec, epoch).await;
        accepted += load.accepted;
        seconds += load.seconds;
        rss.push((accepted as f64, herald.rss_mib().0));
    }
    let sink = sink.ok_or("the sink never started")?;
    let (_, peak) = herald.rss_mib();
    t.add("events accepted while down", accepted as f64, "events");
    t.add(
        "accepted/s while down",
        accepted as f64 / seconds.max(1e-9),
        "events/s",
    );
    for quarter in 1..=4 {
        let at = (quarter * STEPS as usize / 4).saturating_sub(1);
        if let Some(&(_, mib)) = rss.get(at) {
            t.add(
                &format!("RSS at {}% of the backlog", quarter * 25),
                mib,
                "MiB",
            );
        }
    }
    t.add("peak RSS", peak, "MiB");
    // The first half includes warming up (sled's page cache filling to its
    // cap); what the second half adds is what each queued event costs.
    let second_half = &rss[(rss.len() / 2).saturating_sub(1)..];
    t.add(
        "RSS added per queued event, second half",
        slope(second_half) * 1_048_576.0,
        "bytes",
    );

    // Restart with the backlog on disk and the partner healthy again.
    herald.stop()?;
    sink.set_mode(sink::Mode::Accept);
    let restarted_ns = epoch.elapsed().as_nanos() as u64;
    herald.restart_stopped()?;
    let ready = herald.wait_ready(Duration::from_secs(120)).await?;
    wait_delivered(&sink, accepted, Duration::from_secs(120 + events / 2_000)).await?;
    let report = sink.report();
    herald.stop()?;
    let first = report.first_ns.saturating_sub(restarted_ns) as f64 / 1e9;
    let drain = report.last_ns.saturating_sub(report.first_ns) as f64 / 1e9;
    t.add("restart to ready", ready.as_secs_f64(), "s");
    t.add("restart to first delivery", first, "s");
    t.add("time to drain", drain, "s");
    let rate = report.unique as f64 / drain.max(1e-9);
    t.add("drain rate", rate, "events/s");
    t.add("drain rate ÷ partner limit", rate / LIMIT * 100.0, "%");
    t.add(
        "duplicates at partner",
        (report.received - report.unique) as f64,
        "requests",
    );
    Ok(t.figures)
}

async fn wait_delivered(sink: &Sink, accepted: u64, limit: Duration) -> Result<(), String> {
    let started = Instant::now();
    while sink.unique() < accepted {
        if started.elapsed() > limit {
            return Err(format!(
                "only {} of {accepted} accepted events reached the partner within {limit:?}",
                sink.unique()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn percentile_ms(samples: &mut [u64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_unstable();
    let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples[index.min(samples.len() - 1)] as f64 / 1e6
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} cores, {model}")
}

/// The report as a text table.
pub fn render(report: &BenchReport) -> String {
    format!(
        "herald bench on {}\n\n{}",
        report.machine,
        render_figures(&report.figures)
    )
}

fn render_figures(figures: &[Figure]) -> String {
    let mut out = String::new();
    // One width for every figure name, so tables printed apart still line up.
    let width = 40;
    let mut scenario = "";
    for f in figures {
        if f.scenario != scenario {
            scenario = &f.scenario;
            out.push_str(&format!("{scenario}\n"));
        }
        let value = if f.value >= 100.0 {
            format!("{:.0}", f.value)
        } else {
            format!("{:.3}", f.value)
        };
        out.push_str(&format!("  {:<width$}  {value:>12} {}\n", f.figure, f.unit));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::slope;

    #[test]
    fn slope_is_the_least_squares_fit_and_zero_without_two_points() {
        let line: Vec<(f64, f64)> = (0..10).map(|x| (x as f64, 3.0 + 0.5 * x as f64)).collect();
        assert!((slope(&line) - 0.5).abs() < 1e-12);
        // One reading off the line moves the fit far less than it moves
        // the difference between the last and a middle reading.
        let mut bumped = line.clone();
        bumped[9].1 += 5.0;
        assert!(slope(&bumped) < 1.0, "{}", slope(&bumped));
        assert_eq!(slope(&line[..1]), 0.0);
        assert_eq!(slope(&[(1.0, 2.0), (1.0, 3.0)]), 0.0);
    }
}
