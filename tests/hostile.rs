//! A hostile or careless guest against vmctl: every route from the guest into
//! vmctl's own memory, descriptors and process is closed, another process of the
//! same user cannot take vmctl's descriptors, and the guest's mistakes end the guest
//! the way Linux would, never vmctl (docs/THREAT-MODEL.md).

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vmwrap_tests::{need_kvm, open_dev_kvm, run_command, vmctl_run_with_kvm_fd};
use vmwrap_tests::{Invocation, TempDir};

const ESCAPE: &str = env!("VMWRAP_FIXTURE_ESCAPE");
const MISTAKES: &str = env!("VMWRAP_FIXTURE_MISTAKES");
const STEAL: &str = env!("VMWRAP_FIXTURE_STEAL");

/// /proc/self/mem, /proc/<pid>/fd/N of vmctl's descriptors, /dev/fd, symlinks,
/// `..`, directory descriptors and working directories in /proc, and the calls
/// naming another process: each one refused, while the guest's own /proc entries
/// still describe the guest.
#[test]
fn guest_cannot_reach_vmctl() {
    need_kvm!();
    let dir = TempDir::new("escape");
    let out = Invocation::new(ESCAPE)
        .arg(dir.path())
        .cwd(dir.path())
        .run_vm();
    let text = out.stdout_str();
    assert!(
        !text.contains("REACHED") && !text.contains("BROKEN"),
        "{text}"
    );
    assert!(text.contains("/proc/self/mem: refused"), "{text}");
    assert!(text.contains("descriptors probed: 1"), "{text}");
    assert!(text.contains("reached: 0"), "{out:?}");
    assert_eq!(out.code, 0, "{out:?}");
    // The calls that name another process are deliberate refusals, not gaps.
    assert!(!out.stderr_str().contains("unsupported"), "{out:?}");
}

/// A vmctl running as an ordinary user with a root-granted /dev/kvm descriptor:
/// another process of that same user can neither pidfd_getfd the descriptor nor
/// ptrace vmctl nor open its /proc entries.
#[test]
fn same_user_cannot_take_vmctls_descriptors() {
    need_kvm!();
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run vmctl as another user");
        return;
    }
    const NOBODY: u32 = 65534;
    let dir = TempDir::new("steal");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let kvm = open_dev_kvm();
    let (mut cmd, target) = vmctl_run_with_kvm_fd(kvm.as_raw_fd());
    cmd.args(["--", "/bin/sleep", "60"])
        .current_dir(dir.path())
        .uid(NOBODY)
        .gid(NOBODY);
    let mut vmctl = cmd.spawn().expect("start vmctl");
    // Wait until vmctl runs the guest (its VM exists) before trying.
    let pid = vmctl.id();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !std::fs::read_link(format!("/proc/{pid}/fd/{target}"))
        .is_ok_and(|l| l == Path::new("/dev/kvm"))
        || std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count()) < 2
    {
        assert!(std::time::Instant::now() < deadline, "vmctl did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut thief = Command::new(STEAL);
    thief
        .args([pid.to_string(), target.to_string()])
        .uid(NOBODY)
        .gid(NOBODY);
    let out = run_command(thief, b"", Duration::from_secs(60));
    let _ = vmctl.kill();
    let _ = vmctl.wait();
    let text = out.stdout_str();
    assert!(text.contains("pidfd_getfd: refused"), "{out:?}");
    assert!(text.contains("ptrace(PTRACE_SEIZE): refused"), "{out:?}");
    assert_eq!(out.code, 0, "{out:?}");
}

/// Syscall buffers in a shared file mapping past the end of the truncated file get
/// EFAULT (or the partial count) as natively, not SIGBUS in vmctl; the program's
/// own load there is its SIGBUS.
#[test]
fn truncated_shared_mapping_faults_the_guest_not_vmctl() {
    need_kvm!();
    let dir = TempDir::new("truncated");
    let out = Invocation::new(MISTAKES)
        .args([Path::new("truncated"), dir.path()])
        .compare();
    assert!(out
        .stdout_str()
        .contains("read into past the end: errno EFAULT"));
    let out = Invocation::new(MISTAKES)
        .args([Path::new("truncated-touch"), dir.path()])
        .compare();
    assert_eq!(out.code, 128 + libc::SIGBUS, "{out:?}");
}

/// ITIMER_PROF and ITIMER_VIRTUAL are vmctl's timers on the host: their signals
/// reach the guest's handlers instead of killing vmctl.
#[test]
fn profiling_timers_reach_the_guest() {
    need_kvm!();
    let out = Invocation::new(MISTAKES).arg("itimer").compare();
    assert_eq!(out.stdout_str(), "both timers fired\n");
}

/// A load from vmctl's doorbell page is, for the program, a load from a kernel
/// address: SIGSEGV (SEGV_MAPERR) to its handler, or death by SIGSEGV without one.
#[test]
fn doorbell_load_is_the_guests_sigsegv() {
    need_kvm!();
    let out = Invocation::new(MISTAKES).arg("doorbell").compare();
    assert!(out.stdout_str().contains("signal 11 code 1"), "{out:?}");
    let out = Invocation::new(MISTAKES).arg("doorbell-kill").compare();
    assert_eq!(out.code, 128 + libc::SIGSEGV, "{out:?}");
}

/// Rewrites a 64-bit little-endian ELF's program headers: `edit(p_type, phdr)` gets
/// each 56-byte header to change in place.
fn edit_phdrs(elf: &mut [u8], mut edit: impl FnMut(u32, &mut [u8])) {
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let phoff = u64_at(elf, 0x20) as usize;
    let phentsize = u16::from_le_bytes([elf[0x36], elf[0x37]]) as usize;
    let phnum = u16::from_le_bytes([elf[0x38], elf[0x39]]) as usize;
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let p_type = u32::from_le_bytes(elf[at..at + 4].try_into().unwrap());
        edit(p_type, &mut elf[at..at + phentsize]);
    }
}

/// The program file is the user's: header sizes in a crafted ELF (an interpreter
/// name of 2^40 bytes, 4 GiB of program headers) get the one-line "cannot execute"
/// error (126), never an abort of vmctl.
#[test]
fn crafted_elf_sizes_are_refused() {
    need_kvm!();
    let dir = TempDir::new("crafted-elf");
    let pristine = std::fs::read(MISTAKES).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        p
    };
    let mut huge_interp = pristine.clone();
    edit_phdrs(&mut huge_interp, |t, ph| {
        if t == 3 {
            ph[32..40].copy_from_slice(&(1u64 << 40).to_le_bytes()); // p_filesz
        }
    });
    let mut huge_phdrs = pristine.clone();
    huge_phdrs[0x36..0x38].copy_from_slice(&0xffffu16.to_le_bytes()); // e_phentsize
    huge_phdrs[0x38..0x3a].copy_from_slice(&0xffffu16.to_le_bytes()); // e_phnum
    for (name, bytes) in [("huge-interp", &huge_interp), ("huge-phdrs", &huge_phdrs)] {
        let p = write(name, bytes);
        let out = Invocation::new(&p).cwd(dir.path()).run_vm();
        assert!(out.code == 126 || out.code == 127, "{name}: {out:?}");
        assert_eq!(out.stderr_str().lines().count(), 1, "{name}: {out:?}");
    }
}
