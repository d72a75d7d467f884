//! Guest memory management: frames, page tables, VMAs and address spaces.

pub mod address_space;
pub mod frames;
pub mod page_table;
pub mod shared;
pub mod vma;

pub use address_space::{Access, AddressSpace, Fault, MmCtx};
pub use frames::FrameAllocator;
pub use shared::SharedRegions;
pub use vma::{Backing, MappedFile, VmaKind};
