//! The collective flight recorder: what this rank is doing right now (phase, completed
//! iterations, the last [`RING`] collectives per process group), kept in one process-global
//! [`RankState`] and written to `$MM_RANK_STATE_DIR/rank-<R>.json` for the launcher's stall
//! watchdog (mm-spec's `flight` module holds the format and the diagnosis).
//!
//! ```text
//! ProcessGroup::all_reduce … ──enter/leave──► RECORDER (a Mutex, held for a push)
//! trainer ──phase, iteration, stop─────────►     │  clone under the lock
//!                              writer thread (every 200 ms when `ticks` moved) ──► rank-R.json
//!                              flush() at the exits that matter (an error, Done, a stop)
//! ```
//!
//! Training never waits for the disk: the hot path only takes the recorder's mutex to push
//! or update an entry; the writer thread clones the state under the lock and writes outside
//! it (a temporary file in the same folder, then a rename, so readers never see half a file).
//! Without `MM_RANK_STATE_DIR` nothing is written, and recording stays a few allocations per
//! collective.
//!
//! Sequence numbers count per [`ProcessGroup`](super::c10d::ProcessGroup) instance, so they
//! agree on every member of a group. Point-to-point transfers (pipeline exchanges) count per
//! direction instead, as the group `p2p[<src>-><dst>]` of the two global ranks, since a group's
//! members do not all take part in them. A collective that fails keeps `end_ms: None`: the
//! last state then shows where the rank gave up.
//!
//! Also here: the test-only fault injection of `MM_ENGINE_FAULT` ([`Fault`]).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mm_spec::flight::{state_file_name, Collective, Phase, RankState, FAULT_ENV, RING, STATE_DIR_ENV};

struct Recorder {
    state: RankState,
    /// The last [`RING`] collectives with their entry ids (for [`leave`]), oldest first.
    ring: VecDeque<(u64, Collective)>,
    next_id: u64,
}

impl Recorder {
    const fn new() -> Recorder {
        Recorder {
            state: RankState {
                rank: 0,
                pid: 0,
                phase: Phase::Rendezvous,
                iteration: 0,
                ticks: 0,
                updated_ms: 0,
                groups: std::collections::BTreeMap::new(),
                collectives: Vec::new(),
                stop: None,
            },
            ring: VecDeque::new(),
            next_id: 0,
        }
    }

    fn touch(&mut self) {
        self.state.ticks += 1;
        self.state.updated_ms = now_ms();
    }

    fn snapshot(&self) -> RankState {
        let mut s = self.state.clone();
        s.collectives = self.ring.iter().map(|(_, c)| c.clone()).collect();
        s
    }
}

static RECORDER: Mutex<Recorder> = Mutex::new(Recorder::new());

/// Where the state goes, once [`init`] found `MM_RANK_STATE_DIR`.
struct Writer {
    path: PathBuf,
    tmp: PathBuf,
    /// The `ticks` last written; the lock also keeps two writes from interleaving.
    last: Mutex<Option<u64>>,
}

static WRITER: OnceLock<Writer> = OnceLock::new();
static WRITE_FAILED: AtomicBool = AtomicBool::new(false);

fn recorder() -> MutexGuard<'static, Recorder> {
    RECORDER.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Names this process's state (global rank, pid) and, when `MM_RANK_STATE_DIR` is set, starts
/// the writer thread. Call once per process, before the rendezvous; later calls only update
/// the rank.
pub fn init(rank: usize) {
    {
        let mut r = recorder();
        r.state.rank = rank;
        r.state.pid = std::process::id();
        r.touch();
    }
    let Some(dir) = std::env::var_os(STATE_DIR_ENV).filter(|d| !d.is_empty()).map(PathBuf::from) else { return };
    if WRITER.get().is_some() {
        return;
    }
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("warning: {STATE_DIR_ENV}={}: {e}; no rank state file is written", dir.display());
        return;
    }
    let name = state_file_name(rank);
    let writer = Writer {
        path: dir.join(&name),
        tmp: dir.join(format!(".{name}.{}.tmp", std::process::id())),
        last: Mutex::new(None),
    };
    if WRITER.set(writer).is_err() {
        return;
    }
    write_if_changed();
    let spawned = std::thread::Builder::new().name("mm-flight".into()).spawn(|| loop {
        std::thread::sleep(Duration::from_millis(200));
        write_if_changed();
    });
    if let Err(e) = spawned {
        eprintln!("warning: cannot start the rank state writer: {e}; the state file is only written at exits");
    }
}

/// Writes the state file now when it changed since the last write (a no-op without
/// `MM_RANK_STATE_DIR`). The writer thread calls it every 200 ms; call it at exits.
pub fn flush() {
    write_if_changed();
}

