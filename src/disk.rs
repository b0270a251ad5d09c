//! Disk space as a managed resource: ingest stops before the data dir's
//! filesystem is full, so what is already accepted can still be delivered.
//!
//! Every delivery writes (its outcome, a retry, a dead letter), so a store
//! that filled its disk with events could not drain them. Like RabbitMQ's
//! `disk_free_limit` alarm (publishers blocked, consumers go on) and
//! Elasticsearch's flood-stage watermark, herald refuses new events once
//! the free space drops under `server.min_free_disk`, and goes on
//! delivering. Safety alerts keep a reserve: between `server.min_free_disk`
//! and the floor below it (`server.min_free_disk` less
//! `server.critical_disk_reserve`) critical events are still taken; under
//! the floor nothing is, and what is left is for deliveries in progress.
//! Each way back up needs a tenth of `min_free_disk` more than the way
//! down ([`decide`]), so ingest does not flap on and off at the limit.
//!
//! The free space is read with statvfs on a timer ([`CHECK_EVERY`]) and
//! right after a failed store write. The timer is the machine's, not
//! herald's injectable clock: it polls a physical resource and schedules
//! nothing, and a test's stopped clock must not stop it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;

use crate::store::Store;

/// How often the free space is read. At a few hundred MB/s of writes this
/// lets ingest overshoot the limit by tens of MB at most: far less than
/// any sensible `min_free_disk`.
pub(crate) const CHECK_EVERY: Duration = Duration::from_millis(250);

/// What a refused ingest request is told to wait before trying again.
pub(crate) const RETRY_AFTER_SECS: u64 = 5;

/// A size in the config: bytes, or a share of the filesystem's size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    Bytes(u64),
    /// Percent of the filesystem, in [0, 100).
    Percent(f64),
}

impl Limit {
    /// `"256MiB"`, `"1 GB"`, `"0"` or `"5%"`; the error says what is wrong.
    pub(crate) fn parse(text: &str) -> Result<Limit, String> {
        let trimmed = text.trim();
        let example = "a size like \"256MiB\" or a share of the filesystem like \"5%\"";
        if let Some(number) = trimmed.strip_suffix('%') {
            let percent: f64 = number
                .trim()
                .parse()
                .map_err(|_| format!("{text:?} is not {example}"))?;
            if !percent.is_finite() || percent < 0.0 {
                return Err(format!("{text:?} must be a share of at least 0%"));
            }
            if percent >= 100.0 {
                return Err(format!(
                    "{text:?} is the whole filesystem or more; it must be under 100%"
                ));
            }
            return Ok(Limit::Percent(percent));
        }
        if trimmed.starts_with('-') {
            return Err(format!("{text:?} must not be negative"));
        }
        // A bare number would be bytes: almost never what was meant.
        if trimmed.parse::<f64>().is_ok_and(|n| n != 0.0) {
            return Err(format!(
                "{text:?} has no unit: write it like \"{trimmed}GiB\", \"{trimmed}MB\" or \"{trimmed}%\""
            ));
        }
        trimmed
            .parse::<ByteSize>()
            .map(|size| Limit::Bytes(size.as_u64()))
            .map_err(|_| format!("{text:?} is not {example}"))
    }

    /// The limit in bytes on a filesystem of `total` bytes.
    pub(crate) fn bytes_of(self, total: u64) -> u64 {
        match self {
            Limit::Bytes(n) => n,
            Limit::Percent(p) => (total as f64 * p / 100.0) as u64,
        }
    }

    pub(crate) fn is_zero(self) -> bool {
        match self {
            Limit::Bytes(n) => n == 0,
            Limit::Percent(p) => p == 0.0,
        }
    }

