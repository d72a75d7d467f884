//! Copy-on-write: duplicating an address space for fork, breaking the sharing on the
//! first write, and tearing an address space down.
//!
//! After a fork both address spaces map the same private frames read-only with
//! PTE_COW set, and the frame allocator counts the extra reference. The parent's
//! entries are rewritten from the host, which the shadow MMU does not notice, so the
//! caller flushes it once (`Vm::flush_shadow`) before either process runs again.

use super::address_space::{AddressSpace, Fault, MmCtx, TASK_SIZE};
use super::page_table::{self as pt, PTE_COW, PTE_SHARED};
use super::vma::Backing;
use crate::kernel::Errno;
use crate::machine::layout::PAGE_SIZE;
use crate::machine::memory::{GuestMemory, HUGE_PAGE};
use crate::machine::system::{pt_index, SystemHalf, PTE_ADDR_MASK, PTE_P, PTE_PS, PTE_RW};

/// The child's copy of one parent leaf, write-protecting the parent's if needed.
/// Returns (new parent entry, child entry).
fn share_leaf(entry: u64, shared_vma: bool) -> (u64, u64) {
    if entry & PTE_SHARED != 0 || shared_vma {
        // A shared file page or shared anonymous memory: both keep writing to it.
        return (entry, entry);
    }
    let cow = (entry & !PTE_RW) | PTE_COW;
    (cow, cow)
}

impl AddressSpace {
    /// The child's address space at fork.
    pub fn fork(&mut self, ctx: &mut MmCtx, system: &SystemHalf) -> Result<AddressSpace, Errno> {
        // Shared anonymous memory must be the same frames in both processes, also
        // for pages neither has touched yet: map all of it now.
        let shared_anon: Vec<(u64, u64, i32)> = self
            .vmas
            .values()
            .filter(|v| v.shared && matches!(v.backing, Backing::Anonymous))
            .map(|v| (v.start, v.end, v.prot))
            .collect();
        for (start, end, prot) in shared_anon {
            if prot & (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) == 0 {
                continue;
            }
            let mut va = start;
            while va < end {
                match self.fault(ctx, va, super::Access::Read) {
                    Ok(()) => {}
                    Err(Fault::OutOfMemory) => return Err(Errno(libc::ENOMEM)),
                    Err(_) => return Err(Errno(libc::EFAULT)),
                }
                va = (va & !(HUGE_PAGE - 1)) + HUGE_PAGE;
            }
        }
        let mem = ctx.mem;
        let mut child = AddressSpace::new(mem, ctx.frames, system).ok_or(Errno(libc::ENOMEM))?;
        child.vmas = self.vmas.clone();
        child.brk_start = self.brk_start;
        child.brk = self.brk;
        child.committed = self.committed;
        ctx.commit.charge(child.committed);
        let mut last_huge = u64::MAX;
        for v in self.vmas.values() {
            let mut va = v.start;
            while va < v.end {
                let block = va & !(HUGE_PAGE - 1);
                let block_end = (block + HUGE_PAGE).min(v.end);
                let Some(pd_slot) = pt::pd_slot(mem, self.root, va) else {
                    va = block_end;
                    continue;
                };
                let pde = mem.read_u64(pd_slot);
                if pde & PTE_PS != 0 {
                    if block != last_huge && pt::is_mapped(pde) {
                        last_huge = block;
                        let (parent, kid) = share_leaf(pde, v.shared);
                        if parent != pde {
                            mem.write_u64(pd_slot, parent);
                        }
                        if pt::owns_frame(pde) {
                            ctx.frames.add_ref(pt::frame_of(pde, true));
                        }
                        let slot = pt::ensure_pd_slot(mem, ctx.frames, child.root, block)
                            .ok_or(Errno(libc::ENOMEM))?;
                        mem.write_u64(slot, kid);
                    }
                    va = block_end;
                    continue;
                }
                if pde & PTE_P == 0 {
                    va = block_end;
                    continue;
                }
                let table = pde & PTE_ADDR_MASK;
                let mut child_table = None;
                while va < block_end {
                    let slot = table + pt_index(va, 1) * 8;
                    let e = mem.read_u64(slot);
                    if pt::is_mapped(e) {
                        let (parent, kid) = share_leaf(e, v.shared);
                        if parent != e {
                            mem.write_u64(slot, parent);
                        }
                        if pt::owns_frame(e) {
                            ctx.frames.add_ref(e & PTE_ADDR_MASK);
                        }
                        let ct = match child_table {
                            Some(t) => t,
                            None => {
                                let s = pt::ensure_pd_slot(mem, ctx.frames, child.root, va)
                                    .ok_or(Errno(libc::ENOMEM))?;
                                let t =
                                    pt::ensure_pt(mem, ctx.frames, s).ok_or(Errno(libc::ENOMEM))?;
                                child_table = Some(t);
                                t
                            }
                        };
                        mem.write_u64(ct + pt_index(va, 1) * 8, kid);
                    }
                    va += PAGE_SIZE;
                }
            }
        }
        Ok(child)
    }

