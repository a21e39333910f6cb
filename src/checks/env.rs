//! Environment variables the ranks will see: the seed's table of Ascend variables and their
//! allowed values, NPUS_PER_NODE against the host's rank count, and NCCL/GLOO socket
//! interfaces against the interfaces the host has.

use std::collections::BTreeMap;

use super::probe::fact;
use super::rules::{check_value, Allowed, Rows, Status};
use crate::render::is_secret_name;

/// The seed's table of Ascend environment variables and their allowed values.
pub const NPU_ENV_TABLE: &[(&str, Allowed, &str)] = &[
    (
        "HCCL_CONNECT_TIMEOUT",
        Allowed::IntRange(120, 7200),
        "socket link setup timeout between devices, seconds (default 120)",
    ),
    ("HCCL_EXEC_TIMEOUT", Allowed::IntRange(68, 17340), "device synchronisation wait, seconds (default 1800)"),
    ("ACLNN_CACHE_LIMIT", Allowed::IntRange(1, 10_000_000), "host-side operator cache entries (default 10000)"),
    ("TASK_QUEUE_ENABLE", Allowed::OneOf(&["0", "1", "2"]), "task queue optimisation level"),
    ("COMBINED_ENABLE", Allowed::OneOf(&["0", "1"]), "combined-operator optimisation"),
    ("CPU_AFFINITY_CONF", Allowed::OneOf(&["0", "1", "2"]), "core binding: 0 off, 1 coarse, 2 fine"),
    ("NPU_ASD_ENABLE", Allowed::OneOf(&["0", "1", "2", "3"]), "feature-value (silent data corruption) detection"),
    ("ASCEND_LAUNCH_BLOCKING", Allowed::OneOf(&["0", "1"]), "synchronous operator execution"),
    ("MULTI_STREAM_MEMORY_REUSE", Allowed::OneOf(&["0", "1"]), "multi-stream memory reuse"),
    ("ASCEND_GLOBAL_LOG_LEVEL", Allowed::OneOf(&["0", "1", "2", "3", "4"]), "log level: 0 debug … 3 error, 4 none"),
    ("ASCEND_SLOG_PRINT_TO_STDOUT", Allowed::OneOf(&["0", "1"]), "print device logs to stdout"),
    ("TOKENIZERS_PARALLELISM", Allowed::Bool, "HF tokenizers threads"),
    ("PYTORCH_NPU_ALLOC_CONF", Allowed::AllocConf, "caching allocator options"),
];

/// Variables the probe reports besides the table's (`env.NAME` facts).
pub(crate) const OTHER_WATCHED: &[&str] =
    &["NPUS_PER_NODE", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "ASCEND_TOOLKIT_HOME"];

/// One row per variable of the seed's table, then NPUS_PER_NODE (NPU hosts).
pub(crate) fn npu_rows(r: &mut Rows, facts: &BTreeMap<String, String>, slots: usize) {
    for (name, allowed, what) in NPU_ENV_TABLE {
        env_row(r, name, *allowed, what, fact(facts, &format!("env.{name}")));
    }
    match fact(facts, "env.NPUS_PER_NODE") {
        Some(v) if v.trim() == slots.to_string() => r.push("env:NPUS_PER_NODE", Status::Ok, v, slots.to_string(), ""),
        Some(v) => r.push(
            "env:NPUS_PER_NODE",
            Status::Fail,
            v,
            format!("{slots} (the devices this host runs)"),
            format!("set NPUS_PER_NODE={slots} in the cluster env, or remove it: the launcher sets it"),
        ),
        None => r.push("env:NPUS_PER_NODE", Status::Ok, "unset (the launcher sets it)", slots.to_string(), ""),
    }
}

/// NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME, when set, must name an interface of the host.
pub(crate) fn socket_ifname_rows(r: &mut Rows, facts: &BTreeMap<String, String>) {
    let ifaces: Vec<&str> = fact(facts, "ifaces").map(|s| s.split_whitespace().collect()).unwrap_or_default();
    for var in ["NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"] {
        if let Some(v) = fact(facts, &format!("env.{var}")) {
            // NCCL syntax: a comma list of prefixes, `^` to exclude, `=` for exact names.
            let names: Vec<&str> = v.trim_start_matches('^').split(',').map(|n| n.trim_start_matches('=')).collect();
            let excluded = v.starts_with('^');
            let missing: Vec<&str> =
                names.iter().copied().filter(|n| !ifaces.iter().any(|i| i.starts_with(n))).collect();
            if excluded || missing.is_empty() {
                r.push(format!("env:{var}"), Status::Ok, v, "an interface on this host", "");
            } else {
                r.push(
                    format!("env:{var}"),
                    Status::Fail,
                    format!("{v} (no interface {})", missing.join(", ")),
                    format!("one of: {}", ifaces.join(", ")),
                    format!("set {var} to an interface this host has, per host if they differ"),
                );
            }
        }
    }
}

fn env_row(r: &mut Rows, name: &str, allowed: Allowed, what: &str, value: Option<&str>) {
    let id = format!("env:{name}");
    let expected = match check_value(allowed, "\u{0}") {
        Err(e) => e,
        Ok(()) => String::new(),
    };
    match value {
        None => r.push(id, Status::Ok, "unset (default)", expected, ""),
        Some(v) => {
            let shown = if is_secret_name(name) { "<redacted>" } else { v };
            match check_value(allowed, v) {
                Ok(()) => r.push(id, Status::Ok, shown, expected, ""),
                Err(e) => r.push(
                    id,
                    Status::Fail,
                    shown,
                    e.clone(),
                    format!("{name} ({what}) must be {e}: fix it in the cluster `env:` or in the host's profile"),
                ),
            }
        }
    }
}
