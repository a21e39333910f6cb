//! One host's probe facts → its rows, family by family in a fixed order (host, devices,
//! environment, engine, paths, master port). Pure: no I/O.

use std::collections::BTreeMap;

use super::probe::ProbeTarget;
use super::rules::{CheckRow, Rows};
use super::{devices, engine, env, host, paths};
use crate::cluster::{Accelerator, ClusterSpec};
use crate::plan::Plan;

/// Turns one host's probe facts into check rows. `facts` is Err when the host could not be
/// reached, and says why.
pub fn evaluate(
    plan: &Plan,
    cluster: &ClusterSpec,
    target: &ProbeTarget,
    facts: Result<&BTreeMap<String, String>, &str>,
    launcher_version: &str,
) -> Vec<CheckRow> {
    let node = target.node;
    let mut r = Rows::new(&node.host.name);
    let Some(facts) = host::reachable(&mut r, cluster, facts) else { return r.rows };
    host::setup_rows(&mut r, cluster, facts);
    let slots = node.ranks.len();
    devices::rows(&mut r, plan.accelerator, facts, slots);
    if let Some(peak) = plan.memory.peak().map(|s| s.total) {
        let options =
            |budget: f64| crate::plan::memory::describe_options(&crate::plan::memory::options_that_fit(plan, budget));
        devices::memory_row(&mut r, plan.accelerator, facts, slots, peak, &options);
    }
    if plan.accelerator == Accelerator::Npu {
        env::npu_rows(&mut r, facts, slots);
    }
    env::socket_ifname_rows(&mut r, facts);
    engine::rows(&mut r, plan.template, cluster, facts, launcher_version);
    paths::rows(&mut r, plan, facts);
    host::master_port_rows(&mut r, plan, target, facts);
    r.rows
}
