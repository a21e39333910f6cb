//! The command line: the seed's spelling end to end, `inspect` of both kinds with the recipe
//! check and its exit codes, and usage errors.

mod common;

use common::*;
use mm_spec::{preset, HfLayout};

#[test]
fn seed_spelling_converts_like_the_native_one() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("raw_ckpt/InternVL3-8B");
    synth(&hf, tiny_8b_depth(), HfLayout::Original, 31, true);
    let seed = root.path().join("pretrained/seed");
    let native = root.path().join("pretrained/native");
    run(
        &[
            "InternVLConverter",
            "hf_to_mm",
            "--cfg.mm_dir",
            s(&seed),
            "--cfg.hf_config.hf_dir",
            s(&hf),
            "--cfg.parallel_config.llm_pp_layers",
            "[[6,8,8,6]]",
            "--cfg.parallel_config.vit_pp_layers",
            "[[24,0,0,0]]",
            "--cfg.parallel_config.tp_size",
            "2",
            "--cfg.trust_remote_code",
            "True",
        ],
        0,
    );
    run(
        &[
            "hf-to-mm",
            "--hf-dir",
            s(&hf),
            "--mm-dir",
            s(&native),
            "--llm-pp-layers",
            "6,8,8,6",
            "--vit-pp-layers",
            "24,0,0,0",
            "--tp",
            "2",
            "--format",
            "mindspeed",
        ],
        0,
    );
    // The seed's spelling writes MindSpeed-MM's torch files, as its converter does.
    for rank in ["mp_rank_00_000", "mp_rank_01_002", "mp_rank_01_003"] {
        let seed_file = read_torch(&release(&seed).join(rank).join("model_optim_rng.pt"));
        assert!(!seed_file.is_empty(), "{rank}");
        assert_eq!(seed_file, read_torch(&release(&native).join(rank).join("model_optim_rng.pt")), "{rank}");
    }
    // VPP through nested lists: 3 inner lists → vpp 3, chunk-major.
    let vpp = root.path().join("pretrained/vpp");
    run(
        &[
            "InternVLConverter",
            "hf_to_mm",
            "--cfg.mm_dir",
            s(&vpp),
            "--cfg.hf_config.hf_dir",
            s(&hf),
            "--cfg.parallel_config.llm_pp_layers",
            "[[0,0,0,1],[4,4,4,4],[3,3,3,2]]",
            "--cfg.parallel_config.vit_pp_layers",
            "[[6,7,7,4],[0,0,0,0],[0,0,0,0]]",
        ],
        0,
    );
    // pp 4 rank folders, each with model0..model2 (vpp 3). LLM layer 0 is chunk 3 = pp 3 vp 0;
    // the projector follows ViT layer 23, also on chunk 3; the head is on the last chunk.
    assert_eq!(std::fs::read_dir(release(&vpp)).unwrap().count(), 4);
    let last = read_torch(&release(&vpp).join("mp_rank_00_003").join("model_optim_rng.pt"));
    assert!(last.contains_key("model0/text_decoder.decoder.layers.0.mlp.linear_fc1.weight"), "{:?}", last.keys());
    assert!(last.contains_key("model0/image_encoder.projector.linear_fc1.weight"));
    assert!(last.contains_key("model2/text_decoder.output_layer.weight"));

    // mm_to_hf in the seed's spelling, with its (checked) layer lists.
    let out = root.path().join("export");
    run(
        &[
            "InternVLConverter",
            "mm_to_hf",
            "--cfg.save_hf_dir",
            s(&out),
            "--cfg.mm_dir",
            s(&seed),
            "--cfg.hf_config.hf_dir",
            s(&hf),
            "--cfg.parallel_config.llm_pp_layers",
            "[6,8,8,6]",
            "--cfg.parallel_config.vit_pp_layers",
            "[24,0,0,0]",
            "--cfg.parallel_config.tp_size",
            "2",
        ],
        0,
    );
    assert_same_tensors(&read_hf(&hf), &read_hf(&out));
    let o = run(
        &[
            "InternVLConverter",
            "mm_to_hf",
            "--cfg.save_hf_dir",
            s(&root.path().join("export2")),
            "--cfg.mm_dir",
            s(&seed),
            "--cfg.parallel_config.tp_size",
            "1",
        ],
        2,
    );
    assert!(stderr(&o).contains("tp 1 (checkpoint: 2)"), "{}", stderr(&o));
    let o = run(&["InternVLConverter", "hf_to_mm", "--cfg.parallel_config.pp_size", "2"], 2);
    assert!(stderr(&o).contains("--cfg.parallel_config.pp_size is not"), "{}", stderr(&o));
}

