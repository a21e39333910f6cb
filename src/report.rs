//! The end-of-run report: the root cause first (first failing host and rank, exit code or
//! signal name, the last lines of its log, the log's path), then one status line per host.
//! Pure formatting over the dispatcher's per-host records plus a read of the log tail.

use std::fmt::Write as _;
use std::path::Path;

use crate::exec::outcome::{
    failure_headline, ranks_label, AttemptResult, Failure, FailureKind, NodeReport, Outcome, StopSummary,
    TrainingSummary, UnitReport,
};
use crate::exec::proto::ExitStatus;
use crate::logs::{rank_log_path, tail_lines, tail_matching, unit_log_path};

/// How many log lines the report quotes.
pub const TAIL_LINES: usize = 20;

fn short_status(s: &ExitStatus) -> String {
    match (s.code, s.signal) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(sig)) => crate::exec::proto::signal_name(sig),
        _ => "unknown".into(),
    }
}

fn unit_state(u: &UnitReport) -> String {
    match (&u.status, &u.spawn_error) {
        (_, Some(e)) => format!("could not start ({e})"),
        (None, None) if u.pid.is_none() => "not started".into(),
        (None, None) => "no exit reported".into(),
        (Some(s), None) if s.success() => "exit 0".into(),
        (Some(s), None) if u.stopped => format!("stopped ({})", short_status(s)),
        (Some(s), None) => format!("FAILED ({})", short_status(s)),
    }
}

/// One line: `h2 (10.0.0.2)  ranks 2-3  rank 2 stopped (SIGTERM), rank 3 FAILED (exit 3)`.
pub fn host_status_line(n: &NodeReport) -> String {
    let mut s = format!("{} ({})  {}  ", n.info.name, n.info.address, ranks_label(&n.info.ranks));
    if let Some(e) = &n.connect_error {
        let _ = write!(s, "not reached: {}", e.lines().next().unwrap_or(""));
        return s;
    }
    if !n.connected {
        s.push_str("not contacted (another host failed first)");
        return s;
    }
    if let Some(l) = &n.lost {
        let _ = write!(s, "LOST: {l}; its agent stops its ranks when the launcher's heartbeats stop");
        return s;
    }
    if n.units.is_empty() {
        s.push_str("nothing started");
    } else {
        let states: Vec<String> = n.units.iter().map(unit_state).collect();
        if states.iter().all(|x| *x == states[0]) {
            s.push_str(&states[0]);
        } else {
            let parts: Vec<String> =
                n.units.iter().zip(&states).map(|(u, st)| format!("{} {st}", ranks_label(&u.ranks))).collect();
            s.push_str(&parts.join(", "));
        }
    }
    if let Some(e) = &n.agent_error {
        let _ = write!(s, "; agent: {e}");
    }
    if n.unresponsive {
        s.push_str("; did not confirm the stop");
    }
    s
}

/// The log that shows the failure and the lines to quote from it.
struct LogQuote {
    path: String,
    /// Blank lines at either end already dropped: a block of empty lines says nothing.
    lines: Vec<String>,
    /// The log is the failing unit's own (empty means it printed nothing), not the launch log
    /// filtered to one host (where no lines only means that host's ranks said nothing there).
    own: bool,
}

/// Drops blank lines at both ends.
fn trim_blank(mut lines: Vec<String>) -> Vec<String> {
    while lines.last().is_some_and(|l| l.trim().is_empty()) {
        lines.pop();
    }
    let first = lines.iter().position(|l| !l.trim().is_empty()).unwrap_or(lines.len());
    lines.drain(..first);
    lines
}

