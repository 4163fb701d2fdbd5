//! The memory file: guest RAM written region after region (full: every page that is not zero;
//! diff: the pages written since the last snapshot), and opened again for a restore.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::SnapshotError;
use crate::vstate::memory::{
    ram_ranges, GuestMemoryMmap, GuestRegion, MemoryRegionState, PAGE_SIZE,
};

/// Checks that `regions` are the ones Skiff lays out for their total size, with page-aligned
/// offsets in the memory file.
pub(super) fn check_regions(regions: &[MemoryRegionState]) -> Result<(), SnapshotError> {
    let total = regions
        .iter()
        .try_fold(0u64, |sum, r| sum.checked_add(r.size))
        .ok_or(SnapshotError::Invalid("guest memory size overflows"))?;
    if total == 0 || total % (1 << 20) != 0 {
        return Err(SnapshotError::Invalid(
            "guest memory is not a whole number of MiB",
        ));
    }
    let expected = ram_ranges(total);
    let same = expected.len() == regions.len()
        && expected
            .iter()
            .zip(regions)
            .all(|(&(base, size), r)| base == GuestAddress(r.base) && size == r.size);
    if !same {
        return Err(SnapshotError::Invalid(
            "guest memory regions are not laid out as Skiff lays them out",
        ));
    }
    if regions.iter().any(|r| r.offset % PAGE_SIZE as u64 != 0) {
        return Err(SnapshotError::Invalid(
            "a memory file offset is not page-aligned",
        ));
    }
    Ok(())
}

/// Pages `first..end` of `region`, which must all be accessible (not unplugged).
fn pages(region: &GuestRegion, first: usize, end: usize) -> &[u8] {
    debug_assert!((first..end).all(|p| region.is_accessible((p * PAGE_SIZE) as u64)));
    // SAFETY: the pages lie inside the region's live mapping (callers stay below its length in
    // pages), owned by `mem`, which outlives the slice, and are readable: the caller checked
    // that they are accessible, so they are not PROT_NONE. Every vCPU and the event thread
    // are paused while a snapshot is written, so nothing writes guest memory meanwhile.
    unsafe {
        std::slice::from_raw_parts(
            region.host_base().add(first * PAGE_SIZE).cast_const(),
            (end - first) * PAGE_SIZE,
        )
    }
}

/// Whether `page` holds only zeros.
fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to only reinterprets the aligned
        // middle of the slice.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Writes guest memory to the memory file at `path`. Full (`dirty` None): the file is created
/// or truncated and every page that is not zero is written (zero pages stay holes). Diff: the
/// pages `dirty` marks (one bit per page, a bitmap per region) are written over whatever the
/// file holds, which keeps its other bytes.
pub fn write_memory(
    mem: &GuestMemoryMmap,
    layout: &[MemoryRegionState],
    path: &Path,
    dirty: Option<&[Vec<u64>]>,
) -> Result<(), SnapshotError> {
    let write_err = |e| SnapshotError::Write(path.to_owned(), e);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(dirty.is_none())
        .custom_flags(libc::O_CLOEXEC)
        .mode(0o600)
        .open(path)
        .map_err(write_err)?;
    let total = layout.iter().map(|r| r.offset + r.size).max().unwrap_or(0);
    if file.metadata().map_err(write_err)?.len() < total {
        file.set_len(total).map_err(write_err)?;
    }
    static ZEROS: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    for (index, (region, place)) in mem.iter().zip(layout).enumerate() {
        let count = usize::try_from(region.len()).map_or(0, |len| len / PAGE_SIZE);
        // Unplugged hot-plug memory is never read: a full snapshot leaves it a hole, a diff
        // one writes zeros where it was unplugged since the last snapshot.
        let accessible = |page: usize| region.is_accessible((page * PAGE_SIZE) as u64);
        let wanted = |page: usize| match dirty {
            None => accessible(page) && !is_zero(pages(region, page, page + 1)),
            Some(maps) => maps
                .get(index)
                .and_then(|m| m.get(page / 64))
                .is_some_and(|w| w & (1 << (page % 64)) != 0),
        };
        let mut page = 0;
        while page < count {
            if !wanted(page) {
                page += 1;
                continue;
            }
            let (first, readable) = (page, accessible(page));
            while page < count && wanted(page) && accessible(page) == readable {
                page += 1;
            }
            let at = |p: usize| place.offset + (p * PAGE_SIZE) as u64;
            if readable {
                file.write_all_at(pages(region, first, page), at(first))
                    .map_err(write_err)?;
            } else {
                for p in first..page {
                    file.write_all_at(&ZEROS, at(p)).map_err(write_err)?;
                }
            }
        }
    }
    Ok(())
}

