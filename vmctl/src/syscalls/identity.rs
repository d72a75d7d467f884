//! Who the guest is and what it may use: ids, uname, limits, CPUs.

use super::fs::sys;
use crate::kernel::{Errno, Kernel, SysResult};

pub fn getpgid(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    if a[0] == 0 || a[0] as i32 == k.proc.pid {
        Ok(k.proc.pgid as i64)
    } else {
        sys!(libc::SYS_getpgid, a[0] as i32)
    }
}

pub fn getsid(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    if a[0] == 0 || a[0] as i32 == k.proc.pid {
        Ok(k.proc.sid as i64)
    } else {
        sys!(libc::SYS_getsid, a[0] as i32)
    }
}

/// setpgid/setsid: the guest's process group is its own business.
pub fn setpgid(k: &mut Kernel, nr: i64, a: [u64; 6]) -> SysResult {
    if nr == libc::SYS_setsid {
        if k.proc.pgid == k.proc.pid {
            return Err(Errno(libc::EPERM));
        }
        k.proc.sid = k.proc.pid;
        k.proc.pgid = k.proc.pid;
        return Ok(k.proc.pid as i64);
    }
    let pid = if a[0] == 0 { k.proc.pid } else { a[0] as i32 };
    if pid != k.proc.pid {
        return Err(Errno(libc::ESRCH));
    }
    k.proc.pgid = if a[1] == 0 { pid } else { a[1] as i32 };
    Ok(0)
}

pub fn getres(k: &mut Kernel, nr: i64, a: [u64; 6]) -> SysResult {
    let mut ids = [0u32; 3];
    let (p0, p1, p2) = (
        &mut ids[0] as *mut u32,
        &mut ids[1] as *mut u32,
        &mut ids[2] as *mut u32,
    );
    sys!(nr, p0, p1, p2)?;
    for (i, id) in ids.iter().enumerate() {
        k.write_user(a[i], &id.to_le_bytes())?;
    }
    Ok(0)
}

pub fn getgroups(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let mut groups = vec![0u32; 65536];
    let n = sys!(
        libc::SYS_getgroups,
        groups.len() as i32,
        groups.as_mut_ptr()
    )?;
    if a[0] == 0 {
        return Ok(n);
    }
    if (a[0] as i64) < n {
        return Err(Errno(libc::EINVAL));
    }
    let bytes: Vec<u8> = groups[..n as usize]
        .iter()
        .flat_map(|g| g.to_le_bytes())
        .collect();
    k.write_user(a[1], &bytes)?;
    Ok(n)
}

/// Changing credentials is not something a wrapped job may do: the VM runs as the
/// job's user. Asking for what one already has succeeds, as on Linux.
pub fn setid(nr: i64, a: [u64; 6]) -> SysResult {
    // SAFETY: identity getters cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let want_same = match nr {
        libc::SYS_setuid | libc::SYS_setfsuid => a[0] as u32 == uid,
        libc::SYS_setgid | libc::SYS_setfsgid => a[0] as u32 == gid,
        _ => false,
    };
    if want_same {
        Ok(0)
    } else {
        Err(Errno(libc::EPERM))
    }
}

pub fn uname(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let mut buf = [0u8; 390];
    sys!(libc::SYS_uname, buf.as_mut_ptr())?;
    k.write_user(a[0], &buf)?;
    Ok(0)
}

pub fn sysinfo(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let mut buf = [0u8; 112];
    sys!(libc::SYS_sysinfo, buf.as_mut_ptr())?;
    // totalram/freeram (offsets 32 and 40, in units of mem_unit at offset 104) as the
    // guest's memory limit, so programs size themselves to the VM.
    let unit = u32::from_le_bytes(buf[104..108].try_into().expect("4")).max(1) as u64;
    let total = k.proc.mm.commit_limit / unit;
    let free = k.proc.mm.commit_limit.saturating_sub(k.proc.mm.committed) / unit;
    let host_total = u64::from_le_bytes(buf[32..40].try_into().expect("8"));
    if total < host_total {
        buf[32..40].copy_from_slice(&total.to_le_bytes());
        buf[40..48].copy_from_slice(&free.to_le_bytes());
    }
    k.write_user(a[0], &buf)?;
    Ok(0)
}

pub fn prlimit(k: &mut Kernel, pid: u64, resource: u64, new: u64, old: u64) -> SysResult {
    if pid != 0 && pid as i32 != k.proc.pid {
        return Err(Errno(libc::ESRCH));
    }
    let r = resource as usize;
    if r >= k.proc.rlimits.len() {
        return Err(Errno(libc::EINVAL));
    }
    let cur = k.proc.rlimits[r];
    if old != 0 {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&cur.0.to_le_bytes());
        b[8..].copy_from_slice(&cur.1.to_le_bytes());
        k.write_user(old, &b)?;
    }
    if new != 0 {
        let b = k.read_user(new, 16)?;
        let soft = u64::from_le_bytes(b[..8].try_into().expect("8"));
        let hard = u64::from_le_bytes(b[8..].try_into().expect("8"));
        if soft > hard || hard > cur.1 {
            return Err(Errno(if soft > hard {
                libc::EINVAL
            } else {
                libc::EPERM
            }));
        }
        k.proc.rlimits[r] = (soft, hard);
    }
    Ok(0)
}

/// The guest has one vCPU per thread it runs and runs one thread today, so it is
/// shown one CPU: programs then size their thread pools to what the VM can run.
pub fn sched_getaffinity(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let size = (a[1] as usize).min(1024);
    let mut mask = vec![0u8; size];
    let n = sys!(libc::SYS_sched_getaffinity, 0, size, mask.as_mut_ptr())?;
    let first = mask.iter().position(|&b| b != 0).unwrap_or(0);
    let bit = mask.get(first).map_or(0, |b| b.trailing_zeros());
    mask.iter_mut().for_each(|b| *b = 0);
    if first < mask.len() {
        mask[first] = 1 << bit;
    }
    k.write_user(a[2], &mask[..n as usize])?;
    Ok(n)
}

pub fn zero_struct(k: &mut Kernel, ptr: u64, len: usize) -> SysResult {
    k.write_user(ptr, &vec![0u8; len])?;
    Ok(0)
}

pub fn getcpu(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let cpu = k.vcpu.index() as u32;
    if a[0] != 0 {
        k.write_user(a[0], &cpu.to_le_bytes())?;
    }
    if a[1] != 0 {
        k.write_user(a[1], &0u32.to_le_bytes())?;
    }
    Ok(0)
}

pub fn capget(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    // Report no capabilities: the guest runs with the job user's rights only.
    if a[1] != 0 {
        k.write_user(a[1], &[0u8; 24])?;
    }
    Ok(0)
}
