//! Building a [`Vm`]: one short list of named steps for a boot from a [`VmConfig`] and for a
//! restore from a snapshot, which differ only where a step says so (guest memory from nothing
//! or from the memory file, devices from the configuration or from their saved state, vCPUs
//! set up for the kernel's entry or given their saved registers). vCPUs are created here and
//! started by [`Vm::start`], running or paused.

use std::path::PathBuf;
use std::sync::{Arc, PoisonError};

use kvm_ioctls::{VcpuFd, VmFd};
use log::{debug, info};

use crate::arch::x86_64::cpu_template::CpuTemplate;
use crate::arch::x86_64::{boot, cpuid, layout, mptable};
use crate::config::{ConsoleInput, HugePages, SeccompConfig, TokenBucketConfig, VmConfig};
use crate::device_manager::{DeviceError, DeviceManager, DevicesState};
use crate::devices::legacy::serial::{ConsoleOutput, Unbuffered};
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mem::VirtioMem;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::pmem::{Pmem, PmemBacking};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::metrics::UartMetrics;
use crate::mmds::{MmdsConfig, MmdsStore};
use crate::seccomp::Filters;
use crate::snapshot::{self, MemBackend, MicrovmState, UffdBackend};
use crate::vmm::{Vm, VmParts, VmmError};
use crate::vstate::kvm::KvmContext;
use crate::vstate::memory::{
    add_hotplug_region, anonymous_region, create_guest_memory, file_region, map_file_over,
    memory_anonymous, memory_from_file, memory_layout, register_guest_memory, with_region, Discard,
    GuestMemoryMmap, HOTPLUG_FIRST_SLOT, PMEM_FIRST_SLOT,
};
use crate::vstate::vcpu::{ExitSignal, GuestExit, Vcpu, VcpuError};
use crate::vstate::vm::{
    create_pit, create_vm, create_vm_fd, create_vm_fd_without_pit, restore_vm_state, VmError,
};

/// How to restore a VM from a snapshot (Firecracker's `PUT /snapshot/load`, and the library's
/// [`Vm::restore`]).
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// The state file.
    pub snapshot_path: PathBuf,
    /// Where guest memory comes from.
    pub mem_backend: MemBackend,
    /// Track dirty pages from the start, for diff snapshots of the restored VM.
    pub track_dirty_pages: bool,
    /// Network interfaces to put on another TAP than the saved one: (interface id, TAP).
    pub network_overrides: Vec<(String, String)>,
    /// Move the guest's kvmclock on by the wall-clock time since the snapshot.
    pub clock_realtime: bool,
    /// A new path for the vsock device's socket (Firecracker's `vsock_override`).
    pub vsock_override: Option<PathBuf>,
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// The serial console.
    pub console: ConsoleConfig,
    /// The seccomp filters the VM's threads install.
    pub seccomp: SeccompConfig,
    /// The store a restored metadata service answers from (the snapshot keeps none); without
    /// one it starts empty.
    pub mmds_store: Option<MmdsStore>,
}

impl RestoreConfig {
    /// Restores from `snapshot_path` with memory from `mem_file`, every other choice the
    /// default one.
    pub fn new(snapshot_path: impl Into<PathBuf>, mem_file: impl Into<PathBuf>) -> Self {
        Self::with_mem_backend(snapshot_path, MemBackend::File(mem_file.into()))
    }

    /// Restores from `snapshot_path` with memory from `mem_backend`, every other choice the
    /// default one.
    pub fn with_mem_backend(snapshot_path: impl Into<PathBuf>, mem_backend: MemBackend) -> Self {
        Self {
            snapshot_path: snapshot_path.into(),
            mem_backend,
            track_dirty_pages: false,
            network_overrides: Vec::new(),
            clock_realtime: false,
            vsock_override: None,
            kvm_device: crate::config::DEFAULT_KVM_DEVICE.into(),
            console: ConsoleConfig::default(),
            seccomp: SeccompConfig::default(),
            mmds_store: None,
        }
    }
}

