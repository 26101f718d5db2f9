//! The standard `process_*` series (as Prometheus client libraries export them) and the
//! agent's build info, read from `/proc/self`. Parsing is plain functions over the files'
//! text; only [`read`] touches the file system.

use std::time::{Duration, SystemTime};

use crate::metrics::Exposition;

/// What `/proc/self` says about this process.
#[derive(Debug, Default, PartialEq)]
pub struct Process {
    /// On-CPU time of every thread, from their schedstat (nanosecond precision).
    pub cpu_ns: u64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub threads: u64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
}

/// Reads `/proc/self`; what cannot be read stays zero.
pub fn read() -> Process {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let cpu_ns = std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| schedstat_ns(&s))
        .sum();
    let open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);
    Process {
        cpu_ns,
        resident_bytes: status_kib(&status, "VmRSS:").unwrap_or(0) * 1024,
        virtual_bytes: status_kib(&status, "VmSize:").unwrap_or(0) * 1024,
        threads: status_kib(&status, "Threads:").unwrap_or(0),
        open_fds,
        max_fds: max_open_files(&limits),
    }
}

/// The first field of a task's `schedstat`: nanoseconds on a CPU.
fn schedstat_ns(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// A `Name:   value [kB]` line of `/proc/self/status`.
fn status_kib(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix(name))?.split_whitespace().next()?.parse().ok()
}

/// The soft limit on open files, from `/proc/self/limits`.
fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files").split_whitespace().next()?.parse().ok()
}

/// Renders the process series and `trellis_build_info`; `started` is the wall-clock start.
pub fn render(e: &mut Exposition, p: &Process, started: SystemTime, version: &str) {
    let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs_f64();
    let cpu = "Total user and system CPU time spent in seconds.";
    e.counter_f64("process_cpu_seconds_total", cpu, p.cpu_ns as f64 / 1e9);
    e.gauge("process_resident_memory_bytes", "Resident memory size in bytes.", p.resident_bytes as f64);
    e.gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.", p.virtual_bytes as f64);
    e.gauge("process_open_fds", "Number of open file descriptors.", p.open_fds as f64);
    if let Some(max) = p.max_fds {
        e.gauge("process_max_fds", "Maximum number of open file descriptors.", max as f64);
    }
    e.gauge("process_threads", "Number of OS threads in the process.", p.threads as f64);
    let start = "Start time of the process since unix epoch in seconds.";
    e.gauge("process_start_time_seconds", start, secs(started));
    let info = "The agent's version, as a label; always 1.";
    e.series("gauge", "trellis_build_info", info, &[(vec![("version", version.to_string())], 1.0)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_read_as_the_kernel_writes_them() {
        let status = "Name:\ttrellis\nVmSize:\t  123456 kB\nVmRSS:\t   11876 kB\nThreads:\t4\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(11876));
        assert_eq!(status_kib(status, "VmSize:"), Some(123456));
        assert_eq!(status_kib(status, "Threads:"), Some(4));
        assert_eq!(status_kib(status, "VmSwap:"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            65536                524288               files\n";
        assert_eq!(max_open_files(limits), Some(65536));
        assert_eq!(schedstat_ns("2383760522 118309 1432\n"), Some(2_383_760_522));
    }

    #[test]
    fn the_series_carry_prometheus_names() {
        let mut e = Exposition::default();
        let p = Process { cpu_ns: 1_500_000_000, resident_bytes: 4096, max_fds: Some(1024), ..Default::default() };
        render(&mut e, &p, SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000), "0.1.0");
        let text = e.finish();
        assert!(text.contains("\nprocess_cpu_seconds_total 1.5\n"), "{text}");
        assert!(text.contains("\nprocess_resident_memory_bytes 4096\n"));
        assert!(text.contains("\nprocess_start_time_seconds 1700000000\n"));
        assert!(text.contains("\ntrellis_build_info{version=\"0.1.0\"} 1\n"));
    }

    #[test]
    fn this_process_reads_back() {
        let p = read();
        assert!(p.resident_bytes > 0 && p.open_fds > 0 && p.threads >= 1 && p.cpu_ns > 0, "{p:?}");
    }
}
