//! MindSpeed-MM's torch files on disk, for every tool that reads or writes them (mm-convert's
//! export and `inspect`, mm-engine's `--load` and `--ckpt-format torch` saves).
//!
//! Reading ([`MindSpeedCheckpoint`]): every `mp_rank_*/model_optim_rng.pt` of an iteration
//! folder is mapped and its pickle read by torchfile's restricted VM (no code from the file
//! runs; args, optimizer and RNG entries of a training save stay opaque values); the split is
//! read off the files (tp and pp from the rank folders, vpp from `model{v}`, the layer lists
//! from the layer numbers in each chunk); [`MindSpeedCheckpoint::check`] compares every file
//! with a [`plan_mindspeed`](super::plan_mindspeed) plan (names, shapes, dtypes) and
//! [`MindSpeedCheckpoint::assemble`] puts one logical tensor back together from its pieces.
//!
//! Writing ([`write_file`]): one rank file from its [`MsFile`] plan, object tree first, then each
//! tensor's bytes piece by piece from whatever source the caller streams them from.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use torchfile::{TensorRef, TorchFile, Value, Writer};

use super::dtype::DType;
use super::error::CheckpointError;
use super::mindspeed::{plan_mindspeed, MsFile, MsPlan, MsTensor, CHECKPOINT_VERSION, MINDSPEED_FILE};
use super::plan::{LayoutRequest, MmLayout};
use super::split::Piece;
use crate::presets::ModelPreset;

/// Why a MindSpeed-MM folder cannot be read or written; names the file.
#[derive(Debug, thiserror::Error)]
pub enum MindSpeedError {
    #[error("{}: {message}", path.display())]
    Bad { path: PathBuf, message: String },
    /// The torch file itself (zip, pickle, CRC); torchfile names the file.
    #[error(transparent)]
    Torch(#[from] torchfile::Error),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

fn bad(path: &Path, message: impl Into<String>) -> MindSpeedError {
    MindSpeedError::Bad { path: path.to_path_buf(), message: message.into() }
}

/// torchfile's dtype of a trainable dtype.
pub fn torch_dtype(d: DType) -> torchfile::DType {
    match d {
        DType::BF16 => torchfile::DType::BF16,
        DType::F16 => torchfile::DType::F16,
        DType::F32 => torchfile::DType::F32,
    }
}

/// The trainable dtype of a tensor read from a file (`name` for the message).
pub fn dtype_of(path: &Path, name: &str, d: torchfile::DType) -> Result<DType, MindSpeedError> {
    match d {
        torchfile::DType::F32 => Ok(DType::F32),
        torchfile::DType::F16 => Ok(DType::F16),
        torchfile::DType::BF16 => Ok(DType::BF16),
        other => Err(bad(path, format!("tensor {name} is {other:?}: expected a float dtype"))),
    }
}

/// A model chunk's state dict: (name, tensor) in file order.
pub type StateDict = Vec<(String, TensorRef)>;

/// An opened MindSpeed-MM iteration folder: every rank file with its model chunks, and what the
/// files say about the split and the run.
pub struct MindSpeedCheckpoint {
    pub iter_dir: PathBuf,
    files: BTreeMap<(usize, usize), (TorchFile, Vec<StateDict>)>,
    pub tp: usize,
    pub pp: usize,
    /// Model chunks per file (1 without a virtual pipeline).
    pub vpp: usize,
    /// ViT and LLM layers per chunk, in model order (chunk `v·pp + p`).
    pub vit_layers: Vec<usize>,
    pub llm_layers: Vec<usize>,
    /// Top-level entries other than the model chunks (args, iteration, optimizer, rng_state, …).
    pub others: BTreeSet<String>,
    /// The `iteration` a training save records (None for converted checkpoints).
    pub saved_iteration: Option<u64>,
}

impl std::fmt::Debug for MindSpeedCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MindSpeedCheckpoint")
            .field("iter_dir", &self.iter_dir)
            .field("tp", &self.tp)
            .field("pp", &self.pp)
            .field("vpp", &self.vpp)
            .field("files", &self.files.len())
            .field("saved_iteration", &self.saved_iteration)
            .finish()
    }
}

