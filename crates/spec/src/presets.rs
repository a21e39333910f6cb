//! InternVL3 architecture presets and the arithmetic derived from them.
//!
//! Owns: [`VisionConfig`] (InternViT), [`LlmConfig`] (Qwen2), [`ModelPreset`] (the
//! `internvl_chat` config), the named presets (`tiny`, `tiny6b`, `1b` … `78b`), config
//! validation, and exact parameter counts of the original OpenGVLab checkpoint layout.
//!
//! Field names are the ones of the original HF `config.json` (`vision_config`, `llm_config`,
//! `num_hidden_layers`, …) so a real checkpoint's config deserializes straight into these types
//! ([`crate::hf::config`]) and the converter can write one back with `serde_json`.
//! The numbers come from /work/shared/docs/internvl3.md.

use serde::{Deserialize, Serialize};

use crate::error::SpecError;

/// Every name [`preset`] accepts (besides the "InternVL3-8B" spellings of the real sizes).
pub const PRESET_NAMES: &[&str] = &["tiny", "tiny6b", "1b", "2b", "8b", "14b", "38b", "78b"];

/// Normalization used by the ViT blocks (`norm1`, `norm2`).
///
/// InternViT-300M uses LayerNorm (weight + bias), InternViT-6B RMSNorm (weight only, computed
/// in fp32). The difference changes both the numerics and the checkpoint's tensor set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormType {
    LayerNorm,
    RmsNorm,
}

/// The InternViT vision tower (`vision_config` of an `internvl_chat` config.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    pub num_hidden_layers: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub norm_type: NormType,
    /// Whether the fused `attn.qkv` Linear has a bias (300M: yes, 6B: no).
    pub qkv_bias: bool,
    /// RMSNorm over the full width on q and k before splitting heads (6B only).
    pub qk_normalization: bool,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_num_channels")]
    pub num_channels: usize,
    /// Stochastic depth; 0 for fine-tuning in the MindSpeed-MM recipe.
    #[serde(default)]
    pub drop_path_rate: f64,
    /// The layer-scale init value: `ls1`, `ls2` start at `initializer_factor * ones(C)`.
    #[serde(default = "default_initializer_factor")]
    pub initializer_factor: f64,
}

/// The Qwen2 language model (`llm_config` of an `internvl_chat` config.json).
///
/// Defaults are Qwen2Config's, so a config that omits a key means what it means to transformers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmConfig {
    pub num_hidden_layers: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    pub vocab_size: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// InternVL3 checkpoints ship an untied `lm_head` for every size, so this is false for all
    /// presets; a loader still ties when the checkpoint lacks `lm_head`.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// The config's `rope_scaling` (InternVL3-78B: dynamic NTK, factor 2.0). It only changes
    /// positions past `max_position_embeddings`; carried into MindSpeed-MM's model.json and
    /// every exported config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
}

/// `rope_scaling` of a Qwen2 config: the kind (`dynamic`, `linear`, `yarn`, …) and its factor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(rename = "type")]
    pub kind: String,
    pub factor: f64,
}

/// A whole InternVL3 model: ViT, pixel shuffle + `mlp1` projector, LLM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelPreset {
    /// Preset name ("8b", "tiny", …); not part of a HF config, so empty when read from one
    /// without a name.
    #[serde(default)]
    pub name: String,
    #[serde(rename = "vision_config")]
    pub vision: VisionConfig,
    #[serde(rename = "llm_config")]
    pub llm: LlmConfig,
    /// Pixel-shuffle ratio: 0.5 turns each 2×2 block of ViT tokens into one token of 4C.
    #[serde(default = "default_downsample_ratio")]
    pub downsample_ratio: f64,
    /// Conversation template name; all InternVL3 sizes use "internvl2_5".
    pub template: String,
    /// Pixel-shuffle version; "v2" is the one with the final transpose (all InternVL3).
    pub ps_version: String,
}

