//! One vCPU running guest user code, and the exits it reports.
//!
//! The kernel layer sees the guest's user-mode registers (`user_regs`) whatever the
//! exit: after a syscall the pad's state is translated back (RIP from RCX, RFLAGS from
//! R11), after an exception the interrupted RIP/RSP/RFLAGS come from the frame the CPU
//! pushed on the exception stack. On resume the machine writes them back the matching
//! way, so the kernel layer never deals with CPL0 state.

use super::layout::*;
use super::memory::GuestMemory;
use super::system::{self, DETOUR_LIST_CAPACITY, DETOUR_RIP, FIRST_RUN_RIP};
use super::MachineError;
use kvm_bindings::{kvm_regs, kvm_sregs, kvm_xcrs, CpuId, Msrs, Xsave};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use std::sync::Arc;

/// A vCPU's guest-visible state in a checkpoint.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    pub index: u64,
    /// rax rbx rcx rdx rsi rdi rsp rbp r8-r15 rip rflags, as user mode sees them.
    pub regs: [u64; 18],
    pub fs_base: u64,
    pub gs_base: u64,
    /// The XSAVE image (KVM's 4 KiB region, then any extended words), in 32-bit words.
    pub xsave: Vec<u32>,
}

trait XsaveWords {
    fn as_slice_with_header(&self) -> Vec<u32>;
}

impl XsaveWords for Xsave {
    fn as_slice_with_header(&self) -> Vec<u32> {
        let mut v = self.as_fam_struct_ref().xsave.region.to_vec();
        v.extend_from_slice(self.as_slice());
        v
    }
}

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SFMASK: u32 = 0xc000_0084;

/// Why `run` returned.
#[derive(Debug, Clone, Copy)]
pub enum Exit {
    /// The guest executed `syscall`; the number and arguments are in `user_regs`.
    Syscall,
    /// A CPU exception in guest user mode.
    Exception {
        vector: u8,
        error_code: u64,
        /// Faulting address for page faults.
        cr2: u64,
    },
    /// KVM_RUN was interrupted by a host signal.
    Interrupted,
    /// A user access to guest-physical `gpa`, which has no memory behind it (the
    /// doorbell page), other than the syscall pad's own store. After a load the
    /// registers are those before it (it did not happen); after a store they are
    /// those after it (KVM completed it as an MMIO write, to nothing).
    BadAccess { gpa: u64 },
    /// A user access to memory the host cannot provide: a page of a shared file
    /// mapping beyond the end of its (truncated) file, where Linux raises SIGBUS.
    /// The registers are those of the faulting instruction.
    BadMemory,
}

#[derive(Clone, Copy)]
enum Resume {
    /// Never run in user mode yet: load everything with SET_SREGS/SET_REGS.
    Fresh,
    /// Stopped on the pad's MMIO store.
    Syscall,
    /// Stopped in an exception stub at CPL0; `frame` is the guest-physical address of
    /// the interrupt frame (RIP, CS, RFLAGS, RSP, SS).
    Exception { frame: u64, stub_regs: kvm_regs },
    /// Interrupted by a signal: the vCPU state is untouched and resumes as is.
    Untouched,
}

pub struct Vcpu {
    fd: VcpuFd,
    index: u64,
    mem: Arc<GuestMemory>,
    template: kvm_sregs,
    user: kvm_regs,
    resume: Resume,
    /// System registers at the last exception exit (CPL0 in a stub).
    stub_sregs: kvm_sregs,
    cr3: u64,
    fs_base: u64,
    gs_base: u64,
    tsd: bool,
    sregs_dirty: bool,
    xsave_size: usize,
}

