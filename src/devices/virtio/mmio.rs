//! The virtio-mmio transport, version 2 register layout (virtio 1.2, 4.2.2), written once and
//! shared by every device. It runs on vCPU threads: it negotiates features, drives the device
//! status machine from a table of valid transitions, collects and validates queue set-up, and
//! at DRIVER_OK hands the queues to the device, which wakes the event thread.
//!
//! What its registers show (device type, features, interrupt status, configuration space) is
//! kept outside the device's lock, which the event thread holds for a whole queue drain: a vCPU
//! takes that lock only for the rare steps that change the device (feature acceptance,
//! activation, reset), never to read a register or acknowledge an interrupt.

use std::sync::{Arc, Mutex, PoisonError};

use log::Level;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    feature_word, status, ConfigSpace, IrqTrigger, QueueSnapshot, RestoreError, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::devices::BusDevice;
use crate::guest_log;
use crate::vstate::memory::GuestMemoryMmap;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x534b_4646; // "SKFF"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
pub(super) const REG_DEVICE_FEATURES: u64 = 0x010;
pub(super) const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub(super) const REG_DRIVER_FEATURES: u64 = 0x020;
pub(super) const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub(super) const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub(super) const REG_QUEUE_NUM: u64 = 0x038;
pub(super) const REG_QUEUE_READY: u64 = 0x044;
pub(super) const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
pub(super) const REG_STATUS: u64 = 0x070;
pub(super) const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub(super) const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub(super) const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub(super) const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub(super) const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub(super) const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub(super) const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// Device-specific configuration space starts here.
pub const CONFIG_SPACE: u64 = 0x100;
/// Size of one device's MMIO window.
pub const MMIO_SIZE: u64 = 0x1000;

use status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};

/// The driver's path through device initialisation (virtio 1.2, 3.1.1): from each status to
/// the one it may write next. Reset (writing 0) and FAILED are handled before the table.
const STATUS_TRANSITIONS: &[(u32, u32)] = &[
    (0, ACKNOWLEDGE),
    (ACKNOWLEDGE, ACKNOWLEDGE | DRIVER),
    (ACKNOWLEDGE | DRIVER, ACKNOWLEDGE | DRIVER | FEATURES_OK),
    (
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    ),
];

/// One virtio device behind its MMIO registers.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    device_type: u32,
    avail_features: u64,
    queue_max_sizes: Vec<u16>,
    irq: Arc<IrqTrigger>,
    config: Arc<ConfigSpace>,
    /// The device's queue eventfds, for a notify that reaches the transport (no ioeventfd).
    queue_events: Vec<EventFd>,
    mem: GuestMemoryMmap,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    /// The driver wrote a queue size the device cannot take.
    bad_queue_size: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .finish()
    }
}

fn new_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .filter_map(|&max| Queue::new(max).ok())
        .collect()
}

/// The transport's registers as a snapshot holds them; the device's features, interrupt status
/// and queues of a running device are in the device's own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// What the driver wrote to DriverFeatures.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// The queues as the driver was setting them up (none once the device runs).
    pub queues: Vec<QueueSnapshot>,
    /// The driver wrote a queue size the device cannot take.
    pub bad_queue_size: bool,
}

