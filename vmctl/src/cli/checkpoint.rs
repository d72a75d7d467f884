//! `vmctl checkpoint DIR`: ask the running job for a checkpoint and wait until it is
//! durable.

use crate::control::socket::request_checkpoint;
use crate::runner::DEFAULT_CHECKPOINT_TIMEOUT;
use clap::Args;
use std::path::PathBuf;

/// Exit status when the running vmctl tried and failed to write the checkpoint.
pub const EXIT_CHECKPOINT_FAILED: i32 = 1;

#[derive(Args, Debug)]
pub struct CheckpointCmd {
    /// The job's checkpoint directory (its --checkpoint-dir)
    pub dir: PathBuf,

    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn checkpoint(args: CheckpointCmd) -> i32 {
    let reply = match request_checkpoint(&args.dir, DEFAULT_CHECKPOINT_TIMEOUT) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmctl: {e}");
            return super::EXIT_VMCTL_FAILED;
        }
    };
    let ok = reply.get("ok").and_then(|v| v.as_bool()).unwrap_or(false);
    if args.json {
        println!("{reply}");
    } else if ok {
        let g = reply["generation"].as_u64().unwrap_or(0);
        let bytes = reply["bytes"].as_u64().unwrap_or(0);
        let secs = reply["seconds"].as_f64().unwrap_or(0.0);
        println!(
            "generation {g}: {:.1} MiB in {secs:.3} s ({})",
            bytes as f64 / (1 << 20) as f64,
            reply["path"].as_str().unwrap_or("")
        );
    }
    if !ok {
        eprintln!(
            "vmctl: checkpoint failed: {}",
            reply["error"].as_str().unwrap_or("unknown error")
        );
        return EXIT_CHECKPOINT_FAILED;
    }
    0
}
