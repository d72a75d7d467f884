//! `vmctl` checkpoint/restore end to end: jobs checkpointed through the
//! control socket, on SIGTERM and on a timer, then resumed by `vmctl restore`
//! in a fresh process, must produce exactly what an uninterrupted native run
//! produces; damaged, foreign, incompatible or stale checkpoints must be
//! refused (or skipped in favour of an older generation) with a message that
//! names the problem.
//!
//! The workloads never sleep: they block reading one byte from stdin at known
//! points (see tests/fixtures/fill.c), and the tests poll the job's output
//! before acting, so a checkpoint lands exactly where the test wants it.
//!
//! Tests needing KVM skip locally without it but fail under CI=true (see
//! `require_kvm`). Each test works in its own temp dir.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;
use vmwrap_tests::checkpoint_dir::{
    checkpoint_json, copy_generations, entries, fd_offset, flip_bit, gen_dir, gen_name,
    generation_dirs, inspect_json, kill_while_writing, manifest, native_fill, restore,
    rewrite_manifest, set_len, statuses, vmctl, vmctl_in,
};
use vmwrap_tests::{assert_bytes_eq, assert_contains, assert_file_eq, poll_until, tail_from};
use vmwrap_tests::{need_kvm, run_command, vmctl_path, Invocation, Job, Rng, STEP};
use vmwrap_tests::{RunOutput, TempDir, EXIT_CHECKPOINTED, EXIT_VMCTL_FAILED, PYTHON};

/// tests/fixtures/fill.c: `fill OUTFILE [PASSES [MIB]]`, 2 stdin bytes a pass.
const FILL: &str = env!("VMWRAP_FIXTURE_FILL");
/// tests/fixtures/readfile.c: `readfile FILE CHUNK`, 1 stdin byte a chunk.
const READFILE: &str = env!("VMWRAP_FIXTURE_READFILE");

// ---------------------------------------------------------------------------
// Helpers

/// `vmctl checkpoint DIR`: must succeed; returns the generation it reports
/// ("generation N: X MiB in S s (path)").
fn checkpoint(ckpt: &Path) -> u64 {
    let out = vmctl(&[&"checkpoint", &ckpt]);
    assert_eq!(out.code, 0, "vmctl checkpoint {}:\n{out:?}", ckpt.display());
    let text = out.stdout_str();
    let line = text.trim_end();
    let rest = line
        .strip_prefix("generation ")
        .unwrap_or_else(|| panic!("unexpected vmctl checkpoint output:\n{out:?}"));
    let (n, rest) = rest.split_once(": ").expect("generation N: ...");
    let generation: u64 = n.parse().expect("generation number");
    let path = gen_dir(ckpt, generation);
    assert!(
        rest.contains(" MiB in ") && rest.ends_with(&format!(" s ({})", path.display())),
        "unexpected vmctl checkpoint output:\n{out:?}"
    );
    assert!(
        path.is_dir(),
        "{} does not exist after {line}",
        path.display()
    );
    generation
}

/// `vmctl checkpoint DIR --json`: must succeed; returns the generation.
fn checkpoint_json_generation(ckpt: &Path) -> u64 {
    let v = checkpoint_json(ckpt);
    let generation = v["generation"].as_u64().expect("generation");
    assert_eq!(
        v["path"].as_str(),
        Some(gen_dir(ckpt, generation).to_str().unwrap()),
        "{v}"
    );
    assert!(v["memory_bytes"].as_u64().unwrap() > 0, "{v}");
    generation
}

/// The line of human `vmctl inspect` output about `generation`.
fn inspect_line(out: &RunOutput, generation: u64) -> String {
    let prefix = format!("generation {generation}");
    out.stdout_str()
        .lines()
        .find(|l| l.starts_with(&format!("{prefix}:")) || l.starts_with(&format!("{prefix} ")))
        .unwrap_or_else(|| panic!("no line about {prefix} in vmctl inspect output:\n{out:?}"))
        .to_owned()
}

/// A job of `fill OUT PASSES MIB` under `vmctl run --checkpoint-dir CKPT
/// OPTS...`, once it has filled its array.
fn fill_job(
    tmp: &TempDir,
    ckpt: &Path,
    opts: &[&str],
    out: &Path,
    passes: usize,
    mib: usize,
) -> Job {
    let mut job = Job::run(
        tmp.path(),
        ckpt,
        opts,
        FILL,
        &[&out, &passes.to_string(), &mib.to_string()],
    );
    job.wait_for("filled ");
    job
}

/// A job of `fill OUT PASSES MIB` under `vmctl run --checkpoint-dir CKPT`
/// that SIGTERM checkpoints and stops, waiting until the array is filled.
fn start_fill(tmp: &TempDir, ckpt: &Path, mem: &str, out: &Path, passes: usize, mib: usize) -> Job {
    let opts = ["--mem", mem, "--on-signal", "TERM=checkpoint-exit"];
    fill_job(tmp, ckpt, &opts, out, passes, mib)
}

/// SIGTERMs a job run with TERM=checkpoint-exit, which must exit 75.
fn term_checkpoint(job: Job) -> RunOutput {
    job.signal(libc::SIGTERM);
    let out = job.finish();
    assert_eq!(
        out.code, EXIT_CHECKPOINTED,
        "SIGTERM with --on-signal TERM=checkpoint-exit:\n{out:?}"
    );
    out
}

// ---------------------------------------------------------------------------
// Restores that must reproduce the uninterrupted run

#[test]
fn fill_checkpointed_at_known_points_restores_like_an_uninterrupted_run() {
    need_kvm!();
    const PASSES: usize = 4;
    let tmp = TempDir::new("ckpt-fill");
    let native_out = tmp.join("native.bin");
    let native = native_fill(&tmp, &native_out, PASSES, 256);
    let native_stdout = native.stdout_str();
    let out = tmp.join("vm.bin");
    let ck = tmp.join("ckpt");

    let mut job = Job::run(
        tmp.path(),
        &ck,
        &[
            "--mem",
            "1G",
            "--keep",
            "10",
            "--on-signal",
            "TERM=checkpoint-exit",
        ],
        FILL,
        &[&out, &PASSES.to_string()],
    );
    // Before the first pass (8 bytes of stdin to go).
    job.wait_for("filled ");
    let early = checkpoint(&ck);
    // Blocked in the middle of pass 1, its record in vm.bin half written
    // (7 to go).
    job.send(b"g");
    job.wait_for("pass 1 half ");
    let middle = checkpoint(&ck);
    // Somewhere in the first half of pass 2 while it computes (5 to go).
    job.send(b"g");
    job.wait_for("pass 1 checksum ");
    job.send(b"g");
    job.wait_for("pass 2 start");
    let busy = checkpoint_json_generation(&ck);
    // Stopped by SIGTERM in the middle of pass 3 (3 to go).
    job.wait_for("pass 2 half ");
    job.send(b"g");
    job.wait_for("pass 2 checksum ");
    job.send(b"g");
    job.wait_for("pass 3 half ");
    let before = term_checkpoint(job);
    assert_eq!((early, middle, busy), (1, 2, 3), "generation numbers");
    let term = 4;

    // Nobody serves the control socket any more.
    let none = vmctl(&[&"checkpoint", &ck]);
    assert_eq!(
        none.code, EXIT_VMCTL_FAILED,
        "checkpoint with no vmctl:\n{none:?}"
    );

    let (code, v) = inspect_json(&ck, true);
    assert_eq!(code, 0, "{v}");
    assert_eq!(
        statuses(&v),
        [4, 3, 2, 1].map(|g| (g, "verified".to_string())),
        "{v}"
    );
    assert_eq!(
        fs::read_link(ck.join("latest")).unwrap(),
        Path::new(&gen_name(term))
    );
    for g in [early, middle, busy, term] {
        copy_generations(&ck, &[g], &tmp.join(format!("copy-{g}")), true);
    }

    // Resume the stopped job in a fresh vmctl (vm.bin cut back to what the
    // job had written, so everything after must come from the restored job),
    // checkpoint and stop it once more, and resume that.
    set_len(&out, fd_offset(&gen_dir(&ck, term), &out));
    let mut resumed = Job::restore(tmp.path(), &ck, &["--on-signal", "TERM=checkpoint-exit"]);
    resumed.send(b"g");
    resumed.wait_for("pass 3 checksum ");
    assert_eq!(
        checkpoint(&ck),
        term + 1,
        "the restored job's next generation"
    );
    resumed.send(b"g");
    resumed.wait_for("pass 4 half ");
    let between = term_checkpoint(resumed);
    let after = restore(tmp.path(), &ck, &[], b"g");
    assert_eq!(after.code, 0, "second restore:\n{after:?}");
    let whole = [&before.stdout[..], &between.stdout[..], &after.stdout[..]].concat();
    assert_bytes_eq(
        "stdout of the run + the first restore + the second restore vs the native run",
        &native.stdout,
        &whole,
    );
    assert_file_eq("file written across two restores", &native_out, &out);
    assert_eq!(
        generation_dirs(&ck),
        Vec::<String>::new(),
        "a finished job keeps no generations"
    );
    let after = [&between.stdout[..], &after.stdout[..]].concat();

    // The same generation again, from a copy: the same result.
    let copy = tmp.join(format!("copy-{term}"));
    set_len(&out, fd_offset(&gen_dir(&copy, term), &out));
    let again = restore(tmp.path(), &copy, &["--generation", "4"], b"ggg");
    assert_eq!(
        again.code, 0,
        "second restore of generation {term}:\n{again:?}"
    );
    assert_bytes_eq(
        "second restore of the same generation",
        &after,
        &again.stdout,
    );
    assert_file_eq("file after the second restore", &native_out, &out);

    // Each earlier point resumes to the same end.
    for (g, stdin, expect) in [
        (early, 8, tail_from(&native_stdout, "pass 1 start")),
        (middle, 7, tail_from(&native_stdout, "pass 1 checksum ")),
    ] {
        let copy = tmp.join(format!("copy-{g}"));
        set_len(&out, fd_offset(&gen_dir(&copy, g), &out));
        let r = restore(
            tmp.path(),
            &copy,
            &["--generation", &g.to_string()],
            &vec![b'g'; stdin],
        );
        assert_eq!(r.code, 0, "restore of generation {g}:\n{r:?}");
        assert_bytes_eq(
            &format!("restore of generation {g} vs the rest of the native run"),
            expect.as_bytes(),
            &r.stdout,
        );
        assert_file_eq(
            &format!("file after restoring generation {g}"),
            &native_out,
            &out,
        );
    }

    // The checkpoint taken mid-computation resumes wherever it stopped.
    let copy = tmp.join(format!("copy-{busy}"));
    set_len(&out, fd_offset(&gen_dir(&copy, busy), &out));
    let r = restore(tmp.path(), &copy, &[], b"ggggg");
    assert_eq!(r.code, 0, "restore of generation {busy}:\n{r:?}");
    let rest = r.stdout_str();
    assert!(
        native_stdout.ends_with(&rest)
            && (rest.starts_with("pass 2 half ") || rest.starts_with("pass 2 checksum ")),
        "restore of a checkpoint taken during pass 2 is not the rest of the native run:\n\
         --- native ---\n{native_stdout}--- restored ---\n{rest}"
    );
    assert_file_eq(
        "file after restoring the mid-pass generation",
        &native_out,
        &out,
    );
}

