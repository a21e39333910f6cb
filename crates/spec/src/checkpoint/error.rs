//! [`CheckpointError`]: every way reading, resolving or verifying a checkpoint can fail, each
//! message saying what was found, what was expected and how to fix it.

use super::names::{FORMAT_NAME, FORMAT_VERSION, LATEST_FILE, MANIFEST_FILE};
use super::plan::MAX_PARAMS;
use crate::layout::LayoutError;

/// Errors of the checkpoint-format functions. Lowercase; they say what was found, what was
/// expected and how to fix it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "{LATEST_FILE} holds {text:?}: expected an iteration number (e.g. \"5000\") or \"release\"; \
         fix the file or pass the iteration explicitly"
    )]
    BadLatest { text: String },

    #[error(
        "{key:?} is not a key of the MM checkpoint format: expected one of the KEY_TABLE templates \
         (vision.*, projector.*, llm.*; layer keys need a layer number below the model's depth)"
    )]
    UnknownKey { key: String },

    #[error("the parallel layout does not fit the model:\n  - {}", join_errors(.0))]
    Layout(Vec<LayoutError>),

    #[error(
        "the model has {params} parameters, more than the {MAX_PARAMS} this format handles: the config's sizes \
         are wrong (a misplaced digit?); fix config.json or the manifest's architecture"
    )]
    ImplausibleModel { params: u64 },

    #[error("{MANIFEST_FILE} describes an invalid model: {reason}; the manifest was edited by hand, convert again")]
    InvalidArchitecture { reason: String },

    #[error(
        "{MANIFEST_FILE} has format {found:?} version {version}: this build reads \
         {FORMAT_NAME:?} version {FORMAT_VERSION}; convert the checkpoint again with this mm-convert"
    )]
    UnsupportedManifest { found: String, version: u32 },

    #[error(
        "{MANIFEST_FILE} disagrees with the layout it declares: {what}: found {found}, expected \
         {expected}; the manifest was edited by hand or written by a different format version, \
         convert the checkpoint again"
    )]
    ManifestMismatch { what: String, found: String, expected: String },
}

fn join_errors(errors: &[LayoutError]) -> String {
    errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n  - ")
}
