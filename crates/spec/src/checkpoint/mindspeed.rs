//! MindSpeed-MM's encoding of the same model: the Megatron torch checkpoint its converter
//! (`mm-convert InternVLConverter hf_to_mm`) writes and `pretrain_vlm.py --load` reads.
//!
//! ```text
//!   <dir>/latest_checkpointed_iteration.txt              "release" (converted) or "5000"
//!   <dir>/release/mp_rank_{tp:02}/model_optim_rng.pt      pp == 1
//!   <dir>/release/mp_rank_{tp:02}_{pp:03}/model_optim_rng.pt
//!       torch.save({'model': OrderedDict(name → tensor), 'checkpoint_version': 3.0})
//!       with vpp: {'model0': …, 'model1': …, 'checkpoint_version': 3.0}; chunk v of stage p
//!       holds the (v·PP + p)-th split
//! ```
//!
//! [`MINDSPEED_TABLE`] maps every logical key of [`super::KEY_TABLE`] to its MindSpeed name,
//! says which logical tensors fuse into one (the LLM's `linear_qkv` interleaves each key/value
//! group's query rows, then its key rows, then its value rows; `linear_fc1` is gate then up) and
//! how tp splits it here. The pipeline placement is ours ([`super::place_tensors`]) except
//! that the LLM embedding sits with the first LLM layer. [`plan_mindspeed`] expands the table
//! for a model and layout into every file's tensors, each an ordered list of pieces of logical
//! tensors, so a writer streams them from any source without knowing the rules.
//!
//! Where the splits differ from ours (both are encodings of one model, not one split plan):
//! the vocabulary is split unevenly and unpadded (rank r gets ⌊V/TP⌋ + (r < V mod TP) rows);
//! the projector is replicated; ViT heads are always split by the unaligned rule (25 heads on
//! 8 ranks: 4,3,3,3,3,3,3,3), everything else of the LLM and the ViT MLP must divide evenly.

use std::ops::Range;

use super::error::CheckpointError;
use super::keys::{fill_template, Unit};
use super::names::rank_dir_name;
use super::plan::{place_tensors, MmLayout, Placed};
use super::split::Piece;
use crate::layout::{tp_partition, LayoutError};
use crate::presets::ModelPreset;

/// The file name inside each rank folder.
pub const MINDSPEED_FILE: &str = "model_optim_rng.pt";
/// The `checkpoint_version` Megatron writes.
pub const CHECKPOINT_VERSION: f64 = 3.0;

/// Which fused MindSpeed tensor a logical tensor is part of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fuse {
    /// One logical tensor, renamed.
    Alone,
    /// The LLM's `linear_qkv`: 0 = q, 1 = k, 2 = v, interleaved per key/value group.
    LlmQkv(usize),
    /// The LLM's `linear_fc1`: 0 = gate, 1 = up, concatenated per tp rank.
    GateUp(usize),
}

/// How MindSpeed-MM splits a tensor over tp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsSplit {
    Replicated,
    /// Dim 0 by units; `uneven` allows the unaligned rule (ViT heads).
    Column(Unit, bool),
    /// Dim 1 by units.
    Row(Unit, bool),
    /// Dim 0 split unevenly, unpadded.
    Vocab,
    /// The ViT's fused `[q; k; v]` rows: rank r holds its heads' q, k and v rows.
    VitQkv,
}

/// One row: a logical key template, its MindSpeed name template (`{N}` = stage-local layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsRow {
    pub logical: &'static str,
    pub name: &'static str,
    pub fuse: Fuse,
    pub split: MsSplit,
}

const fn ms(logical: &'static str, name: &'static str, fuse: Fuse, split: MsSplit) -> MsRow {
    MsRow { logical, name, fuse, split }
}

use Fuse::{Alone, GateUp, LlmQkv};
use MsSplit::{Column, Replicated, Row, VitQkv, Vocab};

const VIT: &str = "image_encoder.encoder.encoder.layers.{N}.";
const LLM: &str = "text_decoder.decoder.layers.{N}.";

