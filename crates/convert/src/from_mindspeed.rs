//! `mm-to-hf` from MindSpeed-MM's own checkpoints: the Megatron torch files its converter and its
//! training write (`release/` or `iter_NNNNNNN/`, `mp_rank_*/model_optim_rng.pt`, with or
//! without optimizer state, with vpp `model0`, `model1`, …), read with the torchfile reader (no
//! code from the file runs; only the `model*` entries are used).
//!
//! A MindSpeed checkpoint carries no config.json: the architecture comes from `--assets-from`
//! (the HF folder it was converted from; the seed's `mm_to_hf` spelling passes it). The layout
//! is read off the files (tp and pp from the rank folders, vpp from `model{v}`, the layer lists
//! from the layer numbers in each chunk), then `mm_spec::checkpoint::plan_mindspeed` says where
//! every piece of every logical tensor is; every file is checked against that plan (names,
//! shapes, dtypes) before anything is written. Each logical tensor is assembled in memory (the
//! largest, the 78B's embedding, is 2.5 GB in bf16) and written to the export.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use mm_spec::checkpoint::{
    has_mindspeed_files, iteration_dir, plan_mindspeed, Iteration, Located, MsPlan, MINDSPEED_FILE,
};
use mm_spec::{DType, HfLayout, LayoutRequest, MmLayout, ModelPreset};
use torchfile::{TorchFile, Value};

use crate::error::ConvertError;
use crate::hf::{asset_names, config_for_layout, hf_keys, read_config, CONFIG_FILE};
use crate::to_hf::{check_expected, group_by_size, write_index_and_assets, MmToHf};
use crate::to_mm::Summary;
use crate::write::{convert, st_dtype, OutputDir, SafetensorsWriter, TensorHeader};

/// The iteration folder of `dir` when it holds MindSpeed-MM torch files (a save folder with a
/// tracker, or the iteration folder itself); None for anything else.
pub fn mindspeed_iteration(dir: &Path, explicit: Option<u64>) -> Option<PathBuf> {
    match explicit {
        Some(n) => Some(iteration_dir(dir, Iteration::Step(n))).filter(|d| has_mindspeed_files(d)),
        None => match mm_spec::checkpoint::locate(dir) {
            Ok(Located::MindSpeed { iter_dir }) => Some(iter_dir),
            _ => None,
        },
    }
}

fn bad(path: &Path, message: impl Into<String>) -> ConvertError {
    ConvertError::Config { path: path.to_path_buf(), message: message.into() }
}

/// The rank folders: (tp rank, pp rank) → file, and the pp size (`mp_rank_TT` means pp 1).
fn rank_files(iter_dir: &Path) -> Result<(Paths, usize, usize), ConvertError> {
    let mut files = BTreeMap::new();
    let mut with_pp = None;
    for e in fs::read_dir(iter_dir).map_err(|e| ConvertError::io("list", iter_dir, e))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("mp_rank_") else { continue };
        let parts: Vec<&str> = rest.split('_').collect();
        // Ranks beyond any real cluster are a damaged or foreign folder, not a size to allocate.
        let num = |s: &str| {
            s.parse::<usize>()
                .ok()
                .filter(|&n| n < 100_000)
                .ok_or_else(|| bad(&e.path(), "not an mp_rank_TT or mp_rank_TT_PPP folder"))
        };
        let (tp, pp) = match parts.as_slice() {
            [t] => (num(t)?, None),
            [t, p] => (num(t)?, Some(num(p)?)),
            _ => return Err(bad(&e.path(), "not an mp_rank_TT or mp_rank_TT_PPP folder")),
        };
        if with_pp.is_some_and(|w: bool| w != pp.is_some()) {
            return Err(bad(iter_dir, "mixes mp_rank_TT and mp_rank_TT_PPP folders"));
        }
        with_pp = Some(pp.is_some());
        files.insert((tp, pp.unwrap_or(0)), e.path().join(MINDSPEED_FILE));
    }
    let tp = files.keys().map(|k| k.0).max().map_or(0, |m| m + 1);
    let pp = files.keys().map(|k| k.1).max().map_or(0, |m| m + 1);
    for t in 0..tp {
        for p in 0..pp {
            let f = files.get(&(t, p));
            if !f.is_some_and(|f| f.is_file()) {
                return Err(bad(
                    iter_dir,
                    format!("tp {tp} × pp {pp} needs a {MINDSPEED_FILE} for tp rank {t}, pp rank {p}: it is missing"),
                ));
            }
        }
    }
    Ok((files, tp, pp))
}

