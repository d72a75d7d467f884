//! Shared helpers for the integration tests.
//!
//! This crate is the package's library, so it cannot use the package's
//! dev-dependencies: what it needs (libc, serde_json, crc32fast) is a dependency.

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub mod checkpoint_dir;
pub mod slurm;

/// Paths of the C test programs built by build.rs.
pub mod fixtures {
    pub const COMPUTE_STATIC: &str = env!("VMWRAP_FIXTURE_COMPUTE_STATIC");
    pub const COMPUTE_STATIC_PIE: &str = env!("VMWRAP_FIXTURE_COMPUTE_STATIC_PIE");
    pub const COMPUTE_PIE: &str = env!("VMWRAP_FIXTURE_COMPUTE_PIE");
    pub const COMPUTE_NOPIE: &str = env!("VMWRAP_FIXTURE_COMPUTE_NOPIE");
    pub const SEGV: &str = env!("VMWRAP_FIXTURE_SEGV");
    pub const ABORT: &str = env!("VMWRAP_FIXTURE_ABORT");
    pub const EXITCODE: &str = env!("VMWRAP_FIXTURE_EXITCODE");
    pub const SYSCALLS: &str = env!("VMWRAP_FIXTURE_SYSCALLS");
    pub const SYSCALLS_STATIC: &str = env!("VMWRAP_FIXTURE_SYSCALLS_STATIC");
    pub const CPULOOP: &str = env!("VMWRAP_FIXTURE_CPULOOP");
    pub const GETPPID_LOOP: &str = env!("VMWRAP_FIXTURE_GETPPID_LOOP");
    /// `hotset OUTFILE MIB HOT_KIB ROUNDS`: fills MIB, then rewrites a hot set of
    /// HOT_KIB each round, one stdin byte a round (tests/fixtures/hotset.c).
    pub const HOTSET: &str = env!("VMWRAP_FIXTURE_HOTSET");
}

/// Debian's interpreter: `python3` on PATH may be a pyenv shim (a bash script
/// that forks).
pub const PYTHON: &str = "/usr/bin/python3";

/// Exit status of `vmctl run`/`restore` after `--on-signal SIG=checkpoint-exit`.
pub const EXIT_CHECKPOINTED: i32 = 75;
/// Exit status when vmctl itself failed (refused checkpoint, no running vmctl, ...).
pub const EXIT_VMCTL_FAILED: i32 = 125;

/// Root of the workspace (where Cargo.toml and target/ live).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The vmctl binary under test: `$VMCTL`, else target/release/vmctl, else
/// target/debug/vmctl. The tests never build it themselves.
///
/// The result is absolute because children run with their own cwd, and a
/// relative program path would then be resolved against that cwd.
pub fn vmctl_path() -> PathBuf {
    if let Some(p) = std::env::var_os("VMCTL").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        let abs = if p.is_absolute() {
            p
        } else {
            std::env::current_dir().unwrap().join(p)
        };
        assert!(
            abs.is_file(),
            "VMCTL={} does not exist (build it with `cargo build --release -p vmctl`)",
            abs.display()
        );
        return abs;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        workspace_root().join(target)
    };
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("vmctl");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "vmctl not found: set VMCTL or build it (`cargo build --release -p vmctl`); looked in {}/{{release,debug}}",
        target.display()
    );
}

/// Whether this process can use KVM: /dev/kvm must open read-write (being
/// root is not enough inside a container without the device, and a member of
/// the kvm group needs no root).
pub fn kvm_available() -> Result<(), String> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("cannot open /dev/kvm read-write: {e}"))
}

/// True when running under CI, where a missing prerequisite must fail the
/// test instead of silently skipping it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Call at the top of every test that starts a VM: returns false (after
/// printing why) when the test should be skipped locally, and panics under CI
/// so an unusable KVM can never make a CI run look green.
pub fn require_kvm() -> bool {
    match kvm_available() {
        Ok(()) => true,
        Err(why) if in_ci() => panic!("KVM is required under CI=true: {why}"),
        Err(why) => {
            eprintln!("SKIPPED: {why} (set CI=true to make this a failure)");
            false
        }
    }
}

/// Skips (locally) or fails (CI) the calling test when KVM is unusable: see
/// [`require_kvm`].
#[macro_export]
macro_rules! need_kvm {
    () => {
        if !$crate::require_kvm() {
            return;
        }
    };
}

