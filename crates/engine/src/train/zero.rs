//! The distributed optimizer (ZeRO-1, Megatron's `--use-distributed-optimizer`): AdamW whose
//! fp32 state is sharded over the data-parallel ranks.
//!
//! ```text
//!  trainable params (layout order) ──flatten──▶ [ p0 | p1 | p2 | … | pad ]   numel padded to a multiple of dp
//!                                                └ rank 0 ┘└ rank 1 ┘ …        shard = padded / dp, contiguous
//!  per micro batch:  .grad ──add──▶ flat fp32 gradient buffer (every param)
//!  per step:         reduce-scatter(sum) ▶ own gradient shard ▶ clip (global norm: all-reduce of shard norms²)
//!                    AdamW on the own shard (fp32 master, exp_avg, exp_avg_sq) ▶ all-gather ▶ params
//! ```
//!
//! The update is element-wise, so it is AdamW's (see `optimizer.rs`) on every element: weight
//! decay is applied per parameter piece of the shard, and a parameter no rank has received a
//! gradient for yet keeps its state, as AdamW skips a parameter whose gradient is undefined. Gradients are summed, not averaged,
//! because every rank's loss is already normalized by the global step totals (`dp.rs`).
//!
//! Checkpoints: each DP rank saves its shard (`exp_avg`, `exp_avg_sq`, and `master` when the
//! parameters are not fp32) and the [`FlatLayout`] goes into trainer_state.json. Loading reads
//! any saved layout by parameter name and element range ([`SavedOptimizer`]), so a run resumes
//! on another DP size, or without the distributed optimizer, by resharding.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::optimizer::{adam_update, decays, state_fits, AdamWConfig, OptimizerError};
use super::parallel::{as_bytes, Parallel};
use crate::dist::c10d::{DistError, ReduceOp};
use crate::weights::safetensors::SafetensorsFile;

/// Where each trainable parameter sits in the flat buffer that is split over `dp` ranks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlatLayout {
    pub dp: usize,
    /// Elements of all parameters.
    pub numel: usize,
    /// `numel` rounded up to a multiple of `dp`.
    pub padded: usize,
    pub params: Vec<FlatParam>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlatParam {
    /// MM key (the optimizer keys' spelling).
    pub name: String,
    pub shape: Vec<i64>,
    /// First element in the flat buffer.
    pub offset: usize,
}

impl FlatParam {
    pub fn numel(&self) -> usize {
        self.shape.iter().product::<i64>().max(0) as usize
    }
}

/// A parameter's elements inside a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub param: usize,
    /// First element within the parameter.
    pub in_param: usize,
    /// First element within the shard.
    pub in_shard: usize,
    pub len: usize,
}

impl FlatLayout {
    pub fn new(params: impl IntoIterator<Item = (String, Vec<i64>)>, dp: usize) -> FlatLayout {
        let dp = dp.max(1);
        let mut offset = 0;
        let params: Vec<FlatParam> = params
            .into_iter()
            .map(|(name, shape)| {
                let p = FlatParam { name, shape, offset };
                offset += p.numel();
                p
            })
            .collect();
        FlatLayout { dp, numel: offset, padded: offset.div_ceil(dp) * dp, params }
    }

    /// Elements per shard.
    pub fn shard(&self) -> usize {
        self.padded / self.dp
    }

    pub fn range(&self, rank: usize) -> Range<usize> {
        rank * self.shard()..(rank + 1) * self.shard()
    }

    /// The pieces of parameters inside `range` (padding has none).
    pub fn pieces(&self, range: Range<usize>) -> Vec<Piece> {
        self.params
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let lo = p.offset.max(range.start);
                let hi = (p.offset + p.numel()).min(range.end);
                (lo < hi).then(|| Piece { param: i, in_param: lo - p.offset, in_shard: lo - range.start, len: hi - lo })
            })
            .collect()
    }

    pub fn find(&self, name: &str) -> Option<&FlatParam> {
        self.params.iter().find(|p| p.name == name)
    }

    /// Checks a layout read from a file: contiguous offsets, totals, padding.
    pub fn validate(&self) -> Result<(), String> {
        let mut offset = 0;
        for p in &self.params {
            if p.offset != offset || p.shape.iter().any(|&d| d < 0) {
                return Err(format!("parameter {} at offset {}, expected {offset}", p.name, p.offset));
            }
            offset += p.numel();
        }
        if self.dp == 0 || offset != self.numel || self.padded != offset.div_ceil(self.dp) * self.dp {
            return Err(format!(
                "numel {} / padded {} / dp {} do not match the parameters' {offset} elements",
                self.numel, self.padded, self.dp
            ));
        }
        Ok(())
    }
}

