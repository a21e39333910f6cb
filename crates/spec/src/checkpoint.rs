//! The MM checkpoint format: ONE definition shared by the converter (which writes it from HF
//! checkpoints and reads it back) and the engine (which loads and saves it).
//!
//! Owns the on-disk names, the logical tensor key table, the tensor-parallel split rules, the
//! pipeline placement of every tensor and the `manifest.json` types. Pure data and pure functions
//! (paths are joined, never opened), so the engine can reuse them without libtorch and the
//! converter without a model.
//!
//! ```text
//!   <save_dir>/latest_checkpointed_iteration.txt     "release" (converted) or "100" (trained)
//!   <save_dir>/release/  or  <save_dir>/iter_0000100/
//!       manifest.json                                 Manifest: architecture, layout, every tensor
//!       hf_assets/                                    config.json, tokenizer files (copied forward)
//!       mp_rank_{tp:02}_{pp:03}/model.safetensors     one per (tp rank, pp rank);
//!       mp_rank_{tp:02}/model.safetensors             ... spelled like this when pp == 1
//! ```
//!
//! Keys inside a shard file are *stage-local*: stage 2 of `6,8,8,6` holds LLM layers 14..22 as
//! `llm.layers.0` .. `llm.layers.7`. With virtual pipeline stages (`vpp`), a rank's file holds
//! all of its chunks and every key carries the chunk's vp stage as a `chunk{v}.` prefix
//! (`chunk1.llm.layers.0.mlp.up_proj.weight`); without vpp there is no prefix.
//!
//! Logical keys (whole model, global layer numbers) come from [`KEY_TABLE`]; each row says the
//! tensor's shape in architecture terms and how it is split over tp ([`SplitRule`]):
//!
//! - column-parallel (split rows of the `[out, in]` weight and its bias): LLM q/k/v by whole kv
//!   groups (each rank gets whole kv heads and the q heads that read them), gate/up, ViT fc1,
//!   projector linear_1;
//! - row-parallel (split columns; the bias is replicated): o_proj, down_proj, ViT attn proj and
//!   fc2, projector linear_2;
//! - qkv-grouped: the ViT's fused `[3C, C]` qkv; rank r holds `[q_r; k_r; v_r]` rows;
//! - vocab-parallel: embed_tokens and lm_head, padded with zero rows to a multiple of
//!   `make_vocab_size_divisible_by × tp` as Megatron does (the export drops the padding);
//! - replicated: norms, layer scales, embeddings of the ViT, biases of row-parallel layers and
//!   InternViT-6B's q_norm/k_norm (they normalize over the full width C, see [`QK_NORM_NOTE`]).
//!
//! Units that do not divide by tp follow the unaligned rule of [`crate::layout::tp_partition`]
//! (`--unaligned-linear`: the first `n % tp` ranks get one more).
//!
//! Placement over the pipeline (chunk `c = vp_stage·PP + pp_rank`, model order): transformer
//! layers by `llm_pp_layers` / `vit_pp_layers`; the ViT embeddings with ViT layer 0; the projector
//! with the last ViT layer (so with `24,0,0,0` it is on stage 0); `llm.embed_tokens` on chunk 0;
//! `llm.norm` and `llm.lm_head` on the last chunk (pp−1, last vp stage).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::layout::{
    layer_owner, split_layers, tp_partition, validate_model_layout, LayoutError, LayoutOptions, ParallelDims,
    StageLayers,
};
use crate::presets::{ModelPreset, NormType};

/// `format` field of every manifest.
pub const FORMAT_NAME: &str = "mm-checkpoint";
/// Bumped when a reader of the previous version would misread a checkpoint.
pub const FORMAT_VERSION: u32 = 1;
/// Megatron's pointer file in the save dir: the iteration number, or `release`.
pub const LATEST_FILE: &str = "latest_checkpointed_iteration.txt";
/// In the iteration folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// In each `mp_rank_*` folder.
pub const SHARD_FILE: &str = "model.safetensors";
/// In the iteration folder: config.json and tokenizer files of the source HF checkpoint. The
/// engine copies it into every iteration it saves so any iteration exports on its own.
pub const HF_ASSETS_DIR: &str = "hf_assets";
/// Upper bound on a model's parameter count (2^45, ~35 T): keeps all shard arithmetic far from
/// overflow whatever a config file says.
pub const MAX_PARAMS: u64 = 1 << 45;
/// Megatron's `--make-vocab-size-divisible-by` default.
pub const DEFAULT_VOCAB_DIVISOR: usize = 128;
/// Why q_norm/k_norm stay whole on every tp rank.
pub const QK_NORM_NOTE: &str = "replicated: InternViT-6B's q_norm/k_norm are RMSNorm over the full width C, applied \
     before heads are split, so with tp the engine needs the statistics over all ranks' heads";
/// What the padding rows of a vocab-parallel tensor are.
pub const VOCAB_NOTE: &str =
    "vocab-parallel: rows past vocab_size up to padded_vocab_size are zero padding, dropped on export";

/// Errors of the checkpoint-format functions. Lowercase; they say what was found, what was
/// expected and how to fix it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "{LATEST_FILE} holds {text:?}: expected an iteration number (e.g. \"5000\") or \"release\"; \
         fix the file or pass the iteration explicitly"
    )]
    BadLatest { text: String },

    #[error(
        "{key:?} is not a key of the MM checkpoint format: expected one of the KEY_TABLE templates \
         (vision.*, projector.*, llm.*; layer keys need a layer number below the model's depth)"
    )]
    UnknownKey { key: String },

    #[error("the parallel layout does not fit the model:\n  - {}", join_errors(.0))]
    Layout(Vec<LayoutError>),

    #[error(
        "the model has {params} parameters, more than the {MAX_PARAMS} this format handles: the config's sizes \
         are wrong (a misplaced digit?); fix config.json or the manifest's architecture"
    )]
    ImplausibleModel { params: u64 },

    #[error("{MANIFEST_FILE} describes an invalid model: {reason}; the manifest was edited by hand, convert again")]
    InvalidArchitecture { reason: String },

    #[error(
        "{MANIFEST_FILE} has format {found:?} version {version}: this build reads \
         {FORMAT_NAME:?} version {FORMAT_VERSION}; convert the checkpoint again with this mm-convert"
    )]
    UnsupportedManifest { found: String, version: u32 },

    #[error(
        "{MANIFEST_FILE} disagrees with the layout it declares: {what}: found {found}, expected \
         {expected}; the manifest was edited by hand or written by a different format version, \
         convert the checkpoint again"
    )]
    ManifestMismatch { what: String, found: String, expected: String },
}

fn join_errors(errors: &[LayoutError]) -> String {
    errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n  - ")
}

// ---------------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------------

/// Which saved state a folder holds: a converted checkpoint (`release`) or a training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Iteration {
    Release,
    Step(u64),
}

impl Iteration {
    /// Folder name inside the save dir: `release` or Megatron's `iter_{:07}`.
    pub fn dir_name(&self) -> String {
        match self {
            Iteration::Release => "release".to_string(),
            Iteration::Step(n) => format!("iter_{n:07}"),
        }
    }

    /// Parses the text of [`LATEST_FILE`] (surrounding whitespace ignored).
    pub fn parse_latest(text: &str) -> Result<Self, CheckpointError> {
        let t = text.trim();
        if t == "release" {
            return Ok(Iteration::Release);
        }
        t.parse::<u64>().map(Iteration::Step).map_err(|_| CheckpointError::BadLatest { text: text.to_string() })
    }

    /// What [`LATEST_FILE`] holds for this iteration (Megatron writes no newline).
    pub fn latest_text(&self) -> String {
        match self {
            Iteration::Release => "release".to_string(),
            Iteration::Step(n) => n.to_string(),
        }
    }
}

impl fmt::Display for Iteration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.latest_text())
    }
}

impl Serialize for Iteration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Iteration::Release => s.serialize_str("release"),
            Iteration::Step(n) => s.serialize_u64(*n),
        }
    }
}

