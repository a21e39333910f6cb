//! A whole launch: run directory, tracing log, backend, signals, attempts and restarts,
//! the final report. main.rs calls [`run_job`] after the checks passed.
//!
//! ```text
//! RunDir::create ─► tracing → launcher.log ─► plan.json, status.json (running)
//!   └─► attempt 0..=max_restarts: dispatch::run_attempt(backend, reporters = LogSink + Console)
//!         failed and restartable and attempts left? ─► next attempt (attempt-K/ folders)
//!   └─► report (stderr), status.json (finished, exit code)
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::cluster::{Accelerator, ClusterSpec, Executor};
use crate::events::{HostInfo, LaunchEvent, Reporter};
use crate::exec::backend::Backend;
use crate::exec::dispatch::{run_attempt, AttemptSpec, DispatchConfig};
use crate::exec::local::LocalBackend;
use crate::exec::outcome::{Outcome, Sig};
use crate::exec::ssh::{AgentSource, SshBackend};
use crate::logs::{LogSink, RunDir, RunStatus};
use crate::metrics::MetricsSink;
use crate::plan::Plan;
use crate::progress::{Console, ProgressSource, Tee};
use crate::render::{Rendered, Renderer};
use crate::ssh::SshTarget;

#[derive(Debug, Clone)]
pub struct JobOptions {
    /// SIGTERM → SIGKILL delay.
    pub grace: Duration,
    pub max_restarts: u32,
    pub tee: Tee,
    /// Ranks whose every line the console shows (empty: rank 0).
    pub ranks: Vec<usize>,
    /// Progress bars (stdout is a terminal) or plain lines.
    pub fancy: bool,
    /// `--hang-timeout` (else the cluster's `hang_timeout`): one stall budget for every phase;
    /// zero turns the watchdog off.
    pub hang_timeout: Option<Duration>,
}

/// Reporters of a job: the run directory and the console.
struct JobReporters {
    logs: LogSink,
    metrics: MetricsSink,
    console: Console,
}

impl Reporter for JobReporters {
    fn event(&mut self, ev: &LaunchEvent<'_>) {
        self.logs.event(ev);
        self.metrics.event(ev);
        self.console.event(ev);
    }
    fn tick(&mut self) {
        self.logs.tick();
        self.console.tick();
    }
    fn flush(&mut self) {
        self.logs.flush();
        self.console.flush();
    }
}

fn init_tracing(path: &std::path::Path) {
    let Ok(file) = std::fs::OpenOptions::new().create(true).append(true).open(path) else { return };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LAUNCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,launch=debug"));
    let _ = tracing_subscriber::fmt().with_writer(Mutex::new(file)).with_ansi(false).with_env_filter(filter).try_init();
}

/// The hosts as reporters name them, in node order.
pub fn hosts_of(plan: &Plan) -> Vec<HostInfo> {
    plan.nodes
        .iter()
        .map(|n| HostInfo { name: n.host.name.clone(), address: n.host.address.clone(), ranks: n.ranks.clone() })
        .collect()
}

/// The backend for this cluster. Over SSH the hosts are contacted at once (connections and
/// agents start in the background; the first attempt picks them up).
pub fn backend_for(plan: &Plan, cluster: &ClusterSpec, agent_path: Option<&str>) -> Result<Box<dyn Backend>, String> {
    if cluster.local {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find the launch binary to run agents: {e}"))?;
        return Ok(Box::new(LocalBackend::new(exe)));
    }
    if cluster.executor == Executor::Slurm {
        return slurm_backend(plan, cluster, agent_path);
    }
    let env = |k: &str| std::env::var(k).ok();
    let targets = plan.nodes.iter().map(|n| SshTarget::new(cluster, &n.host, &env)).collect();
    let agent = match agent_path {
        Some(p) => AgentSource::Path(p.to_string()),
        None => AgentSource::upload_self().map_err(|e| format!("cannot read the launch binary to upload it: {e}"))?,
    };
    Ok(Box::new(SshBackend::start_early(targets, agent)))
}