/// Optimizer state as a checkpoint holds it, whatever the layout it was saved in.
pub enum SavedOptimizer {
    /// `exp_avg.<name>`, `exp_avg_sq.<name>`, `master.<name>` full tensors (one rank, or DP
    /// without the distributed optimizer).
    PerParam(BTreeMap<String, Tensor>),
    /// Shards of a flat layout: `files[r]` holds `exp_avg`, `exp_avg_sq` (and `master`) of
    /// `layout.range(r)`.
    Flat { layout: FlatLayout, files: Vec<SafetensorsFile> },
}

/// The state kinds every checkpoint has; `master` is optional.
pub const MOMENTS: [&str; 2] = ["exp_avg", "exp_avg_sq"];
pub const MASTER: &str = "master";

impl SavedOptimizer {
    /// Shape of `name` in the saved state (None when it has none).
    pub fn shape(&self, name: &str) -> Option<Vec<i64>> {
        match self {
            SavedOptimizer::PerParam(m) => m.get(&format!("exp_avg.{name}")).map(|t| t.size()),
            SavedOptimizer::Flat { layout, .. } => layout.find(name).map(|p| p.shape.clone()),
        }
    }

    /// `len` elements of state `kind` of parameter `name` from element `start`, fp32 on the CPU;
    /// None when that state was not saved (masters of an fp32 run, an unknown name).
    pub fn read(&self, kind: &str, name: &str, start: usize, len: usize) -> Result<Option<Tensor>, String> {
        match self {
            SavedOptimizer::PerParam(m) => {
                let Some(t) = m.get(&format!("{kind}.{name}")) else { return Ok(None) };
                if start + len > t.numel() {
                    return Err(format!("{kind}.{name}: elements {start}..{} of {}", start + len, t.numel()));
                }
                Ok(Some(t.reshape([-1]).narrow(0, start as i64, len as i64).to_kind(Kind::Float)))
            }
            SavedOptimizer::Flat { layout, files } => {
                let Some(p) = layout.find(name) else { return Ok(None) };
                if start + len > p.numel() {
                    return Err(format!("{name}: elements {start}..{} of {}", start + len, p.numel()));
                }
                let (lo, hi) = (p.offset + start, p.offset + start + len);
                let shard = layout.shard();
                let mut parts = Vec::new();
                for (r, f) in files.iter().enumerate() {
                    let (flo, fhi) = (r * shard, (r + 1) * shard);
                    let (a, b) = (lo.max(flo), hi.min(fhi));
                    if a >= b {
                        continue;
                    }
                    if !f.entries.contains_key(kind) {
                        return Ok(None);
                    }
                    let t = f.read_range(kind, a - flo, b - a).map_err(|e| e.to_string())?;
                    parts.push(t.to_kind(Kind::Float));
                }
                Ok(Some(if parts.is_empty() {
                    Tensor::zeros([0], (Kind::Float, tch::Device::Cpu))
                } else {
                    Tensor::cat(&parts, 0)
                }))
            }
        }
    }

    /// The per-parameter tensors [`super::optimizer::AdamW::load_state`] takes, for `names`.
    pub fn per_param(&self, names: &[String]) -> Result<BTreeMap<String, Tensor>, String> {
        if let SavedOptimizer::PerParam(m) = self {
            return Ok(m.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect());
        }
        let mut out = BTreeMap::new();
        for name in names {
            let Some(shape) = self.shape(name) else { continue };
            let n = shape.iter().product::<i64>().max(0) as usize;
            for kind in MOMENTS.iter().chain([&MASTER]) {
                if let Some(t) = self.read(kind, name, 0, n)? {
                    out.insert(format!("{kind}.{name}"), t.reshape(shape.as_slice()));
                }
            }
        }
        Ok(out)
    }
}

/// AdamW over this rank's shard of the flat parameters.
pub struct ZeroAdamW {
    pub cfg: AdamWConfig,
    pub step: u64,
    pub layout: FlatLayout,
    params: Vec<Tensor>,
    decay: Vec<bool>,
    /// fp32 gradients of every parameter, flat [padded].
    grad: Tensor,
    /// Whether each parameter has received a gradient on some rank since the start (always, for
    /// non-fp32 parameters: AdamW's main gradients always exist). AdamW skips the others.
    received: Vec<bool>,
    pieces: Vec<Piece>,
    /// This rank's fp32 shard of the parameters and its moments, [shard].
    master: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// The gradient shard of the last reduce-scatter.
    shard_grad: Tensor,
    /// Parameters are not fp32: masters are real (and saved).
    mixed: bool,
}

