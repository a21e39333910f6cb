//! What `train` and `eval` share: pick the device, resolve `--load`, read the architecture,
//! open the tokenizer, build the model and load its weights; and turn a data batch into
//! model tensors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use mm_spec::ModelPreset;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::data::Batch;
use crate::model::tp::Tp;
use crate::model::{InternVL, ModelInput, StagePart};
use crate::tokenizer::ChatTokenizer;
use crate::weights::checkpoint::{self, Source};
use crate::weights::slices::TpSlices;

pub fn pick_device(spec: &str) -> anyhow::Result<Device> {
    Ok(match spec {
        "cpu" => Device::Cpu,
        "auto" => {
            if tch::Cuda::is_available() {
                Device::Cuda(local_rank())
            } else {
                Device::Cpu
            }
        }
        "cuda" => {
            anyhow::ensure!(tch::Cuda::is_available(), "--device cuda: no CUDA device is visible");
            Device::Cuda(local_rank())
        }
        other => {
            let n: usize = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("--device {other:?}: expected auto, cpu, cuda or cuda:N"))?;
            anyhow::ensure!(tch::Cuda::is_available(), "--device {other}: no CUDA device is visible");
            Device::Cuda(n)
        }
    })
}

/// Intra-op threads for CPU training: the cores are shared by the `ranks_here` ranks on this
/// machine (LOCAL_WORLD_SIZE), and one core of each share is left to its data thread, because
/// libtorch's OpenMP workers spin and a data thread competing with them slows both down
/// several-fold on small machines. `MM_CPU_THREADS` overrides.
pub fn configure_cpu_threads(device: Device, ranks_here: usize) {
    if device != Device::Cpu {
        return;
    }
    let n = std::env::var("MM_CPU_THREADS").ok().and_then(|v| v.parse::<i32>().ok()).unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as i32;
        (cores / ranks_here.max(1) as i32 - 1).max(1)
    });
    tch::set_num_threads(n.max(1));
}

fn local_rank() -> usize {
    std::env::var("LOCAL_RANK").ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}

pub struct Session {
    pub vs: VarStore,
    /// The whole model, or this pipeline rank's first chunk.
    pub model: InternVL,
    /// This pipeline rank's further chunks (virtual pipeline stages 1.., in order).
    pub more_chunks: Vec<InternVL>,
    pub preset: ModelPreset,
    pub tokenizer: Arc<ChatTokenizer>,
    pub source: Option<Source>,
    pub device: Device,
    /// Folders whose config/tokenizer files a save carries along.
    pub assets: Vec<PathBuf>,
    /// This rank's tensor-parallel slices (None: whole tensors).
    pub slices: Option<TpSlices>,
}

/// What this rank builds of a model: its pipeline chunks, and with tensor parallelism its
/// slices of every split tensor.
pub struct RankModel {
    pub parts: Vec<StagePart>,
    pub slices: Option<TpSlices>,
}

/// This rank's share of an architecture.
pub type PartsOf<'a> = dyn Fn(&ModelPreset) -> anyhow::Result<RankModel> + 'a;

pub struct SessionOptions<'a> {
    pub model: &'a str,
    pub load: Option<&'a Path>,
    pub tokenizer: Option<&'a Path>,
    pub device: Device,
    /// Seed of the random init (used when nothing is loaded).
    pub seed: u64,
    pub bf16: bool,
    /// The ViT's stochastic depth for this run instead of the checkpoint's `drop_path_rate`.
    pub vit_drop_path_rate: Option<f64>,
    /// The pipeline chunks this rank builds, in order, for the checkpoint's architecture
    /// (None: the whole model). Each loads only its own tensors.
    pub parts: Option<&'a PartsOf<'a>>,
    /// This rank's tensor-parallel group (None: whole layers).
    pub tp: Option<Tp>,
}

