//! [`ParallelDims`]: the validated parallel sizes, the rank ↔ coordinate map in Megatron order
//! (tp fastest, then cp, dp, pp) and the process groups ([`GroupKind`]) derived from it.

use serde::{Deserialize, Serialize};

use super::error::LayoutError;
use super::pipeline::{split_layers, StageLayers};

/// Parallel sizes of one job. Only [`ParallelDims::new`] (or deserialization, which calls it)
/// makes one, so every value in circulation satisfies `world = tp·cp·dp·pp` with all sizes ≥ 1
/// and the rank arithmetic below cannot divide by zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawDims")]
pub struct ParallelDims {
    world: usize,
    tp: usize,
    cp: usize,
    dp: usize,
    pp: usize,
    vpp: Option<usize>,
}

/// The serialized shape; `dp` is optional on input (derived) but checked when present.
#[derive(Deserialize)]
struct RawDims {
    world: usize,
    #[serde(default = "one")]
    tp: usize,
    #[serde(default = "one")]
    cp: usize,
    #[serde(default)]
    dp: Option<usize>,
    #[serde(default = "one")]
    pp: usize,
    #[serde(default)]
    vpp: Option<usize>,
}

fn one() -> usize {
    1
}

impl TryFrom<RawDims> for ParallelDims {
    type Error = LayoutError;

    fn try_from(raw: RawDims) -> Result<Self, LayoutError> {
        let dims = ParallelDims::new(raw.world, raw.tp, raw.cp, raw.pp, raw.vpp)?;
        match raw.dp {
            Some(dp) if dp != dims.dp => Err(LayoutError::DpMismatch {
                dp,
                expected: dims.dp,
                world: raw.world,
                tp: raw.tp,
                cp: raw.cp,
                pp: raw.pp,
            }),
            _ => Ok(dims),
        }
    }
}

/// One rank's position on each parallel axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RankCoord {
    pub rank: usize,
    pub tp: usize,
    pub cp: usize,
    pub dp: usize,
    pub pp: usize,
}

/// The communicators a Megatron-style trainer builds. Each group is the set of ranks that
/// differ only in the named coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupKind {
    /// Tensor parallel: same cp, dp, pp.
    Tp,
    /// Context parallel: same tp, dp, pp.
    Cp,
    /// Data parallel: same tp, cp, pp.
    Dp,
    /// Pipeline parallel: same tp, cp, dp; ordered by stage.
    Pp,
    /// Megatron's `data_parallel_group_with_cp`: same tp and pp. Gradients are reduced over it
    /// when cp > 1, because every cp rank holds a full replica that saw a part of the tokens.
    DpCp,
    /// First and last stage of each pipeline group (they share the word embeddings when tied
    /// and the engine needs them for the loss); the single stage when pp is 1. Ranks of middle
    /// stages are in no embedding group.
    Embedding,
    /// Model parallel (tp × pp): same cp and dp; the ranks that together hold one replica.
    Mp,
}

impl GroupKind {
    pub const ALL: [GroupKind; 7] = [
        GroupKind::Tp,
        GroupKind::Cp,
        GroupKind::Dp,
        GroupKind::Pp,
        GroupKind::DpCp,
        GroupKind::Embedding,
        GroupKind::Mp,
    ];
}

/// Which coordinates vary inside a group (tp, cp, dp, pp).
struct Varying {
    tp: bool,
    cp: bool,
    dp: bool,
    pp: bool,
}

impl ParallelDims {
    /// Validates and builds the sizes; `dp` is derived as `world / (tp·cp·pp)`.
    ///
    /// `vpp` is the number of virtual stages (model chunks) per pipeline rank for the
    /// interleaved schedule; it needs `vpp ≥ 2` and `pp ≥ 2`, as in Megatron.
    pub fn new(world: usize, tp: usize, cp: usize, pp: usize, vpp: Option<usize>) -> Result<Self, LayoutError> {
        for (name, value) in [("world size", world), ("tp", tp), ("cp", cp), ("pp", pp)] {
            if value == 0 {
                return Err(LayoutError::Zero { name: name.into() });
            }
        }
        let product = tp.saturating_mul(cp).saturating_mul(pp);
        if world % product != 0 {
            return Err(LayoutError::WorldNotDivisible { world, tp, cp, pp, product });
        }
        if let Some(v) = vpp {
            if v < 2 {
                return Err(LayoutError::VppTooSmall { vpp: v });
            }
            if pp < 2 {
                return Err(LayoutError::VppNeedsPp { vpp: v, pp });
            }
        }
        Ok(ParallelDims { world, tp, cp, dp: world / product, pp, vpp })
    }

