//! Thread-area and runtime plumbing: arch_prctl, rseq, futex, getrandom, prctl.

use super::fs::sys;
use crate::kernel::futex::{FutexKey, Waiter};
use crate::kernel::mm::Access;
use crate::kernel::process::Rseq;
use crate::kernel::task::Task;
use crate::kernel::{Errno, SysResult};

const ARCH_SET_GS: u64 = 0x1001;
const ARCH_SET_FS: u64 = 0x1002;
const ARCH_GET_FS: u64 = 0x1003;
const ARCH_GET_GS: u64 = 0x1004;
const TASK_SIZE: u64 = crate::kernel::mm::address_space::TASK_SIZE;

pub fn arch_prctl(t: &mut Task, a: [u64; 6]) -> SysResult {
    match a[0] {
        ARCH_SET_FS | ARCH_SET_GS => {
            if a[1] >= TASK_SIZE {
                return Err(Errno(libc::EPERM));
            }
            if a[0] == ARCH_SET_FS {
                t.vcpu.set_fs_base(a[1]);
            } else {
                t.vcpu.set_gs_base(a[1]);
            }
            Ok(0)
        }
        ARCH_GET_FS => {
            let v = t.vcpu.fs_base();
            t.write_user(a[1], &v.to_le_bytes())?;
            Ok(0)
        }
        ARCH_GET_GS => {
            let v = t.vcpu.gs_base();
            t.write_user(a[1], &v.to_le_bytes())?;
            Ok(0)
        }
        _ => Err(Errno(libc::EINVAL)),
    }
}

pub fn get_robust_list(t: &mut Task, a: [u64; 6]) -> SysResult {
    if a[0] != 0 && a[0] as i32 != t.tid() {
        return Err(Errno(libc::ESRCH));
    }
    let (head, len) = t.thread.robust_list;
    t.write_user(a[1], &head.to_le_bytes())?;
    t.write_user(a[2], &len.to_le_bytes())?;
    Ok(0)
}

/// Restartable sequences: the guest's CPU number is its vCPU index, and a vCPU is
/// never preempted inside a critical section from the guest's point of view (no other
/// guest thread runs on the same vCPU), so registering is all there is to it.
pub fn rseq(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (addr, len, flags, sig) = (a[0], a[1] as u32, a[2] as i32, a[3] as u32);
    if flags & 1 != 0 {
        // RSEQ_FLAG_UNREGISTER
        return match t.thread.rseq {
            Some(r) if r.addr == addr => {
                t.thread.rseq = None;
                Ok(0)
            }
            _ => Err(Errno(libc::EINVAL)),
        };
    }
    if t.thread.rseq.is_some() {
        return Err(Errno(libc::EBUSY));
    }
    if addr % 32 != 0 || len < 32 {
        return Err(Errno(libc::EINVAL));
    }
    // SAFETY: sched_getcpu takes no arguments.
    let cpu = unsafe { libc::sched_getcpu() }.max(0) as u32;
    let mut area = [0u8; 8];
    area[0..4].copy_from_slice(&cpu.to_le_bytes()); // cpu_id_start
    area[4..8].copy_from_slice(&cpu.to_le_bytes()); // cpu_id
    t.write_user(addr, &area)?;
    t.thread.rseq = Some(Rseq { addr, len, sig });
    Ok(0)
}

const FUTEX_CMD_MASK: i32 = 0x7f & !libc::FUTEX_PRIVATE_FLAG & !libc::FUTEX_CLOCK_REALTIME;

/// Reads a futex word through its host address (it may change under us: another
/// vCPU owns it as much as we do).
fn load(word: *mut u32) -> u32 {
    // SAFETY: `word` is an aligned, mapped guest word (Task::user_word).
    unsafe { std::ptr::read_volatile(word) }
}

