//! The run directory and everything written into it; `launch logs`.
//!
//! ```text
//! <log_dir>/<run-id>/plan.json            redacted plan + rendered launch (dryrun::to_json)
//! <log_dir>/<run-id>/launch.log           every line of every rank, `[host rN] ` prefixed, all attempts,
//!                                         plus `[launch] ` lines for starts, exits, stops
//! <log_dir>/<run-id>/launcher.log         the launcher's own tracing log
//! <log_dir>/<run-id>/status.json          {"state": "running"|"finished", "pid", "exit_code", ...}
//! <log_dir>/<run-id>/<host>/rank-N.log    one rank's complete output (no prefix)
//! <log_dir>/<run-id>/<host>/node.log      a torchrun/msrun unit's lines without a rank prefix
//! <log_dir>/<run-id>/attempt-K/<host>/…   the same per attempt, when --max-restarts > 0
//! <log_dir>/latest -> <run-id>
//! ```
//!
//! The sink writes chunks of whole lines (the agent never sends a partial one), so files are
//! never cut mid-line; buffers are flushed on every dispatcher tick and at the end of each
//! attempt, and on drop.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::events::{HostInfo, LaunchEvent, Reporter};
use crate::plan::Plan;
use crate::render::Rendered;

/// A created run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub log_dir: PathBuf,
    pub id: String,
    pub root: PathBuf,
    /// Per-attempt folders (attempt-K) instead of per-rank files at the top.
    pub attempts: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunStatus {
    pub run_id: String,
    /// "running" or "finished".
    pub state: String,
    pub pid: u32,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub outcome: Option<String>,
    /// The machine the launcher runs on, and its process's start time there (with `pid`, what
    /// `launch stop` checks before it signals anything).
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// The engine's end-of-training summary (final loss, tokens/s, checkpoint), when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<crate::exec::outcome::TrainingSummary>,
}

/// Safe as one path component: letters, digits, `.`, `-`, `_`; anything else becomes `_`.
pub fn host_dir_name(host: &str) -> String {
    let s: String =
        host.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    match s.as_str() {
        "" | "." | ".." => format!("host{s}"),
        _ => s,
    }
}

pub fn rank_log_path(attempt_dir: &Path, host: &str, rank: usize) -> PathBuf {
    attempt_dir.join(host_dir_name(host)).join(format!("rank-{rank}.log"))
}

pub fn unit_log_path(attempt_dir: &Path, host: &str) -> PathBuf {
    attempt_dir.join(host_dir_name(host)).join("node.log")
}

/// `YYYYMMDD-HHMMSS` in UTC.
pub fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

impl RunDir {
    /// Creates `<log_dir>/<stamp>-<label>` (with -2, -3, … when taken) and points `latest` at it.
    pub fn create(log_dir: &Path, label: &str, attempts: bool) -> std::io::Result<RunDir> {
        std::fs::create_dir_all(log_dir)?;
        let base = format!("{}-{}", utc_stamp(SystemTime::now()), host_dir_name(label));
        let mut n = 1;
        let (id, root) = loop {
            let id = if n == 1 { base.clone() } else { format!("{base}-{n}") };
            let root = log_dir.join(&id);
            match std::fs::create_dir(&root) {
                Ok(()) => break (id, root),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e),
            }
        };
        let tmp = log_dir.join(format!(".latest.tmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&id, &tmp)?;
        std::fs::rename(&tmp, log_dir.join("latest"))?;
        Ok(RunDir { log_dir: log_dir.to_path_buf(), id, root, attempts })
    }

    pub fn attempt_dir(&self, attempt: u32) -> PathBuf {
        if self.attempts {
            self.root.join(format!("attempt-{attempt}"))
        } else {
            self.root.clone()
        }
    }

    pub fn launch_log(&self) -> PathBuf {
        self.root.join("launch.log")
    }

    pub fn launcher_log(&self) -> PathBuf {
        self.root.join("launcher.log")
    }

    pub fn write_status(&self, status: &RunStatus) -> std::io::Result<()> {
        let tmp = self.root.join(".status.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(status).unwrap_or_default())?;
        std::fs::rename(tmp, self.root.join("status.json"))
    }

    /// plan.json: the plan and launch with every secret redacted (replaced atomically).
    pub fn write_plan(&self, plan: &Plan, rendered: &Rendered) -> std::io::Result<()> {
        let tmp = self.plan_tmp(plan, rendered)?;
        std::fs::rename(&tmp, self.root.join("plan.json"))
    }

    /// plan.json unless one is there already (the attempt's, with the picked port, wins).
    pub fn write_plan_if_absent(&self, plan: &Plan, rendered: &Rendered) -> std::io::Result<()> {
        let tmp = self.plan_tmp(plan, rendered)?;
        let linked = std::fs::hard_link(&tmp, self.root.join("plan.json"));
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            other => other,
        }
    }

    fn plan_tmp(&self, plan: &Plan, rendered: &Rendered) -> std::io::Result<PathBuf> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.root.join(format!(".plan.json.tmp-{n}"));
        std::fs::write(&tmp, crate::dryrun::to_json(plan, rendered))?;
        Ok(tmp)
    }
}

