//! `vmctl pin-class --job ID` (hidden): run by the SPANK plugin, as root, when a
//! wrapped step stops with a checkpoint. It waits for the requeued job to be
//! pending and adds this node's CPU class to the job's Features, so Slurm starts it
//! again only where the checkpoint can be restored. If no node has the class, the
//! job is held with an AdminComment saying why, rather than started afresh.

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
                eprintln!("vmctl: pin-class: {e}");
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
            eprintln!(
                "vmctl: pin-class: job {job} did not become pending within {}s (state {state})",
                args.timeout
            );
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
    let Some(features) = pinned_features(&current, &class) else {
        eprintln!("vmctl: pin-class: job {job} has Features={current}, which cannot be extended; not pinning it to {class}");
        return 1;
    };
    match run_with_timeout(
        "scontrol",
        &[
            "update",
            &format!("JobId={job}"),
            &format!("Features={features}"),
        ],
        SCONTROL_TIMEOUT,
    ) {
        Ok(_) => {
            eprintln!("vmctl: pin-class: job {job} now requires Features={features}");
            0
        }
        Err(e) => {
            // Slurm refuses a feature no node has: hold the job rather than let it
            // start somewhere its checkpoint cannot be restored.
            let comment = format!(
                "vmwrap: held: its checkpoint needs a node with CPU class {class} and none has that feature ({}); add Features={class} to such nodes and release the job, or release it to start afresh",
                e.lines().last().unwrap_or("").trim()
            );
            let _ = run_with_timeout("scontrol", &["hold", &job], SCONTROL_TIMEOUT);
            let _ = run_with_timeout(
                "scontrol",
                &[
                    "update",
                    &format!("JobId={job}"),
                    &format!("AdminComment={comment}"),
                ],
                SCONTROL_TIMEOUT,
            );
            eprintln!("vmctl: pin-class: job {job}: {comment}");
            1
        }
    }
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
