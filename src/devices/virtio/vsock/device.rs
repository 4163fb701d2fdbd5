//! The virtio-vsock device (virtio 1.2, 5.10): the guest's CID in the configuration space, a
//! receive queue the device fills with packets for the guest, a transmit queue of the guest's
//! packets, and an event queue for the transport reset a restored guest gets (its connections
//! did not survive the snapshot, as in Firecracker).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::Level;
use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::muxer::{Muxer, MuxerError, TxOutcome};
use super::packet;
use super::{MAX_PKT_DATA, QUEUE_SIZE, VIRTIO_ID_VSOCK};
use crate::devices::virtio::{
    drain_queue, needs_interrupt, pop_chain, split_chain, ActivateError, BrokenQueue, ChainBufs,
    ConfigSpace, Handled, RestoreError, VirtioBase, VirtioDevice, VirtioState, INT_VRING,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::guest_log;
use crate::metrics::{add, inc, VsockMetrics};
use crate::vstate::memory::GuestMemoryMmap;

/// Index of the receive queue.
pub(super) const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub(super) const TX_QUEUE: usize = 1;
/// Index of the event queue.
pub(super) const EVENT_QUEUE: usize = 2;
/// `struct virtio_vsock_event` id of a transport reset (virtio 1.2, 5.10.6.7).
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Errors while creating or restoring the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The configuration is unusable (a reserved CID, a bad path).
    #[error("vsock: {0}")]
    Config(String),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The host side cannot be set up.
    #[error(transparent)]
    Muxer(#[from] MuxerError),
    /// The saved virtio state cannot be put back.
    #[error("vsock device: cannot restore its saved state")]
    Restore(#[source] RestoreError),
}

/// The vsock device as a snapshot holds it. Connections are not kept (nor in Firecracker): the
/// restored guest gets a transport reset, and host programs connect again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's CID.
    pub guest_cid: u64,
    /// The host socket's path (a restore may move it).
    pub uds_path: String,
    /// Features, interrupt, configuration and queues.
    pub virtio: VirtioState,
}

/// What the device works on once the driver is ready.
struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    event: Queue,
}

