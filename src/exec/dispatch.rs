//! The dispatcher: one attempt of a launch, as a single actor.
//!
//! ```text
//!   links (one per host) ──(node, LinkEvent)──┐
//!   signals (INT/TERM/HUP) ──────────────────►├─ select! ─► state machine ─► LaunchEvents ─► reporters
//!   tick (200 ms: heartbeats, deadlines) ─────┘                  │
//!                                                                └─► ToAgent commands ─► links
//!   Connecting ──all Hello (+ Port)──► Running ──first failure / signal──► Stopping ──► all closed
//! ```
//!
//! Fail fast: the first unit that exits non-zero, a host whose heartbeats stop (keepalive
//! interval × count), an agent whose link breaks: every host gets Stop (SIGTERM to every
//! process group, SIGKILL after the grace period, done by the agents). A host that has not
//! confirmed within grace + 5 s gets Kill; one that still has not within 5 s more is given up
//! (its agent stops its ranks by itself when the launcher's heartbeats stop).
//!
//! Signals: the first INT/TERM/HUP starts the same orderly stop; a second one within
//! `double_signal_window` kills at once.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::events::{split_by_rank, HostInfo, LaunchEvent, Reporter, Scrubber};
use crate::exec::backend::{Backend, Link, LinkEvent};
use crate::exec::outcome::{
    failure_headline, AttemptResult, Failure, FailureKind, NodeReport, Outcome, Sig, UnitReport,
};
use crate::exec::proto::{ExitStatus, FromAgent, ToAgent, UnitSpec, PROTOCOL};
use crate::exec::watchdog::{WatchAction, Watchdog};
use crate::progress::ProgressSource;
use crate::render::{is_secret_name, setup_secrets, Rendered};

/// After the grace period, how long a host may take to confirm its stop before Kill.
const STOP_SLACK: Duration = Duration::from_secs(5);
/// After Kill, how long before a silent host is given up.
const KILL_SLACK: Duration = Duration::from_secs(5);
/// After an agent's Done, how long its connection may take to close.
const CLOSE_SLACK: Duration = Duration::from_secs(3);
/// How long a probe of a silent agent may take before its host counts as lost.
const PROBE_LIMIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// SIGTERM → SIGKILL delay on every host.
    pub grace: Duration,
    /// Heartbeat period and how many may be missed before a host counts as lost.
    pub heartbeat: Option<(Duration, u32)>,
    /// A second signal within this window kills at once.
    pub double_signal_window: Duration,
    /// Agents stop their units by themselves when the launcher's heartbeats stop. Wanted
    /// over a network (a lost link); locally stdin EOF already says the launcher is gone,
    /// and a suspended launcher (Ctrl-Z) should not end the job.
    pub agent_watchdog: bool,
    /// `--hang-timeout`: one stall budget for every phase instead of the phase defaults.
    pub hang_timeout: Option<Duration>,
    /// How the ranks report progress: each `Output` is followed by the `Progress` events
    /// parsed from it.
    pub progress: ProgressSource,
}

/// Everything one attempt needs besides the backend.
pub struct AttemptSpec<'a> {
    pub attempt: u32,
    pub max_restarts: u32,
    pub hosts: &'a [HostInfo],
    /// The node that picks MASTER_PORT when `need_port`.
    pub master_node: usize,
    pub need_port: bool,
    /// Renders the launch for a master port (the picked one, or the plan's).
    pub render: &'a mut dyn FnMut(Option<u16>) -> Result<Rendered, String>,
    /// Variables added to every unit (LAUNCH_ATTEMPT, LAUNCH_RUN_ID).
    pub extra_env: BTreeMap<String, String>,
}

struct NodeState {
    link: Option<Box<dyn Link>>,
    hello: bool,
    /// The agent's pid on its host (from Hello).
    agent_pid: Option<u32>,
    /// Since when a probe of the silent agent runs.
    probing: Option<Instant>,
    /// A probe found the agent stopped and continued it once already.
    continued: bool,
    last_seen: Instant,
    done_at: Option<Instant>,
    closed: bool,
    report: NodeReport,
}

impl NodeState {
    fn terminal(&self) -> bool {
        self.closed || self.report.lost.is_some() || self.report.unresponsive
    }
    fn live(&self) -> bool {
        self.hello && !self.terminal()
    }
}

#[derive(PartialEq, Eq, Clone, Copy, Debug)]
enum Phase {
    Connecting,
    Running,
    Stopping,
}

struct Dispatcher<'a, 's, 'r> {
    cfg: &'a DispatchConfig,
    reporters: &'r mut dyn Reporter,
    spec: AttemptSpec<'s>,
    nodes: Vec<NodeState>,
    t0: Instant,
    phase: Phase,
    first_failure: Option<Failure>,
    interrupted: Option<Sig>,
    last_signal: Option<Instant>,
    port_requested: bool,
    port: Option<u16>,
    stop_deadline: Option<Instant>,
    kill_deadline: Option<Instant>,
    next_heartbeat: Instant,
    last_tick: Instant,
    scrubber: Scrubber,
    started_units: usize,
    total_units: usize,
    watchdog: Watchdog,
    /// The longest time the launcher itself did not run (suspended, starved), if any.
    paused: Option<Duration>,
}