/// A VM made ahead of a restore, for pools of processes waiting to become a clone: the KVM VM
/// with its interrupt controllers and timer, guest memory mapped and registered with KVM (the
/// slowest step of a restore: each new memory slot waits for a KVM synchronisation), and the
/// vCPUs, all shaped as the snapshot it was prepared for. A restore of a snapshot of that shape
/// then maps the memory file over the prepared memory (or hands it, untouched, to the Uffd
/// backend's handler) and puts the state back; one of another shape is built from nothing as
/// usual.
#[derive(Debug)]
pub struct WarmVm {
    kvm: KvmContext,
    kvm_device: PathBuf,
    vm_fd: VmFd,
    mem: GuestMemoryMmap,
    vcpu_fds: Vec<VcpuFd>,
}

impl WarmVm {
    /// Prepares a VM shaped as the snapshot at `snapshot_path` (its vCPU count and memory
    /// layout; the file is checked as a restore checks it), on the KVM device `kvm_device`.
    pub fn prepare(
        snapshot_path: &std::path::Path,
        kvm_device: &std::path::Path,
    ) -> Result<Self, VmmError> {
        let state = snapshot::read_state(snapshot_path)?;
        state.check()?;
        let vcpus = u32::try_from(state.vcpus.len()).unwrap_or(u32::MAX);
        let (kvm, count) = open_kvm(kvm_device, vcpus)?;
        let vm_fd = create_vm_fd(&kvm)?;
        // With a bitmap whether or not the restore asks for dirty pages: a bitmap cannot be
        // added later, and costs one atomic operation per device write.
        let mem = create_guest_memory(state.memory_mib(), kvm.phys_bits(), true, HugePages::None)?;
        register_guest_memory(&vm_fd, &mem, false).map_err(VmError::Memory)?;
        let vcpu_fds = (0..count)
            .map(|id| {
                vm_fd
                    .create_vcpu(u64::from(id))
                    .map_err(|e| VcpuError::Create(id, e))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            kvm,
            kvm_device: kvm_device.to_owned(),
            vm_fd,
            mem,
            vcpu_fds,
        })
    }

    /// Whether a restore of `state` on `kvm_device` can use this VM.
    fn fits(&self, state: &MicrovmState, kvm_device: &std::path::Path) -> bool {
        let layout = memory_layout(&self.mem);
        self.kvm_device == kvm_device
            && self.vcpu_fds.len() == state.vcpus.len()
            && layout.len() == state.ram_regions().len()
            && (layout.iter().zip(state.ram_regions()))
                .all(|(a, b)| a.base == b.base && a.size == b.size)
    }
}

/// Step: opens KVM and checks the vCPU count against it.
fn open_kvm(device: &std::path::Path, vcpus: u32) -> Result<(KvmContext, u8), VmmError> {
    let kvm = KvmContext::new(device)?;
    let max = kvm.max_vcpus().min(usize::from(mptable::MAX_CPUS));
    let count = u8::try_from(vcpus)
        .ok()
        .filter(|&n| n >= 1 && usize::from(n) <= max)
        .ok_or(VmmError::VcpuCount {
            requested: vcpus,
            max: u32::try_from(max).unwrap_or(u32::MAX),
        })?;
    Ok((kvm, count))
}

/// Where the serial console goes and how fast: the choices a boot and a restore share.
#[derive(Debug, Clone, Default)]
pub struct ConsoleConfig {
    /// Where its input comes from.
    pub input: ConsoleInput,
    /// A file or named pipe for its output, instead of standard output.
    pub output: Option<PathBuf>,
    /// Bytes a second the output may take.
    pub rate_limit: Option<TokenBucketConfig>,
}

/// Opens the console's output file: created and truncated if it is a regular file; a named
/// pipe must already have a reader (opened without blocking, so a pipe nobody reads is an
/// error rather than a hang).
fn open_console_output(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if file.metadata()?.is_file() {
        file.set_len(0)?;
    }
    crate::devices::clear_nonblocking(&file)?;
    Ok(file)
}

