//! AdamW with savable state, numerically torch.optim.AdamW (single-tensor path, no amsgrad):
//!
//! ```text
//! p  ← p·(1 − lr·wd)
//! m  ← lerp(m, g, 1 − β1)           v ← β2·v + (1 − β2)·g²
//! p  ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)
//! ```
//!
//! Moments are fp32. When the parameters are not fp32 (bf16 on CUDA) the optimizer keeps fp32
//! master weights and fp32 main gradients (each micro batch's gradient is added into them
//! right after its backward, as Megatron's main_grad does), updates the masters and copies
//! them back. Weight decay skips biases and 1-D parameters (norms, layer scales), Megatron's
//! rule.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

#[derive(Debug)]
pub struct ParamState {
    pub name: String,
    pub param: Tensor,
    /// fp32 copy when `param` is not fp32.
    pub master: Option<Tensor>,
    /// fp32 gradient accumulator when `param` is not fp32.
    pub main_grad: Option<Tensor>,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub decay: bool,
}

#[derive(Debug)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub params: Vec<ParamState>,
    /// Optimizer steps taken (torch's `state['step']`, the same for every parameter).
    pub step: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum OptimizerError {
    #[error("optimizer state: {0}")]
    State(String),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// The Adam part of one AdamW step, in place on `target` and the moments (weight decay is
/// applied by the caller): the operations and rounding order of torch.optim.AdamW's
/// single-tensor path, with in-place kernels (the update is bound by memory traffic).
pub fn adam_update(
    target: &mut Tensor,
    grad: &Tensor,
    (exp_avg, exp_avg_sq): (&mut Tensor, &mut Tensor),
    (beta1, beta2, eps): (f64, f64, f64),
    bias2_sqrt: f64,
    step_size: f64,
) {
    let _ = exp_avg.lerp_(grad, 1.0 - beta1);
    let _ = exp_avg_sq.g_mul_scalar_(beta2);
    let _ = exp_avg_sq.addcmul_(grad, &(grad * (1.0 - beta2)));
    let mut denom = exp_avg_sq.sqrt();
    let _ = denom.g_div_scalar_(bias2_sqrt);
    let _ = denom.g_add_scalar_(eps);
    // torch: param.addcdiv_(exp_avg, denom, value=-step_size), whose kernel rounds
    // (value · exp_avg) / denom; tch's addcdiv_ has no value argument, so scale first.
    let _ = target.addcdiv_(&(&*exp_avg * (-step_size)), &denom);
}

/// Megatron's no-weight-decay rule.
pub fn decays(name: &str, shape: &[i64]) -> bool {
    !(name.ends_with(".bias") || shape.len() == 1)
}

impl AdamW {
    /// `params`: the trainable parameters by name (shallow clones of the model's variables).
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig) -> AdamW {
        let params = tch::no_grad(|| {
            params
                .into_iter()
                .map(|(name, param)| {
                    let fp32 = param.kind() == Kind::Float;
                    let master = (!fp32).then(|| param.detach().to_kind(Kind::Float));
                    let main_grad = (!fp32).then(|| param.zeros_like().to_kind(Kind::Float));
                    let exp_avg = Tensor::zeros(param.size(), (Kind::Float, param.device()));
                    let exp_avg_sq = Tensor::zeros(param.size(), (Kind::Float, param.device()));
                    let decay = decays(&name, &param.size());
                    ParamState { name, param, master, main_grad, exp_avg, exp_avg_sq, decay }
                })
                .collect()
        });
        AdamW { cfg, params, step: 0 }
    }

    /// Moves each parameter's fresh gradient into its fp32 accumulator (no-op for fp32).
    /// Call after every backward.
    pub fn accumulate(&mut self) {
        tch::no_grad(|| {
            for p in &mut self.params {
                if let Some(main) = &mut p.main_grad {
                    let mut g = p.param.grad();
                    if g.defined() {
                        let _ = main.g_add_(&g.to_kind(Kind::Float));
                        let _ = g.zero_();
                    }
                }
            }
        });
    }

    /// The fp32 gradient of parameter `i` (None when it received none).
    pub fn grad(&self, i: usize) -> Option<Tensor> {
        let p = &self.params[i];
        match &p.main_grad {
            Some(m) => Some(m.shallow_clone()),
            None => {
                let g = p.param.grad();
                g.defined().then_some(g)
            }
        }
    }

    /// L2 norm over all gradients (fp32, as clip_grad_norm_ computes it).
    pub fn grad_norm(&self) -> f64 {
        self.grad_sq().sqrt()
    }

    /// Σ of the squared per-parameter gradient norms (f64).
    pub fn grad_sq(&self) -> f64 {
        self.grad_sq_of(&|_| true)
    }

    /// [`AdamW::grad_sq`] over the parameters (by name) `counted` accepts.
    pub fn grad_sq_of(&self, counted: &dyn Fn(&str) -> bool) -> f64 {
        tch::no_grad(|| {
            let mut sq = 0.0f64;
            for i in 0..self.params.len() {
                if !counted(&self.params[i].name) {
                    continue;
                }
                if let Some(g) = self.grad(i) {
                    let n = g.to_kind(Kind::Float).norm().double_value(&[]);
                    sq += n * n;
                }
            }
            sq
        })
    }

    /// Multiplies every gradient by `s`.
    pub fn scale_grads(&mut self, s: f64) {
        tch::no_grad(|| {
            for i in 0..self.params.len() {
                if let Some(mut g) = self.grad(i) {
                    let _ = g.g_mul_scalar_(s);
                }
            }
        });
    }

    /// Clips to `max_norm` (Megatron: coefficient max/(norm + 1e-6) applied when below 1);
    /// returns the norm before clipping. `max_norm` ≤ 0 only measures.
    pub fn clip(&mut self, max_norm: f64) -> f64 {
        let norm = self.grad_norm();
        self.clip_to(norm, max_norm);
        norm
    }

    /// Scales the gradients so that the global `norm` (this rank's and the other pipeline
    /// stages') becomes at most `max_norm` (0: no clipping).
    pub fn clip_to(&mut self, norm: f64, max_norm: f64) {
        if max_norm > 0.0 {
            let coeff = max_norm / (norm + 1e-6);
            if coeff < 1.0 {
                self.scale_grads(coeff);
            }
        }
    }

    /// One AdamW step at learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let t = self.step as f64; // Python's beta ** step is pow(), not repeated products
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bias1 = 1.0 - b1.powf(t);
        let bias2_sqrt = (1.0 - b2.powf(t)).sqrt();
        let step_size = lr / bias1;
        tch::no_grad(|| {
            for i in 0..self.params.len() {
                let Some(grad) = self.grad(i) else { continue };
                let p = &mut self.params[i];
                let mut target = match &p.master {
                    Some(m) => m.shallow_clone(),
                    None => p.param.shallow_clone(),
                };
                if p.decay && self.cfg.weight_decay != 0.0 {
                    let _ = target.g_mul_scalar_(1.0 - lr * self.cfg.weight_decay);
                }
                let moments = (&mut p.exp_avg, &mut p.exp_avg_sq);
                adam_update(&mut target, &grad, moments, (b1, b2, self.cfg.eps), bias2_sqrt, step_size);
                if p.master.is_some() {
                    p.param.copy_(&target.to_kind(p.param.kind()));
                }
            }
        });
    }

    /// Clears gradients (and the fp32 accumulators).
    pub fn zero_grad(&mut self) {
        tch::no_grad(|| {
            for p in &mut self.params {
                p.param.zero_grad();
                if let Some(m) = &mut p.main_grad {
                    let _ = m.zero_();
                }
            }
        });
    }

    /// The state to save: `exp_avg.<name>`, `exp_avg_sq.<name>`, `master.<name>`.
    pub fn state_tensors(&self, rename: impl Fn(&str) -> String) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for p in &self.params {
            let n = rename(&p.name);
            out.push((format!("exp_avg.{n}"), p.exp_avg.shallow_clone()));
            out.push((format!("exp_avg_sq.{n}"), p.exp_avg_sq.shallow_clone()));
            if let Some(m) = &p.master {
                out.push((format!("master.{n}"), m.shallow_clone()));
            }
        }
        out
    }

    /// Restores state saved by [`AdamW::state_tensors`] (same renaming), checking that every
    /// trainable parameter has its moments with the right shape. Masters that are absent
    /// (saved from an fp32 run) are rebuilt from the parameters.
    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        step: u64,
        rename: impl Fn(&str) -> String,
    ) -> Result<(), OptimizerError> {
        let mut problems = Vec::new();
        for p in &self.params {
            let n = rename(&p.name);
            for key in [format!("exp_avg.{n}"), format!("exp_avg_sq.{n}")] {
                match tensors.get(&key) {
                    None => problems.push(format!("missing {key}")),
                    Some(t) if t.size() != p.param.size() => {
                        problems.push(format!("{key}: shape {:?}, parameter {:?}", t.size(), p.param.size()))
                    }
                    _ => {}
                }
            }
        }
        state_fits(&problems)?;
        tch::no_grad(|| -> Result<(), OptimizerError> {
            for p in &mut self.params {
                let n = rename(&p.name);
                p.exp_avg.f_copy_(&tensors[&format!("exp_avg.{n}")].to_kind(Kind::Float))?;
                p.exp_avg_sq.f_copy_(&tensors[&format!("exp_avg_sq.{n}")].to_kind(Kind::Float))?;
                if let (Some(m), Some(saved)) = (&mut p.master, tensors.get(&format!("master.{n}"))) {
                    m.f_copy_(&saved.to_kind(Kind::Float))?;
                }
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }
}

/// The error for saved optimizer state that does not match the trainable parameters (shared by
/// the replicated and the ZeRO-1 optimizer); Ok when `problems` is empty.
pub(crate) fn state_fits(problems: &[String]) -> Result<(), OptimizerError> {
    if problems.is_empty() {
        return Ok(());
    }
    Err(OptimizerError::State(format!(
        "does not fit the trainable parameters (were other parts frozen when it was saved? \
         --no-load-optim starts fresh moments): {}",
        problems.join("; ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// One step by hand against the formula, with decay and without.
    #[test]
    fn matches_the_adamw_formula() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).reshape([1, 2]).set_requires_grad(true);
        let b = Tensor::from_slice(&[0.5f32]).set_requires_grad(true);
        let mut opt = AdamW::new(
            vec![("w".into(), p.shallow_clone()), ("l.bias".into(), b.shallow_clone())],
            AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 },
        );
        assert!(opt.params[0].decay && !opt.params[1].decay);
        let loss = (&p * &p).sum(Kind::Float) + (&b * 3.0).sum(Kind::Float);
        loss.backward();
        opt.step(0.01);
        // Step 1: m = 0.1 g, v = 0.001 g², m̂ = g, v̂ = g², update = lr · g/(|g| + eps) ≈ lr·sign(g).
        let w0 = p.double_value(&[0, 0]);
        let want0 = 1.0 * (1.0 - 0.01 * 0.1) - 0.01 * (2.0 / (2.0 + 1e-8));
        assert!((w0 - want0).abs() < 1e-6, "{w0} vs {want0}");
        let b0 = b.double_value(&[0]);
        assert!((b0 - (0.5 - 0.01)).abs() < 1e-6, "{b0}");
        assert_eq!(opt.step, 1);
    }

    #[test]
    fn state_round_trips_and_bad_state_is_reported() {
        let p = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0 };
        let mut opt = AdamW::new(vec![("x.weight".into(), p.shallow_clone())], cfg);
        let _ = tch::no_grad(|| opt.params[0].exp_avg.fill_(0.25));
        let saved: BTreeMap<String, Tensor> =
            opt.state_tensors(|n| n.to_string()).into_iter().map(|(k, t)| (k, t.copy())).collect();
        let mut fresh = AdamW::new(vec![("x.weight".into(), p.shallow_clone())], cfg);
        fresh.load_state(&saved, 7, |n| n.to_string()).unwrap();
        assert_eq!(fresh.step, 7);
        assert_eq!(fresh.params[0].exp_avg.double_value(&[1, 2]), 0.25);
        let q = Tensor::zeros([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut other = AdamW::new(vec![("x.weight".into(), p), ("y.weight".into(), q)], cfg);
        let err = other.load_state(&saved, 1, |n| n.to_string()).unwrap_err().to_string();
        assert!(err.contains("missing exp_avg.y.weight"), "{err}");
    }

    #[test]
    fn bf16_params_get_fp32_masters_and_main_grads() {
        let p = Tensor::ones([3], (Kind::BFloat16, Device::Cpu)).set_requires_grad(true);
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let mut opt = AdamW::new(vec![("n.weight".into(), p.shallow_clone())], cfg);
        for _ in 0..2 {
            (&p * 2.0).sum(Kind::Float).backward();
            opt.accumulate();
        }
        let g = opt.grad(0).unwrap();
        assert_eq!(g.kind(), Kind::Float);
        assert_eq!(g.double_value(&[0]), 4.0);
        assert!((opt.clip(1.0) - (3.0f64 * 16.0).sqrt()).abs() < 1e-5);
        opt.step(1e-3);
        assert!(opt.params[0].master.as_ref().unwrap().double_value(&[0]) < 1.0);
        opt.zero_grad();
        assert_eq!(opt.grad(0).unwrap().double_value(&[0]), 0.0);
    }
}
