//! One region of guest memory: vm-memory's mapping, and, for the virtio-mem hot-plug region,
//! which of its blocks are plugged. An unplugged block is no memory to anyone: its host pages
//! are `PROT_NONE`, so KVM cannot map them for the guest (a vCPU touching one gets `EFAULT`
//! from KVM_RUN), and Skiff's own accesses through vm-memory (a device following a descriptor
//! there, a snapshot) fail as an address with no host memory instead of faulting.
//!
//! Plugging and unplugging happen on the event thread, which is also where devices access
//! guest memory, so no access is under way while a block changes state; snapshots are taken
//! with every thread paused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::bitmap::{AtomicBitmap, Bitmap, BS};
use vm_memory::guest_memory::Result as AccessResult;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryError, GuestMemoryRegion, GuestMemoryRegionBytes,
    GuestUsize, MemoryRegionAddress, VolatileSlice,
};

/// vm-memory's region with Skiff's dirty bitmap.
pub type MmapRegion = vm_memory::GuestRegionMmap<Option<AtomicBitmap>>;

/// The unit in which plugged memory is tracked: the smallest virtio-mem block Skiff takes
/// (Firecracker's 2 MiB), which divides every block size it takes.
pub const PLUG_UNIT: u64 = 2 << 20;

/// A region of guest memory: RAM (every byte accessible), or the hot-plug region (only what
/// is plugged).
#[derive(Debug)]
pub struct GuestRegion {
    mmap: MmapRegion,
    plugged: Option<Arc<PluggedUnits>>,
}

/// One bit per [`PLUG_UNIT`] of the hot-plug region, set while the unit is plugged.
#[derive(Debug)]
pub struct PluggedUnits {
    bits: Box<[AtomicU64]>,
}

