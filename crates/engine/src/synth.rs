//! `mm-engine synth`: a tiny InternVL3-shaped checkpoint and a data set to train it on, for CI
//! and for the launcher's `finetune tiny` recipe (its paths are the defaults:
//! `runs/tiny/model`, `runs/tiny/data/train.jsonl`, images relative to `runs/tiny/data`).
//!
//! The checkpoint is an original-layout HF folder (config.json, model.safetensors) with a
//! byte-level BPE tokenizer.json trained on the data's own text, small enough for the tiny
//! preset's 512-token vocabulary and holding InternVL's special tokens. The data are real PNG
//! and JPEG files of coloured shapes (so the answer depends on the pixels), a short video
//! encoded with the ffmpeg CLI, and chat records of every kind: one image, two images, video,
//! text only.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use clap::Args;
use image::{Rgb, RgbImage};
use serde_json::json;
use tch::nn::VarStore;
use tch::Device;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::cli::{usage, UsageError};
use crate::data::template::SYSTEM_MESSAGE;
use crate::model::InternVL;
use crate::rng::Rng;
use crate::tokenizer::{DEFAULT_PAD, IMG_CONTEXT, IMG_END, IMG_START, IM_END, IM_START};
use crate::weights::hf;

#[derive(Debug, Clone, Args)]
pub struct SynthArgs {
    /// Writes OUT/model (checkpoint + tokenizer) and OUT/data (train.jsonl, images, video); OUT
    /// must not exist or be empty, unless --force.
    #[arg(long, default_value = "runs/tiny")]
    pub out: PathBuf,
    /// Preset of the checkpoint (tiny or tiny6b).
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Records in train.jsonl.
    #[arg(long, default_value_t = 16)]
    pub samples: usize,
    /// Seed of the images and the weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Leave the video record out (no ffmpeg needed).
    #[arg(long)]
    pub no_video: bool,
    /// LLM depth instead of the preset's (deeper models for pipeline tests: the seed's 8B
    /// split 6,8,8,6 needs 28 layers).
    #[arg(long)]
    pub llm_layers: Option<usize>,
    /// ViT depth instead of the preset's.
    #[arg(long)]
    pub vit_layers: Option<usize>,
    /// ViT heads instead of the preset's, keeping the head width (an odd count exercises
    /// MindSpeed's unaligned tensor-parallel split, as InternViT-6B's 25 heads on 8 ranks).
    #[arg(long)]
    pub vit_heads: Option<usize>,
    /// LLM query heads and key/value heads instead of the preset's, keeping the head width
    /// (`--llm-heads 8 --llm-kv-heads 8` splits over 8 tensor-parallel ranks).
    #[arg(long, requires = "llm_kv_heads")]
    pub llm_heads: Option<usize>,
    /// LLM key/value heads (with --llm-heads).
    #[arg(long, requires = "llm_heads")]
    pub llm_kv_heads: Option<usize>,
    /// The ViT's stochastic depth (drop_path_rate in config.json: layer i drops its residual
    /// branches with probability rate·i/(L−1) in training) instead of the preset's 0.
    #[arg(long)]
    pub vit_drop_path_rate: Option<f64>,
    /// Replace --out when it exists and is not empty (its contents are deleted); without it such
    /// a folder is refused.
    #[arg(long)]
    pub force: bool,
}

const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
const COLORS: [(&str, [u8; 3]); 4] =
    [("red", [220, 30, 30]), ("green", [30, 180, 60]), ("blue", [40, 70, 220]), ("yellow", [230, 210, 40])];
const SIZES: [(u32, u32); 5] = [(112, 112), (224, 112), (112, 224), (200, 150), (300, 100)];
pub const SPECIAL_TOKENS: [&str; 6] = [DEFAULT_PAD, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT];

