//! Streamed output: the converter's side of mm-spec's writers (the safetensors writer and the
//! staged output folder are `mm_spec::io`'s, re-exported here), memory-map release, and the
//! bounded parallel runner.
//!
//! Pitfall: input pages touched through a memory map count as resident memory until they are
//! dropped; [`release`] drops them after each tensor, which keeps the peak RSS near the write
//! buffers instead of the size of the checkpoint.

use mm_spec::io::StagedDir;
pub use mm_spec::io::{convert, header_bytes, st_dtype, trainable, SafetensorsWriter, TensorHeader};

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use memmap2::Mmap;

use crate::error::ConvertError;

/// Drops the resident pages of `range` of a read-only map (see the module notes).
pub fn release(map: &Mmap, start: usize, len: usize) {
    if len == 0 || start >= map.len() {
        return;
    }
    let len = len.min(map.len() - start);
    // SAFETY: the map is a read-only MAP_SHARED file mapping (memmap2's `Mmap::map`). For such a
    // mapping MADV_DONTNEED only unmaps the pages from this process; the next access faults them
    // back in from the page cache with the same file bytes, so slices borrowed from the map (in
    // this thread or another) keep their contents. It is not applied to anonymous or private maps.
    #[cfg(unix)]
    unsafe {
        let _ = map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len);
    }
}

/// Bytes a reader consumes between two [`Releaser`] drops.
pub const RELEASE_STEP: usize = 64 << 20;

/// Walks one tensor's bytes in a map alongside a reader: asks the kernel to read ahead of it
/// (MADV_WILLNEED, asynchronous, so disk reads overlap the copying) and drops the pages behind
/// it, every [`RELEASE_STEP`] bytes, so a multi-GB tensor never becomes resident as a whole.
pub struct Releaser<'a> {
    map: &'a Mmap,
    end: usize,
    /// Absolute offset up to which pages were dropped.
    done: usize,
}

impl<'a> Releaser<'a> {
    /// For the bytes `start..end` of `map`.
    pub fn new(map: &'a Mmap, start: usize, end: usize) -> Self {
        let r = Releaser { map, end, done: start };
        r.prefetch(start);
        r
    }

    fn prefetch(&self, from: usize) {
        let to = from.saturating_add(2 * RELEASE_STEP).min(self.end);
        if to > from {
            #[cfg(unix)]
            let _ = self.map.advise_range(memmap2::Advice::WillNeed, from, to - from);
        }
    }

    /// The reader has consumed everything before absolute offset `upto`.
    pub fn advance(&mut self, upto: usize) {
        if upto >= self.done + RELEASE_STEP {
            release(self.map, self.done, upto - self.done);
            self.done = upto;
            self.prefetch(upto);
        }
    }

    /// Drops everything before absolute offset `upto` now, however little that is.
    pub fn release_to(&mut self, upto: usize) {
        let upto = upto.min(self.end);
        if upto > self.done {
            release(self.map, self.done, upto - self.done);
            self.done = upto;
            self.prefetch(upto);
        }
    }

    /// The reader is done with the tensor.
    pub fn finish(self) {
        if self.end > self.done {
            release(self.map, self.done, self.end - self.done);
        }
    }
}

/// [`Releaser`]s of several maps read in turn for one output tensor (mm-to-hf gathers a tensor
/// from every tp rank's shard, often a row piece of each in turn): the pages are dropped once
/// the *group* has consumed [`RELEASE_STEP`] bytes, so the resident input stays near one step
/// whatever the number of ranks (a releaser per rank would keep up to a step per rank).
pub struct ReleaseGroup<'a> {
    members: Vec<Option<Releaser<'a>>>,
    /// Absolute offset each member's reader has consumed up to.
    at: Vec<usize>,
    /// Bytes consumed by the group since the last drop.
    pending: usize,
}

impl<'a> ReleaseGroup<'a> {
    pub fn new(members: Vec<Option<Releaser<'a>>>) -> Self {
        let at = members.iter().map(|m| m.as_ref().map_or(0, |r| r.done)).collect();
        ReleaseGroup { members, at, pending: 0 }
    }

