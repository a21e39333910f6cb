//! One optimizer step's forwards and backwards on this rank, in the order of mm-spec's
//! pipeline schedule (`mm_spec::layout::schedule`: 1F1B, or interleaved over virtual stages),
//! executed literally: `Forward` runs a chunk on a micro batch, `Backward` runs its backward,
//! `Exchange` posts its sends and receives together and waits for all of them. Without
//! pipelining the schedule is F0 B0 F1 B1 … with no exchanges: plain gradient accumulation.
//!
//! Every pipeline rank reads the same micro batches (the data stream of its data-parallel
//! rank), so each knows the token ids, padding mask and labels it needs: the first chunk embeds
//! the tokens and images, the others continue from the received activation, the last computes
//! the loss. Before each transfer a header (micro batch, payload, shape, dtype) crosses the same
//! way, so the receiver allocates the right buffer for variable sequence lengths and a schedule
//! disagreement is an error naming both sides, never a silently misread tensor.
//!
//! Backward from a received gradient `g` of an output `y` is `(y · g).sum().backward()`: the
//! gradient reaching `y` is exactly `g` (tch has no `backward(grad_output)`), and the gradient
//! of the received input, a leaf, is what goes back to the previous stage.

use std::collections::HashMap;

use mm_spec::layout::{Action, Dir, P2p, Payload, Step};
use tch::{Kind, Tensor};

use crate::data::Batch;
use crate::dist::c10d::{DistError, ProcessGroup};
use crate::model::{InternVL, ModelInput};
use crate::session::to_device;

/// What one step needs besides the model and the batches.
pub struct StepContext<'a> {
    pub image_size: usize,
    pub device: tch::Device,
    /// Reseeds torch before micro batch `micro`'s forward.
    pub seed: &'a dyn Fn(usize),
    /// Training (drop path on) or evaluation.
    pub train: bool,
    /// The objective of a micro batch from its logits and labels (scaled for the whole step).
    pub objective: &'a dyn Fn(&Tensor, &Tensor) -> anyhow::Result<Tensor>,
}

/// Header fields: micro batch, payload, rank of the shape, up to four sizes, dtype code, the
/// sender's virtual stage.
const HEADER: i64 = 9;

fn kind_code(k: Kind) -> i64 {
    match k {
        Kind::Float => 0,
        Kind::BFloat16 => 1,
        Kind::Half => 2,
        Kind::Double => 3,
        _ => -1,
    }
}

fn code_kind(c: i64) -> Option<Kind> {
    Some(match c {
        0 => Kind::Float,
        1 => Kind::BFloat16,
        2 => Kind::Half,
        3 => Kind::Double,
        _ => return None,
    })
}

fn payload_code(p: Payload) -> i64 {
    match p {
        Payload::Activation => 0,
        Payload::Gradient => 1,
    }
}

/// The virtual stage of chunk `chunk` on pipeline rank `rank` of `pp`.
fn virtual_stage(chunk: usize, rank: usize, pp: usize) -> i64 {
    (chunk * pp + rank) as i64
}

fn header(t: &Tensor, op: &P2p, pg: &ProcessGroup) -> Tensor {
    let size = t.size();
    let stage = virtual_stage(op.chunk, pg.rank, pg.size);
    let mut h =
        vec![op.micro as i64, payload_code(op.payload), size.len() as i64, 0, 0, 0, 0, kind_code(t.kind()), stage];
    for (i, d) in size.iter().take(4).enumerate() {
        h[3 + i] = *d;
    }
    Tensor::from_slice(&h)
}

type Key = (usize, usize);

/// The tensors one step holds between its actions, by (chunk, micro batch).
#[derive(Default)]
struct InFlight {
    /// Received activations (leaves that require grad), kept for the backward.
    inputs: HashMap<Key, Tensor>,
    /// Forward outputs: activations to send and back-propagate, or the last chunk's objective.
    outputs: HashMap<Key, Tensor>,
    /// Gradients received for the outputs.
    output_grads: HashMap<Key, Tensor>,
    /// Gradients of the received inputs, to send back.
    input_grads: HashMap<Key, Tensor>,
}

/// What one step did on this rank.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepOutcome {
    /// Σ of the objectives this rank computed (the last stage's; 0 on the others).
    pub loss: f64,
    /// Seconds spent in exchanges: waiting for the neighbours plus moving the tensors (the
    /// measured bubble, beside the schedule's theoretical one).
    pub exchange_secs: f64,
    /// Seconds of the whole step's forwards, backwards and exchanges.
    pub total_secs: f64,
}

