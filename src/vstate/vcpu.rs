//! vCPUs: set-up of the architectural state, and one named thread each running an explicit
//! state machine (running / paused / exited) around the KVM_RUN loop. Port and MMIO exits are
//! dispatched to the shared, immutable buses; the loop takes no global lock, allocates
//! nothing and logs nothing on the exit path.
//!
//! Control events reach a running vCPU through a channel plus a kick: a real-time signal whose
//! handler sets `kvm_run.immediate_exit`, so KVM_RUN returns at once with EINTR even when the
//! signal lands just before the vCPU enters the kernel (KVM API, "immediate_exit").

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_run, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_INTERNAL_ERROR_EMULATION, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::kvm::KvmContext;
use super::memory::GuestMemoryMmap;
use crate::arch::x86_64::cpu_template::Bits;
use crate::arch::x86_64::{cpuid, msr, regs};
use crate::devices::Bus;
use crate::metrics::{inc, VcpuMetrics};
use crate::seccomp::{Filters, ThreadKind};

/// Why the guest stopped, when it stopped cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest asked the i8042 for a CPU reset (Linux `reboot=k`).
    I8042Reset,
    /// The guest triple-faulted (Linux's last-resort reboot).
    TripleFault,
    /// KVM reported a system shutdown event.
    Shutdown,
    /// KVM reported a system reset event.
    Reset,
    /// The guest halted with interrupts off and nothing can wake it.
    Halted,
    /// The host asked the VM to stop (API, library call or the given signal).
    Stopped(Option<i32>),
}

/// Errors of a vCPU: set-up, or a failure that ends the VM.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    /// A set-up ioctl failed.
    #[error("vCPU {id}: {what} failed")]
    Setup {
        /// The vCPU.
        id: u8,
        /// Which ioctl.
        what: &'static str,
        /// Its error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_SET_MSRS set fewer MSRs than asked.
    #[error("vCPU {id}: KVM refused MSR {index:#x}")]
    SetMsr {
        /// The vCPU.
        id: u8,
        /// The first MSR not set.
        index: u32,
    },
    /// KVM_SET_MSRS set fewer of a snapshot's MSRs than asked.
    #[error("vCPU {id}: KVM refused the saved value of MSR {index:#x}")]
    RestoreMsr {
        /// The vCPU.
        id: u8,
        /// The first MSR not set.
        index: u32,
    },
    /// A saved state's CPUID has more entries than KVM takes.
    #[error("vCPU {0}: the saved CPUID has too many entries")]
    CpuidTooLarge(u8),
    /// The state was asked of a vCPU that is running.
    #[error("vCPU {0} is running: pause the VM first")]
    NotPaused(u8),
    /// Writing boot-time register state failed.
    #[error("vCPU {0}: cannot write boot register state")]
    Regs(u8, #[source] regs::RegsError),
    /// The thread could not be started.
    #[error("cannot start the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
    /// The vCPU's seccomp filter could not be installed.
    #[error("vCPU {0}: cannot confine its thread")]
    Seccomp(u8, #[source] crate::seccomp::SeccompError),
    /// The signal handler that kicks vCPUs out of KVM_RUN could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    KickHandler(#[source] std::io::Error),
    /// KVM_RUN failed.
    #[error("vCPU {0}: KVM_RUN failed")]
    Run(u8, #[source] kvm_ioctls::Error),
    /// KVM's instruction emulator could not run a guest instruction.
    #[error(
        "vCPU {id}: KVM could not emulate the guest instruction at RIP {rip:#x} (bytes: {bytes})"
    )]
    Emulation {
        /// The vCPU.
        id: u8,
        /// Guest RIP.
        rip: u64,
        /// The instruction bytes at RIP, in hex.
        bytes: String,
    },
    /// Another KVM internal error.
    #[error("vCPU {id}: KVM internal error, suberror {suberror} at RIP {rip:#x}")]
    Internal {
        /// The vCPU.
        id: u8,
        /// KVM's suberror code.
        suberror: u32,
        /// Guest RIP.
        rip: u64,
    },
    /// The hardware refused to enter the guest.
    #[error("vCPU {id}: VM entry failed, hardware reason {reason:#x}")]
    FailEntry {
        /// The vCPU.
        id: u8,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// The guest reported a crash (KVM_SYSTEM_EVENT_CRASH).
    #[error("vCPU {0}: the guest crashed")]
    GuestCrash(u8),
    /// The guest touched guest-physical memory whose host pages KVM cannot map (KVM API,
    /// KVM_EXIT_MEMORY_FAULT): an unplugged virtio-mem block, which the driver promised not to
    /// touch (VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE).
    #[error("vCPU {id}: the guest touched {size:#x} bytes at {gpa:#x}, which are not memory it may use (an unplugged memory block)")]
    MemoryFault {
        /// The vCPU.
        id: u8,
        /// Guest physical address of the access.
        gpa: u64,
        /// Its size in bytes.
        size: u64,
    },
    /// An exit Skiff does not handle.
    #[error("vCPU {0}: unexpected KVM exit {1}")]
    UnexpectedExit(u8, String),
    /// The vCPU thread panicked.
    #[error("vCPU {0}: thread panicked")]
    Panicked(u8),
    /// The vCPU thread is gone.
    #[error("vCPU {0} thread is not running")]
    Gone(u8),
}

/// Where the VM's end is reported: the first stopping vCPU, device or host request wins, and
/// whoever waits is woken through an eventfd.
#[derive(Debug)]
pub struct ExitSignal {
    evt: EventFd,
    outcome: Mutex<Option<Result<GuestExit, VcpuError>>>,
}

impl ExitSignal {
    /// A fresh signal.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(libc::EFD_CLOEXEC)?,
            outcome: Mutex::new(None),
        })
    }

    /// Records how the VM ended (if nothing was recorded yet) and wakes the waiter.
    pub fn request(&self, outcome: Result<GuestExit, VcpuError>) {
        let mut slot = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(outcome);
        }
        drop(slot);
        // An eventfd write only fails when the counter would overflow: it is set already.
        let _ = self.evt.write(1);
    }

    /// The eventfd that becomes readable on a request; async-signal handlers may write to it.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Takes the recorded outcome, if any.
    pub fn take(&self) -> Option<Result<GuestExit, VcpuError>> {
        self.outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// Requests sent to a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEvent {
    /// Stop at the next exit and wait.
    Pause,
    /// Continue after a pause.
    Resume,
    /// Answer with the vCPU's state; refused unless paused.
    SaveState,
    /// Leave the run loop for good.
    Exit,
}

