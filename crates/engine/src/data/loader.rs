//! Order, batching and prefetch.
//!
//! The loader walks a position counter p = 0, 1, 2, …: epoch p / N, record perm_epoch[p % N],
//! with one seeded permutation per epoch. A micro batch takes the next `micro_batch` usable
//! samples and carries the position after its last one, which is all a checkpoint needs to
//! resume the data stream exactly. Samples are built on a background thread into a bounded
//! queue (`prefetch` micro batches ahead).
//!
//! Skips: unreadable records (broken line, missing or undecodable image/video) are counted
//! with a warning naming file and line; once more than `max_bad_fraction` of the data set's
//! records are bad, the run stops with an error. Records too long for --seq-length are
//! rejected with a warning and counted apart.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::dataset::{Dataset, Sample, Skip};
use super::template::IGNORE;
use crate::rng::Rng;

/// RNG stream tags.
const ORDER: u64 = 0x6f72646572;
const SAMPLE: u64 = 0x73616d706c65;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum DataError {
    #[error(
        "{bad} of {total} records are unreadable ({:.2}%), above --max-bad-fraction {limit}; the last one: {last}",
        100.0 * *bad as f64 / *total as f64
    )]
    TooManyBad { bad: usize, total: usize, limit: f64, last: String },
    #[error("a whole pass over the {total} records gave no usable sample (see the warnings above)")]
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
    /// Loader position after this batch: where a resume continues.
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
    pub max_bad_fraction: f64,
    pub shuffle: bool,
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

/// Builds micro batches from `start` on; runs on the loader thread, or inline in tests.
pub struct Producer {
    ds: Arc<Dataset>,
    cfg: LoaderConfig,
    order: Order,
    position: u64,
    bad: HashSet<usize>,
    rejected: HashSet<usize>,
    /// Positions since the last usable sample.
    barren: u64,
}

impl Producer {
    pub fn new(ds: Arc<Dataset>, cfg: LoaderConfig, start: u64) -> Result<Producer, DataError> {
        let order = Order::new(cfg.seed, ds.records.len(), cfg.shuffle);
        let p = Producer { ds, cfg, order, position: start, bad: HashSet::new(), rejected: HashSet::new(), barren: 0 };
        for b in &p.ds.bad_lines {
            eprintln!("warning: skipping {b}");
        }
        p.check_bad(p.ds.bad_lines.last().map(|b| b.to_string()))?;
        Ok(p)
    }

    fn check_bad(&self, last: Option<String>) -> Result<(), DataError> {
        let bad = self.ds.bad_lines.len() + self.bad.len();
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

    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        let mut samples = Vec::with_capacity(self.cfg.micro_batch);
        while samples.len() < self.cfg.micro_batch {
            let p = self.position;
            self.position += 1;
            let (epoch, index) = self.order.at(p);
            let mut rng = Rng::keyed(&[self.cfg.seed, SAMPLE, epoch, index as u64]);
            match self.ds.get(index, &mut rng) {
                Ok(s) => {
                    self.barren = 0;
                    samples.push(s);
                    continue;
                }
                Err(Skip::Bad(reason)) => {
                    let r = &self.ds.records[index];
                    let what = format!("{}:{}: {reason}", r.file.display(), r.line);
                    if self.bad.insert(index) {
                        eprintln!(
                            "warning: skipping {what} (bad records: {} of {})",
                            self.ds.bad_lines.len() + self.bad.len(),
                            self.ds.total_lines()
                        );
                    }
                    self.check_bad(Some(what))?;
                }
                Err(Skip::Rejected(reason)) => {
                    let r = &self.ds.records[index];
                    if self.rejected.insert(index) {
                        eprintln!("warning: rejecting {}:{}: {reason}", r.file.display(), r.line);
                    }
                }
            }
            self.barren += 1;
            if self.barren > self.ds.records.len() as u64 {
                return Err(DataError::NoUsable { total: self.ds.total_lines() });
            }
        }
        Ok(Batch::collate(samples, self.ds.tokenizer.special.pad, self.position))
    }
}

/// The background loader: a thread running a [`Producer`] into a bounded queue.
pub struct Loader {
    rx: Receiver<Result<Batch, DataError>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
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
        let mut producer = Producer::new(ds, cfg.clone(), start)?;
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("mm-data".into())
            .spawn(move || loop {
                let item = producer.next_batch();
                let failed = item.is_err();
                if !send(&tx, &flag, item) || failed {
                    return;
                }
            })
            .map_err(|_| DataError::Stopped)?;
        Ok(Loader { rx, stop, handle: Some(handle) })
    }

    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        self.rx.recv().map_err(|_| DataError::Stopped)?
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
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
