//! A guest process: its address space, descriptors, signal state and identity.

use super::files::FdTable;
use super::mm::AddressSpace;
use super::signals::SignalState;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// How a guest process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// The status a shell reports: the exit code, or 128+N for signal N.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c & 0xff,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

/// Registered restartable-sequence area.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Rseq {
    pub addr: u64,
    pub len: u32,
    pub sig: u32,
}

/// A process, as it also appears in a checkpoint's manifest. Its descriptors are
/// host objects and are recorded separately (kernel::persist::FdState).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Process {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub mm: AddressSpace,
    #[serde(skip)]
    pub files: FdTable,
    pub signals: SignalState,
    pub exe: PathBuf,
    pub rlimits: Vec<(u64, u64)>,
    pub umask: u32,
    pub clear_child_tid: u64,
    pub robust_list: (u64, u64),
    pub rseq: Option<Rseq>,
    pub name: [u8; 16],
    /// A sleep interrupted by vmctl itself: (user RIP after its syscall, deadline in
    /// guest CLOCK_MONOTONIC ns), so the restarted call sleeps only what was left.
    #[serde(default)]
    pub sleep_restart: Option<(u64, i64)>,
    /// argv as /proc/self/cmdline shows it: each argument NUL-terminated.
    #[serde(default)]
    pub cmdline: Vec<u8>,
}

impl Process {
    pub fn tid(&self) -> i32 {
        self.pid
    }

    pub fn rlimit(&self, resource: u32) -> (u64, u64) {
        self.rlimits
            .get(resource as usize)
            .copied()
            .unwrap_or((u64::MAX, u64::MAX))
    }
}