/// Parameter counts of the original OpenGVLab layout, per part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ParamCounts {
    pub vision: u64,
    pub projector: u64,
    pub llm: u64,
    pub total: u64,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_num_channels() -> usize {
    3
}
fn default_initializer_factor() -> f64 {
    0.1
}
fn default_rope_theta() -> f64 {
    // Qwen2Config's default; every InternVL3 config sets 1e6 explicitly.
    10_000.0
}
fn default_max_position_embeddings() -> usize {
    32_768
}
fn default_downsample_ratio() -> f64 {
    0.5
}

impl VisionConfig {
    /// Width of one attention head (64 for InternViT-300M, 128 for InternViT-6B).
    ///
    /// 0 for a config without heads, which [`ModelPreset::validate`] rejects.
    pub fn head_dim(&self) -> usize {
        self.hidden_size.checked_div(self.num_attention_heads).unwrap_or(0)
    }

    /// Patches per side of one tile (32 at 448/14).
    pub fn grid(&self) -> usize {
        self.image_size.checked_div(self.patch_size).unwrap_or(0)
    }

    /// Tokens the ViT sees per tile: the class token plus one per patch (1025 at 448/14).
    pub fn seq_len(&self) -> usize {
        self.grid().saturating_mul(self.grid()).saturating_add(1)
    }

    /// Exact parameter count of `vision_model.*` in the original layout.
    ///
    /// Saturates instead of overflowing, so absurd hand-written configs cannot panic here.
    pub fn param_count(&self) -> u64 {
        let c = self.hidden_size as u64;
        let i = self.intermediate_size as u64;
        let p = self.patch_size as u64;
        let g = self.grid() as u64;
        let ch = self.num_channels as u64;

        let patch_conv = sum(&[prod(&[ch, p, p, c]), c]);
        let class_embedding = c;
        let position_embedding = prod(&[sum(&[1, prod(&[g, g])]), c]);

        let norm = match self.norm_type {
            NormType::LayerNorm => prod(&[2, c]),
            NormType::RmsNorm => c,
        };
        let qkv_bias = if self.qkv_bias { prod(&[3, c]) } else { 0 };
        let qkv = sum(&[prod(&[3, c, c]), qkv_bias]);
        // q_norm / k_norm are InternRMSNorm(C) whatever norm_type says: weight only.
        let qk_norm = if self.qk_normalization { prod(&[2, c]) } else { 0 };
        let proj = sum(&[prod(&[c, c]), c]);
        let layer_scale = prod(&[2, c]);
        let fc1 = sum(&[prod(&[c, i]), i]);
        let fc2 = sum(&[prod(&[i, c]), c]);
        let per_layer = sum(&[qkv, qk_norm, proj, prod(&[2, norm]), layer_scale, fc1, fc2]);

        sum(&[patch_conv, class_embedding, position_embedding, prod(&[self.num_hidden_layers as u64, per_layer])])
    }
}

/// Saturating product: parameter arithmetic never panics on hand-written configs.
fn prod(xs: &[u64]) -> u64 {
    xs.iter().fold(1, |a, &b| a.saturating_mul(b))
}

/// Saturating sum, the partner of [`prod`].
fn sum(xs: &[u64]) -> u64 {
    xs.iter().fold(0, |a, &b| a.saturating_add(b))
}

impl LlmConfig {
    /// Width of one attention head (hidden / heads; Qwen2 has no separate head_dim key).
    ///
    /// 0 for a config without heads, which [`ModelPreset::validate`] rejects.
    pub fn head_dim(&self) -> usize {
        self.hidden_size.checked_div(self.num_attention_heads).unwrap_or(0)
    }

    /// Query heads per key/value head (GQA group size).
    pub fn q_per_kv(&self) -> usize {
        self.num_attention_heads.checked_div(self.num_key_value_heads).unwrap_or(0)
    }

    /// Exact parameter count of `language_model.*` (embed, layers, final norm, untied lm_head).
    pub fn param_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let v = self.vocab_size as u64;
        let i = self.intermediate_size as u64;
        let kv = prod(&[self.num_key_value_heads as u64, self.head_dim() as u64]);

        let embed = prod(&[v, h]);
        let q = sum(&[prod(&[h, h]), h]);
        let k = sum(&[prod(&[h, kv]), kv]);
        let vproj = k;
        let o = prod(&[h, h]);
        let mlp = prod(&[3, h, i]);
        let norms = prod(&[2, h]);
        let per_layer = sum(&[q, k, vproj, o, mlp, norms]);
        let final_norm = h;
        let lm_head = if self.tie_word_embeddings { 0 } else { embed };

