//! `vmctl run` end to end: each test runs a program natively and inside the
//! VM and requires identical stdout, stderr and exit status, plus the error
//! cases of vmctl's exit-status contract (125/126/127).
//!
//! Tests needing KVM skip locally without it but fail under CI=true (see
//! `require_kvm`). Each test works in its own temp dir so the default
//! parallel test runner is safe.

use std::fs;
use std::io::{BufWriter, Write};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use vmwrap_tests::{fixtures, need_kvm, run_command, vmctl_path, Invocation, Rng, TempDir, PYTHON};
use vmwrap_tests::{open_dev_kvm, unused_fd, vmctl_run_with_kvm_fd};

fn compare_in(dir: &TempDir, program: &str, args: &[&str]) -> vmwrap_tests::RunOutput {
    Invocation::new(program)
        .args(args)
        .cwd(dir.path())
        .compare()
}

// ---------------------------------------------------------------------------
// Host programs

#[test]
fn bin_true() {
    need_kvm!();
    let dir = TempDir::new("true");
    assert_eq!(compare_in(&dir, "/bin/true", &[]).code, 0);
}

#[test]
fn bin_false() {
    need_kvm!();
    let dir = TempDir::new("false");
    assert_eq!(compare_in(&dir, "/bin/false", &[]).code, 1);
}

#[test]
fn echo_with_args_via_path() {
    need_kvm!();
    let dir = TempDir::new("echo");
    let out = compare_in(
        &dir,
        "echo",
        &["hello", "two words", "", "ünïcödé", "--", "-n"],
    );
    assert_eq!(out.stdout_str(), "hello two words  ünïcödé -- -n\n");
}

#[test]
fn cat_file() {
    need_kvm!();
    let dir = TempDir::new("cat");
    let text: String = (0..5000)
        .map(|i| format!("line {i}: {}\n", i * i))
        .collect();
    dir.write_file("input.txt", &text, 0o644);
    let out = compare_in(&dir, "cat", &["input.txt"]);
    assert_eq!(out.stdout, text.as_bytes());
}

#[test]
fn stdin_passthrough() {
    need_kvm!();
    let dir = TempDir::new("stdin");
    // Larger than a pipe buffer, so it needs several reads and writes.
    let mut data = vec![0u8; 300_000];
    Rng::new(7).fill(&mut data);
    let out = Invocation::new("cat")
        .stdin(data.clone())
        .cwd(dir.path())
        .compare();
    assert_eq!(out.code, 0);
    assert!(out.stdout == data, "cat did not echo stdin unchanged");
}

