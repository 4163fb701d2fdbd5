//! The `skiff` command: parse the command line, start logging, build the VM from one
//! `VmConfig`, run it, and print the error chain on failure. `skiff run` takes the VM on the
//! command line; without a subcommand Skiff behaves as Firecracker does (`--api-sock`,
//! `--config-file`, `--no-api`, ...), so tools written for Firecracker can start it.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use log::LevelFilter;
use skiff::config::{SeccompConfig, DEFAULT_CMDLINE, DEFAULT_KVM_DEVICE};
use skiff::seccomp::{Filters, ThreadKind};
use skiff::{GuestExit, Vm, VmConfig};
use vmm_sys_util::terminal::Terminal;

mod sandbox_cli;

/// Skiff: a microVM monitor on Linux KVM.
///
/// `skiff run --kernel ...` boots a VM described on the command line. Without a subcommand,
/// Skiff serves the Firecracker REST API on a Unix socket and/or boots the VM a Firecracker
/// JSON config file describes.
#[derive(Debug, Parser)]
#[command(version = VERSION, display_name = "Firecracker", about, long_about = None)]
struct Cli {
    /// Log level: error, warn, info, debug, trace or off.
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL", value_parser = level)]
    log_level: LevelFilter,
    /// Serve the Firecracker API on this Unix socket (which must not exist).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Boot at once from this Firecracker JSON document (boot-source, machine-config, drives,
    /// network-interfaces, logger, metrics).
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Serve no API (needs --config-file).
    #[arg(long)]
    no_api: bool,
    /// Instance id, reported by `GET /`.
    #[arg(long, default_value = "anonymous-instance", value_name = "ID")]
    id: String,
    /// Write the log to this file or named pipe instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_path: Option<PathBuf>,
    /// Log level in Firecracker's words (Error, Warning, Info, Debug, Trace, Off); overrides
    /// --log-level.
    #[arg(long, value_name = "LEVEL", value_parser = level)]
    level: Option<LevelFilter>,
    /// Write metrics (JSON lines) to this file or named pipe, as PUT /metrics does.
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<PathBuf>,
    /// Show each log line's level (as Skiff does by default; Firecracker's flag).
    #[arg(long)]
    show_level: bool,
    /// Show each log line's source file and line.
    #[arg(long)]
    show_log_origin: bool,
    /// Only log lines from this module path (such as skiff::devices).
    #[arg(long, value_name = "MODULE")]
    module: Option<String>,
    /// Put the virtio devices on a virtio-pci transport (PCI bus 0 with ECAM, MSI-X) instead
    /// of virtio-mmio, as Firecracker 1.13+ does; the config file's `"enable-pci": true` does
    /// the same.
    #[arg(long)]
    enable_pci: bool,
    /// Log "Guest-boot-time" (info level) when the guest writes 123 to port 0x80.
    #[arg(long)]
    boot_timer: bool,
    /// Run every thread without its seccomp filter.
    #[arg(long, global = true, conflicts_with = "seccomp_filter")]
    no_seccomp: bool,
    /// Take the threads' seccomp filters from this seccompiler JSON file (keys main, vcpu,
    /// event, api; Firecracker's vmm stands for main and event) instead of Skiff's own.
    #[arg(long, global = true, value_name = "FILE")]
    seccomp_filter: Option<PathBuf>,
    /// Set by a jailer (Firecracker's or skiff-jailer): CLOCK_MONOTONIC when it started, in µs.
    #[arg(long, hide = true, value_name = "US")]
    start_time_us: Option<u64>,
    /// Set by a jailer: this process's CPU time when the jailer exec'd Skiff, in µs.
    #[arg(long, hide = true, value_name = "US")]
    start_time_cpu_us: Option<u64>,
    /// Set by a jailer: CPU time of the jailer's processes that ended before the exec, in µs.
    #[arg(long, hide = true, value_name = "US")]
    parent_cpu_time_us: Option<u64>,
    /// Make the KVM VM, guest memory and vCPUs for this snapshot at start, so that a later
    /// PUT /snapshot/load of it (or of another of the same shape) is all that remains: for
    /// pools of processes waiting to become clones.
    #[arg(long, value_name = "SNAPSHOT")]
    warm_restore: Option<PathBuf>,
    /// Print the format version of this snapshot file and exit.
    #[arg(long, value_name = "FILE")]
    describe_snapshot: Option<PathBuf>,
    /// Print the snapshot format version this Skiff writes and exit.
    #[arg(long)]
    snapshot_version: bool,
    /// Put this JSON file's contents in the MMDS data store at start.
    #[arg(long, value_name = "FILE")]
    metadata: Option<PathBuf>,
    /// Largest MMDS data store in bytes of compact JSON (default: the API's largest body).
    #[arg(long, value_name = "BYTES")]
    mmds_size_limit: Option<usize>,
    /// Largest API request body in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = skiff::api::MAX_PAYLOAD)]
    http_api_max_payload_size: usize,
    #[command(subcommand)]
    command: Option<Command>,
}

