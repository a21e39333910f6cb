//! What each engine can run, known where the layout is known: the launcher refuses a layout
//! at plan time (dry run included) with the same facts the engine checks its flags against,
//! instead of every rank failing at start-up on the hosts.

/// Why mm-engine cannot run a layout yet; the engine and the launcher both quote it.
pub const MM_ENGINE_LIMITS: &str =
    "mm-engine runs data, tensor (with sequence parallelism), context (megatron_cp_algo only: Ulysses and \
     hybrid are not built) and pipeline parallelism (1F1B, interleaved with a virtual pipeline) with the ViT \
     on the first pipeline chunk; use the MindSpeed-MM engine for other layouts";

/// The context-parallel algorithm mm-engine runs (Megatron's load-balanced sequence split).
pub const MM_ENGINE_CP_ALGO: &str = "megatron_cp_algo";

/// One parallel setting an engine cannot run, in the spellings of each tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    /// The recipe key (`parallel.tp`).
    pub key: &'static str,
    /// The engine's (Megatron's) flag (`--tensor-model-parallel-size`).
    pub flag: &'static str,
    pub value: String,
}

/// The settings of a layout mm-engine cannot run (empty: it can). `cp_algo`: the
/// context-parallel algorithm (None: the default, megatron_cp_algo; only read with cp above 1).
/// `vit_chunks`: ViT layers per pipeline chunk in model order (empty: all on the first).
pub fn mm_engine_unsupported(cp: usize, cp_algo: Option<&str>, vit_chunks: &[usize]) -> Vec<Unsupported> {
    let mut out = Vec::new();
    if let Some(algo) = cp_algo.filter(|a| cp > 1 && *a != MM_ENGINE_CP_ALGO) {
        out.push(Unsupported {
            key: "parallel.context_parallel_algo",
            flag: "--context-parallel-algo",
            value: algo.to_string(),
        });
    }
    if vit_chunks.iter().skip(1).any(|&n| n > 0) {
        let list = vit_chunks.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",");
        out.push(Unsupported { key: "parallel.vit_pp_layers", flag: "--vit-pp-layers", value: list });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_tensor_context_and_pipeline_parallel_with_the_vit_first() {
        assert!(mm_engine_unsupported(1, None, &[]).is_empty());
        assert!(mm_engine_unsupported(1, None, &[24, 0, 0, 0]).is_empty());
        assert!(mm_engine_unsupported(2, Some("megatron_cp_algo"), &[]).is_empty());
        assert!(mm_engine_unsupported(4, None, &[]).is_empty());
        assert!(mm_engine_unsupported(1, Some("ulysses_cp_algo"), &[]).is_empty(), "no context parallelism to run");
        let u = mm_engine_unsupported(2, Some("ulysses_cp_algo"), &[20, 4]);
        let keys: Vec<_> = u.iter().map(|u| (u.key, u.value.as_str())).collect();
        assert_eq!(keys, [("parallel.context_parallel_algo", "ulysses_cp_algo"), ("parallel.vit_pp_layers", "20,4")]);
    }
}
