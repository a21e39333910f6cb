//! [`Placement`]: which node and local rank each global rank runs on.
//!
//! Ranks fill nodes in order (node 0 gets ranks `0..slots[0]`, node 1 the next `slots[1]`, …),
//! as torchrun and msrun number them. Because tp is the fastest coordinate, a tp group is a run
//! of consecutive ranks, and it stays on one node exactly when no node boundary cuts it; the
//! check here turns a slow cross-node tp job into an error before anything is launched.

use serde::Serialize;

use super::dims::{GroupKind, ParallelDims, RankCoord};
use super::error::LayoutError;
use super::tensor::divisors_up_to;

/// One rank's place in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct RankPlace {
    pub rank: usize,
    pub node_rank: usize,
    /// Index among the ranks of its node (the device index the launcher hands it).
    pub local_rank: usize,
    /// Ranks on its node.
    pub local_world_size: usize,
    pub coord: RankCoord,
}

/// Every rank placed on a node; built only by [`Placement::new`], which validates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placement {
    dims: ParallelDims,
    slots_per_node: Vec<usize>,
    places: Vec<RankPlace>,
}

impl Placement {
    /// Places `dims.world()` ranks on nodes with the given slot (device) counts.
    pub fn new(dims: ParallelDims, slots_per_node: &[usize]) -> Result<Self, LayoutError> {
        if let Some(node) = slots_per_node.iter().position(|&s| s == 0) {
            return Err(LayoutError::EmptyNode { node });
        }
        let sum = slots_per_node.iter().fold(0usize, |a, &b| a.saturating_add(b));
        if sum != dims.world() {
            return Err(LayoutError::SlotsMismatch { sum, world: dims.world(), slots: slots_per_node.to_vec() });
        }

        let mut places = Vec::with_capacity(dims.world());
        let mut coords = dims.coords();
        for (node_rank, &slots) in slots_per_node.iter().enumerate() {
            for local_rank in 0..slots {
                // `coords` yields exactly `world` items and the slots sum to `world`.
                if let Some(coord) = coords.next() {
                    places.push(RankPlace { rank: coord.rank, node_rank, local_rank, local_world_size: slots, coord });
                }
            }
        }

        let spanning: Vec<Vec<usize>> = dims
            .groups(GroupKind::Tp)
            .into_iter()
            .filter(|g| {
                let first = places[g[0]].node_rank;
                g.iter().any(|&r| places[r].node_rank != first)
            })
            .collect();
        if let Some(group) = spanning.first() {
            let mut nodes: Vec<usize> = group.iter().map(|&r| places[r].node_rank).collect();
            nodes.dedup();
            let g = slots_per_node.iter().fold(0, |a, &b| gcd(a, b));
            return Err(LayoutError::TpGroupSpansNodes {
                group: group.clone(),
                nodes,
                suggestions: divisors_up_to(g, 64),
                others: spanning.len() - 1,
            });
        }

        Ok(Placement { dims, slots_per_node: slots_per_node.to_vec(), places })
    }

    pub fn dims(&self) -> &ParallelDims {
        &self.dims
    }

    pub fn num_nodes(&self) -> usize {
        self.slots_per_node.len()
    }

    pub fn slots_per_node(&self) -> &[usize] {
        &self.slots_per_node
    }

    /// Every rank, in rank order.
    pub fn places(&self) -> &[RankPlace] {
        &self.places
    }

    pub fn place(&self, rank: usize) -> Result<&RankPlace, LayoutError> {
        self.places.get(rank).ok_or(LayoutError::RankOutOfRange { rank, world: self.dims.world() })
    }

    /// The ranks on `node`, in local-rank order; empty for a node index past the last.
    pub fn ranks_on(&self, node: usize) -> &[RankPlace] {
        let start: usize = self.slots_per_node.iter().take(node).sum();
        match self.slots_per_node.get(node) {
            Some(&n) => &self.places[start..start + n],
            None => &[],
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_nodes_of_eight() {
        let dims = ParallelDims::new(16, 8, 1, 2, None).unwrap();
        let p = Placement::new(dims, &[8, 8]).unwrap();
        assert_eq!(p.num_nodes(), 2);
        let node1 = p.ranks_on(1);
        assert_eq!(node1.len(), 8);
        assert_eq!(node1[0].rank, 8);
        assert_eq!(node1[3].local_rank, 3);
        assert!(node1.iter().all(|r| r.node_rank == 1 && r.local_world_size == 8));
        assert!(p.ranks_on(2).is_empty());
        assert_eq!(p.place(9).unwrap().coord.pp, 1);
        assert!(p.place(16).is_err());
    }

    #[test]
    fn uneven_nodes() {
        let dims = ParallelDims::new(6, 2, 1, 1, None).unwrap();
        let p = Placement::new(dims, &[4, 2]).unwrap();
        assert_eq!(p.ranks_on(1).iter().map(|r| r.rank).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(p.place(5).unwrap().local_world_size, 2);
    }

    #[test]
    fn tp_group_across_nodes_is_rejected_with_advice() {
        let dims = ParallelDims::new(12, 4, 1, 1, None).unwrap();
        let err = Placement::new(dims, &[6, 6]).unwrap_err();
        assert_eq!(
            err,
            LayoutError::TpGroupSpansNodes {
                group: vec![4, 5, 6, 7],
                nodes: vec![0, 1],
                suggestions: vec![1, 2, 3, 6],
                others: 0,
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("[4, 5, 6, 7] spans nodes 0 and 1"), "{msg}");
        assert!(msg.contains("tp in {1, 2, 3, 6}"), "{msg}");

        let dims = ParallelDims::new(16, 8, 1, 1, None).unwrap();
        let err = Placement::new(dims, &[4, 4, 4, 4]).unwrap_err();
        assert!(matches!(err, LayoutError::TpGroupSpansNodes { others: 1, .. }), "{err}");
    }

    #[test]
    fn slot_errors() {
        let dims = ParallelDims::new(8, 1, 1, 1, None).unwrap();
        assert_eq!(Placement::new(dims, &[8, 0]), Err(LayoutError::EmptyNode { node: 1 }));
        let err = Placement::new(dims, &[4, 2]).unwrap_err();
        assert!(matches!(err, LayoutError::SlotsMismatch { sum: 6, world: 8, .. }));
        assert!(err.to_string().contains("6 device slots (4, 2)"), "{err}");
        assert!(matches!(Placement::new(dims, &[]), Err(LayoutError::SlotsMismatch { sum: 0, .. })));
    }
}
