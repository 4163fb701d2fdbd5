//! The VM as embedders and the command line see it: build from a [`VmConfig`], start, pause,
//! resume, stop, and wait for the guest to end.
//!
//! ```no_run
//! use skiff::{Vm, VmConfig};
//!
//! let mut config = VmConfig::new("vmlinux");
//! config.vcpus = 2;
//! config.memory_mib = 256;
//! let mut vm = Vm::new(&config)?;
//! vm.start()?;
//! vm.pause()?; // every vCPU, then the device thread, stands still
//! vm.resume()?;
//! println!("counters: {}", vm.metrics());
//! let stop = vm.stop_handle();
//! std::thread::spawn(move || {
//!     std::thread::sleep(std::time::Duration::from_secs(60));
//!     stop.request_stop(); // from another thread, while this one waits
//! });
//! vm.send_ctrl_alt_del()?;
//! let how = vm.wait()?;
//! println!("guest ended: {how:?}");
//! # Ok::<(), skiff::VmmError>(())
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::VmFd;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::static_cpu_template::StaticCpuTemplateError;
use crate::arch::x86_64::{boot, mptable};
use crate::builder::{RestoreConfig, WarmVm};
use crate::config::{RateLimiterConfig, VmConfig};
use crate::device_manager::{DeviceError, DeviceManager, Subscriber};
use crate::devices::legacy::i8042::I8042Error;
use crate::devices::legacy::progress::ProgressRecord;
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::block::BlockError;
use crate::devices::virtio::mem::MemoryHotplugStatus;
use crate::devices::virtio::net::NetError;
use crate::metrics::{
    BalloonMetrics, BlockMetrics, EntropyMetrics, MemoryHotplugMetrics, MmdsMetrics, NetMetrics,
    PmemMetrics, UartMetrics, VcpuMetrics, VsockMetrics,
};
use crate::seccomp::{Filters, SeccompError, ThreadKind};
use crate::snapshot::{HostCpu, MicrovmState, SnapshotError, SnapshotType, UffdBackend};
use crate::vstate::kvm::KvmError;
use crate::vstate::memory::{memory_layout, take_dirty_pages, GuestMemoryMmap, MemoryError};
use crate::vstate::vcpu::{
    pause_all, resume_all, save_all, ExitSignal, GuestExit, Vcpu, VcpuError, VcpuHandle,
};
use crate::vstate::vm::{save_vm_state, VmError, VmStateError};