#[test]
fn stderr_and_exit_status_of_failing_command() {
    need_kvm!();
    let dir = TempDir::new("ls-missing");
    let out = compare_in(&dir, "ls", &["/nonexistent-vmwrap-dir"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr_str().contains("/nonexistent-vmwrap-dir"));
}

#[test]
fn environment_passthrough() {
    need_kvm!();
    let dir = TempDir::new("env");
    let inv = Invocation::new("/usr/bin/env")
        .env("VMWRAP_TEST_MARKER", "value with spaces=and equals")
        .cwd(dir.path());
    // The environment is a set: vmctl need not keep the order.
    let sorted = |out: vmwrap_tests::RunOutput| {
        let mut lines: Vec<String> = out.stdout_str().lines().map(String::from).collect();
        lines.sort();
        vmwrap_tests::RunOutput {
            stdout: lines.join("\n").into_bytes(),
            ..out
        }
    };
    let native = sorted(inv.run_native());
    let vm = sorted(inv.run_vm());
    vmwrap_tests::assert_same(&inv.describe(), &native, &vm);
    assert!(native
        .stdout_str()
        .lines()
        .any(|l| l == "VMWRAP_TEST_MARKER=value with spaces=and equals"));
}

#[test]
fn proc_self_exe_is_the_program() {
    need_kvm!();
    let dir = TempDir::new("proc-self-exe");
    let out = compare_in(&dir, "readlink", &["/proc/self/exe"]);
    let readlink = vmwrap_tests::which("readlink").expect("readlink on PATH");
    let expected = fs::canonicalize(readlink).unwrap();
    assert_eq!(out.stdout_str().trim_end(), expected.to_str().unwrap());
}

#[test]
fn sha256sum_100mb() {
    need_kvm!();
    let dir = TempDir::new("sha256");
    {
        let mut w = BufWriter::new(fs::File::create(dir.join("big.bin")).unwrap());
        let mut rng = Rng::new(0x5eed);
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..100 {
            rng.fill(&mut chunk);
            w.write_all(&chunk).unwrap();
        }
        w.flush().unwrap();
    }
    let out = compare_in(&dir, "sha256sum", &["big.bin"]);
    assert_eq!(out.code, 0);
    assert!(out.stdout_str().ends_with("  big.bin\n"), "{out:?}");
}

#[test]
fn sort_million_lines() {
    need_kvm!();
    let dir = TempDir::new("sort");
    {
        let mut w = BufWriter::new(fs::File::create(dir.join("lines.txt")).unwrap());
        let mut rng = Rng::new(42);
        for _ in 0..1_000_000 {
            let v = rng.next_u64();
            writeln!(w, "{:012x} {}", v >> 16, v % 1000).unwrap();
        }
        w.flush().unwrap();
    }
    // The C locale makes the order byte-wise and independent of the host.
    let out = Invocation::new("sort")
        .arg("lines.txt")
        .env("LC_ALL", "C")
        .cwd(dir.path())
        .compare();
    assert_eq!(out.code, 0);
    assert_eq!(
        out.stdout.iter().filter(|&&b| b == b'\n').count(),
        1_000_000
    );
    assert!(out.stdout.starts_with(b"0000"));
}

#[test]
fn python_computation() {
    need_kvm!();
    let dir = TempDir::new("python-c");
    let out = Invocation::new(PYTHON)
        .args([
            "-c",
            "import math\n\
             print(sum(i * i for i in range(10**6)) % 1000003)\n\
             print(math.factorial(40))\n\
             print(f'{math.pi:.12f} {2 ** 0.5:.15f}')",
        ])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .cwd(dir.path())
        .compare();
    assert_eq!(out.code, 0);
    assert_eq!(out.stdout_str().lines().count(), 3);
}

const PY_SCRIPT: &str = r#"
import hashlib, json, re, sys

src, dst = sys.argv[1], sys.argv[2]
with open(src, encoding="utf-8") as f:
    text = f.read()
words = re.findall(r"[a-z]+", text.lower())
counts = {}
for w in words:
    counts[w] = counts.get(w, 0) + 1
top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
result = {
    "words": len(words),
    "unique": len(counts),
    "top": top,
    "numbers": sum(int(n) for n in re.findall(r"\d+", text)),
    "sha256": hashlib.sha256(text.encode()).hexdigest(),
    "md5": hashlib.md5(text.encode()).hexdigest(),
}
with open(dst, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2, sort_keys=True)
with open(dst, encoding="utf-8") as f:
    back = json.load(f)
assert back == json.loads(json.dumps(result))
print(back["sha256"], back["words"], back["unique"])
print(json.dumps(back["top"]))
"#;

#[test]
fn python_script_json_hashlib_re_files() {
    need_kvm!();
    let dir = TempDir::new("python-script");
    dir.write_file("script.py", PY_SCRIPT, 0o644);
    let vocab = [
        "alpha", "beta", "gamma", "delta", "kvm", "slurm", "vm", "guest", "host",
    ];
    let mut rng = Rng::new(3);
    let text: String = (0..20_000)
        .map(|i| {
            let w = vocab[(rng.next_u64() % vocab.len() as u64) as usize];
            if i % 7 == 0 {
                format!("{w} {}\n", rng.next_u64() % 10_000)
            } else {
                format!("{w} ")
            }
        })
        .collect();
    dir.write_file("input.txt", text, 0o644);

    let inv = Invocation::new(PYTHON)
        .args(["script.py", "input.txt", "out.json"])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .cwd(dir.path());
    let native = inv.run_native();
    let native_file = fs::read(dir.join("out.json")).expect("native run wrote out.json");
    fs::remove_file(dir.join("out.json")).unwrap();
    let vm = inv.run_vm();
    vmwrap_tests::assert_same(&inv.describe(), &native, &vm);
    let vm_file = fs::read(dir.join("out.json")).expect("vm run wrote out.json");
    assert!(
        native_file == vm_file,
        "out.json differs:\n{}",
        vmwrap_tests::diff("out.json", &native_file, &vm_file)
    );
    let json: serde_json::Value = serde_json::from_slice(&vm_file).unwrap();
    assert_eq!(json["top"].as_array().unwrap().len(), 5);
}

#[test]
fn perl_one_liner() {
    need_kvm!();
    let dir = TempDir::new("perl");
    let out = compare_in(
        &dir,
        "perl",
        &[
            "-e",
            r#"my %h; $h{$_ % 7} += $_ for 1..200000;
               print join(",", map { "$_=$h{$_}" } sort keys %h), "\n";
               printf("%.10f\n", atan2(1, 1) * 4);
               my $s = join "", map { chr(97 + $_ % 26) } 1..1000;
               (my $t = $s) =~ s/([aeiou])/uc $1/ge;
               print length($t), " ", substr($t, 0, 40), "\n";"#,
        ],
    );
    assert_eq!(out.code, 0);
    assert_eq!(out.stdout_str().lines().count(), 3);
}

#[test]
fn awk_aggregation() {
    need_kvm!();
    let dir = TempDir::new("awk");
    let mut rng = Rng::new(11);
    let data: String = (0..100_000)
        .map(|_| format!("k{} {}\n", rng.next_u64() % 10, rng.next_u64() % 1000))
        .collect();
    dir.write_file("data.txt", data, 0o644);
    // Keys are visited in a fixed order: for-in order is awk-specific.
    let out = compare_in(
        &dir,
        "/usr/bin/awk",
        &[
            r#"{ n[$1]++; s[$1] += $2 }
               END { for (i = 0; i < 10; i++) { k = "k" i; printf "%s %d %d\n", k, n[k], s[k] }
                     printf "%.6f %d\n", sqrt(2) * NR, length("vmwrap") }"#,
            "data.txt",
        ],
    );
    assert_eq!(out.code, 0);
    assert_eq!(out.stdout_str().lines().count(), 11);
}

#[test]
fn shell_killed_by_sigterm() {
    need_kvm!();
    let dir = TempDir::new("sh-kill");
    // `kill` is a builtin, so this is a signal sent via kill(2), not a fault.
    let out = compare_in(
        &dir,
        "/bin/sh",
        &["-c", "echo before; kill -TERM $$; echo after"],
    );
    assert_eq!(out.code, 128 + 15);
    assert_eq!(out.stdout_str(), "before\n");
}

// ---------------------------------------------------------------------------
// C fixtures

fn compute(path: &str) {
    need_kvm!();
    let dir = TempDir::new("compute");
    let out = compare_in(&dir, path, &[]);
    assert_eq!(out.code, 0);
    assert!(
        out.stdout_str().contains("primes below 1e6: 78498"),
        "{out:?}"
    );
}

#[test]
fn compute_static() {
    compute(fixtures::COMPUTE_STATIC);
}

#[test]
fn compute_static_pie() {
    compute(fixtures::COMPUTE_STATIC_PIE);
}

#[test]
fn compute_dynamic_pie() {
    compute(fixtures::COMPUTE_PIE);
}

#[test]
fn compute_dynamic_non_pie() {
    compute(fixtures::COMPUTE_NOPIE);
}

#[test]
fn segv_is_139() {
    need_kvm!();
    let dir = TempDir::new("segv");
    assert_eq!(compare_in(&dir, fixtures::SEGV, &[]).code, 139);
}

#[test]
fn abort_is_134_after_output() {
    need_kvm!();
    let dir = TempDir::new("abort");
    let out = compare_in(&dir, fixtures::ABORT, &[]);
    assert_eq!(out.code, 134);
    assert_eq!(out.stdout_str(), "about to abort\n");
}

fn exit_code(code: i32) {
    need_kvm!();
    let dir = TempDir::new("exitcode");
    let arg = code.to_string();
    assert_eq!(compare_in(&dir, fixtures::EXITCODE, &[&arg]).code, code);
}

#[test]
fn exit_code_0() {
    exit_code(0);
}

#[test]
fn exit_code_1() {
    exit_code(1);
}

#[test]
fn exit_code_42() {
    exit_code(42);
}

#[test]
fn exit_code_255() {
    exit_code(255);
}

fn syscalls_full(path: &str) {
    need_kvm!();
    let dir = TempDir::new("syscalls");
    let out = compare_in(&dir, path, &[]);
    assert!(
        out.code == 0 && out.stdout_str().contains("failures: 0\n"),
        "syscalls fixture reported failures even natively:\n{out:?}"
    );
}

#[test]
fn syscalls_dynamic() {
    syscalls_full(fixtures::SYSCALLS);
}

#[test]
fn syscalls_static() {
    syscalls_full(fixtures::SYSCALLS_STATIC);
}

#[test]
fn syscalls_munmap_then_touch_is_segv() {
    need_kvm!();
    let dir = TempDir::new("munmap-segv");
    let out = compare_in(&dir, fixtures::SYSCALLS, &["munmap-segv"]);
    assert_eq!(out.code, 139);
    assert_eq!(out.stdout_str(), "touching unmapped page\n");
}

#[test]
fn syscalls_mprotect_readonly_write_is_segv() {
    need_kvm!();
    let dir = TempDir::new("mprotect-segv");
    let out = compare_in(&dir, fixtures::SYSCALLS, &["mprotect-segv"]);
    assert_eq!(out.code, 139);
    assert_eq!(out.stdout_str(), "read-only page reads 1\n");
}

#[test]
fn mem_option_accepted() {
    need_kvm!();
    let dir = TempDir::new("mem");
    let inv = Invocation::new(fixtures::COMPUTE_STATIC).cwd(dir.path());
    let native = inv.run_native();
    let vm = inv.run_vm_with(&["--mem", "1G"]);
    vmwrap_tests::assert_same(&format!("--mem 1G {}", inv.describe()), &native, &vm);
}

// ---------------------------------------------------------------------------
// vmctl's own failures: 125 (vmctl), 126 (not runnable), 127 (not found)

/// Runs `vmctl run OPTS -- PROGRAM` and checks the exit status and that
/// stderr mentions `needle`, so the user learns what went wrong.
fn expect_vmctl_error(opts: &[&str], program: &str, code: i32, needle: &str) {
    let dir = TempDir::new("vmctl-error");
    let out = Invocation::new(program).cwd(dir.path()).run_vm_with(opts);
    assert_eq!(out.code, code, "vmctl run {opts:?} -- {program}:\n{out:?}");
    assert!(
        out.stdout.is_empty(),
        "vmctl wrote to the program's stdout:\n{out:?}"
    );
    assert!(
        out.stderr_str().contains(needle),
        "stderr should mention {needle:?}:\n{out:?}"
    );
}

#[test]
fn missing_program_path_is_127() {
    need_kvm!();
    expect_vmctl_error(&[], "/nonexistent/prog", 127, "/nonexistent/prog");
}

#[test]
fn missing_program_on_path_is_127() {
    need_kvm!();
    expect_vmctl_error(&[], "nonexistent-cmd-xyz", 127, "nonexistent-cmd-xyz");
}

#[test]
fn text_file_without_shebang_is_126() {
    need_kvm!();
    let dir = TempDir::new("not-elf");
    let p = dir.write_file("script", "echo this is not an ELF file\n", 0o755);
    let p = p.to_str().unwrap();
    expect_vmctl_error(&[], p, 126, p);
}

/// A minimal ELF header: enough to be recognised as ELF, wrong architecture.
fn fake_elf(class: u8, machine: u16) -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = class; // 1 = 32-bit, 2 = 64-bit
    h[5] = 1; // little endian
    h[6] = 1; // EV_CURRENT
    h[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    h[18..20].copy_from_slice(&machine.to_le_bytes());
    h[20..24].copy_from_slice(&1u32.to_le_bytes());
    h
}

#[test]
fn aarch64_elf_is_126() {
    need_kvm!();
    let dir = TempDir::new("aarch64-elf");
    let p = dir.write_file("arm-prog", fake_elf(2, 183), 0o755);
    expect_vmctl_error(&[], p.to_str().unwrap(), 126, "arm-prog");
}

#[test]
fn i386_elf_is_126() {
    need_kvm!();
    let dir = TempDir::new("i386-elf");
    let p = dir.write_file("i386-prog", fake_elf(1, 3), 0o755);
    expect_vmctl_error(&[], p.to_str().unwrap(), 126, "i386-prog");
}

#[test]
fn elf_without_exec_permission_is_126() {
    need_kvm!();
    let dir = TempDir::new("noexec");
    let p = dir.join("noexec-prog");
    fs::copy(fixtures::EXITCODE, &p).unwrap();
    fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    expect_vmctl_error(&[], p.to_str().unwrap(), 126, "noexec-prog");
}

#[test]
fn bad_mem_option_is_125() {
    // Option parsing must fail before KVM is touched, so no need_kvm!().
    expect_vmctl_error(&["--mem", "banana"], "/bin/true", 125, "banana");
}

#[test]
fn unknown_option_is_125() {
    expect_vmctl_error(&["--no-such-option"], "/bin/true", 125, "--no-such-option");
}

/// Lowest fd number >= `from` that this process does not have open, so the
/// child cannot inherit it either.
#[test]
fn kvm_fd_not_open_is_125() {
    let fd = unused_fd(99).to_string();
    expect_vmctl_error(&["--kvm-fd", &fd], "/bin/true", 125, "--kvm-fd");
}

/// Runs `vmctl run --kvm-fd FD -- PROGRAM` with `file` open at FD in vmctl,
/// as a privileged launcher (the Slurm plugin) would hand it over.
fn run_with_fd(file: &fs::File, program: &str) -> vmwrap_tests::RunOutput {
    let dir = TempDir::new("kvm-fd");
    let (mut cmd, _) = vmctl_run_with_kvm_fd(file.as_raw_fd());
    cmd.args(["--", program]).current_dir(dir.path());
    run_command(cmd, b"", Duration::from_secs(300))
}

#[test]
fn kvm_fd_passes_an_open_dev_kvm() {
    need_kvm!();
    let out = run_with_fd(&open_dev_kvm(), fixtures::COMPUTE_STATIC);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout_str().contains("primes below 1e6: 78498"));
}

