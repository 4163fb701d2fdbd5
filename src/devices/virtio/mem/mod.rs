//! virtio-mem (virtio 1.2, 5.15): hot-pluggable memory. The device manages a region of guest
//! physical memory after RAM; the host sets how much of it the guest should use (the requested
//! size) and the driver plugs and unplugs blocks of it to follow, as Firecracker's
//! `PUT|PATCH|GET /hotplug/memory` drive it.

mod device;
mod event_handler;

pub use device::{MemoryHotplugStatus, VirtioMem, VirtioMemError, VirtioMemState};

/// Virtio device ID of a memory device.
pub const VIRTIO_ID_MEM: u32 = 24;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
