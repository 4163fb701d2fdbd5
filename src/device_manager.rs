//! Device wiring: which device sits at which port or MMIO range, which interrupt line each
//! raises (an eventfd registered as a KVM irqfd), and which need the event thread; the typed
//! registry of virtio devices by id, and the devices' saved state.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::MutEventSubscriber;
use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{
    I8042_KBD_IRQ, I8042_PORT_BASE, IOAPIC_NUM_PINS, IRQ_DEVICES_START, MMIO_DEVICES_START,
    MMIO_DEVICE_SLOT_SIZE, PCI_CONFIG_IO_PORT, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO_SIZE,
    PCI_MMIO_START, PROGRESS_PORT, SERIAL_IRQ, SERIAL_PORT_BASE,
};
use crate::devices::legacy::i8042::I8042State;
use crate::devices::legacy::serial::{ConsoleOutput, SerialState};
use crate::devices::legacy::{BootProgress, SerialDevice, I8042};
use crate::devices::pci::msix::{MsixError, MsixVectors};
use crate::devices::pci::{PciBarWindow, PciBus, PciConfigIo, PciConfigMmio, PciError};
use crate::devices::virtio::balloon::{Balloon, BalloonError, BalloonState};
use crate::devices::virtio::block::{Block, BlockError, BlockState};
use crate::devices::virtio::mem::{VirtioMem, VirtioMemError, VirtioMemState};
use crate::devices::virtio::mmio::{MmioTransport, MmioTransportState, MMIO_SIZE};
use crate::devices::virtio::net::{Net, NetError, NetState};
use crate::devices::virtio::pci::{
    VirtioPciDevice, VirtioPciRestoreError, VirtioPciState, BAR_SIZE,
};
use crate::devices::virtio::pmem::{Pmem, PmemError, PmemState};
use crate::devices::virtio::rng::{Rng, RngError, RngState};
use crate::devices::virtio::vsock::{Vsock, VsockError, VsockState};
use crate::devices::virtio::{QueueSnapshot, RestoreError, VirtioDevice};
use crate::devices::{Bus, BusDevice};
use crate::mmds::{MmdsConfig, MmdsStack, MmdsState, MmdsStore};
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vm::{GsiRoutes, FIRST_MSI_GSI};

