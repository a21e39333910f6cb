//! The `launch` binary: CLI parsing and exit codes only; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use launch::checks::{self, Status};
use launch::cluster::ClusterSpec;
use launch::dryrun;
use launch::exec::job::{run_job, JobOptions};
use launch::logs::{show_logs, LogsQuery};
use launch::plan::Plan;
use launch::progress::{Console, Tee};
use launch::recipe::Recipe;
use launch::render::Renderer;

/// Exit codes (documented in the README and --help; mm-convert and mm-engine share 0/2/3). A
/// layout that does not fit the model or the cluster exits 3, like a failed check. A launch
/// that ran exits with its first failure's
/// code: the failing rank's exit code, 128 + signal when a rank was killed by one, 4 when
/// nothing could be started (a host unreachable, its key refused, no agent), 255 when a host
/// was lost or its agent died mid-run, 124 when the stall watchdog stopped it, 127 when a rank's
/// shell could not start, 130 / 143 / 129 / 138 when the launcher was stopped by SIGINT /
/// SIGTERM / SIGHUP / SIGUSR1.
const EXIT_CONFIG: u8 = 2;
const EXIT_CHECKS: u8 = 3;

const AFTER_HELP: &str = "Exit codes (shared with mm-convert and mm-engine): 0 ok, 2 usage or configuration error \
(file, line and key named), 3 failed checks or a layout that does not fit; a run exits with its first failing rank's \
code (128 + signal when killed), 4 when nothing could be started, 124 when the stall watchdog stopped it, 127 when a \
rank's shell could not start, 255 when a host was lost or its agent failed, 130/143/129/138 when the launcher was \
stopped by SIGINT/SIGTERM/SIGHUP/SIGUSR1 (launch stop sends SIGTERM).";

#[derive(Parser)]
#[command(
    after_help = AFTER_HELP,
    name = "launch",
    version,
    about = "Plan, check and launch InternVL3 fine-tunes on one or many hosts",
    long_about = "Reads a cluster YAML file, lays out the ranks (TP/CP/DP/PP), checks every host, renders the \
                  exact commands (mm-engine, or MindSpeed-MM under torchrun/msrun) and runs them.\n\n\
                  Without --cluster the embedded clusters/local.yaml is used: localhost, CPU, 2 ranks."
)]
struct Cli {
    /// Cluster file (hosts, accelerator, devices, env, job paths). Default: embedded local.yaml.
    #[arg(long, global = true, value_name = "FILE")]
    cluster: Option<PathBuf>,
    /// Directory whose <template>.hbs files replace the embedded templates.
    #[arg(long, global = true, value_name = "DIR")]
    templates: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune MODEL (tiny, 1b, 2b, 8b, 14b, 38b, 78b) on the cluster.
    Finetune(FinetuneArgs),
    /// Run the environment checks on every host and print a table.
    Check(CheckArgs),
    /// Print the aggregated log of the latest run (or RUN), optionally following it.
    Logs(LogsArgs),
    /// Draw metrics of the latest run (or RUNs, overlaid) against iteration as a PNG or SVG.
    Plot(PlotArgs),
    /// Submit the job to Slurm (sbatch): an allocation sized from the plan, the launcher inside
    /// it starting one agent step per node. `launch submit [sbatch options] finetune 8b …`.
    Submit(SubmitArgs),
    /// Stop the latest run (or RUN) as a preemption would: every rank finishes its step, saves
    /// a checkpoint and exits; the next `finetune` resumes from it.
    Stop(StopArgs),
    /// The per-host node agent the launcher starts over SSH (internal).
    #[command(hide = true)]
    Agent(AgentArgs),
}

#[derive(Args)]
struct LogsArgs {
    /// A run id (a directory under the log dir) or a run directory; default: the latest run.
    run: Option<String>,
    /// Keep printing new lines until the run finishes.
    #[arg(short, long)]
    follow: bool,
    /// Only this rank's lines.
    #[arg(long, value_name = "R")]
    rank: Option<usize>,
    /// Only this host's lines (its name in the cluster file).
    #[arg(long, value_name = "H")]
    host: Option<String>,
    /// Only lines matching this regular expression.
    #[arg(long, value_name = "RE")]
    grep: Option<String>,
    /// Where runs are (default: the cluster's log_dir with --cluster, else `logs`).
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// Print the table of the run's metrics (per attempt: iterations, loss, tokens/s, step
    /// time, TFLOP/s, MFU) instead of its log.
    #[arg(long, conflicts_with_all = ["follow", "rank", "host", "grep"])]
    summary: bool,
}

