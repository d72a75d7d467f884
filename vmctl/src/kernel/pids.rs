//! The guest's pid space. Pids and tids are the guest's own, drawn from one space
//! that vmctl owns, so they stay the same when a job is restored on another node and
//! never name a host process.

use super::task::TaskHandle;
use super::thread_group::ThreadGroup;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Linux's default pid_max: pids wrap below it.
const PID_MAX: i32 = 4_194_304;

#[derive(Default)]
pub struct PidTable {
    /// Every process that has not been reaped, zombies included.
    pub groups: BTreeMap<i32, Arc<ThreadGroup>>,
    /// Every live thread.
    pub tasks: BTreeMap<i32, Arc<TaskHandle>>,
    /// The next pid to try.
    pub next: i32,
    /// The job's first process: when it ends, the job ends.
    pub root: i32,
}

impl PidTable {
    /// A pid no process or thread uses.
    pub fn alloc(&mut self) -> i32 {
        loop {
            let pid = self.next;
            self.next = if self.next + 1 >= PID_MAX {
                300
            } else {
                self.next + 1
            };
            if !self.groups.contains_key(&pid) && !self.tasks.contains_key(&pid) {
                return pid;
            }
        }
    }

    pub fn group(&self, pid: i32) -> Option<&Arc<ThreadGroup>> {
        self.groups.get(&pid)
    }

    pub fn task(&self, tid: i32) -> Option<&Arc<TaskHandle>> {
        self.tasks.get(&tid)
    }

    /// Live (not zombie) processes.
    pub fn live_groups(&self) -> Vec<Arc<ThreadGroup>> {
        self.groups
            .values()
            .filter(|g| !g.lock().is_zombie())
            .cloned()
            .collect()
    }
}
