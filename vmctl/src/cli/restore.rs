//! `vmctl restore DIR`: resume a job from its newest usable checkpoint.

use super::options::{CheckpointArgs, KvmArgs};
use super::{open_kvm_or_report, EXIT_VMCTL_FAILED};
use crate::checkpoint::format::{generation_dir_name, Manifest};
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

    /// Guest memory limit, as for run: a generation whose job needs more is refused
    /// and the next older one tried. Default: the same as run's default
    #[arg(long, value_name = "SIZE", value_parser = super::size::parse_size)]
    pub mem: Option<u64>,

    #[command(flatten)]
    pub kvm: KvmArgs,

    #[command(flatten)]
    pub checkpoint: CheckpointArgs,
}

pub fn restore(args: RestoreArgs) -> i32 {
    // Resolved once, now, so that new generations go where this one came from.
    let dir = match std::fs::canonicalize(&args.dir) {
        Ok(d) => d,
        Err(e) => {
            eprintln!(
                "vmctl: {}: not a checkpoint directory ({e}); give the job's --checkpoint-dir",
                args.dir.display()
            );
            return EXIT_VMCTL_FAILED;
        }
    };
    let cap = args.mem.unwrap_or_else(super::run::default_mem);
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
    crate::filejournal::track::set_policy(args.checkpoint.files);
    let files = args.checkpoint.files.mode != crate::filejournal::Mode::None;
    let newest = candidates[0];
    for g in candidates {
        let started = crate::clock::monotonic_ns();
        let result = try_generation(&kvm, &dir, g, cap, files);
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

/// Restores generation `g` of `dir`; with `files`, first brings the job's files back
/// to it (see crate::filejournal), or refuses it if they cannot be.
fn try_generation(
    kvm: &kvm_ioctls::Kvm,
    dir: &std::path::Path,
    g: u64,
    cap: u64,
    files: bool,
) -> Result<(Arc<Kernel>, Vec<Task>, JobMeta, u64), String> {
    let gen_dir = dir.join(generation_dir_name(g));
    let mut manifest = read::load_manifest(&gen_dir).map_err(|e| e.to_string())?;
    check_memory_cap(&manifest, cap)?;
    manifest.kernel.commit_limit = manifest.kernel.commit_limit.min(cap);
    let ram = manifest.memory.ram_bytes.saturating_sub(SYSTEM_SIZE);
    let vm = Vm::new(kvm, ram).map_err(|e| e.to_string())?;
    read::check_cpu(&manifest, vm.xcr0()).map_err(|e| e.to_string())?;
    read::load_memory(&gen_dir, &manifest, vm.memory()).map_err(|e| e.to_string())?;
    // Everything is checked before any file is touched.
    let plan = match (&manifest.files, files) {
        (Some(_), true) => Some(crate::filejournal::undo::plan(dir, g)?),
        _ => None,
    };
    if let Some(plan) = &plan {
        plan.apply()?;
        plan.abandon_newer(dir);
    }
    let meta = JobMeta {
        program: manifest.program.clone(),
        argv: manifest.argv.clone(),
    };
    let bytes = manifest.memory.data_bytes;
    let (kernel, tasks) = Kernel::restore(vm, manifest.kernel).map_err(|e| e.to_string())?;
    if let Some(plan) = &plan {
        crate::filejournal::track::resume(&gen_dir, g, &plan.entries)?;
    }
    Ok((kernel, tasks, meta, bytes))
}

/// The manifest is the user's to edit: the memory policy of a restore is --mem's
/// (the admin's, through the plugin), never the manifest's. A generation whose VM or
/// committed memory is larger than a run with `--mem cap` could have is refused.
pub(super) fn check_memory_cap(m: &Manifest, cap: u64) -> Result<(), String> {
    let ram = m.memory.ram_bytes.saturating_sub(SYSTEM_SIZE);
    let committed = m
        .kernel
        .address_spaces
        .iter()
        .fold(0u64, |sum, mm| sum.saturating_add(mm.committed));
    if ram > Kernel::ram_for(cap) || committed > cap {
        return Err(format!(
            "it needs {} MiB of guest RAM ({} MiB committed), more than --mem {} MiB allows",
            ram >> 20,
            committed >> 20,
            cap >> 20
        ));
    }
    Ok(())
}
