//! `launch check` on a fake Ascend host: npu-smi and torchrun are small scripts on PATH
//! (put there by the cluster's own `setup:` line), so every NPU check runs without an NPU.
//! Each out-of-range variable of the seed's table must be caught and named. Last, a whole
//! MindSpeed-MM run on that host: the venv's real torchrun starting a stand-in
//! pretrain_vlm.py whose last rank prints what MindSpeed-MM's prints.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn write_exec(path: &Path, body: &str) {
    std::fs::write(path, body).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn fixture(npu_count: usize) -> Fixture {
    fixture_with(npu_count, 65536)
}

/// A fake host with `npu_count` NPUs of `hbm_mb` MB each (Atlas 800T A2: 65536).
fn fixture_with(npu_count: usize, hbm_mb: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let bin = root.join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    write_exec(
        &bin.join("npu-smi"),
        &format!(
            "#!/bin/sh\nif [ \"$1 $2\" = 'info -l' ]; then printf '\\tTotal Count                    : {npu_count}\\n\\n\\tNPU ID : 0\\n'; exit 0; fi\n\
             if [ \"$1 $2 $3 $4 $5\" = 'info -t memory -i 0' ]; then printf '\\tDDR Capacity(MB)               : 15171\\n\\tHBM Capacity(MB)               : {hbm_mb}\\n'; exit 0; fi\nexit 9\n"
        ),
    );
    write_exec(&bin.join("torchrun"), "#!/bin/sh\nexit 0\n");
    std::fs::create_dir_all(root.join("fake-cann")).unwrap();
    let work = root.join("work");
    for d in ["pretrained/InternVL3-8B", "raw_ckpt/InternVL3-8B", "dataset/data", "save_dir"] {
        std::fs::create_dir_all(work.join(d)).unwrap();
    }
    std::fs::write(work.join("dataset/train.jsonl"), "{}\n").unwrap();
    std::fs::write(work.join("pretrain_vlm.py"), "").unwrap();
    Fixture { _dir: dir, root }
}

fn cluster(f: &Fixture, port: u16, env: &[(&str, &str)]) -> PathBuf {
    let mut y = format!(
        "hosts: [localhost]\naccelerator: npu\ndevices_per_node: 8\ntemplate: mindspeed-mm-torchrun\n\
         master: {{port: {port}}}\nworkdir: {work}\nsetup:\n  - export PATH={bin}:$PATH\n\
         job:\n  load: pretrained/InternVL3-8B\n  save: save_dir\n  data_path: dataset/train.jsonl\n  \
         data_folder: dataset/data\n  tokenizer: raw_ckpt/InternVL3-8B\nenv:\n  ASCEND_TOOLKIT_HOME: {cann}\n",
        work = f.root.join("work").display(),
        cann = f.root.join("fake-cann").display(),
        bin = f.root.join("fakebin").display()
    );
    for (k, v) in env {
        y.push_str(&format!("  {k}: \"{v}\"\n"));
    }
    let path = f.root.join("cluster.yaml");
    std::fs::write(&path, y).unwrap();
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn check(cluster: &Path, extra: &[&str]) -> (i32, Vec<serde_json::Value>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_launch"))
        .arg("--cluster")
        .arg(cluster)
        .args(["check", "8b", "--json", "--skip-check", "disk"])
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{stderr}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code().unwrap_or(-1), rows, stderr)
}

fn row<'a>(rows: &'a [serde_json::Value], id: &str) -> &'a serde_json::Value {
    rows.iter().find(|r| r["check"] == id).unwrap_or_else(|| panic!("no row {id} in {rows:#?}"))
}