/// Every logical key's MindSpeed name, fusion and split (the contract: MindSpeed-MM's converter
/// and loader use these names; see `checkpoint/vlm_model/converters/internvl.py` there).
pub const MINDSPEED_TABLE: &[MsRow] = &[
    ms("vision.embeddings.class_embedding", "image_encoder.encoder.embeddings.class_embedding", Alone, Replicated),
    ms(
        "vision.embeddings.position_embedding",
        "image_encoder.encoder.embeddings.position_embedding",
        Alone,
        Replicated,
    ),
    ms(
        "vision.embeddings.patch_embedding.weight",
        "image_encoder.encoder.embeddings.patch_embedding.weight",
        Alone,
        Replicated,
    ),
    ms(
        "vision.embeddings.patch_embedding.bias",
        "image_encoder.encoder.embeddings.patch_embedding.bias",
        Alone,
        Replicated,
    ),
    ms("vision.encoder.layers.{N}.norm1.weight", "input_layernorm.weight", Alone, Replicated),
    ms("vision.encoder.layers.{N}.norm1.bias", "input_layernorm.bias", Alone, Replicated),
    ms("vision.encoder.layers.{N}.attn.qkv.weight", "self_attention.linear_qkv.weight", Alone, VitQkv),
    ms("vision.encoder.layers.{N}.attn.qkv.bias", "self_attention.linear_qkv.bias", Alone, VitQkv),
    ms("vision.encoder.layers.{N}.attn.q_norm.weight", "self_attention.q_layernorm.weight", Alone, Replicated),
    ms("vision.encoder.layers.{N}.attn.k_norm.weight", "self_attention.k_layernorm.weight", Alone, Replicated),
    ms(
        "vision.encoder.layers.{N}.attn.proj.weight",
        "self_attention.linear_proj.weight",
        Alone,
        Row(Unit::VitHeads, true),
    ),
    ms("vision.encoder.layers.{N}.attn.proj.bias", "self_attention.linear_proj.bias", Alone, Replicated),
    ms("vision.encoder.layers.{N}.ls1", "ls1", Alone, Replicated),
    ms("vision.encoder.layers.{N}.norm2.weight", "pre_mlp_layernorm.weight", Alone, Replicated),
    ms("vision.encoder.layers.{N}.norm2.bias", "pre_mlp_layernorm.bias", Alone, Replicated),
    ms("vision.encoder.layers.{N}.mlp.fc1.weight", "mlp.linear_fc1.weight", Alone, Column(Unit::VitMlp, false)),
    ms("vision.encoder.layers.{N}.mlp.fc1.bias", "mlp.linear_fc1.bias", Alone, Column(Unit::VitMlp, false)),
    ms("vision.encoder.layers.{N}.mlp.fc2.weight", "mlp.linear_fc2.weight", Alone, Row(Unit::VitMlp, false)),
    ms("vision.encoder.layers.{N}.mlp.fc2.bias", "mlp.linear_fc2.bias", Alone, Replicated),
    ms("vision.encoder.layers.{N}.ls2", "ls2", Alone, Replicated),
    ms("projector.norm.weight", "image_encoder.projector.norm.weight", Alone, Replicated),
    ms("projector.norm.bias", "image_encoder.projector.norm.bias", Alone, Replicated),
    ms("projector.linear_1.weight", "image_encoder.projector.linear_fc1.weight", Alone, Replicated),
    ms("projector.linear_1.bias", "image_encoder.projector.linear_fc1.bias", Alone, Replicated),
    ms("projector.linear_2.weight", "image_encoder.projector.linear_fc2.weight", Alone, Replicated),
    ms("projector.linear_2.bias", "image_encoder.projector.linear_fc2.bias", Alone, Replicated),
    ms("llm.embed_tokens.weight", "text_decoder.embedding.word_embeddings.weight", Alone, Vocab),
    ms("llm.layers.{N}.input_layernorm.weight", "input_layernorm.weight", Alone, Replicated),
    ms("llm.layers.{N}.self_attn.q_proj.weight", "self_attention.linear_qkv.weight", LlmQkv(0), Replicated),
    ms("llm.layers.{N}.self_attn.q_proj.bias", "self_attention.linear_qkv.bias", LlmQkv(0), Replicated),
    ms("llm.layers.{N}.self_attn.k_proj.weight", "self_attention.linear_qkv.weight", LlmQkv(1), Replicated),
    ms("llm.layers.{N}.self_attn.k_proj.bias", "self_attention.linear_qkv.bias", LlmQkv(1), Replicated),
    ms("llm.layers.{N}.self_attn.v_proj.weight", "self_attention.linear_qkv.weight", LlmQkv(2), Replicated),
    ms("llm.layers.{N}.self_attn.v_proj.bias", "self_attention.linear_qkv.bias", LlmQkv(2), Replicated),
    ms(
        "llm.layers.{N}.self_attn.o_proj.weight",
        "self_attention.linear_proj.weight",
        Alone,
        Row(Unit::LlmQGroups, false),
    ),
    ms("llm.layers.{N}.post_attention_layernorm.weight", "pre_mlp_layernorm.weight", Alone, Replicated),
    ms("llm.layers.{N}.mlp.gate_proj.weight", "mlp.linear_fc1.weight", GateUp(0), Replicated),
    ms("llm.layers.{N}.mlp.up_proj.weight", "mlp.linear_fc1.weight", GateUp(1), Replicated),
    ms("llm.layers.{N}.mlp.down_proj.weight", "mlp.linear_fc2.weight", Alone, Row(Unit::LlmMlp, false)),
    ms("llm.norm.weight", "text_decoder.decoder.final_layernorm.weight", Alone, Replicated),
    ms("llm.lm_head.weight", "text_decoder.output_layer.weight", Alone, Vocab),
];

