//! The Firecracker API's request and response bodies (shared/reference/firecracker-api.yaml),
//! parsed with serde (unknown fields rejected) and converted to and from the one [`VmConfig`].
//! The config file (`--config-file`) is the same [`FullVmConfig`] document.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::static_cpu_template::StaticCpuTemplate;
use crate::config::{
    parse_mac, CacheType, DiskConfig, HugePages, IoEngine, NetConfig, PmemConfig,
    RateLimiterConfig, VmConfig, DEFAULT_CMDLINE,
};

/// Largest vCPU count the API accepts, as Firecracker.
pub const MAX_API_VCPUS: u32 = 32;

/// Why a body cannot be applied; the text becomes the `fault_message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

fn bad<T>(msg: impl Into<String>) -> Result<T, BadRequest> {
    Err(BadRequest(msg.into()))
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Kernel image on the host.
    pub kernel_image_path: String,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Initrd on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// `GET|PUT|PATCH /machine-config`. PUT needs both sizes; PATCH takes any subset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs, 1 to 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u32>,
    /// Guest memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<u64>,
    /// Simultaneous multithreading (not supported: false only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Dirty-page tracking for snapshots (accepted, not used yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// A built-in CPU template; "None" clears it, and a custom one (`/cpu-config`) too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<StaticCpuTemplate>,
    /// What backs guest memory: "None", "Transparent" or "2M".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive's id (the path's id).
    pub drive_id: String,
    /// Image file on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// Root device: /dev/vda and `root=` on the command line.
    pub is_root_device: bool,
    /// Partition UUID of the root partition (`root=PARTUUID=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// "Unsafe" or "Writeback": flushes are always honoured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// "Sync" or "Async": requests run synchronously on the event thread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// Limits on the guest's requests: bytes and operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// vhost-user socket: not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PATCH /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// The drive's id.
    pub drive_id: String,
    /// New image file.
    #[serde(default)]
    pub path_on_host: Option<String>,
    /// Changes to the rate limiter: the buckets given replace the current ones.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's id (the path's id).
    pub iface_id: String,
    /// The TAP on the host.
    pub host_dev_name: String,
    /// The guest's MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// MTU (not supported: the TAP's MTU applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Limits on what the guest receives: bytes and frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on what the guest sends: bytes and frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `PATCH /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// The interface's id.
    pub iface_id: String,
    /// Changes to the RX rate limiter: the buckets given replace the current ones.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Changes to the TX rate limiter: the buckets given replace the current ones.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /logger`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// File or named pipe the log goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// Error, Warning, Info, Debug, Trace or Off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Prefix lines with the level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Prefix lines with file and line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log lines from this module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// File or named pipe the metrics go to.
    pub metrics_path: String,
}

/// `PUT /actions`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// What to do.
    pub action_type: ActionType,
}

/// The synchronous actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    /// Boot the configured VM.
    InstanceStart,
    /// Send Ctrl-Alt-Del through the i8042.
    SendCtrlAltDel,
    /// Write the metrics now.
    FlushMetrics,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateRequest {
    /// Paused or Resumed.
    pub state: VmStateName,
}

/// The states `PATCH /vm` sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VmStateName {
    /// Stop every vCPU and device processing.
    Paused,
    /// Continue.
    Resumed,
}

impl crate::config::EntropyConfig {
    /// The device as `PUT /entropy` gives it, its rate limiter normalised; refused when the
    /// limiter is unusable.
    pub fn checked(&self) -> Result<Self, BadRequest> {
        if let Some(limiter) = &self.rate_limiter {
            crate::rate_limiter::RateLimiter::new(limiter)
                .map_err(|e| BadRequest(crate::error_chain(&e)))?;
        }
        Ok(Self {
            rate_limiter: self.rate_limiter.and_then(RateLimiterConfig::normalized),
        })
    }
}

impl crate::config::VsockConfig {
    /// The device as `PUT /vsock` gives it, refused when its CID or path is unusable or the
    /// path is taken (Firecracker binds the socket there and then; Skiff binds it when the VM
    /// is built, and says now what would fail then).
    pub fn checked(&self) -> Result<Self, BadRequest> {
        self.check().map_err(BadRequest)?;
        if std::path::Path::new(&self.uds_path)
            .symlink_metadata()
            .is_ok()
        {
            return bad(format!(
                "uds_path {} already exists: a vsock socket needs a free path",
                self.uds_path
            ));
        }
        Ok(self.clone())
    }
}

/// `PATCH /pmem/{id}`: a new rate limiter for a running pmem device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialPmem {
    /// The device's id.
    pub id: String,
    /// Changes to the rate limiter: the buckets given replace the current ones.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `PATCH /hotplug/memory`: the size the guest should have plugged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugSizeUpdate {
    /// MiB: a multiple of the block size, at most the region's size.
    pub requested_size_mib: u64,
}

/// Checks a rate limiter a client gave: refused when a bucket is unusable.
fn check_rate_limiter(limiter: Option<&RateLimiterConfig>) -> Result<(), BadRequest> {
    if let Some(limiter) = limiter {
        crate::rate_limiter::RateLimiter::new(limiter)
            .map_err(|e| BadRequest(crate::error_chain(&e)))?;
    }
    Ok(())
}

impl PmemConfig {
    /// Adds or replaces the pmem device in `config`, as `PUT /pmem/{id}` does: at most one
    /// root device among the drives and pmem devices.
    pub fn apply(&self, config: &mut VmConfig) -> Result<(), BadRequest> {
        check_id("pmem", &self.id)?;
        if self.path_on_host.as_os_str().is_empty() {
            return bad(format!("pmem {}: path_on_host is empty", self.id));
        }
        if self.root_device {
            if let Some(drive) = config.disks.iter().find(|d| d.root) {
                return bad(format!(
                    "pmem {} cannot be the root device: drive {} already is",
                    self.id,
                    drive.id.as_deref().unwrap_or("?")
                ));
            }
            if let Some(other) = (config.pmem.iter()).find(|p| p.root_device && p.id != self.id) {
                return bad(format!(
                    "pmem {} cannot be the root device: pmem {} already is",
                    self.id, other.id
                ));
            }
        }
        check_rate_limiter(self.rate_limiter.as_ref())?;
        let pmem = Self {
            rate_limiter: self.rate_limiter.and_then(RateLimiterConfig::normalized),
            ..self.clone()
        };
        match config.pmem.iter_mut().find(|p| p.id == self.id) {
            Some(existing) => *existing = pmem,
            None => config.pmem.push(pmem),
        }
        Ok(())
    }
}

