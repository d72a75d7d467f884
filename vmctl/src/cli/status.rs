//! `vmctl status`: per wrapped Slurm job, its newest checkpoint generation, its size
//! and age, and what a drain (a requeue) would write, so an operator knows what a
//! drain costs before starting it.
//!
//! Trust: the job list comes from Slurm (squeue's job id, uid, gid, user and node,
//! which users cannot set). Everything under the checkpoint root belongs to the job's
//! user, so root never reads it: for each job, vmctl runs itself (`--job-dir`, hidden)
//! as the job's uid and gid, with no supplementary groups and an empty environment,
//! and that child reads the job's directory with exactly the user's rights. Its
//! answer is bounded in size and time and parsed into fixed fields (numbers, and
//! names from a fixed pattern); the figures come from files the user can write, so
//! they are estimates for planning, never used to decide anything.

use super::EXIT_VMCTL_FAILED;
use crate::checkpoint::format::{KIND_FULL, KIND_INCREMENTAL};
use crate::checkpoint::read;
use clap::Args;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Largest answer accepted from the child that reads one job's directory.
const MAX_CHILD_OUTPUT: u64 = 1 << 20;
/// Most checkpoint directories reported for one job.
const MAX_DIRS: usize = 4096;
/// How long reading one job's directory may take (a directory on a hung shared
/// file system, or a FIFO planted where a manifest should be).
const CHILD_TIMEOUT: Duration = Duration::from_secs(20);
const SLURM_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Jobs to show, in any state (default: every running wrapped job)
    #[arg(value_name = "JOBID")]
    pub jobs: Vec<u64>,

    /// Only the running wrapped jobs on NODE (those `vmwrap-drain NODE` would requeue)
    #[arg(long, value_name = "NODE", conflicts_with = "jobs")]
    pub node: Option<String>,

    /// Print one JSON object instead of a table
    #[arg(long)]
    pub json: bool,

    /// Print only the ids of the jobs shown, one per line, without reading their
    /// checkpoints (contrib/vmwrap-drain uses this to choose the jobs it requeues)
    #[arg(long, conflicts_with = "json")]
    pub ids: bool,

    /// The plugin's checkpoint root (default: checkpoint_root= from plugstack.conf,
    /// else /var/lib/vmwrap/checkpoints)
    #[arg(long, value_name = "DIR")]
    pub checkpoint_root: Option<PathBuf>,

    /// The plugstack.conf to read checkpoint_root= from
    #[arg(long, value_name = "FILE", default_value = super::check::DEFAULT_PLUGSTACK)]
    pub plugstack: PathBuf,

    /// Internal: summarise the checkpoint directories of one job directory (run as
    /// the job's user by vmctl status itself)
    #[arg(long, value_name = "DIR", hide = true)]
    pub job_dir: Option<PathBuf>,
}

/// The newest generation of one checkpoint directory of a job (its batch script,
/// a step, or one task of a step), as the child reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct DirSummary {
    /// `batch`, a step id, or `STEP/taskN`.
    name: String,
    /// The newest usable generation, None if the directory has none yet.
    generation: Option<u64>,
    /// `full` or `incremental`.
    kind: Option<String>,
    /// Bytes of memory data in that generation alone.
    bytes: Option<u64>,
    /// Bytes of memory data in it and the generations it builds on: the memory the
    /// job had in use then, which a full checkpoint would write again.
    chain_bytes: Option<u64>,
    created_unix: Option<i64>,
    /// Generations present but unusable (damaged, or whose chain is broken).
    unusable: u32,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChildAnswer {
    dirs: Vec<DirSummary>,
}

/// One job as Slurm reports it.
#[derive(Debug, Clone)]
struct SlurmJob {
    id: u64,
    uid: u32,
    gid: u32,
    user: String,
    state: String,
    nodes: String,
    wrapped: bool,
}

pub fn status(args: StatusArgs) -> i32 {
    if let Some(dir) = &args.job_dir {
        return summarise_job_dir(dir);
    }
    let root = args
        .checkpoint_root
        .clone()
        .unwrap_or_else(|| super::check::configured_checkpoint_root(&args.plugstack));
    let jobs = match slurm_jobs(&args) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("vmctl status: {e}");
            return EXIT_VMCTL_FAILED;
        }
    };
    if args.ids {
        for job in jobs.iter().filter(|j| j.wrapped) {
            println!("{}", job.id);
        }
        return 0;
    }
    let now = unix_now();
    let mut failed = false;
    let mut rows = Vec::new();
    for job in &jobs {
        let result = if job.wrapped {
            read_as_owner(&root, job)
        } else {
            Ok(Vec::new())
        };
        if let Err(e) = &result {
            eprintln!("vmctl status: job {}: {e}", job.id);
            failed = true;
        }
        rows.push((job, result));
    }
    if args.json {
        print_json(&rows, now);
    } else {
        print_table(&rows, now, args.node.as_deref());
    }
    i32::from(failed)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The jobs to show: the given ones (any state), else the running ones (on NODE).
