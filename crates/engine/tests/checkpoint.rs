//! Checkpoint loading through the library: every key problem reported at once, and MM
//! checkpoints split for tp/pp merged back into the whole model.

use std::collections::BTreeMap;

use mm_engine::model::InternVL;
use mm_engine::weights::checkpoint::{resolve, Source};
use mm_engine::weights::hf::{self, HfCheckpoint};
use mm_engine::weights::safetensors as st;
use mm_spec::checkpoint::{plan_checkpoint, DType, Iteration, LayoutRequest, Manifest, MmLayout, LATEST_FILE};
use mm_spec::hf::original_key as from_mm;
use mm_spec::{preset, ModelPreset};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn model(p: &ModelPreset, seed: i64) -> VarStore {
    tch::manual_seed(seed);
    let vs = VarStore::new(Device::Cpu);
    let _m = InternVL::new(&vs.root(), p, 5, false);
    vs
}

fn sorted(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn a_mismatched_checkpoint_reports_every_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = preset("tiny").unwrap();
    hf::save(dir.path(), &tiny, &sorted(&model(&tiny, 0)), 1 << 30).unwrap();
    // The 6B-flavoured ViT (q/k norms, no biases) with a bigger vocabulary.
    let mut other = preset("tiny6b").unwrap();
    other.llm.vocab_size = 600;
    let target = model(&other, 1);
    let before: Vec<(String, Tensor)> = sorted(&target).into_iter().map(|(n, t)| (n, t.copy())).collect();
    let ck = HfCheckpoint::open(dir.path()).unwrap();
    let err = hf::load_into(&target, &ck, false, None).unwrap_err().to_string();
    for want in [
        "missing: vision_model.encoder.layers.0.attn.q_norm.weight",
        "missing: vision_model.encoder.layers.1.attn.k_norm.weight",
        "unexpected: vision_model.encoder.layers.0.norm1.bias",
        "unexpected: vision_model.encoder.layers.1.attn.qkv.bias",
        "mis-shaped: language_model.model.embed_tokens.weight: model [600, 64], checkpoint [512, 64]",
        "mis-shaped: language_model.lm_head.weight",
    ] {
        assert!(err.contains(want), "{want:?} not in:\n{err}");
    }
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
    // Nothing was copied: the target keeps its own init.
    for ((n, a), (_, b)) in sorted(&target).iter().zip(&before) {
        assert!(a.equal(b), "{n} changed although the load failed");
    }
}

