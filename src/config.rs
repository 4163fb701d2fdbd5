//! The one description of a VM, shared by the command line, the library API and (later) the
//! config file and REST API.

use std::path::PathBuf;

pub use crate::device_manager::ConsoleInput;

/// Default kernel command line: serial console, reboot through the i8042, no PCI.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// Default KVM device.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

/// Everything needed to build and boot a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest kernel: ELF vmlinux (PVH or 64-bit entry) or bzImage.
    pub kernel: PathBuf,
    /// Optional initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// Where the serial console's input comes from.
    pub console_input: ConsoleInput,
}

impl VmConfig {
    /// A config booting `kernel` with one vCPU, 128 MiB and the default command line.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_owned(),
            vcpus: 1,
            memory_mib: 128,
            kvm_device: PathBuf::from(DEFAULT_KVM_DEVICE),
            console_input: ConsoleInput::Stdin,
        }
    }
}
