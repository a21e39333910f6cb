//! InternVL's dynamic tiling (`dynamic_preprocess` in internvl/train/dataset.py), exactly.
//!
//! Candidate grids (i cols, j rows) with min ≤ i·j ≤ max, sorted by area; for equal areas the
//! reference keeps the iteration order of a Python `set` of tuples, so [`target_ratios`]
//! replays CPython's set (xxHash tuple hash, open addressing with 9 linear probes and
//! perturbation, resize at 60% fill) to get the same order. Choice: the grid whose i/j is
//! closest to W/H; on a tie the later grid wins when W·H > 0.5·S²·i·j. The image is resized
//! (Pillow bicubic) to (S·i, S·j) and cut into row-major S×S tiles; with use_thumbnail and
//! more than one tile the whole image resized to S×S is appended.

use image::RgbImage;

use super::resample::resize_bicubic;

/// ImageNet mean/std the InternViT was trained with.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// CPython ≥ 3.8 `hash((i, j))` for small non-negative ints.
fn py_tuple_hash(items: &[u64]) -> u64 {
    const P1: u64 = 11400714785074694791;
    const P2: u64 = 14029467366897019727;
    const P5: u64 = 2870177450012600261;
    let mut acc = P5;
    for &lane in items {
        acc = acc.wrapping_add(lane.wrapping_mul(P2));
        acc = acc.rotate_left(31);
        acc = acc.wrapping_mul(P1);
    }
    acc = acc.wrapping_add((items.len() as u64) ^ (P5 ^ 3527539));
    if acc == u64::MAX {
        1546275796
    } else {
        acc
    }
}

/// CPython's set of (i, j) tuples, enough of it to give the same iteration order.
struct PySet {
    table: Vec<Option<(u64, (usize, usize))>>,
    fill: usize,
}

const LINEAR_PROBES: usize = 9;
const PERTURB_SHIFT: u32 = 5;

impl PySet {
    fn new() -> PySet {
        PySet { table: vec![None; 8], fill: 0 }
    }

    /// `set_insert_clean`/`set_add_entry` probing: slot i, then up to 9 neighbours when they
    /// fit below the mask, then i = 5i + 1 + perturb.
    fn probe(table: &[Option<(u64, (usize, usize))>], hash: u64, key: Option<(usize, usize)>) -> (usize, bool) {
        let mask = table.len() - 1;
        let mut perturb = hash;
        let mut i = (hash as usize) & mask;
        loop {
            let probes = if i + LINEAR_PROBES <= mask { LINEAR_PROBES } else { 0 };
            for (j, slot) in table.iter().enumerate().skip(i).take(probes + 1) {
                match slot {
                    None => return (j, false),
                    Some((h, k)) if Some(*k) == key && *h == hash => return (j, true),
                    _ => {}
                }
            }
            perturb >>= PERTURB_SHIFT;
            i = (i.wrapping_mul(5).wrapping_add(1).wrapping_add(perturb as usize)) & mask;
        }
    }

