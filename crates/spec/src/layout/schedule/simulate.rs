//! [`simulate`]: runs every rank's action list against the others, as the engine would, and
//! either proves the set sound or says where it breaks.
//!
//! The model is the strictest the engine may meet (NCCL): each ordered pair of ranks is one
//! FIFO channel whatever the payload, so the n-th send from a to b meets b's n-th receive from
//! a, and their labels must agree; a send waits for its receive (no buffering); an exchange
//! finishes when all its transfers have met. Time is counted in units: a chunk's forward takes
//! [`FORWARD_COST`], its backward [`BACKWARD_COST`], communication nothing, so the idle time
//! left is the pipeline bubble alone.

use std::collections::{BTreeMap, HashSet, VecDeque};

use serde::Serialize;

use super::{faces_next_stage, Action, Dir, P2p, Payload, ScheduleError, Step};
use crate::layout::LayoutError;

/// Time units of one chunk's forward in the simulation.
pub const FORWARD_COST: u64 = 1;
/// Time units of one chunk's backward (about twice the forward, as for transformers).
pub const BACKWARD_COST: u64 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pass {
    Forward,
    Backward,
}

/// One forward or backward as it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Compute {
    pub pass: Pass,
    pub chunk: usize,
    pub micro: usize,
    pub start: u64,
    pub end: u64,
}

/// What one rank did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RankTimeline {
    /// Forwards and backwards in the order they ran.
    pub computes: Vec<Compute>,
    /// Time spent computing.
    pub busy: u64,
    /// When the rank's last action finished.
    pub finish: u64,
    /// The most micro-batch activations held at once (forwards run minus backwards run, over
    /// all chunks): the rank's activation memory, in micro batches.
    pub peak_in_flight: usize,
}

/// The simulated step of the whole pipeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeline {
    pub pp: usize,
    pub virtual_stages: usize,
    pub micro_batches: usize,
    /// When the last rank finished.
    pub makespan: u64,
    pub ranks: Vec<RankTimeline>,
}

impl Timeline {
    /// Idle time over all ranks ÷ (ranks × makespan): comparable to
    /// [`super::theoretical_bubble`].
    pub fn bubble_fraction(&self) -> f64 {
        if self.makespan == 0 || self.ranks.is_empty() {
            return 0.0;
        }
        let capacity = self.makespan * self.ranks.len() as u64;
        let busy: u64 = self.ranks.iter().map(|r| r.busy).sum();
        (capacity - busy) as f64 / capacity as f64
    }
}

/// Runs `schedules[rank]` for every pipeline rank of a `pp × virtual_stages` pipeline over
/// `micro_batches`, checking as it goes that every transfer meets its counterpart, that every
/// pass has its input, and at the end that each rank ran every (chunk, micro) forward and
/// backward exactly once with nothing left unused.
pub fn simulate(
    pp: usize,
    virtual_stages: usize,
    micro_batches: usize,
    schedules: &[Vec<Action>],
) -> Result<Timeline, ScheduleError> {
    for (name, value) in [("pp", pp), ("vpp", virtual_stages), ("micro batches", micro_batches)] {
        if value == 0 {
            return Err(LayoutError::Zero { name: name.into() }.into());
        }
    }
    if schedules.len() != pp {
        return Err(ScheduleError::RankCount { found: schedules.len(), pp });
    }
    let mut sim = Sim {
        shape: Shape { pp, vpp: virtual_stages, m: micro_batches },
        ranks: schedules.iter().map(|actions| RankState::new(actions)).collect(),
        channels: BTreeMap::new(),
    };
    loop {
        let mut progressed = false;
        for rank in 0..pp {
            while sim.advance(rank)? {
                progressed = true;
            }
        }
        if sim.ranks.iter().all(|r| r.next == r.actions.len()) {
            break;
        }
        if !progressed {
            return Err(ScheduleError::Deadlock { waiting: sim.waiting() });
        }
    }
    for (rank, state) in sim.ranks.iter().enumerate() {
        sim.shape.check_complete(rank, state)?;
    }
    let ranks: Vec<RankTimeline> = sim.ranks.into_iter().map(|r| r.timeline).collect();
    let makespan = ranks.iter().map(|r| r.finish).max().unwrap_or(0);
    Ok(Timeline { pp, virtual_stages, micro_batches, makespan, ranks })
}

