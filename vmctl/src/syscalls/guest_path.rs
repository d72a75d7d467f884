//! Where a guest path really leads, before vmctl uses it on the host.
//!
//! vmctl makes the host calls itself, so a path that reaches a process directory in
//! /proc on the host would describe vmctl (its memory, its descriptors), not the
//! guest. procfs.rs virtualizes `/proc/self`, `/proc/thread-self` and `/proc/<pid>`
//! paths; this module makes sure every route to them is seen as one. It walks the path
//! as the kernel would (from the directory descriptor or the process's working
//! directory, through `..` and every symlink, `/dev/fd` included), without ever
//! looking up anything inside a /proc process directory on the host, and returns:
//!
//! - the canonical `/proc/<who>/<rest>` path when the walk lands in one (procfs.rs
//!   then serves the guest's own entries and answers ENOENT for the rest, and for any
//!   pid that is not the guest's, vmctl's own included);
//! - a host path through the host descriptor when the walk went through a guest
//!   descriptor (`/proc/self/fd/N/...`);
//! - otherwise the guest's own (directory descriptor, path), unchanged.
//!
//! Another process could swap a symlink between the walk and the host call;
//! `check_opened` therefore looks again at what an open actually returned, which
//! closes that race for the call that hands the guest a descriptor.

use super::fs::{dirfd, path};
use super::procfs;
use crate::kernel::task::Task;
use crate::kernel::Errno;
use std::ffi::CString;
use std::os::fd::RawFd;

/// Symlinks followed before giving up, as Linux's MAXSYMLINKS.
const MAX_SYMLINKS: usize = 40;

/// Resolves the guest path at `ptr` relative to guest directory descriptor `dfd`
/// (`follow`: whether a symlink in the last component is followed). Returns the
/// (host directory descriptor, path) to use, for procfs.rs and for the host call.
pub fn at(t: &mut Task, dfd: u64, ptr: u64, follow: bool) -> Result<(RawFd, CString), Errno> {
    let p = path(t, ptr)?;
    let d = dirfd(t, dfd)?;
    at_host(t, d, p, follow)
}

/// As `at`, for calls that do not ask procfs.rs about the path themselves (unlink,
/// rename, chmod...): a guest /proc entry becomes the host file standing for it, and
/// any other entry of a process directory one that does not exist.
pub fn host_at(t: &mut Task, dfd: u64, ptr: u64, follow: bool) -> Result<(RawFd, CString), Errno> {
    let (d, p) = at(t, dfd, ptr, follow)?;
    Ok(if d == libc::AT_FDCWD {
        (d, procfs::redirect(t, p))
    } else {
        (d, p)
    })
}

/// As `at`, for a path already read and a host directory descriptor.
pub fn at_host(t: &Task, d: RawFd, p: CString, follow: bool) -> Result<(RawFd, CString), Errno> {
    Ok(match walk(t, d, p.as_bytes(), follow)? {
        Some(host) => (libc::AT_FDCWD, host),
        None => (d, p),
    })
}

fn cstring(b: &[u8]) -> CString {
    // Paths come from CStrings or from the kernel, neither of which holds a NUL.
    CString::new(b).unwrap_or_default()
}

fn components(p: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    p.split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(<[u8]>::to_vec)
}