#[derive(Args)]
struct SubmitArgs {
    /// sbatch --partition.
    #[arg(long, value_name = "P")]
    partition: Option<String>,
    /// sbatch --time, the job's time limit (e.g. 24:00:00, 2-00:00:00).
    #[arg(long, value_name = "T")]
    time: Option<String>,
    /// sbatch --account.
    #[arg(long, value_name = "A")]
    account: Option<String>,
    /// sbatch --qos.
    #[arg(long, value_name = "Q")]
    qos: Option<String>,
    /// Another sbatch option as sbatch spells it (repeatable): --sbatch=--mail-type=END.
    #[arg(long = "sbatch", value_name = "OPTION", allow_hyphen_values = true)]
    sbatch: Vec<String>,
    /// Nodes to allocate, for a cluster file with `hosts_from: slurm` (one with `hosts:`
    /// allocates exactly those).
    #[arg(long, value_name = "N")]
    nodes: Option<usize>,
    /// How long before the time limit Slurm signals the launcher (SIGUSR1: every rank saves at
    /// an agreed iteration and exits; a requeued job resumes there).
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration)]
    signal_before: std::time::Duration,
    /// Print the batch script; submit nothing.
    #[arg(long)]
    dry_run: bool,
    /// Wait for the job to end (sbatch --wait) and exit with its exit code.
    #[arg(long)]
    wait: bool,
    #[command(subcommand)]
    what: SubmitWhat,
}

#[derive(Subcommand)]
enum SubmitWhat {
    /// The fine-tune the job runs (the same arguments as `launch finetune`).
    Finetune(JobArgs),
}

#[derive(Args)]
struct PlotArgs {
    /// Run ids, run directories or metrics.jsonl files (mm-engine alone writes
    /// <save>/metrics.jsonl); default: the latest run.
    runs: Vec<String>,
    /// A metric per panel (repeatable): loss, lr, grad_norm, tokens_per_sec, samples_per_sec,
    /// step_ms, data_ms, slowest_busy_ms, tflops, mfu, rss_gib, cuda_allocated_gib,
    /// cuda_reserved_gib (metrics.jsonl's mem_bytes and cuda_*_bytes name these too).
    /// Default: loss and tokens_per_sec.
    #[arg(long, value_name = "NAME")]
    metric: Vec<String>,
    /// The picture: .png or .svg (default: metrics.png in the run's folder, or in the current
    /// directory for several runs).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Where runs are (default: the cluster's log_dir with --cluster, else `logs`).
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
}

#[derive(Args)]
struct StopArgs {
    /// A run id (a directory under the log dir) or a run directory; default: the latest run.
    run: Option<String>,
    /// Where runs are (default: the cluster's log_dir with --cluster, else `logs`).
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// How long to wait for the run to finish stopping before returning.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    wait: std::time::Duration,
}

#[derive(Args)]
struct AgentArgs {
    /// Print the key under which this binary is cached on hosts, and exit.
    #[arg(long)]
    cache_key: bool,
}

