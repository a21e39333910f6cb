//! The metrics of a run: `metrics.jsonl` and the TensorBoard scalars, from one place.
//!
//! Each line of `metrics.jsonl` is one logged iteration as the reporting rank saw it (rank 0;
//! MindSpeed-MM's last rank): the fields of the engine's progress line ([`Progress`]) plus the attempt (0 first; a restart or a resume
//! into the same file counts up) and the wall time. The file is only ever appended to, one
//! `write` per line, so an interrupted run leaves whole lines and at most a cut last one,
//! which readers skip. [`METRICS`] names every plottable value once: TensorBoard tags
//! (`train/<name>`), `launch plot --metric` and `launch logs --summary` all use it.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::progress::Progress;
use crate::tensorboard::EventWriter;

/// One line of metrics.jsonl.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    pub attempt: u32,
    /// Seconds since the Unix epoch when the line was written.
    pub time: f64,
    #[serde(flatten)]
    pub step: Progress,
}

/// A value that can be plotted or tabulated.
pub struct Metric {
    pub name: &'static str,
    /// Axis label, with its unit.
    pub label: &'static str,
    pub get: fn(&Progress) -> Option<f64>,
}

/// Every metric, in the order tables and TensorBoard list them.
pub const METRICS: &[Metric] = &[
    Metric { name: "loss", label: "loss", get: |p| Some(p.loss) },
    Metric { name: "lr", label: "learning rate", get: |p| Some(p.lr) },
    Metric { name: "grad_norm", label: "gradient norm", get: |p| p.grad_norm },
    // NaN: not reported (Megatron's line without --log-tps), so no value rather than a NaN one.
    Metric { name: "tokens_per_sec", label: "tokens/s", get: |p| Some(p.tokens_per_sec).filter(|v| !v.is_nan()) },
    Metric { name: "samples_per_sec", label: "samples/s", get: |p| Some(p.samples_per_sec).filter(|v| !v.is_nan()) },
    Metric { name: "step_ms", label: "step time (ms)", get: |p| Some(p.step_ms) },
    Metric { name: "data_ms", label: "data wait (ms)", get: |p| p.data_ms },
    Metric { name: "slowest_busy_ms", label: "slowest rank's busy time (ms)", get: |p| p.slowest_busy_ms },
    Metric { name: "tflops", label: "model TFLOP/s per device", get: |p| p.tflops },
    Metric { name: "mfu", label: "MFU (%)", get: |p| p.mfu.map(|m| 100.0 * m) },
    Metric { name: "rss_gib", label: "host memory, RSS (GiB)", get: |p| p.mem_bytes.map(gib) },
    Metric { name: "cuda_allocated_gib", label: "CUDA allocated (GiB)", get: |p| p.cuda_allocated_bytes.map(gib) },
    Metric { name: "cuda_reserved_gib", label: "CUDA reserved (GiB)", get: |p| p.cuda_reserved_bytes.map(gib) },
];

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// metrics.jsonl's byte fields, and the metric that plots each (in GiB).
const FIELD_METRICS: &[(&str, &str)] = &[
    ("mem_bytes", "rss_gib"),
    ("cuda_allocated_bytes", "cuda_allocated_gib"),
    ("cuda_reserved_bytes", "cuda_reserved_gib"),
];

/// The metric called `name` (or plotting the metrics.jsonl field `name`), or an error that
/// lists them and suggests the closest.
pub fn metric(name: &str) -> Result<&'static Metric, String> {
    let name = FIELD_METRICS.iter().find(|(field, _)| *field == name).map_or(name, |(_, m)| m);
    METRICS.iter().find(|m| m.name == name).ok_or_else(|| {
        let names: Vec<&str> = METRICS.iter().map(|m| m.name).collect();
        format!("unknown metric `{name}`{}: expected one of {}", crate::suggest::hint(name, &names), names.join(", "))
    })
}

/// Appends to metrics.jsonl and/or a TensorBoard directory.
pub struct MetricsWriter {
    /// metrics.jsonl and its path, when written.
    file: Option<(File, PathBuf)>,
    attempt: u32,
    tensorboard: Option<EventWriter>,
}

impl MetricsWriter {
    /// Opens `path` for appending (creating it and its folder) and a new event file in
    /// `tensorboard`. `attempt`: None to continue the file's numbering (one more than its
    /// last attempt). A last line cut by an interrupted writer is dropped first, so the lines
    /// appended now stay readable.
    pub fn open(path: Option<&Path>, attempt: Option<u32>, tensorboard: Option<&Path>) -> io::Result<MetricsWriter> {
        let mut file = None;
        let mut last = None;
        if let Some(path) = path {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let mut f = OpenOptions::new().create(true).read(true).append(true).open(path)?;
            drop_cut_last_line(&mut f)?;
            if attempt.is_none() && f.metadata()?.len() > 0 {
                last = read(path).map_err(io::Error::other)?.records.last().map(|l| l.attempt);
            }
            file = Some((f, path.to_path_buf()));
        }
        let attempt = attempt.unwrap_or_else(|| last.map_or(0, |a| a + 1));
        let tensorboard = tensorboard.map(EventWriter::create).transpose()?;
        Ok(MetricsWriter { file, attempt, tensorboard })
    }

