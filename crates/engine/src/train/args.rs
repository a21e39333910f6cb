//! `mm-engine train` flags: the Megatron/MindSpeed names the launcher renders
//! (`render.rs` `common_args` + `engine_args`), with their meaning there, plus a few engine
//! options (`--device`, `--prefetch`). Checked as a whole in [`TrainArgs::validate`], which
//! reports every problem at once.

use std::path::PathBuf;

use crate::data::DataConfig;
use clap::Args;

use super::loss::LossReduction;
use super::schedule::DecayStyle;

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Model preset (tiny, tiny6b, 1b … 78b); a checkpoint's own config.json wins over it.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// InternVL chat JSONL, or a meta JSON listing several.
    #[arg(long)]
    pub data_path: PathBuf,
    /// Root of the image/video paths in the records (default: the JSONL's folder).
    #[arg(long)]
    pub data_folder: Option<PathBuf>,
    /// tokenizer.json or a folder with one (default: the checkpoint's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,

    // Parallelism: data parallel over WORLD_SIZE / (tp · pp) ranks.
    /// Tensor-parallel ranks per model replica.
    #[arg(long, default_value_t = 1)]
    pub tensor_model_parallel_size: usize,
    /// Pipeline stages per model replica.
    #[arg(long, default_value_t = 1)]
    pub pipeline_model_parallel_size: usize,
    /// Context-parallel ranks per model replica: the LLM's sequence split into 2·cp load-balanced
    /// chunks (megatron_cp_algo).
    #[arg(long, default_value_t = 1)]
    pub context_parallel_size: usize,
    /// Virtual pipeline stages per rank (interleaved schedule; needs a pipeline above 1).
    #[arg(long)]
    pub virtual_pipeline_model_parallel_size: Option<usize>,
    /// MindSpeed's uneven tensor-parallel split of ViT heads that do not divide the ranks.
    #[arg(long)]
    pub unaligned_linear: bool,
    /// Megatron's sequence parallelism in the LLM (with tensor parallelism).
    #[arg(long)]
    pub sequence_parallel: bool,
    /// Megatron's context-parallel algorithm: megatron_cp_algo (the default) is the one mm-engine
    /// runs; others are refused with the reason.
    #[arg(long)]
    pub context_parallel_algo: Option<String>,
    /// How context parallelism's attention reaches the other ranks' keys and values: ring
    /// (Megatron's ring attention, the default) or all-gather (the whole sequence's K/V on every
    /// rank; simpler, more memory).
    #[arg(long, default_value = "ring")]
    pub cp_kv_exchange: String,
    /// LLM layers per pipeline chunk (comma list); with pp 1 a single entry, the depth.
    #[arg(long)]
    pub llm_pp_layers: Option<String>,
    /// ViT layers per pipeline chunk (comma list); all on the first chunk.
    #[arg(long)]
    pub vit_pp_layers: Option<String>,
    /// ZeRO-1 over data-parallel ranks: fp32 masters and Adam moments sharded; with one rank it
    /// changes nothing.
    #[arg(long)]
    pub use_distributed_optimizer: bool,
    /// Data-parallel gradient all-reduce bucket size in MB (engine option).
    #[arg(long, default_value_t = super::parallel::DEFAULT_BUCKET_MB)]
    pub dp_bucket_mb: f64,
    /// Megatron's flag for pipeline schedules with varying sequence lengths; batches here are
    /// always padded per micro batch.
    #[arg(long)]
    pub variable_seq_lengths: bool,

    // Batch.
    /// Samples per micro batch on each rank.
    #[arg(long, default_value_t = 1)]
    pub micro_batch_size: usize,
    /// Samples per optimizer step (micro × accumulation × data-parallel ranks).
    #[arg(long)]
    pub global_batch_size: Option<usize>,
    /// Micro batches per optimizer step on each data-parallel rank.
    #[arg(long)]
    pub grad_accumulation: Option<usize>,
    /// Tokens per sample; longer samples are cut.
    #[arg(long, default_value_t = 4096)]
    pub seq_length: usize,

    // Optimizer and schedule.
    /// Peak learning rate (required).
    #[arg(long)]
    pub lr: f64,
    /// Learning rate at the end of the decay.
    #[arg(long, default_value_t = 0.0)]
    pub min_lr: f64,
    /// Optimizer steps to train to (required); a resumed run continues up to it.
    #[arg(long)]
    pub train_iters: u64,
    /// constant, linear or cosine (default linear; launch always passes the recipe's value, cosine in its presets).
    #[arg(long, default_value = "linear")]
    pub lr_decay_style: String,
    /// Fraction of --train-iters spent warming the learning rate up from 0.
    #[arg(long, default_value_t = 0.0)]
    pub lr_warmup_fraction: f64,
    /// AdamW decoupled weight decay (default 0.01; launch always passes the recipe's value, 0.05 in its presets).
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Gradient clipping by global L2 norm; 0 disables.
    #[arg(long, default_value_t = 1.0)]
    pub clip_grad: f64,
    /// AdamW β1.
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    /// AdamW β2.
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    /// AdamW ε.
    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f64,
    /// Seed of initialisation, data order and augmentation (a checkpoint's own seed wins unless
    /// --no-load-rng).
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// How token losses average into the step loss: default (InternVL's), per_sample or per_token.
    #[arg(long, default_value = "default")]
    pub loss_reduction: String,

    // Precision and kernels.
    /// bf16 weights and activations with fp32 master weights in the optimizer.
    #[arg(long)]
    pub bf16: bool,
    /// fp16 training: refused (no loss scaling); use --bf16.
    #[arg(long)]
    pub fp16: bool,
    /// bf16, fp16 or fp32 (the launcher passes this and --bf16/--fp16 together).
    #[arg(long)]
    pub precision: Option<String>,
    /// Attention always goes through scaled_dot_product_attention, which picks flash
    /// kernels on CUDA by itself.
    #[arg(long)]
    pub use_flash_attn: bool,
    /// Activation recomputation, in the ViT and the LLM: full (whole layers, with
    /// --recompute-method) or selective (the attention core of every layer).
    #[arg(long)]
    pub recompute_granularity: Option<String>,
    /// With full granularity: uniform (every layer, in groups of --recompute-num-layers) or
    /// block (the first --recompute-num-layers layers of each pipeline chunk).
    #[arg(long)]
    pub recompute_method: Option<String>,
    /// Layers per recomputed group (uniform) or recomputed layers per chunk (block) [default: 1].
    #[arg(long)]
    pub recompute_num_layers: Option<usize>,
    /// cpu, cuda or auto (cuda when available).
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// The ViT's stochastic depth (drop path) for this run instead of the checkpoint's
    /// drop_path_rate (MindSpeed-MM's 78B example trains with 0.4).
    #[arg(long)]
    pub vit_drop_path_rate: Option<f64>,
    // Freezing.
    /// Keep the vision tower's weights fixed.
    #[arg(long)]
    pub freeze_vision: bool,
    /// Keep the projector (mlp1) fixed.
    #[arg(long)]
    pub freeze_projector: bool,
    /// Keep the language model fixed.
    #[arg(long)]
    pub freeze_llm: bool,

    // Checkpoints.
    /// Checkpoint to start from: a save folder, an MM iteration folder, an HF folder or
    /// MindSpeed-MM torch files (default: fresh weights of --model).
    #[arg(long)]
    pub load: Option<PathBuf>,
    /// Folder the checkpoints are saved in (default: nothing is saved).
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// The weights' format in saves: `mm` (mm-engine's safetensors layout) or `torch`
    /// (MindSpeed-MM's `model_optim_rng.pt`, Megatron's flag, which MindSpeed-MM loads).
    /// Either format loads with --load, whatever this says.
    #[arg(long, value_enum, default_value_t = super::checkpoint::CkptFormat::Mm)]
    pub ckpt_format: super::checkpoint::CkptFormat,
    /// Resume from --save when it already holds a checkpoint (its
    /// latest_checkpointed_iteration.txt), ignoring --load: rerunning the same command, or a
    /// launcher restart, continues where the job stopped. Without a checkpoint there, --load is
    /// used as usual.
    #[arg(long)]
    pub auto_resume: bool,
    /// Start with a fresh optimizer instead of the checkpoint's state.
    #[arg(long)]
    pub no_load_optim: bool,
    /// Use --seed instead of the checkpoint's saved seed and RNG state.
    #[arg(long)]
    pub no_load_rng: bool,
    /// Leave the optimizer state out of saves (smaller; a resume then needs --no-load-optim).
    #[arg(long)]
    pub no_save_optim: bool,
    /// Leave the RNG state out of saves.
    #[arg(long)]
    pub no_save_rng: bool,
    /// Save every N iterations (and at the end); 0 saves only at the end (default 0; launch always passes the recipe's value).
    #[arg(long, default_value_t = 0)]
    pub save_interval: u64,
    /// Megatron's: stop after the iteration divisible by N (saving first when --save is set),
    /// as a scheduler's time limit would.
    #[arg(long)]
    pub exit_interval: Option<u64>,

    // Logging and evaluation.
    /// Log a line every N iterations (default 100; launch always passes the recipe's value, 1 in its presets).
    #[arg(long, default_value_t = 100)]
    pub log_interval: u64,
    /// Evaluate every N iterations on --eval-iters micro batches taken in file order from the
    /// start of the data; 0 never (default 0; launch always passes the recipe's value).
    #[arg(long, default_value_t = 0)]
    pub eval_interval: u64,
    /// Micro batches per evaluation; 0 never (default 0; launch always passes the recipe's value).
    #[arg(long, default_value_t = 0)]
    pub eval_iters: u64,
    /// Tokens per second in the log lines and the summary (always in the progress line).
    #[arg(long)]
    pub log_tps: bool,
    /// Megatron's: write TensorBoard event files of the logged scalars here (rank 0).
    #[arg(long, value_name = "DIR")]
    pub tensorboard_dir: Option<PathBuf>,
    /// Append one JSON line per logged iteration here (rank 0's view; see mm_spec::metrics).
    /// Default when run alone: <--save>/metrics.jsonl; under launch, the launcher writes
    /// logs/<run>/metrics.jsonl and this is off unless given.
    #[arg(long, value_name = "FILE")]
    pub metrics_file: Option<PathBuf>,
    /// The device's peak dense TFLOP/s in the training dtype, for MFU. Default: the data sheet's
    /// for known GPUs (mm_spec::flops::PEAK_TFLOPS_BF16); on CPU a matrix product measured at
    /// start.
    #[arg(long, value_name = "TFLOPS")]
    pub peak_tflops: Option<f64>,

    // Data.
    /// Chat template of the records (internvl2_5 is InternVL3's).
    #[arg(long, default_value = "internvl2_5")]
    pub template: String,
    #[command(flatten)]
    pub pre: PreprocessArgs,
    /// Fraction of unreadable records tolerated (skipped with a warning) before the run fails.
    #[arg(long, default_value_t = 0.01)]
    pub max_bad_fraction: f64,
    /// Data loading threads (Megatron's): each builds every N-th micro batch; the stream is the
    /// same for any N (default 1; launch always passes the recipe's value).
    #[arg(long, default_value_t = 1)]
    pub num_workers: usize,
    /// Micro batches prepared ahead of the training loop.
    #[arg(long, default_value_t = 4)]
    pub prefetch: usize,
}

