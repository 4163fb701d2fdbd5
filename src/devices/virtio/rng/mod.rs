//! virtio-rng, the entropy device (virtio 1.2, 5.4): the guest posts device-writable buffers
//! and gets them back filled from the host's getrandom, as Firecracker's `PUT /entropy` sets up.

mod device;
mod event_handler;

pub(crate) use device::host_random;
pub use device::{Rng, RngError, RngState};

/// Virtio device ID of an entropy source.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes filled for one request: a guest asking for more gets this much (the virtio spec
/// lets the device fill less than the buffer), so one request cannot hold the event thread.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;
