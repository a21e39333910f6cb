//! HF checkpoints: reading both InternVL3 layouts, their key maps, and their config.json.
//!
//! Owns: the declarative key map between MM logical keys and the three HF spellings
//! ([`HfLayout::Original`], [`HfLayout::Hf`], [`HfLayout::HfPrefixed`]); config.json in both
//! schemas (original `internvl_chat` with `llm_config`, transformers-native `internvl` with
//! `text_config`) read into one [`ModelPreset`] and written back; opening a checkpoint folder
//! (single file or sharded with `model.safetensors.index.json`), mapping every input shard and
//! checking every header, key, shape and dtype against config.json before anything is written.
//!
//! ```text
//!   MM logical key                         original                                 -hf (legacy spelling)
//!   vision.<body>                          vision_model.<body>                      vision_tower.<renamed body>
//!   vision.encoder.layers.N.attn.qkv.*     vision_model.encoder.layers.N.attn.qkv.* vision_tower.encoder.layer.N.attention.{q,k,v}_proj.*
//!   projector.{norm,linear_1,linear_2}.*   mlp1.{0,1,3}.*                           multi_modal_projector.{layer_norm,linear_1,linear_2}.*
//!   llm.<body>                             language_model.model.<body>              language_model.model.<body>
//!   llm.lm_head.weight                     language_model.lm_head.weight            language_model.lm_head.weight
//! ```
//! The prefixed -hf spelling puts `model.` before `vision_tower`, `multi_modal_projector` and
//! `language_model` (with no inner `.model`), and calls the head `lm_head.weight`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use mm_spec::checkpoint::{fill_template, match_template, PlannedTensor};
use mm_spec::{DType, HfLayout, ModelPreset, NormType};
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde_json::{json, Value};

use crate::error::{ConvertError, Problem};
use crate::write::{map_file, trainable};

pub const CONFIG_FILE: &str = "config.json";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

/// Files copied along with the weights (when present), besides remote-code `*.py` files.
pub const ASSET_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
];

// ---------------------------------------------------------------------------------------------
// Key maps
// ---------------------------------------------------------------------------------------------

/// The ViT renames of the -hf layout (MM/original body → -hf bodies, stacked along dim 0).
const VISION_HF: &[(&str, &[&str])] = &[
    ("embeddings.class_embedding", &["embeddings.cls_token"]),
    ("embeddings.position_embedding", &["embeddings.position_embeddings"]),
    ("embeddings.patch_embedding.weight", &["embeddings.patch_embeddings.projection.weight"]),
    ("embeddings.patch_embedding.bias", &["embeddings.patch_embeddings.projection.bias"]),
    ("encoder.layers.{N}.norm1.weight", &["encoder.layer.{N}.layernorm_before.weight"]),
    ("encoder.layers.{N}.norm1.bias", &["encoder.layer.{N}.layernorm_before.bias"]),
    (
        "encoder.layers.{N}.attn.qkv.weight",
        &[
            "encoder.layer.{N}.attention.q_proj.weight",
            "encoder.layer.{N}.attention.k_proj.weight",
            "encoder.layer.{N}.attention.v_proj.weight",
        ],
    ),
    (
        "encoder.layers.{N}.attn.qkv.bias",
        &[
            "encoder.layer.{N}.attention.q_proj.bias",
            "encoder.layer.{N}.attention.k_proj.bias",
            "encoder.layer.{N}.attention.v_proj.bias",
        ],
    ),
    ("encoder.layers.{N}.attn.q_norm.weight", &["encoder.layer.{N}.attention.q_norm.weight"]),
    ("encoder.layers.{N}.attn.k_norm.weight", &["encoder.layer.{N}.attention.k_norm.weight"]),
    ("encoder.layers.{N}.attn.proj.weight", &["encoder.layer.{N}.attention.projection_layer.weight"]),
    ("encoder.layers.{N}.attn.proj.bias", &["encoder.layer.{N}.attention.projection_layer.bias"]),
    ("encoder.layers.{N}.ls1", &["encoder.layer.{N}.lambda_1"]),
    ("encoder.layers.{N}.ls2", &["encoder.layer.{N}.lambda_2"]),
    ("encoder.layers.{N}.norm2.weight", &["encoder.layer.{N}.layernorm_after.weight"]),
    ("encoder.layers.{N}.norm2.bias", &["encoder.layer.{N}.layernorm_after.bias"]),
    ("encoder.layers.{N}.mlp.fc1.weight", &["encoder.layer.{N}.mlp.fc1.weight"]),
    ("encoder.layers.{N}.mlp.fc1.bias", &["encoder.layer.{N}.mlp.fc1.bias"]),
    ("encoder.layers.{N}.mlp.fc2.weight", &["encoder.layer.{N}.mlp.fc2.weight"]),
    ("encoder.layers.{N}.mlp.fc2.bias", &["encoder.layer.{N}.mlp.fc2.bias"]),
];

/// The projector (MM body, original body, -hf body).
const PROJECTOR: &[(&str, &str, &str)] = &[
    ("norm.weight", "0.weight", "layer_norm.weight"),
    ("norm.bias", "0.bias", "layer_norm.bias"),
    ("linear_1.weight", "1.weight", "linear_1.weight"),
    ("linear_1.bias", "1.bias", "linear_1.bias"),
    ("linear_2.weight", "3.weight", "linear_2.weight"),
    ("linear_2.bias", "3.bias", "linear_2.bias"),
];

