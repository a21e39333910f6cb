//! The training loop, top to bottom: lr → micro batches (forward, loss, backward) → gradient
//! reduction over the data-parallel ranks → clip → AdamW step → log → eval → checkpoint.
//! Lines marked `SYNC` are collectives: every data-parallel rank runs them in the same order
//! (see `dp.rs` for the loss normalization that makes N ranks compute one rank's step).
//!
//! Determinism: torch's RNG (drop path) is reseeded from (seed, iteration, global micro batch)
//! before every micro batch and the data stream is a pure function of (seed, slot), so a run
//! resumed from a checkpoint computes bit-identical losses on the CPU, and N data-parallel ranks
//! see the samples and randomness one rank would.
//!
//! Output: every rank prints plain text; only global rank 0 prints `@@mm-progress` lines
//! (throughput over the whole data-parallel group) and only DP rank 0 writes the shared
//! checkpoint files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use mm_spec::checkpoint::{iteration_dir, Iteration};
use mm_spec::{Progress, ProgressEvent};
use tch::{Kind, Tensor};

use super::args::{Resolved, TrainArgs};
use super::checkpoint::{self, mm_name, CkptFormat, RankDir, SaveRequest, SavedState, TrainerState};
use super::dp::{fingerprint, DataParallel};
use super::loss::{objective, sample_losses, sample_losses_with, StepTotals, IGNORE};
use super::optimizer::{AdamW, AdamWConfig};
use super::pipeline::{self, StepContext};
use super::schedule::Schedule;
use super::zero::{SavedOptimizer, ZeroAdamW};
use crate::data::{records, Batch, DataConfig, Dataset, Loader, LoaderConfig, Producer, Share};
use crate::dist::c10d::{set_grad, DistError};
use crate::dist::env::DistEnv;
use crate::model::tp::Tp;
use crate::model::StagePart;
use crate::rng::Rng;
use crate::session::{configure_cpu_threads, pick_device, to_device, RankModel, Session, SessionOptions};
use crate::weights::checkpoint as source;
use crate::weights::slices::TpSlices;

/// Tag of the torch seed stream.
const TORCH_SEED: u64 = 0x746f726368;

/// The torch seed of global micro batch `micro_batch` (0-based within the global batch) of
/// `iteration`: the same whichever rank runs it.
pub fn torch_seed(seed: u64, iteration: u64, micro_batch: u64) -> i64 {
    (Rng::keyed(&[seed, TORCH_SEED, iteration, micro_batch]).next_u64() >> 1) as i64
}

/// Builds the data set of `--data-path` for a model.
pub fn open_dataset(
    data_path: &Path,
    data_folder: Option<&Path>,
    session: &Session,
    cfg: DataConfig,
) -> anyhow::Result<Arc<Dataset>> {
    let loaded =
        records::load(data_path, data_folder).with_context(|| format!("--data-path {}", data_path.display()))?;
    Ok(Arc::new(Dataset { records: loaded.records, bad_lines: loaded.bad, tokenizer: session.tokenizer.clone(), cfg }))
}

/// Mean loss (default reduction) over `iters` micro batches in file order, without gradients;
/// DP rank r evaluates micro batches r, r + dp, … and the sum is all-reduced.
fn evaluate(session: &Session, ds: &Arc<Dataset>, a: &TrainArgs, seed: u64, dp: &DataParallel) -> anyhow::Result<f64> {
    let iters = a.eval_iters;
    let share = Share { rank: dp.rank, size: dp.size, micro_batches: 1 };
    let cfg = LoaderConfig {
        seed,
        micro_batch: a.micro_batch_size,
        prefetch: 1,
        workers: 1,
        max_bad_fraction: a.max_bad_fraction,
        shuffle: false,
        share,
    };
    let mut producer = Producer::new(ds.clone(), cfg, 0)?;
    let mine = (dp.rank as u64..iters).step_by(dp.size).count();
    let mut total = 0.0;
    tch::no_grad(|| -> anyhow::Result<()> {
        for _ in 0..mine {
            let b = producer.next_batch()?;
            let (input, labels) = to_device(&b, session.preset.vision.image_size, session.device);
            let logits = session.model.forward(&input, false)?;
            let l = sample_losses(&logits, &labels);
            let n: i64 = l.counts.iter().sum();
            total += l.sums.sum(Kind::Float).double_value(&[]) / n.max(1) as f64;
        }
        Ok(())
    })?;
    let total = dp.sum(&[total], "evaluation loss")?[0]; // SYNC
    Ok(total / iters.max(1) as f64)
}

