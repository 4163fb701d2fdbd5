//! The memory device: its configuration space (virtio 1.2, 5.15.4), the plugged state of each
//! block, and the requests (5.15.6): PLUG, UNPLUG, UNPLUG_ALL and STATE, each checked against
//! the block size, the usable region and the requested size. Plugging makes the blocks fresh
//! memory and their KVM slots present; unplugging removes a slot once none of its blocks is
//! plugged, and makes the blocks no memory again (`PROT_NONE`, their pages given back to the
//! host: see [`GuestRegion`]), so that a guest reaches no more than it plugged, even inside a
//! slot that stays present.

use std::ops::Range;
use std::sync::Arc;

use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestAddress};

use super::{QUEUE_SIZE, VIRTIO_ID_MEM};
use crate::config::MemoryHotplugConfig;
use crate::devices::virtio::{
    drain_queue, split_chain, ActivateError, ChainBufs, ConfigSpace, Handled, RestoreError,
    VirtioBase, VirtioDevice, VirtioState, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::guest_log;
use crate::metrics::{add, inc, MemoryHotplugMetrics};
use crate::vstate::memory::{GuestMemoryMmap, GuestRegion, HotplugSlots, MemoryError};

/// Feature bit: the driver does not touch unplugged memory (virtio 1.2, 5.15.3). Required, as
/// Firecracker requires it: a slot with no plugged block is no memory to the guest.
const VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: u32 = 1;

/// Request types (virtio 1.2, 5.15.6).
const REQ_PLUG: u16 = 0;
const REQ_UNPLUG: u16 = 1;
const REQ_UNPLUG_ALL: u16 = 2;
const REQ_STATE: u16 = 3;
/// Response types.
const RESP_ACK: u16 = 0;
const RESP_NACK: u16 = 1;
const RESP_ERROR: u16 = 3;
/// Block states in a STATE response.
const STATE_PLUGGED: u16 = 0;
const STATE_UNPLUGGED: u16 = 1;
const STATE_MIXED: u16 = 2;
/// struct virtio_mem_req: type, padding, then address and block count.
const REQUEST_BYTES: usize = 24;
/// struct virtio_mem_resp: type, padding, then the state.
const RESPONSE_BYTES: usize = 10;

/// Offsets in struct virtio_mem_config (virtio 1.2, 5.15.4).
const CFG_BLOCK_SIZE: usize = 0;
const CFG_ADDR: usize = 16;
const CFG_REGION_SIZE: usize = 24;
const CFG_USABLE_REGION_SIZE: usize = 32;
const CFG_PLUGGED_SIZE: usize = 40;
const CFG_REQUESTED_SIZE: usize = 48;
const CONFIG_BYTES: usize = 56;

const MIB: u64 = 1 << 20;

/// Errors while setting up, restoring or resizing the memory device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioMemError {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The region's KVM slots cannot be set up.
    #[error("memory hot-plug: cannot set up the region's KVM memory slots")]
    Slots(#[source] MemoryError),
    /// A requested size the device cannot take.
    #[error("requested_size_mib {requested} must be a multiple of block_size_mib {block} and at most total_size_mib {total}")]
    RequestedSize {
        /// Asked for.
        requested: u64,
        /// The block size.
        block: u64,
        /// The region's size.
        total: u64,
    },
    /// The saved state does not describe a region this device can manage.
    #[error("memory hot-plug: the saved state is invalid: {0}")]
    Invalid(&'static str),
    /// The plugged blocks of a saved state cannot be made accessible.
    #[error("memory hot-plug: cannot make the plugged blocks accessible")]
    Access(#[source] std::io::Error),
    /// The saved virtio state cannot be put back.
    #[error("memory hot-plug: cannot restore its saved state")]
    Restore(#[source] RestoreError),
}

/// The memory device as a snapshot holds it: the region and its sizes, and which blocks are
/// plugged (the plugged blocks' contents are in the memory file, with the rest of guest
/// memory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMemState {
    /// Guest physical address of the region.
    pub addr: u64,
    /// Its size in bytes.
    pub region_size: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// KVM slot size in bytes.
    pub slot_size: u64,
    /// The part of the region the driver may plug in.
    pub usable_region_size: u64,
    /// What the host asked the guest to have plugged.
    pub requested_size: u64,
    /// One bit per block, 64 to a word: plugged.
    pub plugged: Vec<u64>,
    /// Features, interrupt, configuration and queue.
    pub virtio: VirtioState,
}

/// What `GET /hotplug/memory` answers (Firecracker's MemoryHotplugStatus).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryHotplugStatus {
    /// The region's size.
    pub total_size_mib: u64,
    /// The KVM slot size.
    pub slot_size_mib: u64,
    /// The block size.
    pub block_size_mib: u64,
    /// What the guest has plugged.
    pub plugged_size_mib: u64,
    /// What the host asked for.
    pub requested_size_mib: u64,
}

/// The region's blocks as the driver sees them: sizes, and a bit per block, set when plugged.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Blocks {
    addr: u64,
    region_size: u64,
    block_size: u64,
    slot_size: u64,
    usable_region_size: u64,
    requested_size: u64,
    plugged: Vec<u64>,
    plugged_blocks: u64,
}

/// Why a request is refused: the response type it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// NACK: more than requested (virtio 1.2, 5.15.6.1).
    Nack,
    /// ERROR: a range that is unaligned, empty, outside the usable region, or in the wrong state.
    Error,
}

