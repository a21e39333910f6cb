//! The console: rank output through a filter, launcher news, and progress.
//!
//! By default rank 0's lines are shown, plus every warning or error line of any rank
//! (`--tee all`: every line; `--tee errors`: only warnings and errors; `--ranks 0,8`: these
//! ranks instead of rank 0). Rank lines go to stdout as `[host rN] line`; the launcher's own
//! lines go to stderr. On a terminal, indicatif bars show connecting, starting and training
//! (iteration of train iters, loss, tokens/s, MFU, ETA) from the engine's `@@mm-progress`
//! lines (MindSpeed-MM: Megatron's iteration line, [`ProgressSource`]); otherwise one compact
//! `[launch] iteration …` line per logged iteration. For
//! mm-engine rank 0's Megatron-style iteration lines (about 260 characters each) are
//! folded into that bar or line; they stay in the rank logs and `--tee all` prints them. The
//! progress lines themselves stay in the rank logs and never reach the console.

use std::collections::{BTreeSet, HashMap};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use mm_spec::progress::{ProgressEvent, PROGRESS_PREFIX};

use crate::cluster::Template;
use crate::events::{HostInfo, LaunchEvent, Reporter};
use crate::exec::outcome::{ranks_label, StopSummary, TrainingSummary};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tee {
    /// The selected ranks (rank 0 unless --ranks) plus warnings and errors of every rank.
    Default,
    /// Every line of every rank.
    All,
    /// Only warning and error lines.
    Errors,
}

impl std::str::FromStr for Tee {
    type Err = String;
    fn from_str(s: &str) -> Result<Tee, String> {
        match s {
            "default" => Ok(Tee::Default),
            "all" => Ok(Tee::All),
            "errors" => Ok(Tee::Errors),
            _ => Err(format!("`{s}`: expected default, all or errors")),
        }
    }
}

/// Lines worth showing from any rank.
pub const ALERT_PATTERN: &str = r"(?i)(\bwarn(ing|ings)?\b|error|fatal|critical|exception|traceback|panicked|\bpanic\b|segmentation fault|\bkilled\b)";

struct Bars {
    multi: MultiProgress,
    connect: Option<ProgressBar>,
    start: Option<ProgressBar>,
    train: Option<ProgressBar>,
}

pub struct Console {
    tee: Tee,
    ranks: BTreeSet<usize>,
    hosts: Vec<HostInfo>,
    prefixes: HashMap<usize, String>,
    /// Compiled on first use: the launch's critical path does not wait for it.
    alert: std::sync::OnceLock<regex::bytes::Regex>,
    bars: Option<Bars>,
    out: std::io::BufWriter<std::io::Stdout>,
    connected: usize,
    total_units: usize,
    started: usize,
    last_iteration: Option<u64>,
    first_progress: Option<(Instant, u64)>,
    /// Leave the engine's iteration lines out of the default console (the bar or a compact
    /// line says the same); `--tee all` still shows them.
    fold_iterations: bool,
    unit_ranks: HashMap<(usize, usize), Vec<usize>>,
    training: Option<TrainingSummary>,
    last_checkpoint: Option<String>,
    stopped: Option<StopSummary>,
}

