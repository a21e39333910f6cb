//! config.json of an InternVL3 checkpoint, in both schemas, read into ONE [`ModelPreset`].
//!
//! The converter, the engine and the launcher all read a checkpoint's architecture here, so one
//! file can never give two models. Two schemas exist:
//!
//! - [`Schema::Original`]: OpenGVLab's `InternVLChatConfig` (`model_type: internvl_chat`,
//!   `llm_config` + `vision_config`), what InternVL3-8B on the hub and MindSpeed-MM use;
//! - [`Schema::Transformers`]: transformers' `InternVLConfig` (`model_type: internvl`,
//!   `text_config` + `vision_config`), the `-hf` checkpoints.
//!
//! Rules, the same for both:
//! - the numbers that size the model are required (a config without them is truncated, and a
//!   guessed 24-layer model would only fail later, obscurely): ViT and LLM `num_hidden_layers`,
//!   `hidden_size`, `num_attention_heads`, `intermediate_size`, the ViT's `image_size` and
//!   `patch_size`, the LLM's `num_key_value_heads` (Qwen2Config's default is 32 whatever the
//!   head count) and `vocab_size`;
//! - every other key is read under its own schema's name and, when absent, takes the default of
//!   the upstream class, because that is the model transformers or OpenGVLab's code would build
//!   from the same file:
//!
//!   | key (original / transformers)                          | original      | transformers |
//!   |--------------------------------------------------------|---------------|--------------|
//!   | vision `norm_type`                                     | rms_norm      | layer_norm   |
//!   | vision `qkv_bias` / `attention_bias`                   | false         | false        |
//!   | vision `qk_normalization` / `use_qk_norm`              | true          | false        |
//!   | vision `initializer_factor` / `layer_scale_init_value` | 0.1           | 0.1          |
//!   | vision `layer_norm_eps`, `num_channels`, `drop_path_rate` | 1e-6, 3, 0 | 1e-6, 3, 0   |
//!   | LLM `rms_norm_eps`, `rope_theta`, `max_position_embeddings` | 1e-6, 1e4, 32768 | same |
//!   | LLM `tie_word_embeddings`                              | always false  | false        |
//!   | `downsample_ratio`                                     | 0.5           | 0.5          |
//!   | `ps_version`                                           | v1            | (v2, fixed)  |
//!   | `template`                                             | required      | (internvl2_5)|
//!
//! - `tie_word_embeddings` is the language model's own: OpenGVLab's InternVLChatConfig forces
//!   it false ("tie_word_embeddings=False for models of all sizes"), transformers ties through
//!   `get_text_config()` (InternVLConfig's top-level flag is not read for it);
//! - settings that would make upstream build a different network than InternVL3's are refused
//!   by name (`vision_feature_layer` ≠ −1, `use_mean_pooling: false`, another activation, …);
//! - every error names the file and the full key path (`text_config.num_hidden_layers`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::presets::{LlmConfig, ModelPreset, NormType, VisionConfig};

/// The file name of a checkpoint's configuration.
pub const CONFIG_FILE: &str = "config.json";

/// Which upstream class a config.json belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Schema {
    /// OpenGVLab's `InternVLChatConfig` (`llm_config`).
    Original,
    /// transformers' `InternVLConfig` (`text_config`).
    Transformers,
}

impl Schema {
    pub fn model_type(self) -> &'static str {
        match self {
            Schema::Original => "internvl_chat",
            Schema::Transformers => "internvl",
        }
    }

    /// The key of the language model's sub-config.
    pub fn text_key(self) -> &'static str {
        match self {
            Schema::Original => "llm_config",
            Schema::Transformers => "text_config",
        }
    }
}

/// A checkpoint's config.json: the architecture, its schema and the raw JSON (kept so an
/// export carries over the keys the numbers do not decide).
#[derive(Debug, Clone, PartialEq)]
pub struct HfConfig {
    pub arch: ModelPreset,
    pub schema: Schema,
    pub raw: Value,
}

