//! Signals that arrive before the job's own handlers exist (while the plan is made, the hosts
//! are reached and the checks run) are held, not fatal: the launcher says so at once, finishes
//! what it is doing without starting anything, and exits with 128 + the signal. A second one
//! exits at once. [`crate::exec::job`] registers its handlers, then [`release`]s this one and
//! picks up a signal held in the last moment before.
//!
//! Pitfall: tokio's signal registration keeps the handler it finds and calls it first on every
//! signal, so `hold` stays in the chain for the whole job: once released it must do nothing.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use crate::exec::outcome::Sig;

static HELD: AtomicI32 = AtomicI32::new(0);
static RELEASED: AtomicBool = AtomicBool::new(false);

extern "C" fn hold(sig: libc::c_int) {
    if RELEASED.load(Ordering::SeqCst) {
        return;
    }
    // Only async-signal-safe calls here: atomics, write(2), _exit(2).
    let say = |msg: &[u8]| {
        // SAFETY: a valid buffer and its length.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
        }
    };
    if HELD.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst).is_err() {
        say(b"\nlaunch: second signal before the start: exiting now; nothing was started\n");
        // SAFETY: ends the process without running destructors, as a signal would.
        unsafe { libc::_exit(128 + sig) }
    }
    say(b"\nlaunch: signal received before any rank started: finishing the checks, then exiting without \
          starting (press Ctrl-C again to exit now)\n");
}

/// Holds INT, TERM, HUP and USR1 from now on (until the job installs its handlers).
pub fn hold_early() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1] {
        // SAFETY: installs a handler that only touches an atomic and async-signal-safe calls.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = hold as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// The signal held so far, if any (it stays held).
pub fn held() -> Option<Sig> {
    Sig::from_number(HELD.load(Ordering::SeqCst))
}

/// The job's handlers are registered: holding ends, and the signal held so far, if any, is
/// handed over (the job acts on it).
pub fn release() -> Option<Sig> {
    RELEASED.store(true, Ordering::SeqCst);
    Sig::from_number(HELD.swap(0, Ordering::SeqCst))
}