    /// Whether this limit is certainly not below `other`, whatever the
    /// filesystem's size (`None`: it depends on the size).
    pub(crate) fn at_least(self, other: Limit) -> Option<bool> {
        match (self, other) {
            (Limit::Bytes(a), Limit::Bytes(b)) => Some(a >= b),
            (Limit::Percent(a), Limit::Percent(b)) => Some(a >= b),
            _ => None,
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Bytes(n) => write!(f, "{}", ByteSize(*n)),
            Limit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// `server.min_free_disk` and `server.critical_disk_reserve` as configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiskPolicy {
    pub min_free: Limit,
    /// `None`: half of `min_free`.
    pub critical_reserve: Option<Limit>,
}

impl Default for DiskPolicy {
    fn default() -> Self {
        DiskPolicy {
            min_free: Limit::Percent(5.0),
            critical_reserve: None,
        }
    }
}

/// The policy in bytes, for one filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Thresholds {
    /// Under this, normal events are refused (0: never).
    pub min_free: u64,
    /// Under this, every event is refused.
    pub floor: u64,
    /// How far above a threshold the free space must climb to lift it.
    pub margin: u64,
}

impl Thresholds {
    /// `policy` on a filesystem of `total` bytes; the error names the key.
    pub(crate) fn resolve(policy: DiskPolicy, total: u64) -> Result<Thresholds, String> {
        let min_free = policy.min_free.bytes_of(total);
        if min_free > 0 && min_free >= total {
            return Err(format!(
                "server.min_free_disk: {} is not below the size of the data dir's filesystem ({}): \
                 herald would never accept an event",
                ByteSize(min_free),
                ByteSize(total)
            ));
        }
        let reserve = match policy.critical_reserve {
            Some(limit) => limit.bytes_of(total),
            None => min_free / 2,
        };
        if reserve > 0 && reserve >= min_free {
            return Err(format!(
                "server.critical_disk_reserve: {} is not below server.min_free_disk ({} on this \
                 filesystem of {}): the reserve is the part of min_free_disk critical events may use",
                ByteSize(reserve),
                ByteSize(min_free),
                ByteSize(total)
            ));
        }
        Ok(Thresholds {
            min_free,
            floor: min_free - reserve,
            margin: min_free / 10,
        })
    }
}

/// Which events ingest takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Intake {
    All,
    /// Free space is under `min_free_disk`: critical events only.
    CriticalOnly,
    /// Free space is under the floor: none.
    Refused,
}

impl Intake {
    fn from_u8(n: u8) -> Intake {
        match n {
            0 => Intake::All,
            1 => Intake::CriticalOnly,
            _ => Intake::Refused,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Intake::All => 0,
            Intake::CriticalOnly => 1,
            Intake::Refused => 2,
        }
    }
}

/// What ingest takes with `free` bytes free, having taken `was` until now:
/// it gets stricter as soon as the free space drops under a threshold, and
/// lifts a restriction only once the space is `margin` above it.
pub(crate) fn decide(was: Intake, free: u64, t: &Thresholds) -> Intake {
    if t.min_free == 0 {
        return Intake::All;
    }
    // What the free space allows on the way down...
    let falling = if free < t.floor {
        Intake::Refused
    } else if free < t.min_free {
        Intake::CriticalOnly
    } else {
        Intake::All
    };
    // ...and on the way up, where each step needs its margin (never
    // looser than `falling`: its thresholds are higher).
    let rising = if free >= t.min_free.saturating_add(t.margin) {
        Intake::All
    } else if free >= t.floor.saturating_add(t.margin) {
        Intake::CriticalOnly
    } else {
        Intake::Refused
    };
    // Looser than before only as far as `rising` allows; never looser
    // than `falling`.
    falling.stricter(was.looser(rising))
}

impl Intake {
    fn stricter(self, other: Intake) -> Intake {
        if self.as_u8() >= other.as_u8() {
            self
        } else {
            other
        }
    }

    fn looser(self, other: Intake) -> Intake {
        if self.as_u8() <= other.as_u8() {
            self
        } else {
            other
        }
    }
}

/// The data dir's filesystem: free (to unprivileged users) and total bytes.
#[derive(Debug, Clone, Copy)]
pub struct Space {
    pub free: u64,
    pub total: u64,
}

/// statvfs of `dir`: what a write there can still use.
pub fn measure(dir: &Path) -> Result<Space, String> {
    let stat = nix::sys::statvfs::statvfs(dir)
        .map_err(|e| format!("cannot read the free space of {}: {e}", dir.display()))?;
    // statvfs counts blocks in fragments; a filesystem that leaves that
    // unset counts them in blocks.
    let block = match stat.fragment_size() as u64 {
        0 => stat.block_size() as u64,
        n => n,
    };
    Ok(Space {
        free: (stat.blocks_available() as u64).saturating_mul(block),
        total: (stat.blocks() as u64).saturating_mul(block),
    })
}

/// The bytes the files under `dir` take on disk (allocated blocks: sled's
/// log file may be sparse).
pub(crate) fn used_by(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => used_by(&entry.path()),
            Ok(m) => m.blocks().saturating_mul(512),
            Err(_) => 0,
        })
        .sum()
}

/// The data dir's free space as ingest sees it, kept current by [`DiskWatch::run`].
pub(crate) struct DiskWatch {
    dir: PathBuf,
    thresholds: Thresholds,
    intake: AtomicU8,
    free: AtomicU64,
}