        sum(&[embed, prod(&[self.num_hidden_layers as u64, per_layer]), final_norm, lm_head])
    }
}

impl ModelPreset {
    /// Integer `1 / downsample_ratio` (2 for 0.5), if the ratio has one.
    fn shuffle_factor(&self) -> Option<usize> {
        let r = self.downsample_ratio;
        if !(r.is_finite() && r > 0.0 && r <= 1.0) {
            return None;
        }
        let inv = 1.0 / r;
        let rounded = inv.round();
        ((inv - rounded).abs() < 1e-9).then_some(rounded as usize)
    }

    /// Image tokens per tile after pixel shuffle (256 at 448/14 with ratio 0.5).
    ///
    /// Same formula as InternVL: `int((image_size // patch_size) ** 2 * downsample_ratio ** 2)`.
    pub fn num_image_token(&self) -> usize {
        let g = self.vision.grid() as f64;
        (g * g * self.downsample_ratio * self.downsample_ratio) as usize
    }

    /// Input width of `mlp1`: the ViT width times the pixel-shuffle block (4C at ratio 0.5).
    pub fn projector_in(&self) -> usize {
        let f = self.shuffle_factor().unwrap_or(0);
        self.vision.hidden_size.saturating_mul(f).saturating_mul(f)
    }

    /// Exact parameter count of `mlp1`: LayerNorm(4C) → Linear(4C, H) → GELU → Linear(H, H).
    pub fn projector_param_count(&self) -> u64 {
        let d = self.projector_in() as u64;
        let h = self.llm.hidden_size as u64;
        let norm = prod(&[2, d]);
        let linear_1 = sum(&[prod(&[d, h]), h]);
        let linear_2 = sum(&[prod(&[h, h]), h]);
        sum(&[norm, linear_1, linear_2])
    }

    /// Parameter counts per part, computed from the shapes (not looked up).
    pub fn param_counts(&self) -> ParamCounts {
        let vision = self.vision.param_count();
        let projector = self.projector_param_count();
        let llm = self.llm.param_count();
        ParamCounts { vision, projector, llm, total: sum(&[vision, projector, llm]) }
    }

    /// Bytes of all weights at `dtype_bytes` per parameter (2 for bf16), without optimizer
    /// state: what a full checkpoint of the model weights occupies on disk.
    pub fn checkpoint_bytes(&self, dtype_bytes: u64) -> u64 {
        self.param_counts().total.saturating_mul(dtype_bytes)
    }

    /// Checks that the numbers describe a model the engine can build.
    ///
    /// Reports the first problem; presets always pass, so this matters for configs read from
    /// disk or edited by hand.
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |field: &str, found: String, expected: &str| SpecError::InvalidModel {
            model: self.name.clone(),
            field: field.to_string(),
            found,
            expected: expected.to_string(),
        };
        let v = &self.vision;
        let l = &self.llm;

