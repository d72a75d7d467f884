//! Files, directories and descriptors. Paths are the host's (the guest sees the
//! host filesystem); descriptors are translated through the guest's fd table, and
//! bulk I/O goes straight between the host file and guest memory.

use super::guest_path;
use super::procfs;
use crate::kernel::files::{FdEntry, OpenFile};
use crate::kernel::mm::Access;
use crate::kernel::task::Task;
use crate::kernel::{Errno, SysResult};
use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// Runs a raw host syscall, turning -1 into the host errno.
pub(super) fn host(r: i64) -> SysResult {
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

macro_rules! sys {
    ($nr:expr $(, $arg:expr)* $(,)?) => {
        // SAFETY: every pointer argument points at a live local buffer or CString of the
        // size the syscall expects, or into guest RAM through bounds-checked iovecs.
        $crate::syscalls::fs::host(unsafe { libc::syscall($nr $(, $arg)*) } as i64)
    };
}
pub(super) use sys;

pub(super) fn dirfd(t: &Task, fd: u64) -> Result<RawFd, Errno> {
    let fd = fd as i32;
    if fd == libc::AT_FDCWD {
        // The guest process's working directory, never vmctl's own.
        Ok(t.fs().cwd_fd())
    } else {
        t.files().host(fd)
    }
}

/// A path for a host call that has no *at form: a relative one is made relative to
/// the guest process's working directory.
pub(super) fn cwd_path(t: &mut Task, ptr: u64) -> Result<CString, Errno> {
    let (d, p) = guest_path::host_at(t, libc::AT_FDCWD as u64, ptr, true)?;
    Ok(if d == libc::AT_FDCWD {
        p
    } else {
        relative_to_cwd(t, p)
    })
}

/// A resolved path for the `*at` calls that take AT_EMPTY_PATH and
/// AT_SYMLINK_NOFOLLOW: with an empty path and AT_EMPTY_PATH the call is about the
/// descriptor itself, which needs no resolving.
fn path_at(t: &mut Task, dfd: u64, pathp: u64, flags: i32) -> Result<(RawFd, CString), Errno> {
    let p = path(t, pathp)?;
    if p.as_bytes().is_empty() && flags & libc::AT_EMPTY_PATH != 0 {
        return Ok((host_fd(t, dfd)?, p));
    }
    let d = dirfd(t, dfd)?;
    guest_path::at_host(t, d, p, flags & libc::AT_SYMLINK_NOFOLLOW == 0)
}

pub(super) fn path(t: &mut Task, ptr: u64) -> Result<CString, Errno> {
    let bytes = t.read_cstr(ptr)?;
    CString::new(bytes).map_err(|_| Errno(libc::EINVAL))
}

fn host_fd(t: &Task, fd: u64) -> Result<RawFd, Errno> {
    t.files().host(fd as i32)
}

fn nofile(t: &Task) -> u64 {
    t.rlimit(libc::RLIMIT_NOFILE).0
}

/// Installs a new host descriptor as the lowest free guest descriptor.
pub(super) fn install(t: &mut Task, host: RawFd, cloexec: bool) -> SysResult {
    // SAFETY: `host` was just returned by a successful host call and is owned by no one.
    let owned = unsafe { OwnedFd::from_raw_fd(host) };
    // Keep vmctl's own descriptors out of anything vmctl might exec.
    // SAFETY: plain fcntl on a descriptor we own.
    unsafe { libc::fcntl(host, libc::F_SETFD, libc::FD_CLOEXEC) };
    let file = Arc::new(OpenFile {
        host: owned,
        path: None,
        stdio: None,
    });
    let limit = nofile(t);
    Ok(t.files().install(file, cloexec, 0, limit)? as i64)
}

/// Lets the file journal record what undoing a write to `fd` needs, before it is made
/// (see crate::filejournal). Make the write, then pass this to `FileJournal::written`.
fn journal_write<'k>(
    k: &'k crate::kernel::Kernel,
    t: &Task,
    fd: u64,
    offset: Option<u64>,
    len: u64,
) -> Option<crate::filejournal::track::Pending<'k>> {
    if !k.files_journal.is_active() {
        return None;
    }
    let file = t.files().get(fd as i32).map(|e| e.file.clone()).ok()?;
    k.files_journal.before_write(&file, offset, len)
}

fn iov_len(iov: &[libc::iovec]) -> u64 {
    iov.iter().map(|v| v.iov_len as u64).sum()
}

/// A `loff_t *` argument, or None when null or unreadable.
fn offset_arg(t: &mut Task, ptr: u64) -> Option<u64> {
    (ptr != 0).then(|| t.read_user_u64(ptr).ok()).flatten()
}

pub fn read(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let iov = t.user_iovecs(a[1], a[2], Access::Write)?;
    let n = iov.len().min(1024) as i32;
    sys!(libc::SYS_readv, fd, iov.as_ptr(), n)
}

/// Linux raises SIGPIPE for a write to a pipe or socket nobody reads; vmctl itself
/// ignores SIGPIPE, so the host call only reports EPIPE and the guest's signal is
/// raised here.
pub(super) fn epipe_sigpipe(t: &mut Task, r: SysResult) -> SysResult {
    if r == Err(Errno(libc::EPIPE)) {
        t.signal_self(libc::SIGPIPE, Default::default());
    }
    r
}

pub fn write(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let iov = t.user_iovecs(a[1], a[2], Access::Read)?;
    let n = iov.len().min(1024) as i32;
    let k = t.k.clone();
    let pending = journal_write(&k, t, a[0], None, iov_len(&iov[..n as usize]));
    let r = sys!(libc::SYS_writev, fd, iov.as_ptr(), n);
    k.files_journal.written(pending, &r);
    epipe_sigpipe(t, r)
}

