//! Model parallelism end to end: the built `mm-engine` binary as 2, 4 and 8 processes on
//! 127.0.0.1 (Gloo over loopback) on a tiny model with 4 LLM layers gives the single-process
//! losses and gradient norms within 1e-5: pipeline stages (1F1B, interleaved), tensor-parallel
//! slices (vocabulary-parallel embedding and loss, column/row-parallel attention and MLPs in
//! the ViT, projector and LLM), their combinations with data parallelism and the distributed
//! optimizer; saves resume exactly, on the same layout and on one process.

#[path = "../../../tests/fresh/mod.rs"]
mod fresh;
mod ranks;

use std::path::Path;
use std::process::Output;

use ranks::{engine, launch, steps, text};

/// A tiny model with 4 LLM layers and 2 ViT layers, and its data.
fn synth() -> &'static Path {
    ranks::synth_once("pp", &["--llm-layers", "4"])
}

fn train_args(extra: &str) -> Vec<String> {
    ranks::tiny_train_args(
        synth(),
        true,
        &format!("--global-batch-size 4 --train-iters 4 --clip-grad 0.5 --seed 11 {extra}"),
    )
}

fn single() -> &'static Vec<(u64, f64, f64)> {
    ranks::single_once(&train_args(""), 4)
}

/// Runs `world` ranks with `extra` and compares rank 0's losses and norms with one process's.
fn matches_single(world: usize, extra: &str) -> Vec<Output> {
    let outs = launch(world, &train_args(extra));
    let got = steps(&outs[0]);
    let want = single();
    assert_eq!(got.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3, 4], "{}", text(&outs[0]));
    for ((i, l, n), (_, wl, wn)) in got.iter().zip(want) {
        let (rl, rn) = ((l - wl).abs() / wl.abs(), (n - wn).abs() / wn.abs());
        assert!(
            rl <= 1e-5 && rn <= 1e-5,
            "{extra}: iteration {i}: loss {l} vs {wl} ({rl:e}), norm {n} vs {wn} ({rn:e})"
        );
        eprintln!("{extra}: iteration {i}: loss rel diff {rl:e}, grad norm rel diff {rn:e}");
    }
    // Only rank 0 reports progress; every rank logs the same loss line.
    for o in &outs[1..] {
        assert!(steps(o).is_empty());
        assert!(String::from_utf8_lossy(&o.stdout).contains(" iteration        4/       4"), "{}", text(o));
    }
    outs
}

#[test]
fn two_stages_one_f_one_b() {
    let outs = matches_single(2, "--pipeline-model-parallel-size 2 --llm-pp-layers 3,1 --vit-pp-layers 2,0");
    let out = String::from_utf8_lossy(&outs[0].stdout);
    assert!(out.contains("theoretical bubble 20.0%"), "{out}");
    for (r, o) in outs.iter().enumerate() {
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.contains(&format!("pipeline stage {r} of 2: ")) && out.contains("(measured bubble; theoretical 20.0%)"),
            "{out}"
        );
    }
}

#[test]
fn four_stages_one_layer_each() {
    matches_single(4, "--pipeline-model-parallel-size 4 --llm-pp-layers 1,1,1,1");
}

#[test]
fn two_stages_interleaved_over_two_virtual_stages() {
    matches_single(
        2,
        "--pipeline-model-parallel-size 2 --virtual-pipeline-model-parallel-size 2 --llm-pp-layers 1,1,1,1",
    );
}

#[test]
fn two_replicas_of_two_stages_with_the_distributed_optimizer() {
    matches_single(4, "--pipeline-model-parallel-size 2 --use-distributed-optimizer");
}

#[test]
fn two_tensor_parallel_ranks() {
    let outs = matches_single(2, "--tensor-model-parallel-size 2");
    // Each rank holds its slices: fewer parameters than the whole model.
    let whole = params(&launch(1, &train_args(""))[0]);
    for o in &outs {
        let mine = params(o);
        assert!(mine < whole * 3 / 4, "a tensor-parallel rank holds {mine} of {whole} parameters");
    }
}

#[test]
fn two_tensor_parallel_ranks_with_sequence_parallelism() {
    matches_single(2, "--tensor-model-parallel-size 2 --sequence-parallel");
}

#[test]
fn sequence_parallel_tensor_ranks_on_two_pipeline_stages() {
    matches_single(4, "--tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 2");
}

