//! Cluster files: every broken file in tests/corpus/cluster/ must fail with exactly the message
//! in its `.expected`, and every example in clusters/ must load.
//!
//! Corpus layout: `NAME.yaml` (the broken file), `NAME.expected` (the exact Display of the
//! error), optionally `NAME.env` (`KEY=VALUE` lines: the environment the file is loaded with;
//! default empty). Other files (hostfiles) are referenced by the YAML files.
//! Run with `BLESS_CORPUS=1` to rewrite the `.expected` files after a deliberate change, then
//! review the diff.

mod golden;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use launch::cluster::{Accelerator, ClusterSpec, HostSource, StrictMode, Template};

const CORPUS: &str = "tests/corpus/cluster";
const EXAMPLES: &str = "clusters";

fn read_env(path: &Path) -> BTreeMap<String, String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return BTreeMap::new();
    };
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{}: `{l}` is not KEY=VALUE", path.display()));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn files_with_extension(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    files.sort();
    files
}

#[test]
fn every_broken_cluster_file_fails_with_its_expected_message() {
    golden::check(&golden::cases(CORPUS, 22), |yaml| {
        let env = read_env(&yaml.with_extension("env"));
        ClusterSpec::from_file_with_env(yaml, &env).map(|_| ()).map_err(|e| e.to_string())
    });
}

#[test]
fn every_expected_file_has_its_yaml() {
    for expected in files_with_extension(CORPUS, "expected") {
        assert!(expected.with_extension("yaml").exists(), "{} has no .yaml", expected.display());
    }
}

#[test]
fn errors_carry_structured_fields() {
    let env = BTreeMap::new();
    let e = ClusterSpec::from_file_with_env(Path::new(CORPUS).join("wrong_type_port.yaml"), &env).unwrap_err();
    assert_eq!(e.key_path, "ssh.port");
    assert_eq!((e.line, e.column), (Some(5), Some(9)));
    assert_eq!(e.file, Path::new(CORPUS).join("wrong_type_port.yaml"));

    let e = ClusterSpec::from_file_with_env(Path::new(CORPUS).join("several_problems.yaml"), &env).unwrap_err();
    assert_eq!(e.problems().count(), 4, "{e}");

    let e = ClusterSpec::from_file_with_env(Path::new(CORPUS).join("hostfile_bad_line.yaml"), &env).unwrap_err();
    assert_eq!(e.file, Path::new(CORPUS).join("bad_line.hostfile"));
    assert_eq!(e.line, Some(3));
}

