//! transformers 4.53 loads what `mm-to-hf` writes and computes the same logits.
//!
//! tests/reference/hf_load.py builds a small random InternVLForConditionalGeneration in each
//! ViT flavour (300M: LayerNorm, qkv bias, 2 heads; 6B: RMSNorm, qk norm, 5 heads that tp 2
//! splits unaligned) with transformers' own save_pretrained, and records the logits of two
//! samples (one with two image tiles, one text only). Each test converts it to TP2 × PP2,
//! exports it, loads the export with from_pretrained and compares: no missing, unexpected or
//! mis-shaped key, and logits bit-identical (the tensors are). The original-layout export goes
//! back through hf-to-mm and out in transformers' layout, as a user with an OpenGVLab download
//! who wants a transformers model would; and through MindSpeed-MM's torch files
//! (`--format mindspeed`) and back.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(p.exists(), "{} is missing: run scripts/setup.sh (it installs transformers 4.53.0)", p.display());
    p
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/hf_load.py")
}

fn py(args: &[&str]) -> String {
    let o = Command::new(python()).arg(script()).args(args).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "hf_load.py {args:?} failed:\n{out}\n{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// `hf_load.py check`: transformers' loading report and the largest logit difference.
fn check(hf_dir: &Path, expected: &Path) -> serde_json::Value {
    let out = py(&["check", s(hf_dir), s(expected)]);
    let line = out.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {out}"));
    for k in ["missing", "unexpected", "mismatched"] {
        assert_eq!(v[k], serde_json::json!([]), "transformers reports {k} keys loading {}: {v}", hf_dir.display());
    }
    assert_eq!(v["samples"], 2, "{v}");
    assert_eq!(v["image_token_id"], 100, "{v}");
    assert_eq!(v["max_rel_diff"].as_f64(), Some(0.0), "{} computes other logits: {v}", hf_dir.display());
    v
}

fn loads_in_transformers(flavour: &str) {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    py(&["make", s(r), "--flavour", flavour]);
    let expected = r.join("expected.safetensors");
    let src = r.join("src");
    // The source itself, as a control: the script's model and batch agree with themselves.
    check(&src, &expected);

    let mm = r.join("mm");
    let split = ["--tp", "2", "--llm-pp-layers", "1,1", "--vit-pp-layers", "2,0", "--unaligned-linear"];
    run(&[&["hf-to-mm", "--hf-dir", s(&src), "--mm-dir", s(&mm)][..], &split].concat(), 0);
    assert_eq!(manifest(&mm)["parallel"]["tp"], 2);

    // transformers' layout: config.json, one shard plus its index.
    let hf = r.join("export-hf");
    run(&["mm-to-hf", "--mm-dir", s(&mm), "--hf-dir", s(&hf), "--layout", "hf"], 0);
    assert!(hf.join("model.safetensors.index.json").exists());
    let v = check(&hf, &expected);
    assert!(v["tensors"].as_u64().unwrap() > 60, "{v}");

    // OpenGVLab's layout keeps the image token id for the way back.
    let orig = r.join("export-original");
    run(&["mm-to-hf", "--mm-dir", s(&mm), "--hf-dir", s(&orig), "--layout", "original"], 0);
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(orig.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"], serde_json::json!(["InternVLChatModel"]));
    assert_eq!(cfg["img_context_token_id"], 100);
    let keys = read_hf(&orig);
    for k in [
        "mlp1.0.weight",
        "mlp1.3.weight",
        "vision_model.encoder.layers.0.attn.qkv.weight",
        "language_model.lm_head.weight",
    ] {
        assert!(keys.contains_key(k), "{k} is not in the original-layout export: {:?}", keys.keys());
    }
    let mm2 = r.join("mm-from-original");
    run(&["hf-to-mm", "--hf-dir", s(&orig), "--mm-dir", s(&mm2)], 0);
    let back = r.join("export-hf-again");
    run(&["mm-to-hf", "--mm-dir", s(&mm2), "--hf-dir", s(&back), "--layout", "hf"], 0);
    check(&back, &expected);

    // Through MindSpeed-MM's own torch files and back: transformers loads the export.
    let ms = r.join("mindspeed");
    let ms_split = ["--tp", "2", "--llm-pp-layers", "1,1", "--vit-pp-layers", "2,0"];
    run(&[&["hf-to-mm", "--format", "mindspeed", "--hf-dir", s(&src), "--mm-dir", s(&ms)][..], &ms_split].concat(), 0);
    let ms_hf = r.join("export-from-mindspeed");
    run(&["mm-to-hf", "--mm-dir", s(&ms), "--hf-dir", s(&ms_hf), "--layout", "hf", "--assets-from", s(&src)], 0);
    check(&ms_hf, &expected);
}

#[test]
fn vit_300m_flavour_export_loads_in_transformers_with_identical_logits() {
    loads_in_transformers("300m");
}

#[test]
fn vit_6b_flavour_unaligned_export_loads_in_transformers_with_identical_logits() {
    loads_in_transformers("6b");
}
