//! The whole job in one VM: shell scripts, process trees, threads, pipes and
//! futexes under `vmctl run`, compared with the same commands run natively, and
//! checkpoints of all of it restored in a fresh vmctl.
//!
//! Tests needing KVM skip locally without it but fail under CI=true (see
//! `require_kvm`); each works in its own temp dir.

use std::process::Command;

use vmwrap_tests::{have, need_kvm, vmctl_path, Invocation, Job, RunOutput, TempDir};
use vmwrap_tests::{EXIT_CHECKPOINTED, PYTHON};

/// tests/fixtures/procs.c: fork, exec, wait, shared memory, threads, dup.
const PROCS: &str = env!("VMWRAP_FIXTURE_PROCS");
/// tests/fixtures/omp_reduce.c: an OpenMP reduction.
const OMP: &str = env!("VMWRAP_FIXTURE_OMP_REDUCE");
const BASH: &str = "/bin/bash";

fn script(dir: &TempDir, interpreter: &str, text: &str) -> Invocation {
    let path = dir.write_file("script", text, 0o755);
    Invocation::new(interpreter).arg(path).cwd(dir.path())
}

#[test]
fn bash_pipelines_subshells_jobs_and_traps_match_native() {
    need_kvm!();
    let dir = TempDir::new("bash");
    let words: String = (0..20000)
        .map(|i| format!("w{}\n", (i * 7919) % 613))
        .collect();
    dir.write_file("words", words, 0o644);
    let out = script(
        &dir,
        BASH,
        r#"set -e
trap 'echo "trap: exiting with $?"' EXIT
for i in 1 2 3; do echo "loop $i"; done | sort -r | head -2
sort words | uniq -c | sort -rn | head -3
x=$(echo sub | tr a-z A-Z); echo "command substitution: $x"
( cd /; echo "subshell in $PWD" ); echo "still in $(basename "$PWD")"
cat <<EOT | wc -l
one
two
EOT
sleep 0.2 & bg=$!
(echo background job; exit 4) & other=$!
wait $bg; echo "sleep: $?"
wait $other || echo "other: $?"
seq 1 8 | xargs -P2 -n1 sh -c 'echo $(( $0 * $0 ))' | sort -n | tr '\n' ' '; echo
echo "pids differ: $([ $$ != $BASHPID ] || echo no) $(sh -c 'echo $PPID' | grep -qx $$ && echo yes)"
f() { return 3; }
if ! f; then echo "function status $?"; fi
false | true; echo "pipeline status $? ${PIPESTATUS[*]}"
echo "last"
"#,
    )
    .compare();
    assert!(out.stdout_str().contains("trap: exiting with 0"), "{out:?}");
}

#[test]
fn fork_exec_wait_and_copy_on_write_match_native() {
    need_kvm!();
    let dir = TempDir::new("procs");
    for mode in ["cow", "exec", "wait", "shared"] {
        let out = Invocation::new(PROCS).arg(mode).cwd(dir.path()).compare();
        assert_eq!(out.code, 0, "procs {mode}: {out:?}");
    }
    let cow = Invocation::new(PROCS).arg("cow").run_vm();
    assert!(
        cow.stdout_str()
            .starts_with("child saw only its own writes, parent's pages private"),
        "{cow:?}"
    );
    let exec = Invocation::new(PROCS).arg("exec").run_vm();
    assert!(
        exec.stdout_str().contains("reading the old mapping faults"),
        "{exec:?}"
    );
}

#[test]
fn execve_of_a_script_and_exit_statuses_match_native() {
    need_kvm!();
    let dir = TempDir::new("exec-script");
    dir.write_file(
        "child.sh",
        "#!/bin/sh\necho \"script got $1\"\nexit 5\n",
        0o755,
    );
    script(
        &dir,
        BASH,
        r#"./child.sh arg; echo "status $?"
sh -c 'kill -TERM $$'; echo "killed: $?"
exec ./child.sh replaced
"#,
    )
    .compare();
}

#[test]
fn pthreads_and_openmp_match_native() {
    need_kvm!();
    let dir = TempDir::new("threads");
    let out = Invocation::new(PROCS)
        .arg("threads")
        .stdin("x")
        .cwd(dir.path())
        .compare();
    assert!(out.stdout_str().contains("waiter 1 woke"), "{out:?}");
    for threads in ["1", "2"] {
        let out = Invocation::new(OMP)
            .arg("20000000")
            .env("OMP_NUM_THREADS", threads)
            .compare();
        assert!(
            out.stdout_str().starts_with(&format!("threads {threads} ")),
            "{out:?}"
        );
    }
}

