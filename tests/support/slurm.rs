//! Queries and waits shared by the tests on the real local Slurm cluster
//! (tests/slurm_plugin.rs, tests/slurm_batch.rs).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{run_command, RunOutput};

/// How long one scontrol call may take before the test fails: they answer at
/// once on a cluster that is up.
const SCONTROL_TIMEOUT: Duration = Duration::from_secs(120);

fn scontrol(args: &[&str]) -> RunOutput {
    let mut cmd = Command::new("scontrol");
    cmd.args(args).current_dir(Path::new("/"));
    run_command(cmd, b"", SCONTROL_TIMEOUT)
}

/// Every `Key=Value` word of `scontrol show job -o JOB`, first one winning
/// (e.g. NodeList, not ReqNodeList). None once Slurm has forgotten the job.
pub fn job_fields(job: &str) -> Option<HashMap<String, String>> {
    let out = scontrol(&["show", "job", "-o", job]);
    if out.code != 0 {
        return None;
    }
    let mut fields = HashMap::new();
    for word in out.stdout_str().split_whitespace() {
        if let Some((k, v)) = word.split_once('=') {
            fields.entry(k.to_string()).or_insert_with(|| v.to_string());
        }
    }
    Some(fields)
}

/// One field of the job, empty once Slurm has forgotten the job.
pub fn job_field(job: &str, field: &str) -> String {
    job_fields(job)
        .and_then(|f| f.get(field).cloned())
        .unwrap_or_default()
}

/// Polls `probe` every 100 ms until it returns Some, failing the test after
/// `timeout` with `what` and the last thing `describe` says.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
    describe: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; {}",
            describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Lets a requeued (or preempted) job start now instead of after Slurm's
/// ~2 minute requeue hold. slurmd refuses a job released in the same clock
/// second as its requeue ("Job credential revoked": the revocation is stamped
/// in whole seconds), so this first waits, by the clock, until 2 whole seconds
/// have passed since `requeued_at`.
pub fn release(job: &str, requeued_at: u64) {
    poll(
        "2 whole seconds since the requeue",
        Duration::from_secs(5),
        || (unix_now() >= requeued_at + 2).then_some(()),
        String::new,
    );
    let out = scontrol(&["update", &format!("jobid={job}"), "starttime=now"]);
    assert_eq!(out.code, 0, "releasing {job}: {out:?}");
}
