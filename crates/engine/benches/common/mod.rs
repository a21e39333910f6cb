//! What the memory benches share: the environment knobs, the 2B-wide model, one measured step
//! (resident high-water mark and wall clock), and the launcher's estimate to print beside it.

#![allow(dead_code)]

use std::time::Instant;

use mm_engine::model::recompute::Recompute;
use tch::nn::VarStore;

pub fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// InternVL3-2B's widths with `layers` LLM layers, one ViT layer and a `vocab`-token vocabulary.
pub fn preset_2b(layers: usize, vocab: usize) -> mm_spec::ModelPreset {
    let mut p = mm_spec::preset("2b").expect("the 2b preset");
    p.llm.num_hidden_layers = layers;
    p.llm.vocab_size = vocab;
    p.vision.num_hidden_layers = 1;
    p
}

/// Runs `step` (forward, loss, backward) and returns (the resident memory's high-water mark
/// during it above the resident size before it, in MiB; its seconds), then zeroes the gradients
/// of `vs` for the next one.
pub fn measured_step(vs: &VarStore, step: impl FnOnce()) -> (f64, f64) {
    let before = status_kib("VmRSS:");
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let t0 = Instant::now();
    step();
    let secs = t0.elapsed().as_secs_f64();
    let peak = status_kib("VmHWM:").saturating_sub(before) as f64 / 1024.0;
    for (_, v) in vs.variables() {
        let mut g = v.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    (peak, secs)
}

/// The launcher's estimate (`mm_spec::memory`) of a rank's step peak above the model and its
/// gradients, in MiB: one text sample of `seq` tokens in fp32, `cp` context-parallel ranks
/// (keys and values all-gathered when `gathers_kv`, else around a ring), recomputation `r`.
pub fn estimate_mib(
    model: &mm_spec::ModelPreset,
    cp: usize,
    gathers_kv: bool,
    seq: usize,
    r: Option<Recompute>,
) -> f64 {
    let chunks = [model.llm.num_hidden_layers];
    let input = mm_spec::memory::MemoryInput {
        model,
        tp: 1,
        cp,
        pp: 1,
        dp: 1,
        vpp: 1,
        llm_chunks: &chunks,
        micro_batch: 1,
        grad_accumulation: 1,
        seq_length: seq,
        tiles_per_sample: 0,
        element_bytes: 4,
        distributed_optimizer: false,
        sequence_parallel: false,
        recompute: r,
        freeze_vision: false,
        freeze_projector: false,
        freeze_llm: false,
        drop_path: false,
        vit_recompute: true,
        cp_gathers_kv: gathers_kv,
    };
    let s = input.estimate().peak().expect("one pipeline stage");
    (s.activations + s.transient) / 1048576.0
}
