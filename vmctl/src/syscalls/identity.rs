//! Who the guest is and what it may use: ids, uname, limits, CPUs.

use super::fs::sys;
use crate::kernel::task::Task;
use crate::kernel::thread_group::ThreadGroup;
use crate::kernel::{Errno, SysResult};
use std::sync::Arc;

/// The process `pid` names (0: the caller) among the job's own.
fn group_of(t: &Task, pid: i32) -> Result<Arc<ThreadGroup>, Errno> {
    if pid == 0 || pid == t.tgid() {
        return Ok(t.tg().clone());
    }
    if pid < 0 {
        return Err(Errno(libc::ESRCH));
    }
    let pids = t.k.pids.lock().expect("pids poisoned");
    pids.group(pid)
        .filter(|g| !g.lock().is_zombie())
        .cloned()
        .ok_or(Errno(libc::ESRCH))
}

pub fn getpgid(t: &mut Task, a: [u64; 6]) -> SysResult {
    let g = group_of(t, a[0] as i32)?;
    let pgid = g.lock().pgid;
    Ok(pgid as i64)
}

pub fn getsid(t: &mut Task, a: [u64; 6]) -> SysResult {
    let g = group_of(t, a[0] as i32)?;
    let sid = g.lock().sid;
    Ok(sid as i64)
}

/// setpgid and setsid, on the job's own processes.
pub fn setpgid(t: &mut Task, nr: i64, a: [u64; 6]) -> SysResult {
    let me = t.tgid();
    if nr == libc::SYS_setsid {
        // A process group leader cannot start a session.
        let pids = t.k.pids.lock().expect("pids poisoned");
        let leads = pids
            .groups
            .values()
            .any(|g| g.tgid != me && g.lock().pgid == me);
        drop(pids);
        let mut st = t.tg().lock();
        if st.pgid == me || leads {
            return Err(Errno(libc::EPERM));
        }
        st.sid = me;
        st.pgid = me;
        return Ok(me as i64);
    }
    let pid = if a[0] == 0 { me } else { a[0] as i32 };
    let pgid = if a[1] == 0 { pid } else { a[1] as i32 };
    if pgid < 0 {
        return Err(Errno(libc::EINVAL));
    }
    let target = group_of(t, pid)?;
    let (my_sid, target_ppid, target_sid) = {
        let mine = t.tg().lock().sid;
        let st = target.lock();
        (mine, st.ppid, st.sid)
    };
    // Only the caller itself or one of its children, in the same session.
    if pid != me && target_ppid != me {
        return Err(Errno(libc::ESRCH));
    }
    if target_sid != my_sid || (target_sid == pid) {
        return Err(Errno(libc::EPERM));
    }
    if pgid != pid {
        // The group must exist in the caller's session.
        let pids = t.k.pids.lock().expect("pids poisoned");
        let exists = pids.groups.values().any(|g| {
            let st = g.lock();
            st.pgid == pgid && st.sid == my_sid
        });
        if !exists {
            return Err(Errno(libc::EPERM));
        }
    }
    target.lock().pgid = pgid;
    Ok(0)
}

pub fn getres(t: &mut Task, nr: i64, a: [u64; 6]) -> SysResult {
    let mut ids = [0u32; 3];
    let (p0, p1, p2) = (
        &mut ids[0] as *mut u32,
        &mut ids[1] as *mut u32,
        &mut ids[2] as *mut u32,
    );
    sys!(nr, p0, p1, p2)?;
    for (i, id) in ids.iter().enumerate() {
        t.write_user(a[i], &id.to_le_bytes())?;
    }
    Ok(0)
}

pub fn getgroups(t: &mut Task, a: [u64; 6]) -> SysResult {
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
    t.write_user(a[1], &bytes)?;
    Ok(n)
}

