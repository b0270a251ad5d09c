//! herald as the bench runs it: a real child process on a fresh temp data
//! dir, watched through /proc (peak RSS, CPU seconds) and its /metrics.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "bench-ingest-token-0123456789";
const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

pub struct HeraldProcess {
    child: Child,
    pub url: String,
    pub dir: tempfile::TempDir,
    config: PathBuf,
    exe: PathBuf,
}

impl HeraldProcess {
    /// Starts `herald serve` with one webhook partner "sink" at `sink_url`;
    /// `partner_extra` adds keys to its table.
    pub async fn start(
        exe: &std::path::Path,
        sink_url: &str,
        partner_extra: &str,
    ) -> Result<HeraldProcess, String> {
        HeraldProcess::start_on(exe, sink_url, partner_extra, None).await
    }

    /// As [`HeraldProcess::start`], with the data dir at `data_dir` (on a
    /// filesystem the caller controls) instead of in its temp dir.
    pub async fn start_on(
        exe: &std::path::Path,
        sink_url: &str,
        partner_extra: &str,
        data_dir: Option<&std::path::Path>,
    ) -> Result<HeraldProcess, String> {
        // Its own HTTP clients (readiness, metrics) need rustls's provider.
        crate::dispatch::client::install_crypto_provider();
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let data = data_dir.map_or_else(|| dir.path().join("data"), |d| d.to_path_buf());
        let port = free_port()?;
        let config = dir.path().join("herald.toml");
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
data_dir = "{data}"
ingest_queue = 16384
# The bench measures herald, not how full this machine's disk is.
min_free_disk = "64MiB"

[[tokens]]
name = "bench"
role = "operator"
token_env = "HERALD_BENCH_TOKEN"

[partners.sink]
adapter = "webhook"
url = "{sink_url}"
secret_env = "HERALD_BENCH_SECRET"
allow_private = true
max_in_flight = 64
timeout_ms = 5000
{partner_extra}
"#,
            data = data.display()
        );
        std::fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
        let mut process = HeraldProcess {
            child: spawn(exe, &config, &dir)?,
            url: format!("http://127.0.0.1:{port}"),
            dir,
            config,
            exe: exe.to_path_buf(),
        };
        process.wait_ready(Duration::from_secs(30)).await?;
        Ok(process)
    }

    /// Adds `lines` to partner "sink"'s table (the config's last), for
    /// the next [`HeraldProcess::restart_stopped`].
    pub fn extend_partner_config(&self, lines: &str) -> Result<(), String> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.config)
            .map_err(|e| format!("{}: {e}", self.config.display()))?;
        writeln!(file, "{lines}").map_err(|e| format!("{}: {e}", self.config.display()))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls /readyz until it answers, the process dies, or `limit` passes.
    pub async fn wait_ready(&mut self, limit: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let client = reqwest::Client::new();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "herald exited with {status}; see {}",
                    self.log_path().display()
                ));
            }
            if let Ok(r) = client.get(format!("{}/readyz", self.url)).send().await {
                if r.status().is_success() {
                    return Ok(started.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Err("herald did not become ready".into())
    }

    /// Starts it again on the same data dir after [`HeraldProcess::stop`]
    /// or [`HeraldProcess::kill`].
    pub fn restart_stopped(&mut self) -> Result<(), String> {
        self.child = spawn(&self.exe, &self.config, &self.dir)?;
        Ok(())
    }

    /// SIGKILL: no shutdown, no flush; what the store made durable is all
    /// that survives. Returns once the process is gone.
    pub fn kill(&mut self) -> Result<(), String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(format!(
                "herald had already exited with {status}; see {}",
                self.log_path().display()
            ));
        }
        self.child
            .kill()
            .map_err(|e| format!("cannot kill herald: {e}"))?;
        self.child
            .wait()
            .map(|_| ())
            .map_err(|e| format!("waiting for herald: {e}"))
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("herald.log")
    }

    /// herald's counters and gauges from /metrics, by name (first series of each).
    pub async fn metrics(&self) -> HashMap<String, f64> {
        let mut out = HashMap::new();
        let Ok(response) = reqwest::Client::new()
            .get(format!("{}/metrics", self.url))
            .bearer_auth(TOKEN)
            .send()
            .await
        else {
            return out;
        };
        let Ok(text) = response.text().await else {
            return out;
        };
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some((name, value)) = line.rsplit_once(' ') {
                if let Ok(v) = value.parse::<f64>() {
                    out.entry(name.to_string()).or_insert(v);
                }
            }
        }
        out
    }

    /// (resident now, peak resident) in MiB, from /proc.
    pub fn rss_mib(&self) -> (f64, f64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
                .map_or(0.0, |kib| kib / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// User + system CPU seconds used so far, from /proc.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the ")" that closes the command name; utime and stime are 14 and 15.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        (ticks(11) + ticks(12)) / per_second
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) -> Result<(), String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(format!(
                "herald had already exited with {status}; see {}",
                self.log_path().display()
            ));
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        match self.child.wait() {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(format!(
                "herald exited with {status}; see {}",
                self.log_path().display()
            )),
            Err(e) => Err(format!("waiting for herald: {e}")),
        }
    }
}

impl Drop for HeraldProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn(
    exe: &std::path::Path,
    config: &std::path::Path,
    dir: &tempfile::TempDir,
) -> Result<Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("herald.log"))
        .map_err(|e| format!("log file: {e}"))?;
    Command::new(exe)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("HERALD_BENCH_TOKEN", TOKEN)
        .env("HERALD_BENCH_SECRET", SECRET)
        .env("HERALD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}
