//! Skiff: a microVM monitor on Linux KVM.
//!
//! The library is what the `skiff` binary uses: describe a VM with [`VmConfig`], build it
//! with [`Vm::new`], then [`Vm::start`] and [`Vm::wait`].

pub mod arch;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod logger;
pub mod metrics;
pub mod vmm;
pub mod vstate;

use std::sync::OnceLock;
use std::time::Instant;

pub use config::VmConfig;
pub use vmm::{Vm, VmState, VmmError};
pub use vstate::vcpu::GuestExit;

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// Records the process start, the zero of boot-progress timestamps. The binary calls it
/// first thing in `main`; otherwise the first VM built sets it.
pub fn mark_process_start() {
    let _ = PROCESS_START.set(Instant::now());
}

/// The instant boot-progress times count from.
pub fn process_start() -> Instant {
    *PROCESS_START.get_or_init(Instant::now)
}
