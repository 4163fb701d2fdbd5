//! The virtio-pci transport (virtio 1.2, 4.1), modern interface only: a PCI function with
//! vendor 0x1af4 and device 0x1040 + the virtio device type, whose one 64-bit memory BAR holds
//! the common configuration, the ISR, the device configuration, the queue notification
//! addresses (each a KVM ioeventfd) and the MSI-X table and pending bits; the capabilities
//! in configuration space say where.
//!
//! The virtio register model (features, the status machine's table of transitions, queue set-up
//! and validation, activation, reset) is the MMIO transport's: the common configuration maps
//! each of its fields onto the MMIO register with the same meaning, so both transports behave
//! alike. What only PCI has (the MSI-X vector of each queue and of configuration changes, the
//! ISR that clears on read, the BAR) lives here.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kvm_ioctls::{IoEventAddress, NoDatamatch};
use log::Level;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{
    MmioTransport, REG_CONFIG_GENERATION, REG_DEVICE_FEATURES, REG_DEVICE_FEATURES_SEL,
    REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL, REG_QUEUE_DESC_HIGH, REG_QUEUE_DESC_LOW,
    REG_QUEUE_DEVICE_HIGH, REG_QUEUE_DEVICE_LOW, REG_QUEUE_DRIVER_HIGH, REG_QUEUE_DRIVER_LOW,
    REG_QUEUE_NOTIFY, REG_QUEUE_NUM, REG_QUEUE_READY, REG_QUEUE_SEL, REG_STATUS,
};
use super::{ConfigSpace, IrqTrigger};
use crate::arch::x86_64::layout::{PCI_MMIO_SIZE, PCI_MMIO_START};
use crate::devices::pci::msix::{MsixError, MsixState, MsixVectors, ENTRY_SIZE};
use crate::devices::pci::{reg, ConfigHeader, PciFunction};
use crate::guest_log;

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Device ID of modern virtio device type 0 (virtio 1.2, 4.1.2.1).
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;

/// Where each structure sits in the BAR.
const COMMON_CFG: u64 = 0x0000;
const ISR_CFG: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const NOTIFY_CFG: u64 = 0x3000;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;
const REGION_SIZE: u64 = 0x1000;
/// Size of the BAR (a power of two holding every structure).
pub const BAR_SIZE: u64 = 0x8000;
/// Bytes between two queues' notification addresses (notify_off_multiplier).
const NOTIFY_MULTIPLIER: u32 = 4;

/// virtio_pci_cap cfg_type values (virtio 1.2, 4.1.4).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_ID_VENDOR: u8 = 0x09;
const CAP_ID_MSIX: u8 = 0x11;
const MSIX_CAP: usize = 0x40;
/// MSI-X message control: enable and function mask bits.
const MSIX_ENABLE: u16 = 0x8000;
const MSIX_FUNCTION_MASK: u16 = 0x4000;

/// Common configuration fields (virtio 1.2, 4.1.4.3): offset, width.
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// Width in bytes of the common configuration field at `offset`, with its start.
fn common_field(offset: u64) -> Option<(u64, usize)> {
    use common::*;
    Some(match offset {
        DEVICE_FEATURE_SELECT..=0x0f => (offset & !3, 4),
        CONFIG_MSIX_VECTOR | NUM_QUEUES | QUEUE_SELECT | QUEUE_SIZE | QUEUE_MSIX_VECTOR
        | QUEUE_ENABLE | QUEUE_NOTIFY_OFF => (offset, 2),
        DEVICE_STATUS | CONFIG_GENERATION => (offset, 1),
        QUEUE_DESC..=0x37 => (offset & !3, 4),
        _ => return None,
    })
}

/// A virtio-pci function as a snapshot holds it; the register model behind the common
/// configuration is saved as the MMIO transport's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    /// The device's slot in the registry (its place on the bus follows from it).
    pub slot: u32,
    /// Conventional configuration space (256 bytes).
    pub header: Vec<u8>,
    /// BAR 0 and 1 as written.
    pub bar: [u32; 2],
    /// device_feature_select.
    pub device_features_sel: u32,
    /// driver_feature_select.
    pub driver_features_sel: u32,
    /// queue_select.
    pub queue_sel: u16,
    /// The MSI-X vectors.
    pub msix: MsixState,
}