impl Blocks {
    fn new(addr: u64, region_size: u64, block_size: u64, slot_size: u64) -> Self {
        let blocks = region_size / block_size;
        Self {
            addr,
            region_size,
            block_size,
            slot_size,
            usable_region_size: 0,
            requested_size: 0,
            plugged: vec![0; usize::try_from(blocks.div_ceil(64)).unwrap_or(0)],
            plugged_blocks: 0,
        }
    }

    fn plugged_size(&self) -> u64 {
        self.plugged_blocks * self.block_size
    }

    fn is_plugged(&self, block: u64) -> bool {
        let (word, bit) = (
            usize::try_from(block / 64).unwrap_or(usize::MAX),
            block % 64,
        );
        self.plugged.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    /// The blocks `nb_blocks` from `addr`, when that is a whole, non-empty run of blocks in the
    /// usable region (virtio 1.2, 5.15.6.1-3).
    fn range(&self, addr: u64, nb_blocks: u16) -> Option<Range<u64>> {
        let offset = addr.checked_sub(self.addr)?;
        if nb_blocks == 0 || !offset.is_multiple_of(self.block_size) {
            return None;
        }
        let first = offset / self.block_size;
        let end = first.checked_add(u64::from(nb_blocks))?;
        (end * self.block_size <= self.usable_region_size).then_some(first..end)
    }

    fn count_plugged(&self, blocks: Range<u64>) -> u64 {
        blocks.filter(|&b| self.is_plugged(b)).count() as u64
    }

    /// The STATE answer for `blocks`.
    fn state(&self, blocks: Range<u64>) -> u16 {
        let n = blocks.end - blocks.start;
        match self.count_plugged(blocks) {
            0 => STATE_UNPLUGGED,
            p if p == n => STATE_PLUGGED,
            _ => STATE_MIXED,
        }
    }

    fn set(&mut self, blocks: Range<u64>, plugged: bool) {
        for b in blocks {
            if self.is_plugged(b) == plugged {
                continue;
            }
            let (word, bit) = (usize::try_from(b / 64).unwrap_or(usize::MAX), b % 64);
            if let Some(w) = self.plugged.get_mut(word) {
                *w ^= 1 << bit;
                if plugged {
                    self.plugged_blocks += 1;
                } else {
                    self.plugged_blocks -= 1;
                }
            }
        }
    }

    /// PLUG: every block unplugged, and no more plugged in all than requested.
    fn plug(&mut self, addr: u64, nb_blocks: u16) -> Result<Range<u64>, Refusal> {
        let blocks = self.range(addr, nb_blocks).ok_or(Refusal::Error)?;
        if self.plugged_size() + u64::from(nb_blocks) * self.block_size > self.requested_size {
            return Err(Refusal::Nack);
        }
        if self.count_plugged(blocks.clone()) != 0 {
            return Err(Refusal::Error);
        }
        self.set(blocks.clone(), true);
        Ok(blocks)
    }

    /// UNPLUG: every block plugged.
    fn unplug(&mut self, addr: u64, nb_blocks: u16) -> Result<Range<u64>, Refusal> {
        let blocks = self.range(addr, nb_blocks).ok_or(Refusal::Error)?;
        if self.count_plugged(blocks.clone()) != u64::from(nb_blocks) {
            return Err(Refusal::Error);
        }
        self.set(blocks.clone(), false);
        Ok(blocks)
    }

    /// UNPLUG_ALL: nothing plugged, and the usable region shrunk to what the requested size
    /// needs (it never falls below it, virtio 1.2, 5.15.4).
    fn unplug_all(&mut self) {
        self.plugged.fill(0);
        self.plugged_blocks = 0;
        self.usable_region_size = self.usable_for(self.requested_size);
    }

    /// The usable region a requested size needs: whole slots, as Firecracker grows it.
    fn usable_for(&self, requested: u64) -> u64 {
        requested
            .next_multiple_of(self.slot_size)
            .min(self.region_size)
    }

    /// The slots that `blocks` touch.
    fn slots_of(&self, blocks: &Range<u64>) -> Range<usize> {
        let per_slot = self.slot_size / self.block_size;
        let first = usize::try_from(blocks.start / per_slot).unwrap_or(usize::MAX);
        let end = usize::try_from(blocks.end.div_ceil(per_slot)).unwrap_or(usize::MAX);
        first..end
    }

    /// Whether any block of slot `index` is plugged.
    fn slot_in_use(&self, index: usize) -> bool {
        let per_slot = self.slot_size / self.block_size;
        let first = index as u64 * per_slot;
        self.count_plugged(first..first + per_slot) != 0
    }

    /// struct virtio_mem_config, little-endian (node_id and its padding zero).
    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; CONFIG_BYTES];
        for (at, value) in [
            (CFG_BLOCK_SIZE, self.block_size),
            (CFG_ADDR, self.addr),
            (CFG_REGION_SIZE, self.region_size),
            (CFG_USABLE_REGION_SIZE, self.usable_region_size),
            (CFG_PLUGGED_SIZE, self.plugged_size()),
            (CFG_REQUESTED_SIZE, self.requested_size),
        ] {
            c[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        c
    }
}

/// What the device works on once the driver is ready.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
}

