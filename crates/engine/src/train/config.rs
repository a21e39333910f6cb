//! The training run's settings, checked once: [`TrainConfig`] is built from the `train` flags
//! ([`TrainArgs`], the CLI definition) and what [`TrainArgs::validate`] resolved, and holds the
//! parsed values the loop uses (parallel sizes, layer lists, the batch arithmetic, the save
//! layout's inputs). Nothing past this point reads the clap struct or re-parses a flag.

use std::path::PathBuf;

use crate::cli::LayoutError;
use crate::model::StagePart;

use super::args::{PreprocessArgs, Resolved, TrainArgs};
use super::checkpoint::CkptFormat;
use super::loss::LossReduction;
use super::optimizer::AdamWConfig;
use super::schedule::{DecayStyle, Schedule};

/// A checked `mm-engine train` run.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Model preset name (a checkpoint's config.json wins over it).
    pub model: String,
    /// cpu, cuda, cuda:N or auto.
    pub device: String,
    pub tokenizer: Option<PathBuf>,
    pub parallel: ParallelConfig,
    pub data: DataSettings,
    /// Activation recomputation (None: activations are kept).
    pub recompute: Option<crate::model::recompute::Recompute>,
    /// The ViT's drop path rate instead of the checkpoint's.
    pub vit_drop_path_rate: Option<f64>,

    /// Samples per micro batch.
    pub micro_batch_size: usize,
    /// Micro batches per step on each data-parallel rank.
    pub grad_accumulation: usize,
    /// Samples per optimizer step over all data-parallel ranks.
    pub global_batch_size: usize,
    pub seq_length: usize,

    pub lr: f64,
    pub min_lr: f64,
    pub lr_warmup_fraction: f64,
    pub decay: DecayStyle,
    pub train_iters: u64,
    pub adamw: AdamWConfig,
    /// Gradient clipping by global L2 norm; 0 disables.
    pub clip_grad: f64,
    pub loss: LossReduction,
    pub seed: u64,
    pub bf16: bool,
    /// ZeRO-1 over the data-parallel ranks.
    pub distributed_optimizer: bool,
    /// Data-parallel gradient all-reduce bucket size.
    pub bucket_bytes: usize,
    pub freeze: Freeze,

    pub checkpoint: CheckpointConfig,
    pub log_interval: u64,
    pub log_tps: bool,
    pub metrics: MetricsConfig,
    /// None: no evaluation.
    pub eval: Option<EvalConfig>,
}

/// Where rank 0 writes the logged scalars, and the peak MFU divides by.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetricsConfig {
    /// metrics.jsonl (None: not written).
    pub file: Option<PathBuf>,
    pub tensorboard_dir: Option<PathBuf>,
    /// Peak dense TFLOP/s per device, when given.
    pub peak_tflops: Option<f64>,
}

/// The rank layout's sizes and the pipeline split, as the flags ask for them.
#[derive(Debug, Clone, PartialEq)]
pub struct ParallelConfig {
    /// Tensor-parallel size (at least 1).
    pub tp: usize,
    /// Context-parallel size (at least 1).
    pub cp: usize,
    /// How context parallelism's attention exchanges keys and values.
    pub cp_exchange: crate::model::cp::KvExchange,
    /// Pipeline stages (at least 1).
    pub pp: usize,
    /// Virtual stages per pipeline rank; None for one.
    pub vpp: Option<usize>,
    pub unaligned_linear: bool,
    /// Megatron's sequence parallelism in the LLM (with tp > 1).
    pub sequence_parallel: bool,
    /// LLM layers per pipeline chunk (None: mm-spec's even split).
    pub llm_pp_layers: Option<Vec<usize>>,
    /// ViT layers per pipeline chunk (all on the first one).
    pub vit_pp_layers: Option<Vec<usize>>,
}

/// Where the data comes from and how it is read.
#[derive(Debug, Clone)]
pub struct DataSettings {
    pub data_path: PathBuf,
    pub data_folder: Option<PathBuf>,
    pub pre: PreprocessArgs,
    pub max_bad_fraction: f64,
    /// Loader threads.
    pub workers: usize,
    /// Micro batches prepared ahead.
    pub prefetch: usize,
}

/// Which towers keep their weights fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freeze {
    pub vision: bool,
    pub projector: bool,
    pub llm: bool,
}

/// Loading, resuming and saving.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointConfig {
    pub load: Option<PathBuf>,
    pub save: Option<PathBuf>,
    pub format: CkptFormat,
    /// Resume from `save` when it holds a checkpoint.
    pub auto_resume: bool,
    pub load_optim: bool,
    pub load_rng: bool,
    pub save_optim: bool,
    pub save_rng: bool,
    /// Save every N iterations (and at the end); 0 only at the end.
    pub save_interval: u64,
    /// Stop after an iteration divisible by N (never 0).
    pub exit_interval: Option<u64>,
}

