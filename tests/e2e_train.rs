//! `launch … finetune tiny` end to end with the real engine: the README's command on localhost
//! (2 ranks, Gloo), a rerun that resumes, a rank killed with SIGKILL and restarted from the last
//! checkpoint to the uninterrupted run's final loss, a `launch stop` that saves at an agreed
//! iteration and a relaunch that ends on the uninterrupted loss, and 3 SSH hosts of the rig
//! (network namespaces running OpenSSH) training together and resuming, data parallel and with
//! two pipeline stages across the hosts; on the rig also the failures the stall watchdog names:
//! a rank stopped with SIGSTOP, a rank sleeping inside a step, a collective desync (both
//! injected with MM_ENGINE_FAULT), and the launcher itself frozen and resumed.
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
    assert!(err.contains("[launch] iteration 40/40 · loss "), "{err}");

    // It trained: rank 0's losses fall, the last one is the reported final loss.
    let log0 = read(&run.join("localhost/rank-0.log"));
    let l = losses(&log0);
    assert_eq!(l.len(), 40, "{log0}");
    assert!(final_loss < l[0] * 0.9, "loss went from {} to {final_loss}", l[0]);
    assert_eq!(format!("{:.6E}", l[39]), format!("{final_loss:.6E}"));
    assert!(read(&run.join("localhost/rank-1.log")).contains("data-parallel rank 1 of 2"));
    assert_eq!(read(&dir.path().join("runs/tiny/save/latest_checkpointed_iteration.txt")).trim(), "40");

    // The console folds rank 0's 260-character iteration lines into one compact line per
    // logged iteration (the full lines are in the rank log).
    assert!(log0.contains("| consumed samples:") && !out.contains("| consumed samples:"), "{out}");
    assert_eq!(err.matches("[launch] iteration ").count(), 40, "{err}");
    // The run folder keeps the metrics: one line per logged iteration with the log's loss,
    // and TensorBoard's own reader finds the same values in the events.
    let recs = mm_spec::metrics::read(&run.join("metrics.jsonl")).unwrap().records;
    assert_eq!(
        recs.iter().map(|r| (r.attempt, r.step.iteration)).collect::<Vec<_>>(),
        (1..=40).map(|i| (0, i)).collect::<Vec<_>>()
    );
    for (r, l) in recs.iter().zip(&l) {
        assert_eq!(format!("{:.6E}", r.step.loss), format!("{l:.6E}"));
        assert!(
            r.step.tflops.is_some_and(|t| t > 0.0)
                && r.step.mfu.is_some()
                && r.step.slowest_rank.is_some_and(|r| r < 2)
        );
    }
    let tb = tensorboard_scalars(&run.join("tensorboard"));
    let want: Vec<(i64, f64)> = recs.iter().map(|r| (r.step.iteration as i64, r.step.loss as f32 as f64)).collect();
    assert_eq!(tb["train/loss"], want);
    assert_eq!(tb["train/mfu"].len(), 40);
    let o = launch_cmd(dir.path(), &["logs", "--summary"]).output().unwrap();
    let (table, e) = text(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        table.lines().nth(2).is_some_and(|row| row.trim_start().starts_with("0 ") && row.contains("1-40")),
        "{table}"
    );

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
    let clean_run = std::fs::canonicalize(logs.join("latest")).unwrap();

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
    assert!(err.contains("  restarts     1: the lines above are attempt 1's"), "{err}");

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

    // The metrics of both attempts in one file, the restart's iterations from 21 again; one
    // TensorBoard event file per attempt.
    let recs = mm_spec::metrics::read(&run.join("metrics.jsonl")).unwrap().records;
    let its = |a: u32| recs.iter().filter(|r| r.attempt == a).map(|r| r.step.iteration).collect::<Vec<_>>();
    assert_eq!(its(0), (1..=its(0).len() as u64).collect::<Vec<_>>());
    assert!(its(0).len() >= 20 && its(0).len() <= killed_at, "{:?} vs {killed_at} logged", its(0));
    assert_eq!(its(1), (21..=40).collect::<Vec<_>>());
    assert_eq!(std::fs::read_dir(run.join("tensorboard")).unwrap().count(), 2);
    plots_show_both_runs_and_the_restart(dir.path(), &clean_run, &run);
}

/// The job id of `launch submit`'s "submitted batch job N" line.
fn submitted_job(out: &str) -> String {
    let id = out.split("submitted batch job ").nth(1).and_then(|s| s.split_whitespace().next());
    id.unwrap_or_else(|| panic!("no job id in:\n{out}")).to_string()
}

