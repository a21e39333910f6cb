//! InternVL3 architecture only: parameter paths equal the original OpenGVLab checkpoint keys.
//! Nothing here knows about parallelism, precision policy, data or checkpoints on disk.

pub mod cp;
pub mod internvl;
pub mod layers;
pub mod projector;
pub mod qwen2;
pub mod recompute;
pub mod tp;
pub mod vit;

pub use internvl::{ForwardError, InternVL, ModelInput, StagePart};
