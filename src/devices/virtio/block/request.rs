//! Parsing and executing one virtio-blk request (virtio 1.2, 5.2.6): a 16-byte header the
//! device reads, data buffers, and a status byte the device writes last. Everything in the
//! chain comes from the guest and is checked: buffer direction, lengths, sector ranges.
//! Reads and writes move data between the image and guest memory directly, by `preadv` and
//! `pwritev` over the guest buffers' host addresses: no copy through Skiff's own memory. With
//! the Async engine the same iovecs go to the device's io_uring instead (see [`super::uring`]),
//! and the status is written when the request completes.

use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use log::Level;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use super::uring::{AsyncIo, Completion, Op};
use super::{ID_BYTES, SECTOR_SIZE};
use crate::devices::virtio::{split_chain, ChainBufs, GuestBuf as Buf, Handled};
use crate::metrics::{add, inc, BlockMetrics};
use crate::rate_limiter::RateLimiter;
use crate::vstate::memory::GuestMemoryMmap;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Request status values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// The request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// The request type is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// The most iovecs one `preadv`/`pwritev` takes (Linux's UIO_MAXIOV, POSIX's IOV_MAX).
const IOV_MAX: usize = 1024;

/// A request's guest buffers as host iovecs, kept by the device and reused from request to
/// request so the data path does not allocate; empty between requests.
#[derive(Default)]
pub struct IoVecs(pub(super) Vec<libc::iovec>);

// SAFETY: the iovecs are plain (address, length) pairs into guest memory, which is mapped
// as long as the VM exists and which Skiff never reaches through them: only the kernel
// dereferences them, within a Sync request, or while an Async request is in flight (the
// device waits for those before it goes). Moving them to another thread moves no access.
unsafe impl Send for IoVecs {}

impl std::fmt::Debug for IoVecs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoVecs")
            .field("capacity", &self.0.capacity())
            .finish()
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RequestHeader {
    request_type: u32,
    reserved: u32,
    sector: u64,
}

// SAFETY: plain C struct of integers, every bit pattern valid, no padding.
unsafe impl ByteValued for RequestHeader {}

/// The disk a request works on.
pub struct Disk<'a> {
    /// The image.
    pub file: &'a File,
    /// What the host calls it in log lines (the image's path).
    pub name: &'a str,
    /// Size in sectors.
    pub nsectors: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// The drive id returned by GET_ID.
    pub id: &'a [u8; ID_BYTES],
    /// Storage for the iovecs of a read or write.
    pub iovecs: &'a mut IoVecs,
    /// The device's counters.
    pub metrics: &'a BlockMetrics,
    /// Storage for the chain's buffers, reused from request to request.
    pub chain: &'a mut ChainBufs,
    /// The Async engine's ring, which takes reads, writes and flushes; None for Sync.
    pub engine: Option<&'a mut AsyncIo>,
}

/// Where an Async request's answer goes when it completes.
#[derive(Clone, Copy)]
struct Answer {
    head: u16,
    status_addr: u64,
}

/// Runs the request in `chain` and returns the bytes written to the guest (status included).
/// A chain too broken to hold a status byte returns 0 and writes nothing. A request the rate
/// limiter holds back is [`Handled::Deferred`] and has not been touched.
pub fn execute(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    disk: &mut Disk<'_>,
    limiter: &mut RateLimiter,
) -> Handled {
    // A full ring takes nothing more: the chain waits on the available ring for a completion.
    if disk.engine.as_ref().is_some_and(|e| e.is_full()) {
        inc(&disk.metrics.io_engine_throttled_events);
        return Handled::Deferred;
    }
    // Borrowed out of `disk` for the request (moving a Vec does not allocate), then returned.
    let mut bufs = std::mem::take(&mut *disk.chain);
    let handled = execute_split(chain, mem, disk, limiter, &mut bufs);
    *disk.chain = bufs;
    handled
}

fn execute_split(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    disk: &mut Disk<'_>,
    limiter: &mut RateLimiter,
    bufs: &mut ChainBufs,
) -> Handled {
    let head = chain.head_index();
    if !split_chain(chain, bufs) {
        inc(&disk.metrics.invalid_requests);
        return Handled::Used(0);
    }
    // The last writable byte is the status.
    let ChainBufs { readable, writable } = bufs;
    let Some(status_buf) = writable.last_mut().filter(|b| b.len > 0) else {
        inc(&disk.metrics.invalid_requests);
        return Handled::Used(0);
    };
    // A status byte at the very top of the address space, past which the buffer would wrap.
    let Some(status_addr) = status_buf.addr.checked_add(u64::from(status_buf.len - 1)) else {
        inc(&disk.metrics.invalid_requests);
        return Handled::Used(0);
    };
    status_buf.len -= 1;
    let mut header = RequestHeader::default();
    let status = if read_exact(mem, readable, 0, header.as_mut_slice()).is_err() {
        Err(VIRTIO_BLK_S_IOERR)
    } else {
        // One op, and the bytes of a read or write (as Firecracker counts them).
        if !limiter.consume_op(data_len(&header, readable, writable, disk.nsectors)) {
            inc(&disk.metrics.rate_limiter_throttled_events);
            return Handled::Deferred;
        }
        let answer = Answer { head, status_addr };
        run(mem, &header, readable, writable, disk, answer)
    };
    let (data_written, status) = match status {
        Ok(None) => return Handled::Held,
        Ok(Some(n)) => (n, VIRTIO_BLK_S_OK),
        Err(s) => {
            inc(if s == VIRTIO_BLK_S_UNSUPP {
                &disk.metrics.invalid_requests
            } else {
                &disk.metrics.io_errors
            });
            (0, s)
        }
    };
    if mem.write_obj(status, GuestAddress(status_addr)).is_err() {
        return Handled::Used(0);
    }
    Handled::Used(
        u32::try_from(data_written)
            .unwrap_or(u32::MAX)
            .saturating_add(1),
    )
}

