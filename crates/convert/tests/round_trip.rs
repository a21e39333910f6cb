//! hf → mm (any tp, pp, vpp) → hf gives bit-identical tensors and the same key set, for every
//! HF layout, at the 8B's and the 78B's depths and stage splits (small widths).

mod common;

use common::*;
use mm_spec::{preset, HfLayout};

/// Converts `hf` to MM with `args`, back to HF, and checks the round trip; returns the MM dir.
fn round_trip(root: &std::path::Path, hf: &std::path::Path, args: &[&str]) -> std::path::PathBuf {
    let mm = root.join("mm");
    let back = root.join("back");
    let mut a = vec!["hf-to-mm", "--hf-dir", s(hf), "--mm-dir", s(&mm)];
    a.extend_from_slice(args);
    run(&a, 0);
    assert_eq!(std::fs::read_to_string(mm.join("latest_checkpointed_iteration.txt")).unwrap(), "release");
    run(&["mm-to-hf", "--mm-dir", s(&mm), "--hf-dir", s(&back), "--max-shard-size", "300KB"], 0);
    assert_same_tensors(&read_hf(hf), &read_hf(&back));
    // config and tokenizer files come back verbatim.
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "merges.txt"] {
        assert_eq!(std::fs::read(hf.join(f)).unwrap(), std::fs::read(back.join(f)).unwrap(), "{f}");
    }
    assert!(back.join("model.safetensors.index.json").is_file());
    mm
}

#[test]
fn tiny_original_sharded_tp2_pp2() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    synth(&hf, preset("tiny").unwrap(), HfLayout::Original, 1, true);
    assert!(hf.join("model.safetensors.index.json").is_file(), "input is sharded");
    let mm = round_trip(root.path(), &hf, &["--tp", "2", "--llm-pp-layers", "1,1", "--vit-pp-layers", "2,0"]);
    let names: Vec<String> = entries_starting_with(&release(&mm), "mp_rank_");
    assert_eq!(names.len(), 4);
    for d in ["mp_rank_00_000", "mp_rank_01_000", "mp_rank_00_001", "mp_rank_01_001"] {
        assert!(release(&mm).join(d).join("model.safetensors").is_file(), "{d}");
    }
    assert!(release(&mm).join("hf_assets/configuration_internvl_chat.py").is_file(), "remote code copied");
}

#[test]
fn tiny_hf_layout_tp2_single_stage() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    synth(&hf, preset("tiny").unwrap(), HfLayout::Hf, 2, false);
    let mm = round_trip(root.path(), &hf, &["--tp", "2"]);
    // pp 1: Megatron's spelling without the pp rank.
    assert!(release(&mm).join("mp_rank_01/model.safetensors").is_file());
    assert_eq!(manifest(&mm)["source"]["layout"], "hf");
}

#[test]
fn tiny6b_prefixed_layout_with_vpp() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    let mut arch = preset("tiny6b").unwrap();
    arch.llm.num_hidden_layers = 4;
    synth(&hf, arch, HfLayout::HfPrefixed, 3, true);
    let mm = round_trip(
        root.path(),
        &hf,
        &["--tp", "2", "--vpp", "2", "--llm-pp-layers", "1,1,1,1", "--vit-pp-layers", "2,0,0,0"],
    );
    // pp rank 1 holds chunks 1 and 3: LLM layers 1 and 3, as chunk0./chunk1. layer 0.
    let shard = read_shard(&mm, "mp_rank_00_001");
    assert!(shard.contains_key("chunk0.llm.layers.0.mlp.up_proj.weight"));
    assert!(shard.contains_key("chunk1.llm.layers.0.mlp.up_proj.weight"));
    assert!(shard.contains_key("chunk1.llm.lm_head.weight"));
    assert!(shard.keys().all(|k| k.starts_with("chunk0.") || k.starts_with("chunk1.")), "{:?}", shard.keys());
    let src = read_hf(&hf);
    assert_eq!(
        shard["chunk1.llm.layers.0.input_layernorm.weight"].data,
        src["model.language_model.layers.3.input_layernorm.weight"].data
    );
}

/// The seed recipe's split: 28 LLM layers as 6,8,8,6, the ViT on stage 0.
#[test]
fn depth_8b_6_8_8_6_tp2() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    synth(&hf, tiny_8b_depth(), HfLayout::Original, 4, true);
    let mm = round_trip(root.path(), &hf, &["--tp", "2", "--llm-pp-layers", "6,8,8,6", "--vit-pp-layers", "24,0,0,0"]);
    let src = read_hf(&hf);
    // Stage 2 holds LLM layers 14..22 as layers 0..8.
    let stage2 = read_shard(&mm, "mp_rank_00_002");
    let mut layers: Vec<usize> = stage2
        .keys()
        .filter_map(|k| k.strip_prefix("llm.layers.").and_then(|r| r.split('.').next()).and_then(|n| n.parse().ok()))
        .collect();
    layers.sort_unstable();
    layers.dedup();
    assert_eq!(layers, (0..8).collect::<Vec<_>>());
    for (local, global) in [(0, 14), (7, 21)] {
        assert_eq!(
            stage2[&format!("llm.layers.{local}.post_attention_layernorm.weight")].data,
            src[&format!("language_model.model.layers.{global}.post_attention_layernorm.weight")].data
        );
    }
    assert!(!stage2.keys().any(|k| k.starts_with("vision.") || k.starts_with("projector.")));
    // The ViT, the projector and the embeddings on stage 0; norm and lm_head on stage 3.
    let stage0 = read_shard(&mm, "mp_rank_01_000");
    assert!(stage0.contains_key("vision.encoder.layers.23.ls2"));
    assert!(stage0.contains_key("projector.linear_2.weight"));
    assert!(stage0.contains_key("llm.embed_tokens.weight"));
    let stage3 = read_shard(&mm, "mp_rank_01_003");
    assert!(stage3.contains_key("llm.norm.weight") && stage3.contains_key("llm.lm_head.weight"));
    assert!(
        stage3.contains_key("llm.layers.5.mlp.down_proj.weight")
            && !stage3.contains_key("llm.layers.6.mlp.down_proj.weight")
    );
}

