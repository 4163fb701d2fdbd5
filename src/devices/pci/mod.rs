//! PCI bus 0 of a microVM: a host bridge at 00:00.0 and one function per virtio-pci device,
//! with configuration space reached two ways, through ECAM (an MMIO window, PCIe 6.0 7.2.2)
//! and through configuration mechanism #1 (ports 0xcf8/0xcfc). Skiff's Linux guest has no
//! ACPI, hence no MCFG table telling it where ECAM is: it finds the bus only through the ports
//! (Linux arch/x86/pci/direct.c, which also wants a host bridge on bus 0 to trust them).
//!
//! The functions' BARs are decoded by one window on the MMIO bus ([`PciBarWindow`]) that looks
//! up the function whose BAR holds an address; a guest that moves a BAR (after sizing it)
//! moves it in that table.

pub mod msix;

use std::sync::{Arc, Mutex, PoisonError, RwLock};

use log::Level;

use crate::devices::BusDevice;
use crate::guest_log;

/// Devices on bus 0.
pub const DEVICES_PER_BUS: usize = 32;
/// Size of a function's configuration space in ECAM (PCIe: 4 KiB, of which the first 256
/// bytes are the conventional PCI space this bus implements).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Conventional configuration space.
const CONFIG_HEADER_SIZE: usize = 256;

/// Configuration header registers (PCI 3.0, 6.1).
pub mod reg {
    /// Vendor ID (16 bits), then device ID.
    pub const VENDOR_ID: usize = 0x00;
    /// Command (16 bits), then status.
    pub const COMMAND: usize = 0x04;
    /// Revision ID (8 bits), then the class code (24 bits).
    pub const REVISION: usize = 0x08;
    /// Header type (8 bits).
    pub const HEADER_TYPE: usize = 0x0e;
    /// First base address register.
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID (16 bits), then subsystem ID.
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    /// Capabilities pointer (8 bits).
    pub const CAPABILITIES: usize = 0x34;
    /// Command bit: the function decodes its memory BARs.
    pub const COMMAND_MEMORY: u16 = 0x2;
    /// Command bit: the function may master the bus (DMA, MSI).
    pub const COMMAND_MASTER: u16 = 0x4;
    /// Command bit: INTx disabled.
    pub const COMMAND_INTX_DISABLE: u16 = 0x400;
    /// Status bit: a capability list is present.
    pub const STATUS_CAPABILITIES: u16 = 0x10;
}

/// A function's conventional configuration space: its bytes and which bits the guest may
/// change; everything else reads back as the function set it.
#[derive(Debug, Clone)]
pub struct ConfigHeader {
    bytes: [u8; CONFIG_HEADER_SIZE],
    writable: [u8; CONFIG_HEADER_SIZE],
}

impl Default for ConfigHeader {
    fn default() -> Self {
        Self {
            bytes: [0; CONFIG_HEADER_SIZE],
            writable: [0; CONFIG_HEADER_SIZE],
        }
    }
}

impl ConfigHeader {
    /// A type-0 header for `vendor:device` of `class` (base, sub-class, interface).
    pub fn new(vendor: u16, device: u16, revision: u8, class: [u8; 3]) -> Self {
        let mut h = Self::default();
        h.set_u16(reg::VENDOR_ID, vendor);
        h.set_u16(reg::VENDOR_ID + 2, device);
        h.bytes[reg::REVISION] = revision;
        h.bytes[reg::REVISION + 1] = class[2];
        h.bytes[reg::REVISION + 2] = class[1];
        h.bytes[reg::REVISION + 3] = class[0];
        h
    }