impl Session {
    pub fn open(o: SessionOptions) -> anyhow::Result<Session> {
        let source = match o.load {
            Some(p) => Some(checkpoint::resolve(p, o.tokenizer).with_context(|| format!("--load {}", p.display()))?),
            None => None,
        };
        let preset = match &source {
            Some(s) => {
                let p = s.preset(o.model)?;
                if let Ok(named) = mm_spec::preset(o.model) {
                    if named.vision != p.vision || named.llm != p.llm {
                        eprintln!(
                            "note: --model {} differs from the checkpoint's config; using the checkpoint's architecture",
                            o.model
                        );
                    }
                }
                p
            }
            None => mm_spec::preset(o.model).with_context(|| format!("--model {}", o.model))?,
        };
        let mut preset = preset;
        if let Some(r) = o.vit_drop_path_rate {
            preset.vision.drop_path_rate = r;
        }
        preset.validate().with_context(|| format!("model {}", preset.name))?;
        if preset.ps_version != "v2" {
            anyhow::bail!(
                "model {}: ps_version {:?}: mm-engine implements InternVL3's pixel shuffle (ps_version \"v2\"); the \
                 checkpoint's config.json says otherwise (or leaves it out, which OpenGVLab's code reads as \"v1\")",
                preset.name,
                preset.ps_version
            );
        }
        let tok_path = match (o.tokenizer, &source) {
            (Some(t), _) => t.to_path_buf(),
            (None, Some(s)) => s.assets_dir(),
            (None, None) => bail!(
                "no tokenizer: pass {} (a folder with tokenizer.json) or {}",
                crate::cli::spelled("--tokenizer DIR", "--set checkpoint.tokenizer=DIR"),
                crate::cli::spelled(
                    "--load a checkpoint that has one",
                    "set checkpoint.load to a checkpoint that has one"
                )
            ),
        };
        let tokenizer = Arc::new(ChatTokenizer::open(&tok_path)?);
        let vocab = tokenizer.vocab_size();
        if vocab > preset.llm.vocab_size {
            bail!(
                "{}: the tokenizer has {vocab} tokens but the model's vocab_size is {}: token ids would fall outside the embedding",
                tokenizer.path.display(),
                preset.llm.vocab_size
            );
        }
        let tie =
            source.as_ref().is_some_and(|s| !s.has_lm_head()) || (source.is_none() && preset.llm.tie_word_embeddings);
        if tie && !preset.llm.tie_word_embeddings {
            eprintln!("note: the checkpoint has no lm_head: the output projection is tied to embed_tokens");
        }
        // Saves must describe the model as built (a tied model has no lm_head to save).
        preset.llm.tie_word_embeddings = tie;
        tch::manual_seed(o.seed as i64);
        let mut vs = VarStore::new(o.device);
        let RankModel { parts, slices } = match o.parts {
            Some(f) => f(&preset)?,
            None => RankModel { parts: vec![StagePart::whole(&preset)], slices: None },
        };
        let staged = parts.len() > 1 || parts[0] != StagePart::whole(&preset);
        // A tied output layer would be two unsynchronised copies on the first and last stage.
        if tie && staged && !parts.iter().any(|p| p.first && p.last) {
            bail!(
                "model {}: the output layer is tied to the token embedding (the checkpoint has no lm_head, or \
                 tie_word_embeddings is set), which mm-engine cannot split over pipeline stages: give the model its \
                 own lm_head (every InternVL3 size has one) or train with {}",
                preset.name,
                crate::cli::spelled("--pipeline-model-parallel-size 1", "--set parallel.pp=1")
            );
        }
        let tp = o.tp.clone().unwrap_or_else(Tp::single);
        let mut chunks: Vec<InternVL> = parts
            .into_iter()
            .map(|part| InternVL::part(&vs.root(), &preset, tokenizer.special.img_context, tie, part, &tp))
            .collect::<Result<_, _>>()
            .with_context(|| format!("model {} split over {} tensor-parallel ranks", preset.name, tp.size))?;
        let model = chunks.remove(0);
        if let Some(s) = &source {
            s.load_weights(&vs, staged, slices.as_ref()).with_context(|| format!("loading {}", s.describe()))?;
        }
        if o.bf16 {
            vs.bfloat16();
        }
        let mut assets = Vec::new();
        if let Some(s) = &source {
            assets.push(s.assets_dir());
        }
        let tok_dir = if tok_path.is_dir() {
            tok_path.clone()
        } else {
            tok_path.parent().map(Path::to_path_buf).unwrap_or_default()
        };
        assets.push(tok_dir);
        Ok(Session { vs, model, more_chunks: chunks, preset, tokenizer, source, device: o.device, assets, slices })
    }

    /// This rank's model chunks in order (one without a virtual pipeline).
    pub fn chunks(&self) -> Vec<&InternVL> {
        std::iter::once(&self.model).chain(&self.more_chunks).collect()
    }

    /// Engine parameter name → tensor, sorted by name.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// A batch's tensors on `device`: the model input and the labels.
pub fn to_device(batch: &Batch, image_size: usize, device: Device) -> (ModelInput, Tensor) {
    let shape = [batch.rows as i64, batch.len as i64];
    let ids = Tensor::from_slice(&batch.input_ids).reshape(shape).to_device(device);
    let labels = Tensor::from_slice(&batch.labels).reshape(shape).to_device(device);
    let mask = Tensor::from_slice(&batch.attention_mask).reshape(shape).to_device(device);
    let s = image_size as i64;
    let pixels = (batch.tiles > 0).then(|| {
        Tensor::from_slice(&batch.pixels).reshape([batch.tiles as i64, 3, s, s]).to_kind(Kind::Float).to_device(device)
    });
    (ModelInput { input_ids: ids, attention_mask: mask, pixel_values: pixels }, labels)
}
