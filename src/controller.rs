//! The VMM controller: one owner for the configuration being built, the running [`Vm`], the
//! logger and metrics settings, carrying out API requests on the VMM's own thread. The API
//! thread only parses and forwards, so neither a slow client nor a long request (a pause
//! waits for every vCPU) ever runs on a vCPU or device thread.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use serde_json::json;
use vmm_sys_util::eventfd::EventFd;

use crate::api::model::{
    ActionType, BadRequest, FullVmConfig, Logger, MachineConfig, Metrics, PartialDrive,
    PartialNetworkInterface, PartialPmem, SnapshotCreateParams, SnapshotLoadParams, VmStateName,
};
use crate::api::{ApiRequest, ApiResponse};
use crate::builder::{RestoreConfig, WarmVm};
use crate::config::{BalloonConfig, RateLimiterConfig, VmConfig};
use crate::devices::virtio::balloon::{Balloon, BalloonError, PAGES_PER_MIB};
use crate::logger::{parse_level, LoggerSettings};
use crate::metrics::ApiMetrics;
use crate::mmds::{MmdsError, MmdsStore, DEFAULT_MMDS_SIZE_LIMIT};
use crate::seccomp::ThreadKind;
use crate::vmm::{forward_termination_signals, termination_signal, Vm, VmState, VmmError};
use crate::GuestExit;

/// The Firecracker API version whose paths and bodies Skiff serves (`GET /version`).
pub const API_VERSION: &str = "1.16.1";
/// How often metrics are written without being asked, as Firecracker.
const METRICS_PERIOD: Duration = Duration::from_secs(60);

const AFTER_START: &str = "The requested operation is not supported after starting the microVM.";
const BEFORE_START: &str = "The requested operation is not supported before starting the microVM.";

/// What a balloon request on the running device gives: a body for a 200, none for a 204.
type BalloonResult = Result<Option<serde_json::Value>, BalloonError>;

/// An API request with the channel its answer goes back on.
pub type ApiCall = (ApiRequest, tokio::sync::oneshot::Sender<ApiResponse>);

/// Owns the VM and its configuration; see the module documentation.
#[derive(Debug)]
pub struct Controller {
    id: String,
    config: VmConfig,
    vm: Option<Vm>,
    logger: Option<Logger>,
    metrics: Option<(Metrics, File)>,
    api_metrics: Arc<ApiMetrics>,
    last_flush: Instant,
    /// The metrics document of the last line written (null before the first).
    metrics_written: serde_json::Value,
    /// A boot resource was configured: a snapshot can no longer be loaded.
    configured: bool,
    /// A VM made ahead for the snapshot a pool expects to load.
    warm: Option<WarmVm>,
    /// The largest MMDS data store, for the store made when MMDS is first used.
    mmds_size_limit: usize,
}

fn bad(e: BadRequest) -> ApiResponse {
    ApiResponse::fault(400, e.0)
}

/// Firecracker's answers to a data store error: 413 for the size limit, 400 otherwise.
fn mmds_fault(e: MmdsError) -> ApiResponse {
    match e {
        MmdsError::DataStoreLimitExceeded => {
            ApiResponse::fault(413, format!("MMDS limit exceeded error: {e}"))
        }
        e => ApiResponse::fault(400, format!("MMDS error: {e}")),
    }
}

impl Controller {
    /// A controller for instance `id` starting from `config` (empty until the API fills it).
    pub fn new(id: String, config: VmConfig) -> Self {
        Self {
            id,
            config,
            vm: None,
            logger: None,
            metrics: None,
            api_metrics: Arc::default(),
            last_flush: Instant::now(),
            metrics_written: serde_json::Value::Null,
            configured: false,
            warm: None,
            mmds_size_limit: DEFAULT_MMDS_SIZE_LIMIT,
        }
    }

    /// Sets the largest MMDS data store in bytes (`--mmds-size-limit`), before it is first used.
    pub fn set_mmds_size_limit(&mut self, limit: usize) {
        self.mmds_size_limit = limit;
    }

    /// The MMDS data store, made on first use before the VM starts, as Firecracker makes it;
    /// afterwards only a store that existed at the start (or came with a snapshot) is there.
    fn mmds_store(&mut self) -> Result<MmdsStore, ApiResponse> {
        if self.vm.is_none() {
            let limit = self.mmds_size_limit;
            return Ok((self
                .config
                .mmds_store
                .get_or_insert_with(|| MmdsStore::new(limit)))
            .clone());
        }
        self.config.mmds_store.clone().ok_or_else(|| {
            ApiResponse::fault(400, format!("MMDS error: {}", MmdsError::NotInitialized))
        })
    }