/// The bytes a request moves, for its rate limiter: the data of a read or write that fits on
/// the disk; 0 for other requests, and for one that fails its range check without I/O.
fn data_len(header: &RequestHeader, readable: &[Buf], writable: &[Buf], nsectors: u64) -> u64 {
    let header_len = std::mem::size_of::<RequestHeader>() as u64;
    let len = match header.request_type {
        VIRTIO_BLK_T_IN => total(writable),
        VIRTIO_BLK_T_OUT => total(readable).saturating_sub(header_len),
        _ => return 0,
    };
    if check_range(header.sector, len, nsectors).is_ok() {
        len
    } else {
        0
    }
}

/// Executes a parsed request: Ok(bytes written to the guest), Ok(None) for one handed to the
/// Async engine (answered when it completes), or the failure status.
fn run(
    mem: &GuestMemoryMmap,
    header: &RequestHeader,
    readable: &[Buf],
    writable: &[Buf],
    disk: &mut Disk<'_>,
    answer: Answer,
) -> Result<Option<u64>, u8> {
    let header_len = std::mem::size_of::<RequestHeader>() as u64;
    match header.request_type {
        VIRTIO_BLK_T_IN => {
            let len = total(writable);
            let offset = check_range(header.sector, len, disk.nsectors)?;
            if disk.engine.is_some() {
                return submit_rw(mem, writable, 0, len, disk, offset, Op::Read, answer);
            }
            copy_file_to_guest(mem, writable, disk, offset, len)?;
            inc(&disk.metrics.read_count);
            add(&disk.metrics.read_bytes, len);
            Ok(Some(len))
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only {
                return Err(VIRTIO_BLK_S_IOERR);
            }
            let len = total(readable).saturating_sub(header_len);
            let offset = check_range(header.sector, len, disk.nsectors)?;
            if disk.engine.is_some() {
                let op = Op::Write;
                return submit_rw(mem, readable, header_len, len, disk, offset, op, answer);
            }
            copy_guest_to_file(mem, readable, header_len, disk, offset, len)?;
            inc(&disk.metrics.write_count);
            add(&disk.metrics.write_bytes, len);
            Ok(Some(0))
        }
        VIRTIO_BLK_T_FLUSH => {
            if let (Some(engine), false) = (disk.engine.as_mut(), disk.read_only) {
                let fd = disk.file.as_raw_fd();
                engine
                    .push_flush(fd, answer.head, answer.status_addr)
                    .map_err(|()| VIRTIO_BLK_S_IOERR)?;
                return Ok(None);
            }
            if !disk.read_only {
                disk.file.sync_data().map_err(|e| {
                    host_error(disk.name, "flush", &disk.metrics.host_flush_errors, &e)
                })?;
            }
            inc(&disk.metrics.flush_count);
            Ok(Some(0))
        }
        VIRTIO_BLK_T_GET_ID => {
            let n = usize::try_from(total(writable))
                .unwrap_or(ID_BYTES)
                .min(ID_BYTES);
            write_guest(mem, writable, 0, &disk.id[..n])?;
            inc(&disk.metrics.get_id_count);
            Ok(Some(n as u64))
        }
        _ => Err(VIRTIO_BLK_S_UNSUPP),
    }
}

/// Hands a read or write of `len` bytes at image `offset` to the Async engine: the iovecs are
/// built (and checked, and a read's pages marked dirty) now, as for Sync.
#[allow(clippy::too_many_arguments)]
fn submit_rw(
    mem: &GuestMemoryMmap,
    bufs: &[Buf],
    skip: u64,
    len: u64,
    disk: &mut Disk<'_>,
    offset: u64,
    op: Op,
    answer: Answer,
) -> Result<Option<u64>, u8> {
    let iov = &mut disk.iovecs.0;
    let built = guest_iovecs(mem, bufs, skip, len, op == Op::Read, iov);
    if let Err(status) = built {
        iov.clear();
        return Err(status);
    }
    if len == 0 {
        // Nothing to move: done now, as Sync does it.
        iov.clear();
        let (count, bytes) = if op == Op::Read {
            (&disk.metrics.read_count, &disk.metrics.read_bytes)
        } else {
            (&disk.metrics.write_count, &disk.metrics.write_bytes)
        };
        inc(count);
        add(bytes, 0);
        return Ok(Some(0));
    }
    let fd = disk.file.as_raw_fd();
    let Some(engine) = disk.engine.as_mut() else {
        return Err(VIRTIO_BLK_S_IOERR);
    };
    engine
        .push_rw(fd, answer.head, answer.status_addr, op, offset, disk.iovecs)
        .map_err(|()| VIRTIO_BLK_S_IOERR)?;
    Ok(None)
}

