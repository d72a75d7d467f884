//! Signal frames in the layout Linux uses on x86-64 (struct rt_sigframe), so that
//! unmodified handlers and glibc's sigreturn trampoline work: the saved registers in
//! a ucontext, a siginfo, and the XSAVE image of the FPU/SSE/AVX state.

use super::signals::{sig_bit, SigAction, SA_NODEFER, SA_ONSTACK, SA_RESETHAND, UNBLOCKABLE};
use super::task::Task;
use super::{xsave_user_size, Errno};
use crate::machine::layout::{USER_CS, USER_DS};

const RT_SIGFRAME_SIZE: u64 = 440;
const UC_MCONTEXT: u64 = 48;
const UC_SIGMASK: u64 = 304;
const SIGINFO: u64 = 312;
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
/// RFLAGS bits a signal handler may change through its ucontext (Linux's FIX_EFLAGS).
const USER_FLAGS: u64 = 0x40dd5;
/// Size of the KVM XSAVE region that holds the legacy and extended user state.
const KVM_XSAVE_REGION: usize = 4096;

pub struct SigInfo {
    pub signo: i32,
    pub code: i32,
    pub addr: u64,
    pub pid: i32,
    pub uid: u32,
    /// SIGCHLD's si_status.
    pub status: i32,
}

/// Stack space a handler frame needs (reported to the guest as AT_MINSIGSTKSZ).
pub fn frame_size(xsave: u64) -> u64 {
    xsave + 4 + 64 + RT_SIGFRAME_SIZE + 16
}

fn xsave_bytes(t: &Task) -> Result<Vec<u8>, Errno> {
    let xs = t.vcpu.get_xsave().map_err(|_| Errno(libc::EFAULT))?;
    let region = &xs.as_fam_struct_ref().xsave.region;
    Ok(region.iter().flat_map(|w| w.to_le_bytes()).collect())
}

pub fn push(t: &mut Task, sig: i32, info: SigInfo, trapno: u8, err: u64) -> Result<(), Errno> {
    let action: SigAction = t.tg().lock().actions[sig as usize];
    let regs = *t.vcpu.user_regs();
    let (ss_sp, ss_flags, ss_size) = t.thread.altstack;
    let on_altstack = ss_size > 0 && regs.rsp > ss_sp && regs.rsp <= ss_sp + ss_size;
    let mut sp =
        if action.flags & SA_ONSTACK != 0 && ss_flags & libc::SS_DISABLE == 0 && !on_altstack {
            ss_sp + ss_size
        } else {
            regs.rsp - 128
        };
    let xsize = xsave_user_size().min(KVM_XSAVE_REGION as u64);
    sp -= xsize + 4;
    sp &= !63;
    let fpstate = sp;
    sp -= RT_SIGFRAME_SIZE;
    sp = (sp & !15) - 8;
    let frame = sp;

    let mut xsave = xsave_bytes(t)?;
    xsave.truncate(xsize as usize);
    // The software-reserved bytes of the FXSAVE area tell sigreturn an XSAVE image follows.
    xsave[464..468].copy_from_slice(&FP_XSTATE_MAGIC1.to_le_bytes());
    xsave[468..472].copy_from_slice(&((xsize + 4) as u32).to_le_bytes());
    xsave[472..480].copy_from_slice(&t.k.vm.xcr0().to_le_bytes());
    xsave[480..484].copy_from_slice(&(xsize as u32).to_le_bytes());
    xsave.extend_from_slice(&FP_XSTATE_MAGIC2.to_le_bytes());
    t.write_user(fpstate, &xsave)?;

    let mut f = vec![0u8; RT_SIGFRAME_SIZE as usize];
    let put = |f: &mut Vec<u8>, at: u64, v: u64| {
        f[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes())
    };
    put(&mut f, 0, action.restorer);
    put(&mut f, 8, 1 | 2 | 4); // UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS
    put(&mut f, 24, ss_sp);
    f[32..36].copy_from_slice(
        &(if on_altstack {
            libc::SS_ONSTACK
        } else {
            ss_flags
        })
        .to_le_bytes(),
    );
    put(&mut f, 40, ss_size);
    let gprs = [
        regs.r8,
        regs.r9,
        regs.r10,
        regs.r11,
        regs.r12,
        regs.r13,
        regs.r14,
        regs.r15,
        regs.rdi,
        regs.rsi,
        regs.rbp,
        regs.rbx,
        regs.rdx,
        regs.rax,
        regs.rcx,
        regs.rsp,
        regs.rip,
        regs.rflags,
    ];
    for (i, v) in gprs.iter().enumerate() {
        put(&mut f, UC_MCONTEXT + i as u64 * 8, *v);
    }
    let segs = UC_MCONTEXT + 144;
    f[segs as usize..segs as usize + 2].copy_from_slice(&USER_CS.to_le_bytes());
    f[segs as usize + 6..segs as usize + 8].copy_from_slice(&USER_DS.to_le_bytes());
    put(&mut f, UC_MCONTEXT + 152, err);
    put(&mut f, UC_MCONTEXT + 160, trapno as u64);
    let blocked_now = t.h.signals().blocked;
    let restore_mask = t.thread.saved_mask.take().unwrap_or(blocked_now);
    put(&mut f, UC_MCONTEXT + 168, restore_mask);
    put(
        &mut f,
        UC_MCONTEXT + 176,
        if info.signo == libc::SIGSEGV {
            info.addr
        } else {
            0
        },
    );
    put(&mut f, UC_MCONTEXT + 184, fpstate);
    put(&mut f, UC_SIGMASK, restore_mask);
    let si = SIGINFO as usize;
    f[si..si + 4].copy_from_slice(&info.signo.to_le_bytes());
    f[si + 8..si + 12].copy_from_slice(&info.code.to_le_bytes());
    if info.code > 0 && info.signo != libc::SIGCHLD {
        f[si + 16..si + 24].copy_from_slice(&info.addr.to_le_bytes());
    } else {
        f[si + 16..si + 20].copy_from_slice(&info.pid.to_le_bytes());
        f[si + 20..si + 24].copy_from_slice(&info.uid.to_le_bytes());
        if info.signo == libc::SIGCHLD {
            f[si + 24..si + 28].copy_from_slice(&info.status.to_le_bytes());
        }
    }
    t.write_user(frame, &f)?;

    let mut blocked = blocked_now | action.mask;
    if action.flags & SA_NODEFER == 0 {
        blocked |= sig_bit(sig);
    }
    t.h.signals().blocked = blocked & !UNBLOCKABLE;
    if action.flags & SA_RESETHAND != 0 {
        t.tg().lock().actions[sig as usize] = SigAction::default();
    }
    let r = t.vcpu.user_regs_mut();
    r.rdi = sig as u64;
    r.rsi = frame + SIGINFO;
    r.rdx = frame + 8;
    r.rax = 0;
    r.rsp = frame;
    r.rip = action.handler;
    r.rflags &= !((1 << 8) | (1 << 10)); // TF, DF
    Ok(())
}

