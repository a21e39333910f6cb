//! Checkpoints the trainer writes, and the trainer's own state read back from them (reading
//! what `--load` points at is `weights::checkpoint`'s).
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
//! or with `--ckpt-format torch` MindSpeed-MM's own format (`mp_rank_00/model_optim_rng.pt`:
//! `{'model': state dict, 'checkpoint_version': 3.0, 'iteration': N}`, mm-spec's MindSpeed plan,
//! no manifest; MindSpeed-MM loads it with `--no-load-optim --no-load-rng`, since the optimizer
//! state stays in the engine's files), plus the engine's own files in the iteration folder:
//! `hf_assets/`, the optimizer state and `trainer_state.json`. The optimizer state is `mp_rank_00/optimizer.safetensors` (per
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
    self as ck, iteration_dir, latest_path, plan_checkpoint, plan_mindspeed, write_mindspeed_file, DType, Iteration,
    LayoutRequest, Manifest, MmLayout, HF_ASSETS_DIR, LATEST_FILE, MANIFEST_FILE, MINDSPEED_FILE,
};
use mm_spec::ModelPreset;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use torchfile::Value;

use mm_spec::hf::{mm_key_of_original as to_mm, original_key as from_mm};

use super::zero::{FlatLayout, SavedOptimizer};
use crate::weights::checkpoint::{
    format_err, io, optimizer_shard_file, CheckpointError, Source, OPTIMIZER_FILE, STATE_FILE,
};
use crate::weights::hf::{self, write_synced, WeightsError};
use crate::weights::safetensors::{self as st, SafetensorsFile};

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
    /// Data-parallel ranks of the run that saved it (informational; absent: one). With context
    /// parallelism the distributed optimizer's shards are data × context (`optimizer_layout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_parallel_size: Option<usize>,
    /// The flat layout of a distributed optimizer's shards (absent: per-parameter state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer_layout: Option<FlatLayout>,
}

/// The trainer's state in a loaded checkpoint (absent for HF folders and converted ones).
pub trait SavedState {
    fn trainer_state(&self) -> Result<Option<TrainerState>, CheckpointError>;
    fn optimizer_tensors(
        &self,
        device: Device,
        tp_rank: usize,
    ) -> Result<Option<BTreeMap<String, Tensor>>, CheckpointError>;
    /// The optimizer state of the rank saved in `rank` (`RankDir::SINGLE` for one process).
    fn saved_optimizer(&self, state: &TrainerState, rank: RankDir) -> Result<Option<SavedOptimizer>, CheckpointError>;
}

/// A rank's folder in a save: its tensor-parallel rank, pipeline stage and the stage count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankDir {
    pub tp_rank: usize,
    pub pp_rank: usize,
    pub pp: usize,
}

impl RankDir {
    /// One process: `mp_rank_00`.
    pub const SINGLE: RankDir = RankDir { tp_rank: 0, pp_rank: 0, pp: 1 };

    pub fn name(&self) -> String {
        ck::rank_dir_name(self.tp_rank, self.pp_rank, self.pp)
    }
}

