//! Test fixtures shared by the planning and manifest tests.

use super::LayoutRequest;
use crate::presets::{preset, ModelPreset};

pub(super) fn req(tp: usize, llm: &[usize], vit: &[usize]) -> LayoutRequest {
    LayoutRequest {
        tp,
        llm_pp_layers: Some(llm.to_vec()),
        vit_pp_layers: Some(vit.to_vec()),
        ..LayoutRequest::default()
    }
}

/// tiny with the 8B's layer counts (28 LLM, 24 ViT layers) at tiny width.
pub(super) fn tiny_8b_depth() -> ModelPreset {
    let mut p = preset("tiny").unwrap();
    p.llm.num_hidden_layers = 28;
    p.vision.num_hidden_layers = 24;
    p
}
