//! The parallel context of one rank: its place in the tensor-parallel, pipeline and
//! data-parallel groups of mm-spec's layout (`ParallelDims`, Megatron's rank order), and every
//! collective the training loop runs outside the model (the model's own are `model::tp`'s): the
//! step's totals and loss, gradients over the data-parallel replicas (flattened buckets per
//! dtype), sums over the pipeline stages and tensor-parallel ranks (loss, gradient norms), the
//! initial parameter broadcast, the agreement checks and the barriers around checkpoints. With
//! one rank every operation is a no-op. Data parallelism: the ranks of one data-parallel (DP)
//! group train replicas of the model on disjoint parts of every global batch (see
//! `data::loader` for who reads what).
//!
//! Loss normalization: each rank divides its micro batches' losses by the *global* step totals
//! (micro batches, samples or supervised tokens of the whole global batch, all-reduced before
//! the first forward), so the step loss is the sum of the ranks' losses and gradients are
//! reduced by summing. For the default reduction that is Megatron's average over DP ranks of
//! locally averaged losses; for per-token it is Σ token losses / global supervised tokens, the
//! number one rank computes.
//!
//! Context parallelism: the ranks of a context-parallel (CP) group hold the same parameters
//! and read the same micro batches, each computing the loss of its share of the sequence
//! (`model::cp`). So the replica group, over which gradients are summed, the distributed
//! optimizer shards and the initial parameters are broadcast, is data × context (Megatron's
//! `data_parallel_group_with_cp`: [`Parallel::rank`], [`Parallel::size`], [`Parallel::sum`]),
//! while the data is shared and the step totals counted over the data-parallel ranks alone
//! ([`Parallel::data_rank`], [`Parallel::data_size`], [`Parallel::data_sum`]). Without CP the
//! two are the same ranks.
//!
//! Pitfall: every rank must call the same collectives with the same shapes in the same order.
//! Gradients a rank did not receive (a frozen-in-practice tower in a step without images) are
//! agreed on first ([`Parallel::sum`] of the flags), so the bucket layout is identical.

use tch::{Device, Kind, Tensor};

use crate::dist::c10d::{Backend, DistError, ProcessGroup, ReduceOp};
use crate::dist::env::DistEnv;
use crate::dist::groups::ParallelGroups;

/// Default gradient bucket size (Megatron/DDP use buckets of tens of MB).
pub const DEFAULT_BUCKET_MB: f64 = 25.0;

/// This rank's place in the data-parallel, context-parallel, pipeline and tensor-parallel
/// groups, and the groups.
pub struct Parallel {
    /// Rank inside the replica group (data × context parallel: the ranks that hold the same
    /// parameters), and its size.
    pub rank: usize,
    pub size: usize,
    /// Rank inside the data-parallel group (which micro batches it reads), and its size.
    pub data_rank: usize,
    pub data_size: usize,
    /// This rank's context-parallel rank and the group size (0 and 1 without).
    pub cp_rank: usize,
    pub cp_size: usize,
    pub global_rank: usize,
    /// This rank's pipeline stage and the number of stages (0 and 1 without pipelining).
    pub pp_rank: usize,
    pub pp_size: usize,
    /// This rank's tensor-parallel rank and the group size (0 and 1 without).
    pub tp_rank: usize,
    pub tp_size: usize,
    device: Device,
    groups: Option<ParallelGroups>,
}

/// Splits tensors (in order) into buckets of at most `max_bytes` (at least one tensor each), one
/// dtype per bucket; tensors of a dtype keep their relative order. `items` are (dtype, bytes).
pub fn plan_buckets(items: &[(Kind, usize)], max_bytes: usize) -> Vec<Vec<usize>> {
    let mut kinds: Vec<Kind> = Vec::new();
    for (k, _) in items {
        if !kinds.contains(k) {
            kinds.push(*k);
        }
    }
    let mut out = Vec::new();
    for kind in kinds {
        let mut cur: Vec<usize> = Vec::new();
        let mut bytes = 0usize;
        for (i, (k, b)) in items.iter().enumerate() {
            if *k != kind {
                continue;
            }
            if !cur.is_empty() && bytes + b > max_bytes {
                out.push(std::mem::take(&mut cur));
                bytes = 0;
            }
            cur.push(i);
            bytes += b;
        }
        if !cur.is_empty() {
            out.push(cur);
        }
    }
    out
}