/// The rank folders (`mp_rank_*`) of an iteration folder, sorted.
fn rank_dirs(iter_dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(iter_dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("mp_rank_") && e.path().is_dir())
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// With pipeline stages, the distributed optimizer's flat layout of each stage sits in its rank
/// folder (each stage flattens its own parameters).
pub const STAGE_LAYOUT_FILE: &str = "optimizer_layout.json";

impl SavedState for Source {
    /// trainer_state.json of a training iteration.
    fn trainer_state(&self) -> Result<Option<TrainerState>, CheckpointError> {
        let Some(iter_dir) = self.engine_dir() else { return Ok(None) };
        let p = iter_dir.join(STATE_FILE);
        if !p.exists() {
            return Ok(None);
        }
        let text = fs::read_to_string(&p).map_err(io(&p))?;
        serde_json::from_str(&text).map(Some).map_err(|e| format_err(&p, format!("not a trainer state: {e}")))
    }

    /// The optimizer tensors, keyed as saved (`exp_avg.<mm key>`, …), from the rank folders of
    /// tensor-parallel rank `tp_rank` (the pipeline stages each saved their own parameters').
    fn optimizer_tensors(
        &self,
        device: Device,
        tp_rank: usize,
    ) -> Result<Option<BTreeMap<String, Tensor>>, CheckpointError> {
        let Some(iter_dir) = self.engine_dir() else { return Ok(None) };
        let mut out = BTreeMap::new();
        let mut any = false;
        let prefix = format!("mp_rank_{tp_rank:02}");
        let mine = |d: &PathBuf| {
            let n = d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            n == prefix || n.starts_with(&format!("{prefix}_"))
        };
        for dir in rank_dirs(iter_dir).into_iter().filter(mine) {
            let p = dir.join(OPTIMIZER_FILE);
            if !p.exists() {
                continue;
            }
            any = true;
            let f = SafetensorsFile::open(&p)?;
            for k in f.entries.keys() {
                out.insert(k.clone(), f.read(k, device)?);
            }
        }
        Ok(any.then_some(out))
    }

    /// The optimizer state `state` describes, in whichever layout it was saved: the shard
    /// files of a distributed optimizer (opened, read lazily), or the per-parameter file.
    /// None when there is none (HF folder, --no-save-optim).
    fn saved_optimizer(&self, state: &TrainerState, rank: RankDir) -> Result<Option<SavedOptimizer>, CheckpointError> {
        let Some(iter_dir) = self.engine_dir() else { return Ok(None) };
        let (pp, rank_dir) = (rank.pp, iter_dir.join(rank.name()));
        let stage_layout = rank_dir.join(STAGE_LAYOUT_FILE);
        let (layout, layout_path) = match &state.optimizer_layout {
            Some(l) => (l.clone(), iter_dir.join(STATE_FILE)),
            None if stage_layout.exists() => {
                let text = fs::read_to_string(&stage_layout).map_err(io(&stage_layout))?;
                let l: FlatLayout = serde_json::from_str(&text)
                    .map_err(|e| format_err(&stage_layout, format!("not an optimizer layout: {e}")))?;
                (l, stage_layout)
            }
            None => return Ok(self.optimizer_tensors(Device::Cpu, rank.tp_rank)?.map(SavedOptimizer::PerParam)),
        };
        layout.validate().map_err(|e| format_err(&layout_path, format!("optimizer_layout: {e}")))?;
        let mut files = Vec::with_capacity(layout.dp);
        for r in 0..layout.dp {
            let p = rank_dir.join(optimizer_shard_file(r, layout.dp));
            if !p.exists() {
                return Err(format_err(
                    &p,
                    format!(
                        "missing: {} describes a distributed optimizer over {} ranks{}",
                        layout_path.display(),
                        layout.dp,
                        if pp > 1 || rank.tp_rank > 0 { " (resume with the layout it was saved with)" } else { "" }
                    ),
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
        Ok(Some(SavedOptimizer::Flat { layout, files }))
    }
}

fn fsync_dir(dir: &Path) -> Result<(), CheckpointError> {
    Ok(mm_spec::io::fsync_dir(dir).map_err(WeightsError::from)?)
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

/// The weights' format in a save (`--ckpt-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CkptFormat {
    /// mm-engine's own layout: safetensors shards and manifest.json (mm-convert's default).
    #[default]
    Mm,
    /// MindSpeed-MM's (Megatron's `--ckpt-format torch`): `model_optim_rng.pt` files.
    Torch,
}

/// Everything one save writes.
pub struct SaveRequest<'a> {
    pub format: CkptFormat,
    /// The layout the run trains with (tp 1; pp, vpp and the stage lists) and this rank's
    /// pipeline stage: each stage writes its own rank folder.
    pub layout: LayoutRequest,
    pub rank: RankDir,
    pub save_dir: &'a Path,
    pub iteration: u64,
    pub preset: &'a ModelPreset,
    /// Engine parameter name → tensor (all of this stage's variables).
    pub weights: &'a [(String, Tensor)],
    /// Optimizer tensors keyed by MM names (this stage's parameters), None with --no-save-optim.
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
    mm_spec::io::staging_path(&iteration_dir(save_dir, Iteration::Step(iteration)), tag)
}

/// Creates the save dir and an empty temporary folder, removing a stale one (each stage
/// creates its rank folder in it).
pub fn prepare(save_dir: &Path, tmp: &Path) -> Result<(), CheckpointError> {
    fs::create_dir_all(save_dir).map_err(io(save_dir))?;
    if tmp.exists() {
        fs::remove_dir_all(tmp).map_err(io(tmp))?;
    }
    fs::create_dir_all(tmp).map_err(io(tmp))
}

/// The folder of `rank` in `dir`, created.
pub fn stage_dir(dir: &Path, rank: RankDir) -> Result<PathBuf, CheckpointError> {
    let d = dir.join(rank.name());
    fs::create_dir_all(&d).map_err(io(&d))?;
    Ok(d)
}

/// Writes one DP rank's optimizer shard into its stage's rank folder of the temporary folder.
pub fn write_optimizer_shard(
    tmp: &Path,
    dir: RankDir,
    rank: usize,
    size: usize,
    tensors: &[(String, Tensor)],
) -> Result<PathBuf, CheckpointError> {
    let path = stage_dir(tmp, dir)?.join(optimizer_shard_file(rank, size));
    let cpu: Vec<(String, Tensor)> = tensors.iter().map(|(k, t)| (k.clone(), t.to_device(Device::Cpu))).collect();
    let meta = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("dp_rank".to_string(), rank.to_string()),
        ("dp_size".to_string(), size.to_string()),
    ]);
    st::write(&path, &cpu, &meta)?;
    Ok(path)
}

/// Writes the files one process writes for everyone (one process, or pipeline stage 0 of a
/// single-stage run): its stage's files, then the shared ones.
pub fn write_shared(tmp: &Path, req: &SaveRequest) -> Result<(), CheckpointError> {
    let dtype = write_stage(tmp, req)?;
    write_common(tmp, req, dtype)
}

/// The layout of a request.
fn resolve_layout(req: &SaveRequest) -> Result<MmLayout, CheckpointError> {
    MmLayout::resolve(req.preset, &req.layout).map_err(|e| format_err(req.save_dir, e.to_string()))
}

/// Writes this pipeline stage's weights (and per-parameter optimizer state) into its rank
/// folder; returns the weights' dtype.
pub fn write_stage(tmp: &Path, req: &SaveRequest) -> Result<Option<DType>, CheckpointError> {
    let layout = resolve_layout(req)?;
    let rank_dir = stage_dir(tmp, req.rank)?;
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let dtype = match req.format {
        CkptFormat::Mm => write_mm_weights(&rank_dir, req, &layout)?,
        CkptFormat::Torch => write_torch_weights(&rank_dir, req, &layout)?,
    };
    if let Some(opt) = &req.optimizer {
        let opt: Vec<(String, Tensor)> = opt.iter().map(|(k, t)| (k.clone(), t.to_device(Device::Cpu))).collect();
        st::write(&rank_dir.join(OPTIMIZER_FILE), &opt, &meta)?;
    }
    fsync_dir(&rank_dir)?;
    Ok(dtype)
}

/// Which optimizer files every rank folder of a save holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerFiles {
    None,
    /// `optimizer.safetensors` (per parameter).
    PerParam,
    /// One shard per data-parallel rank, and the stage's flat layout with several stages or
    /// tensor-parallel ranks.
    Sharded {
        dp: usize,
        layout_file: bool,
    },
}

/// The files of a save in the temporary folder `tmp` that are not there: per (tp rank,
/// pipeline stage) of `layout`, the weights and the optimizer files (empty: complete).
pub fn missing_rank_files(
    tmp: &Path,
    layout: &LayoutRequest,
    format: CkptFormat,
    optimizer: OptimizerFiles,
) -> Vec<String> {
    let pp = layout.pp.unwrap_or(1).max(1);
    let weights = match format {
        CkptFormat::Mm => ck::SHARD_FILE,
        CkptFormat::Torch => MINDSPEED_FILE,
    };
    let mut files = vec![weights.to_string()];
    match optimizer {
        OptimizerFiles::None => {}
        OptimizerFiles::PerParam => files.push(OPTIMIZER_FILE.to_string()),
        OptimizerFiles::Sharded { dp, layout_file } => {
            files.extend((0..dp).map(|r| optimizer_shard_file(r, dp)));
            if layout_file {
                files.push(STAGE_LAYOUT_FILE.to_string());
            }
        }
    }
    let mut out = Vec::new();
    for pp_rank in 0..pp {
        for tp_rank in 0..layout.tp.max(1) {
            for file in &files {
                let rel = format!("{}/{file}", RankDir { tp_rank, pp_rank, pp }.name());
                if !tmp.join(&rel).is_file() {
                    out.push(rel);
                }
            }
        }
    }
    out
}

/// Writes a distributed optimizer's flat layout of this stage beside its shards (pipeline
/// runs; one stage keeps it in trainer_state.json).
pub fn write_stage_layout(tmp: &Path, dir: RankDir, layout: &FlatLayout) -> Result<(), CheckpointError> {
    let path = stage_dir(tmp, dir)?.join(STAGE_LAYOUT_FILE);
    write_synced(&path, serde_json::to_string_pretty(layout).expect("json").as_bytes())?;
    Ok(())
}

/// Writes what the whole save shares: hf_assets (config.json of the architecture, tokenizer and
/// other small files), the manifest (MM format: every stage's tensors, in `dtype`) and the
/// trainer state.
pub fn write_common(tmp: &Path, req: &SaveRequest, dtype: Option<DType>) -> Result<(), CheckpointError> {
    let manifest = match req.format {
        CkptFormat::Mm => {
            let layout = resolve_layout(req)?;
            let plan = plan_checkpoint(req.preset, &layout).map_err(|e| format_err(req.save_dir, e.to_string()))?;
            let dt = dtype.unwrap_or(DType::F32);
            Some(Manifest::new(Iteration::Step(req.iteration), req.preset, &layout, &plan, |_| dt))
        }
        CkptFormat::Torch => None,
    };
    // hf_assets: config.json of the architecture, then tokenizer and other small files.
    let assets = tmp.join(HF_ASSETS_DIR);
    fs::create_dir_all(&assets).map_err(io(&assets))?;
    let mut names = vec![hf::CONFIG.to_string()];
    write_synced(
        &assets.join(hf::CONFIG),
        serde_json::to_string_pretty(&hf::config_json(req.preset, dtype)).expect("json").as_bytes(),
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

    if let Some(mut manifest) = manifest {
        manifest.hf_assets = names;
        write_synced(&tmp.join(MANIFEST_FILE), serde_json::to_string_pretty(&manifest).expect("json").as_bytes())?;
    }
    write_synced(&tmp.join(STATE_FILE), serde_json::to_string_pretty(req.state).expect("json").as_bytes())?;
    fsync_dir(tmp)?;
    Ok(())
}

/// This stage's weights in the MM layout (`model.safetensors`, stage-local keys, vocabulary
/// rows padded as Megatron does); returns their dtype.
fn write_mm_weights(rank_dir: &Path, req: &SaveRequest, layout: &MmLayout) -> Result<Option<DType>, CheckpointError> {
    let plan = plan_checkpoint(req.preset, layout).map_err(|e| format_err(req.save_dir, e.to_string()))?;
    let by_name: HashMap<&str, &Tensor> = req.weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut tensors = Vec::with_capacity(plan.len());
    let mut dtypes = Vec::with_capacity(plan.len());
    for t in plan.iter().filter(|t| t.pp_rank == req.rank.pp_rank) {
        let name = from_mm(&t.key).unwrap_or_default();
        let Some(w) = by_name.get(name.as_str()) else {
            return Err(format_err(req.save_dir, format!("the model has no parameter {name} for {}", t.key)));
        };
        let w = w.detach().to_device(Device::Cpu);
        let shard = t.shards.get(req.rank.tp_rank).unwrap_or(&t.shards[0]);
        let want: Vec<i64> = shard.shape.iter().map(|&d| d as i64).collect();
        let w = if w.size() != want {
            // Vocab-parallel rows padded with zeros up to the padded vocab size.
            let pad = Tensor::zeros([want[0] - w.size()[0], want[1]], (w.kind(), Device::Cpu));
            Tensor::cat(&[w, pad], 0)
        } else {
            w
        };
        dtypes.push(dtype_of_kind(w.kind()));
        tensors.push((t.local_key.clone(), w));
    }
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    st::write(&rank_dir.join(ck::SHARD_FILE), &tensors, &meta)?;
    Ok(dtypes.first().copied())
}

/// The weights as MindSpeed-MM's `model_optim_rng.pt` at tp 1, pp 1 (mm-spec's MindSpeed plan:
/// its names, the LLM's fused qkv and gate/up, no vocabulary padding), with the iteration as
/// Megatron's training saves record it; returns their dtype.
fn write_torch_weights(
    rank_dir: &Path,
    req: &SaveRequest,
    layout: &MmLayout,
) -> Result<Option<DType>, CheckpointError> {
    if req.preset.llm.tie_word_embeddings {
        return Err(format_err(
            req.save_dir,
            "--ckpt-format torch: the model ties its output layer to the embedding, which MindSpeed-MM's InternVL3 \
             layout cannot express (every InternVL3 size has its own output_layer); save with --ckpt-format mm",
        ));
    }
    let plan = plan_mindspeed(req.preset, layout).map_err(|e| format_err(req.save_dir, e.to_string()))?;
    if layout.tp > 1 {
        return Err(format_err(
            req.save_dir,
            "--ckpt-format torch with tensor parallelism: MindSpeed-MM splits the vocabulary, projector and ViT heads \
             differently from mm-engine's ranks; save with --ckpt-format mm and convert (`mm-convert mm-to-hf`, then \
             `hf-to-mm --format mindspeed`)",
        ));
    }
    let Some(file) = plan.files.iter().find(|f| f.tp_rank == 0 && f.pp_rank == req.rank.pp_rank) else {
        return Err(format_err(
            req.save_dir,
            format!("the layout plans no file for pipeline stage {}", req.rank.pp_rank),
        ));
    };
    let mine: std::collections::BTreeSet<usize> =
        file.chunks.iter().flat_map(|(_, ts)| ts.iter().flat_map(|t| t.pieces.iter().map(|p| p.0))).collect();
    let by_name: HashMap<&str, &Tensor> = req.weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut logical = Vec::with_capacity(plan.tensors.len());
    for (i, p) in plan.tensors.iter().enumerate() {
        if !mine.contains(&i) {
            // Another stage's tensor: never read here (a placeholder keeps the indices).
            logical.push(Tensor::zeros([0], (Kind::Float, Device::Cpu)));
            continue;
        }
        let name = from_mm(&p.tensor.key).unwrap_or_default();
        let Some(w) = by_name.get(name.as_str()) else {
            return Err(format_err(req.save_dir, format!("the model has no parameter {name} for {}", p.tensor.key)));
        };
        let rows = p.tensor.shape.first().copied().unwrap_or(1) as i64;
        logical.push(w.detach().to_device(Device::Cpu).reshape([rows, -1]));
    }
    let dtypes: Vec<DType> = logical.iter().map(|t| dtype_of_kind(t.kind())).collect();
    let path = rank_dir.join(MINDSPEED_FILE);
    let extra = vec![(Value::Str("iteration".into()), Value::Int(req.iteration as i64))];
    write_mindspeed_file(
        &path,
        file,
        |i| dtypes[i],
        extra,
        |w, t, i, piece| {
            let block = logical[i].narrow(0, piece.rows.start as i64, piece.rows.len() as i64).narrow(
                1,
                piece.cols.start as i64,
                piece.cols.len() as i64,
            );
            let bytes = st::tensor_bytes(&block).map_err(|e| format_err(&path, format!("{}: {e}", t.name)))?;
            w.write(&bytes).map_err(CheckpointError::from)
        },
    )?;
    Ok(mine.first().map(|&i| dtypes[i]))
}

fn dtype_of_kind(kind: Kind) -> DType {
    match kind {
        Kind::BFloat16 => DType::BF16,
        Kind::Half => DType::F16,
        _ => DType::F32,
    }
}

/// Fsyncs the temporary folder, renames it into place and points the tracker at it.
pub fn commit(save_dir: &Path, tmp: &Path, iteration: u64) -> Result<PathBuf, CheckpointError> {
    let it = Iteration::Step(iteration);
    for d in rank_dirs(tmp) {
        fsync_dir(&d)?;
    }
    fsync_dir(tmp)?;
    let final_dir = iteration_dir(save_dir, it);
    if let Some(note) = mm_spec::io::move_into_place(tmp, &final_dir).map_err(WeightsError::from)? {
        eprintln!("warning: {note}");
    }
    mm_spec::io::replace_file(&latest_path(save_dir), it.latest_text().as_bytes()).map_err(WeightsError::from)?;
    Ok(final_dir)
}

/// The MM key of an engine parameter name (for optimizer state keys).
pub fn mm_name(name: &str) -> String {
    to_mm(name).unwrap_or_else(|| name.to_string())
}