    /// Sets the 16-bit register at `offset`.
    pub fn set_u16(&mut self, offset: usize, value: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    /// Sets the 32-bit register at `offset`.
    pub fn set_u32(&mut self, offset: usize, value: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }

    /// The 16-bit register at `offset`.
    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    /// Lets the guest change `mask`'s bits of the byte at `offset`.
    pub fn allow_write(&mut self, offset: usize, mask: &[u8]) {
        self.writable[offset..offset + mask.len()].copy_from_slice(mask);
    }

    /// Places `body` (after the ID and next-pointer bytes) as capability `id` at `offset`,
    /// linked after `prev` (the capabilities pointer when `prev` is 0).
    pub fn add_capability(&mut self, prev: usize, offset: usize, id: u8, body: &[u8]) {
        self.bytes[offset] = id;
        self.bytes[offset + 1] = 0;
        self.bytes[offset + 2..offset + 2 + body.len()].copy_from_slice(body);
        let link = if prev == 0 {
            reg::CAPABILITIES
        } else {
            prev + 1
        };
        self.bytes[link] = u8::try_from(offset).unwrap_or(0);
        let status = self.u16_at(reg::COMMAND + 2) | reg::STATUS_CAPABILITIES;
        self.set_u16(reg::COMMAND + 2, status);
    }

    /// Puts back saved bytes (what the guest could not change stays as this Skiff made it).
    pub fn restore(&mut self, saved: &[u8]) {
        for (i, (b, &s)) in self.bytes.iter_mut().zip(saved).enumerate() {
            let mask = self.writable[i];
            *b = (*b & !mask) | (s & mask);
        }
    }

    /// Reads `data.len()` bytes at `offset`; beyond the conventional space reads zeros.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// Writes `data` at `offset`, keeping the bits the guest may not change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let Some(mask) = self.writable.get(offset + i).copied() else {
                return;
            };
            let old = self.bytes[offset + i];
            self.bytes[offset + i] = (old & !mask) | (b & mask);
        }
    }
}

/// One function on the bus: its configuration space and its memory BAR.
pub trait PciFunction: Send {
    /// The guest reads configuration space at `offset` (below [`CONFIG_SPACE_SIZE`]).
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    /// The guest writes configuration space at `offset` (below [`CONFIG_SPACE_SIZE`]).
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// Where the function's memory BAR decodes now (base, size), if it does.
    fn bar(&self) -> Option<(u64, u64)>;
    /// The guest reads the BAR at `offset`.
    fn bar_read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes the BAR at `offset`.
    fn bar_write(&mut self, offset: u64, data: &[u8]);
}

type Function = Arc<Mutex<dyn PciFunction>>;

fn lock(f: &Function) -> std::sync::MutexGuard<'_, dyn PciFunction + 'static> {
    f.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Bus 0: its functions by device number and where their BARs decode.
pub struct PciBus {
    devices: RwLock<Vec<Option<Function>>>,
    /// (base, size, device number) of each decoding BAR inside `window`.
    bars: RwLock<Vec<(u64, u64, usize)>>,
    window: (u64, u64),
}

impl std::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciBus")
            .field("window", &self.window)
            .finish()
    }
}

/// Why a function cannot be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// Every device number is taken.
    #[error("no PCI device number left on bus 0 (at most {DEVICES_PER_BUS})")]
    BusFull,
    /// The BAR window is full.
    #[error("no room left in the PCI BAR window")]
    WindowFull,
}

impl PciBus {
    /// Bus 0 with the host bridge at 00:00.0, decoding BARs in `[base, base + size)`.
    pub fn new(window: (u64, u64)) -> Self {
        let bus = Self {
            devices: RwLock::new(vec![None; DEVICES_PER_BUS]),
            bars: RwLock::new(Vec::new()),
            window,
        };
        let bridge: Function = Arc::new(Mutex::new(HostBridge::new()));
        bus.devices.write().unwrap_or_else(PoisonError::into_inner)[0] = Some(bridge);
        bus
    }

