//! Planning a checkpoint: [`MmLayout`] (the parallel layout it is split for, resolved and checked
//! from a [`LayoutRequest`] with the layout module's rules), [`plan_checkpoint`] (every tensor's
//! pp rank, vp stage, stage-local key and tp shards, in model order) and [`file_order`] (the
//! order tensors are stored in a pp rank's files).

use serde::{Deserialize, Serialize};

use super::error::CheckpointError;
use super::keys::{fill_template, logical_tensors, LogicalTensor, Part};
use super::names::{chunk_prefix, shard_rel_path};
use super::split::{padded_vocab_size, resolve_rule, Shard, SplitKind};
use crate::layout::{
    layer_owner, split_layers, tp_partition, validate_model_layout, vit_pp_layers_or_default, LayoutError,
    LayoutOptions, ParallelDims, StageLayers,
};
use crate::presets::ModelPreset;

/// Upper bound on a model's parameter count (2^45, ~35 T): keeps all shard arithmetic far from
/// overflow whatever a config file says.
pub const MAX_PARAMS: u64 = 1 << 45;
/// Megatron's `--make-vocab-size-divisible-by` default.
pub const DEFAULT_VOCAB_DIVISOR: usize = 128;

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
        let vit_list =
            vit_pp_layers_or_default(req.vit_pp_layers.as_deref(), arch.vision.num_hidden_layers, pp, req.vpp);
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

    pub(super) fn stages(&self, arch: &ModelPreset) -> Result<(Vec<StageLayers>, Vec<StageLayers>), CheckpointError> {
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

/// Where one logical tensor lives in a pipeline layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub tensor: LogicalTensor,
    pub pp_rank: usize,
    pub vp_stage: usize,
    /// Stage-local layer number for layer tensors.
    pub local_layer: Option<usize>,
}

/// Every logical tensor of `arch` placed on the pipeline of `layout`, in model order: layers by
/// the stage lists, the ViT embeddings with ViT layer 0, the projector with the last ViT layer,
/// the LLM's final norm and head on the last chunk and its embedding on chunk 0 (ours), or both
/// with the first and last chunks holding LLM layers (`embedding_with_first_llm_layer`:
/// Megatron's pre- and post-process stages as MindSpeed-MM places them). Both encodings share
/// everything else.
pub fn place_tensors(
    arch: &ModelPreset,
    layout: &MmLayout,
    embedding_with_first_llm_layer: bool,
) -> Result<Vec<Placed>, CheckpointError> {
    let (vit, llm) = layout.stages(arch)?;
    let pp = layout.pp;
    let chunk_of = |c: usize| (c % pp, c / pp);
    // Chunks holding ViT layer 0 and the last ViT layer (the first / last non-empty chunk).
    let first_vit = vit.iter().position(|s| s.num_layers > 0).unwrap_or(0);
    let last_vit = vit.iter().rposition(|s| s.num_layers > 0).unwrap_or(0);
    let first_llm =
        if embedding_with_first_llm_layer { llm.iter().position(|s| s.num_layers > 0).unwrap_or(0) } else { 0 };
    // MindSpeed-MM's post-process stage is the last one holding LLM layers; ours is the last chunk.
    let last_chunk = match embedding_with_first_llm_layer {
        true => llm.iter().rposition(|s| s.num_layers > 0).unwrap_or(layout.chunks() - 1),
        false => layout.chunks() - 1,
    };

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
            (Part::LlmEmbeddings, _) => {
                let (p, v) = chunk_of(first_llm);
                (p, v, None)
            }
            (Part::LlmFinal, _) => {
                let (p, v) = chunk_of(last_chunk);
                (p, v, None)
            }
            (_, None) => return Err(CheckpointError::UnknownKey { key: t.key.clone() }),
        };
        out.push(Placed { tensor: t, pp_rank, vp_stage, local_layer });
    }
    Ok(out)
}

/// Every tensor of `arch` split for `layout`, in model order.
pub fn plan_checkpoint(arch: &ModelPreset, layout: &MmLayout) -> Result<Vec<PlannedTensor>, CheckpointError> {
    let mut out = Vec::new();
    for Placed { tensor: t, pp_rank, vp_stage, local_layer } in place_tensors(arch, layout, false)? {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::testing::{req, tiny_8b_depth};
    use crate::presets::preset;

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
}
