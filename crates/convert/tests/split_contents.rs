//! What each tp rank's shard holds, checked against slices of the HF tensors computed here
//! independently of the converter's shard math.

mod common;

use common::*;
use mm_spec::{preset, HfLayout};

const BF16: usize = 2;

#[test]
fn gqa_columns_rows_vocab_and_replicas_tp2() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    let mm = root.path().join("mm");
    let mut arch = preset("tiny").unwrap();
    arch.llm.vocab_size = 500; // padded to 512 at tp 2
    synth(&hf, arch, HfLayout::Original, 11, false);
    run(&["hf-to-mm", "--hf-dir", s(&hf), "--mm-dir", s(&mm), "--tp", "2"], 0);
    let src = read_hf(&hf);
    let r0 = read_shard(&mm, "mp_rank_00");
    let r1 = read_shard(&mm, "mp_rank_01");
    let h = 64;
    let hd = 16; // 4 heads, 2 kv heads: one kv group (2 q heads) per rank

    // q: rank 1 gets q heads 2..4 = rows 32..64; k/v: kv head 1 = rows 16..32.
    let q = &src["language_model.model.layers.1.self_attn.q_proj.weight"];
    assert_eq!(r1["llm.layers.1.self_attn.q_proj.weight"].shape, vec![32, h]);
    assert_eq!(r1["llm.layers.1.self_attn.q_proj.weight"].data, rows(&q.data, h * BF16, 32..64));
    let kb = &src["language_model.model.layers.1.self_attn.k_proj.bias"];
    assert_eq!(r1["llm.layers.1.self_attn.k_proj.bias"].data, rows(&kb.data, BF16, hd..2 * hd));
    // o_proj is row-parallel: columns of the same q heads.
    let o = &src["language_model.model.layers.0.self_attn.o_proj.weight"];
    assert_eq!(r0["llm.layers.0.self_attn.o_proj.weight"].shape, vec![h, 32]);
    assert_eq!(r0["llm.layers.0.self_attn.o_proj.weight"].data, cols(&o.data, h, BF16, 0..32));
    // down_proj: columns of the MLP; gate: rows.
    let down = &src["language_model.model.layers.0.mlp.down_proj.weight"];
    assert_eq!(r1["llm.layers.0.mlp.down_proj.weight"].data, cols(&down.data, 128, BF16, 64..128));
    let gate = &src["language_model.model.layers.0.mlp.gate_proj.weight"];
    assert_eq!(r1["llm.layers.0.mlp.gate_proj.weight"].data, rows(&gate.data, h * BF16, 64..128));
    // ViT: fused qkv keeps q, k, v together per rank (2 of 4 heads of 16 each).
    let c = 64;
    let qkv = &src["vision_model.encoder.layers.0.attn.qkv.weight"];
    let want: Vec<u8> = [32..64, c + 32..c + 64, 2 * c + 32..2 * c + 64]
        .into_iter()
        .flat_map(|r| rows(&qkv.data, c * BF16, r))
        .collect();
    assert_eq!(r1["vision.encoder.layers.0.attn.qkv.weight"].data, want);
    let qkvb = &src["vision_model.encoder.layers.0.attn.qkv.bias"];
    let want: Vec<u8> =
        [0..32, c..c + 32, 2 * c..2 * c + 32].into_iter().flat_map(|r| rows(&qkvb.data, BF16, r)).collect();
    assert_eq!(r0["vision.encoder.layers.0.attn.qkv.bias"].data, want);
    // Row-parallel biases and norms are replicated.
    for key in ["vision.encoder.layers.0.attn.proj.bias", "vision.encoder.layers.1.norm1.weight", "llm.norm.weight"] {
        assert_eq!(r0[key].data, r1[key].data, "{key}");
    }
    // Projector: linear_1 column-, linear_2 row-parallel over the LLM width.
    let l1 = &src["mlp1.1.weight"];
    assert_eq!(r1["projector.linear_1.weight"].data, rows(&l1.data, 256 * BF16, 32..64));
    let l2 = &src["mlp1.3.weight"];
    assert_eq!(r0["projector.linear_2.weight"].data, cols(&l2.data, h, BF16, 0..32));
    // Vocab: 500 rows padded to 512, 256 per rank; rank 1's last 12 rows are zero padding.
    let emb = &src["language_model.model.embed_tokens.weight"];
    let e1 = &r1["llm.embed_tokens.weight"];
    assert_eq!(e1.shape, vec![256, h]);
    assert_eq!(e1.data[..244 * h * BF16], rows(&emb.data, h * BF16, 256..500)[..]);
    assert!(e1.data[244 * h * BF16..].iter().all(|&b| b == 0));
    assert_eq!(r0["llm.lm_head.weight"].data, rows(&src["language_model.lm_head.weight"].data, h * BF16, 0..256));

    let m = manifest(&mm);
    let entry = |k: &str| m["tensors"].as_array().unwrap().iter().find(|t| t["key"] == k).unwrap().clone();
    let e = entry("llm.embed_tokens.weight");
    assert_eq!(e["split"], serde_json::json!({"kind": "vocab", "vocab_size": 500, "padded_vocab_size": 512}));
    assert_eq!(e["shape"], serde_json::json!([500, 64]));
    assert_eq!(e["shard_shapes"], serde_json::json!([[256, 64], [256, 64]]));
    assert_eq!(entry("vision.encoder.layers.0.attn.qkv.weight")["split"]["kind"], "qkv_grouped");
    assert_eq!(
        entry("llm.layers.0.self_attn.o_proj.weight")["split"],
        serde_json::json!({"kind": "row", "units": 2, "unit_size": 32})
    );
    assert_eq!(
        entry("llm.layers.0.self_attn.k_proj.weight")["files"],
        serde_json::json!(["mp_rank_00/model.safetensors", "mp_rank_01/model.safetensors"])
    );
    assert_eq!(m["format"], "mm-checkpoint");
    assert_eq!(m["iteration"], "release");
    assert_eq!(m["architecture"]["llm_config"]["vocab_size"], 500);
}