fn slurm_jobs(args: &StatusArgs) -> Result<Vec<SlurmJob>, String> {
    // Fields users cannot choose: job id, uid, gid, user name, state, node list.
    let mut squeue = vec![
        "--noheader".to_string(),
        "--format=%A|%U|%G|%u|%T|%N".to_string(),
    ];
    if args.jobs.is_empty() {
        squeue.push("--states=RUNNING".into());
        if let Some(node) = &args.node {
            squeue.push(format!("--nodelist={node}"));
        }
    } else {
        let ids: Vec<String> = args.jobs.iter().map(u64::to_string).collect();
        squeue.push(format!("--jobs={}", ids.join(",")));
        squeue.push("--states=all".into());
    }
    let argv: Vec<&str> = squeue.iter().map(String::as_str).collect();
    let out = super::check::run_with_timeout("squeue", &argv, SLURM_TIMEOUT)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let marks = wrap_marks()?;
    let mut jobs = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let mut job =
            parse_squeue_line(line).ok_or_else(|| format!("cannot read squeue's line {line:?}"))?;
        // Elements of a job array share %A; show each job once.
        if jobs.iter().any(|j: &SlurmJob| j.id == job.id) {
            continue;
        }
        job.wrapped = marks
            .get(&job.id)
            .is_some_and(|comment| is_wrap_mark(comment, job.uid));
        // A user sees their own jobs; only root reads other users' directories.
        // --ids reads none (it is Slurm's word alone), so a Slurm operator
        // running vmwrap-drain gets every wrapped job on the node.
        if args.jobs.is_empty() && !args.ids && euid != 0 && euid != job.uid {
            continue;
        }
        if job.wrapped || !args.jobs.is_empty() {
            jobs.push(job);
        }
    }
    let missing: Vec<String> = args
        .jobs
        .iter()
        .filter(|id| !jobs.iter().any(|j| j.id == **id))
        .map(u64::to_string)
        .collect();
    if !missing.is_empty() {
        return Err(format!("Slurm does not know job {}", missing.join(", ")));
    }
    jobs.sort_by_key(|j| j.id);
    Ok(jobs)
}

fn parse_squeue_line(line: &str) -> Option<SlurmJob> {
    let fields: Vec<&str> = line.trim().split('|').collect();
    let [id, uid, gid, user, state, nodes] = fields[..] else {
        return None;
    };
    Some(SlurmJob {
        id: id.parse().ok()?,
        uid: uid.parse().ok()?,
        gid: gid.parse().ok()?,
        user: user.to_string(),
        state: state.to_string(),
        nodes: nodes.to_string(),
        wrapped: false,
    })
}

/// Every job's AdminComment, by job id, from `squeue --json`. The one-line
/// `scontrol show job` cannot be read safely: the user's own fields (job name,
/// working directory, comment) may hold spaces and spell `AdminComment=...`, and
/// the real field is left out when it is empty.
fn wrap_marks() -> Result<std::collections::HashMap<u64, String>, String> {
    let out = super::check::run_with_timeout("squeue", &["--json"], SLURM_TIMEOUT)?;
    admin_comments(&out).ok_or_else(|| {
        "cannot read `squeue --json` (Slurm 21.08 or later is needed to tell wrapped jobs)"
            .to_string()
    })
}

fn admin_comments(json: &str) -> Option<std::collections::HashMap<u64, String>> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v.get("jobs")?
        .as_array()?
        .iter()
        .map(|j| {
            let id = j.get("job_id")?.as_u64()?;
            let comment = j
                .get("admin_comment")
                .and_then(|c| c.as_str())
                .unwrap_or("");
            Some((id, comment.to_string()))
        })
        .collect()
}

/// Whether a job's AdminComment is the plugin's mark for its owner `uid`, as
/// contrib/vmwrap-drain decides it (through `vmctl status --ids`).
fn is_wrap_mark(admin_comment: &str, uid: u32) -> bool {
    admin_comment == format!("vmwrap-uid={uid}")
}

/// A user name usable as one path component.
fn plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

