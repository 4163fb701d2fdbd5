//! Sandboxes: run a command in a fresh microVM cloned from a snapshot, and get its output and
//! exit code.
//!
//! A sandbox directory is made once by [`prepare`]: it boots a kernel with a root image whose
//! init is Skiff's guest agent (`skiff-agent`, see [`skiff_agent`] for its protocol), waits
//! until the agent answers over vsock, and snapshots the VM. Each [`Sandbox::restore`] then
//! makes a clone of that moment: the memory file is mapped privately (clones share its page
//! cache), the root image is shared read-only (the agent keeps every write in a tmpfs overlay
//! in the clone's own memory), and the vsock device listens on a socket in a directory of the
//! clone's own, removed with it. A [`Pool`] keeps clones restored ahead of requests.
//!
//! ```text
//! DIR/sandbox.json   what was prepared (format, agent, port, shape)
//! DIR/snapshot       the VM's state
//! DIR/memory         guest memory
//! DIR/rootfs.ext4    the root image (a copy: the snapshot's page cache depends on it)
//! DIR/console.log    the prepared boot's console
//! ```

mod agent;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use agent::{Agent, Outcome};
pub use skiff_agent::{ExecRequest, ExitStatus, WinSize, AGENT_PORT, PROTOCOL_VERSION};

use crate::builder::{ConsoleConfig, RestoreConfig};
use crate::config::{CacheType, DiskConfig, IoEngine, VsockConfig, DEFAULT_KVM_DEVICE};
use crate::device_manager::ConsoleInput;
use crate::snapshot::SnapshotType;
use crate::{Vm, VmConfig, VmmError};

/// The version of [`Manifest`]'s layout and of the directory's.
pub const SANDBOX_FORMAT: u32 = 1;

/// The guest's context id in every clone (each clone has a vsock device of its own).
const GUEST_CID: u32 = 3;

/// Errors of sandbox work: each says what failed and why, on one line with its causes.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    #[error("the agent {0}")]
    Agent(String),
    #[error("no agent listens on vsock port {port} behind {}", .uds.display())]
    NotListening { port: u32, uds: PathBuf },
    #[error("the agent did not answer within {0:?}")]
    NotReady(Duration, #[source] Box<SandboxError>),
    #[error("the guest ended before its agent answered ({how}); its console is in {}", .console.display())]
    GuestEnded { how: String, console: PathBuf },
    #[error("{} is not a prepared sandbox: {why}", .dir.display())]
    NotPrepared { dir: PathBuf, why: String },
    #[error("{} already holds a sandbox: remove it first (clones may be using its files)", .0.display())]
    Exists(PathBuf),
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |e| SandboxError::Io(what, e)
}

/// What a sandbox directory holds, in its `sandbox.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// The agent's greeting (`skiff-agent <version>`).
    pub agent: String,
    pub agent_port: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Milliseconds from the start of the boot to the agent's first answer.
    pub boot_to_agent_ms: u64,
}

/// How to prepare a sandbox directory.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// The guest kernel (with virtio-mmio, vsock, ext4 and overlayfs).
    pub kernel: PathBuf,
    /// A root image whose `/usr/sbin/skiff-agent` is the agent (resources/sandbox/build.sh).
    pub rootfs: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The directory to make.
    pub out: PathBuf,
    /// How long the guest may take to boot and answer.
    pub boot_timeout: Duration,
    pub kvm_device: PathBuf,
}

impl PrepareOptions {
    /// One vCPU, 256 MiB, five minutes to boot (an emulated guest kernel is slow).
    pub fn new(
        kernel: impl Into<PathBuf>,
        rootfs: impl Into<PathBuf>,
        out: impl Into<PathBuf>,
    ) -> Self {
        Self {
            kernel: kernel.into(),
            rootfs: rootfs.into(),
            vcpus: 1,
            memory_mib: 256,
            out: out.into(),
            boot_timeout: Duration::from_secs(300),
            kvm_device: DEFAULT_KVM_DEVICE.into(),
        }
    }
}

