//! The vmwrap SPANK plugin in a real local Slurm cluster.
//!
//! Needs root and a cluster brought up by `contrib/vmwrap-cluster up` with
//! the plugin and vmctl built, so every test is `#[ignore]`d in a plain
//! `cargo test`; .ci/run brings the cluster up and runs them with
//! `-- --ignored --test-threads=1` (serially: they share the two nodes).
//! Asked to run without root or without a cluster, they fail.
//!
//! Jobs run as the ordinary user `vmwrap-user` (created by vmwrap-cluster),
//! because a wrapped step must work for users who cannot open /dev/kvm.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmwrap_tests::checkpoint_dir::{manifest_sum, write_manifest};
use vmwrap_tests::slurm::{job_field, job_fields, poll, release, unix_now};
use vmwrap_tests::{run_command, RunOutput, TempDir};

const USER: &str = "vmwrap-user";
/// A second ordinary user (created by vmwrap-cluster), the victim in tests of
/// what one user can do to another's jobs.
const OTHER_USER: &str = "vmwrap-user2";
/// The checkpoint_root vmwrap-cluster writes into plugstack.conf.
const CHECKPOINT_ROOT: &str = "/var/lib/vmwrap/checkpoints";
/// Generous: the first job after `up` waits for the scheduler's next pass.
const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// Fails the test unless it can really use the local cluster: these tests are
/// only run on purpose (`--ignored`), so a missing cluster is an error, not a skip.
fn require_cluster() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the Slurm plugin tests must run as root"
    );
    let up = Command::new("sinfo")
        .args(["-h", "-o", "%N"])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
    assert!(
        up,
        "no Slurm cluster answers: run `contrib/vmwrap-cluster up` first"
    );
}

macro_rules! need_slurm {
    () => {
        require_cluster()
    };
}

fn run(program: &str, args: &[&str], cwd: &Path) -> RunOutput {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(cwd);
    run_command(cmd, b"", JOB_TIMEOUT)
}

/// Runs a Slurm command as the test user, as that user would type it.
fn run_as_user(args: &[&str], cwd: &Path) -> RunOutput {
    run_as(USER, args, cwd)
}

fn run_as(user: &str, args: &[&str], cwd: &Path) -> RunOutput {
    let mut full = vec!["-u", user, "--"];
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
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
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
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
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
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
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
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
fn sbatch_wraps_the_script_and_its_srun_steps() {
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
    let job_dir = Path::new(CHECKPOINT_ROOT).join(USER).join(&job);
    let step_dir = job_dir.join("0");
    assert_eq!(
        text,
        format!(
            "script: {}\n{}\n",
            job_dir.join("batch").display(),
            step_dir.display()
        ),
        "the batch script and its srun step must both run wrapped"
    );
    check_private_dirs(&step_dir);
    check_private_dirs(&job_dir.join("batch"));
}

// ---------------------------------------------------------------------------
// Requeue, preemption, draining and damaged checkpoints.
//
// These tests share the cluster's two nodes, so they must run one at a time
// (`--test-threads=1`, as .ci/run does). Each one cancels its own jobs and
// returns the nodes it drained to service when it ends, even on failure.

/// How long a counting step sleeps between ticks, in seconds (perl's
/// 4-argument select). Short, so a test spends little time waiting, yet long
/// enough that a requeue lands in the middle of the count.
const TICK: &str = "0.25";
/// Ticks per counting step: about 10 s of work.
const TICKS: u64 = 40;
/// These tests are about srun steps resuming while the script itself runs
/// again from the top: the batch script runs natively (tests/slurm_batch.rs
/// covers wrapped scripts).
const NATIVE_SCRIPT: &str = "--vm-wrap=script=native";

/// Where a restarted counting step is expected to carry on from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Restart {
    /// From where it stopped: resumed from the checkpoint the requeue wrote.
    Resumed,
    /// From an earlier point, not 0: resumed from an older generation.
    Earlier,
    /// From 0: started afresh.
    Afresh,
}

/// Cancels the test's jobs and resumes the nodes it drained, whatever way the
/// test ends, so one failure cannot leave the cluster unusable for the rest.
#[derive(Default)]
struct Cleanup {
    jobs: Vec<String>,
    drained: Vec<String>,
    /// Nodes whose Features a test changed, with the value to put back.
    features: Vec<(String, String)>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Plain Command::status, not run(): a panic while already unwinding
        // would abort the test binary.
        for job in &self.jobs {
            let _ = Command::new("scancel").arg(job).status();
        }
        for node in &self.drained {
            let _ = Command::new("scontrol")
                .args(["update", &format!("nodename={node}"), "state=resume"])
                .status();
        }
        for (node, features) in &self.features {
            let _ = Command::new("scontrol")
                .args([
                    "update",
                    &format!("nodename={node}"),
                    &format!("availablefeatures={features}"),
                    &format!("activefeatures={features}"),
                ])
                .status();
        }
    }
}

/// A test-unique job name, so leftovers are easy to attribute in squeue.
fn job_name(test: &str) -> String {
    format!("vmwrap-test-{test}-{}", std::process::id())
}

fn job_state(job: &str) -> String {
    job_field(job, "JobState")
}

/// Waits until the job runs and returns its node.
fn wait_running(job: &str) -> String {
    poll(
        &format!("job {job} to run"),
        JOB_TIMEOUT,
        || {
            let f = job_fields(job)?;
            (f.get("JobState")? == "RUNNING").then(|| f.get("NodeList").cloned())?
        },
        || {
            let f = job_fields(job).unwrap_or_default();
            format!(
                "state {:?}, reason {:?}",
                f.get("JobState"),
                f.get("Reason")
            )
        },
    )
}

