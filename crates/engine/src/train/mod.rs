//! Training: flags and the typed config they resolve to, the loop, AdamW with savable state,
//! the lr schedule, loss reductions, checkpoints (MM layout), data parallelism and the
//! distributed optimizer (ZeRO-1), and the agreed stop on a signal (`stop`).

pub mod args;
pub mod checkpoint;
pub mod config;
pub mod loss;
pub mod metrics;
pub mod optimizer;
pub mod parallel;
pub mod pipeline;
pub mod schedule;
pub mod stop;
pub mod trainer;
pub mod zero;
