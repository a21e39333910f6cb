//! Checks of the launching machine itself: the files SSH will need (known_hosts under strict
//! host key checking, the identity files), for the SSH executor.

use super::rules::{CheckRow, Rows, Status};
use crate::cluster::{ClusterSpec, StrictMode};

pub(crate) fn rows(cluster: &ClusterSpec) -> Vec<CheckRow> {
    let mut r = Rows::new("(launcher)");
    if cluster.executor != crate::cluster::Executor::Ssh {
        return r.rows;
    }
    match &cluster.ssh.known_hosts {
        Some(p) if !p.exists() && cluster.ssh.strict_host_key_checking == StrictMode::Strict => r.push(
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
