//! The cluster file's exact shape as serde reads it (`RawCluster`, deny_unknown_fields
//! everywhere), step 1 of loading (YAML → raw, serde's first error located), the hints for
//! serde's type and value errors by key, and the hand-written deserializers (host entries,
//! env maps, `setup:`, `strict_host_key_checking`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::spec::{Accelerator, HostSpec, HostsFrom, JobSpec, SshSpec, StrictMode, Template};
use crate::diag::{hinted, shape_error, syntax_error, ConfigError, Locator, Seg, ShapeHints};

/// The file's exact shape. Field order is the order listed in "allowed keys" hints.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    #[serde(default)]
    pub(super) name: Option<String>,
    #[serde(default)]
    pub(super) hosts: Option<Vec<HostSpec>>,
    #[serde(default)]
    pub(super) hostfile: Option<PathBuf>,
    #[serde(default)]
    pub(super) hosts_from: Option<HostsFrom>,
    pub(super) accelerator: Accelerator,
    pub(super) devices_per_node: usize,
    #[serde(default)]
    pub(super) master: RawMaster,
    #[serde(default)]
    pub(super) ssh: SshSpec,
    #[serde(default)]
    pub(super) local: Option<bool>,
    #[serde(default)]
    pub(super) executor: Option<super::spec::Executor>,
    #[serde(default)]
    pub(super) workdir: Option<PathBuf>,
    #[serde(default)]
    pub(super) engine: Option<PathBuf>,
    #[serde(default = "default_log_dir")]
    pub(super) log_dir: PathBuf,
    #[serde(default, with = "super::humane::option")]
    pub(super) hang_timeout: Option<std::time::Duration>,
    #[serde(default, deserialize_with = "de_env")]
    pub(super) env: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) template: Option<Template>,
    #[serde(default, deserialize_with = "de_setup")]
    pub(super) setup: Vec<String>,
    #[serde(default)]
    pub(super) job: JobSpec,
}

fn default_log_dir() -> PathBuf {
    PathBuf::from("logs")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawMaster {
    pub(super) addr: Option<String>,
    pub(super) port: u16,
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

pub(super) fn parse_raw(text: &str, origin: &Path, locator: &Locator) -> Result<RawCluster, ConfigError> {
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
            Err(shape_error(origin, locator, err, &HINTS))
        }
    }
}

/// The cluster file's help for serde errors.
const HINTS: ShapeHints = ShapeHints { required: required_hint, leaf: leaf_hint };

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
        (_, "executor") => "local (a child process), ssh, or slurm (one srun step per node inside the allocation)",
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
        (_, "identity_files") => "a list of strings",
        // `- curl -H Authorization: Bearer x` is a map to YAML.
        (_, "setup") => "a list of shell lines; quote a line that holds `: ` or ` #`: `- \"curl -H 'Auth: x' …\"`",
        _ => return None,
    })
}

// ───────────────────────────── serde helpers ─────────────────────────────

impl<'de> Deserialize<'de> for StrictMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictModeVisitor)
    }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::check::test_support::*;
    use super::*;

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
    fn setup_accepts_one_line_or_a_list() {
        let one = ok(&format!("{BASE}hosts: [a]\nsetup: source /etc/profile\n"));
        assert_eq!(one.setup, ["source /etc/profile"]);
        let two = ok(&format!("{BASE}hosts: [a]\nsetup:\n  - a\n  - b\n"));
        assert_eq!(two.setup, ["a", "b"]);
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
}
