//! What one attempt came to: the dispatcher's result types ([`Outcome`], [`Failure`], the
//! per-host [`NodeReport`]s), the engine's end-of-run [`TrainingSummary`], and the one-line
//! labels both the dispatcher's events and the report print ([`failure_headline`],
//! [`ranks_label`]). The dispatcher produces these, the report and the logs read them; this
//! module sits below all of them and imports none.

use std::time::Duration;

use crate::events::HostInfo;
use crate::exec::proto::{signal_name, ExitStatus};

/// Exit code when nothing could be started (a host unreachable, its key refused, no agent).
pub const EXIT_NOT_STARTED: i32 = 4;
/// Exit code when a host was lost or its agent died mid-run (ssh's code for connection loss).
pub const EXIT_LOST: i32 = 255;
/// Exit code when the stall watchdog stopped the job (timeout(1)'s code).
pub const EXIT_STALLED: i32 = 124;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    Int,
    Term,
    Hup,
    /// Slurm's usual warning before preemption (`--signal=B:USR1@120`).
    Usr1,
}

impl Sig {
    pub fn number(self) -> i32 {
        match self {
            Sig::Int => libc::SIGINT,
            Sig::Term => libc::SIGTERM,
            Sig::Hup => libc::SIGHUP,
            Sig::Usr1 => libc::SIGUSR1,
        }
    }

    pub fn name(self) -> String {
        signal_name(self.number())
    }