#[derive(Clone, Copy)]
struct Shape {
    pp: usize,
    vpp: usize,
    m: usize,
}

/// A transfer's identity, the same on both ends: what, made by which virtual stage, for which
/// micro batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Label {
    payload: Payload,
    producer: usize,
    micro: usize,
}

impl Label {
    fn describe(&self) -> String {
        format!("the {} of virtual stage {} for micro {}", self.payload, self.producer, self.micro)
    }
}

/// A transfer waiting in a channel for its counterpart.
struct Posted {
    rank: usize,
    op: usize,
    label: Label,
    time: u64,
}

#[derive(Default)]
struct Channel {
    sends: VecDeque<Posted>,
    recvs: VecDeque<Posted>,
}

struct RankState<'a> {
    actions: &'a [Action],
    next: usize,
    clock: u64,
    /// The exchange in progress: when each of its transfers met its counterpart.
    posted: Option<Vec<Option<u64>>>,
    received: HashSet<(Payload, usize, usize)>,
    sent: HashSet<(Payload, usize, usize)>,
    forwarded: HashSet<(usize, usize)>,
    backwarded: HashSet<(usize, usize)>,
    in_flight: usize,
    timeline: RankTimeline,
}

impl<'a> RankState<'a> {
    fn new(actions: &'a [Action]) -> Self {
        RankState {
            actions,
            next: 0,
            clock: 0,
            posted: None,
            received: HashSet::new(),
            sent: HashSet::new(),
            forwarded: HashSet::new(),
            backwarded: HashSet::new(),
            in_flight: 0,
            timeline: RankTimeline { computes: Vec::new(), busy: 0, finish: 0, peak_in_flight: 0 },
        }
    }

    fn run(&mut self, pass: Pass, step: &Step, cost: u64) {
        let start = self.clock;
        self.clock += cost;
        self.timeline.busy += cost;
        self.timeline.finish = self.clock;
        self.timeline.computes.push(Compute { pass, chunk: step.chunk, micro: step.micro, start, end: self.clock });
    }
}

struct Sim<'a> {
    shape: Shape,
    ranks: Vec<RankState<'a>>,
    channels: BTreeMap<(usize, usize), Channel>,
}

impl<'a> Sim<'a> {
    /// Runs `rank`'s next action, or posts or finishes its exchange; false when it can do
    /// nothing now (done, or waiting for a peer).
    fn advance(&mut self, rank: usize) -> Result<bool, ScheduleError> {
        let (actions, index) = (self.ranks[rank].actions, self.ranks[rank].next);
        let Some(action) = actions.get(index) else {
            return Ok(false);
        };
        let invalid = |problem: String| ScheduleError::Invalid { rank, index, action: action.to_string(), problem };
        match action {
            Action::Forward(step) => {
                self.shape.check_step(rank, step).map_err(invalid)?;
                let state = &mut self.ranks[rank];
                let key = (step.chunk, step.micro);
                if state.forwarded.contains(&key) {
                    return Err(invalid("it already ran".into()));
                }
                if !step.first && !state.received.remove(&(Payload::Activation, step.chunk, step.micro)) {
                    return Err(invalid("its input activation has not been received".into()));
                }
                state.forwarded.insert(key);
                state.in_flight += 1;
                state.timeline.peak_in_flight = state.timeline.peak_in_flight.max(state.in_flight);
                state.run(Pass::Forward, step, FORWARD_COST);
            }
            Action::Backward(step) => {
                self.shape.check_step(rank, step).map_err(invalid)?;
                let state = &mut self.ranks[rank];
                let key = (step.chunk, step.micro);
                if !state.forwarded.contains(&key) {
                    return Err(invalid("its forward has not run".into()));
                }
                if state.backwarded.contains(&key) {
                    return Err(invalid("it already ran".into()));
                }
                if !step.last && !state.received.remove(&(Payload::Gradient, step.chunk, step.micro)) {
                    return Err(invalid("its output gradient has not been received".into()));
                }
                state.backwarded.insert(key);
                state.in_flight -= 1;
                state.run(Pass::Backward, step, BACKWARD_COST);
            }
            Action::Exchange(ops) => {
                if self.ranks[rank].posted.is_none() {
                    self.post(rank, ops).map_err(invalid)?;
                    self.meet()?;
                    self.finish_exchange(rank, ops).map_err(invalid)?;
                    return Ok(true);
                }
                return self.finish_exchange(rank, ops).map_err(invalid);
            }
        }
        self.ranks[rank].next += 1;
        Ok(true)
    }

