//! The Async engine (`io_engine: "Async"`): the block device's reads, writes and flushes go
//! to an io_uring owned by the device and run while the event thread goes on. One queue drain
//! is one `io_uring_enter`; completions raise an eventfd registered with the ring
//! (IORING_REGISTER_EVENTFD), which the event manager watches. A flush carries IOSQE_IO_DRAIN,
//! so it starts only once every request submitted before it has completed: it makes durable
//! what the guest wrote before asking (virtio 1.2, 5.2.6.2).
//!
//! At most [`RING_ENTRIES`] requests are in flight; with every slot taken the device leaves
//! the rest on the available ring and takes them when completions free slots. The buffers of
//! a request in flight are guest memory the kernel writes or reads at its own pace: the
//! engine never forgets one. Reset, snapshot, image swap and drop wait for every request in
//! flight ([`AsyncIo::wait_all`]) before going on.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

use super::request::IoVecs;

/// Requests in flight at most, and the submission ring's size. The test guest's deepest queue
/// (40) is over it, so the full-ring path is exercised by a real driver; a Linux guest (queue
/// of 256) waits on the ring the same way.
pub const RING_ENTRIES: u32 = 32;

/// The most iovecs one READV/WRITEV takes (Linux's UIO_MAXIOV); more go in later submissions.
const IOV_MAX: usize = 1024;

/// What a request in flight does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Image to guest.
    Read,
    /// Guest to image.
    Write,
    /// fdatasync of the image, after everything submitted before it.
    Flush,
}

/// A request the ring holds: where its answer goes, and what is left to move.
struct InFlight {
    /// The chain's head, for the used ring.
    head: u16,
    /// Guest address of its status byte.
    status_addr: u64,
    op: Op,
    /// Image offset of the next byte to move.
    offset: u64,
    /// Bytes moved so far.
    moved: u64,
    /// The request's buffers; `at` is the first not (wholly) moved.
    iov: IoVecs,
    at: usize,
}

/// A request whose I/O is over.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// The chain's head.
    pub head: u16,
    /// Guest address of its status byte.
    pub status_addr: u64,
    /// What it did.
    pub op: Op,
    /// Bytes moved, or the host's error.
    pub result: Result<u64, i32>,
}

/// An io_uring with the block device's requests in flight.
pub struct AsyncIo {
    ring: IoUring,
    completion_evt: EventFd,
    /// One per possible request in flight, indexed by the SQE's user_data.
    slots: Vec<Option<InFlight>>,
    free: Vec<u32>,
    /// SQEs pushed since the last submit.
    unsubmitted: u32,
    /// `io_uring_enter` calls made to submit, for the metrics.
    pub submits: u64,
}

