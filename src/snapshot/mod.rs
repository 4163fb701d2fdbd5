//! Snapshots: what a paused microVM is made of (every vCPU, the VM's interrupt controllers and
//! clock, every device, guest memory) written to two files, and read back to build the same VM
//! again.
//!
//! The state file is `SKIFFSNP`, the format version (u32, little-endian), the payload length
//! (u64), the payload (the [`MicrovmState`], bincode-encoded) and a CRC-32 of everything before
//! it. A file of another version, another CPU, or one truncated or corrupted is refused with
//! one line saying which, before anything is built.
//!
//! The memory file holds guest RAM region after region. A full snapshot writes every page that
//! is not zero (zero pages are left as holes, which read back as zeros); a diff snapshot writes
//! only the pages written since the previous snapshot, over whatever the file held: given a copy
//! of the previous snapshot's memory file, it brings that copy up to date.
//!
//! A restore maps the memory file privately ([`MemBackend::File`]), or leaves guest memory to
//! an external page-fault handler ([`MemBackend::Uffd`], Firecracker's handshake: see
//! [`connect_uffd_handler`] and `uffd.rs`).

mod format;
mod memory;
mod uffd;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::device_manager::DevicesState;
use crate::vstate::memory::MemoryRegionState;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::KvmVmState;

pub use format::{describe_snapshot, parse_state, read_state, write_state, SNAPSHOT_VERSION};
pub use memory::{open_memory_file, write_memory};
pub use uffd::{connect_uffd_handler, UffdBackend, UffdError};

/// Full or diff, as Firecracker's `snapshot_type` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SnapshotType {
    /// Every page of guest memory.
    #[default]
    Full,
    /// The pages written since the last snapshot (needs dirty-page tracking).
    Diff,
}

/// Where guest memory comes from at restore, as Firecracker's `mem_backend` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemBackend {
    /// The snapshot's memory file, mapped privately.
    File(PathBuf),
    /// Anonymous memory whose pages an external handler fills through a userfaultfd, which
    /// Skiff sends it on the Unix socket at this path with the regions' layout.
    Uffd(PathBuf),
}

/// The CPU a snapshot was taken on: a restore on another vendor or model is refused, since the
/// guest was told about this one's features and may use them at any instruction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCpu {
    /// CPUID vendor string ("GenuineIntel", "AuthenticAMD").
    pub vendor: String,
    /// Family, as CPUID leaf 1 reports it with its extension.
    pub family: u32,
    /// Model, with its extension.
    pub model: u32,
}

impl HostCpu {
    /// This host's CPU.
    pub fn current() -> Self {
        // Leaves 0 and 1 exist on every x86-64 CPU.
        let (l0, l1) = (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1));
        let vendor: Vec<u8> = [l0.ebx, l0.edx, l0.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        let base_family = (l1.eax >> 8) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((l1.eax >> 20) & 0xff)
        } else {
            base_family
        };
        let mut model = (l1.eax >> 4) & 0xf;
        if base_family == 0x6 || base_family == 0xf {
            model |= ((l1.eax >> 16) & 0xf) << 4;
        }
        Self {
            vendor: String::from_utf8_lossy(&vendor).into_owned(),
            family,
            model,
        }
    }
}

impl std::fmt::Display for HostCpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} family {:#x} model {:#x}",
            self.vendor, self.family, self.model
        )
    }
}

/// Everything a snapshot holds besides guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// The Skiff version that wrote it (informational).
    pub skiff_version: String,
    /// The CPU it was taken on.
    pub cpu: HostCpu,
    /// Guest RAM regions and where each is in the memory file.
    pub memory: Vec<MemoryRegionState>,
    /// The VM's interrupt controllers, timer and clock.
    pub vm: KvmVmState,
    /// Every vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// Every device.
    pub devices: DevicesState,
}