impl DiskWatch {
    /// Reads the filesystem of `dir` once and resolves `policy` on it.
    /// `dir` need not exist yet (a first start): its filesystem is the one
    /// of the nearest directory above it that does.
    pub(crate) fn new(dir: &Path, policy: DiskPolicy) -> Result<Arc<DiskWatch>, String> {
        let existing = dir.ancestors().find(|p| p.is_dir()).unwrap_or(dir);
        let space = measure(existing)?;
        let thresholds = Thresholds::resolve(policy, space.total)?;
        let watch = Arc::new(DiskWatch {
            dir: dir.to_path_buf(),
            thresholds,
            intake: AtomicU8::new(Intake::All.as_u8()),
            free: AtomicU64::new(space.free),
        });
        watch.apply(space);
        watch.measure_store();
        Ok(watch)
    }

    pub(crate) fn intake(&self) -> Intake {
        Intake::from_u8(self.intake.load(Ordering::Acquire))
    }

    /// Reads the free space now and moves the intake with it.
    pub(crate) fn check(&self) {
        match measure(&self.dir) {
            Ok(space) => self.apply(space),
            Err(e) => tracing::warn!(error = %e, "keeping the last reading of the disk"),
        }
        self.measure_store();
    }

    fn measure_store(&self) {
        metrics::gauge!(crate::telemetry::STORE_DISK).set(used_by(&self.dir) as f64);
    }

    fn apply(&self, space: Space) {
        self.free.store(space.free, Ordering::Release);
        metrics::gauge!(crate::telemetry::DISK_FREE).set(space.free as f64);
        metrics::gauge!(crate::telemetry::DISK_TOTAL).set(space.total as f64);
        metrics::gauge!(crate::telemetry::DISK_MIN_FREE).set(self.thresholds.min_free as f64);
        let was = self.intake();
        let now = decide(was, space.free, &self.thresholds);
        metrics::gauge!(crate::telemetry::DISK_INTAKE).set(now.as_u8() as f64);
        if now == was {
            return;
        }
        self.intake.store(now.as_u8(), Ordering::Release);
        let free = ByteSize(space.free);
        match now {
            Intake::All => {
                tracing::info!(%free, "disk space is back: ingest takes every event again")
            }
            Intake::CriticalOnly => {
                tracing::warn!(%free, min_free = %ByteSize(self.thresholds.min_free),
                "disk space is low: ingest takes critical events only; deliveries go on")
            }
            Intake::Refused => tracing::error!(%free, floor = %ByteSize(self.thresholds.floor),
                "disk space is at its floor: ingest refuses every event; deliveries go on"),
        }
    }

    /// Why ingest does not take a request now, or `None` when it does;
    /// `all_critical`: every event in it is critical.
    pub(crate) fn refusal(&self, all_critical: bool) -> Option<String> {
        let t = &self.thresholds;
        let free = ByteSize(self.free.load(Ordering::Acquire));
        match self.intake() {
            Intake::All => None,
            Intake::CriticalOnly if all_critical => None,
            Intake::CriticalOnly => Some(format!(
                "the data dir's disk has {free} free, under server.min_free_disk ({}): only \
                 critical events are accepted until it has {} free; deliveries go on",
                ByteSize(t.min_free),
                ByteSize(t.min_free + t.margin)
            )),
            Intake::Refused => Some(format!(
                "the data dir's disk has {free} free, under the floor kept for deliveries ({}: \
                 server.min_free_disk less server.critical_disk_reserve): no events are \
                 accepted until it has {} free; deliveries go on",
                ByteSize(t.floor),
                ByteSize(t.floor + t.margin)
            )),
        }
    }

    /// What `/readyz` says while ingest refuses normal events.
    pub(crate) fn not_ready(&self) -> Option<String> {
        let why = self.refusal(false)?;
        Some(match self.intake() {
            Intake::CriticalOnly => format!("disk low: {why}"),
            _ => format!("disk full: {why}"),
        })
    }

