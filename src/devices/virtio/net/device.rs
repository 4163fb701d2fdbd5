//! The virtio-net device: configuration space (the MAC), features and their TAP offloads,
//! activation, and moving frames between the queues and the TAP.

use std::io;
use std::sync::Arc;

use log::Level;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::rx::{guest_iovecs, read_prefix, Rx, RxCtx, RxStep};
use super::tap::{IoVecs, Tap, TapError};
use super::{MAX_FRAME_LEN, QUEUE_SIZE, VIRTIO_ID_NET, VNET_HDR_LEN};
use crate::config::RateLimiterConfig;
use crate::devices::virtio::{
    drain_queue, needs_interrupt, split_chain, ActivateError, ChainBufs, ConfigSpace, GuestBuf,
    Handled, RestoreError, VirtioBase, VirtioDevice, VirtioState, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::guest_log;
use crate::metrics::{add, inc, NetMetrics};
use crate::mmds::MmdsStack;
use crate::rate_limiter::{RateLimiter, RateLimiterError};
use crate::vstate::memory::GuestMemoryMmap;

/// How much of a transmitted frame is read to tell whether the metadata service wants it: the
/// virtio-net header, Ethernet and ARP headers (the IPv4 destination comes sooner).
const MMDS_PEEK_LEN: usize = VNET_HDR_LEN + 14 + 28;

/// Index of the receive queue.
pub(super) const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub(super) const TX_QUEUE: usize = 1;

// Feature bits (virtio 1.2, 5.1.3).
const VIRTIO_NET_F_CSUM: u32 = 0;
const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
const VIRTIO_NET_F_MAC: u32 = 5;
const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;

/// Errors while creating a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP cannot be used.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
    /// A rate limiter could not be set up.
    #[error(transparent)]
    RateLimiter(#[from] RateLimiterError),
    /// The saved virtio state cannot be put back.
    #[error("network interface on TAP {0}: cannot restore its saved state")]
    Restore(String, #[source] RestoreError),
}

/// A network device as a snapshot holds it. The TAP is opened again by name (or the name a
/// restore's network override gives); a frame read from the TAP and not yet delivered when the
/// snapshot was taken is not kept (the network may drop frames at any time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The TAP's name.
    pub tap: String,
    /// The MAC offered to the guest, if any.
    pub mac: Option<[u8; 6]>,
    /// The receive rate limiter's shape.
    #[serde(with = "crate::rate_limiter::saved_shape")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// The transmit rate limiter's shape.
    #[serde(with = "crate::rate_limiter::saved_shape")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// Features, interrupt, configuration and queues.
    pub virtio: VirtioState,
}

/// A snapshot of what the device counted; a guest's mistakes show here rather than in the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest, headers excluded.
    pub rx_bytes: u64,
    /// Frames read from the TAP and dropped (too big for the guest's buffer, broken chain).
    pub rx_dropped: u64,
    /// Frames sent to the TAP.
    pub tx_frames: u64,
    /// Bytes sent to the TAP, headers excluded.
    pub tx_bytes: u64,
    /// Guest frames dropped (broken chain, too big, refused by the TAP).
    pub tx_dropped: u64,
}

/// What the device works on once the driver is ready.
struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
}

/// A virtio network device on a TAP.
pub struct Net {
    tap: Tap,
    mac: Option<[u8; 6]>,
    pub(super) base: VirtioBase,
    active: Option<Active>,
    /// The receive path's buffers and the frame in hand.
    rx: Rx,
    tx_frame: Vec<u8>,
    chain: ChainBufs,
    iov: IoVecs,
    /// Whether the TAP is registered with the event loop.
    pub(super) tap_watched: bool,
    metrics: Arc<NetMetrics>,
    /// Limits frames to the guest; unlimited until configured.
    pub(super) rx_rate_limiter: RateLimiter,
    /// Limits frames from the guest; unlimited until configured.
    pub(super) tx_rate_limiter: RateLimiter,
    /// The metadata service, when this interface answers for it.
    mmds: Option<MmdsStack>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("tap", &self.tap.name())
            .field("counters", &self.counters())
            .field("rate_limiters", &self.rate_limiters())
            .finish_non_exhaustive()
    }
}

/// Result of copying one frame out of a chain.
enum Gather {
    Frame(usize),
    Bad,
}

impl Net {
    /// A device on the TAP `tap_name`, offering `mac` to the guest when given (otherwise the
    /// guest picks its own).
    pub fn new(tap_name: &str, mac: Option<[u8; 6]>) -> Result<Self, NetError> {
        Self::with_tap(Tap::open(tap_name)?, mac)
    }