/// The environment the examples are loaded with: a two-node Slurm allocation.
fn example_env() -> BTreeMap<String, String> {
    [("SLURM_JOB_NODELIST", "node[01-02]"), ("HOME", "/home/trainer")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn example(name: &str) -> ClusterSpec {
    let path = Path::new(EXAMPLES).join(name);
    ClusterSpec::from_file_with_env(&path, &example_env()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_example_cluster_loads() {
    let examples = files_with_extension(EXAMPLES, "yaml");
    assert!(examples.len() >= 6, "{examples:?}");
    for path in &examples {
        let spec = ClusterSpec::from_file_with_env(path, &example_env()).unwrap_or_else(|e| panic!("{e}"));
        assert!(!spec.hosts.is_empty(), "{}", path.display());
        assert!(spec.world_size() > 0, "{}", path.display());
        assert!(spec.warnings.is_empty(), "{}: {:?}", path.display(), spec.warnings);
    }
    // Files that are not cluster YAML must be used by one that is.
    let all_text: String = examples.iter().map(|p| std::fs::read_to_string(p).unwrap()).collect();
    for entry in std::fs::read_dir(EXAMPLES).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        assert!(all_text.contains(&name), "{name} is not referenced by any cluster file");
    }
}

#[test]
fn local_example_is_the_embedded_default() {
    let embedded = ClusterSpec::embedded_local().unwrap_or_else(|e| panic!("{e}"));
    let file = example("local.yaml");
    assert_eq!(embedded.hosts, file.hosts);
    assert_eq!(embedded.accelerator, Accelerator::Cpu);
    assert_eq!(embedded.devices_per_node, 2);
    assert!(embedded.local);
    assert_eq!(embedded.log_dir, Path::new("logs"));
    assert_eq!(embedded.world_size(), 2);
    assert_eq!(embedded.hosts_resolved()[0].devices, [0, 1]);
}

#[test]
fn ascend_1x8_matches_the_seed_guide() {
    let spec = example("ascend-1x8-8b.yaml");
    assert_eq!(spec.accelerator, Accelerator::Npu);
    assert_eq!(spec.template, Template::MindspeedMmTorchrun);
    assert_eq!(spec.master.port, 6000);
    assert_eq!(spec.world_size(), 8);
    assert_eq!(spec.setup, ["source /usr/local/Ascend/ascend-toolkit/set_env.sh"]);
    for (k, v) in [
        ("ASCEND_SLOG_PRINT_TO_STDOUT", "0"),
        ("ASCEND_GLOBAL_LOG_LEVEL", "3"),
        ("TASK_QUEUE_ENABLE", "2"),
        ("COMBINED_ENABLE", "1"),
        ("CPU_AFFINITY_CONF", "1"),
        ("HCCL_CONNECT_TIMEOUT", "1200"),
        ("CUDA_DEVICE_MAX_CONNECTIONS", "1"),
        ("PYTORCH_NPU_ALLOC_CONF", "expandable_segments:True"),
        ("ACLNN_CACHE_LIMIT", "100000"),
        ("NPUS_PER_NODE", "8"),
    ] {
        assert_eq!(spec.env.get(k).map(String::as_str), Some(v), "{k}");
    }
    let job = &spec.job;
    assert_eq!(job.load.as_deref(), Some(Path::new("pretrained/InternVL3-8B")));
    assert_eq!(job.save.as_deref(), Some(Path::new("save_dir")));
    assert_eq!(
        job.data_path.as_deref(),
        Some(Path::new("dataset/playground/opensource/sharegpt4v_instruct_gpt4-vision_cap100k.jsonl"))
    );
    assert_eq!(job.data_folder.as_deref(), Some(Path::new("dataset/playground/data")));
    assert_eq!(job.tokenizer.as_deref(), Some(Path::new("raw_ckpt/InternVL3-8B")));
}

#[test]
fn ascend_2x8_has_two_nodes_and_a_fixed_master() {
    let spec = example("ascend-2x8-78b.yaml");
    let hosts = spec.hosts_resolved();
    assert_eq!(hosts.len(), 2);
    assert_eq!(spec.world_size(), 16);
    assert!(!spec.local);
    assert_eq!(spec.master.addr, hosts[0].address);
    assert_eq!(spec.env["HCCL_CONNECT_TIMEOUT"], "1200");
}

#[test]
fn gpu_example_uses_mm_engine_and_per_host_env() {
    let spec = example("gpu-node.yaml");
    assert_eq!(spec.accelerator, Accelerator::Gpu);
    assert_eq!(spec.template, Template::MmEngine);
    assert!(spec.hosts_resolved().iter().all(|h| h.env.contains_key("NCCL_SOCKET_IFNAME")));
    assert_eq!(spec.ssh.strict_host_key_checking, StrictMode::AcceptNew);
    assert_eq!(spec.ssh.identity_files, [Path::new("/home/trainer/.ssh/id_ed25519")]);
}

#[test]
fn hostfile_example_is_read_relative_to_the_cluster_file() {
    let spec = example("ds-hostfile.yaml");
    assert_eq!(spec.host_source, HostSource::Hostfile { path: Path::new(EXAMPLES).join("hostfile.example") });
    let hosts = spec.hosts_resolved();
    assert_eq!(hosts.len(), 2);
    assert_eq!(hosts[1].devices, [0, 1, 2, 3]);
}

#[test]
fn slurm_example_takes_hosts_from_the_injected_environment() {
    let spec = example("slurm.yaml");
    let names: Vec<_> = spec.hosts.iter().map(|h| h.address.as_str()).collect();
    assert_eq!(names, ["node01", "node02"]);
    assert_eq!(
        spec.host_source,
        HostSource::Slurm { variable: "SLURM_JOB_NODELIST".into(), nodelist: "node[01-02]".into() }
    );
    assert_eq!(spec.world_size(), 2 * spec.devices_per_node);
}