fn join(stack: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in stack {
        out.push(b'/');
        out.extend_from_slice(c);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

fn readlink(p: &[u8]) -> Result<Vec<u8>, Errno> {
    let c = cstring(p);
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: readlink writes at most buf.len() bytes into the local buffer.
    let n = unsafe { libc::readlink(c.as_ptr(), buf.as_mut_ptr() as *mut _, buf.len()) };
    if n < 0 {
        return Err(Errno::last());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// A process directory in /proc: `self`, `thread-self` or a number.
fn is_process_dir(stack: &[Vec<u8>]) -> bool {
    stack.len() >= 2
        && stack[0] == b"proc"
        && (stack[1] == b"self"
            || stack[1] == b"thread-self"
            || (!stack[1].is_empty() && stack[1].iter().all(u8::is_ascii_digit)))
}

/// The host path replacing the guest's, or None to use the guest's as it is.
fn walk(t: &Task, d: RawFd, path: &[u8], follow: bool) -> Result<Option<CString>, Errno> {
    let mut stack: Vec<Vec<u8>> = Vec::new();
    if !path.starts_with(b"/") {
        let base = readlink(format!("/proc/self/fd/{d}").as_bytes()).ok();
        match base.filter(|b| b.starts_with(b"/")) {
            Some(b) => stack.extend(components(&b)),
            // Not a directory with a path (the host call fails on it anyway).
            None => return Ok(None),
        }
    }
    let mut pending: std::collections::VecDeque<Vec<u8>> = components(path).collect();
    // A trailing "/" makes the last component a directory: it is followed.
    let dir_required = path.ends_with(b"/") || path.ends_with(b"/.");
    let follow = follow || dir_required;
    let mut links = 0;
    let mut rewritten: Option<Vec<u8>> = None;
    // Once a prefix does not exist, nothing more is looked up: the call fails on the
    // host anyway, or creates the last component.
    let mut lexical = false;
    while let Some(c) = pending.pop_front() {
        if c == b".." {
            stack.pop();
            continue;
        }
        stack.push(c);
        let last = pending.is_empty();
        if is_process_dir(&stack) {
            // Nothing inside is looked up on the host (it would be vmctl's). A guest
            // descriptor link with more after it is followed the guest's way.
            let through_fd = stack.len() == 4 && stack[2] == b"fd" && (!last || dir_required);
            if through_fd {
                let entry = cstring(&join(&stack));
                let host = procfs::redirect(t, entry.clone());
                if host == entry || !host.as_bytes().starts_with(b"/proc/self/fd/") {
                    return Err(Errno(libc::ENOENT));
                }
                let target = readlink(host.as_bytes())?;
                if !target.starts_with(b"/") {
                    // A pipe, socket or anonymous file has nothing below it.
                    return Err(Errno(libc::ENOTDIR));
                }
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(Errno(libc::ELOOP));
                }
                stack.clear();
                stack.extend(components(&target));
                let mut p = host.into_bytes();
                for r in &pending {
                    p.push(b'/');
                    p.extend_from_slice(r);
                }
                if dir_required {
                    p.push(b'/');
                }
                rewritten = Some(p);
            }
            continue;
        }
        if lexical || (last && !follow) {
            continue;
        }
        match readlink(&join(&stack)) {
            Ok(target) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(Errno(libc::ELOOP));
                }
                stack.pop();
                if target.starts_with(b"/") {
                    stack.clear();
                }
                for t in components(&target).collect::<Vec<_>>().into_iter().rev() {
                    pending.push_front(t);
                }
            }
            Err(Errno(libc::EINVAL)) => {}
            Err(_) => lexical = true,
        }
    }
    if is_process_dir(&stack) {
        return Ok(Some(cstring(&join(&stack))));
    }
    Ok(rewritten.map(|p| cstring(&p)))
}

/// Checks what a host open of a path procfs.rs did not claim really returned: a
/// descriptor inside vmctl's own /proc directory (a symlink swapped after the walk)
/// is closed and refused.
pub fn check_opened(fd: RawFd) -> Result<RawFd, Errno> {
    const PROC_SUPER_MAGIC: i64 = 0x9fa0;
    // SAFETY: fstatfs fills the local struct for a descriptor we own.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    let on_proc =
        unsafe { libc::fstatfs(fd, &mut sfs) } == 0 && sfs.f_type as i64 == PROC_SUPER_MAGIC;
    if !on_proc {
        return Ok(fd);
    }
    let me = std::process::id().to_string();
    let vmctls = |name: &[u8]| {
        std::str::from_utf8(name).is_ok_and(|n| {
            n == me
                || (n.bytes().all(|b| b.is_ascii_digit())
                    && std::path::Path::new(&format!("/proc/self/task/{n}")).exists())
        })
    };
    let refused = match readlink(format!("/proc/self/fd/{fd}").as_bytes()) {
        Ok(target) => {
            let parts: Vec<Vec<u8>> = components(&target).collect();
            // Anything below one of vmctl's process directories, wherever procfs is
            // mounted (the directory itself is harmless: paths below it are walked).
            (1..parts.len().saturating_sub(1)).any(|i| vmctls(&parts[i]))
        }
        Err(_) => true,
    };
    if refused {
        // SAFETY: closing the descriptor the open returned, which nobody else holds.
        unsafe { libc::close(fd) };
        return Err(Errno(libc::ENOENT));
    }
    Ok(fd)
}
