//! Incremental generations: which pages the next generation must hold, and which
//! generation it builds on.
//!
//! The tracker keeps a 128-bit digest (XXH3, seeded at random per process) of every
//! page as the newest generation holds it; the next generation stores the pages whose
//! digest changed. Comparing every page costs a read of guest RAM (hashing runs at
//! several GB/s per core) but nothing while the job runs: KVM's dirty log, the other
//! way to find changed pages, costs the guest a trap on the first write to every page
//! after each checkpoint, measured at 9 to 21 times a write pass here
//! (docs/BENCHMARKS.md), and it over-reports anyway (KVM shadows the guest's 2 MiB
//! pages, and a read fault on a page whose guest entry is already dirty logs it). So
//! the dirty log is on only during a pre-copy session (`precopy.rs`), whose later
//! rounds need it. A chain is cut (the next generation is full again)
//! when it would hold more than `MAX_INCREMENTS` increments or when its increments
//! would add up to more bytes than its full generation, so a restore never reads more
//! than about twice a full image.

use super::format::{Manifest, KIND_FULL, KIND_INCREMENTAL};
use super::read::Link;
use super::write::Written;
use crate::machine::memory::{bitmap_words, PageBitmap};
use crate::machine::GuestMemory;
use std::io;

const PAGE: u64 = 4096;

/// Increments a chain may hold on top of its full generation.
pub const MAX_INCREMENTS: usize = 15;

/// The generation guest RAM was last saved to (or restored from), with what a
/// restore of it reads.
#[derive(Debug, Clone)]
struct Lineage {
    generation: u64,
    manifest_crc32: u32,
    increments: usize,
    increment_bytes: u64,
    full_bytes: u64,
}

impl Lineage {
    /// The lineage once `written` is durable: one more increment on `base` when it was
    /// written as an increment of it, otherwise a new chain starting with it.
    fn after(base: Option<&Lineage>, incremental: bool, written: &Written) -> Lineage {
        match base.filter(|_| incremental) {
            Some(b) => Lineage {
                generation: written.generation,
                manifest_crc32: written.manifest_crc32,
                increments: b.increments + 1,
                increment_bytes: b.increment_bytes + written.memory_bytes,
                full_bytes: b.full_bytes,
            },
            None => Lineage {
                generation: written.generation,
                manifest_crc32: written.manifest_crc32,
                increments: 0,
                increment_bytes: 0,
                full_bytes: written.memory_bytes,
            },
        }
    }
}

/// The chain a job was restored from, as `Tracker::restored` needs it.
pub struct Restored(Lineage);

impl Restored {
    pub fn of(links: &[Link]) -> Option<Restored> {
        let (first, last) = (links.first()?, links.last()?);
        Some(Restored(Lineage {
            generation: last.generation,
            manifest_crc32: last.manifest_crc32,
            increments: links.len() - 1,
            increment_bytes: links[1..]
                .iter()
                .map(|l| l.manifest.memory.data_bytes)
                .sum(),
            full_bytes: first.manifest.memory.data_bytes,
        }))
    }
}

/// Digests of every page of guest RAM below some limit as the newest generation holds
/// it (0: an all-zero page; pages past the end are zero).
#[derive(Default)]
struct Digests(Vec<u128>);

/// The digest of an all-zero page (and of pages never saved, which are zero).
pub const PAGE_DIGEST_ZERO: u128 = 0;
/// A digest no page has: the page's content in the newest generation is not known,
/// so the next generation stores it whatever it holds.
const PAGE_DIGEST_UNKNOWN: u128 = u128::MAX;

