//! Lazy restore: the job runs again as soon as its kernel state is restored, while a
//! loader thread fills guest RAM from the chain's memory images behind it.
//!
//! Guest RAM (all but the first 2 MiB, vmctl's own system tables, which are loaded at
//! once) is registered with a userfaultfd in MISSING mode. Any first touch of a page
//! not yet loaded, by a vCPU (KVM resolves the guest's fault on the host mapping) or
//! by vmctl itself (syscall buffers, page tables, a checkpoint), waits in the host
//! kernel until the loader installs that page's whole 2 MiB region. The loader serves
//! such faults first and otherwise loads the regions in address order.
//!
//! A region is assembled in a private 2 MiB staging buffer from every chunk and zero
//! run of the chain that touches it, oldest generation first (a later copy of a page
//! wins, as in an eager restore); each chunk is read whole and its CRC32 checked
//! before any of its bytes are used. The staging buffer is THP-backed and installed
//! with UFFDIO_MOVE, which hands the whole huge page over: guest RAM stays 2 MiB pages
//! for KVM, where a 4 KiB host page would cost the guest microseconds per first touch
//! (shared/PLATFORM.md). Without UFFDIO_MOVE (kernels before 6.8) it is copied in.
//!
//! A chunk that fails its check once the job runs cannot be fallen back from (the job
//! has already run on the generation's other pages), so the process stops at once with
//! the generation and chunk named and exit status 125; nothing in the checkpoint
//! directory is removed, and an eager restore (`--lazy=off`) then falls back to the
//! newest intact generation.

use super::format::{Chunk, MemoryImage, Run, PAGE_SIZE};
use super::read::{open_image, Link};
use super::CheckpointError;
use crate::machine::layout::SYSTEM_SIZE;
use crate::machine::memory::HUGE_PAGE;
use crate::machine::GuestMemory;
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The kernel's userfaultfd ABI (linux/userfaultfd.h); libc has none of it.
mod abi {
    pub const UFFD_API: u64 = 0xaa;
    pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;
    pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
    pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
    /// _IO(0xAA, 0x00), on a descriptor open on /dev/userfaultfd.
    pub const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;
    pub const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
    pub const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
    pub const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
    pub const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
    pub const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
    pub const UFFDIO_MOVE: libc::c_ulong = 0xc028_aa05;

    #[repr(C)]
    pub struct Api {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }
    #[repr(C)]
    pub struct Range {
        pub start: u64,
        pub len: u64,
    }
    #[repr(C)]
    pub struct Register {
        pub range: Range,
        pub mode: u64,
        pub ioctls: u64,
    }
    /// uffdio_copy and uffdio_move have the same layout.
    #[repr(C)]
    pub struct Transfer {
        pub dst: u64,
        pub src: u64,
        pub len: u64,
        pub mode: u64,
        pub done: i64,
    }
    /// struct uffd_msg for a page fault.
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    pub struct Msg {
        pub event: u8,
        pub reserved: [u8; 7],
        pub flags: u64,
        pub address: u64,
        pub ptid: u32,
        pub pad: u32,
    }
}

const MADV_POPULATE_WRITE: libc::c_int = 23;
/// Verified chunks kept for the regions that still need them: a chunk of an
/// incremental generation can hold pages of hundreds of regions.
const CACHE_BYTES: u64 = 256 << 20;
/// Most (region, chunk or zero run) pairs a chain may need: a crafted manifest of huge
/// zero runs must not make the index enormous. Such a chain is restored eagerly.
const MAX_OPS: usize = 1 << 24;
/// Chunk bytes read ahead at once, by several threads, for the regions the loader
/// streams next: a fault on one of them then finds its chunks verified in memory.
const PREFETCH_BYTES: u64 = 32 << 20;
/// Regions looked ahead for chunks to prefetch.
const PREFETCH_REGIONS: usize = 64;

/// A userfaultfd for this process, able to resolve faults the kernel takes (KVM's,
/// and vmctl's own system calls on guest RAM), not only user-mode ones.
pub struct Userfaultfd {
    fd: OwnedFd,
    can_move: bool,
}