/// The seed's settings (finetune_internvl3_8B.sh) pass every check.
const SEED_ENV: &[(&str, &str)] = &[
    ("ASCEND_SLOG_PRINT_TO_STDOUT", "0"),
    ("ASCEND_GLOBAL_LOG_LEVEL", "3"),
    ("TASK_QUEUE_ENABLE", "2"),
    ("COMBINED_ENABLE", "1"),
    ("CPU_AFFINITY_CONF", "1"),
    ("HCCL_CONNECT_TIMEOUT", "1200"),
    ("HCCL_EXEC_TIMEOUT", "1800"),
    ("ACLNN_CACHE_LIMIT", "100000"),
    ("NPU_ASD_ENABLE", "0"),
    ("ASCEND_LAUNCH_BLOCKING", "0"),
    ("MULTI_STREAM_MEMORY_REUSE", "1"),
    ("TOKENIZERS_PARALLELISM", "false"),
    ("PYTORCH_NPU_ALLOC_CONF", "expandable_segments:True"),
    ("NPUS_PER_NODE", "8"),
];

#[test]
fn the_seed_environment_passes_every_check() {
    let f = fixture(8);
    let (code, rows, stderr) = check(&cluster(&f, free_port(), SEED_ENV), &[]);
    let failed: Vec<_> = rows.iter().filter(|r| r["status"] != "ok").collect();
    assert!(failed.is_empty(), "{failed:#?}\n{stderr}");
    assert_eq!(code, 0);
    for id in [
        "reachable",
        "ascend-env",
        "npu-count",
        "torchrun",
        "pretrain_vlm.py",
        "path:load",
        "path:data_path",
        "path:tokenizer",
        "master-port",
    ] {
        assert_eq!(row(&rows, id)["status"], "ok", "{id}");
    }
    assert_eq!(row(&rows, "npu-count")["found"], "8 devices");
    // The seed's 8B layout (TP1 PP4, no recomputation) fits a 64 GB NPU.
    let m = row(&rows, "memory");
    assert_eq!(m["status"], "ok", "{m}");
    assert_eq!(m["found"], "64.00 GiB per NPU (npu-smi)", "{m}");
    assert!(m["expected"].as_str().unwrap().contains("the estimate for the busiest device"), "{m}");
}

