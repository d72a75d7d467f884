//! The KVM VM: /dev/kvm, the VM file descriptor, guest RAM and its memslot.

use super::layout::{FLUSH_GPA, FLUSH_SLOT, MAX_RAM, PAGE_SIZE, SYSTEM_SIZE};
use super::memory::GuestMemory;
use super::system::{self, SystemHalf};
use super::vcpu::Vcpu;
use super::MachineError;
use kvm_bindings::{kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Arc;

/// Where /dev/kvm comes from: opened by us, or inherited from a privileged launcher.
#[derive(Clone, Copy, Debug)]
pub enum KvmSource {
    Open,
    InheritedFd(RawFd),
}

pub fn open_kvm(source: KvmSource) -> Result<Kvm, MachineError> {
    match source {
        KvmSource::Open => Kvm::new().map_err(|e| MachineError::KvmOpen(e.errno())),
        KvmSource::InheritedFd(fd) => {
            // SAFETY: fcntl(F_GETFD) only queries whether fd is open.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(MachineError::KvmFd(fd, "it is not an open file descriptor"));
            }
            // SAFETY: the descriptor is open and we take ownership of it; the API version
            // check below refuses anything that is not /dev/kvm.
            let kvm = unsafe { Kvm::from_raw_fd(fd) };
            if kvm.get_api_version() != 12 {
                // Do not let Kvm's drop close a descriptor we have not validated as ours.
                std::mem::forget(kvm);
                return Err(MachineError::KvmFd(fd, "it is not /dev/kvm"));
            }
            // SAFETY: plain fcntl on a descriptor we now own: keep it out of anything we exec.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            Ok(kvm)
        }
    }
}

pub struct Vm {
    fd: VmFd,
    /// Host page behind the one-page memslot that `flush_shadow` adds and removes;
    /// the lock keeps two flushes (two forks at once) from adding it twice.
    flush_page: std::sync::Mutex<std::ptr::NonNull<libc::c_void>>,
    mem: Arc<GuestMemory>,
    system: SystemHalf,
    cpuid: CpuId,
    xcr0: u64,
}

impl Vm {
    /// A VM with `ram` bytes of guest RAM after the system area.
    pub fn new(kvm: &Kvm, ram: u64) -> Result<Vm, MachineError> {
        if ram > MAX_RAM {
            return Err(MachineError::TooMuchMemory(ram, MAX_RAM));
        }
        let fd = kvm
            .create_vm()
            .map_err(|e| MachineError::Kvm("KVM_CREATE_VM", e))?;
        let mem = GuestMemory::new(SYSTEM_SIZE + ram).map_err(MachineError::GuestRam)?;
        // Guest RAM gets its memslots as it is used; it needs a handle on the VM.
        // SAFETY: dup of the VM descriptor we just created; the new VmFd owns the copy.
        // Close-on-exec like every descriptor of vmctl's own, so it never passes for
        // one the program inherited.
        let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(MachineError::GuestRam(std::io::Error::last_os_error()));
        }
        // SAFETY: `dup` is an open KVM VM descriptor that nothing else owns.
        let slot_fd = unsafe { kvm.create_vmfd_from_rawfd(dup) }
            .map_err(|e| MachineError::Kvm("KVM_CREATE_VM (dup)", e))?;
        mem.attach(slot_fd);
        mem.populate(0, SYSTEM_SIZE)
            .map_err(MachineError::GuestRam)?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| MachineError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let xcr0 = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0xd && e.index == 0)
            .map(|e| (e.eax as u64) | ((e.edx as u64) << 32))
            .unwrap_or(0x7);
        let system = system::build(&mem);
        // SAFETY: a fresh anonymous page aliasing no Rust object; it is unmapped in Drop.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if page == libc::MAP_FAILED {
            return Err(MachineError::GuestRam(std::io::Error::last_os_error()));
        }
        Ok(Vm {
            fd,
            flush_page: std::sync::Mutex::new(
                std::ptr::NonNull::new(page).expect("mmap returned null"),
            ),
            mem: Arc::new(mem),
            system,
            cpuid,
            xcr0,
        })
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    pub fn system_half(&self) -> &SystemHalf {
        &self.system
    }

    pub fn xcr0(&self) -> u64 {
        self.xcr0
    }

    /// Creates vCPU `index` and puts it through its first (CPL0) run, with `cr3` as
    /// its address space.
    pub fn create_vcpu(&self, index: u64, cr3: u64) -> Result<Vcpu, MachineError> {
        let fd = self
            .fd
            .create_vcpu(index)
            .map_err(|e| MachineError::Kvm("KVM_CREATE_VCPU", e))?;
        let xsave_size = (self
            .fd
            .check_extension_int(kvm_ioctls::Cap::Xsave2)
            .max(4096)) as usize;
        Vcpu::start(
            fd,
            index,
            self.mem.clone(),
            &self.cpuid,
            self.xcr0,
            xsave_size,
            cr3,
        )
    }
}

impl Vm {
    /// Adds a memslot mapping guest-physical `gpa` to `len` bytes at host `addr`.
    ///
    /// # Safety
    /// `addr..addr+len` must stay mapped until `remove_slot(slot)` is called.
    pub unsafe fn add_slot(
        &self,
        slot: u32,
        gpa: u64,
        len: u64,
        addr: u64,
        read_only: bool,
    ) -> Result<(), MachineError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: if read_only {
                kvm_bindings::KVM_MEM_READONLY
            } else {
                0
            },
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: addr,
        };
        // SAFETY: the caller guarantees the host range outlives the slot.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| MachineError::Kvm("KVM_SET_USER_MEMORY_REGION", e))
    }

    /// Removes a memslot; KVM drops every translation into it.
    pub fn remove_slot(&self, slot: u32, gpa: u64) -> Result<(), MachineError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a zero-sized region deletes the slot; no host memory is referenced.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| MachineError::Kvm("KVM_SET_USER_MEMORY_REGION", e))
    }
}

impl Vm {
    /// Makes KVM drop every shadow page, so that page-table entries vmctl rewrote from
    /// the host (write-protecting a parent at fork, tearing down an address space) take
    /// effect for every vCPU, and freed page-table frames can be reused. Adding and
    /// removing a memslot is KVM's cheapest way to zap everything (shared/PLATFORM.md:
    /// about 65 us, after which pages refault from the guest's tables).
    pub fn flush_shadow(&self) -> Result<(), MachineError> {
        let page = self.flush_page.lock().expect("flush page poisoned");
        // SAFETY: the page lives as long as the Vm and the slot is removed right away.
        unsafe {
            self.add_slot(FLUSH_SLOT, FLUSH_GPA, PAGE_SIZE, page.as_ptr() as u64, true)?;
        }
        self.remove_slot(FLUSH_SLOT, FLUSH_GPA)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let page = self.flush_page.lock().expect("flush page poisoned");
        // SAFETY: unmapping the page mapped in new(); its slot is never left in place.
        unsafe { libc::munmap(page.as_ptr(), PAGE_SIZE as usize) };
    }
}

// SAFETY: the flush page is only handed to KVM by address; all other state is KVM
// descriptors and Arc'd guest RAM, which are safe to use from several vCPU threads.
unsafe impl Send for Vm {}
unsafe impl Sync for Vm {}
