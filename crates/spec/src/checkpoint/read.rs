//! Locating a checkpoint folder and reading its architecture without reading weights: the one
//! detection the engine's `--load` and the launcher's `finetune MODEL` / `checkpoint.load`
//! checks share. In this order:
//! 1. a save folder with `latest_checkpointed_iteration.txt` (Megatron's tracker): its
//!    `release` or `iter_NNNNNNN` folder;
//! 2. an MM iteration folder itself (`manifest.json`);
//! 3. an HF folder (`config.json`, either schema; weights beside it).
//!
//! A save or iteration folder holding MindSpeed-MM's torch files instead of a manifest is
//! [`Located::MindSpeed`]: the converter reads it; the engine and the MindSpeed templates are
//! told which format they need.

use std::path::{Path, PathBuf};

use super::manifest::Manifest;
use super::names::{iteration_dir, latest_path, Iteration, LATEST_FILE, MANIFEST_FILE};
use crate::presets::ModelPreset;

/// A located checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum Located {
    Mm {
        iter_dir: PathBuf,
        manifest: Box<Manifest>,
    },
    Hf {
        dir: PathBuf,
    },
    /// MindSpeed-MM's Megatron torch files (`mp_rank_*/model_optim_rng.pt`, no manifest).
    MindSpeed {
        iter_dir: PathBuf,
    },
}

/// Whether `dir` holds MindSpeed-MM rank folders (`mp_rank_*/model_optim_rng.pt`).
pub fn has_mindspeed_files(dir: &Path) -> bool {
    std::fs::read_dir(dir).ok().is_some_and(|rd| {
        rd.flatten().any(|e| {
            e.file_name().to_string_lossy().starts_with("mp_rank_") && e.path().join(super::MINDSPEED_FILE).is_file()
        })
    })
}

/// Why a folder is not a readable checkpoint; names the file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LocateError {
    #[error("{}: {message}", path.display())]
    Unreadable { path: PathBuf, message: String },
    #[error(
        "{}: not a checkpoint: expected {LATEST_FILE} (a save dir), {MANIFEST_FILE} (an MM iteration folder) or \
         config.json with safetensors (an HF folder)",
        path.display()
    )]
    NotACheckpoint { path: PathBuf },
}

/// Finds what kind of checkpoint `path` is (see the module doc); reads the tracker and the
/// manifest, nothing else.
pub fn locate(path: &Path) -> Result<Located, LocateError> {
    let unreadable = |p: &Path, message: String| LocateError::Unreadable { path: p.to_path_buf(), message };
    let tracker = latest_path(path);
    let iter_dir = if tracker.exists() {
        let text = std::fs::read_to_string(&tracker).map_err(|e| unreadable(&tracker, e.to_string()))?;
        let it = Iteration::parse_latest(&text).map_err(|e| unreadable(&tracker, e.to_string()))?;
        Some(iteration_dir(path, it))
    } else if path.join(MANIFEST_FILE).exists() || has_mindspeed_files(path) {
        Some(path.to_path_buf())
    } else {
        None
    };
    if let Some(iter_dir) = iter_dir {
        if !iter_dir.join(MANIFEST_FILE).exists() && has_mindspeed_files(&iter_dir) {
            return Ok(Located::MindSpeed { iter_dir });
        }
        let mpath = iter_dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&mpath).map_err(|e| unreadable(&mpath, e.to_string()))?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|e| unreadable(&mpath, format!("not an MM manifest: {e}")))?;
        return Ok(Located::Mm { iter_dir, manifest: Box::new(manifest) });
    }
    if crate::hf::is_hf_folder(path) {
        return Ok(Located::Hf { dir: path.to_path_buf() });
    }
    if !path.is_dir() {
        let cwd = std::env::current_dir().map(|d| format!(" (relative to {})", d.display())).unwrap_or_default();
        return Err(unreadable(
            path,
            format!("no such folder{}", if path.is_relative() { cwd } else { String::new() }),
        ));
    }
    Err(LocateError::NotACheckpoint { path: path.to_path_buf() })
}

/// Which kind of folder [`read_architecture`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FolderKind {
    /// config.json + weights (HF, either layout).
    Hf,
    /// An MM save folder or iteration folder.
    Mm,
}

/// Reads the architecture of the checkpoint folder `dir`; the preset is named after the folder.
/// Errors name the file and what was expected.
pub fn read_architecture(dir: &Path) -> Result<(ModelPreset, FolderKind), String> {
    let located = locate(dir).map_err(|e| e.to_string())?;
    let kind = if matches!(located, Located::Hf { .. }) { FolderKind::Hf } else { FolderKind::Mm };
    Ok((located.architecture(&crate::hf::config::folder_name(dir))?, kind))
}

