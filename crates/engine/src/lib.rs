//! mm-engine: InternVL3 supervised fine-tuning on libtorch (tch), distributed through
//! libtorch's own c10d (Gloo on CPU, NCCL on CUDA).
//!
//! - [`model`]: the architecture (InternViT, pixel shuffle + mlp1, Qwen2), parameter paths =
//!   original checkpoint keys.
//! - [`weights`]: safetensors I/O, checkpoint key maps, HF folders.
//! - [`tokenizer`]: tokenizer.json and InternVL's special tokens.
//! - [`data`]: records, tiling, video, template, batching, prefetch.
//! - [`train`]: the loop, AdamW, schedule, loss reductions, checkpoints, data parallelism over
//!   WORLD_SIZE ranks (`train::parallel`) and the distributed optimizer, ZeRO-1 (`train::zero`).
//! - [`cli`]: exit codes and usage errors shared with `launch` and `mm-convert`.
//! - [`eval`], [`synth`]: the `eval` and `synth` subcommands.
//! - [`dist`]: c10d process groups (Gloo/NCCL) from the launcher's environment,
//!   `collective-check`, the tensor-parallel regions (`dist::tp`) and `tp-check`.

pub mod cli;
pub mod data;
pub mod dist;
pub mod doctor;
pub mod eval;
pub mod model;
pub mod rng;
pub mod session;
pub mod synth;
pub mod tokenizer;
pub mod train;
pub mod weights;
