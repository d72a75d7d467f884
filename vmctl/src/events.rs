//! What vmctl did to a job's checkpoints, for operators: one JSON object per event
//! (checkpoint, restore), appended to `DIR/events.jsonl` in the checkpoint directory
//! (read back by `vmctl inspect --json`) and, when the SPANK plugin gave one, written
//! to the descriptor named by `VMWRAP_EVENTS_FD`, which the plugin turns into a
//! `vmwrap: event=...` line in the slurmd log. The fields are listed in
//! docs/OPERATIONS.md.
//!
//! Also: progress of long checkpoints and restores on a terminal.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

/// The file in a checkpoint directory holding the events of that directory.
pub const EVENTS_FILE: &str = "events.jsonl";
/// The environment variable through which the plugin passes its pipe.
pub const EVENTS_FD_ENV: &str = "VMWRAP_EVENTS_FD";
/// Older events are dropped when the file grows past this, so a job that
/// checkpoints every few minutes for months cannot fill the disk with them.
const EVENTS_FILE_LIMIT: u64 = 1 << 20;
/// `vmctl inspect` reads at most this many of the newest events.
pub const EVENTS_SHOWN: usize = 100;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// "checkpoint", "restore", or "fallback" (restored an older generation
    /// because the newer ones were unusable).
    pub event: String,
    pub generation: u64,
    /// "full" (the only kind today).
    pub kind: String,
    /// Bytes written (checkpoint) or read (restore).
    pub bytes: u64,
    /// How long the guest was stopped for it.
    pub frozen_s: f64,
    /// "ok" or "failed".
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub time_unix: i64,
    pub vmctl_version: String,
    /// The Slurm task (SLURM_PROCID) when run by the plugin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<u32>,
}

impl Event {
    pub fn new(event: &str, generation: u64, bytes: u64, frozen_s: f64) -> Event {
        Event {
            event: event.into(),
            generation,
            kind: "full".into(),
            bytes,
            frozen_s,
            result: "ok".into(),
            error: None,
            time_unix: crate::clock::realtime_s(),
            vmctl_version: env!("CARGO_PKG_VERSION").into(),
            task: std::env::var("SLURM_PROCID")
                .ok()
                .and_then(|t| t.parse().ok()),
        }
    }

    pub fn failed(mut self, why: &str) -> Event {
        self.result = "failed".into();
        self.error = Some(why.into());
        self
    }
}

/// The plugin's pipe, taken once from the environment at start-up.
static SINK: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Takes the descriptor named by VMWRAP_EVENTS_FD (if any) and removes the
/// variable, so that the guest program neither sees nor inherits it.
pub fn init_from_env() {
    let Some(value) = std::env::var_os(EVENTS_FD_ENV) else {
        return;
    };
    std::env::remove_var(EVENTS_FD_ENV);
    let Some(fd) = value.to_str().and_then(|s| s.parse::<RawFd>().ok()) else {
        return;
    };
    // SAFETY: F_GETFD only asks whether `fd` is open.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return;
    }
    // SAFETY: as above; close-on-exec keeps it out of anything vmctl executes.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the plugin opened this descriptor for vmctl alone; nothing else in
    // this process owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    *SINK.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
}

/// Records `event` in `dir`'s events file and on the plugin's pipe. Failures are
/// ignored: an event log must never stop a checkpoint or a restore.
pub fn emit(dir: &Path, event: &Event) {
    let Ok(mut line) = serde_json::to_string(event) else {
        return;
    };
    line.push('\n');
    if let Some(sink) = SINK.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        // One write under PIPE_BUF bytes: the plugin reads whole lines.
        let _ = sink.write_all(line.as_bytes());
    }
    append_to_file(dir, &line);
}

fn append_to_file(dir: &Path, line: &str) {
    let path = dir.join(EVENTS_FILE);
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.len() > EVENTS_FILE_LIMIT) {
        let kept = read_recent(dir, EVENTS_SHOWN);
        let tmp = dir.join(format!(".{EVENTS_FILE}.tmp-{}", std::process::id()));
        let text: String = kept
            .iter()
            .filter_map(|e| serde_json::to_string(e).ok())
            .map(|l| l + "\n")
            .collect();
        if std::fs::write(&tmp, text).is_err() || std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path);
    if let Ok(mut f) = file {
        let _ = f.write_all(line.as_bytes());
    }
}

/// The newest `max` well-formed events of `dir`, oldest first.
pub fn read_recent(dir: &Path, max: usize) -> Vec<Event> {
    use std::io::{BufRead, BufReader, Read};
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(dir.join(EVENTS_FILE))
    else {
        return Vec::new();
    };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Vec::new();
    }
    // Twice the rotation limit: a file someone else grew is not read whole.
    let mut events: Vec<Event> = BufReader::new(file.take(2 * EVENTS_FILE_LIMIT))
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect();
    let skip = events.len().saturating_sub(max);
    events.drain(..skip);
    events
}

/// Progress of a long checkpoint or restore, on stderr when it is a terminal.
/// Quiet otherwise (batch jobs, the plugin, tests), and for small images, which
/// finish before anyone could read a progress line.
pub struct Progress {
    what: String,
    total: u64,
    shown: bool,
    last_ns: i64,
    enabled: bool,
}

/// Below this many bytes no progress is shown.
const PROGRESS_MIN_BYTES: u64 = 256 << 20;
const PROGRESS_PERIOD_NS: i64 = 500_000_000;

impl Progress {
    pub fn new(what: &str, total: u64) -> Progress {
        // SAFETY: isatty only inspects the descriptor.
        let tty = unsafe { libc::isatty(libc::STDERR_FILENO) } == 1;
        Progress {
            what: what.into(),
            total,
            shown: false,
            last_ns: crate::clock::monotonic_ns(),
            enabled: tty && total >= PROGRESS_MIN_BYTES,
        }
    }

    pub fn update(&mut self, done: u64) {
        if !self.enabled {
            return;
        }
        let now = crate::clock::monotonic_ns();
        if now - self.last_ns < PROGRESS_PERIOD_NS {
            return;
        }
        self.last_ns = now;
        self.shown = true;
        let pct = done.min(self.total) * 100 / self.total.max(1);
        eprint!(
            "\rvmctl: {}: {pct:3}% of {} MiB",
            self.what,
            self.total >> 20
        );
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.shown {
            // Ends the \r line so later messages start on a fresh one.
            eprintln!("\rvmctl: {}: done{:20}", self.what, "");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_rotate() {
        let dir = std::env::temp_dir().join(format!("vmctl-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for g in 1..=3 {
            emit(&dir, &Event::new("checkpoint", g, 4096 * g, 0.01));
        }
        emit(&dir, &Event::new("restore", 3, 1, 0.5).failed("no KVM"));
        let seen = read_recent(&dir, 2);
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].generation, 3);
        assert_eq!(seen[1].result, "failed");
        assert_eq!(seen[1].error.as_deref(), Some("no KVM"));
        // Past the limit the file is cut down to the newest events.
        let big = "x".repeat(EVENTS_FILE_LIMIT as usize + 1);
        std::fs::write(dir.join(EVENTS_FILE), big).unwrap();
        emit(&dir, &Event::new("checkpoint", 9, 1, 0.0));
        let seen = read_recent(&dir, 10);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].generation, 9);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
