//! A small logger for the `log` facade: one line per record in Firecracker's format,
//! `<UTC time, ns> [<instance id>:<thread>(:<level>)(:<file>:<line>)] <message>`; on stderr,
//! or on the file or named pipe given by `--log-path` or `PUT /logger`, with Firecracker's
//! options (level, show_level, show_log_origin, module).

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Where and how lines are written.
#[derive(Debug)]
struct Output {
    file: Option<File>,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
    /// The instance id (`--id`), in every line as Firecracker writes it.
    instance: String,
}

static OUTPUT: Mutex<Output> = Mutex::new(Output {
    file: None,
    show_level: true,
    show_origin: false,
    module: None,
    instance: String::new(),
});

/// Sets the instance id every line carries (`--id`; Firecracker's default is
/// `anonymous-instance`).
pub fn set_instance_id(id: &str) {
    OUTPUT
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .instance = id.to_owned();
}

/// `time` as Firecracker's log lines show it: UTC, `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn`.
fn timestamp(time: std::time::SystemTime) -> String {
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm, proleptic Gregorian).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_nanos()
    )
}

struct StderrLogger;

/// The level a record is shown at. virtio-queue logs what a driver did wrong (bad ring
/// addresses, bad indexes) as errors; a guest controls those, so they count as debug lines.
fn effective_level(metadata: &Metadata) -> Level {
    if metadata.target().starts_with("virtio_queue") {
        Level::Debug
    } else {
        metadata.level()
    }
}

/// Lines per second that one call site of [`guest_log!`](crate::guest_log) may write.
pub const GUEST_LINES_PER_SEC: u64 = 10;

/// A per-call-site budget for log lines a guest can cause: at most [`GUEST_LINES_PER_SEC`]
/// lines in each second; the next line shown after a quiet spell says how many were left out.
#[derive(Debug)]
pub struct RateLimit {
    /// The second (since process start) the count is for.
    second: AtomicU64,
    /// Lines asked for in that second.
    count: AtomicU64,
    /// Lines left out since the last one shown.
    dropped: AtomicU64,
}

