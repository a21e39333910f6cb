//! The logical key table: every tensor of an InternVL3 model under its MM name (whole model,
//! global layer numbers), its shape in architecture terms ([`Dim`]), when it exists ([`Cond`]),
//! which part of the model it belongs to ([`Part`]) and how tp splits it ([`SplitRule`], in units
//! of [`Unit`]). [`KEY_TABLE`] is the contract: renaming a key breaks every checkpoint on disk.
//! Also the template helpers (`{N}` = layer number) and [`logical_tensors`], the table expanded
//! for one model.

use serde::{Deserialize, Serialize};

use crate::presets::{ModelPreset, NormType};

/// Why q_norm/k_norm stay whole on every tp rank.
pub const QK_NORM_NOTE: &str = "replicated: InternViT-6B's q_norm/k_norm are RMSNorm over the full width C, applied \
     before heads are split, so with tp the engine needs the statistics over all ranks' heads";
/// What the padding rows of a vocab-parallel tensor are.
pub const VOCAB_NOTE: &str =
    "vocab-parallel: rows past vocab_size up to padded_vocab_size are zero padding, dropped on export";

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

/// How a key's tensor is split over tp, in architecture terms ([`SplitKind`](super::SplitKind) has the numbers).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{split_spec, CheckpointError, SplitKind};
    use crate::presets::preset;

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
}
