//! Wrapped batch scripts (`sbatch --vm-wrap job.sh`) on the real local Slurm
//! cluster: the whole script is checkpointed and continues where it was after
//! a requeue, a time limit or the death of its node.
//!
//! Like tests/slurm_plugin.rs: needs root and `contrib/vmwrap-cluster up`,
//! every test is `#[ignore]`d in a plain `cargo test`, and .ci/run runs them
//! with `-- --ignored --test-threads=1` (they share the cluster's two nodes).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vmwrap_tests::slurm::{job_field, job_fields, poll, release, unix_now};
use vmwrap_tests::{run_command, RunOutput, TempDir};

const USER: &str = "vmwrap-user";
const CHECKPOINT_ROOT: &str = "/var/lib/vmwrap/checkpoints";
const JOB_TIMEOUT: Duration = Duration::from_secs(180);

fn require_cluster() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    assert_eq!(unsafe { libc::geteuid() }, 0, "must run as root");
    let up = Command::new("sinfo")
        .args(["-h", "-o", "%N"])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
    assert!(
        up,
        "no Slurm cluster answers: run `contrib/vmwrap-cluster up` first"
    );
}

fn run(program: &str, args: &[&str], cwd: &Path) -> RunOutput {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(cwd);
    run_command(cmd, b"", JOB_TIMEOUT)
}

fn run_as_user(args: &[&str], cwd: &Path) -> RunOutput {
    let mut full = vec!["-u", USER, "--"];
    full.extend_from_slice(args);
    run("runuser", &full, cwd)
}

fn user_dir(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    let meta = fs::metadata(format!("/home/{USER}")).expect("the test user's home");
    std::os::unix::fs::chown(dir.path(), Some(meta.uid()), Some(meta.gid())).unwrap();
    dir
}

/// Cancels the test's jobs, resumes the nodes it drained and restarts the
/// slurmd it killed, whatever way the test ends.
#[derive(Default)]
struct Cleanup {
    jobs: Vec<String>,
    drained: Vec<String>,
    killed_slurmd: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for job in &self.jobs {
            let _ = Command::new("scancel").arg(job).status();
        }
        for node in &self.killed_slurmd {
            let _ = Command::new("slurmd").args(["-N", node]).status();
        }
        for node in self.drained.iter().chain(&self.killed_slurmd) {
            let _ = Command::new("scontrol")
                .args(["update", &format!("nodename={node}"), "state=resume"])
                .status();
        }
    }
}

fn wait_running(job: &str) -> String {
    poll(
        &format!("job {job} to run"),
        JOB_TIMEOUT,
        || {
            let f = job_fields(job)?;
            (f.get("JobState")? == "RUNNING").then(|| f.get("NodeList").cloned())?
        },
        || format!("state {}", job_field(job, "JobState")),
    )
}

fn wait_for_job(job: &str, timeout: Duration) -> String {
    const FINAL: &[&str] = &[
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
    ];
    poll(
        &format!("job {job} to end"),
        timeout,
        || {
            let state = job_field(job, "JobState");
            FINAL.contains(&state.as_str()).then_some(state)
        },
        || format!("state {}", job_field(job, "JobState")),
    )
}

fn wait_pending(job: &str) {
    poll(
        &format!("job {job} to be requeued (PENDING)"),
        JOB_TIMEOUT,
        || (job_field(job, "JobState") == "PENDING").then_some(()),
        || format!("state {}", job_field(job, "JobState")),
    );
}

fn wait_for_text(file: &Path, needle: &str) {
    poll(
        &format!("{needle:?} in {}", file.display()),
        JOB_TIMEOUT,
        || {
            fs::read_to_string(file)
                .ok()
                .filter(|t| t.contains(needle))
                .map(drop)
        },
        || fs::read_to_string(file).unwrap_or_default(),
    );
}