/// Agents as Slurm steps: only inside an allocation that holds every host of the plan. The
/// agent binary must be where the nodes see it (a shared file system; `--agent-path`).
fn slurm_backend(plan: &Plan, cluster: &ClusterSpec, agent_path: Option<&str>) -> Result<Box<dyn Backend>, String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (nodes, cpus) = slurm_steps(plan, cluster, &env)?;
    let agent = match agent_path {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe().map_err(|e| format!("cannot find the launch binary to run agents: {e}"))?,
    };
    Ok(Box::new(LocalBackend::slurm(agent, nodes, cpus)))
}

/// The Slurm node of each plan node and SLURM_CPUS_ON_NODE, after checking the allocation
/// (`env`: the process environment) against the plan: a job, holding every host, with the
/// devices the plan starts ranks on.
fn slurm_steps(
    plan: &Plan,
    cluster: &ClusterSpec,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Vec<String>, Vec<Option<u32>>), String> {
    let Some(job) = env("SLURM_JOB_ID") else {
        return Err("`executor: slurm` starts the node agents as steps of a Slurm job, but SLURM_JOB_ID is not set: \
                    run launch inside an allocation (`salloc -N <nodes> launch …`, or `launch submit`), or set \
                    `executor: ssh`"
            .into());
    };
    let nodes: Vec<String> = plan.nodes.iter().map(|n| n.host.name.clone()).collect();
    // Each node's CPUs: SLURM_JOB_CPUS_PER_NODE (`64(x2),48`) in SLURM_JOB_NODELIST's order,
    // else SLURM_CPUS_ON_NODE (the launcher's own node) for all.
    let mut cpus: Vec<Option<u32>> = vec![env("SLURM_CPUS_ON_NODE").and_then(|v| v.parse().ok()); nodes.len()];
    if let Some(list) = env("SLURM_JOB_NODELIST").or_else(|| env("SLURM_NODELIST")) {
        let allocated = crate::hostlist::expand(&list).map_err(|e| format!("SLURM_JOB_NODELIST {list:?}: {e}"))?;
        let missing: Vec<&str> = nodes.iter().filter(|n| !allocated.contains(n)).map(String::as_str).collect();
        if !missing.is_empty() {
            return Err(format!(
                "job {job}'s allocation ({list}) does not hold {}: every host of the cluster file must be one of \
                 its nodes (use `hosts_from: slurm`, or allocate those nodes)",
                missing.join(", ")
            ));
        }
        if let Some(per) = env("SLURM_JOB_CPUS_PER_NODE").and_then(|v| cpus_per_node(&v)) {
            if per.len() == allocated.len() {
                for (i, n) in nodes.iter().enumerate() {
                    cpus[i] = allocated.iter().position(|a| a == n).map(|k| per[k]);
                }
            }
        }
    }
    // The allocation's resources per node against the cluster file's devices per node.
    let per_node = plan.nodes.iter().map(|n| n.ranks.len()).max().unwrap_or(0);
    let short = |what: &str, var: &str, have: usize, fix: &str| {
        Err(format!(
            "job {job} has {have} {what} per node ({var}={have}), but the plan starts {per_node} ranks on a node \
             (devices_per_node {}); {fix}",
            cluster.devices_per_node
        ))
    };
    match cluster.accelerator {
        Accelerator::Gpu => {
            if let Some(g) = env("SLURM_GPUS_ON_NODE").and_then(|v| v.parse::<usize>().ok()).filter(|&g| g < per_node) {
                return short("GPUs", "SLURM_GPUS_ON_NODE", g, "allocate with --gpus-per-node=N (launch submit does)");
            }
        }
        Accelerator::Cpu => {
            for (node, c) in nodes.iter().zip(&cpus) {
                if let Some(c) = c.map(|c| c as usize).filter(|&c| c < per_node) {
                    let fix = format!("{node} is short; allocate more CPUs per node, or lower devices_per_node");
                    return short("CPUs", "SLURM_JOB_CPUS_PER_NODE", c, &fix);
                }
            }
        }
        Accelerator::Npu => {}
    }
    Ok((nodes, cpus))
}