/// The `model` / `model{v}` state dicts of a file, in vp order.
fn chunks(path: &Path, root: &Value) -> Result<Vec<StateDict>, ConvertError> {
    let dict =
        root.as_dict().ok_or_else(|| bad(path, "the file's object is not a dict (not a Megatron checkpoint)"))?;
    let mut plain: Option<&Value> = None;
    let mut models: Vec<(usize, &Value)> = Vec::new();
    for (k, v) in dict {
        let Value::Str(k) = k else { continue };
        if k == "model" {
            plain = Some(v);
        } else if let Some(n) = k.strip_prefix("model").and_then(|n| n.parse::<usize>().ok()) {
            models.push((n, v));
        }
    }
    models.sort_by_key(|m| m.0);
    // Exactly `model`, or `model0` … `model{n-1}` (virtual pipeline chunks), as Megatron saves.
    let models: Vec<(usize, &Value)> = match (plain, models.is_empty()) {
        (Some(v), true) => vec![(0, v)],
        (None, false) if models.iter().enumerate().all(|(i, m)| m.0 == i) => models,
        (None, true) => return Err(bad(path, "has no 'model' entry: not a Megatron model checkpoint")),
        _ => {
            return Err(bad(path, "its model entries are neither 'model' alone nor 'model0', 'model1', … without gaps"))
        }
    };
    models
        .into_iter()
        .map(|(_, m)| {
            let items = m.as_dict().ok_or_else(|| bad(path, "its 'model' entry is not a state dict"))?;
            items
                .iter()
                // Transformer Engine's per-module state (fp8 metadata), not weights.
                .filter(|(k, _)| !matches!(k, Value::Str(k) if k.ends_with("._extra_state")))
                .map(|(k, v)| match (k, v) {
                    (Value::Str(k), Value::Tensor(t)) => Ok((k.clone(), t.clone())),
                    (Value::Str(k), _) => Err(bad(path, format!("state dict entry {k:?} is not a tensor"))),
                    _ => Err(bad(path, "a state dict key is not a string")),
                })
                .collect()
        })
        .collect()
}

/// The number of model chunks every file holds (they must agree).
fn same_chunk_count(iter_dir: &Path, mut counts: impl Iterator<Item = usize>) -> Result<usize, ConvertError> {
    let first = counts.next().unwrap_or(1);
    if counts.any(|c| c != first) {
        return Err(bad(iter_dir, "its files hold different numbers of model chunks (model0, model1, …)"));
    }
    Ok(first.max(1))
}

/// Layers per chunk (model order `v·pp + p`) of the ViT and the LLM, counted in tp rank 0.
fn layer_lists(per_chunk: &[Vec<String>]) -> (Vec<usize>, Vec<usize>) {
    let count = |names: &Vec<String>, prefix: &str| {
        names
            .iter()
            .filter_map(|n| n.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok())
            .collect::<BTreeSet<_>>()
            .len()
    };
    let vit = per_chunk.iter().map(|n| count(n, "image_encoder.encoder.encoder.layers.")).collect();
    let llm = per_chunk.iter().map(|n| count(n, "text_decoder.decoder.layers.")).collect();
    (vit, llm)
}

fn dtype_of(path: &Path, name: &str, d: torchfile::DType) -> Result<DType, ConvertError> {
    match d {
        torchfile::DType::F32 => Ok(DType::F32),
        torchfile::DType::F16 => Ok(DType::F16),
        torchfile::DType::BF16 => Ok(DType::BF16),
        other => Err(bad(path, format!("tensor {name} is {other:?}: expected a float dtype"))),
    }
}

/// A MindSpeed-MM iteration folder opened: every rank file with its model chunks, the split
/// read off them, and the other top-level entries of a training save (args, optimizer, …).
struct Opened {
    files: Files,
    tp: usize,
    pp: usize,
    vpp: usize,
    vit: Vec<usize>,
    llm: Vec<usize>,
    others: BTreeSet<String>,
}

