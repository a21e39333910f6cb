//! `inspect`: what a checkpoint folder holds (HF, MM or MindSpeed-MM's torch files), whether it is intact, and whether it
//! fits a given tp / pp / layer split.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use mm_spec::checkpoint::{plan_checkpoint, LATEST_FILE, MANIFEST_FILE};
use mm_spec::{DType, LayoutRequest, MmLayout, ModelPreset};

use crate::error::ConvertError;
use crate::hf::{HfCheckpoint, CONFIG_FILE};
use crate::mm::MmCheckpoint;

#[derive(Debug, Clone)]
pub struct InspectOptions {
    pub dir: PathBuf,
    pub iteration: Option<u64>,
    /// Check the checkpoint against this layout.
    pub recipe: Option<LayoutRequest>,
    /// List every tensor (default: summary only).
    pub tensors: bool,
}

/// The printed report and the verdicts.
#[derive(Debug, Clone)]
pub struct Report {
    pub text: String,
    /// Problems found in the checkpoint itself (empty: intact).
    pub problems: Vec<String>,
    /// Whether the checkpoint fits the recipe; None without one.
    pub fits: Option<bool>,
}

pub fn inspect(o: &InspectOptions) -> Result<Report, ConvertError> {
    if let Some(iter_dir) = crate::from_mindspeed::mindspeed_iteration(&o.dir, o.iteration) {
        if o.recipe.is_some() {
            return Err(ConvertError::Usage(format!(
                "{}: a MindSpeed-MM checkpoint carries no config.json, so inspect cannot check it against a recipe \
                 here; its split is printed without --recipe-*",
                iter_dir.display()
            )));
        }
        let text = crate::from_mindspeed::describe(&iter_dir)?;
        return Ok(Report { text, problems: Vec::new(), fits: None });
    }
    let is_mm = o.dir.join(LATEST_FILE).is_file() || o.dir.join(MANIFEST_FILE).is_file() || o.iteration.is_some();
    if !is_mm && o.dir.join(CONFIG_FILE).is_file() {
        inspect_hf(o)
    } else {
        inspect_mm(o)
    }
}

pub use mm_spec::human_bytes as fmt_bytes;

/// Sort key that orders `layers.10` after `layers.9`.
fn natural_key(s: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut num: Option<u64> = None;
    for c in s.chars() {
        match (c.to_digit(10), num) {
            (Some(d), Some(n)) => num = Some(n.saturating_mul(10).saturating_add(d as u64)),
            (Some(d), None) => num = Some(d as u64),
            (None, Some(n)) => {
                out.push((std::mem::take(&mut text), n));
                num = None;
                text.push(c);
            }
            (None, None) => text.push(c),
        }
    }
    out.push((text, num.unwrap_or(0)));
    out
}

fn describe_model(a: &ModelPreset) -> String {
    let v = &a.vision;
    let l = &a.llm;
    format!(
        "ViT {} layers × {} ({} heads, MLP {}, {:?}{}{}) → projector {} → {} → LLM {} layers × {} ({} heads, {} kv heads, \
         MLP {}, vocab {}{})",
        v.num_hidden_layers,
        v.hidden_size,
        v.num_attention_heads,
        v.intermediate_size,
        v.norm_type,
        if v.qkv_bias { ", qkv bias" } else { "" },
        if v.qk_normalization { ", qk norm" } else { "" },
        a.projector_in(),
        l.hidden_size,
        l.num_hidden_layers,
        l.hidden_size,
        l.num_attention_heads,
        l.num_key_value_heads,
        l.intermediate_size,
        l.vocab_size,
        if l.tie_word_embeddings { ", tied lm_head" } else { "" }
    )
}

fn describe_layout(l: &MmLayout, vocab: usize) -> String {
    let list = |v: &[usize]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
    format!(
        "tp {}, pp {}, vpp {}, llm_pp_layers {}, vit_pp_layers {}, unaligned_linear {}, vocab {} padded to {}",
        l.tp,
        l.pp,
        l.vpp.map_or("-".to_string(), |v| v.to_string()),
        list(&l.llm_pp_layers),
        list(&l.vit_pp_layers),
        l.unaligned_linear,
        vocab,
        l.padded_vocab_size(vocab)
    )
}