/// The 78B recipe: TP 8 PP 2, LLM 40,40, ViT 45,0, 25 ViT heads → --unaligned-linear.
#[test]
fn depth_78b_tp8_pp2_unaligned_both_layouts() {
    for (layout, seed) in [(HfLayout::Original, 5), (HfLayout::Hf, 6)] {
        let root = tempfile::tempdir().unwrap();
        let hf = root.path().join("hf");
        synth(&hf, small_78b(), layout, seed, true);
        let mm = round_trip(
            root.path(),
            &hf,
            &["--tp", "8", "--llm-pp-layers", "40,40", "--vit-pp-layers", "45,0", "--unaligned-linear"],
        );
        let m = manifest(&mm);
        assert_eq!(m["parallel"]["tp"], 8);
        assert_eq!(m["parallel"]["unaligned_linear"], true);
        assert_eq!(m["padded_vocab_size"], 1024);
        assert_eq!(m["files"].as_array().unwrap().len(), 16);
    }
}

/// Export to the other layout: the -hf q/k/v are the rows of the fused qkv, and the generated
/// config reads back as the same model.
#[test]
fn cross_layout_export() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    let mm = root.path().join("mm");
    synth(&hf, preset("tiny").unwrap(), HfLayout::Original, 7, false);
    run(&["hf-to-mm", "--hf-dir", s(&hf), "--mm-dir", s(&mm), "--tp", "2"], 0);
    let out = root.path().join("as-hf");
    run(&["mm-to-hf", "--mm-dir", s(&mm), "--hf-dir", s(&out), "--layout", "hf"], 0);
    let src = read_hf(&hf);
    let exp = read_hf(&out);
    let c = 64;
    let qkv = &src["vision_model.encoder.layers.1.attn.qkv.weight"];
    let row = c * 2;
    for (j, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
        let t = &exp[&format!("vision_tower.encoder.layer.1.attention.{name}.weight")];
        assert_eq!(t.shape, vec![c, c]);
        assert_eq!(t.data, rows(&qkv.data, row, j * c..(j + 1) * c), "{name}");
    }
    assert_eq!(exp["multi_modal_projector.linear_1.weight"].data, src["mlp1.1.weight"].data);
    assert_eq!(exp["vision_tower.encoder.layer.0.lambda_2"].data, src["vision_model.encoder.layers.0.ls2"].data);
    assert_eq!(exp.len(), src.len() + 2 * 2 * 2, "q/k/v weight and bias per layer replace qkv");
    let cfg = mm_convert::hf::read_config(&out).unwrap();
    assert!(cfg.native());
    let mut arch = cfg.arch.clone();
    arch.name = "tiny".into();
    arch.vision.drop_path_rate = 0.0;
    assert_eq!(arch, preset("tiny").unwrap());

    // And back: the -hf export converts again and exports to the original layout identically.
    let mm2 = root.path().join("mm2");
    let orig = root.path().join("orig");
    run(&["hf-to-mm", "--hf-dir", s(&out), "--mm-dir", s(&mm2), "--tp", "1", "--llm-pp-layers", "1,1"], 0);
    run(&["mm-to-hf", "--mm-dir", s(&mm2), "--hf-dir", s(&orig), "--layout", "original"], 0);
    assert_same_tensors(&src, &read_hf(&orig));
    assert!(!mm_convert::hf::read_config(&orig).unwrap().native());
}

/// --dtype converts per tensor; bf16 → fp32 → bf16 is exact.
#[test]
fn dtype_conversion_round_trips_through_fp32() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    let mm = root.path().join("mm");
    let back = root.path().join("back");
    synth(&hf, preset("tiny").unwrap(), HfLayout::Hf, 8, false);
    run(&["hf-to-mm", "--hf-dir", s(&hf), "--mm-dir", s(&mm), "--tp", "2", "--dtype", "fp32"], 0);
    let shard = read_shard(&mm, "mp_rank_00");
    assert!(shard.values().all(|t| t.dtype == "F32"));
    assert_eq!(manifest(&mm)["dtype"], "F32");
    run(&["mm-to-hf", "--mm-dir", s(&mm), "--hf-dir", s(&back), "--dtype", "bf16"], 0);
    assert_same_tensors(&read_hf(&hf), &read_hf(&back));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(back.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
}

/// --force replaces an existing output only after the new one is complete.
#[test]
fn force_replaces_existing_output() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    let mm = root.path().join("mm");
    synth(&hf, preset("tiny").unwrap(), HfLayout::Original, 9, false);
    run(&["hf-to-mm", "--hf-dir", s(&hf), "--mm-dir", s(&mm)], 0);
    let o = run(&["hf-to-mm", "--hf-dir", s(&hf), "--mm-dir", s(&mm), "--tp", "2"], 2);
    assert!(stderr(&o).contains("already exists") && stderr(&o).contains("--force"), "{}", stderr(&o));
    assert!(release(&mm).join("mp_rank_00/model.safetensors").is_file(), "old output untouched");
    run(&["hf-to-mm", "--hf-dir", s(&hf), "--mm-dir", s(&mm), "--tp", "2", "--force"], 0);
    assert_eq!(manifest(&mm)["parallel"]["tp"], 2);
    assert_eq!(entries_starting_with(root.path(), "mm").len(), 1, "no .tmp or .old left");
}
