//! Device emulation: the buses and the devices on them.

pub mod bus;
pub mod legacy;
pub mod pci;
pub mod virtio;

pub use bus::{Bus, BusDevice};

use std::fs::File;
use std::os::fd::AsRawFd;

/// Makes `file`, opened with O_NONBLOCK so that opening a FIFO could not hang, block again:
/// the device paths expect whole reads and writes.
pub(crate) fn clear_nonblocking(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL only reads the flags of `fd`, which `file` owns and keeps open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: F_SETFL only changes the status flags of `fd`, which `file` owns; no memory is
    // passed.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
