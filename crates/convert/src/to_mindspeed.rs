//! `hf-to-mm --format mindspeed`: an HF checkpoint into MindSpeed-MM's own layout, the Megatron
//! torch files `pretrain_vlm.py --load` reads (`mm_spec::checkpoint::plan_mindspeed` has the
//! rules). Same pipeline as the MM layout: resolve the layout, plan every file, map every
//! logical tensor to its HF source (checking keys, shapes and dtypes), then write each
//! `mp_rank_*/model_optim_rng.pt` with the torchfile writer, streamed piece by piece in a
//! staging folder renamed into place, the tracker (`release`) last.
//!
//! MindSpeed-MM always splits ViT heads unevenly when tp does not divide them (InternViT-6B's
//! 25 heads on 8 ranks), so the layout is resolved as unaligned for the ViT; the LLM's heads,
//! key/value groups and MLP must divide (its converter requires it too).

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use mm_spec::checkpoint::{latest_path, plan_mindspeed, write_mindspeed_file, MsFile, MsPlan, MINDSPEED_FILE};
use mm_spec::{DType, Iteration, LayoutRequest, MmLayout};

use crate::error::ConvertError;
use crate::hf::{Chunk, HfCheckpoint, SourcePart};
use crate::to_mm::{HfToMm, Summary};
use crate::write::{convert, run_parallel, thread_count, write_text, OutputDir};

pub fn hf_to_mindspeed(o: &HfToMm) -> Result<Summary, ConvertError> {
    let started = Instant::now();
    let mut out = OutputDir::prepare(&o.mm_dir, o.force)?;
    let ckpt = HfCheckpoint::open(&o.hf_dir)?;
    let arch = &ckpt.config.arch;
    if arch.llm.tie_word_embeddings {
        return Err(ConvertError::Config {
            path: ckpt.dir.join(crate::hf::CONFIG_FILE),
            message: "ties the output layer to the embedding; MindSpeed-MM's InternVL3 layout has an untied \
                      output_layer (every InternVL3 size ships one): write our layout instead (no --format)"
                .into(),
        });
    }
    let req = LayoutRequest { unaligned_linear: true, ..o.layout.clone() };
    let layout = MmLayout::resolve(arch, &req).map_err(|e| ConvertError::LayoutMismatch {
        path: ckpt.dir.join(crate::hf::CONFIG_FILE),
        message: format!("{e}\n(mm-convert spells the options --tp, --vpp, --llm-pp-layers, --vit-pp-layers)"),
    })?;
    let plan = plan_mindspeed(arch, &layout)?;
    let sources =
        ckpt.map_sources(plan.tensors.iter().map(|p| (p.tensor.key.as_str(), p.tensor.shape.as_slice())), o.dtype)?;
    let dtypes: Vec<DType> =
        sources.iter().map(|parts| o.dtype.or(parts.first().map(|p| p.dtype)).unwrap_or(DType::F32)).collect();
    tracing::info!(
        "{} ({} layout) → MindSpeed-MM torch files, tp {} pp {}{} ({} files)",
        ckpt.dir.display(),
        ckpt.layout,
        layout.tp,
        layout.pp,
        layout.vpp.map(|v| format!(" vpp {v}")).unwrap_or_default(),
        plan.files.len()
    );

    let iteration = Iteration::Release;
    let root = out.create()?.to_path_buf();
    let iter_dir = root.join(iteration.dir_name());
    fs::create_dir(&iter_dir).map_err(|e| ConvertError::io("create", &iter_dir, e))?;
    let bytes_of = |f: &MsFile| -> u64 {
        f.chunks
            .iter()
            .flat_map(|(_, ts)| ts)
            .map(|t| {
                let dtype = t.pieces.first().map_or(DType::F32, |(i, _)| dtypes[*i]);
                (t.shape.iter().product::<usize>() * dtype.size_bytes()) as u64
            })
            .sum()
    };
    let jobs: Vec<(usize, u64)> = plan.files.iter().enumerate().map(|(i, f)| (i, bytes_of(f))).collect();
    let threads = thread_count(o.threads, jobs.len());
    run_parallel(
        &jobs,
        threads,
        |j| j.1,
        |&(i, _), cancel| {
            let f = &plan.files[i];
            let dir = iter_dir.join(&f.dir);
            fs::create_dir(&dir).map_err(|e| ConvertError::io("create", &dir, e))?;
            write_file(&ckpt, &plan, f, &sources, &dtypes, &dir.join(MINDSPEED_FILE), cancel)
        },
    )?;
    write_text(&latest_path(&root), &iteration.latest_text())?;
    let out_dir = out.commit()?;
    Ok(Summary {
        out_dir,
        files: plan.files.len(),
        tensors: plan.files.iter().flat_map(|f| &f.chunks).map(|(_, ts)| ts.len()).sum(),
        bytes: jobs.iter().map(|j| j.1).sum(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Writes one `model_optim_rng.pt` (mm-spec's writer: the object tree first), each tensor's
/// bytes piece by piece from the mapped HF files, converted on the way.
fn write_file(
    ckpt: &HfCheckpoint,
    plan: &MsPlan,
    file: &MsFile,
    sources: &[Vec<SourcePart>],
    dtypes: &[DType],
    path: &std::path::Path,
    cancel: &AtomicBool,
) -> Result<(), ConvertError> {
    let mut scratch = Vec::new();
    write_mindspeed_file(
        path,
        file,
        |i| dtypes[i],
        Vec::new(),
        |w, t, i, piece| {
            if cancel.load(Ordering::Relaxed) {
                return Err(ConvertError::Cancelled("another output file failed".into()));
            }
            let row_elems: usize = plan.tensors[i].tensor.shape.iter().skip(1).product();
            let to = dtypes[i];
            ckpt.stream_pieces(&sources[i], row_elems, std::slice::from_ref(piece), |chunk| match chunk {
                Chunk::Bytes { bytes, from } => {
                    scratch.clear();
                    convert(bytes, from, to, &mut scratch);
                    Ok(w.write(&scratch)?)
                }
                Chunk::Zeros(_) => Err(ConvertError::Usage(format!(
                    "internal error: {} asks for padding, which MindSpeed-MM's layout has none of",
                    t.name
                ))),
            })
        },
    )?;
    Ok(())
}
