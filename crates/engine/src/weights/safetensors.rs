//! A small safetensors reader and writer on plain file I/O.
//!
//! Reading parses only the JSON header and then reads each tensor's byte range on demand, so a
//! 10 GB shard is never held in memory whole. Writing goes through mm-spec's one writer
//! (`mm_spec::io::SafetensorsWriter`), the converter's too.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use mm_spec::io::{SafetensorsWriter, TensorHeader};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    /// Not a `#[source]`: the message holds it already, so `{:#}` does not print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: not a safetensors file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: tensor {key:?}: {reason}")]
    Tensor { path: PathBuf, key: String, reason: String },
    #[error(transparent)]
    Write(#[from] mm_spec::io::FileError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SafetensorsError + '_ {
    move |error| SafetensorsError::Io { path: path.to_path_buf(), error }
}

/// One header entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub dtype: String,
    pub shape: Vec<i64>,
    pub data_offsets: [u64; 2],
}

/// An opened safetensors file: header parsed, data read lazily.
#[derive(Debug, Clone)]
pub struct SafetensorsFile {
    pub path: PathBuf,
    pub entries: BTreeMap<String, Entry>,
    pub metadata: BTreeMap<String, String>,
    data_start: u64,
}

pub fn kind_of(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "F64" => Kind::Double,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "I16" => Kind::Int16,
        "I8" => Kind::Int8,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        _ => return None,
    })
}

pub fn dtype_of(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Float => "F32",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Double => "F64",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        Kind::Int16 => "I16",
        Kind::Int8 => "I8",
        Kind::Uint8 => "U8",
        Kind::Bool => "BOOL",
        _ => return None,
    })
}

/// Header sizes above this are not safetensors files but something else.
const MAX_HEADER: u64 = 100 << 20;

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile, SafetensorsError> {
        let format = |reason: String| SafetensorsError::Format { path: path.to_path_buf(), reason };
        let mut f = File::open(path).map_err(io_err(path))?;
        let file_len = f.metadata().map_err(io_err(path))?.len();
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(|_| format(format!("only {file_len} bytes long")))?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER || 8 + n > file_len {
            return Err(format(format!("header length {n} does not fit the file ({file_len} bytes)")));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).map_err(io_err(path))?;
        let value: serde_json::Value =
            serde_json::from_slice(&header).map_err(|e| format(format!("header is not JSON: {e}")))?;
        let serde_json::Value::Object(map) = value else {
            return Err(format("header is not a JSON object".into()));
        };
        let mut entries = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        let data_len = file_len - 8 - n;
        for (key, v) in map {
            if key == "__metadata__" {
                metadata = serde_json::from_value(v).map_err(|e| format(format!("__metadata__: {e}")))?;
                continue;
            }
            let entry: Entry = serde_json::from_value(v).map_err(|e| format(format!("entry {key:?}: {e}")))?;
            let [s, e] = entry.data_offsets;
            if s > e || e > data_len {
                return Err(format(format!(
                    "entry {key:?}: data_offsets [{s}, {e}] outside the {data_len} data bytes"
                )));
            }
            entries.insert(key, entry);
        }
        Ok(SafetensorsFile { path: path.to_path_buf(), entries, metadata, data_start: 8 + n })
    }

    /// Reads one tensor onto `device`.
    pub fn read(&self, key: &str, device: Device) -> Result<Tensor, SafetensorsError> {
        let bad = |reason: String| SafetensorsError::Tensor { path: self.path.clone(), key: key.to_string(), reason };
        let entry = self.entries.get(key).ok_or_else(|| bad("not in this file".into()))?;
        let kind = kind_of(&entry.dtype).ok_or_else(|| bad(format!("unsupported dtype {}", entry.dtype)))?;
        let [s, e] = entry.data_offsets;
        let numel: i64 = entry.shape.iter().product();
        if entry.shape.iter().any(|&d| d < 0) || numel as u64 * kind.elt_size_in_bytes() as u64 != e - s {
            return Err(bad(format!(
                "shape {:?} of {} does not match its {} data bytes",
                entry.shape,
                entry.dtype,
                e - s
            )));
        }
        let mut f = File::open(&self.path).map_err(io_err(&self.path))?;
        f.seek(SeekFrom::Start(self.data_start + s)).map_err(io_err(&self.path))?;
        let mut bytes = vec![0u8; (e - s) as usize];
        f.read_exact(&mut bytes).map_err(io_err(&self.path))?;
        let t = Tensor::f_from_data_size(&bytes, &entry.shape, kind).map_err(|e| bad(e.to_string()))?;
        Ok(if device == Device::Cpu { t } else { t.to_device(device) })
    }
}