impl crate::config::MmdsConfig {
    /// The service as `PUT /mmds/config` (or the config file's `mmds-config`) gives it for the
    /// VM `config` describes, checked as Firecracker checks it (with its messages): a
    /// link-local address, and interfaces that exist. Kept with its address filled in and its
    /// interfaces in the VM's order, as `GET /vm/config` shows them.
    pub fn checked(&self, config: &VmConfig) -> Result<Self, BadRequest> {
        let [a, b, c, _] = self.ipv4().octets();
        if (a, b) != (169, 254) || c == 0 || c == 255 {
            return bad("MMMDS config error: The MMDS IPv4 address is not link local.");
        }
        if self.network_interfaces.is_empty() {
            return bad("MMMDS config error: The list of network interface IDs that allow forwarding MMDS requests is empty.");
        }
        let known = |id: &String| config.nets.iter().any(|n| n.id.as_ref() == Some(id));
        if !self.network_interfaces.iter().all(known) {
            return bad("MMMDS config error: The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface.");
        }
        Ok(Self {
            network_interfaces: (config.nets.iter())
                .filter_map(|n| n.id.clone())
                .filter(|id| self.network_interfaces.contains(id))
                .collect(),
            ipv4_address: Some(self.ipv4()),
            ..self.clone()
        })
    }
}

/// `PUT /serial`: where the serial console's output goes, and how fast.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// A file (created or truncated) or named pipe (which must have a reader) for the output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
    /// Bytes a second the output may take; the rest is dropped and counted in
    /// `uart.rate_limiter_dropped_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<crate::config::TokenBucketConfig>,
}

impl SerialConfig {
    /// Sets the console's output in `config`.
    pub fn apply(&self, config: &mut VmConfig) -> Result<(), BadRequest> {
        if self.serial_out_path.as_deref() == Some("") {
            return bad("serial_out_path is empty");
        }
        config.console_output = self.serial_out_path.as_ref().map(PathBuf::from);
        config.console_rate_limit = self
            .rate_limiter
            .filter(crate::config::TokenBucketConfig::is_enabled);
        Ok(())
    }

    /// The section describing `config`'s console, when it is not the default one.
    pub fn of(config: &VmConfig) -> Option<Self> {
        let shown = Self {
            serial_out_path: config
                .console_output
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
            rate_limiter: config.console_rate_limit,
        };
        (shown != Self::default()).then_some(shown)
    }
}

impl crate::config::BalloonConfig {
    /// The balloon as `PUT /balloon` gives it, refused when its target exceeds the guest
    /// memory configured (Firecracker's check and text).
    pub fn checked(&self, memory_mib: u64) -> Result<Self, BadRequest> {
        if u64::from(self.amount_mib) > memory_mib {
            return bad("Balloon config error: Amount of pages requested is too large.");
        }
        Ok(*self)
    }
}

/// `PATCH /balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// The new target in MiB.
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// The new interval in seconds (not 0, and not from 0: statistics stay on or off).
    pub stats_polling_interval_s: u16,
}

/// `PATCH /balloon/hinting/start` (the body may be left out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStartCmd {
    /// Answer the guest's end of the run with DONE at once (default true).
    #[serde(default = "yes")]
    pub acknowledge_on_stop: bool,
}

fn yes() -> bool {
    true
}

impl Default for BalloonStartCmd {
    fn default() -> Self {
        Self {
            acknowledge_on_stop: true,
        }
    }
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Full (the default) or Diff.
    #[serde(default)]
    pub snapshot_type: crate::snapshot::SnapshotType,
    /// Where the state goes.
    pub snapshot_path: String,
    /// Where guest memory goes.
    pub mem_file_path: String,
}

/// The memory backends of `PUT /snapshot/load`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MemBackendType {
    /// The memory file, mapped privately.
    File,
    /// An external page-fault handler on a Unix socket.
    Uffd,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// File or Uffd.
    pub backend_type: MemBackendType,
    /// The memory file, or the handler's socket.
    pub backend_path: String,
}

/// One entry of `network_overrides`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface.
    pub iface_id: String,
    /// Its new TAP.
    pub host_dev_name: String,
}

/// `vsock_override` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The new socket path.
    pub uds_path: String,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The state file.
    pub snapshot_path: String,
    /// The memory file (deprecated form of `mem_backend` File).
    #[serde(default)]
    pub mem_file_path: Option<String>,
    /// Where guest memory comes from.
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    /// Track dirty pages from the start.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// The older name of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Resume the VM once loaded.
    #[serde(default)]
    pub resume_vm: bool,
    /// Interfaces to put on other TAPs.
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// The vsock device's new socket path (the saved one may still be taken).
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    /// Advance kvmclock by the wall-clock time since the snapshot.
    #[serde(default)]
    pub clock_realtime: bool,
}

impl SnapshotLoadParams {
    /// Where guest memory comes from, from whichever of the two fields gives it (exactly one
    /// must; `mem_file_path` is a memory file).
    pub fn mem_backend(&self) -> Result<crate::snapshot::MemBackend, BadRequest> {
        use crate::snapshot::MemBackend as Backend;
        match (&self.mem_file_path, &self.mem_backend) {
            (Some(_), Some(_)) => bad("Only one of mem_file_path and mem_backend may be given."),
            (None, None) => bad("Either mem_file_path or mem_backend must be given."),
            (Some(path), None) => Ok(Backend::File(path.into())),
            (None, Some(b)) => {
                let path = b.backend_path.clone().into();
                Ok(match b.backend_type {
                    MemBackendType::File => Backend::File(path),
                    MemBackendType::Uffd => Backend::Uffd(path),
                })
            }
        }
    }
}

