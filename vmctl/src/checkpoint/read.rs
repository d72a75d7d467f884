//! Reading and verifying generations. Every problem is reported naming the file and
//! what is wrong with it; nothing is trusted before its checksum matches.

use super::format::*;
use super::CheckpointError;
use crate::machine::GuestMemory;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Complete generations in `dir`, newest first.
pub fn list_generations(dir: &Path) -> Result<Vec<u64>, CheckpointError> {
    let entries = fs::read_dir(dir).map_err(|e| CheckpointError::Io(dir.to_path_buf(), e))?;
    let mut gens: Vec<u64> = entries
        .flatten()
        .filter_map(|e| parse_generation_dir(&e.file_name().to_string_lossy()))
        .collect();
    gens.sort_unstable_by(|a, b| b.cmp(a));
    Ok(gens)
}

/// The generation `latest` points at, if it is a valid pointer.
pub fn latest(dir: &Path) -> Option<u64> {
    let target = fs::read_link(dir.join(LATEST)).ok()?;
    parse_generation_dir(&target.to_string_lossy())
}

/// Generations to try for a restore, best first: newest first. `latest` is only a
/// hint for people and tools: a generation directory exists only once it is
/// complete (it is renamed into place), and a crash between that rename and the
/// update of `latest` must not make a restore pick an older generation. Each
/// candidate is verified as it is restored, and a damaged one falls back to the next.
pub fn candidates(dir: &Path) -> Result<Vec<u64>, CheckpointError> {
    list_generations(dir)
}

/// Largest manifest.json accepted. Real manifests are a few hundred KiB at most
/// (descriptors, memory areas, the vCPU's XSAVE image); the bound keeps a crafted
/// file from making the reader allocate without limit.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// Largest manifest.sum accepted (one line).
const MAX_SUM_BYTES: u64 = 4096;

/// Opens a file of a generation for reading: a regular file (never a symlink, FIFO
/// or device, which could block or never end), owned by the caller, at most
/// `max_len` bytes. Returns it with its length.
fn open_regular(path: &Path, max_len: u64, direct: bool) -> Result<(File, u64), CheckpointError> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |extra: i32| {
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | extra)
            .open(path)
    };
    // Direct I/O lands the pages straight in guest RAM, without first allocating a
    // page-cache copy of each; filesystems without it get buffered reads.
    let f = match direct.then(|| open(libc::O_DIRECT)) {
        Some(Ok(f)) => f,
        _ => open(0).map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                CheckpointError::Corrupt(path.to_path_buf(), "is a symlink, not a file".into())
            } else {
                CheckpointError::Io(path.to_path_buf(), e)
            }
        })?,
    };
    let md = f
        .metadata()
        .map_err(|e| CheckpointError::Io(path.to_path_buf(), e))?;
    if !md.is_file() {
        return Err(CheckpointError::Corrupt(
            path.to_path_buf(),
            "not a regular file".into(),
        ));
    }
    check_uid(path, md.uid())?;
    if md.len() > max_len {
        return Err(CheckpointError::Corrupt(
            path.to_path_buf(),
            format!(
                "{} bytes, more than the {max_len} a checkpoint file of this kind can have",
                md.len()
            ),
        ));
    }
    Ok((f, md.len()))
}

/// Reads a whole file opened by `open_regular`, never more than `len` bytes (it may
/// grow meanwhile).
fn read_bounded(f: File, len: u64, path: &Path) -> Result<Vec<u8>, CheckpointError> {
    use std::io::Read;
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(len)
        .read_to_end(&mut bytes)
        .map_err(|e| CheckpointError::Io(path.to_path_buf(), e))?;
    Ok(bytes)
}

fn check_owner(path: &Path) -> Result<(), CheckpointError> {
    let md = fs::symlink_metadata(path).map_err(|e| CheckpointError::Io(path.to_path_buf(), e))?;
    check_uid(path, md.uid())
}

/// Refuses a file of a checkpoint (`path`, owned by `uid`) that is not the caller's.
fn check_uid(path: &Path, uid: u32) -> Result<(), CheckpointError> {
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    if uid != me {
        return Err(CheckpointError::Refused(format!(
            "{}: owned by uid {uid}, not by you (uid {me}); a checkpoint is only restored by its owner",
            path.display()
        )));
    }
    Ok(())
}