    /// Puts every transfer of `rank`'s exchange into its channel.
    fn post(&mut self, rank: usize, ops: &[P2p]) -> Result<(), String> {
        let state = &mut self.ranks[rank];
        let mut queued = Vec::with_capacity(ops.len());
        for (op, p2p) in ops.iter().enumerate() {
            let label = self.shape.label(rank, p2p)?;
            let key = (p2p.payload, p2p.chunk, p2p.micro);
            if p2p.dir == Dir::Send {
                let made = match p2p.payload {
                    Payload::Activation => state.forwarded.contains(&(p2p.chunk, p2p.micro)),
                    Payload::Gradient => state.backwarded.contains(&(p2p.chunk, p2p.micro)),
                };
                if !made {
                    return Err(format!(
                        "it sends the {} of chunk {} micro {} before computing it",
                        p2p.payload, p2p.chunk, p2p.micro
                    ));
                }
                if !state.sent.insert(key) {
                    return Err(format!(
                        "it sends the {} of chunk {} micro {} twice",
                        p2p.payload, p2p.chunk, p2p.micro
                    ));
                }
            }
            queued.push((p2p.dir, p2p.peer, Posted { rank, op, label, time: state.clock }));
        }
        state.posted = Some(vec![None; ops.len()]);
        for (dir, peer, posted) in queued {
            match dir {
                Dir::Send => self.channels.entry((rank, peer)).or_default().sends.push_back(posted),
                Dir::Recv => self.channels.entry((peer, rank)).or_default().recvs.push_back(posted),
            }
        }
        Ok(())
    }

    /// Pairs the sends and receives waiting in every channel, in order.
    fn meet(&mut self) -> Result<(), ScheduleError> {
        for (&(from, to), channel) in self.channels.iter_mut() {
            while !channel.sends.is_empty() && !channel.recvs.is_empty() {
                let (send, recv) = (channel.sends.pop_front().unwrap(), channel.recvs.pop_front().unwrap());
                if send.label != recv.label {
                    return Err(ScheduleError::Mismatch {
                        from,
                        to,
                        sent: send.label.describe(),
                        expected: recv.label.describe(),
                    });
                }
                let time = send.time.max(recv.time);
                for end in [send, recv] {
                    if let Some(done) = self.ranks[end.rank].posted.as_mut() {
                        done[end.op] = Some(time);
                    }
                }
            }
        }
        Ok(())
    }

    /// Completes `rank`'s exchange if every transfer in it has met its counterpart.
    fn finish_exchange(&mut self, rank: usize, ops: &[P2p]) -> Result<bool, String> {
        let state = &mut self.ranks[rank];
        let Some(done) = state.posted.as_ref() else {
            return Ok(false);
        };
        if done.iter().any(Option::is_none) {
            return Ok(false);
        }
        let end = done.iter().flatten().copied().fold(state.clock, u64::max);
        for p2p in ops.iter().filter(|p| p.dir == Dir::Recv) {
            if !state.received.insert((p2p.payload, p2p.chunk, p2p.micro)) {
                return Err(format!(
                    "it receives the {} of chunk {} micro {} twice",
                    p2p.payload, p2p.chunk, p2p.micro
                ));
            }
        }
        state.clock = end;
        state.timeline.finish = end;
        state.posted = None;
        state.next += 1;
        Ok(true)
    }

