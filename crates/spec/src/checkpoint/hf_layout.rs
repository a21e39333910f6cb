//! [`HfLayout`]: the HF key layouts an InternVL3 checkpoint comes in (the key maps themselves live
//! in the converter; the format only records which one a checkpoint was converted from).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The HF key layouts an InternVL3 checkpoint comes in (key maps live in the converter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HfLayout {
    /// OpenGVLab's remote-code layout: `vision_model.*`, `mlp1.*`, `language_model.model.*`.
    Original,
    /// transformers-native, as saved on the hub: `vision_tower.*`, `multi_modal_projector.*`,
    /// `language_model.model.*`, `language_model.lm_head.weight`.
    Hf,
    /// transformers-native with the `model.` prefix of transformers ≥ 4.52's module tree:
    /// `model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`,
    /// `lm_head.weight`.
    HfPrefixed,
}

impl HfLayout {
    pub fn name(&self) -> &'static str {
        match self {
            HfLayout::Original => "original",
            HfLayout::Hf => "hf",
            HfLayout::HfPrefixed => "hf-prefixed",
        }
    }

    /// Whether the config.json schema is the transformers-native one (`text_config`).
    pub fn is_transformers_native(&self) -> bool {
        !matches!(self, HfLayout::Original)
    }
}

impl fmt::Display for HfLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
