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
    /// Two threads per core in the guest's CPU topology (vCPU count 1 or even).
    pub smt: bool,
    /// What backs guest RAM: 4 KiB pages, transparent huge pages, or 2 MiB hugetlbfs pages.
    pub huge_pages: HugePages,
    /// A custom CPU template (`PUT /cpu-config`); setting it clears `cpu_template`.
    pub cpu_config: Option<crate::arch::x86_64::cpu_template::CustomCpuTemplate>,
    /// A built-in CPU template (`cpu_template` in `/machine-config`), never `None` (that
    /// clears both); setting it clears `cpu_config`.
    pub cpu_template: Option<crate::arch::x86_64::static_cpu_template::StaticCpuTemplate>,
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
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// The memory balloon (virtio-balloon), if any.
    pub balloon: Option<BalloonConfig>,
    /// Persistent memory devices (virtio-pmem), in the order the guest numbers them
    /// (/dev/pmem0 first).
    pub pmem: Vec<PmemConfig>,
    /// Hot-pluggable memory (virtio-mem), if any.
    pub memory_hotplug: Option<MemoryHotplugConfig>,
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
    /// The virtio devices on a virtio-pci transport (a PCI bus with MSI-X) instead of
    /// virtio-mmio: Firecracker's `--enable-pci`.
    pub enable_pci: bool,
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

/// The vsock device, as Firecracker's `PUT /vsock` describes it: the guest's CID and the Unix
/// socket host programs connect to (guest connections to host port P reach `<uds_path>_P`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// An id for the device (deprecated in Firecracker; kept and shown back as given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    /// The guest's context id: 3 or more (0 to 2 are reserved), not 2^32-1 (any).
    pub guest_cid: u32,
    /// The Unix socket Skiff listens on; it must not exist.
    pub uds_path: String,
}

/// The memory balloon, as Firecracker's `PUT /balloon` describes it (every field shown back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Target size in MiB: guest memory the guest should give up.
    pub amount_mib: u32,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may take pages back when it runs out.
    pub deflate_on_oom: bool,
    /// Seconds between statistics updates; 0 leaves the statistics queue out.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Free page hinting: runs the host starts (`PATCH /balloon/hinting/start`).
    #[serde(default)]
    pub free_page_hinting: bool,
    /// Free page reporting: the guest reports free ranges on its own.
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// A virtio-pmem device, as Firecracker's `PUT /pmem/{id}` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PmemConfig {
    /// The device's id (empty: `pmem<N>`, N its place among the pmem devices).
    pub id: String,
    /// The backing file on the host.
    pub path_on_host: PathBuf,
    /// The guest's root device: `root=/dev/pmem<N>` (and `rw` or `ro`) on the command line.
    #[serde(default)]
    pub root_device: bool,
    /// Map the file read-only: the guest's writes do not reach it.
    #[serde(default)]
    pub read_only: bool,
    /// Limits on the guest's flushes (each one op and the file's size in bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl std::str::FromStr for PmemConfig {
    type Err = String;

    /// Parses `path=FILE[,id=NAME][,readonly=on][,root=on]`; without an id the device is
    /// `pmem<N>`, N its place among the pmem devices.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut pmem = Self {
            id: String::new(),
            path_on_host: PathBuf::new(),
            root_device: false,
            read_only: false,
            rate_limiter: None,
        };
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, "on"));
            match key {
                "path" => pmem.path_on_host = PathBuf::from(value),
                "id" => pmem.id = value.to_owned(),
                "readonly" | "root" => {
                    let on = switch(if key == "root" { "root" } else { "readonly" }, value)
                        .map_err(|e| e.to_string())?;
                    if key == "root" {
                        pmem.root_device = on;
                    } else {
                        pmem.read_only = on;
                    }
                }
                other => {
                    return Err(format!(
                        "unknown key '{other}' (expected path, id, readonly, root)"
                    ))
                }
            }
        }
        if pmem.path_on_host.as_os_str().is_empty() {
            return Err("missing path=FILE".to_owned());
        }
        Ok(pmem)
    }
}

/// Hot-pluggable memory (a virtio-mem device), as Firecracker's `PUT /hotplug/memory`
/// describes it: a region of `total_size_mib` after RAM, of which the guest plugs blocks of
/// `block_size_mib` as the host asks (`PATCH /hotplug/memory`), given to KVM in slots of
/// `slot_size_mib`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugConfig {
    /// The region's size in MiB: the most the guest can ever plug.
    pub total_size_mib: u64,
    /// The KVM slot size in MiB: the host's granule of memory given to and taken from the guest.
    #[serde(default = "MemoryHotplugConfig::default_slot_size_mib")]
    pub slot_size_mib: u64,
    /// The block size in MiB: the guest's granule of plugging.
    #[serde(default = "MemoryHotplugConfig::default_block_size_mib")]
    pub block_size_mib: u64,
}