/// Reads and checks a generation's manifest: owner, checksum, format version, and
/// every size, count and link in it.
pub fn load_manifest(gen_dir: &Path) -> Result<Manifest, CheckpointError> {
    load_manifest_and_sum(gen_dir).map(|(m, _, _)| m)
}

/// `load_manifest`, the manifest's CRC32 (which a child generation records) and its
/// size in bytes.
pub fn load_manifest_and_sum(gen_dir: &Path) -> Result<(Manifest, u32, u64), CheckpointError> {
    check_owner(gen_dir)?;
    let mpath = gen_dir.join(MANIFEST);
    let spath = gen_dir.join(MANIFEST_SUM);
    let (f, manifest_len) = open_regular(&mpath, MAX_MANIFEST_BYTES, false)?;
    let bytes = read_bounded(f, manifest_len, &mpath)?;
    let (f, len) = open_regular(&spath, MAX_SUM_BYTES, false)?;
    let sum = String::from_utf8_lossy(&read_bounded(f, len, &spath)?).into_owned();
    let want = sum
        .split_whitespace()
        .nth(1)
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| CheckpointError::Corrupt(spath.clone(), "not a checksum line".into()))?;
    let got = crc32fast::hash(&bytes);
    if got != want {
        return Err(CheckpointError::Corrupt(
            mpath,
            format!("checksum {got:08x} does not match {want:08x} in {MANIFEST_SUM} (damaged or truncated)"),
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| CheckpointError::Corrupt(mpath.clone(), e.to_string()))?;
    let version = value
        .get("format_version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| {
            CheckpointError::Corrupt(
                mpath.clone(),
                "no format_version: not a vmctl checkpoint".into(),
            )
        })?;
    if version > FORMAT_VERSION as u64 {
        return Err(CheckpointError::Refused(format!(
            "{}: written by a newer vmctl (checkpoint format {version}; this vmctl reads formats {OLDEST_READABLE_FORMAT} to {FORMAT_VERSION}); restore it with that vmctl or newer",
            mpath.display()
        )));
    }
    if version < OLDEST_READABLE_FORMAT as u64 {
        return Err(CheckpointError::Refused(format!(
            "{}: checkpoint format {version} comes from vmctl 0.1, which ran one process per job; this vmctl reads formats {OLDEST_READABLE_FORMAT} to {FORMAT_VERSION}; resume the job with the vmctl that wrote it, or start it afresh",
            mpath.display()
        )));
    }
    let manifest: Manifest = serde_json::from_value(value)
        .map_err(|e| CheckpointError::Corrupt(mpath.clone(), e.to_string()))?;
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    if manifest.owner_uid != me {
        return Err(CheckpointError::Refused(format!(
            "{}: the job belongs to uid {}, not to you (uid {me})",
            mpath.display(),
            manifest.owner_uid
        )));
    }
    check_shape(&manifest)
        .and_then(|()| check_image_shape(&manifest.memory))
        .and_then(|()| {
            crate::kernel::persist::check_state(&manifest.kernel, manifest.memory.ram_bytes)
        })
        .map_err(|e| CheckpointError::Corrupt(mpath, e))?;
    Ok((manifest, got, bytes.len() as u64))
}

/// Checks a generation's kind and parent link: a full one names no parent, an
/// incremental one an older generation, so following parents always ends.
fn check_shape(m: &Manifest) -> Result<(), String> {
    match (m.kind.as_str(), m.parent) {
        (KIND_FULL, None) => Ok(()),
        (KIND_INCREMENTAL, Some(p)) if p < m.generation => Ok(()),
        (KIND_INCREMENTAL, Some(p)) => Err(format!(
            "generation {} names parent {p}, which is not older",
            m.generation
        )),
        (kind, parent) => Err(format!("kind {kind:?} with parent {parent:?}")),
    }
}

/// One generation of a chain: its number, directory and manifest.
pub struct Link {
    pub generation: u64,
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub manifest_crc32: u32,
}

