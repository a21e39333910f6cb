//! Running the checks: the probe travels to every host as one unit of its node agent, through
//! the exec backend the launch itself uses (local, SSH, or the fake in tests), so it sees the
//! environment the ranks will get; each host's facts are evaluated, the launcher's own rows
//! come first, `--skip-check` applies last.
//!
//! ```text
//! per host:  open link ─► Hello ─► Start [probe unit] ─► Output … Exited ─► close ─► Closed
//!            Closed before Exited, another protocol, or no Exited within the timeout after
//!            Hello: the host is unreachable, and the row says why
//! ```
//!
//! The timeout runs from the agent's Hello: reaching a host (connect, host key, upload of the
//! agent) is bounded by the backend itself, and a first upload may take a while.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::evaluate::evaluate;
use super::launcher;
use super::probe::{parse_probe, probe_script, ProbeTarget};
use super::rules::{is_skipped, CheckRow};
use crate::cluster::ClusterSpec;
use crate::exec::backend::{Backend, Link, LinkEvent};
use crate::exec::proto::{ExitStatus, FromAgent, Stream, ToAgent, UnitSpec, PROTOCOL};
use crate::plan::Plan;

/// How long a probe may run on a host once its agent answered.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(120);
/// The agent's SIGTERM → SIGKILL grace for a probe it has to stop.
const PROBE_GRACE: Duration = Duration::from_secs(2);
/// After the last answer, how long the links may take to close before they are dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// What the probe printed on one host, and how it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the probe on every host at once and evaluates it; rows come back grouped by host in
/// node order, then filtered by `skips`. A skip that names no check of this run (an id or a
/// family before `:`) is an error with the nearest id, not silence.
pub fn run_all(
    backend: &dyn Backend,
    plan: &Plan,
    cluster: &ClusterSpec,
    skips: &[String],
    launcher_version: &str,
) -> Result<Vec<CheckRow>, String> {
    let targets: Vec<ProbeTarget> = plan
        .nodes
        .iter()
        .map(|node| ProbeTarget {
            node,
            is_master: node.host.address == plan.master_addr || (node.node_rank == 0 && cluster.local),
        })
        .collect();
    let scripts: Vec<String> = targets.iter().map(|t| probe_script(plan, cluster, t)).collect();
    let outputs = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => {
            let out = rt.block_on(probe_hosts(backend, &scripts, PROBE_TIMEOUT));
            rt.shutdown_timeout(Duration::from_secs(1));
            out
        }
        Err(e) => scripts.iter().map(|_| Err(format!("cannot start the async runtime: {e}"))).collect(),
    };
    let mut rows = launcher::rows(cluster);
    for (target, output) in targets.iter().zip(outputs) {
        let facts = output.map(|o| parse_probe(&o.stdout));
        rows.extend(evaluate(plan, cluster, target, facts.as_ref().map_err(|e| e.as_str()), launcher_version));
    }
    unknown_skips(&rows, skips)?;
    rows.retain(|r| !is_skipped(&r.check, skips));
    Ok(rows)
}

/// The error for `--skip-check` values that name no check: neither a check this run produced
/// (`env:HCCL_CONNECT_TIMEOUT`, `setup:0`) nor an id or family any run can produce
/// ([`CHECK_IDS`](super::rules::CHECK_IDS)); each with the nearest name. Not judged when a
/// host could not be probed.
pub fn unknown_skips(rows: &[CheckRow], skips: &[String]) -> Result<(), String> {
    // A host that could not be probed has no rows: its `setup:N`, `env:NAME` ids are unknown,
    // and the real failure (the host) must not hide behind a refused skip.
    if rows.iter().any(|r| r.check == "reachable" && r.status == super::Status::Fail) {
        return Ok(());
    }
    let mut names: Vec<String> = rows.iter().map(|r| r.check.clone()).collect();
    names.extend(super::rules::CHECK_IDS.iter().map(|s| s.to_string()));
    names.sort();
    names.dedup();
    let known = |s: &str| names.iter().any(|n| n == s || n.split(':').next() == Some(s));
    let unknown: Vec<String> = skips
        .iter()
        .filter(|s| !known(s) && !rows.iter().any(|r| is_skipped(&r.check, std::slice::from_ref(s))))
        .map(|s| format!("`{s}`{}", mm_spec::suggest::hint(s, &names)))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    Err(format!(
        "--skip-check {}: no such check; the checks are: {} (a family before `:` skips all of its checks)",
        unknown.join("; "),
        names.join(", ")
    ))
}

