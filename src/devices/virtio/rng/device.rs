//! The entropy device: features, activation, and filling the guest's buffers.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use super::{MAX_REQUEST_BYTES, QUEUE_SIZE, VIRTIO_ID_RNG};
use crate::config::RateLimiterConfig;
use crate::devices::virtio::{
    drain_queue, split_chain, ActivateError, ChainBufs, ConfigSpace, Handled, RestoreError,
    VirtioBase, VirtioDevice, VirtioState, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::guest_log;
use crate::metrics::{add, inc, EntropyMetrics};
use crate::rate_limiter::{RateLimiter, RateLimiterError};
use crate::vstate::memory::GuestMemoryMmap;

/// Errors while creating or restoring the entropy device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The rate limiter could not be set up.
    #[error(transparent)]
    RateLimiter(#[from] RateLimiterError),
    /// The saved virtio state cannot be put back.
    #[error("entropy device: cannot restore its saved state")]
    Restore(#[source] RestoreError),
}

/// The entropy device as a snapshot holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The rate limiter's shape.
    #[serde(with = "crate::rate_limiter::saved_shape")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// Features, interrupt and queues.
    pub virtio: VirtioState,
}

/// What the device works on once the driver is ready.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
}

/// A virtio entropy device.
pub struct Rng {
    pub(super) base: VirtioBase,
    active: Option<Active>,
    chain: ChainBufs,
    buf: Vec<u8>,
    metrics: Arc<EntropyMetrics>,
    /// Limits the bytes and requests the guest gets; unlimited until configured.
    pub(super) rate_limiter: RateLimiter,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("rate_limiter", &self.rate_limiter.config())
            .finish_non_exhaustive()
    }
}

/// Fills `buf` from the host's entropy pool (getrandom, without GRND_RANDOM: the kernel's
/// CSPRNG, as the guest's own /dev/urandom would be).
pub(crate) fn host_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`, which is valid and
        // exclusively borrowed for the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

impl Rng {
    /// An entropy device, limited by `rate_limiter` when given.
    pub fn new(rate_limiter: Option<&RateLimiterConfig>) -> Result<Self, RngError> {
        let features = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_RING_F_EVENT_IDX);
        let mut rng = Self {
            // No configuration space (virtio 1.2, 5.4.4).
            base: VirtioBase::new(features, 1, ConfigSpace::new(Vec::new(), 0..0))
                .map_err(RngError::EventFd)?,
            active: None,
            chain: ChainBufs::default(),
            buf: Vec::new(),
            metrics: Arc::new(EntropyMetrics::default()),
            rate_limiter: RateLimiter::unlimited()?,
        };
        if let Some(limiter) = rate_limiter {
            rng.rate_limiter.patch(limiter)?;
        }
        Ok(rng)
    }

    /// The device's state, for a snapshot.
    pub fn save(&self) -> RngState {
        RngState {
            rate_limiter: self.rate_limiter.config(),
            virtio: self.base.save(&self.active_queues()),
        }
    }

    /// A device as `state` saved it; its queue comes back when the transport is restored.
    pub fn from_state(state: &RngState) -> Result<Self, RngError> {
        let mut rng = Self::new(state.rate_limiter.as_ref())?;
        rng.base.restore(&state.virtio).map_err(RngError::Restore)?;
        Ok(rng)
    }

    /// The rate limiter's current shape.
    pub fn rate_limiter(&self) -> Option<RateLimiterConfig> {
        self.rate_limiter.config()
    }

    /// The device's counters, shared with the metrics dump.
    pub fn metrics(&self) -> Arc<EntropyMetrics> {
        self.metrics.clone()
    }

    /// Fills the guest's buffers (see [`drain_queue`]) as far as the rate limiter allows: each
    /// request gets up to [`MAX_REQUEST_BYTES`] over its writable buffers, in order. A chain
    /// with a readable buffer, or one the guest broke, is returned unfilled.
    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if self.rate_limiter.is_blocked() {
            return;
        }
        let mem = &active.mem;
        let (bufs, buf, metrics) = (&mut self.chain, &mut self.buf, &self.metrics);
        let limiter = &mut self.rate_limiter;
        inc(&metrics.entropy_event_count);
        let drained = drain_queue(
            &mut active.queue,
            mem,
            &self.base.queue_events[0],
            self.base.queue_irq(0),
            |chain| {
                if !split_chain(chain, bufs) || !bufs.readable.is_empty() {
                    guest_log!(
                        log::Level::Debug,
                        "virtio-rng: ignoring a malformed request"
                    );
                    inc(&metrics.invalid_requests);
                    return Handled::Used(0);
                }
                let want: u32 = bufs
                    .writable
                    .iter()
                    .fold(0u32, |sum, b| sum.saturating_add(b.len))
                    .min(MAX_REQUEST_BYTES);
                if want == 0 {
                    return Handled::Used(0);
                }
                if !limiter.consume_op(u64::from(want)) {
                    inc(&metrics.entropy_rate_limiter_throttled);
                    return Handled::Deferred;
                }
                buf.resize(want as usize, 0);
                if let Err(e) = host_random(buf) {
                    guest_log!(
                        log::Level::Warn,
                        "virtio-rng: the host's getrandom failed: {e}"
                    );
                    inc(&metrics.host_rng_fails);
                    return Handled::Used(0);
                }
                let mut written = 0usize;
                for b in &bufs.writable {
                    if written == buf.len() {
                        break;
                    }
                    let n = (b.len as usize).min(buf.len() - written);
                    if mem
                        .write_slice(&buf[written..written + n], GuestAddress(b.addr))
                        .is_err()
                    {
                        inc(&metrics.invalid_requests);
                        break;
                    }
                    written += n;
                }
                add(&metrics.entropy_bytes, written as u64);
                Handled::Used(u32::try_from(written).unwrap_or(0))
            },
        );
        if drained.is_err() {
            self.active = None;
            self.base.irq.signal_needs_reset();
        }
    }
}

impl VirtioDevice for Rng {
    fn base(&self) -> &VirtioBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        let queue = self.base.single_queue(queues)?;
        self.active = Some(Active { mem, queue });
        self.base.signal_activation()
    }

    fn reset(&mut self) {
        self.active = None;
        self.base.acked_features = 0;
    }

    fn active_queues(&self) -> Vec<&Queue> {
        self.active.iter().map(|a| &a.queue).collect()
    }
}
