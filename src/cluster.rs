//! The cluster spec: which hosts and devices a run uses, how to reach them, and what a run changes.
//!
//! ```text
//! YAML text ─► RawCluster (serde: the file's exact shape, deny_unknown_fields everywhere)
//!           ─► host source: `hosts:` list │ DeepSpeed `hostfile:` │ `hosts_from: slurm`
//!           ─► checks (every problem at once) ─► ClusterSpec ─► hosts_resolved() for the planner
//! ```
//!
//! Every problem is a [`Diagnostic`] naming the file, line:column, the key path and, where we
//! can say how to fix it, a hint. Serde stops at the first type error; the checks after parsing
//! report all problems together.
//!
//! Pitfall: serde_yaml_ng knows line and column only while deserializing. Problems found later
//! (duplicate hosts, devices out of range, …) are located by walking the YAML a second time to
//! the offending key (`Locator`), which reuses the parser's own marks instead of scanning text.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::hostlist;

/// The cluster file compiled into the binary: one localhost "node" with 2 CPU ranks.
pub const EMBEDDED_LOCAL_YAML: &str = include_str!("../clusters/local.yaml");

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
    /// `workdir`: directory the engine starts in on each host (default: the SSH login
    /// directory, or the current directory when local).
    pub workdir: Option<PathBuf>,
    /// `engine`: path of the mm-engine binary on the hosts (default: found by the launcher).
    pub engine: Option<PathBuf>,
    /// `log_dir`: where run directories go on the launching machine (default `logs`).
    pub log_dir: PathBuf,
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

impl<'de> Deserialize<'de> for StrictMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictModeVisitor)
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

// ───────────────────────────── environment injection ─────────────────────────────

/// Where loading reads environment variables (SLURM_JOB_NODELIST, HOME). Tests pass a map
/// instead of mutating the process environment.
pub trait EnvSource {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl EnvSource for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl EnvSource for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl EnvSource for [(&str, &str)] {
    fn var(&self, name: &str) -> Option<String> {
        self.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }
}

impl<const N: usize> EnvSource for [(&str, &str); N] {
    fn var(&self, name: &str) -> Option<String> {
        self[..].var(name)
    }
}

// ───────────────────────────── errors ─────────────────────────────

/// One problem in a cluster file (or a hostfile it names): where it is and how to fix it.
///
/// Displays as `<file>:<line>:<col>: <key.path>: <message>` and, when there is a hint,
/// `  hint: <hint>` on the next line. Line, column and key path are left out when unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file as it was given (a hostfile's path is resolved against the cluster file's).
    pub file: PathBuf,
    /// 1-based.
    pub line: Option<usize>,
    /// 1-based, in characters.
    pub column: Option<usize>,
    /// e.g. `hosts[1].ssh_port`; empty for the whole file.
    pub key_path: String,
    /// What was found and what was expected.
    pub message: String,
    /// How to fix it.
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        if !self.key_path.is_empty() {
            write!(f, "{}: ", self.key_path)?;
        }
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Why a cluster file was refused: one or more [`Diagnostic`]s, in file order.
///
/// Serde stops at the first problem; the checks after parsing report all of theirs at once.
/// Derefs to the first problem, so `err.line`, `err.key_path`, `err.message` read it directly;
/// [`problems`](Self::problems) yields all of them. Display prints every problem, one after
/// another. (Boxed: the error stays one pointer wide on the `Ok` path.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    first: Box<Diagnostic>,
    more: Vec<Diagnostic>,
}

impl ConfigError {
    pub fn new(file: &Path, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_path_buf(),
            line: None,
            column: None,
            key_path: String::new(),
            message: message.into(),
            hint: None,
        }
        .into()
    }

    pub fn at(mut self, line: usize, column: usize) -> Self {
        self.first.line = Some(line);
        self.first.column = Some(column);
        self
    }

    pub fn at_opt(self, position: Option<(usize, usize)>) -> Self {
        match position {
            Some((line, column)) => self.at(line, column),
            None => self,
        }
    }

    pub fn with_key(mut self, key_path: impl Into<String>) -> Self {
        self.first.key_path = key_path.into();
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.first.hint = Some(hint.into());
        self
    }

    fn with_hint_opt(mut self, hint: Option<String>) -> Self {
        self.first.hint = hint;
        self
    }

    /// One error holding every problem of `errors` (None when there are none).
    pub fn collect(errors: Vec<ConfigError>) -> Option<ConfigError> {
        let mut all = errors.into_iter().flat_map(ConfigError::into_problems);
        let first = all.next()?;
        Some(ConfigError { first: Box::new(first), more: all.collect() })
    }

    /// Every problem, the first one first.
    pub fn problems(&self) -> impl Iterator<Item = &Diagnostic> {
        std::iter::once(&*self.first).chain(self.more.iter())
    }

    pub fn into_problems(self) -> Vec<Diagnostic> {
        let mut all = vec![*self.first];
        all.extend(self.more);
        all
    }
}

impl From<Diagnostic> for ConfigError {
    fn from(d: Diagnostic) -> Self {
        ConfigError { first: Box::new(d), more: Vec::new() }
    }
}

impl std::ops::Deref for ConfigError {
    type Target = Diagnostic;
    fn deref(&self) -> &Diagnostic {
        &self.first
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// ───────────────────────────── loading ─────────────────────────────

impl ClusterSpec {
    /// Reads and checks a cluster file, reading SLURM_JOB_NODELIST and HOME from the process
    /// environment. Messages show `path` as given.
    pub fn from_file(path: impl AsRef<Path>) -> Result<ClusterSpec, ConfigError> {
        Self::from_file_with_env(path, &ProcessEnv)
    }

    /// [`from_file`](Self::from_file) with the environment supplied by the caller.
    pub fn from_file_with_env(path: impl AsRef<Path>, env: &dyn EnvSource) -> Result<ClusterSpec, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            let err = ConfigError::new(path, format!("cannot read the cluster file: {e}"));
            match e.kind() {
                std::io::ErrorKind::NotFound => {
                    err.with_hint("pass an existing file to --cluster; examples live in the clusters/ directory")
                }
                _ => err,
            }
        })?;
        Self::from_str_with_env(&text, path, env)
    }

    /// Parses and checks cluster YAML. `origin` names the text in messages and is the base for
    /// relative paths (`hostfile`, `ssh.identity_files`). Reads the process environment.
    pub fn from_str(text: &str, origin: &Path) -> Result<ClusterSpec, ConfigError> {
        Self::from_str_with_env(text, origin, &ProcessEnv)
    }

    /// [`from_str`](Self::from_str) with the environment supplied by the caller.
    pub fn from_str_with_env(text: &str, origin: &Path, env: &dyn EnvSource) -> Result<ClusterSpec, ConfigError> {
        let locator = Locator { text };
        let raw = parse_raw(text, origin, &locator)?;
        Checker { origin, locator, env, problems: Vec::new(), warnings: Vec::new() }.resolve(raw)
    }

    /// The cluster compiled into the binary (`clusters/local.yaml`): localhost, 2 CPU ranks.
    pub fn embedded_local() -> Result<ClusterSpec, ConfigError> {
        Self::from_str_with_env(EMBEDDED_LOCAL_YAML, Path::new(EMBEDDED_LOCAL_ORIGIN), &ProcessEnv)
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

/// True for names that always mean this machine.
pub fn is_loopback(address: &str) -> bool {
    let a = address.trim();
    a.eq_ignore_ascii_case("localhost")
        || a.eq_ignore_ascii_case("localhost.localdomain")
        || a.parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false)
}

/// Whether `name` is usable as an environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The file's exact shape. Field order is the order listed in "allowed keys" hints.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    hosts: Option<Vec<HostSpec>>,
    #[serde(default)]
    hostfile: Option<PathBuf>,
    #[serde(default)]
    hosts_from: Option<HostsFrom>,
    accelerator: Accelerator,
    devices_per_node: usize,
    #[serde(default)]
    master: RawMaster,
    #[serde(default)]
    ssh: SshSpec,
    #[serde(default)]
    local: Option<bool>,
    #[serde(default)]
    workdir: Option<PathBuf>,
    #[serde(default)]
    engine: Option<PathBuf>,
    #[serde(default = "default_log_dir")]
    log_dir: PathBuf,
    #[serde(default, deserialize_with = "de_env")]
    env: BTreeMap<String, String>,
    #[serde(default)]
    template: Option<Template>,
    #[serde(default, deserialize_with = "de_setup")]
    setup: Vec<String>,
    #[serde(default)]
    job: JobSpec,
}

