//! The vmwrap SPANK plugin in a real local Slurm cluster.
//!
//! Needs root and a cluster brought up by `contrib/vmwrap-cluster up` with
//! the plugin and vmctl built; .ci/run does that and then sets
//! VMWRAP_SLURM_TESTS=1. Without both, every test prints why and skips.
//!
//! Jobs run as the ordinary user `vmwrap-user` (created by vmwrap-cluster),
//! because a wrapped step must work for users who cannot open /dev/kvm.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmwrap_tests::{run_command, RunOutput, TempDir};

const USER: &str = "vmwrap-user";
/// The checkpoint_root vmwrap-cluster writes into plugstack.conf.
const CHECKPOINT_ROOT: &str = "/var/lib/vmwrap/checkpoints";
/// Generous: the first job after `up` waits for the scheduler's next pass.
const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether the Slurm tests can run; prints the reason when they cannot.
fn enabled() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let asked = std::env::var("VMWRAP_SLURM_TESTS").is_ok_and(|v| v == "1");
    match (root, asked) {
        (true, true) => true,
        (false, _) => {
            eprintln!("SKIPPED: the Slurm plugin tests must run as root");
            false
        }
        (true, false) => {
            eprintln!(
                "SKIPPED: set VMWRAP_SLURM_TESTS=1 after `contrib/vmwrap-cluster up` to run the Slurm plugin tests"
            );
            false
        }
    }
}

macro_rules! need_slurm {
    () => {
        if !enabled() {
            return;
        }
    };
}

fn run(program: &str, args: &[&str], cwd: &Path) -> RunOutput {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(cwd);
    run_command(cmd, b"", JOB_TIMEOUT)
}

/// Runs a Slurm command as the test user, as that user would type it.
fn run_as_user(args: &[&str], cwd: &Path) -> RunOutput {
    let mut full = vec!["-u", USER, "--"];
    full.extend_from_slice(args);
    run("runuser", &full, cwd)
}

fn user_ids() -> (u32, u32) {
    let meta = fs::metadata(format!("/home/{USER}")).unwrap_or_else(|e| {
        panic!("{USER} has no home directory ({e}); run contrib/vmwrap-cluster up")
    });
    (meta.uid(), meta.gid())
}

/// A scratch directory the test user can write job output into.
fn user_dir(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    let (uid, gid) = user_ids();
    std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
    dir
}

fn scontrol_field(job: &str, field: &str) -> Option<String> {
    let out = run("scontrol", &["show", "job", job], Path::new("/"));
    if out.code != 0 {
        return None;
    }
    let prefix = format!("{field}=");
    out.stdout_str()
        .split_whitespace()
        .find_map(|word| word.strip_prefix(&prefix).map(str::to_string))
}

