//! Signal dispositions, masks, and signals the guest sends itself.

use super::{fs::sys, Ret};
use crate::kernel::signals::{sig_bit, SigAction, NSIG, UNBLOCKABLE};
use crate::kernel::{sigframe_return, Errno, Kernel, SysResult};

fn valid(sig: i32) -> bool {
    (1..=NSIG as i32).contains(&sig)
}

pub fn rt_sigaction(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let sig = a[0] as i32;
    if !valid(sig) || a[3] != 8 {
        return Err(Errno(libc::EINVAL));
    }
    let old = k.proc.signals.action(sig);
    if a[1] != 0 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            return Err(Errno(libc::EINVAL));
        }
        let b: [u8; 32] = k.read_user(a[1], 32)?.try_into().expect("32 bytes");
        let mut new = SigAction::from_bytes(&b);
        new.mask &= !UNBLOCKABLE;
        k.proc.signals.actions[sig as usize] = new;
    }
    if a[2] != 0 {
        k.write_user(a[2], &old.to_bytes())?;
    }
    Ok(0)
}

pub fn rt_sigprocmask(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    if a[3] != 8 {
        return Err(Errno(libc::EINVAL));
    }
    let old = k.proc.signals.blocked;
    if a[1] != 0 {
        let set = k.read_user_u64(a[1])? & !UNBLOCKABLE;
        k.proc.signals.blocked = match a[0] as i32 {
            libc::SIG_BLOCK => old | set,
            libc::SIG_UNBLOCK => old & !set,
            libc::SIG_SETMASK => set,
            _ => return Err(Errno(libc::EINVAL)),
        };
    }
    if a[2] != 0 {
        k.write_user(a[2], &old.to_le_bytes())?;
    }
    Ok(0)
}

pub fn rt_sigreturn(k: &mut Kernel) -> Result<Ret, Errno> {
    match sigframe_return(k) {
        Ok(()) => Ok(Ret::Registers),
        Err(_) => {
            k.exit(crate::kernel::process::ExitStatus::Signal(libc::SIGSEGV));
            Ok(Ret::Registers)
        }
    }
}

pub fn rt_sigpending(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let p = k.proc.signals.pending & k.proc.signals.blocked;
    k.write_user(a[0], &p.to_le_bytes())?;
    Ok(0)
}

pub fn sigaltstack(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let (sp, flags, size) = k.proc.signals.altstack;
    if a[1] != 0 {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&sp.to_le_bytes());
        b[8..12].copy_from_slice(&flags.to_le_bytes());
        b[16..24].copy_from_slice(&size.to_le_bytes());
        k.write_user(a[1], &b)?;
    }
    if a[0] != 0 {
        let b = k.read_user(a[0], 24)?;
        let nsp = u64::from_le_bytes(b[0..8].try_into().expect("8"));
        let nflags = i32::from_le_bytes(b[8..12].try_into().expect("4"));
        let nsize = u64::from_le_bytes(b[16..24].try_into().expect("8"));
        if nflags & !(libc::SS_DISABLE | (1 << 31)) != 0 {
            return Err(Errno(libc::EINVAL));
        }
        if nflags & libc::SS_DISABLE != 0 {
            k.proc.signals.altstack = (0, libc::SS_DISABLE, 0);
        } else {
            if nsize < libc::MINSIGSTKSZ as u64 {
                return Err(Errno(libc::ENOMEM));
            }
            k.proc.signals.altstack = (nsp, 0, nsize);
        }
    }
    Ok(0)
}

fn is_self(k: &Kernel, pid: i32) -> bool {
    pid == k.proc.pid || pid == 0 || pid == -1 || pid == -k.proc.pgid
}

pub fn kill(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let (pid, sig) = (a[0] as i32, a[1] as i32);
    if sig != 0 && !valid(sig) {
        return Err(Errno(libc::EINVAL));
    }
    if is_self(k, pid) {
        k.send_signal(sig);
        return Ok(0);
    }
    // Signals to processes outside the VM go to the host's.
    sys!(libc::SYS_kill, pid, sig)
}

pub fn tgkill(k: &mut Kernel, tgid: i32, tid: i32, sig: i32) -> SysResult {
    if sig != 0 && !valid(sig) {
        return Err(Errno(libc::EINVAL));
    }
    if tid != k.proc.tid() || (tgid != k.proc.pid && tgid != -1) {
        return Err(Errno(libc::ESRCH));
    }
    k.send_signal(sig);
    Ok(0)
}

/// sigsuspend and pause. A signal the new mask lets through may already be pending
/// (raised by the guest itself): then the wait ends at once and the handler runs.
/// Otherwise only a host signal to vmctl can end it.
///
/// Linux restores the pre-sigsuspend mask when the handler returns; the frame is
/// pushed by the kernel layer from the current mask, so here the temporary mask is
/// the one the handler returns to (see the report for the kernel change needed).
pub fn suspend(k: &mut Kernel, mask: Option<u64>) -> SysResult {
    if let Some(m) = mask {
        // A restarted call (after a checkpoint) keeps the mask saved the first time.
        let old = k.proc.signals.blocked;
        k.proc.signals.saved_mask.get_or_insert(old);
        k.proc.signals.blocked = m & !UNBLOCKABLE;
    }
    if k.proc.signals.next_deliverable().is_none() {
        // SAFETY: pause blocks until a signal arrives.
        unsafe { libc::pause() };
    }
    Err(Errno(libc::EINTR))
}

pub fn rt_sigsuspend(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    if a[1] != 8 {
        return Err(Errno(libc::EINVAL));
    }
    let mask = k.read_user_u64(a[0])?;
    suspend(k, Some(mask))
}

/// Interval timers and alarm() are the host's timers on vmctl: SIGALRM (or
/// SIGVTALRM/SIGPROF) reaches vmctl, which passes it on to the guest as it does any
/// host signal, and an unhandled one ends the job with that signal, as natively.
pub fn setitimer(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let new = if a[1] == 0 {
        vec![0u8; 32]
    } else {
        k.read_user(a[1], 32)?
    };
    let mut old = [0u8; 32];
    sys!(
        libc::SYS_setitimer,
        a[0] as i32,
        new.as_ptr(),
        old.as_mut_ptr()
    )?;
    if a[2] != 0 {
        k.write_user(a[2], &old)?;
    }
    Ok(0)
}

pub fn getitimer(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let mut cur = [0u8; 32];
    sys!(libc::SYS_getitimer, a[0] as i32, cur.as_mut_ptr())?;
    k.write_user(a[1], &cur)?;
    Ok(0)
}

pub fn alarm(a: [u64; 6]) -> SysResult {
    sys!(libc::SYS_alarm, a[0] as u32)
}

pub fn sigtimedwait(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let set = k.read_user_u64(a[0])?;
    let ready = k.proc.signals.pending & set;
    if ready != 0 {
        let sig = ready.trailing_zeros() as i32 + 1;
        k.proc.signals.pending &= !sig_bit(sig);
        if a[1] != 0 {
            let mut info = [0u8; 128];
            info[0..4].copy_from_slice(&sig.to_le_bytes());
            k.write_user(a[1], &info)?;
        }
        return Ok(sig as i64);
    }
    Err(Errno(libc::EAGAIN))
}
