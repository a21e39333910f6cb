//! InternVL3 (`InternVLChatModel`): InternViT → pixel shuffle → `mlp1` → Qwen2, with the image
//! embeddings written over the `<IMG_CONTEXT>` token embeddings in order.
//!
//! The model knows nothing of parallelism, precision policy or freezing: it builds its
//! parameters in a VarStore under the original OpenGVLab keys (`vision_model.*`, `mlp1.*`,
//! `language_model.*`) and computes logits. Freezing is `requires_grad` on the variables; a
//! frozen ViT fed with pixels that need no grad builds no autograd graph by itself.

use mm_spec::ModelPreset;
use tch::nn::Path;
use tch::{Kind, Tensor};

use super::projector::{pixel_shuffle, Projector};
use super::qwen2::{LlmPart, Qwen2};
use super::tp::Tp;
use super::vit::VisionModel;
use mm_spec::layout::LayoutError;

/// One forward's inputs, already on the model's device.
#[derive(Debug)]
pub struct ModelInput {
    /// [B, T] token ids.
    pub input_ids: Tensor,
    /// [B, T] true where the token is real (not padding).
    pub attention_mask: Tensor,
    /// [N, 3, S, S] tiles of every image/frame of the batch in token order; None when the
    /// batch has no `<IMG_CONTEXT>` token.
    pub pixel_values: Option<Tensor>,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(
        "the batch has {tokens} <IMG_CONTEXT> tokens but {tiles} tiles give {features} image \
         features ({per_tile} per tile): every tile must have exactly {per_tile} context tokens"
    )]
    ImageTokenMismatch { tokens: i64, tiles: i64, features: i64, per_tile: i64 },
    #[error("tensor operation failed: {0}")]
    Torch(#[from] tch::TchError),
    /// A tensor-parallel collective failed (it names the rank and the operation).
    #[error(transparent)]
    Dist(#[from] crate::dist::c10d::DistError),
}

/// The part of the model one pipeline chunk holds (the whole model without pipelining).
/// mm-engine runs the ViT and the projector with the token embedding on the first chunk, as
/// the seed's recipes place them (`vit_pp_layers` N,0,…,0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagePart {
    /// ViT, projector and token embedding: the chunk that reads the micro batch.
    pub first: bool,
    pub llm_layers: std::ops::Range<usize>,
    /// Final norm and output layer: the chunk that computes the loss.
    pub last: bool,
}

impl StagePart {
    pub fn whole(cfg: &ModelPreset) -> StagePart {
        StagePart { first: true, llm_layers: 0..cfg.llm.num_hidden_layers, last: true }
    }
}

#[derive(Debug)]
pub struct InternVL {
    pub cfg: ModelPreset,
    pub part: StagePart,
    /// Present on the first chunk.
    pub vision_model: Option<VisionModel>,
    pub mlp1: Option<Projector>,
    pub language_model: Qwen2,
    pub img_context_id: i64,
    shuffle: i64,
}

impl InternVL {
    /// Builds every parameter under `root` (normally `vs.root()`); `tie_lm_head` shares the
    /// output projection with `embed_tokens` (for checkpoints without `lm_head`).
    pub fn new(root: &Path, cfg: &ModelPreset, img_context_id: i64, tie_lm_head: bool) -> InternVL {
        InternVL::part(root, cfg, img_context_id, tie_lm_head, StagePart::whole(cfg), &Tp::single())
            .expect("one rank splits nothing")
    }

    /// Builds one pipeline chunk's parameters (original names, global layer numbers), with
    /// this tensor-parallel rank's slices (see `model::tp`).
    pub fn part(
        root: &Path,
        cfg: &ModelPreset,
        img_context_id: i64,
        tie_lm_head: bool,
        part: StagePart,
        tp: &Tp,
    ) -> Result<InternVL, LayoutError> {
        let shuffle = (1.0 / cfg.downsample_ratio).round() as i64;
        let llm = LlmPart { embed: part.first, layers: part.llm_layers.clone(), head: part.last };
        let (vision_model, mlp1) = if part.first {
            let (proj_in, hidden) = (cfg.projector_in() as i64, cfg.llm.hidden_size as i64);
            // Sequence parallelism is the LLM's: the ViT and projector keep whole sequences.
            let whole = tp.without_sp();
            (
                Some(VisionModel::new(root.sub("vision_model"), &cfg.vision, &whole)?),
                Some(Projector::new(root.sub("mlp1"), proj_in, hidden, &whole)?),
            )
        } else {
            (None, None)
        };
        Ok(InternVL {
            cfg: cfg.clone(),
            vision_model,
            mlp1,
            language_model: Qwen2::part(root.sub("language_model"), &cfg.llm, tie_lm_head, &llm, tp)?,
            part,
            img_context_id,
            shuffle,
        })
    }

