//! A guest thread (a task) and the host thread that runs it.
//!
//! Every guest thread has its own vCPU and its own host thread, so a job's threads
//! and processes run in parallel on the host's cores. The host thread runs the
//! vCPU, services its syscalls and faults, and between two exits looks at what
//! others asked of it through its `TaskHandle`: a signal to deliver, a freeze for a
//! checkpoint, or the end of its process.

use super::files::FdTable;
use super::freeze::TaskSnapshot;
use super::fs_context::FsContext;
use super::futex::FutexKey;
use super::mm::{Access, AddressSpace, Fault, MmCtx};
use super::process::{ExitStatus, Rseq};
use super::signals::{
    default_action, sig_bit, DefaultAction, QueuedSig, ThreadSignals, SIG_DFL, SIG_IGN,
};
use super::thread_group::{Life, Resources, ThreadGroup};
use super::{sigframe, Errno, Kernel};
use crate::control::signals as host_signals;
use crate::machine::{Exit, Vcpu};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// A signal may be deliverable: look at the pending sets.
pub const INTR_SIGNAL: u32 = 1;
/// Stop at a clean point for a checkpoint.
pub const INTR_FREEZE: u32 = 2;
/// The thread's process is ending: stop running guest code.
pub const INTR_KILL: u32 = 4;

/// The part of a task that other threads reach: to signal it, wake it or stop it.
pub struct TaskHandle {
    pub tid: i32,
    pub tg: Arc<ThreadGroup>,
    pub signals: Mutex<ThreadSignals>,
    res: Mutex<Option<Resources>>,
    flags: AtomicU32,
    /// Bumped by every wake-up; blocking waits sleep on it with a host futex.
    wake_seq: AtomicU32,
    thread: Mutex<Option<libc::pthread_t>>,
    /// The thread's name (comm), as prctl(PR_SET_NAME) and /proc show it.
    pub comm: Mutex<[u8; 16]>,
}

impl std::fmt::Debug for TaskHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "task {}", self.tid)
    }
}

impl TaskHandle {
    pub fn new(
        tid: i32,
        tg: Arc<ThreadGroup>,
        res: Resources,
        signals: ThreadSignals,
        comm: [u8; 16],
    ) -> Arc<TaskHandle> {
        Arc::new(TaskHandle {
            tid,
            tg,
            signals: Mutex::new(signals),
            res: Mutex::new(Some(res)),
            flags: AtomicU32::new(0),
            wake_seq: AtomicU32::new(0),
            thread: Mutex::new(None),
            comm: Mutex::new(comm),
        })
    }

    /// The task's address space, descriptors and working directory. Panics for a
    /// task that has exited (it is then no longer in the pid table).
    pub fn resources(&self) -> Resources {
        self.res
            .lock()
            .expect("task poisoned")
            .clone()
            .expect("resources of an exited task")
    }

    pub fn try_resources(&self) -> Option<Resources> {
        self.res.lock().expect("task poisoned").clone()
    }

    pub fn set_resources(&self, r: Option<Resources>) {
        *self.res.lock().expect("task poisoned") = r;
    }

    pub fn signals(&self) -> MutexGuard<'_, ThreadSignals> {
        self.signals.lock().expect("task signals poisoned")
    }

    pub fn flags(&self) -> u32 {
        self.flags.load(Ordering::SeqCst)
    }

    pub fn clear_flags(&self, bits: u32) {
        self.flags.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Wakes the task if it sleeps in a blocking wait of the kernel layer.
    pub fn wake(&self) {
        self.wake_seq.fetch_add(1, Ordering::SeqCst);
        // SAFETY: a futex wake on a word this handle owns.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.wake_seq.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                i32::MAX,
            )
        };
    }

    /// Asks the task to look at `why` as soon as it can: wakes a blocking wait,
    /// interrupts a blocking host call and stops a running vCPU.
    pub fn interrupt(&self, why: u32) {
        self.flags.fetch_or(why, Ordering::SeqCst);
        self.wake();
        self.kick();
    }

    /// Stops the vCPU or the host call of the task's thread (again).
    pub fn kick(&self) {
        let t = self.thread.lock().expect("task poisoned");
        if let Some(thread) = *t {
            host_signals::kick(thread);
        }
    }

    fn set_thread(&self, t: Option<libc::pthread_t>) {
        *self.thread.lock().expect("task poisoned") = t;
    }

    /// Sleeps until woken, interrupted or `timeout_ns` (relative) passes.
    fn sleep(&self, seq: u32, timeout_ns: Option<i64>) {
        let ts = timeout_ns.map(|ns| libc::timespec {
            tv_sec: ns / 1_000_000_000,
            tv_nsec: ns % 1_000_000_000,
        });
        let tsp = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: a futex wait on a word this handle owns, with a local timespec.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.wake_seq.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                seq,
                tsp,
            )
        };
    }
}

