//! Sockets, delegated to the host: a guest socket is a host socket vmctl holds, so
//! the guest reaches the host's network and Unix sockets (nscd, D-Bus, servers) as a
//! native process would. Addresses, options and control messages are copied through
//! local buffers; payloads go straight between the socket and guest memory.

use super::fs::{epipe_sigpipe, install, sys};
use crate::kernel::mm::Access;
use crate::kernel::task::Task;
use crate::kernel::{Errno, SysResult};
use std::os::fd::RawFd;

/// Large enough for any socket address (struct sockaddr_storage).
const SOCKADDR_MAX: usize = 128;
/// Linux's cap on option values and ancillary data worth copying.
const OPT_MAX: usize = 1 << 16;
/// UIO_MAXIOV.
const IOV_MAX: usize = 1024;
const MSG_NOSIGNAL: i32 = 0x4000;
const SCM_RIGHTS: i32 = 1;

fn host_fd(t: &Task, fd: u64) -> Result<RawFd, Errno> {
    t.files().host(fd as i32)
}

fn read_u32(t: &mut Task, va: u64) -> Result<u32, Errno> {
    let b = t.read_user(va, 4)?;
    Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
}

/// A socket address the guest passes in.
fn addr_in(t: &mut Task, ptr: u64, len: u64) -> Result<Vec<u8>, Errno> {
    if len as u32 as usize > SOCKADDR_MAX {
        return Err(Errno(libc::EINVAL));
    }
    if ptr == 0 || len == 0 {
        return Ok(Vec::new());
    }
    t.read_user(ptr, len as u32 as usize)
}

/// Buffer for an address the host fills in, sized like the guest's `*addrlen`.
struct AddrOut {
    ptr: u64,
    len_ptr: u64,
    guest_len: u32,
    buf: [u8; SOCKADDR_MAX],
    len: libc::socklen_t,
}

impl AddrOut {
    fn new(t: &mut Task, ptr: u64, len_ptr: u64) -> Result<AddrOut, Errno> {
        let guest_len = if ptr != 0 && len_ptr != 0 {
            read_u32(t, len_ptr)?
        } else {
            0
        };
        if (guest_len as i32) < 0 {
            return Err(Errno(libc::EINVAL));
        }
        Ok(AddrOut {
            ptr,
            len_ptr,
            guest_len,
            buf: [0; SOCKADDR_MAX],
            len: SOCKADDR_MAX as libc::socklen_t,
        })
    }

    fn wanted(&self) -> bool {
        self.ptr != 0 && self.len_ptr != 0
    }

    /// Copies out at most what the guest made room for and reports the full length,
    /// as the kernel's move_addr_to_user does.
    fn copy_out(&self, t: &mut Task) -> Result<(), Errno> {
        if !self.wanted() {
            return Ok(());
        }
        let n = (self.len as usize)
            .min(self.guest_len as usize)
            .min(SOCKADDR_MAX);
        if n > 0 {
            t.write_user(self.ptr, &self.buf[..n])?;
        }
        t.write_user(self.len_ptr, &self.len.to_le_bytes())
    }
}

pub fn socket(t: &mut Task, a: [u64; 6]) -> SysResult {
    let ty = a[1] as i32;
    let fd = sys!(
        libc::SYS_socket,
        a[0] as i32,
        ty | libc::SOCK_CLOEXEC,
        a[2] as i32
    )?;
    install(t, fd as RawFd, ty & libc::SOCK_CLOEXEC != 0)
}