/// On NPUs with half the memory the same layout does not fit: the memory row warns and lists
/// the recipe changes that would, each with its estimate; recomputation is one of them.
#[test]
fn a_device_too_small_for_the_estimate_warns_with_options_that_fit() {
    let f = fixture_with(8, 32768);
    let (code, rows, stderr) = check(&cluster(&f, free_port(), SEED_ENV), &[]);
    assert_eq!(code, 0, "a warning does not fail the checks: {stderr}");
    let m = row(&rows, "memory");
    assert_eq!(m["status"], "warn", "{m}");
    assert_eq!(m["found"], "32.00 GiB per NPU (npu-smi)", "{m}");
    let fix = m["fix"].as_str().unwrap();
    assert!(fix.starts_with("options that fit: ") && fix.contains("`--set train.recompute=true` ("), "{fix}");
    // The suggestion fits: the dry run with it estimates less than 90% of 32 GiB.
    let out = Command::new(env!("CARGO_BIN_EXE_launch"))
        .arg("--cluster")
        .arg(f.root.join("cluster.yaml"))
        .args(["finetune", "8b", "--dry-run", "--json", "--set", "train.recompute=true"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let peak = v["plan"]["memory"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["total"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(peak > 0.0 && peak <= 0.9 * 32768.0 * 1048576.0, "{peak}");
}

#[test]
fn every_out_of_range_variable_of_the_seed_table_is_caught() {
    let bad: &[(&str, &str, &str)] = &[
        ("HCCL_CONNECT_TIMEOUT", "119", "an integer in [120, 7200]"),
        ("HCCL_EXEC_TIMEOUT", "17341", "an integer in [68, 17340]"),
        ("ACLNN_CACHE_LIMIT", "0", "an integer in [1, 10000000]"),
        ("TASK_QUEUE_ENABLE", "3", "one of 0, 1, 2"),
        ("COMBINED_ENABLE", "2", "one of 0, 1"),
        ("CPU_AFFINITY_CONF", "yes", "one of 0, 1, 2"),
        ("NPU_ASD_ENABLE", "4", "one of 0, 1, 2, 3"),
        ("ASCEND_LAUNCH_BLOCKING", "true", "one of 0, 1"),
        ("MULTI_STREAM_MEMORY_REUSE", "-1", "one of 0, 1"),
        ("ASCEND_GLOBAL_LOG_LEVEL", "5", "one of 0, 1, 2, 3, 4"),
        ("ASCEND_SLOG_PRINT_TO_STDOUT", "on", "one of 0, 1"),
        ("TOKENIZERS_PARALLELISM", "maybe", "true or false"),
        ("NPUS_PER_NODE", "16", "8 (the devices this host runs)"),
    ];
    let f = fixture(8);
    let env: Vec<(&str, &str)> = bad.iter().map(|(k, v, _)| (*k, *v)).collect();
    let (code, rows, _) = check(&cluster(&f, free_port(), &env), &[]);
    assert_eq!(code, 3, "failed checks exit 3");
    for (name, value, expected) in bad {
        let r = row(&rows, &format!("env:{name}"));
        assert_eq!(r["status"], "fail", "{name}={value} must fail: {r}");
        assert_eq!(r["found"], *value);
        assert_eq!(r["expected"], *expected, "{name}");
        assert!(r["fix"].as_str().unwrap().contains(name), "the fix names the variable: {r}");
    }
    // PYTORCH_NPU_ALLOC_CONF is checked for syntax, separately so the other rows stay readable.
    let (_, rows, _) = check(&cluster(&f, free_port(), &[("PYTORCH_NPU_ALLOC_CONF", "expandable_segments=True")]), &[]);
    assert_eq!(row(&rows, "env:PYTORCH_NPU_ALLOC_CONF")["status"], "fail");
}

#[test]
fn device_count_mismatch_busy_port_and_skips() {
    let f = fixture(4);
    let busy = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let (code, rows, _) = check(&cluster(&f, port, SEED_ENV), &[]);
    assert_eq!(code, 3);
    let npu = row(&rows, "npu-count");
    assert_eq!((npu["status"].as_str(), npu["found"].as_str()), (Some("fail"), Some("4 devices")));
    assert_eq!(row(&rows, "master-port")["status"], "fail");
    // Skipping by id and by family removes exactly those rows.
    let (_, rows, _) = check(&cluster(&f, port, SEED_ENV), &["--skip-check", "npu-count", "--skip-check", "env"]);
    assert!(rows.iter().all(|r| r["check"] != "npu-count" && !r["check"].as_str().unwrap().starts_with("env:")));
    assert_eq!(row(&rows, "master-port")["status"], "fail");
}

#[test]
fn a_host_without_npu_smi_says_so() {
    let f = fixture(8);
    std::fs::remove_file(f.root.join("fakebin/npu-smi")).unwrap();
    let path = cluster(&f, free_port(), SEED_ENV);
    // Keep PATH minimal so a real npu-smi elsewhere cannot answer.
    let text = std::fs::read_to_string(&path).unwrap().replace(":$PATH", ":/usr/bin:/bin");
    std::fs::write(&path, text).unwrap();
    let (_, rows, _) = check(&path, &[]);
    let r = row(&rows, "npu-count");
    assert_eq!(r["status"], "fail");
    assert_eq!(r["found"], "npu-smi not found on this host");
}

/// ASCEND_TOOLKIT_HOME must name a folder on the host: set to a path that is not there, the
/// toolkit row fails and names it (an unset one and no set_env.sh fail too).
#[test]
fn a_toolkit_home_that_is_not_there_fails_the_ascend_row() {
    let f = fixture(8);
    let (_, rows, _) = check(&cluster(&f, free_port(), SEED_ENV), &[]);
    let want = format!("ASCEND_TOOLKIT_HOME={}", f.root.join("fake-cann").display());
    assert_eq!(
        (row(&rows, "ascend-env")["status"].as_str(), row(&rows, "ascend-env")["found"].as_str()),
        (Some("ok"), Some(want.as_str()))
    );
    std::fs::remove_dir(f.root.join("fake-cann")).unwrap();
    let (code, rows, _) = check(&cluster(&f, free_port(), SEED_ENV), &[]);
    let r = row(&rows, "ascend-env");
    assert_eq!(code, 3);
    assert_eq!(r["status"], "fail");
    assert!(r["found"].as_str().unwrap().starts_with(&format!("{want} is not a folder")), "{r}");
    assert!(r["fix"].as_str().unwrap().contains("point ASCEND_TOOLKIT_HOME at the installed toolkit"), "{r}");
}

/// `make demo`'s cluster (clusters/local.yaml, OMP_NUM_THREADS=1 for its CPU ranks) through
/// the real path (local backend, node agent, probe unit): the cpu-cores row counts the cores
/// the ranks may use, not OMP_NUM_THREADS.
#[test]
fn local_cluster_counts_cores_not_omp_threads() {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("clusters/local.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_launch"))
        .arg("--cluster")
        .arg(&local)
        .args(["check", "tiny", "--json"])
        .output()
        .unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row(&rows, "reachable")["status"], "ok", "{rows:#?}");
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let cpu = row(&rows, "cpu-cores");
    if cores >= 2 {
        assert_eq!(cpu["status"], "ok", "{cpu:#?}");
        assert_ne!(cpu["found"], "1 cores", "{cpu:#?}");
    }
}

/// A stand-in for MindSpeed-MM's pretrain_vlm.py, run by the real torchrun (the venv's): its
/// last rank prints what MindSpeed-MM's last rank prints every `--log-interval` iterations,
/// with the format strings of its `training_log` (mindspeed_mm/training.py), from the
/// arguments the template passes; the other ranks print a line each. After iteration 1 it
/// waits for a file `go` (made once that iteration reached metrics.jsonl: lines must pass
/// through torchrun as they come, not when it exits). Iteration 4's loss is NaN, which
/// Megatron leaves out of the line (it prints averages ≥ 0).
const MINDSPEED_LAST_RANK: &str = r#"
import datetime, os, sys, time
args = sys.argv[1:]
def val(flag, default=None):
    return args[args.index(flag) + 1] if flag in args else default
iters, interval = int(val("--train-iters")), int(val("--log-interval", "1"))
gbs = int(val("--global-batch-size"))
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
print(f"rank {rank} of {world}: training ...", flush=True)
if rank != world - 1:
    sys.exit(0)
for it in range(interval, iters + 1, interval):
    loss = float("nan") if it == 4 else 2.0 / it
    s = f" [{datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}]"
    s += ' iteration {:8d}/{:8d} |'.format(it, iters)
    s += ' consumed samples: {:12d} |'.format(it * gbs)
    s += ' elapsed time per iteration (ms): {:.1f} |'.format(1000.0 * (1 + it / 10))
    s += ' learning rate: {:.6E} |'.format(1e-5)
    s += ' global batch size: {:5d} |'.format(gbs)
    totals = {"tokens per sample": 2048.0} if "--log-tps" in args else {}
    totals["loss"] = loss
    for key, avg in totals.items():
        if avg >= 0.0:
            s += ' {}: {:.6E} |'.format(key, avg)
    s += ' loss scale: {:.1f} |'.format(1.0)
    s += ' grad norm: {:.3f} |'.format(0.5)
    s += ' number of skipped iterations: {:3d} |'.format(0)
    s += ' number of nan iterations: {:3d} |'.format(0 if loss == loss else 1)
    print(s, flush=True)
    deadline = time.time() + 60
    while it == interval and not os.path.exists("go") and time.time() < deadline:
        time.sleep(0.05)
"#;

/// MindSpeed-MM sends no progress lines of ours: its runs get the bar or compact lines,
/// metrics.jsonl, the TensorBoard copy and `launch logs --summary` from Megatron's iteration
/// line instead, with what that line does not say left empty.
#[test]
fn a_mindspeed_mm_run_gets_its_metrics_from_megatrons_iteration_lines() {
    let f = fixture(8);
    let torchrun = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/torchrun");
    assert!(torchrun.exists(), "{} is missing: run scripts/setup.sh", torchrun.display());
    write_exec(&f.root.join("fakebin/torchrun"), &format!("#!/bin/sh\nexec {} \"$@\"\n", torchrun.display()));
    std::fs::write(f.root.join("work/pretrain_vlm.py"), MINDSPEED_LAST_RANK).unwrap();
    let cluster = cluster(&f, free_port(), SEED_ENV);
    let launch = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_launch")).current_dir(&f.root).args(args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "launch {args:?}:\n{text}");
        text
    };
    // The machine's PYTHONUNBUFFERED would hide a buffering torchrun: the template sets it.
    let job = Command::new(env!("CARGO_BIN_EXE_launch"))
        .current_dir(&f.root)
        .args(["--cluster", cluster.to_str().unwrap(), "finetune", "8b", "--set", "train.train_iters=6"])
        .env_remove("PYTHONUNBUFFERED")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = f.root.join("logs/latest/metrics.jsonl");
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(&metrics).is_ok_and(|t| t.lines().count() == 1) {
        if t0.elapsed().as_secs() >= 30 {
            // Stop the job (the launcher stops its ranks) before failing.
            let pid = nix::unistd::Pid::from_raw(job.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let o = job.wait_with_output().unwrap();
            panic!(
                "iteration 1 did not reach metrics.jsonl while the job ran:\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::fs::write(f.root.join("work/go"), "").unwrap();
    let o = job.wait_with_output().unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{out}");
    // Not a terminal: one compact line per logged iteration; 128 samples of 2048 tokens in 1.1 s.
    assert!(out.contains("[launch] iteration 1/6 · loss 2.0000 · 238313 tok/s"), "{out}");
    assert!(out.contains("[launch] iteration 4/6 · loss NaN ·"), "{out}");

    let run = f.root.join("logs/latest");
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let recs: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let its: Vec<u64> = recs.iter().map(|r| r["iteration"].as_u64().unwrap()).collect();
    assert_eq!(its, [1, 2, 3, 4, 5, 6], "{text}");
    let r2 = &recs[1];
    assert_eq!(
        (r2["attempt"].as_u64(), r2["train_iters"].as_u64(), r2["consumed_samples"].as_u64()),
        (Some(0), Some(6), Some(256))
    );
    assert_eq!((r2["loss"].as_f64(), r2["lr"].as_f64(), r2["grad_norm"].as_f64()), (Some(1.0), Some(1e-5), Some(0.5)));
    assert_eq!((r2["step_ms"].as_f64(), r2["samples_per_sec"].as_f64()), (Some(1200.0), Some(128.0 / 1.2)));
    assert_eq!(r2["tokens_per_sec"].as_f64(), Some(128.0 * 2048.0 / 1.2));
    assert_eq!(recs[3]["loss"], "nan", "a loss Megatron left out is NaN: {text}");
    // What the line does not carry stays unknown, not zero.
    for key in ["tflops", "mfu", "mem_bytes", "data_ms", "slowest_rank"] {
        assert!(r2[key].is_null(), "{key}: {r2}");
    }
    let events: Vec<_> = std::fs::read_dir(run.join("tensorboard")).unwrap().flatten().collect();
    assert_eq!(events.len(), 1, "one event file for the attempt");
    // torchrun's rank tags (`--tee 3`) put each rank's lines, untagged, in its own log.
    let log = |r: usize| std::fs::read_to_string(run.join(format!("localhost/rank-{r}.log"))).unwrap();
    let last = log(7);
    assert!(last.starts_with("rank 7 of 8: training ..."), "{last}");
    assert_eq!(last.lines().filter(|l| l.contains("| consumed samples:")).count(), 6, "{last}");
    assert_eq!(log(3).trim_end(), "rank 3 of 8: training ...");
    assert!(launch(&["logs", "--rank", "7"]).contains("iteration        6/       6 |"));

    let summary = launch(&["logs", "--summary"]);
    let row = summary.lines().find(|l| l.trim_start().starts_with("0 ")).unwrap_or_else(|| panic!("{summary}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    // attempt, iterations, first/last/min loss, tokens/s, step ms, TFLOP/s, MFU, data ms.
    assert_eq!(cols[..5], ["0", "1-6", "2.0000", "0.3333", "0.3333"], "{summary}");
    assert_eq!(cols[7..], ["-", "-", "-"], "{summary}");
    assert!(summary.contains("last: iteration 6/6 · 768 samples consumed"), "{summary}");
}