const PY_SCRIPT: &str = r#"
import hashlib, os, sys

out, passes = sys.argv[1], int(sys.argv[2])
state = hashlib.sha256(b"vmwrap")
table = [(i * 2654435761) % 1000003 for i in range(300000)]
log = open(out, "a", buffering=1)
print("ready", len(table), flush=True)
for i in range(1, passes + 1):
    if len(os.read(0, 1)) != 1:
        sys.exit(f"stdin ended before pass {i}")
    table = [(x * 31 + i) % 1000003 for x in table]
    for x in table[::97]:
        state.update(x.to_bytes(4, "little"))
    value = state.hexdigest()[:16]
    log.write(f"pass {i} {value} {sum(table)}\n")
    print(f"pass {i} {value}", flush=True)
log.close()
print("final", state.hexdigest(), flush=True)
"#;

#[test]
fn python_script_checkpointed_and_restored_like_an_uninterrupted_run() {
    need_kvm!();
    assert!(
        Path::new(PYTHON).is_file(),
        "{PYTHON} is missing (apt-get install python3)"
    );
    let tmp = TempDir::new("ckpt-python");
    let script = tmp.write_file("work.py", PY_SCRIPT, 0o644);
    let native_out = tmp.join("native.txt");
    let native = Invocation::new(PYTHON)
        .args([script.as_os_str(), native_out.as_os_str(), "4".as_ref()])
        .stdin("gggg")
        .cwd(tmp.path())
        .run_native();
    assert_eq!(native.code, 0, "native python:\n{native:?}");
    let native_stdout = native.stdout_str();

    let out = tmp.join("vm.txt");
    let ck = tmp.join("ckpt");
    let mut job = Job::run(
        tmp.path(),
        &ck,
        &[
            "--mem",
            "1G",
            "--keep",
            "10",
            "--on-signal",
            "TERM=checkpoint-exit",
        ],
        PYTHON,
        &[&script, &out, &"4"],
    );
    job.wait_for("ready ");
    let first = checkpoint(&ck);
    job.send(b"g");
    job.wait_for("pass 1 ");
    checkpoint(&ck);
    job.send(b"g");
    job.wait_for("pass 2 ");
    let before = term_checkpoint(job);
    let term = 3;
    let (code, v) = inspect_json(&ck, true);
    assert_eq!(code, 0, "{v}");
    assert_eq!(statuses(&v).len(), 3, "{v}");
    for g in [first, term] {
        copy_generations(&ck, &[g], &tmp.join(format!("copy-{g}")), true);
    }

    // The log is opened for appending: cut it back to the saved offset, or a
    // second restore would append its lines after the first one's.
    set_len(&out, fd_offset(&gen_dir(&ck, term), &out));
    let after = restore(tmp.path(), &ck, &[], b"gg");
    assert_eq!(after.code, 0, "restore:\n{after:?}");
    let whole = [before.stdout.as_slice(), after.stdout.as_slice()].concat();
    assert_bytes_eq(
        "python stdout before the checkpoint + after the restore vs the native run",
        &native.stdout,
        &whole,
    );
    assert_file_eq("python's log across the restore", &native_out, &out);

    let copy = tmp.join(format!("copy-{term}"));
    set_len(&out, fd_offset(&gen_dir(&copy, term), &out));
    let again = restore(tmp.path(), &copy, &["--generation", "3"], b"gg");
    assert_eq!(again.code, 0, "second restore:\n{again:?}");
    assert_bytes_eq(
        "second restore of the same generation",
        &after.stdout,
        &again.stdout,
    );
    assert_file_eq("python's log after the second restore", &native_out, &out);

    let copy = tmp.join(format!("copy-{first}"));
    set_len(&out, fd_offset(&gen_dir(&copy, first), &out));
    let r = restore(tmp.path(), &copy, &[], b"gggg");
    assert_eq!(r.code, 0, "restore of generation {first}:\n{r:?}");
    assert_bytes_eq(
        "restore of the first generation vs the rest of the native run",
        tail_from(&native_stdout, "pass 1 ").as_bytes(),
        &r.stdout,
    );
    assert_file_eq(
        "python's log after restoring the first generation",
        &native_out,
        &out,
    );
}

/// A program whose state is its connections (srun) cannot be resumed: with
/// `--reexec PROGRAM`, a restore starts it again instead, in the same process
/// (pid and parent, so its parent's wait gets its exit status), with the same
/// arguments plus VMCTL_REEXECUTED=1, and without the threads it had. A
/// process it had forked (like srun's shepherd, which acts when its parent's
/// end of a pipe closes) is ended: only the new run's own one wakes. The
/// script around it is resumed as usual: nothing it did before runs again.
#[test]
fn reexec_program_starts_again_in_the_same_process_after_a_restore() {
    need_kvm!();
    let tmp = TempDir::new("ckpt-reexec");
    // Given by another name, as the plugin gives srun's: vmctl compares
    // canonical paths.
    let connected = tmp.join("connected");
    std::os::unix::fs::symlink(PYTHON, &connected).unwrap();
    tmp.write_file(
        "child.py",
        "import os, sys, threading, time\n\
         r, w = os.pipe()\n\
         shepherd = os.fork()\n\
         if shepherd == 0:\n\
         \x20   os.close(w)\n\
         \x20   os.read(r, 1)\n\
         \x20   print('shepherd of', os.getppid(), 'woke', flush=True)\n\
         \x20   os._exit(0)\n\
         os.close(r)\n\
         threading.Thread(target=lambda: time.sleep(1000), daemon=True).start()\n\
         print('child pid=%d ppid=%d reexec=%s args=%s' % (os.getpid(), os.getppid(),\n\
               os.environ.get('VMCTL_REEXECUTED', '0'), sys.argv[1:]), flush=True)\n\
         print('child got', sys.stdin.readline().strip(), flush=True)\n\
         os.close(w)\n\
         os.waitpid(shepherd, 0)\n\
         sys.exit(7)\n",
        0o644,
    );
    let script = tmp.write_file(
        "job.sh",
        "#!/bin/bash\necho \"script pid=$$\"\n\"$1\" child.py a b\necho \"child exited $?\"\n",
        0o755,
    );
    let ck = tmp.join("ckpt");
    let reexec = connected.to_str().unwrap();
    let opts = ["--on-signal", "TERM=checkpoint-exit", "--reexec", reexec];
    let mut job = Job::run(tmp.path(), &ck, &opts, "/bin/bash", &[&script, &connected]);
    job.wait_for("child pid=");
    let before = term_checkpoint(job).stdout_str();
    let script_pid = before
        .lines()
        .find_map(|l| l.strip_prefix("script pid="))
        .expect("the script's pid")
        .to_string();
    let child_line = before
        .lines()
        .find(|l| l.starts_with("child pid="))
        .unwrap()
        .to_string();
    assert!(
        child_line.ends_with(&format!("ppid={script_pid} reexec=0 args=['a', 'b']")),
        "{before}"
    );
    let child_pid = child_line
        .strip_prefix("child pid=")
        .and_then(|l| l.split(' ').next())
        .unwrap();

    let after = restore(tmp.path(), &ck, &opts[2..], b"hello\n");
    assert_eq!(after.code, 0, "restore:\n{after:?}");
    assert_eq!(
        after.stdout_str(),
        format!(
            "{}\nchild got hello\nshepherd of {child_pid} woke\nchild exited 7\n",
            child_line.replace("reexec=0", "reexec=1")
        ),
        "the program must start again as the same process, its old fork must not \
         wake, and the script resume: {after:?}"
    );
}

// ---------------------------------------------------------------------------
// Damaged and interrupted checkpoints

type Corruption = fn(&Path);

#[test]
fn damaged_newest_generation_is_reported_and_the_previous_one_restored() {
    need_kvm!();
    const PASSES: usize = 2;
    const MIB: usize = 16;
    let tmp = TempDir::new("ckpt-corrupt");
    let native_out = tmp.join("native.bin");
    let native = native_fill(&tmp, &native_out, PASSES, MIB);
    let expected = tail_from(&native.stdout_str(), "pass 1 start").to_owned();
    let out = tmp.join("vm.bin");
    let base = tmp.join("base");

    // Generation 1 before the first pass, generation 2 in its middle.
    let mut job = start_fill(&tmp, &base, "256M", &out, PASSES, MIB);
    assert_eq!(checkpoint(&base), 1);
    job.send(b"g");
    job.wait_for("pass 1 half ");
    term_checkpoint(job);
    assert_eq!(generation_dirs(&base), ["gen-000001", "gen-000002"]);
    let offset1 = fd_offset(&gen_dir(&base, 1), &out);

    let cases: [(&str, Corruption, &[&str]); 5] = [
        (
            "memory-bit",
            |g| {
                let img = g.join("memory.img");
                let len = fs::metadata(&img).unwrap().len();
                flip_bit(&img, len / 2 + 12345, 3);
            },
            &["memory.img", "CRC32"],
        ),
        (
            "memory-truncated",
            |g| {
                let img = g.join("memory.img");
                set_len(&img, fs::metadata(&img).unwrap().len() / 3);
            },
            &["memory.img", "truncated"],
        ),
        (
            "memory-deleted",
            |g| fs::remove_file(g.join("memory.img")).unwrap(),
            &["memory.img", "No such file"],
        ),
        (
            "manifest-bit",
            |g| {
                let m = g.join("manifest.json");
                let len = fs::metadata(&m).unwrap().len();
                flip_bit(&m, len / 2, 1);
            },
            &["manifest.json", "checksum"],
        ),
        (
            "format-99",
            |g| rewrite_manifest(g, |m| m["format_version"] = 99.into()),
            &["manifest.json", "format 99"],
        ),
    ];
    for (name, corrupt, says) in cases {
        let dir = tmp.join(name);
        copy_generations(&base, &[1, 2], &dir, false);
        let bad = gen_dir(&dir, 2);
        corrupt(&bad);
        let file = if says[0] == "memory.img" {
            bad.join("memory.img")
        } else {
            bad.join("manifest.json")
        };
        let file = file.display().to_string();

        let ins = vmctl(&[&"inspect", &dir, &"--verify"]);
        assert_eq!(
            ins.code, 0,
            "{name}: inspect --verify with generation 1 intact:\n{ins:?}"
        );
        let line = inspect_line(&ins, 2);
        assert!(line.contains("UNUSABLE"), "{name}: {line}");
        assert_contains(&format!("{name}: inspect's line"), &line, &[&file, says[1]]);
        assert!(
            inspect_line(&ins, 1).contains("verified"),
            "{name}:\n{ins:?}"
        );

        // Asking for the damaged generation itself is refused.
        let r = restore(tmp.path(), &dir, &["--generation", "2"], b"ggg");
        assert_eq!(
            r.code, EXIT_VMCTL_FAILED,
            "{name}: restore --generation 2:\n{r:?}"
        );
        assert!(
            r.stdout.is_empty(),
            "{name}: the damaged generation ran:\n{r:?}"
        );
        assert_contains(
            &format!("{name}: restore --generation 2"),
            &r.stderr_str(),
            &["generation 2 is unusable", &file, says[1]],
        );

        // Without --generation, restore skips it for generation 1.
        set_len(&out, offset1);
        let r = restore(tmp.path(), &dir, &[], b"gggg");
        assert_eq!(
            r.code, 0,
            "{name}: restore falling back to generation 1:\n{r:?}"
        );
        let stderr = r.stderr_str();
        assert_contains(
            &format!("{name}: restore"),
            &stderr,
            &[
                "generation 2 is unusable",
                &file,
                says[1],
                "restored generation 1",
            ],
        );
        assert_bytes_eq(
            &format!("{name}: restored stdout"),
            expected.as_bytes(),
            &r.stdout,
        );
        assert_file_eq(
            &format!("{name}: file after the restore"),
            &native_out,
            &out,
        );
    }
}