/// Draws a filled shape on a light, slightly noisy background.
pub fn draw(shape: &str, color: [u8; 3], w: u32, h: u32, rng: &mut Rng) -> RgbImage {
    let mut img = RgbImage::from_fn(w, h, |_, _| {
        let n = rng.below(24) as u8;
        Rgb([225 + n, 225 + n, 230])
    });
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    let r = (w.min(h) as f64) * 0.35;
    for y in 0..h {
        for x in 0..w {
            let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
            let inside = match shape {
                "circle" => dx * dx + dy * dy <= r * r,
                "square" => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
                _ => dy <= r * 0.8 && dy >= -r * 0.9 && dx.abs() <= (dy + r * 0.9) * 0.6,
            };
            if inside {
                img.put_pixel(x, y, Rgb(color));
            }
        }
    }
    img
}

fn save_image(img: &RgbImage, path: &Path) -> anyhow::Result<()> {
    img.save(path).with_context(|| format!("writing {}", path.display()))
}

/// Encodes `frames` (all w×h) as an MPEG-4 video with the ffmpeg CLI.
fn write_video(frames: &[RgbImage], path: &Path) -> anyhow::Result<()> {
    let (w, h) = frames[0].dimensions();
    let mut child = Command::new("ffmpeg")
        .args(["-nostdin", "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", &format!("{w}x{h}")])
        .args(["-r", "8", "-i", "pipe:0", "-c:v", "mpeg4", "-q:v", "3", "-pix_fmt", "yuv420p"])
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run ffmpeg (install it, or pass --no-video)")?;
    {
        let mut stdin = child.stdin.take().context("ffmpeg stdin")?;
        for f in frames {
            stdin.write_all(f.as_raw()).context("writing frames to ffmpeg")?;
        }
    }
    let out = child.wait_with_output().context("waiting for ffmpeg")?;
    if !out.status.success() {
        bail!("ffmpeg failed to write {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn record(image: Option<serde_json::Value>, video: Option<&str>, q: &str, a: &str) -> serde_json::Value {
    let mut r = json!({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]});
    if let Some(i) = image {
        r["image"] = i;
    }
    if let Some(v) = video {
        r["video"] = json!(v);
    }
    r
}

/// Writes the data set; returns the texts (for the tokenizer) and the path of train.jsonl.
fn write_data(dir: &Path, a: &SynthArgs) -> anyhow::Result<(Vec<String>, PathBuf)> {
    std::fs::create_dir_all(dir.join("images")).with_context(|| format!("creating {}", dir.display()))?;
    let mut rng = Rng::keyed(&[a.seed, 0x7379]);
    let mut lines = Vec::new();
    let mut texts = Vec::new();
    for k in 0..a.samples {
        let shape = SHAPES[k % 3];
        let (cname, color) = COLORS[(k / 3) % 4];
        let (w, h) = SIZES[k % SIZES.len()];
        let rec = match k % 8 {
            5 => {
                let (c2, col2) = COLORS[(k + 1) % 4];
                let s2 = SHAPES[(k + 1) % 3];
                let f1 = format!("images/{k:03}_a.png");
                let f2 = format!("images/{k:03}_b.png");
                save_image(&draw(shape, color, w, h, &mut rng), &dir.join(&f1))?;
                save_image(&draw(s2, col2, 112, 112, &mut rng), &dir.join(&f2))?;
                record(
                    Some(json!([f1, f2])),
                    None,
                    "<image>\n<image>\nWhat are the two shapes?",
                    &format!("A {cname} {shape} and a {c2} {s2}."),
                )
            }
            6 if !a.no_video => {
                std::fs::create_dir_all(dir.join("videos"))?;
                let f = format!("videos/{k:03}.mp4");
                let frames: Vec<RgbImage> = (0..16)
                    .map(|t| {
                        let mut img = RgbImage::from_pixel(112, 112, Rgb([235, 235, 240]));
                        let x0 = 8 + t * 5;
                        for y in 40..72 {
                            for x in x0..x0 + 28 {
                                img.put_pixel(x.min(111), y, Rgb(color));
                            }
                        }
                        img
                    })
                    .collect();
                write_video(&frames, &dir.join(&f))?;
                record(
                    None,
                    Some(&f),
                    "<video>\nWhat moves in the video?",
                    &format!("A {cname} square moves to the right."),
                )
            }
            7 => {
                let (x, y) = (k % 5 + 1, k % 3 + 2);
                record(None, None, &format!("What is {x} plus {y}?"), &format!("It is {}.", x + y))
            }
            _ => {
                let ext = if k % 2 == 0 { "png" } else { "jpg" };
                let f = format!("images/{k:03}.{ext}");
                save_image(&draw(shape, color, w, h, &mut rng), &dir.join(&f))?;
                record(Some(json!(f)), None, "<image>\nWhat shape is in the image?", &format!("A {cname} {shape}."))
            }
        };
        for t in rec["conversations"].as_array().into_iter().flatten() {
            texts.push(t["value"].as_str().unwrap_or_default().to_string());
        }
        lines.push(serde_json::to_string(&rec)?);
    }
    let path = dir.join("train.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").with_context(|| format!("writing {}", path.display()))?;
    Ok((texts, path))
}

/// Trains a byte-level BPE tokenizer on `texts` with InternVL's special tokens and writes
/// tokenizer.json and tokenizer_config.json into `dir`.
pub fn write_tokenizer(dir: &Path, texts: &[String], vocab_size: usize) -> anyhow::Result<()> {
    let specials: Vec<AddedToken> = SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)).collect();
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(alphabet)
        .special_tokens(specials.clone())
        .build()
        .into();
    let mut tok = tokenizers::Tokenizer::new(BPE::default());
    // As Qwen2's tokenizer: no prefix space (tokenizer libraries disagree on where they add one).
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    let mut corpus: Vec<String> = texts.to_vec();
    corpus.push(SYSTEM_MESSAGE.to_string());
    for role in ["system", "user", "assistant"] {
        corpus.push(format!("{role}\n"));
    }
    for k in 1..=12 {
        corpus.push(format!("Frame-{k}: "));
    }
    tok.train(&mut trainer, corpus.iter()).map_err(|e| anyhow::anyhow!("training the tokenizer: {e}"))?;
    tok.add_special_tokens(&specials);
    let n = tok.get_vocab_size(true);
    anyhow::ensure!(n <= vocab_size, "the synthetic tokenizer has {n} tokens, more than vocab_size {vocab_size}");
    let path = dir.join("tokenizer.json");
    tok.save(&path, true).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    let cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": DEFAULT_PAD,
        "eos_token": IM_END,
        "model_max_length": 4096,
        "add_bos_token": false,
    });
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&cfg)?)?;
    Ok(())
}

