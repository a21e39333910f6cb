//! Context parallelism end to end: the built `mm-engine` as 2 and 4 processes on 127.0.0.1
//! (Gloo over loopback) splits each sample's sequence into 2·cp load-balanced chunks and gives
//! the single-process losses and gradient norms within 1e-5 relative over 5 iterations, alone
//! (CP 2 and CP 4) and with tensor-parallel slices (sequence parallelism), pipeline stages,
//! data-parallel replicas with the distributed optimizer, and recomputation, with the keys and
//! values around a ring (the default) or all-gathered; a save resumes exactly. The
//! tiny model's samples have every length, so most batches are padded to a multiple of 2·cp and
//! chunks of both real and padding tokens occur. The ViT keeps drop path (0.3 on its last
//! layer): context-parallel ranks must draw the same masks for the same micro batch.

mod ranks;

use std::path::Path;

use ranks::{assert_steps_close, launch, steps, text, validation_losses};

const ITERS: u64 = 5;

/// A tiny model with 4 LLM layers, 2 ViT layers and drop path, and its data.
fn synth() -> &'static Path {
    ranks::synth_once("cp", &["--llm-layers", "4", "--vit-drop-path-rate", "0.3"])
}

fn train_args(extra: &str) -> Vec<String> {
    ranks::tiny_train_args(
        synth(),
        true,
        &format!("--global-batch-size 4 --train-iters {ITERS} --clip-grad 0.5 --seed 7 {extra}"),
    )
}

/// One process, the whole sequence.
fn single() -> &'static Vec<(u64, f64, f64)> {
    ranks::single_once(&train_args(""), ITERS as usize)
}

/// Runs `world` ranks with `extra` and compares rank 0's losses and gradient norms with one
/// process's, within 1e-5 relative; returns rank 0's steps.
fn matches_single(world: usize, extra: &str) -> Vec<(u64, f64, f64)> {
    let outs = launch(world, &train_args(extra));
    let got = steps(&outs[0]);
    let worst = assert_steps_close(&format!("{extra}\n{}", text(&outs[0])), &got, single(), 1e-5);
    let log = String::from_utf8_lossy(&outs[0].stdout);
    let cp = if extra.contains("--context-parallel-size 4") { 4 } else { 2 };
    let exchange = if extra.contains("all-gather") { "all-gathered" } else { "around a ring" };
    let want = format!(
        "the sequence in {} load-balanced chunks over {cp} ranks (megatron_cp_algo; keys and values {exchange})",
        2 * cp
    );
    assert!(log.contains(&want), "{log}");
    eprintln!("{world} ranks {extra}: largest relative difference {worst:e}");
    got
}

const CP2: &str = "--context-parallel-size 2";

#[test]
fn two_context_parallel_ranks() {
    matches_single(2, &format!("{CP2} --context-parallel-algo megatron_cp_algo"));
}

/// The ring in tiles of a few query rows (MM_RING_TILE_SCORES; the default tile holds the tiny
/// model's whole block), some of them skipped where no query sees a key of the block.
#[test]
fn ring_blocks_in_tiles_of_query_rows() {
    let outs = ranks::launch_with(2, &train_args(CP2), &[("MM_RING_TILE_SCORES", "4096")]);
    assert_steps_close(&format!("tiles\n{}", text(&outs[0])), &steps(&outs[0]), single(), 1e-5);
}

/// Four ranks: each holds two of 8 chunks, and the ring takes three hops (odd and even ranks
/// post their transfers in opposite orders).
#[test]
fn four_context_parallel_ranks() {
    matches_single(4, "--context-parallel-size 4");
}

/// The all-gather exchange (every rank attends to the whole sequence's keys and values) alone
/// and with sequence-parallel tensor slices.
#[test]
fn all_gathered_keys_and_values() {
    matches_single(2, &format!("{CP2} --cp-kv-exchange all-gather"));
    matches_single(4, &format!("{CP2} --cp-kv-exchange all-gather --tensor-model-parallel-size 2 --sequence-parallel"));
}

