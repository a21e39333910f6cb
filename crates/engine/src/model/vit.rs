//! InternViT (OpenGVLab `modeling_intern_vit.py`), both flavours:
//!
//! - InternViT-300M (1B–14B): LayerNorm eps 1e-6, fused `attn.qkv` with bias.
//! - InternViT-6B (38B, 78B): RMSNorm in fp32, no qkv bias, and qk normalization: RMSNorm over
//!   the full width C on q and on k *before* the heads are split.
//!
//! Block: `h += drop_path(attn(norm1(h)) * ls1)`; `h += drop_path(mlp(norm2(h)) * ls2)`, with
//! drop-path rate `linspace(0, rate, L)[i]` (training only). Attention is non-causal, through
//! `scaled_dot_product_attention`. No norm after the last block. A class token is prepended
//! and the position embedding's grid part is bicubic-interpolated only when the patch grid of
//! the input differs from the configured one.
//!
//! Parameter paths are the original checkpoint keys under `vision_model.`.

use mm_spec::{NormType, VisionConfig};
use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

use mm_spec::layout::LayoutError;

use super::layers::{normal_init, LayerNorm, Linear, Norm, RmsNorm};
use super::recompute::{checkpoint1, run_layers, Recompute};
use super::tp::{RowLinear, Tp};
use super::ForwardError;

#[derive(Debug)]
pub struct VisionEmbeddings {
    pub class_embedding: Tensor,
    pub patch_weight: Tensor,
    pub patch_bias: Tensor,
    pub position_embedding: Tensor,
    patch_size: i64,
    grid: i64,
}

impl VisionEmbeddings {
    fn new(p: Path, cfg: &VisionConfig) -> VisionEmbeddings {
        let c = cfg.hidden_size as i64;
        let ps = cfg.patch_size as i64;
        let grid = cfg.grid() as i64;
        let conv = p.sub("patch_embedding");
        VisionEmbeddings {
            class_embedding: p.var("class_embedding", &[1, 1, c], normal_init()),
            patch_weight: conv.var("weight", &[c, cfg.num_channels as i64, ps, ps], normal_init()),
            patch_bias: conv.var("bias", &[c], Init::Const(0.0)),
            position_embedding: p.var("position_embedding", &[1, grid * grid + 1, c], normal_init()),
            patch_size: ps,
            grid,
        }
    }

    /// The position embedding for an `h × w` patch grid (class position first).
    fn position_for(&self, h: i64, w: i64) -> Tensor {
        if h == self.grid && w == self.grid {
            return self.position_embedding.shallow_clone();
        }
        let c = self.position_embedding.size()[2];
        let dtype = self.position_embedding.kind();
        let cls = self.position_embedding.narrow(1, 0, 1);
        let grid = self
            .position_embedding
            .narrow(1, 1, self.grid * self.grid)
            .to_kind(Kind::Float)
            .reshape([1, self.grid, self.grid, c])
            .permute([0, 3, 1, 2]);
        let resized = grid.upsample_bicubic2d([h, w], false, None, None);
        let resized = resized.reshape([1, c, h * w]).permute([0, 2, 1]).to_kind(dtype);
        Tensor::cat(&[cls, resized], 1)
    }

    /// [N, 3, S, S] pixels → [N, 1 + (S/p)², C] tokens.
    pub fn forward(&self, pixel_values: &Tensor) -> Tensor {
        let dtype = self.patch_weight.kind();
        let patches = pixel_values.to_kind(dtype).conv2d(
            &self.patch_weight,
            Some(&self.patch_bias),
            [self.patch_size, self.patch_size],
            [0, 0],
            [1, 1],
            1,
        );
        let (n, c, h, w) = patches.size4().expect("conv2d output is 4-D");
        let patches = patches.flatten(2, 3).transpose(1, 2);
        let cls = self.class_embedding.expand([n, 1, c], false).to_kind(dtype);
        let tokens = Tensor::cat(&[cls, patches], 1);
        tokens + self.position_for(h, w).to_kind(dtype)
    }
}

/// Attention with this tensor-parallel rank's heads: the fused qkv holds its rows of q, of k
/// and of v (`[q_r; k_r; v_r]`), proj its columns.
#[derive(Debug)]
pub struct VisionAttention {
    pub qkv: Linear,
    pub proj: RowLinear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    /// This rank's heads and where its channels start in the full width.
    heads: i64,
    first_channel: i64,
    width: i64,
    tp: Tp,
    /// Selective recomputation: the attention core is rerun in backward.
    pub recompute_core: bool,
}