pub fn socketpair(t: &mut Task, a: [u64; 6]) -> SysResult {
    let ty = a[1] as i32;
    let mut fds = [0i32; 2];
    sys!(
        libc::SYS_socketpair,
        a[0] as i32,
        ty | libc::SOCK_CLOEXEC,
        a[2] as i32,
        fds.as_mut_ptr()
    )?;
    let cloexec = ty & libc::SOCK_CLOEXEC != 0;
    let first = install(t, fds[0], cloexec);
    let second = install(t, fds[1], cloexec);
    let (first, second) = match (first, second) {
        (Ok(x), Ok(y)) => (x, y),
        (x, y) => {
            for fd in [x, y].into_iter().flatten() {
                let _ = t.files().remove(fd as i32);
            }
            return Err(Errno(libc::EMFILE));
        }
    };
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&(first as i32).to_le_bytes());
    b[4..].copy_from_slice(&(second as i32).to_le_bytes());
    if let Err(e) = t.write_user(a[3], &b) {
        let _ = t.files().remove(first as i32);
        let _ = t.files().remove(second as i32);
        return Err(e);
    }
    Ok(0)
}

/// connect and bind: a socket and an address.
pub fn with_addr(t: &mut Task, nr: i64, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let addr = addr_in(t, a[1], a[2])?;
    sys!(nr, fd, addr.as_ptr(), addr.len() as libc::socklen_t)
}

pub fn listen(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    sys!(libc::SYS_listen, fd, a[1] as i32)
}

pub fn shutdown(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    sys!(libc::SYS_shutdown, fd, a[1] as i32)
}

pub fn accept4(t: &mut Task, a: [u64; 6], flags: u64) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let flags = flags as i32;
    if flags & !(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) != 0 {
        return Err(Errno(libc::EINVAL));
    }
    let mut out = AddrOut::new(t, a[1], a[2])?;
    let (p, l) = if out.wanted() {
        (out.buf.as_mut_ptr(), &mut out.len as *mut libc::socklen_t)
    } else {
        (std::ptr::null_mut(), std::ptr::null_mut())
    };
    let new = sys!(libc::SYS_accept4, fd, p, l, flags | libc::SOCK_CLOEXEC)?;
    let guest = install(t, new as RawFd, flags & libc::SOCK_CLOEXEC != 0)?;
    if let Err(e) = out.copy_out(t) {
        let _ = t.files().remove(guest as i32);
        return Err(e);
    }
    Ok(guest)
}

/// getsockname and getpeername.
pub fn sockname(t: &mut Task, nr: i64, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    if a[1] == 0 || a[2] == 0 {
        return Err(Errno(libc::EFAULT));
    }
    let mut out = AddrOut::new(t, a[1], a[2])?;
    sys!(
        nr,
        fd,
        out.buf.as_mut_ptr(),
        &mut out.len as *mut libc::socklen_t
    )?;
    out.copy_out(t)?;
    Ok(0)
}

pub fn setsockopt(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let len = a[4] as u32 as usize;
    if len > OPT_MAX {
        return Err(Errno(libc::EINVAL));
    }
    let val = if a[3] == 0 || len == 0 {
        Vec::new()
    } else {
        t.read_user(a[3], len)?
    };
    let p = if a[3] == 0 {
        std::ptr::null()
    } else {
        val.as_ptr()
    };
    sys!(
        libc::SYS_setsockopt,
        fd,
        a[1] as i32,
        a[2] as i32,
        p,
        len as libc::socklen_t
    )
}

pub fn getsockopt(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let guest_len = read_u32(t, a[4])?;
    if (guest_len as i32) < 0 {
        return Err(Errno(libc::EINVAL));
    }
    let mut val = vec![0u8; (guest_len as usize).min(OPT_MAX)];
    let mut len = val.len() as libc::socklen_t;
    sys!(
        libc::SYS_getsockopt,
        fd,
        a[1] as i32,
        a[2] as i32,
        val.as_mut_ptr(),
        &mut len as *mut libc::socklen_t
    )?;
    let n = (len as usize).min(val.len());
    if n > 0 {
        t.write_user(a[3], &val[..n])?;
    }
    t.write_user(a[4], &len.to_le_bytes())?;
    Ok(0)
}