impl<'de> Deserialize<'de> for Iteration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Step(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Step(n) => Ok(Iteration::Step(n)),
            Raw::Text(t) => Iteration::parse_latest(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// `<save_dir>/latest_checkpointed_iteration.txt`.
pub fn latest_path(save_dir: &Path) -> PathBuf {
    save_dir.join(LATEST_FILE)
}

/// `<save_dir>/release` or `<save_dir>/iter_0000100`.
pub fn iteration_dir(save_dir: &Path, iteration: Iteration) -> PathBuf {
    save_dir.join(iteration.dir_name())
}

/// Megatron's rank folder: `mp_rank_{tp:02}_{pp:03}`, or `mp_rank_{tp:02}` when pp is 1.
pub fn rank_dir_name(tp_rank: usize, pp_rank: usize, pp: usize) -> String {
    if pp == 1 {
        format!("mp_rank_{tp_rank:02}")
    } else {
        format!("mp_rank_{tp_rank:02}_{pp_rank:03}")
    }
}

/// Path of a shard file relative to the iteration folder, with `/` separators (as the manifest
/// records it).
pub fn shard_rel_path(tp_rank: usize, pp_rank: usize, pp: usize) -> String {
    format!("{}/{SHARD_FILE}", rank_dir_name(tp_rank, pp_rank, pp))
}

/// Key prefix of a vp stage's tensors inside a shard file: `chunk{v}.` with vpp, empty without.
pub fn chunk_prefix(vp_stage: usize, vpp: Option<usize>) -> String {
    match vpp {
        Some(_) => format!("chunk{vp_stage}."),
        None => String::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Dtypes and HF layouts
// ---------------------------------------------------------------------------------------------

/// The element types the engine trains and stores (safetensors spelling on disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    BF16,
    F16,
    F32,
}

impl DType {
    pub fn size_bytes(&self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    /// The safetensors header spelling ("BF16", "F16", "F32").
    pub fn safetensors_name(&self) -> &'static str {
        match self {
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F32 => "F32",
        }
    }

    /// The `torch_dtype` spelling of HF config files.
    pub fn torch_name(&self) -> &'static str {
        match self {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::F32 => "float32",
        }
    }

    /// Accepts the CLI, torch and safetensors spellings (`bf16`, `bfloat16`, `BF16`, `fp16`, …).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Some(DType::BF16),
            "fp16" | "f16" | "float16" | "half" => Some(DType::F16),
            "fp32" | "f32" | "float32" | "float" => Some(DType::F32),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// The HF key layouts an InternVL3 checkpoint comes in (key maps live in the converter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HfLayout {
    /// OpenGVLab's remote-code layout: `vision_model.*`, `mlp1.*`, `language_model.model.*`.
    Original,
    /// transformers-native, as saved on the hub: `vision_tower.*`, `multi_modal_projector.*`,
    /// `language_model.model.*`, `language_model.lm_head.weight`.
    Hf,
    /// transformers-native with the `model.` prefix of transformers ≥ 4.52's module tree:
    /// `model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`,
    /// `lm_head.weight`.
    HfPrefixed,
}

impl HfLayout {
    pub fn name(&self) -> &'static str {
        match self {
            HfLayout::Original => "original",
            HfLayout::Hf => "hf",
            HfLayout::HfPrefixed => "hf-prefixed",
        }
    }

    /// Whether the config.json schema is the transformers-native one (`text_config`).
    pub fn is_transformers_native(&self) -> bool {
        !matches!(self, HfLayout::Original)
    }
}

impl fmt::Display for HfLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------------------------
// The key table
// ---------------------------------------------------------------------------------------------

/// Which part of the model a tensor belongs to; decides its pipeline placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    VisionEmbeddings,
    VisionLayer,
    Projector,
    LlmEmbeddings,
    LlmLayer,
    LlmFinal,
}

impl Part {
    fn is_layer(&self) -> bool {
        matches!(self, Part::VisionLayer | Part::LlmLayer)
    }
}

/// A dimension in architecture terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dim {
    One,
    /// ViT width C.
    VitHidden,
    /// 3C, the fused qkv rows.
    VitQkv,
    /// ViT MLP width.
    VitMlp,
    /// Image channels (3).
    VitChannels,
    /// Patch side (14).
    VitPatch,
    /// Class token plus one per patch (1025 at 448/14).
    VitPositions,
    /// Projector input: C times the pixel-shuffle block (4C).
    ProjectorIn,
    /// LLM width H.
    LlmHidden,
    /// heads × head_dim (the q rows).
    LlmQ,
    /// kv heads × head_dim (the k and v rows).
    LlmKv,
    /// LLM MLP width.
    LlmMlp,
    /// Vocabulary size (unpadded).
    Vocab,
}

impl Dim {
    pub fn size(&self, arch: &ModelPreset) -> usize {
        let v = &arch.vision;
        let l = &arch.llm;
        match self {
            Dim::One => 1,
            Dim::VitHidden => v.hidden_size,
            Dim::VitQkv => v.hidden_size.saturating_mul(3),
            Dim::VitMlp => v.intermediate_size,
            Dim::VitChannels => v.num_channels,
            Dim::VitPatch => v.patch_size,
            Dim::VitPositions => v.seq_len(),
            Dim::ProjectorIn => arch.projector_in(),
            Dim::LlmHidden => l.hidden_size,
            Dim::LlmQ => l.num_attention_heads.saturating_mul(l.head_dim()),
            Dim::LlmKv => l.num_key_value_heads.saturating_mul(l.head_dim()),
            Dim::LlmMlp => l.intermediate_size,
            Dim::Vocab => l.vocab_size,
        }
    }
}

/// What a tp split must keep whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// One ViT head (head_dim rows of q, k or v; head_dim columns of proj).
    VitHeads,
    /// One column of the ViT MLP.
    VitMlp,
    /// One output column of the projector (LLM width).
    ProjectorOut,
    /// One LLM kv group as seen by q / o_proj: q_per_kv × head_dim.
    LlmQGroups,
    /// One LLM kv head as seen by k, v: head_dim.
    LlmKvHeads,
    /// One column of the LLM MLP.
    LlmMlp,
}

impl Unit {
    /// (number of units, elements per unit along the split dimension).
    pub fn count_and_size(&self, arch: &ModelPreset) -> (usize, usize) {
        let v = &arch.vision;
        let l = &arch.llm;
        match self {
            Unit::VitHeads => (v.num_attention_heads, v.head_dim()),
            Unit::VitMlp => (v.intermediate_size, 1),
            Unit::ProjectorOut => (l.hidden_size, 1),
            Unit::LlmQGroups => (l.num_key_value_heads, l.q_per_kv().saturating_mul(l.head_dim())),
            Unit::LlmKvHeads => (l.num_key_value_heads, l.head_dim()),
            Unit::LlmMlp => (l.intermediate_size, 1),
        }
    }
}

/// How a key's tensor is split over tp, in architecture terms ([`SplitKind`] has the numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SplitRule {
    Replicated,
    /// Split dim 0 (output rows of `[out, in]`, or the bias) by units.
    Column(Unit),
    /// Split dim 1 (input columns of `[out, in]`) by units.
    Row(Unit),
    /// Dim 0 padded to a multiple of `divisor × tp`, then split evenly.
    Vocab,
    /// The ViT's fused qkv rows: rank r gets `[q_r; k_r; v_r]` by head.
    QkvGrouped,
}

/// When a key exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cond {
    Always,
    /// `vision_config.qkv_bias` (InternViT-300M).
    VitQkvBias,
    /// `vision_config.qk_normalization` (InternViT-6B).
    VitQkNorm,
    /// LayerNorm ViT norms have a bias; RMSNorm ones do not.
    VitLayerNorm,
    /// `llm_config.tie_word_embeddings` is false (every InternVL3 size).
    UntiedLmHead,
}

impl Cond {
    pub fn holds(&self, arch: &ModelPreset) -> bool {
        match self {
            Cond::Always => true,
            Cond::VitQkvBias => arch.vision.qkv_bias,
            Cond::VitQkNorm => arch.vision.qk_normalization,
            Cond::VitLayerNorm => arch.vision.norm_type == NormType::LayerNorm,
            Cond::UntiedLmHead => !arch.llm.tie_word_embeddings,
        }
    }
}