fn default_log_dir() -> PathBuf {
    PathBuf::from("logs")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMaster {
    addr: Option<String>,
    port: u16,
}

impl Default for RawMaster {
    fn default() -> Self {
        RawMaster { addr: None, port: 6000 }
    }
}

/// The map form of a host.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHostMap {
    address: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    ssh_user: Option<String>,
    #[serde(default)]
    ssh_port: Option<u16>,
    #[serde(default)]
    devices: Option<Vec<usize>>,
    #[serde(default)]
    slots: Option<usize>,
    #[serde(default, deserialize_with = "de_env")]
    env: BTreeMap<String, String>,
}

/// Step 1: YAML → RawCluster, turning serde's first error into a located ConfigError.
/// Parses any YAML document (a recipe file, say) into a JSON value; syntax errors carry
/// their line and column.
pub fn yaml_to_value(text: &str, origin: &Path) -> Result<serde_json::Value, ConfigError> {
    serde_yaml_ng::from_str::<serde_json::Value>(text).map_err(|e| syntax_error(origin, text, &e))
}

/// Line and column of the map key at `path` (e.g. `["train", "lr"]`) in a YAML text.
pub fn locate_key(text: &str, path: &[String]) -> Option<(usize, usize)> {
    let segs: Vec<Seg> = path.iter().map(|k| Seg::Key(k.clone())).collect();
    Locator { text }.key(&segs, 0)
}

fn parse_raw(text: &str, origin: &Path, locator: &Locator) -> Result<RawCluster, ConfigError> {
    let meaningful = text.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    if !meaningful {
        return Err(ConfigError::new(origin, "the cluster file is empty").with_hint(
            "a cluster needs at least `accelerator`, `devices_per_node` and `hosts`; \
             see clusters/local.yaml",
        ));
    }
    let de = serde_yaml_ng::Deserializer::from_str(text);
    match serde_path_to_error::deserialize::<_, RawCluster>(de) {
        Ok(raw) => Ok(raw),
        Err(err) => {
            // IgnoredAny accepts any well-formed YAML, so if it fails too the problem is the
            // syntax, not the shape.
            if let Err(syntax) = serde_yaml_ng::from_str::<IgnoredAny>(text) {
                return Err(syntax_error(origin, text, &syntax));
            }
            Err(shape_error(origin, locator, err))
        }
    }
}

fn syntax_error(origin: &Path, text: &str, err: &serde_yaml_ng::Error) -> ConfigError {
    let position = err.location().map(|l| (l.line(), l.column()));
    let mut message = err.to_string();
    if let Some((line, column)) = position {
        message = message.replacen(&format!(" at line {line} column {column}"), "", 1);
    }
    let mut hint = None;
    if message.contains("more than one document") {
        message = "the file holds more than one YAML document (`---`)".into();
        hint = Some("keep one cluster per file".to_string());
    } else if let Some((line, _)) = position {
        let has_tab = text.lines().nth(line.saturating_sub(1)).is_some_and(|l| l.contains('\t'));
        if has_tab {
            hint = Some("indent with spaces: YAML does not allow tabs for indentation".into());
        }
    }
    ConfigError::new(origin, format!("invalid YAML: {message}")).at_opt(position).with_hint_opt(hint)
}

/// Separates a hint from the message in errors raised by our own visitors (serde errors carry
/// one string only).
const HINT_MARK: char = '\u{1f}';

fn shape_error(origin: &Path, locator: &Locator, err: serde_path_to_error::Error<serde_yaml_ng::Error>) -> ConfigError {
    use serde_path_to_error::Segment;
    let mut path: Vec<Seg> = err
        .path()
        .iter()
        .filter_map(|s| match s {
            Segment::Seq { index } => Some(Seg::Index(*index)),
            Segment::Map { key } => Some(Seg::Key(key.clone())),
            Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
            Segment::Unknown => None,
        })
        .collect();
    let inner = err.into_inner();
    let mut position = inner.location().map(|l| (l.line(), l.column()));
    let mut text = inner.to_string();
    if let Some((line, column)) = position {
        if let Some(t) = text.strip_suffix(&format!(" at line {line} column {column}")) {
            text = t.to_string();
        }
    }
    // serde_yaml_ng prefixes its own path ("ssh: ..."); ours is shown separately.
    for k in (1..=path.len()).rev() {
        if let Some(t) = text.strip_prefix(&format!("{}: ", KeyPath(&path[..k]))) {
            text = t.to_string();
            break;
        }
    }
    let (mut message, mut hint) = match text.split_once(HINT_MARK) {
        Some((m, h)) => (m.to_string(), Some(h.to_string())),
        None => (text, None),
    };

    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (field, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let field = field.to_string();
        let allowed = backticked(tail);
        if matches!(path.last(), Some(Seg::Key(k)) if *k == field) {
            path.pop();
        }
        message = format!("unknown key `{field}`");
        if let Some(s) = did_you_mean(&field, &allowed) {
            message.push_str(&format!(", did you mean `{s}`?"));
        }
        hint = Some(if allowed.is_empty() {
            "this map takes no keys".to_string()
        } else {
            format!("allowed keys here: {}", allowed.join(", "))
        });
    } else if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or(rest).to_string();
        message = format!("missing key `{field}`");
        hint = required_hint(&field).map(str::to_string);
    } else if let Some(rest) = message.strip_prefix("duplicate field `") {
        let field = rest.split('`').next().unwrap_or(rest).to_string();
        message = format!("`{field}` is set twice");
        hint = Some("keep one of them".to_string());
        let mut key_path = path.clone();
        key_path.push(Seg::Key(field));
        position = locator.key(&key_path, 1).or(position);
    } else if let Some(rest) = message.strip_prefix("unknown variant `") {
        let (value, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let (value, tail) = (value.to_string(), tail.to_string());
        let allowed = backticked(&tail);
        message = if value.is_empty() {
            format!("no value given,{}", tail.trim_start_matches(','))
        } else {
            format!("unknown value `{value}`{tail}")
        };
        if let Some(s) = did_you_mean(&value, &allowed) {
            message.push_str(&format!("; did you mean `{s}`?"));
        }
        hint = hint.or_else(|| leaf_hint(&path).map(str::to_string));
    } else {
        message = message.replace("invalid type: unit value", "invalid type: empty value");
        if let Some(i) = message.find("expected struct ") {
            message.truncate(i);
            message.push_str("expected a map of keys");
        }
        hint = hint.or_else(|| leaf_hint(&path).map(str::to_string));
    }
    ConfigError::new(origin, message).at_opt(position).with_key(KeyPath(&path).to_string()).with_hint_opt(hint)
}

/// The `x` in every `` `x` `` of serde's "expected one of `a`, `b`" lists.
fn backticked(text: &str) -> Vec<String> {
    text.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// The closest candidate, if it is close enough to be a likely typo.
fn did_you_mean(word: &str, candidates: &[String]) -> Option<String> {
    if let Some(c) = candidates.iter().find(|c| c.eq_ignore_ascii_case(word)) {
        return Some(c.clone());
    }
    // Three-letter values (npu/gpu/cpu) are one substitution apart from each other and from
    // tpu or xpu: suggesting one for another would mislead. Short words therefore only get a
    // suggestion for a missing or extra letter (`adr` → `addr`) or swapped letters (`nup`).
    let len = word.chars().count();
    let limit = (len / 3).max(1);
    let plausible = |c: &str| {
        if len > 3 {
            return true;
        }
        let mut a: Vec<char> = word.chars().collect();
        let mut b: Vec<char> = c.chars().collect();
        if a.len() != b.len() {
            return true;
        }
        a.sort_unstable();
        b.sort_unstable();
        a == b
    };
    candidates
        .iter()
        .filter(|c| plausible(c))
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.clone())
}

fn required_hint(field: &str) -> Option<&'static str> {
    Some(match field {
        "accelerator" => "add `accelerator: npu` (or `gpu`, `cpu`)",
        "devices_per_node" => "add `devices_per_node: 8`: the number of accelerators on each host",
        "address" => "each host map needs `address: HOST` (an IP address or host name)",
        _ => return None,
    })
}