fn ioctl<T>(fd: RawFd, request: libc::c_ulong, arg: &mut T) -> io::Result<libc::c_int> {
    // SAFETY: every request used here takes a pointer to the struct type it is given
    // (see `abi`), which lives for the call.
    let r = unsafe { libc::ioctl(fd, request, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Userfaultfd {
    /// `device`: an inherited descriptor open on /dev/userfaultfd (the Slurm plugin's,
    /// as root). Without one, /dev/userfaultfd and then userfaultfd(2) are tried, which
    /// ordinary users are refused here (vm.unprivileged_userfaultfd=0).
    pub fn open(device: Option<RawFd>) -> Result<Userfaultfd, String> {
        let new = |features: u64| -> io::Result<Userfaultfd> {
            let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
            let raw = match device {
                // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value.
                Some(dev) => unsafe { libc::ioctl(dev, abi::USERFAULTFD_IOC_NEW, flags) },
                None => {
                    let dev = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .custom_flags_cloexec()
                        .open("/dev/userfaultfd");
                    match dev {
                        // SAFETY: as above.
                        Ok(d) => unsafe {
                            libc::ioctl(d.as_raw_fd(), abi::USERFAULTFD_IOC_NEW, flags)
                        },
                        // SAFETY: userfaultfd(2) takes its flags by value.
                        Err(_) => unsafe { libc::syscall(libc::SYS_userfaultfd, flags) as i32 },
                    }
                }
            };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a descriptor just created for us alone.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let mut api = abi::Api {
                api: abi::UFFD_API,
                features,
                ioctls: 0,
            };
            ioctl(fd.as_raw_fd(), abi::UFFDIO_API, &mut api)?;
            Ok(Userfaultfd {
                fd,
                can_move: features & abi::UFFD_FEATURE_MOVE != 0,
            })
        };
        // A failed UFFDIO_API leaves its descriptor unusable: retry on a new one.
        new(abi::UFFD_FEATURE_MOVE)
            .or_else(|_| new(0))
            .map_err(|e| match device {
                Some(fd) => format!("--uffd-fd {fd} is not open on /dev/userfaultfd ({e})"),
                None => format!(
                    "no userfaultfd for this user ({e}): /dev/userfaultfd is root's; run as root, or have root pass one with --uffd-fd"
                ),
            })
    }
}

trait CloexecOpen {
    fn custom_flags_cloexec(&mut self) -> &mut Self;
}
impl CloexecOpen for std::fs::OpenOptions {
    fn custom_flags_cloexec(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_CLOEXEC)
    }
}

/// One step of assembling a region: a chunk's pages, or a zero run, of one link.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Chunk { link: usize, chunk: usize },
    Zero { link: usize, run: usize },
}

/// What every 2 MiB region of guest RAM is assembled from, in order.
struct Index {
    regions: Vec<Vec<Op>>,
    /// Per link and chunk: how many regions still need it.
    uses: Vec<Vec<u32>>,
}

fn regions_of(r: &Run) -> std::ops::Range<usize> {
    let end = r.gpa + r.pages * PAGE_SIZE;
    (r.gpa / HUGE_PAGE) as usize..end.div_ceil(HUGE_PAGE) as usize
}

impl Index {
    fn build(links: &[Link], ram_bytes: u64) -> Option<Index> {
        let mut regions: Vec<Vec<Op>> = vec![Vec::new(); ram_bytes.div_ceil(HUGE_PAGE) as usize];
        let mut uses = Vec::with_capacity(links.len());
        let mut ops = 0usize;
        for (li, l) in links.iter().enumerate() {
            let mut link_uses = vec![0u32; l.manifest.memory.chunks.len()];
            let mut add = |region: usize, op: Op, uses: Option<&mut u32>| -> Option<()> {
                let ops_of = regions.get_mut(region)?;
                if ops_of.last() != Some(&op) {
                    ops_of.push(op);
                    ops += 1;
                    if let Some(u) = uses {
                        *u += 1;
                    }
                }
                (ops <= MAX_OPS).then_some(())
            };
            for (ci, c) in l.manifest.memory.chunks.iter().enumerate() {
                for r in &c.runs {
                    for region in regions_of(r) {
                        let op = Op::Chunk {
                            link: li,
                            chunk: ci,
                        };
                        add(region, op, Some(&mut link_uses[ci]))?;
                    }
                }
            }
            for (ri, r) in l.manifest.memory.zero_runs.iter().enumerate() {
                for region in regions_of(r) {
                    add(region, Op::Zero { link: li, run: ri }, None)?;
                }
            }
            uses.push(link_uses);
        }
        Some(Index { regions, uses })
    }
}

/// Staging buffers regions are assembled in: 2 MiB aligned, THP-backed, private. A
/// buffer a region was moved out of needs fresh pages, and fresh memory costs 5 to 10 µs
/// per 4 KiB here once the host has handed it back to the outer hypervisor
/// (shared/PLATFORM.md, "Memory"), ~5 ms per region: a helper thread repopulates used
/// buffers while the loader reads and assembles the next regions.
struct Staging {
    map: Arc<StagingMap>,
    current: usize,
    ready: std::sync::mpsc::Receiver<usize>,
    refill: std::sync::mpsc::Sender<usize>,
}

/// Buffers held ready (populated) or being repopulated.
const STAGING_BUFFERS: usize = 8;
/// Threads repopulating them: faulting fresh memory in goes faster on several cores.
const STAGING_HELPERS: usize = 2;

struct StagingMap {
    raw: *mut libc::c_void,
    len: usize,
    base: *mut u8,
}

// SAFETY: the mapping is only unmapped on drop; the loader and the helper thread use
// disjoint buffers of it, handed over through channels.
unsafe impl Send for StagingMap {}
unsafe impl Sync for StagingMap {}

impl StagingMap {
    fn buffer(&self, i: usize) -> *mut u8 {
        // SAFETY: i < STAGING_BUFFERS, so the buffer lies inside the mapping.
        unsafe { self.base.add(i * HUGE_PAGE as usize) }
    }

    /// Replaces buffer `i`'s pages (what a move left, or nothing) with fresh zero ones.
    fn populate(&self, i: usize) {
        let (p, len) = (self.buffer(i), HUGE_PAGE as usize);
        // SAFETY: buffer i of this mapping, which nothing else uses meanwhile.
        let populated = unsafe {
            libc::madvise(p as *mut _, len, libc::MADV_DONTNEED) == 0
                && libc::madvise(p as *mut _, len, MADV_POPULATE_WRITE) == 0
        };
        if !populated {
            // A move needs every source page present: write-fault them in.
            for off in (0..len).step_by(PAGE_SIZE as usize) {
                // SAFETY: in the same buffer.
                unsafe { p.add(off).write_volatile(0) };
            }
        }
    }
}

impl Drop for StagingMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in Staging::new.
        unsafe { libc::munmap(self.raw, self.len) };
    }
}