/// Longest chain a reader follows; writers start a full generation well before this.
pub const MAX_CHAIN_LINKS: usize = 256;
/// Most manifest bytes a chain may hold in all. Writers' chains hold at most 16
/// manifests of a few hundred KiB; without this bound a crafted chain of large
/// manifests would make the reader keep gigabytes of them at once.
pub const MAX_CHAIN_MANIFEST_BYTES: u64 = 4 * MAX_MANIFEST_BYTES;

/// Loads the manifest of generation `generation` of a chain, which must say it is
/// that generation: links are followed by number, and only a number that goes down at
/// every step makes sure that following them ends.
fn load_link(dir: &Path, generation: u64) -> Result<(Link, u64), CheckpointError> {
    let gen_dir = dir.join(generation_dir_name(generation));
    let (manifest, crc, bytes) = load_manifest_and_sum(&gen_dir)?;
    if manifest.generation != generation {
        return Err(CheckpointError::Corrupt(
            gen_dir.join(MANIFEST),
            format!(
                "says it is generation {}, but its directory is generation {generation}",
                manifest.generation
            ),
        ));
    }
    let link = Link {
        generation,
        dir: gen_dir,
        manifest,
        manifest_crc32: crc,
    };
    Ok((link, bytes))
}

/// Generation `generation` and every generation it builds on, the full one first.
/// Each link's manifest is checked, and each parent must be the very generation its
/// child was written against (same manifest CRC32, same RAM size). A chain is
/// refused when it has more than `MAX_CHAIN_LINKS` links or more than
/// `MAX_CHAIN_MANIFEST_BYTES` of manifests.
pub fn load_chain(dir: &Path, generation: u64) -> Result<Vec<Link>, CheckpointError> {
    let (first, mut manifest_bytes) = load_link(dir, generation)?;
    let mut links = vec![first];
    loop {
        let child = links.last().expect("non-empty");
        // check_shape made sure a parent is older than its child.
        let Some(parent) = child.manifest.parent else {
            break;
        };
        if links.len() >= MAX_CHAIN_LINKS {
            return Err(CheckpointError::Corrupt(
                links[0].dir.join(MANIFEST),
                format!(
                    "its chain has more than {MAX_CHAIN_LINKS} generations (writers start a full one after 16)"
                ),
            ));
        }
        let chain_err = |e: CheckpointError| CheckpointError::Chain(parent, Box::new(e));
        let (link, bytes) = load_link(dir, parent).map_err(chain_err)?;
        manifest_bytes = manifest_bytes.saturating_add(bytes);
        if manifest_bytes > MAX_CHAIN_MANIFEST_BYTES {
            return Err(CheckpointError::Corrupt(
                links[0].dir.join(MANIFEST),
                format!(
                    "its chain's manifests add up to more than {MAX_CHAIN_MANIFEST_BYTES} bytes"
                ),
            ));
        }
        if child.manifest.parent_manifest_crc32 != Some(link.manifest_crc32) {
            return Err(chain_err(CheckpointError::Corrupt(
                link.dir.join(MANIFEST),
                format!(
                    "not the generation {} that generation {} was written against (manifest CRC32 {:08x}, expected {})",
                    parent,
                    child.generation,
                    link.manifest_crc32,
                    child
                        .manifest
                        .parent_manifest_crc32
                        .map_or("none".into(), |c| format!("{c:08x}"))
                ),
            )));
        }
        if link.manifest.memory.ram_bytes != child.manifest.memory.ram_bytes {
            return Err(chain_err(CheckpointError::Corrupt(
                link.dir.join(MANIFEST),
                "a different RAM size than its child".into(),
            )));
        }
        links.push(link);
    }
    links.reverse();
    Ok(links)
}

/// Loads a whole chain into guest RAM, oldest first, checking every chunk.
pub fn load_chain_memory(links: &[Link], mem: &GuestMemory) -> Result<(), CheckpointError> {
    let newest = links.last().map_or(0, |l| l.generation);
    for l in links {
        load_memory(&l.dir, &l.manifest, mem).map_err(|e| {
            if l.generation == newest {
                e
            } else {
                CheckpointError::Chain(l.generation, Box::new(e))
            }
        })?;
    }
    Ok(())
}

