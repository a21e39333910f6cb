//! The dry run: everything a launch would do, printed, with secrets redacted. Contacts no
//! host. Text for people, `--json` for tools (the same content).

use std::fmt::Write as _;

use serde::Serialize;

use crate::plan::Plan;
use crate::render::{redact_env, redact_script, Rendered};

#[derive(Serialize)]
pub struct DryRun<'a> {
    pub plan: Plan,
    pub launch: &'a Rendered,
}

/// The plan and rendered launch with every secret-looking variable redacted: in `env:` and in
/// the `setup:` lines' assignments.
pub fn redacted(plan: &Plan, rendered: &Rendered) -> (Plan, Rendered) {
    let mut plan = plan.clone();
    for n in &mut plan.nodes {
        n.host.env = redact_env(&n.host.env);
    }
    let mut rendered = rendered.clone();
    for n in &mut rendered.nodes {
        for u in &mut n.units {
            u.env = redact_env(&u.env);
            // The cluster's `setup:` lines are in the script as written.
            u.script = redact_script(&u.script);
        }
    }
    (plan, rendered)
}

pub fn to_json(plan: &Plan, rendered: &Rendered) -> String {
    let (plan, rendered) = redacted(plan, rendered);
    serde_json::to_string_pretty(&DryRun { plan, launch: &rendered }).expect("plans serialize")
}

fn ranges(ranks: &[usize]) -> String {
    match (ranks.first(), ranks.last()) {
        (Some(a), Some(b)) if ranks.len() > 1 && b - a + 1 == ranks.len() => format!("{a}-{b}"),
        _ => ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(","),
    }
}

fn stage_cell(s: Option<&mm_spec::layout::StageLayers>) -> String {
    match s {
        Some(s) if s.num_layers > 0 => {
            format!("{}..{} ({})", s.first_layer, s.first_layer + s.num_layers, s.num_layers)
        }
        _ => "-".into(),
    }
}