/// InternVL's image and video preprocessing flags, shared by `train` and `eval`.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct PreprocessArgs {
    /// Fewest image tiles per image (InternVL's dynamic resolution).
    #[arg(long, default_value_t = 1)]
    pub min_dynamic_patch: usize,
    /// Most image tiles per image.
    #[arg(long, default_value_t = 12)]
    pub max_dynamic_patch: usize,
    /// Add a whole-image thumbnail tile to multi-tile images (off by default; the launcher's
    /// presets turn it on).
    #[arg(long)]
    pub use_thumbnail: bool,
    /// Fewest frames sampled per video.
    #[arg(long, default_value_t = 4)]
    pub min_num_frame: usize,
    /// Most frames sampled per video.
    #[arg(long, default_value_t = 12)]
    pub max_num_frame: usize,
}

impl PreprocessArgs {
    /// Adds a message per inconsistent flag pair to `errs`.
    pub fn check(&self, errs: &mut Vec<String>) {
        if self.min_dynamic_patch == 0 || self.max_dynamic_patch < self.min_dynamic_patch {
            errs.push(format!(
                "--min-dynamic-patch {} / --max-dynamic-patch {}: expected 1 ≤ min ≤ max",
                self.min_dynamic_patch, self.max_dynamic_patch
            ));
        }
        if self.min_num_frame == 0 || self.max_num_frame < self.min_num_frame {
            errs.push(format!(
                "--min-num-frame {} / --max-num-frame {}: expected 1 ≤ min ≤ max",
                self.min_num_frame, self.max_num_frame
            ));
        }
    }