/// Help for type and value errors, by the key that holds the bad value.
fn leaf_hint(path: &[Seg]) -> Option<&'static str> {
    let mut keys = path.iter().rev().filter_map(|s| match s {
        Seg::Key(k) => Some(k.as_str()),
        Seg::Index(_) => None,
    });
    let Some(leaf) = keys.next() else {
        return Some(
            "a cluster file is a map of keys (`accelerator: npu`, `hosts: [...]`, ...); \
             see clusters/local.yaml",
        );
    };
    let parent = keys.next();
    if parent == Some("env") {
        return Some("env values are strings, numbers or booleans; quote anything else");
    }
    Some(match (parent, leaf) {
        (_, "devices_per_node") => "the number of accelerators on each host, a whole number such as 8",
        (Some("master"), "port") => "a TCP port from 1 to 65535, or 0 to pick a free port on the master host at launch",
        (_, "port" | "ssh_port") => "a TCP port number from 1 to 65535",
        (_, "slots") => "how many ranks to start on this host, e.g. `slots: 4`",
        (_, "devices") => "a list of device indices, e.g. `devices: [0, 1, 2, 3]`",
        (_, "accelerator") => "npu: Ascend NPUs (HCCL), gpu: NVIDIA GPUs (NCCL), cpu: no accelerator (Gloo)",
        (_, "template") => {
            "mm-engine runs this project's engine; mindspeed-mm-torchrun and \
             mindspeed-mm-msrun run MindSpeed-MM's pretrain script"
        }
        (_, "hosts_from") => {
            "only Slurm allocations are read directly; for another scheduler write its node \
             list to a DeepSpeed hostfile (`HOST slots=N` lines) and set `hostfile:`"
        }
        (_, "local" | "agent") | (Some("job"), "no_load_optim" | "no_save_optim" | "no_load_rng" | "no_save_rng") => {
            "true or false"
        }
        (_, "keepalive_count") | (Some("job"), "train_iters" | "save_interval" | "log_interval" | "seed") => {
            "a whole number"
        }
        (_, "hosts") => "a list of hosts: addresses (`- 192.0.2.10`) or maps (`- address: 192.0.2.10`)",
        (_, "identity_files" | "setup") => "a list of strings",
        _ => return None,
    })
}

// ───────────────────────────── checks after parsing ─────────────────────────────

/// Where a host came from, to point problems at the right file and line.
#[derive(Clone)]
enum HostOrigin {
    Inline(usize),
    Hostfile { file: PathBuf, line: usize, slots_column: usize },
    Slurm,
}

struct Checker<'a> {
    origin: &'a Path,
    locator: Locator<'a>,
    env: &'a dyn EnvSource,
    problems: Vec<ConfigError>,
    warnings: Vec<Diagnostic>,
}

fn keys(path: &[&str]) -> Vec<Seg> {
    path.iter().map(|k| Seg::Key(k.to_string())).collect()
}