fn submit(cleanup: &mut Cleanup, dir: &Path, args: &[&str], script: &Path) -> String {
    let mut full = vec!["sbatch", "--parsable", "--requeue"];
    full.extend_from_slice(args);
    full.push(script.to_str().unwrap());
    let out = run_as_user(&full, dir);
    assert_eq!(out.code, 0, "{out:?}");
    let job = out.stdout_str().trim().to_string();
    assert!(job.chars().all(|c| c.is_ascii_digit()), "{out:?}");
    cleanup.jobs.push(job.clone());
    job
}

fn write_script(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    let meta = fs::metadata(dir).unwrap();
    std::os::unix::fs::chown(&path, Some(meta.uid()), Some(meta.gid())).unwrap();
    path
}

/// Five stages: shell arithmetic in a variable that lives across stages,
/// and in stages 3 and 4 a Python program holding its running sum in
/// memory, ticking slowly enough for a requeue to land in the middle. Stage
/// 3 runs in the script itself; stage 4 runs a short step that appends a
/// line, then its Python program as an `srun` step when the script runs in a
/// Slurm job (natively, the same commands without srun). Each stage appends
/// to result.txt; stdout shows each stage start and end.
const STAGES_SCRIPT: &str = r#"#!/bin/bash
step() { if [ -n "$SLURM_JOB_ID" ]; then srun -n1 "$@"; else "$@"; fi; }
ticking() {
    python3 -u -c '
import sys, time
stage = int(sys.argv[1])
total = 0
for i in range(30):
    total += i * i * stage
    print("stage", stage, "tick", i)
    time.sleep(0.25)
with open("result.txt", "a") as f:
    f.write("stage %d python total=%d\n" % (stage, total))
' "$1"
}
counter=0
for stage in 1 2 3 4 5; do
    echo "stage $stage start counter=$counter"
    if [ "$stage" = 3 ]; then
        ticking 3
    elif [ "$stage" = 4 ]; then
        step sh -c 'echo "stage 4 short step" >> result.txt'
        step bash -c "$(declare -f ticking); ticking 4"
    else
        for i in $(seq 1 20); do counter=$((counter + i * stage)); done
        echo "stage $stage counter=$counter" >> result.txt
    fi
    echo "stage $stage end counter=$counter"
done
echo "done counter=$counter"
"#;

