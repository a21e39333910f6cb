//! Pipeline-parallel schedules: what one pipeline rank does, in order, during one optimizer
//! step of `m` micro batches. Pure functions of `(pp, rank, m, vpp)`, so the engine runs them
//! literally and tests check them, all ranks together, without a GPU.
//!
//! Two schedules, both in Megatron-LM's order (`megatron/core/pipeline_parallel/schedules.py`):
//! - [`one_f_one_b`] (`forward_backward_pipelining_without_interleaving`): `pp − rank − 1`
//!   warm-up forwards, then pairs of one forward and one backward, then the cool-down backwards.
//!   With `pp = 1` it is plain gradient accumulation, F0 B0 F1 B1 …
//! - [`interleaved`] (`forward_backward_pipelining_with_interleaving`, `vpp ≥ 2`): each rank
//!   holds `vpp` model chunks; forwards walk the chunks in groups of `pp` micro batches, and
//!   backwards walk them in reverse.
//!
//! ```text
//!   virtual stage s = chunk·pp + rank        (model order, as split_layers numbers chunks)
//!   activation  s ──► s+1 on rank (s+1) % pp  (rank pp−1 chunk c feeds rank 0 chunk c+1)
//!   gradient    s ──► s−1 on rank (s−1) % pp
//!   stage 0 reads the micro batch; stage pp·vpp − 1 computes the loss and starts the backward
//! ```
//!
//! Communication is an [`Action::Exchange`]: a batch of sends and receives that the engine
//! posts together (`batch_isend_irecv`) and then waits for as a whole. It must not run them one
//! by one as blocking calls: in the 1F1B steady state rank r sends an activation to r+1 while
//! r+1 sends a gradient to r, and two blocking sends facing each other deadlock. Each pair of
//! ranks sees its tensors in the same order on both ends, so one communicator (NCCL matches
//! transfers between two ranks in posting order, with no tags) carries them all; [`simulate`]
//! proves it. Within a batch, activations come before gradients: with pp = 2 the previous and
//! the next rank are the same rank, and Megatron's batched order (send prev, recv prev, send
//! next, recv next) would pair one rank's gradient with the other's activation (Megatron, which
//! batches in that order, refuses interleaving with pp = 2 unless p2p overlap is on).
//!
//! Pitfalls: a receive names the chunk that will *consume* the tensor, a send the chunk that
//! produced it; on rank 0 of the interleaved schedule a receive is often for a later forward
//! than the next one, so keep received tensors by `(chunk, micro)`, not in one queue.

mod error;
mod simulate;

use std::fmt;

use serde::{Deserialize, Serialize};

use super::error::LayoutError;
pub use error::ScheduleError;
pub use simulate::{simulate, Compute, Pass, RankTimeline, Timeline, BACKWARD_COST, FORWARD_COST};

/// One forward or backward pass of one model chunk on one micro batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Step {
    /// The model chunk on this rank (its vp stage), `0..vpp`.
    pub chunk: usize,
    /// The micro batch, `0..m`.
    pub micro: usize,
    /// The first virtual stage (rank 0, chunk 0): its forward reads the micro batch from the
    /// data instead of receiving an activation, its backward sends no gradient.
    pub first: bool,
    /// The last virtual stage (rank pp−1, chunk vpp−1): its forward computes the loss and sends
    /// nothing, its backward starts from the loss instead of a received gradient.
    pub last: bool,
}

/// What crosses between pipeline ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// A chunk's output, flowing to the next virtual stage.
    Activation,
    /// The gradient of a chunk's input, flowing back to the previous virtual stage.
    Gradient,
}

/// Which end of a transfer this rank is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dir {
    Send,
    Recv,
}

/// One point-to-point transfer inside an [`Action::Exchange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct P2p {
    pub dir: Dir,
    pub payload: Payload,
    /// The pipeline rank on the other end.
    pub peer: usize,
    /// The chunk on this rank that produced (send) or will consume (recv) the tensor.
    pub chunk: usize,
    pub micro: usize,
}

/// One thing a pipeline rank does, in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Forward(Step),
    Backward(Step),
    /// Post every transfer at once, then wait for all of them (never empty).
    Exchange(Vec<P2p>),
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Payload::Activation => "activation",
            Payload::Gradient => "gradient",
        })
    }
}