impl Staging {
    fn new() -> io::Result<Staging> {
        let len = (STAGING_BUFFERS + 1) * HUGE_PAGE as usize;
        // SAFETY: an anonymous private mapping aliasing no Rust object.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = (raw as u64).next_multiple_of(HUGE_PAGE) as *mut u8;
        let buffers = STAGING_BUFFERS * HUGE_PAGE as usize;
        // SAFETY: the buffers lie inside the mapping.
        unsafe { libc::madvise(base as *mut _, buffers, libc::MADV_HUGEPAGE) };
        let map = Arc::new(StagingMap { raw, len, base });
        let (refill, to_refill) = std::sync::mpsc::channel::<usize>();
        let (filled, ready) = std::sync::mpsc::channel::<usize>();
        let to_refill = Arc::new(std::sync::Mutex::new(to_refill));
        for _ in 0..STAGING_HELPERS {
            let (map, to_refill, filled) = (map.clone(), to_refill.clone(), filled.clone());
            std::thread::Builder::new()
                .name("lazy-staging".into())
                .spawn(move || loop {
                    let next = to_refill.lock().map(|r| r.recv());
                    let Ok(Ok(i)) = next else { break };
                    map.populate(i);
                    if filled.send(i).is_err() {
                        break;
                    }
                })?;
        }
        for i in 0..STAGING_BUFFERS {
            let _ = refill.send(i);
        }
        let current = ready
            .recv()
            .map_err(|_| io::Error::other("staging helper ended"))?;
        Ok(Staging {
            map,
            current,
            ready,
            refill,
        })
    }

