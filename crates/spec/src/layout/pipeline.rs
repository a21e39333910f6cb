//! Pipeline layer split: which transformer layers each (pp_rank, vp_stage) chunk owns.
//!
//! Chunks are numbered in model order, `c = vp_stage·PP + pp_rank`: with PP 2 and VPP 2 the
//! model runs through rank 0, rank 1, rank 0 again, rank 1 again. An explicit list (MindSpeed's
//! `pipeline_num_layers`, e.g. LLM `6,8,8,6`, ViT `24,0,0,0`) gives one count per chunk in that
//! order; without one the split is uniform and uses Megatron's offset
//! `vp_stage·(L/V) + pp_rank·(L/(PP·V))`, which is the same thing for equal counts.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::error::{join, LayoutError};

/// The layers of one model chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StageLayers {
    pub pp_rank: usize,
    pub vp_stage: usize,
    /// Global index of the chunk's first layer (equals the end of the previous chunk).
    pub first_layer: usize,
    /// May be 0: e.g. the ViT lives entirely on the first stage (`24,0,0,0`).
    pub num_layers: usize,
}

impl StageLayers {
    /// Global layer indices owned by this chunk.
    pub fn layers(&self) -> Range<usize> {
        self.first_layer..self.first_layer + self.num_layers
    }
}

/// Where a global layer index lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerOwner {
    pub pp_rank: usize,
    pub vp_stage: usize,
    /// Index within the chunk, the `layers.N` a stage-local checkpoint uses.
    pub local_index: usize,
}

/// How a layer list is named in messages.
pub(crate) struct ListNames {
    /// The option that holds the list ("llm_pp_layers").
    pub list: &'static str,
    /// The stack it splits ("the LLM").
    pub model: &'static str,
    /// Suggest putting everything on the first chunk (the ViT, as the recipes do) instead of a
    /// balanced split.
    pub all_on_first: bool,
}

const GENERIC: ListNames = ListNames { list: "the layer list", model: "the model", all_on_first: false };

/// Splits `total_layers` over `pp × vpp` chunks; returns the chunks in model order.
///
/// With `explicit`, the list has one entry per chunk in model order and must sum to
/// `total_layers` (zeros allowed). Without it, `total_layers` must divide evenly.
pub fn split_layers(
    total_layers: usize,
    pp: usize,
    vpp: Option<usize>,
    explicit: Option<&[usize]>,
) -> Result<Vec<StageLayers>, LayoutError> {
    split_layers_named(total_layers, pp, vpp, explicit, &GENERIC)
}

pub(crate) fn split_layers_named(
    total_layers: usize,
    pp: usize,
    vpp: Option<usize>,
    explicit: Option<&[usize]>,
    names: &ListNames,
) -> Result<Vec<StageLayers>, LayoutError> {
    if pp == 0 {
        return Err(LayoutError::Zero { name: "pp".into() });
    }
    let v = vpp.unwrap_or(1);
    if v == 0 {
        return Err(LayoutError::Zero { name: "vpp".into() });
    }
    let chunks = pp.saturating_mul(v);
    let counts: Vec<usize> = match explicit {
        Some(list) => {
            if list.len() != chunks {
                return Err(LayoutError::LayerListLength {
                    list: names.list.into(),
                    found: list.len(),
                    expected: chunks,
                    pp,
                    vpp: v,
                    suggestion: suggest(total_layers, chunks, names),
                });
            }
            let sum = list.iter().fold(0usize, |a, &b| a.saturating_add(b));
            if sum != total_layers {
                return Err(LayoutError::LayerListSum {
                    list: names.list.into(),
                    model: names.model.into(),
                    sum,
                    total: total_layers,
                    suggestion: suggest(total_layers, chunks, names),
                });
            }
            list.to_vec()
        }
        None => {
            if total_layers % chunks != 0 {
                return Err(LayoutError::UnevenLayers {
                    list: names.list.into(),
                    model: names.model.into(),
                    total: total_layers,
                    stages: chunks,
                    suggestion: suggest(total_layers, chunks, names),
                });
            }
            vec![total_layers / chunks; chunks]
        }
    };
    let mut first_layer = 0;
    Ok(counts
        .iter()
        .enumerate()
        .map(|(c, &num_layers)| {
            let stage = StageLayers { pp_rank: c % pp, vp_stage: c / pp, first_layer, num_layers };
            first_layer += num_layers;
            stage
        })
        .collect())
}

