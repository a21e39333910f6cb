//! Context parallelism (Megatron's `megatron_cp_algo` layout): the LLM's sequence is split over
//! the `cp` ranks of a context-parallel group, each holding the same parameters and the same
//! micro batches.
//!
//! Load balance for the causal mask: the sequence, padded to a multiple of 2·cp (times tp with
//! sequence parallelism), is cut into 2·cp equal chunks and rank r keeps chunks r and
//! 2·cp − 1 − r, so every rank has one early and one late chunk and the same share of the
//! attention work (Megatron's `get_batch_on_this_cp_rank`). The token embeddings, the ViT and
//! the projector run on the whole sequence on every rank (they are cheap beside the LLM, and the
//! image features land anywhere in the sequence); [`Cp::slice`] keeps this rank's chunks, and
//! the gradient of what it dropped is zero, so the replicated parameters' gradients are partial
//! on each rank and their sum over the data × context group is the whole gradient.
//!
//! Attention: each rank's queries need every earlier key. Two exchanges ([`KvExchange`]):
//! - ring (the default, Megatron's ring attention): the keys and values travel around the group
//!   while each rank attends to the chunk it holds, merging blocks with a running log-sum-exp,
//!   forward and backward (csrc/ring_attention.cpp). A rank never holds more than two remote
//!   chunks, nor any sequence × sequence matrix beyond one block's;
//! - all-gather: the keys and values of the whole sequence are gathered on every rank
//!   ([`Cp::gather_keys`], whose backward reduce-scatters their gradients) and attended with
//!   one dense mask by global position ([`Cp::mask`]). Simpler, one collective, but every rank
//!   keeps the whole sequence's K/V for backward (`cargo bench --bench context_parallel`
//!   measures both).
//!
//! Positions for RoPE, the causal mask and the loss targets all come from [`Cp::positions`],
//! the one place that knows which chunk a rank holds.
//!
//! The loss: labels are shifted on the whole sequence first ([`Cp::targets`]), so a chunk's last
//! token is scored against the next chunk's first one; each rank scores its own positions and
//! the step loss and gradients are sums over the group.

use std::sync::Arc;

use tch::{Kind, Tensor};

use crate::dist::c10d::{DistError, ProcessGroup};

/// How the ranks' keys and values reach every query (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvExchange {
    Ring,
    AllGather,
}

impl std::str::FromStr for KvExchange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ring" => Ok(KvExchange::Ring),
            "all-gather" | "all_gather" => Ok(KvExchange::AllGather),
            other => Err(format!("{other:?}: expected ring or all-gather")),
        }
    }
}

impl KvExchange {
    pub fn name(self) -> &'static str {
        match self {
            KvExchange::Ring => "ring",
            KvExchange::AllGather => "all-gather",
        }
    }
}

/// What attention masks its keys with: one dense mask [B, 1, Tq, Tk] (keys in the order they
/// are attended), or for the ring every rank's positions [cp, local] and the real tokens of the
/// padded sequence [B, T], from which each block builds its own.
#[derive(Debug)]
pub enum KeyMask {
    Dense(Tensor),
    Ring { positions: Tensor, valid: Tensor },
}

impl KeyMask {
    /// The same tensors (no copy), for a recomputed segment to keep.
    pub fn share(&self) -> KeyMask {
        match self {
            KeyMask::Dense(m) => KeyMask::Dense(m.shallow_clone()),
            KeyMask::Ring { positions, valid } => {
                KeyMask::Ring { positions: positions.shallow_clone(), valid: valid.shallow_clone() }
            }
        }
    }
}

/// This rank's place in its context-parallel group (size 1: the whole sequence).
#[derive(Clone)]
pub struct Cp {
    pub rank: usize,
    pub size: usize,
    pub exchange: KvExchange,
    /// The most attention scores the ring computes at once (a tile of query rows against one
    /// chunk of keys): 2^25 (128 MiB in fp32), or `MM_RING_TILE_SCORES` (tuning and tests).
    pub tile_scores: i64,
    group: Option<Arc<ProcessGroup>>,
}

/// The ring's default tile (see [`Cp::tile_scores`]).
pub const RING_TILE_SCORES: i64 = 1 << 25;

impl std::fmt::Debug for Cp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cp {{ rank: {}, size: {}, {} }}", self.rank, self.size, self.exchange.name())
    }
}

impl Cp {
    pub fn single() -> Cp {
        Cp { rank: 0, size: 1, exchange: KvExchange::Ring, tile_scores: RING_TILE_SCORES, group: None }
    }

    pub fn new(group: Arc<ProcessGroup>, exchange: KvExchange) -> Cp {
        let tile_scores = std::env::var("MM_RING_TILE_SCORES")
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
            .filter(|&n| n > 0)
            .unwrap_or(RING_TILE_SCORES);
        Cp { rank: group.rank, size: group.size, exchange, tile_scores, group: Some(group) }
    }

