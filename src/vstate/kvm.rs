//! The KVM system handle and what the host offers: API version, capabilities, vCPU limit,
//! supported CPUID and MSRs, physical address width, and whether the host is a PVM one.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

/// KVM's stable API version.
const KVM_API_VERSION: i32 = 12;
/// Where the PVM flavour of KVM shows itself.
const PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// Errors while opening or probing KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The device cannot be opened.
    #[error("cannot open KVM device {}", .0.display())]
    Open(PathBuf, #[source] kvm_ioctls::Error),
    /// The device answers, but not as KVM does.
    #[error("{} is not a KVM device (KVM_GET_API_VERSION returned {})", .0.display(), .1)]
    NotKvm(PathBuf, i32),
    /// A capability Skiff needs is missing.
    #[error("the host's KVM lacks {0}")]
    MissingCap(&'static str),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// KVM_GET_MSR_INDEX_LIST failed.
    #[error("KVM_GET_MSR_INDEX_LIST failed")]
    MsrIndexList(#[source] kvm_ioctls::Error),
}

/// An open KVM device and what it supports.
#[derive(Debug)]
pub struct KvmContext {
    kvm: Kvm,
    max_vcpus: usize,
    supported_cpuid: CpuId,
    msr_index_list: Vec<u32>,
    phys_bits: u8,
    pvm: bool,
}

impl KvmContext {
    /// Opens the KVM device at `path` and checks it can run a Skiff VM.
    pub fn new(path: &Path) -> Result<Self, KvmError> {
        let cpath = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| KvmError::Open(path.to_owned(), kvm_ioctls::Error::new(libc::EINVAL)))?;
        let kvm = Kvm::new_with_path(&cpath).map_err(|e| KvmError::Open(path.to_owned(), e))?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(KvmError::NotKvm(path.to_owned(), version));
        }
        let caps = [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
            (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        ];
        if let Some((_, name)) = caps.iter().find(|(cap, _)| !kvm.check_extension(*cap)) {
            return Err(KvmError::MissingCap(name));
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::SupportedCpuid)?;
        let msr_index_list = kvm
            .get_msr_index_list()
            .map_err(KvmError::MsrIndexList)?
            .as_slice()
            .to_vec();
        // CPUID 0x8000_0008 EAX[7:0]: physical address bits; 36 when the leaf is missing.
        let phys_bits = supported_cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0x8000_0008)
            .map_or(36, |e| (e.eax & 0xff) as u8);
        Ok(Self {
            max_vcpus: kvm.get_max_vcpus(),
            kvm,
            supported_cpuid,
            msr_index_list,
            phys_bits,
            pvm: Path::new(PVM_MODULE).exists(),
        })
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Most vCPUs one VM may have on this host.
    pub fn max_vcpus(&self) -> usize {
        self.max_vcpus
    }

    /// CPUID as KVM can offer it.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// MSRs KVM saves and restores.
    pub fn msr_index_list(&self) -> &[u32] {
        &self.msr_index_list
    }

    /// Guest physical address width.
    pub fn phys_bits(&self) -> u8 {
        self.phys_bits
    }

    /// Whether this host runs the PVM flavour of KVM (nested, emulation-based).
    pub fn is_pvm(&self) -> bool {
        self.pvm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device() {
        let err = KvmContext::new(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(err, KvmError::Open(..)));
        assert!(err.to_string().contains("/nonexistent/kvm"));
    }

    #[test]
    fn a_file_that_is_not_kvm() {
        let err = KvmContext::new(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(err, KvmError::NotKvm(..)), "{err:?}");
    }
}
