//! x86-64 four-level page tables kept in guest memory, written by the host.
//!
//! Only transitions from not-present to present may be written from the host: KVM's
//! shadow MMU learns of any other change only from a guest write, so those go into an
//! [`Update`] that the vCPU replays from a CPL0 detour (see shared/PLATFORM.md).

use crate::machine::layout::PAGE_SIZE;
use crate::machine::memory::{GuestMemory, HUGE_PAGE};
use crate::machine::system::{pt_index, PTE_ADDR_MASK, PTE_NX, PTE_P, PTE_PS, PTE_RW, PTE_US};

use super::frames::FrameAllocator;

/// Software bit: this leaf owns its frame (set even while not present, for PROT_NONE).
pub const PTE_HELD: u64 = 1 << 9;
/// Software bit: the frame belongs to a shared file mapping, not to the allocator.
pub const PTE_SHARED: u64 = 1 << 10;
/// Software bit: a private page shared with another address space since a fork. It
/// is mapped read-only; the first write copies it (or takes it over if it is no
/// longer shared).
pub const PTE_COW: u64 = 1 << 11;
const TABLE_FLAGS: u64 = PTE_P | PTE_RW | PTE_US;

pub fn leaf_flags(prot: i32) -> u64 {
    if prot & (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) == 0 {
        return PTE_HELD;
    }
    let mut f = PTE_P | PTE_US | PTE_HELD;
    if prot & libc::PROT_WRITE != 0 {
        f |= PTE_RW;
    }
    if prot & libc::PROT_EXEC == 0 {
        f |= PTE_NX;
    }
    f
}

/// Flags for a private leaf with `prot` that may still be copy-on-write: such a leaf
/// stays read-only until a write fault copies it.
pub fn private_leaf_flags(prot: i32, old: u64) -> u64 {
    let mut f = leaf_flags(prot) | (old & PTE_COW);
    if old & PTE_COW != 0 {
        f &= !PTE_RW;
    }
    f
}

pub fn owns_frame(entry: u64) -> bool {
    entry & (PTE_P | PTE_HELD) != 0 && entry & PTE_SHARED == 0
}

pub fn is_mapped(entry: u64) -> bool {
    entry & (PTE_P | PTE_HELD) != 0
}

pub fn frame_of(entry: u64, huge: bool) -> u64 {
    if huge {
        entry & PTE_ADDR_MASK & !(HUGE_PAGE - 1)
    } else {
        entry & PTE_ADDR_MASK
    }
}

/// Page-table changes that the guest must make itself, and the frames they release.
#[derive(Default)]
pub struct Update {
    pub writes: Vec<(u64, u64)>,
    pub freed_pages: Vec<u64>,
    pub freed_huge: Vec<u64>,
}

impl Update {
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.freed_pages.is_empty() && self.freed_huge.is_empty()
    }
}

/// A leaf entry: its current value, and whether it maps 2 MiB.
#[derive(Debug, Clone, Copy)]
pub struct Leaf {
    pub value: u64,
    pub huge: bool,
}

fn next_table(mem: &GuestMemory, table: u64, va: u64, level: u32) -> Option<u64> {
    let e = mem.read_u64(table + pt_index(va, level) * 8);
    (e & PTE_P != 0).then_some(e & PTE_ADDR_MASK)
}

/// The PD slot covering `va`, if the upper tables exist.
pub fn pd_slot(mem: &GuestMemory, root: u64, va: u64) -> Option<u64> {
    let pdpt = next_table(mem, root, va, 4)?;
    let pd = next_table(mem, pdpt, va, 3)?;
    Some(pd + pt_index(va, 2) * 8)
}

/// The leaf for `va` if the tables down to it exist (its value may be empty).
pub fn walk(mem: &GuestMemory, root: u64, va: u64) -> Option<Leaf> {
    let slot = pd_slot(mem, root, va)?;
    let pde = mem.read_u64(slot);
    if pde & PTE_PS != 0 {
        return Some(Leaf {
            value: pde,
            huge: true,
        });
    }
    if pde & PTE_P == 0 {
        return None;
    }
    let slot = (pde & PTE_ADDR_MASK) + pt_index(va, 1) * 8;
    Some(Leaf {
        value: mem.read_u64(slot),
        huge: false,
    })
}