/// One row of [`KEY_TABLE`]: a logical key template (`{N}` = global layer number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRow {
    pub template: &'static str,
    pub part: Part,
    pub shape: &'static [Dim],
    pub split: SplitRule,
    pub when: Cond,
    pub note: Option<&'static str>,
}

const fn row(template: &'static str, part: Part, shape: &'static [Dim], split: SplitRule, when: Cond) -> KeyRow {
    KeyRow { template, part, shape, split, when, note: None }
}

use Dim::*;
use SplitRule::{Column, QkvGrouped, Replicated, Row, Vocab as VocabSplit};

/// Every logical tensor of an InternVL3 model in the MM layout, in model order.
///
/// The MM names follow the original OpenGVLab layout for the ViT (so its key map is the
/// identity), name the projector's `mlp1.{0,1,3}` `norm`/`linear_1`/`linear_2`, and drop
/// the `language_model.model.` nesting of the LLM.
pub const KEY_TABLE: &[KeyRow] = &[
    row("vision.embeddings.class_embedding", Part::VisionEmbeddings, &[One, One, VitHidden], Replicated, Cond::Always),
    row(
        "vision.embeddings.position_embedding",
        Part::VisionEmbeddings,
        &[One, VitPositions, VitHidden],
        Replicated,
        Cond::Always,
    ),
    row(
        "vision.embeddings.patch_embedding.weight",
        Part::VisionEmbeddings,
        &[VitHidden, VitChannels, VitPatch, VitPatch],
        Replicated,
        Cond::Always,
    ),
    row("vision.embeddings.patch_embedding.bias", Part::VisionEmbeddings, &[VitHidden], Replicated, Cond::Always),
    row("vision.encoder.layers.{N}.norm1.weight", Part::VisionLayer, &[VitHidden], Replicated, Cond::Always),
    row("vision.encoder.layers.{N}.norm1.bias", Part::VisionLayer, &[VitHidden], Replicated, Cond::VitLayerNorm),
    row("vision.encoder.layers.{N}.attn.qkv.weight", Part::VisionLayer, &[VitQkv, VitHidden], QkvGrouped, Cond::Always),
    row("vision.encoder.layers.{N}.attn.qkv.bias", Part::VisionLayer, &[VitQkv], QkvGrouped, Cond::VitQkvBias),
    KeyRow {
        note: Some(QK_NORM_NOTE),
        ..row(
            "vision.encoder.layers.{N}.attn.q_norm.weight",
            Part::VisionLayer,
            &[VitHidden],
            Replicated,
            Cond::VitQkNorm,
        )
    },
    KeyRow {
        note: Some(QK_NORM_NOTE),
        ..row(
            "vision.encoder.layers.{N}.attn.k_norm.weight",
            Part::VisionLayer,
            &[VitHidden],
            Replicated,
            Cond::VitQkNorm,
        )
    },
    row(
        "vision.encoder.layers.{N}.attn.proj.weight",
        Part::VisionLayer,
        &[VitHidden, VitHidden],
        Row(Unit::VitHeads),
        Cond::Always,
    ),
    row("vision.encoder.layers.{N}.attn.proj.bias", Part::VisionLayer, &[VitHidden], Replicated, Cond::Always),
    row("vision.encoder.layers.{N}.ls1", Part::VisionLayer, &[VitHidden], Replicated, Cond::Always),
    row("vision.encoder.layers.{N}.norm2.weight", Part::VisionLayer, &[VitHidden], Replicated, Cond::Always),
    row("vision.encoder.layers.{N}.norm2.bias", Part::VisionLayer, &[VitHidden], Replicated, Cond::VitLayerNorm),
    row(
        "vision.encoder.layers.{N}.mlp.fc1.weight",
        Part::VisionLayer,
        &[VitMlp, VitHidden],
        Column(Unit::VitMlp),
        Cond::Always,
    ),
    row("vision.encoder.layers.{N}.mlp.fc1.bias", Part::VisionLayer, &[VitMlp], Column(Unit::VitMlp), Cond::Always),
    row(
        "vision.encoder.layers.{N}.mlp.fc2.weight",
        Part::VisionLayer,
        &[VitHidden, VitMlp],
        Row(Unit::VitMlp),
        Cond::Always,
    ),
    row("vision.encoder.layers.{N}.mlp.fc2.bias", Part::VisionLayer, &[VitHidden], Replicated, Cond::Always),
    row("vision.encoder.layers.{N}.ls2", Part::VisionLayer, &[VitHidden], Replicated, Cond::Always),
    row("projector.norm.weight", Part::Projector, &[ProjectorIn], Replicated, Cond::Always),
    row("projector.norm.bias", Part::Projector, &[ProjectorIn], Replicated, Cond::Always),
    row(
        "projector.linear_1.weight",
        Part::Projector,
        &[LlmHidden, ProjectorIn],
        Column(Unit::ProjectorOut),
        Cond::Always,
    ),
    row("projector.linear_1.bias", Part::Projector, &[LlmHidden], Column(Unit::ProjectorOut), Cond::Always),
    row("projector.linear_2.weight", Part::Projector, &[LlmHidden, LlmHidden], Row(Unit::ProjectorOut), Cond::Always),
    row("projector.linear_2.bias", Part::Projector, &[LlmHidden], Replicated, Cond::Always),
    KeyRow {
        note: Some(VOCAB_NOTE),
        ..row("llm.embed_tokens.weight", Part::LlmEmbeddings, &[Vocab, LlmHidden], VocabSplit, Cond::Always)
    },
    row("llm.layers.{N}.input_layernorm.weight", Part::LlmLayer, &[LlmHidden], Replicated, Cond::Always),
    row(
        "llm.layers.{N}.self_attn.q_proj.weight",
        Part::LlmLayer,
        &[LlmQ, LlmHidden],
        Column(Unit::LlmQGroups),
        Cond::Always,
    ),
    row("llm.layers.{N}.self_attn.q_proj.bias", Part::LlmLayer, &[LlmQ], Column(Unit::LlmQGroups), Cond::Always),
    row(
        "llm.layers.{N}.self_attn.k_proj.weight",
        Part::LlmLayer,
        &[LlmKv, LlmHidden],
        Column(Unit::LlmKvHeads),
        Cond::Always,
    ),
    row("llm.layers.{N}.self_attn.k_proj.bias", Part::LlmLayer, &[LlmKv], Column(Unit::LlmKvHeads), Cond::Always),
    row(
        "llm.layers.{N}.self_attn.v_proj.weight",
        Part::LlmLayer,
        &[LlmKv, LlmHidden],
        Column(Unit::LlmKvHeads),
        Cond::Always,
    ),
    row("llm.layers.{N}.self_attn.v_proj.bias", Part::LlmLayer, &[LlmKv], Column(Unit::LlmKvHeads), Cond::Always),
    row(
        "llm.layers.{N}.self_attn.o_proj.weight",
        Part::LlmLayer,
        &[LlmHidden, LlmQ],
        Row(Unit::LlmQGroups),
        Cond::Always,
    ),
    row("llm.layers.{N}.post_attention_layernorm.weight", Part::LlmLayer, &[LlmHidden], Replicated, Cond::Always),
    row(
        "llm.layers.{N}.mlp.gate_proj.weight",
        Part::LlmLayer,
        &[LlmMlp, LlmHidden],
        Column(Unit::LlmMlp),
        Cond::Always,
    ),
    row("llm.layers.{N}.mlp.up_proj.weight", Part::LlmLayer, &[LlmMlp, LlmHidden], Column(Unit::LlmMlp), Cond::Always),
    row("llm.layers.{N}.mlp.down_proj.weight", Part::LlmLayer, &[LlmHidden, LlmMlp], Row(Unit::LlmMlp), Cond::Always),
    row("llm.norm.weight", Part::LlmFinal, &[LlmHidden], Replicated, Cond::Always),
    KeyRow {
        note: Some(VOCAB_NOTE),
        ..row("llm.lm_head.weight", Part::LlmFinal, &[Vocab, LlmHidden], VocabSplit, Cond::UntiedLmHead)
    },
];

