//! Tensor- and sequence-parallel regions: Megatron's communication mappings
//! (`megatron/core/tensor_parallel/mappings.py`) as autograd functions over a [`ProcessGroup`].
//! tch cannot define custom autograd functions, so each one is a `torch::autograd::Function` in
//! the shim (csrc/tp_regions.cpp): the forward runs one collective (or none) and records a node
//! whose backward runs the paired collective on the same group.
//!
//! | method                          | forward                      | backward                  |
//! |---------------------------------|------------------------------|---------------------------|
//! | [`copy_to_tp_region`]           | identity                     | all-reduce (sum)          |
//! | [`reduce_from_tp_region`]       | all-reduce (sum)             | identity                  |
//! | [`gather_from_tp_region`]       | all-gather, last dim         | keep own slice            |
//! | [`scatter_to_tp_region`]        | keep own slice, last dim     | all-gather                |
//! | [`gather_from_sp_region`]       | all-gather, dim 0            | reduce-scatter (sum)      |
//! | [`reduce_scatter_to_sp_region`] | reduce-scatter (sum), dim 0  | all-gather                |
//! | [`scatter_to_sp_region`]        | keep own slice, dim 0        | all-gather                |
//!
//! A column-parallel linear is `copy_to_tp_region` then a matmul with the rank's rows of the
//! weight; a row-parallel one is a matmul with the rank's columns then `reduce_from_tp_region`.
//! With sequence parallelism the pair becomes `gather_from_sp_region` … `reduce_scatter_to_sp_region`.
//!
//! Slices (`sizes`) are one length per group rank, in group-rank order, or `None` for equal
//! slices. Uneven slices are MindSpeed's unaligned linear (25 heads on 8 ranks: 4,3,3,3,3,3,3,3
//! heads, from `mm_spec::layout::tp_partition`); pass them as element counts of the split
//! dimension (heads × head_dim). Every rank must pass the same `sizes`.
//!
//! Rules a caller must keep:
//! - **Lifetime.** A node holds a counted reference to the c10d backend, so a graph built with a
//!   group stays valid after that [`ProcessGroup`] is dropped: no dangling pointer either way.
//! - **Lockstep.** A collective runs in the backward too, so every rank of the group must call
//!   the same regions in the same order and run the backward of every graph that contains them
//!   (a rank whose output does not reach its loss still has to: use the output, e.g. times 0).
//!   Unused outputs get zero gradients, so the backward collectives still run on every rank.
//! - **Errors in backward** (a timeout, a dead peer) come out of `Tensor::f_backward` as a
//!   `TchError` carrying libtorch's message; use `f_backward`, not `backward` (which panics).
//! - The functions are differentiable once (no double backward), and an identity output
//!   (`copy_to_tp_region`, or any region on a group of one) is a view of its input: modify it
//!   in place and autograd refuses, as for views made by any custom function.
//!
//! Flight recorder ([`super::flight`]): the forward collective of a region (all-reduce,
//! all-gather, reduce-scatter; none for the identity and slicing forwards) runs inside the shim
//! call made here, so it is recorded around that call, with `what` = the region's name plus
//! "forward". The backward collectives run inside libtorch's autograd engine, called from C++
//! with no Rust frame around them, and are not recorded: a rank stuck in one shows the
//! iteration and phase, not the collective (and the group's sequence numbers count forwards
//! only, the same on every member).
//!
//! [`copy_to_tp_region`]: ProcessGroup::copy_to_tp_region
//! [`reduce_from_tp_region`]: ProcessGroup::reduce_from_tp_region
//! [`gather_from_tp_region`]: ProcessGroup::gather_from_tp_region
//! [`scatter_to_tp_region`]: ProcessGroup::scatter_to_tp_region
//! [`gather_from_sp_region`]: ProcessGroup::gather_from_sp_region
//! [`reduce_scatter_to_sp_region`]: ProcessGroup::reduce_scatter_to_sp_region
//! [`scatter_to_sp_region`]: ProcessGroup::scatter_to_sp_region