#[test]
fn sigkill_during_a_checkpoint_write_leaves_the_previous_generation_intact() {
    need_kvm!();
    const MIB: usize = 1024;
    let tmp = TempDir::new("ckpt-sigkill");
    let native_out = tmp.join("native.bin");
    let native = native_fill(&tmp, &native_out, 1, MIB);
    let out = tmp.join("vm.bin");
    let ck = tmp.join("ckpt");

    let job = start_fill(&tmp, &ck, "2G", &out, 1, MIB);
    assert_eq!(checkpoint(&ck), 1);
    let offset1 = fd_offset(&gen_dir(&ck, 1), &out);
    let (code, v) = inspect_json(&ck, false);
    assert_eq!(code, 0, "{v}");
    let gen1_manifest = fs::read(gen_dir(&ck, 1).join("manifest.json")).unwrap();

    // Ask for generation 2 and kill vmctl while it is being written.
    let (tmp_gen, killed, answer) = kill_while_writing(job, &ck, 2);
    assert_eq!(killed.code, 128 + libc::SIGKILL, "{killed:?}");
    assert_ne!(
        answer.code, 0,
        "the checkpoint cannot have succeeded:\n{answer:?}"
    );
    assert!(
        !ck.join("gen-000002").exists(),
        "generation 2 completed before the kill ({tmp_gen} was seen); the test did not test anything"
    );

    // Only the complete generation is listed, and it is intact.
    let (code, v) = inspect_json(&ck, true);
    assert_eq!(code, 0, "{v}");
    assert_eq!(statuses(&v), [(1, "verified".to_string())], "{v}");
    assert_eq!(
        fs::read(gen_dir(&ck, 1).join("manifest.json")).unwrap(),
        gen1_manifest
    );

    set_len(&out, offset1);
    let mut resumed = Job::restore(tmp.path(), &ck, &[]);
    // Once it serves the control socket (the dead vmctl's socket file is
    // still there, but nobody answers it), its first checkpoint clears the
    // killed writer's leftovers.
    poll_until("the restored job's control socket", STEP, || {
        std::os::unix::net::UnixStream::connect(ck.join("control.sock")).ok()
    });
    assert_eq!(checkpoint(&ck), 2);
    assert!(
        !ck.join(&tmp_gen).exists(),
        "{tmp_gen} is still there after a new checkpoint"
    );
    resumed.send(b"gg");
    let r = resumed.finish();
    assert_eq!(r.code, 0, "restore after the kill:\n{r:?}");
    assert_bytes_eq(
        "restore after SIGKILL vs the rest of the native run",
        tail_from(&native.stdout_str(), "pass 1 start").as_bytes(),
        &r.stdout,
    );
    assert_file_eq("file after the restore", &native_out, &out);
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct TmpfsMount(PathBuf);

impl TmpfsMount {
    fn new(at: &Path, size: &str) -> Result<TmpfsMount, String> {
        fs::create_dir(at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(TmpfsMount(at.to_owned()))
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn checkpoint_that_does_not_fit_fails_and_the_job_goes_on() {
    need_kvm!();
    const MIB: usize = 160;
    let tmp = TempDir::new("ckpt-nospace");
    // Declared after `tmp`, so it is unmounted before the directory goes.
    let mnt = match TmpfsMount::new(&tmp.join("mnt"), "300m") {
        Ok(m) => m,
        Err(why) if vmwrap_tests::in_ci() => panic!("{why}"),
        Err(why) => {
            eprintln!("SKIPPED: {why} (needs root; set CI=true to make this a failure)");
            return;
        }
    };
    let native_out = tmp.join("native.bin");
    let native = native_fill(&tmp, &native_out, 1, MIB);
    let out = tmp.join("vm.bin");
    let ck = mnt.0.join("ckpt");

    // One generation of ~160 MiB fits in 300 MiB; a second one does not.
    let mut job = start_fill(&tmp, &ck, "512M", &out, 1, MIB);
    assert_eq!(checkpoint(&ck), 1);
    job.send(b"g");
    job.wait_for("pass 1 half ");
    let full = vmctl(&[&"checkpoint", &ck]);
    assert_eq!(full.code, 1, "checkpoint on a full file system:\n{full:?}");
    assert_contains(
        "vmctl checkpoint on a full file system",
        &full.stderr_str(),
        &["No space left"],
    );

    // No partial generation is left, and generation 1 is still good.
    assert_eq!(generation_dirs(&ck), ["gen-000001"]);
    let leftovers: Vec<String> = entries(&ck)
        .into_iter()
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "partial generations left: {leftovers:?}"
    );
    let (code, v) = inspect_json(&ck, true);
    assert_eq!(code, 0, "{v}");
    assert_eq!(statuses(&v), [(1, "verified".to_string())], "{v}");

    // The job did not notice.
    job.send(b"g");
    let run = job.finish();
    assert_eq!(run.code, 0, "the job after a failed checkpoint:\n{run:?}");
    assert_bytes_eq(
        "stdout of the job with a failed checkpoint",
        &native.stdout,
        &run.stdout,
    );
    assert_file_eq(
        "file of the job with a failed checkpoint",
        &native_out,
        &out,
    );
    assert_eq!(
        generation_dirs(&ck),
        Vec::<String>::new(),
        "a finished job keeps no generations"
    );
}

// ---------------------------------------------------------------------------
// Checkpoints that must not be restored

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(uid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
}

#[test]
fn checkpoints_are_private_and_only_their_owner_restores_them() {
    need_kvm!();
    const NOBODY: u32 = 65534;
    let tmp = TempDir::new("ckpt-owner");
    let out = tmp.join("vm.bin");
    let ck = tmp.join("ckpt");

    let job = start_fill(&tmp, &ck, "256M", &out, 1, 16);
    assert_eq!(checkpoint(&ck), 1);
    term_checkpoint(job);

    assert_eq!(mode(&ck), 0o700, "{} (created by vmctl run)", ck.display());
    for g in [1, 2] {
        let dir = gen_dir(&ck, g);
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        let names = entries(&dir);
        assert_eq!(
            names,
            [
                "files.journal",
                "manifest.json",
                "manifest.sum",
                "memory.img"
            ]
        );
        for n in names {
            assert_eq!(mode(&dir.join(&n)), 0o600, "{}", dir.join(&n).display());
        }
    }
    let me = unsafe { libc::getuid() };
    if me == NOBODY {
        eprintln!("SKIPPED the ownership part: running as uid {NOBODY}");
        return;
    }

    // Everything owned by someone else.
    let theirs = tmp.join("theirs");
    copy_generations(&ck, &[1, 2], &theirs, false);
    for g in [1, 2] {
        let dir = gen_dir(&theirs, g);
        for n in entries(&dir) {
            chown(&dir.join(n), NOBODY);
        }
        chown(&dir, NOBODY);
    }
    chown(&theirs.join("latest"), NOBODY);
    chown(&theirs, NOBODY);
    let r = restore(tmp.path(), &theirs, &[], b"gg");
    assert_eq!(
        r.code, EXIT_VMCTL_FAILED,
        "restore of another user's checkpoint:\n{r:?}"
    );
    assert!(r.stdout.is_empty(), "another user's checkpoint ran:\n{r:?}");
    assert_contains(
        "restore of another user's checkpoint",
        &r.stderr_str(),
        &["owned by uid 65534", "not by you"],
    );
    let ins = vmctl(&[&"inspect", &theirs]);
    assert_eq!(
        ins.code, 1,
        "inspect of another user's checkpoint:\n{ins:?}"
    );
    assert_contains("inspect", &ins.stdout_str(), &["owned by uid 65534"]);

    // Only the directory itself belongs to someone else.
    let dir_only = tmp.join("dir-only");
    copy_generations(&ck, &[1, 2], &dir_only, false);
    chown(&dir_only, NOBODY);
    let r = restore(tmp.path(), &dir_only, &[], b"gg");
    assert_eq!(
        r.code, EXIT_VMCTL_FAILED,
        "restore from another user's directory:\n{r:?}"
    );
    assert!(
        r.stdout.is_empty(),
        "the job ran from another user's directory:\n{r:?}"
    );
    assert_contains(
        "restore from another user's directory",
        &r.stderr_str(),
        &["owned by uid 65534"],
    );
    // And `vmctl run` will not checkpoint into it either.
    let r = vmctl_in(
        tmp.path(),
        &[
            &"run",
            &"--checkpoint-dir",
            &dir_only,
            &"--",
            &FILL,
            &out,
            &"1",
            &"16",
        ],
        b"gg",
    );
    assert_eq!(
        r.code, EXIT_VMCTL_FAILED,
        "run --checkpoint-dir of another user:\n{r:?}"
    );
    assert!(r.stdout.is_empty(), "{r:?}");
    assert_contains(
        "run --checkpoint-dir of another user",
        &r.stderr_str(),
        &["owned by uid 65534"],
    );
}

/// Named features vmctl reports by name (a subset of checkpoint/cpu.rs), as
/// (leaf, subleaf, register, bit, name).
const NAMED_FEATURES: &[(u64, u64, &str, u32, &str)] = &[
    (7, 0, "edx", 23, "avx512_fp16"),
    (7, 1, "eax", 4, "avx_vnni"),
    (7, 1, "eax", 5, "avx512_bf16"),
    (7, 0, "ebx", 16, "avx512f"),
    (7, 0, "ebx", 29, "sha_ni"),
    (0x8000_0001, 0, "ecx", 6, "sse4a"),
    (7, 0, "ecx", 8, "gfni"),
    (7, 0, "ebx", 5, "avx2"),
    (1, 0, "ecx", 28, "avx"),
];

#[test]
fn checkpoint_needing_a_cpu_feature_this_host_lacks_is_refused() {
    need_kvm!();
    let tmp = TempDir::new("ckpt-cpu");
    let out = tmp.join("vm.bin");
    let ck = tmp.join("ckpt");
    let job = start_fill(&tmp, &ck, "256M", &out, 1, 16);
    term_checkpoint(job);
    let gen = gen_dir(&ck, 1);
    let written = fs::read(&out).unwrap();

    // The manifest holds the CPUID words this host showed the guest: a bit
    // clear there is a feature this host lacks.
    let words = manifest(&gen)["cpu"]["words"].clone();
    let word = |leaf: u64, sub: u64, reg: &str| {
        words
            .as_array()
            .unwrap()
            .iter()
            .position(|w| w["leaf"] == leaf && w["subleaf"] == sub && w["register"] == reg)
    };
    let bits = |i: usize| words[i]["bits"].as_u64().unwrap();
    let (index, bit, name) = NAMED_FEATURES
        .iter()
        .find_map(|&(leaf, sub, reg, bit, name)| {
            let i = word(leaf, sub, reg)?;
            (bits(i) & (1 << bit) == 0).then(|| (i, bit, name.to_string()))
        })
        .or_else(|| {
            // Unnamed: vmctl reports it as cpuid.LEAF.SUB.REG[BIT].
            let i = word(7, 0, "edx").expect("cpuid 7.0 edx in the manifest");
            let bit = (0..32).find(|b| bits(i) & (1 << b) == 0)?;
            Some((i, bit, format!("cpuid.0x7.0.edx[{bit}]")))
        })
        .expect("this host has every CPU feature vmctl records");
    rewrite_manifest(&gen, |m| {
        let w = &mut m["cpu"]["words"][index]["bits"];
        *w = (w.as_u64().unwrap() | 1 << bit).into();
    });

    let r = restore(tmp.path(), &ck, &[], b"gg");
    assert_eq!(r.code, EXIT_VMCTL_FAILED, "restore needing {name}:\n{r:?}");
    assert!(r.stdout.is_empty(), "the job ran without {name}:\n{r:?}");
    assert_contains(
        "restore needing a missing CPU feature",
        &r.stderr_str(),
        &["generation 1 is unusable", "lacks features", &name],
    );
    assert_eq!(
        fs::read(&out).unwrap(),
        written,
        "the refused job wrote to its file"
    );
    assert!(gen.is_dir(), "a refused restore removed the generation");
}

/// The manifest is the user's file: `restore --mem` caps what it asks for. A
/// manifest grown past the cap (its sum rewritten to match) is refused with
/// the reason; the untouched generation restores under the same cap.
#[test]
fn restore_mem_refuses_a_grown_manifest_and_restores_the_original() {
    need_kvm!();
    let tmp = TempDir::new("ckpt-mem-cap");
    let out = tmp.join("vm.bin");
    let ck = tmp.join("ckpt");
    let job = start_fill(&tmp, &ck, "64M", &out, 1, 16);
    term_checkpoint(job);
    let gen = gen_dir(&ck, 1);
    let original = fs::read(gen.join("manifest.json")).unwrap();
    let original_sum = fs::read(gen.join("manifest.sum")).unwrap();
    rewrite_manifest(&gen, |m| {
        let ram = &mut m["memory"]["ram_bytes"];
        *ram = (ram.as_u64().unwrap() + (200 << 20)).into();
    });

    let r = restore(tmp.path(), &ck, &["--mem", "64M"], b"gg");
    assert_eq!(
        r.code, EXIT_VMCTL_FAILED,
        "a grown manifest was restored:\n{r:?}"
    );
    assert!(r.stdout.is_empty(), "the grown job ran:\n{r:?}");
    assert_contains(
        "restore of a manifest grown past --mem",
        &r.stderr_str(),
        &["generation 1 is unusable", "more than --mem 64 MiB allows"],
    );
    assert!(gen.is_dir(), "a refused restore removed the generation");

    fs::write(gen.join("manifest.json"), original).unwrap();
    fs::write(gen.join("manifest.sum"), original_sum).unwrap();
    let r = restore(tmp.path(), &ck, &["--mem", "64M"], b"gg");
    assert_eq!(r.code, 0, "restore within --mem:\n{r:?}");
}

#[test]
fn open_file_gone_or_shrunk_below_its_offset_is_refused() {
    need_kvm!();
    const CHUNK: usize = 40_000;
    let tmp = TempDir::new("ckpt-openfile");
    let mut data = vec![0u8; 100_000];
    Rng::new(0xf11e).fill(&mut data);
    let input = tmp.write_file("input.bin", &data, 0o644);
    let native = Invocation::new(READFILE)
        .args([input.as_os_str(), CHUNK.to_string().as_ref()])
        .stdin("gg")
        .cwd(tmp.path())
        .run_native();
    assert_eq!(native.code, 0, "{native:?}");

    let ck = tmp.join("ckpt");
    let mut job = Job::run(
        tmp.path(),
        &ck,
        &["--mem", "256M", "--on-signal", "TERM=checkpoint-exit"],
        READFILE,
        &[&input, &CHUNK.to_string()],
    );
    job.wait_for("piece 1:");
    term_checkpoint(job);
    assert_eq!(fd_offset(&gen_dir(&ck, 1), &input), CHUNK as u64);
    for name in ["unchanged", "eof", "shrunk", "gone"] {
        copy_generations(&ck, &[1], &tmp.join(name), true);
    }

    // Unchanged, it resumes where it was.
    let r = restore(tmp.path(), &tmp.join("unchanged"), &[], b"gg");
    assert_eq!(r.code, 0, "{r:?}");
    assert_bytes_eq(
        "restore with the file unchanged",
        tail_from(&native.stdout_str(), "piece 2:").as_bytes(),
        &r.stdout,
    );
    // The restored job's exit status is the program's own.
    let r = restore(tmp.path(), &tmp.join("eof"), &[], b"");
    assert_eq!(r.code, 3, "restored readfile with no stdin left:\n{r:?}");
    assert_contains(
        "restored readfile",
        &r.stderr_str(),
        &["readfile: stdin ended before piece 2"],
    );

    let path = input.display().to_string();
    set_len(&input, (CHUNK / 2) as u64);
    let r = restore(tmp.path(), &tmp.join("shrunk"), &[], b"gg");
    assert_eq!(
        r.code, EXIT_VMCTL_FAILED,
        "restore with the file shrunk:\n{r:?}"
    );
    assert!(
        r.stdout.is_empty(),
        "the job ran with its file shrunk:\n{r:?}"
    );
    assert_contains(
        "restore with the file shrunk",
        &r.stderr_str(),
        &[&path, "shorter than the saved offset 40000"],
    );

    fs::remove_file(&input).unwrap();
    let r = restore(tmp.path(), &tmp.join("gone"), &[], b"gg");
    assert_eq!(
        r.code, EXIT_VMCTL_FAILED,
        "restore with the file gone:\n{r:?}"
    );
    assert!(
        r.stdout.is_empty(),
        "the job ran with its file gone:\n{r:?}"
    );
    assert_contains(
        "restore with the file gone",
        &r.stderr_str(),
        &[&path, "cannot be opened now", "No such file"],
    );
}

// ---------------------------------------------------------------------------
// Periodic checkpoints

#[test]
fn checkpoint_interval_writes_generations_while_running_and_none_remain() {
    need_kvm!();
    let tmp = TempDir::new("ckpt-interval");
    let native_out = tmp.join("native.bin");
    let native = native_fill(&tmp, &native_out, 1, 16);
    let out = tmp.join("vm.bin");
    let ck = tmp.join("ckpt");
    let mut job = fill_job(
        &tmp,
        &ck,
        &["--mem", "256M", "--checkpoint-interval", "1"],
        &out,
        1,
        16,
    );
    // The job is blocked reading stdin; the timer must still get through.
    let usable = |v: &Value| -> Vec<u64> {
        statuses(v)
            .into_iter()
            .filter(|(_, s)| s == "ok")
            .map(|(g, _)| g)
            .collect()
    };
    let first = poll_until("a first periodic generation", STEP, || {
        let (code, v) = inspect_json(&ck, false);
        (code == 0)
            .then(|| usable(&v))
            .and_then(|g| g.first().copied())
    });
    // ...and keep going.
    poll_until("a later periodic generation", STEP, || {
        let (_, v) = inspect_json(&ck, false);
        usable(&v).into_iter().find(|&g| g > first)
    });
    assert!(job.running(), "the job stopped");
    let (code, v) = inspect_json(&ck, true);
    assert_eq!(code, 0, "{v}");

    job.send(b"gg");
    let run = job.finish();
    assert_eq!(run.code, 0, "{run:?}");
    assert_bytes_eq(
        "stdout with periodic checkpoints",
        &native.stdout,
        &run.stdout,
    );
    assert_file_eq("file with periodic checkpoints", &native_out, &out);
    assert_eq!(
        generation_dirs(&ck),
        Vec::<String>::new(),
        "a finished job keeps no generations"
    );
    assert!(!ck.join("latest").exists(), "latest still points somewhere");
    // Only the record that the program ended, for launchers not to resume it, and
    // the log of what vmctl did.
    assert_eq!(
        entries(&ck),
        ["events.jsonl", "finished"],
        "left in {}",
        ck.display()
    );
    let finished: Value = serde_json::from_slice(&fs::read(ck.join("finished")).unwrap()).unwrap();
    assert_eq!(finished["exit_status"], 0, "{finished}");
    let (code, v) = inspect_json(&ck, false);
    assert_eq!(code, 1, "{v}");
    assert!(statuses(&v).is_empty(), "{v}");
}

#[test]
fn signal_checkpoint_takes_a_generation_and_the_job_goes_on() {
    need_kvm!();
    let tmp = TempDir::new("ckpt-usr1");
    let native_out = tmp.join("native.bin");
    let native = native_fill(&tmp, &native_out, 1, 16);
    let out = tmp.join("vm.bin");
    let ck = tmp.join("ckpt");
    let mut job = fill_job(
        &tmp,
        &ck,
        &["--mem", "256M", "--on-signal", "USR1=checkpoint"],
        &out,
        1,
        16,
    );
    job.signal(libc::SIGUSR1);
    poll_until("generation 1 after SIGUSR1", STEP, || {
        let (code, v) = inspect_json(&ck, true);
        (code == 0 && statuses(&v) == [(1, "verified".to_string())]).then_some(())
    });
    job.send(b"g");
    job.wait_for("pass 1 half ");
    job.signal(libc::SIGUSR1);
    poll_until("generation 2 after SIGUSR1", STEP, || {
        let (_, v) = inspect_json(&ck, false);
        statuses(&v)
            .iter()
            .any(|(g, s)| *g == 2 && s == "ok")
            .then_some(())
    });
    job.send(b"g");
    let run = job.finish();
    assert_eq!(run.code, 0, "{run:?}");
    assert_bytes_eq(
        "stdout of a job checkpointed on SIGUSR1",
        &native.stdout,
        &run.stdout,
    );
    assert_file_eq("file of a job checkpointed on SIGUSR1", &native_out, &out);

    // Without --on-signal, SIGTERM goes to the program, which dies of it.
    let job = fill_job(&tmp, &tmp.join("ckpt2"), &["--mem", "256M"], &out, 1, 16);
    job.signal(libc::SIGTERM);
    let run = job.finish();
    assert_eq!(run.code, 128 + libc::SIGTERM, "{run:?}");
    assert!(generation_dirs(&tmp.join("ckpt2")).is_empty());
}

// ---------------------------------------------------------------------------
// Hardening (issue 9): crafted checkpoints, crashes mid-write, the control socket,
// relative directories and the memory policy of restores

/// A job of `fill OUT 1 MIB` checkpointed once at "filled": returns the native run,
/// the output file and the checkpoint directory (gen 1), with the job gone.
fn one_generation(tmp: &TempDir, mem: &str, mib: usize) -> (RunOutput, PathBuf, PathBuf) {
    let native_out = tmp.join("native.bin");
    let native = native_fill(tmp, &native_out, 1, mib);
    let out = tmp.join("vm.bin");
    let ck = tmp.join("ckpt");
    let job = start_fill(tmp, &ck, mem, &out, 1, mib);
    term_checkpoint(job);
    assert_eq!(generation_dirs(&ck), [gen_name(1)]);
    (native, out, ck)
}

/// A chunk claiming 2^48 pages, or an image named outside the generation, is
/// refused with one line naming the file and the problem; inspect neither aborts
/// (it used to try to allocate the chunk) nor reads another file.
#[test]
fn crafted_sizes_in_a_manifest_are_refused_clearly() {
    need_kvm!();
    let tmp = TempDir::new("ckpt-crafted");
    let (_, _, ck) = one_generation(&tmp, "256M", 4);
    let gen1 = gen_dir(&ck, 1);
    let pristine = tmp.join("pristine");
    copy_generations(&ck, &[1], &pristine, false);
    let kernel_edit = tmp.join("kernel-edit");
    copy_generations(&ck, &[1], &kernel_edit, false);
    rewrite_manifest(&gen1, |m| {
        m["memory"]["chunks"][0]["runs"][0]["pages"] = Value::from(1u64 << 48);
    });
    let out = vmctl(&[&"inspect", &ck, &"--verify"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_contains(
        "inspect of a crafted chunk",
        &inspect_line(&out, 1),
        &["UNUSABLE", "manifest.json", "chunk 0"],
    );
    let r = restore(tmp.path(), &ck, &[], b"");
    assert_eq!(r.code, EXIT_VMCTL_FAILED, "{r:?}");
    assert_contains("restore of a crafted chunk", &r.stderr_str(), &["chunk 0"]);

    let gen1 = gen_dir(&pristine, 1);
    rewrite_manifest(&gen1, |m| {
        m["memory"]["file"] = Value::from("../../../../etc/passwd");
    });
    let out = vmctl(&[&"inspect", &pristine, &"--verify"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_contains(
        "inspect of an image named elsewhere",
        &inspect_line(&out, 1),
        &["UNUSABLE", "must be memory.img"],
    );

    // The kernel state is checked too: a process with too few signal dispositions
    // (vmctl would index past them at the first signal) is refused before it runs.
    rewrite_manifest(&gen_dir(&kernel_edit, 1), |m| {
        m["kernel"]["processes"][0]["actions"] = Value::Array(vec![]);
    });
    let r = restore(tmp.path(), &kernel_edit, &[], b"");
    assert_eq!(r.code, EXIT_VMCTL_FAILED, "{r:?}");
    assert_contains(
        "restore of a crafted kernel state",
        &r.stderr_str(),
        &["generation 1 is unusable", "has 0 signal dispositions"],
    );
}

/// The checkpoint reader, in process, against a few thousand damaged copies of a
/// real generation (manifest edited and re-checksummed, bytes flipped, files
/// swapped for symlinks, FIFOs or directories...): no panic, no abort, no hang.
/// VMWRAP_FUZZ_CASES raises the count (docs/CHECKPOINT-FORMAT.md).
#[test]
fn checkpoint_reader_survives_mutated_generations() {
    need_kvm!();
    let tmp = TempDir::new("ckpt-fuzz");
    // A full generation and an incremental one on it: the cases damage either, and
    // the links between them.
    let ck = tmp.join("ckpt");
    let out = tmp.join("vm.bin");
    let opts = [
        "--mem",
        "64M",
        "--incremental=on",
        "--compress=zstd",
        "--on-signal",
        "TERM=checkpoint-exit",
    ];
    let job = fill_job(&tmp, &ck, &opts, &out, 1, 1);
    assert_eq!(checkpoint(&ck), 1);
    term_checkpoint(job);
    let (code, v) = inspect_json(&ck, true);
    assert_eq!(code, 0, "{v}");
    // The job's random data is stored as it is, the rest compressed: the cases
    // damage both kinds of chunk, and the decompressor's input.
    let chunks: Vec<Value> = (1..=2)
        .flat_map(|g| {
            let m = fs::read(ck.join(format!("gen-{g:06}")).join("manifest.json")).unwrap();
            let m: Value = serde_json::from_slice(&m).unwrap();
            m["memory"]["chunks"].as_array().unwrap().clone()
        })
        .collect();
    assert!(
        chunks.iter().any(|c| c.get("compressed").is_some()),
        "{chunks:?}"
    );
    assert!(
        chunks.iter().any(|c| c.get("compressed").is_none()),
        "{chunks:?}"
    );
    let kinds: Vec<(u64, &str)> = v["generations"]
        .as_array()
        .expect("generations")
        .iter()
        .map(|g| {
            (
                g["generation"].as_u64().unwrap(),
                g["kind"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(kinds.contains(&(2, "incremental")), "{v}");
    let cases = std::env::var("VMWRAP_FUZZ_CASES").unwrap_or_else(|_| "2000".into());
    let seed = std::env::var("VMWRAP_FUZZ_SEED").unwrap_or_else(|_| "1".into());
    let scratch = tmp.join("scratch");
    let out = vmctl(&[
        &"fuzz-reader",
        &ck,
        &"--scratch",
        &scratch,
        &"--cases",
        &cases,
        &"--seed",
        &seed,
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("fuzz-reader JSON");
    assert_eq!(v["panics"], Value::Array(vec![]), "{v}");
    // Some cases leave the generation intact: the harness really reads them.
    assert!(v["accepted_generations"].as_u64().unwrap() > 0, "{v}");
}

/// A crash between a generation's rename and the update of `latest` leaves
/// `latest` on the older one: the restore still takes the newest complete one.
#[test]
fn restore_takes_the_newest_generation_even_when_latest_lags() {
    need_kvm!();
    let tmp = TempDir::new("ckpt-latest-lags");
    let native_out = tmp.join("native.bin");
    let native = native_fill(&tmp, &native_out, 1, 4);
    let out = tmp.join("vm.bin");
    let ck = tmp.join("ckpt");
    let mut job = start_fill(&tmp, &ck, "256M", &out, 1, 4);
    assert_eq!(checkpoint(&ck), 1);
    job.send(b"g");
    job.wait_for("pass 1 half");
    assert_eq!(checkpoint(&ck), 2);
    job.signal(libc::SIGKILL);
    job.finish();
    // The state a crash right after renaming gen-000002 into place leaves.
    fs::remove_file(ck.join("latest")).unwrap();
    std::os::unix::fs::symlink(gen_name(1), ck.join("latest")).unwrap();
    let r = restore(tmp.path(), &ck, &[], b"g");
    assert_eq!(r.code, 0, "{r:?}");
    // Generation 2 was taken after "pass 1 half": only what follows it is printed.
    assert_bytes_eq(
        "restore when latest lags",
        tail_from(&native.stdout_str(), "pass 1 checksum").as_bytes(),
        &r.stdout,
    );
    assert_file_eq("file when latest lags", &native_out, &out);
}

/// The memory policy of a restore is --mem's, never the user-writable manifest's:
/// a manifest grown past --mem is refused with the sizes named, and the next older
/// generation is tried.
#[test]
fn restore_mem_caps_what_the_manifest_asks_for() {
    need_kvm!();
    let tmp = TempDir::new("ckpt-restore-mem");
    let native_out = tmp.join("native.bin");
    let native = native_fill(&tmp, &native_out, 1, 4);
    let out = tmp.join("vm.bin");
    let ck = tmp.join("ckpt");
    let job = start_fill(&tmp, &ck, "64M", &out, 1, 4);
    assert_eq!(checkpoint(&ck), 1);
    assert_eq!(checkpoint(&ck), 2);
    job.signal(libc::SIGKILL);
    job.finish();
    // A commit limit raised in the manifest is lowered to --mem: the next checkpoint
    // of the restored job records --mem's.
    let clamp = tmp.join("clamp");
    copy_generations(&ck, &[1], &clamp, false);
    rewrite_manifest(&gen_dir(&clamp, 1), |m| {
        m["kernel"]["commit_limit"] = Value::from(200u64 << 20);
    });
    let resumed = Job::restore(tmp.path(), &clamp, &["--mem", "64M"]);
    poll_until("the restored job's control socket", STEP, || {
        std::os::unix::net::UnixStream::connect(clamp.join("control.sock")).ok()
    });
    assert_eq!(checkpoint(&clamp), 2);
    assert_eq!(
        manifest(&gen_dir(&clamp, 2))["kernel"]["commit_limit"],
        Value::from(64u64 << 20)
    );
    resumed.signal(libc::SIGKILL);
    resumed.finish();
    // Grow generation 2 to 200 MiB, as a user editing the manifest and its CRC would.
    rewrite_manifest(&gen_dir(&ck, 2), |m| {
        m["memory"]["ram_bytes"] = Value::from((200u64 << 20) + (2 << 20));
        m["kernel"]["commit_limit"] = Value::from(200u64 << 20);
    });
    let r = restore(tmp.path(), &ck, &["--mem", "64M"], b"gg");
    assert_eq!(r.code, 0, "{r:?}");
    assert_contains(
        "restore --mem of a grown manifest",
        &r.stderr_str(),
        &[
            "generation 2 is unusable",
            "200 MiB of guest RAM",
            "--mem 64 MiB",
            "restored generation 1",
        ],
    );
    assert_bytes_eq(
        "restore --mem",
        tail_from(&native.stdout_str(), "pass 1 start").as_bytes(),
        &r.stdout,
    );
    assert_file_eq("file after restore --mem", &native_out, &out);
}

/// A relative --checkpoint-dir is resolved when vmctl starts: the guest's chdir does
/// not move it (SIGTERM still checkpoints), and `vmctl restore work/ck` writes its
/// next generation into work/ck.
#[test]
fn relative_checkpoint_dir_does_not_follow_the_guests_chdir() {
    need_kvm!();
    let tmp = TempDir::new("ckpt-relative");
    fs::create_dir(tmp.join("work")).unwrap();
    let script = "import os,sys\nos.chdir('/')\nprint('ready', flush=True)\n\
                  sys.stdin.read(1)\nprint('resumed in', os.getcwd(), flush=True)\n";
    let mut job = Job::run(
        tmp.path(),
        Path::new("work/ck"),
        &["--on-signal", "TERM=checkpoint-exit"],
        PYTHON,
        &[&"-c", &script],
    );
    job.wait_for("ready");
    let first = term_checkpoint(job);
    assert_eq!(generation_dirs(&tmp.join("work/ck")), [gen_name(1)]);

    let mut resumed = Job::restore(tmp.path(), Path::new("work/ck"), &[]);
    let ck = tmp.join("work/ck");
    poll_until("the restored job's control socket", STEP, || {
        std::os::unix::net::UnixStream::connect(ck.join("control.sock")).ok()
    });
    assert_eq!(checkpoint(&ck), 2);
    assert!(
        !tmp.join("work/work").exists(),
        "a generation went to work/work/ck"
    );
    resumed.send(b"g");
    let r = resumed.finish();
    assert_eq!(r.code, 0, "{r:?}");
    // What the job printed, across the checkpoint, is what it prints natively.
    assert_eq!(
        first.stdout_str() + &r.stdout_str(),
        "ready\nresumed in /\n"
    );
}

/// A client that connects to the control socket and says nothing (the guest can
/// connect too) does not hold up `vmctl checkpoint`.
#[test]
fn idle_control_connection_does_not_block_checkpoints() {
    need_kvm!();
    let tmp = TempDir::new("ckpt-idle-client");
    let out = tmp.join("vm.bin");
    let ck = tmp.join("ckpt");
    let job = start_fill(&tmp, &ck, "256M", &out, 1, 4);
    let idle = std::os::unix::net::UnixStream::connect(ck.join("control.sock")).unwrap();
    let mut cmd = Command::new(vmctl_path());
    cmd.arg("checkpoint").arg(&ck);
    let r = run_command(cmd, b"", STEP);
    assert_eq!(
        r.code, 0,
        "vmctl checkpoint with an idle client connected:\n{r:?}"
    );
    assert_eq!(generation_dirs(&ck), [gen_name(1)]);
    drop(idle);
    term_checkpoint(job);
}

/// kill -9 of vmctl at random points of a checkpoint write, again and again: the
/// previous generation always restores (each round starts from a restore), every
/// generation left is intact, and the job's output equals the native run's.
/// 20 rounds by default (CI); VMWRAP_KILL_ROUNDS=100 for the full run.
#[test]
fn sigkill_at_random_points_of_checkpoint_writes_never_loses_the_job() {
    need_kvm!();
    let rounds: usize = std::env::var("VMWRAP_KILL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    const MIB: usize = 32;
    let tmp = TempDir::new("ckpt-kill-loop");
    let native_out = tmp.join("native.bin");
    let native = native_fill(&tmp, &native_out, 1, MIB);
    let out = tmp.join("vm.bin");
    let ck = tmp.join("ckpt");
    let job = start_fill(&tmp, &ck, "256M", &out, 1, MIB);
    // How long a whole write takes here, to spread the kills over it.
    let t0 = Instant::now();
    assert_eq!(checkpoint(&ck), 1);
    let write_time = t0.elapsed();
    job.signal(libc::SIGKILL);
    job.finish();
    let mut rng = Rng::new(0x9e37_79b9);
    let mut completed = 0;
    for round in 0..rounds {
        let mut resumed = Job::restore(tmp.path(), &ck, &[]);
        poll_until("the restored job's control socket", STEP, || {
            if !resumed.running() {
                panic!("round {round}: the restore ended: {}", resumed.stderr());
            }
            std::os::unix::net::UnixStream::connect(ck.join("control.sock")).ok()
        });
        let client = {
            let ck = ck.clone();
            std::thread::spawn(move || vmctl(&[&"checkpoint", &ck]))
        };
        let delay = write_time.mul_f64((rng.next_u64() % 1000) as f64 / 1000.0 * 1.5);
        std::thread::sleep(delay);
        resumed.signal(libc::SIGKILL);
        let killed = resumed.finish();
        assert_eq!(
            killed.code,
            128 + libc::SIGKILL,
            "round {round}: {killed:?}"
        );
        if client.join().unwrap().code == 0 {
            completed += 1;
        }
        let (code, v) = inspect_json(&ck, true);
        assert_eq!(code, 0, "round {round}: {v}");
        assert!(
            statuses(&v).iter().all(|(_, s)| s == "verified"),
            "round {round}: a generation is damaged: {v}"
        );
    }
    eprintln!("{rounds} kills, {completed} checkpoints completed before their kill");
    let r = restore(tmp.path(), &ck, &[], b"gg");
    assert_eq!(r.code, 0, "{r:?}");
    assert_bytes_eq(
        "restore after the kills",
        tail_from(&native.stdout_str(), "pass 1 start").as_bytes(),
        &r.stdout,
    );
    assert_file_eq("file after the kills", &native_out, &out);
}

// ---------------------------------------------------------------------------
// The vDSO in checkpoints

/// The kinds of the VMAs of every address space in a generation's manifest.
fn vma_kinds(gen: &Path) -> Vec<String> {
    manifest(gen)["kernel"]["address_spaces"]
        .as_array()
        .expect("address spaces")
        .iter()
        .flat_map(|mm| mm["vmas"].as_array().expect("vmas").iter())
        .map(|v| v["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A checkpoint written before vmctl had a vDSO (no `vdso` or `clocks` in its kernel
/// state, no [vdso] mapping; VMCTL_VDSO=0 makes a job like that) restores and
/// finishes like an uninterrupted run.
#[test]
fn checkpoint_from_before_the_vdso_restores() {
    need_kvm!();
    let tmp = TempDir::new("ckpt-novdso");
    let native_out = tmp.join("native.bin");
    let native = native_fill(&tmp, &native_out, 1, 16);
    let out = tmp.join("vm.bin");
    let ck = tmp.join("ckpt");
    let mut cmd = Command::new(vmctl_path());
    cmd.env("VMCTL_VDSO", "0")
        .args(["run", "--checkpoint-dir"])
        .arg(&ck)
        .args([
            "--mem",
            "256M",
            "--on-signal",
            "TERM=checkpoint-exit",
            "--",
            FILL,
        ])
        .arg(&out)
        .args(["1", "16"])
        .current_dir(tmp.path());
    let mut job = Job::spawn(cmd);
    job.wait_for("filled ");
    let before = term_checkpoint(job);
    let gen = gen_dir(&ck, 1);
    let kinds = vma_kinds(&gen);
    assert!(
        !kinds.iter().any(|k| k == "Vdso" || k == "Vvar"),
        "VMCTL_VDSO=0 still mapped a vDSO: {kinds:?}"
    );
    rewrite_manifest(&gen, |m| {
        let kernel = m["kernel"].as_object_mut().expect("kernel state");
        assert!(kernel.remove("vdso").expect("vdso field").is_null());
        kernel.remove("clocks").expect("clocks field");
    });

    let r = restore(tmp.path(), &ck, &[], b"gg");
    assert_eq!(r.code, 0, "restore of a checkpoint without a vDSO:\n{r:?}");
    assert_eq!(
        format!("{}{}", before.stdout_str(), r.stdout_str()),
        native.stdout_str()
    );
    assert_file_eq("fill output", &native_out, &out);
}

/// A crafted checkpoint cannot turn the vDSO's kernel mapping into a window on
/// other guest memory (here the system area with the page tables' neighbours), nor
/// make the shared vvar page writable, nor overflow the clocks' offsets.
#[test]
fn checkpoint_mapping_other_memory_as_the_vdso_is_refused() {
    need_kvm!();
    let tmp = TempDir::new("ckpt-vdso-crafted");
    let out = tmp.join("vm.bin");
    let ck = tmp.join("ckpt");
    let job = start_fill(&tmp, &ck, "256M", &out, 1, 16);
    term_checkpoint(job);
    let gen = gen_dir(&ck, 1);
    let kinds = vma_kinds(&gen);
    assert!(kinds.iter().any(|k| k == "Vdso"), "{kinds:?}");
    assert!(kinds.iter().any(|k| k == "Vvar"), "{kinds:?}");
    let original = fs::read(gen.join("manifest.json")).unwrap();
    let original_sum = fs::read(gen.join("manifest.sum")).unwrap();

    type Edit = fn(&mut Value);
    let edits: [(&str, Edit); 2] = [
        ("[vdso] pointed at guest-physical 0", |v| {
            if v["kind"] == "Vdso" {
                v["backing"]["Kernel"]["gpa"] = 0.into();
            }
        }),
        ("[vvar] made writable", |v| {
            if v["kind"] == "Vvar" {
                v["prot"] = (libc::PROT_READ | libc::PROT_WRITE).into();
            }
        }),
    ];
    for (what, edit) in edits {
        fs::write(gen.join("manifest.json"), &original).unwrap();
        fs::write(gen.join("manifest.sum"), &original_sum).unwrap();
        rewrite_manifest(&gen, |m| {
            for mm in m["kernel"]["address_spaces"]
                .as_array_mut()
                .expect("address spaces")
            {
                for v in mm["vmas"].as_array_mut().expect("vmas") {
                    edit(v);
                }
            }
        });
        let r = restore(tmp.path(), &ck, &[], b"gg");
        assert_eq!(r.code, EXIT_VMCTL_FAILED, "{what}:\n{r:?}");
        assert!(r.stdout.is_empty(), "{what}: the job ran:\n{r:?}");
        assert_contains(
            what,
            &r.stderr_str(),
            &["generation 1 is unusable", "not the job's vDSO"],
        );
    }

    // Saved clocks so far back that the offsets to this host's clocks would overflow.
    fs::write(gen.join("manifest.json"), &original).unwrap();
    fs::write(gen.join("manifest.sum"), &original_sum).unwrap();
    rewrite_manifest(&gen, |m| {
        m["kernel"]["clocks"]["monotonic_ns"] = i64::MIN.into();
    });
    let r = restore(tmp.path(), &ck, &[], b"gg");
    assert_eq!(r.code, EXIT_VMCTL_FAILED, "{r:?}");
    assert!(r.stdout.is_empty(), "the job ran:\n{r:?}");
    assert_contains(
        "crafted clocks",
        &r.stderr_str(),
        &["generation 1 is unusable", "saved clocks are out of range"],
    );
}

// ---------------------------------------------------------------------------
// The job's files after a restore: as they were at the generation restored
// (vmctl/src/filejournal). The job runs on past its newest checkpoint, as a job
// does when its node dies between periodic checkpoints, and is then SIGKILLed.

/// tests/fixtures/records.c: `records FILE STEPS append|inplace`, one stdin
/// byte a step, "step N" on stdout after each.
const RECORDS: &str = env!("VMWRAP_FIXTURE_RECORDS");
/// Bytes of the header and of each record `records ... append` writes.
const RECORDS_HEADER: u64 = 48;
const RECORD_LEN: u64 = 37;

/// `records FILE STEPS MODE` run natively to the end: the file it leaves.
fn native_records(tmp: &TempDir, name: &str, steps: usize, mode: &str) -> Vec<u8> {
    let path = tmp.join(name);
    let mut cmd = Command::new(RECORDS);
    cmd.arg(&path)
        .arg(steps.to_string())
        .arg(mode)
        .current_dir(tmp.path());
    let out = run_command(cmd, &vec![b'x'; steps], STEP);
    assert_eq!(out.code, 0, "native records:\n{out:?}");
    fs::read(&path).unwrap()
}

/// Lets `job` run step after step up to `step` (steps < 10, so "step N" is one
/// line's prefix).
fn run_to_step(job: &mut Job, sent: &mut usize, step: usize, log: Option<&Path>) {
    while *sent <= step {
        job.send(b"x");
        *sent += 1;
    }
    let line = format!("step {step}");
    match log {
        None => job.wait_for(&line),
        Some(log) => poll_until(&format!("{line:?} in {}", log.display()), STEP, || {
            let text = fs::read_to_string(log).unwrap_or_default();
            text.lines().any(|l| l == line).then_some(())
        }),
    }
}

/// Runs `records FILE STEPS MODE` under `vmctl run OPTS`, checkpointing once
/// the steps in `checkpoints` are done, lets it run on to step `until`, and
/// SIGKILLs vmctl. Returns the generations taken.
fn records_killed(
    tmp: &TempDir,
    ckpt: &Path,
    opts: &[&str],
    file: &Path,
    (steps, mode): (usize, &str),
    checkpoints: &[usize],
    until: usize,
) -> Vec<u64> {
    let mut job = Job::run(
        tmp.path(),
        ckpt,
        opts,
        RECORDS,
        &[&file, &steps.to_string(), &mode],
    );
    let mut sent = 0;
    let mut gens = Vec::new();
    for &step in checkpoints {
        run_to_step(&mut job, &mut sent, step, None);
        gens.push(checkpoint(ckpt));
    }
    run_to_step(&mut job, &mut sent, until, None);
    job.signal(libc::SIGKILL);
    let out = job.finish();
    assert_eq!(
        out.code,
        128 + libc::SIGKILL,
        "vmctl run, SIGKILLed:\n{out:?}"
    );
    gens
}

/// The `files.restore` entry of `vmctl inspect --json` for `file` in `generation`.
fn inspect_file(v: &Value, generation: u64, file: &Path) -> Value {
    let row = v["generations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["generation"].as_u64() == Some(generation))
        .unwrap_or_else(|| panic!("no generation {generation} in {v}"));
    row["files"]["restore"]
        .as_array()
        .unwrap_or_else(|| panic!("generation {generation}: no files to restore in {row}"))
        .iter()
        .find(|f| f["path"].as_str() == file.to_str())
        .unwrap_or_else(|| {
            panic!(
                "generation {generation}: {} not listed in {row}",
                file.display()
            )
        })
        .clone()
}

#[test]
fn trajectory_with_a_rewritten_header_is_restored_byte_for_byte_after_running_on() {
    need_kvm!();
    let tmp = TempDir::new("files-trajectory");
    let ckpt = tmp.join("ckpt");
    let traj = tmp.join("md.traj");
    let steps = 9;
    let native = native_records(&tmp, "native.traj", steps, "append");
    // Checkpoints after steps 2 and 5; steps 6 and 7 append two records (and
    // rewrite the header once) past the newest one before the kill.
    let gens = records_killed(&tmp, &ckpt, &[], &traj, (steps, "append"), &[2, 5], 7);
    assert_eq!(gens, [1, 2]);
    let size_at = |step: u64| RECORDS_HEADER + (step + 1) * RECORD_LEN;
    assert_eq!(fs::metadata(&traj).unwrap().len(), size_at(7));

    // inspect shows what a restore of each generation would do to the file.
    let (code, v) = inspect_json(&ckpt, false);
    assert_eq!(code, 0, "{v}");
    for (g, step) in [(1, 2), (2, 5)] {
        let f = inspect_file(&v, g, &traj);
        assert_eq!(f["size_now"].as_u64(), Some(size_at(7)), "{f}");
        assert_eq!(f["size_restored"].as_u64(), Some(size_at(step)), "{f}");
    }
    let human = vmctl(&[&"inspect", &ckpt]);
    assert_contains(
        "vmctl inspect",
        &human.stdout_str(),
        &[&format!(
            "file {}: {} -> {} bytes",
            traj.display(),
            size_at(7),
            size_at(5)
        )],
    );

    let out = restore(tmp.path(), &ckpt, &[], &vec![b'x'; steps - 6]);
    assert_eq!(out.code, 0, "vmctl restore:\n{out:?}");
    assert!(out.stdout_str().ends_with("step 8\ndone\n"), "{out:?}");
    assert_bytes_eq(
        "the trajectory after run, checkpoint, run on, SIGKILL, restore (vs native)",
        &native,
        &fs::read(&traj).unwrap(),
    );
}

#[test]
fn file_journal_holds_with_precopy_and_incremental_generations() {
    need_kvm!();
    // The journal is recorded with the job frozen for the last pre-copy round, and a
    // fallback to an incremental generation undoes the journals of every newer one.
    let steps = 9;
    let tmp = TempDir::new("files-inplace-chain");
    let ckpt = tmp.join("ckpt");
    let data = tmp.join("counters.dat");
    let native = native_records(&tmp, "native.dat", steps, "inplace");
    let opts = [
        "--files",
        "journal",
        "--precopy",
        "on",
        "--incremental",
        "on",
    ];
    let gens = records_killed(&tmp, &ckpt, &opts, &data, (steps, "inplace"), &[1, 3, 5], 7);
    assert_eq!(gens, [1, 2, 3]);
    let (code, v) = inspect_json(&ckpt, false);
    assert_eq!(code, 0, "{v}");
    let kinds: Vec<String> = v["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{}:{}", r["generation"], r["kind"].as_str().unwrap_or("?")))
        .collect();
    assert!(
        kinds.contains(&"2:incremental".to_string())
            && kinds.contains(&"3:incremental".to_string()),
        "{kinds:?}"
    );
    flip_bit(&gen_dir(&ckpt, 3).join("memory.img"), 100, 0);
    let out = restore(tmp.path(), &ckpt, &opts, &vec![b'x'; steps - 4]);
    assert_eq!(out.code, 0, "vmctl restore:\n{out:?}");
    assert_contains(
        "vmctl restore",
        &out.stderr_str(),
        &["generation 3 is unusable"],
    );
    assert_bytes_eq(
        "the counters file after incremental pre-copied checkpoints, run on, SIGKILL, restore of generation 2 (vs native)",
        &native,
        &fs::read(&data).unwrap(),
    );
}

#[test]
fn file_updated_in_place_is_restored_exactly_or_refused_under_each_policy() {
    need_kvm!();
    let steps = 8;
    for policy in ["journal", "truncate", "refuse"] {
        let tmp = TempDir::new(&format!("files-inplace-{policy}"));
        let ckpt = tmp.join("ckpt");
        let data = tmp.join("counters.dat");
        let native = native_records(&tmp, "native.dat", steps, "inplace");
        let opts = ["--files", policy];
        let gens = records_killed(&tmp, &ckpt, &opts, &data, (steps, "inplace"), &[1, 3], 5);
        assert_eq!(gens, [1, 2]);
        if policy == "journal" {
            // The newest generation is damaged: the restore falls back to the
            // older one, so the journals of both are undone.
            flip_bit(&gen_dir(&ckpt, 2).join("memory.img"), 100, 0);
        }
        let before = fs::read(&data).unwrap();
        let out = restore(tmp.path(), &ckpt, &opts, &vec![b'x'; steps - 2]);
        let stderr = out.stderr_str();
        if policy == "journal" {
            assert_eq!(out.code, 0, "--files {policy}: vmctl restore:\n{out:?}");
            assert_contains(
                &format!("--files {policy}"),
                &stderr,
                &["generation 2 is unusable"],
            );
            assert_bytes_eq(
                &format!("--files {policy}: the counters file after run, checkpoints, run on, SIGKILL, restore of generation 1 (vs native)"),
                &native,
                &fs::read(&data).unwrap(),
            );
        } else {
            assert_eq!(out.code, EXIT_VMCTL_FAILED, "--files {policy}:\n{out:?}");
            let what = if policy == "truncate" {
                "overwritten at byte"
            } else {
                "written at byte"
            };
            for g in [2, 1] {
                let line = stderr
                    .lines()
                    .find(|l| l.starts_with(&format!("vmctl: generation {g} is unusable: ")))
                    .unwrap_or_else(|| {
                        panic!("--files {policy}: generation {g} not tried:\n{out:?}")
                    });
                assert_contains(
                    &format!("--files {policy}, generation {g}"),
                    line,
                    &[&data.display().to_string(), what],
                );
            }
            assert_bytes_eq(
                &format!("--files {policy}: a refused restore leaves the file alone"),
                &before,
                &fs::read(&data).unwrap(),
            );
        }
    }
}

#[test]
fn file_shrunk_replaced_or_rewritten_behind_the_jobs_back_is_refused_and_named() {
    need_kvm!();
    let tmp = TempDir::new("files-behind-back");
    let ckpt = tmp.join("ckpt");
    let traj = tmp.join("out.traj");
    let steps = 6;
    let native = native_records(&tmp, "native.traj", steps, "append");
    // Step 4 only appends (no header rewrite), so the generation keeps no copy
    // of the file's earlier bytes: only the file itself has them.
    records_killed(&tmp, &ckpt, &[], &traj, (steps, "append"), &[3], 4);
    let original = fs::read(&traj).unwrap();
    let refused = |why: &str| {
        let out = restore(tmp.path(), &ckpt, &[], b"xx");
        assert_eq!(out.code, EXIT_VMCTL_FAILED, "{why}:\n{out:?}");
        assert_contains(
            why,
            &out.stderr_str(),
            &[&format!("generation 1 is unusable: {}: ", traj.display())],
        );
        out.stderr_str()
    };

    set_len(&traj, 10);
    let err = refused("shrunk behind the job's back");
    assert_contains("shrunk", &err, &["shrunk to 10 bytes"]);
    assert_eq!(
        fs::metadata(&traj).unwrap().len(),
        10,
        "a refused restore changed the file"
    );
    fs::OpenOptions::new()
        .write(true)
        .open(&traj)
        .and_then(|mut f| f.write_all(&original))
        .unwrap();

    let aside = tmp.join("out.traj.orig");
    fs::rename(&traj, &aside).unwrap();
    fs::write(&traj, &original).unwrap();
    let err = refused("replaced by another file with the same contents");
    assert_contains("replaced", &err, &["replaced since generation 1"]);
    fs::rename(&aside, &traj).unwrap();

    flip_bit(&traj, RECORDS_HEADER + 5, 0);
    let err = refused("rewritten in place behind the job's back");
    assert_contains("rewritten", &err, &["by something other than the job"]);
    flip_bit(&traj, RECORDS_HEADER + 5, 0);

    // Put back as the job left it, the file is restored and the job finishes.
    let out = restore(tmp.path(), &ckpt, &[], b"xx");
    assert_eq!(out.code, 0, "vmctl restore:\n{out:?}");
    assert_bytes_eq("the file (vs native)", &native, &fs::read(&traj).unwrap());
}

#[test]
fn stdout_file_shared_with_other_writers_shows_each_line_once() {
    need_kvm!();
    let tmp = TempDir::new("files-stdout");
    let ckpt = tmp.join("ckpt");
    let log = tmp.join("slurm-42.out");
    let traj = tmp.join("md.traj");
    let steps = 8;
    let append_to_log = || {
        fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&log)
            .unwrap()
    };
    // As under Slurm: the batch script writes to the output file before the
    // step, and something else (slurmstepd) after the job's last line.
    append_to_log().write_all(b"script: start\n").unwrap();
    let mut cmd = Command::new(vmctl_path());
    cmd.args(["run", "--checkpoint-dir"])
        .arg(&ckpt)
        .arg("--")
        .arg(RECORDS)
        .arg(&traj)
        .arg(steps.to_string())
        .arg("append")
        .current_dir(tmp.path());
    let mut job = Job::spawn_with_stdout(cmd, append_to_log().into());
    let mut sent = 0;
    run_to_step(&mut job, &mut sent, 3, Some(&log));
    checkpoint(&ckpt);
    run_to_step(&mut job, &mut sent, 6, Some(&log));
    job.signal(libc::SIGKILL);
    let out = job.finish();
    assert_eq!(out.code, 128 + libc::SIGKILL, "{out:?}");
    append_to_log()
        .write_all(b"slurmstepd: error: node failure\n")
        .unwrap();

    let mut cmd = Command::new(vmctl_path());
    cmd.arg("restore").arg(&ckpt).current_dir(tmp.path());
    let mut job = Job::spawn_with_stdout(cmd, append_to_log().into());
    job.send(&vec![b'x'; steps - 4]);
    let out = job.finish();
    assert_eq!(out.code, 0, "vmctl restore:\n{out:?}");
    let mut expected = String::from("script: start\n");
    for step in 0..4 {
        expected += &format!("step {step}\n");
    }
    expected += "slurmstepd: error: node failure\n";
    for step in 4..steps {
        expected += &format!("step {step}\n");
    }
    expected += "done\n";
    assert_bytes_eq(
        "the shared output file",
        expected.as_bytes(),
        &fs::read(&log).unwrap(),
    );
    let native = native_records(&tmp, "native.traj", steps, "append");
    assert_bytes_eq(
        "the trajectory (vs native)",
        &native,
        &fs::read(&traj).unwrap(),
    );
}

/// Adds to bytes of a file it maps shared and writable (as a memory-mapped
/// database or HDF5 file does), one step per stdin byte.
const PY_MMAP: &str = r#"
import mmap, sys
path, steps, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(path, "wb") as f:
    f.write(bytes(range(256)) * 64)
if when == "late":
    print("ready", flush=True)
    sys.stdin.buffer.read(1)
f = open(path, "r+b")
m = mmap.mmap(f.fileno(), 0)
for step in range(steps):
    sys.stdin.buffer.read(1)
    for j in range(8):
        i = (step * 131 + j * 977) % len(m)
        m[i] = (m[i] + step + 1) % 256
    print(f"step {step}", flush=True)
m.close()
f.close()
print("done", flush=True)
"#;

#[test]
fn file_mapped_shared_and_writable_is_restored_byte_for_byte() {
    need_kvm!();
    // Mapped before the checkpoint, or only after it (checkpointed at "ready").
    for when in ["early", "late"] {
        let tmp = TempDir::new(&format!("files-mmap-{when}"));
        let script = tmp.write_file("counters.py", PY_MMAP, 0o644);
        let steps = 6;
        let late = usize::from(when == "late");
        let native_file = tmp.join("native.db");
        let mut cmd = Command::new(PYTHON);
        cmd.arg(&script)
            .arg(&native_file)
            .arg(steps.to_string())
            .arg(when);
        let native = run_command(cmd, &vec![b'x'; steps + late], STEP);
        assert_eq!(native.code, 0, "native python:\n{native:?}");

        let ckpt = tmp.join("ckpt");
        let db = tmp.join("vm.db");
        let mut job = Job::run(
            tmp.path(),
            &ckpt,
            &["--mem", "1G"],
            PYTHON,
            &[&script, &db, &steps.to_string(), &when],
        );
        let mut sent = 0;
        if late == 1 {
            job.wait_for("ready");
        } else {
            run_to_step(&mut job, &mut sent, 1, None);
        }
        checkpoint(&ckpt);
        if late == 1 {
            job.send(b"x");
        }
        // The guest's stores to the mapping change the file without a syscall.
        run_to_step(&mut job, &mut sent, 4, None);
        job.signal(libc::SIGKILL);
        assert_eq!(job.finish().code, 128 + libc::SIGKILL);

        let left = steps - if late == 1 { 0 } else { 2 } + late;
        let out = restore(tmp.path(), &ckpt, &[], &vec![b'x'; left]);
        assert_eq!(out.code, 0, "{when}: vmctl restore:\n{out:?}");
        assert_bytes_eq(
            &format!("{when}: the mapped file (vs native)"),
            &fs::read(&native_file).unwrap(),
            &fs::read(&db).unwrap(),
        );
    }
}

/// `script DATA STEPS`, one stdin byte a step: each step, three subshells print
/// to the inherited standard output and append to DATA at the same time (and
/// run `seq`, a program of their own, onto the standard output); once they are
/// done, an end line goes to DATA, `/bin/echo` prints a line and bash "step N"
/// (once every process of the step is gone: a checkpoint then finds bash alone).
const SH_CHILDREN: &str = r#"
data=$1 steps=$2
for ((n = 0; n < steps; n++)); do
    read -r -n 1 _ || exit 3
    for c in 1 2 3; do
        (
            for ((i = 0; i < 100; i++)); do
                echo "step $n child $c line $i"
                echo "step $n child $c record $i" >> "$data"
            done
            seq -f "step $n child $c seq %g" 5
        ) &
    done
    wait
    echo "step $n end" >> "$data"
    /bin/echo "step $n exec"
    echo "step $n"
done
echo done
"#;

/// `text` with the lines between two lines matching `marker` sorted: lines that
/// concurrent writers print in any order, compared as a multiset per step, the
/// steps in order.
fn sorted_between_markers(text: &str, marker: impl Fn(&str) -> bool) -> String {
    let mut out = Vec::new();
    let mut block: Vec<String> = Vec::new();
    for line in text.lines() {
        if marker(line) {
            block.sort();
            out.append(&mut block);
            out.push(line.to_string());
        } else {
            block.push(line.to_string());
        }
    }
    block.sort();
    out.append(&mut block);
    out.join("\n")
}

#[test]
fn processes_writing_the_same_stdout_and_file_at_once_restore_to_an_uninterrupted_run() {
    need_kvm!();
    let tmp = TempDir::new("files-processes");
    let ckpt = tmp.join("ckpt");
    let script = tmp.write_file("children.sh", SH_CHILDREN, 0o755);
    let log = tmp.join("job.out");
    let data = tmp.join("data.log");
    let steps = 7;

    let native_data = tmp.join("native-data.log");
    let mut cmd = Command::new("/bin/bash");
    cmd.arg(&script)
        .arg(&native_data)
        .arg(steps.to_string())
        .current_dir(tmp.path());
    let native = run_command(cmd, &vec![b'x'; steps], STEP);
    assert_eq!(native.code, 0, "native run:\n{native:?}");

    // The job's standard output is a regular file (as Slurm's --output is), one
    // description shared by bash, its subshells and the programs they run.
    let mut cmd = Command::new(vmctl_path());
    cmd.args(["run", "--checkpoint-dir"])
        .arg(&ckpt)
        .args(["--", "/bin/bash"])
        .arg(&script)
        .arg(&data)
        .arg(steps.to_string())
        .current_dir(tmp.path());
    let mut job = Job::spawn_with_stdout(cmd, fs::File::create(&log).unwrap().into());
    let mut sent = 0;
    run_to_step(&mut job, &mut sent, 2, Some(&log));
    checkpoint(&ckpt);
    // Steps 3 to 5 write past the generation, the subshells all at once.
    run_to_step(&mut job, &mut sent, 5, Some(&log));
    job.signal(libc::SIGKILL);
    let out = job.finish();
    assert_eq!(out.code, 128 + libc::SIGKILL, "{out:?}");

    let append = fs::OpenOptions::new().append(true).open(&log).unwrap();
    let mut cmd = Command::new(vmctl_path());
    cmd.arg("restore").arg(&ckpt).current_dir(tmp.path());
    let mut job = Job::spawn_with_stdout(cmd, append.into());
    job.send(&vec![b'x'; steps - 3]);
    let out = job.finish();
    assert_eq!(out.code, 0, "vmctl restore:\n{out:?}");

    let is_step = |l: &str| {
        l == "done"
            || l.strip_prefix("step ")
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
    };
    assert_bytes_eq(
        "the job's standard output after run, checkpoint, run on, SIGKILL, restore (vs native; lines within a step sorted)",
        sorted_between_markers(&native.stdout_str(), is_step).as_bytes(),
        sorted_between_markers(&fs::read_to_string(&log).unwrap(), is_step).as_bytes(),
    );
    let is_end = |l: &str| l.ends_with(" end");
    assert_bytes_eq(
        "the file the processes append to (vs native; lines within a step sorted)",
        sorted_between_markers(&fs::read_to_string(&native_data).unwrap(), is_end).as_bytes(),
        sorted_between_markers(&fs::read_to_string(&data).unwrap(), is_end).as_bytes(),
    );
}

/// `--keep 2` with the newer kept generation's manifest damaged: the next
/// checkpoint cannot tell what that generation builds on, so it removes
/// nothing; the oldest generation, intact and the one a restore would fall
/// back to, stays.
#[test]
fn pruning_keeps_everything_when_a_kept_manifest_is_damaged() {
    need_kvm!();
    let tmp = TempDir::new("prune-damaged");
    let ck = tmp.join("ckpt");
    let out = tmp.join("out.txt");
    let job = fill_job(&tmp, &ck, &["--keep", "2"], &out, 4, 8);
    assert_eq!(checkpoint(&ck), 1);
    assert_eq!(checkpoint(&ck), 2);
    flip_bit(&gen_dir(&ck, 2).join("manifest.json"), 40, 0);
    assert_eq!(checkpoint(&ck), 3);
    job.signal(libc::SIGKILL);
    job.finish();
    assert_eq!(
        generation_dirs(&ck),
        [gen_name(1), gen_name(2), gen_name(3)],
        "a generation went although what the kept ones need could not be told"
    );
}