/// rt_sigreturn: restores what `push` saved; the handler's `ret` consumed pretcode.
pub fn sigreturn(t: &mut Task) -> Result<(), Errno> {
    let frame = t.vcpu.user_regs().rsp - 8;
    let f = t.read_user(frame, RT_SIGFRAME_SIZE as usize)?;
    let get = |at: u64| u64::from_le_bytes(f[at as usize..at as usize + 8].try_into().expect("8"));
    let g = |i: u64| get(UC_MCONTEXT + i * 8);
    let old_flags = t.vcpu.user_regs().rflags;
    let r = t.vcpu.user_regs_mut();
    (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) =
        (g(0), g(1), g(2), g(3), g(4), g(5), g(6), g(7));
    (
        r.rdi, r.rsi, r.rbp, r.rbx, r.rdx, r.rax, r.rcx, r.rsp, r.rip,
    ) = (g(8), g(9), g(10), g(11), g(12), g(13), g(14), g(15), g(16));
    r.rflags = (old_flags & !USER_FLAGS) | (g(17) & USER_FLAGS);
    t.h.signals().blocked = get(UC_SIGMASK) & !UNBLOCKABLE;
    // The restored mask may let a pending signal through.
    t.recheck = true;
    let fpstate = get(UC_MCONTEXT + 184);
    if fpstate != 0 {
        let xsize = xsave_user_size().min(KVM_XSAVE_REGION as u64) as usize;
        let img = t.read_user(fpstate, xsize)?;
        let mut xs = t.vcpu.get_xsave().map_err(|_| Errno(libc::EFAULT))?;
        // SAFETY: FamStructWrapper gives exclusive access to the region we overwrite;
        // only the user-state bytes the frame carried are replaced.
        let region = unsafe { &mut xs.as_mut_fam_struct().xsave.region };
        for (i, chunk) in img.chunks(4).enumerate() {
            let mut w = [0u8; 4];
            w[..chunk.len()].copy_from_slice(chunk);
            region[i] = u32::from_le_bytes(w);
        }
        // The software-reserved words are not CPU state; clear them as the CPU expects.
        for w in &mut region[116..128] {
            *w = 0;
        }
        t.vcpu.set_xsave(&xs).map_err(|_| Errno(libc::EFAULT))?;
    }
    Ok(())
}