impl HfConfig {
    /// transformers' schema (`text_config`) rather than OpenGVLab's.
    pub fn native(&self) -> bool {
        self.schema == Schema::Transformers
    }
}

/// A config.json that does not describe an InternVL3 model: the file, the key path (when one
/// key is at fault) and what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {}{message}", path.display(), field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct ConfigError {
    pub path: PathBuf,
    pub field: Option<String>,
    pub message: String,
}

/// Reads `<dir>/config.json`; the preset's name is the folder's name.
pub fn read_config(dir: &Path) -> Result<HfConfig, ConfigError> {
    let path = dir.join(CONFIG_FILE);
    let err = |message: String| ConfigError { path: path.clone(), field: None, message };
    if !path.is_file() {
        return Err(err(format!(
            "not found: a checkpoint folder needs its {CONFIG_FILE} (the architecture is read from it); copy it \
             from the model's hub page next to the weights"
        )));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| err(format!("cannot read it: {e}")))?;
    parse_config(&path, &folder_name(dir), &text)
}

/// The name a folder gives its model: its own name as the user spelled the path (a symlink to a
/// hub cache snapshot keeps the link's name), `.` resolved against the working directory.
pub fn folder_name(dir: &Path) -> String {
    let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    abs.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string())
}

/// Parses config.json text in either schema; `path` only names the file in errors.
pub fn parse_config(path: &Path, name: &str, text: &str) -> Result<HfConfig, ConfigError> {
    let at = |field: Option<&str>, message: String| ConfigError {
        path: path.to_path_buf(),
        field: field.map(str::to_string),
        message,
    };
    let raw: Value = serde_json::from_str(text).map_err(|e| at(None, format!("not valid JSON: {e}")))?;
    if !raw.is_object() {
        return Err(at(None, "expected a JSON object (an InternVL3 config.json)".into()));
    }
    let schema = detect_schema(&raw).map_err(|(field, message)| at(field, message))?;
    let arch = arch_of(&raw, schema, name).map_err(|(field, message)| at(Some(&field), message))?;
    Ok(HfConfig { arch, schema, raw })
}

fn detect_schema(raw: &Value) -> Result<Schema, (Option<&'static str>, String)> {
    let has_llm = raw.get("llm_config").is_some();
    let has_text = raw.get("text_config").is_some();
    match raw.get("model_type") {
        Some(Value::String(t)) if t == "internvl_chat" => Ok(Schema::Original),
        Some(Value::String(t)) if t == "internvl" => Ok(Schema::Transformers),
        Some(other) => Err((
            Some("model_type"),
            format!(
                "is {other}, expected \"internvl_chat\" (OpenGVLab's InternVL3 config) or \"internvl\" \
                 (transformers' InternVLConfig); is this an InternVL3 checkpoint?"
            ),
        )),
        None if has_llm && !has_text => Ok(Schema::Original),
        None if has_text && !has_llm => Ok(Schema::Transformers),
        None => Err((
            None,
            "has neither model_type nor exactly one of llm_config (OpenGVLab's InternVLChatConfig) and text_config \
             (transformers' InternVLConfig): expected the config.json of an InternVL3 checkpoint"
                .into(),
        )),
    }
}

type FieldResult<T> = Result<T, (String, String)>;

/// Typed access to one section of the JSON; errors carry the full key path.
struct Section<'a> {
    v: Option<&'a Value>,
    prefix: &'a str,
}

impl<'a> Section<'a> {
    fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    /// The first of `keys` present (a key and its other-schema alias), with its path.
    fn get(&self, keys: &[&str]) -> Option<(String, &'a Value)> {
        let v = self.v?;
        keys.iter().find_map(|k| v.get(*k).filter(|x| !x.is_null()).map(|x| (self.path(k), x)))
    }

