//! Reading checkpoints: what `--load` (and `--auto-resume`'s save folder) accepts, in this
//! order of detection:
//! 1. a save dir with `latest_checkpointed_iteration.txt` (Megatron's tracker): its `release`
//!    (a converted checkpoint: weights only) or `iter_NNNNNNN` (a training state: weights,
//!    optimizer, data position, RNG seed);
//! 2. an iteration folder itself (it has `manifest.json`, or MindSpeed-MM's
//!    `mp_rank_*/model_optim_rng.pt`);
//! 3. an HF folder (config.json + safetensors, any key spelling `mm_spec::hf::keys` knows).
//!
//! MM checkpoints of any tp/pp split are merged on load with the manifest's split plan, so a
//! checkpoint converted for a cluster layout also loads here. MindSpeed-MM's torch files
//! (converted by `mm-convert … --format mindspeed`, trained by MindSpeed-MM, or saved by
//! mm-engine with `--ckpt-format torch`) are merged the same way with mm-spec's MindSpeed plan;
//! they carry no config.json, so the architecture and tokenizer come from the iteration's
//! `hf_assets/` (mm-engine's saves) or the `--tokenizer` folder (the HF folder they were
//! converted from). The engine's own files in an
//! iteration folder (optimizer state, `trainer_state.json`) are named here and read by
//! `train::checkpoint`, which also writes every save.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mm_spec::checkpoint::{
    shard_rel_path, Iteration, Located, Manifest, MindSpeedCheckpoint, MindSpeedError, SplitKind, HF_ASSETS_DIR,
    MANIFEST_FILE,
};
use mm_spec::hf::original_key as from_mm;
use mm_spec::DType;
use mm_spec::ModelPreset;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::hf::{self, HfCheckpoint, MismatchReport, WeightsError};
use super::safetensors::{self as st, SafetensorsFile};
use super::slices::{self, TpSlices};

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
    /// Not a `#[source]`: the message holds it already, so `{:#}` does not print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error(transparent)]
    Locate(#[from] mm_spec::checkpoint::LocateError),
    #[error(transparent)]
    MindSpeed(#[from] MindSpeedError),
}

impl From<torchfile::Error> for CheckpointError {
    fn from(e: torchfile::Error) -> Self {
        CheckpointError::MindSpeed(MindSpeedError::Torch(e))
    }
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |error| CheckpointError::Io { path: path.to_path_buf(), error }
}

pub(crate) fn format_err(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Format { path: path.to_path_buf(), reason: reason.into() }
}

/// What `--load` pointed at.
#[derive(Debug)]
pub enum Source {
    Hf {
        dir: PathBuf,
        ckpt: HfCheckpoint,
    },
    Mm {
        iter_dir: PathBuf,
        manifest: Box<Manifest>,
    },
    /// MindSpeed-MM's torch files; `assets` holds the config.json `arch` was read from.
    MindSpeed {
        ckpt: Box<MindSpeedCheckpoint>,
        assets: PathBuf,
        arch: Box<ModelPreset>,
    },
}

/// Detects the kind of checkpoint at `path` (mm-spec's one detection, see the module doc) and
/// opens it: an HF folder's weight headers are read, an MM manifest is already parsed, a
/// MindSpeed-MM folder's rank files are opened (their architecture read from its `hf_assets/`,
/// else from `assets_from`, the `--tokenizer` folder).
pub fn resolve(path: &Path, assets_from: Option<&Path>) -> Result<Source, CheckpointError> {
    match mm_spec::checkpoint::locate(path)? {
        Located::Mm { iter_dir, manifest } => Ok(Source::Mm { iter_dir, manifest }),
        Located::Hf { dir } => {
            let ckpt = HfCheckpoint::open(&dir)?;
            Ok(Source::Hf { dir, ckpt })
        }
        Located::MindSpeed { iter_dir } => {
            let own = iter_dir.join(HF_ASSETS_DIR);
            let assets = [Some(own.as_path()), assets_from]
                .into_iter()
                .flatten()
                .find(|d| d.join(hf::CONFIG).is_file())
                .map(Path::to_path_buf)
                .ok_or_else(|| {
                    format_err(
                        &iter_dir,
                        format!(
                            "holds MindSpeed-MM's torch files, which carry no config.json: pass {} <the HF folder \
                             it was converted from> (mm-engine reads the architecture and the tokenizer there){}",
                            crate::cli::spelled("--tokenizer", "--set checkpoint.tokenizer="),
                            assets_from.map(|d| format!("; {} has no {}", d.display(), hf::CONFIG)).unwrap_or_default()
                        ),
                    )
                })?;
            let name = mm_spec::hf::config::folder_name(&assets);
            let arch = hf::load_config(&assets, &name)?;
            let ckpt = MindSpeedCheckpoint::open(&iter_dir)?;
            Ok(Source::MindSpeed { ckpt: Box::new(ckpt), assets, arch: Box::new(arch) })
        }
    }
}

impl Source {
    /// The architecture the checkpoint declares.
    pub fn preset(&self, name: &str) -> Result<ModelPreset, CheckpointError> {
        match self {
            Source::Hf { dir, .. } => Ok(hf::load_config(dir, name)?),
            Source::Mm { manifest, .. } => Ok(manifest.architecture.clone()),
            Source::MindSpeed { arch, .. } => Ok(arch.as_ref().clone()),
        }
    }

    /// Whether the checkpoint has an untied lm_head (else the model ties it).
    pub fn has_lm_head(&self) -> bool {
        match self {
            Source::Hf { ckpt, .. } => ckpt.has("language_model.lm_head.weight"),
            Source::Mm { manifest, .. } => manifest.tensors.iter().any(|t| t.key == "llm.lm_head.weight"),
            // MindSpeed-MM's layout always has its own output_layer.
            Source::MindSpeed { .. } => true,
        }
    }

    /// The training iteration it holds (None for HF folders and converted `release` ones; None
    /// for MindSpeed-MM's own training saves too, whose optimizer and RNG state are Megatron's:
    /// their weights load as a fine-tune start, see [`Source::foreign_iteration`]).
    pub fn iteration(&self) -> Option<u64> {
        match self {
            Source::Mm { manifest, .. } => match manifest.iteration {
                Iteration::Step(n) => Some(n),
                Iteration::Release => None,
            },
            Source::MindSpeed { ckpt, .. } if ckpt.iter_dir.join(STATE_FILE).exists() => ckpt.saved_iteration,
            Source::Hf { .. } | Source::MindSpeed { .. } => None,
        }
    }

    /// The iteration of a MindSpeed-MM training save that mm-engine did not write (no
    /// trainer_state.json): only its weights are taken.
    pub fn foreign_iteration(&self) -> Option<u64> {
        match self {
            Source::MindSpeed { ckpt, .. } if !ckpt.iter_dir.join(STATE_FILE).exists() => ckpt.saved_iteration,
            _ => None,
        }
    }

    /// The iteration folder whose engine files (trainer_state.json, optimizer state) a resume
    /// reads: MM and MindSpeed-format saves; None for HF folders.
    pub fn engine_dir(&self) -> Option<&Path> {
        match self {
            Source::Mm { iter_dir, .. } => Some(iter_dir),
            Source::MindSpeed { ckpt, .. } => Some(&ckpt.iter_dir),
            Source::Hf { .. } => None,
        }
    }

    /// Where config.json and the tokenizer files are.
    pub fn assets_dir(&self) -> PathBuf {
        match self {
            Source::Hf { dir, .. } => dir.clone(),
            Source::Mm { iter_dir, .. } => iter_dir.join(HF_ASSETS_DIR),
            Source::MindSpeed { assets, .. } => assets.clone(),
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
            Source::MindSpeed { ckpt, assets, .. } => format!(
                "MindSpeed-MM checkpoint {} ({}tp {}, pp {}{}; config.json from {})",
                ckpt.iter_dir.display(),
                ckpt.saved_iteration.map(|n| format!("iteration {n}, ")).unwrap_or_default(),
                ckpt.tp,
                ckpt.pp,
                if ckpt.vpp > 1 { format!(", vpp {}", ckpt.vpp) } else { String::new() },
                assets.display()
            ),
        }
    }

    /// Copies the weights into the VarStore, after checking every key and shape. `stage`: the
    /// VarStore holds one pipeline stage, so the checkpoint's other tensors are not unexpected
    /// (each stage checks that its own are there, with their shapes).
    /// `slices`: the VarStore holds one tensor-parallel rank's slices of every split tensor.
    pub fn load_weights(&self, vs: &VarStore, stage: bool, slices: Option<&TpSlices>) -> Result<(), CheckpointError> {
        match self {
            Source::Hf { ckpt, .. } => {
                hf::load_into(vs, ckpt, stage, slices)?;
                Ok(())
            }
            Source::Mm { iter_dir, manifest } => load_mm(vs, iter_dir, manifest, stage, slices),
            Source::MindSpeed { ckpt, assets, arch } => {
                load_mindspeed(vs, ckpt, arch, &assets.join(hf::CONFIG), stage, slices)
            }
        }
    }
}

/// Matches the checkpoint's logical tensors (MM keys and shapes) to the VarStore's variables:
/// variable name → index of its tensor; everything that does not fit, reported at once.
fn match_variables<'a>(
    vars: &HashMap<String, Tensor>,
    dir: &Path,
    tensors: impl Iterator<Item = (&'a str, &'a [usize])>,
    stage: bool,
    slices: Option<&TpSlices>,
) -> Result<HashMap<String, usize>, CheckpointError> {
    let mut report = MismatchReport::default();
    let mut planned: HashMap<String, usize> = HashMap::new();
    for (i, (key, shape)) in tensors.enumerate() {
        match from_mm(key) {
            Some(name) if vars.contains_key(&name) => {
                let want = slices::full_shape(slices, &name, &vars[&name]);
                let have: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                if want != have {
                    report.misshaped.push((name.clone(), want, have));
                }
                planned.insert(name, i);
            }
            Some(_) if stage => {}
            _ => report.unexpected.push(key.to_string()),
        }
    }
    for name in vars.keys() {
        if !planned.contains_key(name) {
            report.missing.push(name.clone());
        }
    }
    report.missing.sort();
    if !report.is_empty() {
        return Err(WeightsError::Mismatch { dir: dir.to_path_buf(), report }.into());
    }
    Ok(planned)
}

