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
use std::collections::HashMap;

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
    /// Frames mapped by more than one address space (copy-on-write after fork, shared
    /// anonymous memory): how many extra references each has. A frame is freed when
    /// its last reference goes.
    #[serde(default, with = "ref_list")]
    extra_refs: HashMap<u64, u32>,
    /// Page-table frames of torn-down address spaces. KVM may still hold shadow pages
    /// for them, which would come back if the frame became a page table again, so
    /// they are reused only after a shadow flush (`release_quarantine`).
    #[serde(default)]
    quarantine: Vec<u64>,
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
            extra_refs: HashMap::new(),
            quarantine: Vec::new(),
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

    /// `n` zeroed, physically contiguous 4 KiB frames (at most a chunk's worth).
    pub fn alloc_contiguous_pages(&mut self, mem: &GuestMemory, n: u64) -> Option<u64> {
        let bytes = n
            .checked_mul(PAGE_SIZE)
            .filter(|&b| b > 0 && b <= HUGE_PAGE)?;
        let (base, off) = match self.carving {
            Some((base, off)) if off + bytes <= HUGE_PAGE => (base, off),
            old => {
                let (c, dirty) = self.fresh_chunk(mem)?;
                if dirty {
                    mem.zero(c, HUGE_PAGE);
                }
                // The rest of the chunk being carved stays usable page by page.
                if let Some((b, mut o)) = old {
                    while o < HUGE_PAGE {
                        self.free_pages.push(b + o);
                        o += PAGE_SIZE;
                    }
                }
                (c, 0)
            }
        };
        self.carving = Some((base, off + bytes));
        self.in_use += bytes;
        Some(base + off)
    }

    /// Drops one reference to a 4 KiB frame, freeing it with the last.
    pub fn free_page(&mut self, gpa: u64) {
        if self.drop_extra_ref(gpa) {
            return;
        }
        self.in_use -= PAGE_SIZE;
        self.free_pages.push(gpa);
    }

    /// Drops one reference to a 2 MiB frame, freeing it with the last.
    pub fn free_huge(&mut self, gpa: u64) {
        if self.drop_extra_ref(gpa) {
            return;
        }
        self.in_use -= HUGE_PAGE;
        self.free_chunks.push(gpa);
    }

    fn drop_extra_ref(&mut self, gpa: u64) -> bool {
        match self.extra_refs.get_mut(&gpa) {
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    self.extra_refs.remove(&gpa);
                }
                true
            }
            None => false,
        }
    }

    /// Another address space maps this frame too.
    pub fn add_ref(&mut self, gpa: u64) {
        *self.extra_refs.entry(gpa).or_insert(0) += 1;
    }

    /// Whether more than one address space maps this frame.
    pub fn is_shared(&self, gpa: u64) -> bool {
        self.extra_refs.contains_key(&gpa)
    }

    /// A page-table frame no longer in use; see `quarantine`.
    pub fn free_table(&mut self, gpa: u64) {
        self.quarantine.push(gpa);
    }

    pub fn has_quarantine(&self) -> bool {
        !self.quarantine.is_empty()
    }

    /// After a shadow flush, quarantined page-table frames become ordinary free frames.
    pub fn release_quarantine(&mut self) {
        for gpa in std::mem::take(&mut self.quarantine) {
            self.in_use -= PAGE_SIZE;
            self.free_pages.push(gpa);
        }
    }

    /// A 2 MiB frame now mapped as 512 separate 4 KiB pages: account them as pages.
    pub fn split_huge(&mut self, _gpa: u64) {
        // in_use is unchanged: the same bytes are in use, now freed page by page.
    }
}

/// Serializes the reference counts as a list of pairs (JSON keys must be strings).
mod ref_list {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::collections::HashMap;

    pub fn serialize<S: Serializer>(m: &HashMap<u64, u32>, s: S) -> Result<S::Ok, S::Error> {
        let mut v: Vec<(u64, u32)> = m.iter().map(|(&k, &n)| (k, n)).collect();
        v.sort_unstable();
        s.collect_seq(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<HashMap<u64, u32>, D::Error> {
        Ok(Vec::<(u64, u32)>::deserialize(d)?.into_iter().collect())
    }
}