#[test]
fn two_tensor_parallel_ranks_on_two_pipeline_stages() {
    matches_single(4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2");
}

#[test]
fn two_replicas_of_two_stages_of_two_tensor_parallel_ranks_with_the_distributed_optimizer() {
    matches_single(
        8,
        "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --llm-pp-layers 2,2 --use-distributed-optimizer",
    );
}

/// The parameter count a rank reports.
fn params(o: &Output) -> u64 {
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out.lines().find(|l| l.starts_with("mm-engine train: model")).expect("the start line");
    let n = line.split('(').nth(1).and_then(|s| s.split_whitespace().next()).expect("a parameter count");
    n.parse().unwrap()
}

#[test]
fn a_vit_off_the_first_chunk_is_refused_by_name() {
    let o = engine().args(train_args("--pipeline-model-parallel-size 2 --vit-pp-layers 1,1")).output().unwrap();
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("--vit-pp-layers 1,1: mm-engine runs data, tensor (with sequence parallelism)"), "{t}");
    assert!(t.contains("WORLD_SIZE 1 is not a multiple of tensor × context × pipeline parallel size 2"), "{t}");
}

/// Per-stage saves: every stage writes its rank folder of one MM checkpoint (one manifest), a
/// stopped pipeline run resumes exactly, and the same save resumes on one process (the stages'
/// shards merge) with the same losses.
#[test]
fn pipeline_saves_resume_exactly_on_the_same_split_and_on_one_process() {
    let work = tempfile::tempdir().unwrap();
    for (world, flags) in [
        (2, "--pipeline-model-parallel-size 2 --llm-pp-layers 3,1"),
        (4, "--pipeline-model-parallel-size 2 --use-distributed-optimizer"),
        (4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2"),
    ] {
        let save = work.path().join(format!("save-{world}"));
        let with_save = |extra: &str| {
            let mut a = train_args(&format!("{flags} {extra}"));
            a.push("--save".into());
            a.push(save.display().to_string());
            a
        };
        let first = launch(world, &with_save("--exit-interval 2"));
        let second = launch(world, &with_save("--auto-resume"));
        let got = [steps(&first[0]), steps(&second[0])].concat();
        let want = single();
        assert_eq!(got.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3, 4], "{}", text(&second[0]));
        for ((i, l, _), (_, wl, _)) in got.iter().zip(want) {
            assert!((l - wl).abs() / wl.abs() <= 1e-5, "{flags}: iteration {i}: resumed {l} vs {wl}");
        }
        // Exact: the same layout run without a stop gives the same bits.
        let straight = steps(&launch(world, &train_args(flags))[0]);
        for ((i, l, n), (_, sl, sn)) in got.iter().zip(&straight) {
            assert_eq!(
                (l.to_bits(), n.to_bits()),
                (sl.to_bits(), sn.to_bits()),
                "{flags}: iteration {i}: resumed vs straight"
            );
        }
        let iter = save.join("iter_0000004");
        let tp = if flags.contains("--tensor-model-parallel-size 2") { 2 } else { 1 };
        for t in 0..tp {
            for stage in 0..2 {
                let dir = mm_spec::checkpoint::rank_dir_name(t, stage, 2);
                assert!(iter.join(&dir).join("model.safetensors").is_file(), "{dir} of {}", iter.display());
            }
        }
        let manifest: mm_spec::checkpoint::Manifest =
            serde_json::from_str(&std::fs::read_to_string(iter.join("manifest.json")).unwrap()).unwrap();
        manifest.verify().unwrap();
        assert_eq!((manifest.parallel.tp, manifest.parallel.pp), (tp, 2));

        // The iteration-2 save on one process: the stages' weights (and, per parameter, their
        // optimizer states) merge; the distributed optimizer's shards need the split they were
        // saved with, so that one resumes weights only.
        // (Per-parameter optimizer states of tensor-parallel slices need their layout too.)
        let weights_only = flags.contains("--use-distributed-optimizer") || tp > 1;
        let mut a = train_args(if weights_only { "--no-load-optim" } else { "" });
        let at = a.iter().position(|x| x == "--load").unwrap() + 1;
        a[at] = save.join("iter_0000002").display().to_string();
        let one = launch(1, &a);
        let s = steps(&one[0]);
        assert_eq!(s.iter().map(|s| s.0).collect::<Vec<_>>(), [3, 4], "{}", text(&one[0]));
        if tp > 1 {
            exports_like_the_checkpoint(&iter, work.path());
        }
        if !weights_only {
            for ((i, l, _), (_, wl, _)) in s.iter().zip(&want[2..]) {
                assert!(
                    (l - wl).abs() / wl.abs() <= 1e-5,
                    "one process from the pipeline save: iteration {i}: {l} vs {wl}"
                );
            }
        }
    }
}

