//! SSH sessions on libssh2 (the ssh2 crate): connect with a timeout, verify the host key
//! against known_hosts (strict by default; `accept-new` records unknown keys, reports each
//! key it recorded so the launcher can say so, and still refuses changed ones; a known_hosts
//! path that cannot hold keys is refused before any key is trusted), authenticate with ssh-agent then identity files. ssh2 is blocking:
//! callers run it on their own threads. Keepalives are left to non-blocking callers (see
//! `SshTarget::connect`).

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use ssh2::{CheckResult, HashType, KnownHostFileKind, Session};

use crate::cluster::known_hosts;
use crate::cluster::{ClusterSpec, ResolvedHost, StrictMode};

/// Everything needed to reach one host.
#[derive(Debug, Clone)]
pub struct SshTarget {
    pub host: String,
    pub address: String,
    pub port: u16,
    pub user: String,
    pub identity_files: Vec<PathBuf>,
    pub known_hosts: PathBuf,
    pub strict: StrictMode,
    pub connect_timeout: Duration,
    pub keepalive_interval: Duration,
    pub agent: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("{host}: cannot connect to {address}:{port} within {timeout:?}: {source}")]
    Connect { host: String, address: String, port: u16, timeout: Duration, source: std::io::Error },
    #[error("{host}: SSH handshake failed: {source}")]
    Handshake {
        host: String,
        #[source]
        source: ssh2::Error,
    },
    #[error(
        "{host}: host key for {address}:{port} is not in {known_hosts} ({key_type} SHA256:{fingerprint}); \
         refusing to connect (strict host key checking).\n  fix: verify the fingerprint with the host's \
         administrator, then add it: ssh-keyscan -p {port} {address} >> {known_hosts}\n  or set \
         `ssh.strict_host_key_checking: accept-new` to record first-seen keys"
    )]
    UnknownHostKey {
        host: String,
        address: String,
        port: u16,
        known_hosts: String,
        key_type: String,
        fingerprint: String,
    },
    #[error(
        "{host}: HOST KEY CHANGED for {address}:{port}: it does not match {known_hosts} (now {key_type} \
         SHA256:{fingerprint}). This can be a man-in-the-middle attack or a reinstalled host; refusing \
         to connect.\n  fix: if the change is expected, remove the old key with `ssh-keygen -R {address} -f {known_hosts}` \
         and add the new one"
    )]
    HostKeyChanged {
        host: String,
        address: String,
        port: u16,
        known_hosts: String,
        key_type: String,
        fingerprint: String,
    },
    #[error("{host}: {reason}; refusing to connect.\n  fix: {fix}", fix = known_hosts::FIX)]
    UnfitKnownHosts { host: String, reason: String },
    #[error("{host}: cannot read known_hosts {path}: {message}")]
    KnownHosts { host: String, path: String, message: String },
    #[error("{host}: authentication as {user} failed (tried: {tried}); add a key to ssh-agent or list it in `ssh.identity_files`")]
    Auth { host: String, user: String, tried: String },
    #[error("{host}: {what}: {source}")]
    Channel {
        host: String,
        what: String,
        #[source]
        source: ssh2::Error,
    },
    #[error("{host}: {what}: {source}")]
    Io {
        host: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// A host key `accept-new` trusted on first sight and appended to known_hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedKey {
    pub host: String,
    pub address: String,
    pub port: u16,
    /// `ed25519`, `rsa`, `ecdsa-nistp256`, …
    pub key_type: String,
    /// SHA256, base64 without padding (as `ssh-keygen -l` prints it).
    pub fingerprint: String,
    pub known_hosts: String,
}

impl RecordedKey {
    /// The console line: `h2 (10.0.0.2:22): first connection, recorded its ed25519 key SHA256:… in …`.
    pub fn announcement(&self) -> String {
        format!(
            "{} ({}:{}): first connection, recorded its {} key SHA256:{} in {}",
            self.host, self.address, self.port, self.key_type, self.fingerprint, self.known_hosts
        )
    }
}

