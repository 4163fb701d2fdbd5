//! The balloon device: features and queues from its configuration, the configuration space
//! (target, actual, hinting command), the work on each queue, and what the API asks of it.
//!
//! Queues, in order (virtio 1.2, 5.5.2): inflate, deflate, then the statistics queue when
//! statistics are on, the free page hinting queue when hinting is on, the reporting queue when
//! reporting is on. As in Firecracker, the driver must set up every queue the device offers.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::timerfd::TimerFd;

use super::stats::{BalloonStats, STAT_SIZE};
use super::{
    BALLOON_PAGE_SIZE, FREE_PAGE_HINT_DONE, FREE_PAGE_HINT_STOP, MAX_PAGES_PER_CHAIN, MAX_STATS,
    PAGES_PER_MIB, QUEUE_SIZE, VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_PAGE_REPORTING, VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_ID_BALLOON,
};
use crate::config::BalloonConfig;
use crate::devices::virtio::{
    drain_queue, needs_interrupt, split_chain, ActivateError, ChainBufs, ConfigSpace, Handled,
    RestoreError, VirtioBase, VirtioDevice, VirtioState, VIRTIO_F_VERSION_1,
};
use crate::guest_log;
use crate::metrics::{add, inc, BalloonMetrics};
use crate::vstate::memory::{discard_range, Discard, DiscardError, GuestMemoryMmap};

/// The inflate queue's index.
const INFLATE: usize = 0;
/// The deflate queue's index.
const DEFLATE: usize = 1;
/// Offsets in the configuration space (virtio 1.2, 5.5.4): `num_pages` (the target, set by
/// the device), `actual` (written by the driver), `free_page_hint_cmd_id` (set by the device).
const NUM_PAGES: usize = 0;
const ACTUAL: usize = 4;
const CMD_ID: usize = 8;

/// Errors of the balloon: setting it up, restoring it, and the API's requests. The texts of the
/// API's are Firecracker's.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// An eventfd or the statistics timer could not be created.
    #[error("cannot create an eventfd or timerfd")]
    EventFd(#[source] std::io::Error),
    /// The statistics timer could not be armed.
    #[error("cannot arm the statistics timer")]
    Timer(#[source] std::io::Error),
    /// The guest could not be told of a change.
    #[error("cannot raise the configuration interrupt")]
    Interrupt(#[source] std::io::Error),
    /// The saved virtio state cannot be put back.
    #[error("balloon: cannot restore its saved state")]
    Restore(#[source] RestoreError),
    /// A request that needs the driver before it set the device up.
    #[error("Device not activated yet.")]
    DeviceNotActive,
    /// A hinting request on a device configured without hinting.
    #[error("Attempting to use hinting when not enabled")]
    HintingNotEnabled,
    /// A statistics request on a device configured without statistics.
    #[error("Received stats query when stats are disabled.")]
    StatisticsDisabled,
    /// Statistics turned on or off after boot.
    #[error("Statistics cannot be enabled/disabled after activation.")]
    StatisticsStateChange,
    /// A target larger than guest memory (Firecracker names the amount asked for).
    #[error("Requested memory should be less than {0}MiB")]
    TooMuchMemoryRequested(u32),
}

/// The state of free page hinting runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintingState {
    /// The last command the host gave (the configuration's `free_page_hint_cmd_id`): a run's
    /// id (2 and up), or STOP (none yet) or DONE.
    pub host_cmd: u32,
    /// The id of the last run started.
    pub last_cmd_id: u32,
    /// The last command the guest sent on the hinting queue.
    pub guest_cmd: Option<u32>,
    /// Answer the guest's STOP with DONE at once, ending the run.
    pub acknowledge_on_stop: bool,
}

/// The balloon as a snapshot holds it. The target, actual size and hinting command are kept
/// here and written into the configuration space at restore (its saved bytes are not used).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// The target, in 4 KiB pages.
    pub target_pages: u32,
    /// The pages the driver said it holds.
    pub actual_pages: u32,
    /// Whether DEFLATE_ON_OOM is offered.
    pub deflate_on_oom: bool,
    /// Seconds between statistics updates; 0: no statistics queue.
    pub stats_polling_interval_s: u16,
    /// Whether free page hinting is offered.
    pub free_page_hinting: bool,
    /// Whether free page reporting is offered.
    pub free_page_reporting: bool,
    /// The statistics buffer the device holds until the next update, by its head index.
    pub stats_desc_index: Option<u16>,
    /// The latest statistics, as (tag, value).
    pub stats: Vec<(u16, u64)>,
    /// Free page hinting.
    pub hinting: HintingState,
    /// Features, interrupt and queues.
    pub virtio: VirtioState,
}

/// What the device works on once the driver is ready.
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
}

/// The balloon device.
pub struct Balloon {
    pub(super) base: VirtioBase,
    queue_sizes: Vec<u16>,
    active: Option<Active>,
    stats_interval_s: u16,
    /// Fires every statistics interval, on the event thread.
    pub(super) stats_timer: TimerFd,
    /// The statistics buffer held until the next update.
    stats_desc: Option<u16>,
    stats: BalloonStats,
    hinting: HintingState,
    /// How pages the guest gives up go back to the host.
    discard: Discard,
    chain: ChainBufs,
    pfns: Vec<u32>,
    bytes: Vec<u8>,
    metrics: Arc<BalloonMetrics>,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("config", &self.config())
            .field("actual_pages", &self.actual_pages())
            .finish_non_exhaustive()
    }
}

