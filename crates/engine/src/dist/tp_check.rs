//! `mm-engine tp-check`: proves that the tensor-parallel regions ([`super::tp`]) compute what one
//! process computes, forward and backward. Every rank builds the same seeded full-size inputs,
//! weights and loss weights, computes the one-process reference with plain autograd, then its
//! share of the same computation through the regions over the world group, and compares
//! outputs and gradients, in f32 and f64, against a stated tolerance:
//!
//! - `mlp`: column-parallel then row-parallel MLP, `Z = Σ_r gelu(X·A_rᵀ)·B_rᵀ` (copy_to_tp,
//!   reduce_from_tp), with an unaligned ffn split; Z, dX and this rank's slices of dA, dB;
//!   again as `mlp_group_dropped_before_backward` on a group dropped between forward and
//!   backward (the lifetime rule of [`super::tp`]);
//! - `gather_scatter_last` (uneven: 3·w+1 heads as MindSpeed splits them, 4,3,3 at w = 3 and
//!   4,3,3,3,3,3,3,3 at w = 8; and even): scatter_to_tp, an elementwise op on the slice,
//!   gather_from_tp; the slice, the gathered output and dX;
//! - `sequence_parallel` (uneven rows and even): scatter_to_sp, gather_from_sp, the MLP's
//!   column/row matmuls, reduce_scatter_to_sp; this rank's rows of Z, dX, dA and dB slices.
//!
//! The error of a compared tensor is `max|got − want| / max|want|`.

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::c10d::{Backend, DistError, ProcessGroup, Store};
use super::env::DistEnv;

/// f32: a few ulp of the largest value, summed over a handful of ranks.
pub const TOL_F32: f64 = 1e-6;
/// f64: the same arithmetic in another order.
pub const TOL_F64: f64 = 1e-12;

#[derive(Debug, Serialize)]
pub struct TpCheckReport {
    pub rank: usize,
    pub world_size: usize,
    pub backend: String,
    pub device: String,
    pub checks: Vec<TpCheck>,
    pub pass: bool,
}

/// One computation in one dtype: its worst relative error over the tensors it compares.
#[derive(Debug, Serialize)]
pub struct TpCheck {
    pub name: String,
    pub dtype: String,
    /// Slice sizes along the split dimension, in group-rank order.
    pub sizes: Vec<i64>,
    pub compared: Vec<String>,
    pub max_rel_err: f64,
    /// The compared tensor with that error.
    pub worst: String,
    pub tol: f64,
    pub pass: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TpCheckError {
    #[error(transparent)]
    Dist(#[from] DistError),
    #[error("rank {rank}: {what}: {error}")]
    Torch { rank: usize, what: String, error: tch::TchError },
    #[error("rank {rank}: {what}: {message}")]
    Setup { rank: usize, what: String, message: String },
    #[error("rank {rank}: tensor-parallel results differ from the one-process reference: {failed}")]
    Failed { rank: usize, failed: String },
}

/// Rendezvous, build the world group and run every check on it; `Ok` even when a check fails
/// (the report says which), so the caller can print the report before failing.
pub fn run(env: &DistEnv, device: Device) -> Result<TpCheckReport, TpCheckError> {
    let store = Store::tcp(&env.master_addr, env.master_port, env.rank, env.world_size, env.timeout)?;
    let store = store.prefixed("tp-check/")?;
    let backend = Backend::for_device(device);
    let world: Vec<usize> = (0..env.world_size).collect();
    let pg =
        ProcessGroup::new(&store, backend, env.rank, env.world_size, env.gloo_bind_addr().as_deref(), env.timeout)?
            .named("world", &world);
    let ctx = Ctx { pg: &pg, device };
    let mut checks = Vec::new();
    for kind in [Kind::Float, Kind::Double] {
        checks.push(ctx.mlp(kind, None)?);
        let short_lived = ProcessGroup::new(
            &store.prefixed(&format!("dropped-{kind:?}/"))?,
            backend,
            env.rank,
            env.world_size,
            env.gloo_bind_addr().as_deref(),
            env.timeout,
        )?
        .named(format!("world/dropped-{kind:?}"), &world);
        checks.push(ctx.mlp(kind, Some(short_lived))?);
        checks.push(ctx.gather_scatter_last(kind, true)?);
        checks.push(ctx.gather_scatter_last(kind, false)?);
        checks.push(ctx.sequence_parallel(kind, true)?);
        checks.push(ctx.sequence_parallel(kind, false)?);
    }
    pg.barrier("end of tp-check")?;
    Ok(TpCheckReport {
        rank: env.rank,
        world_size: env.world_size,
        backend: format!("{backend:?}").to_lowercase(),
        device: format!("{device:?}"),
        pass: checks.iter().all(|c| c.pass),
        checks,
    })
}

impl TpCheckReport {
    /// The report's verdict as an error naming each failed check.
    pub fn verdict(&self) -> Result<(), TpCheckError> {
        let failed: Vec<String> = self
            .checks
            .iter()
            .filter(|c| !c.pass)
            .map(|c| format!("{} {} ({} error {:e} > {:e})", c.name, c.dtype, c.worst, c.max_rel_err, c.tol))
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(TpCheckError::Failed { rank: self.rank, failed: failed.join("; ") })
        }
    }
}

struct Ctx<'a> {
    pg: &'a ProcessGroup,
    device: Device,
}