        for (field, value) in [
            ("vision_config.num_hidden_layers", v.num_hidden_layers),
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.image_size", v.image_size),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.num_channels", v.num_channels),
            ("llm_config.num_hidden_layers", l.num_hidden_layers),
            ("llm_config.hidden_size", l.hidden_size),
            ("llm_config.num_attention_heads", l.num_attention_heads),
            ("llm_config.num_key_value_heads", l.num_key_value_heads),
            ("llm_config.intermediate_size", l.intermediate_size),
            ("llm_config.vocab_size", l.vocab_size),
            ("llm_config.max_position_embeddings", l.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(bad(field, "0".into(), "at least 1"));
            }
        }
        if v.hidden_size % v.num_attention_heads != 0 {
            return Err(bad(
                "vision_config.hidden_size",
                v.hidden_size.to_string(),
                &format!("a multiple of num_attention_heads ({})", v.num_attention_heads),
            ));
        }
        if v.image_size % v.patch_size != 0 {
            return Err(bad(
                "vision_config.image_size",
                v.image_size.to_string(),
                &format!("a multiple of patch_size ({})", v.patch_size),
            ));
        }
        if l.hidden_size % l.num_attention_heads != 0 {
            return Err(bad(
                "llm_config.hidden_size",
                l.hidden_size.to_string(),
                &format!("a multiple of num_attention_heads ({})", l.num_attention_heads),
            ));
        }
        if l.num_attention_heads % l.num_key_value_heads != 0 {
            return Err(bad(
                "llm_config.num_attention_heads",
                l.num_attention_heads.to_string(),
                &format!("a multiple of num_key_value_heads ({}) for grouped-query attention", l.num_key_value_heads),
            ));
        }
        for (field, value) in [
            ("vision_config.layer_norm_eps", v.layer_norm_eps),
            ("llm_config.rms_norm_eps", l.rms_norm_eps),
            ("llm_config.rope_theta", l.rope_theta),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(bad(field, value.to_string(), "a finite number above 0"));
            }
        }
        if !(v.drop_path_rate.is_finite() && (0.0..1.0).contains(&v.drop_path_rate)) {
            return Err(bad("vision_config.drop_path_rate", v.drop_path_rate.to_string(), "a probability in [0, 1)"));
        }
        if !v.initializer_factor.is_finite() {
            return Err(bad(
                "vision_config.initializer_factor",
                v.initializer_factor.to_string(),
                "a finite number (0.1 for InternViT)",
            ));
        }
        let Some(factor) = self.shuffle_factor() else {
            return Err(bad(
                "downsample_ratio",
                self.downsample_ratio.to_string(),
                "1/k for a whole number k (0.5 for InternVL3)",
            ));
        };
        if v.grid() % factor != 0 {
            return Err(bad(
                "downsample_ratio",
                self.downsample_ratio.to_string(),
                &format!(
                    "a ratio whose inverse divides the {} patches per side \
                     (image_size {} / patch_size {}), e.g. 0.5 with an even grid",
                    v.grid(),
                    v.image_size,
                    v.patch_size
                ),
            ));
        }
        if self.ps_version != "v1" && self.ps_version != "v2" {
            return Err(bad("ps_version", format!("{:?}", self.ps_version), "\"v2\" (InternVL3) or \"v1\""));
        }
        if self.template.is_empty() {
            return Err(bad("template", "empty".into(), "a template name such as \"internvl2_5\""));
        }
        Ok(())
    }
}

/// Resolves a preset by name: "8b", "8B", "InternVL3-8B", "internvl3_8b", "InternVL3-8B-hf",
/// "InternVL3-8B-Instruct", "tiny", "tiny6b" (case-insensitive).
pub fn preset(name: &str) -> Result<ModelPreset, SpecError> {
    let lower = name.trim().to_ascii_lowercase();
    let mut key = lower.as_str();
    for prefix in ["internvl3-", "internvl3_", "internvl3"] {
        if let Some(rest) = key.strip_prefix(prefix) {
            key = rest;
            break;
        }
    }
    // The -hf and -Instruct checkpoints share the architecture of the plain one.
    for suffix in ["-hf", "-instruct"] {
        if let Some(rest) = key.strip_suffix(suffix) {
            key = rest;
        }
    }
    let preset = match key {
        "tiny" => tiny(),
        "tiny6b" | "tiny-6b" => tiny6b(),
        "1b" => real("1b", vit_300m(), qwen(24, 896, 14, 2, 4864, 1e-6)),
        "2b" => real("2b", vit_300m(), qwen(28, 1536, 12, 2, 8960, 1e-6)),
        "8b" => real("8b", vit_300m(), qwen(28, 3584, 28, 4, 18944, 1e-6)),
        // 14B/38B eps: internvl3.md marks 1e-5 as unverified; a loader should prefer the
        // checkpoint's own config.json (mm_spec::hf::read_config) over the preset.
        "14b" => real("14b", vit_300m(), qwen(48, 5120, 40, 8, 13824, 1e-5)),
        "38b" => real("38b", vit_6b(), qwen(64, 5120, 40, 8, 27648, 1e-5)),
        // Qwen2.5-72B as InternVL3-78B ships it: dynamic rope scaling, factor 2.0.
        "78b" => {
            let mut p = real("78b", vit_6b(), qwen(80, 8192, 64, 8, 29568, 1e-6));
            p.llm.rope_scaling = Some(RopeScaling { kind: "dynamic".into(), factor: 2.0 });
            p
        }
        _ => return Err(SpecError::UnknownPreset { name: name.to_string(), known: PRESET_NAMES.join(", ") }),
    };
    Ok(preset)
}

