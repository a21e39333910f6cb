//! Tensor parallelism inside the model: the only place the model talks to other ranks.
//!
//! Every split follows mm-spec's rules (the ones mm-convert shards checkpoints with), so a
//! rank's parameters are exactly its MM shard: attention by kv group (GQA) or by head (the ViT,
//! unevenly with `--unaligned-linear`: 25 heads on 8 ranks are 4,3,3,3,3,3,3,3), MLPs and the
//! projector's first linear by rows (column-parallel), their second linears and the attention
//! outputs by columns (row-parallel, bias added once after the reduction), the vocabulary of
//! the embedding and the output layer by rows, padded to a multiple of 128 × tp as Megatron
//! pads it. Norms, layer scales and the ViT embeddings are replicated.
//!
//! A column-parallel block starts with [`Tp::copy_to`] (identity forward, gradient all-reduce
//! backward) and a row-parallel one ends with [`Tp::reduce_from`] (all-reduce forward): the
//! autograd functions of the c10d shim (`dist::tp`). With one rank every region is skipped and
//! every linear is the fused one, so the numerics are the single-process model's.
//!
//! The vocabulary-parallel cross entropy ([`Tp::token_losses`]) never lets a padding row take
//! part in the softmax: the same model gives the same loss on any tp size.

use std::ops::Range;
use std::sync::Arc;

use mm_spec::checkpoint::{padded_vocab_size, DEFAULT_VOCAB_DIVISOR};
use mm_spec::layout::{attention_partition, tp_partition, AttentionShard, LayoutError};
use tch::{Kind, Reduction, Tensor};

use crate::dist::c10d::{DistError, ProcessGroup, ReduceOp};

/// This rank's place in its tensor-parallel group (size 1: no group, no splits).
#[derive(Clone)]
pub struct Tp {
    pub rank: usize,
    pub size: usize,
    /// MindSpeed's unaligned linear: units that do not divide by tp are split unevenly.
    pub unaligned: bool,
    /// Megatron's sequence parallelism (the LLM): outside the tensor-parallel blocks each rank
    /// holds a slice of the sequence; blocks start with an all-gather and end with a
    /// reduce-scatter instead of the all-reduce.
    pub sequence_parallel: bool,
    group: Option<Arc<ProcessGroup>>,
}

impl std::fmt::Debug for Tp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tp {{ rank: {}, size: {}, sp: {} }}", self.rank, self.size, self.sequence_parallel)
    }
}

impl Tp {
    /// No tensor parallelism.
    pub fn single() -> Tp {
        Tp { rank: 0, size: 1, unaligned: false, sequence_parallel: false, group: None }
    }

    /// `sequence_parallel` has no effect on one rank.
    pub fn new(group: Arc<ProcessGroup>, unaligned: bool, sequence_parallel: bool) -> Tp {
        let sequence_parallel = sequence_parallel && group.size > 1;
        Tp { rank: group.rank, size: group.size, unaligned, sequence_parallel, group: Some(group) }
    }

    /// The same group without sequence parallelism (the ViT and the projector keep whole
    /// sequences).
    pub fn without_sp(&self) -> Tp {
        Tp { sequence_parallel: false, ..self.clone() }
    }

    /// Entering a column-parallel block from the residual stream: the whole sequence (an
    /// all-gather of the slices with sequence parallelism, else [`Tp::copy_to`]).
    pub fn enter(&self, x: &Tensor) -> Result<Tensor, DistError> {
        match self.group().filter(|_| self.sequence_parallel) {
            Some(g) => Ok(g.gather_from_sp_region(&x.transpose(0, 1).contiguous(), None)?.transpose(0, 1)),
            None => self.copy_to(x),
        }
    }

