//! Megatron's per-iteration log line, read as a [`Progress`].
//!
//! MindSpeed-MM prints no progress line of ours: its training loop (Megatron's
//! `training_log`) prints, on the last rank, every `--log-interval` iterations,
//!
//! ```text
//!  [2026-12-01 04:00:00] iteration       10/    5000 | consumed samples:           80 |
//!  elapsed time per iteration (ms): 1234.5 | learning rate: 1.000000E-05 | global batch size:     8 |
//!  tokens per sample: 2.048000E+03 | loss: 1.234567E+00 | loss scale: 1.0 | grad norm: 1.234 |
//!  number of skipped iterations:   0 | number of nan iterations:   0 |
//! ```
//!
//! (one line; `tokens per sample` only with `--log-tps`, `grad norm` only when clipping).
//! This module turns that line into the same [`Progress`] mm-engine reports, so the launcher's
//! bar, metrics.jsonl, TensorBoard copy, `launch plot` and `launch logs --summary` work for
//! MindSpeed-MM runs too. mm-engine prints the same layout with more fields; this reads its
//! loss, rates and data wait, not its TFLOP/s, MFU or memory (its progress line has them).
//!
//! What the line does not carry is left unknown: tokens/s without `tokens per sample` (NaN),
//! data wait, memory, the slowest rank. MindSpeed-MM's tokens per sample is the padded
//! sequence length, so its tokens/s counts padding (mm-engine's counts real tokens).
//! Megatron's `throughput per GPU (TFLOP/s/GPU)` is not taken: MindSpeed-MM itself warns that
//! it is wrong for multimodal models. A loss Megatron left out (it prints only averages ≥ 0,
//! so a NaN loss disappears from the line) is NaN, and so is the 0 it prints for an interval
//! whose every iteration was skipped.

use crate::progress::Progress;

/// Where Megatron's `iteration N/M` starts in `line`, if the line is one: the word, spaces,
/// digits and `/`, after nothing but spaces and bracketed tags (the `[date time]` stamp,
/// torchrun's `[default7]:` or `[rank7]:`), so a message that mentions an iteration is not one.
pub fn find(line: &[u8]) -> Option<usize> {
    const WORD: &[u8] = b"iteration ";
    let i = line.windows(WORD.len()).position(|w| w == WORD)?;
    let mut before = line[..i].trim_ascii();
    while let Some(rest) = before.strip_prefix(b"[") {
        let close = rest.iter().position(|&b| b == b']')?;
        let after = &rest[close + 1..];
        before = after.strip_prefix(b":").unwrap_or(after).trim_ascii_start();
    }
    let digits = line[i + WORD.len()..].trim_ascii_start();
    let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    (before.is_empty() && n > 0 && digits[n..].starts_with(b"/")).then_some(i)
}

/// The logged iteration in Megatron's line, or None when `line` is not one (or lacks the
/// consumed samples, the step time or the learning rate every training log line has).
pub fn parse(line: &str) -> Option<Progress> {
    let at = find(line.as_bytes())?;
    let mut fields = line[at..].split('|');
    let (iteration, train_iters) = fields.next()?.trim().strip_prefix("iteration")?.split_once('/')?;
    let (iteration, train_iters) = (iteration.trim().parse().ok()?, train_iters.trim().parse().ok()?);
    let pairs: Vec<(&str, &str)> =
        fields.filter_map(|f| f.split_once(':')).map(|(k, v)| (k.trim(), v.trim())).collect();
    let get = |key: &str| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let num = |key: &str| get(key).and_then(number);
    let consumed_samples = get("consumed samples")?.parse().ok()?;
    let step_ms = num("elapsed time per iteration (ms)")?;
    let lr = num("learning rate")?;
    let step_s = step_ms / 1e3;
    let batch = num("global batch size");
    // Megatron averages the loss dictionary over the interval's advanced iterations, or over
    // 1 when every one was skipped (fp16 loss-scale overflows): a 0 then means "no value".
    let skipped = num("number of skipped iterations").is_some_and(|n| n > 0.0);
    let averaged = |key: &str| num(key).filter(|v| !(skipped && *v == 0.0));
    // mm-engine's line says tokens/s and samples/s itself; MindSpeed-MM's (with --log-tps) has
    // tokens per sample, the padded sequence length averaged over the data-parallel ranks.
    let samples_per_sec = num("samples/s").or_else(|| Some(batch? / step_s)).unwrap_or(f64::NAN);
    let tokens_per_sec =
        num("tokens/s").or_else(|| Some(averaged("tokens per sample")? * batch? / step_s)).unwrap_or(f64::NAN);
    Some(Progress {
        iteration,
        train_iters,
        loss: averaged("lm loss").or_else(|| averaged("loss")).unwrap_or(f64::NAN),
        lr,
        grad_norm: num("grad norm"),
        tokens_per_sec,
        samples_per_sec,
        step_ms,
        consumed_samples,
        data_ms: num("data wait (ms)"),
        ..Progress::default()
    })
}