/// Checks every chunk of every image of a chain against its CRC without loading it.
pub fn verify_chain(links: &[Link]) -> Result<(), CheckpointError> {
    let newest = links.last().map_or(0, |l| l.generation);
    for l in links {
        verify_memory(&l.dir, &l.manifest).map_err(|e| {
            if l.generation == newest {
                e
            } else {
                CheckpointError::Chain(l.generation, Box::new(e))
            }
        })?;
    }
    Ok(())
}

/// Checks every size, count and address of the memory image's description before
/// anything is allocated, read or seeked from it: the checksum only says the
/// manifest is what was written, and whoever owns the directory can write both.
pub fn check_image_shape(m: &MemoryImage) -> Result<(), String> {
    use crate::machine::layout::{MAX_RAM, SYSTEM_SIZE};
    if m.file != MEMORY {
        return Err(format!(
            "the memory image is named {:?}; it must be {MEMORY}",
            m.file
        ));
    }
    if m.page_size != PAGE_SIZE {
        return Err(format!(
            "page size {}, this vmctl writes {PAGE_SIZE}",
            m.page_size
        ));
    }
    if m.ram_bytes < SYSTEM_SIZE
        || m.ram_bytes > SYSTEM_SIZE + MAX_RAM
        || !m.ram_bytes.is_multiple_of(PAGE_SIZE)
    {
        return Err(format!(
            "guest RAM size {} is not a possible VM size (at most {} bytes)",
            m.ram_bytes,
            SYSTEM_SIZE + MAX_RAM
        ));
    }
    let run_end = |r: &Run| {
        r.pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| r.gpa.checked_add(len))
            .filter(|&end| r.pages > 0 && r.gpa.is_multiple_of(PAGE_SIZE) && end <= m.ram_bytes)
    };
    let mut offset = 0u64;
    // The pages of the current round, to refuse two chunks of one round writing the
    // same page: a round's chunks are loaded in parallel.
    let mut round_pages: Vec<(u64, u64)> = Vec::new();
    for (i, c) in m.chunks.iter().enumerate() {
        if i > 0 && c.round != m.chunks[i - 1].round {
            if c.round < m.chunks[i - 1].round {
                return Err(format!(
                    "chunk {i} is of pre-copy round {}, after a chunk of round {}: rounds must go up",
                    c.round,
                    m.chunks[i - 1].round
                ));
            }
            check_no_overlap(&mut round_pages, m.chunks[i - 1].round)?;
        }
        if c.offset != offset {
            return Err(format!(
                "chunk {i} starts at offset {}, right after the previous chunk is {offset}",
                c.offset
            ));
        }
        if c.runs.is_empty() {
            return Err(format!("chunk {i} holds no pages"));
        }
        let mut bytes = 0u64;
        for r in &c.runs {
            let Some(end) = run_end(r) else {
                return Err(format!(
                    "chunk {i} names {} pages at {:#x}, outside the VM's {} bytes of RAM",
                    r.pages, r.gpa, m.ram_bytes
                ));
            };
            bytes += end - r.gpa;
            round_pages.push((r.gpa, end));
            if bytes > CHUNK_BYTES {
                return Err(format!(
                    "chunk {i} holds more than {CHUNK_BYTES} bytes, the most a chunk has"
                ));
            }
        }
        if let Some(z) = &c.compressed {
            check_compressed_shape(i, z, bytes)?;
        }
        offset += c.stored_bytes();
    }
    if let Some(last) = m.chunks.last() {
        check_no_overlap(&mut round_pages, last.round)?;
    }
    if offset != m.data_bytes {
        return Err(format!(
            "the chunks hold {offset} bytes, the manifest says {}",
            m.data_bytes
        ));
    }
    for (i, r) in m.zero_runs.iter().enumerate() {
        if run_end(r).is_none() {
            return Err(format!(
                "zero run {i} names {} pages at {:#x}, outside the VM's {} bytes of RAM",
                r.pages, r.gpa, m.ram_bytes
            ));
        }
    }
    Ok(())
}

/// A compressed chunk must be stored in fewer bytes than it holds (writers store a
/// chunk that does not shrink as it is), which also bounds what a reader reads for it.
fn check_compressed_shape(i: usize, z: &Compressed, bytes: u64) -> Result<(), String> {
    if z.bytes == 0 || z.bytes >= bytes {
        return Err(format!(
            "chunk {i} is stored as {} compressed bytes for {bytes} bytes of pages; compressed data must be smaller and not empty",
            z.bytes
        ));
    }
    Ok(())
}

