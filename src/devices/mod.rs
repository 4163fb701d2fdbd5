//! Device emulation: the buses and the devices on them.

pub mod bus;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice};
