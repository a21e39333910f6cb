//! `hf-to-mm --format mindspeed` writes what MindSpeed-MM's converter writes: every file loads
//! with the venv's torch (`weights_only=True`, `mmap=True`) and equals, tensor for tensor, the
//! state dicts tests/reference/mindspeed_ref.py builds from the same HF weights with torch
//! alone (its own implementation of the rules: names, LLM qkv interleaved per key/value group,
//! fc1 = gate ‖ up, vocabulary split unevenly without padding, ViT heads split unevenly,
//! placement over pp and vpp). Both ViT flavours; tp 1/2/8 (25 ViT heads on 8), pp 1/2/4, vpp 2.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use mm_spec::{preset, HfLayout};

fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(p.exists(), "{} is missing: run scripts/setup.sh (it installs torch into the venv)", p.display());
    p
}

/// Converts `hf` with `args` and checks the output against the Python reference.
fn convert_and_compare(hf: &Path, out: &Path, tp: usize, llm: &str, vit: &str, vpp: Option<usize>) {
    let tp_s = tp.to_string();
    let mut args = vec!["hf-to-mm", "--format", "mindspeed", "--hf-dir", s(hf), "--mm-dir", s(out), "--tp", &tp_s];
    args.extend(["--llm-pp-layers", llm, "--vit-pp-layers", vit]);
    let vpp_s = vpp.map(|v| v.to_string());
    if let Some(v) = &vpp_s {
        args.extend(["--vpp", v]);
    }
    run(&args, 0);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/mindspeed_ref.py");
    let mut cmd = Command::new(python());
    cmd.arg(script).args([s(hf), s(out), "--tp", &tp_s, "--llm", llm, "--vit", vit]);
    if let Some(v) = &vpp_s {
        cmd.args(["--vpp", v]);
    }
    let o = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "tp {tp} llm {llm} vit {vit} vpp {vpp:?}: the reference disagrees:\n{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.starts_with("ok "), "{stdout}");
}

#[test]
fn vit_300m_flavour_matches_the_reference_at_every_split() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    // tiny: 2 ViT layers (4 heads), 2 LLM layers (2 kv heads), sharded input.
    synth(&hf, preset("tiny").unwrap(), HfLayout::Original, 3, true);
    for (i, (tp, llm, vit, vpp)) in [
        (1, "2", "2", None),
        (2, "1,1", "2,0", None),
        (2, "1,0,0,1", "1,1,0,0", None),
        (1, "1,0,0,1", "2,0,0,0", Some(2)),
    ]
    .into_iter()
    .enumerate()
    {
        convert_and_compare(&hf, &root.path().join(format!("ms{i}")), tp, llm, vit, vpp);
    }
}

#[test]
fn vit_6b_flavour_with_25_heads_on_tp8_matches_the_reference() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    // The 78B's structure at small width (25 ViT heads, 8 kv heads), in transformers' layout:
    // the rules apply to the logical tensors whatever the source spelling.
    let mut arch = small_78b();
    arch.vision.num_hidden_layers = 3;
    arch.llm.num_hidden_layers = 2;
    synth(&hf, arch, HfLayout::Hf, 5, false);
    let orig = root.path().join("orig");
    run(&["hf-to-mm", "--hf-dir", s(&hf), "--mm-dir", s(&root.path().join("mm"))], 0);
    run(&["mm-to-hf", "--mm-dir", s(&root.path().join("mm")), "--hf-dir", s(&orig), "--layout", "original"], 0);
    // The seed's 78B command has no unaligned option: MindSpeed-MM splits ViT heads unevenly.
    convert_and_compare(&orig, &root.path().join("tp8"), 8, "1,1", "3,0", None);
    convert_and_compare(&orig, &root.path().join("tp2"), 2, "2", "3", None);
}

#[test]
fn llm_widths_that_tp_does_not_divide_are_refused_with_the_reason() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    synth(&hf, preset("tiny").unwrap(), HfLayout::Original, 3, false);
    let out = root.path().join("ms");
    let o = run(&["hf-to-mm", "--format", "mindspeed", "--hf-dir", s(&hf), "--mm-dir", s(&out), "--tp", "4"], 3);
    assert!(stderr(&o).contains("key/value heads"), "{}", stderr(&o));
    assert!(!out.exists() && entries_starting_with(root.path(), "ms").is_empty(), "nothing left behind");
}