    fn count(&self, key: &str, default: Option<usize>) -> FieldResult<usize> {
        match self.get(&[key]) {
            None => default.ok_or_else(|| {
                (
                    self.path(key),
                    "is missing: it sizes the model, so it cannot be guessed; copy the checkpoint's \
                                  original config.json"
                        .into(),
                )
            }),
            Some((path, v)) => {
                // transformers writes image_size / patch_size as [h, w]; InternVL3 tiles are square.
                let v = match v.as_array() {
                    Some(a) => match a.as_slice() {
                        [h, w] if h == w => h,
                        _ => return Err((path, format!("is {v}: expected a number or a square [n, n]"))),
                    },
                    None => v,
                };
                v.as_u64().map(|n| n as usize).ok_or_else(|| (path, format!("is {v}: expected a whole number ≥ 0")))
            }
        }
    }

    fn float(&self, keys: &[&str], default: f64) -> FieldResult<f64> {
        match self.get(keys) {
            None => Ok(default),
            Some((path, v)) => v.as_f64().ok_or_else(|| (path, format!("is {v}: expected a number"))),
        }
    }

    fn flag(&self, keys: &[&str], default: bool) -> FieldResult<bool> {
        match self.get(keys) {
            None => Ok(default),
            Some((path, v)) => v.as_bool().ok_or_else(|| (path, format!("is {v}: expected true or false"))),
        }
    }

    fn text(&self, key: &str, default: &str) -> FieldResult<String> {
        match self.get(&[key]) {
            None => Ok(default.to_string()),
            Some((path, v)) => {
                v.as_str().map(str::to_string).ok_or_else(|| (path, format!("is {v}: expected a string")))
            }
        }
    }

    fn required_text(&self, key: &str) -> FieldResult<String> {
        match self.get(&[key]) {
            None => Err((
                self.path(key),
                "is missing: the conversation template the data is formatted with, \
                                          \"internvl2_5\" for InternVL3"
                    .into(),
            )),
            Some((path, v)) => {
                v.as_str().map(str::to_string).ok_or_else(|| (path, format!("is {v}: expected a string")))
            }
        }
    }

    /// `rope_scaling`: absent or null, or `{"type" | "rope_type": str, "factor": number}`.
    fn rope_scaling(&self) -> FieldResult<Option<crate::presets::RopeScaling>> {
        let Some((path, v)) = self.get(&["rope_scaling"]) else { return Ok(None) };
        let kind = v.get("type").or_else(|| v.get("rope_type")).and_then(Value::as_str);
        let factor = v.get("factor").and_then(Value::as_f64);
        match (kind, factor) {
            (Some(kind), Some(factor)) if factor.is_finite() && factor > 0.0 => {
                Ok(Some(crate::presets::RopeScaling { kind: kind.to_string(), factor }))
            }
            _ => Err((path, format!("is {v}: expected {{\"type\": \"dynamic\", \"factor\": 2.0}} or null"))),
        }
    }

    /// A setting InternVL3 fixes: absent or equal to `want`.
    fn fixed(&self, key: &str, want: &Value, why: &str) -> FieldResult<()> {
        match self.get(&[key]) {
            Some((path, v)) if v != want => Err((path, format!("is {v}, expected {want}: {why}"))),
            _ => Ok(()),
        }
    }
}

