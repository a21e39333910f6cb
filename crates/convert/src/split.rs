//! Pure shard math: which element runs to copy to build a shard from its source tensor
//! ([`split_ops`]), and which to copy to rebuild (part of) a logical tensor from its shards
//! ([`gather_ops`]).
//!
//! Every tensor is viewed as 2-D `[rows, row_elems]` (`row_elems` = product of the trailing
//! dims). The split rules of `mm_spec::checkpoint` describe each tp rank's shard as [`Piece`]s
//! (row range × column range) stacked along dim 0; a logical tensor read from HF may itself be
//! several parts stacked along dim 0 (the -hf layout's q/k/v of the fused ViT qkv). The ops are
//! element offsets and counts, so the executor can convert dtypes on the way; adjacent runs are
//! merged, so a column-parallel shard is one copy and a row-parallel one is one copy per row.

use std::ops::Range;

use mm_spec::checkpoint::Piece;

/// One step of building a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitOp {
    /// `len` elements of source part `part` starting at element `offset`.
    Copy { part: usize, offset: usize, len: usize },
    /// `len` zero elements (vocab padding rows).
    Zeros { len: usize },
}

/// Ops that write the shard made of `pieces`, reading a logical tensor made of parts with
/// `part_rows` rows each (stacked along dim 0) and `row_elems` elements per row.
pub fn split_ops(part_rows: &[usize], row_elems: usize, pieces: &[Piece]) -> Vec<SplitOp> {
    let total: usize = part_rows.iter().sum();
    let mut ops = Vec::new();
    let mut push = |op: SplitOp| match (ops.last_mut(), op) {
        (Some(SplitOp::Copy { part: p0, offset: o0, len: l0 }), SplitOp::Copy { part, offset, len })
            if *p0 == part && *o0 + *l0 == offset =>
        {
            *l0 += len
        }
        (Some(SplitOp::Zeros { len: l0 }), SplitOp::Zeros { len }) => *l0 += len,
        (_, op) => {
            if !matches!(op, SplitOp::Copy { len: 0, .. } | SplitOp::Zeros { len: 0 }) {
                ops.push(op)
            }
        }
    };
    for piece in pieces {
        let cols = piece.cols.clone();
        // Rows inside the tensor, part by part.
        let mut part_start = 0;
        for (part, &n) in part_rows.iter().enumerate() {
            let lo = piece.rows.start.max(part_start);
            let hi = piece.rows.end.min(part_start + n);
            if lo < hi {
                let (r0, r1) = (lo - part_start, hi - part_start);
                if cols.start == 0 && cols.end == row_elems {
                    push(SplitOp::Copy { part, offset: r0 * row_elems, len: (r1 - r0) * row_elems });
                } else {
                    for r in r0..r1 {
                        push(SplitOp::Copy { part, offset: r * row_elems + cols.start, len: cols.len() });
                    }
                }
            }
            part_start += n;
        }
        // Padding rows past the end of the tensor.
        let pad_lo = piece.rows.start.max(total);
        if pad_lo < piece.rows.end {
            push(SplitOp::Zeros { len: (piece.rows.end - pad_lo) * cols.len() });
        }
    }
    ops
}

/// One step of rebuilding a logical tensor: `len` elements of tp rank `rank`'s shard starting
/// at element `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatherOp {
    pub rank: usize,
    pub offset: usize,
    pub len: usize,
}

