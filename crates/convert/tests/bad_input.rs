//! Bad input: each case fails with a message that names the file, the key, what was found and
//! expected, and leaves no output (not even a temporary folder).

mod common;

use std::path::Path;

use common::*;
use mm_convert::synth::{write_synthetic, SynthSpec};
use mm_spec::{preset, HfLayout};
use safetensors::Dtype;

/// Runs hf-to-mm expecting failure (exit 1: bad input); returns stderr after checking nothing
/// was written.
fn fails(root: &Path, hf: &Path, extra: &[&str]) -> String {
    fails_with(root, hf, extra, 1)
}

/// As [`fails`], with the exit code expected (3: the layout does not fit the model).
fn fails_with(root: &Path, hf: &Path, extra: &[&str], code: i32) -> String {
    let mm = root.join("out");
    let mut args = vec!["hf-to-mm", "--hf-dir", s(hf), "--mm-dir", s(&mm)];
    args.extend_from_slice(extra);
    let o = run(&args, code);
    assert!(!mm.exists(), "output created");
    assert!(entries_starting_with(root, "out").is_empty(), "leftovers: {:?}", entries_starting_with(root, "out"));
    stderr(&o)
}

fn tiny(root: &Path, sharded: bool) -> std::path::PathBuf {
    let hf = root.join("hf");
    synth(&hf, preset("tiny").unwrap(), HfLayout::Original, 21, sharded);
    hf
}

#[test]
fn missing_shard() {
    let root = tempfile::tempdir().unwrap();
    let hf = tiny(root.path(), true);
    let mut shards = entries_starting_with(&hf, "model-");
    shards.sort();
    assert!(shards.len() >= 3, "{shards:?}");
    std::fs::remove_file(hf.join(&shards[1])).unwrap();
    let err = fails(root.path(), &hf, &[]);
    assert!(err.contains(&format!("model.safetensors.index.json lists shard {:?}", shards[1])), "{err}");
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn unknown_key() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    let mut spec = SynthSpec::new(preset("tiny").unwrap(), HfLayout::Original);
    spec.extra_tensors.push(("vision_model.encoder.layers.0.attn.rotary.inv_freq".into(), Dtype::F32, vec![8]));
    write_synthetic(&hf, &spec).unwrap();
    let err = fails(root.path(), &hf, &[]);
    assert!(
        err.contains("model.safetensors: tensor \"vision_model.encoder.layers.0.attn.rotary.inv_freq\" is not part of"),
        "{err}"
    );
    assert!(err.contains("original layout"), "{err}");
}

#[test]
fn shape_mismatch_with_config() {
    let root = tempfile::tempdir().unwrap();
    let hf = tiny(root.path(), false);
    // config.json now says the LLM MLP is 96 wide; the weights are 128.
    let path = hf.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["llm_config"]["intermediate_size"] = serde_json::json!(96);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = fails(root.path(), &hf, &[]);
    assert!(
        err.contains(
            "tensor \"language_model.model.layers.0.mlp.gate_proj.weight\" has shape [128, 64] but config.json"
        ),
        "{err}"
    );
    assert!(err.contains("implies [96, 64]"), "{err}");
    assert!(err.contains("6 problems"), "gate, up, down of 2 layers: {err}");
}

#[test]
fn layer_lists_that_do_not_fit() {
    let root = tempfile::tempdir().unwrap();
    let hf = tiny(root.path(), false);
    let err = fails_with(root.path(), &hf, &["--llm-pp-layers", "1,2", "--vit-pp-layers", "2,0"], 3);
    assert!(err.contains("llm_pp_layers sums to 3 but the LLM has 2 layers"), "{err}");
    let err = fails_with(root.path(), &hf, &["--llm-pp-layers", "1,1", "--vit-pp-layers", "2,0,0"], 3);
    assert!(err.contains("vit_pp_layers has 3 entries but pp×vpp = 2×1 = 2"), "{err}");
    let err = fails_with(root.path(), &hf, &["--llm-pp-layers", "1,1", "--vit-pp-layers", "1,0"], 3);
    assert!(err.contains("vit_pp_layers sums to 1 but the ViT has 2 layers"), "{err}");
}