/// A virtio-mem device.
pub struct VirtioMem {
    blocks: Blocks,
    slots: HotplugSlots,
    pub(super) base: VirtioBase,
    active: Option<Active>,
    chain: ChainBufs,
    metrics: Arc<MemoryHotplugMetrics>,
}

impl std::fmt::Debug for VirtioMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMem")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl VirtioMem {
    /// A device managing `mem`'s hot-plug region at `addr` as `config` shapes it, nothing
    /// plugged and nothing requested; with `log_dirty`, the slots it makes present log the
    /// guest's writes.
    pub fn new(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        addr: u64,
        config: &MemoryHotplugConfig,
        log_dirty: bool,
    ) -> Result<Self, VirtioMemError> {
        let blocks = Blocks::new(
            addr,
            config.total_size_mib * MIB,
            config.block_size_mib * MIB,
            config.slot_size_mib * MIB,
        );
        Self::with_blocks(vm, mem, blocks, log_dirty)
    }

    fn with_blocks(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        blocks: Blocks,
        log_dirty: bool,
    ) -> Result<Self, VirtioMemError> {
        let slots = HotplugSlots::new(
            vm,
            mem,
            blocks.addr,
            blocks.region_size,
            blocks.slot_size,
            log_dirty,
        )
        .map_err(VirtioMemError::Slots)?;
        let features = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE);
        // Nothing in the configuration space is the driver's to write.
        let config = ConfigSpace::new(blocks.config(), 0..0);
        Ok(Self {
            blocks,
            slots,
            base: VirtioBase::new(features, 1, config).map_err(VirtioMemError::EventFd)?,
            active: None,
            chain: ChainBufs::default(),
            metrics: Arc::new(MemoryHotplugMetrics::default()),
        })
    }

    /// The device's state, for a snapshot.
    pub fn save(&self) -> VirtioMemState {
        let b = &self.blocks;
        VirtioMemState {
            addr: b.addr,
            region_size: b.region_size,
            block_size: b.block_size,
            slot_size: b.slot_size,
            usable_region_size: b.usable_region_size,
            requested_size: b.requested_size,
            plugged: b.plugged.clone(),
            virtio: self.base.save(&self.active_queues()),
        }
    }

    /// A device as `state` saved it, over `mem`'s hot-plug region (which the memory file filled):
    /// the slots of its plugged blocks present again. Its queue comes back when the transport
    /// is restored.
    pub fn from_state(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        state: &VirtioMemState,
        log_dirty: bool,
    ) -> Result<Self, VirtioMemError> {
        let s = state;
        let block_ok = s.block_size >= MemoryHotplugConfig::MIN_BLOCK_SIZE_MIB * MIB
            && s.block_size.is_power_of_two();
        let slot_ok = block_ok && s.slot_size != 0 && s.slot_size.is_multiple_of(s.block_size);
        if !slot_ok || s.region_size == 0 || !s.region_size.is_multiple_of(s.slot_size) {
            return Err(VirtioMemError::Invalid("block, slot and region sizes"));
        }
        let mut blocks = Blocks::new(s.addr, s.region_size, s.block_size, s.slot_size);
        if s.plugged.len() != blocks.plugged.len() {
            return Err(VirtioMemError::Invalid("the plugged bitmap's length"));
        }
        if s.usable_region_size > s.region_size || s.requested_size > s.usable_region_size {
            return Err(VirtioMemError::Invalid("usable or requested size"));
        }
        blocks.usable_region_size = s.usable_region_size;
        blocks.requested_size = s.requested_size;
        let count = s.region_size / s.block_size;
        for (i, &word) in (0u64..).zip(&s.plugged) {
            for bit in (0..64).filter(|bit| word & (1 << bit) != 0) {
                if i * 64 + bit >= count {
                    return Err(VirtioMemError::Invalid(
                        "a plugged block outside the region",
                    ));
                }
                blocks.set(i * 64 + bit..i * 64 + bit + 1, true);
            }
        }
        let region = hotplug_region(mem, blocks.addr)
            .ok_or(VirtioMemError::Invalid("no hot-plug region at its address"))?;
        for block in (0..count).filter(|&b| blocks.is_plugged(b)) {
            (region.restore_plugged(block * blocks.block_size, blocks.block_size))
                .map_err(VirtioMemError::Access)?;
        }
        let mut mem_dev = Self::with_blocks(vm, mem, blocks, log_dirty)?;
        for index in 0..mem_dev.slots.count() {
            if mem_dev.blocks.slot_in_use(index) {
                (mem_dev.slots.set_present(index, true)).map_err(VirtioMemError::Slots)?;
            }
        }
        mem_dev
            .base
            .restore(&state.virtio)
            .map_err(VirtioMemError::Restore)?;
        Ok(mem_dev)
    }

    /// What `GET /hotplug/memory` shows.
    pub fn status(&self) -> MemoryHotplugStatus {
        let b = &self.blocks;
        MemoryHotplugStatus {
            total_size_mib: b.region_size / MIB,
            slot_size_mib: b.slot_size / MIB,
            block_size_mib: b.block_size / MIB,
            plugged_size_mib: b.plugged_size() / MIB,
            requested_size_mib: b.requested_size / MIB,
        }
    }

    /// Asks the guest to have `mib` MiB plugged (`PATCH /hotplug/memory`): the usable region
    /// grows to whole slots that hold it if it must (it shrinks only when the driver asks, with
    /// UNPLUG_ALL), and the driver gets a configuration interrupt.
    pub fn update_requested_size(&mut self, mib: u64) -> Result<(), VirtioMemError> {
        let b = &mut self.blocks;
        let requested = mib
            .checked_mul(MIB)
            .filter(|&r| r <= b.region_size && r.is_multiple_of(b.block_size));
        let Some(requested) = requested else {
            return Err(VirtioMemError::RequestedSize {
                requested: mib,
                block: b.block_size / MIB,
                total: b.region_size / MIB,
            });
        };
        b.requested_size = requested;
        b.usable_region_size = b.usable_region_size.max(b.usable_for(requested));
        let config = b.config();
        self.base.config.update(|c| c.copy_from_slice(&config));
        if let Err(e) = self.base.irq.trigger_config() {
            log::warn!("virtio-mem: cannot raise the configuration interrupt: {e}");
        }
        Ok(())
    }

    /// The region's KVM slots, for the dirty pages of a snapshot.
    pub fn hotplug_slots(&self) -> &HotplugSlots {
        &self.slots
    }

    /// The device's counters, shared with the metrics dump.
    pub fn metrics(&self) -> Arc<MemoryHotplugMetrics> {
        self.metrics.clone()
    }

    /// Answers the queued requests (see [`drain_queue`]). A queue the driver broke is dropped
    /// until the driver resets the device, which is told it needs one.
    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        inc(&self.metrics.queue_event_count);
        let mut work = Work {
            blocks: &mut self.blocks,
            slots: &mut self.slots,
            config: &self.base.config,
            metrics: &self.metrics,
        };
        let mem = &active.mem;
        let chain = &mut self.chain;
        let drained = drain_queue(
            &mut active.queue,
            mem,
            &self.base.queue_events[0],
            self.base.queue_irq(0),
            |c| handle_request(c, mem, chain, &mut work),
        );
        if drained.is_err() {
            self.active = None;
            self.base.irq.signal_needs_reset();
        }
    }
}

