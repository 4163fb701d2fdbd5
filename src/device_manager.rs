//! Device wiring: which device sits at which port or MMIO range, which interrupt line each
//! raises (an eventfd registered as a KVM irqfd), and which need the event thread.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::MutEventSubscriber;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use kvm_ioctls::IoEventAddress;

use crate::arch::x86_64::layout::{
    I8042_KBD_IRQ, I8042_PORT_BASE, IOAPIC_NUM_PINS, IRQ_DEVICES_START, MMIO_DEVICES_START,
    MMIO_DEVICE_SLOT_SIZE, PROGRESS_PORT, SERIAL_IRQ, SERIAL_PORT_BASE,
};
use crate::devices::legacy::serial::Unbuffered;
use crate::devices::legacy::{BootProgress, SerialDevice, I8042};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_SIZE};
use crate::devices::virtio::VirtioDevice;
use crate::devices::{Bus, BusDevice};
use crate::vstate::memory::GuestMemoryMmap;

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

impl DeviceManager {
    /// Creates the legacy devices: COM1 on 0x3f8/IRQ 4 (writing to `output`, or standard
    /// output), the i8042 on 0x60/0x64/IRQ 1 (calling `on_reset` for a CPU reset) and the
    /// boot-progress port timing against `start`.
    pub fn new(
        vm: &VmFd,
        console: ConsoleInput,
        output: Option<File>,
        on_reset: Box<dyn Fn() + Send>,
        start: Instant,
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
        let out: Box<dyn Write + Send> = match output {
            Some(file) => Box::new(file),
            None => Box::new(Unbuffered(std::io::stdout())),
        };
        let serial = SerialDevice::new(irq_line(vm, SERIAL_IRQ)?, out, input)
            .map_err(DeviceError::EventFd)?;
        let serial = Arc::new(Mutex::new(serial));
        let i8042 = Arc::new(Mutex::new(I8042::new(
            irq_line(vm, I8042_KBD_IRQ)?,
            on_reset,
        )));
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
        })
    }

    /// Places a virtio device in the next MMIO slot with the next IRQ: its queue notify
    /// register becomes one KVM ioeventfd per queue, its interrupt a KVM irqfd, and the event
    /// thread drives it. Returns the `virtio_mmio.device=` kernel parameter describing it.
    pub fn register_virtio_device<D>(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        device: Arc<Mutex<D>>,
    ) -> Result<String, DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let index = u32::try_from(self.virtio_subscribers.len()).unwrap_or(u32::MAX);
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
        let transport =
            MmioTransport::new(mem.clone(), device.clone()).map_err(DeviceError::EventFd)?;
        self.mmio_bus
            .insert(Arc::new(Mutex::new(transport)), base, MMIO_SIZE)
            .map_err(DeviceError::Bus)?;
        self.virtio_subscribers.push(device);
        Ok(format!("virtio_mmio.device=4K@{base:#x}:{irq}"))
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
