//! Writing to standard output and standard error without panicking.
//!
//! `println!` panics when the write fails, which it does as soon as the reader of a pipe
//! goes away (`hmm demo | head -1`: `EPIPE`). Every line of the command goes through
//! [`outln!`](crate::outln) instead: a closed pipe ends the process quietly with status 0
//! (the reader has all it wanted, as ripgrep does), any other write error ends it with a
//! one-line message and status 1. Diagnostics go through [`errln!`](crate::errln), which
//! drops what cannot be written: there is nowhere left to report it.

use std::fmt;
use std::io::{self, Write};

/// Writes `args` and a newline to standard output; see the module documentation for what
/// a failed write does.
pub(crate) fn line(args: fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        drop(out);
        failed(&e);
    }
}

/// Writes `buf` to standard output as it is; see the module documentation for what a
/// failed write does.
pub(crate) fn bytes(buf: &[u8]) {
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_all(buf).and_then(|()| out.flush()) {
        drop(out);
        failed(&e);
    }
}

/// Writes `args` and a newline to standard error, dropping it if that fails.
pub(crate) fn diagnostic(args: fmt::Arguments<'_>) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}

/// Ends the process after standard output failed with `e`.
fn failed(e: &io::Error) -> ! {
    if e.kind() == io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    diagnostic(format_args!("hmm: cannot write to standard output: {e}"));
    std::process::exit(1);
}