/// SLURM_JOB_CPUS_PER_NODE (`64(x2),48`: 64 on each of the first two nodes, 48 on the third),
/// one count per node; None when it does not read.
fn cpus_per_node(v: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in v.split(',') {
        let (n, times) = match part.split_once("(x") {
            Some((n, rest)) => (n, rest.strip_suffix(')')?.parse::<usize>().ok()?),
            None => (part, 1),
        };
        out.extend(std::iter::repeat_n(n.trim().parse::<u32>().ok()?, times));
    }
    Some(out)
}

/// The run directory of a launch, made before the checks run, so that `launch logs -f` typed
/// right after `finetune` follows this run (status "running" from the start).
pub fn open_run(plan: &Plan, cluster: &ClusterSpec, attempts: bool) -> Result<RunDir, String> {
    let run = RunDir::create(&cluster.log_dir, &plan.model.name, attempts)
        .map_err(|e| format!("cannot create a run directory under {}: {e}", cluster.log_dir.display()))?;
    init_tracing(&run.launcher_log());
    tracing::info!(run = %run.id, hosts = plan.nodes.len(), ranks = plan.world_size, "launch starting");
    let _ = run.write_status(&status_of(&run, "running", None, None, None));
    eprintln!("[launch] run {}: logs in {}", run.id, run.root.display());
    Ok(run)
}

/// A run that ends before any rank starts (failed checks, a signal during them): `text` goes
/// into launch.log, and status.json says finished with `code`.
pub fn close_unstarted(run: &RunDir, code: i32, text: &str) {
    use std::io::Write as _;
    let lines: String = text.lines().map(|l| format!("[launch] {l}\n")).collect();
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.launch_log())
        .and_then(|mut f| f.write_all(lines.as_bytes()));
    if let Err(e) = appended {
        tracing::warn!("cannot write {}: {e}", run.launch_log().display());
    }
    let outcome = text.lines().last().map(String::from);
    let _ = run.write_status(&status_of(run, "finished", Some(code), outcome, None));
}

/// status.json's content for this launcher process.
fn status_of(
    run: &RunDir,
    state: &str,
    exit_code: Option<i32>,
    outcome: Option<String>,
    training: Option<crate::exec::outcome::TrainingSummary>,
) -> RunStatus {
    let pid = std::process::id();
    RunStatus {
        run_id: run.id.clone(),
        state: state.into(),
        pid,
        exit_code,
        outcome,
        training,
        host: nix::unistd::gethostname().ok().map(|h| h.to_string_lossy().into_owned()),
        pid_start: crate::agent::start_time(pid),
    }
}