impl MindSpeedCheckpoint {
    /// Opens every rank file of `iter_dir` and reads the split off them.
    pub fn open(iter_dir: &Path) -> Result<MindSpeedCheckpoint, MindSpeedError> {
        let paths = rank_files(iter_dir)?;
        let (tp, pp) = paths.keys().fold((0, 0), |(t, p), k| (t.max(k.0 + 1), p.max(k.1 + 1)));
        let mut files = BTreeMap::new();
        let mut others = BTreeSet::new();
        let mut saved_iteration = None;
        for (&k, path) in &paths {
            let tf = TorchFile::open(path)?;
            let root = tf.root()?;
            let c = chunks(path, &root)?;
            for (key, value) in root.as_dict().unwrap_or_default() {
                let Value::Str(key) = key else { continue };
                if is_model_entry(key) {
                    continue;
                }
                if key == "iteration" {
                    if let Value::Int(n) = value {
                        saved_iteration = u64::try_from(*n).ok();
                    }
                }
                others.insert(key.clone());
            }
            files.insert(k, (tf, c));
        }
        let vpp = same_chunk_count(iter_dir, files.values().map(|f| f.1.len()))?;
        let mut per_chunk = vec![Vec::new(); pp * vpp];
        for p in 0..pp {
            for (v, names) in files[&(0, p)].1.iter().enumerate() {
                per_chunk[v * pp + p] = names.iter().map(|(n, _)| n.clone()).collect();
            }
        }
        let count = |prefix: &str| -> Vec<usize> {
            per_chunk
                .iter()
                .map(|names| {
                    names
                        .iter()
                        .filter_map(|n| n.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok())
                        .collect::<BTreeSet<_>>()
                        .len()
                })
                .collect()
        };
        let vit_layers = count("image_encoder.encoder.encoder.layers.");
        let llm_layers = count("text_decoder.decoder.layers.");
        Ok(MindSpeedCheckpoint {
            iter_dir: iter_dir.to_path_buf(),
            files,
            tp,
            pp,
            vpp,
            vit_layers,
            llm_layers,
            others,
            saved_iteration,
        })
    }

    /// Rank files opened.
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// Tensors in all files (every chunk).
    pub fn tensor_count(&self) -> usize {
        self.files.values().flat_map(|(_, c)| c).map(Vec::len).sum()
    }

    /// The layout the files were written with.
    pub fn layout_request(&self) -> LayoutRequest {
        LayoutRequest {
            tp: self.tp,
            pp: Some(self.pp),
            vpp: (self.vpp > 1).then_some(self.vpp),
            llm_pp_layers: Some(self.llm_layers.clone()),
            vit_pp_layers: Some(self.vit_layers.clone()),
            unaligned_linear: true,
            make_vocab_size_divisible_by: None,
        }
    }

    /// The layout and the plan of `arch` as these files split it; `config` names where `arch`
    /// came from, for the message when the files do not fit it.
    pub fn plan(&self, arch: &ModelPreset, config: &Path) -> Result<(MmLayout, MsPlan), MindSpeedError> {
        let layout = MmLayout::resolve(arch, &self.layout_request())
            .map_err(|e| bad(&self.iter_dir, format!("its files do not fit the model of {}: {e}", config.display())))?;
        let plan = plan_mindspeed(arch, &layout)?;
        Ok((layout, plan))
    }

    /// Checks every file's CRCs (reads every byte once), then drops the pages read.
    pub fn verify_crc(&self) -> Result<(), MindSpeedError> {
        for (tf, _) in self.files.values() {
            tf.verify_crc()?;
            tf.release_all();
        }
        Ok(())
    }