/// Runs one attempt to its end: every host closed, lost or given up.
pub async fn run_attempt(
    backend: &dyn Backend,
    cfg: &DispatchConfig,
    spec: AttemptSpec<'_>,
    reporters: &mut dyn Reporter,
    signals: &mut mpsc::UnboundedReceiver<Sig>,
) -> AttemptResult {
    let now = Instant::now();
    let (tx, mut rx) = mpsc::channel(1024);
    let spec_hosts = spec.hosts;
    let nodes = spec
        .hosts
        .iter()
        .map(|h| NodeState {
            link: None,
            hello: false,
            agent_pid: None,
            probing: None,
            continued: false,
            last_seen: now,
            done_at: None,
            closed: false,
            report: NodeReport {
                info: h.clone(),
                connected: false,
                connect_error: None,
                lost: None,
                agent_error: None,
                unresponsive: false,
                units: Vec::new(),
                agent_stderr: Vec::new(),
            },
        })
        .collect();
    let mut d = Dispatcher {
        cfg,
        reporters,
        spec,
        nodes,
        t0: now,
        phase: Phase::Connecting,
        first_failure: None,
        interrupted: None,
        last_signal: None,
        port_requested: false,
        port: None,
        stop_deadline: None,
        kill_deadline: None,
        next_heartbeat: now,
        last_tick: now,
        scrubber: Scrubber::new([]),
        started_units: 0,
        total_units: 0,
        watchdog: Watchdog::new(spec_hosts, cfg.hang_timeout, now),
        paused: None,
    };
    d.reporters.event(&LaunchEvent::AttemptStarting { attempt: d.spec.attempt, max_restarts: d.spec.max_restarts });
    let (heartbeat_ms, miss) = cfg.heartbeat.map(|(i, c)| (i.as_millis() as u64, c)).unwrap_or((0, 0));
    let miss = if cfg.agent_watchdog { miss } else { 0 };
    for i in 0..d.nodes.len() {
        let link = backend.open(i, tx.clone());
        link.send(&ToAgent::Init { heartbeat_ms, miss });
        d.nodes[i].link = Some(link);
    }
    drop(tx);
    tracing::info!(backend = backend.name(), hosts = d.nodes.len(), attempt = d.spec.attempt, "connecting");
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !d.nodes.iter().all(NodeState::terminal) {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some((node, ev)) => d.on_link(node, ev),
                None => break,
            },
            Some(sig) = signals.recv() => d.on_signal(sig),
            _ = tick.tick() => d.on_tick(),
        }
    }
    for n in &mut d.nodes {
        if let Some(link) = n.link.take() {
            link.abandon();
        }
    }
    d.reporters.flush();
    let outcome = d.outcome();
    let diagnosis = (outcome != Outcome::Success).then(|| d.watchdog.diagnosis());
    AttemptResult {
        outcome,
        nodes: d.nodes.into_iter().map(|n| n.report).collect(),
        master_port: d.port,
        elapsed: d.t0.elapsed(),
        rank_states: d.watchdog.snapshots(),
        diagnosis,
    }
}