fn flatten(ts: &[&Tensor]) -> Tensor {
    let flat: Vec<Tensor> = ts.iter().map(|t| t.reshape([-1])).collect();
    Tensor::cat(&flat, 0)
}

/// Copies consecutive pieces of `flat` back into `ts` (same order and sizes as [`flatten`]).
fn unflatten_into(flat: &Tensor, ts: &mut [Tensor]) {
    let mut off = 0i64;
    for t in ts {
        let n = t.numel() as i64;
        t.copy_(&flat.narrow(0, off, n).view(t.size().as_slice()));
        off += n;
    }
}

/// Bytes of a contiguous tensor, as a uint8 view: broadcasts and gathers move data unchanged,
/// so any dtype goes through Gloo and NCCL this way.
pub fn as_bytes(t: &Tensor) -> Tensor {
    if t.kind() == Kind::Uint8 {
        t.shallow_clone()
    } else {
        t.view_dtype(Kind::Uint8)
    }
}

impl Parallel {
    /// One rank: no group, every collective returns its input.
    pub fn single(device: Device) -> Parallel {
        Parallel {
            rank: 0,
            size: 1,
            data_rank: 0,
            data_size: 1,
            cp_rank: 0,
            cp_size: 1,
            global_rank: 0,
            pp_rank: 0,
            pp_size: 1,
            tp_rank: 0,
            tp_size: 1,
            device,
            groups: None,
        }
    }

    /// Builds this rank's groups of `tp` tensor-parallel ranks × `cp` context-parallel ranks ×
    /// `pp` pipeline stages × WORLD_SIZE / (tp·cp·pp) data-parallel replicas (mm-spec's rank
    /// order, tp fastest): rendezvous through the launcher's environment, with its timeout.
    pub fn init(
        env: &DistEnv,
        device: Device,
        tp: usize,
        cp: usize,
        pp: usize,
        vpp: Option<usize>,
    ) -> Result<Parallel, DistError> {
        if env.world_size == 1 {
            return Ok(Parallel::single(device));
        }
        let dims = mm_spec::layout::ParallelDims::new(env.world_size, tp, cp, pp, vpp).map_err(|e| DistError {
            rank: env.rank,
            op: "parallel layout".into(),
            message: e.to_string(),
        })?;
        let groups = ParallelGroups::init(env, dims, Backend::for_device(device))?;
        Ok(Parallel {
            rank: groups.dp_cp.rank(),
            size: groups.dp_cp.size(),
            data_rank: groups.dp.rank(),
            data_size: groups.dp.size(),
            cp_rank: groups.cp.rank(),
            cp_size: groups.cp.size(),
            global_rank: env.rank,
            pp_rank: groups.pp.rank(),
            pp_size: groups.pp.size(),
            tp_rank: groups.tp.rank(),
            tp_size: groups.tp.size(),
            device,
            groups: Some(groups),
        })
    }

    /// The tensor-parallel group, for the model's parallel layers (None without).
    pub fn tp_group(&self) -> Option<std::sync::Arc<ProcessGroup>> {
        self.groups.as_ref().filter(|_| self.tp_size > 1).map(|g| g.tp.pg.clone())
    }

    /// The context-parallel group, for the model's attention (None without).
    pub fn cp_group(&self) -> Option<std::sync::Arc<ProcessGroup>> {
        self.groups.as_ref().filter(|_| self.cp_size > 1).map(|g| g.cp.pg.clone())
    }

    /// Element-wise sum of `values` over the data-parallel ranks alone (the step totals: the
    /// context-parallel ranks of a replica read the same micro batches).
    pub fn data_sum(&self, values: &[f64], what: &str) -> Result<Vec<f64>, DistError> {
        let Some(g) = &self.groups else { return Ok(values.to_vec()) };
        self.reduce_values(&g.dp.pg, values, ReduceOp::Sum, what)
    }

