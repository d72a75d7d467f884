//! `vmctl run`: start a program in a fresh VM and wait for it.

use super::options::{CheckpointArgs, KvmArgs};
use super::size::parse_size;
use super::{open_kvm_or_report, EXIT_VMCTL_FAILED};
use crate::kernel::loader::resolve_program;
use crate::kernel::{Kernel, KernelError, Launch};
use crate::machine::layout::MAX_RAM;
use crate::machine::Vm;
use crate::runner::{JobMeta, Runner};
use clap::Args;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Guest memory limit (e.g. 512M, 8G). Default: half of the host's RAM
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub mem: Option<u64>,

    #[command(flatten)]
    pub kvm: KvmArgs,

    /// Directory for this job's checkpoints (created 0700 if missing)
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,

    #[command(flatten)]
    pub checkpoint: CheckpointArgs,

    /// The program to run, found in PATH like a shell would
    #[arg(required = true)]
    pub program: std::ffi::OsString,

    /// Arguments for the program
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<std::ffi::OsString>,
}

/// Half the host's RAM, the default guest memory limit.
pub(super) fn default_mem() -> u64 {
    // SAFETY: sysinfo fills the local struct.
    let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
    unsafe { libc::sysinfo(&mut si) };
    let total = si.totalram as u64 * si.mem_unit.max(1) as u64;
    (total / 2).clamp(256 << 20, MAX_RAM / 2)
}

pub fn run(args: RunArgs) -> i32 {
    let mem = args.mem.unwrap_or_else(default_mem);
    if Kernel::ram_for(mem) > MAX_RAM {
        eprintln!(
            "vmctl: --mem {mem} is larger than the {} GiB a VM supports; choose a smaller --mem",
            MAX_RAM >> 30
        );
        return EXIT_VMCTL_FAILED;
    }
    let ckpt = match args.checkpoint.options(args.checkpoint_dir.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmctl: {e}");
            return EXIT_VMCTL_FAILED;
        }
    };
    let mut ckpt = ckpt;
    if let Some(c) = &mut ckpt {
        if let Err(e) = crate::runner::prepare_dir(&c.dir) {
            eprintln!("vmctl: {e}");
            return EXIT_VMCTL_FAILED;
        }
        // Resolved once, now: the guest changes the working directory (vmctl's), and
        // a relative path must not follow it.
        match std::fs::canonicalize(&c.dir) {
            Ok(d) => c.dir = d,
            Err(e) => {
                eprintln!("vmctl: --checkpoint-dir {}: {e}", c.dir.display());
                return EXIT_VMCTL_FAILED;
            }
        }
    }
    let name = args.program.to_string_lossy().into_owned();
    let path_env = std::env::var_os("PATH");
    let program = match resolve_program(&name, path_env.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vmctl: {e}");
            return e.exit_code();
        }
    };
    let Some(kvm) = open_kvm_or_report(&args.kvm) else {
        return EXIT_VMCTL_FAILED;
    };
    let vm = match Vm::new(&kvm, Kernel::ram_for(mem)) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("vmctl: {e}");
            return EXIT_VMCTL_FAILED;
        }
    };
    let mut argv = vec![args.program.as_bytes().to_vec()];
    argv.extend(args.args.into_iter().map(|a| a.into_vec()));
    let meta = JobMeta {
        program: std::fs::canonicalize(&program)
            .unwrap_or_else(|_| program.clone())
            .display()
            .to_string(),
        argv: argv
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    };
    let envp = std::env::vars_os()
        .map(|(k, v)| {
            let mut e = k.into_vec();
            e.push(b'=');
            e.extend(v.into_vec());
            e
        })
        .collect();
    let launch = Launch {
        program,
        argv,
        envp,
        mem,
    };
    let waited = crate::runner::setup_signals(&args.checkpoint.on_signal);
    let (kernel, task) = match Kernel::boot(vm, &launch) {
        Ok(k) => k,
        Err(KernelError::Exec(e)) => {
            eprintln!("vmctl: {e}");
            return e.exit_code();
        }
        Err(e) => {
            eprintln!("vmctl: {e}");
            return EXIT_VMCTL_FAILED;
        }
    };
    kernel.files_journal.set_policy(args.checkpoint.files);
    kernel.set_reexec_programs(&args.checkpoint.reexec);
    match Runner::new(
        kernel,
        vec![task],
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
    }
}
