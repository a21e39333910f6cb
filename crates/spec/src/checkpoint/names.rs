//! The on-disk names of the format: the manifest's format tag and version, the files and folders
//! of a save dir ([`LATEST_FILE`], [`MANIFEST_FILE`], [`SHARD_FILE`], [`HF_ASSETS_DIR`]),
//! [`Iteration`] (`release` or `iter_{:07}`) and the path helpers that join them (Megatron's
//! `mp_rank_*` rank folders, the `chunk{v}.` key prefix of vp stages). Paths are joined, never
//! opened.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::CheckpointError;

/// `format` field of every manifest.
pub const FORMAT_NAME: &str = "mm-checkpoint";
/// Bumped when a reader of the previous version would misread a checkpoint.
pub const FORMAT_VERSION: u32 = 1;
/// Megatron's pointer file in the save dir: the iteration number, or `release`.
pub const LATEST_FILE: &str = "latest_checkpointed_iteration.txt";
/// In the iteration folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// In each `mp_rank_*` folder.
pub const SHARD_FILE: &str = "model.safetensors";
/// In the iteration folder: config.json and tokenizer files of the source HF checkpoint. The
/// engine copies it into every iteration it saves so any iteration exports on its own.
pub const HF_ASSETS_DIR: &str = "hf_assets";

/// Which saved state a folder holds: a converted checkpoint (`release`) or a training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Iteration {
    Release,
    Step(u64),
}

impl Iteration {
    /// Folder name inside the save dir: `release` or Megatron's `iter_{:07}`.
    pub fn dir_name(&self) -> String {
        match self {
            Iteration::Release => "release".to_string(),
            Iteration::Step(n) => format!("iter_{n:07}"),
        }
    }

    /// Parses the text of [`LATEST_FILE`] (surrounding whitespace ignored).
    pub fn parse_latest(text: &str) -> Result<Self, CheckpointError> {
        let t = text.trim();
        if t == "release" {
            return Ok(Iteration::Release);
        }
        t.parse::<u64>().map(Iteration::Step).map_err(|_| CheckpointError::BadLatest { text: text.to_string() })
    }

    /// What [`LATEST_FILE`] holds for this iteration (Megatron writes no newline).
    pub fn latest_text(&self) -> String {
        match self {
            Iteration::Release => "release".to_string(),
            Iteration::Step(n) => n.to_string(),
        }
    }
}

impl fmt::Display for Iteration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.latest_text())
    }
}

impl Serialize for Iteration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Iteration::Release => s.serialize_str("release"),
            Iteration::Step(n) => s.serialize_u64(*n),
        }
    }
}

impl<'de> Deserialize<'de> for Iteration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Step(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Step(n) => Ok(Iteration::Step(n)),
            Raw::Text(t) => Iteration::parse_latest(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// `<save_dir>/latest_checkpointed_iteration.txt`.
pub fn latest_path(save_dir: &Path) -> PathBuf {
    save_dir.join(LATEST_FILE)
}

/// `<save_dir>/release` or `<save_dir>/iter_0000100`.
pub fn iteration_dir(save_dir: &Path, iteration: Iteration) -> PathBuf {
    save_dir.join(iteration.dir_name())
}

/// Megatron's rank folder: `mp_rank_{tp:02}_{pp:03}`, or `mp_rank_{tp:02}` when pp is 1.
pub fn rank_dir_name(tp_rank: usize, pp_rank: usize, pp: usize) -> String {
    if pp == 1 {
        format!("mp_rank_{tp_rank:02}")
    } else {
        format!("mp_rank_{tp_rank:02}_{pp_rank:03}")
    }
}

/// Path of a shard file relative to the iteration folder, with `/` separators (as the manifest
/// records it).
pub fn shard_rel_path(tp_rank: usize, pp_rank: usize, pp: usize) -> String {
    format!("{}/{SHARD_FILE}", rank_dir_name(tp_rank, pp_rank, pp))
}

/// Key prefix of a vp stage's tensors inside a shard file: `chunk{v}.` with vpp, empty without.
pub fn chunk_prefix(vp_stage: usize, vpp: Option<usize>) -> String {
    match vpp {
        Some(_) => format!("chunk{vp_stage}."),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_megatron() {
        assert_eq!(Iteration::Release.dir_name(), "release");
        assert_eq!(Iteration::Step(5000).dir_name(), "iter_0005000");
        assert_eq!(Iteration::parse_latest("release\n"), Ok(Iteration::Release));
        assert_eq!(Iteration::parse_latest(" 42 "), Ok(Iteration::Step(42)));
        let err = Iteration::parse_latest("latest").unwrap_err();
        assert!(err.to_string().contains("\"latest\""), "{err}");
        assert_eq!(rank_dir_name(3, 2, 4), "mp_rank_03_002");
        assert_eq!(rank_dir_name(7, 0, 1), "mp_rank_07");
        assert_eq!(shard_rel_path(0, 1, 2), "mp_rank_00_001/model.safetensors");
        let save = Path::new("/ckpt");
        assert_eq!(iteration_dir(save, Iteration::Step(7)), Path::new("/ckpt/iter_0000007"));
        assert_eq!(latest_path(save), Path::new("/ckpt/latest_checkpointed_iteration.txt"));
        assert_eq!(chunk_prefix(1, Some(2)), "chunk1.");
        assert_eq!(chunk_prefix(0, None), "");
        for it in [Iteration::Release, Iteration::Step(12)] {
            let json = serde_json::to_string(&it).unwrap();
            assert_eq!(serde_json::from_str::<Iteration>(&json).unwrap(), it);
            assert_eq!(Iteration::parse_latest(&it.latest_text()).unwrap(), it);
        }
    }
}