/// Per-thread state that lives in vmctl (the registers live in the vCPU).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThreadState {
    /// sigaltstack: (ss_sp, ss_flags, ss_size).
    pub altstack: (u64, i32, u64),
    /// The mask to put back once a call that blocks with a temporary mask (sigsuspend)
    /// is over: by the handler's sigreturn, or right away if no handler runs.
    pub saved_mask: Option<u64>,
    pub clear_child_tid: u64,
    pub robust_list: (u64, u64),
    pub rseq: Option<Rseq>,
    /// A sleep interrupted by vmctl itself: (user RIP after its syscall, deadline in
    /// guest CLOCK_MONOTONIC ns), so the restarted call sleeps only what was left.
    pub sleep_restart: Option<(u64, i64)>,
    /// vfork: this task waits for the child to exec or exit before it runs again.
    pub vfork_child: Option<i32>,
}

impl Default for ThreadState {
    fn default() -> Self {
        ThreadState {
            altstack: (0, libc::SS_DISABLE, 0),
            saved_mask: None,
            clear_child_tid: 0,
            robust_list: (0, 0),
            rseq: None,
            sleep_restart: None,
            vfork_child: None,
        }
    }
}

/// A task, owned by the host thread that runs it.
pub struct Task {
    pub k: Arc<Kernel>,
    pub h: Arc<TaskHandle>,
    pub vcpu: Vcpu,
    pub res: Resources,
    pub thread: ThreadState,
    /// Set when the thread is done; its host thread then cleans up and ends.
    pub exit: Option<ExitStatus>,
    /// The task changed its own mask or queued itself a signal: look again.
    pub recheck: bool,
}

impl Task {
    pub fn tid(&self) -> i32 {
        self.h.tid
    }

    pub fn tgid(&self) -> i32 {
        self.h.tg.tgid
    }

    pub fn tg(&self) -> &Arc<ThreadGroup> {
        &self.h.tg
    }