/// A list for the error message: balanced with the remainder kept off the first chunk (it also
/// runs the embeddings and, for VLMs, the ViT), or everything on the first chunk.
fn suggest(total: usize, chunks: usize, names: &ListNames) -> String {
    if chunks == 0 {
        return String::new();
    }
    let counts: Vec<usize> = if names.all_on_first {
        (0..chunks).map(|c| if c == 0 { total } else { 0 }).collect()
    } else {
        let (base, rem) = (total / chunks, total % chunks);
        (0..chunks).map(|c| base + usize::from(c >= 1 && c <= rem)).collect()
    };
    join(&counts, ",")
}

/// The ViT split every tool uses when none is given: the explicit list, else every ViT layer on
/// the first chunk (InternVL's vision tower is small next to the LLM and feeds stage 0, as the
/// seed's `24,0,0,0` and `45,0` do). One entry per chunk (`pp × vpp`), in model order.
pub fn vit_pp_layers_or_default(
    explicit: Option<&[usize]>,
    vit_layers: usize,
    pp: usize,
    vpp: Option<usize>,
) -> Vec<usize> {
    match explicit {
        Some(list) => list.to_vec(),
        None => {
            let chunks = pp.max(1) * vpp.unwrap_or(1).max(1);
            (0..chunks).map(|c| if c == 0 { vit_layers } else { 0 }).collect()
        }
    }
}

/// The chunk and local index that own global `layer`; `None` past the last layer.
pub fn layer_owner(stages: &[StageLayers], layer: usize) -> Option<LayerOwner> {
    stages.iter().find(|s| s.layers().contains(&layer)).map(|s| LayerOwner {
        pp_rank: s.pp_rank,
        vp_stage: s.vp_stage,
        local_index: layer - s.first_layer,
    })
}

