//! Stopping every task at a clean point for a checkpoint.
//!
//! The main thread raises the freeze; each task notices it between two exits (a
//! blocking call it was in is interrupted and will be restarted), records its
//! state here and waits. The state is then consistent: every thread is in user mode
//! or at the start of a restartable syscall.

use super::signals::ThreadSignals;
use super::task::ThreadState;
use crate::machine::VcpuState;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// A frozen task as a checkpoint records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskSnapshot {
    pub tid: i32,
    pub tgid: i32,
    pub vcpu: VcpuState,
    pub thread: ThreadState,
    pub signals: ThreadSignals,
    pub comm: [u8; 16],
}

#[derive(Default)]
struct State {
    parked: BTreeMap<i32, TaskSnapshot>,
    /// Bumped by every thaw; parked tasks wait for it to change.
    generation: u64,
}

#[derive(Default)]
pub struct Freezer {
    active: AtomicBool,
    state: Mutex<State>,
    cv: Condvar,
}

impl Freezer {
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    pub fn begin(&self) {
        self.active.store(true, Ordering::SeqCst);
    }

    /// Called by a task at a clean point: records it and waits for the thaw.
    pub fn park(&self, snap: TaskSnapshot) {
        let tid = snap.tid;
        let mut st = self.state.lock().expect("freezer poisoned");
        st.parked.insert(tid, snap);
        let generation = st.generation;
        self.cv.notify_all();
        while st.generation == generation {
            st = self.cv.wait(st).expect("freezer poisoned");
        }
    }

    pub fn is_parked(&self, tid: i32) -> bool {
        self.state
            .lock()
            .expect("freezer poisoned")
            .parked
            .contains_key(&tid)
    }

    /// A task ended (the count the main thread waits for changed).
    pub fn task_gone(&self) {
        let _st = self.state.lock().expect("freezer poisoned");
        self.cv.notify_all();
    }

    /// Waits until every task in `live()` is parked, and returns their snapshots.
    pub fn wait_all(&self, live: impl Fn() -> Vec<i32>) -> Vec<TaskSnapshot> {
        let mut st = self.state.lock().expect("freezer poisoned");
        loop {
            let tids = live();
            if tids.iter().all(|t| st.parked.contains_key(t)) {
                return tids.iter().map(|t| st.parked[t].clone()).collect();
            }
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(20))
                .expect("freezer poisoned")
                .0;
        }
    }

    /// Lets every parked task run again.
    pub fn thaw(&self) {
        self.active.store(false, Ordering::SeqCst);
        let mut st = self.state.lock().expect("freezer poisoned");
        // A task that has not woken yet must not look parked to the next freeze.
        st.parked.clear();
        st.generation += 1;
        self.cv.notify_all();
    }
}
