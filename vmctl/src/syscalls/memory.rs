//! mmap and friends, on the guest's address space.

use super::fs::sys;
use crate::kernel::mm::{Access, Backing, MappedFile, VmaKind};
use crate::kernel::task::Task;
use crate::kernel::{Errno, SysResult};
use crate::machine::layout::PAGE_SIZE;
use crate::machine::memory::HUGE_PAGE;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

const MAP_SHARED_VALIDATE: u64 = 3;
const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
const MAP_TYPE: u64 = 0xf;
const PROT_MASK: u64 = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
const TASK_SIZE: u64 = crate::kernel::mm::address_space::TASK_SIZE;

/// The end of a guest range `[addr, addr+len)` if it lies inside user space.
fn user_end(addr: u64, len: u64) -> Option<u64> {
    addr.checked_add(len).filter(|&e| e <= TASK_SIZE)
}

fn page_aligned(x: u64) -> bool {
    x & (PAGE_SIZE - 1) == 0
}

fn file_backing(
    t: &mut Task,
    fd: u64,
    offset: u64,
    len: u64,
    shared: bool,
    prot: u64,
) -> Result<Option<Backing>, Errno> {
    let host = t.files().host(fd as i32)?;
    let mut st = [0u8; 144];
    sys!(libc::SYS_fstat, host, st.as_mut_ptr())?;
    // SAFETY: the kernel's struct stat has the same layout as libc::stat on x86-64.
    let st: libc::stat = unsafe { std::ptr::read_unaligned(st.as_ptr() as *const libc::stat) };
    let fmt = st.st_mode & libc::S_IFMT;
    if fmt == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 5) {
        return Ok(None); // /dev/zero: anonymous memory
    }
    if fmt != libc::S_IFREG && fmt != libc::S_IFBLK {
        return Err(Errno(libc::ENODEV));
    }
    // SAFETY: querying flags of a descriptor we hold.
    let fl = unsafe { libc::fcntl(host, libc::F_GETFL) };
    let mode = fl & libc::O_ACCMODE;
    if mode == libc::O_WRONLY
        || (shared && prot & libc::PROT_WRITE as u64 != 0 && mode != libc::O_RDWR)
    {
        return Err(Errno(libc::EACCES));
    }
    let dup = sys!(libc::SYS_fcntl, host, libc::F_DUPFD_CLOEXEC, 0)?;
    let mut link = vec![0u8; 4096];
    let p = std::ffi::CString::new(format!("/proc/self/fd/{host}")).expect("no NUL");
    // SAFETY: readlink into a local buffer of the given size.
    let n = unsafe { libc::readlink(p.as_ptr(), link.as_mut_ptr() as *mut _, link.len()) };
    link.truncate(n.max(0) as usize);
    let region = if shared {
        let writable = mode == libc::O_RDWR;
        if writable {
            t.k.files_journal.before_shared_writable_map(host);
        }
        let r =
            t.k.shared
                .lock()
                .expect("shared poisoned")
                .create(&t.k.vm, host, offset, len, writable)
                .map_err(Errno)?;
        Some(r)
    } else {
        None
    };
    Ok(Some(Backing::File {
        region,
        file: Arc::new(
            MappedFile::new(
                std::path::PathBuf::from(std::ffi::OsStr::from_bytes(&link)),
                // SAFETY: `dup` is a fresh descriptor owned by nothing else.
                unsafe { File::from_raw_fd(dup as i32) },
            )
            .map_err(|_| Errno(libc::EIO))?,
        ),
        offset,
    }))
}

