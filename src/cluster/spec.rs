//! The checked cluster spec: [`ClusterSpec`] and its parts (hosts, accelerator, template,
//! master, ssh, job), what the planner and the renderer read. Built only by the checks
//! (`check.rs`); the file's raw serde shape lives in `raw.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use super::humane;
use crate::diag::Diagnostic;

/// The cluster file compiled into the binary: one localhost "node" with 2 CPU ranks.
pub const EMBEDDED_LOCAL_YAML: &str = include_str!("../../clusters/local.yaml");

/// Name under which [`ClusterSpec::embedded_local`] reports problems.
pub const EMBEDDED_LOCAL_ORIGIN: &str = "<embedded>/clusters/local.yaml";

/// More devices per host than any machine has; catches typos such as `devices_per_node: 80`.
pub const MAX_DEVICES_PER_NODE: usize = 1024;

/// Variables the launcher computes per rank from the layout and `master:`; setting them in
/// `env:` would silently fight the launcher, so it is refused.
pub const LAUNCHER_OWNED_ENV: &[&str] = &[
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "NNODES",
];

// ───────────────────────────── the resolved spec ─────────────────────────────

/// A loaded and checked cluster file. Fields mirror the YAML keys; see `clusters/local.yaml`
/// for a commented example of every key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterSpec {
    /// The file the spec came from, as it was given (used in messages).
    pub origin: PathBuf,
    /// `name`: a label for logs and reports.
    pub name: Option<String>,
    /// The hosts in rank order, whichever of `hosts`, `hostfile` or `hosts_from` gave them.
    pub hosts: Vec<HostSpec>,
    /// Where `hosts` came from.
    pub host_source: HostSource,
    /// `accelerator`: npu | gpu | cpu.
    pub accelerator: Accelerator,
    /// `devices_per_node`: accelerators on each host. Hosts without `devices` or `slots` use
    /// devices `0..devices_per_node`.
    pub devices_per_node: usize,
    /// `master`: the rendezvous address and port (MASTER_ADDR / MASTER_PORT).
    pub master: MasterSpec,
    /// `ssh`: how to reach the hosts (ignored when `local`).
    pub ssh: SshSpec,
    /// `local`: run every rank on this machine without SSH. Defaults to true when every host
    /// is a loopback address (localhost, 127.0.0.0/8, ::1).
    pub local: bool,
    /// `executor`: how each host's node agent is started: a child process (local), over SSH,
    /// or as a Slurm step (`srun`) inside the job's allocation. Defaults to local for a local
    /// cluster, slurm with `hosts_from: slurm`, else ssh.
    pub executor: Executor,
    /// `workdir`: directory the engine starts in on each host (default: the SSH login
    /// directory, or the current directory when local).
    pub workdir: Option<PathBuf>,
    /// `engine`: path of the mm-engine binary on the hosts (default: found by the launcher).
    pub engine: Option<PathBuf>,
    /// `log_dir`: where run directories go on the launching machine (default `logs`).
    pub log_dir: PathBuf,
    /// `hang_timeout`: how long the ranks may make no progress before the launcher stops the
    /// job (default: a budget per phase from the recent step times; 0 turns the watchdog
    /// off). `--hang-timeout` overrides it.
    #[serde(with = "humane::option", skip_serializing_if = "Option::is_none")]
    pub hang_timeout: Option<Duration>,
    /// `env`: variables set for every rank on every host; a host's `env` overrides them.
    pub env: BTreeMap<String, String>,
    /// `template`: how the engine command line is rendered (default mm-engine).
    pub template: Template,
    /// `setup`: shell lines run (sourced) before the engine starts, in order.
    pub setup: Vec<String>,
    /// `job`: what users change from run to run (paths, iterations, checkpoint flags).
    pub job: JobSpec,
    /// Things that are probably wrong but not clearly so (for example `master.addr` not among
    /// the hosts). The launcher prints them; loading still succeeds.
    #[serde(skip)]
    pub warnings: Vec<Diagnostic>,
}

