//! The pmem device: its backing file mapped and given to the guest as a KVM memory slot, the
//! configuration space that tells the driver where (virtio 1.2, 5.19.4), and the FLUSH
//! requests (5.19.6), each answered once the file's data is on the host's disk.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestAddress};

use super::{QUEUE_SIZE, VIRTIO_ID_PMEM};
use crate::arch::x86_64::layout::{MMIO_HOLE_END, PMEM_ALIGNMENT};
use crate::config::RateLimiterConfig;
use crate::devices::virtio::{
    drain_queue, split_chain, ActivateError, ChainBufs, ConfigSpace, Handled, RestoreError,
    VirtioBase, VirtioDevice, VirtioState, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::guest_log;
use crate::metrics::{inc, PmemMetrics};
use crate::rate_limiter::{RateLimiter, RateLimiterError};
use crate::vstate::memory::{
    register_file_mapping, FileMapping, GuestMemoryMmap, MemoryError, HOTPLUG_FIRST_SLOT,
    PMEM_FIRST_SLOT,
};

/// The one request type (virtio 1.2, 5.19.6).
const VIRTIO_PMEM_REQ_TYPE_FLUSH: u32 = 0;
/// Bytes of a request (its type) and of a response (its status).
const WORD: u32 = 4;

/// Errors while setting up or restoring a pmem device.
#[derive(Debug, thiserror::Error)]
pub enum PmemError {
    /// The backing file cannot be opened.
    #[error("cannot open pmem file {}", .0.display())]
    Open(PathBuf, #[source] std::io::Error),
    /// The backing file is a directory, not a regular file, or empty.
    #[error("pmem file {} {}", .0.display(), .1)]
    Unusable(PathBuf, &'static str),
    /// The backing file cannot be mapped.
    #[error("cannot map pmem file {}", .0.display())]
    Map(PathBuf, #[source] std::io::Error),
    /// KVM refused the memory slot.
    #[error("pmem file {}: cannot give its region to the guest", .0.display())]
    Slot(PathBuf, #[source] MemoryError),
    /// The file's size is not the one the snapshot saw.
    #[error("pmem file {} needs a region of {now} bytes now, the snapshot's had {saved}", .path.display())]
    SizeChanged {
        /// The file.
        path: PathBuf,
        /// Region bytes in the snapshot.
        saved: u64,
        /// Region bytes now.
        now: u64,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The rate limiter could not be set up.
    #[error(transparent)]
    RateLimiter(#[from] RateLimiterError),
    /// The saved virtio state cannot be put back.
    #[error("pmem {0}: cannot restore its saved state")]
    Restore(String, #[source] RestoreError),
    /// The saved region is not one Skiff places.
    #[error("pmem {0}: the saved region or memory slot is not one Skiff places")]
    Placement(String),
}

/// A pmem device as a snapshot holds it. The file is opened and mapped again by path at the
/// same guest address: its contents are the host's at restore time, not the snapshot's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmemState {
    /// The backing file.
    pub path: PathBuf,
    /// Mapped read-only.
    pub read_only: bool,
    /// The guest's root device (`root=/dev/pmem<N>`), for describing the configuration.
    pub root_device: bool,
    /// Guest physical address of the region.
    pub start: u64,
    /// Region bytes: the file's size rounded up to [`PMEM_ALIGNMENT`], checked at restore.
    pub size: u64,
    /// The region's KVM memory slot.
    pub slot: u32,
    /// The rate limiter's shape (its buckets start full).
    #[serde(with = "crate::rate_limiter::saved_shape")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// Features, interrupt, configuration and queue.
    pub virtio: VirtioState,
}

/// A pmem backing file, opened and mapped, before it has a place in the guest: its region's
/// size decides where the next device memory goes.
#[derive(Debug)]
pub struct PmemBacking {
    file: File,
    path: PathBuf,
    read_only: bool,
    file_len: u64,
    mapping: FileMapping,
}

impl PmemBacking {
    /// Opens `path` (for writing too unless `read_only`) and maps it shared, padded to a whole
    /// number of [`PMEM_ALIGNMENT`]s as Firecracker does (the guest's writes to the padding
    /// are not kept). Only a regular, non-empty file will do; it is opened without blocking,
    /// so a FIFO is refused rather than waited on.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, PmemError> {
        let open_err = |e| PmemError::Open(path.to_owned(), e);
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let unusable = |why| Err(PmemError::Unusable(path.to_owned(), why));
        if meta.is_dir() {
            return unusable("is a directory");
        }
        if !meta.is_file() {
            return unusable("is not a regular file");
        }
        if meta.len() == 0 {
            return unusable("is empty");
        }
        crate::devices::clear_nonblocking(&file).map_err(open_err)?;
        let file_len = meta.len();
        let len = file_len
            .checked_next_multiple_of(PMEM_ALIGNMENT)
            .ok_or(PmemError::Unusable(path.to_owned(), "is too large"))?;
        let mapping = FileMapping::new(&file, file_len, len, read_only)
            .map_err(|e| PmemError::Map(path.to_owned(), e))?;
        Ok(Self {
            file,
            path: path.to_owned(),
            read_only,
            file_len,
            mapping,
        })
    }

    /// Bytes of guest physical address space the region takes.
    pub fn region_size(&self) -> u64 {
        self.mapping.len()
    }
}

/// What the device works on once the driver is ready.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
}

/// A virtio-pmem device.
pub struct Pmem {
    backing: PmemBacking,
    root_device: bool,
    start: u64,
    slot: u32,
    pub(super) base: VirtioBase,
    active: Option<Active>,
    chain: ChainBufs,
    metrics: Arc<PmemMetrics>,
    /// Limits the flushes (one op and the file's size in bytes each); unlimited until set.
    pub(super) rate_limiter: RateLimiter,
}

impl std::fmt::Debug for Pmem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pmem")
            .field("path", &self.backing.path)
            .field("start", &self.start)
            .field("size", &self.backing.region_size())
            .field("read_only", &self.backing.read_only)
            .finish_non_exhaustive()
    }
}

impl Pmem {
    /// Gives `backing` to the guest at guest physical address `start` as KVM memory slot
    /// `slot` (read-only slots for a read-only file) and makes the device that announces it.
    pub fn new(
        vm: &VmFd,
        backing: PmemBacking,
        start: u64,
        slot: u32,
        root_device: bool,
        rate_limiter: Option<&RateLimiterConfig>,
    ) -> Result<Self, PmemError> {
        register_file_mapping(vm, slot, start, &backing.mapping, backing.read_only)
            .map_err(|e| PmemError::Slot(backing.path.clone(), e))?;
        // virtio_pmem_config: start and size, little-endian; nothing the driver may write.
        let mut config = start.to_le_bytes().to_vec();
        config.extend_from_slice(&backing.region_size().to_le_bytes());
        let features = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_RING_F_EVENT_IDX);
        let mut pmem = Self {
            backing,
            root_device,
            start,
            slot,
            base: VirtioBase::new(features, 1, ConfigSpace::new(config, 0..0))
                .map_err(PmemError::EventFd)?,
            active: None,
            chain: ChainBufs::default(),
            metrics: Arc::new(PmemMetrics::default()),
            rate_limiter: RateLimiter::unlimited()?,
        };
        if let Some(limiter) = rate_limiter {
            pmem.rate_limiter.patch(limiter)?;
        }
        Ok(pmem)
    }

    /// The device's state, for a snapshot.
    pub fn save(&self) -> PmemState {
        PmemState {
            path: self.backing.path.clone(),
            read_only: self.backing.read_only,
            root_device: self.root_device,
            start: self.start,
            size: self.backing.region_size(),
            slot: self.slot,
            rate_limiter: self.rate_limiter.config(),
            virtio: self.base.save(&self.active_queues()),
        }
    }

    /// A device as `state` saved it: the file mapped again at the same place, which it must
    /// still fill to the same size. Its queue comes back when the transport is restored.
    pub fn from_state(vm: &VmFd, id: &str, state: &PmemState) -> Result<Self, PmemError> {
        let placed = state.start >= MMIO_HOLE_END
            && state.start.is_multiple_of(PMEM_ALIGNMENT)
            && (PMEM_FIRST_SLOT..HOTPLUG_FIRST_SLOT).contains(&state.slot);
        if !placed {
            return Err(PmemError::Placement(id.to_owned()));
        }
        let backing = PmemBacking::open(&state.path, state.read_only)?;
        if backing.region_size() != state.size {
            return Err(PmemError::SizeChanged {
                path: state.path.clone(),
                saved: state.size,
                now: backing.region_size(),
            });
        }
        let mut pmem = Self::new(
            vm,
            backing,
            state.start,
            state.slot,
            state.root_device,
            state.rate_limiter.as_ref(),
        )?;
        pmem.base
            .restore(&state.virtio)
            .map_err(|e| PmemError::Restore(id.to_owned(), e))?;
        Ok(pmem)
    }

    /// Changes the rate limiter as a `PATCH /pmem` body does (the buckets given replace the
    /// current ones). A queue the old limits held back is looked at again at once.
    pub fn update_rate_limiter(&mut self, update: &RateLimiterConfig) -> Result<(), PmemError> {
        Ok(self.rate_limiter.patch(update)?)
    }

    /// The device's counters, shared with the metrics dump.
    pub fn metrics(&self) -> Arc<PmemMetrics> {
        self.metrics.clone()
    }

    /// Answers the queued FLUSH requests (see [`drain_queue`]) as far as the rate limiter
    /// allows. All the flushes of one drain share one fdatasync of the file: each asks for
    /// everything written before it to be durable, and one sync after they arrived gives that
    /// (Firecracker coalesces them the same way), costing one op and the file's size.
    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if self.rate_limiter.is_blocked() {
            return;
        }
        inc(&self.metrics.queue_event_count);
        let mut flush = Flush {
            file: &self.backing.file,
            file_len: self.backing.file_len,
            done: None,
            limiter: &mut self.rate_limiter,
            metrics: &self.metrics,
        };
        let mem = &active.mem;
        let chain = &mut self.chain;
        let drained = drain_queue(
            &mut active.queue,
            mem,
            &self.base.queue_events[0],
            self.base.queue_irq(0),
            |c| handle_request(c, mem, chain, &mut flush),
        );
        if drained.is_err() {
            self.active = None;
            self.base.irq.signal_needs_reset();
        }
    }
}

/// One drain's flushing: the file, and the status of its fdatasync once done.
struct Flush<'a> {
    file: &'a File,
    file_len: u64,
    done: Option<i32>,
    limiter: &'a mut RateLimiter,
    metrics: &'a PmemMetrics,
}