pub fn pread(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let iov = t.user_iovecs(a[1], a[2], Access::Write)?;
    let n = iov.len().min(1024) as i32;
    sys!(libc::SYS_preadv, fd, iov.as_ptr(), n, a[3], 0)
}

pub fn pwrite(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let iov = t.user_iovecs(a[1], a[2], Access::Read)?;
    let n = iov.len().min(1024) as i32;
    let k = t.k.clone();
    let pending = journal_write(&k, t, a[0], Some(a[3]), iov_len(&iov[..n as usize]));
    let r = sys!(libc::SYS_pwritev, fd, iov.as_ptr(), n, a[3], 0);
    k.files_journal.written(pending, &r);
    epipe_sigpipe(t, r)
}

fn guest_iovecs(
    t: &mut Task,
    ptr: u64,
    count: u64,
    write_to_guest: bool,
) -> Result<Vec<libc::iovec>, Errno> {
    if count > 1024 {
        return Err(Errno(libc::EINVAL));
    }
    let raw = t.read_user(ptr, count as usize * 16)?;
    let access = if write_to_guest {
        Access::Write
    } else {
        Access::Read
    };
    let mut out = Vec::new();
    for c in raw.chunks(16) {
        let base = u64::from_le_bytes(c[0..8].try_into().expect("8"));
        let len = u64::from_le_bytes(c[8..16].try_into().expect("8"));
        out.extend(t.user_iovecs(base, len, access)?);
    }
    out.truncate(1024);
    Ok(out)
}

pub fn readv(t: &mut Task, a: [u64; 6], is_write: bool) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let iov = guest_iovecs(t, a[1], a[2], !is_write)?;
    let k = t.k.clone();
    let pending = is_write
        .then(|| journal_write(&k, t, a[0], None, iov_len(&iov)))
        .flatten();
    let nr = if is_write {
        libc::SYS_writev
    } else {
        libc::SYS_readv
    };
    let r = sys!(nr, fd, iov.as_ptr(), iov.len() as i32);
    k.files_journal.written(pending, &r);
    epipe_sigpipe(t, r)
}

pub fn preadv(t: &mut Task, a: [u64; 6], is_write: bool) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let iov = guest_iovecs(t, a[1], a[2], !is_write)?;
    // pwritev2 writes at the current position when the offset is -1.
    let at = (a[3] as i64 != -1).then_some(a[3]);
    let k = t.k.clone();
    let pending = is_write
        .then(|| journal_write(&k, t, a[0], at, iov_len(&iov)))
        .flatten();
    let nr = if is_write {
        libc::SYS_pwritev
    } else {
        libc::SYS_preadv
    };
    let r = sys!(nr, fd, iov.as_ptr(), iov.len() as i32, a[3], a[4]);
    k.files_journal.written(pending, &r);
    epipe_sigpipe(t, r)
}

pub fn openat(t: &mut Task, dfd: u64, pathp: u64, flags: u64, mode: u64) -> SysResult {
    let flags = flags as i32;
    let follow = flags & libc::O_NOFOLLOW == 0
        && flags & (libc::O_CREAT | libc::O_EXCL) != (libc::O_CREAT | libc::O_EXCL);
    let (d, p) = guest_path::at(t, dfd, pathp, follow)?;
    let cloexec = flags & libc::O_CLOEXEC != 0;
    // Linux takes a descriptor slot before looking at the path: with a full table
    // the answer is EMFILE whatever the path.
    if t.files().lowest_free(0) as u64 >= nofile(t) {
        return Err(Errno(libc::EMFILE));
    }
    if let Some(fd) = procfs::open(t, &p, flags)? {
        return install(t, fd, cloexec);
    }
    let mode = t.fs().apply_umask(mode);
    // O_TRUNC is a change to the file: opened without it, the journal records what
    // the truncation cuts, then it is done.
    let truncate = flags & libc::O_TRUNC != 0
        && flags & libc::O_ACCMODE != libc::O_RDONLY
        && t.k.files_journal.is_active();
    let open_flags = if truncate {
        flags & !libc::O_TRUNC
    } else {
        flags
    };
    let fd = sys!(
        libc::SYS_openat,
        d,
        p.as_ptr(),
        open_flags | libc::O_CLOEXEC,
        mode as u32
    )?;
    let fd = guest_path::check_opened(fd as RawFd)?;
    if truncate {
        let _pending = t.k.files_journal.before_truncate_fd(fd, false, 0);
        // SAFETY: fstat into a local struct, then ftruncate, on the descriptor just
        // opened; only a regular file is truncated (O_TRUNC ignores the others).
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let regular =
            unsafe { libc::fstat(fd, &mut st) } == 0 && st.st_mode & libc::S_IFMT == libc::S_IFREG;
        if regular && unsafe { libc::ftruncate(fd, 0) } != 0 {
            let e = Errno::last();
            // SAFETY: closing the descriptor opened above, owned by nothing else.
            unsafe { libc::close(fd) };
            return Err(e);
        }
    }
    install(t, fd, cloexec)
}

pub fn close(t: &mut Task, a: [u64; 6]) -> SysResult {
    t.files().remove(a[0] as i32)?;
    Ok(0)
}

pub fn close_range(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (first, last, flags) = (a[0] as u32, a[1] as u32, a[2] as u32);
    if first > last {
        return Err(Errno(libc::EINVAL));
    }
    let mut files = t.files();
    for fd in files.fds() {
        let u = fd as u32;
        if u >= first && u <= last {
            if flags & 4 != 0 {
                files.get_mut(fd)?.cloexec = true;
            } else {
                let _ = files.remove(fd);
            }
        }
    }
    Ok(0)
}

