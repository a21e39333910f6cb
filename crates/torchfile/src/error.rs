//! The crate's error type: every failure names the file (where there is one) and what was wrong.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The zip container is malformed, truncated or uses something torch never writes.
    #[error("{path}: not a valid torch.save zip archive: {msg}")]
    Zip { path: PathBuf, msg: String },
    /// `data.pkl` could not be unpickled (truncated, unknown opcode, limits exceeded, ...).
    #[error("{path}: data.pkl: pickle error at byte {offset}: {msg}")]
    Pickle { path: PathBuf, offset: usize, msg: String },
    /// The archive and the pickle disagree, or a tensor/storage is inconsistent.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// The writer API was used out of order or with wrong sizes.
    #[error("{path}: writer misuse: {msg}")]
    Usage { path: PathBuf, msg: String },
}

impl Error {
    pub(crate) fn with_path(self, p: &std::path::Path) -> Error {
        match self {
            Error::Pickle { offset, msg, .. } => Error::Pickle { path: p.to_path_buf(), offset, msg },
            Error::Zip { msg, .. } => Error::Zip { path: p.to_path_buf(), msg },
            Error::Format { msg, .. } => Error::Format { path: p.to_path_buf(), msg },
            other => other,
        }
    }
}
