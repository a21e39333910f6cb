//! `launch submit`: the same job as `launch finetune`, as a Slurm batch job.
//!
//! The allocation is sized from the plan: its nodes (the cluster file's hosts by name, or
//! `--nodes N` for `hosts_from: slurm`), one task per node (the launcher starts one node agent
//! per node as a step), the node's accelerators (`--gpus-per-node`, `--gres=npu:N`; a CPU per
//! rank for `accelerator: cpu`) and, for accelerators, whole nodes. Inside the job the batch script `exec`s `launch … finetune` on the
//! Slurm executor, so the launcher is the process Slurm's warning signal reaches
//! (`--signal=B:USR1@<secs>` before the time limit: the orderly stop, a checkpoint at an agreed
//! iteration) and `--requeue` lets a preempted job start again and resume from it. The job's
//! own output goes to `<log_dir>/slurm-<jobid>.out`; the run folder is `<log_dir>/<run>` as
//! for any launch, so `launch logs -f` follows it from the login node (shared file system).

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::cluster::{Accelerator, ClusterSpec, HostSource};
use crate::plan::Plan;
use crate::render::Renderer;

/// What `launch submit` adds to the job: sbatch's options.
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    pub partition: Option<String>,
    /// sbatch's `--time` (e.g. 24:00:00, 2-00:00:00).
    pub time: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// More `#SBATCH` options, each as sbatch spells it (`--mail-type=END`).
    pub extra: Vec<String>,
    /// Seconds before the time limit that Slurm sends SIGUSR1 to the launcher.
    pub warn_secs: u64,
}

/// Everything the batch script runs: the launcher, the cluster file and the job's arguments,
/// as absolute paths (the job starts elsewhere and later).
pub struct SubmitJob<'a> {
    pub launch: &'a Path,
    pub cwd: &'a Path,
    /// `launch`'s arguments inside the job (`--cluster …`, `finetune`, the model, `--set …`).
    pub args: Vec<String>,
}

/// A value that goes into an `#SBATCH` line as is: sbatch reads directives without a shell,
/// so they are limited to characters that need no quoting.
fn directive_value(what: &str, v: &str) -> Result<String, String> {
    // No `%`: sbatch expands %j, %N, … in some values.
    let ok = !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || "_.:/@,=+-[]".contains(c));
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!(
            "{what} {v:?}: an #SBATCH value may hold letters, digits and _ . : / @ , = + - [ ] only \
             (no spaces, quotes or %); choose a name or path without them"
        ))
    }
}

/// The batch script for `plan` on `cluster`.
pub fn script(
    renderer: &Renderer,
    plan: &Plan,
    cluster: &ClusterSpec,
    opts: &SubmitOptions,
    job: &SubmitJob,
) -> Result<String, String> {
    if cluster.executor != crate::cluster::Executor::Slurm {
        return Err(format!(
            "{}: the job's agents start as Slurm steps, but the cluster's executor is {}: use `hosts_from: slurm`, \
             or `executor: slurm` with the Slurm node names as hosts",
            cluster.origin.display(),
            cluster.executor.name()
        ));
    }
    let nodes = plan.nodes.len();
    let nodelist = match &cluster.host_source {
        HostSource::Slurm { .. } => None,
        _ => {
            let names: Vec<String> = plan.nodes.iter().map(|n| n.host.name.clone()).collect();
            Some(directive_value("host name", &names.join(","))?)
        }
    };
    let gres = match cluster.accelerator {
        Accelerator::Gpu => Some(format!("--gpus-per-node={}", cluster.devices_per_node)),
        Accelerator::Npu => Some(format!("--gres=npu:{}", cluster.devices_per_node)),
        // One CPU per rank at least (the launcher checks SLURM_CPUS_ON_NODE against it).
        Accelerator::Cpu => Some(format!("--cpus-per-task={}", cluster.devices_per_node)),
    };
    let mut directives = Vec::new();
    for (flag, v) in
        [("--partition", &opts.partition), ("--time", &opts.time), ("--account", &opts.account), ("--qos", &opts.qos)]
    {
        if let Some(v) = v {
            directives.push(format!("{flag}={}", directive_value(flag, v)?));
        }
    }
    for e in &opts.extra {
        if !e.starts_with("--") {
            return Err(format!("--sbatch {e:?}: expected an sbatch option as it spells it, e.g. --mail-type=END"));
        }
        directives.push(directive_value("--sbatch", e)?);
    }
    // (`join` keeps an absolute log_dir as it is.)
    let log_dir = job.cwd.join(&cluster.log_dir);
    let output = format!("{}/slurm-%j.out", directive_value("log_dir", &log_dir.display().to_string())?);
    let ctx = json!({
        "job_name": directive_value("job name", &format!("mm-{}", plan.model.name))?,
        "nodes": nodes,
        "nodelist": nodelist,
        "gres": gres,
        "exclusive": cluster.accelerator != Accelerator::Cpu,
        "directives": directives,
        "warn_secs": opts.warn_secs,
        "output": output,
        "cwd": job.cwd.display().to_string(),
        "launch": job.launch.display().to_string(),
        "args": job.args,
    });
    renderer.render_sbatch(&ctx).map_err(|e| e.to_string())
}

/// Writes the script under `<log_dir>/submit/` and hands it to `sbatch --parsable`; returns
/// the job id and the script's path. `wait`: sbatch --wait (returns when the job ends; its
/// exit code is the job's).
pub fn submit(script: &str, log_dir: &Path, model: &str, wait: bool) -> Result<(String, PathBuf, i32), String> {
    let dir = log_dir.join("submit");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let stamp = crate::logs::utc_stamp(std::time::SystemTime::now());
    let path = dir.join(format!("{stamp}-{model}.sbatch"));
    std::fs::write(&path, script).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let mut cmd = std::process::Command::new("sbatch");
    cmd.arg("--parsable");
    if wait {
        cmd.arg("--wait");
    }
    let out = cmd.arg(&path).output().map_err(|e| format!("cannot run sbatch: {e} (is Slurm's sbatch on PATH?)"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id = stdout.lines().next().unwrap_or("").split(';').next().unwrap_or("").trim().to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "sbatch refused {}: {}{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim(),
            if stdout.trim().is_empty() { String::new() } else { format!(" ({})", stdout.trim()) }
        ));
    }
    Ok((id, path, out.status.code().unwrap_or(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directive_values_need_no_quoting() {
        assert_eq!(directive_value("--time", "1-12:00:00").unwrap(), "1-12:00:00");
        assert!(directive_value("--partition", "gpu; rm -rf /").unwrap_err().contains("no spaces, quotes or %"));
        assert!(directive_value("log_dir", "/data/run-%j").is_err(), "sbatch would expand it");
        assert!(directive_value("--account", "").is_err());
    }
}