    /// Leaving a row-parallel block: the ranks' partial sums, reduce-scattered into sequence
    /// slices with sequence parallelism, else all-reduced ([`Tp::reduce_from`]).
    pub fn leave(&self, x: &Tensor) -> Result<Tensor, DistError> {
        match self.group().filter(|_| self.sequence_parallel) {
            Some(g) => Ok(g.reduce_scatter_to_sp_region(&x.transpose(0, 1).contiguous(), None)?.transpose(0, 1)),
            None => self.reduce_from(x),
        }
    }

    /// The sequence length the LLM runs at: with sequence parallelism rounded up to a multiple
    /// of tp (the padding positions are masked out and dropped before the loss).
    pub fn padded_len(&self, t: i64) -> i64 {
        let n = self.seq_multiple();
        (t + n - 1) / n * n
    }

    /// What a rank's sequence length must divide by: tp with sequence parallelism, else 1.
    pub fn seq_multiple(&self) -> i64 {
        if self.sequence_parallel {
            self.size as i64
        } else {
            1
        }
    }

    /// Whole-sequence hidden states [B, T, H] (the same on every rank) → this rank's slice of
    /// the padded sequence (identity without sequence parallelism).
    pub fn to_sequence_slice(&self, x: &Tensor) -> Result<Tensor, DistError> {
        let Some(g) = self.group().filter(|_| self.sequence_parallel) else { return Ok(x.shallow_clone()) };
        let (b, t, h) = x.size3().expect("hidden states are [B, T, H]");
        let padded = self.padded_len(t);
        let x = if padded > t {
            Tensor::cat(&[x, &x.zeros_like().narrow(1, 0, 1).expand([b, padded - t, h], false)], 1)
        } else {
            x.shallow_clone()
        };
        Ok(g.scatter_to_sp_region(&x.transpose(0, 1).contiguous(), None)?.transpose(0, 1))
    }

    /// A replicated weight used on this rank's sequence slice: its gradient is summed over the
    /// ranks (each saw part of the sequence), so every rank keeps the same value.
    pub fn slice_weight(&self, w: &Tensor) -> Result<Tensor, DistError> {
        if self.sequence_parallel {
            self.copy_to(w)
        } else {
            Ok(w.shallow_clone())
        }
    }

    fn group(&self) -> Option<&ProcessGroup> {
        self.group.as_deref().filter(|_| self.size > 1)
    }

    /// Identity forward, all-reduce of the gradient backward (entering a column-parallel block).
    pub fn copy_to(&self, x: &Tensor) -> Result<Tensor, DistError> {
        match self.group() {
            Some(g) => g.copy_to_tp_region(x),
            None => Ok(x.shallow_clone()),
        }
    }

    /// All-reduce forward, identity backward (leaving a row-parallel block).
    pub fn reduce_from(&self, x: &Tensor) -> Result<Tensor, DistError> {
        match self.group() {
            Some(g) => g.reduce_from_tp_region(x),
            None => Ok(x.shallow_clone()),
        }
    }

    /// The sum over the ranks of a partial value every rank then uses for its own share, so the
    /// gradient is summed too (all-reduce both ways).
    pub fn sum_both_ways(&self, x: &Tensor) -> Result<Tensor, DistError> {
        self.copy_to(&self.reduce_from(x)?)
    }

    /// This rank's attention heads (`kv_heads == heads` for plain multi-head attention).
    pub fn heads(&self, heads: usize, kv_heads: usize) -> Result<AttentionShard, LayoutError> {
        Ok(attention_partition(heads, kv_heads, self.size, self.unaligned)?.swap_remove(self.rank))
    }

    /// This rank's share of `n` units (MLP columns).
    pub fn units(&self, n: usize) -> Result<Range<usize>, LayoutError> {
        Ok(tp_partition(n, self.size, self.unaligned)?.swap_remove(self.rank))
    }

    /// This rank's rows of the padded vocabulary (all of `vocab`, unpadded, with one rank).
    pub fn vocab_rows(&self, vocab: usize) -> Range<usize> {
        if self.size == 1 {
            return 0..vocab;
        }
        let per = padded_vocab_size(vocab, DEFAULT_VOCAB_DIVISOR, self.size) / self.size;
        self.rank * per..(self.rank + 1) * per
    }