/// Errors while writing or reading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The state file cannot be read.
    #[error("cannot read snapshot file {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    /// A file cannot be written.
    #[error("cannot write {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
    /// The file is not a snapshot.
    #[error("{} is not a Skiff snapshot file (it does not start with SKIFFSNP)", .0.display())]
    NotASnapshot(PathBuf),
    /// The file is another version's.
    #[error("{} is a snapshot of format version {found}; this Skiff reads version {SNAPSHOT_VERSION}", .path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The file ends early.
    #[error("snapshot file {} is truncated ({len} bytes, its header announces {expected})", .path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The length its header announces.
        expected: u64,
    },
    /// The checksum does not match.
    #[error("snapshot file {} is corrupted: its checksum does not match", .0.display())]
    Checksum(PathBuf),
    /// The payload cannot be decoded.
    #[error("snapshot file {}: its state cannot be decoded", .0.display())]
    Decode(PathBuf, #[source] bincode::error::DecodeError),
    /// The state cannot be encoded.
    #[error("cannot encode the VM's state")]
    Encode(#[source] bincode::error::EncodeError),
    /// Taken on another CPU.
    #[error("the snapshot was taken on a {saved} CPU; this host has a {host} CPU")]
    Cpu {
        /// The snapshot's.
        saved: HostCpu,
        /// This host's.
        host: HostCpu,
    },
    /// The saved state is not one Skiff makes.
    #[error("the snapshot's state is invalid: {0}")]
    Invalid(&'static str),
    /// The memory file cannot be opened.
    #[error("cannot open memory file {}", .0.display())]
    MemFile(PathBuf, #[source] std::io::Error),
    /// The memory file is shorter than the guest's memory.
    #[error("memory file {} has {len} bytes; the snapshot's guest memory needs {needed}", .path.display())]
    MemFileShort {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// What the regions need.
        needed: u64,
    },
    /// The memory file is not a regular file.
    #[error("memory file {} is not a regular file", .0.display())]
    MemFileKind(PathBuf),
    /// Guest memory cannot be handed to the page-fault handler.
    #[error(transparent)]
    Uffd(#[from] UffdError),
}

impl MicrovmState {
    /// Checks what must hold before anything is built from this state: the same CPU, vCPUs
    /// and regions that make sense.
    pub fn check(&self) -> Result<(), SnapshotError> {
        let host = HostCpu::current();
        if self.cpu != host {
            return Err(SnapshotError::Cpu {
                saved: self.cpu.clone(),
                host,
            });
        }
        if self.vcpus.is_empty() {
            return Err(SnapshotError::Invalid("it has no vCPU"));
        }
        if self.devices.memory_hotplug.len() > 1 {
            return Err(SnapshotError::Invalid("it has two memory hot-plug devices"));
        }
        if let Some(device) = self.devices.memory_hotplug.first() {
            use crate::arch::x86_64::layout::{DEVICE_MEMORY_ALIGNMENT, MMIO_HOLE_END};
            let fits = self.memory.last().is_some_and(|r| {
                r.base == device.device.addr
                    && r.size == device.device.region_size
                    && r.base >= MMIO_HOLE_END
                    && r.base.is_multiple_of(DEVICE_MEMORY_ALIGNMENT)
                    && r.offset
                        .is_multiple_of(crate::vstate::memory::PAGE_SIZE as u64)
            });
            if !fits {
                return Err(SnapshotError::Invalid(
                    "the hot-plug region is not the last memory region, where Skiff places it",
                ));
            }
        }
        memory::check_regions(self.ram_regions())
    }

    /// The guest RAM regions: every memory region but the hot-plug one, which is the last
    /// when the VM has a memory hot-plug device.
    pub fn ram_regions(&self) -> &[MemoryRegionState] {
        let ram = self.memory.len() - usize::from(self.hotplug_region().is_some());
        &self.memory[..ram]
    }

    /// Describes the restored VM in `config`: vCPUs, memory, disks, network interfaces and
    /// the other devices
    /// (what `GET /vm/config` shows afterwards); `network_overrides` as given to the restore.
    /// The memory hot-plug region in the memory file, if the VM has one.
    pub fn hotplug_region(&self) -> Option<&MemoryRegionState> {
        let device = &self.devices.memory_hotplug.first()?.device;
        self.memory
            .last()
            .filter(|r| r.base == device.addr && r.size == device.region_size)
    }

    /// Describes the restored VM in `config`: vCPUs, memory, disks, network interfaces and
    /// pmem devices (what `GET /vm/config` shows afterwards); `network_overrides` as given to
    /// the restore.
    /// Describes the restored VM in `config`: vCPUs, memory, disks, network interfaces and the
    /// metadata service (what `GET /vm/config` shows afterwards); `network_overrides` as given to the restore.
    pub fn describe_in(
        &self,
        config: &mut crate::VmConfig,
        network_overrides: &[(String, String)],
    ) {
        use crate::config::{DiskConfig, NetConfig};
        config.vcpus = u32::try_from(self.vcpus.len()).unwrap_or(u32::MAX);
        config.memory_mib = self.memory_mib();
        config.disks = (self.devices.blocks.iter())
            .map(|b| DiskConfig {
                path: b.device.path.clone(),
                read_only: b.device.read_only,
                id: Some(b.id.clone()),
                root: false,
                partuuid: None,
                rate_limiter: b.device.rate_limiter,
                cache_type: b.device.cache_type,
                io_engine: b.device.io_engine,
            })
            .collect();
        config.entropy = (self.devices.entropy.first()).map(|e| crate::config::EntropyConfig {
            rate_limiter: e.device.rate_limiter,
        });
        config.vsock = (self.devices.vsock.first()).map(|v| crate::config::VsockConfig {
            vsock_id: None,
            guest_cid: u32::try_from(v.device.guest_cid).unwrap_or(u32::MAX),
            uds_path: v.device.uds_path.clone(),
        });
        config.balloon = (self.devices.balloon.first()).map(|b| crate::config::BalloonConfig {
            amount_mib: b.device.target_pages / crate::devices::virtio::balloon::PAGES_PER_MIB,
            deflate_on_oom: b.device.deflate_on_oom,
            stats_polling_interval_s: b.device.stats_polling_interval_s,
            free_page_hinting: b.device.free_page_hinting,
            free_page_reporting: b.device.free_page_reporting,
        });
        config.pmem = (self.devices.pmem.iter())
            .map(|p| crate::config::PmemConfig {
                id: p.id.clone(),
                path_on_host: p.device.path.clone(),
                root_device: p.device.root_device,
                read_only: p.device.read_only,
                rate_limiter: p.device.rate_limiter,
            })
            .collect();
        config.memory_hotplug =
            (self.devices.memory_hotplug.first()).map(|m| crate::config::MemoryHotplugConfig {
                total_size_mib: m.device.region_size >> 20,
                slot_size_mib: m.device.slot_size >> 20,
                block_size_mib: m.device.block_size >> 20,
            });
        config.mmds = self
            .devices
            .mmds
            .as_ref()
            .map(crate::mmds::MmdsState::config);
        config.nets = (self.devices.nets.iter())
            .map(|n| NetConfig {
                tap: (network_overrides.iter())
                    .find(|(id, _)| *id == n.id)
                    .map_or_else(|| n.device.tap.clone(), |(_, tap)| tap.clone()),
                mac: n.device.mac,
                id: Some(n.id.clone()),
                rx_rate_limiter: n.device.rx_rate_limiter,
                tx_rate_limiter: n.device.tx_rate_limiter,
            })
            .collect();
    }

    /// Guest RAM in MiB (without the hot-plug region).
    pub fn memory_mib(&self) -> u64 {
        self.ram_regions().iter().map(|r| r.size).sum::<u64>() >> 20
    }
}
