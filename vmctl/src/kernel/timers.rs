//! The guest's interval timers (setitimer, alarm). They are per process and belong
//! to the guest, so they cannot be vmctl's own host timers: one helper thread keeps
//! every armed timer and sends its process the signal when it expires.
//!
//! ITIMER_VIRTUAL and ITIMER_PROF count the process's CPU time on Linux; here they
//! count guest CLOCK_MONOTONIC time, which is the same for a process that computes
//! and fires early for one that sleeps.

use super::signals::QueuedSig;
use super::Kernel;
use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

pub const SIGNALS: [i32; 3] = [libc::SIGALRM, libc::SIGVTALRM, libc::SIGPROF];

#[derive(Default)]
pub struct Timers {
    /// (guest monotonic deadline, tgid, which)
    armed: Mutex<BTreeSet<(i64, i32, usize)>>,
    cv: Condvar,
}

impl Timers {
    /// Arms (or, with deadline 0, disarms) timer `which` of process `tgid`.
    pub fn set(&self, tgid: i32, which: usize, deadline_ns: i64) {
        let mut a = self.armed.lock().expect("timers poisoned");
        a.retain(|&(_, p, w)| !(p == tgid && w == which));
        if deadline_ns != 0 {
            a.insert((deadline_ns, tgid, which));
        }
        self.cv.notify_all();
    }

    pub fn cancel_all(&self, tgid: i32) {
        let mut a = self.armed.lock().expect("timers poisoned");
        a.retain(|&(_, p, _)| p != tgid);
    }

    /// Starts the thread that fires timers for `k`'s processes.
    pub fn start(k: &Arc<Kernel>) {
        let weak: Weak<Kernel> = Arc::downgrade(k);
        std::thread::Builder::new()
            .name("vmctl-timers".into())
            .spawn(move || {
                crate::control::signals::block_in_this_thread();
                loop {
                    let Some(k) = weak.upgrade() else { return };
                    let due = k.timers.next_due(k.guest_monotonic_ns());
                    for (tgid, which) in due {
                        k.fire_timer(tgid, which);
                    }
                }
            })
            .expect("spawn timer thread");
    }

    /// Waits (at most a second) for the first timer to expire and returns the
    /// expired ones, taken out of the set.
    fn next_due(&self, now: i64) -> Vec<(i32, usize)> {
        let mut a = self.armed.lock().expect("timers poisoned");
        let wait = match a.first() {
            Some(&(d, _, _)) if d <= now => 0,
            Some(&(d, _, _)) => (d - now).min(1_000_000_000),
            None => 1_000_000_000,
        };
        if wait > 0 {
            drop(
                self.cv
                    .wait_timeout(a, Duration::from_nanos(wait as u64))
                    .expect("timers poisoned"),
            );
            return Vec::new();
        }
        let mut due = Vec::new();
        while let Some(&(d, p, w)) = a.first() {
            if d > now {
                break;
            }
            a.pop_first();
            due.push((p, w));
        }
        due
    }
}

impl Kernel {
    /// Timer `which` of `tgid` expired: signal the process and arm the next period.
    fn fire_timer(&self, tgid: i32, which: usize) {
        let group = self
            .pids
            .lock()
            .expect("pids poisoned")
            .group(tgid)
            .cloned();
        let Some(g) = group else { return };
        let next = {
            let mut st = g.lock();
            if st.is_zombie() {
                return;
            }
            let t = &mut st.itimers[which];
            if t.interval_ns > 0 {
                t.deadline_ns += t.interval_ns;
                let now = self.guest_monotonic_ns();
                if t.deadline_ns < now {
                    t.deadline_ns = now + t.interval_ns;
                }
            } else {
                t.deadline_ns = 0;
            }
            t.deadline_ns
        };
        if next != 0 {
            self.timers.set(tgid, which, next);
        }
        self.signal_group(
            &g,
            SIGNALS[which],
            QueuedSig {
                code: 0x80, // SI_KERNEL
                ..Default::default()
            },
        );
    }
}