pub fn mmap(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (addr, len, prot, flags, fd, off) = (a[0], a[1], a[2], a[3], a[4], a[5]);
    if len == 0 || !page_aligned(off) || prot & !PROT_MASK & !0x0300_0000 != 0 {
        return Err(Errno(libc::EINVAL));
    }
    let len = len
        .checked_next_multiple_of(PAGE_SIZE)
        .ok_or(Errno(libc::ENOMEM))?;
    if len > TASK_SIZE {
        return Err(Errno(libc::ENOMEM));
    }
    let shared = match flags & MAP_TYPE {
        x if x == libc::MAP_SHARED as u64 || x == MAP_SHARED_VALIDATE => true,
        x if x == libc::MAP_PRIVATE as u64 => false,
        _ => return Err(Errno(libc::EINVAL)),
    };
    let prot = prot & PROT_MASK;
    let anonymous = flags & libc::MAP_ANONYMOUS as u64 != 0;
    let backing = if anonymous {
        Backing::Anonymous
    } else {
        file_backing(t, fd, off, len, shared, prot)?.unwrap_or(Backing::Anonymous)
    };
    let fixed = flags & libc::MAP_FIXED as u64 != 0;
    let noreplace = flags & MAP_FIXED_NOREPLACE != 0;
    let start = if fixed || noreplace {
        if !page_aligned(addr) || addr.checked_add(len).is_none_or(|e| e > TASK_SIZE) {
            return Err(Errno(if fixed { libc::EINVAL } else { libc::ENOMEM }));
        }
        if noreplace && !fixed && t.mm().overlaps(addr, addr + len) {
            return Err(Errno(libc::EEXIST));
        }
        addr
    } else {
        let hint = if flags & libc::MAP_32BIT as u64 != 0 && addr == 0 {
            0x4000_0000
        } else {
            addr & !(PAGE_SIZE - 1)
        };
        t.mm().find_free(hint, len).ok_or(Errno(libc::ENOMEM))?
    };
    let mapped = t.with_mm(|mm, ctx| {
        mm.map(
            ctx,
            start,
            len,
            prot as i32,
            shared,
            backing,
            VmaKind::Mapping,
        )
    });
    collect_regions(t)?;
    let start = mapped?;
    if flags & libc::MAP_POPULATE as u64 != 0 && prot != 0 {
        let mut va = start;
        while va < start + len {
            let _ = t.with_mm(|mm, ctx| mm.translate_for(ctx, va, Access::Read));
            va = (va & !(HUGE_PAGE - 1)) + HUGE_PAGE;
        }
    }
    Ok(start as i64)
}

pub fn munmap(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (addr, len) = (a[0], a[1]);
    if !page_aligned(addr) || len == 0 || addr.checked_add(len).is_none_or(|e| e > TASK_SIZE) {
        return Err(Errno(libc::EINVAL));
    }
    let len = len.next_multiple_of(PAGE_SIZE);
    t.with_mm(|mm, ctx| mm.unmap(ctx, addr, len))?;
    collect_regions(t)?;
    Ok(0)
}

/// Drops the memslots of shared mappings that are gone.
fn collect_regions(t: &mut Task) -> Result<(), Errno> {
    t.k.shared
        .lock()
        .expect("shared poisoned")
        .collect(&t.k.vm)
        .map_err(|e| {
            eprintln!("vmctl: {e}");
            Errno(libc::ENOMEM)
        })
}

pub fn mprotect(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (addr, len, prot) = (a[0], a[1], a[2]);
    if !page_aligned(addr) || prot & !PROT_MASK & !0x0300_0000 != 0 {
        return Err(Errno(libc::EINVAL));
    }
    if len == 0 {
        return Ok(0);
    }
    let len = len
        .checked_next_multiple_of(PAGE_SIZE)
        .ok_or(Errno(libc::ENOMEM))?;
    user_end(addr, len).ok_or(Errno(libc::ENOMEM))?;
    if prot & libc::PROT_WRITE as u64 != 0 {
        let mut va = addr;
        while va < addr + len {
            match t.mm().find(va) {
                Some(v) => {
                    // The vDSO's frames are shared by every address space.
                    if v.region().is_some_and(|r| !r.writable)
                        || matches!(v.backing, Backing::Kernel { .. })
                    {
                        return Err(Errno(libc::EACCES));
                    }
                    va = v.end;
                }
                None => break,
            }
        }
    }
    t.with_mm(|mm, ctx| mm.protect(ctx, addr, len, (prot & PROT_MASK) as i32))?;
    Ok(0)
}

pub fn brk(t: &mut Task, a: [u64; 6]) -> SysResult {
    Ok(t.with_mm(|mm, ctx| mm.set_brk(ctx, a[0])) as i64)
}