    /// Makes the current buffer all zero and present: after a move, the next
    /// repopulated buffer; otherwise the same one, zeroed.
    fn reset(&mut self, moved_out: bool) -> io::Result<()> {
        if moved_out {
            let _ = self.refill.send(self.current);
            self.current = self
                .ready
                .recv()
                .map_err(|_| io::Error::other("staging helper ended"))?;
        } else {
            self.bytes().fill(0);
        }
        Ok(())
    }

    fn ptr(&self) -> *mut u8 {
        self.map.buffer(self.current)
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the current buffer, which only this thread uses until it is handed
        // back to the helper.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), HUGE_PAGE as usize) }
    }
}

/// Reads chunk `chunk` of `link`'s image into `buf` (decompressing it if it is
/// stored compressed) and checks its CRC32.
fn read_verified(
    link: &LinkImage,
    (file, path): &(File, PathBuf),
    chunk: usize,
    mut buf: Vec<u8>,
) -> Result<Vec<u8>, LateFailure> {
    let c: &Chunk = &link.memory.chunks[chunk];
    super::read::read_chunk_verified(file, path, chunk, c, &mut Vec::new(), &mut buf).map_err(
        |error| LateFailure {
            generation: link.generation,
            error,
        },
    )?;
    Ok(buf)
}

/// A chunk failed: which generation, and why (the error names file and chunk).
pub struct LateFailure {
    pub generation: u64,
    pub error: CheckpointError,
}

/// A chunk of the chain: its link's index, and its index in that link's image.
type ChunkKey = (usize, usize);

/// What the loader needs of a link: its number and memory image.
struct LinkImage {
    generation: u64,
    memory: MemoryImage,
}

struct Loader {
    links: Vec<LinkImage>,
    images: Vec<(File, PathBuf)>,
    index: Index,
    loaded: Vec<bool>,
    cache: VecDeque<(ChunkKey, Arc<Vec<u8>>)>,
    cache_bytes: u64,
    /// Chunk buffers to reuse: a fresh one costs a host page fault per 4 KiB.
    spare: Vec<Vec<u8>>,
    staging: Staging,
    uffd: Userfaultfd,
    /// Host address of guest-physical 0.
    base: u64,
    moved_out: bool,
    /// Set when the restore gave this generation up before the job ran.
    cancelled: Arc<AtomicBool>,
    /// Nanoseconds spent reading, assembling and installing (VMCTL_LAZY_STATS).
    spent: [u64; 4],
}

