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

/// 100,000 levels of `[` (a 200 KB file) took libyaml about a minute; the nesting scan
/// refuses it before parsing, in a cluster file and in a recipe alike.
#[test]
fn deep_nesting_is_refused_before_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let n = 100_000;
    let deep = format!("{}{}", "[".repeat(n), "]".repeat(n));
    let cluster = dir.path().join("deep.yaml");
    std::fs::write(&cluster, format!("accelerator: cpu\ndevices_per_node: 2\nhosts: {deep}\n")).unwrap();
    let recipe = dir.path().join("deep-recipe.yaml");
    std::fs::write(&recipe, format!("train: {deep}\n")).unwrap();

    let started = std::time::Instant::now();
    let e = ClusterSpec::from_file(&cluster).unwrap_err().to_string();
    let cluster_time = started.elapsed();
    assert!(e.contains("deep.yaml:3:135: invalid YAML: collections nest more than 128 levels deep here"), "{e}");
    assert!(e.contains("hint: launch reads at most 128 levels"), "{e}");

    let started = std::time::Instant::now();
    let e = Recipe::resolve("tiny", None, Some(&recipe), &[]).unwrap_err().to_string();
    let recipe_time = started.elapsed();
    assert!(e.contains("deep-recipe.yaml:1:135: invalid YAML: collections nest more than 128 levels deep"), "{e}");

    println!(
        "deep nesting ({} KB) refused in {cluster_time:?} (cluster file), {recipe_time:?} (recipe)",
        deep.len() / 1000
    );
    // Generous: the parser took ~60 s; machines are noisy.
    assert!(cluster_time.as_secs() < 5 && recipe_time.as_secs() < 5, "{cluster_time:?} {recipe_time:?}");
}

/// Files saved by Windows editors start with a byte order mark.
#[test]
fn a_byte_order_mark_is_accepted_in_every_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hosts"), "\u{feff}worker-1 slots=2\nworker-2 slots=2\n").unwrap();
    let cluster = dir.path().join("c.yaml");
    std::fs::write(&cluster, "\u{feff}accelerator: cpu\ndevices_per_node: 2\nhostfile: hosts\n").unwrap();
    let spec = ClusterSpec::from_file(&cluster).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spec.hosts.iter().map(|h| h.address.as_str()).collect::<Vec<_>>(), ["worker-1", "worker-2"]);

    let recipe = dir.path().join("r.yaml");
    std::fs::write(&recipe, "\u{feff}train:\n  lr: 2.0e-4\n").unwrap();
    let r = Recipe::resolve("tiny", None, Some(&recipe), &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.train.lr, 2.0e-4);
    // Positions stay the file's own.
    std::fs::write(&recipe, "\u{feff}train:\n  lrr: 1\n").unwrap();
    let e = Recipe::resolve("tiny", None, Some(&recipe), &[]).unwrap_err();
    assert_eq!((e.line, e.column), (Some(2), Some(3)), "{e}");
}