#[test]
fn kvm_fd_that_is_not_kvm_is_125() {
    let null = fs::File::open("/dev/null").unwrap();
    let out = run_with_fd(&null, "/bin/true");
    assert_eq!(out.code, 125, "{out:?}");
    assert!(!out.stderr.is_empty(), "vmctl should explain the failure");
}

/// An ordinary user cannot open /dev/kvm here (it is root-only): vmctl says which
/// device and how access is granted, with the documented status. The same user runs
/// fine when a privileged launcher hands it the device, as the Slurm plugin does.
#[test]
fn dev_kvm_not_permitted_is_125_and_kvm_fd_grants_it() {
    use std::os::unix::process::CommandExt;
    need_kvm!();
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run vmctl as another user");
        return;
    }
    let dir = TempDir::new("kvm-perm");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let mut cmd = Command::new(vmctl_path());
    cmd.args(["run", "--", "/bin/true"])
        .current_dir(dir.path())
        .uid(65534)
        .gid(65534);
    let out = run_command(cmd, b"", Duration::from_secs(300));
    assert_eq!(out.code, 125, "{out:?}");
    let err = out.stderr_str();
    assert!(
        err.contains("/dev/kvm") && err.contains("--kvm-fd"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    let kvm = open_dev_kvm();
    let (mut cmd, _) = vmctl_run_with_kvm_fd(kvm.as_raw_fd());
    cmd.args(["--", fixtures::COMPUTE_STATIC])
        .current_dir(dir.path())
        .uid(65534)
        .gid(65534);
    let out = run_command(cmd, b"", Duration::from_secs(300));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout_str().contains("primes below 1e6: 78498"),
        "{out:?}"
    );
}

