//! `vmctl run`: start a program in a fresh VM and wait for it.

use super::size::parse_size;
use super::EXIT_VMCTL_FAILED;
use crate::kernel::loader::resolve_program;
use crate::kernel::{Kernel, KernelError, Launch};
use crate::machine::layout::MAX_RAM;
use crate::machine::{open_kvm, KvmSource, Vm};
use clap::Args;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Guest memory limit (e.g. 512M, 8G). Default: half of the host's RAM
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub mem: Option<u64>,

    /// Use this inherited descriptor, already open on /dev/kvm, instead of opening it
    #[arg(long, value_name = "N")]
    pub kvm_fd: Option<i32>,

    /// The program to run, found in PATH like a shell would
    #[arg(required = true)]
    pub program: std::ffi::OsString,

    /// Arguments for the program
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<std::ffi::OsString>,
}

/// Half the host's RAM, the default guest memory limit.
fn default_mem() -> u64 {
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
            MAX_RAM >> 31
        );
        return EXIT_VMCTL_FAILED;
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
    let source = match args.kvm_fd {
        Some(fd) => KvmSource::InheritedFd(fd),
        None => KvmSource::Open,
    };
    let kvm = match open_kvm(source) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("vmctl: {e}");
            return EXIT_VMCTL_FAILED;
        }
    };
    let vm = match Vm::new(kvm, Kernel::ram_for(mem)) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("vmctl: {e}");
            return EXIT_VMCTL_FAILED;
        }
    };
    let mut argv = vec![args.program.as_bytes().to_vec()];
    argv.extend(args.args.into_iter().map(|a| a.into_vec()));
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
    let result = Kernel::boot(vm, &launch).and_then(|mut k| k.run());
    match result {
        Ok(status) => status.shell_code(),
        Err(KernelError::Exec(e)) => {
            eprintln!("vmctl: {e}");
            e.exit_code()
        }
        Err(e) => {
            eprintln!("vmctl: {e}");
            EXIT_VMCTL_FAILED
        }
    }
}