/// The MindSpeed row of a logical key template.
pub fn mindspeed_row(logical_template: &str) -> Option<&'static MsRow> {
    MINDSPEED_TABLE.iter().find(|r| r.logical == logical_template)
}

/// The full MindSpeed name of a row for a stage-local layer.
fn full_name(row: &MsRow, local_layer: Option<usize>) -> String {
    let prefix = if row.logical.starts_with("vision.encoder.layers.") {
        VIT
    } else if row.logical.starts_with("llm.layers.") {
        LLM
    } else {
        ""
    };
    fill_template(&format!("{prefix}{}", row.name), local_layer.unwrap_or(0))
}

/// One tensor of a MindSpeed file: its name and shape, and the pieces of logical tensors
/// (index into the [`place_tensors`] list, block of its 2-D view) stacked along dim 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub pieces: Vec<(usize, Piece)>,
}

/// One `model_optim_rng.pt`: its rank folder, and per vp chunk (`model` or `model{v}`) the
/// tensors in model order.
#[derive(Debug, Clone, PartialEq)]
pub struct MsFile {
    pub tp_rank: usize,
    pub pp_rank: usize,
    /// `mp_rank_{tp:02}` or `mp_rank_{tp:02}_{pp:03}`.
    pub dir: String,
    pub chunks: Vec<(String, Vec<MsTensor>)>,
}

/// The plan of a MindSpeed-MM checkpoint: the placed logical tensors (what pieces index) and
/// every file.
#[derive(Debug, Clone, PartialEq)]
pub struct MsPlan {
    pub tensors: Vec<Placed>,
    pub files: Vec<MsFile>,
}

fn ranges(n: usize, tp: usize, uneven: bool, what: &str) -> Result<Vec<Range<usize>>, CheckpointError> {
    tp_partition(n, tp, uneven).map_err(|e| {
        let e = match e {
            LayoutError::NotDivisibleByTp { n, tp, divisors, .. } => {
                LayoutError::NotDivisibleByTp { what: what.into(), n, tp, divisors }
            }
            LayoutError::TooFewForTp { n, tp, .. } => LayoutError::TooFewForTp { what: what.into(), n, tp },
            other => other,
        };
        CheckpointError::Layout(vec![e])
    })
}