impl ZeroAdamW {
    /// `params`: trainable (MM name, parameter) in a fixed order, the same on every rank.
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig, dp: &Parallel) -> ZeroAdamW {
        let layout = FlatLayout::new(params.iter().map(|(n, t)| (n.clone(), t.size())), dp.size);
        let device = dp.device();
        let decay = params.iter().map(|(n, t)| decays(n, &t.size())).collect();
        let mixed = params.iter().any(|(_, t)| t.kind() != Kind::Float);
        let params: Vec<Tensor> = params.into_iter().map(|(_, t)| t).collect();
        let range = layout.range(dp.rank);
        let pieces = layout.pieces(range.clone());
        let shard = layout.shard() as i64;
        let opts = (Kind::Float, device);
        let master = tch::no_grad(|| {
            let m = Tensor::zeros([shard], opts);
            for pc in &pieces {
                let src = params[pc.param].detach().reshape([-1]).narrow(0, pc.in_param as i64, pc.len as i64);
                m.narrow(0, pc.in_shard as i64, pc.len as i64).copy_(&src.to_kind(Kind::Float));
            }
            m
        });
        ZeroAdamW {
            cfg,
            step: 0,
            grad: Tensor::zeros([layout.padded as i64], opts),
            received: params.iter().map(|p| p.kind() != Kind::Float).collect(),
            decay,
            pieces,
            master,
            exp_avg: Tensor::zeros([shard], opts),
            exp_avg_sq: Tensor::zeros([shard], opts),
            shard_grad: Tensor::zeros([shard], opts),
            mixed,
            params,
            layout,
        }
    }

    /// Adds each parameter's fresh gradient into the flat fp32 buffer and clears it. Call after
    /// every backward.
    pub fn accumulate(&mut self) {
        tch::no_grad(|| {
            for (i, p) in self.params.iter().enumerate() {
                let mut g = p.grad();
                if !g.defined() {
                    continue;
                }
                let fp = &self.layout.params[i];
                let mut dst = self.grad.narrow(0, fp.offset as i64, fp.numel() as i64);
                let _ = dst.g_add_(&g.reshape([-1]).to_kind(Kind::Float));
                let _ = g.zero_();
                self.received[i] = true;
            }
        });
    }

    pub fn received(&self) -> &[bool] {
        &self.received
    }

    /// Reduce-scatters the summed gradients; `received` (agreed over the DP group) marks the
    /// parameters some rank received a gradient for.
    pub fn reduce(&mut self, dp: &Parallel, received: &[bool]) -> Result<(), DistError> {
        self.received = received.to_vec();
        match dp.group() {
            Some(pg) => pg.reduce_scatter(&mut self.shard_grad, &self.grad, ReduceOp::Sum, "gradients"),
            None => {
                self.shard_grad = self.grad.narrow(0, 0, self.layout.shard() as i64);
                Ok(())
            }
        }
    }

    /// Global L2 norm of the reduced gradients (from every rank's shard), then clipping as
    /// AdamW::clip does. Identical on every rank.
    /// `counted(MM key)`: whether this rank's gradient of a parameter counts in the norm (a
    /// tensor-parallel rank other than 0 leaves out the parameters every rank replicates).
    pub fn clip(&mut self, dp: &Parallel, max_norm: f64, counted: &dyn Fn(&str) -> bool) -> Result<f64, DistError> {
        // Per parameter piece, squares summed in f64: AdamW's per-parameter norms, so the global
        // norm does not depend on how the flat buffer is cut.
        let local: f64 = tch::no_grad(|| {
            self.pieces
                .iter()
                .filter(|pc| counted(&self.layout.params[pc.param].name))
                .map(|pc| {
                    let n = self.shard_grad.narrow(0, pc.in_shard as i64, pc.len as i64).norm().double_value(&[]);
                    n * n
                })
                .sum()
        });
        let sq = dp.sum(&[local], "squared gradient norms of the optimizer shards")?[0];
        let sq = dp.tp_sum(&[sq], "squared gradient norms of the tensor-parallel slices")?[0];
        let norm = dp.pp_sum(&[sq], "squared gradient norms of the pipeline stages")?[0].sqrt();
        if max_norm > 0.0 {
            let coeff = max_norm / (norm + 1e-6);
            if coeff < 1.0 {
                let _ = tch::no_grad(|| self.shard_grad.g_mul_scalar_(coeff));
            }
        }
        Ok(norm)
    }

    /// One AdamW step on the shard, then every rank's updated shard into the parameters.
    pub fn step(&mut self, dp: &Parallel, lr: f64) -> Result<(), DistError> {
        self.step += 1;
        let t = self.step as f64; // Python's beta ** step is pow(), not repeated products
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bias1 = 1.0 - b1.powf(t);
        let bias2_sqrt = (1.0 - b2.powf(t)).sqrt();
        let step_size = lr / bias1;
        let narrow = |t: &Tensor, pc: &Piece| t.narrow(0, pc.in_shard as i64, pc.len as i64);
        tch::no_grad(|| {
            // Parameters no rank received a gradient for keep master and moments (AdamW skips them).
            let kept: Vec<(Piece, [Tensor; 3])> = self
                .pieces
                .iter()
                .filter(|pc| !self.received[pc.param])
                .map(|pc| {
                    (
                        *pc,
                        [
                            narrow(&self.master, pc).copy(),
                            narrow(&self.exp_avg, pc).copy(),
                            narrow(&self.exp_avg_sq, pc).copy(),
                        ],
                    )
                })
                .collect();
            if self.cfg.weight_decay != 0.0 {
                for pc in self.pieces.iter().filter(|pc| self.decay[pc.param]) {
                    let _ = narrow(&self.master, pc).g_mul_scalar_(1.0 - lr * self.cfg.weight_decay);
                }
            }
            adam_update(
                &mut self.master,
                &self.shard_grad,
                (&mut self.exp_avg, &mut self.exp_avg_sq),
                (b1, b2, self.cfg.eps),
                bias2_sqrt,
                step_size,
            );
            for (pc, [m, a, s]) in &kept {
                narrow(&self.master, pc).copy_(m);
                narrow(&self.exp_avg, pc).copy_(a);
                narrow(&self.exp_avg_sq, pc).copy_(s);
            }
        });
        self.gather_params(dp)
    }

    /// All-gathers the shards of the parameters (in the parameters' dtype) and copies them in.
    fn gather_params(&mut self, dp: &Parallel) -> Result<(), DistError> {
        // Gathered in the parameters' dtype (bf16 halves the traffic); fp32 if they differ.
        let kind = match self.params.first().map(|p| p.kind()) {
            Some(k) if self.params.iter().all(|p| p.kind() == k) => k,
            _ => Kind::Float,
        };
        let device = self.master.device();
        tch::no_grad(|| {
            let full = match dp.group() {
                Some(pg) => {
                    let local = self.master.to_kind(kind);
                    let full = Tensor::zeros([self.layout.padded as i64], (kind, device));
                    let mut out = as_bytes(&full);
                    pg.all_gather(&mut out, &as_bytes(&local), "updated parameters")?;
                    full
                }
                None => self.master.to_kind(kind),
            };
            for (p, fp) in self.params.iter_mut().zip(&self.layout.params) {
                let src = full.narrow(0, fp.offset as i64, fp.numel() as i64).view(fp.shape.as_slice());
                p.copy_(&src.to_kind(p.kind()));
            }
            Ok(())
        })
    }

    /// Clears the gradient buffer and the parameters' gradients. `received` stays set: AdamW's
    /// gradients stay defined (zeroed) once a parameter got one, so it keeps updating it.
    pub fn zero_grad(&mut self) {
        tch::no_grad(|| {
            let _ = self.grad.zero_();
            for p in self.params.iter_mut() {
                p.zero_grad();
            }
        });
    }

    /// This rank's shard of the state, to save: `exp_avg`, `exp_avg_sq`, `master` (mixed only).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![
            (MOMENTS[0].to_string(), self.exp_avg.shallow_clone()),
            (MOMENTS[1].to_string(), self.exp_avg_sq.shallow_clone()),
        ];
        if self.mixed {
            out.push((MASTER.to_string(), self.master.shallow_clone()));
        }
        out
    }

    /// Fills this rank's shard from a checkpoint saved in any layout (resharding by name and
    /// element range). Every trainable parameter must be in it with its shape.
    pub fn load_state(&mut self, saved: &SavedOptimizer, step: u64) -> Result<(), OptimizerError> {
        let mut problems = Vec::new();
        for p in &self.layout.params {
            match saved.shape(&p.name) {
                None => problems.push(format!("missing exp_avg.{}", p.name)),
                Some(s) if s != p.shape => {
                    problems.push(format!("exp_avg.{}: shape {s:?}, parameter {:?}", p.name, p.shape))
                }
                _ => {}
            }
        }
        state_fits(&problems)?;
        let fill = |dst: &Tensor, kind: &str, required: bool| -> Result<(), OptimizerError> {
            for pc in &self.pieces {
                let name = &self.layout.params[pc.param].name;
                match saved.read(kind, name, pc.in_param, pc.len).map_err(OptimizerError::State)? {
                    Some(t) => {
                        let mut d = dst.narrow(0, pc.in_shard as i64, pc.len as i64);
                        tch::no_grad(|| d.f_copy_(&t.to_device(d.device())))?;
                    }
                    None if required => return Err(OptimizerError::State(format!("missing {kind}.{name}"))),
                    None => {}
                }
            }
            Ok(())
        };
        fill(&self.exp_avg, MOMENTS[0], true)?;
        fill(&self.exp_avg_sq, MOMENTS[1], true)?;
        if self.mixed {
            fill(&self.master, MASTER, false)?;
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn layout(dp: usize) -> FlatLayout {
        FlatLayout::new([("a".to_string(), vec![2, 3]), ("b".to_string(), vec![5]), ("c".to_string(), vec![2])], dp)
    }

    #[test]
    fn shards_cover_the_flat_buffer_and_pieces_map_back() {
        let l = layout(3);
        assert_eq!((l.numel, l.padded, l.shard()), (13, 15, 5));
        l.validate().unwrap();
        // Every element of every parameter lands in exactly one shard piece.
        let mut seen = vec![0usize; l.numel];
        for r in 0..3 {
            for pc in l.pieces(l.range(r)) {
                let p = &l.params[pc.param];
                assert!(pc.in_shard + pc.len <= l.shard());
                for k in 0..pc.len {
                    assert_eq!(r * l.shard() + pc.in_shard + k, p.offset + pc.in_param + k);
                    seen[p.offset + pc.in_param + k] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "{seen:?}");
        assert_eq!(
            l.pieces(l.range(1)),
            [
                Piece { param: 0, in_param: 5, in_shard: 0, len: 1 },
                Piece { param: 1, in_param: 0, in_shard: 1, len: 4 }
            ]
        );
        let mut bad = l.clone();
        bad.params[1].offset = 7;
        assert!(bad.validate().unwrap_err().contains("parameter b at offset 7"));
        bad = l.clone();
        bad.padded = 13;
        assert!(bad.validate().is_err());
    }

    /// State saved as dp-3 shard files reads back by name and range, whole or in pieces.
    #[test]
    fn flat_shards_read_back_by_name_and_range() {
        let l = layout(3);
        let dir = tempfile::tempdir().unwrap();
        let logical = Tensor::arange(l.padded as i64, (Kind::Float, Device::Cpu));
        let mut files = Vec::new();
        for r in 0..3 {
            let path = dir.path().join(format!("s{r}.safetensors"));
            let shard = logical.narrow(0, (r * 5) as i64, 5);
            let ts = vec![("exp_avg".to_string(), shard.copy()), ("exp_avg_sq".to_string(), (&shard * 2.0).copy())];
            crate::weights::safetensors::write(&path, &ts, &BTreeMap::new()).unwrap();
            files.push(SafetensorsFile::open(&path).unwrap());
        }
        let saved = SavedOptimizer::Flat { layout: l.clone(), files };
        // b = elements 6..11 of the flat buffer, across shards 1 and 2.
        let b = saved.read("exp_avg", "b", 0, 5).unwrap().unwrap();
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), [6.0, 7.0, 8.0, 9.0, 10.0]);
        let part = saved.read("exp_avg_sq", "b", 3, 2).unwrap().unwrap();
        assert_eq!(Vec::<f32>::try_from(&part).unwrap(), [18.0, 20.0]);
        assert!(saved.read("master", "b", 0, 5).unwrap().is_none(), "no masters were saved");
        assert!(saved.read("exp_avg", "zz", 0, 1).unwrap().is_none());
        assert!(saved.read("exp_avg", "c", 1, 5).unwrap_err().contains("c: elements 1..6 of 2"));
        let per = saved.per_param(&["a".into(), "c".into()]).unwrap();
        assert_eq!(per["exp_avg.a"].size(), [2, 3]);
        assert_eq!(Vec::<f32>::try_from(&per["exp_avg_sq.c"]).unwrap(), [22.0, 24.0]);
        assert!(!per.contains_key("exp_avg.b"));
    }
}
