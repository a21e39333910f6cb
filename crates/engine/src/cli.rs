//! What the three tools (`launch`, `mm-convert`, `mm-engine`) share on the command line: the
//! exit codes, the typed usage error `main` maps to exit code 2, and the spelling of a flag in
//! advice when the launcher started this process (its `--set KEY=VALUE` recipe keys).

/// 0: done.
pub const EXIT_OK: u8 = 0;
/// 1: a runtime error (I/O, data, a collective, a failed check).
pub const EXIT_RUNTIME: u8 = 1;
/// 2: a usage or configuration error (bad flags, refused combinations, an occupied --out).
pub const EXIT_USAGE: u8 = 2;
/// 3: the parallel layout does not fit the model or the world (as `launch` and `mm-convert`).
pub const EXIT_LAYOUT: u8 = 3;

/// The exit codes, as `mm-engine --help` lists them (the same for `launch` and `mm-convert`).
pub const EXIT_CODES_HELP: &str = "\
Exit codes (shared with launch and mm-convert):
  0        done
  1        runtime error (I/O, data, collectives, a failed check)
  2        usage or configuration error (bad flags or flag combinations, an occupied --out)
  3        the parallel layout does not fit the model or WORLD_SIZE
           (--tensor-model-parallel-size, --pipeline-model-parallel-size,
           --llm-pp-layers, --vit-pp-layers; collective-check's --tp, --pp, --cp)
  128+N    agreed stop on signal N: `train` saved the iteration it stopped after
           (143 SIGTERM, 130 SIGINT, 138 SIGUSR1)";

/// A usage or configuration error found after parsing (flag checks, refused combinations):
/// `main` exits with [`EXIT_USAGE`], as clap does for bad syntax.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A parallel layout that does not fit the model or the world (pipeline split, tensor-parallel
/// size against the heads, WORLD_SIZE against tp·cp·pp): `main` exits with [`EXIT_LAYOUT`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LayoutError(pub String);

/// `Err(UsageError(msg))` as an `anyhow::Error`.
pub fn usage<T>(msg: impl Into<String>) -> anyhow::Result<T> {
    Err(UsageError(msg.into()).into())
}

/// Whether the launcher started this process (it sets LAUNCH_RUN_ID in every unit).
pub fn launched() -> bool {
    std::env::var_os("LAUNCH_RUN_ID").is_some_and(|v| !v.is_empty())
}

/// Advice naming a setting: `engine` (mm-engine's flag, e.g. `--train-iters N`) when run by
/// hand, `launcher` (the launcher's spelling, e.g. `--set train.train_iters=N`) when the
/// launcher started this process, since the launcher renders the engine flags from its recipe.
pub fn spelled(engine: &str, launcher: &str) -> String {
    if launched() {
        launcher.to_string()
    } else {
        engine.to_string()
    }
}

/// The exit code of a failed command: 2 for a [`UsageError`], 3 for a [`LayoutError`] anywhere
/// in the chain, else 1 (an agreed stop is handled by `main` before).
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<UsageError>().is_some() {
        EXIT_USAGE
    } else if e.downcast_ref::<LayoutError>().is_some() {
        EXIT_LAYOUT
    } else {
        EXIT_RUNTIME
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn usage_errors_exit_2_through_context() {
        let e = usage::<()>("--x 0: bad").context("rank 3").unwrap_err();
        assert_eq!(exit_code(&e), EXIT_USAGE);
        assert_eq!(format!("{e:#}"), "rank 3: --x 0: bad");
        assert_eq!(exit_code(&anyhow::anyhow!("io")), EXIT_RUNTIME);
        let e = anyhow::Error::from(LayoutError("--llm-pp-layers 1,1: sums to 2".into())).context("rank 0");
        assert_eq!(exit_code(&e), EXIT_LAYOUT);
    }
}
