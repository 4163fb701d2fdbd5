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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::VmFd;
use log::{debug, info};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{boot, cpuid, mptable};
use crate::config::{RateLimiterConfig, VmConfig};
use crate::device_manager::{DeviceError, DeviceManager, Subscriber};
use crate::devices::legacy::i8042::I8042Error;
use crate::devices::legacy::progress::ProgressRecord;
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::net::{Net, NetError};
use crate::metrics::{BlockMetrics, NetMetrics, VcpuMetrics};
use crate::seccomp::{Filters, SeccompError, ThreadKind};
use crate::vstate::kvm::{KvmContext, KvmError};
use crate::vstate::memory::{create_guest_memory, GuestMemoryMmap, MemoryError};
use crate::vstate::vcpu::{
    pause_all, resume_all, ExitSignal, GuestExit, Vcpu, VcpuError, VcpuHandle,
};
use crate::vstate::vm::{create_vm, VmError};

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
}

/// The devices the API changes while the VM runs, by their id: what a `PATCH` reaches.
#[derive(Debug, Default)]
struct DeviceRegistry {
    blocks: BTreeMap<String, Arc<Mutex<Block>>>,
    nets: BTreeMap<String, Arc<Mutex<Net>>>,
}

/// A microVM.
#[derive(Debug)]
pub struct Vm {
    _vm_fd: VmFd,
    _mem: GuestMemoryMmap,
    devices: DeviceManager,
    registry: DeviceRegistry,
    exit: Arc<ExitSignal>,
    vcpus: Vec<Vcpu>,
    handles: Vec<VcpuHandle>,
    event_thread: Option<(JoinHandle<()>, EventFd)>,
    device_pause: Arc<(Mutex<DevicePause>, Condvar)>,
    pause_evt: EventFd,
    metrics: MetricsSources,
    filters: Filters,
    state: VmState,
}

