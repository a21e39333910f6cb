//! Per-rank peak memory and step time of context parallelism, CP1 against CP2 with the keys and
//! values all-gathered and around a ring, side by side in one run.
//!
//!   cargo bench -p mm-engine --bench context_parallel
//!
//! A random InternVL with InternVL3-2B's widths (LLM 1536 wide, 12 query / 2 key-value heads,
//! MLP 8960) at a reduced depth, one text sample of BENCH_SEQ (8192) tokens, fp32 on the CPU,
//! vocabulary cut to BENCH_VOCAB (8192) as in the recompute bench. Each setting runs as its own
//! ranks: child processes of this executable, rendezvoused over 127.0.0.1 (Gloo), which build
//! the same model from the same seed and split the sequence with mm-engine's `model::cp`. The
//! cores are shared out (CP1: all of them to its rank; CP2: half to each), so the step times
//! compare the same machine.
//!
//! Each setting runs twice, as ranks that measure the peak and as ranks that measure the time
//! (as the recompute bench does); each rank does one warm-up step of forward, loss and backward,
//! then BENCH_STEPS measured ones. The peak is the high-water mark of resident memory during a
//! step (reset through /proc/self/clear_refs) above the resident size before it, in processes
//! that return large blocks to the system at once (MALLOC_MMAP_THRESHOLD_, so the resident size
//! follows the live tensors); the time is the wall clock of the step, with the default
//! allocator (whose reuse of freed blocks the mmap churn of the first would deny). Printed per setting: the largest rank peak, its ratio to CP1, the launcher's estimate
//! (`mm_spec::memory`, for the same exchange) and its ratio to the peak, the median step time
//! and its ratio to CP1, and the loss (the same for all: a check).
//!
//! Environment: BENCH_LLM_LAYERS (2), BENCH_SEQ (8192), BENCH_VOCAB (8192), BENCH_STEPS (1).

mod common;

use std::process::Command;

use common::{env, estimate_mib, measured_step, median, preset_2b};

use mm_engine::dist::env::DistEnv;
use mm_engine::model::cp::{Cp, KvExchange};
use mm_engine::model::{InternVL, ModelInput};
use mm_engine::train::loss::{model_sample_losses, objective, LossReduction, StepTotals};
use mm_engine::train::parallel::Parallel;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// One rank: prints one JSON line {"peak_mib": [...], "secs": [...], "loss": x}.
fn rank() {
    let (layers, seq, vocab) = (env("BENCH_LLM_LAYERS", 2), env("BENCH_SEQ", 8192), env("BENCH_VOCAB", 8192));
    let steps = env("BENCH_STEPS", 1);
    let de = DistEnv::from_process().expect("the rank's environment");
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    tch::set_num_threads((cores / de.world_size).max(1) as i32);
    let par = Parallel::init(&de, Device::Cpu, 1, de.world_size, 1, None).expect("the context-parallel group");
    let preset = preset_2b(layers, vocab);
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    // No image in the sample: the context token id is outside the vocabulary.
    let mut model = InternVL::new(&vs.root(), &preset, vocab as i64 + 1, false);
    let exchange: KvExchange =
        std::env::var("CP_BENCH_EXCHANGE").unwrap_or_default().parse().unwrap_or(KvExchange::Ring);
    model.set_context_parallel(par.cp_group().map(|g| Cp::new(g, exchange)).unwrap_or_else(Cp::single));
    let ids = Tensor::randint(vocab as i64, [1, seq as i64], (Kind::Int64, Device::Cpu));
    let input = ModelInput {
        input_ids: ids.shallow_clone(),
        attention_mask: Tensor::ones([1, seq as i64], (Kind::Int64, Device::Cpu)),
        pixel_values: None,
    };
    let (mut peaks, mut secs, mut loss) = (Vec::new(), Vec::new(), 0.0);
    for i in 0..=steps {
        let (peak, dt) = measured_step(&vs, || {
            let logits = model.forward(&input, true).expect("forward");
            let l = model_sample_losses(&model.language_model, &logits, &ids).expect("loss");
            drop(logits);
            let totals = StepTotals { micro_batches: 1, samples: 1, tokens: l.counts.iter().sum() };
            let obj = objective(LossReduction::Default, &l, totals);
            obj.backward();
            // This rank's part of the loss; the sum over the ranks is the sample's.
            loss = par.sum(&[obj.double_value(&[])], "the loss of the sample").expect("loss sum")[0];
        });
        if i > 0 {
            peaks.push(peak);
            secs.push(dt);
        }
    }
    println!("{}", serde_json::json!({ "peak_mib": peaks, "secs": secs, "loss": loss }));
}

