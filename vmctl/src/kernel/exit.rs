//! The end of a process: what its last thread does on the way out, and what its
//! parent collects with wait4/waitid.

use super::process::ExitStatus;
use super::signals::{QueuedSig, SA_NOCLDWAIT, SIG_IGN};
use super::task::Task;
use super::thread_group::{Life, ThreadGroup};
use std::sync::{Arc, Mutex};

/// The parent of orphans: not a process of the job, so they are reaped as soon as
/// they end, as an init process would.
pub const REAPER_PID: i32 = 1;

const CLD_EXITED: i32 = 1;
const CLD_KILLED: i32 = 2;

/// The si_code and si_status a parent sees for `status`.
pub fn child_info(status: ExitStatus) -> (i32, i32) {
    match status {
        ExitStatus::Code(c) => (CLD_EXITED, c & 0xff),
        ExitStatus::Signal(s) => (CLD_KILLED, s),
    }
}

/// The status word wait4 reports.
pub fn wait_status(status: ExitStatus) -> i32 {
    match status {
        ExitStatus::Code(c) => (c & 0xff) << 8,
        ExitStatus::Signal(s) => s & 0x7f,
    }
}

/// Called by the last thread of a process: releases what only it held, turns it into
/// a zombie for its parent (or reaps it), and hands its children to the reaper.
pub fn process_exit(t: &mut Task, status: ExitStatus) {
    let k = t.k.clone();
    let tg = t.tg().clone();
    // The address space goes with its last user: a vfork child still shares its
    // parent's, threads of an exec'd process are already gone.
    let mm = std::mem::replace(
        &mut t.res.mm,
        Arc::new(Mutex::new(super::mm::AddressSpace::empty())),
    );
    if let Ok(m) = Arc::try_unwrap(mm) {
        let mm = m.into_inner().expect("address space poisoned");
        t.with_mm(|_, ctx| mm.release(ctx));
        k.flush_released();
    }
    // Descriptors close when their table's last user goes.
    t.res.files = Arc::new(Mutex::new(super::files::FdTable::default()));
    k.timers.cancel_all(tg.tgid);
    let (ppid, exit_signal) = {
        let mut st = tg.lock();
        st.life = Life::Zombie(status);
        st.vfork_done = true;
        (st.ppid, st.exit_signal)
    };
    let mut pids = k.pids.lock().expect("pids poisoned");
    // Orphans go to the reaper; those already dead are reaped now, and those that
    // asked for it (PR_SET_PDEATHSIG) get their signal.
    let mut dead_orphans = Vec::new();
    let mut to_signal = Vec::new();
    for g in pids.groups.values() {
        if g.tgid == tg.tgid {
            continue;
        }
        let mut st = g.lock();
        if st.ppid == tg.tgid {
            st.ppid = REAPER_PID;
            if st.is_zombie() {
                dead_orphans.push(g.tgid);
            } else if st.pdeath_signal != 0 {
                to_signal.push((g.clone(), st.pdeath_signal));
            }
        }
    }
    for pid in dead_orphans {
        pids.groups.remove(&pid);
    }
    let parent = pids.group(ppid).cloned();
    let reap_now = match &parent {
        Some(p) => {
            let st = p.lock();
            let act = st.actions[libc::SIGCHLD as usize];
            act.handler == SIG_IGN || act.flags & SA_NOCLDWAIT != 0 || st.is_zombie()
        }
        None => true,
    };
    if reap_now {
        pids.groups.remove(&tg.tgid);
    }
    let root = pids.root;
    drop(pids);
    for (g, sig) in to_signal {
        k.signal_group(
            &g,
            sig,
            QueuedSig {
                code: 0x80, // SI_KERNEL
                ..Default::default()
            },
        );
    }
    if let Some(p) = parent {
        if exit_signal > 0 && exit_signal <= 64 {
            let (code, st) = child_info(status);
            k.signal_group(
                &p,
                exit_signal,
                QueuedSig {
                    code,
                    pid: tg.tgid,
                    uid: k.host.uid,
                    status: st,
                },
            );
        }
        wake_all(&p);
    }
    if tg.tgid == root {
        k.job_end(status);
    }
}

/// Wakes every thread of `tg` (a parent in wait4, a vfork parent).
pub fn wake_all(tg: &ThreadGroup) {
    for t in tg.lock().threads.iter() {
        t.wake();
    }
}