pub fn lseek(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    sys!(libc::SYS_lseek, fd, a[1], a[2] as i32)
}

pub fn fstatat(t: &mut Task, dfd: u64, pathp: u64, out: u64, flags: u64) -> SysResult {
    let (d, p) = path_at(t, dfd, pathp, flags as i32)?;
    let mut st = [0u8; 144];
    if let Some(r) = procfs::stat(t, &p, &mut st)? {
        t.write_user(out, &st)?;
        return Ok(r);
    }
    sys!(
        libc::SYS_newfstatat,
        d,
        p.as_ptr(),
        st.as_mut_ptr(),
        flags as i32
    )?;
    t.write_user(out, &st)?;
    Ok(0)
}

pub fn fstat(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let mut st = [0u8; 144];
    sys!(libc::SYS_fstat, fd, st.as_mut_ptr())?;
    t.write_user(a[1], &st)?;
    Ok(0)
}

pub fn statx(t: &mut Task, a: [u64; 6]) -> SysResult {
    let flags = a[2] as i32;
    let (d, p) = path_at(t, a[0], a[1], flags)?;
    let p = procfs::redirect(t, p);
    let mut buf = [0u8; 256];
    sys!(
        libc::SYS_statx,
        d,
        p.as_ptr(),
        flags,
        a[3] as u32,
        buf.as_mut_ptr()
    )?;
    t.write_user(a[4], &buf)?;
    Ok(0)
}

pub fn statfs(t: &mut Task, a: [u64; 6]) -> SysResult {
    let p = cwd_path(t, a[0])?;
    let mut buf = [0u8; 120];
    sys!(libc::SYS_statfs, p.as_ptr(), buf.as_mut_ptr())?;
    t.write_user(a[1], &buf)?;
    Ok(0)
}

pub fn fstatfs(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let mut buf = [0u8; 120];
    sys!(libc::SYS_fstatfs, fd, buf.as_mut_ptr())?;
    t.write_user(a[1], &buf)?;
    Ok(0)
}

pub fn getdents64(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    if procfs::is_fd_dir(fd) {
        let buf = procfs::fd_dir_getdents(t, fd, a[2] as usize)?;
        t.write_user(a[1], &buf)?;
        return Ok(buf.len() as i64);
    }
    let mut buf = vec![0u8; (a[2] as usize).min(1 << 20)];
    let n = sys!(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len())?;
    t.write_user(a[1], &buf[..n as usize])?;
    Ok(n)
}

pub fn faccessat(t: &mut Task, dfd: u64, pathp: u64, mode: u64, flags: u64) -> SysResult {
    let (d, p) = path_at(t, dfd, pathp, flags as i32)?;
    let p = procfs::redirect(t, p);
    sys!(
        libc::SYS_faccessat2,
        d,
        p.as_ptr(),
        mode as i32,
        flags as i32
    )
}

pub fn readlinkat(t: &mut Task, dfd: u64, pathp: u64, buf: u64, size: u64) -> SysResult {
    let (d, p) = guest_path::at(t, dfd, pathp, false)?;
    if size as i64 <= 0 {
        return Err(Errno(libc::EINVAL));
    }
    let target = match procfs::readlink(t, &p)? {
        Some(x) => x,
        None => {
            let mut out = vec![0u8; (size as usize).min(libc::PATH_MAX as usize * 4)];
            let n = sys!(
                libc::SYS_readlinkat,
                d,
                p.as_ptr(),
                out.as_mut_ptr(),
                out.len()
            )?;
            out.truncate(n as usize);
            out
        }
    };
    let n = target.len().min(size as usize);
    t.write_user(buf, &target[..n])?;
    Ok(n as i64)
}

pub fn fcntl(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = a[0] as i32;
    let cmd = a[1] as i32;
    match cmd {
        libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => {
            let file = t.files().get(fd)?.file.clone();
            let limit = nofile(t);
            if a[2] >= limit {
                return Err(Errno(libc::EINVAL));
            }
            let new = t
                .files()
                .install(file, cmd == libc::F_DUPFD_CLOEXEC, a[2] as i32, limit)?;
            Ok(new as i64)
        }
        libc::F_GETFD => Ok(i64::from(t.files().get(fd)?.cloexec)),
        libc::F_SETFD => {
            t.files().get_mut(fd)?.cloexec = a[2] & libc::FD_CLOEXEC as u64 != 0;
            Ok(0)
        }
        libc::F_GETLK
        | libc::F_SETLK
        | libc::F_SETLKW
        | libc::F_OFD_GETLK
        | libc::F_OFD_SETLK
        | libc::F_OFD_SETLKW => {
            let h = host_fd(t, a[0])?;
            let mut fl = t.read_user(a[2], 32)?;
            let r = sys!(libc::SYS_fcntl, h, cmd, fl.as_mut_ptr())?;
            if cmd == libc::F_GETLK || cmd == libc::F_OFD_GETLK {
                t.write_user(a[2], &fl)?;
            }
            Ok(r)
        }
        libc::F_SETOWN => {
            // The owner gets SIGIO/SIGURG: only the caller itself (vmctl on the host,
            // which forwards the signal) may be one, never another host process.
            let owner = a[2] as i32;
            let h = host_fd(t, a[0])?;
            if owner != 0 && owner != t.tgid() {
                return Err(Errno(libc::ESRCH));
            }
            // SAFETY: getpid cannot fail.
            let host_owner = if owner == 0 {
                0
            } else {
                unsafe { libc::getpid() }
            };
            sys!(libc::SYS_fcntl, h, cmd, host_owner)
        }
        libc::F_GETOWN => {
            let h = host_fd(t, a[0])?;
            let owner = sys!(libc::SYS_fcntl, h, cmd)?;
            // SAFETY: getpid cannot fail.
            Ok(if owner == unsafe { libc::getpid() } as i64 {
                t.tgid() as i64
            } else {
                owner
            })
        }
        libc::F_GETFL
        | libc::F_SETFL
        | libc::F_GETPIPE_SZ
        | libc::F_SETPIPE_SZ
        | libc::F_ADD_SEALS
        | libc::F_GET_SEALS => {
            let h = host_fd(t, a[0])?;
            sys!(libc::SYS_fcntl, h, cmd, a[2])
        }
        _ => Err(Errno(libc::EINVAL)),
    }
}