/// What a request may change: the blocks, the slots, the configuration space, the counters.
struct Work<'a> {
    blocks: &'a mut Blocks,
    slots: &'a mut HotplugSlots,
    config: &'a ConfigSpace,
    metrics: &'a MemoryHotplugMetrics,
}

impl Work<'_> {
    /// Shows the blocks' new plugged (and usable) size in the configuration space, before the
    /// answer reaches the used ring: a driver reads it as soon as it has the answer. No
    /// interrupt for it (virtio 1.2, 5.15.4).
    fn publish(&self) {
        let config = self.blocks.config();
        self.config.update(|c| c.copy_from_slice(&config));
    }

    /// Makes the slots of `blocks` present or not as their blocks now are; false when KVM
    /// refused.
    fn sync_slots(&mut self, blocks: &Range<u64>) -> bool {
        for index in self.blocks.slots_of(blocks) {
            let in_use = self.blocks.slot_in_use(index);
            if let Err(e) = self.slots.set_present(index, in_use) {
                guest_log!(log::Level::Warn, "virtio-mem: {}", crate::error_chain(&e));
                return false;
            }
        }
        true
    }

    /// Makes `len` bytes at `addr` no memory (see [`GuestRegion::unplug`]).
    fn make_inaccessible(&self, mem: &GuestMemoryMmap, addr: u64, len: u64) {
        let done =
            hotplug_region(mem, self.blocks.addr).map(|r| r.unplug(addr - self.blocks.addr, len));
        if !matches!(done, Some(Ok(()))) {
            guest_log!(
                log::Level::Warn,
                "virtio-mem: cannot give unplugged memory back: {done:?}"
            );
            inc(&self.metrics.unplug_discard_fails);
        }
    }

    fn plug(&mut self, addr: u64, nb_blocks: u16, mem: &GuestMemoryMmap) -> u16 {
        inc(&self.metrics.plug_count);
        let blocks = match self.blocks.plug(addr, nb_blocks) {
            Ok(blocks) => blocks,
            Err(refusal) => {
                inc(&self.metrics.plug_fails);
                return if refusal == Refusal::Nack {
                    RESP_NACK
                } else {
                    RESP_ERROR
                };
            }
        };
        let len = u64::from(nb_blocks) * self.blocks.block_size;
        let accessible =
            hotplug_region(mem, self.blocks.addr).map(|r| r.plug(addr - self.blocks.addr, len));
        if !matches!(accessible, Some(Ok(()))) || !self.sync_slots(&blocks) {
            if let Some(Err(e)) = accessible {
                guest_log!(log::Level::Warn, "virtio-mem: cannot plug memory: {e}");
            }
            self.blocks.set(blocks.clone(), false);
            self.sync_slots(&blocks);
            self.make_inaccessible(mem, addr, len);
            inc(&self.metrics.plug_fails);
            return RESP_ERROR;
        }
        self.publish();
        add(
            &self.metrics.plug_bytes,
            u64::from(nb_blocks) * self.blocks.block_size,
        );
        RESP_ACK
    }

    /// Unplugs and gives the pages back: slots left with no plugged block are removed from
    /// KVM first, so the guest cannot fault the pages in again while they are discarded.
    fn unplug(&mut self, addr: u64, nb_blocks: u16, mem: &GuestMemoryMmap) -> u16 {
        inc(&self.metrics.unplug_count);
        let Ok(blocks) = self.blocks.unplug(addr, nb_blocks) else {
            inc(&self.metrics.unplug_fails);
            return RESP_ERROR;
        };
        self.sync_slots(&blocks);
        let len = u64::from(nb_blocks) * self.blocks.block_size;
        self.make_inaccessible(mem, addr, len);
        self.publish();
        add(&self.metrics.unplug_bytes, len);
        RESP_ACK
    }

    fn unplug_all(&mut self, mem: &GuestMemoryMmap) -> u16 {
        inc(&self.metrics.unplug_all_count);
        let all = 0..self.blocks.region_size / self.blocks.block_size;
        self.blocks.unplug_all();
        self.sync_slots(&all);
        self.make_inaccessible(mem, self.blocks.addr, self.blocks.region_size);
        self.publish();
        RESP_ACK
    }
}