    /// Member `i`'s reader consumed `consumed` bytes and is now at absolute offset `upto`.
    pub fn advance(&mut self, i: usize, upto: usize, consumed: usize) {
        if let Some(at) = self.at.get_mut(i) {
            *at = (*at).max(upto);
        }
        self.pending += consumed;
        if self.pending >= RELEASE_STEP {
            for (r, &at) in self.members.iter_mut().zip(&self.at) {
                if let Some(r) = r {
                    r.release_to(at);
                }
            }
            self.pending = 0;
        }
    }

    /// The readers are done with the tensor.
    pub fn finish(self) {
        self.members.into_iter().flatten().for_each(Releaser::finish);
    }
}

/// Maps a whole file read-only.
pub fn map_file(path: &Path) -> Result<Mmap, ConvertError> {
    let file = File::open(path).map_err(|e| ConvertError::io("open", path, e))?;
    // SAFETY: the checkpoint files are inputs that nobody writes while a conversion runs (the
    // same assumption every safetensors loader makes); a concurrent writer could change the
    // bytes under us, never the mapping's length or validity.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| ConvertError::io("map", path, e))?;
    #[cfg(unix)]
    let _ = map.advise(memmap2::Advice::Sequential);
    Ok(map)
}

// ---------------------------------------------------------------------------------------------
// Atomic output folder
// ---------------------------------------------------------------------------------------------

/// An output folder built in a staging folder beside it and moved into place when complete
/// (mm-spec's [`StagedDir`]); refuses to replace an existing output unless forced.
pub struct OutputDir {
    staged: StagedDir,
    force: bool,
}

impl OutputDir {
    /// Refuses an existing output unless `force`. Touches nothing.
    pub fn prepare(final_path: &Path, force: bool) -> Result<Self, ConvertError> {
        if final_path.exists() && !force {
            return Err(ConvertError::OutputExists { path: final_path.to_path_buf() });
        }
        if final_path.file_name().is_none() {
            return Err(ConvertError::Usage(format!("output folder {:?} has no name", final_path.display())));
        }
        Ok(OutputDir { staged: StagedDir::new(final_path, &std::process::id().to_string()), force })
    }

    /// Creates the staging folder (and the output's parent) and returns its path.
    pub fn create(&mut self) -> Result<&Path, ConvertError> {
        Ok(self.staged.create()?)
    }

    pub fn tmp(&self) -> &Path {
        self.staged.path()
    }

    /// Moves the finished folder into place, replacing an old one only when forced.
    pub fn commit(self) -> Result<PathBuf, ConvertError> {
        if self.staged.final_path().exists() && !self.force {
            return Err(ConvertError::OutputExists { path: self.staged.final_path().to_path_buf() });
        }
        let (path, note) = self.staged.commit()?;
        if let Some(note) = note {
            tracing::warn!("{note}");
        }
        Ok(path)
    }
}

/// Copies the named small files (config, tokenizer) that exist in `from` into `to`; returns the
/// names copied.
pub fn copy_files(from: &Path, to: &Path, names: &[String]) -> Result<Vec<String>, ConvertError> {
    let mut copied = Vec::new();
    for name in names {
        let src = from.join(name);
        if src.is_file() {
            fs::create_dir_all(to).map_err(|e| ConvertError::io("create", to, e))?;
            fs::copy(&src, to.join(name)).map_err(|e| ConvertError::io("copy", &src, e))?;
            copied.push(name.clone());
        }
    }
    Ok(copied)
}

/// Writes a small text file.
pub fn write_text(path: &Path, text: &str) -> Result<(), ConvertError> {
    fs::write(path, text).map_err(|e| ConvertError::io("write", path, e))
}

// ---------------------------------------------------------------------------------------------
// Bounded parallel runner
// ---------------------------------------------------------------------------------------------

/// Threads to use: `requested`, else the available cores, never more than `jobs`.
pub fn thread_count(requested: Option<usize>, jobs: usize) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    requested.unwrap_or(cores).clamp(1, jobs.max(1))
}

