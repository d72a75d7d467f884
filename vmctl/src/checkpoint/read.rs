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
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    if md.uid() != me {
        return Err(CheckpointError::Refused(format!(
            "{}: owned by uid {}, not by you (uid {me}); a checkpoint is only restored by its owner",
            path.display(),
            md.uid()
        )));
    }
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
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    if md.uid() != me {
        return Err(CheckpointError::Refused(format!(
            "{}: owned by uid {}, not by you (uid {me}); a checkpoint is only restored by its owner",
            path.display(),
            md.uid()
        )));
    }
    Ok(())
}

/// Reads and checks a generation's manifest: owner, checksum, format version.
pub fn load_manifest(gen_dir: &Path) -> Result<Manifest, CheckpointError> {
    check_owner(gen_dir)?;
    let mpath = gen_dir.join(MANIFEST);
    let spath = gen_dir.join(MANIFEST_SUM);
    let (f, len) = open_regular(&mpath, MAX_MANIFEST_BYTES, false)?;
    let bytes = read_bounded(f, len, &mpath)?;
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
            "{}: written by a newer vmctl (checkpoint format {version}; this vmctl reads format {FORMAT_VERSION}); restore it with that vmctl or newer",
            mpath.display()
        )));
    }
    if version < OLDEST_READABLE_FORMAT as u64 {
        return Err(CheckpointError::Refused(format!(
            "{}: checkpoint format {version} comes from vmctl 0.1, which ran one process per job; this vmctl reads format {FORMAT_VERSION}; resume the job with the vmctl that wrote it, or start it afresh",
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
    check_image_shape(&manifest.memory)
        .and_then(|()| {
            crate::kernel::persist::check_state(&manifest.kernel, manifest.memory.ram_bytes)
        })
        .map_err(|e| CheckpointError::Corrupt(mpath, e))?;
    Ok(manifest)
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
    let mut offset = 0u64;
    for (i, c) in m.chunks.iter().enumerate() {
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
            let len = r.pages.checked_mul(PAGE_SIZE);
            let end = len.and_then(|l| r.gpa.checked_add(l));
            match (len, end) {
                (Some(len), Some(end))
                    if r.pages > 0 && r.gpa.is_multiple_of(PAGE_SIZE) && end <= m.ram_bytes =>
                {
                    bytes += len;
                }
                _ => {
                    return Err(format!(
                        "chunk {i} names {} pages at {:#x}, outside the VM's {} bytes of RAM",
                        r.pages, r.gpa, m.ram_bytes
                    ))
                }
            }
            if bytes > CHUNK_BYTES {
                return Err(format!(
                    "chunk {i} holds more than {CHUNK_BYTES} bytes, the most a chunk has"
                ));
            }
        }
        offset += bytes;
    }
    if offset != m.data_bytes {
        return Err(format!(
            "the chunks hold {offset} bytes, the manifest says {}",
            m.data_bytes
        ));
    }
    Ok(())
}

fn open_image(
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

fn read_exact_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    f.read_exact_at(buf, offset)
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
    for (i, c) in m.memory.chunks.iter().enumerate() {
        buf.resize(c.bytes() as usize, 0);
        read_exact_at(&f, &mut buf, c.offset).map_err(|e| CheckpointError::Io(path.clone(), e))?;
        if crc32fast::hash(&buf) != c.crc32 {
            return Err(CheckpointError::Corrupt(
                path,
                format!("chunk {i} at offset {} fails its CRC32", c.offset),
            ));
        }
    }
    Ok(())
}

/// Loads the memory image into guest RAM, checking each chunk's CRC as it lands.
pub fn load_memory(gen_dir: &Path, m: &Manifest, mem: &GuestMemory) -> Result<(), CheckpointError> {
    let (f, path) = open_image(gen_dir, m, true)?;
    let mut progress = crate::events::Progress::new("restore", m.memory.data_bytes);
    for (i, c) in m.memory.chunks.iter().enumerate() {
        progress.update(c.offset);
        let mut iov = Vec::with_capacity(c.runs.len());
        for r in &c.runs {
            let bytes = r.pages.saturating_mul(PAGE_SIZE);
            let p = mem.host_ptr(r.gpa, bytes).ok_or_else(|| {
                CheckpointError::Corrupt(
                    path.clone(),
                    format!("chunk {i} names memory beyond the VM's RAM"),
                )
            })?;
            iov.push(libc::iovec {
                iov_base: p as *mut _,
                iov_len: bytes as usize,
            });
        }
        let done =
            crate::iov::transfer_all(f.as_raw_fd(), &iov, c.offset, crate::iov::Direction::Read)
                .map_err(|e| CheckpointError::Io(path.clone(), e))?;
        if (done as u64) < c.bytes() {
            return Err(CheckpointError::Corrupt(
                path.clone(),
                format!("ends inside chunk {i} (truncated)"),
            ));
        }
        let mut h = crc32fast::Hasher::new();
        for v in &iov {
            // SAFETY: the same in-bounds guest RAM ranges just filled.
            h.update(unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) });
        }
        if h.finalize() != c.crc32 {
            return Err(CheckpointError::Corrupt(
                path,
                format!("chunk {i} at offset {} fails its CRC32", c.offset),
            ));
        }
    }
    Ok(())
}
