//! virtio-vsock (virtio 1.2, 5.10) with Firecracker's host side: guest sockets reach host
//! programs through Unix sockets. A host program connects to the device's socket (`uds_path`)
//! and writes `CONNECT <port>\n` to reach a guest listener on that port; a guest connecting to
//! the host (CID 2) on port P reaches the Unix listener at `<uds_path>_P`.
//!
//! - `packet.rs`: the packet header and reading and writing packets in guest buffers;
//! - `uds.rs`: non-blocking Unix socket calls the event thread makes;
//! - `connection.rs`: one connection's state, credit and buffering;
//! - `muxer.rs`: the listener, the connections by port, and what the guest is to receive next;
//! - `device.rs`: the virtio device (queues, event queue, snapshots);
//! - `event_handler.rs`: the device on the event thread.

mod connection;
mod device;
mod event_handler;
mod muxer;
mod packet;
mod uds;

pub use device::{Vsock, VsockError, VsockState};

/// Virtio device ID of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Size offered for each of the three queues (receive, transmit, event).
pub const QUEUE_SIZE: u16 = 256;
/// The host's CID (virtio 1.2, 5.10.4: CIDs 0 to 2 are reserved; 2 is the host).
pub const HOST_CID: u64 = 2;
/// Most data bytes in one packet, either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// Buffer space each connection offers the guest (`buf_alloc`): at most this much of what the
/// guest sends waits in Skiff while the host program does not read.
pub const CONN_BUF_SIZE: u32 = 64 * 1024;
/// Connections at once, either side's, as Firecracker; one more is refused (RST to a guest
/// REQUEST, a host connection closed at once).
pub const MAX_CONNECTIONS: usize = 1023;
/// Host connections accepted and still to write their `CONNECT <port>\n` line.
pub const MAX_PENDING_HOST_CONNECTIONS: usize = 64;
