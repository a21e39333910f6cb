//! HF checkpoint folders: config.json (original `internvl_chat` or transformers-native
//! `internvl`), safetensors weights (one file or sharded with model.safetensors.index.json)
//! in any of the spellings `mm_spec::hf::keys` knows, loaded into the model's VarStore; and the
//! writer of an original-layout folder.
//!
//! A load checks the whole key set before copying anything and reports every missing,
//! unexpected and mis-shaped tensor in one error.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub use mm_spec::hf::{CONFIG_FILE as CONFIG, INDEX_FILE as INDEX, SINGLE_FILE as SINGLE};
use mm_spec::{DType, HfLayout, ModelPreset};
use serde_json::{json, Value};
use tch::nn::VarStore;
use tch::{Device, Tensor};

use super::safetensors::{self as st, SafetensorsError, SafetensorsFile};
use super::slices::{self, TpSlices};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    /// Not a `#[source]`: the message holds it already, so `{:#}` does not print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{dir}: no weights: expected {SINGLE} or {INDEX}")]
    NoWeights { dir: PathBuf },
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error(transparent)]
    HfConfig(#[from] mm_spec::hf::ConfigError),
    #[error(transparent)]
    File(#[from] mm_spec::io::FileError),
    #[error("{path}: key {key:?}: {reason}")]
    Index { path: PathBuf, key: String, reason: String },
    #[error("{dir}: {report}")]
    Mismatch { dir: PathBuf, report: MismatchReport },
    #[error("{dir}: tensor {key:?}: {reason}")]
    Tensor { dir: PathBuf, key: String, reason: String },
}

/// Everything that keeps a checkpoint from fitting the model, collected before any copy.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MismatchReport {
    /// Model parameters the checkpoint lacks (original-layout names).
    pub missing: Vec<String>,
    /// Stored keys that no parameter takes (as stored).
    pub unexpected: Vec<String>,
    /// (original-layout name, model shape, checkpoint shape).
    pub misshaped: Vec<(String, Vec<i64>, Vec<i64>)>,
    /// Keys given twice (two spellings of one tensor, or one key in two shards).
    pub duplicate: Vec<String>,
}

impl MismatchReport {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.misshaped.is_empty() && self.duplicate.is_empty()
    }
}

impl std::fmt::Display for MismatchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::from("checkpoint does not fit the model:");
        let _ = write!(
            s,
            " {} missing, {} unexpected, {} mis-shaped",
            self.missing.len(),
            self.unexpected.len(),
            self.misshaped.len()
        );
        if !self.duplicate.is_empty() {
            let _ = write!(s, ", {} duplicate", self.duplicate.len());
        }
        for k in &self.missing {
            let _ = write!(s, "\n  missing: {k}");
        }
        for k in &self.unexpected {
            let _ = write!(s, "\n  unexpected: {k}");
        }
        for (k, model, ckpt) in &self.misshaped {
            let _ = write!(s, "\n  mis-shaped: {k}: model {model:?}, checkpoint {ckpt:?}");
        }
        for k in &self.duplicate {
            let _ = write!(s, "\n  duplicate: {k}");
        }
        f.write_str(&s)
    }
}

/// Where one canonical tensor lives.
#[derive(Debug, Clone)]
enum Source {
    Plain {
        file: usize,
        key: String,
    },
    /// q, k, v parts of a fused ViT qkv tensor.
    Fused {
        parts: [Option<(usize, String)>; 3],
    },
}

/// An opened checkpoint folder: headers read, tensors read on demand.
#[derive(Debug)]
pub struct HfCheckpoint {
    pub dir: PathBuf,
    files: Vec<SafetensorsFile>,
    sources: BTreeMap<String, Source>,
    /// Stored keys no table knows (reported as unexpected at load).
    unknown: Vec<String>,
    duplicate: Vec<String>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WeightsError + '_ {
    move |error| WeightsError::Io { path: path.to_path_buf(), error }
}