fn is_model_entry(key: &str) -> bool {
    key == "model" || key.strip_prefix("model").is_some_and(|n| n.parse::<usize>().is_ok())
}

fn open_checkpoint(iter_dir: &Path) -> Result<Opened, ConvertError> {
    let (paths, tp, pp) = rank_files(iter_dir)?;
    let mut files: Files = BTreeMap::new();
    let mut others = BTreeSet::new();
    for (&k, path) in &paths {
        let tf = TorchFile::open(path)?;
        let root = tf.root()?;
        let c = chunks(path, &root)?;
        for (key, _) in root.as_dict().unwrap_or_default() {
            if let Value::Str(key) = key {
                if !is_model_entry(key) {
                    others.insert(key.clone());
                }
            }
        }
        files.insert(k, (tf, c));
    }
    let vpp = same_chunk_count(iter_dir, files.values().map(|f| f.1.len()))?;
    let mut per_chunk = vec![Vec::new(); pp * vpp];
    for p in 0..pp {
        for (v, names) in files[&(0, p)].1.iter().enumerate() {
            per_chunk[v * pp + p] = names.iter().map(|(n, _)| n.clone()).collect();
        }
    }
    let (vit, llm) = layer_lists(&per_chunk);
    Ok(Opened { files, tp, pp, vpp, vit, llm, others })
}