/// Step: the legacy devices (from their saved state when restoring), the console as `console`
/// says, the VM ending on an i8042 reset.
fn legacy_devices(
    vm_fd: &VmFd,
    exit: &Arc<ExitSignal>,
    console: &ConsoleConfig,
    saved: Option<&DevicesState>,
) -> Result<(DeviceManager, Arc<UartMetrics>), VmmError> {
    let on_reset = {
        let exit = exit.clone();
        Box::new(move || exit.request(Ok(GuestExit::I8042Reset)))
    };
    let output: Box<dyn std::io::Write + Send> = match &console.output {
        Some(path) => Box::new(
            open_console_output(path).map_err(|e| VmmError::ConsoleOutput(path.clone(), e))?,
        ),
        None => Box::new(Unbuffered(std::io::stdout())),
    };
    let metrics = Arc::new(UartMetrics::default());
    let out = ConsoleOutput::new(output, console.rate_limit.as_ref(), metrics.clone());
    let start = crate::process_start();
    let devices = DeviceManager::new(vm_fd, console.input, out, on_reset, start, saved)?;
    Ok((devices, metrics))
}

/// Step (boot): opens and maps every pmem device's backing file, before guest memory is made
/// (a file that cannot be used is the cheaper error, and the regions' sizes decide where the
/// device memory that follows them goes).
fn open_pmem_files(config: &VmConfig) -> Result<Vec<PmemBacking>, VmmError> {
    let backings = (config.pmem.iter())
        .map(|p| PmemBacking::open(&p.path_on_host, p.read_only))
        .collect::<Result<_, _>>()
        .map_err(DeviceError::Pmem)?;
    Ok(backings)
}

/// Where device memory goes in the guest's physical address space.
struct DeviceMemory {
    /// Each pmem device's region.
    pmem_starts: Vec<u64>,
    /// The hot-plug region: address and size.
    hotplug: Option<(u64, u64)>,
}

/// The device-memory window of a guest with `mem` as RAM (see `layout.rs`): each of `pmem`'s
/// regions in it, one after the other (each a multiple of the 2 MiB alignment), then the
/// hot-plug region at the next window-aligned address.
fn place_device_memory(
    mem: &GuestMemoryMmap,
    pmem: &[PmemBacking],
    hotplug: Option<&crate::config::MemoryHotplugConfig>,
    phys_bits: u8,
) -> Result<DeviceMemory, VmmError> {
    let ram_end = vm_memory::GuestMemoryBackend::last_addr(mem)
        .0
        .saturating_add(1);
    let mut next = layout::device_memory_start(ram_end);
    let mut pmem_starts = Vec::with_capacity(pmem.len());
    for backing in pmem {
        pmem_starts.push(next);
        next = next.saturating_add(backing.region_size());
    }
    let hotplug = hotplug.map(|h| {
        let start = next.next_multiple_of(layout::DEVICE_MEMORY_ALIGNMENT);
        let size = h.total_size_mib << 20;
        next = start.saturating_add(size);
        (start, size)
    });
    if phys_bits < 64 && next > 1u64 << phys_bits {
        return Err(VmmError::DeviceMemoryTooHigh {
            end: next,
            phys_bits,
        });
    }
    Ok(DeviceMemory {
        pmem_starts,
        hotplug,
    })
}

/// Checks the hot-plug configuration, and that KVM has a memory slot for each of its slots.
fn check_memory_hotplug(kvm: &KvmContext, config: &VmConfig) -> Result<(), VmmError> {
    let Some(h) = &config.memory_hotplug else {
        return Ok(());
    };
    h.validate().map_err(VmmError::MemoryHotplug)?;
    let needed = h.total_size_mib / h.slot_size_mib + u64::from(HOTPLUG_FIRST_SLOT);
    let offered = kvm.kvm().get_nr_memslots() as u64;
    if needed > offered {
        return Err(VmmError::MemoryHotplug(format!(
            "total_size_mib {} in slots of {} MiB needs {needed} KVM memory slots; KVM offers {offered}",
            h.total_size_mib, h.slot_size_mib
        )));
    }
    Ok(())
}