    /// A device on an already open TAP.
    pub fn with_tap(tap: Tap, mac: Option<[u8; 6]>) -> Result<Self, NetError> {
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_NET_F_CSUM)
            | (1u64 << VIRTIO_NET_F_GUEST_CSUM)
            | (1u64 << VIRTIO_NET_F_GUEST_TSO4)
            | (1u64 << VIRTIO_NET_F_GUEST_TSO6)
            | (1u64 << VIRTIO_NET_F_HOST_TSO4)
            | (1u64 << VIRTIO_NET_F_HOST_TSO6)
            | (1u64 << VIRTIO_NET_F_MRG_RXBUF);
        if mac.is_some() {
            avail_features |= 1u64 << VIRTIO_NET_F_MAC;
        }
        Ok(Self {
            tap,
            mac,
            // The MAC (virtio 1.2, 5.1.4), read-only for a VERSION_1 driver.
            base: VirtioBase::new(
                avail_features,
                2,
                ConfigSpace::new(mac.unwrap_or_default().to_vec(), 0..0),
            )
            .map_err(NetError::EventFd)?,
            active: None,
            rx: Rx::default(),
            tx_frame: vec![0; MAX_FRAME_LEN],
            chain: ChainBufs::default(),
            iov: IoVecs::default(),
            tap_watched: false,
            metrics: Arc::new(NetMetrics::default()),
            rx_rate_limiter: RateLimiter::unlimited()?,
            tx_rate_limiter: RateLimiter::unlimited()?,
            mmds: None,
        })
    }

    /// Makes this interface answer for the metadata service (or, with None, stop doing so):
    /// the guest's frames for it go to `stack` instead of the TAP, and its answers reach the
    /// guest ahead of the TAP's frames.
    pub fn set_mmds(&mut self, stack: Option<MmdsStack>) {
        self.mmds = stack;
    }

    /// The metadata service this interface answers for, if any.
    pub fn mmds(&self) -> Option<&MmdsStack> {
        self.mmds.as_ref()
    }

    /// Whether the metadata service has frames waiting for the guest.
    pub(super) fn mmds_has_output(&self) -> bool {
        self.mmds.as_ref().is_some_and(MmdsStack::has_output)
    }

    /// The device's state, for a snapshot.
    pub fn save(&self) -> NetState {
        NetState {
            tap: self.tap.name().to_owned(),
            mac: self.mac,
            rx_rate_limiter: self.rx_rate_limiter.config(),
            tx_rate_limiter: self.tx_rate_limiter.config(),
            virtio: self.base.save(&self.active_queues()),
        }
    }

    /// A device as `state` saved it, on the TAP `tap` (the saved one unless overridden). Its
    /// queues come back when the transport is restored.
    pub fn from_state(tap: Option<&str>, state: &NetState) -> Result<Self, NetError> {
        let tap = tap.unwrap_or(&state.tap);
        let mut net = Self::new(tap, state.mac)?;
        net.update_rate_limiters(
            state.rx_rate_limiter.as_ref(),
            state.tx_rate_limiter.as_ref(),
        )?;
        net.base
            .restore(&state.virtio)
            .map_err(|e| NetError::Restore(tap.to_owned(), e))?;
        Ok(net)
    }

    /// Changes the rate limiters as a `PATCH /network-interfaces` body does (a limiter not
    /// given stays; in one given, the buckets given replace the current ones); at build time,
    /// sets them. Frames the old limits held back are looked at again at once, on the event
    /// thread.
    pub fn update_rate_limiters(
        &mut self,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> Result<(), NetError> {
        if let Some(rx) = rx {
            self.rx_rate_limiter.patch(rx)?;
        }
        if let Some(tx) = tx {
            self.tx_rate_limiter.patch(tx)?;
        }
        Ok(())
    }

    /// The current shape of the RX and TX rate limiters.
    pub fn rate_limiters(&self) -> (Option<RateLimiterConfig>, Option<RateLimiterConfig>) {
        (self.rx_rate_limiter.config(), self.tx_rate_limiter.config())
    }

    /// The TAP the device sends to and receives from.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// What the device counted so far.
    pub fn counters(&self) -> NetCounters {
        let m = &self.metrics;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        NetCounters {
            rx_frames: get(&m.rx_frames),
            rx_bytes: get(&m.rx_bytes),
            rx_dropped: get(&m.rx_dropped),
            tx_frames: get(&m.tx_frames),
            tx_bytes: get(&m.tx_bytes),
            tx_dropped: get(&m.tx_dropped),
        }
    }

    /// The device's counters, shared with the metrics dump.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    fn acked(&self, bit: u32) -> bool {
        self.base.acked(bit)
    }

    /// The TUN_F_* offloads matching what the driver accepted for received frames. TSO needs
    /// checksum offload (virtio 1.2, 5.1.3.1), and so does the TAP.
    fn tap_offloads(&self) -> u32 {
        if !self.acked(VIRTIO_NET_F_GUEST_CSUM) {
            return 0;
        }
        let mut flags = libc::TUN_F_CSUM;
        if self.acked(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if self.acked(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        flags
    }

    /// The driver broke a queue: the device stops until the driver resets it, and says so.
    fn broken(&mut self) {
        self.active = None;
        self.rx.len = 0;
        self.base.irq.signal_needs_reset();
    }

    /// Sends the guest's frames to the TAP (see [`drain_queue`]) as far as the TX rate limiter
    /// allows; a frame it holds back stays on the queue until the limiter's timer fires. A
    /// broken chain or a frame the TAP refuses is dropped and counted; the buffer goes back to
    /// the guest either way. Frames for the metadata service go to it instead, whatever the
    /// limiter says (as in Firecracker, they are not the TAP's traffic); they are copied out of
    /// guest memory first, so the guest cannot change one between the check and its use.
    pub fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if self.tx_rate_limiter.is_blocked() {
            return;
        }
        let mem = &active.mem;
        let (tap, metrics, limiter) = (&self.tap, &self.metrics, &mut self.tx_rate_limiter);
        let (bufs, frame, mmds) = (&mut self.chain, &mut self.tx_frame, &mut self.mmds);
        let iov = &mut self.iov;
        let drained = drain_queue(
            &mut active.tx,
            mem,
            &self.base.queue_events[TX_QUEUE],
            self.base.queue_irq(TX_QUEUE),
            |chain| {
                let len: u64 = if split_chain(chain, bufs) && bufs.writable.is_empty() {
                    bufs.readable.iter().map(|b| u64::from(b.len)).sum()
                } else {
                    0
                };
                let mut sendable = len > VNET_HDR_LEN as u64 && len <= MAX_FRAME_LEN as u64;
                // A frame the metadata service may want is copied out of guest memory whole,
                // so the guest cannot change it between the check and its use; the others go
                // to the TAP straight from the guest's buffers.
                let mut copied = None;
                if let (true, Some(stack)) = (sendable, mmds.as_mut()) {
                    let mut peek = [0u8; MMDS_PEEK_LEN];
                    let peek = &mut peek[..usize::try_from(len).unwrap_or(0).min(MMDS_PEEK_LEN)];
                    sendable = read_prefix(mem, &bufs.readable, peek);
                    if sendable && stack.is_mmds_frame(&peek[VNET_HDR_LEN..]) {
                        match gather(mem, &bufs.readable, frame) {
                            Gather::Frame(n) => {
                                let eth = &frame[VNET_HDR_LEN..n];
                                if stack.is_mmds_frame(eth) {
                                    stack.detour(eth);
                                    return Handled::Used(0);
                                }
                                copied = Some(n);
                            }
                            Gather::Bad => sendable = false,
                        }
                    }
                }
                if sendable && copied.is_none() {
                    iov.clear();
                    sendable = guest_iovecs(mem, &bufs.readable, usize::MAX, iov).is_some();
                }
                // One op and the frame's bytes, header included (as Firecracker counts
                // them); a frame too broken to send costs nothing.
                if sendable && !limiter.consume_op(len) {
                    inc(&metrics.tx_rate_limiter_throttled);
                    return Handled::Deferred;
                }
                let written = match (sendable, copied) {
                    (false, _) => None,
                    (true, Some(n)) => Some(tap.write_frame(&frame[..n])),
                    // SAFETY: the iovecs were just built from guest memory's slices (each
                    // inside one mapped region, its plugged part for the hot-plug region),
                    // and nothing unmaps or unplugs guest memory while the event thread, which
                    // runs this, is busy here (see vstate::region).
                    (true, None) => Some(unsafe { tap.write_frame_from(iov.as_slice()) }),
                };
                let sent = match written {
                    Some(Ok(_)) => {
                        inc(&metrics.tx_frames);
                        add(&metrics.tx_bytes, len - VNET_HDR_LEN as u64);
                        true
                    }
                    Some(Err(e)) => {
                        guest_log!(
                            Level::Debug,
                            "virtio-net: TAP refused a {len}-byte frame: {e}"
                        );
                        false
                    }
                    None => false,
                };
                if !sent {
                    inc(&metrics.tx_dropped);
                }
                Handled::Used(0)
            },
        );
        if drained.is_err() {
            self.broken();
        }
    }

    /// Moves frames from the TAP into the guest's receive buffers, at most a queue's worth of
    /// frames per call. Returns whether the TAP should stay watched: false when the device is
    /// not active, when the guest has no buffer for the frame in hand (which is kept until the
    /// guest adds one and notifies the receive queue), or when the RX rate limiter holds the
    /// frame back (kept until the limiter's timer fires).
    pub fn process_rx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        if self.rx_rate_limiter.is_blocked() {
            return false;
        }
        let mut cx = RxCtx {
            mem: &active.mem,
            tap: &self.tap,
            metrics: &self.metrics,
            limiter: &mut self.rx_rate_limiter,
            mergeable: self.base.acked(VIRTIO_NET_F_MRG_RXBUF),
        };
        let queue = &mut active.rx;
        let rx = &mut self.rx;
        // Buffers added while frames flow need no notification; it is asked for only when
        // the device runs out.
        let _ = queue.disable_notification(cx.mem);
        let mut budget = queue.size();
        let mut used = false;
        let mut broken = false;
        let watch = loop {
            if budget == 0 {
                // The TAP stays readable: the event loop calls again after other work.
                // The metadata service has no descriptor to wake the loop: the RX
                // queue's event brings the device back for its frames.
                if self.mmds.as_ref().is_some_and(MmdsStack::has_output) {
                    let _ = self.base.queue_events[RX_QUEUE].write(1);
                }
                break true;
            }
            budget -= 1;
            // The metadata service's frames go first: they answer the guest's own.
            if rx.len == 0 {
                if let Some(n) = (self.mmds.as_mut())
                    .and_then(|m| m.write_next_frame(&mut rx.frame[VNET_HDR_LEN..]))
                {
                    rx.frame[..VNET_HDR_LEN].fill(0);
                    rx.len = VNET_HDR_LEN + n;
                }
            }
            let step = if rx.len == 0 {
                rx.receive(queue, &mut cx)
            } else {
                rx.deliver(queue, &mut cx)
            };
            match step {
                RxStep::Next { used: u } => used |= u,
                RxStep::Wait | RxStep::TapFailed => break false,
                RxStep::TapEmpty => break true,
                RxStep::Broken => {
                    broken = true;
                    break false;
                }
            }
        };
        if used && needs_interrupt(queue, cx.mem) {
            if let Err(e) = self.base.irq.trigger_queue(RX_QUEUE) {
                guest_log!(Level::Warn, "virtio-net: cannot raise interrupt: {e}");
            }
        }
        if broken {
            self.broken();
        }
        watch
    }
}