/// A virtio-vsock device with Firecracker's Unix socket host side.
pub struct Vsock {
    pub(super) base: VirtioBase,
    guest_cid: u64,
    pub(super) muxer: Muxer,
    active: Option<Active>,
    chain: ChainBufs,
    tx_data: Vec<u8>,
    rx_data: Vec<u8>,
    /// The transmit queue's next packet could not be taken; it is tried again after the
    /// host side moved.
    tx_blocked: bool,
    /// A transport reset is to go to the guest (after a restore).
    reset_pending: bool,
    /// A transport reset went to the guest, which has not given its event buffer back yet:
    /// nothing goes to its receive queue until it has dealt with the reset.
    reset_unacked: bool,
    metrics: Arc<VsockMetrics>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("uds_path", &self.muxer.path())
            .field("connections", &self.muxer.connections())
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// A device for a guest with CID `guest_cid`, listening for host programs on `uds_path`
    /// (which must not exist).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        let features = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_RING_F_EVENT_IDX);
        let metrics = Arc::new(VsockMetrics::default());
        Ok(Self {
            // The configuration space is the guest's CID, le64 (virtio 1.2, 5.10.4),
            // read-only.
            base: VirtioBase::new(
                features,
                3,
                ConfigSpace::new(guest_cid.to_le_bytes().to_vec(), 0..0),
            )
            .map_err(VsockError::EventFd)?,
            guest_cid,
            muxer: Muxer::new(guest_cid, uds_path, metrics.clone())?,
            active: None,
            chain: ChainBufs::default(),
            tx_data: Vec::new(),
            rx_data: vec![0; MAX_PKT_DATA as usize],
            tx_blocked: false,
            reset_pending: false,
            reset_unacked: false,
            metrics,
        })
    }

    /// The device's state, for a snapshot.
    pub fn save(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
            uds_path: self.muxer.path().to_string_lossy().into_owned(),
            virtio: self.base.save(&self.active_queues()),
        }
    }

    /// A device as `state` saved it, listening on `uds_path` (the saved path unless
    /// overridden). A driver that had the device running gets a transport reset once the
    /// restored VM runs.
    pub fn from_state(uds_path: Option<&Path>, state: &VsockState) -> Result<Self, VsockError> {
        let path = uds_path.map_or_else(|| PathBuf::from(&state.uds_path), Path::to_owned);
        let mut vsock = Self::new(state.guest_cid, &path)?;
        vsock
            .base
            .restore(&state.virtio)
            .map_err(VsockError::Restore)?;
        vsock.reset_pending = !state.virtio.queues.is_empty();
        Ok(vsock)
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The socket host programs connect to.
    pub fn uds_path(&self) -> &Path {
        self.muxer.path()
    }

    /// The device's counters, shared with the metrics dump.
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    /// The driver broke a queue: the device stops until the driver resets it, and says so.
    fn broken(&mut self) {
        self.active = None;
        self.muxer.active = false;
        self.muxer.reset();
        self.base.irq.signal_needs_reset();
    }

    /// Takes the guest's packets (see [`drain_queue`]) to the host side. A packet the host
    /// side cannot take now stays on the queue and ends the drain ([`TxOutcome::Blocked`]);
    /// it is tried again after the host side moved. Broken chains and bad packets are
    /// dropped and counted.
    pub fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let (bufs, data, metrics) = (&mut self.chain, &mut self.tx_data, &self.metrics);
        let muxer = &mut self.muxer;
        let mut blocked = false;
        let drained = drain_queue(
            &mut active.tx,
            mem,
            &self.base.queue_events[TX_QUEUE],
            &self.base.irq,
            |chain| {
                if !split_chain(chain, bufs) || !bufs.writable.is_empty() {
                    guest_log!(Level::Debug, "vsock: dropping a broken transmit chain");
                    inc(&metrics.tx_invalid_packets);
                    return Handled::Used(0);
                }
                let hdr = match packet::read_packet(mem, &bufs.readable, data) {
                    Ok(hdr) => hdr,
                    Err(e) => {
                        guest_log!(Level::Debug, "vsock: dropping a bad packet: {e:?}");
                        inc(&metrics.tx_invalid_packets);
                        return Handled::Used(0);
                    }
                };
                match muxer.send_pkt(&hdr, data) {
                    TxOutcome::Done => {
                        inc(&metrics.tx_packets_count);
                        if hdr.op == packet::op::RW {
                            add(&metrics.tx_bytes_count, data.len() as u64);
                        }
                        Handled::Used(0)
                    }
                    TxOutcome::Blocked => {
                        blocked = true;
                        Handled::Deferred
                    }
                }
            },
        );
        self.tx_blocked = blocked;
        if drained.is_err() {
            self.broken();
        }
    }

    /// Tries the transmit queue again if its last packet was held back.
    pub fn resume_tx(&mut self) {
        if self.tx_blocked {
            self.process_tx();
        }
    }

    /// Fills the guest's receive buffers with what the host side owes it, at most a queue's
    /// worth per call (then the receive queue's own event brings the device back). Stops,
    /// asking the driver to notify, when it has no buffer left; holds everything while a
    /// transport reset waits to go out or for the driver to deal with it, so that nothing
    /// new reaches the guest before it has reset the old.
    pub fn process_rx(&mut self) {
        if self.reset_pending || self.reset_unacked || !self.muxer.has_pending_rx() {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.rx;
        let _ = queue.disable_notification(mem);
        let mut budget = queue.size();
        let mut used = false;
        let mut broken = false;
        while self.muxer.has_pending_rx() {
            if budget == 0 {
                let _ = self.base.queue_events[RX_QUEUE].write(1);
                break;
            }
            budget -= 1;
            let chain = match next_chain(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(BrokenQueue) => {
                    broken = true;
                    break;
                }
            };
            let head = chain.head_index();
            let room = if split_chain(chain, &mut self.chain) && self.chain.readable.is_empty() {
                packet::data_room(&self.chain.writable)
            } else {
                None
            };
            let len = match room {
                Some(room) => {
                    let n = (room.min(MAX_PKT_DATA)) as usize;
                    let Some((hdr, len)) = self.muxer.recv_pkt(&mut self.rx_data[..n]) else {
                        queue.go_to_previous_position();
                        break;
                    };
                    match packet::write_packet(
                        mem,
                        &self.chain.writable,
                        &hdr,
                        &self.rx_data[..len],
                    ) {
                        Ok(written) => {
                            inc(&self.metrics.rx_packets_count);
                            add(&self.metrics.rx_bytes_count, len as u64);
                            written
                        }
                        Err(_) => {
                            inc(&self.metrics.rx_invalid_chains);
                            0
                        }
                    }
                }
                None => {
                    guest_log!(Level::Debug, "vsock: receive chain too broken to fill");
                    inc(&self.metrics.rx_invalid_chains);
                    0
                }
            };
            if queue.add_used(mem, head, len).is_err() {
                guest_log!(Level::Debug, "vsock: cannot add a used element");
            }
            used = true;
        }
        if used && needs_interrupt(queue, mem) {
            if let Err(e) = self.base.irq.trigger(INT_VRING) {
                guest_log!(Level::Warn, "vsock: cannot raise interrupt: {e}");
            }
        }
        if broken {
            self.broken();
        }
    }

    /// The driver gave event buffers: a pending transport reset goes out, and a driver that
    /// gives its buffer back after one has dealt with it, so receiving resumes.
    pub fn process_event_queue(&mut self) {
        if self.reset_pending {
            self.send_transport_reset();
        } else {
            self.reset_unacked = false;
        }
    }

    /// Sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (virtio 1.2, 5.10.6.7): the driver resets
    /// its connections and reads the CID again. Without an event buffer it waits for one.
    pub fn send_transport_reset(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.event;
        let chain = match pop_chain(queue, mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => {
                inc(&self.metrics.ev_queue_event_fails);
                let _ = queue.enable_notification(mem);
                return;
            }
            Err(BrokenQueue) => {
                self.broken();
                return;
            }
        };
        let head = chain.head_index();
        let written = match split_chain(chain, &mut self.chain)
            .then(|| self.chain.writable.first().copied())
            .flatten()
            .filter(|b| b.len >= 4)
        {
            Some(b) => mem
                .write_obj(EVENT_TRANSPORT_RESET.to_le(), GuestAddress(b.addr))
                .map_or(0, |()| 4),
            None => 0,
        };
        if queue.add_used(mem, head, written).is_err() {
            guest_log!(Level::Debug, "vsock: cannot add a used element");
        }
        // The driver's giving the buffer back must be heard (EVENT_IDX): that is its answer.
        let _ = queue.enable_notification(mem);
        if needs_interrupt(queue, mem) {
            if let Err(e) = self.base.irq.trigger(INT_VRING) {
                guest_log!(Level::Warn, "vsock: cannot raise interrupt: {e}");
            }
        }
        inc(&self.metrics.transport_resets);
        self.reset_pending = false;
        self.reset_unacked = written == 4;
    }

    /// Whether the driver has the device running.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Whether a transport reset is still to go out.
    pub fn reset_pending(&self) -> bool {
        self.reset_pending
    }
}