pub fn ioctl(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = a[0] as i32;
    let req = a[1];
    let h = host_fd(t, a[0])?;
    // (request, bytes copied in, bytes copied out) for the terminal and descriptor
    // requests programs make; anything else is refused as "not a terminal".
    let (copy_in, copy_out): (usize, usize) = match req {
        0x5401 => (0, 36),          // TCGETS
        0x5402..=0x5404 => (36, 0), // TCSETS, TCSETSW, TCSETSF
        0x5413 => (0, 8),           // TIOCGWINSZ
        0x5414 => (8, 0),           // TIOCSWINSZ
        0x540f | 0x5429 => (0, 4),  // TIOCGPGRP, TIOCGSID
        0x5410 => (4, 0),           // TIOCSPGRP
        0x541b | 0x5411 => (0, 4),  // FIONREAD, TIOCOUTQ
        0x5421 | 0x5452 => (4, 0),  // FIONBIO, FIOASYNC
        0x5409..=0x540b => {
            // TCFLSH, TCSBRK, TCXONC take their argument by value.
            return sys!(libc::SYS_ioctl, h, req, a[2]);
        }
        0x5451 => {
            t.files().get_mut(fd)?.cloexec = true; // FIOCLEX
            return Ok(0);
        }
        0x5450 => {
            t.files().get_mut(fd)?.cloexec = false; // FIONCLEX
            return Ok(0);
        }
        _ => return Err(Errno(libc::ENOTTY)),
    };
    let mut buf = if copy_in > 0 {
        t.read_user(a[2], copy_in)?
    } else {
        vec![0u8; copy_out]
    };
    let r = sys!(libc::SYS_ioctl, h, req, buf.as_mut_ptr())?;
    if copy_out > 0 {
        t.write_user(a[2], &buf)?;
    }
    Ok(r)
}

pub fn dup(t: &mut Task, a: [u64; 6]) -> SysResult {
    let file = t.files().get(a[0] as i32)?.file.clone();
    let limit = nofile(t);
    Ok(t.files().install(file, false, 0, limit)? as i64)
}

pub fn dup3(t: &mut Task, old: u64, new: u64, flags: u64, is_dup2: bool) -> SysResult {
    let (old, new) = (old as i32, new as i32);
    let file = t.files().get(old)?.file.clone();
    if old == new {
        return if is_dup2 {
            Ok(new as i64)
        } else {
            Err(Errno(libc::EINVAL))
        };
    }
    if new < 0 || new as u64 >= nofile(t) {
        return Err(Errno(libc::EBADF));
    }
    if flags & !(libc::O_CLOEXEC as u64) != 0 {
        return Err(Errno(libc::EINVAL));
    }
    let cloexec = flags & libc::O_CLOEXEC as u64 != 0;
    drop(t.files().install_at(new, FdEntry { file, cloexec }));
    Ok(new as i64)
}

pub fn pipe2(t: &mut Task, out: u64, flags: u64) -> SysResult {
    let flags = flags as i32;
    if flags & !(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_DIRECT) != 0 {
        return Err(Errno(libc::EINVAL));
    }
    let mut fds = [0i32; 2];
    sys!(
        libc::SYS_pipe2,
        fds.as_mut_ptr(),
        (flags & !libc::O_CLOEXEC) | libc::O_CLOEXEC
    )?;
    let cloexec = flags & libc::O_CLOEXEC != 0;
    let r = install(t, fds[0], cloexec)?;
    let w = install(t, fds[1], cloexec)?;
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&(r as i32).to_le_bytes());
    b[4..].copy_from_slice(&(w as i32).to_le_bytes());
    if let Err(e) = t.write_user(out, &b) {
        let _ = t.files().remove(r as i32);
        let _ = t.files().remove(w as i32);
        return Err(e);
    }
    Ok(0)
}

pub fn unlinkat(t: &mut Task, dfd: u64, pathp: u64, flags: u64) -> SysResult {
    let (d, p) = guest_path::host_at(t, dfd, pathp, false)?;
    sys!(libc::SYS_unlinkat, d, p.as_ptr(), flags as i32)
}

pub fn renameat2(t: &mut Task, od: u64, op: u64, nd: u64, np: u64, flags: u64) -> SysResult {
    let (od, o) = guest_path::host_at(t, od, op, false)?;
    let (nd, n) = guest_path::host_at(t, nd, np, false)?;
    sys!(
        libc::SYS_renameat2,
        od,
        o.as_ptr(),
        nd,
        n.as_ptr(),
        flags as u32
    )
}

pub fn mkdirat(t: &mut Task, dfd: u64, pathp: u64, mode: u64) -> SysResult {
    let (d, p) = guest_path::host_at(t, dfd, pathp, false)?;
    let mode = t.fs().apply_umask(mode);
    sys!(libc::SYS_mkdirat, d, p.as_ptr(), mode as u32)
}