/// `Err(UsageError(msg))` unless `ok`.
fn check(ok: bool, msg: impl FnOnce() -> String) -> anyhow::Result<()> {
    if ok {
        Ok(())
    } else {
        usage(msg())
    }
}

/// Refuses an `--out` that exists and is not an empty folder, unless `force`: then removes it
/// (never a folder holding the working directory).
/// What `--force` may delete in an `--out` folder: what synth writes, and the save and log
/// folders of runs trained from it (the README's `runs/tiny/save`).
const SYNTH_ENTRIES: [&str; 4] = ["model", "data", "save", "logs"];

fn clear_out(out: &Path, force: bool) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(anyhow::anyhow!("--out {}: {e}", out.display())),
    };
    let empty_dir =
        meta.is_dir() && std::fs::read_dir(out).with_context(|| format!("--out {}", out.display()))?.next().is_none();
    if empty_dir {
        return Ok(());
    }
    let what = if meta.is_dir() { "is a folder that is not empty" } else { "exists and is not a folder" };
    if !force {
        return usage(format!(
            "--out {}: {what}; pass --force to replace it (its contents are deleted), or choose another folder",
            out.display()
        ));
    }
    if meta.is_dir() {
        // Only what a synth folder holds (its model and data, and the runs trained from it) is
        // deleted: `--out ~ --force` must not wipe a home folder.
        let mut foreign: Vec<String> = std::fs::read_dir(out)
            .with_context(|| format!("--out {}", out.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !SYNTH_ENTRIES.contains(&n.as_str()))
            .collect();
        foreign.sort();
        check(foreign.is_empty(), || {
            format!(
                "--out {} --force: it holds {} besides a synth folder's {}; refusing to delete it (choose another \
                 folder)",
                out.display(),
                foreign.join(", "),
                SYNTH_ENTRIES.join(", ")
            )
        })?;
        let full = out.canonicalize().with_context(|| format!("--out {}", out.display()))?;
        let cwd = std::env::current_dir().unwrap_or_default();
        check(!cwd.starts_with(&full), || {
            format!("--out {} --force: the folder holds the working directory; refusing to delete it", out.display())
        })?;
        std::fs::remove_dir_all(out).with_context(|| format!("--force: removing {}", out.display()))?;
    } else {
        std::fs::remove_file(out).with_context(|| format!("--force: removing {}", out.display()))?;
    }
    Ok(())
}