/// Finds a program on $PATH like a shell would.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Result of running a program to completion.
#[derive(Clone, PartialEq, Eq)]
pub struct RunOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Exit status as a shell reports it: the exit code, or 128+N when
    /// killed by signal N (the same convention vmctl uses).
    pub code: i32,
}

impl RunOutput {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

impl std::fmt::Debug for RunOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code {}\n--- stdout ({} bytes) ---\n{}\n--- stderr ({} bytes) ---\n{}",
            self.code,
            self.stdout.len(),
            preview(&self.stdout),
            self.stderr.len(),
            preview(&self.stderr)
        )
    }
}

fn preview(bytes: &[u8]) -> String {
    const MAX: usize = 4000;
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]).into_owned();
    if bytes.len() > MAX {
        format!("{s}\n[... {} more bytes]", bytes.len() - MAX)
    } else {
        s
    }
}

/// Maps a wait status to the shell convention (128+signal).
pub fn status_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => panic!("unexpected wait status {status:?}"),
    }
}

/// One program invocation, run either natively or under `vmctl run`, so the
/// two runs are guaranteed to get the same argv, env, cwd and stdin.
#[derive(Clone, Debug)]
pub struct Invocation {
    pub program: OsString,
    pub args: Vec<OsString>,
    pub stdin: Vec<u8>,
    pub cwd: Option<PathBuf>,
    pub env: Vec<(OsString, OsString)>,
    pub timeout: Duration,
}

impl Invocation {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        let secs = std::env::var("VMWRAP_TEST_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300);
        Invocation {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            stdin: Vec::new(),
            cwd: None,
            env: Vec::new(),
            timeout: Duration::from_secs(secs),
        }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = data.into();
        self
    }

    pub fn cwd(mut self, dir: impl AsRef<Path>) -> Self {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    /// Overrides the default of $VMWRAP_TEST_TIMEOUT or 300 seconds.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.env
            .push((k.as_ref().to_owned(), v.as_ref().to_owned()));
        self
    }

    /// Runs the program directly on the host.
    pub fn run_native(&self) -> RunOutput {
        self.execute(Command::new(&self.program))
    }

    /// Runs the program as `vmctl run [VMCTL_OPTS...] -- PROGRAM ARGS...`.
    pub fn run_vm_with(&self, vmctl_opts: &[&str]) -> RunOutput {
        let mut cmd = Command::new(vmctl_path());
        cmd.arg("run").args(vmctl_opts).arg("--").arg(&self.program);
        self.execute(cmd)
    }

    pub fn run_vm(&self) -> RunOutput {
        self.run_vm_with(&[])
    }

    /// Runs natively and in the VM and asserts identical stdout, stderr and
    /// exit status. Returns the (common) output for further checks.
    pub fn compare(&self) -> RunOutput {
        let native = self.run_native();
        let vm = self.run_vm();
        assert_same(&self.describe(), &native, &vm);
        native
    }

    pub fn describe(&self) -> String {
        let mut s = self.program.to_string_lossy().into_owned();
        for a in &self.args {
            let a = a.to_string_lossy();
            if a.len() > 60 {
                let cut = a.char_indices().nth(60).map_or(a.len(), |(i, _)| i);
                write!(s, " '{}...'", &a[..cut]).unwrap();
            } else {
                write!(s, " '{a}'").unwrap();
            }
        }
        s
    }

    fn execute(&self, mut cmd: Command) -> RunOutput {
        cmd.args(&self.args);
        if let Some(dir) = &self.cwd {
            // A shell keeps PWD in step with the cwd; programs (and the
            // syscalls fixture) rely on that.
            cmd.current_dir(dir).env("PWD", dir);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        run_command(cmd, &self.stdin, self.timeout)
    }
}

/// Runs a fully prepared command to completion, feeding it `stdin` and
/// killing it after `timeout`. For tests that need more control than
/// [`Invocation`] gives (e.g. passing extra file descriptors).
pub fn run_command(mut cmd: Command, stdin: &[u8], timeout: Duration) -> RunOutput {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{:?}", cmd);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));

    // Feed stdin and drain both pipes on threads: any of the three can
    // fill up and block the child while we wait on another.
    let mut pipe = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        // EPIPE just means the program did not read all its input.
        let _ = pipe.write_all(&data);
    });
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            r.read_to_end(&mut buf).map(|_| buf)
        })
    };
    let out = reader(Box::new(child.stdout.take().unwrap()));
    let err = reader(Box::new(child.stderr.take().unwrap()));

    // A hung VM must fail the test, not hang the whole suite.
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let (status, timed_out) = match rx.recv_timeout(timeout) {
        Ok(s) => (s, false),
        Err(_) => {
            // The waiter thread owns the Child, so kill by pid; it has
            // not been reaped yet, so the pid cannot have been reused.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            (rx.recv().unwrap(), true)
        }
    };
    let status = status.unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
    writer.join().unwrap();
    let output = RunOutput {
        stdout: out.join().unwrap().expect("reading stdout"),
        stderr: err.join().unwrap().expect("reading stderr"),
        code: status_code(status),
    };
    assert!(
        !timed_out,
        "{what} timed out after {timeout:?} and was killed:\n{output:?}"
    );
    output
}