/// The reporter that writes the run directory.
pub struct LogSink {
    run: RunDir,
    plan: Plan,
    hosts: Vec<HostInfo>,
    attempt_dir: PathBuf,
    launch_log: Option<BufWriter<File>>,
    ranks: HashMap<usize, BufWriter<File>>,
    units: HashMap<usize, BufWriter<File>>,
    rank_prefix: HashMap<usize, Vec<u8>>,
    unit_ranks: HashMap<(usize, usize), Vec<usize>>,
    errors: Vec<String>,
}

impl LogSink {
    pub fn new(run: RunDir, plan: Plan, hosts: Vec<HostInfo>) -> std::io::Result<LogSink> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(run.launch_log())?;
        let mut rank_prefix = HashMap::new();
        for h in &hosts {
            for &r in &h.ranks {
                rank_prefix.insert(r, format!("[{} r{r}] ", h.name).into_bytes());
            }
        }
        Ok(LogSink {
            attempt_dir: run.attempt_dir(0),
            run,
            plan,
            hosts,
            launch_log: Some(BufWriter::with_capacity(1 << 20, f)),
            ranks: HashMap::new(),
            units: HashMap::new(),
            rank_prefix,
            unit_ranks: HashMap::new(),
            errors: Vec::new(),
        })
    }

    /// Problems writing logs (a full disk), for the final report.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    fn launch_line(&mut self, text: &str) {
        if let Some(w) = &mut self.launch_log {
            for line in text.lines() {
                let r = w
                    .write_all(b"[launch] ")
                    .and_then(|_| w.write_all(line.as_bytes()))
                    .and_then(|_| w.write_all(b"\n"));
                if let Err(e) = r {
                    self.errors.push(format!("writing {}: {e}", self.run.launch_log().display()));
                }
            }
        }
    }

    fn host(&self, node: usize) -> &str {
        self.hosts.get(node).map(|h| h.name.as_str()).unwrap_or("?")
    }

    fn open_attempt(&mut self, rendered: &Rendered) {
        self.flush_all();
        self.ranks.clear();
        self.units.clear();
        for (node, rn) in rendered.nodes.iter().enumerate() {
            let dir = self.attempt_dir.join(host_dir_name(&rn.host));
            if let Err(e) = std::fs::create_dir_all(&dir) {
                self.errors.push(format!("creating {}: {e}", dir.display()));
                continue;
            }
            for (ui, u) in rn.units.iter().enumerate() {
                self.unit_ranks.insert((node, ui), u.ranks.clone());
                for &r in &u.ranks {
                    let p = rank_log_path(&self.attempt_dir, &rn.host, r);
                    match File::create(&p) {
                        Ok(f) => {
                            self.ranks.insert(r, BufWriter::with_capacity(256 * 1024, f));
                        }
                        Err(e) => self.errors.push(format!("creating {}: {e}", p.display())),
                    }
                }
                if u.ranks.len() > 1 && !self.units.contains_key(&node) {
                    let p = unit_log_path(&self.attempt_dir, &rn.host);
                    match File::create(&p) {
                        Ok(f) => {
                            self.units.insert(node, BufWriter::new(f));
                        }
                        Err(e) => self.errors.push(format!("creating {}: {e}", p.display())),
                    }
                }
            }
        }
    }

    fn flush_all(&mut self) {
        let mut errs = Vec::new();
        for w in self.ranks.values_mut().chain(self.units.values_mut()).chain(self.launch_log.iter_mut()) {
            if let Err(e) = w.flush() {
                errs.push(format!("flushing logs: {e}"));
            }
        }
        self.errors.extend(errs);
    }
}

