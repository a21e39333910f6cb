//! The checks after parsing: [`RawCluster`](super::raw) → [`ClusterSpec`], every problem at
//! once and each located (host list from `hosts:` / `hostfile:` / Slurm, devices, master,
//! ssh, env). Also the loading entry points (`ClusterSpec::from_file`, `from_str`, …) and the
//! environment they read ([`EnvSource`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::known_hosts;
use super::raw::{parse_raw, RawCluster, RawMaster};
use super::spec::*;
use crate::diag::{yaml_input, ConfigError, Diagnostic, KeyPath, Locator, Seg};
use crate::hostlist;
use crate::input;

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
        let text = yaml_input(text, origin)?;
        let locator = Locator { text };
        let raw = parse_raw(text, origin, &locator)?;
        Checker { origin, locator, env, problems: Vec::new(), warnings: Vec::new() }.resolve(raw)
    }

    /// The cluster compiled into the binary (`clusters/local.yaml`): localhost, 2 CPU ranks.
    pub fn embedded_local() -> Result<ClusterSpec, ConfigError> {
        Self::from_str_with_env(EMBEDDED_LOCAL_YAML, Path::new(EMBEDDED_LOCAL_ORIGIN), &ProcessEnv)
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
            // Hosts with refused characters are reported by code point elsewhere; never echo them.
            if let Some(remote) = hosts
                .iter()
                .filter(|h| crate::input::find_unsafe_char(&h.address).is_none())
                .find(|h| !is_loopback(&h.address))
            {
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
        let executor = match (raw.executor, local) {
            (Some(Executor::Local), false) => {
                let (message, hint) = if raw.local == Some(false) {
                    ("is local, but `local: false` asks for remote hosts", "drop one of `local: false` and `executor`")
                } else {
                    (
                        "is local, but the hosts are not all this machine",
                        "list the hosts as localhost / 127.0.0.x, or use `executor: ssh` or `executor: slurm`",
                    )
                };
                self.value(&keys(&["executor"]), message.into(), Some(hint.into()));
                Executor::Local
            }
            (Some(e @ (Executor::Ssh | Executor::Slurm)), true) if raw.local == Some(true) => {
                self.value(
                    &keys(&["executor"]),
                    format!("is {}, but `local: true` runs every rank here without it", e.name()),
                    Some("drop one of `local: true` and `executor`".into()),
                );
                e
            }
            (Some(e), _) => e,
            (None, true) => Executor::Local,
            (None, false) if raw.hosts_from == Some(HostsFrom::Slurm) => Executor::Slurm,
            (None, false) => Executor::Ssh,
        };
        // A Slurm step or an explicit SSH executor reaches hosts that look local too.
        let local = executor == Executor::Local;

        let master = self.check_master(raw.master, &hosts, local);
        // Only the SSH executor opens SSH connections: its files are checked for it alone.
        let ssh = self.check_ssh(raw.ssh, executor != Executor::Ssh);
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
            executor,
            workdir: raw.workdir,
            engine: raw.engine,
            log_dir: raw.log_dir,
            hang_timeout: raw.hang_timeout,
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
        if let Some((_, message)) = input::unsafe_char_message(&nodelist) {
            self.value(&key, format!("{variable}: {message}"), Some(input::UNSAFE_CHAR_HINT.into()));
            return None;
        }
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
            // First, and alone: every message below quotes the host's names.
            let fields =
                [("address", Some(&host.address)), ("name", host.name.as_ref()), ("ssh_user", host.ssh_user.as_ref())];
            let mut refused = false;
            for (field, value) in fields {
                if let Some((_, message)) = value.and_then(|v| input::unsafe_char_message(v)) {
                    let message = match origin {
                        HostOrigin::Slurm => format!("entry {}: {message}", i + 1),
                        _ => message,
                    };
                    self.host(origin, &[field], message, Some(input::UNSAFE_CHAR_HINT.into()));
                    refused = true;
                }
            }
            if refused {
                continue;
            }
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
        let refused = raw.addr.as_deref().and_then(input::unsafe_char_message);
        let addr = match raw.addr {
            Some(a) if refused.is_some() => {
                let message = refused.map(|(_, m)| m).unwrap_or_default();
                self.value(&path, message, Some(input::UNSAFE_CHAR_HINT.into()));
                a
            }
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

    /// `no_ssh`: the hosts are reached without SSH (local, Slurm steps): its files are not checked.
    fn check_ssh(&mut self, mut ssh: SshSpec, no_ssh: bool) -> SshSpec {
        if ssh.port == 0 {
            self.value(
                &keys(&["ssh", "port"]),
                "port 0 is not an SSH port".into(),
                Some("a TCP port number from 1 to 65535".into()),
            );
        }
        if let Some(user) = &ssh.user {
            if let Some((_, message)) = input::unsafe_char_message(user) {
                self.value(&keys(&["ssh", "user"]), message, Some(input::UNSAFE_CHAR_HINT.into()));
            } else if user.is_empty() || user.chars().any(|c| c.is_whitespace() || c == '@') {
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
        if !no_ssh {
            self.check_known_hosts(&ssh);
        }
        ssh
    }

    /// A known_hosts path that cannot hold keys is refused like `strict_host_key_checking: no`:
    /// it turns verification off in effect. The default path is checked too (when HOME is set),
    /// since a ~/.ssh/known_hosts linked to /dev/null is the same hole.
    fn check_known_hosts(&mut self, ssh: &SshSpec) {
        let (path, default) = match &ssh.known_hosts {
            Some(p) => (p.clone(), false),
            None => match self.env.var("HOME") {
                Some(home) => (PathBuf::from(home).join(".ssh/known_hosts"), true),
                None => return,
            },
        };
        let accept_new = ssh.strict_host_key_checking == StrictMode::AcceptNew;
        if let Some(why) = known_hosts::unfit(&path, accept_new) {
            let why = if default { format!("{why} (the default known_hosts)") } else { why };
            self.value(&keys(&["ssh", "known_hosts"]), why, Some(known_hosts::FIX.into()));
        }
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

/// Loading helpers for the tests of every cluster module.
#[cfg(test)]
pub(super) mod test_support {
    use std::path::Path;

    use super::*;

    pub const NO_ENV: [(&str, &str); 0] = [];

    pub const BASE: &str = "accelerator: npu\ndevices_per_node: 8\n";

    pub fn load(text: &str) -> Result<ClusterSpec, ConfigError> {
        ClusterSpec::from_str_with_env(text, Path::new("c.yaml"), &NO_ENV)
    }

    pub fn ok(text: &str) -> ClusterSpec {
        load(text).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn err(text: &str) -> String {
        match load(text) {
            Ok(spec) => panic!("parsed: {spec:?}"),
            Err(e) => e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

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
    fn the_executor_follows_the_hosts_and_contradictions_are_named() {
        assert_eq!(ok(&format!("{BASE}hosts: [localhost]\n")).executor, Executor::Local);
        let remote = format!("{BASE}hosts: [192.0.2.1]\nssh: {{strict_host_key_checking: accept-new}}\n");
        assert_eq!(ok(&remote).executor, Executor::Ssh);
        let slurm = ok(&format!("{remote}executor: slurm\n"));
        assert_eq!((slurm.executor, slurm.local), (Executor::Slurm, false));
        let env = [("SLURM_JOB_NODELIST", "n[1-2]")];
        let from = ClusterSpec::from_str_with_env(&format!("{BASE}hosts_from: slurm\n"), Path::new("c.yaml"), &env);
        assert_eq!(from.unwrap().executor, Executor::Slurm, "an allocation's hosts run as steps by default");
        let ssh = format!("{BASE}hosts_from: slurm\nexecutor: ssh\n");
        assert_eq!(ClusterSpec::from_str_with_env(&ssh, Path::new("c.yaml"), &env).unwrap().executor, Executor::Ssh);
        let e = err(&format!("{remote}executor: local\n"));
        assert!(e.contains("executor: is local, but the hosts are not all this machine"), "{e}");
        let e = err(&format!("{BASE}hosts: [localhost]\nlocal: true\nexecutor: slurm\n"));
        assert!(e.contains("is slurm, but `local: true` runs every rank here"), "{e}");
        let e = err(&format!("{remote}executor: pbs\n"));
        assert!(e.contains("executor") && e.contains("slurm"), "{e}");
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
    fn known_hosts_that_cannot_hold_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        for (mode, path, needle) in [
            ("accept-new", "/dev/null".to_string(), "`/dev/null` is a device".to_string()),
            ("strict", "/dev/null".to_string(), "`/dev/null` is a device".to_string()),
            ("accept-new", d.to_string(), format!("`{d}` is a directory")),
        ] {
            let e =
                err(&format!("{BASE}hosts: [a]\nssh:\n  known_hosts: {path}\n  strict_host_key_checking: {mode}\n"));
            assert!(e.starts_with(&format!("c.yaml:5:16: ssh.known_hosts: {needle}")), "{mode} {path}: {e}");
            assert!(e.contains("hint: point `ssh.known_hosts` at a regular file"), "{e}");
        }
        // A file accept-new can create is fine; local runs use no SSH at all.
        ok(&format!("{BASE}hosts: [a]\nssh:\n  known_hosts: {d}/new/kh\n  strict_host_key_checking: accept-new\n"));
        ok(&format!("{BASE}hosts: [localhost]\nssh:\n  known_hosts: /dev/null\n"));
        // The default path is checked too: HOME/.ssh/known_hosts as a directory.
        std::fs::create_dir_all(dir.path().join(".ssh/known_hosts")).unwrap();
        let home = d.to_string();
        let env = [("HOME", home.as_str())];
        let e = ClusterSpec::from_str_with_env(&format!("{BASE}hosts: [a]\n"), Path::new("c.yaml"), &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ssh.known_hosts: `") && e.contains("(the default known_hosts)"), "{e}");
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
    fn a_byte_order_mark_is_skipped() {
        let spec = ok(&format!("\u{feff}{BASE}hosts: [a]\n"));
        assert_eq!(spec.hosts[0].address, "a");
        // Positions are the file's: the mark is not a column.
        let e = err(&format!("\u{feff}{BASE}hosts: [a]\nbogus: 1\n"));
        assert!(e.starts_with("c.yaml:4:1: unknown key `bogus`"), "{e}");
    }

    #[test]
    fn invisible_characters_in_names_are_refused_by_code_point() {
        // YAML escapes put the characters in the values; the messages must never show them.
        let e = load(&format!(
            "{BASE}hosts:\n  - \"node\\e[2J\"\n  - address: \"n\\x85\"\n    name: \"a\\u200Bb\"\n    \
             ssh_user: \"\\u202Eroot\"\n  - address: b\n    ssh_user: \"u\\u2066\"\n\
             master: {{addr: \"\\u2060a\"}}\nssh: {{user: \"x\\u200Dy\"}}\n"
        ))
        .unwrap_err();
        let got: Vec<String> =
            e.problems().map(|p| format!("{}:{}: {}", p.line.unwrap(), p.key_path, p.message)).collect();
        assert_eq!(
            got,
            [
                "4:hosts[0].address: character 5 is U+001B, an escape character",
                "5:hosts[1].address: character 2 is U+0085, a control character",
                "6:hosts[1].name: character 2 is U+200B, a zero-width character",
                "7:hosts[1].ssh_user: character 1 is U+202E, a bidirectional control character",
                "9:hosts[2].ssh_user: character 2 is U+2066, a bidirectional control character",
                "10:master.addr: character 1 is U+2060, a zero-width character",
                "11:ssh.user: character 2 is U+200D, a zero-width character",
            ]
        );
        let shown = e.to_string();
        assert!(shown.contains("hint: host names, addresses and user names cannot hold"), "{shown}");
        assert!(shown.chars().all(|c| input::unsafe_char_kind(c).is_none() || c == '\n'), "{shown:?}");
    }

    #[test]
    fn invisible_characters_in_a_slurm_node_list_are_refused() {
        let text = format!("{BASE}hosts_from: slurm\n");
        let env = [("SLURM_JOB_NODELIST", "n[1-2],n\u{1b}]0;x")];
        let e = ClusterSpec::from_str_with_env(&text, Path::new("c.yaml"), &env).unwrap_err().to_string();
        assert!(
            e.starts_with("c.yaml:3:13: hosts_from: SLURM_JOB_NODELIST: character 9 is U+001B, an escape character"),
            "{e}"
        );
        assert!(!e.contains('\u{1b}'), "{e:?}");
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
