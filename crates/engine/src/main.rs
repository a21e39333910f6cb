//! The mm-engine binary: thin CLI over the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mm_engine::cli;
use mm_engine::dist::{env::DistEnv, flight, selftest, tp_check};
use mm_engine::eval::EvalArgs;
use mm_engine::synth::SynthArgs;
use mm_engine::train::args::TrainArgs;
use mm_engine::train::stop::Stopped;

#[derive(Parser)]
#[command(
    name = "mm-engine",
    version,
    about = "InternVL3 fine-tuning engine on libtorch (tch) with c10d collectives",
    after_help = mm_engine::cli::EXIT_CODES_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune InternVL3 (Megatron/MindSpeed flag names, as the launcher renders them);
    /// data parallel over WORLD_SIZE ranks started with the torchrun environment.
    Train(Box<TrainArgs>),
    /// Loss of a checkpoint on a data set, per sample and in total, without training.
    Eval(Box<EvalArgs>),
    /// Write a tiny InternVL3-shaped checkpoint with tokenizer and a synthetic data set.
    Synth(SynthArgs),
    /// Report the libtorch version, CUDA/NCCL availability, and check a CPU tensor.
    Doctor {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Rendezvous through RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT and verify every
    /// collective (all-reduce, broadcast, all-gather, reduce-scatter, send/recv, barrier);
    /// with --tp/--pp/--cp also every tp/cp/dp/pp/dp_cp group of that layout.
    CollectiveCheck {
        /// cpu (Gloo) or cuda (NCCL, device LOCAL_RANK).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Size of the all-reduce used to measure bandwidth.
        #[arg(long, default_value_t = 16 << 20)]
        bytes: usize,
        /// Tensor-parallel size of a layout whose groups to check too (with --pp/--cp; dp is
        /// WORLD_SIZE / (tp·cp·pp)). Without any of the three only the world group is checked.
        #[arg(long)]
        tp: Option<usize>,
        /// Pipeline-parallel size of the layout to check (see --tp).
        #[arg(long)]
        pp: Option<usize>,
        /// Context-parallel size of the layout to check (see --tp).
        #[arg(long)]
        cp: Option<usize>,
    },
    /// Rendezvous like collective-check and verify the tensor-parallel regions (column/row
    /// parallel MLP, uneven gather/scatter of the last dim, sequence-parallel gather and
    /// reduce-scatter) against the same computation in one process, forward and backward, in
    /// f32 and f64. Prints a JSON report; fails when any check exceeds its tolerance.
    TpCheck {
        /// cpu (Gloo) or cuda (NCCL, device LOCAL_RANK).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

/// Exit codes (`mm_engine::cli`, shared with launch and mm-convert): 0 done, 1 a runtime
/// error, 2 a usage or configuration error (clap's syntax errors, and `cli::UsageError`s such as
/// "invalid train flags"), 128 + N an agreed stop on signal N (143 SIGTERM, 130 SIGINT, 138
/// SIGUSR1: `train` saved the iteration it stopped after and did not reach --train-iters).
fn main() -> ExitCode {
    let mut args = Cli::parse();
    if let Command::Eval(a) = &mut args.command {
        // The flag the data path came through, for messages (--data is --data-path's alias).
        if std::env::args().any(|x| x == "--data" || x.starts_with("--data=")) {
            a.data_flag = "--data".into();
        }
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<Stopped>() {
            Some(stopped) => {
                eprintln!("mm-engine: {stopped}");
                ExitCode::from(stopped.exit_code())
            }
            None => {
                eprintln!("mm-engine: error: {e:#}");
                ExitCode::from(cli::exit_code(&e))
            }
        },
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(a) => mm_engine::train::trainer::run(*a)?,
        Command::Eval(a) => {
            mm_engine::eval::run(*a)?;
        }
        Command::Synth(a) => mm_engine::synth::run(a)?,
        Command::Doctor { json } => {
            let d = mm_engine::doctor::collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                println!("{d}");
            }
            anyhow::ensure!(d.cpu_tensor_ok, "libtorch could not compute on the CPU");
        }
        Command::CollectiveCheck { device, bytes, tp, pp, cp } => {
            let env = DistEnv::from_process()?;
            flight::init(env.rank);
            let dims = if tp.is_some() || pp.is_some() || cp.is_some() {
                let (tp, pp, cp) = (tp.unwrap_or(1), pp.unwrap_or(1), cp.unwrap_or(1));
                let dims = mm_spec::layout::ParallelDims::new(env.world_size, tp, cp, pp, None).map_err(|e| {
                    cli::LayoutError(format!(
                        "rank {}: --tp {tp} --pp {pp} --cp {cp} with WORLD_SIZE {}: {e}",
                        env.rank, env.world_size
                    ))
                })?;
                Some(dims)
            } else {
                None
            };
            let device = check_device(&device, &env)?;
            let report = selftest::run(&env, device, bytes, dims);
            flight::flush();
            println!("{}", serde_json::to_string(&report?)?);
        }
        Command::TpCheck { device } => {
            let env = DistEnv::from_process()?;
            flight::init(env.rank);
            let report = tp_check::run(&env, check_device(&device, &env)?);
            flight::flush();
            let report = report?;
            println!("{}", serde_json::to_string(&report)?);
            report.verdict()?;
        }
    }
    Ok(())
}

/// The --device of the check subcommands: cpu, or cuda (device LOCAL_RANK).
fn check_device(device: &str, env: &DistEnv) -> anyhow::Result<tch::Device> {
    match device {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => {
            anyhow::ensure!(tch::Cuda::is_available(), "--device cuda: no CUDA device is visible");
            Ok(tch::Device::Cuda(env.local_rank))
        }
        other => cli::usage(format!("--device {other:?}: expected cpu or cuda")),
    }
}