/// Acknowledgements from a vCPU thread.
#[derive(Debug)]
pub enum VcpuResponse {
    /// The vCPU is paused.
    Paused,
    /// The vCPU is running again.
    Resumed,
    /// The vCPU's state, or why it could not be read.
    SavedState(Box<Result<VcpuState, VcpuError>>),
    /// The thread has left its loop.
    Exited,
}

impl VcpuResponse {
    /// Whether this is the answer `event` expects.
    fn answers(&self, event: VcpuEvent) -> bool {
        matches!(
            (self, event),
            (Self::Paused, VcpuEvent::Pause)
                | (Self::Resumed, VcpuEvent::Resume)
                | (Self::SavedState(_), VcpuEvent::SaveState)
        )
    }
}

/// MSR_IA32_TSC_DEADLINE: restored after MSR_IA32_TSC, so that the deadline it holds counts
/// against the restored TSC rather than the host's current one.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Everything KVM holds of one vCPU (KVM API: the GET/SET pairs of section 4): saved while the
/// vCPU is paused, written back before a restored vCPU first runs.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's APIC id.
    pub id: u8,
    /// CPUID as the guest sees it.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM lists as saved and restored that this vCPU could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (the 4 KiB legacy XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Running, halted or waiting for INIT/SIPI.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// TSC frequency, where KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// A request and its sequence number; the acknowledgement carries the same number, so one that
/// arrives after its requester gave up is recognised as stale and dropped.
type Request = (u64, VcpuEvent);
/// An acknowledgement and the number of the request it answers (0: not asked for).
type Response = (u64, VcpuResponse);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
    Exited,
}

/// What one KVM_RUN led to.
enum Step {
    Continue,
    Interrupted,
    Stop(GuestExit),
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own mapped kvm_run, set while its VcpuFd is
        // alive and cleared before it is dropped; a volatile byte store is signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// The signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler once per process; without it a kick would kill the process, so
/// a failure stops the vCPU from starting.
fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), handle_kick).map_err(|e| e.errno()))
        .map_err(|errno| VcpuError::KickHandler(std::io::Error::from_raw_os_error(errno)))
}

