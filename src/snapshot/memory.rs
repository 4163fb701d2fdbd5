//! The memory file: guest RAM written region after region (full: every page that is not zero;
//! diff: the pages written since the last snapshot), and opened again for a restore.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::SnapshotError;
use crate::vstate::memory::{ram_ranges, GuestMemoryMmap, MemoryRegionState, PAGE_SIZE};

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

/// Calls `f` with each region of `mem` as bytes, with its layout entry.
fn for_each_region(
    mem: &GuestMemoryMmap,
    layout: &[MemoryRegionState],
    mut f: impl FnMut(&[u8], &MemoryRegionState) -> std::io::Result<()>,
) -> std::io::Result<()> {
    for (region, place) in mem.iter().zip(layout) {
        let Ok(host) = mem.get_host_address(region.start_addr()) else {
            continue;
        };
        let Ok(len) = usize::try_from(region.len()) else {
            continue;
        };
        // SAFETY: `host` is the start of the region's live mapping of `len` bytes, owned by
        // `mem`, which outlives the slice. Every vCPU and the event thread are paused while a
        // snapshot is written, so nothing writes guest memory while it is read here.
        let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
        f(bytes, place)?;
    }
    Ok(())
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
    let mut region_index = 0;
    for_each_region(mem, layout, |bytes, place| {
        let index = region_index;
        region_index += 1;
        let wanted = |page: usize| match dirty {
            None => !is_zero(&bytes[page * PAGE_SIZE..(page + 1) * PAGE_SIZE]),
            Some(maps) => maps
                .get(index)
                .and_then(|m| m.get(page / 64))
                .is_some_and(|w| w & (1 << (page % 64)) != 0),
        };
        let pages = bytes.len() / PAGE_SIZE;
        let mut page = 0;
        while page < pages {
            if !wanted(page) {
                page += 1;
                continue;
            }
            let first = page;
            while page < pages && wanted(page) {
                page += 1;
            }
            let run = &bytes[first * PAGE_SIZE..page * PAGE_SIZE];
            file.write_all_at(run, place.offset + (first * PAGE_SIZE) as u64)?;
        }
        Ok(())
    })
    .map_err(write_err)
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
