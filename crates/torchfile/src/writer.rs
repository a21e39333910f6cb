//! The streaming writer API: the object tree (with tensor references) first, then each storage's
//! bytes in chunks of any size. Memory stays bounded by the pickle plus an 8 MiB write buffer,
//! however large the storages are.

use crate::error::Error;
use crate::pickle_write::pickle;
use crate::value::{DType, TensorRef, Value};
use crate::zip::ZipWriter;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

const BUFFER: usize = 8 << 20;

#[derive(Debug, Clone, PartialEq)]
enum Stage {
    Start,
    Storages,
    InStorage(String),
    Failed,
}

/// Writes a `torch.save`-compatible file: `create`, `new_tensor`s, `write_root`, then for every
/// storage the root refers to `begin_storage` / `write`... / `end_storage`, then `finish`.
/// Storages may be written in any order. A failed call leaves the writer unusable; the partial
/// file stays on disk for the caller to remove.
pub struct Writer {
    path: PathBuf,
    prefix: String,
    zip: ZipWriter<BufWriter<File>>,
    next_key: usize,
    stage: Stage,
    /// Storages the root refers to, in pickle order: key -> (bytes, written).
    storages: Vec<(String, u64, bool)>,
    index: HashMap<String, usize>,
}

fn serialization_id() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let c = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mix = (std::process::id() as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(c.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        ^ nanos.rotate_left(29);
    format!("{:020}{:020}", nanos, mix)
}

impl Writer {
    /// Creates (truncates) `path`. The archive folder is the file stem, as torch names it.
    pub fn create(path: &Path) -> Result<Writer, Error> {
        let file = File::create(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().replace(['/', '\\'], "_"))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "archive".to_string());
        Ok(Writer {
            path: path.to_path_buf(),
            prefix: stem,
            zip: ZipWriter::new(BufWriter::with_capacity(BUFFER, file), false),
            next_key: 0,
            stage: Stage::Start,
            storages: Vec::new(),
            index: HashMap::new(),
        })
    }

    /// Test support: write zip64 headers and end records even for small files.
    #[doc(hidden)]
    pub fn force_zip64(&mut self) {
        assert_eq!(self.zip.position(), 0, "force_zip64 before writing");
        self.zip.force_zip64 = true;
    }

    /// A contiguous tensor over a fresh storage with keys "0", "1", ... in call order.
    pub fn new_tensor(&mut self, dtype: DType, shape: &[usize]) -> TensorRef {
        let key = self.next_key.to_string();
        self.next_key += 1;
        TensorRef {
            dtype,
            shape: shape.to_vec(),
            stride: TensorRef::contiguous_stride(shape),
            storage: key,
            storage_offset: 0,
            storage_numel: shape.iter().product(),
        }
    }

    fn usage<T>(&self, msg: impl Into<String>) -> Result<T, Error> {
        Err(Error::Usage { path: self.path.clone(), msg: msg.into() })
    }

    fn io(&mut self, source: std::io::Error) -> Error {
        self.stage = Stage::Failed;
        Error::Io { path: self.path.clone(), source }
    }

    fn record(&mut self, name: &str, data: &[u8]) -> Result<(), Error> {
        let full = format!("{}/{}", self.prefix, name);
        self.zip.add_record(&full, data).map_err(|e| self.io(e))
    }

    /// Pickles `root` into `data.pkl` and writes the small records that precede the storages.
    /// Checks every tensor fits its storage and that a storage key is used with one dtype/size.
    pub fn write_root(&mut self, root: &Value) -> Result<(), Error> {
        if self.stage != Stage::Start {
            return self.usage("write_root must be called once, before any storage");
        }
        let mut problem = None;
        let mut storages: Vec<(String, u64, bool)> = Vec::new();
        let mut seen: HashMap<String, (DType, usize)> = HashMap::new();
        root.visit_tensors(&mut |t| {
            if problem.is_some() {
                return;
            }
            let valid_key = !t.storage.is_empty()
                && t.storage.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'.');
            if !valid_key {
                problem = Some(format!("storage key {:?} is not a plain record name", t.storage));
                return;
            }
            if t.storage_extent().is_none_or(|e| e > t.storage_numel) {
                problem = Some(format!(
                    "tensor of size {:?} stride {:?} offset {} does not fit storage {:?} of {} elements",
                    t.shape, t.stride, t.storage_offset, t.storage, t.storage_numel
                ));
                return;
            }
            match seen.get(&t.storage) {
                Some(&(d, n)) if d != t.dtype || n != t.storage_numel => {
                    problem = Some(format!(
                        "storage {:?} used as {:?}x{} and as {:?}x{}",
                        t.storage, d, n, t.dtype, t.storage_numel
                    ));
                }
                Some(_) => {}
                None => {
                    seen.insert(t.storage.clone(), (t.dtype, t.storage_numel));
                    match (t.storage_numel as u64).checked_mul(t.dtype.size_bytes() as u64) {
                        Some(b) => storages.push((t.storage.clone(), b, false)),
                        None => problem = Some(format!("storage {:?} is too large", t.storage)),
                    }
                }
            }
        });
        if let Some(p) = problem {
            return self.usage(p);
        }
        let pkl = pickle(root);
        self.record("data.pkl", &pkl)?;
        self.record(".format_version", b"1")?;
        self.record(".storage_alignment", b"64")?;
        self.record("byteorder", b"little")?;
        self.index = storages.iter().enumerate().map(|(i, s)| (s.0.clone(), i)).collect();
        self.storages = storages;
        self.stage = Stage::Storages;
        Ok(())
    }

    /// Keys of the storages `write_root` found, in pickle order, with their byte sizes.
    pub fn pending_storages(&self) -> Vec<(String, u64)> {
        self.storages.iter().filter(|s| !s.2).map(|s| (s.0.clone(), s.1)).collect()
    }

    /// Starts the record `data/<key>` of a storage the root refers to.
    pub fn begin_storage(&mut self, key: &str) -> Result<(), Error> {
        if self.stage != Stage::Storages {
            return self.usage(format!(
                "begin_storage({key:?}) needs write_root first and no open storage (state {:?})",
                self.stage
            ));
        }
        let Some(&i) = self.index.get(key) else {
            return self.usage(format!("storage {key:?} is not referenced by the root"));
        };
        if self.storages[i].2 {
            return self.usage(format!("storage {key:?} was already written"));
        }
        let size = self.storages[i].1;
        let name = format!("{}/data/{}", self.prefix, key);
        self.zip.begin_entry(&name, size).map_err(|e| self.io(e))?;
        self.stage = Stage::InStorage(key.to_string());
        Ok(())
    }

    /// Appends bytes to the open storage; more than its declared size is an error.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let Stage::InStorage(key) = &self.stage else {
            return self.usage("write without begin_storage");
        };
        let remaining = self.zip.remaining().unwrap_or(0);
        if bytes.len() as u64 > remaining {
            let key = key.clone();
            self.stage = Stage::Failed;
            return self.usage(format!(
                "storage {key:?}: {} more bytes than its declared size",
                bytes.len() as u64 - remaining
            ));
        }
        self.zip.write_data(bytes).map_err(|e| self.io(e))
    }

    /// Closes the open storage; it must have received exactly numel * element size bytes.
    pub fn end_storage(&mut self) -> Result<(), Error> {
        let Stage::InStorage(key) = self.stage.clone() else {
            return self.usage("end_storage without begin_storage");
        };
        let remaining = self.zip.remaining().unwrap_or(0);
        if remaining != 0 {
            self.stage = Stage::Failed;
            return self.usage(format!("storage {key:?}: {remaining} bytes short of its declared size"));
        }
        self.zip.end_entry();
        self.storages[self.index[&key]].2 = true;
        self.stage = Stage::Storages;
        Ok(())
    }

    /// Writes `version`, `.data/serialization_id` and the central directory, patches the CRCs,
    /// fsyncs, and returns the file size.
    pub fn finish(mut self) -> Result<u64, Error> {
        if self.stage != Stage::Storages {
            return self.usage(format!("finish in state {:?}", self.stage));
        }
        let missing: Vec<&str> = self.storages.iter().filter(|s| !s.2).map(|s| s.0.as_str()).collect();
        if !missing.is_empty() {
            return self.usage(format!("storages never written: {missing:?}"));
        }
        self.record("version", b"3\n")?;
        let id = serialization_id();
        self.record(".data/serialization_id", id.as_bytes())?;
        let path = self.path.clone();
        let io = |source| Error::Io { path: path.clone(), source };
        let (buf, size) = self.zip.finish().map_err(io)?;
        let file = buf.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok(size)
    }
}
