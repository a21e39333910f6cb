//! Reading an MM checkpoint: `--load` semantics (save dir → latest iteration), the manifest,
//! and every shard file checked against it before anything is exported.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use mm_spec::checkpoint::{file_order, iteration_dir, latest_path, PlannedTensor, LATEST_FILE, MANIFEST_FILE};
use mm_spec::{Iteration, Manifest};

use crate::error::{ConvertError, Problem};
use crate::hf::{MappedFile, TensorMeta};
use crate::write::st_dtype;

/// An opened, verified MM checkpoint.
pub struct MmCheckpoint {
    pub iter_dir: PathBuf,
    pub manifest: Manifest,
    /// The plan the manifest's architecture and layout imply, in manifest order.
    pub plan: Vec<PlannedTensor>,
    /// Shard files by (tp rank, pp rank).
    pub files: BTreeMap<(usize, usize), MappedFile>,
}

/// The iteration folder `dir` stands for: `dir` itself when it holds a manifest, else the
/// iteration `explicit` or the one `latest_checkpointed_iteration.txt` names.
pub fn locate(dir: &Path, explicit: Option<u64>) -> Result<PathBuf, ConvertError> {
    if dir.join(MANIFEST_FILE).is_file() && explicit.is_none() {
        return Ok(dir.to_path_buf());
    }
    if !dir.is_dir() {
        return Err(ConvertError::Config {
            path: dir.to_path_buf(),
            message: "not a folder: --mm-dir must point at an MM save dir (or an iteration folder in it)".into(),
        });
    }
    let iteration = match explicit {
        Some(n) => Iteration::Step(n),
        None => {
            let latest = latest_path(dir);
            if !latest.is_file() {
                return Err(ConvertError::Config {
                    path: dir.to_path_buf(),
                    message: format!(
                        "is not an MM checkpoint: it has neither {LATEST_FILE} nor {MANIFEST_FILE} (iteration folders \
                         found: {}); point at the save dir written by mm-convert hf-to-mm or the engine, or pass \
                         --iteration N",
                        iteration_dirs(dir)
                    ),
                });
            }
            let text = fs::read_to_string(&latest).map_err(|e| ConvertError::io("read", &latest, e))?;
            Iteration::parse_latest(&text)
                .map_err(|e| ConvertError::Config { path: latest.clone(), message: e.to_string() })?
        }
    };
    let iter_dir = iteration_dir(dir, iteration);
    if !iter_dir.join(MANIFEST_FILE).is_file() {
        return Err(ConvertError::Config {
            path: iter_dir,
            message: format!(
                "has no {MANIFEST_FILE}: iteration {iteration} is missing or incomplete (iteration folders found: {})",
                iteration_dirs(dir)
            ),
        });
    }
    Ok(iter_dir)
}

fn iteration_dirs(dir: &Path) -> String {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n == "release" || n.starts_with("iter_"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Reads and verifies `<iter_dir>/manifest.json`.
pub fn read_manifest(iter_dir: &Path) -> Result<(Manifest, Vec<PlannedTensor>), ConvertError> {
    let path = iter_dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&path).map_err(|e| ConvertError::io("read", &path, e))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| ConvertError::Config {
        path: path.clone(),
        message: format!("not an MM manifest: {e}; the file is damaged or not written by mm-convert"),
    })?;
    let plan = manifest.verify().map_err(|e| ConvertError::Config { path: path.clone(), message: e.to_string() })?;
    Ok((manifest, plan))
}

impl MmCheckpoint {
    /// Locates, reads and verifies a checkpoint: the manifest against its own layout, and every
    /// shard file's keys, shapes and dtypes against the manifest (all problems at once).
    pub fn open(dir: &Path, iteration: Option<u64>) -> Result<MmCheckpoint, ConvertError> {
        let iter_dir = locate(dir, iteration)?;
        let (manifest, plan) = read_manifest(&iter_dir)?;
        let manifest_path = iter_dir.join(MANIFEST_FILE);
        let mut problems = Vec::new();
        let mut files = BTreeMap::new();
        for entry in &manifest.files {
            let path = iter_dir.join(&entry.path);
            let order = file_order(&plan, entry.pp_rank);
            if !path.is_file() {
                problems.push(Problem::MissingShard {
                    index: manifest_path.clone(),
                    file: entry.path.clone(),
                    keys: order.len(),
                    example: order.first().map(|&i| plan[i].local_key.clone()).unwrap_or_default(),
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
            let mut expected = BTreeSet::new();
            for &i in &order {
                let t = &plan[i];
                let m = &manifest.tensors[i];
                expected.insert(t.local_key.as_str());
                let want_shape = &t.shards[entry.tp_rank].shape;
                match file.tensors.get(&t.local_key) {
                    None => problems.push(Problem::Manifest {
                        file: path.clone(),
                        key: t.local_key.clone(),
                        detail: "listed in the manifest but missing from the shard".into(),
                    }),
                    Some(meta) if &meta.shape != want_shape || meta.dtype != st_dtype(m.dtype) => {
                        problems.push(Problem::Manifest {
                            file: path.clone(),
                            key: t.local_key.clone(),
                            detail: format!(
                                "is {} {:?}, the manifest says {} {:?}",
                                meta.dtype, meta.shape, m.dtype, want_shape
                            ),
                        })
                    }
                    Some(_) => {}
                }
            }
            for k in file.tensors.keys() {
                if !expected.contains(k.as_str()) {
                    problems.push(Problem::Manifest {
                        file: path.clone(),
                        key: k.clone(),
                        detail: "in the shard but not in the manifest".into(),
                    });
                }
            }
            files.insert((entry.tp_rank, entry.pp_rank), file);
        }
        if !problems.is_empty() {
            return Err(ConvertError::Invalid { what: format!("MM checkpoint {}", iter_dir.display()), problems });
        }
        Ok(MmCheckpoint { iter_dir, manifest, plan, files })
    }

    /// Tp rank `tp`'s shard of `plan[i]`: its file and where its bytes are.
    pub fn shard(&self, i: usize, tp: usize) -> Option<(&MappedFile, &TensorMeta)> {
        let t = &self.plan[i];
        let f = self.files.get(&(tp, t.pp_rank))?;
        Some((f, f.tensors.get(&t.local_key)?))
    }
}
