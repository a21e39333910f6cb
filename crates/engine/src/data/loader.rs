//! Order, batching and prefetch.
//!
//! The data stream is a sequence of sample slots s = 0, 1, 2, …: slot s holds record
//! perm_epoch[s % N] of epoch s / N, with one seeded permutation per epoch. Micro batch k is
//! slots [k·mbs, (k+1)·mbs) and a global batch is the next `dp × accumulation` micro batches,
//! so a checkpoint's position is a slot number and does not depend on how many ranks read.
//! Data-parallel rank r builds only its [`Share`]: micro batches [r·m, (r+1)·m) of every global
//! batch (m = accumulation steps), the same samples one rank would put in those micro batches.
//!
//! A record that gives no sample (unreadable, or too long for --seq-length) is replaced, as
//! InternVL's dataset retries another index: by the first usable record of a scan that starts at
//! a point keyed by (seed, slot). Every choice is a pure function of (seed, slot), so all ranks,
//! one rank, and a resumed run agree on every slot. Samples are built on `workers` background
//! threads (`--num-workers`): worker w builds this rank's micro batches w, w + workers, … into
//! its own bounded queue, and the training loop takes them round robin, so the stream is the
//! same whatever the number of workers (`prefetch` micro batches ahead in all).
//!
//! Skips: unreadable records (broken line, missing or undecodable image/video) are counted
//! with a warning naming file and line; once more than `max_bad_fraction` of the data set's
//! records are bad (as far as this rank has seen), the run stops with an error. Records too long
//! for --seq-length are rejected with a warning and counted apart.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::dataset::{Dataset, Sample, Skip};
use super::template::IGNORE;
use crate::rng::Rng;

/// RNG stream tags.
const ORDER: u64 = 0x6f72646572;
const SAMPLE: u64 = 0x73616d706c65;
const SUBSTITUTE: u64 = 0x7375627374;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum DataError {
    #[error(
        "{bad} of {total} records are unreadable ({:.2}%), above --max-bad-fraction {limit}; the last one: {last}",
        100.0 * *bad as f64 / *total as f64
    )]
    TooManyBad { bad: usize, total: usize, limit: f64, last: String },
    #[error("no record gives a usable sample: all {total} were tried (see the warnings above)")]
    NoUsable { total: usize },
    #[error("the data loader thread stopped unexpectedly")]
    Stopped,
}

/// A padded micro batch (row-major [rows, len]).
#[derive(Debug, Clone)]
pub struct Batch {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub attention_mask: Vec<bool>,
    pub rows: usize,
    pub len: usize,
    pub pixels: Vec<f32>,
    pub tiles: usize,
    pub origins: Vec<String>,
    /// Stream position (slot) where a loader with the same share continues after this batch;
    /// after the last micro batch of a global batch, the next global batch's first slot.
    pub end_position: u64,
}

impl Batch {
    /// Pads `samples` to the longest with `pad` (labels with -100) and an explicit mask.
    pub fn collate(samples: Vec<Sample>, pad: i64, end_position: u64) -> Batch {
        let rows = samples.len();
        let len = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
        let mut b = Batch {
            input_ids: Vec::with_capacity(rows * len),
            labels: Vec::with_capacity(rows * len),
            attention_mask: Vec::with_capacity(rows * len),
            rows,
            len,
            pixels: Vec::new(),
            tiles: 0,
            origins: Vec::with_capacity(rows),
            end_position,
        };
        for s in samples {
            let n = s.input_ids.len();
            b.input_ids.extend(&s.input_ids);
            b.input_ids.extend(std::iter::repeat_n(pad, len - n));
            b.labels.extend(&s.labels);
            b.labels.extend(std::iter::repeat_n(IGNORE, len - n));
            b.attention_mask.extend(std::iter::repeat_n(true, n));
            b.attention_mask.extend(std::iter::repeat_n(false, len - n));
            b.pixels.extend(s.pixels);
            b.tiles += s.tiles;
            b.origins.push(s.origin);
        }
        b
    }

    /// Real (unpadded) tokens.
    pub fn tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m).count()
    }
}

#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub seed: u64,
    pub micro_batch: usize,
    pub prefetch: usize,
    /// Threads building micro batches ([`Loader`]; at least one).
    pub workers: usize,
    pub max_bad_fraction: f64,
    pub shuffle: bool,
    pub share: Share,
}

/// Which micro batches of each global batch this rank builds: a global batch is `size` ×
/// `micro_batches` micro batches in stream order, rank `rank` takes the `micro_batches` from
/// `rank · micro_batches` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub rank: usize,
    pub size: usize,
    pub micro_batches: usize,
}

impl Share {
    /// One rank reading everything.
    pub const ALL: Share = Share { rank: 0, size: 1, micro_batches: 1 };
}

/// The record index at loader position `p` (deterministic in seed and p).
pub struct Order {
    seed: u64,
    n: usize,
    shuffle: bool,
    epoch: Option<u64>,
    perm: Vec<usize>,
}

