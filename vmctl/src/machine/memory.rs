//! Guest-physical memory: one host mapping that backs the guest's RAM memslot.
//!
//! The mapping is reserved with MAP_NORESERVE and populated 2 MiB at a time as the
//! kernel layer hands frames out, because on this platform a guest first touch of an
//! unpopulated host page costs microseconds while a populated, THP-backed 2 MiB page
//! costs nothing (see shared/PLATFORM.md "Memory").
//!
//! Incremental checkpoints need every page changed since the previous one. The guest's
//! own writes are in KVM's dirty log (per memslot, on only while a checkpoint needs it:
//! logging makes KVM map guest RAM with 4 KiB pages). vmctl's own writes into guest RAM
//! (syscall results, page tables, file-backed faults, the loader) never show up there,
//! so every host access that can write goes through `host_ptr`, which marks its pages
//! in a host-side dirty bitmap that is always on.

use super::layout::RAM_SLOT_SIZE;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

pub const HUGE_PAGE: u64 = 2 << 20;
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Guest-physical RAM `[0, size)` backed by an anonymous, 2 MiB aligned host mapping.
pub struct GuestMemory {
    base: NonNull<u8>,
    size: u64,
    /// Host-side start of the raw mapping (before alignment), for munmap.
    raw: *mut libc::c_void,
    raw_len: usize,
    /// The VM's memslots for RAM, and how far they reach.
    slots: Mutex<RamSlots>,
    /// One bit per 4 KiB page written by vmctl itself since the bits were last taken.
    host_dirty: Box<[AtomicU64]>,
}

struct RamSlots {
    vm: Option<VmFd>,
    backed: u64,
    /// Whether the RAM memslots have KVM_MEM_LOG_DIRTY_PAGES (new ones get it too).
    logging: bool,
}

/// KVM_CLEAR_DIRTY_LOG, _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log): kvm-ioctls has
/// no wrapper for it.
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xc018_aec0;

/// A bitmap of guest-physical 4 KiB pages, bit `n % 64` of word `n / 64` for page `n`.
pub type PageBitmap = Vec<u64>;

pub fn bitmap_words(size: u64) -> usize {
    size.div_ceil(4096 * 64) as usize
}

