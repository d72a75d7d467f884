//! Clocks and sleeping. The clocks the vDSO serves come from the same model here
//! (kernel/vdso.rs), so vDSO reads and syscalls agree; the others are the host's.

use super::fs::sys;
use crate::kernel::task::Task;
use crate::kernel::vdso::ModelClock;
use crate::kernel::{Errno, SysResult};

fn valid_clock(id: i32) -> bool {
    (0..=11).contains(&id) || id < 0
}

/// Clocks that count from boot: the guest's continue across a restore (see
/// Kernel::clock_offset_ns) instead of following the new host's.
fn is_monotonic(id: i32) -> bool {
    matches!(
        id,
        libc::CLOCK_MONOTONIC
            | libc::CLOCK_MONOTONIC_RAW
            | libc::CLOCK_MONOTONIC_COARSE
            | libc::CLOCK_BOOTTIME
            | libc::CLOCK_BOOTTIME_ALARM
    )
}

fn ts_bytes(ns: i64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&ns.div_euclid(1_000_000_000).to_le_bytes());
    b[8..].copy_from_slice(&ns.rem_euclid(1_000_000_000).to_le_bytes());
    b
}

fn ts_ns(b: &[u8]) -> Result<i64, Errno> {
    let s = i64::from_le_bytes(b[..8].try_into().expect("8"));
    let ns = i64::from_le_bytes(b[8..16].try_into().expect("8"));
    if s < 0 || !(0..1_000_000_000).contains(&ns) {
        return Err(Errno(libc::EINVAL));
    }
    Ok(s.saturating_mul(1_000_000_000).saturating_add(ns))
}

fn host_clock_ns(id: i32) -> Result<i64, Errno> {
    let mut ts = [0u8; 16];
    sys!(libc::SYS_clock_gettime, id, ts.as_mut_ptr())?;
    ts_ns(&ts)
}

pub fn clock_gettime(t: &mut Task, a: [u64; 6]) -> SysResult {
    let id = a[0] as i32;
    if !valid_clock(id) {
        return Err(Errno(libc::EINVAL));
    }
    let ns = match ModelClock::for_id(id) {
        Some(c) => t.k.clocks.now_ns(c),
        None if is_monotonic(id) => host_clock_ns(id)? + t.k.clock_offset_ns,
        None => host_clock_ns(id)?,
    };
    t.write_user(a[1], &ts_bytes(ns))?;
    Ok(0)
}

/// Sleeps until the host CLOCK_MONOTONIC reaches `deadline_host`. If a host signal
/// interrupts it, the deadline is kept (in guest time, so it survives a restore) for
/// the restarted call, and the remaining time goes to `rem`.
fn sleep_until(t: &mut Task, deadline_host: i64, rem: u64) -> SysResult {
    let target = ts_bytes(deadline_host);
    // SAFETY: a local timespec; clock_nanosleep reports errors as its return value.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clock_nanosleep,
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            target.as_ptr(),
            std::ptr::null_mut::<u8>(),
        )
    };
    if r == 0 {
        t.thread.sleep_restart = None;
        return Ok(0);
    }
    let e = Errno::last();
    if e.0 == libc::EINTR {
        t.thread.sleep_restart =
            Some((t.vcpu.user_regs().rip, deadline_host + t.k.clock_offset_ns));
        if rem != 0 {
            let left = (deadline_host - host_clock_ns(libc::CLOCK_MONOTONIC)?).max(0);
            t.write_user(rem, &ts_bytes(left))?;
        }
    }
    Err(e)
}

/// The host deadline for a relative sleep of `ns`: the one saved when this very call
/// was interrupted (a restarted syscall), else now + ns.
fn relative_deadline(t: &mut Task, ns: i64) -> Result<i64, Errno> {
    let rip = t.vcpu.user_regs().rip;
    if let Some((at, guest_deadline)) = t.thread.sleep_restart.take() {
        if at == rip {
            return Ok(guest_deadline - t.k.clock_offset_ns);
        }
    }
    Ok(host_clock_ns(libc::CLOCK_MONOTONIC)?.saturating_add(ns))
}

pub fn clock_getres(t: &mut Task, a: [u64; 6]) -> SysResult {
    let mut ts = [0u8; 16];
    sys!(libc::SYS_clock_getres, a[0] as i32, ts.as_mut_ptr())?;
    if a[1] != 0 {
        t.write_user(a[1], &ts)?;
    }
    Ok(0)
}

pub fn gettimeofday(t: &mut Task, a: [u64; 6]) -> SysResult {
    let mut tv = [0u8; 16];
    let mut tz = [0u8; 8];
    sys!(libc::SYS_gettimeofday, tv.as_mut_ptr(), tz.as_mut_ptr())?;
    let ns = t.k.clocks.now_ns(ModelClock::Realtime);
    tv[..8].copy_from_slice(&ns.div_euclid(1_000_000_000).to_le_bytes());
    tv[8..].copy_from_slice(&(ns.rem_euclid(1_000_000_000) / 1000).to_le_bytes());
    if a[0] != 0 {
        t.write_user(a[0], &tv)?;
    }
    if a[1] != 0 {
        t.write_user(a[1], &tz)?;
    }
    Ok(0)
}

pub fn time(t: &mut Task, a: [u64; 6]) -> SysResult {
    let now =
        t.k.clocks
            .now_ns(ModelClock::Realtime)
            .div_euclid(1_000_000_000);
    if a[0] != 0 {
        t.write_user(a[0], &now.to_le_bytes())?;
    }
    Ok(now)
}

pub fn nanosleep(t: &mut Task, a: [u64; 6]) -> SysResult {
    let req = ts_ns(&t.read_user(a[0], 16)?)?;
    let deadline = relative_deadline(t, req)?;
    sleep_until(t, deadline, a[1])
}

pub fn clock_nanosleep(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (id, flags) = (a[0] as i32, a[1] as i32);
    if !valid_clock(id) || id == libc::CLOCK_THREAD_CPUTIME_ID {
        return Err(Errno(libc::EINVAL));
    }
    let req = ts_ns(&t.read_user(a[2], 16)?)?;
    if flags & libc::TIMER_ABSTIME == 0 {
        let deadline = relative_deadline(t, req)?;
        return sleep_until(t, deadline, a[3]);
    }
    if is_monotonic(id) {
        return sleep_until(t, req - t.k.clock_offset_ns, 0);
    }
    // An absolute wall-clock (or CPU-time) deadline is the host's own.
    let target = ts_bytes(req);
    // SAFETY: a local timespec; errors come back as the return value.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clock_nanosleep,
            id,
            libc::TIMER_ABSTIME,
            target.as_ptr(),
            std::ptr::null_mut::<u8>(),
        )
    };
    if r == 0 {
        Ok(0)
    } else {
        Err(Errno::last())
    }
}

pub fn times(t: &mut Task, a: [u64; 6]) -> SysResult {
    let mut buf = [0u8; 32];
    let r = sys!(libc::SYS_times, buf.as_mut_ptr())?;
    if a[0] != 0 {
        t.write_user(a[0], &buf)?;
    }
    Ok(r)
}

pub fn getrusage(t: &mut Task, a: [u64; 6]) -> SysResult {
    let who = a[0] as i32;
    let mut buf = [0u8; 144];
    // The guest's usage is vmctl's own (RUSAGE_THREAD is the vCPU thread).
    sys!(libc::SYS_getrusage, who, buf.as_mut_ptr())?;
    t.write_user(a[1], &buf)?;
    Ok(0)
}