impl fmt::Display for P2p {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (verb, dir) = match self.dir {
            Dir::Send => ("send", "to"),
            Dir::Recv => ("recv", "from"),
        };
        write!(f, "{verb} {} chunk {} micro {} {dir} rank {}", self.payload, self.chunk, self.micro, self.peer)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Forward(s) => write!(f, "forward chunk {} micro {}", s.chunk, s.micro),
            Action::Backward(s) => write!(f, "backward chunk {} micro {}", s.chunk, s.micro),
            Action::Exchange(ops) => {
                let ops: Vec<String> = ops.iter().map(|op| op.to_string()).collect();
                write!(f, "exchange [{}]", ops.join(", "))
            }
        }
    }
}

/// The schedule the layout calls for: [`one_f_one_b`] with one virtual stage per rank,
/// [`interleaved`] with more (Megatron treats `vpp = 1` as no interleaving too).
pub fn schedule(
    pp: usize,
    rank: usize,
    micro_batches: usize,
    virtual_stages: usize,
) -> Result<Vec<Action>, ScheduleError> {
    match virtual_stages {
        0 => Err(zero("vpp")),
        1 => one_f_one_b(pp, rank, micro_batches),
        vpp => interleaved(pp, rank, micro_batches, vpp),
    }
}

/// The fraction of each rank's step spent idle in the ideal pipeline (forward and backward
/// times fixed, communication free): `(pp−1) / (vpp·m + pp−1)`, i.e. bubble ÷ (bubble + work).
///
/// Megatron's paper states it relative to the work instead, `(pp−1) / (vpp·m)`; this form is
/// the one a measurement gives directly (idle time ÷ step time) and stays below 1.
/// `virtual_stages` is 1 for [`one_f_one_b`], giving `(pp−1) / (m + pp−1)`.
pub fn theoretical_bubble(pp: usize, virtual_stages: usize, micro_batches: usize) -> f64 {
    let fill = pp.saturating_sub(1) as f64;
    let work = (virtual_stages.max(1) * micro_batches) as f64;
    if fill + work == 0.0 {
        return 0.0;
    }
    fill / (work + fill)
}

/// Megatron's non-interleaved 1F1B schedule for pipeline rank `rank` of `pp`.
///
/// `min(pp − rank − 1, m)` warm-up forwards fill the pipeline; each later forward is followed
/// by the backward of the oldest micro batch still held, so a rank never holds more than
/// `pp − rank` activations; the cool-down runs the backwards left.
pub fn one_f_one_b(pp: usize, rank: usize, micro_batches: usize) -> Result<Vec<Action>, ScheduleError> {
    check_common(pp, rank, micro_batches)?;
    let ring = Ring { pp, rank, vpp: 1 };
    let m = micro_batches;
    let warmup = (pp - rank - 1).min(m);
    let steady = m - warmup;
    let mut out = Vec::new();

    for i in 0..warmup {
        exchange(&mut out, [ring.recv_activation(0, i)]);
        out.push(Action::Forward(ring.step(0, i)));
        exchange(&mut out, [ring.send_activation(0, i)]);
    }
    if steady > 0 {
        exchange(&mut out, [ring.recv_activation(0, warmup)]);
    }
    for i in 0..steady {
        let fwd = warmup + i;
        out.push(Action::Forward(ring.step(0, fwd)));
        exchange(&mut out, [ring.send_activation(0, fwd), ring.recv_gradient(0, i)]);
        out.push(Action::Backward(ring.step(0, i)));
        // The next forward's input travels with this gradient, except after the last forward.
        let next = (i + 1 < steady).then(|| ring.recv_activation(0, fwd + 1)).flatten();
        exchange(&mut out, [next, ring.send_gradient(0, i)]);
    }
    for bwd in steady..m {
        exchange(&mut out, [ring.recv_gradient(0, bwd)]);
        out.push(Action::Backward(ring.step(0, bwd)));
        exchange(&mut out, [ring.send_gradient(0, bwd)]);
    }
    Ok(out)
}