/// Overflowing lengths and kernel-half addresses get Linux's errors; vmctl neither
/// panics nor lets the guest map over its own system structures.
#[test]
fn hostile_memory_syscall_arguments() {
    need_kvm!();
    Invocation::new(env!("VMWRAP_FIXTURE_HOSTILE")).compare();
}

/// Starts `program` under vmctl with piped stdout and waits for its "ready" line.
fn start_ready(
    program: &str,
    args: &[&str],
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
) {
    use std::io::BufRead;
    let mut child = Command::new(vmctl_path())
        .args(["run", "--"])
        .arg(program)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start vmctl");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    (child, out)
}

/// A host signal that lands while vmctl is rewriting page tables from the guest's
/// CPL0 detour must not break the detour (it used to fail munmap and then kill the
/// job). SIGWINCH is forwarded and ignored by the program, so only vmctl sees it.
#[test]
fn host_signals_during_page_table_detours() {
    use std::io::Read;
    need_kvm!();
    let (mut child, mut out) = start_ready(env!("VMWRAP_FIXTURE_CHURN"), &["20000"]);
    while child.try_wait().unwrap().is_none() {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGWINCH) };
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "rounds 20000 fails 0\n");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// A signal sent while the guest computes without syscalls runs its handler at once,
/// as natively (it used to be lost when the vCPU was interrupted mid-computation).
#[test]
fn signal_reaches_a_guest_that_makes_no_syscalls() {
    use std::io::Read;
    need_kvm!();
    let (mut child, mut out) = start_ready(env!("VMWRAP_FIXTURE_SPIN"), &[]);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "handler ran\n");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// Unmapping or write-protecting one 4 KiB page inside a block vmctl mapped with a
/// 2 MiB page splits it through the guest's CPL0 detour: the neighbours keep their
/// contents and the page itself faults, as natively.
#[test]
fn splitting_a_huge_page_unmaps_and_protects_just_one_page() {
    need_kvm!();
    for mode in ["munmap", "mprotect"] {
        let out = Invocation::new(env!("VMWRAP_FIXTURE_HUGESPLIT"))
            .arg(mode)
            .compare();
        assert_eq!(out.code, 139, "{mode}: {out:?}");
    }
}