/// Why a saved function cannot be put back.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciRestoreError {
    /// The saved configuration space is not 256 bytes.
    #[error("the saved PCI configuration space has {0} bytes, not 256")]
    Header(usize),
    /// The MSI-X vectors cannot be put back.
    #[error("cannot restore MSI-X")]
    Msix(#[source] MsixError),
}

/// One virtio device as a PCI function.
pub struct VirtioPciDevice {
    header: ConfigHeader,
    transport: Arc<Mutex<MmioTransport>>,
    irq: Arc<IrqTrigger>,
    config: Arc<ConfigSpace>,
    msix: Arc<MsixVectors>,
    queue_events: Vec<EventFd>,
    /// BAR registers as written (the BAR's address bits, low and high).
    bar: [u32; 2],
    /// Where the queue ioeventfds are registered now.
    ioevents_at: Option<u64>,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u16,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("bar", &self.bar)
            .finish()
    }
}

/// Builds a virtio_pci_cap's body (after ID and next) for `cfg_type` at `offset`, `length`.
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let len = 16 + extra.len();
    let mut body = vec![u8::try_from(len).unwrap_or(16), cfg_type, 0, 0, 0, 0];
    body.extend_from_slice(&u32::try_from(offset).unwrap_or(0).to_le_bytes());
    body.extend_from_slice(&u32::try_from(length).unwrap_or(0).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

impl VirtioPciDevice {
    /// `transport` (the register model of a device of `device_type` with `queues` queues) as a
    /// PCI function whose BAR starts at `bar_base`, raising interrupts through `msix`; the
    /// queues' notification addresses become ioeventfds on `queue_events`.
    pub fn new(
        transport: Arc<Mutex<MmioTransport>>,
        device_type: u32,
        irq: Arc<IrqTrigger>,
        config: Arc<ConfigSpace>,
        msix: Arc<MsixVectors>,
        queue_events: Vec<EventFd>,
        bar_base: u64,
    ) -> Result<Self, kvm_ioctls::Error> {
        let type_id = u16::try_from(device_type).unwrap_or(0);
        let class = match device_type {
            1 => [0x02, 0x00, 0x00], // network controller
            2 => [0x01, 0x80, 0x00], // mass storage
            _ => [0xff, 0x00, 0x00],
        };
        let mut header = ConfigHeader::new(
            VIRTIO_PCI_VENDOR,
            VIRTIO_PCI_DEVICE_BASE + type_id,
            1,
            class,
        );
        header.set_u16(reg::SUBSYSTEM_VENDOR_ID, VIRTIO_PCI_VENDOR);
        header.set_u16(reg::SUBSYSTEM_VENDOR_ID + 2, 0x40);
        // Pre-assigned and decoding, as firmware would leave it; no INTx (interrupt pin 0).
        header.set_u16(reg::COMMAND, reg::COMMAND_MEMORY);
        let cmd_mask = reg::COMMAND_MEMORY | reg::COMMAND_MASTER | reg::COMMAND_INTX_DISABLE;
        header.allow_write(reg::COMMAND, &cmd_mask.to_le_bytes());
        let table_size = u16::try_from(msix.len().saturating_sub(1)).unwrap_or(0);
        let mut msix_body = table_size.to_le_bytes().to_vec();
        msix_body.extend_from_slice(&u32::try_from(MSIX_TABLE).unwrap_or(0).to_le_bytes());
        msix_body.extend_from_slice(&u32::try_from(MSIX_PBA).unwrap_or(0).to_le_bytes());
        header.add_capability(0, MSIX_CAP, CAP_ID_MSIX, &msix_body);
        header.allow_write(MSIX_CAP + 3, &[0xc0]);
        let caps = [
            (0x50, virtio_cap(CAP_COMMON, COMMON_CFG, 0x38, &[])),
            (0x60, virtio_cap(CAP_ISR, ISR_CFG, 1, &[])),
            (0x70, virtio_cap(CAP_DEVICE, DEVICE_CFG, REGION_SIZE, &[])),
            (
                0x80,
                virtio_cap(
                    CAP_NOTIFY,
                    NOTIFY_CFG,
                    REGION_SIZE,
                    &NOTIFY_MULTIPLIER.to_le_bytes(),
                ),
            ),
        ];
        let mut prev = MSIX_CAP;
        for (at, body) in caps {
            header.add_capability(prev, at, CAP_ID_VENDOR, &body);
            prev = at;
        }
        let mut device = Self {
            header,
            transport,
            irq,
            config,
            msix,
            queue_events,
            bar: [(bar_base & 0xffff_ffff) as u32, (bar_base >> 32) as u32],
            ioevents_at: None,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
        };
        if let Some((base, _)) = device.bar() {
            device.register_ioevents(base)?;
        }
        device.bar_changed();
        Ok(device)
    }

    /// The function's registers, for a snapshot.
    pub fn save(&self, slot: u32) -> VirtioPciState {
        let mut header = vec![0u8; 256];
        self.header.read(0, &mut header);
        VirtioPciState {
            slot,
            header,
            bar: self.bar,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            msix: self.msix.save(),
        }
    }

    /// Puts back what [`VirtioPciDevice::save`] saved: configuration space, the BAR (the
    /// queue ioeventfds move with it), the selectors and the MSI-X vectors with their routes.
    pub fn restore(&mut self, saved: &VirtioPciState) -> Result<(), VirtioPciRestoreError> {
        if saved.header.len() != 256 {
            return Err(VirtioPciRestoreError::Header(saved.header.len()));
        }
        self.msix
            .restore(&saved.msix)
            .map_err(VirtioPciRestoreError::Msix)?;
        self.header.restore(&saved.header);
        self.bar = saved.bar;
        self.bar[0] &= !(u32::try_from(BAR_SIZE).unwrap_or(u32::MAX) - 1);
        self.device_features_sel = saved.device_features_sel;
        self.driver_features_sel = saved.driver_features_sel;
        self.queue_sel = saved.queue_sel;
        self.bar_changed();
        Ok(())
    }

    fn transport(&self) -> MutexGuard<'_, MmioTransport> {
        self.transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn bar_base(&self) -> u64 {
        (u64::from(self.bar[1]) << 32) | u64::from(self.bar[0] & !0xf)
    }

    fn register_ioevents(&mut self, base: u64) -> Result<(), kvm_ioctls::Error> {
        for (q, evt) in (0u64..).zip(&self.queue_events) {
            let addr = IoEventAddress::Mmio(base + NOTIFY_CFG + q * u64::from(NOTIFY_MULTIPLIER));
            self.msix.vm().register_ioevent(evt, &addr, NoDatamatch)?;
        }
        self.ioevents_at = Some(base);
        Ok(())
    }

    fn unregister_ioevents(&mut self) {
        let Some(base) = self.ioevents_at.take() else {
            return;
        };
        for (q, evt) in (0u64..).zip(&self.queue_events) {
            let addr = IoEventAddress::Mmio(base + NOTIFY_CFG + q * u64::from(NOTIFY_MULTIPLIER));
            let _ = self.msix.vm().unregister_ioevent(evt, &addr, NoDatamatch);
        }
    }

    /// The BAR moved or decoding was switched: the ioeventfds follow, while the BAR lies in
    /// the PCI window (the only place the bus decodes it; elsewhere, over RAM for one, a
    /// notification address would mean nothing).
    fn bar_changed(&mut self) {
        let in_window = |&(base, size): &(u64, u64)| {
            base >= PCI_MMIO_START
                && base
                    .checked_add(size)
                    .is_some_and(|end| end <= PCI_MMIO_START + PCI_MMIO_SIZE)
        };
        let now = self.bar().filter(in_window);
        if now.map(|(b, _)| b) == self.ioevents_at {
            return;
        }
        self.unregister_ioevents();
        if let Some((base, _)) = now {
            if let Err(e) = self.register_ioevents(base) {
                guest_log!(
                    Level::Debug,
                    "virtio-pci: cannot place queue notifications at {base:#x}: {e}"
                );
                self.unregister_ioevents();
            }
        }
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        use common::*;
        let Some((field, width)) =
            common_field(offset).filter(|&(f, w)| f == offset && w == data.len())
        else {
            guest_log!(
                Level::Debug,
                "virtio-pci: {}-byte read of common configuration {offset:#x}",
                data.len()
            );
            data.fill(0);
            return;
        };
        let t = self.transport();
        let value: u64 = match field {
            DEVICE_FEATURE_SELECT => self.device_features_sel.into(),
            DEVICE_FEATURE => t.read_reg(REG_DEVICE_FEATURES).into(),
            DRIVER_FEATURE_SELECT => self.driver_features_sel.into(),
            DRIVER_FEATURE => t.driver_features_word(self.driver_features_sel).into(),
            CONFIG_MSIX_VECTOR => self.msix.config_vector().into(),
            NUM_QUEUES => self.queue_events.len() as u64,
            DEVICE_STATUS => (t.read_reg(REG_STATUS) & 0xff).into(),
            CONFIG_GENERATION => (t.read_reg(REG_CONFIG_GENERATION) & 0xff).into(),
            QUEUE_SELECT => self.queue_sel.into(),
            QUEUE_SIZE => t.selected_queue_size().into(),
            QUEUE_MSIX_VECTOR => self.msix.queue_vector(self.queue_sel.into()).into(),
            QUEUE_ENABLE => t.read_reg(REG_QUEUE_READY).into(),
            QUEUE_NOTIFY_OFF => self.queue_sel.into(),
            _ => {
                let addrs = t.selected_queue_addresses();
                let a = addrs[((field - QUEUE_DESC) / 8) as usize];
                if field % 8 == 0 {
                    a & 0xffff_ffff
                } else {
                    a >> 32
                }
            }
        };
        drop(t);
        data.copy_from_slice(&value.to_le_bytes()[..width.min(data.len())]);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        use common::*;
        let Some((field, _)) =
            common_field(offset).filter(|&(f, w)| f == offset && w == data.len())
        else {
            guest_log!(
                Level::Debug,
                "virtio-pci: {}-byte write to common configuration {offset:#x} ignored",
                data.len()
            );
            return;
        };
        let mut word = [0u8; 4];
        word[..data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(word);
        let short = u16::try_from(value).unwrap_or(u16::MAX);
        match field {
            DEVICE_FEATURE_SELECT => {
                self.device_features_sel = value;
                self.transport().write_reg(REG_DEVICE_FEATURES_SEL, value);
            }
            DRIVER_FEATURE_SELECT => {
                self.driver_features_sel = value;
                self.transport().write_reg(REG_DRIVER_FEATURES_SEL, value);
            }
            DRIVER_FEATURE => self.transport().write_reg(REG_DRIVER_FEATURES, value),
            CONFIG_MSIX_VECTOR => {
                self.msix.set_config_vector(short);
            }
            DEVICE_STATUS => {
                if value == 0 {
                    // A reset: the selectors start again from 0, as the transport's own do.
                    self.msix.reset_mapping();
                    self.device_features_sel = 0;
                    self.driver_features_sel = 0;
                    self.queue_sel = 0;
                }
                self.transport().write_reg(REG_STATUS, value);
            }
            QUEUE_SELECT => {
                self.queue_sel = short;
                self.transport().write_reg(REG_QUEUE_SEL, value);
            }
            QUEUE_SIZE => self.transport().write_reg(REG_QUEUE_NUM, value),
            QUEUE_MSIX_VECTOR => {
                self.msix.set_queue_vector(self.queue_sel.into(), short);
            }
            QUEUE_ENABLE => self.transport().write_reg(REG_QUEUE_READY, value),
            QUEUE_DESC => self.transport().write_reg(REG_QUEUE_DESC_LOW, value),
            0x24 => self.transport().write_reg(REG_QUEUE_DESC_HIGH, value),
            QUEUE_DRIVER => self.transport().write_reg(REG_QUEUE_DRIVER_LOW, value),
            0x2c => self.transport().write_reg(REG_QUEUE_DRIVER_HIGH, value),
            QUEUE_DEVICE => self.transport().write_reg(REG_QUEUE_DEVICE_LOW, value),
            0x34 => self.transport().write_reg(REG_QUEUE_DEVICE_HIGH, value),
            _ => guest_log!(
                Level::Debug,
                "virtio-pci: write to read-only common configuration {offset:#x}"
            ),
        }
    }
}

impl PciFunction for VirtioPciDevice {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if (reg::BAR0..reg::BAR0 + 8).contains(&offset) && data.len() == 4 {
            let index = (offset - reg::BAR0) / 4;
            // A 64-bit, non-prefetchable memory BAR (type bits 10b).
            let value = if index == 0 {
                (self.bar[0] & !0xf) | 0x4
            } else {
                self.bar[1]
            };
            data.copy_from_slice(&value.to_le_bytes());
            return;
        }
        self.header.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if (reg::BAR0..reg::BAR0 + 8).contains(&offset) {
            let Ok(word) = <[u8; 4]>::try_from(data) else {
                guest_log!(Level::Debug, "virtio-pci: partial BAR write ignored");
                return;
            };
            let value = u32::from_le_bytes(word);
            // Size bits read back as zero: writing all-ones reads back the size (PCI 3.0, 6.2.5.1).
            let mask = !(u32::try_from(BAR_SIZE).unwrap_or(u32::MAX) - 1);
            if offset == reg::BAR0 {
                self.bar[0] = value & mask;
            } else {
                self.bar[1] = value;
            }
            self.bar_changed();
            return;
        }
        self.header.write(offset, data);
        if offset <= reg::COMMAND + 1 && offset + data.len() > reg::COMMAND {
            self.bar_changed();
        }
        if (MSIX_CAP + 2..MSIX_CAP + 4).contains(&(offset + data.len() - 1)) {
            let control = self.header.u16_at(MSIX_CAP + 2);
            self.msix.set_control(
                control & MSIX_ENABLE != 0,
                control & MSIX_FUNCTION_MASK != 0,
            );
        }
    }

    fn bar(&self) -> Option<(u64, u64)> {
        let decoding = self.header.u16_at(reg::COMMAND) & reg::COMMAND_MEMORY != 0;
        decoding.then(|| (self.bar_base(), BAR_SIZE))
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        let (region, at) = (offset & !(REGION_SIZE - 1), offset & (REGION_SIZE - 1));
        match region {
            COMMON_CFG => self.common_read(at, data),
            ISR_CFG => {
                // Reading the ISR acknowledges it (virtio 1.2, 4.1.4.5).
                let status = self.irq.status();
                self.irq.ack(status);
                data.fill(0);
                data[0] = (status & 0xff) as u8;
            }
            DEVICE_CFG => self.config.read(at, data),
            MSIX_TABLE => self.msix.table_read(at, data),
            MSIX_PBA => self.msix.pba_read(at, data),
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        let (region, at) = (offset & !(REGION_SIZE - 1), offset & (REGION_SIZE - 1));
        match region {
            COMMON_CFG => self.common_write(at, data),
            DEVICE_CFG => {
                if !self.config.write(at, data) {
                    guest_log!(
                        Level::Debug,
                        "virtio-pci: ignoring a write to read-only configuration byte {at:#x}"
                    );
                }
            }
            NOTIFY_CFG => {
                // Normally consumed by the KVM ioeventfd and never seen here.
                let queue = at / u64::from(NOTIFY_MULTIPLIER);
                if at % u64::from(NOTIFY_MULTIPLIER) != 0 || queue >= self.queue_events.len() as u64
                {
                    guest_log!(
                        Level::Debug,
                        "virtio-pci: notification of queue {queue}, which does not exist"
                    );
                    return;
                }
                self.transport()
                    .write_reg(REG_QUEUE_NOTIFY, u32::try_from(queue).unwrap_or(u32::MAX));
            }
            MSIX_TABLE => {
                if at >= ENTRY_SIZE * self.msix.len() as u64 {
                    guest_log!(
                        Level::Debug,
                        "virtio-pci: MSI-X table write at {at:#x} beyond its {} entries",
                        self.msix.len()
                    );
                    return;
                }
                self.msix.table_write(at, data);
            }
            _ => guest_log!(
                Level::Debug,
                "virtio-pci: write to read-only BAR offset {offset:#x}"
            ),
        }
    }
}

#[cfg(test)]
// The tests' addresses and sizes are constants below 4 GiB.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::devices::pci::{PciBarWindow, PciBus};
    use crate::devices::virtio::block::Block;
    use crate::devices::virtio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
    use crate::devices::virtio::{VirtioDevice, INT_VRING};
    use crate::devices::BusDevice;
    use crate::vstate::vm::GsiRoutes;
    use vm_memory::GuestAddress;

    const BAR: u64 = 0xe800_0000;

    struct Rig {
        dev: VirtioPciDevice,
        irq: Arc<IrqTrigger>,
        _vm: Arc<kvm_ioctls::VmFd>,
    }

    /// A one-queue disk as a PCI function in a real KVM VM (irqfds and ioeventfds need one).
    fn rig() -> Rig {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let path = std::env::temp_dir().join(format!(
            "skiff-vpci-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let block = Block::new(&path, false, "t").unwrap();
        std::fs::remove_file(&path).unwrap();
        let (irq, config, events) = (
            block.interrupt().clone(),
            block.config_space().clone(),
            (block.queue_events().iter())
                .map(|e| e.try_clone().unwrap())
                .collect::<Vec<_>>(),
        );
        let mem = crate::vstate::memory::anonymous(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let transport = MmioTransport::new(mem, Arc::new(Mutex::new(block))).unwrap();
        let routes = Arc::new(GsiRoutes::new(vm.clone()));
        let msix = Arc::new(MsixVectors::new(routes, vec![24, 25], 1).unwrap());
        irq.set_delivery(msix.clone());
        let dev = VirtioPciDevice::new(
            Arc::new(Mutex::new(transport)),
            2,
            irq.clone(),
            config,
            msix,
            events,
            BAR,
        )
        .unwrap();
        Rig { dev, irq, _vm: vm }
    }

    fn cfg32(d: &mut VirtioPciDevice, at: usize) -> u32 {
        let mut b = [0u8; 4];
        d.config_read(at, &mut b);
        u32::from_le_bytes(b)
    }

    fn bar_read(d: &mut VirtioPciDevice, at: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.bar_read(at, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn bar_write(d: &mut VirtioPciDevice, at: u64, value: u64, len: usize) {
        d.bar_write(at, &value.to_le_bytes()[..len]);
    }

    /// The capability list a driver walks: MSI-X first, then the four virtio structures,
    /// each pointing into BAR 0 inside its size.
    #[test]
    fn identity_and_capabilities() {
        let mut r = rig();
        let d = &mut r.dev;
        assert_eq!(cfg32(d, 0), 0x1042_1af4);
        assert_eq!(cfg32(d, reg::BAR0), (BAR as u32) | 0x4);
        let mut at = (cfg32(d, reg::CAPABILITIES) & 0xff) as usize;
        let mut found = Vec::new();
        while at != 0 {
            let head = cfg32(d, at);
            let (id, next) = (head & 0xff, (head >> 8) & 0xff);
            if id == u32::from(CAP_ID_VENDOR) {
                let (cfg_type, bar) = ((head >> 24) & 0xff, cfg32(d, at + 4) & 0xff);
                let (offset, len) = (cfg32(d, at + 8), cfg32(d, at + 12));
                assert_eq!(bar, 0);
                assert!(u64::from(offset) + u64::from(len) <= BAR_SIZE);
                found.push(cfg_type);
            } else {
                assert_eq!(id, u32::from(CAP_ID_MSIX));
                assert_eq!((head >> 16) & 0x7ff, 1, "two vectors");
                found.push(0x11);
            }
            at = next as usize;
        }
        assert_eq!(found, [0x11, 1, 3, 4, 2]);
    }

    /// BAR sizing (all-ones reads back the size), then a move: the registers follow, and the
    /// bus decodes the BAR at its new place only.
    #[test]
    fn bar_sizing_and_moves() {
        let r = rig();
        let bus = Arc::new(PciBus::new((BAR, 0x10_0000)));
        let dev = Arc::new(Mutex::new(r.dev));
        let slot = bus.add(dev.clone()).unwrap();
        let mut window = PciBarWindow::new(bus.clone());
        let mut d = [0u8; 2];
        window.read(0x12, &mut d);
        assert_eq!(
            u16::from_le_bytes(d),
            1,
            "num_queues at the pre-assigned BAR"
        );
        {
            let mut f = dev.lock().unwrap();
            f.config_write(reg::COMMAND, &0u16.to_le_bytes());
            f.config_write(reg::BAR0, &u32::MAX.to_le_bytes());
            f.config_write(reg::BAR0 + 4, &u32::MAX.to_le_bytes());
            assert_eq!(cfg32(&mut f, reg::BAR0), !(BAR_SIZE as u32 - 1) | 0x4);
            assert_eq!(cfg32(&mut f, reg::BAR0 + 4), u32::MAX);
            f.config_write(reg::BAR0, &((BAR + 0x10000) as u32).to_le_bytes());
            f.config_write(reg::BAR0 + 4, &0u32.to_le_bytes());
        }
        // Through the ECAM-less path the bus sees config writes; here, re-read it as the
        // bus would after one.
        let mut io = crate::devices::pci::PciConfigIo::new(bus.clone());
        let cmd = 0x8000_0000u32 | ((slot as u32) << 11) | reg::COMMAND as u32;
        io.write(0, &cmd.to_le_bytes());
        io.write(4, &u32::from(reg::COMMAND_MEMORY).to_le_bytes());
        window.read(0x12, &mut d);
        assert_eq!(d, [0xff; 2], "old place no longer decoded");
        window.read(0x10012, &mut d);
        assert_eq!(u16::from_le_bytes(d), 1, "decoded at the new place");
        // Over guest RAM (outside the window): not decoded anywhere, no panic.
        io.write(
            0,
            &(cmd - reg::COMMAND as u32 + reg::BAR0 as u32).to_le_bytes(),
        );
        io.write(4, &0x1000u32.to_le_bytes());
        window.read(0x10012, &mut d);
        assert_eq!(d, [0xff; 2]);
    }

    /// What a hostile driver may write: bad sizes and offsets in the common configuration,
    /// read-only fields, a notification of a queue that does not exist, MSI-X entries past
    /// the table, a queue vector the table does not have. Nothing changes, nothing panics.
    #[test]
    fn hostile_accesses_change_nothing() {
        let mut r = rig();
        let d = &mut r.dev;
        bar_write(d, common::NUM_QUEUES, 7, 2);
        assert_eq!(bar_read(d, common::NUM_QUEUES, 2), 1);
        bar_write(d, 0x13, 0xff, 1);
        bar_write(d, common::DEVICE_STATUS, 0xffff, 2);
        assert_eq!(bar_read(d, common::DEVICE_STATUS, 1), 0);
        assert_eq!(bar_read(d, 0x3f, 1), 0);
        bar_write(d, 0x40, 1, 4);
        bar_write(d, NOTIFY_CFG + 4 * 9, 9, 2);
        bar_write(d, NOTIFY_CFG + 1, 0, 1);
        bar_write(d, MSIX_TABLE + ENTRY_SIZE * 5, 0xfee0_0000, 4);
        assert_eq!(bar_read(d, MSIX_TABLE + ENTRY_SIZE * 5, 4), 0);
        bar_write(d, common::QUEUE_SELECT, 0, 2);
        bar_write(d, common::QUEUE_MSIX_VECTOR, 9, 2);
        assert_eq!(bar_read(d, common::QUEUE_MSIX_VECTOR, 2), 0xffff);
        bar_write(d, common::QUEUE_SELECT, 300, 2);
        assert_eq!(bar_read(d, common::QUEUE_SIZE, 2), 0, "no such queue");
        bar_write(d, common::QUEUE_MSIX_VECTOR, 0, 2);
        bar_write(d, 0x7fff, 1, 1);
        // A reset puts the selectors back to 0 (a stale one would point reads at a queue
        // the writes no longer reach).
        bar_write(d, common::QUEUE_SELECT, 1, 2);
        bar_write(d, common::DRIVER_FEATURE_SELECT, 1, 4);
        bar_write(d, common::DEVICE_STATUS, 0, 1);
        assert_eq!(bar_read(d, common::QUEUE_SELECT, 2), 0);
        assert_eq!(bar_read(d, common::DRIVER_FEATURE_SELECT, 4), 0);
        d.config_write(0x3ff, &[1, 2]);
        d.config_write(reg::BAR0 + 1, &[1]);
        assert_eq!(cfg32(d, reg::BAR0), (BAR as u32) | 0x4);
        assert_eq!(cfg32(d, 0x800), 0);
    }

    /// A driver's path to DRIVER_OK through the common configuration, then an interrupt on a
    /// masked vector that waits in the PBA and clears when the vector is unmasked.
    #[test]
    fn driver_ok_and_masked_vectors_keep_their_pending_bit() {
        let mut r = rig();
        let d = &mut r.dev;
        bar_write(d, common::DEVICE_STATUS, ACKNOWLEDGE.into(), 1);
        bar_write(d, common::DEVICE_STATUS, (ACKNOWLEDGE | DRIVER).into(), 1);
        bar_write(d, common::DRIVER_FEATURE_SELECT, 1, 4);
        bar_write(d, common::DRIVER_FEATURE, 1, 4);
        bar_write(
            d,
            common::DEVICE_STATUS,
            (ACKNOWLEDGE | DRIVER | FEATURES_OK).into(),
            1,
        );
        assert_eq!(bar_read(d, common::DRIVER_FEATURE, 4), 1);
        bar_write(d, common::QUEUE_SELECT, 0, 2);
        assert_eq!(bar_read(d, common::QUEUE_SIZE, 2), 256);
        bar_write(d, common::QUEUE_SIZE, 16, 2);
        bar_write(d, common::QUEUE_DESC, 0x1000, 4);
        bar_write(d, common::QUEUE_DRIVER, 0x2000, 4);
        bar_write(d, common::QUEUE_DEVICE, 0x3000, 4);
        assert_eq!(bar_read(d, common::QUEUE_DRIVER, 4), 0x2000);
        bar_write(d, common::QUEUE_MSIX_VECTOR, 1, 2);
        bar_write(d, common::CONFIG_MSIX_VECTOR, 0, 2);
        bar_write(d, common::QUEUE_ENABLE, 1, 2);
        let all = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
        bar_write(d, common::DEVICE_STATUS, all.into(), 1);
        assert_eq!(bar_read(d, common::DEVICE_STATUS, 1), u64::from(all));
        // MSI-X on, vector 1 programmed but masked.
        d.config_write(MSIX_CAP + 2, &MSIX_ENABLE.to_le_bytes());
        let entry = MSIX_TABLE + ENTRY_SIZE;
        bar_write(d, entry, 0xfee0_0000, 4);
        bar_write(d, entry + 8, 0x31, 4);
        assert_eq!(bar_read(d, entry + 12, 4), 1, "masked from the start");
        r.irq.trigger_queue(0).unwrap();
        assert_eq!(bar_read(d, MSIX_PBA, 1), 0b10);
        assert_eq!(bar_read(d, ISR_CFG, 1), u64::from(INT_VRING));
        assert_eq!(bar_read(d, ISR_CFG, 1), 0, "reading the ISR clears it");
        bar_write(d, entry + 12, 0, 4);
        assert_eq!(bar_read(d, MSIX_PBA, 1), 0, "delivered on unmask");
        // A reset forgets the vectors.
        bar_write(d, common::DEVICE_STATUS, 0, 1);
        assert_eq!(bar_read(d, common::QUEUE_MSIX_VECTOR, 2), 0xffff);
    }

    /// A function's registers survive save and restore into a new one (the MSI-X table, the
    /// vector choices, a moved BAR); a saved state of another shape is refused, not applied.
    #[test]
    fn save_and_restore_and_bad_saved_states() {
        let mut a = rig();
        bar_write(&mut a.dev, MSIX_TABLE + ENTRY_SIZE, 0xfee0_0000, 4);
        bar_write(&mut a.dev, MSIX_TABLE + ENTRY_SIZE + 8, 0x41, 4);
        bar_write(&mut a.dev, common::QUEUE_MSIX_VECTOR, 1, 2);
        a.dev.config_write(MSIX_CAP + 2, &MSIX_ENABLE.to_le_bytes());
        a.dev
            .config_write(reg::BAR0, &((BAR + 0x8000) as u32).to_le_bytes());
        let saved = a.dev.save(3);
        let mut b = rig();
        b.dev.restore(&saved).unwrap();
        assert_eq!(bar_read(&mut b.dev, MSIX_TABLE + ENTRY_SIZE + 8, 4), 0x41);
        assert_eq!(bar_read(&mut b.dev, common::QUEUE_MSIX_VECTOR, 2), 1);
        assert_eq!(b.dev.bar(), Some((BAR + 0x8000, BAR_SIZE)));
        assert_eq!(b.dev.save(3), saved);
        let mut short = saved.clone();
        short.header.truncate(10);
        assert!(b.dev.restore(&short).is_err());
        let mut wide = saved;
        wide.msix.entries.push(wide.msix.entries[0]);
        assert!(b.dev.restore(&wide).is_err());
    }
}