    /// Checks every file against the plan (every name present with the planned shape, nothing
    /// else, one float dtype per logical tensor); returns each logical tensor's dtype.
    pub fn check(&self, plan: &MsPlan) -> Result<Vec<DType>, MindSpeedError> {
        let mut dtypes: Vec<Option<DType>> = vec![None; plan.tensors.len()];
        let mut problems = Vec::new();
        for f in &plan.files {
            let Some((tf, have)) = self.files.get(&(f.tp_rank, f.pp_rank)) else {
                problems.push(format!("no file for tp rank {}, pp rank {}", f.tp_rank, f.pp_rank));
                continue;
            };
            let path = tf.path();
            if have.len() != f.chunks.len() {
                problems.push(format!(
                    "{}: {} model chunks, the layout has {}",
                    path.display(),
                    have.len(),
                    f.chunks.len()
                ));
                continue;
            }
            for ((key, want), got) in f.chunks.iter().zip(have) {
                let got: BTreeMap<&str, &TensorRef> = got.iter().map(|(n, t)| (n.as_str(), t)).collect();
                for t in want {
                    let Some(r) = got.get(t.name.as_str()) else {
                        problems.push(format!("{}: {key}: missing {}", path.display(), t.name));
                        continue;
                    };
                    if r.shape != t.shape {
                        problems.push(format!(
                            "{}: {key}: {} has shape {:?}, the layout needs {:?}",
                            path.display(),
                            t.name,
                            r.shape,
                            t.shape
                        ));
                        continue;
                    }
                    match dtype_of(path, &t.name, r.dtype) {
                        Ok(d) => {
                            for (i, _) in &t.pieces {
                                match dtypes[*i] {
                                    Some(prev) if prev != d => problems.push(format!(
                                        "{}: {key}: {} is {d}, other parts of {} are {prev}",
                                        path.display(),
                                        t.name,
                                        plan.tensors[*i].tensor.key
                                    )),
                                    _ => dtypes[*i] = Some(d),
                                }
                            }
                        }
                        Err(e) => problems.push(e.to_string()),
                    }
                }
                let planned: BTreeSet<&str> = want.iter().map(|t| t.name.as_str()).collect();
                for name in got.keys().filter(|n| !planned.contains(*n)) {
                    problems.push(format!("{}: {key}: unexpected {name}", path.display()));
                }
            }
        }
        if !problems.is_empty() {
            let n = problems.len();
            problems.truncate(20);
            return Err(bad(
                &self.iter_dir,
                format!(
                    "the MindSpeed-MM checkpoint does not match the model and its layout ({n} problem{}):\n  {}",
                    if n == 1 { "" } else { "s" },
                    problems.join("\n  ")
                ),
            ));
        }
        Ok(dtypes.into_iter().map(|d| d.unwrap_or(DType::F32)).collect())
    }

    /// Logical tensor `i` of `plan`, whole (row-major bytes of `dtype`, as [`check`](Self::check)
    /// found it), from the pieces the plan puts in tp rank 0 (replicated) or every rank (split).
    /// The pages read are dropped once used.
    pub fn assemble(&self, plan: &MsPlan, i: usize, dtype: DType) -> Result<Vec<u8>, MindSpeedError> {
        let t = &plan.tensors[i].tensor;
        let es = dtype.size_bytes();
        let row_elems: usize = t.shape.iter().skip(1).product();
        let mut data = vec![0u8; t.shape.iter().product::<usize>() * es];
        let mut seen = 0usize;
        for f in &plan.files {
            let Some((tf, have)) = self.files.get(&(f.tp_rank, f.pp_rank)) else { continue };
            for ((_, want), got) in f.chunks.iter().zip(have) {
                for ms in want {
                    let mut row0 = 0;
                    for (j, piece) in &ms.pieces {
                        let n = piece.rows.len();
                        if *j == i && seen < data.len() {
                            let Some((_, r)) = got.iter().find(|(name, _)| *name == ms.name) else {
                                return Err(bad(tf.path(), format!("missing {}", ms.name)));
                            };
                            let bytes: Cow<[u8]> = tf.tensor_bytes(r)?;
                            let ms_cols = ms.shape.iter().skip(1).product::<usize>();
                            let w = piece.cols.len();
                            for k in 0..n {
                                let src = ((row0 + k) * ms_cols) * es;
                                let dst = ((piece.rows.start + k) * row_elems + piece.cols.start) * es;
                                data[dst..dst + w * es].copy_from_slice(&bytes[src..src + w * es]);
                            }
                            seen += n * w * es;
                            drop(bytes);
                            tf.release_storage(&r.storage);
                        }
                        row0 += n;
                    }
                }
            }
        }
        if seen < data.len() {
            return Err(bad(&self.iter_dir, format!("{} is not fully covered by the files", t.key)));
        }
        Ok(data)
    }
}

