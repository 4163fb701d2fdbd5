//! Virtio devices over the MMIO (virtio 1.2, 4.2) and PCI (4.1) transports: the device trait
//! every device implements, its interrupt, and the constants shared by transports and devices.

pub mod balloon;
pub mod block;
pub mod mem;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod pmem;
pub mod rng;
pub mod vsock;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use log::Level;
use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemoryMmap;

pub use mmio::MmioTransport;

/// Feature bit: the device complies with virtio 1.x (virtio 1.2, 6).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: used_event / avail_event notification suppression (virtio 1.2, 2.7.10).
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: queues may be used.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bit: a used buffer was added to a queue (virtio 1.2, 4.2.2).
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// What a device signals to its driver: buffers used on a queue, or a configuration change
/// (virtio 1.2, 2.3 and 4.1.4.5: with MSI-X each has its own vector).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptSource {
    /// The device used buffers of this queue.
    Queue(u16),
    /// The configuration changed (or the device needs a reset).
    Config,
}

/// How a transport that gives each source its own message delivers a device's interrupts
/// (virtio-pci with MSI-X); without one the [`IrqTrigger`]'s single line is raised.
pub trait InterruptDelivery: Send + Sync + std::fmt::Debug {
    /// Raises the interrupt `source` is routed to (or records it as pending while masked).
    fn deliver(&self, source: InterruptSource) -> io::Result<()>;
}

/// A device's interrupt: the status bits the driver reads and acknowledges through the
/// transport (the MMIO InterruptStatus, the PCI ISR), whether the device needs a reset, and
/// how the guest hears of it: the MMIO transport's irqfd line, or the delivery a virtio-pci
/// transport installs. Shared between the device (event thread) and its transport (vCPU
/// threads) outside the device's lock.
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    needs_reset: AtomicBool,
    evt: EventFd,
    delivery: OnceLock<Arc<dyn InterruptDelivery>>,
}

impl IrqTrigger {
    /// A trigger whose eventfd the device manager registers as an irqfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            delivery: OnceLock::new(),
        })
    }

    /// Hands delivery to a transport with a message per source (once, when the device is put
    /// behind a virtio-pci transport); the line eventfd is then never raised.
    pub fn set_delivery(&self, delivery: Arc<dyn InterruptDelivery>) {
        let _ = self.delivery.set(delivery);
    }

    fn raise(&self, bit: u32, source: InterruptSource) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        match self.delivery.get() {
            Some(delivery) => delivery.deliver(source),
            None => self.evt.write(1),
        }
    }

    /// The device used buffers of queue `index`.
    pub fn trigger_queue(&self, index: usize) -> io::Result<()> {
        let queue = u16::try_from(index).unwrap_or(u16::MAX);
        self.raise(INT_VRING, InterruptSource::Queue(queue))
    }

    /// The device's configuration changed.
    pub fn trigger_config(&self) -> io::Result<()> {
        self.raise(INT_CONFIG, InterruptSource::Config)
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The device hit an error it cannot recover from without a reset: DEVICE_NEEDS_RESET shows
    /// in the status register and the driver gets a configuration interrupt (virtio 1.2, 2.1.2).
    pub fn signal_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            if let Err(e) = self.trigger_config() {
                crate::guest_log!(log::Level::Warn, "virtio: cannot raise interrupt: {e}");
            }
        }
    }

    /// Whether DEVICE_NEEDS_RESET is set.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Sets the status bits and reset flag a snapshot recorded, without raising the IRQ (the
    /// interrupt controllers' own state says whether it is pending).
    pub fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }

    /// Clears every bit (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// The eventfd to register as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// A device's configuration space (virtio 1.2, 4.2.2: from offset 0x100 of its window), shared
/// with its transport so that the driver's reads and writes never wait on the device's lock.
/// The driver may write only the bytes in `writable`; the device changes it with
/// [`ConfigSpace::update`], which moves the generation the driver checks (virtio 1.2, 2.5.1).
#[derive(Debug)]
pub struct ConfigSpace {
    bytes: Mutex<Vec<u8>>,
    writable: std::ops::Range<usize>,
    generation: AtomicU32,
}

impl ConfigSpace {
    /// A space holding `bytes`, of which the driver may write `writable`.
    pub fn new(bytes: Vec<u8>, writable: std::ops::Range<usize>) -> Self {
        Self {
            bytes: Mutex::new(bytes),
            writable,
            generation: AtomicU32::new(0),
        }
    }

