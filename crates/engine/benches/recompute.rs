//! Activation memory and step time with and without recomputation, side by side in one run.
//!
//!   cargo bench -p mm-engine --bench recompute
//!
//! A random InternVL with InternVL3-2B's widths (LLM 1536 wide, 12 query / 2 key-value heads,
//! MLP 8960; InternViT-300M) at a reduced depth, one text sample of BENCH_SEQ tokens, fp32 on
//! the CPU. The vocabulary is cut to BENCH_VOCAB (8192) by default: the logits of the real
//! 151,674-token vocabulary (2.4 GiB per copy at 4096 tokens in fp32) are the same with and
//! without recomputation and would hide the layers' activations this measures;
//! BENCH_VOCAB=151674 shows the whole picture.
//!
//! Each setting runs in two fresh child processes (this executable again), so that one
//! setting's freed memory cannot serve another's peak; each does one warm-up step of forward,
//! loss and backward, then measures:
//! - peak (one step): the high-water mark of resident memory during the step (reset through
//!   /proc/self/clear_refs before it) minus the resident size before it (the model and its
//!   gradients): the step's activations, logits and temporaries. This child returns large
//!   blocks to the system at once (MALLOC_MMAP_THRESHOLD_), so the resident size follows the
//!   live tensors;
//! - time (BENCH_STEPS steps): wall-clock seconds, in a child with the default allocator (the
//!   mmap churn of the first would cost the recomputed settings, which allocate twice, up to 2×
//!   the step time at 4096 tokens).
//!
//! Settings: off, full/uniform/1, full/block/(half the layers), selective. Printed: the peak
//! and the median time of each, and their ratios to "off" (the target for full
//! recomputation: activations ÷ ≥ 3 at ≤ 1.35× the step time), and beside the peak the launcher's
//! estimate of the same (`mm_spec::memory`: saved activations plus the backward's working set)
//! with its ratio to the measurement.
//!
//! Environment: BENCH_LLM_LAYERS (4), BENCH_SEQ (4096), BENCH_VOCAB (8192), BENCH_STEPS (2),
//! BENCH_THREADS (all cores), BENCH_ONLY (a comma-separated subset of the setting names).

mod common;

use std::process::Command;

use common::{env, estimate_mib, measured_step, median, preset_2b};

use mm_engine::model::recompute::Recompute;
use mm_engine::model::{InternVL, ModelInput};
use mm_engine::train::loss::{objective, sample_losses, LossReduction, StepTotals};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// The settings, by name: (granularity, method, num_layers) as the flags give them.
fn settings(layers: usize) -> Vec<(String, Option<Recompute>)> {
    let r = |g: &str, m: Option<&str>, n: Option<usize>| {
        Recompute::from_flags(Some(g), m, n).expect("valid flags").expect("recomputation")
    };
    let half = (layers / 2).max(1);
    vec![
        ("off".into(), None),
        ("full/uniform/1".into(), Some(r("full", Some("uniform"), Some(1)))),
        (format!("full/block/{half}"), Some(r("full", Some("block"), Some(half)))),
        ("selective".into(), Some(r("selective", None, None))),
    ]
}