/// The installed vmwrap-drain when .ci/run tests the package, else the checkout's.
fn drain_helper() -> PathBuf {
    std::env::var_os("VMWRAP_DRAIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| vmwrap_tests::workspace_root().join("contrib/vmwrap-drain"))
}

/// `scontrol requeue JOB`; returns the clock second it was done in.
fn requeue(job: &str) -> u64 {
    let out = run("scontrol", &["requeue", job], Path::new("/"));
    assert_eq!(out.code, 0, "scontrol requeue {job}: {out:?}");
    unix_now()
}

fn wait_pending(job: &str) {
    poll(
        &format!("job {job} to be requeued (PENDING)"),
        JOB_TIMEOUT,
        || (job_state(job) == "PENDING").then_some(()),
        || format!("state {}", job_state(job)),
    );
}

/// A batch script whose one srun step counts 0..ticks-1, one number per
/// tick, keeping a running sum in memory and printing it at the end: the
/// numbers show where a restarted step carried on from, and the sum that it
/// resumed with its memory intact.
fn counter_script(ticks: u64) -> String {
    format!(
        "echo \"script start ${{SLURM_RESTART_COUNT:-0}} on $SLURMD_NODENAME\"\n\
         srun /usr/bin/perl -e '$|=1; $s=0; for $i (0..{last}) {{ $s += $i; print \"$i\\n\"; select(undef,undef,undef,{TICK}) }} print \"sum=$s\\n\"'\n",
        last = ticks - 1
    )
}

/// Submits the counting script (TICKS ticks) as the test user, appending to
/// `output` across restarts.
fn submit_counter(
    cleanup: &mut Cleanup,
    name: &str,
    dir: &Path,
    output: &Path,
    extra: &[&str],
) -> String {
    submit_counter_ticks(cleanup, name, dir, output, extra, TICKS, NATIVE_SCRIPT)
}

fn submit_counter_ticks(
    cleanup: &mut Cleanup,
    name: &str,
    dir: &Path,
    output: &Path,
    extra: &[&str],
    ticks: u64,
    wrap: &str,
) -> String {
    let name = job_name(name);
    let script = counter_script(ticks);
    let mut args = vec![
        "sbatch",
        "--parsable",
        "--requeue",
        "--open-mode=append",
        wrap,
        "-J",
        &name,
        "-o",
        output.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--wrap", &script]);
    let out = run_as_user(&args, dir);
    assert_eq!(out.code, 0, "{out:?}");
    let job = out.stdout_str().trim().to_string();
    assert!(
        !job.is_empty() && job.chars().all(|c| c.is_ascii_digit()),
        "{out:?}"
    );
    cleanup.jobs.push(job.clone());
    job
}

/// One run of the batch script as seen in the output file.
#[derive(Debug)]
struct ScriptRun {
    restart: u32,
    node: String,
    numbers: Vec<u64>,
    sums: Vec<u64>,
}

fn parse_runs(text: &str) -> Vec<ScriptRun> {
    let mut runs: Vec<ScriptRun> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("script start ") {
            let (restart, node) = rest.split_once(" on ").unwrap_or((rest, ""));
            runs.push(ScriptRun {
                restart: restart.parse().unwrap_or(u32::MAX),
                node: node.to_string(),
                numbers: Vec::new(),
                sums: Vec::new(),
            });
        } else if let Some(run) = runs.last_mut() {
            if let Ok(n) = line.parse() {
                run.numbers.push(n);
            } else if let Some(sum) = line.strip_prefix("sum=").and_then(|s| s.parse().ok()) {
                run.sums.push(sum);
            }
        }
    }
    runs
}

/// Waits until the counter in `output` has printed at least `n` numbers.
fn wait_progress(job: &str, output: &Path, n: usize) {
    poll(
        &format!("job {job} to count to {n}"),
        JOB_TIMEOUT,
        || {
            let runs = parse_runs(&fs::read_to_string(output).unwrap_or_default());
            (runs.last()?.numbers.len() >= n).then_some(())
        },
        || {
            format!(
                "output so far:\n{}",
                fs::read_to_string(output).unwrap_or_default()
            )
        },
    );
}

/// Checks the output of a counter job of TICKS ticks that was stopped once.
fn check_two_runs(text: &str, restart: Restart) -> (ScriptRun, ScriptRun) {
    check_two_runs_ticks(text, restart, TICKS)
}

/// Checks the output of a counter job that was stopped once: the first run
/// counted from 0 and stopped part-way; the second carried on from where
/// `restart` says; either way the count reached its end and the sum is
/// right. Returns the two runs.
fn check_two_runs_ticks(text: &str, restart: Restart, ticks: u64) -> (ScriptRun, ScriptRun) {
    let mut runs = parse_runs(text);
    assert_eq!(runs.len(), 2, "expected the script to run twice:\n{text}");
    let second = runs.pop().unwrap();
    let first = runs.pop().unwrap();
    assert_eq!((first.restart, second.restart), (0, 1), "{text}");
    let expected: Vec<u64> = (0..first.numbers.len() as u64).collect();
    assert!(
        !first.numbers.is_empty() && first.numbers == expected && first.sums.is_empty(),
        "the first run should count from 0 and be stopped part-way:\n{text}"
    );
    let stopped_at = *first.numbers.last().unwrap();
    let start = *second
        .numbers
        .first()
        .unwrap_or_else(|| panic!("no count after the restart:\n{text}"));
    match restart {
        // The step printed `stopped_at` and was checkpointed before or
        // after its next print reached the file.
        Restart::Resumed => assert!(
            start == stopped_at || start == stopped_at + 1,
            "the restarted step did not carry on from {stopped_at}:\n{text}"
        ),
        Restart::Earlier => assert!(
            start > 0 && start + 1 < stopped_at,
            "the restarted step should have resumed from an older checkpoint, before {stopped_at}:\n{text}"
        ),
        Restart::Afresh => assert_eq!(
            start, 0,
            "the restarted step should have started afresh:\n{text}"
        ),
    }
    let expected: Vec<u64> = (start..ticks).collect();
    assert_eq!(second.numbers, expected, "{text}");
    assert_eq!(
        second.sums,
        [ticks * (ticks - 1) / 2],
        "wrong or missing sum:\n{text}"
    );
    (first, second)
}

fn drain(cleanup: &mut Cleanup, node: &str) {
    cleanup.drained.push(node.to_string());
    let out = run(
        "scontrol",
        &[
            "update",
            &format!("nodename={node}"),
            "state=drain",
            "reason=vmwrap-test",
        ],
        Path::new("/"),
    );
    assert_eq!(out.code, 0, "draining {node}: {out:?}");
}

fn resume_node(cleanup: &mut Cleanup, node: &str) {
    let out = run(
        "scontrol",
        &["update", &format!("nodename={node}"), "state=resume"],
        Path::new("/"),
    );
    assert_eq!(out.code, 0, "resuming {node}: {out:?}");
    cleanup.drained.retain(|n| n != node);
}

/// The cluster's nodes (vmwrap-cluster names them n1, n2, ...).
fn nodes() -> Vec<String> {
    let out = run(
        "sinfo",
        &["--noheader", "--Node", "--partition=batch", "--format=%N"],
        Path::new("/"),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let mut nodes: Vec<String> = out
        .stdout_str()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    nodes.dedup();
    assert!(
        nodes.len() >= 2,
        "these tests need 2 nodes (vmwrap-cluster up --nodes 2): {nodes:?}"
    );
    nodes
}

/// A requeue in the middle of a step, with the step's first node drained:
/// the job restarts on the other node and the count carries on from where
/// it stopped, with the right final sum; Slurm shows Restarts=1.
#[test]
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
fn requeued_step_resumes_on_another_node() {
    need_slurm!();
    let mut cleanup = Cleanup::default();
    let dir = user_dir("requeue");
    let output = dir.join("job.out");
    let job = submit_counter(&mut cleanup, "requeue", dir.path(), &output, &[]);
    let first_node = wait_running(&job);
    wait_progress(&job, &output, 4);

    drain(&mut cleanup, &first_node);
    let requeued_at = requeue(&job);
    wait_pending(&job);
    release(&job, requeued_at);
    let second_node = wait_running(&job);
    assert_ne!(
        second_node, first_node,
        "job {job} restarted on its drained node"
    );

    let state = wait_for_job(&job);
    let text = fs::read_to_string(&output).unwrap_or_default();
    assert_eq!(state, "COMPLETED", "job output:\n{text}");
    assert_eq!(scontrol_field(&job, "Restarts").as_deref(), Some("1"));
    let (first, second) = check_two_runs(&text, Restart::Resumed);
    assert_eq!(
        (first.node, second.node),
        (first_node, second_node),
        "{text}"
    );
}

/// A job in the high-priority partition needs the node a wrapped job holds:
/// Slurm preempts (requeues) the wrapped job, which later resumes from its
/// checkpoint and finishes with the right result.
#[test]
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
fn preempted_job_resumes_from_its_checkpoint() {
    need_slurm!();
    let mut cleanup = Cleanup::default();
    let dir = user_dir("preempt");
    let output = dir.join("job.out");
    let urgent_output = dir.join("urgent.out");
    // --exclusive: the wrapped job holds the whole node, so the urgent job
    // pinned there cannot start without preempting it.
    let job = submit_counter(
        &mut cleanup,
        "preempt",
        dir.path(),
        &output,
        &["--exclusive"],
    );
    let node = wait_running(&job);
    wait_progress(&job, &output, 4);

    let name = job_name("preempt-urgent");
    let out = run_as_user(
        &[
            "sbatch",
            "--parsable",
            "--partition=urgent",
            "--exclusive",
            "--nodelist",
            &node,
            "-J",
            &name,
            "-o",
            urgent_output.to_str().unwrap(),
            "--wrap",
            "echo \"urgent ran on $SLURMD_NODENAME\"",
        ],
        dir.path(),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let urgent = out.stdout_str().trim().to_string();
    cleanup.jobs.push(urgent.clone());

    // Preemption shows as a requeue: PENDING with one restart.
    poll(
        &format!("job {job} to be preempted"),
        JOB_TIMEOUT,
        || {
            let f = job_fields(&job)?;
            (f.get("JobState")? == "PENDING" && f.get("Restarts")? == "1").then_some(())
        },
        || {
            format!(
                "job {job}: {}, urgent {urgent}: {}",
                job_state(&job),
                job_state(&urgent)
            )
        },
    );
    // The preemption happened at or before this second.
    release(&job, unix_now());

    assert_eq!(wait_for_job(&urgent), "COMPLETED");
    assert_eq!(
        fs::read_to_string(&urgent_output).unwrap_or_default(),
        format!("urgent ran on {node}\n")
    );
    let state = wait_for_job(&job);
    let text = fs::read_to_string(&output).unwrap_or_default();
    assert_eq!(state, "COMPLETED", "job output:\n{text}");
    assert!(text.contains("DUE TO PREEMPTION"), "not preempted?\n{text}");
    assert_eq!(scontrol_field(&job, "Restarts").as_deref(), Some("1"));
    check_two_runs(&text, Restart::Resumed);
}

/// A batch script that does its work in the shell itself (a loop with its
/// running sum in a shell variable), for `sbatch --vm-wrap` with the script
/// wrapped: a restart that re-ran it from the top would print from 1 again.
fn shell_counter_script(ticks: u64) -> String {
    format!(
        "#!/bin/bash\ni=0; s=0\nwhile [ $i -lt {ticks} ]; do s=$((s + i)); i=$((i + 1)); echo \"$i\"; sleep {TICK}; done\necho \"sum=$s\"\n"
    )
}

/// What `shell_counter_script(ticks)` prints when nothing interrupts it.
fn shell_counter_output(ticks: u64) -> String {
    let mut text: String = (1..=ticks).map(|i| format!("{i}\n")).collect();
    text.push_str(&format!("sum={}\n", ticks * (ticks - 1) / 2));
    text
}

/// `vmctl inspect --json DIR`'s newest usable generation, run by the job's
/// user as vmctl accepts only its own checkpoints:
/// (generation, kind, memory_bytes, chain_memory_bytes).
fn newest_generation(dir: &Path) -> (u64, String, u64, u64) {
    let out = run_as_user(
        &[
            vmwrap_tests::vmctl_path().to_str().unwrap(),
            "inspect",
            "--json",
            dir.to_str().unwrap(),
        ],
        Path::new("/"),
    );
    assert_eq!(out.code, 0, "vmctl inspect {}: {out:?}", dir.display());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let g = v["generations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["status"] == "ok")
        .max_by_key(|g| g["generation"].as_u64())
        .unwrap_or_else(|| panic!("no usable generation in {}: {v}", dir.display()));
    (
        g["generation"].as_u64().unwrap(),
        g["kind"].as_str().unwrap().to_string(),
        g["memory_bytes"].as_u64().unwrap(),
        g["chain_memory_bytes"].as_u64().unwrap(),
    )
}

/// Asks a running wrapped task for a checkpoint, as its user would.
fn checkpoint_as_user(dir: &Path) {
    let out = run_as_user(
        &[
            vmwrap_tests::vmctl_path().to_str().unwrap(),
            "checkpoint",
            dir.to_str().unwrap(),
        ],
        Path::new("/"),
    );
    assert_eq!(out.code, 0, "vmctl checkpoint {}: {out:?}", dir.display());
}

/// The checkpoint rows `vmctl status --json` shows for `job`, by directory.
fn status_rows(
    status: &serde_json::Value,
    job: &str,
) -> std::collections::HashMap<String, serde_json::Value> {
    let entry = status["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["job"].as_u64().map(|n| n.to_string()).as_deref() == Some(job))
        .unwrap_or_else(|| panic!("job {job} missing from vmctl status: {status}"));
    assert_eq!(entry["wrapped"], true, "{entry}");
    entry["checkpoints"]
        .as_array()
        .unwrap_or_else(|| panic!("no checkpoints for job {job}: {entry}"))
        .iter()
        .map(|c| (c["dir"].as_str().unwrap().to_string(), c.clone()))
        .collect()
}

/// contrib/vmwrap-drain moves wrapped jobs off a node, a whole wrapped batch
/// script among them: it drains the node, requeues and releases them, reports
/// where each one resumed, and all finish correctly on the other node, the
/// wrapped script with exactly the output of an uninterrupted run. Before the
/// drain, `vmctl status --node` shows each job's newest generation as `vmctl
/// inspect` sees it, reading the directories as the job's user (a directory
/// only root could read shows nothing).
#[test]
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
fn drain_helper_moves_wrapped_jobs_off_a_node() {
    need_slurm!();
    let mut cleanup = Cleanup::default();
    let nodes = nodes();
    let (busy, spare) = (&nodes[0], &nodes[1]);
    let dir = user_dir("drain");
    // The jobs must start on `busy`: keep `spare` drained until they run.
    drain(&mut cleanup, spare);
    let outputs = [dir.join("a.out"), dir.join("b.out")];
    let mut jobs: Vec<String> = outputs
        .iter()
        .map(|o| submit_counter(&mut cleanup, "drain", dir.path(), o, &[]))
        .collect();
    const SCRIPT_TICKS: u64 = 60;
    let script = dir.join("count.sh");
    fs::write(&script, shell_counter_script(SCRIPT_TICKS)).unwrap();
    let (script_out, script_err) = (dir.join("script.out"), dir.join("script.err"));
    let name = job_name("drain-script");
    let out = run_as_user(
        &[
            "sbatch",
            "--parsable",
            "--requeue",
            "--open-mode=append",
            "--vm-wrap",
            "-J",
            &name,
            "-o",
            script_out.to_str().unwrap(),
            "-e",
            script_err.to_str().unwrap(),
            script.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let script_job = out.stdout_str().trim().to_string();
    cleanup.jobs.push(script_job.clone());
    for (job, output) in jobs.iter().zip(&outputs) {
        assert_eq!(&wait_running(job), busy);
        wait_progress(job, output, 4);
    }
    assert_eq!(&wait_running(&script_job), busy);
    poll(
        "the wrapped script to count to 4",
        JOB_TIMEOUT,
        || (fs::read_to_string(&script_out).ok()?.lines().count() >= 4).then_some(()),
        || fs::read_to_string(&script_err).unwrap_or_default(),
    );
    jobs.push(script_job.clone());
    resume_node(&mut cleanup, spare);

    // What a drain would cost: one checkpoint of the wrapped script and one of
    // the first job's step exist; the second job's step has none yet.
    let job_dir = |job: &str| Path::new(CHECKPOINT_ROOT).join(USER).join(job);
    let batch_dir = job_dir(&script_job).join("batch");
    let step_dir = job_dir(&jobs[0]).join("0");
    let before = unix_now();
    checkpoint_as_user(&batch_dir);
    checkpoint_as_user(&step_dir);
    let after = unix_now();
    // A step directory of the job holding a generation that only root can
    // read: vmctl status reads as the job's user, so it must find the
    // generation unusable, not show it.
    let planted = job_dir(&script_job).join("9");
    fs::create_dir(&planted).unwrap();
    let (uid, gid) = user_ids();
    std::os::unix::fs::chown(&planted, Some(uid), Some(gid)).unwrap();
    let newest = fs::read_link(batch_dir.join("latest")).unwrap();
    let copy = run(
        "cp",
        &[
            "-r",
            batch_dir.join(&newest).to_str().unwrap(),
            planted.to_str().unwrap(),
        ],
        Path::new("/"),
    );
    assert_eq!(copy.code, 0, "{copy:?}");
    fs::set_permissions(planted.join(&newest), fs::Permissions::from_mode(0o700)).unwrap();

    let vmctl = vmwrap_tests::vmctl_path();
    let out = run(
        vmctl.to_str().unwrap(),
        &["status", "--json", "--node", busy],
        Path::new("/"),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut shown: Vec<String> = status["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job"].to_string())
        .collect();
    shown.sort();
    let mut expected_jobs = jobs.clone();
    expected_jobs.sort();
    assert_eq!(shown, expected_jobs, "{status}");
    for (job, name, dir) in [
        (&script_job, "batch", &batch_dir),
        (&jobs[0], "0", &step_dir),
    ] {
        let rows = status_rows(&status, job);
        let row = &rows[name];
        let (generation, kind, bytes, chain_bytes) = newest_generation(dir);
        assert_eq!(row["generation"].as_u64(), Some(generation), "{row}");
        assert_eq!(row["kind"].as_str(), Some(kind.as_str()), "{row}");
        assert_eq!(row["bytes"].as_u64(), Some(bytes), "{row}");
        assert_eq!(row["chain_bytes"].as_u64(), Some(chain_bytes), "{row}");
        assert_eq!(row["drain_bytes"].as_u64(), Some(chain_bytes), "{row}");
        let created = row["created_unix"].as_u64().unwrap();
        assert!(
            (before..=after).contains(&created),
            "{row}: not taken in {before}..={after}"
        );
    }
    let script_rows = status_rows(&status, &script_job);
    let hidden_row = script_rows
        .get("9")
        .unwrap_or_else(|| panic!("no row for the planted directory: {status}"));
    assert!(
        hidden_row["generation"].is_null() && hidden_row["unusable"] == 1,
        "read as root? {hidden_row}"
    );
    let second_rows = status_rows(&status, &jobs[1]);
    let second_step = second_rows
        .get("0")
        .unwrap_or_else(|| panic!("no step 0 row for job {}: {status}", jobs[1]));
    assert!(second_step["generation"].is_null(), "{second_step}");
    // The drain's --dry-run shows the same as a table and changes nothing.
    let mut dry_run = Command::new(drain_helper());
    dry_run
        .args([busy.as_str(), "--dry-run"])
        .env("VMWRAP_VMCTL", &vmctl);
    let table = run_command(dry_run, b"", JOB_TIMEOUT);
    assert_eq!(table.code, 0, "{table:?}");
    let text = table.stdout_str();
    for job in &jobs {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{job} "))),
            "{job}:\n{text}"
        );
    }
    assert!(
        text.lines()
            .last()
            .unwrap_or("")
            .starts_with("a drain writes up to "),
        "{text}"
    );
    assert!(
        !run("scontrol", &["show", "node", busy], Path::new("/"))
            .stdout_str()
            .contains("DRAIN"),
        "--dry-run drained {busy}"
    );
    fs::remove_dir_all(&planted).unwrap();

    cleanup.drained.push(busy.clone());
    let helper = drain_helper();
    let out = run(
        helper.to_str().unwrap(),
        &[busy, "--reason", "vmwrap test drain"],
        Path::new("/"),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let mut expected: Vec<String> = jobs
        .iter()
        .map(|j| format!("job {j}: {busy} -> {spare}"))
        .collect();
    let mut printed: Vec<String> = out.stdout_str().lines().map(str::to_string).collect();
    expected.sort();
    printed.sort();
    assert_eq!(printed, expected, "{out:?}");
    let node = run("scontrol", &["show", "node", busy], Path::new("/"));
    let node_text = node.stdout_str();
    assert!(
        node_text.contains("DRAIN") && node_text.contains("Reason=vmwrap test drain"),
        "{busy} is not drained with the reason:\n{node_text}"
    );

    for (job, output) in jobs.iter().zip(&outputs) {
        let state = wait_for_job(job);
        let text = fs::read_to_string(output).unwrap_or_default();
        assert_eq!(state, "COMPLETED", "job {job} output:\n{text}");
        let (first, second) = check_two_runs(&text, Restart::Resumed);
        assert_eq!((&first.node, &second.node), (busy, spare), "{text}");
    }
    let state = wait_for_job(&script_job);
    let text = fs::read_to_string(&script_out).unwrap_or_default();
    let err_text = fs::read_to_string(&script_err).unwrap_or_default();
    assert_eq!(state, "COMPLETED", "stdout:\n{text}\nstderr:\n{err_text}");
    assert_eq!(
        text,
        shell_counter_output(SCRIPT_TICKS),
        "the drained script's output differs from an uninterrupted run; stderr:\n{err_text}"
    );
    assert!(
        err_text.contains(&format!(
            "vmwrap: job {script_job} batch script: restart 1: resuming from its checkpoint"
        )),
        "{err_text}"
    );
}

/// A checkpoint damaged between the requeue and the restart is never run:
/// the restarted step notices, says why in the slurmd log, and starts afresh
/// (it has no older generation), still ending with the right result.
#[test]
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
fn corrupted_checkpoint_starts_afresh() {
    need_slurm!();
    let mut cleanup = Cleanup::default();
    let dir = user_dir("corrupt");
    let output = dir.join("job.out");
    let job = submit_counter(&mut cleanup, "corrupt", dir.path(), &output, &[]);
    wait_running(&job);
    wait_progress(&job, &output, 4);
    let requeued_at = requeue(&job);
    wait_pending(&job);

    // The SIGTERM checkpoint is complete once `latest` points at it.
    let step_dir = Path::new(CHECKPOINT_ROOT).join(USER).join(&job).join("0");
    let image = poll(
        "the requeue's checkpoint",
        JOB_TIMEOUT,
        || {
            let generation = fs::read_link(step_dir.join("latest")).ok()?;
            let image = step_dir.join(generation).join("memory.img");
            image.exists().then_some(image)
        },
        || {
            format!(
                "{} holds {:?}",
                step_dir.display(),
                fs::read_dir(&step_dir).map(|d| d.count())
            )
        },
    );
    corrupt(&image);
    let damaged = fs::read(&image).unwrap();
    let generation = image.parent().unwrap().file_name().unwrap().to_owned();
    release(&job, requeued_at);

    let state = wait_for_job(&job);
    let text = fs::read_to_string(&output).unwrap_or_default();
    assert_eq!(state, "COMPLETED", "job output:\n{text}");
    check_two_runs(&text, Restart::Afresh);
    // Starting afresh destroyed nothing: the generation inspect refused is
    // kept, byte for byte, in one kept-<time> directory, and the job says where.
    let kept = kept_dirs(&step_dir);
    assert_eq!(
        kept.len(),
        1,
        "expected one kept-* directory in {}",
        step_dir.display()
    );
    let kept_image = kept[0].join(&generation).join("memory.img");
    assert!(
        fs::read(&kept_image).is_ok_and(|b| b == damaged),
        "{} is not the generation the restart refused",
        kept_image.display()
    );
    assert!(
        text.contains(&format!(
            "the earlier run's checkpoints are kept in {}",
            kept[0].display()
        )),
        "the job's output does not say where its checkpoints went:\n{text}"
    );
    let why = format!("job {job} step 0 task 0: restart 1: starting afresh: vmctl inspect --verify found no valid checkpoint");
    let logs = slurmd_logs();
    let line = logs.lines().find(|l| l.contains(&why));
    assert!(line.is_some(), "no slurmd log line containing {why:?}");
    assert!(
        line.unwrap().contains("UNUSABLE"),
        "the log line does not say what is wrong: {line:?}"
    );
}

/// The generation `latest` points to in a checkpoint directory.
fn latest_generation(step_dir: &Path) -> Option<String> {
    let link = fs::read_link(step_dir.join("latest")).ok()?;
    Some(link.to_str()?.to_string())
}

fn generation_number(name: &str) -> u64 {
    name.strip_prefix("gen-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{name:?} is not a generation directory"))
}

/// Flips 64 bytes in the middle of a checkpoint's memory image.
fn corrupt(image: &Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let len = f.metadata().unwrap().len();
    assert!(len >= 128, "{} is only {len} bytes", image.display());
    let at = len / 2;
    let mut buf = [0u8; 64];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut buf).unwrap();
    for b in &mut buf {
        *b ^= 0xff;
    }
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&buf).unwrap();
    f.sync_all().unwrap();
}

/// `vmctl gc ROOT` removes the directories of jobs Slurm has forgotten,
/// keeps those of jobs it knows and anything that is not a job directory,
/// and removes nothing when slurmctld cannot be reached.
#[test]
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
fn gc_removes_only_forgotten_jobs() {
    need_slurm!();
    let mut cleanup = Cleanup::default();
    let dir = user_dir("gc");
    // A job Slurm knows for the whole test: held, so it never runs.
    let name = job_name("gc");
    let out = run_as_user(
        &[
            "sbatch",
            "--parsable",
            "--hold",
            "-J",
            &name,
            "--wrap",
            "true",
        ],
        dir.path(),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let known = out.stdout_str().trim().to_string();
    cleanup.jobs.push(known.clone());
    // Far above any id the test cluster hands out.
    let forgotten = "67000000";

    let root = TempDir::new("gc-root");
    let user = root.join(USER);
    for sub in [known.as_str(), forgotten, "not-a-job"] {
        fs::create_dir_all(user.join(sub).join("0")).unwrap();
        fs::write(user.join(sub).join("0").join("step.json"), "{}").unwrap();
    }
    let vmctl = vmwrap_tests::vmctl_path();
    let vmctl = vmctl.to_str().unwrap();
    let root_s = root.path().to_str().unwrap();

    let out = run(vmctl, &["gc", "--dry-run", root_s], Path::new("/"));
    assert_eq!(out.code, 0, "{out:?}");
    let stdout = out.stdout_str();
    assert!(
        stdout.contains(&format!("would remove {}", user.join(forgotten).display())),
        "{out:?}"
    );
    assert!(
        stdout.contains(&format!(
            "keep {} (job {known} is PENDING)",
            user.join(&known).display()
        )),
        "{out:?}"
    );
    assert!(user.join(forgotten).exists(), "--dry-run removed something");

    // slurmctld unreachable: a config pointing at a port nobody listens on.
    let conf = dir.join("unreachable.conf");
    fs::write(
        &conf,
        "ClusterName=gone\nSlurmctldHost=localhost\nSlurmctldPort=1\nMessageTimeout=1\nAuthType=auth/munge\n",
    )
    .unwrap();
    let mut cmd = Command::new(vmctl);
    cmd.args(["gc", root_s]).env("SLURM_CONF", &conf);
    let out = run_command(cmd, b"", JOB_TIMEOUT);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr_str().contains("removed nothing"), "{out:?}");
    assert!(
        user.join(forgotten).exists() && user.join(&known).exists(),
        "{out:?}"
    );

    let out = run(vmctl, &["gc", root_s], Path::new("/"));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout_str().contains(&format!(
            "removed {} (job {forgotten} unknown to Slurm)",
            user.join(forgotten).display()
        )),
        "{out:?}"
    );
    assert!(!user.join(forgotten).exists(), "{out:?}");
    assert!(user.join(&known).join("0/step.json").exists(), "{out:?}");
    assert!(user.join("not-a-job").exists(), "{out:?}");
}

/// The kept-<time> directories a fresh start moved earlier checkpoints into.
fn kept_dirs(step_dir: &Path) -> Vec<PathBuf> {
    let mut kept: Vec<PathBuf> = fs::read_dir(step_dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("kept-"))
                })
                .collect()
        })
        .unwrap_or_default();
    kept.sort();
    kept
}

