//! A guest process (a thread group): what its threads share and what its parent
//! sees of it. Per-thread state lives in `task.rs`; what CLONE_* flags may share
//! between processes (the address space, the descriptor table, the working
//! directory) is held through `Resources`, one `Arc` per shared object.

use super::files::FdTable;
use super::fs_context::FsContext;
use super::mm::AddressSpace;
use super::process::ExitStatus;
use super::signals::{SigAction, SigQueue, NSIG};
use super::task::TaskHandle;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

/// The objects a task works on that clone can share with another task.
#[derive(Clone)]
pub struct Resources {
    pub mm: Arc<Mutex<AddressSpace>>,
    pub files: Arc<Mutex<FdTable>>,
    pub fs: Arc<Mutex<FsContext>>,
}

/// An interval timer of the process (ITIMER_REAL, _VIRTUAL or _PROF): the guest
/// CLOCK_MONOTONIC deadline of its next expiry (0 = disarmed) and its period.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ITimer {
    pub deadline_ns: i64,
    pub interval_ns: i64,
}

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Life {
    Running,
    /// exit_group or a fatal signal: its threads are being stopped.
    Exiting(ExitStatus),
    /// All threads gone; waits for its parent to collect the status.
    Zombie(ExitStatus),
}

/// Process state that its threads share, as a checkpoint records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TgState {
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub life: Life,
    /// Signal sent to the parent when the process ends (SIGCHLD, or clone's choice).
    pub exit_signal: i32,
    pub actions: Vec<SigAction>,
    /// Process-directed signals waiting for a thread that does not block them.
    pub pending: SigQueue,
    pub exe: PathBuf,
    /// argv as /proc/<pid>/cmdline shows it: each argument NUL-terminated.
    pub cmdline: Vec<u8>,
    pub rlimits: Vec<(u64, u64)>,
    pub itimers: [ITimer; 3],
    /// A vfork child has not yet exec'd or exited: the parent task waits for this.
    pub vfork_done: bool,
    /// prctl(PR_SET_PDEATHSIG): the signal this process gets when its parent ends.
    #[serde(default)]
    pub pdeath_signal: i32,
    /// How the program was started, for a program vmctl starts again on a restore
    /// (`--reexec`); None for every other process. Absent from older checkpoints.
    #[serde(default)]
    pub reexec: Option<ExecRecord>,
    /// Set by a restore on a process with a `reexec` record: its one task execs
    /// the program again (or, for a forked copy, ends) before it runs any guest
    /// code (not saved: no checkpoint can be taken before).
    #[serde(skip)]
    pub reexec_pending: bool,
    /// Live threads, by tid (not saved: the tasks themselves are).
    #[serde(skip)]
    pub threads: Vec<Arc<TaskHandle>>,
}

/// What an execve was given, kept for a program whose state is its connections to
/// the outside (srun: sockets to slurmctld and the nodes), which a checkpoint cannot
/// carry. On a restore vmctl execs the same program again in the same process (pid,
/// parent, descriptors, working directory), so its parent still waits for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRecord {
    pub path: PathBuf,
    pub argv: Vec<Vec<u8>>,
    pub envp: Vec<Vec<u8>>,
    /// The calling thread's signal mask and the ignored signals, as exec left them.
    pub blocked: u64,
    pub ignored: u64,
    /// A process forked by the program and still running it (srun's shepherd,
    /// which ends the step when it sees srun go): it belongs to the run that is
    /// replaced, so a restore ends it (SIGKILL) before it runs.
    #[serde(default)]
    pub forked: bool,
}

impl ExecRecord {
    /// Bytes of argv and environment, bounded like execve's (ARG_MAX) when a
    /// checkpoint is read.
    pub fn size(&self) -> usize {
        self.argv
            .iter()
            .chain(&self.envp)
            .map(|a| a.len() + 1 + 8)
            .sum::<usize>()
            + self.path.as_os_str().len()
    }
}

pub struct ThreadGroup {
    pub tgid: i32,
    state: Mutex<TgState>,
}

impl ThreadGroup {
    pub fn new(tgid: i32, state: TgState) -> Arc<ThreadGroup> {
        Arc::new(ThreadGroup {
            tgid,
            state: Mutex::new(state),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, TgState> {
        self.state.lock().expect("thread group poisoned")
    }

    /// The resources of one of its live threads (the leader's if it lives), for
    /// /proc and for checkpoints.
    pub fn resources(&self) -> Option<Resources> {
        let st = self.lock();
        st.threads.first().map(|t| t.resources())
    }
}

impl TgState {
    pub fn new_root(ppid: i32, pgid: i32, sid: i32, exe: PathBuf, cmdline: Vec<u8>) -> TgState {
        TgState {
            ppid,
            pgid,
            sid,
            life: Life::Running,
            exit_signal: libc::SIGCHLD,
            actions: vec![SigAction::default(); NSIG + 1],
            pending: SigQueue::default(),
            exe,
            cmdline,
            rlimits: super::host_rlimits(),
            itimers: [ITimer::default(); 3],
            vfork_done: true,
            pdeath_signal: 0,
            reexec: None,
            reexec_pending: false,
            threads: Vec::new(),
        }
    }

    pub fn rlimit(&self, resource: u32) -> (u64, u64) {
        self.rlimits
            .get(resource as usize)
            .copied()
            .unwrap_or((u64::MAX, u64::MAX))
    }

    pub fn is_zombie(&self) -> bool {
        matches!(self.life, Life::Zombie(_))
    }
}