/// Assembles every logical tensor from MindSpeed-MM's files (mm-spec's plan for the split the
/// files were written with) and copies it into the VarStore.
fn load_mindspeed(
    vs: &VarStore,
    ckpt: &MindSpeedCheckpoint,
    arch: &ModelPreset,
    config: &Path,
    stage: bool,
    slices: Option<&TpSlices>,
) -> Result<(), CheckpointError> {
    let (_, plan) = ckpt.plan(arch, config)?;
    let dtypes = ckpt.check(&plan)?;
    let vars = vs.variables();
    let planned = match_variables(
        &vars,
        &ckpt.iter_dir,
        plan.tensors.iter().map(|p| (p.tensor.key.as_str(), p.tensor.shape.as_slice())),
        stage,
        slices,
    )?;
    for (name, var) in &vars {
        let i = planned[name];
        let bytes = ckpt.assemble(&plan, i, dtypes[i])?;
        let kind = match dtypes[i] {
            DType::BF16 => Kind::BFloat16,
            DType::F16 => Kind::Half,
            DType::F32 => Kind::Float,
        };
        let key = &plan.tensors[i].tensor.key;
        let full_shape = slices::full_shape(slices, name, var);
        let data = Tensor::f_from_data_size(&bytes, &full_shape, kind)
            .map_err(|e| format_err(&ckpt.iter_dir, format!("tensor {key}: {e}")))?;
        let data = slices::local(slices, name, &data, var);
        let mut v = var.shallow_clone();
        tch::no_grad(|| v.f_copy_(&data.to_kind(var.kind())))
            .map_err(|e| format_err(&ckpt.iter_dir, format!("tensor {key}: {e}")))?;
    }
    Ok(())
}

