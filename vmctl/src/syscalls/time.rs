//! Clocks and sleeping, read from the host.

use super::fs::sys;
use crate::kernel::{Errno, Kernel, SysResult};

fn valid_clock(id: i32) -> bool {
    (0..=11).contains(&id) || id < 0
}

pub fn clock_gettime(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let id = a[0] as i32;
    if !valid_clock(id) {
        return Err(Errno(libc::EINVAL));
    }
    let mut ts = [0u8; 16];
    sys!(libc::SYS_clock_gettime, id, ts.as_mut_ptr())?;
    k.write_user(a[1], &ts)?;
    Ok(0)
}

pub fn clock_getres(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let mut ts = [0u8; 16];
    sys!(libc::SYS_clock_getres, a[0] as i32, ts.as_mut_ptr())?;
    if a[1] != 0 {
        k.write_user(a[1], &ts)?;
    }
    Ok(0)
}

pub fn gettimeofday(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let mut tv = [0u8; 16];
    let mut tz = [0u8; 8];
    sys!(libc::SYS_gettimeofday, tv.as_mut_ptr(), tz.as_mut_ptr())?;
    if a[0] != 0 {
        k.write_user(a[0], &tv)?;
    }
    if a[1] != 0 {
        k.write_user(a[1], &tz)?;
    }
    Ok(0)
}

pub fn time(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let t = sys!(libc::SYS_time, 0)?;
    if a[0] != 0 {
        k.write_user(a[0], &t.to_le_bytes())?;
    }
    Ok(t)
}

pub fn nanosleep(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let req = k.read_user(a[0], 16)?;
    let mut rem = [0u8; 16];
    let r = sys!(libc::SYS_nanosleep, req.as_ptr(), rem.as_mut_ptr());
    if r.is_err() && a[1] != 0 {
        k.write_user(a[1], &rem)?;
    }
    r
}

pub fn clock_nanosleep(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let req = k.read_user(a[2], 16)?;
    let mut rem = [0u8; 16];
    // clock_nanosleep reports failure as its return value, not through errno.
    // SAFETY: both pointers are local 16-byte timespec buffers.
    let r = unsafe {
        libc::syscall(libc::SYS_clock_nanosleep, a[0] as i32, a[1] as i32, req.as_ptr(), rem.as_mut_ptr())
    };
    if r < 0 {
        let e = Errno::last();
        if e.0 == libc::EINTR && a[3] != 0 {
            k.write_user(a[3], &rem)?;
        }
        return Err(e);
    }
    Ok(0)
}

pub fn times(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let mut buf = [0u8; 32];
    let r = sys!(libc::SYS_times, buf.as_mut_ptr())?;
    if a[0] != 0 {
        k.write_user(a[0], &buf)?;
    }
    Ok(r)
}

pub fn getrusage(k: &mut Kernel, a: [u64; 6]) -> SysResult {
    let who = a[0] as i32;
    let mut buf = [0u8; 144];
    // The guest's usage is vmctl's own (RUSAGE_THREAD is the vCPU thread).
    sys!(libc::SYS_getrusage, who, buf.as_mut_ptr())?;
    k.write_user(a[1], &buf)?;
    Ok(0)
}