/// Reads compressed chunk `i` (`c`) into `stored`, checks the CRC32 of its stored
/// bytes, and decompresses it into `out`, which has exactly the chunk's size. The
/// caller checks the CRC32 of the pages.
pub fn read_compressed_chunk(
    f: &File,
    path: &Path,
    i: usize,
    c: &Chunk,
    stored: &mut [u8],
    out: &mut [u8],
) -> Result<(), CheckpointError> {
    let z = c.compressed.as_ref().expect("a compressed chunk");
    // check_image_shape bounded both by the chunk's size, at most CHUNK_BYTES.
    let stored = &mut stored[..c.stored_bytes() as usize];
    read_chunk_bytes(f, path, i, stored, c.offset)?;
    let data = &stored[..z.bytes as usize];
    if crc32fast::hash(data) != z.crc32 {
        return Err(CheckpointError::Corrupt(
            path.to_path_buf(),
            format!(
                "chunk {i} at offset {} fails its CRC32 (compressed data)",
                c.offset
            ),
        ));
    }
    super::compress::decode(z, data, out).map_err(|e| {
        CheckpointError::Corrupt(
            path.to_path_buf(),
            format!("chunk {i} at offset {} {e}", c.offset),
        )
    })
}

/// Refuses a pre-copy round whose chunks name a page twice; `ranges` (the round's
/// `[start, end)` guest-physical ranges) is emptied for the next round.
fn check_no_overlap(ranges: &mut Vec<(u64, u64)>, round: u32) -> Result<(), String> {
    ranges.sort_unstable();
    if let Some(w) = ranges.windows(2).find(|w| w[1].0 < w[0].1) {
        return Err(format!(
            "pre-copy round {round} holds the page at {:#x} twice",
            w[1].0
        ));
    }
    ranges.clear();
    Ok(())
}

pub(super) fn open_image(
    gen_dir: &Path,
    m: &Manifest,
    direct: bool,
) -> Result<(File, PathBuf), CheckpointError> {
    // check_image_shape made sure the name is MEMORY, not a path elsewhere.
    let path = gen_dir.join(&m.memory.file);
    let (f, len) = open_regular(&path, u64::MAX, direct)?;
    if len != m.memory.data_bytes {
        return Err(CheckpointError::Corrupt(
            path,
            format!(
                "{len} bytes, the manifest says {} (truncated or damaged)",
                m.memory.data_bytes
            ),
        ));
    }
    Ok((f, path))
}

/// Reads `buf.len()` bytes of chunk `i` at `offset` of the image `path`; an image that
/// ends before them is reported as truncated.
fn read_chunk_bytes(
    f: &File,
    path: &Path,
    i: usize,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), CheckpointError> {
    use std::os::unix::fs::FileExt;
    f.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            CheckpointError::Corrupt(
                path.to_path_buf(),
                format!("ends inside chunk {i} (truncated)"),
            )
        } else {
            CheckpointError::Io(path.to_path_buf(), e)
        }
    })
}

/// Reads chunk `i` (`c`) of the image `f` into `buf`, resized to the chunk's size
/// (through `stored` when it is compressed), and checks its CRC32.
pub(super) fn read_chunk_verified(
    f: &File,
    path: &Path,
    i: usize,
    c: &Chunk,
    stored: &mut Vec<u8>,
    buf: &mut Vec<u8>,
) -> Result<(), CheckpointError> {
    // check_image_shape bounded the chunk's size (and its stored size) by CHUNK_BYTES.
    buf.resize(c.bytes() as usize, 0);
    if c.compressed.is_some() {
        stored.resize(c.stored_bytes() as usize, 0);
        read_compressed_chunk(f, path, i, c, stored, buf)?;
    } else {
        read_chunk_bytes(f, path, i, buf, c.offset)?;
    }
    if crc32fast::hash(buf) != c.crc32 {
        return Err(CheckpointError::Corrupt(
            path.to_path_buf(),
            format!("chunk {i} at offset {} fails its CRC32", c.offset),
        ));
    }
    Ok(())
}

