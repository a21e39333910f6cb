//! `mm-to-hf`: an MM checkpoint gathered back into a folder transformers loads.
//!
//! Writes config.json, `model-0000i-of-0000n.safetensors` shards with
//! `model.safetensors.index.json`, and the tokenizer/processor files carried in `hf_assets/`.
//! Tensors come back bit-identical (unless `--dtype` converts them), the vocab padding is
//! dropped, and the layout defaults to the one the checkpoint was converted from.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use mm_spec::checkpoint::HF_ASSETS_DIR;
use mm_spec::{DType, HfLayout, LayoutRequest};
use serde_json::json;

use crate::error::ConvertError;
use crate::hf::{asset_names, config_for_layout, hf_keys, set_torch_dtype, CONFIG_FILE, INDEX_FILE};
use crate::mm::MmCheckpoint;
use crate::split::gather_ops;
use crate::to_mm::Summary;
use crate::write::{
    copy_files, run_parallel, st_dtype, thread_count, write_text, OutputDir, ReleaseGroup, Releaser, SafetensorsWriter,
    TensorHeader, RELEASE_STEP,
};

/// transformers' default `max_shard_size`.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Options of `mm-to-hf`.
#[derive(Debug, Clone)]
pub struct MmToHf {
    pub mm_dir: PathBuf,
    pub iteration: Option<u64>,
    pub hf_dir: PathBuf,
    /// None: the layout the checkpoint was converted from (original if unknown).
    pub layout: Option<HfLayout>,
    pub dtype: Option<DType>,
    pub max_shard_bytes: u64,
    pub force: bool,
    pub threads: Option<usize>,
    /// Take config/tokenizer files from here instead of the checkpoint's `hf_assets/`.
    pub assets_from: Option<PathBuf>,
    /// Fail unless the checkpoint has this tp / layer lists (the seed's mm_to_hf spelling
    /// repeats them).
    pub expect: Option<LayoutRequest>,
}

/// One output tensor: rows `rows` of logical tensor `plan` (all rows except for the -hf q/k/v).
struct HfTensor {
    key: String,
    plan: usize,
    rows: Range<usize>,
    shape: Vec<usize>,
    from: DType,
    to: DType,
}

impl HfTensor {
    fn nbytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.to.size_bytes()) as u64
    }
}

