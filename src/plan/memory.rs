//! The plan's per-device memory estimate (`mm_spec::memory`, formulas documented there) and,
//! when it exceeds a device, the recipe changes that would fit, each as the `--set` flags to
//! type and the estimate it gives.

use mm_spec::memory::{MemoryEstimate, MemoryInput, Recompute};
use mm_spec::{human_bytes, ModelPreset};

use super::Plan;
use crate::cluster::Template;
use crate::recipe::Precision;

/// The share of a device's memory a run may plan to use: the rest goes to the runtime
/// (CUDA/CANN context), the allocator's fragmentation and the collectives' buffers.
pub const USABLE_FRACTION: f64 = 0.9;

/// What a variant changes in the plan's layout.
#[derive(Debug, Clone, Copy)]
struct Knobs {
    pp: usize,
    cp: usize,
    dp: usize,
    /// Micro batches per step: the global batch over micro batch × dp.
    grad_accumulation: usize,
    recompute: Option<Recompute>,
    distributed_optimizer: bool,
}

impl Knobs {
    /// `self` with `dp` halved (pp or cp doubled), the global batch kept.
    fn halve_dp(self, plan: &Plan) -> Knobs {
        let dp = self.dp / 2;
        let grad_accumulation = plan.batch.global_batch_size / (plan.batch.micro_batch_size * dp.max(1)).max(1);
        Knobs { dp, grad_accumulation, ..self }
    }
}

fn knobs(plan: &Plan) -> Knobs {
    let d = &plan.dims;
    Knobs {
        pp: d.pp(),
        cp: d.cp(),
        dp: d.dp(),
        grad_accumulation: plan.batch.grad_accumulation,
        recompute: plan.recipe.train.recompute_setting().ok().flatten(),
        distributed_optimizer: plan.recipe.parallel.distributed_optimizer,
    }
}

fn input<'a>(plan: &'a Plan, model: &'a ModelPreset, chunks: &'a [usize], k: Knobs) -> MemoryInput<'a> {
    let r = &plan.recipe;
    let t = &r.train;
    let tiles = r.data.max_dynamic_patch + usize::from(r.data.use_thumbnail && r.data.max_dynamic_patch > 1);
    MemoryInput {
        model,
        tp: plan.dims.tp(),
        cp: k.cp,
        pp: k.pp,
        dp: k.dp,
        vpp: plan.dims.vpp().unwrap_or(1),
        llm_chunks: chunks,
        micro_batch: plan.batch.micro_batch_size,
        grad_accumulation: k.grad_accumulation,
        seq_length: t.seq_length,
        tiles_per_sample: tiles,
        element_bytes: if t.precision == Precision::Fp32 { 4 } else { 2 },
        distributed_optimizer: k.distributed_optimizer,
        sequence_parallel: r.parallel.sequence_parallel,
        recompute: k.recompute,
        freeze_vision: t.freeze_vision,
        freeze_projector: t.freeze_projector,
        freeze_llm: t.freeze_llm,
        drop_path: t.vit_drop_path_rate.unwrap_or(model.vision.drop_path_rate) > 0.0,
        vit_recompute: plan.template == Template::MmEngine,
        // mm-engine's default exchange, as the launcher renders it, is the ring.
        cp_gathers_kv: false,
    }
}

/// The plan's estimate, every pipeline rank.
pub fn estimate(plan: &Plan) -> MemoryEstimate {
    let chunks: Vec<usize> = plan.llm_stages.iter().map(|s| s.num_layers).collect();
    input(plan, &plan.model, &chunks, knobs(plan)).estimate()
}

/// The busiest device's need under `k`, or None when `k` cannot be laid out.
fn peak_with(plan: &Plan, k: Knobs) -> Option<f64> {
    let vpp = plan.dims.vpp();
    let chunks: Vec<usize> = if k.pp == plan.dims.pp() {
        plan.llm_stages.iter().map(|s| s.num_layers).collect()
    } else {
        mm_spec::layout::split_layers(plan.model.llm.num_hidden_layers, k.pp, vpp, None)
            .ok()?
            .iter()
            .map(|s| s.num_layers)
            .collect()
    };
    input(plan, &plan.model, &chunks, k).estimate().peak().map(|s| s.total)
}