#[test]
fn an_mm_checkpoint_split_for_tp2_pp2_loads_as_the_whole_model() {
    let arch = preset("tiny").unwrap();
    let src = model(&arch, 3);
    let weights: BTreeMap<String, Tensor> = sorted(&src).into_iter().collect();
    let layout = MmLayout::resolve(
        &arch,
        &LayoutRequest {
            tp: 2,
            llm_pp_layers: Some(vec![1, 1]),
            vit_pp_layers: Some(vec![2, 0]),
            ..Default::default()
        },
    )
    .unwrap();
    let plan = plan_checkpoint(&arch, &layout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let iter = dir.path().join("release");
    // Cut every tensor into its shards the way the plan describes (rows past the tensor are
    // the zero padding of vocab-parallel tensors).
    let mut files: BTreeMap<String, Vec<(String, Tensor)>> = BTreeMap::new();
    for t in &plan {
        let name = from_mm(&t.key).unwrap();
        let full = weights[&name].reshape([t.shape[0] as i64, -1]);
        for (tp_rank, shard) in t.shards.iter().enumerate() {
            let parts: Vec<Tensor> = shard
                .pieces
                .iter()
                .map(|p| {
                    let n = p.rows.len() as i64;
                    let have = (t.shape[0] as i64 - p.rows.start as i64).clamp(0, n);
                    let cols = full.narrow(1, p.cols.start as i64, p.cols.len() as i64);
                    let real = cols.narrow(0, p.rows.start.min(t.shape[0]) as i64, have);
                    Tensor::cat(&[real, Tensor::zeros([n - have, p.cols.len() as i64], (Kind::Float, Device::Cpu))], 0)
                })
                .collect();
            let shape: Vec<i64> = shard.shape.iter().map(|&d| d as i64).collect();
            let rel = mm_spec::checkpoint::shard_rel_path(tp_rank, t.pp_rank, layout.pp);
            files.entry(rel).or_default().push((t.local_key.clone(), Tensor::cat(&parts, 0).reshape(shape)));
        }
    }
    for (rel, tensors) in &files {
        let path = iter.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        st::write(&path, tensors, &BTreeMap::new()).unwrap();
    }
    assert_eq!(files.len(), 4, "tp 2 × pp 2 files");
    let manifest = Manifest::new(Iteration::Release, &arch, &layout, &plan, |_| DType::F32);
    std::fs::write(iter.join("manifest.json"), serde_json::to_string(&manifest).unwrap()).unwrap();
    std::fs::write(dir.path().join(LATEST_FILE), "release").unwrap();

    let source = resolve(dir.path(), None).unwrap();
    assert!(matches!(source, Source::Mm { .. }));
    assert_eq!(source.iteration(), None, "a converted checkpoint is not a training state");
    let target = model(&arch, 4);
    source.load_weights(&target, false, None).unwrap();
    for (name, t) in sorted(&target) {
        assert!(t.equal(&weights[&name]), "{name} differs after merging the shards");
    }
}

#[test]
fn a_checkpoint_without_lm_head_loads_tied_and_saves_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = preset("tiny").unwrap();
    let weights: Vec<(String, Tensor)> =
        sorted(&model(&tiny, 5)).into_iter().filter(|(n, _)| n != "language_model.lm_head.weight").collect();
    hf::save(dir.path(), &tiny, &weights, 1 << 30).unwrap();
    mm_engine::synth::write_tokenizer(dir.path(), &["a red circle".to_string()], 512).unwrap();
    let s = mm_engine::session::Session::open(mm_engine::session::SessionOptions {
        model: "tiny",
        load: Some(dir.path()),
        tokenizer: None,
        device: Device::Cpu,
        seed: 0,
        bf16: false,
        vit_drop_path_rate: None,
        parts: None,
        tp: None,
    })
    .unwrap();
    assert!(s.model.language_model.lm_head.is_none());
    assert!(s.preset.llm.tie_word_embeddings);
    // Split over pipeline stages, a tied head would be two unsynchronised copies: refused.
    let first_stage = |_: &mm_spec::ModelPreset| {
        let part = mm_engine::model::StagePart { first: true, llm_layers: 0..1, last: false };
        Ok(mm_engine::session::RankModel { parts: vec![part], slices: None })
    };
    let e = mm_engine::session::Session::open(mm_engine::session::SessionOptions {
        model: "tiny",
        load: Some(dir.path()),
        tokenizer: None,
        device: Device::Cpu,
        seed: 0,
        bf16: false,
        vit_drop_path_rate: None,
        parts: Some(&first_stage),
        tp: None,
    })
    .err()
    .expect("a tied head over pipeline stages is refused");
    assert!(format!("{e:#}").contains("cannot split over pipeline stages"), "{e:#}");
    let state = mm_engine::train::checkpoint::TrainerState {
        iteration: 1,
        consumed_samples: 1,
        data_position: 1,
        optimizer_step: None,
        seed: None,
        train_iters: 1,
        global_batch_size: 1,
        lr: 0.0,
        loss: 0.0,
        data_parallel_size: None,
        optimizer_layout: None,
    };
    let save = dir.path().join("save");
    let out = mm_engine::train::checkpoint::save(mm_engine::train::checkpoint::SaveRequest {
        format: Default::default(),
        layout: mm_spec::LayoutRequest { tp: 1, ..Default::default() },
        rank: mm_engine::train::checkpoint::RankDir::SINGLE,
        save_dir: &save,
        iteration: 1,
        preset: &s.preset,
        weights: &s.named_parameters(),
        optimizer: None,
        state: &state,
        assets_from: s.assets.clone(),
    })
    .unwrap();
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest.tensors.iter().all(|t| t.key != "llm.lm_head.weight"));
    manifest.verify().unwrap();
    let back = resolve(&save, None).unwrap();
    assert_eq!(back.iteration(), Some(1));
    assert!(!back.has_lm_head());
}
