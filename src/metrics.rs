//! The run's metrics: `<run>/metrics.jsonl` and `<run>/tensorboard/`, written from the
//! iterations the ranks report (mm-engine's rank 0 in progress lines, MindSpeed-MM's last
//! rank in Megatron's log line: [`crate::progress::ProgressSource`]) as they arrive, so they
//! are on the launcher's machine whichever host that rank ran on; and `launch logs
//! --summary`, the table of a run read back from them.
//!
//! The record format and the metric names are mm_spec::metrics's: mm-engine run alone writes
//! the same file.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use mm_spec::metrics::{MetricsRecord, MetricsWriter};
use mm_spec::progress::ProgressEvent;

use crate::events::{LaunchEvent, Reporter};

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const TENSORBOARD_DIR: &str = "tensorboard";

/// Appends each logged iteration of rank 0 to the run folder's metrics, per attempt.
pub struct MetricsSink {
    root: PathBuf,
    attempt: u32,
    writer: Option<MetricsWriter>,
    last_iteration: Option<u64>,
    /// A write failed: said once, then no more metrics for this run.
    broken: bool,
    errors: Vec<String>,
}

impl MetricsSink {
    pub fn new(root: &Path) -> MetricsSink {
        MetricsSink {
            root: root.to_path_buf(),
            attempt: 0,
            writer: None,
            last_iteration: None,
            broken: false,
            errors: Vec::new(),
        }
    }

    /// What went wrong writing the metrics (for the launcher's end-of-run warnings).
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    fn record(&mut self, ev: &ProgressEvent) {
        let ProgressEvent::Step(p) = ev else { return };
        if self.broken || self.last_iteration.is_some_and(|i| p.iteration <= i) {
            return;
        }
        self.last_iteration = Some(p.iteration);
        if self.writer.is_none() {
            let path = self.root.join(METRICS_FILE);
            match MetricsWriter::open(Some(&path), Some(self.attempt), Some(&self.root.join(TENSORBOARD_DIR))) {
                Ok(w) => self.writer = Some(w),
                Err(e) => {
                    self.errors.push(format!("cannot write {}: {e}; the run goes on without metrics", path.display()));
                    self.broken = true;
                    return;
                }
            }
        }
        if let Some(w) = &mut self.writer {
            if let Err(e) = w.write(p) {
                let (file, tb) = (self.root.join(METRICS_FILE), self.root.join(TENSORBOARD_DIR));
                self.errors.push(format!(
                    "cannot write the metrics to {} or {}: {e}; no more metrics",
                    file.display(),
                    tb.display()
                ));
                self.broken = true;
                self.writer = None;
            }
        }
    }
}

impl Reporter for MetricsSink {
    fn event(&mut self, ev: &LaunchEvent<'_>) {
        match ev {
            LaunchEvent::AttemptStarting { attempt, .. } => {
                self.attempt = *attempt;
                self.writer = None;
                self.last_iteration = None;
            }
            LaunchEvent::Progress { event, .. } => self.record(event),
            _ => {}
        }
    }
}

/// The metrics file of a run folder (or the file itself), read back.
pub fn load(path: &Path) -> Result<(PathBuf, Vec<MetricsRecord>), String> {
    let file = if path.is_dir() { path.join(METRICS_FILE) } else { path.to_path_buf() };
    if !file.exists() {
        return Err(format!(
            "{} does not exist: the run logged no iteration yet (mm-engine's progress lines and \
             MindSpeed-MM's Megatron iteration lines both count)",
            file.display()
        ));
    }
    let read = mm_spec::metrics::read(&file)?;
    Ok((file, read.records))
}

