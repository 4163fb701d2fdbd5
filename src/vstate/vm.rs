//! The KVM VM: TSS and identity map, in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, guest
//! memory slots, the saved state of the irqchip, PIT and clock, and the GSI routing table.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use kvm_bindings::{
    kvm_clock_data, kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1,
    kvm_irq_routing_irqchip, kvm_irq_routing_msi, kvm_irqchip, kvm_pit_config, kvm_pit_state2,
    KvmIrqRouting, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::kvm::KvmContext;
use super::memory::{register_guest_memory, GuestMemoryMmap, MemoryError};
use crate::arch::x86_64::layout::{IOAPIC_NUM_PINS, KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Errors while creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM_CREATE_VM failed.
    #[error("KVM_CREATE_VM failed")]
    Create(#[source] kvm_ioctls::Error),
    /// KVM_SET_TSS_ADDR failed.
    #[error("KVM_SET_TSS_ADDR failed")]
    TssAddress(#[source] kvm_ioctls::Error),
    /// KVM_SET_IDENTITY_MAP_ADDR failed.
    #[error("KVM_SET_IDENTITY_MAP_ADDR failed")]
    IdentityMap(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_IRQCHIP failed.
    #[error("KVM_CREATE_IRQCHIP failed")]
    Irqchip(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_PIT2 failed.
    #[error("KVM_CREATE_PIT2 failed")]
    Pit(#[source] kvm_ioctls::Error),
    /// Registering guest memory failed.
    #[error("cannot register guest memory")]
    Memory(#[source] MemoryError),
}

/// Creates the VM with its interrupt controllers and timer, and maps `mem` into it; with
/// `log_dirty`, KVM records the pages the guest writes.
pub fn create_vm(
    kvm: &KvmContext,
    mem: &GuestMemoryMmap,
    log_dirty: bool,
) -> Result<VmFd, VmError> {
    let vm = create_vm_fd(kvm)?;
    register_guest_memory(&vm, mem, log_dirty).map_err(VmError::Memory)?;
    Ok(vm)
}

/// Creates the VM with its interrupt controllers and timer, without memory.
pub fn create_vm_fd(kvm: &KvmContext) -> Result<VmFd, VmError> {
    let vm = create_vm_fd_without_pit(kvm)?;
    create_pit(&vm)?;
    Ok(vm)
}

/// Creates the VM with its interrupt controllers, without the PIT ([`create_pit`]) or memory.
pub fn create_vm_fd_without_pit(kvm: &KvmContext) -> Result<VmFd, VmError> {
    let vm = kvm.kvm().create_vm().map_err(VmError::Create)?;
    let tss = usize::try_from(KVM_TSS_ADDRESS)
        .map_err(|_| VmError::TssAddress(kvm_ioctls::Error::new(libc::EINVAL)))?;
    vm.set_tss_address(tss).map_err(VmError::TssAddress)?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(VmError::IdentityMap)?;
    vm.create_irq_chip().map_err(VmError::Irqchip)?;
    Ok(vm)
}

/// Gives the VM KVM's PIT, whose PC speaker port (0x61) the kernel answers with a dummy.
pub fn create_pit(vm: &VmFd) -> Result<(), VmError> {
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(VmError::Pit)
}

/// What KVM holds of the VM itself, beside memory and vCPUs: the two PICs, the IOAPIC, the PIT
/// and the kvmclock (KVM API: KVM_GET_IRQCHIP, KVM_GET_PIT2, KVM_GET_CLOCK).
#[derive(Debug, Serialize, Deserialize)]
pub struct KvmVmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC, its redirection table and pending lines.
    pub ioapic: kvm_irqchip,
    /// The 8254 timer.
    pub pit: kvm_pit_state2,
    /// The kvmclock's value, and the wall-clock time it was read at where KVM gives it.
    pub clock: kvm_clock_data,
}

/// Errors while saving or restoring the VM's state.
#[derive(Debug, thiserror::Error)]
#[error("{0} failed")]
pub struct VmStateError(&'static str, #[source] kvm_ioctls::Error);

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(|e| VmStateError("KVM_GET_IRQCHIP", e))?;
    Ok(chip)
}

/// Reads the VM's interrupt controllers, timer and clock; the vCPUs must be paused.
pub fn save_vm_state(vm: &VmFd) -> Result<KvmVmState, VmStateError> {
    Ok(KvmVmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(|e| VmStateError("KVM_GET_PIT2", e))?,
        clock: vm
            .get_clock()
            .map_err(|e| VmStateError("KVM_GET_CLOCK", e))?,
    })
}

/// Writes a saved VM state back before the vCPUs run. With `clock_realtime` the kvmclock is
/// moved on by the wall-clock time since the snapshot (where the host recorded it), so the
/// guest's clock is right rather than resuming where it stopped.
pub fn restore_vm_state(
    vm: &VmFd,
    state: &KvmVmState,
    clock_realtime: bool,
) -> Result<(), VmStateError> {
    vm.set_pit2(&state.pit)
        .map_err(|e| VmStateError("KVM_SET_PIT2", e))?;
    let mut clock = state.clock;
    // KVM takes only KVM_CLOCK_REALTIME on input; the other flags describe the host it was
    // read on.
    clock.flags = if clock_realtime {
        clock.flags & KVM_CLOCK_REALTIME
    } else {
        0
    };
    vm.set_clock(&clock)
        .map_err(|e| VmStateError("KVM_SET_CLOCK", e))?;
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip)
            .map_err(|e| VmStateError("KVM_SET_IRQCHIP", e))?;
    }
    Ok(())
}

/// The VM's one GSI routing table. KVM_SET_GSI_ROUTING replaces the whole table (KVM API 4.52),
/// so the routes KVM_CREATE_IRQCHIP made for the PIC and IOAPIC pins are kept here beside the
/// MSI routes of virtio-pci devices, and every change commits the lot.
#[derive(Debug)]
pub struct GsiRoutes {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, (u64, u32)>>,
}

/// KVM refused a routing table.
#[derive(Debug, thiserror::Error)]
#[error("KVM_SET_GSI_ROUTING failed")]
pub struct RoutingError(#[source] kvm_ioctls::Error);

/// First GSI above the IOAPIC's pins, for MSI routes.
pub const FIRST_MSI_GSI: u32 = IOAPIC_NUM_PINS;

impl GsiRoutes {
    /// The table KVM made with the irqchip, no MSI routes yet.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            msi: Mutex::new(BTreeMap::new()),
        }
    }

    /// The VM, for the irqfds and ioeventfds of devices that move.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// Routes `gsi` to the MSI message `address`/`data` and commits the table.
    pub fn set_msi(&self, gsi: u32, address: u64, data: u32) -> Result<(), RoutingError> {
        let mut msi = self.msi.lock().unwrap_or_else(PoisonError::into_inner);
        if msi.get(&gsi) == Some(&(address, data)) {
            return Ok(());
        }
        msi.insert(gsi, (address, data));
        self.commit(&msi)
    }

    fn commit(&self, msi: &BTreeMap<u32, (u64, u32)>) -> Result<(), RoutingError> {
        let mut entries = irqchip_routes();
        entries.extend(
            msi.iter()
                .map(|(&gsi, &(address, data))| kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    u: kvm_irq_routing_entry__bindgen_ty_1 {
                        msi: kvm_irq_routing_msi {
                            address_lo: (address & 0xffff_ffff) as u32,
                            address_hi: (address >> 32) as u32,
                            data,
                            ..Default::default()
                        },
                    },
                    ..Default::default()
                }),
        );
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| RoutingError(kvm_ioctls::Error::new(libc::E2BIG)))?;
        self.vm.set_gsi_routing(&table).map_err(RoutingError)
    }
}

/// The routes KVM_CREATE_IRQCHIP installs on x86 (Linux arch/x86/kvm/irq_comm.c,
/// default_routing): GSIs 0-15 to both the PICs and the IOAPIC pin of that number, 16-23 to
/// the IOAPIC only.
fn irqchip_routes() -> Vec<kvm_irq_routing_entry> {
    let chip = |gsi: u32, irqchip: u32, pin: u32| kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip, pin },
        },
        ..Default::default()
    };
    let mut routes = Vec::new();
    for gsi in 0..IOAPIC_NUM_PINS {
        routes.push(chip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let pic = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(chip(gsi, pic, gsi % 8));
        }
    }
    routes
}
