//! The chat tokenizer: a HF `tokenizer.json` through the `tokenizers` crate, plus the special
//! token ids InternVL's data pipeline needs, looked up by name (never hard-coded: the real
//! Qwen2.5 vocab and the tiny synthetic one number them differently).
//!
//! The pad token comes from `tokenizer_config.json`'s `pad_token` when the folder has one,
//! else `<|endoftext|>` (Qwen2's pad).

use std::path::{Path, PathBuf};

use serde_json::Value;

pub const IMG_START: &str = "<img>";
pub const IMG_END: &str = "</img>";
pub const IMG_CONTEXT: &str = "<IMG_CONTEXT>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const DEFAULT_PAD: &str = "<|endoftext|>";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: cannot load tokenizer.json: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("{path}: no token {token:?} ({what}); InternVL3 chat data needs it")]
    MissingToken { path: PathBuf, token: String, what: &'static str },
    #[error("{path}: key pad_token: {reason}")]
    PadToken { path: PathBuf, reason: String },
    #[error("{path}: cannot tokenize {text:?}: {reason}")]
    Encode { path: PathBuf, text: String, reason: String },
}

/// Ids of the tokens the template and the image expansion use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub img_start: i64,
    pub img_end: i64,
    pub img_context: i64,
    pub im_start: i64,
    pub im_end: i64,
    pub pad: i64,
}

pub struct ChatTokenizer {
    inner: tokenizers::Tokenizer,
    pub special: SpecialIds,
    pub path: PathBuf,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer").field("path", &self.path).field("special", &self.special).finish()
    }
}

impl ChatTokenizer {
    /// `path` is a tokenizer.json or a folder holding one.
    pub fn open(path: &Path) -> Result<ChatTokenizer, TokenizerError> {
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| TokenizerError::Load { path: file.clone(), reason: e.to_string() })?;
        let id = |token: &str, what: &'static str| {
            inner.token_to_id(token).map(i64::from).ok_or_else(|| TokenizerError::MissingToken {
                path: file.clone(),
                token: token.to_string(),
                what,
            })
        };
        let pad_name = pad_token_name(&file)?;
        let special = SpecialIds {
            img_start: id(IMG_START, "image start")?,
            img_end: id(IMG_END, "image end")?,
            img_context: id(IMG_CONTEXT, "image context")?,
            im_start: id(IM_START, "turn start")?,
            im_end: id(IM_END, "turn end")?,
            pad: id(&pad_name, "padding")?,
        };
        Ok(ChatTokenizer { inner, special, path: file })
    }

    /// Token ids of `text` as `tokenizer(text)` gives them (post-processor applied).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TokenizerError> {
        let enc = self.inner.encode(text, true).map_err(|e| TokenizerError::Encode {
            path: self.path.clone(),
            text: text.chars().take(80).collect(),
            reason: e.to_string(),
        })?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Vocabulary size including added tokens (must not exceed the model's `vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn decode(&self, ids: &[i64]) -> String {
        let ids: Vec<u32> = ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        self.inner.decode(&ids, false).unwrap_or_default()
    }
}

/// `pad_token` of the tokenizer_config.json next to `tokenizer_json` (a string or an
/// AddedToken object with `content`), else Qwen2's `<|endoftext|>`.
fn pad_token_name(tokenizer_json: &Path) -> Result<String, TokenizerError> {
    let cfg = tokenizer_json.with_file_name("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&cfg) else {
        return Ok(DEFAULT_PAD.to_string());
    };
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| TokenizerError::PadToken { path: cfg.clone(), reason: format!("file is not JSON: {e}") })?;
    Ok(match v.get("pad_token") {
        None | Some(Value::Null) => DEFAULT_PAD.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| TokenizerError::PadToken {
                path: cfg.clone(),
                reason: "object without a content string".into(),
            })?
            .to_string(),
        Some(_) => {
            return Err(TokenizerError::PadToken {
                path: cfg,
                reason: "expected a string or {\"content\": ...}".into(),
            })
        }
    })
}