/// Per host (node i runs `scripts[i]`): its probe's output, or why there is none.
pub async fn probe_hosts(
    backend: &dyn Backend,
    scripts: &[String],
    timeout: Duration,
) -> Vec<Result<ProbeOutput, String>> {
    let n = scripts.len();
    let (tx, mut rx) = mpsc::channel(256);
    let links: Vec<Box<dyn Link>> = (0..n).map(|i| backend.open(i, tx.clone())).collect();
    drop(tx);
    let mut hosts: Vec<HostProbe> = (0..n).map(|_| HostProbe::default()).collect();
    let mut close_by: Option<Instant> = None;
    loop {
        if close_by.is_none() && hosts.iter().all(|h| h.result.is_some()) {
            close_by = Some(Instant::now() + CLOSE_WAIT);
        }
        if hosts.iter().all(|h| h.closed) {
            break;
        }
        let wake = hosts
            .iter()
            .filter(|h| h.result.is_none())
            .filter_map(|h| h.deadline)
            .chain(close_by)
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            ev = rx.recv() => match ev {
                Some((i, ev)) if i < n => hosts[i].on_event(ev, links[i].as_ref(), &scripts[i], timeout),
                Some(_) => {}
                None => break,
            },
            _ = tokio::time::sleep_until(wake) => {}
        }
        let now = Instant::now();
        for (h, link) in hosts.iter_mut().zip(&links) {
            if h.result.is_none() && h.deadline.is_some_and(|d| now >= d) {
                h.result = Some(Err(format!("the probe did not finish within {}", humantime(timeout))));
                h.closed = true;
                link.abandon();
            }
        }
        if close_by.is_some_and(|t| now >= t) {
            break;
        }
    }
    for (h, link) in hosts.iter().zip(&links) {
        if !h.closed {
            link.abandon();
        }
    }
    hosts
        .into_iter()
        .map(|h| h.result.unwrap_or_else(|| Err("the connection ended before the probe ran".into())))
        .collect()
}

#[derive(Default)]
struct HostProbe {
    /// Set at Hello: the probe must have finished by then.
    deadline: Option<Instant>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// What the agent wrote on its own stderr (or the remote shell did): context for errors.
    agent_stderr: Vec<String>,
    result: Option<Result<ProbeOutput, String>>,
    closed: bool,
}

