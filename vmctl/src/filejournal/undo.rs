//! The restoring side: from the journals of generation M and of every later generation
//! of the same timeline, what each file must become, whether that is possible, and
//! doing it.

use super::{read_journal, Entry, Record, JOURNAL, TAIL_CHECK};
use crate::checkpoint::format::generation_dir_name;
use crate::checkpoint::read::list_generations;
use serde::Serialize;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Saved data to write back: `len` bytes at `data_offset` of `journal` go to
/// `file_offset`.
#[derive(Debug, Clone)]
struct Piece {
    journal: PathBuf,
    data_offset: u64,
    file_offset: u64,
    len: u64,
}

/// What a restore does to one file.
#[derive(Debug, Clone, Serialize)]
pub struct FileUndo {
    pub path: PathBuf,
    /// One of the job's standard streams (only the job's own bytes are removed).
    pub stdio: bool,
    pub size_now: u64,
    pub size_restored: u64,
    /// Saved bytes written back.
    pub write_back_bytes: u64,
    /// For a standard stream: bytes the job wrote after the generation, removed.
    pub removed_bytes: u64,
    /// Why nothing is done to it, if nothing is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip)]
    pieces: Vec<Piece>,
    #[serde(skip)]
    remove: Vec<(u64, u64)>,
    #[serde(skip)]
    stream_fd: Option<i32>,
}

/// How to bring the files back to `generation`.
#[derive(Debug)]
pub struct Plan {
    pub generation: u64,
    pub files: Vec<FileUndo>,
    /// Later generations of the timeline: once the files are back at `generation`
    /// they no longer match them.
    pub newer: Vec<u64>,
    /// The generation's own journal, from which the job's journal goes on.
    pub entries: Vec<Entry>,
}

#[derive(Default)]
struct Acc {
    path: PathBuf,
    size: u64,
    tail_crc32: u32,
    stdio: bool,
    /// From the newest journal to the oldest: applied in that order, older data wins.
    pieces: Vec<Piece>,
    changed: Option<(u64, String)>,
    wrote: Vec<(u64, u64)>,
    /// The generation whose record `size` comes from.
    generation: u64,
}

/// A journal says which files to rewrite: only the caller's own is believed.
fn check_owner(path: &Path) -> Result<(), String> {
    let md = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    if md.uid() != me || !md.is_file() {
        return Err(format!(
            "{}: not a file of yours (owner uid {}, you are uid {me}); a checkpoint is only restored by its owner",
            path.display(),
            md.uid()
        ));
    }
    Ok(())
}

fn journal_of(dir: &Path, generation: u64) -> PathBuf {
    dir.join(generation_dir_name(generation)).join(JOURNAL)
}