/// Expands [`MINDSPEED_TABLE`] for `arch` on `layout` (its tp, pp, vpp and stage lists; its
/// `unaligned_linear` and vocab divisor do not apply here).
pub fn plan_mindspeed(arch: &ModelPreset, layout: &MmLayout) -> Result<MsPlan, CheckpointError> {
    let tp = layout.tp;
    let tensors = place_tensors(arch, layout, true)?;
    let l = &arch.llm;
    let (kv, hd, qpk) = (l.num_key_value_heads, l.head_dim(), l.q_per_kv());
    let kv_groups = ranges(kv, tp, false, "LLM key/value heads")?;
    let vocab = ranges(l.vocab_size, tp, true, "vocabulary rows")?;

    let mut files = Vec::new();
    for pp_rank in 0..layout.pp {
        for tp_rank in 0..tp {
            let vpp = layout.vpp.unwrap_or(1);
            let mut chunks = Vec::with_capacity(vpp);
            for v in 0..vpp {
                let mut out: Vec<Building> = Vec::new();
                for (i, p) in tensors.iter().enumerate() {
                    if p.pp_rank != pp_rank || p.vp_stage != v {
                        continue;
                    }
                    let t = &p.tensor;
                    let row = mindspeed_row(t.row.template)
                        .ok_or_else(|| CheckpointError::UnknownKey { key: t.key.clone() })?;
                    let name = full_name(row, p.local_layer);
                    let rows = t.shape.first().copied().unwrap_or(1);
                    let cols: usize = t.shape.iter().skip(1).product();
                    let whole_cols = 0..cols;
                    let piece = |r: Range<usize>, c: Range<usize>| (i, Piece { rows: r, cols: c });
                    let pieces: Vec<(usize, Piece)> = match row.fuse {
                        Fuse::LlmQkv(part) => {
                            // Each group of this rank: its q rows (q_per_kv heads), its k row
                            // block, its v row block, in that order; parts are pushed into the
                            // fused tensor's slots below.
                            let per = if part == 0 { qpk * hd } else { hd };
                            kv_groups[tp_rank]
                                .clone()
                                .map(|g| piece(g * per..(g + 1) * per, whole_cols.clone()))
                                .collect()
                        }
                        Fuse::GateUp(_) => {
                            let r = ranges(l.intermediate_size, tp, false, "LLM MLP columns")?;
                            vec![piece(r[tp_rank].clone(), whole_cols.clone())]
                        }
                        Fuse::Alone => match row.split {
                            MsSplit::Replicated => vec![piece(0..rows, whole_cols.clone())],
                            MsSplit::Vocab => vec![piece(vocab[tp_rank].clone(), whole_cols.clone())],
                            MsSplit::Column(unit, uneven) => {
                                let (n, size) = unit.count_and_size(arch);
                                let r = &ranges(n, tp, uneven, &t.key)?[tp_rank];
                                vec![piece(r.start * size..r.end * size, whole_cols.clone())]
                            }
                            MsSplit::Row(unit, uneven) => {
                                let (n, size) = unit.count_and_size(arch);
                                let r = &ranges(n, tp, uneven, &t.key)?[tp_rank];
                                vec![piece(0..rows, r.start * size..r.end * size)]
                            }
                            MsSplit::VitQkv => {
                                let (heads, vhd) = (arch.vision.num_attention_heads, arch.vision.head_dim());
                                let r = &ranges(heads, tp, true, "ViT heads")?[tp_rank];
                                let c = heads * vhd;
                                (0..3)
                                    .map(|q| piece(q * c + r.start * vhd..q * c + r.end * vhd, whole_cols.clone()))
                                    .collect()
                            }
                        },
                    };
                    let part = match row.fuse {
                        Fuse::Alone => 0,
                        Fuse::LlmQkv(part) | Fuse::GateUp(part) => part,
                    };
                    let at = match out.iter().position(|b| b.name == name && row.fuse != Fuse::Alone) {
                        Some(at) => at,
                        None => {
                            let mut shape = t.shape.clone();
                            let n_cols = pieces.first().map_or(cols, |(_, p)| p.cols.len());
                            if shape.len() >= 2 && n_cols != cols {
                                shape[1] = n_cols;
                            }
                            out.push(Building { name, shape, fuse: row.fuse, parts: vec![Vec::new(); 3] });
                            out.len() - 1
                        }
                    };
                    out[at].parts[part] = pieces;
                }
                let key = if layout.vpp.is_some() { format!("model{v}") } else { "model".to_string() };
                chunks.push((key, out.into_iter().map(Building::finish).collect()));
            }
            files.push(MsFile { tp_rank, pp_rank, dir: rank_dir_name(tp_rank, pp_rank, layout.pp), chunks });
        }
    }
    Ok(MsPlan { tensors, files })
}

