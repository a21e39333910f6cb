//! Recipes: everything about a fine-tune that is not the cluster. `finetune <model>` starts
//! from the model's defaults (the seed's MindSpeed-MM scripts for 8B and 78B, derived values
//! for the other sizes), then applies, in order: the cluster file's `job:` section, a
//! `--recipe FILE` (any subset of the fields below, YAML), and each `--set key=value`.
//!
//! Overlays are merged as trees: every key must exist in the recipe (unknown keys are errors
//! with a did-you-mean), and the merged tree is deserialized once, so types are checked in
//! one place whatever the source.

use std::path::{Path, PathBuf};

use mm_spec::recompute::Recompute;
use mm_spec::suggest::did_you_mean;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cluster::JobSpec;

mod set;
use crate::diag::{locate_key, yaml_input, yaml_to_value, ConfigError};

/// Model names `finetune` accepts (mm-spec presets, less the test-only `tiny6b`).
pub const RECIPE_MODELS: &[&str] = &["tiny", "1b", "2b", "8b", "14b", "38b", "78b"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// mm-spec preset name: tiny, 1b, 2b, 8b, 14b, 38b, 78b.
    pub model: String,
    pub parallel: ParallelRecipe,
    pub train: TrainRecipe,
    pub data: DataRecipe,
    pub checkpoint: CheckpointRecipe,
    pub output: OutputRecipe,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelRecipe {
    pub tp: usize,
    pub cp: usize,
    pub pp: usize,
    /// Virtual pipeline stages per pipeline rank (interleaved schedule); null = off.
    pub vpp: Option<usize>,
    pub sequence_parallel: bool,
    /// MindSpeed's `--unaligned-linear`: TP sizes that do not divide the head counts.
    pub unaligned_linear: bool,
    /// LLM layers per pipeline chunk in model order (pp × vpp entries); null = even split.
    pub llm_pp_layers: Option<Vec<usize>>,
    /// ViT layers per pipeline chunk in model order; null = even split.
    pub vit_pp_layers: Option<Vec<usize>>,
    /// ZeRO-1: optimizer state sharded over data-parallel ranks (`--use-distributed-optimizer`).
    pub distributed_optimizer: bool,
    pub context_parallel_algo: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Bf16,
    Fp16,
    Fp32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrDecayStyle {
    Cosine,
    Linear,
    Constant,
}

/// Megatron's `--recompute-granularity`: whole layers, or the attention core of every layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecomputeGranularity {
    Full,
    Selective,
}

/// Megatron's `--recompute-method` (with full granularity): every layer in groups of
/// `recompute_num_layers`, or the first `recompute_num_layers` layers of each pipeline stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecomputeMethod {
    Uniform,
    Block,
}

/// MindSpeed-MM's `vlm_model_loss_calculate_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossReduction {
    /// Mean over each micro batch's supervised tokens, then over micro batches and DP ranks.
    Default,
    /// Mean within each sample first.
    PerSample,
    /// Sum over the global batch ÷ the global supervised-token count.
    PerToken,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainRecipe {
    pub micro_batch_size: usize,
    /// Samples per optimizer step over all DP ranks; null = micro × grad_accumulation × dp.
    pub global_batch_size: Option<usize>,
    /// Micro batches per optimizer step on each DP rank; null = derived from the global batch.
    pub grad_accumulation: Option<usize>,
    pub seq_length: usize,
    pub train_iters: u64,
    pub lr: f64,
    pub min_lr: f64,
    pub lr_decay_style: LrDecayStyle,
    pub lr_warmup_fraction: f64,
    pub weight_decay: f64,
    pub clip_grad: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub precision: Precision,
    pub seed: u64,
    pub loss_reduction: LossReduction,
    pub freeze_vision: bool,
    pub freeze_projector: bool,
    pub freeze_llm: bool,
    /// Activation recomputation (gradient checkpointing) of every layer: full, uniform, 1 layer
    /// (MindSpeed-MM's 78B example), unless `recompute_granularity` says otherwise.
    pub recompute: bool,
    /// Megatron's `--recompute-granularity` (full or selective); with it, `recompute` is moot.
    #[serde(default)]
    pub recompute_granularity: Option<RecomputeGranularity>,
    /// Megatron's `--recompute-method` (uniform or block), with full granularity.
    #[serde(default)]
    pub recompute_method: Option<RecomputeMethod>,
    /// Megatron's `--recompute-num-layers` (default 1), with full granularity.
    #[serde(default)]
    pub recompute_num_layers: Option<usize>,
    /// InternViT's stochastic depth while fine-tuning; null = the model's config value.
    /// MindSpeed-MM's InternVL3-78B example trains with 0.4.
    #[serde(default)]
    pub vit_drop_path_rate: Option<f64>,
    pub flash_attention: bool,
    pub num_workers: usize,
}

