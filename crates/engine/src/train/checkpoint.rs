//! Checkpoints: what `--load` accepts and what `--save` writes.
//!
//! `--load DIR` takes, in this order of detection:
//! 1. a save dir with `latest_checkpointed_iteration.txt` (Megatron's tracker): its `release`
//!    (a converted checkpoint: weights only) or `iter_NNNNNNN` (a training state: weights,
//!    optimizer, data position, RNG seed);
//! 2. an iteration folder itself (it has `manifest.json`);
//! 3. an HF folder (config.json + safetensors, any key spelling `mm_spec::hf::keys` knows).
//!
//! MM checkpoints of any tp/pp split are merged on load with the manifest's split plan, so a
//! checkpoint converted for a cluster layout also loads here.
//!
//! Saves use the MM layout of `mm_spec::checkpoint` at tp 1, pp 1 (`mp_rank_00/model.safetensors`
//! with logical keys, vocab rows zero-padded as Megatron does, `manifest.json`, `hf_assets/`),
//! plus the engine's own files in the iteration folder: the optimizer state and
//! `trainer_state.json`. The optimizer state is `mp_rank_00/optimizer.safetensors` (per
//! parameter), or with the distributed optimizer one `mp_rank_00/optimizer.dp{r}-of-{n}.safetensors`
//! per data-parallel rank plus the flat layout in trainer_state.json (see `train::zero`).
//!
//! A save is atomic: everything is written and fsynced in a temporary folder, renamed into
//! place, and the tracker file is replaced last. With data parallelism the steps are split
//! ([`prepare`], [`write_shared`], [`write_optimizer_shard`], [`commit`]): DP rank 0 writes the
//! shared files and commits, every rank writes its own optimizer shard, barriers in between.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use mm_spec::checkpoint::{
    self as ck, iteration_dir, latest_path, plan_checkpoint, shard_rel_path, DType, Iteration, LayoutRequest, Manifest,
    MmLayout, SplitKind, HF_ASSETS_DIR, LATEST_FILE, MANIFEST_FILE,
};
use mm_spec::ModelPreset;
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::zero::{FlatLayout, SavedOptimizer};
use crate::weights::hf::{self, write_synced, HfCheckpoint, MismatchReport, WeightsError};
use mm_spec::hf::{mm_key_of_original as to_mm, original_key as from_mm};
use crate::weights::safetensors::{self as st, SafetensorsFile};

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// The file of DP rank `rank`'s optimizer shard (distributed optimizer over `size` ranks).
pub fn optimizer_shard_file(rank: usize, size: usize) -> String {
    format!("optimizer.dp{rank}-of-{size}.safetensors")
}
pub const STATE_FILE: &str = "trainer_state.json";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Safetensors(#[from] st::SafetensorsError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error(
        "{path}: not a checkpoint: expected {LATEST_FILE} (a save dir), {MANIFEST_FILE} (an MM iteration folder) \
         or config.json with safetensors (an HF folder)"
    )]
    Unknown { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

fn format_err(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Format { path: path.to_path_buf(), reason: reason.into() }
}

/// The engine's state beside the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub iteration: u64,
    pub consumed_samples: u64,
    /// Loader position to continue from (see `data::loader`).
    pub data_position: u64,
    /// Optimizer steps; present when the optimizer state was saved.
    #[serde(default)]
    pub optimizer_step: Option<u64>,
    /// The seed all randomness derives from (torch is reseeded from (seed, iteration) at every
    /// iteration, data order and frame sampling from (seed, epoch, position)); absent with
    /// --no-save-rng.
    #[serde(default)]
    pub seed: Option<u64>,
    pub train_iters: u64,
    pub global_batch_size: u64,
    /// The rate the last saved iteration trained with (informational).
    pub lr: f64,
    /// Loss of the last iteration (informational).
    pub loss: f64,
    /// Data-parallel ranks of the run that saved it (informational; absent: one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_parallel_size: Option<usize>,
    /// The flat layout of a distributed optimizer's shards (absent: per-parameter state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer_layout: Option<FlatLayout>,
}

/// What `--load` pointed at.
#[derive(Debug)]
pub enum Source {
    Hf { dir: PathBuf, ckpt: HfCheckpoint },
    Mm { iter_dir: PathBuf, manifest: Box<Manifest> },
}

