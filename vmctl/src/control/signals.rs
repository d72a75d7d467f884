//! Host signals reaching vmctl while the guest runs.
//!
//! The vCPU thread is the only one that receives them (other threads block them), and
//! each handler sets `immediate_exit` in the vCPU's kvm_run so that a KVM_RUN in
//! progress, or the next one, returns EINTR at once (shared/PLATFORM.md,
//! "Interrupting a running vCPU"). Handlers only touch atomics.

use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicU8, Ordering};

/// What a host signal does to the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SignalAction {
    /// Deliver it to the guest, as if it had been sent to the program.
    Forward = 0,
    /// Take a checkpoint and continue.
    Checkpoint = 1,
    /// Take a checkpoint and exit with the "checkpointed" status.
    CheckpointExit = 2,
}

static KVM_RUN: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static PENDING: AtomicU64 = AtomicU64::new(0);
static ACTIONS: [AtomicU8; 65] = [const { AtomicU8::new(0) }; 65];

/// Signals forwarded to the guest by default, as a shell's child would receive them.
pub const FORWARDED: &[i32] = &[
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
    libc::SIGCONT,
    libc::SIGXCPU,
    libc::SIGALRM,
];

/// The signal other vmctl threads use to make the vCPU thread look at its requests.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn on_signal(sig: libc::c_int) {
    if sig > 0 && sig < 64 && sig != kick_signal() {
        PENDING.fetch_or(1 << sig, Ordering::SeqCst);
    }
    let run = KVM_RUN.load(Ordering::SeqCst);
    if !run.is_null() {
        // SAFETY: `run` points at the vCPU's mapped kvm_run (registered by the vCPU
        // thread for the lifetime of the VM); immediate_exit is a plain byte KVM reads
        // on entry to KVM_RUN.
        unsafe {
            let off = std::mem::offset_of!(kvm_bindings::kvm_run, immediate_exit);
            std::ptr::write_volatile(run.add(off), 1);
        }
    }
}

/// Registers the vCPU's kvm_run so handlers can stop it, until the returned guard
/// is dropped. The guard must go before the vCPU does: a signal arriving after the
/// vCPU's kvm_run is unmapped would otherwise write to freed memory.
#[must_use]
pub fn register_vcpu(run: *mut kvm_bindings::kvm_run) -> VcpuRegistration {
    KVM_RUN.store(run as *mut u8, Ordering::SeqCst);
    VcpuRegistration(())
}

pub struct VcpuRegistration(());

impl Drop for VcpuRegistration {
    fn drop(&mut self) {
        // Handlers run on this same thread, so once this store is done none of them
        // can still hold the old pointer.
        KVM_RUN.store(std::ptr::null_mut(), Ordering::SeqCst);
    }
}

pub fn set_action(sig: i32, action: SignalAction) {
    ACTIONS[sig as usize].store(action as u8, Ordering::SeqCst);
}

pub fn action(sig: i32) -> SignalAction {
    match ACTIONS[sig as usize].load(Ordering::SeqCst) {
        1 => SignalAction::Checkpoint,
        2 => SignalAction::CheckpointExit,
        _ => SignalAction::Forward,
    }
}

/// Takes the set of host signals received since the last call.
pub fn take_pending() -> u64 {
    PENDING.swap(0, Ordering::SeqCst)
}

pub fn peek_pending() -> u64 {
    PENDING.load(Ordering::SeqCst)
}

/// Installs the handlers (without SA_RESTART, so blocking host syscalls made for the
/// guest return EINTR and the guest's syscall can be restarted after a checkpoint).
pub fn install(extra: &[i32]) {
    let mut sigs: Vec<i32> = FORWARDED.to_vec();
    sigs.extend_from_slice(extra);
    sigs.push(kick_signal());
    for sig in sigs {
        // SAFETY: installing an async-signal-safe handler (atomics only).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Blocks every handled signal in the calling thread (for helper threads), so they
/// all reach the vCPU thread.
pub fn block_in_this_thread() {
    // SAFETY: manipulating the calling thread's own signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for s in [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE] {
            libc::sigdelset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Wakes the vCPU thread `thread` so it notices a request.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: pthread_kill on a live thread id (the vCPU thread outlives helpers).
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}

/// Parses a signal name or number: TERM, SIGTERM, 15, USR2...
pub fn parse_signal(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let name = s.trim().to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let table = [
        ("HUP", libc::SIGHUP),
        ("INT", libc::SIGINT),
        ("QUIT", libc::SIGQUIT),
        ("USR1", libc::SIGUSR1),
        ("USR2", libc::SIGUSR2),
        ("TERM", libc::SIGTERM),
        ("ALRM", libc::SIGALRM),
        ("CONT", libc::SIGCONT),
        ("XCPU", libc::SIGXCPU),
        ("WINCH", libc::SIGWINCH),
        ("PWR", libc::SIGPWR),
    ];
    table.iter().find(|(n, _)| *n == name).map(|&(_, s)| s)
}