/// One host as written in the cluster file (or read from a hostfile / Slurm).
///
/// In YAML either a plain address (`- 192.0.2.10`) or a map:
/// `{ address, name, ssh_user, ssh_port, devices: [0, 1, 2, 3], slots, env }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostSpec {
    /// Address used for SSH and, for the master, for MASTER_ADDR.
    pub address: String,
    /// Label for logs (`logs/<run>/<name>/rank-N.log`); defaults to the address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// SSH user for this host (default: `ssh.user`, then the current user).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh_user: Option<String>,
    /// SSH port for this host (default: `ssh.port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh_port: Option<u16>,
    /// The device indices to use on this host, e.g. `[0, 1, 2, 3]`; one rank per device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<usize>>,
    /// How many ranks to start here, on devices `0..slots` (DeepSpeed's `slots=N`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<usize>,
    /// Variables for this host only; they override the cluster-wide `env`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

impl HostSpec {
    /// A host given by its address only.
    pub fn new(address: impl Into<String>) -> Self {
        HostSpec {
            address: address.into(),
            name: None,
            ssh_user: None,
            ssh_port: None,
            devices: None,
            slots: None,
            env: BTreeMap::new(),
        }
    }

    /// The name used in logs: `name`, or the address.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.address)
    }
}

/// A host with every default applied: what the planner lays ranks onto.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResolvedHost {
    pub name: String,
    pub address: String,
    /// None: log in as the user running the launcher.
    pub ssh_user: Option<String>,
    pub ssh_port: u16,
    /// One rank per device, in this order (local rank i uses `devices[i]`).
    pub devices: Vec<usize>,
    /// Cluster-wide `env` with this host's `env` applied on top.
    pub env: BTreeMap<String, String>,
}

/// Where the host list came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum HostSource {
    /// The `hosts:` list in the cluster file.
    Inline,
    /// A DeepSpeed hostfile (`path` already resolved against the cluster file's directory).
    Hostfile { path: PathBuf },
    /// A Slurm allocation: the variable read and its value.
    Slurm { variable: String, nodelist: String },
}

/// `accelerator:` the device kind on every host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// Huawei Ascend NPUs (HCCL collectives).
    Npu,
    /// NVIDIA GPUs (NCCL collectives).
    Gpu,
    /// No accelerator: CPU ranks (Gloo collectives).
    Cpu,
}

impl Accelerator {
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Npu => "npu",
            Accelerator::Gpu => "gpu",
            Accelerator::Cpu => "cpu",
        }
    }

    /// The collective backend the engine uses for this device kind.
    pub fn backend(self) -> &'static str {
        match self {
            Accelerator::Npu => "hccl",
            Accelerator::Gpu => "nccl",
            Accelerator::Cpu => "gloo",
        }
    }

    /// The variable that restricts which devices a process sees, if any.
    pub fn visible_devices_var(self) -> Option<&'static str> {
        match self {
            Accelerator::Npu => Some("ASCEND_RT_VISIBLE_DEVICES"),
            Accelerator::Gpu => Some("CUDA_VISIBLE_DEVICES"),
            Accelerator::Cpu => None,
        }
    }
}

/// `template:` which command-line template renders the per-rank command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Template {
    /// This project's engine (`mm-engine`), one process per rank.
    #[default]
    MmEngine,
    /// MindSpeed-MM's `pretrain_internvl.py` under torchrun, one torchrun per host.
    MindspeedMmTorchrun,
    /// MindSpeed-MM on the MindSpore backend under msrun, one msrun per host.
    MindspeedMmMsrun,
}

impl Template {
    /// The name as written in YAML and used for the template file.
    pub fn as_str(self) -> &'static str {
        match self {
            Template::MmEngine => "mm-engine",
            Template::MindspeedMmTorchrun => "mindspeed-mm-torchrun",
            Template::MindspeedMmMsrun => "mindspeed-mm-msrun",
        }
    }
}

/// `executor:` how the launcher starts its node agent on each host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Executor {
    /// A child process of the launcher (every host is this machine).
    Local,
    /// An SSH session per host (libssh2, host keys verified).
    Ssh,
    /// One Slurm step per host (`srun --nodes 1 --ntasks 1 --nodelist HOST`) inside the
    /// allocation the launcher runs in: Slurm owns, signals and accounts every process, and
    /// no SSH is needed between nodes.
    Slurm,
}

impl Executor {
    /// As the cluster file spells it.
    pub fn name(self) -> &'static str {
        match self {
            Executor::Local => "local",
            Executor::Ssh => "ssh",
            Executor::Slurm => "slurm",
        }
    }
}