    fn bytes(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Copies `offset..` into `data`; what lies past the end reads as zeros.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let bytes = self.bytes();
        let Some(src) = usize::try_from(offset).ok().and_then(|o| bytes.get(o..)) else {
            return;
        };
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }

    /// A driver's write: taken only when it lies wholly in the writable bytes.
    pub fn write(&self, offset: u64, data: &[u8]) -> bool {
        let Some(range) = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(data.len())?))
            .filter(|r| self.writable.start <= r.start && r.end <= self.writable.end)
        else {
            return false;
        };
        self.bytes()[range].copy_from_slice(data);
        true
    }

    /// The device changes its configuration.
    pub fn update(&self, change: impl FnOnce(&mut [u8])) {
        change(&mut self.bytes());
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The configuration generation.
    pub fn generation(&self) -> u32 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The whole space, for a snapshot.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes().clone()
    }

    /// Puts back what [`ConfigSpace::snapshot`] saved, where it has this space's size.
    pub fn restore(&self, saved: &[u8], generation: u32) {
        let mut bytes = self.bytes();
        if saved.len() == bytes.len() {
            bytes.copy_from_slice(saved);
        }
        self.generation.store(generation, Ordering::SeqCst);
    }
}

/// A virtqueue's position and layout (virtio-queue's `QueueState`), as a snapshot holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// The next available-ring entry the device takes.
    pub next_avail: u16,
    /// The next used-ring entry the device fills.
    pub next_used: u16,
    /// Whether EVENT_IDX was negotiated.
    pub event_idx_enabled: bool,
    /// The size the driver chose.
    pub size: u16,
    /// Whether the driver made the queue ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
}

impl From<&Queue> for QueueSnapshot {
    fn from(q: &Queue) -> Self {
        let s = q.state();
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl QueueSnapshot {
    /// The queue again, refused when its numbers break virtio-queue's rules (a size that is
    /// not a power of two or above the maximum, misaligned rings).
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// What every virtio device's snapshot holds beside its own state: features, the interrupt
/// status and configuration space (shared with the transport), and the queues it was working
/// on (none unless the driver had it running).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    /// Features offered.
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The interrupt status register.
    pub interrupt_status: u32,
    /// Whether DEVICE_NEEDS_RESET was set.
    pub needs_reset: bool,
    /// The configuration space.
    pub config: Vec<u8>,
    /// Its generation.
    pub config_generation: u32,
    /// The queues of an active device, in order.
    pub queues: Vec<QueueSnapshot>,
}

impl VirtioBase {
    /// The common part of a device's snapshot; `queues` are those of an active device.
    pub fn save(&self, queues: &[&Queue]) -> VirtioState {
        VirtioState {
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            interrupt_status: self.irq.status(),
            needs_reset: self.irq.needs_reset(),
            config: self.config.snapshot(),
            config_generation: self.config.generation(),
            queues: queues.iter().map(|&q| QueueSnapshot::from(q)).collect(),
        }
    }

    /// Puts back the features, interrupt status and configuration a snapshot saved. The
    /// offered features must be the ones this device offers now: a device built differently
    /// (another Skiff, or a disk made read-only since) is refused.
    pub fn restore(&mut self, state: &VirtioState) -> Result<(), RestoreError> {
        if state.avail_features != self.avail_features {
            return Err(RestoreError::Features {
                saved: state.avail_features,
                now: self.avail_features,
            });
        }
        self.acked_features = state.acked_features & self.avail_features;
        self.irq.restore(state.interrupt_status, state.needs_reset);
        self.config.restore(&state.config, state.config_generation);
        Ok(())
    }
}

/// Why a device's saved state cannot be put back.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The device offers other features than the saved one did.
    #[error("the device offers features {now:#x}, the snapshot's offered {saved:#x}")]
    Features {
        /// Saved.
        saved: u64,
        /// Now.
        now: u64,
    },
    /// A saved queue is not a valid virtqueue in this guest's memory.
    #[error("saved queue {0} is not a valid virtqueue")]
    Queue(usize),
    /// The device refused its saved queues.
    #[error("cannot activate the device with its saved queues")]
    Activate(#[source] ActivateError),
}

/// What every virtio device keeps the same way: offered and accepted features, one
/// notification eventfd per queue (a KVM ioeventfd), the interrupt and configuration space
/// (shared with the transport), and the eventfd that wakes the event thread at activation.
#[derive(Debug)]
pub struct VirtioBase {
    /// Features offered.
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// One eventfd per queue.
    pub queue_events: Vec<EventFd>,
    /// Written at DRIVER_OK; the event thread then takes over the queues.
    pub activate_evt: EventFd,
    /// The device's interrupt.
    pub irq: Arc<IrqTrigger>,
    /// The device's configuration space.
    pub config: Arc<ConfigSpace>,
}

impl VirtioBase {
    /// A base offering `avail_features` with `queues` queues and configuration space `config`.
    pub fn new(avail_features: u64, queues: usize, config: ConfigSpace) -> io::Result<Self> {
        Ok(Self {
            avail_features,
            acked_features: 0,
            queue_events: (0..queues)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
                .collect::<io::Result<_>>()?,
            activate_evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            irq: Arc::new(IrqTrigger::new()?),
            config: Arc::new(config),
        })
    }

    /// Queue `index`'s interrupt, for [`drain_queue`].
    pub(crate) fn queue_irq(&self, index: usize) -> QueueIrq<'_> {
        QueueIrq {
            irq: &self.irq,
            index,
        }
    }

    /// Whether the driver accepted feature `bit`.
    pub fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1u64 << bit) != 0
    }

    /// The one queue a single-queue device takes at activation, with EVENT_IDX as the driver
    /// accepted it; refused unless the driver made exactly one ready.
    pub fn single_queue(&self, queues: Vec<Queue>) -> Result<Queue, ActivateError> {
        let got = queues.len();
        let Some(mut queue) = queues.into_iter().next().filter(|_| got == 1) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        queue.set_event_idx(self.acked(VIRTIO_RING_F_EVENT_IDX));
        Ok(queue)
    }

    /// Wakes the event thread to take over the activated queues.
    pub fn signal_activation(&self) -> Result<(), ActivateError> {
        self.activate_evt.write(1).map_err(ActivateError::Signal)
    }
}

