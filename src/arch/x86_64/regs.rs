//! Initial register state for the boot vCPU: segments, control registers, identity page
//! tables, FPU and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};
use crate::vstate::memory::GuestMemoryMmap;

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, `rbx` = hvm_start_info.
    Pvh(u64),
    /// Linux 64-bit boot protocol: long mode, identity-mapped, `rsi` = boot_params.
    Linux64(u64),
}

/// Errors while writing boot register state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Guest memory too small for the boot tables.
    #[error("cannot write the boot GDT and page tables to guest memory")]
    WriteTables(#[source] vm_memory::GuestMemoryError),
}

// GDT selectors. The Linux boot protocol asks for __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
const SELECTOR_CODE32: u16 = 0x08;
const SELECTOR_CODE64: u16 = 0x10;
const SELECTOR_DATA: u16 = 0x18;
const SELECTOR_TSS: u16 = 0x20;

/// GDT entries: null, 32-bit code, 64-bit code, data, TSS (flat, base 0).
const GDT: [u64; 5] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A GDT descriptor from its flags (access byte and the G/DB/L nibble), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM segment that `selector` of the boot GDT describes.
fn segment(selector: u16) -> kvm_segment {
    let entry = GDT[usize::from(selector >> 3)];
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// General-purpose registers at the kernel entry.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    match entry {
        BootEntry::Pvh(rip) => kvm_regs {
            rflags: 0x2,
            rip,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
        BootEntry::Linux64(rip) => kvm_regs {
            rflags: 0x2,
            rip,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
    }
}

/// Writes the GDT (and for 64-bit entry the identity page tables) to guest memory and returns
/// the special registers that go with them, starting from the vCPU's current `sregs`.
pub fn boot_sregs(
    mem: &GuestMemoryMmap,
    entry: BootEntry,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    for (i, e) in (0u64..).zip(GDT.iter()) {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + i * 8))
            .map_err(RegsError::WriteTables)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(RegsError::WriteTables)?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = u16::try_from(GDT.len() * 8 - 1).unwrap_or(u16::MAX);
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let data = segment(SELECTOR_DATA);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(SELECTOR_TSS);
    match entry {
        BootEntry::Pvh(_) => {
            sregs.cs = segment(SELECTOR_CODE32);
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64(_) => {
            write_identity_page_tables(mem)?;
            sregs.cs = segment(SELECTOR_CODE64);
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    Ok(sregs)
}

/// Identity-maps the first 4 GiB with 2 MiB pages: one PML4 entry, four PDPT entries.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let w = |val: u64, addr: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(RegsError::WriteTables)
    };
    w(PDPTE_START | 0x3, PML4_START)?;
    for dir in 0..4u64 {
        w((PDE_START + dir * 0x1000) | 0x3, PDPTE_START + dir * 8)?;
        for i in 0..512u64 {
            let page = (dir * 512 + i) << 21;
            // Present, writable, 2 MiB page.
            w(page | 0x83, PDE_START + dir * 0x1000 + i * 8)?;
        }
    }
    Ok(())
}

/// FPU state after reset: x87 control word 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = |i: usize| lapic.regs[offset + i].to_ne_bytes()[0];
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = std::os::raw::c_char::from_ne_bytes([byte]);
    }
}

/// Wires LINT0 as ExtINT (the PIC) and LINT1 as NMI, as a BIOS would (MP spec 3.6.2.1).
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8));
    let lvt1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, (lvt1 & !0x700) | (APIC_MODE_NMI << 8));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let cs = segment(SELECTOR_CODE64);
        assert_eq!(
            (cs.l, cs.db, cs.g, cs.present, cs.type_, cs.s),
            (1, 0, 1, 1, 0xb, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let cs32 = segment(SELECTOR_CODE32);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        let ds = segment(SELECTOR_DATA);
        assert_eq!(ds.type_, 0x3);
    }

    #[test]
    fn long_mode_sregs_and_page_tables() {
        let mem = crate::vstate::memory::anonymous(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let s = boot_sregs(&mem, BootEntry::Linux64(0x100_0000), kvm_sregs::default()).unwrap();
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        let pde1: u64 = mem.read_obj(GuestAddress(PDE_START + 8)).unwrap();
        assert_eq!(pde1, (1 << 21) | 0x83);
        let last: u64 = mem
            .read_obj(GuestAddress(PDE_START + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last, ((4u64 << 30) - (2 << 20)) | 0x83);
    }

    #[test]
    fn pvh_starts_in_protected_mode() {
        let mem = crate::vstate::memory::anonymous(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let s = boot_sregs(&mem, BootEntry::Pvh(0x10_0000), kvm_sregs::default()).unwrap();
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.cs.selector, SELECTOR_CODE32);
        assert_eq!(boot_regs(BootEntry::Pvh(0x10_0000)).rbx, PVH_INFO_START);
    }

    #[test]
    fn lint_pins() {
        let mut l = kvm_lapic_state::default();
        set_lint(&mut l);
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0x700);
        assert_eq!(lapic_reg(&l, APIC_LVT1), 0x400);
    }
}
