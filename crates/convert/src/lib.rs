//! mm-convert: InternVL3 checkpoints between the HF layouts and the MM layout (tensor and
//! pipeline split, `mm_spec::checkpoint`), streamed so a 150 GB checkpoint converts in bounded
//! memory. No libtorch: safetensors files are mapped and written byte for byte.
//!
//! ```text
//!   hf-to-mm:  HF dir ─► hf::HfCheckpoint (config, headers, key map) ─► mm_spec plan (layout, split rules)
//!                     ─► split::split_ops per (tp, pp) file ─► write::SafetensorsWriter ─► <mm_dir>.tmp → rename
//!   mm-to-hf:  MM dir ─► mm::MmCheckpoint (manifest, verified shards) ─► split::gather_ops per HF tensor
//!                     ─► write::SafetensorsWriter (sharded + index) ─► config.json, tokenizer files
//! ```
//!
//! Modules: [`hf`] (both HF layouts, key maps, config.json), [`mm`] (reading MM checkpoints),
//! [`split`] (pure shard math), [`write`] (streamed writer, dtype conversion, atomic output,
//! parallel runner), [`to_mm`], [`to_hf`], [`inspect`], [`alias`] (the seed's CLI spelling),
//! [`synth`] (synthetic checkpoints for tests and the benchmark), [`error`].

pub mod alias;
pub mod error;
pub mod from_mindspeed;
pub mod hf;
pub mod inspect;
pub mod mm;
pub mod split;
pub mod synth;
pub mod to_hf;
pub mod to_mindspeed;
pub mod to_mm;
pub mod write;

pub use error::{ConvertError, Problem};
pub use inspect::{inspect, InspectOptions, Report};
pub use to_hf::{mm_to_hf, MmToHf, DEFAULT_MAX_SHARD_BYTES};
pub use to_mindspeed::hf_to_mindspeed;
pub use to_mm::{hf_to_mm, HfToMm, OutputFormat, Summary};

/// Parses a byte size: `5GB`, `500MB`, `2GiB`, `4096` (decimal units as transformers'
/// `max_shard_size`, binary ones with `i`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("{text:?} is not a size: expected e.g. 5GB, 500MB or 2GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "tb" | "t" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => return Err(format!("{text:?} has an unknown unit {other:?}: use B, KB, MB, GB, KiB, MiB or GiB")),
    };
    let bytes = value * mult as f64;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(format!("{text:?} is not a positive size"));
    }
    Ok(bytes as u64)
}

/// Parses a comma-separated layer list (`6,8,8,6`; the seed's `[[6,8,8,6]]` works too).
pub fn parse_list(text: &str) -> Result<Vec<usize>, String> {
    alias::parse_layer_list(text).map(|(flat, _)| flat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5MB"), Ok(1_500_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("GB").is_err());
        assert_eq!(parse_list("6,8,8,6"), Ok(vec![6, 8, 8, 6]));
    }
}
