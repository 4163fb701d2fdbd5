//! The one description of a VM, shared by the command line, the library API and (later) the
//! config file and REST API.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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
    /// standard output, or a named pipe (which must have a reader).
    pub console_output: Option<PathBuf>,
    /// Bytes a second the console's output may take; the rest is dropped (and counted).
    pub console_rate_limit: Option<TokenBucketConfig>,
    /// Block devices, in the order the guest sees them (/dev/vda first).
    pub disks: Vec<DiskConfig>,
    /// Network devices, in the order the guest sees them (eth0 first).
    pub nets: Vec<NetConfig>,
    /// The entropy device (virtio-rng), if any.
    pub entropy: Option<EntropyConfig>,
    /// The microVM metadata service: which interfaces answer for it, at which address.
    pub mmds: Option<MmdsConfig>,
    /// The MMDS data store the guest reads and the API writes (a shared handle: the VM uses the
    /// very store given here). Without one, a VM with `mmds` gets an empty store.
    pub mmds_store: Option<crate::mmds::MmdsStore>,
    /// Dirty-page tracking for snapshots (accepted through the API; not used yet).
    pub track_dirty_pages: bool,
    /// Log the guest's boot time when it writes 123 to the boot-progress port, as
    /// Firecracker's `--boot-timer` does.
    pub boot_timer: bool,
    /// The seccomp filters the VM's threads install.
    pub seccomp: SeccompConfig,
}

/// The entropy device, as Firecracker's `PUT /entropy` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    /// Limits on the bytes and requests the guest gets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// The MMDS address when none is given, as in Firecracker.
pub const DEFAULT_MMDS_IPV4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 169, 254);

/// How the guest talks to the metadata service: V1 (plain GETs) or V2 (session tokens first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum MmdsVersion {
    /// Any GET is answered; tokens are checked only for the metrics.
    #[default]
    V1,
    /// GETs need a token from `PUT /latest/api/token`.
    V2,
}

/// The metadata service, as Firecracker's `PUT /mmds/config` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// V1 or V2.
    #[serde(default)]
    pub version: MmdsVersion,
    /// The interfaces (by `iface_id`) whose frames to `ipv4_address` the service answers.
    pub network_interfaces: Vec<String>,
    /// The service's address, link-local (169.254.1.0 to 169.254.254.255).
    #[serde(default)]
    pub ipv4_address: Option<std::net::Ipv4Addr>,
    /// Answer in IMDS text whatever the request's Accept header, as EC2's IMDS does.
    #[serde(default)]
    pub imds_compat: bool,
}

impl MmdsConfig {
    /// The service's address: the one given, or 169.254.169.254.
    pub fn ipv4(&self) -> std::net::Ipv4Addr {
        self.ipv4_address.unwrap_or(DEFAULT_MMDS_IPV4)
    }
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
    /// Limits on what the guest receives.
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on what the guest sends.
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// One token bucket of a rate limiter, as Firecracker's API describes it. The bucket holds
/// `size` tokens (bytes or operations) when full and refills continuously, from empty to full
/// in `refill_time` milliseconds; `one_time_burst` tokens come on top, once, and do not refill.
/// A bucket with `size` or `refill_time` 0 limits nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens in a full bucket.
    pub size: u64,
    /// Extra tokens spent before the bucket's own, once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the bucket from empty to full.
    pub refill_time: u64,
}

impl TokenBucketConfig {
    /// A bucket that limits to `per_second` tokens a second, with a second's worth in a full
    /// bucket (the command line's `bw=` and `iops=`).
    pub fn per_second(per_second: u64) -> Self {
        Self {
            size: per_second,
            one_time_burst: None,
            refill_time: 1000,
        }
    }

    /// Whether the bucket limits anything.
    pub fn is_enabled(&self) -> bool {
        self.size != 0 && self.refill_time != 0
    }
}

