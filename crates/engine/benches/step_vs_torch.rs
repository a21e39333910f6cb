//! One training step of mm-engine beside PyTorch eager (transformers 4.53's InternVL) on the
//! same CPU, the same random model and the same sample, in one run.
//!
//!   cargo bench -p mm-engine --bench step_vs_torch
//!
//! benches/step_vs_torch.py writes a random InternVL with InternVL3-1B's widths (ViT 1024 wide,
//! 448 px tiles; LLM 896 wide, vocab 151674) at a reduced depth, and one sample (1 tile = 256
//! image tokens in 512 tokens). Each round times STEPS steps (after WARMUP) of forward, loss,
//! backward, clip, AdamW and zero_grad in PyTorch (a child process), then in mm-engine (this
//! process, the engine's own model, loss and optimizer code), alternating so that drift of a
//! shared machine hits both sides. Both use every core for intra-op threads, fp32.
//!
//! Environment: BENCH_LLM_LAYERS (4), BENCH_VIT_LAYERS (4), BENCH_SEQ (512), BENCH_TILES (1),
//! BENCH_STEPS (5), BENCH_WARMUP (2), BENCH_ROUNDS (2), BENCH_THREADS (all cores).
//! Prints per-round medians and the ratio mm-engine / PyTorch (target ≤ 1.0).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use mm_engine::model::{InternVL, ModelInput};
use mm_engine::train::loss::{objective, sample_losses, LossReduction, StepTotals};
use mm_engine::train::optimizer::{AdamW, AdamWConfig};
use mm_engine::weights::checkpoint::resolve;
use mm_engine::weights::safetensors::SafetensorsFile;
use tch::nn::VarStore;
use tch::Device;

const IMAGE_TOKEN: i64 = 151_667;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(p.exists(), "{} is missing: run scripts/setup.sh", p.display());
    p
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/step_vs_torch.py")
}

fn py(args: &[String]) -> String {
    let o = Command::new(python()).arg(script()).args(args).output().expect("run python");
    assert!(
        o.status.success(),
        "step_vs_torch.py {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

struct Run {
    step_ms: Vec<f64>,
    loss: f64,
}

/// `steps` timed steps of mm-engine after `warmup`, on a freshly loaded model.
fn engine_steps(dir: &Path, steps: usize, warmup: usize) -> Run {
    let src = resolve(&dir.join("model"), None).expect("the bench model");
    let preset = src.preset("bench").expect("preset");
    let vs = VarStore::new(Device::Cpu);
    let model = InternVL::new(&vs.root(), &preset, IMAGE_TOKEN, !src.has_lm_head());
    src.load_weights(&vs, false, None).expect("load weights");
    let f = SafetensorsFile::open(&dir.join("batch.safetensors")).expect("batch");
    let read = |k: &str| f.read(k, Device::Cpu).expect(k);
    let input = ModelInput {
        input_ids: read("input_ids"),
        attention_mask: read("attention_mask"),
        pixel_values: Some(read("pixel_values")),
    };
    let labels = read("labels");
    let mut params: Vec<_> = vs.variables().into_iter().collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let mut opt = AdamW::new(params, AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 });
    let mut run = Run { step_ms: Vec::new(), loss: f64::NAN };
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        let logits = model.forward(&input, true).expect("forward");
        let l = sample_losses(&logits, &labels);
        let totals = StepTotals { micro_batches: 1, samples: 1, tokens: l.counts.iter().sum() };
        let loss = objective(LossReduction::Default, &l, totals);
        loss.backward();
        opt.accumulate();
        opt.clip(1.0);
        opt.step(1e-5);
        opt.zero_grad();
        if i >= warmup {
            run.step_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        run.loss = loss.double_value(&[]);
    }
    run
}

fn peak_rss_self() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    u.ru_maxrss as u64 * 1024
}

fn main() {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let (llm, vit) = (env("BENCH_LLM_LAYERS", 4), env("BENCH_VIT_LAYERS", 4));
    let (seq, tiles) = (env("BENCH_SEQ", 512), env("BENCH_TILES", 1));
    let (steps, warmup, rounds) = (env("BENCH_STEPS", 5), env("BENCH_WARMUP", 2), env("BENCH_ROUNDS", 2));
    let threads = env("BENCH_THREADS", cores);
    tch::set_num_threads(threads as i32);
    let dir = tempfile::Builder::new().prefix("mm-bench-step-").tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    py(&[
        "make".into(),
        d.clone(),
        "--llm-layers".into(),
        llm.to_string(),
        "--vit-layers".into(),
        vit.to_string(),
        "--seq".into(),
        seq.to_string(),
        "--tiles".into(),
        tiles.to_string(),
    ]);
    println!(
        "one training step, fp32 CPU, {threads} threads: InternVL3-1B widths, {llm} LLM + {vit} ViT layers, \
         {tiles} tile(s), {seq} tokens; {steps} timed steps after {warmup} per side and round"
    );
    println!("{:>6} {:>16} {:>16} {:>8}", "round", "pytorch ms", "mm-engine ms", "ratio");
    let (mut all_py, mut all_mm) = (Vec::new(), Vec::new());
    let (mut py_rss, mut loss_pair) = (0u64, (f64::NAN, f64::NAN));
    for r in 0..rounds {
        let out = py(&[
            "time".into(),
            d.clone(),
            "--steps".into(),
            steps.to_string(),
            "--warmup".into(),
            warmup.to_string(),
            "--threads".into(),
            threads.to_string(),
        ]);
        let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or_default()).expect("python JSON");
        let p: Vec<f64> = v["step_ms"].as_array().expect("step_ms").iter().filter_map(|x| x.as_f64()).collect();
        py_rss = py_rss.max(v["peak_rss"].as_u64().unwrap_or(0));
        let m = engine_steps(dir.path(), steps, warmup);
        loss_pair = (v["loss"].as_f64().unwrap_or(f64::NAN), m.loss);
        let (mp, mm) = (median(&p), median(&m.step_ms));
        println!("{r:>6} {mp:>16.1} {mm:>16.1} {:>8.3}", mm / mp);
        all_py.extend(p);
        all_mm.extend(m.step_ms);
    }
    let (mp, mm) = (median(&all_py), median(&all_mm));
    println!("{:>6} {mp:>16.1} {mm:>16.1} {:>8.3}", "all", mm / mp);
    println!(
        "last step's loss: pytorch {:.6}, mm-engine {:.6} (same model, sample and optimizer: they should agree)",
        loss_pair.0, loss_pair.1
    );
    println!(
        "peak RSS: pytorch {:.0} MiB, mm-engine {:.0} MiB (this process, after {rounds} fresh models)",
        py_rss as f64 / 1048576.0,
        peak_rss_self() as f64 / 1048576.0
    );
    println!("ratio mm-engine / pytorch (median step): {:.3} (target ≤ 1.0)", mm / mp);
}
