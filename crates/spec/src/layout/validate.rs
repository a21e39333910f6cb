//! Model-vs-layout checks: does this preset fit these parallel sizes and options?
//!
//! [`validate_model_layout`] returns every problem at once, so `launch check` prints one table
//! instead of making the user fix errors one launch at a time. The rules are the ones MindSpeed-MM
//! and Megatron assert at start-up (heads divisible by tp unless unaligned, stage lists of
//! pp×vpp entries that sum to the depth, sequence-parallel and context-parallel divisibility,
//! global batch = micro batch × accumulation × dp), checked before any process starts.

use serde::{Deserialize, Serialize};

use super::batch::BatchSizes;
use super::dims::ParallelDims;
use super::error::LayoutError;
use super::pipeline::{split_layers_named, ListNames};
use super::tensor::{attention_partition, tp_partition_named};
use crate::presets::ModelPreset;

/// The run options that interact with the layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LayoutOptions {
    /// LLM layers per pipeline chunk in model order (pp × vpp entries), e.g. `6,8,8,6`.
    pub llm_pp_layers: Option<Vec<usize>>,
    /// ViT layers per pipeline chunk in model order, e.g. `24,0,0,0`.
    pub vit_pp_layers: Option<Vec<usize>>,
    pub seq_length: usize,
    pub sequence_parallel: bool,
    /// MindSpeed's `--unaligned-linear`: allow head/column counts that tp does not divide.
    pub unaligned_linear: bool,
    pub micro_batch_size: usize,
    pub global_batch_size: Option<usize>,
    pub grad_accumulation: Option<usize>,
}

impl Default for LayoutOptions {
    /// The seed recipe's values: seq 4096, micro batch 1, nothing else set.
    fn default() -> Self {
        LayoutOptions {
            llm_pp_layers: None,
            vit_pp_layers: None,
            seq_length: 4096,
            sequence_parallel: false,
            unaligned_linear: false,
            micro_batch_size: 1,
            global_batch_size: None,
            grad_accumulation: None,
        }
    }
}

const LLM_LIST: ListNames = ListNames { list: "llm_pp_layers", model: "the LLM", all_on_first: false };

const VIT_LIST: ListNames = ListNames { list: "vit_pp_layers", model: "the ViT", all_on_first: true };

/// Every way `preset` does not fit `dims` with `opts`; empty when the run can start.
pub fn validate_model_layout(preset: &ModelPreset, dims: &ParallelDims, opts: &LayoutOptions) -> Vec<LayoutError> {
    let mut errors = Vec::new();
    let tp = dims.tp();
    let unaligned = opts.unaligned_linear;
    let llm = &preset.llm;
    let vit = &preset.vision;

    // Tensor parallel: attention splits by kv group, MLPs by column.
    if let Err(e) = attention_partition(llm.num_attention_heads, llm.num_key_value_heads, tp, unaligned) {
        errors.push(rename_units(e, "LLM key/value heads", "LLM attention heads"));
    }
    if let Err(e) = attention_partition(vit.num_attention_heads, vit.num_attention_heads, tp, unaligned) {
        errors.push(rename_units(e, "ViT attention heads", "ViT attention heads"));
    }
    for (n, what) in [
        (llm.intermediate_size, "LLM MLP columns (intermediate_size)"),
        (vit.intermediate_size, "ViT MLP columns (intermediate_size)"),
    ] {
        if let Err(e) = tp_partition_named(n, tp, unaligned, what) {
            errors.push(e);
        }
    }

    // Pipeline: both stacks are split over the same pp × vpp chunks.
    for (depth, list, names) in [
        (llm.num_hidden_layers, &opts.llm_pp_layers, &LLM_LIST),
        (vit.num_hidden_layers, &opts.vit_pp_layers, &VIT_LIST),
    ] {
        if let Err(e) = split_layers_named(depth, dims.pp(), dims.vpp(), list.as_deref(), names) {
            errors.push(e);
        }
    }

    // Sequence: sequence parallel shards activations along the sequence over tp ranks; context
    // parallel cuts each sequence into 2·cp chunks (each rank takes one early and one late).
    if opts.seq_length == 0 {
        errors.push(LayoutError::Zero { name: "seq_length".into() });
    } else {
        if opts.sequence_parallel {
            if tp < 2 {
                errors.push(LayoutError::SequenceParallelNeedsTp { tp });
            } else if opts.seq_length % tp != 0 {
                errors.push(LayoutError::SeqNotDivisibleByTp {
                    seq_length: opts.seq_length,
                    tp,
                    suggestion: round_up(opts.seq_length, tp),
                });
            }
        }
        let cp = dims.cp();
        if cp > 1 && opts.seq_length % (2 * cp) != 0 {
            errors.push(LayoutError::SeqNotDivisibleByCp {
                seq_length: opts.seq_length,
                cp,
                multiple: 2 * cp,
                suggestion: round_up(opts.seq_length, 2 * cp),
            });
        }
    }

    // Batch: one optimizer step consumes micro batch × accumulation steps × dp samples.
    if let Err(e) = BatchSizes::derive(opts.micro_batch_size, opts.global_batch_size, opts.grad_accumulation, dims.dp())
    {
        errors.push(e);
    }

    errors
}

