//! A tensor-parallel rank's slices of the whole model's tensors: loading reads each logical
//! tensor whole (one at a time, from whatever checkpoint and split) and keeps this rank's part,
//! or, from an MM checkpoint split like the run, reads its own shard file only; the part is built
//! from the pieces mm-spec's checkpoint plan gives the rank (the same pieces mm-convert shards
//! MM checkpoints with, so a rank's parameters are exactly its MM shard, vocabulary padding
//! rows included as zeros).

use std::collections::HashMap;

use mm_spec::checkpoint::{plan_checkpoint, LayoutRequest, MmLayout, Piece, PlannedTensor, SplitKind};
use mm_spec::hf::original_key;
use mm_spec::ModelPreset;
use tch::{Device, Tensor};

/// Per parameter (original name): the whole tensor's shape and this rank's pieces of its 2-D
/// view, stacked along dim 0 (None: replicated, the whole tensor).
pub struct TpSlices {
    tp_rank: usize,
    by_name: HashMap<String, (Vec<i64>, Option<Vec<Piece>>)>,
}

impl TpSlices {
    /// The slices of tp rank `tp_rank` in `layout`.
    pub fn new(preset: &ModelPreset, layout: &LayoutRequest, tp_rank: usize) -> Result<TpSlices, String> {
        let resolved = MmLayout::resolve(preset, layout).map_err(|e| e.to_string())?;
        let plan = plan_checkpoint(preset, &resolved).map_err(|e| e.to_string())?;
        let mut by_name = HashMap::new();
        for t in plan {
            let Some(name) = original_key(&t.key) else { continue };
            let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            let pieces = (t.split != SplitKind::Replicated).then(|| t.shards[tp_rank].pieces.clone());
            by_name.insert(name, (shape, pieces));
        }
        Ok(TpSlices { tp_rank, by_name })
    }

    /// The tp rank whose shard of the planned tensor `t` (a checkpoint's plan) is exactly this
    /// rank's slice of `name` (the checkpoint was split like this run), if any.
    pub fn same_shard(&self, name: &str, t: &PlannedTensor) -> Option<usize> {
        let (_, mine) = self.by_name.get(name)?;
        let theirs = t.shards.get(self.tp_rank)?;
        match mine {
            // Replicated here and there: every rank's file holds all of it.
            None => (t.split == SplitKind::Replicated).then_some(self.tp_rank),
            Some(mine) => (t.split != SplitKind::Replicated && &theirs.pieces == mine).then_some(self.tp_rank),
        }
    }

    /// Whether parameter `name` is split over the ranks (else every rank holds all of it).
    pub fn is_split(&self, name: &str) -> bool {
        self.by_name.get(name).is_some_and(|(_, p)| p.is_some())
    }

    /// The whole tensor's shape of parameter `name` (its own shape when not split).
    pub fn full_shape(&self, name: &str, var: &Tensor) -> Vec<i64> {
        self.by_name.get(name).map(|(s, _)| s.clone()).unwrap_or_else(|| var.size())
    }

    /// This rank's part of `full` (the whole tensor of `name`), shaped like `var`; rows past
    /// the tensor's end (vocabulary padding) are zeros.
    pub fn local(&self, name: &str, full: &Tensor, var: &Tensor) -> Tensor {
        let Some((_, Some(pieces))) = self.by_name.get(name) else { return full.shallow_clone() };
        let rows = full.size().first().copied().unwrap_or(1);
        let flat = full.reshape([rows, -1]);
        let parts: Vec<Tensor> = pieces
            .iter()
            .map(|p| {
                let (start, len) = (p.rows.start as i64, p.rows.len() as i64);
                let (c0, cw) = (p.cols.start as i64, p.cols.len() as i64);
                let keep = (rows - start).clamp(0, len);
                let block = Tensor::zeros([len, cw], (full.kind(), Device::Cpu));
                if keep > 0 {
                    block.narrow(0, 0, keep).copy_(&flat.narrow(0, start, keep).narrow(1, c0, cw));
                }
                block
            })
            .collect();
        Tensor::cat(&parts, 0).reshape(var.size())
    }
}

/// Whole tensors: no slicing (one tensor-parallel rank).
pub fn full_shape(slices: Option<&TpSlices>, name: &str, var: &Tensor) -> Vec<i64> {
    slices.map(|s| s.full_shape(name, var)).unwrap_or_else(|| var.size())
}

/// `full` as this rank holds it (unchanged without slices).
pub fn local(slices: Option<&TpSlices>, name: &str, full: &Tensor, var: &Tensor) -> Tensor {
    match slices {
        Some(s) => s.local(name, full, var),
        None => full.reshape(var.size()),
    }
}