pub fn mm_to_hf(o: &MmToHf) -> Result<Summary, ConvertError> {
    if let Some(iter_dir) = crate::from_mindspeed::mindspeed_iteration(&o.mm_dir, o.iteration) {
        return crate::from_mindspeed::mindspeed_to_hf(o, &iter_dir);
    }
    let started = Instant::now();
    let mut out = OutputDir::prepare(&o.hf_dir, o.force)?;
    let ck = MmCheckpoint::open(&o.mm_dir, o.iteration)?;
    let m = &ck.manifest;
    if let Some(expect) = &o.expect {
        let have = &m.parallel;
        check_expected(&ck.iter_dir, expect, have.tp, &have.llm_pp_layers, &have.vit_pp_layers)?;
    }
    let source_layout = m.source.as_ref().map(|s| s.layout);
    let target = o.layout.or(source_layout).unwrap_or(HfLayout::Original);

    let mut tensors = Vec::new();
    for (i, t) in ck.plan.iter().enumerate() {
        let Some(keys) = hf_keys(&t.key, target) else {
            return Err(ConvertError::Usage(format!("internal error: no {target} key for {:?}", t.key)));
        };
        let n = keys.len();
        let rows = t.shape.first().copied().unwrap_or(1) / n;
        for (j, key) in keys.into_iter().enumerate() {
            let mut shape = t.shape.clone();
            if let Some(first) = shape.first_mut() {
                *first = rows;
            }
            let from = m.tensors[i].dtype;
            tensors.push(HfTensor {
                key,
                plan: i,
                rows: j * rows..(j + 1) * rows,
                shape,
                from,
                to: o.dtype.unwrap_or(from),
            });
        }
    }
    let sizes: Vec<u64> = tensors.iter().map(HfTensor::nbytes).collect();
    let groups = group_by_size(&sizes, o.max_shard_bytes);
    let n_files = groups.len();
    let file_name = |k: usize| format!("model-{:05}-of-{:05}.safetensors", k + 1, n_files);

    let assets_dir = o.assets_from.clone().unwrap_or_else(|| ck.iter_dir.join(HF_ASSETS_DIR));
    let assets: Vec<String> = asset_names(&assets_dir).into_iter().filter(|n| n != CONFIG_FILE).collect();
    let config = export_config(&ck, &assets_dir, target, o.dtype)?;
    if target == HfLayout::Original && !assets.iter().any(|n| n.ends_with(".py")) {
        tracing::warn!(
            "the original layout loads with trust_remote_code and needs OpenGVLab's *.py files \
             (configuration_internvl_chat.py, modeling_internvl_chat.py, …), which {} does not hold: copy them \
             from the model's hub page into the output",
            assets_dir.display()
        );
    }

    let root = out.create()?.to_path_buf();
    let jobs: Vec<(usize, u64)> =
        groups.iter().enumerate().map(|(k, g)| (k, g.iter().map(|&t| tensors[t].nbytes()).sum())).collect();
    let threads = thread_count(o.threads, jobs.len());
    run_parallel(
        &jobs,
        threads,
        |j| j.1,
        |&(k, _), cancel| write_hf_file(&ck, &tensors, &groups[k], &root.join(file_name(k)), cancel),
    )?;

    let mut weight_map = BTreeMap::new();
    for (k, g) in groups.iter().enumerate() {
        for &t in g {
            weight_map.insert(tensors[t].key.clone(), file_name(k));
        }
    }
    let total: u64 = sizes.iter().sum();
    write_index_and_assets(&root, &weight_map, total, &config, &assets_dir, &assets)?;
    let out_dir = out.commit()?;
    Ok(Summary {
        out_dir,
        files: n_files,
        tensors: tensors.len(),
        bytes: total,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The tail of an HF export: the shard index, config.json and the tokenizer/processor files.
pub(crate) fn write_index_and_assets(
    root: &Path,
    weight_map: &BTreeMap<String, String>,
    total: u64,
    config: &serde_json::Value,
    assets_dir: &Path,
    assets: &[String],
) -> Result<(), ConvertError> {
    let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    write_text(&root.join(INDEX_FILE), &pretty(&index))?;
    write_text(&root.join(CONFIG_FILE), &pretty(config))?;
    copy_files(assets_dir, root, assets)?;
    Ok(())
}

/// Consecutive tensors (by byte size) packed into files of at most `max` bytes (a larger tensor
/// gets its own file), as transformers' `save_pretrained` shards.
pub(crate) fn group_by_size(sizes: &[u64], max: u64) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut size = 0u64;
    for (i, &n) in sizes.iter().enumerate() {
        match groups.last_mut() {
            Some(g) if size + n <= max => {
                g.push(i);
                size += n;
            }
            _ => {
                groups.push(vec![i]);
                size = n;
            }
        }
    }
    if groups.is_empty() {
        groups.push(Vec::new());
    }
    groups
}

fn write_hf_file(
    ck: &MmCheckpoint,
    tensors: &[HfTensor],
    group: &[usize],
    path: &std::path::Path,
    cancel: &AtomicBool,
) -> Result<(), ConvertError> {
    let headers = group
        .iter()
        .map(|&i| TensorHeader {
            name: tensors[i].key.clone(),
            dtype: st_dtype(tensors[i].to),
            shape: tensors[i].shape.clone(),
        })
        .collect();
    let mut w = SafetensorsWriter::create(path, headers, &[("format", "pt")])?;
    for &i in group {
        if cancel.load(Ordering::Relaxed) {
            return Err(ConvertError::Cancelled("another output file failed".into()));
        }
        let t = &tensors[i];
        let p = &ck.plan[t.plan];
        let pieces: Vec<_> = p.shards.iter().map(|s| s.pieces.clone()).collect();
        let row_elems: usize = p.shape.iter().skip(1).product();
        let ops = gather_ops(&pieces, t.rows.clone(), row_elems).map_err(|e| {
            ConvertError::Usage(format!("internal error: {} cannot be rebuilt from its shards: {e}", p.key))
        })?;
        let es = t.from.size_bytes();
        // One release budget for all ranks: a column-split tensor is read a row piece of each
        // rank in turn, and per-rank releasers would keep up to a step of every rank resident.
        let mut releasers = ReleaseGroup::new(
            (0..p.shards.len())
                .map(|rank| ck.shard(t.plan, rank).map(|(file, meta)| Releaser::new(&file.map, meta.start, meta.end)))
                .collect(),
        );
        for op in ops {
            let Some((file, meta)) = ck.shard(t.plan, op.rank) else {
                return Err(ConvertError::Usage(format!(
                    "internal error: no shard of {} on tp rank {}",
                    p.key, op.rank
                )));
            };
            let bytes = file.bytes(meta);
            let (mut a, b) = (op.offset * es, (op.offset + op.len) * es);
            while a < b {
                let e = (a + RELEASE_STEP).min(b);
                w.write_converted(&bytes[a..e], t.from, t.to)?;
                releasers.advance(op.rank, meta.start + e, e - a);
                a = e;
            }
        }
        w.end_tensor()?;
        releasers.finish();
    }
    w.finish()?;
    Ok(())
}

/// config.json of the export: the source's own (when the schema matches the target), else one
/// generated from the manifest's architecture, carrying over what the source had.
fn export_config(
    ck: &MmCheckpoint,
    assets_dir: &std::path::Path,
    target: HfLayout,
    dtype: Option<DType>,
) -> Result<serde_json::Value, ConvertError> {
    let arch = &ck.manifest.architecture;
    let path = assets_dir.join(CONFIG_FILE);
    let source = if path.is_file() {
        let text = std::fs::read_to_string(&path).map_err(|e| ConvertError::io("read", &path, e))?;
        Some(mm_spec::hf::parse_config(&path, &arch.name, &text)?)
    } else {
        None
    };
    if let Some(src) = &source {
        let mut a = src.arch.clone();
        a.name.clone_from(&arch.name);
        a.vision.drop_path_rate = arch.vision.drop_path_rate;
        if a.vision != arch.vision || a.llm != arch.llm {
            return Err(ConvertError::Config {
                path,
                message: "describes a different model than the checkpoint's manifest.json: use the config.json \
                          of the model that was converted (or drop --assets-from)"
                    .into(),
            });
        }
    }
    let main_dtype =
        dtype.or_else(|| ck.manifest.tensors.iter().find(|t| t.key == "llm.embed_tokens.weight").map(|t| t.dtype));
    let mut config = match source {
        Some(src) if src.native() == target.is_transformers_native() => {
            let mut raw = src.raw;
            if let Some(d) = dtype {
                set_torch_dtype(&mut raw, d);
            }
            raw
        }
        other => config_for_layout(arch, other.as_ref(), target, main_dtype),
    };
    // transformers finds the image positions by `image_token_id`; OpenGVLab's config has no
    // such key (its code asks the tokenizer), so the tokenizer's <IMG_CONTEXT> decides.
    if target.is_transformers_native() {
        let tokenizer = assets_dir.join("tokenizer.json");
        if let Some(id) = token_id(&tokenizer, IMG_CONTEXT)? {
            if let Some(obj) = config.as_object_mut() {
                obj.insert("image_token_id".into(), id.into());
            }
        }
    }
    Ok(config)
}

/// InternVL's image placeholder token.
pub const IMG_CONTEXT: &str = "<IMG_CONTEXT>";

/// The id of `token` in a tokenizer.json (its added tokens, then the model's vocabulary);
/// None when the file is absent or does not hold the token.
pub fn token_id(path: &std::path::Path, token: &str) -> Result<Option<u64>, ConvertError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ConvertError::io("read", path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ConvertError::Config { path: path.to_path_buf(), message: format!("not JSON: {e}") })?;
    let added = v["added_tokens"].as_array().into_iter().flatten();
    if let Some(id) = added.filter(|t| t["content"] == token).find_map(|t| t["id"].as_u64()) {
        return Ok(Some(id));
    }
    Ok(v["model"]["vocab"][token].as_u64())
}

/// Refuses an export whose command names another split than the checkpoint's (the seed's
/// `mm_to_hf` spelling repeats tp and the layer lists).
pub(crate) fn check_expected(
    dir: &Path,
    expect: &LayoutRequest,
    tp: usize,
    llm_pp_layers: &[usize],
    vit_pp_layers: &[usize],
) -> Result<(), ConvertError> {
    let mut diffs = Vec::new();
    if expect.tp != tp {
        diffs.push(format!("tp {} (checkpoint: {tp})", expect.tp));
    }
    for (name, want, have) in [
        ("llm_pp_layers", &expect.llm_pp_layers, llm_pp_layers),
        ("vit_pp_layers", &expect.vit_pp_layers, vit_pp_layers),
    ] {
        if let Some(l) = want.as_deref().filter(|l| *l != have) {
            diffs.push(format!("{name} {l:?} (checkpoint: {have:?})"));
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(ConvertError::Usage(format!(
            "the checkpoint in {} is not split as the command says: {}; the checkpoint records its real layout, \
             so drop those options or fix them",
            dir.display(),
            diffs.join(", ")
        )))
    }
}