    /// The data pipeline's settings for a model with `preset`'s vision tower.
    pub fn data_config(&self, preset: &mm_spec::ModelPreset, seq_length: usize) -> DataConfig {
        DataConfig {
            image_size: preset.vision.image_size as u32,
            num_image_token: preset.num_image_token(),
            min_dynamic_patch: self.min_dynamic_patch,
            max_dynamic_patch: self.max_dynamic_patch,
            use_thumbnail: self.use_thumbnail,
            min_num_frame: self.min_num_frame,
            max_num_frame: self.max_num_frame,
            seq_length,
        }
    }
}

/// The flags after checking, with the batch arithmetic done.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// Micro batches per step on each data-parallel rank.
    pub grad_accumulation: usize,
    pub data_parallel_size: usize,
    pub global_batch_size: usize,
    pub decay: DecayStyle,
    pub loss: LossReduction,
    pub cp_exchange: crate::model::cp::KvExchange,
    pub bf16: bool,
    /// `--llm-pp-layers` and `--vit-pp-layers` parsed, one entry per pipeline chunk.
    pub llm_pp_layers: Option<Vec<usize>>,
    pub vit_pp_layers: Option<Vec<usize>>,
    pub recompute: Option<crate::model::recompute::Recompute>,
}

fn parse_list(s: &str) -> Option<Vec<usize>> {
    s.split(',').map(|x| x.trim().parse().ok()).collect()
}

