//! The rank state file: what each engine rank is doing right now, for the launcher's stall
//! watchdog and its failure report (a collective "flight recorder").
//!
//! ```text
//! engine rank ──(recorder: phase, iteration, last RING collectives)──► $MM_RANK_STATE_DIR/rank-R.json
//!     (a writer thread renames a fresh file in every ~200 ms when something changed)
//! node agent ──reads the files + /proc/<pid>/stat every second──► launcher (RankStates frames)
//! launcher ──no change anywhere for the phase's budget──► diagnose() ──► console, report, stop
//! ```
//!
//! Collectives are numbered per process group: the k-th collective a rank enters on group G
//! has `seq` k on every member of G (groups are named "world" or "<kind>[<global ranks>]",
//! e.g. "dp[0,2]"; pipeline transfers are numbered per direction as "p2p[<src>-><dst>]" with
//! the operation "send/recv", since not every member of a pipeline group takes part in each), so ranks that wait at (G, k) while a member has not
//! reached it name that member, and members at the same (G, k) in different operations are a
//! desync. The file is replaced atomically (write + rename), so a reader never sees half of
//! one; a rank that stopped (SIGSTOP, a debugger) leaves its last state, which is what the
//! diagnosis wants.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The engine writes `rank-<R>.json` into this folder when the variable is set (the node
/// agent sets it for every unit it starts).
pub const STATE_DIR_ENV: &str = "MM_RANK_STATE_DIR";
/// Test-only fault injection (see the engine's `dist::flight`): `sleep:rank=R:iteration=N:seconds=S`
/// or `desync:rank=R:iteration=N`.
pub const FAULT_ENV: &str = "MM_ENGINE_FAULT";
/// How many collectives a state keeps (the most recent).
pub const RING: usize = 32;

/// `rank-<R>.json`.
pub fn state_file_name(rank: usize) -> String {
    format!("rank-{rank}.json")
}

/// The rank a state file name stands for.
pub fn rank_of_state_file(name: &str) -> Option<usize> {
    name.strip_prefix("rank-")?.strip_suffix(".json")?.parse().ok()
}

/// What a rank is doing, coarsely; each phase has its own stall budget in the launcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Joining the store and building the process groups.
    Rendezvous,
    /// Reading weights, optimizer state, the data set.
    Loading,
    /// A training iteration (the first one includes warm-up and allocation).
    Step,
    Eval,
    Checkpoint,
    /// Saving and leaving after an agreed stop (a signal).
    Stopping,
    Done,
}

impl Phase {
    pub fn label(self) -> &'static str {
        match self {
            Phase::Rendezvous => "rendezvous",
            Phase::Loading => "loading",
            Phase::Step => "step",
            Phase::Eval => "evaluation",
            Phase::Checkpoint => "checkpoint",
            Phase::Stopping => "stopping",
            Phase::Done => "done",
        }
    }
}

/// One collective a rank entered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collective {
    /// The group's name as [`RankState::groups`] lists it.
    pub group: String,
    /// 1-based count of collectives this rank entered on `group`.
    pub seq: u64,
    /// all_reduce, broadcast, all_gather, reduce_scatter, send/recv, barrier.
    pub op: String,
    /// What it is for, when the caller said ("step totals"); empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub what: String,
    pub bytes: u64,
    /// Unix milliseconds.
    pub start_ms: u64,
    /// None while the rank is inside it.
    #[serde(default)]
    pub end_ms: Option<u64>,
}

impl Collective {
    /// "all_reduce (step totals)".
    pub fn label(&self) -> String {
        if self.what.is_empty() {
            self.op.clone()
        } else {
            format!("{} ({})", self.op, self.what)
        }
    }
}