impl TrainRecipe {
    /// The recomputation asked for, checked as Megatron checks its flags: `recompute_granularity`
    /// wins over the `recompute` shorthand (full, uniform, 1); a method or layer count needs
    /// full granularity; uniform needs at least one layer per group.
    pub fn recompute_setting(&self) -> Result<Option<Recompute>, (String, String)> {
        let (m, n) = (self.recompute_method, self.recompute_num_layers);
        let g = match (self.recompute_granularity, self.recompute) {
            (Some(g), _) => g,
            (None, true) if m.is_none() && n.is_none() => return Ok(Some(Recompute::FullUniform(1))),
            (None, _) if m.is_some() || n.is_some() => {
                return Err((
                    "train.recompute_granularity".into(),
                    "recompute_method and recompute_num_layers need recompute_granularity full: add \
                     --set train.recompute_granularity=full"
                        .into(),
                ))
            }
            (None, _) => return Ok(None),
        };
        match g {
            RecomputeGranularity::Selective if m.is_some() || n.is_some() => Err((
                "train.recompute_method".into(),
                "selective recomputation reruns every layer's attention core and takes no method or layer \
                 count: clear them (--set train.recompute_method=null --set train.recompute_num_layers=null)"
                    .into(),
            )),
            RecomputeGranularity::Selective => Ok(Some(Recompute::Selective)),
            RecomputeGranularity::Full => {
                let Some(method) = m else {
                    return Err((
                        "train.recompute_method".into(),
                        "full recomputation needs a method: uniform (every layer, in groups of \
                         recompute_num_layers) or block (the first recompute_num_layers layers of each stage)"
                            .into(),
                    ));
                };
                let n = n.unwrap_or(1);
                if n == 0 {
                    let what = match method {
                        RecomputeMethod::Uniform => "0 layers per group: expected at least 1",
                        RecomputeMethod::Block => {
                            "0 recomputed layers per stage: expected at least 1 (or clear recompute_granularity)"
                        }
                    };
                    return Err(("train.recompute_num_layers".into(), what.into()));
                }
                Ok(Some(match method {
                    RecomputeMethod::Uniform => Recompute::FullUniform(n),
                    RecomputeMethod::Block => Recompute::FullBlock(n),
                }))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataRecipe {
    /// InternVL chat JSONL, or a meta JSON listing several datasets.
    pub data_path: Option<PathBuf>,
    /// Root the image and video paths in the records are relative to.
    pub data_folder: Option<PathBuf>,
    pub template: String,
    pub min_dynamic_patch: usize,
    pub max_dynamic_patch: usize,
    pub use_thumbnail: bool,
    pub min_num_frame: usize,
    pub max_num_frame: usize,
    /// Stop the run when more than this fraction of records is unreadable.
    pub max_bad_fraction: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRecipe {
    /// A converted checkpoint or a save dir (its latest_checkpointed_iteration.txt picks the iteration).
    pub load: Option<PathBuf>,
    pub save: Option<PathBuf>,
    /// The HF folder whose tokenizer.json is used (the seed: the unconverted weights).
    pub tokenizer: Option<PathBuf>,
    pub no_load_optim: bool,
    pub no_save_optim: bool,
    pub no_load_rng: bool,
    pub no_save_rng: bool,
    /// mm-engine only: resume from `save` when it already holds a checkpoint (a rerun or a
    /// `--max-restarts` restart continues where the job stopped); `load` otherwise.
    pub auto_resume: bool,
    /// mm-engine only: the weights' format in its saves (`--ckpt-format`): `mm` (its
    /// safetensors layout) or `torch` (MindSpeed-MM's `model_optim_rng.pt`, for a job that
    /// moves on to an Ascend cluster). Unset: `mm` for mm-engine; the MindSpeed templates
    /// always save `torch`.
    #[serde(default)]
    pub save_format: Option<SaveFormat>,
}

/// The format of the weights in mm-engine's saves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SaveFormat {
    #[default]
    Mm,
    Torch,
}

impl CheckpointRecipe {
    /// What a `--max-restarts` restart will not restore with these settings (None: it resumes
    /// exactly: weights, optimizer, RNG and data position). `mm_engine`: the mm-engine
    /// template (the MindSpeed ones resume only when `load` points at the save folder).
    pub fn restart_caveat(&self, mm_engine: bool) -> Option<String> {
        if self.save.is_none() {
            return Some("no checkpoint.save folder: a restart starts the training over".into());
        }
        if !mm_engine {
            return Some(
                "with the MindSpeed templates a restart resumes only when checkpoint.load is the save folder".into(),
            );
        }
        if !self.auto_resume {
            return Some("checkpoint.auto_resume is false: a restart starts again from checkpoint.load".into());
        }
        let mut lost = Vec::new();
        if self.no_save_optim || self.no_load_optim {
            lost.push("the optimizer state (no_save_optim / no_load_optim)");
        }
        if self.no_save_rng || self.no_load_rng {
            lost.push("the RNG state (no_save_rng / no_load_rng)");
        }
        (!lost.is_empty()).then(|| {
            format!(
                "a restart resumes the weights from checkpoint.save but not {}; the run will not match an \
                 uninterrupted one",
                lost.join(" or ")
            )
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputRecipe {
    pub log_interval: u64,
    pub save_interval: u64,
    pub eval_interval: u64,
    pub eval_iters: u64,
    /// The seed's `--log-tps`: tokens per second in the logs and the end-of-run summary.
    pub log_tps: bool,
    /// Megatron's `--tensorboard-dir`: event files written by the training processes on their
    /// host (the launcher also keeps its own copy in the run folder, `logs/<run>/tensorboard`).
    #[serde(default)]
    pub tensorboard_dir: Option<PathBuf>,
    /// The device's peak dense TFLOP/s for MFU, where mm-engine does not know it (an
    /// unlisted GPU, or a CPU figure other than its own measurement). mm-engine only.
    #[serde(default)]
    pub peak_tflops: Option<f64>,
}

/// Whether `finetune MODEL` names a checkpoint folder rather than a preset: a preset name always
/// wins (a folder called `8b` in the working directory does not shadow it); a path with a `/`,
/// one starting with `.`, or an existing folder is a folder.
pub fn is_model_folder(model: &str) -> bool {
    let key = model.trim().to_ascii_lowercase();
    let key = key.strip_prefix("internvl3-").unwrap_or(&key);
    if RECIPE_MODELS.contains(&key) {
        return false;
    }
    model.contains('/') || model.starts_with('.') || Path::new(model).is_dir()
}

/// The architecture `finetune MODEL` names: a preset's, or a checkpoint folder's own (an HF
/// folder's config.json in either schema, an MM save or iteration folder's manifest), read
/// through mm-spec, so custom, newer or smaller InternVL checkpoints plan with their real
/// layer and head counts.
pub fn model_architecture(model: &str) -> Result<mm_spec::ModelPreset, String> {
    if is_model_folder(model) {
        mm_spec::checkpoint::read_architecture(Path::new(model)).map(|(arch, _)| arch)
    } else {
        let key = model.trim().to_ascii_lowercase();
        mm_spec::preset(key.strip_prefix("internvl3-").unwrap_or(&key)).map_err(|e| e.to_string())
    }
}

impl Recipe {
    /// The defaults of `finetune <model>`. For a checkpoint folder: the recipe of the preset
    /// with the same architecture (the seed's 8B folder gets the seed's 8B recipe), else the
    /// plain data-parallel one; the folder is what is loaded (and its tokenizer, for HF).
    pub fn defaults(model: &str) -> Result<Recipe, String> {
        if is_model_folder(model) {
            let dir = Path::new(model);
            let (arch, kind) = mm_spec::checkpoint::read_architecture(dir)?;
            let base = RECIPE_MODELS
                .iter()
                .find(|m| {
                    mm_spec::preset(m)
                        .is_ok_and(|p| mm_spec::checkpoint::architecture_differences(&p, &arch).is_empty())
                })
                .unwrap_or(&"2b");
            let mut r = Recipe::defaults(base)?;
            r.model = model.to_string();
            r.checkpoint.load = Some(model.into());
            // Its own save folder: never auto-resume a preset's earlier run.
            r.checkpoint.save = Some(Path::new("save_dir").join(&arch.name));
            // An MM folder carries its tokenizer in hf_assets/, which the engine reads itself.
            r.checkpoint.tokenizer = (kind == mm_spec::checkpoint::FolderKind::Hf).then(|| model.into());
            return Ok(r);
        }
        let key = model.trim().to_ascii_lowercase();
        let key = key.strip_prefix("internvl3-").unwrap_or(&key);
        if !RECIPE_MODELS.contains(&key) {
            let hint = did_you_mean(key, RECIPE_MODELS).map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default();
            return Err(format!("unknown model `{model}`{hint}: expected one of {}", RECIPE_MODELS.join(", ")));
        }
        // The seed's 8B script, which every size starts from.
        let mut r = Recipe {
            model: key.to_string(),
            parallel: ParallelRecipe {
                tp: 1,
                cp: 1,
                pp: 1,
                vpp: None,
                sequence_parallel: false,
                unaligned_linear: false,
                llm_pp_layers: None,
                vit_pp_layers: None,
                distributed_optimizer: true,
                context_parallel_algo: "megatron_cp_algo".into(),
            },
            train: TrainRecipe {
                micro_batch_size: 1,
                global_batch_size: Some(128),
                grad_accumulation: None,
                seq_length: 4096,
                train_iters: 5000,
                lr: 2e-5,
                min_lr: 0.0,
                lr_decay_style: LrDecayStyle::Cosine,
                lr_warmup_fraction: 0.0,
                weight_decay: 0.05,
                clip_grad: 1.0,
                adam_beta1: 0.9,
                adam_beta2: 0.999,
                adam_eps: 1e-8,
                precision: Precision::Bf16,
                seed: 1234,
                loss_reduction: LossReduction::Default,
                freeze_vision: true,
                freeze_projector: false,
                freeze_llm: false,
                recompute: false,
                recompute_granularity: None,
                recompute_method: None,
                recompute_num_layers: None,
                vit_drop_path_rate: None,
                flash_attention: true,
                num_workers: 4,
            },
            data: DataRecipe {
                data_path: None,
                data_folder: None,
                template: "internvl2_5".into(),
                min_dynamic_patch: 1,
                max_dynamic_patch: 12,
                use_thumbnail: true,
                min_num_frame: 4,
                max_num_frame: 12,
                max_bad_fraction: 0.01,
            },
            checkpoint: CheckpointRecipe {
                load: None,
                save: Some("save_dir".into()),
                tokenizer: None,
                no_load_optim: true,
                no_save_optim: true,
                no_load_rng: true,
                no_save_rng: true,
                auto_resume: true,
                save_format: None,
            },
            output: OutputRecipe {
                log_interval: 1,
                save_interval: 5000,
                eval_interval: 5000,
                eval_iters: 5000,
                log_tps: true,
                tensorboard_dir: None,
                peak_tflops: None,
            },
        };
        let p = &mut r.parallel;
        match key {
            "tiny" => {
                // Trains in seconds on a CPU, resumes exactly: optimizer and RNG are saved.
                r.train.global_batch_size = Some(4);
                r.train.seq_length = 512;
                r.train.train_iters = 40;
                r.train.lr = 1e-3;
                r.train.min_lr = 1e-4;
                r.train.lr_warmup_fraction = 0.05;
                r.train.precision = Precision::Fp32;
                r.train.flash_attention = false;
                r.train.num_workers = 2; // 1.2× the tokens/s of one on 2 cores (make demo)
                r.data.max_dynamic_patch = 4;
                r.data.data_path = Some("runs/tiny/data/train.jsonl".into());
                r.data.data_folder = Some("runs/tiny/data".into());
                r.checkpoint = CheckpointRecipe {
                    load: Some("runs/tiny/model".into()),
                    save: Some("runs/tiny/save".into()),
                    tokenizer: Some("runs/tiny/model".into()),
                    no_load_optim: false,
                    no_save_optim: false,
                    no_load_rng: false,
                    no_save_rng: false,
                    auto_resume: true,
                    save_format: None,
                };
                r.output.save_interval = 20;
                r.output.eval_interval = 20;
                r.output.eval_iters = 0;
            }
            "1b" => r.train.lr = 1e-5, // the official InternVL3 recipe's 1B learning rate
            "2b" => {}
            "8b" => {
                // The seed: 8 NPUs, TP1 PP4, GAS 64 (GBS = 64 × DP).
                p.pp = 4;
                p.llm_pp_layers = Some(vec![6, 8, 8, 6]);
                p.vit_pp_layers = Some(vec![24, 0, 0, 0]);
                r.train.global_batch_size = None;
                r.train.grad_accumulation = Some(64);
                r.checkpoint.load = Some("pretrained/InternVL3-8B".into());
                r.checkpoint.tokenizer = Some("raw_ckpt/InternVL3-8B".into());
            }
            "14b" => {
                p.pp = 4;
                p.llm_pp_layers = Some(vec![10, 13, 13, 12]);
                p.vit_pp_layers = Some(vec![24, 0, 0, 0]);
            }
            "38b" => {
                p.tp = 8;
                p.pp = 2;
                p.unaligned_linear = true;
                p.llm_pp_layers = Some(vec![30, 34]);
                p.vit_pp_layers = Some(vec![45, 0]);
            }
            "78b" => {
                // The seed: 16 NPUs, TP8 PP2, InternViT-6B's 25 heads need unaligned TP.
                p.tp = 8;
                p.pp = 2;
                p.unaligned_linear = true;
                p.llm_pp_layers = Some(vec![40, 40]);
                p.vit_pp_layers = Some(vec![45, 0]);
                r.train.global_batch_size = None;
                r.train.grad_accumulation = Some(128);
                // MindSpeed-MM's examples/internvl3/model_78B.json, which the seed's 78B script
                // uses: full recomputation (uniform, 1 layer) and ViT drop path 0.4.
                r.train.recompute = true;
                r.train.vit_drop_path_rate = Some(0.4);
                r.checkpoint.load = Some("pretrained/InternVL3-78B".into());
                r.checkpoint.tokenizer = Some("raw_ckpt/InternVL3-78B".into());
            }
            _ => unreachable!("checked against RECIPE_MODELS above"),
        }
        Ok(r)
    }

    /// Resolves `finetune <model>` with the cluster's job section, a recipe file and --set pairs.
    pub fn resolve(
        model: &str,
        job: Option<(&JobSpec, &Path)>,
        recipe_file: Option<&Path>,
        sets: &[String],
    ) -> Result<Recipe, ConfigError> {
        let cli = Path::new("<command line>");
        let base = Recipe::defaults(model).map_err(|m| ConfigError::new(cli, m).with_key("finetune MODEL"))?;
        let mut tree = serde_json::to_value(&base).expect("a recipe always serializes");
        let mut sources: Vec<Source> = Vec::new();

        if let Some((job, file)) = job {
            let overlay = job_overlay(job);
            merge(&mut tree, &overlay, &mut Vec::new()).map_err(|u| {
                let key = format!("job.{}", u.key);
                u.into_error(file, None).with_key(key)
            })?;
            sources.push(Source { file: file.to_path_buf(), text: None });
        }
        if let Some(path) = recipe_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::new(path, format!("cannot read the recipe file: {e}")))?;
            // Positions are located in the text the parser saw: without a byte order mark.
            let text = yaml_input(&text, path)?.to_string();
            let overlay: Value = yaml_to_value(&text, path)?;
            if !overlay.is_object() && !overlay.is_null() {
                return Err(ConfigError::new(path, "a recipe file must be a map of keys, e.g. `train: {lr: 1e-5}`"));
            }
            if let Some(m) = overlay.get("model") {
                if m.as_str() != Some(base.model.as_str()) {
                    return Err(ConfigError::new(
                        path,
                        format!("`model` is {m} here but the command line says `{model}`"),
                    )
                    .with_key("model")
                    .with_hint("the model comes from `finetune MODEL`; remove `model` from the recipe file")
                    .at_opt(locate_key(&text, &["model".to_string()])));
                }
            }
            merge(&mut tree, &overlay, &mut Vec::new()).map_err(|u| {
                let pos = locate_key(&text, &u.path_segments());
                u.into_error(path, pos)
            })?;
            sources.push(Source { file: path.to_path_buf(), text: Some(text) });
        }
        let shapes = set::recipe_shapes();
        // The keys --set gave, latest last: errors in their values name `--set KEY`.
        let mut set_keys: Vec<&str> = Vec::new();
        for set in sets {
            let (key, value) = set.split_once('=').ok_or_else(|| {
                ConfigError::new(cli, format!("--set {set:?}: expected KEY=VALUE, e.g. --set train.lr=1e-5"))
            })?;
            let key = key.trim();
            let parsed = set::set_value(key, value, shapes.get(key).copied()).map_err(|(message, hint)| {
                ConfigError::new(cli, message).with_key(format!("--set {key}")).with_hint(hint)
            })?;
            set_keys.push(key);
            let overlay = key.split('.').rev().fold(parsed, |acc, k| {
                let mut m = serde_json::Map::new();
                m.insert(k.to_string(), acc);
                Value::Object(m)
            });
            merge(&mut tree, &overlay, &mut Vec::new())
                .map_err(|u| u.into_error(cli, None).with_key(format!("--set {key}")))?;
        }

        // Errors found after merging point at the last source that set the key.
        let locate = |path: &[String]| -> (PathBuf, Option<(usize, usize)>) {
            sources
                .iter()
                .rev()
                .find_map(|s| {
                    let t = s.text.as_deref()?;
                    locate_key(t, path).map(|p| (s.file.clone(), Some(p)))
                })
                .unwrap_or_else(|| (sources.last().map(|s| s.file.clone()).unwrap_or(cli.to_path_buf()), None))
        };
        // The --set that wrote the value at `path` (a key or a map above it), if any: --set
        // comes after every file, so it is the source.
        let set_source =
            |path: &str| -> Option<&str> {
                set_keys.iter().rev().copied().find(|k| {
                    path == *k || path.strip_prefix(k).is_some_and(|r| r.starts_with('.') || r.starts_with('['))
                })
            };
        let located = |path: &[String], message: String| -> ConfigError {
            // `parallel.llm_pp_layers[3]`: a list index follows its key without a dot.
            let joined = path.iter().fold(String::new(), |mut j, s| {
                if !j.is_empty() && !s.starts_with('[') {
                    j.push('.');
                }
                j.push_str(s);
                j
            });
            match set_source(&joined) {
                Some(k) if k == joined => ConfigError::new(cli, message).with_key(format!("--set {k}")),
                Some(k) => ConfigError::new(cli, format!("{joined}: {message}")).with_key(format!("--set {k}")),
                None => {
                    let (file, pos) = locate(path);
                    ConfigError::new(&file, message).with_key(joined).at_opt(pos)
                }
            }
        };
        let de = serde_path_to_error::deserialize::<_, Recipe>(tree);
        let recipe = de.map_err(|e| {
            let path: Vec<String> = e.path().iter().map(|s| s.to_string()).collect();
            located(&path, crate::diag::plain_types(&e.into_inner().to_string()))
        })?;
        recipe.check_values().map_err(|(key, msg)| {
            let path: Vec<String> = key.split('.').map(str::to_string).collect();
            located(&path, msg)
        })?;
        Ok(recipe)
    }

    /// Range checks serde cannot express.
    fn check_values(&self) -> Result<(), (String, String)> {
        let t = &self.train;
        let positive = [
            ("train.micro_batch_size", t.micro_batch_size as f64),
            ("train.seq_length", t.seq_length as f64),
            ("train.train_iters", t.train_iters as f64),
            ("parallel.tp", self.parallel.tp as f64),
            ("parallel.cp", self.parallel.cp as f64),
            ("parallel.pp", self.parallel.pp as f64),
            ("output.log_interval", self.output.log_interval as f64),
            ("output.save_interval", self.output.save_interval as f64),
        ];
        for (k, v) in positive {
            if v <= 0.0 {
                return Err((k.into(), "must be at least 1".into()));
            }
        }
        if t.global_batch_size.is_none() && t.grad_accumulation.is_none() {
            return Err((
                "train.global_batch_size".into(),
                "neither global_batch_size nor grad_accumulation is set: set one, e.g. --set train.global_batch_size=128"
                    .into(),
            ));
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return Err(("train.lr".into(), format!("learning rate {} must be a positive number", t.lr)));
        }
        if !(0.0..=t.lr).contains(&t.min_lr) {
            return Err(("train.min_lr".into(), format!("min_lr {} must lie between 0 and lr ({})", t.min_lr, t.lr)));
        }
        if let Some(d) = t.vit_drop_path_rate.filter(|d| !(0.0..1.0).contains(d)) {
            return Err(("train.vit_drop_path_rate".into(), format!("{d} must lie in [0, 1)")));
        }
        t.recompute_setting()?;
        if !(0.0..1.0).contains(&t.lr_warmup_fraction) {
            return Err(("train.lr_warmup_fraction".into(), format!("{} is not in [0, 1)", t.lr_warmup_fraction)));
        }
        for (k, v) in [("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err((k.into(), format!("{v} is not in [0, 1)")));
            }
        }
        if t.weight_decay < 0.0 || t.clip_grad < 0.0 || t.adam_eps <= 0.0 {
            return Err((
                "train".into(),
                "weight_decay and clip_grad must be ≥ 0 and adam_eps > 0 (clip_grad 0 turns clipping off)".into(),
            ));
        }
        let d = &self.data;
        if d.min_dynamic_patch == 0 || d.min_dynamic_patch > d.max_dynamic_patch {
            return Err((
                "data.min_dynamic_patch".into(),
                format!(
                    "need 1 ≤ min_dynamic_patch ({}) ≤ max_dynamic_patch ({})",
                    d.min_dynamic_patch, d.max_dynamic_patch
                ),
            ));
        }
        if d.min_num_frame == 0 || d.min_num_frame > d.max_num_frame {
            return Err((
                "data.min_num_frame".into(),
                format!("need 1 ≤ min_num_frame ({}) ≤ max_num_frame ({})", d.min_num_frame, d.max_num_frame),
            ));
        }
        if !(0.0..=1.0).contains(&d.max_bad_fraction) {
            return Err(("data.max_bad_fraction".into(), format!("{} is not in [0, 1]", d.max_bad_fraction)));
        }
        if let Some(p) = self.output.peak_tflops.filter(|p| !(p.is_finite() && *p > 0.0)) {
            return Err(("output.peak_tflops".into(), format!("{p} is not a positive number of TFLOP/s")));
        }
        Ok(())
    }
}

/// Where part of the merged recipe came from, to point type errors at a file and line.
struct Source {
    file: PathBuf,
    text: Option<String>,
}

/// The cluster's `job:` section as a recipe overlay.
fn job_overlay(job: &JobSpec) -> Value {
    let mut ckpt = serde_json::Map::new();
    let mut data = serde_json::Map::new();
    let mut train = serde_json::Map::new();
    let mut output = serde_json::Map::new();
    let path = |p: &PathBuf| Value::String(p.display().to_string());
    if let Some(p) = &job.load {
        ckpt.insert("load".into(), path(p));
    }
    if let Some(p) = &job.save {
        ckpt.insert("save".into(), path(p));
    }
    if let Some(p) = &job.tokenizer {
        ckpt.insert("tokenizer".into(), path(p));
    }
    if let Some(p) = &job.data_path {
        data.insert("data_path".into(), path(p));
    }
    if let Some(p) = &job.data_folder {
        data.insert("data_folder".into(), path(p));
    }
    for (k, v) in [
        ("no_load_optim", job.no_load_optim),
        ("no_save_optim", job.no_save_optim),
        ("no_load_rng", job.no_load_rng),
        ("no_save_rng", job.no_save_rng),
    ] {
        if let Some(b) = v {
            ckpt.insert(k.into(), Value::Bool(b));
        }
    }
    if let Some(n) = job.train_iters {
        train.insert("train_iters".into(), n.into());
    }
    if let Some(n) = job.seed {
        train.insert("seed".into(), n.into());
    }
    if let Some(n) = job.save_interval {
        output.insert("save_interval".into(), n.into());
    }
    if let Some(n) = job.log_interval {
        output.insert("log_interval".into(), n.into());
    }
    let mut root = serde_json::Map::new();
    for (k, m) in [("checkpoint", ckpt), ("data", data), ("train", train), ("output", output)] {
        if !m.is_empty() {
            root.insert(k.into(), Value::Object(m));
        }
    }
    Value::Object(root)
}

/// An overlay key that the recipe does not have.
#[derive(Debug)]
struct UnknownKey {
    path: Vec<String>,
    key: String,
    suggestion: Option<String>,
    allowed: Vec<String>,
    not_a_map: bool,
}

impl UnknownKey {
    fn path_segments(&self) -> Vec<String> {
        self.path.clone()
    }

    fn into_error(self, file: &Path, pos: Option<(usize, usize)>) -> ConfigError {
        let parent = self.path[..self.path.len() - 1].join(".");
        let (message, hint) = if self.not_a_map {
            (
                format!("`{parent}` is a value, not a map: `{}` cannot go under it", self.key),
                format!("set `{parent}` itself, e.g. {parent}: …"),
            )
        } else {
            let dym = self.suggestion.map(|s| format!(", did you mean `{s}`?")).unwrap_or_default();
            (format!("unknown key `{}`{dym}", self.key), format!("allowed keys here: {}", self.allowed.join(", ")))
        };
        let key = if parent.is_empty() { String::new() } else { parent };
        ConfigError::new(file, message).with_key(key).with_hint(hint).at_opt(pos)
    }
}

/// Deep-merges `overlay` into `base`; every overlay key must already exist in `base`.
fn merge(base: &mut Value, overlay: &Value, path: &mut Vec<String>) -> Result<(), UnknownKey> {
    let Value::Object(over) = overlay else {
        *base = overlay.clone();
        return Ok(());
    };
    if over.is_empty() && path.is_empty() {
        return Ok(());
    }
    let Value::Object(target) = base else {
        let key = over.keys().next().cloned().unwrap_or_default();
        let mut p = path.clone();
        p.push(key.clone());
        return Err(UnknownKey { path: p, key, suggestion: None, allowed: vec![], not_a_map: true });
    };
    for (k, v) in over {
        path.push(k.clone());
        match target.get_mut(k) {
            // A map value replaces a null (e.g. an unset Option) wholesale.
            Some(slot) if slot.is_null() => *slot = v.clone(),
            Some(slot) => merge(slot, v, path)?,
            None => {
                let allowed: Vec<String> = target.keys().cloned().collect();
                let suggestion = did_you_mean(k, &allowed).map(str::to_string);
                return Err(UnknownKey { path: path.clone(), key: k.clone(), suggestion, allowed, not_a_map: false });
            }
        }
        path.pop();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_has_defaults_that_pass_their_own_checks() {
        for m in RECIPE_MODELS {
            let r = Recipe::defaults(m).unwrap();
            r.check_values().unwrap();
            mm_spec::presets::preset(&r.model).unwrap();
        }
    }

    #[test]
    fn seed_8b_defaults() {
        let r = Recipe::defaults("InternVL3-8B").unwrap();
        assert_eq!((r.parallel.tp, r.parallel.pp), (1, 4));
        assert_eq!(r.parallel.llm_pp_layers, Some(vec![6, 8, 8, 6]));
        assert_eq!(r.parallel.vit_pp_layers, Some(vec![24, 0, 0, 0]));
        assert_eq!(r.train.grad_accumulation, Some(64));
        assert_eq!((r.train.lr, r.train.min_lr, r.train.weight_decay, r.train.clip_grad), (2e-5, 0.0, 0.05, 1.0));
        assert_eq!((r.train.train_iters, r.output.save_interval), (5000, 5000));
        assert!(r.train.freeze_vision && r.parallel.distributed_optimizer);
        assert_eq!(r.train.precision, Precision::Bf16);
    }

    #[test]
    fn set_overrides_nested_keys_by_their_type() {
        let sets =
            vec!["train.lr=3e-4".to_string(), "parallel.llm_pp_layers=[7,7,7,7]".into(), "data.data_path=x y".into()];
        let r = Recipe::resolve("8b", None, None, &sets).unwrap();
        assert_eq!(r.train.lr, 3e-4);
        assert_eq!(r.parallel.llm_pp_layers, Some(vec![7, 7, 7, 7]));
        assert_eq!(r.data.data_path, Some(PathBuf::from("x y")));
        // The spelling mm-convert, mm-engine and the layout error use: `6,8,8,6`.
        let r = Recipe::resolve("8b", None, None, &["parallel.llm_pp_layers=10, 6,8,8".into()]).unwrap();
        assert_eq!(r.parallel.llm_pp_layers, Some(vec![10, 6, 8, 8]));
        let r = Recipe::resolve("8b", None, None, &["parallel.llm_pp_layers=28".into()]).unwrap();
        assert_eq!(r.parallel.llm_pp_layers, Some(vec![28]), "one stage: a one-item list");
        let err = Recipe::resolve("8b", None, None, &["parallel.llm_pp_layers=6,x".into()]).unwrap_err().to_string();
        assert!(err.contains("--set parallel.llm_pp_layers"), "{err}");
    }

    #[test]
    fn set_unknown_key_suggests() {
        let err = Recipe::resolve("8b", None, None, &["train.lrr=1".into()]).unwrap_err().to_string();
        assert_eq!(
            err.lines().next().unwrap(),
            "<command line>: --set train.lrr: unknown key `lrr`, did you mean `lr`?"
        );
    }

    fn set(model: &str, sets: &[&str]) -> Result<Recipe, String> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        // A cluster file with a job section, so that files are among the sources too.
        let job = JobSpec { train_iters: Some(7), data_path: Some("job/data.jsonl".into()), ..JobSpec::default() };
        Recipe::resolve(model, Some((&job, Path::new("c.yaml"))), None, &sets).map_err(|e| e.to_string())
    }

    #[test]
    fn set_wrong_type_names_the_key() {
        let err = set("8b", &["parallel.tp=eight"]).unwrap_err();
        assert!(err.starts_with("<command line>: --set parallel.tp: invalid type: string \"eight\""), "{err}");
        let err = set("8b", &["train.freeze_llm=maybe"]).unwrap_err();
        assert!(err.starts_with("<command line>: --set train.freeze_llm: invalid type: string"), "{err}");
        let err = set("8b", &["train={lr: fast}"]).unwrap_err();
        assert!(err.starts_with("<command line>: --set train: train.lr: invalid type: string \"fast\""), "{err}");
        // Range checks too.
        let err = set("8b", &["train.lr=-1"]).unwrap_err();
        assert_eq!(err, "<command line>: --set train.lr: learning rate -1 must be a positive number");
        // Rust's type names and list paths in the author's words.
        let err = set("8b", &["parallel.tp=eight"]).unwrap_err();
        assert!(err.ends_with("expected a whole number, 0 or more"), "{err}");
        let err = set("8b", &["parallel.llm_pp_layers=7,7,7,x"]).unwrap_err();
        assert!(err.starts_with("<command line>: --set parallel.llm_pp_layers: parallel.llm_pp_layers[3]: "), "{err}");
    }

    #[test]
    fn set_text_keys_take_the_value_verbatim() {
        for value in ["a\nb", "&a b", "!!binary X", "x: y # z", "[1, 2]", " spaced ", "2024", "1e5", "true", "~"] {
            let r = set("tiny", &[&format!("data.data_path={value}"), &format!("data.template={value}")]).unwrap();
            assert_eq!(r.data.data_path, Some(PathBuf::from(value)), "{value:?}");
            assert_eq!(r.data.template, value, "{value:?}");
        }
        // Choices are text too.
        assert_eq!(set("tiny", &["train.precision=bf16"]).unwrap().train.precision, Precision::Bf16);
        let err = set("tiny", &["train.precision=bf16\n"]).unwrap_err();
        assert!(err.starts_with("<command line>: --set train.precision: unknown variant"), "{err}");
    }

    #[test]
    fn set_typed_keys_parse_their_value() {
        let r = set(
            "8b",
            &["parallel.llm_pp_layers=[7, 7, 7, 7]", "train.lr=3e-4", "train.freeze_llm=true", "parallel.tp=2"],
        )
        .unwrap();
        assert_eq!(r.parallel.llm_pp_layers, Some(vec![7, 7, 7, 7]));
        assert_eq!((r.train.lr, r.train.freeze_llm, r.parallel.tp), (3e-4, true, 2));
        // The job section's value, then --set's.
        assert_eq!(set("8b", &[]).unwrap().train.train_iters, 7);
        assert_eq!(set("8b", &["train.train_iters=9"]).unwrap().train.train_iters, 9);
    }

    #[test]
    fn set_null_clears_optional_keys_only() {
        let r = set("tiny", &["checkpoint.load=null", "parallel.vpp=null", "train.grad_accumulation=4"]).unwrap();
        assert_eq!((r.checkpoint.load, r.parallel.vpp), (None, None));
        let r = set("tiny", &["train.global_batch_size=null", "train.grad_accumulation=4"]).unwrap();
        assert_eq!(r.train.global_batch_size, None);

        let err = set("tiny", &["data.data_path=null"]).unwrap_err();
        assert_eq!(
            err,
            "<command line>: --set data.data_path: `null` would clear `data.data_path`, which every run needs\n  \
             hint: give it a value, e.g. --set data.data_path=data/train.jsonl"
        );
        let err = set("tiny", &["train.lr=null"]).unwrap_err();
        assert!(
            err.starts_with("<command line>: --set train.lr: `train.lr` cannot be null: it always holds a number"),
            "{err}"
        );
        let err = set("tiny", &["train=null"]).unwrap_err();
        assert!(err.starts_with("<command line>: --set train: `train` cannot be null"), "{err}");
        // An empty value clears like `null` (it always did): never an empty path.
        let r = set("tiny", &["checkpoint.load="]).unwrap();
        assert_eq!(r.checkpoint.load, None);
        let err = set("tiny", &["data.data_path="]).unwrap_err();
        assert!(err.contains("which every run needs"), "{err}");
    }

    #[test]
    fn restart_caveats_follow_what_the_checkpoints_keep() {
        let tiny = Recipe::resolve("tiny", None, None, &[]).unwrap().checkpoint;
        assert_eq!(tiny.restart_caveat(true), None);
        assert!(tiny.restart_caveat(false).unwrap().contains("MindSpeed"));
        let seed = Recipe::resolve("8b", None, None, &[]).unwrap().checkpoint;
        let c = seed.restart_caveat(true).unwrap();
        assert!(c.contains("optimizer state") && c.contains("RNG state"), "{c}");
        let no_save = CheckpointRecipe { save: None, ..tiny.clone() };
        assert!(no_save.restart_caveat(true).unwrap().contains("starts the training over"));
        let off = CheckpointRecipe { auto_resume: false, ..tiny };
        assert!(off.restart_caveat(true).unwrap().contains("auto_resume is false"));
    }
}