/// The whole configuration: `GET /vm/config`, and the `--config-file` document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FullVmConfig {
    /// Kernel, initrd, command line.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// vCPUs and memory.
    #[serde(
        rename = "machine-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub machine_config: Option<MachineConfig>,
    /// Block devices.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub drives: Vec<Drive>,
    /// Network devices.
    #[serde(
        rename = "network-interfaces",
        default,
        deserialize_with = "null_as_empty"
    )]
    pub network_interfaces: Vec<NetworkInterface>,
    /// The config file's equivalent of `--enable-pci` (a Skiff extension; Firecracker takes it
    /// on the command line only): the virtio devices on virtio-pci.
    #[serde(
        rename = "enable-pci",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub enable_pci: bool,
    /// Logger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// Metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// The entropy device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<crate::config::EntropyConfig>,
    /// The vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<crate::config::VsockConfig>,
    /// The serial console's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialConfig>,
    /// A custom CPU template.
    #[serde(
        rename = "cpu-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_config: Option<crate::arch::x86_64::cpu_template::CustomCpuTemplate>,
    /// The balloon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<crate::config::BalloonConfig>,
    /// Persistent memory devices.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub pmem: Vec<PmemConfig>,
    /// Hot-pluggable memory.
    #[serde(
        rename = "memory-hotplug",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_hotplug: Option<crate::config::MemoryHotplugConfig>,
    /// The metadata service.
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<crate::config::MmdsConfig>,
    /// Devices of later work, refused with a clear message when present.
    #[serde(flatten, skip_serializing)]
    pub unsupported: std::collections::BTreeMap<String, serde_json::Value>,
}

/// A list section given as `null` (which Firecracker's own documents may hold) is empty.
fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// Sets each of `keys` that `value` (an object) lacks to null.
fn fill_nulls(value: &mut serde_json::Value, keys: &[&str]) {
    if let Some(map) = value.as_object_mut() {
        for key in keys {
            map.entry(*key).or_insert(serde_json::Value::Null);
        }
    }
}

/// Firecracker's shape of a rate limiter: both buckets, and each bucket's burst, null if unset.
fn fill_limiter(value: &mut serde_json::Value) {
    fill_nulls(value, &["bandwidth", "ops"]);
    // (Indexing a null would make it an object: only objects are walked into.)
    for bucket in value
        .as_object_mut()
        .into_iter()
        .flat_map(|m| m.values_mut())
    {
        fill_nulls(bucket, &["one_time_burst"]);
    }
}

/// Sections of Firecracker's document that Skiff does not have yet.
const NOT_YET: &[&str] = &[];

fn check_id(kind: &str, id: &str) -> Result<(), BadRequest> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return bad(format!(
            "invalid {kind} id '{id}': use 1 to 64 letters, digits, '_' or '-'"
        ));
    }
    Ok(())
}

impl BootSource {
    /// Applies the boot source to `config`.
    pub fn apply(&self, config: &mut VmConfig) -> Result<(), BadRequest> {
        if self.kernel_image_path.is_empty() {
            return bad("kernel_image_path is empty");
        }
        let kernel = PathBuf::from(&self.kernel_image_path);
        let initrd = self.initrd_path.as_ref().map(PathBuf::from);
        // Checked now, as Firecracker does, not at InstanceStart.
        if let Err(e) = crate::arch::x86_64::boot::check_boot_files(&kernel, initrd.as_deref()) {
            let what = match e {
                crate::arch::x86_64::boot::BootError::InitrdFile(..) => {
                    "The initrd file cannot be opened due to invalid path or invalid permissions."
                }
                _ => "The kernel file cannot be opened:",
            };
            return bad(format!("{what} {}", crate::error_chain(&e)));
        }
        config.kernel = kernel;
        config.initrd = initrd;
        config.cmdline = self
            .boot_args
            .clone()
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_owned());
        Ok(())
    }
}

impl MachineConfig {
    /// Applies the set fields to `config`; with `full` (PUT) both sizes are required and unset
    /// options return to their defaults. Nothing changes unless every field is valid.
    pub fn apply(&self, config: &mut VmConfig, full: bool) -> Result<(), BadRequest> {
        // Firecracker's texts (serde's for a missing field, with its prefix), then Skiff's.
        for (missing, field) in [
            (self.vcpu_count.is_none(), "vcpu_count"),
            (self.mem_size_mib.is_none(), "mem_size_mib"),
        ] {
            if full && missing {
                return bad(format!(
                    "An error occurred when deserializing the json body of a request: missing field `{field}`."
                ));
            }
        }
        if let Some(n) = self.vcpu_count {
            if n == 0 || n > MAX_API_VCPUS {
                return bad(format!(
                    "The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled. (vcpu_count {n}: 1 to {MAX_API_VCPUS})"
                ));
            }
        }
        if self.mem_size_mib == Some(0) {
            return bad("The memory size (MiB) is invalid. (mem_size_mib must be at least 1)");
        }
        let smt = self.smt.unwrap_or(if full { false } else { config.smt });
        let vcpus = self.vcpu_count.unwrap_or(config.vcpus);
        if smt && vcpus != 1 && !vcpus.is_multiple_of(2) {
            return bad(
                "The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.",
            );
        }
        let huge_pages = match self.huge_pages.as_deref() {
            None if full => HugePages::None,
            None => config.huge_pages,
            Some(h) => HugePages::parse(h)
                .filter(|p| p.name() == h)
                .ok_or_else(|| {
                    BadRequest(format!(
                        "huge_pages '{h}': expected None, Transparent or 2M"
                    ))
                })?,
        };
        let mem = self.mem_size_mib.unwrap_or(config.memory_mib);
        if huge_pages != HugePages::None && !mem.is_multiple_of(2) {
            return bad(format!(
                "The memory size (MiB) is invalid. (mem_size_mib {mem} must be a multiple of 2 \
                 with huge_pages {})",
                huge_pages.name()
            ));
        }
        if let Some(n) = self.vcpu_count {
            config.vcpus = n;
        }
        if let Some(m) = self.mem_size_mib {
            if config.balloon.is_some_and(|b| u64::from(b.amount_mib) > m) {
                return bad(
                    "The memory size (MiB) is smaller than the previously set balloon device \
                     target size.",
                );
            }
            config.memory_mib = m;
        }
        config.smt = smt;
        config.huge_pages = huge_pages;
        // As in Firecracker, whichever template came last wins; the host is checked at start.
        if let Some(t) = self.cpu_template {
            config.cpu_template = Some(t).filter(|t| *t != StaticCpuTemplate::None);
            config.cpu_config = None;
        }
        if full || self.track_dirty_pages.is_some() {
            config.track_dirty_pages = self.track_dirty_pages.unwrap_or(false);
        }
        Ok(())
    }