use std::ffi::c_char;

use tch::Tensor;

use super::c10d::{nbytes, DistError, ProcessGroup, RawPg, RawTensor};

extern "C" {
    fn mm_tp_copy_to(pg: *mut RawPg, x: RawTensor, out: *mut RawTensor) -> *mut c_char;
    fn mm_tp_reduce_from(pg: *mut RawPg, x: RawTensor, out: *mut RawTensor) -> *mut c_char;
    fn mm_tp_gather_last(pg: *mut RawPg, x: RawTensor, sizes: *const i64, n: usize, out: *mut RawTensor)
        -> *mut c_char;
    fn mm_tp_scatter_last(
        pg: *mut RawPg,
        x: RawTensor,
        sizes: *const i64,
        n: usize,
        out: *mut RawTensor,
    ) -> *mut c_char;
    fn mm_sp_gather_first(
        pg: *mut RawPg,
        x: RawTensor,
        sizes: *const i64,
        n: usize,
        out: *mut RawTensor,
    ) -> *mut c_char;
    fn mm_sp_reduce_scatter_first(
        pg: *mut RawPg,
        x: RawTensor,
        sizes: *const i64,
        n: usize,
        out: *mut RawTensor,
    ) -> *mut c_char;
    fn mm_cp_ring_attention(
        pg: *mut RawPg,
        q: RawTensor,
        k: RawTensor,
        v: RawTensor,
        positions: RawTensor,
        valid: RawTensor,
        tile_scores: i64,
        out: *mut RawTensor,
    ) -> *mut c_char;
    fn mm_sp_scatter_first(
        pg: *mut RawPg,
        x: RawTensor,
        sizes: *const i64,
        n: usize,
        out: *mut RawTensor,
    ) -> *mut c_char;
}

type SizedRegion = unsafe extern "C" fn(*mut RawPg, RawTensor, *const i64, usize, *mut RawTensor) -> *mut c_char;

impl ProcessGroup {
    /// Runs one shim entry point that hands back a new tensor, under the flight recorder when
    /// its forward communicates (a group of more than one rank).
    fn region(
        &self,
        op: &str,
        x: &Tensor,
        call: impl FnOnce(*mut RawTensor) -> *mut c_char,
    ) -> Result<Tensor, DistError> {
        let mut out: RawTensor = std::ptr::null_mut();
        let forward = match op {
            "reduce_from_tp_region" => Some("all_reduce"),
            "gather_from_tp_region" | "gather_from_sp_region" => Some("all_gather"),
            "reduce_scatter_to_sp_region" => Some("reduce_scatter"),
            "ring_attention" => Some("send/recv ring"),
            _ => None,
        };
        match forward.filter(|_| self.size > 1) {
            Some(collective) => {
                let what = format!("{op} forward");
                let waiting = op != "ring_attention";
                self.recorded_as(collective, &what, nbytes(x), op, waiting, || call(&mut out)).map_err(|mut e| {
                    // The recorder's error op carries `what`; keep the region's name alone.
                    e.op = op.to_string();
                    e
                })?
            }
            None => self.done(call(&mut out), op)?,
        }
        // SAFETY: on success the shim stored a `new at::Tensor` that nothing else owns; tch's
        // Tensor frees it (delete) on drop.
        Ok(unsafe { Tensor::from_ptr(out) })
    }

    fn sized(&self, op: &str, f: SizedRegion, x: &Tensor, sizes: Option<&[i64]>) -> Result<Tensor, DistError> {
        let sizes = sizes.unwrap_or(&[]);
        self.region(op, x, |out| unsafe { f(self.raw(), Self::ptr(x), sizes.as_ptr(), sizes.len(), out) })
    }

    /// Entry to a tensor-parallel region (before a column-parallel matmul): the forward returns
    /// `x` unchanged, the backward all-reduces (sums) its gradient over the group, because every
    /// rank's slice of the computation contributed a part of it.
    pub fn copy_to_tp_region(&self, x: &Tensor) -> Result<Tensor, DistError> {
        self.region("copy_to_tp_region", x, |out| unsafe { mm_tp_copy_to(self.raw(), Self::ptr(x), out) })
    }