fn is_model_entry(key: &str) -> bool {
    key == "model" || key.strip_prefix("model").is_some_and(|n| n.parse::<usize>().is_ok())
}

/// The rank files by (tp rank, pp rank) (`mp_rank_TT` means pp 1); every (tp, pp) pair up to
/// the largest must be there.
fn rank_files(iter_dir: &Path) -> Result<BTreeMap<(usize, usize), PathBuf>, MindSpeedError> {
    let mut files = BTreeMap::new();
    let mut with_pp = None;
    let entries = fs::read_dir(iter_dir).map_err(|e| bad(iter_dir, format!("cannot list the folder: {e}")))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("mp_rank_") else { continue };
        let parts: Vec<&str> = rest.split('_').collect();
        // Ranks beyond any real cluster are a damaged or foreign folder, not a size to allocate.
        let num = |s: &str| {
            s.parse::<usize>()
                .ok()
                .filter(|&n| n < 100_000)
                .ok_or_else(|| bad(&e.path(), "not an mp_rank_TT or mp_rank_TT_PPP folder"))
        };
        let (tp, pp) = match parts.as_slice() {
            [t] => (num(t)?, None),
            [t, p] => (num(t)?, Some(num(p)?)),
            _ => return Err(bad(&e.path(), "not an mp_rank_TT or mp_rank_TT_PPP folder")),
        };
        if with_pp.is_some_and(|w: bool| w != pp.is_some()) {
            return Err(bad(iter_dir, "mixes mp_rank_TT and mp_rank_TT_PPP folders"));
        }
        with_pp = Some(pp.is_some());
        files.insert((tp, pp.unwrap_or(0)), e.path().join(MINDSPEED_FILE));
    }
    let tp = files.keys().map(|k| k.0).max().map_or(0, |m| m + 1);
    let pp = files.keys().map(|k| k.1).max().map_or(0, |m| m + 1);
    if tp == 0 {
        return Err(bad(iter_dir, format!("has no mp_rank_*/{MINDSPEED_FILE}")));
    }
    for t in 0..tp {
        for p in 0..pp {
            if !files.get(&(t, p)).is_some_and(|f| f.is_file()) {
                return Err(bad(
                    iter_dir,
                    format!("tp {tp} × pp {pp} needs a {MINDSPEED_FILE} for tp rank {t}, pp rank {p}: it is missing"),
                ));
            }
        }
    }
    Ok(files)
}