/// The optimizer: AdamW on every rank (replicated state), or ZeRO-1 over the DP group.
enum Optim {
    Replicated(AdamW),
    Sharded(ZeroAdamW),
}

impl Optim {
    fn accumulate(&mut self) {
        match self {
            Optim::Replicated(o) => o.accumulate(),
            Optim::Sharded(z) => z.accumulate(),
        }
    }

    /// Which parameters have a gradient on this rank (defined once received, as tch keeps them).
    fn received(&self) -> Vec<bool> {
        match self {
            Optim::Replicated(o) => (0..o.params.len()).map(|i| o.grad(i).is_some()).collect(),
            Optim::Sharded(z) => z.received().to_vec(),
        }
    }

    /// Sums the gradients over the DP group. `received`: the parameters some rank has a
    /// gradient for (a rank without one contributes zeros).
    fn reduce(&mut self, dp: &DataParallel, received: &[bool], bucket_bytes: usize) -> Result<(), DistError> {
        match self {
            Optim::Sharded(z) => z.reduce(dp, received),
            Optim::Replicated(o) => {
                if dp.size == 1 {
                    return Ok(());
                }
                let mut grads = Vec::new();
                for (i, _) in received.iter().enumerate().filter(|(_, r)| **r) {
                    match o.grad(i) {
                        Some(g) => grads.push(g),
                        None => {
                            let p = &o.params[i].param;
                            let zeros = tch::no_grad(|| p.zeros_like());
                            set_grad(p, &zeros).map_err(|message| DistError {
                                rank: dp.global_rank,
                                op: format!("zero gradient for {}", o.params[i].name),
                                message,
                            })?;
                            grads.push(p.grad());
                        }
                    }
                }
                dp.all_reduce_grads(&grads, bucket_bytes).map(|_| ())
            }
        }
    }

    /// Clips to the global gradient norm: every parameter counted once over the data-parallel
    /// shards, tensor-parallel slices (`counted`: a parameter name counts on this rank) and
    /// pipeline stages.
    fn clip(&mut self, dp: &DataParallel, max_norm: f64, counted: &dyn Fn(&str) -> bool) -> Result<f64, DistError> {
        match self {
            Optim::Replicated(o) => {
                let sq = dp.tp_sum(&[o.grad_sq_of(counted)], "squared gradient norms of the tensor-parallel slices")?;
                let norm = dp.pp_sum(&sq, "squared gradient norms of the pipeline stages")?[0].sqrt();
                o.clip_to(norm, max_norm);
                Ok(norm)
            }
            Optim::Sharded(z) => {
                let by_mm = |mm: &str| counted(&mm_spec::hf::original_key(mm).unwrap_or_else(|| mm.to_string()));
                z.clip(dp, max_norm, &by_mm)
            }
        }
    }

    fn step(&mut self, dp: &DataParallel, lr: f64) -> Result<(), DistError> {
        match self {
            Optim::Replicated(o) => {
                o.step(lr);
                Ok(())
            }
            Optim::Sharded(z) => z.step(dp, lr),
        }
    }

    fn zero_grad(&mut self) {
        match self {
            Optim::Replicated(o) => o.zero_grad(),
            Optim::Sharded(z) => z.zero_grad(),
        }
    }

    fn steps(&self) -> u64 {
        match self {
            Optim::Replicated(o) => o.step,
            Optim::Sharded(z) => z.step,
        }
    }

    fn load(&mut self, saved: &SavedOptimizer, step: u64) -> anyhow::Result<()> {
        match self {
            Optim::Replicated(o) => {
                let names: Vec<String> = o.params.iter().map(|p| mm_name(&p.name)).collect();
                let tensors = saved.per_param(&names).map_err(|e| anyhow::anyhow!("optimizer state: {e}"))?;
                o.load_state(&tensors, step, mm_name)?;
            }
            Optim::Sharded(z) => z.load_state(saved, step)?,
        }
        Ok(())
    }
}

/// What a checkpoint save needs besides the optimizer and the counters.
struct Saver<'a> {
    a: &'a TrainArgs,
    /// The layout the run trains with (each pipeline stage saves its part of it).
    layout: mm_spec::LayoutRequest,
    r: &'a Resolved,
    session: &'a Session,
    dp: &'a DataParallel,
    seed: u64,
    /// Tells this run's temporary folders apart (rank 0's process id).
    tag: String,
}

struct Counters {
    iteration: u64,
    consumed: u64,
    position: u64,
    loss: f64,
    lr: f64,
}

