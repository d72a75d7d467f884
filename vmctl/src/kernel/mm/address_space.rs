//! One guest address space: its VMAs, its page tables, brk, and access to its memory
//! from the host on the guest's behalf.
//!
//! Memory is mapped lazily: a page fault (or a syscall touching the memory) maps the
//! whole 2 MiB-aligned window around the faulting address that lies inside the VMA,
//! with one 2 MiB page when the window is a whole anonymous block. Each fault exit
//! costs tens of microseconds here, so mapping generously matters more than saving
//! guest RAM, exactly as transparent huge pages do on Linux.

use super::frames::FrameAllocator;
use super::page_table::{self as pt, Update, PTE_COW, PTE_SHARED};
use super::vma::{Backing, MappedFile, Vma, VmaKind};
use crate::kernel::Errno;
use crate::machine::layout::PAGE_SIZE;
use crate::machine::layout::SHARED_WINDOW;
use crate::machine::memory::{GuestMemory, HUGE_PAGE};
use crate::machine::system::{SystemHalf, PTE_ADDR_MASK, PTE_NX, PTE_P, PTE_PS, PTE_RW};
use crate::machine::{MachineError, Vcpu};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::Arc;

/// Top of user space, as on Linux with 4-level paging.
pub const TASK_SIZE: u64 = 0x7fff_ffff_f000;
pub const STACK_TOP: u64 = TASK_SIZE;
/// Where top-down mmap placement starts (no randomisation: deterministic layouts make
/// checkpoints reproducible).
pub const MMAP_BASE: u64 = 0x7fff_f7ff_f000;
const MMAP_MIN: u64 = 0x1_0000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Exec,
}

#[derive(Debug)]
pub enum Fault {
    /// No mapping at the address (SEGV_MAPERR).
    Unmapped,
    /// The mapping forbids the access (SEGV_ACCERR).
    Protection,
    /// Guest RAM is exhausted.
    OutOfMemory,
    /// A shared file mapping beyond the end of its file (SIGBUS).
    BeyondFile,
}

/// What an address-space operation needs from the machine: guest RAM, the frame
/// allocator, and a vCPU to replay page-table writes the shadow MMU must see.
pub struct MmCtx<'a> {
    pub mem: &'a GuestMemory,
    pub frames: &'a mut FrameAllocator,
    pub vcpu: &'a mut Vcpu,
    pub commit: &'a super::Commit,
}

impl MmCtx<'_> {
    fn commit(&mut self, update: Update) -> Result<(), MachineError> {
        self.vcpu.write_table_entries(&update.writes)?;
        for p in update.freed_pages {
            self.frames.free_page(p);
        }
        for h in update.freed_huge {
            self.frames.free_huge(h);
        }
        Ok(())
    }
}

enum RangeOp {
    Unmap,
    Protect(i32),
    /// MADV_DONTNEED: later reads see zeroes (anonymous) or the file (private file).
    Discard,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddressSpace {
    pub root: u64,
    /// Keyed by start address; stored as a plain list (the key is each VMA's start).
    #[serde(with = "vma_list")]
    pub vmas: BTreeMap<u64, Vma>,
    pub brk_start: u64,
    pub brk: u64,
    /// This address space's share of the VM-wide commit charge.
    pub committed: u64,
}

impl AddressSpace {
    pub fn new(
        mem: &GuestMemory,
        frames: &mut FrameAllocator,
        system: &SystemHalf,
    ) -> Option<Self> {
        let root = frames.alloc_page(mem)?;
        for &(index, entry) in &system.pml4_entries {
            mem.write_u64(root + index as u64 * 8, entry);
        }
        Some(AddressSpace {
            root,
            vmas: BTreeMap::new(),
            brk_start: 0,
            brk: 0,
            committed: 0,
        })
    }

    /// An address space with nothing in it and no page tables (a dead task's).
    pub fn empty() -> Self {
        AddressSpace {
            root: 0,
            vmas: BTreeMap::new(),
            brk_start: 0,
            brk: 0,
            committed: 0,
        }
    }