/// The run whose metrics to show: a metrics file or a folder holding one as given, a run id,
/// or without RUN the latest run that has metrics (a rerun with nothing left to train logs
/// no iteration), said on stderr when that is not the latest.
pub fn resolve_with_metrics(log_dir: &Path, run: Option<&str>) -> Result<PathBuf, String> {
    if let Some(p) = run.map(Path::new).filter(|p| p.is_file() || p.join(METRICS_FILE).is_file()) {
        return Ok(p.to_path_buf());
    }
    let latest = crate::logs::resolve_run(log_dir, run)?;
    if run.is_some() || latest.join(METRICS_FILE).exists() {
        return Ok(latest);
    }
    let mut runs: Vec<PathBuf> = std::fs::read_dir(log_dir)
        .map_err(|e| format!("cannot list {}: {e}", log_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.join(METRICS_FILE).is_file() && p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        })
        .collect();
    // Run ids start with their UTC start time, so the name order is the time order.
    runs.sort();
    let newest = runs.pop().ok_or_else(|| {
        format!(
            "no run under {} has metrics yet (the latest, {}, logged no iteration); train with `launch finetune`",
            log_dir.display(),
            latest.display()
        )
    })?;
    eprintln!(
        "launch: the latest run {} logged no iteration; showing {}",
        latest.file_name().unwrap_or_default().to_string_lossy(),
        newest.file_name().unwrap_or_default().to_string_lossy()
    );
    Ok(newest)
}