struct Prefixes {
    vision: &'static str,
    projector: &'static str,
    llm: &'static str,
    lm_head: &'static str,
}

fn prefixes(layout: HfLayout) -> Prefixes {
    match layout {
        HfLayout::Original => Prefixes {
            vision: "vision_model.",
            projector: "mlp1.",
            llm: "language_model.model.",
            lm_head: "language_model.lm_head.weight",
        },
        HfLayout::Hf => Prefixes {
            vision: "vision_tower.",
            projector: "multi_modal_projector.",
            llm: "language_model.model.",
            lm_head: "language_model.lm_head.weight",
        },
        HfLayout::HfPrefixed => Prefixes {
            vision: "model.vision_tower.",
            projector: "model.multi_modal_projector.",
            llm: "model.language_model.",
            lm_head: "lm_head.weight",
        },
    }
}

/// The HF key(s) of an MM logical key; several keys are stacked along dim 0 (the -hf q/k/v of
/// the fused ViT qkv). `None` for a key outside the MM key table's name space.
pub fn hf_keys(mm_key: &str, layout: HfLayout) -> Option<Vec<String>> {
    let p = prefixes(layout);
    if mm_key == "llm.lm_head.weight" {
        return Some(vec![p.lm_head.to_string()]);
    }
    if let Some(body) = mm_key.strip_prefix("llm.") {
        return Some(vec![format!("{}{body}", p.llm)]);
    }
    if let Some(body) = mm_key.strip_prefix("projector.") {
        let (_, orig, hf) = PROJECTOR.iter().find(|(mm, _, _)| *mm == body)?;
        let body = if layout == HfLayout::Original { orig } else { hf };
        return Some(vec![format!("{}{body}", p.projector)]);
    }
    let body = mm_key.strip_prefix("vision.")?;
    if layout == HfLayout::Original {
        return Some(vec![format!("{}{body}", p.vision)]);
    }
    VISION_HF.iter().find_map(|(mm, hf)| {
        let layer = match_template(mm, body)?;
        Some(hf.iter().map(|t| format!("{}{}", p.vision, fill_template(t, layer.unwrap_or(0)))).collect())
    })
}