/// Largest shard bytes per pp stage of `arch` split for `layout` at `dtype`.
fn stage_bytes(arch: &ModelPreset, layout: &MmLayout, dtype: impl Fn(&str) -> DType) -> Vec<u64> {
    let Ok(plan) = plan_checkpoint(arch, layout) else { return Vec::new() };
    let mut bytes = vec![vec![0u64; layout.tp]; layout.pp];
    for t in &plan {
        let es = dtype(&t.key).size_bytes() as u64;
        for (tp, s) in t.shards.iter().enumerate() {
            bytes[t.pp_rank][tp] += s.shape.iter().product::<usize>() as u64 * es;
        }
    }
    bytes.into_iter().map(|b| b.into_iter().max().unwrap_or(0)).collect()
}

fn recipe_section(
    out: &mut String,
    arch: &ModelPreset,
    recipe: &LayoutRequest,
    current: Option<&MmLayout>,
    dtype: impl Fn(&str) -> DType,
) -> bool {
    let _ = writeln!(out, "\nrecipe check");
    match MmLayout::resolve(arch, recipe) {
        Err(e) => {
            let _ = writeln!(out, "  does not fit: {e}");
            false
        }
        Ok(l) => {
            let _ = writeln!(out, "  layout:      {}", describe_layout(&l, arch.llm.vocab_size));
            let per_stage = stage_bytes(arch, &l, dtype);
            for (pp, b) in per_stage.iter().enumerate() {
                let _ = writeln!(out, "  pp stage {pp}: largest tp shard {}", fmt_bytes(*b));
            }
            match current {
                None => {
                    let _ = writeln!(out, "  fits: convert with mm-convert hf-to-mm and these options");
                    true
                }
                Some(c) if *c == l => {
                    let _ = writeln!(out, "  fits: the checkpoint is split exactly this way and loads as it is");
                    true
                }
                Some(_) => {
                    let _ = writeln!(
                        out,
                        "  does not fit as it is: the model fits this layout, but the checkpoint is split differently; \
                         re-split it (mm-convert mm-to-hf, then mm-convert hf-to-mm with these options)"
                    );
                    false
                }
            }
        }
    }
}