pub fn linkat(t: &mut Task, od: u64, op: u64, nd: u64, np: u64, flags: u64) -> SysResult {
    let (od, o) = if flags as i32 & libc::AT_EMPTY_PATH != 0 {
        path_at(t, od, op, flags as i32)?
    } else {
        guest_path::host_at(t, od, op, flags as i32 & libc::AT_SYMLINK_FOLLOW != 0)?
    };
    let (nd, n) = guest_path::host_at(t, nd, np, false)?;
    sys!(
        libc::SYS_linkat,
        od,
        o.as_ptr(),
        nd,
        n.as_ptr(),
        flags as i32
    )
}

pub fn symlinkat(t: &mut Task, target: u64, dfd: u64, pathp: u64) -> SysResult {
    // The target is only text stored in the link; it is resolved when it is used.
    let target = path(t, target)?;
    let (d, p) = guest_path::host_at(t, dfd, pathp, false)?;
    sys!(libc::SYS_symlinkat, target.as_ptr(), d, p.as_ptr())
}

pub fn fchmodat(t: &mut Task, dfd: u64, pathp: u64, mode: u64) -> SysResult {
    let (d, p) = guest_path::host_at(t, dfd, pathp, true)?;
    sys!(libc::SYS_fchmodat, d, p.as_ptr(), mode as u32)
}

pub fn fchmod(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    sys!(libc::SYS_fchmod, fd, a[1] as u32)
}

pub fn fchownat(t: &mut Task, dfd: u64, pathp: u64, uid: u64, gid: u64, flags: u64) -> SysResult {
    let (d, p) = path_at(t, dfd, pathp, flags as i32)?;
    let p = if d == libc::AT_FDCWD {
        procfs::redirect(t, p)
    } else {
        p
    };
    sys!(
        libc::SYS_fchownat,
        d,
        p.as_ptr(),
        uid as u32,
        gid as u32,
        flags as i32
    )
}

pub fn fchown(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    sys!(libc::SYS_fchown, fd, a[1] as u32, a[2] as u32)
}

pub fn truncate(t: &mut Task, a: [u64; 6]) -> SysResult {
    let p = cwd_path(t, a[0])?;
    let file = t.k.files_journal.open_for_truncate(&p);
    let _pending = file.as_ref().and_then(|f| {
        use std::os::fd::AsRawFd;
        t.k.files_journal
            .before_truncate_fd(f.as_raw_fd(), false, a[1])
    });
    sys!(libc::SYS_truncate, p.as_ptr(), a[1] as i64)
}

pub fn ftruncate(t: &mut Task, a: [u64; 6]) -> SysResult {
    let file = t.files().get(a[0] as i32)?.file.clone();
    let _pending = t.k.files_journal.before_truncate(&file, a[1]);
    sys!(libc::SYS_ftruncate, file.raw(), a[1] as i64)
}

pub fn fsync(t: &mut Task, nr: i64, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    sys!(nr, fd)
}

pub fn sync() -> SysResult {
    sys!(libc::SYS_sync)
}

pub fn fallocate(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let file = t.files().get(a[0] as i32)?.file.clone();
    let _pending =
        t.k.files_journal
            .before_fallocate(&file, a[1] as i32, a[2], a[3]);
    sys!(
        libc::SYS_fallocate,
        fd,
        a[1] as i32,
        a[2] as i64,
        a[3] as i64
    )
}

pub fn fadvise(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    sys!(
        libc::SYS_fadvise64,
        fd,
        a[1] as i64,
        a[2] as i64,
        a[3] as i32
    )
}

pub fn flock(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    sys!(libc::SYS_flock, fd, a[1] as i32)
}

pub fn utimensat(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (d, p) = if a[1] == 0 {
        (host_fd(t, a[0])?, None)
    } else {
        let (d, p) = path_at(t, a[0], a[1], a[3] as i32)?;
        let p = if d == libc::AT_FDCWD {
            procfs::redirect(t, p)
        } else {
            p
        };
        (d, Some(p))
    };
    let times = if a[2] == 0 {
        None
    } else {
        Some(t.read_user(a[2], 32)?)
    };
    sys!(
        libc::SYS_utimensat,
        d,
        p.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
        times.as_ref().map_or(std::ptr::null(), |b| b.as_ptr()),
        a[3] as i32
    )
}

pub fn utimes_legacy(t: &mut Task, nr: i64, a: [u64; 6]) -> SysResult {
    let (dfd, pathp, times, size) = match nr {
        libc::SYS_futimesat => (a[0], a[1], a[2], 32),
        libc::SYS_utime => (libc::AT_FDCWD as u64, a[0], a[1], 16),
        _ => (libc::AT_FDCWD as u64, a[0], a[1], 32),
    };
    let (d, p) = if nr == libc::SYS_futimesat {
        guest_path::host_at(t, dfd, pathp, true)?
    } else {
        (dirfd(t, dfd)?, cwd_path(t, pathp)?)
    };
    let buf = if times == 0 {
        None
    } else {
        Some(t.read_user(times, size)?)
    };
    let tp = buf.as_ref().map_or(std::ptr::null(), |b| b.as_ptr());
    match nr {
        libc::SYS_utime => sys!(libc::SYS_utime, p.as_ptr(), tp),
        _ => sys!(libc::SYS_futimesat, d, p.as_ptr(), tp),
    }
}

pub fn getcwd(t: &mut Task, a: [u64; 6]) -> SysResult {
    let mut cwd = t.fs().cwd_path().into_os_string().into_encoded_bytes();
    cwd.push(0);
    if cwd.len() as u64 > a[1] {
        return Err(Errno(libc::ERANGE));
    }
    t.write_user(a[0], &cwd)?;
    Ok(cwd.len() as i64)
}