impl HostProbe {
    fn on_event(&mut self, ev: LinkEvent, link: &dyn Link, script: &str, timeout: Duration) {
        match ev {
            LinkEvent::Msg(FromAgent::Hello { protocol, version, .. }) => {
                if protocol != PROTOCOL {
                    self.finish(Err(format!(
                        "the agent on this host speaks protocol {protocol} (launch {version}); this launcher \
                         speaks {PROTOCOL}: install the same launch version there"
                    )));
                    link.close();
                    return;
                }
                self.deadline = Some(Instant::now() + timeout);
                let unit = UnitSpec { env: Default::default(), script: script.to_string() };
                link.send(&ToAgent::Start { grace_ms: PROBE_GRACE.as_millis() as u64, units: vec![unit] });
            }
            LinkEvent::Msg(FromAgent::Output { unit: 0, stream, data }) => match stream {
                Stream::Stdout => self.stdout.extend_from_slice(&data),
                Stream::Stderr => self.stderr.extend_from_slice(&data),
            },
            LinkEvent::Msg(FromAgent::SpawnFailed { message, .. }) => {
                self.finish(Err(format!("cannot run bash: {message}")));
                link.close();
            }
            LinkEvent::Msg(FromAgent::Exited { unit: 0, status }) => {
                let output = ProbeOutput {
                    status,
                    stdout: String::from_utf8_lossy(&self.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&self.stderr).into_owned(),
                };
                self.finish(Ok(output));
                // The agent sends Done and exits by itself; EOF makes sure of it.
                link.close();
            }
            // The checks never probe.
            LinkEvent::Msg(_) | LinkEvent::Probe(_) => {}
            // The checks run before the job's console exists: the line goes straight to stderr,
            // as the console would print it. The job's own connection finds the key recorded.
            LinkEvent::Notice(message) => eprintln!("[launch] {message}"),
            LinkEvent::Stderr(line) => {
                if self.agent_stderr.len() < 20 {
                    self.agent_stderr.push(line);
                }
            }
            LinkEvent::Closed { status, error } => {
                self.closed = true;
                let why = match (error, status) {
                    (Some(e), _) => e,
                    (None, Some(s)) => format!("the agent ended ({}) before the probe finished", s.describe()),
                    (None, None) => "the connection ended before the probe finished".into(),
                };
                let why = match self.agent_stderr.last() {
                    Some(line) => format!("{why}: {line}"),
                    None => why,
                };
                self.finish(Err(why));
            }
        }
    }

    /// Keeps the first outcome.
    fn finish(&mut self, result: Result<ProbeOutput, String>) {
        if self.result.is_none() {
            self.result = Some(result);
        }
    }
}