/// Which layout a key set uses, from its vision-tower and projector keys.
pub fn detect_layout<'a>(keys: impl Iterator<Item = &'a str>) -> Result<HfLayout, String> {
    let mut found = BTreeSet::new();
    for k in keys {
        if k.starts_with("vision_model.") || k.starts_with("mlp1.") {
            found.insert(0);
        } else if k.starts_with("vision_tower.") || k.starts_with("multi_modal_projector.") {
            found.insert(1);
        } else if k.starts_with("model.vision_tower.")
            || k.starts_with("model.multi_modal_projector.")
            || k.starts_with("model.language_model.")
        {
            found.insert(2);
        }
    }
    let names = ["original (vision_model.*, mlp1.*)", "-hf (vision_tower.*)", "-hf prefixed (model.vision_tower.*)"];
    match found.iter().collect::<Vec<_>>()[..] {
        [&0] => Ok(HfLayout::Original),
        [&1] => Ok(HfLayout::Hf),
        [&2] => Ok(HfLayout::HfPrefixed),
        [] => Err("no InternVL3 vision tower or projector keys: expected vision_model.* and mlp1.* (original \
                   layout) or vision_tower.* and multi_modal_projector.* (-hf layout, optionally with a model. \
                   prefix); is this an InternVL3 checkpoint?"
            .to_string()),
        ref many => Err(format!(
            "the keys mix layouts: {}; a checkpoint must use one layout throughout",
            many.iter().map(|&&i| names[i]).collect::<Vec<_>>().join(" and ")
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------------

/// A checkpoint's config.json: the architecture and the raw JSON (kept for export).
#[derive(Debug, Clone)]
pub struct HfConfig {
    pub arch: ModelPreset,
    /// `text_config` schema (transformers-native) rather than `llm_config` (original).
    pub native: bool,
    pub raw: Value,
}

/// Reads `<dir>/config.json` in either schema.
pub fn read_config(dir: &Path) -> Result<HfConfig, ConvertError> {
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        return Err(ConvertError::Config {
            path,
            message: "not found: an HF checkpoint folder needs its config.json (the architecture is read from \
                      it); copy it from the model's hub page next to the weights"
                .into(),
        });
    }
    let text = fs::read_to_string(&path).map_err(|e| ConvertError::io("read", &path, e))?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    parse_config(&name, &text).map_err(|message| ConvertError::Config { path, message })
}

/// Parses config.json text in either schema.
pub fn parse_config(name: &str, text: &str) -> Result<HfConfig, String> {
    let raw: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    if raw.get("llm_config").is_some() {
        let arch = ModelPreset::from_config_json(name, text).map_err(|e| e.to_string())?;
        return Ok(HfConfig { arch, native: false, raw });
    }
    if raw.get("text_config").is_some() {
        let arch = native_to_preset(name, &raw)?;
        return Ok(HfConfig { arch, native: true, raw });
    }
    Err("has neither llm_config (original InternVL config) nor text_config (transformers InternVLConfig): \
         expected the config.json of an InternVL3 checkpoint"
        .to_string())
}

fn field<'a>(obj: &'a Value, section: &str, key: &str) -> Result<&'a Value, String> {
    obj.get(key).ok_or_else(|| format!("{section}.{key} is missing: expected it in a transformers InternVLConfig"))
}

fn as_usize(v: &Value, what: &str) -> Result<usize, String> {
    // image_size / patch_size may be [h, w]; InternVL3 tiles are square.
    let v = match v.as_array() {
        Some(a) => match a.as_slice() {
            [h, w] if h == w => h,
            _ => return Err(format!("{what} is {v}: expected a number or a square [n, n]")),
        },
        None => v,
    };
    v.as_u64().map(|n| n as usize).ok_or_else(|| format!("{what} is {v}: expected a non-negative integer"))
}

fn as_f64_or(obj: &Value, key: &str, default: f64) -> f64 {
    obj.get(key).and_then(Value::as_f64).unwrap_or(default)
}

/// The transformers-native schema (`model_type: internvl`) as a [`ModelPreset`].
fn native_to_preset(name: &str, raw: &Value) -> Result<ModelPreset, String> {
    let vc = field(raw, "", "vision_config")?;
    let tc = field(raw, "", "text_config")?;
    let vu = |k: &str| field(vc, "vision_config", k).and_then(|v| as_usize(v, &format!("vision_config.{k}")));
    let tu = |k: &str| field(tc, "text_config", k).and_then(|v| as_usize(v, &format!("text_config.{k}")));
    let norm_type = match vc.get("norm_type").and_then(Value::as_str).unwrap_or("layer_norm") {
        "layer_norm" => NormType::LayerNorm,
        "rms_norm" => NormType::RmsNorm,
        other => return Err(format!("vision_config.norm_type is {other:?}: expected \"layer_norm\" or \"rms_norm\"")),
    };
    let bool_or = |obj: &Value, k: &str, d: bool| obj.get(k).and_then(Value::as_bool).unwrap_or(d);
    let preset = ModelPreset {
        name: name.to_string(),
        vision: mm_spec::VisionConfig {
            num_hidden_layers: vu("num_hidden_layers")?,
            hidden_size: vu("hidden_size")?,
            num_attention_heads: vu("num_attention_heads")?,
            intermediate_size: vu("intermediate_size")?,
            norm_type,
            qkv_bias: bool_or(vc, "attention_bias", false),
            qk_normalization: bool_or(vc, "use_qk_norm", false),
            layer_norm_eps: as_f64_or(vc, "layer_norm_eps", 1e-6),
            image_size: vu("image_size")?,
            patch_size: vu("patch_size")?,
            num_channels: vc
                .get("num_channels")
                .map(|v| as_usize(v, "vision_config.num_channels"))
                .transpose()?
                .unwrap_or(3),
            drop_path_rate: as_f64_or(vc, "drop_path_rate", 0.0),
            initializer_factor: vc
                .get("layer_scale_init_value")
                .or_else(|| vc.get("initializer_factor"))
                .and_then(Value::as_f64)
                .unwrap_or(0.1),
        },
        llm: mm_spec::LlmConfig {
            num_hidden_layers: tu("num_hidden_layers")?,
            hidden_size: tu("hidden_size")?,
            num_attention_heads: tu("num_attention_heads")?,
            num_key_value_heads: tu("num_key_value_heads")?,
            intermediate_size: tu("intermediate_size")?,
            rms_norm_eps: as_f64_or(tc, "rms_norm_eps", 1e-6),
            rope_theta: as_f64_or(tc, "rope_theta", 10_000.0),
            vocab_size: tu("vocab_size")?,
            max_position_embeddings: tc
                .get("max_position_embeddings")
                .map(|v| as_usize(v, "text_config.max_position_embeddings"))
                .transpose()?
                .unwrap_or(32_768),
            tie_word_embeddings: bool_or(tc, "tie_word_embeddings", bool_or(raw, "tie_word_embeddings", false)),
        },
        downsample_ratio: as_f64_or(raw, "downsample_ratio", 0.5),
        template: raw.get("template").and_then(Value::as_str).unwrap_or("internvl2_5").to_string(),
        ps_version: raw.get("ps_version").and_then(Value::as_str).unwrap_or("v2").to_string(),
    };
    preset.validate().map_err(|e| e.to_string())?;
    Ok(preset)
}

/// Keys of a source sub-config that describe the other schema or nothing the target needs.
const DROP_KEYS: &[&str] = &["_name_or_path", "auto_map", "architectures", "model_type", "transformers_version"];

fn object_without(v: Option<&Value>, drop: &[&str]) -> serde_json::Map<String, Value> {
    let mut m = v.and_then(Value::as_object).cloned().unwrap_or_default();
    for k in drop {
        m.remove(*k);
    }
    m
}

/// The `<IMG_CONTEXT>` id of InternVL3's tokenizer (transformers' InternVL3-*-hf configs).
pub const INTERNVL3_IMG_CONTEXT_ID: u64 = 151_667;
/// Where an original-layout config.json written here keeps the image token id of a
/// transformers-layout source (the attribute name OpenGVLab's model code uses at run time).
pub const IMG_CONTEXT_KEY: &str = "img_context_token_id";

/// config.json for `arch` in the schema of `target`. Keys of `source` (the config the weights
/// came with, possibly in the other schema) that the numbers do not decide are carried over.
pub fn config_for_layout(
    arch: &ModelPreset,
    source: Option<&HfConfig>,
    target: HfLayout,
    dtype: Option<DType>,
) -> Value {
    let v = &arch.vision;
    let l = &arch.llm;
    let torch_dtype = dtype.map_or("bfloat16", |d| d.torch_name());
    let src_raw = source.map(|s| &s.raw);
    let (src_vision, src_text) = match source {
        Some(s) if s.native => (s.raw.get("vision_config"), s.raw.get("text_config")),
        Some(s) => (s.raw.get("vision_config"), s.raw.get("llm_config")),
        None => (None, None),
    };
    let norm = match v.norm_type {
        NormType::LayerNorm => "layer_norm",
        NormType::RmsNorm => "rms_norm",
    };
    let mut text = object_without(src_text, DROP_KEYS);
    for (k, val) in [
        ("model_type", json!("qwen2")),
        ("architectures", json!(["Qwen2ForCausalLM"])),
        ("hidden_size", json!(l.hidden_size)),
        ("intermediate_size", json!(l.intermediate_size)),
        ("num_hidden_layers", json!(l.num_hidden_layers)),
        ("num_attention_heads", json!(l.num_attention_heads)),
        ("num_key_value_heads", json!(l.num_key_value_heads)),
        ("rms_norm_eps", json!(l.rms_norm_eps)),
        ("rope_theta", json!(l.rope_theta)),
        ("vocab_size", json!(l.vocab_size)),
        ("max_position_embeddings", json!(l.max_position_embeddings)),
        ("tie_word_embeddings", json!(l.tie_word_embeddings)),
        ("torch_dtype", json!(torch_dtype)),
    ] {
        text.insert(k.into(), val);
    }
    text.entry("hidden_act").or_insert(json!("silu"));

    let mut vision = object_without(
        src_vision,
        &[DROP_KEYS, &["qkv_bias", "qk_normalization", "attention_bias", "use_qk_norm"]].concat(),
    );
    for (k, val) in [
        ("hidden_size", json!(v.hidden_size)),
        ("num_attention_heads", json!(v.num_attention_heads)),
        ("intermediate_size", json!(v.intermediate_size)),
        ("num_hidden_layers", json!(v.num_hidden_layers)),
        ("norm_type", json!(norm)),
        ("layer_norm_eps", json!(v.layer_norm_eps)),
        ("num_channels", json!(v.num_channels)),
        ("torch_dtype", json!(torch_dtype)),
    ] {
        vision.insert(k.into(), val);
    }
    vision.entry("hidden_act").or_insert(json!("gelu"));

    let mut top = serde_json::Map::new();
    if target.is_transformers_native() {
        vision.remove("initializer_factor");
        vision.remove("drop_path_rate");
        for (k, val) in [
            ("model_type", json!("internvl_vision")),
            ("attention_bias", json!(v.qkv_bias)),
            ("use_qk_norm", json!(v.qk_normalization)),
            ("image_size", json!([v.image_size, v.image_size])),
            ("patch_size", json!([v.patch_size, v.patch_size])),
            ("layer_scale_init_value", json!(v.initializer_factor)),
            ("use_absolute_position_embeddings", json!(true)),
            // InternVL3-*-hf: with `false` transformers adds a final LayerNorm that InternViT
            // does not have (and reports its weights missing).
            ("use_mean_pooling", json!(true)),
        ] {
            vision.insert(k.into(), val);
        }
        let carried = src_raw.filter(|_| source.is_some_and(|s| s.native));
        if let Some(obj) = carried.and_then(Value::as_object) {
            top.extend(obj.clone());
        }
        for (k, val) in [
            ("architectures", json!(["InternVLForConditionalGeneration"])),
            ("model_type", json!("internvl")),
            ("downsample_ratio", json!(arch.downsample_ratio)),
            ("vision_config", Value::Object(vision)),
            ("text_config", Value::Object(text)),
            ("torch_dtype", json!(torch_dtype)),
        ] {
            top.insert(k.into(), val);
        }
        // OpenGVLab's config has no image token id (its code asks the tokenizer); one exported
        // from a transformers-layout model carries it as `img_context_token_id`.
        let from_original = src_raw.filter(|_| source.is_some_and(|s| !s.native)).and_then(|r| r.get(IMG_CONTEXT_KEY));
        top.entry("image_token_id")
            .or_insert_with(|| from_original.cloned().unwrap_or(json!(INTERNVL3_IMG_CONTEXT_ID)));
        top.entry("projector_hidden_act").or_insert(json!("gelu"));
        top.entry("vision_feature_layer").or_insert(json!(-1));
        top.entry("vision_feature_select_strategy").or_insert(json!("default"));
    } else {
        vision.remove("layer_scale_init_value");
        vision.remove("use_absolute_position_embeddings");
        vision.remove("use_mean_pooling");
        for (k, val) in [
            ("model_type", json!("intern_vit_6b")),
            ("architectures", json!(["InternVisionModel"])),
            ("qkv_bias", json!(v.qkv_bias)),
            ("qk_normalization", json!(v.qk_normalization)),
            ("image_size", json!(v.image_size)),
            ("patch_size", json!(v.patch_size)),
            ("initializer_factor", json!(v.initializer_factor)),
            ("drop_path_rate", json!(v.drop_path_rate)),
        ] {
            vision.insert(k.into(), val);
        }
        let carried = src_raw.filter(|_| source.is_some_and(|s| !s.native));
        if let Some(obj) = carried.and_then(Value::as_object) {
            top.extend(obj.clone());
        }
        for (k, val) in [
            ("architectures", json!(["InternVLChatModel"])),
            ("model_type", json!("internvl_chat")),
            ("downsample_ratio", json!(arch.downsample_ratio)),
            ("template", json!(arch.template)),
            ("ps_version", json!(arch.ps_version)),
            ("vision_config", Value::Object(vision)),
            ("llm_config", Value::Object(text)),
            ("torch_dtype", json!(torch_dtype)),
        ] {
            top.insert(k.into(), val);
        }
        if let Some(id) = src_raw.filter(|_| source.is_some_and(|s| s.native)).and_then(|r| r.get("image_token_id")) {
            top.insert(IMG_CONTEXT_KEY.into(), id.clone());
        }
        top.entry("select_layer").or_insert(json!(-1));
        top.entry("force_image_size").or_insert(json!(v.image_size));
        top.entry("dynamic_image_size").or_insert(json!(true));
        top.entry("use_thumbnail").or_insert(json!(true));
        top.entry("min_dynamic_patch").or_insert(json!(1));
        top.entry("max_dynamic_patch").or_insert(json!(12));
    }
    Value::Object(top)
}

/// Sets every `torch_dtype` of a config (top level and sub-configs) to `dtype`.
pub fn set_torch_dtype(config: &mut Value, dtype: DType) {
    if let Some(obj) = config.as_object_mut() {
        if obj.contains_key("torch_dtype") {
            obj.insert("torch_dtype".into(), json!(dtype.torch_name()));
        }
        for sub in ["vision_config", "llm_config", "text_config"] {
            if let Some(s) = obj.get_mut(sub) {
                set_torch_dtype(s, dtype);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// safetensors files
// ---------------------------------------------------------------------------------------------

/// Where one tensor's bytes are in a mapped file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

/// A mapped safetensors file with its parsed header.
pub struct MappedFile {
    pub path: PathBuf,
    pub map: Mmap,
    pub tensors: BTreeMap<String, TensorMeta>,
}

impl MappedFile {
    /// Maps and parses `path`; a damaged file is a [`Problem::Corrupt`].
    pub fn open(path: &Path) -> Result<Result<MappedFile, Problem>, ConvertError> {
        let map = map_file(path)?;
        let parsed = SafeTensors::read_metadata(&map);
        let (n, meta) = match parsed {
            Ok(x) => x,
            Err(e) => return Ok(Err(Problem::Corrupt { file: path.to_path_buf(), reason: describe(&e, map.len()) })),
        };
        let data_start = 8 + n;
        let tensors = meta
            .tensors()
            .into_iter()
            .map(|(k, info)| {
                let m = TensorMeta {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                };
                (k, m)
            })
            .collect();
        Ok(Ok(MappedFile { path: path.to_path_buf(), map, tensors }))
    }

    pub fn bytes(&self, m: &TensorMeta) -> &[u8] {
        &self.map[m.start..m.end]
    }
}

/// What a safetensors parse error means for the user.
fn describe(e: &SafeTensorError, file_len: usize) -> String {
    match e {
        SafeTensorError::HeaderTooSmall => {
            format!("the file has {file_len} bytes, fewer than the 8-byte header length")
        }
        SafeTensorError::InvalidHeaderLength => {
            format!("the header length field points past the end of the file ({file_len} bytes)")
        }
        SafeTensorError::HeaderTooLarge => "the header length field is larger than 100 MB".into(),
        SafeTensorError::InvalidHeader(_) | SafeTensorError::InvalidHeaderStart => {
            "the header is not UTF-8 JSON".into()
        }
        SafeTensorError::InvalidHeaderDeserialization(err) => format!("the header is not safetensors JSON ({err})"),
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "the tensor data declared in the header does not end where the file ends ({file_len} bytes): \
             offsets past the end, or bytes missing or appended"
        ),
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor {name:?} has data offsets that overlap, leave a gap or run backwards")
        }
        SafeTensorError::TensorInvalidInfo => "a tensor's byte range does not match its shape and dtype".into(),
        SafeTensorError::ValidationOverflow => "a tensor's shape overflows".into(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// The checkpoint folder
// ---------------------------------------------------------------------------------------------

/// An opened HF checkpoint: config, mapped shards, the key → file map and the key layout.
pub struct HfCheckpoint {
    pub dir: PathBuf,
    pub config: HfConfig,
    pub files: Vec<MappedFile>,
    /// Key → index into `files`.
    pub keys: BTreeMap<String, usize>,
    pub layout: HfLayout,
}

/// One HF tensor feeding (part of) a logical tensor.
#[derive(Debug, Clone)]
pub struct SourcePart {
    pub file: usize,
    pub key: String,
    pub meta: TensorMeta,
    pub dtype: DType,
}

impl HfCheckpoint {
    /// Reads config.json, maps every shard and parses every header; reports every missing or
    /// damaged file and index inconsistency at once.
    pub fn open(dir: &Path) -> Result<HfCheckpoint, ConvertError> {
        if !dir.is_dir() {
            return Err(ConvertError::Config {
                path: dir.to_path_buf(),
                message: "not a folder: --hf-dir must point at a downloaded HF checkpoint folder".into(),
            });
        }
        let config = read_config(dir)?;
        let what = format!("HF checkpoint {}", dir.display());
        let mut problems = Vec::new();
        let index_path = dir.join(INDEX_FILE);
        // (file name, keys the index assigns to it; None without an index)
        let mut wanted: Vec<(String, Option<Vec<String>>)> = Vec::new();
        if index_path.is_file() {
            let text = fs::read_to_string(&index_path).map_err(|e| ConvertError::io("read", &index_path, e))?;
            let index: Value = serde_json::from_str(&text).map_err(|e| ConvertError::Config {
                path: index_path.clone(),
                message: format!("not valid JSON: {e}"),
            })?;
            let Some(map) = index.get("weight_map").and_then(Value::as_object) else {
                return Err(ConvertError::Config {
                    path: index_path,
                    message: "has no \"weight_map\" object mapping tensor names to shard files".into(),
                });
            };
            let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (k, v) in map {
                let Some(f) = v.as_str() else {
                    return Err(ConvertError::Config {
                        path: index_path,
                        message: format!("weight_map[{k:?}] is {v}, expected a file name"),
                    });
                };
                by_file.entry(f.to_string()).or_default().push(k.clone());
            }
            wanted = by_file.into_iter().map(|(f, keys)| (f, Some(keys))).collect();
        } else if dir.join(SINGLE_FILE).is_file() {
            wanted.push((SINGLE_FILE.to_string(), None));
        } else {
            let mut others: Vec<String> = fs::read_dir(dir)
                .map_err(|e| ConvertError::io("list", dir, e))?
                .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .filter(|n| n.ends_with(".safetensors") || n.ends_with(".bin"))
                .collect();
            others.sort();
            let hint = if others.iter().any(|n| n.ends_with(".bin")) {
                "; pytorch .bin checkpoints are not supported: save them as safetensors first \
                 (model.save_pretrained(dir, safe_serialization=True))"
            } else {
                ""
            };
            return Err(ConvertError::Config {
                path: dir.to_path_buf(),
                message: format!(
                    "holds neither {SINGLE_FILE} nor {INDEX_FILE} (weight files found: {}){hint}",
                    if others.is_empty() { "none".to_string() } else { others.join(", ") }
                ),
            });
        }

        let mut files = Vec::new();
        let mut keys: BTreeMap<String, usize> = BTreeMap::new();
        for (name, listed) in &wanted {
            let path = dir.join(name);
            if !path.is_file() {
                let listed = listed.clone().unwrap_or_default();
                problems.push(Problem::MissingShard {
                    index: index_path.clone(),
                    file: name.clone(),
                    keys: listed.len(),
                    example: listed.first().cloned().unwrap_or_default(),
                });
                continue;
            }
            let file = match MappedFile::open(&path)? {
                Ok(f) => f,
                Err(p) => {
                    problems.push(p);
                    continue;
                }
            };
            let idx = files.len();
            for k in file.tensors.keys() {
                if let Some(prev) = keys.insert(k.clone(), idx) {
                    let prev_name: &MappedFile = &files[prev];
                    problems.push(Problem::IndexMismatch {
                        index: index_path.clone(),
                        key: k.clone(),
                        detail: format!("stored in both {} and {}", prev_name.path.display(), path.display()),
                    });
                }
            }
            if let Some(listed) = listed {
                let listed: BTreeSet<&String> = listed.iter().collect();
                for k in &listed {
                    if !file.tensors.contains_key(*k) {
                        problems.push(Problem::IndexMismatch {
                            index: index_path.clone(),
                            key: (*k).clone(),
                            detail: format!("the index puts it in {name}, which does not contain it"),
                        });
                    }
                }
                for k in file.tensors.keys() {
                    if !listed.contains(k) {
                        problems.push(Problem::IndexMismatch {
                            index: index_path.clone(),
                            key: k.clone(),
                            detail: format!("{name} contains it but the index does not list it there"),
                        });
                    }
                }
            }
            files.push(file);
        }
        if !problems.is_empty() {
            return Err(ConvertError::Invalid { what, problems });
        }
        let layout = detect_layout(keys.keys().map(String::as_str))
            .map_err(|message| ConvertError::Config { path: dir.to_path_buf(), message })?;
        if layout.is_transformers_native() != config.native {
            tracing::warn!(
                "{}: config.json uses the {} schema but the tensors use the {} layout",
                dir.display(),
                if config.native { "transformers-native (text_config)" } else { "original (llm_config)" },
                layout
            );
        }
        Ok(HfCheckpoint { dir: dir.to_path_buf(), config, files, keys, layout })
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().flat_map(|f| f.tensors.values()).map(|m| (m.end - m.start) as u64).sum()
    }

    /// The source parts of every planned tensor; checks the key set, every shape against
    /// config.json and every dtype, and reports all problems at once.
    pub fn map_sources(
        &self,
        plan: &[PlannedTensor],
        convert_to: Option<DType>,
    ) -> Result<Vec<Vec<SourcePart>>, ConvertError> {
        let layout = self.layout;
        let mut problems = Vec::new();
        let mut claimed: BTreeSet<String> = BTreeSet::new();
        let mut sources = Vec::with_capacity(plan.len());
        for t in plan {
            let Some(names) = hf_keys(&t.key, layout) else {
                return Err(ConvertError::Config {
                    path: self.dir.clone(),
                    message: format!("internal error: no {layout} key for {:?}", t.key),
                });
            };
            let n = names.len();
            let mut expected = t.shape.clone();
            if let Some(first) = expected.first_mut() {
                *first /= n;
            }
            let mut parts = Vec::new();
            for name in names {
                let found = self.keys.get(&name).and_then(|&f| self.files[f].tensors.get(&name).map(|m| (f, m)));
                let Some((file, meta)) = found else {
                    problems.push(Problem::MissingKey { key: name, layout: layout.to_string() });
                    continue;
                };
                claimed.insert(name.clone());
                let path = self.files[file].path.clone();
                if meta.shape != expected {
                    problems.push(Problem::Shape {
                        file: path.clone(),
                        key: name.clone(),
                        found: meta.shape.clone(),
                        expected: expected.clone(),
                        source: format!("config.json (logical tensor {})", t.key),
                    });
                }
                match trainable(meta.dtype) {
                    Some(dtype) => parts.push(SourcePart { file, key: name, meta: meta.clone(), dtype }),
                    None => problems.push(Problem::Dtype { file: path, key: name, found: meta.dtype.to_string() }),
                }
            }
            if parts.len() > 1 && convert_to.is_none() && parts.iter().any(|p| p.dtype != parts[0].dtype) {
                problems.push(Problem::MixedDtypes {
                    key: t.key.clone(),
                    found: parts.iter().map(|p| p.dtype.to_string()).collect(),
                });
            }
            sources.push(parts);
        }
        for (k, &f) in &self.keys {
            if !claimed.contains(k) {
                problems.push(Problem::UnknownKey {
                    file: self.files[f].path.clone(),
                    key: k.clone(),
                    layout: layout.to_string(),
                });
            }
        }
        if !problems.is_empty() {
            // Grouped: missing keys, then unknown ones, then shapes and dtypes.
            problems.sort_by_key(|p| match p {
                Problem::UnknownKey { .. } => 1,
                Problem::MissingKey { .. } => 0,
                _ => 2,
            });
            return Err(ConvertError::Invalid { what: format!("HF checkpoint {}", self.dir.display()), problems });
        }
        Ok(sources)
    }

    /// Asset files (config, tokenizer, remote code) present in the folder.
    pub fn asset_names(&self) -> Vec<String> {
        asset_names(&self.dir)
    }
}

/// The [`ASSET_FILES`] and `*.py` files present in `dir`, sorted.
pub fn asset_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = ASSET_FILES.iter().filter(|n| dir.join(n).is_file()).map(|n| n.to_string()).collect();
    if let Ok(entries) = fs::read_dir(dir) {
        let mut py: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".py"))
            .collect();
        py.sort();
        names.extend(py);
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use mm_spec::checkpoint::logical_tensors;
    use mm_spec::preset;

    fn hf_key_set(p: &ModelPreset, layout: HfLayout) -> Vec<String> {
        logical_tensors(p).iter().flat_map(|t| hf_keys(&t.key, layout).unwrap()).collect()
    }

    /// Contract: the HF key sets of tiny (one ViT layer and one LLM layer shown) in each layout.
    #[test]
    fn hf_key_sets_are_pinned() {
        let mut p = preset("tiny").unwrap();
        p.vision.num_hidden_layers = 1;
        p.llm.num_hidden_layers = 1;
        let llm = |pre: &str, head: &str| -> Vec<String> {
            let mut v = vec![format!("{pre}embed_tokens.weight")];
            for b in [
                "input_layernorm.weight",
                "self_attn.q_proj.weight",
                "self_attn.q_proj.bias",
                "self_attn.k_proj.weight",
                "self_attn.k_proj.bias",
                "self_attn.v_proj.weight",
                "self_attn.v_proj.bias",
                "self_attn.o_proj.weight",
                "post_attention_layernorm.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "mlp.down_proj.weight",
            ] {
                v.push(format!("{pre}layers.0.{b}"));
            }
            v.push(format!("{pre}norm.weight"));
            v.push(head.to_string());
            v
        };
        let original: Vec<String> = [
            "vision_model.embeddings.class_embedding",
            "vision_model.embeddings.position_embedding",
            "vision_model.embeddings.patch_embedding.weight",
            "vision_model.embeddings.patch_embedding.bias",
            "vision_model.encoder.layers.0.norm1.weight",
            "vision_model.encoder.layers.0.norm1.bias",
            "vision_model.encoder.layers.0.attn.qkv.weight",
            "vision_model.encoder.layers.0.attn.qkv.bias",
            "vision_model.encoder.layers.0.attn.proj.weight",
            "vision_model.encoder.layers.0.attn.proj.bias",
            "vision_model.encoder.layers.0.ls1",
            "vision_model.encoder.layers.0.norm2.weight",
            "vision_model.encoder.layers.0.norm2.bias",
            "vision_model.encoder.layers.0.mlp.fc1.weight",
            "vision_model.encoder.layers.0.mlp.fc1.bias",
            "vision_model.encoder.layers.0.mlp.fc2.weight",
            "vision_model.encoder.layers.0.mlp.fc2.bias",
            "vision_model.encoder.layers.0.ls2",
            "mlp1.0.weight",
            "mlp1.0.bias",
            "mlp1.1.weight",
            "mlp1.1.bias",
            "mlp1.3.weight",
            "mlp1.3.bias",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(llm("language_model.model.", "language_model.lm_head.weight"))
        .collect();
        assert_eq!(hf_key_set(&p, HfLayout::Original), original);

        let hf_vision = |pre: &str| -> Vec<String> {
            [
                "embeddings.cls_token",
                "embeddings.position_embeddings",
                "embeddings.patch_embeddings.projection.weight",
                "embeddings.patch_embeddings.projection.bias",
                "encoder.layer.0.layernorm_before.weight",
                "encoder.layer.0.layernorm_before.bias",
                "encoder.layer.0.attention.q_proj.weight",
                "encoder.layer.0.attention.k_proj.weight",
                "encoder.layer.0.attention.v_proj.weight",
                "encoder.layer.0.attention.q_proj.bias",
                "encoder.layer.0.attention.k_proj.bias",
                "encoder.layer.0.attention.v_proj.bias",
                "encoder.layer.0.attention.projection_layer.weight",
                "encoder.layer.0.attention.projection_layer.bias",
                "encoder.layer.0.lambda_1",
                "encoder.layer.0.layernorm_after.weight",
                "encoder.layer.0.layernorm_after.bias",
                "encoder.layer.0.mlp.fc1.weight",
                "encoder.layer.0.mlp.fc1.bias",
                "encoder.layer.0.mlp.fc2.weight",
                "encoder.layer.0.mlp.fc2.bias",
                "encoder.layer.0.lambda_2",
            ]
            .iter()
            .map(|b| format!("{pre}{b}"))
            .collect()
        };
        let projector = |pre: &str| -> Vec<String> {
            [
                "layer_norm.weight",
                "layer_norm.bias",
                "linear_1.weight",
                "linear_1.bias",
                "linear_2.weight",
                "linear_2.bias",
            ]
            .iter()
            .map(|b| format!("{pre}{b}"))
            .collect()
        };
        let hf: Vec<String> = hf_vision("vision_tower.")
            .into_iter()
            .chain(projector("multi_modal_projector."))
            .chain(llm("language_model.model.", "language_model.lm_head.weight"))
            .collect();
        assert_eq!(hf_key_set(&p, HfLayout::Hf), hf);
        let prefixed: Vec<String> = hf_vision("model.vision_tower.")
            .into_iter()
            .chain(projector("model.multi_modal_projector."))
            .chain(llm("model.language_model.", "lm_head.weight"))
            .collect();
        assert_eq!(hf_key_set(&p, HfLayout::HfPrefixed), prefixed);

        // 6B flavour: q_norm/k_norm keep their names, no qkv bias, no norm biases.
        let t6 = preset("tiny6b").unwrap();
        let keys = hf_key_set(&t6, HfLayout::Hf);
        assert!(keys.contains(&"vision_tower.encoder.layer.1.attention.q_norm.weight".to_string()));
        assert!(!keys.iter().any(|k| k.ends_with("attention.q_proj.bias") || k.ends_with("layernorm_before.bias")));
    }

    #[test]
    fn layout_detection() {
        let p = preset("tiny").unwrap();
        for layout in [HfLayout::Original, HfLayout::Hf, HfLayout::HfPrefixed] {
            let keys = hf_key_set(&p, layout);
            assert_eq!(detect_layout(keys.iter().map(String::as_str)), Ok(layout));
        }
        let mixed = ["vision_model.x", "vision_tower.y"];
        assert!(detect_layout(mixed.into_iter()).unwrap_err().contains("mix layouts"));
        assert!(detect_layout(["language_model.model.norm.weight"].into_iter()).unwrap_err().contains("InternVL3"));
    }

    #[test]
    fn configs_round_trip_in_both_schemas() {
        for name in ["tiny", "tiny6b", "8b", "78b"] {
            let p = preset(name).unwrap();
            for target in [HfLayout::Original, HfLayout::Hf] {
                let json = config_for_layout(&p, None, target, None);
                let back = parse_config(name, &json.to_string()).unwrap();
                assert_eq!(back.native, target.is_transformers_native());
                let mut a = back.arch.clone();
                a.vision.drop_path_rate = p.vision.drop_path_rate;
                assert_eq!(a, p, "{name} {target}");
                // And across: -hf config generated from an original one and back.
                let other = if target == HfLayout::Original { HfLayout::Hf } else { HfLayout::Original };
                let json2 = config_for_layout(&p, Some(&back), other, Some(DType::F32));
                let back2 = parse_config(name, &json2.to_string()).unwrap();
                assert_eq!(back2.arch.llm, p.llm);
                assert_eq!(back2.arch.vision.qkv_bias, p.vision.qkv_bias);
                assert_eq!(json2["torch_dtype"], "float32");
            }
        }
        let err = parse_config("x", "{\"model_type\": \"llama\"}").unwrap_err();
        assert!(err.contains("neither llm_config"), "{err}");
        let mut bad = config_for_layout(&preset("tiny").unwrap(), None, HfLayout::Hf, None);
        bad["text_config"].as_object_mut().unwrap().remove("num_key_value_heads");
        let err = parse_config("x", &bad.to_string()).unwrap_err();
        assert!(err.contains("text_config.num_key_value_heads is missing"), "{err}");
    }
}