/// The content of a rank's state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankState {
    pub rank: usize,
    pub pid: u32,
    pub phase: Phase,
    /// Iterations completed.
    pub iteration: u64,
    /// Bumped on every change (phase, iteration, a collective entered or left): the launcher
    /// counts progress by it.
    pub ticks: u64,
    /// Unix milliseconds of the last change.
    pub updated_ms: u64,
    /// Every process group this rank belongs to: name → global ranks.
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<usize>>,
    /// The last [`RING`] collectives, oldest first.
    #[serde(default)]
    pub collectives: Vec<Collective>,
    /// Set once the rank took a stop request ("SIGTERM").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<String>,
}

impl RankState {
    /// The collective the rank is inside, if any.
    pub fn in_flight(&self) -> Option<&Collective> {
        self.collectives.last().filter(|c| c.end_ms.is_none())
    }
}

/// A process state letter from /proc/<pid>/stat, in words.
pub fn proc_state_label(state: char) -> &'static str {
    match state {
        'R' => "running",
        'S' => "sleeping",
        'D' => "uninterruptible I/O wait",
        'T' => "stopped",
        't' => "stopped by a debugger",
        'Z' => "zombie",
        'X' => "dead",
        'I' => "idle",
        _ => "unknown",
    }
}

/// Everything the launcher knows about one rank when it diagnoses a stall.
#[derive(Debug, Clone, Copy)]
pub struct RankView<'a> {
    pub rank: usize,
    pub host: &'a str,
    pub pid: Option<u32>,
    /// The /proc state letter of the rank's process, as its agent last read it.
    pub proc_state: Option<char>,
    pub state: Option<&'a RankState>,
}

/// What the ranks were doing when progress stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    /// One or two sentences, without the "no progress for N s" lead.
    pub summary: String,
    /// The ranks that hold the others up (not arrived at the collective the others wait in,
    /// or stopped); empty when no rank stands out.
    pub culprits: Vec<usize>,
    /// Members of one group are in different operations at the same sequence number.
    pub desync: bool,
}

fn ranks_text(ranks: &[usize]) -> String {
    let contiguous = ranks.len() > 2 && ranks.windows(2).all(|w| w[1] == w[0] + 1);
    match ranks {
        [r] => format!("rank {r}"),
        [a, .., b] if contiguous => format!("ranks {a}-{b}"),
        _ => format!("ranks {}", ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(",")),
    }
}

/// "rank 3 on h2 (pid 812, state T stopped; at iteration 10, step)".
fn describe_rank(v: &&RankView) -> String {
    let mut facts = Vec::new();
    if let Some(pid) = v.pid {
        facts.push(format!("pid {pid}"));
    }
    if let Some(s) = v.proc_state {
        facts.push(format!("state {s} {}", proc_state_label(s)));
    }
    let mut text = format!("rank {} on {}", v.rank, v.host);
    let doing = match v.state {
        None => "no state reported".to_string(),
        Some(st) => match st.in_flight() {
            Some(c) => format!("in {} on {} #{} at iteration {}", c.label(), c.group, c.seq, st.iteration),
            None => format!("{} at iteration {}, not in a collective", st.phase.label(), st.iteration),
        },
    };
    facts.push(doing);
    text.push_str(&format!(" ({})", facts.join("; ")));
    text
}

