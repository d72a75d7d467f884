//! Guest-physical memory: one host mapping that backs the guest's RAM memslot.
//!
//! The mapping is reserved with MAP_NORESERVE and populated 2 MiB at a time as the
//! kernel layer hands frames out, because on this platform a guest first touch of an
//! unpopulated host page costs microseconds while a populated, THP-backed 2 MiB page
//! costs nothing (see shared/PLATFORM.md "Memory").

use super::layout::RAM_SLOT_SIZE;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::io;
use std::ptr::NonNull;
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
}

struct RamSlots {
    vm: Option<VmFd>,
    backed: u64,
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
            }),
        })
    }

    /// Attaches the VM (a descriptor of its own) whose memslots expose this RAM.
    pub fn attach(&self, vm: VmFd) {
        self.slots.lock().expect("slots poisoned").vm = Some(vm);
    }

    /// Makes sure KVM has memslots for guest-physical `[0, upto)`, adding 1 GiB slots
    /// as needed. Cheap when they already exist.
    pub fn ensure_backed(&self, upto: u64) -> io::Result<()> {
        let mut s = self.slots.lock().expect("slots poisoned");
        let upto = upto.min(self.size);
        while s.backed < upto {
            let start = s.backed;
            let len = RAM_SLOT_SIZE.min(self.size - start);
            let region = kvm_userspace_memory_region {
                slot: (start / RAM_SLOT_SIZE) as u32,
                flags: 0,
                guest_phys_addr: start,
                memory_size: len,
                userspace_addr: self.host_base() + start,
            };
            let vm =
                s.vm.as_ref()
                    .ok_or_else(|| io::Error::other("guest RAM has no VM"))?;
            // SAFETY: the range lies inside this mapping, which outlives the VM's use of
            // it (the Vm keeps its GuestMemory alive as long as the VM exists).
            unsafe { vm.set_user_memory_region(region) }
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
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
    pub fn host_ptr(&self, gpa: u64, len: u64) -> Option<*mut u8> {
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
        let p = self.host_ptr(gpa, len)?;
        // SAFETY: bounds checked by host_ptr; the mapping lives as long as self.
        Some(unsafe { std::slice::from_raw_parts(p, len as usize) })
    }

    pub fn read_u64(&self, gpa: u64) -> u64 {
        let p = self.host_ptr(gpa, 8).expect("read_u64 outside guest RAM");
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
        let p = self
            .host_ptr(gpa, len)
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
