//! Guest memory management: frames, page tables, VMAs and address spaces.

pub mod address_space;
pub mod fork;
pub mod frames;
pub mod page_table;
pub mod shared;
pub mod vma;

pub use address_space::{Access, AddressSpace, Fault, MmCtx};
pub use frames::FrameAllocator;
pub use shared::{SharedRegion, SharedRegions};
pub use vma::{Backing, MappedFile, VmaKind};

use std::sync::atomic::{AtomicU64, Ordering};

/// The VM-wide commit limit (`--mem`): private writable memory of every address
/// space is charged against it, as Linux's strict overcommit charges it.
#[derive(Debug)]
pub struct Commit {
    limit: u64,
    used: AtomicU64,
}

impl Commit {
    pub fn new(limit: u64) -> Commit {
        Commit {
            limit,
            used: AtomicU64::new(0),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// Whether `add` more bytes fit once `freed` bytes are given back.
    pub fn fits(&self, add: u64, freed: u64) -> bool {
        self.used().saturating_sub(freed).saturating_add(add) <= self.limit
    }

    pub fn charge(&self, n: u64) {
        self.used.fetch_add(n, Ordering::SeqCst);
    }

    pub fn release(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                Some(u.saturating_sub(n))
            });
    }
}