impl PluggedUnits {
    fn new(len: u64) -> Self {
        let words = usize::try_from(len.div_ceil(PLUG_UNIT).div_ceil(64)).unwrap_or(0);
        Self {
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn bit(unit: u64) -> (usize, u64) {
        (
            usize::try_from(unit / 64).unwrap_or(usize::MAX),
            1 << (unit % 64),
        )
    }

    fn is_plugged(&self, unit: u64) -> bool {
        let (word, mask) = Self::bit(unit);
        self.bits
            .get(word)
            .is_some_and(|w| w.load(Ordering::Acquire) & mask != 0)
    }

    fn set(&self, units: std::ops::Range<u64>, plugged: bool) {
        for unit in units {
            let (word, mask) = Self::bit(unit);
            if let Some(w) = self.bits.get(word) {
                if plugged {
                    w.fetch_or(mask, Ordering::AcqRel);
                } else {
                    w.fetch_and(!mask, Ordering::AcqRel);
                }
            }
        }
    }
}

impl GuestRegion {
    /// A region of RAM: all of it accessible.
    pub fn ram(mmap: MmapRegion) -> Self {
        Self {
            mmap,
            plugged: None,
        }
    }

    /// The hot-plug region over `mmap`, nothing plugged: its whole mapping becomes
    /// `PROT_NONE` (what is mapped there, a snapshot's file included, stays underneath).
    pub fn hotplug(mmap: MmapRegion) -> std::io::Result<Self> {
        let region = Self {
            plugged: Some(Arc::new(PluggedUnits::new(mmap.len()))),
            mmap,
        };
        region.protect(0, region.mmap.len(), libc::PROT_NONE)?;
        Ok(region)
    }

    /// Where the mapping starts in Skiff's address space, plugged or not (for KVM slots and
    /// snapshots, which check [`GuestRegion::is_accessible`] themselves).
    pub fn host_base(&self) -> *mut u8 {
        self.mmap.as_ptr()
    }

    /// Whether the bytes at `offset` in the region are memory Skiff and the guest may use.
    pub fn is_accessible(&self, offset: u64) -> bool {
        self.plugged
            .as_ref()
            .is_none_or(|p| offset < self.mmap.len() && p.is_plugged(offset / PLUG_UNIT))
    }

    /// Whether every byte of `len` at `offset` is accessible.
    fn check(&self, offset: MemoryRegionAddress, len: usize) -> AccessResult<()> {
        let Some(plugged) = &self.plugged else {
            return Ok(());
        };
        let start = offset.0;
        let end = start.saturating_add((len as u64).max(1));
        if (start / PLUG_UNIT..end.div_ceil(PLUG_UNIT)).all(|u| plugged.is_plugged(u)) {
            Ok(())
        } else {
            Err(GuestMemoryError::HostAddressNotAvailable)
        }
    }

    /// Checks that `len` bytes at `offset` are whole plug units of a hot-plug region.
    fn units(&self, offset: u64, len: u64) -> std::io::Result<std::ops::Range<u64>> {
        let end = offset.checked_add(len).filter(|&e| e <= self.mmap.len());
        match (&self.plugged, end) {
            (Some(_), Some(end))
                if len != 0
                    && offset.is_multiple_of(PLUG_UNIT)
                    && len.is_multiple_of(PLUG_UNIT) =>
            {
                Ok(offset / PLUG_UNIT..end / PLUG_UNIT)
            }
            _ => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    /// Plugs `len` bytes at `offset` (whole plug units): fresh zeroed memory, readable and
    /// writable, in place of whatever was there (an unplugged block keeps nothing of its past,
    /// a snapshot's contents included). The pages count as written, for diff snapshots.
    pub fn plug(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let units = self.units(offset, len)?;
        self.map_fresh(offset, len, libc::PROT_READ | libc::PROT_WRITE)?;
        self.mark_dirty(offset, len);
        if let Some(p) = &self.plugged {
            p.set(units, true);
        }
        Ok(())
    }

    /// Unplugs `len` bytes at `offset` (whole plug units): Skiff stops using them first, then
    /// fresh `PROT_NONE` memory replaces them, which gives their pages back to the host (and
    /// drops KVM's mappings of them through its MMU notifier). The pages count as written.
    pub fn unplug(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let units = self.units(offset, len)?;
        if let Some(p) = &self.plugged {
            p.set(units, false);
        }
        self.map_fresh(offset, len, libc::PROT_NONE)?;
        self.mark_dirty(offset, len);
        Ok(())
    }

    /// Makes `len` bytes at `offset` (whole plug units) accessible again as they are: the
    /// plugged blocks of a restored VM, whose contents are the snapshot's.
    pub fn restore_plugged(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let units = self.units(offset, len)?;
        self.protect(offset, len, libc::PROT_READ | libc::PROT_WRITE)?;
        if let Some(p) = &self.plugged {
            p.set(units, true);
        }
        Ok(())
    }

    fn mark_dirty(&self, offset: u64, len: u64) {
        if let (Ok(offset), Ok(len)) = (usize::try_from(offset), usize::try_from(len)) {
            self.mmap.bitmap().mark_dirty(offset, len);
        }
    }

    fn range(&self, offset: u64, len: u64) -> std::io::Result<(*mut libc::c_void, usize)> {
        let inside = offset
            .checked_add(len)
            .is_some_and(|end| end <= self.mmap.len());
        match (usize::try_from(offset), usize::try_from(len)) {
            (Ok(o), Ok(l)) if inside => Ok((self.host_base().wrapping_add(o).cast(), l)),
            _ => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn protect(&self, offset: u64, len: u64, prot: libc::c_int) -> std::io::Result<()> {
        let (addr, len) = self.range(offset, len)?;
        // SAFETY: [addr, addr + len) lies inside this region's live mapping (checked by
        // `range`), which the region owns; changing its protection moves nothing, and Skiff
        // holds no reference into guest memory across the change (accesses go through
        // vm-memory, which checks `plugged` first).
        if unsafe { libc::mprotect(addr, len, prot) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn map_fresh(&self, offset: u64, len: u64, prot: libc::c_int) -> std::io::Result<()> {
        let (addr, len) = self.range(offset, len)?;
        // SAFETY: [addr, addr + len) lies inside this region's live mapping (checked by
        // `range`), which the region owns and unmaps whole when dropped; MAP_FIXED replaces
        // that part in one step with new anonymous memory, and nothing in Skiff holds a
        // reference into it (see `protect`).
        let got = unsafe {
            libc::mmap(
                addr,
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if got != addr {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl std::ops::Deref for GuestRegion {
    type Target = MmapRegion;

    fn deref(&self) -> &MmapRegion {
        &self.mmap
    }
}

impl GuestMemoryRegionBytes for GuestRegion {}

impl GuestMemoryRegion for GuestRegion {
    type B = Option<AtomicBitmap>;

    fn len(&self) -> GuestUsize {
        self.mmap.len()
    }

    fn start_addr(&self) -> GuestAddress {
        self.mmap.start_addr()
    }

    fn bitmap(&self) -> BS<'_, Self::B> {
        self.mmap.bitmap()
    }

    fn get_host_address(&self, addr: MemoryRegionAddress) -> AccessResult<*mut u8> {
        self.check(addr, 1)?;
        self.mmap.get_host_address(addr)
    }

    fn file_offset(&self) -> Option<&FileOffset> {
        self.mmap.file_offset()
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> AccessResult<VolatileSlice<'_, BS<'_, Self::B>>> {
        self.check(offset, count)?;
        self.mmap.get_slice(offset, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{Bytes, GuestMemoryBackend};

    const MIB: u64 = 1 << 20;

    fn hotplug_region(size: u64) -> GuestRegion {
        let len = usize::try_from(size).unwrap();
        let map = MmapRegionBuilder::new_with_bitmap(len, None)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .unwrap();
        let mmap = MmapRegion::new(map, GuestAddress(1 << 32)).unwrap();
        GuestRegion::hotplug(mmap).unwrap()
    }

    /// The protection of the host page at `offset` of the region, from /proc/self/maps
    /// ("rw-p", "---p").
    fn host_protection(region: &GuestRegion, offset: u64) -> String {
        let addr = region.host_base() as u64 + offset;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines()
            .find_map(|l| {
                let (range, rest) = l.split_once(' ')?;
                let (from, to) = range.split_once('-')?;
                let (from, to) = (
                    u64::from_str_radix(from, 16).ok()?,
                    u64::from_str_radix(to, 16).ok()?,
                );
                (from..to).contains(&addr).then(|| rest[..4].to_owned())
            })
            .unwrap()
    }

    #[test]
    fn unplugged_units_are_no_memory_to_skiff_or_the_host_mapping() {
        let region = hotplug_region(8 * MIB);
        let mem = vm_memory::GuestRegionCollection::from_regions(vec![region]).unwrap();
        let region = mem.find_region(GuestAddress(1 << 32)).unwrap();
        let at = |off: u64| GuestAddress((1 << 32) + off);
        assert_eq!(host_protection(region, 0), "---p");
        assert!(mem.read_obj::<u64>(at(0)).is_err());
        assert!(mem.get_host_address(at(0)).is_err());

        region.plug(2 * MIB, 2 * MIB).unwrap();
        assert_eq!(host_protection(region, 2 * MIB), "rw-p");
        assert_eq!(host_protection(region, 0), "---p");
        mem.write_obj(0x5a5a_u64, at(2 * MIB + 8)).unwrap();
        assert_eq!(mem.read_obj::<u64>(at(2 * MIB + 8)).unwrap(), 0x5a5a);
        // An access that runs from a plugged unit into an unplugged one fails whole.
        assert!(mem.read_obj::<u64>(at(4 * MIB - 4)).is_err());
        assert!(mem.read_obj::<u64>(at(2 * MIB - 4)).is_err());
        assert!(region.is_accessible(2 * MIB) && !region.is_accessible(4 * MIB));

        region.unplug(2 * MIB, 2 * MIB).unwrap();
        assert_eq!(host_protection(region, 2 * MIB), "---p");
        assert!(mem.read_obj::<u64>(at(2 * MIB + 8)).is_err());
        // Plugged again, the block is fresh memory: nothing of what it held.
        region.plug(2 * MIB, 2 * MIB).unwrap();
        assert_eq!(mem.read_obj::<u64>(at(2 * MIB + 8)).unwrap(), 0);

        for (offset, len) in [(MIB, 2 * MIB), (0, MIB), (0, 0), (6 * MIB, 4 * MIB)] {
            assert!(region.plug(offset, len).is_err(), "{offset:#x}+{len:#x}");
            assert!(region.unplug(offset, len).is_err(), "{offset:#x}+{len:#x}");
        }
    }

    #[test]
    fn restored_plugged_units_keep_their_contents() {
        let mem =
            vm_memory::GuestRegionCollection::from_regions(vec![hotplug_region(4 * MIB)]).unwrap();
        let region = mem.find_region(GuestAddress(1 << 32)).unwrap();
        // What a snapshot's file put there, under PROT_NONE until the device says plugged.
        region
            .protect(0, 4 * MIB, libc::PROT_READ | libc::PROT_WRITE)
            .unwrap();
        // SAFETY: the region's first page is mapped, readable and writable just above.
        unsafe { region.host_base().cast::<u64>().write(7) };
        region.protect(0, 4 * MIB, libc::PROT_NONE).unwrap();
        assert!(mem.read_obj::<u64>(GuestAddress(1 << 32)).is_err());
        region.restore_plugged(0, 2 * MIB).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(1 << 32)).unwrap(), 7);
        assert!(mem
            .read_obj::<u64>(GuestAddress((1 << 32) + 2 * MIB))
            .is_err());
    }

    #[test]
    fn ram_is_always_accessible() {
        let mem = crate::vstate::memory::anonymous(&[(GuestAddress(0), 0x10000)]).unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        assert!(region.is_accessible(0));
        assert!(region.plug(0, PLUG_UNIT).is_err());
        mem.write_obj(1u32, GuestAddress(0x100)).unwrap();
    }
}
