//! Thread-area and runtime plumbing: arch_prctl, rseq, futex, getrandom, prctl.

use super::fs::sys;
use crate::kernel::process::Rseq;
use crate::kernel::{Errno, Kernel, SysResult};

const ARCH_SET_GS: u64 = 0x1001;
const ARCH_SET_FS: u64 = 0x1002;
const ARCH_GET_FS: u64 = 0x1003;
const ARCH_GET_GS: u64 = 0x1004;
const TASK_SIZE: u64 = crate::kernel::mm::address_space::TASK_SIZE;

pub fn arch_prctl(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    match a[0] {
        ARCH_SET_FS | ARCH_SET_GS => {
            if a[1] >= TASK_SIZE {
                return Err(Errno(libc::EPERM));
            }
            if a[0] == ARCH_SET_FS {
                k.vcpu.set_fs_base(a[1]);
            } else {
                k.vcpu.set_gs_base(a[1]);
            }
            Ok(0)
        }
        ARCH_GET_FS => {
            let v = k.vcpu.fs_base();
            k.write_user(a[1], &v.to_le_bytes())?;
            Ok(0)
        }
        ARCH_GET_GS => {
            let v = k.vcpu.gs_base();
            k.write_user(a[1], &v.to_le_bytes())?;
            Ok(0)
        }
        _ => Err(Errno(libc::EINVAL)),
    }
}

pub fn get_robust_list(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    if a[0] != 0 && a[0] as i32 != k.proc.tid() {
        return Err(Errno(libc::ESRCH));
    }
    let (head, len) = k.proc.robust_list;
    k.write_user(a[1], &head.to_le_bytes())?;
    k.write_user(a[2], &len.to_le_bytes())?;
    Ok(0)
}

/// Restartable sequences: the guest's CPU number is its vCPU index, and a vCPU is
/// never preempted inside a critical section from the guest's point of view (no other
/// guest thread runs on the same vCPU), so registering is all there is to it.
pub fn rseq(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let (addr, len, flags, sig) = (a[0], a[1] as u32, a[2] as i32, a[3] as u32);
    if flags & 1 != 0 {
        // RSEQ_FLAG_UNREGISTER
        return match k.proc.rseq {
            Some(r) if r.addr == addr => {
                k.proc.rseq = None;
                Ok(0)
            }
            _ => Err(Errno(libc::EINVAL)),
        };
    }
    if k.proc.rseq.is_some() {
        return Err(Errno(libc::EBUSY));
    }
    if addr % 32 != 0 || len < 32 {
        return Err(Errno(libc::EINVAL));
    }
    let cpu = k.vcpu.index() as u32;
    let mut area = [0u8; 8];
    area[0..4].copy_from_slice(&cpu.to_le_bytes()); // cpu_id_start
    area[4..8].copy_from_slice(&cpu.to_le_bytes()); // cpu_id
    k.write_user(addr, &area)?;
    k.proc.rseq = Some(Rseq { addr, len, sig });
    Ok(0)
}

/// With one guest thread, a futex wait can only be woken by a timeout: an untimed
/// wait on a matching value would hang natively too, so it reports EAGAIN instead.
pub fn futex(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let op = a[1] as i32 & 0x7f & !libc::FUTEX_PRIVATE_FLAG;
    match op {
        libc::FUTEX_WAKE | libc::FUTEX_WAKE_OP | libc::FUTEX_REQUEUE | libc::FUTEX_CMP_REQUEUE => {
            Ok(0)
        }
        libc::FUTEX_WAIT | libc::FUTEX_WAIT_BITSET => {
            let cur = k.read_user(a[0], 4)?;
            if u32::from_le_bytes(cur.try_into().expect("4")) != a[2] as u32 {
                return Err(Errno(libc::EAGAIN));
            }
            if a[3] != 0 {
                let ts = k.read_user(a[3], 16)?;
                if op == libc::FUTEX_WAIT {
                    sys!(libc::SYS_nanosleep, ts.as_ptr(), 0)?;
                } else {
                    let clock = if a[1] as i32 & libc::FUTEX_CLOCK_REALTIME != 0 {
                        libc::CLOCK_REALTIME
                    } else {
                        libc::CLOCK_MONOTONIC
                    };
                    sys!(
                        libc::SYS_clock_nanosleep,
                        clock,
                        libc::TIMER_ABSTIME,
                        ts.as_ptr(),
                        0
                    )?;
                }
                return Err(Errno(libc::ETIMEDOUT));
            }
            Err(Errno(libc::EAGAIN))
        }
        _ => Err(Errno(libc::ENOSYS)),
    }
}

pub fn getrandom(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let len = (a[1] as usize).min(1 << 25);
    let mut buf = vec![0u8; len];
    let n = sys!(libc::SYS_getrandom, buf.as_mut_ptr(), len, a[2] as u32)?;
    k.write_user(a[0], &buf[..n as usize])?;
    Ok(n)
}

pub fn prctl(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    match a[0] as i32 {
        libc::PR_SET_NAME => {
            let name = k.read_cstr(a[1]).unwrap_or_default();
            let n = name.len().min(15);
            k.proc.name = [0; 16];
            k.proc.name[..n].copy_from_slice(&name[..n]);
            Ok(0)
        }
        libc::PR_GET_NAME => {
            let name = k.proc.name;
            k.write_user(a[1], &name)?;
            Ok(0)
        }
        libc::PR_GET_DUMPABLE => Ok(1),
        libc::PR_SET_DUMPABLE
        | libc::PR_SET_PDEATHSIG
        | libc::PR_SET_NO_NEW_PRIVS
        | libc::PR_SET_VMA => Ok(0),
        libc::PR_GET_NO_NEW_PRIVS => Ok(0),
        libc::PR_CAPBSET_READ => Ok(0),
        _ => Err(Errno(libc::EINVAL)),
    }
}