/// The configuration space for `num_pages`, `actual` and `cmd_id`.
fn config_bytes(num_pages: u32, actual: u32, cmd_id: u32) -> Vec<u8> {
    [num_pages, actual, cmd_id]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

/// Guest memory in MiB.
fn mem_mib(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum::<u64>() >> 20
}

/// Gives the host back the pages `pfns` name (sorted and merged into runs of consecutive
/// pages, one discard each); a run that is not all guest RAM is taken page by page and what
/// lies outside is counted.
fn discard_pages(mem: &GuestMemoryMmap, pfns: &mut Vec<u32>, how: Discard, m: &BalloonMetrics) {
    pfns.sort_unstable();
    pfns.dedup();
    let mut i = 0;
    while i < pfns.len() {
        let start = pfns[i];
        let mut n: u32 = 1;
        while let Some(&next) = pfns.get(i + n as usize) {
            if start.checked_add(n) != Some(next) {
                break;
            }
            n += 1;
        }
        i += n as usize;
        let addr = GuestAddress(u64::from(start) * BALLOON_PAGE_SIZE);
        match discard_range(mem, addr, u64::from(n) * BALLOON_PAGE_SIZE, how) {
            Ok(()) => add(&m.inflated_pages, u64::from(n)),
            Err(DiscardError::Range { .. }) => {
                for pfn in (0..n).map(|k| u64::from(start) + u64::from(k)) {
                    let page = GuestAddress(pfn * BALLOON_PAGE_SIZE);
                    match discard_range(mem, page, BALLOON_PAGE_SIZE, how) {
                        Ok(()) => inc(&m.inflated_pages),
                        Err(DiscardError::Range { .. }) => inc(&m.invalid_pfns),
                        Err(e) => host_refused(&e, m),
                    }
                }
            }
            Err(e) => host_refused(&e, m),
        }
    }
}

fn host_refused(e: &DiscardError, m: &BalloonMetrics) {
    guest_log!(
        log::Level::Warn,
        "virtio-balloon: {}",
        crate::error_chain(e)
    );
    inc(&m.event_fails);
}

/// Gives back a range the guest named free (hinting, reporting); whether it was.
fn discard_free_range(mem: &GuestMemoryMmap, addr: GuestAddress, len: u32, how: Discard) -> bool {
    match discard_range(mem, addr, u64::from(len), how) {
        Ok(()) => true,
        Err(e) => {
            guest_log!(
                log::Level::Debug,
                "virtio-balloon: free range not given back: {}",
                crate::error_chain(&e)
            );
            false
        }
    }
}

/// Reads the page frame numbers of an inflate or deflate chain into `pfns` (at most
/// [`MAX_PAGES_PER_CHAIN`]; the rest are counted as invalid); false for a chain too broken
/// to read.
fn read_pfns(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    bufs: &mut ChainBufs,
    pfns: &mut Vec<u32>,
    bytes: &mut Vec<u8>,
    m: &BalloonMetrics,
) -> bool {
    pfns.clear();
    if !split_chain(chain, bufs) || !bufs.writable.is_empty() {
        inc(&m.invalid_requests);
        return false;
    }
    for buf in &bufs.readable {
        let given = buf.len as usize / 4;
        let take = given.min(MAX_PAGES_PER_CHAIN - pfns.len());
        add(&m.invalid_pfns, (given - take) as u64);
        bytes.resize(take * 4, 0);
        if mem.read_slice(bytes, GuestAddress(buf.addr)).is_err() {
            inc(&m.invalid_requests);
            return false;
        }
        pfns.extend(
            bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    true
}

impl Balloon {
    /// A balloon as `config` describes it; refused when its target does not fit in 32 bits of
    /// pages.
    pub fn new(config: &BalloonConfig) -> Result<Self, BalloonError> {
        let target = config.amount_mib.checked_mul(PAGES_PER_MIB).ok_or(
            BalloonError::TooMuchMemoryRequested(u32::MAX / PAGES_PER_MIB),
        )?;
        let mut features = 1u64 << VIRTIO_F_VERSION_1;
        let mut queues = 2;
        for (on, bit, queue) in [
            (config.deflate_on_oom, VIRTIO_BALLOON_F_DEFLATE_ON_OOM, 0),
            (
                config.stats_polling_interval_s > 0,
                VIRTIO_BALLOON_F_STATS_VQ,
                1,
            ),
            (config.free_page_hinting, VIRTIO_BALLOON_F_FREE_PAGE_HINT, 1),
            (
                config.free_page_reporting,
                VIRTIO_BALLOON_F_PAGE_REPORTING,
                1,
            ),
        ] {
            if on {
                features |= 1u64 << bit;
                queues += queue;
            }
        }
        // The driver writes only `actual`.
        let space = ConfigSpace::new(config_bytes(target, 0, FREE_PAGE_HINT_STOP), ACTUAL..CMD_ID);
        Ok(Self {
            base: VirtioBase::new(features, queues, space).map_err(BalloonError::EventFd)?,
            queue_sizes: vec![QUEUE_SIZE; queues],
            active: None,
            stats_interval_s: config.stats_polling_interval_s,
            stats_timer: crate::rate_limiter::nonblocking_timerfd()
                .map_err(BalloonError::EventFd)?,
            stats_desc: None,
            stats: BalloonStats::default(),
            hinting: HintingState::default(),
            discard: Discard::default(),
            chain: ChainBufs::default(),
            pfns: Vec::with_capacity(MAX_PAGES_PER_CHAIN),
            bytes: Vec::new(),
            metrics: Arc::new(BalloonMetrics::default()),
        })
    }

    /// The device's state, for a snapshot.
    pub fn save(&self) -> BalloonState {
        let config = self.config();
        BalloonState {
            target_pages: self.target_pages(),
            actual_pages: self.actual_pages(),
            deflate_on_oom: config.deflate_on_oom,
            stats_polling_interval_s: self.stats_interval_s,
            free_page_hinting: config.free_page_hinting,
            free_page_reporting: config.free_page_reporting,
            stats_desc_index: self.stats_desc,
            stats: self.stats.saved(),
            hinting: self.hinting,
            virtio: self.base.save(&self.active_queues()),
        }
    }

    /// A device as `state` saved it; its queues come back when the transport is restored.
    pub fn from_state(state: &BalloonState) -> Result<Self, BalloonError> {
        let mut balloon = Self::new(&BalloonConfig {
            amount_mib: 0,
            deflate_on_oom: state.deflate_on_oom,
            stats_polling_interval_s: state.stats_polling_interval_s,
            free_page_hinting: state.free_page_hinting,
            free_page_reporting: state.free_page_reporting,
        })?;
        balloon
            .base
            .restore(&state.virtio)
            .map_err(BalloonError::Restore)?;
        let bytes = config_bytes(
            state.target_pages,
            state.actual_pages,
            state.hinting.host_cmd,
        );
        (balloon.base.config).restore(&bytes, state.virtio.config_generation);
        balloon.stats_desc = state.stats_desc_index;
        balloon.stats = BalloonStats::from_saved(&state.stats);
        balloon.hinting = state.hinting;
        Ok(balloon)
    }

    /// Makes pages the guest gives up go back to the host `how` (see [`Discard`]): the
    /// builder's choice, from what backs guest memory.
    pub fn set_discard(&mut self, how: Discard) {
        self.discard = how;
    }

    /// The device's counters, shared with the metrics dump.
    pub fn metrics(&self) -> Arc<BalloonMetrics> {
        self.metrics.clone()
    }

    fn config_word(&self, offset: usize) -> u32 {
        let mut word = [0u8; 4];
        self.base.config.read(offset as u64, &mut word);
        u32::from_le_bytes(word)
    }

    /// The target, in 4 KiB pages.
    pub fn target_pages(&self) -> u32 {
        self.config_word(NUM_PAGES)
    }

    /// The pages the driver says it holds (its `actual`).
    pub fn actual_pages(&self) -> u32 {
        self.config_word(ACTUAL)
    }

    fn offers(&self, bit: u32) -> bool {
        self.base.avail_features & (1u64 << bit) != 0
    }

    /// The device as `PUT /balloon` would describe it now (the target as last set).
    pub fn config(&self) -> BalloonConfig {
        BalloonConfig {
            amount_mib: self.target_pages() / PAGES_PER_MIB,
            deflate_on_oom: self.offers(VIRTIO_BALLOON_F_DEFLATE_ON_OOM),
            stats_polling_interval_s: self.stats_interval_s,
            free_page_hinting: self.offers(VIRTIO_BALLOON_F_FREE_PAGE_HINT),
            free_page_reporting: self.offers(VIRTIO_BALLOON_F_PAGE_REPORTING),
        }
    }

    /// The index of each optional queue, when offered.
    fn stats_queue(&self) -> Option<usize> {
        self.offers(VIRTIO_BALLOON_F_STATS_VQ).then_some(2)
    }

    fn hint_queue(&self) -> Option<usize> {
        let before = 2 + usize::from(self.offers(VIRTIO_BALLOON_F_STATS_VQ));
        self.offers(VIRTIO_BALLOON_F_FREE_PAGE_HINT)
            .then_some(before)
    }

    fn report_queue(&self) -> Option<usize> {
        let before = 2
            + usize::from(self.offers(VIRTIO_BALLOON_F_STATS_VQ))
            + usize::from(self.offers(VIRTIO_BALLOON_F_FREE_PAGE_HINT));
        self.offers(VIRTIO_BALLOON_F_PAGE_REPORTING)
            .then_some(before)
    }

    /// What queue `index` carries, for the event handler.
    pub(super) fn queue_role(&self, index: usize) -> QueueRole {
        match index {
            INFLATE => QueueRole::Inflate,
            DEFLATE => QueueRole::Deflate,
            i if Some(i) == self.stats_queue() => QueueRole::Stats,
            i if Some(i) == self.hint_queue() => QueueRole::Hint,
            _ => QueueRole::Report,
        }
    }

    /// Whether statistics are on.
    pub(super) fn stats_enabled(&self) -> bool {
        self.stats_interval_s > 0
    }

    /// Arms the statistics timer to fire after `first`, then every interval.
    fn arm_stats_timer(&mut self, first: Duration) -> Result<(), BalloonError> {
        let every = Duration::from_secs(u64::from(self.stats_interval_s));
        self.stats_timer
            .reset(first, Some(every))
            .map_err(|e| BalloonError::Timer(e.into()))
    }

    /// At activation, on the event thread: the first statistics update comes an interval
    /// from now.
    pub(super) fn start_stats_timer(&mut self) {
        let every = Duration::from_secs(u64::from(self.stats_interval_s));
        if let Err(e) = self.arm_stats_timer(every) {
            guest_log!(
                log::Level::Warn,
                "virtio-balloon: {}",
                crate::error_chain(&e)
            );
        }
    }

    /// The driver broke a queue: the device stops and asks for a reset.
    fn broken(&mut self) {
        inc(&self.metrics.event_fails);
        self.active = None;
        self.base.irq.signal_needs_reset();
    }

    /// Inflate queue: each chain names pages the guest gives up (little-endian u32 frame
    /// numbers of 4 KiB pages), which go back to the host; frames outside guest RAM are
    /// ignored and counted.
    pub(super) fn process_inflate(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let m = &*self.metrics;
        inc(&m.inflate_count);
        let (mem, how) = (&active.mem, self.discard);
        let (bufs, pfns, bytes) = (&mut self.chain, &mut self.pfns, &mut self.bytes);
        let evt = &self.base.queue_events[INFLATE];
        let drained = drain_queue(
            &mut active.queues[INFLATE],
            mem,
            evt,
            self.base.queue_irq(INFLATE),
            |c| {
                if read_pfns(c, mem, bufs, pfns, bytes, m) {
                    discard_pages(mem, pfns, how, m);
                }
                Handled::Used(0)
            },
        );
        if drained.is_err() {
            self.broken();
        }
    }

    /// Deflate queue: the guest takes pages back, which needs nothing from the host (a page
    /// given back reads zeros until the guest writes it); the pages are counted.
    pub(super) fn process_deflate(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let m = &*self.metrics;
        inc(&m.deflate_count);
        let mem = &active.mem;
        let (bufs, pfns, bytes) = (&mut self.chain, &mut self.pfns, &mut self.bytes);
        let evt = &self.base.queue_events[DEFLATE];
        let drained = drain_queue(
            &mut active.queues[DEFLATE],
            mem,
            evt,
            self.base.queue_irq(DEFLATE),
            |c| {
                if read_pfns(c, mem, bufs, pfns, bytes, m) {
                    add(&m.deflated_pages, pfns.len() as u64);
                }
                Handled::Used(0)
            },
        );
        if drained.is_err() {
            self.broken();
        }
    }

    /// Statistics queue (virtio 1.2, 5.5.6.3): the guest's buffer of statistics is read and
    /// held; the timer hands it back, which asks the guest for new values. A second buffer
    /// while one is held (a driver that does not follow the protocol) is read and given back
    /// at once.
    pub(super) fn process_stats(&mut self) {
        let Some(index) = self.stats_queue() else {
            return;
        };
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let m = &*self.metrics;
        let mem = &active.mem;
        let (bufs, bytes) = (&mut self.chain, &mut self.bytes);
        let (stats, held) = (&mut self.stats, &mut self.stats_desc);
        let evt = &self.base.queue_events[index];
        let drained = drain_queue(
            &mut active.queues[index],
            mem,
            evt,
            self.base.queue_irq(index),
            |c| {
                inc(&m.stats_updates_count);
                let head = c.head_index();
                if split_chain(c, bufs) {
                    let mut room = MAX_STATS * STAT_SIZE;
                    for buf in &bufs.readable {
                        let take = (buf.len as usize).min(room);
                        room -= take;
                        bytes.resize(take, 0);
                        match mem.read_slice(bytes, GuestAddress(buf.addr)) {
                            Ok(()) => add(&m.stats_update_fails, stats.update_from(bytes)),
                            Err(_) => inc(&m.stats_update_fails),
                        }
                    }
                } else {
                    inc(&m.stats_update_fails);
                }
                if held.is_some() {
                    return Handled::Used(0);
                }
                *held = Some(head);
                Handled::Held
            },
        );
        if drained.is_err() {
            self.broken();
        }
    }

    /// The statistics timer fired: the held buffer goes back to the guest, which refills it.
    pub(super) fn process_stats_timer(&mut self) {
        let _ = self.stats_timer.wait();
        let (Some(index), Some(active)) = (self.stats_queue(), self.active.as_mut()) else {
            return;
        };
        let Some(head) = self.stats_desc.take() else {
            guest_log!(
                log::Level::Debug,
                "virtio-balloon: no statistics buffer to hand back"
            );
            return;
        };
        let queue = &mut active.queues[index];
        if queue.add_used(&active.mem, head, 0).is_err() {
            guest_log!(
                log::Level::Debug,
                "virtio-balloon: cannot hand back the statistics buffer"
            );
            return;
        }
        if needs_interrupt(queue, &active.mem) {
            if let Err(e) = self.base.irq.trigger_queue(index) {
                guest_log!(
                    log::Level::Warn,
                    "virtio-balloon: cannot raise interrupt: {e}"
                );
            }
        }
    }

    /// Free page hinting queue (virtio 1.2, 5.5.6.7): 4-byte buffers carry the guest's
    /// command (the run's id when it starts, STOP when it has hinted all it will), the other
    /// buffers are free ranges, given back to the host while they belong to the run the host
    /// asked for. With `acknowledge_on_stop`, the guest's STOP is answered with DONE.
    pub(super) fn process_hinting(&mut self) {
        let Some(index) = self.hint_queue() else {
            return;
        };
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let m = &*self.metrics;
        let (mem, how) = (&active.mem, self.discard);
        let hinting = &mut self.hinting;
        let host_cmd = hinting.host_cmd;
        let mut complete = false;
        let evt = &self.base.queue_events[index];
        let drained = drain_queue(
            &mut active.queues[index],
            mem,
            evt,
            self.base.queue_irq(index),
            |c| {
                for desc in c {
                    if desc.len() == 4 {
                        let Ok(cmd) = mem.read_obj::<u32>(desc.addr()) else {
                            continue;
                        };
                        let cmd = u32::from_le(cmd);
                        hinting.guest_cmd = Some(cmd);
                        complete = cmd == FREE_PAGE_HINT_STOP || cmd == FREE_PAGE_HINT_DONE;
                        continue;
                    }
                    // Ranges of a finished run, or of another run, are the guest's again.
                    let in_run = host_cmd != FREE_PAGE_HINT_STOP
                        && host_cmd != FREE_PAGE_HINT_DONE
                        && hinting.guest_cmd == Some(host_cmd);
                    if !in_run {
                        continue;
                    }
                    inc(&m.free_page_hint_count);
                    if discard_free_range(mem, desc.addr(), desc.len(), how) {
                        add(&m.free_page_hint_freed, u64::from(desc.len()));
                    } else {
                        inc(&m.free_page_hint_fails);
                    }
                }
                Handled::Used(0)
            },
        );
        if drained.is_err() {
            self.broken();
            return;
        }
        if complete && self.hinting.acknowledge_on_stop {
            if let Err(e) = self.set_hint_cmd(FREE_PAGE_HINT_DONE) {
                guest_log!(
                    log::Level::Warn,
                    "virtio-balloon: {}",
                    crate::error_chain(&e)
                );
            }
        }
    }

    /// Free page reporting queue (virtio 1.2, 5.5.6.8): every buffer of a chain is a range
    /// the guest does not use, given back to the host.
    pub(super) fn process_reporting(&mut self) {
        let Some(index) = self.report_queue() else {
            return;
        };
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let m = &*self.metrics;
        let (mem, how) = (&active.mem, self.discard);
        let evt = &self.base.queue_events[index];
        let drained = drain_queue(
            &mut active.queues[index],
            mem,
            evt,
            self.base.queue_irq(index),
            |c| {
                for desc in c {
                    inc(&m.free_page_report_count);
                    if discard_free_range(mem, desc.addr(), desc.len(), how) {
                        add(&m.free_page_report_freed, u64::from(desc.len()));
                    } else {
                        inc(&m.free_page_report_fails);
                    }
                }
                Handled::Used(0)
            },
        );
        if drained.is_err() {
            self.broken();
        }
    }

    /// Every queue, as after activation.
    pub(super) fn process_all(&mut self) {
        self.process_inflate();
        self.process_deflate();
        self.process_stats();
        self.process_hinting();
        self.process_reporting();
    }

    /// `PATCH /balloon`: a new target, which the guest hears of by a configuration interrupt.
    /// It must not exceed guest memory; the driver must have set the device up.
    pub fn update_size(&mut self, amount_mib: u32) -> Result<(), BalloonError> {
        let active = self.active.as_ref().ok_or(BalloonError::DeviceNotActive)?;
        if u64::from(amount_mib) > mem_mib(&active.mem) {
            return Err(BalloonError::TooMuchMemoryRequested(amount_mib));
        }
        let pages =
            amount_mib
                .checked_mul(PAGES_PER_MIB)
                .ok_or(BalloonError::TooMuchMemoryRequested(
                    u32::MAX / PAGES_PER_MIB,
                ))?;
        self.base
            .config
            .update(|b| b[NUM_PAGES..NUM_PAGES + 4].copy_from_slice(&pages.to_le_bytes()));
        self.base
            .irq
            .trigger_config()
            .map_err(BalloonError::Interrupt)
    }

    /// `PATCH /balloon/statistics`: a new interval, the first update at once. Statistics
    /// cannot be turned on or off.
    pub fn update_stats_interval(&mut self, interval_s: u16) -> Result<(), BalloonError> {
        if interval_s == self.stats_interval_s {
            return Ok(());
        }
        if interval_s == 0 || self.stats_interval_s == 0 {
            return Err(BalloonError::StatisticsStateChange);
        }
        self.stats_interval_s = interval_s;
        if self.active.is_some() {
            self.arm_stats_timer(Duration::from_nanos(1))?;
        }
        Ok(())
    }

    /// `GET /balloon/statistics`: sizes and the guest's latest statistics.
    pub fn latest_stats(&self) -> Result<serde_json::Value, BalloonError> {
        if !self.stats_enabled() {
            return Err(BalloonError::StatisticsDisabled);
        }
        Ok(self.stats.to_json(self.target_pages(), self.actual_pages()))
    }

    /// Sets the hinting command in the configuration space and tells the guest.
    fn set_hint_cmd(&mut self, cmd: u32) -> Result<(), BalloonError> {
        if self.active.is_none() {
            return Err(BalloonError::DeviceNotActive);
        }
        self.hinting.host_cmd = cmd;
        self.base
            .config
            .update(|b| b[CMD_ID..CMD_ID + 4].copy_from_slice(&cmd.to_le_bytes()));
        self.base
            .irq
            .trigger_config()
            .map_err(BalloonError::Interrupt)
    }

    /// `PATCH /balloon/hinting/start`: a new run, with the next id (2 and up).
    pub fn start_hinting(&mut self, acknowledge_on_stop: bool) -> Result<(), BalloonError> {
        if !self.offers(VIRTIO_BALLOON_F_FREE_PAGE_HINT) {
            return Err(BalloonError::HintingNotEnabled);
        }
        if self.active.is_none() {
            return Err(BalloonError::DeviceNotActive);
        }
        let id = self.hinting.last_cmd_id.wrapping_add(1).max(2);
        self.hinting.acknowledge_on_stop = acknowledge_on_stop;
        self.hinting.last_cmd_id = id;
        self.set_hint_cmd(id)
    }

    /// `GET /balloon/hinting/status`: the host's last command and the guest's.
    pub fn hinting_status(&self) -> Result<(u32, Option<u32>), BalloonError> {
        if !self.offers(VIRTIO_BALLOON_F_FREE_PAGE_HINT) {
            return Err(BalloonError::HintingNotEnabled);
        }
        Ok((self.hinting.host_cmd, self.hinting.guest_cmd))
    }

    /// `PATCH /balloon/hinting/stop`: DONE, the guest may use the hinted pages again.
    pub fn stop_hinting(&mut self) -> Result<(), BalloonError> {
        if !self.offers(VIRTIO_BALLOON_F_FREE_PAGE_HINT) {
            return Err(BalloonError::HintingNotEnabled);
        }
        self.set_hint_cmd(FREE_PAGE_HINT_DONE)
    }
}

/// What a balloon queue carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum QueueRole {
    Inflate,
    Deflate,
    Stats,
    Hint,
    Report,
}

impl VirtioDevice for Balloon {
    fn base(&self) -> &VirtioBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        if queues.len() != self.queue_sizes.len() {
            inc(&self.metrics.activate_fails);
            return Err(ActivateError::QueueCount {
                expected: self.queue_sizes.len(),
                got: queues.len(),
            });
        }
        self.active = Some(Active { mem, queues });
        self.base.activate_evt.write(1).map_err(|e| {
            inc(&self.metrics.activate_fails);
            ActivateError::Signal(e)
        })
    }

    /// Back to the state before activation, the target kept (Firecracker's reset). The
    /// statistics timer may fire once more; with no device active it does nothing.
    fn reset(&mut self) {
        self.active = None;
        self.base.acked_features = 0;
        self.stats_desc = None;
        self.stats = BalloonStats::default();
        self.hinting = HintingState::default();
        self.base.config.update(|b| {
            b[ACTUAL..ACTUAL + 4].fill(0);
            b[CMD_ID..CMD_ID + 4].copy_from_slice(&FREE_PAGE_HINT_STOP.to_le_bytes());
        });
    }

    fn active_queues(&self) -> Vec<&Queue> {
        self.active.iter().flat_map(|a| &a.queues).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{INT_CONFIG, INT_VRING};
    use std::sync::Mutex;

    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const SIZE: u16 = 16;
    /// Guest memory: 4 MiB; the rings below 1 MiB, the guest's pages from 1 MiB.
    const MEM: usize = 4 << 20;
    const PFN_BUF: u64 = 0x8_0000;
    const FIRST_PAGE: u32 = 256;
    const MEM_PAGES: u32 = 1024;
    /// [`MAX_PAGES_PER_CHAIN`] as a frame number.
    const CHAIN_LIMIT: u32 = 256;

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn config(stats: u16, hinting: bool, reporting: bool) -> BalloonConfig {
        BalloonConfig {
            amount_mib: 1,
            deflate_on_oom: true,
            stats_polling_interval_s: stats,
            free_page_hinting: hinting,
            free_page_reporting: reporting,
        }
    }

    type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

    /// A balloon activated on mock queues (one per queue it offers, 64 KiB apart), on a
    /// real event manager, over guest memory whose pages from 1 MiB hold their own number.
    struct Rig {
        mem: GuestMemoryMmap,
        queues: Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
        balloon: Arc<Mutex<Balloon>>,
        em: EventManager<Subscriber>,
    }

    impl Rig {
        fn new(config: &BalloonConfig) -> Self {
            // Leaked so the mock queues may borrow it for the test's length.
            let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
                crate::vstate::memory::anonymous(&[(GuestAddress(0), MEM)]).unwrap(),
            ));
            for pfn in FIRST_PAGE..MEM_PAGES {
                mem.write_obj(pfn, GuestAddress(u64::from(pfn) * 4096))
                    .unwrap();
            }
            let mut balloon = Balloon::new(config).unwrap();
            let queues: Vec<_> = (0..balloon.queue_max_sizes().len() as u64)
                .map(|i| MockSplitQueue::create(mem, GuestAddress(0x1_0000 * (i + 1)), SIZE))
                .collect();
            balloon.set_acked_features(balloon.avail_features());
            let ready = queues.iter().map(|q| q.create_queue().unwrap()).collect();
            balloon.activate(mem.clone(), ready).unwrap();
            let balloon = Arc::new(Mutex::new(balloon));
            let mut em = EventManager::<Subscriber>::new().unwrap();
            em.add_subscriber(balloon.clone());
            let mut rig = Rig {
                mem: mem.clone(),
                queues,
                balloon,
                em,
            };
            rig.run(); // activation
            rig
        }

        fn run(&mut self) {
            self.em.run_with_timeout(100).unwrap();
        }

        /// Publishes `descs` as chains on queue `q` and notifies the device.
        fn post(&mut self, q: usize, descs: &[RawDescriptor]) {
            self.queues[q].add_desc_chains(descs, 0).unwrap();
            self.balloon.lock().unwrap().base.queue_events[q]
                .write(1)
                .unwrap();
            self.run();
        }

        fn used_idx(&self, q: usize) -> u16 {
            self.mem
                .read_obj(GuestAddress(self.queues[q].used_addr().0 + 2))
                .unwrap()
        }

        /// Writes `pfns` at PFN_BUF and posts them as one chain on queue `q`.
        fn pfns(&mut self, q: usize, pfns: &[u32]) {
            let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
            self.mem.write_slice(&bytes, GuestAddress(PFN_BUF)).unwrap();
            self.post(
                q,
                &[desc(PFN_BUF, u32::try_from(bytes.len()).unwrap(), 0, 0)],
            );
        }

        /// The first word of page `pfn`: its number, or 0 once discarded.
        fn page(&self, pfn: u32) -> u32 {
            self.mem
                .read_obj(GuestAddress(u64::from(pfn) * 4096))
                .unwrap()
        }

        fn metric(&self, name: &str) -> u64 {
            self.balloon.lock().unwrap().metrics().to_json()[name]
                .as_u64()
                .unwrap()
        }
    }

    #[test]
    fn features_queues_and_configuration_follow_the_config() {
        let plain = Balloon::new(&BalloonConfig::default()).unwrap();
        assert_eq!(plain.avail_features(), 1 << VIRTIO_F_VERSION_1);
        assert_eq!(plain.queue_max_sizes().len(), 2);
        let all = Balloon::new(&config(5, true, true)).unwrap();
        assert_eq!(all.avail_features(), 1 << 32 | 0b10_1110);
        assert_eq!(all.queue_max_sizes(), &[QUEUE_SIZE; 5]);
        assert_eq!(all.config(), config(5, true, true));
        assert_eq!(
            (all.stats_queue(), all.hint_queue(), all.report_queue()),
            (Some(2), Some(3), Some(4))
        );
        let report_only = Balloon::new(&config(0, false, true)).unwrap();
        assert_eq!(report_only.report_queue(), Some(2));
        let mut space = [0u8; 12];
        all.base.config.read(0, &mut space);
        assert_eq!(
            space,
            [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            "1 MiB is 256 pages"
        );
        assert!(all.base.config.write(4, &7u32.to_le_bytes()), "actual");
        assert!(!all.base.config.write(0, &7u32.to_le_bytes()), "num_pages");
        assert!(!all.base.config.write(8, &7u32.to_le_bytes()), "cmd_id");
        assert_eq!(all.actual_pages(), 7);
        assert!(matches!(
            Balloon::new(&BalloonConfig {
                amount_mib: u32::MAX,
                ..BalloonConfig::default()
            }),
            Err(BalloonError::TooMuchMemoryRequested(_))
        ));
    }

    /// Inflated pages read zero afterwards (the host let them go), the others keep their
    /// contents; frames outside guest RAM, duplicates and frames past a chain's limit are
    /// ignored and counted; deflated pages are only counted.
    #[test]
    fn inflate_discards_the_pages_named_and_nothing_else() {
        let mut rig = Rig::new(&config(0, false, false));
        rig.pfns(INFLATE, &[258, 256, 257, 0x10_0000, 257, 300, u32::MAX]);
        assert_eq!(rig.used_idx(INFLATE), 1);
        for pfn in [256, 257, 258, 300] {
            assert_eq!(rig.page(pfn), 0, "page {pfn} inflated");
        }
        for pfn in [259, 299, 301] {
            assert_eq!(rig.page(pfn), pfn, "page {pfn} untouched");
        }
        assert_eq!(rig.metric("inflated_pages"), 4);
        assert_eq!(rig.metric("invalid_pfns"), 2);
        assert_eq!(rig.metric("inflate_count"), 2, "activation and the event");
        assert_eq!(CHAIN_LIMIT as usize, MAX_PAGES_PER_CHAIN);
        let long: Vec<u32> = (400..400 + CHAIN_LIMIT + 10).collect();
        rig.pfns(INFLATE, &long);
        assert_eq!(rig.page(400 + CHAIN_LIMIT - 1), 0);
        assert_eq!(
            rig.page(400 + CHAIN_LIMIT),
            400 + CHAIN_LIMIT,
            "past the chain's limit"
        );
        assert_eq!(rig.metric("invalid_pfns"), 12);
        rig.pfns(DEFLATE, &[256, 257]);
        assert_eq!(rig.used_idx(DEFLATE), 1);
        assert_eq!(rig.metric("deflated_pages"), 2);
        assert_eq!(
            rig.balloon.lock().unwrap().base.irq.status() & INT_VRING,
            INT_VRING
        );
    }

    /// Chains a driver should not send are used without touching memory; an impossible
    /// available index stops the device and asks for a reset.
    #[test]
    fn hostile_inflate_chains_are_refused() {
        let mut rig = Rig::new(&config(0, false, false));
        rig.mem.write_obj(300u32, GuestAddress(PFN_BUF)).unwrap();
        // Device-writable, and outside guest memory.
        rig.post(INFLATE, &[desc(PFN_BUF, 4, F_WRITE, 0)]);
        rig.post(INFLATE, &[desc(MEM as u64 - 2, 4, 0, 0)]);
        // A loop.
        rig.post(INFLATE, &[desc(PFN_BUF, 4, F_NEXT, 0)]);
        assert_eq!(rig.page(300), 300);
        assert_eq!(rig.metric("invalid_requests"), 3);
        assert_eq!(rig.used_idx(INFLATE), 3);
        let avail = rig.queues[INFLATE].avail_addr().0 + 2;
        rig.mem.write_obj(0x8000u16, GuestAddress(avail)).unwrap();
        rig.balloon.lock().unwrap().base.queue_events[INFLATE]
            .write(1)
            .unwrap();
        rig.run();
        let balloon = rig.balloon.lock().unwrap();
        assert!(balloon.base.irq.needs_reset());
        assert!(balloon.active.is_none());
    }

    /// The statistics buffer is read and held; the next update (here a new interval, which
    /// updates at once) hands it back; a second buffer while one is held comes back at once.
    #[test]
    fn statistics_are_read_held_and_handed_back_on_the_timer() {
        let mut rig = Rig::new(&config(60, false, false));
        let stats = 2;
        let record = |tag: u16, value: u64| {
            let mut r = tag.to_le_bytes().to_vec();
            r.extend_from_slice(&value.to_le_bytes());
            r
        };
        let bytes = [record(4, 1 << 20), record(5, 4 << 20), record(99, 1)].concat();
        rig.mem.write_slice(&bytes, GuestAddress(PFN_BUF)).unwrap();
        rig.post(stats, &[desc(PFN_BUF, 30, 0, 0)]);
        assert_eq!(rig.used_idx(stats), 0, "held");
        let doc = rig.balloon.lock().unwrap().latest_stats().unwrap();
        assert_eq!(doc["free_memory"], 1 << 20);
        assert_eq!(doc["total_memory"], 4 << 20);
        assert_eq!(doc["target_mib"], 1);
        assert_eq!(rig.metric("stats_update_fails"), 1, "tag 99");
        rig.post(stats, &[desc(PFN_BUF, 10, 0, 0)]);
        assert_eq!(
            rig.used_idx(stats),
            1,
            "the second buffer comes back at once"
        );
        let mut balloon = rig.balloon.lock().unwrap();
        assert!(matches!(
            balloon.update_stats_interval(0),
            Err(BalloonError::StatisticsStateChange)
        ));
        balloon.update_stats_interval(1).unwrap();
        drop(balloon);
        rig.run();
        assert_eq!(rig.used_idx(stats), 2, "handed back by the timer");
        let plain = Balloon::new(&config(0, false, false)).unwrap();
        assert_eq!(
            plain.latest_stats().unwrap_err().to_string(),
            "Received stats query when stats are disabled."
        );
    }

    #[test]
    fn a_new_target_reaches_the_guest_by_a_configuration_interrupt() {
        let mut idle = Balloon::new(&config(0, false, false)).unwrap();
        assert_eq!(
            idle.update_size(1).unwrap_err().to_string(),
            "Device not activated yet."
        );
        let rig = Rig::new(&config(0, false, false));
        let mut balloon = rig.balloon.lock().unwrap();
        let generation = balloon.base.config.generation();
        balloon.update_size(3).unwrap();
        assert_eq!(balloon.target_pages(), 768);
        assert_eq!(balloon.config().amount_mib, 3);
        assert_ne!(balloon.base.config.generation(), generation);
        assert_eq!(balloon.base.irq.status() & INT_CONFIG, INT_CONFIG);
        assert_eq!(
            balloon.update_size(5).unwrap_err().to_string(),
            "Requested memory should be less than 5MiB"
        );
    }

    /// A run: the host's id in the configuration, the guest's id then ranges (given back),
    /// its STOP answered with DONE; ranges outside a run stay the guest's.
    #[test]
    fn free_page_hinting_gives_back_the_ranges_of_the_run() {
        let mut rig = Rig::new(&config(0, true, false));
        let hint = 2;
        rig.balloon.lock().unwrap().start_hinting(true).unwrap();
        let mut cmd = [0u8; 4];
        rig.balloon.lock().unwrap().base.config.read(8, &mut cmd);
        assert_eq!(u32::from_le_bytes(cmd), 2);
        let range = u64::from(FIRST_PAGE + 16) * 4096;
        rig.mem.write_obj(5u32, GuestAddress(PFN_BUF)).unwrap(); // another run's id
        rig.post(
            hint,
            &[desc(PFN_BUF, 4, 0, 0), desc(range, 8192, F_WRITE, 0)],
        );
        assert_eq!(rig.page(FIRST_PAGE + 16), FIRST_PAGE + 16, "not this run");
        rig.mem.write_obj(2u32, GuestAddress(PFN_BUF)).unwrap();
        rig.post(
            hint,
            &[desc(PFN_BUF, 4, 0, 0), desc(range, 8192, F_WRITE, 0)],
        );
        assert_eq!(
            (rig.page(FIRST_PAGE + 16), rig.page(FIRST_PAGE + 17)),
            (0, 0)
        );
        assert_eq!(rig.page(FIRST_PAGE + 18), FIRST_PAGE + 18);
        assert_eq!(rig.metric("free_page_hint_freed"), 8192);
        rig.mem.write_obj(0u32, GuestAddress(PFN_BUF + 64)).unwrap();
        rig.post(hint, &[desc(PFN_BUF + 64, 4, 0, 0)]);
        let balloon = rig.balloon.lock().unwrap();
        assert_eq!(
            balloon.hinting_status().unwrap(),
            (FREE_PAGE_HINT_DONE, Some(0))
        );
        let plain = Balloon::new(&config(0, false, false)).unwrap();
        assert_eq!(
            plain.hinting_status().unwrap_err().to_string(),
            "Attempting to use hinting when not enabled"
        );
    }

    #[test]
    fn reported_free_ranges_go_back_to_the_host() {
        let mut rig = Rig::new(&config(1, false, true));
        let report = 3;
        let a = u64::from(FIRST_PAGE) * 4096;
        rig.post(
            report,
            &[
                desc(a, 4096, F_WRITE | F_NEXT, 1),
                desc(a + 8192, 4096, F_WRITE | F_NEXT, 2),
                desc(a + 12289, 4096, F_WRITE, 0),
            ],
        );
        assert_eq!(rig.used_idx(report), 1);
        assert_eq!((rig.page(FIRST_PAGE), rig.page(FIRST_PAGE + 2)), (0, 0));
        assert_eq!(rig.page(FIRST_PAGE + 1), FIRST_PAGE + 1);
        assert_eq!(rig.page(FIRST_PAGE + 3), FIRST_PAGE + 3, "unaligned: kept");
        assert_eq!(rig.metric("free_page_report_freed"), 8192);
        assert_eq!(rig.metric("free_page_report_fails"), 1);
    }

    /// What a snapshot saves comes back: sizes, options, the held statistics buffer, the
    /// statistics and the hinting state.
    #[test]
    fn the_saved_state_restores_the_same_balloon() {
        let mut rig = Rig::new(&config(7, true, false));
        rig.mem
            .write_slice(&[4, 0, 9, 0, 0, 0, 0, 0, 0, 0], GuestAddress(PFN_BUF))
            .unwrap();
        rig.post(2, &[desc(PFN_BUF, 10, 0, 0)]);
        let mut balloon = rig.balloon.lock().unwrap();
        balloon.update_size(2).unwrap();
        assert!(balloon.base.config.write(4, &300u32.to_le_bytes()));
        balloon.start_hinting(false).unwrap();
        let saved = balloon.save();
        assert_eq!((saved.target_pages, saved.actual_pages), (512, 300));
        assert_eq!(saved.stats_desc_index, Some(0));
        let back = Balloon::from_state(&saved).unwrap();
        let mut inactive = saved.clone();
        inactive.virtio.queues.clear(); // they come back with the transport
        assert_eq!(back.save(), inactive);
        assert_eq!(back.config(), balloon.config());
        assert_eq!(back.latest_stats().unwrap()["free_memory"], 9);
    }
}