pub fn digest(seed: u64, page: &[u8]) -> u128 {
    if super::write::is_zero(page) {
        PAGE_DIGEST_ZERO
    } else {
        xxhash_rust::xxh3::xxh3_128_with_seed(page, seed).clamp(1, PAGE_DIGEST_UNKNOWN - 1)
    }
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Digests of pages `[0, pages)`, computed in parallel.
fn digest_all(mem: &GuestMemory, seed: u64, pages: u64) -> Vec<u128> {
    let mut out = vec![0u128; pages as usize];
    let per = (pages as usize).div_ceil(threads()).max(1);
    std::thread::scope(|s| {
        for (i, part) in out.chunks_mut(per).enumerate() {
            s.spawn(move || {
                for (j, d) in part.iter_mut().enumerate() {
                    let gpa = ((i * per + j) as u64) * PAGE;
                    *d = digest(seed, mem.slice(gpa, PAGE).expect("page inside RAM"));
                }
            });
        }
    });
    out
}

/// Clears from `bits` the pages whose digest equals `known`'s, and returns the new
/// digests of the pages left.
fn filter_unchanged(
    mem: &GuestMemory,
    seed: u64,
    known: &Digests,
    bits: &mut [u64],
) -> Vec<(u64, u128)> {
    let per = bits.len().div_ceil(threads()).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = bits
            .chunks_mut(per)
            .enumerate()
            .map(|(i, part)| {
                s.spawn(move || {
                    let mut changed = Vec::new();
                    for (j, word) in part.iter_mut().enumerate() {
                        let mut w = *word;
                        while w != 0 {
                            let bit = w.trailing_zeros() as u64;
                            w &= w - 1;
                            let page = ((i * per + j) as u64) * 64 + bit;
                            let Some(data) = mem.slice(page * PAGE, PAGE) else {
                                *word &= !(1 << bit);
                                continue;
                            };
                            let d = digest(seed, data);
                            if known.0.get(page as usize).copied().unwrap_or(0) == d {
                                *word &= !(1 << bit);
                            } else {
                                changed.push((page, d));
                            }
                        }
                    }
                    changed
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("digest thread panicked"))
            .collect()
    })
}

/// New digests for the newest generation, applied once it is durable.
enum Staged {
    None,
    All(Vec<u128>),
    Changed(Vec<(u64, u128)>),
}

/// What the next generation stores.
#[allow(clippy::large_enum_variant)]
pub enum Plan {
    Full,
    Incremental {
        parent: u64,
        parent_manifest_crc32: u32,
        dirty: PageBitmap,
    },
}

impl Plan {
    pub fn describe(&self, manifest: &mut Manifest) {
        let parent = match self {
            Plan::Full => None,
            Plan::Incremental {
                parent,
                parent_manifest_crc32,
                ..
            } => Some((*parent, *parent_manifest_crc32)),
        };
        describe_parent(manifest, parent);
    }
}

/// Records in `manifest` what its generation builds on: `parent` (the parent's number
/// and manifest CRC32) for an incremental generation, None for a full one.
pub fn describe_parent(manifest: &mut Manifest, parent: Option<(u64, u32)>) {
    manifest.kind = match parent {
        Some(_) => KIND_INCREMENTAL,
        None => KIND_FULL,
    }
    .into();
    manifest.parent = parent.map(|(generation, _)| generation);
    manifest.parent_manifest_crc32 = parent.map(|(_, crc32)| crc32);
}

/// How a pre-copy session starts: from `Tracker::precopy_start`.
pub struct PrecopyStart {
    pub basis: super::precopy::Basis,
    pub first_round: PageBitmap,
    pub digests: Vec<u128>,
    pub seed: u64,
}

/// Tracks guest RAM against the last generation. All methods are called with the
/// guest stopped at a safe point (no vCPU running, no host write in flight).
pub struct Tracker {
    enabled: bool,
    base: Option<Lineage>,
    seed: u64,
    digests: Digests,
    staged: Staged,
}

/// A bitmap with every page below `limit` set.
fn all_pages(mem: &GuestMemory, limit: u64) -> PageBitmap {
    let pages = limit.min(mem.size()) / PAGE;
    let mut all = vec![0u64; bitmap_words(mem.size())];
    for (i, w) in all.iter_mut().enumerate() {
        let first = i as u64 * 64;
        if first + 64 <= pages {
            *w = !0;
        } else if first < pages {
            *w = (1u64 << (pages - first)) - 1;
        }
    }
    all
}

impl Tracker {
    /// `enabled`: keep a digest of every page so that later generations can be
    /// incremental.
    pub fn new(enabled: bool) -> Tracker {
        let mut seed = [0u8; 8];
        // SAFETY: getrandom writes at most seed.len() bytes into seed.
        unsafe { libc::getrandom(seed.as_mut_ptr() as *mut _, seed.len(), 0) };
        Tracker {
            enabled,
            base: None,
            seed: u64::from_ne_bytes(seed) ^ crate::clock::monotonic_ns() as u64,
            digests: Digests::default(),
            staged: Staged::None,
        }
    }

    /// Guest RAM now holds exactly the chain's newest generation (a restore loaded it):
    /// continue that chain. `limit`: the end of the guest RAM ever handed out.
    pub fn restored(&mut self, mem: &GuestMemory, chain: &Restored, limit: u64) {
        if !self.enabled {
            return;
        }
        let mut digests = digest_all(mem, self.seed, limit.min(mem.size()) / PAGE);
        // Pages vmctl wrote since the chain was loaded (the kernel's restore, the vDSO
        // and its clock page) differ from what the chain holds: the next generation
        // must store them even if they do not change again.
        let mut written = vec![0u64; bitmap_words(mem.size())];
        mem.take_host_dirty(&mut written);
        for (word_index, &word) in written.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let page = word_index * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if let Some(d) = digests.get_mut(page) {
                    *d = PAGE_DIGEST_UNKNOWN;
                }
            }
        }
        self.digests = Digests(digests);
        self.base = Some(chain.0.clone());
    }

    fn incremental_basis(&self) -> Option<&Lineage> {
        self.base
            .as_ref()
            .filter(|b| self.enabled && b.increments < MAX_INCREMENTS)
    }

    /// Decides what the next generation stores, the guest stopped: with a base, every
    /// page below `limit` is compared with its digest.
    pub fn plan(&mut self, mem: &GuestMemory, limit: u64) -> Plan {
        // Everything is compared, so vmctl's marks so far are not needed.
        mem.take_host_dirty(&mut vec![0; bitmap_words(mem.size())]);
        self.staged = Staged::None;
        let mut plan = Plan::Full;
        if let Some(b) = self.incremental_basis() {
            let mut changed_pages = all_pages(mem, limit);
            let changed = filter_unchanged(mem, self.seed, &self.digests, &mut changed_pages);
            let bytes = changed.len() as u64 * PAGE;
            if b.increment_bytes + bytes <= b.full_bytes {
                plan = Plan::Incremental {
                    parent: b.generation,
                    parent_manifest_crc32: b.manifest_crc32,
                    dirty: changed_pages,
                };
                self.staged = Staged::Changed(changed);
            }
        }
        if matches!(plan, Plan::Full) && self.enabled {
            self.staged = Staged::All(digest_all(mem, self.seed, limit.min(mem.size()) / PAGE));
        }
        plan
    }

    /// Arms the dirty log for a pre-copy session (the guest stopped) and says what its
    /// first round copies: every page below `limit`, of which, on top of an earlier
    /// generation, only those whose digest changed are stored.
    pub fn precopy_start(&mut self, mem: &GuestMemory, limit: u64) -> io::Result<PrecopyStart> {
        use super::precopy::Basis;
        mem.set_dirty_logging(true)?;
        // Round 1 reads every page after this point; vmctl's writes from now on are
        // marked again and taken by the last round.
        mem.take_host_dirty(&mut vec![0; bitmap_words(mem.size())]);
        let (basis, digests) = match self.incremental_basis() {
            Some(b) if b.increment_bytes <= b.full_bytes => (
                Basis::Incremental {
                    parent: b.generation,
                    parent_crc32: b.manifest_crc32,
                },
                self.digests.0.clone(),
            ),
            _ => (Basis::Full, Vec::new()),
        };
        Ok(PrecopyStart {
            basis,
            first_round: all_pages(mem, limit),
            digests,
            seed: self.seed,
        })
    }

    /// A pre-copy session made its generation durable; the dirty log goes off.
    pub fn precopy_done(
        &mut self,
        mem: &GuestMemory,
        basis: super::precopy::Basis,
        written: &Written,
        digests: Vec<u128>,
    ) {
        let _ = mem.set_dirty_logging(false);
        self.staged = Staged::None;
        let incremental = matches!(basis, super::precopy::Basis::Incremental { .. });
        self.base = Some(Lineage::after(self.base.as_ref(), incremental, written));
        self.digests = Digests(digests);
        if !self.enabled {
            self.base = None;
            self.digests = Digests::default();
        }
    }

    /// A pre-copy session failed or was abandoned: the dirty log goes off and the
    /// chain is unchanged (nothing was written).
    pub fn precopy_failed(&mut self, mem: &GuestMemory) {
        let _ = mem.set_dirty_logging(false);
        self.staged = Staged::None;
    }

    /// The generation `plan` asked for is durable: it is the new base.
    pub fn written(&mut self, plan: &Plan, written: &Written) {
        match std::mem::replace(&mut self.staged, Staged::None) {
            Staged::None => {}
            Staged::All(all) => self.digests = Digests(all),
            Staged::Changed(changed) => {
                for (page, d) in changed {
                    let i = page as usize;
                    if i >= self.digests.0.len() {
                        self.digests.0.resize(i + 1, PAGE_DIGEST_ZERO);
                    }
                    self.digests.0[i] = d;
                }
            }
        }
        if !self.enabled {
            return;
        }
        let incremental = matches!(plan, Plan::Incremental { .. });
        self.base = Some(Lineage::after(self.base.as_ref(), incremental, written));
    }
}