pub fn mindspeed_to_hf(o: &MmToHf, iter_dir: &Path) -> Result<Summary, ConvertError> {
    let started = Instant::now();
    let mut out = OutputDir::prepare(&o.hf_dir, o.force)?;
    let Opened { files, tp, pp, vpp, vit: vit_list, llm: llm_list, .. } = open_checkpoint(iter_dir)?;
    if let Some(expect) = &o.expect {
        check_expected(iter_dir, expect, tp, &llm_list, &vit_list)?;
    }
    let assets_dir = o.assets_from.clone().ok_or_else(|| {
        bad(
            iter_dir,
            "is a MindSpeed-MM checkpoint, which carries no config.json: pass --assets-from <the HF folder it was \
             converted from> (the seed's mm_to_hf spelling does, with --cfg.hf_config.hf_dir)",
        )
    })?;
    let source = read_config(&assets_dir)?;
    let arch: ModelPreset = source.arch.clone();
    let req = LayoutRequest {
        tp,
        pp: Some(pp),
        vpp: (vpp > 1).then_some(vpp),
        llm_pp_layers: Some(llm_list),
        vit_pp_layers: Some(vit_list),
        unaligned_linear: true,
        make_vocab_size_divisible_by: None,
    };
    let layout = MmLayout::resolve(&arch, &req).map_err(|e| {
        bad(iter_dir, format!("its files do not fit the model of {}: {e}", assets_dir.join(CONFIG_FILE).display()))
    })?;
    // The export reads every byte anyway: a damaged file is an error, not a silent export.
    for (tf, _) in files.values() {
        tf.verify_crc()?;
        tf.release_all();
    }
    let plan = plan_mindspeed(&arch, &layout)?;
    let dtypes = check_files(iter_dir, &plan, &files)?;

    let target = o.layout.unwrap_or(if source.native() { HfLayout::Hf } else { HfLayout::Original });
    // Output tensors in model order, one file per max_shard_bytes.
    let mut outputs: Vec<(String, usize, std::ops::Range<usize>, Vec<usize>)> = Vec::new();
    for (i, p) in plan.tensors.iter().enumerate() {
        let t = &p.tensor;
        let keys = hf_keys(&t.key, target)
            .ok_or_else(|| ConvertError::Usage(format!("internal error: no {target} key for {:?}", t.key)))?;
        let n = keys.len();
        let rows = t.shape.first().copied().unwrap_or(1) / n;
        for (j, key) in keys.into_iter().enumerate() {
            let mut shape = t.shape.clone();
            shape[0] = rows;
            outputs.push((key, i, j * rows..(j + 1) * rows, shape));
        }
    }
    let to = |i: usize| o.dtype.unwrap_or(dtypes[i]);
    let nbytes = |x: &(String, usize, std::ops::Range<usize>, Vec<usize>)| -> u64 {
        (x.3.iter().product::<usize>() * to(x.1).size_bytes()) as u64
    };
    let sizes: Vec<u64> = outputs.iter().map(nbytes).collect();
    let groups = group_by_size(&sizes, o.max_shard_bytes);
    let n_files = groups.len();
    let file_name = |k: usize| format!("model-{:05}-of-{:05}.safetensors", k + 1, n_files);

    let root = out.create()?.to_path_buf();
    let mut weight_map = BTreeMap::new();
    for (g, group) in groups.iter().enumerate() {
        let path = root.join(file_name(g));
        let headers = group
            .iter()
            .map(|&k| TensorHeader {
                name: outputs[k].0.clone(),
                dtype: st_dtype(to(outputs[k].1)),
                shape: outputs[k].3.clone(),
            })
            .collect();
        let mut w = SafetensorsWriter::create(&path, headers, &[("format", "pt")])?;
        let mut scratch = Vec::new();
        let mut cached: Option<(usize, Vec<u8>)> = None;
        for &k in group {
            let (key, i, rows, _) = &outputs[k];
            if cached.as_ref().is_none_or(|c| c.0 != *i) {
                cached = Some((*i, assemble(&plan, &files, *i, dtypes[*i])?));
            }
            let (_, data) = cached.as_ref().expect("assembled");
            let t = &plan.tensors[*i].tensor;
            let row_bytes = t.shape.iter().skip(1).product::<usize>() * dtypes[*i].size_bytes();
            scratch.clear();
            convert(&data[rows.start * row_bytes..rows.end * row_bytes], dtypes[*i], to(*i), &mut scratch);
            w.write(&scratch)?;
            w.end_tensor()?;
            weight_map.insert(key.clone(), file_name(g));
        }
        w.finish()?;
    }
    let main_dtype = o.dtype.or_else(|| dtypes.first().copied());
    let config = if source.native() == target.is_transformers_native() && o.dtype.is_none() {
        source.raw.clone()
    } else {
        config_for_layout(&arch, Some(&source), target, main_dtype)
    };
    let assets: Vec<String> = asset_names(&assets_dir).into_iter().filter(|n| n != CONFIG_FILE).collect();
    let total: u64 = sizes.iter().sum();
    write_index_and_assets(&root, &weight_map, total, &config, &assets_dir, &assets)?;
    let out_dir = out.commit()?;
    Ok(Summary {
        out_dir,
        files: n_files,
        tensors: outputs.len(),
        bytes: total,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A model chunk's state dict: (name, tensor) in file order.
type StateDict = Vec<(String, torchfile::TensorRef)>;
/// The opened files by (tp rank, pp rank), each with its chunks' state dicts in vp order.
type Files = BTreeMap<(usize, usize), (TorchFile, Vec<StateDict>)>;
/// The file of each (tp rank, pp rank).
type Paths = BTreeMap<(usize, usize), PathBuf>;

/// Checks every file against the plan (every name present with the planned shape, nothing
/// else, one float dtype per logical tensor); returns each logical tensor's dtype.
fn check_files(iter_dir: &Path, plan: &MsPlan, files: &Files) -> Result<Vec<DType>, ConvertError> {
    let mut dtypes: Vec<Option<DType>> = vec![None; plan.tensors.len()];
    let mut problems = Vec::new();
    for f in &plan.files {
        let (tf, have) = &files[&(f.tp_rank, f.pp_rank)];
        let path = tf.path();
        if have.len() != f.chunks.len() {
            problems.push(format!(
                "{}: {} model chunks, the layout has {}",
                path.display(),
                have.len(),
                f.chunks.len()
            ));
            continue;
        }
        for ((key, want), got) in f.chunks.iter().zip(have) {
            let got: BTreeMap<&str, &torchfile::TensorRef> = got.iter().map(|(n, t)| (n.as_str(), t)).collect();
            for t in want {
                match got.get(t.name.as_str()) {
                    None => problems.push(format!("{}: {key}: missing {}", path.display(), t.name)),
                    Some(r) if r.shape != t.shape => problems.push(format!(
                        "{}: {key}: {} has shape {:?}, the layout needs {:?}",
                        path.display(),
                        t.name,
                        r.shape,
                        t.shape
                    )),
                    Some(r) => match dtype_of(path, &t.name, r.dtype) {
                        Ok(d) => {
                            for (i, _) in &t.pieces {
                                match dtypes[*i] {
                                    Some(prev) if prev != d => problems.push(format!(
                                        "{}: {key}: {} is {d}, other parts of {} are {prev}",
                                        path.display(),
                                        t.name,
                                        plan.tensors[*i].tensor.key
                                    )),
                                    _ => dtypes[*i] = Some(d),
                                }
                            }
                        }
                        Err(e) => problems.push(e.to_string()),
                    },
                }
            }
            let planned: BTreeSet<&str> = want.iter().map(|t| t.name.as_str()).collect();
            for name in got.keys().filter(|n| !planned.contains(*n)) {
                problems.push(format!("{}: {key}: unexpected {name}", path.display()));
            }
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(20);
        return Err(bad(
            iter_dir,
            format!(
            "the MindSpeed-MM checkpoint does not match the model of --assets-from and its layout ({n} problem{}):\n  {}",
            if n == 1 { "" } else { "s" },
            problems.join("\n  ")
        ),
        ));
    }
    Ok(dtypes.into_iter().map(|d| d.unwrap_or(DType::F32)).collect())
}

/// Logical tensor `i`, whole, from the pieces the plan puts in tp rank 0 (replicated) or every
/// rank (split).
fn assemble(plan: &MsPlan, files: &Files, i: usize, dtype: DType) -> Result<Vec<u8>, ConvertError> {
    let t = &plan.tensors[i].tensor;
    let es = dtype.size_bytes();
    let row_elems: usize = t.shape.iter().skip(1).product();
    let mut data = vec![0u8; t.shape.iter().product::<usize>() * es];
    let mut seen = 0usize;
    for f in &plan.files {
        let (tf, have) = &files[&(f.tp_rank, f.pp_rank)];
        for ((_, want), got) in f.chunks.iter().zip(have) {
            for ms in want {
                let mut row0 = 0;
                for (j, piece) in &ms.pieces {
                    let n = piece.rows.len();
                    if *j == i && seen < data.len() {
                        let r = &got.iter().find(|(name, _)| *name == ms.name).expect("checked").1;
                        let bytes = tf.tensor_bytes(r)?;
                        let ms_cols = ms.shape.iter().skip(1).product::<usize>();
                        let w = piece.cols.len();
                        for k in 0..n {
                            let src = ((row0 + k) * ms_cols) * es;
                            let dst = ((piece.rows.start + k) * row_elems + piece.cols.start) * es;
                            data[dst..dst + w * es].copy_from_slice(&bytes[src..src + w * es]);
                        }
                        seen += n * w * es;
                        drop(bytes);
                        tf.release_storage(&r.storage);
                    }
                    row0 += n;
                }
            }
        }
    }
    if seen < data.len() {
        return Err(ConvertError::Usage(format!("internal error: {} was not fully covered by the files", t.key)));
    }
    Ok(data)
}

/// What `inspect` says about a MindSpeed-MM checkpoint: the format, the split read off its
/// files, the other entries of a training save (args, optimizer, RNG …) and the tensor count.
pub fn describe(iter_dir: &Path) -> Result<String, ConvertError> {
    let Opened { files, tp, pp, vpp, vit, llm, others } = open_checkpoint(iter_dir)?;
    let tensors: usize = files.values().flat_map(|(_, c)| c).map(Vec::len).sum();
    let list = |l: &[usize]| l.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",");
    let mut s = String::new();
    s.push_str(&format!("MindSpeed-MM checkpoint (Megatron torch files, {MINDSPEED_FILE}): {}\n", iter_dir.display()));
    s.push_str(&format!(
        "layout:    tp {tp}, pp {pp}{}, llm_pp_layers {}, vit_pp_layers {}\n",
        if vpp > 1 { format!(", vpp {vpp}") } else { String::new() },
        list(&llm),
        list(&vit)
    ));
    s.push_str(&format!("files:     {} ({} tensors)\n", files.len(), tensors));
    let others: Vec<String> = others.into_iter().collect();
    s.push_str(&format!(
        "also:      {}\n",
        if others.is_empty() { "nothing else (a converted checkpoint)".to_string() } else { others.join(", ") }
    ));
    s.push_str("export:    mm-convert mm-to-hf --mm-dir <this> --hf-dir <out> --assets-from <its HF folder>\n");
    Ok(s)
}