    pub fn from_number(n: i32) -> Option<Sig> {
        [Sig::Int, Sig::Term, Sig::Hup, Sig::Usr1].into_iter().find(|s| s.number() == n)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum FailureKind {
    /// A unit exited non-zero or was killed by a signal.
    Exit(ExitStatus),
    SpawnFailed(String),
    /// Heartbeats stopped: the host or its link is gone.
    Lost(String),
    /// The agent's connection ended before it reported every unit.
    AgentDied(String),
    /// An agent stopped its ranks on its own (the launcher fell silent, the agent got a signal).
    AgentStopped(String),
    /// The stall watchdog's budget ran out: the full diagnosis.
    Stalled(String),
    /// The host was never reached or its agent never started.
    ConnectFailed(String),
    PortFailed(String),
    RenderFailed(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub node: usize,
    pub unit: Option<usize>,
    pub kind: FailureKind,
    /// Since the attempt started.
    pub after: Duration,
}

impl Failure {
    pub fn exit_code(&self) -> i32 {
        match &self.kind {
            FailureKind::Exit(s) => s.shell_code(),
            FailureKind::SpawnFailed(_) => 127,
            FailureKind::Lost(_) | FailureKind::AgentDied(_) | FailureKind::AgentStopped(_) => EXIT_LOST,
            FailureKind::Stalled(_) => EXIT_STALLED,
            FailureKind::ConnectFailed(_) | FailureKind::PortFailed(_) | FailureKind::RenderFailed(_) => {
                EXIT_NOT_STARTED
            }
        }
    }

    /// Worth a restart: something failed while running (not a configuration problem).
    pub fn restartable(&self) -> bool {
        matches!(
            self.kind,
            FailureKind::Exit(_)
                | FailureKind::SpawnFailed(_)
                | FailureKind::Lost(_)
                | FailureKind::AgentDied(_)
                | FailureKind::AgentStopped(_)
                | FailureKind::Stalled(_)
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success,
    Failed(Failure),
    Interrupted { signal: Sig, failure: Option<Failure> },
}

impl Outcome {
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Success => 0,
            Outcome::Failed(f) => f.exit_code(),
            Outcome::Interrupted { signal, .. } => 128 + signal.number(),
        }
    }
}

/// What happened to one unit, for the report.
#[derive(Debug, Clone, Default)]
pub struct UnitReport {
    pub ranks: Vec<usize>,
    pub pid: Option<u32>,
    pub status: Option<ExitStatus>,
    /// Ended during a stop the launcher ordered.
    pub stopped: bool,
    pub spawn_error: Option<String>,
}

/// What happened on one host, for the report.
#[derive(Debug, Clone)]
pub struct NodeReport {
    pub info: HostInfo,
    pub connected: bool,
    pub connect_error: Option<String>,
    pub lost: Option<String>,
    /// Closed without Done: why.
    pub agent_error: Option<String>,
    /// Gave no sign of stopping even after Kill.
    pub unresponsive: bool,
    pub units: Vec<UnitReport>,
    /// The agent's last stderr lines.
    pub agent_stderr: Vec<String>,
}

#[derive(Debug)]
pub struct AttemptResult {
    pub outcome: Outcome,
    pub nodes: Vec<NodeReport>,
    pub master_port: Option<u16>,
    pub elapsed: Duration,
    /// Every watched rank's last state: (rank, host, report).
    pub rank_states: Vec<(usize, String, crate::exec::proto::RankReport)>,
    /// What the ranks were doing at the end, from their states (not for a success).
    pub diagnosis: Option<mm_spec::flight::Diagnosis>,
}

/// "rank 3", "ranks 0-7", "ranks 0,2,5".
pub fn ranks_label(ranks: &[usize]) -> String {
    match ranks {
        [] => "no ranks".into(),
        [r] => format!("rank {r}"),
        [a, .., b] if b - a + 1 == ranks.len() && ranks.windows(2).all(|w| w[1] == w[0] + 1) => {
            format!("ranks {a}-{b}")
        }
        _ => format!("ranks {}", ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(",")),
    }
}

fn unit_label(node: &NodeReport, unit: Option<usize>) -> String {
    match unit.and_then(|u| node.units.get(u)) {
        Some(u) if u.ranks.len() > 1 => format!("{} (one process)", ranks_label(&u.ranks)),
        Some(u) => ranks_label(&u.ranks),
        None => "a process".into(),
    }
}

/// One sentence naming the failure: who, where, what.
pub fn failure_headline(f: &Failure, node: &NodeReport) -> String {
    let host = format!("{} ({})", node.info.name, node.info.address);
    match &f.kind {
        FailureKind::Exit(s) if s.signal.is_some() => {
            format!("{} on {host} was killed by {}", unit_label(node, f.unit), s.describe())
        }
        FailureKind::Exit(s) => format!("{} on {host} exited with {}", unit_label(node, f.unit), s.describe()),
        FailureKind::SpawnFailed(m) => format!("{} on {host} could not start: {m}", unit_label(node, f.unit)),
        FailureKind::Lost(r) => format!("host {host} was lost: {r}"),
        // The link's own words already name the host and what happened.
        FailureKind::AgentDied(r) if r.starts_with("the SSH connection to ") => r.clone(),
        FailureKind::AgentDied(r) => format!("the node agent on {host} failed: {r}"),
        FailureKind::AgentStopped(r) => format!("the node agent on {host} stopped its ranks: {r}"),
        FailureKind::Stalled(r) => r.clone(),
        FailureKind::ConnectFailed(r) => format!("cannot start on {host}: {r}"),
        FailureKind::PortFailed(r) => format!("{host}: {r}"),
        FailureKind::RenderFailed(r) => format!("cannot render the launch: {r}"),
    }
}

/// The engine's agreed stop (its `stopped` progress event): every rank finished `iteration`
/// and saved `checkpoint` after `signal`.
#[derive(Debug, Clone, PartialEq)]
pub struct StopSummary {
    pub iteration: u64,
    pub signal: String,
    pub checkpoint: Option<String>,
}

/// The engine's end-of-run summary (its `done` progress event), kept for the report and
/// status.json: one type, mm-spec's.
pub use mm_spec::progress::RunSummary as TrainingSummary;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(ranks_label(&[3]), "rank 3");
        assert_eq!(ranks_label(&[0, 1, 2, 3]), "ranks 0-3");
        assert_eq!(ranks_label(&[0, 2, 5]), "ranks 0,2,5");
        assert_eq!(ranks_label(&[]), "no ranks");
    }
}