#[derive(Args)]
struct JobArgs {
    /// tiny, 1b, 2b, 8b, 14b, 38b or 78b (InternVL3-8B spelling works too).
    model: String,
    /// YAML file overriding any recipe field (train.lr, parallel.tp, data.data_path, ...).
    #[arg(long, value_name = "FILE")]
    recipe: Option<PathBuf>,
    /// Override one recipe field, e.g. --set train.lr=1e-5 --set parallel.llm_pp_layers=7,7,7,7.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(Args)]
struct FinetuneArgs {
    #[command(flatten)]
    job: JobArgs,
    /// Print the plan, rank table, groups and exact per-host commands; start nothing.
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: print JSON instead of text.
    #[arg(long, requires = "dry_run")]
    json: bool,
    /// Skip a check by id (e.g. env:HCCL_CONNECT_TIMEOUT) or family (env, path, disk).
    #[arg(long = "skip-check", value_name = "NAME")]
    skip_checks: Vec<String>,
    /// Do not run the environment checks before starting (saves one round trip per host).
    #[arg(long)]
    no_checks: bool,
    /// On a failure or a signal: SIGTERM every rank, then SIGKILL after this long.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    grace: std::time::Duration,
    /// Stop the job when no rank makes progress for this long, in any phase (default: a
    /// budget per phase from the recent step times; the cluster key `hang_timeout`; 0: off).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    hang_timeout: Option<std::time::Duration>,
    /// On a failure, stop everything and start all ranks again, up to N times (each attempt
    /// logs into its own attempt-K folder).
    #[arg(long, value_name = "N", default_value_t = 0)]
    max_restarts: u32,
    /// Console output: default (rank 0, plus warnings and errors of every rank), all, errors.
    #[arg(long, value_name = "MODE", default_value = "default")]
    tee: Tee,
    /// Show every line of these ranks instead of rank 0's, e.g. --ranks 0,8.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    ranks: Vec<usize>,
    /// The launch binary on the hosts (same version). Default: this binary, uploaded once
    /// over SFTP to ~/.cache/mm-launch/<version>-<fingerprint>/launch.
    #[arg(long, value_name = "PATH")]
    agent_path: Option<String>,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    launch::cluster::humane::parse(s)
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    job: JobArgs,
    /// Print the rows as JSON.
    #[arg(long)]
    json: bool,
    /// Skip a check by id or family.
    #[arg(long = "skip-check", value_name = "NAME")]
    skip_checks: Vec<String>,
    /// The launch binary on the hosts (same version), which runs the probe. Default: this
    /// binary, uploaded once over SFTP as for `finetune`.
    #[arg(long, value_name = "PATH")]
    agent_path: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Agent(a) = &cli.command {
        if a.cache_key {
            return match launch::exec::job::own_cache_key() {
                Ok(k) => {
                    println!("{k}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            };
        }
        return ExitCode::from(launch::agent::run().clamp(0, 255) as u8);
    }
    match run(cli) {
        Ok(code) => code,
        Err(Failure(code, message)) => {
            eprintln!("{message}");
            ExitCode::from(code)
        }
    }
}

/// A user-facing failure: an exit code and the full message.
struct Failure(u8, String);

fn config<E: std::fmt::Display>(e: E) -> Failure {
    Failure(EXIT_CONFIG, format!("error: {e}"))
}

fn load(cli_cluster: &Option<PathBuf>, job: &JobArgs) -> Result<(ClusterSpec, Recipe, Plan), Failure> {
    let cluster = match cli_cluster {
        Some(p) => ClusterSpec::from_file(p),
        None => ClusterSpec::embedded_local(),
    }
    .map_err(config)?;
    let (recipe, plan) = plan_job(&cluster, job)?;
    Ok((cluster, recipe, plan))
}

/// The cluster's warnings, then the recipe and the plan of `job` on it.
fn plan_job(cluster: &ClusterSpec, job: &JobArgs) -> Result<(Recipe, Plan), Failure> {
    for w in &cluster.warnings {
        eprintln!("warning: {w}");
    }
    let recipe = Recipe::resolve(&job.model, Some((&cluster.job, &cluster.origin)), job.recipe.as_deref(), &job.sets)
        .map_err(config)?;
    let plan = Plan::build(cluster, &recipe)
        .map_err(|e| Failure(if e.layout { EXIT_CHECKS } else { EXIT_CONFIG }, format!("error: {e}")))?;
    Ok((recipe, plan))
}

/// `launch submit`: plans the job as `finetune` would (with `--nodes` standing in for the
/// allocation of a `hosts_from: slurm` cluster), writes the batch script and hands it to sbatch.
fn submit(cli: &Cli, args: &SubmitArgs) -> Result<ExitCode, Failure> {
    let SubmitWhat::Finetune(job) = &args.what;
    let Some(cluster_path) = &cli.cluster else {
        return Err(Failure(EXIT_CONFIG, "error: launch submit needs --cluster FILE (a Slurm cluster file)".into()));
    };
    let cwd = std::env::current_dir().map_err(|e| Failure(1, format!("error: the current directory: {e}")))?;
    let mut env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    if let Some(n) = args.nodes {
        if n == 0 {
            return Err(Failure(EXIT_CONFIG, "error: --nodes 0: a job needs at least one node".into()));
        }
        // Planning stands in names for the nodes Slurm will pick; the job reads the real ones.
        env.insert("SLURM_JOB_NODELIST".into(), format!("node[1-{n}]"));
        env.remove("SLURM_NODELIST");
    }
    let cluster = ClusterSpec::from_file_with_env(cluster_path, &env).map_err(|e| {
        let text = e.to_string();
        if text.contains("SLURM_JOB_NODELIST") {
            // The finetune hint (run inside an allocation) is wrong here: submit makes it.
            let text: Vec<&str> =
                text.lines().filter(|l| !l.contains("run launch inside a Slurm allocation")).collect();
            Failure(
                EXIT_CONFIG,
                format!(
                    "error: {}\n  hint: `launch submit` makes the allocation: pass --nodes N to size the job",
                    text.join("\n")
                ),
            )
        } else {
            config(e)
        }
    })?;
    // With `hosts_from: slurm` the stand-in list has exactly N hosts: only a `hosts:` list differs.
    if let Some(n) = args.nodes.filter(|&n| n != cluster.hosts.len()) {
        return Err(Failure(
            EXIT_CONFIG,
            format!(
                "error: --nodes {n}, but {} lists {} hosts, which the job allocates by name; drop --nodes or \
                 use `hosts_from: slurm`",
                cluster_path.display(),
                cluster.hosts.len()
            ),
        ));
    }
    let (_recipe, plan) = plan_job(&cluster, job)?;
    let renderer = Renderer::new(cli.templates.as_deref()).map_err(config)?;
    // Absolute paths for the job, which starts elsewhere and later (`join` keeps absolute ones).
    let abs = |p: &std::path::Path| cwd.join(p).display().to_string();
    let mut inner = vec!["--cluster".to_string(), abs(cluster_path)];
    if let Some(t) = &cli.templates {
        inner.extend(["--templates".into(), abs(t)]);
    }
    inner.extend(["finetune".into(), job.model.clone()]);
    if let Some(r) = &job.recipe {
        inner.extend(["--recipe".into(), abs(r)]);
    }
    for s in &job.sets {
        inner.extend(["--set".into(), s.clone()]);
    }
    let launch_exe = std::env::current_exe().map_err(|e| Failure(1, format!("error: the launch binary: {e}")))?;
    let opts = launch::submit::SubmitOptions {
        partition: args.partition.clone(),
        time: args.time.clone(),
        account: args.account.clone(),
        qos: args.qos.clone(),
        extra: args.sbatch.clone(),
        warn_secs: args.signal_before.as_secs().max(1),
    };
    let sj = launch::submit::SubmitJob { launch: &launch_exe, cwd: &cwd, args: inner };
    let script = launch::submit::script(&renderer, &plan, &cluster, &opts, &sj)
        .map_err(|e| Failure(EXIT_CONFIG, format!("error: {e}")))?;
    if args.dry_run {
        print!("{script}");
        return Ok(ExitCode::SUCCESS);
    }
    let log_dir = cwd.join(&cluster.log_dir);
    let (id, path, code) = launch::submit::submit(&script, &log_dir, &plan.model.name, args.wait)
        .map_err(|e| Failure(1, format!("error: {e}")))?;
    println!("submitted batch job {id} ({} nodes): {}", plan.nodes.len(), path.display());
    println!("  job output   {}", log_dir.join(format!("slurm-{id}.out")).display());
    println!("  run logs     launch logs -f --log-dir {}   (once the job starts)", log_dir.display());
    if args.wait {
        println!("job {id} ended with exit code {code}");
        return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
    }
    Ok(ExitCode::SUCCESS)
}

/// A signal held while the plan was made and the checks ran ends the launch here.
fn held_signal() -> Result<(), Failure> {
    match launch::signals::held() {
        Some(sig) => Err(Failure(
            (128 + sig.number()) as u8,
            format!("launch: {} received before the start: nothing was started", sig.name()),
        )),
        None => Ok(()),
    }
}

/// `--log-dir`, else the cluster file's `log_dir`, else `logs`.
fn log_dir_of(flag: &Option<PathBuf>, cluster: &Option<PathBuf>) -> Result<PathBuf, Failure> {
    Ok(match (flag, cluster) {
        (Some(d), _) => d.clone(),
        (None, Some(c)) => ClusterSpec::from_file(c).map_err(config)?.log_dir,
        (None, None) => PathBuf::from("logs"),
    })
}

fn run(cli: Cli) -> Result<ExitCode, Failure> {
    let version = env!("CARGO_PKG_VERSION");
    match &cli.command {
        Command::Finetune(args) => {
            let (cluster, _recipe, plan) = load(&cli.cluster, &args.job)?;
            let renderer = Renderer::new(cli.templates.as_deref()).map_err(config)?;
            let rendered = renderer.render_plan(&plan, &cluster).map_err(config)?;
            if args.dry_run {
                if args.json {
                    println!("{}", dryrun::to_json(&plan, &rendered));
                } else {
                    print!("{}", dryrun::to_text(&plan, &rendered));
                }
                return Ok(ExitCode::SUCCESS);
            }
            // From here on a signal is held until the job's handlers take over (never fatal
            // half-way through the checks).
            launch::signals::hold_early();
            // Reach the hosts now: connecting and starting their agents overlaps the rest of the
            // setup. The checks' probe travels over these first links and then has the backend
            // reach the hosts again ahead of the first attempt.
            let backend = launch::exec::job::backend_for(&plan, &cluster, args.agent_path.as_deref())
                .map_err(|e| Failure(1, format!("error: {e}")))?;
            // The run folder exists before the checks run: `launch logs -f` follows this run.
            let run = launch::exec::job::open_run(&plan, &cluster, args.max_restarts > 0)
                .map_err(|e| Failure(1, format!("error: {e}")))?;
            // Ending before any rank starts: the run folder says why, too.
            let unstarted = |f: Failure| {
                launch::exec::job::close_unstarted(&run, i32::from(f.0), &f.1);
                f
            };
            if !args.no_checks {
                let rows = checks::run_all(backend.as_ref(), &plan, &cluster, &args.skip_checks, version)
                    .map_err(|e| unstarted(Failure(EXIT_CONFIG, format!("error: {e}"))))?;
                held_signal().map_err(unstarted)?;
                if rows.iter().any(|r| r.status == Status::Fail) {
                    let table = checks::format_table(&rows);
                    eprint!("{table}");
                    let why = "error: environment checks failed (fix them, or skip one with --skip-check ID)";
                    launch::exec::job::close_unstarted(&run, i32::from(EXIT_CHECKS), &format!("{table}{why}"));
                    return Err(Failure(EXIT_CHECKS, why.into()));
                }
                // The probe took the connections made ahead of time: make the job's now.
                backend.reach_ahead();
                for r in rows.iter().filter(|r| r.status == Status::Warn) {
                    eprintln!("warning: {} on {}: found {}, expected {}", r.check, r.host, r.found, r.expected);
                }
            }
            held_signal().map_err(unstarted)?;
            if args.max_restarts > 0 {
                let mm_engine = cluster.template == launch::cluster::Template::MmEngine;
                if let Some(c) = plan.recipe.checkpoint.restart_caveat(mm_engine) {
                    eprintln!("warning: --max-restarts {}: {c}", args.max_restarts);
                }
            }
            let opts = JobOptions {
                grace: args.grace,
                max_restarts: args.max_restarts,
                tee: args.tee,
                ranks: args.ranks.clone(),
                fancy: Console::stdout_is_terminal(),
                hang_timeout: args.hang_timeout,
            };
            let code = run_job(run, &plan, &cluster, &renderer, &rendered, backend, &opts)
                .map_err(|e| Failure(1, format!("error: {e}")))?;
            Ok(ExitCode::from(code.clamp(0, 255) as u8))
        }
        Command::Stop(args) => {
            let log_dir = log_dir_of(&args.log_dir, &cli.cluster)?;
            let said = launch::logs::stop_run(&log_dir, args.run.as_deref(), args.wait)
                .map_err(|e| Failure(1, format!("error: {e}")))?;
            println!("{said}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit(args) => submit(&cli, args),
        Command::Logs(args) if args.summary => {
            let log_dir = log_dir_of(&args.log_dir, &cli.cluster)?;
            let run = launch::metrics::resolve_with_metrics(&log_dir, args.run.as_deref())
                .and_then(|r| launch::metrics::summary(&r))
                .map_err(|e| Failure(1, format!("error: {e}")))?;
            print!("{run}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Plot(args) => {
            let log_dir = log_dir_of(&args.log_dir, &cli.cluster)?;
            let asked: Vec<&str> = if args.metric.is_empty() {
                vec!["loss", "tokens_per_sec"]
            } else {
                args.metric.iter().map(String::as_str).collect()
            };
            let mut metrics: Vec<&mm_spec::metrics::Metric> = Vec::new();
            for n in asked {
                let m =
                    mm_spec::metrics::metric(n).map_err(|e| Failure(EXIT_CONFIG, format!("error: --metric: {e}")))?;
                // One panel per metric, however often (or under whichever name) it was asked for.
                if !metrics.iter().any(|k| k.name == m.name) {
                    metrics.push(m);
                }
            }
            let names: Vec<&str> = metrics.iter().map(|m| m.name).collect();
            // Before reading any run: a wrong extension is a usage error.
            if let Some(out) = &args.out {
                launch::plot::format_of(out).map_err(|e| Failure(EXIT_CONFIG, format!("error: {e}")))?;
            }
            let runs = launch::plot::load_runs(&log_dir, &args.runs).map_err(|e| Failure(1, format!("error: {e}")))?;
            let out = match (&args.out, runs.as_slice()) {
                (Some(o), _) => o.clone(),
                (None, [one]) => one.dir.join("metrics.png"),
                _ => PathBuf::from("metrics.png"),
            };
            launch::plot::draw(&runs, &metrics, &out).map_err(|e| Failure(1, format!("error: {e}")))?;
            let restarts: usize = runs.iter().map(|r| r.restarts().len()).sum();
            println!(
                "{}: {} of {} run{}{}",
                out.display(),
                names.join(" and "),
                runs.len(),
                if runs.len() == 1 { "" } else { "s" },
                if restarts > 0 {
                    format!(", {restarts} restart{} marked", if restarts == 1 { "" } else { "s" })
                } else {
                    String::new()
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs(args) => {
            let log_dir = log_dir_of(&args.log_dir, &cli.cluster)?;
            let grep = args
                .grep
                .as_deref()
                .map(regex::Regex::new)
                .transpose()
                .map_err(|e| Failure(EXIT_CONFIG, format!("error: --grep: {e}")))?;
            let q = LogsQuery {
                run: args.run.clone(),
                follow: args.follow,
                rank: args.rank,
                host: args.host.clone(),
                grep,
            };
            let mut out = std::io::stdout().lock();
            show_logs(&log_dir, &q, &mut out).map_err(|e| Failure(1, format!("error: {e}")))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(_) => Ok(ExitCode::SUCCESS),
        Command::Check(args) => {
            let (cluster, _recipe, plan) = load(&cli.cluster, &args.job)?;
            // The probe travels like a launch: to each host's node agent through the backend.
            let backend = launch::exec::job::backend_for(&plan, &cluster, args.agent_path.as_deref())
                .map_err(|e| Failure(1, format!("error: {e}")))?;
            let rows = checks::run_all(backend.as_ref(), &plan, &cluster, &args.skip_checks, version)
                .map_err(|e| Failure(EXIT_CONFIG, format!("error: {e}")))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rows).expect("rows serialize"));
            } else {
                print!("{}", checks::format_table(&rows));
            }
            Ok(if rows.iter().any(|r| r.status == Status::Fail) {
                ExitCode::from(EXIT_CHECKS)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
