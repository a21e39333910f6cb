//! `hf-to-mm`: an HF checkpoint split into the MM layout, streamed.
//!
//! Order of work: refuse an existing output → open the HF folder (config, every header) →
//! resolve the layout against config.json → plan every tensor (mm_spec) → map every planned
//! tensor to its HF source, checking keys, shapes and dtypes → only then create
//! `.<mm_dir name>.tmp-<pid>` beside it, write one safetensors file per (tp, pp) rank in
//! parallel, the manifest, the assets and `latest_checkpointed_iteration.txt`, and rename it
//! into place.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use mm_spec::checkpoint::{
    file_order, iteration_dir, latest_path, plan_checkpoint, rank_dir_name, PlannedTensor, SourceInfo, FORMAT_VERSION,
    HF_ASSETS_DIR, MANIFEST_FILE, SHARD_FILE,
};
use mm_spec::{DType, Iteration, LayoutRequest, Manifest, MmLayout};

use crate::error::ConvertError;
use crate::hf::{Chunk, HfCheckpoint, SourcePart};
use crate::write::{
    copy_files, run_parallel, st_dtype, thread_count, write_text, OutputDir, SafetensorsWriter, TensorHeader,
};

/// Which checkpoint layout `hf-to-mm` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// Ours: `mp_rank_*/model.safetensors` with a manifest (mm-engine loads it).
    #[default]
    Mm,
    /// MindSpeed-MM's Megatron torch files (`mp_rank_*/model_optim_rng.pt`).
    Mindspeed,
}

/// Options of `hf-to-mm`.
#[derive(Debug, Clone)]
pub struct HfToMm {
    pub format: OutputFormat,
    pub hf_dir: PathBuf,
    pub mm_dir: PathBuf,
    pub layout: LayoutRequest,
    /// Convert every tensor to this dtype; None keeps each tensor's dtype.
    pub dtype: Option<DType>,
    pub force: bool,
    pub threads: Option<usize>,
}

/// What a conversion wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub out_dir: PathBuf,
    pub files: usize,
    pub tensors: usize,
    pub bytes: u64,
    pub seconds: f64,
}

pub fn hf_to_mm(o: &HfToMm) -> Result<Summary, ConvertError> {
    if o.format == OutputFormat::Mindspeed {
        return crate::to_mindspeed::hf_to_mindspeed(o);
    }
    let started = Instant::now();
    let mut out = OutputDir::prepare(&o.mm_dir, o.force)?;
    let ckpt = HfCheckpoint::open(&o.hf_dir)?;
    let arch = &ckpt.config.arch;
    let layout = MmLayout::resolve(arch, &o.layout).map_err(|e| ConvertError::LayoutMismatch {
        path: ckpt.dir.join(crate::hf::CONFIG_FILE),
        message: format!(
            "{e}\n(mm-convert spells the options --tp, --vpp, --llm-pp-layers, --vit-pp-layers, --unaligned-linear)"
        ),
    })?;
    let plan = plan_checkpoint(arch, &layout)?;
    let sources = ckpt.map_sources(plan.iter().map(|t| (t.key.as_str(), t.shape.as_slice())), o.dtype)?;
    // Every part of a tensor has one dtype unless --dtype converts them (map_sources checked).
    let dtypes: Vec<DType> =
        sources.iter().map(|parts| o.dtype.or(parts.first().map(|p| p.dtype)).unwrap_or(DType::F32)).collect();

    let iteration = Iteration::Release;
    let assets = ckpt.asset_names();
    let mut manifest = Manifest::new(iteration, arch, &layout, &plan, |i| dtypes[i]);
    manifest.source = Some(SourceInfo {
        hf_dir: ckpt.dir.display().to_string(),
        layout: ckpt.layout,
        files: ckpt.files.len(),
        tensors: ckpt.keys.len(),
        bytes: ckpt.total_bytes(),
    });
    manifest.dtype = o.dtype;
    manifest.hf_assets = assets.clone();
    tracing::info!(
        "{} ({} layout, {} tensors) → tp {} pp {}{} ({} files)",
        ckpt.dir.display(),
        ckpt.layout,
        ckpt.keys.len(),
        layout.tp,
        layout.pp,
        layout.vpp.map(|v| format!(" vpp {v}")).unwrap_or_default(),
        manifest.files.len()
    );

    let root = out.create()?.to_path_buf();
    let iter_dir = iteration_dir(&root, iteration);
    fs::create_dir(&iter_dir).map_err(|e| ConvertError::io("create", &iter_dir, e))?;
    for (tp, pp, _) in layout.files() {
        let d = iter_dir.join(rank_dir_name(tp, pp, layout.pp));
        fs::create_dir(&d).map_err(|e| ConvertError::io("create", &d, e))?;
    }

    let jobs: Vec<(usize, usize, u64)> = manifest.files.iter().map(|f| (f.tp_rank, f.pp_rank, f.bytes)).collect();
    let threads = thread_count(o.threads, jobs.len());
    run_parallel(
        &jobs,
        threads,
        |j| j.2,
        |&(tp, pp, _), cancel| {
            let path = iter_dir.join(rank_dir_name(tp, pp, layout.pp)).join(SHARD_FILE);
            write_shard(&ckpt, &plan, &sources, &dtypes, tp, pp, &path, cancel)
        },
    )?;

    let manifest_json = serde_json::to_string_pretty(&manifest)
        .map_err(|e| ConvertError::Usage(format!("internal error: manifest does not serialize: {e}")))?;
    write_text(&iter_dir.join(MANIFEST_FILE), &manifest_json)?;
    copy_files(&ckpt.dir, &iter_dir.join(HF_ASSETS_DIR), &assets)?;
    write_text(&latest_path(&root), &iteration.latest_text())?;
    let out_dir = out.commit()?;
    Ok(Summary {
        out_dir,
        files: manifest.files.len(),
        tensors: plan.len(),
        bytes: manifest.files.iter().map(|f| f.bytes).sum(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Writes tp rank `tp`'s file of pp rank `pp`.
#[allow(clippy::too_many_arguments)]
fn write_shard(
    ckpt: &HfCheckpoint,
    plan: &[PlannedTensor],
    sources: &[Vec<SourcePart>],
    dtypes: &[DType],
    tp: usize,
    pp: usize,
    path: &std::path::Path,
    cancel: &AtomicBool,
) -> Result<(), ConvertError> {
    let order = file_order(plan, pp);
    let headers = order
        .iter()
        .map(|&i| TensorHeader {
            name: plan[i].local_key.clone(),
            dtype: st_dtype(dtypes[i]),
            shape: plan[i].shards[tp].shape.clone(),
        })
        .collect();
    let version = FORMAT_VERSION.to_string();
    let mut w = SafetensorsWriter::create(path, headers, &[("format", "pt"), ("mm_format_version", &version)])?;
    for &i in &order {
        if cancel.load(Ordering::Relaxed) {
            return Err(ConvertError::Cancelled("another output file failed".into()));
        }
        let t = &plan[i];
        let parts = &sources[i];
        let row_elems: usize = t.shape.iter().skip(1).product();
        let to = dtypes[i];
        ckpt.stream_pieces(parts, row_elems, &t.shards[tp].pieces, |chunk| match chunk {
            Chunk::Bytes { bytes, from } => w.write_converted(bytes, from, to).map_err(Into::into),
            Chunk::Zeros(n) => w.write_zeros(n * to.size_bytes()).map_err(Into::into),
        })?;
        w.end_tensor()?;
    }
    w.finish()?;
    Ok(())
}