#[test]
fn context_parallel_ranks_of_sequence_parallel_tensor_slices() {
    matches_single(4, &format!("{CP2} --tensor-model-parallel-size 2 --sequence-parallel"));
}

#[test]
fn context_parallel_ranks_on_two_pipeline_stages() {
    matches_single(4, &format!("{CP2} --pipeline-model-parallel-size 2"));
}

/// Gradients are summed and the optimizer sharded over data × context (4 shards), the data
/// split over the 2 data-parallel ranks only.
#[test]
fn data_parallel_replicas_of_context_parallel_ranks_with_the_distributed_optimizer() {
    matches_single(4, &format!("{CP2} --use-distributed-optimizer"));
}

/// The rerun of a layer repeats its key/value all-gather on every context-parallel rank.
#[test]
fn context_parallel_ranks_with_full_and_selective_recomputation() {
    matches_single(
        2,
        &format!("{CP2} --recompute-granularity full --recompute-method uniform --recompute-num-layers 2"),
    );
    matches_single(2, &format!("{CP2} --recompute-granularity selective"));
}

/// Micro batches of two samples (the shorter one padded), the per-sample and per-token loss
/// reductions (their counts are the whole samples', which every context-parallel rank reads from
/// the labels) and evaluation (each rank scores its part of the sequence): one process's losses,
/// gradient norms and validation losses within 1e-5.
#[test]
fn two_sample_micro_batches_the_other_loss_reductions_and_evaluation() {
    for reduction in ["per_sample", "per_token"] {
        let args = |extra: &str| {
            let mut a = train_args(&format!("--loss-reduction {reduction} --eval-interval 2 --eval-iters 3 {extra}"));
            let at = a.iter().position(|x| x == "--micro-batch-size").unwrap() + 1;
            a[at] = "2".into();
            a
        };
        let one = launch(1, &args(""));
        let cp = launch(2, &args(CP2));
        let want = steps(&one[0]);
        assert_eq!(want.len(), ITERS as usize, "{}", text(&one[0]));
        assert_steps_close(&format!("{reduction}\n{}", text(&cp[0])), &steps(&cp[0]), &want, 1e-5);
        let (want, got) = (validation_losses(&one[0]), validation_losses(&cp[0]));
        assert_eq!((want.len(), got.len()), (2, 2), "{reduction}: {}", text(&cp[0]));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() / w.abs() <= 1e-5, "{reduction}: validation loss {g} vs {w}");
        }
    }
}

/// A save at iteration 2 resumes to the bits of the run that did not stop.
#[test]
fn context_parallel_saves_resume_exactly() {
    let work = tempfile::tempdir().unwrap();
    let save = work.path().join("save");
    let with_save = |extra: &str| {
        let mut a = train_args(&format!("{CP2} --use-distributed-optimizer {extra}"));
        a.extend(["--save".to_string(), save.display().to_string()]);
        a
    };
    let first = launch(4, &with_save("--exit-interval 2"));
    let second = launch(4, &with_save("--auto-resume"));
    let got = [steps(&first[0]), steps(&second[0])].concat();
    assert_eq!(got.iter().map(|s| s.0).collect::<Vec<_>>(), (1..=ITERS).collect::<Vec<_>>(), "{}", text(&second[0]));
    let straight = steps(&launch(4, &train_args(&format!("{CP2} --use-distributed-optimizer")))[0]);
    for ((i, l, n), (_, sl, sn)) in got.iter().zip(&straight) {
        assert_eq!((l.to_bits(), n.to_bits()), (sl.to_bits(), sn.to_bits()), "iteration {i}: resumed vs straight");
    }
    let manifest: mm_spec::checkpoint::Manifest =
        serde_json::from_str(&std::fs::read_to_string(save.join("iter_0000005/manifest.json")).unwrap()).unwrap();
    manifest.verify().unwrap();
}

#[test]
fn other_context_parallel_algorithms_are_refused_by_name() {
    let o =
        ranks::engine().args(train_args(&format!("{CP2} --context-parallel-algo ulysses_cp_algo"))).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--context-parallel-algo ulysses_cp_algo: mm-engine runs"), "{err}");
}