impl Checker<'_> {
    fn error_at(&self, path: &[Seg], position: Option<(usize, usize)>, message: String) -> ConfigError {
        ConfigError::new(self.origin, message).at_opt(position).with_key(KeyPath(path).to_string())
    }

    /// A problem with the value at `path`.
    fn value(&mut self, path: &[Seg], message: String, hint: Option<String>) {
        let e = self.error_at(path, self.locator.value(path), message).with_hint_opt(hint);
        self.problems.push(e);
    }

    /// A problem with the key at `path` itself (its name, or its being there at all).
    fn key(&mut self, path: &[Seg], message: String, hint: Option<String>) {
        let e = self.error_at(path, self.locator.key(path, 0), message).with_hint_opt(hint);
        self.problems.push(e);
    }

    /// A problem with host `origin`, at `sub` inside its map when it is written in the YAML.
    fn host(&mut self, origin: &HostOrigin, sub: &[&str], message: String, hint: Option<String>) {
        match origin {
            HostOrigin::Inline(i) => {
                let mut path = vec![Seg::Key("hosts".into()), Seg::Index(*i)];
                path.extend(keys(sub));
                let position = self.locator.value(&path).or_else(|| self.locator.value(&path[..2]));
                let e = self.error_at(&path, position, message).with_hint_opt(hint);
                self.problems.push(e);
            }
            HostOrigin::Hostfile { file, line, slots_column } => {
                let column = if sub == ["slots"] { *slots_column } else { 1 };
                let e = ConfigError::new(file, message).at(*line, column).with_hint_opt(hint);
                self.problems.push(e);
            }
            HostOrigin::Slurm => self.value(&keys(&["hosts_from"]), message, hint),
        }
    }

    fn resolve(mut self, raw: RawCluster) -> Result<ClusterSpec, ConfigError> {
        let dpn = raw.devices_per_node;
        let dpn_path = keys(&["devices_per_node"]);
        if dpn == 0 {
            self.value(
                &dpn_path,
                "is 0, but every host needs at least one device".into(),
                Some("for CPU-only runs use `accelerator: cpu` with the number of ranks per host".into()),
            );
        } else if dpn > MAX_DEVICES_PER_NODE {
            self.value(&dpn_path, format!("is {dpn}, more than any host has (at most {MAX_DEVICES_PER_NODE})"), None);
        }

        let (hosts, origins, host_source) = self.host_list(&raw);
        self.check_hosts(&hosts, &origins, dpn, &raw.ssh);

        let all_loopback = !hosts.is_empty() && hosts.iter().all(|h| is_loopback(&h.address));
        if raw.local == Some(true) && !all_loopback {
            if let Some(remote) = hosts.iter().find(|h| !is_loopback(&h.address)) {
                self.value(
                    &keys(&["local"]),
                    format!(
                        "`local: true` runs every rank on this machine, but host `{}` is not a \
                         loopback address",
                        remote.address
                    ),
                    Some(
                        "drop `local: true` to reach the hosts over SSH, or list hosts as localhost / 127.0.0.x".into(),
                    ),
                );
            }
        }
        let local = raw.local.unwrap_or(all_loopback);

        let master = self.check_master(raw.master, &hosts, local);
        let ssh = self.check_ssh(raw.ssh);
        self.check_env(&keys(&["env"]), &raw.env);
        if raw.log_dir.as_os_str().is_empty() {
            self.value(&keys(&["log_dir"]), "is empty".into(), Some("omit it to use `logs`".into()));
        }

        self.problems.sort_by_key(|p| (p.file != self.origin, p.line.unwrap_or(usize::MAX), p.column));
        if let Some(err) = ConfigError::collect(std::mem::take(&mut self.problems)) {
            return Err(err);
        }
        Ok(ClusterSpec {
            origin: self.origin.to_path_buf(),
            name: raw.name,
            hosts,
            host_source,
            accelerator: raw.accelerator,
            devices_per_node: dpn,
            master,
            ssh,
            local,
            workdir: raw.workdir,
            engine: raw.engine,
            log_dir: raw.log_dir,
            env: raw.env,
            template: raw.template.unwrap_or_default(),
            setup: raw.setup,
            job: raw.job,
            warnings: self.warnings,
        })
    }

    /// Exactly one of `hosts`, `hostfile`, `hosts_from`; reads the hostfile or the allocation.
    fn host_list(&mut self, raw: &RawCluster) -> (Vec<HostSpec>, Vec<HostOrigin>, HostSource) {
        let empty = (Vec::new(), Vec::new(), HostSource::Inline);
        let set: Vec<&str> = [
            ("hosts", raw.hosts.is_some()),
            ("hostfile", raw.hostfile.is_some()),
            ("hosts_from", raw.hosts_from.is_some()),
        ]
        .iter()
        .filter(|(_, present)| *present)
        .map(|(k, _)| *k)
        .collect();
        if set.len() > 1 {
            // Point at whichever of them comes last in the file.
            let last = set.iter().max_by_key(|k| self.locator.key(&keys(&[k]), 0)).copied().unwrap_or(set[1]);
            let listed = set.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>();
            self.key(
                &keys(&[last]),
                format!(
                    "{} are {} set; use exactly one",
                    listed.join(" and "),
                    if set.len() == 2 { "both" } else { "all" }
                ),
                Some(
                    "hosts come from one place: the `hosts` list, a DeepSpeed `hostfile`, or `hosts_from: slurm`"
                        .into(),
                ),
            );
            return empty;
        }
        if let Some(hosts) = &raw.hosts {
            if hosts.is_empty() {
                self.value(
                    &keys(&["hosts"]),
                    "the host list is empty".into(),
                    Some("list at least one host, e.g. `hosts: [localhost]`".into()),
                );
            }
            let origins = (0..hosts.len()).map(HostOrigin::Inline).collect();
            return (hosts.clone(), origins, HostSource::Inline);
        }
        if let Some(file) = &raw.hostfile {
            return self.read_hostfile(file).unwrap_or(empty);
        }
        if raw.hosts_from == Some(HostsFrom::Slurm) {
            return self.read_slurm().unwrap_or(empty);
        }
        self.problems.push(
            ConfigError::new(self.origin, "no hosts: set one of `hosts`, `hostfile` or `hosts_from`")
                .with_hint("for this machine alone write `hosts: [localhost]`"),
        );
        empty
    }

    fn read_hostfile(&mut self, file: &Path) -> Option<(Vec<HostSpec>, Vec<HostOrigin>, HostSource)> {
        let key = keys(&["hostfile"]);
        let path = match self.expand_path(file) {
            Ok(p) => p,
            Err(message) => {
                self.value(&key, message, None);
                return None;
            }
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                let (message, hint) = match e.kind() {
                    std::io::ErrorKind::NotFound => (
                        format!("hostfile `{}` does not exist", path.display()),
                        Some("relative paths are resolved against the directory of the cluster file".to_string()),
                    ),
                    _ => (format!("cannot read hostfile `{}`: {e}", path.display()), None),
                };
                self.value(&key, message, hint);
                return None;
            }
        };
        match hostlist::parse_hostfile_entries(&text, &path) {
            Ok(entries) => {
                let origins = entries
                    .iter()
                    .map(|e| HostOrigin::Hostfile { file: path.clone(), line: e.line, slots_column: e.slots_column })
                    .collect();
                let hosts =
                    entries.into_iter().map(|e| HostSpec { slots: Some(e.slots), ..HostSpec::new(e.host) }).collect();
                Some((hosts, origins, HostSource::Hostfile { path }))
            }
            Err(err) => {
                self.problems.push(err);
                None
            }
        }
    }

    fn read_slurm(&mut self) -> Option<(Vec<HostSpec>, Vec<HostOrigin>, HostSource)> {
        let key = keys(&["hosts_from"]);
        let found = ["SLURM_JOB_NODELIST", "SLURM_NODELIST"]
            .into_iter()
            .find_map(|var| self.env.var(var).map(|value| (var, value)));
        let Some((variable, nodelist)) = found else {
            self.value(
                &key,
                "`hosts_from: slurm` needs SLURM_JOB_NODELIST (or SLURM_NODELIST), which is not set".into(),
                Some("run launch inside a Slurm allocation (salloc, sbatch), or list the hosts under `hosts:`".into()),
            );
            return None;
        };
        match hostlist::expand(&nodelist) {
            Ok(names) => {
                let origins = vec![HostOrigin::Slurm; names.len()];
                let hosts = names.into_iter().map(HostSpec::new).collect();
                Some((hosts, origins, HostSource::Slurm { variable: variable.to_string(), nodelist }))
            }
            Err(e) => {
                self.value(&key, format!("cannot expand {variable}=`{nodelist}`: {e}"), None);
                None
            }
        }
    }

    fn check_hosts(&mut self, hosts: &[HostSpec], origins: &[HostOrigin], dpn: usize, ssh: &SshSpec) {
        let mut by_endpoint: HashMap<(String, u16), usize> = HashMap::new();
        let mut by_name: HashMap<String, usize> = HashMap::new();
        let describe = |origins: &[HostOrigin], i: usize| match &origins[i] {
            HostOrigin::Inline(i) => format!("hosts[{i}]"),
            HostOrigin::Hostfile { line, .. } => format!("line {line}"),
            HostOrigin::Slurm => format!("entry {}", i + 1),
        };
        for (i, (host, origin)) in hosts.iter().zip(origins).enumerate() {
            let address = &host.address;
            if address.trim().is_empty() || address.chars().any(char::is_whitespace) {
                self.host(
                    origin,
                    &["address"],
                    format!("`{address}` is not a host address"),
                    Some("an IP address or host name, without spaces".into()),
                );
            } else if address.contains('@') {
                self.host(
                    origin,
                    &["address"],
                    format!("`{address}` contains `@`"),
                    Some("write the address alone and the user as `ssh_user` (or `ssh.user`)".into()),
                );
            }
            if let Some(name) = &host.name {
                if name.is_empty()
                    || name == "."
                    || name == ".."
                    || name.chars().any(|c| c.is_whitespace() || c == '/' || c == '\\')
                {
                    self.host(
                        origin,
                        &["name"],
                        format!("`{name}` cannot be used as a host name"),
                        Some("names become log directory names: use letters, digits, `-`, `_` and `.`".into()),
                    );
                }
            }
            if let Some(user) = &host.ssh_user {
                if user.is_empty() || user.chars().any(|c| c.is_whitespace() || c == '@') {
                    self.host(origin, &["ssh_user"], format!("`{user}` is not a user name"), None);
                }
            }
            if host.ssh_port == Some(0) {
                self.host(
                    origin,
                    &["ssh_port"],
                    "port 0 is not an SSH port".into(),
                    Some("a TCP port number from 1 to 65535".into()),
                );
            }
            if let Some(devices) = &host.devices {
                self.check_devices(origin, devices, dpn);
            }
            match host.slots {
                Some(0) => self.host(
                    origin,
                    &["slots"],
                    "is 0, but a host needs at least one rank".into(),
                    Some("remove the host instead".into()),
                ),
                Some(n) if dpn > 0 && n > dpn => self.host(
                    origin,
                    &["slots"],
                    format!("host `{}` has {n} slots, more than devices_per_node ({dpn})", host.display_name()),
                    Some("lower the slots or raise devices_per_node".into()),
                ),
                Some(n) => {
                    if let Some(devices) = &host.devices {
                        if devices.len() != n {
                            self.host(
                                origin,
                                &["slots"],
                                format!("is {n} but {} devices are listed", devices.len()),
                                Some("give `devices` or `slots`, not both".into()),
                            );
                        }
                    }
                }
                None => {}
            }
            if let HostOrigin::Inline(index) = origin {
                let path = vec![Seg::Key("hosts".into()), Seg::Index(*index), Seg::Key("env".into())];
                self.check_env(&path, &host.env);
            }

            let port = host.ssh_port.unwrap_or(ssh.port);
            match by_endpoint.entry((address.clone(), port)) {
                std::collections::hash_map::Entry::Occupied(first) => {
                    let first = describe(origins, *first.get());
                    self.host(
                        origin,
                        &[],
                        format!(
                            "host `{address}` (SSH port {port}) is listed twice: {first} and {}",
                            describe(origins, i)
                        ),
                        Some("list each host once; its `devices` or `slots` say how many ranks it runs".into()),
                    );
                    continue; // the name is then a duplicate too; one message is enough
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(i);
                }
            }
            let name = host.display_name().to_string();
            if let Some(first) = by_name.get(&name) {
                let sub: &[&str] = if host.name.is_some() { &["name"] } else { &[] };
                let first = describe(origins, *first);
                self.host(
                    origin,
                    sub,
                    format!("host name `{name}` is used twice: {first} and {}", describe(origins, i)),
                    Some("names key the per-host log directories; give each host its own `name`".into()),
                );
            } else {
                by_name.insert(name, i);
            }
        }
    }

    fn check_devices(&mut self, origin: &HostOrigin, devices: &[usize], dpn: usize) {
        if devices.is_empty() {
            self.host(
                origin,
                &["devices"],
                "the device list is empty".into(),
                Some("omit `devices` to use all devices_per_node devices".into()),
            );
            return;
        }
        // More devices than devices_per_node needs an index out of range or a repeat, and
        // those are reported below, each at its own position.
        let mut seen = HashSet::new();
        for (j, &d) in devices.iter().enumerate() {
            let HostOrigin::Inline(index) = origin else {
                continue;
            };
            let path = vec![Seg::Key("hosts".into()), Seg::Index(*index), Seg::Key("devices".into()), Seg::Index(j)];
            if d >= dpn {
                let range =
                    if dpn == 0 { "there are none".to_string() } else { format!("valid devices are 0 to {}", dpn - 1) };
                self.value(&path, format!("device {d} is out of range: devices_per_node is {dpn}, so {range}"), None);
            } else if !seen.insert(d) {
                self.value(
                    &path,
                    format!("device {d} is listed twice"),
                    Some("each device runs one rank; list it once".into()),
                );
            }
        }
    }

    fn check_master(&mut self, raw: RawMaster, hosts: &[HostSpec], local: bool) -> MasterSpec {
        let path = keys(&["master", "addr"]);
        let addr = match raw.addr {
            Some(a) if a.trim().is_empty() || a.chars().any(char::is_whitespace) => {
                self.value(
                    &path,
                    format!("`{a}` is not an address"),
                    Some("omit master.addr to use the first host's address".into()),
                );
                a
            }
            Some(a) => {
                let known = hosts.iter().any(|h| h.address == a || h.name.as_deref() == Some(a.as_str()));
                let expected = known || hosts.is_empty() || (local && is_loopback(&a));
                if !expected {
                    let w = self
                        .error_at(&path, self.locator.value(&path), format!("master.addr `{a}` is not one of the hosts"))
                        .with_hint("fine if it is another address of a host (e.g. a faster interface); every rank must reach it");
                    self.warnings.extend(w.into_problems());
                }
                a
            }
            None => hosts.first().map(|h| h.address.clone()).unwrap_or_default(),
        };
        MasterSpec { addr, port: raw.port }
    }

    fn check_ssh(&mut self, mut ssh: SshSpec) -> SshSpec {
        if ssh.port == 0 {
            self.value(
                &keys(&["ssh", "port"]),
                "port 0 is not an SSH port".into(),
                Some("a TCP port number from 1 to 65535".into()),
            );
        }
        if let Some(user) = &ssh.user {
            if user.is_empty() || user.chars().any(|c| c.is_whitespace() || c == '@') {
                self.value(&keys(&["ssh", "user"]), format!("`{user}` is not a user name"), None);
            }
        }
        if ssh.connect_timeout.is_zero() {
            self.value(
                &keys(&["ssh", "connect_timeout"]),
                "is 0".into(),
                Some("give a duration such as `10s`; an unreachable host would otherwise hang the launch".into()),
            );
        }
        let files = std::mem::take(&mut ssh.identity_files);
        for (j, f) in files.into_iter().enumerate() {
            match self.expand_path(&f) {
                Ok(p) => ssh.identity_files.push(p),
                Err(message) => {
                    let path = vec![Seg::Key("ssh".into()), Seg::Key("identity_files".into()), Seg::Index(j)];
                    self.value(&path, message, None);
                }
            }
        }
        if let Some(kh) = ssh.known_hosts.take() {
            match self.expand_path(&kh) {
                Ok(p) => ssh.known_hosts = Some(p),
                Err(message) => self.value(&keys(&["ssh", "known_hosts"]), message, None),
            }
        }
        ssh
    }

    fn check_env(&mut self, map_path: &[Seg], env: &BTreeMap<String, String>) {
        for name in env.keys() {
            let mut path = map_path.to_vec();
            path.push(Seg::Key(name.clone()));
            if !is_valid_env_name(name) {
                let suggestion: String = name
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' })
                    .collect();
                let suggestion = if suggestion.starts_with(|c: char| c.is_ascii_digit()) {
                    format!("_{suggestion}")
                } else {
                    suggestion
                };
                self.key(
                    &path,
                    format!("`{name}` is not a valid environment variable name"),
                    Some(format!("names are letters, digits and `_`, not starting with a digit (e.g. `{suggestion}`)")),
                );
            } else if LAUNCHER_OWNED_ENV.contains(&name.as_str()) {
                let how = match name.as_str() {
                    "MASTER_ADDR" => "set `master.addr` instead",
                    "MASTER_PORT" => "set `master.port` instead",
                    _ => "it follows from the hosts and devices",
                };
                self.key(
                    &path,
                    format!("`{name}` is set by the launcher for every rank"),
                    Some(format!("remove it: {how}")),
                );
            }
        }
    }

    /// `~/` → the home directory; relative → against the cluster file's directory.
    fn expand_path(&self, path: &Path) -> Result<PathBuf, String> {
        let text = path.to_string_lossy();
        if text == "~" || text.starts_with("~/") {
            let home = self.env.var("HOME").ok_or_else(|| format!("cannot expand `{text}`: HOME is not set"))?;
            return Ok(PathBuf::from(home).join(text.trim_start_matches('~').trim_start_matches('/')));
        }
        if text.starts_with('~') {
            return Err(format!("cannot expand `{text}`: only `~/` (your own home) is supported"));
        }
        if path.is_absolute() {
            return Ok(path.to_path_buf());
        }
        Ok(self.origin.parent().unwrap_or(Path::new("")).join(path))
    }
}

