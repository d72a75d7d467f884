//! The batch script of an `sbatch --vm-wrap` job, wrapped like a step.
//!
//! slurmstepd writes the script into its spool directory (a different path on
//! each node, removed when the job ends) and executes it as the batch step's
//! one task. A checkpointed shell still has the script open and reads on from
//! its offset, so the plugin runs a copy kept in the checkpoint directory
//! (shared between the nodes): the restored job finds its script at the same
//! path wherever it resumes, and nothing done to the spool copy or to the
//! user's original file reaches it.
//!
//! With `timelimit=continue` a watcher process, forked from the batch task
//! before it becomes vmctl, requeues the job shortly before its time limit:
//! Slurm's SIGTERM makes vmctl checkpoint and exit 75, and the next run of
//! the job resumes from that checkpoint.

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::RawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::dirs::{FINISHED_MARKER, IDENTITY_FILE};
use crate::launch::StepIdentity;

/// Name of the script's copy in the batch checkpoint directory.
pub const SCRIPT_COPY: &str = "script";
/// What step.json records as the script's argv[0]: the spool path differs
/// from node to node, and the copy is what runs.
const SCRIPT_ARGV0: &str = "(batch script)";

/// Copies the spool script into `dir` (as the job user, on a fresh start)
/// and returns the copy's path. Written under a temporary name and renamed,
/// so a half-written copy is never what runs.
pub fn copy_script(spool_script: &Path, dir: &Path) -> Result<PathBuf, String> {
    let copy = dir.join(SCRIPT_COPY);
    let partial = dir.join(format!(".{SCRIPT_COPY}.partial"));
    std::fs::copy(spool_script, &partial).map_err(|e| {
        format!(
            "cannot copy the batch script {} to {}: {e}",
            spool_script.display(),
            partial.display()
        )
    })?;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o700))
        .and_then(|()| std::fs::rename(&partial, &copy))
        .map_err(|e| format!("cannot put the batch script in {}: {e}", copy.display()))?;
    Ok(copy)
}

/// The batch step's argv as step.json records it.
pub fn identity_argv(argv: &[OsString]) -> Vec<String> {
    std::iter::once(SCRIPT_ARGV0.to_string())
        .chain(
            argv.iter()
                .skip(1)
                .map(|a| a.to_string_lossy().into_owned()),
        )
        .collect()
}

/// The newest generation's name in a checkpoint directory, for messages.
pub fn latest_generation(dir: &Path) -> Option<String> {
    let target = std::fs::read_link(dir.join("latest")).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// The job's srun steps that an earlier run left interrupted: a step (or
/// task) directory beside `batch_dir` holding a checkpoint but no
/// `finished` marker. Returns (step directory name, its command, its path).
/// Read as the job user when the batch script is restored, to say on the
/// job's stderr which steps are resumed by the restored script's sruns.
pub fn interrupted_steps(batch_dir: &Path) -> Vec<(String, String, PathBuf)> {
    let Some(job_dir) = batch_dir.parent() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(job_dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let step_dir = entry.path();
        // A one-task step checkpoints in its directory, others in task<N>.
        let mut dirs = vec![step_dir.clone()];
        if let Ok(tasks) = std::fs::read_dir(&step_dir) {
            dirs.extend(
                tasks
                    .flatten()
                    .filter(|t| t.file_name().to_string_lossy().starts_with("task"))
                    .map(|t| t.path()),
            );
        }
        let interrupted = dirs.iter().find(|d| {
            d.join("latest").symlink_metadata().is_ok() && !d.join(FINISHED_MARKER).exists()
        });
        if let Some(dir) = interrupted {
            let command = std::fs::read(dir.join(IDENTITY_FILE))
                .ok()
                .and_then(|t| serde_json::from_slice::<StepIdentity>(&t).ok())
                .map_or_else(|| "?".into(), |id| id.argv.join(" "));
            found.push((name, command, step_dir));
        }
    }
    found.sort();
    found
}

/// True when the task's stdout is an empty regular file: on a restore that
/// means Slurm truncated the output file (its default open mode for a
/// restarted job), losing what the job printed before.
pub fn output_was_emptied() -> bool {
    // SAFETY: fstat of descriptor 1 into a zeroed stat buffer we own.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(1, &mut st) == 0
            && (st.st_mode & libc::S_IFMT) == libc::S_IFREG
            && st.st_size == 0
    }
}