/// Evaluation every `interval` iterations over `iters` micro batches (both above 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalConfig {
    pub interval: u64,
    pub iters: u64,
}

impl TrainConfig {
    /// Checks the flags for `world_size` ranks (every problem at once) and builds the config.
    pub fn new(a: TrainArgs, world_size: usize) -> Result<TrainConfig, super::args::FlagErrors> {
        let r = a.validate(world_size)?;
        Ok(TrainConfig::from_checked(a, r))
    }

    /// The config of flags `a` that [`TrainArgs::validate`] resolved to `r`.
    pub fn from_checked(a: TrainArgs, r: Resolved) -> TrainConfig {
        let metrics_beside_saves =
            if crate::cli::launched() { None } else { a.save.as_ref().map(|s| s.join("metrics.jsonl")) };
        TrainConfig {
            model: a.model,
            device: a.device,
            tokenizer: a.tokenizer,
            parallel: ParallelConfig {
                tp: a.tensor_model_parallel_size.max(1),
                cp: a.context_parallel_size.max(1),
                cp_exchange: r.cp_exchange,
                pp: a.pipeline_model_parallel_size.max(1),
                vpp: a.virtual_pipeline_model_parallel_size.filter(|&v| v > 1),
                unaligned_linear: a.unaligned_linear,
                sequence_parallel: a.sequence_parallel,
                llm_pp_layers: r.llm_pp_layers,
                vit_pp_layers: r.vit_pp_layers,
            },
            recompute: r.recompute,
            vit_drop_path_rate: a.vit_drop_path_rate,
            data: DataSettings {
                data_path: a.data_path,
                data_folder: a.data_folder,
                pre: a.pre,
                max_bad_fraction: a.max_bad_fraction,
                workers: a.num_workers.max(1),
                prefetch: a.prefetch,
            },
            micro_batch_size: a.micro_batch_size,
            grad_accumulation: r.grad_accumulation,
            global_batch_size: r.global_batch_size,
            seq_length: a.seq_length,
            lr: a.lr,
            min_lr: a.min_lr,
            lr_warmup_fraction: a.lr_warmup_fraction,
            decay: r.decay,
            train_iters: a.train_iters,
            adamw: AdamWConfig {
                beta1: a.adam_beta1,
                beta2: a.adam_beta2,
                eps: a.adam_eps,
                weight_decay: a.weight_decay,
            },
            clip_grad: a.clip_grad,
            loss: r.loss,
            seed: a.seed,
            bf16: r.bf16,
            distributed_optimizer: a.use_distributed_optimizer,
            bucket_bytes: (a.dp_bucket_mb * (1u64 << 20) as f64).max(1.0) as usize,
            freeze: Freeze { vision: a.freeze_vision, projector: a.freeze_projector, llm: a.freeze_llm },
            checkpoint: CheckpointConfig {
                load: a.load,
                save: a.save,
                format: a.ckpt_format,
                auto_resume: a.auto_resume,
                load_optim: !a.no_load_optim,
                load_rng: !a.no_load_rng,
                save_optim: !a.no_save_optim,
                save_rng: !a.no_save_rng,
                save_interval: a.save_interval,
                exit_interval: a.exit_interval.filter(|&n| n > 0),
            },
            log_interval: a.log_interval,
            log_tps: a.log_tps,
            metrics: MetricsConfig {
                // Run alone, the metrics stay beside the checkpoints (a resume appends to them);
                // under launch the launcher keeps them in the run folder.
                file: a.metrics_file.or(metrics_beside_saves),
                tensorboard_dir: a.tensorboard_dir,
                peak_tflops: a.peak_tflops,
            },
            eval: (a.eval_interval > 0 && a.eval_iters > 0)
                .then_some(EvalConfig { interval: a.eval_interval, iters: a.eval_iters }),
        }
    }

    /// The learning-rate schedule.
    pub fn schedule(&self) -> Schedule {
        Schedule::new(self.lr, self.min_lr, self.lr_warmup_fraction, self.train_iters, self.decay)
    }
}

impl ParallelConfig {
    /// Virtual stages per pipeline rank (1 without interleaving).
    pub fn virtual_stages(&self) -> usize {
        self.vpp.unwrap_or(1)
    }