impl Saver<'_> {
    /// Writes one iteration: DP rank 0 prepares the temporary folder, writes the shared files
    /// and commits; with the distributed optimizer every rank writes its shard in between.
    fn save(&self, c: &Counters, opt: &Optim) -> anyhow::Result<PathBuf> {
        let (a, dp) = (self.a, self.dp);
        let Some(dir) = &a.save else { anyhow::bail!("no --save dir") };
        let what = || format!("saving iteration {} to {}", c.iteration, dir.display());
        let save_optim = !a.no_save_optim;
        let state = TrainerState {
            iteration: c.iteration,
            consumed_samples: c.consumed,
            data_position: c.position,
            optimizer_step: save_optim.then_some(opt.steps()),
            seed: (!a.no_save_rng).then_some(self.seed),
            train_iters: a.train_iters,
            global_batch_size: self.r.global_batch_size as u64,
            lr: c.lr,
            loss: c.loss,
            data_parallel_size: (dp.size > 1).then_some(dp.size),
            // With pipeline stages each keeps its own beside its shards.
            optimizer_layout: match opt {
                Optim::Sharded(z) if save_optim && dp.pp_size == 1 && dp.tp_size == 1 => Some(z.layout.clone()),
                _ => None,
            },
        };
        let stage = RankDir { tp_rank: dp.tp_rank, pp_rank: dp.pp_rank, pp: dp.pp_size };
        let tmp = checkpoint::tmp_dir(dir, c.iteration, &self.tag);
        if dp.global_rank == 0 {
            checkpoint::prepare(dir, &tmp).with_context(what)?;
        }
        dp.world_barrier("checkpoint: temporary folder ready")?; // SYNC
        if let (Optim::Sharded(z), true) = (opt, save_optim) {
            checkpoint::write_optimizer_shard(&tmp, stage, dp.rank, dp.size, &z.state_tensors()).with_context(what)?;
            if dp.rank == 0 && (dp.pp_size > 1 || dp.tp_size > 1) {
                checkpoint::write_stage_layout(&tmp, stage, &z.layout).with_context(what)?;
            }
        }
        if dp.rank == 0 {
            let weights = self.session.named_parameters();
            let optimizer = match opt {
                Optim::Replicated(o) if save_optim => Some(o.state_tensors(mm_name)),
                _ => None,
            };
            let req = SaveRequest {
                format: self.a.ckpt_format,
                layout: self.layout.clone(),
                rank: stage,
                save_dir: dir,
                iteration: c.iteration,
                preset: &self.session.preset,
                weights: &weights,
                optimizer,
                state: &state,
                assets_from: self.session.assets.clone(),
            };
            let dtype = checkpoint::write_stage(&tmp, &req).with_context(what)?;
            if dp.global_rank == 0 {
                checkpoint::write_common(&tmp, &req, dtype).with_context(what)?;
            }
        }
        dp.world_barrier("checkpoint: every rank's files written")?; // SYNC
        let path = if dp.global_rank == 0 {
            checkpoint::commit(dir, &tmp, c.iteration).with_context(what)?
        } else {
            iteration_dir(dir, Iteration::Step(c.iteration))
        };
        dp.world_barrier("checkpoint: committed")?; // SYNC
        if let (Optim::Sharded(_), true) = (opt, save_optim) {
            let mine = path.join(stage.name()).join(source::optimizer_shard_file(dp.rank, dp.size));
            anyhow::ensure!(
                mine.exists(),
                "{}: {} is not there after the commit: --save must be a folder every rank shares",
                what(),
                mine.display()
            );
        }
        if dp.global_rank == 0 {
            println!("saved checkpoint at iteration {} to {}", c.iteration, path.display());
            println!(
                "{}",
                ProgressEvent::Checkpoint { iteration: c.iteration, path: path.display().to_string() }.to_line()
            );
        }
        Ok(path)
    }
}

/// Supervised tokens (labels that count, after the shift) of a batch.
fn supervised_tokens(b: &Batch) -> i64 {
    b.labels.chunks(b.len.max(1)).map(|row| row.iter().skip(1).filter(|&&l| l != -100).count() as i64).sum()
}

/// `mm-engine train`. With several ranks every error names the rank that hit it.
pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    let env = DistEnv::from_process()?;
    train(a, &env).map_err(|e| {
        let named = e.chain().any(|c| c.is::<DistError>()) || e.to_string().starts_with("rank ");
        if env.world_size > 1 && !named {
            e.context(format!("rank {}", env.rank))
        } else {
            e
        }
    })
}

/// This process's resident memory (VmRSS of /proc/self/status); None where unavailable.
/// On CUDA it is host memory only: the device's allocator is not visible through tch.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().strip_suffix("kB")?.trim().parse::<u64>();
    kb.ok().map(|k| k * 1024)
}