    /// Puts `data` in the MMDS data store (`--metadata`, or `PUT /mmds`).
    pub fn put_mmds(&mut self, data: serde_json::Value) -> Result<(), ApiResponse> {
        self.mmds_store()?.put(data).map_err(mmds_fault)
    }

    /// Makes the KVM VM, guest memory and vCPUs for the snapshot at `path` now, so that a
    /// later `PUT /snapshot/load` of it only maps memory and puts the state back.
    pub fn prepare_restore(&mut self, path: &Path) -> Result<(), VmmError> {
        self.warm = Some(WarmVm::prepare(path, &self.config.kvm_device)?);
        Ok(())
    }

    /// The API server's counters, shared with the server.
    pub fn api_metrics(&self) -> Arc<ApiMetrics> {
        self.api_metrics.clone()
    }

    /// Sets up logging and metrics from a config file's sections.
    pub fn configure_from(&mut self, doc: &FullVmConfig) -> Result<(), BadRequest> {
        if let Some(l) = &doc.logger {
            self.set_logger(l)?;
        }
        if let Some(m) = &doc.metrics {
            self.set_metrics(m)?;
        }
        Ok(())
    }

    fn state_name(&self) -> &'static str {
        match self.vm.as_ref().map(Vm::state) {
            None | Some(VmState::Created) => "Not started",
            Some(VmState::Paused) => "Paused",
            Some(VmState::Running | VmState::Stopped) => "Running",
        }
    }

    fn set_logger(&mut self, l: &Logger) -> Result<(), BadRequest> {
        let level = match l.level.as_deref() {
            Some(text) => Some(
                parse_level(text)
                    .ok_or_else(|| BadRequest(format!("invalid log level '{text}'")))?,
            ),
            None => None,
        };
        let settings = LoggerSettings {
            path: l.log_path.as_ref().map(Into::into),
            level,
            show_level: l.show_level,
            show_origin: l.show_log_origin,
            module: l.module.clone(),
        };
        crate::logger::configure(&settings).map_err(|e| BadRequest(e.to_string()))?;
        let mut kept = l.clone();
        kept.level = level.map(|l| {
            match l {
                log::LevelFilter::Off => "Off",
                log::LevelFilter::Error => "Error",
                log::LevelFilter::Warn => "Warning",
                log::LevelFilter::Info => "Info",
                log::LevelFilter::Debug => "Debug",
                log::LevelFilter::Trace => "Trace",
            }
            .to_owned()
        });
        self.logger = Some(kept);
        Ok(())
    }

    fn set_metrics(&mut self, m: &Metrics) -> Result<(), BadRequest> {
        use std::os::unix::fs::OpenOptionsExt;
        if self.metrics.is_some() {
            return Err(BadRequest(
                "Reinitialization of metrics not allowed.".into(),
            ));
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&m.metrics_path)
            .map_err(|e| BadRequest(format!("cannot open metrics file {}: {e}", m.metrics_path)))?;
        self.metrics = Some((m.clone(), file));
        Ok(())
    }

    /// Everything counted so far, in Firecracker's document (counting from the start).
    pub fn metrics_json(&self) -> serde_json::Value {
        let vm = self
            .vm
            .as_ref()
            .map_or(serde_json::Value::Null, Vm::metrics);
        crate::metrics::firecracker::document(&vm, &self.api_metrics)
    }

    /// Appends one metrics line to the metrics file, if one is set: as Firecracker's, its
    /// counters count since the line before.
    pub fn flush_metrics(&mut self) -> Result<(), BadRequest> {
        let now = self.metrics_json();
        let line = format!(
            "{}\n",
            crate::metrics::firecracker::since(&now, &self.metrics_written)
        );
        let Some((m, file)) = self.metrics.as_mut() else {
            return Err(BadRequest(
                "metrics are not configured: PUT /metrics first".into(),
            ));
        };
        self.last_flush = Instant::now();
        self.metrics_written = now;
        file.write_all(line.as_bytes())
            .map_err(|e| BadRequest(format!("cannot write metrics to {}: {e}", m.metrics_path)))
    }

    /// Builds and starts the VM from the configuration so far.
    pub fn start(&mut self) -> Result<(), VmmError> {
        if self.vm.is_some() {
            return Err(VmmError::State("already started"));
        }
        if self.config.mmds.is_some() && self.config.mmds_store.is_none() {
            self.config.mmds_store = Some(MmdsStore::new(self.mmds_size_limit));
        }
        let vm = Vm::new(&self.config)?;
        vm.stop_on_signals()?;
        let vm = self.vm.insert(vm);
        vm.start()?;
        // From here this thread only serves the running VM.
        vm.seccomp_filters().apply(ThreadKind::Main)?;
        info!("instance {} started", self.id);
        // Firecracker writes a metrics line as the VM starts.
        if self.metrics.is_some() {
            if let Err(e) = self.flush_metrics() {
                warn!("{e}");
            }
        }
        Ok(())
    }

    /// Carries out one API request.
    pub fn handle(&mut self, request: ApiRequest) -> ApiResponse {
        let started = self.vm.is_some();
        if started && request.is_pre_boot_only() {
            return ApiResponse::fault(400, AFTER_START);
        }
        let configures = matches!(
            request,
            ApiRequest::PutBootSource(_)
                | ApiRequest::PutMachineConfig(_)
                | ApiRequest::PatchMachineConfig(_)
                | ApiRequest::PutDrive(_)
                | ApiRequest::PutNetworkInterface(_)
                | ApiRequest::PutEntropy(_)
                | ApiRequest::PutVsock(_)
                | ApiRequest::PutCpuConfig(_)
                | ApiRequest::PutBalloon(_)
                | ApiRequest::PutPmem(_)
                | ApiRequest::PutMemoryHotplug(_)
                | ApiRequest::PutMmdsConfig(_)
        );
        let done = |r: Result<(), BadRequest>| match r {
            Ok(()) => ApiResponse::no_content(),
            Err(e) => bad(e),
        };
        let response = match request {
            ApiRequest::DescribeInstance => ApiResponse::ok(json!({
                "id": self.id,
                "state": self.state_name(),
                // One version for clients, as GET /version and --version give it.
                "vmm_version": API_VERSION,
                "app_name": "Skiff",
            })),
            ApiRequest::GetVersion => {
                ApiResponse::ok(json!({ "firecracker_version": API_VERSION }))
            }
            ApiRequest::GetMachineConfig => ApiResponse::ok(
                serde_json::to_value(MachineConfig::of(&self.config)).unwrap_or_default(),
            ),
            ApiRequest::GetVmConfig => {
                let doc = FullVmConfig::of(
                    &self.config,
                    self.logger.clone(),
                    self.metrics.as_ref().map(|(m, _)| m.clone()),
                );
                ApiResponse::ok(doc.to_firecracker_json())
            }
            ApiRequest::PutBootSource(b) => done(b.apply(&mut self.config)),
            ApiRequest::PutMachineConfig(m) => done(m.apply(&mut self.config, true)),
            ApiRequest::PatchMachineConfig(m) => done(m.apply(&mut self.config, false)),
            ApiRequest::PutDrive(d) => done(d.apply(&mut self.config)),
            ApiRequest::PutNetworkInterface(n) => done(n.apply(&mut self.config)),
            ApiRequest::PatchDrive(d) => self.patch_drive(&d),
            ApiRequest::PatchNetworkInterface(n) => self.patch_network_interface(&n),
            ApiRequest::PutLogger(l) => done(self.set_logger(&l)),
            ApiRequest::PutMetrics(m) => done(self.set_metrics(&m)),
            ApiRequest::Action(action) => self.action(action),
            ApiRequest::PutSerial(s) => done(s.apply(&mut self.config)),
            ApiRequest::PutCpuConfig(t) => done(match t.parse() {
                Ok(_) => {
                    self.config.cpu_config = Some(*t);
                    self.config.cpu_template = None;
                    Ok(())
                }
                Err(why) => Err(BadRequest(why)),
            }),
            ApiRequest::PutEntropy(e) => done(e.checked().map(|e| self.config.entropy = Some(e))),
            ApiRequest::PutVsock(v) => done(v.checked().map(|v| self.config.vsock = Some(v))),
            request @ (ApiRequest::PutBalloon(_)
            | ApiRequest::GetBalloon
            | ApiRequest::PatchBalloon(_)
            | ApiRequest::GetBalloonStats
            | ApiRequest::PatchBalloonStats(_)
            | ApiRequest::StartBalloonHinting(_)
            | ApiRequest::GetBalloonHintingStatus
            | ApiRequest::StopBalloonHinting) => self.balloon(&request),
            ApiRequest::PutPmem(p) => done(p.apply(&mut self.config)),
            ApiRequest::PatchPmem(p) => self.patch_pmem(&p),
            ApiRequest::PutMemoryHotplug(h) => done(
                h.validate()
                    .map_err(BadRequest)
                    .map(|()| self.config.memory_hotplug = Some(h)),
            ),
            ApiRequest::PatchMemoryHotplug(u) => match &self.vm {
                None => ApiResponse::fault(400, BEFORE_START),
                Some(vm) => match vm.update_memory_hotplug(u.requested_size_mib) {
                    Ok(()) => ApiResponse::no_content(),
                    Err(e) => ApiResponse::fault(400, crate::error_chain(&e)),
                },
            },
            ApiRequest::GetMemoryHotplug => match &self.vm {
                None => ApiResponse::fault(400, BEFORE_START),
                Some(vm) => match vm.memory_hotplug_status() {
                    Ok(status) => ApiResponse::ok(serde_json::to_value(status).unwrap_or_default()),
                    Err(e) => ApiResponse::fault(400, crate::error_chain(&e)),
                },
            },
            ApiRequest::GetMmds => match self.mmds_store() {
                Ok(store) => match store.data() {
                    serde_json::Value::Null => ApiResponse::ok(json!({})),
                    data => ApiResponse::ok(data),
                },
                Err(answer) => answer,
            },
            ApiRequest::PutMmds(data) => match self.put_mmds(data) {
                Ok(()) => ApiResponse::no_content(),
                Err(answer) => answer,
            },
            ApiRequest::PatchMmds(patch) => {
                match self
                    .mmds_store()
                    .and_then(|s| s.patch(&patch).map_err(mmds_fault))
                {
                    Ok(()) => ApiResponse::no_content(),
                    Err(answer) => answer,
                }
            }
            ApiRequest::PutMmdsConfig(c) => match c.checked(&self.config) {
                Ok(c) => {
                    self.config.mmds = Some(c);
                    let _ = self.mmds_store();
                    ApiResponse::no_content()
                }
                Err(e) => bad(e),
            },
            ApiRequest::CreateSnapshot(params) => self.create_snapshot(&params),
            ApiRequest::LoadSnapshot(params) => self.load_snapshot(&params),
            ApiRequest::SetVmState(state) => {
                let Some(vm) = self.vm.as_mut() else {
                    return ApiResponse::fault(400, BEFORE_START);
                };
                let result = match state {
                    VmStateName::Paused => vm.pause(),
                    VmStateName::Resumed => vm.resume(),
                };
                match result {
                    Ok(()) => ApiResponse::no_content(),
                    Err(e) => ApiResponse::fault(400, crate::error_chain(&e)),
                }
            }
        };
        if configures && response.status == 204 {
            self.configured = true;
        }
        response
    }

    /// The `/balloon` requests: before boot the configuration (`PUT` and `GET` only), after it
    /// the running device, with Firecracker's fault texts.
    fn balloon(&mut self, request: &ApiRequest) -> ApiResponse {
        /// Firecracker's prefix for faults of requests that change the device, and of those
        /// that read it.
        const UPDATE: &str = "Balloon update error";
        const READ: &str = "Internal VMM error";
        let with_actual = |config: &BalloonConfig, actual_pages: u32| {
            let mut doc = serde_json::to_value(config).unwrap_or_default();
            doc["actual_pages"] = json!(actual_pages);
            doc["actual_mib"] = json!(actual_pages / PAGES_PER_MIB);
            doc
        };
        let Some(vm) = &self.vm else {
            return match request {
                ApiRequest::PutBalloon(b) => match b.checked(self.config.memory_mib) {
                    Ok(b) => {
                        self.config.balloon = Some(b);
                        ApiResponse::no_content()
                    }
                    Err(e) => bad(e),
                },
                ApiRequest::GetBalloon => match &self.config.balloon {
                    Some(b) => ApiResponse::ok(with_actual(b, 0)),
                    None => {
                        ApiResponse::fault(400, "Balloon config error: No balloon device found.")
                    }
                },
                _ => ApiResponse::fault(400, BEFORE_START),
            };
        };
        let on_balloon = |prefix: &str, f: &mut dyn FnMut(&mut Balloon) -> BalloonResult| match vm
            .with_balloon(|b| f(b))
        {
            None => Err(ApiResponse::fault(
                400,
                format!("{prefix}: Failed perform action on device: Device not found"),
            )),
            Some(Err(e)) => Err(ApiResponse::fault(
                400,
                format!("{prefix}: Balloon: {}", crate::error_chain(&e)),
            )),
            Some(Ok(answer)) => Ok(answer),
        };
        let answer = match request {
            ApiRequest::GetBalloon => on_balloon(READ, &mut |b| {
                Ok(Some(with_actual(&b.config(), b.actual_pages())))
            }),
            ApiRequest::PatchBalloon(u) => {
                on_balloon(UPDATE, &mut |b| b.update_size(u.amount_mib).map(|()| None))
            }
            ApiRequest::GetBalloonStats => on_balloon(READ, &mut |b| b.latest_stats().map(Some)),
            ApiRequest::PatchBalloonStats(u) => on_balloon(UPDATE, &mut |b| {
                b.update_stats_interval(u.stats_polling_interval_s)
                    .map(|()| None)
            }),
            ApiRequest::StartBalloonHinting(cmd) => on_balloon(UPDATE, &mut |b| {
                b.start_hinting(cmd.acknowledge_on_stop).map(|()| None)
            }),
            ApiRequest::GetBalloonHintingStatus => on_balloon(UPDATE, &mut |b| {
                let (host_cmd, guest_cmd) = b.hinting_status()?;
                Ok(Some(json!({"host_cmd": host_cmd, "guest_cmd": guest_cmd})))
            }),
            ApiRequest::StopBalloonHinting => {
                on_balloon(UPDATE, &mut |b| b.stop_hinting().map(|()| None))
            }
            _ => return ApiResponse::fault(400, AFTER_START),
        };
        // What GET /vm/config shows follows the device.
        if let Some(config) = vm.with_balloon(|b| b.config()) {
            self.config.balloon = Some(config);
        }
        match answer {
            Ok(Some(doc)) => ApiResponse::ok(doc),
            Ok(None) => ApiResponse::no_content(),
            Err(fault) => fault,
        }
    }

    /// `PUT /snapshot/create`: a snapshot of the paused VM.
    fn create_snapshot(&mut self, p: &SnapshotCreateParams) -> ApiResponse {
        let Some(vm) = self.vm.as_mut() else {
            return ApiResponse::fault(400, BEFORE_START);
        };
        let started = Instant::now();
        match vm.snapshot(
            p.snapshot_type,
            Path::new(&p.snapshot_path),
            Path::new(&p.mem_file_path),
        ) {
            Ok(()) => {
                info!(
                    "{:?} snapshot written to {} and {} in {:?}",
                    p.snapshot_type,
                    p.snapshot_path,
                    p.mem_file_path,
                    started.elapsed()
                );
                ApiResponse::no_content()
            }
            Err(e) => ApiResponse::fault(400, crate::error_chain(&e)),
        }
    }

    /// `PUT /snapshot/load`: builds the VM from a snapshot, paused or (with `resume_vm`)
    /// running. Only before anything but the logger and metrics was configured.
    fn load_snapshot(&mut self, p: &SnapshotLoadParams) -> ApiResponse {
        if self.configured {
            return ApiResponse::fault(
                400,
                "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
            );
        }
        let mem_backend = match p.mem_backend() {
            Ok(backend) => backend,
            Err(e) => return bad(e),
        };
        let mut restore = RestoreConfig::with_mem_backend(&p.snapshot_path, mem_backend);
        restore.track_dirty_pages = p.track_dirty_pages || p.enable_diff_snapshots;
        restore.network_overrides = (p.network_overrides.iter())
            .map(|o| (o.iface_id.clone(), o.host_dev_name.clone()))
            .collect();
        restore.clock_realtime = p.clock_realtime;
        restore.vsock_override = p.vsock_override.as_ref().map(|v| v.uds_path.clone().into());
        restore.kvm_device = self.config.kvm_device.clone();
        restore.console = crate::builder::ConsoleConfig {
            input: self.config.console_input,
            output: self.config.console_output.clone(),
            rate_limit: self.config.console_rate_limit,
        };
        restore.seccomp = self.config.seccomp.clone();
        // A store made before the load (--metadata, PUT /mmds) serves a restored service.
        let pre_load_store = self.config.mmds_store.clone();
        restore.mmds_store =
            Some((pre_load_store.clone()).unwrap_or_else(|| MmdsStore::new(self.mmds_size_limit)));
        let started = Instant::now();
        let restored = match self.warm.take() {
            Some(warm) => Vm::restore_warm(&restore, warm),
            None => Vm::restore(&restore),
        };
        let result = restored.and_then(|(vm, state)| {
            self.config.mmds_store = vm.mmds_store().or(pre_load_store);
            vm.stop_on_signals()?;
            let vm = self.vm.insert(vm);
            if p.resume_vm {
                vm.start()?;
            } else {
                vm.start_paused()?;
            }
            vm.seccomp_filters().apply(ThreadKind::Main)?;
            Ok(state)
        });
        match result {
            Ok(state) => {
                state.describe_in(&mut self.config, &restore.network_overrides);
                if let (Some(v), Some(path)) = (&mut self.config.vsock, &restore.vsock_override) {
                    v.uds_path = path.to_string_lossy().into_owned();
                }
                self.config.track_dirty_pages = restore.track_dirty_pages;
                info!(
                    "instance {} restored from {} in {:?}",
                    self.id,
                    p.snapshot_path,
                    started.elapsed()
                );
                ApiResponse::no_content()
            }
            Err(e) => {
                // Nothing is left of a failed restore; another may be tried.
                self.vm = None;
                ApiResponse::fault(400, crate::error_chain(&e))
            }
        }
    }

    /// `PATCH /drives/{id}` after boot: a new rate limiter, applied to the running device and
    /// kept in the configuration `GET /vm/config` shows.
    fn patch_drive(&mut self, d: &PartialDrive) -> ApiResponse {
        let Some(vm) = &self.vm else {
            return ApiResponse::fault(400, BEFORE_START);
        };
        let Some(disk) =
            (self.config.disks.iter_mut()).find(|x| x.id.as_ref() == Some(&d.drive_id))
        else {
            return ApiResponse::fault(400, format!("drive {} does not exist", d.drive_id));
        };
        if d.path_on_host.is_none() && d.rate_limiter.is_none() {
            // Firecracker's answer to a PATCH that changes nothing.
            return ApiResponse::fault(400, "Running method expected different backend.");
        }
        if let Some(path) = d.path_on_host.as_deref() {
            if let Err(e) = vm.swap_drive_image(&d.drive_id, Path::new(path)) {
                return ApiResponse::fault(
                    400,
                    format!(
                        "Unable to patch the block device: {}",
                        crate::error_chain(&e)
                    ),
                );
            }
            disk.path = path.into();
        }
        if let Some(update) = &d.rate_limiter {
            if let Err(e) = vm.update_block_rate_limiter(&d.drive_id, update) {
                return ApiResponse::fault(400, crate::error_chain(&e));
            }
            disk.rate_limiter = RateLimiterConfig::patch(disk.rate_limiter, update);
        }
        ApiResponse::no_content()
    }

    /// `PATCH /pmem/{id}` after boot: a new rate limiter, applied to the running device and
    /// kept in the configuration `GET /vm/config` shows.
    fn patch_pmem(&mut self, p: &PartialPmem) -> ApiResponse {
        let Some(vm) = &self.vm else {
            return ApiResponse::fault(400, BEFORE_START);
        };
        let Some(pmem) = self.config.pmem.iter_mut().find(|x| x.id == p.id) else {
            return ApiResponse::fault(400, format!("pmem {} does not exist", p.id));
        };
        if let Some(update) = &p.rate_limiter {
            if let Err(e) = vm.update_pmem_rate_limiter(&p.id, update) {
                return ApiResponse::fault(400, crate::error_chain(&e));
            }
            pmem.rate_limiter = RateLimiterConfig::patch(pmem.rate_limiter, update);
        }
        ApiResponse::no_content()
    }

    /// `PATCH /network-interfaces/{id}` after boot: new rate limiters, applied to the running
    /// device and kept in the configuration `GET /vm/config` shows.
    fn patch_network_interface(&mut self, n: &PartialNetworkInterface) -> ApiResponse {
        let Some(vm) = &self.vm else {
            return ApiResponse::fault(400, BEFORE_START);
        };
        let Some(net) = (self.config.nets.iter_mut()).find(|x| x.id.as_ref() == Some(&n.iface_id))
        else {
            return ApiResponse::fault(
                400,
                format!("network interface {} does not exist", n.iface_id),
            );
        };
        let (rx, tx) = (n.rx_rate_limiter.as_ref(), n.tx_rate_limiter.as_ref());
        if let Err(e) = vm.update_net_rate_limiters(&n.iface_id, rx, tx) {
            return ApiResponse::fault(400, crate::error_chain(&e));
        }
        if let Some(rx) = rx {
            net.rx_rate_limiter = RateLimiterConfig::patch(net.rx_rate_limiter, rx);
        }
        if let Some(tx) = tx {
            net.tx_rate_limiter = RateLimiterConfig::patch(net.tx_rate_limiter, tx);
        }
        ApiResponse::no_content()
    }

    fn action(&mut self, action: ActionType) -> ApiResponse {
        match action {
            ActionType::InstanceStart => {
                if self.vm.is_some() {
                    return ApiResponse::fault(400, AFTER_START);
                }
                if self.config.kernel.as_os_str().is_empty() {
                    return ApiResponse::fault(
                        400,
                        "Cannot start microvm without kernel configuration (PUT /boot-source).",
                    );
                }
                match self.start() {
                    Ok(()) => ApiResponse::no_content(),
                    Err(e) => {
                        // A VM that failed to build or start is gone; the config stays for
                        // another try.
                        self.vm = None;
                        ApiResponse::fault(400, crate::error_chain(&e))
                    }
                }
            }
            ActionType::SendCtrlAltDel => match &self.vm {
                None => ApiResponse::fault(400, BEFORE_START),
                Some(vm) => match vm.send_ctrl_alt_del() {
                    Ok(()) => ApiResponse::no_content(),
                    Err(e) => ApiResponse::fault(400, crate::error_chain(&e)),
                },
            },
            // Firecracker flushes on request only once the microVM runs.
            ActionType::FlushMetrics if self.vm.is_none() => ApiResponse::fault(400, BEFORE_START),
            ActionType::FlushMetrics => match self.flush_metrics() {
                Ok(()) => ApiResponse::no_content(),
                Err(e) => bad(e),
            },
        }
    }

    /// Serves API calls from `calls` (signalled by `wake`) until the VM ends or a termination
    /// signal arrives, writing metrics periodically and at the end. Without calls (no API),
    /// it just waits for the VM.
    pub fn run(
        &mut self,
        calls: Option<&Receiver<ApiCall>>,
        wake: &EventFd,
    ) -> Result<GuestExit, VmmError> {
        if self.vm.is_none() {
            forward_termination_signals(wake)?;
        }
        let outcome = loop {
            if let Some(vm) = self.vm.as_mut() {
                if vm_wants_to_end(vm) {
                    break vm.wait();
                }
            } else if let Some(sig) = termination_signal() {
                break Ok(GuestExit::Stopped(Some(sig)));
            }
            let mut fds = vec![libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            if let Some(vm) = &self.vm {
                fds.push(libc::pollfd {
                    fd: vm.exit_event().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            let timeout = METRICS_PERIOD.saturating_sub(self.last_flush.elapsed());
            let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
            // SAFETY: `fds` is a valid array of pollfd for its whole length during the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if n == 0 && self.metrics.is_some() {
                if let Err(e) = self.flush_metrics() {
                    warn!("{e}");
                }
            }
            if fds[0].revents != 0 {
                let _ = wake.read();
            }
            if let Some(calls) = calls {
                while let Ok((request, reply)) = calls.try_recv() {
                    let _ = reply.send(self.handle(request));
                }
            }
        };
        if self.metrics.is_some() {
            if let Err(e) = self.flush_metrics() {
                warn!("{e}");
            }
        }
        outcome
    }
}

/// Whether the VM's exit event is readable (without consuming it).
fn vm_wants_to_end(vm: &Vm) -> bool {
    let mut fd = libc::pollfd {
        fd: vm.exit_event().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) } > 0;
    ready || termination_signal().is_some()
}
