//! Test helpers for the execution stage: the multi-host rig (network namespaces running
//! OpenSSH, built by scripts/rig.sh) and the behaviour suite shared by the local and SSH
//! backends (suite.rs).
//!
//! The rig needs root and `ip netns`. Without them a rig test FAILS and says why: CI runs as
//! root, and a test that silently skips would hide a broken launcher.
//!
//! Rigs are serialized with a file lock (every rig uses the same bridge and namespace names),
//! and torn down by `Drop` — which runs when a test panics too; `rig.sh up` also removes
//! whatever a killed test process left behind.
#![allow(dead_code)]

pub mod suite;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const RIG_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rig.sh");
pub const SLURM_RIG_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/slurm-rig.sh");
const LOCK_PATH: &str = "/tmp/mm-launch-rig.lock";

#[derive(Debug, Clone)]
pub struct RigHost {
    pub name: String,
    pub address: String,
    pub ns: String,
}

pub struct Rig {
    pub dir: tempfile::TempDir,
    pub hosts: Vec<RigHost>,
    _lock: File,
}

/// Panics (fails the test) with the reason when the rig cannot be built here.
pub fn preflight() {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    assert_eq!(
        uid, 0,
        "the multi-host rig needs root (network namespaces, sshd); this test is not skipped: run the \
         suite as root, as CI does"
    );
    let ok = Command::new("ip").args(["netns", "list"]).output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "`ip netns list` fails here: the rig needs iproute2 and network namespaces (scripts/setup.sh)");
    assert!(Path::new("/usr/sbin/sshd").exists(), "/usr/sbin/sshd is missing: run scripts/setup.sh (openssh-server)");
}

impl Rig {
    /// Builds `n` hosts h1..hn (10.78.0.2..). Blocks while another rig exists.
    pub fn up(n: usize) -> Rig {
        preflight();
        let lock = File::create(LOCK_PATH).expect("create the rig lock file");
        // SAFETY: flock on an open file descriptor.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "cannot lock {LOCK_PATH}");
        let dir = tempfile::Builder::new().prefix("mm-rig-").tempdir().expect("tempdir");
        let out = Command::new("bash").arg(RIG_SCRIPT).arg("up").arg(n.to_string()).arg(dir.path()).output().unwrap();
        if !out.status.success() {
            let _ = Command::new("bash").arg(RIG_SCRIPT).arg("down").output();
            panic!(
                "rig.sh up {n} failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let hosts = std::fs::read_to_string(dir.path().join("hosts"))
            .unwrap()
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                RigHost { name: f[0].into(), address: f[1].into(), ns: f[2].into() }
            })
            .collect();
        Rig { dir, hosts, _lock: lock }
    }

    pub fn key(&self) -> PathBuf {
        self.dir.path().join("id_test")
    }

    pub fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    fn listener_pid(&self, host: &RigHost) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join(format!("sshd_{}.pid", host.name))).ok()?.trim().parse().ok()
    }

    /// `ip netns pids`: every process living "on" the host, with its command line.
    pub fn processes(&self, host: &RigHost) -> Vec<(u32, String)> {
        let out = Command::new("ip").args(["netns", "pids", &host.ns]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .map(|p| {
                let cmd = std::fs::read(format!("/proc/{p}/cmdline"))
                    .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").trim().to_string())
                    .unwrap_or_default();
                (p, cmd)
            })
            .collect()
    }

    /// Starts a real Slurm on the rig (scripts/slurm-rig.sh: munged and slurmctld on h1, a
    /// slurmd on every host, all inside the namespaces, so the rig's teardown stops them) and
    /// returns its slurm.conf (for SLURM_CONF).
    pub fn slurm(&self) -> PathBuf {
        let out = Command::new("bash").arg(SLURM_RIG_SCRIPT).arg("up").arg(self.dir.path()).output().unwrap();
        assert!(
            out.status.success(),
            "slurm-rig.sh up failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.dir.path().join("slurm/slurm.conf")
    }

    /// What runs on the host besides its sshd listener and the Slurm daemons (and, if
    /// `allow_sessions`, besides sshd session processes waiting on a dead connection). A
    /// step's slurmstepd is a leftover: it outlives the step only while something of it runs.
    pub fn leftovers(&self, host: &RigHost, allow_sessions: bool) -> Vec<(u32, String)> {
        let listener = self.listener_pid(host);
        let daemon = |cmd: &str| {
            ["/usr/sbin/slurmd ", "/usr/sbin/slurmctld ", "slurmctld: slurmscriptd", "/usr/sbin/munged "]
                .iter()
                .any(|d| cmd.starts_with(d))
        };
        self.processes(host)
            .into_iter()
            .filter(|(p, cmd)| Some(*p) != listener && !(allow_sessions && cmd.starts_with("sshd")) && !daemon(cmd))
            .filter(|(_, cmd)| !cmd.is_empty()) // zombies being reaped
            .collect()
    }

    /// Waits until no host runs anything but sshd; panics with what is left.
    pub fn assert_clean(&self, within: Duration, allow_sessions: bool) {
        let deadline = Instant::now() + within;
        loop {
            let left: Vec<(String, Vec<(u32, String)>)> = self
                .hosts
                .iter()
                .map(|h| (h.name.clone(), self.leftovers(h, allow_sessions)))
                .filter(|(_, l)| !l.is_empty())
                .collect();
            if left.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                panic!("processes left on rig hosts (ip netns pids): {left:#?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Takes the host's only link down: it drops off the network without a word.
    pub fn link_down(&self, host: &RigHost) {
        let st = Command::new("ip").args(["-n", &host.ns, "link", "set", "eth0", "down"]).status().unwrap();
        assert!(st.success());
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(RIG_SCRIPT).arg("down").output();
    }
}
