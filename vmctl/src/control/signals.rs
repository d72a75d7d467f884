//! Host signals reaching vmctl while the guest runs.
//!
//! Signals sent to vmctl (SIGTERM from Slurm, SIGINT, SIGUSR1...) are blocked in every
//! thread and taken synchronously by the main thread with `sigwaitinfo`, which turns
//! them into checkpoints or passes them to the guest's processes. vCPU threads accept
//! only the kick signal: its handler sets `immediate_exit` in the kvm_run of the vCPU
//! that thread runs, so that a KVM_RUN in progress, or the next one, returns at once
//! (shared/PLATFORM.md, "Interrupting a running vCPU"), and a blocking host call made
//! for the guest returns EINTR. The handler only touches a thread-local pointer.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

/// What a host signal does to the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SignalAction {
    /// Deliver it to the guest, as if it had been sent to every process of the job.
    Forward = 0,
    /// Take a checkpoint and continue.
    Checkpoint = 1,
    /// Take a checkpoint and exit with the "checkpointed" status.
    CheckpointExit = 2,
}

static ACTIONS: [AtomicU8; 65] = [const { AtomicU8::new(0) }; 65];

thread_local! {
    /// The kvm_run of the vCPU this thread runs, for the kick handler.
    static KVM_RUN: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Signals forwarded to the guest by default, as a shell's children would receive them.
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
    libc::SIGVTALRM,
    libc::SIGPROF,
    // The guest's O_ASYNC descriptors signal vmctl on the host: without a handler
    // their signals would kill vmctl itself.
    libc::SIGIO,
    libc::SIGPWR,
];

/// The signal that stops a vCPU thread so it looks at its task's interrupt flags.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

/// The signal that makes the main thread look at checkpoint requests and job exit.
pub fn notify_signal() -> i32 {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_sig: libc::c_int) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: `run` points at the mapped kvm_run of the vCPU this thread runs
        // (registered for as long as the thread holds the vCPU); immediate_exit is a
        // plain byte KVM reads on entry to KVM_RUN.
        unsafe {
            let off = std::mem::offset_of!(kvm_bindings::kvm_run, immediate_exit);
            std::ptr::write_volatile(run.add(off), 1);
        }
    }
}

/// Registers the calling thread's vCPU so the kick handler can stop it, until the
/// returned guard is dropped (before the vCPU goes away or moves to another thread).
#[must_use]
pub fn register_vcpu(run: *mut kvm_bindings::kvm_run) -> VcpuRegistration {
    KVM_RUN.with(|r| r.set(run as *mut u8));
    VcpuRegistration(())
}

pub struct VcpuRegistration(());

impl Drop for VcpuRegistration {
    fn drop(&mut self) {
        // The handler runs on this same thread, so after this store it cannot see
        // the old pointer.
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
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

fn sigset(sigs: &[i32]) -> libc::sigset_t {
    // SAFETY: building a local signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in sigs {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// The signals the main thread waits for.
pub fn waited(extra: &[i32]) -> Vec<i32> {
    let mut sigs: Vec<i32> = FORWARDED.to_vec();
    sigs.extend_from_slice(extra);
    sigs.push(notify_signal());
    sigs.sort_unstable();
    sigs.dedup();
    sigs
}

/// Installs the kick handler (without SA_RESTART, so blocking host syscalls made for
/// the guest return EINTR and the guest's syscall can be restarted) and blocks
/// `waited` plus the kick in the calling (main) thread. Threads created afterwards
/// inherit that mask. Must run before any other thread is started.
pub fn install(waited: &[i32]) {
    // SAFETY: installing an async-signal-safe handler (a thread-local pointer only),
    // and changing the calling thread's own mask.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as usize;
        sa.sa_flags = 0;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        let mut all = waited.to_vec();
        all.push(kick_signal());
        let set = sigset(&all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits for one of `sigs` (blocked in every thread) and returns it.
pub fn wait_for(sigs: &[i32]) -> i32 {
    let set = sigset(sigs);
    loop {
        // SAFETY: sigwaitinfo with a local set; the siginfo is not needed.
        let s = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if s > 0 {
            return s;
        }
    }
}

/// Blocks every signal in the calling thread (for helper threads).
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

/// Lets the kick through on a vCPU thread (the main thread's mask blocks it).
pub fn accept_kicks_in_this_thread() {
    let set = sigset(&[kick_signal()]);
    // SAFETY: changing the calling thread's own mask.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
}

/// Stops vCPU thread `thread` so it looks at its task's flags.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: callers only kick threads that are alive (a task clears its thread id
    // under a lock before its thread ends).
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}

/// Wakes the main thread.
pub fn notify(main: libc::pthread_t) {
    // SAFETY: the main thread lives as long as the process.
    unsafe { libc::pthread_kill(main, notify_signal()) };
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
