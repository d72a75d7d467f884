//! The parts of /proc that describe the job's processes rather than vmctl:
//! `/proc/self`, `/proc/thread-self` and `/proc/<pid>` for the guest's own pids (the
//! executable, memory map, descriptors, command line, name and status). A numeric
//! /proc entry that is not one of the guest's pids does not exist for the guest, so
//! vmctl's own process (and the host's) cannot be reached through /proc.

use super::fs::{host, sys};
use crate::kernel::task::Task;
use crate::kernel::thread_group::{Life, ThreadGroup};
use crate::kernel::Errno;
use std::ffi::{CStr, CString};
use std::os::fd::RawFd;
use std::sync::Arc;

enum Entry {
    Exe,
    Maps,
    Comm,
    Cmdline,
    Stat,
    Status,
    Fd(i32),
    FdDir,
    /// Host files about the machine rather than the process (mounts, cgroup...).
    Passthrough,
    /// Anything else under a guest process's directory, or a pid the guest lacks.
    Missing,
}

struct Target {
    tg: Arc<ThreadGroup>,
    /// The calling process itself (its descriptors are the caller's own).
    own: bool,
}

fn classify(t: &Task, path: &CStr) -> Option<(Target, Entry)> {
    let p = path.to_bytes();
    let rest = p.strip_prefix(b"/proc/")?;
    let (who, rest) = match rest.iter().position(|&b| b == b'/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &b""[..]),
    };
    let target = match who {
        b"self" | b"thread-self" => Target {
            tg: t.tg().clone(),
            own: true,
        },
        n if !n.is_empty() && n.iter().all(u8::is_ascii_digit) => {
            let pid: i32 = std::str::from_utf8(n).ok()?.parse().ok()?;
            let pids = t.k.pids.lock().expect("pids poisoned");
            let tg = pids
                .group(pid)
                .cloned()
                .or_else(|| pids.task(pid).map(|h| h.tg.clone()));
            match tg {
                Some(tg) => Target {
                    own: tg.tgid == t.tgid(),
                    tg,
                },
                None => {
                    return Some((
                        Target {
                            tg: t.tg().clone(),
                            own: true,
                        },
                        Entry::Missing,
                    ))
                }
            }
        }
        _ => return None,
    };
    let rest = rest.strip_suffix(b"/").unwrap_or(rest);
    let entry = match rest {
        b"" => return None,
        b"exe" => Entry::Exe,
        b"maps" => Entry::Maps,
        b"comm" => Entry::Comm,
        b"cmdline" => Entry::Cmdline,
        b"stat" => Entry::Stat,
        b"status" => Entry::Status,
        b"fd" => Entry::FdDir,
        b"mounts" | b"mountinfo" | b"mountstats" | b"cgroup" | b"limits" | b"net" => {
            Entry::Passthrough
        }
        // The network namespace is the host's (the job uses the host's network).
        r if r.starts_with(b"net/") => Entry::Passthrough,
        _ => match rest.strip_prefix(b"fd/") {
            Some(n) => match std::str::from_utf8(n).ok().and_then(|n| n.parse().ok()) {
                Some(fd) => Entry::Fd(fd),
                None => Entry::Missing,
            },
            None => Entry::Missing,
        },
    };
    Some((target, entry))
}

fn host_fd_path(t: &Task, target: &Target, fd: i32) -> Result<CString, Errno> {
    let h = if target.own {
        t.files().host(fd)
    } else {
        let res = target.tg.resources().ok_or(Errno(libc::ENOENT))?;
        let files = res.files.lock().expect("fd table poisoned");
        files.host(fd)
    }
    .map_err(|_| Errno(libc::ENOENT))?;
    Ok(CString::new(format!("/proc/self/fd/{h}")).expect("no NUL"))
}

fn exe_of(target: &Target) -> CString {
    let exe = target.tg.lock().exe.clone();
    CString::new(exe.as_os_str().as_encoded_bytes()).unwrap_or_default()
}

fn comm_of(target: &Target) -> Vec<u8> {
    let st = target.tg.lock();
    let name = st
        .threads
        .first()
        .map(|h| *h.comm.lock().expect("comm poisoned"))
        .unwrap_or_default();
    let len = name.iter().position(|&b| b == 0).unwrap_or(16);
    name[..len].to_vec()
}

fn maps_of(t: &Task, target: &Target) -> String {
    if target.own {
        return t.mm().proc_maps();
    }
    match target.tg.resources() {
        Some(r) => r.mm.lock().expect("address space poisoned").proc_maps(),
        None => String::new(),
    }
}

/// /proc/<pid>/stat: the fields programs read (pid, comm, state, ppid, pgrp,
/// session, threads); the rest are zero.
fn stat_of(target: &Target) -> Vec<u8> {
    let comm = String::from_utf8_lossy(&comm_of(target)).into_owned();
    let st = target.tg.lock();
    let state = match st.life {
        Life::Zombie(_) => 'Z',
        _ => 'R',
    };
    let threads = st.threads.len().max(1);
    let mut fields = vec![0u64; 52 - 7];
    fields[13] = 20; // priority
    fields[15] = threads as u64;
    let rest: Vec<String> = fields.iter().map(|v| v.to_string()).collect();
    format!(
        "{} ({}) {} {} {} {} 0 -1 {}\n",
        target.tg.tgid,
        comm,
        state,
        st.ppid,
        st.pgid,
        st.sid,
        rest.join(" ")
    )
    .into_bytes()
}

