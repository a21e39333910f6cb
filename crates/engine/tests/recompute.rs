//! Activation recomputation changes memory, not results: whole training runs of the built
//! `mm-engine` with `--recompute-granularity full` (uniform and block) and `selective`, alone
//! and with pipeline stages, tensor-parallel slices and data-parallel replicas, give the losses
//! and gradient norms of one process without recomputation within 1e-5 relative over 5
//! iterations, and bit for bit on one process (the same kernels on the same values). The tiny
//! model's ViT uses stochastic depth (drop path 0.3 on its last layer): a rerun that drew other
//! random masks than its forward differs by ~5e-6 here, which the exact comparison catches.

mod ranks;

use std::path::Path;

use ranks::{assert_steps_close, launch, steps, text};

const ITERS: u64 = 5;

/// A tiny model with 4 LLM layers, 2 ViT layers and drop path, and its data.
fn synth() -> &'static Path {
    ranks::synth_once("recompute", &["--llm-layers", "4", "--vit-drop-path-rate", "0.3"])
}

fn train_args(extra: &str) -> Vec<String> {
    ranks::tiny_train_args(
        synth(),
        true,
        &format!("--global-batch-size 4 --train-iters {ITERS} --clip-grad 0.5 --seed 5 {extra}"),
    )
}

/// One process, activations kept.
fn single() -> &'static Vec<(u64, f64, f64)> {
    ranks::single_once(&train_args(""), ITERS as usize)
}

/// Runs `world` ranks with `extra` and compares rank 0's losses and gradient norms with
/// [`single`]'s: equal on one process, within 1e-5 relative on more (other reduction orders);
/// returns the largest relative difference.
fn matches_single(world: usize, extra: &str) -> f64 {
    let tolerance = if world == 1 { 0.0 } else { 1e-5 };
    let outs = launch(world, &train_args(extra));
    let got = steps(&outs[0]);
    let worst = assert_steps_close(&format!("{extra}\n{}", text(&outs[0])), &got, single(), tolerance);
    eprintln!("{world} rank(s) {extra}: largest relative difference {worst:e}");
    worst
}

const UNIFORM: &str = "--recompute-granularity full --recompute-method uniform";
const BLOCK: &str = "--recompute-granularity full --recompute-method block";
const SELECTIVE: &str = "--recompute-granularity selective";

#[test]
fn full_uniform_in_groups_of_one_and_of_two_layers() {
    matches_single(1, &format!("{UNIFORM} --recompute-num-layers 1"));
    matches_single(1, &format!("{UNIFORM} --recompute-num-layers 2"));
}

#[test]
fn full_block_of_the_first_layers() {
    matches_single(1, &format!("{BLOCK} --recompute-num-layers 1"));
}

#[test]
fn selective_attention_core() {
    matches_single(1, SELECTIVE);
}

#[test]
fn full_uniform_on_two_pipeline_stages() {
    matches_single(
        2,
        &format!("--pipeline-model-parallel-size 2 --llm-pp-layers 3,1 {UNIFORM} --recompute-num-layers 2"),
    );
}

#[test]
fn full_block_on_interleaved_pipeline_stages() {
    matches_single(
        2,
        &format!(
            "--pipeline-model-parallel-size 2 --virtual-pipeline-model-parallel-size 2 --llm-pp-layers 1,1,1,1 \
             {BLOCK} --recompute-num-layers 1"
        ),
    );
}

#[test]
fn selective_on_two_pipeline_stages() {
    matches_single(2, &format!("--pipeline-model-parallel-size 2 {SELECTIVE}"));
}

/// The rerun repeats the tensor-parallel collectives of the forward (and sequence
/// parallelism's gathers) on every rank in the same order.
#[test]
fn full_uniform_with_sequence_parallel_tensor_slices() {
    matches_single(
        2,
        &format!("--tensor-model-parallel-size 2 --sequence-parallel {UNIFORM} --recompute-num-layers 1"),
    );
}

#[test]
fn selective_with_data_parallel_replicas_and_the_distributed_optimizer() {
    matches_single(2, &format!("--use-distributed-optimizer {SELECTIVE}"));
}

#[test]
fn inconsistent_recompute_flags_are_usage_errors() {
    for (flags, want) in [
        ("--recompute-granularity full", "needs --recompute-method uniform"),
        ("--recompute-granularity selective --recompute-method block", "go with full"),
        ("--recompute-granularity partial", "expected full or selective"),
        ("--recompute-method uniform", "need --recompute-granularity full"),
    ] {
        let o = ranks::engine().args(train_args(flags)).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{flags}: {}", text(&o));
        assert!(String::from_utf8_lossy(&o.stderr).contains(want), "{flags}: {}", text(&o));
    }
}

/// `--vit-drop-path-rate` overrides the checkpoint's rate (the launcher renders it from
/// `train.vit_drop_path_rate`): without drop path the same run gives other losses, and a rate
/// outside [0, 1) is a usage error.
#[test]
fn the_drop_path_flag_overrides_the_checkpoint() {
    let o = launch(1, &train_args("--vit-drop-path-rate 0"));
    let got = steps(&o[0]);
    assert_eq!(got.len(), ITERS as usize, "{}", text(&o[0]));
    assert!(got.iter().zip(single()).any(|(a, b)| a.1 != b.1), "drop path 0.3 and 0 trained alike: {got:?}");
    let o = ranks::engine().args(train_args("--vit-drop-path-rate 1.5")).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--vit-drop-path-rate 1.5"), "{}", text(&o));
}
