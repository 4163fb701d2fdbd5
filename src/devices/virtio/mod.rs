//! Virtio devices over the MMIO transport (virtio 1.2, section 4.2): the device trait every
//! device implements, its interrupt, and the constants shared by the transport and devices.

pub mod block;
pub mod mmio;
pub mod net;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use log::debug;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
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

/// A device's interrupt: the status bits the driver reads and acknowledges through the
/// transport, and the irqfd that raises the guest IRQ.
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    evt: EventFd,
}

impl IrqTrigger {
    /// A trigger whose eventfd the device manager registers as an irqfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Sets `bit` in the interrupt status and raises the IRQ.
    pub fn trigger(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears every bit (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The eventfd to register as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// What every virtio device keeps the same way: offered and accepted features, one
/// notification eventfd per queue (a KVM ioeventfd), the interrupt, and the eventfd that wakes
/// the event thread at activation.
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
    pub irq: IrqTrigger,
}

impl VirtioBase {
    /// A base offering `avail_features` with `queues` queues.
    pub fn new(avail_features: u64, queues: usize) -> io::Result<Self> {
        Ok(Self {
            avail_features,
            acked_features: 0,
            queue_events: (0..queues)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK))
                .collect::<io::Result<_>>()?,
            activate_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            irq: IrqTrigger::new()?,
        })
    }

    /// Whether the driver accepted feature `bit`.
    pub fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1u64 << bit) != 0
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
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Takes the validated queues at DRIVER_OK and hands work to the event thread. Must not
    /// block: it runs on a vCPU thread.
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError>;
    /// Drops the queues and returns to the state before activation.
    fn reset(&mut self);

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
    fn interrupt(&self) -> &IrqTrigger {
        &self.base().irq
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

/// Copies `offset..` of a device's config bytes into `data`; reads past the end give zeros.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
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

/// The next available chain, if any. Unlike `Queue::pop_descriptor_chain` it reports a broken
/// available ring (a guest error) at debug level only.
pub(crate) fn pop_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Option<DescriptorChain<&'a GuestMemoryMmap>> {
    match queue.iter(mem) {
        Ok(mut iter) => iter.next(),
        Err(e) => {
            debug!("virtio: unusable available ring: {e}");
            None
        }
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

/// Drains `queue` the way every device should (virtio 1.2, 2.7.10): notifications off while
/// draining, on again and re-checked so nothing slips between, at most a queue's worth of chains
/// per call so a driver that keeps adding cannot starve the event loop (when more may wait,
/// `requeue` is written and the loop comes back). `handle` processes one chain and returns the
/// bytes it wrote to the guest. Raises the interrupt, if the driver wants one, when anything
/// was used.
pub(crate) fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    requeue: &EventFd,
    irq: &IrqTrigger,
    mut handle: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
) {
    let mut budget = queue.size();
    let mut used = false;
    loop {
        if queue.disable_notification(mem).is_err() {
            break;
        }
        while budget > 0 {
            let Some(chain) = pop_chain(queue, mem) else {
                break;
            };
            let head = chain.head_index();
            let len = handle(chain);
            if queue.add_used(mem, head, len).is_err() {
                debug!("virtio: cannot add a used element");
            }
            used = true;
            budget -= 1;
        }
        if budget == 0 {
            let _ = requeue.write(1);
            break;
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            _ => break,
        }
    }
    if used && needs_interrupt(queue, mem) {
        if let Err(e) = irq.trigger(INT_VRING) {
            log::warn!("virtio: cannot raise interrupt: {e}");
        }
    }
}