impl HfCheckpoint {
    pub fn open(dir: &Path) -> Result<HfCheckpoint, WeightsError> {
        let index = dir.join(INDEX);
        let file_names: Vec<String> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(io(&index))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| WeightsError::Config { path: index.clone(), reason: format!("not JSON: {e}") })?;
            let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| WeightsError::Index {
                path: index.clone(),
                key: "weight_map".into(),
                reason: "missing or not an object of tensor name → file".into(),
            })?;
            let mut names = BTreeSet::new();
            for (k, f) in map {
                let f = f.as_str().ok_or_else(|| WeightsError::Index {
                    path: index.clone(),
                    key: format!("weight_map.{k}"),
                    reason: "not a file name string".into(),
                })?;
                if f.contains('/') || f.contains("..") {
                    return Err(WeightsError::Index {
                        path: index.clone(),
                        key: format!("weight_map.{k}"),
                        reason: format!("{f:?} is not a file inside the folder"),
                    });
                }
                names.insert(f.to_string());
            }
            names.into_iter().collect()
        } else if dir.join(SINGLE).exists() {
            vec![SINGLE.to_string()]
        } else {
            return Err(WeightsError::NoWeights { dir: dir.to_path_buf() });
        };
        let files = file_names.iter().map(|f| SafetensorsFile::open(&dir.join(f))).collect::<Result<Vec<_>, _>>()?;
        let mut ck = HfCheckpoint {
            dir: dir.to_path_buf(),
            files,
            sources: BTreeMap::new(),
            unknown: Vec::new(),
            duplicate: Vec::new(),
        };
        for (fi, file) in ck.files.iter().enumerate() {
            for key in file.entries.keys() {
                let parsed =
                    mm_spec::hf::parse_key(key).and_then(|k| Some((mm_spec::hf::original_key(&k.mm_key)?, k.part)));
                match parsed {
                    None => ck.unknown.push(key.clone()),
                    Some((name, None)) => match ck.sources.entry(name) {
                        std::collections::btree_map::Entry::Occupied(e) => {
                            ck.duplicate.push(format!("{} (stored as {key})", e.key()))
                        }
                        std::collections::btree_map::Entry::Vacant(e) => {
                            e.insert(Source::Plain { file: fi, key: key.clone() });
                        }
                    },
                    Some((name, Some(part))) => {
                        let entry =
                            ck.sources.entry(name.clone()).or_insert(Source::Fused { parts: [None, None, None] });
                        match entry {
                            Source::Fused { parts } if parts[part].is_none() => parts[part] = Some((fi, key.clone())),
                            _ => ck.duplicate.push(format!("{name} (stored as {key})")),
                        }
                    }
                }
            }
        }
        Ok(ck)
    }

    /// Original-layout names of every tensor the folder provides.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.sources.keys().map(String::as_str)
    }

    pub fn has(&self, name: &str) -> bool {
        self.sources.contains_key(name)
    }

    /// Shape of a canonical tensor, or the q/k/v parts that are missing.
    fn shape(&self, name: &str) -> Result<Vec<i64>, Vec<String>> {
        match &self.sources[name] {
            Source::Plain { file, key } => Ok(self.files[*file].entries[key].shape.clone()),
            Source::Fused { parts } => {
                let mut shape: Option<Vec<i64>> = None;
                let mut missing = Vec::new();
                for (i, p) in parts.iter().enumerate() {
                    match p {
                        None => missing.push(format!("{name} (its {} part)", ["q", "k", "v"][i])),
                        Some((f, k)) => {
                            let s = &self.files[*f].entries[k].shape;
                            shape = Some(match shape {
                                None => s.clone(),
                                Some(mut acc) => {
                                    if !acc.is_empty() && !s.is_empty() {
                                        acc[0] += s[0];
                                    }
                                    acc
                                }
                            });
                        }
                    }
                }
                if missing.is_empty() {
                    Ok(shape.unwrap_or_default())
                } else {
                    Err(missing)
                }
            }
        }
    }

    /// Reads one canonical tensor (fusing q/k/v rows [0:C], [C:2C], [2C:3C]).
    pub fn read(&self, name: &str, device: Device) -> Result<Tensor, WeightsError> {
        let Some(src) = self.sources.get(name) else {
            return Err(WeightsError::Tensor {
                dir: self.dir.clone(),
                key: name.into(),
                reason: "not in the checkpoint".into(),
            });
        };
        match src {
            Source::Plain { file, key } => Ok(self.files[*file].read(key, device)?),
            Source::Fused { parts } => {
                let mut ts = Vec::with_capacity(3);
                for p in parts {
                    let (f, k) = p.as_ref().ok_or_else(|| WeightsError::Tensor {
                        dir: self.dir.clone(),
                        key: name.into(),
                        reason: "a q/k/v part is missing".into(),
                    })?;
                    ts.push(self.files[*f].read(k, device)?);
                }
                Tensor::f_cat(&ts, 0).map_err(|e| WeightsError::Tensor {
                    dir: self.dir.clone(),
                    key: name.into(),
                    reason: e.to_string(),
                })
            }
        }
    }

    /// Compares the folder's tensors with `expected` (name → shape) without reading data.
    pub fn check(&self, expected: &BTreeMap<String, Vec<i64>>) -> MismatchReport {
        let mut r = MismatchReport { duplicate: self.duplicate.clone(), ..Default::default() };
        for (name, shape) in expected {
            if !self.sources.contains_key(name) {
                r.missing.push(name.clone());
                continue;
            }
            match self.shape(name) {
                Ok(s) if &s == shape => {}
                Ok(s) => r.misshaped.push((name.clone(), shape.clone(), s)),
                Err(parts) => r.missing.extend(parts),
            }
        }
        r.unexpected.extend(self.unknown.iter().cloned());
        for (name, src) in &self.sources {
            if !expected.contains_key(name) {
                match src {
                    Source::Plain { key, .. } => r.unexpected.push(key.clone()),
                    Source::Fused { parts } => r.unexpected.extend(parts.iter().flatten().map(|(_, k)| k.clone())),
                }
            }
        }
        r
    }
}