impl Vcpu {
    pub(super) fn start(
        fd: VcpuFd,
        index: u64,
        mem: Arc<GuestMemory>,
        cpuid: &CpuId,
        xcr0: u64,
        xsave_size: usize,
        cr3: u64,
    ) -> Result<Vcpu, MachineError> {
        let k = |what, e| MachineError::Kvm(what, e);
        fd.set_cpuid2(cpuid).map_err(|e| k("KVM_SET_CPUID2", e))?;
        let template = fd.get_sregs().map_err(|e| k("KVM_GET_SREGS", e))?;
        let mut vcpu = Vcpu {
            fd,
            index,
            mem,
            template,
            user: kvm_regs::default(),
            resume: Resume::Fresh,
            stub_sregs: template,
            cr3,
            fs_base: 0,
            gs_base: 0,
            tsd: false,
            sregs_dirty: true,
            xsave_size,
        };
        vcpu.first_run()?;
        vcpu.set_xcr0(xcr0)?;
        vcpu.fd.set_sync_valid_reg(SyncReg::Register);
        Ok(vcpu)
    }

    /// A vCPU starts in a fully emulated mode; one KVM_RUN at CPL0 switches it to the
    /// fast mode (shared/PLATFORM.md). Only after that may STAR/LSTAR be set.
    fn first_run(&mut self) -> Result<(), MachineError> {
        let k = |what, e| MachineError::Kvm(what, e);
        let sregs = system::kernel_sregs(&self.template, self.index, self.cr3, false);
        self.fd
            .set_sregs(&sregs)
            .map_err(|e| k("KVM_SET_SREGS", e))?;
        let regs = kvm_regs {
            rip: FIRST_RUN_RIP,
            rsp: kstack_top(self.index),
            rflags: 2,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(|e| k("KVM_SET_REGS", e))?;
        // A signal for this host thread (another task's kick, a host signal being
        // forwarded) can end the run early with EINTR; the guest simply continues
        // where it was on the next run. Bounded, so a signal storm still ends.
        let mut interrupted = 0;
        loop {
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, _)) if port == PORT_FIRST_RUN as u16 => break,
                Err(e)
                    if (e.errno() == libc::EINTR || e.errno() == libc::EAGAIN)
                        && interrupted < 1000 =>
                {
                    interrupted += 1;
                    self.fd.set_kvm_immediate_exit(0);
                }
                other => {
                    return Err(MachineError::VcpuFailed(format!(
                        "first run of vCPU {} ended with {:?} instead of its start-up report",
                        self.index,
                        other.map(|e| format!("{e:?}"))
                    )))
                }
            }
        }
        let msrs = Msrs::from_entries(&[
            msr(MSR_STAR, system::STAR),
            msr(MSR_LSTAR, PAD_VA),
            msr(MSR_CSTAR, PAD_VA),
            msr(MSR_SFMASK, system::SFMASK),
        ])
        .expect("four MSRs fit");
        let n = self.fd.set_msrs(&msrs).map_err(|e| k("KVM_SET_MSRS", e))?;
        if n != 4 {
            return Err(MachineError::VcpuFailed(format!(
                "KVM_SET_MSRS accepted {n} of 4 MSRs"
            )));
        }
        Ok(())
    }

    /// Enables every XSAVE feature KVM offers, so AVX-512 code does not #UD.
    pub fn set_xcr0(&self, xcr0: u64) -> Result<(), MachineError> {
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = xcr0;
        self.fd
            .set_xcrs(&xcrs)
            .map_err(|e| MachineError::Kvm("KVM_SET_XCRS", e))
    }

    pub fn index(&self) -> u64 {
        self.index
    }

    pub fn user_regs(&self) -> &kvm_regs {
        &self.user
    }

    pub fn user_regs_mut(&mut self) -> &mut kvm_regs {
        &mut self.user
    }

    pub fn fs_base(&self) -> u64 {
        self.fs_base
    }

    pub fn gs_base(&self) -> u64 {
        self.gs_base
    }

    pub fn set_fs_base(&mut self, base: u64) {
        self.fs_base = base;
        self.sregs_dirty = true;
    }

    pub fn set_gs_base(&mut self, base: u64) {
        self.gs_base = base;
        self.sregs_dirty = true;
    }

    /// The address space the vCPU runs in (its PML4). Takes effect on the next run.
    pub fn set_cr3(&mut self, cr3: u64) {
        self.cr3 = cr3;
        self.sregs_dirty = true;
    }

    /// Puts the user-mode registers of a task that has never run here (a new thread,
    /// a child after fork, a program after exec); the next run enters user mode.
    pub fn start_user(&mut self, regs: kvm_regs, fs_base: u64, gs_base: u64) {
        self.user = regs;
        self.fs_base = fs_base;
        self.gs_base = gs_base;
        self.resume = Resume::Fresh;
        self.sregs_dirty = true;
    }

    /// CR4.TSD: makes guest rdtsc/rdtscp fault (with the host thread's PR_TSC_SIGSEGV).
    pub fn set_tsd(&mut self, on: bool) {
        self.tsd = on;
        self.sregs_dirty = true;
    }

    /// Sets an immediate exit so that the next KVM_RUN returns at once (used from a
    /// signal handler on this vCPU's thread).
    pub fn kvm_run_ptr(&mut self) -> *mut kvm_bindings::kvm_run {
        self.fd.get_kvm_run() as *mut _
    }

    fn user_sregs(&self) -> kvm_sregs {
        system::user_sregs(
            &self.template,
            self.index,
            self.cr3,
            self.fs_base,
            self.gs_base,
            self.tsd,
        )
    }

    fn prepare_resume(&mut self) -> Result<(), MachineError> {
        let k = |what, e| MachineError::Kvm(what, e);
        match self.resume {
            Resume::Fresh => {
                self.fd
                    .set_sregs(&self.user_sregs())
                    .map_err(|e| k("KVM_SET_SREGS", e))?;
                self.fd
                    .set_regs(&self.user)
                    .map_err(|e| k("KVM_SET_REGS", e))?;
            }
            Resume::Syscall => {
                if self.sregs_dirty {
                    self.fd
                        .set_sregs(&self.user_sregs())
                        .map_err(|e| k("KVM_SET_SREGS", e))?;
                }
                self.fd.sync_regs_mut().regs = self.user;
                self.fd.set_sync_dirty_reg(SyncReg::Register);
            }
            Resume::Exception { frame, stub_regs } => {
                if self.sregs_dirty {
                    let mut s = self.stub_sregs;
                    s.fs.base = self.fs_base;
                    s.gs.base = self.gs_base;
                    s.cr3 = self.cr3;
                    self.fd.set_sregs(&s).map_err(|e| k("KVM_SET_SREGS", e))?;
                }
                self.mem.write_u64(frame, self.user.rip);
                self.mem.write_u64(frame + 16, self.user.rflags);
                self.mem.write_u64(frame + 24, self.user.rsp);
                let mut regs = self.user;
                regs.rip = stub_regs.rip;
                regs.rsp = stub_regs.rsp;
                regs.rflags = stub_regs.rflags;
                self.fd.sync_regs_mut().regs = regs;
                self.fd.set_sync_dirty_reg(SyncReg::Register);
            }
            Resume::Untouched => {}
        }
        self.sregs_dirty = false;
        Ok(())
    }

    /// Runs the guest until the next syscall, exception or interruption.
    pub fn run(&mut self) -> Result<Exit, MachineError> {
        self.prepare_resume()?;
        let exit = match self.fd.run() {
            Ok(VcpuExit::MmioWrite(addr, _)) => Ok(addr),
            Ok(VcpuExit::MmioRead(addr, data)) => {
                data.fill(0);
                return self.bad_load(addr);
            }
            Ok(VcpuExit::IoOut(port, _)) if port < 32 => Err(Ok(port as u8)),
            Ok(other) => Err(Err(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Cleared only here, after it did its job: a kick that lands between
                // two runs must still stop the next one.
                self.fd.set_kvm_immediate_exit(0);
                self.resume = Resume::Untouched;
                return Ok(Exit::Interrupted);
            }
            Err(e) if e.errno() == libc::EFAULT => {
                // Guest RAM is anonymous memory that never fails; only a shared file
                // mapping truncated under the guest has pages the host cannot give.
                self.resume = Resume::Untouched;
                if !self.refresh_user_state()? {
                    return Err(MachineError::Kvm("KVM_RUN", e));
                }
                return Ok(Exit::BadMemory);
            }
            Err(e) => return Err(MachineError::Kvm("KVM_RUN", e)),
        };
        match exit {
            Ok(addr) => {
                let regs = self.fd.sync_regs().regs;
                // The pad's store leaves RIP right after it; any other store to the
                // doorbell page is the program's own, which Linux would fault.
                if addr != MMIO_GPA || regs.rip != PAD_VA + system::PAD_STORE_LEN {
                    self.user = regs;
                    self.resume = Resume::Syscall;
                    return Ok(Exit::BadAccess { gpa: addr });
                }
                self.user = regs;
                self.user.rip = regs.rcx;
                self.user.rflags = regs.r11;
                self.resume = Resume::Syscall;
                Ok(Exit::Syscall)
            }
            Err(Ok(vector)) => self.exception_exit(vector),
            Err(Err(what)) => Err(MachineError::VcpuFailed(format!(
                "unexpected exit {what} at {}",
                self.describe_state()
            ))),
        }
    }

    /// A load from an address without memory: Linux would fault before the
    /// instruction completes. KVM insists on finishing the emulated load on the next
    /// KVM_RUN, so it is finished here (with zeros, under an immediate exit that keeps
    /// the guest from running on), and then the registers from before the load are
    /// put back, so the guest sees the fault on the load instruction itself.
    fn bad_load(&mut self, gpa: u64) -> Result<Exit, MachineError> {
        let before = self.fd.sync_regs().regs;
        self.fd.set_kvm_immediate_exit(1);
        let completed = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            other => Err(format!("{:?}", other.map(|e| format!("{e:?}")))),
        };
        self.fd.set_kvm_immediate_exit(0);
        if let Err(what) = completed {
            return Err(MachineError::VcpuFailed(format!(
                "completing a load from {gpa:#x} ended with {what}"
            )));
        }
        self.user = before;
        self.resume = Resume::Syscall;
        Ok(Exit::BadAccess { gpa })
    }

    fn exception_exit(&mut self, vector: u8) -> Result<Exit, MachineError> {
        let stub_regs = self.fd.sync_regs().regs;
        self.stub_sregs = self
            .fd
            .get_sregs()
            .map_err(|e| MachineError::Kvm("KVM_GET_SREGS", e))?;
        let mut frame = stub_regs.rsp.wrapping_sub(DIRECT_MAP);
        if frame >= SYSTEM_SIZE {
            return Err(MachineError::VcpuFailed(format!(
                "exception {vector} with a stack outside the exception stacks (rsp {:#x})",
                stub_regs.rsp
            )));
        }
        let error_code = if matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30) {
            let e = self.mem.read_u64(frame);
            frame += 8;
            e
        } else {
            0
        };
        let cs = self.mem.read_u64(frame + 8);
        if cs & 3 != 3 {
            return Err(MachineError::VcpuFailed(format!(
                "exception {vector} (error {error_code:#x}) in supervisor mode at rip {:#x}, cr2 {:#x}",
                self.mem.read_u64(frame),
                self.stub_sregs.cr2
            )));
        }
        self.user = stub_regs;
        self.user.rip = self.mem.read_u64(frame);
        self.user.rflags = self.mem.read_u64(frame + 16);
        self.user.rsp = self.mem.read_u64(frame + 24);
        self.resume = Resume::Exception { frame, stub_regs };
        Ok(Exit::Exception {
            vector,
            error_code,
            cr2: self.stub_sregs.cr2,
        })
    }

    /// Writes page-table entries from guest CPL0, the only way the shadow MMU notices a
    /// change to an entry that is already present. `writes` are (guest-physical address
    /// of the entry, new value) pairs.
    pub fn write_table_entries(&mut self, writes: &[(u64, u64)]) -> Result<(), MachineError> {
        if writes.is_empty() {
            return Ok(());
        }
        // After an interruption our copy of the user registers is stale: read them, so
        // that the resume after the detour puts back the real ones.
        if !self.refresh_user_state()? {
            return Err(MachineError::VcpuFailed(
                "page-table detour requested while the vCPU was inside a CPL0 stub".into(),
            ));
        }
        let restore = match self.resume {
            Resume::Exception { .. } => {
                let mut s = self.stub_sregs;
                s.cr3 = self.cr3;
                s.fs.base = self.fs_base;
                s.gs.base = self.gs_base;
                s.cr4 = system::kernel_sregs(&self.template, self.index, self.cr3, self.tsd).cr4;
                s
            }
            _ => self.user_sregs(),
        };
        let result = self.run_detour(writes);
        // Whatever happened, leave the vCPU in the mode it was stopped in.
        let restored = self
            .fd
            .set_sregs(&restore)
            .map_err(|e| MachineError::Kvm("KVM_SET_SREGS", e));
        result?;
        restored?;
        self.sregs_dirty = false;
        Ok(())
    }

    fn run_detour(&mut self, writes: &[(u64, u64)]) -> Result<(), MachineError> {
        let k = |what, e| MachineError::Kvm(what, e);
        let cpl0 = system::kernel_sregs(&self.template, self.index, self.cr3, self.tsd);
        self.fd
            .set_sregs(&cpl0)
            .map_err(|e| k("KVM_SET_SREGS", e))?;
        for chunk in writes.chunks(DETOUR_LIST_CAPACITY as usize) {
            for (i, &(gpa, value)) in chunk.iter().enumerate() {
                let at = detour_list_gpa(self.index) + i as u64 * 16;
                self.mem.write_u64(at, direct_map(gpa));
                self.mem.write_u64(at + 8, value);
            }
            let regs = kvm_regs {
                rip: DETOUR_RIP,
                rsi: direct_map(detour_list_gpa(self.index)),
                rcx: chunk.len() as u64,
                // Below any interrupt frame that may sit at the top of the stack.
                rsp: kstack_top(self.index) - 2048,
                rflags: 2,
                ..Default::default()
            };
            loop {
                self.fd.set_regs(&regs).map_err(|e| k("KVM_SET_REGS", e))?;
                match self.fd.run() {
                    Ok(VcpuExit::IoOut(port, _)) if port == PORT_DETOUR_DONE as u16 => break,
                    // A host signal (or a kick already pending in immediate_exit) stopped
                    // the detour: the writes are idempotent, so run the list again. The
                    // signal itself is recorded and served after this exit.
                    Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                        self.fd.set_kvm_immediate_exit(0);
                    }
                    other => {
                        return Err(MachineError::VcpuFailed(format!(
                            "page-table detour ended with {:?}",
                            other.map(|e| format!("{e:?}"))
                        )))
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes `user_regs` current after an interruption, when they were not read at
    /// the exit. Returns false if the vCPU stopped inside a CPL0 stub; it then reaches
    /// a clean exit on its next run.
    pub fn refresh_user_state(&mut self) -> Result<bool, MachineError> {
        if !matches!(self.resume, Resume::Untouched) {
            return Ok(true);
        }
        let regs = self
            .fd
            .get_regs()
            .map_err(|e| MachineError::Kvm("KVM_GET_REGS", e))?;
        let sregs = self
            .fd
            .get_sregs()
            .map_err(|e| MachineError::Kvm("KVM_GET_SREGS", e))?;
        if sregs.cs.dpl != 3 {
            return Ok(false);
        }
        self.user = regs;
        self.fs_base = sregs.fs.base;
        self.gs_base = sregs.gs.base;
        self.resume = Resume::Fresh;
        Ok(true)
    }

    /// The full XSAVE area (FPU, SSE, AVX...), for signal frames and checkpoints.
    pub fn get_xsave(&self) -> Result<Xsave, MachineError> {
        let mut xsave = Xsave::new((self.xsave_size - 4096).div_ceil(4))
            .map_err(|e| MachineError::VcpuFailed(format!("xsave buffer: {e:?}")))?;
        // SAFETY: the buffer was sized from KVM_CAP_XSAVE2 as the ioctl requires.
        unsafe { self.fd.get_xsave2(&mut xsave) }
            .map_err(|e| MachineError::Kvm("KVM_GET_XSAVE2", e))?;
        Ok(xsave)
    }

    pub fn set_xsave(&self, xsave: &Xsave) -> Result<(), MachineError> {
        // SAFETY: the buffer came from get_xsave on a vCPU of the same kind.
        unsafe { self.fd.set_xsave2(xsave) }.map_err(|e| MachineError::Kvm("KVM_SET_XSAVE", e))
    }

    /// The guest-visible CPU state, for a checkpoint. None when the vCPU was stopped
    /// inside a CPL0 stub (it then reaches a clean exit on its next run).
    pub fn capture(&mut self) -> Result<Option<VcpuState>, MachineError> {
        if !self.refresh_user_state()? {
            return Ok(None);
        }
        let xsave = self.get_xsave()?;
        let u = &self.user;
        Ok(Some(VcpuState {
            index: self.index,
            regs: [
                u.rax, u.rbx, u.rcx, u.rdx, u.rsi, u.rdi, u.rsp, u.rbp, u.r8, u.r9, u.r10, u.r11,
                u.r12, u.r13, u.r14, u.r15, u.rip, u.rflags,
            ],
            fs_base: self.fs_base,
            gs_base: self.gs_base,
            xsave: xsave.as_slice_with_header(),
        }))
    }

    /// Puts back only the FPU/SSE/AVX part of a captured state (exec starts a program
    /// with a freshly reset FPU).
    pub fn restore_fpu(&mut self, s: &VcpuState) -> Result<(), MachineError> {
        let mut xsave = self.get_xsave()?;
        {
            // SAFETY: exclusive access to the buffer we own; only the fixed 4 KiB region
            // plus as many trailing words as both sides have are copied.
            let fam = unsafe { xsave.as_mut_fam_struct() };
            for (i, w) in fam.xsave.region.iter_mut().enumerate() {
                *w = s.xsave.get(i).copied().unwrap_or(0);
            }
        }
        let extra = s.xsave.len().saturating_sub(1024);
        if extra > 0 {
            let n = xsave.as_slice().len().min(extra);
            xsave.as_mut_slice()[..n].copy_from_slice(&s.xsave[1024..1024 + n]);
        }
        self.set_xsave(&xsave)
    }

    /// Loads a captured state; the next run enters user mode with it.
    pub fn restore(&mut self, s: &VcpuState) -> Result<(), MachineError> {
        let r = &s.regs;
        self.user = kvm_regs {
            rax: r[0],
            rbx: r[1],
            rcx: r[2],
            rdx: r[3],
            rsi: r[4],
            rdi: r[5],
            rsp: r[6],
            rbp: r[7],
            r8: r[8],
            r9: r[9],
            r10: r[10],
            r11: r[11],
            r12: r[12],
            r13: r[13],
            r14: r[14],
            r15: r[15],
            rip: r[16],
            rflags: r[17],
        };
        self.fs_base = s.fs_base;
        self.gs_base = s.gs_base;
        self.resume = Resume::Fresh;
        self.sregs_dirty = true;
        self.restore_fpu(s)
    }

    fn describe_state(&self) -> String {
        match self.fd.get_regs() {
            Ok(r) => format!("rip {:#x} rsp {:#x}", r.rip, r.rsp),
            Err(_) => "unknown state".into(),
        }
    }
}

fn msr(index: u32, data: u64) -> kvm_bindings::kvm_msr_entry {
    kvm_bindings::kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}
