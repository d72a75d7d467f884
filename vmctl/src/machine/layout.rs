//! Fixed guest-physical and guest-virtual addresses of the machine's own structures.
//!
//! Guest-physical `[0, SYSTEM_SIZE)` holds what the CPU needs to run user code and
//! trap back to us (GDT, IDT, TSSs, CPL0 stubs, the syscall pad, per-vCPU exception
//! stacks, the upper-half page tables). Guest RAM for the kernel layer starts at
//! `SYSTEM_SIZE`. All of guest RAM is also mapped, supervisor-only, at `DIRECT_MAP`
//! in every address space, so CPL0 stubs can reach any page-table entry.

pub const PAGE_SIZE: u64 = 4096;

pub const GDT_GPA: u64 = 0x0000;
pub const IDT_GPA: u64 = 0x1000;
/// One 128-byte TSS per vCPU.
pub const TSS_GPA: u64 = 0x2000;
pub const TSS_STRIDE: u64 = 128;
pub const MAX_VCPUS: u64 = 128;
pub const STUBS_GPA: u64 = 0x6000;
pub const PAD_GPA: u64 = 0x7000;
/// One exception stack page per vCPU.
pub const KSTACK_GPA: u64 = 0x10000;
/// Page-table pages for the upper (system) half of every address space.
pub const SYSTEM_TABLES_GPA: u64 = 0x10_0000;
pub const SYSTEM_TABLES_END: u64 = 0x1c_0000;
/// Staging areas for lists of page-table writes run by the CPL0 detour, one slice per
/// vCPU so that several vCPUs can run detours at once.
pub const DETOUR_LIST_GPA: u64 = 0x1c_0000;
pub const DETOUR_LIST_END: u64 = 0x20_0000;
pub const DETOUR_LIST_STRIDE: u64 = (DETOUR_LIST_END - DETOUR_LIST_GPA) / MAX_VCPUS;
pub const SYSTEM_SIZE: u64 = 0x20_0000;

/// Guest RAM is exposed to KVM in memslots of this size, added as the guest's frame
/// allocator first reaches them: KVM's per-slot bookkeeping is proportional to the
/// slot, so one slot for a large --mem would cost milliseconds at every start.
pub const RAM_SLOT_SIZE: u64 = 1 << 30;
/// Memslot numbers from here on are for shared file mappings.
pub const FIRST_SHARED_SLOT: u32 = 1024;

/// A guest-physical address with no memslot: a user store to it exits to the VMM.
pub const MMIO_GPA: u64 = 0x40_0000_0000;
/// Guest-physical window for shared file mappings, each in its own memslot.
pub const SHARED_WINDOW: u64 = 0x30_0000_0000;
pub const SHARED_WINDOW_END: u64 = FLUSH_GPA;
/// Largest guest RAM this layout supports (the direct map's tables must fit).
pub const MAX_RAM: u64 = SHARED_WINDOW - SYSTEM_SIZE;

pub const DIRECT_MAP: u64 = 0xffff_8880_0000_0000;
/// User-executable page holding the syscall entry (LSTAR) and the MMIO doorbell after it.
pub const PAD_VA: u64 = 0xffff_ffff_fe00_0000;
pub const MMIO_VA: u64 = PAD_VA + PAGE_SIZE;

/// GDT selectors, laid out as Linux does so guests see familiar values.
pub const KERNEL_CS: u16 = 0x10;
pub const KERNEL_DS: u16 = 0x18;
pub const USER32_CS: u16 = 0x23;
pub const USER_DS: u16 = 0x2b;
pub const USER_CS: u16 = 0x33;
pub const FIRST_TSS_ENTRY: u64 = 8;

/// Ports used by CPL0 stubs: exception vectors use their own number (0..32).
pub const PORT_DETOUR_DONE: u8 = 0xf0;
pub const PORT_FIRST_RUN: u8 = 0xf1;

pub fn tss_gpa(vcpu: u64) -> u64 {
    TSS_GPA + vcpu * TSS_STRIDE
}

pub fn tss_selector(vcpu: u64) -> u16 {
    ((FIRST_TSS_ENTRY + 2 * vcpu) * 8) as u16
}

pub fn kstack_top(vcpu: u64) -> u64 {
    DIRECT_MAP + KSTACK_GPA + (vcpu + 1) * PAGE_SIZE
}

pub fn detour_list_gpa(vcpu: u64) -> u64 {
    DETOUR_LIST_GPA + vcpu * DETOUR_LIST_STRIDE
}

/// A one-page memslot added and removed again to make KVM drop every shadow page
/// (see `Vm::flush_shadow`); it lies above the shared-file window, below the doorbell.
pub const FLUSH_SLOT: u32 = FIRST_SHARED_SLOT - 1;
pub const FLUSH_GPA: u64 = MMIO_GPA - 0x20_0000;

pub fn direct_map(gpa: u64) -> u64 {
    DIRECT_MAP + gpa
}