/// InternViT-300M-448px-V2.5 (1B, 2B, 8B, 14B).
fn vit_300m() -> VisionConfig {
    VisionConfig {
        num_hidden_layers: 24,
        hidden_size: 1024,
        num_attention_heads: 16,
        intermediate_size: 4096,
        norm_type: NormType::LayerNorm,
        qkv_bias: true,
        qk_normalization: false,
        layer_norm_eps: 1e-6,
        image_size: 448,
        patch_size: 14,
        num_channels: 3,
        drop_path_rate: 0.0,
        initializer_factor: 0.1,
    }
}

/// InternViT-6B-448px-V2.5 (38B, 78B).
fn vit_6b() -> VisionConfig {
    VisionConfig {
        num_hidden_layers: 45,
        hidden_size: 3200,
        num_attention_heads: 25,
        intermediate_size: 12800,
        norm_type: NormType::RmsNorm,
        qkv_bias: false,
        qk_normalization: true,
        ..vit_300m()
    }
}

/// A Qwen2.5 LLM as InternVL3 ships it: vocab 151674, θ 1e6, untied lm_head.
fn qwen(layers: usize, hidden: usize, heads: usize, kv_heads: usize, intermediate: usize, eps: f64) -> LlmConfig {
    LlmConfig {
        num_hidden_layers: layers,
        hidden_size: hidden,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        intermediate_size: intermediate,
        rms_norm_eps: eps,
        rope_theta: 1e6,
        vocab_size: 151_674,
        max_position_embeddings: 32_768,
        tie_word_embeddings: false,
        rope_scaling: None,
    }
}

fn real(name: &str, vision: VisionConfig, llm: LlmConfig) -> ModelPreset {
    ModelPreset {
        name: name.to_string(),
        vision,
        llm,
        downsample_ratio: 0.5,
        template: "internvl2_5".to_string(),
        ps_version: "v2".to_string(),
    }
}

/// A CPU-trainable model with the InternViT-300M structure (LayerNorm, qkv bias).
///
/// 112 px tiles of 14 px patches give an 8×8 grid: 64 patches, 16 image tokens per tile after
/// pixel shuffle, so a sample with a few tiles stays short enough for CPU training.
fn tiny() -> ModelPreset {
    ModelPreset {
        name: "tiny".to_string(),
        vision: VisionConfig {
            num_hidden_layers: 2,
            hidden_size: 64,
            num_attention_heads: 4,
            intermediate_size: 128,
            image_size: 112,
            ..vit_300m()
        },
        llm: LlmConfig {
            num_hidden_layers: 2,
            hidden_size: 64,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 128,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            vocab_size: 512,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            rope_scaling: None,
        },
        downsample_ratio: 0.5,
        template: "internvl2_5".to_string(),
        ps_version: "v2".to_string(),
    }
}