impl VisionAttention {
    fn new(p: Path, cfg: &VisionConfig, tp: &Tp) -> Result<VisionAttention, LayoutError> {
        let c = cfg.hidden_size as i64;
        let d = (cfg.hidden_size / cfg.num_attention_heads) as i64;
        let shard = tp.heads(cfg.num_attention_heads, cfg.num_attention_heads)?;
        let heads = shard.q_heads.len() as i64;
        let local = heads * d;
        let (q_norm, k_norm) = if cfg.qk_normalization {
            (
                Some(RmsNorm::new(p.sub("q_norm"), c, cfg.layer_norm_eps)),
                Some(RmsNorm::new(p.sub("k_norm"), c, cfg.layer_norm_eps)),
            )
        } else {
            (None, None)
        };
        Ok(VisionAttention {
            qkv: Linear::new(p.sub("qkv"), c, 3 * local, cfg.qkv_bias),
            proj: RowLinear::new(p.sub("proj"), local, c, true, tp),
            q_norm,
            k_norm,
            heads,
            first_channel: shard.q_heads.start as i64 * d,
            width: c,
            tp: tp.clone(),
            recompute_core: false,
        })
    }

    /// InternViT-6B's RMSNorm over the full width C of q or k, on this rank's channels: the
    /// squares are summed over the ranks, the (replicated) weight is used at this rank's
    /// channels and its gradient summed over the ranks.
    fn full_width_norm(&self, norm: &RmsNorm, x: &Tensor) -> Result<Tensor, ForwardError> {
        if self.tp.size == 1 {
            return Ok(norm.forward(x));
        }
        let dtype = x.kind();
        let h = x.to_kind(Kind::Float);
        let sq = self.tp.sum_both_ways(&h.pow_tensor_scalar(2).sum_dim_intlist([-1].as_slice(), true, Kind::Float))?;
        let h = h * (sq / self.width as f64 + norm.eps).rsqrt();
        let w = self.tp.copy_to(&norm.weight)?.narrow(0, self.first_channel, x.size()[2]);
        Ok(w * h.to_kind(dtype))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, ForwardError> {
        let (b, n, _) = x.size3().expect("vit hidden states are [B, N, C]");
        let x = &self.tp.copy_to(x)?;
        // The fused projection's rows are [q; k; v], each this rank's heads wide.
        let qkv = self.qkv.forward(x);
        let local = qkv.size()[2] / 3;
        let d = local / self.heads;
        let mut parts = qkv.split(local, -1);
        let (mut q, mut k, v) = (parts.remove(0), parts.remove(0), parts.remove(0));
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = self.full_width_norm(qn, &q)?;
            k = self.full_width_norm(kn, &k)?;
        }
        let heads = |t: Tensor| t.reshape([b, n, self.heads, d]).transpose(1, 2);
        let core = |q: &Tensor, k: &Tensor, v: &Tensor| {
            Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, false, None, false)
        };
        let (q, k, v) = (heads(q), heads(k), heads(v));
        let out = if self.recompute_core {
            checkpoint1(&[&q, &k, &v], false, Box::new(move |t| Ok(vec![core(&t[0], &t[1], &t[2])])))?
        } else {
            core(&q, &k, &v)
        };
        Ok(self.proj.forward(&out.transpose(1, 2).reshape([b, n, local]))?)
    }
}

/// fc1 column-parallel, fc2 row-parallel.
#[derive(Debug)]
pub struct VisionMlp {
    pub fc1: Linear,
    pub fc2: RowLinear,
    tp: Tp,
}

#[derive(Debug)]
pub struct VisionLayer {
    pub attn: VisionAttention,
    pub mlp: VisionMlp,
    pub norm1: Norm,
    pub norm2: Norm,
    pub ls1: Tensor,
    pub ls2: Tensor,
    pub drop_path: f64,
}

fn make_norm(p: Path, cfg: &VisionConfig) -> Norm {
    let c = cfg.hidden_size as i64;
    match cfg.norm_type {
        NormType::LayerNorm => Norm::Layer(LayerNorm::new(p, c, cfg.layer_norm_eps)),
        NormType::RmsNorm => Norm::Rms(RmsNorm::new(p, c, cfg.layer_norm_eps)),
    }
}