fn host_errno(e: std::io::Error) -> Errno {
    Errno(e.raw_os_error().unwrap_or(libc::EIO))
}

pub fn chdir(t: &mut Task, a: [u64; 6]) -> SysResult {
    // Unchanged by the resolver, a relative path stays relative to the working
    // directory's descriptor, as chdir below expects.
    let (_, p) = guest_path::at(t, libc::AT_FDCWD as u64, a[0], true)?;
    let p = procfs::redirect(t, p);
    let cwd = t.fs().cwd_fd();
    // chdir needs search permission on the directory, which opening it O_PATH does
    // not check.
    sys!(libc::SYS_faccessat, cwd, p.as_ptr(), libc::X_OK)?;
    t.fs().chdir(cwd, p.as_bytes()).map_err(host_errno)?;
    Ok(0)
}

pub fn fchdir(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    sys!(libc::SYS_faccessat, fd, c".".as_ptr(), libc::X_OK)?;
    t.fs().chdir_fd(fd).map_err(host_errno)?;
    Ok(0)
}

/// The umask is the guest process's own; vmctl applies it to the modes it passes on.
pub fn umask(t: &mut Task, a: [u64; 6]) -> SysResult {
    let mut fs = t.fs();
    let old = fs.umask;
    fs.umask = a[0] as u32 & 0o777;
    Ok(old as i64)
}

/// poll over guest descriptors: translated to host descriptors and back.
pub fn poll(t: &mut Task, fds_ptr: u64, nfds: u64, timeout_ms: i64) -> SysResult {
    if nfds > nofile(t).max(1024) {
        return Err(Errno(libc::EINVAL));
    }
    let raw = t.read_user(fds_ptr, nfds as usize * 8)?;
    let mut host_fds: Vec<libc::pollfd> = Vec::with_capacity(nfds as usize);
    let mut invalid = Vec::new();
    for (i, c) in raw.chunks(8).enumerate() {
        let fd = i32::from_le_bytes(c[0..4].try_into().expect("4"));
        let events = i16::from_le_bytes(c[4..6].try_into().expect("2"));
        let hfd = if fd < 0 {
            -1
        } else {
            match t.files().host(fd) {
                Ok(h) => h,
                Err(_) => {
                    invalid.push(i);
                    -1
                }
            }
        };
        host_fds.push(libc::pollfd {
            fd: hfd,
            events,
            revents: 0,
        });
    }
    let mut n = if invalid.len() == host_fds.len() && !host_fds.is_empty() {
        0
    } else {
        // SAFETY: host_fds is a live array of nfds pollfd structs.
        host(unsafe {
            libc::poll(
                host_fds.as_mut_ptr(),
                host_fds.len() as u64,
                timeout_ms as i32,
            )
        } as i64)?
    };
    let mut out = raw.clone();
    for (i, p) in host_fds.iter().enumerate() {
        let rev = if invalid.contains(&i) {
            libc::POLLNVAL
        } else {
            p.revents
        };
        out[i * 8 + 6..i * 8 + 8].copy_from_slice(&rev.to_le_bytes());
    }
    n += invalid.len() as i64;
    t.write_user(fds_ptr, &out)?;
    Ok(n)
}

pub(super) fn timespec_ms(t: &mut Task, ptr: u64) -> Result<i64, Errno> {
    if ptr == 0 {
        return Ok(-1);
    }
    let b = t.read_user(ptr, 16)?;
    let s = i64::from_le_bytes(b[0..8].try_into().expect("8"));
    let ns = i64::from_le_bytes(b[8..16].try_into().expect("8"));
    if s < 0 || !(0..1_000_000_000).contains(&ns) {
        return Err(Errno(libc::EINVAL));
    }
    Ok(s.saturating_mul(1000)
        .saturating_add((ns + 999_999) / 1_000_000)
        .min(i32::MAX as i64))
}

pub fn ppoll(t: &mut Task, a: [u64; 6]) -> SysResult {
    let ms = timespec_ms(t, a[2])?;
    super::signal::wait_with_mask(t, a[3], a[4])?;
    poll(t, a[0], a[1], ms)
}

