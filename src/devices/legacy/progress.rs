//! The boot-progress port (0x80, the POST code port): each byte the guest writes is
//! timestamped against process start, so boot phases can be measured from inside the guest.

use std::time::{Duration, Instant};

use log::info;

use crate::devices::bus::BusDevice;

/// Writes kept; later ones are counted only, so a guest cannot grow our memory or flood logs.
pub const MAX_RECORDS: usize = 64;

/// One boot-progress write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgressRecord {
    /// The byte the guest wrote.
    pub code: u8,
    /// Time since the VMM process started.
    pub elapsed: Duration,
}

/// Records boot-progress writes.
#[derive(Debug)]
pub struct BootProgress {
    start: Instant,
    records: Vec<ProgressRecord>,
    dropped: u64,
    boot_timer: bool,
    /// When the guest first wrote [`BOOT_COMPLETE`].
    boot_time: Option<Duration>,
}

/// The byte Firecracker's boot timer takes as "boot complete" (its `--boot-timer`).
pub const BOOT_COMPLETE: u8 = 123;

impl BootProgress {
    /// A recorder measuring from `start` (normally the process start).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            records: Vec::with_capacity(MAX_RECORDS),
            dropped: 0,
            boot_timer: false,
            boot_time: None,
        }
    }

    /// Logs the guest's boot time when it writes [`BOOT_COMPLETE`].
    pub fn set_boot_timer(&mut self, on: bool) {
        self.boot_timer = on;
    }

    /// The writes recorded so far.
    pub fn records(&self) -> &[ProgressRecord] {
        &self.records
    }

    /// When the guest first wrote [`BOOT_COMPLETE`], if it did.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time
    }

    /// Writes beyond [`MAX_RECORDS`].
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl BusDevice for BootProgress {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let elapsed = self.start.elapsed();
        let Some(&code) = data.first() else { return };
        // The boot completes once: later writes of the code, which the guest may repeat at
        // will, are only recorded like any other.
        if code == BOOT_COMPLETE && self.boot_time.is_none() {
            self.boot_time = Some(elapsed);
            if self.boot_timer {
                let cpu = process_cpu_time();
                info!(
                    "Guest-boot-time = {:>6} us {} ms, {:>6} CPU us {} CPU ms",
                    elapsed.as_micros(),
                    elapsed.as_millis(),
                    cpu.as_micros(),
                    cpu.as_millis()
                );
            }
        }
        if self.records.len() < MAX_RECORDS {
            self.records.push(ProgressRecord { code, elapsed });
            info!(
                "boot progress {code:#04x} at {:.3} ms after process start",
                elapsed.as_secs_f64() * 1000.0
            );
        } else {
            self.dropped += 1;
        }
    }
}

/// CPU time the whole process has used (CLOCK_PROCESS_CPUTIME_ID), as Firecracker's boot timer
/// reports it beside the wall-clock time.
fn process_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which is valid for the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_capped() {
        let mut p = BootProgress::new(Instant::now());
        for i in 0..(MAX_RECORDS + 5) {
            p.write(0, &[u8::try_from(i % 256).unwrap()]);
        }
        assert_eq!(p.records().len(), MAX_RECORDS);
        assert_eq!(p.records()[1].code, 1);
        assert!(p.records()[0].elapsed <= p.records()[1].elapsed);
        assert_eq!(p.dropped(), 5);
    }

    #[test]
    fn boot_completes_once() {
        let mut p = BootProgress::new(Instant::now());
        p.set_boot_timer(true);
        p.write(0, &[BOOT_COMPLETE]);
        let first = p.boot_time().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        p.write(0, &[BOOT_COMPLETE]);
        assert_eq!(p.boot_time(), Some(first));
    }
}
