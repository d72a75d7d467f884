//! The job's files across checkpoints: after a restore of generation N, every regular
//! file the job had open for writing (and every one it wrote to since) is exactly as it
//! was when N was taken, or the restore refuses N, naming the file.
//!
//! How: each generation directory holds a *file journal* (`files.journal`). It starts
//! with the identity and size of every regular file the job has open for writing at the
//! checkpoint. While the job runs on, vmctl sees each of its writes before it happens
//! (it is the guest's kernel), and records into the newest generation's journal what a
//! restore will need to undo it, durably *before* letting the write through:
//!
//! - writing at or beyond the file's recorded size (appending) needs nothing: a
//!   restore cuts the file back to that size;
//! - overwriting bytes below it (in place, truncating, punching holes) first saves
//!   the old contents of the 4 KiB blocks concerned (once per block and generation)
//!   under the `journal` policy, or marks the file as changed (restore then refuses
//!   the generation) under `truncate` and `refuse`;
//! - the first write to a file not yet in the journal records its identity and size
//!   first (a log opened, appended and closed every step; a file created after N);
//! - the job's standard output and error, when they are regular files that others
//!   may also write to (Slurm's --output), are never cut back to a size: the ranges the
//!   job itself wrote are recorded instead, and a restore removes exactly those.
//!
//! A restore of an older generation M undoes the journals from the newest generation
//! down to M, so the journals of one timeline form a chain (each names the generation
//! it follows). See docs/CHECKPOINT-FORMAT.md, "File journal".

pub mod track;
pub mod undo;

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The file journal's name inside a generation directory.
pub const JOURNAL: &str = "files.journal";
/// Overwritten data is saved in blocks of this size (aligned in the file).
pub const BLOCK: u64 = 4096;
/// Saved data is split into records of at most this many bytes.
const MAX_SAVED_PER_RECORD: u64 = 1 << 20;
/// No record is larger than this (a larger length means a damaged journal).
const MAX_RECORD: u64 = MAX_SAVED_PER_RECORD + (1 << 16);
/// The last bytes before a file's recorded size are checksummed, so a restore can tell
/// a file that something other than the job rewrote.
pub const TAIL_CHECK: u64 = 4096;
/// Default bound on the data the `journal` policy saves per generation.
pub const DEFAULT_BUDGET: u64 = 1 << 30;

/// What vmctl keeps so files can be brought back to a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nothing: files are left as they are (vmctl before 0.2).
    None,
    /// Any change by the job (appends included) makes the generation unusable.
    Refuse,
    /// Appended files are cut back; anything overwritten below the recorded size makes
    /// the generation unusable.
    Truncate,
    /// Appended files are cut back; overwritten data is saved first and written back.
    Journal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// Most bytes of overwritten data `journal` saves per generation; past it a file's
    /// further in-place changes make that generation unusable.
    pub budget: u64,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            mode: Mode::Journal,
            budget: DEFAULT_BUDGET,
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.mode {
            Mode::None => write!(f, "none"),
            Mode::Refuse => write!(f, "refuse"),
            Mode::Truncate => write!(f, "truncate"),
            Mode::Journal if self.budget == DEFAULT_BUDGET => write!(f, "journal"),
            Mode::Journal => write!(f, "journal:{}", self.budget),
        }
    }
}

/// Parses `none`, `refuse`, `truncate`, `journal` or `journal:SIZE`.
pub fn parse_policy(s: &str) -> Result<Policy, String> {
    let (name, size) = match s.split_once(':') {
        Some((n, sz)) => (n, Some(sz)),
        None => (s, None),
    };
    let mode = match name {
        "none" => Mode::None,
        "refuse" => Mode::Refuse,
        "truncate" => Mode::Truncate,
        "journal" => Mode::Journal,
        _ => {
            return Err(format!(
                "'{s}' is not a file policy: use journal[:SIZE], truncate, refuse or none"
            ))
        }
    };
    let budget = match (mode, size) {
        (_, None) => DEFAULT_BUDGET,
        (Mode::Journal, Some(sz)) => {
            crate::cli::size::parse_size(sz).map_err(|e| format!("'{s}': {e}"))?
        }
        (_, Some(_)) => return Err(format!("'{s}': only journal takes a size")),
    };
    Ok(Policy { mode, budget })
}

/// The manifest's note that this generation has a file journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FilesInfo {
    /// The policy the journal was kept under (for people; the records say what to do).
    pub policy: String,
    pub journal: String,
}

/// One record of a file journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    /// First record: the generation the journal belongs to, and the generation whose
    /// journal was being kept when this one was taken (None for a job's first).
    Header {
        generation: u64,
        follows: Option<u64>,
        policy: String,
    },
    /// A file and its state at the generation: size, and the CRC32 of its last
    /// `TAIL_CHECK` bytes before that size. `stdio`: one of the job's standard streams.
    File {
        id: u32,
        path: PathBuf,
        dev: u64,
        ino: u64,
        size: u64,
        tail_crc32: u32,
        #[serde(default)]
        stdio: bool,
    },
    /// `len` bytes of file `id` at `offset` as they were at the generation; the data
    /// follows the record's JSON.
    Saved { id: u32, offset: u64, len: u64 },
    /// File `id` was changed in a way this journal cannot undo.
    Changed { id: u32, what: String },
    /// The job wrote `len` bytes at `offset` of standard stream file `id`.
    Wrote { id: u32, offset: u64, len: u64 },
    /// The `Wrote` record with these fields, made before its write, is void: the
    /// write failed, or wrote less or elsewhere (a `Wrote` record of what it did
    /// write follows).
    NotWritten { id: u32, offset: u64, len: u64 },
    /// A restore brought the files back to this generation and the job went on from it.
    Resumed,
}

