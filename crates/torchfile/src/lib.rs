//! torchfile: the public API for PyTorch `torch.save` checkpoint files, in pure Rust (no libtorch).
//!
//! A `torch.save` file is a STORED zip archive whose records live under one top-level folder:
//! `data.pkl` (a pickle of the object tree, tensors pointing at storages through persistent ids),
//! `.format_version`, `.storage_alignment`, `byteorder`, one `data/<key>` record of raw
//! little-endian bytes per storage, `version` and `.data/serialization_id`. Every record's data
//! starts at a 64-byte aligned offset so `torch.load(mmap=True)` can map it.
//!
//! - [`Writer`] streams a file: the object tree first, then each storage's bytes in chunks
//!   (CRC computed on the fly, never a whole storage in memory), zip64 when needed, fsync at the end.
//! - [`TorchFile`] maps a file, parses its central directory (zip64 aware) and unpickles `data.pkl`
//!   with a restricted VM that never executes anything: unknown globals become [`Value::Object`].
//!
//! Modules: `value` (the value model), `zip` (archive layout), `pickle_write`, `pickle_read`,
//! `writer` and `reader` (the API types).

mod error;
mod pickle_read;
mod pickle_write;
mod reader;
mod value;
mod writer;
mod zip;

pub use error::Error;
pub use pickle_read::{unpickle, unpickle_with_limits, Limits};
pub use pickle_write::pickle;
pub use reader::TorchFile;
pub use value::{DType, TensorRef, Value};
pub use writer::Writer;

/// Test support: raw archive writing for hostile-input tests. Not part of the stable API.
#[doc(hidden)]
pub mod testing {
    pub use crate::zip::write_raw_archive;
}
