//! vmwrap SPANK plugin: `--vm-wrap[=OPTS]` for sbatch, salloc and srun runs
//! the batch script and each srun step's tasks under `vmctl`, which checkpoints them so a
//! requeued or preempted job resumes where it stopped.
//!
//! Only the pure parts (option parsing, directory layout, the vmctl command
//! line) are built for unit tests: the hooks call into Slurm, whose symbols
//! exist only inside the Slurm programs that load the plugin.

// The hooks that use the pure modules are not built for unit tests (above).
#![cfg_attr(test, allow(dead_code))]

mod batch;
mod dirs;
mod events;
mod launch;
mod options;
mod resume;

#[cfg(not(test))]
mod hooks;
#[cfg(not(test))]
mod spank;
#[cfg(not(test))]
mod steer;

#[cfg(not(test))]
pub use exports::*;

/// The symbols Slurm's plugin loader looks up by name (what the C macro
/// SPANK_PLUGIN() defines).
#[cfg(not(test))]
#[allow(non_upper_case_globals)]
mod exports {
    use crate::spank::sys::SLURM_VERSION_NUMBER;

    /// Read by Slurm as a C string: `const char plugin_name[]`.
    #[no_mangle]
    pub static plugin_name: [u8; 7] = *b"vmwrap\0";
    #[no_mangle]
    pub static plugin_type: [u8; 6] = *b"spank\0";
    /// Slurm refuses a plugin built against another release.
    #[no_mangle]
    pub static plugin_version: u32 = SLURM_VERSION_NUMBER;
    #[no_mangle]
    pub static spank_plugin_version: u32 = 1;
}
