//! Activation recomputation, Megatron's settings: one type for mm-engine (which runs it), the
//! launcher's recipe (which renders it for mm-engine and MindSpeed-MM) and the memory estimate
//! (which counts what it saves).
//!
//! | Megatron flags | variant | what is recomputed in backward |
//! |---|---|---|
//! | `--recompute-granularity full --recompute-method uniform --recompute-num-layers N` | `FullUniform(N)` | every layer of a chunk, in groups of N consecutive layers (one saved input per group) |
//! | `--recompute-granularity full --recompute-method block --recompute-num-layers N` | `FullBlock(N)` | the first N layers of each chunk, each on its own; the rest keep their activations |
//! | `--recompute-granularity selective` | `Selective` | the attention core (softmax(QKᵀ)V) of every layer |

use std::ops::Range;

/// A checked recomputation setting (N ≥ 1 in both full variants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recompute {
    /// Every layer, in groups of N.
    FullUniform(usize),
    /// The first N layers of each chunk, each on its own.
    FullBlock(usize),
    /// The attention core of every layer.
    Selective,
}

impl Recompute {
    /// Parses the three flags as Megatron checks them: full needs a method, selective takes
    /// none; `--recompute-num-layers` defaults to 1 and must be at least 1. `None`: no
    /// recomputation.
    pub fn from_flags(
        granularity: Option<&str>,
        method: Option<&str>,
        num_layers: Option<usize>,
    ) -> Result<Option<Recompute>, String> {
        match granularity {
            None => match (method, num_layers) {
                (None, None) => Ok(None),
                _ => Err("--recompute-method and --recompute-num-layers need --recompute-granularity full".into()),
            },
            Some("selective") if method.is_some() || num_layers.is_some() => {
                Err("--recompute-granularity selective recomputes every layer's attention core: \
                     --recompute-method and --recompute-num-layers go with full"
                    .into())
            }
            Some("selective") => Ok(Some(Recompute::Selective)),
            Some("full") => {
                let n = num_layers.unwrap_or(1);
                let full = match method {
                    Some("uniform") => Recompute::FullUniform(n),
                    Some("block") => Recompute::FullBlock(n),
                    Some(other) => return Err(format!("--recompute-method {other:?}: expected uniform or block")),
                    None => {
                        return Err("--recompute-granularity full needs --recompute-method uniform (every layer, in \
                                    groups of --recompute-num-layers) or block (the first --recompute-num-layers \
                                    layers of each stage)"
                            .into())
                    }
                };
                if n == 0 {
                    return Err(format!(
                        "--recompute-num-layers 0 with --recompute-method {}: expected at least 1",
                        full.method().unwrap_or_default()
                    ));
                }
                Ok(Some(full))
            }
            Some(other) => Err(format!("--recompute-granularity {other:?}: expected full or selective")),
        }
    }

    /// Megatron's `--recompute-granularity` value.
    pub fn granularity(&self) -> &'static str {
        match self {
            Recompute::Selective => "selective",
            _ => "full",
        }
    }

    /// Megatron's `--recompute-method` value (full granularity only).
    pub fn method(&self) -> Option<&'static str> {
        match self {
            Recompute::FullUniform(_) => Some("uniform"),
            Recompute::FullBlock(_) => Some("block"),
            Recompute::Selective => None,
        }
    }

    /// Megatron's `--recompute-num-layers` value (full granularity only).
    pub fn num_layers(&self) -> Option<usize> {
        match *self {
            Recompute::FullUniform(n) | Recompute::FullBlock(n) => Some(n),
            Recompute::Selective => None,
        }
    }

    /// How `n` consecutive layers of a chunk run: ranges of layer indices, each recomputed as
    /// one segment (`true`) or kept (`false`), covering `0..n` in order.
    pub fn segments(&self, n: usize) -> Vec<(Range<usize>, bool)> {
        match *self {
            Recompute::FullUniform(k) => {
                let k = k.max(1);
                (0..n).step_by(k).map(|s| (s..(s + k).min(n), true)).collect()
            }
            Recompute::FullBlock(k) => (0..n).map(|i| (i..i + 1, i < k)).collect(),
            Recompute::Selective => vec![(0..n, false)],
        }
    }

    /// Whether the attention core is recomputed (selective granularity).
    pub fn attention_core(&self) -> bool {
        *self == Recompute::Selective
    }

    /// In words, for logs: "full, uniform, groups of 2 layers", "selective (attention core)".
    pub fn describe(&self) -> String {
        let layers = |n: usize| if n == 1 { "1 layer".to_string() } else { format!("{n} layers") };
        match *self {
            Recompute::FullUniform(n) => format!("full, uniform, groups of {}", layers(n)),
            Recompute::FullBlock(n) => format!("full, block, the first {} of each chunk", layers(n)),
            Recompute::Selective => "selective (attention core)".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn megatron_flags_and_their_segments() {
        let r = |g: Option<&str>, m: Option<&str>, n: Option<usize>| Recompute::from_flags(g, m, n);
        assert_eq!(r(None, None, None), Ok(None));
        let uni = r(Some("full"), Some("uniform"), Some(2)).unwrap().unwrap();
        assert_eq!(uni.segments(5), [(0..2, true), (2..4, true), (4..5, true)]);
        let block = r(Some("full"), Some("block"), Some(2)).unwrap().unwrap();
        assert_eq!(block.segments(3), [(0..1, true), (1..2, true), (2..3, false)]);
        assert_eq!(block.describe(), "full, block, the first 2 layers of each chunk");
        assert_eq!(uni.describe(), "full, uniform, groups of 2 layers");
        assert_eq!((block.granularity(), block.method(), block.num_layers()), ("full", Some("block"), Some(2)));
        assert_eq!(r(Some("full"), Some("uniform"), None).unwrap(), Some(Recompute::FullUniform(1)));
        let sel = r(Some("selective"), None, None).unwrap().unwrap();
        assert!(sel.attention_core() && !uni.attention_core());
        assert_eq!((sel.granularity(), sel.method(), sel.num_layers()), ("selective", None, None));
        assert_eq!(sel.segments(3), [(0..3, false)]);
        assert!(r(Some("full"), None, None).unwrap_err().contains("needs --recompute-method"));
        assert!(r(Some("selective"), Some("block"), None).is_err());
        assert!(r(Some("partial"), None, None).unwrap_err().contains("expected full or selective"));
        assert!(r(None, Some("uniform"), None).is_err());
        assert!(r(Some("full"), Some("uniform"), Some(0)).unwrap_err().contains("--recompute-method uniform"));
        assert!(r(Some("full"), Some("block"), Some(0)).unwrap_err().contains("--recompute-method block"));
    }
}
