//! Fuzzing the YAML front door: cluster files and recipe files, mutated from real examples,
//! must always load or fail with a located error — never panic. The suite runs a few hundred
//! cases; `FUZZ_CASES=100000 cargo test --release --test fuzz_yaml` runs a long campaign
//! (the README gives the last one's count and time).

use std::path::Path;

use launch::cluster::ClusterSpec;
use launch::plan::Plan;
use launch::recipe::Recipe;
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300)
}

fn seeds() -> Vec<String> {
    let mut v = Vec::new();
    for dir in ["clusters", "tests/corpus/cluster"] {
        let mut paths: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        paths.sort();
        for p in paths {
            if p.extension().is_some_and(|e| e == "yaml") {
                v.push(std::fs::read_to_string(p).unwrap());
            }
        }
    }
    v
}

/// YAML-significant characters and fragments, so mutations reach the parser's corners.
const FRAGMENTS: &[&str] = &[
    ":",
    "-",
    " ",
    "\n",
    "\t",
    "[",
    "]",
    "{",
    "}",
    ",",
    "#",
    "'",
    "\"",
    "&a",
    "*a",
    "!!str",
    "|",
    ">",
    "?",
    "~",
    "null",
    "0",
    "-1",
    "99999999999999999999",
    "1e308",
    "true",
    "0x10",
    "hosts",
    "devices",
    "env",
    "ssh",
    "job",
    "slots: 3",
    "localhost",
    "[0,0]",
    "devices_per_node: 0",
    "\u{feff}",
    "é",
    "---\n",
    "...",
];

#[derive(Debug, Clone)]
enum Edit {
    Insert(usize, usize),
    Delete(usize, usize),
    Replace(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 0..FRAGMENTS.len()).prop_map(|(a, b)| Edit::Insert(a, b)),
        (any::<usize>(), 1usize..12).prop_map(|(a, b)| Edit::Delete(a, b)),
        (any::<usize>(), 0..FRAGMENTS.len()).prop_map(|(a, b)| Edit::Replace(a, b)),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for e in edits {
        let n = chars.len().max(1);
        match *e {
            Edit::Insert(at, f) => {
                let at = at % (chars.len() + 1);
                chars.splice(at..at, FRAGMENTS[f].chars());
            }
            Edit::Delete(at, len) => {
                let at = at % n;
                let end = (at + len).min(chars.len());
                if at < end {
                    chars.drain(at..end);
                }
            }
            Edit::Replace(at, f) => {
                if !chars.is_empty() {
                    let at = at % chars.len();
                    chars.splice(at..at + 1, FRAGMENTS[f].chars());
                }
            }
        }
    }
    chars.into_iter().collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_cluster_files_never_panic(seed in any::<prop::sample::Index>(), edits in prop::collection::vec(edit(), 1..6)) {
        let seeds = seeds();
        let text = apply(&seeds[seed.index(seeds.len())], &edits);
        let env = [("SLURM_JOB_NODELIST", "node[01-02]"), ("HOME", "/root")];
        match ClusterSpec::from_str_with_env(&text, Path::new("fuzz.yaml"), &env) {
            Ok(spec) => {
                // A file that loads must also plan or fail cleanly.
                if let Ok(r) = Recipe::resolve("tiny", Some((&spec.job, &spec.origin)), None, &[]) {
                    let _ = Plan::build(&spec, &r);
                }
            }
            Err(e) => {
                let shown = e.to_string();
                prop_assert!(shown.starts_with("fuzz.yaml"), "error without the file name: {shown}");
            }
        }
    }

    #[test]
    fn random_recipe_overrides_never_panic(
        keys in prop::collection::vec(0usize..KEYS.len(), 1..5),
        values in prop::collection::vec(0usize..VALUES.len(), 5),
        model in 0usize..7,
    ) {
        let sets: Vec<String> = keys.iter().zip(values.iter()).map(|(k, v)| format!("{}={}", KEYS[*k], VALUES[*v])).collect();
        let model = launch::recipe::RECIPE_MODELS[model];
        let cluster = ClusterSpec::from_file("clusters/ascend-2x8-78b.yaml").unwrap();
        match Recipe::resolve(model, Some((&cluster.job, &cluster.origin)), None, &sets) {
            Ok(r) => { let _ = Plan::build(&cluster, &r).map(|p| p.world_size); }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

const KEYS: &[&str] = &[
    "parallel.tp",
    "parallel.pp",
    "parallel.cp",
    "parallel.vpp",
    "parallel.llm_pp_layers",
    "parallel.vit_pp_layers",
    "parallel.sequence_parallel",
    "parallel.unaligned_linear",
    "train.micro_batch_size",
    "train.global_batch_size",
    "train.grad_accumulation",
    "train.seq_length",
    "train.lr",
    "train.min_lr",
    "train.precision",
    "data.max_dynamic_patch",
    "data.min_num_frame",
    "parallel",
    "train",
    "nope.key",
    "parallel.tp.x",
];
const VALUES: &[&str] = &[
    "0",
    "1",
    "2",
    "3",
    "8",
    "16",
    "25",
    "-1",
    "null",
    "[]",
    "[40,40]",
    "[45,0]",
    "[1,2,3]",
    "true",
    "bf16",
    "1e-5",
    "x",
    "{a: 1}",
    "18446744073709551616",
    "0.5",
];
