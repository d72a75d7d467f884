//! The kernel layer: vmctl as the guest's operating system. It owns processes,
//! their address spaces, descriptors and signals, and services every syscall and
//! fault the machine layer reports, on the host, on the guest's behalf.

pub mod files;
pub mod loader;
pub mod mm;
pub mod persist;
pub mod process;
mod sigframe;
pub mod signals;

pub use sigframe::sigreturn as sigframe_return;

use crate::machine::{self, Exit, GuestMemory, MachineError, Vcpu, Vm};
use files::{FdTable, OpenFile};
use loader::{ExecError, HostInfo};
use mm::{Access, AddressSpace, Fault, FrameAllocator, MmCtx, SharedRegions};
use process::{ExitStatus, Process};
use signals::{default_action, sig_bit, DefaultAction, SIG_DFL, SIG_IGN};
use std::collections::HashSet;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use thiserror::Error;

/// A Linux error number returned to the guest as -errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub fn last() -> Errno {
        Errno(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }
}

pub type SysResult = Result<i64, Errno>;

#[derive(Debug, Error)]
pub enum KernelError {
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error("guest memory exhausted while starting the program (raise --mem)")]
    NoMemory,
}

/// What the user asked `vmctl run` to start.
pub struct Launch {
    pub program: PathBuf,
    pub argv: Vec<Vec<u8>>,
    pub envp: Vec<Vec<u8>>,
    /// Guest RAM, also the commit limit of private writable memory.
    pub mem: u64,
}

pub struct Kernel {
    pub vm: Vm,
    pub vcpu: Vcpu,
    pub mem: Arc<GuestMemory>,
    pub frames: FrameAllocator,
    pub proc: Process,
    pub shared: SharedRegions,
    warned: HashSet<u64>,
    exit: Option<ExitStatus>,
    /// Added to the host's monotonic clocks, so a restored guest's CLOCK_MONOTONIC
    /// continues from its checkpoint instead of jumping.
    pub clock_offset_ns: i64,
    /// Added to the host TSC when guest rdtsc is trapped: set on a restore where the
    /// host's TSC is behind the checkpoint's, so the guest's never goes backwards.
    pub tsc_offset: u64,
    pub tsc_trap: bool,
}

fn host_rlimits() -> Vec<(u64, u64)> {
    (0..16)
        .map(|r| {
            let mut l = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes into the local struct.
            unsafe { libc::getrlimit(r as _, &mut l) };
            (l.rlim_cur, l.rlim_max)
        })
        .collect()
}

fn host_hwcap() -> u64 {
    let r = std::arch::x86_64::__cpuid(1);
    r.edx as u64
}

/// Size of the XSAVE area for the features the guest may use (CPUID 0xD.0 EBX).
pub fn xsave_user_size() -> u64 {
    let r = std::arch::x86_64::__cpuid_count(0xd, 0);
    (r.ecx as u64).max(512 + 64)
}

/// Descriptors beyond the standard three that vmctl inherited open (not
/// close-on-exec) belong to the program, as a shell's `3<file` would. vmctl's own
/// descriptors are all close-on-exec, so they are never handed over.
fn adopt_inherited_fds(files: &mut FdTable) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: F_GETFD only queries the descriptor; it may have closed meanwhile.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 || flags & libc::FD_CLOEXEC != 0 {
            continue;
        }
        // SAFETY: an inherited descriptor nothing else in vmctl owns; marking it
        // close-on-exec keeps it out of anything vmctl might exec.
        let host = unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            OwnedFd::from_raw_fd(fd)
        };
        let file = Arc::new(OpenFile {
            host,
            path: None,
            stdio: None,
        });
        files.install_at(
            fd,
            files::FdEntry {
                file,
                cloexec: false,
            },
        );
    }
}

pub(crate) fn dup_stdio(fd: i32) -> Option<Arc<OpenFile>> {
    // SAFETY: F_DUPFD_CLOEXEC on one of our standard descriptors; the new descriptor is
    // owned by the OwnedFd below.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100) };
    if new < 0 {
        return None;
    }
    Some(Arc::new(OpenFile {
        // SAFETY: `new` was just created and nothing else owns it.
        host: unsafe { OwnedFd::from_raw_fd(new) },
        path: None,
        stdio: Some(fd),
    }))
}

