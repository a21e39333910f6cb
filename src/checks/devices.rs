//! The devices a host must have for its ranks: the CANN toolkit and the NPU count
//! (`npu-smi`), the GPU count (`nvidia-smi`), or, for CPU ranks, the cores they may run on.

use std::collections::BTreeMap;

use super::probe::fact;
use super::rules::{Rows, Status};
use crate::cluster::Accelerator;

pub(crate) const ASCEND_SET_ENV: &str = "/usr/local/Ascend/ascend-toolkit/set_env.sh";

/// Device count from `npu-smi info -l` ("Total Count : 8", or one "NPU ID" line per device).
pub fn npu_count(out: &str) -> Option<usize> {
    for line in out.lines() {
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("Total Count") {
                return v.trim().parse().ok();
            }
        }
    }
    let ids = out.lines().filter(|l| l.trim_start().starts_with("NPU ID")).count();
    (ids > 0).then_some(ids)
}

/// Device count from `nvidia-smi -L` (one "GPU n: …" line per device).
pub fn gpu_count(out: &str) -> usize {
    out.lines().filter(|l| l.starts_with("GPU ")).count()
}

/// HBM per NPU in bytes from `npu-smi info -t memory -i 0` ("HBM Capacity(MB) : 65536").
pub fn npu_memory(out: &str) -> Option<u64> {
    out.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            let k = k.trim();
            (k.starts_with("HBM Capacity") && k.contains("MB")).then(|| v.trim().parse::<u64>().ok())?
        })
        .map(|mb| mb * 1024 * 1024)
}

/// The smallest GPU's memory in bytes from `nvidia-smi --query-gpu=memory.total
/// --format=csv,noheader,nounits` (MiB, one line per GPU).
pub fn gpu_memory(out: &str) -> Option<u64> {
    out.lines().filter_map(|l| l.trim().parse::<u64>().ok()).min().map(|mib| mib * 1024 * 1024)
}

/// The `memory` row: the plan's busiest device (`need` bytes) against what one device of this
/// host has, per rank for CPU ranks (they share the host's memory). Warns, with the recipe
/// changes that would fit (`options` of a budget), above [`crate::plan::memory::USABLE_FRACTION`].
pub(crate) fn memory_row(
    r: &mut Rows,
    accelerator: Accelerator,
    facts: &BTreeMap<String, String>,
    slots: usize,
    need: f64,
    options: &dyn Fn(f64) -> String,
) {
    let get = |k: &str| fact(facts, k);
    let host = get("mem.host").and_then(|v| v.trim().parse::<u64>().ok()).map(|kib| kib * 1024);
    let (have, source) = match accelerator {
        Accelerator::Npu => (get("mem.npu").and_then(npu_memory), "per NPU (npu-smi)"),
        Accelerator::Gpu => (get("mem.gpu").and_then(gpu_memory), "per GPU (nvidia-smi)"),
        Accelerator::Cpu => (host.map(|b| b / slots.max(1) as u64), "per rank: host memory ÷ ranks on it"),
    };
    let expected = format!(
        "the estimate for the busiest device, {}, within {:.0}% of it",
        mm_spec::human_bytes(need as u64),
        crate::plan::memory::USABLE_FRACTION * 100.0
    );
    let Some(have) = have else {
        r.push("memory", Status::Warn, "unknown (could not read the device memory)", expected, "");
        return;
    };
    let found = format!("{} {source}", mm_spec::human_bytes(have));
    let budget = have as f64 * crate::plan::memory::USABLE_FRACTION;
    if need <= budget {
        r.push("memory", Status::Ok, found, expected, "");
    } else {
        r.push("memory", Status::Warn, found, expected, options(budget));
    }
}

