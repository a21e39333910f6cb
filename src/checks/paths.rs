//! The job's files on each host: the checkpoint to load, the data, the tokenizer, and free
//! space for one checkpoint where saves go.

use std::collections::BTreeMap;

use super::probe::fact;
use super::rules::{Rows, Status};
use crate::plan::Plan;

pub use mm_spec::human_bytes;

/// (id, path) of every job path the recipe names, as the engine will see it.
pub(crate) fn job_paths(plan: &Plan) -> Vec<(&'static str, String)> {
    let r = &plan.recipe;
    [
        ("load", &r.checkpoint.load),
        ("data_path", &r.data.data_path),
        ("data_folder", &r.data.data_folder),
        ("tokenizer", &r.checkpoint.tokenizer),
    ]
    .into_iter()
    .filter_map(|(n, p)| p.as_ref().map(|p| (n, p.display().to_string())))
    .collect()
}

/// Where checkpoints are saved, if anywhere (the probe measures free space there).
pub(crate) fn save_dir(plan: &Plan) -> Option<String> {
    plan.recipe.checkpoint.save.as_ref().map(|s| s.display().to_string())
}

pub(crate) fn rows(r: &mut Rows, plan: &Plan, facts: &BTreeMap<String, String>) {
    for (name, path) in job_paths(plan) {
        match fact(facts, &format!("path.{name}")) {
            Some("1") => r.push(format!("path:{name}"), Status::Ok, path, "exists", ""),
            _ => r.push(
                format!("path:{name}"),
                Status::Fail,
                format!("{path}: not found"),
                "an existing path on every host",
                format!("copy it to this host or fix `job.{name}` (relative paths start at the workdir)"),
            ),
        }
    }
    if let Some(free) = fact(facts, "disk.free").and_then(|v| v.trim().parse::<u64>().ok()) {
        let need = plan.checkpoint_bytes;
        let st = if free >= need { Status::Ok } else { Status::Fail };
        r.push(
            "disk",
            st,
            format!("{} free", human_bytes(free)),
            format!("≥ {} (one checkpoint)", human_bytes(need)),
            if st == Status::Ok {
                String::new()
            } else {
                "free space at the save path or point job.save elsewhere".into()
            },
        );
    }
}