/// Drains `from` and requeues `job`, which then runs again on another node
/// (`while_pending` runs before it is released). Returns that node.
fn requeue_to_another_node(
    cleanup: &mut Cleanup,
    job: &str,
    from: &str,
    while_pending: impl FnOnce(),
) -> String {
    cleanup.drained.push(from.to_string());
    let out = run(
        "scontrol",
        &[
            "update",
            &format!("nodename={from}"),
            "state=drain",
            "reason=vmwrap-test",
        ],
        Path::new("/"),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let out = run("scontrol", &["requeue", job], Path::new("/"));
    assert_eq!(out.code, 0, "{out:?}");
    let requeued_at = unix_now();
    wait_pending(job);
    while_pending();
    release(job, requeued_at);
    let node = wait_running(job);
    assert_ne!(node, from);
    node
}

/// The issue's headline cases, in one job requeued twice: a batch script
/// requeued during stage three resumes on the other node inside the Python
/// program of the script; requeued again while its `srun` step of stage four
/// runs, the step's task resumes from its checkpoint (the srun is started
/// again by vmctl and its new step restores the old one's task) on the first
/// node, and the script continues after the step. Nothing runs twice: not
/// stages one to three, not the short step that had finished, not the
/// step's first ticks. The job's stdout and result file are exactly those of
/// a run that was never interrupted (the same script run natively).
#[test]
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
fn requeued_batch_script_continues_where_it_was() {
    require_cluster();
    let mut cleanup = Cleanup::default();
    let native_dir = user_dir("batch-native");
    let script = write_script(native_dir.path(), "job.sh", STAGES_SCRIPT);
    let native = run_as_user(&["bash", script.to_str().unwrap()], native_dir.path());
    assert_eq!(native.code, 0, "{native:?}");
    let native_result = fs::read_to_string(native_dir.join("result.txt")).unwrap();

    let dir = user_dir("batch-requeue");
    let script = write_script(dir.path(), "job.sh", STAGES_SCRIPT);
    let (output, errors) = (dir.join("job.out"), dir.join("job.err"));
    let job = submit(
        &mut cleanup,
        dir.path(),
        &[
            "--vm-wrap",
            "-o",
            output.to_str().unwrap(),
            "-e",
            errors.to_str().unwrap(),
        ],
        &script,
    );
    let first_node = wait_running(&job);
    wait_for_text(&output, "stage 3 tick 5\n");
    // The script was edited on disk after the checkpoint: the restored job
    // runs the state it had (Slurm keeps its own copy, the plugin runs a
    // copy in the checkpoint directory, and bash has it in memory).
    let second_node = requeue_to_another_node(&mut cleanup, &job, &first_node, || {
        fs::write(&script, "#!/bin/bash\necho EDITED\n").unwrap()
    });

    // Stage 4's Python runs as step 1 of this run (step 0 was the short
    // one); the requeue lands while it ticks.
    wait_for_text(&output, "stage 4 tick 5\n");
    let out = run(
        "scontrol",
        &["update", &format!("nodename={first_node}"), "state=resume"],
        Path::new("/"),
    );
    assert_eq!(out.code, 0, "{out:?}");
    cleanup.drained.retain(|n| n != &first_node);
    let third_node = requeue_to_another_node(&mut cleanup, &job, &second_node, || {});
    assert_eq!(third_node, first_node);

    let state = wait_for_job(&job, JOB_TIMEOUT);
    let text = fs::read_to_string(&output).unwrap_or_default();
    let err_text = fs::read_to_string(&errors).unwrap_or_default();
    assert_eq!(state, "COMPLETED", "stdout:\n{text}\nstderr:\n{err_text}");
    assert_eq!(job_field(&job, "Restarts"), "2");
    assert_eq!(
        text,
        native.stdout_str(),
        "the requeued job's stdout differs from an uninterrupted run; stderr:\n{err_text}"
    );
    assert_eq!(
        fs::read_to_string(dir.join("result.txt")).unwrap(),
        native_result,
        "stderr:\n{err_text}"
    );
    for restart in [1, 2] {
        assert!(
            err_text.contains(&format!(
                "vmwrap: job {job} batch script: restart {restart}: resuming from its checkpoint"
            )),
            "{err_text}"
        );
    }
    // The step resumed is step 1 of the second run, now step 0 of the third.
    assert!(
        err_text.contains(&format!(
            "vmwrap: job {job}: the srun of step 1 was running when the job stopped; it runs again as step 0"
        )) && err_text.contains(&format!(
            "vmwrap: job {job} step 0 task 0: resuming task 0 of step 1 from its checkpoint"
        )),
        "{err_text}"
    );
    // srun's sockets are gone by design: no warning about them.
    let lost: Vec<&str> = err_text
        .lines()
        .filter(|l| l.contains("which a checkpoint cannot carry"))
        .collect();
    eprintln!("descriptors lost at the restores: {lost:?}");
    assert!(!lost.iter().any(|l| l.contains("(srun,")), "{err_text}");
    // The job's own checkpoint directory keeps the script it ran.
    let batch_dir = Path::new(CHECKPOINT_ROOT)
        .join(USER)
        .join(&job)
        .join("batch");
    assert_eq!(
        fs::read_to_string(batch_dir.join("script")).unwrap(),
        STAGES_SCRIPT
    );
}

/// A job that counts to `ticks`, one number a line, sleeping `tick` between
/// numbers, keeping the running sum in a shell variable.
fn counting_script(ticks: u32, tick: &str) -> String {
    format!(
        "#!/bin/bash\ni=0; s=0\nwhile [ $i -lt {ticks} ]; do s=$((s + i)); i=$((i + 1)); echo \"$i\"; sleep {tick}; done\necho \"sum=$s\"\n"
    )
}

/// Checks a counting job's stdout: every number from 1 to `ticks` and the
/// right sum at the end; with `repeats_allowed` false, each exactly once and
/// in order. Returns the numbers printed.
fn check_count(text: &str, ticks: u32, repeats_allowed: bool) -> Vec<u32> {
    let numbers: Vec<u32> = text.lines().filter_map(|l| l.parse().ok()).collect();
    let sum = u64::from(ticks) * u64::from(ticks - 1) / 2;
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("sum="))
            .collect::<Vec<_>>(),
        [format!("sum={sum}")],
        "wrong or missing sum:\n{text}"
    );
    if repeats_allowed {
        let mut seen = numbers.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, (1..=ticks).collect::<Vec<_>>(), "{text}");
    } else {
        assert_eq!(numbers, (1..=ticks).collect::<Vec<_>>(), "{text}");
    }
    numbers
}