/// Copies every tensor of `ck` into the VarStore (converting dtype, keeping the variables'
/// device), after checking the full key set and shapes.
/// `stage`: the VarStore holds one pipeline stage; the checkpoint's other tensors are not
/// unexpected there (only the mapped files' pages of this stage's tensors are read).
/// `slices`: the VarStore holds one tensor-parallel rank's slices (each tensor is read whole,
/// one at a time, and the rank's part kept).
pub fn load_into(
    vs: &VarStore,
    ck: &HfCheckpoint,
    stage: bool,
    slices: Option<&TpSlices>,
) -> Result<usize, WeightsError> {
    let vars = vs.variables();
    let expected: BTreeMap<String, Vec<i64>> =
        vars.iter().map(|(k, v)| (k.clone(), slices::full_shape(slices, k, v))).collect();
    let mut report = ck.check(&expected);
    if stage {
        report.unexpected.clear();
    }
    if !report.is_empty() {
        return Err(WeightsError::Mismatch { dir: ck.dir.clone(), report });
    }
    let mut n = 0;
    for (name, var) in &vars {
        let t = slices::local(slices, name, &ck.read(name, Device::Cpu)?, var);
        let mut var = var.shallow_clone();
        tch::no_grad(|| var.f_copy_(&t.to_kind(var.kind()))).map_err(|e| WeightsError::Tensor {
            dir: ck.dir.clone(),
            key: name.clone(),
            reason: e.to_string(),
        })?;
        n += 1;
    }
    Ok(n)
}

/// The architecture of an HF folder, from its config.json in either schema (mm-spec's one
/// parser), named `name`.
pub fn load_config(dir: &Path, name: &str) -> Result<ModelPreset, WeightsError> {
    let mut arch = mm_spec::hf::read_config(dir)?.arch;
    arch.name = name.to_string();
    Ok(arch)
}

/// The original-layout config.json of `preset` (mm-spec's writer), with `dtype` as its
/// `torch_dtype`.
pub fn config_json(preset: &ModelPreset, dtype: Option<DType>) -> Value {
    mm_spec::hf::config_for_layout(preset, None, HfLayout::Original, dtype)
}

/// Writes an original-layout HF folder: config.json plus weights, sharded above
/// `max_shard_bytes` (with an index). Files are fsynced; the caller makes the folder atomic.
pub fn save(
    dir: &Path,
    preset: &ModelPreset,
    tensors: &[(String, Tensor)],
    max_shard_bytes: u64,
) -> Result<(), WeightsError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut size = 0u64;
    for (name, t) in sorted {
        let n = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        if size > 0 && size + n > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        shards.last_mut().expect("one shard").push((name.clone(), t.shallow_clone()));
    }
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    if shards.len() == 1 {
        st::write(&dir.join(SINGLE), &shards[0], &meta)?;
    } else {
        let count = shards.len();
        let mut weight_map = serde_json::Map::new();
        let mut total = 0u64;
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, count);
            for (name, t) in shard {
                weight_map.insert(name.clone(), json!(file));
                total += (t.numel() * t.kind().elt_size_in_bytes()) as u64;
            }
            st::write(&dir.join(&file), shard, &meta)?;
        }
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_synced(&dir.join(INDEX), serde_json::to_string_pretty(&index).expect("json").as_bytes())?;
    }
    let dtype = tensors.first().and_then(|(_, t)| st::dtype_of(t.kind())).and_then(DType::parse);
    let cfg = serde_json::to_string_pretty(&config_json(preset, dtype)).expect("json");
    write_synced(&dir.join(CONFIG), cfg.as_bytes())?;
    Ok(())
}

/// Writes a file and fsyncs it (mm-spec's).
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), WeightsError> {
    Ok(mm_spec::io::write_synced(path, bytes)?)
}
