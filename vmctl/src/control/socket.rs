//! The control socket (`DIR/control.sock`): `vmctl checkpoint DIR` connects, sends
//! one JSON request line and reads one JSON reply line. The socket lives in the
//! checkpoint directory, which is 0700, so only the job's owner can reach it.

use super::{signals, Request, Requests};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

pub const SOCKET_NAME: &str = "control.sock";

pub struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds DIR/control.sock and serves it from a helper thread.
pub fn serve(dir: &Path, requests: Requests) -> std::io::Result<ControlSocket> {
    let path = dir.join(SOCKET_NAME);
    if UnixStream::connect(&path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "another vmctl is running for {} (its control socket answers)",
                dir.display()
            ),
        ));
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::thread::Builder::new()
        .name("vmctl-control".into())
        .spawn(move || {
            signals::block_in_this_thread();
            let busy = Arc::new(AtomicUsize::new(0));
            for conn in listener.incoming().flatten() {
                // Each connection is served on its own thread, so one client that
                // connects and says nothing (the guest can connect too) never holds
                // up the next `vmctl checkpoint`. Beyond the limit, connections are
                // closed at once rather than piling up threads.
                if busy.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    continue;
                }
                busy.fetch_add(1, Ordering::SeqCst);
                let (requests, done) = (requests.clone(), busy.clone());
                let spawned = std::thread::Builder::new()
                    .name("vmctl-control-conn".into())
                    .spawn(move || {
                        // Helper threads inherit the blocked mask of this one.
                        handle(conn, &requests);
                        done.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    busy.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })?;
    Ok(ControlSocket { path })
}

/// Connections served at once.
const MAX_CONNECTIONS: usize = 16;
/// How long a client has to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request line read.
const MAX_REQUEST_BYTES: u64 = 4096;

fn handle(conn: UnixStream, requests: &Requests) {
    if conn.set_read_timeout(Some(REQUEST_TIMEOUT)).is_err()
        || conn.set_write_timeout(Some(REQUEST_TIMEOUT)).is_err()
    {
        return;
    }
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    })
    .take(MAX_REQUEST_BYTES);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let op = serde_json::from_str::<serde_json::Value>(&line)
        .ok()
        .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(str::to_owned));
    let reply = match op.as_deref() {
        Some("checkpoint") => {
            let (tx, rx) = mpsc::channel();
            requests.push(Request { reply: Some(tx) });
            rx.recv().unwrap_or_else(|_| {
                serde_json::json!({"ok": false, "error": "the job ended before the checkpoint"})
                    .to_string()
            })
        }
        _ => serde_json::json!({"ok": false, "error": "unknown request"}).to_string(),
    };
    let mut conn = conn;
    let _ = writeln!(conn, "{reply}");
}

/// Client side: asks the vmctl serving `dir` for a checkpoint and returns its reply.
pub fn request_checkpoint(dir: &Path, timeout: Duration) -> Result<serde_json::Value, String> {
    let path = dir.join(SOCKET_NAME);
    let mut conn = UnixStream::connect(&path).map_err(|e| {
        format!(
            "no running vmctl for {}: cannot connect to {} ({e}); is the job running with --checkpoint-dir {}?",
            dir.display(),
            path.display(),
            dir.display()
        )
    })?;
    conn.set_read_timeout(Some(timeout)).ok();
    writeln!(conn, "{}", serde_json::json!({"op": "checkpoint"})).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .map_err(|e| format!("no reply from the running vmctl: {e}"))?;
    serde_json::from_str(&line).map_err(|e| format!("bad reply from the running vmctl: {e}"))
}