fn inspect_hf(o: &InspectOptions) -> Result<Report, ConvertError> {
    let ck = HfCheckpoint::open(&o.dir)?;
    let arch = &ck.config.arch;
    let mut out = String::new();
    let _ = writeln!(out, "HF checkpoint {}", ck.dir.display());
    let _ = writeln!(out, "  layout:    {}", ck.layout);
    let _ = writeln!(
        out,
        "  config:    {}",
        if ck.config.native() { "transformers InternVLConfig (text_config)" } else { "internvl_chat (llm_config)" }
    );
    let _ = writeln!(out, "  model:     {}", describe_model(arch));
    let names: Vec<String> =
        ck.files.iter().map(|f| f.path.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
    let _ = writeln!(out, "  files:     {} ({})", names.len(), names.join(", "));
    let mut rows: Vec<(String, String, String, u64)> = Vec::new();
    let mut dtypes: std::collections::BTreeMap<String, usize> = Default::default();
    for (k, &f) in &ck.keys {
        if let Some(m) = ck.files[f].tensors.get(k) {
            rows.push((k.clone(), m.dtype.to_string(), format!("{:?}", m.shape), (m.end - m.start) as u64));
            *dtypes.entry(m.dtype.to_string()).or_default() += 1;
        }
    }
    rows.sort_by_key(|r| natural_key(&r.0));
    let params: u64 =
        ck.files.iter().flat_map(|f| f.tensors.values()).map(|m| m.shape.iter().product::<usize>() as u64).sum();
    let dt: Vec<String> = dtypes.iter().map(|(d, n)| format!("{d} × {n}")).collect();
    let _ = writeln!(
        out,
        "  tensors:   {} ({} parameters, {}; {})",
        rows.len(),
        params,
        fmt_bytes(ck.total_bytes()),
        dt.join(", ")
    );
    if o.tensors {
        for (k, d, s, b) in &rows {
            let _ = writeln!(out, "    {k:<72} {d:<5} {s:<20} {b}");
        }
    }
    // Intact: every tensor the config implies, nothing else, right shapes and dtypes.
    let single = LayoutRequest { tp: 1, pp: Some(1), ..LayoutRequest::default() };
    let mut problems = Vec::new();
    match MmLayout::resolve(arch, &single).map_err(ConvertError::from).and_then(|l| Ok(plan_checkpoint(arch, &l)?)) {
        Ok(plan) => match ck.map_sources(plan.iter().map(|t| (t.key.as_str(), t.shape.as_slice())), None) {
            Ok(_) => {}
            Err(ConvertError::Invalid { problems: p, .. }) => problems.extend(p.iter().map(|p| p.to_string())),
            Err(e) => problems.push(e.to_string()),
        },
        Err(e) => problems.push(e.to_string()),
    }
    let _ = writeln!(
        out,
        "  check:     {}",
        if problems.is_empty() { "intact".to_string() } else { format!("{} problems", problems.len()) }
    );
    let first_dtype = rows.first().and_then(|r| DType::parse(&r.1)).unwrap_or(DType::BF16);
    let fits = o.recipe.as_ref().map(|r| recipe_section(&mut out, arch, r, None, |_| first_dtype));
    Ok(Report { text: out, problems, fits })
}

fn inspect_mm(o: &InspectOptions) -> Result<Report, ConvertError> {
    let (ck, problems) = match MmCheckpoint::open(&o.dir, o.iteration) {
        Ok(ck) => (ck, Vec::new()),
        Err(ConvertError::Invalid { what, problems }) => {
            // Show what the manifest says even when shard files are damaged.
            let dir = crate::mm::locate(&o.dir, o.iteration)?;
            let (manifest, plan) = crate::mm::read_manifest(&dir)?;
            let text = format!("{what}\n");
            let mut r = mm_report(&dir, &manifest, &plan, o, text);
            r.problems = problems.iter().map(|p| p.to_string()).collect();
            return Ok(r);
        }
        Err(e) => return Err(e),
    };
    let r = mm_report(&ck.iter_dir, &ck.manifest, &ck.plan, o, String::new());
    Ok(Report { problems, ..r })
}

fn mm_report(
    iter_dir: &Path,
    m: &mm_spec::Manifest,
    plan: &[mm_spec::checkpoint::PlannedTensor],
    o: &InspectOptions,
    mut out: String,
) -> Report {
    let arch = &m.architecture;
    let _ = writeln!(
        out,
        "MM checkpoint {} (iteration {}, {} v{})",
        iter_dir.display(),
        m.iteration,
        m.format,
        m.format_version
    );
    if let Some(s) = &m.source {
        let _ = writeln!(
            out,
            "  source:    {} ({} layout, {} files, {} tensors, {})",
            s.hf_dir,
            s.layout,
            s.files,
            s.tensors,
            fmt_bytes(s.bytes)
        );
    }
    let _ = writeln!(out, "  model:     {}", describe_model(arch));
    let _ = writeln!(out, "  layout:    {}", describe_layout(&m.parallel, arch.llm.vocab_size));
    let total: u64 = m.files.iter().map(|f| f.bytes).sum();
    let _ = writeln!(out, "  files:     {} ({})", m.files.len(), fmt_bytes(total));
    for f in &m.files {
        let _ = writeln!(out, "    {:<36} {:>5} tensors  {}", f.path, f.tensors, fmt_bytes(f.bytes));
    }
    let params: u64 = m.tensors.iter().map(|t| t.shape.iter().product::<usize>() as u64).sum();
    let _ = writeln!(
        out,
        "  tensors:   {} logical ({} parameters), dtype {}",
        m.tensors.len(),
        params,
        m.dtype.map_or("as converted".to_string(), |d| d.to_string())
    );
    if !m.hf_assets.is_empty() {
        let _ = writeln!(out, "  hf_assets: {}", m.hf_assets.join(", "));
    }
    if o.tensors {
        for (t, p) in m.tensors.iter().zip(plan) {
            let _ = writeln!(
                out,
                "    {:<60} {:<5} {:<18} {:<11} pp {} vp {} as {}",
                t.key,
                t.dtype.to_string(),
                format!("{:?}", t.shape),
                p.split.name(),
                t.pp_rank,
                t.vp_stage,
                t.local_key
            );
        }
    }
    let by_key: std::collections::HashMap<&str, DType> = m.tensors.iter().map(|t| (t.key.as_str(), t.dtype)).collect();
    let fits = o.recipe.as_ref().map(|r| {
        recipe_section(&mut out, arch, r, Some(&m.parallel), |k| by_key.get(k).copied().unwrap_or(DType::BF16))
    });
    Report { text: out, problems: Vec::new(), fits }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_and_sizes() {
        let mut v = vec!["layers.10.a", "layers.9.a", "layers.1.b", "embed"];
        v.sort_by_key(|s| natural_key(s));
        assert_eq!(v, vec!["embed", "layers.1.b", "layers.9.a", "layers.10.a"]);
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(3 << 30), "3.00 GiB");
    }
}
