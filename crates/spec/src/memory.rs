//! Per-device memory of a training layout, estimated before launch: an out-of-memory after a
//! 20-minute start on 16 NPUs is what it saves.
//!
//! For each pipeline rank (the ranks of one stage hold the same; tensor- and context-parallel
//! ranks hold equal shares) the estimate adds:
//!
//! | part | bytes |
//! |---|---|
//! | weights | P/t · w (w = 2 in bf16/fp16, 4 in fp32) |
//! | gradients (trainable P only) | P/t · 4 (Megatron accumulates in fp32 with bf16) |
//! | optimizer (trainable P only) | P/t · (12 in bf16: fp32 master, Adam m and v; 8 in fp32) ÷ (dp·cp) with the distributed optimizer |
//! | activations | Σ over the micro batches in flight of the chunk's saved activations |
//! | transient | the largest working set of one backward: a recomputed group rerun, or the loss's |
//!
//! P: the stage's parameters (its LLM layers, plus the ViT, projector and embedding on the first
//! stage, the final norm and output layer on the last); layer weights are divided by t = tp
//! (norms and biases too: under 0.1% of a layer).
//!
//! Activations are counted tensor by tensor as mm-engine's layers keep them for backward
//! (InternVL's Qwen2 and InternViT blocks with SwiGLU, GQA and RoPE), in the spirit of
//! Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (2022),
//! whose GPT layer needs s·b·h·(34 + 5·a·s/h) bytes in fp16; here e is the activation width
//! (2 or 4 bytes), N = micro batch × sequence / cp the tokens a rank holds, h the hidden size,
//! k = kv heads × head size, i the MLP width, t = tp, and a norm keeps (4 + e) bytes per
//! element (its fp32 copy and its normalized output):
//!
//! - LLM layer: e·N·(h + 7h/t + 2k/t + h + 4i/t) + 2·(4 + e)·N·h/σ, σ = t with sequence
//!   parallelism else 1. The terms: the attention projections' input; q before and after RoPE
//!   and its rotated half, k likewise; the attention's own saved q, k, v (k and v repeated to
//!   the query heads) and output, the output projection's input; the MLP's input; gate, SiLU,
//!   up and their product. Flash attention keeps no s×s matrix.
//! - with context parallelism over a ring (Megatron's, mm-engine's default) the attention core
//!   keeps its q, k, v and output without repeating k and v (5h/t + 4k/t in place of
//!   7h/t + 2k/t, with or without selective recomputation); with mm-engine's all-gathered keys
//!   and values it also keeps the other ranks' keys and values: e·N·(cp − 1)·2h/t (repeated
//!   to the query heads), or e·N·(cp − 1)·2k/t with selective recomputation;
//! - selective recomputation drops what the attention core keeps (its repeated k, v and its
//!   output: 3h/t − 2k/t fewer per token) and keeps its inputs;
//! - full recomputation keeps only each group's input (e·N·h/σ) and reruns one group at a
//!   time in backward (its full activations are the transient; with the block method the
//!   first layers rerun after the later layers' backward freed theirs);
//! - ViT layer (first stage, not frozen): e·M·(6c + 5c/t + 2j/t) with M = micro batch × tiles ×
//!   tokens per tile, c its width and j its MLP width, plus 2c with drop path (c/t less with
//!   selective recomputation; full recomputation as in the LLM, when it applies to the ViT); a
//!   frozen ViT keeps nothing; the projector e·M'·(8c + 2h) for its M' image tokens;
//! - the loss (last stage): the log-softmax over the vocabulary (N·V/t·4) kept, and its gradient
//!   and the logits' (N·V/t·(4 + e)) as the transient of the loss's backward; a layer's
//!   backward has 2·e·N·i/t of gradients in flight.
//!
//! Micro batches in flight come from the pipeline schedule itself (`layout::schedule`): the most
//! forwards a rank has run without their backward (1F1B: pp − rank on stage `rank`; interleaved:
//! counted per chunk).
//!
//! The model is checked against mm-engine's measured peaks on the CPU
//! (`cargo bench -p mm-engine --bench recompute` prints both).

