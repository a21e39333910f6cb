//! The program the ranks will run: mm-engine at the launcher's version, or MindSpeed-MM's
//! torchrun / msrun on PATH with pretrain_vlm.py in the workdir.

use std::collections::BTreeMap;

use super::probe::fact;
use super::rules::{Rows, Status};
use crate::cluster::{ClusterSpec, Template};

/// The engine binary the probe runs with `--version` (the cluster's `engine:`, or PATH's).
pub(crate) fn engine_binary(cluster: &ClusterSpec) -> String {
    cluster.engine.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "mm-engine".into())
}

/// The rank launcher a MindSpeed-MM template runs on the hosts (None: mm-engine).
pub(crate) fn template_tool(template: Template) -> Option<&'static str> {
    match template {
        Template::MmEngine => None,
        Template::MindspeedMmTorchrun => Some("torchrun"),
        Template::MindspeedMmMsrun => Some("msrun"),
    }
}

pub(crate) fn rows(
    r: &mut Rows,
    template: Template,
    cluster: &ClusterSpec,
    facts: &BTreeMap<String, String>,
    launcher_version: &str,
) {
    match template_tool(template) {
        None => mm_engine_rows(r, cluster, facts, launcher_version),
        Some(tool) => mindspeed_rows(r, tool, facts),
    }
}

fn mm_engine_rows(r: &mut Rows, cluster: &ClusterSpec, facts: &BTreeMap<String, String>, launcher_version: &str) {
    match (fact(facts, "engine.rc"), fact(facts, "engine.out")) {
        (Some("0"), Some(out)) => {
            let version = out.split_whitespace().last().unwrap_or("");
            if version == launcher_version {
                r.push("engine", Status::Ok, out.trim(), format!("mm-engine {launcher_version}"), "");
            } else {
                r.push(
                    "engine",
                    Status::Fail,
                    out.trim(),
                    format!("mm-engine {launcher_version} (the launcher's version)"),
                    "install the matching mm-engine on this host, or point `engine:` at it",
                );
            }
        }
        (Some("missing"), _) => {
            let e = engine_binary(cluster);
            r.push(
                "engine",
                Status::Fail,
                format!("{e}: not found"),
                "the mm-engine binary",
                "build it (`make build`) and set `engine:` in the cluster file to its path on the hosts",
            );
        }
        (rc, out) => r.push(
            "engine",
            Status::Fail,
            format!("`mm-engine --version` exited {}: {}", rc.unwrap_or("?"), out.unwrap_or("").trim()),
            "exit 0",
            "run it by hand on the host: a missing libtorch or library path is the usual cause",
        ),
    }
}

fn mindspeed_rows(r: &mut Rows, tool: &str, facts: &BTreeMap<String, String>) {
    let get = |k: &str| fact(facts, k);
    match get(&format!("tool.{tool}.rc")) {
        Some("missing") | None => r.push(
            tool,
            Status::Fail,
            format!("{tool}: not found"),
            format!("{tool} on PATH"),
            "activate the MindSpeed-MM environment in `setup:` (e.g. `source ~/venv/bin/activate`)",
        ),
        Some(_) => r.push(tool, Status::Ok, "found", format!("{tool} on PATH"), ""),
    }
    if get("pretrain_vlm") == Some("1") {
        r.push("pretrain_vlm.py", Status::Ok, "present", "in the workdir", "");
    } else {
        r.push(
            "pretrain_vlm.py",
            Status::Fail,
            "not in the workdir",
            "MindSpeed-MM's pretrain_vlm.py",
            "set `workdir:` to the MindSpeed-MM checkout on this host",
        );
    }
}