impl Order {
    pub fn new(seed: u64, n: usize, shuffle: bool) -> Order {
        Order { seed, n, shuffle, epoch: None, perm: Vec::new() }
    }

    pub fn at(&mut self, p: u64) -> (u64, usize) {
        let epoch = p / self.n as u64;
        if self.epoch != Some(epoch) {
            self.perm = (0..self.n).collect();
            if self.shuffle {
                Rng::keyed(&[self.seed, ORDER, epoch]).shuffle(&mut self.perm);
            }
            self.epoch = Some(epoch);
        }
        (epoch, self.perm[(p % self.n as u64) as usize])
    }
}

/// Builds this rank's micro batches from the global batch starting at slot `start`; runs on the
/// loader thread, or inline in tests.
pub struct Producer {
    ds: Arc<Dataset>,
    cfg: LoaderConfig,
    order: Order,
    /// Slot where this rank's stream starts (a global batch boundary).
    start: u64,
    /// This rank's next micro batch (0 = the first from `start`).
    next: u64,
    /// Records found unreadable / too long, shared by the workers of one loader (each is
    /// warned about once).
    bad: Arc<Mutex<HashSet<usize>>>,
    rejected: Arc<Mutex<HashSet<usize>>>,
}

impl Producer {
    pub fn new(ds: Arc<Dataset>, cfg: LoaderConfig, start: u64) -> Result<Producer, DataError> {
        let order = Order::new(cfg.seed, ds.records.len(), cfg.shuffle);
        let p = Producer { ds, cfg, order, start, next: 0, bad: Arc::default(), rejected: Arc::default() };
        for b in &p.ds.bad_lines {
            eprintln!("warning: skipping {b}");
        }
        p.check_bad(p.ds.bad_lines.last().map(|b| b.to_string()))?;
        if p.ds.records.is_empty() {
            return Err(DataError::NoUsable { total: p.ds.total_lines() });
        }
        Ok(p)
    }

    /// Another producer of the same stream sharing the bad-record bookkeeping (for a worker).
    fn fork(&self) -> Producer {
        Producer {
            ds: self.ds.clone(),
            cfg: self.cfg.clone(),
            order: Order::new(self.cfg.seed, self.ds.records.len(), self.cfg.shuffle),
            start: self.start,
            next: self.next,
            bad: self.bad.clone(),
            rejected: self.rejected.clone(),
        }
    }

    fn bad_count(&self) -> usize {
        self.bad.lock().map(|b| b.len()).unwrap_or(0)
    }