impl Kernel {
    pub fn boot(vm: Vm, launch: &Launch) -> Result<Kernel, KernelError> {
        let mem = vm.memory().clone();
        let mut frames = FrameAllocator::new(machine::layout::SYSTEM_SIZE, mem.size());
        let mut mm = AddressSpace::new(&mem, &mut frames, vm.system_half(), launch.mem)
            .ok_or(KernelError::NoMemory)?;
        let mut vcpu = vm.create_vcpu(0, mm.root)?;
        let rlimits = host_rlimits();
        let stack = rlimits[libc::RLIMIT_STACK as usize]
            .0
            .clamp(128 << 10, 64 << 20);
        // SAFETY: these identity calls cannot fail.
        let host = unsafe {
            HostInfo {
                hwcap: host_hwcap(),
                minsigstksz: sigframe::frame_size(xsave_user_size()),
                uid: libc::getuid(),
                euid: libc::geteuid(),
                gid: libc::getgid(),
                egid: libc::getegid(),
            }
        };
        let start = {
            let mut ctx = MmCtx {
                mem: &mem,
                frames: &mut frames,
                vcpu: &mut vcpu,
            };
            loader::load_program(
                &mut mm,
                &mut ctx,
                &launch.program,
                &launch.argv,
                &launch.envp,
                stack.next_multiple_of(4096),
                &host,
            )?
        };
        {
            let regs = vcpu.user_regs_mut();
            *regs = Default::default();
            regs.rip = start.entry;
            regs.rsp = start.stack_pointer;
            regs.rflags = 0x202;
        }
        let mut files = FdTable::default();
        for fd in 0..3 {
            if let Some(f) = dup_stdio(fd) {
                files.install_at(
                    fd,
                    files::FdEntry {
                        file: f,
                        cloexec: false,
                    },
                );
            }
        }
        adopt_inherited_fds(&mut files);
        let mut name = [0u8; 16];
        let base = start
            .exe
            .file_name()
            .map(|n| n.as_encoded_bytes().to_vec())
            .unwrap_or_default();
        let n = base.len().min(15);
        name[..n].copy_from_slice(&base[..n]);
        // SAFETY: identity calls that cannot fail.
        let (pid, ppid, pgid, sid) = unsafe {
            (
                libc::getpid(),
                libc::getppid(),
                libc::getpgrp(),
                libc::getsid(0),
            )
        };
        let proc = Process {
            pid,
            ppid,
            pgid,
            sid,
            mm,
            files,
            signals: Default::default(),
            exe: start.exe,
            rlimits,
            umask: {
                // SAFETY: umask is read by setting and restoring it.
                let m = unsafe { libc::umask(0o022) };
                unsafe { libc::umask(m) };
                m
            },
            clear_child_tid: 0,
            robust_list: (0, 0),
            rseq: None,
            name,
            sleep_restart: None,
            cmdline: launch
                .argv
                .iter()
                .flat_map(|a| a.iter().copied().chain([0]))
                .collect(),
        };
        Ok(Kernel {
            vm,
            vcpu,
            mem,
            frames,
            proc,
            shared: SharedRegions::default(),
            warned: HashSet::new(),
            exit: None,
            clock_offset_ns: 0,
            tsc_offset: 0,
            tsc_trap: false,
        })
    }

    /// Guest RAM for a commit limit of `limit`: slack for page tables and partly used
    /// 2 MiB blocks.
    pub fn ram_for(limit: u64) -> u64 {
        (limit + limit / 8 + (64 << 20)).next_multiple_of(machine::memory::HUGE_PAGE)
    }

    /// Runs `f` with the current address space and what it needs from the machine.
    pub fn with_mm<R>(&mut self, f: impl FnOnce(&mut AddressSpace, &mut MmCtx) -> R) -> R {
        let mut ctx = MmCtx {
            mem: &self.mem,
            frames: &mut self.frames,
            vcpu: &mut self.vcpu,
        };
        f(&mut self.proc.mm, &mut ctx)
    }

    pub fn read_user(&mut self, va: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let mut buf = vec![0u8; len];
        self.with_mm(|mm, ctx| mm.read(ctx, va, &mut buf))?;
        Ok(buf)
    }