/// Works out (without changing anything) how the files go back to `generation` of the
/// checkpoint directory `dir`, or why they cannot: the error names the file and what
/// changed.
pub fn plan(dir: &Path, generation: u64) -> Result<Plan, String> {
    let mut chain: Vec<u64> = list_generations(dir)
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|&g| g >= generation)
        .collect();
    chain.sort_unstable();
    if chain.first() != Some(&generation) {
        return Err(format!(
            "generation {generation} is not in {}",
            dir.display()
        ));
    }
    let mut journals = Vec::new();
    for (i, &g) in chain.iter().enumerate() {
        let path = journal_of(dir, g);
        if !path.exists() {
            let which = if g == generation {
                "its record of the job's files".to_string()
            } else {
                format!("the record of the job's file changes after generation {g}, which came after it")
            };
            return Err(format!(
                "{}: missing: {which} is gone, so the files cannot be brought back to generation {generation}",
                path.display()
            ));
        }
        check_owner(&path)?;
        let entries = read_journal(&path)?;
        match entries.first().map(|e| &e.record) {
            Some(Record::Header {
                generation: hg,
                follows,
                ..
            }) if *hg == g => {
                if i > 0 && *follows != Some(chain[i - 1]) {
                    return Err(format!(
                        "{}: generation {g} does not continue from generation {} (it follows {}), so the file changes between them are unknown",
                        path.display(),
                        chain[i - 1],
                        follows.map_or("none".into(), |f| f.to_string())
                    ));
                }
            }
            _ => {
                return Err(format!(
                    "{}: no header for generation {g} (damaged or foreign)",
                    path.display()
                ))
            }
        }
        journals.push((g, path, entries));
    }
    let mut files: HashMap<u64, Acc> = HashMap::new();
    for (g, path, entries) in journals.iter().rev() {
        let mut ids: HashMap<u32, u64> = HashMap::new();
        // A restore already removed the stream bytes recorded before it resumed.
        let resumed_at = entries
            .iter()
            .rposition(|e| matches!(e.record, Record::Resumed))
            .unwrap_or(0);
        for (index, e) in entries.iter().enumerate() {
            match &e.record {
                Record::File {
                    id,
                    path: fpath,
                    ino,
                    size,
                    tail_crc32,
                    stdio,
                    ..
                } => {
                    // Within a journal, a file's first record is its state at the
                    // generation.
                    if ids.values().any(|i| i == ino) {
                        ids.insert(*id, *ino);
                        continue;
                    }
                    ids.insert(*id, *ino);
                    let acc = files.entry(*ino).or_default();
                    acc.path = fpath.clone();
                    acc.size = *size;
                    acc.tail_crc32 = *tail_crc32;
                    acc.stdio = *stdio;
                    acc.generation = *g;
                }
                Record::Saved { id, offset, len } => {
                    let acc = ids
                        .get(id)
                        .and_then(|ino| files.get_mut(ino))
                        .ok_or_else(|| {
                            format!(
                                "{}: saved data for an unknown file (damaged)",
                                path.display()
                            )
                        })?;
                    if *len != e.data_len {
                        return Err(format!(
                            "{}: a saved block's length is wrong (damaged)",
                            path.display()
                        ));
                    }
                    acc.pieces.push(Piece {
                        journal: path.clone(),
                        data_offset: e.data_offset,
                        file_offset: *offset,
                        len: *len,
                    });
                }
                Record::Changed { id, what } => {
                    if let Some(acc) = ids.get(id).and_then(|ino| files.get_mut(ino)) {
                        acc.changed.get_or_insert((*g, what.clone()));
                    }
                }
                Record::Wrote { id, offset, len } if index > resumed_at => {
                    if let Some(acc) = ids.get(id).and_then(|ino| files.get_mut(ino)) {
                        acc.wrote.push((*offset, offset.saturating_add(*len)));
                    }
                }
                Record::NotWritten { id, offset, len } if index > resumed_at => {
                    if let Some(acc) = ids.get(id).and_then(|ino| files.get_mut(ino)) {
                        let void = (*offset, offset.saturating_add(*len));
                        if let Some(at) = acc.wrote.iter().rposition(|&r| r == void) {
                            acc.wrote.remove(at);
                        }
                    }
                }
                Record::Header { .. }
                | Record::Resumed
                | Record::Wrote { .. }
                | Record::NotWritten { .. } => {}
            }
        }
    }
    let streams: Vec<(i32, u64, u64)> = [1, 2]
        .iter()
        .filter_map(|&fd| {
            // SAFETY: fstat of our own standard stream into a local struct.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            (unsafe { libc::fstat(fd, &mut st) } == 0 && st.st_mode & libc::S_IFMT == libc::S_IFREG)
                .then_some((fd, st.st_ino, st.st_size as u64))
        })
        .collect();
    let mut out = Vec::new();
    let mut inos: Vec<u64> = files.keys().copied().collect();
    inos.sort_unstable();
    for ino in inos {
        let acc = &files[&ino];
        out.push(if acc.stdio {
            plan_stream(ino, acc, &streams)
        } else {
            plan_file(ino, acc, generation)?
        });
    }
    let entries = journals.swap_remove(0).2;
    Ok(Plan {
        generation,
        files: out,
        newer: chain[1..].to_vec(),
        entries,
    })
}