impl Dispatcher<'_, '_, '_> {
    fn send(&self, node: usize, msg: &ToAgent) {
        if let Some(link) = &self.nodes[node].link {
            link.send(msg);
        }
    }

    fn notice(&mut self, node: Option<usize>, message: String, warning: bool) {
        if warning {
            tracing::warn!(node, "{message}");
        } else {
            tracing::info!(node, "{message}");
        }
        self.reporters.event(&LaunchEvent::Notice { node, message, warning });
    }

    fn on_link(&mut self, node: usize, ev: LinkEvent) {
        let now = Instant::now();
        if self.nodes[node].terminal() {
            return;
        }
        if let LinkEvent::Probe(found) = ev {
            return self.on_probe(node, found);
        }
        self.nodes[node].last_seen = now;
        match ev {
            LinkEvent::Msg(m) => self.on_message(node, m),
            LinkEvent::Stderr(line) => {
                let tail = &mut self.nodes[node].report.agent_stderr;
                tail.push(line.clone());
                if tail.len() > 20 {
                    tail.remove(0);
                }
                self.notice(Some(node), format!("agent: {line}"), true);
            }
            LinkEvent::Notice(message) => self.notice(None, message, false),
            LinkEvent::Probe(_) => {}
            LinkEvent::Closed { status, error } => {
                self.nodes[node].closed = true;
                self.nodes[node].link = None;
                let hello = self.nodes[node].hello;
                let done = self.nodes[node].done_at.is_some();
                if !hello {
                    let why = error.unwrap_or_else(|| "the connection closed before the agent greeted".into());
                    self.nodes[node].report.connect_error = Some(why.clone());
                    self.fail(node, None, FailureKind::ConnectFailed(why));
                } else if !done {
                    let why = match (error, status) {
                        (Some(e), _) => e,
                        (None, Some(s)) => format!("the node agent ended with {} before its ranks did", s.describe()),
                        (None, None) => "the connection to the node agent closed".into(),
                    };
                    self.nodes[node].report.agent_error = Some(why.clone());
                    if self.phase == Phase::Stopping {
                        self.notice(Some(node), why, true);
                    } else {
                        self.fail(node, None, FailureKind::AgentDied(why));
                    }
                }
            }
        }
    }

    fn on_message(&mut self, node: usize, m: FromAgent) {
        match m {
            FromAgent::Output { unit, stream, data } => {
                let unit = unit as usize;
                let Some(u) = self.nodes[node].report.units.get(unit) else { return };
                let data = self.scrubber.scrub(&data);
                let (reporters, source) = (&mut *self.reporters, self.cfg.progress);
                let mut output = |rank: Option<usize>, data: &[u8]| {
                    reporters.event(&LaunchEvent::Output { node, unit, rank, stream, data });
                    source.for_each(data, |event| reporters.event(&LaunchEvent::Progress { node, rank, event }));
                };
                if u.ranks.len() == 1 {
                    output(Some(u.ranks[0]), &data);
                } else {
                    for (rank, run) in split_by_rank(&data, &u.ranks) {
                        output(rank, &run);
                    }
                }
            }
            FromAgent::Heartbeat => {}
            FromAgent::Hello { protocol, version, hostname, pid } => {
                if protocol != PROTOCOL {
                    let why = format!(
                        "the agent on this host speaks protocol {protocol} (launch {version}); this launcher \
                         speaks {PROTOCOL}: install the same launch version there"
                    );
                    self.nodes[node].report.connect_error = Some(why.clone());
                    self.fail(node, None, FailureKind::ConnectFailed(why));
                    return;
                }
                tracing::info!(node, %hostname, agent_pid = pid, %version, "agent ready");
                self.nodes[node].hello = true;
                self.nodes[node].agent_pid = Some(pid);
                self.nodes[node].report.connected = true;
                let elapsed = self.t0.elapsed();
                self.reporters.event(&LaunchEvent::Connected { node, elapsed });
                if self.phase != Phase::Connecting {
                    // Stopping before everyone connected: nothing to start here.
                    if let Some(l) = &self.nodes[node].link {
                        l.close();
                    }
                    return;
                }
                if self.spec.need_port && node == self.spec.master_node && !self.port_requested {
                    self.port_requested = true;
                    self.send(node, &ToAgent::PickPort);
                }
                self.maybe_launch();
            }
            FromAgent::Port { port } => {
                self.port = Some(port);
                tracing::info!(port, "master port picked");
                self.maybe_launch();
            }
            FromAgent::PortFailed { message } => {
                self.fail(node, None, FailureKind::PortFailed(format!("cannot find a free port: {message}")))
            }
            FromAgent::Started { unit, pid } => {
                if let Some(u) = self.nodes[node].report.units.get_mut(unit as usize) {
                    u.pid = Some(pid);
                }
                self.reporters.event(&LaunchEvent::UnitStarted { node, unit: unit as usize, pid });
                self.started_units += 1;
                if self.started_units == self.total_units {
                    let elapsed = self.t0.elapsed();
                    tracing::info!(elapsed_ms = elapsed.as_millis() as u64, "all ranks started");
                    self.reporters.event(&LaunchEvent::AllStarted { elapsed });
                }
            }
            FromAgent::SpawnFailed { unit, message } => {
                if let Some(u) = self.nodes[node].report.units.get_mut(unit as usize) {
                    u.spawn_error = Some(message.clone());
                    u.status = Some(ExitStatus::code(127));
                }
                self.fail(node, Some(unit as usize), FailureKind::SpawnFailed(message));
            }
            FromAgent::Exited { unit, status } => {
                let unit = unit as usize;
                let stopped = self.phase == Phase::Stopping;
                if let Some(u) = self.nodes[node].report.units.get_mut(unit) {
                    u.status = Some(status);
                    u.stopped = stopped;
                }
                self.reporters.event(&LaunchEvent::UnitExited { node, unit, status, stopped });
                if !status.success() && !stopped {
                    self.fail(node, Some(unit), FailureKind::Exit(status));
                }
            }
            FromAgent::Ranks { ranks, units } => {
                let report = &self.nodes[node].report;
                let units: Vec<(usize, u32, char)> = units
                    .iter()
                    .filter_map(|&(u, state)| {
                        let u = report.units.get(u as usize)?;
                        match (u.ranks.as_slice(), u.pid) {
                            ([rank], Some(pid)) => Some((*rank, pid, state)),
                            _ => None,
                        }
                    })
                    .collect();
                // Once stopping, the states are the stop's, not the failure's: keep the last
                // ones from before it for the diagnosis and the run folder.
                if self.phase == Phase::Running {
                    self.watchdog.update(ranks, &units, Instant::now());
                }
            }
            FromAgent::StoppingRanks { reason } => {
                if self.phase != Phase::Running {
                    return self.notice(Some(node), reason, true);
                }
                // Read before the tick that would notice the launcher's own pause.
                let gap = Instant::now().duration_since(self.last_tick);
                if gap > Duration::from_secs(1) {
                    self.paused = Some(self.paused.map_or(gap, |p| p.max(gap)));
                }
                let why = match self.paused {
                    Some(p) => format!(
                        "the launcher did not run for {:.1}s (suspended or starved), and meanwhile {reason}",
                        p.as_secs_f64()
                    ),
                    None => reason,
                };
                self.fail(node, None, FailureKind::AgentStopped(why));
            }
            FromAgent::Warning { message } => self.notice(Some(node), message, true),
            FromAgent::Done => self.nodes[node].done_at = Some(Instant::now()),
        }
    }

    fn maybe_launch(&mut self) {
        if self.phase != Phase::Connecting
            || !self.nodes.iter().all(|n| n.hello)
            || (self.spec.need_port && self.port.is_none())
        {
            return;
        }
        let mut rendered = match (self.spec.render)(self.port) {
            Ok(r) => r,
            Err(e) => {
                self.fail(0, None, FailureKind::RenderFailed(e));
                return;
            }
        };
        for n in &mut rendered.nodes {
            for u in &mut n.units {
                u.env.extend(self.spec.extra_env.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        let units = || rendered.nodes.iter().flat_map(|n| n.units.iter());
        let mut secrets: Vec<String> =
            units().flat_map(|u| u.env.iter()).filter(|(k, _)| is_secret_name(k)).map(|(_, v)| v.clone()).collect();
        // Values the `setup:` lines assign to secret names (in every unit's script).
        secrets.extend(units().flat_map(|u| u.script.lines().flat_map(setup_secrets)));
        self.scrubber = Scrubber::new(secrets.iter().map(String::as_str));
        for (i, n) in self.nodes.iter_mut().enumerate() {
            n.report.units = rendered
                .nodes
                .get(i)
                .map(|rn| {
                    rn.units.iter().map(|u| UnitReport { ranks: u.ranks.clone(), ..Default::default() }).collect()
                })
                .unwrap_or_default();
        }
        self.total_units = self.nodes.iter().map(|n| n.report.units.len()).sum();
        let master_port = self.port.unwrap_or_else(|| {
            rendered
                .nodes
                .first()
                .and_then(|n| n.units.first())
                .and_then(|u| u.env.get("MASTER_PORT"))
                .and_then(|p| p.parse().ok())
                .unwrap_or(0)
        });
        let elapsed = self.t0.elapsed();
        self.reporters.event(&LaunchEvent::Launching { rendered: &rendered, master_port, elapsed });
        self.phase = Phase::Running;
        let grace_ms = self.cfg.grace.as_millis() as u64;
        for (i, rn) in rendered.nodes.iter().enumerate().take(self.nodes.len()) {
            let units = rn.units.iter().map(|u| UnitSpec { env: u.env.clone(), script: u.script.clone() }).collect();
            self.send(i, &ToAgent::Start { grace_ms, units });
        }
    }

    fn fail(&mut self, node: usize, unit: Option<usize>, kind: FailureKind) {
        if self.first_failure.is_some() || self.interrupted.is_some() {
            return;
        }
        let f = Failure { node, unit, kind, after: self.t0.elapsed() };
        let host = self.nodes[node].report.info.name.clone();
        let what = failure_headline(&f, &self.nodes[node].report);
        tracing::error!(host = %host, "{what}");
        self.first_failure = Some(f);
        self.begin_stop(what);
    }

    fn begin_stop(&mut self, reason: String) {
        if self.phase == Phase::Stopping {
            return;
        }
        let was = self.phase;
        self.phase = Phase::Stopping;
        let now = Instant::now();
        if was == Phase::Connecting {
            // Nothing runs yet: close every link; hosts still connecting are given up.
            for n in &mut self.nodes {
                match (&n.link, n.hello) {
                    (Some(l), true) => l.close(),
                    (Some(l), false) => {
                        l.abandon();
                        n.closed = true;
                    }
                    (None, _) => {}
                }
            }
            self.stop_deadline = Some(now + STOP_SLACK);
            self.reporters.event(&LaunchEvent::Stopping { reason, grace: Duration::ZERO });
            return;
        }
        let grace = self.cfg.grace;
        self.stop_deadline = Some(now + grace + STOP_SLACK);
        self.reporters.event(&LaunchEvent::Stopping { reason, grace });
        let grace_ms = grace.as_millis() as u64;
        for i in 0..self.nodes.len() {
            if self.nodes[i].live() {
                self.send(i, &ToAgent::Stop { grace_ms });
            }
        }
    }

    fn kill_all(&mut self) {
        if self.kill_deadline.is_some() {
            return;
        }
        self.kill_deadline = Some(Instant::now() + KILL_SLACK);
        for i in 0..self.nodes.len() {
            if self.nodes[i].live() {
                self.send(i, &ToAgent::Kill);
            }
        }
    }

    fn on_signal(&mut self, sig: Sig) {
        let now = Instant::now();
        match (self.interrupted, self.last_signal) {
            (None, _) => {
                self.interrupted = Some(sig);
                self.last_signal = Some(now);
                tracing::warn!("received {}", sig.name());
                let grace = crate::cluster::humane::format(self.cfg.grace);
                self.notice(
                    None,
                    format!(
                        "{} received: stopping every rank (SIGTERM, SIGKILL after {grace}); press Ctrl-C again \
                         within {}s to kill at once",
                        sig.name(),
                        self.cfg.double_signal_window.as_secs()
                    ),
                    true,
                );
                let reason = format!("{} received", sig.name());
                if self.phase == Phase::Stopping {
                    return;
                }
                self.begin_stop(reason);
            }
            (Some(_), Some(last)) if now.duration_since(last) <= self.cfg.double_signal_window => {
                self.notice(None, format!("second {} received: killing every rank now", sig.name()), true);
                self.kill_all();
            }
            (Some(_), _) => {
                self.last_signal = Some(now);
                self.notice(
                    None,
                    format!(
                        "still stopping; a second signal within {}s kills at once",
                        self.cfg.double_signal_window.as_secs()
                    ),
                    true,
                );
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let gap = now.duration_since(self.last_tick);
        self.last_tick = now;
        let paused_after = self.cfg.heartbeat.map_or(Duration::ZERO, |(i, c)| i * c / 2).max(Duration::from_secs(1));
        if gap > paused_after {
            // The launcher itself did not run (suspended, starved): the hosts' and the ranks'
            // silence is not theirs. Give every host and the watchdog a fresh budget.
            tracing::warn!(gap_ms = gap.as_millis() as u64, "the launcher was paused; liveness budgets reset");
            for n in &mut self.nodes {
                n.last_seen = now;
            }
            self.watchdog.reset(now);
            self.paused = Some(self.paused.map_or(gap, |p| p.max(gap)));
        }
        if let Some((interval, count)) = self.cfg.heartbeat {
            if now >= self.next_heartbeat {
                self.next_heartbeat = now + interval;
                for i in 0..self.nodes.len() {
                    if self.nodes[i].live() && self.nodes[i].done_at.is_none() {
                        self.send(i, &ToAgent::Heartbeat);
                    }
                }
            }
            let limit = interval * count;
            for i in 0..self.nodes.len() {
                let n = &self.nodes[i];
                if !(n.live() && n.done_at.is_none() && now.duration_since(n.last_seen) > limit) {
                    continue;
                }
                let silent = now.duration_since(n.last_seen);
                // A probe from before the agent's last sign of life is over.
                match n.probing.filter(|t| n.last_seen <= *t) {
                    // Tell a frozen agent from a lost host before judging (see on_probe).
                    None if n.agent_pid.zip(n.link.as_ref()).is_some_and(|(pid, l)| l.probe(pid)) => {
                        self.nodes[i].probing = Some(now);
                        let name = self.nodes[i].report.info.name.clone();
                        let message = format!(
                            "no heartbeat from the agent on {name} for {:.1}s; looking at the host from outside",
                            silent.as_secs_f64()
                        );
                        self.notice(Some(i), message, true);
                    }
                    Some(t) if now.duration_since(t) < PROBE_LIMIT => {}
                    probing => {
                        let reason = format!(
                            "no sign of life for {:.1}s (keepalive {} × {count}){}: the host or its network is down",
                            silent.as_secs_f64(),
                            crate::cluster::humane::format(interval),
                            if probing.is_some() { ", and a new connection got no answer either" } else { "" }
                        );
                        self.lose(i, reason);
                    }
                }
            }
        }
        if self.phase == Phase::Running {
            self.watch(now);
        }
        for i in 0..self.nodes.len() {
            if let (Some(t), false) = (self.nodes[i].done_at, self.nodes[i].terminal()) {
                if now.duration_since(t) > CLOSE_SLACK {
                    self.nodes[i].closed = true;
                    if let Some(l) = self.nodes[i].link.take() {
                        l.abandon();
                    }
                }
            }
        }
        if self.phase == Phase::Stopping {
            if let Some(d) = self.stop_deadline {
                if now >= d && self.kill_deadline.is_none() {
                    let slow: Vec<String> =
                        self.nodes.iter().filter(|n| n.live()).map(|n| n.report.info.name.clone()).collect();
                    if !slow.is_empty() {
                        self.notice(None, format!("{} did not stop in time: killing", slow.join(", ")), true);
                    }
                    self.kill_all();
                }
            }
            if let Some(d) = self.kill_deadline {
                if now >= d {
                    for i in 0..self.nodes.len() {
                        if !self.nodes[i].terminal() {
                            self.nodes[i].report.unresponsive = true;
                            if let Some(l) = self.nodes[i].link.take() {
                                l.abandon();
                            }
                            let name = self.nodes[i].report.info.name.clone();
                            self.notice(Some(i), format!("{name} did not confirm the stop; giving up on it"), true);
                        }
                    }
                }
            }
        }
        self.reporters.tick();
    }

    /// The stall watchdog's verdict: a notice on the console, or the stop of the job.
    fn watch(&mut self, now: Instant) {
        let secs = |d: Duration| crate::cluster::humane::format(Duration::from_secs(d.as_secs()));
        match self.watchdog.check(now) {
            None => {}
            Some(WatchAction::Notice { quiet, budget, phase, diagnosis }) => {
                let message = format!(
                    "no progress for {} (the {phase} budget is {}); {}",
                    secs(quiet),
                    secs(budget),
                    diagnosis.summary
                );
                self.notice(None, message, true);
            }
            Some(WatchAction::Resumed { after }) => {
                self.notice(None, format!("progress resumed after {}", secs(after)), false)
            }
            Some(WatchAction::Stall { quiet, budget, phase, diagnosis }) => {
                let (node, unit) = diagnosis.culprits.first().and_then(|r| self.unit_of(*r)).unwrap_or((0, None));
                let why = format!(
                    "no progress for {} (the {phase} budget{}): {}",
                    secs(quiet),
                    match self.cfg.hang_timeout {
                        Some(_) => format!(", --hang-timeout, is {}", secs(budget)),
                        None => format!(" is {}; set another with --hang-timeout", secs(budget)),
                    },
                    diagnosis.summary
                );
                self.fail(node, unit, FailureKind::Stalled(why));
            }
        }
    }

    /// The node and unit that run `rank`.
    fn unit_of(&self, rank: usize) -> Option<(usize, Option<usize>)> {
        self.nodes.iter().enumerate().find_map(|(i, n)| {
            n.report
                .info
                .ranks
                .contains(&rank)
                .then(|| (i, n.report.units.iter().position(|u| u.ranks.contains(&rank))))
        })
    }

    /// What a probe of a silent agent found. A stopped agent is continued (the probe sent it
    /// SIGCONT) and the job goes on, once; stopped again, or alive but silent, or gone, it is
    /// the agent's failure; an unreachable host is lost. An agent that spoke again while the
    /// probe ran only gets a notice.
    fn on_probe(&mut self, node: usize, found: crate::exec::backend::Probe) {
        use crate::exec::backend::Probe;
        let now = Instant::now();
        let n = &mut self.nodes[node];
        let Some(started) = n.probing.take() else { return };
        let back = n.last_seen > started;
        let silent = now.duration_since(n.last_seen).as_secs_f64();
        let (pid, name) = (n.agent_pid.unwrap_or(0), n.report.info.name.clone());
        let why = match found {
            Probe::Alive(state @ 'T') if !n.continued => {
                n.continued = true;
                n.last_seen = now;
                let message = format!(
                    "the node agent on {name} (pid {pid}) was stopped (state {state}); it was continued (SIGCONT) and \
                     the job goes on"
                );
                return self.notice(Some(node), message, true);
            }
            // (A stopped agent was continued by the probe itself: its speaking again since is
            // no news.)
            Probe::Alive(state) if back && state != 'T' => {
                return self.notice(Some(node), format!("the node agent on {name} answers again"), false);
            }
            Probe::Gone | Probe::Unreachable(_) if back => {
                return self.notice(Some(node), format!("the node agent on {name} answers again"), false);
            }
            Probe::Alive(state) => format!(
                "no heartbeat for {silent:.1}s while the host itself answers: the agent (pid {pid}) is {} (state \
                 {state}){}",
                mm_spec::flight::proc_state_label(state),
                match state {
                    'T' => " again; it was sent SIGCONT so that it can stop its ranks",
                    't' => "; a debugger holds it: detach it, or its ranks are left to their own watchdog",
                    _ => "",
                }
            ),
            Probe::Gone => format!("no heartbeat for {silent:.1}s, and its process (pid {pid}) is gone from the host"),
            Probe::Unreachable(e) => {
                let keepalive = self.cfg.heartbeat.map_or(String::new(), |(i, c)| {
                    format!(" (keepalive {} × {c})", crate::cluster::humane::format(i))
                });
                let reason = format!(
                    "no sign of life for {silent:.1}s{keepalive}, and a new connection failed ({e}): the host or its \
                     network is down"
                );
                return self.lose(node, reason);
            }
        };
        self.nodes[node].report.agent_error = Some(why.clone());
        self.fail(node, None, FailureKind::AgentDied(why));
    }

    fn lose(&mut self, node: usize, reason: String) {
        self.nodes[node].report.lost = Some(reason.clone());
        if let Some(l) = self.nodes[node].link.take() {
            l.abandon();
        }
        self.reporters.event(&LaunchEvent::HostLost { node, reason: reason.clone() });
        self.fail(node, None, FailureKind::Lost(reason));
    }

    fn outcome(&self) -> Outcome {
        if let Some(signal) = self.interrupted {
            return Outcome::Interrupted { signal, failure: self.first_failure.clone() };
        }
        if let Some(f) = &self.first_failure {
            return Outcome::Failed(f.clone());
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(u) = n.report.units.iter().position(|u| u.status.is_none()) {
                let why = "the node agent ended without reporting every rank's exit".to_string();
                return Outcome::Failed(Failure {
                    node: i,
                    unit: Some(u),
                    kind: FailureKind::AgentDied(why),
                    after: self.t0.elapsed(),
                });
            }
        }
        Outcome::Success
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::cluster::Template;
    use crate::events::Reporters;
    use crate::exec::fake::{FakeBackend, FakeNode, FakeUnit};
    use crate::exec::outcome::{EXIT_LOST, EXIT_NOT_STARTED};
    use crate::exec::proto::Stream;
    use crate::render::{LaunchUnit, NodeLaunch};

    fn hosts(n: usize, per: usize) -> Vec<HostInfo> {
        (0..n)
            .map(|i| HostInfo {
                name: format!("h{i}"),
                address: format!("10.0.0.{i}"),
                ranks: (i * per..(i + 1) * per).collect(),
            })
            .collect()
    }

    fn rendered(hosts: &[HostInfo], port: Option<u16>, per_unit: usize) -> Rendered {
        Rendered {
            template: Template::MmEngine,
            nodes: hosts
                .iter()
                .enumerate()
                .map(|(i, h)| NodeLaunch {
                    node_rank: i,
                    host: h.name.clone(),
                    address: h.address.clone(),
                    units: h
                        .ranks
                        .chunks(per_unit)
                        .map(|r| LaunchUnit {
                            ranks: r.to_vec(),
                            env: [
                                ("MASTER_PORT".to_string(), port.unwrap_or(6000).to_string()),
                                ("HF_TOKEN".to_string(), "tok-secret-1".to_string()),
                            ]
                            .into(),
                            script: "true".into(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    #[derive(Default, Clone)]
    struct Capture(Arc<Mutex<Vec<String>>>);

    impl Reporter for Capture {
        fn event(&mut self, ev: &LaunchEvent<'_>) {
            let s = match ev {
                LaunchEvent::Output { node, rank, data, .. } => {
                    format!("out {node} {rank:?} {}", String::from_utf8_lossy(data))
                }
                LaunchEvent::UnitExited { node, unit, status, stopped } => {
                    format!("exit {node} {unit} {} {stopped}", status.describe())
                }
                LaunchEvent::Launching { master_port, .. } => format!("launching {master_port}"),
                LaunchEvent::HostLost { node, .. } => format!("lost {node}"),
                LaunchEvent::AllStarted { .. } => "all started".into(),
                LaunchEvent::Progress { node, rank, event } => {
                    format!("progress {node} {rank:?} {}", event.iteration())
                }
                _ => return,
            };
            self.0.lock().unwrap().push(s);
        }
    }

    fn cfg(grace_ms: u64) -> DispatchConfig {
        DispatchConfig {
            grace: Duration::from_millis(grace_ms),
            heartbeat: Some((Duration::from_millis(50), 3)),
            double_signal_window: Duration::from_secs(2),
            agent_watchdog: true,
            hang_timeout: None,
            progress: ProgressSource::ProgressLines,
        }
    }

    async fn run(
        backend: &FakeBackend,
        hosts: &[HostInfo],
        cfg: &DispatchConfig,
        need_port: bool,
        per_unit: usize,
        signals: &mut mpsc::UnboundedReceiver<Sig>,
    ) -> (AttemptResult, Vec<String>) {
        let cap = Capture::default();
        let mut reporters = Reporters(vec![Box::new(cap.clone())]);
        let hosts_c = hosts.to_vec();
        let mut render = move |port: Option<u16>| Ok(rendered(&hosts_c, port, per_unit));
        let spec = AttemptSpec {
            attempt: 0,
            max_restarts: 0,
            hosts,
            master_node: 1,
            need_port,
            render: &mut render,
            extra_env: BTreeMap::new(),
        };
        let r = tokio::time::timeout(Duration::from_secs(20), run_attempt(backend, cfg, spec, &mut reporters, signals))
            .await
            .expect("the attempt ends");
        let events = cap.0.lock().unwrap().clone();
        (r, events)
    }

    fn no_signals() -> (mpsc::UnboundedSender<Sig>, mpsc::UnboundedReceiver<Sig>) {
        mpsc::unbounded_channel()
    }

    fn exits(after_ms: u64, code: i32) -> FakeUnit {
        FakeUnit { exit: Some((Duration::from_millis(after_ms), ExitStatus::code(code))), ..Default::default() }
    }

    #[tokio::test(start_paused = true)]
    async fn all_ranks_succeed() {
        let h = hosts(3, 2);
        let node = FakeNode { units: vec![exits(10, 0), exits(20, 0)], ..Default::default() };
        let backend = FakeBackend { nodes: vec![node.clone(), node.clone(), node], ..Default::default() };
        let (_tx, mut rx) = no_signals();
        let (r, events) = run(&backend, &h, &cfg(1000), false, 1, &mut rx).await;
        assert_eq!(r.outcome, Outcome::Success);
        assert_eq!(r.outcome.exit_code(), 0);
        assert!(events.contains(&"all started".to_string()));
        assert!(r.nodes.iter().all(|n| n.units.iter().all(|u| u.status == Some(ExitStatus::code(0)))));
    }

    #[tokio::test(start_paused = true)]
    async fn first_failure_stops_everyone_and_sets_the_exit_code() {
        let h = hosts(3, 2);
        let forever = FakeNode::default();
        let failing = FakeNode {
            units: vec![FakeUnit::default(), FakeUnit { lines: vec!["boom".into()], ..exits(50, 3) }],
            ..Default::default()
        };
        let backend = FakeBackend { nodes: vec![forever.clone(), failing, forever], ..Default::default() };
        let (_tx, mut rx) = no_signals();
        let (r, events) = run(&backend, &h, &cfg(1000), false, 1, &mut rx).await;
        match &r.outcome {
            Outcome::Failed(f) => {
                assert_eq!((f.node, f.unit), (1, Some(1)));
                assert_eq!(f.kind, FailureKind::Exit(ExitStatus::code(3)));
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(r.outcome.exit_code(), 3);
        assert!(events.contains(&"out 1 Some(3) boom\n".to_string()), "{events:?}");
        // Everyone else was stopped, and their exits are marked as stopped.
        assert!(events.contains(&"exit 0 0 signal SIGTERM (15) true".to_string()), "{events:?}");
        let stops = backend.received.lock().unwrap().iter().filter(|(_, m)| matches!(m, ToAgent::Stop { .. })).count();
        assert_eq!(stops, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rank_ignoring_sigterm_is_killed_after_the_grace_period() {
        let h = hosts(2, 1);
        let stubborn =
            FakeNode { units: vec![FakeUnit { ignores_term: true, ..Default::default() }], ..Default::default() };
        let failing = FakeNode { units: vec![exits(20, 1)], ..Default::default() };
        let backend = FakeBackend { nodes: vec![stubborn, failing], ..Default::default() };
        let (_tx, mut rx) = no_signals();
        let t0 = Instant::now();
        let (r, _) = run(&backend, &h, &cfg(300), false, 1, &mut rx).await;
        assert!(t0.elapsed() >= Duration::from_millis(300), "waited for the grace period");
        assert_eq!(r.nodes[0].units[0].status, Some(ExitStatus::signal(9)));
        assert_eq!(r.outcome.exit_code(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_host_is_lost_after_the_keepalive_budget() {
        let h = hosts(3, 1);
        let lost = FakeNode { silent_after: Some(Duration::from_millis(100)), ..Default::default() };
        let backend = FakeBackend { nodes: vec![FakeNode::default(), lost, FakeNode::default()], ..Default::default() };
        let (_tx, mut rx) = no_signals();
        let t0 = Instant::now();
        let (r, events) = run(&backend, &h, &cfg(1000), false, 1, &mut rx).await;
        assert!(t0.elapsed() < Duration::from_secs(3), "noticed within interval × count");
        assert!(events.contains(&"lost 1".to_string()));
        match &r.outcome {
            Outcome::Failed(f) => assert!(matches!(f.kind, FailureKind::Lost(_)) && f.node == 1),
            o => panic!("{o:?}"),
        }
        assert_eq!(r.outcome.exit_code(), EXIT_LOST);
        assert!(r.nodes[0].units[0].stopped && r.nodes[2].units[0].stopped);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_host_starts_nothing_anywhere() {
        let h = hosts(3, 1);
        let bad = FakeNode { connect_error: Some("h1: host key changed".into()), ..Default::default() };
        let backend = FakeBackend { nodes: vec![FakeNode::default(), bad, FakeNode::default()], ..Default::default() };
        let (_tx, mut rx) = no_signals();
        let (r, _) = run(&backend, &h, &cfg(1000), false, 1, &mut rx).await;
        assert_eq!(r.outcome.exit_code(), EXIT_NOT_STARTED);
        assert_eq!(r.nodes[1].connect_error.as_deref(), Some("h1: host key changed"));
        let started = backend.received.lock().unwrap().iter().any(|(_, m)| matches!(m, ToAgent::Start { .. }));
        assert!(!started, "no host may start ranks when one cannot be reached");
    }

    #[tokio::test(start_paused = true)]
    async fn port_zero_is_picked_on_the_master_and_rendered() {
        let h = hosts(3, 1);
        let n = FakeNode { units: vec![exits(10, 0)], ..Default::default() };
        let backend = FakeBackend { nodes: vec![n.clone(), n.clone(), n], ..Default::default() };
        let (_tx, mut rx) = no_signals();
        let (r, events) = run(&backend, &h, &cfg(1000), true, 1, &mut rx).await;
        assert_eq!(r.outcome, Outcome::Success);
        assert_eq!(r.master_port, Some(40001), "picked by node 1, the master");
        assert!(events.contains(&"launching 40001".to_string()));
        let recv = backend.received.lock().unwrap();
        let picks: Vec<usize> = recv.iter().filter(|(_, m)| *m == ToAgent::PickPort).map(|(n, _)| *n).collect();
        assert_eq!(picks, vec![1]);
        for (_, m) in recv.iter() {
            if let ToAgent::Start { units, .. } = m {
                assert_eq!(units[0].env.get("MASTER_PORT").map(String::as_str), Some("40001"));
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn signals_stop_then_a_second_one_kills() {
        let h = hosts(2, 1);
        let stubborn =
            FakeNode { units: vec![FakeUnit { ignores_term: true, ..Default::default() }], ..Default::default() };
        let backend = FakeBackend { nodes: vec![stubborn.clone(), stubborn], ..Default::default() };
        let (tx, mut rx) = no_signals();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let _ = tx.send(Sig::Int);
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = tx.send(Sig::Int);
        });
        let t0 = Instant::now();
        let (r, _) = run(&backend, &h, &cfg(10_000), false, 1, &mut rx).await;
        assert!(t0.elapsed() < Duration::from_secs(5), "the second Ctrl-C did not wait for the 10 s grace");
        assert!(matches!(r.outcome, Outcome::Interrupted { signal: Sig::Int, failure: None }));
        assert_eq!(r.outcome.exit_code(), 130);
        let kills = backend.received.lock().unwrap().iter().filter(|(_, m)| *m == ToAgent::Kill).count();
        assert_eq!(kills, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn multi_rank_units_are_split_by_torchrun_prefixes_and_secrets_scrubbed() {
        let h = hosts(1, 2);
        let n = FakeNode {
            units: vec![FakeUnit {
                lines: vec!["[default1]:b".into(), "[default0]:a tok-secret-1".into(), "banner".into()],
                ..exits(10, 0)
            }],
            ..Default::default()
        };
        let backend = FakeBackend { nodes: vec![n], ..Default::default() };
        let (_tx, mut rx) = no_signals();
        let (r, events) = run(&backend, &h, &cfg(1000), false, 2, &mut rx).await;
        assert_eq!(r.outcome, Outcome::Success);
        let outs: Vec<&String> = events.iter().filter(|e| e.starts_with("out")).collect();
        assert_eq!(outs, ["out 0 Some(1) b\n", "out 0 Some(0) a <redacted>\n", "out 0 None banner\n"]);
        let _ = Stream::Stdout;
    }

    /// Each output run is followed by the progress events parsed from it, in the template's
    /// format and with the run's rank; the other format's lines are plain text.
    #[tokio::test(start_paused = true)]
    async fn progress_follows_its_output_with_the_same_rank_in_the_templates_format() {
        let h = hosts(1, 2);
        let step = |i| mm_spec::ProgressEvent::Step(mm_spec::Progress { iteration: i, ..Default::default() });
        let megatron = |i| {
            format!(
                " [2026-12-01 04:00:00] iteration {i:>8}/      10 | consumed samples: {:>12} | elapsed time per \
                 iteration (ms): 900.0 | learning rate: 1.000000E-05 | global batch size:     8 | loss: 1.0E+00 |",
                8 * i
            )
        };
        let lines = vec![
            format!("[default0]:{}", step(1).to_line()),
            format!("[default1]:{}", megatron(2)),
            "banner".into(),
            megatron(3),
            step(4).to_line(),
        ];
        let n = FakeNode { units: vec![FakeUnit { lines, ..exits(10, 0) }], ..Default::default() };
        let backend = FakeBackend { nodes: vec![n], ..Default::default() };
        // "out NODE RANK" of each output run, and each progress event whole.
        let seen = |events: &[String]| -> Vec<String> {
            let words = |e: &String, n| e.split_whitespace().take(n).collect::<Vec<_>>().join(" ");
            events
                .iter()
                .filter_map(|e| match e.split_whitespace().next() {
                    Some("out") => Some(words(e, 3)),
                    Some("progress") => Some(e.clone()),
                    _ => None,
                })
                .collect()
        };
        let (_tx, mut rx) = no_signals();
        let (_, events) = run(&backend, &h, &cfg(1000), false, 2, &mut rx).await;
        assert_eq!(
            seen(&events),
            ["out 0 Some(0)", "progress 0 Some(0) 1", "out 0 Some(1)", "out 0 None", "progress 0 None 4"]
        );
        let megatron_cfg = DispatchConfig { progress: ProgressSource::MegatronLog, ..cfg(1000) };
        let (_, events) = run(&backend, &h, &megatron_cfg, false, 2, &mut rx).await;
        assert_eq!(
            seen(&events),
            ["out 0 Some(0)", "out 0 Some(1)", "progress 0 Some(1) 2", "out 0 None", "progress 0 None 3"]
        );
    }

    fn rank_report(rank: usize, ticks: u64, in_flight: bool) -> crate::exec::proto::RankReport {
        crate::exec::watchdog::tests::report(rank, 3, ticks, in_flight)
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_names_the_rank_that_did_not_arrive_and_stops_within_the_budget() {
        let h = hosts(2, 2);
        let states = |ranks: Vec<crate::exec::proto::RankReport>| FromAgent::Ranks { ranks, units: vec![] };
        let n0 = FakeNode {
            script: vec![(Duration::from_millis(100), states(vec![rank_report(0, 5, true), rank_report(1, 5, true)]))],
            ..Default::default()
        };
        let n1 = FakeNode {
            script: vec![(Duration::from_millis(100), states(vec![rank_report(2, 5, true), rank_report(3, 4, false)]))],
            ..Default::default()
        };
        let backend = FakeBackend { nodes: vec![n0, n1], ..Default::default() };
        let (_tx, mut rx) = no_signals();
        let mut c = cfg(500);
        c.hang_timeout = Some(Duration::from_secs(3));
        let t0 = Instant::now();
        let (r, _) = run(&backend, &h, &c, false, 1, &mut rx).await;
        let took = t0.elapsed();
        assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(5), "budget + grace: {took:?}");
        match &r.outcome {
            Outcome::Failed(f) => {
                assert_eq!((f.node, f.unit), (1, Some(1)), "rank 3 is unit 1 on node 1");
                let FailureKind::Stalled(why) = &f.kind else { panic!("{f:?}") };
                assert!(why.starts_with("no progress for 3s (the first step budget, --hang-timeout, is 3s): waiting in \
                     all_reduce (step totals) on world #12: ranks 0-2; not arrived: rank 3 on h1 (pid 503; state T stopped"), "{why}");
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(r.outcome.exit_code(), crate::exec::outcome::EXIT_STALLED);
        assert_eq!(r.rank_states.len(), 4, "every rank's last state is kept for the run folder");
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_that_stopped_its_ranks_on_its_own_is_the_root_cause() {
        let h = hosts(2, 1);
        let reason = "no word from the launcher for 15.0s (its heartbeat is every 5.0s); the agent stopped the ranks";
        let n1 = FakeNode {
            script: vec![(Duration::from_millis(200), FromAgent::StoppingRanks { reason: reason.into() })],
            units: vec![exits(250, 143)],
            ..Default::default()
        };
        let backend = FakeBackend { nodes: vec![FakeNode::default(), n1], ..Default::default() };
        let (_tx, mut rx) = no_signals();
        let (r, _) = run(&backend, &h, &cfg(500), false, 1, &mut rx).await;
        match &r.outcome {
            Outcome::Failed(f) => {
                assert_eq!(f.kind, FailureKind::AgentStopped(reason.into()));
                assert_eq!(
                    failure_headline(f, &r.nodes[1]),
                    format!("the node agent on h1 (10.0.0.1) stopped its ranks: {reason}")
                );
            }
            o => panic!("{o:?}"),
        }
    }
}