    /// Element-wise sum of `values` over the tensor-parallel ranks (squared gradient norms of
    /// the split parameters).
    pub fn tp_sum(&self, values: &[f64], what: &str) -> Result<Vec<f64>, DistError> {
        let Some(g) = self.groups.as_ref().filter(|_| self.tp_size > 1) else { return Ok(values.to_vec()) };
        self.reduce_values(&g.tp.pg, values, ReduceOp::Sum, what)
    }

    /// The pipeline group's communicator (None without pipelining).
    pub fn pipeline_group(&self) -> Option<&ProcessGroup> {
        self.groups.as_ref().filter(|_| self.pp_size > 1).map(|g| g.pp.pg.as_ref())
    }

    /// Element-wise sum of `values` over the pipeline stages (the step loss, which only the
    /// last stage computes; squared gradient norms, each stage its own parameters').
    pub fn pp_sum(&self, values: &[f64], what: &str) -> Result<Vec<f64>, DistError> {
        let Some(pg) = self.pipeline_group() else { return Ok(values.to_vec()) };
        self.reduce_values(pg, values, ReduceOp::Sum, what)
    }

    /// `values` reduced element-wise over `pg` (on the rank's device, back on the CPU).
    fn reduce_values(
        &self,
        pg: &ProcessGroup,
        values: &[f64],
        op: ReduceOp,
        what: &str,
    ) -> Result<Vec<f64>, DistError> {
        let mut t = Tensor::from_slice(values).to_device(self.device);
        pg.all_reduce(&mut t, op, what)?;
        Vec::<f64>::try_from(&t.to_device(Device::Cpu)).map_err(|e| self.error(what, e.to_string()))
    }

    fn pg(&self) -> Option<&ProcessGroup> {
        self.groups.as_ref().map(|g| g.dp_cp.pg.as_ref())
    }

    /// The replica group's communicator (data × context parallel), for the distributed
    /// optimizer (None with one rank).
    pub fn group(&self) -> Option<&ProcessGroup> {
        self.pg()
    }

    pub fn device(&self) -> Device {
        self.device
    }

    fn error(&self, op: &str, message: String) -> DistError {
        DistError { rank: self.global_rank, op: op.into(), message }
    }

    /// Element-wise sum of `values` over the replica group (data × context parallel; f64, exact
    /// for counts below 2^53).
    pub fn sum(&self, values: &[f64], what: &str) -> Result<Vec<f64>, DistError> {
        let Some(pg) = self.pg() else { return Ok(values.to_vec()) };
        self.reduce_values(pg, values, ReduceOp::Sum, what)
    }

    /// Every replica's `value`, in replica-group order.
    pub fn gather(&self, value: i64, what: &str) -> Result<Vec<i64>, DistError> {
        let Some(pg) = self.pg() else { return Ok(vec![value]) };
        let mine = Tensor::from_slice(&[value]).to_device(self.device);
        let mut all = Tensor::zeros([self.size as i64], (Kind::Int64, self.device));
        pg.all_gather(&mut all, &mine, what)?;
        Vec::<i64>::try_from(&all.to_device(Device::Cpu)).map_err(|e| self.error(what, e.to_string()))
    }

    /// Fails on every rank, naming the ranks that differ, unless all ranks computed the same
    /// `fingerprint` of `what` (flags, model, resume state): a mismatch would otherwise surface
    /// as mismatched collectives or silently different replicas.
    pub fn agree(&self, what: &str, fingerprint: u64) -> Result<(), DistError> {
        let all = self.gather(fingerprint as i64, &format!("agreement on {what}"))?;
        let whose = if self.cp_size > 1 { "replicas (data × context parallel ranks)" } else { "data-parallel ranks" };
        self.disagreement(&all, what, whose)
    }

