//! The parts of /proc/self that must describe the guest rather than vmctl: the
//! executable, the memory map and the descriptors. Everything else under /proc is
//! the host's.

use super::fs::{host, sys};
use crate::kernel::{Errno, Kernel};
use std::ffi::{CStr, CString};
use std::os::fd::RawFd;

enum Entry {
    Exe,
    Maps,
    Comm,
    Cmdline,
    Fd(i32),
    FdDir,
}

fn classify(k: &Kernel, path: &CStr) -> Option<Entry> {
    let p = path.to_bytes();
    let rest = p
        .strip_prefix(b"/proc/self/")
        .or_else(|| p.strip_prefix(b"/proc/thread-self/"))
        .or_else(|| {
            let pid = format!("/proc/{}/", k.proc.pid);
            p.strip_prefix(pid.as_bytes())
        })?;
    match rest {
        b"exe" => Some(Entry::Exe),
        b"maps" => Some(Entry::Maps),
        b"comm" => Some(Entry::Comm),
        b"cmdline" => Some(Entry::Cmdline),
        b"fd" | b"fd/" => Some(Entry::FdDir),
        _ => {
            let n = rest.strip_prefix(b"fd/")?;
            std::str::from_utf8(n).ok()?.parse().ok().map(Entry::Fd)
        }
    }
}

fn host_fd_path(k: &Kernel, fd: i32) -> Result<CString, Errno> {
    let h = k.proc.files.host(fd).map_err(|_| Errno(libc::ENOENT))?;
    Ok(CString::new(format!("/proc/self/fd/{h}")).expect("no NUL"))
}

/// Opens a guest-specific /proc file, or None for an ordinary path.
pub fn open(k: &mut Kernel, path: &CStr, flags: i32) -> Result<Option<RawFd>, Errno> {
    let fd = match classify(k, path) {
        None | Some(Entry::FdDir) => return Ok(None),
        Some(Entry::Exe) => {
            let exe = CString::new(k.proc.exe.as_os_str().as_encoded_bytes()).expect("path");
            sys!(
                libc::SYS_openat,
                libc::AT_FDCWD,
                exe.as_ptr(),
                flags | libc::O_CLOEXEC,
                0
            )?
        }
        Some(Entry::Fd(n)) => {
            let p = host_fd_path(k, n)?;
            sys!(
                libc::SYS_openat,
                libc::AT_FDCWD,
                p.as_ptr(),
                flags | libc::O_CLOEXEC,
                0
            )?
        }
        Some(Entry::Maps) => snapshot_file(c"maps", k.proc.mm.proc_maps().as_bytes())?,
        Some(Entry::Cmdline) => snapshot_file(c"cmdline", &k.proc.cmdline.clone())?,
        Some(Entry::Comm) => {
            // The name prctl(PR_SET_NAME) sets, which starts as the executable's.
            let len = k.proc.name.iter().position(|&b| b == 0).unwrap_or(16);
            let mut text = k.proc.name[..len].to_vec();
            text.push(b'\n');
            snapshot_file(c"comm", &text)?
        }
    };
    Ok(Some(fd as RawFd))
}

/// A read-only snapshot of generated /proc content, as a memfd.
fn snapshot_file(name: &CStr, text: &[u8]) -> Result<i64, Errno> {
    let fd = sys!(libc::SYS_memfd_create, name.as_ptr(), libc::MFD_CLOEXEC)?;
    // SAFETY: writing a local buffer to the memfd just created.
    host(unsafe { libc::write(fd as i32, text.as_ptr() as *const _, text.len()) } as i64)?;
    // SAFETY: rewinding our own descriptor.
    unsafe { libc::lseek(fd as i32, 0, libc::SEEK_SET) };
    Ok(fd)
}