/// Runs the child that reads ROOT/USER/JOB as the job's owner, and checks its answer.
fn read_as_owner(root: &Path, job: &SlurmJob) -> Result<Vec<DirSummary>, String> {
    if !plain_name(&job.user) {
        return Err(format!("user name {:?} is not a path component", job.user));
    }
    let dir = root.join(&job.user).join(job.id.to_string());
    let exe = std::env::current_exe().map_err(|e| format!("cannot find vmctl itself: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("status")
        .arg("--job-dir")
        .arg(&dir)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        // std drops the supplementary groups (setgroups(0)) when root sets a uid.
        cmd.uid(job.uid).gid(job.gid);
    } else if euid != job.uid {
        return Err(format!(
            "belongs to uid {}; run vmctl status as root to see other users' jobs",
            job.uid
        ));
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run vmctl as uid {}: {e}", job.uid))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    // Read both while the child runs (a full pipe would stop it), at most the bound.
    let out_reader = std::thread::spawn(move || read_bounded(stdout, MAX_CHILD_OUTPUT));
    let err_reader = std::thread::spawn(move || read_bounded(stderr, 4096));
    let deadline = Instant::now() + CHILD_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let (out, out_complete) = out_reader.join().unwrap_or_default();
    let (err, _) = err_reader.join().unwrap_or_default();
    let Some(status) = status else {
        return Err(format!(
            "reading {} took over {}s; gave up",
            dir.display(),
            CHILD_TIMEOUT.as_secs()
        ));
    };
    if !status.success() {
        return Err(format!(
            "reading {} as uid {} failed ({status}): {}",
            dir.display(),
            job.uid,
            printable_line(&err)
        ));
    }
    if !out_complete {
        return Err(format!(
            "the summary of {} is larger than {MAX_CHILD_OUTPUT} bytes",
            dir.display()
        ));
    }
    parse_child_answer(&out).map_err(|e| format!("unreadable summary of {}: {e}", dir.display()))
}

/// Up to `limit` bytes from `r`, and whether that was all of it.
fn read_bounded(r: impl Read, limit: u64) -> (Vec<u8>, bool) {
    let mut buf = Vec::new();
    let mut r = r.take(limit + 1);
    let _ = r.read_to_end(&mut buf);
    let complete = buf.len() as u64 <= limit;
    buf.truncate(limit as usize);
    // Let a child that writes more finish (or be killed) without blocking on us.
    let mut rest = r.into_inner();
    let _ = std::io::copy(&mut rest, &mut std::io::sink());
    (buf, complete)
}

/// The last non-empty line of `bytes`, with anything unprintable replaced.
fn printable_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    line.chars()
        .take(300)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Checks what the child (a process of the job's user) answered.
fn parse_child_answer(bytes: &[u8]) -> Result<Vec<DirSummary>, String> {
    let answer: ChildAnswer = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if answer.dirs.len() > MAX_DIRS {
        return Err(format!("more than {MAX_DIRS} checkpoint directories"));
    }
    for d in &answer.dirs {
        if !valid_dir_name(&d.name) {
            return Err(format!("bad directory name {:?}", d.name));
        }
        if let Some(kind) = &d.kind {
            if kind != KIND_FULL && kind != KIND_INCREMENTAL {
                return Err(format!("bad kind {kind:?}"));
            }
        }
    }
    Ok(answer.dirs)
}

/// `batch`, a step id, or `STEP/taskN`: the directories the plugin makes.
fn valid_dir_name(name: &str) -> bool {
    let numeric = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    match name.split_once('/') {
        None => name == "batch" || numeric(name),
        Some((step, task)) => numeric(step) && task.strip_prefix("task").is_some_and(numeric),
    }
}

// ---------------------------------------------------------------------------
// The child: runs as the job's user.

fn summarise_job_dir(job_dir: &Path) -> i32 {
    match job_dir_summaries(job_dir) {
        Ok(dirs) => {
            println!("{}", serde_json::json!({ "dirs": dirs }));
            0
        }
        Err(e) => {
            eprintln!("vmctl status: {e}");
            EXIT_VMCTL_FAILED
        }
    }
}

/// The checkpoint directories of one job: `batch`, each step, each `task<N>` of a
/// step with several tasks. `kept-*` directories (an earlier run's checkpoints set
/// aside) are not what a drain would write or restore, so they are left out, as are
/// directories of steps that finished (`finished` and no generation).
fn job_dir_summaries(job_dir: &Path) -> Result<Vec<DirSummary>, String> {
    let entries = match std::fs::read_dir(job_dir) {
        Ok(e) => e,
        // A wrapped job that has not started a wrapped step yet.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", job_dir.display())),
    };
    let mut out = Vec::new();
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| valid_dir_name(n))
        .collect();
    names.sort_by_key(|n| (n != "batch", n.parse::<u64>().unwrap_or(0)));
    for name in names {
        let dir = job_dir.join(&name);
        let mut tasks: Vec<String> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| valid_dir_name(&format!("0/{n}")))
                    .collect()
            })
            .unwrap_or_default();
        tasks.sort_by_key(|t| t[4..].parse::<u64>().unwrap_or(0));
        if tasks.is_empty() {
            out.extend(summarise_dir(&dir, name));
        } else {
            for task in tasks {
                out.extend(summarise_dir(&dir.join(&task), format!("{name}/{task}")));
            }
        }
        if out.len() > MAX_DIRS {
            return Err(format!(
                "{}: more than {MAX_DIRS} checkpoint directories",
                job_dir.display()
            ));
        }
    }
    Ok(out)
}