/// Boots the guest, waits for its agent, and snapshots it into `opts.out`.
pub fn prepare(opts: &PrepareOptions) -> Result<Manifest, SandboxError> {
    let out = &opts.out;
    if out.join("sandbox.json").exists() || out.join("snapshot").exists() {
        return Err(SandboxError::Exists(out.clone()));
    }
    std::fs::create_dir_all(out).map_err(io_err(format!("cannot make {}", out.display())))?;
    let out = out
        .canonicalize()
        .map_err(io_err(format!("cannot resolve {}", out.display())))?;
    let rootfs = out.join("rootfs.ext4");
    std::fs::copy(&opts.rootfs, &rootfs).map_err(io_err(format!(
        "cannot copy {} into {}",
        opts.rootfs.display(),
        out.display()
    )))?;
    let uds = out.join("prepare.vsock");
    let _ = std::fs::remove_file(&uds);
    let console = out.join("console.log");

    let mut config = VmConfig::new(&opts.kernel);
    config.cmdline = format!(
        "{} ro init=/usr/sbin/skiff-agent",
        crate::config::DEFAULT_CMDLINE
    );
    config.vcpus = opts.vcpus;
    config.memory_mib = opts.memory_mib;
    config.kvm_device = opts.kvm_device.clone();
    config.console_input = ConsoleInput::None;
    config.console_output = Some(console.clone());
    config.disks.push(DiskConfig {
        path: rootfs,
        read_only: true,
        id: Some("rootfs".into()),
        root: true,
        partuuid: None,
        rate_limiter: None,
        cache_type: CacheType::default(),
        io_engine: IoEngine::default(),
    });
    config.vsock = Some(VsockConfig {
        vsock_id: None,
        guest_cid: GUEST_CID,
        uds_path: uds.to_string_lossy().into_owned(),
    });
    let start = Instant::now();
    let mut vm = Vm::new(&config)?;
    vm.start()?;
    let agent = Agent::new(&uds, AGENT_PORT);
    let greeting = loop {
        match agent.hello() {
            Ok(greeting) => break greeting,
            Err(e @ SandboxError::Agent(_)) => return Err(e),
            Err(e) if start.elapsed() >= opts.boot_timeout => {
                return Err(SandboxError::NotReady(opts.boot_timeout, Box::new(e)));
            }
            Err(_) => {
                if readable(vm.exit_event().as_raw_fd(), Duration::from_millis(50)) {
                    let how = match vm.wait() {
                        Ok(how) => format!("{how:?}"),
                        Err(e) => crate::error_chain(&e),
                    };
                    return Err(SandboxError::GuestEnded { how, console });
                }
            }
        }
    };
    let boot_to_agent_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    // One command before the snapshot leaves the shell and the C library in the guest's page
    // cache, so that no clone reads them from the disk again.
    let warm_up = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "true".into()],
        ..Default::default()
    };
    agent.exec(&warm_up, None, &mut std::io::sink(), &mut std::io::sink())?;
    vm.pause()?;
    vm.snapshot(
        SnapshotType::Full,
        &out.join("snapshot"),
        &out.join("memory"),
    )?;
    vm.request_stop();
    vm.wait()?;
    let _ = std::fs::remove_file(&uds);
    let manifest = Manifest {
        format: SANDBOX_FORMAT,
        agent: greeting,
        agent_port: AGENT_PORT,
        vcpus: opts.vcpus,
        memory_mib: opts.memory_mib,
        boot_to_agent_ms,
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
    std::fs::write(out.join("sandbox.json"), json).map_err(io_err(format!(
        "cannot write {}",
        out.join("sandbox.json").display()
    )))?;
    Ok(manifest)
}

/// Whether `fd` becomes readable within `timeout`.
fn readable(fd: i32, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: poll over one pollfd on the stack.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

/// Reads and checks a sandbox directory's manifest.
pub fn read_manifest(dir: &Path) -> Result<Manifest, SandboxError> {
    let not = |why: String| SandboxError::NotPrepared {
        dir: dir.to_owned(),
        why,
    };
    let text = std::fs::read(dir.join("sandbox.json"))
        .map_err(|e| not(format!("cannot read sandbox.json: {e}")))?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| not(format!("sandbox.json: {e}")))?;
    if manifest.format != SANDBOX_FORMAT {
        return Err(not(format!(
            "format {} (this Skiff reads {SANDBOX_FORMAT})",
            manifest.format
        )));
    }
    for file in ["snapshot", "memory", "rootfs.ext4"] {
        if !dir.join(file).is_file() {
            return Err(not(format!("{file} is missing")));
        }
    }
    Ok(manifest)
}

