//! Guest RAM: the regions around the 32-bit MMIO hole, mapped with vm-memory and registered
//! with KVM as memory slots.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

/// Guest memory with dirty-page bitmap support left out (no migration yet).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

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

/// Maps `mib` MiB of anonymous guest RAM, refusing sizes beyond `phys_bits` of address space.
pub fn create_guest_memory(mib: u64, phys_bits: u8) -> Result<GuestMemoryMmap, MemoryError> {
    if mib == 0 {
        return Err(MemoryError::Empty);
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
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Mmap { mib, source })
}

/// Registers every region of `mem` with KVM, one slot each.
pub fn register_guest_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let host_addr = mem
            .get_host_address(region.start_addr())
            .map_err(|_| MemoryError::Empty)?;
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
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
    fn zero_and_huge_are_refused() {
        assert!(matches!(
            create_guest_memory(0, 46),
            Err(MemoryError::Empty)
        ));
        assert!(matches!(
            create_guest_memory(1 << 40, 46),
            Err(MemoryError::TooLarge { .. })
        ));
        assert!(matches!(
            create_guest_memory(u64::MAX, 46),
            Err(MemoryError::TooLarge { .. })
        ));
    }

    #[test]
    fn maps_a_small_guest() {
        let mem = create_guest_memory(2, 46).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((2 << 20) - 1));
    }
}
