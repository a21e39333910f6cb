//! `manifest.json`: [`Manifest`] describes a checkpoint completely (format tag and version,
//! iteration, architecture, layout, [`SourceInfo`], every shard file as a [`FileEntry`] and every
//! logical tensor as a [`TensorEntry`]). [`Manifest::new`] builds it from a plan;
//! [`Manifest::verify`] checks one read from disk against the plan its architecture and layout
//! imply.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::dtype::DType;
use super::error::CheckpointError;
use super::hf_layout::HfLayout;
use super::names::{shard_rel_path, Iteration, FORMAT_NAME, FORMAT_VERSION};
use super::plan::{plan_checkpoint, LayoutRequest, MmLayout, PlannedTensor};
use super::split::SplitKind;
use crate::presets::ModelPreset;

/// Where a converted checkpoint came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    pub hf_dir: String,
    pub layout: HfLayout,
    pub files: usize,
    pub tensors: usize,
    pub bytes: u64,
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the iteration folder, `/`-separated.
    pub path: String,
    pub tp_rank: usize,
    pub pp_rank: usize,
    pub tensors: usize,
    /// Tensor bytes (without the safetensors header).
    pub bytes: u64,
}

/// One logical tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Logical key, global layer number.
    pub key: String,
    /// Full, unsplit, unpadded shape.
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub split: SplitKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub pp_rank: usize,
    pub vp_stage: usize,
    /// Key inside the shard files.
    pub local_key: String,
    /// One per tp rank.
    pub shard_shapes: Vec<Vec<usize>>,
    /// The shard files holding it, one per tp rank (replicated tensors: a copy in each).
    pub files: Vec<String>,
}

/// `manifest.json` of an iteration folder: describes the checkpoint completely.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub iteration: Iteration,
    pub architecture: ModelPreset,
    pub parallel: MmLayout,
    pub padded_vocab_size: usize,
    #[serde(default)]
    pub source: Option<SourceInfo>,
    /// The dtype the converter was asked for; None when every tensor kept its source dtype.
    #[serde(default)]
    pub dtype: Option<DType>,
    /// Files under [`HF_ASSETS_DIR`](super::HF_ASSETS_DIR).
    #[serde(default)]
    pub hf_assets: Vec<String>,
    pub files: Vec<FileEntry>,
    pub tensors: Vec<TensorEntry>,
}

