//! Execute: start every unit of the rendered launch on its host, stream its output, stop
//! everything on the first failure. See each module's header:
//!
//! - `proto`: the launcher ↔ node agent wire format;
//! - `backend`: the one trait (local / SSH / fake) the dispatcher talks through;
//! - `local`, `ssh`, `fake`: the backends;
//! - `dispatch`: one attempt as an actor (select over links, signals, timers);
//! - `outcome`: what an attempt came to (outcome, failures, per-host reports), below both the
//!   dispatcher that produces it and the report that prints it;
//! - `job`: run directory, restarts, report — what `launch finetune` calls.

pub mod backend;
pub mod dispatch;
pub mod fake;
pub mod job;
pub mod local;
pub mod outcome;
pub mod proto;
pub mod ssh;
pub mod watchdog;
