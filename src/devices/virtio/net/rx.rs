//! The receive path: frames from the TAP read straight into the guest's receive buffers where
//! they fit, and otherwise through a host buffer spread over as many buffers as
//! VIRTIO_NET_F_MRG_RXBUF allows (virtio 1.2, 5.1.6.3 and 5.1.6.4).
//!
//! A frame's length is unknown before it is read, so each read goes into the next receive chain
//! with the host buffer behind it for the rest of a largest frame. A frame that fits the chain
//! is used in place; a longer one (or one the rate limiter holds back) has its head copied out
//! of the chain, which goes back to the available ring, and is delivered from the host buffer
//! like the metadata service's frames.

use std::io;

use log::Level;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::tap::{IoVecs, Tap};
use super::{MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::devices::virtio::{next_chain_or_notify, split_chain, BrokenQueue, ChainBufs, GuestBuf};
use crate::guest_log;
use crate::metrics::{add, inc, NetMetrics};
use crate::rate_limiter::RateLimiter;
use crate::vstate::memory::GuestMemoryMmap;

/// Offset of `num_buffers` in the virtio-net header (virtio 1.2, 5.1.6).
const NUM_BUFFERS_AT: usize = 10;

/// What the receive path keeps between frames; reused so a queue drain does not allocate.
#[derive(Debug)]
pub(super) struct Rx {
    /// The frame in hand and not yet delivered: `frame[..len]`, header first.
    pub frame: Vec<u8>,
    pub len: usize,
    chain: ChainBufs,
    /// The first chain of a frame spread over several.
    first: ChainBufs,
    /// The chains taken for the frame being delivered: head and bytes written.
    taken: Vec<(u16, u32)>,
    iov: IoVecs,
}

/// What the device lends the receive path for one step.
pub(super) struct RxCtx<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub tap: &'a Tap,
    pub metrics: &'a NetMetrics,
    pub limiter: &'a mut RateLimiter,
    /// Whether the driver took VIRTIO_NET_F_MRG_RXBUF.
    pub mergeable: bool,
}

/// How one step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RxStep {
    /// A frame was delivered or dropped; `used` when the used ring changed.
    Next { used: bool },
    /// The guest has no buffers for the frame, or the rate limiter holds it back: the frame
    /// (if any was read) stays in hand.
    Wait,
    /// The TAP has no frame waiting.
    TapEmpty,
    /// The TAP failed; the error was logged.
    TapFailed,
    /// The driver broke the receive queue.
    Broken,
}

impl Default for Rx {
    fn default() -> Self {
        Self {
            frame: vec![0; MAX_FRAME_LEN + 1],
            len: 0,
            chain: ChainBufs::default(),
            first: ChainBufs::default(),
            taken: Vec::new(),
            iov: IoVecs::default(),
        }
    }
}

/// Puts the last `n` chains taken back on the available ring, untouched as far as the driver
/// can tell (what was written into them is the device's business until they are used).
fn put_back(queue: &mut Queue, n: usize) {
    for _ in 0..n {
        queue.go_to_previous_position();
    }
}

fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) {
    if queue.add_used(mem, head, len).is_err() {
        guest_log!(Level::Debug, "virtio-net: cannot add a used element");
    }
}

/// A frame of `n` bytes from the TAP that no guest can take, dropped.
fn dropped(cx: &RxCtx<'_>, n: usize) -> RxStep {
    guest_log!(
        Level::Debug,
        "virtio-net: dropping a {n}-byte frame from the TAP"
    );
    inc(&cx.metrics.rx_dropped);
    RxStep::Next { used: false }
}

fn tap_error(cx: &RxCtx<'_>, e: &io::Error) -> RxStep {
    if e.kind() == io::ErrorKind::WouldBlock {
        return RxStep::TapEmpty;
    }
    // A TAP that fails for good (deleted on the host) would stay readable with an error for
    // ever: stop watching it rather than spin.
    guest_log!(
        Level::Warn,
        "virtio-net: cannot read from TAP {}: {e}; it is read again when the guest next notifies",
        cx.tap.name()
    );
    inc(&cx.metrics.rx_dropped);
    RxStep::TapFailed
}

