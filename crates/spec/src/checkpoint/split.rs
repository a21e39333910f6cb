//! Tensor-parallel splitting with the numbers resolved: [`SplitKind`] (what the manifest records
//! per tensor), [`split_spec`] (a logical key's split for a model and tp), Megatron's
//! [`padded_vocab_size`], and [`SplitKind::shards`], which cuts a tensor into each tp rank's
//! [`Shard`] as [`Piece`]s of its 2-D view. Units that do not divide by tp follow
//! [`crate::layout::tp_partition`]'s unaligned rule.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::error::CheckpointError;
use super::keys::{lookup_key, SplitRule};
use crate::layout::{tp_partition, LayoutError};
use crate::presets::ModelPreset;

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

pub(super) fn resolve_rule(rule: SplitRule, arch: &ModelPreset, tp: usize, vocab_divisor: usize) -> SplitKind {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::QK_NORM_NOTE;
    use crate::presets::preset;

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
}
