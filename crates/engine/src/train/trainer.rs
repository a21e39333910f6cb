//! The training loop, top to bottom: lr → micro batches (forward, loss, backward) → gradient
//! reduction over the replicas (data × context parallel ranks) → clip → AdamW step → log →
//! eval → checkpoint.
//! [`Trainer::setup`] does everything before the first step (rendezvous, model, resume state,
//! optimizer, data), [`Trainer::step`] one optimizer step, [`Trainer::run`] the loop with its
//! logging, evaluation, checkpoints and exit, then the summary. The flags arrive checked, as a
//! [`TrainConfig`].
//! Lines marked `SYNC` are collectives: every data-parallel rank runs them in the same order
//! (see `dp.rs` for the loss normalization that makes N ranks compute one rank's step).
//!
//! Determinism: torch's RNG (drop path) is reseeded from (seed, iteration, global micro batch)
//! before every micro batch and the data stream is a pure function of (seed, slot), so a run
//! resumed from a checkpoint computes bit-identical losses on the CPU, and N data-parallel ranks
//! see the samples and randomness one rank would.
//!
//! Output: every rank prints plain text; only global rank 0 prints `@@mm-progress` lines
//! (throughput over the whole data-parallel group) and only replica rank 0 (data × context)
//! writes the shared checkpoint files.
//!
//! Flight recorder (`dist::flight`, the rank state file): the phase goes Rendezvous (until the
//! groups exist) → Loading (resume point, model, optimizer, data) → Step (iteration = the
//! completed count, set at each step's end), with Eval and Checkpoint around evaluations and
//! saves, → Done after the summary; an agreed stop (`stop`) is Stopping to the end. The state
//! is written synchronously when `train` leaves, by an error or not.
//!
//! Stop: after every optimizer step the ranks agree on a stop (one all-reduce over the world
//! group); on a signal every rank saves after that iteration and `train` returns
//! [`Stopped`], which `main` maps to exit code 128 + the signal.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use mm_spec::checkpoint::{iteration_dir, Iteration};
use mm_spec::flight::Phase;
use mm_spec::layout::Action;
use mm_spec::{Progress, ProgressEvent};
use tch::{Kind, Tensor};

use super::args::TrainArgs;
use super::checkpoint::{self, mm_name, CkptFormat, RankDir, SaveRequest, SavedState, TrainerState};
use super::config::{CheckpointConfig, TrainConfig};
use super::loss::{model_sample_losses, objective, StepTotals};
use super::metrics::{self, PeakSource};
use super::optimizer::AdamW;
use super::parallel::{fingerprint, Parallel};
use super::pipeline::{self, StepContext};
use super::schedule::Schedule;
use super::stop::{self, Stopped};
use super::zero::{SavedOptimizer, ZeroAdamW};
use crate::cli::{self, UsageError};
use crate::data::{records, Batch, DataConfig, Dataset, Loader, LoaderConfig, Producer, Share};
use crate::dist::c10d::{set_grad, DistError};
use crate::dist::env::DistEnv;
use crate::dist::flight::{self, Fault};
use crate::model::cp::{Cp, KvExchange};
use crate::model::tp::Tp;
use crate::rng::Rng;
use crate::session::{configure_cpu_threads, pick_device, RankModel, Session, SessionOptions};
use crate::weights::checkpoint as source;
use crate::weights::slices::TpSlices;

/// Tag of the torch seed stream.
const TORCH_SEED: u64 = 0x746f726368;

/// The torch seed of global micro batch `micro_batch` (0-based within the global batch) of
/// `iteration`: the same whichever rank runs it.
pub fn torch_seed(seed: u64, iteration: u64, micro_batch: u64) -> i64 {
    (Rng::keyed(&[seed, TORCH_SEED, iteration, micro_batch]).next_u64() >> 1) as i64
}

/// Builds the data set of `--data-path` (given as `flag`, for messages) for a model. A missing or
/// unreadable data file is reported once: `--data-path runs/x.jsonl: No such file or directory`.
pub fn open_dataset(
    data_path: &Path,
    flag: &str,
    data_folder: Option<&Path>,
    session: &Session,
    cfg: DataConfig,
) -> anyhow::Result<Arc<Dataset>> {
    let loaded = records::load(data_path, data_folder).map_err(|e| match e {
        records::RecordsError::Io { path, error } if path == data_path => {
            anyhow::anyhow!("{flag} {}: {error}", path.display())
        }
        e => anyhow::Error::new(e).context(format!("{flag} {}", data_path.display())),
    })?;
    Ok(Arc::new(Dataset { records: loaded.records, bad_lines: loaded.bad, tokenizer: session.tokenizer.clone(), cfg }))
}

/// Mean loss (default reduction) over `iters` micro batches in file order, without gradients;
/// DP rank r evaluates micro batches r, r + dp, … (its context-parallel ranks each their part
/// of the sequence) and the sum is all-reduced over the replicas.
fn evaluate(
    session: &Session,
    ds: &Arc<Dataset>,
    cfg: &TrainConfig,
    iters: u64,
    seed: u64,
    dp: &Parallel,
) -> anyhow::Result<f64> {
    let share = Share { rank: dp.data_rank, size: dp.data_size, micro_batches: 1 };
    let cfg = LoaderConfig {
        seed,
        micro_batch: cfg.micro_batch_size,
        prefetch: 1,
        workers: 1,
        max_bad_fraction: cfg.data.max_bad_fraction,
        shuffle: false,
        share,
    };
    let mut producer = Producer::new(ds.clone(), cfg, 0)?;
    let mine = (dp.data_rank as u64..iters).step_by(dp.data_size).count();
    // Through the pipeline stages and tensor-parallel ranks as training runs: the last stage
    // computes each micro batch's token mean with the vocabulary-parallel loss.
    let chunks = session.chunks();
    let last = *chunks.last().expect("a rank holds at least one chunk");
    let token_mean = |logits: &Tensor, labels: &Tensor| -> anyhow::Result<Tensor> {
        let l = model_sample_losses(&last.language_model, logits, labels)?;
        let n: i64 = l.counts.iter().sum();
        Ok(l.sums.sum(Kind::Float).to_kind(Kind::Double) / n.max(1) as f64)
    };
    let no_seed = |_: usize| {};
    let ctx = StepContext {
        image_size: session.preset.vision.image_size,
        device: session.device,
        seed: &no_seed,
        train: false,
        objective: &token_mean,
    };
    let mut total = 0.0;
    tch::no_grad(|| -> anyhow::Result<()> {
        for _ in 0..mine {
            let b = producer.next_batch()?;
            total += pipeline::run_forward_only(&chunks, std::slice::from_ref(&b), &ctx, dp.pipeline_group())?;
        }
        Ok(())
    })?;
    let total = dp.sum(&[total], "evaluation loss")?[0]; // SYNC
    let total = dp.pp_sum(&[total], "evaluation loss from the last pipeline stage")?[0]; // SYNC
    Ok(total / iters.max(1) as f64)
}

