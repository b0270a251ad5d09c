//! `powercut-fs --backing DIR --mount DIR`: mounts the power-cut
//! filesystem (see the library's doc) until a signal:
//!
//! - SIGUSR1 cuts the power: unsynced writes and name changes are lost (or
//!   `--keep-share` of them kept, chosen by `--seed`), then it unmounts.
//! - SIGTERM or SIGINT unmounts in order: everything written is kept.
//!
//! It prints `mounted` on stdout once the mount serves, and what a cut
//! dropped on stderr.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use nix::sys::signal::{SigSet, Signal};
use powercut_fs::{MetadataModel, Mounted, Options};

#[derive(Clone, Copy, ValueEnum)]
enum Metadata {
    /// A name change is durable once its directory is fsynced.
    Strict,
    /// Any fsync makes every earlier name change durable.
    Ordered,
}

#[derive(Parser)]
#[command(about = "A FUSE filesystem that loses unsynced data at a simulated power cut")]
struct Args {
    /// The directory that holds what the disk kept.
    #[arg(long)]
    backing: PathBuf,
    /// Where to mount it (an existing directory).
    #[arg(long)]
    mount: PathBuf,
    #[arg(long, value_enum, default_value = "strict")]
    metadata: Metadata,
    /// At a cut, the share (0 to 1) of unsynced writes that survives.
    #[arg(long, default_value_t = 0.0)]
    keep_share: f64,
    /// Chooses which unsynced writes survive a cut.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 4)]
    threads: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Blocked here, so the serving threads inherit the mask and the
    // signals wait for `wait` below.
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGUSR1, Signal::SIGTERM, Signal::SIGINT] {
        signals.add(signal);
    }
    if let Err(e) = signals.thread_block() {
        eprintln!("powercut-fs: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    let options = Options {
        metadata: match args.metadata {
            Metadata::Strict => MetadataModel::Strict,
            Metadata::Ordered => MetadataModel::Ordered,
        },
        threads: args.threads,
    };
    let mounted = match Mounted::mount(&args.backing, &args.mount, &options) {
        Ok(mounted) => mounted,
        Err(e) => {
            eprintln!(
                "powercut-fs: cannot mount {} at {}: {e}",
                args.backing.display(),
                args.mount.display()
            );
            return ExitCode::FAILURE;
        }
    };
    println!("mounted");
    let _ = std::io::stdout().flush();
    let signal = match signals.wait() {
        Ok(signal) => signal,
        Err(e) => {
            eprintln!("powercut-fs: waiting for a signal: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ended = match signal {
        Signal::SIGUSR1 => mounted
            .cut(args.seed, args.keep_share)
            .map(|report| eprintln!("powercut-fs: power cut: {report}")),
        _ => mounted.unmount(),
    };
    match ended {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("powercut-fs: unmounting {}: {e}", args.mount.display());
            ExitCode::FAILURE
        }
    }
}