/// select and pselect6, implemented with poll over the same descriptors.
pub fn select(t: &mut Task, a: [u64; 6], is_pselect: bool) -> SysResult {
    let nfds = a[0] as usize;
    if nfds > 1024 {
        return Err(Errno(libc::EINVAL));
    }
    let words = nfds.div_ceil(64);
    let mut sets = [vec![0u64; words], vec![0u64; words], vec![0u64; words]];
    for (i, set) in sets.iter_mut().enumerate() {
        if a[1 + i] != 0 && words > 0 {
            let b = t.read_user(a[1 + i], words * 8)?;
            for (w, c) in set.iter_mut().zip(b.chunks(8)) {
                *w = u64::from_le_bytes(c.try_into().expect("8"));
            }
        }
    }
    let timeout = if is_pselect {
        let ms = timespec_ms(t, a[4])?;
        if a[5] != 0 {
            // { const sigset_t *ss; size_t ss_len; }
            let b = t.read_user(a[5], 16)?;
            let ss = u64::from_le_bytes(b[0..8].try_into().expect("8"));
            let len = u64::from_le_bytes(b[8..16].try_into().expect("8"));
            super::signal::wait_with_mask(t, ss, len)?;
        }
        ms
    } else if a[4] == 0 {
        -1
    } else {
        let b = t.read_user(a[4], 16)?;
        let s = i64::from_le_bytes(b[0..8].try_into().expect("8"));
        let us = i64::from_le_bytes(b[8..16].try_into().expect("8"));
        (s * 1000 + (us + 999) / 1000).min(i32::MAX as i64)
    };
    let bit = |set: &Vec<u64>, fd: usize| set[fd / 64] >> (fd % 64) & 1 == 1;
    let mut pfds = Vec::new();
    let mut which = Vec::new();
    for fd in 0..nfds {
        let mut ev = 0i16;
        if bit(&sets[0], fd) {
            ev |= libc::POLLIN;
        }
        if bit(&sets[1], fd) {
            ev |= libc::POLLOUT;
        }
        if bit(&sets[2], fd) {
            ev |= libc::POLLPRI;
        }
        if ev != 0 {
            let h = t.files().host(fd as i32)?;
            pfds.push(libc::pollfd {
                fd: h,
                events: ev,
                revents: 0,
            });
            which.push(fd);
        }
    }
    // SAFETY: pfds is a live array of pollfd structs.
    host(unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as u64, timeout as i32) } as i64)?;
    let mut out = [vec![0u64; words], vec![0u64; words], vec![0u64; words]];
    let mut count = 0;
    for (p, &fd) in pfds.iter().zip(&which) {
        let r = p.revents;
        for (i, mask) in [
            libc::POLLIN | libc::POLLHUP | libc::POLLERR,
            libc::POLLOUT | libc::POLLERR,
            libc::POLLPRI,
        ]
        .iter()
        .enumerate()
        {
            if r & mask != 0 && bit(&sets[i], fd) {
                out[i][fd / 64] |= 1 << (fd % 64);
                count += 1;
            }
        }
    }
    for (i, set) in out.iter().enumerate() {
        if a[1 + i] != 0 && words > 0 {
            let b: Vec<u8> = set.iter().flat_map(|w| w.to_le_bytes()).collect();
            t.write_user(a[1 + i], &b)?;
        }
    }
    Ok(count)
}

pub fn sendfile(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (out, inp) = (host_fd(t, a[0])?, host_fd(t, a[1])?);
    let k = t.k.clone();
    let pending = journal_write(&k, t, a[0], None, a[3]);
    let r = with_offsets(t, [a[2]], |[off]| {
        let r = sys!(libc::SYS_sendfile, out, inp, off, a[3]);
        k.files_journal.written(pending, &r);
        r
    });
    epipe_sigpipe(t, r)
}

/// Optional `loff_t *` arguments (sendfile, splice, copy_file_range): each non-null
/// one is copied in, handed to the host call as a local, and copied back after.
fn with_offsets<const N: usize>(
    t: &mut Task,
    ptrs: [u64; N],
    call: impl FnOnce([*mut u8; N]) -> SysResult,
) -> SysResult {
    let mut vals: [Option<Vec<u8>>; N] = std::array::from_fn(|_| None);
    for (v, &p) in vals.iter_mut().zip(&ptrs) {
        if p != 0 {
            *v = Some(t.read_user(p, 8)?);
        }
    }
    let raw = std::array::from_fn(|i| {
        vals[i]
            .as_mut()
            .map_or(std::ptr::null_mut(), |o| o.as_mut_ptr())
    });
    let r = call(raw);
    for (v, &p) in vals.iter().zip(&ptrs) {
        if let Some(o) = v {
            t.write_user(p, o)?;
        }
    }
    r
}

pub fn copy_file_range(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (inp, out) = (host_fd(t, a[0])?, host_fd(t, a[2])?);
    let at = offset_arg(t, a[3]);
    let k = t.k.clone();
    let pending = journal_write(&k, t, a[2], at, a[4]);
    with_offsets(t, [a[1], a[3]], |[oin, oout]| {
        let r = sys!(
            libc::SYS_copy_file_range,
            inp,
            oin,
            out,
            oout,
            a[4],
            a[5] as u32
        );
        k.files_journal.written(pending, &r);
        r
    })
}

pub fn memfd_create(t: &mut Task, a: [u64; 6]) -> SysResult {
    let name = path(t, a[0])?;
    let flags = a[1] as u32;
    let fd = sys!(
        libc::SYS_memfd_create,
        name.as_ptr(),
        flags | libc::MFD_CLOEXEC
    )?;
    install(t, fd as RawFd, flags & libc::MFD_CLOEXEC != 0)
}

pub fn eventfd(t: &mut Task, nr: i64, a: [u64; 6]) -> SysResult {
    let flags = if nr == libc::SYS_eventfd2 {
        a[1] as i32
    } else {
        0
    };
    let fd = sys!(libc::SYS_eventfd2, a[0] as u32, flags | libc::EFD_CLOEXEC)?;
    install(t, fd as RawFd, flags & libc::EFD_CLOEXEC != 0)
}

pub fn mknodat(t: &mut Task, nr: i64, a: [u64; 6]) -> SysResult {
    let (dfd, p, mode, dev) = if nr == libc::SYS_mknod {
        (libc::AT_FDCWD as u64, a[0], a[1], a[2])
    } else {
        (a[0], a[1], a[2], a[3])
    };
    let (d, p) = guest_path::host_at(t, dfd, p, false)?;
    let mode = t.fs().apply_umask(mode & 0o7777) | (mode & libc::S_IFMT as u64);
    sys!(libc::SYS_mknodat, d, p.as_ptr(), mode as u32, dev as u32)
}

