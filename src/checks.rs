//! Environment checks: one probe script per host (one round trip), run on every host in
//! parallel, then pure evaluation of what it reported into a table of host × check rows.
//!
//! The probe runs the cluster's `setup:` lines and exports the cluster and host `env:` first,
//! so it sees exactly the environment the ranks will get. Each fact comes back as one
//! `name<TAB>base64(value)` line, so no output of a tool can be mistaken for another fact.
//! A tool a host lacks (no npu-smi on a GPU box) is reported as missing, and the check says
//! so plainly instead of failing obscurely.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::cluster::{Accelerator, ClusterSpec, Template};
use crate::plan::{NodePlan, Plan};
use crate::render::{is_secret_name, shell_quote};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Skip,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Skip => "skip",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckRow {
    pub host: String,
    /// Stable id, usable with --skip-check (e.g. `env:HCCL_CONNECT_TIMEOUT`, `npu-count`).
    pub check: String,
    pub status: Status,
    pub found: String,
    pub expected: String,
    /// How to fix it (empty when ok).
    pub fix: String,
}

/// The seed's table of Ascend environment variables and their allowed values.
#[derive(Debug, Clone, Copy)]
pub enum Allowed {
    IntRange(i64, i64),
    OneOf(&'static [&'static str]),
    Bool,
    AllocConf,
}

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

/// Keys PYTORCH_NPU_ALLOC_CONF accepts (torch_npu mirrors PYTORCH_CUDA_ALLOC_CONF).
const ALLOC_KEYS: &[&str] =
    &["expandable_segments", "max_split_size_mb", "garbage_collection_threshold", "roundup_power2_divisions"];

/// Checks a value against the table entry; Err holds what was expected.
pub fn check_value(allowed: Allowed, value: &str) -> Result<(), String> {
    let v = value.trim();
    match allowed {
        Allowed::IntRange(lo, hi) => match v.parse::<i64>() {
            Ok(n) if (lo..=hi).contains(&n) => Ok(()),
            Ok(_) => Err(format!("an integer in [{lo}, {hi}]")),
            Err(_) => Err(format!("an integer in [{lo}, {hi}] (found a non-integer)")),
        },
        Allowed::OneOf(vals) => {
            if vals.contains(&v) {
                Ok(())
            } else {
                Err(format!("one of {}", vals.join(", ")))
            }
        }
        Allowed::Bool => match v.to_ascii_lowercase().as_str() {
            "true" | "false" => Ok(()),
            _ => Err("true or false".into()),
        },
        Allowed::AllocConf => {
            let expected = || {
                format!(
                    "comma-separated key:value pairs with keys {}, e.g. expandable_segments:True",
                    ALLOC_KEYS.join(", ")
                )
            };
            for part in v.split(',') {
                let Some((k, val)) = part.split_once(':') else { return Err(expected()) };
                let ok = match k.trim() {
                    "expandable_segments" => matches!(val.trim(), "True" | "False"),
                    "max_split_size_mb" | "roundup_power2_divisions" => val.trim().parse::<u64>().is_ok(),
                    "garbage_collection_threshold" => {
                        val.trim().parse::<f64>().map(|x| x > 0.0 && x < 1.0).unwrap_or(false)
                    }
                    _ => false,
                };
                if !ok {
                    return Err(expected());
                }
            }
            Ok(())
        }
    }
}

/// What the probe needs to know about one host.
#[derive(Debug, Clone)]
pub struct ProbeTarget<'a> {
    pub node: &'a NodePlan,
    pub is_master: bool,
}

const ASCEND_SET_ENV: &str = "/usr/local/Ascend/ascend-toolkit/set_env.sh";

