//! The `vmctl` command line.

mod bench;
mod check;
mod checkpoint;
mod cpu_class;
mod docs;
mod fuzz;
mod gc;
mod inspect;
mod options;
mod pin_class;
mod restore;
mod run;
pub mod size;
mod status;

use clap::{Parser, Subcommand};

/// Exit status when vmctl itself fails (bad option, no KVM, internal error), following
/// the convention of env(1) and timeout(1); 126 and 127 keep their shell meanings.
pub const EXIT_VMCTL_FAILED: i32 = 125;

#[derive(Parser, Debug)]
#[command(
    name = "vmctl",
    version,
    about = "Run a program inside a KVM virtual machine whose kernel is vmctl itself",
    after_help = "Exit status of run and restore: the program's own status (128+N if it was \
                  killed by signal N); 75 after --on-signal SIG=checkpoint-exit; 125 if vmctl \
                  failed; 126 if the program cannot be executed; 127 if it was not found."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run PROGRAM in a new VM
    #[command(
        after_help = "Environment: VMCTL_COUNT_EXITS=1 prints, when the job ends, its \
                            exits to vmctl (per syscall, faults, interruptions; summed over \
                            all its processes and threads) and the clocks' largest measured \
                            error. VMCTL_VDSO=0 leaves out the guest's vDSO, so that every \
                            clock read is a syscall. VMCTL_TRACE_FREEZE=1 prints when each \
                            phase of a pre-copy checkpoint's frozen part ends."
    )]
    Run(run::RunArgs),
    /// Resume a job from its newest usable checkpoint in DIR
    #[command(
        after_help = "Environment: VMCTL_COUNT_EXITS=1 prints, when the job ends, its \
                            exits to vmctl, and VMCTL_TRACE_FREEZE=1 the frozen phases of \
                            pre-copy checkpoints, as for run. VMCTL_LAZY_STATS=1 prints, when \
                            a lazy restore's background load ends, how long it took and how \
                            many 2 MiB regions the job asked for first."
    )]
    Restore(restore::RestoreArgs),
    /// Ask the job running with --checkpoint-dir DIR for a checkpoint
    Checkpoint(checkpoint::CheckpointCmd),
    /// List and verify the checkpoints in DIR
    Inspect(inspect::InspectArgs),
    /// Remove checkpoint directories (ROOT/<user>/<jobid>) of jobs Slurm no longer knows
    Gc(gc::GcArgs),
    /// Show each wrapped Slurm job's newest checkpoint, its size and age, and what a drain would write
    #[command(
        after_help = "Run it as root (or as a job's owner for their own jobs) on a host that \
                            sees the checkpoint root and can reach slurmctld. Each job's directory \
                            is read as the job's user. Exit status: 0 every job shown; 1 some \
                            job's checkpoints could not be read; 125 vmctl failed (squeue or \
                            scontrol failed, an unknown JOBID)."
    )]
    Status(status::StatusArgs),
    /// Check whether this node can run, checkpoint and restore wrapped jobs
    #[command(
        after_help = "Exit status: 0 all items ok; 1 some item failed (the node cannot \
                            wrap or restore jobs as configured); 2 warnings only; 125 vmctl failed."
    )]
    Check(check::CheckArgs),
    /// Print this node's CPU class, for the nodes' Features in slurm.conf
    CpuClass(cpu_class::CpuClassArgs),
    /// Pin a requeued job to this node's CPU class (run by the SPANK plugin)
    #[command(hide = true)]
    PinClass(pin_class::PinClassArgs),
    /// Write man pages and shell completions (run by contrib/build-deb)
    #[command(hide = true)]
    GenerateDocs(docs::GenerateDocsArgs),
    /// Time bare guest exits (for benchmarks)
    #[command(hide = true)]
    BenchExits(bench::BenchExitsArgs),
    /// Mutation test of the checkpoint reader (for tests and developers)
    #[command(hide = true)]
    FuzzReader(fuzz::FuzzReaderArgs),
}

/// Opens /dev/kvm (or takes the inherited descriptor), reporting failure on stderr.
pub fn open_kvm_or_report(args: &options::KvmArgs) -> Option<kvm_ioctls::Kvm> {
    use crate::machine::{open_kvm, KvmSource};
    let source = match args.kvm_fd {
        Some(fd) => KvmSource::InheritedFd(fd),
        None => KvmSource::Open,
    };
    match open_kvm(source) {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("vmctl: {e}");
            None
        }
    }
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    0
                }
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = e.print();
                    EXIT_VMCTL_FAILED
                }
                _ => {
                    let msg = e.render().to_string();
                    let first = msg.lines().next().unwrap_or("invalid arguments");
                    let first = first.strip_prefix("error: ").unwrap_or(first);
                    eprintln!("vmctl: {first} (see 'vmctl --help')");
                    EXIT_VMCTL_FAILED
                }
            };
        }
    };
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Restore(args) => restore::restore(args),
        Command::Checkpoint(args) => checkpoint::checkpoint(args),
        Command::Inspect(args) => inspect::inspect(args),
        Command::Gc(args) => gc::gc(args),
        Command::Status(args) => status::status(args),
        Command::Check(args) => check::check(args),
        Command::CpuClass(args) => cpu_class::cpu_class(args),
        Command::PinClass(args) => pin_class::pin_class(args),
        Command::GenerateDocs(args) => docs::generate(args),
        Command::BenchExits(args) => bench::bench_exits(args),
        Command::FuzzReader(args) => fuzz::fuzz_reader(args),
    }
}
