//! Guest RAM: the regions around the 32-bit MMIO hole, mapped with vm-memory (anonymous, or
//! privately from a snapshot's memory file) and registered with KVM as memory slots; and the
//! pages written since the last snapshot, from KVM's dirty log and vm-memory's bitmap. Also
//! the device memory outside RAM: host files mapped shared for virtio-pmem, and the virtio-mem
//! hot-plug region, which is part of guest memory (the last region) but reaches KVM only in
//! slots whose blocks are plugged.
//!
//! KVM memory slots: RAM takes slots 0 and 1 (one per region), virtio-pmem devices slots from
//! [`PMEM_FIRST_SLOT`], one each, and the hot-plug region slots from [`HOTPLUG_FIRST_SLOT`],
//! one per `slot_size` bytes of it.

use std::fs::File;
use std::num::NonZeroUsize;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::{MMIO_HOLE_END, MMIO_HOLE_START};
use crate::config::HugePages;

/// Guest memory; each region has a bitmap of the pages Skiff itself wrote when dirty pages are
/// tracked (for diff snapshots), and none otherwise; the hot-plug region's unplugged blocks
/// are no memory (see [`GuestRegion`]).
pub type GuestMemoryMmap = vm_memory::GuestRegionCollection<GuestRegion>;
/// vm-memory's mapping of one region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<Option<AtomicBitmap>>;
pub use super::region::GuestRegion;

/// The page size dirty pages are counted in.
pub const PAGE_SIZE: usize = 4096;

/// The KVM memory slot of the first virtio-pmem device; the next ones follow.
pub const PMEM_FIRST_SLOT: u32 = 8;
/// The KVM memory slot of the hot-plug region's first slot; the next ones follow.
pub const HOTPLUG_FIRST_SLOT: u32 = 32;

// KVM_SET_USER_MEMORY_REGION, for the hot-plug slots the event thread adds and removes on a
// duplicate of the VM's descriptor (KVM API 4.35).
vmm_sys_util::ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    kvm_bindings::KVMIO,
    0x46,
    kvm_userspace_memory_region
);