    pub fn write_user(&mut self, va: u64, data: &[u8]) -> Result<(), Errno> {
        self.with_mm(|mm, ctx| mm.write(ctx, va, data))
    }

    pub fn read_user_u64(&mut self, va: u64) -> Result<u64, Errno> {
        self.with_mm(|mm, ctx| mm.read_u64(ctx, va))
    }

    pub fn read_cstr(&mut self, va: u64) -> Result<Vec<u8>, Errno> {
        if va == 0 {
            return Err(Errno(libc::EFAULT));
        }
        self.with_mm(|mm, ctx| mm.read_cstr(ctx, va, libc::PATH_MAX as usize))
    }

    pub fn user_iovecs(
        &mut self,
        va: u64,
        len: u64,
        access: Access,
    ) -> Result<Vec<libc::iovec>, Errno> {
        self.with_mm(|mm, ctx| mm.host_ranges(ctx, va, len, access))
    }

    /// Records that the guest is done; the run loop stops after this exit.
    pub fn exit(&mut self, status: ExitStatus) {
        // Shared file mappings reach their files before the job is gone.
        self.shared.msync_all();
        self.exit = Some(status);
    }

    pub fn warn_unsupported(&mut self, nr: u64) {
        if self.warned.insert(nr) {
            eprintln!(
                "vmctl: warning: unsupported syscall {} ({nr}), returning ENOSYS",
                crate::syscalls::name(nr)
            );
        }
    }

    pub fn exited(&self) -> Option<ExitStatus> {
        self.exit
    }

    /// Runs the guest to its next exit and handles it. Returns the exit status once
    /// the guest is gone.
    pub fn step(&mut self) -> Result<Option<ExitStatus>, KernelError> {
        if let Some(status) = self.exit {
            return Ok(Some(status));
        }
        match self.vcpu.run()? {
            Exit::Syscall => crate::syscalls::handle(self),
            Exit::Exception {
                vector,
                error_code,
                cr2,
            } => self.exception(vector, error_code, cr2)?,
            Exit::Interrupted => {}
        }
        self.deliver_pending()?;
        Ok(self.exit)
    }

    fn exception(&mut self, vector: u8, error_code: u64, cr2: u64) -> Result<(), KernelError> {
        let (sig, code, addr) = match vector {
            14 => {
                let access = if error_code & 0x10 != 0 {
                    Access::Exec
                } else if error_code & 2 != 0 {
                    Access::Write
                } else {
                    Access::Read
                };
                let result = self.with_mm(|mm, ctx| mm.fault(ctx, cr2, access));
                match result {
                    Ok(()) => return Ok(()),
                    Err(Fault::Unmapped) => (libc::SIGSEGV, 1, cr2), // SEGV_MAPERR
                    Err(Fault::BeyondFile) => (libc::SIGBUS, 2, cr2), // BUS_ADRERR
                    Err(Fault::Protection) => (libc::SIGSEGV, 2, cr2), // SEGV_ACCERR
                    Err(Fault::OutOfMemory) => {
                        eprintln!("vmctl: guest out of memory at {cr2:#x}; raise --mem");
                        (libc::SIGKILL, 0, 0)
                    }
                }
            }
            13 if error_code == 0 && self.tsc_trap && self.emulate_rdtsc() => return Ok(()),
            0 => (libc::SIGFPE, 1, self.vcpu.user_regs().rip), // FPE_INTDIV
            1 | 3 => {
                // Clear TF so a single-step trap does not fire again on resume.
                self.vcpu.user_regs_mut().rflags &= !(1 << 8);
                // int3 reports SI_KERNEL, as on Linux; a single step is TRAP_TRACE.
                (
                    libc::SIGTRAP,
                    if vector == 3 { 0x80 } else { 2 },
                    self.vcpu.user_regs().rip,
                )
            }
            6 => (libc::SIGILL, 2, self.vcpu.user_regs().rip), // ILL_ILLOPN
            16 | 19 => (libc::SIGFPE, 0, self.vcpu.user_regs().rip),
            17 => (libc::SIGBUS, 1, self.vcpu.user_regs().rip),
            _ => (libc::SIGSEGV, 0x80, 0), // SI_KERNEL, as Linux reports #GP
        };
        self.force_signal(sig, code, addr, vector, error_code)
    }