/// What to load: --save when --auto-resume finds its tracker file there, else --load.
/// A tracker that names a missing iteration folder is an error, not a silent fresh start.
fn resume_point(a: &TrainArgs) -> anyhow::Result<Option<PathBuf>> {
    let (Some(save), true) = (&a.save, a.auto_resume) else { return Ok(a.load.clone()) };
    let tracker = mm_spec::checkpoint::latest_path(save);
    if !tracker.exists() {
        return Ok(a.load.clone());
    }
    source::resolve(save, a.tokenizer.as_deref()).with_context(|| {
        format!(
            "--auto-resume: {} names a checkpoint that cannot be read; fix or remove it, or drop --auto-resume",
            tracker.display()
        )
    })?;
    Ok(Some(save.clone()))
}

fn train(a: TrainArgs, env: &DistEnv) -> anyhow::Result<()> {
    let r = a.validate(env.world_size).map_err(|e| anyhow::anyhow!("invalid train flags:\n  {e}"))?;
    for (flag, v) in
        [("--recompute-granularity", &a.recompute_granularity), ("--recompute-method", &a.recompute_method)]
    {
        if let Some(v) = v {
            if env.rank == 0 {
                eprintln!(
                    "warning: {flag} {v}: activation recomputation is not implemented in this engine; activations are kept"
                );
            }
        }
    }
    let device = pick_device(&a.device)?;
    configure_cpu_threads(device, env.local_world_size.min(env.world_size));
    // Rendezvous first: a rank that fails later (bad checkpoint, bad data) then makes the
    // others fail fast in their next collective instead of waiting for it at the store.
    let (pp, vpp) = (a.pipeline_model_parallel_size.max(1), a.virtual_pipeline_model_parallel_size);
    let tp = a.tensor_model_parallel_size.max(1);
    let dp = DataParallel::init(env, device, tp, pp, vpp.filter(|&v| v > 1))?;
    let load = resume_point(&a)?;
    if a.auto_resume {
        // Every rank reads --save's tracker on its own host: they only agree on shared storage.
        let what = "the resume point (--auto-resume reads --save's latest_checkpointed_iteration.txt on every \
                    host, so the save folder must be on storage all hosts share)";
        dp.agree(what, fingerprint(&format!("{load:?}")))?; // SYNC
    }
    if let (Some(l), 0) = (&load, dp.global_rank) {
        if Some(l) != a.load.as_ref() {
            println!(
                "auto-resume: {} holds a checkpoint; resuming from it{}",
                l.display(),
                a.load.as_ref().map(|p| format!(" instead of --load {}", p.display())).unwrap_or_default()
            );
        }
    }
    let stages = |preset: &mm_spec::ModelPreset| -> anyhow::Result<RankModel> {
        let parts = stage_parts(&a, preset, dp.pp_rank)?;
        let slices = if dp.tp_size > 1 {
            let layout = save_layout(&a, preset)?;
            Some(TpSlices::new(preset, &layout, dp.tp_rank).map_err(|e| anyhow::anyhow!("tensor parallelism: {e}"))?)
        } else {
            None
        };
        Ok(RankModel { parts, slices })
    };
    let session = Session::open(SessionOptions {
        model: &a.model,
        load: load.as_deref(),
        tokenizer: a.tokenizer.as_deref(),
        device,
        seed: a.seed,
        bf16: r.bf16,
        parts: Some(&stages),
        tp: dp.tp_group().map(|g| Tp::new(g, a.unaligned_linear, a.sequence_parallel)),
    })?;
    let preset = session.preset.clone();
    if a.save.is_some() && a.ckpt_format == CkptFormat::Torch && preset.llm.tie_word_embeddings {
        anyhow::bail!(
            "--ckpt-format torch: the model ties its output layer to the embedding, which MindSpeed-MM's InternVL3 \
             layout cannot express; save with --ckpt-format mm"
        );
    }
    let virtual_stages = vpp.unwrap_or(1).max(1);
    let actions = mm_spec::layout::schedule(pp, dp.pp_rank, r.grad_accumulation, virtual_stages)
        .map_err(|e| anyhow::anyhow!("pipeline schedule: {e}"))?;
    if pp > 1 {
        anyhow::ensure!(
            a.eval_interval == 0 || a.eval_iters == 0,
            "--eval-interval with pipeline parallelism: evaluation runs on one stage holding the whole model; pass \
             --eval-interval 0 (or evaluate a saved checkpoint with `mm-engine eval`)"
        );
        if dp.global_rank == 0 {
            println!(
                "pipeline: {pp} stages{}, {} micro batches per step: theoretical bubble {:.1}%",
                if virtual_stages > 1 { format!(" × {virtual_stages} virtual") } else { String::new() },
                r.grad_accumulation,
                100.0 * mm_spec::layout::theoretical_bubble(pp, virtual_stages, r.grad_accumulation)
            );
        }
    }
    let bucket_bytes = (a.dp_bucket_mb * (1u64 << 20) as f64).max(1.0) as usize;

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

    // Resume state.
    let mut seed = a.seed;
    let mut iteration = 0u64;
    let mut consumed = 0u64;
    let mut position = 0u64;
    let mut last_loss = f64::NAN;
    let mut resume_optim: Option<(SavedOptimizer, u64)> = None;
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
                let saved = src
                    .saved_optimizer(&state, RankDir { tp_rank: dp.tp_rank, pp_rank: dp.pp_rank, pp: dp.pp_size })?
                    .with_context(|| {
                        format!("{}: {} is missing; pass --no-load-optim", src.describe(), source::OPTIMIZER_FILE)
                    })?;
                resume_optim = Some((saved, step));
            }
        } else if let Some(it) = src.iteration() {
            anyhow::bail!("{}: iteration {it} has no {}", src.describe(), source::STATE_FILE);
        }
    }
    let schedule = Schedule::new(a.lr, a.min_lr, a.lr_warmup_fraction, a.train_iters, r.decay);
    let ds = open_dataset(
        &a.data_path,
        a.data_folder.as_deref(),
        &session,
        a.pre.data_config(&session.preset, a.seq_length),
    )?;

    // Every rank must run the same job from the same state: compare before the first
    // collective whose shape depends on it.
    let mut job = format!(
        "model {} params {n_all} trainable {n_train} gbs {} mbs {} ga {} seq {} iters {} seed {seed} lr {} loss {:?} \
         bf16 {} zero {} from {iteration}/{consumed}/{position} records {}",
        preset.name,
        r.global_batch_size,
        a.micro_batch_size,
        r.grad_accumulation,
        a.seq_length,
        a.train_iters,
        a.lr,
        r.loss,
        r.bf16,
        a.use_distributed_optimizer,
        ds.records.len()
    );
    for (n, t) in &trainable {
        job.push_str(&format!(" {n}{:?}{:?}", t.size(), t.kind()));
    }
    dp.agree("the job (flags, model, data, resume state)", fingerprint(&job))?; // SYNC

    // Replicas start identical whatever each rank loaded or initialized.
    let all_params: Vec<Tensor> = session.named_parameters().into_iter().map(|(_, t)| t).collect();
    dp.broadcast(&all_params, bucket_bytes, "initial parameters from data-parallel rank 0")?; // SYNC
                                                                                              // Global rank 0's process id: its DP group's first, then from pipeline stage 0, then from
                                                                                              // tensor-parallel rank 0.
    let tag = dp.gather(std::process::id() as i64, "run tag")?[0]; // SYNC
    let first_stage = if dp.pp_rank == 0 { tag as f64 } else { 0.0 };
    let tag = dp.pp_sum(&[first_stage], "run tag")?[0]; // SYNC
    let first_tp = if dp.tp_rank == 0 { tag } else { 0.0 };
    let tag = (dp.tp_sum(&[first_tp], "run tag")?[0] as i64).to_string(); // SYNC

    let cfg = AdamWConfig { beta1: a.adam_beta1, beta2: a.adam_beta2, eps: a.adam_eps, weight_decay: a.weight_decay };
    let sharded = a.use_distributed_optimizer && dp.size > 1;
    let mut opt = if sharded {
        let named: Vec<(String, Tensor)> = trainable.into_iter().map(|(n, t)| (mm_name(&n), t)).collect();
        Optim::Sharded(ZeroAdamW::new(named, cfg, &dp))
    } else {
        Optim::Replicated(AdamW::new(trainable, cfg))
    };
    if let (Some((saved, step)), Some(src)) = (&resume_optim, &session.source) {
        opt.load(saved, *step).with_context(|| src.describe())?;
    }
    drop(resume_optim);

    let loader_cfg = LoaderConfig {
        seed,
        micro_batch: a.micro_batch_size,
        prefetch: a.prefetch.max(r.grad_accumulation),
        workers: a.num_workers.max(1),
        max_bad_fraction: a.max_bad_fraction,
        shuffle: true,
        share: Share { rank: dp.rank, size: dp.size, micro_batches: r.grad_accumulation },
    };
    let parallel = if dp.size > 1 {
        format!(
            "data-parallel rank {} of {} ({}), ",
            dp.rank,
            dp.size,
            if sharded { "distributed optimizer" } else { "replicated optimizer" }
        )
    } else {
        String::new()
    };
    println!(
        "mm-engine train: {parallel}model {} ({} parameters, {} trainable), {} records, device {:?}, {}, \
         micro batch {} × accumulation {} × {} rank{} = global batch {}, loss {:?}, from iteration {}",
        preset.name,
        n_all,
        n_train,
        ds.records.len(),
        device,
        if r.bf16 { "bf16 with fp32 master weights" } else { "fp32" },
        a.micro_batch_size,
        r.grad_accumulation,
        dp.size,
        if dp.size == 1 { "" } else { "s" },
        r.global_batch_size,
        r.loss,
        iteration
    );
    if let (Some(src), 0) = (&session.source, dp.global_rank) {
        println!("loaded {}", src.describe());
        if let Some(n) = src.foreign_iteration() {
            println!(
                "note: iteration {n} was saved by MindSpeed-MM: its weights are loaded, its optimizer, scheduler and \
                 RNG state are Megatron's and are not; training starts at iteration 0 with a fresh optimizer (as \
                 Megatron's --finetune)"
            );
        }
    }
    let layout = save_layout(&a, &preset)?;
    let saver = Saver { a: &a, layout, r: &r, session: &session, dp: &dp, seed, tag };

    if iteration >= a.train_iters {
        println!(
            "nothing to train: the checkpoint is at iteration {iteration}, --train-iters is {}; raise --train-iters to \
             continue{}",
            a.train_iters,
            if load.is_some() && load == a.save && a.load != a.save {
                ", or remove the save folder to train from --load again"
            } else {
                ""
            }
        );
        if dp.global_rank == 0 {
            let checkpoint = match &session.source {
                Some(src) => src.engine_dir().map(|d| d.display().to_string()),
                None => None,
            };
            println!(
                "{}",
                ProgressEvent::Done(mm_spec::progress::RunSummary {
                    iteration,
                    final_loss: last_loss,
                    tokens_per_sec: 0.0,
                    checkpoint,
                    steps: Some(0)
                })
                .to_line()
            );
        }
        return Ok(());
    }

    let mut last_ckpt: Option<PathBuf> = None;
    let mut loader = Loader::start(ds.clone(), loader_cfg, position)?;
    let run_start = Instant::now();
    let (mut total_tokens, mut total_samples, mut steps_done) = (0u64, 0u64, 0u64);
    let (mut exchange_secs, mut schedule_secs) = (0.0f64, 0.0f64);
    let (mut log_loss, mut log_iters, mut log_tokens, mut log_samples) = (0.0f64, 0u64, 0u64, 0u64);
    let mut log_data_ms = 0.0f64;
    let mut log_start = Instant::now();
    let mut last_lr = 0.0;
    let mut saved_at = None;
    let first_mb = (dp.rank * r.grad_accumulation) as u64;
    let chunks = session.chunks();
    // Replicated parameters count once in the gradient norm: on tensor-parallel rank 0.
    let counted = |name: &str| dp.tp_rank == 0 || session.slices.as_ref().is_some_and(|s| s.is_split(name));
    let last_chunk = *chunks.last().expect("a rank holds at least one chunk");

    while iteration < a.train_iters {
        let step_start = Instant::now();
        let lr = schedule.lr_at(iteration);
        iteration += 1;

        // This rank's micro batches of the global batch, and the global batch's totals.
        let wait = Instant::now();
        let batches: Vec<Batch> =
            (0..r.grad_accumulation).map(|_| loader.next_batch()).collect::<Result<_, _>>().context("data")?;
        log_data_ms += wait.elapsed().as_secs_f64() * 1e3;
        let local = [
            batches.len() as f64,
            batches.iter().map(|b| b.rows).sum::<usize>() as f64,
            batches.iter().map(supervised_tokens).sum::<i64>() as f64,
            batches.iter().map(|b| b.tokens()).sum::<usize>() as f64,
        ];
        let global = dp.sum(&local, "step totals: micro batches, samples, supervised and real tokens")?; // SYNC
        let totals =
            StepTotals { micro_batches: global[0] as usize, samples: global[1] as usize, tokens: global[2] as i64 };
        let step_tokens = global[3] as u64;

        let seed_micro = |j: usize| tch::manual_seed(torch_seed(seed, iteration, first_mb + j as u64));
        let objective = |logits: &Tensor, labels: &Tensor| -> anyhow::Result<Tensor> {
            let ce = |l: &Tensor, t: &Tensor| last_chunk.language_model.token_losses(l, t, IGNORE);
            Ok(objective(r.loss, &sample_losses_with(logits, labels, &ce)?, totals))
        };
        let ctx = StepContext {
            image_size: preset.vision.image_size,
            device,
            seed: &seed_micro,
            train: true,
            objective: &objective,
        };
        let outcome =
            pipeline::run_step(&actions, &chunks, &batches, &ctx, dp.pipeline_group(), &mut || opt.accumulate())?;
        let local_loss = outcome.loss;
        if steps_done > 0 {
            // The first step warms caches up; the bubble is measured over the rest.
            exchange_secs += outcome.exchange_secs;
            schedule_secs += outcome.total_secs;
        }
        // The step loss and which parameters got gradients anywhere, in one all-reduce.
        let mut flags = vec![local_loss];
        flags.extend(opt.received().iter().map(|&g| if g { 1.0 } else { 0.0 }));
        let flags = dp.sum(&flags, "step loss and gradient presence")?; // SYNC
                                                                        // Only the last pipeline stage computes the loss.
        let step_loss = dp.pp_sum(&flags[..1], "step loss from the last pipeline stage")?[0]; // SYNC
        let received: Vec<bool> = flags[1..].iter().map(|&f| f > 0.0).collect();
        opt.reduce(&dp, &received, bucket_bytes)?; // SYNC: gradient all-reduce / reduce-scatter
        let grad_norm = opt.clip(&dp, a.clip_grad, &counted)?; // SYNC (norm² of the shards, slices, stages)
        opt.step(&dp, lr)?; // SYNC (distributed optimizer: all-gather of the parameters)
        opt.zero_grad();

        consumed += totals.samples as u64;
        position = batches.last().map(|b| b.end_position).unwrap_or(position);
        total_tokens += step_tokens;
        total_samples += totals.samples as u64;
        steps_done += 1;
        last_loss = step_loss;
        last_lr = lr;
        log_loss += step_loss;
        log_iters += 1;
        log_tokens += step_tokens;
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
                    " | tokens per sample: {:.1} | tokens/s: {tps:.1} | samples/s: {sps:.3}",
                    log_tokens as f64 / log_samples.max(1) as f64
                ));
            }
            let mem = resident_bytes();
            if let Some(m) = mem {
                line.push_str(&format!(" | memory (RSS): {:.1} MiB", m as f64 / 1048576.0));
            }
            println!("{line}");
            if dp.global_rank == 0 {
                let ev = ProgressEvent::Step(Progress {
                    iteration,
                    train_iters: a.train_iters,
                    loss,
                    lr,
                    grad_norm: Some(grad_norm),
                    tokens_per_sec: tps,
                    samples_per_sec: sps,
                    step_ms,
                    mem_bytes: mem,
                    consumed_samples: consumed,
                });
                println!("{}", ev.to_line());
            }
            (log_loss, log_iters, log_tokens, log_samples, log_data_ms) = (0.0, 0, 0, 0, 0.0);
            log_start = Instant::now();
        }
        if a.eval_interval > 0 && a.eval_iters > 0 && iteration % a.eval_interval == 0 {
            let v = evaluate(&session, &ds, &a, seed, &dp)?; // SYNC
            if dp.global_rank == 0 {
                println!(" validation loss at iteration {iteration} | lm loss: {v:.6E} | lm loss PPL: {:.6E}", v.exp());
            }
        }
        let counters = Counters { iteration, consumed, position, loss: last_loss, lr };
        if a.save.is_some() && a.save_interval > 0 && iteration % a.save_interval == 0 {
            last_ckpt = Some(saver.save(&counters, &opt)?); // SYNC
            saved_at = Some(iteration);
        }
        if a.exit_interval.is_some_and(|n| n > 0 && iteration % n == 0) && iteration < a.train_iters {
            println!("exiting at iteration {iteration} (--exit-interval)");
            break;
        }
    }
    drop(loader);
    if a.save.is_some() && saved_at != Some(iteration) {
        let counters = Counters { iteration, consumed, position, loss: last_loss, lr: last_lr };
        last_ckpt = Some(saver.save(&counters, &opt)?); // SYNC
    }
    dp.barrier("end of training")?; // SYNC

    let secs = run_start.elapsed().as_secs_f64().max(1e-9);
    let tps = total_tokens as f64 / secs;
    let ranks = if dp.size > 1 { format!(" over {} data-parallel ranks", dp.size) } else { String::new() };
    println!(
        "throughput{ranks}: {steps_done} iterations in {secs:.2} s ({:.1} ms per iteration), {total_samples} samples \
         ({:.3} samples/s), {total_tokens} tokens ({tps:.1} tokens/s)",
        secs * 1e3 / steps_done.max(1) as f64,
        total_samples as f64 / secs
    );
    if dp.pp_size > 1 && schedule_secs > 0.0 {
        println!(
            "pipeline stage {} of {}: {:.1}% of the forward/backward time in transfers and waits for neighbours \
             (measured bubble; theoretical {:.1}%)",
            dp.pp_rank,
            dp.pp_size,
            100.0 * exchange_secs / schedule_secs,
            100.0 * mm_spec::layout::theoretical_bubble(pp, virtual_stages, r.grad_accumulation)
        );
    }
    if dp.global_rank == 0 {
        println!(
            "{}",
            ProgressEvent::Done(mm_spec::progress::RunSummary {
                iteration,
                final_loss: last_loss,
                tokens_per_sec: tps,
                checkpoint: last_ckpt.map(|p| p.display().to_string()),
                steps: Some(steps_done),
            })
            .to_line()
        );
    }
    Ok(())
}