    /// The error naming the ranks (`whose`: "ranks", "data-parallel ranks") whose fingerprint in
    /// `all` differs from rank 0's; Ok when none does.
    fn disagreement(&self, all: &[i64], what: &str, whose: &str) -> Result<(), DistError> {
        let odd: Vec<usize> = (0..all.len()).filter(|&r| all[r] != all[0]).collect();
        if odd.is_empty() {
            return Ok(());
        }
        Err(self.error(
            &format!("agreement on {what}"),
            format!("{whose} {odd:?} differ from rank 0; start every rank with the same flags and files"),
        ))
    }

    /// Element-wise sum of `values` over every rank of the job.
    pub fn world_sum(&self, values: &[f64], what: &str) -> Result<Vec<f64>, DistError> {
        let Some(g) = &self.groups else { return Ok(values.to_vec()) };
        self.reduce_values(&g.world, values, ReduceOp::Sum, what)
    }

    /// Element-wise maximum of `values` over every rank of the job (the agreed stop: the
    /// largest signal number any rank received, 0 for none).
    pub fn world_max(&self, values: &[f64], what: &str) -> Result<Vec<f64>, DistError> {
        let Some(g) = &self.groups else { return Ok(values.to_vec()) };
        self.reduce_values(&g.world, values, ReduceOp::Max, what)
    }

    /// Fault injection (`MM_ENGINE_FAULT=desync:…`): a 1-element broadcast from group rank 0
    /// on the data-parallel group, the group of a step's first collective (the step totals),
    /// which the other ranks do not enter: they wait in that all-reduce at the same sequence
    /// number. No-op with one rank.
    pub fn inject_desync(&self) -> Result<(), DistError> {
        let Some(pg) = self.groups.as_ref().map(|g| g.dp.pg.as_ref()) else { return Ok(()) };
        let mut t = Tensor::zeros([1], (Kind::Float, self.device));
        pg.broadcast(&mut t, 0, "fault injection")
    }

    /// As [`Parallel::agree`] over every rank of the job (pipeline stages and
    /// tensor-parallel ranks too), naming the global ranks that differ.
    pub fn world_agree(&self, what: &str, fingerprint: u64) -> Result<(), DistError> {
        let Some(g) = &self.groups else { return Ok(()) };
        let world = g.dims.world();
        let mine = Tensor::from_slice(&[fingerprint as i64]).to_device(self.device);
        let mut all = Tensor::zeros([world as i64], (Kind::Int64, self.device));
        g.world.all_gather(&mut all, &mine, &format!("agreement on {what}"))?;
        let all = Vec::<i64>::try_from(&all.to_device(Device::Cpu)).map_err(|e| self.error(what, e.to_string()))?;
        self.disagreement(&all, what, "ranks")
    }

    /// Copies replica rank 0's tensors to every replica, in buckets of at most `bucket_bytes`.
    pub fn broadcast(&self, tensors: &[Tensor], bucket_bytes: usize, what: &str) -> Result<(), DistError> {
        let Some(pg) = self.pg() else { return Ok(()) };
        let items: Vec<(Kind, usize)> =
            tensors.iter().map(|t| (t.kind(), t.numel() * t.kind().elt_size_in_bytes())).collect();
        let buckets = plan_buckets(&items, bucket_bytes);
        let n = buckets.len();
        tch::no_grad(|| {
            for (b, idx) in buckets.iter().enumerate() {
                let refs: Vec<&Tensor> = idx.iter().map(|&i| &tensors[i]).collect();
                let flat = flatten(&refs);
                let mut bytes = as_bytes(&flat);
                pg.broadcast(&mut bytes, 0, &format!("{what}, bucket {} of {n}", b + 1))?;
                let mut outs: Vec<Tensor> = idx.iter().map(|&i| tensors[i].shallow_clone()).collect();
                unflatten_into(&flat, &mut outs);
            }
            Ok(())
        })
    }

