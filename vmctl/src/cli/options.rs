//! Options shared by `run` and `restore`.

use crate::checkpoint::compress::Compression;
use crate::control::signals::{parse_signal, SignalAction};
use crate::runner::{CheckpointOptions, DEFAULT_KEEP};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

/// `--precopy=auto` copies memory while the job runs from this much RAM in use.
pub const PRECOPY_AUTO_BYTES: u64 = 256 << 20;

#[derive(Args, Debug, Clone)]
pub struct CheckpointArgs {
    /// Take checkpoints periodically, every SECS seconds
    #[arg(long, value_name = "SECS", value_parser = parse_interval)]
    pub checkpoint_interval: Option<u64>,

    /// How many complete generations to keep
    #[arg(long, value_name = "N", default_value_t = DEFAULT_KEEP, value_parser = parse_keep)]
    pub keep: usize,

    /// What a host signal does: SIG=checkpoint (take one and go on) or
    /// SIG=checkpoint-exit (take one and exit with status 75). Repeatable.
    #[arg(long = "on-signal", value_name = "SIG=ACTION", value_parser = parse_on_signal)]
    pub on_signal: Vec<(i32, SignalAction)>,

    /// How a restore brings back the files the job writes: journal[:SIZE] (cut appended
    /// files back, save overwritten data first, up to SIZE per generation, default 1G),
    /// truncate (cut appended files back, refuse if overwritten), refuse (refuse if the
    /// job changed them at all) or none (leave them)
    #[arg(long, value_name = "POLICY", default_value = "journal", value_parser = crate::filejournal::parse_policy)]
    pub files: crate::filejournal::Policy,

    /// Whether checkpoints after the first store only the pages changed since the
    /// previous one (KVM's dirty log stays on between checkpoints, which slows the
    /// guest's first write to each page after a checkpoint). auto: on with
    /// --checkpoint-interval.
    #[arg(long, value_name = "WHEN", default_value = "auto", value_parser = ["auto", "on", "off"])]
    pub incremental: String,

    /// Whether a checkpoint first copies memory while the job runs, in rounds, and
    /// stops the job only for the last round (pages written meanwhile) and the kernel
    /// state. auto: when the job uses 256 MiB or more.
    #[arg(long, value_name = "WHEN", default_value = "auto", value_parser = ["auto", "on", "off"])]
    pub precopy: String,

    /// How memory images are compressed, chunk by chunk: off, lz4, zstd or
    /// zstd:LEVEL (1-19; zstd is zstd:1). Worth it when the checkpoint directory is
    /// slower to write than compressing (a shared filesystem); docs/BENCHMARKS.md has
    /// ratios and speeds. Restores read any mix of compressed and plain generations.
    #[arg(long, value_name = "HOW", default_value = "off", value_parser = Compression::parse)]
    pub compress: Compression,

    /// A program whose state is its connections (such as srun): a process running
    /// it when a checkpoint is taken is not resumed by a restore but started again,
    /// the same process with the same command line, environment (plus
    /// VMCTL_REEXECUTED=1), descriptors and working directory. Repeatable; give it to
    /// restore as well, for the programs the restored job starts.
    #[arg(long, value_name = "PROGRAM")]
    pub reexec: Vec<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct KvmArgs {
    /// Use this inherited descriptor, already open on /dev/kvm, instead of opening it
    #[arg(long, value_name = "N")]
    pub kvm_fd: Option<i32>,
}

impl CheckpointArgs {
    pub fn options(&self, dir: Option<PathBuf>) -> Result<Option<CheckpointOptions>, String> {
        match dir {
            Some(dir) => Ok(Some(CheckpointOptions {
                dir,
                interval: self.checkpoint_interval.map(Duration::from_secs),
                keep: self.keep,
                incremental: match self.incremental.as_str() {
                    "on" => true,
                    "off" => false,
                    _ => self.checkpoint_interval.is_some(),
                },
                precopy_from: match self.precopy.as_str() {
                    "on" => Some(0),
                    "off" => None,
                    _ => Some(PRECOPY_AUTO_BYTES),
                },
                compress: self.compress,
            })),
            None if self.checkpoint_interval.is_some() => {
                Err("--checkpoint-interval needs --checkpoint-dir".into())
            }
            None => Ok(None),
        }
    }
}

fn parse_interval(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "'{s}' is not a whole number of seconds (1 or more)"
        )),
    }
}

fn parse_keep(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=1000).contains(&n) => Ok(n),
        _ => Err(format!("'{s}' is not a generation count from 1 to 1000")),
    }
}

fn parse_on_signal(s: &str) -> Result<(i32, SignalAction), String> {
    let (sig, action) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not SIG=ACTION, e.g. TERM=checkpoint-exit"))?;
    let signo =
        parse_signal(sig).ok_or_else(|| format!("'{sig}' is not a signal name or number"))?;
    if signo == libc::SIGKILL || signo == libc::SIGSTOP {
        return Err(format!("{sig} cannot be caught"));
    }
    let action = match action {
        "checkpoint" => SignalAction::Checkpoint,
        "checkpoint-exit" => SignalAction::CheckpointExit,
        "forward" => SignalAction::Forward,
        _ => {
            return Err(format!(
                "'{action}' is not an action: use checkpoint, checkpoint-exit or forward"
            ))
        }
    };
    Ok((signo, action))
}
