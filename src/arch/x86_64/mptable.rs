//! The Intel MultiProcessor Specification 1.4 table, so guests without ACPI find every vCPU,
//! the IOAPIC and the legacy interrupt routing. Written at the start of the EBDA, where Linux
//! (`mpparse.c`) and our test guest look for the floating pointer.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, EBDA_START, IOAPIC_NUM_PINS, IOAPIC_START};
use crate::vstate::memory::GuestMemoryMmap;

/// Largest vCPU count the table can describe: xAPIC ids are 8 bits, 0xff is broadcast and
/// one id goes to the IOAPIC.
pub const MAX_CPUS: u8 = 254;

const MPC_SPEC_REV: u8 = 4;
// The MP table holds 32-bit physical addresses; these constants are all below 4 GiB.
#[allow(clippy::cast_possible_truncation)]
const IOAPIC_START_32: u32 = IOAPIC_START as u32;
#[allow(clippy::cast_possible_truncation)]
const APIC_START_32: u32 = APIC_START as u32;
#[allow(clippy::cast_possible_truncation)]
const TABLE_ADDR_32: u32 = (EBDA_START + 16) as u32;
#[allow(clippy::cast_possible_truncation)]
const IOAPIC_PINS: u8 = IOAPIC_NUM_PINS as u8;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6 signature and FPU + APIC feature flags for processor entries.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than the table can number.
    #[error("the MP table can describe at most {MAX_CPUS} vCPUs, not {0}")]
    TooManyCpus(u8),
    /// Guest memory does not cover the table.
    #[error("cannot write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Bytes whose sum with `bytes` is zero modulo 256 (the MP checksum rule).
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

/// Builds the MP configuration table (header and entries) for `num_cpus` vCPUs.
fn config_table(num_cpus: u8) -> Vec<u8> {
    let ioapic_id = num_cpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_START_32.to_le_bytes());
    count += 2;
    // Bus IRQ n drives IOAPIC pin n, polarity and trigger as the bus defines them.
    for pin in 0..IOAPIC_PINS {
        let kind = if pin == 0 {
            INT_TYPE_EXTINT
        } else {
            INT_TYPE_INT
        };
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, kind, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // Every local APIC: LINT0 is ExtINT, LINT1 is NMI.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let length = u16::try_from(44 + entries.len()).unwrap_or(u16::MAX);
    let mut table = Vec::with_capacity(usize::from(length));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.push(MPC_SPEC_REV);
    table.push(0); // checksum, filled below
    table.extend_from_slice(b"SKIFF   ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_START_32.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// Writes the MP floating pointer at the EBDA start with the configuration table after it.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let table_addr = EBDA_START + 16;
    let table = config_table(num_cpus);
    let mut fp = [0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&TABLE_ADDR_32.to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = MPC_SPEC_REV;
    fp[10] = checksum(&fp);
    mem.write_slice(&fp, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)?;
    mem.write_slice(&table, GuestAddress(table_addr))
        .map_err(MptableError::Write)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn table_checksums_and_cpu_entries() {
        let mem = crate::vstate::memory::anonymous(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_mptable(&mem, 4).unwrap();
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(sum(&fp), 0);
        let addr = u64::from(u32::from_le_bytes(fp[4..8].try_into().unwrap()));
        let mut hdr = [0u8; 44];
        mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        assert_eq!(&hdr[0..4], b"PCMP");
        let len = usize::from(u16::from_le_bytes([hdr[4], hdr[5]]));
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
        assert_eq!(sum(&table), 0);
        let cpus: Vec<u8> = (0..4).map(|i| table[44 + i * 20 + 1]).collect();
        assert_eq!(cpus, vec![0, 1, 2, 3]);
        assert_eq!(table[44 + 3] & CPU_BOOTPROCESSOR, CPU_BOOTPROCESSOR);
        assert_eq!(table[44 + 20 + 3], CPU_ENABLED);
        // The entry count covers processors, bus, IOAPIC, 24 pins and 2 LINT entries.
        assert_eq!(u16::from_le_bytes([hdr[34], hdr[35]]), 4 + 2 + 24 + 2);
    }

    #[test]
    fn too_many_cpus() {
        let mem = crate::vstate::memory::anonymous(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(matches!(
            setup_mptable(&mem, 255),
            Err(MptableError::TooManyCpus(255))
        ));
        assert!(setup_mptable(&mem, MAX_CPUS).is_ok());
    }
}