impl MemoryHotplugConfig {
    /// Firecracker's default and smallest slot size.
    pub const MIN_SLOT_SIZE_MIB: u64 = 128;
    /// Firecracker's default and smallest block size.
    pub const MIN_BLOCK_SIZE_MIB: u64 = 2;

    fn default_slot_size_mib() -> u64 {
        Self::MIN_SLOT_SIZE_MIB
    }

    fn default_block_size_mib() -> u64 {
        Self::MIN_BLOCK_SIZE_MIB
    }

    /// Firecracker's rules: a block of at least 2 MiB and a power of two; a slot of at least
    /// 128 MiB and a multiple of the block; a total of at least a slot and a multiple of it.
    pub fn validate(&self) -> Result<(), String> {
        let (total, slot, block) = (self.total_size_mib, self.slot_size_mib, self.block_size_mib);
        if block < Self::MIN_BLOCK_SIZE_MIB || !block.is_power_of_two() {
            return Err(format!(
                "block_size_mib {block} must be a power of two of at least {} MiB",
                Self::MIN_BLOCK_SIZE_MIB
            ));
        }
        if slot < Self::MIN_SLOT_SIZE_MIB || !slot.is_multiple_of(block) {
            return Err(format!(
                "slot_size_mib {slot} must be at least {} MiB and a multiple of block_size_mib {block}",
                Self::MIN_SLOT_SIZE_MIB
            ));
        }
        if total < slot || !total.is_multiple_of(slot) {
            return Err(format!(
                "total_size_mib {total} must be at least slot_size_mib {slot} and a multiple of it"
            ));
        }
        // Beyond this it overflows byte counts long before any host could back it.
        if total > 1 << 30 {
            return Err(format!("total_size_mib {total} is too large"));
        }
        Ok(())
    }
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
    #[serde(deserialize_with = "int64")]
    pub size: u64,
    /// Extra tokens spent before the bucket's own, once.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "optional_int64"
    )]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the bucket from empty to full.
    #[serde(deserialize_with = "int64")]
    pub refill_time: u64,
}

/// A bucket's number as Firecracker's API types it (int64): refused above i64::MAX.
fn int64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let n = u64::deserialize(d)?;
    if i64::try_from(n).is_err() {
        return Err(serde::de::Error::custom(format!(
            "{n} is larger than the API's int64 maximum"
        )));
    }
    Ok(n)
}

fn optional_int64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<u64>::deserialize(d)? {
        Some(n) if i64::try_from(n).is_err() => Err(serde::de::Error::custom(format!(
            "{n} is larger than the API's int64 maximum"
        ))),
        other => Ok(other),
    }
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
    /// Not six colon-separated hex bytes.
    #[error("mac '{0}' is not an address like 06:00:ac:10:00:02")]
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

/// Parses `aa:bb:cc:dd:ee:ff` as a MAC address.
pub fn parse_mac(text: &str) -> Result<[u8; 6], NetSpecError> {
    let bad = || NetSpecError::BadMac(text.to_owned());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    // Any address is taken, as Firecracker takes it (a multicast one is the guest's problem:
    // Linux then picks a random one).
    if parts.next().is_some() {
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
    /// Whether the guest may ask for its writes to be made durable.
    pub cache_type: CacheType,
    /// How requests reach the image, as the API was told.
    pub io_engine: IoEngine,
}

/// A disk's write cache as the guest sees it (Firecracker's `cache_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CacheType {
    /// No flush offered: the guest treats its writes as done when the host has them in its
    /// page cache (Firecracker's default).
    #[default]
    Unsafe,
    /// Flush offered, and made durable on the host (fdatasync of the image).
    Writeback,
}

/// What backs guest RAM (Firecracker's `huge_pages` in `/machine-config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum HugePages {
    /// Anonymous memory in the host's base pages.
    #[default]
    None,
    /// Anonymous memory with `madvise(MADV_HUGEPAGE)`: the host backs what the guest touches
    /// with 2 MiB pages where it can (and when `transparent_hugepage/enabled` allows it).
    Transparent,
    /// 2 MiB pages from the host's hugetlbfs pool, reserved when the VM is built, so a pool
    /// too small fails then with a clear error rather than with SIGBUS later.
    #[serde(rename = "2M")]
    Huge2M,
}

impl HugePages {
    /// The name the API and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "None",
            Self::Transparent => "Transparent",
            Self::Huge2M => "2M",
        }
    }

    /// Parses an API or command-line name (the command line's are taken in any case).
    pub fn parse(name: &str) -> Option<Self> {
        [Self::None, Self::Transparent, Self::Huge2M]
            .into_iter()
            .find(|h| h.name().eq_ignore_ascii_case(name))
    }
}

