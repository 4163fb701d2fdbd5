//! The virtio-blk device: configuration space, features, activation, and draining its queue.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::warn;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::request::{complete, execute, Disk, IoVecs};
use super::uring::AsyncIo;
use super::{ID_BYTES, QUEUE_SIZE, SECTOR_SIZE, VIRTIO_ID_BLOCK};
use crate::config::{CacheType, IoEngine, RateLimiterConfig};
use crate::devices::virtio::{
    drain_queue, needs_interrupt, ActivateError, ChainBufs, ConfigSpace, RestoreError, VirtioBase,
    VirtioDevice, VirtioState, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::metrics::BlockMetrics;
use crate::rate_limiter::{RateLimiter, RateLimiterError};
use crate::vstate::memory::GuestMemoryMmap;

/// Feature bit: the device is read-only (virtio 1.2, 5.2.3).
const VIRTIO_BLK_F_RO: u32 = 5;
/// Feature bit: the device supports the flush command.
const VIRTIO_BLK_F_FLUSH: u32 = 9;

/// Errors while opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("cannot open disk image {}", .0.display())]
    Open(PathBuf, #[source] std::io::Error),
    /// The image is not a regular file or block device, or is empty.
    #[error("disk image {} {}", .0.display(), .1)]
    Unusable(PathBuf, &'static str),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// io_uring cannot be set up (an old kernel, `kernel.io_uring_disabled`, seccomp).
    #[error("disk {}: io_engine Async needs io_uring, which this host refuses (use io_engine Sync)", .0.display())]
    IoUring(PathBuf, #[source] std::io::Error),
    /// The rate limiter could not be set up.
    #[error(transparent)]
    RateLimiter(#[from] RateLimiterError),
    /// The image's size is not the one the snapshot saw.
    #[error("disk image {} has {now} sectors, the snapshot's had {saved}", .path.display())]
    SizeChanged {
        /// The image.
        path: PathBuf,
        /// Sectors in the snapshot.
        saved: u64,
        /// Sectors now.
        now: u64,
    },
    /// The saved virtio state cannot be put back.
    #[error("disk {0}: cannot restore its saved state")]
    Restore(String, #[source] RestoreError),
}

/// A block device as a snapshot holds it: the image is opened again by path (its contents are
/// the host's, not the snapshot's), the rest is put back as it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The image.
    pub path: PathBuf,
    /// Opened read-only.
    pub read_only: bool,
    /// Its size in sectors, checked again at restore.
    pub nsectors: u64,
    /// The rate limiter's shape (its buckets start full).
    #[serde(with = "crate::rate_limiter::saved_shape")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// Whether flush is offered.
    pub cache_type: CacheType,
    /// How requests are carried out (none is in flight in a snapshot).
    pub io_engine: IoEngine,
    /// Features, interrupt, configuration and queues.
    pub virtio: VirtioState,
}

/// Opens a disk image, refusing anything but a regular file or a block device.
///
/// The open is non-blocking: opening a FIFO read-only otherwise waits for a writer, which may
/// never come, and would hang Skiff (through the API, the controller and every later
/// request). The type is checked on the opened descriptor, so the path cannot be swapped
/// between the check and the open; then the flag is cleared, as the I/O path expects
/// blocking reads and writes.
pub fn open_image(path: &Path, read_only: bool) -> Result<File, BlockError> {
    let open_err = |e| BlockError::Open(path.to_owned(), e);
    // Refused before the open as well: opening some devices has effects of its own (a
    // watchdog starts counting); the check after the open is the one that holds.
    let kind = std::fs::metadata(path).map_err(open_err)?.file_type();
    if !kind.is_file() && !kind.is_block_device() && !kind.is_dir() {
        return Err(BlockError::Unusable(
            path.to_owned(),
            "is not a regular file or block device",
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(open_err)?;
    let kind = file.metadata().map_err(open_err)?.file_type();
    if kind.is_dir() {
        return Err(BlockError::Unusable(path.to_owned(), "is a directory"));
    }
    if !kind.is_file() && !kind.is_block_device() {
        return Err(BlockError::Unusable(
            path.to_owned(),
            "is not a regular file or block device",
        ));
    }
    crate::devices::clear_nonblocking(&file).map_err(open_err)?;
    Ok(file)
}

/// What the device works on once the driver is ready.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
}

/// A virtio block device backed by a raw image.
pub struct Block {
    /// The Async engine's ring; None for Sync. Before `file`, so it is dropped first.
    engine: Option<AsyncIo>,
    file: File,
    path: PathBuf,
    cache_type: CacheType,
    /// The image's path, as log lines name it.
    name: String,
    nsectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    pub(super) base: VirtioBase,
    active: Option<Active>,
    iovecs: IoVecs,
    chain: ChainBufs,
    metrics: Arc<BlockMetrics>,
    /// Limits the guest's requests; unlimited until configured.
    pub(super) rate_limiter: RateLimiter,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("nsectors", &self.nsectors)
            .field("read_only", &self.read_only)
            .field("rate_limiter", &self.rate_limiter.config())
            .finish()
    }
}

impl Block {
    /// Opens `path` (read-only if asked) as a disk whose GET_ID answer is `id`, with flush
    /// offered.
    pub fn new(path: &Path, read_only: bool, id: &str) -> Result<Self, BlockError> {
        Self::with_cache(path, read_only, id, CacheType::Writeback)
    }

    /// [`Block::new`] with the write cache `cache_type` describes: flush offered (and made
    /// durable) for Writeback, not offered for Unsafe, as Firecracker does.
    pub fn with_cache(
        path: &Path,
        read_only: bool,
        id: &str,
        cache_type: CacheType,
    ) -> Result<Self, BlockError> {
        Self::with_engine(path, read_only, id, cache_type, IoEngine::Sync)
    }

    /// [`Block::with_cache`] carrying requests out with `io_engine`. Async with io_uring
    /// refused by the host is an error, not a quiet fall back to Sync: Firecracker refuses
    /// such a drive too, and a user who asked for Async should learn they do not get it.
    pub fn with_engine(
        path: &Path,
        read_only: bool,
        id: &str,
        cache_type: CacheType,
        io_engine: IoEngine,
    ) -> Result<Self, BlockError> {
        let engine = match io_engine {
            IoEngine::Sync => None,
            IoEngine::Async => {
                Some(AsyncIo::new().map_err(|e| BlockError::IoUring(path.to_owned(), e))?)
            }
        };
        let file = open_image(path, read_only)?;
        let size = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0))
            .map_err(|e| BlockError::Open(path.to_owned(), e))?;
        if size < SECTOR_SIZE {
            return Err(BlockError::Unusable(
                path.to_owned(),
                "is smaller than one 512-byte sector",
            ));
        }
        if size % SECTOR_SIZE != 0 {
            warn!(
                "disk {}: the last {} bytes are not a whole sector and stay unused",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        let nsectors = size / SECTOR_SIZE;
        let mut id_bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_RING_F_EVENT_IDX);
        if cache_type == CacheType::Writeback {
            avail_features |= 1u64 << VIRTIO_BLK_F_FLUSH;
        }
        if read_only {
            avail_features |= 1u64 << VIRTIO_BLK_F_RO;
        }
        Ok(Self {
            engine,
            file,
            path: path.to_owned(),
            cache_type,
            name: path.display().to_string(),
            nsectors,
            read_only,
            id: id_bytes,
            // Capacity in sectors (virtio 1.2, 5.2.4); nothing the driver may write.
            base: VirtioBase::new(
                avail_features,
                1,
                ConfigSpace::new(nsectors.to_le_bytes().to_vec(), 0..0),
            )
            .map_err(BlockError::EventFd)?,
            active: None,
            iovecs: IoVecs::default(),
            chain: ChainBufs::default(),
            metrics: Arc::new(BlockMetrics::default()),
            rate_limiter: RateLimiter::unlimited()?,
        })
    }

    /// The device's state, for a snapshot.
    pub fn save(&self) -> BlockState {
        BlockState {
            path: self.path.clone(),
            read_only: self.read_only,
            nsectors: self.nsectors,
            rate_limiter: self.rate_limiter.config(),
            cache_type: self.cache_type,
            io_engine: self.io_engine(),
            virtio: self.base.save(&self.active_queues()),
        }
    }

    /// A device as `state` saved it, answering GET_ID with `id`: the image is opened again
    /// and must have kept its size. Its queues come back when the transport is restored.
    pub fn from_state(id: &str, state: &BlockState) -> Result<Self, BlockError> {
        let mut block = Self::with_engine(
            &state.path,
            state.read_only,
            id,
            state.cache_type,
            state.io_engine,
        )?;
        if block.nsectors != state.nsectors {
            return Err(BlockError::SizeChanged {
                path: state.path.clone(),
                saved: state.nsectors,
                now: block.nsectors,
            });
        }
        if let Some(limiter) = &state.rate_limiter {
            block.update_rate_limiter(limiter)?;
        }
        block
            .base
            .restore(&state.virtio)
            .map_err(|e| BlockError::Restore(id.to_owned(), e))?;
        Ok(block)
    }

    /// Puts the disk on another image, as `PATCH /drives` with `path_on_host` does after boot:
    /// opened as the old one was (read-only or not), its capacity in the configuration space
    /// and a configuration interrupt telling the driver (virtio 1.2, 4.2.2). Requests already
    /// taken were done on the old image; the next ones go to the new one.
    pub fn swap_image(&mut self, path: &Path) -> Result<(), BlockError> {
        let file = open_image(path, self.read_only)?;
        let size = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0))
            .map_err(|e| BlockError::Open(path.to_owned(), e))?;
        if size < SECTOR_SIZE {
            return Err(BlockError::Unusable(
                path.to_owned(),
                "is smaller than one 512-byte sector",
            ));
        }
        // Requests in flight finish on the image they were taken for.
        self.complete_in_flight();
        self.file = file;
        self.path = path.to_owned();
        self.name = path.display().to_string();
        self.nsectors = size / SECTOR_SIZE;
        let capacity = self.nsectors.to_le_bytes();
        self.base
            .config
            .update(|bytes| bytes.copy_from_slice(&capacity));
        if let Err(e) = self.base.irq.trigger_config() {
            warn!(
                "disk {}: cannot raise the configuration interrupt: {e}",
                self.name
            );
        }
        Ok(())
    }

    /// Changes the rate limiter as a `PATCH /drives` body does (the buckets given replace
    /// the current ones; see [`RateLimiterConfig::patch`]); at build time, sets it. A queue
    /// the old limits held back is looked at again at once, on the event thread.
    pub fn update_rate_limiter(&mut self, update: &RateLimiterConfig) -> Result<(), BlockError> {
        Ok(self.rate_limiter.patch(update)?)
    }

    /// The rate limiter's current shape.
    pub fn rate_limiter(&self) -> Option<RateLimiterConfig> {
        self.rate_limiter.config()
    }

    /// The engine carrying requests out.
    pub fn io_engine(&self) -> IoEngine {
        if self.engine.is_some() {
            IoEngine::Async
        } else {
            IoEngine::Sync
        }
    }

    /// The Async engine's completion eventfd, which the event thread watches.
    pub(super) fn completion_evt(&self) -> Option<&vmm_sys_util::eventfd::EventFd> {
        self.engine.as_ref().map(AsyncIo::completion_evt)
    }

    /// Answers every Async request that completed: status byte, used ring, and one interrupt
    /// for the batch if the driver wants it (EVENT_IDX). A ring that was full takes the
    /// requests left on the available ring again.
    pub fn process_completions(&mut self) {
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        let was_full = engine.is_full();
        self.answer_completions(false);
        if was_full {
            self.process_queue();
        }
    }

    /// Waits for every Async request in flight and answers it: after this, no guest memory
    /// is written for this device until the next queue drain. The snapshot takes the device
    /// only after this, so the restored guest finds every request it had in flight answered.
    pub fn complete_in_flight(&mut self) {
        let Some(engine) = self.engine.as_ref() else {
            return;
        };
        let was_full = engine.is_full();
        self.answer_completions(true);
        // A full ring left requests on the available ring with notifications off: only a
        // drain takes them, and this may run off the event thread (snapshot, image swap).
        if was_full && self.active.is_some() {
            let _ = self.base.queue_events[0].write(1);
        }
    }

    /// Takes completions (with `wait`, until none is in flight) and answers them; with no
    /// active queue (reset, broken) they are dropped, their data moved but not reported.
    fn answer_completions(&mut self, wait: bool) {
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        let (name, metrics) = (&self.name, &self.metrics);
        let mut used = false;
        let mut answer = |c: super::uring::Completion| {
            if wait {
                crate::metrics::inc(&metrics.io_engine_waited);
            }
            let (status, given) = complete(&c, name, metrics);
            let Some(active) = self.active.as_mut() else {
                return;
            };
            let len = match active.mem.write_obj(status, GuestAddress(c.status_addr)) {
                Ok(()) => given.saturating_add(1),
                Err(_) => 0,
            };
            if active.queue.add_used(&active.mem, c.head, len).is_err() {
                crate::guest_log!(log::Level::Debug, "virtio: cannot add a used element");
            }
            used = true;
        };
        if wait {
            engine.wait_all(fd, &mut answer);
        } else {
            engine.reap(fd, &mut answer);
        }
        let submits = engine.submits;
        self.metrics
            .io_engine_submits
            .store(submits, std::sync::atomic::Ordering::Relaxed);
        if let Some(active) = self.active.as_mut().filter(|_| used) {
            if needs_interrupt(&mut active.queue, &active.mem) {
                if let Err(e) = self.base.irq.trigger_queue(0) {
                    crate::guest_log!(log::Level::Warn, "virtio: cannot raise interrupt: {e}");
                }
            }
        }
    }

    /// The device's counters, shared with the metrics dump.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// Drains the request queue (see [`drain_queue`]) as far as the rate limiter allows; a
    /// request it holds back stays on the queue until the limiter's timer fires. A queue the
    /// driver broke is dropped until the driver resets the device, which is told it needs one.
    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if self.rate_limiter.is_blocked() {
            return;
        }
        let mem = &active.mem;
        let queue = &mut active.queue;
        let mut disk = Disk {
            file: &self.file,
            name: &self.name,
            nsectors: self.nsectors,
            read_only: self.read_only,
            id: &self.id,
            iovecs: &mut self.iovecs,
            metrics: &self.metrics,
            chain: &mut self.chain,
            engine: self.engine.as_mut(),
        };
        let drained = drain_queue(
            queue,
            mem,
            &self.base.queue_events[0],
            self.base.queue_irq(0),
            |chain| execute(chain, mem, &mut disk, &mut self.rate_limiter),
        );
        // One submission for the whole drain.
        if let Some(engine) = self.engine.as_mut() {
            if let Err(e) = engine.submit() {
                // The ring is unusable: what it holds is answered as it fails; the queue stops.
                log::error!("disk {}: io_uring submission failed: {e}", self.name);
                self.complete_in_flight();
                self.active = None;
                self.base.irq.signal_needs_reset();
                return;
            }
        }
        if drained.is_err() {
            // Requests the driver still has in flight finish before the queue goes.
            self.active = None;
            self.complete_in_flight();
            self.base.irq.signal_needs_reset();
        }
    }
}

impl VirtioDevice for Block {
    fn base(&self) -> &VirtioBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
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
        // The driver gave its buffers back: no request may write them after this returns.
        self.active = None;
        if let Some(n) = self
            .engine
            .as_ref()
            .map(AsyncIo::in_flight)
            .filter(|&n| n > 0)
        {
            crate::guest_log!(
                log::Level::Debug,
                "disk {}: reset with {n} requests in flight: waiting for them, answering none",
                self.name
            );
        }
        self.complete_in_flight();
        self.base.acked_features = 0;
    }

    fn active_queues(&self) -> Vec<&Queue> {
        self.active.iter().map(|a| &a.queue).collect()
    }
}

