//! Structured event lines in the slurmd log, one per checkpoint, restore, fallback
//! and fresh start, for a site's log pipeline:
//!
//! `vmwrap: event=checkpoint job=12 step=0 task=0 gen=3 kind=full bytes=52428800 frozen_s=0.120 result=ok`
//!
//! vmctl reports its checkpoints and restores as JSON lines on a pipe the plugin
//! creates in slurmstepd (the task inherits the write end, named by
//! VMWRAP_EVENTS_FD); a thread in slurmstepd turns each into a log line. The job
//! and step come from the plugin; what vmctl sends is the user's process talking,
//! so only numbers and words from fixed sets get through. The fields are
//! documented in docs/OPERATIONS.md.

use serde::Deserialize;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// The environment variable vmctl reads the pipe's descriptor from.
pub const EVENTS_FD_ENV: &str = "VMWRAP_EVENTS_FD";
/// Longest line read from vmctl; vmctl writes far less.
const MAX_LINE: u64 = 4096;
/// Longest free-text field (an error message) copied into the log.
const MAX_TEXT: usize = 300;

/// One event as vmctl writes it (vmctl/src/events.rs).
#[derive(Debug, Deserialize)]
pub struct VmctlEvent {
    pub event: String,
    pub generation: u64,
    pub kind: String,
    pub bytes: u64,
    pub frozen_s: f64,
    pub result: String,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub task: Option<u32>,
}

fn one_of<'a>(value: &str, allowed: &[&'a str]) -> &'a str {
    allowed
        .iter()
        .find(|a| **a == value)
        .copied()
        .unwrap_or("unknown")
}

/// Quotes free text so that a parser splitting on spaces and `=` keeps it whole.
pub fn quoted(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars().take(MAX_TEXT) {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The log line for an event vmctl reported for `job`.`step`.
pub fn vmctl_event_line(job: u32, step: &str, ev: &VmctlEvent) -> String {
    let mut line = format!(
        "event={} job={job} step={step} task={} gen={} kind={} bytes={} frozen_s={:.3} result={}",
        one_of(&ev.event, &["checkpoint", "restore", "fallback"]),
        ev.task.map_or("-".to_string(), |t| t.to_string()),
        ev.generation,
        one_of(&ev.kind, &["full", "incremental"]),
        ev.bytes,
        if ev.frozen_s.is_finite() && ev.frozen_s >= 0.0 {
            ev.frozen_s
        } else {
            0.0
        },
        one_of(&ev.result, &["ok", "failed"]),
    );
    if let Some(e) = &ev.error {
        let _ = write!(line, " error={}", quoted(e));
    }
    line
}

/// The log line for a step starting from the beginning: `restart` is Slurm's
/// restart count, and a restart that starts afresh lost the work done before.
pub fn fresh_start_line(job: u32, step: u32, task: u32, restart: u32, why: Option<&str>) -> String {
    let mut line = format!(
        "event=fresh_start job={job} step={step} task={task} gen=0 kind=- bytes=0 frozen_s=0.000 result={} restart={restart}",
        if restart == 0 { "ok" } else { "lost" }
    );
    if let Some(why) = why {
        let _ = write!(line, " reason={}", quoted(why));
    }
    line
}

/// Reads vmctl's events from `read_end` until every writer closed it, logging
/// each with `log`. Runs on its own thread in slurmstepd.
pub fn relay(read_end: OwnedFd, job: u32, step: String, log: impl Fn(&str)) {
    let mut reader = BufReader::new(std::fs::File::from(read_end));
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with(b"\n") {
            // Over-long: skip the rest of it without holding it (a writer
            // that never sends a newline must not grow slurmstepd).
            if !skip_line(&mut reader) {
                return;
            }
            log(&format!(
                "event=unknown job={job} step={step} result=failed error=\"unreadable event from vmctl\""
            ));
            continue;
        }
        match serde_json::from_slice::<VmctlEvent>(&line) {
            Ok(ev) => log(&vmctl_event_line(job, &step, &ev)),
            Err(_) => log(&format!(
                "event=unknown job={job} step={step} result=failed error=\"unreadable event from vmctl\""
            )),
        }
    }
}

/// Discards input up to and including the next newline; false at the end of
/// the input or on an error.
fn skip_line(reader: &mut impl BufRead) -> bool {
    loop {
        let (found, used) = match reader.fill_buf() {
            Ok([]) => return false,
            Ok(buf) => match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (true, i + 1),
                None => (false, buf.len()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        };
        reader.consume(used);
        if found {
            return true;
        }
    }
}

/// A pipe, both ends close-on-exec: the read end stays in slurmstepd, and the
/// task clears the flag on its copy of the write end right before it becomes
/// vmctl, so no other program slurmstepd runs gets it.
pub fn pipe_for_tasks() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [RawFd; 2] = [-1, -1];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these descriptors; nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[test]
    fn lines_are_parseable_and_sanitized() {
        let ev: VmctlEvent = serde_json::from_str(
            r#"{"event":"checkpoint","generation":3,"kind":"full","bytes":52428800,"frozen_s":0.12,"result":"ok","task":0}"#,
        )
        .unwrap();
        assert_eq!(
            vmctl_event_line(12, "0", &ev),
            "event=checkpoint job=12 step=0 task=0 gen=3 kind=full bytes=52428800 frozen_s=0.120 result=ok"
        );
        let ev: VmctlEvent = serde_json::from_str(
            r#"{"event":"x job=1","generation":1,"kind":"full","bytes":1,"frozen_s":-1,"result":"ok","error":"a \"b\"\nc"}"#,
        )
        .unwrap();
        let line = vmctl_event_line(5, "1", &ev);
        assert!(line.starts_with("event=unknown job=5 "), "{line}");
        assert!(line.ends_with(r#"error="a \"b\" c""#), "{line}");
        assert!(fresh_start_line(1, 0, 0, 1, Some("no checkpoint"))
            .contains("result=lost restart=1 reason=\"no checkpoint\""));
    }

    #[test]
    fn relay_logs_every_line_until_eof() {
        let (read_end, write_end) = pipe_for_tasks().unwrap();
        let mut w = std::fs::File::from(write_end);
        writeln!(w, r#"{{"event":"restore","generation":2,"kind":"full","bytes":4096,"frozen_s":0.5,"result":"ok"}}"#).unwrap();
        writeln!(w, "not json").unwrap();
        w.write_all(&vec![b'x'; 10_000]).unwrap();
        writeln!(w).unwrap();
        writeln!(w, r#"{{"event":"checkpoint","generation":3,"kind":"incremental","bytes":1,"frozen_s":0.1,"result":"ok"}}"#).unwrap();
        drop(w);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        relay(read_end, 7, "0".into(), move |l| {
            s.lock().unwrap().push(l.to_string())
        });
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert!(seen[0].starts_with("event=restore job=7 step=0 task=- gen=2"));
        assert!(seen[1].starts_with("event=unknown"));
        assert!(seen[2].starts_with("event=unknown"));
        assert!(seen[3].starts_with("event=checkpoint job=7 step=0 task=- gen=3"));
    }
}