/// Megatron's interleaved schedule for pipeline rank `rank` of `pp`, with `vpp` model chunks
/// per rank (`--virtual-pipeline-model-parallel-size`).
///
/// The k-th forward runs chunk `(k mod pp·vpp) div pp` on micro batch
/// `(k div pp·vpp)·pp + k mod pp`: groups of `pp` micro batches pass through chunk 0, then chunk
/// 1, …; the k-th backward takes the same micro batch through chunk `vpp − 1 − that`. Warm-up is
/// `(pp − rank − 1)·2 + (vpp − 1)·pp` forwards, capped at all `m·vpp` of them (then every
/// backward runs in the cool-down; this is Megatron's rule since 2024, which no longer puts
/// every rank in warm-up just because `m = pp`). The micro batches must be a multiple of `pp`
/// (Megatron's classic rule; newer versions relax it with
/// `--microbatch-group-size-per-virtual-pipeline-stage`, which this does not model).
pub fn interleaved(pp: usize, rank: usize, micro_batches: usize, vpp: usize) -> Result<Vec<Action>, ScheduleError> {
    check_common(pp, rank, micro_batches)?;
    if vpp < 2 {
        return Err(LayoutError::VppTooSmall { vpp }.into());
    }
    if pp < 2 {
        return Err(LayoutError::VppNeedsPp { vpp, pp }.into());
    }
    if micro_batches % pp != 0 {
        let suggestion = micro_batches.div_ceil(pp) * pp;
        return Err(ScheduleError::MicroBatchesNotMultiple { micro_batches, pp, suggestion });
    }
    let ring = Ring { pp, rank, vpp };
    let order = Interleaving { pp, vpp, total: micro_batches * vpp };
    let total = order.total;
    let warmup = ((pp - rank - 1) * 2 + (vpp - 1) * pp).min(total);
    let all_warmup = warmup == total;
    let steady = total - warmup;
    let mut out = Vec::new();

    let (c, i) = order.forward(0);
    exchange(&mut out, [ring.recv_activation(c, i)]);
    for k in 0..warmup {
        let (c, i) = order.forward(k);
        out.push(Action::Forward(ring.step(c, i)));
        let recv = order.activation_to_receive_after(rank, k);
        let recv = recv.and_then(|(c, i)| ring.recv_activation(c, i));
        let send = ring.send_activation(c, i);
        if k + 1 == warmup && !all_warmup {
            // The last warm-up exchange also fetches the gradient for the first backward.
            let (bc, bi) = order.backward(0);
            exchange(&mut out, [recv, send, ring.recv_gradient(bc, bi)]);
        } else {
            exchange(&mut out, [recv, send]);
        }
    }
    for k in 0..steady {
        let fwd = warmup + k;
        let (fc, fi) = order.forward(fwd);
        let (bc, bi) = order.backward(k);
        out.push(Action::Forward(ring.step(fc, fi)));
        out.push(Action::Backward(ring.step(bc, bi)));
        let recv_act = order.activation_to_receive_after(rank, fwd).and_then(|(c, i)| ring.recv_activation(c, i));
        let recv_grad = order.gradient_to_receive_after(rank, k).and_then(|(c, i)| ring.recv_gradient(c, i));
        exchange(&mut out, [recv_act, ring.send_activation(fc, fi), ring.send_gradient(bc, bi), recv_grad]);
    }
    if all_warmup {
        let (c, i) = order.backward(0);
        exchange(&mut out, [ring.recv_gradient(c, i)]);
    }
    for k in steady..total {
        let (c, i) = order.backward(k);
        out.push(Action::Backward(ring.step(c, i)));
        let recv = order.gradient_to_receive_after(rank, k).and_then(|(c, i)| ring.recv_gradient(c, i));
        exchange(&mut out, [ring.send_gradient(c, i), recv]);
    }
    Ok(out)
}

fn check_common(pp: usize, rank: usize, micro_batches: usize) -> Result<(), ScheduleError> {
    if pp == 0 {
        return Err(zero("pp"));
    }
    if micro_batches == 0 {
        return Err(zero("micro batches"));
    }
    if rank >= pp {
        return Err(ScheduleError::RankOutOfRange { rank, pp });
    }
    Ok(())
}

fn zero(name: &str) -> ScheduleError {
    LayoutError::Zero { name: name.into() }.into()
}

/// Whether the other end of a transfer is the next virtual stage (activations go there,
/// gradients come from there) rather than the previous one.
fn faces_next_stage(dir: Dir, payload: Payload) -> bool {
    matches!((dir, payload), (Dir::Send, Payload::Activation) | (Dir::Recv, Payload::Gradient))
}

/// Pushes the present transfers as one exchange, or nothing when none is.
fn exchange<const N: usize>(out: &mut Vec<Action>, ops: [Option<P2p>; N]) {
    let ops: Vec<P2p> = ops.into_iter().flatten().collect();
    if !ops.is_empty() {
        out.push(Action::Exchange(ops));
    }
}

/// One rank's place in the ring of virtual stages: who is on the other end of each transfer,
/// and which transfers do not exist at the ends of the model.
struct Ring {
    pp: usize,
    rank: usize,
    vpp: usize,
}