/// Step (boot): the configuration's disks (the root one first, so it is /dev/vda), network
/// interfaces, entropy device, pmem devices (`pmem` their opened files) and memory hot-plug
/// device, at the places `placed` gives; returns the kernel parameters that describe them.
fn attach_config_devices(
    devices: &mut DeviceManager,
    vm_fd: &VmFd,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    pmem: Vec<PmemBacking>,
    placed: &DeviceMemory,
) -> Result<Vec<String>, VmmError> {
    let mut params = Vec::new();
    let mut disks: Vec<&crate::config::DiskConfig> = config.disks.iter().collect();
    disks.sort_by_key(|d| !d.root);
    let root_pmem = config.pmem.iter().position(|p| p.root_device);
    if disks.first().is_some_and(|d| d.root) && root_pmem.is_some() {
        return Err(VmmError::TwoRootDevices);
    }
    if let Some(root) = disks.first().filter(|d| d.root) {
        params.push(match &root.partuuid {
            Some(uuid) => format!("root=PARTUUID={uuid}"),
            None => "root=/dev/vda".to_owned(),
        });
        params.push(if root.read_only { "ro" } else { "rw" }.to_owned());
    }
    for (i, disk) in disks.iter().enumerate() {
        let id = disk.id.clone().unwrap_or_else(|| format!("disk{i}"));
        let mut block = Block::with_engine(
            &disk.path,
            disk.read_only,
            &id,
            disk.cache_type,
            disk.io_engine,
        )?;
        if let Some(limiter) = &disk.rate_limiter {
            block.update_rate_limiter(limiter)?;
        }
        params.push(devices.add_block(vm_fd, mem, &id, block)?);
    }
    for (i, net) in config.nets.iter().enumerate() {
        let mut device = Net::new(&net.tap, net.mac)?;
        device.update_rate_limiters(net.rx_rate_limiter.as_ref(), net.tx_rate_limiter.as_ref())?;
        let id = net.id.clone().unwrap_or_else(|| format!("net{i}"));
        params.push(devices.add_net(vm_fd, mem, &id, device)?);
    }
    if let Some(entropy) = &config.entropy {
        let rng = Rng::new(entropy.rate_limiter.as_ref()).map_err(DeviceError::Rng)?;
        params.push(devices.add_rng(vm_fd, mem, rng)?);
    }
    if let Some(v) = &config.vsock {
        v.check()
            .map_err(VsockError::Config)
            .map_err(DeviceError::Vsock)?;
        let path = std::path::Path::new(&v.uds_path);
        let vsock = Vsock::new(u64::from(v.guest_cid), path).map_err(DeviceError::Vsock)?;
        params.push(devices.add_vsock(vm_fd, mem, vsock)?);
    }
    if let Some(balloon) = &config.balloon {
        let balloon = Balloon::new(balloon).map_err(DeviceError::Balloon)?;
        params.push(devices.add_balloon(vm_fd, mem, balloon)?);
    }
    if let Some(i) = root_pmem {
        // Linux numbers pmem devices in the order it finds them, which is this one.
        params.push(format!("root=/dev/pmem{i}"));
        params.push(if config.pmem[i].read_only { "ro" } else { "rw" }.to_owned());
    }
    let slots = PMEM_FIRST_SLOT..;
    for ((((i, p), backing), &start), slot) in (config.pmem.iter().enumerate())
        .zip(pmem)
        .zip(&placed.pmem_starts)
        .zip(slots)
    {
        let id = if p.id.is_empty() {
            format!("pmem{i}")
        } else {
            p.id.clone()
        };
        let device = Pmem::new(
            vm_fd,
            backing,
            start,
            slot,
            p.root_device,
            p.rate_limiter.as_ref(),
        )
        .map_err(DeviceError::Pmem)?;
        params.push(devices.add_pmem(vm_fd, mem, &id, device)?);
    }
    if let (Some(h), Some((addr, _))) = (&config.memory_hotplug, placed.hotplug) {
        let device = VirtioMem::new(vm_fd, mem, addr, h, config.track_dirty_pages)
            .map_err(DeviceError::VirtioMem)?;
        params.push(devices.add_memory_hotplug(vm_fd, mem, device)?);
    }
    Ok(params)
}

