//! [`LayoutError`]: every way a layout can be wrong, one variant per rule, each carrying the
//! numbers involved so the message can say what was found, what was expected and what to do.

/// A problem with parallel sizes, node placement, pipeline split, tensor partition or the
/// model-vs-layout rules. `validate_model_layout` returns all of them at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("{name} is 0 but must be at least 1")]
    Zero { name: String },

    #[error(
        "world size {world} is not divisible by tp×cp×pp = {tp}×{cp}×{pp} = {product}: choose tp, \
         cp and pp whose product divides {world}, or use a world size that is a multiple of {product}"
    )]
    WorldNotDivisible { world: usize, tp: usize, cp: usize, pp: usize, product: usize },

    #[error(
        "dp {dp} does not match world/(tp×cp×pp) = {world}/({tp}×{cp}×{pp}) = {expected}: omit \
         dp (it is derived from the other sizes) or set it to {expected}"
    )]
    DpMismatch { dp: usize, expected: usize, world: usize, tp: usize, cp: usize, pp: usize },

    #[error(
        "vpp is {vpp} but the interleaved schedule needs at least 2 virtual stages per pipeline \
         rank: omit vpp, or set it to 2 or more"
    )]
    VppTooSmall { vpp: usize },

    #[error("vpp {vpp} needs pipeline parallelism but pp is {pp}: set pp to 2 or more, or omit vpp")]
    VppNeedsPp { vpp: usize, pp: usize },

    #[error("rank {rank} is out of range for world size {world}: ranks run from 0 to {last}", last = .world.saturating_sub(1))]
    RankOutOfRange { rank: usize, world: usize },

    #[error(
        "{axis} coordinate {value} is out of range: the {axis} size is {size}, so it must be \
         below {size}"
    )]
    CoordOutOfRange { axis: String, value: usize, size: usize },

    #[error("node {node} has 0 device slots: remove it from the node list or give it devices")]
    EmptyNode { node: usize },

    #[error(
        "the nodes provide {sum} device slots ({slots}) but the layout has world size {world}: \
         make the slots sum to {world}, or change the world size to {sum}",
        slots = join(.slots, ", ")
    )]
    SlotsMismatch { sum: usize, world: usize, slots: Vec<usize> },

    #[error(
        "tensor-parallel group [{group}] spans nodes {nodes}{more}: tp exchanges activations in \
         every layer and needs the intra-node link, so each tp group must sit on one node; \
         choose a tp that divides the device count of every node (tp in {{{suggestions}}})",
        group = join(.group, ", "),
        nodes = join(.nodes, " and "),
        suggestions = join(.suggestions, ", "),
        more = more_groups(*.others)
    )]
    TpGroupSpansNodes {
        group: Vec<usize>,
        nodes: Vec<usize>,
        /// Divisors of the greatest common divisor of the nodes' slot counts.
        suggestions: Vec<usize>,
        /// How many further tp groups span nodes.
        others: usize,
    },

    #[error(
        "{list} has {found} entries but pp×vpp = {pp}×{vpp} = {expected} pipeline stages need \
         one entry each, in model order: e.g. {suggestion}"
    )]
    LayerListLength { list: String, found: usize, expected: usize, pp: usize, vpp: usize, suggestion: String },

    #[error(
        "{list} sums to {sum} but {model} has {total} layers: make the list sum to {total}, \
         e.g. {suggestion}"
    )]
    LayerListSum { list: String, model: String, sum: usize, total: usize, suggestion: String },

    #[error(
        "{model} has {total} layers, which do not split evenly over pp×vpp = {stages} pipeline \
         stages: give {list} explicitly, e.g. {suggestion}"
    )]
    UnevenLayers { list: String, model: String, total: usize, stages: usize, suggestion: String },

    #[error(
        "{n} {what} are not divisible by tp {tp}: enable unaligned_linear, or choose a tp that \
         divides {n} (tp in {{{divisors}}})",
        divisors = join(.divisors, ", ")
    )]
    NotDivisibleByTp { what: String, n: usize, tp: usize, divisors: Vec<usize> },

    #[error(
        "{n} {what} cannot be split over tp {tp}: some tensor-parallel ranks would get none; \
         choose a tp of at most {n}"
    )]
    TooFewForTp { what: String, n: usize, tp: usize },

    #[error(
        "{heads} attention heads do not form whole groups over {kv_heads} key/value heads: \
         num_attention_heads must be a multiple of num_key_value_heads"
    )]
    HeadsNotGrouped { heads: usize, kv_heads: usize },

    #[error(
        "sequence_parallel needs tensor parallelism but tp is {tp}: disable sequence_parallel, \
         or set tp to 2 or more"
    )]
    SequenceParallelNeedsTp { tp: usize },

    #[error(
        "seq_length {seq_length} is not divisible by 2×cp = {multiple}: context parallelism cuts \
         every sequence into 2×cp chunks to balance causal attention; use a multiple of \
         {multiple}, e.g. {suggestion}"
    )]
    SeqNotDivisibleByCp { seq_length: usize, cp: usize, multiple: usize, suggestion: usize },

    #[error(
        "seq_length {seq_length} is not divisible by tp {tp}: sequence_parallel splits the \
         sequence over the tp ranks; use a multiple of {tp}, e.g. {suggestion}, or disable \
         sequence_parallel"
    )]
    SeqNotDivisibleByTp { seq_length: usize, tp: usize, suggestion: usize },

    #[error(
        "global_batch_size {gbs} does not equal micro_batch_size × grad_accumulation × dp = \
         {mbs}×{gas}×{dp} = {product}: set global_batch_size to {product}{hint}",
        hint = gas_hint(*.gbs, *.mbs, *.dp)
    )]
    BatchMismatch { gbs: usize, mbs: usize, gas: usize, dp: usize, product: usize },

    #[error(
        "global_batch_size {gbs} is not a multiple of micro_batch_size × dp = {mbs}×{dp} = {unit}, \
         so no whole number of accumulation steps fits: use a multiple of {unit}, e.g. {suggestion}"
    )]
    GbsNotMultiple { gbs: usize, mbs: usize, dp: usize, unit: usize, suggestion: usize },
}

/// "6,8,8,6"-style list, the spelling the CLI flags take.
pub(crate) fn join(xs: &[usize], sep: &str) -> String {
    xs.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(sep)
}

fn more_groups(others: usize) -> String {
    match others {
        0 => String::new(),
        1 => " (and 1 more tp group does too)".to_string(),
        n => format!(" (and {n} more tp groups do too)"),
    }
}

fn gas_hint(gbs: usize, mbs: usize, dp: usize) -> String {
    let unit = mbs.saturating_mul(dp);
    if unit > 0 && gbs % unit == 0 {
        format!(", or grad_accumulation to {gbs}/({mbs}×{dp}) = {}", gbs / unit)
    } else {
        String::new()
    }
}
