//! The MM checkpoint format: ONE definition shared by the converter (which writes it from HF
//! checkpoints and reads it back) and the engine (which loads and saves it).
//!
//! Owns the on-disk names, the logical tensor key table, the tensor-parallel split rules, the
//! pipeline placement of every tensor and the `manifest.json` types. Pure data and pure functions
//! (paths are joined, never opened), so the engine can reuse them without libtorch and the
//! converter without a model.
//!
//! ```text
//!   <save_dir>/latest_checkpointed_iteration.txt     "release" (converted) or "100" (trained)
//!   <save_dir>/release/  or  <save_dir>/iter_0000100/
//!       manifest.json                                 Manifest: architecture, layout, every tensor
//!       hf_assets/                                    config.json, tokenizer files (copied forward)
//!       mp_rank_{tp:02}_{pp:03}/model.safetensors     one per (tp rank, pp rank);
//!       mp_rank_{tp:02}/model.safetensors             ... spelled like this when pp == 1
//! ```
//!
//! Keys inside a shard file are *stage-local*: stage 2 of `6,8,8,6` holds LLM layers 14..22 as
//! `llm.layers.0` .. `llm.layers.7`. With virtual pipeline stages (`vpp`), a rank's file holds
//! all of its chunks and every key carries the chunk's vp stage as a `chunk{v}.` prefix
//! (`chunk1.llm.layers.0.mlp.up_proj.weight`); without vpp there is no prefix.
//!
//! Logical keys (whole model, global layer numbers) come from [`KEY_TABLE`]; each row says the
//! tensor's shape in architecture terms and how it is split over tp ([`SplitRule`]):
//!
//! - column-parallel (split rows of the `[out, in]` weight and its bias): LLM q/k/v by whole kv
//!   groups (each rank gets whole kv heads and the q heads that read them), gate/up, ViT fc1,
//!   projector linear_1;
//! - row-parallel (split columns; the bias is replicated): o_proj, down_proj, ViT attn proj and
//!   fc2, projector linear_2;
//! - qkv-grouped: the ViT's fused `[3C, C]` qkv; rank r holds `[q_r; k_r; v_r]` rows;
//! - vocab-parallel: embed_tokens and lm_head, padded with zero rows to a multiple of
//!   `make_vocab_size_divisible_by × tp` as Megatron does (the export drops the padding);
//! - replicated: norms, layer scales, embeddings of the ViT, biases of row-parallel layers and
//!   InternViT-6B's q_norm/k_norm (they normalize over the full width C, see [`QK_NORM_NOTE`]).
//!
//! Units that do not divide by tp follow the unaligned rule of [`crate::layout::tp_partition`]
//! (`--unaligned-linear`: the first `n % tp` ranks get one more).
//!
//! Placement over the pipeline (chunk `c = vp_stage·PP + pp_rank`, model order): transformer
//! layers by `llm_pp_layers` / `vit_pp_layers`; the ViT embeddings with ViT layer 0; the projector
//! with the last ViT layer (so with `24,0,0,0` it is on stage 0); `llm.embed_tokens` on chunk 0;
//! `llm.norm` and `llm.lm_head` on the last chunk (pp−1, last vp stage).

mod dtype;
mod error;
mod hf_layout;
mod keys;
mod manifest;
mod mindspeed;
mod mindspeed_files;
mod names;
mod plan;
mod read;
mod split;
#[cfg(test)]
mod testing;

pub use dtype::DType;
pub use error::CheckpointError;
pub use hf_layout::HfLayout;
pub use keys::{
    fill_template, logical_tensors, lookup_key, match_template, Cond, Dim, KeyRow, LogicalTensor, Part, SplitRule,
    Unit, KEY_TABLE, QK_NORM_NOTE, VOCAB_NOTE,
};
pub use manifest::{FileEntry, Manifest, SourceInfo, TensorEntry};
pub use mindspeed::{
    mindspeed_row, plan_mindspeed, Fuse, MsFile, MsPlan, MsRow, MsSplit, MsTensor, CHECKPOINT_VERSION, MINDSPEED_FILE,
    MINDSPEED_TABLE,
};
pub use mindspeed_files::{
    dtype_of as mindspeed_dtype, torch_dtype, write_file as write_mindspeed_file, MindSpeedCheckpoint, MindSpeedError,
    StateDict,
};
pub use names::{
    chunk_prefix, iteration_dir, latest_path, rank_dir_name, shard_rel_path, Iteration, FORMAT_NAME, FORMAT_VERSION,
    HF_ASSETS_DIR, LATEST_FILE, MANIFEST_FILE, SHARD_FILE,
};
pub use plan::{
    file_order, place_tensors, plan_checkpoint, LayoutRequest, MmLayout, Placed, PlannedTensor, DEFAULT_VOCAB_DIVISOR,
    MAX_PARAMS,
};
pub use read::{
    architecture_differences, has_mindspeed_files, locate, read_architecture, FolderKind, LocateError, Located,
};
pub use split::{padded_vocab_size, split_spec, Piece, Shard, SplitKind};