    pub fn find(&self, va: u64) -> Option<&Vma> {
        self.vmas
            .range(..=va)
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| va < v.end)
    }

    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.vmas
            .range(..end)
            .next_back()
            .is_some_and(|(_, v)| v.end > start)
    }

    /// A free range of `len` bytes, top-down below MMAP_BASE, or at `hint` if free.
    pub fn find_free(&self, hint: u64, len: u64) -> Option<u64> {
        if hint >= MMAP_MIN
            && hint.is_multiple_of(PAGE_SIZE)
            && hint.checked_add(len).is_some_and(|e| e <= TASK_SIZE)
            && !self.overlaps(hint, hint + len)
        {
            return Some(hint);
        }
        let mut top = MMAP_BASE;
        for v in self.vmas.range(..MMAP_BASE).rev().map(|(_, v)| v) {
            if v.end <= top && top - v.end >= len {
                return Some(top - len);
            }
            top = top.min(v.start);
        }
        (top >= MMAP_MIN + len).then(|| top - len)
    }

    fn split_at(&mut self, at: u64) {
        let Some((&start, _)) = self.vmas.range(..at).next_back() else {
            return;
        };
        let v = self.vmas.get_mut(&start).expect("vma exists");
        if v.end > at {
            let tail = v.split_off(at);
            self.vmas.insert(at, tail);
        }
    }

    fn merge_around(&mut self, start: u64, end: u64) {
        let keys: Vec<u64> = self
            .vmas
            .range(..=end)
            .rev()
            .take_while(|(_, v)| v.end >= start)
            .map(|(&k, _)| k)
            .collect();
        for k in keys.into_iter().rev() {
            let Some(prev_key) = self.vmas.range(..k).next_back().map(|(&pk, _)| pk) else {
                continue;
            };
            let mergeable = {
                let (prev, cur) = (&self.vmas[&prev_key], &self.vmas[&k]);
                prev.can_merge(cur)
            };
            if mergeable {
                let cur = self.vmas.remove(&k).expect("vma exists");
                self.vmas.get_mut(&prev_key).expect("vma exists").end = cur.end;
            }
        }
    }

    /// Inserts a new mapping at `[start, start+len)`, replacing whatever was there.
    #[allow(clippy::too_many_arguments)]
    pub fn map(
        &mut self,
        ctx: &mut MmCtx,
        start: u64,
        len: u64,
        prot: i32,
        shared: bool,
        backing: Backing,
        kind: VmaKind,
    ) -> Result<u64, Errno> {
        // Every caller checks its range; this guards the page tables' upper half, which
        // no user mapping may ever reach.
        let end = match start.checked_add(len) {
            Some(e) if start < e && e <= TASK_SIZE => e,
            _ => return Err(Errno(libc::EINVAL)),
        };
        let vma = Vma {
            start,
            end,
            prot,
            shared,
            backing,
            kind,
        };
        let replaced = self.committed_in(start, end);
        if !ctx.commit.fits(vma.committed(), replaced) {
            return Err(Errno(libc::ENOMEM));
        }
        self.unmap(ctx, start, len)?;
        self.committed += vma.committed();
        ctx.commit.charge(vma.committed());
        self.vmas.insert(start, vma);
        self.merge_around(start, end);
        Ok(start)
    }

    fn committed_in(&self, start: u64, end: u64) -> u64 {
        self.vmas
            .range(..end)
            .rev()
            .take_while(|(_, v)| v.end > start)
            .map(|(_, v)| {
                let s = v.start.max(start);
                let e = v.end.min(end);
                if v.committed() > 0 {
                    e - s
                } else {
                    0
                }
            })
            .sum()
    }

    pub fn unmap(&mut self, ctx: &mut MmCtx, start: u64, len: u64) -> Result<(), Errno> {
        let end = start
            .checked_add(len)
            .ok_or(Errno(libc::EINVAL))?
            .min(TASK_SIZE);
        if start >= end {
            return Ok(());
        }
        if !self.overlaps(start, end) {
            return Ok(());
        }
        self.split_at(start);
        self.split_at(end);
        self.change_range(ctx, start, end, RangeOp::Unmap)
            .map_err(machine_errno)?;
        let keys: Vec<u64> = self.vmas.range(start..end).map(|(&k, _)| k).collect();
        for k in keys {
            let v = self.vmas.remove(&k).expect("vma exists");
            self.committed -= v.committed();
            ctx.commit.release(v.committed());
        }
        Ok(())
    }

    pub fn protect(
        &mut self,
        ctx: &mut MmCtx,
        start: u64,
        len: u64,
        prot: i32,
    ) -> Result<(), Errno> {
        let end = match start.checked_add(len) {
            Some(e) if start < e && e <= TASK_SIZE => e,
            _ => return Err(Errno(libc::ENOMEM)),
        };
        // Linux fails with ENOMEM when part of the range is unmapped.
        let mut cursor = start;
        for (_, v) in self.vmas.range(..end) {
            if v.end <= cursor {
                continue;
            }
            if v.start > cursor {
                return Err(Errno(libc::ENOMEM));
            }
            cursor = v.end;
        }
        if cursor < end {
            return Err(Errno(libc::ENOMEM));
        }
        let mut extra = 0u64;
        for (_, v) in self.vmas.range(..end).filter(|(_, v)| v.end > start) {
            let mut after = v.clone();
            after.prot = prot;
            let part = v.end.min(end) - v.start.max(start);
            if after.committed() > 0 && v.committed() == 0 {
                extra += part;
            }
        }
        if !ctx.commit.fits(extra, 0) {
            return Err(Errno(libc::ENOMEM));
        }
        self.split_at(start);
        self.split_at(end);
        self.change_range(ctx, start, end, RangeOp::Protect(prot))
            .map_err(machine_errno)?;
        for (_, v) in self.vmas.range_mut(start..end) {
            self.committed -= v.committed();
            ctx.commit.release(v.committed());
            v.prot = prot;
            self.committed += v.committed();
            ctx.commit.charge(v.committed());
        }
        self.merge_around(start, end);
        Ok(())
    }

    pub fn discard(&mut self, ctx: &mut MmCtx, start: u64, len: u64) -> Result<(), Errno> {
        let end = start
            .checked_add(len)
            .ok_or(Errno(libc::EINVAL))?
            .min(TASK_SIZE);
        if self.vmas.range(..end).any(|(_, v)| {
            v.end > start && (v.shared || matches!(v.backing, Backing::Kernel { .. }))
        }) {
            // Shared mappings keep their contents (the file is the truth), and so do
            // the kernel's shared frames (the vDSO).
            return Ok(());
        }
        self.change_range(ctx, start, end, RangeOp::Discard)
            .map_err(machine_errno)
    }

    fn change_range(
        &mut self,
        ctx: &mut MmCtx,
        start: u64,
        end: u64,
        op: RangeOp,
    ) -> Result<(), MachineError> {
        let mem = ctx.mem;
        let mut update = Update::default();
        let mut va = start;
        while va < end {
            let block = va & !(HUGE_PAGE - 1);
            let block_end = (block + HUGE_PAGE).min(end);
            let Some(pd_slot) = pt::pd_slot(mem, self.root, va) else {
                va = block_end;
                continue;
            };
            let pde = mem.read_u64(pd_slot);
            let mut live = true;
            let table = if pde & PTE_PS != 0 {
                let whole = va == block && block_end == block + HUGE_PAGE;
                if whole {
                    let frame = pt::frame_of(pde, true);
                    match op {
                        RangeOp::Unmap => {
                            pt::set_entry(mem, pd_slot, pde, 0, true, &mut update);
                            if pde & PTE_SHARED == 0 {
                                update.freed_huge.push(frame);
                            }
                        }
                        RangeOp::Protect(prot) => {
                            let new = frame
                                | pt::private_leaf_flags(prot, pde)
                                | PTE_PS
                                | (pde & PTE_SHARED);
                            pt::set_entry(mem, pd_slot, pde, new, true, &mut update);
                        }
                        // A copy-on-write page is someone else's too: drop this
                        // mapping of it, and the next touch maps a fresh page.
                        RangeOp::Discard if pde & PTE_COW != 0 => {
                            pt::set_entry(mem, pd_slot, pde, 0, true, &mut update);
                            update.freed_huge.push(frame);
                        }
                        RangeOp::Discard => mem.zero(frame, HUGE_PAGE),
                    }
                    va = block_end;
                    continue;
                }
                live = false;
                if pde & PTE_COW != 0 {
                    self.unshare_huge(ctx, va)
                        .map_err(|_| MachineError::VcpuFailed("guest RAM exhausted".into()))?;
                }
                match pt::split_huge(mem, ctx.frames, pd_slot, &mut update) {
                    Some(t) => t,
                    None => return Err(MachineError::VcpuFailed("guest RAM exhausted".into())),
                }
            } else if pde & PTE_P != 0 {
                pde & PTE_ADDR_MASK
            } else {
                va = block_end;
                continue;
            };
            let mut p = va;
            while p < block_end {
                let slot = table + crate::machine::system::pt_index(p, 1) * 8;
                let old = mem.read_u64(slot);
                if pt::is_mapped(old) {
                    let frame = old & PTE_ADDR_MASK;
                    match op {
                        RangeOp::Unmap => {
                            pt::set_entry(mem, slot, old, 0, live, &mut update);
                            if pt::owns_frame(old) {
                                update.freed_pages.push(frame);
                            }
                        }
                        RangeOp::Protect(prot) => {
                            let new =
                                frame | pt::private_leaf_flags(prot, old) | (old & PTE_SHARED);
                            pt::set_entry(mem, slot, old, new, live, &mut update);
                        }
                        RangeOp::Discard if old & PTE_COW != 0 => {
                            pt::set_entry(mem, slot, old, 0, live, &mut update);
                            update.freed_pages.push(frame);
                        }
                        RangeOp::Discard => self.refill_page(mem, p, frame),
                    }
                }
                p += PAGE_SIZE;
            }
            va = block_end;
        }
        if update.is_empty() {
            return Ok(());
        }
        ctx.commit(update)
    }

    /// Resets a private page to its original contents (zero, or the file's bytes).
    fn refill_page(&self, mem: &GuestMemory, va: u64, frame: u64) {
        mem.zero(frame, PAGE_SIZE);
        if let Some(v) = self.find(va) {
            if let (
                Some(off),
                Backing::File {
                    file, region: None, ..
                },
            ) = (v.file_offset(va), &v.backing)
            {
                read_file_pages(mem, file, off, &[frame]);
            }
        }
    }

    /// Maps the window around `va` for an access the VMA allows.
    pub fn fault(&mut self, ctx: &mut MmCtx, va: u64, access: Access) -> Result<(), Fault> {
        let vma = self.find(va).ok_or(Fault::Unmapped)?.clone();
        let allowed = match access {
            Access::Read => vma.prot & (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) != 0,
            Access::Write => vma.prot & libc::PROT_WRITE != 0,
            Access::Exec => vma.prot & libc::PROT_EXEC != 0,
        };
        if !allowed {
            return Err(Fault::Protection);
        }
        let mem = ctx.mem;
        // Already mapped: the guest retried through a stale translation if the entry
        // permits the access, and met a genuine protection fault if it does not
        // (retrying that would loop forever).
        if let Some(leaf) = pt::walk(mem, self.root, va).filter(|l| l.value & PTE_P != 0) {
            let permits = match access {
                Access::Read => true,
                Access::Write => leaf.value & PTE_RW != 0,
                Access::Exec => leaf.value & PTE_NX == 0,
            };
            if !permits && access == Access::Write && leaf.value & PTE_COW != 0 {
                return self.break_cow(ctx, va, leaf.huge);
            }
            return if permits {
                Ok(())
            } else {
                Err(Fault::Protection)
            };
        }
        let block = va & !(HUGE_PAGE - 1);
        let start = block.max(vma.start);
        let end = (block + HUGE_PAGE).min(vma.end);
        let pd_slot =
            pt::ensure_pd_slot(mem, ctx.frames, self.root, va).ok_or(Fault::OutOfMemory)?;
        let pde = mem.read_u64(pd_slot);
        if pde & PTE_PS != 0 {
            // A 2 MiB page held but not present (PROT_NONE): the VMA check above
            // already refused any access a PROT_NONE mapping forbids.
            return Ok(());
        }
        if pde & PTE_P == 0
            && matches!(vma.backing, Backing::Anonymous)
            && start == block
            && end == block + HUGE_PAGE
        {
            let frame = ctx.frames.alloc_huge(mem).ok_or(Fault::OutOfMemory)?;
            mem.write_u64(pd_slot, frame | pt::leaf_flags(vma.prot) | PTE_PS);
            return Ok(());
        }
        let table = pt::ensure_pt(mem, ctx.frames, pd_slot).ok_or(Fault::OutOfMemory)?;
        if let Backing::Kernel { gpa } = vma.backing {
            // PTE_SHARED: the frames are not this address space's to free.
            let flags = pt::leaf_flags(vma.prot) | PTE_SHARED;
            let mut p = start;
            while p < end {
                let slot = table + crate::machine::system::pt_index(p, 1) * 8;
                if !pt::is_mapped(mem.read_u64(slot)) {
                    mem.write_u64(slot, (gpa + (p - vma.start)) | flags);
                }
                p += PAGE_SIZE;
            }
            return Ok(());
        }
        if let Some(region) = vma.region() {
            return self.fault_shared(mem, &vma, region, table, start, end, va);
        }
        let mut missing: Vec<(u64, u64)> = Vec::new();
        let mut p = start;
        while p < end {
            let slot = table + crate::machine::system::pt_index(p, 1) * 8;
            if !pt::is_mapped(mem.read_u64(slot)) {
                missing.push((p, slot));
            }
            p += PAGE_SIZE;
        }
        let mut frames = Vec::with_capacity(missing.len());
        for _ in &missing {
            match ctx.frames.alloc_page(mem) {
                Some(f) => frames.push(f),
                None => {
                    for f in frames {
                        ctx.frames.free_page(f);
                    }
                    return Err(Fault::OutOfMemory);
                }
            }
        }
        if let Backing::File { file, .. } = &vma.backing {
            // Read runs of consecutive file pages with one preadv each.
            let mut i = 0;
            while i < missing.len() {
                let mut j = i + 1;
                while j < missing.len() && missing[j].0 == missing[j - 1].0 + PAGE_SIZE {
                    j += 1;
                }
                let off = vma.file_offset(missing[i].0).expect("file vma");
                read_file_pages(mem, file, off, &frames[i..j]);
                i = j;
            }
        }
        let flags = pt::leaf_flags(vma.prot);
        for (&(_, slot), &frame) in missing.iter().zip(&frames) {
            mem.write_u64(slot, frame | flags);
        }
        Ok(())
    }

    /// Points the window's page-table entries at the file's pages in its memslot.
    #[allow(clippy::too_many_arguments)]
    fn fault_shared(
        &self,
        mem: &GuestMemory,
        vma: &Vma,
        region: &super::shared::SharedRegion,
        table: u64,
        start: u64,
        end: u64,
        va: u64,
    ) -> Result<(), Fault> {
        let Backing::File { file, .. } = &vma.backing else {
            return Err(Fault::Unmapped);
        };
        let size = file
            .file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        if vma.file_offset(va).unwrap_or(u64::MAX) >= size {
            return Err(Fault::BeyondFile);
        }
        let flags = pt::leaf_flags(vma.prot) | PTE_SHARED;
        let mut p = start;
        while p < end {
            let off = vma.file_offset(p).expect("file vma");
            if off >= size {
                break;
            }
            let slot = table + crate::machine::system::pt_index(p, 1) * 8;
            if !pt::is_mapped(mem.read_u64(slot)) {
                let gpa = region.gpa + (off - region.file_offset);
                mem.write_u64(slot, gpa | flags);
            }
            p += PAGE_SIZE;
        }
        Ok(())
    }

    /// Guest-physical address for a host access to `va` on the guest's behalf, mapping
    /// the page if needed. Fails like copy_to_user/copy_from_user would.
    pub fn translate_for(
        &mut self,
        ctx: &mut MmCtx,
        va: u64,
        access: Access,
    ) -> Result<u64, Errno> {
        if let Some(leaf) = pt::walk(ctx.mem, self.root, va) {
            if leaf.value & PTE_P != 0
                && (access != Access::Write || leaf.value & crate::machine::system::PTE_RW != 0)
            {
                let size = if leaf.huge { HUGE_PAGE } else { PAGE_SIZE };
                return Ok(pt::frame_of(leaf.value, leaf.huge) + (va & (size - 1)));
            }
        }
        match self.fault(ctx, va, access) {
            Ok(()) => {}
            Err(Fault::OutOfMemory) => return Err(Errno(libc::ENOMEM)),
            Err(_) => return Err(Errno(libc::EFAULT)),
        }
        pt::translate(ctx.mem, self.root, va).ok_or(Errno(libc::EFAULT))
    }

    /// Host address behind guest-physical `gpa`, which `va` maps to.
    fn host_ptr(&self, mem: &GuestMemory, va: u64, gpa: u64, len: u64) -> Option<*mut u8> {
        if gpa < SHARED_WINDOW {
            return mem.host_ptr(gpa, len);
        }
        self.find(va)?.region()?.host_ptr(gpa, len)
    }

    /// Host slices covering guest `[va, va+len)`, for I/O straight into guest memory.
    pub fn host_ranges(
        &mut self,
        ctx: &mut MmCtx,
        va: u64,
        len: u64,
        access: Access,
    ) -> Result<Vec<libc::iovec>, Errno> {
        let mut out: Vec<libc::iovec> = Vec::new();
        let end = va.checked_add(len).ok_or(Errno(libc::EFAULT))?;
        if end > TASK_SIZE && len > 0 {
            return Err(Errno(libc::EFAULT));
        }
        let mut p = va;
        while p < end {
            let gpa = self.translate_for(ctx, p, access)?;
            let page_end = (p & !(PAGE_SIZE - 1)) + PAGE_SIZE;
            let n = page_end.min(end) - p;
            let host = self
                .host_ptr(ctx.mem, p, gpa, n)
                .ok_or(Errno(libc::EFAULT))?;
            match out.last_mut() {
                Some(last) if (last.iov_base as u64 + last.iov_len as u64) == host as u64 => {
                    last.iov_len += n as usize;
                }
                _ => out.push(libc::iovec {
                    iov_base: host as *mut _,
                    iov_len: n as usize,
                }),
            }
            p += n;
        }
        Ok(out)
    }

    pub fn read(&mut self, ctx: &mut MmCtx, va: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let mut done = 0usize;
        for r in self.host_ranges(ctx, va, buf.len() as u64, Access::Read)? {
            let dst = &mut buf[done..done + r.iov_len];
            if in_ram(ctx.mem, &r) {
                // SAFETY: host_ranges returned in-bounds pointers into guest RAM. A raw
                // copy, no slice: another vCPU may store to these bytes meanwhile.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        r.iov_base as *const u8,
                        dst.as_mut_ptr(),
                        r.iov_len,
                    )
                };
            } else {
                copy_shared(dst.as_mut_ptr(), r.iov_base as *const u8, r.iov_len)?;
            }
            done += r.iov_len;
        }
        Ok(())
    }

    pub fn write(&mut self, ctx: &mut MmCtx, va: u64, data: &[u8]) -> Result<(), Errno> {
        let mut done = 0usize;
        for r in self.host_ranges(ctx, va, data.len() as u64, Access::Write)? {
            let src = &data[done..done + r.iov_len];
            if in_ram(ctx.mem, &r) {
                // SAFETY: host_ranges returned in-bounds pointers into guest RAM. A raw
                // copy, no `&mut` slice: another vCPU may use these bytes meanwhile.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), r.iov_base as *mut u8, r.iov_len)
                };
            } else {
                copy_shared(r.iov_base as *mut u8, src.as_ptr(), r.iov_len)?;
            }
            done += r.iov_len;
        }
        Ok(())
    }

    pub fn read_u64(&mut self, ctx: &mut MmCtx, va: u64) -> Result<u64, Errno> {
        let mut b = [0u8; 8];
        self.read(ctx, va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A NUL-terminated string of at most `max` bytes.
    pub fn read_cstr(&mut self, ctx: &mut MmCtx, va: u64, max: usize) -> Result<Vec<u8>, Errno> {
        let mut out = Vec::new();
        let mut p = va;
        loop {
            let gpa = self.translate_for(ctx, p, Access::Read)?;
            let page_end = (p & !(PAGE_SIZE - 1)) + PAGE_SIZE;
            let ptr = self
                .host_ptr(ctx.mem, p, gpa, page_end - p)
                .ok_or(Errno(libc::EFAULT))?;
            let len = (page_end - p) as usize;
            // Copied out, never borrowed: another vCPU may store to the page meanwhile.
            let mut copy = vec![0u8; len];
            if gpa < SHARED_WINDOW {
                // SAFETY: host_ptr checked that the whole range lies in guest RAM.
                unsafe { std::ptr::copy_nonoverlapping(ptr, copy.as_mut_ptr(), len) };
            } else {
                copy_shared(copy.as_mut_ptr(), ptr, len)?;
            }
            let chunk = copy.as_slice();
            if let Some(nul) = chunk.iter().position(|&b| b == 0) {
                out.extend_from_slice(&chunk[..nul]);
                return Ok(out);
            }
            out.extend_from_slice(chunk);
            if out.len() > max {
                return Err(Errno(libc::ENAMETOOLONG));
            }
            p = page_end;
        }
    }

    pub fn set_brk_start(&mut self, at: u64) {
        self.brk_start = at;
        self.brk = at;
    }

    pub fn set_brk(&mut self, ctx: &mut MmCtx, want: u64) -> u64 {
        if want < self.brk_start {
            return self.brk;
        }
        let old_end = self.brk.next_multiple_of(PAGE_SIZE);
        let Some(new_end) = want
            .checked_next_multiple_of(PAGE_SIZE)
            .filter(|&e| e <= TASK_SIZE)
        else {
            return self.brk;
        };
        if new_end > old_end {
            if self.overlaps(old_end, new_end) {
                return self.brk;
            }
            let ok = self.map(
                ctx,
                old_end,
                new_end - old_end,
                libc::PROT_READ | libc::PROT_WRITE,
                false,
                Backing::Anonymous,
                VmaKind::Heap,
            );
            if ok.is_err() {
                return self.brk;
            }
        } else if new_end < old_end && self.unmap(ctx, new_end, old_end - new_end).is_err() {
            return self.brk;
        }
        self.brk = want;
        self.brk
    }

    /// Content of /proc/self/maps for this address space.
    pub fn proc_maps(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        for v in self.vmas.values() {
            let r = |f: i32, c: char| if v.prot & f != 0 { c } else { '-' };
            let (off, dev, ino, name) = match &v.backing {
                Backing::File { file, offset, .. } => {
                    (*offset, file.dev, file.ino, file.path.display().to_string())
                }
                Backing::Anonymous | Backing::Kernel { .. } => (
                    0,
                    0,
                    0,
                    match v.kind {
                        VmaKind::Heap => "[heap]".to_string(),
                        VmaKind::Stack => "[stack]".to_string(),
                        VmaKind::Vdso => "[vdso]".to_string(),
                        VmaKind::Vvar => "[vvar]".to_string(),
                        VmaKind::Mapping => String::new(),
                    },
                ),
            };
            let major = (dev >> 8) & 0xfff;
            let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
            let _ = writeln!(
                s,
                "{:08x}-{:08x} {}{}{}{} {:08x} {:02x}:{:02x} {:<10} {}",
                v.start,
                v.end,
                r(libc::PROT_READ, 'r'),
                r(libc::PROT_WRITE, 'w'),
                r(libc::PROT_EXEC, 'x'),
                if v.shared { 's' } else { 'p' },
                off,
                major,
                minor,
                ino,
                name
            );
        }
        s
    }
}

fn machine_errno(e: MachineError) -> Errno {
    eprintln!("vmctl: {e}");
    Errno(libc::ENOMEM)
}

/// Fills consecutive file pages starting at `offset` into `frames` (already zeroed).
fn read_file_pages(mem: &GuestMemory, file: &Arc<MappedFile>, offset: u64, frames: &[u64]) {
    let Some(f) = &file.file else { return };
    let iov: Vec<libc::iovec> = frames
        .iter()
        .map(|&fr| libc::iovec {
            iov_base: mem.host_ptr(fr, PAGE_SIZE).expect("frame in RAM") as *mut _,
            iov_len: PAGE_SIZE as usize,
        })
        .collect();
    // Past the end of the file the frames stay zero, as Linux maps them; an I/O error
    // leaves them zero too (the guest sees what a failed read-ahead would give).
    let _ = crate::iov::transfer_all(f.as_raw_fd(), &iov, offset, crate::iov::Direction::Read);
}

/// Serializes the VMA map as the list of its VMAs, rebuilding the keys on the way in.
mod vma_list {
    use super::Vma;
    use serde::{Deserialize, Deserializer, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer>(vmas: &BTreeMap<u64, Vma>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(vmas.values())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u64, Vma>, D::Error> {
        let list = Vec::<Vma>::deserialize(d)?;
        Ok(list.into_iter().map(|v| (v.start, v)).collect())
    }
}

/// Whether a host range from `host_ranges` lies in guest RAM (else it is in a shared
/// file mapping).
fn in_ram(mem: &GuestMemory, r: &libc::iovec) -> bool {
    let base = mem.host_base();
    let p = r.iov_base as u64;
    p >= base && p + r.iov_len as u64 <= base + mem.size()
}

/// Copies `len` bytes to or from a shared file mapping. The file may have been
/// truncated under the mapping (by the guest or anyone else), and a plain load or
/// store beyond its end would be SIGBUS in vmctl. The kernel's copy answers EFAULT
/// instead, as Linux does for a syscall buffer there, so the copy goes through
/// process_vm_readv on vmctl itself.
fn copy_shared(dst: *mut u8, src: *const u8, len: usize) -> Result<(), Errno> {
    if len == 0 {
        return Ok(());
    }
    let local = libc::iovec {
        iov_base: dst as *mut _,
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: src as *mut _,
        iov_len: len,
    };
    // SAFETY: both ranges are valid host addresses of vmctl (a local buffer and a
    // mapping host_ranges found); the kernel checks every page and fails instead of
    // faulting. process_vm_readv on our own pid is allowed even when non-dumpable.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    if n == len as isize {
        Ok(())
    } else {
        Err(Errno(libc::EFAULT))
    }
}
