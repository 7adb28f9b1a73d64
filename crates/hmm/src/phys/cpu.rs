//! The CPU the calling thread runs on, for per-CPU structures ([`super::pcp`]).

/// The number of the CPU this thread is running on now (it may have moved by the time the
/// caller uses it), or 0 where the host cannot tell.
#[doc(alias = "smp_processor_id")]
pub(crate) fn current() -> usize {
    // SAFETY: sched_getcpu takes no arguments, touches no memory of ours and only reports
    // the running CPU's number (or -1 with errno set).
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cpu_is_one_the_host_has() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Affinity can hide CPUs from available_parallelism, not add them: compare with
        // the configured count.
        let configured = std::fs::read_to_string("/sys/devices/system/cpu/possible")
            .ok()
            .and_then(|s| s.trim().rsplit(['-', ',']).next()?.parse::<usize>().ok())
            .map_or(cpus, |last| last + 1);
        assert!(super::current() < configured.max(cpus));
    }
}
