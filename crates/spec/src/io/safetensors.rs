//! Writing safetensors files tensor by tensor: the one writer behind the converter's streamed
//! shards and the engine's checkpoint files.
//!
//! A safetensors file is `u64 header length | JSON header | tensor bytes`. Every shape and dtype
//! is known before the first byte is copied, so [`SafetensorsWriter::create`] writes the whole
//! header first and the caller then appends each tensor's bytes in header order, in pieces of
//! any size. The writer counts bytes and refuses a tensor that comes out short or long, so a bug
//! in the shard math cannot produce a file whose offsets lie. Files reach the disk when their
//! folder is committed (`commit::move_into_place` fsyncs the staged tree).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use super::FileError;
use crate::checkpoint::DType;

/// Write buffer per output file.
const WRITE_BUFFER: usize = 4 << 20;
/// Elements converted per step (bounded scratch memory).
const CONVERT_CHUNK: usize = 1 << 18;

/// The safetensors dtype of a trainable dtype.
pub fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        DType::F32 => Dtype::F32,
    }
}

/// The trainable dtype of a safetensors dtype, if it is one.
pub fn trainable(d: Dtype) -> Option<DType> {
    match d {
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F16 => Some(DType::F16),
        Dtype::F32 => Some(DType::F32),
        _ => None,
    }
}

/// One tensor of a file to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorHeader {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorHeader {
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// The header bytes (length prefix included), padded with spaces to 8 bytes as the reference
/// implementation does so tensor data stays aligned.
pub fn header_bytes(tensors: &[TensorHeader], metadata: &[(&str, &str)]) -> Result<Vec<u8>, String> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta: serde_json::Map<String, serde_json::Value> =
            metadata.iter().map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string()))).collect();
        map.insert("__metadata__".into(), serde_json::Value::Object(meta));
    }
    let mut offset = 0usize;
    for t in tensors {
        if map.contains_key(&t.name) {
            return Err(format!("tensor name {:?} appears twice", t.name));
        }
        let end = offset + t.nbytes();
        map.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(map)).map_err(|e| e.to_string())?;
    while (json.len() + 8) % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Writes one safetensors file tensor by tensor (see the module notes).
pub struct SafetensorsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    tensors: Vec<TensorHeader>,
    /// Index of the tensor being written.
    current: usize,
    /// Bytes of the current tensor written so far.
    written: usize,
    scratch: Vec<u8>,
}

impl SafetensorsWriter {
    pub fn create(path: &Path, tensors: Vec<TensorHeader>, metadata: &[(&str, &str)]) -> Result<Self, FileError> {
        let header = header_bytes(&tensors, metadata)
            .map_err(|message| FileError::Invalid { path: path.to_path_buf(), message })?;
        let file = File::create(path).map_err(|e| FileError::io("create", path, e))?;
        let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
        out.write_all(&header).map_err(|e| FileError::io("write", path, e))?;
        Ok(SafetensorsWriter { path: path.to_path_buf(), out, tensors, current: 0, written: 0, scratch: Vec::new() })
    }

    /// The tensor the next bytes belong to.
    pub fn current(&self) -> Option<&TensorHeader> {
        self.tensors.get(self.current)
    }

    fn expect_room(&self, n: usize) -> Result<(), FileError> {
        let Some(t) = self.tensors.get(self.current) else {
            return Err(self.internal("bytes written after the last tensor".into()));
        };
        if self.written + n > t.nbytes() {
            return Err(self.internal(format!(
                "tensor {:?} would get {} bytes, its header says {}",
                t.name,
                self.written + n,
                t.nbytes()
            )));
        }
        Ok(())
    }

    fn internal(&self, what: String) -> FileError {
        FileError::Invalid { path: self.path.clone(), message: format!("internal error while writing: {what}") }
    }

    /// Appends raw bytes of the current tensor.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), FileError> {
        self.expect_room(bytes.len())?;
        self.out.write_all(bytes).map_err(|e| FileError::io("write", &self.path, e))?;
        self.written += bytes.len();
        Ok(())
    }

    /// Appends `src` (elements of `from`) converted to `to`.
    pub fn write_converted(&mut self, src: &[u8], from: DType, to: DType) -> Result<(), FileError> {
        if from == to {
            return self.write(src);
        }
        let step = CONVERT_CHUNK * from.size_bytes();
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut result = Ok(());
        for chunk in src.chunks(step) {
            scratch.clear();
            convert(chunk, from, to, &mut scratch);
            result = self.write(&scratch);
            if result.is_err() {
                break;
            }
        }
        self.scratch = scratch;
        result
    }

    /// Appends `n` zero bytes (zero is 0.0 in every float dtype).
    pub fn write_zeros(&mut self, n: usize) -> Result<(), FileError> {
        static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
        let mut left = n;
        while left > 0 {
            let k = left.min(ZEROS.len());
            self.write(&ZEROS[..k])?;
            left -= k;
        }
        Ok(())
    }

    /// Closes the current tensor; it must be complete.
    pub fn end_tensor(&mut self) -> Result<(), FileError> {
        let Some(t) = self.tensors.get(self.current) else {
            return Err(self.internal("end_tensor after the last tensor".into()));
        };
        if self.written != t.nbytes() {
            return Err(self.internal(format!(
                "tensor {:?} got {} bytes, its header says {}",
                t.name,
                self.written,
                t.nbytes()
            )));
        }
        self.current += 1;
        self.written = 0;
        Ok(())
    }

    /// Flushes; every tensor must have been written. Returns the file's size. The file reaches
    /// the disk when its folder is committed ([`super::commit::move_into_place`] fsyncs the
    /// whole staged tree once): fsyncing each file here would serialize the writeback of files
    /// written in parallel.
    pub fn finish(mut self) -> Result<u64, FileError> {
        if self.current != self.tensors.len() {
            return Err(self.internal(format!("{} of {} tensors written", self.current, self.tensors.len())));
        }
        self.out.flush().map_err(|e| FileError::io("write", &self.path, e))?;
        let file = self.out.get_ref();
        file.metadata().map(|m| m.len()).map_err(|e| FileError::io("stat", &self.path, e))
    }
}