/// Detects the kind of checkpoint at `path` (see the module doc).
pub fn resolve(path: &Path) -> Result<Source, CheckpointError> {
    let tracker = latest_path(path);
    let iter_dir = if tracker.exists() {
        let text = fs::read_to_string(&tracker).map_err(io(&tracker))?;
        let it = Iteration::parse_latest(&text).map_err(|e| format_err(&tracker, e.to_string()))?;
        Some(iteration_dir(path, it))
    } else if path.join(MANIFEST_FILE).exists() {
        Some(path.to_path_buf())
    } else {
        None
    };
    if let Some(iter_dir) = iter_dir {
        let mpath = iter_dir.join(MANIFEST_FILE);
        let text = fs::read_to_string(&mpath).map_err(io(&mpath))?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|e| format_err(&mpath, format!("not an MM manifest: {e}")))?;
        return Ok(Source::Mm { iter_dir, manifest: Box::new(manifest) });
    }
    if path.join(hf::CONFIG).exists() {
        let ckpt = HfCheckpoint::open(path)?;
        return Ok(Source::Hf { dir: path.to_path_buf(), ckpt });
    }
    Err(CheckpointError::Unknown { path: path.to_path_buf() })
}

impl Source {
    /// The architecture the checkpoint declares.
    pub fn preset(&self, name: &str) -> Result<ModelPreset, CheckpointError> {
        match self {
            Source::Hf { dir, .. } => Ok(hf::load_config(dir, name)?),
            Source::Mm { manifest, .. } => Ok(manifest.architecture.clone()),
        }
    }

    /// Whether the checkpoint has an untied lm_head (else the model ties it).
    pub fn has_lm_head(&self) -> bool {
        match self {
            Source::Hf { ckpt, .. } => ckpt.has("language_model.lm_head.weight"),
            Source::Mm { manifest, .. } => manifest.tensors.iter().any(|t| t.key == "llm.lm_head.weight"),
        }
    }

    /// The training iteration it holds (None for HF folders and converted `release` ones).
    pub fn iteration(&self) -> Option<u64> {
        match self {
            Source::Mm { manifest, .. } => match manifest.iteration {
                Iteration::Step(n) => Some(n),
                Iteration::Release => None,
            },
            Source::Hf { .. } => None,
        }
    }

    /// Where config.json and the tokenizer files are.
    pub fn assets_dir(&self) -> PathBuf {
        match self {
            Source::Hf { dir, .. } => dir.clone(),
            Source::Mm { iter_dir, .. } => iter_dir.join(HF_ASSETS_DIR),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Source::Hf { dir, .. } => format!("HF folder {}", dir.display()),
            Source::Mm { iter_dir, manifest } => format!(
                "MM checkpoint {} (iteration {}, tp {}, pp {})",
                iter_dir.display(),
                manifest.iteration,
                manifest.parallel.tp,
                manifest.parallel.pp
            ),
        }
    }

    /// Copies the weights into the VarStore, after checking every key and shape.
    pub fn load_weights(&self, vs: &VarStore) -> Result<(), CheckpointError> {
        match self {
            Source::Hf { ckpt, .. } => {
                hf::load_into(vs, ckpt)?;
                Ok(())
            }
            Source::Mm { iter_dir, manifest } => load_mm(vs, iter_dir, manifest),
        }
    }

    /// trainer_state.json of a training iteration.
    pub fn trainer_state(&self) -> Result<Option<TrainerState>, CheckpointError> {
        let Source::Mm { iter_dir, .. } = self else { return Ok(None) };
        let p = iter_dir.join(STATE_FILE);
        if !p.exists() {
            return Ok(None);
        }
        let text = fs::read_to_string(&p).map_err(io(&p))?;
        serde_json::from_str(&text).map(Some).map_err(|e| format_err(&p, format!("not a trainer state: {e}")))
    }

    /// The optimizer tensors, keyed as saved (`exp_avg.<mm key>`, …).
    pub fn optimizer_tensors(&self, device: Device) -> Result<Option<BTreeMap<String, Tensor>>, CheckpointError> {
        let Source::Mm { iter_dir, .. } = self else { return Ok(None) };
        let p = iter_dir.join(ck::rank_dir_name(0, 0, 1)).join(OPTIMIZER_FILE);
        if !p.exists() {
            return Ok(None);
        }
        let f = SafetensorsFile::open(&p)?;
        let mut out = BTreeMap::new();
        for k in f.entries.keys() {
            out.insert(k.clone(), f.read(k, device)?);
        }
        Ok(Some(out))
    }