/// Publishes this thread's `kvm_run` to the kick handler for as long as it lives. Declared
/// inside [`Vcpu::run`], it is dropped before the `Vcpu` that owns the mapping, on return and
/// on unwinding alike, so the handler never sees an unmapped `kvm_run`.
struct KickTarget;

impl KickTarget {
    fn set(run: *mut kvm_run) -> Self {
        KVM_RUN.with(|c| c.set(run));
        Self
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// One vCPU, configured and ready to run.
#[derive(Debug)]
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    mem: GuestMemoryMmap,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
    metrics: Arc<VcpuMetrics>,
    /// The MSRs a saved state holds: KVM's list of saved MSRs.
    msr_list: Arc<[u32]>,
}

impl Vcpu {
    /// Creates vCPU `id` in `vm`.
    pub fn new(
        vm: &VmFd,
        id: u8,
        mem: GuestMemoryMmap,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitSignal>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| VcpuError::Create(id, e))?;
        Ok(Self::with_fd(fd, id, mem, pio, mmio, exit))
    }

    /// A vCPU on a KVM vCPU `fd` made beforehand (a VM prepared for a restore).
    pub fn with_fd(
        fd: VcpuFd,
        id: u8,
        mem: GuestMemoryMmap,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self {
            id,
            fd,
            mem,
            pio,
            mmio,
            exit,
            metrics: Arc::new(VcpuMetrics::default()),
            msr_list: Arc::from(Vec::new()),
        }
    }

    /// This vCPU's id.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// This vCPU's exit counters, shared with the metrics dump.
    pub fn metrics(&self) -> Arc<VcpuMetrics> {
        self.metrics.clone()
    }

