//! Event descriptors delegated to the host: epoll, inotify and timerfd. Each is a
//! host descriptor vmctl holds; the guest's descriptor numbers are translated where
//! they are arguments, and epoll's user data is opaque, so it passes through as is.

use super::fs::{install, sys};
use crate::kernel::task::Task;
use crate::kernel::{Errno, SysResult};
use std::os::fd::RawFd;

/// sizeof(struct epoll_event) on x86-64 (packed).
const EPOLL_EVENT: usize = 12;
/// The most events one wait copies; level-triggered readiness left over is reported
/// by the next wait, and the host dequeues no more than asked for.
const MAX_EVENTS: usize = 4096;

fn host_fd(t: &Task, fd: u64) -> Result<RawFd, Errno> {
    t.files().host(fd as i32)
}

pub fn epoll_create(t: &mut Task, nr: i64, a: [u64; 6]) -> SysResult {
    let flags = if nr == libc::SYS_epoll_create1 {
        a[0] as i32
    } else {
        if a[0] as i32 <= 0 {
            return Err(Errno(libc::EINVAL));
        }
        0
    };
    if flags & !libc::EPOLL_CLOEXEC != 0 {
        return Err(Errno(libc::EINVAL));
    }
    let fd = sys!(libc::SYS_epoll_create1, libc::EPOLL_CLOEXEC)?;
    install(t, fd as RawFd, flags & libc::EPOLL_CLOEXEC != 0)
}

pub fn epoll_ctl(t: &mut Task, a: [u64; 6]) -> SysResult {
    let epfd = host_fd(t, a[0])?;
    let fd = host_fd(t, a[2])?;
    let op = a[1] as i32;
    let mut ev = [0u8; EPOLL_EVENT];
    if op != libc::EPOLL_CTL_DEL {
        ev.copy_from_slice(&t.read_user(a[3], EPOLL_EVENT)?);
    }
    sys!(libc::SYS_epoll_ctl, epfd, op, fd, ev.as_mut_ptr())
}

/// epoll_wait, epoll_pwait and epoll_pwait2 (`timeout` already in milliseconds).
pub fn epoll_wait(t: &mut Task, a: [u64; 6], timeout_ms: i64) -> SysResult {
    let epfd = host_fd(t, a[0])?;
    let max = a[2] as i32;
    if max <= 0 || max as usize > i32::MAX as usize / EPOLL_EVENT {
        return Err(Errno(libc::EINVAL));
    }
    let mut buf = vec![0u8; (max as usize).min(MAX_EVENTS) * EPOLL_EVENT];
    let n = sys!(
        libc::SYS_epoll_wait,
        epfd,
        buf.as_mut_ptr(),
        (buf.len() / EPOLL_EVENT) as i32,
        timeout_ms.clamp(-1, i32::MAX as i64) as i32
    )?;
    if n > 0 {
        t.write_user(a[1], &buf[..n as usize * EPOLL_EVENT])?;
    }
    Ok(n)
}

pub fn inotify_init(t: &mut Task, flags: u64) -> SysResult {
    let flags = flags as i32;
    let fd = sys!(libc::SYS_inotify_init1, flags | libc::IN_CLOEXEC)?;
    install(t, fd as RawFd, flags & libc::IN_CLOEXEC != 0)
}

pub fn inotify_add_watch(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let p = super::fs::cwd_path(t, a[1])?;
    sys!(libc::SYS_inotify_add_watch, fd, p.as_ptr(), a[2] as u32)
}

pub fn inotify_rm_watch(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    sys!(libc::SYS_inotify_rm_watch, fd, a[1] as i32)
}

pub fn timerfd_create(t: &mut Task, a: [u64; 6]) -> SysResult {
    let flags = a[1] as i32;
    let fd = sys!(
        libc::SYS_timerfd_create,
        a[0] as i32,
        flags | libc::TFD_CLOEXEC
    )?;
    install(t, fd as RawFd, flags & libc::TFD_CLOEXEC != 0)
}

pub fn timerfd_settime(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let new = t.read_user(a[2], 32)?;
    let mut old = [0u8; 32];
    sys!(
        libc::SYS_timerfd_settime,
        fd,
        a[1] as i32,
        new.as_ptr(),
        old.as_mut_ptr()
    )?;
    if a[3] != 0 {
        t.write_user(a[3], &old)?;
    }
    Ok(0)
}

pub fn timerfd_gettime(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let mut cur = [0u8; 32];
    sys!(libc::SYS_timerfd_gettime, fd, cur.as_mut_ptr())?;
    t.write_user(a[1], &cur)?;
    Ok(0)
}
