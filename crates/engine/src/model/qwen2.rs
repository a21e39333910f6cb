//! Qwen2 / Qwen2.5 decoder, the language model of every InternVL3 size.
//!
//! Quirks worth knowing: q/k/v projections have a bias, o_proj does not; grouped-query
//! attention (kv heads repeated to the query heads); RoPE with θ from the config, computed in
//! fp32 (cos/sin of `position · inv_freq`, halves rotated as in `rotate_half`); RMSNorm in fp32;
//! SwiGLU MLP without bias; `lm_head` untied in InternVL3 (tied only when a checkpoint lacks it).
//!
//! Attention goes through `scaled_dot_product_attention` with an explicit boolean mask
//! (causal ∧ key is not padding), so padded batches need no pad-id convention.
//! Parameter paths are the original checkpoint keys under `language_model.`.

use mm_spec::layout::LayoutError;
use mm_spec::LlmConfig;
use tch::nn::Path;
use tch::{Kind, Tensor};

use super::cp::{Cp, KeyMask};
use super::layers::{normal_init, Linear, RmsNorm};
use super::recompute::{checkpoint1, run_layers, Recompute};
use super::tp::{RowLinear, Tp};
use super::ForwardError;

/// Attention with this tensor-parallel rank's kv groups: q/k/v column-parallel (the rank's
/// heads), o_proj row-parallel.
#[derive(Debug)]
pub struct Qwen2Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: RowLinear,
    /// This rank's query and key/value heads.
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    tp: Tp,
    /// Context parallelism: the keys and values of the whole sequence are gathered.
    cp: Cp,
    /// Selective recomputation: the attention core is rerun in backward.
    pub recompute_core: bool,
}

/// SwiGLU with this rank's share of the intermediate width (gate/up column-, down row-parallel).
#[derive(Debug)]
pub struct Qwen2Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: RowLinear,
    tp: Tp,
}

#[derive(Debug)]
pub struct Qwen2Layer {
    pub self_attn: Qwen2Attention,
    pub mlp: Qwen2Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

/// cos and sin for RoPE, [B or 1, T, head_dim], in the activations' dtype.
#[derive(Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// `positions` [B, T] (i64). Computed as transformers does: inv_freq in fp32, the product
    /// with the positions in fp32, then cos/sin cast to `kind`.
    pub fn new(positions: &Tensor, head_dim: i64, theta: f64, kind: Kind) -> Rope {
        let device = positions.device();
        let exponent =
            Tensor::arange_start_step(0, head_dim, 2, (Kind::Int64, device)).to_kind(Kind::Float) / head_dim as f64;
        let inv_freq = Tensor::pow_scalar(theta, &exponent).reciprocal();
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        Rope { cos: emb.cos().to_kind(kind), sin: emb.sin().to_kind(kind) }
    }

    /// The same tables (no copy), for a recomputed segment to keep.
    fn share(&self) -> Rope {
        Rope { cos: self.cos.shallow_clone(), sin: self.sin.shallow_clone() }
    }

    /// x [B, H, T, D] → x·cos + rotate_half(x)·sin.
    fn apply(&self, x: &Tensor) -> Tensor {
        let d = x.size()[3];
        let x1 = x.narrow(-1, 0, d / 2);
        let x2 = x.narrow(-1, d / 2, d / 2);
        let rotated = Tensor::cat(&[x2.neg(), x1], -1);
        let cos = self.cos.unsqueeze(1);
        let sin = self.sin.unsqueeze(1);
        x * cos + rotated * sin
    }
}

/// Repeats each kv head `n` times: [B, KV, T, D] → [B, KV·n, T, D] (transformers' repeat_kv).
fn repeat_kv(x: Tensor, n: i64) -> Tensor {
    if n == 1 {
        return x;
    }
    let (b, kv, t, d) = x.size4().expect("kv states are [B, KV, T, D]");
    x.unsqueeze(2).expand([b, kv, n, t, d], false).reshape([b, kv * n, t, d])
}

impl Qwen2Attention {
    fn new(p: Path, cfg: &LlmConfig, tp: &Tp) -> Result<Qwen2Attention, LayoutError> {
        let h = cfg.hidden_size as i64;
        let d = cfg.head_dim() as i64;
        let shard = tp.heads(cfg.num_attention_heads, cfg.num_key_value_heads)?;
        let heads = shard.q_heads.len() as i64;
        let kv = shard.kv_heads.len() as i64;
        Ok(Qwen2Attention {
            q_proj: Linear::new(p.sub("q_proj"), h, heads * d, true),
            k_proj: Linear::new(p.sub("k_proj"), h, kv * d, true),
            v_proj: Linear::new(p.sub("v_proj"), h, kv * d, true),
            o_proj: RowLinear::new(p.sub("o_proj"), heads * d, h, false, tp),
            heads,
            kv_heads: kv,
            head_dim: d,
            tp: tp.clone(),
            cp: Cp::single(),
            recompute_core: false,
        })
    }

