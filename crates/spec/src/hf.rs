//! HF checkpoint facts: what the converter, the engine and the launcher read from and write to
//! a Hugging Face InternVL3 folder, defined once.
//!
//! - [`config`]: config.json in both schemas (OpenGVLab's `InternVLChatConfig`, transformers'
//!   `InternVLConfig`) → one [`crate::ModelPreset`], one set of defaults, one validation;
//! - [`write`]: config.json for a target layout (export, saved `hf_assets/`);
//! - [`keys`]: the key spellings of every layout (original, -hf, -hf prefixed) ↔ MM logical
//!   keys, both ways.
//!
//! The folder itself: `config.json`, then `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, plus the tokenizer and processor files of [`ASSET_FILES`].

pub mod config;
pub mod keys;
pub mod write;

pub use config::{parse_config, read_config, ConfigError, HfConfig, Schema, CONFIG_FILE};
pub use keys::{detect_layout, hf_keys, mm_key_of_original, original_key, parse_key, StoredKey};
pub use write::{config_for_layout, set_torch_dtype, IMG_CONTEXT_KEY, INTERNVL3_IMG_CONTEXT_ID};

/// The index of a sharded checkpoint (tensor name → file).
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The weights of a single-file checkpoint.
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

/// Whether `dir` looks like an HF checkpoint folder (config.json beside safetensors weights).
pub fn is_hf_folder(dir: &std::path::Path) -> bool {
    dir.join(CONFIG_FILE).is_file() && (dir.join(SINGLE_FILE).is_file() || dir.join(INDEX_FILE).is_file())
}
