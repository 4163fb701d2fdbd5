//! The `skiff` command: parse the command line, start logging, build the VM from one
//! `VmConfig`, run it, and print the error chain on failure.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use log::LevelFilter;
use skiff::config::{DEFAULT_CMDLINE, DEFAULT_KVM_DEVICE};
use skiff::{GuestExit, Vm, VmConfig};
use vmm_sys_util::terminal::Terminal;

/// Skiff: a microVM monitor on Linux KVM.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log level on stderr: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL")]
    log_level: LevelFilter,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a microVM with its serial console on this terminal. Exits when the guest powers
    /// off or reboots: status 0 for a clean guest shutdown, non-zero with a reason otherwise.
    Run(RunArgs),
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
    /// A virtio block device on a raw image: path=IMG[,readonly=on][,id=NAME][,root=on].
    /// Repeatable; the first (or the one with root=on) is /dev/vda, and root=on also adds
    /// root=/dev/vda to the kernel command line.
    #[arg(long, value_name = "SPEC")]
    disk: Vec<skiff::config::DiskConfig>,
    /// A virtio network device on a TAP interface: tap=NAME[,mac=MAC]. Repeatable (eth0 first).
    /// The TAP is created, and brought up, if it does not exist (needs CAP_NET_ADMIN).
    #[arg(long, value_name = "SPEC")]
    net: Vec<skiff::config::NetConfig>,
    /// KVM device node.
    #[arg(long, default_value = DEFAULT_KVM_DEVICE, value_name = "PATH")]
    kvm_device: PathBuf,
}

/// Puts a terminal on stdin into raw mode, and back into canonical mode when dropped (also on
/// panic, through the hook installed in `main`).
struct RawTerminal;

impl RawTerminal {
    fn enter() -> Option<Self> {
        if !std::io::stdin().is_terminal() {
            return None;
        }
        match std::io::stdin().lock().set_raw_mode() {
            Ok(()) => Some(Self),
            Err(e) => {
                log::warn!("cannot put the terminal in raw mode: {e}");
                None
            }
        }
    }
}

fn restore_terminal() {
    if std::io::stdin().is_terminal() {
        let _ = std::io::stdin().lock().set_canon_mode();
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_terminal();
    }
}

fn run(args: RunArgs) -> Result<GuestExit, skiff::VmmError> {
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        vcpus: args.vcpus,
        memory_mib: args.memory,
        kvm_device: args.kvm_device,
        console_input: skiff::config::ConsoleInput::Stdin,
        disks: args.disk,
        nets: args.net,
        track_dirty_pages: false,
        boot_timer: false,
    };
    let mut vm = Vm::new(&config)?;
    vm.stop_on_signals()?;
    let _raw = RawTerminal::enter();
    vm.start()?;
    vm.wait()
}

/// Prints an error and its causes on one line.
fn report(err: &dyn std::error::Error) {
    let mut line = format!("skiff: error: {err}");
    let mut cause = err.source();
    while let Some(c) = cause {
        line.push_str(&format!(": {c}"));
        cause = c.source();
    }
    eprintln!("{line}");
}

fn main() -> ExitCode {
    skiff::mark_process_start();
    let cli = Cli::parse();
    skiff::logger::init(cli.log_level);
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore_terminal();
        default_hook(info);
    }));
    match cli.command {
        Command::Run(args) => match run(args) {
            Ok(GuestExit::Stopped(Some(sig))) => {
                eprintln!("skiff: stopped by signal {sig}");
                ExitCode::from(128u8.saturating_add(u8::try_from(sig).unwrap_or(0)))
            }
            Ok(how) => {
                log::info!("guest ended: {how:?}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                report(&e);
                ExitCode::FAILURE
            }
        },
    }
}
