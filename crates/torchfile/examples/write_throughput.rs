//! Measures streamed write throughput: `cargo run --release -p torchfile --example write_throughput -- DIR [GiB]`.
//! Writes one bf16 storage of the given size (default 1 GiB) in 16 MiB chunks, then reads it back
//! through the mmap reader and checks the CRC.

use std::time::Instant;
use torchfile::{DType, TorchFile, Value, Writer};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().unwrap_or_else(|| ".".into()));
    let gib: f64 = args.next().map(|s| s.parse().unwrap()).unwrap_or(1.0);
    let bytes = (gib * (1u64 << 30) as f64) as usize;
    let path = dir.join("throughput.pt");
    let chunk: Vec<u8> = (0..16usize << 20).map(|i| (i * 31) as u8).collect();
    let start = Instant::now();
    let mut w = Writer::create(&path).unwrap();
    let t = w.new_tensor(DType::BF16, &[bytes / 2]);
    w.write_root(&Value::OrderedDict(vec![(Value::Str("w".into()), Value::Tensor(t.clone()))])).unwrap();
    w.begin_storage(&t.storage).unwrap();
    let mut left = t.nbytes();
    while left > 0 {
        let n = left.min(chunk.len());
        w.write(&chunk[..n]).unwrap();
        left -= n;
    }
    w.end_storage().unwrap();
    let size = w.finish().unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!("wrote {} bytes in {secs:.2} s (incl. fsync): {:.0} MB/s", size, size as f64 / secs / 1e6);
    let start = Instant::now();
    let f = TorchFile::open(&path).unwrap();
    f.verify_crc().unwrap();
    println!("mmap read + CRC check: {:.2} s", start.elapsed().as_secs_f64());
}
