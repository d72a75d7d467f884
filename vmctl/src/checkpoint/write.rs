//! Writing a generation: memory image, manifest, checksum, then an atomic rename.
//! A crash at any point leaves either the complete new generation or none of it.

use super::format::*;
use super::CheckpointError;
use crate::machine::GuestMemory;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub struct Written {
    pub generation: u64,
    pub path: PathBuf,
    /// Bytes of guest memory stored (non-zero pages).
    pub memory_bytes: u64,
    /// All bytes written for the generation.
    pub total_bytes: u64,
}

fn io(path: &Path, e: std::io::Error) -> CheckpointError {
    CheckpointError::Io(path.to_path_buf(), e)
}

fn create_file(path: &Path) -> Result<File, CheckpointError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io(path, e))
}

pub fn fsync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

fn is_zero(page: &[u8]) -> bool {
    // SAFETY: reinterpreting initialized bytes as u64 words is always valid; align_to
    // hands back any unaligned head and tail as bytes.
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Opens the image for direct I/O where the filesystem allows it: guest pages are
/// page-aligned already, and bypassing the page cache spares the host from
/// allocating (on this platform: faulting in from its own hypervisor) a page-cache
/// page for every guest page written.
fn create_image(path: &Path) -> Result<File, CheckpointError> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Ok(f),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => create_file(path),
        Err(e) => Err(io(path, e)),
    }
}

/// Writes every non-zero page of guest RAM below `limit` to `path`.
pub fn write_memory(
    mem: &GuestMemory,
    limit: u64,
    path: &Path,
) -> Result<MemoryImage, CheckpointError> {
    let file = create_image(path)?;
    let mut chunks = Vec::new();
    let mut offset = 0u64;
    let mut current: Vec<Run> = Vec::new();
    let mut current_bytes = 0u64;
    let limit = limit.min(mem.size());

    let mut flush =
        |runs: &mut Vec<Run>, bytes: &mut u64, offset: &mut u64| -> Result<(), CheckpointError> {
            if runs.is_empty() {
                return Ok(());
            }
            let mut hasher = crc32fast::Hasher::new();
            let iov: Vec<libc::iovec> = runs
                .iter()
                .map(|r| {
                    let data = mem
                        .slice(r.gpa, r.pages * PAGE_SIZE)
                        .expect("run inside RAM");
                    hasher.update(data);
                    libc::iovec {
                        iov_base: data.as_ptr() as *mut _,
                        iov_len: data.len(),
                    }
                })
                .collect();
            write_all_iov(&file, &iov, *offset).map_err(|e| io(path, e))?;
            chunks.push(Chunk {
                offset: *offset,
                runs: std::mem::take(runs),
                crc32: hasher.finalize(),
            });
            *offset += *bytes;
            *bytes = 0;
            Ok(())
        };

    let mut progress = crate::events::Progress::new("checkpoint", limit);
    let mut gpa = 0u64;
    while gpa < limit {
        if gpa.is_multiple_of(CHUNK_BYTES) {
            progress.update(gpa);
        }
        let page = mem.slice(gpa, PAGE_SIZE).expect("page inside RAM");
        if !is_zero(page) {
            match current.last_mut() {
                Some(r) if r.gpa + r.pages * PAGE_SIZE == gpa => r.pages += 1,
                _ => current.push(Run { gpa, pages: 1 }),
            }
            current_bytes += PAGE_SIZE;
            if current_bytes >= CHUNK_BYTES {
                flush(&mut current, &mut current_bytes, &mut offset)?;
            }
        }
        gpa += PAGE_SIZE;
    }
    flush(&mut current, &mut current_bytes, &mut offset)?;
    file.sync_data().map_err(|e| io(path, e))?;
    Ok(MemoryImage {
        file: MEMORY.to_string(),
        page_size: PAGE_SIZE,
        ram_bytes: mem.size(),
        data_bytes: offset,
        chunks,
    })
}

fn write_all_iov(file: &File, iov: &[libc::iovec], offset: u64) -> std::io::Result<()> {
    crate::iov::transfer_all(file.as_raw_fd(), iov, offset, crate::iov::Direction::Write)
        .map(|_| ())
}