/// MindSpeed's unaligned split: a ViT with 5 heads on 2 tensor-parallel ranks (3 + 2 heads, as
/// InternViT-6B's 25 on 8 are 4,3,…) gives one process's losses; without `--unaligned-linear`
/// the split is refused by name.
#[test]
fn odd_vit_heads_split_unevenly_with_unaligned_linear() {
    let dir = tempfile::tempdir().unwrap();
    let o = engine()
        .args(["synth", "--llm-layers", "2", "--vit-heads", "5", "--samples", "8", "--no-video", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let args = |extra: &str| {
        let mut a = train_args(extra);
        for (flag, sub) in [
            ("--data-path", "data/train.jsonl"),
            ("--data-folder", "data"),
            ("--tokenizer", "model"),
            ("--load", "model"),
        ] {
            let at = a.iter().position(|x| x == flag).unwrap() + 1;
            a[at] = dir.path().join(sub).display().to_string();
        }
        a
    };
    let one = steps(&launch(1, &args(""))[0]);
    let outs = launch(2, &args("--tensor-model-parallel-size 2 --unaligned-linear"));
    let two = steps(&outs[0]);
    assert_eq!(one.len(), 4);
    assert_eq!(two.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3, 4]);
    for ((i, l, n), (_, wl, wn)) in two.iter().zip(&one) {
        let (rl, rn) = ((l - wl).abs() / wl.abs(), (n - wn).abs() / wn.abs());
        assert!(rl <= 1e-5 && rn <= 1e-5, "iteration {i}: loss {l} vs {wl} ({rl:e}), norm {n} vs {wn} ({rn:e})");
    }
    let port = ranks::free_port();
    let children: Vec<_> = (0..2)
        .map(|r| ranks::rank_cmd(r, 2, port, 30, &args("--tensor-model-parallel-size 2")).spawn().unwrap())
        .collect();
    let outs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let t = text(&outs[0]);
    assert!(!outs[0].status.success(), "{t}");
    assert!(t.contains("5 ViT attention heads are not divisible by tp 2: enable unaligned_linear"), "{t}");
}

/// An mm-convert output split for the run's layout (TP 2 × PP 2) loads shard by shard (each
/// rank reads its own file) and another layout of it (one process) merges the shards: both give
/// the HF folder's losses.
#[test]
fn a_converted_checkpoint_loads_on_its_own_layout_and_on_another() {
    let profile_dir = Path::new(env!("CARGO_BIN_EXE_mm-engine")).parent().unwrap();
    let convert = fresh::binary(profile_dir, "mm-convert", "mm-convert", &["crates/convert/src", "crates/spec/src"]);
    let work = tempfile::tempdir().unwrap();
    let mm = work.path().join("mm");
    let o = std::process::Command::new(&convert)
        .args(["hf-to-mm", "--tp", "2", "--llm-pp-layers", "2,2", "--vit-pp-layers", "2,0", "--hf-dir"])
        .arg(synth().join("model"))
        .arg("--mm-dir")
        .arg(&mm)
        .output()
        .unwrap();
    assert!(o.status.success(), "mm-convert: {}", text(&o));
    assert!(mm.join("release/mp_rank_01_001/model.safetensors").is_file());
    let with_load = |extra: &str| {
        let mut a = train_args(extra);
        let at = a.iter().position(|x| x == "--load").unwrap() + 1;
        a[at] = mm.display().to_string();
        a
    };
    let want = single();
    for (world, extra) in
        [(4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --llm-pp-layers 2,2"), (1, "")]
    {
        let got = steps(&launch(world, &with_load(extra))[0]);
        assert_eq!(got.len(), 4);
        for ((i, l, _), (_, wl, _)) in got.iter().zip(want) {
            assert!(
                (l - wl).abs() / wl.abs() <= 1e-5,
                "{world} ranks from the TP2xPP2 conversion: iteration {i}: {l} vs {wl}"
            );
        }
    }
}

/// `mm-convert mm-to-hf` exports a tensor/pipeline-parallel save: the HF folder evaluates to
/// exactly the per-sample losses of the save itself (same weights, merged two ways).
fn exports_like_the_checkpoint(iter: &Path, work: &Path) {
    let profile_dir = Path::new(env!("CARGO_BIN_EXE_mm-engine")).parent().unwrap();
    let convert = fresh::binary(profile_dir, "mm-convert", "mm-convert", &["crates/convert/src", "crates/spec/src"]);
    let export = work.join("export");
    let o = std::process::Command::new(&convert)
        .args(["mm-to-hf", "--mm-dir"])
        .arg(iter)
        .arg("--hf-dir")
        .arg(&export)
        .output()
        .unwrap();
    assert!(o.status.success(), "mm-to-hf: {}", text(&o));
    let eval = |load: &Path| {
        let d = synth();
        let o = engine()
            .args(["eval", "--load"])
            .arg(load)
            .arg("--data")
            .arg(d.join("data/train.jsonl"))
            .arg("--data-folder")
            .arg(d.join("data"))
            .args(["--max-dynamic-patch", "1", "--use-thumbnail", "--limit", "4", "--device", "cpu"])
            .output()
            .unwrap();
        assert!(o.status.success(), "eval {}: {}", load.display(), text(&o));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with("sample "))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let (from_save, from_export) = (eval(iter), eval(&export));
    assert_eq!(from_save.len(), 4, "{from_save:?}");
    assert_eq!(from_save, from_export, "the export of the TP x PP save evaluates differently");
}

/// `--eval-interval` runs through the pipeline stages and tensor-parallel slices: the validation
/// losses are one process's.
#[test]
fn evaluation_runs_through_stages_and_slices() {
    let eval = "--eval-interval 2 --eval-iters 3";
    let validation = ranks::validation_losses;
    let want = validation(&launch(1, &train_args(eval))[0]);
    assert_eq!(want.len(), 2, "two evaluations in 4 iterations");
    for (world, extra) in [(2, "--pipeline-model-parallel-size 2"), (2, "--tensor-model-parallel-size 2")] {
        let got = validation(&launch(world, &train_args(&format!("{eval} {extra}")))[0]);
        assert_eq!(got.len(), 2, "{extra}");
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() / w.abs() <= 1e-5, "{extra}: validation loss {g} vs {w}");
        }
    }
}

/// A save folder the ranks do not share (here: rank 1 writes elsewhere) is found incomplete
/// before anything is committed, on every rank, with the reason: a pipeline stage's weights,
/// and a data-parallel rank's distributed-optimizer shard.
#[test]
fn a_save_folder_that_is_not_shared_commits_nothing() {
    for (flags, lost) in [
        ("--pipeline-model-parallel-size 2", "mp_rank_00_001/model.safetensors"),
        ("--use-distributed-optimizer", "mp_rank_00/optimizer.dp1-of-2.safetensors"),
    ] {
        let work = tempfile::tempdir().unwrap();
        let (shared, elsewhere) = (work.path().join("save"), work.path().join("elsewhere"));
        let port = ranks::free_port();
        let children: Vec<_> = (0..2)
            .map(|r| {
                let mut a = train_args(&format!("{flags} --exit-interval 1"));
                a.push("--save".into());
                a.push(if r == 0 { &shared } else { &elsewhere }.display().to_string());
                ranks::rank_cmd(r, 2, port, 30, &a).spawn().unwrap()
            })
            .collect();
        let outs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
        for o in &outs {
            assert!(!o.status.success(), "{flags}: {}", text(o));
            assert!(text(o).contains("did not reach rank 0's view of --save"), "{flags}: {}", text(o));
        }
        assert!(text(&outs[0]).contains(lost), "{flags}: {}", text(&outs[0]));
        assert!(
            !shared.join("latest_checkpointed_iteration.txt").exists(),
            "{flags}: an incomplete checkpoint was committed"
        );
        // Rank 0's metrics.jsonl (mm-engine alone keeps it beside the checkpoints) is all.
        let leftovers: Vec<_> = std::fs::read_dir(&shared)
            .map(|d| d.flatten().map(|e| e.file_name()).filter(|n| n != "metrics.jsonl").collect())
            .unwrap_or_default();
        assert!(leftovers.is_empty(), "{flags}: the temporary folder stays behind: {leftovers:?}");
    }
}