impl Loader {
    fn cached(&self, key: ChunkKey) -> Option<Arc<Vec<u8>>> {
        self.cache
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, d)| d.clone())
    }

    fn insert(&mut self, key: ChunkKey, data: Vec<u8>) -> Arc<Vec<u8>> {
        let data = Arc::new(data);
        self.cache_bytes += data.len() as u64;
        self.cache.push_back((key, data.clone()));
        while self.cache_bytes > CACHE_BYTES {
            let Some((_, old)) = self.cache.pop_front() else {
                break;
            };
            self.cache_bytes -= old.len() as u64;
            self.recycle(old);
        }
        data
    }

    fn chunk_data(&mut self, link: usize, chunk: usize) -> Result<Arc<Vec<u8>>, LateFailure> {
        if let Some(d) = self.cached((link, chunk)) {
            return Ok(d);
        }
        let buf = self.spare.pop().unwrap_or_default();
        let data = read_verified(&self.links[link], &self.images[link], chunk, buf)?;
        Ok(self.insert((link, chunk), data))
    }

    /// Reads and checks the chunks regions `from..` need, in parallel (a device
    /// wants several requests in flight), up to PREFETCH_BYTES of them.
    fn prefetch(&mut self, from: usize) -> Result<(), LateFailure> {
        let needs_read = |ops: &[Op]| {
            ops.iter().any(|op| match *op {
                Op::Chunk { link, chunk } => self.cached((link, chunk)).is_none(),
                Op::Zero { .. } => false,
            })
        };
        if !needs_read(&self.index.regions[from]) {
            return Ok(());
        }
        let mut keys: Vec<ChunkKey> = Vec::new();
        let mut bytes = 0u64;
        let window = (from + PREFETCH_REGIONS).min(self.index.regions.len());
        'regions: for ops in self.index.regions[from..window].iter() {
            for op in ops {
                if let Op::Chunk { link, chunk } = *op {
                    let key = (link, chunk);
                    if keys.contains(&key) || self.cached(key).is_some() {
                        continue;
                    }
                    bytes += self.links[link].memory.chunks[chunk].bytes();
                    keys.push(key);
                    if bytes >= PREFETCH_BYTES {
                        break 'regions;
                    }
                }
            }
        }
        if keys.len() < 2 {
            return Ok(());
        }
        let mut slots: Vec<(ChunkKey, Vec<u8>)> = keys
            .iter()
            .map(|&k| (k, self.spare.pop().unwrap_or_default()))
            .collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failure = std::sync::Mutex::new(None::<(usize, LateFailure)>);
        let threads = super::write::io_threads().min(slots.len());
        let (links, images) = (&self.links, &self.images);
        let cells: Vec<std::sync::Mutex<&mut (ChunkKey, Vec<u8>)>> =
            slots.iter_mut().map(std::sync::Mutex::new).collect();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(cell) = cells.get(i) else { break };
                    let mut slot = cell.lock().expect("poisoned");
                    let ((link, chunk), buf) = &mut **slot;
                    match read_verified(&links[*link], &images[*link], *chunk, std::mem::take(buf))
                    {
                        Ok(d) => *buf = d,
                        Err(f) => {
                            let mut first = failure.lock().expect("poisoned");
                            if first.as_ref().is_none_or(|(j, _)| i < *j) {
                                *first = Some((i, f));
                            }
                        }
                    }
                });
            }
        });
        drop(cells);
        if let Some((_, f)) = failure.into_inner().expect("poisoned") {
            return Err(f);
        }
        for (key, data) in slots {
            self.insert(key, data);
        }
        Ok(())
    }

    fn recycle(&mut self, buffer: Arc<Vec<u8>>) {
        if self.spare.len() < (PREFETCH_BYTES / super::format::CHUNK_BYTES) as usize {
            if let Ok(b) = Arc::try_unwrap(buffer) {
                self.spare.push(b);
            }
        }
    }

    fn release(&mut self, link: usize, chunk: usize) {
        let uses = &mut self.index.uses[link][chunk];
        *uses = uses.saturating_sub(1);
        if *uses == 0 {
            if let Some(pos) = self.cache.iter().position(|(k, _)| *k == (link, chunk)) {
                let (_, old) = self.cache.remove(pos).expect("position is in range");
                self.cache_bytes -= old.len() as u64;
                self.recycle(old);
            }
        }
    }

    /// Assembles region `region` in the staging buffer, every chunk verified.
    fn assemble(&mut self, region: usize) -> Result<(), LateFailure> {
        let start = region as u64 * HUGE_PAGE;
        let end = start + HUGE_PAGE;
        let t0 = crate::clock::monotonic_ns();
        self.staging
            .reset(self.moved_out)
            .map_err(|e| LateFailure {
                generation: self.links.last().map_or(0, |l| l.generation),
                error: CheckpointError::Io("staging buffer".into(), e),
            })?;
        self.moved_out = false;
        self.spent[3] += (crate::clock::monotonic_ns() - t0) as u64;
        let ops = std::mem::take(&mut self.index.regions[region]);
        for &op in &ops {
            match op {
                Op::Chunk { link, chunk } => {
                    let data = self.chunk_data(link, chunk)?;
                    let c = &self.links[link].memory.chunks[chunk];
                    let mut at = 0u64;
                    let mut pieces = Vec::new();
                    for r in &c.runs {
                        let len = r.pages * PAGE_SIZE;
                        let (from, to) = (r.gpa.max(start), (r.gpa + len).min(end));
                        if from < to {
                            pieces.push((from - start, at + (from - r.gpa), to - from));
                        }
                        at += len;
                    }
                    let stage = self.staging.bytes();
                    for (dst, src, len) in pieces {
                        stage[dst as usize..(dst + len) as usize]
                            .copy_from_slice(&data[src as usize..(src + len) as usize]);
                    }
                    drop(data);
                    self.release(link, chunk);
                }
                Op::Zero { link, run } => {
                    let r = self.links[link].memory.zero_runs[run];
                    let (from, to) = (r.gpa.max(start), (r.gpa + r.pages * PAGE_SIZE).min(end));
                    if from < to {
                        self.staging.bytes()[(from - start) as usize..(to - start) as usize]
                            .fill(0);
                    }
                }
            }
        }
        Ok(())
    }

    /// Installs the staging buffer as region `region` of guest RAM and wakes whoever
    /// waits for it.
    fn install(&mut self, region: usize) -> io::Result<()> {
        let dst = self.base + region as u64 * HUGE_PAGE;
        let mut done = 0u64;
        let mut use_move = self.uffd.can_move;
        let mut retries = 0;
        while done < HUGE_PAGE {
            let mut t = abi::Transfer {
                dst: dst + done,
                src: self.staging.ptr() as u64 + done,
                len: HUGE_PAGE - done,
                mode: 0,
                done: 0,
            };
            let request = if use_move {
                abi::UFFDIO_MOVE
            } else {
                abi::UFFDIO_COPY
            };
            match ioctl(self.uffd.fd.as_raw_fd(), request, &mut t) {
                Ok(_) => done = HUGE_PAGE,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && t.done > 0 => {
                    done += t.done as u64
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) => {
                    // The kernel could not take the pages as they are (a page being
                    // migrated, say): after a few tries, copy them instead.
                    retries += 1;
                    if retries > 16 {
                        use_move = false;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // A page already there was installed by this loader: nothing else
                    // can fill a registered, missing page. Skip it.
                    done += t.done.max(0) as u64 + PAGE_SIZE;
                }
                Err(e) => return Err(e),
            }
        }
        // Whatever a move left in the buffer is dropped when it is repopulated.
        self.moved_out = self.uffd.can_move;
        self.loaded[region] = true;
        Ok(())
    }

    fn wake(&self, region: usize) {
        let mut range = abi::Range {
            start: self.base + region as u64 * HUGE_PAGE,
            len: HUGE_PAGE,
        };
        let _ = ioctl(self.uffd.fd.as_raw_fd(), abi::UFFDIO_WAKE, &mut range);
    }

    /// Loads `region` unless it is there already. Ok(false): guest RAM is gone.
    fn serve(&mut self, region: usize) -> Result<bool, LateFailure> {
        if self.loaded[region] {
            self.wake(region);
            return Ok(true);
        }
        let t0 = crate::clock::monotonic_ns();
        self.assemble(region)?;
        let t1 = crate::clock::monotonic_ns();
        let installed = self.install(region);
        self.spent[1] += (t1 - t0) as u64;
        self.spent[2] += (crate::clock::monotonic_ns() - t1) as u64;
        match installed {
            Ok(()) => Ok(true),
            // Guest RAM or the whole address space is gone: vmctl is ending.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH)) => {
                Ok(false)
            }
            // Anything else leaves a vCPU waiting for ever: the job cannot go on.
            Err(e) => Err(LateFailure {
                generation: self.links.last().map_or(0, |l| l.generation),
                error: CheckpointError::Io(format!("guest RAM region {region}").into(), e),
            }),
        }
    }

    /// Regions some thread waits for, from the fault messages queued now.
    fn faults(&self) -> Vec<usize> {
        let mut msgs = [abi::Msg::default(); 16];
        let size = std::mem::size_of_val(&msgs);
        // SAFETY: reads at most `size` bytes into msgs, plain old data.
        let n = unsafe { libc::read(self.uffd.fd.as_raw_fd(), msgs.as_mut_ptr() as *mut _, size) };
        if n <= 0 {
            return Vec::new();
        }
        let count = n as usize / std::mem::size_of::<abi::Msg>();
        msgs[..count]
            .iter()
            .filter(|m| m.event == abi::UFFD_EVENT_PAGEFAULT)
            .filter_map(|m| m.address.checked_sub(self.base))
            .map(|off| (off / HUGE_PAGE) as usize)
            .filter(|&r| r < self.loaded.len())
            .collect()
    }

    fn run(mut self, on_failure: impl FnOnce(LateFailure)) {
        let mut next = 0usize;
        // Where the job last asked for memory: jobs mostly go on through memory in
        // order, so the regions after it are loaded next, before the cursor's.
        let mut after_fault: Option<usize> = None;
        let regions = self.loaded.len();
        let has_data: Vec<bool> = self.index.regions.iter().map(|o| !o.is_empty()).collect();
        let started = crate::clock::monotonic_ns();
        let (mut faulted, mut streamed) = (0u64, 0u64);
        let cancelled = self.cancelled.clone();
        let on_failure = |f: LateFailure| {
            if !cancelled.load(Ordering::Acquire) {
                on_failure(f)
            }
        };
        loop {
            if self.cancelled.load(Ordering::Acquire) {
                break;
            }
            for region in self.faults() {
                faulted += 1;
                if !self.loaded[region] {
                    if let Err(f) = self.prefetch(region) {
                        return on_failure(f);
                    }
                }
                match self.serve(region) {
                    Ok(true) => after_fault = Some(region + 1),
                    Ok(false) => return,
                    Err(f) => return on_failure(f),
                }
            }
            while next < regions && (self.loaded[next] || !has_data[next]) {
                next += 1;
            }
            if next == regions {
                break;
            }
            let region = match after_fault {
                Some(r) if r < regions && !self.loaded[r] && has_data[r] => r,
                _ => {
                    after_fault = None;
                    next
                }
            };
            streamed += 1;
            let t0 = crate::clock::monotonic_ns();
            if let Err(f) = self.prefetch(region) {
                return on_failure(f);
            }
            self.spent[0] += (crate::clock::monotonic_ns() - t0) as u64;
            match self.serve(region) {
                Ok(true) => after_fault = after_fault.map(|r| r + 1),
                Ok(false) => return,
                Err(f) => return on_failure(f),
            }
        }
        // Every page that has data is in. Regions never loaded are zero in the
        // generation: from now on they fault in as ordinary anonymous memory, and
        // unregistering wakes anyone still waiting for one.
        let mut range = abi::Range {
            start: self.base + SYSTEM_SIZE,
            len: regions as u64 * HUGE_PAGE - SYSTEM_SIZE,
        };
        let _ = ioctl(self.uffd.fd.as_raw_fd(), abi::UFFDIO_UNREGISTER, &mut range);
        if std::env::var_os("VMCTL_LAZY_STATS").is_some() {
            eprintln!(
                "vmctl: lazy restore: loaded in {:.3} s ({:.3} s reading ahead, {:.3} s assembling, of which {:.3} s for fresh staging pages, {:.3} s installing); {faulted} regions on demand, {streamed} in the background; {}",
                (crate::clock::monotonic_ns() - started) as f64 / 1e9,
                self.spent[0] as f64 / 1e9,
                self.spent[1] as f64 / 1e9,
                self.spent[3] as f64 / 1e9,
                self.spent[2] as f64 / 1e9,
                if self.uffd.can_move { "moved" } else { "copied" }
            );
        }
    }
}

