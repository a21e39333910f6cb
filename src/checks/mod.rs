//! Environment checks: one probe script per host (one round trip), run on every host in
//! parallel, then pure evaluation of what it reported into a table of host × check rows.
//! A tool a host lacks (no npu-smi on a GPU box) is reported as missing, and the check says
//! so plainly instead of failing obscurely.
//!
//! ```text
//! run      probe on every host ─► evaluate (per host) ─► rows, --skip-check applied
//! probe    the script and the parser of its `name<TAB>base64` facts
//! evaluate facts ─► rows, one family after another:
//!            host (reachable, setup, workdir, master port) · devices (NPU/GPU count, CPU cores)
//!            · env (the seed's variable table, NPUS_PER_NODE, socket interfaces)
//!            · engine (mm-engine / torchrun / msrun) · paths (job files, disk)
//! launcher the launching machine's own rows (SSH key files)
//! rules    rows, severities, allowed values, skip matching, the table
//! ```

mod devices;
mod engine;
mod env;
mod evaluate;
mod host;
mod launcher;
mod paths;
mod probe;
mod rules;
mod run;

pub use devices::{gpu_count, npu_count};
pub use env::NPU_ENV_TABLE;
pub use evaluate::evaluate;
pub use paths::human_bytes;
pub use probe::{parse_probe, probe_script, ProbeTarget};
pub use rules::{check_value, format_table, is_skipped, Allowed, CheckRow, Status};
pub use run::run_all;
