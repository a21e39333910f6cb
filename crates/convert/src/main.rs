//! The `mm-convert` command line: argument parsing and exit codes only; the work is in the
//! library.
//!
//! Exit codes: 0 success; 1 the checkpoint or a file is wrong (message on stderr); 2 usage
//! error; 3 `inspect`: the checkpoint does not fit the given recipe.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use mm_convert::inspect::fmt_bytes;
use mm_convert::synth::{write_synthetic, SynthSpec};
use mm_convert::{alias, parse_list, parse_size, HfToMm, InspectOptions, MmToHf, Summary, DEFAULT_MAX_SHARD_BYTES};
use mm_spec::{preset, DType, HfLayout, LayoutRequest};

const AFTER_HELP: &str = "The seed's spelling works too:\n  mm-convert InternVLConverter hf_to_mm --cfg.mm_dir DIR \
--cfg.hf_config.hf_dir DIR --cfg.parallel_config.llm_pp_layers [[6,8,8,6]] --cfg.parallel_config.vit_pp_layers \
[[24,0,0,0]] --cfg.parallel_config.tp_size 1 --cfg.trust_remote_code True\n\nExit codes (as launch and mm-engine): 0 ok, \
1 bad checkpoint or I/O error, 2 usage or configuration error (bad flags, an existing output without --force), \
3 the layout does not fit the model (or, for inspect, the recipe).";

