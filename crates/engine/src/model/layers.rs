//! The small building blocks every part of InternVL3 shares: Linear, LayerNorm, RMSNorm.
//!
//! Each holds shallow clones of VarStore variables, so the parameter path of a block is the
//! checkpoint key prefix it was built under (`…/qkv` → `….qkv.weight`, `….qkv.bias`).
//! Fresh variables get a small normal init (std 0.02, zero bias, unit norm weights); a
//! checkpoint load overwrites them.

use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

/// Init of fresh weight matrices: InternVL's and Qwen2's `initializer_range` of 0.02.
pub const INIT_STD: f64 = 0.02;

pub fn normal_init() -> Init {
    Init::Randn { mean: 0.0, stdev: INIT_STD }
}

/// `y = x Wᵀ + b` with W of shape [out, in] (PyTorch's nn.Linear layout).
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(p: Path, in_dim: i64, out_dim: i64, bias: bool) -> Linear {
        let weight = p.var("weight", &[out_dim, in_dim], normal_init());
        let bias = bias.then(|| p.var("bias", &[out_dim], Init::Const(0.0)));
        Linear { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// nn.LayerNorm over the last dimension, in the parameters' dtype.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
    dim: i64,
}

impl LayerNorm {
    pub fn new(p: Path, dim: i64, eps: f64) -> LayerNorm {
        let weight = p.var("weight", &[dim], Init::Const(1.0));
        let bias = p.var("bias", &[dim], Init::Const(0.0));
        LayerNorm { weight, bias, eps, dim }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// RMSNorm as Qwen2RMSNorm and InternRMSNorm compute it: normalize in fp32, cast back to
/// the input dtype, then scale by the weight (so the product happens in the weight's dtype).
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(p: Path, dim: i64, eps: f64) -> RmsNorm {
        RmsNorm { weight: p.var("weight", &[dim], Init::Const(1.0)), eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_with(&self.weight, x)
    }

    /// The norm with `weight` in place of its own (the same values, e.g. a view whose gradient
    /// is summed over tensor-parallel ranks).
    pub fn forward_with(&self, weight: &Tensor, x: &Tensor) -> Tensor {
        let dtype = x.kind();
        let h = x.to_kind(Kind::Float);
        let variance = h.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let h = h * (variance + self.eps).rsqrt();
        weight * h.to_kind(dtype)
    }
}

/// The ViT's block norm: LayerNorm (InternViT-300M) or RMSNorm (InternViT-6B).
#[derive(Debug)]
pub enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Norm::Layer(n) => n.forward(x),
            Norm::Rms(n) => n.forward(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;
    use tch::Device;

    #[test]
    fn parameter_paths_are_checkpoint_keys() {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let _l = Linear::new(root.sub("mlp1").sub("1"), 8, 4, true);
        let _n = LayerNorm::new(root.sub("mlp1").sub("0"), 8, 1e-5);
        let _r = RmsNorm::new(root.sub("norm"), 4, 1e-6);
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        assert_eq!(names, ["mlp1.0.bias", "mlp1.0.weight", "mlp1.1.bias", "mlp1.1.weight", "norm.weight"]);
    }

    #[test]
    fn rms_norm_matches_the_formula() {
        let vs = VarStore::new(Device::Cpu);
        let n = RmsNorm::new(vs.root().sub("n"), 4, 1e-6);
        let x = Tensor::from_slice(&[1.0f32, -2.0, 3.0, -4.0]).reshape([1, 4]);
        let y = n.forward(&x);
        let rms = ((1.0 + 4.0 + 9.0 + 16.0) / 4.0f64 + 1e-6).sqrt();
        let want = [1.0 / rms, -2.0 / rms, 3.0 / rms, -4.0 / rms];
        for (i, w) in want.iter().enumerate() {
            assert!((y.double_value(&[0, i as i64]) - w).abs() < 1e-6);
        }
    }
}