    /// Exit from a tensor-parallel region (after a row-parallel matmul): the forward sums `x`
    /// over the group into a new tensor, the backward passes the gradient through unchanged.
    pub fn reduce_from_tp_region(&self, x: &Tensor) -> Result<Tensor, DistError> {
        self.region("reduce_from_tp_region", x, |out| unsafe { mm_tp_reduce_from(self.raw(), Self::ptr(x), out) })
    }

    /// The forward concatenates every rank's `x` along the last dimension (rank r's slice is
    /// `sizes[r]` long, or as long as this rank's with `None`); the backward keeps this rank's
    /// slice of the gradient (the computation after the gather is replicated on every rank).
    pub fn gather_from_tp_region(&self, x: &Tensor, sizes: Option<&[i64]>) -> Result<Tensor, DistError> {
        self.sized("gather_from_tp_region", mm_tp_gather_last, x, sizes)
    }

    /// The forward keeps this rank's slice of the last dimension (`sizes[rank]` long, or an
    /// equal share with `None`) as a new tensor; the backward all-gathers the gradient's slices.
    pub fn scatter_to_tp_region(&self, x: &Tensor, sizes: Option<&[i64]>) -> Result<Tensor, DistError> {
        self.sized("scatter_to_tp_region", mm_tp_scatter_last, x, sizes)
    }

    /// Sequence parallelism's entry to a tensor-parallel region: the forward concatenates every
    /// rank's rows (dim 0, e.g. the sequence of an `[s, b, h]` activation); the backward
    /// reduce-scatters the gradient, which each rank's slice of the computation holds a part of,
    /// so every rank gets the sum over the group of its own rows.
    pub fn gather_from_sp_region(&self, x: &Tensor, sizes: Option<&[i64]>) -> Result<Tensor, DistError> {
        self.sized("gather_from_sp_region", mm_sp_gather_first, x, sizes)
    }

    /// Sequence parallelism's exit from a tensor-parallel region: the forward sums the partial
    /// results of the group and keeps this rank's rows of dim 0; the backward all-gathers the
    /// gradient's rows.
    pub fn reduce_scatter_to_sp_region(&self, x: &Tensor, sizes: Option<&[i64]>) -> Result<Tensor, DistError> {
        self.sized("reduce_scatter_to_sp_region", mm_sp_reduce_scatter_first, x, sizes)
    }

    /// Context parallelism's attention (csrc/ring_attention.cpp): this rank's queries `q`
    /// [B, H, Tl, D] against every rank's keys and values, which travel around the group's ring
    /// (`k`, `v` [B, KV, Tl, D]: this rank's), blockwise with a running log-sum-exp merge; the
    /// backward sends the keys and values around again with their gradients. `positions`
    /// [cp, Tl] (int64) are every rank's global token positions, `valid` [B, T] (bool) the
    /// padded sequence's real tokens: a key is seen when it is real and not after the query.
    /// A block is computed in tiles of query rows of at most `tile_scores` scores (above 0).
    pub fn ring_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        positions: &Tensor,
        valid: &Tensor,
        tile_scores: i64,
    ) -> Result<Tensor, DistError> {
        self.region("ring_attention", k, |out| unsafe {
            mm_cp_ring_attention(
                self.raw(),
                Self::ptr(q),
                Self::ptr(k),
                Self::ptr(v),
                Self::ptr(positions),
                Self::ptr(valid),
                tile_scores,
                out,
            )
        })
    }

    /// Entry to sequence parallelism (e.g. after the embedding): the forward keeps this rank's
    /// rows of dim 0 as a new tensor; the backward all-gathers the gradient's rows.
    pub fn scatter_to_sp_region(&self, x: &Tensor, sizes: Option<&[i64]>) -> Result<Tensor, DistError> {
        self.sized("scatter_to_sp_region", mm_sp_scatter_first, x, sizes)
    }
}