impl MmioTransport {
    /// The transport's registers, for a snapshot.
    pub fn save(&self) -> MmioTransportState {
        MmioTransportState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self.queues.iter().map(QueueSnapshot::from).collect(),
            bad_queue_size: self.bad_queue_size,
        }
    }

    /// Puts `device` (its own state already restored) behind a transport with the registers
    /// `state` saved; a device that was running gets `active_queues` back and starts again,
    /// as at DRIVER_OK. Queues that are not valid in `mem` are refused.
    pub fn restore(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        state: &MmioTransportState,
        active_queues: &[QueueSnapshot],
    ) -> Result<Self, RestoreError> {
        let mut transport = Self::new(mem, device)
            .map_err(|e| RestoreError::Activate(super::ActivateError::Signal(e)))?;
        let to_queue =
            |(i, q): (usize, &QueueSnapshot)| q.to_queue().map_err(|_| RestoreError::Queue(i));
        if !state.queues.is_empty() {
            let queues: Vec<Queue> = state
                .queues
                .iter()
                .enumerate()
                .map(to_queue)
                .collect::<Result<_, _>>()?;
            let sizes_match = queues.len() == transport.queue_max_sizes.len()
                && queues
                    .iter()
                    .zip(&transport.queue_max_sizes)
                    .all(|(q, &max)| q.max_size() == max);
            if !sizes_match {
                return Err(RestoreError::Queue(queues.len()));
            }
            transport.queues = queues;
        } else if state.status & DRIVER_OK != 0 {
            // Handed to the device at DRIVER_OK.
            transport.queues = Vec::new();
        }
        transport.status = state.status;
        transport.device_features_sel = state.device_features_sel;
        transport.driver_features_sel = state.driver_features_sel;
        transport.driver_features = state.driver_features;
        transport.queue_sel = state.queue_sel;
        transport.bad_queue_size = state.bad_queue_size;
        if state.status & DRIVER_OK != 0 && !active_queues.is_empty() {
            let queues: Vec<Queue> = active_queues
                .iter()
                .enumerate()
                .map(to_queue)
                .collect::<Result<_, _>>()?;
            if let Some(bad) = queues.iter().position(|q| !q.is_valid(&transport.mem)) {
                return Err(RestoreError::Queue(bad));
            }
            let mem = transport.mem.clone();
            transport
                .device()
                .activate(mem, queues)
                .map_err(RestoreError::Activate)?;
        }
        Ok(transport)
    }

    /// Puts `device` behind a transport that gives it `mem` at activation.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> std::io::Result<Self> {
        let dev = device.lock().unwrap_or_else(PoisonError::into_inner);
        let device_type = dev.device_type();
        let avail_features = dev.avail_features();
        let queue_max_sizes = dev.queue_max_sizes().to_vec();
        let irq = dev.interrupt().clone();
        let config = dev.config_space().clone();
        let queue_events = dev
            .queue_events()
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<_>>()?;
        drop(dev);
        Ok(Self {
            queues: new_queues(&queue_max_sizes),
            device,
            device_type,
            avail_features,
            queue_max_sizes,
            irq,
            config,
            queue_events,
            mem,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            bad_queue_size: false,
        })
    }

    fn device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The selected queue, while the driver may still configure queues.
    fn queue_for_setup(&mut self) -> Option<&mut Queue> {
        let configurable =
            self.status & FEATURES_OK != 0 && self.status & (DRIVER_OK | FAILED) == 0;
        if !configurable {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.device().reset();
        self.irq.clear();
        self.queues = new_queues(&self.queue_max_sizes);
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.bad_queue_size = false;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & FAILED != 0 {
            self.status |= FAILED;
            return;
        }
        if !STATUS_TRANSITIONS.contains(&(self.status, value)) {
            guest_log!(
                Level::Debug,
                "virtio-mmio: ignoring status {value:#x} in status {:#x}",
                self.status
            );
            return;
        }
        let newly = value & !self.status;
        if newly == FEATURES_OK {
            // Leave FEATURES_OK clear on refusal: the driver reads it back and gives up. A
            // legacy driver (no VERSION_1) would expect a layout this transport does not have
            // (virtio 1.2, 4.2.4).
            if self.driver_features & !self.avail_features != 0 {
                guest_log!(
                    Level::Debug,
                    "virtio-mmio: driver accepted features the device did not offer"
                );
                return;
            }
            if self.driver_features & (1u64 << VIRTIO_F_VERSION_1) == 0 {
                guest_log!(
                    Level::Debug,
                    "virtio-mmio: driver did not accept VIRTIO_F_VERSION_1"
                );
                return;
            }
            self.device().set_acked_features(self.driver_features);
        }
        if newly == DRIVER_OK && !self.activate() {
            return;
        }
        self.status = value;
    }

    /// Validates the ready queues and activates the device; false (with DEVICE_NEEDS_RESET
    /// set) when the driver's set-up is unusable.
    fn activate(&mut self) -> bool {
        let valid = self
            .queues
            .iter()
            .all(|q| !q.ready() || q.is_valid(&self.mem));
        let all_ready = self.queues.iter().all(QueueT::ready);
        let result = if valid && all_ready && !self.bad_queue_size {
            let queues = std::mem::take(&mut self.queues);
            self.device()
                .activate(self.mem.clone(), queues)
                .map_err(|e| e.to_string())
        } else {
            Err("queues not ready or outside guest memory".to_owned())
        };
        match result {
            Ok(()) => true,
            Err(why) => {
                guest_log!(Level::Debug, "virtio-mmio: cannot activate device: {why}");
                self.irq.signal_needs_reset();
                false
            }
        }
    }

    /// Register `offset` as the driver reads it (a 4-byte access); virtio-pci's common
    /// configuration reads through here too.
    pub(super) fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device_type,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => feature_word(self.avail_features, self.device_features_sel),
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.irq.status(),
            REG_STATUS if self.irq.needs_reset() => self.status | DEVICE_NEEDS_RESET,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config.generation(),
            _ => 0,
        }
    }

    /// The driver writes register `offset` (a 4-byte access).
    pub(super) fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                if self.status & (DRIVER | FEATURES_OK) == DRIVER {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(value);
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32);
                        }
                        _ => {}
                    }
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => {
                if let Some(q) = self.queue_for_setup() {
                    // Zero, not a power of two or above the maximum: refused, and activation
                    // then reports the queue as unusable.
                    let ok = u16::try_from(value).is_ok_and(|size| q.try_set_size(size).is_ok());
                    self.bad_queue_size |= !ok;
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.queue_for_setup() {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_DESC_LOW => {
                self.set_queue_addr(|q, v| q.set_desc_table_address(Some(v), None), value);
            }
            REG_QUEUE_DESC_HIGH => {
                self.set_queue_addr(|q, v| q.set_desc_table_address(None, Some(v)), value);
            }
            REG_QUEUE_DRIVER_LOW => {
                self.set_queue_addr(|q, v| q.set_avail_ring_address(Some(v), None), value);
            }
            REG_QUEUE_DRIVER_HIGH => {
                self.set_queue_addr(|q, v| q.set_avail_ring_address(None, Some(v)), value);
            }
            REG_QUEUE_DEVICE_LOW => {
                self.set_queue_addr(|q, v| q.set_used_ring_address(Some(v), None), value);
            }
            REG_QUEUE_DEVICE_HIGH => {
                self.set_queue_addr(|q, v| q.set_used_ring_address(None, Some(v)), value);
            }
            REG_QUEUE_NOTIFY => {
                // Normally consumed by the KVM ioeventfd and never seen here.
                if self.status & DRIVER_OK != 0 {
                    if let Some(evt) = self.queue_events.get(value as usize) {
                        let _ = evt.write(1);
                    }
                }
            }
            REG_INTERRUPT_ACK => self.irq.ack(value),
            REG_STATUS => self.set_status(value),
            _ => guest_log!(
                Level::Debug,
                "virtio-mmio: write to read-only or unknown register {offset:#x}"
            ),
        }
    }

    /// The selected queue's size (its maximum until the driver sets one), 0 for no queue.
    pub(super) fn selected_queue_size(&self) -> u16 {
        self.queues
            .get(self.queue_sel as usize)
            .map_or(0, QueueT::size)
    }

    /// The selected queue's descriptor table, driver and device ring addresses.
    pub(super) fn selected_queue_addresses(&self) -> [u64; 3] {
        self.queues
            .get(self.queue_sel as usize)
            .map_or([0; 3], |q| [q.desc_table(), q.avail_ring(), q.used_ring()])
    }

    /// Word `select` of the features the driver wrote.
    pub(super) fn driver_features_word(&self, select: u32) -> u32 {
        feature_word(self.driver_features, select)
    }

    fn set_queue_addr(&mut self, set: impl FnOnce(&mut Queue, u32), value: u32) {
        if let Some(q) = self.queue_for_setup() {
            set(q, value);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.config.read(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if !self.config.write(offset - CONFIG_SPACE, data) {
                guest_log!(
                    Level::Debug,
                    "virtio-mmio: ignoring a write to read-only configuration byte {:#x}",
                    offset - CONFIG_SPACE
                );
            }
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset.is_multiple_of(4) => {
                self.write_reg(offset, u32::from_le_bytes(word));
            }
            _ => guest_log!(
                Level::Debug,
                "virtio-mmio: ignoring {}-byte register write at {offset:#x}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::Block;
    use crate::devices::virtio::INT_CONFIG;
    use vm_memory::GuestAddress;

    fn transport() -> MmioTransport {
        let path = std::env::temp_dir().join(format!(
            "skiff-mmio-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let block = Block::new(&path, false, "t").unwrap();
        std::fs::remove_file(&path).unwrap();
        let mem = crate::vstate::memory::anonymous(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        MmioTransport::new(mem, Arc::new(Mutex::new(block))).unwrap()
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport) {
        write(t, REG_STATUS, ACKNOWLEDGE);
        write(t, REG_STATUS, ACKNOWLEDGE | DRIVER);
        write(t, REG_DRIVER_FEATURES_SEL, 1);
        write(t, REG_DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
        write(t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }

    /// Sets up queue 0 with `size` entries and its descriptor table at `desc`, then sets
    /// DRIVER_OK and returns the status the device reports.
    fn start_queue(t: &mut MmioTransport, size: u32, desc: u32) -> u32 {
        negotiate(t);
        write(t, REG_QUEUE_NUM, size);
        write(t, REG_QUEUE_DESC_LOW, desc);
        write(t, REG_QUEUE_DRIVER_LOW, 0x2000);
        write(t, REG_QUEUE_DEVICE_LOW, 0x3000);
        write(t, REG_QUEUE_READY, 1);
        write(
            t,
            REG_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        read(t, REG_STATUS)
    }

    #[test]
    fn identity_registers() {
        let mut t = transport();
        assert_eq!(read(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(read(&mut t, REG_VERSION), 2);
        assert_eq!(read(&mut t, REG_DEVICE_ID), 2);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 256);
        // Capacity: 8 sectors, in the config space.
        assert_eq!(read(&mut t, CONFIG_SPACE), 8);
        let mut odd = [0u8; 2];
        t.read(REG_MAGIC, &mut odd);
        assert_eq!(odd, [0xff, 0xff]);
    }

    #[test]
    fn status_follows_the_transition_table() {
        let mut t = transport();
        write(
            &mut t,
            REG_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(read(&mut t, REG_STATUS), 0, "skipping steps is ignored");
        negotiate(&mut t);
        assert_eq!(read(&mut t, REG_STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        write(&mut t, REG_STATUS, ACKNOWLEDGE);
        assert_eq!(
            read(&mut t, REG_STATUS),
            ACKNOWLEDGE | DRIVER | FEATURES_OK,
            "no going back"
        );
        write(&mut t, REG_STATUS, 0);
        assert_eq!(read(&mut t, REG_STATUS), 0, "reset");
    }

    /// The event thread holds the device's lock for a whole queue drain (disk I/O included):
    /// what the driver reads on every interrupt, and its acknowledgement, must not wait for it.
    #[test]
    fn registers_never_wait_for_the_device_lock() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::mpsc::channel;
        let mut t = transport();
        start_queue(&mut t, 16, 0x1000);
        t.irq.trigger_queue(0).unwrap();
        let device = t.device.clone();
        let released = Arc::new(AtomicBool::new(false));
        let (locked_tx, locked_rx) = channel();
        let holder = {
            let released = released.clone();
            std::thread::spawn(move || {
                let guard = device.lock().unwrap();
                locked_tx.send(()).unwrap();
                std::thread::sleep(std::time::Duration::from_secs(2));
                released.store(true, Ordering::SeqCst);
                drop(guard);
            })
        };
        locked_rx.recv().unwrap();
        assert_eq!(read(&mut t, REG_DEVICE_ID), 2);
        assert_ne!(read(&mut t, REG_DEVICE_FEATURES), 0);
        assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), 1);
        write(&mut t, REG_INTERRUPT_ACK, 1);
        assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), 0);
        assert_eq!(read(&mut t, REG_STATUS) & DRIVER_OK, DRIVER_OK);
        assert_eq!(read(&mut t, CONFIG_SPACE), 8);
        write(&mut t, REG_QUEUE_NOTIFY, 0);
        assert!(
            !released.load(Ordering::SeqCst),
            "a register access waited for the device's lock"
        );
        holder.join().unwrap();
    }

    #[test]
    fn a_driver_without_version_1_is_refused() {
        let mut t = transport();
        write(&mut t, REG_STATUS, ACKNOWLEDGE);
        write(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER);
        write(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        write(&mut t, REG_DRIVER_FEATURES, 1 << 9); // FLUSH, offered
        write(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(read(&mut t, REG_STATUS) & FEATURES_OK, 0);
    }

    #[test]
    fn features_the_device_did_not_offer_are_refused() {
        let mut t = transport();
        write(&mut t, REG_STATUS, ACKNOWLEDGE);
        write(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER);
        write(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        write(&mut t, REG_DRIVER_FEATURES, 1 << 2); // not offered
        write(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(read(&mut t, REG_STATUS) & FEATURES_OK, 0);
    }

    #[test]
    fn queues_outside_memory_or_not_ready_need_a_reset() {
        let mut t = transport();
        negotiate(&mut t);
        write(
            &mut t,
            REG_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_ne!(
            read(&mut t, REG_STATUS) & DEVICE_NEEDS_RESET,
            0,
            "queue never made ready"
        );
        write(&mut t, REG_STATUS, 0);
        // Descriptor table far outside 1 MiB of memory.
        let status = start_queue(&mut t, 16, 0xfff0_0000);
        assert_ne!(status & DEVICE_NEEDS_RESET, 0);
        assert_eq!(status & DRIVER_OK, 0);
        assert_ne!(read(&mut t, REG_INTERRUPT_STATUS) & INT_CONFIG, 0);
    }

    #[test]
    fn valid_queue_activates_and_bad_sizes_are_refused() {
        let mut t = transport();
        // 1000: not a power of two, above the maximum.
        assert_ne!(start_queue(&mut t, 1000, 0x1000) & DEVICE_NEEDS_RESET, 0);
        write(&mut t, REG_STATUS, 0);
        assert_eq!(
            start_queue(&mut t, 16, 0x1000),
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        );
        // Queue registers are frozen once the driver is running.
        write(&mut t, REG_QUEUE_NUM, 8);
        write(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(read(&mut t, REG_STATUS) & DEVICE_NEEDS_RESET, 0);
    }
}