/// Runs `cmd args` natively with the given stdin and cwd.
pub fn run_native(cmd: &str, args: &[&str], stdin: &[u8], cwd: &Path) -> RunOutput {
    Invocation::new(cmd)
        .args(args)
        .stdin(stdin)
        .cwd(cwd)
        .run_native()
}

/// Runs `vmctl run -- cmd args` with the given stdin and cwd.
pub fn run_vm(cmd: &str, args: &[&str], stdin: &[u8], cwd: &Path) -> RunOutput {
    Invocation::new(cmd)
        .args(args)
        .stdin(stdin)
        .cwd(cwd)
        .run_vm()
}

/// Asserts two runs are identical, showing where they first differ.
pub fn assert_same(what: &str, native: &RunOutput, vm: &RunOutput) {
    let mut report = String::new();
    if native.code != vm.code {
        writeln!(
            report,
            "exit status differs: native {} vs vm {}",
            native.code, vm.code
        )
        .unwrap();
    }
    for (name, a, b) in [
        ("stdout", &native.stdout, &vm.stdout),
        ("stderr", &native.stderr, &vm.stderr),
    ] {
        if a != b {
            report.push_str(&diff(name, a, b));
        }
    }
    if !report.is_empty() {
        panic!(
            "native and `vmctl run` differ for {what}:\n{report}\n\
             ===== native =====\n{native:?}\n===== vm =====\n{vm:?}"
        );
    }
}

/// A compact line diff around the first difference. The outputs compared
/// here can be megabytes (sort, sha256 input), so a full LCS diff is avoided.
pub fn diff(name: &str, native: &[u8], vm: &[u8]) -> String {
    const CONTEXT: usize = 3;
    const SHOWN: usize = 12;
    let a: Vec<&[u8]> = native.split_inclusive(|&b| b == b'\n').collect();
    let b: Vec<&[u8]> = vm.split_inclusive(|&b| b == b'\n').collect();
    let first = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut s = format!(
        "{name} differs ({} vs {} bytes, {} vs {} lines), first at line {}:\n",
        native.len(),
        vm.len(),
        a.len(),
        b.len(),
        first + 1
    );
    let start = first.saturating_sub(CONTEXT);
    for line in &a[start..first] {
        writeln!(s, "   {}", show_line(line)).unwrap();
    }
    for line in a.iter().skip(first).take(SHOWN) {
        writeln!(s, "-n {}", show_line(line)).unwrap();
    }
    for line in b.iter().skip(first).take(SHOWN) {
        writeln!(s, "+v {}", show_line(line)).unwrap();
    }
    s
}

fn show_line(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    match text.strip_suffix('\n') {
        Some(t) => t.escape_debug().to_string(),
        None => format!("{}⏎(no newline)", text.escape_debug()),
    }
}

/// A per-test scratch directory, removed on drop, so tests can run in
/// parallel without sharing files. Lives under $VMWRAP_TEST_TMPDIR, or the
/// system temp dir.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let base = std::env::var_os("VMWRAP_TEST_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        fs::create_dir_all(&base).unwrap();
        // Canonical so that getcwd() in the child equals the PWD we pass.
        let base = fs::canonicalize(&base).unwrap();
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("vmwrap-test-{}-{name}-{n}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => return TempDir { path },
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create {}: {e}", path.display()),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }

    /// Writes a file and returns its path; `mode` like chmod.
    pub fn write_file(&self, name: &str, contents: impl AsRef<[u8]>, mode: u32) -> PathBuf {
        let p = self.join(name);
        fs::write(&p, contents).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Deterministic xorshift64 generator for test data, so inputs are identical
/// on every run without storing them in the repository.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Calls `f` until it returns Some, failing the test after `timeout`.
pub fn poll_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn assert_bytes_eq(what: &str, expected: &[u8], actual: &[u8]) {
    if expected != actual {
        panic!("{what}: {}", diff("output", expected, actual));
    }
}

pub fn assert_file_eq(what: &str, expected: &Path, actual: &Path) {
    let (e, a) = (fs::read(expected).unwrap(), fs::read(actual).unwrap());
    assert!(
        e == a,
        "{what}: {} ({} bytes) differs from {} ({} bytes)",
        actual.display(),
        a.len(),
        expected.display(),
        e.len()
    );
}

pub fn assert_contains(what: &str, haystack: &str, needles: &[&str]) {
    for n in needles {
        assert!(
            haystack.contains(n),
            "{what} does not mention {n:?}:\n{haystack}"
        );
    }
}

/// The part of `text` from its first line starting with `prefix`.
pub fn tail_from<'a>(text: &'a str, prefix: &str) -> &'a str {
    let at = if text.starts_with(prefix) {
        0
    } else {
        text.find(&format!("\n{prefix}"))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{text}"))
            + 1
    };
    &text[at..]
}

