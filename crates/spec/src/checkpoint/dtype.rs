//! [`DType`]: the element types the engine trains and stores, with their safetensors, torch
//! and command-line spellings.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The element types the engine trains and stores (safetensors spelling on disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    BF16,
    F16,
    F32,
}

impl DType {
    pub fn size_bytes(&self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    /// The safetensors header spelling ("BF16", "F16", "F32").
    pub fn safetensors_name(&self) -> &'static str {
        match self {
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F32 => "F32",
        }
    }

    /// The `torch_dtype` spelling of HF config files.
    pub fn torch_name(&self) -> &'static str {
        match self {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::F32 => "float32",
        }
    }

    /// Accepts the CLI, torch and safetensors spellings (`bf16`, `bfloat16`, `BF16`, `fp16`, …).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Some(DType::BF16),
            "fp16" | "f16" | "float16" | "half" => Some(DType::F16),
            "fp32" | "f32" | "float32" | "float" => Some(DType::F32),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::HfLayout;

    #[test]
    fn dtype_spellings() {
        assert_eq!(DType::parse("bf16"), Some(DType::BF16));
        assert_eq!(DType::parse("BFloat16"), Some(DType::BF16));
        assert_eq!(DType::parse("fp16"), Some(DType::F16));
        assert_eq!(DType::parse("float32"), Some(DType::F32));
        assert_eq!(DType::parse("int8"), None);
        assert_eq!(serde_json::to_string(&DType::BF16).unwrap(), "\"BF16\"");
        assert_eq!(serde_json::to_string(&HfLayout::HfPrefixed).unwrap(), "\"hf-prefixed\"");
    }
}
