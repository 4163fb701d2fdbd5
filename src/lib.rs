//! Skiff: a microVM monitor on Linux KVM.
//!
//! The library is what the `skiff` binary uses: describe a VM with [`VmConfig`], build it
//! with [`Vm::new`], then [`Vm::start`] and [`Vm::wait`].

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod controller;
pub mod device_manager;
pub mod devices;
pub mod jailer;
pub mod logger;
pub mod metrics;
pub mod mmds;
pub mod rate_limiter;
pub mod sandbox;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod vmm;
pub mod vstate;

use std::sync::OnceLock;
use std::time::Instant;

pub use config::VmConfig;
pub use vmm::{StopHandle, Vm, VmState, VmmError};
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

/// An error and its causes on one line: `what: why: deeper why`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
}