/// "2m", "90s", "1.5s".
fn humantime(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 60.0 && d.as_secs() % 60 == 0 {
        format!("{}m", d.as_secs() / 60)
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::Status;
    use crate::exec::fake::{FakeBackend, FakeNode, FakeUnit};

    fn b64(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in data.chunks(3) {
            let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
            for i in 0..4 {
                out.push(if i <= c.len() { A[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
            }
        }
        out
    }

    /// A fake host whose probe prints these facts and exits 0.
    fn answers(facts: &[(&str, &str)]) -> FakeNode {
        let lines = facts.iter().map(|(k, v)| format!("{k}\t{}", b64(v.as_bytes()))).collect();
        FakeNode {
            units: vec![FakeUnit {
                lines,
                exit: Some((Duration::from_millis(5), ExitStatus::code(0))),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_host_runs_its_script_as_one_unit_and_unreachable_hosts_say_why() {
        let backend = FakeBackend {
            nodes: vec![
                answers(&[("probe", "ok"), ("nproc", "8")]),
                FakeNode { connect_error: Some("h1: cannot connect to 10.0.0.2:22".into()), ..Default::default() },
            ],
            ..Default::default()
        };
        let scripts = vec!["echo zero".to_string(), "echo one".to_string()];
        let out = probe_hosts(&backend, &scripts, PROBE_TIMEOUT).await;
        let ok = out[0].as_ref().unwrap();
        assert_eq!(ok.status, ExitStatus::code(0));
        assert_eq!(parse_probe(&ok.stdout).get("nproc").map(String::as_str), Some("8"));
        assert_eq!(out[1], Err("h1: cannot connect to 10.0.0.2:22".into()));
        let received = backend.received.lock().unwrap().clone();
        let starts: Vec<_> = received
            .iter()
            .filter_map(|(n, m)| match m {
                ToAgent::Start { units, .. } => Some((*n, units.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(starts.len(), 1, "{received:?}");
        assert_eq!(starts[0].0, 0);
        assert_eq!(starts[0].1, vec![UnitSpec { env: Default::default(), script: "echo zero".into() }]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_hangs_times_out_and_its_link_is_dropped() {
        let hang = FakeNode { units: vec![FakeUnit::default()], ..Default::default() };
        let backend = FakeBackend { nodes: vec![answers(&[("probe", "ok")]), hang], ..Default::default() };
        let t0 = Instant::now();
        let out = probe_hosts(&backend, &["a".into(), "b".into()], Duration::from_secs(90)).await;
        assert!(out[0].is_ok());
        assert_eq!(out[1], Err("the probe did not finish within 90s".into()));
        assert!(t0.elapsed() < Duration::from_secs(91), "{:?}", t0.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_that_dies_mid_probe_is_unreachable_with_its_status() {
        let backend = FakeBackend::default();
        let link = backend.open(0, mpsc::channel(8).0);
        let mut h = HostProbe::default();
        h.on_event(LinkEvent::Stderr("launch agent: bad input".into()), link.as_ref(), "x", PROBE_TIMEOUT);
        h.on_event(
            LinkEvent::Closed { status: Some(ExitStatus::code(70)), error: None },
            link.as_ref(),
            "x",
            PROBE_TIMEOUT,
        );
        assert_eq!(
            h.result,
            Some(Err("the agent ended (exit code 70) before the probe finished: launch agent: bad input".into()))
        );
    }

    #[test]
    fn run_all_evaluates_what_the_fake_host_printed() {
        let cluster = ClusterSpec::embedded_local().unwrap();
        let recipe = crate::recipe::Recipe::resolve("tiny", None, None, &[]).unwrap();
        let plan = Plan::build(&cluster, &recipe).unwrap();
        let backend = FakeBackend {
            nodes: vec![answers(&[
                ("probe", "ok"),
                ("nproc", "1"),
                ("engine.rc", "0"),
                ("engine.out", "mm-engine 9.9"),
            ])],
            ..Default::default()
        };
        let rows = run_all(&backend, &plan, &cluster, &["path".into(), "disk".into()], "9.9").unwrap();
        let row = |id: &str| rows.iter().find(|r| r.check == id).unwrap_or_else(|| panic!("{id}: {rows:#?}"));
        assert_eq!(row("reachable").status, Status::Ok);
        assert_eq!(row("engine").status, Status::Ok);
        assert_eq!((row("cpu-cores").status, row("cpu-cores").found.as_str()), (Status::Warn, "1 cores"));
        assert!(rows.iter().all(|r| !r.check.starts_with("path:")));

        let down = FakeBackend {
            nodes: vec![FakeNode { connect_error: Some("cannot start the node agent".into()), ..Default::default() }],
            ..Default::default()
        };
        let rows = run_all(&down, &plan, &cluster, &["env:HCCL_CONNECT_TIMEOUT".into()], "9.9").unwrap();
        assert_eq!(rows.len(), 1, "{rows:#?}");
        assert_eq!(
            (rows[0].check.as_str(), rows[0].status, rows[0].found.as_str(), rows[0].fix.as_str()),
            ("reachable", Status::Fail, "cannot start the node agent", "check that bash is installed")
        );
    }

    #[test]
    fn unknown_skip_ids_are_refused_with_the_nearest() {
        let row = |id: &str| CheckRow {
            host: "h".into(),
            check: id.into(),
            status: super::super::Status::Ok,
            found: String::new(),
            expected: String::new(),
            fix: String::new(),
        };
        let rows = [row("reachable"), row("env:HCCL_CONNECT_TIMEOUT"), row("path:load")];
        // Ids of this run, families, and ids other clusters produce are all fine.
        let fine = ["env", "path:load", "disk", "npu-count", "setup"].map(String::from);
        assert_eq!(unknown_skips(&rows, &fine), Ok(()));
        let e = unknown_skips(&rows, &["env:HCCL_CONECT_TIMEOUT".into(), "bogus".into()]).unwrap_err();
        assert!(
            e.starts_with(
                "--skip-check `env:HCCL_CONECT_TIMEOUT`, did you mean `env:HCCL_CONNECT_TIMEOUT`?; `bogus`: no such \
                 check; the checks are: ascend-env, cpu-cores, disk, engine, env, env:HCCL_CONNECT_TIMEOUT"
            ),
            "{e}"
        );
    }
}