    /// A trapped rdtsc or rdtscp: the host TSC plus the restore offset.
    fn emulate_rdtsc(&mut self) -> bool {
        let rip = self.vcpu.user_regs().rip;
        let Ok(code) = self.read_user(rip, 3) else {
            return false;
        };
        let len = match code.as_slice() {
            [0x0f, 0x31, _] => 2,
            [0x0f, 0x01, 0xf9] => 3,
            _ => return false,
        };
        let tsc = crate::clock::host_tsc().wrapping_add(self.tsc_offset);
        let index = self.vcpu.index();
        let r = self.vcpu.user_regs_mut();
        r.rax = tsc & 0xffff_ffff;
        r.rdx = tsc >> 32;
        if len == 3 {
            r.rcx = index; // TSC_AUX: the guest CPU number
        }
        r.rip += len;
        true
    }

    /// Delivers a synchronous signal caused by the current instruction.
    fn force_signal(
        &mut self,
        sig: i32,
        code: i32,
        addr: u64,
        trapno: u8,
        err: u64,
    ) -> Result<(), KernelError> {
        let action = self.proc.signals.action(sig);
        let blocked = self.proc.signals.blocked & sig_bit(sig) != 0;
        if sig == libc::SIGKILL || action.handler == SIG_DFL || action.handler == SIG_IGN || blocked
        {
            // A fault that cannot be handled kills, as Linux does for blocked or
            // ignored synchronous signals.
            self.exit(ExitStatus::Signal(sig));
            return Ok(());
        }
        let info = sigframe::SigInfo {
            signo: sig,
            code,
            addr,
            pid: 0,
            uid: 0,
        };
        self.setup_frame(sig, info, trapno, err)
    }

    /// Queues signal `sig` for the guest process (kill/tgkill to itself).
    pub fn send_signal(&mut self, sig: i32) {
        if sig == 0 {
            return;
        }
        self.proc.signals.pending |= sig_bit(sig);
    }

    /// Delivers pending, unblocked signals: default actions, or handler frames.
    pub fn deliver_pending(&mut self) -> Result<(), KernelError> {
        self.deliver_signals()?;
        // No handler ran for a call that set a temporary mask: put the old one back.
        if let Some(m) = self.proc.signals.saved_mask.take() {
            self.proc.signals.blocked = m;
        }
        Ok(())
    }

    fn deliver_signals(&mut self) -> Result<(), KernelError> {
        while self.exit.is_none() {
            let Some(sig) = self.proc.signals.next_deliverable() else {
                return Ok(());
            };
            self.proc.signals.pending &= !sig_bit(sig);
            let action = self.proc.signals.action(sig);
            if action.handler == SIG_IGN {
                continue;
            }
            if action.handler == SIG_DFL {
                match default_action(sig) {
                    DefaultAction::Ignore | DefaultAction::Continue | DefaultAction::Stop => {
                        continue
                    }
                    DefaultAction::Terminate | DefaultAction::CoreDump => {
                        self.exit(ExitStatus::Signal(sig));
                        return Ok(());
                    }
                }
            }
            // A handler frame is built from the interrupted registers, which after an
            // interruption must first be read. If the vCPU stopped inside a CPL0 stub
            // the signal waits for that stub's exit, a moment later.
            if !self.vcpu.refresh_user_state()? {
                self.proc.signals.pending |= sig_bit(sig);
                return Ok(());
            }
            let info = sigframe::SigInfo {
                signo: sig,
                code: -6, // SI_TKILL
                addr: 0,
                pid: self.proc.pid,
                // SAFETY: getuid cannot fail.
                uid: unsafe { libc::getuid() },
            };
            self.setup_frame(sig, info, 0, 0)?;
        }
        Ok(())
    }

    fn setup_frame(
        &mut self,
        sig: i32,
        info: sigframe::SigInfo,
        trapno: u8,
        err: u64,
    ) -> Result<(), KernelError> {
        match sigframe::push(self, sig, info, trapno, err) {
            Ok(()) => Ok(()),
            Err(_) => {
                // No room for the frame: Linux kills with SIGSEGV.
                self.exit(ExitStatus::Signal(libc::SIGSEGV));
                Ok(())
            }
        }
    }
}
