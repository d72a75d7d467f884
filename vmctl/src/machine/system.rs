//! The guest's system structures for running user code under a host-side kernel.
//!
//! Guest CPL0 is emulated instruction by instruction here (~0.7 us each), so CPL0 is
//! reduced to a handful of stubs: one that reports an exception vector to the VMM
//! with `out` and then `iretq`s back, one that performs a list of page-table writes
//! (the only way the shadow MMU learns of a changed present entry), and one that
//! switches a new vCPU into its fast mode on its first run. Syscalls never reach CPL0:
//! LSTAR points at a user-executable pad whose single store to an unbacked address
//! exits to the VMM.

use super::layout::*;
use super::memory::GuestMemory;
use kvm_bindings::{kvm_dtable, kvm_segment, kvm_sregs};

pub const PTE_P: u64 = 1;
pub const PTE_RW: u64 = 1 << 1;
pub const PTE_US: u64 = 1 << 2;
pub const PTE_PS: u64 = 1 << 7;
pub const PTE_NX: u64 = 1 << 63;
pub const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Offsets of the CPL0 stubs inside the stubs page.
const STUB_FIRST_RUN: u64 = 0x000;
const STUB_VECTORS: u64 = 0x100;
const STUB_VECTOR_STRIDE: u64 = 16;
const STUB_DETOUR: u64 = 0x400;

pub const FIRST_RUN_RIP: u64 = DIRECT_MAP + STUBS_GPA + STUB_FIRST_RUN;
pub const DETOUR_RIP: u64 = DIRECT_MAP + STUBS_GPA + STUB_DETOUR;
pub const DETOUR_LIST_CAPACITY: u64 = DETOUR_LIST_STRIDE / 16;

/// Vectors for which the CPU pushes an error code.
fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

const CR0: u64 = 0x8005_0033; // PE MP ET NE WP AM PG
const CR4_BASE: u64 = (1 << 5) | (1 << 9) | (1 << 10) | (1 << 18); // PAE OSFXSR OSXMMEXCPT OSXSAVE
pub const CR4_TSD: u64 = 1 << 2;
const EFER: u64 = 0xd01; // SCE LME LMA NXE
pub const STAR: u64 = ((USER32_CS as u64) << 48) | ((KERNEL_CS as u64) << 32);
/// Flags cleared on `syscall`: TF, DF and AC, as Linux does (IF is left alone: no
/// interrupts are ever injected, and the pad runs at CPL3 anyway).
pub const SFMASK: u64 = (1 << 8) | (1 << 10) | (1 << 18);

/// The upper half that every address space shares: entries to copy into each PML4.
#[derive(Clone, Debug)]
pub struct SystemHalf {
    pub pml4_entries: Vec<(usize, u64)>,
}

/// Writes GDT, IDT, TSSs, stubs, the pad and the upper-half tables into guest memory.
pub fn build(mem: &GuestMemory) -> SystemHalf {
    write_gdt(mem);
    write_idt(mem);
    for vcpu in 0..MAX_VCPUS {
        let tss = tss_gpa(vcpu);
        mem.zero(tss, TSS_STRIDE);
        // RSP0 at offset 4; the I/O map base just past the TSS means "no I/O bitmap".
        mem.write(tss + 4, &kstack_top(vcpu).to_le_bytes());
        mem.write(tss + 102, &104u16.to_le_bytes());
    }
    write_stubs(mem);
    write_pad(mem);
    build_upper_half(mem)
}