    /// The machine configuration of `config`.
    pub fn of(config: &VmConfig) -> Self {
        Self {
            vcpu_count: Some(config.vcpus),
            mem_size_mib: Some(config.memory_mib),
            smt: Some(config.smt),
            track_dirty_pages: Some(config.track_dirty_pages),
            cpu_template: config.cpu_template,
            huge_pages: Some(config.huge_pages.name().to_owned()),
        }
    }
}

impl Drive {
    /// Adds or replaces the drive in `config`.
    pub fn apply(&self, config: &mut VmConfig) -> Result<(), BadRequest> {
        check_id("drive", &self.drive_id)?;
        if self.socket.is_some() {
            return bad("vhost-user drives (socket) are not supported by Skiff");
        }
        let Some(path) = self.path_on_host.as_deref().filter(|p| !p.is_empty()) else {
            return bad(format!("drive {}: path_on_host is required", self.drive_id));
        };
        let cache_type = match self.cache_type.as_deref() {
            None | Some("Unsafe") => CacheType::Unsafe,
            Some("Writeback") => CacheType::Writeback,
            Some(c) => return bad(format!("cache_type '{c}': expected Unsafe or Writeback")),
        };
        let io_engine = match self.io_engine.as_deref() {
            None | Some("Sync") => IoEngine::Sync,
            Some("Async") => IoEngine::Async,
            Some(e) => return bad(format!("io_engine '{e}': expected Sync or Async")),
        };
        if let Some(uuid) = &self.partuuid {
            if uuid.is_empty()
                || uuid.len() > 64
                || !uuid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
            {
                return bad(format!("partuuid '{uuid}' is not a partition UUID"));
            }
        }
        // Opened now, as Firecracker does, not at InstanceStart (a longer id than the
        // 20 bytes of virtio-blk's serial is cut there, as Firecracker does too).
        crate::devices::virtio::block::open_image(
            std::path::Path::new(path),
            self.is_read_only.unwrap_or(false),
        )
        .map_err(|e| {
            BadRequest(format!(
                "Unable to create the block device: {}",
                crate::error_chain(&e)
            ))
        })?;
        if self.is_root_device {
            if let Some(pmem) = config.pmem.iter().find(|p| p.root_device) {
                return bad(format!(
                    "drive {} cannot be the root device: pmem {} already is",
                    self.drive_id, pmem.id
                ));
            }
            if let Some(other) = config
                .disks
                .iter()
                .find(|d| d.root && d.id.as_deref() != Some(self.drive_id.as_str()))
            {
                return bad(format!(
                    "A root block device already exists! (drive {} is the root device)",
                    other.id.as_deref().unwrap_or("?")
                ));
            }
        }
        let disk = DiskConfig {
            path: PathBuf::from(path),
            read_only: self.is_read_only.unwrap_or(false),
            id: Some(self.drive_id.clone()),
            root: self.is_root_device,
            partuuid: self.partuuid.clone(),
            rate_limiter: self.rate_limiter.and_then(RateLimiterConfig::normalized),
            cache_type,
            io_engine,
        };
        match config
            .disks
            .iter_mut()
            .find(|d| d.id.as_deref() == Some(self.drive_id.as_str()))
        {
            Some(existing) => *existing = disk,
            None => config.disks.push(disk),
        }
        Ok(())
    }

    /// The API view of a configured disk.
    pub fn of(disk: &DiskConfig) -> Self {
        Self {
            drive_id: disk.id.clone().unwrap_or_default(),
            path_on_host: Some(disk.path.to_string_lossy().into_owned()),
            is_root_device: disk.root,
            partuuid: disk.partuuid.clone(),
            is_read_only: Some(disk.read_only),
            cache_type: Some(format!("{:?}", disk.cache_type)),
            io_engine: Some(format!("{:?}", disk.io_engine)),
            rate_limiter: disk.rate_limiter,
            socket: None,
        }
    }
}

impl NetworkInterface {
    /// Adds or replaces the interface in `config`.
    pub fn apply(&self, config: &mut VmConfig) -> Result<(), BadRequest> {
        check_id("network interface", &self.iface_id)?;
        if self.mtu.is_some() {
            return bad("mtu is not supported by Skiff yet: set the MTU on the TAP");
        }
        let mac = match &self.guest_mac {
            Some(m) => Some(parse_mac(m).map_err(|e| BadRequest(e.to_string()))?),
            None => None,
        };
        if self.host_dev_name.is_empty() {
            return bad("host_dev_name is empty");
        }
        if let Some(other) = config.nets.iter().find(|n| {
            n.tap == self.host_dev_name && n.id.as_deref() != Some(self.iface_id.as_str())
        }) {
            return bad(format!(
                "TAP {} is already used by network interface {}",
                self.host_dev_name,
                other.id.as_deref().unwrap_or("?")
            ));
        }
        if let Some(mac) = mac {
            let taken = config
                .nets
                .iter()
                .any(|n| n.mac == Some(mac) && n.id.as_deref() != Some(self.iface_id.as_str()));
            if taken {
                return bad(format!(
                    "The MAC address is already in use: {}",
                    self.guest_mac.as_deref().unwrap_or_default()
                ));
            }
        }
        let net = NetConfig {
            tap: self.host_dev_name.clone(),
            mac,
            id: Some(self.iface_id.clone()),
            rx_rate_limiter: self.rx_rate_limiter.and_then(RateLimiterConfig::normalized),
            tx_rate_limiter: self.tx_rate_limiter.and_then(RateLimiterConfig::normalized),
        };
        match config
            .nets
            .iter_mut()
            .find(|n| n.id.as_deref() == Some(self.iface_id.as_str()))
        {
            Some(existing) => *existing = net,
            None => config.nets.push(net),
        }
        Ok(())
    }

