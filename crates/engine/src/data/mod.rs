//! Data: InternVL chat records (JSONL, meta JSON), dynamic image tiling with Pillow-exact
//! bicubic resizing, video frames through ffmpeg, the internvl2_5 template with labels,
//! batching with an explicit padding mask, and a background prefetch thread.

pub mod dataset;
pub mod loader;
pub mod records;
pub mod resample;
pub mod template;
pub mod tiling;
pub mod video;

pub use dataset::{DataConfig, Dataset, Sample, Skip};
pub use loader::{Batch, DataError, Loader, LoaderConfig, Producer, Share};