/// The rows for a host running `slots` ranks on `accelerator`.
pub(crate) fn rows(r: &mut Rows, accelerator: Accelerator, facts: &BTreeMap<String, String>, slots: usize) {
    let get = |k: &str| fact(facts, k);
    match accelerator {
        Accelerator::Npu => {
            // The ranks' ASCEND_TOOLKIT_HOME (the env, or a sourced set_env.sh) must be a
            // folder; unset, the default install's set_env.sh must be there.
            let home = get("env.ASCEND_TOOLKIT_HOME");
            match (home, get("ascend_home_dir"), get("ascend_set_env")) {
                (Some(h), Some("1"), _) => {
                    r.push("ascend-env", Status::Ok, format!("ASCEND_TOOLKIT_HOME={h}"), "a folder", "")
                }
                (None, _, Some("1")) => r.push("ascend-env", Status::Ok, ASCEND_SET_ENV, "present", ""),
                (Some(h), _, _) => r.push(
                    "ascend-env",
                    Status::Fail,
                    format!("ASCEND_TOOLKIT_HOME={h} is not a folder"),
                    "the CANN toolkit installed",
                    "point ASCEND_TOOLKIT_HOME at the installed toolkit, or `source <toolkit>/set_env.sh` in \
                     `setup:` in the cluster file",
                ),
                _ => r.push(
                    "ascend-env",
                    Status::Fail,
                    format!("{ASCEND_SET_ENV} not found and ASCEND_TOOLKIT_HOME unset"),
                    "the CANN toolkit installed",
                    "install CANN, or add `source <toolkit>/set_env.sh` to `setup:` in the cluster file",
                ),
            }
            device_count(r, "npu-count", "npu-smi", get("tool.npu-smi.rc"), get("tool.npu-smi.out"), npu_count, slots);
        }
        Accelerator::Gpu => {
            device_count(
                r,
                "gpu-count",
                "nvidia-smi",
                get("tool.nvidia-smi.rc"),
                get("tool.nvidia-smi.out"),
                |o| Some(gpu_count(o)),
                slots,
            );
        }
        Accelerator::Cpu => {
            let cores: usize = get("nproc").and_then(|v| v.trim().parse().ok()).unwrap_or(0);
            if cores == 0 {
                r.push("cpu-cores", Status::Warn, "unknown", format!("≥ {slots}"), "");
            } else if slots > cores {
                r.push(
                    "cpu-cores",
                    Status::Warn,
                    format!("{cores} cores"),
                    format!("≥ {slots} (one per rank)"),
                    format!("run at most {cores} ranks on this host: lower its devices/slots"),
                );
            } else {
                r.push("cpu-cores", Status::Ok, format!("{cores} cores"), format!("≥ {slots}"), "");
            }
        }
    }
}

fn device_count(
    r: &mut Rows,
    id: &str,
    tool: &str,
    rc: Option<&str>,
    out: Option<&str>,
    count: impl Fn(&str) -> Option<usize>,
    slots: usize,
) {
    match (rc, out) {
        (Some("missing") | None, _) => r.push(
            id,
            Status::Fail,
            format!("{tool} not found on this host"),
            format!("{tool} (the driver's tool) to count devices"),
            format!("install the driver, or check the accelerator type: this host has no {tool}"),
        ),
        (Some("0"), Some(out)) => match count(out) {
            Some(n) if n >= slots => r.push(id, Status::Ok, format!("{n} devices"), format!("≥ {slots}"), ""),
            Some(n) => r.push(
                id,
                Status::Fail,
                format!("{n} devices"),
                format!("≥ {slots} (devices_per_node or the host's device list)"),
                format!("lower devices_per_node to {n}, or list the devices this host has"),
            ),
            None => r.push(
                id,
                Status::Fail,
                format!("cannot read a device count from `{tool}`"),
                "its device list",
                format!("run `{tool}` by hand on the host"),
            ),
        },
        (Some(rc), out) => r.push(
            id,
            Status::Fail,
            format!("`{tool}` exited {rc}: {}", out.unwrap_or("").lines().next().unwrap_or("")),
            "exit 0",
            "the driver is not healthy on this host",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_memory_from_npu_smi_and_nvidia_smi() {
        let npu = "\tDDR Capacity(MB)               : 15171\n\tHBM Capacity(MB)               : 65536\n\tHBM Clock Speed(MHz) : 1600\n";
        assert_eq!(npu_memory(npu), Some(65536 * 1048576));
        assert_eq!(npu_memory("Error: invalid"), None);
        assert_eq!(gpu_memory("81559\n81559\n40960\n"), Some(40960 * 1048576));
        assert_eq!(gpu_memory(""), None);
    }

    #[test]
    fn device_counts() {
        assert_eq!(npu_count("\tTotal Count                    : 8\n\n\tNPU ID : 0\n"), Some(8));
        assert_eq!(npu_count("NPU ID : 0\nNPU ID : 1\n"), Some(2));
        assert_eq!(npu_count("garbage"), None);
        assert_eq!(gpu_count("GPU 0: NVIDIA H100 (UUID: x)\nGPU 1: NVIDIA H100 (UUID: y)\n"), 2);
    }
}