/// Parses squeue's `%L` (time left): `SS`, `MM:SS`, `HH:MM:SS` or
/// `D-HH:MM:SS`. None for `UNLIMITED`, `INVALID`, `NOT_SET` and anything
/// else that is not a duration.
pub fn parse_time_left(text: &str) -> Option<u64> {
    let text = text.trim();
    let (days, clock) = match text.split_once('-') {
        Some((d, rest)) => (d.parse::<u64>().ok()?, rest),
        None => (0, text),
    };
    let mut secs = 0u64;
    let parts: Vec<&str> = clock.split(':').collect();
    if parts.is_empty() || parts.len() > 3 {
        return None;
    }
    for part in &parts {
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        secs = secs * 60 + part.parse::<u64>().ok()?;
    }
    Some(days * 86_400 + secs)
}

/// What the watcher needs to know, fixed when the batch task starts.
pub struct Watch {
    pub job_id: u32,
    /// None: a third of the cluster's KillWait, at least MIN_MARGIN_SECS.
    pub margin: Option<u32>,
    /// Most requeues (Slurm's Restarts) after which the job still continues.
    pub continuations: u32,
}

/// Forks the time-limit watcher. Runs in the batch task (as the job user)
/// before it execs vmctl; the watcher is the task's child, so vmctl stays
/// the task itself and Slurm sees its exit status.
/// `step_fds` are the step's descriptors meant for vmctl alone (/dev/kvm,
/// /dev/userfaultfd, the events pipe; -1 for none): the watcher closes its
/// copies, so it neither holds them nor keeps the events pipe open.
pub fn start_watcher(watch: Watch, step_fds: &[RawFd]) -> Result<(), String> {
    // SAFETY: the task process is single-threaded here (slurmstepd forked
    // it from its main thread), so the child may run ordinary Rust code.
    match unsafe { libc::fork() } {
        -1 => Err(format!(
            "cannot start the time-limit watcher: {}",
            std::io::Error::last_os_error()
        )),
        0 => {
            // SAFETY: plain syscalls in the child; the descriptors are the
            // child's own copies of the step's, which it must not keep.
            unsafe {
                for &fd in step_fds.iter().filter(|&&fd| fd >= 0) {
                    libc::close(fd);
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            }
            watch_time_limit(&watch);
            // SAFETY: ends the child without running the parent's atexit
            // handlers or flushing buffers it shares with the task.
            unsafe { libc::_exit(0) }
        }
        _ => Ok(()),
    }
}

/// Sleeps until `margin` seconds before the job's time limit, asking Slurm
/// again now and then (the limit may be changed while the job runs), then
/// requeues the job unless it has used up its continuations. Each decision
/// is one line on the job's stderr.
fn watch_time_limit(watch: &Watch) {
    let job = watch.job_id.to_string();
    let margin = u64::from(watch.margin.unwrap_or_else(default_margin));
    loop {
        let Some(left) = time_left(&job) else {
            // Unlimited, or squeue failed: look again later.
            std::thread::sleep(Duration::from_secs(30));
            continue;
        };
        if left <= margin {
            break;
        }
        std::thread::sleep(Duration::from_secs((left - margin).min(30)));
    }
    let restarts = job_field(&job, "Restarts")
        .and_then(|r| r.parse::<u32>().ok())
        .unwrap_or(0);
    let mut stderr = std::io::stderr();
    if restarts >= watch.continuations {
        let _ = writeln!(
            stderr,
            "vmwrap: job {job}: time limit in {margin} s; the job was already requeued {restarts} times (continuations={}): it ends at its time limit, its last checkpoint is kept",
            watch.continuations
        );
        return;
    }
    let _ = writeln!(
        stderr,
        "vmwrap: job {job}: continuation {} of at most {}: time limit in {margin} s, checkpointing and requeueing",
        restarts + 1,
        watch.continuations
    );
    match scontrol(&["requeue", &job]) {
        Ok(_) => {}
        Err(e) => {
            let _ = writeln!(
                stderr,
                "vmwrap: job {job}: cannot requeue the job before its time limit ({e}); it ends at its time limit"
            );
        }
    }
}

/// A third of KillWait: the checkpoint itself happens after the requeue and
/// has the whole KillWait; the margin only has to get the requeue to
/// slurmctld before its time-limit check.
fn default_margin() -> u32 {
    let kill_wait = scontrol(&["show", "config"])
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let (key, value) = l.split_once('=')?;
                (key.trim() == "KillWait")
                    .then(|| value.split_whitespace().next()?.parse::<u32>().ok())?
            })
        })
        .unwrap_or(30);
    (kill_wait / 3).max(crate::options::MIN_MARGIN_SECS)
}

