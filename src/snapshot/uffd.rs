//! The Uffd memory backend of a restore, Firecracker's: guest memory is mapped anonymous and
//! registered with a userfaultfd in MISSING mode, and an external page-fault handler, reached
//! on a Unix socket, gets the userfaultfd and where each region is. From then on every page the
//! guest or Skiff first touches waits until the handler fills it (UFFDIO_COPY from wherever it
//! keeps the snapshot's memory, UFFDIO_ZEROPAGE, ...).
//!
//! The handshake is Firecracker's v1.16 (`src/vmm/src/persist.rs`: `guest_memory_from_uffd`,
//! `create_guest_memory`, `send_uffd_handshake`), so handlers written for Firecracker serve
//! Skiff unchanged: one message on a stream connection to the handler's socket whose bytes are
//! a JSON array, one object per region in guest-address order,
//! `{"base_host_virt_addr": u64, "size": usize, "offset": u64, "page_size": usize,
//! "page_size_kib": usize}` (the region's host address, its length, its offset in the memory
//! file, and the page size in bytes, twice: `page_size_kib` is Firecracker's deprecated name
//! for the same value in bytes), with the userfaultfd attached as SCM_RIGHTS. Nothing else is
//! ever sent. As Firecracker does, Skiff keeps the connection open and its own copy of the
//! userfaultfd for as long as the VM lives.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::Serialize;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_val};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::vstate::memory::{GuestMemoryMmap, MemoryRegionState, PAGE_SIZE};

// The kernel's userfaultfd ABI, from include/uapi/linux/userfaultfd.h (libc has none of it).