/// Refuses a checkpoint whose guest was shown CPU features this host lacks.
pub fn check_cpu(m: &Manifest, host_xcr0: u64) -> Result<(), CheckpointError> {
    let missing = super::cpu::missing_features(&m.cpu, host_xcr0);
    if missing.is_empty() {
        return Ok(());
    }
    Err(CheckpointError::Refused(format!(
        "this host's CPU lacks features the job was shown: {}; restore it on a host with the same CPU features",
        missing.join(", ")
    )))
}

/// Checks the checkpoint directory itself belongs to the caller, before anything
/// in it is trusted.
pub fn check_dir(dir: &Path) -> Result<(), CheckpointError> {
    check_owner(dir)
}

/// Checks every chunk of the memory image against its CRC without loading it.
pub fn verify_memory(gen_dir: &Path, m: &Manifest) -> Result<(), CheckpointError> {
    let (f, path) = open_image(gen_dir, m, false)?;
    let mut buf = Vec::new();
    let mut stored = Vec::new();
    for (i, c) in m.memory.chunks.iter().enumerate() {
        read_chunk_verified(&f, &path, i, c, &mut stored, &mut buf)?;
    }
    Ok(())
}

/// Loads the memory image into guest RAM, several chunks at a time, checking each
/// chunk's CRC as it lands; then zeroes the image's zero runs.
pub fn load_memory(gen_dir: &Path, m: &Manifest, mem: &GuestMemory) -> Result<(), CheckpointError> {
    let (f, path) = open_image(gen_dir, m, true)?;
    let beyond = |what: String| {
        CheckpointError::Corrupt(
            path.clone(),
            format!("{what} names memory beyond the VM's RAM"),
        )
    };
    // Every range is checked before anything is loaded.
    let mut plan: Vec<Vec<libc::iovec>> = Vec::with_capacity(m.memory.chunks.len());
    for (i, c) in m.memory.chunks.iter().enumerate() {
        let mut iov = Vec::with_capacity(c.runs.len());
        for r in &c.runs {
            let bytes = r.pages.saturating_mul(PAGE_SIZE);
            let p = mem
                .host_ptr(r.gpa, bytes)
                .ok_or_else(|| beyond(format!("chunk {i}")))?;
            iov.push(libc::iovec {
                iov_base: p as *mut _,
                iov_len: bytes as usize,
            });
        }
        plan.push(iov);
    }
    for r in &m.memory.zero_runs {
        if mem
            .host_ptr(r.gpa, r.pages.saturating_mul(PAGE_SIZE))
            .is_none()
        {
            return Err(beyond("a zero run".into()));
        }
    }
    let plan = Plan(plan);
    let failure: std::sync::Mutex<Option<(usize, CheckpointError)>> = std::sync::Mutex::new(None);
    // The progress line, and the bytes loaded so far.
    let progress = std::sync::Mutex::new((
        crate::events::Progress::new("restore", m.memory.data_bytes),
        0u64,
    ));
    // Rounds in order (a later round's copy of a page wins), each round's chunks in
    // parallel.
    let mut first = 0;
    while first < m.memory.chunks.len() {
        let round = m.memory.chunks[first].round;
        let end = first
            + m.memory.chunks[first..]
                .iter()
                .take_while(|c| c.round == round)
                .count();
        load_chunks(&f, &path, m, &plan, first..end, &failure, &progress);
        if failure.lock().expect("poisoned").is_some() {
            break;
        }
        first = end;
    }
    if let Some((_, e)) = failure.into_inner().expect("poisoned") {
        return Err(e);
    }
    for r in &m.memory.zero_runs {
        mem.zero(r.gpa, r.pages * PAGE_SIZE);
    }
    Ok(())
}

/// The guest RAM ranges each chunk of an image lands in.
struct Plan(Vec<Vec<libc::iovec>>);
// SAFETY: the iovecs point into guest RAM, which outlives every use; chunks of one
// round never overlap, so each loading thread fills its own pages.
unsafe impl Sync for Plan {}
impl Plan {
    fn chunk(&self, i: usize) -> Option<&[libc::iovec]> {
        self.0.get(i).map(|v| v.as_slice())
    }
}