fn time_left(job: &str) -> Option<u64> {
    let out = Command::new("squeue")
        .args(["-h", "-j", job, "-o", "%L"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_time_left(&String::from_utf8_lossy(&out.stdout))
}

/// `scontrol ARGS`, returning its stdout or why it failed.
fn scontrol(args: &[&str]) -> Result<String, String> {
    let out = Command::new("scontrol")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run scontrol: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "scontrol {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn job_field(job: &str, field: &str) -> Option<String> {
    let text = scontrol(&["show", "job", "-o", job]).ok()?;
    let prefix = format!("{field}=");
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix).map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_left_formats() {
        assert_eq!(parse_time_left("45"), Some(45));
        assert_eq!(parse_time_left("0:59"), Some(59));
        assert_eq!(parse_time_left("1:00:01\n"), Some(3601));
        assert_eq!(parse_time_left("2-00:00:10"), Some(2 * 86_400 + 10));
        for bad in [
            "UNLIMITED",
            "INVALID",
            "NOT_SET",
            "",
            "1:2:3:4",
            "a:00",
            "-5",
        ] {
            assert_eq!(parse_time_left(bad), None, "{bad}");
        }
    }

    #[test]
    fn finds_interrupted_steps() {
        let job = std::env::temp_dir().join(format!("vmwrap-steps-{}", std::process::id()));
        let batch = job.join("batch");
        for d in ["batch", "0", "1", "2/task0", "2/task1", "kept-x"] {
            std::fs::create_dir_all(job.join(d)).unwrap();
        }
        // 0 finished; 1 interrupted; 2 has one interrupted task.
        std::fs::write(job.join("0/finished"), "{}").unwrap();
        std::os::unix::fs::symlink("gen-000001", job.join("0/latest")).unwrap();
        std::os::unix::fs::symlink("gen-000001", job.join("1/latest")).unwrap();
        let id = StepIdentity {
            job_id: 1,
            step_id: 1,
            task_id: 0,
            argv: vec!["/bin/sim".into(), "x".into()],
            cwd: "/".into(),
        };
        std::fs::write(job.join("1/step.json"), serde_json::to_vec(&id).unwrap()).unwrap();
        std::os::unix::fs::symlink("gen-000002", job.join("2/task1/latest")).unwrap();
        let found = interrupted_steps(&batch);
        let names: Vec<(&str, &str)> = found
            .iter()
            .map(|(n, c, _)| (n.as_str(), c.as_str()))
            .collect();
        assert_eq!(names, [("1", "/bin/sim x"), ("2", "?")]);
        std::fs::remove_dir_all(&job).unwrap();
    }

    #[test]
    fn identity_hides_the_spool_path() {
        let argv: Vec<OsString> = vec!["/var/spool/slurmd/job7/slurm_script".into(), "x".into()];
        assert_eq!(identity_argv(&argv), ["(batch script)", "x"]);
    }

    #[test]
    fn script_copy_is_private_and_whole() {
        let dir = std::env::temp_dir().join(format!("vmwrap-batch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spool = dir.join("slurm_script");
        std::fs::write(&spool, "#!/bin/sh\necho hi\n").unwrap();
        let copy = copy_script(&spool, &dir).unwrap();
        assert_eq!(copy, dir.join(SCRIPT_COPY));
        assert_eq!(std::fs::read(&copy).unwrap(), b"#!/bin/sh\necho hi\n");
        let mode = std::fs::metadata(&copy).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(!dir.join(".script.partial").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