    /// Token embeddings from this rank's rows of the table: ids outside them give zeros, and the
    /// ranks' parts are summed.
    pub fn embed(&self, table: &Tensor, ids: &Tensor, rows: &Range<usize>) -> Result<Tensor, DistError> {
        if self.size == 1 {
            return Ok(Tensor::embedding(table, ids, -1, false, false));
        }
        let (lo, hi) = (rows.start as i64, rows.end as i64);
        let outside = ids.lt(lo).logical_or(&ids.ge(hi));
        let local = (ids - lo).masked_fill(&outside, 0);
        let e = Tensor::embedding(table, &local, -1, false, false).masked_fill(&outside.unsqueeze(-1), 0.0);
        self.reduce_from(&e)
    }

    /// Cross entropy per token of `logits` [N, rows] (this rank's vocabulary rows `rows` of a
    /// `vocab`-token model) against `targets` [N] (`ignore` gives 0): the max, the softmax sum
    /// and the target's logit are combined over the ranks; padding rows are excluded.
    pub fn token_losses(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        rows: &Range<usize>,
        vocab: usize,
        ignore: i64,
    ) -> Result<Tensor, DistError> {
        let Some(g) = self.group() else {
            return Ok(logits.cross_entropy_loss::<Tensor>(targets, None, Reduction::None, ignore, 0.0));
        };
        let logits = logits.to_kind(Kind::Float);
        let width = rows.len() as i64;
        let real = vocab.saturating_sub(rows.start).min(rows.len()) as i64;
        let logits = if real < width {
            let pad = Tensor::arange(width, (Kind::Int64, logits.device())).ge(real);
            logits.masked_fill(&pad, f64::NEG_INFINITY)
        } else {
            logits
        };
        let mut max = logits.detach().amax([-1].as_slice(), true);
        g.all_reduce(&mut max, ReduceOp::Max, "vocabulary-parallel cross entropy: logit maximum")?;
        let z = &logits - &max;
        let sum_exp = self.reduce_from(&z.exp().sum_dim_intlist([-1].as_slice(), false, Kind::Float))?;
        let (lo, hi) = (rows.start as i64, rows.start as i64 + real);
        let mine = targets.ge(lo).logical_and(&targets.lt(hi));
        let local = (targets - lo).masked_fill(&mine.logical_not(), 0);
        let target_z = z.gather(-1, &local.unsqueeze(-1), false).squeeze_dim(-1).masked_fill(&mine.logical_not(), 0.0);
        let target_z = self.reduce_from(&target_z)?;
        Ok((sum_exp.log() - target_z).masked_fill(&targets.eq(ignore), 0.0))
    }
}

/// A row-parallel linear: this rank's columns of W, the partial products summed over the
/// ranks (reduce-scattered into sequence slices with sequence parallelism), then the
/// (replicated) bias. With one rank it is the fused `x Wᵀ + b`.
#[derive(Debug)]
pub struct RowLinear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub tp: Tp,
}

impl RowLinear {
    pub fn new(p: tch::nn::Path, in_local: i64, out_dim: i64, bias: bool, tp: &Tp) -> RowLinear {
        let weight = p.var("weight", &[out_dim, in_local], super::layers::normal_init());
        let bias = bias.then(|| p.var("bias", &[out_dim], tch::nn::Init::Const(0.0)));
        RowLinear { weight, bias, tp: tp.clone() }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, DistError> {
        if self.tp.size == 1 {
            return Ok(x.linear(&self.weight, self.bias.as_ref()));
        }
        let y = self.tp.leave(&x.linear::<Tensor>(&self.weight, None))?;
        Ok(match &self.bias {
            Some(b) => y + b,
            None => y,
        })
    }
}
