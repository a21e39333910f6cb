//! Synthetic HF checkpoints with seeded random weights, for tests and the benchmark
//! (`mm-convert synth-hf`, hidden). Written with the same streamed writer, so a multi-GB
//! checkpoint costs no memory.
//!
//! Values are finite floats of magnitude 2^-7..2^-5 with random sign and mantissa: every bit
//! pattern of the mantissa occurs, so a swapped or shifted byte shows up in a comparison, and no
//! NaN hides a difference.

use std::fs;
use std::path::Path;

use mm_spec::checkpoint::logical_tensors;
use mm_spec::{DType, HfLayout, ModelPreset};
use safetensors::Dtype;
use serde_json::json;

use crate::error::ConvertError;
use crate::hf::{config_for_layout, hf_keys, CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use crate::write::{st_dtype, write_text, SafetensorsWriter, TensorHeader};

/// A tiny xorshift64 generator (no rand crate needed; only reproducibility matters).
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        // Spread small seeds over the state; the state must not be 0.
        XorShift(seed.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Fills `out` with random elements of `dtype` (floats as described in the module notes).
    pub fn fill(&mut self, dtype: Dtype, out: &mut [u8]) {
        let (mask, set) = match dtype {
            Dtype::BF16 => (0x80FF_80FF_80FF_80FF_u64, 0x3C00_3C00_3C00_3C00_u64),
            Dtype::F16 => (0x83FF_83FF_83FF_83FF, 0x2000_2000_2000_2000),
            Dtype::F32 => (0x807F_FFFF_807F_FFFF, 0x3C00_0000_3C00_0000),
            Dtype::F64 => (0x800F_FFFF_FFFF_FFFF, 0x3F80_0000_0000_0000),
            Dtype::BOOL => (0x0101_0101_0101_0101, 0),
            _ => (u64::MAX, 0),
        };
        let mut chunks = out.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&((self.next_u64() & mask) | set).to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let word = ((self.next_u64() & mask) | set).to_le_bytes();
            rest.copy_from_slice(&word[..rest.len()]);
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub arch: ModelPreset,
    pub layout: HfLayout,
    pub dtype: DType,
    pub seed: u64,
    /// None: one `model.safetensors`; Some(n): shards of at most n bytes plus an index.
    pub max_shard_bytes: Option<u64>,
    /// Write small tokenizer/generation files (and a remote-code `.py` for the original layout).
    pub assets: bool,
    /// Tensors no InternVL3 key maps to (tests of the unknown-key check).
    pub extra_tensors: Vec<(String, Dtype, Vec<usize>)>,
    /// Store these HF keys in another dtype (tests of the dtype check).
    pub dtype_overrides: Vec<(String, Dtype)>,
}

impl SynthSpec {
    pub fn new(arch: ModelPreset, layout: HfLayout) -> Self {
        SynthSpec {
            arch,
            layout,
            dtype: DType::BF16,
            seed: 1,
            max_shard_bytes: None,
            assets: true,
            extra_tensors: Vec::new(),
            dtype_overrides: Vec::new(),
        }
    }
}

/// The HF tensors of `spec` in write order.
pub fn synth_headers(spec: &SynthSpec) -> Vec<TensorHeader> {
    let mut out = Vec::new();
    for t in logical_tensors(&spec.arch) {
        let keys = hf_keys(&t.key, spec.layout).unwrap_or_default();
        let n = keys.len().max(1);
        for key in keys {
            let mut shape = t.shape.clone();
            if let Some(first) = shape.first_mut() {
                *first /= n;
            }
            let dtype = spec.dtype_overrides.iter().find(|(k, _)| *k == key).map_or(st_dtype(spec.dtype), |(_, d)| *d);
            out.push(TensorHeader { name: key, dtype, shape });
        }
    }
    for (name, dtype, shape) in &spec.extra_tensors {
        out.push(TensorHeader { name: name.clone(), dtype: *dtype, shape: shape.clone() });
    }
    out
}

/// Writes a checkpoint folder (created if needed); returns the tensor bytes written.
pub fn write_synthetic(dir: &Path, spec: &SynthSpec) -> Result<u64, ConvertError> {
    fs::create_dir_all(dir).map_err(|e| ConvertError::io("create", dir, e))?;
    let config = config_for_layout(&spec.arch, None, spec.layout, Some(spec.dtype));
    write_text(&dir.join(CONFIG_FILE), &serde_json::to_string_pretty(&config).unwrap_or_else(|_| config.to_string()))?;
    if spec.assets {
        write_assets(dir, spec)?;
    }
    let headers = synth_headers(spec);
    let mut groups: Vec<Vec<TensorHeader>> = Vec::new();
    let mut size = 0u64;
    for h in headers {
        let n = h.nbytes() as u64;
        match (groups.last_mut(), spec.max_shard_bytes) {
            (Some(g), Some(max)) if size + n <= max => {
                g.push(h);
                size += n;
            }
            (Some(g), None) => g.push(h),
            _ => {
                groups.push(vec![h]);
                size = n;
            }
        }
    }
    let sharded = spec.max_shard_bytes.is_some();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    let mut rng = XorShift::new(spec.seed);
    let mut buf = vec![0u8; 1 << 20];
    let count = groups.len();
    for (k, group) in groups.into_iter().enumerate() {
        let name =
            if sharded { format!("model-{:05}-of-{:05}.safetensors", k + 1, count) } else { SINGLE_FILE.to_string() };
        for h in &group {
            weight_map.insert(h.name.clone(), json!(name));
        }
        let mut w = SafetensorsWriter::create(&dir.join(&name), group.clone(), &[("format", "pt")])?;
        for h in &group {
            let mut left = h.nbytes();
            total += left as u64;
            while left > 0 {
                let n = left.min(buf.len());
                rng.fill(h.dtype, &mut buf[..n]);
                w.write(&buf[..n])?;
                left -= n;
            }
            w.end_tensor()?;
        }
        w.finish()?;
    }
    if sharded {
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        write_text(&dir.join(INDEX_FILE), &serde_json::to_string_pretty(&index).unwrap_or_else(|_| index.to_string()))?;
    }
    Ok(total)
}

fn write_assets(dir: &Path, spec: &SynthSpec) -> Result<(), ConvertError> {
    let files = [
        ("tokenizer.json", json!({ "version": "1.0", "model": { "type": "BPE", "vocab": {}, "merges": [] } })),
        ("tokenizer_config.json", json!({ "model_max_length": 8192, "tokenizer_class": "Qwen2Tokenizer" })),
        ("special_tokens_map.json", json!({ "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>" })),
        ("generation_config.json", json!({ "eos_token_id": [151645, 151643] })),
    ];
    for (name, value) in files {
        write_text(&dir.join(name), &value.to_string())?;
    }
    write_text(&dir.join("merges.txt"), "#version: 0.2\n")?;
    if spec.layout == HfLayout::Original {
        write_text(
            &dir.join("configuration_internvl_chat.py"),
            "# synthetic checkpoint: placeholder for remote code\n",
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_reproducible_and_values_are_finite() {
        let mut a = XorShift::new(7);
        let mut b = XorShift::new(7);
        let mut x = vec![0u8; 4098];
        let mut y = vec![0u8; 4098];
        a.fill(Dtype::BF16, &mut x);
        b.fill(Dtype::BF16, &mut y);
        assert_eq!(x, y);
        assert_ne!(XorShift::new(8).next_u64(), XorShift::new(7).next_u64());
        for c in x.chunks_exact(2) {
            let v = half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32().abs();
            assert!((2f32.powi(-7)..2f32.powi(-5)).contains(&v), "{v}");
        }
        let mut f = vec![0u8; 400];
        a.fill(Dtype::F16, &mut f);
        assert!(f.chunks_exact(2).all(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).is_finite()));
        a.fill(Dtype::F32, &mut f);
        assert!(f.chunks_exact(4).all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()));
    }
}
