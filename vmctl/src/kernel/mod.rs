//! The kernel layer: vmctl as the guest's operating system. It owns the job's
//! processes and threads, their address spaces, descriptors and signals, and services
//! every syscall and fault the machine layer reports, on the host, on the guest's
//! behalf.
//!
//! `Kernel` is what all tasks share (the VM, guest RAM and its frames, the pid space,
//! futex queues, clocks); `ThreadGroup` is a process; `Task` is a thread, run by its
//! own host thread on its own vCPU.

pub mod exit;
mod exits;
pub mod files;
pub mod freeze;
pub mod fs_context;
pub mod futex;
pub mod loader;
pub mod mm;
pub mod persist;
pub mod pids;
pub mod process;
mod sigframe;
pub mod signals;
pub mod task;
pub mod thread_group;
pub mod timers;
pub mod vdso;

pub use sigframe::sigreturn as sigframe_return;

use crate::machine::{self, GuestMemory, MachineError, Vcpu, Vm};
use files::{FdTable, OpenFile};
use freeze::Freezer;
use fs_context::FsContext;
use futex::FutexTable;
use loader::{ExecError, HostInfo};
use mm::{AddressSpace, Commit, FrameAllocator, MmCtx, SharedRegions};
use pids::PidTable;
use process::ExitStatus;
use signals::{QueuedSig, ThreadSignals};
use std::collections::HashSet;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use task::{Task, TaskHandle, ThreadState, INTR_FREEZE, INTR_KILL, INTR_SIGNAL};
use thiserror::Error;
use thread_group::{Life, Resources, TgState, ThreadGroup};
use timers::Timers;

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
    #[error("cannot use the working directory: {0}")]
    Cwd(std::io::Error),
}

/// What the user asked `vmctl run` to start.
pub struct Launch {
    pub program: PathBuf,
    pub argv: Vec<Vec<u8>>,
    pub envp: Vec<Vec<u8>>,
    /// Guest RAM, also the commit limit of private writable memory.
    pub mem: u64,
}

/// How the job ended, as the main thread reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// The job's first process ended.
    Exited(ExitStatus),
    /// vmctl itself failed (a KVM error): the message says why.
    Failed(String),
}

/// The vCPUs not running a task, kept for the next thread or process: a new vCPU
/// costs a CPL0 first run.
#[derive(Default)]
struct VcpuPool {
    free: Vec<Vcpu>,
    next_index: u64,
}

/// What every task shares.
pub struct Kernel {
    pub vm: Vm,
    pub mem: Arc<GuestMemory>,
    pub frames: Mutex<FrameAllocator>,
    pub shared: Mutex<SharedRegions>,
    pub commit: Commit,
    pub pids: Mutex<PidTable>,
    pub futexes: FutexTable,
    pub freezer: Freezer,
    /// What a restore needs to bring the job's files back to its newest generation.
    pub files_journal: crate::filejournal::track::FileJournal,
    pub timers: Timers,
    pub host: HostInfo,
    /// Added to the host's monotonic clocks, so a restored guest's CLOCK_MONOTONIC
    /// continues from its checkpoint instead of jumping.
    pub clock_offset_ns: i64,
    /// Added to the host TSC when guest rdtsc is trapped: set on a restore where the
    /// host's TSC is behind the checkpoint's, so the guest's never goes backwards.
    pub tsc_offset: u64,
    pub tsc_trap: bool,
    /// The XSAVE image of a freshly reset FPU, for exec.
    pub clean_fpu: machine::VcpuState,
    /// The guest's clocks, for the vDSO and the clock syscalls alike. The vDSO's
    /// frames, shared by every process, are `host.vdso`.
    pub clocks: Arc<vdso::GuestClocks>,
    /// `--reexec`: programs (canonical paths) that a restore starts again instead of
    /// resuming, because their state is their connections (see `ExecRecord`).
    pub reexec_programs: std::sync::OnceLock<Vec<std::path::PathBuf>>,
    _clock_refresher: vdso::Refresher,
    /// VMCTL_COUNT_EXITS: every task's exits, reported when the job ends.
    exits: Option<exits::ExitCounter>,
    vcpus: Mutex<VcpuPool>,
    warned: Mutex<HashSet<u64>>,
    job: Mutex<Option<JobEnd>>,
    main_thread: AtomicU64,
}