    /// The API view of a configured interface.
    pub fn of(net: &NetConfig) -> Self {
        Self {
            iface_id: net.id.clone().unwrap_or_default(),
            host_dev_name: net.tap.clone(),
            guest_mac: net.mac.map(|m| {
                m.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            }),
            mtu: None,
            rx_rate_limiter: net.rx_rate_limiter,
            tx_rate_limiter: net.tx_rate_limiter,
        }
    }
}

impl FullVmConfig {
    /// The VM configuration this document describes (logger and metrics are the caller's).
    pub fn to_vm_config(&self) -> Result<VmConfig, BadRequest> {
        if let Some(key) = self.unsupported.keys().next() {
            return if NOT_YET.contains(&key.as_str()) {
                bad(format!("{key} is not supported by Skiff yet"))
            } else {
                bad(format!("unknown section '{key}'"))
            };
        }
        let Some(boot) = &self.boot_source else {
            return bad("boot-source is missing");
        };
        let mut config = VmConfig::new("");
        config.enable_pci = self.enable_pci;
        boot.apply(&mut config)?;
        if let Some(m) = &self.machine_config {
            m.apply(&mut config, true)?;
        }
        for d in &self.drives {
            d.apply(&mut config)?;
        }
        for n in &self.network_interfaces {
            n.apply(&mut config)?;
        }
        if let Some(e) = &self.entropy {
            config.entropy = Some(e.checked()?);
        }
        if let Some(v) = &self.vsock {
            config.vsock = Some(v.checked()?);
        }
        if let Some(s) = &self.serial {
            s.apply(&mut config)?;
        }
        if let Some(t) = &self.cpu_config {
            t.parse().map_err(BadRequest)?;
            config.cpu_config = Some(t.clone());
            config.cpu_template = None;
        }
        if let Some(b) = &self.balloon {
            config.balloon = Some(b.checked(config.memory_mib)?);
        }
        for p in &self.pmem {
            p.apply(&mut config)?;
        }
        if let Some(h) = &self.memory_hotplug {
            h.validate().map_err(BadRequest)?;
            config.memory_hotplug = Some(*h);
        }
        if let Some(m) = &self.mmds_config {
            config.mmds = Some(m.checked(&config)?);
        }
        Ok(config)
    }

    /// The document as `GET /vm/config` answers it, in Firecracker's full shape: every
    /// section and field its document has, null (or an empty list) where unset, so that
    /// clients reading Firecracker's answer read Skiff's and either feeds the other's
    /// `--config-file`. (Skiff also shows `serial` when set, and the logger and metrics set,
    /// where Firecracker always answers null.)
    pub fn to_firecracker_json(&self) -> serde_json::Value {
        let mut doc = serde_json::to_value(self).unwrap_or_default();
        fill_nulls(
            &mut doc,
            &[
                "balloon",
                "cpu-config",
                "logger",
                "metrics",
                "mmds-config",
                "vsock",
                "entropy",
                "memory-hotplug",
            ],
        );
        if doc["boot-source"].is_null() {
            doc["boot-source"] = serde_json::json!({ "kernel_image_path": "" });
        }
        fill_nulls(&mut doc["boot-source"], &["initrd_path", "boot_args"]);
        let list = |doc: &mut serde_json::Value, key: &str| -> Vec<serde_json::Value> {
            doc[key]
                .as_array_mut()
                .map(std::mem::take)
                .unwrap_or_default()
        };
        let mut drives = list(&mut doc, "drives");
        for d in &mut drives {
            fill_nulls(d, &["partuuid", "rate_limiter", "socket"]);
            fill_limiter(&mut d["rate_limiter"]);
        }
        let mut nets = list(&mut doc, "network-interfaces");
        for n in &mut nets {
            fill_nulls(
                n,
                &["guest_mac", "mtu", "rx_rate_limiter", "tx_rate_limiter"],
            );
            fill_limiter(&mut n["rx_rate_limiter"]);
            fill_limiter(&mut n["tx_rate_limiter"]);
        }
        let mut pmem = list(&mut doc, "pmem");
        for p in &mut pmem {
            fill_nulls(p, &["rate_limiter"]);
            fill_limiter(&mut p["rate_limiter"]);
        }
        doc["drives"] = drives.into();
        doc["network-interfaces"] = nets.into();
        doc["pmem"] = pmem.into();
        if let Some(entropy) = doc.get_mut("entropy").filter(|e| e.is_object()) {
            fill_nulls(entropy, &["rate_limiter"]);
            fill_limiter(&mut entropy["rate_limiter"]);
        }
        doc
    }