    /// This pipeline rank's model chunks for `preset` (mm-spec's split of `--llm-pp-layers`, chunk
    /// `v·pp + rank` for each virtual stage `v`): the first holds the ViT, projector and embedding,
    /// the last the final norm and output layer. One stage: the whole model.
    pub fn stage_parts(&self, preset: &mm_spec::ModelPreset, pp_rank: usize) -> anyhow::Result<Vec<StagePart>> {
        let (pp, vpp) = (self.pp, self.vpp);
        let (llm_depth, vit_depth) = (preset.llm.num_hidden_layers, preset.vision.num_hidden_layers);
        let stages = mm_spec::layout::split_layers(llm_depth, pp, vpp, self.llm_pp_layers.as_deref())
            .map_err(|e| LayoutError(format!("--llm-pp-layers: {e}")))?;
        if let Some(v) = &self.vit_pp_layers {
            if !(v.first() == Some(&vit_depth) && v.iter().skip(1).all(|&n| n == 0)) {
                return Err(LayoutError(format!(
                    "--vit-pp-layers {}: the model's ViT has {vit_depth} layers, all on the first pipeline chunk \
                     ({vit_depth},0,…)",
                    v.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",")
                ))
                .into());
            }
        }
        let chunks = stages.len();
        Ok((0..self.virtual_stages())
            .map(|v| {
                let c = v * pp + pp_rank;
                StagePart { first: c == 0, llm_layers: stages[c].layers(), last: c + 1 == chunks }
            })
            .collect())
    }

    /// The layout the run trains and saves with: its tensor-parallel size and unaligned rule, its
    /// pipeline split (mm-spec's, as the stages were built) with the ViT on the first chunk.
    pub fn save_layout(&self, preset: &mm_spec::ModelPreset) -> anyhow::Result<mm_spec::LayoutRequest> {
        let (pp, vpp) = (self.pp, self.vpp);
        let stages =
            mm_spec::layout::split_layers(preset.llm.num_hidden_layers, pp, vpp, self.llm_pp_layers.as_deref())
                .map_err(|e| LayoutError(format!("--llm-pp-layers: {e}")))?;
        let vit = mm_spec::layout::vit_pp_layers_or_default(None, preset.vision.num_hidden_layers, pp, vpp);
        Ok(mm_spec::LayoutRequest {
            tp: self.tp,
            pp: Some(pp),
            vpp,
            llm_pp_layers: Some(stages.iter().map(|s| s.num_layers).collect()),
            vit_pp_layers: Some(vit),
            unaligned_linear: self.unaligned_linear,
            make_vocab_size_divisible_by: None,
        })
    }
}

impl Freeze {
    /// Whether engine parameter `name` stays fixed.
    pub fn frozen(&self, name: &str) -> bool {
        (self.vision && name.starts_with("vision_model."))
            || (self.projector && name.starts_with("mlp1."))
            || (self.llm && name.starts_with("language_model."))
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

    fn config(extra: &str, world: usize) -> TrainConfig {
        let base = ["mm-engine", "--data-path", "d.jsonl", "--lr", "0.001", "--train-iters", "3"];
        let a = Cli::try_parse_from(base.into_iter().chain(extra.split_whitespace())).unwrap().a;
        TrainConfig::new(a, world).unwrap()
    }

    #[test]
    fn the_flags_are_parsed_once_into_numbers_and_lists() {
        let c = config(
            "--pipeline-model-parallel-size 2 --virtual-pipeline-model-parallel-size 2 --llm-pp-layers 1,0,0,1 \
             --vit-pp-layers 2,0,0,0 --tensor-model-parallel-size 2 --micro-batch-size 1 --global-batch-size 4 \
             --no-save-optim --exit-interval 0 --eval-interval 5 --recompute-granularity full \
             --recompute-method block --recompute-num-layers 2",
            8,
        );
        let p = &c.parallel;
        assert_eq!((p.tp, p.pp, p.vpp, p.virtual_stages()), (2, 2, Some(2), 2));
        assert_eq!(p.llm_pp_layers.as_deref(), Some(&[1, 0, 0, 1][..]));
        assert_eq!(p.vit_pp_layers.as_deref(), Some(&[2, 0, 0, 0][..]));
        assert_eq!((c.grad_accumulation, c.global_batch_size), (2, 4));
        assert!(!c.checkpoint.save_optim && c.checkpoint.load_optim);
        assert_eq!(c.checkpoint.exit_interval, None, "--exit-interval 0 never exits");
        assert_eq!(c.eval, None, "no --eval-iters, no evaluation");
        assert_eq!(c.recompute, Some(crate::model::recompute::Recompute::FullBlock(2)));
        assert_eq!(c.bucket_bytes, (super::super::parallel::DEFAULT_BUCKET_MB * 1048576.0) as usize);
        let c = config("--virtual-pipeline-model-parallel-size 1", 1);
        assert_eq!((c.parallel.pp, c.parallel.vpp, c.parallel.virtual_stages()), (1, None, 1));
    }

    #[test]
    fn freezing_goes_by_the_tower_prefix() {
        let f = Freeze { vision: true, projector: false, llm: true };
        assert!(f.frozen("vision_model.encoder.layers.0.attn.qkv.weight"));
        assert!(!f.frozen("mlp1.1.weight"));
        assert!(f.frozen("language_model.model.norm.weight"));
    }
}