/// Names the units in a tensor-partition error after the tower they belong to.
fn rename_units(e: LayoutError, kv_name: &str, mha_name: &str) -> LayoutError {
    match e {
        LayoutError::NotDivisibleByTp { what, n, tp, divisors } => {
            LayoutError::NotDivisibleByTp { what: rename(&what, kv_name, mha_name), n, tp, divisors }
        }
        LayoutError::TooFewForTp { what, n, tp } => {
            LayoutError::TooFewForTp { what: rename(&what, kv_name, mha_name), n, tp }
        }
        other => other,
    }
}

fn rename(what: &str, kv_name: &str, mha_name: &str) -> String {
    if what == "key/value heads" {
        kv_name.to_string()
    } else {
        mha_name.to_string()
    }
}

/// The smallest multiple of `m` that is at least `n` (and at least `m`).
fn round_up(n: usize, m: usize) -> usize {
    if m == 0 {
        return n;
    }
    n.div_ceil(m).max(1).saturating_mul(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{layer_owner, tp_partition, GroupKind, Placement, StageLayers};
    use crate::presets::preset;

    fn opts(llm: &[usize], vit: &[usize]) -> LayoutOptions {
        LayoutOptions {
            llm_pp_layers: Some(llm.to_vec()),
            vit_pp_layers: Some(vit.to_vec()),
            ..LayoutOptions::default()
        }
    }

    /// MindSpeed-MM InternVL3-8B: 8 devices, TP1 PP4, llm 6,8,8,6, vit 24,0,0,0, GAS 64.
    #[test]
    fn seed_8b_layout() {
        let p = preset("8b").unwrap();
        let dims = ParallelDims::new(8, 1, 1, 4, None).unwrap();
        assert_eq!(dims.dp(), 2);
        assert_eq!(dims.groups(GroupKind::Pp), vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7]]);
        assert_eq!(dims.groups(GroupKind::Dp)[0], vec![0, 1]);

        let mut o = opts(&[6, 8, 8, 6], &[24, 0, 0, 0]);
        o.grad_accumulation = Some(64);
        o.global_batch_size = Some(128);
        assert_eq!(validate_model_layout(&p, &dims, &o), vec![]);

        let llm = dims.split_layers(28, o.llm_pp_layers.as_deref()).unwrap();
        assert_eq!(llm[2], StageLayers { pp_rank: 2, vp_stage: 0, first_layer: 14, num_layers: 8 });
        assert_eq!(llm[2].layers(), 14..22);
        let vit = dims.split_layers(24, o.vit_pp_layers.as_deref()).unwrap();
        assert_eq!(vit[0].layers(), 0..24);
        assert!(vit[1..].iter().all(|s| s.num_layers == 0));
        assert_eq!(layer_owner(&vit, 23).map(|o| o.pp_rank), Some(0));

        let placement = Placement::new(dims, &[8]).unwrap();
        assert_eq!(placement.ranks_on(0).len(), 8);
    }

    /// MindSpeed-MM InternVL3-78B: 2 nodes × 8, TP8 PP2, llm 40,40, vit 45,0, unaligned.
    #[test]
    fn seed_78b_layout() {
        let p = preset("78b").unwrap();
        let dims = ParallelDims::new(16, 8, 1, 2, None).unwrap();
        assert_eq!(dims.dp(), 1);
        let tp_groups = dims.groups(GroupKind::Tp);
        assert_eq!(tp_groups, vec![(0..8).collect::<Vec<_>>(), (8..16).collect::<Vec<_>>()]);
        let placement = Placement::new(dims, &[8, 8]).unwrap();
        for g in &tp_groups {
            let node = placement.place(g[0]).unwrap().node_rank;
            assert!(g.iter().all(|&r| placement.place(r).unwrap().node_rank == node));
        }
        let pp_groups = dims.groups(GroupKind::Pp);
        assert_eq!(pp_groups.len(), 8);
        for (i, g) in pp_groups.iter().enumerate() {
            assert_eq!(g, &vec![i, i + 8]);
        }

        let sizes: Vec<_> =
            tp_partition(p.vision.num_attention_heads, 8, true).unwrap().iter().map(|r| r.len()).collect();
        assert_eq!(sizes, vec![4, 3, 3, 3, 3, 3, 3, 3]);

        let mut o = opts(&[40, 40], &[45, 0]);
        o.unaligned_linear = true;
        o.sequence_parallel = true;
        assert_eq!(validate_model_layout(&p, &dims, &o), vec![]);

        o.unaligned_linear = false;
        let errors = validate_model_layout(&p, &dims, &o);
        assert_eq!(
            errors,
            vec![LayoutError::NotDivisibleByTp {
                what: "ViT attention heads".into(),
                n: 25,
                tp: 8,
                divisors: vec![1, 5, 25],
            }]
        );
        assert!(errors[0]
            .to_string()
            .starts_with("25 ViT attention heads are not divisible by tp 8: enable unaligned_linear"));
    }

    #[test]
    fn reports_every_problem_at_once() {
        let p = preset("8b").unwrap();
        let dims = ParallelDims::new(16, 8, 2, 1, None).unwrap();
        let o = LayoutOptions {
            llm_pp_layers: Some(vec![27]),
            vit_pp_layers: Some(vec![24, 0]),
            seq_length: 4098,
            sequence_parallel: true,
            unaligned_linear: false,
            micro_batch_size: 1,
            global_batch_size: Some(100),
            grad_accumulation: Some(64),
        };
        let errors = validate_model_layout(&p, &dims, &o);
        let kinds: Vec<String> =
            errors.iter().map(|e| format!("{e:?}").split([' ', '{']).next().unwrap().to_string()).collect();
        assert_eq!(
            kinds,
            vec![
                "TooFewForTp",     // 4 kv heads over tp 8
                "LayerListSum",    // 27 ≠ 28
                "LayerListLength", // 2 entries for pp 1
                "SeqNotDivisibleByTp",
                "SeqNotDivisibleByCp",
                "BatchMismatch", // 1×64×1 ≠ 100
            ],
            "{errors:#?}"
        );
        let msgs: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert!(msgs[0].starts_with("4 LLM key/value heads cannot be split over tp 8"), "{}", msgs[0]);
        assert_eq!(msgs[1], "llm_pp_layers sums to 27 but the LLM has 28 layers: make the list sum to 28, e.g. 28");
        assert!(msgs[2].contains("vit_pp_layers has 2 entries but pp×vpp = 1×1 = 1"), "{}", msgs[2]);
        assert!(msgs[3].contains("use a multiple of 8, e.g. 4104"), "{}", msgs[3]);
        assert!(msgs[4].contains("2×cp = 4"), "{}", msgs[4]);
        assert!(msgs[5].contains("1×64×1 = 64"), "{}", msgs[5]);
    }

    #[test]
    fn unaligned_heads_and_sp_rules() {
        let p = preset("8b").unwrap();
        // 28 q heads over 4 kv heads at TP 4: fine, 1 kv head (7 q heads) each.
        let dims = ParallelDims::new(4, 4, 1, 1, None).unwrap();
        assert_eq!(validate_model_layout(&p, &dims, &LayoutOptions::default()), vec![]);
        // At TP 1 sequence parallel has nothing to split over.
        let dims = ParallelDims::new(8, 1, 1, 1, None).unwrap();
        let o = LayoutOptions { sequence_parallel: true, ..LayoutOptions::default() };
        assert_eq!(validate_model_layout(&p, &dims, &o), vec![LayoutError::SequenceParallelNeedsTp { tp: 1 }]);
        // 2B: 12 q heads, 2 kv heads, TP 2 fine; 1B: 14 heads / 2 kv: TP 2 fine.
        for name in ["1b", "2b"] {
            let dims = ParallelDims::new(2, 2, 1, 1, None).unwrap();
            assert_eq!(validate_model_layout(&preset(name).unwrap(), &dims, &LayoutOptions::default()), vec![]);
        }
    }

    #[test]
    fn uniform_split_needs_even_depth() {
        let p = preset("78b").unwrap();
        let dims = ParallelDims::new(16, 8, 1, 2, None).unwrap();
        let o = LayoutOptions { unaligned_linear: true, ..LayoutOptions::default() };
        let errors = validate_model_layout(&p, &dims, &o);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            errors[0].to_string(),
            "the ViT has 45 layers, which do not split evenly over pp×vpp = 2 pipeline stages: \
             give vit_pp_layers explicitly, e.g. 45,0"
        );
    }

    #[test]
    fn interleaved_lists_need_pp_times_vpp_entries() {
        let p = preset("tiny").unwrap();
        let dims = ParallelDims::new(2, 1, 1, 2, Some(2)).unwrap();
        let ok = opts(&[1, 0, 0, 1], &[2, 0, 0, 0]);
        assert_eq!(validate_model_layout(&p, &dims, &ok), vec![]);
        let bad = opts(&[1, 1], &[2, 0, 0, 0]);
        let errors = validate_model_layout(&p, &dims, &bad);
        assert!(matches!(errors.as_slice(), [LayoutError::LayerListLength { found: 2, expected: 4, .. }]));
    }

    #[test]
    fn batch_rules() {
        let p = preset("tiny").unwrap();
        let dims = ParallelDims::new(4, 1, 1, 1, None).unwrap();
        let with = |gbs, gas, mbs| LayoutOptions {
            global_batch_size: gbs,
            grad_accumulation: gas,
            micro_batch_size: mbs,
            ..LayoutOptions::default()
        };
        assert_eq!(validate_model_layout(&p, &dims, &with(Some(32), Some(4), 2)), vec![]);
        assert_eq!(validate_model_layout(&p, &dims, &with(Some(32), None, 2)), vec![]);
        let err = &validate_model_layout(&p, &dims, &with(Some(32), Some(2), 2))[0];
        assert_eq!(
            err.to_string(),
            "global_batch_size 32 does not equal micro_batch_size × grad_accumulation × dp = \
             2×2×4 = 16: set global_batch_size to 16, or grad_accumulation to 32/(2×4) = 4"
        );
        let err = &validate_model_layout(&p, &dims, &with(Some(30), None, 2))[0];
        assert_eq!(err, &LayoutError::GbsNotMultiple { gbs: 30, mbs: 2, dp: 4, unit: 8, suggestion: 32 });
        assert!(matches!(
            validate_model_layout(&p, &dims, &with(None, None, 0)).as_slice(),
            [LayoutError::Zero { .. }]
        ));
        assert!(matches!(
            validate_model_layout(&p, &dims, &with(Some(8), Some(0), 1)).as_slice(),
            [LayoutError::Zero { .. }]
        ));
    }

    #[test]
    fn options_deserialize_with_defaults() {
        let o: LayoutOptions =
            serde_json::from_str(r#"{"llm_pp_layers": [6, 8, 8, 6], "unaligned_linear": true}"#).unwrap();
        assert_eq!(o.seq_length, 4096);
        assert_eq!(o.micro_batch_size, 1);
        assert_eq!(o.llm_pp_layers, Some(vec![6, 8, 8, 6]));
        assert!(o.unaligned_linear);
    }
}
