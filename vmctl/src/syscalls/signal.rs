//! Signal dispositions, masks, and signals between the job's threads and processes.

use super::Ret;
use crate::kernel::signals::{sig_bit, QueuedSig, SigAction, NSIG, UNBLOCKABLE};
use crate::kernel::task::Task;
use crate::kernel::thread_group::ITimer;
use crate::kernel::timers::SIGNALS as TIMER_SIGNALS;
use crate::kernel::{sigframe_return, Errno, SysResult};
use std::sync::Arc;

const SI_USER: i32 = 0;
const SI_TKILL: i32 = -6;

fn valid(sig: i32) -> bool {
    (1..=NSIG as i32).contains(&sig)
}

pub fn rt_sigaction(t: &mut Task, a: [u64; 6]) -> SysResult {
    let sig = a[0] as i32;
    if !valid(sig) || a[3] != 8 {
        return Err(Errno(libc::EINVAL));
    }
    let new = if a[1] != 0 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            return Err(Errno(libc::EINVAL));
        }
        let b: [u8; 32] = t.read_user(a[1], 32)?.try_into().expect("32 bytes");
        let mut new = SigAction::from_bytes(&b);
        new.mask &= !UNBLOCKABLE;
        Some(new)
    } else {
        None
    };
    let old = {
        let mut st = t.tg().lock();
        let old = st.actions[sig as usize];
        if let Some(n) = new {
            st.actions[sig as usize] = n;
            // Setting SIG_IGN discards a pending signal, as on Linux.
            if n.handler == crate::kernel::signals::SIG_IGN {
                st.pending.discard(sig);
            }
        }
        old
    };
    if a[2] != 0 {
        t.write_user(a[2], &old.to_bytes())?;
    }
    Ok(0)
}

pub fn rt_sigprocmask(t: &mut Task, a: [u64; 6]) -> SysResult {
    if a[3] != 8 {
        return Err(Errno(libc::EINVAL));
    }
    let set = if a[1] != 0 {
        Some(t.read_user_u64(a[1])? & !UNBLOCKABLE)
    } else {
        None
    };
    let old = {
        let mut ts = t.h.signals();
        let old = ts.blocked;
        if let Some(set) = set {
            ts.blocked = match a[0] as i32 {
                libc::SIG_BLOCK => old | set,
                libc::SIG_UNBLOCK => old & !set,
                libc::SIG_SETMASK => set,
                _ => return Err(Errno(libc::EINVAL)),
            };
        }
        old
    };
    if set.is_some() {
        t.recheck = true;
    }
    if a[2] != 0 {
        t.write_user(a[2], &old.to_le_bytes())?;
    }
    Ok(0)
}

pub fn rt_sigreturn(t: &mut Task) -> Result<Ret, Errno> {
    if sigframe_return(t).is_err() {
        t.group_exit(crate::kernel::process::ExitStatus::Signal(libc::SIGSEGV));
    }
    Ok(Ret::Registers)
}

pub fn rt_sigpending(t: &mut Task, a: [u64; 6]) -> SysResult {
    let p = {
        let st = t.tg().lock();
        let ts = t.h.signals();
        (ts.pending.mask | st.pending.mask) & ts.blocked
    };
    t.write_user(a[0], &p.to_le_bytes())?;
    Ok(0)
}

pub fn sigaltstack(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (sp, flags, size) = t.thread.altstack;
    if a[1] != 0 {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&sp.to_le_bytes());
        b[8..12].copy_from_slice(&flags.to_le_bytes());
        b[16..24].copy_from_slice(&size.to_le_bytes());
        t.write_user(a[1], &b)?;
    }
    if a[0] != 0 {
        let b = t.read_user(a[0], 24)?;
        let nsp = u64::from_le_bytes(b[0..8].try_into().expect("8"));
        let nflags = i32::from_le_bytes(b[8..12].try_into().expect("4"));
        let nsize = u64::from_le_bytes(b[16..24].try_into().expect("8"));
        if nflags & !(libc::SS_DISABLE | (1 << 31)) != 0 {
            return Err(Errno(libc::EINVAL));
        }
        if nflags & libc::SS_DISABLE != 0 {
            t.thread.altstack = (0, libc::SS_DISABLE, 0);
        } else {
            if nsize < libc::MINSIGSTKSZ as u64 {
                return Err(Errno(libc::ENOMEM));
            }
            t.thread.altstack = (nsp, 0, nsize);
        }
    }
    Ok(0)
}

fn sender_info(t: &Task, code: i32) -> QueuedSig {
    QueuedSig {
        code,
        pid: t.tgid(),
        uid: t.k.host.uid,
        status: 0,
    }
}

