//! Recipes and layouts: every broken recipe in tests/corpus/recipe/ must fail with exactly
//! the message in its `.expected`.
//!
//! A case is `NAME.yaml` (the `--recipe` file) whose first line is a comment holding the
//! rest of the command line: `# finetune MODEL [--cluster FILE] [--set K=V]...` (default
//! cluster: the embedded local.yaml). The error comes from whichever stage catches it:
//! recipe resolution (file, line and key) or the plan (every layout problem at once).
//! `BLESS_CORPUS=1` rewrites the `.expected` files; review the diff.

mod golden;

use std::path::{Path, PathBuf};

use launch::cluster::ClusterSpec;
use launch::plan::Plan;
use launch::recipe::Recipe;

const CORPUS: &str = "tests/corpus/recipe";

fn run_case(yaml: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(yaml).unwrap();
    let first = text.lines().next().unwrap_or_default();
    let words: Vec<&str> = first
        .strip_prefix("# finetune ")
        .unwrap_or_else(|| panic!("{}: first line must be `# finetune MODEL ...`", yaml.display()))
        .split_whitespace()
        .collect();
    let model = words[0];
    let mut cluster_file: Option<PathBuf> = None;
    let mut sets = Vec::new();
    let mut i = 1;
    while i < words.len() {
        match words[i] {
            "--cluster" => cluster_file = Some(PathBuf::from(words[i + 1])),
            "--set" => sets.push(words[i + 1].to_string()),
            other => panic!("{}: unknown word {other} in the first line", yaml.display()),
        }
        i += 2;
    }
    let cluster = match &cluster_file {
        Some(p) => ClusterSpec::from_file(p),
        None => ClusterSpec::embedded_local(),
    }
    .map_err(|e| format!("cluster: {e}"))?;
    let recipe =
        Recipe::resolve(model, Some((&cluster.job, &cluster.origin)), Some(yaml), &sets).map_err(|e| e.to_string())?;
    Plan::build(&cluster, &recipe).map_err(|e| e.to_string())?;
    Ok(())
}

#[test]
fn every_broken_recipe_fails_with_its_expected_message() {
    golden::check(&golden::cases(CORPUS, 25), run_case);
}

#[test]
fn every_model_plans_on_a_cluster_of_its_seed_size() {
    // The defaults are consistent: each model's recipe lays out on the device count it was made for.
    for (model, cluster) in [
        ("tiny", None),
        ("1b", Some("clusters/ascend-1x8-8b.yaml")),
        ("2b", Some("clusters/ascend-1x8-8b.yaml")),
        ("8b", Some("clusters/ascend-1x8-8b.yaml")),
        ("14b", Some("clusters/ascend-1x8-8b.yaml")),
        ("38b", Some("clusters/ascend-2x8-78b.yaml")),
        ("78b", Some("clusters/ascend-2x8-78b.yaml")),
    ] {
        let c = match cluster {
            Some(p) => ClusterSpec::from_file(p).unwrap(),
            None => ClusterSpec::embedded_local().unwrap(),
        };
        let r = Recipe::resolve(model, Some((&c.job, &c.origin)), None, &[]).unwrap();
        if let Err(e) = Plan::build(&c, &r) {
            panic!("{model}: {e}");
        }
    }
}
