//! Checkpoints: the format, writing a generation, reading and verifying one.

pub mod compress;
pub mod cpu;
pub mod format;
pub mod incremental;
pub mod lazy;
pub mod precopy;
pub mod read;
pub mod write;

use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("{path}: {1}", path = .0.display())]
    Io(PathBuf, std::io::Error),
    #[error("{path}: {1}", path = .0.display())]
    Corrupt(PathBuf, String),
    #[error("{path}: {1}", path = .0.display())]
    Format(PathBuf, String),
    #[error("{0}")]
    Refused(String),
    /// A generation this one builds on is unusable.
    #[error("it needs generation {0}, which is unusable: {1}")]
    Chain(u64, Box<CheckpointError>),
}