/// The bash script run on a host. Its stdout is `name\tbase64(value)` lines.
pub fn probe_script(plan: &Plan, cluster: &ClusterSpec, target: &ProbeTarget) -> String {
    let mut s = String::new();
    s.push_str("emit() { printf '%s\\t%s\\n' \"$1\" \"$(printf '%s' \"$2\" | base64 -w0)\"; }\n");
    s.push_str("emit probe ok\n");
    // Setup lines may fail (a missing set_env.sh): record it, keep probing.
    for (i, line) in cluster.setup.iter().enumerate() {
        let _ = writeln!(s, "{{ {line}\n}} >/dev/null 2>&1; emit setup.{i} $?");
    }
    let mut env = cluster.env.clone();
    env.extend(target.node.host.env.clone());
    for (k, v) in &env {
        let _ = writeln!(s, "export {k}={}", shell_quote(v));
    }
    if let Some(w) = &cluster.workdir {
        let _ = writeln!(s, "cd {} 2>/dev/null; emit workdir $?", shell_quote(&w.display().to_string()));
    }
    let mut watched: Vec<&str> = NPU_ENV_TABLE.iter().map(|(n, _, _)| *n).collect();
    watched.extend(["NPUS_PER_NODE", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "ASCEND_TOOLKIT_HOME"]);
    for name in watched {
        let _ = writeln!(s, "[ -n \"${{{name}+x}}\" ] && emit env.{name} \"${name}\"");
    }
    s.push_str("emit nproc \"$(nproc 2>/dev/null)\"\n");
    s.push_str("emit ifaces \"$(ls /sys/class/net 2>/dev/null)\"\n");
    let _ = writeln!(s, "[ -f {ASCEND_SET_ENV} ] && emit ascend_set_env 1 || emit ascend_set_env 0");
    let tool = |s: &mut String, name: &str, cmd: &str| {
        let _ = writeln!(
            s,
            "if command -v {name} >/dev/null 2>&1; then out=$({cmd} 2>&1); emit tool.{name}.rc $?; emit tool.{name}.out \"$out\"; else emit tool.{name}.rc missing; fi"
        );
    };
    match plan.accelerator {
        Accelerator::Npu => tool(&mut s, "npu-smi", "npu-smi info -l"),
        Accelerator::Gpu => tool(&mut s, "nvidia-smi", "nvidia-smi -L"),
        Accelerator::Cpu => {}
    }
    match plan.template {
        Template::MmEngine => {
            let engine = cluster.engine.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "mm-engine".into());
            let e = shell_quote(&engine);
            let _ = writeln!(
                s,
                "if command -v {e} >/dev/null 2>&1; then out=$({e} --version 2>&1); emit engine.rc $?; emit engine.out \"$out\"; else emit engine.rc missing; fi"
            );
        }
        Template::MindspeedMmTorchrun => tool(&mut s, "torchrun", "torchrun --help"),
        Template::MindspeedMmMsrun => tool(&mut s, "msrun", "msrun --help"),
    }
    if plan.template != Template::MmEngine {
        s.push_str("[ -f pretrain_vlm.py ] && emit pretrain_vlm 1 || emit pretrain_vlm 0\n");
    }
    for (name, path) in job_paths(plan) {
        let _ = writeln!(s, "[ -e {p} ] && emit path.{name} 1 || emit path.{name} 0", p = shell_quote(&path));
    }
    if let Some(save) = &plan.recipe.checkpoint.save {
        // Free bytes on the filesystem that will hold the save dir (its nearest existing parent).
        let _ = writeln!(
            s,
            "d={}; while [ ! -e \"$d\" ] && [ \"$d\" != . ] && [ \"$d\" != / ]; do d=$(dirname \"$d\"); done; emit disk.free \"$(df -P -B1 \"$d\" 2>/dev/null | awk 'NR==2{{print $4}}')\"",
            shell_quote(&save.display().to_string())
        );
    }
    if target.is_master && plan.master_port != 0 {
        let p = plan.master_port;
        let _ = writeln!(
            s,
            "if command -v ss >/dev/null 2>&1; then emit port.listeners \"$(ss -Hltn 'sport = :{p}' 2>/dev/null)\"; elif (exec 3<>/dev/tcp/127.0.0.1/{p}) 2>/dev/null; then emit port.listeners busy; else emit port.listeners ''; fi"
        );
    }
    s
}