/// A named (got, want) pair.
type Pair = (&'static str, Tensor, Tensor);

impl Ctx<'_> {
    fn rank(&self) -> usize {
        self.pg.rank
    }

    fn world(&self) -> usize {
        self.pg.size
    }

    /// Identical on every rank: seeded on the CPU in f64, then cast and moved.
    fn randn(&self, shape: &[i64], kind: Kind) -> Tensor {
        Tensor::randn(shape, (Kind::Double, Device::Cpu)).to_kind(kind).to_device(self.device)
    }

    fn leaf(t: &Tensor) -> Tensor {
        t.detach().set_requires_grad(true)
    }

    fn grad(&self, t: &Tensor, what: &str) -> Result<Tensor, TpCheckError> {
        let g = t.grad();
        if g.defined() {
            Ok(g)
        } else {
            Err(self.setup(what, "no gradient reached it"))
        }
    }

    fn backward(&self, loss: &Tensor, what: &str) -> Result<(), TpCheckError> {
        loss.f_backward().map_err(|error| TpCheckError::Torch { rank: self.rank(), what: what.into(), error })
    }

    fn setup(&self, what: &str, message: impl std::fmt::Display) -> TpCheckError {
        TpCheckError::Setup { rank: self.rank(), what: what.into(), message: message.to_string() }
    }

    /// MindSpeed's split of `n` units over the group (ranks below `n % w` get one more),
    /// times `width` elements per unit.
    fn unaligned(&self, n: usize, width: i64) -> Result<Vec<i64>, TpCheckError> {
        let parts = mm_spec::layout::tp_partition(n, self.world(), true).map_err(|e| self.setup("split", e))?;
        Ok(parts.into_iter().map(|r| r.len() as i64 * width).collect())
    }

    fn offset(&self, sizes: &[i64]) -> i64 {
        sizes[..self.rank()].iter().sum()
    }

    /// With `short_lived`, the forward runs on that group, which is dropped before the backward:
    /// the graph's nodes must keep its backend alive.
    fn mlp(&self, kind: Kind, short_lived: Option<ProcessGroup>) -> Result<TpCheck, TpCheckError> {
        let pg = short_lived.as_ref().unwrap_or(self.pg);
        let w = self.world() as i64;
        let (s, b, h, f) = (3, 2, 8, 4 * w - 1);
        tch::manual_seed(11);
        let x = self.randn(&[s, b, h], kind);
        let a = self.randn(&[f, h], kind) * 0.5;
        let bw = self.randn(&[h, f], kind) * 0.5;
        let g = self.randn(&[s, b, h], kind);
        let [z, dx, da, db] = self.reference_mlp(&x, &a, &bw, &g)?;

        let ffn = self.unaligned(f as usize, 1)?;
        let (off, len) = (self.offset(&ffn), ffn[self.rank()]);
        let (xp, ap, bp) = (Self::leaf(&x), Self::leaf(&a.narrow(0, off, len)), Self::leaf(&bw.narrow(1, off, len)));
        let xc = pg.copy_to_tp_region(&xp)?;
        let zp = xc.matmul(&ap.tr()).gelu("none").matmul(&bp.tr());
        let zs = pg.reduce_from_tp_region(&zp)?;
        let name = if short_lived.is_some() { "mlp_group_dropped_before_backward" } else { "mlp" };
        drop(short_lived);
        self.backward(&(&zs * &g).sum(kind), "mlp backward")?;
        let pairs = vec![
            ("Z", zs, z),
            ("dX", self.grad(&xp, "X")?, dx),
            ("dA rows", self.grad(&ap, "A rows")?, da.narrow(0, off, len)),
            ("dB columns", self.grad(&bp, "B columns")?, db.narrow(1, off, len)),
        ];
        Ok(verdict(name, kind, ffn, pairs))
    }

    /// X, gradients of `sum(mlp(X) * G)` with respect to X, A and B.
    fn reference_mlp(&self, x: &Tensor, a: &Tensor, b: &Tensor, g: &Tensor) -> Result<[Tensor; 4], TpCheckError> {
        let (x, a, b) = (Self::leaf(x), Self::leaf(a), Self::leaf(b));
        let z = x.matmul(&a.tr()).gelu("none").matmul(&b.tr());
        self.backward(&(&z * g).sum(z.kind()), "reference backward")?;
        Ok([z.detach(), self.grad(&x, "reference X")?, self.grad(&a, "reference A")?, self.grad(&b, "reference B")?])
    }

    fn gather_scatter_last(&self, kind: Kind, uneven: bool) -> Result<TpCheck, TpCheckError> {
        let w = self.world() as i64;
        let (s, b) = (3, 2);
        let (last, sizes) = if uneven {
            let (heads, head_dim) = (3 * w + 1, 2);
            (heads * head_dim, Some(self.unaligned(heads as usize, head_dim)?))
        } else {
            (4 * w, None)
        };
        let split = sizes.clone().unwrap_or_else(|| vec![4; w as usize]);
        let (off, len) = (self.offset(&split), split[self.rank()]);
        tch::manual_seed(12);
        let x = self.randn(&[s, b, last], kind);
        let c = self.randn(&[last], kind);
        let g = self.randn(&[s, b, last], kind);

        let xr = Self::leaf(&x);
        let y = xr.tanh() * &c;
        self.backward(&(&y * &g).sum(kind), "reference backward")?;

        let xp = Self::leaf(&x);
        let own = self.pg.scatter_to_tp_region(&xp, sizes.as_deref())?;
        let yp = own.tanh() * c.narrow(0, off, len);
        let gathered = self.pg.gather_from_tp_region(&yp, sizes.as_deref())?;
        self.backward(&(&gathered * &g).sum(kind), "gather/scatter backward")?;
        let pairs = vec![
            ("own slice", own.detach(), x.narrow(-1, off, len)),
            ("gathered", gathered.detach(), y.detach()),
            ("dX", self.grad(&xp, "X")?, self.grad(&xr, "reference X")?),
        ];
        let name = if uneven { "gather_scatter_last_uneven" } else { "gather_scatter_last_even" };
        Ok(verdict(name, kind, split, pairs))
    }

    fn sequence_parallel(&self, kind: Kind, uneven: bool) -> Result<TpCheck, TpCheckError> {
        let w = self.world() as i64;
        let (b, h, f) = (2, 8, 4 * w);
        let (s, sizes) = if uneven {
            let s = 2 * w + 1;
            (s, Some(self.unaligned(s as usize, 1)?))
        } else {
            (2 * w, None)
        };
        let rows = sizes.clone().unwrap_or_else(|| vec![2; w as usize]);
        let (row_off, row_len) = (self.offset(&rows), rows[self.rank()]);
        let (col_off, col_len) = (4 * self.rank() as i64, 4);
        tch::manual_seed(13);
        let x = self.randn(&[s, b, h], kind);
        let a = self.randn(&[f, h], kind) * 0.5;
        let bw = self.randn(&[h, f], kind) * 0.5;
        let g = self.randn(&[s, b, h], kind);
        let [z, dx, da, db] = self.reference_mlp(&x, &a, &bw, &g)?;

        let xp = Self::leaf(&x);
        let ap = Self::leaf(&a.narrow(0, col_off, col_len));
        let bp = Self::leaf(&bw.narrow(1, col_off, col_len));
        let own_rows = self.pg.scatter_to_sp_region(&xp, sizes.as_deref())?;
        let full = self.pg.gather_from_sp_region(&own_rows, sizes.as_deref())?;
        let zp = full.matmul(&ap.tr()).gelu("none").matmul(&bp.tr());
        let zr = self.pg.reduce_scatter_to_sp_region(&zp, sizes.as_deref())?;
        self.backward(&(&zr * g.narrow(0, row_off, row_len)).sum(kind), "sequence-parallel backward")?;
        let pairs = vec![
            ("Z rows", zr.detach(), z.narrow(0, row_off, row_len)),
            ("dX", self.grad(&xp, "X")?, dx),
            ("dA rows", self.grad(&ap, "A rows")?, da.narrow(0, col_off, col_len)),
            ("dB columns", self.grad(&bp, "B columns")?, db.narrow(1, col_off, col_len)),
        ];
        let name = if uneven { "sequence_parallel_uneven" } else { "sequence_parallel_even" };
        Ok(verdict(name, kind, rows, pairs))
    }
}