/// Accounts a finished Async request as Sync accounts one, and returns the status for the
/// guest and the data bytes it was given.
pub fn complete(c: &Completion, name: &str, metrics: &BlockMetrics) -> (u8, u32) {
    let (count, bytes, host_errors, what) = match c.op {
        Op::Read => (
            &metrics.read_count,
            Some(&metrics.read_bytes),
            &metrics.host_read_errors,
            "read",
        ),
        Op::Write => (
            &metrics.write_count,
            Some(&metrics.write_bytes),
            &metrics.host_write_errors,
            "write",
        ),
        Op::Flush => (
            &metrics.flush_count,
            None,
            &metrics.host_flush_errors,
            "flush",
        ),
    };
    match c.result {
        Ok(n) => {
            inc(count);
            if let Some(bytes) = bytes {
                add(bytes, n);
            }
            let given = if c.op == Op::Read { n } else { 0 };
            (VIRTIO_BLK_S_OK, u32::try_from(given).unwrap_or(u32::MAX))
        }
        Err(errno) => {
            let e = std::io::Error::from_raw_os_error(errno);
            inc(&metrics.io_errors);
            (host_error(name, what, host_errors, &e), 0)
        }
    }
}

/// A read, write or flush of the image failed on the host: the guest gets IOERR, the first
/// failure of each kind on each disk is logged with its cause, later ones are counted (and
/// logged at debug level, rate-limited: a guest can repeat them at will).
fn host_error(name: &str, op: &str, count: &AtomicU64, e: &std::io::Error) -> u8 {
    if count.fetch_add(1, Ordering::Relaxed) == 0 {
        log::warn!(
            "disk {name}: {op} failed: {e}; the guest gets an I/O error (later failures are \
             counted in the metrics as host_{op}_errors)"
        );
    } else {
        crate::guest_log!(Level::Debug, "disk {name}: {op} failed: {e}");
    }
    VIRTIO_BLK_S_IOERR
}

fn total(bufs: &[Buf]) -> u64 {
    bufs.iter().map(|b| u64::from(b.len)).sum()
}

/// Byte offset of `sector`, if `len` bytes from there fit on the disk and `len` is whole sectors.
fn check_range(sector: u64, len: u64, nsectors: u64) -> Result<u64, u8> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    let end = sector
        .checked_add(len / SECTOR_SIZE)
        .ok_or(VIRTIO_BLK_S_IOERR)?;
    if end > nsectors {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    sector.checked_mul(SECTOR_SIZE).ok_or(VIRTIO_BLK_S_IOERR)
}

/// Calls `f(guest address, length)` for the bytes `skip..skip + len` of `bufs`, one piece per
/// buffer; IOERR if the buffers hold fewer bytes or an address wraps.
fn for_each_piece(
    bufs: &[Buf],
    mut skip: u64,
    mut len: u64,
    mut f: impl FnMut(u64, usize) -> Result<(), u8>,
) -> Result<(), u8> {
    for b in bufs {
        if len == 0 {
            break;
        }
        let blen = u64::from(b.len);
        if skip >= blen {
            skip -= blen;
            continue;
        }
        let addr = b.addr.checked_add(skip).ok_or(VIRTIO_BLK_S_IOERR)?;
        let n = (blen - skip).min(len);
        skip = 0;
        len -= n;
        f(addr, usize::try_from(n).map_err(|_| VIRTIO_BLK_S_IOERR)?)?;
    }
    if len == 0 {
        Ok(())
    } else {
        Err(VIRTIO_BLK_S_IOERR)
    }
}

fn read_exact(mem: &GuestMemoryMmap, bufs: &[Buf], skip: u64, out: &mut [u8]) -> Result<(), u8> {
    let mut at = 0;
    for_each_piece(bufs, skip, out.len() as u64, |addr, n| {
        mem.read_slice(&mut out[at..at + n], GuestAddress(addr))
            .map_err(|_| VIRTIO_BLK_S_IOERR)?;
        at += n;
        Ok(())
    })
}

fn write_guest(mem: &GuestMemoryMmap, bufs: &[Buf], skip: u64, data: &[u8]) -> Result<(), u8> {
    let mut at = 0;
    for_each_piece(bufs, skip, data.len() as u64, |addr, n| {
        mem.write_slice(&data[at..at + n], GuestAddress(addr))
            .map_err(|_| VIRTIO_BLK_S_IOERR)?;
        at += n;
        Ok(())
    })
}