pub fn stat(k: &mut Kernel, path: &CStr, st: &mut [u8; 144]) -> Result<Option<i64>, Errno> {
    match classify(k, path) {
        Some(Entry::Exe) | Some(Entry::Fd(_)) => {
            let p = redirect(k, path.to_owned());
            sys!(
                libc::SYS_newfstatat,
                libc::AT_FDCWD,
                p.as_ptr(),
                st.as_mut_ptr(),
                0
            )?;
            Ok(Some(0))
        }
        _ => Ok(None),
    }
}

/// The host path to use for `path` in calls that only look at it.
pub fn redirect(k: &Kernel, path: CString) -> CString {
    match classify(k, &path) {
        Some(Entry::Exe) => CString::new(k.proc.exe.as_os_str().as_encoded_bytes()).expect("path"),
        Some(Entry::Fd(n)) => host_fd_path(k, n).unwrap_or(path),
        _ => path,
    }
}

pub fn readlink(k: &mut Kernel, path: &CStr) -> Result<Option<Vec<u8>>, Errno> {
    match classify(k, path) {
        Some(Entry::Exe) => Ok(Some(k.proc.exe.as_os_str().as_encoded_bytes().to_vec())),
        Some(Entry::Fd(n)) => {
            let p = host_fd_path(k, n)?;
            let mut out = vec![0u8; libc::PATH_MAX as usize];
            let len = sys!(
                libc::SYS_readlinkat,
                libc::AT_FDCWD,
                p.as_ptr(),
                out.as_mut_ptr(),
                out.len()
            )?;
            out.truncate(len as usize);
            Ok(Some(out))
        }
        _ => Ok(None),
    }
}

/// Whether host descriptor `host` is vmctl's own /proc/self/fd, which the guest gets
/// for its /proc/self/fd: listing it must show the guest's descriptors instead.
pub fn is_fd_dir(host: RawFd) -> bool {
    let link = CString::new(format!("/proc/self/fd/{host}")).expect("no NUL");
    let mut buf = [0u8; 64];
    // SAFETY: readlink into a local buffer of the given size.
    let n = unsafe { libc::readlink(link.as_ptr(), buf.as_mut_ptr() as *mut _, buf.len()) };
    // SAFETY: getpid cannot fail.
    let own = format!("/proc/{}/fd", unsafe { libc::getpid() });
    n > 0 && &buf[..n as usize] == own.as_bytes()
}

/// getdents64 over the guest's descriptors. The directory offset is the host
/// descriptor's file position, used as an entry index, so rewinddir and seekdir work.
pub fn fd_dir_getdents(k: &mut Kernel, host_fd: RawFd, size: usize) -> Result<Vec<u8>, Errno> {
    let mut names: Vec<(Vec<u8>, u8)> = vec![
        (b".".to_vec(), libc::DT_DIR),
        (b"..".to_vec(), libc::DT_DIR),
    ];
    names.extend(
        k.proc
            .files
            .fds()
            .into_iter()
            .map(|fd| (fd.to_string().into_bytes(), libc::DT_LNK)),
    );
    let start = sys!(libc::SYS_lseek, host_fd, 0, libc::SEEK_CUR)? as usize;
    let mut out = Vec::new();
    let mut next = start;
    for (i, (name, ty)) in names.iter().enumerate().skip(start) {
        let reclen = (19 + name.len() + 1).next_multiple_of(8);
        if out.len() + reclen > size {
            break;
        }
        let mut rec = vec![0u8; reclen];
        rec[0..8].copy_from_slice(&(0x1000 + i as u64).to_le_bytes());
        rec[8..16].copy_from_slice(&(i as i64 + 1).to_le_bytes());
        rec[16..18].copy_from_slice(&(reclen as u16).to_le_bytes());
        rec[18] = *ty;
        rec[19..19 + name.len()].copy_from_slice(name);
        out.extend_from_slice(&rec);
        next = i + 1;
    }
    if out.is_empty() && next < names.len() {
        return Err(Errno(libc::EINVAL));
    }
    sys!(libc::SYS_lseek, host_fd, next as i64, libc::SEEK_SET)?;
    Ok(out)
}
