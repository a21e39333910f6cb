//! The `mm-engine` binary end to end on `mm-engine synth` output: training, exact resume,
//! the checkpoint format, eval, bad data, flag checks, and a tiny model that learns.

#[path = "../../../tests/fresh/mod.rs"]
mod fresh;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use mm_spec::checkpoint::{Iteration, Manifest};
use mm_spec::ProgressEvent;

fn engine() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mm-engine"));
    c.env_remove("WORLD_SIZE");
    c
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn run_ok(c: &mut Command) -> Output {
    let o = c.output().expect("run mm-engine");
    assert!(o.status.success(), "mm-engine failed:\n{}", text(&o));
    o
}

/// One synthetic model + data set (with a video) for all tests of this binary.
fn synth() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mm-engine-train");
        let _ = std::fs::remove_dir_all(&dir);
        run_ok(engine().args(["synth", "--out"]).arg(&dir).args(["--samples", "16"]));
        dir
    })
}

/// Flags shared by the training runs (the launcher's tiny recipe, shrunk).
fn train_cmd(extra: &str) -> Command {
    let d = synth();
    let mut c = engine();
    c.arg("train")
        .args(["--model", "tiny", "--data-path"])
        .arg(d.join("data/train.jsonl"))
        .arg("--data-folder")
        .arg(d.join("data"))
        .arg("--tokenizer")
        .arg(d.join("model"))
        .args(["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1"])
        .args(["--context-parallel-size", "1", "--use-distributed-optimizer"])
        .args(["--seq-length", "512", "--use-thumbnail"])
        .args(["--min-num-frame", "2", "--max-num-frame", "4", "--log-interval", "1", "--log-tps"])
        .args(extra.split_whitespace());
    c
}

fn steps(o: &Output) -> Vec<(u64, f64)> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| match ProgressEvent::parse(l)? {
            Ok(ProgressEvent::Step(p)) => Some((p.iteration, p.loss)),
            _ => None,
        })
        .collect()
}

