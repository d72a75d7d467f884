//! Vectored file I/O straight to and from guest memory, carried on across short
//! transfers and EINTR. Used wherever vmctl moves guest pages: file-backed faults,
//! checkpoint images, restores.

use std::io;
use std::os::fd::RawFd;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// File to memory (preadv).
    Read,
    /// Memory to file (pwritev).
    Write,
}

/// Moves all of `iov` at file `offset`. Returns the bytes moved, fewer than asked
/// only when a read reaches the end of the file.
pub fn transfer_all(
    fd: RawFd,
    iov: &[libc::iovec],
    offset: u64,
    dir: Direction,
) -> io::Result<usize> {
    let mut iov = iov.to_vec();
    let mut start = 0;
    let mut done = 0usize;
    while start < iov.len() {
        let n = (iov.len() - start).min(1024) as i32;
        let at = (offset + done as u64) as i64;
        // SAFETY: the caller's iovecs point at live memory of the stated lengths (guest
        // RAM, bounds-checked when they were built).
        let r = unsafe {
            match dir {
                Direction::Read => libc::preadv(fd, iov[start..].as_ptr(), n, at),
                Direction::Write => libc::pwritev(fd, iov[start..].as_ptr(), n, at),
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            if dir == Direction::Write {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
            }
            break;
        }
        done += r as usize;
        let mut left = r as usize;
        while left > 0 {
            let v = &mut iov[start];
            if left >= v.iov_len {
                left -= v.iov_len;
                start += 1;
            } else {
                v.iov_base = (v.iov_base as usize + left) as *mut _;
                v.iov_len -= left;
                left = 0;
            }
        }
    }
    Ok(done)
}