/// The `model` / `model{v}` state dicts of a file, in vp order.
fn chunks(path: &Path, root: &Value) -> Result<Vec<StateDict>, MindSpeedError> {
    let dict =
        root.as_dict().ok_or_else(|| bad(path, "the file's object is not a dict (not a Megatron checkpoint)"))?;
    let mut plain: Option<&Value> = None;
    let mut models: Vec<(usize, &Value)> = Vec::new();
    for (k, v) in dict {
        let Value::Str(k) = k else { continue };
        if k == "model" {
            plain = Some(v);
        } else if let Some(n) = k.strip_prefix("model").and_then(|n| n.parse::<usize>().ok()) {
            models.push((n, v));
        }
    }
    models.sort_by_key(|m| m.0);
    // Exactly `model`, or `model0` … `model{n-1}` (virtual pipeline chunks), as Megatron saves.
    let models: Vec<(usize, &Value)> = match (plain, models.is_empty()) {
        (Some(v), true) => vec![(0, v)],
        (None, false) if models.iter().enumerate().all(|(i, m)| m.0 == i) => models,
        (None, true) => return Err(bad(path, "has no 'model' entry: not a Megatron model checkpoint")),
        _ => {
            return Err(bad(path, "its model entries are neither 'model' alone nor 'model0', 'model1', … without gaps"))
        }
    };
    models
        .into_iter()
        .map(|(_, m)| {
            let items = m.as_dict().ok_or_else(|| bad(path, "its 'model' entry is not a state dict"))?;
            items
                .iter()
                // Transformer Engine's per-module state (fp8 metadata), not weights.
                .filter(|(k, _)| !matches!(k, Value::Str(k) if k.ends_with("._extra_state")))
                .map(|(k, v)| match (k, v) {
                    (Value::Str(k), Value::Tensor(t)) => Ok((k.clone(), t.clone())),
                    (Value::Str(k), _) => Err(bad(path, format!("state dict entry {k:?} is not a tensor"))),
                    _ => Err(bad(path, "a state dict key is not a string")),
                })
                .collect()
        })
        .collect()
}

/// The number of model chunks every file holds (they must agree).
fn same_chunk_count(iter_dir: &Path, mut counts: impl Iterator<Item = usize>) -> Result<usize, MindSpeedError> {
    let first = counts.next().unwrap_or(1);
    if counts.any(|c| c != first) {
        return Err(bad(iter_dir, "its files hold different numbers of model chunks (model0, model1, …)"));
    }
    Ok(first.max(1))
}