/// `launch logs --summary`: one row per attempt and a total, from metrics.jsonl.
pub fn summary(run: &Path) -> Result<String, String> {
    let (file, recs) = load(run)?;
    if recs.is_empty() {
        return Err(format!("{} has no logged iteration yet", file.display()));
    }
    let mut out = String::new();
    let _ = writeln!(out, "run {}  ({} logged iterations)", run.display(), recs.len());
    let _ = writeln!(
        out,
        "{:>7}  {:>15}  {:>10}  {:>10}  {:>10}  {:>9}  {:>10}  {:>8}  {:>7}  {:>9}",
        "attempt",
        "iterations",
        "first loss",
        "last loss",
        "min loss",
        "tokens/s",
        "step (ms)",
        "TFLOP/s",
        "MFU",
        "data (ms)"
    );
    let mut attempts: Vec<u32> = recs.iter().map(|r| r.attempt).collect();
    attempts.dedup();
    let row = |label: String, rs: &[&MetricsRecord], out: &mut String| {
        let first = rs.first().map(|r| r.step.iteration).unwrap_or(0);
        let last = rs.last().map(|r| r.step.iteration).unwrap_or(0);
        let losses = rs.iter().map(|r| r.step.loss).filter(|l| l.is_finite());
        let min = losses.fold(f64::INFINITY, f64::min);
        let mean = |f: fn(&MetricsRecord) -> Option<f64>| {
            let v: Vec<f64> = rs.iter().filter_map(|r| f(r)).filter(|x| x.is_finite()).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        let num = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |x| format!("{x:.prec$}"));
        let _ = writeln!(
            out,
            "{label:>7}  {:>15}  {:>10.4}  {:>10.4}  {:>10}  {:>9}  {:>10}  {:>8}  {:>7}  {:>9}",
            format!("{first}-{last}"),
            rs.first().map_or(f64::NAN, |r| r.step.loss),
            rs.last().map_or(f64::NAN, |r| r.step.loss),
            num(min.is_finite().then_some(min), 4),
            num(mean(|r| Some(r.step.tokens_per_sec)), 0),
            num(mean(|r| Some(r.step.step_ms)), 1),
            num(mean(|r| r.step.tflops), 3),
            mean(|r| r.step.mfu).map_or("-".into(), |m| format!("{:.2}%", 100.0 * m)),
            num(mean(|r| r.step.data_ms), 1),
        );
    };
    for a in &attempts {
        let rs: Vec<&MetricsRecord> = recs.iter().filter(|r| r.attempt == *a).collect();
        row(a.to_string(), &rs, &mut out);
    }
    if attempts.len() > 1 {
        let all: Vec<&MetricsRecord> = recs.iter().collect();
        row("all".into(), &all, &mut out);
    }
    let last = &recs[recs.len() - 1].step;
    let _ = writeln!(
        out,
        "last: iteration {}/{} · {} samples consumed{}{}",
        last.iteration,
        last.train_iters,
        last.consumed_samples,
        last.mem_bytes.map(|m| format!(" · RSS {}", mm_spec::human_bytes(m))).unwrap_or_default(),
        match (last.slowest_rank, last.slowest_busy_ms) {
            (Some(r), Some(ms)) => format!(" · slowest rank {r} ({ms:.1} ms)"),
            _ => String::new(),
        }
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::ProgressSource;
    use mm_spec::Progress;

    fn step(i: u64, loss: f64) -> ProgressEvent {
        ProgressEvent::Step(Progress {
            iteration: i,
            train_iters: 4,
            loss,
            tokens_per_sec: 1000.0,
            step_ms: 10.0,
            tflops: Some(0.5),
            mfu: Some(0.1),
            ..Default::default()
        })
    }

    #[test]
    fn attempts_append_and_the_summary_has_a_row_each() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = MetricsSink::new(dir.path());
        sink.event(&LaunchEvent::AttemptStarting { attempt: 0, max_restarts: 1 });
        let output = |sink: &mut MetricsSink, lines: String| {
            ProgressSource::ProgressLines.for_each(lines.as_bytes(), |event| {
                sink.event(&LaunchEvent::Progress { node: 0, rank: Some(0), event })
            });
        };
        // Ordinary text is skipped, and so is an iteration that does not move forward.
        output(
            &mut sink,
            format!("x\n{}\n{}\n{}\n", step(1, 3.0).to_line(), step(2, 2.5).to_line(), step(2, 9.0).to_line()),
        );
        sink.event(&LaunchEvent::AttemptStarting { attempt: 1, max_restarts: 1 });
        output(&mut sink, format!("{}\n", step(3, 2.0).to_line()));
        let (_, recs) = load(dir.path()).unwrap();
        let got: Vec<(u32, u64, f64)> = recs.iter().map(|r| (r.attempt, r.step.iteration, r.step.loss)).collect();
        assert_eq!(got, [(0, 1, 3.0), (0, 2, 2.5), (1, 3, 2.0)]);
        assert_eq!(
            std::fs::read_dir(dir.path().join(TENSORBOARD_DIR)).unwrap().count(),
            2,
            "one event file per attempt"
        );
        let table = summary(dir.path()).unwrap();
        let rows: Vec<&str> = table.lines().collect();
        assert!(
            rows[2].trim_start().starts_with("0") && rows[2].contains("1-2") && rows[2].contains("10.00%"),
            "{table}"
        );
        assert!(rows[3].trim_start().starts_with("1") && rows[3].contains("3-3"), "{table}");
        assert!(rows[4].trim_start().starts_with("all") && rows[4].contains("1-3"), "{table}");
    }

    #[test]
    fn without_a_run_the_newest_with_metrics_is_shown() {
        let logs = tempfile::tempdir().unwrap();
        for (id, metrics) in
            [("20261201-000000-tiny", true), ("20261201-000100-tiny", true), ("20261201-000200-tiny", false)]
        {
            std::fs::create_dir(logs.path().join(id)).unwrap();
            if metrics {
                std::fs::write(logs.path().join(id).join(METRICS_FILE), "").unwrap();
            }
        }
        std::os::unix::fs::symlink("20261201-000200-tiny", logs.path().join("latest")).unwrap();
        let got = resolve_with_metrics(logs.path(), None).unwrap();
        assert_eq!(got, logs.path().join("20261201-000100-tiny"));
        // A run named explicitly is that run, metrics or not.
        let named = resolve_with_metrics(logs.path(), Some("20261201-000200-tiny")).unwrap();
        assert_eq!(named, logs.path().join("20261201-000200-tiny"));
    }

    #[test]
    fn a_run_without_metrics_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let err = summary(dir.path()).unwrap_err();
        assert!(err.contains("metrics.jsonl does not exist") && err.contains("MindSpeed-MM"), "{err}");
    }
}
