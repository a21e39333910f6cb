//! Megatron's learning-rate schedule (`OptimizerParamScheduler.get_lr`): linear warmup from 0
//! over `warmup_fraction × train_iters` steps, then cosine, linear or constant decay from `lr`
//! to `min_lr` at `train_iters`. Iteration k (1-based) trains with `lr_at(k - 1)`: the
//! scheduler is stepped after each optimizer step, as in Megatron, so with warmup the first
//! iteration's rate is 0.

use std::f64::consts::PI;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecayStyle {
    Cosine,
    Linear,
    Constant,
}

impl std::str::FromStr for DecayStyle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cosine" => Ok(DecayStyle::Cosine),
            "linear" => Ok(DecayStyle::Linear),
            "constant" => Ok(DecayStyle::Constant),
            other => Err(format!("{other:?}: expected cosine, linear or constant")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub max_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: f64,
    pub decay_steps: f64,
    pub style: DecayStyle,
}

impl Schedule {
    pub fn new(max_lr: f64, min_lr: f64, warmup_fraction: f64, train_iters: u64, style: DecayStyle) -> Schedule {
        Schedule {
            max_lr,
            min_lr,
            warmup_steps: warmup_fraction * train_iters as f64,
            decay_steps: train_iters as f64,
            style,
        }
    }

    /// The rate after `steps` optimizer steps.
    pub fn lr_at(&self, steps: u64) -> f64 {
        let n = steps as f64;
        if self.warmup_steps > 0.0 && n <= self.warmup_steps {
            return self.max_lr * n / self.warmup_steps;
        }
        if self.style == DecayStyle::Constant {
            return self.max_lr;
        }
        if n > self.decay_steps {
            return self.min_lr;
        }
        let span = self.decay_steps - self.warmup_steps;
        let ratio = if span > 0.0 { (n - self.warmup_steps) / span } else { 1.0 };
        let coeff = match self.style {
            DecayStyle::Linear => 1.0 - ratio,
            DecayStyle::Cosine => 0.5 * ((PI * ratio).cos() + 1.0),
            DecayStyle::Constant => 1.0,
        };
        self.min_lr + coeff * (self.max_lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_min() {
        let s = Schedule::new(1e-3, 1e-4, 0.1, 100, DecayStyle::Cosine);
        assert_eq!(s.lr_at(0), 0.0);
        assert!((s.lr_at(5) - 5e-4).abs() < 1e-12);
        assert!((s.lr_at(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr_at(55) - 5.5e-4).abs() < 1e-12, "{}", s.lr_at(55));
        assert!((s.lr_at(100) - 1e-4).abs() < 1e-12);
        assert_eq!(s.lr_at(101), 1e-4);
        let mono: Vec<f64> = (10..=100).map(|k| s.lr_at(k)).collect();
        assert!(mono.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn linear_constant_and_no_warmup() {
        let l = Schedule::new(2.0, 0.0, 0.0, 10, DecayStyle::Linear);
        assert_eq!(l.lr_at(0), 2.0);
        assert!((l.lr_at(5) - 1.0).abs() < 1e-12);
        assert_eq!(l.lr_at(10), 0.0);
        let c = Schedule::new(2.0, 0.5, 0.2, 10, DecayStyle::Constant);
        assert!((c.lr_at(1) - 1.0).abs() < 1e-12);
        assert_eq!(c.lr_at(7), 2.0);
        assert!("cosine".parse::<DecayStyle>().is_ok());
        assert!("exp".parse::<DecayStyle>().unwrap_err().contains("cosine"));
    }
}
