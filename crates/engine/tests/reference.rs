//! Numerics against independent references: tests/reference/internvl_reference.py builds small
//! random InternVL models with transformers 4.53 (both ViT flavours), saves them in three key
//! spellings, and records logits, the SFT loss and the parameters after one
//! torch.optim.AdamW step; it also runs InternVL's dynamic_preprocess with Pillow and
//! preprocess_internvl2_5 with transformers' tokenizer. These tests load the same files
//! through mm-engine and compare.
//!
//! Tolerances (fp32, CPU): logits 1e-4 relative to the largest logit, loss 1e-5 relative,
//! parameters after one AdamW step 1e-5 absolute, PNG tiles exact (the resampler reproduces
//! Pillow's fixed-point bicubic), JPEG tiles within the decoders' difference (see
//! `tiling_matches_pillow`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use mm_engine::data::dataset::open_image;
use mm_engine::data::records::Turn;
use mm_engine::data::template::tokenize;
use mm_engine::data::tiling::{dynamic_preprocess, normalize_into, target_ratios};
use mm_engine::model::{InternVL, ModelInput};
use mm_engine::tokenizer::ChatTokenizer;
use mm_engine::train::loss::{objective, sample_losses, LossReduction, StepTotals};
use mm_engine::train::optimizer::{AdamW, AdamWConfig};
use mm_engine::weights::checkpoint::{resolve, Source};
use mm_engine::weights::safetensors::SafetensorsFile;
use serde_json::Value;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const IMAGE_TOKEN: i64 = 100;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace root")
}