impl SafetensorsFile {
    /// Elements `start..start + len` of a tensor, flattened, reading only those bytes (a
    /// rank's part of a sharded optimizer state).
    pub fn read_range(&self, key: &str, start: usize, len: usize) -> Result<Tensor, SafetensorsError> {
        let bad = |reason: String| SafetensorsError::Tensor { path: self.path.clone(), key: key.to_string(), reason };
        let entry = self.entries.get(key).ok_or_else(|| bad("not in this file".into()))?;
        let kind = kind_of(&entry.dtype).ok_or_else(|| bad(format!("unsupported dtype {}", entry.dtype)))?;
        let elt = kind.elt_size_in_bytes() as u64;
        let [s, e] = entry.data_offsets;
        let numel = (e - s) / elt;
        if (start + len) as u64 > numel {
            return Err(bad(format!("elements {start}..{} requested, it has {numel}", start + len)));
        }
        let mut f = File::open(&self.path).map_err(io_err(&self.path))?;
        f.seek(SeekFrom::Start(self.data_start + s + start as u64 * elt)).map_err(io_err(&self.path))?;
        let mut bytes = vec![0u8; len * elt as usize];
        f.read_exact(&mut bytes).map_err(io_err(&self.path))?;
        Tensor::f_from_data_size(&bytes, &[len as i64], kind).map_err(|e| bad(e.to_string()))
    }
}

/// The raw little-endian bytes of a tensor (copied to the CPU, made contiguous).
pub fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>, tch::TchError> {
    let t = t.to_device(Device::Cpu).contiguous();
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut out = vec![0u8; n];
    t.f_copy_data_u8(&mut out, t.numel())?;
    Ok(out)
}

/// Writes `tensors` (name, tensor) to `path` through mm-spec's one safetensors writer (which
/// fsyncs); returns the file's size.
pub fn write(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<u64, SafetensorsError> {
    let bad =
        |name: &str, reason: String| SafetensorsError::Tensor { path: path.to_path_buf(), key: name.into(), reason };
    let mut headers = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype = dtype_of(t.kind())
            .and_then(|d| serde_json::from_value::<safetensors::Dtype>(d.into()).ok())
            .ok_or_else(|| bad(name, format!("cannot store dtype {:?}", t.kind())))?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        headers.push(TensorHeader { name: name.clone(), dtype, shape });
    }
    let meta: Vec<(&str, &str)> = metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut w = SafetensorsWriter::create(path, headers, &meta)?;
    for (name, t) in tensors {
        let bytes = tensor_bytes(t).map_err(|e| bad(name, e.to_string()))?;
        w.write(&bytes)?;
        w.end_tensor()?;
    }
    Ok(w.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_python_compatible_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Tensor::arange(6, (Kind::Float, Device::Cpu)).reshape([2, 3]);
        let b = Tensor::from_slice(&[1i64, -2]);
        let c = Tensor::ones([3], (Kind::BFloat16, Device::Cpu));
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write(
            &path,
            &[("a".into(), a.shallow_clone()), ("b".into(), b.shallow_clone()), ("c".into(), c.shallow_clone())],
            &meta,
        )
        .unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        assert_eq!(f.metadata, meta);
        assert!(f.read("a", Device::Cpu).unwrap().equal(&a));
        assert!(f.read("b", Device::Cpu).unwrap().equal(&b));
        assert!(f.read("c", Device::Cpu).unwrap().equal(&c));
        let mid = f.read_range("a", 2, 3).unwrap();
        assert_eq!(Vec::<f32>::try_from(&mid).unwrap(), [2.0, 3.0, 4.0]);
        assert_eq!(f.read_range("b", 1, 1).unwrap().int64_value(&[0]), -2);
        let err = f.read_range("a", 4, 3).unwrap_err().to_string();
        assert!(err.contains("elements 4..7 requested, it has 6"), "{err}");
        assert_eq!(f.data_start % 8, 0);
        let err = f.read("zz", Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("t.safetensors") && err.contains("\"zz\""), "{err}");
        // The workspace's safetensors crate (what Python's writer is compatible with) agrees.
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a").unwrap().shape(), [2, 3]);
    }

    #[test]
    fn garbage_is_a_format_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk").unwrap();
        let err = SafetensorsFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("bad.safetensors") && err.contains("header length"), "{err}");
        std::fs::write(&path, b"\x03\0\0\0\0\0\0\0[1]").unwrap();
        let err = SafetensorsFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("not a JSON object"), "{err}");
    }
}