/// Runs `actions` (this rank's schedule for the step) over `chunks` (this rank's model chunks,
/// in vp order) and `batches` (its micro batches); `after_backward` runs after every backward
/// (the optimizer's gradient accumulation).
pub fn run_step(
    actions: &[Action],
    chunks: &[&InternVL],
    batches: &[Batch],
    ctx: &StepContext,
    group: Option<&ProcessGroup>,
    after_backward: &mut dyn FnMut(),
) -> anyhow::Result<StepOutcome> {
    let started = std::time::Instant::now();
    let mut st = InFlight::default();
    let mut loss = 0.0;
    let mut exchange_secs = 0.0;
    for action in actions {
        match action {
            Action::Forward(s) => loss += forward(s, chunks, batches, ctx, &mut st)?,
            Action::Backward(s) => {
                backward(s, &mut st)?;
                after_backward();
            }
            Action::Exchange(ops) => {
                let pg = group.ok_or_else(|| anyhow::anyhow!("a pipeline exchange without a pipeline group"))?;
                let t = std::time::Instant::now();
                exchange(pg, ops, &mut st, ctx.device)?;
                exchange_secs += t.elapsed().as_secs_f64();
            }
        }
    }
    let left = st.inputs.len() + st.outputs.len() + st.output_grads.len() + st.input_grads.len();
    anyhow::ensure!(left == 0, "internal error: the pipeline schedule left {left} tensors unused");
    Ok(StepOutcome { loss, exchange_secs, total_secs: started.elapsed().as_secs_f64() })
}

/// Forward only (evaluation, under `no_grad`): micro batch after micro batch, each chunk
/// receives its input from the previous virtual stage, runs and sends its output on, a chain
/// with no cycle, so one transfer at a time cannot deadlock. `loss(logits, labels)` runs on the
/// last virtual stage; returns the sum of its values over the micro batches (0 elsewhere).
pub fn run_forward_only(
    chunks: &[&InternVL],
    batches: &[Batch],
    ctx: &StepContext,
    group: Option<&ProcessGroup>,
) -> anyhow::Result<f64> {
    let (rank, pp) = group.map_or((0, 1), |g| (g.rank, g.size));
    let stages = chunks.len() * pp;
    let mut st = InFlight::default();
    let no_group = || anyhow::anyhow!("a pipeline transfer without a pipeline group");
    let mut total = 0.0;
    for micro in 0..batches.len() {
        for (c, model) in chunks.iter().enumerate() {
            let stage = c * pp + rank;
            let step = Step { chunk: c, micro, first: stage == 0, last: stage + 1 == stages };
            if !step.first {
                let from = (rank + pp - 1) % pp;
                let op = P2p { dir: Dir::Recv, payload: Payload::Activation, peer: from, chunk: c, micro };
                exchange(group.ok_or_else(no_group)?, &[op], &mut st, ctx.device)?;
            }
            anyhow::ensure!(model.part.first == step.first && model.part.last == step.last, "chunk {c} misplaced");
            total += forward(&step, chunks, batches, ctx, &mut st)?;
            let key = (c, micro);
            if !step.last {
                let op = P2p { dir: Dir::Send, payload: Payload::Activation, peer: (rank + 1) % pp, chunk: c, micro };
                exchange(group.ok_or_else(no_group)?, &[op], &mut st, ctx.device)?;
            }
            st.outputs.remove(&key);
            st.inputs.remove(&key);
        }
    }
    Ok(total)
}

fn chunk<'a>(chunks: &[&'a InternVL], s: &Step) -> anyhow::Result<&'a InternVL> {
    let m = *chunks.get(s.chunk).ok_or_else(|| anyhow::anyhow!("the schedule names chunk {}", s.chunk))?;
    anyhow::ensure!(
        m.part.first == s.first && m.part.last == s.last,
        "internal error: chunk {} is {:?} but the schedule says first {} last {}",
        s.chunk,
        m.part,
        s.first,
        s.last
    );
    Ok(m)
}

fn forward(
    s: &Step,
    chunks: &[&InternVL],
    batches: &[Batch],
    ctx: &StepContext,
    st: &mut InFlight,
) -> anyhow::Result<f64> {
    let model = chunk(chunks, s)?;
    let batch = batches.get(s.micro).ok_or_else(|| anyhow::anyhow!("the schedule names micro batch {}", s.micro))?;
    (ctx.seed)(s.micro);
    let (input, labels): (ModelInput, Tensor) = to_device(batch, ctx.image_size, ctx.device);
    let key = (s.chunk, s.micro);
    let received = if s.first {
        None
    } else {
        let x = st.inputs.get(&key).ok_or_else(|| anyhow::anyhow!("no activation received for {key:?}"))?;
        let (rows, hidden) = (batch.rows as i64, model.cfg.llm.hidden_size as i64);
        let size = x.size();
        anyhow::ensure!(
            size.len() == 3 && size[0] == rows && size[2] == hidden,
            "pipeline: the activation received for micro batch {} has shape {size:?}, this rank's micro batch has \
             {rows} rows of width {hidden}: the stages read different data (is --data-path the same file on every \
             host?)",
            s.micro
        );
        Some(x.shallow_clone())
    };
    let out = model.forward_part(&input, received.as_ref(), ctx.train)?;
    if s.last {
        let obj = (ctx.objective)(&out, &labels)?;
        let v = obj.double_value(&[]);
        st.outputs.insert(key, obj);
        Ok(v)
    } else {
        st.outputs.insert(key, out);
        Ok(0.0)
    }
}

