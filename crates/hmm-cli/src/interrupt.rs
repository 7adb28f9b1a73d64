//! Ctrl-C during a long run: `hmm stress` and `hmm bench` catch the first SIGINT and stop
//! at the next point where they can report (the stress at once, its threads finishing the
//! operation in hand; a benchmark after the round in hand, with the rows it has), then
//! print that partial report and exit with status 130 (128 + SIGINT, as a shell reports
//! a command a SIGINT ended). The handler is installed with `SA_RESETHAND`, so a second
//! Ctrl-C ends the process at once, as if no handler were there.

use std::sync::atomic::{AtomicBool, Ordering};

/// The exit status of a run that a SIGINT cut short.
pub(crate) const EXIT_STATUS: u8 = 130;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The SIGINT handler: only an atomic store, which is async-signal-safe.
extern "C" fn on_sigint(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches the next SIGINT (see the module documentation). If the handler cannot be
/// installed, Ctrl-C keeps ending the process at once, as before.
pub(crate) fn catch() {
    // SAFETY: `sigaction` is a plain C struct for which all-zero bytes are a valid value
    // (no handler, an empty mask, no flags).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t;
    action.sa_flags = libc::SA_RESTART | libc::SA_RESETHAND;
    // SAFETY: `action` is initialised and outlives the call; a null old-action pointer is
    // allowed; the handler only stores to an atomic, which is async-signal-safe.
    let _ = unsafe { libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut()) };
}

/// Whether a SIGINT has come since [`catch`].
pub(crate) fn requested() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}
