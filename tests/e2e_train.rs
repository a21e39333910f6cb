//! `launch … finetune tiny` end to end with the real engine: the README's command on localhost
//! (2 ranks, Gloo), a rerun that resumes, a rank killed with SIGKILL and restarted from the last
//! checkpoint to the uninterrupted run's final loss, and 3 SSH hosts of the rig (network
//! namespaces running OpenSSH) training together and resuming, data parallel and with two
//! pipeline stages across the hosts.
//!
//! mm-engine is the binary cargo builds next to `launch` (`cargo test --workspace` and
//! `make test` build both). The rig test needs root, as the other rig tests.

mod fresh;
mod rig;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rig::suite::{yq, Job, Place, LAUNCH};
use rig::Rig;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The mm-engine cargo built next to `launch`, checked to be current (tests/fresh).
fn engine() -> PathBuf {
    let sources = ["crates/engine/src", "crates/engine/csrc", "crates/engine/build.rs", "crates/spec/src"];
    fresh::binary(Path::new(LAUNCH).parent().unwrap(), "mm-engine", "mm-engine", &sources)
}

/// `mm-engine synth --out DIR/runs/tiny`: the tiny checkpoint, tokenizer and data the tiny
/// recipe names (relative to the directory the engine starts in).
fn synth(dir: &Path) {
    let out = Command::new(engine()).args(["synth", "--out"]).arg(dir.join("runs/tiny")).output().unwrap();
    assert!(out.status.success(), "mm-engine synth failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// PATH with the engine's folder first, as `make demo` runs the launcher.
fn path_with_engine() -> String {
    format!("{}:{}", engine().parent().unwrap().display(), std::env::var("PATH").unwrap_or_default())
}

fn launch_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(LAUNCH);
    c.args(args).current_dir(dir).env("PATH", path_with_engine()).stdin(Stdio::null());
    c
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// status.json of the latest run under `logs`.
fn status(logs: &Path) -> serde_json::Value {
    let p = logs.join("latest/status.json");
    let body = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_slice(&body).unwrap()
}

fn training(logs: &Path) -> (u64, f64, Option<String>) {
    let s = status(logs);
    let t = &s["training"];
    assert!(t.is_object(), "status.json has no training summary: {s}");
    (t["iteration"].as_u64().unwrap(), t["final_loss"].as_f64().unwrap(), t["checkpoint"].as_str().map(String::from))
}

/// The `lm loss: X` values of a rank log, in order.
fn losses(log: &str) -> Vec<f64> {
    log.lines()
        .filter_map(|l| l.split("lm loss: ").nth(1))
        .filter_map(|s| s.split_whitespace().next())
        .map(|s| s.parse().unwrap())
        .collect()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The processes of mm-engine whose command line mentions `mark` and whose RANK is `rank`.
fn engine_pids(mark: &str, rank: usize) -> Vec<i32> {
    let want = format!("RANK={rank}");
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let cmd = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
            .replace('\0', " ");
        if !cmd.contains("mm-engine") || !cmd.contains(mark) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if env.split(|b| *b == 0).any(|kv| kv == want.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

fn wait_child(mut child: Child, limit: Duration) -> Output {
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("launch did not finish within {limit:?}; stderr:\n{}", text(&o).1);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The README's command, verbatim: `launch --cluster clusters/local.yaml finetune tiny` after
/// `mm-engine synth`: a real 2-rank fine-tune that learns, saves, and ends with a summary; the
/// same command with more iterations then resumes from the saved checkpoint.
#[test]
fn readme_command_trains_on_localhost_and_a_rerun_resumes() {
    let dir = tempfile::Builder::new().prefix("mm-e2e-").tempdir().unwrap();
    synth(dir.path());
    let cluster = format!("{REPO}/clusters/local.yaml");
    let o = launch_cmd(dir.path(), &["--cluster", &cluster, "finetune", "tiny"]).output().unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let logs = dir.path().join("logs");
    let run = std::fs::canonicalize(logs.join("latest")).unwrap();
    let run_name = run.file_name().unwrap().to_str().unwrap().to_string();

    // The summary: final loss, tokens/s, checkpoint, logs.
    let (iteration, final_loss, ckpt) = training(&logs);
    assert_eq!(iteration, 40);
    assert_eq!(ckpt.as_deref(), Some("runs/tiny/save/iter_0000040"));
    for want in [
        "launch: all 2 ranks on 1 host finished (exit 0)".to_string(),
        format!("final loss   {final_loss:.6} (iteration 40)"),
        "checkpoint   runs/tiny/save/iter_0000040".into(),
        format!("logs         logs/{run_name}"),
    ] {
        assert!(err.contains(&want), "the summary lacks `{want}`:\n{err}");
    }
    assert!(err.lines().any(|l| l.starts_with("  throughput   ") && l.ends_with(" tokens/s")), "{err}");
    // Progress lines stay in the logs; the console shows rank 0's text and plain progress.
    assert!(!out.contains("@@mm-progress"), "{out}");
    assert!(err.contains("[launch] iteration 40/40  loss "), "{err}");

    // It trained: rank 0's losses fall, the last one is the reported final loss.
    let log0 = read(&run.join("localhost/rank-0.log"));
    let l = losses(&log0);
    assert_eq!(l.len(), 40, "{log0}");
    assert!(final_loss < l[0] * 0.9, "loss went from {} to {final_loss}", l[0]);
    assert_eq!(format!("{:.6E}", l[39]), format!("{final_loss:.6E}"));
    assert!(read(&run.join("localhost/rank-1.log")).contains("data-parallel rank 1 of 2"));
    assert_eq!(read(&dir.path().join("runs/tiny/save/latest_checkpointed_iteration.txt")).trim(), "40");

    // The same command again, asking for 6 more iterations: it resumes from iteration 40.
    let o = launch_cmd(dir.path(), &["--cluster", &cluster, "finetune", "tiny", "--set", "train.train_iters=46"])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let run2 = std::fs::canonicalize(logs.join("latest")).unwrap();
    assert_ne!(run, run2);
    let log0 = read(&run2.join("localhost/rank-0.log"));
    assert!(log0.contains("auto-resume: runs/tiny/save holds a checkpoint"), "{log0}");
    assert!(log0.contains("from iteration 40"), "{log0}");
    assert_eq!(losses(&log0).len(), 6, "{log0}");
    let (iteration, _, ckpt) = training(&logs);
    assert_eq!((iteration, ckpt.as_deref()), (46, Some("runs/tiny/save/iter_0000046")));
}

/// A rank killed with SIGKILL after the checkpoint at iteration 20: the launcher stops the
/// other rank, reports the kill, restarts (`--max-restarts 1`), the engine resumes from
/// iteration 20 and ends with exactly the final loss of an uninterrupted run.
#[test]
fn sigkill_of_a_rank_restarts_from_the_checkpoint_to_the_same_final_loss() {
    let dir = tempfile::Builder::new().prefix("mm-e2e-").tempdir().unwrap();
    synth(dir.path());
    let cluster = format!("{REPO}/clusters/local.yaml");
    let base = ["--cluster", &cluster, "finetune", "tiny"];

    let mut args = base.to_vec();
    args.extend(["--set", "checkpoint.save=runs/tiny/save-clean"]);
    let o = launch_cmd(dir.path(), &args).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "stderr:\n{}", text(&o).1);
    let logs = dir.path().join("logs");
    let (it, clean_loss, _) = training(&logs);
    assert_eq!(it, 40);

    let mut args = base.to_vec();
    args.extend(["--set", "checkpoint.save=runs/tiny/save-faulty", "--max-restarts", "1", "--grace", "5s"]);
    let child = launch_cmd(dir.path(), &args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let tracker = dir.path().join("runs/tiny/save-faulty/latest_checkpointed_iteration.txt");
    let t0 = Instant::now();
    let victim = loop {
        if std::fs::read_to_string(&tracker).is_ok_and(|s| s.trim() == "20") {
            let pids = engine_pids("save-faulty", 1);
            assert_eq!(pids.len(), 1, "rank 1's process: {pids:?}");
            break pids[0];
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint at iteration 20 in 120 s");
        std::thread::sleep(Duration::from_millis(10));
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), nix::sys::signal::Signal::SIGKILL).unwrap();
    let o = wait_child(child, Duration::from_secs(240));
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    // Rank 1's death is usually the first failure seen; rank 0's failed collective can win the
    // race, so only the kill itself and the restart are required.
    assert!(err.contains("SIGKILL"), "{err}");
    assert!(err.contains("restarting every rank (1 of 1 restarts)"), "{err}");

    let run = std::fs::canonicalize(logs.join("latest")).unwrap();
    let first = read(&run.join("attempt-0/localhost/rank-0.log"));
    let killed_at = losses(&first).len();
    assert!((20..40).contains(&killed_at), "rank 0 logged {killed_at} iterations before the kill:\n{first}");
    let second = read(&run.join("attempt-1/localhost/rank-0.log"));
    assert!(second.contains("auto-resume: runs/tiny/save-faulty holds a checkpoint"), "{second}");
    assert!(second.contains("from iteration 20"), "{second}");
    assert_eq!(losses(&second).len(), 20, "{second}");
    let (it, loss, ckpt) = training(&logs);
    assert_eq!((it, ckpt.as_deref()), (40, Some("runs/tiny/save-faulty/iter_0000040")));
    assert_eq!(loss.to_bits(), clean_loss.to_bits(), "final loss {loss} after the restart, {clean_loss} without");
    assert!(engine_pids("save-faulty", 0).is_empty() && engine_pids("save-faulty", 1).is_empty());
}

/// A job on the rig's 3 hosts × 2 CPU ranks running the real engine in `work`, which holds
/// `mm-engine synth`'s tiny model and data: (job, work, cluster file).
fn rig_job<'a>(rig: &'a Rig) -> (Job<'a>, PathBuf, PathBuf) {
    let job = Job::new(Place::Rig(rig));
    let work = job.dir.path().join("work");
    synth(&work);
    let cluster = job.cluster_with(&engine(), &[], &format!("workdir: {}\n", yq(&work.display().to_string())), None);
    (job, work, cluster)
}

/// 3 SSH hosts × 2 CPU ranks of the rig train the tiny model together (Gloo over the
/// namespaces' bridge), with the environment checks, then a second launch resumes from the
/// checkpoint the first one saved. The launcher's progress comes from rank 0 on h1.
#[test]
fn rig_finetune_tiny_over_ssh_and_resume() {
    let rig = Rig::up(3);
    let (job, work, cluster) = rig_job(&rig);
    let args = ["--agent-path", LAUNCH, "--set", "train.train_iters=6", "--set", "output.save_interval=3"];
    let f = job.run(&cluster, &args);
    assert_eq!(f.code, 0, "stdout:\n{}\nstderr:\n{}", f.stdout, f.stderr);
    assert!(f.stderr.contains("launch: all 6 ranks on 3 hosts finished (exit 0)"), "{}", f.stderr);
    assert!(f.stderr.contains("checkpoint   runs/tiny/save/iter_0000006"), "{}", f.stderr);
    assert!(f.stderr.contains("[launch] iteration 6/6  loss "), "{}", f.stderr);
    let run = job.run_dir();
    for r in 0..6 {
        let log = job.rank_log(&run, job.host_of(r), r);
        assert!(log.contains(&format!("data-parallel rank {r} of 6")), "rank {r}:\n{log}");
        assert_eq!(losses(&log).len(), 6, "rank {r}:\n{log}");
    }
    // Every rank reached h1's address (the store and Gloo's peers) from its own namespace.
    let plan = read(&run.join("plan.json"));
    assert!(plan.contains(&rig.hosts[0].address), "{plan}");
    assert_eq!(read(&work.join("runs/tiny/save/latest_checkpointed_iteration.txt")).trim(), "6");

    let args = ["--agent-path", LAUNCH, "--set", "train.train_iters=9", "--set", "output.save_interval=3"];
    let f = job.run(&cluster, &args);
    assert_eq!(f.code, 0, "stdout:\n{}\nstderr:\n{}", f.stdout, f.stderr);
    let run = job.run_dir();
    let log = job.rank_log(&run, job.host_of(0), 0);
    assert!(log.contains("from iteration 6") && log.contains("auto-resume"), "{log}");
    assert_eq!(losses(&log).len(), 3, "{log}");
    assert!(f.stderr.contains("checkpoint   runs/tiny/save/iter_0000009"), "{}", f.stderr);
    job.assert_clean(Duration::from_secs(10), true);
}

/// The same rig with pipeline parallelism across the hosts: 6 ranks = 3 data-parallel replicas ×
/// 2 pipeline stages (the tiny model's 2 LLM layers one per stage, both ViT layers on the
/// first), so every stage pair talks over the bridge (ranks 0-2 on h1 and h2 are stage 0, ranks
/// 3-5 on h2 and h3 stage 1). Global batch 6 (`Job::command`'s; the tiny recipe's 4 is no
/// multiple of micro batch 1 × 3 replicas) = 1 × 2 micro batches × 3. Each stage saves its part
/// of one checkpoint; a second launch resumes every rank from it.
#[test]
fn rig_finetune_tiny_two_pipeline_stages_across_hosts_and_resume() {
    let rig = Rig::up(3);
    let (job, work, cluster) = rig_job(&rig);
    let pipeline =
        ["--set", "parallel.pp=2", "--set", "parallel.llm_pp_layers=[1,1]", "--set", "parallel.vit_pp_layers=[2,0]"];
    let args = |iters: &'static str| {
        let mut a = vec!["--agent-path", LAUNCH, "--set", iters, "--set", "output.save_interval=3"];
        a.extend(pipeline);
        a
    };
    let f = job.run(&cluster, &args("train.train_iters=6"));
    assert_eq!(f.code, 0, "stdout:\n{}\nstderr:\n{}", f.stdout, f.stderr);
    for want in [
        "launch: all 6 ranks on 3 hosts finished (exit 0)",
        "checkpoint   runs/tiny/save/iter_0000006",
        "[launch] iteration 6/6  loss ",
    ] {
        assert!(f.stderr.contains(want), "the summary lacks `{want}`:\n{}", f.stderr);
    }
    let run = job.run_dir();
    // The plan the launcher ran: 3 replicas of 2 stages, each pipeline spanning two hosts.
    let plan: serde_json::Value = serde_json::from_str(&read(&run.join("plan.json"))).unwrap();
    let plan = &plan["plan"];
    assert_eq!((plan["dims"]["pp"].as_u64(), plan["dims"]["dp"].as_u64()), (Some(2), Some(3)), "{plan}");
    for r in 0..6 {
        let row = &plan["ranks"][r];
        assert_eq!((row["pp"].as_u64(), row["dp"].as_u64()), (Some(r as u64 / 3), Some(r as u64 % 3)), "{row}");
        assert_eq!(row["host"].as_str(), Some(job.host_of(r)), "{row}");
    }
    let logs: Vec<String> = (0..6).map(|r| job.rank_log(&run, job.host_of(r), r)).collect();
    assert!(logs[0].contains("pipeline: 2 stages") && logs[0].contains("theoretical bubble 33.3%"), "{}", logs[0]);
    // Rank r is data-parallel rank r % 3 of stage r / 3; a stage's replicas build the same
    // parameters, stage 0 (ViT, projector, embedding, LLM layer 0) more than stage 1.
    let params = |log: &str| -> u64 {
        let at = log.find(" parameters, ").unwrap_or_else(|| panic!("no parameter count:\n{log}"));
        log[..at].rsplit('(').next().unwrap().parse().unwrap()
    };
    for (r, log) in logs.iter().enumerate() {
        assert!(log.contains(&format!("data-parallel rank {} of 3", r % 3)), "rank {r}:\n{log}");
        assert_eq!(params(log), params(&logs[r / 3 * 3]), "rank {r}:\n{log}");
        // Every rank logs the step's loss, which the last stage computed.
        assert_eq!(losses(log), losses(&logs[0]), "rank {r}:\n{log}");
    }
    assert!(params(&logs[0]) > params(&logs[3]), "stage 0:\n{}\nstage 1:\n{}", logs[0], logs[3]);
    assert_eq!(losses(&logs[0]).len(), 6, "{}", logs[0]);
    // The summary's final loss is the last step's (rank 0 reports what the last stage computed).
    let (iteration, final_loss, _) = training(&job.logs);
    assert_eq!(iteration, 6);
    assert_eq!(format!("{:.6E}", losses(&logs[0])[5]), format!("{final_loss:.6E}"));
    assert!(f.stderr.contains(&format!("final loss   {final_loss:.6} (iteration 6)")), "{}", f.stderr);

    let save = work.join("runs/tiny/save");
    assert_eq!(read(&save.join("latest_checkpointed_iteration.txt")).trim(), "6");
    let iter = save.join("iter_0000006");
    for stage in ["mp_rank_00_000", "mp_rank_00_001"] {
        assert!(iter.join(stage).join("model.safetensors").is_file(), "{stage} of {}", iter.display());
    }
    let manifest: serde_json::Value = serde_json::from_str(&read(&iter.join("manifest.json"))).unwrap();
    assert_eq!(manifest["parallel"]["pp"], 2, "{manifest}");

    let f = job.run(&cluster, &args("train.train_iters=9"));
    assert_eq!(f.code, 0, "stdout:\n{}\nstderr:\n{}", f.stdout, f.stderr);
    assert!(f.stderr.contains("checkpoint   runs/tiny/save/iter_0000009"), "{}", f.stderr);
    let run = job.run_dir();
    // Rank 0 says why it resumed; every rank of both stages continues from iteration 6.
    let log = job.rank_log(&run, job.host_of(0), 0);
    assert!(log.contains("auto-resume: runs/tiny/save holds a checkpoint"), "{log}");
    for r in 0..6 {
        let log = job.rank_log(&run, job.host_of(r), r);
        assert!(log.contains("from iteration 6"), "rank {r}:\n{log}");
        assert_eq!(losses(&log).len(), 3, "rank {r}:\n{log}");
    }
    assert_eq!(read(&save.join("latest_checkpointed_iteration.txt")).trim(), "9");
    job.assert_clean(Duration::from_secs(10), true);
}

/// The seed's 78B layout through `launch`, shrunk: a model with InternViT-6B's 25 ViT heads and
/// 8 LLM key/value heads at small width runs as TP 8 × PP 2 (16 ranks, MindSpeed's unaligned
/// split 4,3,3,3,3,3,3,3 of the ViT heads) with one process's losses, saves one folder per
/// (tp, pp) rank, and a second launch resumes from it.
#[test]
fn seed_78b_layout_shrunk_runs_tp8_pp2_through_the_launcher_and_resumes() {
    let dir = tempfile::Builder::new().prefix("mm-e2e-78b-").tempdir().unwrap();
    let out = Command::new(engine())
        .args(["synth", "--llm-heads", "8", "--llm-kv-heads", "8", "--vit-heads", "25", "--samples", "8"])
        .args(["--no-video", "--out"])
        .arg(dir.path().join("runs/m78"))
        .output()
        .unwrap();
    assert!(out.status.success(), "synth: {}", String::from_utf8_lossy(&out.stderr));
    let local = read(Path::new(&format!("{REPO}/clusters/local.yaml")));
    let cluster = |devices: usize| {
        let p = dir.path().join(format!("c{devices}.yaml"));
        let body = local.replace("devices_per_node: 2", &format!("devices_per_node: {devices}"));
        assert_ne!(body, local, "clusters/local.yaml sets devices_per_node: 2");
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    };
    let common = [
        "data.data_path=runs/m78/data/train.jsonl",
        "data.data_folder=runs/m78/data",
        "train.precision=fp32",
        "train.global_batch_size=4",
        "train.micro_batch_size=1",
        "output.eval_interval=0",
    ];
    let run = |cluster: &str, sets: &[&str]| {
        let mut args = vec!["--cluster", cluster, "finetune", "./runs/m78/model"];
        for s in common.iter().chain(sets) {
            args.extend(["--set", s]);
        }
        let o = launch_cmd(dir.path(), &args).output().unwrap();
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
        let run = std::fs::canonicalize(dir.path().join("logs/latest")).unwrap();
        (err, losses(&read(&run.join("localhost/rank-0.log"))))
    };
    let layout = [
        "parallel.tp=8",
        "parallel.pp=2",
        "parallel.unaligned_linear=true",
        "parallel.llm_pp_layers=[1,1]",
        "parallel.vit_pp_layers=[2,0]",
        "checkpoint.save=runs/m78/save",
    ];
    let (err, tp8) = run(&cluster(16), &[&layout[..], &["train.train_iters=2"]].concat());
    assert!(err.contains("launch: all 16 ranks on 1 host finished (exit 0)"), "{err}");
    assert!(err.contains("checkpoint   runs/m78/save/iter_0000002"), "{err}");
    for t in 0..8 {
        for p in 0..2 {
            let f = dir.path().join(format!("runs/m78/save/iter_0000002/mp_rank_{t:02}_{p:03}/model.safetensors"));
            assert!(f.is_file(), "{}", f.display());
        }
    }
    let (_, one) = run(&cluster(1), &["train.train_iters=2", "checkpoint.save=runs/m78/save-one"]);
    assert_eq!((tp8.len(), one.len()), (2, 2));
    for (a, b) in tp8.iter().zip(&one) {
        assert!((a - b).abs() / b.abs() <= 1e-5, "TP8 x PP2 loss {a} vs one process {b}");
    }
    let (_, more) = run(&cluster(16), &[&layout[..], &["train.train_iters=3"]].concat());
    assert_eq!(more.len(), 1, "the second launch resumes at iteration 2 and trains one more");
    assert_eq!(read(&dir.path().join("runs/m78/save/latest_checkpointed_iteration.txt")).trim(), "3");
}