impl RateLimit {
    /// A fresh budget.
    pub const fn new() -> Self {
        Self {
            second: AtomicU64::new(0),
            count: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// `Some(lines left out before this one)` when a line may be written now, `None` when it
    /// must be left out. Lock-free: racing threads may let a line or two more through.
    pub fn admit(&self) -> Option<u64> {
        let now = crate::process_start().elapsed().as_secs();
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < GUEST_LINES_PER_SEC {
            Some(self.dropped.swap(0, Ordering::Relaxed))
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// Logs a line that a guest (or any other untrusted party) can cause as often as it likes,
/// rate-limited per call site at every level: `guest_log!(log::Level::Debug, "...", args)`.
#[macro_export]
macro_rules! guest_log {
    ($level:expr, $($arg:tt)+) => {{
        let level: log::Level = $level;
        if log::log_enabled!(level) {
            static LIMIT: $crate::logger::RateLimit = $crate::logger::RateLimit::new();
            match LIMIT.admit() {
                Some(0) => log::log!(level, $($arg)+),
                Some(left_out) => log::log!(
                    level,
                    "{} ({left_out} more such lines left out)",
                    format_args!($($arg)+)
                ),
                None => {}
            }
        }
    }};
}

/// virtio-queue's own lines about what a driver did wrong, which a guest causes at will.
static VIRTIO_QUEUE_LINES: RateLimit = RateLimit::new();

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        effective_level(metadata) <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if record.target().starts_with("virtio_queue") && VIRTIO_QUEUE_LINES.admit().is_none() {
            return;
        }
        let mut out = OUTPUT.lock().unwrap_or_else(PoisonError::into_inner);
        if out
            .module
            .as_deref()
            .is_some_and(|m| !record.target().starts_with(m))
        {
            return;
        }
        let thread = std::thread::current();
        let instance = if out.instance.is_empty() {
            "anonymous-instance"
        } else {
            &out.instance
        };
        let mut line = format!(
            "{} [{instance}:{}",
            timestamp(std::time::SystemTime::now()),
            thread.name().unwrap_or("?")
        );
        if out.show_level {
            line.push_str(&format!(":{}", record.level()));
        }
        if out.show_origin {
            line.push_str(&format!(
                ":{}:{}",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        line.push_str(&format!("] {}\n", record.args()));
        // One write per line so lines from several threads do not interleave.
        match out.file.as_mut() {
            Some(f) => {
                let _ = f.write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger at `level`. Calling it twice only changes the level.
pub fn init(level: LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Parses a level as Firecracker (Error, Warning, Info, Debug, Trace, Off) or `log` spells it,
/// in any case.
pub fn parse_level(text: &str) -> Option<LevelFilter> {
    match text.to_ascii_lowercase().as_str() {
        "warning" => Some(LevelFilter::Warn),
        other => other.parse().ok(),
    }
}

/// Logger settings from `--log-path`/`--level` or `PUT /logger`.
#[derive(Debug, Default)]
pub struct LoggerSettings {
    /// Write here instead of stderr (a file, appended to, or a named pipe).
    pub path: Option<std::path::PathBuf>,
    /// Level filter.
    pub level: Option<LevelFilter>,
    /// Show each line's level (default on).
    pub show_level: Option<bool>,
    /// Show each line's source file and line (default off).
    pub show_origin: Option<bool>,
    /// Only lines from this module path.
    pub module: Option<String>,
}

/// Applies `settings`: opens the log file (created if absent, appended to; a named pipe must
/// have a reader) before changing anything, so a failure leaves the logger as it was.
pub fn configure(settings: &LoggerSettings) -> std::io::Result<()> {
    let file = match &settings.path {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            Some(
                std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                    .open(path)
                    .map_err(|e| {
                        std::io::Error::new(
                            e.kind(),
                            format!("cannot open {}: {e}", path.display()),
                        )
                    })?,
            )
        }
        None => None,
    };
    let mut out = OUTPUT.lock().unwrap_or_else(PoisonError::into_inner);
    if file.is_some() {
        out.file = file;
    }
    if let Some(v) = settings.show_level {
        out.show_level = v;
    }
    if let Some(v) = settings.show_origin {
        out.show_origin = v;
    }
    if settings.module.is_some() {
        out.module.clone_from(&settings.module);
    }
    drop(out);
    if let Some(level) = settings.level {
        init(level);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_civil_times() {
        let at = |secs: u64, nanos: u32| {
            timestamp(std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000000");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.000000005");
        assert_eq!(
            at(1_796_325_245, 123_456_789),
            "2026-12-03T19:14:05.123456789"
        );
    }

    #[test]
    fn virtio_queue_errors_are_debug_lines() {
        let guest_caused = Metadata::builder()
            .level(Level::Error)
            .target("virtio_queue::queue")
            .build();
        assert_eq!(effective_level(&guest_caused), Level::Debug);
        let ours = Metadata::builder()
            .level(Level::Error)
            .target("skiff::vmm")
            .build();
        assert_eq!(effective_level(&ours), Level::Error);
    }

    #[test]
    fn rate_limit_lets_a_burst_through_then_counts_what_it_left_out() {
        let limit = RateLimit::new();
        let shown = (0..1000).filter(|_| limit.admit().is_some()).count() as u64;
        // A second boundary may fall inside the loop: at most two seconds' worth.
        assert!((GUEST_LINES_PER_SEC..=2 * GUEST_LINES_PER_SEC).contains(&shown));
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let left_out = limit.admit().expect("a new second admits again");
        assert!(left_out >= 1000 - 2 * GUEST_LINES_PER_SEC, "{left_out}");
        assert_eq!(limit.admit(), Some(0));
    }

    #[test]
    fn firecracker_level_names() {
        assert_eq!(parse_level("Warning"), Some(LevelFilter::Warn));
        assert_eq!(parse_level("Info"), Some(LevelFilter::Info));
        assert_eq!(parse_level("off"), Some(LevelFilter::Off));
        assert_eq!(parse_level("loud"), None);
    }
}