// ---------------------------------------------------------------------------
// Hardening: nothing the user plants reaches root, no checkpoint is lost to a
// failure, and the drain trusts only Slurm's record.

/// A hard link, a FIFO and a symlink planted as `finished` in a running
/// wrapped step's checkpoint directory: the step still ends (root never opens
/// the FIFO), the file the links point to keeps its bytes (nobody truncates
/// or chowns it), and what is left is vmctl's own marker, a regular file of
/// the user's.
#[test]
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
fn planted_entries_in_the_checkpoint_dir_never_reach_root() {
    need_slurm!();
    let mut cleanup = Cleanup::default();
    let dir = user_dir("planted");
    let output = dir.join("job.out");
    let precious = dir.join("precious");
    fs::write(&precious, "the user's data\n").unwrap();
    let (uid, gid) = user_ids();
    std::os::unix::fs::chown(&precious, Some(uid), Some(gid)).unwrap();
    // Each step waits inside its VM until the batch script (native, as the
    // user) has planted `finished` next to it, then ends normally. The
    // script plants once the control socket exists: vmctl is running then,
    // past the point where it clears a stale marker of an earlier run.
    let step = "srun --vm-wrap /usr/bin/perl -e 'until (-e \"$ENV{VMWRAP_CHECKPOINT_DIR}/finished\" || -l \"$ENV{VMWRAP_CHECKPOINT_DIR}/finished\") { select(undef,undef,undef,0.05) } print \"step saw it\\n\"'";
    let plant = |n: u32, how: &str| {
        format!(
            "{step} &\n\
             d={CHECKPOINT_ROOT}/$USER/$SLURM_JOB_ID/{n}\n\
             until [ -S $d/control.sock ]; do sleep 0.05; done\n\
             {how} $d/finished\n\
             wait\n",
        )
    };
    let precious_s = precious.to_str().unwrap();
    let script = [
        plant(0, &format!("ln {precious_s}")),
        plant(1, "mkfifo"),
        plant(2, &format!("ln -s {precious_s}")),
    ]
    .concat();
    let name = job_name("planted");
    let out = run_as_user(
        &[
            "sbatch",
            "--parsable",
            "-J",
            &name,
            "-o",
            output.to_str().unwrap(),
            "--wrap",
            &script,
        ],
        dir.path(),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let job = out.stdout_str().trim().to_string();
    cleanup.jobs.push(job.clone());

    let state = wait_for_job(&job);
    let text = fs::read_to_string(&output).unwrap_or_default();
    assert_eq!(state, "COMPLETED", "job output:\n{text}");
    assert_eq!(text.matches("step saw it").count(), 3, "{text}");
    assert_eq!(
        fs::read_to_string(&precious).unwrap(),
        "the user's data\n",
        "root wrote through the planted hard link or symlink"
    );
    assert_eq!(fs::metadata(&precious).unwrap().uid(), uid);
    for n in 0..3 {
        let marker = Path::new(CHECKPOINT_ROOT)
            .join(USER)
            .join(&job)
            .join(n.to_string())
            .join("finished");
        let meta = fs::symlink_metadata(&marker).unwrap();
        assert!(
            meta.file_type().is_file() && meta.nlink() == 1 && meta.uid() == uid,
            "{} is not vmctl's own marker: {meta:?}",
            marker.display()
        );
        let recorded: serde_json::Value =
            serde_json::from_slice(&fs::read(&marker).unwrap()).unwrap();
        assert_eq!(recorded["exit_status"], 0, "{}", marker.display());
    }
}

/// The SIGTERM checkpoint of a requeue fails (the directory is made
/// read-only for the moment): vmctl exits 143, which is not an end of the
/// program, so the restart resumes from the older periodic generation
/// instead of starting afresh and deleting it.
#[test]
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
fn failed_checkpoint_exit_keeps_the_older_generations() {
    need_slurm!();
    use std::os::unix::fs::PermissionsExt;
    const LONG: u64 = 80;
    let mut cleanup = Cleanup::default();
    let dir = user_dir("failed-exit");
    let output = dir.join("job.out");
    let job = submit_counter_ticks(
        &mut cleanup,
        "failed-exit",
        dir.path(),
        &output,
        &[],
        LONG,
        "--vm-wrap=interval=10,keep=3,script=native",
    );
    wait_running(&job);
    let step_dir = Path::new(CHECKPOINT_ROOT).join(USER).join(&job).join("0");
    let periodic = poll(
        "the first periodic checkpoint",
        Duration::from_secs(30),
        || latest_generation(&step_dir),
        || fs::read_to_string(&output).unwrap_or_default(),
    );
    let done = parse_runs(&fs::read_to_string(&output).unwrap_or_default())[0]
        .numbers
        .len();
    wait_progress(&job, &output, done + 6);
    fs::set_permissions(&step_dir, fs::Permissions::from_mode(0o500)).unwrap();
    let requeued_at = requeue(&job);
    wait_pending(&job);
    fs::set_permissions(&step_dir, fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(
        latest_generation(&step_dir).as_deref(),
        Some(periodic.as_str()),
        "the SIGTERM checkpoint should have failed"
    );
    release(&job, requeued_at);

    let state = wait_for_job(&job);
    let text = fs::read_to_string(&output).unwrap_or_default();
    assert_eq!(state, "COMPLETED", "job output:\n{text}");
    assert!(text.contains("vmctl: checkpoint failed"), "{text}");
    check_two_runs_ticks(&text, Restart::Earlier, LONG);
}

/// User A makes ROOT/A/<B's job id>, and B names its unwrapped job after the
/// plugin's mark; the drain must still leave B's job running (it only trusts
/// the plugin's mark in Slurm's AdminComment field) while it moves A's
/// wrapped job.
#[test]
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
fn drain_trusts_slurm_not_directories_users_make() {
    need_slurm!();
    let mut cleanup = Cleanup::default();
    let nodes = nodes();
    let (busy, spare) = (&nodes[0], &nodes[1]);
    drain(&mut cleanup, spare);
    let dir = user_dir("drain-trust");
    let victim_dir = TempDir::new("drain-trust-victim");
    let victim_out = victim_dir.join("victim.out");
    let other_uid = {
        let meta = fs::metadata(format!("/home/{OTHER_USER}")).unwrap_or_else(|e| {
            panic!("{OTHER_USER} has no home directory ({e}); run contrib/vmwrap-cluster up")
        });
        std::os::unix::fs::chown(victim_dir.path(), Some(meta.uid()), Some(meta.gid())).unwrap();
        meta.uid()
    };
    // Its name, which its owner chooses, also spells the plugin's mark: only
    // Slurm's own AdminComment field may count.
    let name = format!(
        "{} AdminComment=vmwrap-uid={other_uid}",
        job_name("drain-victim")
    );
    let out = run_as(
        OTHER_USER,
        &[
            "sbatch",
            "--parsable",
            "--requeue",
            "--open-mode=append",
            "-J",
            &name,
            "-o",
            victim_out.to_str().unwrap(),
            "--wrap",
            &counter_script(TICKS),
        ],
        victim_dir.path(),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let victim = out.stdout_str().trim().to_string();
    cleanup.jobs.push(victim.clone());
    let wrapped_out = dir.join("wrapped.out");
    let wrapped = submit_counter(&mut cleanup, "drain-trust", dir.path(), &wrapped_out, &[]);
    for (job, output) in [(&victim, &victim_out), (&wrapped, &wrapped_out)] {
        assert_eq!(&wait_running(job), busy);
        wait_progress(job, output, 4);
    }
    // The attacker's directory, named after the victim's job.
    let planted = Path::new(CHECKPOINT_ROOT).join(USER).join(&victim);
    let out = run_as_user(
        &["mkdir", "-p", planted.join("0").to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(out.code, 0, "{out:?}");
    resume_node(&mut cleanup, spare);

    cleanup.drained.push(busy.clone());
    let helper = drain_helper();
    let out = run(helper.to_str().unwrap(), &[busy], Path::new("/"));
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout_str(),
        format!("job {wrapped}: {busy} -> {spare}\n"),
        "{out:?}"
    );
    assert!(
        out.stderr_str()
            .contains(&format!("job {victim} is not wrapped")),
        "{out:?}"
    );
    let fields = job_fields(&victim).unwrap();
    assert_eq!(
        fields.get("Restarts").map(String::as_str),
        Some("0"),
        "{fields:?}"
    );

    for (job, output) in [(&victim, &victim_out), (&wrapped, &wrapped_out)] {
        let state = wait_for_job(job);
        let text = fs::read_to_string(output).unwrap_or_default();
        assert_eq!(state, "COMPLETED", "job {job}:\n{text}");
    }
    let victim_runs = parse_runs(&fs::read_to_string(&victim_out).unwrap_or_default());
    assert_eq!(victim_runs.len(), 1, "the victim's job was restarted");
    check_two_runs(
        &fs::read_to_string(&wrapped_out).unwrap_or_default(),
        Restart::Resumed,
    );
}

/// Wrapped jobs the load test puts on one node.
const LOAD_JOBS: usize = 16;
/// Long enough (30 s) that the first job is still counting when the last of
/// the 16 has started on a busy 2-core machine.
const LOAD_TICKS: u64 = 120;

/// Load: 16 wrapped jobs on one node, all checkpointed at once by
/// contrib/vmwrap-drain; every one resumes on the other node where it
/// stopped and ends with the right sum. Small VMs (mem=64M) keep it fast.
#[test]
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
fn sixteen_jobs_checkpointed_at_once_all_resume() {
    need_slurm!();
    let mut cleanup = Cleanup::default();
    let nodes = nodes();
    let (busy, spare) = (&nodes[0], &nodes[1]);
    drain(&mut cleanup, spare);
    let dir = user_dir("load");
    let outputs: Vec<PathBuf> = (0..LOAD_JOBS)
        .map(|i| dir.join(format!("job{i}.out")))
        .collect();
    let jobs: Vec<String> = outputs
        .iter()
        .map(|o| {
            submit_counter_ticks(
                &mut cleanup,
                "load",
                dir.path(),
                o,
                &["--mem=128M"],
                LOAD_TICKS,
                "--vm-wrap=mem=64M,script=native",
            )
        })
        .collect();
    for job in &jobs {
        assert_eq!(
            &wait_running(job),
            busy,
            "job {job} did not start on {busy}"
        );
    }
    for (job, output) in jobs.iter().zip(&outputs) {
        wait_progress(job, output, 4);
    }
    resume_node(&mut cleanup, spare);

    cleanup.drained.push(busy.clone());
    let helper = drain_helper();
    let out = run(helper.to_str().unwrap(), &[busy], Path::new("/"));
    assert_eq!(out.code, 0, "{out:?}");
    let mut expected: Vec<String> = jobs
        .iter()
        .map(|j| format!("job {j}: {busy} -> {spare}"))
        .collect();
    let mut printed: Vec<String> = out.stdout_str().lines().map(str::to_string).collect();
    expected.sort();
    printed.sort();
    assert_eq!(printed, expected, "{out:?}");

    for (job, output) in jobs.iter().zip(&outputs) {
        let state = wait_for_job(job);
        let text = fs::read_to_string(output).unwrap_or_default();
        assert_eq!(state, "COMPLETED", "job {job} output:\n{text}");
        let (first, second) = check_two_runs_ticks(&text, Restart::Resumed, LOAD_TICKS);
        assert_eq!(
            (&first.node, &second.node),
            (busy, spare),
            "job {job}:\n{text}"
        );
    }
}

/// The admin's and the user's memory limit holds for a restore as for the
/// first run (the job also asks for compress=zstd, which must reach vmctl): a
/// checkpoint whose manifest the user grew (and re-summed) past
/// the job's mem= is refused when the requeued job restarts, with the reason
/// in the job's output, instead of restoring into a bigger VM.
#[test]
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
fn restore_keeps_the_memory_limit_of_the_run() {
    need_slurm!();
    let mut cleanup = Cleanup::default();
    let dir = user_dir("restore-mem");
    let output = dir.join("job.out");
    let job = submit_counter_ticks(
        &mut cleanup,
        "restore-mem",
        dir.path(),
        &output,
        &[],
        TICKS,
        "--vm-wrap=mem=64M,script=native,compress=zstd",
    );
    wait_running(&job);
    wait_progress(&job, &output, 4);
    let requeued_at = requeue(&job);
    wait_pending(&job);
    let step_dir = Path::new(CHECKPOINT_ROOT).join(USER).join(&job).join("0");
    let generation = poll(
        "the requeue's checkpoint",
        JOB_TIMEOUT,
        || latest_generation(&step_dir),
        || format!("no latest in {}", step_dir.display()),
    );
    let gen = step_dir.join(generation);
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(gen.join("manifest.json")).unwrap()).unwrap();
    // compress= reached vmctl: the image is compressed (format 4).
    assert_eq!(
        manifest["format_version"], 4,
        "compress=zstd was not applied"
    );
    assert!(manifest["memory"]["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["compressed"]["codec"] == "zstd"));
    let ram = &mut manifest["memory"]["ram_bytes"];
    *ram = (ram.as_u64().unwrap() + (200 << 20)).into();
    write_manifest(&gen, &manifest);
    release(&job, requeued_at);

    wait_for_job(&job);
    let text = fs::read_to_string(&output).unwrap_or_default();
    assert!(
        text.contains("more than --mem 64 MiB allows"),
        "the grown checkpoint was not refused:\n{text}"
    );
    let runs = parse_runs(&text);
    assert!(
        runs.len() == 2 && runs[1].numbers.is_empty(),
        "the grown checkpoint ran:\n{text}"
    );
    assert!(gen.is_dir(), "the refused generation was removed");
}

/// The /dev/kvm descriptor slurmstepd opens for a wrapped step is
/// close-on-exec in slurmstepd, so only vmctl (which the task executes with
/// the flag cleared) gets it, not other programs slurmstepd starts.
#[test]
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
fn kvm_descriptor_reaches_vmctl_only() {
    need_slurm!();
    let mut cleanup = Cleanup::default();
    let dir = user_dir("kvm-fd");
    let output = dir.join("job.out");
    let go = dir.join("go");
    let script = format!(
        "srun --vm-wrap /usr/bin/perl -e 'until (-e \"{}\") {{ select(undef,undef,undef,0.05) }} print \"done\\n\"'\n",
        go.display()
    );
    let name = job_name("kvm-fd");
    let out = run_as_user(
        &[
            "sbatch",
            "--parsable",
            "-J",
            &name,
            "-o",
            output.to_str().unwrap(),
            "--wrap",
            &script,
        ],
        dir.path(),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let job = out.stdout_str().trim().to_string();
    cleanup.jobs.push(job.clone());

    // (process, O_CLOEXEC set) for every open /dev/kvm descriptor held by
    // this step's slurmstepd or vmctl (other helpers' processes are ignored).
    let step = format!("slurmstepd: [{job}.0]");
    let holders = || -> Vec<(String, bool)> {
        let mut found = Vec::new();
        for proc_entry in fs::read_dir("/proc").unwrap().flatten() {
            let pid = proc_entry.file_name();
            if !pid.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let base = proc_entry.path();
            let cmdline = fs::read(base.join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let comm = if cmdline.starts_with(&step) {
                "slurmstepd"
            } else if cmdline.contains("vmctl") && cmdline.contains(&format!("/{job}/0")) {
                "vmctl"
            } else {
                continue;
            };
            let Ok(fds) = fs::read_dir(base.join("fd")) else {
                continue;
            };
            for fd in fds.flatten() {
                if fs::read_link(fd.path()).is_ok_and(|t| t == Path::new("/dev/kvm")) {
                    let info = fs::read_to_string(base.join("fdinfo").join(fd.file_name()))
                        .unwrap_or_default();
                    let flags = info
                        .lines()
                        .find_map(|l| l.strip_prefix("flags:"))
                        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok());
                    if let Some(flags) = flags {
                        found.push((comm.to_string(), flags & libc::O_CLOEXEC as u32 != 0));
                    }
                }
            }
        }
        found
    };
    let seen = poll(
        "slurmstepd and vmctl to hold /dev/kvm",
        JOB_TIMEOUT,
        || {
            let h = holders();
            (h.iter().any(|(c, _)| c == "vmctl")
                && h.iter().any(|(c, _)| c.starts_with("slurmstepd")))
            .then_some(h)
        },
        || format!("holders: {:?}", holders()),
    );
    let out = run_as_user(&["touch", go.to_str().unwrap()], dir.path());
    assert_eq!(out.code, 0, "{out:?}");
    for (comm, cloexec) in &seen {
        if comm.starts_with("slurmstepd") {
            assert!(
                cloexec,
                "slurmstepd holds /dev/kvm without O_CLOEXEC: {seen:?}"
            );
        }
    }
    assert_eq!(wait_for_job(&job), "COMPLETED");
    assert_eq!(fs::read_to_string(&output).unwrap_or_default(), "done\n");
}

/// A requeued job lands on a node whose CPU lacks a feature its checkpoint
/// needs (the manifest is made to demand one this host lacks): the step
/// starts afresh, says why, and the checkpoint, which would restore on a
/// suitable node, is kept byte for byte in kept-<time>.
#[test]
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
fn checkpoint_needing_a_missing_cpu_feature_is_kept() {
    need_slurm!();
    let mut cleanup = Cleanup::default();
    let dir = user_dir("cpu-kept");
    let output = dir.join("job.out");
    let job = submit_counter(&mut cleanup, "cpu-kept", dir.path(), &output, &[]);
    wait_running(&job);
    wait_progress(&job, &output, 4);
    let requeued_at = requeue(&job);
    wait_pending(&job);
    let step_dir = Path::new(CHECKPOINT_ROOT).join(USER).join(&job).join("0");
    let generation = poll(
        "the requeue's checkpoint",
        JOB_TIMEOUT,
        || latest_generation(&step_dir),
        || format!("no latest in {}", step_dir.display()),
    );
    let gen = step_dir.join(&generation);
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(gen.join("manifest.json")).unwrap()).unwrap();
    // Demand a feature bit of a recorded CPUID word that this host's CPU
    // does not have (OSXSAVE, leaf 1 ECX bit 27, is an OS setting: skip it).
    let host = |leaf: u32, subleaf: u32, register: &str| {
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU and only reads registers.
        let r = unsafe { std::arch::x86_64::__cpuid_count(leaf, subleaf) };
        match register {
            "eax" => r.eax,
            "ebx" => r.ebx,
            "ecx" => r.ecx,
            _ => r.edx,
        }
    };
    let words = manifest["cpu"]["words"].as_array_mut().unwrap();
    let (word, bit) = words
        .iter()
        .enumerate()
        .find_map(|(i, w)| {
            let (leaf, subleaf) = (w["leaf"].as_u64()? as u32, w["subleaf"].as_u64()? as u32);
            let register = w["register"].as_str()?;
            let have = host(leaf, subleaf, register);
            (0..32)
                .filter(|&b| !(leaf == 1 && register == "ecx" && b == 27))
                .find(|b| have & (1 << b) == 0)
                .map(|b| (i, b))
        })
        .expect("a CPUID feature bit this host lacks");
    let bits = words[word]["bits"].as_u64().unwrap() | 1 << bit;
    words[word]["bits"] = bits.into();
    let bytes = serde_json::to_vec(&manifest).unwrap();
    fs::write(gen.join("manifest.json"), &bytes).unwrap();
    fs::write(gen.join("manifest.sum"), manifest_sum(&bytes)).unwrap();
    let image = fs::read(gen.join("memory.img")).unwrap();
    release(&job, requeued_at);

    let state = wait_for_job(&job);
    let text = fs::read_to_string(&output).unwrap_or_default();
    assert_eq!(state, "COMPLETED", "job output:\n{text}");
    check_two_runs(&text, Restart::Afresh);
    assert!(
        text.contains("starting afresh: vmctl inspect --verify found no valid checkpoint"),
        "the job's output does not say why it started afresh:\n{text}"
    );
    let kept = kept_dirs(&step_dir);
    assert_eq!(kept.len(), 1, "{text}");
    let kept_gen = kept[0].join(&generation);
    assert_eq!(fs::read(kept_gen.join("manifest.json")).unwrap(), bytes);
    assert!(
        fs::read(kept_gen.join("memory.img")).is_ok_and(|b| b == image),
        "the kept memory image changed"
    );
}

/// This machine's CPU class, which vmwrap-cluster puts in every node's Features.
fn cpu_class() -> String {
    let out = run(
        vmwrap_tests::vmctl_path().to_str().unwrap(),
        &["cpu-class"],
        Path::new("/"),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let class = out.stdout_str().trim().to_string();
    assert!(class.starts_with("vmwrap-"), "{out:?}");
    class
}

fn node_features(node: &str) -> String {
    let out = run("scontrol", &["show", "node", "-o", node], Path::new("/"));
    assert_eq!(out.code, 0, "{out:?}");
    out.stdout_str()
        .split_whitespace()
        .find_map(|w| w.strip_prefix("AvailableFeatures=").map(str::to_string))
        .unwrap_or_default()
}

/// Gives `node` the Features `features` (empty: none) until the test ends.
fn set_node_features(cleanup: &mut Cleanup, node: &str, features: &str) {
    let before = node_features(node);
    let before = if before == "(null)" {
        String::new()
    } else {
        before
    };
    if !cleanup.features.iter().any(|(n, _)| n == node) {
        cleanup.features.push((node.to_string(), before));
    }
    let out = run(
        "scontrol",
        &[
            "update",
            &format!("nodename={node}"),
            &format!("availablefeatures={features}"),
            &format!("activefeatures={features}"),
        ],
        Path::new("/"),
    );
    assert_eq!(out.code, 0, "setting the features of {node}: {out:?}");
}

/// The slurmd logs of the local cluster, concatenated.
fn slurmd_logs() -> String {
    fs::read_dir("/var/log/slurm")
        .unwrap()
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path.file_name()?.to_str()?.to_string();
            // Only this cluster's logs: `vmwrap-cluster up` renames the previous
            // cluster's to *.log.1, whose job ids the new jobs reuse.
            (name.starts_with("slurmd-") && name.ends_with(".log"))
                .then(|| fs::read_to_string(&path).unwrap_or_default())
        })
        .collect()
}

/// The `key=value` pairs of the event line of `kind` for `job`, if logged.
fn event_line(
    logs: &str,
    kind: &str,
    job: &str,
) -> Option<std::collections::HashMap<String, String>> {
    let marker = format!("vmwrap: event={kind} job={job} ");
    let line = logs.lines().find(|l| l.contains(&marker))?;
    let pairs = &line[line.find("event=")?..];
    Some(
        pairs
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// Two CPU classes: n1 has this machine's, n2 a made-up one. A wrapped job
/// checkpointed on n1 is pinned to n1's class when requeued, so with n1
/// drained it waits instead of starting on n2 (where, on a real cluster, its
/// checkpoint could not be restored); once n1 is back it resumes there. The
/// slurmd log carries one parseable event line per fresh start, checkpoint
/// and restore.
#[test]
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
fn requeued_job_waits_for_a_node_of_its_cpu_class() {
    need_slurm!();
    let mut cleanup = Cleanup::default();
    let nodes = nodes();
    let (home, other) = (&nodes[0], &nodes[1]);
    let class = cpu_class();
    set_node_features(&mut cleanup, home, &class);
    set_node_features(&mut cleanup, other, "vmwrap-test-b");
    let dir = user_dir("class");
    let output = dir.join("job.out");
    // The job must start on `home`: keep `other` drained until it runs.
    drain(&mut cleanup, other);
    let job = submit_counter(&mut cleanup, "class", dir.path(), &output, &[]);
    assert_eq!(&wait_running(&job), home);
    resume_node(&mut cleanup, other);
    wait_progress(&job, &output, 4);

    let requeued_at = requeue(&job);
    wait_pending(&job);
    poll(
        &format!("job {job} to be pinned to {class}"),
        JOB_TIMEOUT,
        || {
            let features = job_fields(&job)?.get("Features")?.clone();
            features.split('&').any(|f| f == class).then_some(())
        },
        || format!("{:?}", job_fields(&job)),
    );
    drain(&mut cleanup, home);
    release(&job, requeued_at);
    // The scheduler looked at the job (its reason is no longer the requeue's
    // BeginTime) and left it pending: the only free node has another class.
    let reason = poll(
        &format!("the scheduler to consider job {job}"),
        JOB_TIMEOUT,
        || {
            let f = job_fields(&job)?;
            let reason = f.get("Reason")?.clone();
            (f.get("JobState")? != "PENDING" || !["BeginTime", "None"].contains(&reason.as_str()))
                .then_some(reason)
        },
        || format!("{:?}", job_fields(&job)),
    );
    assert_eq!(
        job_state(&job),
        "PENDING",
        "job {job} pinned to {class} started elsewhere (reason was {reason})"
    );
    resume_node(&mut cleanup, home);
    assert_eq!(&wait_running(&job), home);

    let state = wait_for_job(&job);
    let text = fs::read_to_string(&output).unwrap_or_default();
    assert_eq!(state, "COMPLETED", "job output:\n{text}");
    check_two_runs(&text, Restart::Resumed);

    let logs = slurmd_logs();
    let fresh = event_line(&logs, "fresh_start", &job).expect("no fresh_start event");
    assert_eq!(fresh["restart"], "0");
    assert_eq!(fresh["result"], "ok");
    let checkpoint = event_line(&logs, "checkpoint", &job).expect("no checkpoint event");
    assert_eq!(checkpoint["step"], "0");
    assert_eq!(checkpoint["task"], "0");
    assert_eq!(checkpoint["result"], "ok");
    assert_eq!(checkpoint["kind"], "full");
    assert!(checkpoint["gen"].parse::<u64>().unwrap() >= 1);
    assert!(checkpoint["bytes"].parse::<u64>().unwrap() > 0);
    assert!(checkpoint["frozen_s"].parse::<f64>().is_ok());
    let restore = event_line(&logs, "restore", &job).expect("no restore event");
    assert_eq!(
        restore["gen"], checkpoint["gen"],
        "restored another generation"
    );
    assert_eq!(restore["result"], "ok");
}

/// A requeued wrapped job whose CPU class no node has is held with a reason
/// saying so, instead of starting afresh on a node that cannot restore it.
#[test]
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
fn requeued_job_of_a_missing_cpu_class_is_held() {
    need_slurm!();
    let mut cleanup = Cleanup::default();
    let nodes = nodes();
    let class = cpu_class();
    let dir = user_dir("noclass");
    let output = dir.join("job.out");
    let job = submit_counter(&mut cleanup, "noclass", dir.path(), &output, &[]);
    let node = wait_running(&job);
    wait_progress(&job, &output, 4);
    // The class the job runs on leaves the cluster; others remain.
    for n in &nodes {
        let features = if *n == node {
            "vmwrap-test-c"
        } else {
            "vmwrap-test-b"
        };
        set_node_features(&mut cleanup, n, features);
    }
    requeue(&job);
    let comment = poll(
        &format!("job {job} to be held"),
        JOB_TIMEOUT,
        || {
            let f = job_fields(&job)?;
            (f.get("JobState")? == "PENDING" && f.get("Reason")? == "JobHeldAdmin")
                .then(|| run("scontrol", &["show", "job", &job], Path::new("/")).stdout_str())
        },
        || format!("{:?}", job_fields(&job)),
    );
    assert!(
        comment.contains("Comment=vmwrap: held") && comment.contains(&class),
        "no reason naming {class}:\n{comment}"
    );
    let text = fs::read_to_string(&output).unwrap_or_default();
    assert_eq!(parse_runs(&text).len(), 1, "the job ran again:\n{text}");
}

/// Like `counter_script`, and the step also writes `traj` in the job's
/// directory as a trajectory writer does: it seeks to the end to append a
/// record per tick and, every 3 records, seeks back to rewrite a header with
/// the count.
fn trajectory_script(ticks: u64) -> String {
    format!(
        "echo \"script start ${{SLURM_RESTART_COUNT:-0}} on $SLURMD_NODENAME\"\n\
         srun /usr/bin/perl -e 'use Fcntl; $|=1; sysopen(T, \"traj\", O_RDWR|O_CREAT|O_TRUNC) or die; syswrite(T, sprintf(\"count=%08d\\n\", 0)); $s=0; for $i (0..{last}) {{ $s += $i; sysseek(T, 0, 2); syswrite(T, sprintf(\"rec %04d\\n\", $i)); if (($i+1) % 3 == 0 || $i == {last}) {{ sysseek(T, 0, 0); syswrite(T, sprintf(\"count=%08d\\n\", $i+1)) }} print \"$i\\n\"; select(undef,undef,undef,{TICK}) }} print \"sum=$s\\n\"'\n",
        last = ticks - 1
    )
}

/// What `trajectory_script(ticks)` leaves in `traj` when it runs uninterrupted.
fn trajectory(ticks: u64) -> String {
    let mut t = format!("count={ticks:08}\n");
    for i in 0..ticks {
        t += &format!("rec {i:04}\n");
    }
    t
}

/// With periodic checkpoints there is an older generation to fall back to. A
/// wrapped step runs on past its periodic generation, writing a file in place
/// and appending to it; it is requeued, and its requeue generation is damaged:
/// the newest one is skipped, the job's stderr says why, and the step resumes
/// from the older one, repeating a little work but never running from bad
/// data. The file it writes still ends up exactly as an uninterrupted run
/// leaves it: the restore undid what the step wrote after that generation.
#[test]
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
fn corrupted_newest_generation_falls_back_and_the_files_follow() {
    need_slurm!();
    const LONG: u64 = 80;
    let mut cleanup = Cleanup::default();
    let dir = user_dir("files-past");
    let output = dir.join("job.out");
    let name = job_name("files-past");
    let script = trajectory_script(LONG);
    let out = run_as_user(
        &[
            "sbatch",
            "--parsable",
            "--requeue",
            "--open-mode=append",
            "--vm-wrap=interval=10,script=native",
            "-J",
            &name,
            "-o",
            output.to_str().unwrap(),
            "--wrap",
            &script,
        ],
        dir.path(),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let job = out.stdout_str().trim().to_string();
    cleanup.jobs.push(job.clone());
    wait_running(&job);
    let step_dir = Path::new(CHECKPOINT_ROOT).join(USER).join(&job).join("0");
    let periodic = poll(
        "the first periodic checkpoint",
        Duration::from_secs(30),
        || latest_generation(&step_dir),
        || fs::read_to_string(&output).unwrap_or_default(),
    );
    let done = parse_runs(&fs::read_to_string(&output).unwrap_or_default())[0]
        .numbers
        .len();
    wait_progress(&job, &output, done + 7);
    let requeued_at = requeue(&job);
    wait_pending(&job);
    let newest = poll(
        "the requeue's checkpoint",
        JOB_TIMEOUT,
        || latest_generation(&step_dir).filter(|g| *g != periodic),
        || format!("latest is still {periodic}"),
    );
    corrupt(&step_dir.join(&newest).join("memory.img"));
    release(&job, requeued_at);

    let state = wait_for_job(&job);
    let text = fs::read_to_string(&output).unwrap_or_default();
    assert_eq!(state, "COMPLETED", "job output:\n{text}");
    check_two_runs_ticks(&text, Restart::Earlier, LONG);
    let (bad, good) = (generation_number(&newest), generation_number(&periodic));
    assert!(
        text.contains(&format!("vmctl: generation {bad} is unusable:"))
            && text.contains(&format!(
                "vmctl: restored generation {good}, the newest usable one"
            )),
        "the job's stderr does not say why generation {bad} was skipped:\n{text}"
    );
    let traj = fs::read_to_string(dir.join("traj")).unwrap_or_default();
    assert!(
        traj == trajectory(LONG),
        "the file the step wrote differs from an uninterrupted run's:\n{traj}\n--- job output ---\n{text}"
    );
}