    /// Recomputes activations as `r` says, in the ViT and the LLM (None: keeps them all).
    pub fn set_recompute(&mut self, r: Option<super::recompute::Recompute>) {
        self.language_model.set_recompute(r);
        if let Some(v) = &mut self.vision_model {
            v.set_recompute(r);
        }
    }

    /// Splits the LLM's sequence over `cp`'s group (the ViT and the projector keep whole
    /// sequences: see `model::cp`).
    pub fn set_context_parallel(&mut self, cp: super::cp::Cp) {
        self.language_model.set_context_parallel(cp);
    }

    /// Image tokens per tile (256 at 448 px, 16 for the tiny preset).
    pub fn tokens_per_tile(&self) -> i64 {
        self.cfg.num_image_token() as i64
    }

    /// Tiles [N, 3, S, S] → image embeddings [N, tokens_per_tile, H].
    pub fn embed_images(&self, pixel_values: &Tensor, train: bool) -> Result<Tensor, ForwardError> {
        let (vit, mlp1) = match (&self.vision_model, &self.mlp1) {
            (Some(v), Some(m)) => (v, m),
            _ => panic!("the vision model is on the first pipeline chunk"),
        };
        let h = vit.forward(pixel_values, train)?;
        let (n, t, c) = h.size3().expect("vit output is [N, 1 + G², C]");
        let g = ((t - 1) as f64).sqrt().round() as i64;
        let grid = h.narrow(1, 1, t - 1).reshape([n, g, g, c]);
        mlp1.forward(&pixel_shuffle(&grid, self.shuffle))
    }

    /// Input embeddings with the image features scattered over the `<IMG_CONTEXT>` positions.
    pub fn input_embeddings(&self, input: &ModelInput, train: bool) -> Result<Tensor, ForwardError> {
        let embeds = self.language_model.embed(&input.input_ids)?;
        let selected = input.input_ids.eq(self.img_context_id);
        let tokens = selected.sum(Kind::Int64).int64_value(&[]);
        let per_tile = self.tokens_per_tile();
        let tiles = input.pixel_values.as_ref().map(|p| p.size()[0]).unwrap_or(0);
        if tokens != tiles * per_tile {
            return Err(ForwardError::ImageTokenMismatch { tokens, tiles, features: tiles * per_tile, per_tile });
        }
        let Some(pixels) = input.pixel_values.as_ref().filter(|_| tiles > 0) else {
            return Ok(embeds);
        };
        let features = self.embed_images(pixels, train)?.to_kind(embeds.kind());
        let mask = selected.unsqueeze(-1).expand_as(&embeds);
        Ok(embeds.f_masked_scatter(&mask, &features)?)
    }

    /// Final hidden states [B, T, H].
    pub fn hidden_states(&self, input: &ModelInput, train: bool) -> Result<Tensor, ForwardError> {
        let embeds = self.input_embeddings(input, train)?;
        self.language_model.forward_embeds(&embeds, &input.attention_mask)
    }

    /// Logits [B, T, V].
    pub fn forward(&self, input: &ModelInput, train: bool) -> Result<Tensor, ForwardError> {
        let t = input.input_ids.size()[1];
        self.language_model.logits(&self.hidden_states(input, train)?, t)
    }

    /// One pipeline chunk's forward: the first chunk embeds `input` (`received` is None), the
    /// others continue from the previous chunk's activation [B, T, H]; the last returns logits
    /// [B, T, V], the others their activation. The whole model's chunk is [`InternVL::forward`].
    pub fn forward_part(
        &self,
        input: &ModelInput,
        received: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor, ForwardError> {
        let h = match received {
            Some(h) => h.shallow_clone(),
            None => self.language_model.to_layers(&self.input_embeddings(input, train)?)?,
        };
        let h = self.language_model.forward_layers(&h, &input.attention_mask)?;
        if self.part.last {
            let t = input.input_ids.size()[1];
            self.language_model.logits(&self.language_model.final_norm(&h)?, t)
        } else {
            Ok(h)
        }
    }
}