fn arch_of(raw: &Value, schema: Schema, name: &str) -> FieldResult<ModelPreset> {
    let original = schema == Schema::Original;
    let top = Section { v: Some(raw), prefix: "" };
    let section = |key: &'static str| -> FieldResult<Section<'_>> {
        match raw.get(key) {
            Some(v) if v.is_object() => Ok(Section { v: Some(v), prefix: key }),
            Some(v) => Err((key.into(), format!("is {v}: expected an object"))),
            None => Err((
                key.into(),
                format!("is missing: a {} config.json describes the model there", schema.model_type()),
            )),
        }
    };
    let vc = section("vision_config")?;
    let tc = section(schema.text_key())?;

    // Each schema's own key names (a stale key of the other schema is not read).
    let key = |orig: &'static str, hf: &'static str| -> &'static str {
        if original {
            orig
        } else {
            hf
        }
    };
    let norm_type = match vc.text("norm_type", if original { "rms_norm" } else { "layer_norm" })?.as_str() {
        "layer_norm" => NormType::LayerNorm,
        "rms_norm" => NormType::RmsNorm,
        other => {
            return Err((vc.path("norm_type"), format!("is {other:?}, expected \"layer_norm\" or \"rms_norm\"")));
        }
    };
    vc.fixed("hidden_act", &"gelu".into(), "InternViT's MLP uses GELU")?;
    tc.fixed("hidden_act", &"silu".into(), "Qwen2's MLP uses SiLU")?;
    let vision = VisionConfig {
        num_hidden_layers: vc.count("num_hidden_layers", None)?,
        hidden_size: vc.count("hidden_size", None)?,
        num_attention_heads: vc.count("num_attention_heads", None)?,
        intermediate_size: vc.count("intermediate_size", None)?,
        norm_type,
        qkv_bias: vc.flag(&[key("qkv_bias", "attention_bias")], false)?,
        qk_normalization: vc.flag(&[key("qk_normalization", "use_qk_norm")], original)?,
        layer_norm_eps: vc.float(&["layer_norm_eps"], 1e-6)?,
        image_size: vc.count("image_size", None)?,
        patch_size: vc.count("patch_size", None)?,
        num_channels: vc.count("num_channels", Some(3))?,
        drop_path_rate: vc.float(&["drop_path_rate"], 0.0)?,
        initializer_factor: vc.float(&[key("initializer_factor", "layer_scale_init_value")], 0.1)?,
    };
    let heads = tc.count("num_attention_heads", None)?;
    let llm = LlmConfig {
        num_hidden_layers: tc.count("num_hidden_layers", None)?,
        hidden_size: tc.count("hidden_size", None)?,
        num_attention_heads: heads,
        num_key_value_heads: tc.count("num_key_value_heads", None)?,
        intermediate_size: tc.count("intermediate_size", None)?,
        rms_norm_eps: tc.float(&["rms_norm_eps"], 1e-6)?,
        rope_theta: tc.float(&["rope_theta"], 10_000.0)?,
        vocab_size: tc.count("vocab_size", None)?,
        max_position_embeddings: tc.count("max_position_embeddings", Some(32_768))?,
        // OpenGVLab's config class forces false; transformers reads the text config's.
        tie_word_embeddings: !original && tc.flag(&["tie_word_embeddings"], false)?,
        rope_scaling: tc.rope_scaling()?,
    };
    if original {
        top.fixed("select_layer", &(-1).into(), "InternVL3 feeds the last ViT layer to the projector")?;
    } else {
        top.fixed("vision_feature_layer", &(-1).into(), "InternVL3 feeds the last ViT layer to the projector")?;
        top.fixed(
            "vision_feature_select_strategy",
            &"default".into(),
            "InternVL3 drops the ViT's class token before the projector",
        )?;
        top.fixed("projector_hidden_act", &"gelu".into(), "InternVL3's projector uses GELU")?;
        vc.fixed(
            "use_mean_pooling",
            &true.into(),
            "with false transformers adds a final ViT LayerNorm that InternViT does not have",
        )?;
        vc.fixed("use_absolute_position_embeddings", &true.into(), "InternViT adds learned absolute positions")?;
    }
    let preset = ModelPreset {
        name: name.to_string(),
        vision,
        llm,
        downsample_ratio: top.float(&["downsample_ratio"], 0.5)?,
        template: if original { top.required_text("template")? } else { "internvl2_5".into() },
        ps_version: if original { top.text("ps_version", "v1")? } else { "v2".into() },
    };
    preset.validate().map_err(|e| match e {
        crate::SpecError::InvalidModel { field, found, expected, .. } => {
            let field = field.replacen("llm_config", schema.text_key(), 1);
            (field, format!("is {found}, expected {expected}"))
        }
        other => (String::new(), other.to_string()),
    })?;
    Ok(preset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preset;

    /// The fixtures of crates/spec/tests/configs (written by make.py there).
    pub(crate) const FIXTURES: &[(&str, &str, Option<&str>)] = &[
        ("internvl3-8b.json", include_str!("../../tests/configs/internvl3-8b.json"), Some("8b")),
        ("internvl3-8b-hf.json", include_str!("../../tests/configs/internvl3-8b-hf.json"), Some("8b")),
        ("internvl3-78b.json", include_str!("../../tests/configs/internvl3-78b.json"), Some("78b")),
        ("internvl3-78b-hf.json", include_str!("../../tests/configs/internvl3-78b-hf.json"), Some("78b")),
        ("incomplete-hf.json", include_str!("../../tests/configs/incomplete-hf.json"), None),
    ];

    fn parse(text: &str) -> Result<HfConfig, ConfigError> {
        parse_config(Path::new("ckpt/config.json"), "x", text)
    }

    #[test]
    fn both_schemas_of_the_seed_models_give_the_presets() {
        for (file, text, want) in FIXTURES {
            let Some(want) = want else { continue };
            let cfg = parse(text).unwrap_or_else(|e| panic!("{file}: {e}"));
            let mut expected = preset(want).unwrap();
            expected.name = "x".into();
            assert_eq!(cfg.arch, expected, "{file}");
            assert_eq!(cfg.native(), file.contains("-hf"), "{file}");
        }
    }

    #[test]
    fn a_missing_size_names_the_file_and_the_key() {
        let err = parse(FIXTURES[4].1).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("text_config.num_hidden_layers"));
        let msg = err.to_string();
        assert!(msg.starts_with("ckpt/config.json: text_config.num_hidden_layers: is missing"), "{msg}");
        let orig = FIXTURES[0].1.replace("\"intermediate_size\": 4096,", "");
        let err = parse(&orig).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("vision_config.intermediate_size"), "{err}");
        assert!(parse("{not json").unwrap_err().message.contains("not valid JSON"));
        assert!(parse("[1]").unwrap_err().message.contains("JSON object"));
    }

    #[test]
    fn wrong_types_and_other_networks_are_refused_by_name() {
        let hf = FIXTURES[1].1;
        let cases = [
            (hf.replace("\"vision_feature_layer\": -1", "\"vision_feature_layer\": -2"), "vision_feature_layer"),
            (hf.replace("\"use_mean_pooling\": true", "\"use_mean_pooling\": false"), "vision_config.use_mean_pooling"),
            (hf.replace("\"model_type\": \"internvl\"", "\"model_type\": \"llava\""), "model_type"),
            (hf.replace("\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\""), "text_config.hidden_act"),
            (hf.replace("\"vocab_size\": 151674", "\"vocab_size\": \"big\""), "text_config.vocab_size"),
            (
                hf.replace("\"image_size\": [\n      448,\n      448\n    ]", "\"image_size\": [448, 224]"),
                "vision_config.image_size",
            ),
            (hf.replace("\"num_key_value_heads\": 4", "\"num_key_value_heads\": 5"), "text_config.num_attention_heads"),
            (FIXTURES[0].1.replace("\"select_layer\": -1", "\"select_layer\": -4"), "select_layer"),
            (
                FIXTURES[0].1.replace("\"norm_type\": \"layer_norm\"", "\"norm_type\": \"batch_norm\""),
                "vision_config.norm_type",
            ),
        ];
        for (text, field) in cases {
            assert!(text != hf && text != FIXTURES[0].1, "{field}: the fixture edit did not apply");
            let err = parse(&text).unwrap_err();
            assert_eq!(err.field.as_deref(), Some(field), "{err}");
        }
    }

    #[test]
    fn defaults_are_the_upstream_classes() {
        // Without the flags that decide the ViT's tensors, each schema means its own class's
        // defaults: OpenGVLab's InternVisionConfig (RMSNorm + qk norm), transformers'
        // InternVLVisionConfig (LayerNorm, no qk norm).
        let strip = |text: &str, keys: &[&str]| {
            let mut v: Value = serde_json::from_str(text).unwrap();
            let vc = v["vision_config"].as_object_mut().unwrap();
            for k in keys {
                vc.remove(*k);
            }
            v.to_string()
        };
        let orig = parse(&strip(FIXTURES[0].1, &["norm_type", "qk_normalization", "qkv_bias"])).unwrap().arch;
        assert_eq!(orig.vision.norm_type, NormType::RmsNorm);
        assert!(orig.vision.qk_normalization && !orig.vision.qkv_bias);
        let hf = parse(&strip(FIXTURES[1].1, &["norm_type", "use_qk_norm", "attention_bias"])).unwrap().arch;
        assert_eq!(hf.vision.norm_type, NormType::LayerNorm);
        assert!(!hf.vision.qk_normalization && !hf.vision.qkv_bias);
        // A stale key of the other schema is not read: transformers ignores `qkv_bias`.
        let mut v: Value = serde_json::from_str(FIXTURES[1].1).unwrap();
        v["vision_config"]["qkv_bias"] = false.into();
        assert!(parse(&v.to_string()).unwrap().arch.vision.qkv_bias, "attention_bias: true still decides");
        // The size-deciding kv heads are required; ps_version means v1 when absent (OpenGVLab).
        let mut v: Value = serde_json::from_str(FIXTURES[1].1).unwrap();
        v["text_config"].as_object_mut().unwrap().remove("num_key_value_heads");
        assert_eq!(parse(&v.to_string()).unwrap_err().field.as_deref(), Some("text_config.num_key_value_heads"));
        let mut v: Value = serde_json::from_str(FIXTURES[0].1).unwrap();
        v.as_object_mut().unwrap().remove("ps_version");
        assert_eq!(parse(&v.to_string()).unwrap().arch.ps_version, "v1");
        v.as_object_mut().unwrap().remove("template");
        assert_eq!(parse(&v.to_string()).unwrap_err().field.as_deref(), Some("template"));
        // OpenGVLab's config class forces an untied head.
        let mut v: Value = serde_json::from_str(FIXTURES[0].1).unwrap();
        v["llm_config"]["tie_word_embeddings"] = true.into();
        assert!(!parse(&v.to_string()).unwrap().arch.llm.tie_word_embeddings);
        // tie_word_embeddings is the text config's; InternVLConfig's top-level True is not read.
        let mut v: Value = serde_json::from_str(FIXTURES[1].1).unwrap();
        v["tie_word_embeddings"] = true.into();
        assert!(!parse(&v.to_string()).unwrap().arch.llm.tie_word_embeddings);
        v["text_config"]["tie_word_embeddings"] = true.into();
        assert!(parse(&v.to_string()).unwrap().arch.llm.tie_word_embeddings);
    }

    #[test]
    fn read_config_names_the_folder() {
        let dir = std::env::temp_dir().join(format!("mm-spec-cfg-{}", std::process::id()));
        let model = dir.join("My-InternVL3");
        std::fs::create_dir_all(&model).unwrap();
        let err = read_config(&model).unwrap_err();
        assert!(err.to_string().contains("My-InternVL3/config.json: not found"), "{err}");
        std::fs::write(model.join(CONFIG_FILE), FIXTURES[1].1).unwrap();
        assert_eq!(read_config(&model).unwrap().arch.name, "My-InternVL3");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