impl std::fmt::Debug for AsyncIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncIo")
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl AsyncIo {
    /// A ring of [`RING_ENTRIES`] with its completion eventfd registered. Fails where
    /// io_uring is missing or forbidden (an old kernel, `kernel.io_uring_disabled`, seccomp).
    pub fn new() -> io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let completion_evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        ring.submitter()
            .register_eventfd(completion_evt.as_raw_fd())?;
        let n = RING_ENTRIES as usize;
        Ok(Self {
            ring,
            completion_evt,
            slots: (0..n).map(|_| None).collect(),
            free: (0..RING_ENTRIES).rev().collect(),
            unsubmitted: 0,
            submits: 0,
        })
    }

    /// Raised when completions wait.
    pub fn completion_evt(&self) -> &EventFd {
        &self.completion_evt
    }

    /// Every slot holds a request: take no more until completions come.
    pub fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues a read or write of `iov` (swapped out of the caller's storage, which gets the
    /// slot's emptied one back) at `offset`. The caller checked [`AsyncIo::is_full`] and that
    /// `iov` is guest memory that stays mapped while the VM exists.
    pub fn push_rw(
        &mut self,
        file: RawFd,
        head: u16,
        status_addr: u64,
        op: Op,
        offset: u64,
        iov: &mut IoVecs,
    ) -> Result<(), ()> {
        let slot = self.free.pop().ok_or(())?;
        let mut mine = self.slots[slot as usize]
            .take()
            .map(|s| s.iov)
            .unwrap_or_default();
        std::mem::swap(&mut mine, iov);
        self.slots[slot as usize] = Some(InFlight {
            head,
            status_addr,
            op,
            offset,
            moved: 0,
            iov: mine,
            at: 0,
        });
        self.push(file, slot);
        Ok(())
    }

    /// Queues a flush, ordered after every request submitted before it.
    pub fn push_flush(&mut self, file: RawFd, head: u16, status_addr: u64) -> Result<(), ()> {
        let slot = self.free.pop().ok_or(())?;
        // The slot keeps its iovec storage for the next read or write (no allocation there).
        let iov = self.slots[slot as usize]
            .take()
            .map(|s| s.iov)
            .unwrap_or_default();
        self.slots[slot as usize] = Some(InFlight {
            head,
            status_addr,
            op: Op::Flush,
            offset: 0,
            moved: 0,
            iov,
            at: 0,
        });
        self.push(file, slot);
        Ok(())
    }

    /// Pushes the SQE for what slot `slot` has left to do.
    fn push(&mut self, file: RawFd, slot: u32) {
        let Some(req) = self.slots[slot as usize].as_ref() else {
            return;
        };
        let fd = types::Fd(file);
        let entry = match req.op {
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
            Op::Read | Op::Write => {
                let rest = &req.iov.0[req.at..];
                let iov = &rest[..rest.len().min(IOV_MAX)];
                // At most IOV_MAX: fits.
                let n = u32::try_from(iov.len()).unwrap_or(0);
                if req.op == Op::Read {
                    opcode::Readv::new(fd, iov.as_ptr(), n)
                        .offset(req.offset)
                        .build()
                } else {
                    opcode::Writev::new(fd, iov.as_ptr(), n)
                        .offset(req.offset)
                        .build()
                }
            }
        };
        let entry = entry.user_data(u64::from(slot));
        // SAFETY: the SQE's iovec array lives in the slot, which is neither changed nor freed
        // until its completion is reaped; every iovec is guest memory that `guest_iovecs`
        // checked, mapped as long as the VM (whose memory outlives the device: the device is
        // dropped first, and its drop waits for the ring). The queue has room: each slot has
        // at most one SQE queued, and the ring has one entry per slot.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        debug_assert!(pushed.is_ok(), "one SQE per slot");
        self.unsubmitted += 1;
    }

    /// Hands every queued SQE to the kernel: one `io_uring_enter` per queue drain.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        self.submits += 1;
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes every completion the ring holds, clearing the eventfd first so none is missed;
    /// `done` gets each finished request. A short read or write goes back on the ring for the
    /// rest (an image that ends first is an error, EOF as EIO).
    pub fn reap(&mut self, file: RawFd, done: impl FnMut(Completion)) {
        self.reap_from(Some(file), done);
    }

    /// [`AsyncIo::reap`]; with no `file`, a short transfer ends its request (as EIO).
    fn reap_from(&mut self, file: Option<RawFd>, mut done: impl FnMut(Completion)) {
        let _ = self.completion_evt.read();
        // One entry at a time: the completion queue borrows the ring, `advance` may push.
        loop {
            let Some((user_data, res)) =
                (self.ring.completion().next()).map(|cqe| (cqe.user_data(), cqe.result()))
            else {
                break;
            };
            let Ok(slot) = u32::try_from(user_data) else {
                continue;
            };
            if let Some(c) = self.advance(file, slot, res) {
                done(c);
            }
        }
        if let Err(e) = self.submit() {
            log::warn!("block: cannot resubmit short transfers: {e}");
        }
    }

    /// Accounts `res` bytes (or an error) to slot `slot`: the request's completion, or None
    /// when the rest was pushed again.
    fn advance(&mut self, file: Option<RawFd>, slot: u32, res: i32) -> Option<Completion> {
        let req = self.slots.get_mut(slot as usize)?.as_mut()?;
        let result = match (req.op, usize::try_from(res)) {
            (_, Err(_)) => Err(-res),
            (Op::Flush, Ok(_)) => Ok(0),
            (_, Ok(0)) => Err(libc::EIO),
            (_, Ok(mut n)) => {
                req.moved += n as u64;
                req.offset += n as u64;
                let iov = &mut req.iov.0;
                while req.at < iov.len() && n >= iov[req.at].iov_len {
                    n -= iov[req.at].iov_len;
                    req.at += 1;
                }
                if n > 0 && req.at < iov.len() {
                    let partial = &mut iov[req.at];
                    partial.iov_base = partial.iov_base.cast::<u8>().wrapping_add(n).cast();
                    partial.iov_len -= n;
                }
                match file {
                    _ if req.at == iov.len() => Ok(req.moved),
                    Some(file) => {
                        self.push(file, slot);
                        return None;
                    }
                    None => Err(libc::EIO),
                }
            }
        };
        let req = self.slots[slot as usize].as_mut()?;
        req.iov.0.clear();
        let c = Completion {
            head: req.head,
            status_addr: req.status_addr,
            op: req.op,
            result,
        };
        self.free.push(slot);
        Some(c)
    }

    /// Waits until nothing is in flight, giving `done` each completion: after this the kernel
    /// touches no guest memory for the device.
    pub fn wait_all(&mut self, file: RawFd, done: impl FnMut(Completion)) {
        self.wait_from(Some(file), done);
    }

    fn wait_from(&mut self, file: Option<RawFd>, mut done: impl FnMut(Completion)) {
        while self.in_flight() > 0 {
            if self.unsubmitted > 0 {
                self.submits += 1;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.unsubmitted = 0,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    // Only a broken ring fails here; nothing more will complete.
                    log::error!("block: waiting for requests in flight failed: {e}");
                    return;
                }
            }
            self.reap_from(file, &mut done);
        }
        let _ = self.completion_evt.read();
    }
}