    /// A write to a copy-on-write page at `va`: take it over if no other address
    /// space maps it any more, else copy it.
    pub(super) fn break_cow(&mut self, ctx: &mut MmCtx, va: u64, huge: bool) -> Result<(), Fault> {
        let mem = ctx.mem;
        let prot = self.find(va).map(|v| v.prot).ok_or(Fault::Unmapped)?;
        let (slot, is_huge) = pt::leaf_slot(mem, self.root, va).ok_or(Fault::Unmapped)?;
        debug_assert_eq!(huge, is_huge);
        let old = mem.read_u64(slot);
        let frame = pt::frame_of(old, is_huge);
        let size = if is_huge { HUGE_PAGE } else { PAGE_SIZE };
        let flags = pt::leaf_flags(prot) | if is_huge { PTE_PS } else { 0 };
        if !ctx.frames.is_shared(frame) {
            // Ours alone now: the same frame, writable. The shadow MMU still maps it
            // read-only, and picks up the more permissive entry on the retried write.
            mem.write_u64(slot, frame | flags);
            return Ok(());
        }
        let new = if is_huge {
            ctx.frames.alloc_huge(mem)
        } else {
            ctx.frames.alloc_page(mem)
        }
        .ok_or(Fault::OutOfMemory)?;
        mem.copy(frame, new, size);
        // The entry now points at another frame: only a write by the guest itself
        // makes every vCPU's shadow translation follow.
        if ctx
            .vcpu
            .write_table_entries(&[(slot, new | flags)])
            .is_err()
        {
            return Err(Fault::OutOfMemory);
        }
        if is_huge {
            ctx.frames.free_huge(frame);
        } else {
            ctx.frames.free_page(frame);
        }
        Ok(())
    }

    /// Makes a copy-on-write 2 MiB page at `va` private before it is split into
    /// 4 KiB pages (split pages are counted one by one, a shared huge frame as one).
    pub(super) fn unshare_huge(&mut self, ctx: &mut MmCtx, va: u64) -> Result<(), Fault> {
        let Some((slot, true)) = pt::leaf_slot(ctx.mem, self.root, va) else {
            return Ok(());
        };
        let pde = ctx.mem.read_u64(slot);
        if pde & PTE_COW == 0 || !ctx.frames.is_shared(pt::frame_of(pde, true)) {
            return Ok(());
        }
        self.break_cow(ctx, va, true)
    }

    /// Frees everything this address space holds: its pages (a shared one loses a
    /// reference) and its page tables, which are quarantined until the caller has
    /// flushed the shadow MMU.
    pub fn release(self, ctx: &mut MmCtx) {
        let mem = ctx.mem;
        let user_entries = pt_index(TASK_SIZE, 4) + 1;
        for i in 0..user_entries {
            let e = mem.read_u64(self.root + i * 8);
            if e & PTE_P == 0 {
                continue;
            }
            let pdpt = e & PTE_ADDR_MASK;
            for j in 0..512 {
                let e = mem.read_u64(pdpt + j * 8);
                if e & PTE_P == 0 {
                    continue;
                }
                let pd = e & PTE_ADDR_MASK;
                release_pd(mem, ctx, pd);
                ctx.frames.free_table(pd);
            }
            ctx.frames.free_table(pdpt);
        }
        ctx.frames.free_table(self.root);
        ctx.commit.release(self.committed);
    }
}

fn release_pd(mem: &GuestMemory, ctx: &mut MmCtx, pd: u64) {
    for k in 0..512 {
        let pde = mem.read_u64(pd + k * 8);
        if pde & PTE_PS != 0 {
            if pt::owns_frame(pde) {
                ctx.frames.free_huge(pt::frame_of(pde, true));
            }
            continue;
        }
        if pde & PTE_P == 0 {
            continue;
        }
        let table = pde & PTE_ADDR_MASK;
        for l in 0..512 {
            let pte = mem.read_u64(table + l * 8);
            if pt::owns_frame(pte) {
                ctx.frames.free_page(pte & PTE_ADDR_MASK);
            }
        }
        ctx.frames.free_table(table);
    }
}
