//! [`ScheduleError`]: a schedule asked for with impossible numbers, or a set of schedules that
//! [`super::simulate`] found would hang or mix up tensors.

use crate::layout::LayoutError;

/// Each variant names the values involved and, for input errors, the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// A size that breaks a layout rule (zero, vpp without pp, …), worded as the layout
    /// checks word it.
    #[error(transparent)]
    Layout(#[from] LayoutError),

    #[error("pipeline rank {rank} is out of range for pp {pp}: pipeline ranks run from 0 to {last}", last = .pp.saturating_sub(1))]
    RankOutOfRange { rank: usize, pp: usize },

    #[error(
        "micro batches {micro_batches} is not a multiple of pipeline size {pp} (interleaved \
         schedule): set the global batch size so that global / (micro × dp) is a multiple of \
         {pp}, e.g. {suggestion} micro batches, or omit vpp"
    )]
    MicroBatchesNotMultiple { micro_batches: usize, pp: usize, suggestion: usize },

    #[error("got schedules for {found} pipeline ranks but pp is {pp}: give one schedule per rank")]
    RankCount { found: usize, pp: usize },

    #[error("rank {rank}, action {index} ({action}): {problem}")]
    Invalid { rank: usize, index: usize, action: String, problem: String },

    #[error(
        "rank {from} sends {sent} to rank {to}, but rank {to} expects {expected} next from \
         rank {from}: the two ranks' exchanges are out of order"
    )]
    Mismatch { from: usize, to: usize, sent: String, expected: String },

    #[error("the schedules deadlock: {}", .waiting.join("; "))]
    Deadlock {
        /// One line per rank that cannot go on: where it waits and for what.
        waiting: Vec<String>,
    },

    #[error("rank {rank} finished without {missing}")]
    Incomplete { rank: usize, missing: String },
}