fn write_if_changed() {
    let Some(w) = WRITER.get() else { return };
    let mut last = w.last.lock().unwrap_or_else(|e| e.into_inner());
    let snap = {
        let r = recorder();
        if *last == Some(r.state.ticks) {
            return;
        }
        r.snapshot()
    };
    let written = serde_json::to_vec(&snap)
        .map_err(std::io::Error::other)
        .and_then(|json| std::fs::write(&w.tmp, json))
        .and_then(|()| std::fs::rename(&w.tmp, &w.path));
    match written {
        Ok(()) => *last = Some(snap.ticks),
        Err(e) => {
            if !WRITE_FAILED.swap(true, Ordering::Relaxed) {
                eprintln!("warning: cannot write the rank state file {}: {e}", w.path.display());
            }
        }
    }
}

/// The current state (as the file would hold it).
pub fn snapshot() -> RankState {
    recorder().snapshot()
}

pub fn phase() -> Phase {
    recorder().state.phase
}

pub fn set_phase(phase: Phase) {
    let mut r = recorder();
    if r.state.phase != phase {
        r.state.phase = phase;
        r.touch();
    }
}

/// Iterations completed.
pub fn set_iteration(iteration: u64) {
    let mut r = recorder();
    if r.state.iteration != iteration {
        r.state.iteration = iteration;
        r.touch();
    }
}

/// The stop request this rank took ("SIGTERM").
pub fn set_stop(signal: &str) {
    let mut r = recorder();
    r.state.stop = Some(signal.to_string());
    r.touch();
}

/// A process group this rank belongs to: its name and global ranks (group-rank order).
pub fn register_group(name: &str, ranks: &[usize]) {
    let mut r = recorder();
    r.state.groups.insert(name.to_string(), ranks.to_vec());
    r.touch();
}

/// The name of a sub-group: `"<kind>[<global ranks>]"`, e.g. `dp[0,2]` (the same on every member).
pub fn group_name(kind: &str, ranks: &[usize]) -> String {
    let list: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
    format!("{kind}[{}]", list.join(","))
}

/// Records that this rank enters collective number `seq` of `group`; returns the entry's id
/// for [`leave`].
pub fn enter(group: &str, seq: u64, op: &str, what: &str, bytes: u64) -> u64 {
    let mut r = recorder();
    let id = r.next_id;
    r.next_id += 1;
    let c = Collective {
        group: group.to_string(),
        seq,
        op: op.to_string(),
        what: what.to_string(),
        bytes,
        start_ms: now_ms(),
        end_ms: None,
    };
    r.ring.push_back((id, c));
    while r.ring.len() > RING {
        r.ring.pop_front();
    }
    r.touch();
    id
}

/// Records that the collective [`enter`] returned `id` for completed.
pub fn leave(id: u64) {
    let mut r = recorder();
    let now = now_ms();
    if let Some((_, c)) = r.ring.iter_mut().rev().find(|(i, _)| *i == id) {
        c.end_ms = Some(now);
        r.touch();
    }
}

/// Test-only fault injection (`MM_ENGINE_FAULT`), for the launcher's stall watchdog tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// `sleep:rank=R:iteration=N:seconds=S`: global rank R sleeps S seconds at the start of
    /// iteration N (1-based), before the step's first collective and outside any collective;
    /// the other ranks wait for it in that collective.
    Sleep { rank: usize, iteration: u64, seconds: f64 },
    /// `desync:rank=R:iteration=N`: at the start of iteration N, global rank R enters a
    /// 1-element broadcast (from group rank 0, `what` = "fault injection") on the group of the
    /// step's first collective, which the other ranks do not: they sit in their all-reduce at
    /// the same sequence number.
    Desync { rank: usize, iteration: u64 },
}

/// A malformed `MM_ENGINE_FAULT`.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "environment variable {FAULT_ENV}={value:?} is not valid: {problem}; expected \
     sleep:rank=R:iteration=N:seconds=S or desync:rank=R:iteration=N (test-only fault injection; unset it for real runs)"
)]
pub struct FaultError {
    pub value: String,
    pub problem: String,
}