    /// The optimizer state `state` describes, in whichever layout it was saved: the shard
    /// files of a distributed optimizer (opened, read lazily), or the per-parameter file.
    /// None when there is none (HF folder, --no-save-optim).
    pub fn saved_optimizer(&self, state: &TrainerState) -> Result<Option<SavedOptimizer>, CheckpointError> {
        let Source::Mm { iter_dir, .. } = self else { return Ok(None) };
        let Some(layout) = &state.optimizer_layout else {
            return Ok(self.optimizer_tensors(Device::Cpu)?.map(SavedOptimizer::PerParam));
        };
        let state_path = iter_dir.join(STATE_FILE);
        layout.validate().map_err(|e| format_err(&state_path, format!("optimizer_layout: {e}")))?;
        let rank_dir = iter_dir.join(ck::rank_dir_name(0, 0, 1));
        let mut files = Vec::with_capacity(layout.dp);
        for r in 0..layout.dp {
            let p = rank_dir.join(optimizer_shard_file(r, layout.dp));
            if !p.exists() {
                return Err(format_err(
                    &p,
                    format!("missing: {STATE_FILE} describes a distributed optimizer over {} ranks", layout.dp),
                ));
            }
            let f = SafetensorsFile::open(&p)?;
            for key in ["exp_avg", "exp_avg_sq"] {
                match f.entries.get(key) {
                    Some(e) if e.shape == [layout.shard() as i64] => {}
                    Some(e) => {
                        return Err(format_err(
                            &p,
                            format!(
                                "{key} has shape {:?}, the layout's shard has {} elements",
                                e.shape,
                                layout.shard()
                            ),
                        ))
                    }
                    None => return Err(format_err(&p, format!("no {key} tensor"))),
                }
            }
            files.push(f);
        }
        Ok(Some(SavedOptimizer::Flat { layout: layout.clone(), files }))
    }
}

/// Reassembles every logical tensor from its tp shards and copies it into the VarStore.
fn load_mm(vs: &VarStore, iter_dir: &Path, manifest: &Manifest) -> Result<(), CheckpointError> {
    let mpath = iter_dir.join(MANIFEST_FILE);
    let plan = manifest.verify().map_err(|e| format_err(&mpath, e.to_string()))?;
    let vars = vs.variables();
    let mut report = MismatchReport::default();
    let mut planned: HashMap<String, usize> = HashMap::new();
    for (i, t) in plan.iter().enumerate() {
        match from_mm(&t.key) {
            Some(name) if vars.contains_key(&name) => {
                let want = vars[&name].size();
                let have: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
                if want != have {
                    report.misshaped.push((name.clone(), want, have));
                }
                planned.insert(name, i);
            }
            _ => report.unexpected.push(t.key.clone()),
        }
    }
    for name in vars.keys() {
        if !planned.contains_key(name) {
            report.missing.push(name.clone());
        }
    }
    report.missing.sort();
    if !report.is_empty() {
        return Err(WeightsError::Mismatch { dir: iter_dir.to_path_buf(), report }.into());
    }
    let mut files: HashMap<String, SafetensorsFile> = HashMap::new();
    let pp = manifest.parallel.pp;
    for (name, var) in &vars {
        let t = &plan[planned[name]];
        let ranks = if t.split == SplitKind::Replicated { 1 } else { t.shards.len() };
        let rows = t.shape.first().copied().unwrap_or(1) as i64;
        let cols: i64 = t.shape.iter().skip(1).product::<usize>() as i64;
        let full = Tensor::zeros([rows, cols], (var.kind(), Device::Cpu));
        for (tp_rank, shard) in t.shards.iter().enumerate().take(ranks) {
            let rel = shard_rel_path(tp_rank, t.pp_rank, pp);
            if !files.contains_key(&rel) {
                files.insert(rel.clone(), SafetensorsFile::open(&iter_dir.join(&rel))?);
            }
            let data = files[&rel].read(&t.local_key, Device::Cpu)?;
            let want: Vec<i64> = shard.shape.iter().map(|&d| d as i64).collect();
            if data.size() != want {
                return Err(format_err(
                    &iter_dir.join(&rel),
                    format!("tensor {:?}: shape {:?}, the manifest's plan says {want:?}", t.local_key, data.size()),
                ));
            }
            let shard_rows = want.first().copied().unwrap_or(1);
            let data = data.reshape([shard_rows, -1]).to_kind(var.kind());
            let mut offset = 0i64;
            for piece in &shard.pieces {
                let n = piece.rows.len() as i64;
                let keep = (rows - piece.rows.start as i64).clamp(0, n);
                if keep > 0 {
                    let src = data.narrow(0, offset, keep);
                    let mut dst = full.narrow(0, piece.rows.start as i64, keep).narrow(
                        1,
                        piece.cols.start as i64,
                        piece.cols.len() as i64,
                    );
                    dst.copy_(&src);
                }
                offset += n;
            }
        }
        let mut v = var.shallow_clone();
        tch::no_grad(|| v.f_copy_(&full.reshape(var.size())))
            .map_err(|e| format_err(iter_dir, format!("tensor {}: {e}", t.key)))?;
    }
    Ok(())
}

