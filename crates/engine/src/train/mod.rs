//! Training: flags, the loop, AdamW with savable state, the lr schedule, loss reductions and
//! checkpoints (MM layout).

pub mod args;
pub mod checkpoint;
pub mod loss;
pub mod optimizer;
pub mod schedule;
pub mod trainer;