fn deadline(t: &mut Task, ts: u64, absolute: bool, realtime: bool) -> Result<Option<i64>, Errno> {
    if ts == 0 {
        return Ok(None);
    }
    let b = t.read_user(ts, 16)?;
    let s = i64::from_le_bytes(b[0..8].try_into().expect("8"));
    let ns = i64::from_le_bytes(b[8..16].try_into().expect("8"));
    if s < 0 || !(0..1_000_000_000).contains(&ns) {
        return Err(Errno(libc::EINVAL));
    }
    let v = s.saturating_mul(1_000_000_000).saturating_add(ns);
    let now_host = crate::clock::monotonic_ns();
    Ok(Some(if !absolute {
        now_host.saturating_add(v)
    } else if realtime {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime into a local struct.
        unsafe { libc::syscall(libc::SYS_clock_gettime, libc::CLOCK_REALTIME, &mut now) };
        now_host.saturating_add(v - (now.tv_sec * 1_000_000_000 + now.tv_nsec))
    } else {
        // An absolute guest CLOCK_MONOTONIC time.
        v - t.k.clock_offset_ns
    }))
}

fn futex_wait(
    t: &mut Task,
    addr: u64,
    val: u32,
    bitset: u32,
    until: Option<i64>,
    private: bool,
) -> SysResult {
    if bitset == 0 {
        return Err(Errno(libc::EINVAL));
    }
    let word = t.user_word(addr, Access::Read)?;
    let key = t.futex_key(addr, private)?;
    let waiter = Waiter::new(t.h.clone(), bitset);
    if !t.k.futexes.enqueue_if(key, &waiter, || load(word) == val) {
        return Err(Errno(libc::EAGAIN));
    }
    let r = t.wait_until(until, |_| Ok(waiter.is_woken().then_some(())));
    if r.is_err() {
        t.k.futexes.dequeue(key, &waiter);
        // Woken at the same moment: the wake-up counts.
        if waiter.is_woken() {
            return Ok(0);
        }
    }
    r.map(|()| 0)
}

/// FUTEX_WAKE_OP's operation on the second word; returns whether its comparison holds.
fn wake_op_apply(word: *mut u32, op: u32) -> bool {
    let shift = op & (8 << 28) != 0;
    let kind = (op >> 28) & 7;
    let cmp = (op >> 24) & 15;
    let mut oparg = (op >> 12) & 0xfff;
    let cmparg = op & 0xfff;
    if shift {
        oparg = 1u32.wrapping_shl(oparg);
    }
    // SAFETY: an aligned, mapped guest word; the atomic view is how Linux's futex code
    // treats it too (other vCPUs may update it at the same time).
    let atomic = unsafe { &*(word as *const std::sync::atomic::AtomicU32) };
    use std::sync::atomic::Ordering::SeqCst;
    let old = match kind {
        0 => atomic.swap(oparg, SeqCst),
        1 => atomic.fetch_add(oparg, SeqCst),
        2 => atomic.fetch_or(oparg, SeqCst),
        3 => atomic.fetch_and(!oparg, SeqCst),
        _ => atomic.fetch_xor(oparg, SeqCst),
    } as i32;
    let cmparg = cmparg as i32;
    match cmp {
        0 => old == cmparg,
        1 => old != cmparg,
        2 => old < cmparg,
        3 => old <= cmparg,
        4 => old > cmparg,
        _ => old >= cmparg,
    }
}