#[test]
fn openmp_uses_every_cpu_it_is_given() {
    need_kvm!();
    // Without OMP_NUM_THREADS, libgomp sizes its pool from sched_getaffinity:
    // the guest sees the CPUs vmctl may run on, as the program would natively.
    let out = Invocation::new(OMP).arg("1000").compare();
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    assert!(
        out.stdout_str().starts_with(&format!("threads {cpus} ")),
        "{out:?}"
    );
}

#[test]
fn python_threads_subprocesses_and_pools_match_native() {
    need_kvm!();
    if !have(PYTHON) {
        return;
    }
    let dir = TempDir::new("python");
    script(
        &dir,
        PYTHON,
        r#"
import concurrent.futures, multiprocessing as mp, queue, subprocess, threading

def square(x):
    return x * x

if __name__ == "__main__":
    q, out, lock = queue.Queue(), [], threading.Lock()
    cond = threading.Condition()
    def worker(n):
        for i in range(2000):
            with lock:
                out.append(i)
        with cond:
            cond.notify_all()
        q.put(n)
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    print(len(out), sorted(q.get() for _ in range(4)))
    r = subprocess.run(["echo", "hi"], capture_output=True, text=True)
    print(r.stdout.strip(), r.returncode)
    p = subprocess.Popen(["sort"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    print(p.communicate("b\na\nc\n")[0].split())
    print(subprocess.run("exit 3", shell=True).returncode)
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        print(sum(ex.map(square, range(100))))
    with concurrent.futures.ProcessPoolExecutor(2) as ex:
        print(sum(ex.map(square, range(100))))
    with mp.Pool(2) as pool:
        print(sum(pool.map(square, range(1000))))
"#,
    )
    .compare();
}

#[test]
fn make_j2_builds_a_c_project_like_natively() {
    need_kvm!();
    if !have("/usr/bin/make") || !have("/usr/bin/gcc") {
        return;
    }
    let build = |dir: &TempDir| {
        for i in 1..=4 {
            dir.write_file(
                &format!("f{i}.c"),
                format!("int f{i}(void) {{ return {i}; }}\n"),
                0o644,
            );
        }
        dir.write_file(
            "main.c",
            "#include <stdio.h>\nint f1(void), f2(void), f3(void), f4(void);\nint main(void) { printf(\"%d\\n\", f1() + f2() + f3() + f4()); return 0; }\n",
            0o644,
        );
        dir.write_file(
            "Makefile",
            "app: main.o f1.o f2.o f3.o f4.o\n\tgcc -o $@ $^\n%.o: %.c\n\tgcc -O2 -c $<\n",
            0o644,
        );
    };
    let native = TempDir::new("make-native");
    let vm = TempDir::new("make-vm");
    build(&native);
    build(&vm);
    let n = Invocation::new("make")
        .args(["-j2", "-s"])
        .cwd(native.path())
        .run_native();
    let v = Invocation::new("make")
        .args(["-j2", "-s"])
        .cwd(vm.path())
        .run_vm();
    assert_eq!((n.code, v.code), (0, 0), "native {n:?}\nvm {v:?}");
    let run = |dir: &TempDir| {
        Command::new(dir.join("app"))
            .output()
            .expect("run the built program")
            .stdout
    };
    assert_eq!(run(&native), b"10\n");
    assert_eq!(run(&vm), b"10\n");
}

#[test]
fn a_fork_bomb_gets_eagain_and_the_job_reports_its_own_status() {
    need_kvm!();
    let dir = TempDir::new("bomb");
    // The script ends with its own status once fork fails; the children it made
    // are ended by the signal it sends its process group.
    let out = script(
        &dir,
        PYTHON,
        r#"
import os, signal, sys
kids = []
try:
    for _ in range(100000):
        pid = os.fork()
        if pid == 0:
            signal.pause()
            os._exit(0)
        kids.append(pid)
except OSError as e:
    print("fork failed with", "EAGAIN" if e.errno == 11 else e.errno, flush=True)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.killpg(0, signal.SIGTERM)
for k in kids:
    os.waitpid(k, 0)
sys.exit(7)
"#,
    )
    .run_vm();
    assert_eq!(out.code, 7, "{out:?}");
    assert!(
        out.stdout_str().contains("fork failed with EAGAIN"),
        "{out:?}"
    );
}

#[test]
fn signals_reach_processes_and_threads_of_the_job() {
    need_kvm!();
    if !have(PYTHON) {
        return;
    }
    let dir = TempDir::new("signals");
    script(
        &dir,
        PYTHON,
        r#"
import os, signal, threading, time, subprocess
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append("USR1"))
os.kill(os.getpid(), signal.SIGUSR1)
print("to itself:", got)
child = subprocess.Popen(["sleep", "30"])
child.send_signal(signal.SIGTERM)
print("child:", child.wait())
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    signal.signal(signal.SIGHUP, lambda s, f: (os.write(w, b"hup\n"), os._exit(0)))
    os.write(w, b"ready\n")
    while True:
        signal.pause()
os.close(w)
f = os.fdopen(r)
print(f.readline().strip())
os.kill(pid, signal.SIGHUP)
print(f.readline().strip(), os.waitpid(pid, 0)[1])
ev = threading.Event()
def sleeper():
    ev.wait(30)
t = threading.Thread(target=sleeper)
t.start()
signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
ev.set()
t.join()
print("after pthread_kill:", got)
signal.signal(signal.SIGCHLD, lambda s, f: got.append("CHLD"))
subprocess.run(["true"])
print("sigchld:", "CHLD" in got)
"#,
    )
    .compare();
}

#[test]
fn an_orphan_gets_its_parent_death_signal() {
    need_kvm!();
    if !have(PYTHON) {
        return;
    }
    let dir = TempDir::new("pdeathsig");
    script(
        &dir,
        PYTHON,
        r#"
import ctypes, os, signal
PR_SET_PDEATHSIG = 1
report_r, report_w = os.pipe()
armed_r, armed_w = os.pipe()
middle = os.fork()
if middle == 0:
    if os.fork() == 0:
        signal.signal(signal.SIGUSR1, lambda s, f: (os.write(report_w, b"orphan got SIGUSR1\n"), os._exit(0)))
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGUSR1)
        os.write(armed_w, b"x")
        while True:
            signal.pause()
    os.read(armed_r, 1)
    os._exit(0)
os.close(report_w)
os.waitpid(middle, 0)
print(os.read(report_r, 100).decode().strip())
"#,
    )
    .compare();
}