impl Rx {
    /// Reads the next frame from the TAP into the next receive chain (see the module doc).
    pub fn receive(&mut self, queue: &mut Queue, cx: &mut RxCtx<'_>) -> RxStep {
        let mem = cx.mem;
        let chain = match next_chain_or_notify(queue, mem) {
            Ok(Some(chain)) => chain,
            // The frame, if any, waits in hand for the guest's buffers, and the TAP stays
            // watched only while it has nothing.
            Ok(None) => {
                return match cx.tap.read_frame(&mut self.frame) {
                    Ok(n) if n > VNET_HDR_LEN && n <= MAX_FRAME_LEN => {
                        self.len = n;
                        RxStep::Wait
                    }
                    Ok(n) => dropped(cx, n),
                    Err(e) => tap_error(cx, &e),
                };
            }
            Err(BrokenQueue) => return RxStep::Broken,
        };
        let head = chain.head_index();
        let good = split_chain(chain, &mut self.chain) && self.chain.readable.is_empty();
        self.iov.clear();
        // A broken chain gets nothing: the frame goes to the host buffer and is dropped.
        let room = if good {
            guest_iovecs(mem, &self.chain.writable, MAX_FRAME_LEN + 1, &mut self.iov)
        } else {
            None
        };
        let in_guest = room.unwrap_or(0);
        if room.is_none() {
            self.iov.clear();
        }
        if let Some(rest) = self.frame.get_mut(in_guest..).filter(|r| !r.is_empty()) {
            self.iov.push(rest.as_mut_ptr(), rest.len());
        }
        // SAFETY: the iovecs are the host buffer's tail, alive and not otherwise borrowed for
        // the call, and guest memory's slices of the chain's buffers, checked by vm-memory
        // (inside a mapped region, in its plugged part for the hot-plug region); nothing
        // unmaps or unplugs guest memory while the event thread, which runs this, is here.
        let n = match unsafe { cx.tap.read_frame_into(self.iov.as_slice()) } {
            Ok(n) => n,
            Err(e) => {
                put_back(queue, 1);
                return tap_error(cx, &e);
            }
        };
        if room.is_none() {
            add_used(queue, mem, head, 0);
            inc(&cx.metrics.rx_dropped);
            return RxStep::Next { used: true };
        }
        mark_written(mem, &self.chain.writable, n.min(in_guest));
        if n <= VNET_HDR_LEN || n > MAX_FRAME_LEN {
            put_back(queue, 1);
            return dropped(cx, n);
        }
        let fits = n <= in_guest;
        if !fits && !cx.mergeable {
            // Keep the buffer for a smaller frame; this one cannot ever fit.
            put_back(queue, 1);
            inc(&cx.metrics.rx_dropped);
            return RxStep::Next { used: false };
        }
        // One op and the frame's bytes, header included (as Firecracker counts them).
        let allowed = fits && cx.limiter.consume_op(n as u64);
        if !allowed {
            // Into the host buffer whole, to go later or over several chains.
            let head_len = n.min(in_guest);
            put_back(queue, 1);
            if !read_prefix(mem, &self.chain.writable, &mut self.frame[..head_len]) {
                inc(&cx.metrics.rx_dropped);
                return RxStep::Next { used: false };
            }
            self.len = n;
            if fits {
                inc(&cx.metrics.rx_rate_limiter_throttled);
                return RxStep::Wait;
            }
            return RxStep::Next { used: false };
        }
        // num_buffers: the TAP leaves these two bytes alone.
        write_at(
            mem,
            &self.chain.writable,
            NUM_BUFFERS_AT,
            &1u16.to_le_bytes(),
        );
        add_used(queue, mem, head, u32::try_from(n).unwrap_or(u32::MAX));
        inc(&cx.metrics.rx_frames);
        add(&cx.metrics.rx_bytes, (n - VNET_HDR_LEN) as u64);
        RxStep::Next { used: true }
    }

    /// Delivers the frame in hand, `frame[..len]`, by copying: into one chain, or with
    /// MRG_RXBUF over as many as it needs, `num_buffers` saying how many.
    pub fn deliver(&mut self, queue: &mut Queue, cx: &mut RxCtx<'_>) -> RxStep {
        let mem = cx.mem;
        let len = self.len;
        let most = if cx.mergeable { queue.size() } else { 1 };
        self.taken.clear();
        let mut placed = 0usize;
        while placed < len {
            let chain = match next_chain_or_notify(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => {
                    put_back(queue, self.taken.len());
                    return RxStep::Wait;
                }
                Err(BrokenQueue) => return RxStep::Broken,
            };
            let head = chain.head_index();
            let good = split_chain(chain, &mut self.chain) && self.chain.readable.is_empty();
            let room = self
                .chain
                .writable
                .iter()
                .map(|b| b.len as usize)
                .sum::<usize>();
            if good && room < len && !cx.mergeable {
                // Keep the buffer for a smaller frame; this one cannot ever fit.
                put_back(queue, 1);
                inc(&cx.metrics.rx_dropped);
                self.len = 0;
                return RxStep::Next { used: false };
            }
            let take = room.min(len - placed);
            let bufs = &self.chain.writable;
            if !good || scatter(mem, bufs, &self.frame[placed..placed + take]).is_err() {
                // The chains taken so far go back empty, and the frame is dropped.
                for &(h, _) in &self.taken {
                    add_used(queue, mem, h, 0);
                }
                add_used(queue, mem, head, 0);
                inc(&cx.metrics.rx_dropped);
                self.len = 0;
                return RxStep::Next { used: true };
            }
            if self.taken.is_empty() {
                std::mem::swap(&mut self.chain, &mut self.first);
            }
            self.taken
                .push((head, u32::try_from(take).unwrap_or(u32::MAX)));
            placed += take;
            if placed < len && self.taken.len() >= usize::from(most) {
                // Even the whole ring cannot hold it.
                put_back(queue, self.taken.len());
                inc(&cx.metrics.rx_dropped);
                self.len = 0;
                return RxStep::Next { used: false };
            }
        }
        // One op and the frame's bytes, header included (as Firecracker counts them).
        if !cx.limiter.consume_op(len as u64) {
            put_back(queue, self.taken.len());
            inc(&cx.metrics.rx_rate_limiter_throttled);
            return RxStep::Wait;
        }
        let count = u16::try_from(self.taken.len()).unwrap_or(u16::MAX);
        write_at(
            mem,
            &self.first.writable,
            NUM_BUFFERS_AT,
            &count.to_le_bytes(),
        );
        for &(head, bytes) in &self.taken {
            add_used(queue, mem, head, bytes);
        }
        inc(&cx.metrics.rx_frames);
        add(&cx.metrics.rx_bytes, (len - VNET_HDR_LEN) as u64);
        self.len = 0;
        RxStep::Next { used: true }
    }
}