impl Ring {
    fn is_first(&self, chunk: usize) -> bool {
        self.rank == 0 && chunk == 0
    }
    fn is_last(&self, chunk: usize) -> bool {
        self.rank == self.pp - 1 && chunk == self.vpp - 1
    }
    fn prev(&self) -> usize {
        (self.rank + self.pp - 1) % self.pp
    }
    fn next(&self) -> usize {
        (self.rank + 1) % self.pp
    }
    fn step(&self, chunk: usize, micro: usize) -> Step {
        Step { chunk, micro, first: self.is_first(chunk), last: self.is_last(chunk) }
    }
    /// The transfer, or `None` at the ends of the model: nothing enters the first stage's
    /// forward or leaves its backward, nothing leaves the last stage's forward or enters its
    /// backward.
    fn transfer(&self, dir: Dir, payload: Payload, chunk: usize, micro: usize) -> Option<P2p> {
        let (at_end, peer) = if faces_next_stage(dir, payload) {
            (self.is_last(chunk), self.next())
        } else {
            (self.is_first(chunk), self.prev())
        };
        (!at_end).then_some(P2p { dir, payload, peer, chunk, micro })
    }
    fn recv_activation(&self, chunk: usize, micro: usize) -> Option<P2p> {
        self.transfer(Dir::Recv, Payload::Activation, chunk, micro)
    }
    fn send_activation(&self, chunk: usize, micro: usize) -> Option<P2p> {
        self.transfer(Dir::Send, Payload::Activation, chunk, micro)
    }
    fn recv_gradient(&self, chunk: usize, micro: usize) -> Option<P2p> {
        self.transfer(Dir::Recv, Payload::Gradient, chunk, micro)
    }
    fn send_gradient(&self, chunk: usize, micro: usize) -> Option<P2p> {
        self.transfer(Dir::Send, Payload::Gradient, chunk, micro)
    }
}

/// The interleaved order of (chunk, micro) pairs, the same on every rank.
struct Interleaving {
    pp: usize,
    vpp: usize,
    /// Forwards (and backwards) per rank: `m·vpp`.
    total: usize,
}

impl Interleaving {
    /// The (chunk, micro) of the k-th forward.
    fn forward(&self, k: usize) -> (usize, usize) {
        let round = self.pp * self.vpp;
        ((k % round) / self.pp, (k / round) * self.pp + k % self.pp)
    }

    /// The (chunk, micro) of the k-th backward: the same micro batch, chunks in reverse.
    fn backward(&self, k: usize) -> (usize, usize) {
        let (chunk, micro) = self.forward(k);
        (self.vpp - 1 - chunk, micro)
    }

    /// The activation `rank` receives in the exchange after its k-th forward. On rank 0 it
    /// comes from rank pp−1, which is `pp − 1` forwards behind, so it is the output of that
    /// rank's (k − pp + 1)-th forward, headed for the next chunk; elsewhere it is the input of
    /// this rank's own next forward.
    fn activation_to_receive_after(&self, rank: usize, k: usize) -> Option<(usize, usize)> {
        if k + 1 >= self.total {
            return None;
        }
        if rank > 0 {
            return Some(self.forward(k + 1));
        }
        let behind = k.checked_sub(self.pp - 1)?;
        let (chunk, micro) = self.forward(behind);
        (chunk + 1 < self.vpp).then_some((chunk + 1, micro))
    }

    /// The gradient `rank` receives in the exchange after its k-th backward; the mirror image
    /// of [`Interleaving::activation_to_receive_after`], with rank pp−1 leading.
    fn gradient_to_receive_after(&self, rank: usize, k: usize) -> Option<(usize, usize)> {
        if k + 1 >= self.total {
            return None;
        }
        if rank < self.pp - 1 {
            return Some(self.backward(k + 1));
        }
        let behind = k.checked_sub(self.pp - 1)?;
        let (chunk, micro) = self.backward(behind);
        chunk.checked_sub(1).map(|c| (c, micro))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The compute order of a schedule, `F3` / `B0` for 1F1B (micro batch) and `F1.0` (chunk 1,
    /// micro 0) for the interleaved one, separated by spaces; exchanges left out.
    fn order(actions: &[Action], chunks: bool) -> String {
        let name = |pass: &str, s: &Step| {
            if chunks {
                format!("{pass}{}.{}", s.chunk, s.micro)
            } else {
                format!("{pass}{}", s.micro)
            }
        };
        let steps: Vec<String> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Forward(s) => Some(name("F", s)),
                Action::Backward(s) => Some(name("B", s)),
                Action::Exchange(_) => None,
            })
            .collect();
        steps.join(" ")
    }