    fn setup_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Setup { id, what, source }
    }

    /// Sets CPUID (from `base`, normalised for this vCPU of `count`, two threads a core with
    /// `smt`), MSRs, FPU and LAPIC; the boot vCPU (id 0) also gets the registers to enter the
    /// kernel at `entry`. The others wait for INIT/SIPI in the in-kernel LAPIC.
    pub fn configure(
        &mut self,
        kvm: &KvmContext,
        base: &CpuId,
        (count, smt): (u8, bool),
        entry: regs::BootEntry,
        msr_template: &[(u32, Bits)],
    ) -> Result<(), VcpuError> {
        self.msr_list = Arc::from(kvm.msr_index_list());
        let mut cpuid = base.clone();
        cpuid::normalize(&mut cpuid, self.id, count, smt);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.setup_err("KVM_SET_CPUID2"))?;

        let msrs = msr::boot_msrs(kvm.msr_index_list()).map_err(|_| VcpuError::Setup {
            id: self.id,
            what: "MSR list",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.setup_err("KVM_SET_MSRS"))?;
        if let Some(refused) = msrs.as_slice().get(set) {
            return Err(VcpuError::SetMsr {
                id: self.id,
                index: refused.index,
            });
        }
        for &(index, bits) in msr_template {
            self.apply_msr_template(index, bits)?;
        }
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.setup_err("KVM_SET_FPU"))?;
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(self.setup_err("KVM_GET_LAPIC"))?;
        regs::set_lint(&mut lapic);
        self.fd
            .set_lapic(&lapic)
            .map_err(self.setup_err("KVM_SET_LAPIC"))?;

        if self.id == 0 {
            let sregs = self
                .fd
                .get_sregs()
                .map_err(self.setup_err("KVM_GET_SREGS"))?;
            let sregs = regs::boot_sregs(&self.mem, entry, sregs)
                .map_err(|e| VcpuError::Regs(self.id, e))?;
            self.fd
                .set_sregs(&sregs)
                .map_err(self.setup_err("KVM_SET_SREGS"))?;
            self.fd
                .set_regs(&regs::boot_regs(entry))
                .map_err(self.setup_err("KVM_SET_REGS"))?;
        }
        Ok(())
    }

    /// Changes MSR `index` as a CPU template's bitmap says, from the value KVM gives it (0 for
    /// one it cannot read).
    fn apply_msr_template(&self, index: u32, bits: Bits) -> Result<(), VcpuError> {
        let entry = |data| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        };
        let list = |data| {
            Msrs::from_entries(&[entry(data)]).map_err(|_| VcpuError::Setup {
                id: self.id,
                what: "MSR list",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })
        };
        let mut current = list(0)?;
        let read = self
            .fd
            .get_msrs(&mut current)
            .map_err(self.setup_err("KVM_GET_MSRS"))?;
        let old = if read == 1 {
            current.as_slice()[0].data
        } else {
            0
        };
        let set = self
            .fd
            .set_msrs(&list(bits.apply(old))?)
            .map_err(self.setup_err("KVM_SET_MSRS"))?;
        if set != 1 {
            return Err(VcpuError::SetMsr { id: self.id, index });
        }
        Ok(())
    }

    /// Starts the vCPU thread, named `skiff-vcpu-<id>`, which installs the vCPU seccomp
    /// filter from `filters` before it first enters the guest; with `paused` it waits for a
    /// [`VcpuEvent::Resume`] before it does.
    pub fn start(self, filters: Filters, paused: bool) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let id = self.id;
        let (event_tx, event_rx) = channel();
        let (resp_tx, resp_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("skiff-vcpu-{id}"))
            .spawn(move || {
                let exit = self.exit.clone();
                if let Err(e) = filters.apply(ThreadKind::Vcpu) {
                    exit.request(Err(VcpuError::Seccomp(id, e)));
                    let _ = resp_tx.send((0, VcpuResponse::Exited));
                    return;
                }
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.run(&event_rx, &resp_tx, paused);
                }));
                if result.is_err() {
                    exit.request(Err(VcpuError::Panicked(id)));
                    let _ = resp_tx.send((0, VcpuResponse::Exited));
                }
            })
            .map_err(|e| VcpuError::Spawn(id, e))?;
        Ok(VcpuHandle {
            id,
            events: event_tx,
            responses: resp_rx,
            next_seq: AtomicU64::new(1),
            thread: Some(thread),
        })
    }

    fn run(mut self, events: &Receiver<Request>, responses: &Sender<Response>, paused: bool) {
        let kick_target = KickTarget::set(self.fd.get_kvm_run());
        let mut state = if paused {
            RunState::Paused
        } else {
            RunState::Running
        };
        while state != RunState::Exited {
            state = match state {
                RunState::Running => self.running(events, responses),
                RunState::Paused => self.paused(events, responses),
                RunState::Exited => RunState::Exited,
            };
        }
        drop(kick_target);
        let _ = responses.send((0, VcpuResponse::Exited));
    }

    /// Handles queued requests without blocking; returns the state to move to, if any.
    fn handle_events(
        &self,
        events: &Receiver<Request>,
        responses: &Sender<Response>,
    ) -> Option<RunState> {
        loop {
            match events.try_recv() {
                Ok((seq, VcpuEvent::Pause)) => {
                    self.tell_kvmclock_paused();
                    let _ = responses.send((seq, VcpuResponse::Paused));
                    return Some(RunState::Paused);
                }
                Ok((seq, VcpuEvent::Resume)) => {
                    let _ = responses.send((seq, VcpuResponse::Resumed));
                }
                Ok((seq, VcpuEvent::SaveState)) => {
                    let refused = Err(VcpuError::NotPaused(self.id));
                    let _ = responses.send((seq, VcpuResponse::SavedState(Box::new(refused))));
                }
                Ok((_, VcpuEvent::Exit)) | Err(TryRecvError::Disconnected) => {
                    return Some(RunState::Exited)
                }
                Err(TryRecvError::Empty) => return None,
            }
        }
    }

    fn running(&mut self, events: &Receiver<Request>, responses: &Sender<Response>) -> RunState {
        // Requests sent before the kick handler could see this thread's kvm_run.
        if let Some(next) = self.handle_events(events, responses) {
            return next;
        }
        loop {
            match self.run_once() {
                Ok(Step::Continue) => {}
                Ok(Step::Interrupted) => {
                    self.fd.set_kvm_immediate_exit(0);
                    if let Some(next) = self.handle_events(events, responses) {
                        return next;
                    }
                }
                Ok(Step::Stop(reason)) => {
                    self.exit.request(Ok(reason));
                    return RunState::Exited;
                }
                Err(e) => {
                    self.exit.request(Err(e));
                    return RunState::Exited;
                }
            }
        }
    }

    fn paused(&self, events: &Receiver<Request>, responses: &Sender<Response>) -> RunState {
        match events.recv() {
            Ok((seq, VcpuEvent::Resume)) => {
                let _ = responses.send((seq, VcpuResponse::Resumed));
                RunState::Running
            }
            Ok((seq, VcpuEvent::Pause)) => {
                let _ = responses.send((seq, VcpuResponse::Paused));
                RunState::Paused
            }
            Ok((seq, VcpuEvent::SaveState)) => {
                let state = Box::new(self.save_state());
                let _ = responses.send((seq, VcpuResponse::SavedState(state)));
                RunState::Paused
            }
            Ok((_, VcpuEvent::Exit)) | Err(_) => RunState::Exited,
        }
    }

    /// Tells the guest's kvmclock that the vCPU stops for a while, so its soft-lockup watchdog
    /// does not take the pause for a hang (KVM API, KVM_KVMCLOCK_CTRL). A guest without
    /// kvmclock makes KVM answer EINVAL, which changes nothing.
    fn tell_kvmclock_paused(&self) {
        let _ = self.fd.kvmclock_ctrl();
    }

    /// Reads the vCPU's whole state; the vCPU must not be running. The order follows what KVM
    /// needs: MP state first (it may flush pending APIC events into the registers), events
    /// last.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(self.setup_err("KVM_GET_MP_STATE"))?;
        let regs = self.fd.get_regs().map_err(self.setup_err("KVM_GET_REGS"))?;
        let sregs = self
            .fd
            .get_sregs()
            .map_err(self.setup_err("KVM_GET_SREGS"))?;
        let xsave = self
            .fd
            .get_xsave()
            .map_err(self.setup_err("KVM_GET_XSAVE"))?;
        let xcrs = self.fd.get_xcrs().map_err(self.setup_err("KVM_GET_XCRS"))?;
        let debug_regs = self
            .fd
            .get_debug_regs()
            .map_err(self.setup_err("KVM_GET_DEBUGREGS"))?;
        let lapic = self
            .fd
            .get_lapic()
            .map_err(self.setup_err("KVM_GET_LAPIC"))?;
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(self.setup_err("KVM_GET_CPUID2"))?;
        let msrs = self.read_msrs()?;
        let vcpu_events = self
            .fd
            .get_vcpu_events()
            .map_err(self.setup_err("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            id: self.id,
            cpuid: cpuid.as_slice().to_vec(),
            msrs,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            mp_state,
            vcpu_events,
            tsc_khz: self.fd.get_tsc_khz().ok(),
        })
    }

    /// Reads every MSR of KVM's saved list that this vCPU has. KVM_GET_MSRS stops at the first
    /// MSR it cannot read (one the guest's CPUID does not offer): that one is skipped and the
    /// rest read on.
    fn read_msrs(&self) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let list = &self.msr_list;
        let mut saved = Vec::with_capacity(list.len());
        let mut start = 0;
        while start < list.len() {
            let chunk = &list[start..list.len().min(start + KVM_MAX_MSR_ENTRIES)];
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Setup {
                id: self.id,
                what: "MSR list",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            let read = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(self.setup_err("KVM_GET_MSRS"))?
                .min(chunk.len());
            saved.extend_from_slice(&msrs.as_slice()[..read]);
            start += read;
            if read < chunk.len() {
                start += 1; // the one KVM could not read
            }
        }
        Ok(saved)
    }

    /// Writes a saved state back (the inverse of [`Vcpu::save_state`]), before the vCPU first
    /// runs. The TSC frequency is set first when the host's differs from the saved one.
    pub fn restore_state(&mut self, kvm: &KvmContext, state: &VcpuState) -> Result<(), VcpuError> {
        self.msr_list = Arc::from(kvm.msr_index_list());
        if let Some(khz) = state.tsc_khz {
            if self.fd.get_tsc_khz().ok() != Some(khz) {
                self.fd
                    .set_tsc_khz(khz)
                    .map_err(self.setup_err("KVM_SET_TSC_KHZ"))?;
            }
        }
        let cpuid =
            CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError::CpuidTooLarge(self.id))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.setup_err("KVM_SET_CPUID2"))?;
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(self.setup_err("KVM_SET_MP_STATE"))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(self.setup_err("KVM_SET_REGS"))?;
        self.fd
            .set_sregs(&state.sregs)
            .map_err(self.setup_err("KVM_SET_SREGS"))?;
        // SAFETY: `state.xsave` is the 4 KiB legacy kvm_xsave, as large as KVM reads: Skiff
        // never asks for the larger XSAVE2 layouts (no AMX permission is requested).
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(self.setup_err("KVM_SET_XSAVE"))?;
        self.fd
            .set_xcrs(&state.xcrs)
            .map_err(self.setup_err("KVM_SET_XCRS"))?;
        self.fd
            .set_debug_regs(&state.debug_regs)
            .map_err(self.setup_err("KVM_SET_DEBUGREGS"))?;
        self.fd
            .set_lapic(&state.lapic)
            .map_err(self.setup_err("KVM_SET_LAPIC"))?;
        let mut msrs = state.msrs.clone();
        // Stable: the TSC deadline goes after the TSC, the rest keep their order.
        msrs.sort_by_key(|m| m.index == MSR_IA32_TSC_DEADLINE);
        for chunk in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let list = Msrs::from_entries(chunk).map_err(|_| VcpuError::Setup {
                id: self.id,
                what: "MSR list",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            let set = self
                .fd
                .set_msrs(&list)
                .map_err(self.setup_err("KVM_SET_MSRS"))?;
            if let Some(refused) = chunk.get(set) {
                return Err(VcpuError::RestoreMsr {
                    id: self.id,
                    index: refused.index,
                });
            }
        }
        self.fd
            .set_vcpu_events(&state.vcpu_events)
            .map_err(self.setup_err("KVM_SET_VCPU_EVENTS"))?;
        // The pause before the snapshot told KVM, but KVM writes PVCLOCK_GUEST_STOPPED into
        // the guest's pvclock page only when the vCPU next enters, which the saved VM never
        // did: the snapshot's memory does not hold it. Told again now (the MSRs above enabled
        // the pvclock), the guest sees the flag on its first entry and its RCU stall and
        // soft-lockup checks discount the time the VM was down, which `clock_realtime` adds
        // to its clock at once (Firecracker does the same since its PR #5494).
        self.tell_kvmclock_paused();
        Ok(())
    }

    /// Runs the guest until its next exit and handles it.
    fn run_once(&mut self) -> Result<Step, VcpuError> {
        let step = self.dispatch_exit();
        let m = &self.metrics;
        match &step {
            Ok(Step::Interrupted) => inc(&m.exit_interrupted),
            Ok(Step::Stop(_)) => inc(&m.exit_system_event),
            Ok(Step::Continue) => {}
            Err(_) => inc(&m.failures),
        }
        step
    }

    fn dispatch_exit(&mut self) -> Result<Step, VcpuError> {
        let id = self.id;
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                inc(&self.metrics.exit_io_out);
                self.pio.write(u64::from(port), data);
                Ok(Step::Continue)
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                inc(&self.metrics.exit_io_in);
                self.pio.read(u64::from(port), data);
                Ok(Step::Continue)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                inc(&self.metrics.exit_mmio_read);
                self.mmio.read(addr, data);
                Ok(Step::Continue)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                inc(&self.metrics.exit_mmio_write);
                self.mmio.write(addr, data);
                Ok(Step::Continue)
            }
            Ok(VcpuExit::Shutdown) => Ok(Step::Stop(GuestExit::TripleFault)),
            Ok(VcpuExit::Hlt) => {
                inc(&self.metrics.exit_hlt);
                Ok(Step::Stop(GuestExit::Halted))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Ok(Step::Stop(GuestExit::Shutdown)),
                KVM_SYSTEM_EVENT_RESET => Ok(Step::Stop(GuestExit::Reset)),
                KVM_SYSTEM_EVENT_CRASH => Err(VcpuError::GuestCrash(id)),
                other => Err(VcpuError::UnexpectedExit(
                    id,
                    format!("system event {other}"),
                )),
            },
            Ok(VcpuExit::Intr) => Ok(Step::Interrupted),
            Ok(VcpuExit::InternalError) => Err(self.internal_error()),
            Ok(VcpuExit::FailEntry(reason, _)) => Err(VcpuError::FailEntry { id, reason }),
            Ok(VcpuExit::MemoryFault { gpa, size, .. }) => {
                Err(VcpuError::MemoryFault { id, gpa, size })
            }
            Ok(other) => Err(VcpuError::UnexpectedExit(id, format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(Step::Interrupted)
            }
            Err(e) => Err(VcpuError::Run(id, e)),
        }
    }

    /// Describes a KVM_EXIT_INTERNAL_ERROR with the guest RIP and the bytes found there.
    fn internal_error(&mut self) -> VcpuError {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
        // member KVM filled in.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let (rip, bytes) = self.instruction_at_rip();
        if suberror == KVM_INTERNAL_ERROR_EMULATION {
            let bytes = bytes
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ");
            VcpuError::Emulation {
                id: self.id,
                rip,
                bytes,
            }
        } else {
            VcpuError::Internal {
                id: self.id,
                suberror,
                rip,
            }
        }
    }

    /// RIP and up to 15 instruction bytes there (fewer where they cannot be read).
    fn instruction_at_rip(&self) -> (u64, Vec<u8>) {
        let Ok(r) = self.fd.get_regs() else {
            return (0, Vec::new());
        };
        let base = self.fd.get_sregs().map_or(0, |s| s.cs.base);
        let linear = base.wrapping_add(r.rip);
        let mut bytes = Vec::new();
        if let Ok(t) = self.fd.translate_gva(linear) {
            if t.valid != 0 {
                for i in 0..15 {
                    match self
                        .mem
                        .read_obj::<u8>(GuestAddress(t.physical_address + i))
                    {
                        Ok(b) => bytes.push(b),
                        Err(_) => break,
                    }
                }
            }
        }
        (r.rip, bytes)
    }
}