fn write_gdt(mem: &GuestMemory) {
    let entries: [(u16, u64); 6] = [
        (0x08, 0x00cf_9b00_0000_ffff),
        (KERNEL_CS, 0x00af_9b00_0000_ffff),
        (KERNEL_DS, 0x00cf_9300_0000_ffff),
        (USER32_CS & !3, 0x00cf_fb00_0000_ffff),
        (USER_DS & !3, 0x00cf_f300_0000_ffff),
        (USER_CS & !3, 0x00af_fb00_0000_ffff),
    ];
    mem.zero(GDT_GPA, PAGE_SIZE);
    for (sel, desc) in entries {
        mem.write_u64(GDT_GPA + sel as u64, desc);
    }
    for vcpu in 0..MAX_VCPUS {
        let base = direct_map(tss_gpa(vcpu));
        let limit = 103u64;
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        let at = GDT_GPA + tss_selector(vcpu) as u64;
        mem.write_u64(at, low);
        mem.write_u64(at + 8, base >> 32);
    }
}

fn write_idt(mem: &GuestMemory) {
    mem.zero(IDT_GPA, PAGE_SIZE);
    for vector in 0u64..32 {
        let handler = DIRECT_MAP + STUBS_GPA + STUB_VECTORS + vector * STUB_VECTOR_STRIDE;
        // int3 and into must be callable from CPL3, like on Linux.
        let dpl: u64 = if vector == 3 || vector == 4 { 3 } else { 0 };
        let attr = 0x8e | (dpl << 5);
        let low = (handler & 0xffff)
            | ((KERNEL_CS as u64) << 16)
            | (attr << 40)
            | (((handler >> 16) & 0xffff) << 48);
        mem.write_u64(IDT_GPA + vector * 16, low);
        mem.write_u64(IDT_GPA + vector * 16 + 8, handler >> 32);
    }
}

fn write_stubs(mem: &GuestMemory) {
    mem.zero(STUBS_GPA, PAGE_SIZE);
    // First run: report and stop; the VMM then loads the real state.
    mem.write(STUBS_GPA + STUB_FIRST_RUN, &[0xe6, PORT_FIRST_RUN, 0xf4]);
    for vector in 0u8..32 {
        let mut code = vec![0xe6, vector]; // out vector, al
        if has_error_code(vector) {
            code.extend_from_slice(&[0x48, 0x83, 0xc4, 0x08]); // add rsp, 8
        }
        code.extend_from_slice(&[0x48, 0xcf]); // iretq
        let at = STUBS_GPA + STUB_VECTORS + vector as u64 * STUB_VECTOR_STRIDE;
        mem.write(at, &code);
    }
    // rsi = list of (entry address, value) pairs, rcx = count (> 0).
    let detour = [
        0x48,
        0x8b,
        0x3e, // mov rdi, [rsi]
        0x48,
        0x8b,
        0x46,
        0x08, // mov rax, [rsi+8]
        0x48,
        0x89,
        0x07, // mov [rdi], rax
        0x48,
        0x83,
        0xc6,
        0x10, // add rsi, 16
        0x48,
        0xff,
        0xc9, // dec rcx
        0x75,
        0xed, // jnz loop
        0xe6,
        PORT_DETOUR_DONE, // out PORT_DETOUR_DONE, al
        0xf4,
    ];
    mem.write(STUBS_GPA + STUB_DETOUR, &detour);
}

/// Length of the pad's store: RIP is PAD_VA plus this after it.
pub const PAD_STORE_LEN: u64 = 6;

fn write_pad(mem: &GuestMemory) {
    mem.zero(PAD_GPA, PAGE_SIZE);
    let disp = (MMIO_VA - (PAD_VA + PAD_STORE_LEN)) as u32;
    let mut code = vec![0x88, 0x05]; // mov [rip+disp32], al
    code.extend_from_slice(&disp.to_le_bytes());
    code.extend_from_slice(&[0x0f, 0x0b]); // ud2: never reached, the VMM resumes at RCX
    mem.write(PAD_GPA, &code);
}

