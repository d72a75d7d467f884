//! `vmctl restore DIR`: resume a job from its newest usable checkpoint.

use super::options::{CheckpointArgs, KvmArgs};
use super::size::parse_size;
use super::{open_kvm_or_report, EXIT_VMCTL_FAILED};
use crate::checkpoint::format::generation_dir_name;
use crate::checkpoint::read;
use crate::events::{self, Event};
use crate::kernel::task::Task;
use crate::kernel::Kernel;
use crate::machine::layout::SYSTEM_SIZE;
use crate::machine::Vm;
use crate::runner::{JobMeta, Runner};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The job's checkpoint directory
    pub dir: PathBuf,

    /// Restore this generation instead of the newest usable one
    #[arg(long, value_name = "N")]
    pub generation: Option<u64>,

    /// Largest memory the restored job may use (e.g. 512M, 8G), as `run --mem`: the
    /// commit limit is lowered to it, and a generation that needs more is refused.
    /// Default: the limit the job was started with
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub mem: Option<u64>,

    #[command(flatten)]
    pub kvm: KvmArgs,

    #[command(flatten)]
    pub checkpoint: CheckpointArgs,
}

pub fn restore(args: RestoreArgs) -> i32 {
    let dir = args.dir.clone();
    if let Err(e) = read::check_dir(&dir) {
        eprintln!("vmctl: {e}");
        return EXIT_VMCTL_FAILED;
    }
    let candidates = match args.generation {
        Some(g) => vec![g],
        None => match read::candidates(&dir) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("vmctl: {e}");
                return EXIT_VMCTL_FAILED;
            }
        },
    };
    if candidates.is_empty() {
        eprintln!(
            "vmctl: {}: no checkpoint generations to restore",
            dir.display()
        );
        return EXIT_VMCTL_FAILED;
    }
    let ckpt = match args.checkpoint.options(Some(dir.clone())) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmctl: {e}");
            return EXIT_VMCTL_FAILED;
        }
    };
    let Some(kvm) = open_kvm_or_report(&args.kvm) else {
        return EXIT_VMCTL_FAILED;
    };
    let waited = crate::runner::setup_signals(&args.checkpoint.on_signal);
    let newest = candidates[0];
    for g in candidates {
        let gen_dir = dir.join(generation_dir_name(g));
        let started = crate::clock::monotonic_ns();
        let result = try_generation(&kvm, &gen_dir, args.mem);
        let seconds = (crate::clock::monotonic_ns() - started) as f64 / 1e9;
        match result {
            Ok((kernel, tasks, meta, bytes)) => {
                let kind = if g == newest { "restore" } else { "fallback" };
                events::emit(&dir, &Event::new(kind, g, bytes, seconds));
                if g != newest {
                    eprintln!("vmctl: restored generation {g}, the newest usable one");
                }
                return match Runner::new(
                    kernel,
                    tasks,
                    ckpt,
                    &args.checkpoint.on_signal,
                    meta,
                    waited,
                ) {
                    Ok(r) => r.run(),
                    Err(e) => {
                        eprintln!("vmctl: {e}");
                        EXIT_VMCTL_FAILED
                    }
                };
            }
            Err(e) => {
                events::emit(&dir, &Event::new("restore", g, 0, seconds).failed(&e));
                eprintln!("vmctl: generation {g} is unusable: {e}");
            }
        }
    }
    eprintln!(
        "vmctl: {}: no usable checkpoint; start the job afresh",
        dir.display()
    );
    EXIT_VMCTL_FAILED
}

fn try_generation(
    kvm: &kvm_ioctls::Kvm,
    gen_dir: &std::path::Path,
    mem_cap: Option<u64>,
) -> Result<(Arc<Kernel>, Vec<Task>, JobMeta, u64), String> {
    let manifest = read::load_manifest(gen_dir).map_err(|e| e.to_string())?;
    let ram = manifest.memory.ram_bytes.saturating_sub(SYSTEM_SIZE);
    // The manifest is the user's file: its sizes are a request, and the caller's
    // --mem decides what is granted.
    if let Some(cap) = mem_cap {
        if ram > Kernel::ram_for(cap) {
            return Err(format!(
                "it needs a VM of {} MiB, more than --mem {} MiB allows; restore it with a larger --mem",
                ram >> 20,
                cap >> 20
            ));
        }
    }
    let vm = Vm::new(kvm, ram).map_err(|e| e.to_string())?;
    read::check_cpu(&manifest, vm.xcr0()).map_err(|e| e.to_string())?;
    read::load_memory(gen_dir, &manifest, vm.memory()).map_err(|e| e.to_string())?;
    let meta = JobMeta {
        program: manifest.program.clone(),
        argv: manifest.argv.clone(),
    };
    let mut state = manifest.kernel;
    if let Some(cap) = mem_cap {
        let committed: u64 = state.address_spaces.iter().map(|m| m.committed).sum();
        if committed > cap {
            return Err(format!(
                "its programs have committed {} MiB, more than --mem {} MiB allows; restore it with a larger --mem",
                committed >> 20,
                cap >> 20
            ));
        }
        state.commit_limit = state.commit_limit.min(cap);
    }
    let bytes = manifest.memory.data_bytes;
    let (kernel, tasks) = Kernel::restore(vm, state).map_err(|e| e.to_string())?;
    Ok((kernel, tasks, meta, bytes))
}