impl Manifest {
    /// Builds the manifest of `plan`; `dtype_of(i)` is the stored dtype of `plan[i]`.
    pub fn new(
        iteration: Iteration,
        arch: &ModelPreset,
        layout: &MmLayout,
        plan: &[PlannedTensor],
        dtype_of: impl Fn(usize) -> DType,
    ) -> Manifest {
        let mut files: BTreeMap<(usize, usize), FileEntry> = layout
            .files()
            .into_iter()
            .map(|(t, p, path)| ((p, t), FileEntry { path, tp_rank: t, pp_rank: p, tensors: 0, bytes: 0 }))
            .collect();
        let tensors = plan
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let dtype = dtype_of(i);
                for (tp_rank, shard) in t.shards.iter().enumerate() {
                    if let Some(f) = files.get_mut(&(t.pp_rank, tp_rank)) {
                        f.tensors += 1;
                        let n: usize = shard.shape.iter().product();
                        f.bytes += (n * dtype.size_bytes()) as u64;
                    }
                }
                TensorEntry {
                    key: t.key.clone(),
                    shape: t.shape.clone(),
                    dtype,
                    split: t.split,
                    note: t.note.map(str::to_string),
                    pp_rank: t.pp_rank,
                    vp_stage: t.vp_stage,
                    local_key: t.local_key.clone(),
                    shard_shapes: t.shards.iter().map(|s| s.shape.clone()).collect(),
                    files: (0..layout.tp).map(|tp| shard_rel_path(tp, t.pp_rank, layout.pp)).collect(),
                }
            })
            .collect();
        Manifest {
            format: FORMAT_NAME.to_string(),
            format_version: FORMAT_VERSION,
            iteration,
            architecture: arch.clone(),
            parallel: layout.clone(),
            padded_vocab_size: layout.padded_vocab_size(arch.llm.vocab_size),
            source: None,
            dtype: None,
            hf_assets: Vec::new(),
            files: files.into_values().collect(),
            tensors,
        }
    }

    /// Checks the format version and that every entry matches the plan its architecture and
    /// layout imply; returns that plan (same order as `tensors`).
    pub fn verify(&self) -> Result<Vec<PlannedTensor>, CheckpointError> {
        if self.format != FORMAT_NAME || self.format_version != FORMAT_VERSION {
            return Err(CheckpointError::UnsupportedManifest {
                found: self.format.clone(),
                version: self.format_version,
            });
        }
        let mismatch = |what: String, found: String, expected: String| {
            Err(CheckpointError::ManifestMismatch { what, found, expected })
        };
        self.architecture.validate().map_err(|e| CheckpointError::InvalidArchitecture { reason: e.to_string() })?;
        // The layout must be one `resolve` accepts for this model (and resolve to itself).
        let p = &self.parallel;
        let req = LayoutRequest {
            tp: p.tp,
            pp: Some(p.pp),
            vpp: p.vpp,
            llm_pp_layers: Some(p.llm_pp_layers.clone()),
            vit_pp_layers: Some(p.vit_pp_layers.clone()),
            unaligned_linear: p.unaligned_linear,
            make_vocab_size_divisible_by: Some(p.make_vocab_size_divisible_by),
        };
        let resolved = MmLayout::resolve(&self.architecture, &req)?;
        if resolved != *p {
            return mismatch("parallel".into(), format!("{p:?}"), format!("{resolved:?}"));
        }
        let plan = plan_checkpoint(&self.architecture, &self.parallel)?;
        let expected = Manifest::new(self.iteration, &self.architecture, &self.parallel, &plan, |i| {
            self.tensors.get(i).map_or(DType::BF16, |t| t.dtype)
        });
        if self.tensors.len() != plan.len() {
            let have: std::collections::HashSet<&str> = self.tensors.iter().map(|t| t.key.as_str()).collect();
            let want: std::collections::HashSet<&str> = plan.iter().map(|t| t.key.as_str()).collect();
            let missing: Vec<&&str> = want.difference(&have).take(5).collect();
            let extra: Vec<&&str> = have.difference(&want).take(5).collect();
            return mismatch(
                "tensor count".into(),
                format!("{} (unexpected: {extra:?})", self.tensors.len()),
                format!("{} (missing: {missing:?})", plan.len()),
            );
        }
        if self.padded_vocab_size != expected.padded_vocab_size {
            return mismatch(
                "padded_vocab_size".into(),
                self.padded_vocab_size.to_string(),
                expected.padded_vocab_size.to_string(),
            );
        }
        for (have, want) in self.tensors.iter().zip(&expected.tensors) {
            if have.key != want.key {
                return mismatch("tensor order".into(), have.key.clone(), want.key.clone());
            }
            let fields = [
                ("shape", format!("{:?}", have.shape), format!("{:?}", want.shape)),
                ("split", format!("{:?}", have.split), format!("{:?}", want.split)),
                ("pp_rank", have.pp_rank.to_string(), want.pp_rank.to_string()),
                ("vp_stage", have.vp_stage.to_string(), want.vp_stage.to_string()),
                ("local_key", have.local_key.clone(), want.local_key.clone()),
                ("shard_shapes", format!("{:?}", have.shard_shapes), format!("{:?}", want.shard_shapes)),
                ("files", format!("{:?}", have.files), format!("{:?}", want.files)),
            ];
            for (field, found, exp) in fields {
                if found != exp {
                    return mismatch(format!("{} of {}", field, have.key), found, exp);
                }
            }
        }
        if self.files != expected.files {
            return mismatch(
                "files".into(),
                format!("{:?}", self.files.iter().map(|f| &f.path).collect::<Vec<_>>()),
                format!("{:?}", expected.files.iter().map(|f| &f.path).collect::<Vec<_>>()),
            );
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::testing::{req, tiny_8b_depth};

    #[test]
    fn manifest_round_trip_and_tamper_detection() {
        let p = tiny_8b_depth();
        let l = MmLayout::resolve(&p, &req(2, &[6, 8, 8, 6], &[24, 0, 0, 0])).unwrap();
        let plan = plan_checkpoint(&p, &l).unwrap();
        let mut m = Manifest::new(Iteration::Release, &p, &l, &plan, |_| DType::BF16);
        m.source =
            Some(SourceInfo { hf_dir: "raw".into(), layout: HfLayout::Original, files: 1, tensors: 3, bytes: 9 });
        assert_eq!(m.files.len(), 8);
        assert_eq!(m.files[1].path, "mp_rank_01_000/model.safetensors");
        let total: u64 = m.files.iter().map(|f| f.bytes).sum();
        assert!(total > 2 * p.param_counts().total, "replicas and vocab padding count: {total}");
        let json = serde_json::to_string_pretty(&m).unwrap();
        assert!(json.contains("\"kind\": \"qkv_grouped\""), "{json}");
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.verify().unwrap(), plan);

        let mut bad = m.clone();
        bad.tensors[5].local_key = "llm.layers.99.x".into();
        let err = bad.verify().unwrap_err();
        assert!(matches!(err, CheckpointError::ManifestMismatch { .. }), "{err}");
        let mut bad = m.clone();
        bad.tensors.pop();
        assert!(bad.verify().unwrap_err().to_string().contains("tensor count"));
        let mut bad = m.clone();
        bad.parallel.llm_pp_layers = vec![6, 8, 8, 7];
        assert!(bad.verify().unwrap_err().to_string().contains("llm_pp_layers sums to 29"));
        let mut bad = m.clone();
        bad.architecture.llm.num_attention_heads = 0;
        assert!(matches!(bad.verify(), Err(CheckpointError::InvalidArchitecture { .. })));
        let mut bad = m.clone();
        bad.parallel.pp = 0;
        assert!(bad.verify().is_err());
        let mut bad = m.clone();
        bad.architecture.llm.hidden_size = 1 << 40;
        bad.architecture.llm.num_attention_heads = 1 << 20;
        bad.architecture.llm.num_key_value_heads = 1 << 20;
        assert!(matches!(bad.verify(), Err(CheckpointError::ImplausibleModel { .. })), "{:?}", bad.verify());
        let mut bad = m.clone();
        bad.format_version = 99;
        assert!(matches!(bad.verify(), Err(CheckpointError::UnsupportedManifest { .. })));
    }
}
