//! config.json written for a layout: the numbers of a [`ModelPreset`] in the schema of the
//! target layout, with the keys of the source config that the numbers do not decide carried
//! over. The converter's exports and the engine's saved `hf_assets/` both come from here, so
//! what [`super::config::parse_config`] reads back is the same model.

use serde_json::{json, Value};

use super::config::HfConfig;
use crate::checkpoint::{DType, HfLayout};
use crate::presets::{ModelPreset, NormType};

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
        Some(s) if s.native() => (s.raw.get("vision_config"), s.raw.get("text_config")),
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
    match &l.rope_scaling {
        Some(r) => {
            text.insert("rope_scaling".into(), json!({"type": r.kind, "rope_type": r.kind, "factor": r.factor}));
        }
        None => {
            text.remove("rope_scaling");
        }
    }

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
        let carried = src_raw.filter(|_| source.is_some_and(|s| s.native()));
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
        let from_original =
            src_raw.filter(|_| source.is_some_and(|s| !s.native())).and_then(|r| r.get(IMG_CONTEXT_KEY));
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
        let carried = src_raw.filter(|_| source.is_some_and(|s| !s.native()));
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
        if let Some(id) = src_raw.filter(|_| source.is_some_and(|s| s.native())).and_then(|r| r.get("image_token_id")) {
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::hf::config::parse_config;
    use crate::preset;

    #[test]
    fn configs_round_trip_in_both_schemas() {
        for name in ["tiny", "tiny6b", "8b", "78b"] {
            let p = preset(name).unwrap();
            for target in [HfLayout::Original, HfLayout::Hf] {
                let json = config_for_layout(&p, None, target, None);
                let back = parse_config(Path::new("config.json"), name, &json.to_string()).unwrap();
                assert_eq!(back.native(), target.is_transformers_native());
                let mut a = back.arch.clone();
                a.vision.drop_path_rate = p.vision.drop_path_rate;
                assert_eq!(a, p, "{name} {target}");
                // And across: -hf config generated from an original one and back.
                let other = if target == HfLayout::Original { HfLayout::Hf } else { HfLayout::Original };
                let json2 = config_for_layout(&p, Some(&back), other, Some(DType::F32));
                let back2 = parse_config(Path::new("config.json"), name, &json2.to_string()).unwrap();
                assert_eq!(back2.arch.llm, p.llm);
                assert_eq!(back2.arch.vision.qkv_bias, p.vision.qkv_bias);
                assert_eq!(json2["torch_dtype"], "float32");
            }
        }
        let p = Path::new("config.json");
        let err = parse_config(p, "x", "{\"model_type\": \"llama\"}").unwrap_err();
        assert!(err.to_string().contains("model_type: is \"llama\", expected \"internvl_chat\""), "{err}");
        let err = parse_config(p, "x", "{\"vision_config\": {}}").unwrap_err();
        assert!(err.to_string().contains("neither model_type nor exactly one of llm_config"), "{err}");
        let mut bad = config_for_layout(&preset("tiny").unwrap(), None, HfLayout::Hf, None);
        bad["text_config"].as_object_mut().unwrap().remove("num_hidden_layers");
        let err = parse_config(p, "x", &bad.to_string()).unwrap_err();
        assert!(err.to_string().contains("text_config.num_hidden_layers: is missing"), "{err}");
    }
}
