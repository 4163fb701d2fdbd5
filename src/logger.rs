//! A small logger for the `log` facade: one line per record on stderr, with the time since
//! process start, the level and the thread.

use std::io::Write;

use log::{Level, LevelFilter, Log, Metadata, Record};

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
        let t = crate::process_start().elapsed();
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("?");
        // One write per line so lines from several threads do not interleave.
        let line = format!(
            "[{:>4}.{:06} {} {}] {}\n",
            t.as_secs(),
            t.subsec_micros(),
            record.level(),
            name,
            record.args()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger at `level`. Calling it twice only changes the level.
pub fn init(level: LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
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
}
