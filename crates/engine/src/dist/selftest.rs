//! `mm-engine collective-check`: proves that every rank can rendezvous and that each
//! collective the trainer uses returns the right numbers, then measures all-reduce
//! bandwidth. The same role nccl-tests plays, on the exact c10d objects the trainer uses.

use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::c10d::{Backend, DistError, ProcessGroup, ReduceOp, Store};
use super::env::DistEnv;

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub rank: usize,
    pub world_size: usize,
    pub backend: String,
    pub device: String,
    pub checks: Vec<String>,
    pub allreduce_bytes: usize,
    pub allreduce_ms: f64,
    /// Bus bandwidth as nccl-tests defines it: bytes · 2(n−1)/n / time.
    pub allreduce_busbw_gbps: f64,
    /// With a layout (`--tp/--cp/--pp`): each group this rank belongs to, checked.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupReport>,
}

/// One checked communicator: its kind and the global ranks in it (group-rank order).
#[derive(Debug, Serialize)]
pub struct GroupReport {
    pub kind: String,
    pub ranks: Vec<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Dist(#[from] DistError),
    #[error("rank {rank}: {op} returned {got:?}, expected {want:?}")]
    Mismatch { rank: usize, op: &'static str, got: Vec<f64>, want: Vec<f64> },
}

fn values(t: &Tensor) -> Vec<f64> {
    let t = t.to_device(Device::Cpu).to_kind(Kind::Double).flatten(0, -1);
    Vec::<f64>::try_from(&t).unwrap_or_default()
}

fn expect(rank: usize, op: &'static str, t: &Tensor, want: Vec<f64>) -> Result<(), CheckError> {
    let got = values(t);
    if got == want {
        Ok(())
    } else {
        Err(CheckError::Mismatch { rank, op, got, want })
    }
}

/// Rendezvous once, check every collective on the world group, then (with `dims`) build the
/// layout's groups on the same store and check them with [`check_groups`].
pub fn run(
    env: &DistEnv,
    device: Device,
    bytes: usize,
    dims: Option<mm_spec::layout::ParallelDims>,
) -> Result<CheckReport, CheckError> {
    let (r, w) = (env.rank, env.world_size);
    // One TCPStore for both parts: a second one on the same port could race with the first's
    // shutdown on rank 0.
    let store = Store::tcp(&env.master_addr, env.master_port, r, w, env.timeout)?;
    let mut report = run_on(&store.prefixed("check/")?, env, device, bytes)?;
    if let Some(dims) = dims {
        report.groups = check_groups(store.prefixed("groups/")?, env, dims, device)?
            .into_iter()
            .map(|(kind, ranks)| GroupReport { kind, ranks })
            .collect();
    }
    Ok(report)
}

fn run_on(store: &Store, env: &DistEnv, device: Device, bytes: usize) -> Result<CheckReport, CheckError> {
    let (r, w) = (env.rank, env.world_size);
    let backend = Backend::for_device(device);
    let pg = ProcessGroup::new(store, backend, r, w, env.gloo_bind_addr().as_deref(), env.timeout)?
        .named("world", &(0..w).collect::<Vec<_>>());
    let opts = (Kind::Float, device);
    let mut checks = Vec::new();

    let mut t = Tensor::full([4], (r + 1) as f64, opts);
    pg.all_reduce(&mut t, ReduceOp::Sum, "check: all_reduce(sum)")?;
    expect(r, "all_reduce(sum)", &t, vec![(w * (w + 1) / 2) as f64; 4])?;
    checks.push("all_reduce(sum)".to_string());

    let mut t = Tensor::full([3], r as f64, opts);
    pg.all_reduce(&mut t, ReduceOp::Max, "check: all_reduce(max)")?;
    expect(r, "all_reduce(max)", &t, vec![(w - 1) as f64; 3])?;
    checks.push("all_reduce(max)".to_string());

    let mut t =
        if r == 0 { Tensor::from_slice(&[7.0f32, 8.0, 9.0]).to_device(device) } else { Tensor::zeros([3], opts) };
    pg.broadcast(&mut t, 0, "check")?;
    expect(r, "broadcast", &t, vec![7.0, 8.0, 9.0])?;
    checks.push("broadcast".to_string());

    let input = Tensor::full([2], r as f64, opts);
    let mut out = Tensor::zeros([2 * w as i64], opts);
    pg.all_gather(&mut out, &input, "check")?;
    expect(r, "all_gather", &out, (0..w).flat_map(|i| [i as f64, i as f64]).collect())?;
    checks.push("all_gather".to_string());

    // Slot j of rank q's input holds q + j; rank r receives Σ_q (q + 2r + k) for k in 0..2.
    let input = Tensor::arange((2 * w) as i64, opts) + r as f64;
    let mut out = Tensor::zeros([2], opts);
    pg.reduce_scatter(&mut out, &input, ReduceOp::Sum, "check")?;
    let base = (w * (w - 1) / 2) as f64;
    expect(r, "reduce_scatter", &out, (0..2).map(|k| base + (w * (2 * r + k)) as f64).collect())?;
    checks.push("reduce_scatter".to_string());

    if w >= 2 && r < 2 {
        // A round trip between ranks 0 and 1: 0 sends, 1 answers with the value doubled.
        if r == 0 {
            pg.send(&Tensor::from_slice(&[1.5f32, -2.0]).to_device(device), 1, 0, "check")?;
            let mut back = Tensor::zeros([2], opts);
            pg.recv(&mut back, 1, 1, "check")?;
            expect(r, "send/recv", &back, vec![3.0, -4.0])?;
        } else {
            let mut got = Tensor::zeros([2], opts);
            pg.recv(&mut got, 0, 0, "check")?;
            pg.send(&(&got * 2.0), 0, 1, "check")?;
        }
        checks.push("send/recv".to_string());
    }

    pg.barrier("check")?;
    checks.push("barrier".to_string());

    let n = (bytes / 4).max(1) as i64;
    let mut big = Tensor::ones([n], opts);
    pg.all_reduce(&mut big, ReduceOp::Sum, "bandwidth warm-up")?; // warm-up (connection setup, allocation)
    let iters = 5;
    let start = Instant::now();
    for _ in 0..iters {
        pg.all_reduce(&mut big, ReduceOp::Sum, "bandwidth")?;
    }
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0 / iters as f64;
    let busbw = (n as f64 * 4.0) * 2.0 * (w as f64 - 1.0) / w as f64 / (ms / 1000.0) / 1e9;
    Ok(CheckReport {
        rank: r,
        world_size: w,
        backend: format!("{backend:?}").to_lowercase(),
        device: format!("{device:?}"),
        checks,
        allreduce_bytes: n as usize * 4,
        allreduce_ms: ms,
        allreduce_busbw_gbps: if w > 1 { busbw } else { 0.0 },
        groups: Vec::new(),
    })
}

/// Builds this rank's tp/cp/dp/pp/dp_cp groups from the layout on `store` (one rendezvous
/// already made) and checks each one: an all-reduce of the global ranks must give the sum over
/// exactly the ranks the layout puts in that group, and an all-gather must return them in
/// group-rank order. Proves the launcher's rank table and the engine's communicators agree.
pub fn check_groups(
    store: Store,
    env: &DistEnv,
    dims: mm_spec::layout::ParallelDims,
    device: Device,
) -> Result<Vec<(String, Vec<usize>)>, CheckError> {
    let groups = super::groups::ParallelGroups::on_store(store, env, dims, Backend::for_device(device))?;
    let mut seen = Vec::new();
    for g in groups.groups() {
        let mut t = Tensor::full([1], env.rank as f64, (Kind::Float, device));
        g.pg.all_reduce(&mut t, ReduceOp::Sum, "group check")?;
        let want = g.ranks.iter().sum::<usize>() as f64;
        expect(env.rank, "group all_reduce", &t, vec![want])?;
        let mine = Tensor::full([1], env.rank as f64, (Kind::Float, device));
        let mut all = Tensor::zeros([g.size() as i64], (Kind::Float, device));
        g.pg.all_gather(&mut all, &mine, "group check")?;
        expect(env.rank, "group all_gather", &all, g.ranks.iter().map(|&r| r as f64).collect())?;
        seen.push((format!("{:?}", g.kind).to_lowercase(), g.ranks.clone()));
    }
    groups.world.barrier("group check")?;
    Ok(seen)
}
