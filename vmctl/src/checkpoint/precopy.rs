//! Pre-copy: a generation's memory is written in rounds while the guest keeps
//! running, and the guest is stopped only for the last round (the pages written since
//! the round before, by the guest or by vmctl) and the kernel state.
//!
//! Round 1 reads every page and copies it (or, on top of an earlier generation, those
//! whose digest changed since it); each later round copies the pages KVM's dirty log shows written during
//! the round before. Rounds run on a helper thread; they stop when what is left is
//! small, when a round no longer shrinks it, or after `MAX_ROUNDS`. Pages are copied
//! into a buffer first, so each chunk's CRC is of exactly the bytes stored, however
//! the guest changes the page meanwhile. A page copied in several rounds is in the
//! image several times; a reader applies rounds in order.
//!
//! vmctl's own writes into guest RAM are not in the dirty log, and their marks are set
//! before the write lands, so they are only taken in the last round, frozen.

use super::compress::{ChunkBuf, Compression, Encoder};
use super::format::*;
use super::incremental::{Tracker, PAGE_DIGEST_ZERO};
use super::write::{self, Written};
use crate::machine::memory::{bitmap_words, PageBitmap};
use crate::machine::GuestMemory;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

const PAGE: u64 = PAGE_SIZE;
/// Rounds run while the guest runs, at most.
pub const MAX_ROUNDS: u32 = 8;
/// Stop the rounds once what is left to copy frozen is no more than this.
pub const CONVERGED_BYTES: u64 = 16 << 20;

/// What the generation builds on.
#[derive(Clone, Copy, Debug)]
pub enum Basis {
    Full,
    Incremental { parent: u64, parent_crc32: u32 },
}

/// Everything a session writes, owned by the round thread while it runs.
struct Image {
    file: File,
    path: PathBuf,
    next_offset: AtomicU64,
    chunks: Vec<Chunk>,
    /// Pages whose newest copy is all zero.
    zero: PageBitmap,
    /// Digest of each page as this image (over its chain) now holds it.
    digests: Vec<u128>,
    round: u32,
    seed: u64,
    compression: Compression,
    /// Bytes each round stored.
    rounds: Vec<u64>,
}

fn set_bit(bits: &mut [u64], page: u64, on: bool) {
    let (w, b) = ((page / 64) as usize, page % 64);
    if let Some(word) = bits.get_mut(w) {
        if on {
            *word |= 1 << b;
        } else {
            *word &= !(1 << b);
        }
    }
}

fn count_pages(bits: &[u64]) -> u64 {
    bits.iter().map(|w| w.count_ones() as u64).sum()
}