impl Located {
    /// The architecture the checkpoint declares (an HF folder's config.json, an MM manifest),
    /// named `name`; MindSpeed-MM's files declare none.
    pub fn architecture(&self, name: &str) -> Result<ModelPreset, String> {
        let arch = match self {
            Located::Hf { dir } => crate::hf::read_config(dir).map_err(|e| e.to_string())?.arch,
            Located::Mm { manifest, .. } => manifest.architecture.clone(),
            Located::MindSpeed { iter_dir } => {
                return Err(format!(
                    "{}: MindSpeed-MM's torch files carry no config.json, so the architecture is not known here",
                    iter_dir.display()
                ))
            }
        };
        Ok(ModelPreset { name: name.to_string(), ..arch })
    }
}

/// The fields that make two architectures different networks (tensor shapes, the tensor set,
/// the computation); epsilons, rope θ, the layer-scale init and the position limit are
/// numerics a checkpoint's own config decides, not a different model.
const STRUCTURAL: &[&str] = &[
    "vision_config.num_hidden_layers",
    "vision_config.hidden_size",
    "vision_config.num_attention_heads",
    "vision_config.intermediate_size",
    "vision_config.norm_type",
    "vision_config.qkv_bias",
    "vision_config.qk_normalization",
    "vision_config.image_size",
    "vision_config.patch_size",
    "vision_config.num_channels",
    "llm_config.num_hidden_layers",
    "llm_config.hidden_size",
    "llm_config.num_attention_heads",
    "llm_config.num_key_value_heads",
    "llm_config.intermediate_size",
    "llm_config.vocab_size",
    "llm_config.tie_word_embeddings",
    "downsample_ratio",
    "ps_version",
];

/// The structural fields in which `a` and `b` differ, as `key a → b`.
pub fn architecture_differences(a: &ModelPreset, b: &ModelPreset) -> Vec<String> {
    let (va, vb) = (serde_json::to_value(a).unwrap_or_default(), serde_json::to_value(b).unwrap_or_default());
    let at =
        |v: &serde_json::Value, key: &str| key.split('.').fold(v.clone(), |v, k| v.get(k).cloned().unwrap_or_default());
    STRUCTURAL
        .iter()
        .filter_map(|k| {
            let (x, y) = (at(&va, k), at(&vb, k));
            (x != y).then(|| format!("{k} {x} → {y}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{plan_checkpoint, DType, LayoutRequest, MmLayout};
    use crate::preset;

    #[test]
    fn reads_hf_and_mm_folders_and_names_what_differs() {
        let dir = std::env::temp_dir().join(format!("mm-spec-arch-{}", std::process::id()));
        let hf = dir.join("My-InternVL3");
        std::fs::create_dir_all(&hf).unwrap();
        let mut arch = preset("tiny").unwrap();
        arch.llm.num_hidden_layers = 3;
        let cfg = crate::hf::config_for_layout(&arch, None, super::super::HfLayout::Hf, None);
        std::fs::write(hf.join("config.json"), cfg.to_string()).unwrap();
        // config.json alone is not a checkpoint: weights belong beside it.
        assert!(matches!(locate(&hf), Err(LocateError::NotACheckpoint { .. })));
        crate::io::SafetensorsWriter::create(&hf.join("model.safetensors"), vec![], &[]).unwrap().finish().unwrap();
        let (read, kind) = read_architecture(&hf).unwrap();
        assert_eq!((read.name.as_str(), read.llm.num_hidden_layers, kind), ("My-InternVL3", 3, FolderKind::Hf));
        assert_eq!(architecture_differences(&preset("tiny").unwrap(), &read), ["llm_config.num_hidden_layers 2 → 3"]);
        let mut eps = read.clone();
        eps.llm.rms_norm_eps = 1e-5;
        assert!(architecture_differences(&read, &eps).is_empty(), "numerics are not another model");
        // An MM save folder: the tracker's iteration, its manifest's architecture.
        let save = dir.join("save");
        let layout = MmLayout::resolve(&arch, &LayoutRequest { tp: 1, ..LayoutRequest::default() }).unwrap();
        let plan = plan_checkpoint(&arch, &layout).unwrap();
        let manifest = Manifest::new(Iteration::Step(7), &arch, &layout, &plan, |_| DType::F32);
        std::fs::create_dir_all(save.join("iter_0000007")).unwrap();
        std::fs::write(save.join("iter_0000007/manifest.json"), serde_json::to_string(&manifest).unwrap()).unwrap();
        std::fs::write(save.join(LATEST_FILE), "7").unwrap();
        let (read, kind) = read_architecture(&save).unwrap();
        assert_eq!((read.name.as_str(), read.llm.num_hidden_layers, kind), ("save", 3, FolderKind::Mm));
        assert!(matches!(locate(&save).unwrap(), Located::Mm { iter_dir, .. } if iter_dir.ends_with("iter_0000007")));
        std::fs::write(save.join(LATEST_FILE), "seven").unwrap();
        assert!(read_architecture(&save).unwrap_err().contains("latest_checkpointed_iteration.txt"));
        let err = read_architecture(&dir).unwrap_err();
        assert!(err.contains("not a checkpoint: expected"), "{err}");
        let err = read_architecture(&dir.join("nothing")).unwrap_err();
        assert!(err.contains("nothing: no such folder"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