/// kill(2). Only the job's own processes can be reached: a pid that is not one of
/// the guest's (a host process, vmctl itself) does not exist for the guest.
pub fn kill(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (pid, sig) = (a[0] as i32, a[1] as i32);
    if sig != 0 && !valid(sig) {
        return Err(Errno(libc::EINVAL));
    }
    let info = sender_info(t, SI_USER);
    let me = t.tgid();
    let targets: Vec<Arc<crate::kernel::thread_group::ThreadGroup>> = {
        let pids = t.k.pids.lock().expect("pids poisoned");
        let my_pgid = t.tg().lock().pgid;
        let live = pids.live_groups();
        match pid {
            p if p > 0 => live.into_iter().filter(|g| g.tgid == p).collect(),
            0 => live
                .into_iter()
                .filter(|g| g.lock().pgid == my_pgid)
                .collect(),
            -1 => live.into_iter().filter(|g| g.tgid != me).collect(),
            p => live.into_iter().filter(|g| g.lock().pgid == -p).collect(),
        }
    };
    if targets.is_empty() {
        // A pid of -1 with no other process is not an error on Linux.
        return if pid == -1 {
            Ok(0)
        } else {
            Err(Errno(libc::ESRCH))
        };
    }
    for g in &targets {
        if g.tgid == me {
            // To ourselves: this thread takes it if it can, before returning.
            t.recheck = true;
        }
        t.k.signal_group(g, sig, info);
    }
    Ok(0)
}

/// tgkill and tkill (tgid -1): one thread of the job.
pub fn tgkill(t: &mut Task, tgid: i32, tid: i32, sig: i32) -> SysResult {
    if sig != 0 && !valid(sig) || tid <= 0 {
        return Err(Errno(libc::EINVAL));
    }
    let info = sender_info(t, SI_TKILL);
    if tid == t.tid() && (tgid == -1 || tgid == t.tgid()) {
        t.signal_self(sig, info);
        if sig == libc::SIGKILL {
            t.group_exit(crate::kernel::process::ExitStatus::Signal(sig));
        }
        return Ok(0);
    }
    let target = t.k.pids.lock().expect("pids poisoned").task(tid).cloned();
    match target {
        Some(h) if tgid == -1 || h.tg.tgid == tgid => {
            t.k.signal_thread(&h, sig, info);
            Ok(0)
        }
        _ => Err(Errno(libc::ESRCH)),
    }
}

/// sigsuspend and pause: wait until a signal the (temporary) mask lets through
/// arrives. A restarted call (after a checkpoint) keeps the mask saved the first
/// time; the handler's sigreturn puts it back.
pub fn suspend(t: &mut Task, mask: Option<u64>) -> SysResult {
    if let Some(m) = mask {
        let old = t.h.signals().blocked;
        t.thread.saved_mask.get_or_insert(old);
        t.h.signals().blocked = m & !UNBLOCKABLE;
    }
    let r = t.wait_until(None, |t| {
        let st = t.tg().lock();
        let ts = t.h.signals();
        let ready = (ts.pending.mask | st.pending.mask) & !ts.blocked;
        Ok((ready != 0).then_some(()))
    });
    t.recheck = true;
    match r {
        Ok(()) | Err(_) => Err(Errno(libc::EINTR)),
    }
}

/// pselect6, ppoll and epoll_pwait wait with the mask at `ptr` (a sigset of
/// `size` bytes) in place of the thread's own, as sigsuspend does: a signal it lets
/// through ends the wait. The old mask comes back when the call returns (or with
/// the handler's sigreturn). A signal already pending that it lets through ends the
/// call at once with EINTR.
pub fn wait_with_mask(t: &mut Task, ptr: u64, size: u64) -> Result<(), Errno> {
    if ptr == 0 {
        return Ok(());
    }
    if size != 8 {
        return Err(Errno(libc::EINVAL));
    }
    let mask = t.read_user_u64(ptr)? & !UNBLOCKABLE;
    let old = t.h.signals().blocked;
    t.thread.saved_mask.get_or_insert(old);
    t.h.signals().blocked = mask;
    // Whatever happens, look at signals (and put the old mask back) after the call.
    t.recheck = true;
    let st = t.tg().lock();
    let ts = t.h.signals();
    if (ts.pending.mask | st.pending.mask) & !mask != 0 {
        return Err(Errno(libc::EINTR));
    }
    Ok(())
}

pub fn rt_sigsuspend(t: &mut Task, a: [u64; 6]) -> SysResult {
    if a[1] != 8 {
        return Err(Errno(libc::EINVAL));
    }
    let mask = t.read_user_u64(a[0])?;
    suspend(t, Some(mask))
}

fn timeval_ns(b: &[u8]) -> Result<i64, Errno> {
    let s = i64::from_le_bytes(b[0..8].try_into().expect("8"));
    let us = i64::from_le_bytes(b[8..16].try_into().expect("8"));
    if s < 0 || !(0..1_000_000).contains(&us) {
        return Err(Errno(libc::EINVAL));
    }
    Ok(s.saturating_mul(1_000_000_000).saturating_add(us * 1000))
}