/// timm's `drop_path`: zero a sample's residual branch with probability `rate`, scale the
/// kept ones by 1/(1-rate). Identity outside training.
fn drop_path(x: Tensor, rate: f64, train: bool) -> Tensor {
    if !train || rate <= 0.0 {
        return x;
    }
    let keep = 1.0 - rate;
    let n = x.size()[0];
    let mask = Tensor::empty([n, 1, 1], (x.kind(), x.device())).bernoulli_float_(keep) / keep;
    x * mask
}

impl VisionLayer {
    fn new(p: Path, cfg: &VisionConfig, drop_path: f64, tp: &Tp) -> Result<VisionLayer, LayoutError> {
        let c = cfg.hidden_size as i64;
        let i = tp.units(cfg.intermediate_size)?.len() as i64;
        let mlp = p.sub("mlp");
        Ok(VisionLayer {
            attn: VisionAttention::new(p.sub("attn"), cfg, tp)?,
            mlp: VisionMlp {
                fc1: Linear::new(mlp.sub("fc1"), c, i, true),
                fc2: RowLinear::new(mlp.sub("fc2"), i, c, true, tp),
                tp: tp.clone(),
            },
            norm1: make_norm(p.sub("norm1"), cfg),
            norm2: make_norm(p.sub("norm2"), cfg),
            ls1: p.var("ls1", &[c], Init::Const(cfg.initializer_factor)),
            ls2: p.var("ls2", &[c], Init::Const(cfg.initializer_factor)),
            drop_path,
        })
    }

    fn forward(&self, h: &Tensor, train: bool) -> Result<Tensor, ForwardError> {
        let a = self.attn.forward(&self.norm1.forward(h))? * &self.ls1;
        let h = h + drop_path(a, self.drop_path, train);
        let x = self.mlp.tp.copy_to(&self.norm2.forward(&h))?;
        let m = self.mlp.fc2.forward(&self.mlp.fc1.forward(&x).gelu("none"))? * &self.ls2;
        Ok(&h + drop_path(m, self.drop_path, train))
    }
}

/// `vision_model`: embeddings and `encoder.layers`.
#[derive(Debug)]
pub struct VisionModel {
    pub embeddings: VisionEmbeddings,
    pub layers: Vec<VisionLayer>,
    /// Full recomputation of the layers (selective lives in the attention layers).
    recompute: Option<Recompute>,
}

impl VisionModel {
    pub fn new(p: Path, cfg: &VisionConfig, tp: &Tp) -> Result<VisionModel, LayoutError> {
        let l = cfg.num_hidden_layers;
        let layers_path = p.sub("encoder").sub("layers");
        let layers = (0..l)
            .map(|i| {
                // torch.linspace(0, rate, L)[i]
                let rate = if l > 1 { cfg.drop_path_rate * i as f64 / (l - 1) as f64 } else { 0.0 };
                VisionLayer::new(layers_path.sub(i), cfg, rate, tp)
            })
            .collect::<Result<_, _>>()?;
        Ok(VisionModel { embeddings: VisionEmbeddings::new(p.sub("embeddings"), cfg), layers, recompute: None })
    }

    /// [N, 3, S, S] → last hidden state [N, 1 + grid², C] (class token first).
    pub fn forward(&self, pixel_values: &Tensor, train: bool) -> Result<Tensor, ForwardError> {
        let h = self.embeddings.forward(pixel_values);
        // SAFETY: the layers belong to the model, which outlives every graph of its steps and is
        // not mutated during one.
        unsafe {
            run_layers(
                &self.layers,
                self.recompute,
                &h,
                |l| l.ls1.requires_grad(),
                || move |layer: &VisionLayer, h: &Tensor| layer.forward(h, train),
            )
        }
    }

    /// Recomputes activations as `r` says (None: keeps them all).
    pub fn set_recompute(&mut self, r: Option<Recompute>) {
        let core = r.is_some_and(|r| r.attention_core());
        for layer in &mut self.layers {
            layer.attn.recompute_core = core;
        }
        self.recompute = r.filter(|r| !r.attention_core());
    }
}
