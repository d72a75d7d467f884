//! Everything outside the guest that can ask the running job for something: host
//! signals, the control socket in the checkpoint directory, the periodic timer.

pub mod signals;
pub mod socket;

use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// A checkpoint someone asked for; `reply` gets a one-line JSON result.
pub struct Request {
    pub reply: Option<mpsc::Sender<String>>,
}

/// Requests queued for the main thread, which is woken with the notify signal.
#[derive(Clone)]
pub struct Requests {
    queue: Arc<Mutex<Vec<Request>>>,
    main_thread: libc::pthread_t,
}

impl Requests {
    /// Must be created on the main thread.
    pub fn new() -> Self {
        Requests {
            queue: Arc::new(Mutex::new(Vec::new())),
            // SAFETY: pthread_self cannot fail.
            main_thread: unsafe { libc::pthread_self() },
        }
    }

    pub fn push(&self, r: Request) {
        self.queue.lock().expect("request queue poisoned").push(r);
        signals::notify(self.main_thread);
    }

    pub fn take(&self) -> Vec<Request> {
        std::mem::take(&mut *self.queue.lock().expect("request queue poisoned"))
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
