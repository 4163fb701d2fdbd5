//! virtio-net on a TAP device (virtio 1.2, 5.1): a receive and a transmit queue, frames carried
//! with the virtio-net header the TAP understands, offloads mirrored on the TAP.

mod device;
mod event_handler;
mod rx;
pub mod tap;

pub use device::{Net, NetCounters, NetError, NetState};
pub use tap::{Tap, TapError};

/// Virtio device ID of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// Size of `struct virtio_net_hdr_v1` (virtio 1.2, 5.1.6): with VIRTIO_F_VERSION_1 every frame
/// carries it, `num_buffers` included.
pub const VNET_HDR_LEN: usize = 12;
/// Queue size offered for each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame with its header: a 64 KiB GSO packet with Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65_550;