    /// Whether the sequence is split (more than one rank).
    pub fn is_split(&self) -> bool {
        self.size > 1
    }

    /// The length the sequence of `t` tokens is padded to: a multiple of 2·cp·`multiple`
    /// (`multiple`: what each rank's share must divide by, tp with sequence parallelism).
    pub fn padded_len(&self, t: i64, multiple: i64) -> i64 {
        let n = 2 * self.size as i64 * multiple.max(1);
        (t + n - 1) / n * n
    }

    /// Global positions, in order, of the tokens rank `rank` holds of a sequence padded to
    /// `padded`: chunk `rank` then chunk 2·cp − 1 − `rank`, each `padded / (2·cp)` long.
    pub fn positions_of(&self, rank: usize, padded: i64, device: tch::Device) -> Tensor {
        let chunks = 2 * self.size as i64;
        let len = padded / chunks;
        let first = rank as i64 * len;
        let second = (chunks - 1 - rank as i64) * len;
        Tensor::cat(
            &[
                Tensor::arange_start(first, first + len, (Kind::Int64, device)),
                Tensor::arange_start(second, second + len, (Kind::Int64, device)),
            ],
            0,
        )
    }

    /// This rank's global positions (see [`Cp::positions_of`]); 0..padded with one rank.
    pub fn positions(&self, padded: i64, device: tch::Device) -> Tensor {
        if !self.is_split() {
            return Tensor::arange(padded, (Kind::Int64, device));
        }
        self.positions_of(self.rank, padded, device)
    }

    /// The global positions of [`Cp::gather_keys`]' output: every rank's, in group-rank order.
    pub fn key_positions(&self, padded: i64, device: tch::Device) -> Tensor {
        if !self.is_split() {
            return Tensor::arange(padded, (Kind::Int64, device));
        }
        let all: Vec<Tensor> = (0..self.size).map(|r| self.positions_of(r, padded, device)).collect();
        Tensor::cat(&all, 0)
    }

    /// Whole-sequence [B, T, ..] (the same on every rank) → this rank's tokens [B, padded/cp, ..]
    /// (zero rows stand for the padding). Differentiable: the dropped rows get zero gradient.
    pub fn slice(&self, x: &Tensor, padded: i64) -> Tensor {
        if !self.is_split() {
            return x.shallow_clone();
        }
        let t = x.size()[1];
        let x = if padded > t {
            let mut shape = x.size();
            shape[1] = padded - t;
            Tensor::cat(&[x, &Tensor::zeros(shape.as_slice(), (x.kind(), x.device()))], 1)
        } else {
            x.shallow_clone()
        };
        x.index_select(1, &self.positions(padded, x.device()))
    }

    /// Labels [B, T] → the targets of this rank's positions [B, padded/cp]: position p is scored
    /// against the label of p + 1 (the last position and the padding against `ignore`).
    pub fn targets(&self, labels: &Tensor, padded: i64, ignore: i64) -> Tensor {
        let (b, t) = labels.size2().expect("labels are [B, T]");
        let tail = Tensor::full([b, padded - t + 1], ignore, (labels.kind(), labels.device()));
        let shifted = Tensor::cat(&[&labels.narrow(1, 1, t - 1), &tail], 1);
        shifted.index_select(1, &self.positions(padded, labels.device()))
    }

    /// The attention mask [B, 1, local, padded] of this rank's queries against the gathered keys
    /// (the whole sequence's causal padding mask without context parallelism):
    /// a key is seen when its global position is at or before the query's and it is not padding
    /// (`attention_mask` [B, padded], true for real tokens).
    pub fn mask(&self, attention_mask: &Tensor, padded: i64) -> Tensor {
        let device = attention_mask.device();
        let (b, _) = attention_mask.size2().expect("the padding mask is [B, padded]");
        let q = self.positions(padded, device);
        let k = self.key_positions(padded, device);
        let causal = k.unsqueeze(0).le_tensor(&q.unsqueeze(1));
        let real = attention_mask.to_kind(Kind::Bool).index_select(1, &k);
        causal.view([1, 1, q.size()[0], k.size()[0]]).logical_and(&real.view([b, 1, 1, -1]))
    }

    /// The key mask of this rank's queries for the padded sequence's real tokens
    /// `attention_mask` [B, padded] (see [`KeyMask`]).
    pub fn key_mask(&self, attention_mask: &Tensor, padded: i64) -> KeyMask {
        if self.is_split() && self.exchange == KvExchange::Ring {
            let device = attention_mask.device();
            let all: Vec<Tensor> = (0..self.size).map(|r| self.positions_of(r, padded, device)).collect();
            KeyMask::Ring { positions: Tensor::stack(&all, 0), valid: attention_mask.to_kind(Kind::Bool) }
        } else {
            KeyMask::Dense(self.mask(attention_mask, padded))
        }
    }