    pub fn files(&self) -> MutexGuard<'_, FdTable> {
        self.res.files.lock().expect("fd table poisoned")
    }

    pub fn fs(&self) -> MutexGuard<'_, FsContext> {
        self.res.fs.lock().expect("fs context poisoned")
    }

    pub fn mm(&self) -> MutexGuard<'_, AddressSpace> {
        self.res.mm.lock().expect("address space poisoned")
    }

    /// The identity private futexes of this address space are keyed by.
    pub fn mm_id(&self) -> usize {
        Arc::as_ptr(&self.res.mm) as usize
    }

    pub fn rlimit(&self, resource: u32) -> (u64, u64) {
        self.tg().lock().rlimit(resource)
    }

    /// Runs `f` on this task's address space with what it needs from the machine.
    pub fn with_mm<R>(&mut self, f: impl FnOnce(&mut AddressSpace, &mut MmCtx) -> R) -> R {
        let mut mm = self.res.mm.lock().expect("address space poisoned");
        let mut frames = self.k.frames.lock().expect("frames poisoned");
        let mut ctx = MmCtx {
            mem: &self.k.mem,
            frames: &mut frames,
            vcpu: &mut self.vcpu,
            commit: &self.k.commit,
        };
        f(&mut mm, &mut ctx)
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

    pub fn read_user_u32(&mut self, va: u64) -> Result<u32, Errno> {
        let b = self.read_user(va, 4)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
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

    /// Host address of the aligned u32 at `va` (a futex word), mapping it for `access`.
    pub fn user_word(&mut self, va: u64, access: Access) -> Result<*mut u32, Errno> {
        if !va.is_multiple_of(4) {
            return Err(Errno(libc::EINVAL));
        }
        let iov = self.user_iovecs(va, 4, access)?;
        match iov.as_slice() {
            [one] if one.iov_len == 4 => Ok(one.iov_base as *mut u32),
            _ => Err(Errno(libc::EFAULT)),
        }
    }

    /// The key a futex at `va` is queued under.
    pub fn futex_key(&mut self, va: u64, private: bool) -> Result<FutexKey, Errno> {
        if private {
            return Ok(FutexKey::Private(self.mm_id(), va));
        }
        let mm = self.mm();
        let vma = mm.find(va).ok_or(Errno(libc::EFAULT))?;
        if let super::mm::Backing::File { file, offset, .. } = &vma.backing {
            if vma.shared {
                return Ok(FutexKey::File(
                    file.dev,
                    file.ino,
                    offset + (va - vma.start),
                ));
            }
        }
        if vma.shared {
            drop(mm);
            let iov = self.user_iovecs(va, 4, Access::Read)?;
            let host = iov.first().ok_or(Errno(libc::EFAULT))?.iov_base as u64;
            return Ok(FutexKey::Frame(host - self.k.mem.host_base()));
        }
        Ok(FutexKey::Private(self.mm_id(), va))
    }

    pub fn warn_unsupported(&self, nr: u64) {
        self.k.warn_unsupported(nr);
    }

    /// Blocks until `ready` gives a value, the deadline (host CLOCK_MONOTONIC ns)
    /// passes (ETIMEDOUT), or the task is interrupted (EINTR: a signal, a freeze or
    /// the end of its process; the syscall layer then restarts the call or fails it
    /// as Linux would).
    pub fn wait_until<T>(
        &mut self,
        deadline: Option<i64>,
        mut ready: impl FnMut(&mut Task) -> Result<Option<T>, Errno>,
    ) -> Result<T, Errno> {
        loop {
            let seq = self.h.wake_seq.load(Ordering::SeqCst);
            if let Some(v) = ready(self)? {
                return Ok(v);
            }
            if self.h.flags() != 0 {
                return Err(Errno(libc::EINTR));
            }
            let timeout = match deadline {
                Some(d) => {
                    let left = d - crate::clock::monotonic_ns();
                    if left <= 0 {
                        return Err(Errno(libc::ETIMEDOUT));
                    }
                    Some(left)
                }
                None => None,
            };
            self.h.sleep(seq, timeout);
        }
    }

    /// The host thread's life: run the guest, serve its exits, until the task ends.
    pub fn run(mut self) {
        host_signals::accept_kicks_in_this_thread();
        // SAFETY: pthread_self cannot fail.
        self.h.set_thread(Some(unsafe { libc::pthread_self() }));
        let registration = host_signals::register_vcpu(self.vcpu.kvm_run_ptr());
        if self.k.tsc_trap && crate::clock::trap_rdtsc_on_this_thread() {
            self.vcpu.set_tsd(true);
        }
        // A kick that came before the thread id was known.
        if self.h.flags() != 0 {
            self.h.kick();
        }
        let reexec = {
            let mut st = self.tg().lock();
            if std::mem::take(&mut st.reexec_pending) {
                st.reexec.clone()
            } else {
                None
            }
        };
        if let Some(record) = reexec {
            crate::syscalls::process::reexec_after_restore(&mut self, record);
        }
        while self.service_interrupts() {
            if let Some(child) = self.thread.vfork_child {
                if self.wait_for_vfork(child).is_err() {
                    continue;
                }
            }
            let exit = match self.vcpu.run() {
                Ok(e) => e,
                Err(e) => {
                    self.k.fail(format!("{e}"));
                    self.exit = Some(ExitStatus::Signal(libc::SIGKILL));
                    break;
                }
            };
            self.k.count_exit(&exit, self.vcpu.user_regs().rax);
            match exit {
                Exit::Syscall => crate::syscalls::handle(&mut self),
                Exit::Exception {
                    vector,
                    error_code,
                    cr2,
                } => self.exception(vector, error_code, cr2),
                Exit::Interrupted => {}
                Exit::BadAccess { gpa } => {
                    // Only the doorbell page is mapped without memory behind it; to
                    // the program it is a kernel address, where Linux reports
                    // SEGV_MAPERR.
                    use crate::machine::layout::{MMIO_GPA, MMIO_VA, PAGE_SIZE};
                    let va = if (MMIO_GPA..MMIO_GPA + PAGE_SIZE).contains(&gpa) {
                        MMIO_VA + (gpa - MMIO_GPA)
                    } else {
                        0
                    };
                    self.force_signal(libc::SIGSEGV, 1, va, 14, 0x5);
                }
                // BUS_ADRERR; KVM does not say which address.
                Exit::BadMemory => self.force_signal(libc::SIGBUS, 2, 0, 14, 0x4),
            }
            if self.exit.is_some() {
                break;
            }
            if self.recheck {
                self.recheck = false;
                self.deliver_signals();
            }
        }
        drop(registration);
        self.finish();
    }

    /// Handles what others asked of this task. Returns false once it must end.
    fn service_interrupts(&mut self) -> bool {
        loop {
            if self.exit.is_some() {
                return false;
            }
            let f = self.h.flags();
            if f & INTR_KILL != 0 {
                let status = match self.tg().lock().life {
                    Life::Exiting(s) | Life::Zombie(s) => s,
                    Life::Running => ExitStatus::Signal(libc::SIGKILL),
                };
                self.exit = Some(status);
                return false;
            }
            if f & INTR_FREEZE != 0 {
                match self.vcpu.capture() {
                    Ok(Some(vcpu)) => {
                        let snap = TaskSnapshot {
                            tid: self.tid(),
                            tgid: self.tgid(),
                            vcpu,
                            thread: self.thread.clone(),
                            signals: self.h.signals().clone(),
                            comm: *self.h.comm.lock().expect("comm poisoned"),
                        };
                        // The thaw clears INTR_FREEZE before it lets tasks go.
                        self.k.freezer.park(snap);
                        continue;
                    }
                    // Stopped inside a CPL0 stub: one more run reaches a clean exit.
                    Ok(None) => return true,
                    Err(e) => {
                        self.k.fail(format!("{e}"));
                        self.exit = Some(ExitStatus::Signal(libc::SIGKILL));
                        return false;
                    }
                }
            }
            if f & INTR_SIGNAL != 0 && self.thread.vfork_child.is_none() {
                self.h.clear_flags(INTR_SIGNAL);
                self.deliver_signals();
                continue;
            }
            return true;
        }
    }

    /// A vfork parent waits for its child to exec or exit. The child may be running
    /// on the parent's stack, so no signal handler may run meanwhile (Linux's wait
    /// is only killable): only a freeze or the end of the process interrupts it.
    fn wait_for_vfork(&mut self, child: i32) -> Result<(), Errno> {
        loop {
            let seq = self.h.wake_seq.load(Ordering::SeqCst);
            let done = {
                let pids = self.k.pids.lock().expect("pids poisoned");
                match pids.group(child) {
                    Some(g) => g.lock().vfork_done,
                    None => true,
                }
            };
            if done {
                self.thread.vfork_child = None;
                return Ok(());
            }
            if self.h.flags() & (INTR_FREEZE | INTR_KILL) != 0 {
                return Err(Errno(libc::EINTR));
            }
            self.h.sleep(seq, None);
        }
    }

    fn exception(&mut self, vector: u8, error_code: u64, cr2: u64) {
        let rip = self.vcpu.user_regs().rip;
        let (sig, code, addr) = match vector {
            14 => {
                let access = if error_code & 0x10 != 0 {
                    Access::Exec
                } else if error_code & 2 != 0 {
                    Access::Write
                } else {
                    Access::Read
                };
                match self.with_mm(|mm, ctx| mm.fault(ctx, cr2, access)) {
                    Ok(()) => return,
                    Err(Fault::Unmapped) => (libc::SIGSEGV, 1, cr2), // SEGV_MAPERR
                    Err(Fault::BeyondFile) => (libc::SIGBUS, 2, cr2), // BUS_ADRERR
                    Err(Fault::Protection) => (libc::SIGSEGV, 2, cr2), // SEGV_ACCERR
                    Err(Fault::OutOfMemory) => {
                        eprintln!(
                            "vmctl: guest out of memory at {cr2:#x} (pid {}); raise --mem",
                            self.tgid()
                        );
                        (libc::SIGKILL, 0, 0)
                    }
                }
            }
            13 if error_code == 0 && self.k.tsc_trap && self.emulate_rdtsc() => return,
            0 => (libc::SIGFPE, 1, rip), // FPE_INTDIV
            1 | 3 => {
                // Clear TF so a single-step trap does not fire again on resume.
                self.vcpu.user_regs_mut().rflags &= !(1 << 8);
                // int3 reports SI_KERNEL, as on Linux; a single step is TRAP_TRACE.
                (libc::SIGTRAP, if vector == 3 { 0x80 } else { 2 }, rip)
            }
            6 => (libc::SIGILL, 2, rip), // ILL_ILLOPN
            16 | 19 => (libc::SIGFPE, 0, rip),
            17 => (libc::SIGBUS, 1, rip),
            _ => (libc::SIGSEGV, 0x80, 0), // SI_KERNEL, as Linux reports #GP
        };
        self.force_signal(sig, code, addr, vector, error_code);
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
        let tsc = crate::clock::host_tsc().wrapping_add(self.k.tsc_offset);
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
    fn force_signal(&mut self, sig: i32, code: i32, addr: u64, trapno: u8, err: u64) {
        let action = self.tg().lock().actions[sig as usize];
        let blocked = self.h.signals().blocked & sig_bit(sig) != 0;
        if sig == libc::SIGKILL || action.handler == SIG_DFL || action.handler == SIG_IGN || blocked
        {
            // A fault that cannot be handled kills the process, as Linux does for
            // blocked or ignored synchronous signals.
            self.group_exit(ExitStatus::Signal(sig));
            return;
        }
        let info = sigframe::SigInfo {
            signo: sig,
            code,
            addr,
            pid: 0,
            uid: 0,
            status: 0,
        };
        self.setup_frame(sig, info, trapno, err);
    }

    /// Queues `sig` for this very thread (raise, tgkill to itself, SIGPIPE).
    pub fn signal_self(&mut self, sig: i32, info: QueuedSig) {
        if sig == 0 {
            return;
        }
        self.h.signals().pending.add(sig, info);
        self.recheck = true;
    }

    /// The next deliverable signal: this thread's own first, then the process's.
    fn next_signal(&mut self) -> Option<(i32, QueuedSig)> {
        let tg = self.h.tg.clone();
        let mut st = tg.lock();
        let mut ts = self.h.signals();
        let blocked = ts.blocked;
        if let Some(sig) = ts.pending.first_unblocked(blocked) {
            return ts.pending.take(sig).map(|i| (sig, i));
        }
        let sig = st.pending.first_unblocked(blocked)?;
        st.pending.take(sig).map(|i| (sig, i))
    }

    /// Delivers pending, unblocked signals: default actions, or handler frames.
    pub fn deliver_signals(&mut self) {
        while self.exit.is_none() {
            let Some((sig, queued)) = self.next_signal() else {
                break;
            };
            let action = self.tg().lock().actions[sig as usize];
            if action.handler == SIG_IGN {
                continue;
            }
            if action.handler == SIG_DFL {
                match default_action(sig) {
                    DefaultAction::Ignore | DefaultAction::Continue | DefaultAction::Stop => {
                        continue
                    }
                    DefaultAction::Terminate | DefaultAction::CoreDump => {
                        self.group_exit(ExitStatus::Signal(sig));
                        return;
                    }
                }
            }
            // A handler frame is built from the interrupted registers, which after an
            // interruption must first be read. If the vCPU stopped inside a CPL0 stub
            // the signal waits for that stub's exit, a moment later.
            match self.vcpu.refresh_user_state() {
                Ok(true) => {}
                Ok(false) => {
                    self.h.signals().pending.add(sig, queued);
                    self.recheck = true;
                    return;
                }
                Err(e) => {
                    self.k.fail(format!("{e}"));
                    self.exit = Some(ExitStatus::Signal(libc::SIGKILL));
                    return;
                }
            }
            let info = sigframe::SigInfo {
                signo: sig,
                code: queued.code,
                addr: 0,
                pid: queued.pid,
                uid: queued.uid,
                status: queued.status,
            };
            self.setup_frame(sig, info, 0, 0);
        }
        // No handler ran for a call that set a temporary mask: put the old one back.
        if let Some(m) = self.thread.saved_mask.take() {
            self.h.signals().blocked = m;
        }
    }

    fn setup_frame(&mut self, sig: i32, info: sigframe::SigInfo, trapno: u8, err: u64) {
        if sigframe::push(self, sig, info, trapno, err).is_err() {
            // No room for the frame: Linux kills with SIGSEGV.
            self.group_exit(ExitStatus::Signal(libc::SIGSEGV));
        }
    }

    /// Ends the whole process (exit_group, a fatal signal): its other threads are
    /// stopped and this one ends.
    pub fn group_exit(&mut self, status: ExitStatus) {
        self.k.kill_group(self.tg(), status, Some(self.tid()));
        self.exit = Some(status);
    }

    /// Ends this thread only (exit).
    pub fn thread_exit(&mut self, status: ExitStatus) {
        self.exit = Some(status);
    }

    /// The thread is done: wake whoever joins it, leave the process, and with the
    /// last thread, end the process.
    fn finish(mut self) {
        let status = self.exit.unwrap_or(ExitStatus::Signal(libc::SIGKILL));
        let ctid = self.thread.clear_child_tid;
        if ctid != 0 && self.write_user(ctid, &0u32.to_le_bytes()).is_ok() {
            let key = FutexKey::Private(self.mm_id(), ctid);
            self.k.futexes.wake(key, 1, u32::MAX);
        }
        self.release_robust_list();
        let tg = self.h.tg.clone();
        let last = {
            let mut pids = self.k.pids.lock().expect("pids poisoned");
            pids.tasks.remove(&self.tid());
            let mut st = tg.lock();
            st.threads.retain(|t| t.tid != self.h.tid);
            let last = st.threads.is_empty();
            if last {
                // A zombie from now on, in the same step as its last thread goes: a
                // checkpoint taken while the rest of the exit runs records a process
                // its parent can collect, never one with no thread left to end it.
                let s = match st.life {
                    Life::Exiting(s) => s,
                    _ => status,
                };
                st.life = Life::Zombie(s);
            }
            last
        };
        self.h.set_thread(None);
        self.h.set_resources(None);
        if last {
            let status = match tg.lock().life {
                Life::Exiting(s) | Life::Zombie(s) => s,
                _ => status,
            };
            super::exit::process_exit(&mut self, status);
        }
        let Task { k, vcpu, res, .. } = self;
        drop(res);
        k.put_vcpu(vcpu);
        k.freezer.task_gone();
    }

    /// Robust futexes a dying thread held: mark them OWNER_DIED and wake a waiter,
    /// as Linux's exit_robust_list does.
    fn release_robust_list(&mut self) {
        const FUTEX_OWNER_DIED: u32 = 0x4000_0000;
        const FUTEX_WAITERS: u32 = 0x8000_0000;
        const FUTEX_TID_MASK: u32 = 0x3fff_ffff;
        let (head, len) = self.thread.robust_list;
        if head == 0 || len != 24 {
            return;
        }
        let Ok(h) = self.read_user(head, 24) else {
            return;
        };
        let word =
            |b: &[u8], i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8"));
        let offset = word(&h, 1) as i64;
        let pending = word(&h, 2);
        let mut entry = word(&h, 0);
        let mut seen = 0;
        let visit = |t: &mut Task, e: u64| {
            let addr = (e as i64).wrapping_add(offset) as u64;
            let Ok(val) = t.read_user_u32(addr) else {
                return;
            };
            if val & FUTEX_TID_MASK != t.tid() as u32 {
                return;
            }
            let new = (val & FUTEX_WAITERS) | FUTEX_OWNER_DIED;
            if t.write_user(addr, &new.to_le_bytes()).is_ok() && val & FUTEX_WAITERS != 0 {
                if let Ok(key) = t.futex_key(addr, false) {
                    t.k.futexes.wake(key, 1, u32::MAX);
                }
                let key = FutexKey::Private(t.mm_id(), addr);
                t.k.futexes.wake(key, 1, u32::MAX);
            }
        };
        while entry != head && entry != 0 && seen < 2048 {
            let next = self.read_user_u64(entry).unwrap_or(0);
            if entry != pending {
                visit(self, entry & !1);
            }
            entry = next;
            seen += 1;
        }
        if pending != 0 {
            visit(self, pending & !1);
        }
    }
}
