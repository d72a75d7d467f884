//! The guest's clocks across a checkpoint and restore: the monotonic clocks and the
//! TSC never go backwards, whether the restored guest reads its clocks in the vDSO
//! or, when the restoring host's TSC is behind the checkpoint's (simulated with
//! VMCTL_TEST_TSC_AHEAD), vmctl traps rdtsc, carries the guest's TSC on from where
//! it was, and the vDSO falls back to the syscall; in the first process and in a
//! forked child alike.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use vmwrap_tests::{exit_report, need_kvm, syscall_exits, vmctl_path, TempDir};

const CLOCKS: &str = env!("VMWRAP_FIXTURE_CLOCKS");

fn read_line(r: &mut impl BufRead) -> String {
    let mut s = String::new();
    r.read_line(&mut s).expect("read guest output");
    s.trim_end().to_string()
}

/// What the clocks fixture printed before its checkpoint and after its restore, and
/// the restore's stderr.
struct Reads {
    before: Vec<String>,
    after: Vec<String>,
    restore_stderr: String,
}

/// Runs the clocks fixture (with `args`) for three reads, checkpoints it, and
/// restores it for three more with `restore_env` (VMCTL_COUNT_EXITS is always set, so
/// the exits of the restored part can be inspected).
fn checkpoint_and_restore(name: &str, args: &[&str], restore_env: &[(&str, &str)]) -> Reads {
    let tmp = TempDir::new(name);
    let dir = tmp.path().join("ck");
    let mut run = Command::new(vmctl_path())
        .args(["run", "--checkpoint-dir"])
        .arg(&dir)
        .args(["--on-signal", "TERM=checkpoint-exit", "--", CLOCKS])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start vmctl run");
    let mut stdin = run.stdin.take().expect("stdin");
    let mut out = BufReader::new(run.stdout.take().expect("stdout"));
    let mut before = Vec::new();
    for _ in 0..3 {
        stdin.write_all(b"x").expect("feed guest");
        stdin.flush().expect("flush");
        before.push(read_line(&mut out));
    }
    // The guest is now blocked reading stdin: checkpoint and stop it.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    let status = run.wait().expect("wait for vmctl run");
    assert_eq!(
        status.code(),
        Some(75),
        "checkpoint-exit status; output so far: {before:?}"
    );

    let mut restore = Command::new(vmctl_path());
    restore
        .arg("restore")
        .arg(&dir)
        .env("VMCTL_COUNT_EXITS", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in restore_env {
        restore.env(k, v);
    }
    let mut child = restore.spawn().expect("start vmctl restore");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"yyy")
        .expect("feed restored guest");
    let output = child.wait_with_output().expect("wait for restore");
    let restore_stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(
        output.status.code(),
        Some(0),
        "restore failed: {restore_stderr}"
    );
    let after: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(
        after.len(),
        4,
        "three reads and the end line after restore: {after:?}"
    );
    assert_eq!(after[3], "end");
    for l in before.iter().chain(&after[..3]) {
        assert!(l.contains("tsc_back=0"), "the TSC went backwards: {l}");
        for clock in ["mono", "boot", "raw"] {
            assert!(
                l.contains(&format!("{clock}_back=0")),
                "a monotonic clock ({clock}) went backwards: {l}"
            );
        }
    }
    Reads {
        before,
        after,
        restore_stderr,
    }
}

/// How many times the restored guest exited for syscall `name`.
fn restored_syscall_exits(reads: &Reads, name: &str) -> u64 {
    syscall_exits(&exit_report(&reads.restore_stderr), name)
}

#[test]
fn tsc_and_monotonic_continue_across_restore_onto_a_host_that_is_behind() {
    need_kvm!();
    let reads = checkpoint_and_restore(
        "clocks-behind",
        &[],
        &[("VMCTL_TEST_TSC_AHEAD", "100000000000000")],
    );
    the_tsc_is_trapped_and_clocks_fall_back_to_the_syscall(&reads);
}