    fn all_ranks(pp: usize, m: usize, vpp: usize) -> Vec<Vec<Action>> {
        (0..pp).map(|rank| schedule(pp, rank, m, vpp).unwrap()).collect()
    }

    // Compact constructors for literal action lists.
    fn f(chunk: usize, micro: usize, first: bool, last: bool) -> Action {
        Action::Forward(Step { chunk, micro, first, last })
    }
    fn b(chunk: usize, micro: usize, first: bool, last: bool) -> Action {
        Action::Backward(Step { chunk, micro, first, last })
    }
    fn op(dir: Dir, payload: Payload, peer: usize, chunk: usize, micro: usize) -> P2p {
        P2p { dir, payload, peer, chunk, micro }
    }
    fn x(ops: &[P2p]) -> Action {
        Action::Exchange(ops.to_vec())
    }
    use Dir::{Recv, Send};
    use Payload::{Activation as Act, Gradient as Grad};

    #[test]
    fn one_f_one_b_pp4_m8_in_megatrons_order() {
        // Warm-up pp − rank − 1 forwards, then F/B pairs, then the cool-down backwards.
        let expected = [
            "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7",
            "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7",
            "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7",
            "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7",
        ];
        for (rank, want) in expected.iter().enumerate() {
            assert_eq!(order(&one_f_one_b(4, rank, 8).unwrap(), false), *want, "rank {rank}");
        }
    }

    #[test]
    fn one_f_one_b_with_fewer_micro_batches_than_warm_up() {
        // pp 4, m 2: rank 0 would warm up with 3 forwards but has only 2, so all of its
        // backwards are cool-down.
        assert_eq!(order(&one_f_one_b(4, 0, 2).unwrap(), false), "F0 F1 B0 B1");
        assert_eq!(order(&one_f_one_b(4, 2, 2).unwrap(), false), "F0 F1 B0 B1");
        assert_eq!(order(&one_f_one_b(4, 3, 2).unwrap(), false), "F0 B0 F1 B1");
    }

    #[test]
    fn one_f_one_b_pp2_m3_literal() {
        let rank0 = vec![
            f(0, 0, true, false),
            x(&[op(Send, Act, 1, 0, 0)]),
            f(0, 1, true, false),
            x(&[op(Send, Act, 1, 0, 1), op(Recv, Grad, 1, 0, 0)]),
            b(0, 0, true, false),
            f(0, 2, true, false),
            x(&[op(Send, Act, 1, 0, 2), op(Recv, Grad, 1, 0, 1)]),
            b(0, 1, true, false),
            x(&[op(Recv, Grad, 1, 0, 2)]),
            b(0, 2, true, false),
        ];
        assert_eq!(one_f_one_b(2, 0, 3).unwrap(), rank0);
        let rank1 = vec![
            x(&[op(Recv, Act, 0, 0, 0)]),
            f(0, 0, false, true),
            b(0, 0, false, true),
            x(&[op(Recv, Act, 0, 0, 1), op(Send, Grad, 0, 0, 0)]),
            f(0, 1, false, true),
            b(0, 1, false, true),
            x(&[op(Recv, Act, 0, 0, 2), op(Send, Grad, 0, 0, 1)]),
            f(0, 2, false, true),
            b(0, 2, false, true),
            x(&[op(Send, Grad, 0, 0, 2)]),
        ];
        assert_eq!(one_f_one_b(2, 1, 3).unwrap(), rank1);
    }

    #[test]
    fn pp1_is_plain_gradient_accumulation() {
        let actions = one_f_one_b(1, 0, 4).unwrap();
        assert_eq!(order(&actions, false), "F0 B0 F1 B1 F2 B2 F3 B3");
        assert!(actions.iter().all(|a| match a {
            Action::Forward(s) | Action::Backward(s) => s.first && s.last,
            Action::Exchange(_) => false,
        }));
        assert_eq!(schedule(1, 0, 4, 1).unwrap(), actions);
    }

    #[test]
    fn interleaved_pp2_vpp2_m4_in_megatrons_order() {
        // Megatron's own example (model_parallel_config.py): forwards run micro batches
        // 0 1 0 1 2 3 2 3 on chunks 0 0 1 1 0 0 1 1.
        assert_eq!(
            order(&interleaved(2, 0, 4, 2).unwrap(), true),
            "F0.0 F0.1 F1.0 F1.1 F0.2 B1.0 F0.3 B1.1 F1.2 B0.0 F1.3 B0.1 B1.2 B1.3 B0.2 B0.3"
        );
        assert_eq!(
            order(&interleaved(2, 1, 4, 2).unwrap(), true),
            "F0.0 F0.1 F1.0 B1.0 F1.1 B1.1 F0.2 B0.0 F0.3 B0.1 F1.2 B1.2 F1.3 B1.3 B0.2 B0.3"
        );
    }

