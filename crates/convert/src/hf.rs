//! HF checkpoints: opening a checkpoint folder in any of the three InternVL3 spellings (single
//! file or sharded with `model.safetensors.index.json`), mapping every input shard and checking
//! every header, key, shape and dtype against config.json before anything is written.
//!
//! The facts it reads by — config.json in both schemas, the key spellings of every layout, the
//! file names — are mm-spec's ([`mm_spec::hf`]); they are re-exported here for the converter's
//! modules, not redefined.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use mm_spec::{DType, HfLayout};
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde_json::Value;

use crate::error::{ConvertError, Problem};
use crate::write::{map_file, trainable};

pub use mm_spec::hf::{
    config_for_layout, detect_layout, hf_keys, set_torch_dtype, HfConfig, ASSET_FILES, CONFIG_FILE, INDEX_FILE,
    SINGLE_FILE,
};

/// Reads `<dir>/config.json` in either schema (mm-spec's one parser).
pub fn read_config(dir: &Path) -> Result<HfConfig, ConvertError> {
    mm_spec::hf::read_config(dir).map_err(ConvertError::from)
}

// ---------------------------------------------------------------------------------------------
// safetensors files
// ---------------------------------------------------------------------------------------------

/// Where one tensor's bytes are in a mapped file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

/// A mapped safetensors file with its parsed header.
pub struct MappedFile {
    pub path: PathBuf,
    pub map: Mmap,
    pub tensors: BTreeMap<String, TensorMeta>,
}

impl MappedFile {
    /// Maps and parses `path`; a damaged file is a [`Problem::Corrupt`].
    pub fn open(path: &Path) -> Result<Result<MappedFile, Problem>, ConvertError> {
        let map = map_file(path)?;
        let parsed = SafeTensors::read_metadata(&map);
        let (n, meta) = match parsed {
            Ok(x) => x,
            Err(e) => return Ok(Err(Problem::Corrupt { file: path.to_path_buf(), reason: describe(&e, map.len()) })),
        };
        let data_start = 8 + n;
        let tensors = meta
            .tensors()
            .into_iter()
            .map(|(k, info)| {
                let m = TensorMeta {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                };
                (k, m)
            })
            .collect();
        Ok(Ok(MappedFile { path: path.to_path_buf(), map, tensors }))
    }

    pub fn bytes(&self, m: &TensorMeta) -> &[u8] {
        &self.map[m.start..m.end]
    }
}