/// `hosts_from:` a scheduler whose allocation gives the hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostsFrom {
    /// SLURM_JOB_NODELIST (or SLURM_NODELIST), expanded like `scontrol show hostnames`.
    Slurm,
}

/// `master:` the rendezvous point every rank connects to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MasterSpec {
    /// MASTER_ADDR; defaults to the first host's address.
    pub addr: String,
    /// MASTER_PORT; default 6000 (as MindSpeed-MM's scripts). 0: pick a free port on the
    /// master host at launch.
    pub port: u16,
}

impl MasterSpec {
    /// The port when one is fixed; None when it is picked at launch.
    pub fn fixed_port(&self) -> Option<u16> {
        (self.port != 0).then_some(self.port)
    }
}

/// `ssh.strict_host_key_checking`. There is deliberately no "off": an unverified host key
/// lets anyone on the path impersonate a training node and collect its environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StrictMode {
    /// Only hosts whose key is already in known_hosts (OpenSSH `yes`).
    #[default]
    Strict,
    /// Trust and record a new host's key on first contact; refuse a changed key afterwards.
    AcceptNew,
}

impl StrictMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StrictMode::Strict => "strict",
            StrictMode::AcceptNew => "accept-new",
        }
    }

    /// The value for OpenSSH's `StrictHostKeyChecking` option.
    pub fn openssh_value(self) -> &'static str {
        match self {
            StrictMode::Strict => "yes",
            StrictMode::AcceptNew => "accept-new",
        }
    }
}

impl Serialize for StrictMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// `ssh:` how the launcher reaches the hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshSpec {
    /// Login user (default: the user running the launcher); a host's `ssh_user` overrides it.
    pub user: Option<String>,
    /// Port (default 22); a host's `ssh_port` overrides it.
    pub port: u16,
    /// Private keys to offer, in order. `~/` is the home directory; relative paths are
    /// resolved against the cluster file's directory.
    pub identity_files: Vec<PathBuf>,
    /// known_hosts file (default: `~/.ssh/known_hosts`).
    pub known_hosts: Option<PathBuf>,
    /// strict (default) or accept-new. Never off.
    pub strict_host_key_checking: StrictMode,
    /// Give up connecting after this long ("10s", "2m", "500ms" or seconds; default 10s).
    #[serde(with = "humane")]
    pub connect_timeout: Duration,
    /// Probe an idle connection this often (default 5s; 0 disables).
    #[serde(with = "humane")]
    pub keepalive_interval: Duration,
    /// Drop the connection after this many unanswered probes (default 3).
    pub keepalive_count: u32,
    /// Try keys from ssh-agent before `identity_files` (default true).
    pub agent: bool,
}

impl Default for SshSpec {
    fn default() -> Self {
        SshSpec {
            user: None,
            port: 22,
            identity_files: Vec::new(),
            known_hosts: None,
            strict_host_key_checking: StrictMode::Strict,
            connect_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(5),
            keepalive_count: 3,
            agent: true,
        }
    }
}

/// `job:` what users change per run. Paths are as seen by the engine on the hosts (relative
/// ones are relative to `workdir`). Unset values fall back to the recipe's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobSpec {
    /// Checkpoint to start from (MindSpeed-MM's LOAD_PATH; the converted MM checkpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<PathBuf>,
    /// Where checkpoints are saved (SAVE_PATH).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save: Option<PathBuf>,
    /// The training records (jsonl), e.g. `.../sharegpt4v_instruct_gpt4-vision_cap100k.jsonl`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_path: Option<PathBuf>,
    /// Root that image/video paths in the records are relative to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_folder: Option<PathBuf>,
    /// Tokenizer directory: the original Hugging Face checkpoint (raw_ckpt/InternVL3-8B).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_iters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_interval: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_interval: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// `--no-load-optim`: do not load optimizer state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_load_optim: Option<bool>,
    /// `--no-save-optim`: do not save optimizer state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_save_optim: Option<bool>,
    /// `--no-load-rng`: do not load RNG state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_load_rng: Option<bool>,
    /// `--no-save-rng`: do not save RNG state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_save_rng: Option<bool>,
}