/// Recipe changes that bring the busiest device under `budget` bytes, each with the flags to
/// pass and its estimate: full recomputation, the distributed optimizer, twice the pipeline
/// stages, twice the context-parallel ranks, alone, then in pairs.
/// Doubling pp or cp keeps the world size and the global batch by halving dp (so dp must be
/// even) and doubling the micro batches per step.
pub fn options_that_fit(plan: &Plan, budget: f64) -> Vec<(String, f64)> {
    let base = knobs(plan);
    let depth = plan.model.llm.num_hidden_layers;
    let mut singles: Vec<(String, Knobs)> = Vec::new();
    if base.recompute != Some(Recompute::FullUniform(1)) {
        let flags = if plan.recipe.train.recompute_granularity.is_some() {
            "--set train.recompute_granularity=full --set train.recompute_method=uniform --set train.recompute_num_layers=1"
        } else {
            "--set train.recompute=true"
        };
        singles.push((flags.into(), Knobs { recompute: Some(Recompute::FullUniform(1)), ..base }));
    }
    if !base.distributed_optimizer && base.dp * base.cp > 1 {
        singles
            .push(("--set parallel.distributed_optimizer=true".into(), Knobs { distributed_optimizer: true, ..base }));
    }
    if base.dp % 2 == 0 && 2 * base.pp * plan.dims.vpp().unwrap_or(1) <= depth {
        let pp = 2 * base.pp;
        let vit = plan.model.vision.num_hidden_layers;
        let vit_list: Vec<String> =
            (0..pp * plan.dims.vpp().unwrap_or(1)).map(|i| if i == 0 { vit.to_string() } else { "0".into() }).collect();
        singles.push((
            format!(
                "--set parallel.pp={pp} --set parallel.llm_pp_layers=null --set parallel.vit_pp_layers={}",
                vit_list.join(",")
            ),
            Knobs { pp, ..base.halve_dp(plan) },
        ));
    }
    // Twice the context-parallel ranks, where the plan would then accept them: the sequence
    // splits into 2·cp chunks, and mm-engine runs megatron_cp_algo only.
    let cp_runs = plan.template != Template::MmEngine
        || plan.recipe.parallel.context_parallel_algo == mm_spec::layout::MM_ENGINE_CP_ALGO;
    if base.dp % 2 == 0 && plan.recipe.train.seq_length % (4 * base.cp) == 0 && cp_runs {
        let cp = 2 * base.cp;
        singles.push((format!("--set parallel.cp={cp}"), Knobs { cp, ..base.halve_dp(plan) }));
    }
    let fits = |k: Knobs| peak_with(plan, k).filter(|&b| b <= budget);
    let mut out: Vec<(String, f64)> =
        singles.iter().filter_map(|(flags, k)| fits(*k).map(|b| (flags.clone(), b))).collect();
    if out.is_empty() {
        for (i, (fa, a)) in singles.iter().enumerate() {
            for (fb, b) in &singles[i + 1..] {
                let mut k = *a;
                if b.pp != base.pp {
                    k = Knobs { pp: b.pp, ..k.halve_dp(plan) };
                }
                if b.cp != base.cp {
                    k = Knobs { cp: b.cp, ..k.halve_dp(plan) };
                }
                k.recompute = if b.recompute != base.recompute { b.recompute } else { k.recompute };
                k.distributed_optimizer |= b.distributed_optimizer;
                if k.dp == 0 || plan.dims.tp() * k.pp * k.cp * k.dp != plan.world_size {
                    continue;
                }
                if let Some(need) = fits(k) {
                    out.push((format!("{fa} {fb}"), need));
                }
            }
        }
    }
    out.sort_by(|a, b| a.1.total_cmp(&b.1));
    out
}

/// The options in words: "`--set train.recompute=true` (41.20 GiB), …", or advice when none fits.
pub fn describe_options(options: &[(String, f64)]) -> String {
    if options.is_empty() {
        return "no single change fits: add devices (more data-parallel ranks shard the distributed optimizer), or \
                raise tp"
            .into();
    }
    let list: Vec<String> =
        options.iter().map(|(flags, need)| format!("`{flags}` ({})", human_bytes(*need as u64))).collect();
    format!("options that fit: {}", list.join("; "))
}
