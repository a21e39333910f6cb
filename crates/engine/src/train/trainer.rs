//! The training loop, top to bottom: lr → micro batches (forward, loss, backward) → clip →
//! AdamW step → log → checkpoint. Single process; the sync points of the distributed engine
//! will sit where the comments say.
//!
//! Determinism: torch's RNG (drop path) is reseeded from (seed, iteration) before every
//! iteration and the data stream is a pure function of (seed, position), so a run resumed from
//! a checkpoint computes bit-identical losses on the CPU.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use mm_spec::{Progress, ProgressEvent};
use tch::Kind;

use super::args::TrainArgs;
use super::checkpoint::{self, mm_name, SaveRequest, TrainerState};
use super::loss::{objective, sample_losses, StepTotals};
use super::optimizer::{AdamW, AdamWConfig};
use super::schedule::Schedule;
use crate::data::{records, Batch, DataConfig, Dataset, Loader, LoaderConfig, Producer};
use crate::rng::Rng;
use crate::session::{configure_cpu_threads, pick_device, to_device, Session, SessionOptions};

/// Tag of the per-iteration torch seed stream.
const TORCH_SEED: u64 = 0x746f726368;

pub fn torch_seed(seed: u64, iteration: u64) -> i64 {
    (Rng::keyed(&[seed, TORCH_SEED, iteration]).next_u64() >> 1) as i64
}

/// Builds the data set of `--data-path` for a model.
pub fn open_dataset(
    data_path: &std::path::Path,
    data_folder: Option<&std::path::Path>,
    session: &Session,
    cfg: DataConfig,
) -> anyhow::Result<Arc<Dataset>> {
    let loaded =
        records::load(data_path, data_folder).with_context(|| format!("--data-path {}", data_path.display()))?;
    Ok(Arc::new(Dataset { records: loaded.records, bad_lines: loaded.bad, tokenizer: session.tokenizer.clone(), cfg }))
}

pub fn data_config(args_seq: usize, s: &Session, a: &TrainArgs) -> DataConfig {
    DataConfig {
        image_size: s.preset.vision.image_size as u32,
        num_image_token: s.preset.num_image_token(),
        min_dynamic_patch: a.min_dynamic_patch,
        max_dynamic_patch: a.max_dynamic_patch,
        use_thumbnail: a.use_thumbnail,
        min_num_frame: a.min_num_frame,
        max_num_frame: a.max_num_frame,
        seq_length: args_seq,
    }
}

/// Mean loss (default reduction) over `iters` micro batches in file order, without gradients.
fn evaluate(
    session: &Session,
    ds: &Arc<Dataset>,
    mbs: usize,
    iters: u64,
    seed: u64,
    max_bad: f64,
) -> anyhow::Result<f64> {
    let cfg = LoaderConfig { seed, micro_batch: mbs, prefetch: 1, max_bad_fraction: max_bad, shuffle: false };
    let mut producer = Producer::new(ds.clone(), cfg, 0)?;
    let mut total = 0.0;
    tch::no_grad(|| -> anyhow::Result<()> {
        for _ in 0..iters {
            let b = producer.next_batch()?;
            let (input, labels) = to_device(&b, session.preset.vision.image_size, session.device);
            let logits = session.model.forward(&input, false)?;
            let l = sample_losses(&logits, &labels);
            let n: i64 = l.counts.iter().sum();
            total += l.sums.sum(Kind::Float).double_value(&[]) / n.max(1) as f64;
        }
        Ok(())
    })?;
    Ok(total / iters.max(1) as f64)
}

pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    let r = a.validate().map_err(|e| anyhow::anyhow!("invalid train flags:\n  {e}"))?;
    for (flag, v) in
        [("--recompute-granularity", &a.recompute_granularity), ("--recompute-method", &a.recompute_method)]
    {
        if let Some(v) = v {
            eprintln!(
                "warning: {flag} {v}: activation recomputation is not implemented in this engine; activations are kept"
            );
        }
    }
    let device = pick_device(&a.device)?;
    configure_cpu_threads(device);
    let session = Session::open(SessionOptions {
        model: &a.model,
        load: a.load.as_deref(),
        tokenizer: a.tokenizer.as_deref(),
        device,
        seed: a.seed,
        bf16: r.bf16,
    })?;
    let preset = session.preset.clone();
    for (flag, v, depth) in [
        ("--llm-pp-layers", &a.llm_pp_layers, preset.llm.num_hidden_layers),
        ("--vit-pp-layers", &a.vit_pp_layers, preset.vision.num_hidden_layers),
    ] {
        if let Some(s) = v {
            anyhow::ensure!(
                s.trim() == depth.to_string(),
                "{flag} {s}: with one pipeline stage it must be the depth, {depth}"
            );
        }
    }

    // Freezing, then the optimizer over what is left.
    let mut trainable = Vec::new();
    for (name, t) in session.named_parameters() {
        let frozen = (a.freeze_vision && name.starts_with("vision_model."))
            || (a.freeze_projector && name.starts_with("mlp1."))
            || (a.freeze_llm && name.starts_with("language_model."));
        let _ = t.set_requires_grad(!frozen);
        if !frozen {
            trainable.push((name, t));
        }
    }
    let n_train: i64 = trainable.iter().map(|(_, t)| t.numel() as i64).sum();
    let n_all: i64 = session.named_parameters().iter().map(|(_, t)| t.numel() as i64).sum();
    let mut opt = AdamW::new(
        trainable,
        AdamWConfig { beta1: a.adam_beta1, beta2: a.adam_beta2, eps: a.adam_eps, weight_decay: a.weight_decay },
    );

    // Resume state.
    let mut seed = a.seed;
    let mut iteration = 0u64;
    let mut consumed = 0u64;
    let mut position = 0u64;
    let mut last_loss = f64::NAN;
    if let Some(src) = &session.source {
        if let Some(state) = src.trainer_state()? {
            iteration = state.iteration;
            consumed = state.consumed_samples;
            position = state.data_position;
            last_loss = state.loss;
            if !a.no_load_rng {
                if let Some(s) = state.seed {
                    seed = s;
                }
            }
            if !a.no_load_optim {
                let step = state.optimizer_step.with_context(|| {
                    format!(
                        "{}: the optimizer state was not saved (--no-save-optim); pass --no-load-optim",
                        src.describe()
                    )
                })?;
                let tensors = src.optimizer_tensors(device)?.with_context(|| {
                    format!("{}: {} is missing; pass --no-load-optim", src.describe(), checkpoint::OPTIMIZER_FILE)
                })?;
                opt.load_state(&tensors, step, mm_name).with_context(|| src.describe())?;
            }
        } else if let Some(it) = src.iteration() {
            anyhow::bail!("{}: iteration {it} has no {}", src.describe(), checkpoint::STATE_FILE);
        }
    }
    let schedule = Schedule::new(a.lr, a.min_lr, a.lr_warmup_fraction, a.train_iters, r.decay);

    let ds = open_dataset(&a.data_path, a.data_folder.as_deref(), &session, data_config(a.seq_length, &session, &a))?;
    let loader_cfg = LoaderConfig {
        seed,
        micro_batch: a.micro_batch_size,
        prefetch: a.prefetch.max(r.grad_accumulation),
        max_bad_fraction: a.max_bad_fraction,
        shuffle: true,
    };
    println!(
        "mm-engine train: model {} ({} parameters, {} trainable), {} records, device {:?}, {}, \
         micro batch {} × accumulation {} = global batch {}, loss {:?}, from iteration {}",
        preset.name,
        n_all,
        n_train,
        ds.records.len(),
        device,
        if r.bf16 { "bf16 with fp32 master weights" } else { "fp32" },
        a.micro_batch_size,
        r.grad_accumulation,
        r.global_batch_size,
        r.loss,
        iteration
    );
    if let Some(src) = &session.source {
        println!("loaded {}", src.describe());
    }

    let mut last_ckpt: Option<PathBuf> = None;
    let save =
        |iteration: u64, loss: f64, lr: f64, consumed: u64, position: u64, opt: &AdamW| -> anyhow::Result<PathBuf> {
            let Some(dir) = &a.save else { anyhow::bail!("no --save dir") };
            let state = TrainerState {
                iteration,
                consumed_samples: consumed,
                data_position: position,
                optimizer_step: (!a.no_save_optim).then_some(opt.step),
                seed: (!a.no_save_rng).then_some(seed),
                train_iters: a.train_iters,
                global_batch_size: r.global_batch_size as u64,
                lr,
                loss,
            };
            let weights = session.named_parameters();
            let path = checkpoint::save(SaveRequest {
                save_dir: dir,
                iteration,
                preset: &preset,
                weights: &weights,
                optimizer: (!a.no_save_optim).then(|| opt.state_tensors(mm_name)),
                state: &state,
                assets_from: session.assets.clone(),
            })
            .with_context(|| format!("saving iteration {iteration} to {}", dir.display()))?;
            println!("saved checkpoint at iteration {iteration} to {}", path.display());
            println!("{}", ProgressEvent::Checkpoint { iteration, path: path.display().to_string() }.to_line());
            Ok(path)
        };

    if iteration >= a.train_iters {
        println!("nothing to train: the checkpoint is at iteration {iteration}, --train-iters is {}", a.train_iters);
        println!(
            "{}",
            ProgressEvent::Done { iteration, final_loss: last_loss, tokens_per_sec: 0.0, checkpoint: None }.to_line()
        );
        return Ok(());
    }

    let mut loader = Loader::start(ds.clone(), loader_cfg, position)?;
    let run_start = Instant::now();
    let (mut total_tokens, mut total_samples, mut steps_done) = (0u64, 0u64, 0u64);
    let (mut log_loss, mut log_iters, mut log_tokens, mut log_samples) = (0.0f64, 0u64, 0u64, 0u64);
    let mut log_data_ms = 0.0f64;
    let mut log_start = Instant::now();
    let mut last_lr = 0.0;
    let mut saved_at = None;

    while iteration < a.train_iters {
        let step_start = Instant::now();
        let lr = schedule.lr_at(iteration);
        iteration += 1;
        tch::manual_seed(torch_seed(seed, iteration));

        // The step's micro batches (the data-parallel all-reduce of token counts goes here).
        let wait = Instant::now();
        let batches: Vec<Batch> =
            (0..r.grad_accumulation).map(|_| loader.next_batch()).collect::<Result<_, _>>().context("data")?;
        log_data_ms += wait.elapsed().as_secs_f64() * 1e3;
        let totals = StepTotals {
            micro_batches: batches.len(),
            samples: batches.iter().map(|b| b.rows).sum(),
            tokens: batches
                .iter()
                .map(|b| {
                    b.labels
                        .chunks(b.len)
                        .map(|row| row.iter().skip(1).filter(|&&l| l != -100).count() as i64)
                        .sum::<i64>()
                })
                .sum(),
        };

        let mut step_loss = 0.0;
        for b in &batches {
            let (input, labels) = to_device(b, preset.vision.image_size, device);
            let logits = session.model.forward(&input, true)?;
            let losses = sample_losses(&logits, &labels);
            let obj = objective(r.loss, &losses, totals);
            step_loss += obj.double_value(&[]);
            obj.backward();
            opt.accumulate();
        }
        // (Gradient all-reduce / reduce-scatter over data-parallel ranks goes here.)
        let grad_norm = opt.clip(a.clip_grad);
        opt.step(lr);
        opt.zero_grad();

        let tokens: u64 = batches.iter().map(|b| b.tokens() as u64).sum();
        consumed += totals.samples as u64;
        position = batches.last().map(|b| b.end_position).unwrap_or(position);
        total_tokens += tokens;
        total_samples += totals.samples as u64;
        steps_done += 1;
        last_loss = step_loss;
        last_lr = lr;
        log_loss += step_loss;
        log_iters += 1;
        log_tokens += tokens;
        log_samples += totals.samples as u64;
        let step_ms = step_start.elapsed().as_secs_f64() * 1e3;

        if iteration % a.log_interval == 0 || iteration == a.train_iters {
            let secs = log_start.elapsed().as_secs_f64().max(1e-9);
            let loss = log_loss / log_iters as f64;
            let tps = log_tokens as f64 / secs;
            let sps = log_samples as f64 / secs;
            let mut line = format!(
                " iteration {iteration:>8}/{:>8} | consumed samples: {consumed:>10} | elapsed time per iteration (ms): {:.1} | \
                 data wait (ms): {:.1} | learning rate: {lr:.6E} | global batch size: {:>5} | lm loss: {loss:.6E} | \
                 grad norm: {grad_norm:.4}",
                a.train_iters,
                secs * 1e3 / log_iters as f64,
                log_data_ms / log_iters as f64,
                r.global_batch_size
            );
            if a.log_tps {
                line.push_str(&format!(
                    " | tokens per sample: {:.1} | tokens/s: {tps:.1}",
                    log_tokens as f64 / log_samples.max(1) as f64
                ));
            }
            println!("{line}");
            let ev = ProgressEvent::Step(Progress {
                iteration,
                train_iters: a.train_iters,
                loss,
                lr,
                grad_norm: Some(grad_norm),
                tokens_per_sec: tps,
                samples_per_sec: sps,
                step_ms,
                mem_bytes: None,
                consumed_samples: consumed,
            });
            println!("{}", ev.to_line());
            (log_loss, log_iters, log_tokens, log_samples, log_data_ms) = (0.0, 0, 0, 0, 0.0);
            log_start = Instant::now();
        }
        if a.eval_interval > 0 && a.eval_iters > 0 && iteration % a.eval_interval == 0 {
            let v = evaluate(&session, &ds, a.micro_batch_size, a.eval_iters, seed, a.max_bad_fraction)?;
            println!(" validation loss at iteration {iteration} | lm loss: {v:.6E} | lm loss PPL: {:.6E}", v.exp());
        }
        if a.save.is_some() && a.save_interval > 0 && iteration % a.save_interval == 0 {
            last_ckpt = Some(save(iteration, last_loss, lr, consumed, position, &opt)?);
            saved_at = Some(iteration);
        }
        if a.exit_interval.is_some_and(|n| n > 0 && iteration % n == 0) && iteration < a.train_iters {
            println!("exiting at iteration {iteration} (--exit-interval)");
            break;
        }
    }
    drop(loader);
    if a.save.is_some() && saved_at != Some(iteration) {
        last_ckpt = Some(save(iteration, last_loss, last_lr, consumed, position, &opt)?);
    }

    let secs = run_start.elapsed().as_secs_f64().max(1e-9);
    let tps = total_tokens as f64 / secs;
    println!(
        "throughput: {steps_done} iterations in {secs:.2} s ({:.1} ms per iteration), {total_samples} samples ({:.3} samples/s), \
         {total_tokens} tokens ({tps:.1} tokens/s)",
        secs * 1e3 / steps_done.max(1) as f64,
        total_samples as f64 / secs
    );
    println!(
        "{}",
        ProgressEvent::Done {
            iteration,
            final_loss: last_loss,
            tokens_per_sec: tps,
            checkpoint: last_ckpt.map(|p| p.display().to_string()),
        }
        .to_line()
    );
    Ok(())
}
