//! The SFT loss and MindSpeed-MM's three reductions (`vlm_model_loss_calculate_type`).
//!
//! Position t's logits predict token t+1; labels of -100 (system/user text, padding, the
//! assistant prefix) do not count. For one optimizer step of micro batches mb:
//!
//! - `default`: Σ_mb (Σ tokens of mb / supervised tokens of mb) / #mb
//! - `per_sample`: mean over the step's samples of each sample's own token mean
//! - `per_token`: Σ over all the step's tokens / all its supervised tokens
//!
//! [`objective`] gives each micro batch's term of that sum, so backward per micro batch
//! accumulates exactly the gradient of the step's loss.

use tch::{Kind, Reduction, Tensor};

pub use super::super::data::template::IGNORE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossReduction {
    Default,
    PerSample,
    PerToken,
}

impl std::str::FromStr for LossReduction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "default" => Ok(LossReduction::Default),
            "per_sample" | "per-sample" => Ok(LossReduction::PerSample),
            "per_token" | "per-token" => Ok(LossReduction::PerToken),
            other => Err(format!("{other:?}: expected default, per_sample or per_token")),
        }
    }
}

/// Per-sample loss sums [B] (graph attached) and supervised-token counts.
pub struct SampleLosses {
    pub sums: Tensor,
    pub counts: Vec<i64>,
}

/// Shifted token cross entropy of logits [B, T, V] against labels [B, T], summed per sample.
pub fn sample_losses(logits: &Tensor, labels: &Tensor) -> SampleLosses {
    let ce = |l: &Tensor, t: &Tensor| -> Result<Tensor, std::convert::Infallible> {
        Ok(l.cross_entropy_loss::<Tensor>(t, None, Reduction::None, IGNORE, 0.0))
    };
    match sample_losses_with(logits, labels, &ce) {
        Ok(l) => l,
        Err(never) => match never {},
    }
}

/// [`sample_losses`] with the per-token cross entropy of fp32 logits [N, V] against targets [N]
/// computed by `per_token` (the vocabulary-parallel one under tensor parallelism, where V is
/// this rank's rows).
pub fn sample_losses_with<E>(
    logits: &Tensor,
    labels: &Tensor,
    per_token: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor, E>,
) -> Result<SampleLosses, E> {
    let (b, t, v) = logits.size3().expect("logits are [B, T, V]");
    let shifted = logits.narrow(1, 0, t - 1).to_kind(Kind::Float).reshape([-1, v]);
    let targets = labels.narrow(1, 1, t - 1).reshape([-1]);
    let per_token = per_token(&shifted, &targets)?.reshape([b, t - 1]);
    let counts_t = targets.ne(IGNORE).reshape([b, t - 1]).sum_dim_intlist(1, false, Kind::Int64);
    let counts = Vec::<i64>::try_from(&counts_t).unwrap_or_else(|_| vec![0; b as usize]);
    Ok(SampleLosses { sums: per_token.sum_dim_intlist(1, false, Kind::Float), counts })
}

/// The per-sample losses of `lm`'s logits for a micro batch's labels [B, T] (the whole
/// sequence's), with its vocabulary-parallel cross entropy. With context parallelism the logits
/// are this rank's positions [B, local, V]: they are scored against the targets of those
/// positions (shifted on the whole sequence), so the sums are this rank's part, while the
/// counts are the whole samples' (every rank has the labels): summed over the context-parallel
/// ranks, the terms of [`objective`] give the loss one rank computes.
pub fn model_sample_losses(
    lm: &crate::model::qwen2::Qwen2,
    logits: &Tensor,
    labels: &Tensor,
) -> Result<SampleLosses, crate::model::ForwardError> {
    let ce = |l: &Tensor, t: &Tensor| lm.token_losses(l, t, IGNORE);
    let Some(targets) = lm.context_targets(labels, IGNORE) else { return sample_losses_with(logits, labels, &ce) };
    let (b, _, v) = logits.size3().expect("logits are [B, T, V]");
    let t = labels.size()[1];
    let per_token = ce(&logits.to_kind(Kind::Float).reshape([-1, v]), &targets.reshape([-1]))?.reshape([b, -1]);
    let counts_t = labels.narrow(1, 1, t - 1).ne(IGNORE).sum_dim_intlist(1, false, Kind::Int64);
    let counts = Vec::<i64>::try_from(&counts_t).unwrap_or_else(|_| vec![0; b as usize]);
    Ok(SampleLosses { sums: per_token.sum_dim_intlist(1, false, Kind::Float), counts })
}

/// Sizes of the whole step the reductions divide by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepTotals {
    pub micro_batches: usize,
    pub samples: usize,
    pub tokens: i64,
}

/// This micro batch's term of the step loss (backward on it), and its contribution to the
/// logged loss value (the same number, detached).
pub fn objective(mode: LossReduction, l: &SampleLosses, totals: StepTotals) -> Tensor {
    match mode {
        LossReduction::Default => {
            let n: i64 = l.counts.iter().sum();
            l.sums.sum(Kind::Float) / (n.max(1) as f64) / totals.micro_batches as f64
        }
        LossReduction::PerSample => {
            let counts = Tensor::from_slice(&l.counts).to_device(l.sums.device()).to_kind(Kind::Float).clamp_min(1.0);
            (&l.sums / counts).sum(Kind::Float) / totals.samples as f64
        }
        LossReduction::PerToken => l.sums.sum(Kind::Float) / totals.tokens.max(1) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn fixture() -> (Tensor, Tensor) {
        let logits = Tensor::randn([2, 4, 5], (Kind::Float, Device::Cpu));
        let labels = Tensor::from_slice(&[-100i64, 1, 2, -100, -100, -100, 3, -100]).reshape([2, 4]);
        (logits, labels)
    }

    #[test]
    fn shifted_and_masked() {
        tch::manual_seed(0);
        let (logits, labels) = fixture();
        let l = sample_losses(&logits, &labels);
        assert_eq!(l.counts, [2, 1]);
        let lp = logits.log_softmax(-1, Kind::Float);
        let want0 = -(lp.double_value(&[0, 0, 1]) + lp.double_value(&[0, 1, 2]));
        let want1 = -lp.double_value(&[1, 1, 3]);
        assert!((l.sums.double_value(&[0]) - want0).abs() < 1e-5);
        assert!((l.sums.double_value(&[1]) - want1).abs() < 1e-5);
    }

    #[test]
    fn the_three_reductions() {
        tch::manual_seed(1);
        let (logits, labels) = fixture();
        let l = sample_losses(&logits, &labels);
        let (s0, s1) = (l.sums.double_value(&[0]), l.sums.double_value(&[1]));
        // Two micro batches of this shape, 4 samples, 6 tokens in the step.
        let totals = StepTotals { micro_batches: 2, samples: 4, tokens: 6 };
        let d = objective(LossReduction::Default, &l, totals).double_value(&[]);
        assert!((d - (s0 + s1) / 3.0 / 2.0).abs() < 1e-6);
        let p = objective(LossReduction::PerSample, &l, totals).double_value(&[]);
        assert!((p - (s0 / 2.0 + s1 / 1.0) / 4.0).abs() < 1e-6);
        let t = objective(LossReduction::PerToken, &l, totals).double_value(&[]);
        assert!((t - (s0 + s1) / 6.0).abs() < 1e-6);
        assert!("per_token".parse::<LossReduction>().is_ok());
        assert!("mean".parse::<LossReduction>().is_err());
    }
}