/// One setting in this process, measuring `what` (peak or time): prints one JSON line
/// {"peak_mib": [...], "secs": [...], "loss": x}.
fn child(name: &str, what: &str) {
    let (layers, seq, vocab) = (env("BENCH_LLM_LAYERS", 4), env("BENCH_SEQ", 4096), env("BENCH_VOCAB", 8192));
    let steps = if what == "peak" { 1 } else { env("BENCH_STEPS", 2) };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    tch::set_num_threads(env("BENCH_THREADS", cores) as i32);
    let recompute = settings(layers).into_iter().find(|(n, _)| n == name).expect("a known setting").1;
    let preset = preset_2b(layers, vocab);
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    // No image in the sample: the context token id is outside the vocabulary.
    let mut model = InternVL::new(&vs.root(), &preset, vocab as i64 + 1, false);
    model.set_recompute(recompute);
    let ids = Tensor::randint(vocab as i64, [1, seq as i64], (Kind::Int64, Device::Cpu));
    let input = ModelInput {
        input_ids: ids.shallow_clone(),
        attention_mask: Tensor::ones([1, seq as i64], (Kind::Int64, Device::Cpu)),
        pixel_values: None,
    };
    let (mut peaks, mut secs, mut loss) = (Vec::new(), Vec::new(), f64::NAN);
    for i in 0..=steps {
        let (peak, dt) = measured_step(&vs, || {
            let logits = model.forward(&input, true).expect("forward");
            let l = sample_losses(&logits, &ids);
            drop(logits);
            let totals = StepTotals { micro_batches: 1, samples: 1, tokens: l.counts.iter().sum() };
            let obj = objective(LossReduction::Default, &l, totals);
            obj.backward();
            loss = obj.double_value(&[]);
        });
        if i > 0 {
            peaks.push(peak);
            secs.push(dt);
        }
    }
    println!("{}", serde_json::json!({ "peak_mib": peaks, "secs": secs, "loss": loss }));
}

fn main() {
    if let Ok(name) = std::env::var("RECOMPUTE_BENCH_CHILD") {
        child(&name, &std::env::var("RECOMPUTE_BENCH_WHAT").unwrap_or_default());
        return;
    }
    let (layers, seq, vocab) = (env("BENCH_LLM_LAYERS", 4), env("BENCH_SEQ", 4096), env("BENCH_VOCAB", 8192));
    let only: Option<Vec<String>> =
        std::env::var("BENCH_ONLY").ok().map(|s| s.split(',').map(|x| x.trim().to_string()).collect());
    println!(
        "forward + loss + backward, fp32 CPU: InternVL3-2B widths, {layers} LLM layers, vocabulary {vocab}, one \
         text sample of {seq} tokens; median over BENCH_STEPS steps after one warm-up, one child process per setting"
    );
    println!(
        "{:<18} {:>10} {:>8} {:>13} {:>9} {:>9} {:>8} {:>10}",
        "setting", "peak MiB", "÷ (off)", "estimate MiB", "est/peak", "step s", "× (off)", "loss"
    );
    let exe = std::env::current_exe().expect("this bench's path");
    let mut base: Option<(f64, f64)> = None;
    for (name, setting) in settings(layers) {
        if only.as_ref().is_some_and(|o| !o.contains(&name)) {
            continue;
        }
        let run = |what: &str| -> serde_json::Value {
            let mut c = Command::new(&exe);
            c.env("RECOMPUTE_BENCH_CHILD", &name).env("RECOMPUTE_BENCH_WHAT", what);
            if what == "peak" {
                c.env("MALLOC_MMAP_THRESHOLD_", "65536");
            } else {
                c.env_remove("MALLOC_MMAP_THRESHOLD_");
            }
            let o = c.output().expect("run the child");
            assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
            let out = String::from_utf8_lossy(&o.stdout);
            serde_json::from_str(out.lines().last().unwrap_or_default()).expect("child JSON")
        };
        let nums = |v: &serde_json::Value, k: &str| -> Vec<f64> {
            v[k].as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default()
        };
        let (pv, v) = (run("peak"), run("time"));
        let (peak, secs) = (median(&nums(&pv, "peak_mib")), median(&nums(&v, "secs")));
        let (p0, s0) = *base.get_or_insert((peak, secs));
        let est = estimate_mib(&preset_2b(layers, vocab), 1, false, seq, setting);
        println!(
            "{name:<18} {peak:>10.0} {:>8.2} {est:>13.0} {:>9.2} {secs:>9.2} {:>8.2} {:>10.6}",
            p0 / peak,
            est / peak,
            secs / s0,
            v["loss"].as_f64().unwrap_or(f64::NAN)
        );
    }
}