    fn forward(&self, x: &Tensor, rope: &Rope, mask: &KeyMask) -> Result<Tensor, ForwardError> {
        let x = &self.tp.enter(x)?;
        let (b, t, _) = x.size3().expect("llm hidden states are [B, T, H]");
        let d = self.head_dim;
        let split = |y: Tensor, n: i64| y.reshape([b, t, n, d]).transpose(1, 2);
        let q = rope.apply(&split(self.q_proj.forward(x), self.heads));
        let k = rope.apply(&split(self.k_proj.forward(x), self.kv_heads));
        let v = split(self.v_proj.forward(x), self.kv_heads);
        let out = match mask {
            // The ring's core keeps only its inputs, output and log-sum-exp: nothing for
            // selective recomputation to drop.
            KeyMask::Ring { positions, valid } => self.cp.ring_attention(&q, &k, &v, positions, valid)?,
            KeyMask::Dense(mask) => self.dense_core(q, k, v, mask)?,
        };
        Ok(self.o_proj.forward(&out.transpose(1, 2).reshape([b, t, self.heads * d]))?)
    }

    /// Softmax(QKᵀ)V with one dense mask, after gathering the other context-parallel ranks' keys
    /// and values (none without context parallelism); rerun in backward with selective
    /// recomputation.
    fn dense_core(&self, q: Tensor, k: Tensor, v: Tensor, mask: &Tensor) -> Result<Tensor, ForwardError> {
        let (k, v) = (self.cp.gather_keys(&k)?, self.cp.gather_keys(&v)?);
        let rep = self.heads / self.kv_heads;
        let core = move |q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor| {
            Tensor::scaled_dot_product_attention(
                q,
                &repeat_kv(k.shallow_clone(), rep),
                &repeat_kv(v.shallow_clone(), rep),
                Some(mask),
                0.0,
                false,
                None,
                false,
            )
        };
        Ok(if self.recompute_core {
            let mask = mask.shallow_clone();
            // No parameters inside: only the inputs' gradients matter.
            checkpoint1(&[&q, &k, &v], false, Box::new(move |t| Ok(vec![core(&t[0], &t[1], &t[2], &mask)])))?
        } else {
            core(&q, &k, &v, mask)
        })
    }
}

impl Qwen2Layer {
    fn new(p: Path, cfg: &LlmConfig, tp: &Tp) -> Result<Qwen2Layer, LayoutError> {
        let h = cfg.hidden_size as i64;
        let i = tp.units(cfg.intermediate_size)?.len() as i64;
        let mlp = p.sub("mlp");
        Ok(Qwen2Layer {
            self_attn: Qwen2Attention::new(p.sub("self_attn"), cfg, tp)?,
            mlp: Qwen2Mlp {
                gate_proj: Linear::new(mlp.sub("gate_proj"), h, i, false),
                up_proj: Linear::new(mlp.sub("up_proj"), h, i, false),
                down_proj: RowLinear::new(mlp.sub("down_proj"), i, h, false, tp),
                tp: tp.clone(),
            },
            input_layernorm: RmsNorm::new(p.sub("input_layernorm"), h, cfg.rms_norm_eps),
            post_attention_layernorm: RmsNorm::new(p.sub("post_attention_layernorm"), h, cfg.rms_norm_eps),
        })
    }

    fn forward(&self, x: &Tensor, rope: &Rope, mask: &KeyMask) -> Result<Tensor, ForwardError> {
        let tp = &self.mlp.tp;
        let n1 = self.input_layernorm.forward_with(&tp.slice_weight(&self.input_layernorm.weight)?, x);
        let h = x + self.self_attn.forward(&n1, rope, mask)?;
        let n2 =
            self.post_attention_layernorm.forward_with(&tp.slice_weight(&self.post_attention_layernorm.weight)?, &h);
        let n = tp.enter(&n2)?;
        let m = self.mlp.down_proj.forward(&(self.mlp.gate_proj.forward(&n).silu() * self.mlp.up_proj.forward(&n)))?;
        Ok(h + m)
    }
}

