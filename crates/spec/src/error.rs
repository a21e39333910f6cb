//! [`SpecError`]: what can go wrong when resolving presets, reading model configs and parsing
//! progress lines. Layout problems have their own richer type, [`LayoutError`], because
//! `validate_model_layout` reports many of them at once; it converts into `SpecError` with `?`.

use crate::layout::LayoutError;

/// Errors of the preset, model-config and progress-line parts of mm-spec.
///
/// Messages are lowercase and say what was found, what was expected and how to fix it, so the
/// launcher can print them as they are.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A preset name that is not in [`crate::presets::PRESET_NAMES`].
    #[error(
        "unknown model preset {name:?}: expected one of {known} \
         (case-insensitive; \"InternVL3-8B\" spellings are accepted too)"
    )]
    UnknownPreset { name: String, known: String },

    /// A model config whose numbers cannot describe a working InternVL3 model.
    #[error("invalid model config {model:?}: {field} is {found}, expected {expected}")]
    InvalidModel { model: String, field: String, found: String, expected: String },

    /// A line that carries the progress prefix but no valid progress event after it.
    #[error(
        "malformed progress line ({reason}): expected the prefix followed by one json object \
         with an \"event\" field of step, checkpoint or done; the line was {line:?}"
    )]
    BadProgressLine { line: String, reason: String },

    #[error(transparent)]
    Layout(#[from] LayoutError),
}
