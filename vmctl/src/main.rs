//! vmctl: the vmwrap VMM. It runs a job's programs at CPL3 inside a KVM VM and is
//! their kernel: syscalls and faults exit to vmctl, which services them on the host.

mod cli;
mod kernel;
mod machine;
mod syscalls;

fn main() {
    std::process::exit(cli::main());
}
