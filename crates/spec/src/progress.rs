//! The progress line: the one machine-readable line format between the engine and the launcher.
//!
//! The engine prints `@@mm-progress {json}` once per logged iteration (and at checkpoints and
//! at the end); the launcher scans rank output for the prefix and ignores everything else as
//! plain log text. The JSON is one [`ProgressEvent`], tagged by `"event"`.
//!
//! Non-finite floats are part of the contract: a diverging run logs a NaN loss, and the
//! launcher must show "nan" rather than fail to parse. JSON has no NaN, so f64 fields are
//! written as numbers when finite and as the strings "nan", "inf", "-inf" otherwise.

use serde::{Deserialize, Serialize};

use crate::error::SpecError;

/// Marks a progress line; the JSON object follows right after the space.
pub const PROGRESS_PREFIX: &str = "@@mm-progress ";

/// One logged training iteration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub iteration: u64,
    pub train_iters: u64,
    #[serde(with = "lossless_f64")]
    pub loss: f64,
    #[serde(with = "lossless_f64")]
    pub lr: f64,
    /// None when the engine does not clip (no norm computed).
    #[serde(with = "lossless_opt_f64", default)]
    pub grad_norm: Option<f64>,
    #[serde(with = "lossless_f64")]
    pub tokens_per_sec: f64,
    #[serde(with = "lossless_f64")]
    pub samples_per_sec: f64,
    #[serde(with = "lossless_f64")]
    pub step_ms: f64,
    /// Resident (host) memory of the printing rank's process, when the platform reports it.
    #[serde(default)]
    pub mem_bytes: Option<u64>,
    pub consumed_samples: u64,
    /// Time the printing rank waited for its micro batches, per iteration of the window.
    #[serde(with = "lossless_opt_f64", default)]
    pub data_ms: Option<f64>,
    /// The rank that worked longest in the last step, and for how long: its step time outside
    /// collectives and transfers (computing, loading data), which a straggler makes longest
    /// while the others wait for it. Every rank's is summed into rank 0 at each logged
    /// iteration.
    #[serde(default)]
    pub slowest_rank: Option<usize>,
    #[serde(with = "lossless_opt_f64", default)]
    pub slowest_busy_ms: Option<f64>,
    /// Model TFLOP/s per device over the window ([`crate::flops`]), and that over the
    /// device's peak; `mfu` is None when no peak is known.
    #[serde(with = "lossless_opt_f64", default)]
    pub tflops: Option<f64>,
    #[serde(with = "lossless_opt_f64", default)]
    pub mfu: Option<f64>,
    /// The CUDA caching allocator's allocated and reserved bytes on the printing rank's GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_allocated_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_reserved_bytes: Option<u64>,
}

/// Everything the engine reports on a progress line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ProgressEvent {
    /// A logged iteration.
    Step(Progress),
    /// A checkpoint was written completely at `path`.
    Checkpoint { iteration: u64, path: String },
    /// Training finished normally.
    Done(RunSummary),
    /// Every rank agreed to stop early (a signal: preemption, Ctrl-C, `launch stop`) after
    /// `iteration`; `checkpoint` is the save written for it (None without --save).
    Stopped { iteration: u64, signal: String, checkpoint: Option<String> },
}

/// The end of a run, as the engine reports it and the launcher keeps it (report, status.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub iteration: u64,
    /// Written as a string when not finite (NaN, ±inf), so it always reads back.
    #[serde(with = "lossless_f64")]
    pub final_loss: f64,
    #[serde(with = "lossless_f64")]
    pub tokens_per_sec: f64,
    /// The last checkpoint written, if any (when `steps` is 0: the checkpoint loaded); a path
    /// on the hosts.
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// Iterations this run trained (0: the checkpoint already reached --train-iters); None
    /// from older engines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
}

/// How much of a bad line an error message quotes.
const QUOTE_LIMIT: usize = 200;

impl ProgressEvent {
    /// The full line to print: prefix + JSON, without a newline.
    pub fn to_line(&self) -> String {
        // Serialization cannot fail: every field is a string, an integer or a float written by
        // `lossless_f64`, and there are no maps with non-string keys.
        let json = serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"event\":\"unserializable\",\"error\":{:?}}}", e.to_string()));
        format!("{PROGRESS_PREFIX}{json}")
    }

    /// Parses one line of output.
    ///
    /// `None` when the line carries no progress prefix (ordinary log text). The prefix may be
    /// preceded by text, because launchers such as torchrun `--tee` and msrun prepend
    /// `[default0]:`-style tags. `Some(Err)` when the prefix is there but the JSON is not a
    /// valid event.
    pub fn parse(line: &str) -> Option<Result<ProgressEvent, SpecError>> {
        let start = line.find(PROGRESS_PREFIX)?;
        let json = line[start + PROGRESS_PREFIX.len()..].trim();
        Some(
            serde_json::from_str(json)
                .map_err(|e| SpecError::BadProgressLine { line: quote(line), reason: e.to_string() }),
        )
    }

    /// The iteration the event refers to.
    pub fn iteration(&self) -> u64 {
        match self {
            ProgressEvent::Step(p) => p.iteration,
            ProgressEvent::Checkpoint { iteration, .. }
            | ProgressEvent::Stopped { iteration, .. }
            | ProgressEvent::Done(RunSummary { iteration, .. }) => *iteration,
        }
    }
}