impl Image {
    /// Copies the pages set in `set` whose content differs from what the image holds,
    /// with several threads. Safe while the guest runs.
    fn copy(&mut self, mem: &GuestMemory, set: &[u64]) -> std::io::Result<u64> {
        self.round += 1;
        let last_page = set
            .iter()
            .rposition(|&w| w != 0)
            .map_or(0, |w| (w as u64 + 1) * 64);
        if (self.digests.len() as u64) < last_page {
            self.digests.resize(last_page as usize, PAGE_DIGEST_ZERO);
        }
        let threads = write::io_threads();
        let words_per = set.len().div_ceil(threads).max(1);
        let round = self.round;
        let seed = self.seed;
        let compression = self.compression;
        let (file, next_offset) = (&self.file, &self.next_offset);
        let mut digests_rest: &mut [u128] = &mut self.digests;
        let mut zero_rest: &mut [u64] = &mut self.zero;
        let mut work = Vec::new();
        for (i, words) in set.chunks(words_per).enumerate() {
            let first_page = (i * words_per * 64) as u64;
            let dn = (words.len() * 64).min(digests_rest.len());
            let (d, rest) = std::mem::take(&mut digests_rest).split_at_mut(dn);
            digests_rest = rest;
            let zn = words.len().min(zero_rest.len());
            let (z, rest) = std::mem::take(&mut zero_rest).split_at_mut(zn);
            zero_rest = rest;
            work.push((first_page, words, d, z));
        }
        let results: Vec<std::io::Result<(Vec<Chunk>, u64)>> = std::thread::scope(|s| {
            let handles: Vec<_> = work
                .into_iter()
                .map(|(first_page, words, digests, zero)| {
                    s.spawn(move || {
                        copy_part(
                            mem,
                            file,
                            next_offset,
                            round,
                            seed,
                            compression,
                            first_page,
                            words,
                            digests,
                            zero,
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("copy thread panicked"))
                .collect()
        });
        let mut bytes = 0;
        for r in results {
            let (chunks, b) = r?;
            self.chunks.extend(chunks);
            bytes += b;
        }
        self.rounds.push(bytes);
        Ok(bytes)
    }
}

#[allow(clippy::too_many_arguments)]
fn copy_part(
    mem: &GuestMemory,
    file: &File,
    next_offset: &AtomicU64,
    round: u32,
    seed: u64,
    compression: Compression,
    first_page: u64,
    words: &[u64],
    digests: &mut [u128],
    zero: &mut [u64],
) -> std::io::Result<(Vec<Chunk>, u64)> {
    // Page-aligned, as O_DIRECT needs.
    let mut buf = ChunkBuf::new();
    let mut encoder = Encoder::new(compression);
    let mut chunks = Vec::new();
    let mut runs: Vec<Run> = Vec::new();
    let mut used = 0usize;
    let mut bytes = 0u64;
    let per_chunk = (CHUNK_BYTES / PAGE) as usize;
    let mut flush =
        |buf: &mut ChunkBuf, runs: &mut Vec<Run>, used: &mut usize| -> std::io::Result<()> {
            if *used == 0 {
                return Ok(());
            }
            let len = *used * PAGE as usize;
            let data = &buf.as_mut_slice()[..len];
            let crc32 = crc32fast::hash(data);
            let (stored, compressed) = match encoder.as_mut().and_then(|e| e.encode(data)) {
                Some((stored, c)) => (stored, Some(c)),
                None => (data, None),
            };
            let offset = next_offset.fetch_add(stored.len() as u64, Ordering::Relaxed);
            let iov = [libc::iovec {
                iov_base: stored.as_ptr() as *mut _,
                iov_len: stored.len(),
            }];
            write::write_all_iov(file, &iov, offset)?;
            chunks.push(Chunk {
                offset,
                runs: std::mem::take(runs),
                crc32,
                round,
                compressed,
            });
            bytes += stored.len() as u64;
            *used = 0;
            Ok(())
        };
    for (wi, &word) in words.iter().enumerate() {
        let mut w = word;
        while w != 0 {
            let bit = w.trailing_zeros() as u64;
            w &= w - 1;
            let local = wi as u64 * 64 + bit;
            let page = first_page + local;
            let Some(src) = mem.host_ptr_for_read(page * PAGE, PAGE) else {
                continue;
            };
            let dst = &mut buf.as_mut_slice()[used * PAGE as usize..][..PAGE as usize];
            // SAFETY: src is PAGE readable bytes of guest RAM (which the guest may be
            // changing: the copy is what gets checksummed and stored), dst is a page of
            // our own buffer.
            unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), PAGE as usize) };
            let d = super::incremental::digest(seed, dst);
            let known = digests
                .get(local as usize)
                .copied()
                .unwrap_or(PAGE_DIGEST_ZERO);
            if d == known {
                continue;
            }
            if let Some(slot) = digests.get_mut(local as usize) {
                *slot = d;
            }
            if d == PAGE_DIGEST_ZERO {
                set_bit(zero, local, true);
                continue;
            }
            set_bit(zero, local, false);
            write::push_page(&mut runs, page * PAGE);
            used += 1;
            if used == per_chunk {
                flush(&mut buf, &mut runs, &mut used)?;
            }
        }
    }
    flush(&mut buf, &mut runs, &mut used)?;
    Ok((chunks, bytes))
}

/// A pre-copy checkpoint in progress.
pub struct Session {
    dir: PathBuf,
    tmp: PathBuf,
    generation: u64,
    basis: Basis,
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<Result<(Image, PageBitmap), String>>>,
    started_ns: i64,
}

/// What the rounds wrote, for reports.
pub struct Summary {
    pub rounds: Vec<u64>,
    pub running_seconds: f64,
}

impl Session {
    /// Starts the rounds on a helper thread, the guest stopped at a safe point (the
    /// caller lets it run again right after); `on_ready` is called from the helper once
    /// the rounds are done or failed, to stop the guest and call `finish`.
    pub fn start(
        dir: &Path,
        mem: Arc<GuestMemory>,
        tracker: &mut Tracker,
        limit: u64,
        compression: Compression,
        on_ready: impl FnOnce() + Send + 'static,
    ) -> Result<Session, String> {
        let generation = write::next_generation(dir).map_err(|e| e.to_string())?;
        let start = tracker
            .precopy_start(&mem, limit)
            .map_err(|e| format!("KVM's dirty log: {e}"))?;
        let tmp = write::begin_generation(dir, generation).map_err(|e| e.to_string())?;
        let path = tmp.join(MEMORY);
        let file = match write::create_image(&path) {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                tracker.precopy_failed(&mem);
                return Err(e.to_string());
            }
        };
        let mut image = Image {
            file,
            path,
            next_offset: AtomicU64::new(0),
            chunks: Vec::new(),
            zero: vec![0; bitmap_words(mem.size())],
            digests: start.digests,
            round: 0,
            seed: start.seed,
            compression,
            rounds: Vec::new(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let mut set = start.first_round;
        let worker = std::thread::Builder::new()
            .name("vmctl-precopy".into())
            .spawn(move || {
                crate::control::signals::block_in_this_thread();
                let mut rounds = || -> Result<(), String> {
                    let mut previous = u64::MAX;
                    loop {
                        image
                            .copy(&mem, &set)
                            .map_err(|e| format!("{}: {e}", image.path.display()))?;
                        set.iter_mut().for_each(|w| *w = 0);
                        mem.take_guest_dirty(&mut set)
                            .map_err(|e| format!("KVM's dirty log: {e}"))?;
                        let left = count_pages(&set) * PAGE;
                        if stop2.load(Ordering::Acquire)
                            || left <= CONVERGED_BYTES
                            || image.round >= MAX_ROUNDS
                            || left >= previous
                        {
                            break;
                        }
                        previous = left;
                    }
                    // Most of the image is on disk: flush it (and its block
                    // allocations) now, so the last flush, with the guest stopped, is
                    // short.
                    image
                        .file
                        .sync_data()
                        .map_err(|e| format!("{}: {e}", image.path.display()))
                };
                let result = rounds();
                // Failed or not, the caller must come and finish (or report).
                on_ready();
                result.map(|()| (image, set))
            })
            .map_err(|e| format!("cannot start the pre-copy thread: {e}"))?;
        Ok(Session {
            dir: dir.to_path_buf(),
            tmp,
            generation,
            basis: start.basis,
            stop,
            worker: Some(worker),
            started_ns: crate::clock::monotonic_ns(),
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// With the guest stopped at a safe point: ends the rounds, copies what is left
    /// (the guest's writes since the last round and all of vmctl's since the previous
    /// generation), writes the `extra` files and `manifest` and makes the generation
    /// durable.
    pub fn finish(
        mut self,
        mem: &GuestMemory,
        tracker: &mut Tracker,
        manifest: &mut Manifest,
        extra: &[(&str, &[u8])],
    ) -> Result<(Written, Summary), String> {
        self.stop.store(true, Ordering::Release);
        let joined = self
            .worker
            .take()
            .expect("finished once")
            .join()
            .unwrap_or_else(|_| Err("the pre-copy thread panicked".into()));
        let t0 = crate::clock::monotonic_ns();
        trace("joined", t0);
        let result = joined.and_then(|(mut image, mut set)| {
            if std::env::var_os("VMCTL_MUTANT").is_none() {
                mem.take_guest_dirty(&mut set)
                    .map_err(|e| format!("KVM's dirty log: {e}"))?;
            }
            mem.take_host_dirty(&mut set);
            trace("dirty log", t0);
            let last = image
                .copy(mem, &set)
                .map_err(|e| format!("{}: {e}", image.path.display()))?;
            trace(&format!("last round {last} bytes"), t0);
            image
                .file
                .sync_data()
                .map_err(|e| format!("{}: {e}", image.path.display()))?;
            trace("image synced", t0);
            manifest.generation = self.generation;
            let parent = match self.basis {
                Basis::Full => None,
                Basis::Incremental {
                    parent,
                    parent_crc32,
                } => Some((parent, parent_crc32)),
            };
            super::incremental::describe_parent(manifest, parent);
            let mut chunks = std::mem::take(&mut image.chunks);
            chunks.sort_by_key(|c| (c.round, c.offset));
            manifest.memory = MemoryImage {
                file: MEMORY.into(),
                page_size: PAGE,
                ram_bytes: mem.size(),
                data_bytes: image.next_offset.load(Ordering::Relaxed),
                chunks,
                zero_runs: runs_of(&image.zero),
            };
            let written = write::seal_generation(&self.dir, &self.tmp, manifest, extra)
                .map_err(|e| e.to_string())?;
            trace("sealed", t0);
            let summary = Summary {
                rounds: image.rounds.clone(),
                running_seconds: (crate::clock::monotonic_ns() - self.started_ns) as f64 / 1e9,
            };
            Ok((written, image.digests, summary))
        });
        match result {
            Ok((written, digests, summary)) => {
                tracker.precopy_done(mem, self.basis, &written, digests);
                Ok((written, summary))
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&self.tmp);
                tracker.precopy_failed(mem);
                Err(e)
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Abandoned (the job ended first): stop the rounds and remove the partial image.
        if let Some(w) = self.worker.take() {
            self.stop.store(true, Ordering::Release);
            let _ = w.join();
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// With VMCTL_TRACE_FREEZE set, prints how long since `t0` a phase of a frozen
/// checkpoint ended.
pub fn trace(what: &str, t0: i64) {
    if std::env::var_os("VMCTL_TRACE_FREEZE").is_some() {
        eprintln!(
            "vmctl: freeze trace: {what} at {:.1} ms",
            (crate::clock::monotonic_ns() - t0) as f64 / 1e6
        );
    }
}

fn runs_of(bits: &[u64]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for (wi, &word) in bits.iter().enumerate() {
        let mut w = word;
        while w != 0 {
            let page = wi as u64 * 64 + w.trailing_zeros() as u64;
            w &= w - 1;
            write::push_page(&mut runs, page * PAGE);
        }
    }
    runs
}