/// Step (boot, with `--enable-pci`): the PCI bus the virtio devices then go on; Linux's
/// `pci=off` leaves the command line. Returns the ranges the e820 map reserves (ECAM).
fn pci_bus(
    devices: &mut DeviceManager,
    vm_fd: &Arc<VmFd>,
    enabled: bool,
    cmdline: &mut linux_loader::loader::Cmdline,
) -> Result<Vec<(u64, u64)>, VmmError> {
    if !enabled {
        return Ok(Vec::new());
    }
    let ecam = devices.enable_pci(vm_fd.clone())?;
    boot::remove_kernel_param(cmdline, "pci=off")?;
    info!(
        "--enable-pci: virtio devices on virtio-pci (bus 0, ECAM at {:#x}, MSI-X)",
        ecam.0
    );
    Ok(vec![ecam])
}

/// Step: the metadata service on the interfaces its configuration names, answering from
/// `store` (an empty one when none is given).
fn metadata_service(
    devices: &mut DeviceManager,
    config: Option<&MmdsConfig>,
    store: Option<&MmdsStore>,
) -> Result<(), DeviceError> {
    match config {
        Some(config) => devices.attach_mmds(config, store.cloned().unwrap_or_default()),
        None => Ok(()),
    }
}

/// Step: creates the vCPUs on the device buses (on KVM vCPUs made beforehand, when given),
/// each set up by `setup`.
fn create_vcpus(
    vm_fd: &VmFd,
    mem: &GuestMemoryMmap,
    devices: &mut DeviceManager,
    exit: &Arc<ExitSignal>,
    count: u8,
    made: Vec<VcpuFd>,
    mut setup: impl FnMut(&mut Vcpu) -> Result<(), VcpuError>,
) -> Result<Vec<Vcpu>, VmmError> {
    let (pio, mmio) = devices.take_buses();
    let mut made = made.into_iter();
    Ok((0..count)
        .map(|id| {
            let (mem, pio, mmio, exit) = (mem.clone(), pio.clone(), mmio.clone(), exit.clone());
            let mut vcpu = match made.next() {
                Some(fd) => Vcpu::with_fd(fd, id, mem, pio, mmio, exit),
                None => Vcpu::new(vm_fd, id, mem, pio, mmio, exit)?,
            };
            setup(&mut vcpu)?;
            Ok(vcpu)
        })
        .collect::<Result<Vec<_>, VcpuError>>()?)
}