/// Fills `{N}` of a template.
pub fn fill_template(template: &str, layer: usize) -> String {
    template.replace("{N}", &layer.to_string())
}

/// Matches `key` against a template: `Some(None)` for a layer-less match, `Some(Some(n))` for a
/// layer key with number `n`.
pub fn match_template(template: &str, key: &str) -> Option<Option<usize>> {
    match template.split_once("{N}") {
        None => (template == key).then_some(None),
        Some((pre, post)) => {
            let digits = key.strip_prefix(pre)?.strip_suffix(post)?;
            if digits.is_empty()
                || !digits.bytes().all(|b| b.is_ascii_digit())
                || (digits.len() > 1 && digits.starts_with('0'))
            {
                return None;
            }
            digits.parse().ok().map(Some)
        }
    }
}

/// The table row and layer number of a logical key, if the key exists for `arch`.
pub fn lookup_key(key: &str, arch: &ModelPreset) -> Option<(&'static KeyRow, Option<usize>)> {
    KEY_TABLE.iter().filter(|r| r.when.holds(arch)).find_map(|r| {
        let layer = match_template(r.template, key)?;
        let depth = match r.part {
            Part::VisionLayer => arch.vision.num_hidden_layers,
            Part::LlmLayer => arch.llm.num_hidden_layers,
            _ => usize::MAX,
        };
        match layer {
            Some(n) if n >= depth => None,
            _ => Some((r, layer)),
        }
    })
}

/// One logical (whole-model, unsplit) tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalTensor {
    pub key: String,
    pub row: &'static KeyRow,
    /// Global layer number for layer tensors.
    pub layer: Option<usize>,
    pub shape: Vec<usize>,
}

/// Every logical tensor of `arch`, in model order (ViT embeddings, ViT layers, projector, LLM
/// embeddings, LLM layers, final norm, lm_head).
pub fn logical_tensors(arch: &ModelPreset) -> Vec<LogicalTensor> {
    let shape = |r: &KeyRow| r.shape.iter().map(|d| d.size(arch)).collect::<Vec<_>>();
    let mut out = Vec::new();
    let mut i = 0;
    while i < KEY_TABLE.len() {
        let part = KEY_TABLE[i].part;
        let end = KEY_TABLE[i..].iter().position(|r| r.part != part).map_or(KEY_TABLE.len(), |p| i + p);
        let rows = KEY_TABLE[i..end].iter().filter(|r| r.when.holds(arch));
        if part.is_layer() {
            let depth =
                if part == Part::VisionLayer { arch.vision.num_hidden_layers } else { arch.llm.num_hidden_layers };
            let rows: Vec<&'static KeyRow> = rows.collect();
            for layer in 0..depth {
                for r in &rows {
                    out.push(LogicalTensor {
                        key: fill_template(r.template, layer),
                        row: r,
                        layer: Some(layer),
                        shape: shape(r),
                    });
                }
            }
        } else {
            for r in rows {
                out.push(LogicalTensor { key: r.template.to_string(), row: r, layer: None, shape: shape(r) });
            }
        }
        i = end;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Split rules with numbers
// ---------------------------------------------------------------------------------------------

/// How one tensor is split over tp, with the numbers resolved (what the manifest records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SplitKind {
    /// Every tp rank holds the whole tensor.
    Replicated,
    /// Dim 0 split into `units` whole units of `unit_size` rows, contiguous per rank.
    Column { units: usize, unit_size: usize },
    /// Dim 1 split into `units` whole units of `unit_size` columns, contiguous per rank.
    Row { units: usize, unit_size: usize },
    /// Dim 0 padded with zero rows from `vocab_size` to `padded_vocab_size`, split evenly.
    Vocab { vocab_size: usize, padded_vocab_size: usize },
    /// Dim 0 is `[q; k; v]` of `heads` heads each; rank r holds `[q_r; k_r; v_r]`.
    QkvGrouped { heads: usize, head_dim: usize },
}

impl SplitKind {
    pub fn name(&self) -> &'static str {
        match self {
            SplitKind::Replicated => "replicated",
            SplitKind::Column { .. } => "column",
            SplitKind::Row { .. } => "row",
            SplitKind::Vocab { .. } => "vocab",
            SplitKind::QkvGrouped { .. } => "qkv-grouped",
        }
    }
}

/// A block of a logical tensor viewed as 2-D `[shape[0], product(shape[1..])]`.
///
/// A shard is its pieces stacked along dim 0 in order. Rows at or past `shape[0]` are zero
/// padding (vocab-parallel tensors only).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Piece {
    pub rows: Range<usize>,
    pub cols: Range<usize>,
}

/// One tp rank's part of a tensor.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Shard {
    pub pieces: Vec<Piece>,
    pub shape: Vec<usize>,
}

/// Megatron's padded vocabulary: `vocab` rounded up to a multiple of `divisor × tp`.
pub fn padded_vocab_size(vocab: usize, divisor: usize, tp: usize) -> usize {
    let m = divisor.max(1).saturating_mul(tp.max(1));
    vocab.div_ceil(m).saturating_mul(m)
}

/// The resolved split of a logical key (e.g. `llm.layers.3.self_attn.q_proj.weight`).
pub fn split_spec(
    logical_key: &str,
    arch: &ModelPreset,
    tp: usize,
    vocab_divisor: usize,
) -> Result<SplitKind, CheckpointError> {
    let (row, _) =
        lookup_key(logical_key, arch).ok_or_else(|| CheckpointError::UnknownKey { key: logical_key.into() })?;
    Ok(resolve_rule(row.split, arch, tp, vocab_divisor))
}

fn resolve_rule(rule: SplitRule, arch: &ModelPreset, tp: usize, vocab_divisor: usize) -> SplitKind {
    match rule {
        SplitRule::Replicated => SplitKind::Replicated,
        SplitRule::Column(u) => {
            let (units, unit_size) = u.count_and_size(arch);
            SplitKind::Column { units, unit_size }
        }
        SplitRule::Row(u) => {
            let (units, unit_size) = u.count_and_size(arch);
            SplitKind::Row { units, unit_size }
        }
        SplitRule::Vocab => SplitKind::Vocab {
            vocab_size: arch.llm.vocab_size,
            padded_vocab_size: padded_vocab_size(arch.llm.vocab_size, vocab_divisor, tp),
        },
        SplitRule::QkvGrouped => {
            SplitKind::QkvGrouped { heads: arch.vision.num_attention_heads, head_dim: arch.vision.head_dim() }
        }
    }
}