fn plan_stream(ino: u64, acc: &Acc, streams: &[(i32, u64, u64)]) -> FileUndo {
    let mut undo = FileUndo {
        path: acc.path.clone(),
        stdio: true,
        size_now: 0,
        size_restored: 0,
        write_back_bytes: 0,
        removed_bytes: 0,
        note: None,
        pieces: Vec::new(),
        remove: Vec::new(),
        stream_fd: None,
    };
    let Some(&(fd, _, size_now)) = streams.iter().find(|s| s.1 == ino) else {
        undo.note = Some(
            "the job's standard output or error: its later bytes are removed only when the restore writes to this same file".into(),
        );
        return undo;
    };
    undo.size_now = size_now;
    // Cut below its size at the generation (Slurm's --open-mode=truncate on a requeue,
    // say): the recorded offsets no longer point at the job's bytes.
    if size_now < acc.size {
        undo.note = Some(format!(
            "shorter ({size_now} bytes) than at the generation ({} bytes), so rewritten by something else: left alone",
            acc.size
        ));
        return undo;
    }
    undo.stream_fd = Some(fd);
    // The job's own bytes after the generation, merged, within the file as it is.
    let mut ranges: Vec<(u64, u64)> = acc
        .wrote
        .iter()
        .map(|&(a, b)| (a.min(size_now), b.min(size_now)))
        .filter(|(a, b)| a < b)
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    undo.removed_bytes = merged.iter().map(|(a, b)| b - a).sum();
    undo.size_restored = size_now - undo.removed_bytes;
    undo.remove = merged;
    undo
}

fn covered(pieces: &[Piece], from: u64, to: u64) -> bool {
    let mut spans: Vec<(u64, u64)> = pieces
        .iter()
        .map(|p| (p.file_offset, p.file_offset + p.len))
        .collect();
    spans.sort_unstable();
    let mut reach = from;
    for (a, b) in spans {
        if a > reach {
            break;
        }
        reach = reach.max(b);
    }
    reach >= to
}

fn read_piece(p: &Piece) -> Result<Vec<u8>, String> {
    let f = File::open(&p.journal).map_err(|e| format!("{}: {e}", p.journal.display()))?;
    let mut buf = vec![0u8; p.len as usize];
    f.read_exact_at(&mut buf, p.data_offset)
        .map_err(|e| format!("{}: {e}", p.journal.display()))?;
    Ok(buf)
}

fn plan_file(ino: u64, acc: &Acc, generation: u64) -> Result<FileUndo, String> {
    let path = &acc.path;
    let mut undo = FileUndo {
        path: path.clone(),
        stdio: false,
        size_now: 0,
        size_restored: acc.size,
        write_back_bytes: acc.pieces.iter().map(|p| p.len).sum(),
        removed_bytes: 0,
        note: None,
        pieces: acc.pieces.clone(),
        remove: Vec::new(),
        stream_fd: None,
    };
    if let Some((g, what)) = &acc.changed {
        return Err(format!(
            "{}: {what} after generation {g}, and the checkpoint keeps no copy to undo that (see --files)",
            path.display()
        ));
    }
    let md = match std::fs::metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && acc.size == 0 => {
            undo.note = Some("absent, and empty or absent at the generation: nothing to do".into());
            return Ok(undo);
        }
        Err(e) => {
            return Err(format!(
                "{}: {e}; the job had it open for writing at generation {} ({} bytes then)",
                path.display(),
                acc.generation,
                acc.size
            ))
        }
    };
    if md.ino() != ino || !md.is_file() {
        return Err(format!(
            "{}: replaced since generation {} (now inode {}, then {ino}); it is not the file the job had open",
            path.display(),
            acc.generation,
            md.ino()
        ));
    }
    undo.size_now = md.size();
    // Found now rather than half-way through bringing the files back.
    if let Err(e) = OpenOptions::new().write(true).open(path) {
        return Err(format!(
            "{}: cannot open it for writing to bring it back to generation {}: {e}",
            path.display(),
            acc.generation
        ));
    }
    if md.size() < acc.size && !covered(&acc.pieces, md.size(), acc.size) {
        return Err(format!(
            "{}: shrunk to {} bytes since generation {} ({} bytes then), not by the job",
            path.display(),
            md.size(),
            acc.generation,
            acc.size
        ));
    }
    // The last bytes before the restored size, as the restore would leave them, must
    // be what they were: otherwise something other than the job rewrote the file.
    let start = acc.size.saturating_sub(TAIL_CHECK);
    let mut window = vec![0u8; (acc.size - start) as usize];
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let avail = md.size().min(acc.size).saturating_sub(start) as usize;
    f.read_exact_at(&mut window[..avail], start)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    for p in &acc.pieces {
        let (a, b) = (
            p.file_offset.max(start),
            (p.file_offset + p.len).min(acc.size),
        );
        if a >= b {
            continue;
        }
        let data = read_piece(p)?;
        window[(a - start) as usize..(b - start) as usize]
            .copy_from_slice(&data[(a - p.file_offset) as usize..(b - p.file_offset) as usize]);
    }
    if crc32fast::hash(&window) != acc.tail_crc32 {
        return Err(format!(
            "{}: changed since generation {} by something other than the job (its bytes before {} differ)",
            path.display(),
            generation.max(acc.generation),
            acc.size
        ));
    }
    Ok(undo)
}