    #[test]
    fn interleaved_pp4_vpp2_m8_in_megatrons_order() {
        // Rank 0 warms up with 3·2 + 1·4 = 10 forwards, rank 3 with 4.
        assert_eq!(
            order(&interleaved(4, 0, 8, 2).unwrap(), true),
            "F0.0 F0.1 F0.2 F0.3 F1.0 F1.1 F1.2 F1.3 F0.4 F0.5 \
             F0.6 B1.0 F0.7 B1.1 F1.4 B1.2 F1.5 B1.3 F1.6 B0.0 F1.7 B0.1 \
             B0.2 B0.3 B1.4 B1.5 B1.6 B1.7 B0.4 B0.5 B0.6 B0.7"
        );
        assert_eq!(
            order(&interleaved(4, 3, 8, 2).unwrap(), true),
            "F0.0 F0.1 F0.2 F0.3 \
             F1.0 B1.0 F1.1 B1.1 F1.2 B1.2 F1.3 B1.3 F0.4 B0.0 F0.5 B0.1 F0.6 B0.2 F0.7 B0.3 \
             F1.4 B1.4 F1.5 B1.5 F1.6 B1.6 F1.7 B1.7 \
             B0.4 B0.5 B0.6 B0.7"
        );
    }

    #[test]
    fn interleaved_with_m_equal_pp_caps_warm_up_per_rank() {
        // pp 4, vpp 2, m 4: 8 forwards per rank. The cap puts ranks 0 and 1 entirely in
        // warm-up (10 and 8 ≥ 8) while ranks 2 and 3 warm up with 6 and 4, as Megatron does
        // since 2024 (before, m = pp put every rank in warm-up).
        let leading_forwards = |rank| {
            let actions = interleaved(4, rank, 4, 2).unwrap();
            actions
                .iter()
                .filter(|a| !matches!(a, Action::Exchange(_)))
                .take_while(|a| matches!(a, Action::Forward(_)))
                .count()
        };
        // A rank that also runs 1F1B pairs shows warm-up + 1 forwards before its first backward.
        assert_eq!((0..4).map(leading_forwards).collect::<Vec<_>>(), vec![8, 8, 7, 5]);
        assert_eq!(
            order(&interleaved(4, 1, 4, 2).unwrap(), true),
            "F0.0 F0.1 F0.2 F0.3 F1.0 F1.1 F1.2 F1.3 B1.0 B1.1 B1.2 B1.3 B0.0 B0.1 B0.2 B0.3"
        );
    }

    #[test]
    fn interleaved_pp2_vpp2_m2_literal() {
        // Rank 0 is all warm-up; its receives after forwards 1 and 2 are the chunk-1 inputs
        // rank 1 produced one forward earlier. Rank 1 leads the backward the same way.
        let rank0 = vec![
            f(0, 0, true, false),
            x(&[op(Send, Act, 1, 0, 0)]),
            f(0, 1, true, false),
            x(&[op(Recv, Act, 1, 1, 0), op(Send, Act, 1, 0, 1)]),
            f(1, 0, false, false),
            x(&[op(Recv, Act, 1, 1, 1), op(Send, Act, 1, 1, 0)]),
            f(1, 1, false, false),
            x(&[op(Send, Act, 1, 1, 1)]),
            x(&[op(Recv, Grad, 1, 1, 0)]),
            b(1, 0, false, false),
            x(&[op(Send, Grad, 1, 1, 0), op(Recv, Grad, 1, 1, 1)]),
            b(1, 1, false, false),
            x(&[op(Send, Grad, 1, 1, 1), op(Recv, Grad, 1, 0, 0)]),
            b(0, 0, true, false),
            x(&[op(Recv, Grad, 1, 0, 1)]),
            b(0, 1, true, false),
        ];
        assert_eq!(interleaved(2, 0, 2, 2).unwrap(), rank0);
        let rank1 = vec![
            x(&[op(Recv, Act, 0, 0, 0)]),
            f(0, 0, false, false),
            x(&[op(Recv, Act, 0, 0, 1), op(Send, Act, 0, 0, 0)]),
            f(0, 1, false, false),
            x(&[op(Recv, Act, 0, 1, 0), op(Send, Act, 0, 0, 1)]),
            f(1, 0, false, true),
            b(1, 0, false, true),
            x(&[op(Recv, Act, 0, 1, 1), op(Send, Grad, 0, 1, 0)]),
            f(1, 1, false, true),
            b(1, 1, false, true),
            x(&[op(Send, Grad, 0, 1, 1), op(Recv, Grad, 0, 0, 0)]),
            b(0, 0, false, false),
            x(&[op(Send, Grad, 0, 0, 0), op(Recv, Grad, 0, 0, 1)]),
            b(0, 1, false, false),
            x(&[op(Send, Grad, 0, 0, 1)]),
        ];
        assert_eq!(interleaved(2, 1, 2, 2).unwrap(), rank1);
        simulate(2, 2, 2, &[rank0, rank1]).unwrap();
    }

