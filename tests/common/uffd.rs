//! A page-fault handler for the Uffd memory backend, as a thread of the test process, written
//! to Firecracker's handshake rather than from Skiff's code: it listens on a Unix socket, takes
//! the one message a VMM sends (a JSON array of region mappings, the userfaultfd attached as
//! SCM_RIGHTS), and fills each page that faults from the snapshot's memory file (UFFDIO_COPY,
//! or UFFDIO_ZEROPAGE for a page of zeros) until the VMM closes the connection.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

// From include/uapi/linux/userfaultfd.h (x86-64 values).
/// `UFFD_EVENT_PAGEFAULT`.
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFDIO_COPY`, `_IOWR(0xAA, 0x03, struct uffdio_copy)`.
const UFFDIO_COPY: u64 = 0xc028_aa03;
/// `UFFDIO_ZEROPAGE`, `_IOWR(0xAA, 0x04, struct uffdio_zeropage)`.
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;

/// `struct uffd_msg` (packed in C; this field order has no padding either) as a page fault
/// fills it: `arg.pagefault.{flags, address, feat}`.
#[repr(C)]
#[derive(Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    feat: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
struct UffdioZeropage {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

/// One page, aligned as UFFDIO_COPY's source should be.
#[repr(C, align(4096))]
struct Page([u8; 4096]);

/// One entry of the handshake, with every field Firecracker v1.16 sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub base_host_virt_addr: u64,
    pub size: u64,
    pub offset: u64,
    pub page_size: u64,
    pub page_size_kib: u64,
}

/// What the handler saw.
#[derive(Debug)]
pub struct Served {
    /// The handshake's regions.
    pub mappings: Vec<Mapping>,
    /// Pages filled with UFFDIO_COPY.
    pub copied: u64,
    /// Pages filled with UFFDIO_ZEROPAGE.
    pub zeroed: u64,
}

/// The handler thread.
pub struct FaultHandler {
    filled: Arc<AtomicU64>,
    thread: JoinHandle<Result<Served, String>>,
}

impl FaultHandler {
    /// Binds `socket` (replacing a leftover) and serves the first VMM that connects within
    /// a minute from `mem_file`.
    pub fn listen(socket: &Path, mem_file: &Path) -> Self {
        let _ = std::fs::remove_file(socket);
        let listener =
            UnixListener::bind(socket).unwrap_or_else(|e| panic!("bind {}: {e}", socket.display()));
        let mem = File::open(mem_file).unwrap_or_else(|e| panic!("{}: {e}", mem_file.display()));
        let filled = Arc::new(AtomicU64::new(0));
        let count = filled.clone();
        let socket = socket.to_owned();
        let thread = std::thread::spawn(move || serve(&listener, &socket, &mem, &count));
        Self { filled, thread }
    }

    /// Pages filled so far.
    pub fn filled(&self) -> u64 {
        self.filled.load(Ordering::Relaxed)
    }

    /// Waits for the VMM to close the connection; panics with the handler's error if it had
    /// one.
    pub fn finish(self) -> Served {
        match self.thread.join() {
            Ok(Ok(served)) => served,
            Ok(Err(e)) => panic!("the page-fault handler failed: {e}"),
            Err(_) => panic!("the page-fault handler panicked"),
        }
    }
}

fn accept(listener: &UnixListener, socket: &Path) -> Result<UnixStream, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match listener.accept() {
            Ok((stream, _)) => return Ok(stream),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("no VMM connected to {}: {e}", socket.display())),
        }
    }
}

/// The handshake: one message, JSON mappings with the userfaultfd.
fn handshake(stream: &UnixStream) -> Result<(Vec<Mapping>, OwnedFd), String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let (len, file) = stream
        .recv_with_fd(&mut buf)
        .map_err(|e| format!("receiving the handshake: {e}"))?;
    let text = std::str::from_utf8(&buf[..len]).map_err(|e| e.to_string())?;
    let uffd = OwnedFd::from(file.ok_or_else(|| format!("no userfaultfd came with {text:?}"))?);
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("handshake {text:?}: {e}"))?;
    let entries = value
        .as_array()
        .ok_or_else(|| format!("the handshake is not a JSON array: {text}"))?;
    let mut mappings = Vec::new();
    for entry in entries {
        let object = entry
            .as_object()
            .ok_or_else(|| format!("not an object: {entry}"))?;
        let field = |name: &str| {
            object
                .get(name)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| format!("mapping {entry} has no integer {name}"))
        };
        let mapping = Mapping {
            base_host_virt_addr: field("base_host_virt_addr")?,
            size: field("size")?,
            offset: field("offset")?,
            page_size: field("page_size")?,
            page_size_kib: field("page_size_kib")?,
        };
        if object.len() != 5 {
            return Err(format!(
                "mapping {entry} has fields Firecracker does not send"
            ));
        }
        if !mapping.page_size.is_power_of_two() {
            return Err(format!("page_size of {entry} is not a power of two"));
        }
        mappings.push(mapping);
    }
    if mappings.is_empty() {
        return Err("the handshake has no region".to_owned());
    }
    Ok((mappings, uffd))
}

fn serve(
    listener: &UnixListener,
    socket: &Path,
    mem: &File,
    filled: &AtomicU64,
) -> Result<Served, String> {
    let stream = accept(listener, socket)?;
    let (mappings, uffd) = handshake(&stream)?;
    let mut served = Served {
        mappings,
        copied: 0,
        zeroed: 0,
    };
    let mut page = Box::new(Page([0; 4096]));
    loop {
        let mut fds = [
            libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            },
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is an array of two pollfds, alive for the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, 200) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        if fds[1].revents != 0 {
            while let Some(address) = next_fault(&uffd)? {
                match fill(&uffd, mem, &served.mappings, address, &mut page)? {
                    Filled::Copied => served.copied += 1,
                    Filled::Zeroed => served.zeroed += 1,
                    Filled::AlreadyThere => {}
                }
                filled.store(served.copied + served.zeroed, Ordering::Relaxed);
            }
        }
        if fds[0].revents != 0 {
            // The VMM sends nothing after the handshake: this is the connection closing.
            let mut byte = [0u8; 1];
            match (&stream).read(&mut byte) {
                Ok(0) => return Ok(served),
                Ok(_) => return Err("the VMM sent more than the handshake".to_owned()),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(served),
                Err(e) => return Err(format!("the connection: {e}")),
            }
        }
    }
}

/// The address of the next page fault on the (non-blocking) userfaultfd, None when none is
/// pending.
fn next_fault(uffd: &OwnedFd) -> Result<Option<u64>, String> {
    let mut msg = UffdMsg::default();
    let size = std::mem::size_of::<UffdMsg>();
    // SAFETY: `msg` is a plain struct of `size` bytes, alive and writable for the call.
    let n = unsafe { libc::read(uffd.as_raw_fd(), (&raw mut msg).cast(), size) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(format!("reading the userfaultfd: {e}")),
        };
    }
    if usize::try_from(n) != Ok(size) {
        return Err(format!("a short uffd_msg of {n} bytes"));
    }
    if msg.event != UFFD_EVENT_PAGEFAULT {
        return Err(format!("unexpected userfaultfd event {:#x}", msg.event));
    }
    Ok(Some(msg.address))
}

/// What filling a page did.
enum Filled {
    Copied,
    Zeroed,
    /// Another vCPU's fault on the same page came first.
    AlreadyThere,
}

/// Fills the page holding `address` from its place in the memory file.
fn fill(
    uffd: &OwnedFd,
    mem: &File,
    mappings: &[Mapping],
    address: u64,
    page: &mut Page,
) -> Result<Filled, String> {
    let region = mappings
        .iter()
        .find(|m| (m.base_host_virt_addr..m.base_host_virt_addr + m.size).contains(&address))
        .ok_or_else(|| format!("a fault at {address:#x} outside every region"))?;
    let len = region.page_size;
    if len != page.0.len() as u64 {
        return Err(format!("page size {len}: this handler serves 4 KiB pages"));
    }
    let dst = address & !(len - 1);
    let offset = region.offset + (dst - region.base_host_virt_addr);
    mem.read_exact_at(&mut page.0, offset)
        .map_err(|e| format!("reading the memory file at {offset:#x}: {e}"))?;
    let zero = page.0.iter().all(|&b| b == 0);
    loop {
        let ret = if zero {
            let mut zero = UffdioZeropage {
                start: dst,
                len,
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE reads and writes a `struct uffdio_zeropage`, which
            // `zero` is; it maps the zero page into the VMM, not into this process.
            unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &raw mut zero) }
        } else {
            let mut copy = UffdioCopy {
                dst,
                src: page.0.as_ptr() as u64,
                len,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads and writes a `struct uffdio_copy`, which `copy` is;
            // the kernel reads `len` bytes at `src`, which is `page`, alive for the call,
            // and writes only into the VMM's registered range.
            unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY as _, &raw mut copy) }
        };
        if ret == 0 {
            return Ok(if zero { Filled::Zeroed } else { Filled::Copied });
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EEXIST) => return Ok(Filled::AlreadyThere),
            // The mapping changed under the copy; try again.
            Some(libc::EAGAIN) => continue,
            _ => return Err(format!("filling {dst:#x}: {e}")),
        }
    }
}
