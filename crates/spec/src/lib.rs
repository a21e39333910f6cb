//! mm-spec: the facts the launcher, the converter and the engine must agree on.
//!
//! Pure data and pure functions (no processes, no tensors), so a login node without libtorch can
//! plan a run with exactly the numbers the engine will use; the only I/O is reading config.json
//! ([`hf`]) and the shared checkpoint writers ([`io`]).
//!
//! - [`presets`]: InternVL3 architecture presets (HF `config.json` field names) and their
//!   exact parameter counts.
//! - [`hf`]: HF folders: config.json in both schemas (parsed once, for every tool), the key
//!   spellings of every layout, the file names.
//! - [`io`]: the one safetensors writer and the atomic folder/file commit (the only I/O here).
//! - [`layout`]: the one rank layout (Megatron order tp-cp-dp-pp), process groups, placement
//!   over nodes, pipeline layer split, tensor-parallel partitions, model-vs-layout checks.
//! - [`progress`]: the machine-readable progress line the engine prints and the launcher parses;
//!   [`megatron_log`]: Megatron's iteration log line (MindSpeed-MM's) read as the same progress.
//! - [`flight`]: the rank state file (phase, iteration, recent collectives) the engine keeps
//!   and the launcher's stall watchdog reads, and the diagnosis it makes of them.
//! - [`flops`]: model FLOPs of a step (ViT, projector, LLM, attention), for TFLOP/s and MFU.
//! - [`metrics`]: metrics.jsonl (rank 0's view of each logged iteration) and the metric names
//!   TensorBoard, `launch plot` and `launch logs --summary` share; [`tensorboard`]: the
//!   event-file writer behind `--tensorboard-dir`.
//! - [`suggest`]: the one "did you mean" matcher for every tool's messages.
//! - [`error`]: [`SpecError`], the error of the non-layout parts.
//!
//! The MM checkpoint format (names, manifest) will live in a `checkpoint` module next to these.

pub mod checkpoint;
pub mod error;
pub mod flight;
pub mod flops;
pub mod hf;
pub mod io;
pub mod layout;
pub mod megatron_log;
pub mod memory;
pub mod metrics;
pub mod presets;
pub mod progress;
pub mod recompute;
pub mod suggest;
pub mod tensorboard;

pub use checkpoint::{CheckpointError, DType, HfLayout, Iteration, LayoutRequest, Manifest, MmLayout, SplitKind};
pub use error::SpecError;
pub use layout::{
    attention_partition, layer_owner, split_layers, stages_of, tp_partition, validate_model_layout, AttentionShard,
    GroupKind, LayerOwner, LayoutError, LayoutOptions, ParallelDims, Placement, RankCoord, RankPlace, StageLayers,
};
pub use presets::{preset, LlmConfig, ModelPreset, NormType, ParamCounts, RopeScaling, VisionConfig, PRESET_NAMES};
pub use progress::{Progress, ProgressEvent, PROGRESS_PREFIX};

/// Bytes for people: `512 B`, `3.00 GiB` (binary units, two decimals). Shared by the
/// launcher's dry run and checks and by mm-convert's reports.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod human_bytes_tests {
    #[test]
    fn binary_units() {
        assert_eq!(super::human_bytes(512), "512 B");
        assert_eq!(super::human_bytes(3 << 30), "3.00 GiB");
        assert_eq!(super::human_bytes(1536), "1.50 KiB");
    }
}