/// Errors while creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is zero.
    #[error("guest memory size must be at least 1 MiB")]
    Empty,
    /// The size does not fit in the guest's physical address space.
    #[error(
        "guest memory of {mib} MiB does not fit below the host's {phys_bits}-bit physical address limit"
    )]
    TooLarge {
        /// Requested size.
        mib: u64,
        /// Guest physical address width reported by the host.
        phys_bits: u8,
    },
    /// The host refused to map the memory.
    #[error("cannot map {mib} MiB of guest memory")]
    Mmap {
        /// Requested size.
        mib: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// Huge pages asked for a size that is not whole 2 MiB pages.
    #[error("{mib} MiB of guest memory is not whole 2 MiB huge pages (give an even size)")]
    HugePageSize {
        /// Requested size.
        mib: u64,
    },
    /// The host's hugetlbfs pool cannot hold the guest's memory.
    #[error(
        "cannot reserve {mib} MiB of guest memory in 2 MiB huge pages: the host has {free} \
         free (raise /proc/sys/vm/nr_hugepages)"
    )]
    HugePagePool {
        /// Requested size.
        mib: u64,
        /// Free 2 MiB pages in the pool, as /proc/meminfo says.
        free: u64,
    },
    /// The kernel refused to use transparent huge pages for guest memory.
    #[error("cannot ask for transparent huge pages for guest memory")]
    Madvise(#[source] std::io::Error),
    /// A memory file cannot be mapped.
    #[error("cannot map {len} bytes at offset {offset} of the memory file")]
    MmapFile {
        /// Bytes asked for.
        len: u64,
        /// Offset in the file.
        offset: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The hot-plug region's protection cannot be set.
    #[error("cannot change the protection of the memory hot-plug region")]
    Protect(#[source] std::io::Error),
    /// The regions given do not make a valid guest memory.
    #[error("the guest memory regions overlap or are empty")]
    Regions,
    /// KVM_GET_DIRTY_LOG failed.
    #[error("KVM_GET_DIRTY_LOG failed for memory slot {0}")]
    DirtyLog(u32, #[source] kvm_ioctls::Error),
    /// KVM refused a memory slot (for instance one larger than KVM's per-slot limit).
    #[error("KVM refused guest memory slot {slot} ({mib} MiB at {gpa:#x})")]
    SetUserMemoryRegion {
        /// Slot number.
        slot: u32,
        /// Slot size in MiB.
        mib: u64,
        /// Guest physical start.
        gpa: u64,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A host file mapped shared into Skiff for the guest (virtio-pmem): the file's bytes, then
/// anonymous private memory up to the region's size (as Firecracker pads a file that is not a
/// multiple of the region granule; what the guest writes there is not kept). Unmapped when
/// dropped; a KVM slot over it must go first, or with the VM.
#[derive(Debug)]
pub struct FileMapping {
    addr: std::ptr::NonNull<libc::c_void>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; moving it to another thread moves
// nothing but the address, and every access to the bytes goes through KVM or the guest.
unsafe impl Send for FileMapping {}

impl FileMapping {
    /// Maps `file_len` bytes of `file` shared at the start of a `len`-byte region, readable,
    /// and writable unless `read_only` (the file must be open for writing then). `len` must
    /// be at least `file_len`.
    pub fn new(
        file: &File,
        file_len: u64,
        len: u64,
        read_only: bool,
    ) -> Result<Self, std::io::Error> {
        use std::os::fd::AsRawFd;
        let (Ok(file_len), Ok(len)) = (usize::try_from(file_len), usize::try_from(len)) else {
            return Err(std::io::Error::from_raw_os_error(libc::EOVERFLOW));
        };
        if file_len == 0 || len < file_len {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let prot = if read_only {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        // SAFETY: a new anonymous mapping at an address of the kernel's choosing; the result
        // is checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        let Some(addr) = std::ptr::NonNull::new(base).filter(|_| base != libc::MAP_FAILED) else {
            return Err(std::io::Error::last_os_error());
        };
        let mapping = Self { addr, len };
        // SAFETY: [base, base + file_len) lies inside the anonymous mapping just made, which
        // `mapping` owns and nothing else uses yet; MAP_FIXED replaces that part with the file.
        let got = unsafe {
            libc::mmap(
                base,
                file_len,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if got != base {
            return Err(std::io::Error::last_os_error());
        }
        Ok(mapping)
    }

    /// Where the mapping starts in Skiff's address space.
    pub fn host_addr(&self) -> u64 {
        self.addr.as_ptr() as u64
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Whether it is empty (it never is).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        // SAFETY: exactly the range mapped in `new`, owned by this value and used by nothing
        // once it is dropped.
        unsafe {
            libc::munmap(self.addr.as_ptr(), self.len);
        }
    }
}

/// Gives the guest `mapping` at guest physical address `gpa` as KVM memory slot `slot`;
/// `read_only` slots take guest reads only, and guest writes to them exit to Skiff as MMIO
/// writes (KVM API, KVM_MEM_READONLY), where nothing answers them.
pub fn register_file_mapping(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    mapping: &FileMapping,
    read_only: bool,
) -> Result<(), MemoryError> {
    let region = kvm_userspace_memory_region {
        slot,
        flags: if read_only { KVM_MEM_READONLY } else { 0 },
        guest_phys_addr: gpa,
        memory_size: mapping.len(),
        userspace_addr: mapping.host_addr(),
    };
    // SAFETY: the host range is `mapping`'s live mapping, which its owner (the pmem device)
    // keeps for as long as the VM exists; the caller places it outside every other slot.
    unsafe { vm.set_user_memory_region(region) }.map_err(|source| {
        MemoryError::SetUserMemoryRegion {
            slot,
            mib: mapping.len() >> 20,
            gpa,
            source,
        }
    })
}

/// Maps the hot-plug region, `size` bytes at guest physical address `gpa`, anonymous and
/// private (nothing is allocated until the guest, or a device, writes a page) and with
/// nothing plugged, with a dirty bitmap when `track_dirty`, and adds it to `mem` as its last
/// region.
pub fn add_hotplug_region(
    mem: &GuestMemoryMmap,
    gpa: u64,
    size: u64,
    track_dirty: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    let region = MemoryRegionState {
        base: gpa,
        size,
        offset: 0,
    };
    with_region(mem, anonymous_region(&region, track_dirty)?)
}

/// `mem` with `region` added as the hot-plug region (mapped as RAM was, once RAM is
/// registered with KVM), nothing of it plugged until the device says so.
pub fn with_region(
    mem: &GuestMemoryMmap,
    region: GuestRegionMmap,
) -> Result<GuestMemoryMmap, MemoryError> {
    let region = GuestRegion::hotplug(region).map_err(MemoryError::Protect)?;
    mem.insert_region(std::sync::Arc::new(region))
        .map_err(|_| MemoryError::Regions)
}

/// The hot-plug region's KVM memory slots: one per `slot_size` bytes, present while any
/// block in it is plugged. A slot that is not present is no memory to the guest at all (its
/// accesses exit to Skiff as MMIO, where nothing answers); inside a present slot, the
/// unplugged blocks' host pages are `PROT_NONE` (see [`GuestRegion`]), so a guest gets no more
/// than it plugged.
#[derive(Debug)]
pub struct HotplugSlots {
    /// A duplicate of the VM's descriptor: the event thread changes slots through it.
    vm: File,
    gpa: u64,
    host: u64,
    slot_size: u64,
    present: Vec<bool>,
    log_dirty: bool,
}

impl HotplugSlots {
    /// The slots of `mem`'s region at `gpa` (`size` bytes, a multiple of `slot_size`), none
    /// present yet; with `log_dirty`, KVM records the guest's writes in each once present.
    pub fn new(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        gpa: u64,
        size: u64,
        slot_size: u64,
        log_dirty: bool,
    ) -> Result<Self, MemoryError> {
        use std::os::fd::{AsRawFd, BorrowedFd};
        let region = mem
            .find_region(GuestAddress(gpa))
            .filter(|r| r.start_addr().0 == gpa && r.len() == size)
            .ok_or(MemoryError::Regions)?;
        let host = region.host_base();
        if slot_size == 0 || !size.is_multiple_of(slot_size) {
            return Err(MemoryError::Regions);
        }
        // SAFETY: the VM's descriptor is open for the whole call (`vm` is borrowed).
        let vm_fd = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) };
        let vm = File::from(vm_fd.try_clone_to_owned().map_err(|e| {
            MemoryError::SetUserMemoryRegion {
                slot: HOTPLUG_FIRST_SLOT,
                mib: slot_size >> 20,
                gpa,
                source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EBADF)),
            }
        })?);
        let count = usize::try_from(size / slot_size).map_err(|_| MemoryError::Regions)?;
        Ok(Self {
            vm,
            gpa,
            host: host as u64,
            slot_size,
            present: vec![false; count],
            log_dirty,
        })
    }

    /// How many slots the region has.
    pub fn count(&self) -> usize {
        self.present.len()
    }

    /// Makes slot `index` present to the guest (or removes it), if it is not so already.
    pub fn set_present(&mut self, index: usize, present: bool) -> Result<(), MemoryError> {
        if self.present.get(index) == Some(&present) {
            return Ok(());
        }
        let offset = self.slot_size * index as u64;
        let slot = HOTPLUG_FIRST_SLOT + u32::try_from(index).map_err(|_| MemoryError::Regions)?;
        let region = kvm_userspace_memory_region {
            slot,
            flags: if self.log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: self.gpa + offset,
            // Size 0 deletes the slot (KVM API 4.35).
            memory_size: if present { self.slot_size } else { 0 },
            userspace_addr: self.host + offset,
        };
        // SAFETY: the host range is part of the hot-plug region's mapping, which guest memory
        // owns and keeps for as long as the VM; slots of the region do not overlap each other
        // or any other slot. The ioctl reads `region` only.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(&self.vm, KVM_SET_USER_MEMORY_REGION(), &region)
        };
        if ret < 0 {
            return Err(MemoryError::SetUserMemoryRegion {
                slot,
                mib: self.slot_size >> 20,
                gpa: region.guest_phys_addr,
                source: kvm_ioctls::Error::last(),
            });
        }
        self.present[index] = present;
        Ok(())
    }

    /// The region's pages the guest wrote since the last call (one bit per page), from the
    /// dirty log of each present slot; absent slots hold nothing the guest wrote.
    fn take_dirty_log(&self, vm: &VmFd) -> Result<Vec<u64>, MemoryError> {
        let words_per_slot = usize::try_from(self.slot_size / (PAGE_SIZE as u64 * 64))
            .map_err(|_| MemoryError::Regions)?;
        let mut pages = vec![0u64; words_per_slot * self.present.len()];
        for (index, _) in self.present.iter().enumerate().filter(|(_, &p)| p) {
            let slot =
                HOTPLUG_FIRST_SLOT + u32::try_from(index).map_err(|_| MemoryError::Regions)?;
            let len = usize::try_from(self.slot_size).map_err(|_| MemoryError::Regions)?;
            let log = vm
                .get_dirty_log(slot, len)
                .map_err(|e| MemoryError::DirtyLog(slot, e))?;
            let at = index * words_per_slot;
            for (word, got) in pages[at..at + words_per_slot].iter_mut().zip(log) {
                *word |= got;
            }
        }
        Ok(pages)
    }

    /// Whether `gpa` is where the region starts.
    fn starts_at(&self, gpa: u64) -> bool {
        self.gpa == gpa
    }
}

/// The guest physical ranges that hold `size` bytes of RAM: below the MMIO hole, then above
/// 4 GiB for what does not fit.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(MMIO_HOLE_END), size - MMIO_HOLE_START),
        ]
    }
}

/// Maps `mib` MiB of anonymous guest RAM backed as `huge` says, refusing sizes beyond
/// `phys_bits` of address space; with `track_dirty`, each region gets a bitmap of the pages
/// Skiff writes.
pub fn create_guest_memory(
    mib: u64,
    phys_bits: u8,
    track_dirty: bool,
    huge: HugePages,
) -> Result<GuestMemoryMmap, MemoryError> {
    if mib == 0 {
        return Err(MemoryError::Empty);
    }
    if huge != HugePages::None && !mib.is_multiple_of(2) {
        return Err(MemoryError::HugePageSize { mib });
    }
    let too_large = MemoryError::TooLarge { mib, phys_bits };
    let size = mib.checked_mul(1 << 20).ok_or(too_large)?;
    let ranges = ram_ranges(size);
    let end = ranges
        .last()
        .and_then(|(start, len)| start.checked_add(*len))
        .map_or(u64::MAX, |a| a.raw_value());
    if phys_bits < 64 && end > (1u64 << phys_bits) {
        return Err(MemoryError::TooLarge { mib, phys_bits });
    }
    let ranges: Vec<(GuestAddress, usize)> = ranges
        .into_iter()
        .map(|(a, l)| usize::try_from(l).map(|l| (a, l)))
        .collect::<Result<_, _>>()
        .map_err(|_| MemoryError::TooLarge { mib, phys_bits })?;
    // hugetlbfs: no MAP_NORESERVE, so the kernel reserves every page of the pool now and a
    // pool too small fails here, not with SIGBUS when the guest first touches a page.
    let flags = match huge {
        HugePages::Huge2M => {
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB
        }
        HugePages::None | HugePages::Transparent => {
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE
        }
    };
    let regions = ranges
        .iter()
        .map(|&(addr, len)| {
            let region = MmapRegionBuilder::new_with_bitmap(len, bitmap(len, track_dirty))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .with_hugetlbfs(huge == HugePages::Huge2M)
                .build()
                .map_err(|e| match (huge, &e) {
                    (HugePages::Huge2M, vm_memory::mmap::MmapRegionError::Mmap(err))
                        if err.raw_os_error() == Some(libc::ENOMEM) =>
                    {
                        MemoryError::HugePagePool {
                            mib,
                            free: free_huge_pages(),
                        }
                    }
                    _ => MemoryError::Mmap {
                        mib,
                        source: vm_memory::mmap::FromRangesError::MmapRegion(e),
                    },
                })?;
            if huge == HugePages::Transparent {
                // SAFETY: the range is exactly the mapping `region` just made and owns;
                // MADV_HUGEPAGE only changes how the kernel backs it, never its contents.
                let rc = unsafe { libc::madvise(region.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
                if rc != 0 {
                    return Err(MemoryError::Madvise(std::io::Error::last_os_error()));
                }
            }
            GuestRegionMmap::new(region, addr)
                .map(GuestRegion::ram)
                .ok_or(MemoryError::Regions)
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryError::Regions)
}

/// The host's free 2 MiB huge pages (0 when /proc/meminfo does not say).
fn free_huge_pages() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn bitmap(len: usize, track_dirty: bool) -> Option<AtomicBitmap> {
    // A page size of 4096 is never zero.
    track_dirty.then(|| {
        AtomicBitmap::new(
            len,
            NonZeroUsize::new(PAGE_SIZE).unwrap_or(NonZeroUsize::MIN),
        )
    })
}

/// Anonymous guest memory over `ranges`, without dirty tracking (tests, fuzzing, benches).
pub fn anonymous(ranges: &[(GuestAddress, usize)]) -> Result<GuestMemoryMmap, MemoryError> {
    let regions = ranges
        .iter()
        .map(|&(addr, len)| {
            let region = MmapRegionBuilder::new_with_bitmap(len, None)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|source| MemoryError::MmapFile {
                    len: len as u64,
                    offset: 0,
                    source,
                })?;
            GuestRegionMmap::new(region, addr)
                .map(GuestRegion::ram)
                .ok_or(MemoryError::Regions)
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryError::Regions)
}

/// How guest RAM the guest gave up (a balloon's inflated pages, free pages it reported) goes
/// back to the host, which depends on what backs the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Discard {
    /// `madvise(MADV_DONTNEED)`: anonymous memory (a boot, or a restore whose pages a
    /// page-fault handler fills, which hears of it as `UFFD_EVENT_REMOVE`) is freed and reads
    /// back as zeros.
    #[default]
    DontNeed,
    /// A fresh anonymous mapping over the range (`MAP_FIXED`), as Firecracker does: memory
    /// mapped privately from a snapshot's memory file, where `MADV_DONTNEED` would only drop
    /// the private copy and the page would read back with the snapshot's content
    /// (`MADV_REMOVE` does not apply to private mappings).
    MapAnonymous,
}

/// Why a range of guest memory cannot be discarded.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    /// The range is not page-aligned or does not lie within one region of guest RAM.
    #[error("{len:#x} bytes at {addr:#x} are not whole pages of guest RAM")]
    Range {
        /// Guest physical address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The host refused.
    #[error("the host refused to discard {len:#x} bytes at {addr:#x}")]
    Host {
        /// Guest physical address.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// What madvise or mmap reported.
        #[source]
        source: std::io::Error,
    },
}

/// Gives the host back the memory behind `len` bytes of guest RAM at `addr` (whole pages of
/// one region), the way `how` says: the guest then reads zeros there and the process's
/// resident memory shrinks. The pages count as written (the region's bitmap, when dirty pages
/// are tracked), so a diff snapshot carries their new, zero, contents.
pub fn discard_range(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u64,
    how: Discard,
) -> Result<(), DiscardError> {
    let bad = || DiscardError::Range {
        addr: addr.raw_value(),
        len,
    };
    let page = PAGE_SIZE as u64;
    if len == 0 || !addr.raw_value().is_multiple_of(page) || !len.is_multiple_of(page) {
        return Err(bad());
    }
    let region = mem.find_region(addr).ok_or_else(bad)?;
    let offset = addr.raw_value() - region.start_addr().raw_value();
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(bad());
    }
    let host = mem.get_host_address(addr).map_err(|_| bad())?;
    let bytes = usize::try_from(len).map_err(|_| bad())?;
    if region.get_mmap().is_hugetlbfs() == Some(true) {
        // hugetlbfs frees whole 2 MiB pages only, and the balloon gives 4 KiB ones: the pages
        // stay the guest's (as in Firecracker, a balloon then limits the guest without
        // shrinking the host's memory). The guest gave them up, so it expects nothing of them.
        return Ok(());
    }
    let failed = match how {
        Discard::DontNeed => {
            // SAFETY: [host, host + bytes) is whole pages inside one region's live mapping,
            // owned by `mem` (checked above). The guest gave these pages up: dropping their
            // contents is what it asked for, and any later access, by the guest or a device,
            // faults in a zero page. No Rust reference into guest memory is held across this.
            let rc = unsafe { libc::madvise(host.cast(), bytes, libc::MADV_DONTNEED) };
            rc != 0
        }
        Discard::MapAnonymous => {
            // SAFETY: as above; MAP_FIXED replaces exactly those pages of the region's mapping,
            // in one step under the kernel's mmap lock (a vCPU touching them meanwhile sees
            // the old page or the new one, never a hole), with private anonymous memory of the
            // same protection. The region still unmaps its whole range when dropped, whatever
            // is mapped there then; KVM follows the new pages through its MMU notifier.
            let got = unsafe {
                libc::mmap(
                    host.cast(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            got != host.cast()
        }
    };
    if failed {
        return Err(DiscardError::Host {
            addr: addr.raw_value(),
            len,
            source: std::io::Error::last_os_error(),
        });
    }
    if let (Some(bitmap), Ok(offset)) = (region.get_mmap().bitmap(), usize::try_from(offset)) {
        bitmap.mark_dirty(offset, bytes);
    }
    Ok(())
}

/// One region of guest memory in a snapshot's memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryRegionState {
    /// Guest physical address of its first byte.
    pub base: u64,
    /// Its length in bytes.
    pub size: u64,
    /// Where it starts in the memory file.
    pub offset: u64,
}

/// Where each region of `mem` goes in a memory file: one after the other, in order.
pub fn memory_layout(mem: &GuestMemoryMmap) -> Vec<MemoryRegionState> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let state = MemoryRegionState {
                base: r.start_addr().raw_value(),
                size: r.len(),
                offset,
            };
            offset += r.len();
            state
        })
        .collect()
}

/// Maps `r` anonymous and empty (its file offset unused), with a dirty bitmap when
/// `track_dirty`.
pub fn anonymous_region(
    r: &MemoryRegionState,
    track_dirty: bool,
) -> Result<GuestRegionMmap, MemoryError> {
    let len = usize::try_from(r.size).map_err(|_| MemoryError::Regions)?;
    let region = MmapRegionBuilder::new_with_bitmap(len, bitmap(len, track_dirty))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| MemoryError::Mmap {
            mib: r.size >> 20,
            source: vm_memory::mmap::FromRangesError::MmapRegion(e),
        })?;
    GuestRegionMmap::new(region, GuestAddress(r.base)).ok_or(MemoryError::Regions)
}

