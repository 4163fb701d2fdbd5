//! A small logger for the `log` facade: one line per record, with the time since process
//! start, the level and the thread; on stderr, or on the file or named pipe given by
//! `--log-path` or `PUT /logger`, with Firecracker's options (level, show_level,
//! show_log_origin, module).

use std::fs::File;
use std::io::Write;
use std::sync::{Mutex, PoisonError};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Where and how lines are written.
#[derive(Debug)]
struct Output {
    file: Option<File>,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
}

static OUTPUT: Mutex<Output> = Mutex::new(Output {
    file: None,
    show_level: true,
    show_origin: false,
    module: None,
});

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

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        effective_level(metadata) <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
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
        let t = crate::process_start().elapsed();
        let thread = std::thread::current();
        let mut line = format!("[{:>4}.{:06}", t.as_secs(), t.subsec_micros());
        if out.show_level {
            line.push_str(&format!(" {}", record.level()));
        }
        line.push_str(&format!(" {}", thread.name().unwrap_or("?")));
        if out.show_origin {
            line.push_str(&format!(
                " {}:{}",
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
    fn firecracker_level_names() {
        assert_eq!(parse_level("Warning"), Some(LevelFilter::Warn));
        assert_eq!(parse_level("Info"), Some(LevelFilter::Info));
        assert_eq!(parse_level("off"), Some(LevelFilter::Off));
        assert_eq!(parse_level("loud"), None);
    }
}