fn fsync_dir(dir: &Path) -> Result<(), CheckpointError> {
    fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

/// Files of an HF folder worth carrying along (config, tokenizer, processor), not weights.
fn asset_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !n.ends_with(".safetensors")
                && !n.ends_with(".bin")
                && !n.ends_with(".pt")
                && n != hf::INDEX
                && (n.ends_with(".json") || n.ends_with(".txt") || n.ends_with(".model") || n.ends_with(".py"))
        })
        .collect();
    out.sort();
    out
}

/// Everything one save writes.
pub struct SaveRequest<'a> {
    pub save_dir: &'a Path,
    pub iteration: u64,
    pub preset: &'a ModelPreset,
    /// Engine parameter name → tensor (all of the model's variables).
    pub weights: &'a [(String, Tensor)],
    /// Optimizer tensors keyed by MM names, None with --no-save-optim.
    pub optimizer: Option<Vec<(String, Tensor)>>,
    pub state: &'a TrainerState,
    /// Folders whose config/tokenizer files go to hf_assets/ (first one wins per file name).
    pub assets_from: Vec<PathBuf>,
}

/// Writes one iteration atomically and points the tracker at it; returns the folder (one
/// process: [`prepare`], [`write_shared`], [`commit`]).
pub fn save(req: SaveRequest) -> Result<PathBuf, CheckpointError> {
    let tmp = tmp_dir(req.save_dir, req.iteration, &std::process::id().to_string());
    prepare(req.save_dir, &tmp)?;
    write_shared(&tmp, &req)?;
    commit(req.save_dir, &tmp, req.iteration)
}

/// The temporary folder an iteration is written to before the rename; `tag` tells runs apart
/// (rank 0's process id, which every rank learns at start-up).
pub fn tmp_dir(save_dir: &Path, iteration: u64, tag: &str) -> PathBuf {
    save_dir.join(format!(".{}.tmp-{tag}", Iteration::Step(iteration).dir_name()))
}

/// Creates the save dir and an empty temporary folder (with its rank folder), removing a stale one.
pub fn prepare(save_dir: &Path, tmp: &Path) -> Result<(), CheckpointError> {
    fs::create_dir_all(save_dir).map_err(io(save_dir))?;
    if tmp.exists() {
        fs::remove_dir_all(tmp).map_err(io(tmp))?;
    }
    let rank_dir = tmp.join(ck::rank_dir_name(0, 0, 1));
    fs::create_dir_all(&rank_dir).map_err(io(&rank_dir))
}

/// Writes one DP rank's optimizer shard into the temporary folder.
pub fn write_optimizer_shard(
    tmp: &Path,
    rank: usize,
    size: usize,
    tensors: &[(String, Tensor)],
) -> Result<PathBuf, CheckpointError> {
    let path = tmp.join(ck::rank_dir_name(0, 0, 1)).join(optimizer_shard_file(rank, size));
    let cpu: Vec<(String, Tensor)> = tensors.iter().map(|(k, t)| (k.clone(), t.to_device(Device::Cpu))).collect();
    let meta = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("dp_rank".to_string(), rank.to_string()),
        ("dp_size".to_string(), size.to_string()),
    ]);
    st::write(&path, &cpu, &meta)?;
    Ok(path)
}