#[test]
fn kv_heads_not_divisible_by_tp() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    let mut arch = preset("tiny").unwrap();
    arch.llm.num_attention_heads = 6;
    arch.llm.num_key_value_heads = 3;
    arch.llm.hidden_size = 96;
    synth(&hf, arch, HfLayout::Original, 22, false);
    let err = fails_with(root.path(), &hf, &["--tp", "2"], 3);
    assert!(err.contains("3 LLM key/value heads are not divisible by tp 2"), "{err}");
    assert!(err.contains("unaligned_linear"), "{err}");
    // With --unaligned-linear it converts (kv heads 2 + 1) and round-trips.
    let mm = root.path().join("mm");
    let back = root.path().join("back");
    run(&["hf-to-mm", "--hf-dir", s(&hf), "--mm-dir", s(&mm), "--tp", "2", "--unaligned-linear"], 0);
    assert_eq!(read_shard(&mm, "mp_rank_00")["llm.layers.0.self_attn.k_proj.weight"].shape, vec![32, 96]);
    assert_eq!(read_shard(&mm, "mp_rank_01")["llm.layers.0.self_attn.q_proj.weight"].shape, vec![32, 96]);
    assert_eq!(read_shard(&mm, "mp_rank_01")["llm.layers.0.self_attn.k_proj.weight"].shape, vec![16, 96]);
    run(&["mm-to-hf", "--mm-dir", s(&mm), "--hf-dir", s(&back)], 0);
    assert_same_tensors(&read_hf(&hf), &read_hf(&back));
}

#[test]
fn truncated_file() {
    let root = tempfile::tempdir().unwrap();
    let hf = tiny(root.path(), false);
    let path = hf.join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 100).unwrap();
    let err = fails(root.path(), &hf, &[]);
    assert!(err.contains("model.safetensors: not a readable safetensors file"), "{err}");
    assert!(err.contains("does not end where the file ends"), "{err}");
}

#[test]
fn corrupt_header() {
    let root = tempfile::tempdir().unwrap();
    let hf = tiny(root.path(), true);
    let mut shards = entries_starting_with(&hf, "model-");
    shards.sort();
    let path = hf.join(&shards[0]);
    let mut bytes = std::fs::read(&path).unwrap();
    // A header length far past the end of the file.
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = fails(root.path(), &hf, &[]);
    assert!(err.contains(&shards[0]), "{err}");
    assert!(err.contains("header length"), "{err}");
    // Garbage JSON in the header of another shard.
    let mut bytes = std::fs::read(hf.join(&shards[1])).unwrap();
    bytes[8] = b'#';
    std::fs::write(hf.join(&shards[1]), &bytes).unwrap();
    let err = fails(root.path(), &hf, &[]);
    assert!(err.contains("2 problems"), "both damaged files reported: {err}");
    assert!(err.contains("not safetensors JSON"), "{err}");
}

#[test]
fn untrainable_dtypes() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    let mut spec = SynthSpec::new(preset("tiny").unwrap(), HfLayout::Hf);
    spec.dtype_overrides.push(("language_model.model.layers.0.mlp.up_proj.weight".into(), Dtype::I8));
    spec.dtype_overrides.push(("vision_tower.encoder.layer.1.lambda_1".into(), Dtype::BOOL));
    write_synthetic(&hf, &spec).unwrap();
    let err = fails(root.path(), &hf, &[]);
    assert!(err.contains("tensor \"language_model.model.layers.0.mlp.up_proj.weight\" is I8"), "{err}");
    assert!(err.contains("tensor \"vision_tower.encoder.layer.1.lambda_1\" is BOOL"), "{err}");
    assert!(err.contains("needs BF16, F16 or F32"), "{err}");
}