/// Writes one `model_optim_rng.pt` of `file` at `path`: `{'model': state dict, …,
/// 'checkpoint_version': 3.0}` plus `extra` top-level entries (e.g. a training save's
/// `iteration`), the object tree first, then each tensor's storage. `feed(writer, logical
/// index, piece)` writes one piece's bytes (row-major, `dtype(logical index)`) with
/// [`Writer::write`]; pieces come in the order the tensor stacks them. Returns the file size.
pub fn write_file<E: From<torchfile::Error>>(
    path: &Path,
    file: &MsFile,
    dtype: impl Fn(usize) -> DType,
    extra: Vec<(Value, Value)>,
    mut feed: impl FnMut(&mut Writer, &MsTensor, usize, &Piece) -> Result<(), E>,
) -> Result<u64, E> {
    let mut w = Writer::create(path)?;
    let mut refs: Vec<Vec<TensorRef>> = Vec::new();
    let mut root = Vec::new();
    for (key, tensors) in &file.chunks {
        let mut entries = Vec::with_capacity(tensors.len());
        let mut chunk_refs = Vec::with_capacity(tensors.len());
        for t in tensors {
            let d = t.pieces.first().map_or(DType::F32, |(i, _)| dtype(*i));
            let r = w.new_tensor(torch_dtype(d), &t.shape);
            entries.push((Value::Str(t.name.clone()), Value::Tensor(r.clone())));
            chunk_refs.push(r);
        }
        root.push((Value::Str(key.clone()), Value::OrderedDict(entries)));
        refs.push(chunk_refs);
    }
    root.push((Value::Str("checkpoint_version".into()), Value::Float(CHECKPOINT_VERSION)));
    root.extend(extra);
    w.write_root(&Value::Dict(root))?;
    for ((_, tensors), chunk_refs) in file.chunks.iter().zip(&refs) {
        for (t, r) in tensors.iter().zip(chunk_refs) {
            w.begin_storage(&r.storage)?;
            for (i, piece) in &t.pieces {
                feed(&mut w, t, *i, piece)?;
            }
            w.end_storage()?;
        }
    }
    Ok(w.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::names::rank_dir_name;

    /// Logical tensor `i` as f32 bytes whose every element is unique (i, position).
    fn logical(plan: &MsPlan, i: usize) -> Vec<u8> {
        let n: usize = plan.tensors[i].tensor.shape.iter().product();
        (0..n).flat_map(|k| ((i * 1_000_000 + k) as f32).to_le_bytes()).collect()
    }

    /// Writes every file of `plan` under `iter_dir` from [`logical`].
    fn write_all(iter_dir: &Path, plan: &MsPlan) {
        for f in &plan.files {
            let dir = iter_dir.join(&f.dir);
            fs::create_dir_all(&dir).unwrap();
            write_file::<MindSpeedError>(
                &dir.join(MINDSPEED_FILE),
                f,
                |_| DType::F32,
                vec![],
                |w, _, i, piece| {
                    let data = logical(plan, i);
                    let cols: usize = plan.tensors[i].tensor.shape.iter().skip(1).product();
                    for r in piece.rows.clone() {
                        let at = (r * cols + piece.cols.start) * 4;
                        w.write(&data[at..at + piece.cols.len() * 4])?;
                    }
                    Ok(())
                },
            )
            .unwrap();
        }
    }

    #[test]
    fn files_written_from_a_plan_read_back_into_the_same_split_and_tensors() {
        let arch = crate::preset("tiny").unwrap();
        for (tp, llm, vit) in
            [(1, vec![2], vec![2]), (2, vec![1, 1], vec![2, 0]), (2, vec![1, 0, 1, 0], vec![1, 1, 0, 0])]
        {
            let vpp = (llm.len() == 4).then_some(2);
            let req = LayoutRequest {
                tp,
                pp: Some(llm.len() / vpp.unwrap_or(1)),
                vpp,
                llm_pp_layers: Some(llm.clone()),
                vit_pp_layers: Some(vit.clone()),
                unaligned_linear: true,
                make_vocab_size_divisible_by: None,
            };
            let layout = MmLayout::resolve(&arch, &req).unwrap();
            let plan = plan_mindspeed(&arch, &layout).unwrap();
            let dir = tempfile::tempdir().unwrap();
            write_all(dir.path(), &plan);
            let ms = MindSpeedCheckpoint::open(dir.path()).unwrap();
            assert_eq!((ms.tp, ms.pp, ms.vpp), (tp, layout.pp, vpp.unwrap_or(1)), "tp {tp} {llm:?}");
            assert_eq!((&ms.llm_layers, &ms.vit_layers), (&llm, &vit));
            let (_, replanned) = ms.plan(&arch, Path::new("config.json")).unwrap();
            assert_eq!(replanned, plan);
            ms.verify_crc().unwrap();
            let dtypes = ms.check(&plan).unwrap();
            for (i, &dtype) in dtypes.iter().enumerate() {
                let key = &plan.tensors[i].tensor.key;
                assert!(ms.assemble(&plan, i, dtype).unwrap() == logical(&plan, i), "{key}");
            }
        }
    }

    #[test]
    fn a_missing_rank_file_and_a_foreign_file_are_named() {
        let arch = crate::preset("tiny").unwrap();
        let req = LayoutRequest {
            tp: 2,
            pp: Some(2),
            llm_pp_layers: Some(vec![1, 1]),
            vit_pp_layers: Some(vec![2, 0]),
            unaligned_linear: true,
            ..LayoutRequest::default()
        };
        let plan = plan_mindspeed(&arch, &MmLayout::resolve(&arch, &req).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path(), &plan);
        fs::remove_file(dir.path().join(rank_dir_name(1, 0, 2)).join(MINDSPEED_FILE)).unwrap();
        let e = MindSpeedCheckpoint::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("tp rank 1, pp rank 0: it is missing"), "{e}");

        // A file of another model (the ViT-6B flavour's names) is refused tensor by tensor.
        write_all(dir.path(), &plan);
        let other = crate::preset("tiny6b").unwrap();
        let ms = MindSpeedCheckpoint::open(dir.path()).unwrap();
        let (_, other_plan) = ms.plan(&other, Path::new("other/config.json")).unwrap();
        let e = ms.check(&other_plan).unwrap_err().to_string();
        assert!(e.contains("does not match the model") && e.contains("missing"), "{e}");
    }
}