/// The hot-plug region of `mem`, which starts at `addr`.
fn hotplug_region(mem: &GuestMemoryMmap, addr: u64) -> Option<&GuestRegion> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.find_region(GuestAddress(addr))
        .filter(|r| r.start_addr().0 == addr)
}

/// One request (virtio 1.2, 5.15.6): a device-readable struct virtio_mem_req, then a
/// device-writable struct virtio_mem_resp. A chain without both is returned unanswered.
fn handle_request(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    bufs: &mut ChainBufs,
    work: &mut Work<'_>,
) -> Handled {
    let broken = |work: &Work<'_>| {
        guest_log!(
            log::Level::Debug,
            "virtio-mem: ignoring a malformed request"
        );
        inc(&work.metrics.invalid_requests);
        Handled::Used(0)
    };
    if !split_chain(chain, bufs) {
        return broken(work);
    }
    let (Some(request), Some(response)) = (bufs.readable.first(), bufs.writable.first()) else {
        return broken(work);
    };
    if (request.len as usize) < REQUEST_BYTES || (response.len as usize) < RESPONSE_BYTES {
        return broken(work);
    }
    let mut req = [0u8; REQUEST_BYTES];
    if mem
        .read_slice(&mut req, GuestAddress(request.addr))
        .is_err()
    {
        return broken(work);
    }
    let kind = u16::from_le_bytes([req[0], req[1]]);
    let mut addr = [0u8; 8];
    addr.copy_from_slice(&req[8..16]);
    let addr = u64::from_le_bytes(addr);
    let nb_blocks = u16::from_le_bytes([req[16], req[17]]);
    let (answer, state) = match kind {
        REQ_PLUG => (work.plug(addr, nb_blocks, mem), 0),
        REQ_UNPLUG => (work.unplug(addr, nb_blocks, mem), 0),
        REQ_UNPLUG_ALL => (work.unplug_all(mem), 0),
        REQ_STATE => {
            inc(&work.metrics.state_count);
            match work.blocks.range(addr, nb_blocks) {
                Some(blocks) => (RESP_ACK, work.blocks.state(blocks)),
                None => {
                    inc(&work.metrics.state_fails);
                    (RESP_ERROR, 0)
                }
            }
        }
        _ => {
            inc(&work.metrics.invalid_requests);
            (RESP_ERROR, 0)
        }
    };
    let mut resp = [0u8; RESPONSE_BYTES];
    resp[..2].copy_from_slice(&answer.to_le_bytes());
    resp[8..].copy_from_slice(&state.to_le_bytes());
    if mem.write_slice(&resp, GuestAddress(response.addr)).is_err() {
        return broken(work);
    }
    Handled::Used(u32::try_from(RESPONSE_BYTES).unwrap_or(0))
}