    #[test]
    fn megatrons_batched_order_mixes_up_tensors_with_pp2() {
        // Reordered as Megatron batches them (send prev, recv prev, send next, recv next), one
        // rank's gradient meets the other's activation on the shared channel.
        let rank_of = |p: &P2p| match (p.dir, p.payload) {
            (Send, Grad) => 0,
            (Recv, Act) => 1,
            (Send, Act) => 2,
            (Recv, Grad) => 3,
        };
        let mut ranks = all_ranks(2, 4, 2);
        for actions in &mut ranks {
            for action in actions.iter_mut() {
                if let Action::Exchange(ops) = action {
                    ops.sort_by_key(rank_of);
                }
            }
        }
        let err = simulate(2, 2, 4, &ranks).unwrap_err();
        assert!(matches!(err, ScheduleError::Mismatch { .. }), "{err}");
        simulate(2, 2, 4, &all_ranks(2, 4, 2)).unwrap();
    }

    #[test]
    fn bad_numbers_are_refused_with_the_fix() {
        let err = interleaved(4, 0, 6, 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "micro batches 6 is not a multiple of pipeline size 4 (interleaved schedule): set the \
             global batch size so that global / (micro × dp) is a multiple of 4, e.g. 8 micro \
             batches, or omit vpp"
        );
        assert_eq!(
            one_f_one_b(4, 4, 8).unwrap_err().to_string(),
            "pipeline rank 4 is out of range for pp 4: pipeline ranks run from 0 to 3"
        );
        let layout = |e: LayoutError| Err(ScheduleError::Layout(e));
        assert_eq!(one_f_one_b(0, 0, 8), layout(LayoutError::Zero { name: "pp".into() }));
        assert_eq!(one_f_one_b(2, 0, 0).unwrap_err().to_string(), "micro batches is 0 but must be at least 1");
        assert_eq!(interleaved(4, 0, 8, 1), layout(LayoutError::VppTooSmall { vpp: 1 }));
        assert_eq!(interleaved(1, 0, 8, 2), layout(LayoutError::VppNeedsPp { vpp: 2, pp: 1 }));
        assert_eq!(schedule(1, 0, 8, 2), layout(LayoutError::VppNeedsPp { vpp: 2, pp: 1 }));
        assert_eq!(schedule(2, 0, 8, 0), layout(LayoutError::Zero { name: "vpp".into() }));
        // 1F1B takes any number of micro batches.
        assert!(schedule(4, 0, 6, 1).is_ok());
    }

    #[test]
    fn theoretical_bubble_is_idle_over_step_time() {
        assert_eq!(theoretical_bubble(4, 1, 8), 3.0 / 11.0);
        assert_eq!(theoretical_bubble(4, 2, 8), 3.0 / 19.0);
        assert_eq!(theoretical_bubble(1, 1, 5), 0.0);
        assert_eq!(theoretical_bubble(1, 1, 0), 0.0);
    }

    #[test]
    fn actions_serialize_for_dry_runs() {
        let json = serde_json::to_string(&one_f_one_b(2, 1, 1).unwrap()).unwrap();
        assert_eq!(
            json,
            r#"[{"exchange":[{"dir":"recv","payload":"activation","peer":0,"chunk":0,"micro":0}]},{"forward":{"chunk":0,"micro":0,"first":false,"last":true}},{"backward":{"chunk":0,"micro":0,"first":false,"last":true}},{"exchange":[{"dir":"send","payload":"gradient","peer":0,"chunk":0,"micro":0}]}]"#
        );
        assert_eq!(
            x(&[op(Recv, Act, 3, 1, 2), op(Send, Grad, 0, 0, 5)]).to_string(),
            "exchange [recv activation chunk 1 micro 2 from rank 3, send gradient chunk 0 micro 5 to rank 0]"
        );
    }