fn timeval_bytes(ns: i64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&(ns / 1_000_000_000).to_le_bytes());
    b[8..16].copy_from_slice(&((ns % 1_000_000_000) / 1000).to_le_bytes());
    b
}

/// The current value of an interval timer as (interval, time left) in ns.
fn itimer_now(t: &Task, which: usize) -> (i64, i64) {
    let it = t.tg().lock().itimers[which];
    let left = if it.deadline_ns == 0 {
        0
    } else {
        (it.deadline_ns - t.k.guest_monotonic_ns()).max(1000)
    };
    (it.interval_ns, left)
}

fn set_itimer(t: &mut Task, which: usize, interval_ns: i64, value_ns: i64) {
    let deadline = if value_ns == 0 {
        0
    } else {
        t.k.guest_monotonic_ns() + value_ns
    };
    t.tg().lock().itimers[which] = ITimer {
        deadline_ns: deadline,
        interval_ns,
    };
    t.k.timers.set(t.tgid(), which, deadline);
}

/// Interval timers belong to the guest process: vmctl's timer thread sends
/// SIGALRM, SIGVTALRM or SIGPROF to the process when one expires.
pub fn setitimer(t: &mut Task, a: [u64; 6]) -> SysResult {
    let which = a[0] as usize;
    if which >= TIMER_SIGNALS.len() {
        return Err(Errno(libc::EINVAL));
    }
    let new = if a[1] == 0 {
        None
    } else {
        let b = t.read_user(a[1], 32)?;
        Some((timeval_ns(&b[0..16])?, timeval_ns(&b[16..32])?))
    };
    let (old_interval, old_left) = itimer_now(t, which);
    if let Some((interval, value)) = new {
        set_itimer(t, which, interval, value);
    }
    if a[2] != 0 {
        let mut out = [0u8; 32];
        out[0..16].copy_from_slice(&timeval_bytes(old_interval));
        out[16..32].copy_from_slice(&timeval_bytes(old_left));
        t.write_user(a[2], &out)?;
    }
    Ok(0)
}

pub fn getitimer(t: &mut Task, a: [u64; 6]) -> SysResult {
    let which = a[0] as usize;
    if which >= TIMER_SIGNALS.len() {
        return Err(Errno(libc::EINVAL));
    }
    let (interval, left) = itimer_now(t, which);
    let mut out = [0u8; 32];
    out[0..16].copy_from_slice(&timeval_bytes(interval));
    out[16..32].copy_from_slice(&timeval_bytes(left));
    t.write_user(a[1], &out)?;
    Ok(0)
}

pub fn alarm(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (_, left) = itimer_now(t, 0);
    set_itimer(t, 0, 0, (a[0] as u32 as i64) * 1_000_000_000);
    // Seconds left, rounded as Linux does (a pending alarm reports at least 1).
    Ok(if left == 0 {
        0
    } else {
        ((left + 500_000_000) / 1_000_000_000).max(1)
    })
}

pub fn sigtimedwait(t: &mut Task, a: [u64; 6]) -> SysResult {
    let set = t.read_user_u64(a[0])? & !UNBLOCKABLE;
    let deadline = if a[2] != 0 {
        let ts = t.read_user(a[2], 16)?;
        let s = i64::from_le_bytes(ts[0..8].try_into().expect("8"));
        let ns = i64::from_le_bytes(ts[8..16].try_into().expect("8"));
        if s < 0 || !(0..1_000_000_000).contains(&ns) {
            return Err(Errno(libc::EINVAL));
        }
        Some(crate::clock::monotonic_ns() + s.saturating_mul(1_000_000_000) + ns)
    } else {
        None
    };
    let taken = t.wait_until(deadline, |t| {
        let tg = t.tg().clone();
        let mut st = tg.lock();
        let mut ts = t.h.signals();
        let ready = (ts.pending.mask | st.pending.mask) & set;
        if ready == 0 {
            return Ok(None);
        }
        let sig = ready.trailing_zeros() as i32 + 1;
        let info = ts.pending.take(sig).or_else(|| st.pending.take(sig));
        Ok(Some((sig, info.unwrap_or_default())))
    });
    let (sig, info) = match taken {
        Ok(x) => x,
        Err(Errno(libc::ETIMEDOUT)) => return Err(Errno(libc::EAGAIN)),
        Err(e) => return Err(e),
    };
    if a[1] != 0 {
        let mut b = [0u8; 128];
        b[0..4].copy_from_slice(&sig.to_le_bytes());
        b[8..12].copy_from_slice(&info.code.to_le_bytes());
        b[16..20].copy_from_slice(&info.pid.to_le_bytes());
        b[20..24].copy_from_slice(&info.uid.to_le_bytes());
        if sig == libc::SIGCHLD {
            b[24..28].copy_from_slice(&info.status.to_le_bytes());
        }
        t.write_user(a[1], &b)?;
    }
    let _ = sig_bit(sig);
    Ok(sig as i64)
}
