//! The rank layout: ONE implementation shared by the launcher, the converter and the engine.
//!
//! Owns the mapping rank ↔ (tp, cp, dp, pp) in Megatron order (tp fastest:
//! `rank = tp + TP·(cp + CP·(dp + DP·pp))`), the process groups derived from it, placement of
//! ranks on nodes, the pipeline layer split and schedules (1F1B, interleaved), tensor-parallel
//! partitions (with MindSpeed's unaligned rule), and the checks of a model against a layout. All pure functions: the
//! launcher prints them in `--dry-run`, the converter shards checkpoints with them, the engine
//! builds its communicators with them, and none can drift from the others.
//!
//! ```text
//!   ParallelDims::new(world, tp, cp, pp, vpp) ── coord / rank_of / groups / group_of
//!        │
//!        ├─► Placement::new(dims, slots_per_node)   rank → node, local rank (TP stays on a node)
//!        ├─► split_layers(L, pp, vpp, list)         stage → layer range (model order)
//!        ├─► tp_partition / attention_partition     tp rank → heads / columns
//!        ├─► mm_engine_unsupported(…)               what mm-engine cannot run yet
//!        ├─► BatchSizes::derive(mbs, gbs, gas, dp)   the one batch arithmetic
//!        ├─► schedule(pp, rank, m, vpp)             1F1B / interleaved actions of one rank
//!        └─► validate_model_layout(preset, dims, opts) → every problem at once
//! ```
//!
//! Pitfalls: groups are sorted ascending and ordered by their smallest rank, which is also the
//! order every rank must create them in (c10d group creation is collective). Pipeline stage
//! lists are in *model order* (chunk `c = vp_stage·PP + pp_rank`), not in rank order.

mod batch;
mod dims;
mod error;
mod pipeline;
mod placement;
mod schedule;
mod support;
mod tensor;
mod validate;

pub use batch::BatchSizes;
pub use dims::{GroupKind, ParallelDims, RankCoord};
pub use error::LayoutError;
pub use pipeline::{layer_owner, split_layers, stages_of, vit_pp_layers_or_default, LayerOwner, StageLayers};
pub use placement::{Placement, RankPlace};
pub use schedule::{
    interleaved, one_f_one_b, schedule, simulate, theoretical_bubble, Action, Compute, Dir, P2p, Pass, Payload,
    RankTimeline, ScheduleError, Step, Timeline, BACKWARD_COST, FORWARD_COST,
};
pub use support::{mm_engine_unsupported, Unsupported, MM_ENGINE_CP_ALGO, MM_ENGINE_LIMITS};
pub use tensor::{attention_partition, tp_partition, AttentionShard};
pub use validate::{validate_model_layout, LayoutOptions};