    /// metrics.jsonl, when this writer keeps one.
    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|(_, p)| p.as_path())
    }

    /// The attempt number its lines carry.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    pub fn tensorboard_file(&self) -> Option<&Path> {
        self.tensorboard.as_ref().map(EventWriter::path)
    }

    /// Appends one logged iteration (and its TensorBoard event).
    pub fn write(&mut self, step: &Progress) -> io::Result<()> {
        let time = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        if let Some((file, _)) = &mut self.file {
            let rec = MetricsRecord { attempt: self.attempt, time, step: step.clone() };
            let mut line = serde_json::to_vec(&rec).map_err(io::Error::other)?;
            line.push(b'\n');
            // One write per line: appends from one writer never interleave or split a line.
            file.write_all(&line)?;
        }
        if let Some(tb) = &mut self.tensorboard {
            let tags: Vec<(String, f32)> =
                METRICS.iter().filter_map(|m| (m.get)(step).map(|v| (format!("train/{}", m.name), v as f32))).collect();
            tb.scalars(step.iteration as i64, time, &tags)?;
            tb.flush()?;
        }
        Ok(())
    }
}

/// Cuts `f` after its last newline: what follows is a line an interrupted writer left
/// unfinished (unreadable, and a bad middle line once more lines follow it).
fn drop_cut_last_line(f: &mut File) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let len = f.metadata()?.len();
    let mut at = len;
    let mut buf = [0u8; 4096];
    while at > 0 {
        let n = buf.len().min(at as usize);
        f.seek(SeekFrom::Start(at - n as u64))?;
        f.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            at = at - n as u64 + i as u64 + 1;
            break;
        }
        at -= n as u64;
    }
    if at < len {
        f.set_len(at)?;
    }
    Ok(())
}

/// A metrics file as read back.
#[derive(Debug, Default)]
pub struct MetricsFile {
    pub records: Vec<MetricsRecord>,
    /// A last line without its newline (the writer was interrupted mid-line): not parsed.
    pub cut_last_line: bool,
}

/// Reads metrics.jsonl. A line that is not a record is an error naming the file and line,
/// except an unterminated last line, which an interrupted writer may leave.
pub fn read(path: &Path) -> Result<MetricsFile, String> {
    let f = File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut out = MetricsFile::default();
    let mut reader = io::BufReader::new(f);
    let mut line = String::new();
    let mut n = 0usize;
    loop {
        line.clear();
        let got = reader.read_line(&mut line).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if got == 0 {
            break;
        }
        n += 1;
        if !line.ends_with('\n') {
            out.cut_last_line = true;
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let rec: MetricsRecord = serde_json::from_str(&line).map_err(|e| {
            format!(
                "{}:{n}: not a metrics record ({e}); expected one JSON object per line as the launcher and \
                 mm-engine write them",
                path.display()
            )
        })?;
        out.records.push(rec);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(iteration: u64, loss: f64) -> Progress {
        Progress {
            iteration,
            train_iters: 10,
            loss,
            lr: 1e-5,
            tokens_per_sec: 100.0,
            mfu: Some(0.25),
            ..Default::default()
        }
    }

    #[test]
    fn appends_across_attempts_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m/metrics.jsonl");
        let mut w = MetricsWriter::open(Some(&path), None, None).unwrap();
        w.write(&step(1, 2.0)).unwrap();
        w.write(&step(2, f64::NAN)).unwrap();
        drop(w);
        let mut w = MetricsWriter::open(Some(&path), None, None).unwrap();
        w.write(&step(3, 1.5)).unwrap();
        let back = read(&path).unwrap();
        let got: Vec<(u32, u64)> = back.records.iter().map(|r| (r.attempt, r.step.iteration)).collect();
        assert_eq!(got, [(0, 1), (0, 2), (1, 3)]);
        assert!(back.records[1].step.loss.is_nan());
        assert_eq!((metric("mfu").unwrap().get)(&back.records[0].step), Some(25.0));
        assert!(!back.cut_last_line);
    }

    #[test]
    fn a_cut_last_line_is_skipped_and_a_bad_middle_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut w = MetricsWriter::open(Some(&path), Some(4), None).unwrap();
        w.write(&step(1, 2.0)).unwrap();
        drop(w);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"attempt\":4,\"ti").unwrap();
        let back = read(&path).unwrap();
        assert_eq!((back.records.len(), back.cut_last_line), (1, true));
        // The next writer drops the cut line and continues the numbering after it.
        let mut w = MetricsWriter::open(Some(&path), None, None).unwrap();
        assert_eq!(w.attempt(), 5);
        w.write(&step(2, 1.0)).unwrap();
        let back = read(&path).unwrap();
        assert_eq!(back.records.iter().map(|r| (r.attempt, r.step.iteration)).collect::<Vec<_>>(), [(4, 1), (5, 2)]);
        f.write_all(b"{}\n").unwrap();
        f.write_all(b"{\"attempt\":1}\n").unwrap();
        let err = read(&path).unwrap_err();
        assert!(err.contains("metrics.jsonl:3: not a metrics record"), "{err}");
        // A writer that would continue the numbering refuses a file it cannot read.
        let err = MetricsWriter::open(Some(&path), None, None).err().unwrap();
        assert!(err.to_string().contains("metrics.jsonl:3"), "{err}");
    }

    #[test]
    fn unknown_metric_names_the_closest() {
        let err = metric("los").err().unwrap();
        assert!(err.contains("`loss`") && err.contains("tokens_per_sec"), "{err}");
        // metrics.jsonl's byte fields name the metric that plots them in GiB.
        assert_eq!(metric("mem_bytes").unwrap().name, "rss_gib");
        assert_eq!(metric("cuda_reserved_bytes").unwrap().name, "cuda_reserved_gib");
    }
}