/// Ops that write logical rows `rows` (all columns) from the shards, `shards[r]` being rank r's
/// pieces. Where ranks hold copies (replicated tensors) the lowest rank is read. Fails if some
/// element is held by no shard.
pub fn gather_ops(shards: &[Vec<Piece>], rows: Range<usize>, row_elems: usize) -> Result<Vec<GatherOp>, String> {
    // Each piece with the shard row it starts at.
    struct Located<'a> {
        rank: usize,
        piece: &'a Piece,
        local_row: usize,
    }
    let mut located = Vec::new();
    for (rank, pieces) in shards.iter().enumerate() {
        let mut local_row = 0;
        for piece in pieces {
            located.push(Located { rank, piece, local_row });
            local_row += piece.rows.len();
        }
    }
    // Bands of rows inside which the set of covering pieces does not change.
    let mut cuts = vec![rows.start, rows.end];
    for l in &located {
        for b in [l.piece.rows.start, l.piece.rows.end] {
            if rows.start < b && b < rows.end {
                cuts.push(b);
            }
        }
    }
    cuts.sort_unstable();
    cuts.dedup();

    let mut ops: Vec<GatherOp> = Vec::new();
    let mut push = |op: GatherOp| match ops.last_mut() {
        Some(last) if last.rank == op.rank && last.offset + last.len == op.offset => last.len += op.len,
        _ if op.len == 0 => {}
        _ => ops.push(op),
    };
    for band in cuts.windows(2) {
        let (b0, b1) = (band[0], band[1]);
        if b0 >= b1 {
            continue;
        }
        // Cover the columns left to right with the lowest rank that holds each run.
        let mut cover: Vec<&Located> = Vec::new();
        let mut col = 0;
        while col < row_elems {
            let next = located
                .iter()
                .filter(|l| l.piece.rows.start <= b0 && b1 <= l.piece.rows.end)
                .filter(|l| l.piece.cols.start == col && l.piece.cols.end > col)
                .min_by_key(|l| l.rank)
                .ok_or_else(|| format!("rows {b0}..{b1}, columns from {col}: held by no shard"))?;
            col = next.piece.cols.end;
            cover.push(next);
        }
        let shard_cols = |l: &Located| l.piece.cols.len();
        if let [only] = cover[..] {
            // Whole rows of one shard: one contiguous run.
            let start = (only.local_row + b0 - only.piece.rows.start) * shard_cols(only);
            push(GatherOp { rank: only.rank, offset: start, len: (b1 - b0) * row_elems });
        } else {
            for r in b0..b1 {
                for l in &cover {
                    let local = l.local_row + r - l.piece.rows.start;
                    push(GatherOp { rank: l.rank, offset: local * shard_cols(l), len: shard_cols(l) });
                }
            }
        }
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mm_spec::checkpoint::SplitKind;
    use proptest::prelude::*;

    /// Executes split ops on element values.
    fn run_split(parts: &[Vec<u32>], ops: &[SplitOp]) -> Vec<u32> {
        let mut out = Vec::new();
        for op in ops {
            match *op {
                SplitOp::Copy { part, offset, len } => out.extend_from_slice(&parts[part][offset..offset + len]),
                SplitOp::Zeros { len } => out.extend(std::iter::repeat_n(0, len)),
            }
        }
        out
    }

    fn run_gather(shards: &[Vec<u32>], ops: &[GatherOp]) -> Vec<u32> {
        ops.iter().flat_map(|op| shards[op.rank][op.offset..op.offset + op.len].iter().copied()).collect()
    }

    #[test]
    fn column_shard_is_one_copy_and_row_shard_one_per_row() {
        let col = split_ops(&[6], 4, &[Piece { rows: 2..4, cols: 0..4 }]);
        assert_eq!(col, vec![SplitOp::Copy { part: 0, offset: 8, len: 8 }]);
        let row = split_ops(&[3], 4, &[Piece { rows: 0..3, cols: 2..4 }]);
        assert_eq!(
            row,
            vec![
                SplitOp::Copy { part: 0, offset: 2, len: 2 },
                SplitOp::Copy { part: 0, offset: 6, len: 2 },
                SplitOp::Copy { part: 0, offset: 10, len: 2 }
            ]
        );
        let pad = split_ops(&[5], 2, &[Piece { rows: 4..8, cols: 0..2 }]);
        assert_eq!(pad, vec![SplitOp::Copy { part: 0, offset: 8, len: 2 }, SplitOp::Zeros { len: 6 }]);
    }

    #[test]
    fn fused_qkv_from_three_parts() {
        // C = 4 (2 heads of 2), tp 2: rank 1 gets q rows 2..4, k rows 6..8, v rows 10..12 = row 2..4 of each part.
        let kind = SplitKind::QkvGrouped { heads: 2, head_dim: 2 };
        let shards = kind.shards(&[12, 3], 2, false).unwrap();
        let ops = split_ops(&[4, 4, 4], 3, &shards[1].pieces);
        assert_eq!(
            ops,
            vec![
                SplitOp::Copy { part: 0, offset: 6, len: 6 },
                SplitOp::Copy { part: 1, offset: 6, len: 6 },
                SplitOp::Copy { part: 2, offset: 6, len: 6 }
            ]
        );
    }

    #[test]
    fn gather_of_an_uncovered_tensor_fails() {
        let shards = vec![vec![Piece { rows: 0..2, cols: 0..3 }]];
        assert!(gather_ops(&shards, 0..2, 4).is_err());
        assert!(gather_ops(&shards, 0..3, 3).is_err());
    }

    fn arb_case() -> impl Strategy<Value = (SplitKind, Vec<usize>, usize, bool)> {
        let kinds = prop_oneof![
            Just(SplitKind::Replicated),
            (1usize..7, 1usize..4).prop_map(|(units, unit_size)| SplitKind::Column { units, unit_size }),
            (1usize..7, 1usize..4).prop_map(|(units, unit_size)| SplitKind::Row { units, unit_size }),
            (1usize..20).prop_map(|v| SplitKind::Vocab { vocab_size: v, padded_vocab_size: 0 }),
            (1usize..6, 1usize..4).prop_map(|(heads, head_dim)| SplitKind::QkvGrouped { heads, head_dim }),
        ];
        (kinds, 1usize..5, 1usize..4, any::<bool>()).prop_map(|(kind, tp, other, three_parts)| {
            let (kind, shape) = match kind {
                SplitKind::Column { units, unit_size } => (kind, vec![units * unit_size, other]),
                SplitKind::Row { units, unit_size } => (kind, vec![other, units * unit_size]),
                SplitKind::Vocab { vocab_size, .. } => {
                    let padded = mm_spec::checkpoint::padded_vocab_size(vocab_size, 2, tp);
                    (SplitKind::Vocab { vocab_size, padded_vocab_size: padded }, vec![vocab_size, other])
                }
                SplitKind::QkvGrouped { heads, head_dim } => (kind, vec![3 * heads * head_dim, other]),
                SplitKind::Replicated => (kind, vec![other + 1, other]),
            };
            let three = three_parts && matches!(kind, SplitKind::QkvGrouped { .. });
            (kind, shape, tp, three)
        })
    }

    proptest! {
        /// Split then gather gives the tensor back, for every split kind, tp and part layout.
        #[test]
        fn split_then_gather_is_identity((kind, shape, tp, three) in arb_case()) {
            let Ok(shards) = kind.shards(&shape, tp, true) else { return Ok(()) };
            let rows = shape[0];
            let row_elems: usize = shape[1..].iter().product();
            let tensor: Vec<u32> = (1..=(rows * row_elems) as u32).collect();
            let part_rows = if three { vec![rows / 3; 3] } else { vec![rows] };
            let parts: Vec<Vec<u32>> = if three {
                tensor.chunks(rows / 3 * row_elems).map(|c| c.to_vec()).collect()
            } else {
                vec![tensor.clone()]
            };
            let built: Vec<Vec<u32>> = shards
                .iter()
                .map(|s| run_split(&parts, &split_ops(&part_rows, row_elems, &s.pieces)))
                .collect();
            for (s, b) in shards.iter().zip(&built) {
                prop_assert_eq!(b.len(), s.shape.iter().product::<usize>());
            }
            let pieces: Vec<Vec<Piece>> = shards.iter().map(|s| s.pieces.clone()).collect();
            let whole = run_gather(&built, &gather_ops(&pieces, 0..rows, row_elems).unwrap());
            prop_assert_eq!(&whole, &tensor);
            // Any row range on its own (the -hf q/k/v of a fused qkv).
            let (a, b) = (rows / 3, rows - rows / 3);
            let mid = run_gather(&built, &gather_ops(&pieces, a..b, row_elems).unwrap());
            prop_assert_eq!(&mid[..], &tensor[a * row_elems..b * row_elems]);
        }
    }
}
