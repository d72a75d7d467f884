//! Virtual memory areas: what each range of a guest address space is backed by.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use super::shared::SharedRegion;

/// A file mapped into the guest. The host descriptor is kept open so that faults can
/// read it after the guest has closed its own descriptor, as on Linux.
#[derive(Debug, Serialize, Deserialize)]
pub struct MappedFile {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    /// Size and modification time when mapped: a restore refuses a file that changed,
    /// since pages the guest has not touched yet would come from the new contents.
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub mtime_ns: i64,
    #[serde(skip)]
    pub file: Option<File>,
}

impl MappedFile {
    pub fn new(path: PathBuf, file: File) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let md = file.metadata()?;
        Ok(MappedFile {
            path,
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            file: Some(file),
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Backing {
    /// Zero-filled private memory (anonymous mappings, bss, heap, stack).
    Anonymous,
    /// A file range starting at `offset`: a private copy made on first touch, or,
    /// with `region`, the file's own pages (MAP_SHARED).
    File {
        file: Arc<MappedFile>,
        offset: u64,
        #[serde(skip)]
        region: Option<Arc<SharedRegion>>,
    },
    /// Frames the kernel owns and every address space shares (the vDSO and its data
    /// page), starting at guest-physical `gpa`: mapped, never copied, freed or
    /// written by the guest.
    Kernel { gpa: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmaKind {
    Mapping,
    Heap,
    Stack,
    Vdso,
    Vvar,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub prot: i32,
    /// MAP_SHARED. Shared anonymous memory behaves as private while a job is a single
    /// process; shared file mappings write through to the file.
    pub shared: bool,
    pub backing: Backing,
    pub kind: VmaKind,
}

impl Vma {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Charged against the memory limit, as Linux accounts private writable memory.
    pub fn committed(&self) -> u64 {
        if matches!(self.backing, Backing::Kernel { .. }) {
            return 0;
        }
        let private = !self.shared || matches!(self.backing, Backing::Anonymous);
        if private && self.prot & libc::PROT_WRITE != 0 {
            self.len()
        } else {
            0
        }
    }

    pub fn region(&self) -> Option<&Arc<SharedRegion>> {
        match &self.backing {
            Backing::File { region, .. } => region.as_ref(),
            Backing::Anonymous | Backing::Kernel { .. } => None,
        }
    }

    pub fn file_offset(&self, va: u64) -> Option<u64> {
        match &self.backing {
            Backing::File { offset, .. } => Some(offset + (va - self.start)),
            Backing::Anonymous | Backing::Kernel { .. } => None,
        }
    }

    /// Splits off and returns the part from `at` on.
    pub fn split_off(&mut self, at: u64) -> Vma {
        debug_assert!(self.start < at && at < self.end);
        let mut tail = self.clone();
        tail.start = at;
        match &mut tail.backing {
            Backing::File { offset, .. } => *offset += at - self.start,
            Backing::Kernel { gpa } => *gpa += at - self.start,
            Backing::Anonymous => {}
        }
        self.end = at;
        tail
    }

    pub fn can_merge(&self, next: &Vma) -> bool {
        self.end == next.start
            && self.prot == next.prot
            && self.shared == next.shared
            && self.kind == next.kind
            && match (&self.backing, &next.backing) {
                (Backing::Anonymous, Backing::Anonymous) => true,
                (Backing::Kernel { gpa: a }, Backing::Kernel { gpa: b }) => a + self.len() == *b,
                (
                    Backing::File {
                        file: a,
                        offset: oa,
                        region: ra,
                    },
                    Backing::File {
                        file: b,
                        offset: ob,
                        region: rb,
                    },
                ) => {
                    Arc::ptr_eq(a, b)
                        && oa + self.len() == *ob
                        && match (ra, rb) {
                            (None, None) => true,
                            (Some(x), Some(y)) => Arc::ptr_eq(x, y),
                            _ => false,
                        }
                }
                _ => false,
            }
    }
}