/// Starts restoring `links`' memory into `mem` lazily: checks every image can be read
/// and has its size, loads vmctl's system region now, registers the rest with `uffd`
/// and starts the loader. `on_failure` runs on the loader thread when a chunk proves
/// damaged (the job cannot go on). None: the chain is not suited (restore it eagerly).
pub fn start(
    links: &[Link],
    mem: &GuestMemory,
    uffd: Userfaultfd,
    on_failure: impl FnOnce(LateFailure) + Send + 'static,
) -> Result<Option<LazyLoad>, CheckpointError> {
    let Some(newest) = links.last() else {
        return Ok(None);
    };
    let ram = newest.manifest.memory.ram_bytes.min(mem.size());
    let Some(index) = Index::build(links, ram) else {
        return Ok(None);
    };
    let mut images = Vec::with_capacity(links.len());
    for l in links {
        let (f, path) = open_image(&l.dir, &l.manifest, false).map_err(|e| {
            if l.generation == newest.generation {
                e
            } else {
                CheckpointError::Chain(l.generation, Box::new(e))
            }
        })?;
        // SAFETY: advice only.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        images.push((f, path));
    }
    let regions = index.regions.len();
    let staging = Staging::new().map_err(|e| CheckpointError::Io("staging buffer".into(), e))?;
    let mut loader = Loader {
        links: links
            .iter()
            .map(|l| LinkImage {
                generation: l.generation,
                memory: l.manifest.memory.clone(),
            })
            .collect(),
        images,
        index,
        loaded: vec![false; regions],
        cache: VecDeque::new(),
        cache_bytes: 0,
        spare: Vec::new(),
        staging,
        uffd,
        base: mem.host_base(),
        moved_out: false,
        cancelled: Arc::new(AtomicBool::new(false)),
        spent: [0; 4],
    };
    // The system region is vmctl's (Vm::new wrote it already): loaded now, eagerly,
    // exactly as an eager restore would.
    loader.assemble(0).map_err(|f| f.error)?;
    mem.write(0, &loader.staging.bytes()[..SYSTEM_SIZE.min(ram) as usize]);
    loader.loaded[0] = true;
    if regions > 1 {
        let mut reg = abi::Register {
            range: abi::Range {
                start: mem.host_base() + SYSTEM_SIZE,
                len: regions as u64 * HUGE_PAGE - SYSTEM_SIZE,
            },
            mode: abi::UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(loader.uffd.fd.as_raw_fd(), abi::UFFDIO_REGISTER, &mut reg).map_err(|e| {
            CheckpointError::Refused(format!("cannot register guest RAM with userfaultfd: {e}"))
        })?;
    }
    let cancelled = loader.cancelled.clone();
    // Detached: it ends once everything is loaded, and with the process otherwise.
    std::thread::Builder::new()
        .name("lazy-restore".into())
        .spawn(move || loader.run(on_failure))
        .map_err(|e| CheckpointError::Io("loader thread".into(), e))?;
    Ok(Some(LazyLoad { cancelled }))
}

/// A lazy load under way. Dropped, it stops the loader (quietly, without ending the
/// process): the restore gave the generation up before the job ran.
pub struct LazyLoad {
    cancelled: Arc<AtomicBool>,
}

impl LazyLoad {
    /// The job runs on this load: let it go on to the end.
    pub fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for LazyLoad {
    fn drop(&mut self) {
        self.cancelled.store(true, Ordering::Release);
    }
}

/// The one-line report of a late failure.
pub fn describe(f: &LateFailure, dir: &Path) -> String {
    let what = match f.error {
        CheckpointError::Corrupt(..) => "proved damaged",
        _ => "could not be loaded",
    };
    format!(
        "generation {} {what} after the job resumed (lazy restore): {}; the job stops; no generation was removed, and `vmctl restore --lazy=off {}` restores the newest intact one",
        f.generation,
        f.error,
        dir.display()
    )
}