/// A number as Python's formats print it (`1.234567E+00`, `nan`, `inf`).
fn number(s: &str) -> Option<f64> {
    let s = s.split_whitespace().next()?;
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The line MindSpeed-MM's training_log prints, built with its format strings.
    fn mindspeed(iteration: u64, loss: Option<f64>, tps: Option<f64>, grad_norm: Option<f64>) -> String {
        let mut s = format!(
            " [2026-12-01 04:00:00] iteration {iteration:>8}/{:>8} | consumed samples: {:>12} | \
             elapsed time per iteration (ms): {:.1} | learning rate: {} | global batch size: {:>5} |",
            5000,
            iteration * 8,
            2000.0,
            "2.000000E-05",
            8
        );
        if let Some(t) = tps {
            s.push_str(&format!(" tokens per sample: {t:.6E} |"));
        }
        if let Some(l) = loss {
            s.push_str(&format!(" loss: {l:.6E} |"));
        }
        s.push_str(" loss scale: 1.0 |");
        if let Some(g) = grad_norm {
            s.push_str(&format!(" grad norm: {g:.3} |"));
        }
        s.push_str(" number of skipped iterations:   0 | number of nan iterations:   0 |");
        s
    }

    #[test]
    fn reads_mindspeed_mm_lines() {
        let p = parse(&mindspeed(10, Some(1.25), Some(2048.0), Some(0.5))).unwrap();
        assert_eq!((p.iteration, p.train_iters, p.consumed_samples), (10, 5000, 80));
        assert_eq!((p.loss, p.lr, p.grad_norm, p.step_ms), (1.25, 2e-5, Some(0.5), 2000.0));
        // 8 samples of 2048 tokens every 2 s.
        assert_eq!((p.samples_per_sec, p.tokens_per_sec), (4.0, 8192.0));
        assert_eq!((p.tflops, p.mfu, p.mem_bytes, p.data_ms), (None, None, None, None));

        // No --log-tps: tokens/s unknown; no clipping: no norm; "loss scale" is not the loss.
        let p = parse(&mindspeed(20, Some(0.75), None, None)).unwrap();
        assert!(p.tokens_per_sec.is_nan() && p.grad_norm.is_none());
        assert_eq!(p.loss, 0.75);
        // Megatron leaves a NaN average out of the line: the loss is unknown, not 1.0.
        assert!(parse(&mindspeed(30, None, None, None)).unwrap().loss.is_nan());
        // An interval of skipped iterations averages to 0 over nothing: unknown, not 0.
        let all_skipped =
            mindspeed(40, Some(0.0), Some(0.0), None).replace("skipped iterations:   0", "skipped iterations:   1");
        let p = parse(&all_skipped).unwrap();
        assert!(p.loss.is_nan() && p.tokens_per_sec.is_nan(), "{p:?}");
        assert_eq!(parse(&mindspeed(41, Some(0.0), None, None)).unwrap().loss, 0.0, "nothing skipped: a real 0");
        // Megatron's own TFLOP/s (wrong for multimodal models, MindSpeed-MM says) is not taken.
        let throughput = mindspeed(50, Some(1.0), None, None)
            .replace(" | learning rate", " | throughput per GPU (TFLOP/s/GPU): 180.3 | learning rate");
        let p = parse(&throughput).unwrap();
        assert_eq!((p.tflops, p.lr), (None, 2e-5));
    }

    #[test]
    fn reads_tagged_lines_and_mm_engine_lines() {
        for tagged in [
            format!("[default7]:{}", mindspeed(10, Some(1.0), None, None)),
            format!("[rank15]: {}\r", mindspeed(10, Some(1.0), None, None)),
        ] {
            let p = parse(&tagged).unwrap();
            assert_eq!((p.iteration, p.loss), (10, 1.0), "{tagged}");
        }
        let engine = " iteration        3/       8 | consumed samples:         24 | elapsed time per iteration (ms): \
                      250.0 | data wait (ms): 12.5 | learning rate: 1.000000E-05 | global batch size:     8 | \
                      lm loss: 2.500000E+00 | grad norm: 1.5000 | tokens per sample: 100.0 | tokens/s: 3000.0 | \
                      samples/s: 30.000";
        let p = parse(engine).unwrap();
        assert_eq!((p.iteration, p.loss, p.tokens_per_sec, p.data_ms), (3, 2.5, 3000.0, Some(12.5)));
        assert_eq!(p.samples_per_sec, 30.0);
    }

    #[test]
    fn other_lines_are_not_iterations() {
        for line in [
            // Megatron's evaluation lines, during training and at the end.
            " validation loss at iteration 10 | lm loss value: 1.0 | lm loss PPL: 2.7 |",
            " validation loss at iteration 5 on validation set | lm loss value: 1.0 |",
            "warning: loss spike at iteration 3/10 | consumed samples: 1 | elapsed time per iteration (ms): 1 | \
             learning rate: 1",
            "saving checkpoint at iteration       10 to ./save",
            "reiteration 3/4 | consumed samples: 1 | elapsed time per iteration (ms): 1 | learning rate: 1",
            " iteration        3/       8 | consumed samples: lots | elapsed time per iteration (ms): 1.0 | learning rate: 1",
            " iteration        3/       8 | consumed samples: 24 |",
            "",
        ] {
            assert!(parse(line).is_none(), "{line}");
        }
        assert_eq!(find(b"[2026-12-01 04:00:00] iteration 3/4"), Some(22));
        assert_eq!(find(b"  iteration 3/4"), Some(2));
        assert_eq!(find(b"x iteration 3/4"), None);
        assert_eq!(find(b"iteration done"), None);
    }
}
