//! The on-disk checkpoint format (specified in docs/CHECKPOINT-FORMAT.md).
//!
//! DIR/gen-NNNNNN/ holds one generation: `manifest.json` (everything but guest RAM),
//! `manifest.sum` (CRC32 of the manifest) and `memory.img` (the guest-physical pages
//! that are not all zero, in chunks listed in the manifest, each with its CRC32).
//! DIR/latest is a symlink to the newest complete generation.
//!
//! A generation is "full" (every non-zero page) or "incremental": only the pages
//! written since its parent generation, which it names; restoring it loads its whole
//! chain, the full generation first.

use crate::kernel::persist::KernelState;
use serde::{Deserialize, Serialize};

/// Bumped on any change a reader of the previous version could misread.
/// 2: a process tree per job. 3: incremental generations (`kind`, `parent`,
/// `parent_manifest_crc32`, `zero_runs`) and pre-copy rounds (`round`).
/// 4: compressed chunks (`compressed`). A generation without any is written as
/// version 3, so that a vmctl reading formats 2 to 3 still restores it.
pub const FORMAT_VERSION: u32 = 4;
/// The version of a generation none of whose chunks is compressed.
pub const FORMAT_VERSION_UNCOMPRESSED: u32 = 3;
/// Older formats this vmctl still reads (a version 2 generation is a full one).
pub const OLDEST_READABLE_FORMAT: u32 = 2;
pub const KIND_FULL: &str = "full";
pub const KIND_INCREMENTAL: &str = "incremental";
pub const MANIFEST: &str = "manifest.json";
pub const MANIFEST_SUM: &str = "manifest.sum";
pub const MEMORY: &str = "memory.img";
pub const LATEST: &str = "latest";
pub const GEN_PREFIX: &str = "gen-";
pub const PAGE_SIZE: u64 = 4096;
/// Data per memory chunk (and per CRC).
pub const CHUNK_BYTES: u64 = 4 << 20;

pub fn generation_dir_name(generation: u64) -> String {
    format!("{GEN_PREFIX}{generation:06}")
}

pub fn parse_generation_dir(name: &str) -> Option<u64> {
    let n = name.strip_prefix(GEN_PREFIX)?;
    (n.len() >= 6 && n.bytes().all(|b| b.is_ascii_digit())).then(|| n.parse().ok())?
}

/// A run of `pages` consecutive guest-physical pages starting at `gpa`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Run {
    pub gpa: u64,
    pub pages: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Chunk {
    /// Offset of the chunk's data in the image file.
    pub offset: u64,
    pub runs: Vec<Run>,
    pub crc32: u32,
    /// Pre-copy round that wrote it. Chunks of one round never overlap; a later
    /// round's copy of a page replaces an earlier one's.
    #[serde(default)]
    pub round: u32,
    /// Present when the chunk is stored compressed (format 4); `crc32` is then of the
    /// pages after decompression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compressed: Option<Compressed>,
}

/// How a chunk is compressed: its data in the image is `bytes` bytes of `codec`
/// output whose CRC32 is `crc32`, padded with zeros to a whole page.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Compressed {
    pub codec: Codec,
    pub bytes: u64,
    pub crc32: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// A zstd frame.
    Zstd,
    /// An LZ4 block (no frame header).
    Lz4,
}

impl Codec {
    pub fn name(self) -> &'static str {
        match self {
            Codec::Zstd => "zstd",
            Codec::Lz4 => "lz4",
        }
    }
}

impl Chunk {
    /// Bytes of guest memory the chunk holds.
    pub fn bytes(&self) -> u64 {
        self.runs
            .iter()
            .map(|r| r.pages.saturating_mul(PAGE_SIZE))
            .fold(0, u64::saturating_add)
    }

    /// Bytes the chunk takes in the image file.
    pub fn stored_bytes(&self) -> u64 {
        match &self.compressed {
            Some(c) => c.bytes.saturating_add(PAGE_SIZE - 1) / PAGE_SIZE * PAGE_SIZE,
            None => self.bytes(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryImage {
    pub file: String,
    pub page_size: u64,
    /// Size of guest RAM (the memslot) the image belongs to.
    pub ram_bytes: u64,
    /// Bytes of data in the file (non-zero pages only, some of them compressed).
    pub data_bytes: u64,
    pub chunks: Vec<Chunk>,
    /// Pages that are all zero although the parent or an earlier pre-copy round of this
    /// image held data there; applied after every chunk. Pages neither in a chunk nor
    /// here are zero in a full generation and unchanged in an incremental one.
    #[serde(default)]
    pub zero_runs: Vec<Run>,
}

/// CPUID feature words the guest could see. Guests see the host's CPUID here (it
/// cannot be virtualized on this platform), so a restore needs every one of them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CpuFeatures {
    pub vendor: String,
    pub words: Vec<CpuidWord>,
    pub xcr0: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CpuidWord {
    pub leaf: u32,
    pub subleaf: u32,
    pub register: String,
    pub bits: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub vmctl_version: String,
    pub generation: u64,
    /// KIND_FULL, or KIND_INCREMENTAL with `parent` naming the generation it builds on.
    pub kind: String,
    pub parent: Option<u64>,
    /// CRC32 of the parent's manifest.json: a parent directory that is not the one
    /// this generation was written against does not match.
    #[serde(default)]
    pub parent_manifest_crc32: Option<u32>,
    pub created_unix: i64,
    pub host: String,
    pub owner_uid: u32,
    pub program: String,
    pub argv: Vec<String>,
    pub cpu: CpuFeatures,
    pub memory: MemoryImage,
    pub kernel: KernelState,
    /// The file journal (`files.journal`) kept for this generation; absent when the job
    /// ran with `--files=none` (or under a vmctl before file journals).
    #[serde(default)]
    pub files: Option<crate::filejournal::FilesInfo>,
}