/// Reassembles every logical tensor from its tp shards and copies it into the VarStore.
fn load_mm(
    vs: &VarStore,
    iter_dir: &Path,
    manifest: &Manifest,
    stage: bool,
    slices: Option<&TpSlices>,
) -> Result<(), CheckpointError> {
    let mpath = iter_dir.join(MANIFEST_FILE);
    let plan = manifest.verify().map_err(|e| format_err(&mpath, e.to_string()))?;
    let vars = vs.variables();
    let planned =
        match_variables(&vars, iter_dir, plan.iter().map(|t| (t.key.as_str(), t.shape.as_slice())), stage, slices)?;
    let mut files: HashMap<String, SafetensorsFile> = HashMap::new();
    let pp = manifest.parallel.pp;
    for (name, var) in &vars {
        let t = &plan[planned[name]];
        // The checkpoint was split like this run: this rank's shard is its tensor, read from
        // its own file only.
        if let Some(tp_rank) = slices.and_then(|s| s.same_shard(name, t)) {
            let rel = shard_rel_path(tp_rank, t.pp_rank, pp);
            if !files.contains_key(&rel) {
                files.insert(rel.clone(), SafetensorsFile::open(&iter_dir.join(&rel))?);
            }
            let data = files[&rel].read(&t.local_key, Device::Cpu)?;
            if data.size() != var.size() {
                return Err(format_err(
                    &iter_dir.join(&rel),
                    format!("tensor {:?}: shape {:?}, this rank's slice is {:?}", t.local_key, data.size(), var.size()),
                ));
            }
            let mut v = var.shallow_clone();
            tch::no_grad(|| v.f_copy_(&data.to_kind(var.kind())))
                .map_err(|e| format_err(iter_dir, format!("tensor {}: {e}", t.key)))?;
            continue;
        }
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
        let full = full.reshape(slices::full_shape(slices, name, var));
        let mut v = var.shallow_clone();
        tch::no_grad(|| v.f_copy_(&slices::local(slices, name, &full, var)))
            .map_err(|e| format_err(iter_dir, format!("tensor {}: {e}", t.key)))?;
    }
    Ok(())
}