/// The chunks one pipeline rank runs, in vp_stage order.
pub fn stages_of(stages: &[StageLayers], pp_rank: usize) -> Vec<StageLayers> {
    stages.iter().filter(|s| s.pp_rank == pp_rank).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn llm_6_8_8_6() {
        let s = split_layers(28, 4, None, Some(&[6, 8, 8, 6])).unwrap();
        let ranges: Vec<_> = s.iter().map(|s| s.layers()).collect();
        assert_eq!(ranges, vec![0..6, 6..14, 14..22, 22..28]);
        assert_eq!(s[2].pp_rank, 2);
        assert_eq!(layer_owner(&s, 14), Some(LayerOwner { pp_rank: 2, vp_stage: 0, local_index: 0 }));
        assert_eq!(layer_owner(&s, 27).unwrap().local_index, 5);
        assert_eq!(layer_owner(&s, 28), None);
    }

    #[test]
    fn vit_default_is_all_on_the_first_chunk() {
        assert_eq!(vit_pp_layers_or_default(None, 24, 4, None), vec![24, 0, 0, 0]);
        assert_eq!(vit_pp_layers_or_default(None, 45, 2, Some(2)), vec![45, 0, 0, 0]);
        assert_eq!(vit_pp_layers_or_default(None, 24, 1, None), vec![24]);
        assert_eq!(vit_pp_layers_or_default(Some(&[12, 12]), 24, 2, None), vec![12, 12]);
    }

    #[test]
    fn vit_all_on_first_stage() {
        let s = split_layers(24, 4, None, Some(&[24, 0, 0, 0])).unwrap();
        assert_eq!(s[0].layers(), 0..24);
        assert!(s[1..].iter().all(|s| s.num_layers == 0 && s.first_layer == 24));
        assert_eq!(layer_owner(&s, 23).unwrap().pp_rank, 0);
    }

    #[test]
    fn interleaved_uniform_matches_megatron_offset() {
        // L 16, PP 2, V 2: offset = vp·8 + pp·4.
        let s = split_layers(16, 2, Some(2), None).unwrap();
        for st in &s {
            assert_eq!(st.first_layer, st.vp_stage * 8 + st.pp_rank * 4);
            assert_eq!(st.num_layers, 4);
        }
        let rank1 = stages_of(&s, 1);
        assert_eq!(rank1.iter().map(|s| s.layers()).collect::<Vec<_>>(), vec![4..8, 12..16]);
    }

    #[test]
    fn explicit_interleaved_in_model_order() {
        // chunk c = vp·PP + pp: [pp0 vp0, pp1 vp0, pp0 vp1, pp1 vp1]
        let s = split_layers(10, 2, Some(2), Some(&[1, 2, 3, 4])).unwrap();
        let owner = layer_owner(&s, 3).unwrap();
        assert_eq!((owner.pp_rank, owner.vp_stage, owner.local_index), (0, 1, 0));
        let owner = layer_owner(&s, 9).unwrap();
        assert_eq!((owner.pp_rank, owner.vp_stage, owner.local_index), (1, 1, 3));
    }

    #[test]
    fn errors_suggest_a_fix() {
        let names = ListNames { list: "llm_pp_layers", model: "the LLM", all_on_first: false };
        let err = split_layers_named(28, 4, None, Some(&[6, 8, 7, 6]), &names).unwrap_err();
        assert_eq!(
            err.to_string(),
            "llm_pp_layers sums to 27 but the LLM has 28 layers: make the list sum to 28, \
             e.g. 7,7,7,7"
        );
        let err = split_layers_named(27, 4, None, Some(&[6, 8, 7]), &names).unwrap_err();
        assert!(matches!(err, LayoutError::LayerListLength { found: 3, expected: 4, .. }), "{err}");
        assert!(err.to_string().contains("e.g. 6,7,7,7"), "{err}");
        let vit = ListNames { list: "vit_pp_layers", model: "the ViT", all_on_first: true };
        let err = split_layers_named(45, 2, None, None, &vit).unwrap_err();
        assert!(matches!(err, LayoutError::UnevenLayers { .. }));
        assert!(err.to_string().contains("give vit_pp_layers explicitly, e.g. 45,0"), "{err}");
        assert_eq!(split_layers(4, 0, None, None), Err(LayoutError::Zero { name: "pp".into() }));
        assert_eq!(split_layers(4, 2, Some(0), None), Err(LayoutError::Zero { name: "vpp".into() }));
    }

    fn arb_split() -> impl Strategy<Value = (usize, usize, Option<usize>, Option<Vec<usize>>)> {
        (1usize..=8, prop::option::of(2usize..=4)).prop_flat_map(|(pp, vpp)| {
            let chunks = pp * vpp.unwrap_or(1);
            prop_oneof![
                (1usize..=6).prop_map(move |k| (k * chunks, pp, vpp, None)),
                prop::collection::vec(0usize..=9, chunks)
                    .prop_map(move |list| { (list.iter().sum(), pp, vpp, Some(list)) }),
            ]
        })
    }

    proptest! {
        #[test]
        fn split_covers_every_layer_once_in_model_order((total, pp, vpp, list) in arb_split()) {
            let stages = split_layers(total, pp, vpp, list.as_deref()).unwrap();
            let v = vpp.unwrap_or(1);
            prop_assert_eq!(stages.len(), pp * v);
            let mut next = 0;
            for (c, s) in stages.iter().enumerate() {
                prop_assert_eq!(c, s.vp_stage * pp + s.pp_rank);
                prop_assert_eq!(s.first_layer, next);
                next += s.num_layers;
                if list.is_none() {
                    let l = total;
                    prop_assert_eq!(s.first_layer, s.vp_stage * (l / v) + s.pp_rank * (l / (pp * v)));
                }
            }
            prop_assert_eq!(next, total);
            for layer in 0..total {
                let o = layer_owner(&stages, layer).unwrap();
                let s = stages[o.vp_stage * pp + o.pp_rank];
                prop_assert_eq!(s.first_layer + o.local_index, layer);
                prop_assert!(o.local_index < s.num_layers);
            }
            prop_assert!(layer_owner(&stages, total).is_none());
        }
    }
}