/// What a restore onto a host whose TSC is behind must show.
fn the_tsc_is_trapped_and_clocks_fall_back_to_the_syscall(reads: &Reads) {
    // The first read after the restore sees the checkpoint's TSC plus the simulated
    // lead: proof that rdtsc is trapped and offset, not read from this host.
    assert!(
        reads.after[0].contains("tsc_jump=1"),
        "no TSC offset after restore: {}",
        reads.after[0]
    );
    assert!(
        reads.after[1].contains("tsc_jump=0"),
        "the TSC kept jumping: {}",
        reads.after[1]
    );
    assert!(reads.before.iter().all(|l| l.contains("tsc_jump=0")));
    // With rdtsc trapped the vDSO cannot read the TSC: it makes the syscall, which
    // the same clock model serves (three clocks per read, three reads).
    assert_eq!(restored_syscall_exits(reads, "clock_gettime"), 9);
}

#[test]
fn monotonic_clocks_continue_across_restore_without_exits() {
    need_kvm!();
    let reads = checkpoint_and_restore("clocks-vdso", &[], &[]);
    the_clocks_are_read_in_the_vdso_without_exits(&reads);
}

/// What a restore onto a host whose TSC is not behind must show: the restored
/// guest reads its clocks in the vDSO, at CPL3, and never exits for them.
fn the_clocks_are_read_in_the_vdso_without_exits(reads: &Reads) {
    assert_eq!(
        restored_syscall_exits(reads, "clock_gettime"),
        0,
        "{}",
        reads.restore_stderr
    );
    assert!(reads.after.iter().all(|l| !l.contains("tsc_jump=1")));
}

/// The same in a forked child, with its parent waiting for it: both are carried by
/// the checkpoint, and after the restore the child's vDSO reads its clocks without
/// exits.
#[test]
fn a_forked_child_reads_clocks_without_exits_after_a_restore() {
    need_kvm!();
    let reads = checkpoint_and_restore("clocks-fork-vdso", &["fork"], &[]);
    the_clocks_are_read_in_the_vdso_without_exits(&reads);
}

/// Onto a host whose TSC is behind, rdtsc is trapped on the vCPU of every task of a
/// restored job, not only the first one's: the forked child's own rdtsc is offset,
/// and its vDSO falls back to the syscall.
#[test]
fn a_forked_childs_tsc_is_trapped_after_a_restore_onto_a_host_that_is_behind() {
    need_kvm!();
    let reads = checkpoint_and_restore(
        "clocks-fork-behind",
        &["fork"],
        &[("VMCTL_TEST_TSC_AHEAD", "100000000000000")],
    );
    the_tsc_is_trapped_and_clocks_fall_back_to_the_syscall(&reads);
}

/// An interval timer the guest armed keeps firing after a restore: the timers are
/// vmctl's host timers, so a checkpoint must carry them or a guest waiting for its
/// next tick would wait forever.
#[test]
fn interval_timers_survive_checkpoint_and_restore() {
    need_kvm!();
    let tmp = TempDir::new("itimer");
    let dir = tmp.path().join("ck");
    let script = tmp.path().join("ticks.py");
    std::fs::write(
        &script,
        "import signal\nn = [0]\ndef tick(s, f):\n    n[0] += 1\n    print('tick', n[0], flush=True)\n\
         signal.signal(signal.SIGALRM, tick)\nsignal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)\n\
         while n[0] < 6:\n    signal.pause()\nprint('done', n[0], flush=True)\n",
    )
    .unwrap();
    let mut run = Command::new(vmctl_path())
        .args(["run", "--checkpoint-dir"])
        .arg(&dir)
        .args([
            "--on-signal",
            "TERM=checkpoint-exit",
            "--",
            "/usr/bin/python3",
        ])
        .arg(&script)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start vmctl run");
    let mut out = BufReader::new(run.stdout.take().expect("stdout"));
    let first = read_line(&mut out);
    assert_eq!(first, "tick 1");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    let mut before = vec![first];
    loop {
        let l = read_line(&mut out);
        if l.is_empty() {
            break;
        }
        before.push(l);
    }
    assert_eq!(run.wait().unwrap().code(), Some(75), "{before:?}");
    let mut restored = Command::new(vmctl_path())
        .arg("restore")
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmctl restore");
    // Without its timer the guest would pause forever: give it a generous deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while restored.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = restored.kill();
            panic!("the restored guest never got its next timer tick");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let output = restored.wait_with_output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let after = String::from_utf8_lossy(&output.stdout).to_string();
    let all: Vec<String> = before
        .into_iter()
        .chain(after.lines().map(String::from))
        .collect();
    let expected: Vec<String> = (1..=6)
        .map(|i| format!("tick {i}"))
        .chain(["done 6".to_string()])
        .collect();
    assert_eq!(all, expected);
}