/// Fills `out` with the first bytes of the guest's buffers `bufs`; false when they are not all
/// guest memory Skiff may use.
pub(super) fn read_prefix(mem: &GuestMemoryMmap, bufs: &[GuestBuf], out: &mut [u8]) -> bool {
    let mut at = 0usize;
    for b in bufs {
        if at == out.len() {
            break;
        }
        let n = (out.len() - at).min(b.len as usize);
        if mem
            .read_slice(&mut out[at..at + n], GuestAddress(b.addr))
            .is_err()
        {
            return false;
        }
        at += n;
    }
    true
}

/// Writes `data` at byte `offset` of the guest's buffers `bufs`, taken as one; false when they
/// are too short or not all guest memory Skiff may use.
fn write_at(mem: &GuestMemoryMmap, bufs: &[GuestBuf], mut offset: usize, mut data: &[u8]) -> bool {
    for b in bufs {
        let len = b.len as usize;
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(data.len());
        let Some(addr) = b.addr.checked_add(offset as u64) else {
            return false;
        };
        if mem.write_slice(&data[..n], GuestAddress(addr)).is_err() {
            return false;
        }
        data = &data[n..];
        offset = 0;
        if data.is_empty() {
            break;
        }
    }
    data.is_empty()
}

/// Adds to `iov` the host addresses of the guest's buffers `bufs`, at most `limit` bytes in all
/// (one iovec per buffer and guest memory region it spans). Returns the bytes covered, or None
/// when a buffer is not all guest memory Skiff may use (outside it, or in unplugged hot-plug
/// memory): vm-memory's slices are checked, so the kernel never sees such an address.
pub(super) fn guest_iovecs(
    mem: &GuestMemoryMmap,
    bufs: &[GuestBuf],
    limit: usize,
    iov: &mut IoVecs,
) -> Option<usize> {
    let mut total = 0usize;
    for b in bufs {
        if total == limit {
            break;
        }
        let len = (b.len as usize).min(limit - total);
        for slice in GuestMemoryBackend::get_slices(mem, GuestAddress(b.addr), len) {
            let slice = slice.ok()?;
            iov.push(slice.ptr_guard_mut().as_ptr(), slice.len());
        }
        total += len;
    }
    Some(total)
}

/// Marks the first `n` bytes of the guest's buffers `bufs` written in guest memory's dirty
/// bitmap (for diff snapshots), as vm-memory's own writes do; `readv` wrote them behind its back.
fn mark_written(mem: &GuestMemoryMmap, bufs: &[GuestBuf], mut n: usize) {
    for b in bufs {
        if n == 0 {
            break;
        }
        let len = (b.len as usize).min(n);
        for slice in GuestMemoryBackend::get_slices(mem, GuestAddress(b.addr), len).flatten() {
            slice.bitmap().mark_dirty(0, slice.len());
        }
        n -= len;
    }
}

#[derive(Debug)]
pub(super) struct OutsideMemory;

/// Copies `data` into the guest's buffers `bufs`, which hold at least as much.
pub(super) fn scatter(
    mem: &GuestMemoryMmap,
    bufs: &[GuestBuf],
    data: &[u8],
) -> Result<(), OutsideMemory> {
    let mut rest = data;
    for b in bufs {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(b.len as usize);
        mem.write_slice(&rest[..n], GuestAddress(b.addr))
            .map_err(|_| OutsideMemory)?;
        rest = &rest[n..];
    }
    Ok(())
}