fn msghdr(
    name: *mut u8,
    namelen: usize,
    iov: &mut [libc::iovec],
    control: &mut [u8],
) -> libc::msghdr {
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
    m.msg_name = name as *mut _;
    m.msg_namelen = namelen as libc::socklen_t;
    m.msg_iov = iov.as_mut_ptr();
    m.msg_iovlen = iov.len();
    if !control.is_empty() {
        m.msg_control = control.as_mut_ptr() as *mut _;
        m.msg_controllen = control.len();
    }
    m
}

fn send_result(t: &mut Task, r: SysResult, flags: i32) -> SysResult {
    if flags & MSG_NOSIGNAL != 0 {
        r
    } else {
        epipe_sigpipe(t, r)
    }
}

pub fn sendto(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let mut iov = t.user_iovecs(a[1], a[2], Access::Read)?;
    iov.truncate(IOV_MAX);
    let mut addr = addr_in(t, a[4], a[5])?;
    let name = if addr.is_empty() {
        std::ptr::null_mut()
    } else {
        addr.as_mut_ptr()
    };
    let m = msghdr(name, addr.len(), &mut iov, &mut []);
    let flags = a[3] as i32;
    let r = sys!(libc::SYS_sendmsg, fd, &m as *const libc::msghdr, flags);
    send_result(t, r, flags)
}

pub fn recvfrom(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let mut iov = t.user_iovecs(a[1], a[2], Access::Write)?;
    iov.truncate(IOV_MAX);
    let mut out = AddrOut::new(t, a[4], a[5])?;
    let (name, namelen) = if out.wanted() {
        (out.buf.as_mut_ptr(), SOCKADDR_MAX)
    } else {
        (std::ptr::null_mut(), 0)
    };
    let mut m = msghdr(name, namelen, &mut iov, &mut []);
    let n = sys!(
        libc::SYS_recvmsg,
        fd,
        &mut m as *mut libc::msghdr,
        a[3] as i32
    )?;
    out.len = m.msg_namelen;
    out.copy_out(t)?;
    Ok(n)
}

/// The guest's struct msghdr.
struct GuestMsg {
    name: u64,
    namelen: u32,
    iov: u64,
    iovlen: u64,
    control: u64,
    controllen: u64,
}

fn read_msghdr(t: &mut Task, ptr: u64) -> Result<GuestMsg, Errno> {
    let b = t.read_user(ptr, 56)?;
    let q = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let m = GuestMsg {
        name: q(0),
        namelen: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
        iov: q(16),
        iovlen: q(24),
        control: q(32),
        controllen: q(40),
    };
    if m.iovlen > IOV_MAX as u64 {
        return Err(Errno(libc::EMSGSIZE));
    }
    Ok(m)
}

