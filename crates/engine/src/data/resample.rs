//! Pillow's `Image.resize(size, BICUBIC)` on 8-bit RGB, reproduced bit for bit.
//!
//! InternVL resizes with PIL, whose bicubic (Keys, a = -0.5) widens its support by the scale
//! factor when shrinking (antialiasing) and computes in fixed point: weights normalized per
//! output pixel, rounded to 22 fractional bits, a horizontal pass rounded and clipped to 8 bits,
//! then a vertical pass. Libraries that filter in floats (the `image` crate's CatmullRom,
//! torch's interpolate) differ by a level or two in many pixels; this one matches exactly
//! (`Resample.c`: precompute_coeffs, normalize_coeffs_8bpc, ImagingResampleHorizontal/Vertical_8bpc).

use image::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;
const SUPPORT: f64 = 2.0;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index, and fixed-point weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

fn precompute(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) truncates toward zero; both values are ≥ -0.5 here, as in Pillow.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for x in 0..ksize {
            let v = if x < n && ww != 0.0 {
                k[x] / ww
            } else if x < n {
                k[x]
            } else {
                0.0
            };
            let fixed = v * f64::from(1u32 << PRECISION_BITS);
            weights[xx * ksize + x] = if v < 0.0 { (-0.5 + fixed) as i32 } else { (0.5 + fixed) as i32 };
        }
        bounds.push((xmin, n));
    }
    Coeffs { bounds, ksize, weights }
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes `src` to `w × h` exactly as Pillow's `resize((w, h), Image.BICUBIC)`.
pub fn resize_bicubic(src: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (sw, sh) = src.dimensions();
    if (sw, sh) == (w, h) {
        return src.clone();
    }
    let half = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass (only when the width changes): sw×sh → w×sh.
    let (tmp, tw) = if sw != w {
        let c = precompute(sw as usize, w as usize);
        let mut out = vec![0u8; w as usize * sh as usize * 3];
        let data = src.as_raw();
        for y in 0..sh as usize {
            let row = &data[y * sw as usize * 3..(y + 1) * sw as usize * 3];
            for xx in 0..w as usize {
                let (xmin, n) = c.bounds[xx];
                let k = &c.weights[xx * c.ksize..xx * c.ksize + n];
                let mut s = [half; 3];
                for (x, &kw) in k.iter().enumerate() {
                    let p = (xmin + x) * 3;
                    for ch in 0..3 {
                        s[ch] += i64::from(row[p + ch]) * i64::from(kw);
                    }
                }
                let o = (y * w as usize + xx) * 3;
                for ch in 0..3 {
                    out[o + ch] = clip8(s[ch]);
                }
            }
        }
        (out, w)
    } else {
        (src.as_raw().clone(), sw)
    };
    if sh == h {
        return RgbImage::from_raw(tw, sh, tmp).expect("buffer sized for the image");
    }
    // Vertical pass: tw×sh → tw×h.
    let c = precompute(sh as usize, h as usize);
    let mut out = vec![0u8; tw as usize * h as usize * 3];
    for yy in 0..h as usize {
        let (ymin, n) = c.bounds[yy];
        let k = &c.weights[yy * c.ksize..yy * c.ksize + n];
        for xx in 0..tw as usize {
            let mut s = [half; 3];
            for (y, &kw) in k.iter().enumerate() {
                let p = ((ymin + y) * tw as usize + xx) * 3;
                for ch in 0..3 {
                    s[ch] += i64::from(tmp[p + ch]) * i64::from(kw);
                }
            }
            let o = (yy * tw as usize + xx) * 3;
            for ch in 0..3 {
                out[o + ch] = clip8(s[ch]);
            }
        }
    }
    RgbImage::from_raw(tw, h, out).expect("buffer sized for the image")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_a_copy_and_constant_images_stay_constant() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 3]));
        assert_eq!(resize_bicubic(&img, 7, 5), img);
        let flat = RgbImage::from_pixel(13, 9, image::Rgb([200, 17, 90]));
        for (w, h) in [(4, 4), (30, 11), (13, 20), (1, 1)] {
            let r = resize_bicubic(&flat, w, h);
            assert_eq!(r.dimensions(), (w, h));
            assert!(r.pixels().all(|p| p.0 == [200, 17, 90]), "{w}x{h}");
        }
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(100, 37), (37, 100), (448, 448 * 3), (1000, 448)] {
            let c = precompute(i, o);
            for xx in 0..o {
                let (_, n) = c.bounds[xx];
                let sum: i64 = c.weights[xx * c.ksize..xx * c.ksize + n].iter().map(|&w| i64::from(w)).sum();
                assert!((sum - (1 << PRECISION_BITS)).abs() <= n as i64, "{i}->{o} at {xx}: {sum}");
            }
        }
    }
}
