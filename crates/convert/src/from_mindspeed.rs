//! `mm-to-hf` from MindSpeed-MM's own checkpoints: the Megatron torch files its converter and its
//! training write (`release/` or `iter_NNNNNNN/`, `mp_rank_*/model_optim_rng.pt`, with or
//! without optimizer state, with vpp `model0`, `model1`, …), read with the torchfile reader (no
//! code from the file runs; only the `model*` entries are used).
//!
//! A MindSpeed checkpoint carries no config.json: the architecture comes from `--assets-from`
//! (the HF folder it was converted from; the seed's `mm_to_hf` spelling passes it), or from the
//! `hf_assets/` that mm-engine's `--ckpt-format torch` saves carry. Opening,
//! reading the split off the files, checking them against `plan_mindspeed` (names, shapes,
//! dtypes) and assembling logical tensors is mm-spec's `MindSpeedCheckpoint`, shared with
//! mm-engine's `--load`; everything is checked before anything is written. Each logical tensor is assembled in memory (the
//! largest, the 78B's embedding, is 2.5 GB in bf16) and written to the export.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use mm_spec::checkpoint::{
    has_mindspeed_files, iteration_dir, Iteration, Located, MindSpeedCheckpoint, MINDSPEED_FILE,
};
use mm_spec::{HfLayout, ModelPreset};

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

pub fn mindspeed_to_hf(o: &MmToHf, iter_dir: &Path) -> Result<Summary, ConvertError> {
    let started = Instant::now();
    let mut out = OutputDir::prepare(&o.hf_dir, o.force)?;
    let ms = MindSpeedCheckpoint::open(iter_dir)?;
    if let Some(expect) = &o.expect {
        check_expected(iter_dir, expect, ms.tp, &ms.llm_layers, &ms.vit_layers)?;
    }
    // mm-engine's `--ckpt-format torch` saves carry their config in hf_assets/; MindSpeed-MM's
    // own files carry none.
    let own = iter_dir.join(mm_spec::checkpoint::HF_ASSETS_DIR);
    let assets_dir =
        o.assets_from.clone().or_else(|| own.join(CONFIG_FILE).is_file().then_some(own)).ok_or_else(|| {
            bad(
                iter_dir,
                "is a MindSpeed-MM checkpoint, which carries no config.json: pass --assets-from <the HF folder it was \
             converted from> (the seed's mm_to_hf spelling does, with --cfg.hf_config.hf_dir)",
            )
        })?;
    let source = read_config(&assets_dir)?;
    let arch: ModelPreset = source.arch.clone();
    let (_, plan) = ms.plan(&arch, &assets_dir.join(CONFIG_FILE))?;
    // The export reads every byte anyway: a damaged file is an error, not a silent export.
    ms.verify_crc()?;
    let dtypes = ms.check(&plan)?;

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
                cached = Some((*i, ms.assemble(&plan, *i, dtypes[*i])?));
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

/// What `inspect` says about a MindSpeed-MM checkpoint: the format, the split read off its
/// files, the other entries of a training save (args, optimizer, RNG …) and the tensor count.
pub fn describe(iter_dir: &Path) -> Result<String, ConvertError> {
    let ms = MindSpeedCheckpoint::open(iter_dir)?;
    let (tp, pp, vpp, vit, llm) = (ms.tp, ms.pp, ms.vpp, &ms.vit_layers, &ms.llm_layers);
    let list = |l: &[usize]| l.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",");
    let mut s = String::new();
    s.push_str(&format!("MindSpeed-MM checkpoint (Megatron torch files, {MINDSPEED_FILE}): {}\n", iter_dir.display()));
    s.push_str(&format!(
        "layout:    tp {tp}, pp {pp}{}, llm_pp_layers {}, vit_pp_layers {}\n",
        if vpp > 1 { format!(", vpp {vpp}") } else { String::new() },
        list(llm),
        list(vit)
    ));
    s.push_str(&format!("files:     {} ({} tensors)\n", ms.file_count(), ms.tensor_count()));
    let others: Vec<String> = ms.others.iter().cloned().collect();
    s.push_str(&format!(
        "also:      {}\n",
        if others.is_empty() { "nothing else (a converted checkpoint)".to_string() } else { others.join(", ") }
    ));
    s.push_str("export:    mm-convert mm-to-hf --mm-dir <this> --hf-dir <out> --assets-from <its HF folder>\n");
    Ok(s)
}
