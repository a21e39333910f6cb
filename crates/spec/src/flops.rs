//! Model FLOPs of a training step, for TFLOP/s per device and MFU.
//!
//! These are *model* FLOPs (what the model needs, as in the PaLM paper's MFU), not hardware
//! FLOPs: recomputed forwards, padding tokens and the skipped causal tiles of ring attention
//! are not counted, so MFU does not rise when recomputation is turned on.
//!
//! One multiply-add is 2 FLOPs. Biases, norms, activations, softmax, RoPE and the embedding
//! lookup are left out (they are O(width), not O(width²)). Forward FLOPs of one sample with
//! `T` tiles and `L` real LLM tokens:
//!
//! ```text
//! ViT, per tile (S = 1 + grid², c = width, i = MLP width, n_v layers):
//!     patch embedding    2 · grid² · (3 · p²) · c
//!     per layer linear   2 · S · (4c² + 2ci)           qkv 3c², proj c², fc1 + fc2 2ci
//!     per layer attention 4 · S² · c                   QKᵀ and AV, bidirectional
//! projector, per tile (N = image tokens per tile, d = 4c at ratio 0.5, h = LLM width):
//!     2 · N · (d·h + h·h)
//! LLM, per token (kv = kv heads · head dim, I = MLP width, V = vocabulary, n_l layers):
//!     2 · (n_l · (2h² + 2h·kv + 3h·I) + h·V)           q, o, k, v, gate/up/down, lm_head
//! LLM attention, per sample:
//!     n_l · 2 · h · L²                                  QKᵀ and AV over the causal half (L²/2)
//! ```
//!
//! Backward: a matrix product's backward is two products of the same size, one for the
//! input's gradient (needed when the module or anything before it trains) and one for the
//! weight's (when the module trains). So a linear part counts 1 + [grad flows] + [trained]
//! times its forward, attention's score products 1 + 2·[grad flows]. With everything trained
//! this is the usual 3× (6·N per token for the weights); a frozen ViT counts its forward
//! only, a frozen LLM under a trained projector counts forward plus input gradients.
//!
//! TFLOP/s per device = (model FLOPs of the global batch) / (step time) / (world size);
//! MFU = TFLOP/s per device / the device's peak dense TFLOP/s in the training dtype.

use serde::{Deserialize, Serialize};

use crate::presets::ModelPreset;

/// Which parts of the model train (get weight gradients).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trained {
    pub vision: bool,
    pub projector: bool,
    pub llm: bool,
}

impl Trained {
    pub const ALL: Trained = Trained { vision: true, projector: true, llm: true };
}

/// The per-unit FLOPs of one model, forward and backward included.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelFlops {
    /// ViT + projector, per tile.
    pub per_tile: f64,
    /// The LLM's products with weights, per real token.
    pub per_token: f64,
    /// The LLM's attention, per sample: this times L².
    pub per_token_squared: f64,
}

/// How many forwards a module costs in a training step: (linear parts, attention products).
fn multipliers(trained: bool, upstream_trained: bool) -> (f64, f64) {
    let grad_flows = trained || upstream_trained;
    let flows = if grad_flows { 1.0 } else { 0.0 };
    (1.0 + flows + if trained { 1.0 } else { 0.0 }, 1.0 + 2.0 * flows)
}

impl ModelFlops {
    pub fn new(p: &ModelPreset, trained: Trained) -> ModelFlops {
        let v = &p.vision;
        let (c, i, grid, patch) =
            (v.hidden_size as f64, v.intermediate_size as f64, v.grid() as f64, v.patch_size as f64);
        let s = v.seq_len() as f64;
        let vit_linear = 2.0 * grid * grid * 3.0 * patch * patch * c
            + v.num_hidden_layers as f64 * 2.0 * s * (4.0 * c * c + 2.0 * c * i);
        let vit_attention = v.num_hidden_layers as f64 * 4.0 * s * s * c;

        let l = &p.llm;
        let h = l.hidden_size as f64;
        let proj = 2.0 * p.num_image_token() as f64 * (p.projector_in() as f64 * h + h * h);

        let kv = (l.num_key_value_heads * l.head_dim()) as f64;
        let llm_linear = 2.0
            * (l.num_hidden_layers as f64 * (2.0 * h * h + 2.0 * h * kv + 3.0 * h * l.intermediate_size as f64)
                + h * l.vocab_size as f64);
        let llm_attention = l.num_hidden_layers as f64 * 2.0 * h;

        let (vl, va) = multipliers(trained.vision, false);
        let (pl, _) = multipliers(trained.projector, trained.vision);
        let (ll, la) = multipliers(trained.llm, trained.vision || trained.projector);
        ModelFlops {
            per_tile: vl * vit_linear + va * vit_attention + pl * proj,
            per_token: ll * llm_linear,
            per_token_squared: la * llm_attention,
        }
    }