    /// Where each unfinished rank is stuck, for the deadlock message.
    fn waiting(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for (rank, state) in self.ranks.iter().enumerate() {
            let Some(action) = state.actions.get(state.next) else { continue };
            let mut line = format!("rank {rank} waits at action {} ({action})", state.next);
            if let (Action::Exchange(ops), Some(done)) = (action, state.posted.as_ref()) {
                let open: Vec<String> =
                    ops.iter().zip(done).filter(|(_, d)| d.is_none()).map(|(op, _)| op.to_string()).collect();
                line += &format!(" for {}", open.join(", "));
            }
            lines.push(line);
        }
        lines
    }
}

impl Shape {
    fn stages(&self) -> usize {
        self.pp * self.vpp
    }

    fn check_step(&self, rank: usize, step: &Step) -> Result<(), String> {
        if step.chunk >= self.vpp {
            return Err(format!("chunk {} is out of range for vpp {}", step.chunk, self.vpp));
        }
        if step.micro >= self.m {
            return Err(format!("micro {} is out of range for {} micro batches", step.micro, self.m));
        }
        let stage = step.chunk * self.pp + rank;
        let (first, last) = (stage == 0, stage + 1 == self.stages());
        if (step.first, step.last) != (first, last) {
            return Err(format!(
                "it is virtual stage {stage} of {}, so first should be {first} and last {last}",
                self.stages()
            ));
        }
        Ok(())
    }

    /// The label of `p2p` on `rank`, after checking that its peer is the rank that holds the
    /// virtual stage on the other end.
    fn label(&self, rank: usize, p2p: &P2p) -> Result<Label, String> {
        if p2p.chunk >= self.vpp || p2p.micro >= self.m || p2p.peer >= self.pp {
            return Err(format!(
                "{p2p} is out of range for pp {} vpp {} and {} micro batches",
                self.pp, self.vpp, self.m
            ));
        }
        let stage = p2p.chunk * self.pp + rank;
        let other = if faces_next_stage(p2p.dir, p2p.payload) { stage + 1 } else { stage.wrapping_sub(1) };
        if other >= self.stages() {
            return Err(format!("{p2p}: virtual stage {stage} has no neighbour that way"));
        }
        if p2p.peer != other % self.pp {
            return Err(format!("{p2p}: virtual stage {other} lives on rank {}", other % self.pp));
        }
        let producer = match p2p.dir {
            Dir::Send => stage,
            Dir::Recv => other,
        };
        Ok(Label { payload: p2p.payload, producer, micro: p2p.micro })
    }