    pub fn world(&self) -> usize {
        self.world
    }
    pub fn tp(&self) -> usize {
        self.tp
    }
    pub fn cp(&self) -> usize {
        self.cp
    }
    pub fn dp(&self) -> usize {
        self.dp
    }
    pub fn pp(&self) -> usize {
        self.pp
    }
    pub fn vpp(&self) -> Option<usize> {
        self.vpp
    }
    /// Model chunks per pipeline rank: `vpp`, or 1 without the interleaved schedule.
    pub fn virtual_stages(&self) -> usize {
        self.vpp.unwrap_or(1)
    }

    /// The coordinates of `rank`.
    pub fn coord(&self, rank: usize) -> Result<RankCoord, LayoutError> {
        if rank >= self.world {
            return Err(LayoutError::RankOutOfRange { rank, world: self.world });
        }
        Ok(self.coord_unchecked(rank))
    }

    fn coord_unchecked(&self, rank: usize) -> RankCoord {
        RankCoord {
            rank,
            tp: rank % self.tp,
            cp: (rank / self.tp) % self.cp,
            dp: (rank / (self.tp * self.cp)) % self.dp,
            pp: rank / (self.tp * self.cp * self.dp),
        }
    }

    /// Coordinates of every rank, in rank order.
    pub fn coords(&self) -> impl Iterator<Item = RankCoord> + '_ {
        (0..self.world).map(|r| self.coord_unchecked(r))
    }

    /// The rank at these coordinates: `tp + TP·(cp + CP·(dp + DP·pp))`.
    pub fn rank_of(&self, tp: usize, cp: usize, dp: usize, pp: usize) -> Result<usize, LayoutError> {
        for (axis, value, size) in [("tp", tp, self.tp), ("cp", cp, self.cp), ("dp", dp, self.dp), ("pp", pp, self.pp)]
        {
            if value >= size {
                return Err(LayoutError::CoordOutOfRange { axis: axis.into(), value, size });
            }
        }
        Ok(self.rank_unchecked(tp, cp, dp, pp))
    }

    fn rank_unchecked(&self, tp: usize, cp: usize, dp: usize, pp: usize) -> usize {
        tp + self.tp * (cp + self.cp * (dp + self.dp * pp))
    }

    fn varying(kind: GroupKind) -> Varying {
        let v = |tp, cp, dp, pp| Varying { tp, cp, dp, pp };
        match kind {
            GroupKind::Tp => v(true, false, false, false),
            GroupKind::Cp => v(false, true, false, false),
            GroupKind::Dp => v(false, false, true, false),
            GroupKind::Pp | GroupKind::Embedding => v(false, false, false, true),
            GroupKind::DpCp => v(false, true, true, false),
            GroupKind::Mp => v(true, false, false, true),
        }
    }

    /// Ranks sharing `c`'s fixed coordinates, ascending.
    fn members(&self, c: RankCoord, kind: GroupKind) -> Vec<usize> {
        let axis = |vary: bool, own: usize, size: usize| {
            if vary {
                0..size
            } else {
                own..own + 1
            }
        };
        let vary = Self::varying(kind);
        let mut out = Vec::new();
        for pp in axis(vary.pp, c.pp, self.pp) {
            for dp in axis(vary.dp, c.dp, self.dp) {
                for cp in axis(vary.cp, c.cp, self.cp) {
                    for tp in axis(vary.tp, c.tp, self.tp) {
                        out.push(self.rank_unchecked(tp, cp, dp, pp));
                    }
                }
            }
        }
        // Loops run pp-outermost and tp-innermost, matching the rank formula, so `out` is
        // already ascending.
        if kind == GroupKind::Embedding {
            let last = self.pp - 1;
            if c.pp != 0 && c.pp != last {
                return Vec::new();
            }
            if self.pp > 1 {
                return vec![out[0], out[out.len() - 1]];
            }
        }
        out
    }

    /// Every group of `kind`: each sorted ascending, groups ordered by their smallest rank.
    ///
    /// This is the order in which every rank must create them.
    pub fn groups(&self, kind: GroupKind) -> Vec<Vec<usize>> {
        self.coords()
            .filter_map(|c| {
                let g = self.members(c, kind);
                (g.first() == Some(&c.rank)).then_some(g)
            })
            .collect()
    }

    /// The group of `kind` that `rank` belongs to, ascending; empty for an [`GroupKind::Embedding`]
    /// query from a middle pipeline stage, which joins no embedding group.
    pub fn group_of(&self, kind: GroupKind, rank: usize) -> Result<Vec<usize>, LayoutError> {
        Ok(self.members(self.coord(rank)?, kind))
    }

    /// [`split_layers`] with this layout's pp and vpp.
    pub fn split_layers(
        &self,
        total_layers: usize,
        explicit: Option<&[usize]>,
    ) -> Result<Vec<StageLayers>, LayoutError> {
        split_layers(total_layers, self.pp, self.vpp, explicit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn dims(world: usize, tp: usize, cp: usize, pp: usize) -> ParallelDims {
        ParallelDims::new(world, tp, cp, pp, None).unwrap()
    }

    #[test]
    fn new_rejects_bad_sizes() {
        assert_eq!(ParallelDims::new(0, 1, 1, 1, None), Err(LayoutError::Zero { name: "world size".into() }));
        assert_eq!(ParallelDims::new(8, 0, 1, 1, None), Err(LayoutError::Zero { name: "tp".into() }));
        let err = ParallelDims::new(12, 8, 1, 1, None).unwrap_err();
        assert!(matches!(err, LayoutError::WorldNotDivisible { product: 8, .. }));
        assert!(err.to_string().contains("world size 12"), "{err}");
        assert_eq!(ParallelDims::new(8, 1, 1, 4, Some(1)), Err(LayoutError::VppTooSmall { vpp: 1 }));
        assert_eq!(ParallelDims::new(8, 1, 1, 1, Some(2)), Err(LayoutError::VppNeedsPp { vpp: 2, pp: 1 }));
        let d = ParallelDims::new(16, 2, 2, 2, Some(3)).unwrap();
        assert_eq!((d.dp(), d.virtual_stages()), (2, 3));
    }

    #[test]
    fn out_of_range_queries_are_errors() {
        let d = dims(8, 2, 1, 2);
        assert_eq!(d.coord(8), Err(LayoutError::RankOutOfRange { rank: 8, world: 8 }));
        assert!(d.coord(8).unwrap_err().to_string().contains("0 to 7"));
        assert!(matches!(d.rank_of(0, 0, 2, 0), Err(LayoutError::CoordOutOfRange { value: 2, size: 2, .. })));
        assert!(d.group_of(GroupKind::Tp, 100).is_err());
    }

    #[test]
    fn serde_validates() {
        let d = dims(16, 8, 1, 2);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<ParallelDims>(&json).unwrap(), d);
        let short: ParallelDims = serde_json::from_str(r#"{"world": 8, "pp": 4}"#).unwrap();
        assert_eq!(short, dims(8, 1, 1, 4));
        assert!(serde_json::from_str::<ParallelDims>(r#"{"world": 12, "tp": 8}"#).is_err());
        assert!(serde_json::from_str::<ParallelDims>(r#"{"world": 8, "tp": 2, "dp": 2}"#).is_err());
        assert!(serde_json::from_str::<ParallelDims>(r#"{"world": 8, "tp": 2, "dp": 4}"#).is_ok());
    }

    #[test]
    fn megatron_order_small_example() {
        // tp 2, cp 2, pp 2, world 16 → dp 2.
        let d = dims(16, 2, 2, 2);
        let c = d.coord(13).unwrap();
        // 13 = 1 + 2·(0 + 2·(1 + 2·1))
        assert_eq!((c.tp, c.cp, c.dp, c.pp), (1, 0, 1, 1));
        assert_eq!(d.group_of(GroupKind::Tp, 13).unwrap(), vec![12, 13]);
        assert_eq!(d.group_of(GroupKind::Cp, 13).unwrap(), vec![13, 15]);
        assert_eq!(d.group_of(GroupKind::Dp, 13).unwrap(), vec![9, 13]);
        assert_eq!(d.group_of(GroupKind::Pp, 13).unwrap(), vec![5, 13]);
        assert_eq!(d.group_of(GroupKind::DpCp, 13).unwrap(), vec![9, 11, 13, 15]);
        assert_eq!(d.group_of(GroupKind::Mp, 13).unwrap(), vec![4, 5, 12, 13]);
        assert_eq!(d.group_of(GroupKind::Embedding, 13).unwrap(), vec![5, 13]);
    }

    #[test]
    fn embedding_groups() {
        let d = dims(8, 1, 1, 4);
        assert_eq!(d.groups(GroupKind::Embedding), vec![vec![0, 6], vec![1, 7]]);
        assert!(d.group_of(GroupKind::Embedding, 2).unwrap().is_empty());
        assert_eq!(d.group_of(GroupKind::Embedding, 6).unwrap(), vec![0, 6]);
        let flat = dims(4, 2, 1, 1);
        assert_eq!(flat.groups(GroupKind::Embedding), vec![vec![0], vec![1], vec![2], vec![3]]);
    }

    fn arb_dims() -> impl Strategy<Value = ParallelDims> {
        (1usize..=8, 1usize..=4, 1usize..=8, 1usize..=8)
            .prop_filter("world ≤ 256", |(tp, cp, dp, pp)| tp * cp * dp * pp <= 256)
            .prop_map(|(tp, cp, dp, pp)| ParallelDims::new(tp * cp * dp * pp, tp, cp, pp, None).unwrap())
    }

    const AXES: [GroupKind; 4] = [GroupKind::Tp, GroupKind::Cp, GroupKind::Dp, GroupKind::Pp];

    proptest! {
        #[test]
        fn coord_round_trip(d in arb_dims()) {
            for c in d.coords() {
                prop_assert_eq!(d.coord(c.rank).unwrap(), c);
                prop_assert_eq!(d.rank_of(c.tp, c.cp, c.dp, c.pp).unwrap(), c.rank);
                prop_assert!(c.tp < d.tp() && c.cp < d.cp() && c.dp < d.dp() && c.pp < d.pp());
            }
        }

        #[test]
        fn every_rank_in_exactly_one_group(d in arb_dims()) {
            let expected_size = |k: GroupKind| match k {
                GroupKind::Tp => d.tp(),
                GroupKind::Cp => d.cp(),
                GroupKind::Dp => d.dp(),
                GroupKind::Pp => d.pp(),
                GroupKind::DpCp => d.dp() * d.cp(),
                GroupKind::Mp => d.tp() * d.pp(),
                GroupKind::Embedding => unreachable!(),
            };
            for kind in GroupKind::ALL {
                if kind == GroupKind::Embedding {
                    continue;
                }
                let groups = d.groups(kind);
                let mut seen = vec![0usize; d.world()];
                let mut prev_first = None;
                for g in &groups {
                    prop_assert_eq!(g.len(), expected_size(kind));
                    prop_assert!(g.windows(2).all(|w| w[0] < w[1]), "{:?} not ascending", g);
                    prop_assert!(prev_first < Some(g[0]), "groups not ordered by first rank");
                    prev_first = Some(g[0]);
                    for &r in g {
                        seen[r] += 1;
                        prop_assert_eq!(&d.group_of(kind, r).unwrap(), g);
                    }
                }
                prop_assert!(seen.iter().all(|&n| n == 1), "{:?}: {:?}", kind, seen);
            }
        }

        #[test]
        fn groups_mean_shared_coordinates(d in arb_dims(), a in 0usize..256, b in 0usize..256) {
            let (a, b) = (a % d.world(), b % d.world());
            let (ca, cb) = (d.coord(a).unwrap(), d.coord(b).unwrap());
            let same = |kind| d.group_of(kind, a).unwrap().contains(&b);
            prop_assert_eq!(same(GroupKind::Tp), ca.cp == cb.cp && ca.dp == cb.dp && ca.pp == cb.pp);
            prop_assert_eq!(same(GroupKind::Cp), ca.tp == cb.tp && ca.dp == cb.dp && ca.pp == cb.pp);
            prop_assert_eq!(same(GroupKind::Dp), ca.tp == cb.tp && ca.cp == cb.cp && ca.pp == cb.pp);
            prop_assert_eq!(same(GroupKind::Pp), ca.tp == cb.tp && ca.cp == cb.cp && ca.dp == cb.dp);
            prop_assert_eq!(same(GroupKind::DpCp), ca.tp == cb.tp && ca.pp == cb.pp);
            prop_assert_eq!(same(GroupKind::Mp), ca.cp == cb.cp && ca.dp == cb.dp);
        }

        /// A group of one axis meets a group of another axis in at most one rank.
        #[test]
        fn axis_groups_are_orthogonal(d in arb_dims()) {
            for (i, &ka) in AXES.iter().enumerate() {
                for &kb in &AXES[i + 1..] {
                    let id = |kind| {
                        let mut map = vec![0usize; d.world()];
                        for (gi, g) in d.groups(kind).iter().enumerate() {
                            for &r in g {
                                map[r] = gi;
                            }
                        }
                        map
                    };
                    let (ia, ib) = (id(ka), id(kb));
                    let mut pairs = HashMap::new();
                    for r in 0..d.world() {
                        if let Some(other) = pairs.insert((ia[r], ib[r]), r) {
                            prop_assert!(false, "{:?}/{:?}: ranks {} and {} share both", ka, kb, other, r);
                        }
                    }
                }
            }
        }

        #[test]
        fn embedding_is_pp_ends(d in arb_dims()) {
            let emb = d.groups(GroupKind::Embedding);
            let pp = d.groups(GroupKind::Pp);
            prop_assert_eq!(emb.len(), pp.len());
            for (e, p) in emb.iter().zip(&pp) {
                let expected = if p.len() > 1 { vec![p[0], p[p.len() - 1]] } else { p.clone() };
                prop_assert_eq!(e, &expected);
            }
        }
    }
}