#[test]
fn working_directory_and_umask_belong_to_each_process() {
    need_kvm!();
    let dir = TempDir::new("cwd");
    std::fs::create_dir(dir.join("a")).unwrap();
    std::fs::create_dir(dir.join("b")).unwrap();
    script(
        &dir,
        BASH,
        r#"(cd a && umask 077 && touch in-a && { pwd | sed "s|.*/||"; stat -c %a in-a; } > ../bg.txt) &
cd b; umask 022; touch in-b; stat -c %a in-b; wait; cat ../bg.txt; pwd | sed "s|.*/||"; ls ../a
"#,
    )
    .compare();
}

/// Runs `program ARGS` under `vmctl run --checkpoint-dir`, waits for `marker` on
/// its stdout, checkpoints it with SIGTERM, restores it in a fresh vmctl with
/// `stdin`, and returns everything it printed (both halves).
fn checkpointed_run(
    dir: &TempDir,
    program: &str,
    args: &[&str],
    marker: &str,
    stdin: &[u8],
) -> String {
    let ckpt = dir.join("ckpt");
    let argv: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|a| a as _).collect();
    let mut job = Job::run(
        dir.path(),
        &ckpt,
        &["--on-signal", "TERM=checkpoint-exit"],
        program,
        &argv,
    );
    job.wait_for(marker);
    job.signal(libc::SIGTERM);
    let first = job.finish();
    assert_eq!(first.code, EXIT_CHECKPOINTED, "checkpoint:\n{first:?}");
    let mut restore = Job::restore(dir.path(), &ckpt, &[]);
    restore.send(stdin);
    let second = restore.finish();
    assert_eq!(second.code, 0, "restore:\n{second:?}");
    first.stdout_str() + &second.stdout_str()
}

fn native(program: &str, args: &[&str], dir: &TempDir, stdin: &[u8]) -> RunOutput {
    let out = Invocation::new(program)
        .args(args)
        .stdin(stdin)
        .cwd(dir.path())
        .run_native();
    assert_eq!(out.code, 0, "native run: {out:?}");
    out
}

#[test]
fn pipeline_with_data_in_flight_is_checkpointed_and_restored() {
    need_kvm!();
    let dir = TempDir::new("ckpt-pipe");
    // seq fills the pipe (more than its 64 KiB) and blocks; the reader waits for a
    // line on stdin before draining it: the checkpoint holds bytes in flight.
    let text = r#"exec 3<&0
echo "before the pipeline"
seq 1 30000 | { echo "reader waiting"; read go <&3; awk '{ s += $1 } END { print "sum", s, NR }'; }
echo "after the pipeline"
"#;
    let path = dir.write_file("pipe.sh", text, 0o755);
    let path = path.to_str().unwrap();
    let want = native(BASH, &[path], &dir, b"go\n");
    let got = checkpointed_run(&dir, BASH, &[path], "reader waiting", b"go\n");
    assert_eq!(got, want.stdout_str());
}