impl Cli {
    /// The filters the flags ask for.
    fn seccomp(&self) -> SeccompConfig {
        match (&self.seccomp_filter, self.no_seccomp) {
            (Some(path), _) => SeccompConfig::Custom(path.clone()),
            (None, true) => SeccompConfig::None,
            (None, false) => SeccompConfig::Default,
        }
    }

    /// The first Firecracker-style flag given, if any.
    fn firecracker_flag(&self) -> Option<&'static str> {
        [
            (self.api_sock.is_some(), "--api-sock"),
            (self.config_file.is_some(), "--config-file"),
            (self.no_api, "--no-api"),
            (self.log_path.is_some(), "--log-path"),
            (self.metrics_path.is_some(), "--metrics-path"),
            (self.boot_timer, "--boot-timer"),
            (self.show_level, "--show-level"),
            (self.show_log_origin, "--show-log-origin"),
            (self.module.is_some(), "--module"),
            (self.enable_pci, "--enable-pci"),
            (self.warm_restore.is_some(), "--warm-restore"),
            (self.describe_snapshot.is_some(), "--describe-snapshot"),
            (self.snapshot_version, "--snapshot-version"),
            (self.metadata.is_some(), "--metadata"),
            (self.mmds_size_limit.is_some(), "--mmds-size-limit"),
            (
                self.http_api_max_payload_size != skiff::api::MAX_PAYLOAD,
                "--http-api-max-payload-size",
            ),
        ]
        .into_iter()
        .find_map(|(given, name)| given.then_some(name))
    }
}

fn level(text: &str) -> Result<LevelFilter, String> {
    skiff::logger::parse_level(text).ok_or_else(|| {
        format!("'{text}' is not a log level (error, warn/warning, info, debug, trace, off)")
    })
}

/// What `--version` prints: the Firecracker version whose API and flags Skiff serves, as tools
/// parse it (`Firecracker vX.Y.Z`), then Skiff's own.
const VERSION: &str = concat!("v1.16.1 (Skiff ", env!("CARGO_PKG_VERSION"), ")");

/// Default API socket when neither --api-sock nor --no-api is given.
const DEFAULT_API_SOCK: &str = "/run/skiff.socket";

