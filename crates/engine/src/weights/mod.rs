//! Weights on disk: a lazy safetensors reader/writer, the declarative key maps between the
//! checkpoint spellings, and HF folders (config + weights) loaded into the model's VarStore.

pub mod hf;
pub mod keys;
pub mod safetensors;

pub use hf::{load_config, load_into, HfCheckpoint, MismatchReport, WeightsError};