/// A rate limiter as Firecracker's API describes it: a bandwidth bucket counting bytes and an
/// ops bucket counting requests (or frames), each optional. A request goes through when both
/// buckets hold enough tokens for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// The limiter as stored and shown: buckets that limit nothing are left out (and a
    /// `one_time_burst` of 0 with them); `None` when no bucket is left.
    pub fn normalized(self) -> Option<Self> {
        let bucket = |b: Option<TokenBucketConfig>| {
            b.filter(TokenBucketConfig::is_enabled)
                .map(|b| TokenBucketConfig {
                    one_time_burst: b.one_time_burst.filter(|&n| n != 0),
                    ..b
                })
        };
        let limiter = Self {
            bandwidth: bucket(self.bandwidth),
            ops: bucket(self.ops),
        };
        (limiter != Self::default()).then_some(limiter)
    }

    /// `current` (None: no limiter) after a `PATCH` carrying `update`, as Firecracker applies
    /// it: a bucket given replaces the current one (or removes it, with `size` or
    /// `refill_time` 0); a bucket not given stays as it is.
    pub fn patch(current: Option<Self>, update: &Self) -> Option<Self> {
        let current = current.unwrap_or_default();
        Self {
            bandwidth: update.bandwidth.or(current.bandwidth),
            ops: update.ops.or(current.ops),
        }
        .normalized()
    }
}

/// Errors in a `--net` description.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetSpecError {
    /// No `tap=`.
    #[error("missing tap=NAME")]
    MissingTap,
    /// A key that is not tap, mac or a rate limit.
    #[error("unknown key '{0}' (expected tap, mac, rx_bw, rx_pps, tx_bw, tx_pps)")]
    UnknownKey(String),
    /// Not six colon-separated hex bytes, or a multicast address.
    #[error("mac '{0}' is not a unicast address like 06:00:ac:10:00:02")]
    BadMac(String),
    /// A rate that is not a whole number.
    #[error("{0} must be a whole number, not '{1}'")]
    BadRate(String, String),
}

/// Parses the value of a `KEY=PER_SECOND` rate option.
fn rate(value: &str) -> Option<TokenBucketConfig> {
    value.parse().ok().map(TokenBucketConfig::per_second)
}

/// Sets the bandwidth (or else the ops) bucket of `limiter`, created if absent, from a rate
/// option; a rate of 0 removes the bucket.
fn set_rate(limiter: &mut Option<RateLimiterConfig>, bandwidth: bool, bucket: TokenBucketConfig) {
    let mut l = limiter.unwrap_or_default();
    if bandwidth {
        l.bandwidth = Some(bucket);
    } else {
        l.ops = Some(bucket);
    }
    *limiter = l.normalized();
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

    /// Parses `tap=NAME[,mac=MAC][,rx_bw=BYTES][,rx_pps=N][,tx_bw=BYTES][,tx_pps=N]`, the
    /// rates per second.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut net = NetConfig {
            tap: String::new(),
            mac: None,
            id: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("tap", value)) => net.tap = value.to_owned(),
                Some(("mac", value)) => net.mac = Some(parse_mac(value)?),
                Some((key @ ("rx_bw" | "rx_pps" | "tx_bw" | "tx_pps"), value)) => {
                    let bucket = rate(value)
                        .ok_or_else(|| NetSpecError::BadRate(key.to_owned(), value.to_owned()))?;
                    let limiter = if key.starts_with("rx") {
                        &mut net.rx_rate_limiter
                    } else {
                        &mut net.tx_rate_limiter
                    };
                    set_rate(limiter, key.ends_with("bw"), bucket);
                }
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
    /// Limits on the guest's requests.
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// Errors in a `--disk` description.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskSpecError {
    /// No `path=`.
    #[error("missing path=IMAGE")]
    MissingPath,
    /// A key that is not path, readonly, id, root, bw or iops.
    #[error("unknown key '{0}' (expected path, readonly, id, root, bw, iops)")]
    UnknownKey(String),
    /// A rate that is not a whole number.
    #[error("{0} must be a whole number, not '{1}'")]
    BadRate(String, String),
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

impl std::str::FromStr for EntropyConfig {
    type Err = String;