/// Copies a transmitted frame (header included) out of the guest's buffers.
fn gather(mem: &GuestMemoryMmap, bufs: &[GuestBuf], frame: &mut [u8]) -> Gather {
    let mut at = 0usize;
    for b in bufs {
        let len = b.len as usize;
        let Some(dst) = frame.get_mut(at..at.saturating_add(len)) else {
            return Gather::Bad; // larger than any frame
        };
        if mem.read_slice(dst, GuestAddress(b.addr)).is_err() {
            return Gather::Bad;
        }
        at += len;
    }
    if at <= VNET_HDR_LEN {
        return Gather::Bad;
    }
    Gather::Frame(at)
}

impl VirtioDevice for Net {
    fn base(&self) -> &VirtioBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        let got = queues.len();
        let mut queues = queues.into_iter();
        let (Some(mut rx), Some(mut tx), None) = (queues.next(), queues.next(), queues.next())
        else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        let event_idx = self.acked(VIRTIO_RING_F_EVENT_IDX);
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        if let Err(e) = self.tap.set_offload(self.tap_offloads()) {
            // A guest can re-activate the device as often as it likes.
            guest_log!(
                Level::Warn,
                "virtio-net: {e}; the guest gets fully checksummed frames"
            );
        }
        self.active = Some(Active { mem, rx, tx });
        self.base
            .activate_evt
            .write(1)
            .map_err(ActivateError::Signal)
    }

    fn reset(&mut self) {
        self.active = None;
        self.base.acked_features = 0;
        self.rx.len = 0;
    }

    fn active_queues(&self) -> Vec<&Queue> {
        self.active.iter().flat_map(|a| [&a.rx, &a.tx]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::INT_VRING;
    use std::fs::File;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const RX_RING: u64 = 0x1_0000;
    const TX_RING: u64 = 0x2_0000;
    const BUF: u64 = 0x4_0000;
    const SIZE: u16 = 16;

    fn mem() -> GuestMemoryMmap {
        crate::vstate::memory::anonymous(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// A frame with a zeroed virtio-net header and `payload_len` bytes of pattern `seed`.
    fn frame(payload_len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend((0..payload_len).map(|i| seed.wrapping_add(i.to_le_bytes()[0])));
        f
    }

    /// A device activated on two mock queues, and the host end of its stand-in TAP.
    struct Rig<'a> {
        mem: &'a GuestMemoryMmap,
        rx: MockSplitQueue<'a, GuestMemoryMmap>,
        tx: MockSplitQueue<'a, GuestMemoryMmap>,
        net: Net,
        host: UnixDatagram,
    }

    impl<'a> Rig<'a> {
        fn new(mem: &'a GuestMemoryMmap) -> Self {
            let (dev_end, host) = UnixDatagram::pair().unwrap();
            dev_end.set_nonblocking(true).unwrap();
            host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let tap = Tap::from_file(File::from(OwnedFd::from(dev_end)), "test0");
            let mut net = Net::with_tap(tap, Some([6, 0, 0, 0, 0, 1])).unwrap();
            let rx = MockSplitQueue::create(mem, GuestAddress(RX_RING), SIZE);
            let tx = MockSplitQueue::create(mem, GuestAddress(TX_RING), SIZE);
            net.set_acked_features(1 << VIRTIO_F_VERSION_1);
            let queues = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
            net.activate(mem.clone(), queues).unwrap();
            Rig {
                mem,
                rx,
                tx,
                net,
                host,
            }
        }

        /// The used element `i` of a queue: (head, length).
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

        /// Puts `data` in guest memory at `addr` and queues it for transmission as one chain.
        fn send(&self, descs: &[RawDescriptor], offset: u16) {
            self.tx.add_desc_chains(descs, offset).unwrap();
        }
    }

    #[test]
    fn transmit_reaches_the_tap_whole() {
        let m = mem();
        let mut rig = Rig::new(&m);
        let f = frame(1000, 7);
        m.write_slice(&f, GuestAddress(BUF)).unwrap();
        // Header and payload in separate descriptors, as Linux sends them.
        rig.send(&[desc(BUF, 12, F_NEXT, 1), desc(BUF + 12, 1000, 0, 0)], 0);
        rig.net.process_tx();
        let mut got = vec![0u8; 4096];
        let n = rig.host.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..]);
        assert_eq!(rig.used(&rig.tx, 0), (0, 0));
        assert_eq!(rig.net.interrupt().status(), INT_VRING);
        assert_eq!(rig.net.counters().tx_frames, 1);
        assert_eq!(rig.net.counters().tx_bytes, 1000);

        // A driver that polls sets VRING_AVAIL_F_NO_INTERRUPT: no interrupt then.
        rig.net.interrupt().ack(INT_VRING);
        m.write_obj(1u16, rig.tx.avail_addr()).unwrap();
        rig.send(&[desc(BUF, 1012, 0, 0)], 2);
        rig.net.process_tx();
        assert_eq!(rig.net.counters().tx_frames, 2);
        assert_eq!(rig.net.interrupt().status(), 0);
    }

    /// A buffer that runs from one region of guest memory into the next goes out whole (one
    /// iovec per region); one that runs past the end of guest memory is dropped.
    #[test]
    fn transmit_spans_regions() {
        let m = crate::vstate::memory::anonymous(&[
            (GuestAddress(0), 0x20_0000),
            (GuestAddress(0x20_0000), 0x1000),
        ])
        .unwrap();
        let mut rig = Rig::new(&m);
        let f = frame(1000, 3);
        let at = 0x20_0000 - 500;
        m.write_slice(&f, GuestAddress(at)).unwrap();
        rig.send(&[desc(at, 1012, 0, 0)], 0);
        rig.send(&[desc(0x20_1000 - 500, 1012, 0, 0)], 1);
        rig.net.process_tx();
        let mut got = vec![0u8; 4096];
        let n = rig.host.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..]);
        assert_eq!(rig.used_idx(&rig.tx), 2);
        assert_eq!(rig.net.counters().tx_frames, 1);
        assert_eq!(rig.net.counters().tx_dropped, 1);
    }

    #[test]
    fn hostile_transmit_chains_are_dropped_and_returned() {
        let m = mem();
        let mut rig = Rig::new(&m);
        let f = frame(100, 1);
        m.write_slice(&f, GuestAddress(BUF)).unwrap();
        // Writable buffer in a TX chain; outside guest memory; a length that overflows;
        // larger than any frame; header only; a chain looping 2 -> 3 -> 2.
        rig.send(&[desc(BUF, 112, F_WRITE, 0)], 0);
        rig.send(&[desc(0xffff_0000_0000, 112, 0, 0)], 1);
        rig.send(
            &[desc(BUF, 12, F_NEXT, 3), desc(u64::MAX - 4, 100, 0, 0)],
            2,
        );
        rig.send(&[desc(BUF, u32::MAX, 0, 0)], 4);
        rig.send(&[desc(BUF, 12, 0, 0)], 5);
        rig.send(&[desc(BUF, 12, F_NEXT, 7), desc(BUF, 100, F_NEXT, 6)], 6);
        rig.net.process_tx();
        assert_eq!(rig.used_idx(&rig.tx), 6, "every chain returned");
        assert_eq!(rig.net.counters().tx_dropped, 6);
        assert_eq!(rig.net.counters().tx_frames, 0);
        let mut buf = [0u8; 64];
        rig.host.set_nonblocking(true).unwrap();
        assert!(rig.host.recv(&mut buf).is_err(), "nothing reached the TAP");
    }

    #[test]
    fn receive_fills_the_guest_buffer_and_sets_num_buffers() {
        let m = mem();
        let mut rig = Rig::new(&m);
        let f = frame(1500, 9);
        rig.host.send(&f).unwrap();
        rig.rx
            .add_desc_chains(&[desc(BUF, 2048, F_WRITE, 0)], 0)
            .unwrap();
        assert!(rig.net.process_rx(), "TAP stays watched");
        assert_eq!(rig.used(&rig.rx, 0), (0, 1512));
        let mut got = vec![0u8; 1512];
        m.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(&got[10..12], &[1, 0], "num_buffers");
        assert_eq!(&got[12..], &f[12..]);
        assert_eq!(rig.net.interrupt().status(), INT_VRING);
    }

    /// With MRG_RXBUF, a frame longer than one chain spreads over as many as it needs, the
    /// first header saying how many; a frame that fits one goes straight in; a frame for which
    /// the ring has too few buffers waits for more.
    #[test]
    fn mergeable_receive_spreads_a_frame_over_chains() {
        let m = mem();
        let mut rig = Rig::new(&m);
        rig.net
            .set_acked_features((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF));
        let big = frame(2988, 4);
        let small = frame(500, 5);
        rig.host.send(&big).unwrap();
        rig.host.send(&small).unwrap();
        rig.host.send(&big).unwrap();
        // 1024-byte chains, the second of two descriptors.
        for i in 0..5u16 {
            let at = BUF + u64::from(i) * 4096;
            rig.rx
                .add_desc_chains(
                    &[
                        desc(at, 12, F_WRITE | F_NEXT, 2 * i + 1),
                        desc(at + 12, 1012, F_WRITE, 0),
                    ],
                    2 * i,
                )
                .unwrap();
        }
        assert!(!rig.net.process_rx(), "the third frame waits for buffers");
        assert_eq!(rig.used_idx(&rig.rx), 4);
        let lens: Vec<u32> = (0..4).map(|i| rig.used(&rig.rx, i).1).collect();
        assert_eq!(lens, [1024, 1024, 952, 512]);
        let mut got = Vec::new();
        for (i, &len) in (0..3u64).zip(&lens) {
            let mut part = vec![0u8; len as usize];
            m.read_slice(&mut part, GuestAddress(BUF + i * 4096))
                .unwrap();
            got.extend(part);
        }
        assert_eq!(&got[10..12], &[3, 0], "num_buffers");
        assert_eq!(&got[12..], &big[12..]);
        let mut got = vec![0u8; 512];
        m.read_slice(&mut got, GuestAddress(BUF + 3 * 4096))
            .unwrap();
        assert_eq!(&got[10..12], &[1, 0], "num_buffers");
        assert_eq!(&got[12..], &small[12..]);
        // Two more chains, and the held frame arrives whole.
        for i in 5..7u16 {
            let at = BUF + u64::from(i) * 4096;
            rig.rx
                .add_desc_chains(&[desc(at, 1024, F_WRITE, 0)], 10 + i - 5)
                .unwrap();
        }
        assert!(rig.net.process_rx());
        assert_eq!(rig.used_idx(&rig.rx), 7);
        let mut got = Vec::new();
        for i in 4..7u64 {
            let (_, len) = rig.used(&rig.rx, i);
            let mut part = vec![0u8; len as usize];
            m.read_slice(&mut part, GuestAddress(BUF + i * 4096))
                .unwrap();
            got.extend(part);
        }
        assert_eq!(&got[10..12], &[3, 0], "num_buffers");
        assert_eq!(&got[12..], &big[12..]);
        assert_eq!(rig.net.counters().rx_frames, 3);
        assert_eq!(rig.net.counters().rx_dropped, 0);
    }

    /// With MRG_RXBUF, a broken chain among those a frame spreads over gives every chain taken
    /// for it back empty and drops the frame; the next frame takes the next chain.
    #[test]
    fn mergeable_receive_with_a_broken_chain_drops_the_frame() {
        let m = mem();
        let mut rig = Rig::new(&m);
        rig.net
            .set_acked_features((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF));
        rig.host.send(&frame(288, 1)).unwrap();
        rig.host.send(&frame(100, 2)).unwrap();
        rig.rx
            .add_desc_chains(
                &[
                    desc(BUF, 128, F_WRITE, 0),
                    desc(0xffff_0000_0000, 128, F_WRITE, 0),
                    desc(BUF + 4096, 128, F_WRITE, 0),
                ],
                0,
            )
            .unwrap();
        rig.net.process_rx();
        assert_eq!(rig.used_idx(&rig.rx), 3);
        assert_eq!(rig.used(&rig.rx, 0), (0, 0));
        assert_eq!(rig.used(&rig.rx, 1), (1, 0));
        assert_eq!(rig.used(&rig.rx, 2), (2, 112));
        let mut got = vec![0u8; 112];
        m.read_slice(&mut got, GuestAddress(BUF + 4096)).unwrap();
        assert_eq!(&got[10..12], &[1, 0]);
        assert_eq!(&got[12..], &frame(100, 2)[12..]);
        assert_eq!(rig.net.counters().rx_dropped, 1);
        assert_eq!(rig.net.counters().rx_frames, 1);
    }

    /// Frames read straight into guest memory count as written for diff snapshots.
    #[test]
    fn received_pages_are_marked_dirty() {
        let layout = [crate::vstate::memory::MemoryRegionState {
            base: 0,
            size: 0x20_0000,
            offset: 0,
        }];
        let m = crate::vstate::memory::memory_anonymous(&layout, true).unwrap();
        let mut rig = Rig::new(&m);
        rig.host.send(&frame(5000, 1)).unwrap();
        rig.rx
            .add_desc_chains(&[desc(BUF + 0x1000, 0x3000, F_WRITE, 0)], 0)
            .unwrap();
        rig.net.process_rx();
        assert_eq!(rig.used(&rig.rx, 0), (0, 5012));
        let region = m.find_region(GuestAddress(0)).unwrap();
        let page = |addr: u64| region.bitmap().dirty_at(usize::try_from(addr).unwrap());
        assert!(page(BUF + 0x1000) && page(BUF + 0x2000));
        assert!(!page(BUF) && !page(BUF + 0x3000));
    }

    #[test]
    fn full_receive_queue_holds_frames_back_instead_of_dropping() {
        let m = mem();
        let mut rig = Rig::new(&m);
        for seed in 0..3 {
            rig.host.send(&frame(200, seed)).unwrap();
        }
        // One buffer for three frames: one delivered, the rest wait in the TAP.
        rig.rx
            .add_desc_chains(&[desc(BUF, 2048, F_WRITE, 0)], 0)
            .unwrap();
        assert!(!rig.net.process_rx(), "stop watching the TAP");
        assert_eq!(rig.used_idx(&rig.rx), 1);
        // The guest adds two buffers and notifies the RX queue.
        rig.rx
            .add_desc_chains(
                &[
                    desc(BUF + 4096, 2048, F_WRITE, 0),
                    desc(BUF + 8192, 2048, F_WRITE, 0),
                ],
                1,
            )
            .unwrap();
        assert!(rig.net.process_rx());
        assert_eq!(rig.used_idx(&rig.rx), 3);
        for (i, at) in [BUF, BUF + 4096, BUF + 8192].into_iter().enumerate() {
            let mut got = vec![0u8; 212];
            m.read_slice(&mut got, GuestAddress(at)).unwrap();
            let seed = u8::try_from(i).unwrap();
            assert_eq!(&got[12..], &frame(200, seed)[12..], "frame {i} in order");
        }
        assert_eq!(rig.net.counters().rx_dropped, 0);
    }

    #[test]
    fn hostile_receive_chains_do_not_get_the_frame() {
        let m = mem();
        let mut rig = Rig::new(&m);
        let guard = [0x5au8; 64];
        m.write_slice(&guard, GuestAddress(BUF)).unwrap();
        // Readable buffer; outside guest memory; too small (kept for the next frame).
        rig.host.send(&frame(100, 1)).unwrap();
        rig.rx.add_desc_chains(&[desc(BUF, 2048, 0, 0)], 0).unwrap();
        rig.host.send(&frame(100, 2)).unwrap();
        rig.rx
            .add_desc_chains(&[desc(0xffff_0000_0000, 2048, F_WRITE, 0)], 1)
            .unwrap();
        rig.host.send(&frame(100, 3)).unwrap();
        rig.rx
            .add_desc_chains(&[desc(BUF + 4096, 60, F_WRITE, 0)], 2)
            .unwrap();
        rig.host.send(&frame(20, 4)).unwrap();
        rig.net.process_rx();
        let mut got = [0u8; 64];
        m.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(got, guard, "readable buffer untouched");
        assert_eq!(rig.used(&rig.rx, 0), (0, 0));
        assert_eq!(rig.used(&rig.rx, 1), (1, 0));
        // The 60-byte buffer skipped the 112-byte frame and took the 32-byte one.
        assert_eq!(rig.used(&rig.rx, 2), (2, 32));
        assert_eq!(rig.net.counters().rx_dropped, 3);
        assert_eq!(rig.net.counters().rx_frames, 1);
    }

    #[test]
    fn tap_readiness_drives_receive_through_the_event_loop() {
        let m = mem();
        let rig = Rig::new(&m);
        let host = rig.host.try_clone().unwrap();
        let rx = rig.rx;
        let net = Arc::new(Mutex::new(rig.net));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(net.clone());
        // Activation was signalled: the loop registers the queues and the TAP.
        em.run_with_timeout(100).unwrap();
        assert!(net.lock().unwrap().tap_watched);
        host.send(&frame(64, 5)).unwrap();
        // No buffer yet: the TAP leaves the loop rather than waking it forever.
        em.run_with_timeout(100).unwrap();
        assert!(!net.lock().unwrap().tap_watched);
        assert_eq!(em.run_with_timeout(50).unwrap(), 0, "no busy wake-ups");
        // A buffer and a notification: the frame arrives and the TAP is watched again.
        rx.add_desc_chains(&[desc(BUF, 2048, F_WRITE, 0)], 0)
            .unwrap();
        net.lock().unwrap().base.queue_events[RX_QUEUE]
            .write(1)
            .unwrap();
        em.run_with_timeout(100).unwrap();
        let dev = net.lock().unwrap();
        assert_eq!(dev.counters().rx_frames, 1);
        assert!(dev.tap_watched);
    }

    /// `size` ops per `refill_ms`, no bandwidth limit.
    fn ops_limit(size: u64, refill_ms: u64) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: None,
            ops: Some(crate::config::TokenBucketConfig {
                size,
                one_time_burst: None,
                refill_time: refill_ms,
            }),
        }
    }

    /// Frames beyond the TX ops budget (2, then one per 100 ms) stay on the queue, unread,
    /// until the limiter's timer fires on the event loop; then they go, in order, no sooner
    /// than the budget allows.
    #[test]
    fn transmit_beyond_the_ops_budget_waits_for_the_timer() {
        let m = mem();
        let mut rig = Rig::new(&m);
        let start = Instant::now();
        rig.net
            .update_rate_limiters(None, Some(&ops_limit(2, 200)))
            .unwrap();
        for i in 0..4u16 {
            let at = BUF + u64::from(i) * 2048;
            m.write_slice(&frame(100, u8::try_from(i).unwrap()), GuestAddress(at))
                .unwrap();
            rig.send(&[desc(at, 112, 0, 0)], i);
        }
        let host = rig.host.try_clone().unwrap();
        host.set_nonblocking(true).unwrap();
        let used = |mem: &GuestMemoryMmap| -> u16 {
            mem.read_obj(GuestAddress(rig.tx.used_addr().0 + 2))
                .unwrap()
        };
        let net = Arc::new(Mutex::new(rig.net));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(net.clone());
        // Activation: the first two frames go, the third is put back.
        em.run_with_timeout(100).unwrap();
        let mut got = [0u8; 256];
        for seed in 0..2 {
            let n = host.recv(&mut got).unwrap();
            assert_eq!(&got[..n], &frame(100, seed)[..]);
        }
        assert!(host.recv(&mut got).is_err(), "the third frame waits");
        assert_eq!(used(&m), 2);
        assert!(net.lock().unwrap().tx_rate_limiter.is_blocked());
        assert_eq!(
            net.lock().unwrap().metrics().to_json()["tx_rate_limiter_throttled"],
            1
        );
        // The timer brings the rest, one per refill.
        while net.lock().unwrap().counters().tx_frames < 4 {
            assert!(start.elapsed() < Duration::from_secs(5), "TX stalled");
            em.run_with_timeout(100).unwrap();
        }
        assert!(
            start.elapsed() >= Duration::from_millis(200),
            "{:?}",
            start.elapsed()
        );
        for seed in 2..4 {
            let n = host.recv(&mut got).unwrap();
            assert_eq!(&got[..n], &frame(100, seed)[..]);
        }
        assert_eq!(used(&m), 4);
    }

    /// A frame held back for an hour goes as soon as a PATCH lifts the limit: the update
    /// wakes the device's event handling through the limiter's timer.
    #[test]
    fn an_update_wakes_a_throttled_queue() {
        let m = mem();
        let mut rig = Rig::new(&m);
        rig.net
            .update_rate_limiters(None, Some(&ops_limit(1, 3_600_000)))
            .unwrap();
        for i in 0..2u16 {
            let at = BUF + u64::from(i) * 2048;
            m.write_slice(&frame(100, u8::try_from(i).unwrap()), GuestAddress(at))
                .unwrap();
            rig.send(&[desc(at, 112, 0, 0)], i);
        }
        let net = Arc::new(Mutex::new(rig.net));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(net.clone());
        em.run_with_timeout(100).unwrap();
        assert_eq!(net.lock().unwrap().counters().tx_frames, 1);
        assert_eq!(
            em.run_with_timeout(50).unwrap(),
            0,
            "nothing to do for an hour"
        );
        net.lock()
            .unwrap()
            .update_rate_limiters(None, Some(&ops_limit(0, 0)))
            .unwrap();
        assert_eq!(net.lock().unwrap().rate_limiters(), (None, None));
        em.run_with_timeout(1000).unwrap();
        assert_eq!(net.lock().unwrap().counters().tx_frames, 2);
    }

    /// Frames beyond the RX ops budget stay in the TAP (which is not watched meanwhile, so
    /// the loop does not spin) until the limiter's timer fires.
    #[test]
    fn receive_beyond_the_ops_budget_waits_for_the_timer() {
        let m = mem();
        let mut rig = Rig::new(&m);
        let start = Instant::now();
        rig.net
            .update_rate_limiters(Some(&ops_limit(1, 100)), None)
            .unwrap();
        for seed in 0..3 {
            rig.host.send(&frame(200, seed)).unwrap();
        }
        for i in 0..3u16 {
            let at = BUF + u64::from(i) * 4096;
            rig.rx
                .add_desc_chains(&[desc(at, 2048, F_WRITE, 0)], i)
                .unwrap();
        }
        let net = Arc::new(Mutex::new(rig.net));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(net.clone());
        em.run_with_timeout(100).unwrap();
        {
            let dev = net.lock().unwrap();
            assert_eq!(dev.counters().rx_frames, 1);
            assert!(!dev.tap_watched, "a throttled receive leaves the TAP alone");
        }
        while net.lock().unwrap().counters().rx_frames < 3 {
            assert!(start.elapsed() < Duration::from_secs(5), "RX stalled");
            em.run_with_timeout(100).unwrap();
        }
        assert!(
            start.elapsed() >= Duration::from_millis(200),
            "{:?}",
            start.elapsed()
        );
        for (i, seed) in (0..3u8).enumerate() {
            let mut got = vec![0u8; 212];
            m.read_slice(&mut got, GuestAddress(BUF + 4096 * i as u64))
                .unwrap();
            assert_eq!(&got[12..], &frame(200, seed)[12..], "frame {i} in order");
        }
        let dev = net.lock().unwrap();
        assert_eq!(dev.counters().rx_dropped, 0);
        assert!(dev.tap_watched, "watched again once the frames flow");
    }

    #[test]
    fn offloads_follow_the_accepted_features() {
        let m = mem();
        let mut rig = Rig::new(&m);
        let all = rig.net.avail_features();
        rig.net.set_acked_features(all);
        assert_eq!(
            rig.net.tap_offloads(),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
        // TSO without checksum offload is not a valid combination for the TAP.
        rig.net
            .set_acked_features(all & !(1 << VIRTIO_NET_F_GUEST_CSUM));
        assert_eq!(rig.net.tap_offloads(), 0);
        let mut mac = [0u8; 6];
        rig.net.config_space().read(0, &mut mac);
        assert_eq!(mac, [6, 0, 0, 0, 0, 1]);
    }

    const MMDS_IP: [u8; 4] = [169, 254, 169, 254];

    /// A frame from the guest (zeroed virtio-net header): an ARP request for `tpa`.
    fn arp_request(tpa: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&[6, 0, 0, 0, 0, 1, 8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&[6, 0, 0, 0, 0, 1, 10, 0, 0, 2, 0, 0, 0, 0, 0, 0]);
        f.extend_from_slice(&tpa);
        f
    }

    /// A frame from the guest: a TCP SYN from port `port` to the service.
    fn syn_to_mmds(port: u16) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&[6, 1, 0x23, 0x45, 0x67, 1, 6, 0, 0, 0, 0, 1, 8, 0]);
        f.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 2]);
        f.extend_from_slice(&MMDS_IP);
        f.extend_from_slice(&port.to_be_bytes());
        f.extend_from_slice(&[
            0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 2, 0xff, 0xff, 0, 0, 0, 0,
        ]);
        f
    }

    fn with_mmds(rig: &mut Rig<'_>) {
        let store = crate::mmds::MmdsStore::default();
        rig.net
            .set_mmds(Some(MmdsStack::new(MMDS_IP.into(), store)));
    }

    /// What the guest got in RX buffer `i` (at BUF + i * 4096), Ethernet part only.
    fn received(rig: &Rig<'_>, i: u64) -> Vec<u8> {
        let (_, len) = rig.used(&rig.rx, i);
        let mut got = vec![0u8; len as usize];
        rig.mem
            .read_slice(&mut got, GuestAddress(BUF + i * 4096))
            .unwrap();
        assert_eq!(&got[..10], &[0; 10], "a plain virtio-net header");
        got.split_off(VNET_HDR_LEN)
    }

    /// ARP and TCP for the metadata service are taken from the TX queue without a token of the
    /// TX limiter and never reach the TAP; the service's answers reach the guest ahead of a
    /// frame already waiting in the TAP.
    #[test]
    fn metadata_service_frames_stay_off_the_tap_and_answer_first() {
        let m = mem();
        let mut rig = Rig::new(&m);
        with_mmds(&mut rig);
        rig.net
            .update_rate_limiters(None, Some(&ops_limit(1, 3_600_000)))
            .unwrap();
        let frames = [
            arp_request(MMDS_IP),
            syn_to_mmds(40000),
            frame(100, 1),
            frame(100, 2),
        ];
        for (i, f) in (0u16..).zip(&frames) {
            let at = BUF + u64::from(i) * 2048;
            m.write_slice(f, GuestAddress(at)).unwrap();
            rig.send(&[desc(at, u32::try_from(f.len()).unwrap(), 0, 0)], i);
        }
        rig.host.send(&frame(200, 9)).unwrap();
        rig.net.process_tx();
        assert!(rig.net.mmds_has_output());
        // The one token went to the first TAP frame; the service's frames needed none.
        assert_eq!(
            rig.used_idx(&rig.tx),
            3,
            "the last frame waits for the limiter"
        );
        let mut got = [0u8; 256];
        rig.host.set_nonblocking(true).unwrap();
        let n = rig.host.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &frames[2][..]);
        assert!(
            rig.host.recv(&mut got).is_err(),
            "nothing else reached the TAP"
        );

        for i in 0..3u16 {
            let at = BUF + u64::from(i) * 4096;
            rig.rx
                .add_desc_chains(&[desc(at, 2048, F_WRITE, 0)], i)
                .unwrap();
        }
        rig.net.process_rx();
        assert_eq!(rig.used_idx(&rig.rx), 3);
        let arp = received(&rig, 0);
        assert_eq!(&arp[12..14], &[8, 6]);
        assert_eq!(&arp[14 + 28 - 4..14 + 28], &[10, 0, 0, 2], "to the asker");
        let synack = received(&rig, 1);
        assert_eq!((&synack[12..14], synack[14 + 9]), (&[8, 0][..], 6));
        assert_eq!(synack[14 + 20 + 13], 0x12, "SYN-ACK");
        assert_eq!(&received(&rig, 2)[..], &frame(200, 9)[VNET_HDR_LEN..]);
        assert!(!rig.net.mmds_has_output());
    }

    /// Through the event loop: the guest's TX notification alone brings the service's answer
    /// into its receive buffer (the TAP has nothing to wake the loop).
    #[test]
    fn the_tx_notification_delivers_the_answer() {
        let m = mem();
        let mut rig = Rig::new(&m);
        with_mmds(&mut rig);
        let rx = rig.rx;
        let tx = rig.tx;
        let req = arp_request(MMDS_IP);
        m.write_slice(&req, GuestAddress(BUF + 0x8000)).unwrap();
        let net = Arc::new(Mutex::new(rig.net));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(net.clone());
        em.run_with_timeout(100).unwrap();
        rx.add_desc_chains(&[desc(BUF, 2048, F_WRITE, 0)], 0)
            .unwrap();
        tx.add_desc_chains(&[desc(BUF + 0x8000, 54, 0, 0)], 0)
            .unwrap();
        net.lock().unwrap().base.queue_events[TX_QUEUE]
            .write(1)
            .unwrap();
        em.run_with_timeout(100).unwrap();
        let dev = net.lock().unwrap();
        assert_eq!(dev.counters().rx_frames, 1);
        assert_eq!(dev.counters().tx_frames, 0);
        let mut got = [0u8; 72];
        m.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(
            &got[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12],
            &crate::mmds::stack::MMDS_MAC
        );
    }

    /// A queue of SIZE entries with its rings at `base`, `base + 0x1000`, `base + 0x2000`
    /// (the mock queue's used ring overlaps the upper half of its available ring, so a test
    /// that goes round the ring lays out its own).
    fn spaced_queue(base: u64) -> Queue {
        let mut q = Queue::new(SIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(base)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(base + 0x1000))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(base + 0x2000))
            .unwrap();
        q.set_ready(true);
        q
    }

    /// Makes `d` available on the queue at `base` in the next ring slot, wrapping around.
    fn publish(m: &GuestMemoryMmap, base: u64, d: RawDescriptor) {
        let idx: u16 = m.read_obj(GuestAddress(base + 0x1002)).unwrap();
        let slot = idx % SIZE;
        m.write_obj(d, GuestAddress(base + 16 * u64::from(slot)))
            .unwrap();
        m.write_obj(slot, GuestAddress(base + 0x1004 + 2 * u64::from(slot)))
            .unwrap();
        m.write_obj(idx.wrapping_add(1), GuestAddress(base + 0x1002))
            .unwrap();
    }

    fn spaced_used_idx(m: &GuestMemoryMmap, base: u64) -> u16 {
        m.read_obj(GuestAddress(base + 0x2002)).unwrap()
    }

    /// A flood of SYNs from 1000 ports and broken frames for the service: every chain comes
    /// back, nothing reaches the TAP, and what the service answers stays bounded (30
    /// connections' SYN-ACKs and at most 100 resets).
    #[test]
    fn a_flood_for_the_service_stays_bounded() {
        const RXQ: u64 = 0x10_0000;
        const TXQ: u64 = 0x11_0000;
        let m = mem();
        let (dev_end, host) = UnixDatagram::pair().unwrap();
        dev_end.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        let tap = Tap::from_file(File::from(OwnedFd::from(dev_end)), "test0");
        let mut net = Net::with_tap(tap, None).unwrap();
        net.set_acked_features(1 << VIRTIO_F_VERSION_1);
        net.activate(m.clone(), vec![spaced_queue(RXQ), spaced_queue(TXQ)])
            .unwrap();
        let store = crate::mmds::MmdsStore::default();
        net.set_mmds(Some(MmdsStack::new(MMDS_IP.into(), store)));
        let mut broken = syn_to_mmds(1);
        broken[VNET_HDR_LEN + 14 + 2..VNET_HDR_LEN + 14 + 4].copy_from_slice(&[0xff, 0xff]);
        let mut sent = 0u16;
        for batch in 0..(1000 / SIZE) {
            for k in 0..SIZE {
                let port = 1000 + batch * SIZE + k;
                let f = if k % 4 == 0 {
                    broken.clone()
                } else {
                    syn_to_mmds(port)
                };
                let at = BUF + u64::from(k) * 128;
                m.write_slice(&f, GuestAddress(at)).unwrap();
                publish(&m, TXQ, desc(at, u32::try_from(f.len()).unwrap(), 0, 0));
                sent += 1;
            }
            net.process_tx();
            assert_eq!(spaced_used_idx(&m, TXQ), sent, "every chain came back");
        }
        let mut got = [0u8; 64];
        assert!(host.recv(&mut got).is_err(), "nothing reached the TAP");
        assert_eq!(net.counters().tx_dropped, 0);
        while net.mmds_has_output() {
            for k in 0..SIZE {
                publish(&m, RXQ, desc(BUF + u64::from(k) * 4096, 2048, F_WRITE, 0));
            }
            net.process_rx();
            let answers = spaced_used_idx(&m, RXQ);
            assert!(answers <= 130, "{answers} answers");
        }
        assert!(spaced_used_idx(&m, RXQ) >= 30);
        let mmds = net.mmds().unwrap();
        assert_eq!(mmds.ipv4(), std::net::Ipv4Addr::from(MMDS_IP));
    }
}
