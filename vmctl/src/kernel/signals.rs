//! Signal dispositions, the blocked mask, and what a signal does by default.

use serde::{Deserialize, Serialize};

pub const NSIG: usize = 64;
pub const SIG_DFL: u64 = 0;
pub const SIG_IGN: u64 = 1;
pub const SA_NOCLDWAIT: u64 = 0x0000_0002;
pub const SA_ONSTACK: u64 = 0x0800_0000;
pub const SA_RESTART: u64 = 0x1000_0000;
pub const SA_NODEFER: u64 = 0x4000_0000;
pub const SA_RESETHAND: u64 = 0x8000_0000;

/// The kernel's struct sigaction layout on x86-64.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

impl SigAction {
    pub fn to_bytes(self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&self.handler.to_le_bytes());
        b[8..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.restorer.to_le_bytes());
        b[24..32].copy_from_slice(&self.mask.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; 32]) -> Self {
        let w = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        SigAction {
            handler: w(0),
            flags: w(8),
            restorer: w(16),
            mask: w(24),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultAction {
    Terminate,
    CoreDump,
    Ignore,
    Stop,
    Continue,
}

pub fn default_action(sig: i32) -> DefaultAction {
    use DefaultAction::*;
    match sig {
        libc::SIGCHLD | libc::SIGURG | libc::SIGWINCH => Ignore,
        libc::SIGCONT => Continue,
        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU => Stop,
        libc::SIGQUIT
        | libc::SIGILL
        | libc::SIGTRAP
        | libc::SIGABRT
        | libc::SIGBUS
        | libc::SIGFPE
        | libc::SIGSEGV
        | libc::SIGXCPU
        | libc::SIGXFSZ
        | libc::SIGSYS => CoreDump,
        _ => Terminate,
    }
}

pub fn sig_bit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

/// Signals that can be neither caught nor blocked.
pub const UNBLOCKABLE: u64 = (1 << (libc::SIGKILL - 1)) | (1 << (libc::SIGSTOP - 1));

/// What a queued signal carries into the handler's siginfo.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedSig {
    pub code: i32,
    pub pid: i32,
    pub uid: u32,
    /// For SIGCHLD: the child's exit code or signal (si_status).
    pub status: i32,
}

/// Pending signals. A standard signal is pending at most once, as on Linux; so is a
/// real-time one here (a second one sent before the first is delivered merges).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SigQueue {
    pub mask: u64,
    pub info: Vec<(i32, QueuedSig)>,
}

impl SigQueue {
    pub fn add(&mut self, sig: i32, info: QueuedSig) {
        if self.mask & sig_bit(sig) != 0 {
            return;
        }
        self.mask |= sig_bit(sig);
        self.info.push((sig, info));
    }

    pub fn take(&mut self, sig: i32) -> Option<QueuedSig> {
        if self.mask & sig_bit(sig) == 0 {
            return None;
        }
        self.mask &= !sig_bit(sig);
        let i = self.info.iter().position(|&(s, _)| s == sig)?;
        Some(self.info.remove(i).1)
    }

    pub fn discard(&mut self, sig: i32) {
        self.take(sig);
    }

    /// The lowest pending signal that `blocked` lets through.
    pub fn first_unblocked(&self, blocked: u64) -> Option<i32> {
        let ready = self.mask & !blocked;
        (ready != 0).then(|| ready.trailing_zeros() as i32 + 1)
    }
}

/// A thread's signal state that other threads look at when they send it signals.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ThreadSignals {
    pub blocked: u64,
    pub pending: SigQueue,
}
