//! What the benchmark programs share: memory readings of this process.

#![allow(dead_code)]

pub mod pg;

fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Peak resident set size since the last reset, in MiB (VmHWM).
pub fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

/// Resident set size now, in MiB (VmRSS).
pub fn rss_mib() -> f64 {
    status_mib("VmRSS:")
}

/// Of the resident set now, in MiB: anonymous memory (the heap, stacks) and
/// pages of files (the program's own code among them).
pub fn rss_anon_file_mib() -> (f64, f64) {
    (status_mib("RssAnon:"), status_mib("RssFile:"))
}

/// Resets VmHWM to the current RSS, so that each phase reports its own peak.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// CPU time this process has used so far (user and system, all threads),
/// in seconds: a phase's CPU seconds over its wall seconds is the cores it
/// kept busy.
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces, in parentheses):
    // state is field 3, utime field 14, stime field 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) if hz > 0.0 => (u + s) / hz,
        _ => f64::NAN,
    }
}

/// With `RUST_LOG` set, switchyard's log lines (with their times) go to
/// stderr, to see where a phase spends its time.
pub fn log_from_env() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// The whole machine's CPU counters (`/proc/stat`): busy and total ticks.
/// Between two readings, busy over total times the cores is the cores kept
/// busy by every process (the database servers too).
#[derive(Clone, Copy)]
pub struct MachineCpu {
    busy: f64,
    total: f64,
}

impl MachineCpu {
    pub fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<f64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal …
        let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
        let total: f64 = ticks.iter().take(8).sum();
        MachineCpu {
            busy: total - idle,
            total,
        }
    }

    /// Cores kept busy since `self` was read.
    pub fn cores_busy_since(&self) -> f64 {
        let now = MachineCpu::now();
        let cores = std::thread::available_parallelism()
            .map(|n| n.get() as f64)
            .unwrap_or(1.0);
        let total = now.total - self.total;
        if total <= 0.0 {
            return f64::NAN;
        }
        cores * (now.busy - self.busy) / total
    }
}
