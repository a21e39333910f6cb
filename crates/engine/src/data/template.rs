//! The internvl2_5 chat template with InternVL's labels (`preprocess_internvl2_5`).
//!
//! `<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n…`
//! Each turn is tokenized on its own and the pieces concatenated (no merges across turns).
//! System and user tokens are ignored (-100); in an assistant turn the
//! `<|im_start|>assistant\n` prefix and the trailing `\n` are ignored, the answer and
//! `<|im_end|>` count. Each `<image>` in a human turn becomes
//! `<img>` + `<IMG_CONTEXT>` × n + `</img>`, images taken in order.

use super::records::Turn;
use crate::tokenizer::{ChatTokenizer, TokenizerError, IMG_CONTEXT, IMG_END, IMG_START};

/// The template's default system message (InternVL's conversation.py).
pub const SYSTEM_MESSAGE: &str =
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。";
pub const TEMPLATES: &[&str] = &["internvl2_5"];
pub const IGNORE: i64 = -100;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TemplateError {
    #[error("{placeholders} <image> placeholders in the human turns but {images} images")]
    ImageCount { placeholders: usize, images: usize },
    #[error(
        "{tokens} tokens do not fit --seq-length {max} without cutting an image \
         (a sample is rejected rather than truncated inside an image)"
    )]
    ImageCut { tokens: usize, max: usize },
    #[error("no answer token within --seq-length {max} ({tokens} tokens): nothing to learn from")]
    NoLabels { tokens: usize, max: usize },
    #[error("{0}")]
    Tokenizer(String),
}

impl From<TokenizerError> for TemplateError {
    fn from(e: TokenizerError) -> Self {
        TemplateError::Tokenizer(e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
}

/// Tokenizes a conversation. `image_tokens[k]` is the number of `<IMG_CONTEXT>` tokens of
/// image k (256 × its tiles); `text_only` leaves `<image>` literal, as the reference does for
/// samples without images. Truncates to `max_len`, rejecting a sample whose images would be cut.
pub fn tokenize(
    tok: &ChatTokenizer,
    conversations: &[Turn],
    image_tokens: &[usize],
    text_only: bool,
    max_len: usize,
) -> Result<Tokenized, TemplateError> {
    let (system, turns) = match conversations.first() {
        Some(t) if t.from == "system" => (t.value.as_str(), &conversations[1..]),
        _ => (SYSTEM_MESSAGE, conversations),
    };
    let mut pieces: Vec<(String, bool)> = vec![(format!("<|im_start|>system\n{system}<|im_end|>\n"), false)];
    let mut next_image = 0;
    for t in turns {
        let mut value = t.value.clone();
        if t.from == "human" {
            if !text_only {
                while next_image < image_tokens.len() {
                    let Some(pos) = value.find("<image>") else { break };
                    let expanded = format!("{IMG_START}{}{IMG_END}", IMG_CONTEXT.repeat(image_tokens[next_image]));
                    value.replace_range(pos..pos + "<image>".len(), &expanded);
                    next_image += 1;
                }
            }
            pieces.push((format!("<|im_start|>user\n{value}<|im_end|>\n"), false));
        } else {
            pieces.push((format!("<|im_start|>assistant\n{value}<|im_end|>\n"), true));
        }
    }
    if !text_only && next_image != image_tokens.len() {
        let placeholders = turns.iter().filter(|t| t.from == "human").map(|t| t.value.matches("<image>").count()).sum();
        return Err(TemplateError::ImageCount { placeholders, images: image_tokens.len() });
    }
    let ignore_len = tok.encode("<|im_start|>assistant\n")?.len();
    let mut input_ids = Vec::new();
    let mut labels = Vec::new();
    for (text, supervised) in &pieces {
        let ids = tok.encode(text)?;
        let n = ids.len();
        if *supervised {
            for (k, &id) in ids.iter().enumerate() {
                labels.push(if k < ignore_len || k + 1 == n { IGNORE } else { id });
            }
        } else {
            labels.extend(std::iter::repeat_n(IGNORE, n));
        }
        input_ids.extend(ids);
    }
    let total = input_ids.len();
    if total > max_len {
        let s = tok.special;
        let count = |ids: &[i64], id: i64| ids.iter().filter(|&&x| x == id).count();
        let kept = &input_ids[..max_len];
        if count(kept, s.img_context) != count(&input_ids, s.img_context)
            || count(kept, s.img_end) != count(&input_ids, s.img_end)
        {
            return Err(TemplateError::ImageCut { tokens: total, max: max_len });
        }
        input_ids.truncate(max_len);
        labels.truncate(max_len);
    }
    // The loss at position t predicts token t+1; a label at position 0 is never used.
    if labels.iter().skip(1).all(|&l| l == IGNORE) {
        return Err(TemplateError::NoLabels { tokens: total, max: max_len });
    }
    Ok(Tokenized { input_ids, labels })
}
