//! `vmctl gc ROOT`: remove the checkpoint directories of jobs Slurm has forgotten.
//!
//! The vmwrap SPANK plugin keeps each job's checkpoints in `ROOT/<user>/<jobid>/...` and
//! never deletes them itself: a finished job can still be requeued while Slurm remembers
//! it (MinJobAge), and a requeued job needs its checkpoints however long it waits. So the
//! only safe rule is Slurm's own memory: a directory goes once `scontrol show job` no
//! longer knows its job id. Anything Slurm still lists (pending, running, requeued,
//! suspended, or finished but within MinJobAge) is kept.

use super::EXIT_VMCTL_FAILED;
use clap::Args;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Args, Debug)]
pub struct GcArgs {
    /// The plugin's checkpoint_root, holding <user>/<jobid>/ directories
    pub root: PathBuf,

    /// Only print what would be removed
    #[arg(long)]
    pub dry_run: bool,

    /// The scontrol program that answers for slurmctld
    #[arg(long, value_name = "PATH", default_value = "scontrol")]
    pub scontrol: PathBuf,
}

/// What slurmctld says about one job id.
#[derive(Debug, PartialEq, Eq)]
enum JobStatus {
    /// Slurm still has the job, in this state.
    Known(String),
    /// slurmctld answered that there is no such job.
    Unknown,
}

/// A job directory and its fate.
struct Entry {
    dir: PathBuf,
    job_id: u64,
    status: JobStatus,
}

pub fn gc(args: GcArgs) -> i32 {
    let jobs = match job_dirs(&args.root) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("vmctl gc: {e}");
            return EXIT_VMCTL_FAILED;
        }
    };
    // Ask about every job before removing anything: if slurmctld cannot be reached (or
    // answers oddly) part-way, nothing has been removed on a guess.
    let mut plan = Vec::with_capacity(jobs.len());
    for (dir, job_id) in jobs {
        match query(&args.scontrol, job_id) {
            Ok(status) => plan.push(Entry {
                dir,
                job_id,
                status,
            }),
            Err(e) => {
                eprintln!("vmctl gc: {e}; removed nothing");
                return EXIT_VMCTL_FAILED;
            }
        }
    }
    let mut removed = 0;
    let mut kept = 0;
    let mut failed = false;
    for entry in plan {
        match entry.status {
            JobStatus::Known(state) => {
                kept += 1;
                if args.dry_run {
                    println!(
                        "keep {} (job {} is {state})",
                        entry.dir.display(),
                        entry.job_id
                    );
                }
            }
            JobStatus::Unknown if args.dry_run => {
                removed += 1;
                println!(
                    "would remove {} (job {} unknown to Slurm)",
                    entry.dir.display(),
                    entry.job_id
                );
            }
            JobStatus::Unknown => {
                // remove_dir_all does not follow symlinks, so a link a user plants in their
                // own job directory cannot make this root process delete elsewhere.
                match std::fs::remove_dir_all(&entry.dir) {
                    Ok(()) => {
                        removed += 1;
                        println!(
                            "removed {} (job {} unknown to Slurm)",
                            entry.dir.display(),
                            entry.job_id
                        );
                    }
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => {
                        eprintln!("vmctl gc: cannot remove {}: {e}", entry.dir.display());
                        failed = true;
                    }
                }
            }
        }
    }
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    println!("vmctl gc: {verb} {removed} job directories, kept {kept} of jobs Slurm still knows");
    if failed {
        EXIT_VMCTL_FAILED
    } else {
        0
    }
}

/// The `ROOT/<user>/<jobid>` directories, sorted. Entries that do not look like the
/// plugin's (a non-numeric job id, a symlink, a plain file) are left alone.
fn job_dirs(root: &Path) -> Result<Vec<(PathBuf, u64)>, String> {
    let users =
        std::fs::read_dir(root).map_err(|e| format!("cannot read {}: {e}", root.display()))?;
    let mut out = Vec::new();
    for user in users {
        let user = user.map_err(|e| format!("cannot read {}: {e}", root.display()))?;
        if !user.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let user_dir = user.path();
        let jobs = std::fs::read_dir(&user_dir)
            .map_err(|e| format!("cannot read {}: {e}", user_dir.display()))?;
        for job in jobs {
            let job = job.map_err(|e| format!("cannot read {}: {e}", user_dir.display()))?;
            if !job.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Some(id) = job.file_name().to_str().and_then(parse_job_id) else {
                continue;
            };
            out.push((job.path(), id));
        }
    }
    out.sort();
    Ok(out)
}

