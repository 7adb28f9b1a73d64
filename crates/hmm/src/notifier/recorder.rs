//! [`Recorder`]: a full-mm notifier that keeps every range it is told about, for tests,
//! the demo and tracing.

use crate::sync::Mutex;

use super::{MmId, MmuNotifier, NotifierError, NotifierRange};

/// Records every `invalidate_range_start` it receives, and `release` calls.
#[derive(Debug, Default)]
pub struct Recorder {
    ranges: Mutex<Vec<NotifierRange>>,
    releases: Mutex<Vec<MmId>>,
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the ranges recorded so far.
    pub fn take(&self) -> Vec<NotifierRange> {
        std::mem::take(&mut *self.ranges.lock())
    }

    /// A copy of the ranges recorded so far.
    pub fn ranges(&self) -> Vec<NotifierRange> {
        self.ranges.lock().clone()
    }

    /// The address spaces that called `release`.
    pub fn releases(&self) -> Vec<MmId> {
        self.releases.lock().clone()
    }
}

impl MmuNotifier for Recorder {
    fn invalidate_range_start(&self, range: &NotifierRange) -> Result<(), NotifierError> {
        self.ranges.lock().push(*range);
        Ok(())
    }

    fn release(&self, mm: MmId) {
        self.releases.lock().push(mm);
    }
}
