//! `VMCTL_COUNT_EXITS=1`: counts the guest's exits to vmctl, over every task of the
//! job, and prints them when the job ends, as one line on stderr: `vmctl: exits
//! {"total":N,"syscalls":{"name":n,..},"exceptions":n,"interrupts":n,
//! "clock_max_error_ns":n}`. Tests use it to show that clock reads go through the
//! vDSO; it also shows where a slow job spends its exits.

use crate::machine::Exit;
use std::sync::atomic::{AtomicU64, Ordering};

/// Syscall numbers counted one by one; any higher number is counted as `other`.
const COUNTED_SYSCALLS: usize = 512;

pub struct ExitCounter {
    /// Indexed by syscall number; the last slot holds every number past the others.
    /// Atomic because every task's host thread counts into it: an exit costs tens of
    /// microseconds here, an uncontended atomic add a few nanoseconds.
    syscalls: Vec<AtomicU64>,
    exceptions: AtomicU64,
    interrupts: AtomicU64,
}

impl ExitCounter {
    pub fn from_env() -> Option<ExitCounter> {
        std::env::var_os("VMCTL_COUNT_EXITS")
            .filter(|v| v != "0" && !v.is_empty())
            .map(|_| ExitCounter {
                syscalls: (0..=COUNTED_SYSCALLS).map(|_| AtomicU64::new(0)).collect(),
                exceptions: AtomicU64::new(0),
                interrupts: AtomicU64::new(0),
            })
    }

    /// Counts one exit; `nr` is the syscall number for a syscall exit.
    pub fn count(&self, exit: &Exit, nr: u64) {
        let counter = match exit {
            Exit::Syscall => &self.syscalls[(nr as usize).min(COUNTED_SYSCALLS)],
            // Accesses to memory that is not there end up as faults in the guest.
            Exit::Exception { .. } | Exit::BadAccess { .. } | Exit::BadMemory => &self.exceptions,
            Exit::Interrupted => &self.interrupts,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Prints the counts, with the largest gap the vDSO's clocks had to the host's.
    pub fn report(&self, clock_max_error_ns: i64) {
        let mut total = 0;
        let mut syscalls = serde_json::Map::new();
        for (nr, n) in self.syscalls.iter().enumerate() {
            let n = n.load(Ordering::Relaxed);
            if n == 0 {
                continue;
            }
            total += n;
            let name = if nr == COUNTED_SYSCALLS {
                "other".to_string()
            } else {
                crate::syscalls::name(nr as u64).to_string()
            };
            // Numbers without a name share one entry ("unknown").
            let before = syscalls.get(&name).and_then(|v| v.as_u64()).unwrap_or(0);
            syscalls.insert(name, (before + n).into());
        }
        let exceptions = self.exceptions.load(Ordering::Relaxed);
        let interrupts = self.interrupts.load(Ordering::Relaxed);
        eprintln!(
            "vmctl: exits {}",
            serde_json::json!({
                "total": total + exceptions + interrupts,
                "syscalls": syscalls,
                "exceptions": exceptions,
                "interrupts": interrupts,
                "clock_max_error_ns": clock_max_error_ns,
            })
        );
    }
}
