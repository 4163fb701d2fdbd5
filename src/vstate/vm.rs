//! The KVM VM: TSS and identity map, in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, guest
//! memory slots, and the saved state of the irqchip, PIT and clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_CLOCK_REALTIME,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::kvm::KvmContext;
use super::memory::{register_guest_memory, GuestMemoryMmap, MemoryError};
use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

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
