//! KVM objects: the system handle, the VM, its memory and its vCPUs.

pub mod kvm;
pub mod memory;
pub mod region;
pub mod vcpu;
pub mod vm;
