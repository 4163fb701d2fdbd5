//! The guest physical address map of an x86_64 Skiff microVM.
//!
//! Every fixed guest address lives here, so the whole layout can be read in one place.
//!
//! ```text
//! 0x0000_0000  real-mode IVT and BIOS data area (left zero)
//! 0x0000_0500  GDT for the boot protocols
//! 0x0000_6000  PVH hvm_start_info, then its module list and memory map
//! 0x0000_7000  Linux boot_params ("zero page")
//! 0x0000_8ff0  boot stack top (64-bit Linux boot protocol)
//! 0x0000_9000  identity page tables: PML4, PDPT, 4 page directories (first 4 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (the last KiB of base memory, where Linux looks for it)
//! 0x000a_0000  VGA / BIOS hole, not RAM in the e820 map
//! 0x0010_0000  kernel (high memory start); initrd at the top of low RAM
//! 0xc000_0000  32-bit MMIO hole (1 GiB): virtio-mmio devices, IOAPIC, LAPIC, TSS
//! 0xe000_0000  PCIe ECAM for bus 0 (1 MiB, reserved in the e820 map), with --enable-pci
//! 0xe800_0000  virtio-pci BARs (128 MiB window), with --enable-pci
//! 0x1_0000_0000  RAM above 4 GiB when the guest has more than 3 GiB
//! device memory  from the first GiB boundary at or above both 4 GiB and the end of RAM: each
//!                virtio-pmem device's file (2 MiB-aligned, one after the other), then the
//!                virtio-mem hot-plug region (1 GiB-aligned); none of it is in the e820 map
//! ```

/// GDT used by both boot protocols.
pub const BOOT_GDT_START: u64 = 0x500;
/// Null IDT (the guest installs its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x520;

/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (one entry: the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map, right after the module list.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Maximum number of PVH memory map entries that fit before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_START - PVH_MEMMAP_START) / 24) as usize;

/// Linux `boot_params` (the zero page) for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Page map level 4 of the identity mapping used by the 64-bit boot protocol.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Four page directories of 2 MiB pages that map the first 4 GiB.
pub const PDE_START: u64 = 0xb000;

/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line accepted, terminating NUL included (Linux x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Start of the Extended BIOS Data Area; the MP table is written here.
pub const EBDA_START: u64 = 0x9fc00;
/// End of base memory (RAM below the VGA hole).
pub const LOWMEM_END: u64 = 0xa0000;

/// Where the kernel is loaded and high memory starts.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole: no RAM between here and 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First address above 4 GiB.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Size of the 32-bit MMIO hole.
pub const MMIO_HOLE_SIZE: u64 = MMIO_HOLE_END - MMIO_HOLE_START;

/// First address of the window where virtio-mmio devices are placed.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device slot.
pub const MMIO_DEVICE_SLOT_SIZE: u64 = 0x1000;

/// PCIe ECAM (enhanced configuration access mechanism) of bus 0: 32 devices of 8 functions,
/// 4 KiB of configuration space each (PCIe 6.0, 7.2.2); reserved in the e820 map. Linux without
/// ACPI (no MCFG table) does not use it and reaches configuration space through
/// [`PCI_CONFIG_IO_PORT`] instead.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Size of the ECAM window (bus 0 only).
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// Window where Skiff places the virtio-pci devices' BARs (one after the other); a BAR the
/// guest moves is decoded only while it lies inside.
pub const PCI_MMIO_START: u64 = 0xe800_0000;
/// Size of the PCI BAR window.
pub const PCI_MMIO_SIZE: u64 = 0x0800_0000;
/// PCI configuration mechanism #1: CONFIG_ADDRESS at 0xcf8, CONFIG_DATA at 0xcfc-0xcff.
pub const PCI_CONFIG_IO_PORT: u16 = 0xcf8;

/// KVM's three-page TSS region (KVM_SET_TSS_ADDR), inside the MMIO hole.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page (KVM_SET_IDENTITY_MAP_ADDR), just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;

/// Alignment of the device-memory window, and of the hot-plug region in it.
pub const DEVICE_MEMORY_ALIGNMENT: u64 = 1 << 30;
/// Alignment (and size granule) of a virtio-pmem region: Linux maps it with
/// `devm_memremap_pages`, whose sub-section hot-plug needs 2 MiB (as Firecracker aligns it).
pub const PMEM_ALIGNMENT: u64 = 2 << 20;

/// First guest physical address of the device-memory window for a guest whose RAM ends at
/// `ram_end`: the first [`DEVICE_MEMORY_ALIGNMENT`] boundary at or above both 4 GiB and
/// `ram_end`. virtio-pmem regions start here; the virtio-mem region follows them at the next
/// [`DEVICE_MEMORY_ALIGNMENT`] boundary, so that it starts on a Linux memory block (128 MiB
/// on x86-64 guests below 64 GiB of RAM, larger on bigger ones: Linux's virtio_mem adds and
/// removes whole blocks only), and on a KVM slot (128 MiB or more).
pub fn device_memory_start(ram_end: u64) -> u64 {
    ram_end
        .max(MMIO_HOLE_END)
        .next_multiple_of(DEVICE_MEMORY_ALIGNMENT)
}

/// Legacy IRQ lines (GSIs) routed through the IOAPIC: 0-23.
pub const IOAPIC_NUM_PINS: u32 = 24;
/// First GSI handed to virtio-mmio devices.
pub const IRQ_DEVICES_START: u32 = 5;
/// Serial port COM1 interrupt.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 keyboard interrupt.
pub const I8042_KBD_IRQ: u32 = 1;

/// COM1 I/O ports.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// i8042 data port; the command/status port is at +4.
pub const I8042_PORT_BASE: u16 = 0x60;
/// Boot-progress port (the POST code port): each guest write is timestamped.
pub const PROGRESS_PORT: u16 = 0x80;