fn backward(s: &Step, st: &mut InFlight) -> anyhow::Result<()> {
    let key = (s.chunk, s.micro);
    let out = st.outputs.remove(&key).ok_or_else(|| anyhow::anyhow!("backward of {key:?} before its forward"))?;
    // f_backward: a tensor-parallel collective in the backward can fail (a peer died). An
    // output nothing trainable led to (frozen towers, a text-only micro batch) has no graph.
    if s.last {
        if out.requires_grad() {
            out.f_backward()?;
        }
    } else {
        let g = st.output_grads.remove(&key).ok_or_else(|| anyhow::anyhow!("no gradient received for {key:?}"))?;
        if out.requires_grad() {
            (&out * g).sum(out.kind()).f_backward()?;
        }
    }
    if !s.first {
        let x = st.inputs.remove(&key).ok_or_else(|| anyhow::anyhow!("no input kept for {key:?}"))?;
        let g = x.grad();
        // An input no parameter-carrying path used still owes its stage a gradient: zeros.
        let g = if g.defined() { g } else { x.zeros_like() };
        st.input_grads.insert(key, g);
    }
    Ok(())
}

fn exchange(pg: &ProcessGroup, ops: &[P2p], st: &mut InFlight, device: tch::Device) -> Result<(), DistError> {
    let what = |op: &P2p| format!("pipeline {op}");
    // The tensors to send, in op order.
    let mut sending: Vec<Option<Tensor>> = Vec::with_capacity(ops.len());
    for op in ops {
        sending.push(match op.dir {
            Dir::Recv => None,
            Dir::Send => {
                let key = (op.chunk, op.micro);
                let t = match op.payload {
                    Payload::Activation => st.outputs.get(&key).map(|t| t.detach().contiguous()),
                    Payload::Gradient => st.input_grads.remove(&key).map(|t| t.contiguous()),
                };
                Some(t.ok_or_else(|| DistError {
                    rank: pg.global_rank(),
                    op: what(op),
                    message: "the schedule sends a tensor this rank does not have".into(),
                })?)
            }
        });
    }
    // Headers first, the same way as the data.
    let headers: Vec<Tensor> = ops
        .iter()
        .zip(&sending)
        .map(|(op, t)| match t {
            Some(t) => header(t, op, pg),
            None => Tensor::zeros([HEADER], (Kind::Int64, tch::Device::Cpu)),
        })
        .collect();
    let hdr_device: Vec<Tensor> = headers.iter().map(|h| h.to_device(device)).collect();
    let hops: Vec<(&Tensor, usize, bool)> =
        ops.iter().zip(&hdr_device).map(|(op, h)| (h, op.peer, op.dir == Dir::Send)).collect();
    pg.batch_p2p(&hops, "pipeline headers")?;
    // Buffers for what arrives, checked against what the schedule expects.
    let mut buffers: Vec<Tensor> = Vec::with_capacity(ops.len());
    for ((op, t), h) in ops.iter().zip(&sending).zip(&hdr_device) {
        match t {
            Some(t) => buffers.push(t.shallow_clone()),
            None => {
                let h: Vec<i64> = Vec::<i64>::try_from(&h.to_device(tch::Device::Cpu)).unwrap_or_default();
                let bad = |message: String| DistError { rank: pg.global_rank(), op: what(op), message };
                // An activation comes from the previous virtual stage, a gradient from the next.
                let mine = virtual_stage(op.chunk, pg.rank, pg.size);
                let from = match op.payload {
                    Payload::Activation => mine - 1,
                    Payload::Gradient => mine + 1,
                };
                if h.len() != HEADER as usize
                    || h[0] != op.micro as i64
                    || h[1] != payload_code(op.payload)
                    || h[8] != from
                {
                    return Err(bad(format!(
                        "the peer sent {h:?} (micro batch, payload, shape, dtype, virtual stage) where this rank's \
                         schedule expects micro batch {} {} from virtual stage {from}: the ranks run different \
                         schedules (different --global-batch-size, --micro-batch-size or pipeline flags?)",
                        op.micro, op.payload
                    )));
                }
                let ndim = h[2];
                if !(1..=4).contains(&ndim) || h[3..3 + ndim as usize].iter().any(|&d| d < 0) {
                    return Err(bad(format!("the peer sent an impossible shape header {h:?}")));
                }
                let shape: Vec<i64> = h[3..3 + ndim as usize].to_vec();
                let kind = code_kind(h[7]).ok_or_else(|| bad(format!("unknown dtype code {}", h[7])))?;
                buffers.push(Tensor::zeros(shape.as_slice(), (kind, device)));
            }
        }
    }
    let dops: Vec<(&Tensor, usize, bool)> =
        ops.iter().zip(&buffers).map(|(op, t)| (t, op.peer, op.dir == Dir::Send)).collect();
    pg.batch_p2p(&dops, "pipeline tensors")?;
    for (op, t) in ops.iter().zip(buffers) {
        if op.dir == Dir::Recv {
            let key = (op.chunk, op.micro);
            match op.payload {
                Payload::Activation => {
                    st.inputs.insert(key, t.set_requires_grad(true));
                }
                Payload::Gradient => {
                    st.output_grads.insert(key, t);
                }
            }
        }
    }
    Ok(())
}