/// Runs the Python reference once per test binary; returns its output folder.
fn reference() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mm-engine-reference");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // The synthetic tokenizer (same as `mm-engine synth`), for the template comparison.
        mm_engine::synth::run(mm_engine::synth::SynthArgs {
            out: dir.join("synth"),
            model: "tiny".into(),
            samples: 8,
            seed: 0,
            no_video: true,
            llm_layers: None,
            vit_layers: None,
            vit_heads: None,
            llm_heads: None,
            llm_kv_heads: None,
            vit_drop_path_rate: None,
            force: false,
        })
        .expect("synth");
        let python = workspace().join(".venv/bin/python");
        assert!(
            python.exists(),
            "{} is missing: run scripts/setup.sh (it installs the reference packages)",
            python.display()
        );
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/internvl_reference.py");
        let out = Command::new(&python)
            .arg(&script)
            .arg("--out")
            .arg(&dir)
            .arg("--tokenizer")
            .arg(dir.join("synth/model"))
            .output()
            .expect("run the python reference");
        assert!(
            out.status.success(),
            "{} failed (is transformers==4.53.0 installed? scripts/requirements.txt):\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

fn read_all(path: &Path) -> BTreeMap<String, Tensor> {
    let f = SafetensorsFile::open(path).unwrap();
    f.entries.keys().map(|k| (k.clone(), f.read(k, Device::Cpu).unwrap())).collect()
}

/// A model loaded from one of the reference folders.
fn load(folder: &Path) -> (VarStore, InternVL) {
    let src = resolve(folder, None).unwrap();
    assert!(matches!(src, Source::Hf { .. }));
    let preset = src.preset("reference").unwrap();
    let vs = VarStore::new(Device::Cpu);
    let model = InternVL::new(&vs.root(), &preset, IMAGE_TOKEN, !src.has_lm_head());
    src.load_weights(&vs, false, None).unwrap_or_else(|e| panic!("{}: {e:#}", folder.display()));
    (vs, model)
}

fn batch(exp: &BTreeMap<String, Tensor>) -> (ModelInput, Tensor) {
    let input = ModelInput {
        input_ids: exp["input_ids"].shallow_clone(),
        attention_mask: exp["attention_mask"].shallow_clone(),
        pixel_values: Some(exp["pixel_values"].shallow_clone()),
    };
    (input, exp["labels"].shallow_clone())
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

#[test]
fn logits_and_loss_match_transformers_in_both_flavours_and_every_spelling() {
    for flavour in ["300m", "6b"] {
        let base = reference().join("model").join(flavour);
        let exp = read_all(&base.join("expected.safetensors"));
        let want = &exp["logits"];
        let mask = exp["attention_mask"].unsqueeze(-1).to_kind(Kind::Float);
        let scale = max_abs(&(want * &mask));
        for spelling in ["hf", "hf_prefixed", "original"] {
            let (_vs, model) = load(&base.join(spelling));
            let (input, labels) = batch(&exp);
            let got = tch::no_grad(|| model.forward(&input, false)).unwrap();
            // Padding rows are not compared: their values depend on how each implementation masks them.
            let rel = max_abs(&((&got - want) * &mask)) / scale;
            println!("{flavour}/{spelling}: max |logit diff| / max |logit| = {rel:.3e}");
            assert!(rel < 1e-4, "{flavour}/{spelling}: logits differ by {rel:e} (relative)");

            let l = sample_losses(&got, &labels);
            let totals = StepTotals { micro_batches: 1, samples: 2, tokens: l.counts.iter().sum() };
            let loss = objective(LossReduction::Default, &l, totals).double_value(&[]);
            let want_loss = exp["loss"].double_value(&[0]);
            let rel = (loss - want_loss).abs() / want_loss.abs();
            println!("{flavour}/{spelling}: loss {loss:.7} vs transformers {want_loss:.7} (relative {rel:.1e})");
            assert!(rel < 1e-5, "{flavour}/{spelling}: loss {loss} vs {want_loss}");
        }
    }
}

#[test]
fn one_adamw_step_matches_torch_optim_adamw() {
    for flavour in ["300m", "6b"] {
        let base = reference().join("model").join(flavour);
        let exp = read_all(&base.join("expected.safetensors"));
        let (vs, model) = load(&base.join("original"));
        let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let mut opt = AdamW::new(params, AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 });
        let (input, labels) = batch(&exp);
        let logits = model.forward(&input, true).unwrap();
        let l = sample_losses(&logits, &labels);
        let totals = StepTotals { micro_batches: 1, samples: 2, tokens: l.counts.iter().sum() };
        objective(LossReduction::Default, &l, totals).backward();
        opt.accumulate();
        opt.step(1e-2);
        let mut worst = (0.0f64, String::new());
        for (name, t) in vs.variables() {
            let want = exp.get(&format!("after.{name}")).unwrap_or_else(|| panic!("reference lacks {name}"));
            let d = max_abs(&(&t - want));
            if d > worst.0 {
                worst = (d, name.clone());
            }
        }
        println!("{flavour}: after one AdamW step, max |param diff| = {:.3e} ({})", worst.0, worst.1);
        assert!(worst.0 < 1e-5, "{flavour}: {} differs by {:e}", worst.1, worst.0);
    }
}

#[test]
fn tiling_matches_pillow() {
    let dir = reference().join("tiling");
    let exp = read_all(&dir.join("expected.safetensors"));
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    for (key, order) in cases["orders"].as_object().unwrap() {
        let (lo, hi) = key.split_once(',').unwrap();
        let want: Vec<(usize, usize)> = order
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_u64().unwrap() as usize, p[1].as_u64().unwrap() as usize))
            .collect();
        assert_eq!(target_ratios(lo.parse().unwrap(), hi.parse().unwrap()), want, "candidate order for {key}");
    }
    let (mut png_max, mut jpg_max, mut jpg_decode_max) = (0.0f64, 0.0f64, 0.0f64);
    let (mut jpg_mean_sum, mut jpg_n) = (0.0f64, 0usize);
    for c in cases["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let file = c["file"].as_str().unwrap();
        let img = open_image(&dir.join(file)).unwrap();
        let decoded = Tensor::from_slice(img.as_raw()).reshape([img.height() as i64, img.width() as i64, 3]);
        let dd = decoded.to_kind(Kind::Float) - exp[&format!("{file}.decoded")].to_kind(Kind::Float);
        let ddiff = max_abs(&dd);
        let t = dynamic_preprocess(
            &img,
            c["min"].as_u64().unwrap() as usize,
            c["max"].as_u64().unwrap() as usize,
            c["size"].as_u64().unwrap() as u32,
            c["thumbnail"].as_bool().unwrap(),
        );
        let grid = [t.grid.0 as u64, t.grid.1 as u64];
        assert_eq!(serde_json::json!(grid), c["grid"], "{name}: grid");
        assert_eq!(t.images.len() as u64, c["tiles"].as_u64().unwrap(), "{name}: tiles");
        let mut px = Vec::new();
        for tile in &t.images {
            normalize_into(tile, &mut px);
        }
        let want = &exp[&format!("{name}.pixels")];
        let got = Tensor::from_slice(&px).reshape(want.size());
        let d = max_abs(&(&got - want));
        if file.ends_with(".png") {
            png_max = png_max.max(d);
            assert_eq!(ddiff, 0.0, "{file}: PNG decoding differs");
        } else {
            jpg_max = jpg_max.max(d);
            jpg_decode_max = jpg_decode_max.max(ddiff);
            jpg_mean_sum += dd.abs().mean(Kind::Float).double_value(&[]);
            jpg_n += 1;
        }
    }
    let jpg_mean = jpg_mean_sum / jpg_n.max(1) as f64;
    println!(
        "tiling: PNG max |pixel diff| {png_max:.2e}; JPEG decode diff max {jpg_decode_max} levels, mean {jpg_mean:.3} levels; \
         JPEG tiles max |pixel diff| {jpg_max:.3} (normalized units)"
    );
    // PNG: same bytes in, Pillow's fixed-point bicubic reproduced: identical floats.
    assert!(png_max < 1e-6, "PNG tiles differ from Pillow by {png_max}");
    // JPEG: the `image` crate decodes with zune-jpeg, Pillow with libjpeg-turbo; they upsample
    // the 4:2:0 chroma differently, which shows most on per-pixel noise (these test images have a
    // noise channel on purpose): single pixels differ by up to a few tens of levels, the mean by
    // well under one. The tiles then differ by what the decoders did, not by the tiling.
    assert!(jpg_mean < 1.0, "JPEG decoders differ by {jpg_mean} levels on average");
    assert!(jpg_decode_max <= 40.0, "JPEG decoders differ by {jpg_decode_max} levels");
    assert!(jpg_max <= 40.0 / 255.0 / 0.224, "JPEG tiles differ by {jpg_max}");
}

#[test]
fn template_matches_preprocess_internvl2_5() {
    let dir = reference();
    let tok = ChatTokenizer::open(&dir.join("synth/model")).unwrap();
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("template/expected.json")).unwrap()).unwrap();
    for (i, c) in cases.as_array().unwrap().iter().enumerate() {
        let turns: Vec<Turn> = c["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| Turn { from: t["from"].as_str().unwrap().into(), value: t["value"].as_str().unwrap().into() })
            .collect();
        let image_tokens: Vec<usize> =
            c["image_tokens"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        let got = tokenize(&tok, &turns, &image_tokens, c["text_only"].as_bool().unwrap(), 4096).unwrap();
        let ids: Vec<i64> = serde_json::from_value(c["input_ids"].clone()).unwrap();
        let labels: Vec<i64> = serde_json::from_value(c["labels"].clone()).unwrap();
        assert_eq!(got.input_ids, ids, "case {i}: input ids");
        assert_eq!(got.labels, labels, "case {i}: labels");
    }
}
