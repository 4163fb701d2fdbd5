//! virtio-pmem (virtio 1.2, 5.19): a host file mapped into guest physical memory above RAM,
//! which the guest reads and writes directly (Linux: `/dev/pmem<N>`, DAX-capable), and a
//! queue of FLUSH requests the device answers once the file's data is on the host's disk; as
//! Firecracker's `PUT /pmem/{id}` sets it up.

mod device;
mod event_handler;

pub use device::{Pmem, PmemBacking, PmemError, PmemState};

/// Virtio device ID of a persistent memory device.
pub const VIRTIO_ID_PMEM: u32 = 27;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