pub fn madvise(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (addr, len, advice) = (a[0], a[1], a[2] as i32);
    if !page_aligned(addr) {
        return Err(Errno(libc::EINVAL));
    }
    let len = len
        .checked_next_multiple_of(PAGE_SIZE)
        .ok_or(Errno(libc::EINVAL))?;
    if user_end(addr, len).is_none() {
        return Err(Errno(libc::EINVAL));
    }
    if len == 0 {
        return Ok(0);
    }
    match advice {
        libc::MADV_DONTNEED | libc::MADV_REMOVE => {
            t.with_mm(|mm, ctx| mm.discard(ctx, addr, len))?;
            Ok(0)
        }
        _ => Ok(0),
    }
}

pub fn msync(t: &mut Task, a: [u64; 6]) -> SysResult {
    if !page_aligned(a[0]) {
        return Err(Errno(libc::EINVAL));
    }
    let (start, end) = (a[0], a[0].saturating_add(a[1]));
    let mut va = start;
    while va < end {
        let Some(v) = t.mm().find(va).cloned() else {
            return Err(Errno(libc::ENOMEM));
        };
        if let Some(r) = v.region() {
            r.msync();
        }
        va = v.end;
    }
    Ok(0)
}

pub fn mincore(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (addr, len, vec) = (a[0], a[1], a[2]);
    if !page_aligned(addr) {
        return Err(Errno(libc::EINVAL));
    }
    let end = len
        .checked_next_multiple_of(PAGE_SIZE)
        .and_then(|l| user_end(addr, l))
        .ok_or(Errno(libc::ENOMEM))?;
    // The whole range must be mapped before anything is written, as on Linux.
    let mut va = addr;
    while va < end {
        va = t.mm().find(va).ok_or(Errno(libc::ENOMEM))?.end;
    }
    // One byte per page, written out in bounded pieces whatever the range's size.
    const PIECE: u64 = 64 * 1024;
    let mut va = addr;
    while va < end {
        let pages = ((end - va) / PAGE_SIZE).min(PIECE);
        let out: Vec<u8> = (0..pages)
            .map(|i| {
                let p = va + i * PAGE_SIZE;
                u8::from(
                    crate::kernel::mm::page_table::translate(&t.k.mem, t.mm().root, p).is_some(),
                )
            })
            .collect();
        t.write_user(vec + (va - addr) / PAGE_SIZE, &out)?;
        va += pages * PAGE_SIZE;
    }
    Ok(0)
}