fn build_upper_half(mem: &GuestMemory) -> SystemHalf {
    let mut next = SYSTEM_TABLES_GPA;
    let mut alloc = || {
        let page = next;
        next += PAGE_SIZE;
        assert!(next <= SYSTEM_TABLES_END, "system page tables overflow");
        mem.zero(page, PAGE_SIZE);
        page
    };
    let sup = PTE_P | PTE_RW;
    let user = PTE_P | PTE_RW | PTE_US;

    // Direct map of all guest RAM with 2 MiB pages.
    let dm_pdpt = alloc();
    let gib = 1u64 << 30;
    for g in 0..mem.size().div_ceil(gib) {
        let pd = alloc();
        mem.write_u64(dm_pdpt + g * 8, pd | sup);
        for i in 0..512u64 {
            let gpa = g * gib + i * (2 << 20);
            if gpa >= mem.size() {
                break;
            }
            mem.write_u64(pd + i * 8, gpa | sup | PTE_PS);
        }
    }

    // The syscall pad and the MMIO doorbell, user-accessible.
    let hi_pdpt = alloc();
    let hi_pd = alloc();
    let hi_pt = alloc();
    mem.write_u64(hi_pdpt + pt_index(PAD_VA, 3) * 8, hi_pd | user);
    mem.write_u64(hi_pd + pt_index(PAD_VA, 2) * 8, hi_pt | user);
    mem.write_u64(hi_pt + pt_index(PAD_VA, 1) * 8, PAD_GPA | PTE_P | PTE_US);
    mem.write_u64(
        hi_pt + pt_index(MMIO_VA, 1) * 8,
        MMIO_GPA | PTE_P | PTE_RW | PTE_US | PTE_NX,
    );

    SystemHalf {
        pml4_entries: vec![
            (pt_index(DIRECT_MAP, 4) as usize, dm_pdpt | sup),
            (pt_index(PAD_VA, 4) as usize, hi_pdpt | user),
        ],
    }
}

/// Index into the page table at `level` (4 = PML4 .. 1 = PT) for `va`.
pub fn pt_index(va: u64, level: u32) -> u64 {
    (va >> (12 + 9 * (level - 1))) & 511
}

fn segment(selector: u16, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn base_sregs(template: &kvm_sregs, vcpu: u64, cr3: u64, tsd: bool) -> kvm_sregs {
    let mut s = *template;
    s.tr = kvm_segment {
        base: direct_map(tss_gpa(vcpu)),
        limit: 103,
        selector: tss_selector(vcpu),
        type_: 11,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.ldt = kvm_segment {
        unusable: 1,
        ..Default::default()
    };
    s.gdt = kvm_dtable {
        base: DIRECT_MAP + GDT_GPA,
        limit: (PAGE_SIZE - 1) as u16,
        padding: [0; 3],
    };
    s.idt = kvm_dtable {
        base: DIRECT_MAP + IDT_GPA,
        limit: (PAGE_SIZE - 1) as u16,
        padding: [0; 3],
    };
    s.cr0 = CR0;
    s.cr3 = cr3;
    s.cr4 = CR4_BASE | if tsd { CR4_TSD } else { 0 };
    s.efer = EFER;
    s
}

/// CPL0 state used for the first run and for page-table detours.
pub fn kernel_sregs(template: &kvm_sregs, vcpu: u64, cr3: u64, tsd: bool) -> kvm_sregs {
    let mut s = base_sregs(template, vcpu, cr3, tsd);
    s.cs = segment(KERNEL_CS, true, 0);
    let ds = segment(KERNEL_DS, false, 0);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (ds, ds, ds, ds, ds);
    s
}

/// CPL3 state for running guest user code.
pub fn user_sregs(
    template: &kvm_sregs,
    vcpu: u64,
    cr3: u64,
    fs_base: u64,
    gs_base: u64,
    tsd: bool,
) -> kvm_sregs {
    let mut s = base_sregs(template, vcpu, cr3, tsd);
    s.cs = segment(USER_CS, true, 3);
    let ds = segment(USER_DS, false, 3);
    (s.ds, s.es, s.ss) = (ds, ds, ds);
    s.fs = kvm_segment {
        base: fs_base,
        ..ds
    };
    s.gs = kvm_segment {
        base: gs_base,
        ..ds
    };
    s
}
