//! The guest's file descriptor table. Guest descriptor numbers are the guest's own;
//! each maps to a host descriptor that vmctl holds, so the guest never sees (or
//! closes) vmctl's KVM and control descriptors, and the table can be serialized.

use crate::kernel::Errno;
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

/// An open file description, shared by descriptors made with dup.
#[derive(Debug)]
pub struct OpenFile {
    pub host: OwnedFd,
    /// The path it was opened by, for /proc/self/fd and checkpoints.
    pub path: Option<PathBuf>,
    /// Which of vmctl's standard streams this is, if any (rebound on restore).
    pub stdio: Option<i32>,
}

impl OpenFile {
    pub fn raw(&self) -> RawFd {
        self.host.as_raw_fd()
    }
}

#[derive(Debug, Clone)]
pub struct FdEntry {
    pub file: Arc<OpenFile>,
    pub cloexec: bool,
}

#[derive(Debug, Default, Clone)]
pub struct FdTable {
    map: BTreeMap<i32, FdEntry>,
}

impl FdTable {
    pub fn get(&self, fd: i32) -> Result<&FdEntry, Errno> {
        self.map.get(&fd).ok_or(Errno(libc::EBADF))
    }

    pub fn get_mut(&mut self, fd: i32) -> Result<&mut FdEntry, Errno> {
        self.map.get_mut(&fd).ok_or(Errno(libc::EBADF))
    }

    pub fn host(&self, fd: i32) -> Result<RawFd, Errno> {
        Ok(self.get(fd)?.file.raw())
    }

    pub fn lowest_free(&self, min: i32) -> i32 {
        let mut want = min;
        for &k in self.map.range(min..).map(|(k, _)| k) {
            if k != want {
                break;
            }
            want += 1;
        }
        want
    }

    pub fn install(
        &mut self,
        file: Arc<OpenFile>,
        cloexec: bool,
        min: i32,
        limit: u64,
    ) -> Result<i32, Errno> {
        let fd = self.lowest_free(min);
        if fd as u64 >= limit {
            return Err(Errno(libc::EMFILE));
        }
        self.map.insert(fd, FdEntry { file, cloexec });
        Ok(fd)
    }

    /// Puts `entry` at `fd`, returning what was there (closed when dropped).
    pub fn install_at(&mut self, fd: i32, entry: FdEntry) -> Option<FdEntry> {
        self.map.insert(fd, entry)
    }

    pub fn remove(&mut self, fd: i32) -> Result<FdEntry, Errno> {
        self.map.remove(&fd).ok_or(Errno(libc::EBADF))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&i32, &FdEntry)> {
        self.map.iter()
    }

    pub fn fds(&self) -> Vec<i32> {
        self.map.keys().copied().collect()
    }
}