// ───────────────────────────── serde helpers ─────────────────────────────

fn hinted(message: impl fmt::Display, hint: impl fmt::Display) -> String {
    format!("{message}{HINT_MARK}{hint}")
}

impl<'de> Deserialize<'de> for HostSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(HostVisitor)
    }
}

struct HostVisitor;

impl<'de> Visitor<'de> for HostVisitor {
    type Value = HostSpec;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a host address or a map with `address`")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<HostSpec, E> {
        Ok(HostSpec::new(v))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<HostSpec, A::Error> {
        let raw = RawHostMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(HostSpec {
            address: raw.address,
            name: raw.name,
            ssh_user: raw.ssh_user,
            ssh_port: raw.ssh_port,
            devices: raw.devices,
            slots: raw.slots,
            env: raw.env,
        })
    }
}

/// An env map: values taken verbatim as written (`8`, `True`, `expandable_segments:True`),
/// a name set twice is an error rather than last-one-wins.
fn de_env<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct EnvVisitor;
    struct UniqueKey<'a>(&'a BTreeMap<String, String>);

    impl<'de> DeserializeSeed<'de> for UniqueKey<'_> {
        type Value = String;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
            // Checked inside the visitor so the error carries the repeated key's position.
            d.deserialize_str(self)
        }
    }

    impl<'de> Visitor<'de> for UniqueKey<'_> {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a variable name")
        }
        fn visit_str<E: de::Error>(self, key: &str) -> Result<String, E> {
            if self.0.contains_key(key) {
                return Err(E::custom(hinted(format!("`{key}` is set twice"), "keep one of them")));
            }
            Ok(key.to_string())
        }
    }

    impl<'de> Visitor<'de> for EnvVisitor {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map of variable names to values")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(key) = map.next_key_seed(UniqueKey(&out))? {
                let value: String = map.next_value()?;
                out.insert(key, value);
            }
            Ok(out)
        }
    }
    d.deserialize_any(EnvVisitor)
}

/// `setup:` one shell line or a list of them.
fn de_setup<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct SetupVisitor;
    impl<'de> Visitor<'de> for SetupVisitor {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a shell line or a list of shell lines")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![v.to_string()])
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(line) = seq.next_element::<String>()? {
                out.push(line);
            }
            Ok(out)
        }
    }
    d.deserialize_any(SetupVisitor)
}

struct StrictModeVisitor;

impl<'de> Visitor<'de> for StrictModeVisitor {
    type Value = StrictMode;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("`strict` or `accept-new`")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<StrictMode, E> {
        match v {
            "strict" => Ok(StrictMode::Strict),
            "accept-new" => Ok(StrictMode::AcceptNew),
            _ => match v.to_ascii_lowercase().as_str() {
                "no" | "off" | "false" | "ignore" | "none" | "skip" => Err(refuse_unverified(v)),
                "yes" | "on" | "true" => Err(E::custom(hinted(
                    format!("unknown value `{v}`, expected `strict` or `accept-new`"),
                    "`strict` is OpenSSH's `yes`",
                ))),
                "ask" => Err(E::custom(hinted(
                    "`ask` needs a terminal per host; expected `strict` or `accept-new`",
                    "use `accept-new` to record new host keys without asking",
                ))),
                _ => Err(E::custom(format!("unknown value `{v}`, expected `strict` or `accept-new`"))),
            },
        }
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<StrictMode, E> {
        if v {
            Err(E::custom(hinted(
                "`true` is ambiguous here; expected `strict` or `accept-new`",
                "`strict` is OpenSSH's `yes`",
            )))
        } else {
            Err(refuse_unverified(&v.to_string()))
        }
    }
}

fn refuse_unverified<E: de::Error>(v: &str) -> E {
    E::custom(hinted(
        format!(
            "`{v}` would skip host key verification, which launch refuses: anyone on the network \
             path could then pose as a training node and receive its environment and data"
        ),
        "use `accept-new` to trust each host's key on first contact (and refuse it if it changes), \
         or add the keys beforehand with `ssh-keyscan HOST >> ~/.ssh/known_hosts`",
    ))
}

/// Durations written as "10s", "2m", "500ms", "1h", "1.5s" or a bare number of seconds.
pub mod humane {
    use super::*;