/// A device the event thread drives.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Errors while creating or wiring devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// KVM refused an irqfd.
    #[error("cannot register the irqfd for IRQ {0}")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
    /// Two devices claimed the same range.
    #[error("cannot place a device on the bus")]
    Bus(#[source] crate::devices::bus::BusError),
    /// No MMIO slot or IRQ is left for another virtio device.
    #[error("too many virtio devices (at most {0})")]
    TooManyDevices(u32),
    /// KVM refused an ioeventfd.
    #[error("cannot register the ioeventfd for queue {queue} at {addr:#x}")]
    Ioeventfd {
        /// Queue index.
        queue: u32,
        /// Notify register address.
        addr: u64,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The console's input could not be duplicated.
    #[error("cannot use standard input as the console")]
    ConsoleInput(#[source] std::io::Error),
    /// The serial port could not be set up (from a snapshot: its saved state is invalid).
    #[error("cannot set up the serial port")]
    Serial(#[source] std::io::Error),
    /// Two virtio devices have the same id.
    #[error("two devices have the id {0}")]
    DuplicateId(String),
    /// A saved device does not fit the slot it was saved in.
    #[error("the snapshot's devices do not fill MMIO slots 0, 1, 2... in order")]
    SlotOrder,
    /// A saved disk cannot be restored.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A saved network interface cannot be restored.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The entropy device cannot be set up or restored.
    #[error(transparent)]
    Rng(#[from] RngError),
    /// The vsock device cannot be set up or restored.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// The balloon cannot be set up or restored.
    #[error(transparent)]
    Balloon(#[from] BalloonError),
    /// A pmem device cannot be set up or restored.
    #[error(transparent)]
    Pmem(#[from] PmemError),
    /// The memory hot-plug device cannot be set up or restored.
    #[error(transparent)]
    VirtioMem(#[from] VirtioMemError),
    /// A saved transport cannot be restored.
    #[error("virtio device {0}: cannot restore its transport")]
    Transport(String, #[source] RestoreError),
    /// A saved virtio-pci function cannot be put back.
    #[error("virtio-pci device in slot {0}: cannot restore it")]
    PciRestore(u32, #[source] VirtioPciRestoreError),
    /// The snapshot's PCI functions do not match its virtio devices.
    #[error("the snapshot's PCI functions do not match its virtio devices")]
    PciSlots,
    /// A virtio-pci device's MSI-X vectors cannot be set up.
    #[error("cannot set up MSI-X")]
    Msix(#[source] MsixError),
    /// The PCI bus has no room for another device.
    #[error(transparent)]
    Pci(#[from] PciError),
    /// The metadata service names an interface the VM does not have.
    #[error("MMDS: network interface {0} does not exist")]
    MmdsInterface(String),
}

/// A restored transport's saved registers and its device's running queues.
type SavedTransport<'a> = (&'a MmioTransportState, &'a [QueueSnapshot]);

/// A virtio device, its transport and where they sit, as a snapshot holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioSlotState<S> {
    /// The device's id in the API.
    pub id: String,
    /// Its MMIO slot (and with it, its address and IRQ).
    pub slot: u32,
    /// The transport's registers.
    pub transport: MmioTransportState,
    /// The device's own state.
    pub device: S,
}

/// Every device's state, as a snapshot holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialState,
    /// The i8042.
    pub i8042: I8042State,
    /// Disks.
    pub blocks: Vec<VirtioSlotState<BlockState>>,
    /// Network interfaces.
    pub nets: Vec<VirtioSlotState<NetState>>,
    /// The entropy device.
    pub entropy: Vec<VirtioSlotState<RngState>>,
    /// The vsock device.
    pub vsock: Vec<VirtioSlotState<VsockState>>,
    /// The balloon.
    pub balloon: Vec<VirtioSlotState<BalloonState>>,
    /// Persistent memory devices.
    pub pmem: Vec<VirtioSlotState<PmemState>>,
    /// The memory hot-plug device (virtio-mem).
    pub memory_hotplug: Vec<VirtioSlotState<VirtioMemState>>,
    /// The metadata service (its data store is not kept).
    pub mmds: Option<MmdsState>,
    /// With `--enable-pci`: each virtio device's PCI function, by slot.
    pub pci: Option<Vec<VirtioPciState>>,
}

/// A virtio device on its transport, found by id in the [`DeviceRegistry`].
#[derive(Debug)]
pub struct VirtioSlot<D> {
    /// The device.
    pub device: Arc<Mutex<D>>,
    /// Its transport, on the MMIO bus.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// Its MMIO slot.
    pub slot: u32,
}

/// The virtio devices by kind and id: what the API, snapshots and rate limiters reach, without
/// looking through the event thread's subscribers.
#[derive(Debug, Default)]
pub struct DeviceRegistry {
    /// Disks by drive id.
    pub blocks: BTreeMap<String, VirtioSlot<Block>>,
    /// Network interfaces by interface id.
    pub nets: BTreeMap<String, VirtioSlot<Net>>,
    /// The entropy device, under [`ENTROPY_ID`].
    pub entropy: BTreeMap<String, VirtioSlot<Rng>>,
    /// The vsock device, under [`VSOCK_ID`].
    pub vsock: BTreeMap<String, VirtioSlot<Vsock>>,
    /// The balloon, under [`BALLOON_ID`].
    pub balloon: BTreeMap<String, VirtioSlot<Balloon>>,
    /// Persistent memory devices by id.
    pub pmem: BTreeMap<String, VirtioSlot<Pmem>>,
    /// The memory hot-plug device, under [`MEMORY_HOTPLUG_ID`].
    pub memory_hotplug: BTreeMap<String, VirtioSlot<VirtioMem>>,
}

/// The registry's id of the entropy device (there is at most one, as in Firecracker).
pub const ENTROPY_ID: &str = "entropy";
/// The registry's id of the vsock device (there is at most one, as in Firecracker).
pub const VSOCK_ID: &str = "vsock";
/// The registry's id of the balloon (at most one, as in Firecracker).
pub const BALLOON_ID: &str = "balloon";
/// The registry's id of the memory hot-plug device (at most one, as in Firecracker).
pub const MEMORY_HOTPLUG_ID: &str = "memory-hotplug";

impl DeviceRegistry {
    fn has(&self, id: &str) -> bool {
        self.blocks.contains_key(id)
            || self.nets.contains_key(id)
            || self.entropy.contains_key(id)
            || self.vsock.contains_key(id)
            || self.balloon.contains_key(id)
            || self.pmem.contains_key(id)
            || self.memory_hotplug.contains_key(id)
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where the guest console goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConsoleInput {
    /// Host standard input feeds the guest's serial port.
    #[default]
    Stdin,
    /// The guest's serial port has no input.
    None,
}

/// The VM's devices and the buses they sit on.
pub struct DeviceManager {
    pio_bus: Bus,
    mmio_bus: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    progress: Arc<Mutex<BootProgress>>,
    virtio_subscribers: Vec<Subscriber>,
    registry: DeviceRegistry,
    /// The metadata service, once attached: its configuration and store.
    mmds: Option<(MmdsConfig, MmdsStore)>,
    /// With `--enable-pci`: where virtio devices go instead of MMIO slots.
    pci: Option<PciParts>,
}

/// The PCI bus and what placing a device on it takes.
#[derive(Debug)]
struct PciParts {
    bus: Arc<PciBus>,
    routes: Arc<GsiRoutes>,
    next_gsi: u32,
    next_bar: u64,
    /// Each device's function, by slot.
    functions: Vec<(u32, Arc<Mutex<VirtioPciDevice>>)>,
    /// When restoring: the saved functions, by slot.
    saved: BTreeMap<u32, VirtioPciState>,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager")
            .field("pio_bus", &self.pio_bus)
            .field("mmio_bus", &self.mmio_bus)
            .field("virtio_devices", &self.virtio_subscribers.len())
            .finish()
    }
}

fn irq_line(vm: &VmFd, gsi: u32) -> Result<EventFd, DeviceError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(DeviceError::EventFd)?;
    vm.register_irqfd(&evt, gsi)
        .map_err(|e| DeviceError::Irqfd(gsi, e))?;
    Ok(evt)
}

impl DeviceError {
    /// Names the device a transport error is about.
    fn for_device(self, id: &str) -> Self {
        match self {
            Self::Transport(_, e) => Self::Transport(id.to_owned(), e),
            other => other,
        }
    }
}

impl DeviceManager {
    /// Creates the legacy devices: COM1 on 0x3f8/IRQ 4 (writing to `out`), the i8042 on 0x60/0x64/IRQ 1 (calling `on_reset` for a CPU reset) and the
    /// boot-progress port timing against `start`; from `saved` state when restoring.
    pub fn new(
        vm: &VmFd,
        console: ConsoleInput,
        out: ConsoleOutput,
        on_reset: Box<dyn Fn() + Send>,
        start: Instant,
        saved: Option<&DevicesState>,
    ) -> Result<Self, DeviceError> {
        let input = match console {
            ConsoleInput::Stdin => {
                let fd = std::io::stdin()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(DeviceError::ConsoleInput)?;
                Some(File::from(fd))
            }
            ConsoleInput::None => None,
        };
        let out: Box<dyn Write + Send> = Box::new(out);
        let serial_irq = irq_line(vm, SERIAL_IRQ)?;
        let kbd_irq = irq_line(vm, I8042_KBD_IRQ)?;
        let (serial, i8042) = match saved {
            Some(state) => (
                SerialDevice::from_state(&state.serial, serial_irq, out, input),
                I8042::from_state(&state.i8042, kbd_irq, on_reset),
            ),
            None => (
                SerialDevice::new(serial_irq, out, input),
                I8042::new(kbd_irq, on_reset),
            ),
        };
        let serial = Arc::new(Mutex::new(serial.map_err(DeviceError::Serial)?));
        let i8042 = Arc::new(Mutex::new(i8042));
        let progress = Arc::new(Mutex::new(BootProgress::new(start)));

        let mut pio_bus = Bus::new();
        let mut add = |dev: Arc<Mutex<dyn BusDevice>>, base: u16, len: u64| {
            pio_bus
                .insert(dev, u64::from(base), len)
                .map_err(DeviceError::Bus)
        };
        add(serial.clone(), SERIAL_PORT_BASE, 8)?;
        add(i8042.clone(), I8042_PORT_BASE, 5)?;
        add(progress.clone(), PROGRESS_PORT, 1)?;
        Ok(Self {
            pio_bus,
            mmio_bus: Bus::new(),
            serial,
            i8042,
            progress,
            virtio_subscribers: Vec::new(),
            registry: DeviceRegistry::default(),
            mmds: None,
            pci: None,
        })
    }

    /// Puts the virtio devices added from now on a PCI bus (a host bridge, configuration space
    /// through ECAM and the 0xcf8 ports, BARs in the PCI window, MSI-X through `vm`'s GSI
    /// routing) instead of MMIO slots. Returns the range to reserve in the e820 map (ECAM).
    pub fn enable_pci(&mut self, vm: Arc<VmFd>) -> Result<(u64, u64), DeviceError> {
        let bus = Arc::new(PciBus::new((PCI_MMIO_START, PCI_MMIO_SIZE)));
        self.pio_bus
            .insert(
                Arc::new(Mutex::new(PciConfigIo::new(bus.clone()))),
                u64::from(PCI_CONFIG_IO_PORT),
                8,
            )
            .map_err(DeviceError::Bus)?;
        self.mmio_bus
            .insert(
                Arc::new(Mutex::new(PciConfigMmio::new(bus.clone()))),
                PCI_ECAM_START,
                PCI_ECAM_SIZE,
            )
            .map_err(DeviceError::Bus)?;
        self.mmio_bus
            .insert(
                Arc::new(Mutex::new(PciBarWindow::new(bus.clone()))),
                PCI_MMIO_START,
                PCI_MMIO_SIZE,
            )
            .map_err(DeviceError::Bus)?;
        self.pci = Some(PciParts {
            bus,
            routes: Arc::new(GsiRoutes::new(vm)),
            next_gsi: FIRST_MSI_GSI,
            next_bar: PCI_MMIO_START,
            functions: Vec::new(),
            saved: BTreeMap::new(),
        });
        Ok((PCI_ECAM_START, PCI_ECAM_SIZE))
    }

    /// Whether the virtio devices are on PCI.
    pub fn pci_enabled(&self) -> bool {
        self.pci.is_some()
    }

    /// Adds disk `id` in the next MMIO slot; returns its kernel parameter.
    pub fn add_block(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        id: &str,
        block: Block,
    ) -> Result<String, DeviceError> {
        self.attach(vm, mem, id, block, None, |r| &mut r.blocks)
    }

    /// Adds network interface `id` in the next MMIO slot; returns its kernel parameter.
    pub fn add_net(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        id: &str,
        net: Net,
    ) -> Result<String, DeviceError> {
        self.attach(vm, mem, id, net, None, |r| &mut r.nets)
    }

    /// Adds the entropy device in the next MMIO slot; returns its kernel parameter.
    pub fn add_rng(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        rng: Rng,
    ) -> Result<String, DeviceError> {
        self.attach(vm, mem, ENTROPY_ID, rng, None, |r| &mut r.entropy)
    }

    /// Adds the vsock device in the next MMIO slot; returns its kernel parameter.
    pub fn add_vsock(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        vsock: Vsock,
    ) -> Result<String, DeviceError> {
        self.attach(vm, mem, VSOCK_ID, vsock, None, |r| &mut r.vsock)
    }

    /// Adds the balloon in the next MMIO slot; returns its kernel parameter.
    pub fn add_balloon(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        balloon: Balloon,
    ) -> Result<String, DeviceError> {
        self.attach(vm, mem, BALLOON_ID, balloon, None, |r| &mut r.balloon)
    }
    /// Adds pmem device `id` in the next MMIO slot; returns its kernel parameter.
    pub fn add_pmem(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        id: &str,
        pmem: Pmem,
    ) -> Result<String, DeviceError> {
        self.attach(vm, mem, id, pmem, None, |r| &mut r.pmem)
    }

    /// Adds the memory hot-plug device in the next MMIO slot; returns its kernel parameter.
    pub fn add_memory_hotplug(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        device: VirtioMem,
    ) -> Result<String, DeviceError> {
        self.attach(vm, mem, MEMORY_HOTPLUG_ID, device, None, |r| {
            &mut r.memory_hotplug
        })
    }

    /// Registers `device` (see [`DeviceManager::register_virtio_device`]) and files it under
    /// `id` in the registry's `table`.
    fn attach<D>(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        id: &str,
        device: D,
        saved: Option<SavedTransport<'_>>,
        table: fn(&mut DeviceRegistry) -> &mut BTreeMap<String, VirtioSlot<D>>,
    ) -> Result<String, DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        if self.registry.has(id) {
            return Err(DeviceError::DuplicateId(id.to_owned()));
        }
        let device = Arc::new(Mutex::new(device));
        let (slot, transport, param) = self
            .register_virtio_device(vm, mem, device.clone(), saved)
            .map_err(|e| e.for_device(id))?;
        let entry = VirtioSlot {
            device,
            transport,
            slot,
        };
        table(&mut self.registry).insert(id.to_owned(), entry);
        Ok(param)
    }

    /// Waits for every block request in flight and answers it (status, used ring,
    /// interrupt), so that a snapshot taken next holds no half-done request.
    pub fn complete_block_io(&self) {
        for slot in self.registry.blocks.values() {
            lock(&slot.device).complete_in_flight();
        }
    }

    /// Every device's state; the vCPUs and the event thread must stand still.
    pub fn save(&self) -> DevicesState {
        fn slot_state<D, S>(
            id: &str,
            slot: &VirtioSlot<D>,
            save: impl Fn(&D) -> S,
        ) -> VirtioSlotState<S> {
            VirtioSlotState {
                id: id.to_owned(),
                slot: slot.slot,
                transport: lock(&slot.transport).save(),
                device: save(&lock(&slot.device)),
            }
        }
        let r = &self.registry;
        DevicesState {
            serial: lock(&self.serial).save(),
            i8042: lock(&self.i8042).save(),
            blocks: (r.blocks.iter())
                .map(|(id, s)| slot_state(id, s, Block::save))
                .collect(),
            nets: (r.nets.iter())
                .map(|(id, s)| slot_state(id, s, Net::save))
                .collect(),
            entropy: (r.entropy.iter())
                .map(|(id, s)| slot_state(id, s, Rng::save))
                .collect(),
            vsock: (r.vsock.iter())
                .map(|(id, s)| slot_state(id, s, Vsock::save))
                .collect(),
            balloon: (r.balloon.iter())
                .map(|(id, s)| slot_state(id, s, Balloon::save))
                .collect(),
            pmem: (r.pmem.iter())
                .map(|(id, s)| slot_state(id, s, Pmem::save))
                .collect(),
            memory_hotplug: (r.memory_hotplug.iter())
                .map(|(id, s)| slot_state(id, s, VirtioMem::save))
                .collect(),
            mmds: self
                .mmds
                .as_ref()
                .map(|(config, _)| MmdsState::save(config)),
            pci: self.pci.as_ref().map(|pci| {
                (pci.functions.iter())
                    .map(|(slot, f)| lock(f).save(*slot))
                    .collect()
            }),
        }
    }

    /// Makes the interfaces `config` names answer for the metadata service from `store`
    /// (configured with the version and IMDS compatibility `config` gives), at boot or after
    /// a restore; the network interfaces must be attached first.
    pub fn attach_mmds(
        &mut self,
        config: &MmdsConfig,
        store: MmdsStore,
    ) -> Result<(), DeviceError> {
        let nets = (config.network_interfaces.iter())
            .map(|id| {
                (self.registry.nets.get(id)).ok_or_else(|| DeviceError::MmdsInterface(id.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        store.configure(config.version, config.imds_compat);
        for net in nets {
            lock(&net.device).set_mmds(Some(MmdsStack::new(config.ipv4(), store.clone())));
        }
        self.mmds = Some((config.clone(), store));
        Ok(())
    }

    /// The metadata service's store, when the service is attached.
    pub fn mmds_store(&self) -> Option<&MmdsStore> {
        self.mmds.as_ref().map(|(_, store)| store)
    }

    /// Puts back the virtio devices `state` saved, each in its slot, with its transport and,
    /// where the driver had it running, its queues. A network interface's TAP is the one
    /// `tap_override` gives for its id, or the saved one; the vsock device listens on
    /// `vsock_override`, or its saved path.
    /// `tap_override` gives for its id, or the saved one; `log_dirty` as guest memory was
    /// registered (for the hot-plug slots).
    pub fn restore_virtio(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        state: &DevicesState,
        tap_override: impl Fn(&str) -> Option<String>,
        vsock_override: Option<&std::path::Path>,
        log_dirty: bool,
    ) -> Result<(), DeviceError> {
        let mut slots: Vec<u32> = (state.blocks.iter().map(|b| b.slot))
            .chain(state.nets.iter().map(|n| n.slot))
            .chain(state.entropy.iter().map(|e| e.slot))
            .chain(state.vsock.iter().map(|v| v.slot))
            .chain(state.balloon.iter().map(|b| b.slot))
            .chain(state.pmem.iter().map(|p| p.slot))
            .chain(state.memory_hotplug.iter().map(|m| m.slot))
            .collect();
        slots.sort_unstable();
        if slots.iter().zip(0u32..).any(|(&s, i)| s != i) {
            return Err(DeviceError::SlotOrder);
        }
        match (self.pci.as_mut(), &state.pci) {
            (Some(pci), Some(saved)) => {
                pci.saved = saved.iter().map(|f| (f.slot, f.clone())).collect();
                if pci.saved.len() != slots.len() || saved.len() != slots.len() {
                    return Err(DeviceError::PciSlots);
                }
            }
            (None, None) => {}
            _ => return Err(DeviceError::PciSlots),
        }
        for slot in slots {
            if let Some(b) = state.blocks.iter().find(|b| b.slot == slot) {
                let block = Block::from_state(&b.id, &b.device)?;
                let saved = (&b.transport, b.device.virtio.queues.as_slice());
                self.attach(vm, mem, &b.id, block, Some(saved), |r| &mut r.blocks)?;
            } else if let Some(n) = state.nets.iter().find(|n| n.slot == slot) {
                let net = Net::from_state(tap_override(&n.id).as_deref(), &n.device)?;
                let saved = (&n.transport, n.device.virtio.queues.as_slice());
                self.attach(vm, mem, &n.id, net, Some(saved), |r| &mut r.nets)?;
            } else if let Some(e) = state.entropy.iter().find(|e| e.slot == slot) {
                let rng = Rng::from_state(&e.device)?;
                let saved = (&e.transport, e.device.virtio.queues.as_slice());
                self.attach(vm, mem, &e.id, rng, Some(saved), |r| &mut r.entropy)?;
            } else if let Some(v) = state.vsock.iter().find(|v| v.slot == slot) {
                let vsock = Vsock::from_state(vsock_override, &v.device)?;
                let saved = (&v.transport, v.device.virtio.queues.as_slice());
                self.attach(vm, mem, &v.id, vsock, Some(saved), |r| &mut r.vsock)?;
            } else if let Some(b) = state.balloon.iter().find(|b| b.slot == slot) {
                let balloon = Balloon::from_state(&b.device)?;
                let saved = (&b.transport, b.device.virtio.queues.as_slice());
                self.attach(vm, mem, &b.id, balloon, Some(saved), |r| &mut r.balloon)?;
            } else if let Some(p) = state.pmem.iter().find(|p| p.slot == slot) {
                let pmem = Pmem::from_state(vm, &p.id, &p.device)?;
                let saved = (&p.transport, p.device.virtio.queues.as_slice());
                self.attach(vm, mem, &p.id, pmem, Some(saved), |r| &mut r.pmem)?;
            } else if let Some(m) = state.memory_hotplug.iter().find(|m| m.slot == slot) {
                let device = VirtioMem::from_state(vm, mem, &m.device, log_dirty)?;
                let saved = (&m.transport, m.device.virtio.queues.as_slice());
                self.attach(vm, mem, &m.id, device, Some(saved), |r| {
                    &mut r.memory_hotplug
                })?;
            }
        }
        Ok(())
    }

    /// The virtio devices by id.
    pub fn registry(&self) -> &DeviceRegistry {
        &self.registry
    }

    /// Places a virtio device in the next MMIO slot with the next IRQ: its queue notify
    /// register becomes one KVM ioeventfd per queue, its interrupt a KVM irqfd, and the event
    /// thread drives it; a restored device's transport gets its `saved` registers and queues.
    /// Returns the slot, the transport and the `virtio_mmio.device=` kernel parameter.
    fn register_virtio_device<D>(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        device: Arc<Mutex<D>>,
        saved: Option<(
            &MmioTransportState,
            &[crate::devices::virtio::QueueSnapshot],
        )>,
    ) -> Result<(u32, Arc<Mutex<MmioTransport>>, String), DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let index = u32::try_from(self.virtio_subscribers.len()).unwrap_or(u32::MAX);
        if let Some(pci) = self.pci.as_mut() {
            let transport = register_pci_device(pci, index, mem, &device, saved)?;
            self.virtio_subscribers.push(device);
            return Ok((index, transport, String::new()));
        }
        let max = IOAPIC_NUM_PINS - IRQ_DEVICES_START;
        if index >= max {
            return Err(DeviceError::TooManyDevices(max));
        }
        let irq = IRQ_DEVICES_START + index;
        let base = MMIO_DEVICES_START + u64::from(index) * MMIO_DEVICE_SLOT_SIZE;
        {
            let dev = device
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let notify = base + 0x50;
            for (queue, evt) in (0u32..).zip(dev.queue_events()) {
                vm.register_ioevent(evt, &IoEventAddress::Mmio(notify), queue)
                    .map_err(|source| DeviceError::Ioeventfd {
                        queue,
                        addr: notify,
                        source,
                    })?;
            }
            vm.register_irqfd(dev.interrupt().eventfd(), irq)
                .map_err(|e| DeviceError::Irqfd(irq, e))?;
        }
        let transport = match saved {
            None => {
                MmioTransport::new(mem.clone(), device.clone()).map_err(DeviceError::EventFd)?
            }
            Some((state, queues)) => {
                MmioTransport::restore(mem.clone(), device.clone(), state, queues)
                    .map_err(|e| DeviceError::Transport(String::new(), e))?
            }
        };
        let transport = Arc::new(Mutex::new(transport));
        self.mmio_bus
            .insert(transport.clone(), base, MMIO_SIZE)
            .map_err(DeviceError::Bus)?;
        self.virtio_subscribers.push(device);
        Ok((
            index,
            transport,
            format!("virtio_mmio.device=4K@{base:#x}:{irq}"),
        ))
    }

    /// The devices the event thread must drive.
    pub fn subscribers(&self) -> Vec<Subscriber> {
        let mut subscribers: Vec<Subscriber> = vec![self.serial.clone()];
        subscribers.extend(self.virtio_subscribers.iter().cloned());
        subscribers
    }

    /// The i8042, for host-injected key sequences.
    pub fn i8042(&self) -> Arc<Mutex<I8042>> {
        self.i8042.clone()
    }

    /// The boot-progress recorder.
    pub fn progress(&self) -> Arc<Mutex<BootProgress>> {
        self.progress.clone()
    }

    /// Freezes the buses for sharing between vCPUs.
    pub fn take_buses(&mut self) -> (Arc<Bus>, Arc<Bus>) {
        (
            Arc::new(std::mem::take(&mut self.pio_bus)),
            Arc::new(std::mem::take(&mut self.mmio_bus)),
        )
    }
}

/// Places the virtio device of registry slot `slot` on the PCI bus: the next device number, the
/// next BAR in the window, one MSI-X vector per queue plus one for configuration changes (each
/// on its own GSI), and the queues' notification addresses as ioeventfds; a restored device's
/// function gets its saved registers and routes. Returns the register model the function maps
/// its common configuration onto. Devices are placed in slot order, at boot and at restore
/// alike, so each gets the same device number, BAR and GSIs.
fn register_pci_device<D>(
    pci: &mut PciParts,
    slot: u32,
    mem: &GuestMemoryMmap,
    device: &Arc<Mutex<D>>,
    saved: Option<SavedTransport<'_>>,
) -> Result<Arc<Mutex<MmioTransport>>, DeviceError>
where
    D: VirtioDevice + MutEventSubscriber + Send + 'static,
{
    let bar = pci.next_bar;
    if bar + BAR_SIZE > PCI_MMIO_START + PCI_MMIO_SIZE {
        return Err(PciError::WindowFull.into());
    }
    let (device_type, irq, config, queue_events) = {
        let dev = lock(device);
        let events = (dev.queue_events().iter())
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(DeviceError::EventFd)?;
        (
            dev.device_type(),
            dev.interrupt().clone(),
            dev.config_space().clone(),
            events,
        )
    };
    let vectors = u32::try_from(queue_events.len() + 1).unwrap_or(u32::MAX);
    let gsis: Vec<u32> = (pci.next_gsi..pci.next_gsi.saturating_add(vectors)).collect();
    let msix = MsixVectors::new(pci.routes.clone(), gsis, queue_events.len())
        .map_err(DeviceError::Msix)?;
    let msix = Arc::new(msix);
    irq.set_delivery(msix.clone());
    let transport = match saved {
        None => MmioTransport::new(mem.clone(), device.clone()).map_err(DeviceError::EventFd)?,
        Some((state, queues)) => MmioTransport::restore(mem.clone(), device.clone(), state, queues)
            .map_err(|e| DeviceError::Transport(String::new(), e))?,
    };
    let transport = Arc::new(Mutex::new(transport));
    let mut function = VirtioPciDevice::new(
        transport.clone(),
        device_type,
        irq,
        config,
        msix,
        queue_events,
        bar,
    )
    .map_err(|source| DeviceError::Ioeventfd {
        queue: 0,
        addr: bar,
        source,
    })?;
    if let Some(state) = pci.saved.get(&slot) {
        function
            .restore(state)
            .map_err(|e| DeviceError::PciRestore(slot, e))?;
    }
    let function = Arc::new(Mutex::new(function));
    pci.bus.add(function.clone())?;
    pci.functions.push((slot, function));
    pci.next_gsi += vectors;
    pci.next_bar += BAR_SIZE;
    Ok(transport)
}