impl SplitKind {
    /// Each tp rank's shard of a tensor of logical `shape`, in rank order.
    pub fn shards(&self, shape: &[usize], tp: usize, unaligned: bool) -> Result<Vec<Shard>, LayoutError> {
        let rows = shape.first().copied().unwrap_or(1);
        let cols: usize = shape.iter().skip(1).product();
        let full_cols = 0..cols;
        let stacked = |pieces: Vec<Piece>| {
            let n: usize = pieces.iter().map(|p| p.rows.len()).sum();
            let mut s = shape.to_vec();
            if let Some(first) = s.first_mut() {
                *first = n;
            }
            Shard { pieces, shape: s }
        };
        match *self {
            SplitKind::Replicated => Ok((0..tp)
                .map(|_| Shard {
                    pieces: vec![Piece { rows: 0..rows, cols: full_cols.clone() }],
                    shape: shape.to_vec(),
                })
                .collect()),
            SplitKind::Column { units, unit_size } => Ok(tp_partition(units, tp, unaligned)?
                .into_iter()
                .map(|u| stacked(vec![Piece { rows: u.start * unit_size..u.end * unit_size, cols: full_cols.clone() }]))
                .collect()),
            SplitKind::Row { units, unit_size } => Ok(tp_partition(units, tp, unaligned)?
                .into_iter()
                .map(|u| {
                    let c = u.start * unit_size..u.end * unit_size;
                    let mut s = shape.to_vec();
                    if s.len() >= 2 {
                        s[1] = c.len();
                    }
                    Shard { pieces: vec![Piece { rows: 0..rows, cols: c }], shape: s }
                })
                .collect()),
            SplitKind::Vocab { padded_vocab_size, .. } => {
                let per = padded_vocab_size / tp.max(1);
                Ok((0..tp)
                    .map(|r| stacked(vec![Piece { rows: r * per..(r + 1) * per, cols: full_cols.clone() }]))
                    .collect())
            }
            SplitKind::QkvGrouped { heads, head_dim } => {
                let c = heads * head_dim;
                Ok(tp_partition(heads, tp, unaligned)?
                    .into_iter()
                    .map(|h| {
                        let pieces = (0..3)
                            .map(|j| Piece {
                                rows: j * c + h.start * head_dim..j * c + h.end * head_dim,
                                cols: full_cols.clone(),
                            })
                            .collect();
                        stacked(pieces)
                    })
                    .collect())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parallel layout and the plan
// ---------------------------------------------------------------------------------------------

/// The parallel layout a checkpoint is split for (the manifest's `parallel` object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmLayout {
    pub tp: usize,
    pub pp: usize,
    /// Virtual pipeline stages per pp rank (None: no interleaving).
    pub vpp: Option<usize>,
    /// LLM layers per chunk in model order (pp × vpp entries).
    pub llm_pp_layers: Vec<usize>,
    /// ViT layers per chunk in model order (pp × vpp entries).
    pub vit_pp_layers: Vec<usize>,
    /// MindSpeed's `--unaligned-linear`.
    pub unaligned_linear: bool,
    pub make_vocab_size_divisible_by: usize,
}

/// What the user asked for; [`MmLayout::resolve`] fills the gaps and checks it against a model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayoutRequest {
    pub tp: usize,
    /// Derived from the LLM list (`len / vpp`) when absent; 1 without lists.
    pub pp: Option<usize>,
    pub vpp: Option<usize>,
    /// Uniform split when absent.
    pub llm_pp_layers: Option<Vec<usize>>,
    /// Everything on the first chunk when absent (as the InternVL recipes do).
    pub vit_pp_layers: Option<Vec<usize>>,
    pub unaligned_linear: bool,
    /// [`DEFAULT_VOCAB_DIVISOR`] when absent.
    pub make_vocab_size_divisible_by: Option<usize>,
}

impl MmLayout {
    /// Validates `req` against `arch` with the layout module's rules (heads and MLP widths
    /// divisible by tp unless unaligned, lists of pp×vpp entries summing to the depths) and
    /// returns every problem at once.
    pub fn resolve(arch: &ModelPreset, req: &LayoutRequest) -> Result<MmLayout, CheckpointError> {
        let params = arch.param_counts().total;
        if params > MAX_PARAMS {
            return Err(CheckpointError::ImplausibleModel { params });
        }
        let v = req.vpp.unwrap_or(1).max(1);
        let pp = req
            .pp
            .or_else(|| req.llm_pp_layers.as_ref().map(|l| (l.len() / v).max(1)))
            .or_else(|| req.vit_pp_layers.as_ref().map(|l| (l.len() / v).max(1)))
            .unwrap_or(1);
        let world = req.tp.saturating_mul(pp).max(1);
        let dims = ParallelDims::new(world, req.tp, 1, pp, req.vpp).map_err(|e| CheckpointError::Layout(vec![e]))?;
        let chunks = pp * v;
        let vit_list = req
            .vit_pp_layers
            .clone()
            .unwrap_or_else(|| (0..chunks).map(|c| if c == 0 { arch.vision.num_hidden_layers } else { 0 }).collect());
        let opts = LayoutOptions {
            llm_pp_layers: req.llm_pp_layers.clone(),
            vit_pp_layers: Some(vit_list.clone()),
            unaligned_linear: req.unaligned_linear,
            ..LayoutOptions::default()
        };
        let mut errors = validate_model_layout(arch, &dims, &opts);
        if let Err(e) = tp_partition(arch.llm.hidden_size, req.tp, req.unaligned_linear) {
            errors.push(rename_units(e, "projector output columns (llm hidden_size)"));
        }
        if req.make_vocab_size_divisible_by == Some(0) {
            errors.push(LayoutError::Zero { name: "make_vocab_size_divisible_by".into() });
        }
        if !errors.is_empty() {
            return Err(CheckpointError::Layout(errors));
        }
        let llm_list = match &req.llm_pp_layers {
            Some(l) => l.clone(),
            None => split_layers(arch.llm.num_hidden_layers, pp, req.vpp, None)
                .map_err(|e| CheckpointError::Layout(vec![e]))?
                .iter()
                .map(|s| s.num_layers)
                .collect(),
        };
        Ok(MmLayout {
            tp: req.tp,
            pp,
            vpp: req.vpp,
            llm_pp_layers: llm_list,
            vit_pp_layers: vit_list,
            unaligned_linear: req.unaligned_linear,
            make_vocab_size_divisible_by: req.make_vocab_size_divisible_by.unwrap_or(DEFAULT_VOCAB_DIVISOR),
        })
    }

    /// Pipeline chunks (pp × vpp).
    pub fn chunks(&self) -> usize {
        self.pp * self.vpp.unwrap_or(1)
    }

    pub fn padded_vocab_size(&self, vocab: usize) -> usize {
        padded_vocab_size(vocab, self.make_vocab_size_divisible_by, self.tp)
    }

    /// Shard files of the layout in (pp rank, tp rank) order: `(tp_rank, pp_rank, rel path)`.
    pub fn files(&self) -> Vec<(usize, usize, String)> {
        (0..self.pp).flat_map(|p| (0..self.tp).map(move |t| (t, p, shard_rel_path(t, p, self.pp)))).collect()
    }

    fn stages(&self, arch: &ModelPreset) -> Result<(Vec<StageLayers>, Vec<StageLayers>), CheckpointError> {
        let vit = split_layers(arch.vision.num_hidden_layers, self.pp, self.vpp, Some(&self.vit_pp_layers));
        let llm = split_layers(arch.llm.num_hidden_layers, self.pp, self.vpp, Some(&self.llm_pp_layers));
        match (vit, llm) {
            (Ok(v), Ok(l)) => Ok((v, l)),
            (v, l) => Err(CheckpointError::Layout(v.err().into_iter().chain(l.err()).collect())),
        }
    }
}

fn rename_units(e: LayoutError, what: &str) -> LayoutError {
    match e {
        LayoutError::NotDivisibleByTp { n, tp, divisors, .. } => {
            LayoutError::NotDivisibleByTp { what: what.into(), n, tp, divisors }
        }
        LayoutError::TooFewForTp { n, tp, .. } => LayoutError::TooFewForTp { what: what.into(), n, tp },
        other => other,
    }
}

/// One tensor of a checkpoint plan: where it lives and how each tp rank's shard is cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTensor {
    pub key: String,
    pub part: Part,
    pub layer: Option<usize>,
    pub shape: Vec<usize>,
    pub split: SplitKind,
    pub note: Option<&'static str>,
    pub pp_rank: usize,
    pub vp_stage: usize,
    /// The key inside the shard file: stage-local layer number, `chunk{v}.` prefix with vpp.
    pub local_key: String,
    /// One per tp rank.
    pub shards: Vec<Shard>,
}

/// Every tensor of `arch` split for `layout`, in model order.
pub fn plan_checkpoint(arch: &ModelPreset, layout: &MmLayout) -> Result<Vec<PlannedTensor>, CheckpointError> {
    let (vit, llm) = layout.stages(arch)?;
    let pp = layout.pp;
    let chunk_of = |c: usize| (c % pp, c / pp);
    // Chunks holding ViT layer 0 and the last ViT layer (the first / last non-empty chunk).
    let first_vit = vit.iter().position(|s| s.num_layers > 0).unwrap_or(0);
    let last_vit = vit.iter().rposition(|s| s.num_layers > 0).unwrap_or(0);
    let last_chunk = layout.chunks() - 1;

    let mut out = Vec::new();
    for t in logical_tensors(arch) {
        let (pp_rank, vp_stage, local_layer) = match (t.row.part, t.layer) {
            (Part::VisionLayer, Some(n)) | (Part::LlmLayer, Some(n)) => {
                let stages = if t.row.part == Part::VisionLayer { &vit } else { &llm };
                let o = layer_owner(stages, n).ok_or_else(|| CheckpointError::UnknownKey { key: t.key.clone() })?;
                (o.pp_rank, o.vp_stage, Some(o.local_index))
            }
            (Part::VisionEmbeddings, _) => {
                let (p, v) = chunk_of(first_vit);
                (p, v, None)
            }
            (Part::Projector, _) => {
                let (p, v) = chunk_of(last_vit);
                (p, v, None)
            }
            (Part::LlmEmbeddings, _) => (0, 0, None),
            (Part::LlmFinal, _) => {
                let (p, v) = chunk_of(last_chunk);
                (p, v, None)
            }
            (_, None) => return Err(CheckpointError::UnknownKey { key: t.key.clone() }),
        };
        let split = resolve_rule(t.row.split, arch, layout.tp, layout.make_vocab_size_divisible_by);
        let shards = split
            .shards(&t.shape, layout.tp, layout.unaligned_linear)
            .map_err(|e| CheckpointError::Layout(vec![rename_units(e, &t.key)]))?;
        let local = match local_layer {
            Some(n) => fill_template(t.row.template, n),
            None => t.key.clone(),
        };
        out.push(PlannedTensor {
            local_key: format!("{}{local}", chunk_prefix(vp_stage, layout.vpp)),
            key: t.key,
            part: t.row.part,
            layer: t.layer,
            shape: t.shape,
            split,
            note: t.row.note,
            pp_rank,
            vp_stage,
            shards,
        });
    }
    Ok(out)
}

/// Indices into `plan` of the tensors stored in pp rank `pp_rank`'s files, in file order
/// (vp stage, then model order).
pub fn file_order(plan: &[PlannedTensor], pp_rank: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..plan.len()).filter(|&i| plan[i].pp_rank == pp_rank).collect();
    idx.sort_by_key(|&i| (plan[i].vp_stage, i));
    idx
}