impl VirtioDevice for VirtioMem {
    fn base(&self) -> &VirtioBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_MEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        if !self.base.acked(VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE) {
            return Err(ActivateError::FeatureRequired(
                "VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE",
            ));
        }
        let queue = self.base.single_queue(queues)?;
        self.active = Some(Active { mem, queue });
        self.base.signal_activation()
    }

    /// The blocks keep their state across a reset (virtio 1.2, 5.15.5.2).
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

    const BASE: u64 = 1 << 32;
    const BLOCK: u64 = 2 * MIB;
    const SLOT: u64 = 128 * MIB;

    fn blocks() -> Blocks {
        let mut b = Blocks::new(BASE, 4 * SLOT, BLOCK, SLOT);
        b.requested_size = 100 * MIB;
        b.usable_region_size = b.usable_for(b.requested_size);
        b
    }

    /// Ranges must be aligned, non-empty and inside the usable region, which the requested
    /// size makes whole slots.
    #[test]
    fn ranges_are_checked_against_block_size_and_usable_region() {
        let b = blocks();
        assert_eq!(b.usable_region_size, SLOT);
        assert_eq!(b.range(BASE, 1), Some(0..1));
        assert_eq!(b.range(BASE + BLOCK * 63, 1), Some(63..64));
        assert_eq!(
            b.range(BASE + BLOCK * 63, 2),
            None,
            "past the usable region"
        );
        assert_eq!(b.range(BASE + 4096, 1), None, "unaligned");
        assert_eq!(b.range(BASE, 0), None, "empty");
        assert_eq!(b.range(BASE - BLOCK, 1), None, "before the region");
        assert_eq!(b.range(u64::MAX - 1, u16::MAX), None);
    }

    /// PLUG and UNPLUG follow the blocks' states; PLUG past the requested size is a NACK;
    /// STATE tells plugged, unplugged and mixed apart; UNPLUG_ALL empties the region and
    /// shrinks the usable region to what is requested.
    #[test]
    fn plug_unplug_and_state_follow_the_rules() {
        let mut b = blocks();
        assert_eq!(b.plug(BASE, 10), Ok(0..10));
        assert_eq!(
            b.plug(BASE + 9 * BLOCK, 2),
            Err(Refusal::Error),
            "overlaps plugged"
        );
        assert_eq!(b.plugged_size(), 20 * MIB);
        assert_eq!(
            b.plug(BASE + 10 * BLOCK, 41),
            Err(Refusal::Nack),
            "over 100 MiB"
        );
        assert_eq!(b.plug(BASE + 10 * BLOCK, 40), Ok(10..50));
        assert_eq!(b.state(0..50), STATE_PLUGGED);
        assert_eq!(b.state(40..60), STATE_MIXED);
        assert_eq!(b.state(50..64), STATE_UNPLUGGED);
        assert_eq!(
            b.unplug(BASE + 49 * BLOCK, 2),
            Err(Refusal::Error),
            "half unplugged"
        );
        assert_eq!(b.unplug(BASE + 40 * BLOCK, 10), Ok(40..50));
        assert_eq!(b.plugged_size(), 80 * MIB);
        assert!(b.slot_in_use(0) && !b.slot_in_use(1));
        assert_eq!(b.slots_of(&(60..70)), 0..2);
        b.requested_size = 0;
        b.unplug_all();
        assert_eq!((b.plugged_size(), b.usable_region_size), (0, 0));
        assert_eq!(b.plug(BASE, 1), Err(Refusal::Error), "nothing is usable");
    }

    #[test]
    fn the_config_space_is_virtio_mem_config() {
        let mut b = blocks();
        b.plug(BASE, 3).unwrap();
        let c = b.config();
        let word = |at: usize| u64::from_le_bytes(c[at..at + 8].try_into().unwrap());
        assert_eq!(c.len(), 56);
        assert_eq!(word(0), BLOCK);
        assert_eq!(word(8), 0, "node_id and padding");
        assert_eq!(word(16), BASE);
        assert_eq!(word(24), 4 * SLOT);
        assert_eq!(word(32), SLOT);
        assert_eq!(word(40), 6 * MIB);
        assert_eq!(word(48), 100 * MIB);
    }
}
