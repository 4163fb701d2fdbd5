//! Legacy PC devices: the COM1 UART, the i8042 controller and the boot-progress port.

pub mod i8042;
pub mod progress;
pub mod serial;

pub use i8042::I8042;
pub use progress::BootProgress;
pub use serial::SerialDevice;
