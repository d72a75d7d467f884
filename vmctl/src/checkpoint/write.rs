//! Writing a generation: memory image, manifest, checksum, then an atomic rename.
//! A crash at any point leaves either the complete new generation or none of it.

use super::compress::{ChunkBuf, Compression, Encoder};
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
    /// CRC32 of its manifest.json, which a child generation records.
    pub manifest_crc32: u32,
    pub path: PathBuf,
    /// Bytes of the memory image (non-zero pages, some of them compressed).
    pub memory_bytes: u64,
    /// Bytes of guest memory the image holds, before compression.
    pub page_bytes: u64,
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

pub fn is_zero(page: &[u8]) -> bool {
    // SAFETY: reinterpreting initialized bytes as u64 words is always valid; align_to
    // hands back any unaligned head and tail as bytes.
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Opens the image for direct I/O where the filesystem allows it: guest pages are
/// page-aligned already, and bypassing the page cache spares the host from
/// allocating (on this platform: faulting in from its own hypervisor) a page-cache
/// page for every guest page written.
pub fn create_image(path: &Path) -> Result<File, CheckpointError> {
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

/// Which guest pages a memory image stores.
#[derive(Clone, Copy)]
pub enum Pages<'a> {
    /// Every non-zero page below a limit (a full generation).
    All { limit: u64 },
    /// The pages set in a bitmap (an incremental generation): the non-zero ones as
    /// data, the zero ones as `zero_runs`.
    Dirty(&'a [u64]),
}

/// Threads writing (and reading back) an image: enough to keep several direct I/Os in
/// flight, which is what a disk or a parallel filesystem needs to reach its speed.
pub fn io_threads() -> usize {
    std::env::var("VMCTL_IO_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| (1..=64).contains(&n))
        .unwrap_or(4)
}

/// The chunks (runs only) and zero runs found in pages `[first, end)`.
struct Scanned {
    chunks: Vec<Vec<Run>>,
    zero_runs: Vec<Run>,
}

/// Adds the page at `gpa` to `runs`, extending the last run when it ends there.
pub(super) fn push_page(runs: &mut Vec<Run>, gpa: u64) {
    match runs.last_mut() {
        Some(r) if r.gpa + r.pages * PAGE_SIZE == gpa => r.pages += 1,
        _ => runs.push(Run { gpa, pages: 1 }),
    }
}

fn scan(mem: &GuestMemory, pages: Pages, first: u64, end: u64) -> Scanned {
    let mut out = Scanned {
        chunks: Vec::new(),
        zero_runs: Vec::new(),
    };
    let mut current: Vec<Run> = Vec::new();
    let mut current_bytes = 0u64;
    let mut visit = |page: u64, out: &mut Scanned| {
        let gpa = page * PAGE_SIZE;
        let data = mem.slice(gpa, PAGE_SIZE).expect("page inside RAM");
        if is_zero(data) {
            if let Pages::Dirty(_) = pages {
                push_page(&mut out.zero_runs, gpa);
            }
            return;
        }
        push_page(&mut current, gpa);
        current_bytes += PAGE_SIZE;
        if current_bytes >= CHUNK_BYTES {
            out.chunks.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
    };
    match pages {
        Pages::All { .. } => (first..end).for_each(|p| visit(p, &mut out)),
        Pages::Dirty(bits) => {
            let mut word = first / 64;
            while word * 64 < end {
                let mut w = bits.get(word as usize).copied().unwrap_or(0);
                while w != 0 {
                    let page = word * 64 + w.trailing_zeros() as u64;
                    w &= w - 1;
                    if page >= first && page < end {
                        visit(page, &mut out);
                    }
                }
                word += 1;
            }
        }
    }
    if !current.is_empty() {
        out.chunks.push(current);
    }
    out
}

/// Writes the selected pages of guest RAM to `path`, several chunks at a time,
/// compressing each chunk as `compression` says.
/// The guest must not run meanwhile (each chunk's CRC is of the bytes written).
pub fn write_memory(
    mem: &GuestMemory,
    pages: Pages,
    path: &Path,
    compression: Compression,
) -> Result<MemoryImage, CheckpointError> {
    let file = create_image(path)?;
    let total_pages = match pages {
        Pages::All { limit } => limit.min(mem.size()) / PAGE_SIZE,
        Pages::Dirty(_) => mem.size() / PAGE_SIZE,
    };
    let threads = io_threads();
    // Slices of whole bitmap words, one per thread, scanned in parallel.
    let per = (total_pages.div_ceil(threads as u64))
        .next_multiple_of(64)
        .max(64);
    let scanned: Vec<Scanned> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads as u64)
            .map(|i| (i * per, ((i + 1) * per).min(total_pages)))
            .filter(|(a, b)| a < b)
            .map(|(a, b)| s.spawn(move || scan(mem, pages, a, b)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("scan thread panicked"))
            .collect()
    });
    let mut chunks = Vec::new();
    let mut zero_runs: Vec<Run> = Vec::new();
    let mut page_bytes = 0u64;
    for sc in scanned {
        for runs in sc.chunks {
            let c = Chunk {
                offset: 0,
                runs,
                crc32: 0,
                round: 0,
                compressed: None,
            };
            page_bytes += c.bytes();
            chunks.push(c);
        }
        for r in sc.zero_runs {
            match zero_runs.last_mut() {
                Some(l) if l.gpa + l.pages * PAGE_SIZE == r.gpa => l.pages += r.pages,
                _ => zero_runs.push(r),
            }
        }
    }
    // The progress line (in bytes of pages), and the bytes written so far.
    let progress =
        std::sync::Mutex::new((crate::events::Progress::new("checkpoint", page_bytes), 0u64));
    let next = std::sync::atomic::AtomicUsize::new(0);
    // Compressed chunks have sizes known only once compressed: each takes its place
    // in the file as it is written, and the list is put in file order at the end.
    let next_offset = std::sync::atomic::AtomicU64::new(0);
    let written: Vec<std::sync::Mutex<(u64, u32, Option<Compressed>)>> = (0..chunks.len())
        .map(|_| std::sync::Mutex::new((0, 0, None)))
        .collect();
    let failure: std::sync::Mutex<Option<std::io::Error>> = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.min(chunks.len()) {
            s.spawn(|| {
                let mut encoder = Encoder::new(compression);
                let mut gather = encoder.as_ref().map(|_| ChunkBuf::new());
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(c) = chunks.get(i) else { break };
                    if failure.lock().expect("poisoned").is_some() {
                        break;
                    }
                    let result = write_chunk(
                        &file,
                        mem,
                        c,
                        &next_offset,
                        encoder.as_mut().zip(gather.as_mut()),
                    );
                    match result {
                        Ok(w) => *written[i].lock().expect("poisoned") = w,
                        Err(e) => {
                            failure.lock().expect("poisoned").get_or_insert(e);
                            break;
                        }
                    }
                    let mut p = progress.lock().expect("poisoned");
                    p.1 += c.bytes();
                    let done = p.1;
                    p.0.update(done);
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().expect("poisoned") {
        return Err(io(path, e));
    }
    for (c, w) in chunks.iter_mut().zip(written) {
        (c.offset, c.crc32, c.compressed) = w.into_inner().expect("poisoned");
    }
    chunks.sort_unstable_by_key(|c| c.offset);
    file.sync_data().map_err(|e| io(path, e))?;
    Ok(MemoryImage {
        file: MEMORY.to_string(),
        page_size: PAGE_SIZE,
        ram_bytes: mem.size(),
        data_bytes: next_offset.into_inner(),
        chunks,
        zero_runs,
    })
}

/// Writes one chunk's pages at the next free offset of the image, compressed when
/// `compress` is given and that makes it smaller; returns its offset, CRC32 (of the
/// pages) and how it was compressed.
fn write_chunk(
    file: &File,
    mem: &GuestMemory,
    c: &Chunk,
    next_offset: &std::sync::atomic::AtomicU64,
    compress: Option<(&mut Encoder, &mut ChunkBuf)>,
) -> std::io::Result<(u64, u32, Option<Compressed>)> {
    let slices: Vec<&[u8]> = c
        .runs
        .iter()
        .map(|r| {
            mem.slice(r.gpa, r.pages * PAGE_SIZE)
                .expect("run inside RAM")
        })
        .collect();
    let mut hasher = crc32fast::Hasher::new();
    slices.iter().for_each(|s| hasher.update(s));
    let crc32 = hasher.finalize();
    let take = |len: usize| next_offset.fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
    if let Some((encoder, gather)) = compress {
        let len = c.bytes() as usize;
        let buf = gather.as_mut_slice();
        let mut at = 0;
        for s in &slices {
            buf[at..at + s.len()].copy_from_slice(s);
            at += s.len();
        }
        if let Some((stored, described)) = encoder.encode(&buf[..len]) {
            let offset = take(stored.len());
            let iov = [libc::iovec {
                iov_base: stored.as_ptr() as *mut _,
                iov_len: stored.len(),
            }];
            write_all_iov(file, &iov, offset)?;
            return Ok((offset, crc32, Some(described)));
        }
    }
    let iov: Vec<libc::iovec> = slices
        .iter()
        .map(|s| libc::iovec {
            iov_base: s.as_ptr() as *mut _,
            iov_len: s.len(),
        })
        .collect();
    let offset = take(c.bytes() as usize);
    write_all_iov(file, &iov, offset)?;
    Ok((offset, crc32, None))
}

pub fn write_all_iov(file: &File, iov: &[libc::iovec], offset: u64) -> std::io::Result<()> {
    crate::iov::transfer_all(file.as_raw_fd(), iov, offset, crate::iov::Direction::Write)
        .map(|_| ())
}

/// The next generation number: one past the highest complete one.
pub fn next_generation(dir: &Path) -> Result<u64, CheckpointError> {
    Ok(super::read::list_generations(dir)?
        .first()
        .map_or(1, |g| g + 1))
}

/// Creates the temporary directory generation `generation` is written into.
pub fn begin_generation(dir: &Path, generation: u64) -> Result<PathBuf, CheckpointError> {
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
    Ok(tmp)
}

/// Writes the `extra` files (name, contents), the manifest and its sum into `tmp`
/// (whose image is complete and synced), then renames it into place and points
/// `latest` at it. On failure `tmp` is removed.
pub fn seal_generation(
    dir: &Path,
    tmp: &Path,
    manifest: &mut Manifest,
    extra: &[(&str, &[u8])],
) -> Result<Written, CheckpointError> {
    let generation = manifest.generation;
    let final_dir = dir.join(generation_dir_name(generation));
    // Only a generation that needs format 4 says so: the others stay readable by a
    // vmctl that reads formats 2 to 3.
    let compressed = manifest
        .memory
        .chunks
        .iter()
        .any(|c| c.compressed.is_some());
    manifest.format_version = if compressed {
        FORMAT_VERSION
    } else {
        FORMAT_VERSION_UNCOMPRESSED
    };
    let manifest = &*manifest;
    let result = (|| {
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
        let manifest_crc32 = crc32fast::hash(&json);
        let spath = tmp.join(MANIFEST_SUM);
        let mut s = create_file(&spath)?;
        writeln!(s, "crc32 {manifest_crc32:08x} {MANIFEST}").map_err(|e| io(&spath, e))?;
        s.sync_all().map_err(|e| io(&spath, e))?;
        fsync_dir(tmp)?;
        fs::rename(tmp, &final_dir).map_err(|e| io(&final_dir, e))?;
        fsync_dir(dir)?;
        update_latest(dir, generation)?;
        Ok((
            manifest.memory.data_bytes + json.len() as u64 + extra_bytes,
            manifest_crc32,
        ))
    })();
    match result {
        Ok((total, manifest_crc32)) => Ok(Written {
            generation,
            manifest_crc32,
            path: final_dir,
            memory_bytes: manifest.memory.data_bytes,
            page_bytes: manifest.memory.chunks.iter().map(Chunk::bytes).sum(),
            total_bytes: total,
        }),
        Err(e) => {
            let _ = fs::remove_dir_all(tmp);
            Err(e)
        }
    }
}

/// Writes `manifest` and the memory of `mem` as a new generation of `dir`.
pub fn write_generation(
    dir: &Path,
    mem: &GuestMemory,
    pages: Pages,
    compression: Compression,
    manifest: &mut Manifest,
    extra: &[(&str, &[u8])],
) -> Result<Written, CheckpointError> {
    let tmp = begin_generation(dir, manifest.generation)?;
    match write_memory(mem, pages, &tmp.join(MEMORY), compression) {
        Ok(image) => manifest.memory = image,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    }
    seal_generation(dir, &tmp, manifest, extra)
}

/// The newest `keep` of `gens` and every generation they build on; None when that
/// cannot be told (a kept manifest could not be read, or was refused), and nothing
/// may go.
pub fn needed_generations(
    dir: &Path,
    gens: &[u64],
    keep: usize,
) -> Option<std::collections::BTreeSet<u64>> {
    let mut needed: std::collections::BTreeSet<u64> = gens.iter().take(keep).copied().collect();
    let mut todo: Vec<u64> = needed.iter().copied().collect();
    while let Some(g) = todo.pop() {
        match super::read::load_manifest(&dir.join(generation_dir_name(g))) {
            Ok(m) => {
                // load_manifest made sure a parent is older, so this ends.
                if let Some(p) = m.parent {
                    if needed.insert(p) {
                        todo.push(p);
                    }
                }
            }
            // Gone meanwhile: it needs nothing.
            Err(CheckpointError::Io(_, e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            // Unreadable, damaged, foreign or from a newer vmctl: what it builds on
            // cannot be told, and an older generation may be the one a restore falls
            // back to, so nothing goes this time.
            Err(_) => return None,
        }
    }
    Some(needed)
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

/// Removes generations beyond the newest `keep`, except those a kept generation builds
/// on, and leftovers of interrupted writes. The newest go first, so a crash midway
/// never leaves a generation whose parent is gone while it stays.
pub fn prune(dir: &Path, keep: usize) {
    if let Ok(gens) = super::read::list_generations(dir) {
        let needed = needed_generations(dir, &gens, keep.max(1));
        for g in gens
            .iter()
            .filter(|g| needed.as_ref().is_some_and(|n| !n.contains(g)))
        {
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