/// A clone of a prepared sandbox: a running (or paused) VM with its agent, and a directory
/// of its own for the vsock socket and console. Dropping it stops the VM and removes that
/// directory: nothing of the clone remains.
pub struct Sandbox {
    vm: Option<Vm>,
    agent: Agent,
    work: PathBuf,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").field("work", &self.work).finish()
    }
}

/// A directory for one clone, under the system's temporary directory.
fn clone_dir() -> Result<PathBuf, SandboxError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("skiff-sandbox-{}-{n}", std::process::id()));
    std::fs::create_dir(&dir).map_err(io_err(format!("cannot make {}", dir.display())))?;
    Ok(dir)
}

impl Sandbox {
    /// Restores a clone of the sandbox in `dir` and lets it run.
    pub fn restore(dir: &Path) -> Result<Self, SandboxError> {
        Self::restore_with(dir, false)
    }

    /// Restores a clone with its vCPUs paused; [`Sandbox::resume`] lets it run.
    pub fn restore_paused(dir: &Path) -> Result<Self, SandboxError> {
        Self::restore_with(dir, true)
    }

    fn restore_with(dir: &Path, paused: bool) -> Result<Self, SandboxError> {
        let manifest = read_manifest(dir)?;
        let work = clone_dir()?;
        let mut sandbox = Self {
            vm: None,
            agent: Agent::new(work.join("vsock"), manifest.agent_port)
                .with_patience(Duration::from_secs(10)),
            work,
        };
        let mut config = RestoreConfig::new(dir.join("snapshot"), dir.join("memory"));
        config.vsock_override = Some(sandbox.agent.uds().to_owned());
        config.clock_realtime = true;
        config.console = ConsoleConfig {
            input: ConsoleInput::None,
            output: Some(sandbox.work.join("console.log")),
            rate_limit: None,
        };
        let (mut vm, _) = Vm::restore(&config)?;
        if paused {
            vm.start_paused()?;
        } else {
            vm.start()?;
        }
        sandbox.vm = Some(vm);
        Ok(sandbox)
    }

    /// Lets a clone restored paused run.
    pub fn resume(&mut self) -> Result<(), SandboxError> {
        if let Some(vm) = &mut self.vm {
            vm.resume()?;
        }
        Ok(())
    }

    /// The clone's agent.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The clone's own directory (vsock socket, console log), removed with it.
    pub fn work_dir(&self) -> &Path {
        &self.work
    }

    /// The VM, for what the agent cannot do (metrics, pause, snapshot).
    pub fn vm(&mut self) -> &mut Vm {
        self.vm
            .as_mut()
            .expect("a sandbox has its VM until dropped")
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            vm.request_stop();
            let _ = vm.wait();
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// Clones restored ahead of requests: [`Pool::take`] hands one out at once while a thread
/// restores the next. Waiting clones are paused, so they cost memory (what they touched of
/// their private mapping) but no CPU.
pub struct Pool {
    ready: Option<Mutex<Receiver<Result<Sandbox, SandboxError>>>>,
    filler: Option<JoinHandle<()>>,
}

impl Pool {
    /// Keeps `size` (at least 1) clones of the sandbox in `dir` ready.
    pub fn new(dir: &Path, size: usize) -> Result<Self, SandboxError> {
        read_manifest(dir)?;
        // A rendezvous channel holds none: the filler's restored clone waits in `send`.
        let (tx, rx) = sync_channel(size.max(1) - 1);
        let dir = dir.to_owned();
        let filler = std::thread::Builder::new()
            .name("sandbox-pool".into())
            .spawn(move || loop {
                let sandbox = Sandbox::restore_paused(&dir);
                let failed = sandbox.is_err();
                if tx.send(sandbox).is_err() {
                    return;
                }
                if failed {
                    // A broken directory is reported by take; do not spin on it.
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .map_err(io_err("cannot start the pool's thread"))?;
        Ok(Self {
            ready: Some(Mutex::new(rx)),
            filler: Some(filler),
        })
    }

    /// A ready clone, running.
    pub fn take(&self) -> Result<Sandbox, SandboxError> {
        let rx = self.ready.as_ref().expect("until dropped");
        let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let mut sandbox = next.expect("the filler lives as long as the pool")?;
        sandbox.resume()?;
        Ok(sandbox)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // The filler's next send fails, and it drops what it was holding.
        drop(self.ready.take());
        if let Some(filler) = self.filler.take() {
            let _ = filler.join();
        }
    }
}
