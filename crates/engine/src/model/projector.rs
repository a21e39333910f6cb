//! Vision → LLM bridge of InternVL (ps_version v2, select_layer -1): drop the class token,
//! pixel-shuffle each 2×2 block of ViT tokens into one token of 4C, then `mlp1`
//! (LayerNorm(4C, eps 1e-5) → Linear(4C, H) → GELU → Linear(H, H), all with bias).
//! `mlp1.2` is the GELU, which has no parameters, hence the keys mlp1.{0,1,3}.

use tch::nn::Path;
use tch::Tensor;

use super::layers::{LayerNorm, Linear};
use super::tp::{RowLinear, Tp};
use super::ForwardError;

/// InternVL's pixel shuffle v2 at ratio 1/`f` on a [N, G, G, C] grid:
/// `out[n, i, j, (dy·f + dx)·C + c] = in[n, f·i + dy, f·j + dx, c]`, tokens row-major,
/// giving [N, (G/f)², f²·C].
pub fn pixel_shuffle(x: &Tensor, f: i64) -> Tensor {
    let (n, h, w, c) = x.size4().expect("pixel_shuffle takes [N, H, W, C]");
    x.reshape([n, h / f, f, w / f, f, c]).permute([0, 1, 3, 2, 4, 5]).reshape([n, (h / f) * (w / f), f * f * c])
}

/// linear_1 column-parallel, linear_2 row-parallel (the norm replicated).
#[derive(Debug)]
pub struct Projector {
    pub norm: LayerNorm,
    pub linear1: Linear,
    pub linear2: RowLinear,
    tp: Tp,
}

impl Projector {
    /// `p` is the `mlp1` path; `in_dim` = 4C at ratio 0.5, `hidden` = the LLM width.
    pub fn new(p: Path, in_dim: i64, hidden: i64, tp: &Tp) -> Result<Projector, mm_spec::layout::LayoutError> {
        let local = tp.units(hidden as usize)?.len() as i64;
        Ok(Projector {
            norm: LayerNorm::new(p.sub("0"), in_dim, 1e-5),
            linear1: Linear::new(p.sub("1"), in_dim, local, true),
            linear2: RowLinear::new(p.sub("3"), local, hidden, true, tp),
            tp: tp.clone(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ForwardError> {
        let x = self.tp.copy_to(&self.norm.forward(x))?;
        Ok(self.linear2.forward(&self.linear1.forward(&x).gelu("none"))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The index formula of internvl3.md, checked element by element against the
    /// reference's view/permute sequence written out literally.
    #[test]
    fn pixel_shuffle_matches_the_reference_formula() {
        let (n, g, c) = (2i64, 4i64, 3i64);
        let x = Tensor::arange(n * g * g * c, (Kind::Float, Device::Cpu)).reshape([n, g, g, c]);
        let y = pixel_shuffle(&x, 2);
        assert_eq!(y.size(), [n, 4, 4 * c]);
        for b in 0..n {
            for i in 0..2 {
                for j in 0..2 {
                    for dy in 0..2 {
                        for dx in 0..2 {
                            for ch in 0..c {
                                let want = x.double_value(&[b, 2 * i + dy, 2 * j + dx, ch]);
                                let got = y.double_value(&[b, i * 2 + j, (dy * 2 + dx) * c + ch]);
                                assert_eq!(got, want);
                            }
                        }
                    }
                }
            }
        }
        // The reference code: view(n, w, h*s, c/s) → permute → view(n, h*s, w*s, c/s²) → permute.
        let r = x
            .view([n, g, g / 2, c * 2])
            .permute([0, 2, 1, 3])
            .contiguous()
            .view([n, g / 2, g / 2, c * 4])
            .permute([0, 2, 1, 3])
            .contiguous()
            .reshape([n, -1, 4 * c]);
        assert!(r.equal(&y));
    }
}