/// What a safetensors parse error means for the user.
fn describe(e: &SafeTensorError, file_len: usize) -> String {
    match e {
        SafeTensorError::HeaderTooSmall => {
            format!("the file has {file_len} bytes, fewer than the 8-byte header length")
        }
        SafeTensorError::InvalidHeaderLength => {
            format!("the header length field points past the end of the file ({file_len} bytes)")
        }
        SafeTensorError::HeaderTooLarge => "the header length field is larger than 100 MB".into(),
        SafeTensorError::InvalidHeader(_) | SafeTensorError::InvalidHeaderStart => {
            "the header is not UTF-8 JSON".into()
        }
        SafeTensorError::InvalidHeaderDeserialization(err) => format!("the header is not safetensors JSON ({err})"),
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "the tensor data declared in the header does not end where the file ends ({file_len} bytes): \
             offsets past the end, or bytes missing or appended"
        ),
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor {name:?} has data offsets that overlap, leave a gap or run backwards")
        }
        SafeTensorError::TensorInvalidInfo => "a tensor's byte range does not match its shape and dtype".into(),
        SafeTensorError::ValidationOverflow => "a tensor's shape overflows".into(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// The checkpoint folder
// ---------------------------------------------------------------------------------------------

/// An opened HF checkpoint: config, mapped shards, the key → file map and the key layout.
pub struct HfCheckpoint {
    pub dir: PathBuf,
    pub config: HfConfig,
    pub files: Vec<MappedFile>,
    /// Key → index into `files`.
    pub keys: BTreeMap<String, usize>,
    pub layout: HfLayout,
}

/// What [`HfCheckpoint::stream_pieces`] hands its sink: source bytes (elements of `from`), or a
/// run of zero elements (vocab padding).
pub enum Chunk<'a> {
    Bytes { bytes: &'a [u8], from: DType },
    Zeros(usize),
}

/// One HF tensor feeding (part of) a logical tensor.
#[derive(Debug, Clone)]
pub struct SourcePart {
    pub file: usize,
    pub key: String,
    pub meta: TensorMeta,
    pub dtype: DType,
}

impl HfCheckpoint {
    /// Streams the blocks `pieces` of the logical tensor made of `parts` (stacked along dim 0,
    /// `row_elems` elements per row) into `sink`, in order, in steps of at most
    /// [`crate::write::RELEASE_STEP`] bytes, dropping the mapped pages behind the reader.
    pub fn stream_pieces(
        &self,
        parts: &[SourcePart],
        row_elems: usize,
        pieces: &[mm_spec::checkpoint::Piece],
        mut sink: impl FnMut(Chunk<'_>) -> Result<(), ConvertError>,
    ) -> Result<(), ConvertError> {
        use crate::split::{split_ops, SplitOp};
        use crate::write::{Releaser, RELEASE_STEP};
        let part_rows: Vec<usize> = parts.iter().map(|p| p.meta.shape.first().copied().unwrap_or(1)).collect();
        let mut releasers: Vec<Releaser> =
            parts.iter().map(|p| Releaser::new(&self.files[p.file].map, p.meta.start, p.meta.end)).collect();
        for op in split_ops(&part_rows, row_elems, pieces) {
            match op {
                SplitOp::Copy { part, offset, len } => {
                    let p = &parts[part];
                    let es = p.dtype.size_bytes();
                    let bytes = self.files[p.file].bytes(&p.meta);
                    // RELEASE_STEP is a multiple of every element size.
                    let (mut a, b) = (offset * es, (offset + len) * es);
                    while a < b {
                        let e = (a + RELEASE_STEP).min(b);
                        sink(Chunk::Bytes { bytes: &bytes[a..e], from: p.dtype })?;
                        releasers[part].advance(p.meta.start + e);
                        a = e;
                    }
                }
                SplitOp::Zeros { len } => sink(Chunk::Zeros(len))?,
            }
        }
        releasers.into_iter().for_each(Releaser::finish);
        Ok(())
    }

    /// Reads config.json, maps every shard and parses every header; reports every missing or
    /// damaged file and index inconsistency at once.
    pub fn open(dir: &Path) -> Result<HfCheckpoint, ConvertError> {
        if !dir.is_dir() {
            return Err(ConvertError::Config {
                path: dir.to_path_buf(),
                message: "not a folder: --hf-dir must point at a downloaded HF checkpoint folder".into(),
            });
        }
        let config = read_config(dir)?;
        let what = format!("HF checkpoint {}", dir.display());
        let mut problems = Vec::new();
        let index_path = dir.join(INDEX_FILE);
        // (file name, keys the index assigns to it; None without an index)
        let mut wanted: Vec<(String, Option<Vec<String>>)> = Vec::new();
        if index_path.is_file() {
            let text = fs::read_to_string(&index_path).map_err(|e| ConvertError::io("read", &index_path, e))?;
            let index: Value = serde_json::from_str(&text).map_err(|e| ConvertError::Config {
                path: index_path.clone(),
                message: format!("not valid JSON: {e}"),
            })?;
            let Some(map) = index.get("weight_map").and_then(Value::as_object) else {
                return Err(ConvertError::Config {
                    path: index_path,
                    message: "has no \"weight_map\" object mapping tensor names to shard files".into(),
                });
            };
            let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (k, v) in map {
                let Some(f) = v.as_str() else {
                    return Err(ConvertError::Config {
                        path: index_path,
                        message: format!("weight_map[{k:?}] is {v}, expected a file name"),
                    });
                };
                by_file.entry(f.to_string()).or_default().push(k.clone());
            }
            wanted = by_file.into_iter().map(|(f, keys)| (f, Some(keys))).collect();
        } else if dir.join(SINGLE_FILE).is_file() {
            wanted.push((SINGLE_FILE.to_string(), None));
        } else {
            let mut others: Vec<String> = fs::read_dir(dir)
                .map_err(|e| ConvertError::io("list", dir, e))?
                .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .filter(|n| n.ends_with(".safetensors") || n.ends_with(".bin"))
                .collect();
            others.sort();
            let hint = if others.iter().any(|n| n.ends_with(".bin")) {
                "; pytorch .bin checkpoints are not supported: save them as safetensors first \
                 (model.save_pretrained(dir, safe_serialization=True))"
            } else {
                ""
            };
            return Err(ConvertError::Config {
                path: dir.to_path_buf(),
                message: format!(
                    "holds neither {SINGLE_FILE} nor {INDEX_FILE} (weight files found: {}){hint}",
                    if others.is_empty() { "none".to_string() } else { others.join(", ") }
                ),
            });
        }

        let mut files = Vec::new();
        let mut keys: BTreeMap<String, usize> = BTreeMap::new();
        for (name, listed) in &wanted {
            let path = dir.join(name);
            if !path.is_file() {
                let listed = listed.clone().unwrap_or_default();
                problems.push(Problem::MissingShard {
                    index: index_path.clone(),
                    file: name.clone(),
                    keys: listed.len(),
                    example: listed.first().cloned().unwrap_or_default(),
                });
                continue;
            }
            let file = match MappedFile::open(&path)? {
                Ok(f) => f,
                Err(p) => {
                    problems.push(p);
                    continue;
                }
            };
            let idx = files.len();
            for k in file.tensors.keys() {
                if let Some(prev) = keys.insert(k.clone(), idx) {
                    let prev_name: &MappedFile = &files[prev];
                    problems.push(Problem::IndexMismatch {
                        index: index_path.clone(),
                        key: k.clone(),
                        detail: format!("stored in both {} and {}", prev_name.path.display(), path.display()),
                    });
                }
            }
            if let Some(listed) = listed {
                let listed: BTreeSet<&String> = listed.iter().collect();
                for k in &listed {
                    if !file.tensors.contains_key(*k) {
                        problems.push(Problem::IndexMismatch {
                            index: index_path.clone(),
                            key: (*k).clone(),
                            detail: format!("the index puts it in {name}, which does not contain it"),
                        });
                    }
                }
                for k in file.tensors.keys() {
                    if !listed.contains(k) {
                        problems.push(Problem::IndexMismatch {
                            index: index_path.clone(),
                            key: k.clone(),
                            detail: format!("{name} contains it but the index does not list it there"),
                        });
                    }
                }
            }
            files.push(file);
        }
        if !problems.is_empty() {
            return Err(ConvertError::Invalid { what, problems });
        }
        let layout = detect_layout(keys.keys().map(String::as_str))
            .map_err(|message| ConvertError::Config { path: dir.to_path_buf(), message })?;
        if layout.is_transformers_native() != config.native() {
            tracing::warn!(
                "{}: config.json uses the {} schema but the tensors use the {} layout",
                dir.display(),
                if config.native() { "transformers-native (text_config)" } else { "original (llm_config)" },
                layout
            );
        }
        Ok(HfCheckpoint { dir: dir.to_path_buf(), config, files, keys, layout })
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().flat_map(|f| f.tensors.values()).map(|m| (m.end - m.start) as u64).sum()
    }

    /// The source parts of every planned tensor; checks the key set, every shape against
    /// config.json and every dtype, and reports all problems at once.
    pub fn map_sources<'a>(
        &self,
        tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
        convert_to: Option<DType>,
    ) -> Result<Vec<Vec<SourcePart>>, ConvertError> {
        let layout = self.layout;
        let mut problems = Vec::new();
        let mut claimed: BTreeSet<String> = BTreeSet::new();
        let mut sources = Vec::new();
        for (key, shape) in tensors {
            let Some(names) = hf_keys(key, layout) else {
                return Err(ConvertError::Config {
                    path: self.dir.clone(),
                    message: format!("internal error: no {layout} key for {key:?}"),
                });
            };
            let n = names.len();
            let mut expected = shape.to_vec();
            if let Some(first) = expected.first_mut() {
                *first /= n;
            }
            let mut parts = Vec::new();
            for name in names {
                let found = self.keys.get(&name).and_then(|&f| self.files[f].tensors.get(&name).map(|m| (f, m)));
                let Some((file, meta)) = found else {
                    problems.push(Problem::MissingKey { key: name, layout: layout.to_string() });
                    continue;
                };
                claimed.insert(name.clone());
                let path = self.files[file].path.clone();
                if meta.shape != expected {
                    problems.push(Problem::Shape {
                        file: path.clone(),
                        key: name.clone(),
                        found: meta.shape.clone(),
                        expected: expected.clone(),
                        source: format!("config.json (logical tensor {key})"),
                    });
                }
                match trainable(meta.dtype) {
                    Some(dtype) => parts.push(SourcePart { file, key: name, meta: meta.clone(), dtype }),
                    None => problems.push(Problem::Dtype { file: path, key: name, found: meta.dtype.to_string() }),
                }
            }
            if parts.len() > 1 && convert_to.is_none() && parts.iter().any(|p| p.dtype != parts[0].dtype) {
                problems.push(Problem::MixedDtypes {
                    key: key.to_string(),
                    found: parts.iter().map(|p| p.dtype.to_string()).collect(),
                });
            }
            sources.push(parts);
        }
        for (k, &f) in &self.keys {
            if !claimed.contains(k) {
                problems.push(Problem::UnknownKey {
                    file: self.files[f].path.clone(),
                    key: k.clone(),
                    layout: layout.to_string(),
                });
            }
        }
        if !problems.is_empty() {
            // Grouped: missing keys, then unknown ones, then shapes and dtypes.
            problems.sort_by_key(|p| match p {
                Problem::UnknownKey { .. } => 1,
                Problem::MissingKey { .. } => 0,
                _ => 2,
            });
            return Err(ConvertError::Invalid { what: format!("HF checkpoint {}", self.dir.display()), problems });
        }
        Ok(sources)
    }

    /// Asset files (config, tokenizer, remote code) present in the folder.
    pub fn asset_names(&self) -> Vec<String> {
        asset_names(&self.dir)
    }
}

/// The [`ASSET_FILES`] and `*.py` files present in `dir`, sorted.
pub fn asset_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = ASSET_FILES.iter().filter(|n| dir.join(n).is_file()).map(|n| n.to_string()).collect();
    if let Ok(entries) = fs::read_dir(dir) {
        let mut py: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".py"))
            .collect();
        py.sort();
        names.extend(py);
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use mm_spec::checkpoint::logical_tensors;
    use mm_spec::preset;

    fn hf_key_set(p: &mm_spec::ModelPreset, layout: HfLayout) -> Vec<String> {
        logical_tensors(p).iter().flat_map(|t| hf_keys(&t.key, layout).unwrap()).collect()
    }

    /// Contract: the HF key sets of tiny (one ViT layer and one LLM layer shown) in each layout.
    #[test]
    fn hf_key_sets_are_pinned() {
        let mut p = preset("tiny").unwrap();
        p.vision.num_hidden_layers = 1;
        p.llm.num_hidden_layers = 1;
        let llm = |pre: &str, head: &str| -> Vec<String> {
            let mut v = vec![format!("{pre}embed_tokens.weight")];
            for b in [
                "input_layernorm.weight",
                "self_attn.q_proj.weight",
                "self_attn.q_proj.bias",
                "self_attn.k_proj.weight",
                "self_attn.k_proj.bias",
                "self_attn.v_proj.weight",
                "self_attn.v_proj.bias",
                "self_attn.o_proj.weight",
                "post_attention_layernorm.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "mlp.down_proj.weight",
            ] {
                v.push(format!("{pre}layers.0.{b}"));
            }
            v.push(format!("{pre}norm.weight"));
            v.push(head.to_string());
            v
        };
        let original: Vec<String> = [
            "vision_model.embeddings.class_embedding",
            "vision_model.embeddings.position_embedding",
            "vision_model.embeddings.patch_embedding.weight",
            "vision_model.embeddings.patch_embedding.bias",
            "vision_model.encoder.layers.0.norm1.weight",
            "vision_model.encoder.layers.0.norm1.bias",
            "vision_model.encoder.layers.0.attn.qkv.weight",
            "vision_model.encoder.layers.0.attn.qkv.bias",
            "vision_model.encoder.layers.0.attn.proj.weight",
            "vision_model.encoder.layers.0.attn.proj.bias",
            "vision_model.encoder.layers.0.ls1",
            "vision_model.encoder.layers.0.norm2.weight",
            "vision_model.encoder.layers.0.norm2.bias",
            "vision_model.encoder.layers.0.mlp.fc1.weight",
            "vision_model.encoder.layers.0.mlp.fc1.bias",
            "vision_model.encoder.layers.0.mlp.fc2.weight",
            "vision_model.encoder.layers.0.mlp.fc2.bias",
            "vision_model.encoder.layers.0.ls2",
            "mlp1.0.weight",
            "mlp1.0.bias",
            "mlp1.1.weight",
            "mlp1.1.bias",
            "mlp1.3.weight",
            "mlp1.3.bias",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(llm("language_model.model.", "language_model.lm_head.weight"))
        .collect();
        assert_eq!(hf_key_set(&p, HfLayout::Original), original);

        let hf_vision = |pre: &str| -> Vec<String> {
            [
                "embeddings.cls_token",
                "embeddings.position_embeddings",
                "embeddings.patch_embeddings.projection.weight",
                "embeddings.patch_embeddings.projection.bias",
                "encoder.layer.0.layernorm_before.weight",
                "encoder.layer.0.layernorm_before.bias",
                "encoder.layer.0.attention.q_proj.weight",
                "encoder.layer.0.attention.k_proj.weight",
                "encoder.layer.0.attention.v_proj.weight",
                "encoder.layer.0.attention.q_proj.bias",
                "encoder.layer.0.attention.k_proj.bias",
                "encoder.layer.0.attention.v_proj.bias",
                "encoder.layer.0.attention.projection_layer.weight",
                "encoder.layer.0.attention.projection_layer.bias",
                "encoder.layer.0.lambda_1",
                "encoder.layer.0.layernorm_after.weight",
                "encoder.layer.0.layernorm_after.bias",
                "encoder.layer.0.mlp.fc1.weight",
                "encoder.layer.0.mlp.fc1.bias",
                "encoder.layer.0.mlp.fc2.weight",
                "encoder.layer.0.mlp.fc2.bias",
                "encoder.layer.0.lambda_2",
            ]
            .iter()
            .map(|b| format!("{pre}{b}"))
            .collect()
        };
        let projector = |pre: &str| -> Vec<String> {
            [
                "layer_norm.weight",
                "layer_norm.bias",
                "linear_1.weight",
                "linear_1.bias",
                "linear_2.weight",
                "linear_2.bias",
            ]
            .iter()
            .map(|b| format!("{pre}{b}"))
            .collect()
        };
        let hf: Vec<String> = hf_vision("vision_tower.")
            .into_iter()
            .chain(projector("multi_modal_projector."))
            .chain(llm("language_model.model.", "language_model.lm_head.weight"))
            .collect();
        assert_eq!(hf_key_set(&p, HfLayout::Hf), hf);
        let prefixed: Vec<String> = hf_vision("model.vision_tower.")
            .into_iter()
            .chain(projector("model.multi_modal_projector."))
            .chain(llm("model.language_model.", "lm_head.weight"))
            .collect();
        assert_eq!(hf_key_set(&p, HfLayout::HfPrefixed), prefixed);

        // 6B flavour: q_norm/k_norm keep their names, no qkv bias, no norm biases.
        let t6 = preset("tiny6b").unwrap();
        let keys = hf_key_set(&t6, HfLayout::Hf);
        assert!(keys.contains(&"vision_tower.encoder.layer.1.attention.q_norm.weight".to_string()));
        assert!(!keys.iter().any(|k| k.ends_with("attention.q_proj.bias") || k.ends_with("layernorm_before.bias")));
    }

    #[test]
    fn layout_detection() {
        let p = preset("tiny").unwrap();
        for layout in [HfLayout::Original, HfLayout::Hf, HfLayout::HfPrefixed] {
            let keys = hf_key_set(&p, layout);
            assert_eq!(detect_layout(keys.iter().map(String::as_str)), Ok(layout));
        }
        let mixed = ["vision_model.x", "vision_tower.y"];
        assert!(detect_layout(mixed.into_iter()).unwrap_err().contains("mix layouts"));
        assert!(detect_layout(["language_model.model.norm.weight"].into_iter()).unwrap_err().contains("InternVL3"));
    }
}