    /// Parses `[bw=BYTES][,ops=N]`, the rates per second; empty: no limit.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut entropy = Self::default();
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            let bucket = rate(value).ok_or_else(|| format!("bad rate '{value}' for {key}"));
            match key {
                "bw" | "ops" => set_rate(&mut entropy.rate_limiter, key == "bw", bucket?),
                other => return Err(format!("unknown key '{other}' (expected bw, ops)")),
            }
        }
        Ok(entropy)
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = DiskSpecError;

    /// Parses `path=IMG[,readonly=on][,id=NAME][,root=on][,bw=BYTES][,iops=N]`, the rates
    /// per second.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut disk = DiskConfig {
            path: PathBuf::new(),
            read_only: false,
            id: None,
            root: false,
            partuuid: None,
            rate_limiter: None,
        };
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, "on"));
            match key {
                "path" => disk.path = PathBuf::from(value),
                "readonly" => disk.read_only = switch("readonly", value)?,
                "root" => disk.root = switch("root", value)?,
                "bw" | "iops" => {
                    let bucket = rate(value)
                        .ok_or_else(|| DiskSpecError::BadRate(key.to_owned(), value.to_owned()))?;
                    set_rate(&mut disk.rate_limiter, key == "bw", bucket);
                }
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
            entropy: None,
            mmds: None,
            mmds_store: None,
            console_rate_limit: None,
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
                rate_limiter: None,
            }
        );
        let limited: DiskConfig = "path=/img,bw=4194304,iops=100".parse().unwrap();
        assert_eq!(
            limited.rate_limiter,
            Some(RateLimiterConfig {
                bandwidth: Some(TokenBucketConfig {
                    size: 4 << 20,
                    one_time_burst: None,
                    refill_time: 1000
                }),
                ops: Some(TokenBucketConfig::per_second(100)),
            })
        );
        let unlimited: DiskConfig = "path=/img,bw=5,bw=0".parse().unwrap();
        assert_eq!(unlimited.rate_limiter, None, "0 removes the limit");
        assert_eq!(
            "path=/a,iops=lots".parse::<DiskConfig>(),
            Err(DiskSpecError::BadRate("iops".into(), "lots".into()))
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
        assert_eq!((n.rx_rate_limiter, n.tx_rate_limiter), (None, None));
        let n: NetConfig = "tap=t,tx_pps=1000,rx_bw=125000".parse().unwrap();
        let per_second = |n| Some(TokenBucketConfig::per_second(n));
        assert_eq!(
            (n.rx_rate_limiter, n.tx_rate_limiter),
            (
                Some(RateLimiterConfig {
                    bandwidth: per_second(125_000),
                    ops: None
                }),
                Some(RateLimiterConfig {
                    bandwidth: None,
                    ops: per_second(1000)
                })
            )
        );
        assert!(matches!(
            "tap=t,rx_pps=-1".parse::<NetConfig>(),
            Err(NetSpecError::BadRate(..))
        ));
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

    #[test]
    fn rate_limiter_patches_follow_firecracker() {
        let bucket = |size, refill_time| TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time,
        };
        let both = RateLimiterConfig {
            bandwidth: Some(bucket(1000, 100)),
            ops: Some(bucket(10, 1000)),
        };
        // A bucket not given stays; one given replaces; a zero one removes.
        let faster_ops = RateLimiterConfig {
            bandwidth: None,
            ops: Some(bucket(20, 1000)),
        };
        assert_eq!(
            RateLimiterConfig::patch(Some(both), &faster_ops),
            Some(RateLimiterConfig {
                bandwidth: both.bandwidth,
                ops: faster_ops.ops
            })
        );
        let no_ops = RateLimiterConfig {
            bandwidth: None,
            ops: Some(bucket(0, 0)),
        };
        assert_eq!(
            RateLimiterConfig::patch(Some(both), &no_ops).unwrap().ops,
            None
        );
        let nothing = RateLimiterConfig {
            bandwidth: Some(bucket(5, 0)),
            ops: Some(bucket(0, 5)),
        };
        assert_eq!(RateLimiterConfig::patch(Some(both), &nothing), None);
        assert_eq!(
            RateLimiterConfig::patch(None, &faster_ops),
            Some(faster_ops)
        );
        assert_eq!(
            RateLimiterConfig::patch(None, &RateLimiterConfig::default()),
            None
        );
        let zero_burst = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                one_time_burst: Some(0),
                ..bucket(1, 1)
            }),
            ops: None,
        };
        assert_eq!(
            zero_burst.normalized().unwrap().bandwidth,
            Some(bucket(1, 1))
        );
    }
}