#[test]
fn threads_computing_and_waiting_are_checkpointed_and_restored() {
    need_kvm!();
    let dir = TempDir::new("ckpt-threads");
    let want = native(PROCS, &["threads"], &dir, b"x");
    let got = checkpointed_run(&dir, PROCS, &["threads"], "threads running", b"x");
    assert_eq!(got, want.stdout_str());
}

#[test]
fn shell_script_in_its_third_of_five_commands_resumes_there() {
    need_kvm!();
    let dir = TempDir::new("ckpt-script");
    dir.write_file("log", "", 0o644);
    let text = r#"exec 3<&0
count=0
for stage in 1 2 3 4 5; do
  count=$((count + stage))
  echo "stage $stage starts (count $count)" | tee -a log
  if [ $stage = 3 ]; then
    sh -c 'echo "stage 3 child waiting"; read go <&3; echo "stage 3 child done"'
  fi
  echo "stage $stage done" >> log
done
echo "log has $(wc -l < log) lines, count $count"
"#;
    let path = dir.write_file("stages.sh", text, 0o755);
    let path = path.to_str().unwrap();
    let want = native(BASH, &[path], &dir, b"go\n");
    dir.write_file("log", "", 0o644);
    let got = checkpointed_run(&dir, BASH, &[path], "stage 3 child waiting", b"go\n");
    assert_eq!(got, want.stdout_str());
    assert!(got.contains("log has 10 lines, count 15"), "{got}");
}

#[test]
fn python_pool_at_work_is_checkpointed_and_restored() {
    need_kvm!();
    if !have(PYTHON) {
        return;
    }
    let dir = TempDir::new("ckpt-pool");
    let text = r#"
import multiprocessing as mp, sys

def work(x):
    s = 0
    for i in range(200000):
        s += (i * x) % 7
    return s

if __name__ == "__main__":
    with mp.Pool(2) as pool:
        first = sum(pool.map(work, range(40)))
        print("first batch", first, flush=True)
        sys.stdin.readline()
        print("second batch", sum(pool.map(work, range(40, 80))), flush=True)
"#;
    let path = dir.write_file("pool.py", text, 0o644);
    let path = path.to_str().unwrap();
    let want = native(PYTHON, &[path], &dir, b"go\n");
    let got = checkpointed_run(&dir, PYTHON, &[path], "first batch", b"go\n");
    assert_eq!(got, want.stdout_str());
}

#[test]
fn descriptors_made_with_dup_share_their_offset_after_restore() {
    need_kvm!();
    let dir = TempDir::new("ckpt-dup");
    // Both descriptors write to one regular file: after a restore they must still
    // share one offset, or the second half overwrites itself.
    let out = dir.join("out.txt");
    let cmd = format!("exec > {} && exec {PROCS} dup 40", out.display());
    let want_dir = TempDir::new("ckpt-dup-native");
    let want_out = want_dir.join("out.txt");
    let want_cmd = format!("exec > {} && exec {PROCS} dup 40", want_out.display());
    native("/bin/sh", &["-c", &want_cmd], &want_dir, b"x");
    let ckpt = dir.join("ckpt");
    let job = Job::run(
        dir.path(),
        &ckpt,
        &["--on-signal", "TERM=checkpoint-exit"],
        "/bin/sh",
        &[&"-c", &cmd],
    );
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&out)
        .unwrap_or_default()
        .lines()
        .count()
        < 20
    {
        assert!(
            start.elapsed() < vmwrap_tests::STEP,
            "the job wrote no 20 lines"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    job.signal(libc::SIGTERM);
    assert_eq!(job.finish().code, EXIT_CHECKPOINTED);
    let mut restore = Job::restore(dir.path(), &ckpt, &[]);
    restore.send(b"x");
    assert_eq!(restore.finish().code, 0);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        std::fs::read_to_string(&want_out).unwrap()
    );
}

#[test]
fn a_version_1_checkpoint_is_refused_with_both_versions_named() {
    need_kvm!();
    let dir = TempDir::new("v1");
    let gen = dir.join("ck/gen-000001");
    std::fs::create_dir_all(&gen).unwrap();
    // SAFETY: chmod on our own directory.
    std::fs::set_permissions(
        dir.join("ck"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let manifest = br#"{"format_version": 1, "kernel": {}}"#;
    std::fs::write(gen.join("manifest.json"), manifest).unwrap();
    let crc = {
        let mut c = 0xffff_ffffu32;
        for &b in manifest.iter() {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xedb8_8320
                } else {
                    c >> 1
                };
            }
        }
        !c
    };
    std::fs::write(
        gen.join("manifest.sum"),
        format!("crc32 {crc:08x} manifest.json\n"),
    )
    .unwrap();
    let out = Command::new(vmctl_path())
        .arg("restore")
        .arg(dir.join("ck"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("checkpoint format 1") && err.contains("reads formats 2 to 4"),
        "{err}"
    );
}