impl Flush<'_> {
    /// The status of the drain's fdatasync (0, or -1 when the host failed it), done now if
    /// it was not yet; None when the rate limiter holds it back.
    fn status(&mut self) -> Option<i32> {
        if let Some(status) = self.done {
            return Some(status);
        }
        if !self.limiter.consume_op(self.file_len) {
            inc(&self.metrics.rate_limiter_throttled_events);
            return None;
        }
        inc(&self.metrics.flush_count);
        let status = match self.file.sync_data() {
            Ok(()) => 0,
            Err(e) => {
                guest_log!(log::Level::Warn, "virtio-pmem: fdatasync failed: {e}");
                inc(&self.metrics.host_flush_errors);
                -1
            }
        };
        self.done = Some(status);
        Some(status)
    }
}

/// One request (virtio 1.2, 5.19.6): a device-readable 32-bit type, then a device-writable
/// 32-bit status, 0 for success. A FLUSH gets the status of the file's fdatasync; another type
/// gets -1; a chain without both words is returned unanswered.
fn handle_request(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    bufs: &mut ChainBufs,
    flush: &mut Flush<'_>,
) -> Handled {
    let broken = |flush: &Flush<'_>| {
        guest_log!(
            log::Level::Debug,
            "virtio-pmem: ignoring a malformed request"
        );
        inc(&flush.metrics.invalid_requests);
        Handled::Used(0)
    };
    if !split_chain(chain, bufs) {
        return broken(flush);
    }
    let (Some(request), Some(response)) = (bufs.readable.first(), bufs.writable.first()) else {
        return broken(flush);
    };
    if request.len < WORD || response.len < WORD {
        return broken(flush);
    }
    let Ok(kind) = mem.read_obj::<u32>(GuestAddress(request.addr)) else {
        return broken(flush);
    };
    let status = if u32::from_le(kind) == VIRTIO_PMEM_REQ_TYPE_FLUSH {
        match flush.status() {
            Some(status) => status,
            None => return Handled::Deferred,
        }
    } else {
        inc(&flush.metrics.invalid_requests);
        -1
    };
    if mem
        .write_slice(&status.to_le_bytes(), GuestAddress(response.addr))
        .is_err()
    {
        return broken(flush);
    }
    Handled::Used(WORD)
}

