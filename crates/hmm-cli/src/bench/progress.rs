//! Progress of a long run: an `indicatif` bar on standard error, drawn only when standard
//! error is a terminal (piped or redirected runs stay quiet) and never mixed into the
//! tables and JSON, which go to standard output.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting measured rows, with the current row's name as its message.
pub(crate) struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar of `total` steps headed `what`; hidden unless standard error is a terminal.
    pub(crate) fn new(what: &str, total: u64) -> Progress {
        // `ProgressBar::new` draws on standard error and hides itself when it is not a
        // terminal.
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {elapsed} {msg}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(what.to_owned());
        Progress { bar }
    }

    /// Says what is being measured now.
    pub(crate) fn doing(&self, what: impl Into<String>) {
        self.bar.set_message(what.into());
    }

    /// One step done.
    pub(crate) fn step(&self) {
        self.bar.inc(1);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
