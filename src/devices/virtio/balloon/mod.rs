//! virtio-balloon, the memory balloon (virtio 1.2, 5.5), as Firecracker's `/balloon` API
//! drives it: the host sets a target, the guest inflates (gives pages up, which the host
//! discards) or deflates (takes them back) towards it and reports how far it got; a statistics
//! queue the device answers every polling interval; free page hinting (host-started runs) and
//! free page reporting (the guest's own), both of which give the host back the ranges named.

mod device;
mod event_handler;
mod stats;

pub use device::{Balloon, BalloonError, BalloonState, HintingState};
pub use stats::BalloonStats;

/// Virtio device ID of a memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// Size of each queue offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// The page size the protocol counts in, whatever the host's (virtio 1.2, 5.5.6).
pub const BALLOON_PAGE_SIZE: u64 = 4096;
/// 4 KiB pages in a MiB.
pub const PAGES_PER_MIB: u32 = 256;
/// Most page frame numbers taken from one inflate or deflate chain (Linux sends at most 256,
/// `VIRTIO_BALLOON_ARRAY_PFNS_MAX`); the rest of a longer chain is ignored and counted, so a
/// wake-up works on at most a queue's worth of chains of this many pages.
pub const MAX_PAGES_PER_CHAIN: usize = 256;
/// Most statistics read from one buffer (Linux 6.12 sends 16 tags; Firecracker's bound).
pub const MAX_STATS: usize = 256;

/// Feature bit: the statistics queue is there (virtio 1.2, 5.5.3).
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// Feature bit: the guest may deflate when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// Feature bit: free page hinting, with its queue and command id.
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u32 = 3;
/// Feature bit: free page reporting, with its queue.
pub const VIRTIO_BALLOON_F_PAGE_REPORTING: u32 = 5;

/// Free page hinting command: the guest finished a run (its answer), or no run (the host's).
pub const FREE_PAGE_HINT_STOP: u32 = 0;
/// Free page hinting command: the host is done with the hinted pages, which the guest may use
/// again.
pub const FREE_PAGE_HINT_DONE: u32 = 1;
