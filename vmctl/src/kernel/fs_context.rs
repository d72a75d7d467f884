//! A process's working directory and umask (Linux's fs_struct). They are the
//! guest's, never vmctl's own: vmctl's host cwd and umask stay fixed, the working
//! directory is held as a directory descriptor that relative paths are resolved
//! against, and the umask is applied by vmctl to the modes it passes on.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct FsContext {
    cwd: OwnedFd,
    pub umask: u32,
}

impl FsContext {
    /// A context at `path` (which must be a directory).
    pub fn open(path: &Path, umask: u32) -> std::io::Result<FsContext> {
        Ok(FsContext {
            cwd: open_dir(libc::AT_FDCWD, path.as_os_str().as_bytes())?,
            umask,
        })
    }

    /// vmctl's own working directory and umask when the job starts.
    pub fn inherit() -> std::io::Result<FsContext> {
        // SAFETY: umask is read by setting it; vmctl's own stays 0 from here on, since
        // it applies each guest process's umask itself.
        let umask = unsafe { libc::umask(0) };
        FsContext::open(Path::new("."), umask)
    }

    /// The directory descriptor relative paths start from.
    pub fn cwd_fd(&self) -> RawFd {
        self.cwd.as_raw_fd()
    }

    /// The working directory's path, as the kernel sees it now.
    pub fn cwd_path(&self) -> PathBuf {
        std::fs::read_link(format!("/proc/self/fd/{}", self.cwd.as_raw_fd()))
            .unwrap_or_else(|_| PathBuf::from("/"))
    }

    /// chdir: `dirfd` and `path` as for openat.
    pub fn chdir(&mut self, dirfd: RawFd, path: &[u8]) -> std::io::Result<()> {
        self.cwd = open_dir(dirfd, path)?;
        Ok(())
    }

    /// fchdir to an open directory.
    pub fn chdir_fd(&mut self, fd: RawFd) -> std::io::Result<()> {
        self.cwd = open_dir(fd, b"")?;
        Ok(())
    }

    /// The copy a child process gets (fork without CLONE_FS).
    pub fn duplicate(&self) -> std::io::Result<FsContext> {
        Ok(FsContext {
            cwd: open_dir(self.cwd.as_raw_fd(), b"")?,
            umask: self.umask,
        })
    }

    /// `mode` with the umask applied, for calls that create files.
    pub fn apply_umask(&self, mode: u64) -> u64 {
        mode & !(self.umask as u64)
    }
}

/// Opens a directory as an O_PATH descriptor (an empty path reopens `dirfd` itself).
fn open_dir(dirfd: RawFd, path: &[u8]) -> std::io::Result<OwnedFd> {
    let (path, flags) = if path.is_empty() {
        (CString::new(".").expect("no NUL"), 0)
    } else {
        (
            CString::new(path).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?,
            0,
        )
    };
    // SAFETY: openat with a valid C string; the descriptor is owned below.
    let fd = unsafe {
        libc::openat(
            dirfd,
            path.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC | flags,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