// SAFETY: GuestMemory owns its mapping; the raw pointers are only dereferenced through
// bounds-checked accessors, and concurrent guest access is the guest's own business,
// exactly as with real RAM.
unsafe impl Send for GuestMemory {}
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    pub fn new(size: u64) -> io::Result<Self> {
        let size = size.next_multiple_of(HUGE_PAGE);
        let raw_len = (size + HUGE_PAGE) as usize;
        // SAFETY: an anonymous private mapping at an address of the kernel's choice
        // aliases no Rust object.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                raw_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let aligned = (raw as u64).next_multiple_of(HUGE_PAGE);
        // SAFETY: [aligned, aligned+size) lies inside the mapping just created.
        unsafe {
            libc::madvise(aligned as *mut _, size as usize, libc::MADV_HUGEPAGE);
        }
        Ok(GuestMemory {
            base: NonNull::new(aligned as *mut u8).expect("mmap returned null"),
            size,
            raw,
            raw_len,
            slots: Mutex::new(RamSlots {
                vm: None,
                backed: 0,
                logging: false,
            }),
            host_dirty: (0..bitmap_words(size)).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Attaches the VM (a descriptor of its own) whose memslots expose this RAM.
    pub fn attach(&self, vm: VmFd) {
        // Manual protection: KVM_GET_DIRTY_LOG only reports, and KVM_CLEAR_DIRTY_LOG
        // re-arms exactly the pages a checkpoint has taken. Without the capability the
        // dirty log is simply unavailable and checkpoints stay full.
        let cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            args: [
                kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as u64,
                0,
                0,
                0,
            ],
            ..Default::default()
        };
        let _ = vm.enable_cap(&cap);
        self.slots.lock().expect("slots poisoned").vm = Some(vm);
    }

    fn slot_flags(logging: bool) -> u32 {
        if logging {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        }
    }

    fn set_slot(vm: &VmFd, start: u64, len: u64, host: u64, logging: bool) -> io::Result<()> {
        let region = kvm_userspace_memory_region {
            slot: (start / RAM_SLOT_SIZE) as u32,
            flags: Self::slot_flags(logging),
            guest_phys_addr: start,
            memory_size: len,
            userspace_addr: host + start,
        };
        // SAFETY: the range lies inside this mapping, which outlives the VM's use of
        // it (the Vm keeps its GuestMemory alive as long as the VM exists).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    /// Turns KVM's dirty log for guest RAM on or off. Turning it on write-protects all
    /// of RAM, so the log then holds exactly the pages the guest writes from now on.
    pub fn set_dirty_logging(&self, on: bool) -> io::Result<()> {
        let mut s = self.slots.lock().expect("slots poisoned");
        if s.logging == on {
            return Ok(());
        }
        let vm =
            s.vm.as_ref()
                .ok_or_else(|| io::Error::other("guest RAM has no VM"))?;
        let mut start = 0;
        while start < s.backed {
            let len = RAM_SLOT_SIZE.min(self.size - start);
            Self::set_slot(vm, start, len, self.host_base(), on)?;
            start += len;
        }
        s.logging = on;
        Ok(())
    }

    /// ORs into `into` the pages the guest wrote since the last call (or since logging
    /// was turned on), and re-arms them, so a write after this call is in the next one.
    pub fn take_guest_dirty(&self, into: &mut [u64]) -> io::Result<()> {
        let s = self.slots.lock().expect("slots poisoned");
        if !s.logging {
            return Err(io::Error::other("the dirty log is off"));
        }
        let vm =
            s.vm.as_ref()
                .ok_or_else(|| io::Error::other("guest RAM has no VM"))?;
        let mut start = 0;
        while start < s.backed {
            let len = RAM_SLOT_SIZE.min(self.size - start);
            let slot = (start / RAM_SLOT_SIZE) as u32;
            let mut bits = vm
                .get_dirty_log(slot, len as usize)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
            if bits.iter().any(|&w| w != 0) {
                let clear = kvm_bindings::kvm_clear_dirty_log {
                    slot,
                    num_pages: (len / 4096) as u32,
                    first_page: 0,
                    __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                        dirty_bitmap: bits.as_mut_ptr() as *mut libc::c_void,
                    },
                };
                // SAFETY: KVM_CLEAR_DIRTY_LOG reads `num_pages` bits from the bitmap,
                // which holds at least that many (one bit per page of the slot).
                let r = unsafe {
                    libc::ioctl(
                        std::os::fd::AsRawFd::as_raw_fd(vm),
                        KVM_CLEAR_DIRTY_LOG,
                        &clear,
                    )
                };
                if r != 0 {
                    return Err(io::Error::last_os_error());
                }
                let first_word = (start / (4096 * 64)) as usize;
                for (i, w) in bits.iter().enumerate() {
                    if let Some(dst) = into.get_mut(first_word + i) {
                        *dst |= w;
                    }
                }
            }
            start += len;
        }
        Ok(())
    }

    /// ORs into `into` the pages vmctl itself wrote since the last call, and clears them.
    /// Only exact while nothing writes guest RAM from the host (the guest frozen at a safe
    /// point): bits are set when a writer obtains its pointer, before it writes.
    pub fn take_host_dirty(&self, into: &mut [u64]) {
        for (dst, word) in into.iter_mut().zip(self.host_dirty.iter()) {
            if word.load(Ordering::Relaxed) != 0 {
                *dst |= word.swap(0, Ordering::AcqRel);
            }
        }
    }

    /// Forgets the host-side dirty bits (after a restore has loaded all of RAM).
    pub fn clear_host_dirty(&self) {
        for word in self.host_dirty.iter() {
            word.store(0, Ordering::Release);
        }
    }

    fn mark_host_dirty(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / 4096;
        let last = (gpa + len - 1) / 4096;
        let mut page = first;
        while page <= last {
            let word = (page / 64) as usize;
            let bit = page % 64;
            let n = (64 - bit).min(last - page + 1);
            let mask = if n == 64 {
                !0
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.host_dirty[word].fetch_or(mask, Ordering::AcqRel);
            page += n;
        }
    }

    /// Makes sure KVM has memslots for guest-physical `[0, upto)`, adding 1 GiB slots
    /// as needed. Cheap when they already exist.
    pub fn ensure_backed(&self, upto: u64) -> io::Result<()> {
        let mut s = self.slots.lock().expect("slots poisoned");
        let upto = upto.min(self.size);
        while s.backed < upto {
            let start = s.backed;
            let len = RAM_SLOT_SIZE.min(self.size - start);
            let vm =
                s.vm.as_ref()
                    .ok_or_else(|| io::Error::other("guest RAM has no VM"))?;
            Self::set_slot(vm, start, len, self.host_base(), s.logging)?;
            s.backed = start + len;
        }
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn host_base(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    /// Host pointer for `len` bytes at guest-physical `gpa`, if entirely inside RAM.
    /// The pages count as written by vmctl (for incremental checkpoints): use
    /// `host_ptr_for_read` where nothing will be written through the pointer.
    pub fn host_ptr(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let p = self.host_ptr_for_read(gpa, len)?;
        self.mark_host_dirty(gpa, len);
        Some(p)
    }

    /// Host pointer for reading `len` bytes at guest-physical `gpa`. Writing through it
    /// would escape incremental checkpoints.
    pub fn host_ptr_for_read(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let end = gpa.checked_add(len)?;
        if end > self.size {
            return None;
        }
        // SAFETY: gpa < size, so the offset stays inside the mapping.
        Some(unsafe { self.base.as_ptr().add(gpa as usize) })
    }

    /// A byte slice of guest memory, for a guest that is frozen (a checkpoint): while
    /// vCPUs run, the guest may change it underneath, so live code uses `read`/`write`.
    pub fn slice(&self, gpa: u64, len: u64) -> Option<&[u8]> {
        let p = self.host_ptr_for_read(gpa, len)?;
        // SAFETY: bounds checked by host_ptr; the mapping lives as long as self.
        Some(unsafe { std::slice::from_raw_parts(p, len as usize) })
    }

    pub fn read_u64(&self, gpa: u64) -> u64 {
        let p = self
            .host_ptr_for_read(gpa, 8)
            .expect("read_u64 outside guest RAM");
        // SAFETY: in bounds; a volatile read because vCPUs may write the word meanwhile.
        unsafe { (p as *const u64).read_volatile() }
    }

    pub fn write_u64(&self, gpa: u64, value: u64) {
        let p = self.host_ptr(gpa, 8).expect("write_u64 outside guest RAM");
        // SAFETY: in bounds; page-table entries are aligned 8-byte words.
        unsafe { (p as *mut u64).write_volatile(value) }
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        let p = self
            .host_ptr(gpa, data.len() as u64)
            .expect("write outside guest RAM");
        // SAFETY: in bounds; see `read`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) }
    }

    /// Copies `len` bytes between two guest frames (copy-on-write).
    pub fn copy(&self, from: u64, to: u64, len: u64) {
        let src = self.host_ptr(from, len).expect("copy outside guest RAM");
        let dst = self.host_ptr(to, len).expect("copy outside guest RAM");
        // SAFETY: both ranges are in bounds and are distinct frames.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len as usize) }
    }

    pub fn zero(&self, gpa: u64, len: u64) {
        let p = self.host_ptr(gpa, len).expect("zero outside guest RAM");
        // SAFETY: in bounds.
        unsafe { std::ptr::write_bytes(p, 0, len as usize) }
    }

    /// Fault the host pages behind `[gpa, gpa+len)` in now, so the guest's first touch
    /// finds them present (and THP-backed).
    pub fn populate(&self, gpa: u64, len: u64) -> io::Result<()> {
        // Populating leaves the contents as they were: no host-dirty marks.
        let p = self
            .host_ptr_for_read(gpa, len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        self.ensure_backed(gpa + len)?;
        // SAFETY: the range is inside our mapping; MADV_POPULATE_WRITE only faults pages in.
        let r = unsafe { libc::madvise(p as *mut _, len as usize, MADV_POPULATE_WRITE) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in new().
        unsafe {
            libc::munmap(self.raw, self.raw_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(mem: &GuestMemory) -> Vec<u64> {
        let mut bits = vec![0; bitmap_words(mem.size())];
        mem.take_host_dirty(&mut bits);
        let mut pages = Vec::new();
        for (i, w) in bits.iter().enumerate() {
            for b in 0..64 {
                if w & (1 << b) != 0 {
                    pages.push(i as u64 * 64 + b);
                }
            }
        }
        pages
    }

    #[test]
    fn host_writes_mark_exactly_their_pages_and_reads_mark_none() {
        let mem = GuestMemory::new(8 << 20).unwrap();
        mem.write(4096 * 3 + 100, &[1; 8100]); // pages 3, 4 and 5
        mem.write_u64(4096 * 70, 7);
        mem.zero(4096 * 200, 4096);
        let _ = mem.host_ptr(4096 * 1000 + 4095, 2); // pages 1000 and 1001
        assert_eq!(taken(&mem), [3, 4, 5, 70, 200, 1000, 1001]);
        // Taken means cleared; reads and populating mark nothing.
        let _ = mem.slice(0, 8 << 20);
        let _ = mem.read_u64(4096 * 70);
        let _ = mem.host_ptr_for_read(0, 4096);
        assert_eq!(taken(&mem), Vec::<u64>::new());
        // A run across whole bitmap words.
        mem.zero(0, 4096 * 130);
        assert_eq!(taken(&mem), (0..130).collect::<Vec<_>>());
    }
}
