//! What each engine can run, known where the layout is known: the launcher refuses a layout
//! at plan time (dry run included) with the same facts the engine checks its flags against,
//! instead of every rank failing at start-up on the hosts.

/// Why mm-engine cannot run a layout yet; the engine and the launcher both quote it.
pub const MM_ENGINE_DP_ONLY: &str =
    "mm-engine trains data parallel only (tensor, pipeline and context parallel size 1; \
     WORLD_SIZE ranks are all data parallel); use the MindSpeed-MM engine for model parallelism";

/// One parallel setting an engine cannot run, in the spellings of each tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    /// The recipe key (`parallel.pp`).
    pub key: &'static str,
    /// The engine's (Megatron's) flag (`--pipeline-model-parallel-size`).
    pub flag: &'static str,
    pub value: String,
}

/// The settings of a layout mm-engine cannot run (empty: it can).
pub fn mm_engine_unsupported(
    tp: usize,
    cp: usize,
    pp: usize,
    vpp: Option<usize>,
    sequence_parallel: bool,
) -> Vec<Unsupported> {
    let mut out = Vec::new();
    let mut size = |key, flag, v: usize| {
        if v != 1 {
            out.push(Unsupported { key, flag, value: v.to_string() });
        }
    };
    size("parallel.tp", "--tensor-model-parallel-size", tp);
    size("parallel.pp", "--pipeline-model-parallel-size", pp);
    size("parallel.cp", "--context-parallel-size", cp);
    size("parallel.vpp", "--virtual-pipeline-model-parallel-size", vpp.unwrap_or(1));
    if sequence_parallel {
        out.push(Unsupported { key: "parallel.sequence_parallel", flag: "--sequence-parallel", value: "true".into() });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_parallel_only() {
        assert!(mm_engine_unsupported(1, 1, 1, None, false).is_empty());
        assert!(mm_engine_unsupported(1, 1, 1, Some(1), false).is_empty());
        let u = mm_engine_unsupported(8, 1, 2, Some(2), true);
        let keys: Vec<_> = u.iter().map(|u| (u.key, u.value.as_str())).collect();
        assert_eq!(
            keys,
            [("parallel.tp", "8"), ("parallel.pp", "2"), ("parallel.vpp", "2"), ("parallel.sequence_parallel", "true")]
        );
    }
}