/// Why a device refused activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not set up the queues the device needs.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues the driver made ready.
        got: usize,
    },
    /// The activation event could not be signalled.
    #[error("cannot signal activation")]
    Signal(#[source] io::Error),
    /// The driver did not accept a feature the device cannot work without.
    #[error("the driver did not accept {0}")]
    FeatureRequired(&'static str),
}

/// A virtio device as the MMIO transport sees it. The transport runs on vCPU threads; queue
/// processing runs on the event thread, which the device wakes through its activation eventfd.
pub trait VirtioDevice: Send {
    /// The state every device has.
    fn base(&self) -> &VirtioBase;
    /// The state every device has, to change.
    fn base_mut(&mut self) -> &mut VirtioBase;
    /// Virtio device ID (virtio 1.2, 5).
    fn device_type(&self) -> u32;
    /// Largest size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Takes the validated queues at DRIVER_OK and hands work to the event thread. Must not
    /// block: it runs on a vCPU thread.
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError>;
    /// Drops the queues and returns to the state before activation.
    fn reset(&mut self);
    /// The queues of an active device, in order (none when not active), for a snapshot.
    fn active_queues(&self) -> Vec<&Queue>;

    /// Features the device offers.
    fn avail_features(&self) -> u64 {
        self.base().avail_features
    }
    /// Features the driver accepted (a subset of the offered ones).
    fn set_acked_features(&mut self, features: u64) {
        let base = self.base_mut();
        base.acked_features = features & base.avail_features;
    }
    /// The eventfds the guest's queue notifications land on (KVM ioeventfds), one per queue.
    fn queue_events(&self) -> &[EventFd] {
        &self.base().queue_events
    }
    /// The device's interrupt.
    fn interrupt(&self) -> &Arc<IrqTrigger> {
        &self.base().irq
    }
    /// The device's configuration space.
    fn config_space(&self) -> &Arc<ConfigSpace> {
        &self.base().config
    }
}

/// A device with one queue and one rate limiter (block, entropy): its events on the event
/// thread are the same, and handled once by [`process_single_queue_event`].
pub(crate) trait SingleQueueDevice {
    /// Its base.
    fn virtio_base(&self) -> &VirtioBase;
    /// Its rate limiter.
    fn limiter(&mut self) -> &mut crate::rate_limiter::RateLimiter;
    /// Drains its queue as far as the limiter allows.
    fn process_queue(&mut self);
}

/// The event thread's part of a [`SingleQueueDevice`]: at activation the queue event and the
/// limiter's timer are registered (the timer even without limits: a PATCH may add them) and
/// requests queued before are taken; a queue event, or the end of a throttle, drains the queue.
pub(crate) fn process_single_queue_event(
    dev: &mut impl SingleQueueDevice,
    events: event_manager::Events,
    ops: &mut event_manager::EventOps,
) {
    use event_manager::Events;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::epoll::EventSet;
    let fd = events.fd();
    let base = dev.virtio_base();
    if fd == base.activate_evt.as_raw_fd() {
        let _ = base.activate_evt.read();
        // Registering again after a reset and re-activation fails harmlessly.
        let _ = ops.add(Events::new(&base.queue_events[0], EventSet::IN));
        let _ = ops.add(Events::new(dev.limiter(), EventSet::IN));
        dev.process_queue();
    } else if fd == base.queue_events[0].as_raw_fd() {
        let _ = base.queue_events[0].read();
        dev.process_queue();
    } else if fd == dev.limiter().as_raw_fd() && dev.limiter().event_handler() {
        dev.process_queue();
    }
}

/// Watches a device's activation eventfd, as every device's `init` does.
pub(crate) fn watch_activation(base: &VirtioBase, ops: &mut event_manager::EventOps, name: &str) {
    let events = event_manager::Events::new(&base.activate_evt, vmm_sys_util::epoll::EventSet::IN);
    if let Err(e) = ops.add(events) {
        log::warn!("{name}: cannot watch the activation event: {e}");
    }
}

/// The 32-bit half `select` (0 or 1) of a 64-bit feature word.
pub(crate) fn feature_word(features: u64, select: u32) -> u32 {
    match select {
        0 => (features & 0xffff_ffff) as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

/// A guest buffer: one descriptor's address and length, as the driver wrote them (unchecked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GuestBuf {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// A chain's buffers, split by direction; kept by a device and reused for every chain so the
/// queue drain does not allocate.
#[derive(Debug, Default)]
pub(crate) struct ChainBufs {
    /// Device-readable buffers, in chain order.
    pub readable: Vec<GuestBuf>,
    /// Device-writable buffers, in chain order.
    pub writable: Vec<GuestBuf>,
}

/// Splits `chain` into its device-readable buffers followed by its device-writable ones
/// (virtio 1.2, 2.7.4.2). False for a broken chain: a readable buffer after a writable one, or a
/// chain cut short because it loops, is longer than the queue, or links to a descriptor outside
/// the table (virtio-queue's iterator then just stops).
pub(crate) fn split_chain(chain: DescriptorChain<&GuestMemoryMmap>, bufs: &mut ChainBufs) -> bool {
    bufs.readable.clear();
    bufs.writable.clear();
    let mut cut = false;
    for desc in chain {
        let buf = GuestBuf {
            addr: desc.addr().0,
            len: desc.len(),
        };
        cut = desc.has_next();
        if desc.is_write_only() {
            bufs.writable.push(buf);
        } else if bufs.writable.is_empty() {
            bufs.readable.push(buf);
        } else {
            return false;
        }
    }
    !cut
}

/// The driver broke a queue beyond use: its available index is more than a queue's worth ahead
/// of the device (virtio 1.2, 2.7.13.3), or its ring is unreadable. The device stops using the
/// queue and asks for a reset ([`IrqTrigger::signal_needs_reset`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BrokenQueue;

/// The next available chain, if any. A broken available ring is the guest's error: it is
/// reported at debug level, rate-limited, and as [`BrokenQueue`].
pub(crate) fn pop_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, BrokenQueue> {
    match queue.iter(mem) {
        Ok(mut iter) => Ok(iter.next()),
        Err(e) => {
            crate::guest_log!(Level::Debug, "virtio: unusable available ring: {e}");
            Err(BrokenQueue)
        }
    }
}

/// The next available chain; when there is none, asks the driver to notify when it adds one
/// and looks once more, since it may have added one meanwhile (virtio 1.2, 2.7.10). For
/// queues the device fills (receive), which wait for the driver only when they run dry.
pub(crate) fn next_chain_or_notify<'a>(
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

/// Whether the driver wants an interrupt for the buffers just used: the used_event index when
/// EVENT_IDX was negotiated, otherwise the VRING_AVAIL_F_NO_INTERRUPT flag (virtio 1.2, 2.7.7.2),
/// which virtio-queue leaves to the device.
pub(crate) fn needs_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).unwrap_or(true);
    }
    // The used ring writes must be visible before the flag is read.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    let flags: u16 = mem.read_obj(GuestAddress(queue.avail_ring())).unwrap_or(0);
    u16::from_le(flags) & 1 == 0
}