/// The next generation number: one past the highest complete one.
pub fn next_generation(dir: &Path) -> Result<u64, CheckpointError> {
    Ok(super::read::list_generations(dir)?
        .first()
        .map_or(1, |g| g + 1))
}

/// Writes `manifest`, the memory of `mem` and the `extra` files (name, contents) as a
/// new generation of `dir`.
pub fn write_generation(
    dir: &Path,
    mem: &GuestMemory,
    memory_limit: u64,
    manifest: &mut Manifest,
    extra: &[(&str, &[u8])],
) -> Result<Written, CheckpointError> {
    let generation = manifest.generation;
    let final_dir = dir.join(generation_dir_name(generation));
    let tmp = dir.join(format!(
        "{}.tmp-{}",
        generation_dir_name(generation),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(|e| io(&tmp, e))?;
    let result = (|| {
        manifest.memory = write_memory(mem, memory_limit, &tmp.join(MEMORY))?;
        let mut extra_bytes = 0;
        for (name, contents) in extra {
            let path = tmp.join(name);
            let mut f = create_file(&path)?;
            f.write_all(contents).map_err(|e| io(&path, e))?;
            f.sync_all().map_err(|e| io(&path, e))?;
            extra_bytes += contents.len() as u64;
        }
        let json = serde_json::to_vec(&manifest)
            .map_err(|e| CheckpointError::Format(tmp.join(MANIFEST), e.to_string()))?;
        let mpath = tmp.join(MANIFEST);
        let mut f = create_file(&mpath)?;
        f.write_all(&json).map_err(|e| io(&mpath, e))?;
        f.sync_all().map_err(|e| io(&mpath, e))?;
        let spath = tmp.join(MANIFEST_SUM);
        let mut s = create_file(&spath)?;
        writeln!(s, "crc32 {:08x} {}", crc32fast::hash(&json), MANIFEST)
            .map_err(|e| io(&spath, e))?;
        s.sync_all().map_err(|e| io(&spath, e))?;
        fsync_dir(&tmp)?;
        fs::rename(&tmp, &final_dir).map_err(|e| io(&final_dir, e))?;
        fsync_dir(dir)?;
        update_latest(dir, generation)?;
        Ok(manifest.memory.data_bytes + json.len() as u64 + extra_bytes)
    })();
    match result {
        Ok(total) => Ok(Written {
            generation,
            path: final_dir,
            memory_bytes: manifest.memory.data_bytes,
            total_bytes: total,
        }),
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn update_latest(dir: &Path, generation: u64) -> Result<(), CheckpointError> {
    let tmp = dir.join(format!(".{LATEST}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(generation_dir_name(generation), &tmp).map_err(|e| io(&tmp, e))?;
    let latest = dir.join(LATEST);
    fs::rename(&tmp, &latest).map_err(|e| io(&latest, e))?;
    fsync_dir(dir)
}

/// Removes a generation directory so that a crash at any point leaves it either
/// whole or not a generation at all: it is first renamed out of the gen-NNNNNN
/// names (a leftover that the next prune removes), then deleted file by file.
pub fn remove_generation(dir: &Path, generation: u64) {
    let name = generation_dir_name(generation);
    let doomed = dir.join(format!("{name}.tmp-{}-removed", std::process::id()));
    if fs::rename(dir.join(&name), &doomed).is_ok() {
        let _ = fs::remove_dir_all(&doomed);
    }
}

/// Removes generations beyond the newest `keep`, and leftovers of interrupted writes.
pub fn prune(dir: &Path, keep: usize) {
    if let Ok(gens) = super::read::list_generations(dir) {
        for g in gens.iter().skip(keep.max(1)) {
            remove_generation(dir, *g);
        }
    }
    if let Ok(entries) = fs::read_dir(dir) {
        let me = format!(".tmp-{}", std::process::id());
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(GEN_PREFIX) && name.contains(".tmp-") && !name.ends_with(&me) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}