/// `--time=1` and about two and a half minutes of work: the job checkpoints
/// and requeues itself shortly before each time limit and the next run
/// continues it, until it finishes with the right result. Every continuation
/// is one line in the job's stderr. The longest test here (about 4 minutes).
#[test]
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
fn time_limit_continues_in_the_next_allocation() {
    require_cluster();
    let mut cleanup = Cleanup::default();
    let dir = user_dir("batch-timelimit");
    const TICKS: u32 = 150;
    let script = write_script(dir.path(), "job.sh", &counting_script(TICKS, "1"));
    let (output, errors) = (dir.join("job.out"), dir.join("job.err"));
    let job = submit(
        &mut cleanup,
        dir.path(),
        &[
            "--vm-wrap=timelimit=continue",
            "--time=1",
            "-o",
            output.to_str().unwrap(),
            "-e",
            errors.to_str().unwrap(),
        ],
        &script,
    );
    let state = wait_for_job(&job, Duration::from_secs(480));
    let text = fs::read_to_string(&output).unwrap_or_default();
    let err_text = fs::read_to_string(&errors).unwrap_or_default();
    assert_eq!(state, "COMPLETED", "stdout:\n{text}\nstderr:\n{err_text}");
    check_count(&text, TICKS, false);
    let continuations: Vec<&str> = err_text
        .lines()
        .filter(|l| l.contains("continuation ") && l.contains("time limit in"))
        .collect();
    let restarts: usize = job_field(&job, "Restarts").parse().unwrap();
    assert!(
        restarts >= 2 && continuations.len() == restarts,
        "expected one continuation line per restart ({restarts}):\n{err_text}"
    );
    for (n, line) in continuations.iter().enumerate() {
        assert!(
            line.contains(&format!("continuation {} of at most", n + 1)),
            "{err_text}"
        );
    }
}

/// Every process whose parent chain leads to one of `roots`, roots included.
fn descendants(roots: &[u32]) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The field after the parenthesised command name is the state, then ppid.
        let Some(after) = stat.rsplit_once(')').map(|(_, a)| a) else {
            continue;
        };
        if let Some(ppid) = after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            parent_of.push((pid, ppid));
        }
    }
    let mut found: Vec<u32> = roots.to_vec();
    loop {
        let more: Vec<u32> = parent_of
            .iter()
            .filter(|(pid, ppid)| found.contains(ppid) && !found.contains(pid))
            .map(|(pid, _)| *pid)
            .collect();
        if more.is_empty() {
            return found;
        }
        found.extend(more);
    }
}

/// The slurmstepd processes of `job` (`slurmstepd: [JOB.batch]` and steps).
fn step_daemons(job: &str) -> Vec<u32> {
    let prefix = format!("slurmstepd: [{job}.");
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_string_lossy().parse().ok()?;
            let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .starts_with(&prefix)
                .then_some(pid)
        })
        .collect()
}