impl Drop for AsyncIo {
    /// The device waits for its requests before it goes (it still has the image open); this
    /// is the backstop: nothing is pushed again, and the ring's memory goes only once the
    /// kernel is done with the guest's.
    fn drop(&mut self) {
        self.wait_from(None, |_| {});
    }
}

#[cfg(test)]
mod tests {
    use super::super::request::tests::image_of as image;
    use super::*;

    /// More iovecs than one READV takes: the rest goes on in later submissions, and the
    /// request completes once, with every byte; an image that ends first is an error.
    #[test]
    fn reads_go_on_past_iov_max_and_stop_at_the_end() {
        let file = image(8192);
        let mut io = AsyncIo::new().unwrap();
        let mut host = vec![0u8; 4000];
        let mut iov = IoVecs::default();
        iov.0.extend(host.chunks_mut(2).map(|c| libc::iovec {
            iov_base: c.as_mut_ptr().cast(),
            iov_len: c.len(),
        }));
        io.push_rw(file.as_raw_fd(), 7, 0x10, Op::Read, 96, &mut iov)
            .unwrap();
        io.submit().unwrap();
        let mut got = Vec::new();
        io.wait_all(file.as_raw_fd(), |c| got.push(c));
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].head, got[0].result), (7, Ok(4000)));
        assert!(host
            .iter()
            .enumerate()
            .all(|(i, b)| usize::from(*b) == (96 + i) % 251));

        iov.0.clear();
        iov.0.push(libc::iovec {
            iov_base: host.as_mut_ptr().cast(),
            iov_len: host.len(),
        });
        io.push_rw(file.as_raw_fd(), 8, 0x10, Op::Read, 6000, &mut iov)
            .unwrap();
        io.submit().unwrap();
        got.clear();
        io.wait_all(file.as_raw_fd(), |c| got.push(c));
        assert_eq!(got[0].result, Err(libc::EIO));
        assert_eq!(io.in_flight(), 0);
    }

    /// The ring takes RING_ENTRIES requests and refuses the next until one completes.
    #[test]
    fn a_full_ring_refuses_until_completions() {
        let file = image(4096);
        let mut io = AsyncIo::new().unwrap();
        for head in 0..RING_ENTRIES {
            io.push_flush(file.as_raw_fd(), u16::try_from(head).unwrap(), 0)
                .unwrap();
        }
        assert!(io.is_full());
        assert!(io.push_flush(file.as_raw_fd(), 99, 0).is_err());
        io.submit().unwrap();
        let mut n = 0;
        io.wait_all(file.as_raw_fd(), |c| {
            assert_eq!(c.result, Ok(0));
            n += 1;
        });
        assert_eq!(n, RING_ENTRIES);
        assert!(!io.is_full());
    }
}
