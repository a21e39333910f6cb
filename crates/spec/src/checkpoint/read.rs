//! The architecture of any checkpoint folder a user may name, without reading weights: an HF
//! folder (config.json, either schema), an MM save folder (its tracker's iteration) or an MM
//! iteration folder (`manifest.json`). The launcher plans with it; `MODEL` may be such a folder.

use std::path::Path;

use super::manifest::Manifest;
use super::names::{iteration_dir, latest_path, Iteration, MANIFEST_FILE};
use crate::presets::ModelPreset;

/// Which kind of folder [`read_architecture`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FolderKind {
    /// config.json + weights (HF, either layout).
    Hf,
    /// An MM save folder or iteration folder.
    Mm,
}

/// Reads the architecture of the checkpoint folder `dir`; the preset is named after the folder.
/// Errors name the file and what was expected.
pub fn read_architecture(dir: &Path) -> Result<(ModelPreset, FolderKind), String> {
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    if dir.join(crate::hf::CONFIG_FILE).is_file() {
        let cfg = crate::hf::read_config(dir).map_err(|e| e.to_string())?;
        return Ok((ModelPreset { name, ..cfg.arch }, FolderKind::Hf));
    }
    let iter_dir = if latest_path(dir).is_file() {
        let tracker = latest_path(dir);
        let text = std::fs::read_to_string(&tracker).map_err(|e| format!("{}: {e}", tracker.display()))?;
        let it = Iteration::parse_latest(&text).map_err(|e| format!("{}: {e}", tracker.display()))?;
        iteration_dir(dir, it)
    } else {
        dir.to_path_buf()
    };
    let manifest = iter_dir.join(MANIFEST_FILE);
    if !manifest.is_file() {
        return Err(format!(
            "{}: not a checkpoint folder: expected config.json (HF), latest_checkpointed_iteration.txt (an MM save \
             folder) or {MANIFEST_FILE} (an MM iteration folder)",
            dir.display()
        ));
    }
    let text = std::fs::read_to_string(&manifest).map_err(|e| format!("{}: {e}", manifest.display()))?;
    let m: Manifest =
        serde_json::from_str(&text).map_err(|e| format!("{}: not an MM manifest: {e}", manifest.display()))?;
    Ok((ModelPreset { name, ..m.architecture }, FolderKind::Mm))
}

/// The architecture fields in which `a` and `b` differ, as `key a → b` (names, and the
/// training-only drop_path_rate, are not architecture).
pub fn architecture_differences(a: &ModelPreset, b: &ModelPreset) -> Vec<String> {
    let flat = |p: &ModelPreset| {
        let mut p = p.clone();
        p.name.clear();
        p.vision.drop_path_rate = 0.0;
        let mut out = Vec::new();
        if let serde_json::Value::Object(top) = serde_json::to_value(&p).unwrap_or_default() {
            for (k, v) in top {
                match v {
                    serde_json::Value::Object(sub) => out.extend(sub.into_iter().map(|(s, v)| (format!("{k}.{s}"), v))),
                    v => out.push((k, v)),
                }
            }
        }
        out
    };
    flat(a)
        .into_iter()
        .zip(flat(b))
        .filter(|((_, x), (_, y))| x != y)
        .map(|((k, x), (_, y))| format!("{k} {x} → {y}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preset;

    #[test]
    fn reads_hf_and_mm_folders_and_names_what_differs() {
        let dir = std::env::temp_dir().join(format!("mm-spec-arch-{}", std::process::id()));
        let hf = dir.join("My-InternVL3");
        std::fs::create_dir_all(&hf).unwrap();
        let mut arch = preset("tiny").unwrap();
        arch.llm.num_hidden_layers = 3;
        let cfg = crate::hf::config_for_layout(&arch, None, super::super::HfLayout::Hf, None);
        std::fs::write(hf.join("config.json"), cfg.to_string()).unwrap();
        let (read, kind) = read_architecture(&hf).unwrap();
        assert_eq!((read.name.as_str(), read.llm.num_hidden_layers, kind), ("My-InternVL3", 3, FolderKind::Hf));
        assert_eq!(architecture_differences(&preset("tiny").unwrap(), &read), ["llm_config.num_hidden_layers 2 → 3"]);
        let err = read_architecture(&dir).unwrap_err();
        assert!(err.contains("not a checkpoint folder"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
