//! vmctl: the vmwrap VMM. It runs a job's programs at CPL3 inside a KVM VM and is
//! their kernel: syscalls and faults exit to vmctl, which services them on the host.

mod checkpoint;
mod cli;
mod clock;
mod control;
mod events;
mod filejournal;
mod iov;
mod kernel;
mod machine;
mod runner;
mod syscalls;

fn main() {
    // Nothing else may reach into vmctl: not ptrace, pidfd_getfd (the /dev/kvm
    // descriptor a privileged launcher granted) or /proc/<pid>/mem by another process
    // of the same user, and no core dump of guest memory. It also makes vmctl's
    // /proc entries root-owned; vmctl itself still reads its own.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    events::init_from_env();
    std::process::exit(cli::main());
}