/// InternViT-6B's 25 heads on TP 8 (unaligned: 4,3,3,3,3,3,3,3 heads); q_norm stays whole.
#[test]
fn vit_25_heads_on_tp8() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    let mm = root.path().join("mm");
    let mut arch = small_78b();
    arch.llm.num_hidden_layers = 2;
    arch.vision.num_hidden_layers = 2;
    synth(&hf, arch, HfLayout::Hf, 12, false);
    let o = run(&["hf-to-mm", "--hf-dir", s(&hf), "--mm-dir", s(&mm), "--tp", "8"], 3);
    let err = stderr(&o);
    assert!(err.contains("25 ViT attention heads are not divisible by tp 8"), "{err}");
    assert!(!mm.exists());
    run(&["hf-to-mm", "--hf-dir", s(&hf), "--mm-dir", s(&mm), "--tp", "8", "--unaligned-linear"], 0);
    let src = read_hf(&hf);
    let (c, hd) = (100, 4);
    let q = &src["vision_tower.encoder.layer.1.attention.q_proj.weight"];
    let k = &src["vision_tower.encoder.layer.1.attention.k_proj.weight"];
    let v = &src["vision_tower.encoder.layer.1.attention.v_proj.weight"];
    let mut head = 0;
    for rank in 0..8 {
        let n = if rank == 0 { 4 } else { 3 };
        let shard = read_shard(&mm, &format!("mp_rank_{rank:02}"));
        let heads = head * hd..(head + n) * hd;
        let want: Vec<u8> = [q, k, v].iter().flat_map(|t| rows(&t.data, c * BF16, heads.clone())).collect();
        let got = &shard["vision.encoder.layers.1.attn.qkv.weight"];
        assert_eq!(got.shape, vec![3 * n * hd, c], "rank {rank}");
        assert_eq!(got.data, want, "rank {rank}");
        let proj = &src["vision_tower.encoder.layer.1.attention.projection_layer.weight"];
        assert_eq!(shard["vision.encoder.layers.1.attn.proj.weight"].data, cols(&proj.data, c, BF16, heads.clone()));
        assert_eq!(
            shard["vision.encoder.layers.1.attn.q_norm.weight"].data,
            src["vision_tower.encoder.layer.1.attention.q_norm.weight"].data,
            "q_norm is over the full width on every rank"
        );
        head += n;
    }
    assert_eq!(head, 25);
    let m = manifest(&mm);
    let qn = m["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["key"] == "vision.encoder.layers.0.attn.q_norm.weight")
        .unwrap();
    assert_eq!(qn["split"]["kind"], "replicated");
    assert!(qn["note"].as_str().unwrap().contains("full width"), "{qn}");
}