/// The `vmctl: exits {..}` report vmctl prints on stderr with VMCTL_COUNT_EXITS=1.
pub fn exit_report(stderr: &str) -> serde_json::Value {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("vmctl: exits "))
        .unwrap_or_else(|| panic!("no exit report in: {stderr}"));
    serde_json::from_str(line).expect("exit report is JSON")
}

/// How many times the guest exited for syscall `name` in an [`exit_report`]
/// (0 when it is absent).
pub fn syscall_exits(report: &serde_json::Value, name: &str) -> u64 {
    report["syscalls"][name].as_u64().unwrap_or(0)
}

/// The lowest descriptor number from `from` on that this process has not open.
pub fn unused_fd(from: RawFd) -> RawFd {
    (from..)
        .find(|fd| !Path::new(&format!("/proc/self/fd/{fd}")).exists())
        .unwrap()
}

/// /dev/kvm opened read-write, as a privileged launcher (the Slurm plugin)
/// opens it for vmctl.
pub fn open_dev_kvm() -> fs::File {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .unwrap()
}

/// `vmctl run --kvm-fd N` with `kvm` open at N in vmctl, as a privileged
/// launcher (the Slurm plugin) hands it over; returns the command, to which the
/// caller adds `-- PROGRAM ARGS...`, and N.
pub fn vmctl_run_with_kvm_fd(kvm: RawFd) -> (Command, RawFd) {
    let mut cmd = Command::new(vmctl_path());
    let target = hand_over_fd(&mut cmd, kvm);
    cmd.args(["run", "--kvm-fd", &target.to_string()]);
    (cmd, target)
}

/// Makes `fd` open in the process `cmd` starts, at a descriptor number this
/// process has free, as a privileged launcher hands vmctl its /dev/kvm; returns
/// that number (for `--kvm-fd`).
pub fn hand_over_fd(cmd: &mut Command, fd: RawFd) -> RawFd {
    let target = unused_fd(200);
    // SAFETY: dup2 is async-signal-safe, as pre_exec requires; the new fd is
    // not close-on-exec, so it survives into the program.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    target
}

/// Whether a program a test needs is installed; says so when it is not, so the
/// caller can skip the test.
pub fn have(program: &str) -> bool {
    let ok = Path::new(program).is_file();
    if !ok {
        eprintln!("SKIPPED: {program} is not installed");
    }
    ok
}

/// How long any one step of a [`Job`] (a line of output, its exit) may take before
/// the test fails. Only a limit: nothing waits for it to pass.
pub const STEP: Duration = Duration::from_secs(120);

/// A vmctl process (run or restore) still going: its stdin stays open until
/// it exits, and its output is collected as it comes so the test can wait for
/// a line. Killed if the test fails while it runs.
pub struct Job {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    done: bool,
}

fn collect(mut from: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 1 << 16];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

impl Job {
    pub fn spawn(cmd: Command) -> Job {
        Job::spawn_with_stdout(cmd, Stdio::piped())
    }

    /// Like `spawn`, with the job's standard output going to `stdout` (a file,
    /// as under Slurm) instead of to the test.
    pub fn spawn_with_stdout(mut cmd: Command, stdout: Stdio) -> Job {
        cmd.stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(Stdio::piped());
        let what = format!("{cmd:?}");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut readers = vec![collect(child.stderr.take().unwrap(), stderr.clone())];
        if let Some(out) = child.stdout.take() {
            readers.push(collect(out, stdout.clone()));
        }
        Job {
            what,
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            readers,
            done: false,
        }
    }