/// Waits (at most 120 s) until the checkpoint tracker names iteration `min` or later;
/// `what` says whose checkpoint it is when it does not come.
fn wait_checkpoint(tracker: &Path, min: u64, what: impl Fn() -> String) {
    let t0 = Instant::now();
    while !std::fs::read_to_string(tracker).unwrap_or_default().trim().parse::<u64>().is_ok_and(|i| i >= min) {
        assert!(t0.elapsed() < Duration::from_secs(120), "{}: no checkpoint at {min} or later in 120 s", what());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The line of `text` holding `needle` (which ends in "iteration ") and the iteration after it.
fn stopped_at<'t>(text: &'t str, needle: &str) -> (&'t str, u64) {
    let line = line_with(text, needle);
    let digits: String = line.split(needle).nth(1).unwrap_or("").chars().take_while(char::is_ascii_digit).collect();
    (line, digits.parse().unwrap_or_else(|_| panic!("no iteration after `{needle}` in: {line}")))
}

/// `launch plot` of the clean run and the restarted one, as PNG and SVG: checked by its
/// properties (size, a drawn plot area, each run's colour, the restart's dashed line, the
/// legend) since pixels differ with fonts and versions.
fn plots_show_both_runs_and_the_restart(dir: &Path, clean: &Path, restarted: &Path) {
    let (a, b) = (clean.to_str().unwrap(), restarted.to_str().unwrap());
    let png = dir.join("both.png");
    let o =
        launch_cmd(dir, &["plot", a, b, "--metric", "loss", "--metric", "mfu", "--out"]).arg(&png).output().unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("loss and mfu of 2 runs, 1 restart marked"), "{out}");
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (launch::plot::PANEL_SIZE.0, 2 * launch::plot::PANEL_SIZE.1));
    let count = |c: plotters::style::RGBColor| img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count();
    for i in 0..2 {
        assert!(count(launch::plot::color(i)) > 300, "run {i}'s colour: {} pixels", count(launch::plot::color(i)));
    }
    let inked = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
    assert!(inked * 50 > img.pixels().len(), "the plot is almost blank: {inked} pixels drawn");

    let svg_path = dir.join("both.svg");
    let o = launch_cmd(dir, &["plot", a, b, "--out"]).arg(&svg_path).output().unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    let svg = read(&svg_path);
    let hex = |c: plotters::style::RGBColor| format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2);
    let solid = |i: usize| {
        let line = format!(
            "<polyline fill=\"none\" opacity=\"1\" stroke=\"{}\" stroke-width=\"2\"",
            hex(launch::plot::color(i))
        );
        svg.matches(&line).count()
    };
    let dashed = |i: usize| svg.matches(&format!("opacity=\"0.6\" stroke=\"{}\"", hex(launch::plot::color(i)))).count();
    // Per panel (loss, tokens/s): the clean run's line and legend mark; the restarted run's
    // two attempts and legend mark, and its restart dashed.
    assert_eq!((solid(0), solid(1)), (2 * 2, 2 * 3), "{svg}");
    assert_eq!(dashed(0), 0);
    assert!(dashed(1) > 2, "{svg}");
    for name in [clean, restarted] {
        let name = name.file_name().unwrap().to_str().unwrap();
        assert_eq!(svg.matches(&format!(">\n{name}\n</text>")).count(), 2, "legend of {name}");
    }
}

/// Every scalar series of the TensorBoard events in `dir`, as TensorBoard's reader returns them.
fn tensorboard_scalars(dir: &Path) -> std::collections::BTreeMap<String, Vec<(i64, f64)>> {
    let py = Path::new(REPO).join(".venv/bin/python");
    let script = "import sys, json\n\
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
ea = EventAccumulator(sys.argv[1]); ea.Reload()\n\
print(json.dumps({t: [[e.step, e.value] for e in ea.Scalars(t)] for t in ea.Tags()['scalars']}))\n";
    let o = Command::new(py).args(["-c", script]).arg(dir).output().unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A job on the rig's 3 hosts × 2 CPU ranks running the real engine in `work`, which holds
/// `mm-engine synth`'s tiny model and data: (job, work, cluster file).
fn rig_job<'a>(rig: &'a Rig) -> (Job<'a>, PathBuf, PathBuf) {
    let job = Job::new(Place::Rig(rig));
    let work = job.dir.path().join("work");
    synth(&work);
    let cluster = rig_cluster(&job, &work, &[]);
    (job, work, cluster)
}