/// The optimizer: AdamW on every rank (replicated state), or ZeRO-1 over the replica group
/// (data × context parallel).
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

    /// Sums the gradients over the replica group (data × context parallel). `received`: the
    /// parameters some rank has a gradient for (a rank without one contributes zeros).
    fn reduce(&mut self, dp: &Parallel, received: &[bool], bucket_bytes: usize) -> Result<(), DistError> {
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
    fn clip(&mut self, dp: &Parallel, max_norm: f64, counted: &dyn Fn(&str) -> bool) -> Result<f64, DistError> {
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

    fn step(&mut self, dp: &Parallel, lr: f64) -> Result<(), DistError> {
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

/// Where the run stands: saved in checkpoints and restored on resume.
struct Counters {
    iteration: u64,
    consumed: u64,
    position: u64,
    /// The last step's loss (the checkpoint's when resuming; NaN before any).
    loss: f64,
    /// The last step's learning rate (0 before any).
    lr: f64,
}

/// This run's totals, for the summary.
#[derive(Default)]
struct RunTotals {
    tokens: u64,
    samples: u64,
    steps: u64,
    /// Time in pipeline transfers and waits, and in the whole schedule, after the first step.
    exchange_secs: f64,
    schedule_secs: f64,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// The iteration it completed (1-based).
    pub iteration: u64,
    pub lr: f64,
    /// The step loss over the global batch.
    pub loss: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Real tokens and samples of the global batch.
    pub tokens: u64,
    pub samples: u64,
    /// Time this rank waited for its micro batches, and the whole step's time.
    pub data_ms: f64,
    pub step_ms: f64,
    /// The step's time outside collectives and transfers: what this rank computed and
    /// loaded, without waiting for the others (the slowest rank has the most).
    pub busy_ms: f64,
    /// Model FLOPs of the global batch (mm_spec::flops).
    pub flops: f64,
}

/// The steps since the last log line, which it averages over.
struct LogWindow {
    loss: f64,
    iters: u64,
    tokens: u64,
    samples: u64,
    data_ms: f64,
    flops: f64,
    start: Instant,
}

impl LogWindow {
    fn new() -> LogWindow {
        LogWindow { loss: 0.0, iters: 0, tokens: 0, samples: 0, data_ms: 0.0, flops: 0.0, start: Instant::now() }
    }

    fn add(&mut self, s: &StepReport) {
        self.loss += s.loss;
        self.iters += 1;
        self.tokens += s.tokens;
        self.samples += s.samples;
        self.data_ms += s.data_ms;
        self.flops += s.flops;
    }
}

/// One rank's training run after setup: its groups, model, optimizer, data and counters.
pub struct Trainer {
    cfg: TrainConfig,
    dp: Parallel,
    session: Session,
    ds: Arc<Dataset>,
    opt: Optim,
    schedule: Schedule,
    /// This pipeline rank's forwards, backwards and transfers of one step.
    actions: Vec<Action>,
    /// Started when there is something to train; stopped before the final save.
    loader: Option<Loader>,
    /// The layout the run trains with (each pipeline stage saves its part of it).
    layout: mm_spec::LayoutRequest,
    /// Tells this run's temporary checkpoint folders apart (rank 0's process id).
    tag: String,
    /// The seed all randomness derives from (the checkpoint's, when its RNG state is loaded).
    seed: u64,
    /// What the run loaded (--load, or --save with --auto-resume).
    load: Option<PathBuf>,
    counters: Counters,
    totals: RunTotals,
    /// Model FLOPs per tile and token (TFLOP/s and MFU), and the peak per device.
    flops: mm_spec::flops::ModelFlops,
    peak_tflops: Option<f64>,
    /// Rank 0's metrics.jsonl and TensorBoard events.
    sink: metrics::Sink,
    /// Test-only fault injection (`MM_ENGINE_FAULT`).
    fault: Option<Fault>,
}

/// `mm-engine train`. With several ranks every error names the rank that hit it. An agreed
/// stop comes back as [`Stopped`] (exit code 128 + the signal in `main`).
pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    let env = DistEnv::from_process()?;
    flight::init(env.rank);
    let result = train(a, &env);
    // The last state on disk: where an error left the rank, or Done / Stopping.
    flight::flush();
    result.map_err(|e| {
        let named = e.chain().any(|c| c.is::<DistError>()) || e.to_string().starts_with("rank ");
        if env.world_size > 1 && !named && !e.is::<Stopped>() {
            e.context(format!("rank {}", env.rank))
        } else {
            e
        }
    })
}

fn train(a: TrainArgs, env: &DistEnv) -> anyhow::Result<()> {
    let fault = Fault::from_env(env.rank, env.world_size)?;
    let cfg = TrainConfig::new(a, env.world_size).map_err(|e| -> anyhow::Error {
        if e.layout_only {
            crate::cli::LayoutError(format!("the parallel layout does not fit:\n  {e}")).into()
        } else {
            UsageError(format!("invalid train flags:\n  {e}")).into()
        }
    })?;
    let mut trainer = Trainer::setup(cfg, env)?;
    trainer.fault = fault;
    trainer.run()
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
fn resume_point(c: &CheckpointConfig, tokenizer: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    let (Some(save), true) = (&c.save, c.auto_resume) else { return Ok(c.load.clone()) };
    let tracker = mm_spec::checkpoint::latest_path(save);
    if !tracker.exists() {
        return Ok(c.load.clone());
    }
    source::resolve(save, tokenizer).with_context(|| {
        format!(
            "--auto-resume: {} names a checkpoint that cannot be read; fix or remove it, or {}",
            tracker.display(),
            cli::spelled("drop --auto-resume", "pass --set checkpoint.auto_resume=false")
        )
    })?;
    Ok(Some(save.clone()))
}

/// Where a run starts: a loaded checkpoint's counters and seed, and its optimizer state.
struct Resumed {
    counters: Counters,
    seed: u64,
    /// The saved optimizer and its step count, when the optimizer is to be loaded.
    optimizer: Option<(SavedOptimizer, u64)>,
}

/// The resume state of what `session` loaded; a fresh model: iteration 0 with the configured seed.
fn resume_state(cfg: &TrainConfig, session: &Session, dp: &Parallel) -> anyhow::Result<Resumed> {
    let mut seed = cfg.seed;
    let mut c = Counters { iteration: 0, consumed: 0, position: 0, loss: f64::NAN, lr: 0.0 };
    let mut resume_optim = None;
    if let Some(src) = &session.source {
        if let Some(state) = src.trainer_state()? {
            c.iteration = state.iteration;
            c.consumed = state.consumed_samples;
            c.position = state.data_position;
            c.loss = state.loss;
            if cfg.checkpoint.load_rng {
                if let Some(s) = state.seed {
                    seed = s;
                }
            }
            if cfg.checkpoint.load_optim {
                let step = state.optimizer_step.with_context(|| {
                    format!(
                        "{}: the optimizer state was not saved (--no-save-optim); pass {}",
                        src.describe(),
                        cli::spelled("--no-load-optim", "--set checkpoint.no_load_optim=true")
                    )
                })?;
                let saved = src
                    .saved_optimizer(&state, RankDir { tp_rank: dp.tp_rank, pp_rank: dp.pp_rank, pp: dp.pp_size })?
                    .with_context(|| {
                        format!(
                            "{}: {} is missing; pass {}",
                            src.describe(),
                            source::OPTIMIZER_FILE,
                            cli::spelled("--no-load-optim", "--set checkpoint.no_load_optim=true")
                        )
                    })?;
                resume_optim = Some((saved, step));
            }
        } else if let Some(it) = src.iteration() {
            anyhow::bail!("{}: iteration {it} has no {}", src.describe(), source::STATE_FILE);
        }
    }
    Ok(Resumed { counters: c, seed, optimizer: resume_optim })
}

/// This rank's model: its pipeline chunks and tensor-parallel slices, loaded from `load` or
/// initialized from the seed.
fn open_session(cfg: &TrainConfig, dp: &Parallel, load: Option<&Path>, device: tch::Device) -> anyhow::Result<Session> {
    let stages = |preset: &mm_spec::ModelPreset| -> anyhow::Result<RankModel> {
        let parts = cfg.parallel.stage_parts(preset, dp.pp_rank)?;
        let slices = if dp.tp_size > 1 {
            let layout = cfg.parallel.save_layout(preset)?;
            Some(
                TpSlices::new(preset, &layout, dp.tp_rank)
                    .map_err(|e| crate::cli::LayoutError(format!("tensor parallelism: {e}")))?,
            )
        } else {
            None
        };
        Ok(RankModel { parts, slices })
    };
    Session::open(SessionOptions {
        model: &cfg.model,
        load,
        tokenizer: cfg.tokenizer.as_deref(),
        device,
        seed: cfg.seed,
        bf16: cfg.bf16,
        vit_drop_path_rate: cfg.vit_drop_path_rate,
        parts: Some(&stages),
        tp: dp.tp_group().map(|g| Tp::new(g, cfg.parallel.unaligned_linear, cfg.parallel.sequence_parallel)),
    })
}

/// What tells this run's temporary checkpoint folders apart, the same on every rank: global rank
/// 0's process id (its DP group's first, then from pipeline stage 0, then from tensor-parallel
/// rank 0).
fn run_tag(dp: &Parallel) -> Result<String, DistError> {
    let tag = dp.gather(std::process::id() as i64, "run tag")?[0]; // SYNC
    let first_stage = if dp.pp_rank == 0 { tag as f64 } else { 0.0 };
    let tag = dp.pp_sum(&[first_stage], "run tag")?[0]; // SYNC
    let first_tp = if dp.tp_rank == 0 { tag } else { 0.0 };
    Ok((dp.tp_sum(&[first_tp], "run tag")?[0] as i64).to_string()) // SYNC
}

impl Trainer {
    /// Everything before the first step: rendezvous, the model (this rank's stages and
    /// slices), resume state, the agreement of all ranks on the job, the optimizer and the data.
    pub fn setup(cfg: TrainConfig, env: &DistEnv) -> anyhow::Result<Trainer> {
        let device = pick_device(&cfg.device)?;
        configure_cpu_threads(device, env.local_world_size.min(env.world_size));
        // Rendezvous first: a rank that fails later (bad checkpoint, bad data) then makes the
        // others fail fast in their next collective instead of waiting for it at the store.
        let par = &cfg.parallel;
        let dp = Parallel::init(env, device, par.tp, par.cp, par.pp, par.vpp)?;
        flight::set_phase(Phase::Loading);
        let ck = &cfg.checkpoint;
        let load = resume_point(ck, cfg.tokenizer.as_deref())?;
        if ck.auto_resume {
            // Every rank reads --save's tracker on its own host: they only agree on shared storage.
            let what = "the resume point (--auto-resume reads --save's latest_checkpointed_iteration.txt on every \
                        host, so the save folder must be on storage all hosts share)";
            dp.agree(what, fingerprint(&format!("{load:?}")))?; // SYNC
        }
        if let (Some(l), 0) = (&load, dp.global_rank) {
            if Some(l) != ck.load.as_ref() {
                println!(
                    "auto-resume: {} holds a checkpoint; resuming from it{}",
                    l.display(),
                    ck.load.as_ref().map(|p| format!(" instead of --load {}", p.display())).unwrap_or_default()
                );
            }
        }
        let mut session = open_session(&cfg, &dp, load.as_deref(), device)?;
        let cp = dp.cp_group().map(|g| Cp::new(g, par.cp_exchange)).unwrap_or_else(Cp::single);
        for chunk in std::iter::once(&mut session.model).chain(&mut session.more_chunks) {
            chunk.set_recompute(cfg.recompute);
            chunk.set_context_parallel(cp.clone());
        }
        let preset = session.preset.clone();
        if ck.save.is_some() && ck.format == CkptFormat::Torch && preset.llm.tie_word_embeddings {
            return cli::usage(format!(
                "--ckpt-format torch: the model ties its output layer to the embedding, which MindSpeed-MM's \
                 InternVL3 layout cannot express; save with {}",
                cli::spelled("--ckpt-format mm", "--set checkpoint.save_format=mm")
            ));
        }
        let (pp, virtual_stages, ga) = (par.pp, par.virtual_stages(), cfg.grad_accumulation);
        let actions = mm_spec::layout::schedule(pp, dp.pp_rank, ga, virtual_stages)
            .map_err(|e| anyhow::anyhow!("pipeline schedule: {e}"))?;
        if pp > 1 && dp.global_rank == 0 {
            println!(
                "pipeline: {pp} stages{}, {ga} micro batches per step: theoretical bubble {:.1}%",
                if virtual_stages > 1 { format!(" × {virtual_stages} virtual") } else { String::new() },
                100.0 * mm_spec::layout::theoretical_bubble(pp, virtual_stages, ga)
            );
        }
        if dp.cp_size > 1 && dp.global_rank == 0 {
            println!(
                "context parallelism: the sequence in {} load-balanced chunks over {} ranks ({}; keys and values {})",
                2 * dp.cp_size,
                dp.cp_size,
                mm_spec::layout::MM_ENGINE_CP_ALGO,
                match par.cp_exchange {
                    KvExchange::Ring => "around a ring",
                    KvExchange::AllGather => "all-gathered",
                }
            );
        }
        if let (Some(r), 0) = (cfg.recompute, dp.global_rank) {
            println!("activation recomputation: {} (LLM and ViT layers)", r.describe());
            if r.attention_core() && dp.cp_size > 1 && par.cp_exchange == KvExchange::Ring {
                println!(
                    "note: the LLM's ring attention keeps only its q, k, v, output and log-sum-exp, which selective \
                     recomputation would keep too: it applies to the ViT's attention"
                );
            }
        }

        // Freezing, then the optimizer over what is left.
        let mut trainable = Vec::new();
        for (name, t) in session.named_parameters() {
            let frozen = cfg.freeze.frozen(&name);
            let _ = t.set_requires_grad(!frozen);
            if !frozen {
                trainable.push((name, t));
            }
        }
        let n_train: i64 = trainable.iter().map(|(_, t)| t.numel() as i64).sum();
        let n_all: i64 = session.named_parameters().iter().map(|(_, t)| t.numel() as i64).sum();

        let Resumed { counters, seed, optimizer: resume_optim } = resume_state(&cfg, &session, &dp)?;
        let schedule = cfg.schedule();
        let data = &cfg.data;
        let ds = open_dataset(
            &data.data_path,
            "--data-path",
            data.data_folder.as_deref(),
            &session,
            data.pre.data_config(&session.preset, cfg.seq_length),
        )?;

        // Every rank must run the same job from the same state: compare before the first
        // collective whose shape depends on it.
        let Counters { iteration, consumed, position, .. } = counters;
        // What every rank of the job shares (across stages and tensor-parallel ranks too: the
        // same batch arithmetic, schedule, data and resume state, or the stages would pair one
        // sample's activations with another's labels).
        let run = format!(
            "gbs {} mbs {} ga {ga} seq {} iters {} seed {seed} lr {} loss {:?} bf16 {} zero {} from \
             {iteration}/{consumed}/{position} records {} tp {} cp {} {:?} pp {} vpp {:?} load {load:?} data {:?}",
            cfg.global_batch_size,
            cfg.micro_batch_size,
            cfg.seq_length,
            cfg.train_iters,
            cfg.lr,
            cfg.loss,
            cfg.bf16,
            cfg.distributed_optimizer,
            ds.records.len(),
            par.tp,
            par.cp,
            par.cp_exchange,
            par.pp,
            par.vpp,
            cfg.data.pre
        );
        // Data-parallel replicas also hold the same parameters.
        let mut job = format!("{run} model {} params {n_all} trainable {n_train}", preset.name);
        for (n, t) in &trainable {
            job.push_str(&format!(" {n}{:?}{:?}", t.size(), t.kind()));
        }
        dp.agree("the job (flags, model, data, resume state)", fingerprint(&job))?; // SYNC
        dp.world_agree("the job on every stage (flags, data, resume state)", fingerprint(&run))?; // SYNC

        // Replicas start identical whatever each rank loaded or initialized.
        let all_params: Vec<Tensor> = session.named_parameters().into_iter().map(|(_, t)| t).collect();
        dp.broadcast(&all_params, cfg.bucket_bytes, "initial parameters from replica rank 0")?; // SYNC

        let tag = run_tag(&dp)?; // SYNC

        let sharded = cfg.distributed_optimizer && dp.size > 1;
        let mut opt = if sharded {
            let named: Vec<(String, Tensor)> = trainable.into_iter().map(|(n, t)| (mm_name(&n), t)).collect();
            Optim::Sharded(ZeroAdamW::new(named, cfg.adamw, &dp))
        } else {
            Optim::Replicated(AdamW::new(trainable, cfg.adamw))
        };
        if let (Some((saved, step)), Some(src)) = (&resume_optim, &session.source) {
            opt.load(saved, *step).with_context(|| src.describe())?;
        }
        drop(resume_optim);

        let loader_cfg = LoaderConfig {
            seed,
            micro_batch: cfg.micro_batch_size,
            prefetch: data.prefetch.max(ga),
            workers: data.workers,
            max_bad_fraction: data.max_bad_fraction,
            shuffle: true,
            share: Share { rank: dp.data_rank, size: dp.data_size, micro_batches: ga },
        };
        let parallel = if dp.size > 1 {
            format!(
                "data-parallel rank {} of {}{} ({}), ",
                dp.data_rank,
                dp.data_size,
                if dp.cp_size > 1 {
                    format!(", context-parallel rank {} of {}", dp.cp_rank, dp.cp_size)
                } else {
                    String::new()
                },
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
            if cfg.bf16 { "bf16 with fp32 master weights" } else { "fp32" },
            cfg.micro_batch_size,
            ga,
            dp.data_size,
            if dp.data_size == 1 { "" } else { "s" },
            cfg.global_batch_size,
            cfg.loss,
            iteration
        );
        if let (Some(src), 0) = (&session.source, dp.global_rank) {
            println!("loaded {}", src.describe());
            if let Some(n) = src.foreign_iteration() {
                println!(
                    "note: iteration {n} was saved by MindSpeed-MM: its weights are loaded, its optimizer, scheduler \
                     and RNG state are Megatron's and are not; training starts at iteration 0 with a fresh optimizer \
                     (as Megatron's --finetune)"
                );
            }
        }
        let layout = par.save_layout(&preset)?;
        let flops = metrics::model_flops(&preset, cfg.freeze);
        let peak = metrics::peak(&cfg.metrics, device, if cfg.bf16 { Kind::BFloat16 } else { Kind::Float });
        let sink = if dp.global_rank == 0 {
            match &peak {
                Some((p, PeakSource::Flag)) => println!("MFU against --peak-tflops {p}"),
                Some((p, PeakSource::DataSheet(name))) => println!("MFU against {p} TFLOP/s ({name}'s data sheet)"),
                Some((p, PeakSource::Measured)) => {
                    println!("MFU against {p:.4} TFLOP/s per rank, measured on a matrix product here (CPU)")
                }
                None => println!("no MFU: the device's peak is unknown; pass --peak-tflops to get one"),
            }
            metrics::Sink::open(&cfg.metrics)
        } else {
            metrics::Sink::none()
        };
        let loader =
            if iteration < cfg.train_iters { Some(Loader::start(ds.clone(), loader_cfg, position)?) } else { None };
        Ok(Trainer {
            cfg,
            dp,
            session,
            ds,
            opt,
            schedule,
            actions,
            loader,
            layout,
            tag,
            seed,
            load,
            counters,
            totals: RunTotals::default(),
            flops,
            peak_tflops: peak.map(|(p, _)| p),
            sink,
            fault: None,
        })
    }

    /// Steps to --train-iters (or an --exit-interval), logging, evaluating and saving on the
    /// way; then the final save and the summary.
    pub fn run(mut self) -> anyhow::Result<()> {
        flight::set_iteration(self.counters.iteration);
        if self.counters.iteration >= self.cfg.train_iters {
            self.nothing_to_train();
            flight::set_phase(Phase::Done);
            return Ok(());
        }
        // From here on a signal stops every rank after an agreed iteration, with a save.
        stop::install()?;
        let run_start = Instant::now();
        let mut window = LogWindow::new();
        let (mut last_ckpt, mut saved_at) = (None, None);
        let ck = self.cfg.checkpoint.clone();
        let train_iters = self.cfg.train_iters;
        while self.counters.iteration < train_iters {
            flight::set_phase(Phase::Step);
            let s = self.step()?;
            let iteration = s.iteration;
            flight::set_iteration(iteration);
            // Whether any rank took a stop signal: one small all-reduce per step.
            let local = stop::requested().unwrap_or(0);
            let agreed = self.dp.world_max(&[f64::from(local)], "stop agreement: the largest signal any rank took")?[0]; // SYNC
            let stopping = (agreed > 0.0 && iteration < train_iters).then_some(agreed as i32);
            window.add(&s);
            let logged = iteration % self.cfg.log_interval == 0 || iteration == train_iters || stopping.is_some();
            if logged {
                self.log(&s, &window)?; // SYNC (every rank's busy time)
            }
            if let Some(signal) = stopping {
                return Err(self.stop(signal)?.into());
            }
            if let Some(e) = self.cfg.eval.filter(|e| iteration % e.interval == 0) {
                flight::set_phase(Phase::Eval);
                let v = evaluate(&self.session, &self.ds, &self.cfg, e.iters, self.seed, &self.dp)?; // SYNC
                if self.dp.global_rank == 0 {
                    println!(
                        " validation loss at iteration {iteration} | lm loss: {v:.6E} | lm loss PPL: {:.6E}",
                        v.exp()
                    );
                }
            }
            if ck.save.is_some() && ck.save_interval > 0 && iteration % ck.save_interval == 0 {
                flight::set_phase(Phase::Checkpoint);
                last_ckpt = Some(self.save()?); // SYNC
                saved_at = Some(iteration);
            }
            if ck.exit_interval.is_some_and(|n| iteration % n == 0) && iteration < train_iters {
                println!("exiting at iteration {iteration} (--exit-interval)");
                break;
            }
            // The next window starts after this iteration's evaluation and save, so their time
            // does not read as a slower step (tokens/s, TFLOP/s, MFU).
            if logged {
                window = LogWindow::new();
            }
        }
        self.loader = None;
        if ck.save.is_some() && saved_at != Some(self.counters.iteration) {
            flight::set_phase(Phase::Checkpoint);
            last_ckpt = Some(self.save()?); // SYNC
        }
        self.dp.barrier("end of training")?; // SYNC
        self.summary(run_start.elapsed(), last_ckpt);
        flight::set_phase(Phase::Done);
        Ok(())
    }

    /// The agreed stop after the iteration just completed: every rank saves it and the run ends
    /// with [`Stopped`]; rank 0 says so on stdout and
    /// with a `Stopped` progress event.
    fn stop(&mut self, signal: i32) -> anyhow::Result<Stopped> {
        let iteration = self.counters.iteration;
        let name = stop::signal_name(signal);
        flight::set_phase(Phase::Stopping);
        flight::set_stop(&name);
        let save = self.cfg.checkpoint.save.is_some();
        if self.dp.global_rank == 0 {
            println!(
                "stopping at iteration {iteration}: {name} received (preemption or an operator's stop); {}",
                if save { "saving a checkpoint" } else { "no --save: nothing is saved" }
            );
        }
        self.loader = None;
        // The stop is agreed before the iteration's periodic save: this one is always new.
        let checkpoint = if save { Some(self.save()?) } else { None }; // SYNC
        if self.dp.global_rank == 0 {
            let ev = ProgressEvent::Stopped {
                iteration,
                signal: name.clone(),
                checkpoint: checkpoint.as_ref().map(|p| p.display().to_string()),
            };
            println!("{}", ev.to_line());
        }
        self.dp.world_barrier("agreed stop")?; // SYNC
        Ok(Stopped { signal, iteration, train_iters: self.cfg.train_iters, checkpoint })
    }

    /// One optimizer step: this rank's micro batches, the pipeline schedule's forwards and
    /// backwards, the gradient reduction, clipping and the AdamW step.
    pub fn step(&mut self) -> anyhow::Result<StepReport> {
        let (step_start, waited_before) = (Instant::now(), crate::dist::c10d::time_in_collectives());
        let (cfg, dp, session, c) = (&self.cfg, &self.dp, &self.session, &mut self.counters);
        let loader = self.loader.as_mut().context("no data to train on: the run is at --train-iters")?;
        let lr = self.schedule.lr_at(c.iteration);
        c.iteration += 1;
        let iteration = c.iteration;

        // This rank's micro batches of the global batch, and the global batch's totals.
        let wait = Instant::now();
        let batches: Vec<Batch> =
            (0..cfg.grad_accumulation).map(|_| loader.next_batch()).collect::<Result<_, _>>().context("data")?;
        let data_ms = wait.elapsed().as_secs_f64() * 1e3;
        let local = [
            batches.len() as f64,
            batches.iter().map(|b| b.rows).sum::<usize>() as f64,
            batches.iter().map(supervised_tokens).sum::<i64>() as f64,
            batches.iter().map(|b| b.tokens()).sum::<usize>() as f64,
            metrics::batches_flops(&self.flops, &batches),
        ];
        // Test-only faults, before the step's first collective and outside any collective.
        match self.fault.and_then(|f| f.at(dp.global_rank, iteration)) {
            Some(Fault::Sleep { seconds, .. }) => {
                eprintln!(
                    "fault injection: rank {} sleeps {seconds} s at the start of iteration {iteration}",
                    dp.global_rank
                );
                std::thread::sleep(Duration::from_secs_f64(seconds));
            }
            Some(Fault::Desync { .. }) => {
                eprintln!(
                    "fault injection: rank {} enters a broadcast the others do not at the start of iteration {iteration}",
                    dp.global_rank
                );
                dp.inject_desync()?; // SYNC (deliberately unmatched)
            }
            None => {}
        }
        // Over the data-parallel ranks: context-parallel ranks read the same micro batches.
        let global =
            dp.data_sum(&local, "step totals: micro batches, samples, supervised and real tokens, model FLOPs")?; // SYNC
        let totals =
            StepTotals { micro_batches: global[0] as usize, samples: global[1] as usize, tokens: global[2] as i64 };
        let (step_tokens, step_flops) = (global[3] as u64, global[4]);

        let chunks = session.chunks();
        let last_chunk = *chunks.last().expect("a rank holds at least one chunk");
        let (seed, first_mb) = (self.seed, (dp.data_rank * cfg.grad_accumulation) as u64);
        let seed_micro = |j: usize| tch::manual_seed(torch_seed(seed, iteration, first_mb + j as u64));
        let objective = |logits: &Tensor, labels: &Tensor| -> anyhow::Result<Tensor> {
            Ok(objective(cfg.loss, &model_sample_losses(&last_chunk.language_model, logits, labels)?, totals))
        };
        let ctx = StepContext {
            image_size: session.preset.vision.image_size,
            device: session.device,
            seed: &seed_micro,
            train: true,
            objective: &objective,
        };
        let opt = &mut self.opt;
        let outcome =
            pipeline::run_step(&self.actions, &chunks, &batches, &ctx, dp.pipeline_group(), &mut || opt.accumulate())?;
        let run = &mut self.totals;
        if run.steps > 0 {
            // The first step warms caches up; the bubble is measured over the rest.
            run.exchange_secs += outcome.exchange_secs;
            run.schedule_secs += outcome.total_secs;
        }
        // The step loss and which parameters got gradients anywhere, in one all-reduce (over the
        // replicas: context-parallel ranks each hold their part of the loss).
        let mut flags = vec![outcome.loss];
        flags.extend(opt.received().iter().map(|&g| if g { 1.0 } else { 0.0 }));
        let flags = dp.sum(&flags, "step loss and gradient presence")?; // SYNC

        // Only the last pipeline stage computes the loss.
        let step_loss = dp.pp_sum(&flags[..1], "step loss from the last pipeline stage")?[0]; // SYNC
        let received: Vec<bool> = flags[1..].iter().map(|&f| f > 0.0).collect();
        // Replicated parameters count once in the gradient norm: on tensor-parallel rank 0.
        let counted = |name: &str| dp.tp_rank == 0 || session.slices.as_ref().is_some_and(|s| s.is_split(name));
        opt.reduce(dp, &received, cfg.bucket_bytes)?; // SYNC: gradient all-reduce / reduce-scatter
        let grad_norm = opt.clip(dp, cfg.clip_grad, &counted)?; // SYNC (norm² of the shards, slices, stages)
        opt.step(dp, lr)?; // SYNC (distributed optimizer: all-gather of the parameters)
        opt.zero_grad();

        let samples = totals.samples as u64;
        c.consumed += samples;
        c.position = batches.last().map(|b| b.end_position).unwrap_or(c.position);
        c.loss = step_loss;
        c.lr = lr;
        run.tokens += step_tokens;
        run.samples += samples;
        run.steps += 1;
        Ok(StepReport {
            iteration,
            lr,
            loss: step_loss,
            grad_norm,
            tokens: step_tokens,
            samples,
            data_ms,
            step_ms: step_start.elapsed().as_secs_f64() * 1e3,
            busy_ms: (step_start.elapsed().saturating_sub(crate::dist::c10d::time_in_collectives() - waited_before))
                .as_secs_f64()
                * 1e3,
            flops: step_flops,
        })
    }

    /// The log line of step `s`, averaged over `w`, and rank 0's progress line and metrics.
    /// Every rank calls it at the same iterations: each adds its last step's busy time (outside
    /// collectives) to one all-reduce, so rank 0 can name the slowest rank.
    fn log(&mut self, s: &StepReport, w: &LogWindow) -> anyhow::Result<()> {
        let (iteration, lr, grad_norm, consumed) = (s.iteration, s.lr, s.grad_norm, self.counters.consumed);
        let dp = &self.dp;
        let world = dp.size * dp.tp_size * dp.pp_size;
        let mut times = vec![0.0; world];
        times[dp.global_rank] = s.busy_ms;
        let times = dp.world_sum(&times, "every rank's busy time, for the slowest rank")?; // SYNC
        let (slowest_rank, slowest_ms) =
            times.iter().copied().enumerate().fold((0, f64::MIN), |a, (r, t)| if t > a.1 { (r, t) } else { a });
        let secs = w.start.elapsed().as_secs_f64().max(1e-9);
        let loss = w.loss / w.iters as f64;
        let tps = w.tokens as f64 / secs;
        let sps = w.samples as f64 / secs;
        let tflops = w.flops / secs / world as f64 / 1e12;
        let mfu = self.peak_tflops.map(|p| tflops / p);
        let mut line = format!(
            " iteration {iteration:>8}/{:>8} | consumed samples: {consumed:>10} | elapsed time per iteration (ms): {:.1} | \
             data wait (ms): {:.1} | learning rate: {lr:.6E} | global batch size: {:>5} | lm loss: {loss:.6E} | \
             grad norm: {grad_norm:.4}",
            self.cfg.train_iters,
            secs * 1e3 / w.iters as f64,
            w.data_ms / w.iters as f64,
            self.cfg.global_batch_size
        );
        if self.cfg.log_tps {
            line.push_str(&format!(
                " | tokens per sample: {:.1} | tokens/s: {tps:.1} | samples/s: {sps:.3}",
                w.tokens as f64 / w.samples.max(1) as f64
            ));
        }
        line.push_str(&format!(" | TFLOP/s per device: {tflops:.4}"));
        if let Some(m) = mfu {
            line.push_str(&format!(" | MFU: {:.2}%", 100.0 * m));
        }
        let mem = resident_bytes();
        if let Some(m) = mem {
            line.push_str(&format!(" | memory (RSS): {:.1} MiB", m as f64 / 1048576.0));
        }
        let cuda = metrics::cuda_memory(self.session.device);
        if let Some((a, r)) = cuda {
            line.push_str(&format!(
                " | CUDA allocated/reserved: {:.0}/{:.0} MiB",
                a as f64 / 1048576.0,
                r as f64 / 1048576.0
            ));
        }
        println!("{line}");
        if dp.global_rank == 0 {
            let p = Progress {
                iteration,
                train_iters: self.cfg.train_iters,
                loss,
                lr,
                grad_norm: Some(grad_norm),
                tokens_per_sec: tps,
                samples_per_sec: sps,
                // The window's, as on the log line and like tokens/s (not the last step's).
                step_ms: secs * 1e3 / w.iters as f64,
                mem_bytes: mem,
                consumed_samples: consumed,
                data_ms: Some(w.data_ms / w.iters as f64),
                slowest_rank: Some(slowest_rank),
                slowest_busy_ms: Some(slowest_ms),
                tflops: Some(tflops),
                mfu,
                cuda_allocated_bytes: cuda.map(|c| c.0),
                cuda_reserved_bytes: cuda.map(|c| c.1),
            };
            self.sink.write(&p);
            println!("{}", ProgressEvent::Step(p).to_line());
        }
        Ok(())
    }

    /// The checkpoint is at or past --train-iters: says so (rank 0 with its Done line).
    fn nothing_to_train(&self) {
        let (iteration, ck) = (self.counters.iteration, &self.cfg.checkpoint);
        let (iters, raise) = if cli::launched() {
            ("train.train_iters", format!("--set train.train_iters=N with N above {iteration}"))
        } else {
            ("--train-iters", format!("--train-iters N with N above {iteration}"))
        };
        println!(
            "nothing to train: the checkpoint is at iteration {iteration}, {iters} is {}; pass {raise} to continue{}",
            self.cfg.train_iters,
            if self.load.is_some() && self.load == ck.save && ck.load != ck.save {
                format!(", or remove the save folder to train from {} again", cli::spelled("--load", "checkpoint.load"))
            } else {
                String::new()
            }
        );
        if self.dp.global_rank == 0 {
            let checkpoint = match &self.session.source {
                Some(src) => src.engine_dir().map(|d| d.display().to_string()),
                None => None,
            };
            println!(
                "{}",
                ProgressEvent::Done(mm_spec::progress::RunSummary {
                    iteration,
                    final_loss: self.counters.loss,
                    tokens_per_sec: 0.0,
                    checkpoint,
                    steps: Some(0)
                })
                .to_line()
            );
        }
    }

    /// The end-of-run summary: throughput, the measured pipeline bubble, rank 0's Done line.
    fn summary(&self, elapsed: Duration, last_ckpt: Option<PathBuf>) {
        let (dp, t) = (&self.dp, &self.totals);
        let secs = elapsed.as_secs_f64().max(1e-9);
        let tps = t.tokens as f64 / secs;
        let ranks =
            if dp.data_size > 1 { format!(" over {} data-parallel ranks", dp.data_size) } else { String::new() };
        println!(
            "throughput{ranks}: {} iterations in {secs:.2} s ({:.1} ms per iteration), {} samples ({:.3} samples/s), \
             {} tokens ({tps:.1} tokens/s)",
            t.steps,
            secs * 1e3 / t.steps.max(1) as f64,
            t.samples,
            t.samples as f64 / secs,
            t.tokens
        );
        if dp.pp_size > 1 && t.schedule_secs > 0.0 {
            let p = &self.cfg.parallel;
            println!(
                "pipeline stage {} of {}: {:.1}% of the forward/backward time in transfers and waits for neighbours \
                 (measured bubble; theoretical {:.1}%)",
                dp.pp_rank,
                dp.pp_size,
                100.0 * t.exchange_secs / t.schedule_secs,
                100.0 * mm_spec::layout::theoretical_bubble(p.pp, p.virtual_stages(), self.cfg.grad_accumulation)
            );
        }
        if dp.global_rank == 0 {
            println!(
                "{}",
                ProgressEvent::Done(mm_spec::progress::RunSummary {
                    iteration: self.counters.iteration,
                    final_loss: self.counters.loss,
                    tokens_per_sec: tps,
                    checkpoint: last_ckpt.map(|p| p.display().to_string()),
                    steps: Some(t.steps),
                })
                .to_line()
            );
        }
    }

    /// Writes the current iteration: DP rank 0 prepares the temporary folder, writes the shared
    /// files and commits; with the distributed optimizer every rank writes its shard in between.
    fn save(&self) -> anyhow::Result<PathBuf> {
        let (ck, dp, c, opt) = (&self.cfg.checkpoint, &self.dp, &self.counters, &self.opt);
        let Some(dir) = &ck.save else { anyhow::bail!("no --save dir") };
        let what = || format!("saving iteration {} to {}", c.iteration, dir.display());
        let save_optim = ck.save_optim;
        let state = TrainerState {
            iteration: c.iteration,
            consumed_samples: c.consumed,
            data_position: c.position,
            optimizer_step: save_optim.then_some(opt.steps()),
            seed: ck.save_rng.then_some(self.seed),
            train_iters: self.cfg.train_iters,
            global_batch_size: self.cfg.global_batch_size as u64,
            lr: c.lr,
            loss: c.loss,
            data_parallel_size: (dp.data_size > 1).then_some(dp.data_size),
            // With pipeline stages each keeps its own beside its shards.
            optimizer_layout: match opt {
                Optim::Sharded(z) if save_optim && dp.pp_size == 1 && dp.tp_size == 1 => Some(z.layout.clone()),
                _ => None,
            },
        };
        let stage = RankDir { tp_rank: dp.tp_rank, pp_rank: dp.pp_rank, pp: dp.pp_size };
        let tmp = checkpoint::tmp_dir(dir, c.iteration, &self.tag);
        // Every step that writes is agreed on by every rank before the next one (a full disk on
        // one host fails the save everywhere instead of leaving the others in a barrier).
        let agree = |what_now: &str, local: anyhow::Result<()>| -> anyhow::Result<()> {
            let failed = local.as_ref().is_err();
            let n = dp.world_sum(&[f64::from(u8::from(failed))], &format!("checkpoint: {what_now}"))?[0]; // SYNC
            match local {
                Err(e) => Err(e.context(what())),
                Ok(()) if n > 0.0 => {
                    anyhow::bail!(
                        "{}: {n} rank(s) failed while {what_now} (their logs say why); nothing was committed",
                        what()
                    )
                }
                Ok(()) => Ok(()),
            }
        };
        let prepared = if dp.global_rank == 0 { checkpoint::prepare(dir, &tmp).map_err(Into::into) } else { Ok(()) };
        agree("preparing the temporary folder", prepared)?;
        let written = (|| -> anyhow::Result<()> {
            if let (Optim::Sharded(z), true) = (opt, save_optim) {
                checkpoint::write_optimizer_shard(&tmp, stage, dp.rank, dp.size, &z.state_tensors())?;
                if dp.rank == 0 && (dp.pp_size > 1 || dp.tp_size > 1) {
                    checkpoint::write_stage_layout(&tmp, stage, &z.layout)?;
                }
            }
            if dp.rank == 0 {
                let weights = self.session.named_parameters();
                let optimizer = match opt {
                    Optim::Replicated(o) if save_optim => Some(o.state_tensors(mm_name)),
                    _ => None,
                };
                let req = SaveRequest {
                    format: ck.format,
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
                let dtype = checkpoint::write_stage(&tmp, &req)?;
                if dp.global_rank == 0 {
                    checkpoint::write_common(&tmp, &req, dtype)?;
                }
            }
            Ok(())
        })();
        let cleanup = || {
            if dp.global_rank == 0 {
                let _ = std::fs::remove_dir_all(&tmp);
            }
        };
        agree("writing the rank files", written).inspect_err(|_| cleanup())?;
        // Nothing is committed unless rank 0 sees every rank's files (weights and optimizer
        // state): a save folder that is not shared storage would otherwise commit a checkpoint
        // that looks complete but is not.
        let optimizer_files = match opt {
            _ if !save_optim => checkpoint::OptimizerFiles::None,
            Optim::Replicated(_) => checkpoint::OptimizerFiles::PerParam,
            Optim::Sharded(_) => {
                checkpoint::OptimizerFiles::Sharded { dp: dp.size, layout_file: dp.pp_size > 1 || dp.tp_size > 1 }
            }
        };
        let missing = if dp.global_rank == 0 {
            checkpoint::missing_rank_files(&tmp, &self.layout, ck.format, optimizer_files)
        } else {
            Vec::new()
        };
        let n_missing = dp.world_sum(&[missing.len() as f64], "checkpoint: completeness")?[0]; // SYNC
        if n_missing > 0.0 {
            cleanup();
            anyhow::bail!(
                "{}: {} rank file{} did not reach rank 0's view of --save{}: --save must be a folder every rank \
                 shares (nothing was committed)",
                what(),
                n_missing,
                if n_missing == 1.0 { "" } else { "s" },
                if missing.is_empty() { String::new() } else { format!(" ({})", missing.join(", ")) }
            );
        }
        let committed = if dp.global_rank == 0 {
            checkpoint::commit(dir, &tmp, c.iteration).map(|_| ()).map_err(Into::into)
        } else {
            Ok(())
        };
        agree("committing", committed)?;
        let path = iteration_dir(dir, Iteration::Step(c.iteration));
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