fn status_of(t: &Task, target: &Target) -> Vec<u8> {
    let comm = String::from_utf8_lossy(&comm_of(target)).into_owned();
    let st = target.tg.lock();
    let state = match st.life {
        Life::Zombie(_) => "Z (zombie)",
        _ => "R (running)",
    };
    let uid = t.k.host.uid;
    let gid = t.k.host.gid;
    format!(
        "Name:\t{comm}\nUmask:\t0022\nState:\t{state}\nTgid:\t{pid}\nNgid:\t0\nPid:\t{pid}\nPPid:\t{ppid}\nTracerPid:\t0\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{gid}\t{gid}\t{gid}\t{gid}\nThreads:\t{threads}\n",
        pid = target.tg.tgid,
        ppid = st.ppid,
        threads = st.threads.len().max(1),
    )
    .into_bytes()
}

/// Opens a guest-specific /proc file, or None for an ordinary path.
pub fn open(t: &mut Task, path: &CStr, flags: i32) -> Result<Option<RawFd>, Errno> {
    let Some((target, entry)) = classify(t, path) else {
        return Ok(None);
    };
    let fd = match entry {
        Entry::Missing => return Err(Errno(libc::ENOENT)),
        Entry::FdDir | Entry::Passthrough => {
            // vmctl's own directory: getdents on it lists the guest's descriptors.
            let name = path.to_bytes();
            let tail = &name[name
                .iter()
                .skip(6)
                .position(|&b| b == b'/')
                .map_or(name.len(), |i| i + 6)..];
            let host = CString::new([b"/proc/self".as_slice(), tail].concat()).expect("no NUL");
            sys!(
                libc::SYS_openat,
                libc::AT_FDCWD,
                host.as_ptr(),
                flags | libc::O_CLOEXEC,
                0
            )?
        }
        Entry::Exe => {
            let exe = exe_of(&target);
            sys!(
                libc::SYS_openat,
                libc::AT_FDCWD,
                exe.as_ptr(),
                flags | libc::O_CLOEXEC,
                0
            )?
        }
        Entry::Fd(n) => {
            let p = host_fd_path(t, &target, n)?;
            sys!(
                libc::SYS_openat,
                libc::AT_FDCWD,
                p.as_ptr(),
                flags | libc::O_CLOEXEC,
                0
            )?
        }
        Entry::Maps => snapshot_file(c"maps", maps_of(t, &target).as_bytes())?,
        Entry::Cmdline => {
            let cmdline = target.tg.lock().cmdline.clone();
            snapshot_file(c"cmdline", &cmdline)?
        }
        Entry::Comm => {
            // The name prctl(PR_SET_NAME) sets, which starts as the executable's.
            let mut text = comm_of(&target);
            text.push(b'\n');
            snapshot_file(c"comm", &text)?
        }
        Entry::Stat => snapshot_file(c"stat", &stat_of(&target))?,
        Entry::Status => snapshot_file(c"status", &status_of(t, &target))?,
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

pub fn stat(t: &mut Task, path: &CStr, st: &mut [u8; 144]) -> Result<Option<i64>, Errno> {
    match classify(t, path).map(|(_, e)| e) {
        Some(Entry::Missing) => Err(Errno(libc::ENOENT)),
        Some(Entry::Exe) | Some(Entry::Fd(_)) => {
            let p = redirect(t, path.to_owned());
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
pub fn redirect(t: &Task, path: CString) -> CString {
    match classify(t, &path) {
        Some((target, Entry::Exe)) => exe_of(&target),
        // A descriptor the process does not have is nobody's, never vmctl's own.
        Some((target, Entry::Fd(n))) => host_fd_path(t, &target, n)
            .unwrap_or_else(|_| CString::new("/proc/vmwrap-no-such-entry").expect("no NUL")),
        Some((_, Entry::Missing)) => CString::new("/proc/vmwrap-no-such-entry").expect("no NUL"),
        _ => path,
    }
}

pub fn readlink(t: &mut Task, path: &CStr) -> Result<Option<Vec<u8>>, Errno> {
    if path.to_bytes() == b"/proc/self" || path.to_bytes() == b"/proc/thread-self" {
        let link = if path.to_bytes() == b"/proc/self" {
            t.tgid().to_string()
        } else {
            format!("{}/task/{}", t.tgid(), t.tid())
        };
        return Ok(Some(link.into_bytes()));
    }
    match classify(t, path) {
        Some((_, Entry::Missing)) => Err(Errno(libc::ENOENT)),
        Some((target, Entry::Exe)) => Ok(Some(exe_of(&target).into_bytes())),
        Some((target, Entry::Fd(n))) => {
            let p = host_fd_path(t, &target, n)?;
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
pub fn fd_dir_getdents(t: &mut Task, host_fd: RawFd, size: usize) -> Result<Vec<u8>, Errno> {
    let mut names: Vec<(Vec<u8>, u8)> = vec![
        (b".".to_vec(), libc::DT_DIR),
        (b"..".to_vec(), libc::DT_DIR),
    ];
    names.extend(
        t.files()
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