/// What mm-engine runs (quoted when a layout setting is refused).
pub use mm_spec::layout::MM_ENGINE_LIMITS as LIMITS;

/// Every problem [`TrainArgs::validate`] found, one per line, and whether they are all about
/// the parallel layout (the sizes against WORLD_SIZE, the pipeline split's length), which
/// exits with code 3 like the launcher's and mm-convert's layout misfits; any other makes it a
/// usage error (2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagErrors {
    pub text: String,
    pub layout_only: bool,
}

impl std::fmt::Display for FlagErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::ops::Deref for FlagErrors {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

impl TrainArgs {
    /// Checks everything that does not need the model, reporting all problems at once.
    /// `world_size` ranks: tensor × context × pipeline × data-parallel ranks.
    pub fn validate(&self, world_size: usize) -> Result<Resolved, FlagErrors> {
        let mut errs: Vec<String> = Vec::new();
        // Problems of the parallel layout alone (exit code 3 when they are all there is).
        let mut layout: Vec<String> = Vec::new();
        let pp = self.pipeline_model_parallel_size.max(1);
        let vpp = self.virtual_pipeline_model_parallel_size.unwrap_or(1).max(1);
        let mut lists = [None, None];
        for (i, (flag, v)) in
            [("--llm-pp-layers", &self.llm_pp_layers), ("--vit-pp-layers", &self.vit_pp_layers)].into_iter().enumerate()
        {
            if let Some(s) = v {
                match parse_list(s) {
                    None => errs.push(format!("{flag} {s:?}: expected a comma-separated list of layer counts")),
                    Some(l) if l.len() != pp * vpp => layout.push(format!(
                        "{flag} {s:?}: {} entries, but pipeline size {pp} × virtual stages {vpp} needs {}",
                        l.len(),
                        pp * vpp
                    )),
                    Some(l) => lists[i] = Some(l),
                }
            }
        }
        let [llm_pp_layers, vit_pp_layers] = lists;
        let unsupported = mm_spec::layout::mm_engine_unsupported(
            self.context_parallel_size,
            self.context_parallel_algo.as_deref(),
            vit_pp_layers.as_deref().unwrap_or_default(),
        );
        for u in unsupported {
            errs.push(format!("{} {}: {LIMITS}", u.flag, u.value));
        }
        let model_parallel = pp * self.tensor_model_parallel_size.max(1) * self.context_parallel_size.max(1);
        let world = world_size.max(1);
        if world % model_parallel != 0 {
            layout.push(format!(
                "WORLD_SIZE {world} is not a multiple of tensor × context × pipeline parallel size {model_parallel}"
            ));
        }
        let dp = (world / model_parallel).max(1);
        if self.virtual_pipeline_model_parallel_size.is_some_and(|v| v > 1) && pp == 1 {
            layout.push(format!(
                "--virtual-pipeline-model-parallel-size {vpp}: needs --pipeline-model-parallel-size above 1"
            ));
        }
        if !(self.dp_bucket_mb.is_finite() && self.dp_bucket_mb > 0.0) {
            errs.push(format!("--dp-bucket-mb {}: expected a size above 0", self.dp_bucket_mb));
        }
        let batch = mm_spec::layout::BatchSizes::derive(
            self.micro_batch_size,
            self.global_batch_size,
            self.grad_accumulation,
            dp,
        );
        let (ga, gbs) = match batch {
            Ok(b) => (b.grad_accumulation, b.global_batch_size),
            Err(e) => {
                let flags = mm_spec::layout::BatchSizes::flag_names(&e.to_string());
                errs.push(format!("{flags} ({dp} data-parallel rank{})", if dp == 1 { "" } else { "s" }));
                (1, 1)
            }
        };
        if self.seq_length < 2 {
            errs.push(format!("--seq-length {}: expected at least 2", self.seq_length));
        }
        if self.train_iters == 0 {
            errs.push("--train-iters 0: expected at least 1".into());
        }
        let rate_ok = |r: f64| r.is_finite() && r >= 0.0;
        if !rate_ok(self.lr) || !rate_ok(self.min_lr) {
            errs.push(format!("--lr {} / --min-lr {}: expected finite rates ≥ 0", self.lr, self.min_lr));
        }
        if !(0.0..=1.0).contains(&self.lr_warmup_fraction) {
            errs.push(format!("--lr-warmup-fraction {}: expected a fraction in [0, 1]", self.lr_warmup_fraction));
        }
        for (flag, b) in [("--adam-beta1", self.adam_beta1), ("--adam-beta2", self.adam_beta2)] {
            if !(0.0..1.0).contains(&b) {
                errs.push(format!("{flag} {b}: expected a value in [0, 1)"));
            }
        }
        if self.adam_eps.is_nan() || self.adam_eps <= 0.0 {
            errs.push(format!("--adam-eps {}: expected a value above 0", self.adam_eps));
        }
        if !rate_ok(self.clip_grad) || !rate_ok(self.weight_decay) {
            errs.push(format!(
                "--clip-grad {} / --weight-decay {}: expected values ≥ 0",
                self.clip_grad, self.weight_decay
            ));
        }
        if !(0.0..=1.0).contains(&self.max_bad_fraction) {
            errs.push(format!("--max-bad-fraction {}: expected a fraction in [0, 1]", self.max_bad_fraction));
        }
        if self.auto_resume && self.save.is_none() {
            errs.push("--auto-resume: resumes from --save, which is not set".into());
        }
        if self.save.is_some()
            && self.ckpt_format == super::checkpoint::CkptFormat::Torch
            && self.tensor_model_parallel_size > 1
        {
            errs.push(format!(
                "--ckpt-format torch with --tensor-model-parallel-size {}: MindSpeed-MM splits the vocabulary, \
                 projector and ViT heads differently from mm-engine's ranks; save with --ckpt-format mm and convert \
                 (`mm-convert mm-to-hf`, then `mm-convert hf-to-mm --format mindspeed`)",
                self.tensor_model_parallel_size
            ));
        }
        self.pre.check(&mut errs);
        if !crate::data::template::TEMPLATES.contains(&self.template.as_str()) {
            errs.push(format!(
                "--template {:?}: expected one of {:?}",
                self.template,
                crate::data::template::TEMPLATES
            ));
        }
        if self.peak_tflops.is_some_and(|p| !(p.is_finite() && p > 0.0)) {
            errs.push(format!(
                "--peak-tflops {}: expected a positive number of TFLOP/s",
                self.peak_tflops.unwrap_or(0.0)
            ));
        }
        if self.log_interval == 0 {
            errs.push("--log-interval 0: expected at least 1".into());
        }
        if let Some(r) = self.vit_drop_path_rate.filter(|r| !(0.0..1.0).contains(r)) {
            errs.push(format!("--vit-drop-path-rate {r}: expected a probability in [0, 1)"));
        }
        let recompute = crate::model::recompute::Recompute::from_flags(
            self.recompute_granularity.as_deref(),
            self.recompute_method.as_deref(),
            self.recompute_num_layers,
        )
        .map_err(|e| errs.push(e))
        .ok()
        .flatten();
        if self.save_interval > 0 && self.save.is_none() {
            errs.push(format!("--save-interval {} without --save DIR", self.save_interval));
        }
        if !matches!(self.device.as_str(), "auto" | "cpu" | "cuda") && !self.device.starts_with("cuda:") {
            errs.push(format!("--device {:?}: expected auto, cpu, cuda or cuda:N", self.device));
        }
        let decay =
            self.lr_decay_style.parse::<DecayStyle>().map_err(|e| errs.push(format!("--lr-decay-style {e}"))).ok();
        let loss =
            self.loss_reduction.parse::<LossReduction>().map_err(|e| errs.push(format!("--loss-reduction {e}"))).ok();
        let cp_exchange = self
            .cp_kv_exchange
            .parse::<crate::model::cp::KvExchange>()
            .map_err(|e| errs.push(format!("--cp-kv-exchange {e}")))
            .ok();
        let precision = match self.precision.as_deref() {
            None => None,
            Some(p @ ("bf16" | "fp16" | "fp32")) => Some(p),
            Some(other) => {
                errs.push(format!("--precision {other:?}: expected bf16, fp16 or fp32"));
                None
            }
        };
        let bf16 = self.bf16 || precision == Some("bf16");
        let fp16 = self.fp16 || precision == Some("fp16");
        if fp16 {
            errs.push("--fp16: fp16 training needs loss scaling, which this engine does not do; use --bf16".into());
        }
        if bf16 && precision == Some("fp32") {
            errs.push("--bf16 together with --precision fp32: pick one".into());
        }
        if self.freeze_vision && self.freeze_projector && self.freeze_llm {
            errs.push("--freeze-vision, --freeze-projector and --freeze-llm together leave nothing to train".into());
        }
        if !errs.is_empty() || !layout.is_empty() {
            let layout_only = errs.is_empty();
            layout.extend(errs);
            return Err(FlagErrors { text: layout.join("\n  "), layout_only });
        }
        Ok(Resolved {
            grad_accumulation: ga,
            data_parallel_size: dp,
            global_batch_size: gbs,
            decay: decay.unwrap_or(DecayStyle::Linear),
            loss: loss.unwrap_or(LossReduction::Default),
            cp_exchange: cp_exchange.unwrap_or(crate::model::cp::KvExchange::Ring),
            bf16,
            llm_pp_layers,
            vit_pp_layers,
            recompute,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: TrainArgs,
    }

    fn args(extra: &str) -> TrainArgs {
        let base = ["mm-engine", "--data-path", "d.jsonl", "--lr", "0.001", "--train-iters", "3"];
        Cli::try_parse_from(base.into_iter().chain(extra.split_whitespace())).unwrap().a
    }

    #[test]
    fn the_global_batch_spans_the_data_parallel_ranks() {
        let r = args("--micro-batch-size 2 --global-batch-size 16").validate(4).unwrap();
        assert_eq!((r.grad_accumulation, r.global_batch_size, r.data_parallel_size), (2, 16, 4));
        let r = args("--micro-batch-size 2 --grad-accumulation 3").validate(2).unwrap();
        assert_eq!((r.grad_accumulation, r.global_batch_size), (3, 12));
        let r = args("--micro-batch-size 2").validate(3).unwrap();
        assert_eq!((r.grad_accumulation, r.global_batch_size), (1, 6));
        // What the launcher renders: both, consistent with dp.
        let r = args("--micro-batch-size 1 --grad-accumulation 2 --global-batch-size 4").validate(2).unwrap();
        assert_eq!(r.grad_accumulation, 2);
        let e = args("--micro-batch-size 1 --grad-accumulation 2 --global-batch-size 4").validate(4).unwrap_err();
        assert!(
            e.contains(
                "--global-batch-size 4 does not equal --micro-batch-size × --grad-accumulation × dp = 1×2×4 = 8: set \
                 --global-batch-size to 8"
            ),
            "{e}"
        );
        assert!(e.contains("(4 data-parallel ranks)"), "{e}");
        let e = args("--micro-batch-size 2 --global-batch-size 6").validate(2).unwrap_err();
        assert!(e.contains("--global-batch-size 6 is not a multiple of --micro-batch-size × dp = 2×2 = 4"), "{e}");
    }

    #[test]
    fn ulysses_a_late_vit_and_bad_bucket_sizes_are_refused_together() {
        let e = args(
            "--context-parallel-size 2 --context-parallel-algo ulysses_cp_algo --pipeline-model-parallel-size 2 \
             --vit-pp-layers 1,1 --dp-bucket-mb 0",
        )
        .validate(4)
        .unwrap_err();
        assert!(e.contains("--context-parallel-algo ulysses_cp_algo: mm-engine runs data, tensor"), "{e}");
        assert!(!e.contains("--context-parallel-size 2:"), "context parallelism runs: {e}");
        // Context-parallel ranks hold replicas but read the same data: 8 ranks at cp 2 × tp 2
        // are 2 data-parallel ranks.
        let r =
            args("--context-parallel-size 2 --tensor-model-parallel-size 2 --micro-batch-size 1 --global-batch-size 4")
                .validate(8)
                .unwrap();
        assert_eq!((r.data_parallel_size, r.grad_accumulation), (2, 2));
        assert!(e.contains("--vit-pp-layers 1,1: mm-engine runs"), "{e}");
        assert!(!e.contains("--pipeline-model-parallel-size 2:"), "pipelines run: {e}");
        let torch = args("--tensor-model-parallel-size 2 --save s --ckpt-format torch").validate(2).unwrap_err();
        assert!(torch.contains("--ckpt-format torch with --tensor-model-parallel-size 2"), "{torch}");
        let r = args("--tensor-model-parallel-size 2 --micro-batch-size 1 --global-batch-size 2").validate(4).unwrap();
        assert_eq!(r.data_parallel_size, 2, "tensor-parallel ranks are not data parallel");
        assert!(e.contains("--dp-bucket-mb 0: expected a size above 0"), "{e}");
        // Pipeline stages divide the world: 4 ranks at pp 2 are 2 data-parallel replicas.
        let r =
            args("--pipeline-model-parallel-size 2 --micro-batch-size 1 --global-batch-size 4").validate(4).unwrap();
        assert_eq!((r.data_parallel_size, r.grad_accumulation), (2, 2));
        let e = args("--pipeline-model-parallel-size 2 --llm-pp-layers 1,1,1").validate(2).unwrap_err();
        assert!(e.contains("3 entries, but pipeline size 2 × virtual stages 1 needs 2"), "{e}");
        assert!(e.layout_only, "{e}");
        let e = args("--pipeline-model-parallel-size 2").validate(3).unwrap_err();
        assert!(e.contains("WORLD_SIZE 3 is not a multiple of"), "{e}");
        assert!(e.layout_only, "{e}");
        let e = args("--pipeline-model-parallel-size 2 --dp-bucket-mb 0").validate(3).unwrap_err();
        assert!(!e.layout_only, "a usage error among them makes it one: {e}");
    }
}