impl Vm {
    /// Builds a VM from `config`: KVM, memory, devices, kernel, boot tables and vCPUs. Nothing
    /// runs until [`Vm::start`].
    pub fn new(config: &VmConfig) -> Result<Self, VmmError> {
        let start = crate::process_start();
        let kvm = KvmContext::new(&config.kvm_device)?;
        let max = kvm.max_vcpus().min(usize::from(mptable::MAX_CPUS));
        let count = u8::try_from(config.vcpus)
            .ok()
            .filter(|&n| n >= 1 && usize::from(n) <= max)
            .ok_or(VmmError::VcpuCount {
                requested: config.vcpus,
                max: u32::try_from(max).unwrap_or(u32::MAX),
            })?;
        // Check the cheap things before mapping memory and reading the kernel.
        let filters = Filters::load(&config.seccomp)?;
        boot::check_boot_files(&config.kernel, config.initrd.as_deref())?;
        let mut cmdline = boot::build_cmdline(&config.cmdline)?;
        if kvm.is_pvm() {
            boot::add_pvm_workarounds(&mut cmdline)?;
        }
        let mem = create_guest_memory(config.memory_mib, kvm.phys_bits())?;
        let vm_fd = create_vm(&kvm, &mem)?;

        let exit = Arc::new(ExitSignal::new().map_err(DeviceError::EventFd)?);
        let on_reset = {
            let exit = exit.clone();
            Box::new(move || exit.request(Ok(GuestExit::I8042Reset)))
        };
        let output = match &config.console_output {
            Some(path) => Some(
                std::fs::File::create(path)
                    .map_err(|e| VmmError::ConsoleOutput(path.clone(), e))?,
            ),
            None => None,
        };
        let mut devices =
            DeviceManager::new(&vm_fd, config.console_input, output, on_reset, start)?;

        devices
            .progress()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set_boot_timer(config.boot_timer);
        let mut metrics = MetricsSources::default();
        let mut registry = DeviceRegistry::default();
        let mut params = Vec::new();
        let mut disks: Vec<&crate::config::DiskConfig> = config.disks.iter().collect();
        // The root disk goes first, so it is /dev/vda.
        disks.sort_by_key(|d| !d.root);
        if let Some(root) = disks.first().filter(|d| d.root) {
            params.push(match &root.partuuid {
                Some(uuid) => format!("root=PARTUUID={uuid}"),
                None => "root=/dev/vda".to_owned(),
            });
            params.push(if root.read_only { "ro" } else { "rw" }.to_owned());
        }
        for (i, disk) in disks.iter().enumerate() {
            let id = disk.id.clone().unwrap_or_else(|| format!("disk{i}"));
            let mut block = Block::new(&disk.path, disk.read_only, &id)?;
            if let Some(limiter) = &disk.rate_limiter {
                block.update_rate_limiter(limiter)?;
            }
            metrics.blocks.push((id.clone(), block.metrics()));
            let block = Arc::new(Mutex::new(block));
            params.push(devices.register_virtio_device(&vm_fd, &mem, block.clone())?);
            registry.blocks.insert(id, block);
        }
        for (i, net) in config.nets.iter().enumerate() {
            let mut device = Net::new(&net.tap, net.mac)?;
            device
                .update_rate_limiters(net.rx_rate_limiter.as_ref(), net.tx_rate_limiter.as_ref())?;
            let id = net.id.clone().unwrap_or_else(|| format!("net{i}"));
            metrics.nets.push((id.clone(), device.metrics()));
            let device = Arc::new(Mutex::new(device));
            params.push(devices.register_virtio_device(&vm_fd, &mem, device.clone())?);
            registry.nets.insert(id, device);
        }
        boot::append_kernel_params(&mut cmdline, &params)?;

        let kernel = boot::load_kernel(&mem, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(path) => Some(boot::load_initrd(&mem, &kernel, path)?),
            None => None,
        };
        boot::write_boot_info(&mem, &kernel, &cmdline, initrd)?;
        mptable::setup_mptable(&mem, count)?;

        let mut base_cpuid = kvm.supported_cpuid().clone();
        cpuid::fill_brand_string(&mut base_cpuid);
        if kvm.is_pvm() {
            let hidden = cpuid::hide_pvm_unsupported(&mut base_cpuid);
            info!(
                "PVM host: hiding CPU features it cannot emulate: {}",
                hidden.join(" ")
            );
        }
        let (pio, mmio) = devices.take_buses();
        let vcpus = (0..count)
            .map(|id| {
                let mut vcpu = Vcpu::new(
                    &vm_fd,
                    id,
                    mem.clone(),
                    pio.clone(),
                    mmio.clone(),
                    exit.clone(),
                )?;
                vcpu.configure(&kvm, &base_cpuid, count, kernel.entry)?;
                metrics.vcpus.push(vcpu.metrics());
                Ok(vcpu)
            })
            .collect::<Result<Vec<_>, VcpuError>>()?;
        debug!(
            "VM built in {:?}: {count} vCPUs, {} MiB, entry {:?}",
            start.elapsed(),
            config.memory_mib,
            kernel.entry
        );
        Ok(Self {
            _vm_fd: vm_fd,
            _mem: mem,
            devices,
            registry,
            exit,
            vcpus,
            handles: Vec::new(),
            event_thread: None,
            device_pause: Arc::default(),
            pause_evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(VmmError::EventThread)?,
            metrics,
            filters,
            state: VmState::Created,
        })
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
        if self.state != VmState::Created {
            return Err(VmmError::State("already started"));
        }
        let started = self.start_threads();
        if started.is_err() {
            self.shutdown();
        }
        started
    }

    fn start_threads(&mut self) -> Result<(), VmmError> {
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
        for vcpu in self.vcpus.drain(..) {
            self.handles.push(vcpu.start(self.filters.clone())?);
        }
        self.state = VmState::Running;
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
        let block = (self.registry.blocks.get(id))
            .ok_or_else(|| VmmError::NoDevice("drive", id.to_owned()))?;
        let mut block = block.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(block.update_rate_limiter(update)?)
    }

    /// Changes the RX and TX rate limiters of network interface `id` while the VM runs, as
    /// `PATCH /network-interfaces` does: a limiter not given stays as it is.
    pub fn update_net_rate_limiters(
        &self,
        id: &str,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> Result<(), VmmError> {
        let net = (self.registry.nets.get(id))
            .ok_or_else(|| VmmError::NoDevice("network interface", id.to_owned()))?;
        let mut net = net.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(net.update_rate_limiters(rx, tx)?)
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