/// Loads chunks `range` of `m`'s image with several threads, checking each CRC.
fn load_chunks(
    f: &File,
    path: &Path,
    m: &Manifest,
    plan: &Plan,
    range: std::ops::Range<usize>,
    failure: &std::sync::Mutex<Option<(usize, CheckpointError)>>,
    progress: &std::sync::Mutex<(crate::events::Progress, u64)>,
) {
    let path = path.to_path_buf();
    let next = std::sync::atomic::AtomicUsize::new(range.start);
    let threads = super::write::io_threads().min(range.len());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= range.end {
                    break;
                }
                let (Some(c), Some(iov)) = (m.memory.chunks.get(i), plan.chunk(i)) else {
                    break;
                };
                if failure.lock().expect("poisoned").is_some() {
                    break;
                }
                let fail = |e: CheckpointError| {
                    let mut f = failure.lock().expect("poisoned");
                    if f.as_ref().is_none_or(|(j, _)| i < *j) {
                        *f = Some((i, e));
                    }
                };
                let done = match read_chunk(f, &path, i, c, iov) {
                    Ok(n) => n,
                    Err(e) => {
                        fail(e);
                        break;
                    }
                };
                if (done as u64) < c.bytes() {
                    fail(CheckpointError::Corrupt(
                        path.clone(),
                        format!("ends inside chunk {i} (truncated)"),
                    ));
                    break;
                }
                let mut h = crc32fast::Hasher::new();
                for v in iov {
                    // SAFETY: the same in-bounds guest RAM ranges just filled.
                    h.update(unsafe {
                        std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                    });
                }
                if h.finalize() != c.crc32 {
                    fail(CheckpointError::Corrupt(
                        path.clone(),
                        format!("chunk {i} at offset {} fails its CRC32", c.offset),
                    ));
                    break;
                }
                let mut p = progress.lock().expect("poisoned");
                p.1 += c.bytes();
                let done = p.1;
                p.0.update(done);
            });
        }
    });
}

/// A compressed chunk's stored bytes and its pages.
type DecodeBuffers = (super::compress::ChunkBuf, super::compress::ChunkBuf);

thread_local! {
    /// A loading thread's buffers, allocated on its first compressed chunk and freed
    /// when the thread ends.
    static DECODE_BUFFERS: std::cell::RefCell<Option<DecodeBuffers>> =
        const { std::cell::RefCell::new(None) };
}

/// Reads chunk `i` (`c`) of an image into the guest RAM ranges `iov`: straight from
/// the file, or, for a compressed chunk, through `read_compressed_chunk`. Returns the
/// bytes that landed; the caller checks them against the chunk's CRC32.
fn read_chunk(
    f: &File,
    path: &Path,
    i: usize,
    c: &Chunk,
    iov: &[libc::iovec],
) -> Result<usize, CheckpointError> {
    if c.compressed.is_none() {
        return crate::iov::transfer_all(f.as_raw_fd(), iov, c.offset, crate::iov::Direction::Read)
            .map_err(|e| CheckpointError::Io(path.to_path_buf(), e));
    }
    DECODE_BUFFERS.with_borrow_mut(|buffers| {
        let (stored, pages) = buffers.get_or_insert_with(|| {
            (
                super::compress::ChunkBuf::new(),
                super::compress::ChunkBuf::new(),
            )
        });
        // check_image_shape bounded the chunk's size by CHUNK_BYTES.
        let pages = &mut pages.as_mut_slice()[..c.bytes() as usize];
        read_compressed_chunk(f, path, i, c, stored.as_mut_slice(), pages)?;
        scatter(pages, iov);
        Ok(pages.len())
    })
}

/// Copies a decompressed chunk's pages to the guest RAM ranges of its runs.
fn scatter(pages: &[u8], iov: &[libc::iovec]) {
    let mut at = 0;
    for v in iov {
        let src = &pages[at..at + v.iov_len];
        // SAFETY: each iovec is an in-bounds guest RAM range that only this thread
        // fills (load_memory checked them; a round's chunks never overlap), and `src`
        // has its length.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), v.iov_base as *mut u8, v.iov_len) };
        at += v.iov_len;
    }
}
