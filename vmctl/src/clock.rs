//! vmctl's own clock reads. They go through the raw syscall, never the vDSO: once
//! rdtsc is trapped for the guest on this thread (prctl PR_TSC_SIGSEGV), a vDSO
//! read of the TSC would kill vmctl itself.

pub fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the local timespec.
    unsafe { libc::syscall(libc::SYS_clock_gettime, libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

pub fn realtime_s() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_clock_gettime, libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec
}

thread_local! {
    static TRAPPING_TSC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The host TSC, readable even on a thread that traps rdtsc for its guest.
pub fn host_tsc() -> u64 {
    let trapping = TRAPPING_TSC.with(|t| t.get());
    // SAFETY: prctl(PR_SET_TSC) only changes this thread's own rdtsc permission; it
    // is lifted for the one read and put back at once.
    unsafe {
        if trapping {
            libc::prctl(libc::PR_SET_TSC, libc::PR_TSC_ENABLE);
        }
        let t = std::arch::x86_64::_rdtsc();
        if trapping {
            libc::prctl(libc::PR_SET_TSC, libc::PR_TSC_SIGSEGV);
        }
        t
    }
}

/// Makes rdtsc fault on this (the vCPU) thread. Together with CR4.TSD in the guest
/// this turns a guest rdtsc into a #GP the kernel layer emulates (shared/PLATFORM.md);
/// vmctl's own clock reads here use raw syscalls, never the vDSO.
pub fn trap_rdtsc_on_this_thread() -> bool {
    // SAFETY: changes only the calling thread's rdtsc permission.
    let ok = unsafe { libc::prctl(libc::PR_SET_TSC, libc::PR_TSC_SIGSEGV) } == 0;
    if ok {
        TRAPPING_TSC.with(|t| t.set(true));
    }
    ok
}