    /// One sample's FLOPs: `tiles` image tiles and `tokens` real LLM tokens.
    pub fn sample(&self, tiles: u64, tokens: u64) -> f64 {
        let t = tokens as f64;
        self.per_tile * tiles as f64 + self.per_token * t + self.per_token_squared * t * t
    }

    /// A micro batch's FLOPs: `tiles` over all its samples, and each sample's real tokens.
    pub fn batch(&self, tiles: u64, sample_tokens: impl IntoIterator<Item = u64>) -> f64 {
        self.per_tile * tiles as f64 + sample_tokens.into_iter().map(|t| self.sample(0, t)).sum::<f64>()
    }
}

/// Peak dense TFLOP/s per device in bf16/fp16 (no sparsity) from the vendors' data sheets,
/// matched on the device name as CUDA or `npu-smi` reports it. The first entry whose pattern
/// the name contains wins, so more specific names come first.
pub const PEAK_TFLOPS_BF16: &[(&str, f64)] = &[
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("V100", 125.0),
    ("Ascend910B", 313.0),
    ("910B", 313.0),
];

/// The data-sheet peak for a device name, if it is in [`PEAK_TFLOPS_BF16`].
pub fn peak_tflops(device_name: &str) -> Option<f64> {
    PEAK_TFLOPS_BF16.iter().find(|(pat, _)| device_name.contains(pat)).map(|&(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::preset;

    /// The 8B model, everything trained: ViT, projector and LLM terms by hand from
    /// config.json's numbers (InternViT-300M: 24 layers, 1024 wide, MLP 4096, 448/14;
    /// Qwen2.5-7B: 28 layers, 3584 wide, 4 kv heads of 128, MLP 18944, vocab 151674).
    #[test]
    fn eight_b_by_hand() {
        let f = ModelFlops::new(&preset("8b").unwrap(), Trained::ALL);
        let s = 1025.0f64;
        let vit = 2.0 * 1024.0 * 3.0 * 196.0 * 1024.0
            + 24.0 * (2.0 * s * (4.0 * 1024.0f64.powi(2) + 2.0 * 1024.0 * 4096.0) + 4.0 * s * s * 1024.0);
        let proj = 2.0 * 256.0 * (4096.0 * 3584.0 + 3584.0 * 3584.0);
        assert_eq!(f.per_tile, 3.0 * (vit + proj));
        let h = 3584.0f64;
        let layer = 2.0 * h * h + 2.0 * h * 512.0 + 3.0 * h * 18944.0;
        assert_eq!(f.per_token, 3.0 * 2.0 * (28.0 * layer + h * 151674.0));
        assert_eq!(f.per_token_squared, 3.0 * 28.0 * 2.0 * h);
        // 6·N per token: the LLM's weights without the embedding, within the biases and norms
        // the formula leaves out.
        let l = &preset("8b").unwrap().llm;
        let n = (l.param_count() - (l.vocab_size * l.hidden_size) as u64) as f64;
        assert!((f.per_token / (6.0 * n) - 1.0).abs() < 1e-3, "{} vs 6N {}", f.per_token, 6.0 * n);
    }

    #[test]
    fn frozen_parts_count_less_and_a_frozen_vit_only_its_forward() {
        let p = preset("tiny").unwrap();
        let all = ModelFlops::new(&p, Trained::ALL);
        let frozen_vit = ModelFlops::new(&p, Trained { vision: false, ..Trained::ALL });
        assert!(frozen_vit.per_tile < all.per_tile);
        assert_eq!(frozen_vit.per_token, all.per_token);
        let only_llm = ModelFlops::new(&p, Trained { vision: false, projector: false, llm: true });
        let only_proj = ModelFlops::new(&p, Trained { vision: false, projector: true, llm: false });
        // A frozen LLM still passes gradients back to the projector: forward + input grads.
        assert_eq!(only_proj.per_token * 3.0, all.per_token * 2.0);
        assert_eq!(only_llm.per_token, all.per_token);
        assert!(only_llm.per_tile < only_proj.per_tile);
    }

    #[test]
    fn a_batch_is_the_sum_of_its_samples() {
        let f = ModelFlops::new(&preset("tiny").unwrap(), Trained::ALL);
        let b = f.batch(3, [100, 40]);
        assert!((b - (f.sample(3, 100) + f.sample(0, 40))).abs() <= 1e-9 * b);
        assert!(f.sample(0, 200) > 2.0 * f.sample(0, 100), "attention grows with L²");
    }

    #[test]
    fn peaks_match_the_most_specific_name() {
        assert_eq!(peak_tflops("NVIDIA H100 PCIe"), Some(756.0));
        assert_eq!(peak_tflops("NVIDIA H100 80GB HBM3"), Some(989.0));
        assert_eq!(peak_tflops("NVIDIA H200"), Some(989.0));
        assert_eq!(peak_tflops("NVIDIA A100-SXM4-80GB"), Some(312.0));
        assert_eq!(peak_tflops("cpu"), None);
    }
}