pub fn to_text(plan: &Plan, rendered: &Rendered) -> String {
    let (plan, rendered) = redacted(plan, rendered);
    let r = &plan.recipe;
    let d = &plan.dims;
    let b = &plan.batch;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "dry run: finetune {} on {} (template {}, accelerator {})",
        r.model,
        plan.cluster,
        plan.template.as_str(),
        plan.accelerator.as_str()
    );
    let per_node: Vec<usize> = plan.nodes.iter().map(|n| n.ranks.len()).collect();
    let uniform = per_node.windows(2).all(|w| w[0] == w[1]);
    let shape = if uniform {
        format!(
            "{} node{} × {} devices",
            plan.nnodes,
            if plan.nnodes == 1 { "" } else { "s" },
            per_node.first().unwrap_or(&0)
        )
    } else {
        format!("{} nodes with {:?} devices", plan.nnodes, per_node)
    };
    let vpp = d.vpp().map(|v| format!(" × vpp {v}")).unwrap_or_default();
    let _ = writeln!(
        o,
        "WORLD_SIZE {} = {shape}; tp {} × cp {} × pp {}{vpp} × dp {}",
        plan.world_size,
        d.tp(),
        d.cp(),
        d.pp(),
        d.dp()
    );
    let _ = writeln!(
        o,
        "batch: micro {} × grad accumulation {} × dp {} = global {}; seq {}; {} iterations",
        b.micro_batch_size,
        b.grad_accumulation,
        d.dp(),
        b.global_batch_size,
        r.train.seq_length,
        r.train.train_iters
    );
    let port = if plan.master_port == 0 {
        "0 (a free port is picked at launch)".to_string()
    } else {
        plan.master_port.to_string()
    };
    let _ = writeln!(o, "master: {}:{port}", plan.master_addr);
    let _ = writeln!(o, "checkpoint: about {} per save", crate::checks::human_bytes(plan.checkpoint_bytes));
    memory_section(&mut o, &plan);

    let _ = writeln!(o, "\npipeline (layers per stage, model order):");
    let _ = writeln!(o, "  {:<10} {:<18} vit", "stage", "llm");
    for (i, s) in plan.llm_stages.iter().enumerate() {
        let name = match d.vpp() {
            Some(_) => format!("pp{} v{}", s.pp_rank, s.vp_stage),
            None => format!("pp{}", s.pp_rank),
        };
        let _ = writeln!(o, "  {:<10} {:<18} {}", name, stage_cell(Some(s)), stage_cell(plan.vit_stages.get(i)));
    }

    let _ = writeln!(o, "\nranks:");
    let w = plan.ranks.iter().map(|r| r.host.len()).max().unwrap_or(4).max(4);
    let _ = writeln!(
        o,
        "  {:>5}  {:<w$}  {:>4}  {:>5}  {:>6}  {:>3}  {:>3}  {:>3}  {:>3}",
        "rank", "host", "node", "local", "device", "tp", "cp", "dp", "pp"
    );
    for x in &plan.ranks {
        let _ = writeln!(
            o,
            "  {:>5}  {:<w$}  {:>4}  {:>5}  {:>6}  {:>3}  {:>3}  {:>3}  {:>3}",
            x.rank, x.host, x.node_rank, x.local_rank, x.device, x.tp, x.cp, x.dp, x.pp
        );
    }

    let _ = writeln!(o, "\ngroups:");
    for kind in ["tp", "cp", "dp", "pp", "dp_cp", "embedding", "mp"] {
        if let Some(groups) = plan.groups.get(kind) {
            let shown: Vec<String> = groups
                .iter()
                .map(|g| format!("[{}]", g.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(",")))
                .collect();
            let _ = writeln!(o, "  {:<9} {}", kind, shown.join(" "));
        }
    }

    let _ = writeln!(o, "\nrecipe (resolved):");
    let yaml = serde_yaml_ng::to_string(&plan.recipe).unwrap_or_default();
    for line in yaml.lines() {
        let _ = writeln!(o, "  {line}");
    }

    for node in &rendered.nodes {
        let ranks: Vec<usize> = node.units.iter().flat_map(|u| u.ranks.iter().copied()).collect();
        let _ =
            writeln!(o, "\nhost {} ({}) · node {} · ranks {}", node.host, node.address, node.node_rank, ranges(&ranks));
        for unit in &node.units {
            let _ = writeln!(
                o,
                "  process for rank{} {}:",
                if unit.ranks.len() > 1 { "s" } else { "" },
                ranges(&unit.ranks)
            );
            let _ = writeln!(o, "    environment:");
            for (k, v) in &unit.env {
                let _ = writeln!(o, "      {k}={}", crate::render::shell_quote(v));
            }
            let _ = writeln!(o, "    bash -c:");
            for line in unit.script.lines() {
                let _ = writeln!(o, "      {line}");
            }
        }
    }
    o
}

/// The memory estimate per pipeline stage (`crate::plan::memory`): what each device of the stage
/// holds at its busiest moment, and the recomputation in effect.
fn memory_section(o: &mut String, plan: &Plan) {
    let h = |b: f64| crate::checks::human_bytes(b as u64);
    let recompute = match plan.recipe.train.recompute_setting() {
        Ok(Some(r)) => format!(
            "recompute {}{}{}",
            r.granularity(),
            r.method().map(|m| format!("/{m}")).unwrap_or_default(),
            r.num_layers().map(|n| format!("/{n}")).unwrap_or_default()
        ),
        _ => "no recomputation".to_string(),
    };
    let _ = writeln!(o, "\nmemory per device (estimate, {recompute}; formulas in crates/spec/src/memory.rs):");
    let _ = writeln!(
        o,
        "  {:<6} {:>11} {:>11} {:>11} {:>24} {:>11} {:>11}",
        "stage", "weights", "gradients", "optimizer", "activations (in flight)", "transient", "total"
    );
    for s in &plan.memory.stages {
        let _ = writeln!(
            o,
            "  {:<6} {:>11} {:>11} {:>11} {:>24} {:>11} {:>11}",
            format!("pp{}", s.pp_rank),
            h(s.weights),
            h(s.gradients),
            h(s.optimizer),
            format!("{} ({})", h(s.activations), s.in_flight),
            h(s.transient),
            h(s.total)
        );
    }
}
