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

use crate::arch::x86_64::layout::{
    I8042_KBD_IRQ, I8042_PORT_BASE, PROGRESS_PORT, SERIAL_IRQ, SERIAL_PORT_BASE,
};
use crate::devices::legacy::serial::Unbuffered;
use crate::devices::legacy::{BootProgress, SerialDevice, I8042};
use crate::devices::{Bus, BusDevice};

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
#[derive(Debug)]
pub struct DeviceManager {
    pio_bus: Bus,
    mmio_bus: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    progress: Arc<Mutex<BootProgress>>,
}

fn irq_line(vm: &VmFd, gsi: u32) -> Result<EventFd, DeviceError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    vm.register_irqfd(&evt, gsi)
        .map_err(|e| DeviceError::Irqfd(gsi, e))?;
    Ok(evt)
}

impl DeviceManager {
    /// Creates the legacy devices: COM1 on 0x3f8/IRQ 4, the i8042 on 0x60/0x64/IRQ 1 (calling
    /// `on_reset` for a CPU reset) and the boot-progress port timing against `start`.
    pub fn new(
        vm: &VmFd,
        console: ConsoleInput,
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
        let out: Box<dyn Write + Send> = Box::new(Unbuffered(std::io::stdout()));
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
        })
    }

    /// The devices the event thread must drive.
    pub fn subscribers(&self) -> Vec<Subscriber> {
        vec![self.serial.clone()]
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
