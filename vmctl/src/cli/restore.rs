//! `vmctl restore DIR`: resume a job from its newest usable checkpoint.

use super::options::{CheckpointArgs, KvmArgs};
use super::{open_kvm_or_report, EXIT_VMCTL_FAILED};
use crate::checkpoint::format::Manifest;
use crate::checkpoint::incremental::Restored;
use crate::checkpoint::lazy::{self, Userfaultfd};
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

    /// Whether the job runs again before its memory is loaded: on (memory loads in
    /// the background, pages the job touches first; a damaged chunk found then stops
    /// the job with exit status 125), off (everything is loaded and verified first, and
    /// a damaged generation falls back to an older one), auto (on when the memory
    /// images add up to 256 MiB or more and a userfaultfd can be had)
    #[arg(long, value_name = "WHEN", default_value = "auto", value_parser = ["auto", "on", "off"])]
    pub lazy: String,

    /// Use this inherited descriptor, open on /dev/userfaultfd (root's), for --lazy:
    /// ordinary users cannot open it themselves
    #[arg(long, value_name = "N")]
    pub uffd_fd: Option<i32>,

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
    let lazy = match args.lazy.as_str() {
        "on" => Lazy::On,
        "off" => Lazy::Off,
        _ => Lazy::Auto,
    };
    if let Some(fd) = args.uffd_fd {
        // Root's descriptor is vmctl's alone: never passed on to anything it executes.
        // SAFETY: F_SETFD on a number; an unopened one just fails.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            eprintln!(
                "vmctl: --uffd-fd {fd}: not an open descriptor; give one open on /dev/userfaultfd"
            );
            return EXIT_VMCTL_FAILED;
        }
    }
    if lazy == Lazy::On {
        if let Err(e) = Userfaultfd::open(args.uffd_fd) {
            eprintln!("vmctl: --lazy=on: {e}; or use --lazy=auto");
            return EXIT_VMCTL_FAILED;
        }
    }
    let Some(kvm) = open_kvm_or_report(&args.kvm) else {
        return EXIT_VMCTL_FAILED;
    };
    let waited = crate::runner::setup_signals(&args.checkpoint.on_signal);
    let files = args.checkpoint.files;
    let newest = candidates[0];
    for g in candidates {
        let started = crate::clock::monotonic_ns();
        let result = try_generation(&kvm, &dir, g, cap, files, lazy, args.uffd_fd);
        let seconds = (crate::clock::monotonic_ns() - started) as f64 / 1e9;
        match result {
            Ok((kernel, tasks, meta, chain, bytes)) => {
                let kind = if g == newest { "restore" } else { "fallback" };
                events::emit(&dir, &Event::new(kind, g, bytes, seconds));
                if g != newest {
                    eprintln!("vmctl: restored generation {g}, the newest usable one");
                }
                kernel.set_reexec_programs(&args.checkpoint.reexec);
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Lazy {
    On,
    Off,
    Auto,
}

/// With --lazy=auto, the smallest chain restored lazily: below it an eager restore
/// takes a fraction of a second and keeps the fallback to an older generation.
const LAZY_AUTO_MIN_BYTES: u64 = 256 << 20;

/// Restores generation `g` (with every generation it builds on), capped by `cap`;
/// with `files`, first brings the job's files back to it (see crate::filejournal), or
/// refuses it if they cannot be.
fn try_generation(
    kvm: &kvm_ioctls::Kvm,
    dir: &std::path::Path,
    g: u64,
    cap: u64,
    files: crate::filejournal::Policy,
    lazy: Lazy,
    uffd_fd: Option<i32>,
) -> Result<RestoredJob, String> {
    let mut links = read::load_chain(dir, g).map_err(|e| e.to_string())?;
    let newest = links.last().expect("a chain holds its generation");
    // Every link has the newest one's RAM size (load_chain checks it), and only the
    // newest one's kernel state is restored: its sizes are the ones to cap.
    check_memory_cap(&newest.manifest, cap)?;
    let ram = newest.manifest.memory.ram_bytes.saturating_sub(SYSTEM_SIZE);
    let vm = Vm::new(kvm, ram).map_err(|e| e.to_string())?;
    read::check_cpu(&newest.manifest, vm.xcr0()).map_err(|e| e.to_string())?;
    let bytes = links.iter().map(|l| l.manifest.memory.data_bytes).sum();
    let uffd = match lazy {
        Lazy::Off => None,
        Lazy::On => Some(Userfaultfd::open(uffd_fd).map_err(|e| format!("--lazy=on: {e}"))?),
        Lazy::Auto if bytes < LAZY_AUTO_MIN_BYTES => None,
        Lazy::Auto => Userfaultfd::open(uffd_fd).ok(),
    };
    let journal = files.mode != crate::filejournal::Mode::None
        && links.last().is_some_and(|l| l.manifest.files.is_some());
    let bring_files_back = || -> Result<_, String> {
        let plan = journal
            .then(|| crate::filejournal::undo::plan(dir, g))
            .transpose()?;
        if let Some(plan) = &plan {
            plan.apply()?;
            plan.abandon_newer(dir);
        }
        Ok(plan)
    };
    let mut plan = None;
    let mut loading = None;
    if let Some(uffd) = uffd {
        // The files are brought back before the memory starts loading, so that a
        // damaged chunk found meanwhile (which ends the process) never interrupts that.
        // It then ends the job as a crash right after the restore would: undoing the
        // journals again, down to an older generation, still leads back to it.
        plan = bring_files_back()?;
        let report_dir = dir.to_path_buf();
        loading = lazy::start(&links, vm.memory(), uffd, move |failure| {
            let why = lazy::describe(&failure, &report_dir);
            events::emit(
                &report_dir,
                &Event::new("restore", failure.generation, 0, 0.0).failed(&why),
            );
            eprintln!("vmctl: {why}");
            std::process::exit(EXIT_VMCTL_FAILED);
        })
        .map_err(|e| e.to_string())?;
    }
    if loading.is_none() {
        read::load_chain_memory(&links, vm.memory()).map_err(|e| e.to_string())?;
        // Everything is checked before any file is touched, unless a lazy start that
        // then found the chain unsuited brought the files back already: never twice.
        if plan.is_none() {
            plan = bring_files_back()?;
        }
    }
    // RAM now equals the generation (or will, as the lazy load goes on); later host
    // writes (the kernel's restore included) are tracked from here on.
    vm.memory().clear_host_dirty();
    // Continuing the chain needs a digest of every page as the generation holds it,
    // which a lazy restore does not have before the load ends: after a lazy restore
    // the next checkpoint starts a new chain with a full generation.
    let chain = if loading.is_some() {
        None
    } else {
        Restored::of(&links)
    };
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
    if let Some(load) = loading {
        load.keep();
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