/// `language_model`: `model.{embed_tokens, layers, norm}` and `lm_head`, or the part of it one
/// pipeline stage holds (layers keep their global numbers in the parameter names).
#[derive(Debug)]
pub struct Qwen2 {
    /// Present on the stage that embeds the tokens (and always when tied to `lm_head`).
    pub embed_tokens: Option<Tensor>,
    /// Layers `first_layer..first_layer + layers.len()` of the whole model.
    pub layers: Vec<Qwen2Layer>,
    pub first_layer: usize,
    /// Present on the stage that computes the logits.
    pub norm: Option<RmsNorm>,
    /// The untied output projection; `None` when tied to `embed_tokens` or not on this stage.
    pub lm_head: Option<Tensor>,
    head_dim: i64,
    rope_theta: f64,
    /// This tensor-parallel rank's vocabulary rows of `embed_tokens` and `lm_head`.
    vocab_rows: std::ops::Range<usize>,
    vocab: usize,
    tp: Tp,
    /// This rank's share of the sequence (see `model::cp`).
    cp: Cp,
    /// Full recomputation of the layers (selective lives in the attention layers).
    recompute: Option<Recompute>,
}

/// What part of the language model to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmPart {
    pub embed: bool,
    pub layers: std::ops::Range<usize>,
    /// The final norm and the output projection.
    pub head: bool,
}

/// The boolean attention mask [B, 1, T, T]: query i sees key j when j ≤ i and j is not padding.
pub fn causal_padding_mask(attention_mask: &Tensor) -> Tensor {
    let (b, t) = attention_mask.size2().expect("attention mask is [B, T]");
    let causal = Tensor::ones([t, t], (Kind::Bool, attention_mask.device())).tril(0);
    causal.view([1, 1, t, t]).logical_and(&attention_mask.to_kind(Kind::Bool).view([b, 1, 1, t]))
}

impl Qwen2 {
    pub fn new(p: Path, cfg: &LlmConfig, tie_lm_head: bool) -> Qwen2 {
        let part = LlmPart { embed: true, layers: 0..cfg.num_hidden_layers, head: true };
        Qwen2::part(p, cfg, tie_lm_head, &part, &Tp::single()).expect("one rank splits nothing")
    }

    /// Builds only `part` (a pipeline stage's share) with this tensor-parallel rank's slices; a
    /// tied head needs the embedding on the same stage.
    pub fn part(p: Path, cfg: &LlmConfig, tie_lm_head: bool, part: &LlmPart, tp: &Tp) -> Result<Qwen2, LayoutError> {
        let h = cfg.hidden_size as i64;
        let vocab_rows = tp.vocab_rows(cfg.vocab_size);
        let v = vocab_rows.len() as i64;
        let m = p.sub("model");
        let embed = part.embed || (part.head && tie_lm_head);
        let embed_tokens = embed.then(|| m.sub("embed_tokens").var("weight", &[v, h], normal_init()));
        let layers =
            part.layers.clone().map(|i| Qwen2Layer::new(m.sub("layers").sub(i), cfg, tp)).collect::<Result<_, _>>()?;
        let norm = part.head.then(|| RmsNorm::new(m.sub("norm"), h, cfg.rms_norm_eps));
        let lm_head = (part.head && !tie_lm_head).then(|| p.sub("lm_head").var("weight", &[v, h], normal_init()));
        Ok(Qwen2 {
            embed_tokens,
            layers,
            first_layer: part.layers.start,
            norm,
            lm_head,
            head_dim: cfg.head_dim() as i64,
            rope_theta: cfg.rope_theta,
            vocab_rows,
            vocab: cfg.vocab_size,
            tp: tp.clone(),
            cp: Cp::single(),
            recompute: None,
        })
    }

    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor, ForwardError> {
        let table = self.embed_tokens.as_ref().expect("the token embedding is on this pipeline stage");
        Ok(self.tp.embed(table, input_ids, &self.vocab_rows)?)
    }

    /// Input embeddings [B, T, H] and the padding mask [B, T] → final hidden states (after
    /// the last norm). Positions run 0..T in every row (padding is on the right).
    pub fn forward_embeds(&self, embeds: &Tensor, attention_mask: &Tensor) -> Result<Tensor, ForwardError> {
        self.final_norm(&self.forward_layers(&self.to_layers(embeds)?, attention_mask)?)
    }