/// Writes the files one process writes for everyone: weights, per-parameter optimizer state
/// (if any), hf_assets, manifest and trainer state.
pub fn write_shared(tmp: &Path, req: &SaveRequest) -> Result<(), CheckpointError> {
    let it = Iteration::Step(req.iteration);
    // Weights in the MM layout at tp 1, pp 1.
    let layout = MmLayout::resolve(req.preset, &LayoutRequest { tp: 1, ..LayoutRequest::default() })
        .map_err(|e| format_err(req.save_dir, e.to_string()))?;
    let plan = plan_checkpoint(req.preset, &layout).map_err(|e| format_err(req.save_dir, e.to_string()))?;
    let by_name: HashMap<&str, &Tensor> = req.weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut tensors = Vec::with_capacity(plan.len());
    let mut dtypes = Vec::with_capacity(plan.len());
    for t in &plan {
        let name = from_mm(&t.key).unwrap_or_default();
        let Some(w) = by_name.get(name.as_str()) else {
            return Err(format_err(req.save_dir, format!("the model has no parameter {name} for {}", t.key)));
        };
        let w = w.detach().to_device(Device::Cpu);
        let want: Vec<i64> = t.shards[0].shape.iter().map(|&d| d as i64).collect();
        let w = if w.size() != want {
            // Vocab-parallel rows padded with zeros up to the padded vocab size.
            let pad = Tensor::zeros([want[0] - w.size()[0], want[1]], (w.kind(), Device::Cpu));
            Tensor::cat(&[w, pad], 0)
        } else {
            w
        };
        dtypes.push(match w.kind() {
            Kind::BFloat16 => DType::BF16,
            Kind::Half => DType::F16,
            _ => DType::F32,
        });
        tensors.push((t.local_key.clone(), w));
    }
    let rank_dir = tmp.join(ck::rank_dir_name(0, 0, 1));
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    st::write(&rank_dir.join(ck::SHARD_FILE), &tensors, &meta)?;
    if let Some(opt) = &req.optimizer {
        let opt: Vec<(String, Tensor)> = opt.iter().map(|(k, t)| (k.clone(), t.to_device(Device::Cpu))).collect();
        st::write(&rank_dir.join(OPTIMIZER_FILE), &opt, &meta)?;
    }
    fsync_dir(&rank_dir)?;

    // hf_assets: config.json of the architecture, then tokenizer and other small files.
    let assets = tmp.join(HF_ASSETS_DIR);
    fs::create_dir_all(&assets).map_err(io(&assets))?;
    let mut names = vec![hf::CONFIG.to_string()];
    write_synced(
        &assets.join(hf::CONFIG),
        serde_json::to_string_pretty(&hf::config_json(req.preset)).expect("json").as_bytes(),
    )?;
    for dir in &req.assets_from {
        for f in asset_files(dir) {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if names.contains(&name) || name == MANIFEST_FILE || name == STATE_FILE || name == LATEST_FILE {
                continue;
            }
            let bytes = fs::read(&f).map_err(io(&f))?;
            write_synced(&assets.join(&name), &bytes)?;
            names.push(name);
        }
    }
    names.sort();
    fsync_dir(&assets)?;

    let mut manifest = Manifest::new(it, req.preset, &layout, &plan, |i| dtypes[i]);
    manifest.hf_assets = names;
    write_synced(&tmp.join(MANIFEST_FILE), serde_json::to_string_pretty(&manifest).expect("json").as_bytes())?;
    write_synced(&tmp.join(STATE_FILE), serde_json::to_string_pretty(req.state).expect("json").as_bytes())?;
    fsync_dir(tmp)?;
    Ok(())
}

/// Fsyncs the temporary folder, renames it into place and points the tracker at it.
pub fn commit(save_dir: &Path, tmp: &Path, iteration: u64) -> Result<PathBuf, CheckpointError> {
    let it = Iteration::Step(iteration);
    fsync_dir(&tmp.join(ck::rank_dir_name(0, 0, 1)))?;
    fsync_dir(tmp)?;
    let final_dir = iteration_dir(save_dir, it);
    if final_dir.exists() {
        let old = save_dir.join(format!(".{}.old-{}", it.dir_name(), std::process::id()));
        fs::rename(&final_dir, &old).map_err(io(&final_dir))?;
        fs::rename(tmp, &final_dir).map_err(io(&final_dir))?;
        fs::remove_dir_all(&old).map_err(io(&old))?;
    } else {
        fs::rename(tmp, &final_dir).map_err(io(&final_dir))?;
    }
    fsync_dir(save_dir)?;
    let tracker = latest_path(save_dir);
    let tracker_tmp = save_dir.join(format!(".{LATEST_FILE}.tmp-{}", std::process::id()));
    write_synced(&tracker_tmp, it.latest_text().as_bytes())?;
    fs::rename(&tracker_tmp, &tracker).map_err(io(&tracker))?;
    fsync_dir(save_dir)?;
    Ok(final_dir)
}

/// The MM key of an engine parameter name (for optimizer state keys).
pub fn mm_name(name: &str) -> String {
    to_mm(name).unwrap_or_else(|| name.to_string())
}