pub fn run(a: SynthArgs) -> anyhow::Result<()> {
    let mut preset = mm_spec::preset(&a.model).map_err(|e| UsageError(format!("--model {}: {e}", a.model)))?;
    if let Some(n) = a.llm_layers {
        check(n > 0, || "--llm-layers 0: expected at least one layer".into())?;
        preset.llm.num_hidden_layers = n;
    }
    if let Some(n) = a.vit_layers {
        check(n > 0, || "--vit-layers 0: expected at least one layer".into())?;
        preset.vision.num_hidden_layers = n;
    }
    if let (Some(h), Some(kv)) = (a.llm_heads, a.llm_kv_heads) {
        check(h > 0 && kv > 0 && h % kv == 0, || {
            format!("--llm-heads {h} --llm-kv-heads {kv}: expected a multiple of the key/value heads")
        })?;
        let width = preset.llm.hidden_size / preset.llm.num_attention_heads;
        preset.llm.num_attention_heads = h;
        preset.llm.num_key_value_heads = kv;
        preset.llm.hidden_size = h * width;
    }
    if let Some(n) = a.vit_heads {
        check(n > 0, || "--vit-heads 0: expected at least one head".into())?;
        let width = preset.vision.hidden_size / preset.vision.num_attention_heads;
        preset.vision.num_attention_heads = n;
        preset.vision.hidden_size = n * width;
    }
    if let Some(r) = a.vit_drop_path_rate {
        check((0.0..1.0).contains(&r), || format!("--vit-drop-path-rate {r}: expected a probability in [0, 1)"))?;
        preset.vision.drop_path_rate = r;
    }
    check(preset.llm.vocab_size <= 4096, || {
        format!(
            "--model {}: synth builds small models only (tiny, tiny6b), this one has a {}-token vocabulary",
            a.model, preset.llm.vocab_size
        )
    })?;
    check(a.samples > 0, || "--samples 0: expected at least 1".into())?;
    clear_out(&a.out, a.force)?;
    let model_dir = a.out.join("model");
    let data_dir = a.out.join("data");
    std::fs::create_dir_all(&model_dir).with_context(|| format!("creating {}", model_dir.display()))?;
    let (texts, jsonl) = write_data(&data_dir, &a)?;
    write_tokenizer(&model_dir, &texts, preset.llm.vocab_size.min(512))?;
    let tok = crate::tokenizer::ChatTokenizer::open(&model_dir)?;

    tch::manual_seed(a.seed as i64);
    let vs = VarStore::new(Device::Cpu);
    let _model = InternVL::new(&vs.root(), &preset, tok.special.img_context, preset.llm.tie_word_embeddings);
    let mut weights: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    weights.sort_by(|x, y| x.0.cmp(&y.0));
    hf::save(&model_dir, &preset, &weights, 2 << 30)?;
    println!(
        "wrote {} ({} preset, {} tensors, tokenizer of {} tokens) and {} ({} records)",
        model_dir.display(),
        preset.name,
        weights.len(),
        tok.vocab_size(),
        jsonl.display(),
        a.samples
    );
    Ok(())
}