/// Encodes a record: u32 length of what follows the CRC, u32 CRC32 of it, u32 length
/// of the JSON, the JSON, then `data`.
pub fn encode(record: &Record, data: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(record).expect("records serialize");
    let body_len = 4 + json.len() + data.len();
    let mut out = Vec::with_capacity(8 + body_len);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(data);
    let crc = crc32fast::hash(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// A record read back, with where its data lies in the journal.
#[derive(Debug, Clone)]
pub struct Entry {
    pub record: Record,
    pub data_offset: u64,
    pub data_len: u64,
}

/// Reads a journal. A damaged or short *last* record is a write that never finished
/// (the change it protected was never made) and is ignored; damage anywhere else is an
/// error.
pub fn read_journal(path: &Path) -> Result<Vec<Entry>, String> {
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len = f
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    let mut out = Vec::new();
    let mut pos = 0u64;
    let mut head = [0u8; 8];
    while pos < len {
        if len - pos < 8 || f.read_exact_at(&mut head, pos).is_err() {
            break;
        }
        let body_len = u32::from_le_bytes(head[0..4].try_into().expect("4")) as u64;
        let crc = u32::from_le_bytes(head[4..8].try_into().expect("4"));
        let end = pos + 8 + body_len;
        let last = end >= len;
        if !(4..=MAX_RECORD).contains(&body_len) {
            // Zeros where a record should be: a tail the filesystem never finished.
            if last && body_len < 4 {
                break;
            }
            return Err(format!(
                "{}: record at byte {pos} has an impossible length {body_len} (damaged)",
                path.display()
            ));
        }
        if end > len {
            break;
        }
        let mut body = vec![0u8; body_len as usize];
        f.read_exact_at(&mut body, pos + 8)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if crc32fast::hash(&body) != crc {
            if last {
                break;
            }
            return Err(format!(
                "{}: record at byte {pos} fails its CRC32 (damaged)",
                path.display()
            ));
        }
        let json_len = u32::from_le_bytes(body[0..4].try_into().expect("4")) as u64;
        if json_len > body_len - 4 {
            return Err(format!(
                "{}: record at byte {pos} is malformed",
                path.display()
            ));
        }
        let record: Record = serde_json::from_slice(&body[4..4 + json_len as usize])
            .map_err(|e| format!("{}: record at byte {pos}: {e}", path.display()))?;
        out.push(Entry {
            record,
            data_offset: pos + 8 + 4 + json_len,
            data_len: body_len - 4 - json_len,
        });
        pos = end;
    }
    Ok(out)
}

/// CRC32 of the last `TAIL_CHECK` bytes before `size` of the file, as read now.
pub fn tail_crc(file: &File, size: u64) -> std::io::Result<u32> {
    let start = size.saturating_sub(TAIL_CHECK);
    let mut buf = vec![0u8; (size - start) as usize];
    file.read_exact_at(&mut buf, start)?;
    Ok(crc32fast::hash(&buf))
}

fn append(file: &mut File, bytes: &[u8]) -> std::io::Result<()> {
    file.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(dir: &Path, records: &[(Record, &[u8])]) -> PathBuf {
        let path = dir.join(JOURNAL);
        let mut bytes = Vec::new();
        for (r, data) in records {
            bytes.extend(encode(r, data));
        }
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmctl-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn policies_parse_and_print() {
        for s in ["journal", "truncate", "refuse", "none", "journal:1048576"] {
            assert_eq!(parse_policy(s).unwrap().to_string(), s);
        }
        assert_eq!(parse_policy("journal:64M").unwrap().budget, 64 << 20);
        assert!(parse_policy("keep").unwrap_err().contains("journal[:SIZE]"));
        assert!(parse_policy("truncate:1G").is_err());
        assert!(parse_policy("journal:lots").is_err());
    }

    #[test]
    fn records_round_trip_with_their_data() {
        let d = tmpdir("roundtrip");
        let p = journal(
            &d,
            &[
                (
                    Record::Header {
                        generation: 3,
                        follows: Some(2),
                        policy: "journal".into(),
                    },
                    &[],
                ),
                (
                    Record::Saved {
                        id: 0,
                        offset: 4096,
                        len: 5,
                    },
                    b"hello",
                ),
            ],
        );
        let entries = read_journal(&p).unwrap();
        assert_eq!(entries.len(), 2);
        let data = std::fs::read(&p).unwrap();
        let e = &entries[1];
        assert_eq!(
            &data[e.data_offset as usize..(e.data_offset + e.data_len) as usize],
            b"hello"
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_torn_last_record_is_ignored_but_damage_before_it_is_an_error() {
        let d = tmpdir("torn");
        let rec = |id| {
            (
                Record::Changed {
                    id,
                    what: "x".into(),
                },
                &[][..],
            )
        };
        let p = journal(&d, &[rec(0), rec(1), rec(2)]);
        let full = std::fs::read(&p).unwrap();
        // Cut inside the last record: a write that never finished.
        std::fs::write(&p, &full[..full.len() - 3]).unwrap();
        assert_eq!(read_journal(&p).unwrap().len(), 2);
        // A flipped bit in the first record: damage.
        let mut bad = full.clone();
        bad[12] ^= 1;
        std::fs::write(&p, &bad).unwrap();
        assert!(read_journal(&p).unwrap_err().contains("fails its CRC32"));
        // An absurd length before the end: damage, never a huge allocation.
        let mut bad = full;
        bad[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(&p, &bad).unwrap();
        assert!(read_journal(&p).unwrap_err().contains("impossible length"));
        std::fs::remove_dir_all(d).unwrap();
    }
}