/// How a disk's requests are carried out (Firecracker's `io_engine`, same names and default).
///
/// Sync is the default by measurement (README, Performance): per request the VMM spends less
/// on Sync (about 1.0 us against 1.8 us for a lone 4 KiB read; Async wins only with many
/// requests per drain, 0.6 us each at 32), the guest-side figures on the test host differ
/// within noise, and a drive without `io_engine` then behaves as in Firecracker, on hosts that
/// refuse io_uring too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum IoEngine {
    /// `preadv`/`pwritev`/`fdatasync` on the event thread, one request at a time, straight
    /// into guest memory.
    #[default]
    Sync,
    /// An io_uring per disk: a queue drain is one submission, up to 32 requests in flight,
    /// completions through an eventfd; flushes ordered after the writes before them. A host
    /// that refuses io_uring makes the drive an error, as in Firecracker.
    Async,
}

/// Errors in a `--disk` description.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskSpecError {
    /// No `path=`.
    #[error("missing path=IMAGE")]
    MissingPath,
    /// A key that is not path, readonly, id, root, cache, engine, bw or iops.
    #[error("unknown key '{0}' (expected path, readonly, id, root, cache, engine, bw, iops)")]
    UnknownKey(String),
    /// An engine that is neither sync nor async.
    #[error("engine must be sync or async, not '{0}'")]
    BadEngine(String),
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

impl VsockConfig {
    /// Refuses a reserved CID or an empty or unusable socket path.
    pub fn check(&self) -> Result<(), String> {
        if self.guest_cid < 3 || self.guest_cid == u32::MAX {
            return Err(format!(
                "guest_cid {} is reserved: use 3 to 4294967294",
                self.guest_cid
            ));
        }
        // sun_path holds 108 bytes with the terminating NUL.
        if self.uds_path.is_empty() || self.uds_path.len() > 107 || self.uds_path.contains('\0') {
            return Err(format!(
                "uds_path '{}' is not a usable Unix socket path (1 to 107 bytes)",
                self.uds_path.escape_debug()
            ));
        }
        Ok(())
    }
}

impl std::str::FromStr for VsockConfig {
    type Err = String;

    /// Parses `cid=N,uds=PATH`.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let (mut cid, mut uds) = (None, None);
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            match key {
                "cid" => cid = Some(value.parse().map_err(|_| format!("bad cid '{value}'"))?),
                "uds" => uds = Some(value.to_owned()),
                other => return Err(format!("unknown key '{other}' (expected cid, uds)")),
            }
        }
        Ok(Self {
            vsock_id: None,
            guest_cid: cid.ok_or("cid= is missing")?,
            uds_path: uds.ok_or("uds= is missing")?,
        })
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = DiskSpecError;

    /// Parses `path=IMG[,readonly=on][,id=NAME][,root=on][,cache=unsafe|writeback][,bw=BYTES]
    /// [,iops=N]`, the rates per second.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut disk = DiskConfig {
            path: PathBuf::new(),
            read_only: false,
            id: None,
            root: false,
            partuuid: None,
            rate_limiter: None,
            cache_type: CacheType::default(),
            io_engine: IoEngine::default(),
        };
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, "on"));
            match key {
                "path" => disk.path = PathBuf::from(value),
                "readonly" => disk.read_only = switch("readonly", value)?,
                "root" => disk.root = switch("root", value)?,
                "cache" => {
                    disk.cache_type = match value {
                        "unsafe" => CacheType::Unsafe,
                        "writeback" => CacheType::Writeback,
                        _ => return Err(DiskSpecError::BadSwitch("cache", value.to_owned())),
                    }
                }
                "engine" => {
                    disk.io_engine = match value {
                        "sync" => IoEngine::Sync,
                        "async" => IoEngine::Async,
                        _ => return Err(DiskSpecError::BadEngine(value.to_owned())),
                    }
                }
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
            vsock: None,
            pmem: Vec::new(),
            memory_hotplug: None,
            mmds: None,
            mmds_store: None,
            console_rate_limit: None,
            smt: false,
            huge_pages: HugePages::None,
            cpu_config: None,
            cpu_template: None,
            balloon: None,
            track_dirty_pages: false,
            boot_timer: false,
            enable_pci: false,
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
                cache_type: CacheType::Unsafe,
                io_engine: IoEngine::Sync,
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
        let async_disk: DiskConfig = "path=/a,engine=async".parse().unwrap();
        assert_eq!(async_disk.io_engine, IoEngine::Async);
        let bad = "path=/a,engine=uring".parse::<DiskConfig>().unwrap_err();
        assert_eq!(bad.to_string(), "engine must be sync or async, not 'uring'");
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
            "6:0:0:0:0:1",
            "",
        ] {
            assert!(
                matches!(parse_mac(mac), Err(NetSpecError::BadMac(_))),
                "{mac}"
            );
        }
        // Firecracker takes any address, a multicast-looking one included.
        assert_eq!(parse_mac("07:00:00:00:00:01").unwrap(), [7, 0, 0, 0, 0, 1]);
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
