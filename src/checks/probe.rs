//! The probe: one bash script per host (one round trip) that reports every fact the checks
//! need, and the parser of what it prints.
//!
//! The script runs the cluster's `setup:` lines and exports the cluster and host `env:`
//! first, so it sees exactly the environment the ranks will get. Each fact comes back as one
//! `name<TAB>base64(value)` line, so no output of a tool can be mistaken for another fact.
//! A tool a host lacks (no npu-smi on a GPU box) is reported as `missing`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::devices::ASCEND_SET_ENV;
use super::engine::template_tool;
use super::env::{NPU_ENV_TABLE, OTHER_WATCHED};
use super::paths::{job_paths, save_dir};
use crate::cluster::{Accelerator, ClusterSpec, Template};
use crate::plan::{NodePlan, Plan};
use crate::render::shell_quote;

/// What the probe needs to know about one host.
#[derive(Debug, Clone)]
pub struct ProbeTarget<'a> {
    pub node: &'a NodePlan,
    pub is_master: bool,
}

/// The bash script run on a host. Its stdout is `name\tbase64(value)` lines.
pub fn probe_script(plan: &Plan, cluster: &ClusterSpec, target: &ProbeTarget) -> String {
    let mut s = String::new();
    s.push_str("emit() { printf '%s\\t%s\\n' \"$1\" \"$(printf '%s' \"$2\" | base64 -w0)\"; }\n");
    s.push_str("emit probe ok\n");
    // The ranks' order: the cluster's env first, then the setup lines (which may override
    // it, e.g. a sourced set_env.sh).
    let mut env = cluster.env.clone();
    env.extend(target.node.host.env.clone());
    for (k, v) in &env {
        let _ = writeln!(s, "export {k}={}", shell_quote(v));
    }
    // Setup lines may fail (a missing set_env.sh): record it, keep probing.
    for (i, line) in cluster.setup.iter().enumerate() {
        let _ = writeln!(s, "{{ {line}\n}} >/dev/null 2>&1; emit setup.{i} $?");
    }
    if let Some(w) = &cluster.workdir {
        let _ = writeln!(s, "cd {} 2>/dev/null; emit workdir $?", shell_quote(&w.display().to_string()));
    }
    let mut watched: Vec<&str> = NPU_ENV_TABLE.iter().map(|(n, _, _)| *n).collect();
    watched.extend(OTHER_WATCHED);
    for name in watched {
        let _ = writeln!(s, "[ -n \"${{{name}+x}}\" ] && emit env.{name} \"${name}\"");
    }
    // The cores the ranks may run on (the CPU affinity). Plain `nproc` obeys OMP_NUM_THREADS
    // and OMP_THREAD_LIMIT, which the cluster env often sets to 1 for CPU ranks.
    s.push_str(
        "emit nproc \"$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null)\"\n",
    );
    s.push_str("emit ifaces \"$(ls /sys/class/net 2>/dev/null)\"\n");
    let _ = writeln!(s, "[ -f {ASCEND_SET_ENV} ] && emit ascend_set_env 1 || emit ascend_set_env 0");
    s.push_str("[ -n \"${ASCEND_TOOLKIT_HOME:-}\" ] && { [ -d \"$ASCEND_TOOLKIT_HOME\" ] && emit ascend_home_dir 1 || emit ascend_home_dir 0; }\n");
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
    // Device memory against the plan's estimate: the first NPU's HBM, every GPU's total, or
    // for CPU ranks the host's memory (which its ranks share).
    match plan.accelerator {
        Accelerator::Npu => s.push_str("emit mem.npu \"$(npu-smi info -t memory -i 0 2>/dev/null)\"\n"),
        Accelerator::Gpu => s.push_str(
            "emit mem.gpu \"$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null)\"\n",
        ),
        Accelerator::Cpu => {}
    }
    s.push_str("emit mem.host \"$(awk '/^MemTotal:/{print $2}' /proc/meminfo 2>/dev/null)\"\n");
    match template_tool(plan.template) {
        None => {
            let e = shell_quote(&cluster.engine_command());
            let _ = writeln!(
                s,
                "if p=$(command -v {e}); then out=$({e} --version 2>&1); emit engine.rc $?; emit engine.out \"$out\"; emit engine.path \"$p\"; else emit engine.rc missing; fi"
            );
        }
        Some(t) => tool(&mut s, t, &format!("{t} --help")),
    }
    if plan.template != Template::MmEngine {
        s.push_str("[ -f pretrain_vlm.py ] && emit pretrain_vlm 1 || emit pretrain_vlm 0\n");
    }
    for (name, path) in job_paths(plan) {
        let _ = writeln!(s, "[ -e {p} ] && emit path.{name} 1 || emit path.{name} 0", p = shell_quote(&path));
    }
    if let Some(save) = save_dir(plan) {
        // Free bytes on the filesystem that will hold the save dir (its nearest existing parent).
        let _ = writeln!(
            s,
            "d={}; while [ ! -e \"$d\" ] && [ \"$d\" != . ] && [ \"$d\" != / ]; do d=$(dirname \"$d\"); done; emit disk.free \"$(df -P -B1 \"$d\" 2>/dev/null | awk 'NR==2{{print $4}}')\"",
            shell_quote(&save)
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

/// One fact of a parsed probe.
pub(crate) fn fact<'f>(facts: &'f BTreeMap<String, String>, name: &str) -> Option<&'f str> {
    facts.get(name).map(String::as_str)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::{evaluate, Status};

    /// The cores this process may run on (sched_getaffinity), as the ranks would.
    fn affinity_cores() -> usize {
        // SAFETY: a zeroed cpu_set_t is valid; the call fills it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set), 0);
            libc::CPU_COUNT(&set) as usize
        }
    }

    /// clusters/local.yaml sets OMP_NUM_THREADS=1 for its CPU ranks; the probe still counts
    /// the cores they may use, so two ranks on a 2-core machine get no cpu-cores warning.
    #[test]
    fn cpu_cores_are_the_affinity_not_omp_num_threads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clusters/local.yaml");
        let cluster = ClusterSpec::from_file(&path).unwrap();
        assert_eq!(cluster.env.get("OMP_NUM_THREADS").map(String::as_str), Some("1"));
        let recipe = crate::recipe::Recipe::resolve("tiny", None, None, &[]).unwrap();
        let plan = Plan::build(&cluster, &recipe).unwrap();
        let target = ProbeTarget { node: &plan.nodes[0], is_master: true };
        // The agent runs a probe exactly so: `bash -c SCRIPT`.
        let out =
            std::process::Command::new("bash").arg("-c").arg(probe_script(&plan, &cluster, &target)).output().unwrap();
        let facts = parse_probe(&String::from_utf8_lossy(&out.stdout));
        let cores = affinity_cores();
        assert_eq!(facts.get("nproc").map(|v| v.trim()), Some(cores.to_string().as_str()), "{facts:?}");
        let rows = evaluate(&plan, &cluster, &target, Ok(&facts), "0");
        let row = rows.iter().find(|r| r.check == "cpu-cores").unwrap();
        let slots = plan.nodes[0].ranks.len();
        assert_eq!(row.found, format!("{cores} cores"));
        assert_eq!(row.status, if cores >= slots { Status::Ok } else { Status::Warn }, "{row:?}");
    }

    #[test]
    fn cpu_cores_rows_from_probe_output() {
        let cluster = ClusterSpec::embedded_local().unwrap();
        let recipe = crate::recipe::Recipe::resolve("tiny", None, None, &[]).unwrap();
        let plan = Plan::build(&cluster, &recipe).unwrap();
        let target = ProbeTarget { node: &plan.nodes[0], is_master: true };
        let slots = plan.nodes[0].ranks.len();
        let row = |nproc: &str| {
            // What bash prints for `emit probe ok; emit nproc N`.
            let b64 = |v: &str| {
                let out = std::process::Command::new("bash")
                    .arg("-c")
                    .arg(format!("printf '%s' {} | base64 -w0", shell_quote(v)))
                    .output()
                    .unwrap();
                String::from_utf8(out.stdout).unwrap()
            };
            let facts = parse_probe(&format!("noise from a setup line\nprobe\t{}\nnproc\t{}\n", b64("ok"), b64(nproc)));
            let rows = evaluate(&plan, &cluster, &target, Ok(&facts), "0");
            let r = rows.into_iter().find(|r| r.check == "cpu-cores").unwrap();
            (r.status, r.found)
        };
        assert_eq!(row(&slots.to_string()), (Status::Ok, format!("{slots} cores")));
        assert_eq!(row(&(slots + 6).to_string()), (Status::Ok, format!("{} cores", slots + 6)));
        assert_eq!(row("1"), (Status::Warn, "1 cores".to_string()));
        assert_eq!(row(""), (Status::Warn, "unknown".to_string()));
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
}
