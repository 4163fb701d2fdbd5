//! virtio-blk on a raw image file (virtio 1.2, 5.2).

mod device;
mod event_handler;
mod request;
mod uring;

pub use device::{open_image, Block, BlockError, BlockState};
pub use uring::RING_ENTRIES;

/// Virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Sector size the protocol counts in.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes in a GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
