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

/// Generations to try for a restore, best first: `latest`, then the others newest
/// first.
pub fn candidates(dir: &Path) -> Result<Vec<u64>, CheckpointError> {
    let mut gens = list_generations(dir)?;
    if let Some(l) = latest(dir) {
        if let Some(i) = gens.iter().position(|&g| g == l) {
            gens.remove(i);
            gens.insert(0, l);
        }
    }
    Ok(gens)
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
    check_owner(&mpath)?;
    let bytes = fs::read(&mpath).map_err(|e| CheckpointError::Io(mpath.clone(), e))?;
    let sum = fs::read_to_string(&spath).map_err(|e| CheckpointError::Io(spath.clone(), e))?;
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
    Ok(manifest)
}

fn open_image(
    gen_dir: &Path,
    m: &Manifest,
    direct: bool,
) -> Result<(File, PathBuf), CheckpointError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = gen_dir.join(&m.memory.file);
    check_owner(&path)?;
    // Direct I/O lands the pages straight in guest RAM, without first allocating a
    // page-cache copy of each; filesystems without it get buffered reads.
    let direct_open = || {
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
    };
    let f = match direct.then(direct_open) {
        Some(Ok(f)) => f,
        _ => File::open(&path).map_err(|e| CheckpointError::Io(path.clone(), e))?,
    };
    let len = f
        .metadata()
        .map_err(|e| CheckpointError::Io(path.clone(), e))?
        .len();
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