/// The global rank of torchrun's "Root Cause (first observed failure)" block in `node_log`
/// (`  rank      : 3 (local_rank: 3)`), the last one if it printed several.
fn root_cause_rank(node_log: &Path) -> Option<usize> {
    let lines = tail_lines(node_log, 400).ok()?;
    let at = lines.iter().rposition(|l| l.contains("Root Cause (first observed failure):"))?;
    let line = lines[at..].iter().find(|l| l.trim_start().starts_with("rank "))?;
    let digits: String = line.split_once(':')?.1.trim_start().chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn failure_log(f: &Failure, node: &NodeReport, attempt_dir: &Path, launch_log: &Path) -> Option<LogQuote> {
    let unit = f.unit.and_then(|u| node.units.get(u));
    match (&f.kind, unit) {
        (FailureKind::Exit(_) | FailureKind::SpawnFailed(_) | FailureKind::Stalled(_), Some(u)) => {
            let path = if u.ranks.len() == 1 {
                rank_log_path(attempt_dir, &node.info.name, u.ranks[0])
            } else {
                // torchrun/msrun: the failing worker's own file (torchrun names the root
                // cause's rank), else the node's (msrun's untagged lines, torchrun's own).
                let node_log = unit_log_path(attempt_dir, &node.info.name);
                let root = root_cause_rank(&node_log).filter(|r| u.ranks.contains(r));
                match root.map(|r| rank_log_path(attempt_dir, &node.info.name, r)) {
                    Some(p) if std::fs::metadata(&p).is_ok_and(|m| m.len() > 0) => p,
                    _ if node_log.exists() => node_log,
                    _ => rank_log_path(attempt_dir, &node.info.name, u.ranks[0]),
                }
            };
            let lines = trim_blank(tail_lines(&path, TAIL_LINES).unwrap_or_default());
            Some(LogQuote { path: path.display().to_string(), lines, own: true })
        }
        (FailureKind::Lost(_) | FailureKind::AgentDied(_) | FailureKind::AgentStopped(_), _) => {
            let prefix = format!("[{} ", node.info.name);
            // That host's lines with some text after their `[host rN] ` prefix.
            let has_text = |l: &str| {
                l.strip_prefix(&prefix)
                    .and_then(|r| r.split_once("] "))
                    .is_some_and(|(_, text)| !text.trim().is_empty())
            };
            let lines = tail_matching(launch_log, TAIL_LINES, has_text).unwrap_or_default();
            let mut all = trim_blank(lines);
            let stderr = trim_blank(node.agent_stderr.clone());
            if !stderr.is_empty() {
                all.push("(agent stderr:)".into());
                all.extend(stderr);
            }
            Some(LogQuote { path: launch_log.display().to_string(), lines: all, own: false })
        }
        _ => None,
    }
}

/// The full report for the end of an attempt; `training`: the engine's summary, if it sent one.
pub fn render(
    result: &AttemptResult,
    training: Option<&TrainingSummary>,
    stopped: Option<&StopSummary>,
    attempt_dir: &Path,
    launch_log: &Path,
    run_root: &Path,
) -> String {
    let mut o = String::new();
    let total_ranks: usize = result.nodes.iter().map(|n| n.info.ranks.len()).sum();
    let failure = match &result.outcome {
        Outcome::Success => {
            let hosts = result.nodes.len();
            let _ = writeln!(
                o,
                "launch: all {total_ranks} ranks on {hosts} host{} finished (exit 0) in {:.1}s",
                if hosts == 1 { "" } else { "s" },
                result.elapsed.as_secs_f64(),
            );
            match training {
                Some(t) if t.steps == Some(0) => {
                    let _ = writeln!(o, "  nothing to train: the checkpoint is already at iteration {}", t.iteration);
                    let _ = writeln!(o, "  loss         {:.6} (saved with it)", t.final_loss);
                    if let Some(c) = &t.checkpoint {
                        let _ = writeln!(o, "  checkpoint   {c} (loaded, unchanged)");
                    }
                }
                Some(t) => {
                    let _ = writeln!(o, "  final loss   {:.6} (iteration {})", t.final_loss, t.iteration);
                    if t.tokens_per_sec > 0.0 {
                        let _ = writeln!(o, "  throughput   {:.1} tokens/s", t.tokens_per_sec);
                    }
                    let ckpt = t.checkpoint.as_deref().unwrap_or("none written (no save folder)");
                    let _ = writeln!(o, "  checkpoint   {ckpt}");
                }
                None => {}
            }
            let _ = writeln!(o, "  logs         {}", run_root.display());
            return o;
        }
        Outcome::Failed(f) => Some(f),
        Outcome::Interrupted { signal, failure } => {
            match stopped {
                Some(s) => {
                    let _ = writeln!(
                        o,
                        "launch: interrupted by {}: every rank stopped at iteration {}{}",
                        signal.name(),
                        s.iteration,
                        match &s.checkpoint {
                            Some(c) => format!("; checkpoint {c} (launching again resumes from it)"),
                            None => "; nothing saved (no save folder)".into(),
                        }
                    );
                }
                None => {
                    let _ = writeln!(o, "launch: interrupted by {}: stopped every rank on every host", signal.name());
                }
            }
            failure.as_ref()
        }
    };
    if let Some(f) = failure {
        if let Some(node) = result.nodes.get(f.node) {
            let _ = writeln!(
                o,
                "launch: FAILED: {} ({:.1}s after the start; first failure)",
                failure_headline(f, node),
                f.after.as_secs_f64()
            );
            if let Some(d) =
                result.diagnosis.as_ref().filter(|d| d.desync && !matches!(f.kind, FailureKind::Stalled(_)))
            {
                let _ = writeln!(o, "  collectives: {}", d.summary);
            }
            if let Some(q) = failure_log(f, node, attempt_dir, launch_log) {
                // No lines, no block: an empty "last N lines:" says nothing.
                if q.lines.is_empty() && q.own {
                    let _ = writeln!(o, "  (its log is empty)");
                } else if !q.lines.is_empty() {
                    match q.lines.len() {
                        1 => o.push_str("  last line:\n"),
                        n => {
                            let _ = writeln!(o, "  last {n} lines:");
                        }
                    }
                    for l in &q.lines {
                        let _ = writeln!(o, "  | {l}");
                    }
                }
                let _ = writeln!(o, "  log: {}", q.path);
            }
        }
    }
    if let (Some(s), Outcome::Failed(_)) = (stopped, &result.outcome) {
        let _ = writeln!(
            o,
            "  on the way out every rank stopped at iteration {}: {}",
            s.iteration,
            s.checkpoint.as_deref().map_or("nothing saved (no save folder)".into(), |c| format!("checkpoint {c}"))
        );
    }
    let _ = writeln!(o, "hosts:");
    for n in &result.nodes {
        let _ = writeln!(o, "  {}", host_status_line(n));
    }
    let _ = writeln!(o, "all logs: {}", run_root.display());
    o
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::events::HostInfo;

    fn node(name: &str, ranks: Vec<usize>, units: Vec<UnitReport>) -> NodeReport {
        NodeReport {
            info: HostInfo { name: name.into(), address: format!("10.0.0.{}", ranks[0]), ranks },
            connected: true,
            connect_error: None,
            lost: None,
            agent_error: None,
            unresponsive: false,
            units,
            agent_stderr: Vec::new(),
        }
    }

    fn unit(rank: usize, status: ExitStatus, stopped: bool) -> UnitReport {
        UnitReport { ranks: vec![rank], pid: Some(100 + rank as u32), status: Some(status), stopped, spawn_error: None }
    }

    #[test]
    fn report_names_the_first_failure_and_quotes_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = rank_log_path(dir.path(), "h2", 3);
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        let body: String = (0..30).map(|i| format!("step {i}\n")).collect();
        std::fs::write(&log, body + "Traceback: boom\n").unwrap();
        let nodes = vec![
            node("h1", vec![0, 1], vec![unit(0, ExitStatus::signal(15), true), unit(1, ExitStatus::signal(15), true)]),
            node("h2", vec![2, 3], vec![unit(2, ExitStatus::signal(15), true), unit(3, ExitStatus::code(3), false)]),
        ];
        let f = Failure {
            node: 1,
            unit: Some(1),
            kind: FailureKind::Exit(ExitStatus::code(3)),
            after: Duration::from_secs(2),
        };
        let result = AttemptResult {
            outcome: Outcome::Failed(f),
            nodes,
            master_port: None,
            elapsed: Duration::from_secs(3),
            rank_states: Vec::new(),
            diagnosis: None,
        };
        let text = render(&result, None, None, dir.path(), &dir.path().join("launch.log"), dir.path());
        assert!(text.contains("FAILED: rank 3 on h2 (10.0.0.2) exited with exit code 3"), "{text}");
        assert!(
            text.contains("| Traceback: boom") && text.contains("| step 11") && !text.contains("| step 10\n"),
            "{text}"
        );
        assert!(text.contains(&format!("log: {}", log.display())));
        assert!(text.contains("h1 (10.0.0.0)  ranks 0-1  stopped (SIGTERM)"), "{text}");
        assert!(text.contains("rank 2 stopped (SIGTERM), rank 3 FAILED (exit 3)"), "{text}");
    }

    /// A torchrun unit (ranks 4-7): its report quotes the log of the rank torchrun names as
    /// the root cause, else the node's log.
    #[test]
    fn a_torchrun_failure_quotes_the_root_cause_ranks_log() {
        let dir = tempfile::tempdir().unwrap();
        let node_log = unit_log_path(dir.path(), "h1");
        std::fs::create_dir_all(node_log.parent().unwrap()).unwrap();
        std::fs::write(
            &node_log,
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n\
             ============================================================\n\
             Root Cause (first observed failure):\n[0]:\n  time      : 2026-12-01_05:00:00\n  \
             host      : h1\n  rank      : 6 (local_rank: 2)\n  exitcode  : 1 (pid: 4242)\n",
        )
        .unwrap();
        std::fs::write(rank_log_path(dir.path(), "h1", 6), "step 1\nValueError: rank six broke\n").unwrap();
        let torchrun = UnitReport {
            ranks: vec![4, 5, 6, 7],
            pid: Some(7),
            status: Some(ExitStatus::code(1)),
            stopped: false,
            spawn_error: None,
        };
        let f = Failure { node: 0, unit: Some(0), kind: FailureKind::Exit(ExitStatus::code(1)), after: Duration::ZERO };
        let quote = |f: &Failure| {
            let n = node("h1", vec![4, 5, 6, 7], vec![torchrun.clone()]);
            failure_log(f, &n, dir.path(), &dir.path().join("launch.log")).unwrap()
        };
        let q = quote(&f);
        assert_eq!(q.path, rank_log_path(dir.path(), "h1", 6).display().to_string());
        assert_eq!(q.lines.last().map(String::as_str), Some("ValueError: rank six broke"));
        // Without the worker's lines (msrun, or nothing printed): the node's log.
        std::fs::remove_file(rank_log_path(dir.path(), "h1", 6)).unwrap();
        assert_eq!(quote(&f).path, node_log.display().to_string());
    }

    #[test]
    fn empty_log_tails_print_no_block() {
        let dir = tempfile::tempdir().unwrap();
        let launch_log = dir.path().join("launch.log");
        // The launch log holds lines of other hosts only, and blank ones of h3.
        std::fs::write(
            &launch_log,
            "[launch] starting
[h1 r0] step 1
[h3 r4] 
[h3 r4]    
",
        )
        .unwrap();
        let mut dropped = node("h3", vec![4], vec![unit(4, ExitStatus::signal(15), true)]);
        dropped.agent_error = Some("the SSH connection to h3 dropped (sshd gone or host rebooted)".into());
        dropped.agent_stderr = vec![String::new()];
        let f = Failure {
            node: 0,
            unit: None,
            kind: FailureKind::AgentDied(dropped.agent_error.clone().unwrap()),
            after: Duration::from_secs(1),
        };
        let result = AttemptResult {
            outcome: Outcome::Failed(f),
            nodes: vec![dropped],
            master_port: None,
            elapsed: Duration::from_secs(2),
            rank_states: Vec::new(),
            diagnosis: None,
        };
        let text = render(&result, None, None, dir.path(), &launch_log, dir.path());
        assert!(
            text.starts_with(
                "launch: FAILED: the SSH connection to h3 dropped (sshd gone or host rebooted) (1.0s after the \
                 start; first failure)\n"
            ),
            "{text}"
        );
        assert!(!text.contains("lines:") && !text.contains("| ") && !text.contains("log is empty"), "{text}");
        assert!(text.contains(&format!("  log: {}\n", launch_log.display())), "{text}");

        // A rank log of blank lines only: said to be empty, no block; real lines lose blank ends.
        let log = rank_log_path(dir.path(), "h1", 0);
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        std::fs::write(&log, "\n\n  \n").unwrap();
        let exit = |nodes| AttemptResult {
            outcome: Outcome::Failed(Failure {
                node: 0,
                unit: Some(0),
                kind: FailureKind::Exit(ExitStatus::code(1)),
                after: Duration::ZERO,
            }),
            nodes,
            master_port: None,
            elapsed: Duration::ZERO,
            rank_states: Vec::new(),
            diagnosis: None,
        };
        let h1 = || vec![node("h1", vec![0], vec![unit(0, ExitStatus::code(1), false)])];
        let text = render(&exit(h1()), None, None, dir.path(), &launch_log, dir.path());
        assert!(text.contains("  (its log is empty)\n") && !text.contains("lines:"), "{text}");
        std::fs::write(&log, "\nboom\n\n").unwrap();
        let text = render(&exit(h1()), None, None, dir.path(), &launch_log, dir.path());
        assert!(text.contains("  last line:\n  | boom\n  log: "), "{text}");
    }

    #[test]
    fn lost_and_unreached_hosts_say_so() {
        let mut lost = node("h3", vec![4], vec![unit(4, ExitStatus::code(0), false)]);
        lost.lost = Some("no sign of life for 3.0s".into());
        assert!(host_status_line(&lost).contains("LOST: no sign of life for 3.0s"));
        let mut unreached = node("h4", vec![5], vec![]);
        unreached.connected = false;
        unreached.connect_error = Some("h4: HOST KEY CHANGED\nmore".into());
        assert_eq!(host_status_line(&unreached), "h4 (10.0.0.5)  rank 5  not reached: h4: HOST KEY CHANGED");
        let f = Failure { node: 0, unit: None, kind: FailureKind::Lost("gone".into()), after: Duration::ZERO };
        assert_eq!(failure_headline(&f, &lost), "host h3 (10.0.0.4) was lost: gone");
        let s =
            Failure { node: 0, unit: Some(0), kind: FailureKind::Exit(ExitStatus::signal(11)), after: Duration::ZERO };
        assert_eq!(failure_headline(&s, &lost), "rank 4 on h3 (10.0.0.4) was killed by signal SIGSEGV (11)");
    }

    #[test]
    fn success_summary_names_loss_throughput_checkpoint_and_logs() {
        let nodes = vec![node("h1", vec![0, 1], vec![unit(0, ExitStatus::code(0), false)])];
        let result = AttemptResult {
            outcome: Outcome::Success,
            nodes,
            master_port: None,
            elapsed: Duration::from_millis(7900),
            rank_states: Vec::new(),
            diagnosis: None,
        };
        let t = TrainingSummary {
            iteration: 40,
            final_loss: 3.757832407951355,
            tokens_per_sec: 4910.97,
            checkpoint: Some("runs/tiny/save/iter_0000040".into()),
            steps: Some(40),
        };
        let root = Path::new("logs/run-1");
        let text = render(&result, Some(&t), None, root, &root.join("launch.log"), root);
        assert_eq!(
            text,
            "launch: all 2 ranks on 1 host finished (exit 0) in 7.9s\n  final loss   3.757832 (iteration 40)\n  \
             throughput   4911.0 tokens/s\n  checkpoint   runs/tiny/save/iter_0000040\n  logs         logs/run-1\n"
        );
        let noop = TrainingSummary { tokens_per_sec: 0.0, steps: Some(0), ..t.clone() };
        let text = render(&result, Some(&noop), None, root, &root.join("launch.log"), root);
        assert!(text.contains("  nothing to train: the checkpoint is already at iteration 40\n"), "{text}");
        assert!(text.contains("  checkpoint   runs/tiny/save/iter_0000040 (loaded, unchanged)\n"), "{text}");
        assert!(!text.contains("final loss"), "{text}");
        // A NaN loss still round-trips through status.json.
        let nan = TrainingSummary { final_loss: f64::NAN, ..t.clone() };
        let back: TrainingSummary = serde_json::from_str(&serde_json::to_string(&nan).unwrap()).unwrap();
        assert!(back.final_loss.is_nan());
        let bare = render(&result, None, None, root, &root.join("launch.log"), root);
        assert_eq!(bare, "launch: all 2 ranks on 1 host finished (exit 0) in 7.9s\n  logs         logs/run-1\n");
    }

    #[test]
    fn an_agreed_stop_names_its_iteration_and_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = vec![node("h1", vec![0], vec![unit(0, ExitStatus::code(143), true)])];
        let result = AttemptResult {
            outcome: Outcome::Interrupted { signal: crate::exec::outcome::Sig::Term, failure: None },
            nodes,
            master_port: None,
            elapsed: Duration::from_secs(9),
            rank_states: Vec::new(),
            diagnosis: None,
        };
        let stop =
            StopSummary { iteration: 12, signal: "SIGTERM".into(), checkpoint: Some("save/iter_0000012".into()) };
        let text = render(&result, None, Some(&stop), dir.path(), &dir.path().join("launch.log"), dir.path());
        assert!(
            text.starts_with(
                "launch: interrupted by SIGTERM: every rank stopped at iteration 12; checkpoint save/iter_0000012 \
                 (launching again resumes from it)\n"
            ),
            "{text}"
        );
        let bare = render(&result, None, None, dir.path(), &dir.path().join("launch.log"), dir.path());
        assert!(bare.starts_with("launch: interrupted by SIGTERM: stopped every rank on every host\n"), "{bare}");
    }
}