/// Most threads and processes a job may have at once: each needs a vCPU.
pub const MAX_TASKS: usize = machine::layout::MAX_VCPUS as usize;

impl Kernel {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vm: Vm,
        frames: FrameAllocator,
        commit: Commit,
        pids: PidTable,
        host: HostInfo,
        clean_fpu: machine::VcpuState,
        first_vcpu_index: u64,
        clock_offset_ns: i64,
        tsc_offset: u64,
        tsc_trap: bool,
        shared: SharedRegions,
        clocks: Arc<vdso::GuestClocks>,
    ) -> Kernel {
        Kernel {
            mem: vm.memory().clone(),
            vm,
            frames: Mutex::new(frames),
            shared: Mutex::new(shared),
            commit,
            pids: Mutex::new(pids),
            futexes: FutexTable::default(),
            freezer: Freezer::default(),
            files_journal: Default::default(),
            timers: Timers::default(),
            host,
            clock_offset_ns,
            tsc_offset,
            tsc_trap,
            clean_fpu,
            reexec_programs: std::sync::OnceLock::new(),
            _clock_refresher: clocks.start(),
            exits: exits::ExitCounter::from_env(),
            clocks,
            vcpus: Mutex::new(VcpuPool {
                free: Vec::new(),
                next_index: first_vcpu_index,
            }),
            warned: Mutex::new(HashSet::new()),
            job: Mutex::new(None),
            main_thread: AtomicU64::new(0),
        }
    }

    /// Starts the job's first process; returns the kernel and its first task, which
    /// the caller runs on a thread of its own.
    /// Sets `--reexec`'s programs (once, before the tasks run). Each is made
    /// canonical, so a program exec'd through a symlink or another spelling of its
    /// path is recognised; one that does not exist here is ignored.
    pub fn set_reexec_programs(&self, programs: &[std::path::PathBuf]) {
        let canonical = programs
            .iter()
            .filter_map(|p| std::fs::canonicalize(p).ok())
            .collect();
        let _ = self.reexec_programs.set(canonical);
    }

    /// Whether a process exec'ing `exe` is to be started again on a restore.
    pub fn reexecuted_on_restore(&self, exe: &std::path::Path) -> bool {
        match self.reexec_programs.get() {
            Some(list) if !list.is_empty() => std::fs::canonicalize(exe)
                .map(|c| list.contains(&c))
                .unwrap_or(false),
            _ => false,
        }
    }

    pub fn boot(vm: Vm, launch: &Launch) -> Result<(Arc<Kernel>, Task), KernelError> {
        let mem = vm.memory().clone();
        let mut frames = FrameAllocator::new(machine::layout::SYSTEM_SIZE, mem.size());
        let commit = Commit::new(launch.mem);
        let mut mm =
            AddressSpace::new(&mem, &mut frames, vm.system_half()).ok_or(KernelError::NoMemory)?;
        // VMCTL_VDSO=0 leaves the vDSO out, as Linux's vdso=0 does: an escape hatch,
        // at the price of an exit per clock read.
        let vdso = match std::env::var_os("VMCTL_VDSO") {
            Some(v) if v == "0" => None,
            _ => Some(vdso::VdsoFrames::install(&mem, &mut frames).ok_or(KernelError::NoMemory)?),
        };
        // Created before the program is loaded, so that loading counts towards the
        // time the TSC rate is measured over before the guest starts.
        let clocks = vdso::GuestClocks::new(mem.clone(), vdso.map(|v| v.vvar), None, true);
        let mut vcpu = vm.create_vcpu(0, mm.root)?;
        let clean_fpu = vcpu
            .capture()?
            .ok_or_else(|| MachineError::VcpuFailed("a new vCPU is not at a clean point".into()))?;
        let rlimits = host_rlimits();
        let stack = rlimits[libc::RLIMIT_STACK as usize]
            .0
            .clamp(128 << 10, 64 << 20);
        let host = host_info(vdso);
        let start = {
            let mut ctx = MmCtx {
                mem: &mem,
                frames: &mut frames,
                vcpu: &mut vcpu,
                commit: &commit,
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
        vcpu.start_user(
            kvm_bindings::kvm_regs {
                rip: start.entry,
                rsp: start.stack_pointer,
                rflags: 0x202,
                ..Default::default()
            },
            0,
            0,
        );
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
        let fs = FsContext::inherit().map_err(KernelError::Cwd)?;
        // SAFETY: identity calls that cannot fail.
        let (pid, ppid, pgid, sid) = unsafe {
            (
                libc::getpid(),
                libc::getppid(),
                libc::getpgrp(),
                libc::getsid(0),
            )
        };
        let cmdline: Vec<u8> = launch
            .argv
            .iter()
            .flat_map(|a| a.iter().copied().chain([0]))
            .collect();
        let comm = comm_of(&start.exe);
        let mut st = TgState::new_root(ppid, pgid, sid, start.exe, cmdline);
        st.rlimits = rlimits;
        let tg = ThreadGroup::new(pid, st);
        let res = Resources {
            mm: Arc::new(Mutex::new(mm)),
            files: Arc::new(Mutex::new(files)),
            fs: Arc::new(Mutex::new(fs)),
        };
        let h = TaskHandle::new(pid, tg.clone(), res.clone(), ThreadSignals::default(), comm);
        tg.lock().threads.push(h.clone());
        let mut pids = PidTable {
            next: pid + 1,
            root: pid,
            ..Default::default()
        };
        pids.groups.insert(pid, tg);
        pids.tasks.insert(pid, h.clone());
        let k = Arc::new(Kernel::new(
            vm,
            frames,
            commit,
            pids,
            host,
            clean_fpu,
            1,
            0,
            0,
            false,
            SharedRegions::default(),
            clocks,
        ));
        let task = Task {
            k: k.clone(),
            h,
            vcpu,
            res,
            thread: ThreadState::default(),
            exit: None,
            recheck: false,
        };
        Ok((k, task))
    }

    /// Guest RAM for a commit limit of `limit`: slack for page tables and partly used
    /// 2 MiB blocks.
    pub fn ram_for(limit: u64) -> u64 {
        (limit + limit / 8 + (64 << 20)).next_multiple_of(machine::memory::HUGE_PAGE)
    }

    /// The guest's CLOCK_MONOTONIC now.
    pub fn guest_monotonic_ns(&self) -> i64 {
        crate::clock::monotonic_ns() + self.clock_offset_ns
    }

    /// Counts one exit of a task's vCPU (VMCTL_COUNT_EXITS); `nr` is the syscall
    /// number for a syscall exit.
    pub fn count_exit(&self, exit: &machine::Exit, nr: u64) {
        if let Some(c) = &self.exits {
            c.count(exit, nr);
        }
    }

    /// Prints the exit counts of all tasks (VMCTL_COUNT_EXITS) once the job is over.
    pub fn report_exits(&self) {
        if let Some(c) = &self.exits {
            c.report(self.clocks.max_error_ns());
        }
    }

    pub fn warn_unsupported(&self, nr: u64) {
        if self.warned.lock().expect("warned poisoned").insert(nr) {
            eprintln!(
                "vmctl: warning: unsupported syscall {} ({nr}), returning ENOSYS",
                crate::syscalls::name(nr)
            );
        }
    }

    /// Records the thread that waits for the job (see `job_end`).
    pub fn set_main_thread(&self) {
        // SAFETY: pthread_self cannot fail.
        let me = unsafe { libc::pthread_self() };
        self.main_thread.store(me as u64, Ordering::SeqCst);
    }

    fn notify_main(&self) {
        let t = self.main_thread.load(Ordering::SeqCst);
        if t != 0 {
            crate::control::signals::notify(t as libc::pthread_t);
        }
    }

    /// The job's first process ended.
    pub fn job_end(&self, status: ExitStatus) {
        // Shared file mappings reach their files before the job is gone.
        self.shared.lock().expect("shared poisoned").msync_all();
        self.job
            .lock()
            .expect("job poisoned")
            .get_or_insert(JobEnd::Exited(status));
        self.notify_main();
    }

    /// vmctl itself cannot go on (a KVM failure).
    pub fn fail(&self, why: String) {
        self.job
            .lock()
            .expect("job poisoned")
            .get_or_insert(JobEnd::Failed(why));
        self.notify_main();
    }

    pub fn job_status(&self) -> Option<JobEnd> {
        self.job.lock().expect("job poisoned").clone()
    }

    /// A vCPU for a new task: a pooled one, or a new one (EAGAIN past the limit).
    pub fn take_vcpu(&self, cr3: u64) -> Result<Vcpu, Errno> {
        let mut pool = self.vcpus.lock().expect("vcpu pool poisoned");
        if let Some(mut v) = pool.free.pop() {
            v.set_cr3(cr3);
            return Ok(v);
        }
        if pool.next_index >= machine::layout::MAX_VCPUS {
            return Err(Errno(libc::EAGAIN));
        }
        let index = pool.next_index;
        // KVM keeps a vCPU id once created, even if its start-up then fails: the
        // index is used up either way.
        pool.next_index += 1;
        self.vm.create_vcpu(index, cr3).map_err(|e| {
            eprintln!("vmctl: cannot create a vCPU for a new guest thread: {e}");
            Errno(libc::EAGAIN)
        })
    }

    pub fn put_vcpu(&self, v: Vcpu) {
        self.vcpus.lock().expect("vcpu pool poisoned").free.push(v);
    }

    /// After address spaces were torn down: flush the shadow MMU so their page-table
    /// frames can be reused, and drop memslots of shared mappings nobody maps now.
    pub fn flush_released(&self) {
        let mut frames = self.frames.lock().expect("frames poisoned");
        if frames.has_quarantine() {
            if let Err(e) = self.vm.flush_shadow() {
                eprintln!("vmctl: {e}");
                return;
            }
            frames.release_quarantine();
        }
        drop(frames);
        if let Err(e) = self
            .shared
            .lock()
            .expect("shared poisoned")
            .collect(&self.vm)
        {
            eprintln!("vmctl: {e}");
        }
    }

    /// Queues a process-directed signal and wakes a thread that can take it.
    pub fn signal_group(&self, tg: &ThreadGroup, sig: i32, info: QueuedSig) {
        if sig == 0 {
            return;
        }
        if sig == libc::SIGKILL {
            self.kill_group(tg, ExitStatus::Signal(libc::SIGKILL), None);
            return;
        }
        let threads = {
            let mut st = tg.lock();
            if !matches!(st.life, Life::Running) {
                return;
            }
            st.pending.add(sig, info);
            st.threads.clone()
        };
        for t in threads {
            if t.signals().blocked & signals::sig_bit(sig) == 0 {
                t.interrupt(INTR_SIGNAL);
            }
        }
    }

    /// Queues a signal for one thread.
    pub fn signal_thread(&self, t: &TaskHandle, sig: i32, info: QueuedSig) {
        if sig == 0 {
            return;
        }
        if sig == libc::SIGKILL {
            self.kill_group(&t.tg, ExitStatus::Signal(libc::SIGKILL), None);
            return;
        }
        t.signals().pending.add(sig, info);
        t.interrupt(INTR_SIGNAL);
    }

    /// Ends a process: every thread but `except` is stopped.
    pub fn kill_group(&self, tg: &ThreadGroup, status: ExitStatus, except: Option<i32>) {
        let threads = {
            let mut st = tg.lock();
            if let Life::Running = st.life {
                st.life = Life::Exiting(status);
            }
            st.threads.clone()
        };
        for t in threads {
            if Some(t.tid) != except {
                t.interrupt(INTR_KILL);
            }
        }
    }

    /// A host signal passed on to the job: every process gets it, as Slurm signals
    /// every process of a step.
    pub fn signal_all(&self, sig: i32) {
        let groups = self.pids.lock().expect("pids poisoned").live_groups();
        let info = QueuedSig {
            code: 0, // SI_USER
            pid: 0,
            uid: self.host.uid,
            status: 0,
        };
        for g in groups {
            self.signal_group(&g, sig, info);
        }
    }

    pub fn live_tids(&self) -> Vec<i32> {
        self.pids
            .lock()
            .expect("pids poisoned")
            .tasks
            .keys()
            .copied()
            .collect()
    }

    fn all_tasks(&self) -> Vec<Arc<TaskHandle>> {
        self.pids
            .lock()
            .expect("pids poisoned")
            .tasks
            .values()
            .cloned()
            .collect()
    }

    /// Stops every task at a clean point and returns their states.
    pub fn freeze_all(&self) -> Vec<freeze::TaskSnapshot> {
        self.freezer.begin();
        for t in self.all_tasks() {
            t.interrupt(INTR_FREEZE);
        }
        self.freezer.wait_all(|| self.live_tids())
    }

    pub fn thaw_all(&self) {
        for t in self.all_tasks() {
            t.clear_flags(INTR_FREEZE);
        }
        self.freezer.thaw();
    }

    /// Stops every task for good (the job is over).
    pub fn kill_all(&self) {
        for t in self.all_tasks() {
            t.interrupt(INTR_KILL);
        }
    }

    /// Starts the thread that kicks tasks again for as long as something waits for
    /// them. A kick can land after a task last looked at its flags and before it
    /// blocks in a host call made for the guest (a read from a pipe, say); nothing
    /// would then wake the call. Kicking again every 20 ms closes that gap without
    /// any locking on the syscall path.
    pub fn start_watchdog(self: &Arc<Kernel>) {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("vmctl-watchdog".into())
            .spawn(move || {
                crate::control::signals::block_in_this_thread();
                loop {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    let Some(k) = weak.upgrade() else { return };
                    for t in k.all_tasks() {
                        if t.flags() & (INTR_SIGNAL | INTR_KILL) != 0
                            || (t.flags() & INTR_FREEZE != 0 && !k.freezer.is_parked(t.tid))
                        {
                            t.kick();
                        }
                    }
                }
            })
            .expect("spawn watchdog thread");
    }
}

fn host_info(vdso: Option<vdso::VdsoFrames>) -> HostInfo {
    // SAFETY: these identity calls cannot fail.
    unsafe {
        HostInfo {
            hwcap: host_hwcap(),
            minsigstksz: sigframe::frame_size(xsave_user_size()),
            uid: libc::getuid(),
            euid: libc::geteuid(),
            gid: libc::getgid(),
            egid: libc::getegid(),
            vdso,
        }
    }
}

/// The name /proc shows for a program: its file name, cut to 15 bytes.
pub fn comm_of(exe: &std::path::Path) -> [u8; 16] {
    let mut name = [0u8; 16];
    let base = exe
        .file_name()
        .map(|n| n.as_encoded_bytes().to_vec())
        .unwrap_or_default();
    let n = base.len().min(15);
    name[..n].copy_from_slice(&base[..n]);
    name
}

pub(crate) fn host_rlimits() -> Vec<(u64, u64)> {
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