/// Writes each line of `data` after `prefix`.
fn write_prefixed(w: &mut impl Write, prefix: &[u8], data: &[u8]) -> std::io::Result<()> {
    let mut pos = 0;
    while pos < data.len() {
        let end = memchr::memchr(b'\n', &data[pos..]).map_or(data.len(), |i| pos + i + 1);
        w.write_all(prefix)?;
        w.write_all(&data[pos..end])?;
        pos = end;
    }
    if data.last().is_some_and(|b| *b != b'\n') {
        w.write_all(b"\n")?;
    }
    Ok(())
}

impl Reporter for LogSink {
    fn event(&mut self, ev: &LaunchEvent<'_>) {
        match ev {
            LaunchEvent::Output { node, rank, data, .. } => {
                let res = match rank {
                    Some(r) => {
                        let a = self.ranks.get_mut(r).map(|w| w.write_all(data)).unwrap_or(Ok(()));
                        let prefix = self.rank_prefix.get(r).map(Vec::as_slice).unwrap_or(b"[? r?] ");
                        let b = match &mut self.launch_log {
                            Some(w) => write_prefixed(w, prefix, data),
                            None => Ok(()),
                        };
                        a.and(b)
                    }
                    None => {
                        let prefix = format!("[{} node] ", self.host(*node)).into_bytes();
                        let a = self.units.get_mut(node).map(|w| w.write_all(data)).unwrap_or(Ok(()));
                        let b = match &mut self.launch_log {
                            Some(w) => write_prefixed(w, &prefix, data),
                            None => Ok(()),
                        };
                        a.and(b)
                    }
                };
                if let Err(e) = res {
                    if self.errors.len() < 10 {
                        self.errors.push(format!("writing rank logs: {e}"));
                    }
                }
            }
            LaunchEvent::AttemptStarting { attempt, max_restarts } => {
                self.attempt_dir = self.run.attempt_dir(*attempt);
                if *max_restarts > 0 {
                    self.launch_line(&format!("=== attempt {attempt} (of up to {}) ===", max_restarts + 1));
                }
            }
            LaunchEvent::Connected { node, elapsed } => {
                let msg = format!("{}: agent ready after {:.2}s", self.host(*node), elapsed.as_secs_f64());
                self.launch_line(&msg);
            }
            LaunchEvent::Launching { rendered, master_port, .. } => {
                let mut plan = self.plan.clone();
                plan.master_port = *master_port;
                if let Err(e) = self.run.write_plan(&plan, rendered) {
                    self.errors.push(format!("writing plan.json: {e}"));
                }
                self.open_attempt(rendered);
                let ranks: usize = rendered.nodes.iter().flat_map(|n| &n.units).map(|u| u.ranks.len()).sum();
                self.launch_line(&format!(
                    "starting {ranks} ranks on {} hosts (master {}:{master_port})",
                    rendered.nodes.len(),
                    plan.master_addr
                ));
            }
            // A progress event is in the rank logs already: the line it was parsed from.
            LaunchEvent::UnitStarted { .. } | LaunchEvent::Progress { .. } => {}
            LaunchEvent::AllStarted { elapsed } => {
                self.launch_line(&format!("all ranks started ({:.2}s after connecting began)", elapsed.as_secs_f64()))
            }
            LaunchEvent::UnitExited { node, unit, status, stopped } => {
                let who = match self.unit_ranks.get(&(*node, *unit)) {
                    Some(r) => crate::exec::outcome::ranks_label(r),
                    None => format!("unit {unit}"),
                };
                let what = if *stopped {
                    "stopped"
                } else if status.success() {
                    "finished"
                } else {
                    "FAILED"
                };
                let msg = format!("{} {who}: {what}: {}", self.host(*node), status.describe());
                self.launch_line(&msg);
            }
            LaunchEvent::Notice { node, message, warning } => {
                let host = node.map(|n| format!("{}: ", self.host(n))).unwrap_or_default();
                let level = if *warning { "warning: " } else { "" };
                self.launch_line(&format!("{level}{host}{message}"));
            }
            LaunchEvent::HostLost { node, reason } => {
                let msg = format!("{}: LOST: {reason}", self.host(*node));
                self.launch_line(&msg);
            }
            LaunchEvent::Stopping { reason, grace } => {
                let msg = if grace.is_zero() {
                    format!("aborting: {reason}")
                } else {
                    format!(
                        "stopping every rank (SIGTERM, SIGKILL after {}): {reason}",
                        crate::cluster::humane::format(*grace)
                    )
                };
                self.launch_line(&msg);
            }
            LaunchEvent::AttemptFinished { attempt, summary } => {
                self.launch_line(&format!("attempt {attempt}: {summary}"));
                self.flush_all();
            }
        }
    }