/// A device's interrupt for one of its queues.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueIrq<'a> {
    irq: &'a IrqTrigger,
    index: usize,
}

/// What a device did with a chain it took from a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handled {
    /// Done: the chain goes to the used ring with this many bytes written to the guest.
    Used(u32),
    /// Not now (its rate limiter is throttled): the chain goes back to the available ring,
    /// to be taken again when the limiter's timer fires.
    Deferred,
    /// Kept by the device, which puts it on the used ring itself later (the balloon's
    /// statistics buffer, handed back every polling interval).
    Held,
}

/// Drains `queue` the way every device should (virtio 1.2, 2.7.10): notifications off while
/// draining, on again and re-checked so nothing slips between. The budget, a queue's worth,
/// counts every turn of the loop, not only the chains used, so whatever the driver writes the
/// call ends; when more may wait, `requeue` is written and the event loop comes back after other
/// work. `handle` processes one chain; a chain it defers is put back and ends the drain, with
/// notifications left off (the device's rate limiter brings it back). Raises the interrupt,
/// if the driver wants one, when anything was used.
pub(crate) fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    requeue: &EventFd,
    irq: QueueIrq<'_>,
    mut handle: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> Handled,
) -> Result<(), BrokenQueue> {
    let mut budget = queue.size();
    let mut used = false;
    let mut notifying = true;
    let result = loop {
        if budget == 0 {
            let _ = requeue.write(1);
            break Ok(());
        }
        budget -= 1;
        if notifying {
            if queue.disable_notification(mem).is_err() {
                break Err(BrokenQueue);
            }
            notifying = false;
        }
        let chain = match pop_chain(queue, mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => match queue.enable_notification(mem) {
                // Added meanwhile: go on.
                Ok(true) => {
                    notifying = true;
                    continue;
                }
                Ok(false) => break Ok(()),
                Err(_) => break Err(BrokenQueue),
            },
            Err(broken) => break Err(broken),
        };
        let head = chain.head_index();
        let len = match handle(chain) {
            Handled::Used(len) => len,
            Handled::Held => continue,
            Handled::Deferred => {
                queue.go_to_previous_position();
                break Ok(());
            }
        };
        if queue.add_used(mem, head, len).is_err() {
            crate::guest_log!(Level::Debug, "virtio: cannot add a used element");
        }
        used = true;
    };
    if used && needs_interrupt(queue, mem) {
        if let Err(e) = irq.irq.trigger_queue(irq.index) {
            crate::guest_log!(Level::Warn, "virtio: cannot raise interrupt: {e}");
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    struct Rig {
        mem: GuestMemoryMmap,
        requeue: EventFd,
        irq: IrqTrigger,
    }

    impl Rig {
        fn irq(&self) -> QueueIrq<'_> {
            QueueIrq {
                irq: &self.irq,
                index: 0,
            }
        }
    }

    fn rig() -> Rig {
        Rig {
            mem: crate::vstate::memory::anonymous(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
            requeue: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            irq: IrqTrigger::new().unwrap(),
        }
    }

    /// Publishes `n` one-descriptor chains (heads 0..n) on `vq`.
    fn publish(vq: &MockSplitQueue<'_, GuestMemoryMmap>, n: u16) {
        let descs: Vec<RawDescriptor> = (0..n)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(0x8000 + u64::from(i) * 64, 64, 0, 0))
            })
            .collect();
        for (i, d) in descs.iter().enumerate() {
            vq.desc_table()
                .store(u16::try_from(i).unwrap(), *d)
                .unwrap();
            vq.avail()
                .ring()
                .ref_at(i)
                .unwrap()
                .store(u16::try_from(i).unwrap().to_le());
        }
        vq.avail().idx().store(n.to_le());
    }

    #[test]
    fn drain_uses_every_chain_and_ends() {
        let r = rig();
        let vq = MockSplitQueue::new(&r.mem, 16);
        let mut queue: Queue = vq.create_queue().unwrap();
        publish(&vq, 3);
        let mut seen = 0;
        let result = drain_queue(&mut queue, &r.mem, &r.requeue, r.irq(), |_| {
            seen += 1;
            Handled::Used(0)
        });
        assert_eq!(result, Ok(()));
        assert_eq!(seen, 3);
        assert_eq!(u16::from_le(vq.used().idx().load()), 3);
        assert_eq!(r.irq.status(), INT_VRING);
    }

    /// A deferred chain goes back to the available ring and ends the drain; the next drain
    /// takes it again, and the guest hears of the chains used before it.
    #[test]
    fn a_deferred_chain_is_taken_again_next_time() {
        let r = rig();
        let vq = MockSplitQueue::new(&r.mem, 16);
        let mut queue: Queue = vq.create_queue().unwrap();
        publish(&vq, 4);
        let mut heads = Vec::new();
        let result = drain_queue(&mut queue, &r.mem, &r.requeue, r.irq(), |chain| {
            heads.push(chain.head_index());
            if heads.len() == 3 {
                Handled::Deferred
            } else {
                Handled::Used(0)
            }
        });
        assert_eq!(result, Ok(()));
        assert_eq!(u16::from_le(vq.used().idx().load()), 2);
        assert_eq!(r.irq.status(), INT_VRING);
        assert!(
            r.requeue.read().is_err(),
            "no requeue: the limiter wakes the device"
        );
        drain_queue(&mut queue, &r.mem, &r.requeue, r.irq(), |chain| {
            heads.push(chain.head_index());
            Handled::Used(0)
        })
        .unwrap();
        assert_eq!(heads, [0, 1, 2, 2, 3]);
        assert_eq!(u16::from_le(vq.used().idx().load()), 4);
    }

    /// An available index more than a queue's worth ahead (or a ring zeroed under a live
    /// device, which looks the same after wrapping) ends the drain at once with the queue
    /// reported broken; it used to spin forever on the event thread.
    #[test]
    fn impossible_avail_index_ends_the_drain() {
        for (published, idx) in [(0, 17u16), (0, 0xffff), (2, 0)] {
            let r = rig();
            let vq = MockSplitQueue::new(&r.mem, 16);
            let mut queue: Queue = vq.create_queue().unwrap();
            publish(&vq, published);
            let mut seen = 0;
            if published > 0 {
                drain_queue(&mut queue, &r.mem, &r.requeue, r.irq(), |_| {
                    seen += 1;
                    Handled::Used(0)
                })
                .unwrap();
            }
            vq.avail().idx().store(idx.to_le());
            let result = drain_queue(&mut queue, &r.mem, &r.requeue, r.irq(), |_| {
                seen += 1;
                Handled::Used(0)
            });
            assert_eq!(result, Err(BrokenQueue), "index {idx} after {published}");
            assert_eq!(seen, published, "no chain taken from a broken ring");
        }
    }

    #[test]
    fn needs_reset_raises_one_config_interrupt_until_cleared() {
        let irq = IrqTrigger::new().unwrap();
        irq.signal_needs_reset();
        irq.signal_needs_reset();
        assert!(irq.needs_reset());
        assert_eq!(irq.status(), INT_CONFIG);
        assert_eq!(irq.eventfd().read().unwrap(), 1);
        irq.clear();
        assert!(!irq.needs_reset());
        assert_eq!(irq.status(), 0);
    }

    #[test]
    fn config_space_writes_only_its_writable_bytes() {
        let config = ConfigSpace::new(vec![1, 2, 3, 4, 5, 6, 7, 8], 4..8);
        let mut out = [0u8; 4];
        config.read(6, &mut out);
        assert_eq!(out, [7, 8, 0, 0], "past the end reads zeros");
        config.read(u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
        assert!(!config.write(2, &[9, 9, 9, 9]), "straddles read-only bytes");
        assert!(!config.write(u64::MAX, &[9]));
        assert!(config.write(4, &[9, 9]));
        config.read(0, &mut out);
        assert_eq!(out, [1, 2, 3, 4]);
        let generation = config.generation();
        config.update(|b| b[0] = 0xaa);
        assert_ne!(config.generation(), generation);
        config.read(0, &mut out);
        assert_eq!(out[0], 0xaa);
    }
}
