//! `vmctl pin-class --job ID` (hidden): run by the SPANK plugin, as root, when a
//! wrapped step stops with a checkpoint. It waits for the requeued job to be
//! pending and adds this node's CPU class to the job's Features, so Slurm starts it
//! again only where the checkpoint can be restored. If no node has the class, the
//! job is held with a Comment saying why, rather than started afresh (AdminComment
//! is left alone: it carries the plugin's wrapped mark that vmwrap-drain trusts).

use super::check::run_with_timeout;
use clap::Args;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct PinClassArgs {
    /// The Slurm job id
    #[arg(long, value_name = "ID")]
    pub job: u32,

    /// Give up after this many seconds if the job never becomes pending
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub timeout: u64,

    /// Go on in the background, no longer a descendant of the caller:
    /// slurmstepd kills its descendants when the step ends
    #[arg(long)]
    pub detach: bool,
}

/// Says `msg` on stderr and in syslog: the plugin runs this with no stderr.
fn report(msg: &str) {
    eprintln!("vmctl: pin-class: {msg}");
    if let Ok(c) = std::ffi::CString::new(format!("vmwrap: pin-class: {msg}")) {
        // SAFETY: a constant "%s" format with one valid C string.
        unsafe {
            libc::syslog(
                libc::LOG_INFO | libc::LOG_DAEMON,
                c"%s".as_ptr(),
                c.as_ptr(),
            )
        };
    }
}

/// Forks twice so the worker is adopted by init; returns false in the caller.
fn detach() -> bool {
    // SAFETY: vmctl is single-threaded here (nothing started yet), so fork is safe.
    match unsafe { libc::fork() } {
        -1 => {
            report(&format!("cannot fork: {}", std::io::Error::last_os_error()));
            std::process::exit(1)
        }
        0 => {
            // SAFETY: as above, in the child.
            unsafe { libc::setsid() };
            // SAFETY: as above.
            match unsafe { libc::fork() } {
                0 => {
                    // The worker outlives the step and runs scontrol and sinfo:
                    // whatever slurmstepd left open without close-on-exec must
                    // reach neither. It needs none of it (stdio is /dev/null).
                    // SAFETY: close_range with integer arguments only.
                    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
                    true
                }
                // SAFETY: _exit skips destructors the parent's copy still owns.
                _ => unsafe { libc::_exit(0) },
            }
        }
        child => {
            let mut status = 0;
            // SAFETY: reaping the intermediate child we just forked.
            unsafe { libc::waitpid(child, &mut status, 0) };
            false
        }
    }
}

const SCONTROL_TIMEOUT: Duration = Duration::from_secs(30);

fn job_field(record: &str, key: &str) -> Option<String> {
    record.split_whitespace().find_map(|w| {
        let (k, v) = w.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}

/// The job's constraint with `class` in place of any earlier vmwrap class. Only
/// plain AND lists can be extended safely; anything else is left to the admin.
pub fn pinned_features(current: &str, class: &str) -> Option<String> {
    let current = match current {
        "" | "(null)" => return Some(class.to_string()),
        c => c,
    };
    if current.contains(['|', '[', ']', '(', ')', '*', ',']) {
        return None;
    }
    let mut terms: Vec<&str> = current
        .split('&')
        .filter(|t| !t.is_empty() && !t.starts_with("vmwrap-"))
        .collect();
    terms.push(class);
    Some(terms.join("&"))
}

pub fn pin_class(args: PinClassArgs) -> i32 {
    if args.detach && !detach() {
        return 0;
    }
    let (class, _) = super::cpu_class::this_node();
    let job = args.job.to_string();
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    loop {
        let record = match run_with_timeout(
            "scontrol",
            &["show", "job", "--oneliner", &job],
            SCONTROL_TIMEOUT,
        ) {
            Ok(r) => r,
            Err(e) if e.contains("Invalid job id") => return 0,
            Err(e) => {
                report(&e);
                String::new()
            }
        };
        let state = job_field(&record, "JobState").unwrap_or_default();
        match state.as_str() {
            "PENDING" => break,
            "" | "RUNNING" | "COMPLETING" | "REQUEUED" | "REQUEUE_FED" | "REQUEUE_HOLD"
            | "CONFIGURING" | "SUSPENDED" | "STOPPED" | "SIGNALING" | "PREEMPTED" => {}
            // Ended for good: no restart to steer.
            _ => return 0,
        }
        if Instant::now() >= deadline {
            report(&format!(
                "job {job} did not become pending within {}s (state {state})",
                args.timeout
            ));
            return 1;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let record = run_with_timeout(
        "scontrol",
        &["show", "job", "--oneliner", &job],
        SCONTROL_TIMEOUT,
    )
    .unwrap_or_default();
    let current = job_field(&record, "Features").unwrap_or_default();
    if current.split('&').any(|t| t == class) {
        return 0;
    }
    // A site that has not given its nodes CPU classes gets no pinning, rather than
    // every requeued job held.
    let node_features = run_with_timeout("sinfo", &["--noheader", "--format=%f"], SCONTROL_TIMEOUT)
        .unwrap_or_else(|e| {
            report(&e);
            String::new()
        });
    let mut classes = node_features
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|f| f.starts_with("vmwrap-"));
    if classes.clone().next().is_none() {
        report(&format!(
            "no node has a vmwrap-* CPU class in its Features; job {job} is not pinned"
        ));
        return 0;
    }
    let class_exists = classes.any(|f| f == class);
    let Some(features) = pinned_features(&current, &class) else {
        report(&format!(
            "job {job} has Features={current}, which cannot be extended; not pinning it to {class}"
        ));
        return 1;
    };
    let updated = run_with_timeout(
        "scontrol",
        &[
            "update",
            &format!("JobId={job}"),
            &format!("Features={features}"),
        ],
        SCONTROL_TIMEOUT,
    );
    if let (Ok(_), true) = (&updated, class_exists) {
        report(&format!("job {job} now requires Features={features}"));
        return 0;
    }
    // No node can restore the checkpoint: hold the job rather than let it start
    // afresh somewhere, and say why where admins and users look.
    let why = match &updated {
        Err(e) => e.lines().last().unwrap_or("").trim().to_string(),
        Ok(_) => "no node has it in its Features".to_string(),
    };
    let comment = format!(
        "vmwrap: held: its checkpoint needs a node of CPU class {class} ({why}); add Features={class} to such nodes and release the job, or release it to start afresh"
    );
    // The reason goes first, so that whoever sees the job held also sees why.
    let _ = run_with_timeout(
        "scontrol",
        &[
            "update",
            &format!("JobId={job}"),
            &format!("Comment={comment}"),
        ],
        SCONTROL_TIMEOUT,
    );
    let _ = run_with_timeout("scontrol", &["hold", &job], SCONTROL_TIMEOUT);
    report(&format!("job {job}: {comment}"));
    1
}

#[cfg(test)]
mod tests {
    use super::pinned_features;

    #[test]
    fn features_keep_the_users_constraints() {
        assert_eq!(
            pinned_features("(null)", "vmwrap-amd-1").as_deref(),
            Some("vmwrap-amd-1")
        );
        assert_eq!(
            pinned_features("ib&bigmem", "vmwrap-amd-1").as_deref(),
            Some("ib&bigmem&vmwrap-amd-1")
        );
        assert_eq!(
            pinned_features("ib&vmwrap-intel-2", "vmwrap-amd-1").as_deref(),
            Some("ib&vmwrap-amd-1")
        );
        assert_eq!(pinned_features("a|b", "vmwrap-amd-1"), None);
    }
}