    fn tick(&mut self) {
        self.flush_all();
    }

    fn flush(&mut self) {
        self.flush_all();
    }
}

impl Drop for LogSink {
    fn drop(&mut self) {
        self.flush_all();
    }
}

/// The last `n` lines of a file (reads at most its last 256 KiB).
pub fn tail_lines(path: &Path, n: usize) -> std::io::Result<Vec<String>> {
    tail_matching(path, n, |_| true)
}

/// The last `n` lines of a file that satisfy `keep` (reads at most its last 4 MiB).
pub fn tail_matching(path: &Path, n: usize, keep: impl Fn(&str) -> bool) -> std::io::Result<Vec<String>> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let window = 4u64 << 20;
    let start = len.saturating_sub(window);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0); // probably a partial line
    }
    let kept: Vec<String> = lines.into_iter().filter(|l| keep(l)).map(str::to_string).collect();
    Ok(kept[kept.len().saturating_sub(n)..].to_vec())
}

// ───────────────────────────── launch logs ─────────────────────────────

pub struct LogsQuery {
    pub run: Option<String>,
    pub follow: bool,
    pub rank: Option<usize>,
    pub host: Option<String>,
    pub grep: Option<regex::Regex>,
}

/// Finds the run directory: a path, a run id under `log_dir`, or `latest`.
pub fn resolve_run(log_dir: &Path, run: Option<&str>) -> Result<PathBuf, String> {
    match run {
        None => {
            let latest = log_dir.join("latest");
            let target = std::fs::read_link(&latest).map_err(|_| {
                format!("no runs in {} yet (no `latest` link): start one with `launch finetune`", log_dir.display())
            })?;
            let p = if target.is_absolute() { target } else { log_dir.join(target) };
            if p.is_dir() {
                Ok(p)
            } else {
                Err(format!("{} points to {}, which does not exist", latest.display(), p.display()))
            }
        }
        Some(r) => {
            let as_path = PathBuf::from(r);
            if as_path.join("launch.log").exists() {
                return Ok(as_path);
            }
            let under = log_dir.join(r);
            if under.is_dir() {
                return Ok(under);
            }
            let mut known: Vec<String> = std::fs::read_dir(log_dir)
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.path().is_dir())
                        .filter_map(|e| e.file_name().to_str().map(str::to_string))
                        .filter(|n| !n.starts_with('.'))
                        .collect()
                })
                .unwrap_or_default();
            known.sort();
            let recent: Vec<&String> = known.iter().rev().take(5).collect();
            Err(format!(
                "no run `{r}` in {}{}",
                log_dir.display(),
                if recent.is_empty() {
                    String::new()
                } else {
                    format!(" (recent: {})", recent.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "))
                }
            ))
        }
    }
}

/// The `[host rN] ` / `[host node] ` / `[launch] ` prefix of an aggregated line.
fn split_prefix(line: &str) -> Option<(&str, &str)> {
    let inner = line.strip_prefix('[')?;
    let end = inner.find("] ")?;
    let tag = &inner[..end];
    match tag.rsplit_once(' ') {
        Some((host, who)) => Some((host, who)),
        None => Some((tag, "")),
    }
}

impl LogsQuery {
    pub fn keeps(&self, line: &str) -> bool {
        let (host, who) = split_prefix(line).unwrap_or(("", ""));
        if let Some(r) = self.rank {
            if who != format!("r{r}") {
                return false;
            }
        }
        if let Some(h) = &self.host {
            if host != h {
                return false;
            }
        }
        self.grep.as_ref().is_none_or(|re| re.is_match(line))
    }
}