    fn check_complete(&self, rank: usize, state: &RankState) -> Result<(), ScheduleError> {
        for chunk in 0..self.vpp {
            for micro in 0..self.m {
                for (pass, done) in [("forward", &state.forwarded), ("backward", &state.backwarded)] {
                    if !done.contains(&(chunk, micro)) {
                        return Err(ScheduleError::Incomplete {
                            rank,
                            missing: format!("running the {pass} of chunk {chunk} micro {micro}"),
                        });
                    }
                }
            }
        }
        if let Some((payload, chunk, micro)) = state.received.iter().min_by_key(|k| (k.1, k.2)) {
            return Err(ScheduleError::Incomplete {
                rank,
                missing: format!("using the {payload} it received for chunk {chunk} micro {micro}"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{one_f_one_b, schedule};
    use super::*;

    fn ranks(pp: usize, m: usize, vpp: usize) -> Vec<Vec<Action>> {
        (0..pp).map(|rank| schedule(pp, rank, m, vpp).unwrap()).collect()
    }

    #[test]
    fn one_f_one_b_timeline_pp2_m2() {
        // Rank 1 starts once F0's output arrives, and each of rank 0's backwards waits for
        // the gradient of rank 1's: makespan (m + pp − 1)·3 = 9, of which 6 are work.
        let t = simulate(2, 1, 2, &ranks(2, 2, 1)).unwrap();
        let spans = |rank: usize| t.ranks[rank].computes.iter().map(|c| (c.start, c.end)).collect::<Vec<_>>();
        assert_eq!(spans(0), vec![(0, 1), (1, 2), (4, 6), (7, 9)]);
        assert_eq!(spans(1), vec![(1, 2), (2, 4), (4, 5), (5, 7)]);
        assert_eq!(t.makespan, 9);
        assert_eq!(t.bubble_fraction(), 1.0 / 3.0);
        assert_eq!(t.ranks.iter().map(|r| r.peak_in_flight).collect::<Vec<_>>(), vec![2, 1]);
    }

    #[test]
    fn one_by_one_blocking_transfers_deadlock() {
        // Split every exchange into single transfers, sends first: rank 0 sends F1's output
        // while rank 1 sends B0's gradient, and neither reaches its receive.
        let split: Vec<Vec<Action>> = ranks(2, 2, 1)
            .into_iter()
            .map(|actions| {
                actions
                    .into_iter()
                    .flat_map(|a| match a {
                        Action::Exchange(mut ops) => {
                            ops.sort_by_key(|op| op.dir == Dir::Recv);
                            ops.into_iter().map(|op| Action::Exchange(vec![op])).collect()
                        }
                        other => vec![other],
                    })
                    .collect()
            })
            .collect();
        let err = simulate(2, 1, 2, &split).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the schedules deadlock: rank 0 waits at action 3 (exchange [send activation chunk 0 \
             micro 1 to rank 1]) for send activation chunk 0 micro 1 to rank 1; rank 1 waits at \
             action 3 (exchange [send gradient chunk 0 micro 0 to rank 0]) for send gradient \
             chunk 0 micro 0 to rank 0"
        );
    }

    #[test]
    fn a_missing_receive_is_found() {
        let mut s = ranks(2, 2, 1);
        s[1].remove(0);
        let err = simulate(2, 1, 2, &s).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rank 1, action 0 (forward chunk 0 micro 0): its input activation has not been received"
        );
    }

    #[test]
    fn a_wrong_peer_or_stage_flag_is_found() {
        let mut s = ranks(3, 3, 1);
        let Action::Exchange(ops) = &mut s[1][0] else { panic!("{}", s[1][0]) };
        ops[0].peer = 2;
        let err = simulate(3, 1, 3, &s).unwrap_err();
        assert!(err.to_string().contains("virtual stage 0 lives on rank 0"), "{err}");

        let mut s = ranks(2, 2, 1);
        let Action::Forward(step) = &mut s[1][1] else { panic!("{}", s[1][1]) };
        step.last = false;
        let err = simulate(2, 1, 2, &s).unwrap_err();
        assert!(
            err.to_string().contains("it is virtual stage 1 of 2, so first should be false and last true"),
            "{err}"
        );
    }

    #[test]
    fn transfers_out_of_order_are_found() {
        // Rank 1 asks for micro 1 first: the channel from rank 0 delivers micro 0.
        let mut s = ranks(2, 2, 1);
        let Action::Exchange(ops) = &mut s[1][0] else { panic!() };
        ops[0].micro = 1;
        let err = simulate(2, 1, 2, &s).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rank 0 sends the activation of virtual stage 0 for micro 0 to rank 1, but rank 1 \
             expects the activation of virtual stage 0 for micro 1 next from rank 0: the two \
             ranks' exchanges are out of order"
        );
    }

    #[test]
    fn unfinished_or_miscounted_schedules_are_found() {
        let mut s = ranks(1, 2, 1);
        s[0].pop();
        assert_eq!(
            simulate(1, 1, 2, &s).unwrap_err().to_string(),
            "rank 0 finished without running the backward of chunk 0 micro 1"
        );
        assert_eq!(simulate(2, 1, 2, &ranks(1, 2, 1)), Err(ScheduleError::RankCount { found: 1, pp: 2 }));
        assert_eq!(simulate(2, 1, 0, &[]).unwrap_err().to_string(), "micro batches is 0 but must be at least 1");
        let once = one_f_one_b(1, 0, 1).unwrap();
        let twice = vec![[once.clone(), once].concat()];
        assert!(simulate(1, 1, 1, &twice).unwrap_err().to_string().contains("it already ran"));
    }
}
