//! The pure evaluation framework every check family builds on: a row (host × check id →
//! status, what was found, what was expected, how to fix it), the severities, the allowed
//! values of a setting, `--skip-check` matching and the table `launch check` prints.
//! Nothing here knows a host, a probe or a transport.

use std::fmt::Write as _;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Skip,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Skip => "skip",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckRow {
    pub host: String,
    /// Stable id, usable with --skip-check (e.g. `env:HCCL_CONNECT_TIMEOUT`, `npu-count`).
    pub check: String,
    pub status: Status,
    pub found: String,
    pub expected: String,
    /// How to fix it (empty when ok).
    pub fix: String,
}

/// The rows of one host, as the check families add them.
pub(crate) struct Rows<'a> {
    pub host: &'a str,
    pub rows: Vec<CheckRow>,
}

impl<'a> Rows<'a> {
    pub fn new(host: &'a str) -> Rows<'a> {
        Rows { host, rows: Vec::new() }
    }

    pub fn push(
        &mut self,
        check: impl Into<String>,
        status: Status,
        found: impl Into<String>,
        expected: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.rows.push(CheckRow {
            host: self.host.to_string(),
            check: check.into(),
            status,
            found: found.into(),
            expected: expected.into(),
            fix: fix.into(),
        });
    }
}

/// The allowed values of a setting (the seed's table of Ascend variables uses these).
#[derive(Debug, Clone, Copy)]
pub enum Allowed {
    IntRange(i64, i64),
    OneOf(&'static [&'static str]),
    Bool,
    AllocConf,
}

/// Keys PYTORCH_NPU_ALLOC_CONF accepts (torch_npu mirrors PYTORCH_CUDA_ALLOC_CONF).
const ALLOC_KEYS: &[&str] =
    &["expandable_segments", "max_split_size_mb", "garbage_collection_threshold", "roundup_power2_divisions"];

/// Checks a value against the table entry; Err holds what was expected.
pub fn check_value(allowed: Allowed, value: &str) -> Result<(), String> {
    let v = value.trim();
    match allowed {
        Allowed::IntRange(lo, hi) => match v.parse::<i64>() {
            Ok(n) if (lo..=hi).contains(&n) => Ok(()),
            Ok(_) => Err(format!("an integer in [{lo}, {hi}]")),
            Err(_) => Err(format!("an integer in [{lo}, {hi}] (found a non-integer)")),
        },
        Allowed::OneOf(vals) => {
            if vals.contains(&v) {
                Ok(())
            } else {
                Err(format!("one of {}", vals.join(", ")))
            }
        }
        Allowed::Bool => match v.to_ascii_lowercase().as_str() {
            "true" | "false" => Ok(()),
            _ => Err("true or false".into()),
        },
        Allowed::AllocConf => {
            let expected = || {
                format!(
                    "comma-separated key:value pairs with keys {}, e.g. expandable_segments:True",
                    ALLOC_KEYS.join(", ")
                )
            };
            for part in v.split(',') {
                let Some((k, val)) = part.split_once(':') else { return Err(expected()) };
                let ok = match k.trim() {
                    "expandable_segments" => matches!(val.trim(), "True" | "False"),
                    "max_split_size_mb" | "roundup_power2_divisions" => val.trim().parse::<u64>().is_ok(),
                    "garbage_collection_threshold" => {
                        val.trim().parse::<f64>().map(|x| x > 0.0 && x < 1.0).unwrap_or(false)
                    }
                    _ => false,
                };
                if !ok {
                    return Err(expected());
                }
            }
            Ok(())
        }
    }
}

/// Every check id, or family before `:` (`env:NAME`, `path:NAME`, `setup:N`), a run can
/// produce, whatever the hosts said: what `--skip-check` may name.
pub const CHECK_IDS: &[&str] = &[
    "reachable",
    "setup",
    "workdir",
    "master-port",
    "cpu-cores",
    "npu-count",
    "gpu-count",
    "memory",
    "ascend-env",
    "engine",
    "torchrun",
    "msrun",
    "pretrain_vlm.py",
    "env",
    "path",
    "disk",
    "known-hosts",
    "identity-file",
];

/// Whether `id` is skipped by one of the --skip-check values (an id, or its prefix before `:`).
pub fn is_skipped(id: &str, skips: &[String]) -> bool {
    skips.iter().any(|s| s == id || id.split(':').next() == Some(s.as_str()))
}

/// The table `launch check` prints: one line per row, failures last with their fixes.
pub fn format_table(rows: &[CheckRow]) -> String {
    let w_host = rows.iter().map(|r| r.host.len()).max().unwrap_or(4).max(4);
    let w_check = rows.iter().map(|r| r.check.len()).max().unwrap_or(5).max(5);
    let mut out = String::new();
    let _ = writeln!(out, "{:<w_host$}  {:<w_check$}  {:<6}  found / expected", "host", "check", "status");
    for row in rows {
        let _ = writeln!(
            out,
            "{:<w_host$}  {:<w_check$}  {:<6}  {}{}",
            row.host,
            row.check,
            row.status.as_str(),
            row.found,
            if row.expected.is_empty() || row.status == Status::Ok {
                String::new()
            } else {
                format!("  (expected {})", row.expected)
            }
        );
    }
    let bad: Vec<&CheckRow> = rows.iter().filter(|r| r.status >= Status::Warn).collect();
    if !bad.is_empty() {
        let _ = writeln!(out);
        for row in bad {
            let _ = writeln!(
                out,
                "{} {} on {}: found {}, expected {}{}",
                if row.status == Status::Fail { "error:" } else { "warning:" },
                row.check,
                row.host,
                row.found,
                row.expected,
                if row.fix.is_empty() { String::new() } else { format!("\n  fix: {}", row.fix) }
            );
        }
    }
    let fails = rows.iter().filter(|r| r.status == Status::Fail).count();
    let warns = rows.iter().filter(|r| r.status == Status::Warn).count();
    let _ = writeln!(out, "\n{} checks: {} failed, {} warnings", rows.len(), fails, warns);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_table_ranges() {
        assert!(check_value(Allowed::IntRange(120, 7200), "1200").is_ok());
        assert!(check_value(Allowed::IntRange(120, 7200), "119").is_err());
        assert!(check_value(Allowed::IntRange(120, 7200), "7201").is_err());
        assert!(check_value(Allowed::IntRange(68, 17340), "abc").is_err());
        assert!(check_value(Allowed::OneOf(&["0", "1", "2"]), "3").is_err());
        assert!(check_value(Allowed::Bool, "False").is_ok());
        assert!(check_value(Allowed::Bool, "no").is_err());
        assert!(check_value(Allowed::AllocConf, "expandable_segments:True").is_ok());
        assert!(check_value(Allowed::AllocConf, "expandable_segments:True,max_split_size_mb:128").is_ok());
        assert!(check_value(Allowed::AllocConf, "expandable_segments=True").is_err());
        assert!(check_value(Allowed::AllocConf, "garbage_collection_threshold:1.5").is_err());
    }

    #[test]
    fn skip_by_id_or_family() {
        let skips = vec!["env".to_string(), "disk".to_string()];
        assert!(is_skipped("env:HCCL_CONNECT_TIMEOUT", &skips));
        assert!(is_skipped("disk", &skips));
        assert!(!is_skipped("npu-count", &skips));
    }
}