impl Drop for Block {
    /// Waits for requests in flight while the image is still open (see [`AsyncIo`]'s drop).
    fn drop(&mut self) {
        self.active = None;
        self.complete_in_flight();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flush is offered only for a Writeback cache, as Firecracker offers it.
    #[test]
    fn flush_is_offered_only_with_a_writeback_cache() {
        let path = std::env::temp_dir().join(format!("skiff-cache-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let flush = |cache| {
            let block = Block::with_cache(&path, false, "c", cache).unwrap();
            block.avail_features() & (1u64 << VIRTIO_BLK_F_FLUSH) != 0
        };
        assert!(!flush(CacheType::Unsafe));
        assert!(flush(CacheType::Writeback));
        assert_eq!(
            Block::with_cache(&path, false, "c", CacheType::Unsafe)
                .unwrap()
                .save()
                .cache_type,
            CacheType::Unsafe
        );
        std::fs::remove_file(&path).unwrap();
    }

    /// Requests the ring holds when the driver resets the device (here: read, reaped by
    /// nobody yet) are waited for and answered to nobody: no status byte, no used element. The
    /// same requests before a snapshot are answered (status, used ring), as the snapshot's
    /// wait does; either way nothing is left in flight.
    #[test]
    fn a_reset_answers_nothing_and_a_snapshot_wait_answers_everything() {
        use virtio_queue::desc::split::Descriptor as SplitDescriptor;
        use virtio_queue::desc::RawDescriptor;
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::GuestAddress;
        let path = std::env::temp_dir().join(format!("skiff-reset-{}", std::process::id()));
        std::fs::write(&path, vec![0x5au8; 64 << 10]).unwrap();
        for reset in [true, false] {
            let m = crate::vstate::memory::anonymous(&[(GuestAddress(0), 0x10_0000)]).unwrap();
            let mut blk =
                Block::with_engine(&path, false, "d", CacheType::Unsafe, IoEngine::Async).unwrap();
            blk.set_acked_features(1 << VIRTIO_F_VERSION_1);
            let vq = MockSplitQueue::new(&m, 16);
            let mut descs = Vec::new();
            for i in 0..4u16 {
                let base = 0x4_0000 + u64::from(i) * 0x2000;
                m.write_obj([0u32, 0, u32::from(i), 0], GuestAddress(base))
                    .unwrap();
                m.write_obj(0xeeu8, GuestAddress(base + 0x1fff)).unwrap();
                let d = 3 * i;
                descs.push(RawDescriptor::from(SplitDescriptor::new(
                    base,
                    16,
                    1,
                    d + 1,
                )));
                descs.push(RawDescriptor::from(SplitDescriptor::new(
                    base + 0x1000,
                    512,
                    3,
                    d + 2,
                )));
                descs.push(RawDescriptor::from(SplitDescriptor::new(
                    base + 0x1fff,
                    1,
                    2,
                    0,
                )));
            }
            vq.add_desc_chains(&descs, 0).unwrap();
            blk.activate(m.clone(), vec![vq.create_queue().unwrap()])
                .unwrap();
            blk.process_queue();
            let engine = blk.engine.as_ref().unwrap();
            assert_eq!(engine.in_flight(), 4, "taken, not yet answered");
            let statuses = |m: &GuestMemoryMmap| -> Vec<u8> {
                (0..4u64)
                    .map(|i| m.read_obj(GuestAddress(0x4_1fff + i * 0x2000)).unwrap())
                    .collect()
            };
            assert_eq!(statuses(&m), [0xee; 4]);
            if reset {
                blk.reset();
                assert_eq!(statuses(&m), [0xee; 4], "a status written after the reset");
                assert_eq!(vq.used().idx().load(), 0, "a used element after the reset");
            } else {
                blk.complete_in_flight();
                assert_eq!(statuses(&m), [0; 4]);
                assert_eq!(vq.used().idx().load(), 4);
                let mut data = [0u8; 512];
                m.read_slice(&mut data, GuestAddress(0x4_1000)).unwrap();
                assert_eq!(data, [0x5a; 512]);
            }
            assert_eq!(blk.engine.as_ref().unwrap().in_flight(), 0);
            assert_eq!(blk.metrics.to_json()["io_engine_waited"], 4);
        }
        std::fs::remove_file(&path).unwrap();
    }

    /// A host that refuses io_uring (here a seccomp filter answering EPERM, as container
    /// runtimes' default profiles do) makes an Async drive a one-line error naming the disk
    /// and the way out; Sync still works there.
    #[test]
    fn async_without_io_uring_is_a_clear_error() {
        use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
        let path = std::env::temp_dir().join(format!("skiff-nouring-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let inner = path.clone();
        let (err, sync_ok) = std::thread::spawn(move || {
            let rules = [(libc::SYS_io_uring_setup, vec![])].into_iter().collect();
            let filter = SeccompFilter::new(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(libc::EPERM as u32),
                TargetArch::x86_64,
            )
            .unwrap();
            let prog: BpfProgram = filter.try_into().unwrap();
            seccompiler::apply_filter(&prog).unwrap();
            let err = Block::with_engine(&inner, false, "d", CacheType::Unsafe, IoEngine::Async)
                .unwrap_err();
            let sync = Block::with_engine(&inner, false, "d", CacheType::Unsafe, IoEngine::Sync);
            (err, sync.is_ok())
        })
        .join()
        .unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "disk {}: io_engine Async needs io_uring, which this host refuses (use io_engine Sync)",
                path.display()
            )
        );
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert!(cause.contains("not permitted"), "{cause}");
        assert!(sync_ok);
        std::fs::remove_file(&path).unwrap();
    }
}