    /// `vmctl run --checkpoint-dir CKPT OPTS... -- PROGRAM ARGS...` in `cwd`.
    pub fn run(
        cwd: &Path,
        ckpt: &Path,
        opts: &[&str],
        program: &str,
        args: &[&dyn AsRef<OsStr>],
    ) -> Job {
        let mut cmd = Command::new(vmctl_path());
        cmd.arg("run")
            .arg("--checkpoint-dir")
            .arg(ckpt)
            .args(opts)
            .arg("--")
            .arg(program)
            .args(args.iter().map(|a| a.as_ref()))
            .current_dir(cwd);
        Job::spawn(cmd)
    }

    /// `vmctl restore CKPT OPTS...` in `cwd`.
    pub fn restore(cwd: &Path, ckpt: &Path, opts: &[&str]) -> Job {
        let mut cmd = Command::new(vmctl_path());
        cmd.arg("restore").arg(ckpt).args(opts).current_dir(cwd);
        Job::spawn(cmd)
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits until stdout has a line starting with `prefix`; fails at once if
    /// the process exits first.
    pub fn wait_for(&mut self, prefix: &str) {
        let start = Instant::now();
        loop {
            let out = self.stdout();
            if out.starts_with(prefix) || out.contains(&format!("\n{prefix}")) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the readers drain the pipes before reporting.
                for r in std::mem::take(&mut self.readers) {
                    r.join().unwrap();
                }
                self.done = true;
                panic!(
                    "{} exited with {} before printing {prefix:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.what,
                    status_code(status),
                    self.stdout(),
                    self.stderr()
                );
            }
            assert!(
                start.elapsed() < STEP,
                "{} printed no {prefix:?} within {STEP:?}\n--- stdout ---\n{out}\n--- stderr ---\n{}",
                self.what,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Lets the program go on: writes `data` to its stdin.
    pub fn send(&mut self, data: &[u8]) {
        let pipe = self.stdin.as_mut().expect("stdin is open");
        pipe.write_all(data).unwrap();
        pipe.flush().unwrap();
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, which has not been reaped (we
        // hold its Child), so the pid cannot have been reused.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Waits for the process to exit (stdin stays open until then, so a
    /// program blocked on it is not woken by EOF) and returns its output.
    pub fn finish(mut self) -> RunOutput {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > STEP {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.done = true;
                panic!(
                    "{} did not exit within {STEP:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.what,
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        self.done = true;
        self.stdin = None;
        for r in std::mem::take(&mut self.readers) {
            r.join().unwrap();
        }
        RunOutput {
            stdout: std::mem::take(&mut *self.stdout.lock().unwrap()),
            stderr: std::mem::take(&mut *self.stderr.lock().unwrap()),
            code: status_code(status),
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_signal_death_maps_to_128_plus_signal() {
        let dir = TempDir::new("selftest-signal");
        let out = run_native("/bin/sh", &["-c", "kill -SEGV $$"], b"", dir.path());
        assert_eq!(out.code, 139);
        let out = run_native("/bin/sh", &["-c", "exit 42"], b"", dir.path());
        assert_eq!(out.code, 42);
    }

    #[test]
    fn stdin_cwd_and_pwd_reach_the_program() {
        let dir = TempDir::new("selftest-io");
        let out = run_native(
            "/bin/sh",
            &["-c", "cat; pwd -P; echo \"$PWD\""],
            b"in\n",
            dir.path(),
        );
        let cwd = dir.path().to_str().unwrap();
        assert_eq!(out.stdout_str(), format!("in\n{cwd}\n{cwd}\n"));
    }

    #[test]
    fn timeout_kills_the_program() {
        let r = std::panic::catch_unwind(|| {
            Invocation::new("/bin/sh")
                .args(["-c", "exec tail -f /dev/null"])
                .with_timeout(Duration::from_millis(300))
                .run_native()
        });
        let msg = *r.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("timed out"), "{msg}");
    }

    #[test]
    fn diff_points_at_first_difference() {
        let d = diff("stdout", b"a\nb\nc\nd\n", b"a\nb\nX\nd\n");
        assert!(d.contains("first at line 3"), "{d}");
        assert!(d.contains("-n c") && d.contains("+v X"), "{d}");
    }

    #[test]
    fn temp_dir_is_removed_on_drop() {
        let dir = TempDir::new("selftest-drop");
        let p = dir.write_file("f", "x", 0o600);
        assert!(p.exists());
        let root = dir.path().to_path_buf();
        drop(dir);
        assert!(!root.exists());
    }
}
