//! Tensor-parallel partitions: which units of a split dimension each tp rank holds.
//!
//! A *unit* is whatever must not be cut: an attention head (q/k/v rows and `proj`/`o_proj`
//! columns of one head move together), or one column of a column-parallel MLP weight (one row
//! of the row-parallel one). With grouped-query attention the unit is a *kv group*: one
//! key/value head together with the `heads / kv_heads` query heads that read it, so q, k and v
//! of a group always land on the same rank ([`attention_partition`]).
//!
//! When the count does not divide by tp, MindSpeed's unaligned linear (`--unaligned-linear`)
//! gives ranks `r < n % tp` one extra unit; InternViT-6B's 25 heads at TP 8 split 4,3,3,3,3,3,3,3.
//! The converter shards checkpoints with the same ranges the engine computes.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::error::LayoutError;

/// The heads one tp rank holds: a contiguous run of kv heads and the query heads grouped with
/// them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AttentionShard {
    pub kv_heads: Range<usize>,
    pub q_heads: Range<usize>,
}

/// Contiguous ranges of `n_units` for each tp rank, in rank order.
///
/// Without `unaligned`, `n_units % tp` must be 0. Every rank must get at least one unit.
pub fn tp_partition(n_units: usize, tp: usize, unaligned: bool) -> Result<Vec<Range<usize>>, LayoutError> {
    tp_partition_named(n_units, tp, unaligned, "units")
}

pub(crate) fn tp_partition_named(
    n_units: usize,
    tp: usize,
    unaligned: bool,
    what: &str,
) -> Result<Vec<Range<usize>>, LayoutError> {
    if tp == 0 {
        return Err(LayoutError::Zero { name: "tp".into() });
    }
    if n_units < tp {
        return Err(LayoutError::TooFewForTp { what: what.into(), n: n_units, tp });
    }
    let (base, extra) = (n_units / tp, n_units % tp);
    if extra != 0 && !unaligned {
        return Err(LayoutError::NotDivisibleByTp {
            what: what.into(),
            n: n_units,
            tp,
            divisors: divisors_up_to(n_units, 64),
        });
    }
    let mut start = 0;
    Ok((0..tp)
        .map(|r| {
            let len = base + usize::from(r < extra);
            let range = start..start + len;
            start += len;
            range
        })
        .collect())
}

/// Splits attention over tp by kv group (see the module notes); for plain multi-head attention
/// (the ViT) pass `kv_heads == heads`.
pub fn attention_partition(
    heads: usize,
    kv_heads: usize,
    tp: usize,
    unaligned: bool,
) -> Result<Vec<AttentionShard>, LayoutError> {
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(LayoutError::HeadsNotGrouped { heads, kv_heads });
    }
    let group = heads / kv_heads;
    let what = if group == 1 { "attention heads" } else { "key/value heads" };
    Ok(tp_partition_named(kv_heads, tp, unaligned, what)?
        .into_iter()
        .map(|kv| AttentionShard { q_heads: kv.start * group..kv.end * group, kv_heads: kv })
        .collect())
}

/// Divisors of `n` up to `limit`: the tp values to suggest (nobody runs tp above 64).
pub(crate) fn divisors_up_to(n: usize, limit: usize) -> Vec<usize> {
    (1..=n.min(limit)).filter(|d| n % d == 0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn vit_6b_heads_at_tp8() {
        let parts = tp_partition(25, 8, true).unwrap();
        let sizes: Vec<_> = parts.iter().map(|r| r.len()).collect();
        assert_eq!(sizes, vec![4, 3, 3, 3, 3, 3, 3, 3]);
        assert_eq!(parts[0], 0..4);
        assert_eq!(parts[7], 22..25);
    }

    #[test]
    fn aligned_rejects_remainder_with_advice() {
        let err = tp_partition(25, 8, false).unwrap_err();
        assert_eq!(err, LayoutError::NotDivisibleByTp { what: "units".into(), n: 25, tp: 8, divisors: vec![1, 5, 25] });
        let msg = err.to_string();
        assert!(msg.contains("enable unaligned_linear"), "{msg}");
        assert!(msg.contains("tp in {1, 5, 25}"), "{msg}");
        assert!(matches!(tp_partition(4, 8, true), Err(LayoutError::TooFewForTp { n: 4, tp: 8, .. })));
        assert!(matches!(tp_partition(4, 0, true), Err(LayoutError::Zero { .. })));
    }

    #[test]
    fn gqa_groups_stay_together() {
        // 8B: 28 q heads over 4 kv heads (7 per group) at TP 2.
        let shards = attention_partition(28, 4, 2, false).unwrap();
        assert_eq!(
            shards,
            vec![AttentionShard { kv_heads: 0..2, q_heads: 0..14 }, AttentionShard { kv_heads: 2..4, q_heads: 14..28 },]
        );
        let err = attention_partition(28, 4, 8, false).unwrap_err();
        assert!(err.to_string().starts_with("4 key/value heads cannot be split over tp 8"), "{err}");
        assert!(matches!(attention_partition(28, 3, 1, false), Err(LayoutError::HeadsNotGrouped { .. })));
        assert!(matches!(attention_partition(28, 0, 1, false), Err(LayoutError::HeadsNotGrouped { .. })));
        // MHA: 25 ViT heads unaligned.
        let vit = attention_partition(25, 25, 8, true).unwrap();
        assert_eq!(vit[0].q_heads, 0..4);
        assert_eq!(vit[0].kv_heads, 0..4);
    }

    proptest! {
        #[test]
        fn partition_is_contiguous_and_balanced(tp in 1usize..=16, extra in 0usize..500) {
            let n = tp + extra;
            let parts = tp_partition(n, tp, true).unwrap();
            prop_assert_eq!(parts.len(), tp);
            let mut next = 0;
            for p in &parts {
                prop_assert_eq!(p.start, next);
                prop_assert!(!p.is_empty());
                next = p.end;
            }
            prop_assert_eq!(next, n);
            let max = parts.iter().map(|p| p.len()).max().unwrap();
            let min = parts.iter().map(|p| p.len()).min().unwrap();
            prop_assert!(max - min <= 1);
            // The extra units go to the lowest ranks.
            prop_assert!(parts.windows(2).all(|w| w[0].len() >= w[1].len()));
            let aligned = tp_partition(n, tp, false);
            prop_assert_eq!(aligned.is_ok(), n % tp == 0);
            if let Ok(a) = aligned {
                prop_assert_eq!(a, parts);
            }
        }

        #[test]
        fn attention_shards_cover_all_heads(kv in 1usize..=16, group in 1usize..=8, tp in 1usize..=16) {
            let heads = kv * group;
            match attention_partition(heads, kv, tp, true) {
                Ok(shards) => {
                    let mut next = 0;
                    for s in &shards {
                        prop_assert_eq!(s.q_heads.start, next);
                        prop_assert_eq!(s.q_heads.len(), s.kv_heads.len() * group);
                        next = s.q_heads.end;
                    }
                    prop_assert_eq!(next, heads);
                }
                Err(e) => prop_assert!(kv < tp, "{}", e),
            }
        }
    }
}