/// How long a vCPU may take to acknowledge a pause or resume.
const VCPU_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The vCPU count is out of range.
    #[error("--vcpus {requested}: a VM needs between 1 and {max} vCPUs on this host")]
    VcpuCount {
        /// What was asked.
        requested: u32,
        /// The host's limit.
        max: u32,
    },
    /// KVM cannot be used.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Guest memory cannot be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The VM cannot be created.
    #[error("cannot create the VM")]
    Vm(#[from] VmError),
    /// Devices cannot be set up.
    #[error("cannot set up devices")]
    Devices(#[from] DeviceError),
    /// A disk cannot be used.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A network device cannot be used.
    #[error(transparent)]
    Net(#[from] NetError),
    /// Kernel, initrd or command line cannot be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The MP table cannot be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// A vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The i8042 could not take a key sequence.
    #[error(transparent)]
    I8042(#[from] I8042Error),
    /// The event thread could not be set up.
    #[error("cannot start the event thread")]
    EventThread(#[source] std::io::Error),
    /// A thread that builds part of the VM could not be started.
    #[error("cannot start a thread to build the VM")]
    BuildThread(#[source] std::io::Error),
    /// The console output file cannot be created.
    #[error("cannot create console output file {}", .0.display())]
    ConsoleOutput(std::path::PathBuf, #[source] std::io::Error),
    /// The request does not fit the VM's state.
    #[error("the VM is {0}")]
    State(&'static str),
    /// The seccomp filters cannot be loaded or installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// No device has this id.
    #[error("{0} {1} does not exist")]
    NoDevice(&'static str, String),
    /// A snapshot cannot be written or read.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The VM's interrupt controllers, timer or clock cannot be saved or restored.
    #[error("cannot save or restore the VM's interrupt controllers and clock")]
    VmState(#[from] VmStateError),
    /// The custom CPU template cannot be applied.
    #[error("CPU template: {0}")]
    CpuTemplate(String),
    /// The built-in CPU template is not for this host (Firecracker's words).
    #[error("Start microvm error: Failed to get CPU template")]
    StaticCpuTemplate(#[from] StaticCpuTemplateError),
    /// SMT with an odd vCPU count above 1.
    #[error(
        "--vcpus {0} with SMT: the vCPU count can only be 1 or an even number when SMT is enabled"
    )]
    SmtVcpuCount(u8),
    /// Device memory (pmem, hot-plug) does not fit in the guest's physical address space.
    #[error("device memory (pmem, memory hot-plug) would end at {end:#x}, beyond the host's {phys_bits}-bit guest physical addresses")]
    DeviceMemoryTooHigh {
        /// The first address past it.
        end: u64,
        /// The host's guest physical address width.
        phys_bits: u8,
    },
    /// The memory hot-plug configuration cannot be used.
    #[error("memory hot-plug: {0}")]
    MemoryHotplug(String),
    /// Both a drive and a pmem device are the root device.
    #[error("only one device can be the root device: a drive and a pmem device both are")]
    TwoRootDevices,
    /// A diff snapshot of a VM that does not track dirty pages.
    #[error("a diff snapshot needs dirty-page tracking (machine-config track_dirty_pages, or track_dirty_pages on snapshot load)")]
    DiffNeedsTracking,
}

/// Stops a [`Vm`] from another thread: cheap to clone, `Send` and `Sync`.
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<ExitSignal>);

impl StopHandle {
    /// Asks the VM to stop; its [`Vm::wait`] then returns [`GuestExit::Stopped`].
    pub fn request_stop(&self) {
        self.0.request(Ok(GuestExit::Stopped(None)));
    }
}

/// Lifecycle of a [`Vm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// Built, not started.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
    /// Ended.
    Stopped,
}

pub use crate::signals::{forward_termination_signals, termination_signal};

/// Stops the event thread's loop.
struct EventLoopStop {
    evt: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for EventLoopStop {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("event thread: cannot watch its stop event: {e}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.evt.read();
        self.stopped.store(true, Ordering::SeqCst);
    }
}

/// Holds the event thread, and with it all device processing, while the VM is paused.
#[derive(Debug, Default)]
struct DevicePause {
    /// True while devices must stand still; the event thread acknowledges through `held`.
    wanted: bool,
    held: bool,
}

/// The event-thread side of [`DevicePause`]: woken by its eventfd, it blocks the thread until
/// the pause is lifted.
struct DevicePauser {
    evt: EventFd,
    state: Arc<(Mutex<DevicePause>, Condvar)>,
}

impl MutEventSubscriber for DevicePauser {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("event thread: cannot watch its pause event: {e}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.evt.read();
        let (lock, cvar) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(PoisonError::into_inner);
        if !state.wanted {
            return;
        }
        state.held = true;
        cvar.notify_all();
        while state.wanted {
            state = cvar.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        state.held = false;
    }
}

/// Where the metrics dump reads from.
#[derive(Debug, Default)]
struct MetricsSources {
    vcpus: Vec<Arc<VcpuMetrics>>,
    blocks: Vec<(String, Arc<BlockMetrics>)>,
    nets: Vec<(String, Arc<NetMetrics>)>,
    entropy: Option<Arc<EntropyMetrics>>,
    vsock: Option<Arc<VsockMetrics>>,
    pmem: Vec<(String, Arc<PmemMetrics>)>,
    memory_hotplug: Option<Arc<MemoryHotplugMetrics>>,
    mmds: Option<Arc<MmdsMetrics>>,
    uart: Arc<UartMetrics>,
    balloon: Option<Arc<BalloonMetrics>>,
}

/// What the builder makes a [`Vm`] of.
pub(crate) struct VmParts {
    pub vm_fd: Arc<VmFd>,
    pub mem: GuestMemoryMmap,
    pub devices: DeviceManager,
    pub exit: Arc<ExitSignal>,
    pub vcpus: Vec<Vcpu>,
    pub filters: Filters,
    pub track_dirty_pages: bool,
    pub uffd: Option<UffdBackend>,
    pub uart: Arc<UartMetrics>,
}

/// A microVM.
#[derive(Debug)]
pub struct Vm {
    vm_fd: Arc<VmFd>,
    mem: GuestMemoryMmap,
    devices: DeviceManager,
    exit: Arc<ExitSignal>,
    vcpus: Vec<Vcpu>,
    handles: Vec<VcpuHandle>,
    event_thread: Option<(JoinHandle<()>, EventFd)>,
    device_pause: Arc<(Mutex<DevicePause>, Condvar)>,
    pause_evt: EventFd,
    metrics: MetricsSources,
    filters: Filters,
    track_dirty_pages: bool,
    state: VmState,
    /// With the Uffd memory backend: the userfaultfd and the handler's connection, held open
    /// while the VM lives, never used.
    _uffd: Option<UffdBackend>,
}

impl Vm {
    /// Builds a VM from `config`: KVM, memory, devices, kernel, boot tables and vCPUs. Nothing
    /// runs until [`Vm::start`].
    pub fn new(config: &VmConfig) -> Result<Self, VmmError> {
        crate::builder::build_for_boot(config)
    }

    /// Builds a VM from a snapshot (see [`crate::snapshot`]), as it was when the snapshot was
    /// taken; nothing runs until [`Vm::start`] (or [`Vm::start_paused`]). Returns the saved
    /// state too, which says what the VM is made of.
    pub fn restore(config: &RestoreConfig) -> Result<(Self, MicrovmState), VmmError> {
        crate::builder::build_from_snapshot(config, None)
    }

    /// [`Vm::restore`] on a VM prepared beforehand ([`WarmVm::prepare`]), which leaves the
    /// restore little more than mapping the memory file and putting the state back; a `warm`
    /// VM of another shape than the snapshot is dropped and a new one built.
    pub fn restore_warm(
        config: &RestoreConfig,
        warm: WarmVm,
    ) -> Result<(Self, MicrovmState), VmmError> {
        crate::builder::build_from_snapshot(config, Some(warm))
    }

    /// Puts the built pieces together.
    pub(crate) fn assemble(parts: VmParts) -> Result<Self, VmmError> {
        let mut metrics = MetricsSources {
            vcpus: parts.vcpus.iter().map(Vcpu::metrics).collect(),
            uart: parts.uart,
            ..Default::default()
        };
        let registry = parts.devices.registry();
        for (id, slot) in &registry.blocks {
            let m = slot
                .device
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .metrics();
            metrics.blocks.push((id.clone(), m));
        }
        metrics.entropy = (registry.entropy.values().next()).map(|slot| {
            slot.device
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .metrics()
        });
        metrics.vsock = (registry.vsock.values().next()).map(|slot| {
            slot.device
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .metrics()
        });
        metrics.memory_hotplug = (registry.memory_hotplug.values().next()).map(|slot| {
            slot.device
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .metrics()
        });
        metrics.balloon = (registry.balloon.values().next()).map(|slot| {
            slot.device
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .metrics()
        });
        for (id, slot) in &registry.pmem {
            let m = slot
                .device
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .metrics();
            metrics.pmem.push((id.clone(), m));
        }
        metrics.mmds = parts
            .devices
            .mmds_store()
            .map(crate::mmds::MmdsStore::metrics);
        for (id, slot) in &registry.nets {
            let m = slot
                .device
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .metrics();
            metrics.nets.push((id.clone(), m));
        }
        Ok(Self {
            vm_fd: parts.vm_fd,
            mem: parts.mem,
            devices: parts.devices,
            exit: parts.exit,
            vcpus: parts.vcpus,
            handles: Vec::new(),
            event_thread: None,
            device_pause: Arc::default(),
            pause_evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(VmmError::EventThread)?,
            metrics,
            filters: parts.filters,
            track_dirty_pages: parts.track_dirty_pages,
            state: VmState::Created,
            _uffd: parts.uffd,
        })
    }

    /// Writes a snapshot of the paused VM: its state to `snapshot_path`, guest memory to
    /// `mem_path` (see [`crate::snapshot`] for what full and diff write). A diff needs dirty
    /// pages tracked since the VM was built. Either kind restarts the count of dirty pages, so
    /// the next diff holds what changed after this snapshot.
    pub fn snapshot(
        &mut self,
        kind: SnapshotType,
        snapshot_path: &std::path::Path,
        mem_path: &std::path::Path,
    ) -> Result<(), VmmError> {
        if self.state != VmState::Paused {
            return Err(VmmError::State(
                "not paused: pause it before taking a snapshot",
            ));
        }
        if kind == SnapshotType::Diff && !self.track_dirty_pages {
            return Err(VmmError::DiffNeedsTracking);
        }
        // Before any state is read: completions write guest memory and raise interrupts.
        self.devices.complete_block_io();

        let vcpus = save_all(&self.handles, VCPU_ACK_TIMEOUT)?;
        let state = MicrovmState {
            skiff_version: env!("CARGO_PKG_VERSION").to_owned(),
            cpu: HostCpu::current(),
            memory: memory_layout(&self.mem),
            vm: save_vm_state(&self.vm_fd)?,
            vcpus,
            devices: self.devices.save(),
        };
        let dirty = if self.track_dirty_pages {
            let hotplug = (self.devices.registry().memory_hotplug.values().next())
                .map(|slot| slot.device.lock().unwrap_or_else(PoisonError::into_inner));
            let slots = hotplug.as_ref().map(|device| device.hotplug_slots());
            Some(take_dirty_pages(&self.vm_fd, &self.mem, slots)?)
        } else {
            None
        };
        let dirty = dirty.filter(|_| kind == SnapshotType::Diff);
        crate::snapshot::write_memory(&self.mem, &state.memory, mem_path, dirty.as_deref())?;
        crate::snapshot::write_state(snapshot_path, &state)?;
        Ok(())
    }

    /// The VM's state.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// The seccomp filters of this VM's threads; a caller that goes on serving the VM from
    /// its own thread installs [`ThreadKind::Main`]'s once the VM runs.
    pub fn seccomp_filters(&self) -> &Filters {
        &self.filters
    }

    /// Starts the event thread and every vCPU thread. A VM whose start failed is stopped: it
    /// cannot be started again.
    pub fn start(&mut self) -> Result<(), VmmError> {
        self.start_as(false)
    }

    /// Starts the threads with the vCPUs and devices paused: the VM is [`VmState::Paused`]
    /// until [`Vm::resume`] (a restored VM that should not run yet).
    pub fn start_paused(&mut self) -> Result<(), VmmError> {
        self.start_as(true)
    }

    fn start_as(&mut self, paused: bool) -> Result<(), VmmError> {
        if self.state != VmState::Created {
            return Err(VmmError::State("already started"));
        }
        let started = self.start_threads(paused);
        if started.is_err() {
            self.shutdown();
        }
        started
    }

    fn start_threads(&mut self, paused: bool) -> Result<(), VmmError> {
        let pauser = DevicePauser {
            evt: self.pause_evt.try_clone().map_err(VmmError::EventThread)?,
            state: self.device_pause.clone(),
        };
        let mut subscribers = self.devices.subscribers();
        subscribers.push(Arc::new(Mutex::new(pauser)));
        self.event_thread = Some(spawn_event_thread(
            subscribers,
            self.exit.clone(),
            self.filters.clone(),
        )?);
        if paused {
            self.hold_devices()?;
        }
        for vcpu in self.vcpus.drain(..) {
            self.handles.push(vcpu.start(self.filters.clone(), paused)?);
        }
        self.state = if paused {
            VmState::Paused
        } else {
            VmState::Running
        };
        Ok(())
    }

    /// Stops every vCPU at its next exit, then device processing; returns once all have
    /// acknowledged. The guest notices nothing but the time that passed.
    pub fn pause(&mut self) -> Result<(), VmmError> {
        match self.state {
            VmState::Running => {}
            VmState::Paused => return Ok(()),
            _ => return Err(VmmError::State("not running")),
        }
        // Either every vCPU pauses or, on a failure, every one runs on.
        pause_all(&self.handles, VCPU_ACK_TIMEOUT)?;
        if let Err(e) = self.hold_devices() {
            // Leave the VM as it was: running.
            let _ = resume_all(&self.handles, VCPU_ACK_TIMEOUT);
            return Err(e);
        }
        self.state = VmState::Paused;
        Ok(())
    }

    /// Lets devices and then vCPUs continue where they stopped.
    pub fn resume(&mut self) -> Result<(), VmmError> {
        match self.state {
            VmState::Paused => {}
            VmState::Running => return Ok(()),
            _ => return Err(VmmError::State("not paused")),
        }
        self.release_devices();
        if let Err(e) = resume_all(&self.handles, VCPU_ACK_TIMEOUT) {
            // Every vCPU is paused again: hold the devices too, and stay paused.
            self.hold_devices()?;
            return Err(e.into());
        }
        self.state = VmState::Running;
        Ok(())
    }

    /// Parks the event thread in [`DevicePauser`] and waits for it to get there.
    fn hold_devices(&self) -> Result<(), VmmError> {
        let (lock, cvar) = &*self.device_pause;
        let mut state = lock.lock().unwrap_or_else(PoisonError::into_inner);
        state.wanted = true;
        self.pause_evt.write(1).map_err(VmmError::EventThread)?;
        let (state, timeout) = cvar
            .wait_timeout_while(state, VCPU_ACK_TIMEOUT, |s| !s.held)
            .unwrap_or_else(PoisonError::into_inner);
        if timeout.timed_out() {
            drop(state);
            self.release_devices();
            return Err(VmmError::State(
                "not answering: the event thread did not pause",
            ));
        }
        Ok(())
    }

    fn release_devices(&self) {
        let (lock, cvar) = &*self.device_pause;
        lock.lock().unwrap_or_else(PoisonError::into_inner).wanted = false;
        cvar.notify_all();
    }

    /// The VM's counters as one JSON object: vCPU exits by kind, and per device.
    pub fn metrics(&self) -> serde_json::Value {
        let blocks = self
            .metrics
            .blocks
            .iter()
            .map(|(id, m)| (id.clone(), m.to_json()));
        let nets = self
            .metrics
            .nets
            .iter()
            .map(|(id, m)| (id.clone(), m.to_json()));
        serde_json::json!({
            "vcpu": self.metrics.vcpus.iter().map(|m| m.to_json()).collect::<Vec<_>>(),
            "block": blocks.collect::<serde_json::Map<_, _>>(),
            "net": nets.collect::<serde_json::Map<_, _>>(),
            "entropy": self.metrics.entropy.as_ref().map(|m| m.to_json()),
            "vsock": self.metrics.vsock.as_ref().map(|m| m.to_json()),
            "pmem": (self.metrics.pmem.iter())
                .map(|(id, m)| (id.clone(), m.to_json()))
                .collect::<serde_json::Map<_, _>>(),
            "memory_hotplug": self.metrics.memory_hotplug.as_ref().map(|m| m.to_json()),
            "mmds": self.metrics.mmds.as_ref().map(|m| m.to_json()),
            "uart": self.metrics.uart.to_json(),
            "balloon": self.metrics.balloon.as_ref().map(|m| m.to_json()),
        })
    }

    /// Changes the rate limiter of drive `id` while the VM runs, as `PATCH /drives` does: the
    /// buckets given replace the current ones (see [`RateLimiterConfig::patch`]). A queue the
    /// old limits held back is looked at again at once.
    pub fn update_block_rate_limiter(
        &self,
        id: &str,
        update: &RateLimiterConfig,
    ) -> Result<(), VmmError> {
        let block = (self.devices.registry().blocks.get(id))
            .ok_or_else(|| VmmError::NoDevice("drive", id.to_owned()))?;
        let mut block = block.device.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(block.update_rate_limiter(update)?)
    }

    /// Puts drive `id` on the image at `path` while the VM runs, as `PATCH /drives` with
    /// `path_on_host` does (see [`crate::devices::virtio::block::Block::swap_image`]).
    pub fn swap_drive_image(&self, id: &str, path: &std::path::Path) -> Result<(), VmmError> {
        let block = (self.devices.registry().blocks.get(id))
            .ok_or_else(|| VmmError::NoDevice("drive", id.to_owned()))?;
        let mut block = block.device.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(block.swap_image(path)?)
    }

    /// Changes the RX and TX rate limiters of network interface `id` while the VM runs, as
    /// `PATCH /network-interfaces` does: a limiter not given stays as it is.
    pub fn update_net_rate_limiters(
        &self,
        id: &str,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> Result<(), VmmError> {
        let net = (self.devices.registry().nets.get(id))
            .ok_or_else(|| VmmError::NoDevice("network interface", id.to_owned()))?;
        let mut net = net.device.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(net.update_rate_limiters(rx, tx)?)
    }

    /// Runs `f` on the balloon, locked (the `/balloon` requests after boot); None when the VM
    /// has no balloon.
    pub fn with_balloon<R>(&self, f: impl FnOnce(&mut Balloon) -> R) -> Option<R> {
        let slot = self.devices.registry().balloon.values().next()?;
        let mut balloon = slot.device.lock().unwrap_or_else(PoisonError::into_inner);
        Some(f(&mut balloon))
    }
    /// Changes the rate limiter of pmem device `id` while the VM runs, as `PATCH /pmem`
    /// does: the buckets given replace the current ones.
    pub fn update_pmem_rate_limiter(
        &self,
        id: &str,
        update: &RateLimiterConfig,
    ) -> Result<(), VmmError> {
        let pmem = (self.devices.registry().pmem.get(id))
            .ok_or_else(|| VmmError::NoDevice("pmem", id.to_owned()))?;
        let mut pmem = pmem.device.lock().unwrap_or_else(PoisonError::into_inner);
        pmem.update_rate_limiter(update)
            .map_err(|e| VmmError::Devices(DeviceError::Pmem(e)))
    }

    /// The memory hot-plug device's sizes, as `GET /hotplug/memory` shows them.
    pub fn memory_hotplug_status(&self) -> Result<MemoryHotplugStatus, VmmError> {
        let slot = (self.devices.registry().memory_hotplug.values().next())
            .ok_or_else(|| VmmError::NoDevice("memory hot-plug", "device".to_owned()))?;
        let device = slot.device.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(device.status())
    }

    /// Asks the guest to have `mib` MiB of hot-plug memory plugged, as `PATCH /hotplug/memory`
    /// does; the guest's driver follows in its own time (see [`Vm::memory_hotplug_status`]).
    pub fn update_memory_hotplug(&self, mib: u64) -> Result<(), VmmError> {
        let slot = (self.devices.registry().memory_hotplug.values().next())
            .ok_or_else(|| VmmError::NoDevice("memory hot-plug", "device".to_owned()))?;
        let mut device = slot.device.lock().unwrap_or_else(PoisonError::into_inner);
        device
            .update_requested_size(mib)
            .map_err(|e| VmmError::Devices(DeviceError::VirtioMem(e)))
    }
    /// The metadata service's data store, when the VM has the service (the one its config
    /// gave, or for a restored VM, the one its restore gave or an empty one).
    pub fn mmds_store(&self) -> Option<crate::mmds::MmdsStore> {
        self.devices.mmds_store().cloned()
    }

    /// Sends Ctrl-Alt-Del to the guest through the i8042.
    pub fn send_ctrl_alt_del(&self) -> Result<(), VmmError> {
        let i8042 = self.devices.i8042();
        let mut dev = i8042.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(dev.trigger_ctrl_alt_del()?)
    }

    /// Asks the VM to stop; [`Vm::wait`] then returns [`GuestExit::Stopped`].
    pub fn request_stop(&self) {
        self.stop_handle().request_stop();
    }

    /// A handle that stops this VM from any thread, while another waits in [`Vm::wait`].
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.exit.clone())
    }

    /// Makes SIGTERM, SIGINT, SIGHUP and SIGQUIT end this VM cleanly (terminal restored,
    /// threads joined) instead of killing the process mid-write.
    pub fn stop_on_signals(&self) -> Result<(), VmmError> {
        forward_termination_signals(self.exit.eventfd())
    }

    /// The eventfd that becomes readable when the VM wants to end (guest exit, error, stop
    /// request, signal): poll it, then call [`Vm::wait`], which then returns at once.
    pub fn exit_event(&self) -> &EventFd {
        self.exit.eventfd()
    }

    /// Boot-progress writes recorded so far.
    pub fn boot_progress(&self) -> Vec<ProgressRecord> {
        let p = self.devices.progress();
        let p = p.lock().unwrap_or_else(PoisonError::into_inner);
        p.records().to_vec()
    }

    /// Waits until the guest ends (or a stop is requested), then stops every thread.
    pub fn wait(&mut self) -> Result<GuestExit, VmmError> {
        if self.state == VmState::Created || self.state == VmState::Stopped {
            return Err(VmmError::State("not running"));
        }
        let outcome = loop {
            if let Some(outcome) = self.exit.take() {
                break outcome;
            }
            if let Some(sig) = termination_signal() {
                break Ok(GuestExit::Stopped(Some(sig)));
            }
            // Blocks until a vCPU, device, signal or request writes the exit eventfd.
            let _ = self.exit.eventfd().read();
        };
        self.shutdown();
        Ok(outcome?)
    }

    /// Stops vCPU and event threads.
    fn shutdown(&mut self) {
        self.release_devices();
        for h in &mut self.handles {
            h.stop();
        }
        self.handles.clear();
        if let Some((thread, stop)) = self.event_thread.take() {
            let _ = stop.write(1);
            let _ = thread.join();
        }
        self.state = VmState::Stopped;
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
        // The exit eventfd closes with the VM: no signal may write to its number afterwards.
        crate::signals::stop_forwarding_to(self.exit.eventfd());
    }
}

/// Starts the thread that runs the event manager over `subscribers`; returns it with the
/// eventfd that stops it.
fn spawn_event_thread(
    subscribers: Vec<Subscriber>,
    exit: Arc<ExitSignal>,
    filters: Filters,
) -> Result<(JoinHandle<()>, EventFd), VmmError> {
    let stop_evt =
        EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VmmError::EventThread)?;
    let stopped = Arc::new(AtomicBool::new(false));
    let stopper = EventLoopStop {
        evt: stop_evt.try_clone().map_err(VmmError::EventThread)?,
        stopped: stopped.clone(),
    };
    let mut manager = EventManager::<Subscriber>::new()
        .map_err(|e| VmmError::EventThread(std::io::Error::other(format!("{e:?}"))))?;
    for s in subscribers {
        manager.add_subscriber(s);
    }
    manager.add_subscriber(Arc::new(Mutex::new(stopper)));
    let thread = std::thread::Builder::new()
        .name("skiff-events".into())
        .spawn(move || {
            // Everything the devices need is open; what arrives from here on is the guest's.
            if let Err(e) = filters.apply(ThreadKind::Event) {
                log::error!("event thread: {e}");
                exit.request(Ok(GuestExit::Stopped(None)));
                return;
            }
            while !stopped.load(Ordering::SeqCst) {
                if let Err(e) = manager.run() {
                    log::error!("event thread: {e:?}");
                    exit.request(Ok(GuestExit::Stopped(None)));
                    break;
                }
            }
        })
        .map_err(VmmError::EventThread)?;
    Ok((thread, stop_evt))
}
