//! vmctl: the vmwrap VMM. It runs a job's programs at CPL3 inside a KVM VM and is
//! their kernel: syscalls and faults exit to vmctl, which services them on the host.

mod checkpoint;
mod cli;
mod clock;
mod control;
mod events;
mod iov;
mod kernel;
mod machine;
mod runner;
mod syscalls;

fn main() {
    events::init_from_env();
    std::process::exit(cli::main());
}