/// This pipeline rank's model chunks for `preset` (mm-spec's split of `--llm-pp-layers`, chunk
/// `v·pp + rank` for each virtual stage `v`): the first holds the ViT, projector and embedding,
/// the last the final norm and output layer. One stage: the whole model.
fn stage_parts(a: &TrainArgs, preset: &mm_spec::ModelPreset, pp_rank: usize) -> anyhow::Result<Vec<StagePart>> {
    let pp = a.pipeline_model_parallel_size.max(1);
    let vpp = a.virtual_pipeline_model_parallel_size.filter(|&v| v > 1);
    let list = |flag: &str, s: &Option<String>| -> anyhow::Result<Option<Vec<usize>>> {
        s.as_deref()
            .map(|s| s.split(',').map(|x| x.trim().parse::<usize>()).collect::<Result<Vec<_>, _>>())
            .transpose()
            .map_err(|e| anyhow::anyhow!("{flag}: {e}"))
    };
    let llm = list("--llm-pp-layers", &a.llm_pp_layers)?;
    let vit = list("--vit-pp-layers", &a.vit_pp_layers)?;
    let (llm_depth, vit_depth) = (preset.llm.num_hidden_layers, preset.vision.num_hidden_layers);
    let stages = mm_spec::layout::split_layers(llm_depth, pp, vpp, llm.as_deref())
        .map_err(|e| anyhow::anyhow!("--llm-pp-layers: {e}"))?;
    if let Some(v) = &vit {
        anyhow::ensure!(
            v.first() == Some(&vit_depth) && v.iter().skip(1).all(|&n| n == 0),
            "--vit-pp-layers {}: the model's ViT has {vit_depth} layers, all on the first pipeline chunk \
             ({vit_depth},0,…)",
            v.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",")
        );
    }
    let chunks = stages.len();
    Ok((0..vpp.unwrap_or(1))
        .map(|v| {
            let c = v * pp + pp_rank;
            StagePart { first: c == 0, llm_layers: stages[c].layers(), last: c + 1 == chunks }
        })
        .collect())
}