impl SshTarget {
    pub fn new(cluster: &ClusterSpec, host: &ResolvedHost, env: &dyn Fn(&str) -> Option<String>) -> SshTarget {
        let home = env("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
        let user = host
            .ssh_user
            .clone()
            .or_else(|| cluster.ssh.user.clone())
            .or_else(|| env("USER"))
            .unwrap_or_else(|| "root".into());
        let identity_files = if cluster.ssh.identity_files.is_empty() {
            ["id_ed25519", "id_ecdsa", "id_rsa"]
                .iter()
                .map(|f| home.join(".ssh").join(f))
                .filter(|p| p.exists())
                .collect()
        } else {
            cluster.ssh.identity_files.clone()
        };
        SshTarget {
            host: host.name.clone(),
            address: host.address.clone(),
            port: host.ssh_port,
            user,
            identity_files,
            known_hosts: cluster.ssh.known_hosts.clone().unwrap_or_else(|| home.join(".ssh/known_hosts")),
            strict: cluster.ssh.strict_host_key_checking,
            connect_timeout: cluster.ssh.connect_timeout,
            keepalive_interval: cluster.ssh.keepalive_interval,
            agent: cluster.ssh.agent,
        }
    }

    /// Connects, verifies the host key and authenticates. The key, when `accept-new` has just
    /// recorded it: the caller announces it.
    pub fn connect(&self) -> Result<(Session, Option<RecordedKey>), SshError> {
        let host = self.host.clone();
        let connect_err = |source| SshError::Connect {
            host: host.clone(),
            address: self.address.clone(),
            port: self.port,
            timeout: self.connect_timeout,
            source,
        };
        let addr = (self.address.as_str(), self.port)
            .to_socket_addrs()
            .map_err(connect_err)?
            .next()
            .ok_or_else(|| connect_err(std::io::Error::other("the address resolves to nothing")))?;
        let tcp = TcpStream::connect_timeout(&addr, self.connect_timeout).map_err(connect_err)?;
        // Handshake steps and control messages are small writes that wait for an answer;
        // Nagle's algorithm would hold them back behind the previous segment's ACK.
        let _ = tcp.set_nodelay(true);
        let mut sess = Session::new().map_err(|source| SshError::Handshake { host: host.clone(), source })?;
        sess.set_tcp_stream(tcp);
        sess.set_timeout(self.connect_timeout.as_millis() as u32);
        prefer_fast_ciphers(&sess);
        sess.handshake().map_err(|source| SshError::Handshake { host: host.clone(), source })?;
        let recorded = self.verify_host_key(&sess)?;
        self.authenticate(&sess)?;
        sess.set_timeout(0);
        // No libssh2 keepalive here: libssh2 ends any *blocking* wait with "Timed out waiting
        // on socket" once the keepalive interval passes, so a blocking call waiting longer than the
        // interval would fail. Non-blocking users (exec::ssh's pump) enable it themselves.
        Ok((sess, recorded))
    }

    fn verify_host_key(&self, sess: &Session) -> Result<Option<RecordedKey>, SshError> {
        // Checked when the cluster file was loaded too; asked again right before trusting a key,
        // since the file may have changed in between.
        let accept_new = self.strict == StrictMode::AcceptNew;
        if let Some(reason) = known_hosts::unfit(&self.known_hosts, accept_new) {
            return Err(SshError::UnfitKnownHosts { host: self.host.clone(), reason });
        }
        let (key, key_type) = sess.host_key().ok_or_else(|| SshError::KnownHosts {
            host: self.host.clone(),
            path: self.known_hosts.display().to_string(),
            message: "the server sent no host key".into(),
        })?;
        let fingerprint = sess.host_key_hash(HashType::Sha256).map(base64_nopad).unwrap_or_default();
        let key_type = format!("{key_type:?}");
        let mut kh = sess.known_hosts().map_err(|e| SshError::KnownHosts {
            host: self.host.clone(),
            path: self.known_hosts.display().to_string(),
            message: e.to_string(),
        })?;
        if self.known_hosts.exists() {
            kh.read_file(&self.known_hosts, KnownHostFileKind::OpenSSH).map_err(|e| SshError::KnownHosts {
                host: self.host.clone(),
                path: self.known_hosts.display().to_string(),
                message: e.to_string(),
            })?;
        }
        let details = || (self.host.clone(), self.address.clone(), self.port, self.known_hosts.display().to_string());
        match kh.check_port(&self.address, self.port, key) {
            CheckResult::Match => Ok(None),
            CheckResult::Mismatch => {
                let (host, address, port, known_hosts) = details();
                Err(SshError::HostKeyChanged { host, address, port, known_hosts, key_type, fingerprint })
            }
            // Only a key that is really absent is recorded: libssh2's Failure (e.g. a host name
            // too long for its lookup) must not turn into trusting whatever key is offered.
            CheckResult::NotFound if accept_new => {
                self.record_host_key(key, &key_type)?;
                let (host, address, port, known_hosts) = details();
                let key_type = key_names(&key_type).1.to_string();
                Ok(Some(RecordedKey { host, address, port, key_type, fingerprint, known_hosts }))
            }
            CheckResult::NotFound | CheckResult::Failure => {
                let (host, address, port, known_hosts) = details();
                Err(SshError::UnknownHostKey { host, address, port, known_hosts, key_type, fingerprint })
            }
        }
    }

    /// accept-new: append `[addr]:port type base64` (OpenSSH's format) to known_hosts.
    fn record_host_key(&self, key: &[u8], key_type: &str) -> Result<(), SshError> {
        let name = key_names(key_type).0;
        let host = if self.port == 22 { self.address.clone() } else { format!("[{}]:{}", self.address, self.port) };
        let line = format!("{host} {name} {}\n", base64_std(key));
        let io = |source| SshError::Io {
            host: self.host.clone(),
            what: format!("record the host key in {}", self.known_hosts.display()),
            source,
        };
        if let Some(dir) = self.known_hosts.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.known_hosts).map_err(io)?;
        f.write_all(line.as_bytes()).map_err(io)
    }

