//! `vmctl bench-exits N` (hidden): the cost of a bare guest exit and resume, the
//! floor under every syscall, measured with the same vCPU path syscalls take. The
//! benchmark script compares the syscall round trip against it.

use super::open_kvm_or_report;
use super::options::KvmArgs;
use crate::kernel::mm::{Access, AddressSpace, Backing, FrameAllocator, MmCtx, VmaKind};
use crate::machine::layout::{MMIO_GPA, MMIO_VA, SYSTEM_SIZE};
use crate::machine::{Exit, Vm};
use clap::Args;

#[derive(Args, Debug)]
pub struct BenchExitsArgs {
    /// Number of exits to time
    #[arg(default_value_t = 100_000)]
    pub count: u64,

    #[command(flatten)]
    pub kvm: KvmArgs,
}

const CODE_VA: u64 = 0x40_0000;

pub fn bench_exits(args: BenchExitsArgs) -> i32 {
    let Some(kvm) = open_kvm_or_report(&args.kvm) else {
        return super::EXIT_VMCTL_FAILED;
    };
    match run(&kvm, args.count) {
        Ok(ns) => {
            println!("{{\"exits\": {}, \"ns_per_exit\": {ns:.1}}}", args.count);
            0
        }
        Err(e) => {
            eprintln!("vmctl: {e}");
            super::EXIT_VMCTL_FAILED
        }
    }
}

fn run(kvm: &kvm_ioctls::Kvm, count: u64) -> Result<f64, String> {
    let vm = Vm::new(kvm, 64 << 20).map_err(|e| e.to_string())?;
    let mem = vm.memory().clone();
    let mut frames = FrameAllocator::new(SYSTEM_SIZE, mem.size());
    let mut mm = AddressSpace::new(&mem, &mut frames, vm.system_half()).ok_or("no memory")?;
    let commit = crate::kernel::mm::Commit::new(32 << 20);
    let mut vcpu = vm.create_vcpu(0, mm.root).map_err(|e| e.to_string())?;
    // movabs [MMIO_VA], al ; jmp back: every iteration is one exit. Not being the
    // syscall pad's store, it is reported as a store to the doorbell and resumed
    // right after it, at the jmp.
    let mut code = vec![0xa2];
    code.extend_from_slice(&MMIO_VA.to_le_bytes());
    code.extend_from_slice(&[0xeb, 0xf5]);
    let gpa = {
        let mut ctx = MmCtx {
            mem: &mem,
            frames: &mut frames,
            vcpu: &mut vcpu,
            commit: &commit,
        };
        mm.map(
            &mut ctx,
            CODE_VA,
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            false,
            Backing::Anonymous,
            VmaKind::Mapping,
        )
        .map_err(|e| format!("map: errno {}", e.0))?;
        mm.translate_for(&mut ctx, CODE_VA, Access::Read)
            .map_err(|e| format!("translate: errno {}", e.0))?
    };
    mem.write(gpa, &code);
    let r = vcpu.user_regs_mut();
    r.rip = CODE_VA;
    r.rcx = CODE_VA;
    r.rflags = 0x202;
    // Warm up, then time.
    for _ in 0..1000 {
        expect_exit(vcpu.run().map_err(|e| e.to_string())?)?;
    }
    let t0 = crate::clock::monotonic_ns();
    for _ in 0..count {
        expect_exit(vcpu.run().map_err(|e| e.to_string())?)?;
    }
    let dt = crate::clock::monotonic_ns() - t0;
    Ok(dt as f64 / count as f64)
}

fn expect_exit(e: Exit) -> Result<(), String> {
    match e {
        Exit::BadAccess { gpa } if gpa == MMIO_GPA => Ok(()),
        other => Err(format!("unexpected exit {other:?}")),
    }
}
