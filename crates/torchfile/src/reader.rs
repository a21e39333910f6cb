//! The reader API: maps a torch.save file, parses its zip directory, unpickles `data.pkl` and
//! hands out storage bytes zero-copy (or gathered for non-contiguous views).

use crate::error::Error;
use crate::pickle_read::unpickle;
use crate::value::{DType, TensorRef, Value};
use crate::zip::{parse_archive, Archive};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

enum Backing {
    Map(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Map(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// An opened torch.save file. The file is memory-mapped: it must not be modified while open.
pub struct TorchFile {
    path: PathBuf,
    data: Backing,
    archive: Archive,
}

impl TorchFile {
    pub fn open(path: &Path) -> Result<TorchFile, Error> {
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let data = if len == 0 {
            Backing::Owned(Vec::new())
        } else {
            // SAFETY: read-only map; the caller must not truncate or rewrite the file meanwhile.
            Backing::Map(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?)
        };
        Self::from_backing(path.to_path_buf(), data)
    }

    /// Parses an in-memory file (`name` is used in error messages).
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<TorchFile, Error> {
        Self::from_backing(PathBuf::from(name), Backing::Owned(bytes))
    }

    fn from_backing(path: PathBuf, data: Backing) -> Result<TorchFile, Error> {
        let archive = parse_archive(data.bytes()).map_err(|msg| Error::Zip { path: path.clone(), msg })?;
        Ok(TorchFile { path, data, archive })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The archive's top-level folder (torch uses the saved file's stem).
    pub fn prefix(&self) -> &str {
        &self.archive.prefix
    }

    /// Record names relative to the prefix, in directory order.
    pub fn record_names(&self) -> &[String] {
        &self.archive.names
    }

    fn format<T>(&self, msg: impl Into<String>) -> Result<T, Error> {
        Err(Error::Format { path: self.path.clone(), msg: msg.into() })
    }

    /// The bytes of record `name` (relative to the prefix), e.g. `data.pkl` or `data/0`.
    pub fn record(&self, name: &str) -> Result<&[u8], Error> {
        match self.archive.records.get(name) {
            Some(r) => Ok(&self.data.bytes()[r.offset..r.offset + r.size]),
            None => self.format(format!("no record {}/{name}", self.archive.prefix)),
        }
    }

    /// Checks every record's CRC32 against the directory (reads the whole file).
    pub fn verify_crc(&self) -> Result<(), Error> {
        for name in &self.archive.names {
            let r = &self.archive.records[name];
            let got = crc32fast::hash(&self.data.bytes()[r.offset..r.offset + r.size]);
            if got != r.crc {
                return self
                    .format(format!("record {name}: CRC32 {got:08x} but the directory says {:08x} (corrupt)", r.crc));
            }
        }
        Ok(())
    }

    /// Unpickles `data.pkl` and checks that every tensor's storage has a record of the right size.
    pub fn root(&self) -> Result<Value, Error> {
        if let Ok(order) = self.record("byteorder") {
            if order != b"little" {
                return self.format(format!(
                    "byteorder record is {:?}; only little-endian checkpoints are supported",
                    String::from_utf8_lossy(order)
                ));
            }
        }
        let pkl = self.record("data.pkl")?;
        let root = unpickle(pkl).map_err(|e| e.with_path(&self.path))?;
        let mut seen: HashMap<&str, DType> = HashMap::new();
        let mut problem = None;
        root.visit_tensors(&mut |t| {
            if problem.is_some() {
                return;
            }
            if let Some(d) = seen.get(t.storage.as_str()) {
                if *d != t.dtype {
                    problem = Some(format!("storage {:?} is viewed as both {d:?} and {:?}", t.storage, t.dtype));
                }
                return;
            }
            seen.insert(&t.storage, t.dtype);
            if let Err(e) = self.check_storage(t) {
                problem = Some(e);
            }
        });
        match problem {
            Some(p) => self.format(p),
            None => Ok(root),
        }
    }

    fn check_storage(&self, t: &TensorRef) -> Result<&[u8], String> {
        let Some(r) = self.archive.records.get(&format!("data/{}", t.storage)) else {
            return Err(format!(
                "a tensor refers to storage {:?} but the archive has no record {}/data/{}",
                t.storage, self.archive.prefix, t.storage
            ));
        };
        let want = t.storage_numel.checked_mul(t.dtype.size_bytes());
        if want != Some(r.size) {
            return Err(format!(
                "storage {:?}: {} elements of {:?} need {} bytes but its record has {}",
                t.storage,
                t.storage_numel,
                t.dtype,
                want.map_or("too many".to_string(), |w| w.to_string()),
                r.size
            ));
        }
        if t.storage_extent().is_none_or(|e| e > t.storage_numel) {
            return Err(format!(
                "tensor of size {:?} stride {:?} offset {} does not fit storage {:?}",
                t.shape, t.stride, t.storage_offset, t.storage
            ));
        }
        Ok(&self.data.bytes()[r.offset..r.offset + r.size])
    }

    /// Drops this process's resident pages of `len` bytes at `start` of the map (a no-op for
    /// in-memory files). Bytes read later fault back in from the page cache unchanged, so
    /// readers of large files keep their memory near what they hold, not what they touched.
    fn release(&self, start: usize, len: usize) {
        if let Backing::Map(map) = &self.data {
            let len = len.min(map.len().saturating_sub(start));
            if len > 0 {
                // SAFETY: a read-only MAP_SHARED file mapping: MADV_DONTNEED only unmaps the pages
                // from this process; later reads see the same file bytes.
                #[cfg(unix)]
                unsafe {
                    let _ = map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len);
                }
            }
        }
    }

    /// Drops the resident pages of the whole file (e.g. after [`TorchFile::verify_crc`]).
    pub fn release_all(&self) {
        self.release(0, self.data.bytes().len());
    }

    /// Drops the resident pages of storage `key` once its bytes have been used.
    pub fn release_storage(&self, key: &str) {
        let name = format!("data/{key}");
        if let Ok(bytes) = self.record(&name) {
            let start = bytes.as_ptr() as usize - self.data.bytes().as_ptr() as usize;
            self.release(start, bytes.len());
        }
    }

    /// The raw little-endian bytes of storage `key` (record `data/<key>`).
    pub fn storage(&self, key: &str) -> Result<&[u8], Error> {
        self.record(&format!("data/{key}"))
    }

    /// The tensor's elements in row-major order: borrowed from the map when the view is
    /// contiguous, gathered into a new buffer otherwise.
    pub fn tensor_bytes(&self, t: &TensorRef) -> Result<Cow<'_, [u8]>, Error> {
        let storage = match self.check_storage(t) {
            Ok(s) => s,
            Err(msg) => return self.format(msg),
        };
        let es = t.dtype.size_bytes();
        let numel = t.numel();
        if numel == 0 {
            return Ok(Cow::Borrowed(&[]));
        }
        if t.is_contiguous() {
            let start = t.storage_offset * es;
            return Ok(Cow::Borrowed(&storage[start..start + numel * es]));
        }
        let total = match numel.checked_mul(es) {
            Some(n) if n <= storage.len().saturating_mul(256).saturating_add(1 << 30) => n,
            _ => {
                return self.format(format!(
                    "non-contiguous tensor of size {:?} would expand storage {:?} beyond reason",
                    t.shape, t.storage
                ))
            }
        };
        let mut out = Vec::new();
        if out.try_reserve_exact(total).is_err() {
            return self.format(format!("cannot allocate {total} bytes to gather a tensor"));
        }
        let rank = t.shape.len();
        let inner = t.shape[rank - 1];
        let inner_stride = t.stride[rank - 1];
        let mut idx = vec![0usize; rank - 1];
        loop {
            let base: usize = t.storage_offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
            if inner_stride == 1 {
                out.extend_from_slice(&storage[base * es..(base + inner) * es]);
            } else {
                for j in 0..inner {
                    let e = base + j * inner_stride;
                    out.extend_from_slice(&storage[e * es..(e + 1) * es]);
                }
            }
            // Odometer over the outer dimensions.
            let mut d = rank - 1;
            loop {
                if d == 0 {
                    return Ok(Cow::Owned(out));
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < t.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }
}
