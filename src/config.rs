//! The one description of a VM, shared by the command line, the library API and (later) the
//! config file and REST API.

use std::path::PathBuf;

pub use crate::device_manager::ConsoleInput;
pub use crate::seccomp::SeccompConfig;

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
    /// A file the serial console's output goes to (created or truncated) instead of
    /// standard output.
    pub console_output: Option<PathBuf>,
    /// Block devices, in the order the guest sees them (/dev/vda first).
    pub disks: Vec<DiskConfig>,
    /// Network devices, in the order the guest sees them (eth0 first).
    pub nets: Vec<NetConfig>,
    /// Dirty-page tracking for snapshots (accepted through the API; not used yet).
    pub track_dirty_pages: bool,
    /// Log the guest's boot time when it writes 123 to the boot-progress port, as
    /// Firecracker's `--boot-timer` does.
    pub boot_timer: bool,
    /// The seccomp filters the VM's threads install.
    pub seccomp: SeccompConfig,
}

/// A virtio network device on a TAP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The TAP interface, created if absent (which needs CAP_NET_ADMIN).
    pub tap: String,
    /// The guest's MAC address; without one the guest picks its own.
    pub mac: Option<[u8; 6]>,
    /// The interface's id in the API (`iface_id`).
    pub id: Option<String>,
}

/// Errors in a `--net` description.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetSpecError {
    /// No `tap=`.
    #[error("missing tap=NAME")]
    MissingTap,
    /// A key that is not tap or mac.
    #[error("unknown key '{0}' (expected tap, mac)")]
    UnknownKey(String),
    /// Not six colon-separated hex bytes, or a multicast address.
    #[error("mac '{0}' is not a unicast address like 06:00:ac:10:00:02")]
    BadMac(String),
}

/// Parses `aa:bb:cc:dd:ee:ff` as a unicast MAC address.
pub fn parse_mac(text: &str) -> Result<[u8; 6], NetSpecError> {
    let bad = || NetSpecError::BadMac(text.to_owned());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(mac)
}

impl std::str::FromStr for NetConfig {
    type Err = NetSpecError;

    /// Parses `tap=NAME[,mac=MAC]`.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut net = NetConfig {
            tap: String::new(),
            mac: None,
            id: None,
        };
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("tap", value)) => net.tap = value.to_owned(),
                Some(("mac", value)) => net.mac = Some(parse_mac(value)?),
                _ => {
                    let key = part.split_once('=').map_or(part, |(k, _)| k);
                    return Err(NetSpecError::UnknownKey(key.to_owned()));
                }
            }
        }
        if net.tap.is_empty() {
            return Err(NetSpecError::MissingTap);
        }
        Ok(net)
    }
}

/// A virtio block device backed by a raw image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// The guest may not write.
    pub read_only: bool,
    /// The drive id the guest reads as its serial (at most 20 bytes).
    pub id: Option<String>,
    /// This disk is the root device: it becomes /dev/vda and `root=/dev/vda` is added.
    pub root: bool,
    /// With `root`: the root partition's UUID, giving `root=PARTUUID=...` instead.
    pub partuuid: Option<String>,
}

/// Errors in a `--disk` description.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskSpecError {
    /// No `path=`.
    #[error("missing path=IMAGE")]
    MissingPath,
    /// A key that is not path, readonly, id or root.
    #[error("unknown key '{0}' (expected path, readonly, id, root)")]
    UnknownKey(String),
    /// An on/off value that is neither.
    #[error("{0} must be on or off, not '{1}'")]
    BadSwitch(&'static str, String),
    /// An id longer than virtio-blk's 20 bytes, or not printable ASCII.
    #[error("id must be 1 to 20 printable ASCII characters")]
    BadId,
}

fn switch(key: &'static str, value: &str) -> Result<bool, DiskSpecError> {
    match value {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        other => Err(DiskSpecError::BadSwitch(key, other.to_owned())),
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = DiskSpecError;

    /// Parses `path=IMG[,readonly=on][,id=NAME][,root=on]`.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut disk = DiskConfig {
            path: PathBuf::new(),
            read_only: false,
            id: None,
            root: false,
            partuuid: None,
        };
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, "on"));
            match key {
                "path" => disk.path = PathBuf::from(value),
                "readonly" => disk.read_only = switch("readonly", value)?,
                "root" => disk.root = switch("root", value)?,
                "id" => {
                    if value.is_empty()
                        || value.len() > 20
                        || !value.bytes().all(|b| b.is_ascii_graphic())
                    {
                        return Err(DiskSpecError::BadId);
                    }
                    disk.id = Some(value.to_owned());
                }
                other => return Err(DiskSpecError::UnknownKey(other.to_owned())),
            }
        }
        if disk.path.as_os_str().is_empty() {
            return Err(DiskSpecError::MissingPath);
        }
        Ok(disk)
    }
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
            console_output: None,
            disks: Vec::new(),
            nets: Vec::new(),
            track_dirty_pages: false,
            boot_timer: false,
            seccomp: SeccompConfig::Default,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs() {
        let d: DiskConfig = "path=/img,readonly=on,id=data0,root".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/img".into(),
                read_only: true,
                id: Some("data0".into()),
                root: true,
                partuuid: None,
            }
        );
        assert_eq!(
            "readonly=on".parse::<DiskConfig>(),
            Err(DiskSpecError::MissingPath)
        );
        assert!(matches!(
            "path=/a,size=3".parse::<DiskConfig>(),
            Err(DiskSpecError::UnknownKey(_))
        ));
        assert!(matches!(
            "path=/a,readonly=maybe".parse::<DiskConfig>(),
            Err(DiskSpecError::BadSwitch(..))
        ));
        assert_eq!(
            "path=/a,id=123456789012345678901".parse::<DiskConfig>(),
            Err(DiskSpecError::BadId)
        );
    }

    #[test]
    fn net_specs() {
        let n: NetConfig = "tap=tap0,mac=06:00:AC:10:00:02".parse().unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, Some([6, 0, 0xac, 0x10, 0, 2]));
        assert_eq!(
            "mac=06:00:00:00:00:01".parse::<NetConfig>(),
            Err(NetSpecError::MissingTap)
        );
        assert!(
            matches!("tap=t,ip=1".parse::<NetConfig>(), Err(NetSpecError::UnknownKey(k)) if k == "ip")
        );
        assert!(matches!(
            "tap=t,bogus".parse::<NetConfig>(),
            Err(NetSpecError::UnknownKey(_))
        ));
        for mac in [
            "06:00:00:00:00",
            "06:00:00:00:00:01:02",
            "0g:00:00:00:00:01",
            "01:00:5e:00:00:01",
            "6:0:0:0:0:1",
            "",
        ] {
            assert!(
                matches!(parse_mac(mac), Err(NetSpecError::BadMac(_))),
                "{mac}"
            );
        }
    }
}