pub fn mremap(t: &mut Task, a: [u64; 6]) -> SysResult {
    let (old, old_len, new_len, flags, new_addr) = (a[0], a[1], a[2], a[3], a[4]);
    const MAYMOVE: u64 = 1;
    const FIXED: u64 = 2;
    if !page_aligned(old)
        || new_len == 0
        || flags & !7 != 0
        || (flags & FIXED != 0 && flags & MAYMOVE == 0)
    {
        return Err(Errno(libc::EINVAL));
    }
    let (Some(old_len), Some(new_len)) = (
        old_len.checked_next_multiple_of(PAGE_SIZE),
        new_len.checked_next_multiple_of(PAGE_SIZE),
    ) else {
        return Err(Errno(libc::EINVAL));
    };
    if user_end(old, old_len).is_none() || new_len > TASK_SIZE {
        return Err(Errno(libc::EINVAL));
    }
    if flags & FIXED != 0 && (!page_aligned(new_addr) || user_end(new_addr, new_len).is_none()) {
        return Err(Errno(libc::EINVAL));
    }
    let vma = t.mm().find(old).cloned().ok_or(Errno(libc::EFAULT))?;
    if old_len == 0 || old + old_len > vma.end {
        return Err(Errno(libc::EFAULT));
    }
    // The backing of the remapped range, as if it started at `old`.
    let mut backing = vma.backing.clone();
    match &mut backing {
        Backing::File { offset, .. } => *offset += old - vma.start,
        // The vDSO may move (as on Linux) but not grow past its frames.
        Backing::Kernel { .. } if new_len > old_len => return Err(Errno(libc::EFAULT)),
        Backing::Kernel { gpa } => *gpa += old - vma.start,
        Backing::Anonymous => {}
    }
    if let (Some(r), Backing::File { file, offset, .. }) = (vma.region(), &backing) {
        // A shared mapping's memslot covers only the file range first mapped; a
        // larger one needs a memslot of its own. The file is the truth, so the old
        // and new memslots show the same bytes.
        if *offset + new_len > r.file_offset + r.len {
            let fd = file.file.as_ref().ok_or(Errno(libc::ENOMEM))?.as_raw_fd();
            let region =
                t.k.shared
                    .lock()
                    .expect("shared poisoned")
                    .create(&t.k.vm, fd, *offset, new_len, r.writable)
                    .map_err(Errno)?;
            backing = Backing::File {
                region: Some(region),
                file: file.clone(),
                offset: *offset,
            };
        }
    }
    if flags & FIXED == 0 {
        if new_len <= old_len {
            if new_len < old_len {
                t.with_mm(|mm, ctx| mm.unmap(ctx, old + new_len, old_len - new_len))?;
            }
            return Ok(old as i64);
        }
        // Grow in place when the range after it is free.
        let tail = old + old_len;
        let grow = new_len - old_len;
        let free = old + old_len == vma.end
            && user_end(tail, grow).is_some()
            && !t.mm().overlaps(tail, tail + grow);
        if free {
            let mut ext = backing.clone();
            if let Backing::File { offset, .. } = &mut ext {
                *offset += old_len;
            }
            let mapped =
                t.with_mm(|mm, ctx| mm.map(ctx, tail, grow, vma.prot, vma.shared, ext, vma.kind));
            collect_regions(t)?;
            mapped?;
            return Ok(old as i64);
        }
        if flags & MAYMOVE == 0 {
            collect_regions(t)?;
            return Err(Errno(libc::ENOMEM));
        }
    }
    let dest = if flags & FIXED != 0 {
        if !page_aligned(new_addr) || new_addr < old + old_len && old < new_addr + new_len {
            return Err(Errno(libc::EINVAL));
        }
        new_addr
    } else {
        t.mm().find_free(0, new_len).ok_or(Errno(libc::ENOMEM))?
    };
    t.with_mm(|mm, ctx| mm.map(ctx, dest, new_len, vma.prot, vma.shared, backing, vma.kind))?;
    // Copy what the guest has touched; untouched pages come back from their backing.
    // Shared file pages live in the file; shared anonymous ones only in guest RAM.
    let copy = if vma.region().is_some() || matches!(vma.backing, Backing::Kernel { .. }) {
        0
    } else {
        old_len.min(new_len)
    };
    let mut off = 0;
    while off < copy {
        let root = t.mm().root;
        let src = crate::kernel::mm::page_table::translate(&t.k.mem, root, old + off);
        if let Some(src) = src {
            let dst = t.with_mm(|mm, ctx| mm.translate_for(ctx, dest + off, Access::Write))?;
            t.k.mem.copy(src, dst, PAGE_SIZE);
        }
        off += PAGE_SIZE;
    }
    t.with_mm(|mm, ctx| mm.unmap(ctx, old, old_len))?;
    collect_regions(t)?;
    Ok(dest as i64)
}

/// get_mempolicy: MPOL_DEFAULT, with node 0 the only one allowed.
pub fn get_mempolicy(t: &mut Task, a: [u64; 6]) -> SysResult {
    const MPOL_F_MEMS_ALLOWED: u64 = 4;
    if a[0] != 0 {
        t.write_user(a[0], &0i32.to_le_bytes())?;
    }
    // Linux refuses node masks wider than a page of bits.
    if a[2] > PAGE_SIZE * 8 {
        return Err(Errno(libc::EINVAL));
    }
    if a[1] != 0 && a[2] > 0 {
        let mut mask = vec![0u8; a[2].div_ceil(64) as usize * 8];
        if a[3] & MPOL_F_MEMS_ALLOWED != 0 {
            mask[0] = 1;
        }
        t.write_user(a[1], &mask)?;
    }
    Ok(0)
}