fn quote(line: &str) -> String {
    let trimmed = line.trim_end();
    match trimmed.char_indices().nth(QUOTE_LIMIT) {
        Some((cut, _)) => format!("{}…", &trimmed[..cut]),
        None => trimmed.to_string(),
    }
}

/// An f64 as a JSON number when finite, else as "nan" / "inf" / "-inf".
pub mod lossless_f64 {
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else if v.is_nan() {
            s.serialize_str("nan")
        } else if *v > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        d.deserialize_any(F64Visitor)
    }

    pub(super) struct F64Visitor;

    impl Visitor<'_> for F64Visitor {
        type Value = f64;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a number or one of \"nan\", \"inf\", \"-inf\"")
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
            Ok(v as f64)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
            Ok(v as f64)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
            match v.to_ascii_lowercase().as_str() {
                "nan" | "-nan" => Ok(f64::NAN),
                "inf" | "+inf" | "infinity" => Ok(f64::INFINITY),
                "-inf" | "-infinity" => Ok(f64::NEG_INFINITY),
                _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
            }
        }
    }
}

/// [`lossless_f64`] for optional values; JSON null is `None`.
pub mod lossless_opt_f64 {
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    use super::lossless_f64::{self, F64Visitor};

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) => lossless_f64::serialize(x, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        d.deserialize_any(OptVisitor)
    }

    struct OptVisitor;

    impl<'de> Visitor<'de> for OptVisitor {
        type Value = Option<f64>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("null, a number or one of \"nan\", \"inf\", \"-inf\"")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            lossless_f64::deserialize(d).map(Some)
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            F64Visitor.visit_f64(v).map(Some)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            F64Visitor.visit_i64(v).map(Some)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            F64Visitor.visit_u64(v).map(Some)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            F64Visitor.visit_str(v).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn step(loss: f64, grad_norm: Option<f64>) -> ProgressEvent {
        ProgressEvent::Step(Progress {
            iteration: 12,
            train_iters: 5000,
            loss,
            lr: 2e-5,
            grad_norm,
            tokens_per_sec: 2344.58,
            samples_per_sec: 0.88,
            step_ms: 1234.5,
            mem_bytes: Some(61_000_000_000),
            consumed_samples: 1536,
            ..Default::default()
        })
    }

    /// Equality that treats NaN as equal to NaN (field by field through the JSON form).
    fn same(a: &ProgressEvent, b: &ProgressEvent) -> bool {
        serde_json::to_value(a).unwrap() == serde_json::to_value(b).unwrap()
    }

    #[test]
    fn line_format() {
        let line = step(1.5, Some(0.75)).to_line();
        assert!(line.starts_with("@@mm-progress {\"event\":\"step\",\"iteration\":12,"), "{line}");
        assert!(!line.contains('\n'));
        let done = ProgressEvent::Done(RunSummary {
            iteration: 5000,
            final_loss: 0.5,
            tokens_per_sec: 2000.0,
            checkpoint: None,
            steps: None,
        });
        assert_eq!(
            done.to_line(),
            "@@mm-progress {\"event\":\"done\",\"iteration\":5000,\"final_loss\":0.5,\
             \"tokens_per_sec\":2000.0,\"checkpoint\":null}"
        );
    }

    #[test]
    fn round_trips() {
        let events = [
            step(1.5, Some(0.75)),
            step(1.5, None),
            ProgressEvent::Checkpoint { iteration: 100, path: "save/iter_0000100".into() },
            ProgressEvent::Done(RunSummary {
                iteration: 5000,
                final_loss: 0.4,
                tokens_per_sec: 2211.93,
                checkpoint: Some("save/iter_0005000".into()),
                steps: Some(40),
            }),
        ];
        for e in events {
            let back = ProgressEvent::parse(&e.to_line()).unwrap().unwrap();
            assert_eq!(back, e);
            assert_eq!(back.iteration(), e.iteration());
        }
    }

    #[test]
    fn non_finite_values_survive() {
        let e = step(f64::NAN, Some(f64::INFINITY));
        let line = e.to_line();
        assert!(line.contains("\"loss\":\"nan\""), "{line}");
        assert!(line.contains("\"grad_norm\":\"inf\""), "{line}");
        let back = ProgressEvent::parse(&line).unwrap().unwrap();
        let ProgressEvent::Step(p) = &back else { panic!("not a step: {back:?}") };
        assert!(p.loss.is_nan());
        assert_eq!(p.grad_norm, Some(f64::INFINITY));
        assert!(same(&back, &e));

        let done = ProgressEvent::Done(RunSummary {
            iteration: 1,
            final_loss: f64::NEG_INFINITY,
            tokens_per_sec: 0.0,
            checkpoint: None,
            steps: None,
        });
        let back = ProgressEvent::parse(&done.to_line()).unwrap().unwrap();
        assert_eq!(back, done);
    }

    #[test]
    fn prefix_may_follow_launcher_tags() {
        let line = format!("[default0]:{}", step(2.0, None).to_line());
        assert_eq!(ProgressEvent::parse(&line).unwrap().unwrap(), step(2.0, None));
        let crlf = format!("{}\r\n", step(2.0, None).to_line());
        assert!(ProgressEvent::parse(&crlf).unwrap().is_ok());
    }

    #[test]
    fn lines_without_prefix_are_not_ours() {
        assert!(ProgressEvent::parse("iteration 12 | loss 1.5").is_none());
        assert!(ProgressEvent::parse("").is_none());
        assert!(ProgressEvent::parse("@@mm-progress{\"event\":\"step\"}").is_none());
    }

    #[test]
    fn bad_lines_are_errors() {
        for bad in [
            "@@mm-progress ",
            "@@mm-progress {not json",
            "@@mm-progress {\"event\":\"launch\",\"iteration\":1}",
            "@@mm-progress {\"iteration\":1,\"path\":\"x\"}",
            "@@mm-progress {\"event\":\"checkpoint\",\"iteration\":1}",
            "@@mm-progress {\"event\":\"done\",\"iteration\":1,\"final_loss\":\"lots\",\"tokens_per_sec\":1}",
            "@@mm-progress {\"event\":\"checkpoint\",\"iteration\":-1,\"path\":\"x\"}",
        ] {
            let err = ProgressEvent::parse(bad).unwrap().unwrap_err();
            assert!(matches!(err, SpecError::BadProgressLine { .. }), "{bad}: {err}");
            let msg = err.to_string();
            assert!(msg.starts_with("malformed progress line ("), "{msg}");
            assert!(msg.contains("@@mm-progress"), "{msg}");
        }
        let err = ProgressEvent::parse(
            "@@mm-progress {\"event\":\"done\",\"iteration\":1,\"final_loss\":\"lots\",\"tokens_per_sec\":1}",
        )
        .unwrap()
        .unwrap_err();
        assert!(err.to_string().contains("\"nan\""), "{err}");
    }

    #[test]
    fn long_bad_lines_are_shortened() {
        let line = format!("@@mm-progress {}", "x".repeat(5000));
        let err = ProgressEvent::parse(&line).unwrap().unwrap_err();
        assert!(err.to_string().len() < 600, "{}", err.to_string().len());
    }

    #[test]
    fn integers_and_spelled_specials_are_accepted() {
        let line = "@@mm-progress {\"event\":\"step\",\"iteration\":3,\"train_iters\":10,\"loss\":2,\
                    \"lr\":\"-inf\",\"grad_norm\":null,\"tokens_per_sec\":\"Infinity\",\
                    \"samples_per_sec\":1,\"step_ms\":5,\"consumed_samples\":6}";
        let ProgressEvent::Step(p) = ProgressEvent::parse(line).unwrap().unwrap() else { panic!("not a step") };
        assert_eq!(p.loss, 2.0);
        assert_eq!(p.lr, f64::NEG_INFINITY);
        assert_eq!(p.tokens_per_sec, f64::INFINITY);
        assert_eq!(p.grad_norm, None);
        assert_eq!(p.mem_bytes, None);
    }

    fn any_f64() -> impl Strategy<Value = f64> {
        prop_oneof![any::<f64>(), Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY), Just(0.0), Just(-0.0),]
    }

    proptest! {
        #[test]
        fn any_step_round_trips(
            iteration in any::<u64>(),
            loss in any_f64(),
            lr in any_f64(),
            grad_norm in prop::option::of(any_f64()),
            tps in any_f64(),
            mem in prop::option::of(any::<u64>()),
        ) {
            let e = ProgressEvent::Step(Progress {
                iteration,
                train_iters: iteration.saturating_add(1),
                loss,
                lr,
                grad_norm,
                tokens_per_sec: tps,
                samples_per_sec: 1.0,
                step_ms: 2.5,
                mem_bytes: mem,
                consumed_samples: 7,
                data_ms: grad_norm,
                mfu: Some(lr),
                ..Default::default()
            });
            let back = ProgressEvent::parse(&e.to_line()).unwrap().unwrap();
            let (ProgressEvent::Step(a), ProgressEvent::Step(b)) = (&e, &back) else {
                return Err(TestCaseError::fail("not a step"));
            };
            let bits = |x: f64| if x.is_nan() { u64::MAX } else { x.to_bits() };
            prop_assert_eq!(bits(a.loss), bits(b.loss));
            prop_assert_eq!(bits(a.lr), bits(b.lr));
            prop_assert_eq!(a.grad_norm.map(bits), b.grad_norm.map(bits));
            prop_assert_eq!(bits(a.tokens_per_sec), bits(b.tokens_per_sec));
            prop_assert_eq!(a.iteration, b.iteration);
            prop_assert_eq!(a.mem_bytes, b.mem_bytes);
            prop_assert_eq!(a.data_ms.map(bits), b.data_ms.map(bits));
            prop_assert_eq!(a.mfu.map(bits), b.mfu.map(bits));
        }
    }
}
