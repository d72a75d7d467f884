//! `vmctl restore DIR`: resume a job from its newest usable checkpoint.

use super::options::{CheckpointArgs, KvmArgs};
use super::{open_kvm_or_report, EXIT_VMCTL_FAILED};
use crate::checkpoint::format::Manifest;
use crate::checkpoint::incremental::Restored;
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
    let files = args.checkpoint.files;
    let newest = candidates[0];
    for g in candidates {
        let started = crate::clock::monotonic_ns();
        let result = try_generation(&kvm, &dir, g, cap, files);
        let seconds = (crate::clock::monotonic_ns() - started) as f64 / 1e9;
        match result {
            Ok((kernel, tasks, meta, chain, bytes)) => {
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
                    Ok(mut r) => {
                        if let Some(c) = &chain {
                            r.continue_chain(c);
                        }
                        r.run()
                    }
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

/// A restored job: its kernel, tasks, description, the chain it came from and the
/// bytes of memory image read (the whole chain's).
type RestoredJob = (Arc<Kernel>, Vec<Task>, JobMeta, Option<Restored>, u64);

/// Restores generation `g` (with every generation it builds on), capped by `cap`;
/// with `files`, first brings the job's files back to it (see crate::filejournal), or
/// refuses it if they cannot be.
fn try_generation(
    kvm: &kvm_ioctls::Kvm,
    dir: &std::path::Path,
    g: u64,
    cap: u64,
    files: crate::filejournal::Policy,
) -> Result<RestoredJob, String> {
    let mut links = read::load_chain(dir, g).map_err(|e| e.to_string())?;
    let newest = links.last().expect("a chain holds its generation");
    // Every link has the newest one's RAM size (load_chain checks it), and only the
    // newest one's kernel state is restored: its sizes are the ones to cap.
    check_memory_cap(&newest.manifest, cap)?;
    let ram = newest.manifest.memory.ram_bytes.saturating_sub(SYSTEM_SIZE);
    let vm = Vm::new(kvm, ram).map_err(|e| e.to_string())?;
    read::check_cpu(&newest.manifest, vm.xcr0()).map_err(|e| e.to_string())?;
    read::load_chain_memory(&links, vm.memory()).map_err(|e| e.to_string())?;
    // RAM now equals the generation; later host writes (the kernel's restore included)
    // are tracked from here on.
    vm.memory().clear_host_dirty();
    // Everything is checked before any file is touched.
    let undo_files = files.mode != crate::filejournal::Mode::None;
    let plan = match (&newest.manifest.files, undo_files) {
        (Some(_), true) => Some(crate::filejournal::undo::plan(dir, g)?),
        _ => None,
    };
    if let Some(plan) = &plan {
        plan.apply()?;
        plan.abandon_newer(dir);
    }
    let chain = Restored::of(&links);
    let bytes = links.iter().map(|l| l.manifest.memory.data_bytes).sum();
    let newest = links.pop().expect("a chain holds its generation").manifest;
    let meta = JobMeta {
        program: newest.program,
        argv: newest.argv,
    };
    let mut state = newest.kernel;
    state.commit_limit = state.commit_limit.min(cap);
    let (kernel, tasks) = Kernel::restore(vm, state).map_err(|e| e.to_string())?;
    kernel.files_journal.set_policy(files);
    if let Some(plan) = &plan {
        kernel.files_journal.resume(
            &dir.join(crate::checkpoint::format::generation_dir_name(g)),
            g,
            &plan.entries,
        )?;
    }
    Ok((kernel, tasks, meta, chain, bytes))
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
