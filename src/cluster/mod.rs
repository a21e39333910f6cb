//! The cluster spec: which hosts and devices a run uses, how to reach them, and what a run changes.
//!
//! ```text
//! YAML text ─► RawCluster (serde: the file's exact shape, deny_unknown_fields everywhere)   raw.rs
//!           ─► host source: `hosts:` list │ DeepSpeed `hostfile:` │ `hosts_from: slurm`    check.rs
//!           ─► checks (every problem at once) ─► ClusterSpec ─► hosts_resolved() for the planner
//! ```
//!
//! - `spec`: the checked types ([`ClusterSpec`] and its parts), what the rest of the launcher reads;
//! - `raw`: the file's serde shape, its hand-written deserializers and the hints for serde errors;
//! - `check`: the checks that turn raw into spec, and the loading entry points;
//! - `humane`: durations such as `10s` or `500ms`;
//! - `known_hosts`: whether a known_hosts path can hold keys (refused at load when it cannot).
//!
//! Every problem is a [`Diagnostic`] naming the file, line:column, the key path and, where we
//! can say how to fix it, a hint; the located-error kit lives in [`crate::diag`] (recipes and
//! hostfiles use it too). This file holds no logic: it names the parts and re-exports them.

mod check;
pub mod humane;
pub mod known_hosts;
mod raw;
mod spec;

pub use check::{is_loopback, is_valid_env_name, EnvSource, ProcessEnv};
pub use spec::{
    Accelerator, ClusterSpec, Executor, HostSource, HostSpec, HostsFrom, JobSpec, MasterSpec, ResolvedHost, SshSpec,
    StrictMode, Template, EMBEDDED_LOCAL_ORIGIN, EMBEDDED_LOCAL_YAML, LAUNCHER_OWNED_ENV, MAX_DEVICES_PER_NODE,
};
// The diagnostics kit under the names cluster users have always imported.
pub use crate::diag::{locate_key, yaml_to_value, ConfigError, Diagnostic};