impl Plan {
    /// Brings the files back. Idempotent: applying it again, or applying an older
    /// generation's plan after it, gives the same files.
    pub fn apply(&self) -> Result<(), String> {
        for f in &self.files {
            if f.note.is_some() {
                continue;
            }
            if f.stdio {
                apply_stream(f)?;
                continue;
            }
            let file = OpenOptions::new()
                .write(true)
                .open(&f.path)
                .map_err(|e| format!("{}: cannot open it to restore it: {e}", f.path.display()))?;
            let io = |e: std::io::Error| format!("{}: {e}", f.path.display());
            for p in &f.pieces {
                file.write_all_at(&read_piece(p)?, p.file_offset)
                    .map_err(io)?;
            }
            file.set_len(f.size_restored).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        Ok(())
    }

    /// Renames the later generations aside (gen-N.abandoned-PID): they describe files
    /// that no longer exist, but are kept rather than deleted.
    pub fn abandon_newer(&self, dir: &Path) {
        for g in &self.newer {
            let from = dir.join(generation_dir_name(*g));
            let to = dir.join(format!(
                "{}.abandoned-{}",
                generation_dir_name(*g),
                std::process::id()
            ));
            if let Err(e) = std::fs::rename(&from, &to) {
                eprintln!(
                    "vmctl: warning: {}: cannot set it aside ({e}); do not restore it: the job's files went back to generation {}",
                    from.display(),
                    self.generation
                );
            }
        }
        let _ = crate::checkpoint::write::fsync_dir(dir);
    }
}

/// Removes the job's own bytes from its output file, keeping everything others wrote,
/// in order.
fn apply_stream(f: &FileUndo) -> Result<(), String> {
    let (Some(fd), Some(&(first, _))) = (f.stream_fd, f.remove.first()) else {
        return Ok(());
    };
    // A descriptor of our own without O_APPEND, so writes land where they are aimed.
    let proc_path = format!("/proc/self/fd/{fd}");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&proc_path)
        .map_err(|e| format!("{} (standard stream {fd}): {e}", f.path.display()))?;
    let io = |e: std::io::Error| format!("{}: {e}", f.path.display());
    let mut tail = vec![0u8; (f.size_now - first) as usize];
    file.read_exact_at(&mut tail, first).map_err(io)?;
    let mut kept = Vec::with_capacity(tail.len());
    let mut pos = first;
    for &(a, b) in &f.remove {
        kept.extend_from_slice(&tail[(pos - first) as usize..(a - first) as usize]);
        pos = b;
    }
    kept.extend_from_slice(&tail[(pos - first) as usize..]);
    file.write_all_at(&kept, first).map_err(io)?;
    file.set_len(first + kept.len() as u64).map_err(io)?;
    file.sync_all().map_err(io)
}