/// A tensor whose parts (q/k/v, gate/up, or just one) are being collected.
struct Building {
    name: String,
    shape: Vec<usize>,
    fuse: Fuse,
    parts: Vec<Vec<(usize, Piece)>>,
}

impl Building {
    /// Stacks the parts: the LLM qkv group by group (group j's q block, k block, v block), the
    /// others part after part.
    fn finish(self) -> MsTensor {
        let Building { name, mut shape, fuse, parts } = self;
        let pieces: Vec<(usize, Piece)> = match fuse {
            Fuse::LlmQkv(_) => {
                let groups = parts[0].len();
                (0..groups).flat_map(|j| parts.iter().filter_map(move |p| p.get(j).cloned())).collect()
            }
            _ => parts.into_iter().flatten().collect(),
        };
        shape[0] = pieces.iter().map(|(_, p)| p.rows.len()).sum();
        MsTensor { name, shape, pieces }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::checkpoint::{LayoutRequest, KEY_TABLE};
    use crate::presets::preset;

    fn layout(arch: &ModelPreset, tp: usize, llm: &[usize], vit: &[usize], vpp: Option<usize>) -> MmLayout {
        let req = LayoutRequest {
            tp,
            vpp,
            llm_pp_layers: Some(llm.to_vec()),
            vit_pp_layers: Some(vit.to_vec()),
            unaligned_linear: true,
            ..LayoutRequest::default()
        };
        MmLayout::resolve(arch, &req).unwrap()
    }

    #[test]
    fn every_logical_key_has_exactly_one_mindspeed_row() {
        for k in KEY_TABLE {
            assert_eq!(MINDSPEED_TABLE.iter().filter(|r| r.logical == k.template).count(), 1, "{}", k.template);
        }
        assert_eq!(MINDSPEED_TABLE.len(), KEY_TABLE.len());
    }

    #[test]
    fn names_fusions_and_placement_of_a_pp2_split() {
        let arch = preset("tiny").unwrap(); // ViT 2 layers, LLM 2 layers, 2 kv heads
        let plan = plan_mindspeed(&arch, &layout(&arch, 1, &[1, 1], &[2, 0], None)).unwrap();
        let names = |pp: usize| -> Vec<String> {
            plan.files[pp].chunks[0].1.iter().map(|t| t.name.clone()).collect::<Vec<_>>()
        };
        let first = names(0);
        assert_eq!(plan.files[0].dir, "mp_rank_00_000");
        assert_eq!(plan.files[0].chunks[0].0, "model");
        for n in [
            "image_encoder.encoder.embeddings.class_embedding",
            "image_encoder.encoder.encoder.layers.1.self_attention.linear_qkv.weight",
            "image_encoder.projector.linear_fc2.bias",
            "text_decoder.embedding.word_embeddings.weight",
            "text_decoder.decoder.layers.0.self_attention.linear_qkv.bias",
            "text_decoder.decoder.layers.0.mlp.linear_fc1.weight",
        ] {
            assert!(first.contains(&n.to_string()), "{n} not on stage 0: {first:?}");
        }
        let last = names(1);
        assert_eq!(
            last,
            [
                "text_decoder.decoder.layers.0.input_layernorm.weight",
                "text_decoder.decoder.layers.0.self_attention.linear_qkv.weight",
                "text_decoder.decoder.layers.0.self_attention.linear_qkv.bias",
                "text_decoder.decoder.layers.0.self_attention.linear_proj.weight",
                "text_decoder.decoder.layers.0.pre_mlp_layernorm.weight",
                "text_decoder.decoder.layers.0.mlp.linear_fc1.weight",
                "text_decoder.decoder.layers.0.mlp.linear_fc2.weight",
                "text_decoder.decoder.final_layernorm.weight",
                "text_decoder.output_layer.weight",
            ]
        );
        // qkv rows: per kv group, q rows (q_per_kv heads) then k then v.
        let qkv = &plan.files[1].chunks[0].1[1];
        let l = &arch.llm;
        let (hd, qpk) = (l.head_dim(), l.q_per_kv());
        assert_eq!(qkv.shape, vec![(qpk + 2) * hd * l.num_key_value_heads, l.hidden_size]);
        let keys: Vec<&str> = qkv.pieces.iter().map(|(i, _)| plan.tensors[*i].tensor.key.as_str()).collect();
        assert_eq!(
            &keys[..3],
            [
                "llm.layers.1.self_attn.q_proj.weight",
                "llm.layers.1.self_attn.k_proj.weight",
                "llm.layers.1.self_attn.v_proj.weight"
            ]
        );
        assert_eq!(qkv.pieces[3].1.rows, qpk * hd..2 * qpk * hd, "group 1's q rows");
    }

    /// Every logical tensor is covered exactly once by each tp rank's pieces when replicated,
    /// and exactly once across the ranks when split; the vocabulary uneven and unpadded; ViT
    /// heads 25 on 8 ranks as 4,3,…,3.
    #[test]
    fn pieces_cover_every_tensor_at_tp8_with_25_vit_heads() {
        let mut arch = preset("tiny6b").unwrap();
        arch.vision.num_attention_heads = 25;
        arch.vision.hidden_size = 25 * 8;
        arch.llm.vocab_size = 1001;
        arch.llm.num_key_value_heads = 8;
        arch.llm.num_attention_heads = 16;
        arch.llm.hidden_size = 16 * 8;
        let l = layout(&arch, 8, &[arch.llm.num_hidden_layers], &[arch.vision.num_hidden_layers], None);
        let plan = plan_mindspeed(&arch, &l).unwrap();
        let mut covered: BTreeMap<usize, usize> = BTreeMap::new();
        for f in &plan.files {
            for t in &f.chunks[0].1 {
                for (i, p) in &t.pieces {
                    *covered.entry(*i).or_default() += p.rows.len() * p.cols.len();
                }
            }
        }
        for (i, p) in plan.tensors.iter().enumerate() {
            let n: usize = p.tensor.shape.iter().product();
            let replicated = mindspeed_row(p.tensor.row.template).unwrap().split == MsSplit::Replicated
                && mindspeed_row(p.tensor.row.template).unwrap().fuse == Fuse::Alone;
            assert_eq!(covered[&i], if replicated { 8 * n } else { n }, "{}", p.tensor.key);
        }
        let emb = |r: usize| {
            plan.files[r].chunks[0].1.iter().find(|t| t.name.ends_with("word_embeddings.weight")).unwrap().shape[0]
        };
        assert_eq!((0..8).map(emb).collect::<Vec<_>>(), [126, 125, 125, 125, 125, 125, 125, 125]);
        let qkv0 =
            plan.files[0].chunks[0].1.iter().find(|t| t.name.ends_with("0.self_attention.linear_qkv.weight")).unwrap();
        assert_eq!(qkv0.shape[0], 3 * 4 * 8, "4 heads of 8 on rank 0");
    }

    #[test]
    fn llm_widths_must_divide_and_vpp_files_have_model0_model1() {
        let mut odd = preset("tiny").unwrap();
        (odd.llm.num_attention_heads, odd.llm.num_key_value_heads, odd.llm.hidden_size) = (6, 3, 96);
        let err = plan_mindspeed(&odd, &layout(&odd, 2, &[2], &[2], None)).unwrap_err();
        assert!(err.to_string().contains("LLM key/value heads"), "{err}");
        let arch = preset("tiny").unwrap();
        let plan = plan_mindspeed(&arch, &layout(&arch, 1, &[1, 0, 0, 1], &[2, 0, 0, 0], Some(2))).unwrap();
        assert_eq!(plan.files.len(), 2);
        let keys: Vec<&str> = plan.files[0].chunks.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["model0", "model1"]);
        // Chunk 0 of stage 0 holds the first split, chunk 1 of stage 1 the last (final norm).
        assert!(plan.files[1].chunks[1].1.iter().any(|t| t.name == "text_decoder.decoder.final_layernorm.weight"));
    }
}