/// futex(2): waits and wakes between the job's threads and processes.
pub fn futex(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (addr, op, val) = (a[0], a[1] as i32, a[2] as u32);
    let private = op & libc::FUTEX_PRIVATE_FLAG != 0;
    let realtime = op & libc::FUTEX_CLOCK_REALTIME != 0;
    match op & FUTEX_CMD_MASK {
        libc::FUTEX_WAIT => {
            let until = deadline(t, a[3], false, false)?;
            futex_wait(t, addr, val, u32::MAX, until, private)
        }
        libc::FUTEX_WAIT_BITSET => {
            let until = deadline(t, a[3], true, realtime)?;
            futex_wait(t, addr, val, a[5] as u32, until, private)
        }
        libc::FUTEX_WAKE | libc::FUTEX_WAKE_BITSET => {
            let bitset = if op & FUTEX_CMD_MASK == libc::FUTEX_WAKE {
                u32::MAX
            } else {
                a[5] as u32
            };
            if bitset == 0 {
                return Err(Errno(libc::EINVAL));
            }
            let key = t.futex_key(addr, private)?;
            Ok(t.k.futexes.wake(key, val, bitset) as i64)
        }
        libc::FUTEX_REQUEUE | libc::FUTEX_CMP_REQUEUE => {
            let cmp = op & FUTEX_CMD_MASK == libc::FUTEX_CMP_REQUEUE;
            let word = t.user_word(addr, Access::Read)?;
            let from = t.futex_key(addr, private)?;
            let to = t.futex_key(a[4], private)?;
            let expected = a[5] as u32;
            let requeue = a[3] as u32;
            match t
                .k
                .futexes
                .requeue(from, to, val, requeue, || !cmp || load(word) == expected)
            {
                Some(n) => Ok(n as i64),
                None => Err(Errno(libc::EAGAIN)),
            }
        }
        libc::FUTEX_WAKE_OP => {
            let k1 = t.futex_key(addr, private)?;
            let word2 = t.user_word(a[4], Access::Write)?;
            let k2: FutexKey = t.futex_key(a[4], private)?;
            let n2 = a[3] as u32;
            let op2 = a[5] as u32;
            t.k.futexes
                .wake_op(k1, val, k2, n2, || Ok(wake_op_apply(word2, op2)))
                .map(|n| n as i64)
        }
        _ => Err(Errno(libc::ENOSYS)),
    }
}

pub fn getrandom(t: &mut Task, a: [u64; 6]) -> SysResult {
    let len = (a[1] as usize).min(1 << 25);
    let mut buf = vec![0u8; len];
    let n = sys!(libc::SYS_getrandom, buf.as_mut_ptr(), len, a[2] as u32)?;
    t.write_user(a[0], &buf[..n as usize])?;
    Ok(n)
}

pub fn prctl(t: &mut Task, a: [u64; 6]) -> SysResult {
    match a[0] as i32 {
        libc::PR_SET_NAME => {
            let name = t.read_cstr(a[1]).unwrap_or_default();
            let n = name.len().min(15);
            let mut comm = [0u8; 16];
            comm[..n].copy_from_slice(&name[..n]);
            *t.h.comm.lock().expect("comm poisoned") = comm;
            Ok(0)
        }
        libc::PR_GET_NAME => {
            let name = *t.h.comm.lock().expect("comm poisoned");
            t.write_user(a[1], &name)?;
            Ok(0)
        }
        libc::PR_SET_PDEATHSIG => {
            let sig = a[1] as i32;
            if !(0..=64).contains(&sig) {
                return Err(Errno(libc::EINVAL));
            }
            t.tg().lock().pdeath_signal = sig;
            Ok(0)
        }
        libc::PR_GET_PDEATHSIG => {
            let sig = t.tg().lock().pdeath_signal;
            t.write_user(a[1], &sig.to_le_bytes())?;
            Ok(0)
        }
        libc::PR_GET_DUMPABLE => Ok(1),
        libc::PR_SET_DUMPABLE
        | libc::PR_SET_CHILD_SUBREAPER
        | libc::PR_SET_NO_NEW_PRIVS
        | libc::PR_SET_VMA => Ok(0),
        libc::PR_GET_NO_NEW_PRIVS => Ok(0),
        libc::PR_CAPBSET_READ => Ok(0),
        _ => Err(Errno(libc::EINVAL)),
    }
}

/// ptrace: the guest cannot trace itself here, and every other pid is, for the guest,
/// a process that does not exist (see `other_process`).
pub fn ptrace(t: &mut Task, a: [u64; 6]) -> SysResult {
    const PTRACE_TRACEME: u64 = 0;
    if a[0] == PTRACE_TRACEME {
        // As Linux answers a process that may not be traced by its parent.
        return Err(Errno(libc::EPERM));
    }
    other_process(t, a[1])
}

/// process_vm_readv/writev, kcmp and pidfd_open name a process by pid. The guest's
/// own pid gets EPERM (these are not emulated for a process on itself); every other
/// pid gets ESRCH, as for a process that does not exist, so that none of them ever
/// reaches vmctl or another host process.
pub fn other_process(t: &mut Task, pid: u64) -> SysResult {
    if pid as i32 == t.tgid() {
        Err(Errno(libc::EPERM))
    } else {
        Err(Errno(libc::ESRCH))
    }
}