#[derive(Parser)]
#[command(name = "mm-convert", version, about = "InternVL3 checkpoints between HF and the MM (tp/pp split) layout, streamed", after_help = AFTER_HELP)]
struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Split an HF checkpoint (either InternVL3 layout) into the MM layout.
    HfToMm(HfToMmArgs),
    /// Gather an MM checkpoint back into a folder transformers loads.
    MmToHf(MmToHfArgs),
    /// Show what a checkpoint (HF or MM) holds and whether it fits a layout.
    Inspect(InspectArgs),
    /// Write a synthetic checkpoint with seeded random weights (tests, benchmark).
    #[command(hide = true)]
    SynthHf(SynthArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    Bf16,
    Fp16,
    Fp32,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> DType {
        match d {
            DTypeArg::Bf16 => DType::BF16,
            DTypeArg::Fp16 => DType::F16,
            DTypeArg::Fp32 => DType::F32,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LayoutArg {
    /// OpenGVLab's layout (vision_model.*, mlp1.*, language_model.model.*).
    Original,
    /// transformers-native as on the hub (vision_tower.*, multi_modal_projector.*, language_model.model.*).
    Hf,
    /// transformers-native with the model. prefix (model.vision_tower.*, …, lm_head.weight).
    HfPrefixed,
}

impl From<LayoutArg> for HfLayout {
    fn from(l: LayoutArg) -> HfLayout {
        match l {
            LayoutArg::Original => HfLayout::Original,
            LayoutArg::Hf => HfLayout::Hf,
            LayoutArg::HfPrefixed => HfLayout::HfPrefixed,
        }
    }
}

#[derive(clap::Args)]
struct HfToMmArgs {
    /// The HF checkpoint folder (config.json, model.safetensors or an index with shards).
    #[arg(long)]
    hf_dir: PathBuf,
    /// The MM save dir to create.
    #[arg(long)]
    mm_dir: PathBuf,
    /// LLM layers per pipeline chunk in model order (pp × vpp entries), e.g. 6,8,8,6; uniform when omitted.
    #[arg(long, value_parser = parse_list)]
    llm_pp_layers: Option<std::vec::Vec<usize>>,
    /// ViT layers per pipeline chunk in model order, e.g. 24,0,0,0; all on the first chunk when omitted.
    #[arg(long, value_parser = parse_list)]
    vit_pp_layers: Option<std::vec::Vec<usize>>,
    /// Tensor-parallel size.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Pipeline-parallel size (default: the layer list's length / vpp).
    #[arg(long)]
    pp: Option<usize>,
    /// Virtual pipeline stages per pp rank (interleaved schedule).
    #[arg(long)]
    vpp: Option<usize>,
    /// Convert every tensor to this dtype (default: keep each tensor's dtype).
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    /// Allow heads and widths that tp does not divide (MindSpeed's --unaligned-linear).
    #[arg(long)]
    unaligned_linear: bool,
    /// Pad the vocabulary to a multiple of this × tp (Megatron's default 128).
    #[arg(long)]
    make_vocab_size_divisible_by: Option<usize>,
    /// Replace an existing --mm-dir (only once the new checkpoint is complete).
    #[arg(long)]
    force: bool,
    /// Output files written in parallel (default: available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Checkpoint layout to write: ours (mp_rank_*/model.safetensors + manifest, for mm-engine) or
    /// MindSpeed-MM's Megatron torch files (mp_rank_*/model_optim_rng.pt, for pretrain_vlm.py).
    #[arg(long, value_enum, default_value_t = FormatArg::Mm)]
    format: FormatArg,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FormatArg {
    /// mp_rank_*/model.safetensors with manifest.json (mm-engine).
    Mm,
    /// mp_rank_*/model_optim_rng.pt, torch.save files (MindSpeed-MM's pretrain_vlm.py).
    Mindspeed,
}

#[derive(clap::Args)]
struct MmToHfArgs {
    /// The MM save dir (its latest_checkpointed_iteration.txt picks the iteration) or an iteration folder.
    #[arg(long)]
    mm_dir: PathBuf,
    /// Export this training iteration instead of the latest.
    #[arg(long)]
    iteration: Option<u64>,
    /// The HF folder to create.
    #[arg(long)]
    hf_dir: PathBuf,
    /// Key layout of the export (default: the layout the checkpoint was converted from).
    #[arg(long, value_enum)]
    layout: Option<LayoutArg>,
    /// Convert every tensor to this dtype (default: keep).
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    /// Largest safetensors shard (transformers' max_shard_size).
    #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_MAX_SHARD_BYTES)]
    max_shard_size: u64,
    /// Replace an existing --hf-dir (only once the new folder is complete).
    #[arg(long)]
    force: bool,
    /// Output files written in parallel (default: available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Copy config.json and tokenizer files from this folder instead of the checkpoint's hf_assets/.
    #[arg(long)]
    assets_from: Option<PathBuf>,
    #[arg(long, hide = true)]
    expect_tp: Option<usize>,
    #[arg(long, hide = true, value_parser = parse_list)]
    expect_llm_pp_layers: Option<std::vec::Vec<usize>>,
    #[arg(long, hide = true, value_parser = parse_list)]
    expect_vit_pp_layers: Option<std::vec::Vec<usize>>,
}

#[derive(clap::Args)]
struct InspectArgs {
    /// A checkpoint folder: HF (config.json + safetensors) or MM (save dir or iteration folder).
    dir: PathBuf,
    /// MM: inspect this iteration instead of the latest.
    #[arg(long)]
    iteration: Option<u64>,
    /// Check against this tensor-parallel size.
    #[arg(long)]
    recipe_tp: Option<usize>,
    /// Check against this pipeline-parallel size.
    #[arg(long)]
    recipe_pp: Option<usize>,
    /// Check against this many virtual pipeline stages.
    #[arg(long)]
    recipe_vpp: Option<usize>,
    /// Check against this LLM layer split.
    #[arg(long, value_parser = parse_list)]
    llm_pp_layers: Option<std::vec::Vec<usize>>,
    /// Check against this ViT layer split.
    #[arg(long, value_parser = parse_list)]
    vit_pp_layers: Option<std::vec::Vec<usize>>,
    /// The recipe uses --unaligned-linear.
    #[arg(long)]
    unaligned_linear: bool,
    /// List every tensor.
    #[arg(long)]
    tensors: bool,
}

#[derive(clap::Args)]
struct SynthArgs {
    #[arg(long)]
    out: PathBuf,
    /// Architecture preset (tiny, tiny6b, 1b … 78b).
    #[arg(long, default_value = "tiny")]
    preset: String,
    #[arg(long)]
    llm_layers: Option<usize>,
    #[arg(long)]
    vit_layers: Option<usize>,
    #[arg(long)]
    vocab: Option<usize>,
    #[arg(long, value_enum, default_value = "original")]
    layout: LayoutArg,
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DTypeArg,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Shard the checkpoint (with an index) at this size; one model.safetensors when omitted.
    #[arg(long, value_parser = parse_size)]
    max_shard_size: Option<u64>,
}

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    if alias::is_seed_spelling(&args) {
        match alias::translate(&args) {
            Ok(a) => args = a,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let cli = Cli::parse_from(args);
    init_tracing(cli.verbose);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(e.downcast_ref::<mm_convert::ConvertError>().map_or(1, mm_convert::ConvertError::exit_code))
        }
    }
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal, and never with NO_COLOR set (no escape codes in a pipe or log).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(colour)
        .try_init();
}

fn report(s: &Summary) {
    let rate = s.bytes as f64 / s.seconds.max(1e-9);
    println!(
        "wrote {}: {} files, {} tensors, {} in {:.2} s ({}/s)",
        s.out_dir.display(),
        s.files,
        s.tensors,
        fmt_bytes(s.bytes),
        s.seconds,
        fmt_bytes(rate as u64)
    );
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::HfToMm(a) => {
            let o = HfToMm {
                format: match a.format {
                    FormatArg::Mm => mm_convert::OutputFormat::Mm,
                    FormatArg::Mindspeed => mm_convert::OutputFormat::Mindspeed,
                },
                hf_dir: a.hf_dir,
                mm_dir: a.mm_dir,
                layout: LayoutRequest {
                    tp: a.tp,
                    pp: a.pp,
                    vpp: a.vpp,
                    llm_pp_layers: a.llm_pp_layers,
                    vit_pp_layers: a.vit_pp_layers,
                    unaligned_linear: a.unaligned_linear,
                    make_vocab_size_divisible_by: a.make_vocab_size_divisible_by,
                },
                dtype: a.dtype.map(DType::from),
                force: a.force,
                threads: a.threads,
            };
            report(&mm_convert::hf_to_mm(&o)?);
        }
        Command::MmToHf(a) => {
            let expect = (a.expect_tp.is_some()
                || a.expect_llm_pp_layers.is_some()
                || a.expect_vit_pp_layers.is_some())
            .then(|| LayoutRequest {
                tp: a.expect_tp.unwrap_or(1),
                llm_pp_layers: a.expect_llm_pp_layers,
                vit_pp_layers: a.expect_vit_pp_layers,
                ..LayoutRequest::default()
            });
            let o = MmToHf {
                mm_dir: a.mm_dir,
                iteration: a.iteration,
                hf_dir: a.hf_dir,
                layout: a.layout.map(HfLayout::from),
                dtype: a.dtype.map(DType::from),
                max_shard_bytes: a.max_shard_size,
                force: a.force,
                threads: a.threads,
                assets_from: a.assets_from,
                expect,
            };
            report(&mm_convert::mm_to_hf(&o)?);
        }
        Command::Inspect(a) => {
            let any_recipe = a.recipe_tp.is_some()
                || a.recipe_pp.is_some()
                || a.recipe_vpp.is_some()
                || a.llm_pp_layers.is_some()
                || a.vit_pp_layers.is_some()
                || a.unaligned_linear;
            let recipe = any_recipe.then(|| LayoutRequest {
                tp: a.recipe_tp.unwrap_or(1),
                pp: a.recipe_pp,
                vpp: a.recipe_vpp,
                llm_pp_layers: a.llm_pp_layers,
                vit_pp_layers: a.vit_pp_layers,
                unaligned_linear: a.unaligned_linear,
                make_vocab_size_divisible_by: None,
            });
            let r = mm_convert::inspect(&InspectOptions {
                dir: a.dir,
                iteration: a.iteration,
                recipe,
                tensors: a.tensors,
            })?;
            print!("{}", r.text);
            if !r.problems.is_empty() {
                eprintln!("error: the checkpoint has {} problem(s):", r.problems.len());
                for p in &r.problems {
                    eprintln!("  - {p}");
                }
                return Ok(ExitCode::from(1));
            }
            if r.fits == Some(false) {
                return Ok(ExitCode::from(3));
            }
        }
        Command::SynthHf(a) => {
            let mut arch = preset(&a.preset)?;
            if let Some(n) = a.llm_layers {
                arch.llm.num_hidden_layers = n;
            }
            if let Some(n) = a.vit_layers {
                arch.vision.num_hidden_layers = n;
            }
            if let Some(v) = a.vocab {
                arch.llm.vocab_size = v;
            }
            arch.validate()?;
            let mut spec = SynthSpec::new(arch, a.layout.into());
            spec.dtype = a.dtype.into();
            spec.seed = a.seed;
            spec.max_shard_bytes = a.max_shard_size;
            let bytes = write_synthetic(&a.out, &spec)?;
            println!("wrote {}: {}", a.out.display(), fmt_bytes(bytes));
        }
    }
    Ok(ExitCode::SUCCESS)
}