/// `max|got − want| / max|want|`; a shape mismatch is an infinite error.
pub fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    if got.size() != want.size() {
        return f64::INFINITY;
    }
    let (got, want) = (got.to_kind(Kind::Double), want.to_kind(Kind::Double));
    let scale = want.abs().max().double_value(&[]).max(f64::MIN_POSITIVE);
    (got - &want).abs().max().double_value(&[]) / scale
}

fn verdict(name: &str, kind: Kind, sizes: Vec<i64>, pairs: Vec<Pair>) -> TpCheck {
    let tol = if kind == Kind::Double { TOL_F64 } else { TOL_F32 };
    let errs: Vec<(&str, f64)> = pairs.iter().map(|(what, got, want)| (*what, rel_err(got, want))).collect();
    // NaN wins: it must fail the check, and `NaN <= tol` is false.
    let (worst, max_rel_err) =
        errs.iter().copied().fold(errs[0], |acc, (what, e)| if e > acc.1 || e.is_nan() { (what, e) } else { acc });
    TpCheck {
        name: name.into(),
        dtype: if kind == Kind::Double { "f64" } else { "f32" }.into(),
        sizes,
        compared: errs.iter().map(|(what, _)| what.to_string()).collect(),
        max_rel_err,
        worst: worst.into(),
        tol,
        pass: max_rel_err <= tol,
    }
}