/// The layout the run trains and saves with: its tensor-parallel size and unaligned rule, its
/// pipeline split (mm-spec's, as the stages were built) with the ViT on the first chunk.
fn save_layout(a: &TrainArgs, preset: &mm_spec::ModelPreset) -> anyhow::Result<mm_spec::LayoutRequest> {
    let pp = a.pipeline_model_parallel_size.max(1);
    let vpp = a.virtual_pipeline_model_parallel_size.filter(|&v| v > 1);
    let llm = a
        .llm_pp_layers
        .as_deref()
        .map(|s| s.split(',').map(|x| x.trim().parse::<usize>()).collect::<Result<Vec<_>, _>>())
        .transpose()
        .map_err(|e| anyhow::anyhow!("--llm-pp-layers: {e}"))?;
    let stages = mm_spec::layout::split_layers(preset.llm.num_hidden_layers, pp, vpp, llm.as_deref())
        .map_err(|e| anyhow::anyhow!("--llm-pp-layers: {e}"))?;
    let vit = mm_spec::layout::vit_pp_layers_or_default(None, preset.vision.num_hidden_layers, pp, vpp);
    Ok(mm_spec::LayoutRequest {
        tp: a.tensor_model_parallel_size.max(1),
        pp: Some(pp),
        vpp,
        llm_pp_layers: Some(stages.iter().map(|s| s.num_layers).collect()),
        vit_pp_layers: Some(vit),
        unaligned_linear: a.unaligned_linear,
        make_vocab_size_divisible_by: None,
    })
}