/// Runs `work(job, cancel)` for every job on `threads` scoped threads, largest jobs first when
/// `weight` says so. Stops handing out jobs after the first error and returns it; `cancel` turns
/// true for the others so they can stop between tensors.
pub fn run_parallel<J: Sync>(
    jobs: &[J],
    threads: usize,
    weight: impl Fn(&J) -> u64,
    work: impl Fn(&J, &AtomicBool) -> Result<(), ConvertError> + Sync,
) -> Result<(), ConvertError> {
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(weight(&jobs[i])));
    let next = AtomicUsize::new(0);
    let cancel = AtomicBool::new(false);
    let errors: Mutex<BTreeMap<usize, ConvertError>> = Mutex::new(BTreeMap::new());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                if cancel.load(Ordering::Relaxed) {
                    break;
                }
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = order.get(k) else { break };
                if let Err(e) = work(&jobs[i], &cancel) {
                    cancel.store(true, Ordering::Relaxed);
                    if let Ok(mut errs) = errors.lock() {
                        errs.insert(k, e);
                    }
                    break;
                }
            });
        }
    });
    let errs = errors.into_inner().unwrap_or_default();
    // The first failure in hand-out order; a Cancelled error is only a consequence.
    let mut errs: Vec<ConvertError> = errs.into_values().collect();
    if let Some(pos) = errs.iter().position(|e| !matches!(e, ConvertError::Cancelled(_))) {
        return Err(errs.swap_remove(pos));
    }
    match errs.pop() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_dir_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        {
            let mut o = OutputDir::prepare(&target, false).unwrap();
            let tmp = o.create().unwrap().to_path_buf();
            std::fs::write(tmp.join("f"), "x").unwrap();
            assert!(!target.exists());
            // dropped without commit: nothing stays
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut o = OutputDir::prepare(&target, false).unwrap();
        o.create().unwrap();
        o.commit().unwrap();
        assert!(target.is_dir());
        assert!(matches!(OutputDir::prepare(&target, false), Err(ConvertError::OutputExists { .. })));
        let mut o = OutputDir::prepare(&target, true).unwrap();
        std::fs::write(o.create().unwrap().join("new"), "y").unwrap();
        o.commit().unwrap();
        assert!(target.join("new").is_file());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no .old or .tmp left");
    }

    #[test]
    fn release_group_drops_all_ranks_after_one_step_in_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let map = map_file(&path).unwrap();
        // Offsets past the map's end: release() ignores them, the bookkeeping is what is tested.
        let base = 1 << 40;
        let end = base + 4 * RELEASE_STEP;
        let mut g =
            ReleaseGroup::new(vec![Some(Releaser::new(&map, base, end)), None, Some(Releaser::new(&map, base, end))]);
        let half = RELEASE_STEP / 2;
        g.advance(0, base + half, half);
        g.advance(1, base + half, 0);
        assert_eq!(g.members[0].as_ref().unwrap().done, base, "half a step in all: nothing dropped yet");
        g.advance(2, base + half, half);
        // One step consumed by the group, half by each rank: each rank's pages are dropped, so
        // no more than about one step is resident whatever the number of ranks.
        assert_eq!(g.members[0].as_ref().unwrap().done, base + half);
        assert_eq!(g.members[2].as_ref().unwrap().done, base + half);
        assert_eq!(g.pending, 0);
        g.finish();
    }

    #[test]
    fn parallel_runner_reports_the_failure() {
        let jobs: Vec<u64> = (0..10).collect();
        let done = AtomicUsize::new(0);
        run_parallel(
            &jobs,
            3,
            |j| *j,
            |_, _| {
                done.fetch_add(1, Ordering::Relaxed);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(done.load(Ordering::Relaxed), 10);
        let err = run_parallel(
            &jobs,
            2,
            |j| *j,
            |j, _| if *j == 4 { Err(ConvertError::Usage("four".into())) } else { Ok(()) },
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "four");
        assert_eq!(thread_count(Some(8), 3), 3);
        assert_eq!(thread_count(Some(0), 3), 1);
    }
}
