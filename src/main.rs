//! The `launch` binary: CLI parsing and exit codes only; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use launch::checks::{self, Status};
use launch::cluster::ClusterSpec;
use launch::dryrun;
use launch::plan::Plan;
use launch::recipe::Recipe;
use launch::render::Renderer;

/// Exit codes (documented in the README).
const EXIT_CONFIG: u8 = 2;
const EXIT_CHECKS: u8 = 3;

#[derive(Parser)]
#[command(
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
}

#[derive(Args)]
struct JobArgs {
    /// tiny, 1b, 2b, 8b, 14b, 38b or 78b (InternVL3-8B spelling works too).
    model: String,
    /// YAML file overriding any recipe field (train.lr, parallel.tp, data.data_path, ...).
    #[arg(long, value_name = "FILE")]
    recipe: Option<PathBuf>,
    /// Override one recipe field, e.g. --set train.lr=1e-5 --set parallel.llm_pp_layers=[7,7,7,7].
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    for w in &cluster.warnings {
        eprintln!("warning: {w}");
    }
    let recipe = Recipe::resolve(&job.model, Some((&cluster.job, &cluster.origin)), job.recipe.as_deref(), &job.sets)
        .map_err(config)?;
    let plan = Plan::build(&cluster, &recipe).map_err(config)?;
    Ok((cluster, recipe, plan))
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
            let rows = checks::run_all(&plan, &cluster, &args.skip_checks, version);
            if rows.iter().any(|r| r.status == Status::Fail) {
                eprint!("{}", checks::format_table(&rows));
                return Err(Failure(
                    EXIT_CHECKS,
                    "error: environment checks failed (fix them, or skip one with --skip-check ID)".into(),
                ));
            }
            Err(Failure(
                1,
                "error: starting ranks is not built yet in this version: use --dry-run to see the exact \
                 commands per host (execution over SSH lands with the launcher's execute stage)"
                    .into(),
            ))
        }
        Command::Check(args) => {
            let (cluster, _recipe, plan) = load(&cli.cluster, &args.job)?;
            let rows = checks::run_all(&plan, &cluster, &args.skip_checks, version);
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
