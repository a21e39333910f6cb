//! `mm-engine eval`: the SFT loss of a checkpoint on a data set, without training.
//!
//! Records are taken in file order; each sample's loss is the mean over its supervised tokens.
//! The summary gives the per-token mean over the whole set and the mean of the per-sample
//! losses. `--dump-logits N --out FILE` writes the first N samples' logits, inputs and labels
//! to a safetensors file (`sample.{i}.logits` [T, V] f32, `sample.{i}.input_ids`,
//! `sample.{i}.labels` [T] i64, `sample.{i}.pixel_values` [tiles, 3, S, S] f32 when the sample
//! has images; the record origins in the metadata), so another implementation can replay the
//! exact inputs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tch::{Device, Kind, Tensor};

use crate::data::{Batch, LoaderConfig, Producer, Share};
use crate::session::{configure_cpu_threads, pick_device, to_device, Session, SessionOptions};
use crate::train::args::PreprocessArgs;
use crate::train::loss::sample_losses;
use crate::train::trainer::open_dataset;
use crate::weights::safetensors as st;

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Checkpoint: save dir, MM iteration folder or HF folder.
    #[arg(long)]
    pub load: PathBuf,
    /// InternVL chat JSONL, or a meta JSON listing several (as `train --data-path`).
    #[arg(long, visible_alias = "data")]
    pub data_path: PathBuf,
    /// The flag the data path was given with (`--data-path` or its alias `--data`), for messages.
    #[arg(skip = String::from("--data-path"))]
    pub data_flag: String,
    /// Root of the image/video paths in the records (default: the JSONL's folder).
    #[arg(long)]
    pub data_folder: Option<PathBuf>,
    /// tokenizer.json or a folder with one (default: the checkpoint's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Preset name used when the checkpoint's config has none.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Tokens per sample; longer samples are cut (as `train --seq-length`).
    #[arg(long, default_value_t = 4096)]
    pub seq_length: usize,
    #[command(flatten)]
    pub pre: PreprocessArgs,
    /// Fraction of unreadable records tolerated before failing (default 1: skip them all with a
    /// warning; `train` defaults to 0.01).
    #[arg(long, default_value_t = 1.0)]
    pub max_bad_fraction: f64,
    /// Seed of video frame sampling.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Evaluate at most this many samples (default: all).
    #[arg(long)]
    pub limit: Option<usize>,
    /// cpu, cuda, cuda:N or auto (cuda when available).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Write the logits of the first N samples to --out.
    #[arg(long, default_value_t = 0)]
    pub dump_logits: usize,
    /// Safetensors file the --dump-logits samples are written to.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the summary as one JSON object (after the per-sample lines).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EvalSummary {
    pub samples: usize,
    pub tokens: i64,
    /// Σ token losses / Σ tokens.
    pub loss_per_token: f64,
    /// Mean of the per-sample means.
    pub loss_per_sample: f64,
    pub per_sample: Vec<(String, f64, i64)>,
}

pub fn run(a: EvalArgs) -> anyhow::Result<EvalSummary> {
    let mut errs = Vec::new();
    if a.dump_logits > 0 && a.out.is_none() {
        errs.push(format!("--dump-logits {} needs --out FILE", a.dump_logits));
    }
    a.pre.check(&mut errs);
    if !(0.0..=1.0).contains(&a.max_bad_fraction) {
        errs.push(format!("--max-bad-fraction {}: expected a fraction in [0, 1]", a.max_bad_fraction));
    }
    if !errs.is_empty() {
        return crate::cli::usage(format!("invalid eval flags:\n  {}", errs.join("\n  ")));
    }
    let device = pick_device(&a.device)?;
    configure_cpu_threads(device, 1);
    let session = Session::open(SessionOptions {
        model: &a.model,
        load: Some(&a.load),
        tokenizer: a.tokenizer.as_deref(),
        device,
        seed: a.seed,
        bf16: false,
        vit_drop_path_rate: None,
        parts: None,
        tp: None,
    })?;
    let cfg = a.pre.data_config(&session.preset, a.seq_length);
    let ds = open_dataset(&a.data_path, &a.data_flag, a.data_folder.as_deref(), &session, cfg)?;
    let n = a.limit.unwrap_or(ds.records.len()).min(ds.records.len());
    let lc = LoaderConfig {
        seed: a.seed,
        micro_batch: 1,
        prefetch: 1,
        workers: 1,
        max_bad_fraction: a.max_bad_fraction,
        shuffle: false,
        share: Share::ALL,
    };
    let mut producer = Producer::new(ds.clone(), lc, 0)?;
    let mut dumped: Vec<(String, Tensor)> = Vec::new();
    let mut origins = Vec::new();
    let mut s =
        EvalSummary { samples: 0, tokens: 0, loss_per_token: 0.0, loss_per_sample: 0.0, per_sample: Vec::new() };
    let mut sum = 0.0;
    tch::no_grad(|| -> anyhow::Result<()> {
        // One pass in file order; records that give no sample are skipped (with a warning).
        for slot in 0..ds.records.len() as u64 {
            if s.samples >= n {
                break;
            }
            let Some(sample) = producer.sample_at(slot)? else { continue };
            let b = Batch::collate(vec![sample], ds.tokenizer.special.pad, slot + 1);
            let (input, labels) = to_device(&b, session.preset.vision.image_size, device);
            let logits = session.model.forward(&input, false)?;
            let l = sample_losses(&logits, &labels);
            let total = l.sums.double_value(&[0]);
            let count = l.counts[0];
            let mean = total / count.max(1) as f64;
            println!("sample {}: loss {mean:.6} over {count} tokens", b.origins[0]);
            if origins.len() < a.dump_logits {
                let i = origins.len();
                dumped.push((format!("sample.{i}.logits"), logits.get(0).to_kind(Kind::Float).to_device(Device::Cpu)));
                dumped.push((format!("sample.{i}.input_ids"), input.input_ids.get(0).to_device(Device::Cpu)));
                dumped.push((format!("sample.{i}.labels"), labels.get(0).to_device(Device::Cpu)));
                if let Some(px) = &input.pixel_values {
                    dumped.push((format!("sample.{i}.pixel_values"), px.to_kind(Kind::Float).to_device(Device::Cpu)));
                }
                origins.push(b.origins[0].clone());
            }
            s.per_sample.push((b.origins[0].clone(), mean, count));
            sum += total;
            s.tokens += count;
            s.samples += 1;
        }
        Ok(())
    })?;
    anyhow::ensure!(s.samples > 0, "{} {}: no sample could be evaluated", a.data_flag, a.data_path.display());
    s.loss_per_token = sum / s.tokens.max(1) as f64;
    s.loss_per_sample = s.per_sample.iter().map(|p| p.1).sum::<f64>() / s.samples as f64;
    println!(
        "total: {} samples, {} tokens, loss per token {:.6}, mean per-sample loss {:.6}",
        s.samples, s.tokens, s.loss_per_token, s.loss_per_sample
    );
    if let Some(out) = &a.out {
        if a.dump_logits > 0 {
            let meta = BTreeMap::from([("origins".to_string(), serde_json::to_string(&origins).expect("json"))]);
            st::write(out, &dumped, &meta).with_context(|| format!("--out {}", out.display()))?;
            println!("wrote the logits of {} samples to {}", origins.len(), out.display());
        }
    }
    if a.json {
        println!("{}", serde_json::to_string(&s).expect("json"));
    }
    Ok(s)
}
