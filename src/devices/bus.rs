//! The I/O and MMIO buses: an immutable, sorted table of address ranges shared by every vCPU.
//! Lookups are a binary search; each device has its own mutex, so there is no global lock on
//! the exit path. Reads of unmapped addresses return all-ones, writes are dropped and counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// A device that answers guest accesses to an address range.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors while building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the refused range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// The range is empty or wraps around.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the refused range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

struct BusEntry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A bus: add devices while building the VM, then share it read-only between vCPUs.
#[derive(Default)]
pub struct Bus {
    entries: Vec<BusEntry>,
    unhandled_reads: AtomicU64,
    unhandled_writes: AtomicU64,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.entries.iter().map(|e| (e.base, e.len)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let idx = self.entries.partition_point(|e| e.base < base);
        let overlaps_prev =
            idx > 0 && self.entries[idx - 1].base + self.entries[idx - 1].len > base;
        let overlaps_next = idx < self.entries.len() && self.entries[idx].base < end;
        if overlaps_prev || overlaps_next {
            return Err(BusError::Overlap { base, len });
        }
        self.entries.insert(idx, BusEntry { base, len, device });
        Ok(())
    }

    /// The entry whose range holds the whole access `[addr, addr + size)`, with the offset.
    fn find(&self, addr: u64, size: usize) -> Option<(&BusEntry, u64)> {
        let idx = self
            .entries
            .partition_point(|e| e.base <= addr)
            .checked_sub(1)?;
        let entry = &self.entries[idx];
        let offset = addr - entry.base;
        (offset.checked_add(size as u64)? <= entry.len).then_some((entry, offset))
    }

    /// Dispatches a guest read; an unmapped address reads as all-ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                entry
                    .device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .read(offset, data);
            }
            None => {
                data.fill(0xff);
                self.unhandled_reads.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Dispatches a guest write; a write to an unmapped address is dropped and counted.
    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                entry
                    .device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write(offset, data);
            }
            None => {
                self.unhandled_writes.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// How many reads and writes hit no device.
    pub fn unhandled(&self) -> (u64, u64) {
        (
            self.unhandled_reads.load(Ordering::Relaxed),
            self.unhandled_writes.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last write and answers reads with its offset.
    #[derive(Default)]
    struct Probe {
        last: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset.to_le_bytes()[0]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_range() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Probe::default()));
        let b = Arc::new(Mutex::new(Probe::default()));
        bus.insert(b.clone(), 0x100, 0x10).unwrap();
        bus.insert(a.clone(), 0x10, 0x8).unwrap();
        let mut d = [0u8; 2];
        bus.read(0x13, &mut d);
        assert_eq!(d, [3, 3]);
        bus.write(0x10f, &[9]);
        assert_eq!(b.lock().unwrap().last, Some((0xf, vec![9])));
        assert!(a.lock().unwrap().last.is_none());
    }

    #[test]
    fn unmapped_reads_all_ones_and_counts() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Probe::default())), 0x10, 0x8)
            .unwrap();
        let mut d = [0u8; 4];
        bus.read(0x16, &mut d); // straddles the end of the device
        assert_eq!(d, [0xff; 4]);
        bus.read(0x0, &mut d);
        bus.write(0x18, &[1]);
        assert_eq!(bus.unhandled(), (2, 1));
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Probe::default())) as Arc<Mutex<dyn BusDevice>>;
        bus.insert(dev(), 0x10, 0x10).unwrap();
        assert!(bus.insert(dev(), 0x18, 0x10).is_err());
        assert!(bus.insert(dev(), 0x8, 0x9).is_err());
        assert!(bus.insert(dev(), 0x8, 0x8).is_ok());
        assert!(bus.insert(dev(), 0x20, 0).is_err());
        assert!(bus.insert(dev(), u64::MAX, 2).is_err());
    }
}