    /// Reads the free space every [`CHECK_EVERY`], and at once after a
    /// store write failed. Runs until aborted.
    pub(crate) async fn run(self: Arc<Self>, store: Store) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = store.write_failed() => {}
            }
            self.check();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn limits_parse_as_sizes_or_shares_and_errors_say_why() {
        assert_eq!(Limit::parse("256MiB"), Ok(Limit::Bytes(256 * MIB)));
        assert_eq!(Limit::parse("1 GB"), Ok(Limit::Bytes(1_000_000_000)));
        assert_eq!(Limit::parse("0"), Ok(Limit::Bytes(0)));
        assert_eq!(Limit::parse("5%"), Ok(Limit::Percent(5.0)));
        assert_eq!(Limit::parse("2.5 %"), Ok(Limit::Percent(2.5)));
        for (text, words) in [
            ("lots", "is not a size like \"256MiB\""),
            ("12 parsecs", "is not a size"),
            ("-5MiB", "must not be negative"),
            ("-1%", "at least 0%"),
            ("100%", "under 100%"),
            ("abc%", "is not a size"),
            ("", "is not a size"),
            (
                "5",
                "has no unit: write it like \"5GiB\", \"5MB\" or \"5%\"",
            ),
        ] {
            let err = Limit::parse(text).expect_err(text);
            assert!(err.contains(words), "{text}: {err}");
        }
        assert_eq!(Limit::Percent(5.0).bytes_of(200 * MIB), 10 * MIB);
    }

    #[test]
    fn thresholds_keep_the_reserve_inside_the_limit() {
        let policy = |min_free, reserve| DiskPolicy {
            min_free,
            critical_reserve: reserve,
        };
        let t = Thresholds::resolve(policy(Limit::Percent(5.0), None), 1000 * MIB).expect("ok");
        assert_eq!(t.min_free, 50 * MIB);
        assert_eq!(t.floor, 25 * MIB, "half of it by default");
        assert_eq!(t.margin, 5 * MIB);
        let t = Thresholds::resolve(
            policy(Limit::Bytes(16 * MIB), Some(Limit::Bytes(6 * MIB))),
            48 * MIB,
        )
        .expect("ok");
        assert_eq!((t.min_free, t.floor), (16 * MIB, 10 * MIB));
        let off = Thresholds::resolve(policy(Limit::Bytes(0), None), 48 * MIB).expect("off");
        assert_eq!(decide(Intake::All, 0, &off), Intake::All);

        let err = Thresholds::resolve(
            policy(Limit::Percent(5.0), Some(Limit::Bytes(60 * MIB))),
            1000 * MIB,
        )
        .expect_err("reserve over the limit");
        assert!(
            err.starts_with("server.critical_disk_reserve: 60.0 MiB is not below"),
            "{err}"
        );
        assert!(err.contains("50.0 MiB"), "{err}");
        let err = Thresholds::resolve(policy(Limit::Bytes(64 * MIB), None), 48 * MIB)
            .expect_err("over the filesystem");
        assert!(err.starts_with("server.min_free_disk: 64.0 MiB"), "{err}");
        let err = Thresholds::resolve(policy(Limit::Bytes(0), Some(Limit::Bytes(1))), 48 * MIB)
            .expect_err("a reserve with no limit");
        assert!(err.starts_with("server.critical_disk_reserve"), "{err}");
    }

    /// min_free 100, floor 60, margin 10, in plain numbers.
    const T: Thresholds = Thresholds {
        min_free: 100,
        floor: 60,
        margin: 10,
    };

    #[test]
    fn falling_free_space_refuses_normal_events_then_all() {
        use Intake::*;
        let mut intake = All;
        let mut seen = Vec::new();
        for free in [150, 101, 100, 99, 80, 61, 60, 59, 0] {
            intake = decide(intake, free, &T);
            seen.push(intake);
        }
        assert_eq!(
            seen,
            [
                All,
                All,
                All,
                CriticalOnly,
                CriticalOnly,
                CriticalOnly,
                CriticalOnly,
                Refused,
                Refused
            ]
        );
        // A sudden drop skips a step.
        assert_eq!(decide(All, 10, &T), Refused);
    }

    #[test]
    fn rising_free_space_lifts_each_step_only_past_its_margin() {
        use Intake::*;
        let mut intake = Refused;
        let mut seen = Vec::new();
        for free in [59, 60, 65, 69, 70, 90, 100, 105, 109, 110, 500] {
            intake = decide(intake, free, &T);
            seen.push(intake);
        }
        assert_eq!(
            seen,
            [
                Refused,
                Refused,
                Refused,
                Refused,
                CriticalOnly,
                CriticalOnly,
                CriticalOnly,
                CriticalOnly,
                CriticalOnly,
                All,
                All
            ]
        );
        // Space that comes back at once lifts everything.
        assert_eq!(decide(Refused, 1_000, &T), All);
        // Hovering at the limit does not flap.
        let mut intake = CriticalOnly;
        for free in [99, 101, 99, 105, 98, 109] {
            intake = decide(intake, free, &T);
            assert_eq!(intake, CriticalOnly, "at {free}");
        }
        // Falling back under the floor while critical-only refuses all.
        assert_eq!(decide(CriticalOnly, 59, &T), Refused);
        // Between the floor's margin and min_free, from refused: critical only.
        assert_eq!(decide(Refused, 99, &T), CriticalOnly);
    }
}
