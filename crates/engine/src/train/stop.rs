//! Preemption that saves: SIGTERM, SIGINT and SIGUSR1 ask the run to stop. The handler only
//! stores the signal number; at the end of every iteration all ranks agree (one all-reduce, MAX
//! of the signal numbers, over the world group) and, when any rank took one, every rank stops
//! after that same iteration, saves like a periodic save and leaves with [`Stopped`]: exit
//! code 128 + the agreed signal (143 SIGTERM, 130 SIGINT, 138 SIGUSR1), since the run did not
//! reach --train-iters. Further SIGTERM and SIGUSR1 change nothing (the stop is under way;
//! supervisors repeat them: a Slurm step signals every task while the launcher's agent signals
//! the unit too); a second SIGINT restores the default action and re-raises it, so a second
//! Ctrl-C at a terminal kills at once. SIGKILL remains the way to force an end.
//!
//! Edges: the handlers are installed when the training loop starts; before (rendezvous,
//! loading) a signal keeps its default action and ends the rank at once, as there is nothing
//! new to save. A stop whose agreement falls on the last iteration (--train-iters), or a signal
//! after it (final save, summary), lets the run finish normally with exit code 0; a stop skips
//! that iteration's evaluation. A rank stuck in a collective never reaches the agreement:
//! SIGKILL (the launcher's grace period) ends it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::libc;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// The first stop signal this process received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

const SIGNALS: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGUSR1];

/// Async-signal-safe: an atomic, or for a second SIGINT sigaction + raise.
extern "C" fn on_signal(sig: libc::c_int) {
    let first = RECEIVED.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst).is_ok();
    if first || sig != libc::SIGINT {
        return;
    }
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: restoring the default action; sigaction and raise are async-signal-safe.
    unsafe {
        let _ = signal::sigaction(Signal::SIGINT, &default);
    }
    let _ = signal::raise(Signal::SIGINT);
}

/// Installs the stop handlers (SA_RESTART, so system calls the signal interrupts in other
/// threads resume). Signals that arrive before keep their default action.
pub fn install() -> anyhow::Result<()> {
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for s in SIGNALS {
        // SAFETY: the handler only touches an atomic, or restores the default and re-raises.
        unsafe { signal::sigaction(s, &action) }
            .map_err(|e| anyhow::anyhow!("cannot install the {} handler: {e}", s.as_str()))?;
    }
    Ok(())
}

/// The stop signal this rank received, if any.
pub fn requested() -> Option<i32> {
    Some(RECEIVED.load(Ordering::SeqCst)).filter(|s| *s != 0)
}

/// "SIGTERM" for 15; "signal N" for a number without a name.
pub fn signal_name(sig: i32) -> String {
    Signal::try_from(sig).map(|s| s.as_str().to_string()).unwrap_or_else(|_| format!("signal {sig}"))
}

/// Every rank stopped after `iteration` on an agreed signal; `main` turns it into exit code
/// 128 + `signal`.
#[derive(Debug, thiserror::Error)]
#[error(
    "stopped at iteration {iteration} of {train_iters} on {} (every rank agreed){}",
    signal_name(*signal),
    match checkpoint {
        Some(p) => format!(
            "; saved {}: resume with {}",
            p.display(),
            crate::cli::spelled(
                "--auto-resume (or --load it)",
                "checkpoint.auto_resume true, the recipes' default (or --set checkpoint.load=<it>)"
            )
        ),
        None => "; nothing was saved".to_string(),
    }
)]
pub struct Stopped {
    pub signal: i32,
    pub iteration: u64,
    pub train_iters: u64,
    pub checkpoint: Option<PathBuf>,
}

impl Stopped {
    /// 128 + the signal number, as a shell reports a process the signal killed.
    pub fn exit_code(&self) -> u8 {
        (128 + self.signal).clamp(0, 255) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_exit_codes() {
        assert_eq!(signal_name(15), "SIGTERM");
        assert_eq!(signal_name(2), "SIGINT");
        assert_eq!(signal_name(10), "SIGUSR1");
        let s = |signal| Stopped { signal, iteration: 3, train_iters: 6, checkpoint: None };
        assert_eq!([s(15).exit_code(), s(2).exit_code(), s(10).exit_code()], [143, 130, 138]);
        assert_eq!(s(15).to_string(), "stopped at iteration 3 of 6 on SIGTERM (every rank agreed); nothing was saved");
    }
}
