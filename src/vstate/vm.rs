//! The KVM VM: TSS and identity map, in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, and
//! guest memory slots.

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;

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

/// Creates the VM with its interrupt controllers and timer, and maps `mem` into it.
pub fn create_vm(kvm: &KvmContext, mem: &GuestMemoryMmap) -> Result<VmFd, VmError> {
    let vm = kvm.kvm().create_vm().map_err(VmError::Create)?;
    let tss = usize::try_from(KVM_TSS_ADDRESS)
        .map_err(|_| VmError::TssAddress(kvm_ioctls::Error::new(libc::EINVAL)))?;
    vm.set_tss_address(tss).map_err(VmError::TssAddress)?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(VmError::IdentityMap)?;
    vm.create_irq_chip().map_err(VmError::Irqchip)?;
    // The PC speaker port (0x61) is answered in the kernel with a dummy.
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(VmError::Pit)?;
    register_guest_memory(&vm, mem).map_err(VmError::Memory)?;
    Ok(vm)
}
