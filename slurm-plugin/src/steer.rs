//! Steering a requeued wrapped job to nodes that can restore its checkpoint.
//!
//! Slurm 22.05 changes a job's Features only while it is pending, and a requeued
//! job becomes pending only after this step has ended, so slurmstepd starts
//! `vmctl pin-class` as root in the background: it waits for the job to be
//! pending (Slurm holds a requeued job back for about two minutes before it may
//! start again), then adds this node's CPU class to the job's Features, or holds
//! the job with an AdminComment if no node has that class.

use std::path::Path;
use std::process::{Command, Stdio};

pub fn pin_class(vmctl: &Path, job_id: u32) {
    let mut cmd = Command::new(vmctl);
    cmd.arg("pin-class")
        .arg("--job")
        .arg(job_id.to_string())
        .arg("--detach")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // With --detach the command returns at once, leaving a worker that init
    // adopted: slurmstepd kills its own descendants when the step ends.
    match cmd.status() {
        Ok(status) if status.success() => crate::spank::info(&format!(
            "job {job_id}: {} pin-class will add this node's CPU class to the job's Features once it is requeued (outcome in syslog)",
            vmctl.display(),
        )),
        Ok(status) => crate::spank::error(&format!(
            "job {job_id}: {} pin-class failed ({status}); a restart may land on a node that cannot restore it",
            vmctl.display()
        )),
        Err(e) => crate::spank::error(&format!(
            "job {job_id}: cannot run {} pin-class: {e}; a restart may land on a node that cannot restore it",
            vmctl.display()
        )),
    }
}
