//! The distributed environment the launcher sets for every rank (the torchrun contract:
//! RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) plus our own
//! MM_BIND_ADDR (the address this rank's Gloo transport listens on; defaults to the
//! address that routes to MASTER_ADDR's network, or MASTER_ADDR itself on one host) and
//! MM_DIST_TIMEOUT_S (rendezvous and collective timeout, the role HCCL_CONNECT_TIMEOUT
//! plays on Ascend).

use std::time::Duration;

/// What one rank knows about the job it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub bind_addr: Option<String>,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EnvError {
    #[error("environment variable {name} is not set: {why}")]
    Missing { name: &'static str, why: &'static str },
    #[error("environment variable {name}={value:?} is not valid: expected {expected}")]
    Invalid { name: &'static str, value: String, expected: &'static str },
}

const DEFAULT_TIMEOUT_S: u64 = 600;

impl DistEnv {
    /// Reads the variables through `get` (std::env::var in production, a map in tests).
    /// With no RANK and no WORLD_SIZE at all, this is a single-process run on localhost.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<DistEnv, EnvError> {
        let number = |name: &'static str, default: Option<usize>| -> Result<usize, EnvError> {
            match get(name) {
                Some(v) => v.trim().parse().map_err(|_| EnvError::Invalid {
                    name,
                    value: v,
                    expected: "a non-negative integer",
                }),
                None => default.ok_or(EnvError::Missing {
                    name,
                    why: "the launcher sets it for every rank; set it by hand when starting ranks yourself",
                }),
            }
        };
        let single = get("RANK").is_none() && get("WORLD_SIZE").is_none();
        let world_size = number("WORLD_SIZE", single.then_some(1))?;
        let rank = number("RANK", single.then_some(0))?;
        if world_size == 0 {
            return Err(EnvError::Invalid { name: "WORLD_SIZE", value: "0".into(), expected: "at least 1" });
        }
        if rank >= world_size {
            return Err(EnvError::Invalid {
                name: "RANK",
                value: rank.to_string(),
                expected: "a rank below WORLD_SIZE",
            });
        }
        let local_rank = number("LOCAL_RANK", Some(rank))?;
        let local_world_size = number("LOCAL_WORLD_SIZE", Some(world_size))?;
        let master_addr = match get("MASTER_ADDR") {
            Some(a) if !a.trim().is_empty() => a.trim().to_string(),
            Some(a) => {
                return Err(EnvError::Invalid { name: "MASTER_ADDR", value: a, expected: "a host name or address" })
            }
            None if world_size == 1 => "127.0.0.1".to_string(),
            None => return Err(EnvError::Missing { name: "MASTER_ADDR", why: "every rank must reach rank 0's store" }),
        };
        let master_port = match get("MASTER_PORT") {
            Some(p) => p.trim().parse::<u16>().ok().filter(|p| *p != 0).ok_or(EnvError::Invalid {
                name: "MASTER_PORT",
                value: p,
                expected: "a port number from 1 to 65535",
            })?,
            None if world_size == 1 => 29500,
            None => return Err(EnvError::Missing { name: "MASTER_PORT", why: "every rank must reach rank 0's store" }),
        };
        let timeout = match get("MM_DIST_TIMEOUT_S") {
            Some(v) => {
                Duration::from_secs(v.trim().parse::<u64>().ok().filter(|s| *s > 0).ok_or(EnvError::Invalid {
                    name: "MM_DIST_TIMEOUT_S",
                    value: v,
                    expected: "a positive number of seconds",
                })?)
            }
            None => Duration::from_secs(DEFAULT_TIMEOUT_S),
        };
        let bind_addr = get("MM_BIND_ADDR").filter(|a| !a.trim().is_empty());
        Ok(DistEnv { rank, world_size, local_rank, local_world_size, master_addr, master_port, bind_addr, timeout })
    }

    pub fn from_process() -> Result<DistEnv, EnvError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// The address Gloo should bind: MM_BIND_ADDR, else MASTER_ADDR when it is a loopback
    /// address (every rank on this machine), else let Gloo resolve the hostname.
    pub fn gloo_bind_addr(&self) -> Option<String> {
        if let Some(a) = &self.bind_addr {
            return Some(a.clone());
        }
        let loopback = self.master_addr == "localhost"
            || self.master_addr.parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false);
        loopback.then(|| "127.0.0.1".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<DistEnv, EnvError> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        DistEnv::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn single_process_defaults() {
        let e = env(&[]).unwrap();
        assert_eq!((e.rank, e.world_size, e.master_port), (0, 1, 29500));
        assert_eq!(e.gloo_bind_addr().as_deref(), Some("127.0.0.1"));
    }

    #[test]
    fn multi_rank_needs_master() {
        let err = env(&[("RANK", "1"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(matches!(err, EnvError::Missing { name: "MASTER_ADDR", .. }), "{err}");
    }

    #[test]
    fn rejects_rank_outside_world() {
        let err = env(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]).unwrap_err();
        assert_eq!(err.to_string(), "environment variable RANK=\"2\" is not valid: expected a rank below WORLD_SIZE");
    }

    #[test]
    fn parses_full_environment() {
        let e = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "6000"),
            ("MM_BIND_ADDR", "10.0.0.2"),
            ("MM_DIST_TIMEOUT_S", "30"),
        ])
        .unwrap();
        assert_eq!(e.local_rank, 1);
        assert_eq!(e.timeout, Duration::from_secs(30));
        assert_eq!(e.gloo_bind_addr().as_deref(), Some("10.0.0.2"));
        let bad = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "x")]).unwrap_err();
        assert!(matches!(bad, EnvError::Invalid { name: "MASTER_PORT", .. }));
    }
}