/// Maps `regions` anonymous and empty, for a restore whose pages an external handler fills
/// (the Uffd backend): the same layout and dirty bitmaps as [`memory_from_file`].
pub fn memory_anonymous(
    regions: &[MemoryRegionState],
    track_dirty: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    let regions = regions
        .iter()
        .map(|r| anonymous_region(r, track_dirty).map(GuestRegion::ram))
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryError::Regions)
}

/// Maps region `r` of `file` privately (see [`memory_from_file`]).
pub fn file_region(
    file: &File,
    r: &MemoryRegionState,
    track_dirty: bool,
) -> Result<GuestRegionMmap, MemoryError> {
    let len = usize::try_from(r.size).map_err(|_| MemoryError::Regions)?;
    let fail = |source| MemoryError::MmapFile {
        len: r.size,
        offset: r.offset,
        source,
    };
    let file = file
        .try_clone()
        .map_err(|e| fail(vm_memory::mmap::MmapRegionError::Mmap(e)))?;
    let region = MmapRegionBuilder::new_with_bitmap(len, bitmap(len, track_dirty))
        .with_file_offset(FileOffset::new(file, r.offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(fail)?;
    GuestRegionMmap::new(region, GuestAddress(r.base)).ok_or(MemoryError::Regions)
}

/// Maps `regions` of `file` privately: pages are read from the file on first touch, a page the
/// guest writes becomes this process's own copy, and processes mapping the same file share
/// the page cache until they write (KVM sees ordinary memory either way).
pub fn memory_from_file(
    file: &File,
    regions: &[MemoryRegionState],
    track_dirty: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    let regions = regions
        .iter()
        .map(|r| file_region(file, r, track_dirty).map(GuestRegion::ram))
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryError::Regions)
}

/// Maps `regions` of `file` privately over `mem`'s own mappings, which they must match region
/// for region: guest memory made (and registered with KVM) ahead of a restore gets the
/// snapshot's pages without KVM being told anything new (KVM follows the host mapping through
/// its MMU notifier). Nothing may have used `mem` yet.
pub fn map_file_over(
    mem: &GuestMemoryMmap,
    file: &File,
    regions: &[MemoryRegionState],
) -> Result<(), MemoryError> {
    let layout = memory_layout(mem);
    let same = layout.len() == regions.len()
        && layout
            .iter()
            .zip(regions)
            .all(|(a, b)| a.base == b.base && a.size == b.size);
    if !same {
        return Err(MemoryError::Regions);
    }
    for (region, r) in mem.iter().zip(regions) {
        let fail = |source| MemoryError::MmapFile {
            len: r.size,
            offset: r.offset,
            source,
        };
        let host = region.host_base();
        let (Ok(len), Ok(offset)) = (usize::try_from(r.size), libc::off_t::try_from(r.offset))
        else {
            return Err(MemoryError::Regions);
        };
        // SAFETY: [host, host + len) is exactly this region's live mapping, owned by `mem`
        // (which unmaps it when dropped, whatever is mapped there then); nothing has read or
        // written it yet (no vCPU ran, no device is active), and MAP_FIXED replaces it in one
        // step with a private mapping of the file, of the same size and protection.
        let got = unsafe {
            libc::mmap(
                host.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                std::os::fd::AsRawFd::as_raw_fd(file),
                offset,
            )
        };
        if got != host.cast() {
            return Err(fail(vm_memory::mmap::MmapRegionError::Mmap(
                std::io::Error::last_os_error(),
            )));
        }
    }
    Ok(())
}

/// The pages of each region written since the last call (one bit per page, 64 to a word): the
/// guest's writes from KVM's dirty log (for the hot-plug region, that of its present slots),
/// Skiff's own (device DMA) from the region's bitmap. Both are cleared. Needs memory
/// registered with dirty logging and tracked bitmaps.
pub fn take_dirty_pages(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    hotplug: Option<&HotplugSlots>,
) -> Result<Vec<Vec<u64>>, MemoryError> {
    (0u32..)
        .zip(mem.iter())
        .map(|(slot, region)| {
            let len = usize::try_from(region.len()).map_err(|_| MemoryError::Regions)?;
            let mut pages = match hotplug.filter(|h| h.starts_at(region.start_addr().0)) {
                Some(h) => h.take_dirty_log(vm)?,
                None => vm
                    .get_dirty_log(slot, len)
                    .map_err(|e| MemoryError::DirtyLog(slot, e))?,
            };
            if let Some(bitmap) = region.get_mmap().bitmap() {
                for (word, own) in pages.iter_mut().zip(bitmap.get_and_reset()) {
                    *word |= own;
                }
            }
            Ok(pages)
        })
        .collect()
}

/// Registers every region of `mem` with KVM, one slot each; with `log_dirty`, KVM records the
/// pages the guest writes (KVM API, KVM_MEM_LOG_DIRTY_PAGES).
pub fn register_guest_memory(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    log_dirty: bool,
) -> Result<(), MemoryError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let host_addr = region.host_base();
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the host range [userspace_addr, +memory_size) is a live mapping owned by `mem`,
        // which the VM keeps alive for as long as the VM fd exists, and slots do not overlap.
        unsafe { vm.set_user_memory_region(kvm_region) }.map_err(|source| {
            MemoryError::SetUserMemoryRegion {
                slot,
                mib: region.len() >> 20,
                gpa: region.start_addr().raw_value(),
                source,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START));
        assert_eq!(
            r[1],
            (GuestAddress(MMIO_HOLE_END), (4 << 30) - MMIO_HOLE_START)
        );
    }

    #[test]
    fn huge_pages_need_whole_pages_and_a_pool_that_holds_them() {
        for huge in [HugePages::Transparent, HugePages::Huge2M] {
            assert!(matches!(
                create_guest_memory(3, 46, false, huge),
                Err(MemoryError::HugePageSize { mib: 3 })
            ));
        }
        let thp = create_guest_memory(4, 46, true, HugePages::Transparent).unwrap();
        assert_eq!(thp.iter().map(|r| r.len()).sum::<u64>(), 4 << 20);
        // No host has a TiB of huge pages reserved: the mapping fails at once, clearly.
        let err = create_guest_memory(1 << 20, 46, false, HugePages::Huge2M).unwrap_err();
        assert!(
            matches!(err, MemoryError::HugePagePool { mib: 1048576, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("nr_hugepages"), "{err}");
    }

    #[test]
    fn zero_and_huge_are_refused() {
        assert!(matches!(
            create_guest_memory(0, 46, false, HugePages::None),
            Err(MemoryError::Empty)
        ));
        assert!(matches!(
            create_guest_memory(1 << 40, 46, false, HugePages::None),
            Err(MemoryError::TooLarge { .. })
        ));
        assert!(matches!(
            create_guest_memory(u64::MAX, 46, false, HugePages::None),
            Err(MemoryError::TooLarge { .. })
        ));
    }

    #[test]
    fn discarded_pages_read_zero_from_anonymous_memory_and_from_a_file() {
        use std::io::Write;
        use vm_memory::Bytes;
        let mut file = scratch_file("discard");
        file.write_all(&[0xab; 4 * PAGE_SIZE]).unwrap();
        let regions = [MemoryRegionState {
            base: 0,
            size: 4 * PAGE_SIZE as u64,
            offset: 0,
        }];
        let anon = anonymous(&[(GuestAddress(0), 4 * PAGE_SIZE)]).unwrap();
        anon.write_slice(&[0xcd; 4 * PAGE_SIZE], GuestAddress(0))
            .unwrap();
        let from_file = memory_from_file(&file, &regions, false).unwrap();
        for (mem, how, was) in [
            (&anon, Discard::DontNeed, 0xcd),
            (&from_file, Discard::MapAnonymous, 0xab),
        ] {
            discard_range(mem, GuestAddress(PAGE_SIZE as u64), PAGE_SIZE as u64, how).unwrap();
            let mut page = [0u8; PAGE_SIZE];
            mem.read_slice(&mut page, GuestAddress(PAGE_SIZE as u64))
                .unwrap();
            assert!(page.iter().all(|&b| b == 0), "{how:?}");
            mem.read_slice(&mut page, GuestAddress(0)).unwrap();
            assert!(page.iter().all(|&b| b == was), "{how:?}: the page before");
        }
        // What MapAnonymous is for: DONTNEED on a private file mapping brings the file back.
        discard_range(
            &from_file,
            GuestAddress(0),
            PAGE_SIZE as u64,
            Discard::DontNeed,
        )
        .unwrap();
        let mut page = [0u8; PAGE_SIZE];
        from_file.read_slice(&mut page, GuestAddress(0)).unwrap();
        assert_eq!(page[0], 0xab);
        for (addr, len) in [
            (1, PAGE_SIZE as u64),
            (0, 1),
            (0, 5 * PAGE_SIZE as u64),
            (1 << 30, 4096),
        ] {
            assert!(matches!(
                discard_range(&anon, GuestAddress(addr), len, Discard::DontNeed),
                Err(DiscardError::Range { .. })
            ));
        }
    }

    /// A discarded page changed (to zeros) without a guest write KVM would log: it is marked in
    /// the region's bitmap, so a diff snapshot holds it.
    #[test]
    fn discarded_pages_count_as_written() {
        let mem = create_guest_memory(1, 46, true, HugePages::None).unwrap();
        let page = PAGE_SIZE as u64;
        discard_range(&mem, GuestAddress(3 * page), 2 * page, Discard::DontNeed).unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let mmap = region.get_mmap();
        let bitmap = mmap.bitmap().as_ref().unwrap();
        let dirty: Vec<usize> = (0..8).filter(|&p| bitmap.dirty_at(p * PAGE_SIZE)).collect();
        assert_eq!(dirty, [3, 4]);
    }

    /// A scratch file in the temporary directory, unlinked once open.
    fn scratch_file(name: &str) -> File {
        let path = std::env::temp_dir().join(format!("skiff-{name}-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    #[test]
    fn maps_a_small_guest() {
        let mem = create_guest_memory(2, 46, false, HugePages::None).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((2 << 20) - 1));
    }
}
