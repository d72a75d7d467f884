//! Shared file mappings. The guest must see the file itself, not a copy: writes
//! through the mapping show up in read(2) at once and the other way round. So each
//! shared mapping is a host MAP_SHARED mapping of the file, placed in the guest as
//! its own memslot in a window above RAM, and guest page tables point into it.

use crate::machine::layout::{FIRST_SHARED_SLOT, PAGE_SIZE, SHARED_WINDOW, SHARED_WINDOW_END};
use crate::machine::{MachineError, Vm};
use std::os::fd::RawFd;
use std::sync::Arc;

/// A file range mapped into a memslot.
#[derive(Debug)]
pub struct SharedRegion {
    pub slot: u32,
    pub gpa: u64,
    pub len: u64,
    pub file_offset: u64,
    pub writable: bool,
    host: *mut libc::c_void,
}

// SAFETY: the host mapping is owned by the region and only touched by KVM and by
// msync/munmap through these methods.
unsafe impl Send for SharedRegion {}
unsafe impl Sync for SharedRegion {}

impl SharedRegion {
    /// Host address of guest-physical `gpa` inside this region.
    pub fn host_ptr(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        (gpa >= self.gpa && gpa + len <= self.gpa + self.len)
            .then(|| (self.host as u64 + (gpa - self.gpa)) as *mut u8)
    }

    pub fn msync(&self) {
        // SAFETY: the mapping belongs to this region.
        unsafe { libc::msync(self.host, self.len as usize, libc::MS_SYNC) };
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this region created; its memslot has
        // been removed first (see SharedRegions::collect).
        unsafe { libc::munmap(self.host, self.len as usize) };
    }
}

/// The memslots and guest-physical ranges in use for shared mappings.
#[derive(Debug, Default)]
pub struct SharedRegions {
    live: Vec<Arc<SharedRegion>>,
    /// Freed (gpa, len) ranges, reused first-fit.
    free: Vec<(u64, u64)>,
    next_gpa: u64,
    free_slots: Vec<u32>,
    next_slot: u32,
}

impl SharedRegions {
    pub fn create(
        &mut self,
        vm: &Vm,
        fd: RawFd,
        file_offset: u64,
        len: u64,
        writable: bool,
    ) -> Result<Arc<SharedRegion>, i32> {
        self.create_at(vm, fd, file_offset, len, writable, None)
    }

    /// Like `create`, at a given (gpa, slot) when restoring a checkpoint, since the
    /// guest's page tables point there.
    pub fn create_at(
        &mut self,
        vm: &Vm,
        fd: RawFd,
        file_offset: u64,
        len: u64,
        writable: bool,
        fixed: Option<(u64, u32)>,
    ) -> Result<Arc<SharedRegion>, i32> {
        let len = len.next_multiple_of(PAGE_SIZE);
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a new shared mapping of the guest's file at an address of the
        // kernel's choice; it aliases no Rust object.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                prot,
                libc::MAP_SHARED,
                fd,
                file_offset as i64,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::ENOMEM));
        }
        let gpa = match fixed {
            Some((gpa, _)) => {
                self.next_gpa = self.next_gpa.max(gpa + len - SHARED_WINDOW);
                gpa
            }
            None => match self.free.iter().position(|&(_, l)| l >= len) {
                Some(i) => {
                    let (g, l) = self.free[i];
                    if l == len {
                        self.free.remove(i);
                    } else {
                        self.free[i] = (g + len, l - len);
                    }
                    g
                }
                None => {
                    let g = SHARED_WINDOW + self.next_gpa;
                    if g + len > SHARED_WINDOW_END {
                        // SAFETY: undoing the mapping made above.
                        unsafe { libc::munmap(host, len as usize) };
                        return Err(libc::ENOMEM);
                    }
                    self.next_gpa += len;
                    g
                }
            },
        };
        let slot = match fixed {
            Some((_, slot)) => {
                self.next_slot = self.next_slot.max(slot - FIRST_SHARED_SLOT + 1);
                slot
            }
            None => self.free_slots.pop().unwrap_or_else(|| {
                self.next_slot += 1;
                FIRST_SHARED_SLOT + self.next_slot - 1
            }),
        };
        let region = Arc::new(SharedRegion {
            slot,
            gpa,
            len,
            file_offset,
            writable,
            host,
        });
        // SAFETY: the region keeps the host mapping alive until its slot is removed in
        // `collect`, before the region is dropped.
        if unsafe { vm.add_slot(slot, gpa, len, host as u64, !writable) }.is_err() {
            self.free.push((gpa, len));
            self.free_slots.push(slot);
            return Err(libc::ENOMEM);
        }
        self.live.push(region.clone());
        Ok(region)
    }

    /// Releases regions no mapping uses any more. Their page-table entries are already
    /// gone (unmapping clears them before the VMA is dropped).
    pub fn collect(&mut self, vm: &Vm) -> Result<(), MachineError> {
        let mut i = 0;
        while i < self.live.len() {
            if Arc::strong_count(&self.live[i]) == 1 {
                let r = self.live.swap_remove(i);
                vm.remove_slot(r.slot, r.gpa)?;
                self.free.push((r.gpa, r.len));
                self.free_slots.push(r.slot);
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    pub fn msync_all(&self) {
        for r in &self.live {
            r.msync();
        }
    }
}
