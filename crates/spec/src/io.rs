//! The file writes every tool shares, so a checkpoint is committed the same way whoever writes
//! it: the converter's outputs, the engine's saves.
//!
//! - [`safetensors`]: the streamed safetensors writer (header first, tensors in order, byte
//!   counts checked, fsynced);
//! - [`commit`]: the staging folder renamed into place, fsynced files and folders, and the
//!   tracker file replaced atomically — an interrupted write never leaves something that looks
//!   complete.
//!
//! The only part of mm-spec that touches the disk; the rest stays pure.

pub mod commit;
pub mod safetensors;

use std::path::{Path, PathBuf};

pub use commit::{fsync_dir, move_into_place, replace_file, staging_path, sync_tree, write_synced, StagedDir};
pub use safetensors::{convert, header_bytes, st_dtype, trainable, SafetensorsWriter, TensorHeader};

/// A write that failed: the file, what was being done, and why.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

impl FileError {
    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        FileError::Io { action, path: path.to_path_buf(), source }
    }
}