/// `UFFD_API`: the API version UFFDIO_API agrees on.
const UFFD_API: u64 = 0xaa;
/// `UFFD_FEATURE_EVENT_REMOVE`: madvise(MADV_DONTNEED/REMOVE) on a registered range is reported
/// to the handler. Firecracker requires it (for the balloon), so its handlers may expect it.
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFDIO_REGISTER_MODE_MISSING`: report faults on pages that are not present.
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// The ioctl type of the userfaultfd and of `/dev/userfaultfd` (`UFFDIO`, `USERFAULTFD_IOC`).
const UFFDIO: u64 = 0xaa;
/// `USERFAULTFD_IOC_NEW`, `_IO(USERFAULTFD_IOC, 0x00)`: a new userfaultfd from
/// `/dev/userfaultfd`, taking the flags of the userfaultfd syscall.
const USERFAULTFD_IOC_NEW: u64 = UFFDIO << 8;
/// Where the kernel (6.1 and later) offers userfaultfds to whoever may open it.
const USERFAULTFD_DEVICE: &str = "/dev/userfaultfd";

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `_IOWR(UFFDIO, nr, T)` (include/uapi/asm-generic/ioctl.h: direction read|write in bits
/// 30-31, the argument's size in bits 16-29, the type in bits 8-15, the number below).
const fn uffdio_iowr<T>(nr: u64) -> u64 {
    (3 << 30) | ((std::mem::size_of::<T>() as u64) << 16) | (UFFDIO << 8) | nr
}
/// `UFFDIO_API`, `_IOWR(UFFDIO, 0x3F, struct uffdio_api)`.
const UFFDIO_API: u64 = uffdio_iowr::<UffdioApi>(0x3f);
/// `UFFDIO_REGISTER`, `_IOWR(UFFDIO, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: u64 = uffdio_iowr::<UffdioRegister>(0x00);

/// One region as the handler is told of it: Firecracker's `GuestRegionUffdMapping`, field
/// for field and in its order.
#[derive(Debug, Serialize)]
struct GuestRegionUffdMapping {
    /// Where the region is mapped in Skiff: the handler fills pages there.
    base_host_virt_addr: u64,
    /// Its length in bytes.
    size: usize,
    /// Where its contents start in the snapshot's memory file.
    offset: u64,
    /// The page size of its mapping, in bytes.
    page_size: usize,
    /// The same, under Firecracker's deprecated (and misleading) name, which its older
    /// handlers read.
    page_size_kib: usize,
}

/// Errors while handing guest memory to a page-fault handler.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// No userfaultfd can be made here.
    #[error(
        "userfaultfd is not available to this process (it needs read-write access to \
         /dev/userfaultfd, or vm.unprivileged_userfaultfd = 1 or CAP_SYS_PTRACE for the \
         userfaultfd syscall)"
    )]
    Unavailable(#[source] io::Error),
    /// The kernel was built without userfaultfd.
    #[error("this kernel has no userfaultfd (CONFIG_USERFAULTFD)")]
    NotInKernel(#[source] io::Error),
    /// UFFDIO_API failed.
    #[error("the kernel refused the userfaultfd API handshake (UFFDIO_API with UFFD_FEATURE_EVENT_REMOVE)")]
    Api(#[source] io::Error),
    /// A region cannot be registered.
    #[error("cannot register guest memory at {gpa:#x} ({mib} MiB) with the userfaultfd")]
    Register {
        /// The region's guest physical address.
        gpa: u64,
        /// Its size in MiB.
        mib: u64,
        /// UFFDIO_REGISTER's error.
        #[source]
        source: io::Error,
    },
    /// A region of the snapshot is not in guest memory.
    #[error("guest memory has no region at {0:#x}")]
    NoRegion(u64),
    /// The handler's socket cannot be reached.
    #[error("cannot connect to the page-fault handler's socket {}", .0.display())]
    Connect(PathBuf, #[source] io::Error),
    /// The handshake cannot be sent.
    #[error("cannot send the memory mappings and the userfaultfd to the page-fault handler at {}", .0.display())]
    Send(PathBuf, #[source] io::Error),
}

/// What keeps a Uffd-backed VM's memory served: Skiff's copy of the userfaultfd and the
/// connection to the handler, both held open while the VM lives (as Firecracker does), so
/// the handler sees the connection close when the VM is gone.
#[derive(Debug)]
pub struct UffdBackend {
    _uffd: OwnedFd,
    _handler: UnixStream,
}

/// A new userfaultfd, close-on-exec and non-blocking, as Firecracker makes it (through the
/// userfaultfd crate): from `/dev/userfaultfd` when the process may open it, else by the
/// syscall (which Firecracker only tries when the device does not exist). Not user-mode only:
/// KVM's and Skiff's own accesses to guest memory must wait for the handler too.
fn create_userfaultfd() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let device = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(USERFAULTFD_DEVICE);
    if let Ok(device) = &device {
        let arg = libc::c_ulong::try_from(flags).unwrap_or_default();
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new descriptor
        // or -1; nothing of this process's memory is passed.
        let fd = unsafe { ioctl_with_val(device, USERFAULTFD_IOC_NEW, arg) };
        if fd >= 0 {
            // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        log::debug!(
            "{USERFAULTFD_DEVICE}: USERFAULTFD_IOC_NEW failed: {}",
            io::Error::last_os_error()
        );
    }
    // SAFETY: userfaultfd(2) takes its flags by value and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        let error = io::Error::last_os_error();
        let no_device = matches!(&device, Err(e) if e.kind() == io::ErrorKind::NotFound);
        return Err(if no_device && error.raw_os_error() == Some(libc::ENOSYS) {
            UffdError::NotInKernel(error)
        } else {
            UffdError::Unavailable(error)
        });
    }
    let fd = RawFd::try_from(fd).map_err(|e| UffdError::Unavailable(io::Error::other(e)))?;
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates a userfaultfd (UFFDIO_API with the features Firecracker requests), registers every
/// region of `mem` (laid out as `regions` in the memory file) with it in MISSING mode, and
/// hands both to the page-fault handler listening on `socket`. Nothing in `mem` may have
/// been touched yet; the caller may touch it once this returns, as the handler then serves it.
pub fn connect_uffd_handler(
    socket: &Path,
    mem: &GuestMemoryMmap,
    regions: &[MemoryRegionState],
) -> Result<UffdBackend, UffdError> {
    let uffd = create_userfaultfd()?;
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURE_EVENT_REMOVE,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is (repr(C), the
    // size encoded in the request), alive for the call.
    if unsafe { ioctl_with_mut_ref(&uffd, UFFDIO_API, &mut api) } < 0 {
        return Err(UffdError::Api(io::Error::last_os_error()));
    }
    let mut mappings = Vec::with_capacity(regions.len());
    for r in regions {
        let host = mem
            .find_region(GuestAddress(r.base))
            .filter(|region| vm_memory::GuestMemoryRegion::start_addr(*region).0 == r.base)
            .map(|region| region.host_base())
            .ok_or(UffdError::NoRegion(r.base))?;
        let size = usize::try_from(r.size).map_err(|_| UffdError::NoRegion(r.base))?;
        let mut register = UffdioRegister {
            range: UffdioRange {
                start: host as u64,
                len: r.size,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`, which
        // `register` is, alive for the call. The range is the region's own mapping, owned by
        // `mem`; registering changes only how its missing pages are filled.
        if unsafe { ioctl_with_mut_ref(&uffd, UFFDIO_REGISTER, &mut register) } < 0 {
            return Err(UffdError::Register {
                gpa: r.base,
                mib: r.size >> 20,
                source: io::Error::last_os_error(),
            });
        }
        mappings.push(GuestRegionUffdMapping {
            base_host_virt_addr: host as u64,
            size,
            offset: r.offset,
            page_size: PAGE_SIZE,
            page_size_kib: PAGE_SIZE,
        });
    }
    let message = handshake(&mappings);
    let handler =
        UnixStream::connect(socket).map_err(|e| UffdError::Connect(socket.to_owned(), e))?;
    let sent = handler
        .send_with_fd(message.as_bytes(), uffd.as_raw_fd())
        .map_err(|e| UffdError::Send(socket.to_owned(), io::Error::from(e)))?;
    if sent != message.len() {
        let short = io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes", message.len()),
        );
        return Err(UffdError::Send(socket.to_owned(), short));
    }
    Ok(UffdBackend {
        _uffd: uffd,
        _handler: handler,
    })
}

/// The handshake's bytes: the mappings as compact JSON, as Firecracker's `serde_json::to_string`.
fn handshake(mappings: &[GuestRegionUffdMapping]) -> String {
    // Integers only: serialising them cannot fail.
    serde_json::to_string(mappings).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // Values from a C program including linux/userfaultfd.h on x86-64.
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    }

    #[test]
    fn the_handler_gets_the_userfaultfd_and_where_each_region_is() {
        use crate::vstate::memory::memory_anonymous;
        let dir = std::env::temp_dir().join(format!("skiff-uffd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("handler.sock");
        let regions = [MemoryRegionState {
            base: 0,
            size: 2 << 20,
            offset: 0,
        }];
        let mem = memory_anonymous(&regions, false).unwrap();
        match connect_uffd_handler(&socket, &mem, &regions) {
            Err(UffdError::Connect(..)) => {}
            // An unprivileged test run: what the refusal says is all there is to check.
            Err(e @ UffdError::Unavailable(_)) => {
                let line = crate::error_chain(&e);
                assert!(
                    line.contains("CAP_SYS_PTRACE") && !line.contains('\n'),
                    "{line}"
                );
                return;
            }
            other => panic!("nothing listens on the socket, yet: {other:?}"),
        }

        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let _backend = connect_uffd_handler(&socket, &mem, &regions).unwrap();
        let (stream, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let (len, uffd) = stream.recv_with_fd(&mut buf).unwrap();
        let uffd = uffd.expect("the userfaultfd comes with the mappings");
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        assert_eq!(
            std::str::from_utf8(&buf[..len]).unwrap(),
            format!(
                "[{{\"base_host_virt_addr\":{host},\"size\":2097152,\"offset\":0,\
                 \"page_size\":4096,\"page_size_kib\":4096}}]"
            )
        );
        // A userfaultfd with nothing to report: non-blocking, as sent.
        let mut msg = [0u8; 32];
        let err = std::io::Read::read(&mut &uffd, &mut msg).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_handshake_is_firecrackers_json() {
        let mappings = [
            GuestRegionUffdMapping {
                base_host_virt_addr: 0x7f00_0000_0000,
                size: 0x800_0000,
                offset: 0,
                page_size: 4096,
                page_size_kib: 4096,
            },
            GuestRegionUffdMapping {
                base_host_virt_addr: 0x7e00_0000_0000,
                size: 0x1000_0000,
                offset: 0x800_0000,
                page_size: 4096,
                page_size_kib: 4096,
            },
        ];
        assert_eq!(
            handshake(&mappings),
            "[{\"base_host_virt_addr\":139637976727552,\"size\":134217728,\"offset\":0,\
             \"page_size\":4096,\"page_size_kib\":4096},\
             {\"base_host_virt_addr\":138538465099776,\"size\":268435456,\
             \"offset\":134217728,\"page_size\":4096,\"page_size_kib\":4096}]"
        );
    }
}