/// The newest usable generation of one checkpoint directory; None for a directory
/// whose program finished (nothing left to drain).
fn summarise_dir(dir: &Path, name: String) -> Option<DirSummary> {
    let gens = read::list_generations(dir).unwrap_or_default();
    if gens.is_empty() && dir.join("finished").exists() {
        return None;
    }
    let mut summary = DirSummary {
        name,
        generation: None,
        kind: None,
        bytes: None,
        chain_bytes: None,
        created_unix: None,
        unusable: 0,
    };
    // Newest first, as a restore would try them.
    for g in gens {
        match read::load_chain(dir, g) {
            Ok(links) => {
                let newest = &links.last().expect("a chain holds its generation").manifest;
                summary.generation = Some(g);
                summary.kind = Some(newest.kind.clone());
                summary.bytes = Some(newest.memory.data_bytes);
                summary.chain_bytes =
                    Some(links.iter().map(|l| l.manifest.memory.data_bytes).sum());
                summary.created_unix = Some(newest.created_unix);
                break;
            }
            Err(_) => summary.unusable += 1,
        }
    }
    Some(summary)
}

// ---------------------------------------------------------------------------
// Output.

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn age(now: i64, created: i64) -> String {
    let s = (now - created).max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

/// What a drain would write for one checkpoint directory: the requeue's checkpoint
/// holds at most the memory the job has in use, which the newest generation's chain
/// measured (an incremental one writes only what changed since).
fn drain_bytes(d: &DirSummary) -> Option<u64> {
    d.chain_bytes
}

type Row<'a> = (&'a SlurmJob, Result<Vec<DirSummary>, String>);

fn print_table(rows: &[Row], now: i64, node: Option<&str>) {
    if rows.is_empty() {
        match node {
            Some(n) => println!("no running wrapped jobs on {n}"),
            None => println!("no running wrapped jobs"),
        }
        return;
    }
    println!(
        "{:<8} {:<12} {:<10} {:<10} {:<12} {:>6} {:<12} {:>12} {:>7} {:>14}",
        "JOB", "USER", "STATE", "NODE", "CHECKPOINT", "GEN", "KIND", "SIZE", "AGE", "DRAIN WRITES"
    );
    let mut total = 0u64;
    let mut unknown = 0usize;
    for (job, result) in rows {
        let nodes = if job.nodes.is_empty() {
            "-"
        } else {
            &job.nodes
        };
        let head = format!(
            "{:<8} {:<12} {:<10} {:<10}",
            job.id, job.user, job.state, nodes
        );
        let dirs = match result {
            Ok(d) => d,
            Err(_) => {
                println!("{head} (unreadable: see the error above)");
                unknown += 1;
                continue;
            }
        };
        if !job.wrapped {
            println!("{head} (not wrapped: a drain leaves it running)");
            continue;
        }
        if dirs.is_empty() {
            println!("{head} {:<12} (no checkpoint directory yet)", "-");
            unknown += 1;
            continue;
        }
        for d in dirs {
            match (d.generation, drain_bytes(d)) {
                (Some(g), Some(drain)) => {
                    total += drain;
                    println!(
                        "{head} {:<12} {:>6} {:<12} {:>12} {:>7} {:>14}",
                        d.name,
                        g,
                        d.kind.as_deref().unwrap_or("-"),
                        mib(d.bytes.unwrap_or(0)),
                        age(now, d.created_unix.unwrap_or(now)),
                        format!("<= {}", mib(drain)),
                    );
                }
                _ => {
                    unknown += 1;
                    let note = if d.unusable > 0 {
                        format!("(no usable generation; {} unusable)", d.unusable)
                    } else {
                        "(no checkpoint yet)".to_string()
                    };
                    println!("{head} {:<12} {note}", d.name);
                }
            }
        }
    }
    let mut summary = format!("a drain writes up to {} for these jobs", mib(total));
    if unknown > 0 {
        summary.push_str(&format!(
            ", plus the memory in use of {unknown} checkpoint director{} without a generation",
            if unknown == 1 { "y" } else { "ies" }
        ));
    }
    println!("{summary}");
}