/// Fills `iov` with the host addresses of the bytes `skip..skip + len` of `bufs`, a buffer
/// split where it crosses from one guest memory region into the next. Every byte must be
/// memory Skiff may use (vm-memory's `get_slice` checks the range lies in a region and, in the
/// hot-plug region, in plugged blocks): anything else is IOERR before any I/O. With
/// `device_writes`, the pages are marked in the memory's dirty bitmap, as the kernel is about
/// to write them behind vm-memory's back (KVM's dirty log sees only the guest's own writes).
fn guest_iovecs(
    mem: &GuestMemoryMmap,
    bufs: &[Buf],
    skip: u64,
    len: u64,
    device_writes: bool,
    iov: &mut Vec<libc::iovec>,
) -> Result<(), u8> {
    iov.clear();
    for_each_piece(bufs, skip, len, |addr, n| {
        for slice in mem.get_slices(GuestAddress(addr), n) {
            let slice = slice.map_err(|_| VIRTIO_BLK_S_IOERR)?;
            if device_writes {
                slice.bitmap().mark_dirty(0, slice.len());
            }
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
        Ok(())
    })
}

/// Reads the image at `pos` into `iov` (or, with `write`, writes `iov` there) whole: at most
/// [`IOV_MAX`] iovecs a call, and again after a short transfer. An image that ends first is
/// `UnexpectedEof`; a device that takes nothing, `WriteZero`.
fn transfer(
    file: &File,
    iov: &mut [libc::iovec],
    mut pos: u64,
    write: bool,
) -> std::io::Result<()> {
    let mut at = 0;
    while at < iov.len() {
        let batch = &iov[at..iov.len().min(at + IOV_MAX)];
        let offset = libc::off_t::try_from(pos)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // At most IOV_MAX, so it fits a c_int.
        let count = libc::c_int::try_from(batch.len()).unwrap_or(0);
        // SAFETY: each iovec is a range of guest memory that `guest_iovecs` checked lies in
        // one mapped region and is accessible (RAM, or plugged hot-plug blocks), minus what
        // earlier calls consumed. The caller borrows the memory for the whole request, so
        // the mappings stay; plugging and unplugging run on this same thread, so no block
        // changes state during the call. The kernel reads or writes those bytes and nothing
        // else; Skiff holds no Rust reference to them (the guest may touch them at the same
        // time, as with any DMA).
        let n = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), batch.as_ptr(), count, offset)
            } else {
                libc::preadv(file.as_raw_fd(), batch.as_ptr(), count, offset)
            }
        };
        let mut n = match usize::try_from(n) {
            Ok(0) if write => return Err(ErrorKind::WriteZero.into()),
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
        };
        pos += n as u64;
        // Past what moved: whole iovecs (none is empty), then the front of a partial one.
        while at < iov.len() && n >= iov[at].iov_len {
            n -= iov[at].iov_len;
            at += 1;
        }
        if n > 0 {
            let partial = &mut iov[at];
            partial.iov_base = partial.iov_base.cast::<u8>().wrapping_add(n).cast();
            partial.iov_len -= n;
        }
    }
    Ok(())
}

fn copy_file_to_guest(
    mem: &GuestMemoryMmap,
    bufs: &[Buf],
    disk: &mut Disk<'_>,
    offset: u64,
    len: u64,
) -> Result<(), u8> {
    let iov = &mut disk.iovecs.0;
    let moved = guest_iovecs(mem, bufs, 0, len, true, iov).and_then(|()| {
        transfer(disk.file, iov, offset, false)
            .map_err(|e| host_error(disk.name, "read", &disk.metrics.host_read_errors, &e))
    });
    iov.clear();
    moved
}