#[test]
fn inspect_hf_and_mm_with_recipe_checks() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    synth(&hf, small_78b(), HfLayout::Hf, 32, true);
    let o = run(&["inspect", s(&hf)], 0);
    let out = stdout(&o);
    assert!(out.contains("HF checkpoint"), "{out}");
    assert!(out.contains("layout:    hf"), "{out}");
    assert!(out.contains("ViT 45 layers × 100 (25 heads"), "{out}");
    assert!(out.contains("LLM 80 layers × 64"), "{out}");
    assert!(out.contains("check:     intact"), "{out}");
    // The 78B recipe fits only with --unaligned-linear.
    let o = run(&["inspect", s(&hf), "--recipe-tp", "8", "--llm-pp-layers", "40,40", "--vit-pp-layers", "45,0"], 3);
    assert!(stdout(&o).contains("does not fit") && stdout(&o).contains("25 ViT attention heads"), "{}", stdout(&o));
    let o = run(
        &[
            "inspect",
            s(&hf),
            "--recipe-tp",
            "8",
            "--llm-pp-layers",
            "40,40",
            "--vit-pp-layers",
            "45,0",
            "--unaligned-linear",
            "--tensors",
        ],
        0,
    );
    let out = stdout(&o);
    assert!(out.contains("fits: convert with mm-convert hf-to-mm"), "{out}");
    assert!(out.contains("pp stage 1: largest tp shard"), "{out}");
    assert!(out.contains("vision_tower.encoder.layer.44.attention.q_norm.weight"), "{out}");

    let mm = root.path().join("mm");
    run(
        &[
            "hf-to-mm",
            "--hf-dir",
            s(&hf),
            "--mm-dir",
            s(&mm),
            "--tp",
            "8",
            "--llm-pp-layers",
            "40,40",
            "--vit-pp-layers",
            "45,0",
            "--unaligned-linear",
        ],
        0,
    );
    let o = run(&["inspect", s(&mm), "--tensors"], 0);
    let out = stdout(&o);
    assert!(out.contains("MM checkpoint") && out.contains("iteration release"), "{out}");
    assert!(out.contains("tp 8, pp 2, vpp -, llm_pp_layers 40,40, vit_pp_layers 45,0, unaligned_linear true"), "{out}");
    assert!(out.contains("vocab 1000 padded to 1024"), "{out}");
    assert!(out.contains("mp_rank_07_001/model.safetensors"), "{out}");
    assert!(out.contains("qkv-grouped"), "{out}");
    let o = run(
        &[
            "inspect",
            s(&mm),
            "--recipe-tp",
            "8",
            "--llm-pp-layers",
            "40,40",
            "--vit-pp-layers",
            "45,0",
            "--unaligned-linear",
        ],
        0,
    );
    assert!(stdout(&o).contains("loads as it is"), "{}", stdout(&o));
    let o = run(
        &[
            "inspect",
            s(&mm),
            "--recipe-tp",
            "4",
            "--llm-pp-layers",
            "40,40",
            "--vit-pp-layers",
            "45,0",
            "--unaligned-linear",
        ],
        3,
    );
    assert!(stdout(&o).contains("split differently"), "{}", stdout(&o));
    // A damaged shard is reported with exit code 1.
    let shard = release(&mm).join("mp_rank_03_000/model.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let o = run(&["inspect", s(&mm)], 1);
    assert!(stderr(&o).contains("mp_rank_03_000/model.safetensors: not a readable safetensors file"), "{}", stderr(&o));
    assert!(stdout(&o).contains("tp 8, pp 2"), "the manifest is still shown");
}

#[test]
fn usage_errors_exit_2() {
    run(&["hf-to-mm", "--hf-dir", "x"], 2);
    run(&["Qwen2VLConverter", "hf_to_mm"], 2);
    let o = run(&["hf-to-mm", "--hf-dir", "x", "--mm-dir", "y", "--llm-pp-layers", "6,a"], 2);
    assert!(stderr(&o).contains("not a layer list"), "{}", stderr(&o));
    let o = run(&["--help"], 0);
    for cmd in ["hf-to-mm", "mm-to-hf", "inspect", "InternVLConverter"] {
        assert!(stdout(&o).contains(cmd), "{cmd}");
    }
    assert!(!stdout(&o).contains("synth-hf"), "hidden");
}

#[test]
fn synth_hf_subcommand_writes_a_loadable_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    run(
        &[
            "synth-hf",
            "--out",
            s(&hf),
            "--preset",
            "tiny6b",
            "--layout",
            "hf-prefixed",
            "--llm-layers",
            "3",
            "--max-shard-size",
            "100KB",
        ],
        0,
    );
    let t = read_hf(&hf);
    assert!(t.contains_key("model.language_model.layers.2.mlp.up_proj.weight"));
    assert!(t.contains_key("lm_head.weight"));
    let o = run(&["inspect", s(&hf)], 0);
    assert!(stdout(&o).contains("check:     intact"), "{}", stdout(&o));
    let _ = preset("tiny6b").unwrap();
}

/// Logs into a pipe are plain text: colour escapes only on a terminal (and never with NO_COLOR).
#[test]
fn logs_into_a_pipe_have_no_colour_codes() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    run(&["synth-hf", "--out", s(&hf), "--preset", "tiny6b"], 0);
    let o = bin()
        .args(["hf-to-mm", "--hf-dir", s(&hf), "--mm-dir", s(&root.path().join("mm"))])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("INFO") && !stderr(&o).contains('\x1b'), "{:?}", stderr(&o));
}