/// Guest-physical address that `va` maps to, if present.
pub fn translate(mem: &GuestMemory, root: u64, va: u64) -> Option<u64> {
    let leaf = walk(mem, root, va)?;
    if leaf.value & PTE_P == 0 {
        return None;
    }
    let size = if leaf.huge { HUGE_PAGE } else { PAGE_SIZE };
    Some(frame_of(leaf.value, leaf.huge) + (va & (size - 1)))
}

/// The PD slot covering `va`, creating the upper tables as needed.
pub fn ensure_pd_slot(
    mem: &GuestMemory,
    frames: &mut FrameAllocator,
    root: u64,
    va: u64,
) -> Option<u64> {
    let mut table = root;
    for level in [4u32, 3] {
        let slot = table + pt_index(va, level) * 8;
        let e = mem.read_u64(slot);
        table = if e & PTE_P != 0 {
            e & PTE_ADDR_MASK
        } else {
            let t = frames.alloc_page(mem)?;
            mem.write_u64(slot, t | TABLE_FLAGS);
            t
        };
    }
    Some(table + pt_index(va, 2) * 8)
}

/// The page table under PD slot `pd_slot` (which must not hold a 2 MiB leaf), created
/// if missing.
pub fn ensure_pt(mem: &GuestMemory, frames: &mut FrameAllocator, pd_slot: u64) -> Option<u64> {
    let pde = mem.read_u64(pd_slot);
    debug_assert!(pde & PTE_PS == 0);
    if pde & PTE_P != 0 {
        return Some(pde & PTE_ADDR_MASK);
    }
    let t = frames.alloc_page(mem)?;
    mem.write_u64(pd_slot, t | TABLE_FLAGS);
    Some(t)
}

/// Replaces the 2 MiB leaf at `pd_slot` by a page table of 512 equivalent 4 KiB leaves.
/// The new table is not yet visible to the guest, so the caller may edit it freely
/// before the PDE change in `update` is applied.
pub fn split_huge(
    mem: &GuestMemory,
    frames: &mut FrameAllocator,
    pd_slot: u64,
    update: &mut Update,
) -> Option<u64> {
    let pde = mem.read_u64(pd_slot);
    let frame = frame_of(pde, true);
    let flags = pde & (PTE_P | PTE_RW | PTE_US | PTE_NX | PTE_HELD | PTE_SHARED | PTE_COW);
    let pt = frames.alloc_page(mem)?;
    for i in 0..512u64 {
        mem.write_u64(pt + i * 8, (frame + i * PAGE_SIZE) | flags);
    }
    frames.split_huge(frame);
    let new = pt | TABLE_FLAGS;
    if pde & PTE_P != 0 {
        update.writes.push((pd_slot, new));
    } else {
        mem.write_u64(pd_slot, new);
    }
    Some(pt)
}

/// Sets entry `slot` from `old` to `new`, through the guest when the shadow MMU may
/// hold a translation for it.
pub fn set_entry(
    mem: &GuestMemory,
    slot: u64,
    old: u64,
    new: u64,
    live: bool,
    update: &mut Update,
) {
    if old == new {
        return;
    }
    if live && old & PTE_P != 0 {
        update.writes.push((slot, new));
    } else {
        mem.write_u64(slot, new);
    }
}

/// The slot holding the leaf for `va` (a PDE for a 2 MiB page), if the tables exist.
pub fn leaf_slot(mem: &GuestMemory, root: u64, va: u64) -> Option<(u64, bool)> {
    let slot = pd_slot(mem, root, va)?;
    let pde = mem.read_u64(slot);
    if pde & PTE_PS != 0 {
        return Some((slot, true));
    }
    if pde & PTE_P == 0 {
        return None;
    }
    Some(((pde & PTE_ADDR_MASK) + pt_index(va, 1) * 8, false))
}