/// Builds a VM from `config`: KVM, memory, devices, kernel, boot tables and vCPUs.
pub(crate) fn build_for_boot(config: &VmConfig) -> Result<Vm, VmmError> {
    let start = crate::process_start();
    let (kvm, count) = open_kvm(&config.kvm_device, config.vcpus)?;
    if config.smt && count != 1 && !count.is_multiple_of(2) {
        return Err(VmmError::SmtVcpuCount(count));
    }
    // Check the cheap things before mapping memory and reading the kernel.
    let filters = Filters::load(&config.seccomp)?;
    boot::check_boot_files(&config.kernel, config.initrd.as_deref())?;
    let mut cmdline = boot::build_cmdline(&config.cmdline)?;
    if kvm.is_pvm() && boot::is_linux(&config.kernel) {
        boot::add_pvm_workarounds(&mut cmdline)?;
    }
    check_memory_hotplug(&kvm, config)?;
    let pmem = open_pmem_files(config)?;
    let track = config.track_dirty_pages;
    // RAM: what the boot tables describe and the kernel is loaded into.
    let ram = create_guest_memory(config.memory_mib, kvm.phys_bits(), track, config.huge_pages)?;
    let placed = place_device_memory(&ram, &pmem, config.memory_hotplug.as_ref(), kvm.phys_bits())?;
    // KVM_CREATE_PIT2 and each memory slot take milliseconds of KVM's time (an SRCU grace
    // period, a kernel thread; 3-8 ms each on a nested host) that the rest does not need: a
    // second thread gives them to KVM while this one wires devices and loads the kernel.
    let vm_fd = Arc::new(create_vm_fd_without_pit(&kvm)?);
    let built = std::thread::scope(|scope| {
        let background = std::thread::Builder::new()
            .name("skiff-build".into())
            .spawn_scoped(scope, || -> Result<(), VmError> {
                create_pit(&vm_fd)?;
                register_guest_memory(&vm_fd, &ram, track).map_err(VmError::Memory)
            })
            .map_err(VmmError::BuildThread)?;
        let built = build_devices_and_boot_info(
            &kvm,
            &vm_fd,
            &ram,
            &placed,
            pmem,
            config,
            &mut cmdline,
            count,
            track,
        );
        match background.join() {
            Ok(slots) => slots?,
            Err(panic) => std::panic::resume_unwind(panic),
        }
        built
    })?;
    let BootParts {
        mem,
        mut devices,
        uart,
        exit,
        kernel,
        template,
        base_cpuid,
    } = built;
    let vcpus = create_vcpus(
        &vm_fd,
        &mem,
        &mut devices,
        &exit,
        count,
        Vec::new(),
        |vcpu| {
            vcpu.configure(
                &kvm,
                &base_cpuid,
                (count, config.smt),
                kernel.entry,
                &template.msrs,
            )
        },
    )?;
    debug!(
        "VM built in {:?}: {count} vCPUs, {} MiB, entry {:?}",
        start.elapsed(),
        config.memory_mib,
        kernel.entry
    );
    Vm::assemble(VmParts {
        vm_fd,
        mem,
        devices,
        exit,
        vcpus,
        filters,
        track_dirty_pages: track,
        uffd: None,
        uart,
    })
}

/// What [`build_for_boot`] makes besides the VM and its vCPUs.
struct BootParts {
    mem: GuestMemoryMmap,
    devices: DeviceManager,
    uart: Arc<UartMetrics>,
    exit: Arc<ExitSignal>,
    kernel: boot::LoadedKernel,
    template: CpuTemplate,
    base_cpuid: kvm_bindings::CpuId,
}

/// The part of a boot that needs the VM but not its memory slots: devices, the kernel and
/// initrd in guest memory, the boot tables, the CPUID the vCPUs get.
#[allow(clippy::too_many_arguments)]
fn build_devices_and_boot_info(
    kvm: &KvmContext,
    vm_fd: &Arc<VmFd>,
    ram: &GuestMemoryMmap,
    placed: &DeviceMemory,
    pmem: Vec<PmemBacking>,
    config: &VmConfig,
    cmdline: &mut linux_loader::loader::Cmdline,
    count: u8,
    track: bool,
) -> Result<BootParts, VmmError> {
    // Guest memory: RAM and the hot-plug region, whose slots the device gives to KVM.
    let mem = match placed.hotplug {
        Some((addr, size)) => add_hotplug_region(ram, addr, size, track)?,
        None => ram.clone(),
    };
    let exit = Arc::new(ExitSignal::new().map_err(DeviceError::EventFd)?);
    let console = ConsoleConfig {
        input: config.console_input,
        output: config.console_output.clone(),
        rate_limit: config.console_rate_limit,
    };
    let (mut devices, uart) = legacy_devices(vm_fd, &exit, &console, None)?;
    devices
        .progress()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .set_boot_timer(config.boot_timer);
    let reserved = pci_bus(&mut devices, vm_fd, config.enable_pci, cmdline)?;
    let params = attach_config_devices(&mut devices, vm_fd, &mem, config, pmem, placed)?;
    metadata_service(
        &mut devices,
        config.mmds.as_ref(),
        config.mmds_store.as_ref(),
    )?;

    boot::append_kernel_params(cmdline, &params)?;
    let kernel = boot::load_kernel(ram, &config.kernel)?;
    info!(
        "Kernel loaded using {} boot protocol",
        match kernel.entry {
            crate::arch::x86_64::regs::BootEntry::Pvh(_) => "PVH",
            crate::arch::x86_64::regs::BootEntry::Linux64(_) => "Linux 64-bit",
        }
    );
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(ram, &kernel, path)?),
        None => None,
    };
    boot::write_boot_info(ram, &kernel, cmdline, initrd, &reserved)?;
    mptable::setup_mptable(ram, count)?;

    let template = match (&config.cpu_config, config.cpu_template) {
        (Some(t), _) => t.parse().map_err(VmmError::CpuTemplate)?,
        (None, Some(t)) => t.template_for_host()?,
        (None, None) => CpuTemplate::default(),
    };
    let mut base_cpuid = kvm.supported_cpuid().clone();
    cpuid::fill_brand_string(&mut base_cpuid);
    if kvm.is_pvm() {
        let hidden = cpuid::hide_pvm_unsupported(&mut base_cpuid);
        info!(
            "PVM host: hiding CPU features it cannot emulate: {}",
            hidden.join(" ")
        );
    }
    template
        .apply_cpuid(&mut base_cpuid)
        .map_err(VmmError::CpuTemplate)?;
    Ok(BootParts {
        mem,
        devices,
        uart,
        exit,
        kernel,
        template,
        base_cpuid,
    })
}