fn print_json(rows: &[Row], now: i64) {
    let jobs: Vec<serde_json::Value> = rows
        .iter()
        .map(|(job, result)| {
            let mut v = serde_json::json!({
                "job": job.id,
                "user": job.user,
                "uid": job.uid,
                "state": job.state,
                "nodes": job.nodes,
                "wrapped": job.wrapped,
            });
            match result {
                Ok(dirs) => {
                    v["checkpoints"] = dirs
                        .iter()
                        .map(|d| {
                            serde_json::json!({
                                "dir": d.name,
                                "generation": d.generation,
                                "kind": d.kind,
                                "bytes": d.bytes,
                                "chain_bytes": d.chain_bytes,
                                "created_unix": d.created_unix,
                                "age_s": d.created_unix.map(|c| (now - c).max(0)),
                                "drain_bytes": drain_bytes(d),
                                "unusable": d.unusable,
                            })
                        })
                        .collect();
                }
                Err(e) => v["error"] = e.clone().into(),
            }
            v
        })
        .collect();
    println!("{}", serde_json::json!({ "now_unix": now, "jobs": jobs }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_lines() {
        let j = parse_squeue_line("42|1001|1001|alice|RUNNING|n1").unwrap();
        assert_eq!(
            (j.id, j.uid, j.gid, j.user.as_str(), j.nodes.as_str()),
            (42, 1001, 1001, "alice", "n1")
        );
        assert!(parse_squeue_line("42|x|1|a|RUNNING|n1").is_none());
        assert!(parse_squeue_line("42|1|1|a|RUNNING").is_none());
    }

    #[test]
    fn the_mark_must_name_the_owner() {
        let json = r#"{"jobs": [
            {"job_id": 5, "name": "x AdminComment=vmwrap-uid=1001", "admin_comment": ""},
            {"job_id": 6, "admin_comment": "vmwrap-uid=1001"},
            {"job_id": 7}
        ]}"#;
        let marks = admin_comments(json).unwrap();
        assert!(!is_wrap_mark(&marks[&5], 1001));
        assert!(is_wrap_mark(&marks[&6], 1001));
        assert!(!is_wrap_mark(&marks[&6], 1002));
        assert!(!is_wrap_mark(&marks[&7], 1001));
        assert!(!is_wrap_mark("vmwrap-uid=10011", 1001));
        assert!(admin_comments("JobId=5 AdminComment=vmwrap-uid=1001").is_none());
    }

    #[test]
    fn directory_names() {
        for ok in ["batch", "0", "12", "0/task0", "3/task15"] {
            assert!(valid_dir_name(ok), "{ok}");
        }
        for bad in [
            "",
            "..",
            "kept-20261130T101942Z",
            "0/task",
            "0/x",
            "batch/task0",
            "0/task1/2",
            "/0",
        ] {
            assert!(!valid_dir_name(bad), "{bad}");
        }
    }

    #[test]
    fn child_answers_are_checked() {
        let good = br#"{"dirs":[{"name":"batch","generation":3,"kind":"full","bytes":10,"chain_bytes":10,"created_unix":5,"unusable":0}]}"#;
        assert_eq!(parse_child_answer(good).unwrap()[0].generation, Some(3));
        let bad_name = br#"{"dirs":[{"name":"../x","generation":null,"kind":null,"bytes":null,"chain_bytes":null,"created_unix":null,"unusable":0}]}"#;
        assert!(parse_child_answer(bad_name).is_err());
        let bad_kind = br#"{"dirs":[{"name":"0","generation":1,"kind":"\u001b[2J","bytes":1,"chain_bytes":1,"created_unix":1,"unusable":0}]}"#;
        assert!(parse_child_answer(bad_kind).is_err());
        let extra = br#"{"dirs":[],"x":1}"#;
        assert!(parse_child_answer(extra).is_err());
    }

    #[test]
    fn bounded_reads() {
        let (buf, complete) = read_bounded(&b"abcdef"[..], 4);
        assert_eq!((buf.as_slice(), complete), (&b"abcd"[..], false));
        let (buf, complete) = read_bounded(&b"abc"[..], 4);
        assert_eq!((buf.as_slice(), complete), (&b"abc"[..], true));
    }
}
