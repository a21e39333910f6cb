//! Streamed output: a safetensors writer that never holds a tensor, per-tensor dtype conversion,
//! the atomic output folder, and the bounded parallel runner.
//!
//! A safetensors file is `u64 header length | JSON header | tensor bytes`. Every shape and dtype
//! is known before the first byte is copied, so [`SafetensorsWriter::create`] writes the whole
//! header first and the caller then appends each tensor's bytes in header order, in pieces of
//! any size. The writer counts bytes and refuses a tensor that comes out short or long, so a bug
//! in the shard math cannot produce a file whose offsets lie.
//!
//! Pitfall: input pages touched through a memory map count as resident memory until they are
//! dropped; [`release`] drops them after each tensor, which keeps the peak RSS near the write
//! buffers instead of the size of the checkpoint.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use memmap2::Mmap;
use mm_spec::DType;
use safetensors::Dtype;

use crate::error::ConvertError;

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
    pub fn create(path: &Path, tensors: Vec<TensorHeader>, metadata: &[(&str, &str)]) -> Result<Self, ConvertError> {
        let header = header_bytes(&tensors, metadata)
            .map_err(|message| ConvertError::Config { path: path.to_path_buf(), message })?;
        let file = File::create(path).map_err(|e| ConvertError::io("create", path, e))?;
        let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
        out.write_all(&header).map_err(|e| ConvertError::io("write", path, e))?;
        Ok(SafetensorsWriter { path: path.to_path_buf(), out, tensors, current: 0, written: 0, scratch: Vec::new() })
    }

    /// The tensor the next bytes belong to.
    pub fn current(&self) -> Option<&TensorHeader> {
        self.tensors.get(self.current)
    }

    fn expect_room(&self, n: usize) -> Result<(), ConvertError> {
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

    fn internal(&self, what: String) -> ConvertError {
        ConvertError::Config { path: self.path.clone(), message: format!("internal error while writing: {what}") }
    }

    /// Appends raw bytes of the current tensor.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), ConvertError> {
        self.expect_room(bytes.len())?;
        self.out.write_all(bytes).map_err(|e| ConvertError::io("write", &self.path, e))?;
        self.written += bytes.len();
        Ok(())
    }

    /// Appends `src` (elements of `from`) converted to `to`.
    pub fn write_converted(&mut self, src: &[u8], from: DType, to: DType) -> Result<(), ConvertError> {
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
    pub fn write_zeros(&mut self, n: usize) -> Result<(), ConvertError> {
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
    pub fn end_tensor(&mut self) -> Result<(), ConvertError> {
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

    /// Flushes; every tensor must have been written.
    pub fn finish(mut self) -> Result<(), ConvertError> {
        if self.current != self.tensors.len() {
            return Err(self.internal(format!("{} of {} tensors written", self.current, self.tensors.len())));
        }
        self.out.flush().map_err(|e| ConvertError::io("write", &self.path, e))?;
        Ok(())
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

/// Drops the resident pages of `range` of a read-only map (see the module notes).
pub fn release(map: &Mmap, start: usize, len: usize) {
    if len == 0 || start >= map.len() {
        return;
    }
    let len = len.min(map.len() - start);
    // SAFETY: the map is a read-only MAP_SHARED file mapping (memmap2's `Mmap::map`). For such a
    // mapping MADV_DONTNEED only unmaps the pages from this process; the next access faults them
    // back in from the page cache with the same file bytes, so slices borrowed from the map (in
    // this thread or another) keep their contents. It is not applied to anonymous or private maps.
    #[cfg(unix)]
    unsafe {
        let _ = map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len);
    }
}

/// Bytes a reader consumes between two [`Releaser`] drops.
pub const RELEASE_STEP: usize = 64 << 20;

/// Walks one tensor's bytes in a map alongside a reader: asks the kernel to read ahead of it
/// (MADV_WILLNEED, asynchronous, so disk reads overlap the copying) and drops the pages behind
/// it, every [`RELEASE_STEP`] bytes, so a multi-GB tensor never becomes resident as a whole.
pub struct Releaser<'a> {
    map: &'a Mmap,
    end: usize,
    /// Absolute offset up to which pages were dropped.
    done: usize,
}

impl<'a> Releaser<'a> {
    /// For the bytes `start..end` of `map`.
    pub fn new(map: &'a Mmap, start: usize, end: usize) -> Self {
        let r = Releaser { map, end, done: start };
        r.prefetch(start);
        r
    }

    fn prefetch(&self, from: usize) {
        let to = from.saturating_add(2 * RELEASE_STEP).min(self.end);
        if to > from {
            #[cfg(unix)]
            let _ = self.map.advise_range(memmap2::Advice::WillNeed, from, to - from);
        }
    }

    /// The reader has consumed everything before absolute offset `upto`.
    pub fn advance(&mut self, upto: usize) {
        if upto >= self.done + RELEASE_STEP {
            release(self.map, self.done, upto - self.done);
            self.done = upto;
            self.prefetch(upto);
        }
    }

    /// The reader is done with the tensor.
    pub fn finish(self) {
        if self.end > self.done {
            release(self.map, self.done, self.end - self.done);
        }
    }
}

/// Maps a whole file read-only.
pub fn map_file(path: &Path) -> Result<Mmap, ConvertError> {
    let file = File::open(path).map_err(|e| ConvertError::io("open", path, e))?;
    // SAFETY: the checkpoint files are inputs that nobody writes while a conversion runs (the
    // same assumption every safetensors loader makes); a concurrent writer could change the
    // bytes under us, never the mapping's length or validity.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| ConvertError::io("map", path, e))?;
    #[cfg(unix)]
    let _ = map.advise(memmap2::Advice::Sequential);
    Ok(map)
}

// ---------------------------------------------------------------------------------------------
// Atomic output folder
// ---------------------------------------------------------------------------------------------

/// An output folder built under `<final>.tmp-<pid>` and renamed into place when complete.
///
/// Dropped without [`OutputDir::commit`], it removes the temporary folder, so a failed run
/// leaves nothing; a killed run leaves only a `.tmp-<pid>` folder, which never looks like a
/// checkpoint.
pub struct OutputDir {
    final_path: PathBuf,
    tmp_path: PathBuf,
    force: bool,
    created: bool,
    committed: bool,
}

impl OutputDir {
    /// Refuses an existing output unless `force`. Touches nothing.
    pub fn prepare(final_path: &Path, force: bool) -> Result<Self, ConvertError> {
        if final_path.exists() && !force {
            return Err(ConvertError::OutputExists { path: final_path.to_path_buf() });
        }
        let name = final_path
            .file_name()
            .ok_or_else(|| ConvertError::Usage(format!("output folder {:?} has no name", final_path.display())))?;
        let mut tmp_name = name.to_os_string();
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp_path = final_path.with_file_name(tmp_name);
        Ok(OutputDir { final_path: final_path.to_path_buf(), tmp_path, force, created: false, committed: false })
    }

    /// Creates the temporary folder (and the output's parent) and returns its path.
    pub fn create(&mut self) -> Result<&Path, ConvertError> {
        if let Some(parent) = self.tmp_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| ConvertError::io("create", parent, e))?;
        }
        if self.tmp_path.exists() {
            fs::remove_dir_all(&self.tmp_path).map_err(|e| ConvertError::io("remove stale", &self.tmp_path, e))?;
        }
        fs::create_dir(&self.tmp_path).map_err(|e| ConvertError::io("create", &self.tmp_path, e))?;
        self.created = true;
        Ok(&self.tmp_path)
    }

    pub fn tmp(&self) -> &Path {
        &self.tmp_path
    }

    /// Moves the finished folder into place, replacing an old one only when forced.
    pub fn commit(mut self) -> Result<PathBuf, ConvertError> {
        if self.final_path.exists() {
            if !self.force {
                return Err(ConvertError::OutputExists { path: self.final_path.clone() });
            }
            let mut old_name = self.final_path.file_name().unwrap_or_default().to_os_string();
            old_name.push(format!(".old-{}", std::process::id()));
            let old = self.final_path.with_file_name(old_name);
            fs::rename(&self.final_path, &old).map_err(|e| ConvertError::io("move aside", &self.final_path, e))?;
            fs::rename(&self.tmp_path, &self.final_path)
                .map_err(|e| ConvertError::io("rename into place", &self.tmp_path, e))?;
            let removed = if old.is_dir() { fs::remove_dir_all(&old) } else { fs::remove_file(&old) };
            if let Err(e) = removed {
                tracing::warn!("the replaced output {} could not be removed: {e}", old.display());
            }
        } else {
            fs::rename(&self.tmp_path, &self.final_path)
                .map_err(|e| ConvertError::io("rename into place", &self.tmp_path, e))?;
        }
        self.committed = true;
        Ok(self.final_path.clone())
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if self.created && !self.committed {
            let _ = fs::remove_dir_all(&self.tmp_path);
        }
    }
}