/// Opens a snapshot's memory file for reading (a private mapping needs no more), requiring a
/// regular file long enough for `regions`.
pub fn open_memory_file(path: &Path, regions: &[MemoryRegionState]) -> Result<File, SnapshotError> {
    let open_err = |e| SnapshotError::MemFile(path.to_owned(), e);
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.is_file() {
        return Err(SnapshotError::MemFileKind(path.to_owned()));
    }
    let needed = regions
        .iter()
        .map(|r| r.offset.saturating_add(r.size))
        .max()
        .unwrap_or(0);
    if meta.len() < needed {
        return Err(SnapshotError::MemFileShort {
            path: path.to_owned(),
            len: meta.len(),
            needed,
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::{anonymous, memory_layout};
    use vm_memory::Bytes;

    #[test]
    fn zero_pages_are_holes_and_a_diff_updates_a_copy_of_its_base() {
        let dir = std::env::temp_dir().join(format!("skiff-snapmem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mem = anonymous(&[(GuestAddress(0), 16 * PAGE_SIZE)]).unwrap();
        let layout = memory_layout(&mem);
        mem.write_obj(0xaau8, GuestAddress(3 * PAGE_SIZE as u64 + 5))
            .unwrap();
        let base = dir.join("base");
        write_memory(&mem, &layout, &base, None).unwrap();
        let bytes = std::fs::read(&base).unwrap();
        assert_eq!(bytes.len(), 16 * PAGE_SIZE);
        assert_eq!(bytes[3 * PAGE_SIZE + 5], 0xaa);
        // Only the written page takes space.
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&base).unwrap());
        assert!(blocks * 512 <= 2 * PAGE_SIZE as u64, "{blocks} blocks");

        mem.write_obj(0xbbu8, GuestAddress(9 * PAGE_SIZE as u64))
            .unwrap();
        mem.write_obj(0u8, GuestAddress(3 * PAGE_SIZE as u64 + 5))
            .unwrap();
        let merged = dir.join("merged");
        std::fs::copy(&base, &merged).unwrap();
        let dirty = vec![vec![(1u64 << 9) | (1 << 3)]];
        write_memory(&mem, &layout, &merged, Some(&dirty)).unwrap();
        let bytes = std::fs::read(&merged).unwrap();
        assert_eq!(bytes[9 * PAGE_SIZE], 0xbb);
        assert_eq!(
            bytes[3 * PAGE_SIZE + 5],
            0,
            "a page written back to zero is written"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The hot-plug region's unplugged blocks are PROT_NONE: writing a snapshot never reads
    /// them (it would fault). A full snapshot leaves them holes; a diff writes zeros for a
    /// block unplugged since its base, over what the base held there.
    #[test]
    fn unplugged_memory_is_never_read_and_a_diff_zeroes_it() {
        use crate::vstate::memory::add_hotplug_region;
        use vm_memory::GuestMemoryBackend;
        const MIB: u64 = 1 << 20;
        let dir = std::env::temp_dir().join(format!("skiff-snapplug-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ram = anonymous(&[(GuestAddress(0), 16 * PAGE_SIZE)]).unwrap();
        let mem = add_hotplug_region(&ram, 1 << 32, 8 * MIB, false).unwrap();
        let region = mem.find_region(GuestAddress(1 << 32)).unwrap();
        region.plug(2 * MIB, 4 * MIB).unwrap();
        mem.write_obj(0xccu8, GuestAddress((1 << 32) + 2 * MIB))
            .unwrap();
        mem.write_obj(0xddu8, GuestAddress((1 << 32) + 4 * MIB))
            .unwrap();
        let layout = memory_layout(&mem);
        let base = dir.join("base");
        write_memory(&mem, &layout, &base, None).unwrap();
        let at = |mib: u64| usize::try_from(layout[1].offset + mib * MIB).unwrap();
        let bytes = std::fs::read(&base).unwrap();
        assert_eq!((bytes[at(2)], bytes[at(4)]), (0xcc, 0xdd));

        region.unplug(4 * MIB, 2 * MIB).unwrap();
        let diff = dir.join("diff");
        std::fs::copy(&base, &diff).unwrap();
        let pages_per_mib = (1 << 20) / PAGE_SIZE;
        let mut plug_map = vec![0u64; 8 * pages_per_mib / 64];
        // The page at 2 MiB (plugged) and the one at 4 MiB (unplugged since) are dirty, and
        // so is one that was never plugged.
        for page in [2 * pages_per_mib, 4 * pages_per_mib, 0] {
            plug_map[page / 64] |= 1 << (page % 64);
        }
        write_memory(&mem, &layout, &diff, Some(&[vec![0], plug_map])).unwrap();
        let bytes = std::fs::read(&diff).unwrap();
        assert_eq!((bytes[at(2)], bytes[at(4)], bytes[at(0)]), (0xcc, 0, 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn regions_must_be_skiffs_own_layout() {
        let ok = [MemoryRegionState {
            base: 0,
            size: 128 << 20,
            offset: 0,
        }];
        check_regions(&ok).unwrap();
        let moved = [MemoryRegionState {
            base: 4096,
            size: 128 << 20,
            offset: 0,
        }];
        assert!(check_regions(&moved).is_err());
        let odd = [MemoryRegionState {
            base: 0,
            size: 128 << 20,
            offset: 7,
        }];
        assert!(check_regions(&odd).is_err());
        assert!(check_regions(&[]).is_err());
        let huge = [
            MemoryRegionState {
                base: 0,
                size: u64::MAX,
                offset: 0,
            },
            MemoryRegionState {
                base: 0,
                size: 2,
                offset: 0,
            },
        ];
        assert!(check_regions(&huge).is_err());
    }
}