/// The VMM's side of a running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    id: u8,
    events: Sender<Request>,
    responses: Receiver<Response>,
    next_seq: AtomicU64,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Sends `event` and kicks the thread out of KVM_RUN so it sees it; returns the request's
    /// number for [`VcpuHandle::response_to`].
    pub fn send(&self, event: VcpuEvent) -> Result<u64, VcpuError> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.events
            .send((seq, event))
            .map_err(|_| VcpuError::Gone(self.id))?;
        if let Some(t) = &self.thread {
            // SAFETY: the pthread_t belongs to a thread we have not joined yet, so it is
            // valid; the signal's handler only touches that thread's kvm_run.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
        Ok(seq)
    }

    /// Waits up to `timeout` for the acknowledgement of request `seq`, dropping late ones to
    /// earlier requests.
    pub fn response_to(&self, seq: u64, timeout: Duration) -> Result<VcpuResponse, VcpuError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.responses.recv_timeout(left) {
                Ok((got, response)) if got == seq => return Ok(response),
                Ok((_, VcpuResponse::Exited)) => return Err(VcpuError::Gone(self.id)),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    return Err(VcpuError::Gone(self.id))
                }
            }
        }
    }

    /// Asks the thread to exit and waits for it.
    pub fn stop(&mut self) {
        let _ = self.send(VcpuEvent::Exit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `event` to every vCPU, then waits up to `timeout` in all for each to answer it.
fn broadcast(
    handles: &[VcpuHandle],
    event: VcpuEvent,
    timeout: Duration,
) -> Result<Vec<VcpuResponse>, VcpuError> {
    let deadline = std::time::Instant::now() + timeout;
    let mut sent = Vec::with_capacity(handles.len());
    for h in handles {
        sent.push(h.send(event)?);
    }
    let mut answers = Vec::with_capacity(handles.len());
    for (h, seq) in handles.iter().zip(sent) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let answer = h.response_to(seq, left)?;
        if !answer.answers(event) {
            return Err(VcpuError::Gone(h.id));
        }
        answers.push(answer);
    }
    Ok(answers)
}

/// Pauses every vCPU, or none: when one does not acknowledge within `timeout`, all are told to
/// resume (a vCPU handles its requests in order, so a late one pauses and then resumes).
pub fn pause_all(handles: &[VcpuHandle], timeout: Duration) -> Result<(), VcpuError> {
    match broadcast(handles, VcpuEvent::Pause, timeout) {
        Ok(_) => Ok(()),
        Err(e) => {
            let _ = broadcast(handles, VcpuEvent::Resume, timeout);
            Err(e)
        }
    }
}

/// Resumes every vCPU, or none: when one does not acknowledge within `timeout`, all are told
/// to pause again.
pub fn resume_all(handles: &[VcpuHandle], timeout: Duration) -> Result<(), VcpuError> {
    match broadcast(handles, VcpuEvent::Resume, timeout) {
        Ok(_) => Ok(()),
        Err(e) => {
            let _ = broadcast(handles, VcpuEvent::Pause, timeout);
            Err(e)
        }
    }
}

/// The state of every vCPU, in order; each must be paused.
pub fn save_all(handles: &[VcpuHandle], timeout: Duration) -> Result<Vec<VcpuState>, VcpuError> {
    let answers = broadcast(handles, VcpuEvent::SaveState, timeout)?;
    handles
        .iter()
        .zip(answers)
        .map(|(h, answer)| match answer {
            VcpuResponse::SavedState(state) => *state,
            _ => Err(VcpuError::Gone(h.id)),
        })
        .collect()
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in vCPU thread that answers each request after `delay`, in order; the flag
    /// says whether it is paused.
    fn slow_vcpu(id: u8, delay: Duration) -> (VcpuHandle, Arc<std::sync::atomic::AtomicBool>) {
        let (event_tx, event_rx) = channel::<Request>();
        let (resp_tx, resp_rx) = channel();
        let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let state = paused.clone();
        std::thread::spawn(move || {
            for (seq, event) in event_rx {
                std::thread::sleep(delay);
                let answer = match event {
                    VcpuEvent::Pause => VcpuResponse::Paused,
                    VcpuEvent::Resume => VcpuResponse::Resumed,
                    VcpuEvent::SaveState => {
                        VcpuResponse::SavedState(Box::new(Err(VcpuError::NotPaused(id))))
                    }
                    VcpuEvent::Exit => return,
                };
                state.store(matches!(answer, VcpuResponse::Paused), Ordering::SeqCst);
                if resp_tx.send((seq, answer)).is_err() {
                    return;
                }
            }
        });
        let handle = VcpuHandle {
            id,
            events: event_tx,
            responses: resp_rx,
            next_seq: AtomicU64::new(1),
            thread: None,
        };
        (handle, paused)
    }

    #[test]
    fn late_answers_are_matched_to_their_requests() {
        let (h, _) = slow_vcpu(0, Duration::from_millis(300));
        let pause = h.send(VcpuEvent::Pause).unwrap();
        assert!(h.response_to(pause, Duration::from_millis(50)).is_err());
        let resume = h.send(VcpuEvent::Resume).unwrap();
        // The late Paused for the first request must not pass for the answer to the second.
        assert!(matches!(
            h.response_to(resume, Duration::from_secs(5)).unwrap(),
            VcpuResponse::Resumed
        ));
    }

    /// A pause that one vCPU does not acknowledge in time is undone on all of them: the quick
    /// ones are resumed, and the slow one, which handles its requests in order, pauses late and
    /// then resumes. Before, the quick ones stayed parked and later pauses read stale answers.
    #[test]
    fn a_pause_one_vcpu_misses_is_rolled_back_everywhere() {
        let (quick, quick_paused) = slow_vcpu(0, Duration::ZERO);
        let (slow, slow_paused) = slow_vcpu(1, Duration::from_millis(400));
        let handles = [quick, slow];
        assert!(pause_all(&handles, Duration::from_millis(100)).is_err());
        // The slow one's pause and resume are handled by now.
        std::thread::sleep(Duration::from_millis(1000));
        assert!(!quick_paused.load(Ordering::SeqCst), "left parked");
        assert!(!slow_paused.load(Ordering::SeqCst), "left parked");
        // Nothing stale is read in the next round.
        pause_all(&handles, Duration::from_secs(5)).unwrap();
        assert!(quick_paused.load(Ordering::SeqCst) && slow_paused.load(Ordering::SeqCst));
        resume_all(&handles, Duration::from_secs(5)).unwrap();
        assert!(!quick_paused.load(Ordering::SeqCst) && !slow_paused.load(Ordering::SeqCst));
    }
}