impl Fault {
    /// Parses the variable's value strictly: the fields in this order, each once, numbers only.
    pub fn parse(value: &str) -> Result<Fault, FaultError> {
        let bad = |problem: String| FaultError { value: value.to_string(), problem };
        let mut parts = value.split(':');
        let kind = parts.next().unwrap_or_default();
        let keys: &[&str] = match kind {
            "sleep" => &["rank", "iteration", "seconds"],
            "desync" => &["rank", "iteration"],
            other => return Err(bad(format!("unknown fault {other:?}"))),
        };
        let fields: Vec<&str> = parts.collect();
        if fields.len() != keys.len() {
            return Err(bad(format!("{kind} takes {} fields ({}), got {}", keys.len(), keys.join(", "), fields.len())));
        }
        let mut values = Vec::new();
        for (field, key) in fields.iter().zip(keys) {
            let v = field
                .strip_prefix(key)
                .and_then(|rest| rest.strip_prefix('='))
                .ok_or_else(|| bad(format!("{field:?} where {key}=… belongs")))?;
            values.push(v);
        }
        let int = |i: usize| -> Result<u64, FaultError> {
            values[i]
                .parse::<u64>()
                .map_err(|_| bad(format!("{}={:?} is not a non-negative integer", keys[i], values[i])))
        };
        let rank = int(0)? as usize;
        let iteration = int(1)?;
        if iteration == 0 {
            return Err(bad("iteration=0: iterations count from 1".into()));
        }
        match kind {
            "sleep" => {
                let seconds = values[2]
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| bad(format!("seconds={:?} is not a positive number", values[2])))?;
                Ok(Fault::Sleep { rank, iteration, seconds })
            }
            _ => Ok(Fault::Desync { rank, iteration }),
        }
    }

    /// `MM_ENGINE_FAULT` of this process (None when unset or empty), checked against the
    /// world size; the affected rank says loudly on stderr that a fault is armed.
    pub fn from_env(rank: usize, world_size: usize) -> Result<Option<Fault>, FaultError> {
        let Some(value) = std::env::var(FAULT_ENV).ok().filter(|v| !v.trim().is_empty()) else { return Ok(None) };
        let fault = Fault::parse(value.trim())?;
        if fault.rank() >= world_size {
            return Err(FaultError {
                value,
                problem: format!("rank={} is not below WORLD_SIZE {world_size}", fault.rank()),
            });
        }
        if fault.rank() == rank {
            eprintln!(
                "warning: fault injection active: {FAULT_ENV}={value} ({fault:?}); this run is a test, not training"
            );
        }
        Ok(Some(fault))
    }

    pub fn rank(&self) -> usize {
        match self {
            Fault::Sleep { rank, .. } | Fault::Desync { rank, .. } => *rank,
        }
    }

    /// The fault this rank (`global_rank`) injects at the start of `iteration`, if any.
    pub fn at(&self, global_rank: usize, iteration: u64) -> Option<Fault> {
        let (rank, at) = match self {
            Fault::Sleep { rank, iteration, .. } | Fault::Desync { rank, iteration } => (*rank, *iteration),
        };
        (rank == global_rank && at == iteration).then_some(*self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_strictly() {
        assert_eq!(
            Fault::parse("sleep:rank=1:iteration=3:seconds=8").unwrap(),
            Fault::Sleep { rank: 1, iteration: 3, seconds: 8.0 }
        );
        assert_eq!(Fault::parse("desync:rank=2:iteration=5").unwrap(), Fault::Desync { rank: 2, iteration: 5 });
        for (bad, says) in [
            ("hang:rank=1", "unknown fault \"hang\""),
            ("sleep:rank=1:iteration=3", "sleep takes 3 fields"),
            ("desync:iteration=2:rank=1", "\"iteration=2\" where rank=… belongs"),
            ("desync:rank=x:iteration=2", "rank=\"x\" is not a non-negative integer"),
            ("desync:rank=1:iteration=0", "iterations count from 1"),
            ("sleep:rank=1:iteration=3:seconds=-1", "seconds=\"-1\" is not a positive number"),
            ("desync:rank=1:iteration=2:", "desync takes 2 fields"),
        ] {
            let e = Fault::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains(says) && e.contains("MM_ENGINE_FAULT") && e.contains("desync:rank=R:iteration=N"),
                "{e}"
            );
        }
        let f = Fault::Desync { rank: 1, iteration: 2 };
        assert_eq!(f.at(1, 2), Some(f));
        assert_eq!(f.at(0, 2), None);
        assert_eq!(f.at(1, 3), None);
    }

    #[test]
    fn the_ring_keeps_the_last_collectives_and_their_ends() {
        register_group("test[0,1]", &[0, 1]);
        let before = snapshot().ticks;
        let ids: Vec<u64> =
            (1..=RING as u64 + 3).map(|k| enter("test[0,1]", k, "all_reduce", "unit test", 8)).collect();
        for id in &ids[..ids.len() - 1] {
            leave(*id);
        }
        let s = snapshot();
        assert!(s.ticks > before);
        let mine: Vec<&Collective> = s.collectives.iter().filter(|c| c.group == "test[0,1]").collect();
        assert!(mine.len() <= RING);
        assert_eq!(mine.last().map(|c| c.seq), Some(RING as u64 + 3));
        assert!(s.in_flight().is_some_and(|c| c.what == "unit test"));
        assert_eq!(s.groups.get("test[0,1]"), Some(&vec![0, 1]));
        leave(*ids.last().unwrap());
        assert!(snapshot().in_flight().is_none());
        assert_eq!(group_name("dp", &[0, 2]), "dp[0,2]");
    }
}
