//! Atomic commits: a folder is written under a hidden staging name beside its final place and
//! renamed into place only when complete; a small file (the tracker) is replaced by rename.
//!
//! ```text
//!   <parent>/.<name>.tmp-<tag>/ …   written and fsynced     (a crash leaves only this: never read)
//!   rename → <parent>/<name>/       an old <name> is moved to .<name>.old-<pid> first, then removed
//!   fsync <parent>
//! ```
//! `tag` tells concurrent writers apart (a process id; with data parallelism rank 0's, which
//! every rank knows, so all ranks write into one staging folder).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::FileError;

/// The staging folder of `final_path`: `.<name>.tmp-<tag>` beside it.
pub fn staging_path(final_path: &Path, tag: &str) -> PathBuf {
    let name = final_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    final_path.with_file_name(format!(".{name}.tmp-{tag}"))
}

/// Writes a file and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let mut f = fs::File::create(path).map_err(|e| FileError::io("create", path, e))?;
    f.write_all(bytes).map_err(|e| FileError::io("write", path, e))?;
    f.sync_all().map_err(|e| FileError::io("sync", path, e))
}

/// Fsyncs a folder (its entries: names created or renamed in it).
pub fn fsync_dir(dir: &Path) -> Result<(), FileError> {
    fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| FileError::io("sync", dir, e))
}

/// Replaces `path` with `bytes` atomically: readers see the old or the new content, never a
/// part. The temporary file is `.<name>.tmp-<pid>` beside it.
pub fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let tmp = staging_path(path, &std::process::id().to_string());
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path).map_err(|e| FileError::io("rename into place", path, e))?;
    fsync_dir(parent_of(path))
}

fn parent_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Fsyncs every file and folder under `dir` (and `dir`): whatever wrote them, the tree is on
/// disk before it is renamed into place.
pub fn sync_tree(dir: &Path) -> Result<(), FileError> {
    for entry in fs::read_dir(dir).map_err(|e| FileError::io("list", dir, e))? {
        let path = entry.map_err(|e| FileError::io("list", dir, e))?.path();
        let meta = fs::symlink_metadata(&path).map_err(|e| FileError::io("stat", &path, e))?;
        if meta.is_dir() {
            sync_tree(&path)?;
        } else if meta.is_file() {
            fs::File::open(&path).and_then(|f| f.sync_all()).map_err(|e| FileError::io("sync", &path, e))?;
        }
    }
    fsync_dir(dir)
}

/// Moves the complete folder `staged` to `final_path` (replacing an old one), with the whole
/// staged tree and the parent fsynced. The old folder is moved aside before the rename and
/// removed after it, so at every instant `final_path` is the old or the new folder, whole.
/// Returns a note when the replaced folder could not be removed (the commit itself stands).
pub fn move_into_place(staged: &Path, final_path: &Path) -> Result<Option<String>, FileError> {
    sync_tree(staged)?;
    let parent = parent_of(final_path);
    if !final_path.exists() {
        fs::rename(staged, final_path).map_err(|e| FileError::io("rename into place", staged, e))?;
        fsync_dir(parent)?;
        return Ok(None);
    }
    let name = final_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let old = final_path.with_file_name(format!(".{name}.old-{}", std::process::id()));
    fs::rename(final_path, &old).map_err(|e| FileError::io("move aside", final_path, e))?;
    fs::rename(staged, final_path).map_err(|e| FileError::io("rename into place", staged, e))?;
    fsync_dir(parent)?;
    let removed = if old.is_dir() { fs::remove_dir_all(&old) } else { fs::remove_file(&old) };
    Ok(removed.err().map(|e| format!("the replaced {} could not be removed: {e}", old.display())))
}

/// A folder written in its staging place and committed with [`move_into_place`]. Dropped
/// without [`StagedDir::commit`], it removes the staging folder, so a failed run leaves nothing;
/// a killed run leaves only a hidden `.tmp-` folder, which never looks like a checkpoint.
pub struct StagedDir {
    final_path: PathBuf,
    staging: PathBuf,
    created: bool,
    committed: bool,
}

impl StagedDir {
    /// Touches nothing.
    pub fn new(final_path: &Path, tag: &str) -> Self {
        StagedDir {
            final_path: final_path.to_path_buf(),
            staging: staging_path(final_path, tag),
            created: false,
            committed: false,
        }
    }

    /// Creates an empty staging folder (and the parent), removing a stale one of the same tag.
    pub fn create(&mut self) -> Result<&Path, FileError> {
        let parent = parent_of(&self.staging);
        fs::create_dir_all(parent).map_err(|e| FileError::io("create", parent, e))?;
        if self.staging.exists() {
            fs::remove_dir_all(&self.staging).map_err(|e| FileError::io("remove stale", &self.staging, e))?;
        }
        fs::create_dir(&self.staging).map_err(|e| FileError::io("create", &self.staging, e))?;
        self.created = true;
        Ok(&self.staging)
    }

    pub fn path(&self) -> &Path {
        &self.staging
    }

    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// Moves the finished folder into place (replacing an old one); returns the final path and
    /// a note when the replaced folder could not be removed.
    pub fn commit(mut self) -> Result<(PathBuf, Option<String>), FileError> {
        let note = move_into_place(&self.staging, &self.final_path)?;
        self.committed = true;
        Ok((self.final_path.clone(), note))
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if self.created && !self.committed {
            let _ = fs::remove_dir_all(&self.staging);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_dir_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        {
            let mut o = StagedDir::new(&target, "1");
            let tmp = o.create().unwrap().to_path_buf();
            assert_eq!(tmp.file_name().unwrap(), ".out.tmp-1");
            fs::write(tmp.join("f"), "x").unwrap();
            assert!(!target.exists());
            // dropped without commit: nothing stays
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut o = StagedDir::new(&target, "1");
        fs::write(o.create().unwrap().join("old"), "x").unwrap();
        o.commit().unwrap();
        let mut o = StagedDir::new(&target, "2");
        fs::write(o.create().unwrap().join("new"), "y").unwrap();
        assert_eq!(o.commit().unwrap(), (target.clone(), None));
        assert!(target.join("new").is_file() && !target.join("old").exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no .old or .tmp left");
    }

    #[test]
    fn replace_file_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("latest_checkpointed_iteration.txt");
        replace_file(&f, b"20").unwrap();
        replace_file(&f, b"40").unwrap();
        assert_eq!(fs::read_to_string(&f).unwrap(), "40");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