impl ClusterSpec {
    /// The mm-engine the ranks run: `engine:` when set; on a local cluster the one beside this
    /// launcher when it is there (`make build` puts both in target/release, so the README's
    /// `./target/release/launch …` works without PATH); else `mm-engine` from the hosts' PATH.
    pub fn engine_command(&self) -> String {
        if let Some(p) = &self.engine {
            return p.display().to_string();
        }
        let beside = || std::env::current_exe().ok()?.parent().map(|d| d.join("mm-engine")).filter(|p| p.is_file());
        match (self.local, beside()) {
            (true, Some(p)) => p.display().to_string(),
            _ => "mm-engine".into(),
        }
    }

    /// Every host with defaults applied, in rank order.
    pub fn hosts_resolved(&self) -> Vec<ResolvedHost> {
        self.hosts
            .iter()
            .map(|h| {
                let mut env = self.env.clone();
                env.extend(h.env.iter().map(|(k, v)| (k.clone(), v.clone())));
                ResolvedHost {
                    name: h.display_name().to_string(),
                    address: h.address.clone(),
                    ssh_user: h.ssh_user.clone().or_else(|| self.ssh.user.clone()),
                    ssh_port: h.ssh_port.unwrap_or(self.ssh.port),
                    devices: h
                        .devices
                        .clone()
                        .unwrap_or_else(|| (0..h.slots.unwrap_or(self.devices_per_node)).collect()),
                    env,
                }
            })
            .collect()
    }

    /// Total ranks: the devices of every host.
    pub fn world_size(&self) -> usize {
        self.hosts_resolved().iter().map(|h| h.devices.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::super::check::test_support::*;
    use super::*;

    #[test]
    fn accelerator_helpers() {
        assert_eq!(Accelerator::Npu.backend(), "hccl");
        assert_eq!(Accelerator::Gpu.visible_devices_var(), Some("CUDA_VISIBLE_DEVICES"));
        assert_eq!(Accelerator::Cpu.visible_devices_var(), None);
        assert_eq!(Template::MindspeedMmMsrun.as_str(), "mindspeed-mm-msrun");
    }

    #[test]
    fn spec_serializes_for_plan_json() {
        let spec = ok(&format!("{BASE}hosts: [a]\nssh: {{connect_timeout: 1500ms}}\n"));
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["ssh"]["connect_timeout"], "1500ms");
        assert_eq!(json["ssh"]["strict_host_key_checking"], "strict");
        assert_eq!(json["accelerator"], "npu");
        assert_eq!(json["template"], "mm-engine");
        assert_eq!(json["host_source"]["kind"], "inline");
        assert_eq!(json["hosts"][0], serde_json::json!({"address": "a"}));
    }

    #[test]
    fn hosts_resolved_applies_every_default_and_override() {
        let spec = ok(&format!(
            "{BASE}ssh:\n  user: trainer\n  port: 2200\nenv:\n  A: cluster\n  B: cluster\n\
             hosts:\n  - 192.0.2.1\n  - address: 192.0.2.2\n    name: two\n    ssh_user: ops\n    \
             ssh_port: 22\n    devices: [4, 5, 6, 7]\n    env: {{B: host, C: host}}\n  \
             - address: 192.0.2.3\n    slots: 2\n"
        ));
        let hosts = spec.hosts_resolved();
        assert_eq!(hosts.len(), 3);
        assert_eq!(hosts[0].name, "192.0.2.1");
        assert_eq!(hosts[0].ssh_user.as_deref(), Some("trainer"));
        assert_eq!(hosts[0].ssh_port, 2200);
        assert_eq!(hosts[0].devices, (0..8).collect::<Vec<_>>());
        assert_eq!(hosts[0].env["B"], "cluster");
        assert_eq!(hosts[1].name, "two");
        assert_eq!(hosts[1].ssh_user.as_deref(), Some("ops"));
        assert_eq!(hosts[1].ssh_port, 22);
        assert_eq!(hosts[1].devices, [4, 5, 6, 7]);
        assert_eq!(hosts[1].env["A"], "cluster");
        assert_eq!(hosts[1].env["B"], "host");
        assert_eq!(hosts[1].env["C"], "host");
        assert_eq!(hosts[2].devices, [0, 1]);
        assert_eq!(spec.world_size(), 8 + 4 + 2);
    }
}