/// Names what holds the job up, from every rank's last state.
pub fn diagnose(views: &[RankView]) -> Diagnosis {
    let by_rank: BTreeMap<usize, &RankView> = views.iter().map(|v| (v.rank, v)).collect();
    // (group, seq) → (label → ranks) for every rank inside a collective.
    let mut waits: BTreeMap<(String, u64), BTreeMap<String, Vec<usize>>> = BTreeMap::new();
    for v in views {
        if let Some(c) = v.state.and_then(RankState::in_flight) {
            waits.entry((c.group.clone(), c.seq)).or_default().entry(c.label()).or_default().push(v.rank);
        }
    }
    let stopped: Vec<usize> =
        views.iter().filter(|v| matches!(v.proc_state, Some('T' | 't' | 'D' | 'Z'))).map(|v| v.rank).collect();

    // A desync: one (group, seq), several operations.
    if let Some(((group, seq), ops)) = waits.iter().find(|(_, ops)| ops.len() > 1) {
        let parts: Vec<String> = ops.iter().map(|(label, ranks)| format!("{} in {label}", ranks_text(ranks))).collect();
        // The smaller side is the odd one out; when sides tie, nobody can tell: all of them.
        let smallest = ops.values().map(Vec::len).min().unwrap_or(0);
        let mut culprits: Vec<usize> = match ops.values().filter(|r| r.len() == smallest).count() {
            1 => ops.values().find(|r| r.len() == smallest).cloned().unwrap_or_default(),
            _ => ops.values().flatten().copied().collect(),
        };
        culprits.sort_unstable();
        return Diagnosis {
            summary: format!("collective desync on {group} at #{seq}: {}", parts.join("; ")),
            culprits,
            desync: true,
        };
    }

    // The wait most ranks are in (ties: the earliest sequence number).
    let biggest = waits
        .iter()
        .map(|((g, s), ops)| (g, *s, ops.iter().next().map(|(l, r)| (l.clone(), r.clone()))))
        .filter_map(|(g, s, o)| o.map(|(l, r)| (g.clone(), s, l, r)))
        .max_by(|a, b| a.3.len().cmp(&b.3.len()).then(b.1.cmp(&a.1)));
    if let Some((group, seq, label, waiting)) = biggest {
        let members = waiting
            .iter()
            .find_map(|r| by_rank.get(r).and_then(|v| v.state).and_then(|s| s.groups.get(&group)).cloned())
            .unwrap_or_default();
        let missing: Vec<usize> = members.iter().copied().filter(|r| !waiting.contains(r)).collect();
        let mut summary = format!("waiting in {label} on {group} #{seq}: {}", ranks_text(&waiting));
        let stopped_others: Vec<String> =
            stopped.iter().filter(|r| !missing.contains(r)).filter_map(|r| by_rank.get(r)).map(describe_rank).collect();
        if missing.is_empty() {
            if stopped_others.is_empty() {
                summary.push_str("; every member arrived (a slow network or a stuck transfer)");
            } else {
                summary.push_str(&format!("; every member arrived, but {} cannot run", stopped_others.join("; ")));
            }
        } else {
            let described: Vec<String> = missing
                .iter()
                .map(|r| match by_rank.get(r) {
                    Some(v) => describe_rank(v),
                    None => format!("rank {r} (no report from its host)"),
                })
                .collect();
            summary.push_str(&format!("; not arrived: {}", described.join("; ")));
            if !stopped_others.is_empty() {
                summary.push_str(&format!("; also stopped: {}", stopped_others.join("; ")));
            }
        }
        let culprits = if missing.is_empty() { stopped } else { missing };
        return Diagnosis { summary, culprits, desync: false };
    }

    // Nobody is in a collective: say what each set of ranks is doing.
    let mut doing: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for v in views {
        let key = match v.state {
            Some(s) => format!("{} at iteration {}", s.phase.label(), s.iteration),
            None => "no state reported".into(),
        };
        doing.entry(key).or_default().push(v.rank);
    }
    let mut parts: Vec<String> = doing.iter().map(|(k, r)| format!("{}: {k}", ranks_text(r))).collect();
    if !stopped.is_empty() {
        let described: Vec<String> = stopped.iter().filter_map(|r| by_rank.get(r)).map(describe_rank).collect();
        parts.push(format!("stopped: {}", described.join("; ")));
    }
    Diagnosis { summary: format!("no rank is in a collective; {}", parts.join("; ")), culprits: stopped, desync: false }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coll(group: &str, seq: u64, op: &str, what: &str, done: bool) -> Collective {
        Collective {
            group: group.into(),
            seq,
            op: op.into(),
            what: what.into(),
            bytes: 32,
            start_ms: 1,
            end_ms: done.then_some(2),
        }
    }

    fn state(rank: usize, world: usize, iteration: u64, collectives: Vec<Collective>) -> RankState {
        RankState {
            rank,
            pid: 100 + rank as u32,
            phase: Phase::Step,
            iteration,
            ticks: 7,
            updated_ms: 5,
            groups: [("world".to_string(), (0..world).collect())].into(),
            collectives,
            stop: None,
        }
    }

    fn view<'a>(s: &'a RankState, proc_state: char) -> RankView<'a> {
        RankView {
            rank: s.rank,
            host: if s.rank < 2 { "h0" } else { "h1" },
            pid: Some(s.pid),
            proc_state: Some(proc_state),
            state: Some(s),
        }
    }

    #[test]
    fn a_stopped_rank_is_named_as_the_one_not_arrived() {
        let waiting = |r| {
            state(
                r,
                4,
                10,
                vec![coll("world", 36, "all_reduce", "", true), coll("world", 37, "all_reduce", "step totals", false)],
            )
        };
        let stuck = state(3, 4, 10, vec![coll("world", 36, "all_reduce", "", true)]);
        let (s0, s1, s2) = (waiting(0), waiting(1), waiting(2));
        let d = diagnose(&[view(&s0, 'S'), view(&s1, 'S'), view(&s2, 'R'), view(&stuck, 'T')]);
        assert_eq!(d.culprits, vec![3]);
        assert!(!d.desync);
        assert_eq!(
            d.summary,
            "waiting in all_reduce (step totals) on world #37: ranks 0-2; not arrived: rank 3 on h1 (pid 103; state T \
             stopped; step at iteration 10, not in a collective)"
        );
    }

    #[test]
    fn different_operations_at_one_sequence_number_are_a_desync() {
        let a = |r| state(r, 3, 4, vec![coll("world", 9, "all_reduce", "step totals", false)]);
        let odd = state(2, 3, 4, vec![coll("world", 9, "broadcast", "fault injection", false)]);
        let (s0, s1) = (a(0), a(1));
        let d = diagnose(&[view(&s0, 'S'), view(&s1, 'S'), view(&odd, 'S')]);
        assert!(d.desync);
        assert_eq!(d.culprits, vec![2]);
        assert_eq!(
            d.summary,
            "collective desync on world at #9: ranks 0,1 in all_reduce (step totals); rank 2 in broadcast (fault injection)"
        );
    }

    #[test]
    fn no_collective_and_missing_states_are_described() {
        let mut s0 = state(0, 2, 0, vec![]);
        s0.phase = Phase::Loading;
        let views =
            [view(&s0, 'D'), RankView { rank: 1, host: "h0", pid: Some(9), proc_state: Some('R'), state: None }];
        let d = diagnose(&views);
        assert_eq!(d.culprits, vec![0]);
        assert!(
            d.summary
                .starts_with("no rank is in a collective; rank 0: loading at iteration 0; rank 1: no state reported"),
            "{}",
            d.summary
        );
    }

    #[test]
    fn state_files_round_trip_and_name_their_rank() {
        let s = state(5, 8, 3, vec![coll("tp[4,5]", 2, "all_gather", "", false)]);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<RankState>(&json).unwrap(), s);
        assert_eq!(rank_of_state_file(&state_file_name(5)), Some(5));
        // Two sides of one rank each: either may be the odd one out.
        let (a, b) = (
            state(0, 2, 1, vec![coll("world", 3, "all_reduce", "", false)]),
            state(1, 2, 1, vec![coll("world", 3, "broadcast", "", false)]),
        );
        let d = diagnose(&[view(&a, 'S'), view(&b, 'S')]);
        assert!(d.desync);
        assert_eq!(d.culprits, vec![0, 1]);
        assert_eq!(rank_of_state_file("rank-x.json"), None);
        assert_eq!(s.in_flight().map(|c| c.op.as_str()), Some("all_gather"));
    }
}
