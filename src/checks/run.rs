//! Running the checks: the probe on every host in parallel, each host's facts evaluated,
//! the launcher's own rows first, `--skip-check` applied last.

use super::evaluate::evaluate;
use super::launcher;
use super::probe::{parse_probe, probe_script, ProbeTarget};
use super::rules::{is_skipped, CheckRow};
use crate::cluster::ClusterSpec;
use crate::plan::Plan;

/// Runs the probe on every host in parallel (threads: ssh2 is blocking) and evaluates it;
/// rows come back grouped by host in node order, then filtered by `skips`.
pub fn run_all(plan: &Plan, cluster: &ClusterSpec, skips: &[String], launcher_version: &str) -> Vec<CheckRow> {
    let env = |k: &str| std::env::var(k).ok();
    let mut rows = launcher::rows(cluster);
    let per_host: Vec<Vec<CheckRow>> = std::thread::scope(|scope| {
        let handles: Vec<_> = plan
            .nodes
            .iter()
            .map(|node| {
                scope.spawn(move || {
                    let target = ProbeTarget {
                        node,
                        is_master: node.host.address == plan.master_addr || (node.node_rank == 0 && cluster.local),
                    };
                    let script = probe_script(plan, cluster, &target);
                    let result: Result<crate::ssh::Captured, String> = if cluster.local {
                        crate::ssh::run_capture_local(&script, None).map_err(|e| format!("cannot run bash: {e}"))
                    } else {
                        let t = crate::ssh::SshTarget::new(cluster, &node.host, &env);
                        t.connect()
                            .and_then(|s| crate::ssh::run_capture(&s, &node.host.name, &script))
                            .map_err(|e| e.to_string())
                    };
                    let facts = result.map(|c| parse_probe(&c.stdout));
                    evaluate(plan, cluster, &target, facts.as_ref().map_err(|e| e.as_str()), launcher_version)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
    });
    rows.extend(per_host.into_iter().flatten());
    rows.retain(|r| !is_skipped(&r.check, skips));
    rows
}