fn copy_guest_to_file(
    mem: &GuestMemoryMmap,
    bufs: &[Buf],
    skip: u64,
    disk: &mut Disk<'_>,
    offset: u64,
    len: u64,
) -> Result<(), u8> {
    let iov = &mut disk.iovecs.0;
    let moved = guest_iovecs(mem, bufs, skip, len, false, iov).and_then(|()| {
        transfer(disk.file, iov, offset, true)
            .map_err(|e| host_error(disk.name, "write", &disk.metrics.host_write_errors, &e))
    });
    iov.clear();
    moved
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write as _;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x3000;

    fn mem() -> GuestMemoryMmap {
        crate::vstate::memory::anonymous(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// An 8-sector image whose byte i is i % 251.
    fn image() -> File {
        image_of(8 * 512)
    }

    /// An unlinked image of `len` bytes whose byte i is i % 251 (the io_uring tests' too).
    pub(crate) fn image_of(len: usize) -> File {
        let path = std::env::temp_dir().join(format!(
            "skiff-blk-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let bytes: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect();
        f.write_all(&bytes).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn header(m: &GuestMemoryMmap, request_type: u32, sector: u64) {
        m.write_obj(
            RequestHeader {
                request_type,
                reserved: 0,
                sector,
            },
            GuestAddress(HDR),
        )
        .unwrap();
    }

    /// Header, one data buffer at `data` of `len` bytes (device-writable if `data_in`), status.
    fn request(data: u64, len: u32, data_in: bool) -> [RawDescriptor; 3] {
        let flags = if data_in { F_WRITE } else { 0 };
        [
            desc(HDR, 16, 0, 0),
            desc(data, len, flags, 0),
            desc(STATUS, 1, F_WRITE, 0),
        ]
    }

    /// Runs the chain `descs` (next links set by the mock) and returns (used length, status byte).
    fn run_chain(m: &GuestMemoryMmap, descs: &[RawDescriptor], read_only: bool) -> (u32, u8) {
        run_chain_on(m, descs, &image(), read_only, &BlockMetrics::default())
    }

    /// [`run_chain`] on an 8-sector disk backed by `file`, counting in `metrics`.
    fn run_chain_on(
        m: &GuestMemoryMmap,
        descs: &[RawDescriptor],
        file: &File,
        read_only: bool,
        metrics: &BlockMetrics,
    ) -> (u32, u8) {
        let mut limiter = RateLimiter::unlimited().unwrap();
        match run_limited(m, descs, file, read_only, metrics, &mut limiter) {
            (Handled::Used(len), status) => (len, status),
            (other, _) => panic!("an unlimited request was not used: {other:?}"),
        }
    }

    /// [`run_chain_on`] under `limiter`.
    fn run_limited(
        m: &GuestMemoryMmap,
        descs: &[RawDescriptor],
        file: &File,
        read_only: bool,
        metrics: &BlockMetrics,
        limiter: &mut RateLimiter,
    ) -> (Handled, u8) {
        m.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let vq = MockSplitQueue::new(m, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        let id = [b'x'; ID_BYTES];
        let mut iovecs = IoVecs::default();
        let mut disk = Disk {
            file,
            name: "test.img",
            nsectors: 8,
            read_only,
            id: &id,
            iovecs: &mut iovecs,
            metrics,
            chain: &mut ChainBufs::default(),
            engine: None,
        };
        let handled = execute(chain, m, &mut disk, limiter);
        (handled, m.read_obj(GuestAddress(STATUS)).unwrap())
    }

    /// A read costs one op and its bytes, a flush one op; a request the limiter holds back is
    /// left untouched (no status, no data) and counted; one that fails its range check
    /// costs no bytes.
    #[test]
    fn requests_pay_their_ops_and_bytes_or_wait() {
        use crate::config::{RateLimiterConfig, TokenBucketConfig};
        let m = mem();
        let file = image();
        let metrics = BlockMetrics::default();
        let slow = |size| TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time: 3_600_000,
        };
        let mut limiter = RateLimiter::new(&RateLimiterConfig {
            bandwidth: Some(slow(1536)),
            ops: Some(slow(4)),
        })
        .unwrap();
        header(&m, VIRTIO_BLK_T_IN, 7);
        let read = request(DATA, 1024, true); // past the end: IOERR, no bytes
        let (handled, status) = run_limited(&m, &read, &file, false, &metrics, &mut limiter);
        assert_eq!((handled, status), (Handled::Used(1), VIRTIO_BLK_S_IOERR));
        assert_eq!(limiter.bandwidth().unwrap().budget(), 1536);
        header(&m, VIRTIO_BLK_T_IN, 0);
        let (handled, _) = run_limited(&m, &read, &file, false, &metrics, &mut limiter);
        assert_eq!(handled, Handled::Used(1025));
        assert_eq!(limiter.bandwidth().unwrap().budget(), 512);
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let flush = [desc(HDR, 16, 0, 0), desc(STATUS, 1, F_WRITE, 0)];
        let (handled, _) = run_limited(&m, &flush, &file, false, &metrics, &mut limiter);
        assert_eq!(handled, Handled::Used(1));
        assert_eq!(limiter.ops().unwrap().budget(), 1);
        header(&m, VIRTIO_BLK_T_IN, 0);
        m.write_slice(&[0xaa; 1024], GuestAddress(DATA)).unwrap();
        let (handled, status) = run_limited(&m, &read, &file, false, &metrics, &mut limiter);
        assert_eq!((handled, status), (Handled::Deferred, 0xee));
        let mut data = [0u8; 1024];
        m.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert_eq!(data, [0xaa; 1024], "nothing read");
        assert!(limiter.is_blocked());
        assert_eq!(limiter.ops().unwrap().budget(), 1, "the op is not spent");
        assert_eq!(metrics.to_json()["rate_limiter_throttled_events"], 1);
        assert_eq!(metrics.to_json()["read_count"], 1);
    }

    /// The image shrank under the device (truncated on the host) and the host disk is full:
    /// the guest gets IOERR and the host's counters say which kind of failure it was.
    #[test]
    fn host_io_failures_reach_the_guest_and_are_counted() {
        let m = mem();
        let metrics = BlockMetrics::default();
        let truncated = image();
        truncated.set_len(512).unwrap();
        header(&m, VIRTIO_BLK_T_IN, 4);
        for _ in 0..3 {
            let (_, status) =
                run_chain_on(&m, &request(DATA, 512, true), &truncated, false, &metrics);
            assert_eq!(status, VIRTIO_BLK_S_IOERR);
        }
        let full = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/full")
            .unwrap();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let (_, status) = run_chain_on(&m, &request(DATA, 512, false), &full, false, &metrics);
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
        let counts = metrics.to_json();
        assert_eq!(counts["host_read_errors"], 3);
        assert_eq!(counts["host_write_errors"], 1);
        assert_eq!(counts["host_flush_errors"], 0);
        assert_eq!(counts["io_errors"], 4);
    }

    /// The Async engine: a read, a write and a flush are handed to the ring (Held: no status
    /// yet), and their completions carry the status, the used length and Sync's counters; a
    /// buffer outside guest memory and a read-only write are IOERR at once, before the ring.
    #[test]
    fn async_requests_complete_through_the_ring_as_sync_ones_do() {
        let m = mem();
        let file = image();
        let metrics = BlockMetrics::default();
        let mut engine = AsyncIo::new().unwrap();
        let id = [b'x'; ID_BYTES];
        let mut iovecs = IoVecs::default();
        let mut chain = ChainBufs::default();
        let mut limiter = RateLimiter::unlimited().unwrap();
        let mut go = |descs: &[RawDescriptor], read_only: bool, engine: &mut AsyncIo| {
            m.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
            let vq = MockSplitQueue::new(&m, 16);
            let mut disk = Disk {
                file: &file,
                name: "test.img",
                nsectors: 8,
                read_only,
                id: &id,
                iovecs: &mut iovecs,
                metrics: &metrics,
                chain: &mut chain,
                engine: Some(engine),
            };
            let handled = execute(
                vq.build_desc_chain(descs).unwrap(),
                &m,
                &mut disk,
                &mut limiter,
            );
            (handled, m.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
        };
        let finish = |engine: &mut AsyncIo| {
            engine.submit().unwrap();
            let mut done = Vec::new();
            engine.wait_all(file.as_raw_fd(), |c| {
                done.push(complete(&c, "test.img", &metrics));
            });
            done
        };
        header(&m, VIRTIO_BLK_T_IN, 2);
        assert_eq!(
            go(&request(DATA, 1024, true), false, &mut engine),
            (Handled::Held, 0xee)
        );
        assert_eq!(finish(&mut engine), [(VIRTIO_BLK_S_OK, 1024)]);
        let mut data = [0u8; 1024];
        m.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert_eq!(data.to_vec(), image_bytes(1024, 1024));

        m.write_slice(&[0x42; 512], GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_OUT, 7);
        assert_eq!(
            go(&request(DATA, 512, false), false, &mut engine).0,
            Handled::Held
        );
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let flush = [desc(HDR, 16, 0, 0), desc(STATUS, 1, F_WRITE, 0)];
        assert_eq!(go(&flush, false, &mut engine).0, Handled::Held);
        assert_eq!(
            finish(&mut engine),
            [(VIRTIO_BLK_S_OK, 0), (VIRTIO_BLK_S_OK, 0)]
        );
        let mut on_disk = [0u8; 512];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut on_disk, 7 * 512).unwrap();
        assert_eq!(on_disk, [0x42; 512]);

        header(&m, VIRTIO_BLK_T_IN, 0);
        let outside = go(&request(0xffff_0000, 512, true), false, &mut engine);
        assert_eq!(outside, (Handled::Used(1), VIRTIO_BLK_S_IOERR));
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let refused = go(&request(DATA, 512, false), true, &mut engine);
        assert_eq!(refused, (Handled::Used(1), VIRTIO_BLK_S_IOERR));
        assert_eq!(engine.in_flight(), 0);
        let counts = metrics.to_json();
        assert_eq!(
            (
                counts["read_count"].as_u64(),
                counts["write_count"].as_u64()
            ),
            (Some(1), Some(1))
        );
        assert_eq!(counts["flush_count"], 1);
        assert_eq!(counts["read_bytes"], 1024);
        assert_eq!(counts["io_errors"], 2);
    }

    /// A status buffer whose last byte's address wraps past the top of the address space is
    /// refused; the wrapped address (here STATUS) used to receive the status.
    #[test]
    fn status_address_that_wraps_is_refused() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let len = 0x4000u32;
        let addr = STATUS.wrapping_sub(u64::from(len) - 1);
        assert!(addr > STATUS, "wraps");
        let descs = [
            desc(HDR, 16, 0, 0),
            desc(DATA, 512, F_WRITE, 0),
            desc(addr, len, F_WRITE, 0),
        ];
        let (used, status) = run_chain(&m, &descs, false);
        assert_eq!(used, 0);
        assert_eq!(status, 0xee, "nothing written at the wrapped address");
    }

    /// Guest memory of two adjacent 1 MiB regions, each with a dirty bitmap.
    fn two_regions() -> GuestMemoryMmap {
        use crate::vstate::memory::{memory_anonymous, MemoryRegionState};
        let region = |base| MemoryRegionState {
            base,
            size: 0x10_0000,
            offset: 0,
        };
        memory_anonymous(&[region(0), region(0x10_0000)], true).unwrap()
    }

    /// The dirty pages of the region at `base`, among its first `pages`, as page indices.
    fn dirty_pages(m: &GuestMemoryMmap, base: u64, pages: usize) -> Vec<usize> {
        let region = m.find_region(GuestAddress(base)).unwrap();
        let mmap = region.get_mmap();
        let bitmap = mmap.bitmap().as_ref().unwrap();
        (0..pages).filter(|&p| bitmap.dirty_at(p * 4096)).collect()
    }

    /// Bytes `from..from + len` of [`image`].
    fn image_bytes(from: usize, len: usize) -> Vec<u8> {
        (from..from + len)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect()
    }

    /// More iovecs than one call takes, and a read that ends inside an iovec: the rest goes in
    /// later calls, from where the last one stopped; an image that ends first is EOF.
    #[test]
    fn transfers_go_on_past_iov_max_and_short_reads() {
        let file = image();
        let mut host = vec![0u8; 5000];
        let iovecs = |host: &mut [u8], piece: usize| -> Vec<libc::iovec> {
            host.chunks_mut(piece)
                .map(|c| libc::iovec {
                    iov_base: c.as_mut_ptr().cast(),
                    iov_len: c.len(),
                })
                .collect()
        };
        let mut iov = iovecs(&mut host[..4000], 2);
        assert!(iov.len() > IOV_MAX);
        transfer(&file, &mut iov, 96, false).unwrap();
        assert_eq!(host[..4000], image_bytes(96, 4000)[..]);

        host.fill(0);
        let mut iov = iovecs(&mut host, 5);
        let err = transfer(&file, &mut iov, 0, false).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
        assert_eq!(host[..4096], image_bytes(0, 4096)[..]);

        let pattern: Vec<u8> = (0..3000u32).map(|i| (i % 13).to_le_bytes()[0]).collect();
        host[..3000].copy_from_slice(&pattern);
        let mut iov = iovecs(&mut host[..3000], 1);
        transfer(&file, &mut iov, 1000, true).unwrap();
        let mut on_disk = vec![0u8; 3000];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut on_disk, 1000).unwrap();
        assert_eq!(on_disk, pattern);
    }

    /// A buffer that runs from one guest memory region into the next is read into and written
    /// from whole: vm-memory gives one host range per region, and both take part.
    #[test]
    fn buffers_spanning_two_regions_are_read_and_written_whole() {
        let m = two_regions();
        assert_eq!(m.num_regions(), 2);
        let file = image();
        let metrics = BlockMetrics::default();
        let across = 0x10_0000 - 0x600;
        header(&m, VIRTIO_BLK_T_IN, 1);
        let descs = [
            desc(HDR, 16, 0, 0),
            desc(across, 2048, F_WRITE, 0),
            desc(DATA, 1024, F_WRITE, 0),
            desc(STATUS, 1, F_WRITE, 0),
        ];
        let (len, status) = run_chain_on(&m, &descs, &file, false, &metrics);
        assert_eq!((len, status), (3073, VIRTIO_BLK_S_OK));
        let mut got = vec![0u8; 2048];
        m.read_slice(&mut got, GuestAddress(across)).unwrap();
        assert_eq!(got, image_bytes(512, 2048));
        got.resize(1024, 0);
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, image_bytes(2560, 1024));

        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7).to_le_bytes()[0]).collect();
        m.write_slice(&pattern, GuestAddress(0x10_0000 - 0x100))
            .unwrap();
        header(&m, VIRTIO_BLK_T_OUT, 6);
        let descs = [
            desc(HDR, 16, 0, 0),
            desc(0x10_0000 - 0x100, 1024, 0, 0),
            desc(STATUS, 1, F_WRITE, 0),
        ];
        let (len, status) = run_chain_on(&m, &descs, &file, false, &metrics);
        assert_eq!((len, status), (1, VIRTIO_BLK_S_OK));
        let mut on_disk = vec![0u8; 1024];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut on_disk, 6 * 512).unwrap();
        assert_eq!(on_disk, pattern);
        assert_eq!(metrics.to_json()["io_errors"], 0);
    }

    /// Buffers in the hot-plug region's unplugged blocks (PROT_NONE on the host), running from
    /// a plugged block into an unplugged one, or outside guest memory after a good buffer: the
    /// guest gets IOERR and Skiff does not fault; nothing is read or written, not even the
    /// good buffer.
    #[test]
    fn buffers_in_unplugged_or_unmapped_memory_fail_without_a_fault() {
        use crate::vstate::memory::add_hotplug_region;
        use crate::vstate::region::PLUG_UNIT;
        let hot = 1u64 << 32;
        let m = add_hotplug_region(&mem(), hot, 2 * PLUG_UNIT, false).unwrap();
        m.find_region(GuestAddress(hot))
            .unwrap()
            .plug(0, PLUG_UNIT)
            .unwrap();
        let file = image();
        let metrics = BlockMetrics::default();
        let into_unplugged = hot + PLUG_UNIT - 512;
        for (addr, data_in) in [
            (hot + PLUG_UNIT, true),
            (into_unplugged, true),
            (hot + PLUG_UNIT, false),
            (into_unplugged, false),
        ] {
            header(
                &m,
                if data_in {
                    VIRTIO_BLK_T_IN
                } else {
                    VIRTIO_BLK_T_OUT
                },
                0,
            );
            let (_, status) =
                run_chain_on(&m, &request(addr, 1024, data_in), &file, false, &metrics);
            assert_eq!(status, VIRTIO_BLK_S_IOERR, "{addr:#x} in: {data_in}");
        }
        m.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let descs = [
            desc(HDR, 16, 0, 0),
            desc(DATA, 512, F_WRITE, 0),
            desc(0x20_0000, 512, F_WRITE, 0),
            desc(STATUS, 1, F_WRITE, 0),
        ];
        let (_, status) = run_chain_on(&m, &descs, &file, false, &metrics);
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
        let mut data = [0u8; 512];
        m.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert_eq!(data, [0xaa; 512], "the good buffer is not read into");
        let mut on_disk = vec![0u8; 1024];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut on_disk, 0).unwrap();
        assert_eq!(on_disk, image_bytes(0, 1024), "nothing written");
        // The plugged block works as any memory.
        header(&m, VIRTIO_BLK_T_IN, 2);
        let (_, status) = run_chain_on(&m, &request(hot + 8, 512, true), &file, false, &metrics);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        m.read_slice(&mut data, GuestAddress(hot + 8)).unwrap();
        assert_eq!(data.to_vec(), image_bytes(1024, 512));
        let counts = metrics.to_json();
        assert_eq!(counts["io_errors"], 5);
        assert_eq!(counts["host_read_errors"], 0);
        assert_eq!(counts["host_write_errors"], 0);
    }

    /// The kernel fills a read's buffers behind vm-memory's back: their pages, and only
    /// theirs, are marked in the dirty bitmap (which diff snapshots take with KVM's log), in
    /// each region a buffer touches. A write's buffers are only read: not marked.
    #[test]
    fn read_marks_the_pages_it_fills_dirty() {
        let m = two_regions();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let write = request(0x7000, 512, false);
        let (_, status) = run_chain(&m, &write, false);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert!(
            !dirty_pages(&m, 0, 256).contains(&7),
            "a write's buffer stays clean"
        );

        header(&m, VIRTIO_BLK_T_IN, 0);
        let descs = [
            desc(HDR, 16, 0, 0),
            desc(0x4e00, 1024, F_WRITE, 0),
            desc(0x10_0000 - 0x200, 1024, F_WRITE, 0),
            desc(STATUS, 1, F_WRITE, 0),
        ];
        let (_, status) = run_chain(&m, &descs, false);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        // The mock queue's rings (0), header (1) and status (3) through vm-memory; the
        // data: 4, 5, 255, and the next region's 0.
        assert_eq!(dirty_pages(&m, 0, 256), [0, 1, 3, 4, 5, 255]);
        assert_eq!(dirty_pages(&m, 0x10_0000, 256), [0]);
    }

    #[test]
    fn read_returns_the_sector() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 1);
        let (len, status) = run_chain(&m, &request(DATA, 512, true), false);
        assert_eq!((len, status), (513, VIRTIO_BLK_S_OK));
        let mut data = [0u8; 512];
        m.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert!(data
            .iter()
            .enumerate()
            .all(|(i, b)| usize::from(*b) == (512 + i) % 251));
    }

    #[test]
    fn write_to_read_only_disk_fails() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let (_, status) = run_chain(&m, &request(DATA, 512, false), true);
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn past_the_end_partial_sectors_and_huge_lengths_fail() {
        let m = mem();
        for (sector, len) in [(8, 512), (7, 1024), (0, 100), (u64::MAX, 512)] {
            header(&m, VIRTIO_BLK_T_IN, sector);
            let (_, status) = run_chain(&m, &request(DATA, len, true), false);
            assert_eq!(status, VIRTIO_BLK_S_IOERR, "sector {sector} len {len}");
        }
        // A length running past guest memory: virtio-queue ends the chain there, so the
        // request is dropped without a status; either way nothing succeeds.
        header(&m, VIRTIO_BLK_T_IN, 0);
        let huge = [
            desc(HDR, 16, 0, 0),
            desc(DATA, u32::MAX, F_WRITE, 0),
            desc(STATUS, 1, F_WRITE, 0),
        ];
        assert_ne!(run_chain(&m, &huge, false).1, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn short_header_fails() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let (_, status) = run_chain(
            &m,
            &[desc(HDR, 8, 0, 0), desc(STATUS, 1, F_WRITE, 0)],
            false,
        );
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn buffer_outside_guest_memory_fails_without_writing() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let (_, status) = run_chain(&m, &request(0xffff_0000, 512, true), false);
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn chain_without_status_or_with_wrong_direction_is_dropped() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let (len, status) = run_chain(&m, &[desc(HDR, 16, 0, 0), desc(DATA, 512, 0, 0)], false);
        assert_eq!((len, status), (0, 0xee));
        let (len, status) = run_chain(
            &m,
            &[
                desc(HDR, 16, 0, 0),
                desc(DATA, 512, F_WRITE, 0),
                desc(STATUS, 1, 0, 0),
            ],
            false,
        );
        assert_eq!((len, status), (0, 0xee));
    }

    #[test]
    fn unknown_request_type_is_unsupported() {
        let m = mem();
        header(&m, 77, 0);
        let (_, status) = run_chain(
            &m,
            &[desc(HDR, 16, 0, 0), desc(STATUS, 1, F_WRITE, 0)],
            false,
        );
        assert_eq!(status, VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn looping_chain_ends() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let vq = MockSplitQueue::new(&m, 16);
        // 0 -> 1 -> 0 -> ...: the chain iterator stops after queue-size descriptors.
        vq.add_desc_chains(
            &[
                desc(HDR, 16, F_NEXT, 1),
                desc(DATA, 512, F_NEXT | F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(&m).unwrap().next().unwrap();
        let file = image();
        let id = [0u8; ID_BYTES];
        let mut iovecs = IoVecs::default();
        let mut disk = Disk {
            file: &file,
            name: "test.img",
            nsectors: 8,
            read_only: false,
            id: &id,
            iovecs: &mut iovecs,
            metrics: &BlockMetrics::default(),
            chain: &mut ChainBufs::default(),
            engine: None,
        };
        // A readable descriptor after a writable one: refused, and it returns.
        let mut limiter = RateLimiter::unlimited().unwrap();
        assert_eq!(
            execute(chain, &m, &mut disk, &mut limiter),
            Handled::Used(0)
        );
    }
}