/// What the memory step of a restore makes.
struct RestoredMemory {
    kvm: KvmContext,
    vm_fd: VmFd,
    mem: GuestMemoryMmap,
    /// The prepared VM's KVM vCPUs; none for a new VM.
    vcpu_fds: Vec<VcpuFd>,
    /// With the Uffd backend: what keeps the page-fault handler serving.
    uffd: Option<UffdBackend>,
}

/// Step (restore): the KVM VM with guest memory (the prepared one when it fits, else a new
/// one) from the snapshot's memory file, or empty and handed to the page-fault handler.
fn restore_memory(
    restore: &RestoreConfig,
    state: &MicrovmState,
    warm: Option<WarmVm>,
) -> Result<RestoredMemory, VmmError> {
    let track = restore.track_dirty_pages;
    let file = match &restore.mem_backend {
        MemBackend::File(path) => Some(snapshot::open_memory_file(path, &state.memory)?),
        MemBackend::Uffd(_) => None,
    };
    let (kvm, vm_fd, mem, vcpu_fds) = match warm.filter(|w| w.fits(state, &restore.kvm_device)) {
        Some(w) => {
            // Uffd: the prepared memory is anonymous and untouched, as the handler needs it.
            if let Some(file) = &file {
                map_file_over(&w.mem, file, state.ram_regions())?;
            }
            if track {
                register_guest_memory(&w.vm_fd, &w.mem, true).map_err(VmError::Memory)?;
            }
            (w.kvm, w.vm_fd, w.mem, w.vcpu_fds)
        }
        None => {
            let vcpu_count = u32::try_from(state.vcpus.len()).unwrap_or(u32::MAX);
            let (kvm, _) = open_kvm(&restore.kvm_device, vcpu_count)?;
            let mem = match &file {
                Some(file) => memory_from_file(file, state.ram_regions(), track)?,
                None => memory_anonymous(state.ram_regions(), track)?,
            };
            let vm_fd = create_vm(&kvm, &mem, track)?;
            (kvm, vm_fd, mem, Vec::new())
        }
    };
    // The hot-plug region, mapped as RAM was; the device gives KVM the slots of its plugged
    // blocks when it is restored.
    let mem = match (state.hotplug_region(), &file) {
        (Some(r), Some(file)) => with_region(&mem, file_region(file, r, track)?)?,
        (Some(r), None) => with_region(&mem, anonymous_region(r, track)?)?,
        (None, _) => mem,
    };
    // The handler gets the userfaultfd before anything touches guest memory (registering it
    // with KVM touched nothing).
    let uffd = match &restore.mem_backend {
        MemBackend::File(_) => None,
        MemBackend::Uffd(socket) => Some(
            snapshot::connect_uffd_handler(socket, &mem, &state.memory)
                .map_err(snapshot::SnapshotError::from)?,
        ),
    };
    Ok(RestoredMemory {
        kvm,
        vm_fd,
        mem,
        vcpu_fds,
        uffd,
    })
}