fn main() {
    if std::env::var("CP_BENCH_RANK").is_ok() {
        rank();
        return;
    }
    let (layers, seq, vocab) = (env("BENCH_LLM_LAYERS", 2), env("BENCH_SEQ", 8192), env("BENCH_VOCAB", 8192));
    println!(
        "forward + loss + backward, fp32 CPU: InternVL3-2B widths, {layers} LLM layers, vocabulary {vocab}, one \
         text sample of {seq} tokens; median over BENCH_STEPS steps after one warm-up, the cores shared by the ranks"
    );
    println!(
        "{:<16} {:>15} {:>8} {:>13} {:>9} {:>9} {:>8} {:>10}",
        "setting", "rank peak MiB", "÷ (cp1)", "estimate MiB", "est/peak", "step s", "× (cp1)", "loss"
    );
    let exe = std::env::current_exe().expect("this bench's path");
    let model = preset_2b(layers, vocab);
    let mut base: Option<(f64, f64)> = None;
    for (cp, exchange) in [(1usize, KvExchange::Ring), (2, KvExchange::AllGather), (2, KvExchange::Ring)] {
        let run = |what: &str| -> Vec<serde_json::Value> {
            let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().unwrap().port();
            let children: Vec<_> = (0..cp)
                .map(|r| {
                    let mut c = Command::new(&exe);
                    c.env("CP_BENCH_RANK", r.to_string())
                        .env("CP_BENCH_EXCHANGE", exchange.name())
                        .env("RANK", r.to_string())
                        .env("LOCAL_RANK", r.to_string())
                        .env("WORLD_SIZE", cp.to_string())
                        .env("LOCAL_WORLD_SIZE", cp.to_string())
                        .env("MASTER_ADDR", "127.0.0.1")
                        .env("MASTER_PORT", port.to_string())
                        .stdout(std::process::Stdio::piped());
                    if what == "peak" {
                        c.env("MALLOC_MMAP_THRESHOLD_", "65536");
                    } else {
                        c.env_remove("MALLOC_MMAP_THRESHOLD_");
                    }
                    c.spawn().expect("start a rank")
                })
                .collect();
            children
                .into_iter()
                .map(|c| {
                    let o = c.wait_with_output().expect("a rank");
                    assert!(o.status.success(), "cp {cp}: a rank failed");
                    let out = String::from_utf8_lossy(&o.stdout);
                    serde_json::from_str(out.lines().last().unwrap_or_default()).expect("rank JSON")
                })
                .collect()
        };
        let (peaks, times) = (run("peak"), run("time"));
        let nums = |v: &serde_json::Value, k: &str| -> Vec<f64> {
            v[k].as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default()
        };
        let peak = peaks.iter().map(|o| median(&nums(o, "peak_mib"))).fold(0.0, f64::max);
        let secs = times.iter().map(|o| median(&nums(o, "secs"))).fold(0.0, f64::max);
        let (p0, s0) = *base.get_or_insert((peak, secs));
        let est = estimate_mib(&model, cp, exchange == KvExchange::AllGather, seq, None);
        let name = if cp == 1 { "cp 1".to_string() } else { format!("cp {cp} {}", exchange.name()) };
        println!(
            "{name:<16} {peak:>15.0} {:>8.2} {est:>13.0} {:>9.2} {secs:>9.2} {:>8.2} {:>10.6}",
            p0 / peak,
            est / peak,
            secs / s0,
            times[0]["loss"].as_f64().unwrap_or(f64::NAN)
        );
    }
}