/// Changing credentials is not something a wrapped job may do: the VM runs as the
/// job's user. Asking for what one already has succeeds, as on Linux.
pub fn setid(nr: i64, a: [u64; 6]) -> SysResult {
    // SAFETY: identity getters cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    // -1 leaves an id as it is.
    let same = |v: u64, id: u32| v as u32 == u32::MAX || v as u32 == id;
    let want_same = match nr {
        libc::SYS_setuid | libc::SYS_setfsuid => a[0] as u32 == uid,
        libc::SYS_setgid | libc::SYS_setfsgid => a[0] as u32 == gid,
        libc::SYS_setreuid => same(a[0], uid) && same(a[1], uid),
        libc::SYS_setregid => same(a[0], gid) && same(a[1], gid),
        libc::SYS_setresuid => (0..3).all(|i| same(a[i], uid)),
        libc::SYS_setresgid => (0..3).all(|i| same(a[i], gid)),
        _ => false,
    };
    if want_same {
        Ok(0)
    } else {
        Err(Errno(libc::EPERM))
    }
}

pub fn uname(t: &mut Task, a: [u64; 6]) -> SysResult {
    let mut buf = [0u8; 390];
    sys!(libc::SYS_uname, buf.as_mut_ptr())?;
    t.write_user(a[0], &buf)?;
    Ok(0)
}

pub fn sysinfo(t: &mut Task, a: [u64; 6]) -> SysResult {
    let mut buf = [0u8; 112];
    sys!(libc::SYS_sysinfo, buf.as_mut_ptr())?;
    // totalram/freeram (offsets 32 and 40, in units of mem_unit at offset 104) as the
    // guest's memory limit, so programs size themselves to the VM.
    let unit = u32::from_le_bytes(buf[104..108].try_into().expect("4")).max(1) as u64;
    let total = t.k.commit.limit() / unit;
    let free = t.k.commit.limit().saturating_sub(t.k.commit.used()) / unit;
    let host_total = u64::from_le_bytes(buf[32..40].try_into().expect("8"));
    if total < host_total {
        buf[32..40].copy_from_slice(&total.to_le_bytes());
        buf[40..48].copy_from_slice(&free.to_le_bytes());
    }
    t.write_user(a[0], &buf)?;
    Ok(0)
}

pub fn prlimit(t: &mut Task, pid: u64, resource: u64, new: u64, old: u64) -> SysResult {
    let g = group_of(t, pid as i32)?;
    let r = resource as usize;
    let Some(cur) = g.lock().rlimits.get(r).copied() else {
        return Err(Errno(libc::EINVAL));
    };
    if old != 0 {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&cur.0.to_le_bytes());
        b[8..].copy_from_slice(&cur.1.to_le_bytes());
        t.write_user(old, &b)?;
    }
    if new != 0 {
        let b = t.read_user(new, 16)?;
        let soft = u64::from_le_bytes(b[..8].try_into().expect("8"));
        let hard = u64::from_le_bytes(b[8..].try_into().expect("8"));
        if soft > hard || hard > cur.1 {
            return Err(Errno(if soft > hard {
                libc::EINVAL
            } else {
                libc::EPERM
            }));
        }
        g.lock().rlimits[r] = (soft, hard);
    }
    Ok(0)
}

/// The CPUs vmctl itself may run on (under Slurm, the job's allocation): every
/// guest thread runs on its own vCPU thread, so OpenMP and BLAS size their pools to
/// what the job was given.
pub fn sched_getaffinity(t: &mut Task, a: [u64; 6]) -> SysResult {
    let size = (a[1] as usize).min(1024);
    let mut mask = vec![0u8; size];
    let n = sys!(libc::SYS_sched_getaffinity, 0, size, mask.as_mut_ptr())?;
    t.write_user(a[2], &mask[..n as usize])?;
    Ok(n)
}

pub fn zero_struct(t: &mut Task, ptr: u64, len: usize) -> SysResult {
    t.write_user(ptr, &vec![0u8; len])?;
    Ok(0)
}

pub fn getcpu(t: &mut Task, a: [u64; 6]) -> SysResult {
    // The host CPU the guest thread's vCPU runs on right now.
    // SAFETY: sched_getcpu takes no arguments.
    let cpu = unsafe { libc::sched_getcpu() }.max(0) as u32;
    if a[0] != 0 {
        t.write_user(a[0], &cpu.to_le_bytes())?;
    }
    if a[1] != 0 {
        t.write_user(a[1], &0u32.to_le_bytes())?;
    }
    Ok(0)
}

pub fn capget(t: &mut Task, a: [u64; 6]) -> SysResult {
    // Report no capabilities: the guest runs with the job user's rights only.
    if a[1] != 0 {
        t.write_user(a[1], &[0u8; 24])?;
    }
    Ok(0)
}
