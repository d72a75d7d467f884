//! Everything outside the guest that can ask the running job for something: host
//! signals, the control socket in the checkpoint directory, the periodic timer.

pub mod signals;
pub mod socket;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// A checkpoint someone asked for; `reply` gets a one-line JSON result.
pub struct Request {
    pub reply: Option<mpsc::Sender<String>>,
}

/// Requests queued for the vCPU thread, which is woken with a kick signal.
#[derive(Clone)]
pub struct Requests {
    queue: Arc<Mutex<Vec<Request>>>,
    /// How many are queued: read after every guest exit, so it must not need the lock.
    queued: Arc<AtomicUsize>,
    vcpu_thread: libc::pthread_t,
}

impl Requests {
    /// Must be created on the vCPU thread.
    pub fn new() -> Self {
        Requests {
            queue: Arc::new(Mutex::new(Vec::new())),
            queued: Arc::new(AtomicUsize::new(0)),
            // SAFETY: pthread_self cannot fail.
            vcpu_thread: unsafe { libc::pthread_self() },
        }
    }

    pub fn push(&self, r: Request) {
        {
            let mut q = self.queue.lock().expect("request queue poisoned");
            q.push(r);
            self.queued.store(q.len(), Ordering::SeqCst);
        }
        signals::kick(self.vcpu_thread);
    }

    pub fn take(&self) -> Vec<Request> {
        if !self.waiting() {
            return Vec::new();
        }
        let mut q = self.queue.lock().expect("request queue poisoned");
        self.queued.store(0, Ordering::SeqCst);
        std::mem::take(&mut *q)
    }

    fn waiting(&self) -> bool {
        self.queued.load(Ordering::SeqCst) != 0
    }

    /// Starts the thread that kicks the vCPU thread again, every 50 ms, for as long
    /// as a host signal or a request waits to be served. A signal can land after the
    /// vCPU thread last looked and before it blocks in a host call made for the guest
    /// (a read from a pipe, say); its handler has then run and nothing would wake the
    /// call. Kicking until it is served closes that gap without any locking on the
    /// syscall path.
    pub fn start_watchdog(&self) {
        let me = self.clone();
        std::thread::Builder::new()
            .name("vmctl-watchdog".into())
            .spawn(move || {
                signals::block_in_this_thread();
                loop {
                    std::thread::sleep(Duration::from_millis(50));
                    if signals::peek_pending() != 0 || me.waiting() {
                        signals::kick(me.vcpu_thread);
                    }
                }
            })
            .expect("spawn watchdog thread");
    }

    /// Starts a thread that asks for a checkpoint every `interval`.
    pub fn start_interval(&self, interval: Duration) {
        let me = self.clone();
        std::thread::Builder::new()
            .name("vmctl-interval".into())
            .spawn(move || {
                signals::block_in_this_thread();
                loop {
                    std::thread::sleep(interval);
                    me.push(Request { reply: None });
                }
            })
            .expect("spawn interval thread");
    }
}