impl VirtioDevice for Pmem {
    fn base(&self) -> &VirtioBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_PMEM
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    const F_WRITE: u16 = 2;
    const REQ: u64 = 0x1000;
    const RESP: u64 = 0x2000;

    fn mem() -> GuestMemoryMmap {
        crate::vstate::memory::anonymous(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "skiff-pmem-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ))
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    /// Runs `descs` as one chain with the request type `kind`; returns what the handler did
    /// and the status word (0xeeeeeeee when untouched).
    fn run(descs: &[RawDescriptor], kind: u32, flush: &mut Flush<'_>) -> (Handled, u32) {
        let m = mem();
        m.write_obj(kind.to_le(), GuestAddress(REQ)).unwrap();
        m.write_obj(0xeeee_eeeeu32, GuestAddress(RESP)).unwrap();
        let vq = MockSplitQueue::new(&m, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        let handled = handle_request(chain, &m, &mut ChainBufs::default(), flush);
        (handled, m.read_obj(GuestAddress(RESP)).unwrap())
    }

    /// A flush answers 0 after one fdatasync, which the rest of the drain shares; another
    /// type answers -1; chains without a readable type and a writable status are returned
    /// unanswered, whatever their shape.
    #[test]
    fn flushes_share_one_sync_and_broken_chains_are_refused() {
        let file = tempfile_with(b"data");
        let metrics = PmemMetrics::default();
        let mut limiter = RateLimiter::unlimited().unwrap();
        let mut flush = Flush {
            file: &file,
            file_len: 4,
            done: None,
            limiter: &mut limiter,
            metrics: &metrics,
        };
        let good = [desc(REQ, 4, 0), desc(RESP, 4, F_WRITE)];
        assert_eq!(run(&good, 0, &mut flush), (Handled::Used(4), 0));
        assert_eq!(run(&good, 0, &mut flush), (Handled::Used(4), 0));
        assert_eq!(
            metrics
                .flush_count
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert_eq!(run(&good, 7, &mut flush), (Handled::Used(4), u32::MAX));
        for broken in [
            vec![desc(REQ, 4, 0)],
            vec![desc(RESP, 4, F_WRITE)],
            vec![desc(REQ, 2, 0), desc(RESP, 4, F_WRITE)],
            vec![desc(REQ, 4, 0), desc(RESP, 3, F_WRITE)],
            vec![desc(REQ, 4, 0), desc(RESP, 4, 0)],
            vec![desc(REQ, 4, F_WRITE), desc(RESP, 4, F_WRITE)],
            vec![desc(0x20_0000, 4, 0), desc(RESP, 4, F_WRITE)],
            vec![desc(REQ, 4, 0), desc(0x20_0000, 4, F_WRITE)],
        ] {
            assert_eq!(
                run(&broken, 0, &mut flush),
                (Handled::Used(0), 0xeeee_eeee),
                "{broken:?}"
            );
        }
        assert_eq!(
            metrics
                .invalid_requests
                .load(std::sync::atomic::Ordering::Relaxed),
            9
        );
    }

    /// A flush the limiter holds back stays on the queue and counts as throttled.
    #[test]
    fn a_throttled_flush_waits() {
        use crate::config::TokenBucketConfig;
        let file = tempfile_with(b"data");
        let metrics = PmemMetrics::default();
        let mut limiter = RateLimiter::new(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: None,
                refill_time: 3_600_000,
            }),
        })
        .unwrap();
        let good = [desc(REQ, 4, 0), desc(RESP, 4, F_WRITE)];
        let mut first = Flush {
            file: &file,
            file_len: 4,
            done: None,
            limiter: &mut limiter,
            metrics: &metrics,
        };
        assert_eq!(run(&good, 0, &mut first), (Handled::Used(4), 0));
        let mut second = Flush {
            file: &file,
            file_len: 4,
            done: None,
            limiter: &mut limiter,
            metrics: &metrics,
        };
        assert_eq!(run(&good, 0, &mut second), (Handled::Deferred, 0xeeee_eeee));
        assert_eq!(
            metrics
                .rate_limiter_throttled_events
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    fn tempfile_with(bytes: &[u8]) -> File {
        let path = temp_path("data");
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.write_all(bytes).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    /// Each unusable backing file is refused in one line naming it; a usable one is padded to
    /// whole 2 MiB.
    #[test]
    fn backing_files_are_checked_and_padded() {
        let missing = temp_path("missing");
        let err = PmemBacking::open(&missing, false).unwrap_err();
        assert!(matches!(err, PmemError::Open(..)), "{err}");
        let dir = temp_path("dir");
        std::fs::create_dir_all(&dir).unwrap();
        let err = PmemBacking::open(&dir, true).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("pmem file {} is a directory", dir.display())
        );
        std::fs::remove_dir(&dir).unwrap();
        let fifo = temp_path("fifo");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        for read_only in [true, false] {
            let err = PmemBacking::open(&fifo, read_only).unwrap_err();
            assert!(err.to_string().ends_with("is not a regular file"), "{err}");
        }
        std::fs::remove_file(&fifo).unwrap();
        let empty = temp_path("empty");
        std::fs::write(&empty, b"").unwrap();
        let err = PmemBacking::open(&empty, false).unwrap_err();
        assert!(err.to_string().ends_with("is empty"), "{err}");
        std::fs::write(&empty, vec![1u8; 3 << 20]).unwrap();
        let backing = PmemBacking::open(&empty, true).unwrap();
        assert_eq!(backing.region_size(), 4 << 20);
        assert_eq!(backing.file_len, 3 << 20);
        std::fs::remove_file(&empty).unwrap();
    }
}