/// A Slurm job id as the plugin names its directories: plain decimal, no sign or
/// leading zero (so "007" is not taken for job 7 and removed by mistake).
fn parse_job_id(name: &str) -> Option<u64> {
    if name.is_empty()
        || !name.bytes().all(|b| b.is_ascii_digit())
        || (name.len() > 1 && name.starts_with('0'))
    {
        return None;
    }
    name.parse().ok()
}

fn query(scontrol: &Path, job_id: u64) -> Result<JobStatus, String> {
    let out = Command::new(scontrol)
        .args(["show", "job", "-o", &job_id.to_string()])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", scontrol.display()))?;
    classify(
        job_id,
        out.status.success(),
        &String::from_utf8_lossy(&out.stdout),
        &String::from_utf8_lossy(&out.stderr),
    )
}

/// Reads scontrol's answer. Only its explicit "Invalid job id" counts as "forgotten":
/// every other failure (controller down, authentication, a changed message) must stop
/// the collection rather than be taken as permission to delete.
fn classify(job_id: u64, success: bool, stdout: &str, stderr: &str) -> Result<JobStatus, String> {
    if success {
        let wanted = format!("JobId={job_id}");
        for line in stdout.lines() {
            let mut words = line.split_whitespace();
            if words.clone().any(|w| w == wanted) {
                let state = words
                    .find_map(|w| w.strip_prefix("JobState="))
                    .unwrap_or("UNKNOWN");
                return Ok(JobStatus::Known(state.to_string()));
            }
        }
        // An array or heterogeneous job answers with its other members' lines; the id is
        // still one Slurm knows.
        if stdout.contains("JobId=") {
            return Ok(JobStatus::Known("UNKNOWN".into()));
        }
        return Err(format!(
            "scontrol show job {job_id} printed no job: {:?}",
            stdout.trim()
        ));
    }
    if stderr.contains("Invalid job id specified") {
        return Ok(JobStatus::Unknown);
    }
    let why = stderr.trim();
    let why = if why.is_empty() { "no message" } else { why };
    Err(format!(
        "cannot ask slurmctld about job {job_id} (scontrol show job failed: {why})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids() {
        assert_eq!(parse_job_id("42"), Some(42));
        assert_eq!(parse_job_id("0"), Some(0));
        assert_eq!(parse_job_id("042"), None);
        assert_eq!(parse_job_id("4_2"), None);
        assert_eq!(parse_job_id(""), None);
        assert_eq!(parse_job_id("+4"), None);
    }

    #[test]
    fn answers() {
        let line = "JobId=7 JobName=x UserId=u(1) JobState=PENDING Reason=BeginTime";
        assert_eq!(
            classify(7, true, line, ""),
            Ok(JobStatus::Known("PENDING".into()))
        );
        assert_eq!(
            classify(
                7,
                false,
                "",
                "slurm_load_jobs error: Invalid job id specified\n"
            ),
            Ok(JobStatus::Unknown)
        );
        let down = classify(
            7,
            false,
            "",
            "slurm_load_jobs error: Unable to contact slurm controller (connect failure)",
        );
        assert!(down.unwrap_err().contains("Unable to contact"));
        assert!(classify(7, false, "", "").is_err());
        assert!(classify(7, true, "", "").is_err());
        // JobId=70 must not be mistaken for JobId=7.
        assert_eq!(
            classify(
                7,
                true,
                "JobId=70 JobState=RUNNING\nJobId=7 JobState=COMPLETED",
                ""
            ),
            Ok(JobStatus::Known("COMPLETED".into()))
        );
    }
}
