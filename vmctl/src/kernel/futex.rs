//! Futexes: the guest's wait queues, kept by vmctl.
//!
//! A waiter is queued under a key and then sleeps on its own task's wake word, so the
//! sleep can be broken by a signal, a freeze for a checkpoint or a kill, exactly like
//! every other blocking wait in the kernel layer. Keys follow Linux: a private futex
//! is (address space, virtual address), so copy-on-write moving the page does not
//! lose a waiter; a shared one is the page's identity (the file page of a shared file
//! mapping, or the guest-physical frame of shared anonymous memory).

use super::task::TaskHandle;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FutexKey {
    /// (address-space identity, virtual address)
    Private(usize, u64),
    /// (device, inode, byte offset in the file)
    File(u64, u64, u64),
    /// Guest-physical address of the word.
    Frame(u64),
}

pub struct Waiter {
    pub task: Arc<TaskHandle>,
    pub bitset: u32,
    pub woken: AtomicBool,
}

impl Waiter {
    pub fn new(task: Arc<TaskHandle>, bitset: u32) -> Arc<Waiter> {
        Arc::new(Waiter {
            task,
            bitset,
            woken: AtomicBool::new(false),
        })
    }

    fn wake(&self) {
        self.woken.store(true, Ordering::SeqCst);
        self.task.wake();
    }

    pub fn is_woken(&self) -> bool {
        self.woken.load(Ordering::SeqCst)
    }
}

#[derive(Default)]
pub struct FutexTable {
    queues: Mutex<HashMap<FutexKey, Vec<Arc<Waiter>>>>,
}

impl FutexTable {
    /// Queues `waiter` under `key` if `check` (run under the table lock, so a waker
    /// that changed the word before waking cannot be missed) says the word still holds
    /// the expected value.
    pub fn enqueue_if(
        &self,
        key: FutexKey,
        waiter: &Arc<Waiter>,
        check: impl FnOnce() -> bool,
    ) -> bool {
        let mut q = self.queues.lock().expect("futex table poisoned");
        if !check() {
            return false;
        }
        q.entry(key).or_default().push(waiter.clone());
        true
    }

    /// Takes a waiter out again (its wait ended by timeout or interruption).
    pub fn dequeue(&self, key: FutexKey, waiter: &Arc<Waiter>) {
        let mut q = self.queues.lock().expect("futex table poisoned");
        // It may have been requeued under another key: look everywhere if needed.
        if let Some(list) = q.get_mut(&key) {
            if let Some(i) = list.iter().position(|w| Arc::ptr_eq(w, waiter)) {
                list.remove(i);
                if list.is_empty() {
                    q.remove(&key);
                }
                return;
            }
        }
        q.retain(|_, list| {
            list.retain(|w| !Arc::ptr_eq(w, waiter));
            !list.is_empty()
        });
    }

    /// Wakes up to `n` waiters on `key` whose bitset matches.
    pub fn wake(&self, key: FutexKey, n: u32, bitset: u32) -> u32 {
        let mut q = self.queues.lock().expect("futex table poisoned");
        Self::wake_locked(&mut q, key, n, bitset)
    }

    fn wake_locked(
        q: &mut HashMap<FutexKey, Vec<Arc<Waiter>>>,
        key: FutexKey,
        n: u32,
        bitset: u32,
    ) -> u32 {
        let Some(list) = q.get_mut(&key) else {
            return 0;
        };
        let mut woken = 0;
        let mut i = 0;
        while i < list.len() && woken < n {
            if list[i].bitset & bitset != 0 {
                let w = list.remove(i);
                w.wake();
                woken += 1;
            } else {
                i += 1;
            }
        }
        if list.is_empty() {
            q.remove(&key);
        }
        woken
    }

    /// FUTEX_REQUEUE / FUTEX_CMP_REQUEUE: wakes `n` waiters of `from` and moves up to
    /// `requeue` more onto `to`. `check` runs under the lock (the CMP part).
    pub fn requeue(
        &self,
        from: FutexKey,
        to: FutexKey,
        n: u32,
        requeue: u32,
        check: impl FnOnce() -> bool,
    ) -> Option<u32> {
        let mut q = self.queues.lock().expect("futex table poisoned");
        if !check() {
            return None;
        }
        let woken = Self::wake_locked(&mut q, from, n, u32::MAX);
        let mut moved = Vec::new();
        if let Some(list) = q.get_mut(&from) {
            let take = (requeue as usize).min(list.len());
            moved.extend(list.drain(..take));
            if list.is_empty() {
                q.remove(&from);
            }
        }
        let count = moved.len() as u32;
        if !moved.is_empty() {
            q.entry(to).or_default().extend(moved);
        }
        Some(woken + count)
    }

    /// FUTEX_WAKE_OP: `op` runs under the lock and returns whether the second futex's
    /// waiters should be woken too.
    pub fn wake_op(
        &self,
        k1: FutexKey,
        n1: u32,
        k2: FutexKey,
        n2: u32,
        op: impl FnOnce() -> Result<bool, super::Errno>,
    ) -> Result<u32, super::Errno> {
        let mut q = self.queues.lock().expect("futex table poisoned");
        let also = op()?;
        let mut woken = Self::wake_locked(&mut q, k1, n1, u32::MAX);
        if also {
            woken += Self::wake_locked(&mut q, k2, n2, u32::MAX);
        }
        Ok(woken)
    }
}