    /// The document describing `config`.
    pub fn of(config: &VmConfig, logger: Option<Logger>, metrics: Option<Metrics>) -> Self {
        let boot_source = (!config.kernel.as_os_str().is_empty()).then(|| BootSource {
            kernel_image_path: config.kernel.to_string_lossy().into_owned(),
            boot_args: Some(config.cmdline.clone()),
            initrd_path: config
                .initrd
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
        });
        Self {
            boot_source,
            machine_config: Some(MachineConfig::of(config)),
            drives: config.disks.iter().map(Drive::of).collect(),
            network_interfaces: config.nets.iter().map(NetworkInterface::of).collect(),
            logger,
            metrics,
            entropy: config.entropy,
            vsock: config.vsock.clone(),
            serial: SerialConfig::of(config),
            cpu_config: config.cpu_config.clone(),
            balloon: config.balloon,
            pmem: config.pmem.clone(),
            memory_hotplug: config.memory_hotplug,
            mmds_config: config.mmds.clone(),
            enable_pci: config.enable_pci,
            unsupported: std::collections::BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `json` after pointing the paths it names (`/k`, `/img`, `/img2`, `/i`) at
    /// regular files made for the tests: kernels and images are opened when configured.
    fn parse<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, String> {
        let dir = std::env::temp_dir().join(format!("skiff-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut json = json.to_owned();
        for name in ["img2", "img", "i", "k"] {
            let file = dir.join(name);
            if !file.exists() {
                std::fs::write(&file, [0u8; 512]).unwrap();
            }
            json = json.replace(&format!("\"/{name}\""), &format!("\"{}\"", file.display()));
        }
        serde_json::from_str(&json).map_err(|e| e.to_string())
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused() {
        assert!(
            parse::<BootSource>(r#"{"kernel_image_path":"k","colour":1}"#)
                .unwrap_err()
                .contains("unknown field `colour`")
        );
        assert!(parse::<MachineConfig>(r#"{"vcpu_count":"two"}"#).is_err());
        assert!(parse::<MachineConfig>(r#"{"vcpu_count":-1}"#).is_err());
        assert!(parse::<Drive>(r#"{"drive_id":"a"}"#)
            .unwrap_err()
            .contains("missing field `is_root_device`"));
    }

    #[test]
    fn machine_config_rules() {
        let mut c = VmConfig::new("k");
        let m: MachineConfig = parse(r#"{"vcpu_count":2,"mem_size_mib":256}"#).unwrap();
        m.apply(&mut c, true).unwrap();
        assert_eq!((c.vcpus, c.memory_mib), (2, 256));
        for bad_body in [
            r#"{"vcpu_count":0,"mem_size_mib":256}"#,
            r#"{"vcpu_count":33,"mem_size_mib":256}"#,
            r#"{"vcpu_count":1,"mem_size_mib":0}"#,
            r#"{"vcpu_count":3,"mem_size_mib":128,"smt":true}"#,
            r#"{"vcpu_count":1,"mem_size_mib":127,"huge_pages":"2M"}"#,
            r#"{"vcpu_count":1,"mem_size_mib":128,"huge_pages":"1G"}"#,
            r#"{"vcpu_count":1,"mem_size_mib":128,"huge_pages":"2m"}"#,
        ] {
            let m: MachineConfig = parse(bad_body).unwrap();
            assert!(m.apply(&mut c, true).is_err(), "{bad_body}");
        }
        let m: MachineConfig =
            parse(r#"{"vcpu_count":2,"mem_size_mib":256,"huge_pages":"2M"}"#).unwrap();
        m.apply(&mut c, true).unwrap();
        assert_eq!(c.huge_pages, HugePages::Huge2M);
        assert_eq!(MachineConfig::of(&c).huge_pages.as_deref(), Some("2M"));
        let odd: MachineConfig = parse(r#"{"mem_size_mib":255}"#).unwrap();
        assert!(
            odd.apply(&mut c, false).is_err(),
            "odd size kept with 2M pages"
        );
        let none: MachineConfig = parse(r#"{"huge_pages":"None"}"#).unwrap();
        none.apply(&mut c, false).unwrap();
        assert_eq!(c.huge_pages, HugePages::None);
        // A partial update needs no sizes; the whole update fails on one bad field.
        let m: MachineConfig = parse(r#"{"vcpu_count":4}"#).unwrap();
        assert!(m.apply(&mut c, true).is_err());
        m.apply(&mut c, false).unwrap();
        assert_eq!((c.vcpus, c.memory_mib), (4, 256));
    }

    /// A built-in template replaces a custom one and the other way round; one left out keeps
    /// what was there; "None" clears both, and is not shown.
    #[test]
    fn machine_config_cpu_templates() {
        let mut c = VmConfig::new("k");
        c.cpu_config = Some(Default::default());
        let t2: MachineConfig = parse(r#"{"cpu_template":"T2"}"#).unwrap();
        t2.apply(&mut c, false).unwrap();
        assert_eq!(
            (c.cpu_template, c.cpu_config.is_none()),
            (Some(StaticCpuTemplate::T2), true)
        );
        let sizes: MachineConfig = parse(r#"{"vcpu_count":1,"mem_size_mib":128}"#).unwrap();
        sizes.apply(&mut c, true).unwrap();
        assert_eq!(
            MachineConfig::of(&c).cpu_template,
            Some(StaticCpuTemplate::T2)
        );
        c.cpu_config = Some(Default::default());
        let none: MachineConfig = parse(r#"{"cpu_template":"None"}"#).unwrap();
        none.apply(&mut c, false).unwrap();
        assert_eq!((c.cpu_template, c.cpu_config.is_none()), (None, true));
        assert_eq!(MachineConfig::of(&c).cpu_template, None);
        assert!(parse::<MachineConfig>(r#"{"cpu_template":"V1N1"}"#)
            .unwrap_err()
            .contains("unknown variant `V1N1`"));
    }

    #[test]
    fn drives_and_interfaces() {
        let mut c = VmConfig::new("k");
        let root: Drive = parse(r#"{"drive_id":"rootfs","path_on_host":"/img","is_root_device":true,"is_read_only":true}"#).unwrap();
        root.apply(&mut c).unwrap();
        root.apply(&mut c).unwrap(); // the same id again replaces
        assert_eq!(c.disks.len(), 1);
        assert!(c.disks[0].root && c.disks[0].read_only);
        let second_root: Drive =
            parse(r#"{"drive_id":"other","path_on_host":"/img2","is_root_device":true}"#).unwrap();
        assert!(second_root
            .apply(&mut c)
            .unwrap_err()
            .0
            .starts_with("A root block device already exists!"));
        for body in [
            r#"{"drive_id":"x","is_root_device":false}"#,
            r#"{"drive_id":"bad id","path_on_host":"/i","is_root_device":false}"#,
            r#"{"drive_id":"x","path_on_host":"/i","is_root_device":true,"partuuid":"1 init=/bin/sh"}"#,
            r#"{"drive_id":"x","path_on_host":"/i","is_root_device":false,"socket":"/s"}"#,
        ] {
            let d: Drive = parse(body).unwrap();
            assert!(d.apply(&mut c).is_err(), "{body}");
        }
        let n: NetworkInterface =
            parse(r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:00:00:00:01"}"#)
                .unwrap();
        n.apply(&mut c).unwrap();
        assert_eq!(c.nets[0].mac, Some([6, 0, 0, 0, 0, 1]));
        let clash: NetworkInterface =
            parse(r#"{"iface_id":"eth1","host_dev_name":"tap0"}"#).unwrap();
        assert!(clash.apply(&mut c).is_err());
        let bad_mac: NetworkInterface =
            parse(r#"{"iface_id":"eth1","host_dev_name":"tap1","guest_mac":"zz"}"#).unwrap();
        assert!(bad_mac.apply(&mut c).is_err());
    }

    /// Firecracker's rate limiter bodies: kept as given (less what limits nothing) and shown
    /// back; anything else in them is refused.
    #[test]
    fn rate_limiters_are_taken_and_shown() {
        let mut c = VmConfig::new("k");
        let d: Drive = parse(
            r#"{"drive_id":"a","path_on_host":"/i","is_root_device":false,
                "rate_limiter":{"bandwidth":{"size":1048576,"one_time_burst":0,"refill_time":250},
                                "ops":{"size":0,"refill_time":1000}}}"#,
        )
        .unwrap();
        d.apply(&mut c).unwrap();
        let shown = Drive::of(&c.disks[0]).rate_limiter.unwrap();
        assert_eq!(
            serde_json::to_string(&shown).unwrap(),
            r#"{"bandwidth":{"size":1048576,"refill_time":250}}"#
        );
        let n: NetworkInterface = parse(
            r#"{"iface_id":"e","host_dev_name":"t","rx_rate_limiter":{},
                "tx_rate_limiter":{"ops":{"size":100,"one_time_burst":50,"refill_time":1000}}}"#,
        )
        .unwrap();
        n.apply(&mut c).unwrap();
        let shown = NetworkInterface::of(&c.nets[0]);
        assert_eq!(shown.rx_rate_limiter, None);
        assert_eq!(
            shown.tx_rate_limiter.unwrap().ops.unwrap().one_time_burst,
            Some(50)
        );
        for body in [
            r#"{"drive_id":"a","is_root_device":false,"rate_limiter":{"bytes":{}}}"#,
            r#"{"drive_id":"a","is_root_device":false,"rate_limiter":{"ops":{"size":1}}}"#,
            r#"{"drive_id":"a","is_root_device":false,"rate_limiter":{"ops":{"size":1,"refill_time":1,"x":1}}}"#,
            r#"{"drive_id":"a","is_root_device":false,"rate_limiter":{"ops":{"size":-1,"refill_time":1}}}"#,
        ] {
            assert!(parse::<Drive>(body).is_err(), "{body}");
        }
    }

    /// Firecracker's balloon bodies: defaults, its checks against guest memory both ways,
    /// and the config file's section shown back whole.
    #[test]
    fn balloon_bodies_and_their_checks() {
        let b: crate::config::BalloonConfig =
            parse(r#"{"amount_mib": 64, "deflate_on_oom": true}"#).unwrap();
        assert_eq!(
            (b.stats_polling_interval_s, b.free_page_reporting),
            (0, false)
        );
        assert_eq!(
            b.checked(32).unwrap_err().0,
            "Balloon config error: Amount of pages requested is too large."
        );
        let mut c = VmConfig::new("k");
        c.balloon = Some(b.checked(128).unwrap());
        let shrink: MachineConfig = parse(r#"{"mem_size_mib": 32}"#).unwrap();
        assert_eq!(
            shrink.apply(&mut c, false).unwrap_err().0,
            "The memory size (MiB) is smaller than the previously set balloon device target size."
        );
        assert!(parse::<BalloonUpdate>(r#"{"amount_mib": 1, "x": 1}"#).is_err());
        assert!(parse::<BalloonStatsUpdate>(r#"{"stats_polling_interval_s": 70000}"#).is_err());
        let doc = r#"{"boot-source": {"kernel_image_path": "/k"},
                      "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
                      "balloon": {"amount_mib": 16, "deflate_on_oom": false,
                                  "stats_polling_interval_s": 5, "free_page_reporting": true}}"#;
        let config = parse::<FullVmConfig>(doc).unwrap().to_vm_config().unwrap();
        let shown = serde_json::to_value(FullVmConfig::of(&config, None, None)).unwrap();
        assert_eq!(
            shown["balloon"],
            serde_json::json!({"amount_mib": 16, "deflate_on_oom": false,
                "stats_polling_interval_s": 5, "free_page_hinting": false,
                "free_page_reporting": true})
        );
        let too_big = doc.replace("\"amount_mib\": 16", "\"amount_mib\": 129");
        assert!(parse::<FullVmConfig>(&too_big)
            .unwrap()
            .to_vm_config()
            .is_err());
    }

    /// Every section of the config file may be null (lists too), as in documents written by
    /// tools for Firecracker; the answer shape has each of them back, null or empty.
    #[test]
    fn null_sections_are_taken_and_shown_as_firecracker_does() {
        let doc = r#"{"boot-source": {"kernel_image_path": "/k", "initrd_path": null,
                                       "boot_args": null},
                      "machine-config": null, "drives": null, "network-interfaces": null,
                      "pmem": null, "balloon": null, "cpu-config": null, "logger": null,
                      "metrics": null, "mmds-config": null, "vsock": null, "entropy": null,
                      "memory-hotplug": null}"#;
        let full: FullVmConfig = parse(doc).unwrap();
        let config = full.to_vm_config().unwrap();
        let shown = FullVmConfig::of(&config, None, None).to_firecracker_json();
        for key in [
            "balloon",
            "cpu-config",
            "logger",
            "metrics",
            "mmds-config",
            "vsock",
        ] {
            assert_eq!(shown[key], serde_json::Value::Null, "{key}: {shown}");
        }
        for key in ["drives", "network-interfaces", "pmem"] {
            assert_eq!(shown[key], serde_json::json!([]), "{key}: {shown}");
        }
        assert_eq!(shown["boot-source"]["initrd_path"], serde_json::Value::Null);
        assert!(parse::<FullVmConfig>(r#"{"drives": 3}"#).is_err());
    }

    /// The config file's pmem and memory-hotplug sections: taken with Firecracker's rules
    /// (one root device among drives and pmem devices; hot-plug sizes checked), shown back.
    #[test]
    fn pmem_and_memory_hotplug_sections() {
        let doc = r#"{
            "boot-source": {"kernel_image_path": "/k"},
            "pmem": [{"id": "pm0", "path_on_host": "/p0", "root_device": true},
                     {"id": "pm1", "path_on_host": "/p1", "read_only": true}],
            "memory-hotplug": {"total_size_mib": 1024}
        }"#;
        let full: FullVmConfig = parse(doc).unwrap();
        let config = full.to_vm_config().unwrap();
        assert_eq!(config.pmem.len(), 2);
        assert!(config.pmem[0].root_device && config.pmem[1].read_only);
        let hotplug = config.memory_hotplug.unwrap();
        assert_eq!(
            (hotplug.slot_size_mib, hotplug.block_size_mib),
            (128, 2),
            "Firecracker's defaults"
        );
        let back = FullVmConfig::of(&config, None, None);
        assert_eq!(back.to_vm_config().unwrap(), config);
        let two_roots = doc.replace(r#""read_only": true"#, r#""root_device": true"#);
        let full: FullVmConfig = parse(&two_roots).unwrap();
        assert!(full
            .to_vm_config()
            .unwrap_err()
            .0
            .contains("pmem pm0 already is"));
        let bad_size = doc.replace("1024}", r#"1024, "block_size_mib": 3}"#);
        let full: FullVmConfig = parse(&bad_size).unwrap();
        assert!(full.to_vm_config().unwrap_err().0.contains("power of two"));
        let mut c = VmConfig::new("k");
        let root_pmem: PmemConfig =
            parse(r#"{"id": "pm0", "path_on_host": "/p", "root_device": true}"#).unwrap();
        root_pmem.apply(&mut c).unwrap();
        let root_drive: Drive =
            parse(r#"{"drive_id":"rootfs","path_on_host":"/img","is_root_device":true}"#).unwrap();
        assert!(root_drive
            .apply(&mut c)
            .unwrap_err()
            .0
            .contains("pmem pm0 already is"));
    }

    #[test]
    fn config_file_round_trip_and_later_sections() {
        let doc = r#"{
            "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0"},
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
            "drives": [{"drive_id": "rootfs", "path_on_host": "/img", "is_root_device": true,
                        "rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}],
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                                    "tx_rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}}}]
        }"#;
        let full: FullVmConfig = parse(doc).unwrap();
        let config = full.to_vm_config().unwrap();
        assert_eq!(config.vcpus, 2);
        assert_eq!(config.disks[0].rate_limiter.unwrap().ops.unwrap().size, 100);
        assert!(config.nets[0].tx_rate_limiter.is_some());
        let back = FullVmConfig::of(&config, None, None);
        assert_eq!(back.to_vm_config().unwrap(), config);
        let vsock: FullVmConfig = parse(
            r#"{"boot-source":{"kernel_image_path":"/k"},"vsock":{"guest_cid":3,"uds_path":"/v"}}"#,
        )
        .unwrap();
        let config = vsock.to_vm_config().unwrap();
        assert_eq!(config.vsock.as_ref().unwrap().guest_cid, 3);
        assert_eq!(FullVmConfig::of(&config, None, None).vsock, vsock.vsock);
        for bad in [
            r#""guest_cid":2,"uds_path":"/v""#,
            r#""guest_cid":3,"uds_path":"""#,
        ] {
            let doc =
                format!(r#"{{"boot-source":{{"kernel_image_path":"/k"}},"vsock":{{{bad}}}}}"#);
            let v: FullVmConfig = parse(&doc).unwrap();
            assert!(v.to_vm_config().is_err(), "{bad}");
        }
        let odd: FullVmConfig =
            parse(r#"{"boot-source":{"kernel_image_path":"/k"},"bogus":1}"#).unwrap();
        assert!(odd
            .to_vm_config()
            .unwrap_err()
            .0
            .contains("unknown section 'bogus'"));
    }

    /// `mmds-config` and `PUT /mmds/config` are checked as Firecracker checks them, with its
    /// messages, and shown back with the address filled in.
    #[test]
    fn mmds_config_is_checked_and_shown() {
        let doc = r#"{
            "boot-source": {"kernel_image_path": "/k"},
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"},
                                   {"iface_id": "eth1", "host_dev_name": "tap1"}],
            "mmds-config": {"network_interfaces": ["eth1", "eth0", "eth1"], "version": "V2"}
        }"#;
        let full: FullVmConfig = parse(doc).unwrap();
        let config = full.to_vm_config().unwrap();
        let mmds = config.mmds.clone().unwrap();
        assert_eq!(mmds.network_interfaces, ["eth0", "eth1"]);
        assert_eq!(mmds.ipv4_address, Some([169, 254, 169, 254].into()));
        let shown = serde_json::to_value(FullVmConfig::of(&config, None, None)).unwrap();
        assert_eq!(
            shown["mmds-config"],
            serde_json::json!({"version": "V2", "network_interfaces": ["eth0", "eth1"],
                               "ipv4_address": "169.254.169.254", "imds_compat": false})
        );
        let back: FullVmConfig = serde_json::from_value(shown).unwrap();
        assert_eq!(back.to_vm_config().unwrap(), config);
        for (body, why) in [
            (r#"{"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}"#,
             "MMMDS config error: The MMDS IPv4 address is not link local."),
            (r#"{"network_interfaces": ["eth0"], "ipv4_address": "169.254.0.9"}"#,
             "MMMDS config error: The MMDS IPv4 address is not link local."),
            (r#"{"network_interfaces": []}"#,
             "MMMDS config error: The list of network interface IDs that allow forwarding MMDS requests is empty."),
            (r#"{"network_interfaces": ["eth0", "eth9"]}"#,
             "MMMDS config error: The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface."),
        ] {
            let m: crate::config::MmdsConfig = parse(body).unwrap();
            assert_eq!(m.checked(&config).unwrap_err().0, why, "{body}");
        }
        let custom: crate::config::MmdsConfig =
            parse(r#"{"network_interfaces": ["eth0"], "ipv4_address": "169.254.170.2", "imds_compat": true}"#)
                .unwrap();
        let custom = custom.checked(&config).unwrap();
        assert_eq!(custom.ipv4(), std::net::Ipv4Addr::new(169, 254, 170, 2));
        assert!(custom.imds_compat);
    }
}