fn run_state(run: &Path) -> Option<RunStatus> {
    std::fs::read(run.join("status.json")).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

fn still_running(run: &Path) -> bool {
    match run_state(run) {
        Some(s) if s.state == "running" => Path::new(&format!("/proc/{}", s.pid)).exists(),
        _ => false,
    }
}

/// `launch stop [RUN]`: asks the launcher of a running run to stop it the way SIGTERM does
/// (every rank finishes its step, the ranks agree on a stop iteration, save, exit), then waits
/// up to `wait` for it to finish. Returns what to print; errors name the run and why.
pub fn stop_run(log_dir: &Path, run: Option<&str>, wait: Duration) -> Result<String, String> {
    let dir = resolve_run(log_dir, run)?;
    let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let status = run_state(&dir).ok_or_else(|| format!("run {id}: no readable status.json in {}", dir.display()))?;
    if status.state != "running" {
        return Err(format!(
            "run {id} is not running (it finished{})",
            status.exit_code.map(|c| format!(" with exit code {c}")).unwrap_or_default()
        ));
    }
    let here = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(host) = status.host.as_deref().filter(|h| *h != here) {
        return Err(format!("run {id} was started on {host} (this is {here}): run `launch stop` there"));
    }
    // The pid must still be that launcher, not a process that reused the number.
    if status.pid_start.is_none_or(|t| crate::agent::start_time(status.pid) != Some(t)) {
        return Err(format!(
            "run {id}: its launcher (pid {}) is gone (killed before it could record the end); nothing to stop",
            status.pid
        ));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(status.pid as i32), nix::sys::signal::Signal::SIGTERM)
        .map_err(|e| format!("run {id}: cannot signal its launcher (pid {}): {e}", status.pid))?;
    eprintln!(
        "launch: asked run {id} (launcher pid {}) to stop: every rank finishes its step and saves a checkpoint",
        status.pid
    );
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        match run_state(&dir) {
            Some(s) if s.state != "running" => {
                return Ok(format!(
                    "run {id} stopped: {} (exit code {})",
                    s.outcome.unwrap_or_default(),
                    s.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "?".into())
                ));
            }
            _ if !Path::new(&format!("/proc/{}", status.pid)).exists() => {
                return Ok(format!("run {id}: its launcher exited"));
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    Ok(format!("run {id} is still stopping after {}s; follow it with `launch logs -f {id}`", wait.as_secs()))
}

/// Each host of the run's plan.json and its ranks; None while it has no readable plan.
fn plan_hosts(run: &Path) -> Option<Vec<(String, Vec<usize>)>> {
    let plan = serde_json::from_slice::<serde_json::Value>(&std::fs::read(run.join("plan.json")).ok()?).ok()?;
    let nodes = plan["plan"]["nodes"].as_array()?;
    let ranks = |n: &serde_json::Value| -> Vec<usize> {
        n["ranks"].as_array().into_iter().flatten().filter_map(|r| r.as_u64()).map(|r| r as usize).collect()
    };
    Some(nodes.iter().filter_map(|n| Some((n["host"]["name"].as_str()?.to_string(), ranks(n)))).collect())
}

/// `--rank` and `--host` must name a rank and a host of the run (from its plan.json): a filter
/// that can match nothing is an error naming what exists, not an empty output. A run without
/// a readable plan.json (still starting) is not checked.
fn check_filters(run: &Path, q: &LogsQuery) -> Result<(), String> {
    if q.rank.is_none() && q.host.is_none() {
        return Ok(());
    }
    let Some(nodes) = plan_hosts(run) else {
        return Ok(());
    };
    let hosts: Vec<String> = nodes.iter().map(|(h, _)| h.clone()).collect();
    let ranks: Vec<usize> = nodes.iter().flat_map(|(_, r)| r.iter().copied()).collect();
    let id = run.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(r) = q.rank.filter(|r| !ranks.is_empty() && !ranks.contains(r)) {
        return Err(format!(
            "run {id} has no rank {r}: its ranks are {} (on {})",
            crate::exec::outcome::ranks_label(&ranks).trim_start_matches("ranks ").trim_start_matches("rank "),
            hosts.join(", ")
        ));
    }
    // `launch` names the launcher's own lines (`[launch] …`).
    if let Some(h) = q.host.as_ref().filter(|h| !hosts.is_empty() && !hosts.contains(h) && *h != "launch") {
        let hint =
            mm_spec::suggest::did_you_mean(h, &hosts).map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default();
        return Err(format!("run {id} has no host `{h}`{hint}; its hosts are {}", hosts.join(", ")));
    }
    Ok(())
}

/// Prints the run's aggregated log through the filters; with `follow`, keeps printing new
/// lines until the run has finished.
pub fn show_logs(log_dir: &Path, q: &LogsQuery, out: &mut dyn Write) -> Result<(), String> {
    let run = resolve_run(log_dir, q.run.as_deref())?;
    check_filters(&run, q)?;
    let path = run.join("launch.log");
    // A run folder is published (`latest`) a moment before its status.json: give a run that
    // has just started that moment.
    let starting_until = std::time::Instant::now() + Duration::from_secs(10);
    let starting = || !run.join("status.json").exists() && std::time::Instant::now() < starting_until;
    let mut f = loop {
        match File::open(&path) {
            Ok(f) => break f,
            Err(_) if q.follow && (still_running(&run) || starting()) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
    };
    let mut partial: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let io = |e: std::io::Error| format!("writing output: {e}");
    let mut kept = 0usize;
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("reading {}: {e}", path.display()))?;
        if n > 0 {
            partial.extend_from_slice(&buf[..n]);
            let upto = match memchr::memrchr(b'\n', &partial) {
                Some(i) => i + 1,
                None => continue,
            };
            for line in String::from_utf8_lossy(&partial[..upto]).lines() {
                if q.keeps(line) {
                    kept += 1;
                    writeln!(out, "{line}").map_err(io)?;
                }
            }
            partial.drain(..upto);
            continue;
        }
        if !q.follow {
            break;
        }
        out.flush().map_err(io)?;
        if !still_running(&run) {
            // One more read: the launcher may have written its last lines before finishing.
            let n = f.read(&mut buf).map_err(|e| format!("reading {}: {e}", path.display()))?;
            if n > 0 {
                partial.extend_from_slice(&buf[..n]);
                continue;
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if !partial.is_empty() {
        let line = String::from_utf8_lossy(&partial).into_owned();
        if q.keeps(&line) {
            kept += 1;
            writeln!(out, "{line}").map_err(io)?;
        }
    }
    if let (Some(r), 0, None, None) = (q.rank, kept, &q.grep, &q.host) {
        // A launcher that does not tag its ranks' lines (msrun) leaves them to its host's unit.
        let host = plan_hosts(&run).and_then(|h| h.into_iter().find(|(_, ranks)| ranks.contains(&r)).map(|(h, _)| h));
        let host = host.unwrap_or_else(|| "HOST".into());
        eprintln!(
            "launch: no line of rank {r} in this run; the lines a multi-rank launcher (msrun) did not tag with \
             their rank are its host's: `launch logs --host {host}`"
        );
    }
    out.flush().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101-000000");
        assert_eq!(utc_stamp(UNIX_EPOCH + Duration::from_secs(1_709_251_199)), "20240229-235959");
        assert_eq!(utc_stamp(UNIX_EPOCH + Duration::from_secs(951_782_400)), "20000229-000000");
    }

    #[test]
    fn host_names_become_safe_directories() {
        assert_eq!(host_dir_name("node-1.example"), "node-1.example");
        assert_eq!(host_dir_name("a/b c"), "a_b_c");
        assert_eq!(host_dir_name(".."), "host..");
        assert_eq!(host_dir_name("fe80::1"), "fe80__1");
    }

    #[test]
    fn run_dirs_are_unique_and_latest_follows() {
        let d = tempfile::tempdir().unwrap();
        let a = RunDir::create(d.path(), "tiny", false).unwrap();
        let b = RunDir::create(d.path(), "tiny", true).unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(std::fs::read_link(d.path().join("latest")).unwrap(), PathBuf::from(&b.id));
        assert_eq!(resolve_run(d.path(), None).unwrap(), d.path().join(&b.id));
        assert_eq!(resolve_run(d.path(), Some(&a.id)).unwrap(), d.path().join(&a.id));
        let err = resolve_run(d.path(), Some("nope")).unwrap_err();
        assert!(err.contains("no run `nope`") && err.contains(&a.id), "{err}");
        assert_eq!(b.attempt_dir(2), b.root.join("attempt-2"));
        assert_eq!(a.attempt_dir(0), a.root);
    }

    #[test]
    fn prefixed_lines() {
        let mut out = Vec::new();
        write_prefixed(&mut out, b"[h r1] ", b"a\nb\nc").unwrap();
        assert_eq!(out, b"[h r1] a\n[h r1] b\n[h r1] c\n");
    }

    #[test]
    fn query_filters() {
        let q = |rank, host: Option<&str>, grep: Option<&str>| LogsQuery {
            run: None,
            follow: false,
            rank,
            host: host.map(str::to_string),
            grep: grep.map(|g| regex::Regex::new(g).unwrap()),
        };
        let lines = ["[h1 r0] loss 1", "[h1 r1] loss 2", "[h2 r10] error x", "[launch] starting", "[h2 node] banner"];
        let keep = |q: &LogsQuery| lines.iter().filter(|l| q.keeps(l)).copied().collect::<Vec<_>>();
        assert_eq!(keep(&q(Some(1), None, None)), ["[h1 r1] loss 2"]);
        assert_eq!(keep(&q(None, Some("h2"), None)), ["[h2 r10] error x", "[h2 node] banner"]);
        assert_eq!(keep(&q(None, None, Some("error|start"))), ["[h2 r10] error x", "[launch] starting"]);
        assert_eq!(keep(&q(None, None, None)).len(), 5);
    }

    #[test]
    fn show_logs_filters_a_finished_run() {
        let d = tempfile::tempdir().unwrap();
        let run = RunDir::create(d.path(), "t", false).unwrap();
        std::fs::write(run.launch_log(), "[h1 r0] a\n[h1 r1] b\n[launch] done\n").unwrap();
        run.write_status(&RunStatus {
            run_id: run.id.clone(),
            state: "finished".into(),
            pid: 1,
            exit_code: Some(0),
            outcome: None,
            training: None,
            host: None,
            pid_start: None,
        })
        .unwrap();
        let mut out = Vec::new();
        let q = LogsQuery { run: None, follow: true, rank: Some(1), host: None, grep: None };
        show_logs(d.path(), &q, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "[h1 r1] b\n");
    }

    #[test]
    fn tails() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, text).unwrap();
        assert_eq!(tail_lines(&p, 2).unwrap(), ["line 98", "line 99"]);
        assert_eq!(tail_matching(&p, 1, |l| l.ends_with('7')).unwrap(), ["line 97"]);
    }

    /// `launch stop` signals only the launcher that wrote the status: not a run of another
    /// machine, not a process that reused the pid, not a finished run.
    #[test]
    fn stop_refuses_other_hosts_reused_pids_and_finished_runs() {
        let d = tempfile::tempdir().unwrap();
        let run = RunDir::create(d.path(), "t", false).unwrap();
        let me = std::process::id();
        let here = nix::unistd::gethostname().unwrap().to_string_lossy().into_owned();
        let status = |state: &str, host: &str, pid_start| RunStatus {
            run_id: run.id.clone(),
            state: state.into(),
            pid: me,
            exit_code: (state == "finished").then_some(143),
            outcome: None,
            training: None,
            host: Some(host.into()),
            pid_start,
        };
        let started = crate::agent::start_time(me);
        assert!(started.is_some_and(|t| t > 0));
        let stop = || stop_run(d.path(), None, Duration::from_millis(10)).unwrap_err();
        run.write_status(&status("running", "elsewhere", started)).unwrap();
        assert!(stop().contains(&format!("was started on elsewhere (this is {here})")), "{}", stop());
        run.write_status(&status("running", &here, started.map(|t| t + 1))).unwrap();
        assert!(stop().contains(&format!("its launcher (pid {me}) is gone")), "{}", stop());
        run.write_status(&status("finished", &here, started)).unwrap();
        assert!(stop().contains("is not running (it finished with exit code 143)"), "{}", stop());
    }
}