// ---------------------------------------------------------------------------------------------
// The manifest
// ---------------------------------------------------------------------------------------------

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
    /// Files under [`HF_ASSETS_DIR`].
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
    use crate::presets::preset;

    fn req(tp: usize, llm: &[usize], vit: &[usize]) -> LayoutRequest {
        LayoutRequest {
            tp,
            llm_pp_layers: Some(llm.to_vec()),
            vit_pp_layers: Some(vit.to_vec()),
            ..LayoutRequest::default()
        }
    }

    /// tiny with the 8B's layer counts (28 LLM, 24 ViT layers) at tiny width.
    fn tiny_8b_depth() -> ModelPreset {
        let mut p = preset("tiny").unwrap();
        p.llm.num_hidden_layers = 28;
        p.vision.num_hidden_layers = 24;
        p
    }

    #[test]
    fn paths_follow_megatron() {
        assert_eq!(Iteration::Release.dir_name(), "release");
        assert_eq!(Iteration::Step(5000).dir_name(), "iter_0005000");
        assert_eq!(Iteration::parse_latest("release\n"), Ok(Iteration::Release));
        assert_eq!(Iteration::parse_latest(" 42 "), Ok(Iteration::Step(42)));
        let err = Iteration::parse_latest("latest").unwrap_err();
        assert!(err.to_string().contains("\"latest\""), "{err}");
        assert_eq!(rank_dir_name(3, 2, 4), "mp_rank_03_002");
        assert_eq!(rank_dir_name(7, 0, 1), "mp_rank_07");
        assert_eq!(shard_rel_path(0, 1, 2), "mp_rank_00_001/model.safetensors");
        let save = Path::new("/ckpt");
        assert_eq!(iteration_dir(save, Iteration::Step(7)), Path::new("/ckpt/iter_0000007"));
        assert_eq!(latest_path(save), Path::new("/ckpt/latest_checkpointed_iteration.txt"));
        assert_eq!(chunk_prefix(1, Some(2)), "chunk1.");
        assert_eq!(chunk_prefix(0, None), "");
        for it in [Iteration::Release, Iteration::Step(12)] {
            let json = serde_json::to_string(&it).unwrap();
            assert_eq!(serde_json::from_str::<Iteration>(&json).unwrap(), it);
            assert_eq!(Iteration::parse_latest(&it.latest_text()).unwrap(), it);
        }
    }

    #[test]
    fn dtype_spellings() {
        assert_eq!(DType::parse("bf16"), Some(DType::BF16));
        assert_eq!(DType::parse("BFloat16"), Some(DType::BF16));
        assert_eq!(DType::parse("fp16"), Some(DType::F16));
        assert_eq!(DType::parse("float32"), Some(DType::F32));
        assert_eq!(DType::parse("int8"), None);
        assert_eq!(serde_json::to_string(&DType::BF16).unwrap(), "\"BF16\"");
        assert_eq!(serde_json::to_string(&HfLayout::HfPrefixed).unwrap(), "\"hf-prefixed\"");
    }

    /// Contract: the full key set of a preset, as templates. Changing a name breaks every
    /// checkpoint on disk, so this list changes only together with FORMAT_VERSION.
    #[test]
    fn key_set_is_pinned() {
        let templates = |p: &ModelPreset| -> Vec<String> {
            let mut seen = Vec::new();
            for t in logical_tensors(p) {
                let tpl = t.row.template.to_string();
                if !seen.contains(&tpl) {
                    seen.push(tpl);
                }
            }
            seen
        };
        let vit_common = |qkv_bias: bool, qk_norm: bool, ln: bool| {
            let mut v = vec!["vision.encoder.layers.{N}.norm1.weight"];
            if ln {
                v.push("vision.encoder.layers.{N}.norm1.bias");
            }
            v.push("vision.encoder.layers.{N}.attn.qkv.weight");
            if qkv_bias {
                v.push("vision.encoder.layers.{N}.attn.qkv.bias");
            }
            if qk_norm {
                v.push("vision.encoder.layers.{N}.attn.q_norm.weight");
                v.push("vision.encoder.layers.{N}.attn.k_norm.weight");
            }
            v.extend([
                "vision.encoder.layers.{N}.attn.proj.weight",
                "vision.encoder.layers.{N}.attn.proj.bias",
                "vision.encoder.layers.{N}.ls1",
                "vision.encoder.layers.{N}.norm2.weight",
            ]);
            if ln {
                v.push("vision.encoder.layers.{N}.norm2.bias");
            }
            v.extend([
                "vision.encoder.layers.{N}.mlp.fc1.weight",
                "vision.encoder.layers.{N}.mlp.fc1.bias",
                "vision.encoder.layers.{N}.mlp.fc2.weight",
                "vision.encoder.layers.{N}.mlp.fc2.bias",
                "vision.encoder.layers.{N}.ls2",
            ]);
            v
        };
        let rest = [
            "projector.norm.weight",
            "projector.norm.bias",
            "projector.linear_1.weight",
            "projector.linear_1.bias",
            "projector.linear_2.weight",
            "projector.linear_2.bias",
            "llm.embed_tokens.weight",
            "llm.layers.{N}.input_layernorm.weight",
            "llm.layers.{N}.self_attn.q_proj.weight",
            "llm.layers.{N}.self_attn.q_proj.bias",
            "llm.layers.{N}.self_attn.k_proj.weight",
            "llm.layers.{N}.self_attn.k_proj.bias",
            "llm.layers.{N}.self_attn.v_proj.weight",
            "llm.layers.{N}.self_attn.v_proj.bias",
            "llm.layers.{N}.self_attn.o_proj.weight",
            "llm.layers.{N}.post_attention_layernorm.weight",
            "llm.layers.{N}.mlp.gate_proj.weight",
            "llm.layers.{N}.mlp.up_proj.weight",
            "llm.layers.{N}.mlp.down_proj.weight",
            "llm.norm.weight",
            "llm.lm_head.weight",
        ];
        let head = [
            "vision.embeddings.class_embedding",
            "vision.embeddings.position_embedding",
            "vision.embeddings.patch_embedding.weight",
            "vision.embeddings.patch_embedding.bias",
        ];
        for (name, qkv_bias, qk_norm, ln) in [("tiny", true, false, true), ("tiny6b", false, true, false)] {
            let p = preset(name).unwrap();
            let expected: Vec<String> =
                head.iter().copied().chain(vit_common(qkv_bias, qk_norm, ln)).chain(rest).map(String::from).collect();
            assert_eq!(templates(&p), expected, "{name}");
        }
        // tiny: 4 embeddings + 2 × 14 ViT + 6 projector + 1 + 2 × 12 LLM + 2.
        assert_eq!(logical_tensors(&preset("tiny").unwrap()).len(), 4 + 28 + 6 + 1 + 24 + 2);
        // The element count of the table equals the preset's independent parameter count.
        for name in ["tiny", "tiny6b", "8b", "78b"] {
            let p = preset(name).unwrap();
            let total: u64 = logical_tensors(&p).iter().map(|t| t.shape.iter().product::<usize>() as u64).sum();
            assert_eq!(total, p.param_counts().total, "{name}");
        }
    }

    #[test]
    fn shapes_of_the_8b() {
        let p = preset("8b").unwrap();
        let shape = |k: &str| logical_tensors(&p).into_iter().find(|t| t.key == k).unwrap().shape;
        assert_eq!(shape("vision.embeddings.position_embedding"), vec![1, 1025, 1024]);
        assert_eq!(shape("vision.embeddings.patch_embedding.weight"), vec![1024, 3, 14, 14]);
        assert_eq!(shape("vision.encoder.layers.23.attn.qkv.weight"), vec![3072, 1024]);
        assert_eq!(shape("projector.linear_1.weight"), vec![3584, 4096]);
        assert_eq!(shape("llm.layers.27.self_attn.k_proj.weight"), vec![512, 3584]);
        assert_eq!(shape("llm.layers.0.mlp.down_proj.weight"), vec![3584, 18944]);
        assert_eq!(shape("llm.lm_head.weight"), vec![151_674, 3584]);
    }

    #[test]
    fn key_lookup() {
        let p = preset("tiny").unwrap();
        assert_eq!(match_template("llm.layers.{N}.norm", "llm.layers.12.norm"), Some(Some(12)));
        assert_eq!(match_template("llm.layers.{N}.norm", "llm.layers.012.norm"), None);
        assert_eq!(match_template("llm.layers.{N}.norm", "llm.layers..norm"), None);
        assert_eq!(match_template("llm.norm.weight", "llm.norm.weight"), Some(None));
        assert!(lookup_key("llm.layers.1.mlp.up_proj.weight", &p).is_some());
        assert!(lookup_key("llm.layers.2.mlp.up_proj.weight", &p).is_none(), "tiny has 2 layers");
        assert!(lookup_key("vision.encoder.layers.0.attn.q_norm.weight", &p).is_none(), "300M has no qk norm");
        assert!(lookup_key("vision.encoder.layers.0.attn.q_norm.weight", &preset("tiny6b").unwrap()).is_some());
        assert_eq!(
            split_spec("llm.layers.0.self_attn.q_proj.weight", &p, 2, 128),
            Ok(SplitKind::Column { units: 2, unit_size: 32 })
        );
        assert_eq!(
            split_spec("llm.lm_head.weight", &p, 2, 128),
            Ok(SplitKind::Vocab { vocab_size: 512, padded_vocab_size: 512 })
        );
        assert!(matches!(split_spec("llm.foo", &p, 2, 128), Err(CheckpointError::UnknownKey { .. })));
    }

    #[test]
    fn gqa_column_split_keeps_groups() {
        // 8B: 28 q heads over 4 kv groups, head_dim 128, TP 2: rank 1 gets kv heads 2..4 and q heads 14..28.
        let p = preset("8b").unwrap();
        let q = split_spec("llm.layers.0.self_attn.q_proj.weight", &p, 2, 128).unwrap();
        let shards = q.shards(&[3584, 3584], 2, false).unwrap();
        assert_eq!(shards[1].pieces, vec![Piece { rows: 14 * 128..28 * 128, cols: 0..3584 }]);
        assert_eq!(shards[1].shape, vec![1792, 3584]);
        let k = split_spec("llm.layers.0.self_attn.k_proj.bias", &p, 2, 128).unwrap();
        let shards = k.shards(&[512], 2, false).unwrap();
        assert_eq!(shards[1].pieces, vec![Piece { rows: 256..512, cols: 0..1 }]);
        assert_eq!(shards[1].shape, vec![256]);
        let o = split_spec("llm.layers.0.self_attn.o_proj.weight", &p, 2, 128).unwrap();
        let shards = o.shards(&[3584, 3584], 2, false).unwrap();
        assert_eq!(shards[0].pieces, vec![Piece { rows: 0..3584, cols: 0..14 * 128 }]);
        assert_eq!(shards[0].shape, vec![3584, 1792]);
    }

    #[test]
    fn vit_6b_qkv_on_tp8_unaligned() {
        let p = preset("78b").unwrap();
        let qkv = split_spec("vision.encoder.layers.0.attn.qkv.weight", &p, 8, 128).unwrap();
        assert_eq!(qkv, SplitKind::QkvGrouped { heads: 25, head_dim: 128 });
        assert!(qkv.shards(&[9600, 3200], 8, false).is_err());
        let shards = qkv.shards(&[9600, 3200], 8, true).unwrap();
        // Rank 0 gets heads 0..4: q rows 0..512, k rows 3200..3712, v rows 6400..6912.
        let rows: Vec<_> = shards[0].pieces.iter().map(|p| p.rows.clone()).collect();
        assert_eq!(rows, vec![0..512, 3200..3712, 6400..6912]);
        assert_eq!(shards[0].shape, vec![1536, 3200]);
        // Rank 7 gets heads 22..25.
        assert_eq!(shards[7].pieces[2].rows, 6400 + 22 * 128..9600);
        assert_eq!(shards.iter().map(|s| s.shape[0]).sum::<usize>(), 9600);
        let proj = split_spec("vision.encoder.layers.0.attn.proj.weight", &p, 8, 128).unwrap();
        let shards = proj.shards(&[3200, 3200], 8, true).unwrap();
        assert_eq!(shards[0].shape, vec![3200, 512]);
        assert_eq!(shards[1].pieces[0].cols, 512..896);
        let qn = split_spec("vision.encoder.layers.0.attn.q_norm.weight", &p, 8, 128).unwrap();
        assert_eq!(qn, SplitKind::Replicated);
        assert_eq!(lookup_key("vision.encoder.layers.0.attn.q_norm.weight", &p).unwrap().0.note, Some(QK_NORM_NOTE));
    }

    #[test]
    fn vocab_padding_like_megatron() {
        assert_eq!(padded_vocab_size(151_674, 128, 8), 152_576);
        assert_eq!(padded_vocab_size(151_674, 128, 1), 151_680);
        assert_eq!(padded_vocab_size(512, 128, 2), 512);
        assert_eq!(padded_vocab_size(500, 128, 2), 512);
        let v = SplitKind::Vocab { vocab_size: 500, padded_vocab_size: 512 };
        let shards = v.shards(&[500, 64], 2, false).unwrap();
        assert_eq!(shards[1].pieces, vec![Piece { rows: 256..512, cols: 0..64 }]);
        assert_eq!(shards[1].shape, vec![256, 64]);
    }

    #[test]
    fn layout_resolution_and_errors() {
        let p = tiny_8b_depth();
        let l = MmLayout::resolve(&p, &req(1, &[6, 8, 8, 6], &[24, 0, 0, 0])).unwrap();
        assert_eq!((l.tp, l.pp, l.vpp), (1, 4, None));
        assert_eq!(l.make_vocab_size_divisible_by, 128);
        // Defaults: uniform LLM split, ViT on the first chunk.
        let l = MmLayout::resolve(&p, &LayoutRequest { tp: 2, pp: Some(2), ..Default::default() }).unwrap();
        assert_eq!(l.llm_pp_layers, vec![14, 14]);
        assert_eq!(l.vit_pp_layers, vec![24, 0]);

        let err = MmLayout::resolve(&p, &req(1, &[6, 8, 8, 5], &[24, 0, 0, 0])).unwrap_err();
        assert!(err.to_string().contains("llm_pp_layers sums to 27"), "{err}");
        let err = MmLayout::resolve(&p, &req(1, &[6, 8, 8, 6], &[24, 0, 0])).unwrap_err();
        assert!(err.to_string().contains("vit_pp_layers has 3 entries"), "{err}");
        // tiny: 2 kv heads cannot go over tp 4; 3 kv heads over tp 2 need unaligned.
        let err = MmLayout::resolve(&p, &req(4, &[14, 14], &[24, 0])).unwrap_err();
        assert!(err.to_string().contains("LLM key/value heads cannot be split over tp 4"), "{err}");
        let mut p3 = p.clone();
        p3.llm.num_attention_heads = 6;
        p3.llm.num_key_value_heads = 3;
        p3.llm.hidden_size = 96;
        let err = MmLayout::resolve(&p3, &req(2, &[14, 14], &[24, 0])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("3 LLM key/value heads are not divisible by tp 2"), "{msg}");
        assert!(msg.contains("unaligned_linear"), "{msg}");
        let mut r = req(2, &[14, 14], &[24, 0]);
        r.unaligned_linear = true;
        assert!(MmLayout::resolve(&p3, &r).is_ok());
        // VPP: the list has pp × vpp entries in model order.
        let mut r = req(1, &[7, 7, 7, 7], &[24, 0, 0, 0]);
        r.vpp = Some(2);
        let l = MmLayout::resolve(&p, &r).unwrap();
        assert_eq!((l.pp, l.chunks()), (2, 4));
        let mut r = req(1, &[7, 7, 7, 7], &[24, 0, 0, 0]);
        r.vpp = Some(1);
        assert!(MmLayout::resolve(&p, &r).unwrap_err().to_string().contains("vpp is 1"));
    }

    #[test]
    fn placement_6_8_8_6() {
        let p = tiny_8b_depth();
        let l = MmLayout::resolve(&p, &req(1, &[6, 8, 8, 6], &[24, 0, 0, 0])).unwrap();
        let plan = plan_checkpoint(&p, &l).unwrap();
        let get = |k: &str| plan.iter().find(|t| t.key == k).unwrap();
        let t = get("llm.layers.14.mlp.up_proj.weight");
        assert_eq!((t.pp_rank, t.local_key.as_str()), (2, "llm.layers.0.mlp.up_proj.weight"));
        let t = get("llm.layers.21.mlp.up_proj.weight");
        assert_eq!((t.pp_rank, t.local_key.as_str()), (2, "llm.layers.7.mlp.up_proj.weight"));
        assert_eq!(get("vision.encoder.layers.23.ls2").pp_rank, 0);
        assert_eq!(get("vision.embeddings.class_embedding").pp_rank, 0);
        assert_eq!(get("projector.linear_2.weight").pp_rank, 0);
        assert_eq!(get("llm.embed_tokens.weight").pp_rank, 0);
        assert_eq!(get("llm.norm.weight").pp_rank, 3);
        assert_eq!(get("llm.lm_head.weight").pp_rank, 3);
        // Each stage file holds exactly its layers, numbered from 0.
        let stage2: Vec<&str> = file_order(&plan, 2).iter().map(|&i| plan[i].local_key.as_str()).collect();
        assert_eq!(stage2.len(), 8 * 12);
        assert_eq!(stage2[0], "llm.layers.0.input_layernorm.weight");
        assert_eq!(*stage2.last().unwrap(), "llm.layers.7.mlp.down_proj.weight");

        // The projector follows the last ViT layer.
        let l = MmLayout::resolve(&p, &req(1, &[6, 8, 8, 6], &[12, 12, 0, 0])).unwrap();
        let plan = plan_checkpoint(&p, &l).unwrap();
        let get = |k: &str| plan.iter().find(|t| t.key == k).unwrap().clone();
        assert_eq!(get("projector.norm.weight").pp_rank, 1);
        assert_eq!(get("vision.embeddings.patch_embedding.weight").pp_rank, 0);
        assert_eq!(get("vision.encoder.layers.12.ls1").local_key, "vision.encoder.layers.0.ls1");
    }

    #[test]
    fn placement_with_vpp() {
        // MindSpeed's InternVL2-8B VPP example: pp 4, vpp 3, chunk-major lists.
        let p = tiny_8b_depth();
        let mut r = req(1, &[0, 0, 0, 1, 4, 4, 4, 4, 4, 4, 3, 0], &[6, 7, 7, 4, 0, 0, 0, 0, 0, 0, 0, 0]);
        r.vpp = Some(3);
        let l = MmLayout::resolve(&p, &r).unwrap();
        let plan = plan_checkpoint(&p, &l).unwrap();
        let get = |k: &str| plan.iter().find(|t| t.key == k).unwrap();
        // LLM layer 0 is on chunk 3 = (pp 3, vp 0).
        let t = get("llm.layers.0.self_attn.o_proj.weight");
        assert_eq!((t.pp_rank, t.vp_stage), (3, 0));
        assert_eq!(t.local_key, "chunk0.llm.layers.0.self_attn.o_proj.weight");
        // LLM layer 1 opens chunk 4 = (pp 0, vp 1).
        let t = get("llm.layers.1.self_attn.o_proj.weight");
        assert_eq!(
            (t.pp_rank, t.vp_stage, t.local_key.as_str()),
            (0, 1, "chunk1.llm.layers.0.self_attn.o_proj.weight")
        );
        // The projector sits with the last ViT layer (chunk 3), lm_head on chunk 11 = (pp 3, vp 2).
        assert_eq!((get("projector.norm.bias").pp_rank, get("projector.norm.bias").vp_stage), (3, 0));
        let t = get("llm.lm_head.weight");
        assert_eq!((t.pp_rank, t.vp_stage, t.local_key.as_str()), (3, 2, "chunk2.llm.lm_head.weight"));
        let t = get("llm.embed_tokens.weight");
        assert_eq!((t.pp_rank, t.vp_stage), (0, 0));
        // File order: vp stage first.
        let order = file_order(&plan, 0);
        let stages: Vec<usize> = order.iter().map(|&i| plan[i].vp_stage).collect();
        assert!(stages.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn every_shard_covers_the_tensor_once() {
        let mut p = preset("tiny6b").unwrap();
        p.vision.num_attention_heads = 25;
        p.vision.hidden_size = 50;
        p.vision.intermediate_size = 100;
        p.llm.vocab_size = 500;
        let mut r = req(8, &[1, 1], &[2, 0]);
        r.unaligned_linear = true;
        let mut p8 = p.clone();
        p8.llm.num_attention_heads = 16;
        p8.llm.num_key_value_heads = 8;
        p8.llm.hidden_size = 64;
        let l = MmLayout::resolve(&p8, &r).unwrap();
        for t in plan_checkpoint(&p8, &l).unwrap() {
            let rows = t.shape.first().copied().unwrap_or(1);
            let cols: usize = t.shape.iter().skip(1).product();
            let mut count = vec![0u8; rows.max(l.padded_vocab_size(500)) * cols.max(1)];
            for s in &t.shards {
                let n: usize = s.pieces.iter().map(|p| p.rows.len() * p.cols.len()).sum();
                assert_eq!(n, s.shape.iter().product::<usize>(), "{}", t.key);
                for piece in &s.pieces {
                    for r in piece.rows.clone() {
                        for c in piece.cols.clone() {
                            count[r * cols + c] += 1;
                        }
                    }
                }
            }
            let expect = if t.split == SplitKind::Replicated { 8 } else { 1 };
            assert!(count[..rows * cols].iter().all(|&c| c == expect), "{}", t.key);
        }
    }

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