#[test]
fn resume_gives_bit_identical_losses_and_weights() {
    let d = synth();
    let work = tempfile::tempdir().unwrap();
    let common = "--micro-batch-size 2 --grad-accumulation 2 --global-batch-size 4 --train-iters 6 --lr 0.002 \
        --min-lr 0.0002 --lr-decay-style cosine --lr-warmup-fraction 0.2 --weight-decay 0.05 --clip-grad 1.0 --seed 7 \
        --freeze-vision --max-dynamic-patch 2";
    let load = d.join("model");
    let straight = work.path().join("straight");
    let a =
        run_ok(train_cmd(common).arg("--load").arg(&load).arg("--save").arg(&straight).args(["--save-interval", "3"]));
    let resumed = work.path().join("resumed");
    let b1 =
        run_ok(train_cmd(common).arg("--load").arg(&load).arg("--save").arg(&resumed).args(["--exit-interval", "3"]));
    assert!(text(&b1).contains("exiting at iteration 3"), "{}", text(&b1));
    assert_eq!(std::fs::read_to_string(resumed.join("latest_checkpointed_iteration.txt")).unwrap(), "3");
    let tb = work.path().join("tb");
    let b2 = run_ok(
        train_cmd(common).arg("--load").arg(&resumed).arg("--save").arg(&resumed).arg("--tensorboard-dir").arg(&tb),
    );
    let (la, lb) = (steps(&a), [steps(&b1), steps(&b2)].concat());
    metrics_match_the_progress_lines(&resumed.join("metrics.jsonl"), &[&b1, &b2], &tb);
    assert_eq!(la.len(), 6, "{}", text(&a));
    // Memory is in the log line and the progress line.
    assert_eq!(text(&a).matches(" | memory (RSS): ").count(), 6, "{}", text(&a));
    let mem = String::from_utf8_lossy(&a.stdout)
        .lines()
        .filter_map(|l| match ProgressEvent::parse(l)? {
            Ok(ProgressEvent::Step(p)) => p.mem_bytes,
            _ => None,
        })
        .next();
    assert!(mem.is_some_and(|m| m > 10 << 20), "{mem:?}");
    assert_eq!(lb.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
    for ((ia, x), (_, y)) in la.iter().zip(&lb) {
        assert_eq!(x.to_bits(), y.to_bits(), "iteration {ia}: {x} straight vs {y} resumed");
    }
    assert!(la[5].1 < la[0].1, "the loss should go down: {la:?}");
    let w = |dir: &Path| std::fs::read(dir.join("iter_0000006/mp_rank_00/model.safetensors")).unwrap();
    assert!(w(&straight) == w(&resumed), "final weights differ");
    let o = |dir: &Path| std::fs::read(dir.join("iter_0000006/mp_rank_00/optimizer.safetensors")).unwrap();
    assert!(o(&straight) == o(&resumed), "final optimizer state differs");

    // The checkpoint is the MM layout: tracker, manifest that verifies, shard, hf_assets.
    let iter = straight.join("iter_0000006");
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(iter.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest.iteration, Iteration::Step(6));
    manifest.verify().unwrap();
    for f in ["hf_assets/config.json", "hf_assets/tokenizer.json", "trainer_state.json", "mp_rank_00/model.safetensors"]
    {
        assert!(iter.join(f).exists(), "{f} missing");
    }
    assert!(straight.join("iter_0000003/manifest.json").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&straight)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let done = String::from_utf8_lossy(&a.stdout)
        .lines()
        .filter_map(|l| ProgressEvent::parse(l)?.ok())
        .find(|e| matches!(e, ProgressEvent::Done(_)))
        .expect("a done event");
    assert_eq!(done.iteration(), 6);

    // Resuming a finished run trains nothing; --no-load-optim is accepted on a full state.
    let again = run_ok(train_cmd(common).arg("--load").arg(&straight).arg("--no-load-optim"));
    assert!(text(&again).contains("nothing to train"), "{}", text(&again));
}

/// mm-engine alone appends every logged iteration to <save>/metrics.jsonl (a resume is the
/// next attempt), with the values of its progress lines, and the TensorBoard events of
/// `--tensorboard-dir` hold the same values as read by TensorBoard's own reader.
fn metrics_match_the_progress_lines(file: &Path, runs: &[&Output], tb: &Path) {
    let read = mm_spec::metrics::read(file).unwrap();
    let progress: Vec<(u32, mm_spec::Progress)> = runs
        .iter()
        .enumerate()
        .flat_map(|(attempt, o)| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| match ProgressEvent::parse(l)? {
                    Ok(ProgressEvent::Step(p)) => Some((attempt as u32, p)),
                    _ => None,
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let got: Vec<(u32, mm_spec::Progress)> = read.records.iter().map(|r| (r.attempt, r.step.clone())).collect();
    assert_eq!(got, progress, "{}", file.display());
    for (_, p) in &got {
        assert!(p.tflops.is_some_and(|t| t > 0.0) && p.mfu.is_some_and(|m| m > 0.0 && m < 1.5), "{p:?}");
        assert_eq!(p.slowest_rank, Some(0));
        assert!(p.data_ms.is_some() && p.mem_bytes.is_some(), "{p:?}");
    }
    // The second run alone wrote the events: its iterations 4..6.
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    let script = "import sys, json\n\
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
ea = EventAccumulator(sys.argv[1]); ea.Reload()\n\
print(json.dumps({t: [[e.step, e.value] for e in ea.Scalars(t)] for t in ea.Tags()['scalars']}))\n";
    let o = Command::new(py).args(["-c", script]).arg(tb).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let tags: std::collections::BTreeMap<String, Vec<(i64, f64)>> = serde_json::from_slice(&o.stdout).unwrap();
    let second: Vec<&mm_spec::Progress> = got.iter().filter(|(a, _)| *a == 1).map(|(_, p)| p).collect();
    assert_eq!(second.len(), 3);
    for m in mm_spec::metrics::METRICS {
        let want: Vec<(i64, f64)> =
            second.iter().filter_map(|p| (m.get)(p).map(|v| (p.iteration as i64, v as f32 as f64))).collect();
        if want.is_empty() {
            assert!(!tags.contains_key(&format!("train/{}", m.name)), "{} written without a value", m.name);
            continue;
        }
        assert_eq!(tags.get(&format!("train/{}", m.name)), Some(&want), "tag train/{}", m.name);
    }
}

#[test]
fn a_tiny_model_overfits_sixteen_samples() {
    let d = synth();
    let start = std::time::Instant::now();
    let o = run_ok(
        // One tile per image keeps the sequences short.
        train_cmd(
            "--micro-batch-size 4 --global-batch-size 4 --train-iters 64 --lr 0.006 --min-lr 0.002 \
             --lr-decay-style cosine --lr-warmup-fraction 0.05 --weight-decay 0.0 --clip-grad 1.0 --seed 1 \
             --max-dynamic-patch 1",
        )
        .arg("--load")
        .arg(d.join("model")),
    );
    let secs = start.elapsed().as_secs_f64();
    let l = steps(&o);
    let first = l[0].1;
    // Average the last epoch (4 iterations = all 16 samples) so one easy batch cannot pass it.
    let last = l[l.len() - 4..].iter().map(|s| s.1).sum::<f64>() / 4.0;
    println!("overfit: loss {first:.3} -> {last:.3} ({:.1}% down) in {secs:.1} s", 100.0 * (1.0 - last / first));
    assert!(last < 0.1 * first, "loss only went from {first} to {last}");
    assert!(secs < 60.0, "took {secs:.1} s");
    megatron_lines_say_what_the_progress_lines_say(&o);
}

/// The Megatron-style iteration line, read as the launcher reads MindSpeed-MM's
/// (mm_spec::megatron_log), gives each logged iteration's progress to its printed precision.
fn megatron_lines_say_what_the_progress_lines_say(o: &Output) {
    let out = String::from_utf8_lossy(&o.stdout);
    let (mut lines, mut progress) = (Vec::new(), Vec::new());
    for l in out.lines() {
        match ProgressEvent::parse(l) {
            Some(Ok(ProgressEvent::Step(p))) => progress.push(p),
            Some(_) => {}
            None => lines.extend(mm_spec::megatron_log::parse(l)),
        }
    }
    assert!(
        !progress.is_empty() && lines.len() == progress.len(),
        "{} lines, {} progress",
        lines.len(),
        progress.len()
    );
    let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * b.abs().max(1.0);
    for (m, p) in lines.iter().zip(&progress) {
        assert_eq!((m.iteration, m.train_iters, m.consumed_samples), (p.iteration, p.train_iters, p.consumed_samples));
        assert!(close(m.loss, p.loss, 1e-6) && close(m.lr, p.lr, 1e-6), "{m:?}\n{p:?}");
        assert!(close(m.grad_norm.unwrap(), p.grad_norm.unwrap(), 1e-4), "{m:?}\n{p:?}");
        assert!(close(m.tokens_per_sec, p.tokens_per_sec, 1e-3) && close(m.samples_per_sec, p.samples_per_sec, 1e-3));
        assert!(close(m.data_ms.unwrap(), p.data_ms.unwrap(), 0.1), "{m:?}\n{p:?}");
    }
}

#[test]
fn eval_reports_each_sample_and_dumps_logits() {
    let d = synth();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("logits.safetensors");
    let o = run_ok(
        engine()
            .args(["eval", "--load"])
            .arg(d.join("model"))
            .arg("--data")
            .arg(d.join("data/train.jsonl"))
            .args(["--max-dynamic-patch", "2", "--use-thumbnail", "--dump-logits", "2", "--json", "--out"])
            .arg(&out),
    );
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(stdout.lines().filter(|l| l.starts_with("sample ")).count(), 16, "{stdout}");
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["samples"], 16);
    let per_sample = summary["per_sample"].as_array().unwrap();
    // Recompute sample 0's loss from the dumped logits, independently of the engine's loss code.
    let f = mm_engine::weights::safetensors::SafetensorsFile::open(&out).unwrap();
    let logits = f.read("sample.0.logits", tch::Device::Cpu).unwrap();
    let labels = f.read("sample.0.labels", tch::Device::Cpu).unwrap();
    let ids = f.read("sample.0.input_ids", tch::Device::Cpu).unwrap();
    assert_eq!(ids.size(), labels.size());
    let lp = logits.log_softmax(-1, tch::Kind::Double);
    let (mut sum, mut n) = (0.0, 0);
    for t in 1..labels.size()[0] {
        let y = labels.int64_value(&[t]);
        if y != -100 {
            sum -= lp.double_value(&[t - 1, y]);
            n += 1;
        }
    }
    let want = per_sample[0][1].as_f64().unwrap();
    assert_eq!(n, per_sample[0][2].as_i64().unwrap());
    assert!((sum / n as f64 - want).abs() < 1e-5, "{} vs {want}", sum / n as f64);
    assert!(f.metadata["origins"].contains("train.jsonl:1"));
}

#[test]
fn bad_records_are_counted_and_too_many_stop_the_run() {
    let d = synth();
    let work = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(d.join("data/train.jsonl")).unwrap();
    let mut lines: Vec<String> = good.lines().map(String::from).collect();
    lines[2] = "{\"conversations\": [".into();
    lines[4] = lines[4].replace("images/004.png", "images/missing.png");
    let data = work.path().join("bad.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let cmd = |frac: &str| {
        let mut c = engine();
        c.arg("train")
            .arg("--data-path")
            .arg(&data)
            .arg("--data-folder")
            .arg(d.join("data"))
            .arg("--load")
            .arg(d.join("model"))
            .args(["--lr", "0.001", "--train-iters", "5", "--micro-batch-size", "4", "--seq-length", "512"])
            .args(["--max-dynamic-patch", "1", "--log-interval", "5", "--max-bad-fraction", frac]);
        c
    };
    let ok = run_ok(&mut cmd("0.2"));
    let t = text(&ok);
    assert!(t.contains("bad.jsonl:3: not a chat record"), "{t}");
    assert!(t.contains("bad.jsonl:5:") && t.contains("missing.png"), "{t}");
    let fail = cmd("0.05").output().unwrap();
    assert!(!fail.status.success());
    let t = text(&fail);
    assert!(t.contains("above --max-bad-fraction 0.05"), "{t}");
    assert!(t.contains("bad.jsonl:3"), "{t}");
}

#[test]
fn unsupported_flags_fail_with_a_clear_message() {
    let d = synth();
    let o = engine()
        .args(["train", "--data-path"])
        .arg(d.join("data/train.jsonl"))
        .args(["--lr", "0.001", "--train-iters", "2", "--context-parallel-size", "2", "--fp16"])
        .args(["--context-parallel-algo", "ulysses_cp_algo"])
        .args(["--pipeline-model-parallel-size", "1", "--tensor-model-parallel-size", "1"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("--context-parallel-algo ulysses_cp_algo: mm-engine runs data, tensor"), "{t}");
    assert!(t.contains("--fp16"), "every problem is reported at once: {t}");
    // WORLD_SIZE > 1 is data parallelism, which needs the rest of the launcher's environment.
    let o = train_cmd("--lr 0.001 --train-iters 2").env("WORLD_SIZE", "2").env_remove("RANK").output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("environment variable RANK is not set"), "{}", text(&o));
    let o = engine()
        .args(["train", "--data-path", "x.jsonl", "--lr", "1", "--train-iters", "1", "--load", "/nonexistent"])
        .output()
        .unwrap();
    assert!(text(&o).contains("/nonexistent"), "{}", text(&o));
}

#[test]
fn bf16_keeps_fp32_master_weights_and_saves_bf16() {
    let d = synth();
    let work = tempfile::tempdir().unwrap();
    let save = work.path().join("bf16");
    let o = run_ok(
        train_cmd("--micro-batch-size 2 --train-iters 2 --lr 0.001 --bf16 --max-dynamic-patch 2")
            .args(["--precision", "bf16", "--load"])
            .arg(d.join("model"))
            .arg("--save")
            .arg(&save),
    );
    let l = steps(&o);
    assert!(l.iter().all(|s| s.1.is_finite()), "{l:?}");
    assert!(text(&o).contains("bf16 with fp32 master weights"));
    let iter = save.join("iter_0000002");
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(iter.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest.tensors.iter().all(|t| t.dtype == mm_spec::DType::BF16));
    let opt =
        mm_engine::weights::safetensors::SafetensorsFile::open(&iter.join("mp_rank_00/optimizer.safetensors")).unwrap();
    let master = &opt.entries["master.llm.embed_tokens.weight"];
    assert_eq!(master.dtype, "F32");
    assert_eq!(opt.entries["exp_avg.llm.embed_tokens.weight"].dtype, "F32");
}

#[test]
fn auto_resume_prefers_the_save_folder_and_refuses_a_broken_tracker() {
    let d = synth();
    let work = tempfile::tempdir().unwrap();
    let save = work.path().join("save");
    let common =
        "--micro-batch-size 1 --global-batch-size 2 --train-iters 2 --lr 0.001 --freeze-vision --max-dynamic-patch 1 \
        --auto-resume";
    // Nothing in --save yet: --load is used.
    let first = run_ok(train_cmd(common).arg("--load").arg(d.join("model")).arg("--save").arg(&save));
    assert!(!text(&first).contains("auto-resume:"), "{}", text(&first));
    assert!(text(&first).contains("from iteration 0"), "{}", text(&first));
    // Now it holds iteration 2: the same command resumes there (and has nothing left to do).
    let again = run_ok(train_cmd(common).arg("--load").arg(d.join("model")).arg("--save").arg(&save));
    let t = text(&again);
    assert!(t.contains(&format!("auto-resume: {} holds a checkpoint", save.display())), "{t}");
    assert!(t.contains("nothing to train: the checkpoint is at iteration 2"), "{t}");
    // A tracker that names a missing iteration is an error, never a silent fresh start.
    std::fs::write(save.join("latest_checkpointed_iteration.txt"), "7").unwrap();
    let o = train_cmd(common).arg("--load").arg(d.join("model")).arg("--save").arg(&save).output().unwrap();
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("--auto-resume") && t.contains("latest_checkpointed_iteration.txt"), "{t}");
    assert!(t.contains("iter_0000007"), "{t}");
}

/// A fine-tuned checkpoint leaves for transformers: mm-engine trains and saves (MM layout),
/// `mm-convert mm-to-hf --layout hf` exports it, and transformers 4.53 loads the export with
/// no missing or unexpected key and computes the logits `mm-engine eval` dumped for the same
/// inputs (crates/convert/tests/reference/hf_load.py replays them).
#[test]
fn a_fine_tuned_checkpoint_exports_to_transformers_with_the_same_logits() {
    // The mm-convert cargo built next to mm-engine, checked to be current.
    let profile_dir = Path::new(env!("CARGO_BIN_EXE_mm-engine")).parent().unwrap();
    let convert = fresh::binary(profile_dir, "mm-convert", "mm-convert", &["crates/convert/src", "crates/spec/src"]);
    let d = synth();
    let work = tempfile::tempdir().unwrap();
    let save = work.path().join("save");
    let common = "--micro-batch-size 1 --global-batch-size 2 --train-iters 3 --lr 0.002 --max-dynamic-patch 2";
    run_ok(train_cmd(common).arg("--load").arg(d.join("model")).arg("--save").arg(&save));
    let dump = work.path().join("logits.safetensors");
    run_ok(
        engine()
            .args(["eval", "--load"])
            .arg(&save)
            .arg("--data")
            .arg(d.join("data/train.jsonl"))
            .arg("--data-folder")
            .arg(d.join("data"))
            .args(["--max-dynamic-patch", "2", "--use-thumbnail", "--limit", "3", "--dump-logits", "3", "--out"])
            .arg(&dump),
    );
    let export = work.path().join("export");
    let o = Command::new(&convert)
        .args(["mm-to-hf", "--layout", "hf", "--mm-dir"])
        .arg(&save)
        .arg("--hf-dir")
        .arg(&export)
        .output()
        .unwrap();
    assert!(o.status.success(), "mm-convert failed:\n{}", text(&o));

    let root = fresh::root();
    let python = root.join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup.sh", python.display());
    let o = Command::new(python)
        .arg(root.join("crates/convert/tests/reference/hf_load.py"))
        .arg("check")
        .arg(&export)
        .arg(&dump)
        .output()
        .unwrap();
    assert!(o.status.success(), "hf_load.py check failed:\n{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    for k in ["missing", "unexpected", "mismatched"] {
        assert_eq!(v[k], serde_json::json!([]), "transformers reports {k} keys: {v}");
    }
    assert_eq!(v["samples"], 3, "{v}");
    let f = mm_engine::weights::safetensors::SafetensorsFile::open(&dump).unwrap();
    assert!(f.read("sample.0.pixel_values", tch::Device::Cpu).is_ok(), "the first sample has an image");
    // Same libtorch kernels on the same inputs: identical in practice; 1e-5 leaves room for
    // a different intra-op thread split.
    let rel = v["max_rel_diff"].as_f64().unwrap();
    assert!(rel <= 1e-5, "transformers' logits differ from mm-engine's by {rel:e} (relative to the largest): {v}");
}

/// MindSpeed-MM's format both ways. The HF model converted by `mm-convert hf-to-mm --format
/// mindspeed` at tp 2 × pp 2 loads into mm-engine with the HF folder's weights (bit-identical
/// losses); `--ckpt-format torch` saves resume exactly; the venv's torch loads them
/// (`weights_only=True, mmap=True`) with MindSpeed-MM's names and Megatron's entries; and
/// `mm-to-hf` exports them bit-identical to the MM-format save of the same run.
#[test]
fn mindspeed_torch_files_load_save_and_resume_exactly() {
    let profile_dir = Path::new(env!("CARGO_BIN_EXE_mm-engine")).parent().unwrap();
    let convert = fresh::binary(profile_dir, "mm-convert", "mm-convert", &["crates/convert/src", "crates/spec/src"]);
    let d = synth();
    let work = tempfile::tempdir().unwrap();
    let run_convert = |args: &[&str], paths: &[(&str, &Path)]| {
        let mut c = Command::new(&convert);
        c.args(args);
        for (flag, p) in paths {
            c.arg(flag).arg(p);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "mm-convert {args:?} failed:\n{}", text(&o));
    };
    let ms = work.path().join("ms");
    run_convert(
        &["hf-to-mm", "--format", "mindspeed", "--tp", "2", "--llm-pp-layers", "1,1", "--vit-pp-layers", "2,0"],
        &[("--hf-dir", &d.join("model")), ("--mm-dir", &ms)],
    );
    assert!(ms.join("release/mp_rank_01_001/model_optim_rng.pt").is_file());

    let common = "--micro-batch-size 1 --global-batch-size 2 --train-iters 4 --lr 0.002 --max-dynamic-patch 2 --seed 3";
    let mm_save = work.path().join("mm-save");
    let a = run_ok(train_cmd(common).arg("--load").arg(d.join("model")).arg("--save").arg(&mm_save));
    let torch_save = work.path().join("torch-save");
    let torch_run = |extra: &str| {
        run_ok(
            train_cmd(&format!("{common} --ckpt-format torch {extra}"))
                .arg("--load")
                .arg(&ms)
                .arg("--save")
                .arg(&torch_save),
        )
    };
    let b1 = torch_run("--exit-interval 2");
    assert!(text(&b1).contains("loaded MindSpeed-MM checkpoint"), "{}", text(&b1));
    let b2 = torch_run("--auto-resume");
    assert!(text(&b2).contains("iteration 2, tp 1, pp 1"), "resumed from the torch save:\n{}", text(&b2));
    let (la, lb) = (steps(&a), [steps(&b1), steps(&b2)].concat());
    assert_eq!(lb.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3, 4], "{}", text(&b2));
    assert_eq!(la.len(), 4, "{}", text(&a));
    for ((i, x), (_, y)) in la.iter().zip(&lb) {
        assert_eq!(
            x.to_bits(),
            y.to_bits(),
            "iteration {i}: {x} from HF (mm saves) vs {y} from MindSpeed (torch saves)"
        );
    }

    let iter = torch_save.join("iter_0000004");
    assert!(iter.join("mp_rank_00/model_optim_rng.pt").is_file());
    assert!(iter.join("hf_assets/config.json").is_file() && iter.join("trainer_state.json").is_file());
    assert!(!iter.join("manifest.json").exists(), "a torch-format save has no MM manifest");

    let (ea, eb) = (work.path().join("export-mm"), work.path().join("export-torch"));
    run_convert(&["mm-to-hf", "--layout", "hf"], &[("--mm-dir", &mm_save), ("--hf-dir", &ea)]);
    run_convert(&["mm-to-hf", "--layout", "hf"], &[("--mm-dir", &torch_save), ("--hf-dir", &eb)]);
    let script = r#"
import glob, json, os, sys, torch
from safetensors.torch import load_file
pt, a, b = sys.argv[1:4]
sd = torch.load(pt, weights_only=True, mmap=True)
def tensors(d):
    out = {}
    for p in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(p))
    return out