/// With `interval=`, a job whose node dies (its slurmd, slurmstepd and vmctl
/// SIGKILLed: no chance to checkpoint) is requeued by Slurm once the node is
/// declared DOWN and resumes on the other node from its newest complete
/// generation, finishing with the right result. Output written after that
/// generation is written again by the resumed job (documented).
#[test]
#[ignore = "needs the local Slurm cluster: contrib/vmwrap-cluster up, then -- --ignored"]
fn node_failure_resumes_from_the_newest_generation() {
    require_cluster();
    let mut cleanup = Cleanup::default();
    let dir = user_dir("batch-nodefail");
    const TICKS: u32 = 80;
    // The script also appends each number to a file of its own.
    let script = write_script(
        dir.path(),
        "job.sh",
        &counting_script(TICKS, "0.5")
            .replace("echo \"$i\";", "echo \"$i\"; echo \"$i\" >> counts.txt;"),
    );
    let (output, errors) = (dir.join("job.out"), dir.join("job.err"));
    let job = submit(
        &mut cleanup,
        dir.path(),
        &[
            "--vm-wrap=interval=10,keep=2",
            "-o",
            output.to_str().unwrap(),
            "-e",
            errors.to_str().unwrap(),
        ],
        &script,
    );
    let node = wait_running(&job);
    let batch_dir = Path::new(CHECKPOINT_ROOT)
        .join(USER)
        .join(&job)
        .join("batch");
    poll(
        "a periodic checkpoint",
        JOB_TIMEOUT,
        || batch_dir.join("latest").exists().then_some(()),
        || fs::read_to_string(&output).unwrap_or_default(),
    );
    wait_for_text(&output, "\n30\n");

    // The node dies: slurmd first, so nothing reports the job's end.
    let slurmd = fs::read_to_string(format!("/var/run/slurmd-{node}.pid")).unwrap();
    let slurmd: u32 = slurmd.trim().parse().unwrap();
    cleanup.killed_slurmd.push(node.clone());
    let victims = descendants(&step_daemons(&job));
    assert!(victims.len() >= 2, "no slurmstepd/vmctl found for {job}");
    for pid in std::iter::once(slurmd).chain(victims) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let printed_before = fs::read_to_string(&output).unwrap_or_default();
    let last_before: u32 = printed_before
        .lines()
        .rev()
        .find_map(|l| l.parse().ok())
        .unwrap();

    // Slurm notices (SlurmdTimeout), requeues and restarts it elsewhere.
    let second_node = poll(
        &format!("job {job} to run again on another node"),
        Duration::from_secs(240),
        || {
            let f = job_fields(&job)?;
            (f.get("JobState")? == "RUNNING" && f.get("NodeList")? != &node)
                .then(|| f.get("NodeList").cloned())?
        },
        || format!("state {}", job_field(&job, "JobState")),
    );
    assert_ne!(second_node, node);
    let state = wait_for_job(&job, JOB_TIMEOUT);
    let text = fs::read_to_string(&output).unwrap_or_default();
    let err_text = fs::read_to_string(&errors).unwrap_or_default();
    assert_eq!(state, "COMPLETED", "stdout:\n{text}\nstderr:\n{err_text}");
    assert!(
        err_text.contains("resuming from its checkpoint (gen-"),
        "{err_text}"
    );
    // The job ran on past its newest generation before the node died, and that
    // work is done again after the restore; the restore first cut the output
    // and the job's own file back to the generation (docs/ARCHITECTURE.md, "The
    // job's files"), so both read as an uninterrupted run: each number once,
    // in order.
    assert!(last_before >= 30, "{printed_before}");
    check_count(&text, TICKS, false);
    let counts = fs::read_to_string(dir.join("counts.txt")).unwrap_or_default();
    let expected: String = (1..=TICKS).map(|i| format!("{i}\n")).collect();
    assert!(
        counts == expected,
        "counts.txt differs from an uninterrupted run's:\n{counts}\n--- stdout ---\n{text}"
    );

    // Bring the node back for the other tests.
    let out = run("slurmd", &["-N", &node], Path::new("/"));
    assert_eq!(out.code, 0, "{out:?}");
    cleanup.killed_slurmd.clear();
    let _ = run(
        "scontrol",
        &["update", &format!("nodename={node}"), "state=resume"],
        Path::new("/"),
    );
    poll(
        &format!("{node} to be idle again"),
        JOB_TIMEOUT,
        || {
            let out = run("sinfo", &["-h", "-n", &node, "-o", "%T"], Path::new("/"));
            (out.stdout_str().trim() == "idle").then_some(())
        },
        || run("sinfo", &["-N"], Path::new("/")).stdout_str(),
    );
}