    /// Adds `function` under the next free device number, which it returns.
    pub fn add(&self, function: Function) -> Result<usize, PciError> {
        let mut devices = self.devices.write().unwrap_or_else(PoisonError::into_inner);
        let slot = devices
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::BusFull)?;
        devices[slot] = Some(function);
        drop(devices);
        self.update_bar(slot);
        Ok(slot)
    }

    fn function(&self, device: usize) -> Option<Function> {
        let devices = self.devices.read().unwrap_or_else(PoisonError::into_inner);
        devices.get(device).cloned().flatten()
    }

    /// Re-reads where device `device`'s BAR decodes, after its configuration changed.
    fn update_bar(&self, device: usize) {
        let Some(function) = self.function(device) else {
            return;
        };
        let bar = lock(&function).bar();
        let (wbase, wsize) = self.window;
        let mut bars = self.bars.write().unwrap_or_else(PoisonError::into_inner);
        bars.retain(|&(_, _, d)| d != device);
        let Some((base, size)) = bar else {
            return;
        };
        let inside = base >= wbase && base.checked_add(size).is_some_and(|e| e <= wbase + wsize);
        let overlaps = bars
            .iter()
            .any(|&(b, s, _)| base < b + s && b < base + size);
        if !inside || overlaps {
            guest_log!(
                Level::Debug,
                "pci: 00:{device:02x}.0 BAR at {base:#x} is outside the PCI window or overlaps another BAR: not decoded"
            );
            return;
        }
        bars.push((base, size, device));
    }

    /// Configuration access to bus 0, device `device`, function `function`, at `offset`.
    fn config_access(&self, device: usize, function: usize, offset: usize, access: Access<'_>) {
        let found = (function == 0).then(|| self.function(device)).flatten();
        let Some(f) = found else {
            if let Access::Read(data) = access {
                data.fill(0xff);
            }
            return;
        };
        match access {
            Access::Read(data) => lock(&f).config_read(offset, data),
            Access::Write(data) => {
                lock(&f).config_write(offset, data);
                // Only the command register (memory decoding) and the 64-bit BAR move where the
                // BAR answers.
                let touches =
                    |start: usize, len: usize| offset < start + len && start < offset + data.len();
                if touches(reg::COMMAND, 2) || touches(reg::BAR0, 8) {
                    self.update_bar(device);
                }
            }
        }
    }

    /// The function whose BAR holds `addr`, with the offset in the BAR.
    fn bar_at(&self, addr: u64, len: usize) -> Option<(Function, u64)> {
        let bars = self.bars.read().unwrap_or_else(PoisonError::into_inner);
        let &(base, _, device) = bars
            .iter()
            .find(|&&(b, s, _)| addr >= b && addr + len as u64 <= b + s)?;
        drop(bars);
        Some((self.function(device)?, addr - base))
    }
}

enum Access<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

/// The host bridge at 00:00.0 (Linux's conf1 probe looks for a host-bridge class there).
struct HostBridge {
    header: ConfigHeader,
}

impl HostBridge {
    fn new() -> Self {
        // Red Hat's ID for an emulated PCIe host bridge; class 06/00/00 (host bridge).
        let mut header = ConfigHeader::new(0x1b36, 0x0008, 0, [0x06, 0x00, 0x00]);
        header.allow_write(reg::COMMAND, &[0x06, 0x04]);
        Self { header }
    }
}

impl PciFunction for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.header.read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.header.write(offset, data);
    }
    fn bar(&self) -> Option<(u64, u64)> {
        None
    }
    fn bar_read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// Configuration mechanism #1 at ports 0xcf8-0xcff: CONFIG_ADDRESS (enable bit 31, bus,
/// device, function, register) then CONFIG_DATA.
#[derive(Debug)]
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: u32,
}

impl PciConfigIo {
    /// The ports for `bus`.
    pub fn new(bus: Arc<PciBus>) -> Self {
        Self { bus, address: 0 }
    }