/// Runs the job to its end in `run` (from [`open_run`]); returns the process exit code (see
/// main.rs for the table).
/// `rendered`: the launch as rendered for the dry run (written to plan.json until the attempt
/// replaces it with the picked master port).
/// `backend`: from [`backend_for`], made as early as possible.
pub fn run_job(
    run: RunDir,
    plan: &Plan,
    cluster: &ClusterSpec,
    renderer: &Renderer,
    rendered: &Rendered,
    backend: Box<dyn Backend>,
    opts: &JobOptions,
) -> Result<i32, String> {
    // Off the critical path: hosts are being reached meanwhile.
    let plan_writer = {
        let (run, plan, rendered) = (run.clone(), plan.clone(), rendered.clone());
        std::thread::spawn(move || {
            if let Err(e) = run.write_plan_if_absent(&plan, &rendered) {
                tracing::warn!("cannot write plan.json: {e}");
            }
        })
    };

    let hosts = hosts_of(plan);
    let logs = LogSink::new(run.clone(), plan.clone(), hosts.clone())
        .map_err(|e| format!("cannot write {}: {e}", run.launch_log().display()))?;
    let progress = ProgressSource::of(plan.template);
    let console = Console::new(hosts.clone(), opts.tee, opts.ranks.clone(), opts.fancy)
        .fold_iterations(progress == ProgressSource::ProgressLines);
    let metrics = MetricsSink::new(&run.root);
    let mut reporters = JobReporters { logs, metrics, console };

    let cfg = DispatchConfig {
        grace: opts.grace,
        heartbeat: (!cluster.ssh.keepalive_interval.is_zero())
            .then(|| (cluster.ssh.keepalive_interval, cluster.ssh.keepalive_count.max(1))),
        double_signal_window: Duration::from_secs(2),
        agent_watchdog: !cluster.local,
        hang_timeout: opts.hang_timeout.or(cluster.hang_timeout),
        progress,
    };
    let master_node = plan.nodes.iter().position(|n| n.host.address == plan.master_addr).unwrap_or(0);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let (code, headline, training) = rt.block_on(async {
        let (sig_tx, mut sig_rx) = mpsc::unbounded_channel();
        for (kind, sig) in [
            (SignalKind::interrupt(), Sig::Int),
            (SignalKind::terminate(), Sig::Term),
            (SignalKind::hangup(), Sig::Hup),
            (SignalKind::user_defined1(), Sig::Usr1),
        ] {
            match signal(kind) {
                Ok(mut stream) => {
                    let tx = sig_tx.clone();
                    tokio::spawn(async move {
                        while stream.recv().await.is_some() {
                            if tx.send(sig).is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(e) => tracing::warn!("cannot watch {}: {e}", sig.name()),
            }
        }
        // A signal held before these handlers existed (during the checks) acts now.
        if let Some(sig) = crate::signals::release() {
            let _ = sig_tx.send(sig);
        }
        let mut attempt = 0u32;
        loop {
            let mut render = |port: Option<u16>| {
                let mut p = plan.clone();
                if let Some(port) = port {
                    p.master_port = port;
                }
                renderer.render_plan(&p, cluster).map_err(|e| e.to_string())
            };
            let extra_env: BTreeMap<String, String> =
                [("LAUNCH_RUN_ID".to_string(), run.id.clone()), ("LAUNCH_ATTEMPT".to_string(), attempt.to_string())]
                    .into();
            let spec = AttemptSpec {
                attempt,
                max_restarts: opts.max_restarts,
                hosts: &hosts,
                master_node,
                need_port: plan.master_port == 0,
                render: &mut render,
                extra_env,
            };
            let result = run_attempt(backend.as_ref(), &cfg, spec, &mut reporters, &mut sig_rx).await;
            reporters.flush();
            let training = reporters.console.training().cloned();
            if result.outcome != Outcome::Success {
                write_rank_states(&run.attempt_dir(attempt), &result.rank_states);
            }
            let text = crate::report::render(
                &result,
                training.as_ref(),
                reporters.console.stopped(),
                &run.attempt_dir(attempt),
                &run.launch_log(),
                &run.root,
            );
            let headline = text.lines().next().unwrap_or("").to_string();
            reporters.event(&LaunchEvent::AttemptFinished { attempt, summary: headline.clone() });
            let code = result.outcome.exit_code();
            let restart = match &result.outcome {
                Outcome::Failed(f) => f.restartable() && attempt < opts.max_restarts,
                _ => false,
            };
            if !restart {
                reporters.flush();
                eprint!("{text}");
                if attempt > 0 {
                    eprintln!(
                        "  restarts     {attempt}: the lines above are attempt {attempt}'s; `launch logs --summary` \
                         has every attempt"
                    );
                }
                for e in reporters.logs.errors().iter().chain(reporters.metrics.errors()).take(5) {
                    eprintln!("launch: warning: {e}");
                }
                return (code, headline, training);
            }
            reporters.console.say(&format!(
                "[launch] attempt {attempt} failed (exit {code}); restarting every rank ({} of {} restarts)",
                attempt + 1,
                opts.max_restarts
            ));
            tracing::warn!(attempt, code, "restarting");
            // A signal while waiting to restart ends the job instead.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                Some(sig) = sig_rx.recv() => {
                    eprint!("{text}");
                    eprintln!("launch: {} received before the restart: not restarting", sig.name());
                    return (128 + sig.number(), headline, training);
                }
            }
            attempt += 1;
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    let _ = plan_writer.join();
    let _ = run.write_status(&status_of(&run, "finished", Some(code), Some(headline), training));
    tracing::info!(code, "launch finished");
    Ok(code)
}

/// Each watched rank's last state next to its log (`<host>/rank-N.state.json`), for the
/// post-mortem of a failed or stopped attempt.
fn write_rank_states(attempt_dir: &std::path::Path, states: &[(usize, String, crate::exec::proto::RankReport)]) {
    for (rank, host, report) in states {
        let path = crate::logs::rank_log_path(attempt_dir, host, *rank).with_extension("state.json");
        let json = serde_json::to_vec_pretty(report).unwrap_or_default();
        if let Err(e) = path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|_| std::fs::write(&path, json))
        {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
    }
}

/// Where the launcher's binary would be cached on hosts, for `launch agent --cache-key`.
pub fn own_cache_key() -> Result<String, String> {
    let exe: PathBuf = std::env::current_exe().map_err(|e| e.to_string())?;
    crate::exec::ssh::cache_key(&exe).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(yaml: &str) -> (Plan, ClusterSpec) {
        let cluster = ClusterSpec::from_str(yaml, std::path::Path::new("c.yaml")).unwrap();
        let recipe = crate::recipe::Recipe::resolve("tiny", Some((&cluster.job, &cluster.origin)), None, &[]).unwrap();
        (Plan::build(&cluster, &recipe).unwrap(), cluster)
    }

    #[test]
    fn slurm_steps_check_the_allocation_against_the_plan() {
        let (p, c) = plan(
            "hosts: [{address: 10.0.0.1, name: n1}, {address: 10.0.0.2, name: n2}]\nexecutor: slurm\n\
             accelerator: cpu\ndevices_per_node: 2\nssh: {strict_host_key_checking: accept-new}\n",
        );
        assert_eq!(c.executor, Executor::Slurm);
        let with = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let ok = slurm_steps(
            &p,
            &c,
            &with(&[("SLURM_JOB_ID", "7"), ("SLURM_JOB_NODELIST", "n[1-3]"), ("SLURM_CPUS_ON_NODE", "4")]),
        );
        assert_eq!(ok.unwrap(), (vec!["n1".to_string(), "n2".to_string()], vec![Some(4), Some(4)]));
        // Per node from SLURM_JOB_CPUS_PER_NODE, in the node list's order.
        const VARS: &[(&str, &str)] =
            &[("SLURM_JOB_ID", "7"), ("SLURM_JOB_NODELIST", "n[1-3]"), ("SLURM_JOB_CPUS_PER_NODE", "8,6(x2)")];
        assert_eq!(slurm_steps(&p, &c, &with(VARS)).unwrap().1, vec![Some(8), Some(6)]);
        const SHORT: &[(&str, &str)] =
            &[("SLURM_JOB_ID", "7"), ("SLURM_JOB_NODELIST", "n[1-2]"), ("SLURM_JOB_CPUS_PER_NODE", "4,1")];
        let e = slurm_steps(&p, &c, &with(SHORT)).unwrap_err();
        assert!(e.contains("1 CPUs per node") && e.contains("n2 is short"), "{e}");
        assert_eq!(cpus_per_node("64(x2),48"), Some(vec![64, 64, 48]));
        assert_eq!(cpus_per_node("x"), None);
        let e = slurm_steps(&p, &c, &with(&[])).unwrap_err();
        assert!(e.contains("SLURM_JOB_ID is not set") && e.contains("salloc"), "{e}");
        let e = slurm_steps(&p, &c, &with(&[("SLURM_JOB_ID", "7"), ("SLURM_JOB_NODELIST", "n[2-3]")])).unwrap_err();
        assert!(e.contains("(n[2-3]) does not hold n1"), "{e}");
        let e = slurm_steps(&p, &c, &with(&[("SLURM_JOB_ID", "7"), ("SLURM_CPUS_ON_NODE", "1")])).unwrap_err();
        assert!(
            e.contains("job 7 has 1 CPUs per node (SLURM_JOB_CPUS_PER_NODE=1), but the plan starts 2 ranks"),
            "{e}"
        );
    }
}
