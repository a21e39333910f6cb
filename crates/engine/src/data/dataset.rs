//! One record → one training sample: images tiled (or video frames sampled), the
//! conversation put through the template, pixels normalized.
//!
//! Mirrors InternVL's `LazySupervisedDataset` get-item paths: single image (prepend
//! `<image>\n` when the first turn lacks it), several images (each at most
//! max(1, max_dynamic_patch // n) tiles), video (`<video>\n` prepended when missing, then
//! replaced by `Frame-1: <image>\nFrame-2: <image>…\n`, one tile per frame, no thumbnail), and
//! text only. Failures are per-sample errors that name file and line; the loader decides
//! whether the run can go on.

use std::path::Path;
use std::sync::Arc;

use image::RgbImage;

use super::records::{BadLine, Record, Turn};
use super::resample::resize_bicubic;
use super::template::{tokenize, TemplateError};
use super::tiling::{dynamic_preprocess, normalize_into};
use super::video;
use crate::rng::Rng;
use crate::tokenizer::ChatTokenizer;

#[derive(Debug, Clone, PartialEq)]
pub struct DataConfig {
    /// Tile side in pixels (the ViT's image_size).
    pub image_size: u32,
    /// `<IMG_CONTEXT>` tokens per tile.
    pub num_image_token: usize,
    pub min_dynamic_patch: usize,
    pub max_dynamic_patch: usize,
    pub use_thumbnail: bool,
    pub min_num_frame: usize,
    pub max_num_frame: usize,
    pub seq_length: usize,
}

/// A sample ready for batching.
#[derive(Debug, Clone)]
pub struct Sample {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    /// `tiles` × 3 × S × S normalized pixels, CHW per tile.
    pub pixels: Vec<f32>,
    pub tiles: usize,
    /// `file:line` of the record.
    pub origin: String,
}

/// Why a record gave no sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// Unreadable: broken line, missing or undecodable image/video, placeholder mismatch.
    /// Counted against --max-bad-fraction.
    Bad(String),
    /// Readable but unusable at this --seq-length (too long to keep its images, or no
    /// answer token left). Counted, not against the bad fraction.
    Rejected(String),
}

#[derive(Debug)]
pub struct Dataset {
    pub records: Vec<Record>,
    /// Lines that did not parse, found when the data set was read.
    pub bad_lines: Vec<BadLine>,
    pub tokenizer: Arc<ChatTokenizer>,
    pub cfg: DataConfig,
}

/// Decodes an image file to RGB (alpha dropped, as PIL's convert("RGB") does).
pub fn open_image(path: &Path) -> Result<RgbImage, String> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| format!("cannot open image {}: {e}", path.display()))?
        .with_guessed_format()
        .map_err(|e| format!("cannot read image {}: {e}", path.display()))?;
    let img = reader.decode().map_err(|e| format!("cannot decode image {}: {e}", path.display()))?;
    Ok(img.to_rgb8())
}

impl Dataset {
    /// Total records the data path named, good and broken: the denominator of the bad fraction.
    pub fn total_lines(&self) -> usize {
        self.records.len() + self.bad_lines.len()
    }

    /// Builds sample `index`; `rng` drives video frame sampling only.
    pub fn get(&self, index: usize, rng: &mut Rng) -> Result<Sample, Skip> {
        let r = &self.records[index];
        let origin = format!("{}:{}", r.file.display(), r.line);
        let mut conv = r.conversations.clone();
        let first_human = conv.iter().position(|t| t.from == "human");
        let s = self.cfg.image_size;
        let mut pixels = Vec::new();
        let mut tiles_per_image = Vec::new();
        let text_only;
        if let Some(video_rel) = &r.video {
            let path = r.root.join(video_rel);
            let info = video::probe(&path).map_err(|e| Skip::Bad(format!("video {}: {e}", path.display())))?;
            let lo = self.cfg.min_num_frame.max(1) as u64;
            let hi = (self.cfg.max_num_frame as u64).max(lo);
            let wanted = rng.inclusive(lo, hi) as usize;
            let indices = video::frame_indices(wanted, info.frames, rng);
            let frames = video::read_frames(&path, info, &indices)
                .map_err(|e| Skip::Bad(format!("video {}: {e}", path.display())))?;
            let h = first_human.ok_or_else(|| Skip::Bad("a video record needs a human turn".into()))?;
            if !conv[h].value.contains("<video>") {
                conv[h].value = format!("<video>\n{}", conv[h].value);
            }
            let tags: Vec<String> = (1..=frames.len()).map(|k| format!("Frame-{k}: <image>")).collect();
            conv[h].value = conv[h].value.replacen("<video>\n", &format!("{}\n", tags.join("\n")), 1);
            for f in &frames {
                normalize_into(&resize_bicubic(f, s, s), &mut pixels);
                tiles_per_image.push(1);
            }
            text_only = false;
        } else if !r.images.is_empty() {
            let n = r.images.len();
            let max_tiles = if n == 1 { self.cfg.max_dynamic_patch } else { (self.cfg.max_dynamic_patch / n).max(1) };
            for rel in &r.images {
                let path = r.root.join(rel);
                let img = open_image(&path).map_err(Skip::Bad)?;
                let t = dynamic_preprocess(&img, self.cfg.min_dynamic_patch, max_tiles, s, self.cfg.use_thumbnail);
                for tile in &t.images {
                    normalize_into(tile, &mut pixels);
                }
                tiles_per_image.push(t.images.len());
            }
            if n == 1 {
                let h = first_human.ok_or_else(|| Skip::Bad("an image record needs a human turn".into()))?;
                if !conv[h].value.contains("<image>") {
                    conv[h].value = format!("<image>\n{}", conv[h].value);
                }
            }
            text_only = false;
        } else {
            text_only = true;
        }
        let image_tokens: Vec<usize> = tiles_per_image.iter().map(|t| t * self.cfg.num_image_token).collect();
        let tokenized =
            tokenize(&self.tokenizer, &conv, &image_tokens, text_only, self.cfg.seq_length).map_err(|e| match e {
                TemplateError::ImageCut { .. } | TemplateError::NoLabels { .. } => Skip::Rejected(e.to_string()),
                other => Skip::Bad(other.to_string()),
            })?;
        Ok(Sample {
            input_ids: tokenized.input_ids,
            labels: tokenized.labels,
            pixels,
            tiles: tiles_per_image.iter().sum(),
            origin,
        })
    }
}

/// Turns for tests and synthetic data.
pub fn turns(pairs: &[(&str, &str)]) -> Vec<Turn> {
    pairs.iter().map(|(f, v)| Turn { from: f.to_string(), value: v.to_string() }).collect()
}