/// Step (restore): memory mapped privately from the memory file gives pages back by mapping
/// anonymous memory over them (see [`Discard`]); a page-fault handler's is anonymous, as a
/// booted VM's is.
fn discard_as_memory_is_backed(devices: &DeviceManager, backend: &MemBackend) {
    if let MemBackend::File(_) = backend {
        for slot in devices.registry().balloon.values() {
            let mut balloon = slot.device.lock().unwrap_or_else(PoisonError::into_inner);
            balloon.set_discard(Discard::MapAnonymous);
        }
    }
}

/// Builds a VM from a snapshot: the same steps, with memory from the memory file or the
/// page-fault handler (the prepared VM's memory when `warm` fits the snapshot), devices and vCPUs from their saved state, and
/// the VM's interrupt controllers and clock put back last.
pub(crate) fn build_from_snapshot(
    restore: &RestoreConfig,
    warm: Option<WarmVm>,
) -> Result<(Vm, MicrovmState), VmmError> {
    let start = crate::process_start();
    let state = snapshot::read_state(&restore.snapshot_path)?;
    state.check()?;
    let count = u8::try_from(state.vcpus.len())
        .ok()
        .filter(|&n| usize::from(n) <= usize::from(mptable::MAX_CPUS))
        .ok_or(VmmError::VcpuCount {
            requested: u32::try_from(state.vcpus.len()).unwrap_or(u32::MAX),
            max: u32::from(mptable::MAX_CPUS),
        })?;
    let filters = Filters::load(&restore.seccomp)?;
    let track = restore.track_dirty_pages;
    let RestoredMemory {
        kvm,
        vm_fd,
        mem,
        vcpu_fds: made_vcpus,
        uffd,
    } = restore_memory(restore, &state, warm)?;
    let vm_fd = Arc::new(vm_fd);
    let exit = Arc::new(ExitSignal::new().map_err(DeviceError::EventFd)?);
    let (mut devices, uart) =
        legacy_devices(&vm_fd, &exit, &restore.console, Some(&state.devices))?;
    if state.devices.pci.is_some() {
        devices.enable_pci(vm_fd.clone())?;
    }
    let overrides = &restore.network_overrides;
    let tap_override = |id: &str| {
        overrides
            .iter()
            .find(|(iface, _)| iface == id)
            .map(|(_, tap)| tap.clone())
    };
    let vsock_override = restore.vsock_override.as_deref();
    devices.restore_virtio(
        &vm_fd,
        &mem,
        &state.devices,
        tap_override,
        vsock_override,
        track,
    )?;
    discard_as_memory_is_backed(&devices, &restore.mem_backend);
    let mmds = state
        .devices
        .mmds
        .as_ref()
        .map(crate::mmds::MmdsState::config);
    metadata_service(&mut devices, mmds.as_ref(), restore.mmds_store.as_ref())?;
    let mut saved = state.vcpus.iter();
    let vcpus = create_vcpus(
        &vm_fd,
        &mem,
        &mut devices,
        &exit,
        count,
        made_vcpus,
        |vcpu| match saved.next() {
            Some(s) => vcpu.restore_state(&kvm, s),
            None => Err(VcpuError::Gone(vcpu.id())),
        },
    )?;
    restore_vm_state(&vm_fd, &state.vm, restore.clock_realtime)?;
    debug!(
        "VM restored in {:?}: {count} vCPUs, {} MiB",
        start.elapsed(),
        state.memory_mib()
    );
    let vm = Vm::assemble(VmParts {
        vm_fd,
        mem,
        devices,
        exit,
        vcpus,
        filters,
        track_dirty_pages: track,
        uffd,
        uart,
    })?;
    Ok((vm, state))
}