impl Console {
    /// `ranks`: the ranks whose every line is shown (empty: rank 0). `fancy`: draw bars
    /// (callers pass whether stdout is a terminal).
    pub fn new(hosts: Vec<HostInfo>, tee: Tee, ranks: Vec<usize>, fancy: bool) -> Console {
        let ranks: BTreeSet<usize> = if ranks.is_empty() { [0].into() } else { ranks.into_iter().collect() };
        let mut prefixes = HashMap::new();
        for h in &hosts {
            for &r in &h.ranks {
                prefixes.insert(r, format!("[{} r{r}] ", h.name));
            }
        }
        let bars = fancy.then(|| Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            connect: None,
            start: None,
            train: None,
        });
        Console {
            tee,
            ranks,
            hosts,
            prefixes,
            // The pattern is a constant; a failure to compile would be a bug caught by the tests.
            alert: std::sync::OnceLock::new(),
            bars,
            out: std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout()),
            connected: 0,
            total_units: 0,
            started: 0,
            last_iteration: None,
            first_progress: None,
            fold_iterations: false,
            unit_ranks: HashMap::new(),
            training: None,
            last_checkpoint: None,
            stopped: None,
        }
    }

    /// Folds rank 0's iteration lines into the progress bar or compact line: for engines that
    /// send progress lines (mm-engine), whose every field the compact form shows.
    pub fn fold_iterations(mut self, on: bool) -> Console {
        self.fold_iterations = on;
        self
    }

    /// Whether stdout is a terminal (bars) or not (plain lines).
    pub fn stdout_is_terminal() -> bool {
        std::io::stdout().is_terminal()
    }

    /// A launcher line on stderr (above the bars on a terminal).
    pub fn say(&mut self, line: &str) {
        let _ = self.out.flush();
        match &self.bars {
            Some(b) => {
                let _ = b.multi.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    fn host(&self, node: usize) -> &str {
        self.hosts.get(node).map(|h| h.name.as_str()).unwrap_or("?")
    }

    fn bar(&self, len: u64, template: &str) -> Option<ProgressBar> {
        let b = self.bars.as_ref()?;
        let style = ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
        let pb = b.multi.add(ProgressBar::new(len));
        pb.set_style(style);
        pb.enable_steady_tick(Duration::from_millis(120));
        Some(pb)
    }

    /// Selects the lines of `data` to print; returns them prefixed.
    fn select(&self, rank: Option<usize>, prefix: &str, data: &[u8]) -> Vec<u8> {
        let everything =
            self.tee == Tee::All || (self.tee == Tee::Default && rank.is_some_and(|r| self.ranks.contains(&r)));
        // Only rank 0's: its progress lines feed the bar; another rank asked for with --ranks
        // shows its own iteration lines (its own step time and memory).
        let fold = self.fold_iterations && self.tee == Tee::Default && rank == Some(0);
        let mut out = Vec::new();
        let mut push = |line: &[u8]| {
            if memchr::memmem::find(line, PROGRESS_PREFIX.as_bytes()).is_some() || (fold && is_iteration_line(line)) {
                return;
            }
            out.extend_from_slice(prefix.as_bytes());
            out.extend_from_slice(line);
            if line.last() != Some(&b'\n') {
                out.push(b'\n');
            }
        };
        if everything {
            let mut pos = 0;
            while pos < data.len() {
                let end = memchr::memchr(b'\n', &data[pos..]).map_or(data.len(), |i| pos + i + 1);
                push(&data[pos..end]);
                pos = end;
            }
        } else {
            let mut next = 0;
            let alert = self
                .alert
                .get_or_init(|| regex::bytes::Regex::new(ALERT_PATTERN).expect("ALERT_PATTERN is a valid regex"));
            for m in alert.find_iter(data) {
                if m.start() < next {
                    continue;
                }
                let start = memchr::memrchr(b'\n', &data[..m.start()]).map_or(0, |i| i + 1);
                let end = memchr::memchr(b'\n', &data[m.end()..]).map_or(data.len(), |i| m.end() + i + 1);
                push(&data[start..end]);
                next = end;
            }
        }
        out
    }

    /// The engine's end-of-training summary of the current attempt, if it sent one.
    pub fn training(&self) -> Option<&TrainingSummary> {
        self.training.as_ref()
    }

    /// The engine's agreed stop of the current attempt (a signal), if it reported one.
    pub fn stopped(&self) -> Option<&StopSummary> {
        self.stopped.as_ref()
    }

    fn on_progress(&mut self, ev: &ProgressEvent) {
        if let (ProgressEvent::Stopped { iteration, signal, checkpoint }, None) = (ev, &self.stopped) {
            if let Some(c) = checkpoint {
                self.last_checkpoint = Some(c.clone());
            }
            let (iteration, signal, checkpoint) = (*iteration, signal.clone(), checkpoint.clone());
            self.say(&format!(
                "[launch] every rank stopped at iteration {iteration} ({signal}); {}",
                checkpoint
                    .as_deref()
                    .map_or("no checkpoint (no save folder)".to_string(), |c| format!("checkpoint {c}"))
            ));
            self.stopped = Some(StopSummary { iteration, signal, checkpoint });
            return;
        }
        let ProgressEvent::Step(p) = ev else {
            // Kept across restarts on purpose: an earlier attempt's checkpoint is still the
            // job's latest until a later one is written.
            if let ProgressEvent::Checkpoint { path, .. } = ev {
                self.last_checkpoint = Some(path.clone());
            }
            if let ProgressEvent::Done(done) = ev {
                // Every rank may report the end; keep the first.
                if self.training.is_some() {
                    return;
                }
                let (final_loss, tokens_per_sec) = (done.final_loss, done.tokens_per_sec);
                self.training = Some(TrainingSummary {
                    checkpoint: done.checkpoint.clone().or_else(|| self.last_checkpoint.clone()),
                    ..done.clone()
                });
                if let Some(b) = self.bars.as_ref().and_then(|b| b.train.as_ref()) {
                    b.finish_with_message(format!("done: loss {final_loss:.4} · {tokens_per_sec:.0} tok/s"));
                }
            }
            return;
        };
        if self.last_iteration.is_some_and(|i| p.iteration <= i) {
            return;
        }
        self.last_iteration = Some(p.iteration);
        let now = Instant::now();
        let (t0, i0) = *self.first_progress.get_or_insert((now, p.iteration));
        if self.bars.is_some() {
            if self.bars.as_ref().is_some_and(|b| b.train.is_none()) {
                let bar = self.bar(p.train_iters, "{spinner} train [{bar:30}] {pos}/{len} it · {msg} · ETA {eta}");
                if let Some(b) = self.bars.as_mut() {
                    b.train = bar;
                }
            }
            if let Some(bar) = self.bars.as_ref().and_then(|b| b.train.as_ref()) {
                bar.set_length(p.train_iters);
                bar.set_position(p.iteration);
                bar.set_message(compact(p));
            }
            return;
        }
        let done = p.iteration.saturating_sub(i0);
        let eta = if done > 0 {
            let per = now.duration_since(t0).as_secs_f64() / done as f64;
            format!("{:.0}s", per * p.train_iters.saturating_sub(p.iteration) as f64)
        } else {
            "?".into()
        };
        self.say(&format!("[launch] iteration {}/{} · {} · ETA {eta}", p.iteration, p.train_iters, compact(p)));
    }
}

/// How a template's ranks report their iterations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressSource {
    /// mm-engine's `@@mm-progress` lines: iterations, checkpoints, stops, the end.
    ProgressLines,
    /// Megatron's iteration log line (MindSpeed-MM prints it on the last rank): iterations
    /// only ([`mm_spec::megatron_log`]).
    MegatronLog,
}

impl ProgressSource {
    pub fn of(template: Template) -> ProgressSource {
        match template {
            Template::MmEngine => ProgressSource::ProgressLines,
            Template::MindspeedMmTorchrun | Template::MindspeedMmMsrun => ProgressSource::MegatronLog,
        }
    }

    /// Calls `f` with each progress event in `data` (whole lines of rank output).
    pub fn for_each(self, data: &[u8], mut f: impl FnMut(&ProgressEvent)) {
        let needle: &[u8] = match self {
            ProgressSource::ProgressLines => PROGRESS_PREFIX.as_bytes(),
            ProgressSource::MegatronLog => b"iteration ",
        };
        let parse = |line: &str| match self {
            ProgressSource::ProgressLines => ProgressEvent::parse(line)?.ok(),
            ProgressSource::MegatronLog => mm_spec::megatron_log::parse(line).map(ProgressEvent::Step),
        };
        let finder = memchr::memmem::Finder::new(needle);
        let mut from = 0;
        while let Some(i) = finder.find(&data[from..]) {
            let at = from + i;
            let start = memchr::memrchr(b'\n', &data[..at]).map_or(0, |j| j + 1);
            let end = memchr::memchr(b'\n', &data[at..]).map_or(data.len(), |j| at + j);
            if let Some(ev) = parse(&String::from_utf8_lossy(&data[start..end])) {
                f(&ev);
            }
            from = end.min(data.len());
            if from == data.len() {
                break;
            }
        }
    }
}

/// The compact form of a logged iteration: what the bar shows and what a plain console
/// prints instead of the engine's Megatron-style line. Throughput as tokens/s, else (a
/// Megatron line without tokens) samples/s.
pub fn compact(p: &mm_spec::Progress) -> String {
    let mut s = format!("loss {:.4}", p.loss);
    if p.tokens_per_sec.is_finite() {
        s.push_str(&format!(" · {:.0} tok/s", p.tokens_per_sec));
    } else if p.samples_per_sec.is_finite() {
        s.push_str(&format!(" · {:.2} samples/s", p.samples_per_sec));
    }
    if let Some(m) = p.mfu {
        s.push_str(&format!(" · MFU {:.1}%", 100.0 * m));
    }
    s
}

/// Megatron's per-iteration log line (` iteration  N/  M | consumed samples: …`), which
/// mm-engine prints on every rank and MindSpeed-MM on the last.
pub fn is_iteration_line(line: &[u8]) -> bool {
    mm_spec::megatron_log::find(line).is_some()
}

impl Reporter for Console {
    fn event(&mut self, ev: &LaunchEvent<'_>) {
        match ev {
            LaunchEvent::Progress { event, .. } => self.on_progress(event),
            LaunchEvent::Output { node, rank, data, .. } => {
                let prefix = match rank {
                    Some(r) => self.prefixes.get(r).cloned().unwrap_or_else(|| format!("[? r{r}] ")),
                    None => format!("[{} node] ", self.host(*node)),
                };
                let lines = self.select(*rank, &prefix, data);
                if lines.is_empty() {
                    return;
                }
                match &self.bars {
                    Some(b) => {
                        let text = String::from_utf8_lossy(&lines);
                        b.multi.suspend(|| {
                            let mut o = std::io::stdout().lock();
                            let _ = o.write_all(text.as_bytes());
                            let _ = o.flush();
                        });
                    }
                    None => {
                        let _ = self.out.write_all(&lines);
                    }
                }
            }
            LaunchEvent::AttemptStarting { attempt, max_restarts } => {
                self.connected = 0;
                self.started = 0;
                self.last_iteration = None;
                self.first_progress = None;
                self.training = None;
                self.stopped = None;
                if *attempt > 0 {
                    self.say(&format!("[launch] restart {attempt} of {max_restarts}: attempt {attempt} starts"));
                }
                let n = self.hosts.len() as u64;
                let bar = self.bar(n, "{spinner} connecting to hosts {pos}/{len} {elapsed}");
                if let Some(b) = self.bars.as_mut() {
                    b.connect = bar;
                }
            }
            LaunchEvent::Connected { elapsed, .. } => {
                self.connected += 1;
                if let Some(b) = self.bars.as_ref().and_then(|b| b.connect.as_ref()) {
                    b.inc(1);
                }
                if self.connected == self.hosts.len() {
                    if let Some(b) = self.bars.as_mut().and_then(|b| b.connect.take()) {
                        b.finish_and_clear();
                    }
                    self.say(&format!(
                        "[launch] {} host{} ready in {:.2}s",
                        self.connected,
                        if self.connected == 1 { "" } else { "s" },
                        elapsed.as_secs_f64()
                    ));
                }
            }
            LaunchEvent::Launching { rendered, master_port, .. } => {
                self.unit_ranks.clear();
                for (n, rn) in rendered.nodes.iter().enumerate() {
                    for (u, unit) in rn.units.iter().enumerate() {
                        self.unit_ranks.insert((n, u), unit.ranks.clone());
                    }
                }
                self.total_units = rendered.nodes.iter().map(|n| n.units.len()).sum();
                let ranks: usize = rendered.nodes.iter().flat_map(|n| &n.units).map(|u| u.ranks.len()).sum();
                self.say(&format!("[launch] starting {ranks} ranks (MASTER_PORT {master_port})"));
                let bar = self.bar(self.total_units as u64, "{spinner} starting ranks {pos}/{len}");
                if let Some(b) = self.bars.as_mut() {
                    b.start = bar;
                }
            }
            LaunchEvent::UnitStarted { .. } => {
                self.started += 1;
                if let Some(b) = self.bars.as_ref().and_then(|b| b.start.as_ref()) {
                    b.inc(1);
                }
            }
            LaunchEvent::AllStarted { elapsed } => {
                if let Some(b) = self.bars.as_mut().and_then(|b| b.start.take()) {
                    b.finish_and_clear();
                }
                self.say(&format!("[launch] all ranks running ({:.2}s after start)", elapsed.as_secs_f64()));
            }
            LaunchEvent::UnitExited { node, unit, status, stopped } => {
                if !status.success() && !stopped {
                    let who = self.unit_ranks.get(&(*node, *unit)).map(|r| ranks_label(r)).unwrap_or_default();
                    let host = self.host(*node).to_string();
                    self.say(&format!("[launch] {host} {who}: exited with {}", status.describe()));
                }
            }
            LaunchEvent::Notice { node, message, warning } => {
                let host = node.map(|n| format!("{}: ", self.host(n))).unwrap_or_default();
                let level = if *warning { "warning: " } else { "" };
                self.say(&format!("[launch] {level}{host}{message}"));
            }
            LaunchEvent::HostLost { node, reason } => {
                let host = self.host(*node).to_string();
                self.say(&format!("[launch] {host}: LOST: {reason}"));
            }
            LaunchEvent::Stopping { reason, grace } => {
                if grace.is_zero() {
                    self.say(&format!("[launch] aborting: {reason}"));
                } else {
                    self.say(&format!(
                        "[launch] stopping every rank on every host (SIGTERM, SIGKILL after {}): {reason}",
                        crate::cluster::humane::format(*grace)
                    ));
                }
            }
            LaunchEvent::AttemptFinished { .. } => {}
        }
    }

    fn tick(&mut self) {
        let _ = self.out.flush();
    }

    fn flush(&mut self) {
        let _ = self.out.flush();
        if let Some(b) = &mut self.bars {
            for bar in [b.connect.take(), b.start.take(), b.train.take()].into_iter().flatten() {
                bar.finish_and_clear();
            }
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(tee: Tee, ranks: Vec<usize>) -> Console {
        let hosts = vec![
            HostInfo { name: "h1".into(), address: "a".into(), ranks: vec![0, 1] },
            HostInfo { name: "h2".into(), address: "b".into(), ranks: vec![2, 3] },
        ];
        Console::new(hosts, tee, ranks, false)
    }

    #[test]
    fn alert_pattern_compiles() {
        assert!(regex::bytes::Regex::new(ALERT_PATTERN).is_ok());
    }

    #[test]
    fn default_shows_rank_zero_and_alerts_elsewhere() {
        let c = console(Tee::Default, vec![]);
        assert_eq!(c.select(Some(0), "[h1 r0] ", b"a\nb\n"), b"[h1 r0] a\n[h1 r0] b\n");
        let data = b"step 1\nWARNING: slow\nstep 2\nRuntimeError: x\nwarner is not a warning word\n";
        let want = b"[h2 r3] WARNING: slow\n[h2 r3] RuntimeError: x\n[h2 r3] warner is not a warning word\n";
        assert_eq!(c.select(Some(3), "[h2 r3] ", data), want.to_vec());
        assert!(c.select(Some(3), "[p] ", b"warner\n").is_empty());
    }

    #[test]
    fn iteration_lines_fold_by_default_only() {
        let line = b" iteration        3/      40 | consumed samples:          6 | lm loss: 2.5E0\n";
        assert!(is_iteration_line(line) && !is_iteration_line(b"iteration done\n"));
        let data = [b"loaded x\n".as_slice(), line, b"WARNING: slow\n"].concat();
        let folded = console(Tee::Default, vec![]).fold_iterations(true);
        assert_eq!(folded.select(Some(0), "[p] ", &data), b"[p] loaded x\n[p] WARNING: slow\n");
        assert_eq!(console(Tee::Default, vec![]).select(Some(0), "", &data), data);
        assert_eq!(console(Tee::All, vec![]).fold_iterations(true).select(Some(0), "", &data), data);
        let rank_two = console(Tee::Default, vec![0, 2]).fold_iterations(true);
        assert_eq!(rank_two.select(Some(2), "", &data), data);
        let p = mm_spec::Progress { loss: 2.5, tokens_per_sec: 4910.6, mfu: Some(0.0312), ..Default::default() };
        assert_eq!(compact(&p), "loss 2.5000 · 4911 tok/s · MFU 3.1%");
        let p = mm_spec::Progress { loss: 2.5, tokens_per_sec: f64::NAN, samples_per_sec: 6.4, ..Default::default() };
        assert_eq!(compact(&p), "loss 2.5000 · 6.40 samples/s");
    }

    #[test]
    fn each_source_reads_its_own_lines_only() {
        let step = ProgressEvent::Step(mm_spec::Progress { iteration: 7, train_iters: 9, ..Default::default() });
        let megatron = " [2026-12-01 04:00:00] iteration        8/       9 | consumed samples:           64 | \
                        elapsed time per iteration (ms): 500.0 | learning rate: 1.000000E-05 | \
                        global batch size:     8 | loss: 1.500000E+00 | loss scale: 1.0 |";
        let data = format!("x\n{}\n{megatron}\ny", step.to_line());
        let seen = |source: ProgressSource| {
            let mut v = Vec::new();
            source.for_each(data.as_bytes(), |ev| v.push((ev.iteration(), matches!(ev, ProgressEvent::Step(_)))));
            v
        };
        assert_eq!(seen(ProgressSource::ProgressLines), [(7, true)]);
        assert_eq!(seen(ProgressSource::MegatronLog), [(8, true)]);
        assert_eq!(ProgressSource::of(Template::MindspeedMmMsrun), ProgressSource::MegatronLog);
    }

    #[test]
    fn tee_modes_and_rank_selection() {
        let all = console(Tee::All, vec![]);
        assert_eq!(all.select(Some(3), "[p] ", b"x\n"), b"[p] x\n");
        let errors = console(Tee::Errors, vec![]);
        assert!(errors.select(Some(0), "[p] ", b"x\n").is_empty());
        let picked = console(Tee::Default, vec![2]);
        assert!(picked.select(Some(0), "[p] ", b"x\n").is_empty());
        assert_eq!(picked.select(Some(2), "[p] ", b"x"), b"[p] x\n");
        assert_eq!("all".parse::<Tee>(), Ok(Tee::All));
        assert!("loud".parse::<Tee>().is_err());
    }
}
