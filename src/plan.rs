//! The plan: a pure function of the cluster spec and the resolved recipe. It lays the ranks
//! out over the hosts (mm-spec's one layout implementation), derives the batch sizes, the
//! parallel groups and the pipeline split, and collects every problem at once so a user
//! fixes the whole file in one go. No host is contacted here.

use std::collections::BTreeMap;

use mm_spec::layout::{
    mm_engine_unsupported, split_layers, vit_pp_layers_or_default, BatchSizes, GroupKind, LayoutError, LayoutOptions,
    ParallelDims, Placement, StageLayers,
};
use mm_spec::presets::ModelPreset;
use serde::Serialize;

use crate::cluster::{Accelerator, ClusterSpec, ResolvedHost, Template};
use crate::recipe::{Recipe, SaveFormat};

pub mod memory;

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub cluster: String,
    pub cluster_name: Option<String>,
    pub accelerator: Accelerator,
    pub template: Template,
    pub world_size: usize,
    pub nnodes: usize,
    pub master_addr: String,
    /// 0: a free port is picked on the master host at launch.
    pub master_port: u16,
    /// The checked parallel sizes: render, checks and the dry run read these, never the
    /// recipe's raw numbers.
    pub dims: ParallelDims,
    pub batch: BatchSizes,
    pub recipe: Recipe,
    pub model: ModelPreset,
    pub nodes: Vec<NodePlan>,
    pub ranks: Vec<RankRow>,
    /// Group kind (tp, cp, dp, pp, dp_cp, embedding, mp) → groups of global ranks.
    pub groups: BTreeMap<String, Vec<Vec<usize>>>,
    pub llm_stages: Vec<StageLayers>,
    pub vit_stages: Vec<StageLayers>,
    /// Estimated bytes of one saved checkpoint (weights, plus optimizer state when saved).
    pub checkpoint_bytes: u64,
    /// Estimated memory per device, every pipeline stage (`memory`).
    pub memory: mm_spec::memory::MemoryEstimate,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodePlan {
    pub node_rank: usize,
    pub host: ResolvedHost,
    /// Global ranks on this node, in local-rank order.
    pub ranks: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RankRow {
    pub rank: usize,
    pub host: String,
    pub node_rank: usize,
    pub local_rank: usize,
    /// The physical device index on its host (from the host's device list).
    pub device: usize,
    pub tp: usize,
    pub cp: usize,
    pub dp: usize,
    pub pp: usize,
}

/// Every reason the plan cannot be made, each a full sentence with a fix.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanError {
    pub problems: Vec<String>,
    /// The layout does not fit the model or the cluster (exit 3); false when the model itself
    /// could not be read (a configuration error, exit 2).
    pub layout: bool,
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.problems.len();
        writeln!(f, "the job cannot be laid out on this cluster ({n} problem{}):", if n == 1 { "" } else { "s" })?;
        for (i, p) in self.problems.iter().enumerate() {
            write!(f, "  {}. {p}", i + 1)?;
            if i + 1 < n {
                writeln!(f)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for PlanError {}

impl Plan {
    pub fn build(cluster: &ClusterSpec, recipe: &Recipe) -> Result<Plan, PlanError> {
        let mut problems = Vec::new();
        let model = crate::recipe::model_architecture(&recipe.model)
            .map_err(|e| PlanError { problems: vec![e], layout: false })?;
        let hosts = cluster.hosts_resolved();
        let slots: Vec<usize> = hosts.iter().map(|h| h.devices.len()).collect();
        let world: usize = slots.iter().sum();
        let p = &recipe.parallel;
        // How many problems are the layout's (the parallel sizes against the cluster and the
        // model): only then is the refusal exit 3; anything else is configuration (exit 2).
        let mut layout_problems = 0;
        let fail = |problems: Vec<String>, layout_problems: usize| {
            let layout = layout_problems == problems.len();
            PlanError { problems, layout }
        };

        let dims = match ParallelDims::new(world, p.tp, p.cp, p.pp, p.vpp) {
            Ok(d) => d,
            Err(e) => {
                problems.push(with_context(&e, recipe, world));
                return Err(fail(problems, 1));
            }
        };
        let placement = Placement::new(dims, &slots);
        if let Err(e) = &placement {
            problems.push(e.to_string());
            layout_problems += 1;
        }

        let t = &recipe.train;
        // A recipe says how big a step is; the engines' fallback (one micro batch per rank) is
        // never what a fine-tune wants.
        let batch = match (t.global_batch_size, t.grad_accumulation) {
            (None, None) => {
                problems.push("set train.global_batch_size or train.grad_accumulation".into());
                None
            }
            (gbs, gas) => match BatchSizes::derive(t.micro_batch_size, gbs, gas, dims.dp()) {
                Ok(b) => Some(b),
                Err(e) => {
                    problems.push(format!("train.{e}"));
                    None
                }
            },
        };
        // (On NPUs the template itself is refused below.)
        if cluster.template == Template::MmEngine && cluster.accelerator != Accelerator::Npu {
            let vit_chunks = p.vit_pp_layers.as_deref().unwrap_or(&[]);
            let unsupported = mm_engine_unsupported(dims.cp(), Some(&p.context_parallel_algo), vit_chunks);
            if !unsupported.is_empty() {
                let what: Vec<String> = unsupported.iter().map(|u| format!("{} {}", u.key, u.value)).collect();
                let fix: Vec<String> = unsupported
                    .iter()
                    .map(|u| match u.key {
                        "parallel.vit_pp_layers" => format!("{}=null", u.key),
                        "parallel.context_parallel_algo" => format!("{}={}", u.key, mm_spec::layout::MM_ENGINE_CP_ALGO),
                        _ => format!("{}=1", u.key),
                    })
                    .collect();

                let fix: Vec<String> = fix.iter().map(|f| format!("--set {f}")).collect();
                problems.push(format!(
                    "the mm-engine template cannot run this layout ({}): {}; run it with `{}`, or set \
                     `template: mindspeed-mm-torchrun` in the cluster file to run it with MindSpeed-MM",
                    what.join(", "),
                    mm_spec::layout::MM_ENGINE_LIMITS,
                    fix.join(" ")
                ));
            }
        }
        if crate::recipe::is_model_folder(&recipe.model) && cluster.template != Template::MmEngine {
            problems.push(format!(
                "finetune {}: a checkpoint folder as MODEL plans for mm-engine; MindSpeed-MM loads its own \
                 converted checkpoints: name the preset (e.g. `finetune 8b`) and set checkpoint.load to the folder \
                 `mm-convert hf-to-mm --format mindspeed` wrote",
                recipe.model
            ));
        }
        // Only what the launching machine can read, and means the same path there as on the
        // hosts (absolute, or relative with no workdir); located once for both checks.
        let load = recipe.checkpoint.load.as_deref().filter(|l| l.is_absolute() || cluster.workdir.is_none());
        let located = load.filter(|l| l.is_dir()).and_then(|l| mm_spec::checkpoint::locate(l).ok().map(|x| (l, x)));
        // A folder that is no checkpoint of ours (a MindSpeed-MM save) is left to the engine.
        if let Some((load, located)) = located.as_ref().filter(|(l, _)| *l != std::path::Path::new(&recipe.model)) {
            if let Ok(arch) = located.architecture(&model.name) {
                let diff = mm_spec::checkpoint::architecture_differences(&model, &arch);
                if !diff.is_empty() {
                    problems.push(format!(
                        "checkpoint.load {} holds another model than `{}` ({}): plan with the checkpoint's own \
                         architecture (`finetune {}`), or load a checkpoint of `{}`",
                        load.display(),
                        recipe.model,
                        diff.join(", "),
                        load.display(),
                        recipe.model
                    ));
                }
            }
        }

        let vit_layers =
            vit_pp_layers_or_default(p.vit_pp_layers.as_deref(), model.vision.num_hidden_layers, dims.pp(), dims.vpp());
        let opts = LayoutOptions {
            llm_pp_layers: p.llm_pp_layers.clone(),
            vit_pp_layers: Some(vit_layers.clone()),
            seq_length: t.seq_length,
            sequence_parallel: p.sequence_parallel,
            unaligned_linear: p.unaligned_linear,
            micro_batch_size: t.micro_batch_size,
            global_batch_size: None,
            grad_accumulation: None,
        };
        let misfits = mm_spec::layout::validate_model_layout(&model, &dims, &opts);
        layout_problems += misfits.len();
        problems.extend(misfits.iter().map(|e| e.to_string()));
        if p.sequence_parallel && !p.unaligned_linear && cluster.template != Template::MmEngine {
            // The seed: "开启TP-SP需要添加 --unaligned-linear --sequence-parallel".
            problems.push(
                "sequence_parallel with the MindSpeed-MM templates needs unaligned_linear as well (the seed adds \
                 --unaligned-linear with --sequence-parallel for InternVL): --set parallel.unaligned_linear=true"
                    .into(),
            );
        }
        if cluster.template == Template::MmEngine
            && recipe.checkpoint.save_format == Some(SaveFormat::Torch)
            && dims.tp() > 1
        {
            problems.push(format!(
                "checkpoint.save_format torch with parallel.tp {}: MindSpeed-MM splits the vocabulary, projector and \
                 ViT heads differently from mm-engine's tensor-parallel ranks; save mm-engine's format (remove the \
                 setting) and convert with `mm-convert mm-to-hf` then `hf-to-mm --format mindspeed`",
                dims.tp()
            ));
        }
        if cluster.template != Template::MmEngine && recipe.checkpoint.save_format == Some(SaveFormat::Mm) {
            problems.push(
                "checkpoint.save_format mm: MindSpeed-MM saves its own torch files only; remove the setting (or \
                 set it to torch), or use `template: mm-engine`"
                    .into(),
            );
        }
        if cluster.template != Template::MmEngine && recipe.output.peak_tflops.is_some() {
            problems.push(
                "output.peak_tflops: only mm-engine reports MFU; MindSpeed-MM prints its own throughput \
                 (Megatron's --log-throughput); remove the setting, or use `template: mm-engine`"
                    .into(),
            );
        }
        if cluster.accelerator == Accelerator::Npu && cluster.template == Template::MmEngine {
            problems.push(
                "accelerator npu runs through MindSpeed-MM: set `template: mindspeed-mm-torchrun` (or \
                 mindspeed-mm-msrun) in the cluster file; mm-engine runs on CPUs and CUDA GPUs"
                    .into(),
            );
        }
        if cluster.accelerator == Accelerator::Cpu && recipe.train.precision != crate::recipe::Precision::Fp32 {
            let name = serde_json::to_value(recipe.train.precision).ok().and_then(|v| v.as_str().map(String::from));
            problems.push(format!(
                "precision {} on CPU: libtorch's CPU kernels train in fp32; --set train.precision=fp32",
                name.unwrap_or_default()
            ));
        }

        let llm_stages = split_layers(model.llm.num_hidden_layers, dims.pp(), dims.vpp(), p.llm_pp_layers.as_deref());
        let vit_stages = split_layers(model.vision.num_hidden_layers, dims.pp(), dims.vpp(), Some(&vit_layers));

        // Megatron's uniform method checkpoints layers start..start+N of a chunk without
        // clamping: N must divide every chunk's layer count there (mm-engine clamps).
        if let (Ok(llm), Some(mm_spec::recompute::Recompute::FullUniform(n)), true) =
            (&llm_stages, recipe.train.recompute_setting().ok().flatten(), cluster.template != Template::MmEngine)
        {
            if llm.iter().any(|s| s.num_layers % n != 0) {
                let counts: Vec<String> = llm.iter().map(|s| s.num_layers.to_string()).collect();
                problems.push(format!(
                    "train.recompute_num_layers {n} with the uniform method: Megatron needs it to divide every \
                     pipeline chunk's layer count ({}); pick a divisor, e.g. --set train.recompute_num_layers=1",
                    counts.join(",")
                ));
                layout_problems += 1;
            }
        }
        if let (Ok(llm), Ok(vit)) = (&llm_stages, &vit_stages) {
            if let Some((load, located)) = &located {
                let tokenizer = recipe.checkpoint.tokenizer.as_deref();
                problems.extend(load_format_problem(cluster.template, load, tokenizer, located, &dims, llm, vit));
            }
        }

        let (Ok(placement), Some(batch), Ok(llm_stages), Ok(vit_stages), true) =
            (placement, batch, llm_stages, vit_stages, problems.is_empty())
        else {
            if problems.is_empty() {
                problems.push("the pipeline split failed; check parallel.llm_pp_layers and vit_pp_layers".into());
                layout_problems += 1;
            }
            return Err(fail(problems, layout_problems));
        };

        let nodes: Vec<NodePlan> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| NodePlan {
                node_rank: i,
                host: h.clone(),
                ranks: placement.ranks_on(i).iter().map(|r| r.rank).collect(),
            })
            .collect();
        let ranks: Vec<RankRow> = placement
            .places()
            .iter()
            .map(|pl| RankRow {
                rank: pl.rank,
                host: hosts[pl.node_rank].name.clone(),
                node_rank: pl.node_rank,
                local_rank: pl.local_rank,
                device: hosts[pl.node_rank].devices[pl.local_rank],
                tp: pl.coord.tp,
                cp: pl.coord.cp,
                dp: pl.coord.dp,
                pp: pl.coord.pp,
            })
            .collect();
        let groups = [
            ("tp", GroupKind::Tp),
            ("cp", GroupKind::Cp),
            ("dp", GroupKind::Dp),
            ("pp", GroupKind::Pp),
            ("dp_cp", GroupKind::DpCp),
            ("embedding", GroupKind::Embedding),
            ("mp", GroupKind::Mp),
        ]
        .into_iter()
        .map(|(name, kind)| (name.to_string(), dims.groups(kind)))
        .collect();

        let dtype_bytes = if recipe.train.precision == crate::recipe::Precision::Fp32 { 4 } else { 2 };
        let mut checkpoint_bytes = model.checkpoint_bytes(dtype_bytes);
        if !recipe.checkpoint.no_save_optim {
            // fp32 master weights (when training in 16 bit) and two fp32 Adam moments.
            let params = model.param_counts().total;
            checkpoint_bytes += params * if dtype_bytes == 2 { 12 } else { 8 };
        }

        let mut plan = Plan {
            cluster: cluster.origin.display().to_string(),
            cluster_name: cluster.name.clone(),
            accelerator: cluster.accelerator,
            template: cluster.template,
            world_size: world,
            nnodes: nodes.len(),
            master_addr: cluster.master.addr.clone(),
            master_port: cluster.master.port,
            dims,
            batch,
            recipe: recipe.clone(),
            model,
            nodes,
            ranks,
            groups,
            llm_stages,
            vit_stages,
            checkpoint_bytes,
            memory: mm_spec::memory::MemoryEstimate { stages: Vec::new() },
        };
        plan.memory = memory::estimate(&plan);
        Ok(plan)
    }
}

/// The checkpoint format the template's engine loads against what `checkpoint.load` holds
/// (located by the plan when the launching machine can read it): mm-engine loads ours, HF
/// folders and MindSpeed-MM's torch files (given a config.json: `tokenizer`'s folder or the
/// save's hf_assets/), MindSpeed-MM only its own torch files. The fix is the conversion
/// command, with this plan's split.
fn load_format_problem(
    template: Template,
    load: &std::path::Path,
    tokenizer: Option<&std::path::Path>,
    located: &mm_spec::checkpoint::Located,
    dims: &ParallelDims,
    llm: &[StageLayers],
    vit: &[StageLayers],
) -> Option<String> {
    use mm_spec::checkpoint::{Located, HF_ASSETS_DIR};
    let list = |s: &[StageLayers]| s.iter().map(|s| s.num_layers.to_string()).collect::<Vec<_>>().join(",");
    let split = format!(
        "--tp {}{} --llm-pp-layers {} --vit-pp-layers {}",
        dims.tp(),
        dims.vpp().map(|v| format!(" --vpp {v}")).unwrap_or_default(),
        list(llm),
        list(vit)
    );
    let l = load.display();
    match (template, located) {
        // MindSpeed-MM's files carry no config.json: mm-engine reads it from the save's
        // hf_assets/ (its own --ckpt-format torch saves) or from the tokenizer folder.
        (Template::MmEngine, Located::MindSpeed { iter_dir })
            if tokenizer.is_none() && !iter_dir.join(HF_ASSETS_DIR).join("config.json").is_file() =>
        {
            Some(format!(
                "checkpoint.load {l} holds MindSpeed-MM's torch files, which carry no config.json: set \
                 checkpoint.tokenizer to the HF folder they were converted from (mm-engine reads the architecture \
                 and the tokenizer there): --set checkpoint.tokenizer=<HF folder>"
            ))
        }
        (Template::MindspeedMmTorchrun | Template::MindspeedMmMsrun, Located::Hf { .. }) => Some(format!(
            "checkpoint.load {l} is an HF folder; MindSpeed-MM loads its converted checkpoints: `mm-convert hf-to-mm \
             --format mindspeed --hf-dir {l} --mm-dir {l}-mm {split}`, then load {l}-mm"
        )),
        (Template::MindspeedMmTorchrun | Template::MindspeedMmMsrun, Located::Mm { .. }) => Some(format!(
            "checkpoint.load {l} is in mm-engine's layout; MindSpeed-MM loads its own torch files: `mm-convert \
             mm-to-hf --mm-dir {l} --hf-dir {l}-hf`, then `mm-convert hf-to-mm --format mindspeed --hf-dir {l}-hf \
             --mm-dir {l}-mindspeed {split}`, and load {l}-mindspeed"
        )),
        _ => None,
    }
}

/// Layout errors that happen before anything else get the recipe's numbers as context.
fn with_context(e: &LayoutError, recipe: &Recipe, world: usize) -> String {
    format!(
        "{e} (recipe `{}`: tp {} cp {} pp {} on {world} devices; change them with --set parallel.tp=N etc.)",
        recipe.model, recipe.parallel.tp, recipe.parallel.cp, recipe.parallel.pp
    )
}