/// What MindSpeed-MM wrote comes back through `mm-to-hf` bit-identical to the HF tensors it
/// started from: our own MindSpeed files, and a training-style save written by the Python
/// reference with torch.save (args as an argparse.Namespace, iteration, optimizer and RNG
/// state, vpp chunks), which mm-to-hf reads without running anything in it.
#[test]
fn mindspeed_checkpoints_come_back_bit_identical_through_mm_to_hf() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    synth(&hf, preset("tiny6b").unwrap(), HfLayout::Original, 11, false);
    let original = read_hf(&hf);

    let ours = root.path().join("ours");
    run(&["hf-to-mm", "--format", "mindspeed", "--hf-dir", s(&hf), "--mm-dir", s(&ours), "--tp", "2"], 0);
    let back = root.path().join("back");
    run(&["mm-to-hf", "--mm-dir", s(&ours), "--hf-dir", s(&back), "--assets-from", s(&hf)], 0);
    assert_eq!(read_hf(&back), original, "our MindSpeed files → HF");

    // Written by torch.save in the reference: a training save at iteration 10, pp 2 × vpp 2.
    let trained = root.path().join("trained");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/mindspeed_ref.py");
    let o = Command::new(python())
        .arg(script)
        .args([s(&hf), s(&trained), "--tp", "2", "--llm", "1,0,0,1", "--vit", "2,0,0,0", "--vpp", "2"])
        .args(["--write", "--iteration", "10"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let back2 = root.path().join("back2");
    run(&["mm-to-hf", "--mm-dir", s(&trained), "--hf-dir", s(&back2), "--assets-from", s(&hf)], 0);
    assert_eq!(read_hf(&back2), original, "a MindSpeed training save → HF");

    // inspect tells the format and reads the split off the files.
    let o = run(&["inspect", s(&trained)], 0);
    let out = stdout(&o);
    assert!(out.contains("MindSpeed-MM checkpoint"), "{out}");
    assert!(out.contains("tp 2, pp 2, vpp 2, llm_pp_layers 1,0,0,1, vit_pp_layers 2,0,0,0"), "{out}");
    assert!(out.contains("args") && out.contains("optimizer") && out.contains("rng_state"), "{out}");
    // No config.json in a MindSpeed checkpoint: without --assets-from the error says what to pass.
    let o = run(&["mm-to-hf", "--mm-dir", s(&trained), "--hf-dir", s(&root.path().join("x"))], 1);
    assert!(stderr(&o).contains("pass --assets-from"), "{}", stderr(&o));
    // A file that does not match the model is refused with what is wrong.
    let other = root.path().join("other");
    synth(&other, preset("tiny").unwrap(), HfLayout::Original, 1, false);
    let o =
        run(&["mm-to-hf", "--mm-dir", s(&ours), "--hf-dir", s(&root.path().join("y")), "--assets-from", s(&other)], 1);
    assert!(stderr(&o).contains("does not match the model") || stderr(&o).contains("do not fit"), "{}", stderr(&o));
}

/// Damaged or foreign MindSpeed folders are errors that name the problem, never a panic.
#[test]
fn damaged_mindspeed_folders_are_refused_by_name() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    synth(&hf, preset("tiny").unwrap(), HfLayout::Original, 3, false);
    let write = |dir: &Path, keys: &[&str]| {
        std::fs::create_dir_all(dir).unwrap();
        let mut w = torchfile::Writer::create(&dir.join("model_optim_rng.pt")).unwrap();
        let root: Vec<_> = keys
            .iter()
            .map(|k| (torchfile::Value::Str(k.to_string()), torchfile::Value::OrderedDict(Vec::new())))
            .collect();
        w.write_root(&torchfile::Value::Dict(root)).unwrap();
        w.finish().unwrap();
    };
    let export = |ms: &Path| {
        let o =
            run(&["mm-to-hf", "--mm-dir", s(ms), "--hf-dir", s(&ms.with_extension("out")), "--assets-from", s(&hf)], 1);
        stderr(&o)
    };
    let gap = root.path().join("gap");
    std::fs::create_dir_all(&gap).unwrap();
    std::fs::write(gap.join("latest_checkpointed_iteration.txt"), "release").unwrap();
    write(&gap.join("release/mp_rank_00"), &["model0", "model2"]);
    assert!(export(&gap).contains("without gaps"), "{}", export(&gap));

    let uneven = root.path().join("uneven");
    std::fs::create_dir_all(&uneven).unwrap();
    std::fs::write(uneven.join("latest_checkpointed_iteration.txt"), "release").unwrap();
    write(&uneven.join("release/mp_rank_00_000"), &["model0"]);
    write(&uneven.join("release/mp_rank_00_001"), &["model0", "model1"]);
    assert!(export(&uneven).contains("different numbers of model chunks"), "{}", export(&uneven));

    let huge = root.path().join("huge");
    std::fs::create_dir_all(&huge).unwrap();
    std::fs::write(huge.join("latest_checkpointed_iteration.txt"), "release").unwrap();
    write(&huge.join("release/mp_rank_18446744073709551615"), &["model"]);
    assert!(export(&huge).contains("not an mp_rank_TT"), "{}", export(&huge));
}