    fn check_bad(&self, last: Option<String>) -> Result<(), DataError> {
        let bad = self.ds.bad_lines.len() + self.bad_count();
        let total = self.ds.total_lines();
        if bad as f64 > self.cfg.max_bad_fraction * total as f64 {
            return Err(DataError::TooManyBad {
                bad,
                total,
                limit: self.cfg.max_bad_fraction,
                last: last.unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// Record `index` as sampled in `epoch`, or None (with a warning the first time) when it
    /// gives no sample. Pure in (seed, epoch, index): nothing is cached between calls.
    fn build(&mut self, epoch: u64, index: usize) -> Result<Option<Sample>, DataError> {
        let mut rng = Rng::keyed(&[self.cfg.seed, SAMPLE, epoch, index as u64]);
        match self.ds.get(index, &mut rng) {
            Ok(s) => Ok(Some(s)),
            Err(Skip::Bad(reason)) => {
                let r = &self.ds.records[index];
                let what = format!("{}:{}: {reason}", r.file.display(), r.line);
                let first = self.bad.lock().map(|mut b| b.insert(index)).unwrap_or(false);
                if first {
                    eprintln!(
                        "warning: skipping {what} (bad records: {} of {})",
                        self.ds.bad_lines.len() + self.bad_count(),
                        self.ds.total_lines()
                    );
                }
                self.check_bad(Some(what))?;
                Ok(None)
            }
            Err(Skip::Rejected(reason)) => {
                let r = &self.ds.records[index];
                if self.rejected.lock().map(|mut r| r.insert(index)).unwrap_or(false) {
                    eprintln!("warning: rejecting {}:{}: {reason}", r.file.display(), r.line);
                }
                Ok(None)
            }
        }
    }

    /// The record at `slot` without substitution (None when it gives no sample): for passes
    /// that must see each record once, like `mm-engine eval`.
    pub fn sample_at(&mut self, slot: u64) -> Result<Option<Sample>, DataError> {
        let (epoch, index) = self.order.at(slot);
        self.build(epoch, index)
    }

    /// The sample of `slot`: its record, or the substitute the module doc describes.
    pub fn sample(&mut self, slot: u64) -> Result<Sample, DataError> {
        let (epoch, index) = self.order.at(slot);
        if let Some(s) = self.build(epoch, index)? {
            return Ok(s);
        }
        let n = self.ds.records.len();
        let from = Rng::keyed(&[self.cfg.seed, SUBSTITUTE, slot]).below(n as u64) as usize;
        for k in 0..n {
            let other = (from + k) % n;
            if other == index {
                continue;
            }
            if let Some(s) = self.build(epoch, other)? {
                return Ok(s);
            }
        }
        Err(DataError::NoUsable { total: self.ds.total_lines() })
    }

    /// This rank's micro batch `j` (counted from the start position): its first slot and the
    /// position a loader continues at after it.
    fn slots(&self, j: u64) -> (u64, u64) {
        let Share { rank, size, micro_batches } = self.cfg.share;
        let (m, mbs) = (micro_batches as u64, self.cfg.micro_batch as u64);
        let (step, t) = (j / m, j % m);
        let step_start = self.start + step * size as u64 * m * mbs;
        let first = step_start + (rank as u64 * m + t) * mbs;
        let end = if t + 1 == m { step_start + size as u64 * m * mbs } else { first + mbs };
        (first, end)
    }

    /// This rank's micro batch `j`; a pure function of the stream and `j`.
    pub fn batch(&mut self, j: u64) -> Result<Batch, DataError> {
        let (first, end) = self.slots(j);
        let mut samples = Vec::with_capacity(self.cfg.micro_batch);
        for slot in first..first + self.cfg.micro_batch as u64 {
            samples.push(self.sample(slot)?);
        }
        Ok(Batch::collate(samples, self.ds.tokenizer.special.pad, end))
    }

    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        let b = self.batch(self.next)?;
        self.next += 1;
        Ok(b)
    }
}

/// The background loader: `workers` threads, each running a [`Producer`] over every
/// `workers`-th micro batch into its own bounded queue; read round robin.
pub struct Loader {
    queues: Vec<Receiver<Result<Batch, DataError>>>,
    next: usize,
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

fn send(tx: &SyncSender<Result<Batch, DataError>>, stop: &AtomicBool, mut item: Result<Batch, DataError>) -> bool {
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        match tx.try_send(item) {
            Ok(()) => return true,
            Err(TrySendError::Disconnected(_)) => return false,
            Err(TrySendError::Full(back)) => {
                item = back;
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

impl Loader {
    pub fn start(ds: Arc<Dataset>, cfg: LoaderConfig, start: u64) -> Result<Loader, DataError> {
        let workers = cfg.workers.max(1);
        let depth = cfg.prefetch.max(1).div_ceil(workers);
        let first = Producer::new(ds, cfg, start)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut loader = Loader { queues: Vec::new(), next: 0, stop: stop.clone(), handles: Vec::new() };
        for w in 0..workers {
            let mut producer = first.fork();
            let (tx, rx) = sync_channel(depth);
            let flag = stop.clone();
            let handle = std::thread::Builder::new()
                .name(format!("mm-data-{w}"))
                .spawn(move || {
                    for j in (w as u64..).step_by(workers) {
                        let item = producer.batch(j);
                        let failed = item.is_err();
                        if !send(&tx, &flag, item) || failed {
                            return;
                        }
                    }
                })
                .map_err(|_| DataError::Stopped)?;
            loader.queues.push(rx);
            loader.handles.push(handle);
        }
        Ok(loader)
    }

    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        let q = &self.queues[self.next % self.queues.len()];
        self.next += 1;
        q.recv().map_err(|_| DataError::Stopped)?
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_a_permutation_per_epoch_and_reproducible() {
        let mut o = Order::new(5, 10, true);
        let e0: Vec<usize> = (0..10).map(|p| o.at(p).1).collect();
        let e1: Vec<usize> = (10..20).map(|p| o.at(p).1).collect();
        let mut s = e0.clone();
        s.sort();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
        assert_ne!(e0, e1);
        let mut o2 = Order::new(5, 10, true);
        assert_eq!(o2.at(13), (1, e1[3]));
        let mut plain = Order::new(5, 3, false);
        assert_eq!((0..4).map(|p| plain.at(p).1).collect::<Vec<_>>(), [0, 1, 2, 0]);
    }

    #[test]
    fn collate_pads_with_the_pad_id_and_masks() {
        let s = |ids: &[i64]| Sample {
            input_ids: ids.to_vec(),
            labels: ids.to_vec(),
            pixels: vec![0.5; 3],
            tiles: 1,
            origin: "f:1".into(),
        };
        let b = Batch::collate(vec![s(&[5, 6, 7]), s(&[8])], 99, 12);
        assert_eq!((b.rows, b.len, b.tiles, b.end_position), (2, 3, 2, 12));
        assert_eq!(b.input_ids, [5, 6, 7, 8, 99, 99]);
        assert_eq!(b.labels, [5, 6, 7, 8, -100, -100]);
        assert_eq!(b.attention_mask, [true, true, true, true, false, false]);
        assert_eq!(b.tokens(), 4);
        assert_eq!(b.pixels.len(), 6);
    }
}