fn job_paths(plan: &Plan) -> Vec<(&'static str, String)> {
    let r = &plan.recipe;
    [
        ("load", &r.checkpoint.load),
        ("data_path", &r.data.data_path),
        ("data_folder", &r.data.data_folder),
        ("tokenizer", &r.checkpoint.tokenizer),
    ]
    .into_iter()
    .filter_map(|(n, p)| p.as_ref().map(|p| (n, p.display().to_string())))
    .collect()
}

/// Decodes the probe's `name\tbase64` lines; anything else (a setup line's noise) is ignored.
pub fn parse_probe(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('\t')?;
            let bytes = base64_decode(v.trim())?;
            Some((k.to_string(), String::from_utf8_lossy(&bytes).into_owned()))
        })
        .collect()
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes: Vec<u8> = s.bytes().filter(|b| *b != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let n = chunk.len().saturating_sub(1);
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + n]);
    }
    Some(out)
}

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

struct Rows<'a> {
    host: &'a str,
    rows: Vec<CheckRow>,
}

impl Rows<'_> {
    fn push(
        &mut self,
        check: impl Into<String>,
        status: Status,
        found: impl Into<String>,
        expected: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.rows.push(CheckRow {
            host: self.host.to_string(),
            check: check.into(),
            status,
            found: found.into(),
            expected: expected.into(),
            fix: fix.into(),
        });
    }
}