#[test]
fn mixed_qkv_part_dtypes_need_dtype() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    let mut spec = SynthSpec::new(preset("tiny").unwrap(), HfLayout::Hf);
    spec.dtype_overrides.push(("vision_tower.encoder.layer.0.attention.k_proj.weight".into(), Dtype::F32));
    write_synthetic(&hf, &spec).unwrap();
    let err = fails(root.path(), &hf, &[]);
    assert!(err.contains("\"vision.encoder.layers.0.attn.qkv.weight\" have different dtypes"), "{err}");
    assert!(err.contains("--dtype"), "{err}");
    run(&["hf-to-mm", "--hf-dir", s(&hf), "--mm-dir", s(&root.path().join("mm")), "--dtype", "bf16"], 0);
}

#[test]
fn missing_config_and_weights() {
    let root = tempfile::tempdir().unwrap();
    let hf = tiny(root.path(), false);
    std::fs::rename(hf.join("model.safetensors"), hf.join("pytorch_model.bin")).unwrap();
    let err = fails(root.path(), &hf, &[]);
    assert!(err.contains("holds neither model.safetensors nor model.safetensors.index.json"), "{err}");
    assert!(err.contains(".bin checkpoints are not supported"), "{err}");
    std::fs::remove_file(hf.join("config.json")).unwrap();
    let err = fails(root.path(), &hf, &[]);
    assert!(err.contains("config.json: not found"), "{err}");
    let err = fails(root.path(), &root.path().join("nope"), &[]);
    assert!(err.contains("not a folder"), "{err}");
}

#[test]
fn damaged_mm_checkpoint_is_refused_on_export() {
    let root = tempfile::tempdir().unwrap();
    let hf = tiny(root.path(), false);
    let mm = root.path().join("mm");
    run(&["hf-to-mm", "--hf-dir", s(&hf), "--mm-dir", s(&mm), "--tp", "2", "--llm-pp-layers", "1,1"], 0);
    let export = |name: &str| {
        let out = root.path().join(name);
        let o = run(&["mm-to-hf", "--mm-dir", s(&mm), "--hf-dir", s(&out)], 1);
        assert!(!out.exists());
        assert!(entries_starting_with(root.path(), name).is_empty());
        stderr(&o)
    };
    // A shard file goes missing.
    let shard = release(&mm).join("mp_rank_01_001/model.safetensors");
    let saved = std::fs::read(&shard).unwrap();
    std::fs::remove_file(&shard).unwrap();
    let err = export("x1");
    assert!(err.contains("manifest.json lists shard \"mp_rank_01_001/model.safetensors\""), "{err}");
    // A shard file is truncated.
    std::fs::write(&shard, &saved[..saved.len() - 10]).unwrap();
    let err = export("x2");
    assert!(err.contains("mp_rank_01_001/model.safetensors: not a readable safetensors file"), "{err}");
    std::fs::write(&shard, &saved).unwrap();
    // The manifest is edited.
    let mpath = release(&mm).join("manifest.json");
    let text = std::fs::read_to_string(&mpath).unwrap();
    std::fs::write(&mpath, text.replace("\"tp\": 2", "\"tp\": 1")).unwrap();
    let err = export("x3");
    assert!(err.contains("manifest.json disagrees with the layout it declares"), "{err}");
    std::fs::write(&mpath, &text).unwrap();
    // A bad pointer file.
    std::fs::write(mm.join("latest_checkpointed_iteration.txt"), "latest").unwrap();
    let err = export("x4");
    assert!(err.contains("latest_checkpointed_iteration.txt holds \"latest\""), "{err}");
    std::fs::write(mm.join("latest_checkpointed_iteration.txt"), "release").unwrap();
    // --iteration of a step that does not exist.
    let o = run(&["mm-to-hf", "--mm-dir", s(&mm), "--hf-dir", s(&root.path().join("x5")), "--iteration", "7"], 1);
    assert!(stderr(&o).contains("iter_0000007") && stderr(&o).contains("found: release"), "{}", stderr(&o));
    // Healthy again: exports.
    run(&["mm-to-hf", "--mm-dir", s(&mm), "--hf-dir", s(&root.path().join("ok"))], 0);
}
