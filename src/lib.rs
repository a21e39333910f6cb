//! `launch`: plans, checks and runs multi-node InternVL3 fine-tunes.
//!
//! One module per stage of the flow: cluster spec → recipe → plan (pure) → checks →
//! render (pure) → execute → events → report/logs.

pub mod agent;
pub mod checks;
pub mod cluster;
pub mod diag;
pub mod dryrun;
pub mod events;
pub mod exec;
pub mod hostlist;
pub mod input;
pub mod logs;
pub mod metrics;
pub mod plan;
pub mod plot;
pub mod progress;
pub mod recipe;
pub mod render;
pub mod report;
pub mod signals;
pub mod ssh;
pub mod submit;