    /// Parses a humane duration; the error says what was wrong.
    pub fn parse(text: &str) -> Result<Duration, String> {
        let t = text.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (number, unit) = (&t[..split], t[split..].trim());
        if t.starts_with('-') {
            return Err("durations cannot be negative".to_string());
        }
        if number.is_empty() {
            return Err(format!("`{text}` does not start with a number"));
        }
        let value: f64 = number.parse().map_err(|_| format!("`{number}` is not a number"))?;
        let seconds_per_unit = match unit {
            "" | "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
            "ms" | "msec" | "millis" | "milliseconds" => 0.001,
            "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hour" | "hours" => 3600.0,
            other => return Err(format!("unknown unit `{other}`; expected ms, s, m or h")),
        };
        Duration::try_from_secs_f64(value * seconds_per_unit).map_err(|_| format!("`{text}` is out of range"))
    }

    /// "10s", "500ms", "2m", "1h"; sub-millisecond precision as fractional seconds.
    pub fn format(d: Duration) -> String {
        let ms = d.as_millis();
        if d.subsec_nanos() % 1_000_000 != 0 {
            format!("{}s", d.as_secs_f64())
        } else if ms % 1000 != 0 {
            format!("{ms}ms")
        } else {
            let s = d.as_secs();
            if s != 0 && s % 3600 == 0 {
                format!("{}h", s / 3600)
            } else if s != 0 && s % 60 == 0 {
                format!("{}m", s / 60)
            } else {
                format!("{s}s")
            }
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    const HINT: &str = "write a duration such as `10s`, `2m`, `500ms`, or a number of seconds";

    impl<'de> Visitor<'de> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a duration such as `10s`, `2m`, `500ms` or a number of seconds")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v)
                .map(Duration::from_secs)
                .map_err(|_| E::custom(hinted(format!("negative duration {v}"), HINT)))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            Duration::try_from_secs_f64(v).map_err(|_| E::custom(hinted(format!("invalid duration {v}"), HINT)))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse(v).map_err(|why| E::custom(hinted(format!("invalid duration `{v}`: {why}"), HINT)))
        }
    }
}

// ───────────────────────────── key paths and the locator ─────────────────────────────

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// Displays `hosts[1].ssh_port`.
struct KeyPath<'a>(&'a [Seg]);

impl fmt::Display for KeyPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Finds where a key or value sits in the YAML by deserializing again with a seed that walks
/// `path` and raises an error at the target node: serde_yaml_ng then attaches that node's mark.
struct Locator<'t> {
    text: &'t str,
}

const LOCATE_MARK: &str = "\u{1}locate";

impl Locator<'_> {
    /// Line and column of the value at `path`.
    fn value(&self, path: &[Seg]) -> Option<(usize, usize)> {
        self.run(Walk { path, want_key: false, occurrence: 0 })
    }

    /// Line and column of the key that ends `path`; `occurrence` 1 is its second appearance.
    fn key(&self, path: &[Seg], occurrence: usize) -> Option<(usize, usize)> {
        if !matches!(path.last(), Some(Seg::Key(_))) {
            return None;
        }
        self.run(Walk { path, want_key: true, occurrence })
    }

    fn run(&self, walk: Walk) -> Option<(usize, usize)> {
        let de = serde_yaml_ng::Deserializer::from_str(self.text);
        match walk.deserialize(de) {
            Err(e) if e.to_string().contains(LOCATE_MARK) => e.location().map(|l| (l.line(), l.column())),
            _ => None,
        }
    }
}

struct Walk<'p> {
    path: &'p [Seg],
    want_key: bool,
    occurrence: usize,
}

