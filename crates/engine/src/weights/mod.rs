//! Weights on disk: a lazy safetensors reader/writer and HF folders (config + weights) loaded
//! into the model's VarStore. The key spellings and config.json schemas are mm-spec's
//! (`mm_spec::hf`); parameter names are the original layout's keys.

pub mod checkpoint;
pub mod hf;
pub mod safetensors;
pub mod slices;

pub use hf::{load_config, load_into, HfCheckpoint, MismatchReport, WeightsError};