use crate::layout::{schedule, Action};
use crate::presets::ModelPreset;

pub use crate::recompute::Recompute;

/// What the estimate needs to know about a run.
#[derive(Debug, Clone)]
pub struct MemoryInput<'a> {
    pub model: &'a ModelPreset,
    pub tp: usize,
    pub cp: usize,
    pub pp: usize,
    pub dp: usize,
    /// Virtual stages per pipeline rank (1 without interleaving).
    pub vpp: usize,
    /// LLM layers per chunk, in model order (chunk v·pp + rank), pp·vpp entries.
    pub llm_chunks: &'a [usize],
    pub micro_batch: usize,
    pub grad_accumulation: usize,
    pub seq_length: usize,
    /// Image tiles per sample at most (max_dynamic_patch, plus the thumbnail).
    pub tiles_per_sample: usize,
    /// Bytes per weight and activation element (2: bf16/fp16, 4: fp32).
    pub element_bytes: usize,
    pub distributed_optimizer: bool,
    pub sequence_parallel: bool,
    pub recompute: Option<Recompute>,
    pub freeze_vision: bool,
    pub freeze_projector: bool,
    pub freeze_llm: bool,
    /// The ViT's drop path is on (it keeps its masks).
    pub drop_path: bool,
    /// `recompute` applies to the ViT's layers too (mm-engine's behaviour; MindSpeed-MM's
    /// model.json from the launcher sets it for the LLM only).
    pub vit_recompute: bool,
    /// Context parallelism all-gathers the keys and values (mm-engine's `--cp-kv-exchange
    /// all-gather`): each layer's attention keeps them for the whole sequence. Otherwise (the
    /// ring, Megatron's and mm-engine's default) the attention keeps its own share of q, k, v
    /// (not repeated to the query heads), its output and log-sum-exp, with or without selective
    /// recomputation.
    pub cp_gathers_kv: bool,
}

/// One pipeline rank's estimate, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StageMemory {
    pub pp_rank: usize,
    pub weights: f64,
    pub gradients: f64,
    pub optimizer: f64,
    /// Saved activations of all micro batches in flight at the worst moment.
    pub activations: f64,
    /// The most micro-batch chunks in flight on this rank.
    pub in_flight: usize,
    pub transient: f64,
    pub total: f64,
}

/// The estimate for every pipeline rank.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MemoryEstimate {
    pub stages: Vec<StageMemory>,
}

impl MemoryEstimate {
    /// The rank that needs the most (None only for an estimate of no stage).
    pub fn peak(&self) -> Option<StageMemory> {
        self.stages.iter().copied().max_by(|a, b| a.total.total_cmp(&b.total))
    }
}

/// Saved activations and backward working set of one chunk for one micro batch.
#[derive(Debug, Clone, Copy, Default)]
struct ChunkActivations {
    saved: f64,
    transient: f64,
}