pub fn splice(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (inp, out) = (host_fd(t, a[0])?, host_fd(t, a[2])?);
    let at = offset_arg(t, a[3]);
    let k = t.k.clone();
    let pending = journal_write(&k, t, a[2], at, a[4]);
    let r = with_offsets(t, [a[1], a[3]], |[oin, oout]| {
        let r = sys!(libc::SYS_splice, inp, oin, out, oout, a[4], a[5] as u32);
        k.files_journal.written(pending, &r);
        r
    });
    epipe_sigpipe(t, r)
}

pub fn tee(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (inp, out) = (host_fd(t, a[0])?, host_fd(t, a[1])?);
    let r = sys!(libc::SYS_tee, inp, out, a[2], a[3] as u32);
    epipe_sigpipe(t, r)
}

/// XATTR_SIZE_MAX and XATTR_LIST_MAX.
const XATTR_MAX: usize = 1 << 16;

/// Where an xattr call finds its file: a path (following symlinks or not) or a descriptor.
enum XattrTarget {
    Path(CString),
    LinkPath(CString),
    Fd(RawFd),
}

fn xattr_target(t: &mut Task, nr: i64, arg: u64) -> Result<XattrTarget, Errno> {
    Ok(match nr {
        libc::SYS_getxattr | libc::SYS_setxattr | libc::SYS_listxattr | libc::SYS_removexattr => {
            // cwd_path has already put the guest's /proc entries' host files in.
            let p = cwd_path(t, arg)?;
            XattrTarget::Path(relative_to_cwd(t, p))
        }
        libc::SYS_lgetxattr
        | libc::SYS_lsetxattr
        | libc::SYS_llistxattr
        | libc::SYS_lremovexattr => XattrTarget::LinkPath(cwd_path(t, arg)?),
        _ => XattrTarget::Fd(host_fd(t, arg)?),
    })
}

fn relative_to_cwd(t: &Task, p: CString) -> CString {
    if p.as_bytes().first() == Some(&b'/') || p.as_bytes().is_empty() {
        return p;
    }
    let mut full = format!("/proc/self/fd/{}/", t.fs().cwd_fd()).into_bytes();
    full.extend_from_slice(p.as_bytes());
    CString::new(full).unwrap_or(p)
}

fn xattr_name(t: &mut Task, ptr: u64) -> Result<CString, Errno> {
    let name = t.read_cstr(ptr)?;
    if name.is_empty() || name.len() > 255 {
        return Err(Errno(libc::ERANGE));
    }
    CString::new(name).map_err(|_| Errno(libc::EINVAL))
}

/// The getxattr, setxattr, listxattr and removexattr families.
pub fn xattr(t: &mut Task, nr: i64, a: [u64; 6]) -> SysResult {
    let target = xattr_target(t, nr, a[0])?;
    match nr {
        libc::SYS_getxattr | libc::SYS_lgetxattr | libc::SYS_fgetxattr => {
            let name = xattr_name(t, a[1])?;
            let mut buf = vec![0u8; (a[3] as usize).min(XATTR_MAX)];
            let (p, n) = (buf.as_mut_ptr(), buf.len());
            let r = match &target {
                XattrTarget::Path(target) => {
                    sys!(libc::SYS_getxattr, target.as_ptr(), name.as_ptr(), p, n)
                }
                XattrTarget::LinkPath(target) => {
                    sys!(libc::SYS_lgetxattr, target.as_ptr(), name.as_ptr(), p, n)
                }
                XattrTarget::Fd(fd) => sys!(libc::SYS_fgetxattr, *fd, name.as_ptr(), p, n),
            }?;
            if n > 0 {
                t.write_user(a[2], &buf[..r as usize])?;
            }
            Ok(r)
        }
        libc::SYS_setxattr | libc::SYS_lsetxattr | libc::SYS_fsetxattr => {
            let name = xattr_name(t, a[1])?;
            if a[3] as usize > XATTR_MAX {
                return Err(Errno(libc::E2BIG));
            }
            let val = t.read_user(a[2], a[3] as usize)?;
            let (p, n, f) = (val.as_ptr(), val.len(), a[4] as i32);
            match &target {
                XattrTarget::Path(target) => {
                    sys!(libc::SYS_setxattr, target.as_ptr(), name.as_ptr(), p, n, f)
                }
                XattrTarget::LinkPath(target) => {
                    sys!(libc::SYS_lsetxattr, target.as_ptr(), name.as_ptr(), p, n, f)
                }
                XattrTarget::Fd(fd) => sys!(libc::SYS_fsetxattr, *fd, name.as_ptr(), p, n, f),
            }
        }
        libc::SYS_listxattr | libc::SYS_llistxattr | libc::SYS_flistxattr => {
            let mut buf = vec![0u8; (a[2] as usize).min(XATTR_MAX)];
            let (p, n) = (buf.as_mut_ptr(), buf.len());
            let r = match &target {
                XattrTarget::Path(target) => sys!(libc::SYS_listxattr, target.as_ptr(), p, n),
                XattrTarget::LinkPath(target) => sys!(libc::SYS_llistxattr, target.as_ptr(), p, n),
                XattrTarget::Fd(fd) => sys!(libc::SYS_flistxattr, *fd, p, n),
            }?;
            if n > 0 {
                t.write_user(a[1], &buf[..r as usize])?;
            }
            Ok(r)
        }
        _ => {
            let name = xattr_name(t, a[1])?;
            match &target {
                XattrTarget::Path(target) => {
                    sys!(libc::SYS_removexattr, target.as_ptr(), name.as_ptr())
                }
                XattrTarget::LinkPath(target) => {
                    sys!(libc::SYS_lremovexattr, target.as_ptr(), name.as_ptr())
                }
                XattrTarget::Fd(fd) => sys!(libc::SYS_fremovexattr, *fd, name.as_ptr()),
            }
        }
    }
}