    /// Ring attention of this rank's `q` [B, H, local, D] against every rank's `k`, `v`
    /// [B, KV, local, D] (see `dist::tp`'s `ring_attention`).
    pub fn ring_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        positions: &Tensor,
        valid: &Tensor,
    ) -> Result<Tensor, DistError> {
        let g = self.group.as_deref().expect("ring attention runs on a context-parallel group");
        g.ring_attention(q, k, v, positions, valid, self.tile_scores)
    }

    /// Keys or values [B, heads, local, D] → every rank's, concatenated along the sequence in
    /// group-rank order [B, heads, padded, D]. Backward: each rank gets the sum over the group of
    /// the gradient of its own keys (every rank's queries read them).
    pub fn gather_keys(&self, x: &Tensor) -> Result<Tensor, DistError> {
        let Some(g) = self.group.as_deref().filter(|_| self.is_split()) else { return Ok(x.shallow_clone()) };
        // The shim gathers along dim 0: [local, B, heads, D].
        let seq_first = x.permute([2, 0, 1, 3]).contiguous();
        Ok(g.gather_from_sp_region(&seq_first, None)?.permute([1, 2, 0, 3]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn cp(rank: usize, size: usize) -> Cp {
        Cp { rank, size, exchange: KvExchange::AllGather, tile_scores: RING_TILE_SCORES, group: None }
    }

    fn vec(t: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(t).unwrap()
    }

    #[test]
    fn chunks_pair_an_early_with_a_late_one_and_cover_the_sequence_once() {
        let d = Device::Cpu;
        assert_eq!(cp(0, 2).padded_len(9, 1), 12);
        assert_eq!(cp(0, 2).padded_len(8, 1), 8);
        assert_eq!(cp(0, 2).padded_len(9, 2), 16);
        assert_eq!(vec(&cp(0, 2).positions(8, d)), [0, 1, 6, 7]);
        assert_eq!(vec(&cp(1, 2).positions(8, d)), [2, 3, 4, 5]);
        let keys = vec(&cp(1, 3).key_positions(12, d));
        assert_eq!(keys, [0, 1, 10, 11, 2, 3, 8, 9, 4, 5, 6, 7]);
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(sorted, (0..12).collect::<Vec<_>>());
        assert_eq!(vec(&cp(0, 1).positions(5, d)), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn targets_are_shifted_on_the_whole_sequence_before_the_split() {
        let labels = Tensor::from_slice(&[10i64, 11, 12, 13, 14]).view([1, 5]);
        // Padded to 8: shifted = 11 12 13 14 -1 -1 -1 -1; rank 0 holds 0,1,6,7, rank 1 2..5.
        assert_eq!(vec(&cp(0, 2).targets(&labels, 8, -1).view([-1])), [11, 12, -1, -1]);
        assert_eq!(vec(&cp(1, 2).targets(&labels, 8, -1).view([-1])), [13, 14, -1, -1]);
    }

    #[test]
    fn the_mask_is_causal_in_global_positions_and_hides_padding() {
        let real = Tensor::from_slice(&[true, true, true, true, true, false, false, false]).view([1, 8]);
        let m = cp(1, 2).mask(&real, 8).view([4, 8]);
        // Queries 2,3,4,5 against keys 0,1,6,7,2,3,4,5 (rank 0's then rank 1's).
        let rows: Vec<Vec<i64>> = (0..4).map(|i| vec(&m.get(i).to_kind(Kind::Int64))).collect();
        assert_eq!(rows[0], [1, 1, 0, 0, 1, 0, 0, 0]);
        assert_eq!(rows[1], [1, 1, 0, 0, 1, 1, 0, 0]);
        assert_eq!(rows[2], [1, 1, 0, 0, 1, 1, 1, 0]);
        // Position 5 is padding: as a key it is hidden, as a query it still sees the real keys.
        assert_eq!(rows[3], [1, 1, 0, 0, 1, 1, 1, 0]);
    }

    #[test]
    fn slicing_pads_with_zeros_and_keeps_this_ranks_rows() {
        let x = Tensor::arange(5, (Kind::Float, Device::Cpu)).view([1, 5, 1]) + 1.0;
        let s = cp(0, 2).slice(&x, 8);
        assert_eq!(Vec::<f32>::try_from(&s.view([-1])).unwrap(), [1.0, 2.0, 0.0, 0.0]);
        let s = cp(1, 2).slice(&x, 8);
        assert_eq!(Vec::<f32>::try_from(&s.view([-1])).unwrap(), [3.0, 4.0, 5.0, 0.0]);
    }
}