impl MemoryInput<'_> {
    fn llm_layer(&self, n: f64, selective: bool) -> f64 {
        let l = &self.model.llm;
        let (h, k, i) =
            (l.hidden_size as f64, (l.num_key_value_heads * l.head_dim()) as f64, l.intermediate_size as f64);
        let (t, e) = (self.tp as f64, self.element_bytes as f64);
        let sigma = if self.sequence_parallel { t } else { 1.0 };
        let ring = self.cp > 1 && !self.cp_gathers_kv;
        let attention = if ring {
            // The ring's core keeps k and v once per kv head (2k, not 2h): nothing for selective
            // recomputation to drop.
            5.0 * h / t + 4.0 * k / t
        } else if selective {
            4.0 * h / t + 4.0 * k / t
        } else {
            7.0 * h / t + 2.0 * k / t
        };
        // Gathered keys and values: the other ranks' share of the sequence too (repeated to the
        // query heads, or as the recomputed core's inputs with selective recomputation).
        let gathered = if self.cp_gathers_kv && self.cp > 1 {
            e * n * (self.cp - 1) as f64 * if selective { 2.0 * k / t } else { 2.0 * h / t }
        } else {
            0.0
        };
        e * n * (h + attention + h + 4.0 * i / t) + 2.0 * (4.0 + e) * n * h / sigma + gathered
    }

    fn llm_layer_transient(&self, n: f64) -> f64 {
        2.0 * self.element_bytes as f64 * n * self.model.llm.intermediate_size as f64 / self.tp as f64
    }

    fn chunk(&self, chunk: usize) -> ChunkActivations {
        let chunks = self.llm_chunks.len().max(1);
        let layers = self.llm_chunks.get(chunk).copied().unwrap_or(0);
        let (first, last) = (chunk == 0, chunk + 1 == chunks);
        let e = self.element_bytes as f64;
        let (t, h) = (self.tp as f64, self.model.llm.hidden_size as f64);
        let sigma = if self.sequence_parallel { t } else { 1.0 };
        let n = (self.micro_batch * self.seq_length) as f64 / self.cp as f64;
        let full = self.llm_layer(n, matches!(self.recompute, Some(Recompute::Selective)));
        let stream = e * n * h / sigma;
        let mut out = ChunkActivations { saved: 0.0, transient: self.llm_layer_transient(n) };
        match self.recompute {
            Some(Recompute::FullUniform(g)) => {
                let g = g.max(1);
                out.saved = layers.div_ceil(g) as f64 * stream;
                out.transient += g.min(layers) as f64 * self.llm_layer(n, false);
            }
            Some(Recompute::FullBlock(b)) => {
                let kept = b.min(layers);
                out.saved = kept as f64 * stream + (layers - kept) as f64 * full;
                if kept > 0 {
                    // The first layers rerun after the later ones' backward freed theirs.
                    let rerun = self.llm_layer(n, false) - (layers - kept) as f64 * full;
                    out.transient += rerun.max(0.0);
                }
            }
            _ => out.saved = layers as f64 * full,
        }
        if first {
            out.saved += stream; // the embeddings
            let (vit, rerun) = self.vision();
            out.saved += vit;
            out.transient = out.transient.max(rerun);
        }
        if last {
            let v = self.model.llm.vocab_size as f64 / t;
            out.saved += (4.0 + e) * n * h / sigma + 4.0 * n * v; // final norm, log-softmax
            out.transient = out.transient.max(n * v * (4.0 + e));
        }
        out
    }

    /// The first chunk's vision activations for one micro batch: (saved, the working set of a
    /// recomputed group's rerun).
    fn vision(&self) -> (f64, f64) {
        let v = &self.model.vision;
        let e = self.element_bytes as f64;
        let t = self.tp as f64;
        let tiles = (self.micro_batch * self.tiles_per_sample) as f64;
        let (mut saved, mut rerun) = (0.0, 0.0);
        if !self.freeze_vision {
            let (c, j) = (v.hidden_size as f64, v.intermediate_size as f64);
            let m = tiles * v.seq_len() as f64;
            let drop = if self.drop_path { 2.0 * c } else { 0.0 };
            let layer = |core: bool| e * m * (6.0 * c + if core { 5.0 } else { 4.0 } * c / t + 2.0 * j / t + drop);
            let layers = v.num_hidden_layers;
            let recompute = self.recompute.filter(|_| self.vit_recompute);
            saved = match recompute {
                Some(Recompute::FullUniform(g)) => {
                    rerun = g.max(1).min(layers) as f64 * layer(true);
                    layers.div_ceil(g.max(1)) as f64 * e * m * c
                }
                Some(Recompute::FullBlock(b)) => {
                    let kept = b.min(layers);
                    if kept > 0 {
                        rerun = (layer(true) - (layers - kept) as f64 * layer(true)).max(0.0);
                    }
                    kept as f64 * e * m * c + (layers - kept) as f64 * layer(true)
                }
                // Selective: the attention core's output is not kept.
                Some(Recompute::Selective) => layers as f64 * layer(false),
                None => layers as f64 * layer(true),
            };
        }
        if !(self.freeze_vision && self.freeze_projector) {
            let c = self.model.projector_in() as f64;
            let m = tiles * self.model.num_image_token() as f64;
            saved += e * m * (2.0 * c + 2.0 * self.model.llm.hidden_size as f64);
        }
        (saved, rerun)
    }

    /// Parameters of chunk `chunk`, and how many of them train.
    fn chunk_params(&self, chunk: usize) -> (f64, f64) {
        let m = self.model;
        let chunks = self.llm_chunks.len().max(1);
        let layers = self.llm_chunks.get(chunk).copied().unwrap_or(0) as f64;
        let (h, v) = (m.llm.hidden_size as f64, m.llm.vocab_size as f64);
        let mut no_layers = m.llm.clone();
        no_layers.num_hidden_layers = 0;
        let per_layer = (m.llm.param_count() - no_layers.param_count()) as f64 / m.llm.num_hidden_layers.max(1) as f64;
        let t = self.tp as f64;
        let mut llm = layers * per_layer / t;
        if chunk == 0 {
            llm += v * h / t;
        }
        if chunk + 1 == chunks {
            llm += h + if m.llm.tie_word_embeddings { 0.0 } else { v * h / t };
        }
        let (mut total, mut trainable) = (llm, if self.freeze_llm { 0.0 } else { llm });
        if chunk == 0 {
            let vision = m.vision.param_count() as f64 / t;
            let projector = m.projector_param_count() as f64 / t;
            total += vision + projector;
            trainable += if self.freeze_vision { 0.0 } else { vision };
            trainable += if self.freeze_projector { 0.0 } else { projector };
        }
        (total, trainable)
    }

    /// The estimate for every pipeline rank.
    pub fn estimate(&self) -> MemoryEstimate {
        let pp = self.pp.max(1);
        let vpp = self.vpp.max(1);
        let m = self.grad_accumulation.max(1);
        let e = self.element_bytes as f64;
        let optim_per_param = if self.element_bytes == 4 { 8.0 } else { 12.0 };
        let shards = if self.distributed_optimizer { (self.dp * self.cp).max(1) as f64 } else { 1.0 };
        let stages = (0..pp)
            .map(|rank| {
                let chunks: Vec<usize> = (0..vpp).map(|v| v * pp + rank).collect();
                let acts: Vec<ChunkActivations> = chunks.iter().map(|&c| self.chunk(c)).collect();
                let (mut total_p, mut train_p) = (0.0, 0.0);
                for &c in &chunks {
                    let (p, tr) = self.chunk_params(c);
                    total_p += p;
                    train_p += tr;
                }
                // The worst moment of the schedule: the most saved activations at once.
                let (mut live, mut worst, mut in_flight, mut most) = (0.0f64, 0.0f64, 0usize, 0usize);
                match schedule(pp, rank, m, vpp) {
                    Ok(actions) => {
                        for a in actions {
                            match a {
                                Action::Forward(s) => {
                                    live += acts[s.chunk].saved;
                                    in_flight += 1;
                                    worst = worst.max(live);
                                    most = most.max(in_flight);
                                }
                                Action::Backward(s) => {
                                    live -= acts[s.chunk].saved;
                                    in_flight = in_flight.saturating_sub(1);
                                }
                                Action::Exchange(_) => {}
                            }
                        }
                    }
                    // A schedule that cannot run here (e.g. interleaving with micro batches not
                    // a multiple of pp): the bound of every chunk's micro batches in flight at
                    // once, never an optimistic zero.
                    Err(_) => {
                        most = vpp * m.min(pp);
                        worst = acts.iter().map(|a| a.saved).sum::<f64>() * m.min(pp) as f64;
                    }
                }
                let transient = acts.iter().map(|a| a.transient).fold(0.0, f64::max);
                let weights = total_p * e;
                let gradients = train_p * 4.0;
                let optimizer = train_p * optim_per_param / shards;
                StageMemory {
                    pp_rank: rank,
                    weights,
                    gradients,
                    optimizer,
                    activations: worst,
                    in_flight: most,
                    transient,
                    total: weights + gradients + optimizer + worst + transient,
                }
            })
            .collect();
        MemoryEstimate { stages }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::preset;

    fn input(model: &ModelPreset) -> MemoryInput<'_> {
        MemoryInput {
            model,
            tp: 1,
            cp: 1,
            pp: 1,
            dp: 1,
            vpp: 1,
            llm_chunks: &[],
            micro_batch: 1,
            grad_accumulation: 1,
            seq_length: 4096,
            tiles_per_sample: 0,
            element_bytes: 2,
            distributed_optimizer: false,
            sequence_parallel: false,
            recompute: None,
            freeze_vision: true,
            freeze_projector: false,
            freeze_llm: false,
            drop_path: false,
            vit_recompute: true,
            cp_gathers_kv: false,
        }
    }

    /// The seed's 8B layout (TP1 PP4, 6,8,8,6, micro 1, seq 4096, bf16, distributed optimizer
    /// over dp 2, ViT frozen): weights, gradients and optimizer match the parameter counts, the
    /// first stage holds 4 micro batches in flight (1F1B), the last one.
    #[test]
    fn the_seed_8b_layout() {
        let m = preset("8b").unwrap();
        let chunks = [6, 8, 8, 6];
        let mut i = input(&m);
        i.pp = 4;
        i.dp = 2;
        i.llm_chunks = &chunks;
        i.grad_accumulation = 64;
        i.tiles_per_sample = 13;
        i.distributed_optimizer = true;
        let est = i.estimate();
        assert_eq!(est.stages.iter().map(|s| s.in_flight).collect::<Vec<_>>(), [4, 3, 2, 1]);
        let params: f64 = (0..4).map(|c| i.chunk_params(c).0).sum();
        assert!((params - m.param_counts().total as f64).abs() < 1.0, "{params} vs {:?}", m.param_counts());
        let s0 = est.stages[0];
        assert!((s0.weights / 2.0 - i.chunk_params(0).0).abs() < 1.0);
        // Optimizer state is sharded over the 2 data-parallel ranks: 12 bytes / 2 per trainable parameter.
        assert!((s0.optimizer - i.chunk_params(0).1 * 6.0).abs() < 1.0);
        // Full recomputation shrinks the first stage's activations by more than 10×.
        let mut r = i.clone();
        r.recompute = Some(Recompute::FullUniform(1));
        let er = r.estimate();
        assert!(er.stages[0].activations * 10.0 < s0.activations, "{er:?} vs {s0:?}");
        assert!(est.peak().unwrap().total > er.peak().unwrap().total);
    }

    /// An LLM layer of InternVL3-2B's widths at 4096 tokens in fp32 keeps ~0.9 GB, as counted
    /// tensor by tensor in the module doc.
    #[test]
    fn one_layer_of_the_2b_widths() {
        let m = preset("2b").unwrap();
        let mut i = input(&m);
        i.element_bytes = 4;
        let per_token = 1536.0 * 9.0 + 512.0 + 4.0 * 8960.0;
        let want = 4.0 * 4096.0 * per_token + 2.0 * 8.0 * 4096.0 * 1536.0;
        assert!((i.llm_layer(4096.0, false) - want).abs() < 1.0);
        assert!(i.llm_layer(4096.0, true) < i.llm_layer(4096.0, false));
        // Tensor and sequence parallelism divide it.
        i.tp = 2;
        let tp = i.llm_layer(4096.0, false);
        i.sequence_parallel = true;
        assert!(i.llm_layer(4096.0, false) < tp && tp < want);
    }

    /// More stages or context-parallel ranks lower the first stage's need.
    #[test]
    fn pipeline_and_context_parallelism_spread_the_load() {
        let m = preset("8b").unwrap();
        let one = [28];
        let two = [14, 14];
        let mut i = input(&m);
        i.llm_chunks = &one;
        i.grad_accumulation = 8;
        let base = i.estimate().peak().unwrap().total;
        let mut p = i.clone();
        p.pp = 2;
        p.llm_chunks = &two;
        assert!(p.estimate().peak().unwrap().total < base);
        let mut c = i.clone();
        c.cp = 2;
        let ring = c.estimate().peak().unwrap().total;
        assert!(ring < base);
        // Gathered keys and values keep more, still less than one rank with the whole sequence.
        c.cp_gathers_kv = true;
        let gathered = c.estimate().peak().unwrap().total;
        assert!(ring < gathered && gathered < base, "{ring} {gathered} {base}");
    }
}