/// Errors of the Firecracker-style start.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("--no-api needs --config-file: nothing would describe the VM")]
    NoApiWithoutConfig,
    #[error("cannot read config file {}", .0.display())]
    ReadConfig(PathBuf, #[source] std::io::Error),
    #[error("config file {}", .0.display())]
    ParseConfig(PathBuf, #[source] serde_json::Error),
    #[error("config file {}", .0.display())]
    Config(PathBuf, #[source] skiff::api::model::BadRequest),
    #[error("cannot set up logging")]
    Logger(#[source] std::io::Error),
    #[error(transparent)]
    Api(#[from] skiff::api::server::ApiServerError),
    #[error(transparent)]
    Vmm(#[from] skiff::VmmError),
    /// The seccomp filters cannot be loaded.
    #[error(transparent)]
    Seccomp(#[from] skiff::seccomp::SeccompError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot read metadata file {}", .0.display())]
    ReadMetadata(PathBuf, #[source] std::io::Error),
    #[error("metadata file {}", .0.display())]
    ParseMetadata(PathBuf, #[source] serde_json::Error),
    #[error("metadata file {}: {why}", .path.display())]
    Metadata { path: PathBuf, why: String },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a microVM with its serial console on this terminal. Exits when the guest powers
    /// off or reboots: status 0 for a clean guest shutdown, non-zero with a reason otherwise.
    Run(RunArgs),
    /// Restore a microVM from a snapshot (as PUT /snapshot/load does) and run it with its
    /// serial console on this terminal; exits as `run` does.
    Restore(RestoreArgs),
    /// Sandboxes: prepare a snapshot whose guest runs Skiff's agent, then run commands in
    /// throw-away clones of it.
    Sandbox {
        #[command(subcommand)]
        command: sandbox_cli::SandboxCommand,
    },
    /// Run a command in a running VM whose guest runs Skiff's agent, through its vsock
    /// device; exits with the command's exit code.
    Exec(sandbox_cli::ExecArgs),
}

#[derive(Debug, clap::Args)]
struct RestoreArgs {
    /// The snapshot's state file.
    #[arg(long, value_name = "PATH")]
    snapshot: PathBuf,
    /// The snapshot's memory file, mapped privately (many restores may share it).
    #[arg(long, value_name = "PATH", required_unless_present = "uffd_socket")]
    mem_file: Option<PathBuf>,
    /// Instead of a memory file: the Unix socket of a page-fault handler that serves guest
    /// memory through a userfaultfd (Firecracker's Uffd backend and handshake).
    #[arg(long, value_name = "PATH", conflicts_with = "mem_file")]
    uffd_socket: Option<PathBuf>,
    /// Put network interface ID on TAP NAME instead of the saved one: ID=NAME. Repeatable.
    #[arg(long, value_name = "ID=NAME", value_parser = net_override)]
    net_override: Vec<(String, String)>,
    /// Listen for the vsock device's host programs on PATH instead of the saved socket
    /// path (Firecracker's vsock_override).
    #[arg(long, value_name = "PATH")]
    vsock_override: Option<PathBuf>,
    /// Track dirty pages, for diff snapshots of the restored VM.
    #[arg(long)]
    track_dirty_pages: bool,
    /// Move the guest's clock on by the wall-clock time since the snapshot.
    #[arg(long)]
    clock_realtime: bool,
    /// KVM device node.
    #[arg(long, default_value = DEFAULT_KVM_DEVICE, value_name = "PATH")]
    kvm_device: PathBuf,
}

fn huge_pages(text: &str) -> Result<skiff::config::HugePages, String> {
    skiff::config::HugePages::parse(text)
        .ok_or_else(|| format!("'{text}' is not none, transparent or 2M"))
}

fn net_override(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((id, tap)) if !id.is_empty() && !tap.is_empty() => Ok((id.to_owned(), tap.to_owned())),
        _ => Err(format!("'{text}' is not ID=TAP")),
    }
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Guest kernel: an ELF vmlinux (entered through PVH when it has the PVH note, else the
    /// 64-bit Linux boot protocol) or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initial ramdisk, placed at the top of low memory.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line (at most 2047 bytes).
    #[arg(long, default_value = DEFAULT_CMDLINE, value_name = "STRING")]
    cmdline: String,
    /// Number of vCPUs (1 to the host's limit, at most 254).
    #[arg(long, default_value_t = 1, value_name = "N")]
    vcpus: u32,
    /// Guest memory in MiB; above 3072 the rest is mapped above 4 GiB.
    #[arg(long, default_value_t = 128, value_name = "MIB")]
    memory: u64,
    /// What backs guest memory: none (the host's base pages), transparent (transparent huge
    /// pages where the host can) or 2M (the host's hugetlbfs pool; see
    /// /proc/sys/vm/nr_hugepages). Transparent and 2M need a memory size in whole 2 MiB.
    #[arg(long, default_value = "none", value_name = "KIND", value_parser = huge_pages)]
    huge_pages: skiff::config::HugePages,
    /// A virtio block device on a raw image:
    /// path=IMG[,readonly=on][,id=NAME][,root=on][,cache=unsafe|writeback][,engine=sync|async]
    /// [,bw=BYTES][,iops=N]. Repeatable; the first (or the one with root=on) is /dev/vda, and
    /// root=on also adds root=/dev/vda to the kernel command line. bw and iops limit the guest
    /// to that many bytes and requests a second; engine=async carries requests out on io_uring.
    #[arg(long, value_name = "SPEC")]
    disk: Vec<skiff::config::DiskConfig>,
    /// A virtio network device on a TAP interface:
    /// tap=NAME[,mac=MAC][,rx_bw=BYTES][,rx_pps=N][,tx_bw=BYTES][,tx_pps=N]. Repeatable (eth0
    /// first). The TAP is created, and brought up, if it does not exist (needs CAP_NET_ADMIN).
    /// The rates limit the bytes and frames the guest receives (rx) and sends (tx) a second.
    #[arg(long, value_name = "SPEC")]
    net: Vec<skiff::config::NetConfig>,
    /// KVM device node.
    #[arg(long, default_value = DEFAULT_KVM_DEVICE, value_name = "PATH")]
    kvm_device: PathBuf,
    /// Two threads per core in the guest's CPU topology (--vcpus 1 or even), as
    /// Firecracker's smt.
    #[arg(long)]
    smt: bool,
    /// Put the virtio devices on a virtio-pci transport (PCI bus 0, MSI-X) instead of
    /// virtio-mmio, as Firecracker's --enable-pci does.
    #[arg(long)]
    enable_pci: bool,
    /// An entropy device (virtio-rng) filled from the host's getrandom: on its own, or with a
    /// limit of bw=BYTES and/or ops=N a second.
    #[arg(long, value_name = "LIMITS", num_args = 0..=1, default_missing_value = "")]
    entropy: Option<skiff::config::EntropyConfig>,
    /// A vsock device: the guest's CID (3 or more) and the Unix socket host programs connect
    /// to (`CONNECT <port>`); guest connections to host port P reach the listener at PATH_P.
    #[arg(long, value_name = "cid=N,uds=PATH")]
    vsock: Option<skiff::config::VsockConfig>,
    /// A persistent memory device (virtio-pmem) on a host file mapped into the guest:
    /// path=FILE[,id=NAME][,readonly=on][,root=on]. Repeatable (/dev/pmem0 first); root=on
    /// adds root=/dev/pmemN to the kernel command line.
    #[arg(long, value_name = "SPEC")]
    pmem: Vec<skiff::config::PmemConfig>,
}

/// Puts a terminal on stdin into raw mode, and back into canonical mode when dropped (also on
/// a panic of the main thread, through the hook installed in `main`).
struct RawTerminal;

/// Whether the terminal is in raw mode, for the panic hook.
static TERMINAL_RAW: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl RawTerminal {
    fn enter() -> Option<Self> {
        if !std::io::stdin().is_terminal() {
            return None;
        }
        match std::io::stdin().lock().set_raw_mode() {
            Ok(()) => {
                TERMINAL_RAW.store(true, std::sync::atomic::Ordering::SeqCst);
                Some(Self)
            }
            Err(e) => {
                log::warn!("cannot put the terminal in raw mode: {e}");
                None
            }
        }
    }
}

fn restore_terminal() {
    if TERMINAL_RAW.swap(false, std::sync::atomic::Ordering::SeqCst) {
        let _ = std::io::stdin().lock().set_canon_mode();
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Without a subcommand: Firecracker's way of starting.
fn firecracker_style(cli: &Cli) -> Result<GuestExit, StartError> {
    use skiff::api::model::{FullVmConfig, Metrics};
    use skiff::controller::Controller;

    if cli.no_api && cli.config_file.is_none() {
        return Err(StartError::NoApiWithoutConfig);
    }
    // Checked first, so that a bad filter file is one error before anything starts.
    let filters = Filters::load(&cli.seccomp())?;
    skiff::logger::configure(&skiff::logger::LoggerSettings {
        path: cli.log_path.clone(),
        level: cli.level,
        show_level: cli.show_level.then_some(true),
        show_origin: cli.show_log_origin.then_some(true),
        module: cli.module.clone(),
    })
    .map_err(StartError::Logger)?;
    log::info!(
        "Running Firecracker v{} (Skiff {})",
        skiff::controller::API_VERSION,
        env!("CARGO_PKG_VERSION")
    );
    let mut config = VmConfig::new("");
    let mut doc = None;
    if let Some(path) = &cli.config_file {
        let text = std::fs::read(path).map_err(|e| StartError::ReadConfig(path.clone(), e))?;
        let parsed: FullVmConfig =
            serde_json::from_slice(&text).map_err(|e| StartError::ParseConfig(path.clone(), e))?;
        config = parsed
            .to_vm_config()
            .map_err(|e| StartError::Config(path.clone(), e))?;
        doc = Some(parsed);
    }
    config.boot_timer = cli.boot_timer;
    config.enable_pci |= cli.enable_pci;
    config.seccomp = cli.seccomp();
    let mut controller = Controller::new(cli.id.clone(), config);
    // As in Firecracker, the store's limit is the API's body limit unless given.
    controller.set_mmds_size_limit(cli.mmds_size_limit.unwrap_or(cli.http_api_max_payload_size));
    if let Some(path) = &cli.metadata {
        let text = std::fs::read(path).map_err(|e| StartError::ReadMetadata(path.clone(), e))?;
        let data: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| StartError::ParseMetadata(path.clone(), e))?;
        controller.put_mmds(data).map_err(|answer| {
            let why = (answer.body.as_ref())
                .and_then(|b| b["fault_message"].as_str())
                .unwrap_or("refused");
            StartError::Metadata {
                path: path.clone(),
                why: why.to_owned(),
            }
        })?;
    }
    if let (Some(doc), Some(path)) = (&doc, &cli.config_file) {
        controller
            .configure_from(doc)
            .map_err(|e| StartError::Config(path.clone(), e))?;
    }
    if let Some(path) = &cli.metrics_path {
        let m = Metrics {
            metrics_path: path.to_string_lossy().into_owned(),
        };
        let doc = FullVmConfig {
            metrics: Some(m),
            ..Default::default()
        };
        controller
            .configure_from(&doc)
            .map_err(|e| StartError::Config(path.clone(), e))?;
    }
    if let Some(path) = &cli.warm_restore {
        controller.prepare_restore(path)?;
    }
    let wake = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(StartError::EventFd)?;
    // Before the socket exists: from here on a termination signal ends Skiff through the
    // path below, which removes the socket. (Installed only here, not at the top, so that a
    // signal still simply kills a Skiff stuck reading a --config-file that is a pipe.)
    skiff::vmm::forward_termination_signals(&wake)?;
    let (calls_tx, calls_rx) = std::sync::mpsc::channel();
    let socket = (!cli.no_api).then(|| {
        cli.api_sock
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCK))
    });
    let _socket_guard = match &socket {
        Some(path) => {
            skiff::api::server::spawn(
                path,
                calls_tx,
                &wake,
                controller.api_metrics(),
                filters.clone(),
                cli.http_api_max_payload_size,
            )?;
            log::info!("API server started.");
            Some(RemoveOnDrop(path.clone()))
        }
        None => None,
    };
    let _raw = RawTerminal::enter();
    // A signal that came while starting up wins over booting the VM.
    if doc.is_some() && skiff::vmm::termination_signal().is_none() {
        controller.start()?;
    }
    let calls = socket.is_some().then_some(&calls_rx);
    Ok(controller.run(calls, &wake)?)
}

/// Removes the API socket when Skiff ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn run(args: RunArgs, seccomp: SeccompConfig) -> Result<GuestExit, skiff::VmmError> {
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        vcpus: args.vcpus,
        memory_mib: args.memory,
        huge_pages: args.huge_pages,
        kvm_device: args.kvm_device,
        console_input: skiff::config::ConsoleInput::Stdin,
        console_output: None,
        console_rate_limit: None,
        disks: args.disk,
        nets: args.net,
        entropy: args.entropy,
        vsock: args.vsock,
        smt: args.smt,
        cpu_config: None,
        cpu_template: None,
        balloon: None,
        pmem: args.pmem,
        memory_hotplug: None,
        mmds: None,
        mmds_store: None,
        track_dirty_pages: false,
        boot_timer: false,
        enable_pci: args.enable_pci,
        seccomp,
    };
    let mut vm = Vm::new(&config)?;
    vm.stop_on_signals()?;
    let _raw = RawTerminal::enter();
    vm.start()?;
    // From here this thread only waits for the VM.
    vm.seccomp_filters().apply(ThreadKind::Main)?;
    vm.wait()
}

fn restore(args: RestoreArgs, seccomp: SeccompConfig) -> Result<GuestExit, skiff::VmmError> {
    // clap requires one of the two.
    let backend = match args.uffd_socket {
        Some(socket) => skiff::snapshot::MemBackend::Uffd(socket),
        None => skiff::snapshot::MemBackend::File(args.mem_file.unwrap_or_default()),
    };
    let mut config = skiff::builder::RestoreConfig::with_mem_backend(args.snapshot, backend);
    config.network_overrides = args.net_override;
    config.vsock_override = args.vsock_override;
    config.track_dirty_pages = args.track_dirty_pages;
    config.clock_realtime = args.clock_realtime;
    config.kvm_device = args.kvm_device;
    config.seccomp = seccomp;
    let (mut vm, _) = Vm::restore(&config)?;
    vm.stop_on_signals()?;
    let _raw = RawTerminal::enter();
    vm.start()?;
    vm.seccomp_filters().apply(ThreadKind::Main)?;
    vm.wait()
}

/// Prints an error and its causes on one line.
fn report(err: &dyn std::error::Error) {
    eprintln!("skiff: error: {}", skiff::error_chain(err));
}

fn main() -> ExitCode {
    skiff::mark_process_start();
    let mut cli = Cli::parse();
    skiff::logger::init(cli.log_level);
    skiff::logger::set_instance_id(&cli.id);
    if let Some(start) = cli.start_time_us {
        log::info!(
            "started by a jailer {} us ago, which used {} us of CPU",
            skiff::jailer::monotonic_us().saturating_sub(start),
            cli.start_time_cpu_us.unwrap_or(0) + cli.parent_cpu_time_us.unwrap_or(0)
        );
    }
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // Only the main thread may touch the terminal: the other threads' seccomp filters
        // allow no terminal ioctl (their panics are caught, and the VM then ends through the
        // main thread, whose RawTerminal restores it).
        if std::thread::current().name() == Some("main") {
            restore_terminal();
        }
        default_hook(info);
    }));
    if let (Some(_), Some(flag)) = (&cli.command, cli.firecracker_flag()) {
        eprintln!(
            "skiff: error: {flag} belongs to the Firecracker-style start; `skiff run` takes the VM on its command line"
        );
        return ExitCode::from(2);
    }
    if cli.snapshot_version {
        println!("v{}", skiff::snapshot::SNAPSHOT_VERSION);
        return ExitCode::SUCCESS;
    }
    if let Some(path) = &cli.describe_snapshot {
        return match skiff::snapshot::describe_snapshot(path) {
            Ok(version) => {
                println!("v{version}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                report(&e);
                ExitCode::FAILURE
            }
        };
    }
    let seccomp = cli.seccomp();
    let firecracker_style_start = cli.command.is_none();
    let command = match cli.command.take() {
        Some(Command::Sandbox { command }) => return sandbox_cli::sandbox(command),
        Some(Command::Exec(args)) => return sandbox_cli::exec(&args),
        other => other,
    };
    let outcome = match command {
        Some(Command::Sandbox { .. } | Command::Exec(_)) => unreachable!("handled above"),
        Some(Command::Run(args)) => {
            run(args, seccomp).map_err(|e| Box::new(e) as Box<dyn std::error::Error>)
        }
        Some(Command::Restore(args)) => {
            restore(args, seccomp).map_err(|e| Box::new(e) as Box<dyn std::error::Error>)
        }
        None => firecracker_style(&cli).map_err(|e| Box::new(e) as Box<dyn std::error::Error>),
    };
    match outcome {
        Ok(GuestExit::Stopped(Some(sig))) => {
            // Firecracker's lines, which its tools look for.
            log::info!("Received signal {sig}");
            log::info!("Shutting down VM after intercepting signal {sig}");
            eprintln!("skiff: stopped by signal {sig}");
            ExitCode::from(128u8.saturating_add(u8::try_from(sig).unwrap_or(0)))
        }
        Ok(how) => {
            log::info!("guest ended: {how:?}");
            if firecracker_style_start {
                log::info!("Firecracker exiting successfully. exit_code=0");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            report(e.as_ref());
            ExitCode::FAILURE
        }
    }
}