    fn authenticate(&self, sess: &Session) -> Result<(), SshError> {
        let mut tried = Vec::new();
        if self.agent {
            tried.push("ssh-agent".to_string());
            if sess.userauth_agent(&self.user).is_ok() && sess.authenticated() {
                return Ok(());
            }
        }
        for key in &self.identity_files {
            tried.push(key.display().to_string());
            if sess.userauth_pubkey_file(&self.user, None, key, None).is_ok() && sess.authenticated() {
                return Ok(());
            }
        }
        Err(SshError::Auth { host: self.host.clone(), user: self.user.clone(), tried: tried.join(", ") })
    }
}

/// libssh2's key type (as `{:?}` spells it) → (OpenSSH's known_hosts name, a short name).
fn key_names(key_type: &str) -> (&'static str, &'static str) {
    match key_type {
        "Rsa" => ("ssh-rsa", "rsa"),
        "Dss" => ("ssh-dss", "dsa"),
        "Ecdsa256" => ("ecdsa-sha2-nistp256", "ecdsa-nistp256"),
        "Ecdsa384" => ("ecdsa-sha2-nistp384", "ecdsa-nistp384"),
        "Ecdsa521" => ("ecdsa-sha2-nistp521", "ecdsa-nistp521"),
        "Ed25519" => ("ssh-ed25519", "ed25519"),
        _ => ("unknown", "unknown"),
    }
}

/// AES-GCM first (hardware AES, no separate MAC), then libssh2's usual choices: rank output
/// is the launcher's bulk traffic. Ignored when this libssh2 lacks a method.
fn prefer_fast_ciphers(sess: &Session) {
    const CIPHERS: &str = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,\
                           aes128-ctr,aes192-ctr,aes256-ctr";
    for m in [ssh2::MethodType::CryptCs, ssh2::MethodType::CryptSc] {
        let _ = sess.method_pref(m, CIPHERS);
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_std(data: &[u8]) -> String {
    let mut s = base64_nopad(data);
    while s.len() % 4 != 0 {
        s.push('=');
    }
    s
}

fn base64_nopad(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len() * 4 / 3 + 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..=chunk.len() {
            out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_openssh_style() {
        assert_eq!(base64_std(b"hello"), "aGVsbG8=");
        assert_eq!(base64_nopad(b"hello"), "aGVsbG8");
        assert_eq!(base64_std(b""), "");
        assert_eq!(base64_std(b"abc"), "YWJj");
    }

    #[test]
    fn recorded_keys_are_announced_by_host_address_type_and_fingerprint() {
        let k = RecordedKey {
            host: "h2".into(),
            address: "10.0.0.2".into(),
            port: 22,
            key_type: key_names("Ed25519").1.into(),
            fingerprint: "abc".into(),
            known_hosts: "/root/.ssh/known_hosts".into(),
        };
        assert_eq!(
            k.announcement(),
            "h2 (10.0.0.2:22): first connection, recorded its ed25519 key SHA256:abc in /root/.ssh/known_hosts"
        );
        assert_eq!(key_names("Ecdsa256"), ("ecdsa-sha2-nistp256", "ecdsa-nistp256"));
    }

    #[test]
    fn unfit_known_hosts_name_the_path_and_the_fix() {
        let reason = known_hosts::unfit(std::path::Path::new("/dev/null"), true).unwrap();
        let e = SshError::UnfitKnownHosts { host: "h1".into(), reason }.to_string();
        assert!(e.starts_with("h1: `/dev/null` is a device"), "{e}");
        assert!(e.contains("refusing to connect") && e.contains("fix: point `ssh.known_hosts`"), "{e}");
    }
}
