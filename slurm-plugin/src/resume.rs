//! Resuming the srun step that was running when a wrapped batch script was
//! checkpointed.
//!
//! srun's state is its connections (to slurmctld and the step's nodes), which
//! a checkpoint cannot carry. So the batch script's vmctl is told
//! `--reexec <srun>`: on a restore it starts such an srun again, the same guest
//! process (pid, parent, argv, descriptors, working directory) with
//! `VMCTL_REEXECUTED=1` in its environment. The plugin, loaded in that srun
//! (local context), then links the new step to the old one:
//!
//! 1. every srun of a wrapped script records, in the script's checkpoint
//!    directory, which step it runs (`srun-<pid>.json`: its guest pid is the
//!    same after a restore);
//! 2. a re-executed srun reads its record and passes the old step's id to its
//!    new step's tasks (`VMWRAP_RESUME_STEP`, through the environment srun
//!    builds for them); its record is left as it is, so that after a further
//!    requeue the step still resumes from the same directory;
//! 3. each task of the new step (task_init, as the job user) restores the old
//!    step's checkpoint of the same task instead of starting afresh; a task
//!    that had already finished is not run again, it exits with the status it
//!    had.
//!
//! The old step's directory stays the step's checkpoint directory: new
//! generations go there (`resumed.json` says which step resumed it), and a new
//! step of the restored script that is given the same step id while it still
//! runs (its vmctl answers on the directory's control socket) is refused,
//! never run in the same directory.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dirs::FINISHED_MARKER;

/// vmctl's mark on a program it started again after a restore.
pub const REEXECUTED_ENV: &str = "VMCTL_REEXECUTED";
/// The old step a re-executed srun's new step resumes (its step id).
pub const RESUME_ENV: &str = "VMWRAP_RESUME_STEP";
/// Left by a task that resumed this directory's checkpoint as another step.
pub const RESUMED_MARKER: &str = "resumed.json";

/// Records and markers are tiny: a bigger file is not ours.
const MAX_RECORD: u64 = 4096;

/// Which step an srun of a wrapped batch script runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SrunRecord {
    pub job_id: u32,
    pub step_id: u32,
}

/// Which step resumed a step directory's checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumedBy {
    pub step_id: u32,
}

pub fn record_path(batch_dir: &Path, pid: u32) -> PathBuf {
    batch_dir.join(format!("srun-{pid}.json"))
}

/// Writes `value` as `path` (a new file renamed into place).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), String> {
    let partial = path.with_extension("json.partial");
    let json = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    std::fs::write(&partial, json)
        .and_then(|()| std::fs::rename(&partial, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Reads a small JSON file the job's user owns (and may have edited).
pub fn read_json<T: for<'a> Deserialize<'a>>(path: &Path) -> Result<T, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut text = Vec::new();
    file.take(MAX_RECORD + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if text.len() as u64 > MAX_RECORD {
        return Err(format!("{}: too large", path.display()));
    }
    serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// A step id as `VMWRAP_RESUME_STEP` carries it: a normal step's decimal id.
pub fn parse_step_id(text: &[u8], max_normal: u32) -> Option<u32> {
    let text = std::str::from_utf8(text).ok()?;
    if text.is_empty() || text.len() > 10 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u32>().ok().filter(|&id| id < max_normal)
}

/// The exit status vmctl recorded in `dir/finished` when the task's program
/// ended; None if it has not ended (or the marker is unreadable).
pub fn finished_status(dir: &Path) -> Option<i32> {
    #[derive(Deserialize)]
    struct Finished {
        exit_status: i32,
    }
    read_json::<Finished>(&dir.join(FINISHED_MARKER))
        .ok()
        .map(|f| f.exit_status.clamp(0, 255))
}

/// Whether a vmctl is running on `dir`'s checkpoints: its control socket
/// accepts a connection (an empty request, which it answers and forgets).
/// Returns which step resumed them, if one did (`resumed.json`).
pub fn in_use(dir: &Path) -> Option<Option<u32>> {
    std::os::unix::net::UnixStream::connect(dir.join("control.sock")).ok()?;
    Some(
        read_json::<ResumedBy>(&dir.join(RESUMED_MARKER))
            .ok()
            .map(|by| by.step_id),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_ids() {
        let max = 0xffff_fff0;
        assert_eq!(parse_step_id(b"0", max), Some(0));
        assert_eq!(parse_step_id(b"17", max), Some(17));
        for bad in [
            &b""[..],
            b"-1",
            b"1/..",
            b"../1",
            b"4294967291",
            b"99999999999",
            b"1 ",
        ] {
            assert_eq!(parse_step_id(bad, max), None, "{bad:?}");
        }
    }

    #[test]
    fn records_and_markers() {
        let dir = std::env::temp_dir().join(format!("vmwrap-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rec = SrunRecord {
            job_id: 4,
            step_id: 2,
        };
        let path = record_path(&dir, 123);
        write_json(&path, &rec).unwrap();
        assert_eq!(read_json::<SrunRecord>(&path).unwrap(), rec);
        std::fs::write(&path, vec![b' '; 5000]).unwrap();
        assert!(read_json::<SrunRecord>(&path)
            .unwrap_err()
            .contains("too large"));

        assert_eq!(finished_status(&dir), None);
        assert_eq!(in_use(&dir), None);
        let listener = std::os::unix::net::UnixListener::bind(dir.join("control.sock")).unwrap();
        write_json(&dir.join(RESUMED_MARKER), &ResumedBy { step_id: 5 }).unwrap();
        assert_eq!(in_use(&dir), Some(Some(5)));
        drop(listener);
        assert_eq!(in_use(&dir), None);
        std::fs::write(
            dir.join(FINISHED_MARKER),
            r#"{"exit_status": 3, "ended_unix": 1}"#,
        )
        .unwrap();
        assert_eq!(finished_status(&dir), Some(3));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