fn guest_iovecs(
    t: &mut Task,
    ptr: u64,
    count: u64,
    access: Access,
) -> Result<Vec<libc::iovec>, Errno> {
    let raw = if count == 0 {
        Vec::new()
    } else {
        t.read_user(ptr, count as usize * 16)?
    };
    let mut out = Vec::new();
    for c in raw.chunks(16) {
        let base = u64::from_le_bytes(c[0..8].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(c[8..16].try_into().expect("8 bytes"));
        out.extend(t.user_iovecs(base, len, access)?);
    }
    out.truncate(IOV_MAX);
    Ok(out)
}

/// Walks the control messages in `buf`, calling `f` with each SCM_RIGHTS payload.
fn for_each_rights(
    buf: &mut [u8],
    len: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<(), Errno>,
) -> Result<(), Errno> {
    let hdr = std::mem::size_of::<libc::cmsghdr>();
    let mut off = 0;
    while off + hdr <= len {
        let clen = u64::from_le_bytes(buf[off..off + 8].try_into().expect("8 bytes")) as usize;
        let level = i32::from_le_bytes(buf[off + 8..off + 12].try_into().expect("4 bytes"));
        let ty = i32::from_le_bytes(buf[off + 12..off + 16].try_into().expect("4 bytes"));
        if clen < hdr || off + clen > len {
            break;
        }
        if level == libc::SOL_SOCKET && ty == SCM_RIGHTS {
            f(&mut buf[off + hdr..off + clen])?;
        }
        off += clen.next_multiple_of(8);
    }
    Ok(())
}

pub fn sendmsg(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let gm = read_msghdr(t, a[1])?;
    let mut iov = guest_iovecs(t, gm.iov, gm.iovlen, Access::Read)?;
    let mut addr = addr_in(t, gm.name, gm.namelen as u64)?;
    if gm.controllen as usize > OPT_MAX {
        return Err(Errno(libc::ENOBUFS));
    }
    let mut control = if gm.control == 0 || gm.controllen == 0 {
        Vec::new()
    } else {
        t.read_user(gm.control, gm.controllen as usize)?
    };
    // Descriptors passed with SCM_RIGHTS are the guest's numbers; the host wants its own.
    let len = control.len();
    for_each_rights(&mut control, len, |fds| {
        for c in fds.chunks_mut(4) {
            let guest = i32::from_le_bytes(c[..4].try_into().expect("4 bytes"));
            c[..4].copy_from_slice(&t.files().host(guest)?.to_le_bytes());
        }
        Ok(())
    })?;
    let name = if addr.is_empty() {
        std::ptr::null_mut()
    } else {
        addr.as_mut_ptr()
    };
    let m = msghdr(name, addr.len(), &mut iov, &mut control);
    let flags = a[2] as i32;
    let r = sys!(libc::SYS_sendmsg, fd, &m as *const libc::msghdr, flags);
    send_result(t, r, flags)
}

pub fn recvmsg(t: &mut Task, a: [u64; 6]) -> SysResult {
    let fd = host_fd(t, a[0])?;
    let gm = read_msghdr(t, a[1])?;
    let mut iov = guest_iovecs(t, gm.iov, gm.iovlen, Access::Write)?;
    let mut name = [0u8; SOCKADDR_MAX];
    let (np, nl) = if gm.name != 0 {
        (name.as_mut_ptr(), SOCKADDR_MAX)
    } else {
        (std::ptr::null_mut(), 0)
    };
    let mut control = vec![
        0u8;
        if gm.control == 0 {
            0
        } else {
            (gm.controllen as usize).min(OPT_MAX)
        }
    ];
    let mut m = msghdr(np, nl, &mut iov, &mut control);
    let flags = a[2] as i32;
    let n = sys!(
        libc::SYS_recvmsg,
        fd,
        &mut m as *mut libc::msghdr,
        flags | libc::MSG_CMSG_CLOEXEC
    )?;
    let clen = if control.is_empty() {
        0
    } else {
        m.msg_controllen
    };
    // Received descriptors become guest descriptors.
    let cloexec = flags & libc::MSG_CMSG_CLOEXEC != 0;
    for_each_rights(&mut control, clen, |fds| {
        for c in fds.chunks_mut(4) {
            let host = i32::from_le_bytes(c[..4].try_into().expect("4 bytes"));
            let guest = install(t, host, cloexec)? as i32;
            c[..4].copy_from_slice(&guest.to_le_bytes());
        }
        Ok(())
    })?;
    if gm.name != 0 {
        let copy = (m.msg_namelen as usize).min(gm.namelen as usize);
        t.write_user(gm.name, &name[..copy])?;
    }
    if clen > 0 {
        t.write_user(gm.control, &control[..clen])?;
    }
    let mut tail = [0u8; 4];
    tail.copy_from_slice(&(if gm.name != 0 { m.msg_namelen } else { 0 }).to_le_bytes());
    t.write_user(a[1] + 8, &tail)?;
    t.write_user(a[1] + 40, &(clen as u64).to_le_bytes())?;
    t.write_user(a[1] + 48, &m.msg_flags.to_le_bytes())?;
    Ok(n)
}