/// Polls the job until it reaches a final state and returns that state.
fn wait_for_job(job: &str) -> String {
    let deadline = Instant::now() + JOB_TIMEOUT;
    loop {
        let state = scontrol_field(job, "JobState");
        const FINAL: &[&str] = &[
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
        ];
        if let Some(s) = state.as_deref().filter(|s| FINAL.contains(s)) {
            return s.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "job {job} still in state {state:?} after {JOB_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn option_is_listed_in_help() {
    need_slurm!();
    for tool in ["sbatch", "srun", "salloc"] {
        let out = run(tool, &["--help"], Path::new("/"));
        assert!(
            out.stdout_str().contains("--vm-wrap"),
            "{tool} --help does not list --vm-wrap (is the plugin in plugstack.conf?):\n{out:?}"
        );
    }
}

#[test]
fn bad_values_are_refused_at_submit() {
    need_slurm!();
    let dir = user_dir("bad-values");
    let cases: &[(&[&str], &str)] = &[
        (
            &["sbatch", "--vm-wrap=keep=abc", "--wrap", "true"],
            "keep: 'abc' is not a whole number",
        ),
        (
            &["sbatch", "--vm-wrap=keep=11", "--wrap", "true"],
            "keep must be 1 to 10",
        ),
        (
            &["sbatch", "--vm-wrap=mem=8", "--wrap", "true"],
            "has no unit",
        ),
        (
            &["sbatch", "--vm-wrap=signal=TERM", "--wrap", "true"],
            "TERM is reserved",
        ),
        (
            &["sbatch", "--vm-wrap=colour=red", "--wrap", "true"],
            "unknown key 'colour'",
        ),
        (&["srun", "--vm-wrap=interval=5", "true"], "minimum is 10"),
    ];
    for (args, why) in cases {
        let out = run_as_user(args, dir.path());
        assert_ne!(out.code, 0, "{args:?} was accepted:\n{out:?}");
        let stderr = out.stderr_str();
        assert!(
            stderr.contains("vmwrap: invalid --vm-wrap=") && stderr.contains(why),
            "{args:?}: expected an error mentioning {why:?}:\n{out:?}"
        );
        assert!(
            !out.stdout_str().contains("Submitted batch job"),
            "{args:?} submitted a job:\n{out:?}"
        );
    }
}

#[test]
fn srun_step_runs_wrapped_as_the_user() {
    need_slurm!();
    let dir = user_dir("srun");
    let out = run_as_user(
        &[
            "srun",
            "--vm-wrap=keep=2",
            "/bin/echo",
            "hello",
            "from vmwrap",
        ],
        dir.path(),
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout_str(), "hello from vmwrap\n", "{out:?}");

    // The step's identity and uid, seen from inside the VM.
    let out = run_as_user(&["srun", "--vm-wrap", "/usr/bin/id", "-un"], dir.path());
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout_str(), format!("{USER}\n"), "{out:?}");

    let out = run_as_user(
        &[
            "srun",
            "--vm-wrap",
            "/usr/bin/printenv",
            "VMWRAP_CHECKPOINT_DIR",
            "SLURM_JOB_ID",
        ],
        dir.path(),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let stdout = out.stdout_str();
    let lines: Vec<&str> = stdout.lines().collect();
    let [ckpt_dir, job_id] = lines[..] else {
        panic!("expected two lines from printenv:\n{out:?}");
    };
    assert_eq!(
        PathBuf::from(ckpt_dir),
        Path::new(CHECKPOINT_ROOT).join(USER).join(job_id).join("0")
    );
    check_private_dirs(Path::new(ckpt_dir));
    let identity: serde_json::Value =
        serde_json::from_slice(&fs::read(Path::new(ckpt_dir).join("step.json")).unwrap()).unwrap();
    assert_eq!(identity["job_id"].to_string(), job_id);
    assert_eq!(identity["step_id"], 0);
    assert_eq!(
        identity["argv"],
        serde_json::json!(["/usr/bin/printenv", "VMWRAP_CHECKPOINT_DIR", "SLURM_JOB_ID"])
    );
}

/// The step directory and the user and job levels above it belong to the
/// user and nobody else can look in.
fn check_private_dirs(step_dir: &Path) {
    let (uid, _) = user_ids();
    let mut dir = step_dir;
    for _ in 0..3 {
        let meta = fs::metadata(dir).unwrap();
        assert_eq!(meta.uid(), uid, "{} is not owned by {USER}", dir.display());
        assert_eq!(
            meta.mode() & 0o777,
            0o700,
            "{} is not private",
            dir.display()
        );
        dir = dir.parent().unwrap();
    }
}

#[test]
fn sbatch_wraps_srun_steps_but_not_the_script() {
    need_slurm!();
    let dir = user_dir("sbatch");
    let output = dir.join("job.out");
    let script = "echo \"script: ${VMWRAP_CHECKPOINT_DIR:-native}\"\n\
                  srun /usr/bin/printenv VMWRAP_CHECKPOINT_DIR\n";
    let out = run_as_user(
        &[
            "sbatch",
            "--parsable",
            "--vm-wrap",
            "-o",
            output.to_str().unwrap(),
            "--wrap",
            script,
        ],
        dir.path(),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let job = out.stdout_str().trim().to_string();
    assert!(
        job.chars().all(|c| c.is_ascii_digit()),
        "sbatch --parsable printed {job:?}"
    );

    let state = wait_for_job(&job);
    let text = fs::read_to_string(&output).unwrap_or_default();
    assert_eq!(state, "COMPLETED", "job output:\n{text}");
    let step_dir = Path::new(CHECKPOINT_ROOT).join(USER).join(&job).join("0");
    assert_eq!(
        text,
        format!("script: native\n{}\n", step_dir.display()),
        "the batch script must run natively and its srun step wrapped"
    );
    check_private_dirs(&step_dir);
    // Nothing was made for the batch step (id 4294967294).
    let batch = step_dir.with_file_name("4294967294");
    assert!(!batch.exists(), "{} exists", batch.display());
}

/// Requeue resumes a step from its checkpoint: the counter printed by the
/// step carries on after the restart instead of starting again from 0.
#[test]
fn requeued_step_resumes_from_its_checkpoint() {
    need_slurm!();
    const TICKS: u32 = 30;
    let dir = user_dir("requeue");
    let output = dir.join("job.out");
    // perl, not a shell loop: a wrapped step is one process.
    let script = format!(
        "echo \"script start ${{SLURM_RESTART_COUNT:-0}}\"\n\
         srun /usr/bin/perl -e '$|=1; for $i (0..{last}) {{ print \"$i\\n\"; sleep 1 }}'\n",
        last = TICKS - 1
    );
    let out = run_as_user(
        &[
            "sbatch",
            "--parsable",
            "--requeue",
            "--open-mode=append",
            "--vm-wrap",
            "-o",
            output.to_str().unwrap(),
            "--wrap",
            &script,
        ],
        dir.path(),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let job = out.stdout_str().trim().to_string();

    // Requeue once the step has made some progress.
    let numbers =
        |text: &str| -> Vec<u32> { text.lines().filter_map(|l| l.parse().ok()).collect() };
    let deadline = Instant::now() + JOB_TIMEOUT;
    while numbers(&fs::read_to_string(&output).unwrap_or_default()).len() < 3 {
        assert!(Instant::now() < deadline, "job {job} made no progress");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = run("scontrol", &["requeue", &job], Path::new("/"));
    assert_eq!(out.code, 0, "{out:?}");
    let requeued_at = Instant::now();
    while scontrol_field(&job, "JobState").as_deref() != Some("PENDING") {
        assert!(Instant::now() < deadline, "job {job} was not requeued");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Releasing a requeued job within the same second makes slurmd refuse
    // it ("Job credential revoked"); two whole seconds are safe.
    if let Some(left) = Duration::from_secs(2).checked_sub(requeued_at.elapsed()) {
        std::thread::sleep(left);
    }
    let out = run(
        "scontrol",
        &["update", &format!("jobid={job}"), "starttime=now"],
        Path::new("/"),
    );
    assert_eq!(out.code, 0, "{out:?}");

    let state = wait_for_job(&job);
    let text = fs::read_to_string(&output).unwrap_or_default();
    assert_eq!(state, "COMPLETED", "job output:\n{text}");
    assert_eq!(scontrol_field(&job, "Restarts").as_deref(), Some("1"));
    let (first, second) = text
        .split_once("script start 1\n")
        .unwrap_or_else(|| panic!("the job did not restart:\n{text}"));
    let before = numbers(first);
    let after = numbers(second);
    assert!(
        !before.is_empty() && !after.is_empty(),
        "expected output from both runs:\n{text}"
    );
    assert!(
        after[0] >= *before.last().unwrap(),
        "the step started again instead of resuming:\n{text}"
    );
    assert_eq!(after.last(), Some(&(TICKS - 1)), "{text}");
}