ta, tb = tensors(a), tensors(b)
print(json.dumps({
    "iteration": sd["iteration"], "version": sd["checkpoint_version"], "keys": sorted(sd["model"]),
    "exported": len(ta), "only_one_side": sorted(set(ta) ^ set(tb)),
    "differ": sorted(k for k in ta if k in tb and not torch.equal(ta[k], tb[k])),
}))
"#;
    let python = fresh::root().join(".venv/bin/python");
    let o = Command::new(python)
        .args(["-c", script])
        .arg(iter.join("mp_rank_00/model_optim_rng.pt"))
        .arg(&ea)
        .arg(&eb)
        .output()
        .unwrap();
    assert!(o.status.success(), "torch could not load the save:\n{}", text(&o));
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap_or_default()).unwrap();
    assert_eq!(v["iteration"], 4, "{v}");
    assert_eq!(v["version"], 3.0, "{v}");
    let keys: Vec<&str> = v["keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    for k in [
        "image_encoder.encoder.embeddings.patch_embedding.weight",
        "image_encoder.encoder.encoder.layers.1.self_attention.linear_qkv.weight",
        "image_encoder.projector.linear_fc2.weight",
        "text_decoder.embedding.word_embeddings.weight",
        "text_decoder.decoder.layers.1.mlp.linear_fc1.weight",
        "text_decoder.decoder.final_layernorm.weight",
        "text_decoder.output_layer.weight",
    ] {
        assert!(keys.contains(&k), "{k} is not in the save: {keys:?}");
    }
    assert!(keys.iter().all(|k| k.starts_with("image_encoder.") || k.starts_with("text_decoder.")), "{keys:?}");
    assert!(v["exported"].as_u64().unwrap() > 20, "{v}");
    assert_eq!(v["only_one_side"], serde_json::json!([]), "{v}");
    assert_eq!(v["differ"], serde_json::json!([]), "the two formats hold different weights: {v}");
}