    /// (device, function, register) the address register selects on bus 0, if enabled.
    fn target(&self) -> Option<(usize, usize, usize)> {
        let a = self.address;
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        (enabled && bus == 0).then_some((
            ((a >> 11) & 0x1f) as usize,
            ((a >> 8) & 0x7) as usize,
            (a & 0xfc) as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The bus gives offsets below 8.
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 if offset + data.len() <= 8 => match self.target() {
                Some((dev, func, reg)) => {
                    let at = reg + (offset - 4);
                    self.bus.config_access(dev, func, at, Access::Read(data));
                }
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        match offset {
            0 => match <[u8; 4]>::try_from(data) {
                Ok(word) => self.address = u32::from_le_bytes(word),
                // Linux's probe writes one byte to 0xcfb first; it changes nothing here.
                Err(_) => guest_log!(
                    Level::Debug,
                    "pci: {}-byte CONFIG_ADDRESS write",
                    data.len()
                ),
            },
            4..=7 if offset + data.len() <= 8 => {
                if let Some((dev, func, reg)) = self.target() {
                    let at = reg + (offset - 4);
                    self.bus.config_access(dev, func, at, Access::Write(data));
                }
            }
            _ => guest_log!(Level::Debug, "pci: write to config port offset {offset}"),
        }
    }
}

/// ECAM for bus 0: device, function and register from the offset (PCIe 6.0, 7.2.2).
#[derive(Debug)]
pub struct PciConfigMmio {
    bus: Arc<PciBus>,
}

impl PciConfigMmio {
    /// The ECAM window of `bus`.
    pub fn new(bus: Arc<PciBus>) -> Self {
        Self { bus }
    }

    fn split(offset: u64, len: usize) -> Option<(usize, usize, usize)> {
        let reg = (offset & 0xfff) as usize;
        // Aligned accesses of 1, 2 or 4 bytes within one register.
        let aligned = matches!(len, 1 | 2 | 4) && reg.is_multiple_of(len);
        aligned.then_some((
            ((offset >> 15) & 0x1f) as usize,
            ((offset >> 12) & 0x7) as usize,
            reg,
        ))
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::split(offset, data.len()) {
            Some((dev, func, reg)) => self.bus.config_access(dev, func, reg, Access::Read(data)),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match Self::split(offset, data.len()) {
            Some((dev, func, reg)) => self.bus.config_access(dev, func, reg, Access::Write(data)),
            None => guest_log!(
                Level::Debug,
                "pci: unaligned {}-byte ECAM write at {offset:#x}",
                data.len()
            ),
        }
    }
}

/// The PCI BAR window on the MMIO bus: each access goes to the function whose BAR holds it.
#[derive(Debug)]
pub struct PciBarWindow {
    bus: Arc<PciBus>,
}

impl PciBarWindow {
    /// The window of `bus`.
    pub fn new(bus: Arc<PciBus>) -> Self {
        Self { bus }
    }
}

impl BusDevice for PciBarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.bus.bar_at(self.bus.window.0 + offset, data.len()) {
            Some((f, at)) => lock(&f).bar_read(at, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((f, at)) = self.bus.bar_at(self.bus.window.0 + offset, data.len()) {
            lock(&f).bar_write(at, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf1_read(io: &mut PciConfigIo, dev: u32, reg: u32) -> u32 {
        io.write(0, &(0x8000_0000 | (dev << 11) | reg).to_le_bytes());
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    /// Linux's conf1 probe: the address register reads back, and bus 0 holds a host bridge.
    #[test]
    fn conf1_finds_the_host_bridge_and_nothing_else() {
        let bus = Arc::new(PciBus::new((0xe800_0000, 0x100_0000)));
        let mut io = PciConfigIo::new(bus.clone());
        io.write(3, &[1]);
        io.write(0, &0x8000_0000u32.to_le_bytes());
        let mut d = [0u8; 4];
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
        assert_eq!(conf1_read(&mut io, 0, 0), 0x0008_1b36);
        assert_eq!(conf1_read(&mut io, 0, 8) >> 16, 0x0600);
        assert_eq!(conf1_read(&mut io, 5, 0), 0xffff_ffff, "empty slot");
        // The same through ECAM; a misaligned access reads all-ones.
        let mut ecam = PciConfigMmio::new(bus);
        ecam.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36);
        ecam.read(2, &mut d);
        assert_eq!(d, [0xff; 4]);
        // A bus other than 0, or the enable bit clear, reads all-ones too.
        io.write(0, &(0x8001_0000u32).to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn read_only_header_bits_stay() {
        let mut bridge = HostBridge::new();
        bridge.config_write(0, &[0, 0, 0, 0]);
        let mut d = [0u8; 2];
        bridge.config_read(0, &mut d);
        assert_eq!(u16::from_le_bytes(d), 0x1b36);
        bridge.config_write(reg::COMMAND, &0xffffu16.to_le_bytes());
        bridge.config_read(reg::COMMAND, &mut d);
        assert_eq!(u16::from_le_bytes(d), 0x0406);
        // Past the conventional space: zeros, writes dropped.
        bridge.config_write(0x800, &[1]);
        let mut e = [9u8; 1];
        bridge.config_read(0x800, &mut e);
        assert_eq!(e, [0]);
    }
}