impl Walk<'_> {
    fn here<E: de::Error>(&self) -> Result<(), E> {
        if self.path.is_empty() {
            Err(E::custom(LOCATE_MARK))
        } else {
            Ok(()) // a scalar where the path goes deeper: not found
        }
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

struct KeySeed<'a> {
    target: &'a str,
    stop: bool,
    seen: &'a Cell<usize>,
    occurrence: usize,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        // The check runs inside the visitor: errors raised there get the key's own mark,
        // errors raised after deserialization returns would get the enclosing map's.
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<String, E> {
        if key == self.target {
            let n = self.seen.get();
            self.seen.set(n + 1);
            if self.stop && n == self.occurrence {
                return Err(E::custom(LOCATE_MARK));
            }
        }
        Ok(key.to_string())
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some(first) = self.path.first() else {
            return Err(de::Error::custom(LOCATE_MARK));
        };
        let Seg::Key(target) = first else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        let stop = self.path.len() == 1 && self.want_key;
        let seen = Cell::new(0);
        let mut descended = false;
        while let Some(key) = map.next_key_seed(KeySeed { target, stop, seen: &seen, occurrence: self.occurrence })? {
            // When looking for the key itself, never descend: the value would match an empty
            // remaining path and report its own position.
            if key == *target && !descended && !stop {
                descended = true;
                map.next_value_seed(Walk {
                    path: &self.path[1..],
                    want_key: self.want_key,
                    occurrence: self.occurrence,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some(first) = self.path.first() else {
            return Err(de::Error::custom(LOCATE_MARK));
        };
        let Seg::Index(target) = first else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        let mut index = 0;
        loop {
            let more = if index == *target {
                seq.next_element_seed(Walk {
                    path: &self.path[1..],
                    want_key: self.want_key,
                    occurrence: self.occurrence,
                })?
                .is_some()
            } else {
                seq.next_element::<IgnoredAny>()?.is_some()
            };
            if !more {
                return Ok(());
            }
            index += 1;
        }
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.here()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.here()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.here()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.here()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.here()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.here()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.here()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NO_ENV: [(&str, &str); 0] = [];

    fn load(text: &str) -> Result<ClusterSpec, ConfigError> {
        ClusterSpec::from_str_with_env(text, Path::new("c.yaml"), &NO_ENV)
    }

    fn ok(text: &str) -> ClusterSpec {
        load(text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(text: &str) -> String {
        match load(text) {
            Ok(spec) => panic!("parsed: {spec:?}"),
            Err(e) => e.to_string(),
        }
    }

    const BASE: &str = "accelerator: npu\ndevices_per_node: 8\n";

    #[test]
    fn humane_durations() {
        let cases = [
            ("10s", 10_000),
            ("2m", 120_000),
            ("500ms", 500),
            ("1.5s", 1_500),
            ("1h", 3_600_000),
            ("10", 10_000),
            (" 3 s ", 3_000),
            ("0", 0),
        ];
        for (text, ms) in cases {
            assert_eq!(humane::parse(text), Ok(Duration::from_millis(ms)), "{text}");
        }
        for bad in ["", "s", "-1s", "10 parsecs", "1.2.3s", "1e400s"] {
            assert!(humane::parse(bad).is_err(), "{bad}");
        }
        assert!(humane::parse("99999999999999999999999999h").is_err());
        for (ms, text) in [(10_000, "10s"), (500, "500ms"), (120_000, "2m"), (7_200_000, "2h")] {
            let d = Duration::from_millis(ms);
            assert_eq!(humane::format(d), text);
            assert_eq!(humane::parse(text), Ok(d));
        }
    }

    #[test]
    fn durations_accept_bare_numbers_of_seconds() {
        let spec = ok(&format!("{BASE}hosts: [a]\nssh:\n  connect_timeout: 30\n  keepalive_interval: 0.5\n"));
        assert_eq!(spec.ssh.connect_timeout, Duration::from_secs(30));
        assert_eq!(spec.ssh.keepalive_interval, Duration::from_millis(500));
        let e = err(&format!("{BASE}hosts: [a]\nssh:\n  connect_timeout: -1\n"));
        assert!(e.starts_with("c.yaml:5:20: ssh.connect_timeout: negative duration -1"), "{e}");
        let e = err(&format!("{BASE}hosts: [a]\nssh:\n  connect_timeout: 0s\n"));
        assert!(e.contains("ssh.connect_timeout: is 0"), "{e}");
    }

    #[test]
    fn defaults_follow_the_seed_and_the_brief() {
        let spec = ok(&format!("{BASE}hosts: [192.0.2.1, 192.0.2.2]\n"));
        assert_eq!(spec.master.addr, "192.0.2.1");
        assert_eq!(spec.master.port, 6000);
        assert_eq!(spec.master.fixed_port(), Some(6000));
        assert_eq!(spec.ssh, SshSpec::default());
        assert_eq!(spec.ssh.port, 22);
        assert_eq!(spec.ssh.connect_timeout, Duration::from_secs(10));
        assert_eq!(spec.ssh.keepalive_interval, Duration::from_secs(5));
        assert_eq!(spec.ssh.keepalive_count, 3);
        assert!(spec.ssh.agent);
        assert_eq!(spec.ssh.strict_host_key_checking, StrictMode::Strict);
        assert_eq!(spec.log_dir, Path::new("logs"));
        assert_eq!(spec.template, Template::MmEngine);
        assert!(!spec.local);
        assert_eq!(spec.host_source, HostSource::Inline);
        assert_eq!(spec.world_size(), 16);
        assert!(spec.warnings.is_empty());
    }

    #[test]
    fn env_values_are_kept_verbatim() {
        let spec = ok(&format!(
            "{BASE}hosts: [a]\nenv:\n  A: 1.0\n  B: True\n  C: expandable_segments:True\n  \
             D: 0x10\n  E: 'quoted'\n  F: 1200\n  G:\n"
        ));
        let got: Vec<(&str, &str)> = spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            got,
            [
                ("A", "1.0"),
                ("B", "True"),
                ("C", "expandable_segments:True"),
                ("D", "0x10"),
                ("E", "quoted"),
                ("F", "1200"),
                ("G", "")
            ]
        );
        let e = err(&format!("{BASE}hosts: [a]\nenv:\n  A: [1]\n"));
        assert!(e.contains("env.A: invalid type: sequence, expected a string"), "{e}");
        assert!(e.contains("hint: env values are strings, numbers or booleans"), "{e}");
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

    #[test]
    fn local_defaults_to_all_loopback_hosts() {
        assert!(ok(&format!("{BASE}hosts: [localhost]\n")).local);
        assert!(ok(&format!("{BASE}hosts: [127.0.0.1, 127.0.0.2]\n")).local);
        assert!(ok(&format!("{BASE}hosts: ['::1']\n")).local);
        assert!(!ok(&format!("{BASE}hosts: [localhost, 192.0.2.1]\n")).local);
        assert!(!ok(&format!("{BASE}hosts: [localhost]\nlocal: false\n")).local);
        assert!(is_loopback("LOCALHOST"));
        assert!(!is_loopback("localhost2"));
    }

    #[test]
    fn master_address_checks() {
        let spec = ok(&format!("{BASE}hosts: [192.0.2.1]\nmaster:\n  addr: 198.51.100.1\n  port: 0\n"));
        assert_eq!(spec.master.fixed_port(), None);
        assert_eq!(spec.warnings.len(), 1);
        assert_eq!(
            spec.warnings[0].to_string(),
            "c.yaml:5:9: master.addr: master.addr `198.51.100.1` is not one of the hosts\n  \
             hint: fine if it is another address of a host (e.g. a faster interface); every rank \
             must reach it"
        );
        let named = ok(&format!("{BASE}hosts:\n  - {{address: 192.0.2.1, name: n1}}\nmaster: {{addr: n1}}\n"));
        assert!(named.warnings.is_empty());
        let e = err(&format!("{BASE}hosts: [a]\nmaster:\n  addr: ''\n"));
        assert_eq!(
            e,
            "c.yaml:5:9: master.addr: `` is not an address\n  \
             hint: omit master.addr to use the first host's address"
        );
    }

    #[test]
    fn strict_host_key_checking_values() {
        let accept = ok(&format!("{BASE}hosts: [a]\nssh: {{strict_host_key_checking: accept-new}}\n"));
        assert_eq!(accept.ssh.strict_host_key_checking, StrictMode::AcceptNew);
        assert_eq!(StrictMode::AcceptNew.openssh_value(), "accept-new");
        assert_eq!(StrictMode::Strict.openssh_value(), "yes");
        for (value, needle) in [
            ("off", "`off` would skip host key verification"),
            ("'no'", "`no` would skip host key verification"),
            ("yes", "`strict` is OpenSSH's `yes`"),
            ("true", "`true` is ambiguous here"),
            ("ask", "`ask` needs a terminal per host"),
            ("sometimes", "unknown value `sometimes`, expected `strict` or `accept-new`"),
            ("[strict]", "invalid type: sequence, expected `strict` or `accept-new`"),
        ] {
            let e = err(&format!("{BASE}hosts: [a]\nssh:\n  strict_host_key_checking: {value}\n"));
            assert!(e.contains(needle), "{value}: {e}");
            assert!(e.contains("ssh.strict_host_key_checking"), "{e}");
        }
    }

    #[test]
    fn slurm_hosts_come_from_the_injected_environment() {
        let text = format!("{BASE}hosts_from: slurm\n");
        let env = [("SLURM_NODELIST", "n[1-3]"), ("UNRELATED", "x")];
        let spec = ClusterSpec::from_str_with_env(&text, Path::new("c.yaml"), &env).unwrap();
        assert_eq!(spec.hosts.len(), 3);
        assert_eq!(spec.hosts[2].address, "n3");
        assert_eq!(
            spec.host_source,
            HostSource::Slurm { variable: "SLURM_NODELIST".into(), nodelist: "n[1-3]".into() }
        );
        assert_eq!(spec.master.addr, "n1");
        // SLURM_JOB_NODELIST wins over SLURM_NODELIST.
        let env = [("SLURM_NODELIST", "n[1-3]"), ("SLURM_JOB_NODELIST", "m1")];
        let spec = ClusterSpec::from_str_with_env(&text, Path::new("c.yaml"), &env).unwrap();
        assert_eq!(spec.hosts.len(), 1);
        // Duplicates in the allocation point at hosts_from.
        let env = [("SLURM_JOB_NODELIST", "n[1-2],n1")];
        let e = ClusterSpec::from_str_with_env(&text, Path::new("c.yaml"), &env).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("c.yaml:3:13: hosts_from: host `n1` (SSH port 22) is listed twice: entry 1 and entry 3"),
            "{e}"
        );
    }

    #[test]
    fn hostfile_is_resolved_against_the_cluster_file_and_home() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/hosts"), "w1 slots=2\nw2 slots=8\n").unwrap();
        let origin = dir.path().join("sub/c.yaml");
        let text = format!("{BASE}hostfile: hosts\n");
        let spec = ClusterSpec::from_str_with_env(&text, &origin, &NO_ENV).unwrap();
        assert_eq!(spec.world_size(), 10);
        assert_eq!(spec.host_source, HostSource::Hostfile { path: dir.path().join("sub/hosts") });

        let home = dir.path().to_string_lossy().to_string();
        let env = [("HOME", home.as_str())];
        let text = format!("{BASE}hostfile: ~/sub/hosts\n");
        let spec = ClusterSpec::from_str_with_env(&text, Path::new("c.yaml"), &env).unwrap();
        assert_eq!(spec.hosts.len(), 2);
        let e = ClusterSpec::from_str_with_env(&text, Path::new("c.yaml"), &NO_ENV).unwrap_err();
        assert_eq!(e.to_string(), "c.yaml:3:11: hostfile: cannot expand `~/sub/hosts`: HOME is not set");
    }

    #[test]
    fn ssh_paths_expand_home_and_resolve_relative_paths() {
        let text = format!(
            "{BASE}hosts: [a]\nssh:\n  identity_files: [~/.ssh/id_ed25519, keys/id, /abs/id]\n  \
             known_hosts: ~/.ssh/known_hosts\n"
        );
        let env = [("HOME", "/home/u")];
        let spec = ClusterSpec::from_str_with_env(&text, Path::new("conf/c.yaml"), &env).unwrap();
        assert_eq!(
            spec.ssh.identity_files,
            [PathBuf::from("/home/u/.ssh/id_ed25519"), PathBuf::from("conf/keys/id"), PathBuf::from("/abs/id")]
        );
        assert_eq!(spec.ssh.known_hosts.as_deref(), Some(Path::new("/home/u/.ssh/known_hosts")));
        let e = err(&format!("{BASE}hosts: [a]\nssh:\n  identity_files: ['~bob/id']\n"));
        assert!(e.starts_with("c.yaml:5:20: ssh.identity_files[0]: cannot expand `~bob/id`"), "{e}");
    }

    #[test]
    fn setup_accepts_one_line_or_a_list() {
        let one = ok(&format!("{BASE}hosts: [a]\nsetup: source /etc/profile\n"));
        assert_eq!(one.setup, ["source /etc/profile"]);
        let two = ok(&format!("{BASE}hosts: [a]\nsetup:\n  - a\n  - b\n"));
        assert_eq!(two.setup, ["a", "b"]);
    }

    #[test]
    fn all_three_host_sources_at_once() {
        let e = err(&format!("{BASE}hosts_from: slurm\nhosts: [a]\nhostfile: h\n"));
        assert!(e.starts_with("c.yaml:5:1: hostfile: `hosts` and `hostfile` and `hosts_from` are all set"), "{e}");
    }

    #[test]
    fn host_field_problems_are_all_reported() {
        let e = load(&format!(
            "{BASE}hosts:\n  - address: user@192.0.2.1\n  - address: 192.0.2.2\n    name: a/b\n  \
             - address: 192.0.2.3\n    devices: []\n    ssh_port: 0\n  - address: 192.0.2.4\n    \
             devices: [0, 1]\n    slots: 3\n    env: {{RANK: 1}}\n"
        ))
        .unwrap_err();
        let got: Vec<String> =
            e.problems().map(|p| format!("{}:{}: {}", p.line.unwrap(), p.key_path, p.message)).collect();
        assert_eq!(
            got,
            [
                "4:hosts[0].address: `user@192.0.2.1` contains `@`",
                "6:hosts[1].name: `a/b` cannot be used as a host name",
                "8:hosts[2].devices: the device list is empty",
                "9:hosts[2].ssh_port: port 0 is not an SSH port",
                "12:hosts[3].slots: is 3 but 2 devices are listed",
                "13:hosts[3].env.RANK: `RANK` is set by the launcher for every rank",
            ]
        );
    }

    #[test]
    fn same_address_on_other_ports_needs_distinct_names() {
        let text = format!(
            "{BASE}hosts:\n  - {{address: 127.0.0.1, ssh_port: 2201}}\n  - {{address: 127.0.0.1, ssh_port: 2202}}\n"
        );
        let e = err(&text);
        assert!(e.contains("hosts[1]: host name `127.0.0.1` is used twice: hosts[0] and hosts[1]"), "{e}");
        let named = text.replace("2202}", "2202, name: b}");
        assert_eq!(ok(&named).hosts.len(), 2);
    }

    #[test]
    fn unknown_key_did_you_mean_and_allowed_keys() {
        let e = err(&format!("{BASE}hosts: [a]\nmaster:\n  adr: x\n"));
        assert_eq!(
            e,
            "c.yaml:5:3: master: unknown key `adr`, did you mean `addr`?\n  \
             hint: allowed keys here: addr, port"
        );
        let e = err(&format!("{BASE}hosts: [a]\ncompletely_different: 1\n"));
        assert!(e.starts_with("c.yaml:4:1: unknown key `completely_different`\n"), "{e}");
    }

    #[test]
    fn did_you_mean_is_conservative() {
        let keys: Vec<String> = ["hosts", "hostfile", "npu", "gpu"].iter().map(|s| s.to_string()).collect();
        assert_eq!(did_you_mean("hots", &keys).as_deref(), Some("hosts"));
        assert_eq!(did_you_mean("hostfiel", &keys).as_deref(), Some("hostfile"));
        assert_eq!(did_you_mean("GPU", &keys).as_deref(), Some("gpu"));
        assert_eq!(did_you_mean("tpu", &keys), None);
        assert_eq!(did_you_mean("nup", &keys).as_deref(), Some("npu"));
        assert_eq!(did_you_mean("hst", &keys), None);
        assert_eq!(did_you_mean("zzzzzz", &keys), None);
    }

    #[test]
    fn config_error_display_forms() {
        let bare = ConfigError::new(Path::new("f.yaml"), "no hosts");
        assert_eq!(bare.to_string(), "f.yaml: no hosts");
        let full = ConfigError::new(Path::new("f.yaml"), "bad").at(3, 7).with_key("ssh.port").with_hint("fix it");
        assert_eq!(full.to_string(), "f.yaml:3:7: ssh.port: bad\n  hint: fix it");
        let both = ConfigError::collect(vec![bare.clone(), full.clone()]).unwrap();
        assert_eq!(both.problems().count(), 2);
        assert_eq!(both.to_string(), format!("{bare}\n{full}"));
        assert!(ConfigError::collect(Vec::new()).is_none());
    }

    #[test]
    fn locator_finds_keys_values_and_repeats() {
        let text = "a: 1\nhosts:\n  - x\n  - address: y\n    devices: [0, 1]\na: 2\n";
        let l = Locator { text };
        let k = |s: &str| Seg::Key(s.into());
        assert_eq!(l.key(&[k("a")], 0), Some((1, 1)));
        assert_eq!(l.key(&[k("a")], 1), Some((6, 1)));
        assert_eq!(l.key(&[k("a")], 2), None);
        assert_eq!(l.value(&[k("a")]), Some((1, 4)));
        assert_eq!(l.value(&[k("hosts"), Seg::Index(0)]), Some((3, 5)));
        assert_eq!(l.key(&[k("hosts"), Seg::Index(1), k("devices")], 0), Some((5, 5)));
        assert_eq!(l.value(&[k("hosts"), Seg::Index(1), k("devices"), Seg::Index(1)]), Some((5, 18)));
        assert_eq!(l.value(&[k("hosts"), Seg::Index(7)]), None);
        assert_eq!(l.value(&[k("nope")]), None);
        assert_eq!(l.key(&[k("hosts"), Seg::Index(0)], 0), None);
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
    fn embedded_local_parses() {
        let spec = ClusterSpec::embedded_local().unwrap_or_else(|e| panic!("{e}"));
        assert!(spec.local);
        assert_eq!(spec.accelerator, Accelerator::Cpu);
        assert_eq!(spec.origin, Path::new(EMBEDDED_LOCAL_ORIGIN));
        assert_eq!(spec.hosts_resolved()[0].devices, [0, 1]);
    }

    #[test]
    fn env_names() {
        for good in ["A", "_x", "NCCL_SOCKET_IFNAME", "a1"] {
            assert!(is_valid_env_name(good), "{good}");
        }
        for bad in ["", "1A", "A-B", "A B", "É"] {
            assert!(!is_valid_env_name(bad), "{bad}");
        }
    }

    #[test]
    fn accelerator_helpers() {
        assert_eq!(Accelerator::Npu.backend(), "hccl");
        assert_eq!(Accelerator::Gpu.visible_devices_var(), Some("CUDA_VISIBLE_DEVICES"));
        assert_eq!(Accelerator::Cpu.visible_devices_var(), None);
        assert_eq!(Template::MindspeedMmMsrun.as_str(), "mindspeed-mm-msrun");
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_yaml(text in "[a-z_:\\[\\]{}, \\n\\t'\"#0-9.-]{0,120}") {
            let _ = load(&text);
            let _ = load(&format!("{BASE}{text}"));
        }

        #[test]
        fn never_panics_on_arbitrary_host_entries(
            entries in proptest::collection::vec("[a-z0-9:@ .\\[\\]-]{0,12}", 0..4),
            devices in proptest::collection::vec(0usize..20, 0..6),
        ) {
            let hosts: Vec<String> = entries
                .iter()
                .map(|e| format!("  - address: '{e}'\n    devices: {devices:?}\n"))
                .collect();
            let _ = load(&format!("{BASE}hosts:\n{}", hosts.concat()));
        }
    }
}