/// Converts elements of `from` in `src` to `to`, appending to `out`. Rounds to nearest even and
/// keeps NaNs NaN (the `half` crate's conversions, the same as torch's `.to()`).
pub fn convert(src: &[u8], from: DType, to: DType, out: &mut Vec<u8>) {
    if from == to {
        out.extend_from_slice(src);
        return;
    }
    out.reserve(src.len() / from.size_bytes() * to.size_bytes());
    let read = |c: &[u8]| -> f32 {
        match from {
            DType::BF16 => half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32(),
            DType::F16 => half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32(),
            DType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
        }
    };
    for c in src.chunks_exact(from.size_bytes()) {
        let x = read(c);
        match to {
            DType::BF16 => out.extend_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes()),
            DType::F32 => out.extend_from_slice(&x.to_le_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_file_reads_back_with_the_reference_parser() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let tensors = vec![
            TensorHeader { name: "a".into(), dtype: Dtype::F32, shape: vec![2, 3] },
            TensorHeader { name: "b.weight".into(), dtype: Dtype::BF16, shape: vec![5] },
            TensorHeader { name: "empty".into(), dtype: Dtype::F16, shape: vec![0, 4] },
        ];
        let mut w = SafetensorsWriter::create(&path, tensors, &[("format", "pt")]).unwrap();
        let a: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        w.write(&a[..7]).unwrap();
        w.write(&a[7..]).unwrap();
        w.end_tensor().unwrap();
        w.write(&[1, 2]).unwrap();
        w.write_zeros(8).unwrap();
        w.end_tensor().unwrap();
        w.end_tensor().unwrap();
        w.finish().unwrap();

        let bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + n) % 8, 0, "header padded to 8 bytes");
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a").unwrap().data(), &a[..]);
        assert_eq!(st.tensor("b.weight").unwrap().data(), &[1, 2, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(st.tensor("empty").unwrap().shape(), &[0, 4]);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    }

    #[test]
    fn writer_refuses_wrong_byte_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let t = vec![TensorHeader { name: "a".into(), dtype: Dtype::F32, shape: vec![2] }];
        let mut w = SafetensorsWriter::create(&path, t.clone(), &[]).unwrap();
        assert!(w.write(&[0; 9]).is_err());
        w.write(&[0; 4]).unwrap();
        assert!(w.end_tensor().is_err(), "short tensor");
        let w = SafetensorsWriter::create(&path, t, &[]).unwrap();
        assert!(w.finish().is_err(), "missing tensor");
        let dup = vec![
            TensorHeader { name: "a".into(), dtype: Dtype::F32, shape: vec![2] },
            TensorHeader { name: "a".into(), dtype: Dtype::F32, shape: vec![2] },
        ];
        assert!(SafetensorsWriter::create(&path, dup, &[]).is_err());
    }

    #[test]
    fn conversions_round_to_nearest_even() {
        let f32s = |xs: &[f32]| xs.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let mut out = Vec::new();
        // 1 + 2^-8 is halfway between two bf16 values: ties to even (1.0); 1 + 3·2^-8 rounds up.
        convert(&f32s(&[1.0, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, f32::NAN, -2.5]), DType::F32, DType::BF16, &mut out);
        let bits: Vec<u16> = out.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(bits[0], 0x3F80);
        assert_eq!(bits[1], 0x3F80);
        assert_eq!(bits[2], 0x3F82);
        assert!(half::bf16::from_bits(bits[3]).is_nan());
        assert_eq!(bits[4], 0xC020);
        // bf16 → f32 → bf16 is exact.
        let mut back = Vec::new();
        convert(&out, DType::BF16, DType::F32, &mut back);
        let mut again = Vec::new();
        convert(&back, DType::F32, DType::BF16, &mut again);
        assert_eq!(again, out);
        // f16: 65520 overflows to inf, 2^-24 is the smallest subnormal.
        let mut h = Vec::new();
        convert(&f32s(&[65504.0, 65520.0, 2f32.powi(-24)]), DType::F32, DType::F16, &mut h);
        let hb: Vec<u16> = h.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(hb, vec![0x7BFF, 0x7C00, 0x0001]);
    }
}
