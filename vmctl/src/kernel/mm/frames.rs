//! Guest-physical frame allocation for page tables and user pages.
//!
//! Frames come in 2 MiB chunks so user memory can be mapped with 2 MiB guest pages
//! (which is what makes KVM's shadow MMU use 2 MiB mappings here); 4 KiB frames are
//! carved from chunks. Freed frames are reused rather than returned to the host: this
//! machine hands freed memory back to its own hypervisor within seconds and getting it
//! back costs microseconds per page.

use crate::machine::layout::PAGE_SIZE;
use crate::machine::memory::{GuestMemory, HUGE_PAGE};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FrameAllocator {
    /// Next never-used chunk, and the end of allocatable guest RAM.
    next_chunk: u64,
    end: u64,
    free_chunks: Vec<u64>,
    free_pages: Vec<u64>,
    /// A chunk being carved into 4 KiB frames: its base and the next unused offset.
    carving: Option<(u64, u64)>,
    /// Bytes of guest RAM handed out and not freed.
    in_use: u64,
}

impl FrameAllocator {
    pub fn new(start: u64, end: u64) -> Self {
        FrameAllocator {
            next_chunk: start.next_multiple_of(HUGE_PAGE),
            end,
            free_chunks: Vec::new(),
            free_pages: Vec::new(),
            carving: None,
            in_use: 0,
        }
    }

    /// Highest guest-physical address ever handed out: what a checkpoint must cover.
    pub fn high_water(&self) -> u64 {
        self.next_chunk
    }

    /// Whether every frame this allocator has or will hand out lies in `[0, ram)`
    /// (a restore checks a deserialized allocator against its VM).
    pub fn fits(&self, ram: u64) -> bool {
        self.next_chunk <= self.end
            && self.end <= ram
            && self
                .free_chunks
                .iter()
                .chain(&self.free_pages)
                .all(|&f| f < self.end)
    }

    fn fresh_chunk(&mut self, mem: &GuestMemory) -> Option<(u64, bool)> {
        if let Some(c) = self.free_chunks.pop() {
            return Some((c, true));
        }
        if self.next_chunk + HUGE_PAGE > self.end {
            return None;
        }
        let c = self.next_chunk;
        self.next_chunk += HUGE_PAGE;
        // Populating is an optimisation; a failure here shows up as slower first touches.
        let _ = mem.populate(c, HUGE_PAGE);
        Some((c, false))
    }

    /// A zeroed 2 MiB-aligned 2 MiB frame.
    pub fn alloc_huge(&mut self, mem: &GuestMemory) -> Option<u64> {
        let (c, dirty) = self.fresh_chunk(mem)?;
        if dirty {
            mem.zero(c, HUGE_PAGE);
        }
        self.in_use += HUGE_PAGE;
        Some(c)
    }

    /// A zeroed 4 KiB frame.
    pub fn alloc_page(&mut self, mem: &GuestMemory) -> Option<u64> {
        if let Some(p) = self.free_pages.pop() {
            mem.zero(p, PAGE_SIZE);
            self.in_use += PAGE_SIZE;
            return Some(p);
        }
        let (base, off) = match self.carving {
            Some((base, off)) if off < HUGE_PAGE => (base, off),
            _ => {
                let (c, dirty) = self.fresh_chunk(mem)?;
                if dirty {
                    mem.zero(c, HUGE_PAGE);
                }
                (c, 0)
            }
        };
        self.carving = Some((base, off + PAGE_SIZE));
        self.in_use += PAGE_SIZE;
        Some(base + off)
    }

    pub fn free_page(&mut self, gpa: u64) {
        self.in_use -= PAGE_SIZE;
        self.free_pages.push(gpa);
    }

    pub fn free_huge(&mut self, gpa: u64) {
        self.in_use -= HUGE_PAGE;
        self.free_chunks.push(gpa);
    }

    /// A 2 MiB frame now mapped as 512 separate 4 KiB pages: account them as pages.
    pub fn split_huge(&mut self, _gpa: u64) {
        // in_use is unchanged: the same bytes are in use, now freed page by page.
    }
}