/// Copies the named small files (config, tokenizer) that exist in `from` into `to`; returns the
/// names copied.
pub fn copy_files(from: &Path, to: &Path, names: &[String]) -> Result<Vec<String>, ConvertError> {
    let mut copied = Vec::new();
    for name in names {
        let src = from.join(name);
        if src.is_file() {
            fs::create_dir_all(to).map_err(|e| ConvertError::io("create", to, e))?;
            fs::copy(&src, to.join(name)).map_err(|e| ConvertError::io("copy", &src, e))?;
            copied.push(name.clone());
        }
    }
    Ok(copied)
}

/// Writes a small text file.
pub fn write_text(path: &Path, text: &str) -> Result<(), ConvertError> {
    fs::write(path, text).map_err(|e| ConvertError::io("write", path, e))
}

// ---------------------------------------------------------------------------------------------
// Bounded parallel runner
// ---------------------------------------------------------------------------------------------

/// Threads to use: `requested`, else the available cores, never more than `jobs`.
pub fn thread_count(requested: Option<usize>, jobs: usize) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    requested.unwrap_or(cores).clamp(1, jobs.max(1))
}

/// Runs `work(job, cancel)` for every job on `threads` scoped threads, largest jobs first when
/// `weight` says so. Stops handing out jobs after the first error and returns it; `cancel` turns
/// true for the others so they can stop between tensors.
pub fn run_parallel<J: Sync>(
    jobs: &[J],
    threads: usize,
    weight: impl Fn(&J) -> u64,
    work: impl Fn(&J, &AtomicBool) -> Result<(), ConvertError> + Sync,
) -> Result<(), ConvertError> {
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(weight(&jobs[i])));
    let next = AtomicUsize::new(0);
    let cancel = AtomicBool::new(false);
    let errors: Mutex<BTreeMap<usize, ConvertError>> = Mutex::new(BTreeMap::new());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                if cancel.load(Ordering::Relaxed) {
                    break;
                }
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = order.get(k) else { break };
                if let Err(e) = work(&jobs[i], &cancel) {
                    cancel.store(true, Ordering::Relaxed);
                    if let Ok(mut errs) = errors.lock() {
                        errs.insert(k, e);
                    }
                    break;
                }
            });
        }
    });
    let errs = errors.into_inner().unwrap_or_default();
    // The first failure in hand-out order; a Cancelled error is only a consequence.
    let mut errs: Vec<ConvertError> = errs.into_values().collect();
    if let Some(pos) = errs.iter().position(|e| !matches!(e, ConvertError::Cancelled(_))) {
        return Err(errs.swap_remove(pos));
    }
    match errs.pop() {
        Some(e) => Err(e),
        None => Ok(()),
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

    #[test]
    fn output_dir_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        {
            let mut o = OutputDir::prepare(&target, false).unwrap();
            let tmp = o.create().unwrap().to_path_buf();
            std::fs::write(tmp.join("f"), "x").unwrap();
            assert!(!target.exists());
            // dropped without commit: nothing stays
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut o = OutputDir::prepare(&target, false).unwrap();
        o.create().unwrap();
        o.commit().unwrap();
        assert!(target.is_dir());
        assert!(matches!(OutputDir::prepare(&target, false), Err(ConvertError::OutputExists { .. })));
        let mut o = OutputDir::prepare(&target, true).unwrap();
        std::fs::write(o.create().unwrap().join("new"), "y").unwrap();
        o.commit().unwrap();
        assert!(target.join("new").is_file());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no .old or .tmp left");
    }

    #[test]
    fn parallel_runner_reports_the_failure() {
        let jobs: Vec<u64> = (0..10).collect();
        let done = AtomicUsize::new(0);
        run_parallel(
            &jobs,
            3,
            |j| *j,
            |_, _| {
                done.fetch_add(1, Ordering::Relaxed);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(done.load(Ordering::Relaxed), 10);
        let err = run_parallel(
            &jobs,
            2,
            |j| *j,
            |j, _| if *j == 4 { Err(ConvertError::Usage("four".into())) } else { Ok(()) },
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "four");
        assert_eq!(thread_count(Some(8), 3), 3);
        assert_eq!(thread_count(Some(0), 3), 1);
    }
}
