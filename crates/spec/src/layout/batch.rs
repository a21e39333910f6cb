//! The batch arithmetic, once for every tool: one optimizer step consumes
//! `global batch = micro batch × gradient accumulation × dp` samples (Megatron's rule). The
//! launcher's plan, the layout checks and the engine's flags all derive the missing number here.

use serde::Serialize;

use super::error::LayoutError;

/// The three batch numbers of a run, consistent with its data-parallel size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BatchSizes {
    pub micro_batch_size: usize,
    /// Micro batches per optimizer step on each data-parallel rank.
    pub grad_accumulation: usize,
    pub global_batch_size: usize,
}

impl BatchSizes {
    /// Derives the missing number from those given. With both given they must agree; with
    /// neither, one micro batch per rank per step (Megatron's default global batch). Errors
    /// name the keys in snake_case (`global_batch_size`); see [`BatchSizes::flag_names`].
    pub fn derive(
        micro_batch_size: usize,
        global_batch_size: Option<usize>,
        grad_accumulation: Option<usize>,
        dp: usize,
    ) -> Result<BatchSizes, LayoutError> {
        let (mbs, dp) = (micro_batch_size, dp.max(1));
        let zero = |name: &str| Err(LayoutError::Zero { name: name.into() });
        if mbs == 0 {
            return zero("micro_batch_size");
        }
        let (gas, gbs) = match (global_batch_size, grad_accumulation) {
            (_, Some(0)) => return zero("grad_accumulation"),
            (Some(0), _) => return zero("global_batch_size"),
            (Some(gbs), Some(gas)) => {
                let product = mbs.saturating_mul(gas).saturating_mul(dp);
                if gbs != product {
                    return Err(LayoutError::BatchMismatch { gbs, mbs, gas, dp, product });
                }
                (gas, gbs)
            }
            (Some(gbs), None) => {
                let unit = mbs.saturating_mul(dp);
                if gbs % unit != 0 {
                    let suggestion = gbs.div_ceil(unit).max(1).saturating_mul(unit);
                    return Err(LayoutError::GbsNotMultiple { gbs, mbs, dp, unit, suggestion });
                }
                (gbs / unit, gbs)
            }
            (None, Some(gas)) => (gas, mbs.saturating_mul(gas).saturating_mul(dp)),
            (None, None) => (1, mbs.saturating_mul(dp)),
        };
        Ok(BatchSizes { micro_batch_size: mbs, grad_accumulation: gas, global_batch_size: gbs })
    }

    /// A batch error's text with the keys spelled as Megatron's command-line flags
    /// (`--global-batch-size`), for tools that take flags.
    pub fn flag_names(message: &str) -> String {
        ["micro_batch_size", "global_batch_size", "grad_accumulation"]
            .iter()
            .fold(message.to_string(), |m, k| m.replace(k, &format!("--{}", k.replace('_', "-"))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derives_the_missing_number() {
        let b = |g, a, dp| BatchSizes::derive(2, g, a, dp).map(|b| (b.grad_accumulation, b.global_batch_size));
        assert_eq!(b(Some(16), None, 4), Ok((2, 16)));
        assert_eq!(b(None, Some(3), 2), Ok((3, 12)));
        assert_eq!(b(None, None, 3), Ok((1, 6)));
        assert_eq!(b(Some(8), Some(2), 2), Ok((2, 8)));
    }

    #[test]
    fn inconsistent_or_zero_numbers_say_what_fits() {
        let e = BatchSizes::derive(2, Some(32), Some(2), 4).unwrap_err().to_string();
        assert!(e.contains("2×2×4 = 16: set global_batch_size to 16, or grad_accumulation to 32/(2×4) = 4"), "{e}");
        let e = BatchSizes::derive(1, Some(127), None, 2).unwrap_err().to_string();
        assert!(e.contains("use a multiple of 2, e.g. 128"), "{e}");
        assert!(BatchSizes::derive(0, None, None, 1).unwrap_err().to_string().contains("micro_batch_size"));
        let e = BatchSizes::derive(1, None, Some(0), 1).unwrap_err().to_string();
        assert_eq!(BatchSizes::flag_names(&e), e.replace("grad_accumulation", "--grad-accumulation"));
    }
}
