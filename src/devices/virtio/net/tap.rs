//! A TAP device opened by name through /dev/net/tun, carrying a 12-byte virtio-net header
//! (`IFF_VNET_HDR`) in front of every frame, non-blocking so the event thread never waits on it.
//! See Documentation/networking/tuntap.rst in the kernel tree.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use super::VNET_HDR_LEN;

/// Longest interface name the kernel takes (IFNAMSIZ less the terminating NUL).
const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Errors while opening or configuring a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("invalid TAP name '{0}': {1}")]
    InvalidName(String, &'static str),
    /// /dev/net/tun cannot be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// TUNSETIFF failed: the interface is in use, not a TAP, or we lack the rights.
    #[error("cannot attach to TAP {name}{hint}")]
    Attach {
        /// The interface.
        name: String,
        /// What the error usually means.
        hint: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// An ioctl configuring the TAP failed.
    #[error("cannot {what} on TAP {name}")]
    Configure {
        /// The interface.
        name: String,
        /// What was being set.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// An open TAP queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// `struct ifreq` with the name filled in.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is a C struct of a byte array and a union of integers and pointers, for
    // all of which zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src.cast_signed();
    }
    req
}

fn check_name(name: &str) -> Result<(), TapError> {
    let bad = |why| Err(TapError::InvalidName(name.to_owned(), why));
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return bad("must be 1 to 15 bytes");
    }
    if name == "." || name == ".." || !name.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
        return bad("must be printable ASCII without '/' or spaces");
    }
    Ok(())
}

impl Tap {
    /// Opens the TAP `name`, creating it when absent (which needs CAP_NET_ADMIN). A TAP this
    /// call creates is brought up; one that existed is left as its owner configured it.
    pub fn open(name: &str) -> Result<Self, TapError> {
        check_name(name)?;
        // Asked of the kernel, not of /sys/class/net, which a jail does not have.
        let existed = CString::new(name).is_ok_and(|c| {
            // SAFETY: if_nametoindex reads the NUL-terminated string `c`, alive for the call.
            unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
        });
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_flags =
            i16::try_from(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR).unwrap_or(0);
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is and which lives
        // across the call.
        let ret = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut req) };
        if ret < 0 {
            let source = io::Error::last_os_error();
            let hint = match source.raw_os_error() {
                Some(libc::EPERM) => {
                    " (creating a TAP or using one owned by another user needs CAP_NET_ADMIN)"
                }
                Some(libc::EBUSY) => " (another process has it open)",
                Some(libc::EINVAL) => " (an interface of that name exists and is not a TAP)",
                _ => "",
            };
            return Err(TapError::Attach {
                name: name.to_owned(),
                hint,
                source,
            });
        }
        let tap = Self {
            file,
            name: name.to_owned(),
        };
        let hdr_len = libc::c_int::try_from(VNET_HDR_LEN).unwrap_or(12);
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at `hdr_len`.
        let ret = unsafe { ioctl_with_ref(&tap.file, libc::TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            return Err(tap.configure_error("set the virtio-net header size"));
        }
        if !existed {
            tap.bring_up()?;
        }
        Ok(tap)
    }

    fn configure_error(&self, what: &'static str) -> TapError {
        TapError::Configure {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }

    /// Sets IFF_UP on the interface, through an ordinary socket.
    fn bring_up(&self) -> Result<(), TapError> {
        // SAFETY: socket() takes no pointers; the result is checked before use.
        let fd: RawFd =
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(self.configure_error("open a socket to bring the interface up"));
        }
        // SAFETY: `fd` is a freshly created descriptor nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = ifreq(&self.name);
        // SAFETY: SIOCGIFFLAGS fills the flags of the `struct ifreq` that `req` is.
        if unsafe { ioctl_with_mut_ref(&sock, libc::SIOCGIFFLAGS, &mut req) } < 0 {
            return Err(self.configure_error("read the interface flags"));
        }
        // SAFETY: SIOCGIFFLAGS wrote ifru_flags, so reading that member of the union is valid.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | i16::try_from(libc::IFF_UP).unwrap_or(1);
        // SAFETY: SIOCSIFFLAGS reads the `struct ifreq` that `req` is.
        if unsafe { ioctl_with_ref(&sock, libc::SIOCSIFFLAGS, &req) } < 0 {
            return Err(self.configure_error("bring the interface up"));
        }
        Ok(())
    }

    /// Tells the kernel which offloads the guest takes on received frames (TUN_F_* bits):
    /// with TUN_F_CSUM it may hand over frames with partial checksums, with TUN_F_TSO4/6
    /// frames larger than the MTU.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        let ret = unsafe { ioctl_with_val(&self.file, libc::TUNSETOFFLOAD, flags.into()) };
        if ret < 0 {
            return Err(self.configure_error("set offloads"));
        }
        Ok(())
    }

    /// A stand-in for a TAP, for tests and benchmarks: any non-blocking descriptor that keeps
    /// frame boundaries (a datagram socket). Offloads cannot be set on it.
    pub fn from_file(file: File, name: &str) -> Self {
        Self {
            file,
            name: name.to_owned(),
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (virtio-net header first); `WouldBlock` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (virtio-net header first).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }

    /// Writes one frame gathered from `iov` (virtio-net header first), with one `writev`.
    ///
    /// # Safety
    /// Every element of `iov` must describe memory that stays mapped and readable for the call.
    pub unsafe fn write_frame_from(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: writev reads `count` iovecs from `iov`, alive for the call, and the memory
        // they describe, which the caller guarantees is mapped and readable.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), count) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Reads one frame (virtio-net header first) scattered over `iov`, with one `readv`;
    /// `WouldBlock` when none is waiting.
    ///
    /// # Safety
    /// Every element of `iov` must describe memory that stays mapped and writable for the call,
    /// which nothing else reads or writes meanwhile except as volatile memory (guest memory).
    pub unsafe fn read_frame_into(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: readv reads `count` iovecs from `iov`, alive for the call, and writes into
        // the memory they describe, which the caller guarantees is mapped and writable.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), count) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

/// The iovecs of one `readv` or `writev`, kept by a device and reused for every frame so the
/// queue drain does not allocate. They hold raw pointers into guest memory only between being
/// built and the call that uses them.
#[derive(Debug, Default)]
pub struct IoVecs(Vec<libc::iovec>);

// SAFETY: the pointers are plain addresses that this type never dereferences; whoever passes
// them to the kernel vouches for them at that point (`Tap::read_frame_into`,
// `Tap::write_frame_from`), on whichever thread that happens.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Forgets every iovec.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Adds `len` bytes at `ptr`.
    pub fn push(&mut self, ptr: *mut u8, len: usize) {
        self.0.push(libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        });
    }

    /// The iovecs, in order.
    pub fn as_slice(&self) -> &[libc::iovec] {
        &self.0
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        for bad in ["", "sixteen-chars-xx", "a/b", "a b", ".", "..", "tap\u{e9}"] {
            let err = Tap::open(bad).unwrap_err();
            assert!(matches!(err, TapError::InvalidName(..)), "{bad}: {err}");
        }
    }
}
