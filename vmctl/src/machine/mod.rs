//! The machine layer: KVM objects (VM, vCPUs), guest memory, and the few system
//! structures that let guest user code run and trap back to the VMM. It knows
//! nothing about processes, files or syscalls; the kernel layer drives it.

pub mod layout;
pub mod memory;
pub mod system;
pub mod vcpu;
pub mod vm;

pub use memory::GuestMemory;
pub use vcpu::{Exit, Vcpu, VcpuState};
pub use vm::{open_kvm, KvmSource, Vm};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum MachineError {
    #[error("cannot open /dev/kvm: {}", kvm_open_hint(*.0))]
    KvmOpen(i32),
    #[error("--kvm-fd {0}: {1}; pass a descriptor open on /dev/kvm")]
    KvmFd(i32, &'static str),
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("cannot reserve guest RAM: {0}")]
    GuestRam(std::io::Error),
    #[error("guest memory of {0} bytes exceeds the supported maximum of {1} bytes")]
    TooMuchMemory(u64, u64),
    #[error("vCPU failed: {0}")]
    VcpuFailed(String),
}

fn kvm_open_hint(errno: i32) -> String {
    match errno {
        libc::ENOENT => "no such device; load the kvm module (modprobe kvm_intel or kvm_amd) or run on a host with KVM".into(),
        libc::EACCES | libc::EPERM => "permission denied; run as root, add the user to the group owning /dev/kvm, or have a privileged launcher pass it with --kvm-fd".into(),
        e => std::io::Error::from_raw_os_error(e).to_string(),
    }
}
