//! `launch`: plans, checks and runs multi-node InternVL3 fine-tunes.
//!
//! One module per stage of the flow: cluster spec → recipe → plan (pure) → checks →
//! render (pure) → execute → events → report/logs.

pub mod checks;
pub mod cluster;
pub mod dryrun;
pub mod hostlist;
pub mod plan;
pub mod recipe;
pub mod render;
pub mod ssh;
