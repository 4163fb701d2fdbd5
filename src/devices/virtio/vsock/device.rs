//! The virtio-vsock device (virtio 1.2, 5.10): the guest's CID in the configuration space, a
//! receive queue the device fills with packets for the guest, a transmit queue of the guest's
//! packets, and an event queue for the transport reset a restored guest gets (its connections
//! did not survive the snapshot, as in Firecracker).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::Level;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::muxer::{Muxer, MuxerError, TxOutcome};
use super::packet;
use super::{MAX_PKT_DATA, QUEUE_SIZE, VIRTIO_ID_VSOCK};
use crate::devices::virtio::{
    drain_queue, needs_interrupt, next_chain_or_notify, pop_chain, split_chain, ActivateError,
    BrokenQueue, ChainBufs, ConfigSpace, Handled, RestoreError, VirtioBase, VirtioDevice,
    VirtioState, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
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
            self.base.queue_irq(TX_QUEUE),
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
            let chain = match next_chain_or_notify(queue, mem) {
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
            if let Err(e) = self.base.irq.trigger_queue(RX_QUEUE) {
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
        // The driver's giving the buffer back must be heard: that is its answer. With
        // EVENT_IDX a driver notifies only when its available index passes avail_event, and
        // one that keeps several event buffers (Linux keeps 8) still has unused ones, so
        // avail_event goes to its current index, not to the next buffer the device would take:
        // the buffer it gives back after handling the reset then crosses it.
        let next = queue.next_avail();
        if let Ok(avail) = queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
            queue.set_next_avail(avail.0);
        }
        let _ = queue.enable_notification(mem);
        queue.set_next_avail(next);
        if needs_interrupt(queue, mem) {
            if let Err(e) = self.base.irq.trigger_queue(EVENT_QUEUE) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    use super::super::packet::{op, Header, HDR_LEN, TYPE_STREAM};
    use super::super::HOST_CID;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const SIZE: u16 = 16;
    const BUF: u64 = 0x4_0000;

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    struct Rig<'a> {
        dir: PathBuf,
        mem: &'a GuestMemoryMmap,
        rx: MockSplitQueue<'a, GuestMemoryMmap>,
        tx: MockSplitQueue<'a, GuestMemoryMmap>,
        event: MockSplitQueue<'a, GuestMemoryMmap>,
        vsock: Vsock,
    }

    impl Drop for Rig<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    impl<'a> Rig<'a> {
        fn new(mem: &'a GuestMemoryMmap, name: &str, reset_pending: bool) -> Self {
            let dir = std::env::temp_dir().join(format!("skiff-vsd-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let mut vsock = Vsock::new(3, &dir.join("v.sock")).unwrap();
            vsock.reset_pending = reset_pending;
            let rx = MockSplitQueue::create(mem, GuestAddress(0x1_0000), SIZE);
            let tx = MockSplitQueue::create(mem, GuestAddress(0x2_0000), SIZE);
            let event = MockSplitQueue::create(mem, GuestAddress(0x3_0000), SIZE);
            vsock.set_acked_features(1 << VIRTIO_F_VERSION_1);
            let queues = vec![
                rx.create_queue().unwrap(),
                tx.create_queue().unwrap(),
                event.create_queue().unwrap(),
            ];
            vsock.activate(mem.clone(), queues).unwrap();
            Rig {
                dir,
                mem,
                rx,
                tx,
                event,
                vsock,
            }
        }

        fn used(&self, q: &MockSplitQueue<'a, GuestMemoryMmap>, i: u64) -> (u32, u32) {
            let at = q.used_addr().0 + 4 + 8 * i;
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            (id, len)
        }

        fn used_idx(&self, q: &MockSplitQueue<'a, GuestMemoryMmap>) -> u16 {
            self.mem
                .read_obj(GuestAddress(q.used_addr().0 + 2))
                .unwrap()
        }

        /// The packet header the device wrote at `addr`.
        fn header(&self, addr: u64) -> Header {
            let mut raw = [0u8; HDR_LEN];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            Header::from_bytes(&raw)
        }
    }

    fn guest_pkt(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    /// A request to a port nobody listens on is answered RST (its header split across two
    /// descriptors, as Linux may send it); hostile chains are returned and dropped: a
    /// device-writable buffer, a header outside guest memory, a length past the chain, a
    /// chain too short for a header, a forged source CID. A receive chain too small for a
    /// header is returned empty and the packet waits for the next.
    #[test]
    fn stray_requests_are_reset_and_hostile_chains_dropped() {
        let m = crate::vstate::memory::anonymous(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let mut rig = Rig::new(&m, "tx", false);
        let req = guest_pkt(op::REQUEST, 1000, 9).to_bytes();
        m.write_slice(&req, GuestAddress(BUF)).unwrap();
        rig.tx
            .add_desc_chains(&[desc(BUF, 20, F_NEXT, 1), desc(BUF + 20, 24, 0, 0)], 0)
            .unwrap();
        rig.tx
            .add_desc_chains(&[desc(BUF, 44, F_WRITE, 0)], 2)
            .unwrap();
        rig.tx
            .add_desc_chains(&[desc(0xffff_0000_0000, 44, 0, 0)], 3)
            .unwrap();
        let mut long = guest_pkt(op::RW, 1001, 9);
        long.len = 100;
        m.write_slice(&long.to_bytes(), GuestAddress(BUF + 0x100))
            .unwrap();
        rig.tx
            .add_desc_chains(&[desc(BUF + 0x100, 60, 0, 0)], 4)
            .unwrap();
        rig.tx.add_desc_chains(&[desc(BUF, 43, 0, 0)], 5).unwrap();
        let mut forged = guest_pkt(op::REQUEST, 1002, 9);
        forged.src_cid = 4;
        m.write_slice(&forged.to_bytes(), GuestAddress(BUF + 0x200))
            .unwrap();
        rig.tx
            .add_desc_chains(&[desc(BUF + 0x200, 44, 0, 0)], 6)
            .unwrap();
        rig.vsock.process_tx();
        assert_eq!(rig.used_idx(&rig.tx), 6, "every chain returned");
        let metrics = rig.vsock.metrics();
        let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(count(&metrics.tx_invalid_packets), 5);

        rig.rx
            .add_desc_chains(
                &[
                    desc(BUF + 0x1000, 40, F_WRITE, 0),
                    desc(BUF + 0x2000, 4096, F_WRITE, 0),
                ],
                0,
            )
            .unwrap();
        rig.vsock.process_rx();
        assert_eq!(rig.used_idx(&rig.rx), 2);
        assert_eq!(rig.used(&rig.rx, 0), (0, 0), "too small for a header");
        assert_eq!(rig.used(&rig.rx, 1), (1, 44));
        let rst = rig.header(BUF + 0x2000);
        assert_eq!(
            (rst.op, rst.src_cid, rst.dst_cid, rst.src_port, rst.dst_port),
            (op::RST, HOST_CID, 3, 9, 1000)
        );
        assert_eq!(count(&metrics.rx_invalid_chains), 1);
    }

    /// A restored device sends the transport reset on its event queue, and nothing reaches
    /// the receive queue (a host's REQUEST waits) until the driver gives its event buffer
    /// back.
    #[test]
    fn a_transport_reset_holds_receiving_until_the_driver_answers() {
        let m = crate::vstate::memory::anonymous(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let mut rig = Rig::new(&m, "reset", true);
        m.write_obj(0xffff_ffffu32, GuestAddress(BUF)).unwrap();
        rig.event
            .add_desc_chains(&[desc(BUF, 4, F_WRITE, 0)], 0)
            .unwrap();
        rig.vsock.process_event_queue();
        assert_eq!(rig.used(&rig.event, 0), (0, 4));
        assert_eq!(m.read_obj::<u32>(GuestAddress(BUF)).unwrap(), 0);
        assert!(!rig.vsock.reset_pending());

        let mut host = UnixStream::connect(rig.vsock.uds_path()).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        for _ in 0..20 {
            rig.vsock.muxer.process_events();
        }
        rig.rx
            .add_desc_chains(&[desc(BUF + 0x1000, 4096, F_WRITE, 0)], 0)
            .unwrap();
        rig.vsock.process_rx();
        assert_eq!(
            rig.used_idx(&rig.rx),
            0,
            "held while the reset is unanswered"
        );
        rig.event
            .add_desc_chains(&[desc(BUF, 4, F_WRITE, 0)], 1)
            .unwrap();
        rig.vsock.process_event_queue();
        rig.vsock.process_rx();
        assert_eq!(rig.used_idx(&rig.rx), 1);
        let req = rig.header(BUF + 0x1000);
        assert_eq!((req.op, req.dst_port, req.dst_cid), (op::REQUEST, 52, 3));
    }
}
