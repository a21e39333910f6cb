//! The program the ranks will run: mm-engine at the launcher's version, or MindSpeed-MM's
//! torchrun / msrun on PATH with pretrain_vlm.py in the workdir.

use std::collections::BTreeMap;

use super::probe::fact;
use super::rules::{Rows, Status};
use crate::cluster::{ClusterSpec, Template};

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
            // Which binary: the table says, so a stale one on PATH is seen at once.
            let at = fact(facts, "engine.path").map(|p| format!(" at {}", p.trim())).unwrap_or_default();
            if version == launcher_version {
                r.push(
                    "engine",
                    Status::Ok,
                    format!("{}{at}", out.trim()),
                    format!("mm-engine {launcher_version}"),
                    "",
                );
            } else {
                r.push(
                    "engine",
                    Status::Fail,
                    format!("{}{at}", out.trim()),
                    format!("mm-engine {launcher_version} (the launcher's version)"),
                    "install the matching mm-engine on this host, or point `engine:` at it",
                );
            }
        }
        (Some("missing"), _) => {
            let e = cluster.engine_command();
            let (found, fix) = match (&cluster.engine, cluster.local) {
                (Some(_), _) => (format!("{e}: no such executable"), "fix `engine:` in the cluster file".to_string()),
                (None, true) => (
                    "mm-engine: neither beside this launcher nor on PATH".into(),
                    "build it (`make build` puts it beside `launch` in target/release), or set `engine:` to its path"
                        .into(),
                ),
                (None, false) => (
                    "mm-engine: not on this host's PATH".into(),
                    "install mm-engine on this host and set `engine:` in the cluster file to its path there".into(),
                ),
            };
            r.push("engine", Status::Fail, found, "the mm-engine binary", fix);
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