    fn add(&mut self, key: (usize, usize)) {
        let hash = py_tuple_hash(&[key.0 as u64, key.1 as u64]);
        let (slot, present) = Self::probe(&self.table, hash, Some(key));
        if present {
            return;
        }
        self.table[slot] = Some((hash, key));
        self.fill += 1;
        let mask = self.table.len() - 1;
        if self.fill * 5 >= mask * 3 {
            let used = self.fill;
            let minused = if used > 50000 { used * 2 } else { used * 4 };
            let mut size = 8;
            while size <= minused {
                size <<= 1;
            }
            let old = std::mem::replace(&mut self.table, vec![None; size]);
            for (h, k) in old.into_iter().flatten() {
                let (slot, _) = Self::probe(&self.table, h, None);
                self.table[slot] = Some((h, k));
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.table.iter().flatten().map(|&(_, k)| k)
    }
}

/// The candidate grids in the reference's order.
pub fn target_ratios(min_num: usize, max_num: usize) -> Vec<(usize, usize)> {
    let mut set = PySet::new();
    for n in min_num..=max_num {
        for i in 1..=n {
            for j in 1..=n {
                if i * j <= max_num && i * j >= min_num {
                    set.add((i, j));
                }
            }
        }
    }
    let mut v: Vec<(usize, usize)> = set.iter().collect();
    v.sort_by_key(|&(i, j)| i * j); // stable, like Python's sorted
    v
}

/// `find_closest_aspect_ratio`, including its tie rule; (1, 1) when there is no candidate.
pub fn closest_grid(ratios: &[(usize, usize)], width: u32, height: u32, image_size: u32) -> (usize, usize) {
    let aspect = f64::from(width) / f64::from(height);
    let area = f64::from(width) * f64::from(height);
    let mut best_diff = f64::INFINITY;
    let mut best = (1, 1);
    for &(i, j) in ratios {
        let diff = (aspect - i as f64 / j as f64).abs();
        if diff < best_diff {
            best_diff = diff;
            best = (i, j);
        } else if diff == best_diff && area > 0.5 * f64::from(image_size) * f64::from(image_size) * (i * j) as f64 {
            best = (i, j);
        }
    }
    best
}

/// The tiles of one image and the grid chosen for it.
#[derive(Debug)]
pub struct Tiles {
    pub grid: (usize, usize),
    pub images: Vec<RgbImage>,
}

pub fn dynamic_preprocess(
    img: &RgbImage,
    min_num: usize,
    max_num: usize,
    image_size: u32,
    use_thumbnail: bool,
) -> Tiles {
    let (w, h) = img.dimensions();
    let grid = closest_grid(&target_ratios(min_num, max_num), w, h, image_size);
    let (cols, rows) = (grid.0 as u32, grid.1 as u32);
    let resized = resize_bicubic(img, image_size * cols, image_size * rows);
    let mut images = Vec::with_capacity((cols * rows) as usize + 1);
    for b in 0..cols * rows {
        let (x, y) = ((b % cols) * image_size, (b / cols) * image_size);
        images.push(image::imageops::crop_imm(&resized, x, y, image_size, image_size).to_image());
    }
    if use_thumbnail && images.len() != 1 {
        images.push(resize_bicubic(img, image_size, image_size));
    }
    Tiles { grid, images }
}

/// ToTensor + Normalize: appends the tile as CHW f32, (x/255 - mean)/std, to `out`.
pub fn normalize_into(tile: &RgbImage, out: &mut Vec<f32>) {
    let (w, h) = tile.dimensions();
    let n = (w * h) as usize;
    let start = out.len();
    out.resize(start + 3 * n, 0.0);
    for (p, px) in tile.pixels().enumerate() {
        for c in 0..3 {
            // Same float32 operations as torchvision: divide by 255, subtract, divide.
            let v = f32::from(px.0[c]) / 255.0;
            out[start + c * n + p] = (v - MEAN[c]) / STD[c];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_order_is_the_reference_order_for_1_to_12() {
        let want = [
            (1, 1),
            (1, 2),
            (2, 1),
            (3, 1),
            (1, 3),
            (2, 2),
            (4, 1),
            (1, 4),
            (5, 1),
            (1, 5),
            (1, 6),
            (6, 1),
            (3, 2),
            (2, 3),
            (7, 1),
            (1, 7),
            (4, 2),
            (2, 4),
            (1, 8),
            (8, 1),
            (1, 9),
            (3, 3),
            (9, 1),
            (2, 5),
            (5, 2),
            (10, 1),
            (1, 10),
            (11, 1),
            (1, 11),
            (12, 1),
            (3, 4),
            (4, 3),
            (1, 12),
            (6, 2),
            (2, 6),
        ];
        assert_eq!(target_ratios(1, 12), want);
    }

    #[test]
    fn python_tuple_hash() {
        // hash((1, 1)) and hash((1, 2)) in CPython 3.8+ (64-bit), as signed values.
        assert_eq!(py_tuple_hash(&[1, 1]) as i64, 8389048192121911274);
        assert_eq!(py_tuple_hash(&[1, 2]) as i64, -3550055125485641917);
    }

    #[test]
    fn choice_and_tie_rule() {
        let r = target_ratios(1, 12);
        assert_eq!(closest_grid(&r, 448, 448, 448), (1, 1));
        // 2:1 is exact for (2,1).
        assert_eq!(closest_grid(&r, 896, 448, 448), (2, 1));
        // A square image large enough takes the later square grid on ties: (1,1) → (2,2) → (3,3).
        assert_eq!(closest_grid(&r, 2000, 2000, 448), (3, 3));
        // Small square image keeps (1,1).
        assert_eq!(closest_grid(&r, 300, 300, 448), (1, 1));
        assert_eq!(closest_grid(&[], 300, 100, 448), (1, 1));
    }

    #[test]
    fn tiles_and_thumbnail() {
        let img = RgbImage::from_fn(300, 100, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let t = dynamic_preprocess(&img, 1, 6, 56, true);
        assert_eq!(t.grid, (3, 1));
        assert_eq!(t.images.len(), 4);
        assert!(t.images.iter().all(|i| i.dimensions() == (56, 56)));
        let single = dynamic_preprocess(&RgbImage::new(50, 50), 1, 6, 56, true);
        assert_eq!(single.images.len(), 1, "no thumbnail for a single tile");
        let mut out = Vec::new();
        normalize_into(&RgbImage::from_pixel(2, 2, image::Rgb([255, 0, 128])), &mut out);
        assert_eq!(out.len(), 12);
        assert!((out[0] - (1.0 - 0.485) / 0.229).abs() < 1e-6);
        assert!((out[4] - (0.0 - 0.456) / 0.224).abs() < 1e-6);
    }
}