/// [`tiny`] with the InternViT-6B flavour (RMSNorm, no qkv bias, qk normalization), so tests
/// cover both vision code paths on a CPU.
fn tiny6b() -> ModelPreset {
    let mut p = tiny();
    p.name = "tiny6b".to_string();
    p.vision.norm_type = NormType::RmsNorm;
    p.vision.qkv_bias = false;
    p.vision.qk_normalization = true;
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real_presets() -> Vec<ModelPreset> {
        ["1b", "2b", "8b", "14b", "38b", "78b"].iter().map(|n| preset(n).unwrap()).collect()
    }

    #[test]
    fn every_listed_name_resolves_and_validates() {
        for name in PRESET_NAMES {
            let p = preset(name).unwrap();
            assert_eq!(p.name, *name);
            p.validate().unwrap();
        }
    }

    #[test]
    fn name_spellings() {
        for spelling in [
            "8b",
            "8B",
            "InternVL3-8B",
            "internvl3_8b",
            "INTERNVL3-8b",
            "InternVL3-8B-hf",
            "InternVL3-8B-Instruct",
            " 8b ",
        ] {
            assert_eq!(preset(spelling).unwrap().name, "8b", "{spelling}");
        }
        assert_eq!(preset("TINY6B").unwrap().name, "tiny6b");
    }

    #[test]
    fn unknown_name_lists_known_ones() {
        let err = preset("InternVL3-9B").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, SpecError::UnknownPreset { .. }));
        assert!(msg.contains("\"InternVL3-9B\""), "{msg}");
        for name in PRESET_NAMES {
            assert!(msg.contains(name), "{msg} lacks {name}");
        }
    }

    #[test]
    fn image_tokens_and_projector_width() {
        let p8 = preset("8b").unwrap();
        assert_eq!(p8.num_image_token(), 256);
        assert_eq!(p8.projector_in(), 4096);
        assert_eq!(p8.vision.seq_len(), 1025);
        assert_eq!(preset("78b").unwrap().projector_in(), 12800);
        let t = preset("tiny").unwrap();
        assert_eq!(t.vision.grid(), 8);
        assert_eq!(t.num_image_token(), 16);
        assert_eq!(t.projector_in(), 256);
    }

    #[test]
    fn head_dims() {
        assert_eq!(preset("8b").unwrap().vision.head_dim(), 64);
        assert_eq!(preset("78b").unwrap().vision.head_dim(), 128);
        let expected =
            [("1b", 64, 7), ("2b", 128, 6), ("8b", 128, 7), ("14b", 128, 5), ("38b", 128, 5), ("78b", 128, 8)];
        for (name, hd, group) in expected {
            let p = preset(name).unwrap();
            assert_eq!(p.llm.head_dim(), hd, "{name}");
            assert_eq!(p.llm.q_per_kv(), group, "{name}");
        }
        assert_eq!(preset("tiny").unwrap().llm.head_dim(), 16);
    }

    /// Counted by hand from the shapes, independently of `param_count`.
    #[test]
    fn tiny_counts_by_hand() {
        let t = preset("tiny").unwrap().param_counts();
        // conv 3*14*14*64+64 = 37696, class 64, pos 65*64 = 4160 → 41920;
        // per layer: qkv 12288+192, proj 4096+64, 2 LayerNorms 256, ls 128,
        // fc1 8192+128, fc2 8192+64 = 33600; two layers.
        assert_eq!(t.vision, 41_920 + 2 * 33_600);
        // LN(256) 512, Linear(256,64) 16448, Linear(64,64) 4160.
        assert_eq!(t.projector, 21_120);
        // embed 32768; per layer q 4160, k 2080, v 2080, o 4096, mlp 24576, norms 128 = 37120;
        // final norm 64; lm_head 32768.
        assert_eq!(t.llm, 32_768 + 2 * 37_120 + 64 + 32_768);
        assert_eq!(t.total, t.vision + t.projector + t.llm);

        // 6B flavour: qkv 12288 (no bias), q/k norm 128, 2 RMSNorms 128 → 33408 per layer.
        let t6 = preset("tiny6b").unwrap().param_counts();
        assert_eq!(t6.vision, 41_920 + 2 * 33_408);
        assert_eq!(t6.llm, t.llm);
    }

    #[test]
    fn vision_towers_match_published_sizes() {
        let v300 = preset("8b").unwrap().vision.param_count() as f64;
        assert!((0.29e9..0.31e9).contains(&v300), "InternViT-300M: {v300}");
        let v6b = preset("78b").unwrap().vision.param_count() as f64;
        assert!((5.4e9..6.0e9).contains(&v6b), "InternViT-6B: {v6b}");
    }

    #[test]
    fn totals_match_published_sizes() {
        let ranges = [
            ("1b", 0.9e9, 1.1e9),
            ("2b", 1.9e9, 2.2e9),
            ("8b", 7.5e9, 8.5e9),
            ("14b", 14.5e9, 15.5e9),
            ("38b", 37.5e9, 39.5e9),
            ("78b", 77e9, 80e9),
        ];
        for (name, lo, hi) in ranges {
            let c = preset(name).unwrap().param_counts();
            let total = c.total as f64;
            assert!((lo..hi).contains(&total), "{name}: {total}");
            assert_eq!(c.total, c.vision + c.projector + c.llm);
        }
    }

    #[test]
    fn checkpoint_bytes_scale_with_dtype() {
        let p = preset("8b").unwrap();
        let bf16 = p.checkpoint_bytes(2);
        assert_eq!(bf16, 2 * p.param_counts().total);
        assert_eq!(p.checkpoint_bytes(4), 2 * bf16);
        assert!((15e9..17e9).contains(&(bf16 as f64)), "{bf16}");
    }

    #[test]
    fn serde_round_trip_uses_hf_names() {
        for p in real_presets() {
            let json = serde_json::to_value(&p).unwrap();
            assert!(json.get("vision_config").is_some());
            assert!(json.get("llm_config").is_some());
            let norm = json["vision_config"]["norm_type"].as_str().unwrap();
            assert!(norm == "layer_norm" || norm == "rms_norm");
            let back: ModelPreset = serde_json::from_value(json).unwrap();
            assert_eq!(back, p);
        }
    }

    /// An excerpt of OpenGVLab/InternVL3-8B's config.json with its extra keys left in.

    #[test]
    fn validate_rejects_broken_configs() {
        type Breaker = Box<dyn Fn(&mut ModelPreset)>;
        let cases: Vec<(&str, Breaker)> = vec![
            ("llm_config.num_attention_heads", Box::new(|p| p.llm.num_key_value_heads = 3)),
            ("vision_config.hidden_size", Box::new(|p| p.vision.num_attention_heads = 5)),
            ("vision_config.num_attention_heads", Box::new(|p| p.vision.num_attention_heads = 0)),
            ("vision_config.image_size", Box::new(|p| p.vision.image_size = 100)),
            ("downsample_ratio", Box::new(|p| p.downsample_ratio = 0.3)),
            ("downsample_ratio", Box::new(|p| p.downsample_ratio = f64::NAN)),
            ("downsample_ratio", Box::new(|p| p.vision.image_size = 14 * 7)),
            ("llm_config.rms_norm_eps", Box::new(|p| p.llm.rms_norm_eps = 0.0)),
            ("vision_config.drop_path_rate", Box::new(|p| p.vision.drop_path_rate = 1.5)),
            ("ps_version", Box::new(|p| p.ps_version = "v3".into())),
            ("template", Box::new(|p| p.template.clear())),
        ];
        for (field, break_it) in cases {
            let mut p = preset("tiny").unwrap();
            break_it(&mut p);
            let err = p.validate().unwrap_err();
            match &err {
                SpecError::InvalidModel { field: f, .. } => assert_eq!(f, field, "{err}"),
                other => panic!("unexpected error {other}"),
            }
        }
    }

    #[test]
    fn degenerate_configs_do_not_panic() {
        let mut p = preset("tiny").unwrap();
        p.vision.num_attention_heads = 0;
        p.vision.patch_size = 0;
        p.llm.num_attention_heads = 0;
        p.llm.num_key_value_heads = 0;
        p.downsample_ratio = -1.0;
        assert_eq!(p.vision.head_dim(), 0);
        assert_eq!(p.vision.grid(), 0);
        assert_eq!(p.llm.head_dim(), 0);
        assert_eq!(p.llm.q_per_kv(), 0);
        assert_eq!(p.projector_in(), 0);
        let _ = p.param_counts();
        assert!(p.validate().is_err());

        // Absurd sizes saturate instead of overflowing.
        let mut huge = preset("tiny").unwrap();
        huge.vision.hidden_size = usize::MAX;
        huge.vision.image_size = usize::MAX;
        huge.vision.patch_size = 1;
        huge.llm.vocab_size = usize::MAX;
        assert_eq!(huge.param_counts().total, u64::MAX);
        assert_eq!(huge.checkpoint_bytes(2), u64::MAX);
        assert_eq!(huge.vision.seq_len(), usize::MAX);
    }
}
