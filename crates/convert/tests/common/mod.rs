//! Shared helpers of the integration tests: synthetic checkpoints (seeded, written by the
//! library's synth module), running the binary, and reading folders back with the reference
//! safetensors parser.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mm_convert::synth::{write_synthetic, SynthSpec};
use mm_spec::{preset, HfLayout, ModelPreset};

/// One tensor as stored: dtype name, shape, bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mm-convert"))
}

/// Runs the binary; panics with its output if the exit code differs from `code`.
pub fn run(args: &[&str], code: i32) -> Output {
    let out = bin().args(args).env("RUST_LOG", "warn").output().expect("run mm-convert");
    assert_eq!(
        out.status.code(),
        Some(code),
        "mm-convert {args:?}\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Every tensor of one safetensors file.
pub fn read_file(path: &Path) -> BTreeMap<String, Stored> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, Stored { dtype: v.dtype().to_string(), shape: v.shape().to_vec(), data: v.data().to_vec() }))
        .collect()
}

/// Every tensor of an HF folder (all its .safetensors files), by key; checks the index if any.
pub fn read_hf(dir: &Path) -> BTreeMap<String, Stored> {
    let mut all = BTreeMap::new();
    let mut where_: BTreeMap<String, String> = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            for (k, v) in read_file(&p) {
                where_.insert(k.clone(), name.clone());
                assert!(all.insert(k.clone(), v).is_none(), "{k} stored twice");
            }
        }
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(index).unwrap()).unwrap();
        let map: BTreeMap<String, String> = serde_json::from_value(v["weight_map"].clone()).unwrap();
        assert_eq!(map, where_, "index weight_map matches the files");
        let total: u64 = all.values().map(|t| t.data.len() as u64).sum();
        assert_eq!(v["metadata"]["total_size"].as_u64(), Some(total));
    }
    all
}

/// The iteration folder of a converted (release) checkpoint.
pub fn release(mm: &Path) -> PathBuf {
    mm.join("release")
}

/// Tensors of one MM shard file.
pub fn read_shard(mm: &Path, rank_dir: &str) -> BTreeMap<String, Stored> {
    read_file(&release(mm).join(rank_dir).join("model.safetensors"))
}

/// Every tensor of a torch.save file (through torchfile), keyed `<model entry>/<name>`.
pub fn read_torch(path: &Path) -> BTreeMap<String, Stored> {
    let f = torchfile::TorchFile::open(path).unwrap_or_else(|e| panic!("{e}"));
    let root = f.root().unwrap_or_else(|e| panic!("{e}"));
    let mut out = BTreeMap::new();
    for (k, v) in root.as_dict().expect("a dict") {
        let (torchfile::Value::Str(k), Some(items)) = (k, v.as_dict()) else { continue };
        for (name, t) in items {
            let (torchfile::Value::Str(name), torchfile::Value::Tensor(t)) = (name, t) else { continue };
            let data = f.tensor_bytes(t).unwrap().into_owned();
            out.insert(format!("{k}/{name}"), Stored { dtype: format!("{:?}", t.dtype), shape: t.shape.clone(), data });
        }
    }
    out
}

pub fn manifest(mm: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(release(mm).join("manifest.json")).unwrap()).unwrap()
}

/// Writes a synthetic checkpoint; `sharded` splits it into a few files with an index.
pub fn synth(dir: &Path, arch: ModelPreset, layout: HfLayout, seed: u64, sharded: bool) -> SynthSpec {
    let mut spec = SynthSpec::new(arch, layout);
    spec.seed = seed;
    if sharded {
        spec.max_shard_bytes = Some(200_000);
    }
    write_synthetic(dir, &spec).unwrap();
    spec
}

/// tiny at the 8B's depths: 28 LLM layers, 24 ViT layers.
pub fn tiny_8b_depth() -> ModelPreset {
    let mut p = preset("tiny").unwrap();
    p.llm.num_hidden_layers = 28;
    p.vision.num_hidden_layers = 24;
    p.name = "tiny-8b-depth".into();
    p
}

/// The 78B's structure at small width: InternViT-6B flavour (RMSNorm, qk norm, no qkv bias)
/// with 45 layers of 25 heads (head_dim 4), LLM of 80 layers with 8 kv heads, vocab 1000
/// (padded at tp 8).
pub fn small_78b() -> ModelPreset {
    let mut p = preset("tiny6b").unwrap();
    p.name = "small-78b".into();
    p.vision.num_hidden_layers = 45;
    p.vision.num_attention_heads = 25;
    p.vision.hidden_size = 100;
    p.vision.intermediate_size = 200;
    p.vision.image_size = 28;
    p.llm.num_hidden_layers = 80;
    p.llm.hidden_size = 64;
    p.llm.num_attention_heads = 16;
    p.llm.num_key_value_heads = 8;
    p.llm.intermediate_size = 128;
    p.llm.vocab_size = 1000;
    p.validate().unwrap();
    p
}

/// Asserts two HF folders hold the same keys with bit-identical tensors.
pub fn assert_same_tensors(a: &BTreeMap<String, Stored>, b: &BTreeMap<String, Stored>) {
    let ka: Vec<&String> = a.keys().collect();
    let kb: Vec<&String> = b.keys().collect();
    assert_eq!(ka, kb, "key sets differ");
    for (k, x) in a {
        let y = &b[k];
        assert_eq!((&x.dtype, &x.shape), (&y.dtype, &y.shape), "{k}");
        assert!(x.data == y.data, "{k}: bytes differ");
    }
}

/// Entries of a folder whose names start with `prefix`, hidden or not (to find leftovers like
/// the staging folder `.out.tmp-123` or a replaced `.out.old-123`).
pub fn entries_starting_with(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.trim_start_matches('.').starts_with(prefix))
        .collect()
}

/// Rows `rows` of a row-major tensor with `row_bytes` bytes per row.
pub fn rows(data: &[u8], row_bytes: usize, rows: std::ops::Range<usize>) -> Vec<u8> {
    data[rows.start * row_bytes..rows.end * row_bytes].to_vec()
}

/// Columns `cols` of every row of a 2-D tensor (`elem` bytes per element).
pub fn cols(data: &[u8], n_cols: usize, elem: usize, cols: std::ops::Range<usize>) -> Vec<u8> {
    data.chunks(n_cols * elem).flat_map(|row| row[cols.start * elem..cols.end * elem].to_vec()).collect()
}