/// The next chain; when there is none, asks the driver to notify when it adds one and looks
/// once more (virtio 1.2, 2.7.10).
fn next_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, BrokenQueue> {
    if let Some(chain) = pop_chain(queue, mem)? {
        return Ok(Some(chain));
    }
    match queue.enable_notification(mem) {
        Ok(true) => pop_chain(queue, mem),
        Ok(false) => Ok(None),
        Err(_) => Err(BrokenQueue),
    }
}

impl VirtioDevice for Vsock {
    fn base(&self) -> &VirtioBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        let got = queues.len();
        let mut queues = queues.into_iter();
        let (Some(mut rx), Some(mut tx), Some(mut event), None) =
            (queues.next(), queues.next(), queues.next(), queues.next())
        else {
            return Err(ActivateError::QueueCount { expected: 3, got });
        };
        let event_idx = self.base.acked(VIRTIO_RING_F_EVENT_IDX);
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        event.set_event_idx(event_idx);
        self.active = Some(Active { mem, rx, tx, event });
        self.muxer.active = true;
        self.base
            .activate_evt
            .write(1)
            .map_err(ActivateError::Signal)
    }

    fn reset(&mut self) {
        // On a vCPU thread: dropping the connections only closes their streams.
        self.active = None;
        self.base.acked_features = 0;
        self.muxer.active = false;
        self.muxer.reset();
        self.tx_blocked = false;
        self.reset_pending = false;
        self.reset_unacked = false;
    }

    fn active_queues(&self) -> Vec<&Queue> {
        self.active
            .iter()
            .flat_map(|a| [&a.rx, &a.tx, &a.event])
            .collect()
    }
}
