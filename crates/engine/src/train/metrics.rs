//! What rank 0 measures beyond the loss: model FLOPs per step, the peak MFU divides by, CUDA
//! memory, and the metrics file and TensorBoard events it writes (mm_spec::metrics).

use std::ffi::{c_char, c_int, CStr};
use std::time::{Duration, Instant};

use mm_spec::flops::{peak_tflops, ModelFlops, Trained};
use mm_spec::metrics::MetricsWriter;
use mm_spec::Progress;
use tch::{Device, Kind, Tensor};

use super::config::{Freeze, MetricsConfig};
use crate::data::loader::Batch;

extern "C" {
    fn mm_cuda_device_name(index: c_int, buf: *mut c_char, len: c_int) -> c_int;
    fn mm_cuda_memory(index: c_int, allocated: *mut i64, reserved: *mut i64) -> c_int;
}

/// The name CUDA reports for `device`, when it is a GPU.
pub fn cuda_device_name(device: Device) -> Option<String> {
    let Device::Cuda(i) = device else { return None };
    let mut buf = [0 as c_char; 256];
    // SAFETY: the shim writes at most `len` bytes, NUL-terminated, into `buf`.
    let ok = unsafe { mm_cuda_device_name(i as c_int, buf.as_mut_ptr(), buf.len() as c_int) };
    // SAFETY: snprintf terminated the buffer.
    (ok == 1).then(|| unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// The CUDA caching allocator's (allocated, reserved) bytes on `device`, when it is a GPU.
pub fn cuda_memory(device: Device) -> Option<(u64, u64)> {
    let Device::Cuda(i) = device else { return None };
    let (mut a, mut r) = (0i64, 0i64);
    // SAFETY: two valid out-pointers.
    let ok = unsafe { mm_cuda_memory(i as c_int, &mut a, &mut r) };
    (ok == 1).then_some((a.max(0) as u64, r.max(0) as u64))
}

/// Where the peak MFU divides by came from.
#[derive(Debug, Clone, PartialEq)]
pub enum PeakSource {
    Flag,
    DataSheet(String),
    /// A matrix product timed on this CPU at start (no data sheet to read).
    Measured,
}

/// The peak dense TFLOP/s of one device: --peak-tflops, else the data sheet of a known GPU,
/// else (CPU) a timed matrix product in the training dtype. None for an unknown GPU.
pub fn peak(cfg: &MetricsConfig, device: Device, kind: Kind) -> Option<(f64, PeakSource)> {
    if let Some(p) = cfg.peak_tflops {
        return Some((p, PeakSource::Flag));
    }
    match device {
        Device::Cpu => Some((measure_matmul_tflops(kind, Duration::from_millis(60)), PeakSource::Measured)),
        _ => {
            let name = cuda_device_name(device)?;
            peak_tflops(&name).map(|p| (p, PeakSource::DataSheet(name)))
        }
    }
}

/// TFLOP/s of 512×512 matrix products in `kind` on the CPU, over about `budget`: what this
/// process's threads reach on the densest work training does.
pub fn measure_matmul_tflops(kind: Kind, budget: Duration) -> f64 {
    const N: i64 = 512;
    let _guard = tch::no_grad_guard();
    let a = Tensor::randn([N, N], (Kind::Float, Device::Cpu)).to_kind(kind);
    let b = Tensor::randn([N, N], (Kind::Float, Device::Cpu)).to_kind(kind);
    let _ = a.matmul(&b); // warm-up: thread pool and kernel selection
    let start = Instant::now();
    let mut n = 0u64;
    while n < 2 || start.elapsed() < budget {
        let _ = a.matmul(&b);
        n += 1;
    }
    2.0 * (N * N * N) as f64 * n as f64 / start.elapsed().as_secs_f64() / 1e12
}

/// Model FLOPs of this rank's micro batches (mm_spec::flops over their real tokens).
pub fn batches_flops(f: &ModelFlops, batches: &[Batch]) -> f64 {
    batches
        .iter()
        .map(|b| {
            let rows = b.attention_mask.chunks(b.len.max(1)).map(|r| r.iter().filter(|&&m| m).count() as u64);
            f.batch(b.tiles as u64, rows)
        })
        .sum()
}

pub fn model_flops(preset: &mm_spec::ModelPreset, freeze: Freeze) -> ModelFlops {
    ModelFlops::new(preset, Trained { vision: !freeze.vision, projector: !freeze.projector, llm: !freeze.llm })
}

/// Rank 0's metrics.jsonl and TensorBoard writer; a write that fails is reported once and
/// the run goes on without metrics (they are not worth a lost training run).
pub struct Sink {
    writer: Option<MetricsWriter>,
}

impl Sink {
    /// Writes nothing (every rank but 0).
    pub fn none() -> Sink {
        Sink { writer: None }
    }

    /// Rank 0's writer. A file it cannot open or read (a full disk, a metrics file damaged by
    /// hand) is a warning: the run trains without metrics rather than not at all.
    pub fn open(cfg: &MetricsConfig) -> Sink {
        if cfg.file.is_none() && cfg.tensorboard_dir.is_none() {
            if !crate::cli::launched() {
                println!("metrics: none written (no --save, --metrics-file or --tensorboard-dir)");
            }
            return Sink::none();
        }
        let w = match MetricsWriter::open(cfg.file.as_deref(), None, cfg.tensorboard_dir.as_deref()) {
            Ok(w) => w,
            Err(e) => {
                let what: Vec<String> =
                    cfg.file.iter().chain(&cfg.tensorboard_dir).map(|p| p.display().to_string()).collect();
                eprintln!(
                    "warning: cannot write the metrics to {}: {e}; this run writes none (move a damaged metrics \
                     file aside, or pass --metrics-file/--tensorboard-dir with a writable path)",
                    what.join(" and ")
                );
                return Sink::none();
            }
        };
        let mut said = Vec::new();
        if let Some(p) = w.path() {
            said.push(format!("{} (attempt {})", p.display(), w.attempt()));
        }
        if let Some(p) = w.tensorboard_file() {
            said.push(format!("TensorBoard events {}", p.display()));
        }
        println!("metrics: {}", said.join(", "));
        Sink { writer: Some(w) }
    }

    pub fn write(&mut self, p: &Progress) {
        let Some(w) = &mut self.writer else { return };
        if let Err(e) = w.write(p) {
            let what: Vec<String> =
                w.path().into_iter().chain(w.tensorboard_file()).map(|p| p.display().to_string()).collect();
            eprintln!(
                "warning: cannot write the metrics to {}: {e}; no more metrics are written in this run",
                what.join(" or ")
            );
            self.writer = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_peak_is_measured_and_plausible() {
        let t = measure_matmul_tflops(Kind::Float, Duration::from_millis(20));
        // Between a slow shared core and a large server CPU.
        assert!(t > 1e-4 && t < 50.0, "{t} TFLOP/s");
        let cfg = MetricsConfig { peak_tflops: Some(123.0), ..Default::default() };
        assert_eq!(peak(&cfg, Device::Cpu, Kind::Float), Some((123.0, PeakSource::Flag)));
        assert_eq!(cuda_device_name(Device::Cpu), None);
        assert_eq!(cuda_memory(Device::Cpu), None);
    }
}