/// The rig job's cluster file with `env` added to every rank's environment.
fn rig_cluster(job: &Job, work: &Path, env: &[(&str, &str)]) -> PathBuf {
    job.cluster_with(&engine(), env, &format!("workdir: {}\n", yq(&work.display().to_string())), None)
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
    assert!(f.stderr.contains("[launch] iteration 6/6 · loss "), "{}", f.stderr);
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

/// `salloc -N 3 launch … finetune tiny` on a real Slurm (scripts/slurm-rig.sh: slurmctld,
/// one slurmd per rig host, munge) with `executor: slurm`: the node agents start as srun steps
/// (each slurmd's log shows its step), the real engine trains over the three nodes, and the
/// fan-out is timed beside SSH on the same hosts. Then `scancel` mid-run: Slurm's SIGTERM
/// reaches every rank as the orderly stop (an agreed iteration, a committed checkpoint), the
/// report names the cancellation, and nothing of the job is left on any node.
#[test]
fn slurm_steps_train_on_three_nodes_and_scancel_stops_at_a_checkpoint_leaving_nothing() {
    let rig = Rig::up(3);
    let slurm_conf = rig.slurm();
    let job = Job::new(Place::Rig(&rig));
    let work = job.dir.path().join("work");
    synth(&work);
    let extra = format!("workdir: {}\n", yq(&work.display().to_string()));
    let ssh_cluster = job.cluster_with(&engine(), &[], &extra, None);
    let cluster = job.dir.path().join("slurm.yaml");
    std::fs::write(&cluster, read(&ssh_cluster) + "executor: slurm\n").unwrap();
    let salloc = |iters: &str| {
        let mut c = Command::new("salloc");
        // A CPU per rank (the launcher checks SLURM_JOB_CPUS_PER_NODE against its 2 per node).
        c.args(["-N", "3", "--cpus-per-task=2", "--quiet", LAUNCH, "--cluster"])
            .arg(&cluster)
            .args(["finetune", "tiny", "--set", "train.global_batch_size=6", "--set"])
            .arg(format!("train.train_iters={iters}"))
            .env("SLURM_CONF", &slurm_conf)
            .env("PATH", path_with_engine())
            .current_dir(job.dir.path())
            .stdin(Stdio::null());
        c
    };
    let ready = |err: &str| line_with(err, " hosts ready in ").to_string();

    let o = salloc("6").output().unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("launch: all 6 ranks on 3 hosts finished (exit 0)"), "{err}");
    let run = job.run_dir();
    for r in 0..6 {
        assert_eq!(losses(&job.rank_log(&run, job.host_of(r), r)).len(), 6, "rank {r}");
    }
    // Each node's slurmd started the agent's step (no SSH: the sshd logs stay empty of it).
    for h in &rig.hosts {
        let log = read(&rig.dir.path().join(format!("slurm/slurmd-{}.log", h.name)));
        assert!(log.contains("launch task StepId="), "{}: no step launched:\n{log}", h.name);
    }
    let slurm_ready = ready(&err);
    // The same hosts over SSH, for the fan-out beside it.
    let f = job.run(&ssh_cluster, &["--agent-path", LAUNCH, "--set", "train.train_iters=1"]);
    assert_eq!(f.code, 0, "{}", f.stderr);
    println!("fan-out to 3 nodes: srun: {slurm_ready}; ssh: {}", ready(&f.stderr));

    // scancel mid-run.
    let child = salloc("400").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let tracker = work.join("runs/tiny/save/latest_checkpointed_iteration.txt");
    wait_checkpoint(&tracker, 20, || "salloc job".into());
    let squeue =
        Command::new("squeue").args(["-h", "-t", "R", "-o", "%i"]).env("SLURM_CONF", &slurm_conf).output().unwrap();
    let job_id = String::from_utf8_lossy(&squeue.stdout).trim().to_string();
    assert!(!job_id.is_empty() && !job_id.contains('\n'), "one job in the queue: {job_id:?}");
    let st = Command::new("scancel").arg(&job_id).env("SLURM_CONF", &slurm_conf).status().unwrap();
    assert!(st.success());
    let o = wait_child(child, Duration::from_secs(60));
    let (out, err) = text(&o);
    assert_ne!(o.status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let headline = line_with(&err, "launch: FAILED: ");
    assert!(headline.contains("Slurm sent SIGTERM to the agent's step"), "the report names Slurm's stop:\n{err}");
    assert!(err.contains("CANCELLED AT"), "slurmstepd's own line is in the report:\n{err}");
    let (stopped, at) = stopped_at(&err, "every rank stopped at iteration ");
    assert_eq!(read(&tracker).trim(), at.to_string(), "the agreed stop's checkpoint is the committed one: {stopped}");
    rig.assert_clean(Duration::from_secs(15), true);

    // `launch submit --wait` of a 2-node job (the cluster file's h1 and h2, by name): sbatch
    // runs the launcher on the first node, it trains to the end, and `launch logs` on this
    // machine reads the run.
    let two = job.dir.path().join("two.yaml");
    let h3 = format!("name: {}}}", rig.hosts[2].name);
    let hosts_h1_h2: String = read(&cluster).lines().filter(|l| !l.contains(&h3)).map(|l| format!("{l}\n")).collect();
    std::fs::write(&two, hosts_h1_h2).unwrap();
    let submit = |args: &[&str]| {
        Command::new(LAUNCH)
            .arg("--cluster")
            .arg(&two)
            .arg("submit")
            .args(args)
            .env("SLURM_CONF", &slurm_conf)
            .env("PATH", path_with_engine())
            .current_dir(job.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = submit(&["--wait", "--time", "5", "finetune", "tiny", "--set", "checkpoint.save=runs/tiny/save-sbatch"]);
    let (out, err) = text(&o);
    let id = submitted_job(&out);
    let job_out = std::fs::read_to_string(job.logs.join(format!("slurm-{id}.out"))).unwrap_or_default();
    assert_eq!(o.status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}\njob output:\n{job_out}");
    assert!(job_out.contains("launch: all 4 ranks on 2 hosts finished (exit 0)"), "{job_out}");
    let script = read(Path::new(line_with(&out, "submitted batch job ").rsplit(": ").next().unwrap()));
    assert!(script.contains("#SBATCH --nodelist=h1,h2") && script.contains("#SBATCH --time=5"), "{script}");
    let o = Command::new(LAUNCH).arg("logs").arg("--log-dir").arg(&job.logs).output().unwrap();
    let (logs, _) = text(&o);
    assert!(
        logs.contains("[h1 r0]") && logs.contains("[h2 r3]") && logs.contains("saved checkpoint at iteration 40"),
        "{logs}"
    );
    rig.assert_clean(Duration::from_secs(15), true);

    // Preemption: the batch job gets Slurm's warning signal (what `--signal=B:USR1@…` sends
    // before the time limit; here `scancel --batch --signal=USR1`), every rank stops at an
    // agreed iteration with a checkpoint, and the requeued job resumes there to the end.
    // A queued tiny training into runs/tiny/<save>: its job id and checkpoint tracker.
    let submit_training = |save: &str, iters: u64| {
        let save_set = format!("checkpoint.save=runs/tiny/{save}");
        let iters_set = format!("train.train_iters={iters}");
        let o = submit(&["finetune", "tiny", "--set", &save_set, "--set", &iters_set]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
        (submitted_job(&out), work.join(format!("runs/tiny/{save}/latest_checkpointed_iteration.txt")))
    };
    let (id, tracker) = submit_training("save-requeue", 60);
    let slurm = |args: &[&str]| {
        let o = Command::new(args[0]).args(&args[1..]).env("SLURM_CONF", &slurm_conf).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // "?" while scontrol does not answer (a busy controller): not an end state.
    let state = || {
        let o = Command::new("scontrol").args(["show", "job", &id]).env("SLURM_CONF", &slurm_conf).output().unwrap();
        let show = String::from_utf8_lossy(&o.stdout).into_owned();
        show.split("JobState=").nth(1).and_then(|s| s.split_whitespace().next()).unwrap_or("?").to_string()
    };
    wait_checkpoint(&tracker, 20, || format!("job {id} ({})", state()));
    slurm(&["scancel", "--batch", "--signal=USR1", &id]);
    let wait_end = |what: &str| {
        let t0 = Instant::now();
        while ["RUNNING", "PENDING", "COMPLETING", "REQUEUED", "CONFIGURING", "?"].contains(&state().as_str()) {
            assert!(t0.elapsed() < Duration::from_secs(120), "job {id} still {} after 120 s ({what})", state());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_end("after the warning signal");
    let job_out = read(&job.logs.join(format!("slurm-{id}.out")));
    // The launcher took the signal and stopped the ranks in order (they see its SIGTERM).
    let (stopped, at) = stopped_at(&job_out, "launch: interrupted by SIGUSR1: every rank stopped at iteration ");
    assert!((20..60).contains(&at), "{stopped}");
    assert_eq!(read(&tracker).trim(), at.to_string());
    slurm(&["scontrol", "requeue", &id]);
    // Slurm holds a requeued job for a while (its begin time); let it start in 3 s, not at
    // once: slurmd refuses a credential of the same job issued in the second it was revoked.
    slurm(&["scontrol", "update", &format!("JobId={id}"), "StartTime=now+3"]);
    let t0 = Instant::now();
    while !["RUNNING", "COMPLETING", "COMPLETED", "FAILED"].contains(&state().as_str()) {
        assert!(t0.elapsed() < Duration::from_secs(60), "the requeued job {id} is {} after 60 s", state());
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_end("after the requeue");
    let job_out = read(&job.logs.join(format!("slurm-{id}.out")));
    assert!(job_out.contains(&format!("from iteration {at}")), "the requeued job resumes at {at}:\n{job_out}");
    assert!(job_out.contains("launch: all 4 ranks on 2 hosts finished (exit 0)"), "{job_out}");
    assert_eq!(read(&tracker).trim(), "60");
    rig.assert_clean(Duration::from_secs(15), true);

    // A plain `scancel` of a submitted job: Slurm signals the batch step (the launcher) and
    // the agents' steps at once; the ranks still stop in order at an agreed, saved iteration.
    let (cancel_id, tracker) = submit_training("save-cancel", 400);
    wait_checkpoint(&tracker, 1, || format!("job {cancel_id}"));
    slurm(&["scancel", &cancel_id]);
    let job_file = job.logs.join(format!("slurm-{cancel_id}.out"));
    let t0 = Instant::now();
    while !std::fs::read_to_string(&job_file).unwrap_or_default().contains("\nall logs: ") {
        assert!(t0.elapsed() < Duration::from_secs(60), "job {cancel_id} did not report within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let job_out = read(&job_file);
    let (_, at) = stopped_at(&job_out, "launch: interrupted by SIGTERM: every rank stopped at iteration ");
    assert_eq!(read(&tracker).trim(), at.to_string(), "{job_out}");
    rig.assert_clean(Duration::from_secs(15), true);

    // A node lost mid-run (everything in h2's namespace killed: slurmd, the step, the agent,
    // the ranks): the launcher fails fast naming h2, and nothing is left on h1 and h3.
    let mut lost_run = salloc("400");
    lost_run.args(["--set", "checkpoint.save=runs/tiny/save-lost"]);
    let child = lost_run.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let tracker = work.join("runs/tiny/save-lost/latest_checkpointed_iteration.txt");
    wait_checkpoint(&tracker, 1, || "the run that loses h2".into());
    let lost = Instant::now();
    for (pid, _) in rig.processes(&rig.hosts[1]) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    }
    let o = wait_child(child, Duration::from_secs(60));
    let (out, err) = text(&o);
    let took = lost.elapsed();
    assert_ne!(o.status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let headline = line_with(&err, "launch: FAILED: ");
    // The first failure may be a peer's (a rank on h1 or h3 whose connection to h2 closed);
    // either way the report names h2 as lost.
    let h2 = line_with(&err, &format!("  h2 ({})", rig.hosts[1].address));
    assert!(h2.contains("LOST") || headline.contains("h2"), "the lost node is named:\n{err}");
    println!("node h2 killed: the launcher exited {took:?} later: {headline} / {}", h2.trim());
    for h in [&rig.hosts[0], &rig.hosts[2]] {
        let t = Instant::now();
        while !rig.leftovers(h, true).is_empty() {
            assert!(t.elapsed() < Duration::from_secs(15), "left on {}: {:?}", h.name, rig.leftovers(h, true));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The same rig with pipeline parallelism across the hosts: 6 ranks = 3 data-parallel replicas ×
/// 2 pipeline stages (the tiny model's 2 LLM layers one per stage, both ViT layers on the
/// first), so every stage pair talks over the bridge (ranks 0-2 on h1 and h2 are stage 0, ranks
/// 3-5 on h2 and h3 stage 1). Global batch 6 (`Job::command`'s; the tiny recipe's 4 is no
/// multiple of micro batch 1 × 3 replicas) = 1 × 2 micro batches × 3. Each stage saves its part
/// of one checkpoint; a second launch resumes every rank from it.
#[test]
fn rig_finetune_tiny_two_pipeline_stages_across_hosts_with_recomputation_and_resume() {
    let rig = Rig::up(3);
    let (job, work, cluster) = rig_job(&rig);
    // With activation recomputation on, as the seed's 78B recipe trains.
    let pipeline = [
        "--set",
        "parallel.pp=2",
        "--set",
        "parallel.llm_pp_layers=[1,1]",
        "--set",
        "parallel.vit_pp_layers=[2,0]",
        "--set",
        "train.recompute=true",
    ];
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
        "[launch] iteration 6/6 · loss ",
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
    assert!(
        logs[0].contains("activation recomputation: full, uniform, groups of 1 layer (LLM and ViT layers)"),
        "{}",
        logs[0]
    );
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

/// The seed's 8B recipe shape (pipeline stages, full recomputation) shrunk to the rig with
/// context parallelism on: 2 SSH hosts × 2 ranks = 2 pipeline stages × 2 context-parallel ranks
/// (Megatron's order: the context-parallel pair of a stage on one host, the stages across the
/// bridge). Saves at iterations 3 and 6; rolled back to 3, a second launch resumes there and
/// logs the first run's losses for iterations 4 to 6 digit for digit.
#[test]
fn rig_finetune_tiny_context_parallel_pipeline_with_recomputation_resumes_exactly() {
    let rig = Rig::up(2);
    let (job, work, cluster) = rig_job(&rig);
    let layout = [
        "parallel.pp=2",
        "parallel.cp=2",
        "parallel.llm_pp_layers=[1,1]",
        "parallel.vit_pp_layers=[2,0]",
        "train.recompute=true",
        "train.global_batch_size=2",
        "output.save_interval=3",
    ];
    let args = |iters: &'static str| {
        let mut a = vec!["--agent-path", LAUNCH, "--set", iters];
        for s in layout {
            a.extend(["--set", s]);
        }
        a
    };
    let f = job.run(&cluster, &args("train.train_iters=6"));
    assert_eq!(f.code, 0, "stdout:\n{}\nstderr:\n{}", f.stdout, f.stderr);
    assert!(f.stderr.contains("launch: all 4 ranks on 2 hosts finished (exit 0)"), "{}", f.stderr);
    let run = job.run_dir();
    let plan: serde_json::Value = serde_json::from_str(&read(&run.join("plan.json"))).unwrap();
    let dims = &plan["plan"]["dims"];
    assert_eq!((dims["pp"].as_u64(), dims["cp"].as_u64(), dims["dp"].as_u64()), (Some(2), Some(2), Some(1)), "{dims}");
    let logs: Vec<String> = (0..4).map(|r| job.rank_log(&run, job.host_of(r), r)).collect();
    assert!(
        logs[0].contains("context parallelism: the sequence in 4 load-balanced chunks over 2 ranks"),
        "{}",
        logs[0]
    );
    assert!(logs[0].contains("activation recomputation: full, uniform"), "{}", logs[0]);
    for (r, log) in logs.iter().enumerate() {
        assert!(log.contains(&format!("context-parallel rank {} of 2", r % 2)), "rank {r}:\n{log}");
        assert_eq!(losses(log), losses(&logs[0]), "rank {r}:\n{log}");
    }
    let first = losses(&logs[0]);
    assert_eq!(first.len(), 6, "{}", logs[0]);
    let save = work.join("runs/tiny/save");
    assert!(save.join("iter_0000003/mp_rank_00_001/model.safetensors").is_file());

    // Back to iteration 3, as an operator rolls a run back (the same train_iters: the learning
    // rate schedule depends on it).
    std::fs::write(save.join("latest_checkpointed_iteration.txt"), "3\n").unwrap();
    std::fs::remove_dir_all(save.join("iter_0000006")).unwrap();
    let f = job.run(&cluster, &args("train.train_iters=6"));
    assert_eq!(f.code, 0, "stdout:\n{}\nstderr:\n{}", f.stdout, f.stderr);
    let run = job.run_dir();
    let log = job.rank_log(&run, job.host_of(0), 0);
    assert!(log.contains("from iteration 3"), "{log}");
    let resumed = losses(&log);
    let text = |v: &[f64]| v.iter().map(|l| format!("{l:.6E}")).collect::<Vec<_>>();
    assert_eq!(text(&resumed), text(&first[3..]), "{log}");
    assert_eq!(read(&save.join("latest_checkpointed_iteration.txt")).trim(), "6");
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

/// The mm-engine process of `rank` started by `job` (its cluster env carries TEST_OUT), on any
/// rig host: the namespaces share this machine's process table.
fn job_engine_pid(job: &Job, rank: usize) -> Option<i32> {
    let (out, want) = (format!("TEST_OUT={}", job.out.display()), format!("RANK={rank}"));
    std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let has = |kv: &str| env.split(|b| *b == 0).any(|x| x == kv.as_bytes());
        (String::from_utf8_lossy(&cmd).contains("mm-engine") && has(&out) && has(&want)).then_some(pid)
    })
}

fn stderr_so_far(job: &Job) -> String {
    std::fs::read_to_string(job.dir.path().join("stderr.txt")).unwrap_or_default()
}

/// Waits until rank 0 of the job's latest run logged `n` iterations.
fn wait_iterations(job: &Job, n: usize) {
    let log = || {
        let run = std::fs::read_link(job.logs.join("latest")).ok()?;
        std::fs::read_to_string(job.logs.join(run).join(job.host_of(0)).join("rank-0.log")).ok()
    };
    job.wait_for(
        &format!("rank 0 to log {n} iterations"),
        || log().is_some_and(|l| losses(&l).len() >= n),
        Duration::from_secs(120),
    );
}

/// The first line of `text` holding `needle`.
fn line_with<'t>(text: &'t str, needle: &str) -> &'t str {
    text.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no line with `{needle}` in:\n{text}"))
}

/// One rank of the rig stopped with SIGSTOP mid-run: within the stall budget the console names
/// it (host, pid, state T) as the rank the others wait for; at the budget the launcher stops
/// the job with that as the root cause (exit 124), the stopped rank gets SIGCONT with its
/// SIGTERM, and nothing is left running. Prints the times from fault to notice and to exit.
#[test]
fn rig_sigstop_of_one_rank_is_named_within_the_stall_budget() {
    let rig = Rig::up(3);
    let (job, _work, cluster) = rig_job(&rig);
    let args = ["--agent-path", LAUNCH, "--set", "train.train_iters=100000", "--hang-timeout", "20s", "--grace", "10s"];
    let t0 = Instant::now();
    let child = job.spawn(&cluster, &args);
    wait_iterations(&job, 3);
    let victim = job_engine_pid(&job, 3).expect("rank 3's engine process");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), nix::sys::signal::Signal::SIGSTOP).unwrap();
    let fault = Instant::now();
    job.wait_for("the stall notice", || stderr_so_far(&job).contains("no progress for"), Duration::from_secs(30));
    let to_notice = fault.elapsed();
    let f = job.wait(child, t0, Duration::from_secs(300));
    let to_exit = fault.elapsed();
    eprintln!("SIGSTOP of rank 3: notice after {to_notice:?}, exit after {to_exit:?} (budget 20 s, grace 10 s)");
    let host = job.host_of(3);
    let who = format!("rank 3 on {host} (pid {victim}; state T stopped");
    let notice = line_with(&f.stderr, "no progress for");
    assert!(notice.contains(&who), "the notice names the stopped rank: {notice}");
    assert!(to_notice < Duration::from_secs(20), "noticed within the budget: {to_notice:?}");
    assert_eq!(f.code, 124, "stderr:\n{}", f.stderr);
    let headline = line_with(&f.stderr, "launch: FAILED:");
    assert!(headline.contains("no progress for") && headline.contains(&who), "{headline}");
    assert!(to_exit < Duration::from_secs(20 + 10 + 15), "ends within budget + grace: {to_exit:?}");
    // SIGCONT came with the SIGTERM: the stopped rank ran again, and every rank agreed to stop
    // after one more step and saved it.
    assert!(f.stderr.contains("on the way out every rank stopped at iteration"), "{}", f.stderr);
    let state = job.run_dir().join(host).join("rank-3.state.json");
    let saved: serde_json::Value = serde_json::from_str(&read(&state)).unwrap();
    assert_eq!(saved["proc_state"], "T", "{saved}");
    job.assert_clean(Duration::from_secs(10), true);
}

/// Faults injected into the real engine on the rig: rank 4 sleeping inside iteration 4 (not
/// in a collective: the others wait for it in the step's first collective), then rank 2
/// entering a broadcast where the others all-reduce (a desync). Each is named in the report.
#[test]
fn rig_injected_sleep_and_desync_are_named() {
    let rig = Rig::up(3);
    let (job, work, _) = rig_job(&rig);
    let args = ["--agent-path", LAUNCH, "--set", "train.train_iters=100000", "--hang-timeout", "15s", "--grace", "5s"];

    // From the rank's own line saying the fault began: to the console's notice, to the exit.
    let timed = |fault_line: &str, what: &str, t0: Instant, child| {
        let any_log = || {
            let run = job.run_dir();
            (0..6).any(|r| {
                std::fs::read_to_string(run.join(job.host_of(r)).join(format!("rank-{r}.log")))
                    .is_ok_and(|l| l.contains(fault_line))
            })
        };
        job.wait_for(
            "the fault",
            || std::fs::read_link(job.logs.join("latest")).is_ok() && any_log(),
            Duration::from_secs(120),
        );
        let fault = Instant::now();
        job.wait_for("the notice", || stderr_so_far(&job).contains("no progress for"), Duration::from_secs(60));
        let notice = fault.elapsed();
        let f = job.wait(child, t0, Duration::from_secs(300));
        eprintln!("{what}: notice {notice:?} and exit {:?} after the fault (budget 15 s, grace 5 s)", fault.elapsed());
        f
    };

    let cluster = rig_cluster(&job, &work, &[("MM_ENGINE_FAULT", "sleep:rank=4:iteration=4:seconds=600")]);
    let t0 = Instant::now();
    let f = timed("fault injection: rank 4 sleeps", "sleeping rank 4", t0, job.spawn(&cluster, &args));
    assert_eq!(f.code, 124, "stderr:\n{}", f.stderr);
    let headline = line_with(&f.stderr, "launch: FAILED:");
    let who = format!("not arrived: rank 4 on {} (pid ", job.host_of(4));
    assert!(headline.contains(&who), "{headline}");
    assert!(headline.contains("state S sleeping; step at iteration 3, not in a collective"), "{headline}");
    job.assert_clean(Duration::from_secs(10), true);

    let cluster = rig_cluster(&job, &work, &[("MM_ENGINE_FAULT", "desync:rank=2:iteration=3")]);
    let t0 = Instant::now();
    let f = timed("fault injection: rank 2 enters a broadcast", "desync of rank 2", t0, job.spawn(&cluster, &args));
    assert_ne!(f.code, 0, "stderr:\n{}", f.stderr);
    let said = line_with(&f.stderr, "collective desync on");
    assert!(said.contains("rank 2 in broadcast (fault injection)") && said.contains("in all_reduce"), "{said}");
    job.assert_clean(Duration::from_secs(10), true);
}

/// The launcher frozen (SIGSTOP) for longer than the agents' patience, then resumed: the
/// agents stop their ranks on their own, and the report says so, with the launcher's pause as
/// the reason, instead of blaming a rank killed by SIGTERM.
#[test]
fn rig_frozen_launcher_reports_what_the_agents_did_meanwhile() {
    let rig = Rig::up(3);
    let (job, _work, cluster) = rig_job(&rig);
    let args = ["--agent-path", LAUNCH, "--set", "train.train_iters=100000", "--grace", "5s"];
    let t0 = Instant::now();
    let child = job.spawn(&cluster, &args);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    wait_iterations(&job, 3);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_secs(8));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let woke = Instant::now();
    let f = job.wait(child, t0, Duration::from_secs(120));
    eprintln!("frozen launcher (8 s): exit {:?} after it was continued", woke.elapsed());
    assert_eq!(f.code, 255, "stderr:\n{}", f.stderr);
    let headline = line_with(&f.stderr, "launch: FAILED:");
    assert!(headline.contains("stopped its ranks: the launcher did not run for"), "{headline}");
    assert!(headline.contains("no word from the launcher for"), "{headline}");
    job.assert_clean(Duration::from_secs(10), true);
}

/// `launch stop` mid-run: every rank finishes its step, they agree on the iteration, save it
/// (weights, optimizer, RNG) and exit 143; the report names the iteration and checkpoint; the
/// same command again resumes from it and ends on exactly the final loss of a run that was
/// never stopped.
#[test]
fn launch_stop_saves_at_an_agreed_iteration_and_a_relaunch_ends_on_the_same_loss() {
    let dir = tempfile::Builder::new().prefix("mm-e2e-stop-").tempdir().unwrap();
    synth(dir.path());
    let cluster = format!("{REPO}/clusters/local.yaml");
    // 80 iterations: room for the stop to land after iteration 8 on a slow machine.
    let with = |save: &'static str| {
        let mut a = vec!["--cluster", cluster.as_str(), "finetune", "tiny", "--set", "train.train_iters=80", "--set"];
        a.push(save);
        a
    };
    let o = launch_cmd(dir.path(), &with("checkpoint.save=runs/tiny/save-clean")).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "stderr:\n{}", text(&o).1);
    let logs = dir.path().join("logs");
    let (it, clean_loss, _) = training(&logs);
    assert_eq!(it, 80);

    let args = with("checkpoint.save=runs/tiny/save-stop");
    let child = launch_cmd(dir.path(), &args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    loop {
        let log = std::fs::canonicalize(logs.join("latest"))
            .ok()
            .filter(|r| {
                r.join("status.json").exists() && read(&r.join("status.json")).contains(&child.id().to_string())
            })
            .and_then(|r| std::fs::read_to_string(r.join("localhost/rank-0.log")).ok());
        if log.is_some_and(|l| losses(&l).len() >= 8) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no iteration 8 in 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let asked = Instant::now();
    let stop = launch_cmd(dir.path(), &["stop"]).output().unwrap();
    let (said, err) = text(&stop);
    assert_eq!(stop.status.code(), Some(0), "launch stop: {said}\n{err}");
    let o = wait_child(child, Duration::from_secs(120));
    eprintln!("launch stop: the run ended {:?} after it was asked", asked.elapsed());
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(143), "stderr:\n{err}");
    let tracker = std::fs::read_to_string(dir.path().join("runs/tiny/save-stop/latest_checkpointed_iteration.txt"))
        .unwrap_or_else(|e| {
            let run = std::fs::canonicalize(logs.join("latest")).unwrap();
            panic!(
                "no tracker ({e}); stderr:\n{err}\nrank 0:\n{}\nrank 1:\n{}",
                read(&run.join("localhost/rank-0.log")),
                read(&run.join("localhost/rank-1.log"))
            )
        });
    let n: u64 = tracker.trim().parse().unwrap();
    assert!((8..80).contains(&n), "stopped at {n}");
    let want = format!(
        "launch: interrupted by SIGTERM: every rank stopped at iteration {n}; checkpoint runs/tiny/save-stop/iter_{n:07} \
         (launching again resumes from it)"
    );
    assert!(err.contains(&want), "{err}");
    assert!(said.contains("stopped:"), "launch stop waits and says how the run ended: {said}");

    let o = launch_cmd(dir.path(), &args).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "stderr:\n{}", text(&o).1);
    let run = std::fs::canonicalize(logs.join("latest")).unwrap();
    let log = read(&run.join("localhost/rank-0.log"));
    assert!(log.contains(&format!("from iteration {n}")), "{log}");
    let (it, loss, _) = training(&logs);
    assert_eq!(it, 80);
    assert_eq!(loss.to_bits(), clean_loss.to_bits(), "final loss {loss} after the stop, {clean_loss} without");
    assert!(engine_pids("save-stop", 0).is_empty() && engine_pids("save-stop", 1).is_empty());
}

/// The node agent of h2 frozen (SIGSTOP) mid-run: its heartbeats stop, but the launcher looks
/// at the host over a new SSH connection before calling it lost, finds the agent stopped,
/// continues it and the job goes on; frozen a second time, the agent's failure is the root
/// cause (told apart from a lost host), it is continued so that it stops its ranks, and
/// nothing is left running.
#[test]
fn rig_frozen_agent_is_told_apart_from_a_lost_host() {
    let rig = Rig::up(3);
    let (job, _work, cluster) = rig_job(&rig);
    let args = ["--agent-path", LAUNCH, "--set", "train.train_iters=100000", "--grace", "5s"];
    let t0 = Instant::now();
    let child = job.spawn(&cluster, &args);
    wait_iterations(&job, 3);
    // The agent is the rank's nearest `launch` ancestor.
    let mut pid = job_engine_pid(&job, 2).expect("rank 2's engine process");
    let agent = loop {
        let stat = read(Path::new(&format!("/proc/{pid}/stat")));
        let close = stat.rfind(')').unwrap();
        pid = stat[close + 2..].split_whitespace().nth(1).unwrap().parse().unwrap();
        if read(Path::new(&format!("/proc/{pid}/comm"))).trim() == "launch" {
            break pid;
        }
        assert!(pid > 1, "no launch agent above rank 2");
    };
    let freeze =
        || nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent), nix::sys::signal::Signal::SIGSTOP).unwrap();
    let host = job.host_of(2);
    freeze();
    let fault = Instant::now();
    let continued = format!("the node agent on {host} (pid {agent}) was stopped (state T); it was continued (SIGCONT)");
    job.wait_for("the agent to be continued", || stderr_so_far(&job).contains(&continued), Duration::from_secs(30));
    eprintln!("frozen agent: continued after {:?}", fault.elapsed());
    freeze();
    let fault = Instant::now();
    let f = job.wait(child, t0, Duration::from_secs(120));
    eprintln!("frozen agent, again: exit after {:?} from the fault", fault.elapsed());
    assert_eq!(f.code, 255, "stderr:\n{}", f.stderr);
    let headline = line_with(&f.stderr, "launch: FAILED:");
    let want = format!("while the host itself answers: the agent (pid {agent}) is stopped (state T) again");
    assert!(headline.contains(&format!("the node agent on {host}")) && headline.contains(&want), "{headline}");
    job.assert_clean(Duration::from_secs(10), true);
}

/// A local cluster runs the mm-engine beside the launcher, PATH or not (the README's
/// `./target/release/launch …` after `make build`), and the check table says which one.
#[test]
fn a_local_cluster_finds_the_engine_beside_the_launcher_and_says_which() {
    let dir = tempfile::Builder::new().prefix("mm-e2e-beside-").tempdir().unwrap();
    synth(dir.path());
    let cluster = format!("{REPO}/clusters/local.yaml");
    // Without target/release on PATH.
    let launch = |args: &[&str]| {
        Command::new(LAUNCH)
            .args(["--cluster", &cluster])
            .args(args)
            .current_dir(dir.path())
            .env("PATH", "/usr/bin:/bin")
            .output()
            .unwrap()
    };
    let o = launch(&["check", "tiny", "--json"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let row = rows.as_array().unwrap().iter().find(|r| r["check"] == "engine").expect("an engine row");
    let want = format!("mm-engine {} at {}", env!("CARGO_PKG_VERSION"), engine().display());
    assert_eq!(row["found"].as_str(), Some(want.as_str()), "{row}");
    let dry = launch(&["finetune", "tiny", "--dry-run"]);
    assert!(text(&dry).0.contains(&format!("exec {} train", engine().display())), "{}", text(&dry).0);
}