    /// Runs all ranks of one pipeline and checks what a sound schedule guarantees.
    fn check_pipeline(pp: usize, vpp: usize, m: usize) -> Result<(), String> {
        let ranks = all_ranks(pp, m, vpp);
        let timeline = simulate(pp, vpp, m, &ranks).map_err(|e| e.to_string())?;
        let stages = pp * vpp;
        let total = m * vpp;
        let ensure = |ok: bool, what: String| if ok { Ok(()) } else { Err(what) };

        // The ideal bubble, exactly: forward 1, backward 2, free communication.
        let bubble = timeline.bubble_fraction();
        let theory = theoretical_bubble(pp, vpp, m);
        ensure((bubble - theory).abs() < 1e-12, format!("bubble {bubble}, theory {theory}"))?;
        let unit = FORWARD_COST + BACKWARD_COST;
        ensure(timeline.makespan == unit * (total + pp - 1) as u64, format!("makespan {}", timeline.makespan))?;

        // When each virtual stage ran each micro batch.
        let mut fwd = vec![vec![(0, 0); m]; stages];
        let mut bwd = vec![vec![(0, 0); m]; stages];
        for (rank, r) in timeline.ranks.iter().enumerate() {
            for c in &r.computes {
                let at = (c.start, c.end);
                match c.pass {
                    Pass::Forward => fwd[c.chunk * pp + rank][c.micro] = at,
                    Pass::Backward => bwd[c.chunk * pp + rank][c.micro] = at,
                }
            }
            // Within a chunk, forwards and backwards take the micro batches in order.
            for chunk in 0..vpp {
                for pass in [Pass::Forward, Pass::Backward] {
                    let micros: Vec<usize> =
                        r.computes.iter().filter(|c| c.chunk == chunk && c.pass == pass).map(|c| c.micro).collect();
                    ensure(
                        micros == (0..m).collect::<Vec<_>>(),
                        format!("rank {rank} chunk {chunk} {pass:?}: {micros:?}"),
                    )?;
                }
            }
            // Megatron's memory bound: warm-up + 1 activations held at most (pp − rank for 1F1B).
            let warmup = if vpp == 1 { pp - rank - 1 } else { (pp - rank - 1) * 2 + (vpp - 1) * pp };
            let bound = (warmup + 1).min(total);
            ensure(
                r.peak_in_flight == bound,
                format!("rank {rank} holds {} activations, not {bound}", r.peak_in_flight),
            )?;
        }
        // Forward through the virtual stages in order, backward in reverse, after the forward.
        for i in 0..m {
            for s in 1..stages {
                ensure(fwd[s - 1][i].1 <= fwd[s][i].0, format!("forward of micro {i} reached stage {s} early"))?;
                ensure(bwd[s][i].1 <= bwd[s - 1][i].0, format!("backward of micro {i} reached stage {} early", s - 1))?;
            }
            ensure(fwd[stages - 1][i].1 <= bwd[stages - 1][i].0, format!("backward of micro {i} before its loss"))?;
        }
        Ok(())
    }

    #[test]
    fn every_small_pipeline_runs_to_the_end_in_order() {
        for pp in 1..=8 {
            for vpp in 1..=4 {
                let counts: Vec<usize> = match (vpp, pp) {
                    (1, _) => (1..=3 * pp).collect(),
                    (_, 1) => continue,
                    _ => (1..=3).map(|k| k * pp).collect(),
                };
                for m in counts {
                    if let Err(e) = check_pipeline(pp, vpp, m) {
                        panic!("pp {pp} vpp {vpp} m {m}: {e}");
                    }
                }
            }
        }
    }

    /// pp 1..=8, vpp 1..=4 (2 or more only with pp ≥ 2), and micro batches that the schedule
    /// accepts: any count for 1F1B, multiples of pp for the interleaved one.
    fn arb_pipeline() -> impl Strategy<Value = (usize, usize, usize)> {
        (1usize..=8, 1usize..=4).prop_flat_map(|(pp, vpp)| {
            let vpp = if pp == 1 { 1 } else { vpp };
            let m = if vpp == 1 { (1usize..=64).boxed() } else { (1usize..=8).prop_map(move |k| k * pp).boxed() };
            (Just(pp), Just(vpp), m)
        })
    }

    proptest! {
        #[test]
        fn every_pipeline_runs_to_the_end_in_order((pp, vpp, m) in arb_pipeline()) {
            if let Err(e) = check_pipeline(pp, vpp, m) {
                prop_assert!(false, "pp {} vpp {} m {}: {}", pp, vpp, m, e);
            }
        }
    }
}