    /// Sums `grads` over the replica group (data × context parallel) in flattened buckets (one dtype each, at most
    /// `bucket_bytes`) and copies the sums back into them. Returns the number of buckets.
    pub fn all_reduce_grads(&self, grads: &[Tensor], bucket_bytes: usize) -> Result<usize, DistError> {
        let Some(pg) = self.pg() else { return Ok(0) };
        let items: Vec<(Kind, usize)> =
            grads.iter().map(|t| (t.kind(), t.numel() * t.kind().elt_size_in_bytes())).collect();
        let buckets = plan_buckets(&items, bucket_bytes);
        let n = buckets.len();
        tch::no_grad(|| {
            for (b, idx) in buckets.iter().enumerate() {
                let refs: Vec<&Tensor> = idx.iter().map(|&i| &grads[i]).collect();
                let mut flat = flatten(&refs);
                pg.all_reduce(&mut flat, ReduceOp::Sum, &format!("gradient bucket {} of {n}", b + 1))?;
                let mut outs: Vec<Tensor> = idx.iter().map(|&i| grads[i].shallow_clone()).collect();
                unflatten_into(&flat, &mut outs);
            }
            Ok(n)
        })
    }

    /// Waits for every rank of the job (pipeline checkpoints: all stages write into one folder).
    pub fn world_barrier(&self, what: &str) -> Result<(), DistError> {
        match &self.groups {
            Some(g) => g.world.barrier(what),
            None => Ok(()),
        }
    }

    /// Waits for every DP rank (before and after checkpoint writes).
    pub fn barrier(&self, what: &str) -> Result<(), DistError> {
        match self.pg() {
            Some(pg) => pg.barrier(what),
            None => Ok(()),
        }
    }
}

/// A stable 64-bit FNV-1a hash (the same in every process and build) for [`Parallel::agree`].
pub fn fingerprint(text: &str) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_one_dtype_keep_order_and_respect_the_size() {
        let f = Kind::Float;
        let b = Kind::BFloat16;
        let items = [(f, 40), (b, 10), (f, 70), (f, 20), (b, 30), (f, 200), (f, 10)];
        let got = plan_buckets(&items, 100);
        assert_eq!(got, vec![vec![0], vec![2, 3], vec![5], vec![6], vec![1, 4]]);
        // Every tensor exactly once.
        let mut all: Vec<usize> = got.concat();
        all.sort();
        assert_eq!(all, (0..items.len()).collect::<Vec<_>>());
        assert_eq!(plan_buckets(&items, usize::MAX), vec![vec![0, 2, 3, 5, 6], vec![1, 4]]);
        assert!(plan_buckets(&[], 10).is_empty());
    }

    #[test]
    fn flatten_and_back_is_the_identity() {
        let a = Tensor::arange(6, (Kind::Float, Device::Cpu)).reshape([2, 3]);
        let b = Tensor::from_slice(&[7.0f32, 8.0]);
        let flat = flatten(&[&a, &b]);
        assert_eq!(flat.size(), [8]);
        let mut outs = vec![a.zeros_like(), b.zeros_like()];
        unflatten_into(&(&flat * 2.0), &mut outs);
        assert!(outs[0].equal(&(&a * 2.0)) && outs[1].equal(&(&b * 2.0)));
        let bytes = as_bytes(&Tensor::ones([3], (Kind::BFloat16, Device::Cpu)));
        assert_eq!((bytes.kind(), bytes.size()), (Kind::Uint8, vec![6]));
    }

    #[test]
    fn one_rank_is_a_no_op_and_fingerprints_are_stable() {
        let dp = Parallel::single(Device::Cpu);
        assert_eq!(dp.sum(&[1.5, 2.0], "x").unwrap(), [1.5, 2.0]);
        assert_eq!(dp.gather(7, "x").unwrap(), [7]);
        dp.agree("x", 1).unwrap();
        let g = Tensor::ones([2], (Kind::Float, Device::Cpu));
        assert_eq!(dp.all_reduce_grads(&[g.shallow_clone()], 8).unwrap(), 0);
        assert!(g.equal(&Tensor::ones([2], (Kind::Float, Device::Cpu))));
        assert_eq!(fingerprint(""), 0xcbf29ce484222325);
        assert_eq!(fingerprint("a"), 0xaf63dc4c8601ec8c);
        assert_ne!(fingerprint("ab"), fingerprint("ba"));
    }
}