    /// This part's layers over hidden states [B, T, H] (with sequence or context parallelism
    /// this rank's share of the padded sequence; the rotary tables and the mask are rebuilt
    /// from the whole sequence's padding mask [B, T], so any stage can run from a received
    /// activation).
    pub fn forward_layers(&self, hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor, ForwardError> {
        let (b, t) = attention_mask.size2().expect("the padding mask is [B, T]");
        let padded = self.padded_len(t);
        let attention_mask = if padded > t {
            Tensor::cat(
                &[attention_mask, &attention_mask.zeros_like().narrow(1, 0, 1).expand([b, padded - t], false)],
                1,
            )
        } else {
            attention_mask.shallow_clone()
        };
        let device = hidden.device();
        let positions = self.cp.positions(padded, device).unsqueeze(0).expand([b, -1], false);
        let rope = Rope::new(&positions, self.head_dim, self.rope_theta, hidden.kind());
        let mask = if self.cp.is_split() {
            self.cp.key_mask(&attention_mask, padded)
        } else {
            KeyMask::Dense(causal_padding_mask(&attention_mask))
        };
        // SAFETY: the layers belong to the model, which outlives every graph of its steps and is
        // not mutated during one.
        unsafe {
            run_layers(
                &self.layers,
                self.recompute,
                hidden,
                |l| l.input_layernorm.weight.requires_grad(),
                || {
                    let (rope, mask) = (rope.share(), mask.share());
                    move |layer: &Qwen2Layer, h: &Tensor| layer.forward(h, &rope, &mask)
                },
            )
        }
    }

    /// The length the sequence of `t` tokens runs at: padded for sequence parallelism (a
    /// multiple of tp) and context parallelism (a multiple of 2·cp, times tp with both).
    pub fn padded_len(&self, t: i64) -> i64 {
        if self.cp.is_split() {
            self.cp.padded_len(t, self.tp.seq_multiple())
        } else {
            self.tp.padded_len(t)
        }
    }

    /// Splits the sequence over `cp`'s group (see `model::cp`).
    pub fn set_context_parallel(&mut self, cp: Cp) {
        for layer in &mut self.layers {
            layer.self_attn.cp = cp.clone();
        }
        self.cp = cp;
    }

    /// With context parallelism, the targets [B, local] of this rank's logits for labels [B, T]
    /// (shifted on the whole sequence, `ignore` for the last position and the padding); None
    /// without, where the logits cover the whole sequence and the loss shifts them itself.
    pub fn context_targets(&self, labels: &Tensor, ignore: i64) -> Option<Tensor> {
        let t = labels.size()[1];
        self.cp.is_split().then(|| self.cp.targets(labels, self.padded_len(t), ignore))
    }

    /// Recomputes activations as `r` says (None: keeps them all).
    pub fn set_recompute(&mut self, r: Option<Recompute>) {
        let core = r.is_some_and(|r| r.attention_core());
        for layer in &mut self.layers {
            layer.self_attn.recompute_core = core;
        }
        self.recompute = r.filter(|r| !r.attention_core());
    }

    /// The final norm (on the stage with the head).
    pub fn final_norm(&self, hidden: &Tensor) -> Result<Tensor, ForwardError> {
        let norm = self.norm.as_ref().expect("the final norm is on this pipeline stage");
        Ok(norm.forward_with(&self.tp.slice_weight(&norm.weight)?, hidden))
    }

    /// Whole-sequence input embeddings → what the first layer takes (this rank's chunks with
    /// context parallelism, of which its slice with sequence parallelism).
    pub fn to_layers(&self, embeds: &Tensor) -> Result<Tensor, ForwardError> {
        let local = self.cp.slice(embeds, self.padded_len(embeds.size()[1]));
        Ok(self.tp.to_sequence_slice(&local)?)
    }

    /// Hidden states → logits [.., V] (with tensor parallelism: this rank's vocabulary rows,
    /// padding included; [`Qwen2::token_losses`] combines them).
    /// `seq_len`: the unpadded length, to which sequence-parallel logits are cut back (with
    /// context parallelism they stay this rank's positions, which
    /// [`Qwen2::context_targets`] scores).
    pub fn logits(&self, hidden: &Tensor, seq_len: i64) -> Result<Tensor, ForwardError> {
        let w =
            self.lm_head.as_ref().or(self.embed_tokens.as_ref()).expect("the output layer is on this pipeline stage");
        let logits = self.tp.enter(hidden)?.linear::<Tensor>(w, None);
        Ok(if logits.size()[1] > seq_len && !self.cp.is_split() { logits.narrow(1, 0, seq_len) } else { logits })
    }

    /// Cross entropy per token of [`Qwen2::logits`] rows [N, V or this rank's rows] against
    /// `targets` [N] (`ignore` counts 0), the same on every tensor-parallel rank.
    pub fn token_losses(&self, logits: &Tensor, targets: &Tensor, ignore: i64) -> Result<Tensor, ForwardError> {
        Ok(self.tp.token_losses(logits, targets, &self.vocab_rows, self.vocab, ignore)?)
    }
}