/// Turns one host's probe facts into check rows. `facts` is None when the host could not
/// be reached; `reach_error` then says why.
pub fn evaluate(
    plan: &Plan,
    cluster: &ClusterSpec,
    target: &ProbeTarget,
    facts: Result<&BTreeMap<String, String>, &str>,
    launcher_version: &str,
) -> Vec<CheckRow> {
    let node = target.node;
    let mut r = Rows { host: &node.host.name, rows: Vec::new() };
    let facts = match facts {
        Ok(f) if f.get("probe").map(String::as_str) == Some("ok") => {
            r.push("reachable", Status::Ok, "probe ran", "", "");
            f
        }
        Ok(_) => {
            r.push(
                "reachable",
                Status::Fail,
                "the probe printed nothing usable",
                "probe output",
                "run `bash -l` on the host and check that its login scripts do not exit or print binary noise",
            );
            return r.rows;
        }
        Err(e) => {
            let how = if cluster.local {
                "check that bash is installed"
            } else {
                "check the address, ssh user/port/keys and known_hosts in the cluster file"
            };
            r.push("reachable", Status::Fail, e, "a shell on the host", how);
            return r.rows;
        }
    };
    let get = |k: &str| facts.get(k).map(String::as_str);

    for (i, line) in cluster.setup.iter().enumerate() {
        match get(&format!("setup.{i}")) {
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
    if cluster.workdir.is_some() && get("workdir") != Some("0") {
        let w = cluster.workdir.as_ref().map(|w| w.display().to_string()).unwrap_or_default();
        r.push(
            "workdir",
            Status::Fail,
            format!("cannot cd to {w}"),
            "an existing directory",
            "create it or fix `workdir:` in the cluster file",
        );
    }

    // Accelerator devices.
    let slots = node.ranks.len();
    match plan.accelerator {
        Accelerator::Npu => {
            if get("ascend_set_env") == Some("1") || get("env.ASCEND_TOOLKIT_HOME").is_some() {
                r.push("ascend-env", Status::Ok, ASCEND_SET_ENV, "present", "");
            } else {
                r.push(
                    "ascend-env",
                    Status::Fail,
                    format!("{ASCEND_SET_ENV} not found and ASCEND_TOOLKIT_HOME unset"),
                    "the CANN toolkit installed",
                    "install CANN, or add `source <toolkit>/set_env.sh` to `setup:` in the cluster file",
                );
            }
            device_count(
                &mut r,
                "npu-count",
                "npu-smi",
                get("tool.npu-smi.rc"),
                get("tool.npu-smi.out"),
                npu_count,
                slots,
            );
            for (name, allowed, what) in NPU_ENV_TABLE {
                env_row(&mut r, name, *allowed, what, get(&format!("env.{name}")));
            }
            match get("env.NPUS_PER_NODE") {
                Some(v) if v.trim() == slots.to_string() => {
                    r.push("env:NPUS_PER_NODE", Status::Ok, v, slots.to_string(), "")
                }
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
        Accelerator::Gpu => {
            device_count(
                &mut r,
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
    let ifaces: Vec<&str> = get("ifaces").map(|s| s.split_whitespace().collect()).unwrap_or_default();
    for var in ["NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"] {
        if let Some(v) = get(&format!("env.{var}")) {
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

    // The program that will run.
    match plan.template {
        Template::MmEngine => match (get("engine.rc"), get("engine.out")) {
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
                let e = cluster.engine.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "mm-engine".into());
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
        },
        t => {
            let tool = if t == Template::MindspeedMmMsrun { "msrun" } else { "torchrun" };
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
    }

    for (name, path) in job_paths(plan) {
        match get(&format!("path.{name}")) {
            Some("1") => r.push(format!("path:{name}"), Status::Ok, path, "exists", ""),
            _ => r.push(
                format!("path:{name}"),
                Status::Fail,
                format!("{path}: not found"),
                "an existing path on every host",
                format!("copy it to this host or fix `job.{name}` (relative paths start at the workdir)"),
            ),
        }
    }
    if let Some(free) = get("disk.free").and_then(|v| v.trim().parse::<u64>().ok()) {
        let need = plan.checkpoint_bytes;
        let st = if free >= need { Status::Ok } else { Status::Fail };
        r.push(
            "disk",
            st,
            format!("{} free", human_bytes(free)),
            format!("≥ {} (one checkpoint)", human_bytes(need)),
            if st == Status::Ok {
                String::new()
            } else {
                "free space at the save path or point job.save elsewhere".into()
            },
        );
    }
    if target.is_master && plan.master_port != 0 {
        match get("port.listeners") {
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
    r.rows
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

pub use mm_spec::human_bytes;

/// The table `launch check` prints: one line per row, failures last with their fixes.
pub fn format_table(rows: &[CheckRow]) -> String {
    let w_host = rows.iter().map(|r| r.host.len()).max().unwrap_or(4).max(4);
    let w_check = rows.iter().map(|r| r.check.len()).max().unwrap_or(5).max(5);
    let mut out = String::new();
    let _ = writeln!(out, "{:<w_host$}  {:<w_check$}  {:<6}  found / expected", "host", "check", "status");
    for row in rows {
        let _ = writeln!(
            out,
            "{:<w_host$}  {:<w_check$}  {:<6}  {}{}",
            row.host,
            row.check,
            row.status.as_str(),
            row.found,
            if row.expected.is_empty() || row.status == Status::Ok {
                String::new()
            } else {
                format!("  (expected {})", row.expected)
            }
        );
    }
    let bad: Vec<&CheckRow> = rows.iter().filter(|r| r.status >= Status::Warn).collect();
    if !bad.is_empty() {
        let _ = writeln!(out);
        for row in bad {
            let _ = writeln!(
                out,
                "{} {} on {}: found {}, expected {}{}",
                if row.status == Status::Fail { "error:" } else { "warning:" },
                row.check,
                row.host,
                row.found,
                row.expected,
                if row.fix.is_empty() { String::new() } else { format!("\n  fix: {}", row.fix) }
            );
        }
    }
    let fails = rows.iter().filter(|r| r.status == Status::Fail).count();
    let warns = rows.iter().filter(|r| r.status == Status::Warn).count();
    let _ = writeln!(out, "\n{} checks: {} failed, {} warnings", rows.len(), fails, warns);
    out
}

/// Whether `id` is skipped by one of the --skip-check values (an id, or its prefix before `:`).
pub fn is_skipped(id: &str, skips: &[String]) -> bool {
    skips.iter().any(|s| s == id || id.split(':').next() == Some(s.as_str()))
}

/// Runs the probe on every host in parallel (threads: ssh2 is blocking) and evaluates it;
/// rows come back grouped by host in node order, then filtered by `skips`.
pub fn run_all(plan: &Plan, cluster: &ClusterSpec, skips: &[String], launcher_version: &str) -> Vec<CheckRow> {
    let env = |k: &str| std::env::var(k).ok();
    let mut rows = launcher_rows(cluster);
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

/// Checks of the launching machine itself: what SSH will need.
fn launcher_rows(cluster: &ClusterSpec) -> Vec<CheckRow> {
    let mut r = Rows { host: "(launcher)", rows: Vec::new() };
    if cluster.local {
        return r.rows;
    }
    match &cluster.ssh.known_hosts {
        Some(p) if !p.exists() && cluster.ssh.strict_host_key_checking == crate::cluster::StrictMode::Strict => r.push(
            "known-hosts",
            Status::Fail,
            format!("{} does not exist", p.display()),
            "the hosts' keys",
            "create it with ssh-keyscan after verifying the fingerprints",
        ),
        _ => {}
    }
    for f in &cluster.ssh.identity_files {
        if std::fs::File::open(f).is_err() {
            r.push(
                "identity-file",
                Status::Fail,
                format!("{}: unreadable", f.display()),
                "a readable private key",
                "fix `ssh.identity_files`",
            );
        }
    }
    r.rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_table_ranges() {
        assert!(check_value(Allowed::IntRange(120, 7200), "1200").is_ok());
        assert!(check_value(Allowed::IntRange(120, 7200), "119").is_err());
        assert!(check_value(Allowed::IntRange(120, 7200), "7201").is_err());
        assert!(check_value(Allowed::IntRange(68, 17340), "abc").is_err());
        assert!(check_value(Allowed::OneOf(&["0", "1", "2"]), "3").is_err());
        assert!(check_value(Allowed::Bool, "False").is_ok());
        assert!(check_value(Allowed::Bool, "no").is_err());
        assert!(check_value(Allowed::AllocConf, "expandable_segments:True").is_ok());
        assert!(check_value(Allowed::AllocConf, "expandable_segments:True,max_split_size_mb:128").is_ok());
        assert!(check_value(Allowed::AllocConf, "expandable_segments=True").is_err());
        assert!(check_value(Allowed::AllocConf, "garbage_collection_threshold:1.5").is_err());
    }

    #[test]
    fn base64_round_trip_with_bash() {
        let text = "a\tb\nc: ü $(x)";
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!("printf '%s' {} | base64 -w0", shell_quote(text)))
            .output()
            .unwrap();
        assert_eq!(base64_decode(&String::from_utf8(out.stdout).unwrap()).unwrap(), text.as_bytes());
    }

    #[test]
    fn device_counts() {
        assert_eq!(npu_count("\tTotal Count                    : 8\n\n\tNPU ID : 0\n"), Some(8));
        assert_eq!(npu_count("NPU ID : 0\nNPU ID : 1\n"), Some(2));
        assert_eq!(npu_count("garbage"), None);
        assert_eq!(gpu_count("GPU 0: NVIDIA H100 (UUID: x)\nGPU 1: NVIDIA H100 (UUID: y)\n"), 2);
    }

    #[test]
    fn skip_by_id_or_family() {
        let skips = vec!["env".to_string(), "disk".to_string()];
        assert!(is_skipped("env:HCCL_CONNECT_TIMEOUT", &skips));
        assert!(is_skipped("disk", &skips));
        assert!(!is_skipped("npu-count", &skips));
    }
}
