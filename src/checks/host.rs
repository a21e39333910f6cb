//! The host itself: whether the probe reached it and ran, the cluster's `setup:` lines and
//! `workdir:`, and (on the master) whether the rendezvous port is free.

use std::collections::BTreeMap;

use super::probe::{fact, ProbeTarget};
use super::rules::{Rows, Status};
use crate::cluster::ClusterSpec;
use crate::plan::Plan;

/// The `reachable` row. Returns the facts when the probe ran; `facts` is Err (why) when the
/// host could not be reached.
pub(crate) fn reachable<'f>(
    r: &mut Rows,
    cluster: &ClusterSpec,
    facts: Result<&'f BTreeMap<String, String>, &str>,
) -> Option<&'f BTreeMap<String, String>> {
    match facts {
        Ok(f) if fact(f, "probe") == Some("ok") => {
            r.push("reachable", Status::Ok, "probe ran", "", "");
            Some(f)
        }
        Ok(_) => {
            r.push(
                "reachable",
                Status::Fail,
                "the probe printed nothing usable",
                "probe output",
                "run `bash -l` on the host and check that its login scripts do not exit or print binary noise",
            );
            None
        }
        Err(e) => {
            let how = if cluster.local {
                "check that bash is installed"
            } else {
                "check the address, ssh user/port/keys and known_hosts in the cluster file"
            };
            r.push("reachable", Status::Fail, e, "a shell on the host", how);
            None
        }
    }
}

/// One row per `setup:` line (its exit status), and the workdir if one is set.
pub(crate) fn setup_rows(r: &mut Rows, cluster: &ClusterSpec, facts: &BTreeMap<String, String>) {
    for (i, line) in cluster.setup.iter().enumerate() {
        let line = crate::render::redact_line(line);
        match fact(facts, &format!("setup.{i}")) {
            Some("0") => r.push(format!("setup:{i}"), Status::Ok, line.as_str(), "exit 0", ""),
            Some(rc) => r.push(
                format!("setup:{i}"),
                Status::Fail,
                format!("`{line}` exited {rc}"),
                "exit 0",
                "fix the setup line or the path it sources on this host",
            ),
            None => {}
        }
    }
    if cluster.workdir.is_some() && fact(facts, "workdir") != Some("0") {
        let w = cluster.workdir.as_ref().map(|w| w.display().to_string()).unwrap_or_default();
        r.push(
            "workdir",
            Status::Fail,
            format!("cannot cd to {w}"),
            "an existing directory",
            "create it or fix `workdir:` in the cluster file",
        );
    }
}

/// On the master host, with a fixed port: nothing may listen on it yet.
pub(crate) fn master_port_rows(r: &mut Rows, plan: &Plan, target: &ProbeTarget, facts: &BTreeMap<String, String>) {
    if target.is_master && plan.master_port != 0 {
        match fact(facts, "port.listeners") {
            Some(l) if !l.trim().is_empty() => r.push(
                "master-port",
                Status::Fail,
                format!("port {} is in use", plan.master_port),
                "a free port",
                "another job uses it: pick another `master.port`, or 0 to choose a free one at launch",
            ),
            Some(_) => r.push("master-port", Status::Ok, format!("port {} free", plan.master_port), "a free port", ""),
            None => {}
        }
    }
}
