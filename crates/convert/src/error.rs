//! [`ConvertError`] and [`Problem`]: what can go wrong reading, checking and writing checkpoints.
//!
//! Checks that can find many things wrong at once (keys, shapes, dtypes, shard files) collect
//! [`Problem`]s and fail with one [`ConvertError::Invalid`], so a user fixes a checkpoint in one
//! round. Every message names the file, the tensor key, what was found, what was expected and
//! how to fix it.

use std::fmt;
use std::path::{Path, PathBuf};

use mm_spec::CheckpointError;

/// How many problems a message lists before it summarizes the rest.
const MAX_LISTED: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },

    /// A write mm-spec's shared writers refused (file, action, cause).
    #[error(transparent)]
    File(#[from] mm_spec::io::FileError),

    /// A torch.save file torchfile could not write or read (it names the file).
    #[error(transparent)]
    Torch(#[from] torchfile::Error),

    /// A config.json mm-spec refused (it names the file and the key).
    #[error(transparent)]
    HfConfig(#[from] mm_spec::hf::ConfigError),

    #[error("{what} is not usable ({} problem{}):\n{}", problems.len(), plural(problems.len()), list(problems))]
    Invalid { what: String, problems: Vec<Problem> },

    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),

    #[error(
        "{} already exists: pass --force to replace it (the old folder is removed only once the new \
         one is complete), or choose another output folder",
        path.display()
    )]
    OutputExists { path: PathBuf },

    #[error("{0}")]
    Usage(String),

    /// The model does not fit the requested layout (the file it came from, and why).
    #[error("{}: the model it describes does not fit the requested layout: {message}", path.display())]
    LayoutMismatch { path: PathBuf, message: String },

    #[error("conversion stopped: {0}")]
    Cancelled(String),
}

impl ConvertError {
    /// The exit code, from the table all three tools share: 2 a usage or configuration error
    /// (bad flags, an existing output without --force), 3 a layout mismatch, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            ConvertError::Usage(_) | ConvertError::OutputExists { .. } => 2,
            ConvertError::LayoutMismatch { .. } => 3,
            _ => 1,
        }
    }
}

impl From<mm_spec::checkpoint::MindSpeedError> for ConvertError {
    fn from(e: mm_spec::checkpoint::MindSpeedError) -> Self {
        use mm_spec::checkpoint::MindSpeedError as E;
        match e {
            E::Bad { path, message } => ConvertError::Config { path, message },
            E::Torch(e) => ConvertError::Torch(e),
            E::Checkpoint(e) => ConvertError::Checkpoint(e),
        }
    }
}

impl ConvertError {
    /// An I/O failure: the file, what was being done and why (mm-spec's one wording).
    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        ConvertError::File(mm_spec::io::FileError::io(action, path, source))
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn list(problems: &[Problem]) -> String {
    let mut out: Vec<String> = problems.iter().take(MAX_LISTED).map(|p| format!("  - {p}")).collect();
    if problems.len() > MAX_LISTED {
        out.push(format!("  … and {} more of the same kinds", problems.len() - MAX_LISTED));
    }
    out.join("\n")
}

/// One thing wrong with a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The index names a shard file that is not there.
    MissingShard { index: PathBuf, file: String, keys: usize, example: String },
    /// A safetensors file that cannot be parsed.
    Corrupt { file: PathBuf, reason: String },
    /// The index and a shard file disagree about where a tensor is.
    IndexMismatch { index: PathBuf, key: String, detail: String },
    /// A tensor no InternVL3 key maps to.
    UnknownKey { file: PathBuf, key: String, layout: String },
    /// A tensor the architecture needs but the checkpoint lacks.
    MissingKey { key: String, layout: String },
    /// A tensor whose shape disagrees with config.json.
    Shape { file: PathBuf, key: String, found: Vec<usize>, expected: Vec<usize>, source: String },
    /// A dtype the engine cannot train.
    Dtype { file: PathBuf, key: String, found: String },
    /// The parts of one logical tensor (the -hf q/k/v of the fused ViT qkv) have different dtypes.
    MixedDtypes { key: String, found: Vec<String> },
    /// A shard file of an MM checkpoint disagrees with its manifest.
    Manifest { file: PathBuf, key: String, detail: String },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::MissingShard { index, file, keys, example } => write!(
                f,
                "{} lists shard {file:?} for {keys} tensor{} (e.g. {example:?}) but the file does not exist: \
                 download or copy the missing shard next to the index",
                index.display(),
                plural(*keys)
            ),
            Problem::Corrupt { file, reason } => write!(
                f,
                "{}: not a readable safetensors file: {reason}; the file is truncated or damaged, download or \
                 copy it again",
                file.display()
            ),
            Problem::IndexMismatch { index, key, detail } => {
                write!(f, "{}: tensor {key:?}: {detail}; regenerate the index or fix the shard", index.display())
            }
            Problem::UnknownKey { file, key, layout } => write!(
                f,
                "{}: tensor {key:?} is not part of an InternVL3 checkpoint in the {layout} layout: remove it, or \
                 check that config.json describes this checkpoint",
                file.display()
            ),
            Problem::MissingKey { key, layout } => write!(
                f,
                "tensor {key:?} is missing: the {layout} layout of the model described by config.json needs it; \
                 the checkpoint is incomplete or config.json belongs to another model"
            ),
            Problem::Shape { file, key, found, expected, source } => write!(
                f,
                "{}: tensor {key:?} has shape {found:?} but {source} implies {expected:?}: config.json and the \
                 weights describe different models; use the config.json that came with these weights",
                file.display()
            ),
            Problem::Dtype { file, key, found } => write!(
                f,
                "{}: tensor {key:?} is {found}, which the engine cannot train (it needs BF16, F16 or F32): \
                 dequantize the checkpoint first (quantized and boolean weights are not supported)",
                file.display()
            ),
            Problem::MixedDtypes { key, found } => write!(
                f,
                "the parts of {key:?} have different dtypes {found:?}: pass --dtype bf16|fp16|fp32 to convert \
                 them to one"
            ),
            Problem::Manifest { file, key, detail } => {
                write!(
                    f,
                    "{}: tensor {key:?}: {detail}; the checkpoint was damaged or edited after it was written",
                    file.display()
                )
            }
        }
    }
}
