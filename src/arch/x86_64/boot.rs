//! Loading the guest kernel, initrd and command line, and writing what the boot protocol
//! hands the kernel: the PVH `hvm_start_info` or the Linux `boot_params`, with the e820 map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_HOLE_START, PVH_INFO_START,
    PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use super::regs::BootEntry;
use crate::vstate::memory::{ram_ranges, GuestMemoryMmap};

/// Errors while loading the kernel, initrd or command line.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {}", .0.display())]
    KernelFile(PathBuf, #[source] std::io::Error),
    /// The kernel file is neither an ELF vmlinux nor a bzImage.
    #[error("{} is not a kernel Skiff can boot (neither an x86_64 ELF nor a bzImage)", .0.display())]
    NotAKernel(PathBuf),
    /// The kernel is malformed or does not fit in guest memory.
    #[error("cannot load kernel {}", .0.display())]
    LoadKernel(PathBuf, #[source] linux_loader::loader::Error),
    /// The initrd file cannot be opened or read.
    #[error("cannot read initrd {}", .0.display())]
    InitrdFile(PathBuf, #[source] std::io::Error),
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error(
        "initrd {} ({size} bytes) does not fit in guest memory: at most {room} bytes are free below {limit:#x}",
        path.display()
    )]
    InitrdTooLarge {
        /// The initrd file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Room left.
        room: u64,
        /// The highest address it may end at.
        limit: u64,
    },
    /// The command line is too long or holds characters Linux cannot take.
    #[error("invalid kernel command line (at most {} bytes of printable ASCII)", CMDLINE_MAX_SIZE - 1)]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing boot structures to guest memory failed.
    #[error("cannot write boot information to guest memory")]
    WriteBootInfo(#[source] vm_memory::GuestMemoryError),
    /// A boot_params field cannot hold an address or size.
    #[error("{0:#x} does not fit in a 32-bit boot_params field")]
    Above4G(u64),
    /// The memory map does not fit in the space the layout gives it.
    #[error("too many memory map entries")]
    MemmapTooLarge,
}

/// e820 memory types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// PVH start-of-day structure (xen/include/public/arch-x86/hvm/start_info.h), version 1.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

/// One PVH module (the initrd).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct HvmModlistEntry {
    paddr: u64,
    size: u64,
    cmdline_paddr: u64,
    reserved: u64,
}

/// One PVH memory map entry (same types as e820).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct HvmMemmapEntry {
    addr: u64,
    size: u64,
    type_: u32,
    reserved: u32,
}

// SAFETY: plain-old-data C structs with no padding holes that matter and no references: every
// bit pattern is a valid value.
unsafe impl ByteValued for HvmStartInfo {}
// SAFETY: as above.
unsafe impl ByteValued for HvmModlistEntry {}
// SAFETY: as above.
unsafe impl ByteValued for HvmMemmapEntry {}

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// bzImage entry for the 64-bit boot protocol: 0x200 past the protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// initrd_addr_max when the kernel gives none (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// What was loaded, and how to enter it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The kernel's entry and protocol.
    pub entry: BootEntry,
    /// The bzImage setup header, when the kernel was a bzImage.
    setup_header: Option<setup_header>,
    /// First byte after the kernel image.
    kernel_end: u64,
}

/// Builds the command line from the user's string, refusing one Linux could not take.
pub fn build_cmdline(raw: &str) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    if !raw.trim().is_empty() {
        cmdline.insert_str(raw.trim()).map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Kernel parameters a KVM PVM host needs. There a guest kernel executes CPUID natively and
/// sees the host's features, so the CPUID Skiff sets cannot stop Linux from using
/// instructions the PVM emulator then fails on (measured: `xrstor`, `lock cmpxchg16b`,
/// `popcnt`, `clac`); the kernel is told on its command line instead. XSAVE goes through
/// `clearcpuid` too: Linux 6.1 reads `noxsave` but does not register it as a parameter, so it
/// also hands that word to init as its first argument. ERMS and FSRM go too: with them Linux clears and copies pages with byte-wise `rep`
/// string instructions, which the emulator runs one iteration per byte (measured: an anonymous
/// page fault 7.2 ms with them, 3.5 ms without). `skiff.no_int3_selftest` is read by Skiff's
/// kernel patch (resources/linux/patches) and ignored by other kernels.
///
/// Without XSAVE the guest kernel saves no AVX state across context switches, yet guest user
/// mode executes CPUID and AVX natively there and sees the host's AVX (measured: OSXSAVE, AVX
/// and AVX2 set; the upper YMM halves lost in about 30 % of switches). The kernel hands the
/// `GLIBC_TUNABLES` word to init as an environment variable, inherited by every process, so
/// glibc's string functions keep off AVX; code that uses AVX by itself stays at risk.
pub const PVM_KERNEL_PARAMS: &[&str] = &[
    "clearcpuid=cx16,popcnt,smap,smep,pcid,invpcid,fsgsbase,xsave,erms,fsrm",
    "skiff.no_int3_selftest",
    "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-FMA,-AVX512F,-AVX512CD,-AVX512BW,-AVX512DQ,-AVX512VL",
];

/// Splits a command line into kernel parameters and what follows `--` (init's arguments).
fn split_init_args(line: &str) -> (&str, Option<&str>) {
    match line.split_once(" -- ") {
        Some((k, i)) => (k, Some(i)),
        None => match line.strip_prefix("-- ") {
            Some(i) => ("", Some(i)),
            None => (line, None),
        },
    }
}

/// Adds kernel parameters to `cmdline`, before any `--` so they do not go to init.
pub fn append_kernel_params(cmdline: &mut Cmdline, params: &[String]) -> Result<(), BootError> {
    if params.is_empty() {
        return Ok(());
    }
    let current = cmdline_text(cmdline)?;
    let (kernel, init) = split_init_args(&current);
    let mut words: Vec<&str> = kernel.split_whitespace().collect();
    words.extend(params.iter().map(String::as_str).filter(|p| !p.is_empty()));
    *cmdline = rebuild_cmdline(&words, init)?;
    Ok(())
}

/// The command line as text.
fn cmdline_text(cmdline: &Cmdline) -> Result<String, BootError> {
    Ok(cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .to_string_lossy()
        .into_owned())
}

/// A command line of the kernel's `words`, then init's arguments after `--` when there are.
fn rebuild_cmdline(words: &[&str], init: Option<&str>) -> Result<Cmdline, BootError> {
    let mut rebuilt = words.join(" ");
    if let Some(init) = init {
        rebuilt.push_str(" -- ");
        rebuilt.push_str(init);
    }
    build_cmdline(&rebuilt)
}

/// Drops every `param` word from the kernel's part of the command line (init's arguments
/// after `--` stay as they are).
pub fn remove_kernel_param(cmdline: &mut Cmdline, param: &str) -> Result<(), BootError> {
    let current = cmdline_text(cmdline)?;
    let (kernel, init) = split_init_args(&current);
    let words: Vec<&str> = (kernel.split_whitespace())
        .filter(|w| *w != param)
        .collect();
    *cmdline = rebuild_cmdline(&words, init)?;
    Ok(())
}

/// Appends [`PVM_KERNEL_PARAMS`] the user did not give already.
pub fn add_pvm_workarounds(cmdline: &mut Cmdline) -> Result<(), BootError> {
    let current = cmdline_text(cmdline)?;
    let (kernel, _) = split_init_args(&current);
    let given: Vec<&str> = kernel
        .split_whitespace()
        .filter_map(|w| w.split('=').next())
        .collect();
    let (kept, added): (Vec<&str>, Vec<&str>) = PVM_KERNEL_PARAMS
        .iter()
        .partition(|p| given.contains(&p.split('=').next().unwrap_or(p)));
    for p in kept {
        log::warn!(
            "PVM host: the command line's own {}= stands in for Skiff's {p}; without that the guest may fail on this host",
            p.split('=').next().unwrap_or(p)
        );
    }
    let added: Vec<String> = added.into_iter().map(str::to_owned).collect();
    append_kernel_params(cmdline, &added)?;
    if !added.is_empty() {
        log::info!("PVM host: added kernel parameters {}", added.join(" "));
    }
    Ok(())
}

fn open(path: &Path) -> Result<File, BootError> {
    open_regular(path).map_err(|e| BootError::KernelFile(path.to_owned(), e))
}

/// Opens `path` for reading if it is a regular file. O_NONBLOCK, which regular files ignore,
/// keeps a FIFO from blocking the open until a writer comes (and the API with it).
fn open_regular(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // Refused before the open as well: opening some devices has effects of its own (a
    // watchdog starts counting); the check after the open is the one that holds.
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Checks that the kernel and initrd can be opened as regular files, before anything costly
/// (guest memory, KVM) is set up for a boot that would fail on them.
pub fn check_boot_files(kernel: &Path, initrd: Option<&Path>) -> Result<(), BootError> {
    open(kernel)?;
    if let Some(path) = initrd {
        open_regular(path).map_err(|e| BootError::InitrdFile(path.to_owned(), e))?;
    }
    Ok(())
}

/// Whether `path` is a Linux kernel: a bzImage, or an ELF with a note of Linux's (every
/// vmlinux has them). Skiff's PVM workarounds are Linux kernel parameters; other guests (the
/// test guest, unikernels) are left their command line as given. Anything unreadable is "no":
/// loading the kernel reports it.
pub fn is_linux(path: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(file) = open(path) else { return false };
    let read = |offset: u64, len: usize| -> Option<Vec<u8>> {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).ok().map(|()| buf)
    };
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |b: &[u8], o: usize| u64::from(u32_at(b, o)) | u64::from(u32_at(b, o + 4)) << 32;
    if read(0x202, 4).is_some_and(|m| u32_at(&m, 0) == KERNEL_HDR_MAGIC) {
        return true;
    }
    let Some(eh) = read(0, 64).filter(|h| h.starts_with(b"\x7fELF\x02")) else {
        return false;
    };
    let (phoff, phentsize, phnum) = (u64_at(&eh, 0x20), u16_at(&eh, 0x36), u16_at(&eh, 0x38));
    if phentsize < 56 || phnum > 64 {
        return false;
    }
    (0..u64::from(phnum)).any(|i| {
        let Some(ph) = phoff
            .checked_add(i * u64::from(phentsize))
            .and_then(|at| read(at, 56))
        else {
            return false;
        };
        // PT_NOTE; a vmlinux's notes take a few hundred bytes.
        if u32_at(&ph, 0) != 4 {
            return false;
        }
        let len = usize::try_from(u64_at(&ph, 32)).map_or(0, |l| l.min(64 << 10));
        let Some(notes) = read(u64_at(&ph, 8), len) else {
            return false;
        };
        let mut at = 0usize;
        while at + 12 <= notes.len() {
            let name_len = u32_at(&notes, at) as usize;
            let desc_len = u32_at(&notes, at + 4) as usize;
            let name = notes.get(at + 12..at + 12 + name_len).unwrap_or_default();
            if name == b"Linux\0" {
                return true;
            }
            at += 12 + name_len.next_multiple_of(4) + desc_len.next_multiple_of(4);
        }
        false
    })
}

/// Loads an ELF vmlinux (PVH entry when it has the note, else the 64-bit boot protocol) or
/// a bzImage (64-bit boot protocol) into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = open(path)?;
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    let mut hdr_magic = [0u8; 4];
    let is_bzimage = file.seek(SeekFrom::Start(0x202)).is_ok()
        && file.read_exact(&mut hdr_magic).is_ok()
        && u32::from_le_bytes(hdr_magic) == KERNEL_HDR_MAGIC;
    let load_err = |e| BootError::LoadKernel(path.to_owned(), e);
    if is_elf {
        let r: KernelLoaderResult =
            Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
        let entry = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => BootEntry::Pvh(addr.raw_value()),
            _ => BootEntry::Linux64(r.kernel_load.raw_value()),
        };
        Ok(LoadedKernel {
            entry,
            setup_header: None,
            kernel_end: r.kernel_end,
        })
    } else if is_bzimage {
        let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(load_err)?;
        Ok(LoadedKernel {
            entry: BootEntry::Linux64(r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET),
            setup_header: r.setup_header,
            kernel_end: r.kernel_end,
        })
    } else {
        Err(BootError::NotAKernel(path.to_owned()))
    }
}

/// Places the initrd at the highest page-aligned address that keeps it above the kernel,
/// inside low RAM and below the kernel's `initrd_addr_max`. Returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<(u64, u64), BootError> {
    let file_err = |e| BootError::InitrdFile(path.to_owned(), e);
    let mut file = open_regular(path).map_err(file_err)?;
    let size = file.metadata().map_err(file_err)?.len();
    let lowmem_end = mem
        .last_addr()
        .raw_value()
        .saturating_add(1)
        .min(MMIO_HOLE_START);
    let addr_max = match kernel.setup_header {
        Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
        Some(_) => DEFAULT_INITRD_ADDR_MAX,
        None => u64::MAX,
    };
    let limit = lowmem_end.min(addr_max.saturating_add(1));
    // An ELF segment may claim memory up to the top of the address space: no room then.
    let floor = kernel
        .kernel_end
        .checked_next_multiple_of(4096)
        .unwrap_or(u64::MAX);
    let room = limit.saturating_sub(floor);
    let too_large = BootError::InitrdTooLarge {
        path: path.to_owned(),
        size,
        room,
        limit,
    };
    if size > room {
        return Err(too_large);
    }
    let addr = (limit - size) & !0xfff;
    let len = usize::try_from(size).map_err(|_| too_large)?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(io) => file_err(io),
            other => BootError::WriteBootInfo(other),
        })?;
    Ok((addr, size))
}

/// The RAM entries of the e820 map: base memory below the EBDA, then high memory.
fn e820_ram(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let total: u64 = mem.iter().map(GuestMemoryRegion::len).sum();
    let mut map = vec![(0, EBDA_START)];
    for (start, len) in ram_ranges(total) {
        let end = start.raw_value() + len;
        let start = start.raw_value().max(HIMEM_START);
        if end > start {
            map.push((start, end - start));
        }
    }
    map
}

/// A value the 64-bit boot protocol keeps in a 32-bit field.
fn low32(value: u64) -> Result<u32, BootError> {
    u32::try_from(value).map_err(|_| BootError::Above4G(value))
}

/// Writes the kernel command line and the boot protocol's structures; the memory map holds
/// the RAM and the `reserved` ranges (PCI ECAM).
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<(u64, u64)>,
    reserved: &[(u64, u64)],
) -> Result<(), BootError> {
    let cstr = cmdline.as_cstring().map_err(BootError::Cmdline)?;
    let bytes = cstr.as_bytes_with_nul();
    mem.write_slice(bytes, GuestAddress(CMDLINE_START))
        .map_err(BootError::WriteBootInfo)?;
    let mut ram: Vec<(u64, u64, u32)> = (e820_ram(mem).into_iter())
        .map(|(addr, size)| (addr, size, E820_RAM))
        .chain(
            reserved
                .iter()
                .map(|&(addr, size)| (addr, size, E820_RESERVED)),
        )
        .collect();
    ram.sort_unstable();
    let w = |e| BootError::WriteBootInfo(e);
    match kernel.entry {
        BootEntry::Pvh(_) => {
            if ram.len() > PVH_MEMMAP_MAX_ENTRIES {
                return Err(BootError::MemmapTooLarge);
            }
            let mut info = HvmStartInfo {
                magic: XEN_HVM_START_MAGIC,
                version: 1,
                cmdline_paddr: CMDLINE_START,
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries: u32::try_from(ram.len()).map_err(|_| BootError::MemmapTooLarge)?,
                ..Default::default()
            };
            if let Some((paddr, size)) = initrd {
                let module = HvmModlistEntry {
                    paddr,
                    size,
                    ..Default::default()
                };
                mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
                    .map_err(w)?;
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MODLIST_START;
            }
            for (i, (addr, size, type_)) in (0u64..).zip(ram.iter()) {
                let entry = HvmMemmapEntry {
                    addr: *addr,
                    size: *size,
                    type_: *type_,
                    reserved: 0,
                };
                let at = PVH_MEMMAP_START + i * std::mem::size_of::<HvmMemmapEntry>() as u64;
                mem.write_obj(entry, GuestAddress(at)).map_err(w)?;
            }
            mem.write_obj(info, GuestAddress(PVH_INFO_START))
                .map_err(w)?;
        }
        BootEntry::Linux64(_) => {
            let mut params = boot_params::default();
            if let Some(hdr) = kernel.setup_header {
                params.hdr = hdr;
            }
            params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.cmd_line_ptr = low32(CMDLINE_START)?;
            params.hdr.cmdline_size = low32((bytes.len() - 1) as u64)?;
            if params.hdr.kernel_alignment == 0 {
                params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            }
            if let Some((addr, size)) = initrd {
                params.hdr.ramdisk_image = low32(addr)?;
                params.hdr.ramdisk_size = low32(size)?;
            }
            if ram.len() > params.e820_table.len() {
                return Err(BootError::MemmapTooLarge);
            }
            for (slot, (addr, size, type_)) in params.e820_table.iter_mut().zip(ram.iter()) {
                slot.addr = *addr;
                slot.size = *size;
                slot.r#type = *type_;
            }
            params.e820_entries = u8::try_from(ram.len()).map_err(|_| BootError::MemmapTooLarge)?;
            mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
                .map_err(w)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(mib: usize) -> GuestMemoryMmap {
        crate::vstate::memory::anonymous(&[(GuestAddress(0), mib << 20)]).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("skiff-boot-{}-{name}", std::process::id()));
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    #[test]
    fn e820_skips_the_bios_hole() {
        assert_eq!(
            e820_ram(&mem(16)),
            vec![(0, EBDA_START), (HIMEM_START, (16 << 20) - HIMEM_START)]
        );
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let p = temp_file("garbage", &[0x42; 4096]);
        assert!(matches!(
            load_kernel(&mem(4), &p),
            Err(BootError::NotAKernel(_))
        ));
        let empty = temp_file("empty", &[]);
        assert!(matches!(
            load_kernel(&mem(4), &empty),
            Err(BootError::NotAKernel(_))
        ));
        std::fs::remove_file(p).unwrap();
        std::fs::remove_file(empty).unwrap();
    }

    #[test]
    fn missing_kernel_and_directory() {
        assert!(matches!(
            load_kernel(&mem(4), Path::new("/nonexistent/vmlinux")),
            Err(BootError::KernelFile(..))
        ));
        assert!(matches!(
            load_kernel(&mem(4), Path::new("/")),
            Err(BootError::KernelFile(..))
        ));
    }

    #[test]
    fn truncated_elf_is_refused() {
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.resize(40, 0);
        let p = temp_file("truncated-elf", &elf);
        assert!(matches!(
            load_kernel(&mem(4), &p),
            Err(BootError::LoadKernel(..))
        ));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn initrd_goes_high_and_must_fit() {
        let m = mem(8);
        let k = LoadedKernel {
            entry: BootEntry::Pvh(HIMEM_START),
            setup_header: None,
            kernel_end: 0x20_0000,
        };
        let p = temp_file("initrd", &[7u8; 5000]);
        let (addr, size) = load_initrd(&m, &k, &p).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 8 << 20 && addr >= 0x20_0000);
        let b: u8 = m.read_obj(GuestAddress(addr + 4999)).unwrap();
        assert_eq!(b, 7);
        let big = temp_file("initrd-big", &vec![0u8; 7 << 20]);
        assert!(matches!(
            load_initrd(&m, &k, &big),
            Err(BootError::InitrdTooLarge { .. })
        ));
        std::fs::remove_file(p).unwrap();
        std::fs::remove_file(big).unwrap();
    }

    /// An x86_64 ELF with one PT_LOAD of 16 bytes at 1 MiB whose memory size is `memsz`.
    fn elf_with_memsz(memsz: u64) -> Vec<u8> {
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.resize(16, 0);
        // e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize,
        // e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx.
        for (v, n) in [
            (2, 2),
            (62, 2),
            (1, 4),
            (HIMEM_START, 8),
            (64, 8),
            (0, 8),
            (0, 4),
            (64, 2),
            (56, 2),
            (1, 2),
            (0, 6),
        ] {
            elf.extend_from_slice(&u64::to_le_bytes(v)[..n]);
        }
        // p_type PT_LOAD, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align.
        for (v, n) in [
            (1, 4),
            (5, 4),
            (120, 8),
            (HIMEM_START, 8),
            (HIMEM_START, 8),
            (16, 8),
            (memsz, 8),
            (0x1000, 8),
        ] {
            elf.extend_from_slice(&u64::to_le_bytes(v)[..n]);
        }
        elf.extend_from_slice(&[0xf4; 16]);
        elf
    }

    /// An ELF whose one program header is a PT_NOTE holding a note of `owner`.
    fn elf_with_note(owner: &[u8]) -> Vec<u8> {
        let mut elf = elf_with_memsz(16);
        let at = elf.len() as u64;
        let mut note = Vec::new();
        for v in [u32::try_from(owner.len()).unwrap(), 4, 1] {
            note.extend_from_slice(&v.to_le_bytes());
        }
        note.extend_from_slice(owner);
        note.resize(12 + owner.len().next_multiple_of(4), 0);
        note.extend_from_slice(&[1, 2, 3, 4]);
        elf[64..68].copy_from_slice(&4u32.to_le_bytes());
        elf[72..80].copy_from_slice(&at.to_le_bytes());
        elf[96..104].copy_from_slice(&(note.len() as u64).to_le_bytes());
        elf.extend_from_slice(&note);
        elf
    }

    #[test]
    fn only_linux_kernels_are_taken_for_linux() {
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(&KERNEL_HDR_MAGIC.to_le_bytes());
        for (name, bytes, linux) in [
            ("bzimage", bz, true),
            ("elf-linux-note", elf_with_note(b"Linux\0"), true),
            ("elf-xen-note", elf_with_note(b"Xen\0"), false),
            ("elf-no-note", elf_with_memsz(16), false),
            ("garbage", vec![0x7f; 100], false),
        ] {
            let p = temp_file(name, &bytes);
            assert_eq!(is_linux(&p), linux, "{name}");
            std::fs::remove_file(p).unwrap();
        }
        assert!(!is_linux(Path::new("/nonexistent/vmlinux")));
    }

    /// Found by fuzz/fuzz_targets/kernel_loader.rs: a segment whose memory size reaches the top
    /// of the address space made the initrd placement overflow (a panic with overflow checks,
    /// an initrd over the kernel without). There is no room left for an initrd.
    #[test]
    fn kernel_reaching_the_top_of_memory_leaves_no_room_for_an_initrd() {
        let m = mem(4);
        let p = temp_file("elf-huge-memsz", &elf_with_memsz(u64::MAX - HIMEM_START));
        let k = load_kernel(&m, &p).unwrap();
        let initrd = temp_file("initrd-after-huge", &[1u8; 100]);
        assert!(matches!(
            load_initrd(&m, &k, &initrd),
            Err(BootError::InitrdTooLarge { room: 0, .. })
        ));
        std::fs::remove_file(p).unwrap();
        std::fs::remove_file(initrd).unwrap();
    }

    #[test]
    fn cmdline_limits() {
        assert!(build_cmdline("console=ttyS0").is_ok());
        assert!(matches!(
            build_cmdline(&"a".repeat(CMDLINE_MAX_SIZE)),
            Err(BootError::Cmdline(_))
        ));
        assert!(matches!(
            build_cmdline("bad\u{1}char"),
            Err(BootError::Cmdline(_))
        ));
    }

    #[test]
    fn pvm_params_go_before_init_arguments() {
        let mut c = build_cmdline("console=ttyS0 skiff.no_int3_selftest -- echo hi").unwrap();
        add_pvm_workarounds(&mut c).unwrap();
        let s = c.as_cstring().unwrap().into_string().unwrap();
        assert_eq!(
            s,
            "console=ttyS0 skiff.no_int3_selftest clearcpuid=cx16,popcnt,smap,smep,pcid,invpcid,fsgsbase,xsave,erms,fsrm GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-FMA,-AVX512F,-AVX512CD,-AVX512BW,-AVX512DQ,-AVX512VL -- echo hi"
        );
        let mut empty = build_cmdline("").unwrap();
        add_pvm_workarounds(&mut empty).unwrap();
        assert!(empty
            .as_cstring()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("clearcpuid="));
    }

    #[test]
    fn pvh_start_info_is_written() {
        let m = mem(16);
        let k = LoadedKernel {
            entry: BootEntry::Pvh(HIMEM_START),
            setup_header: None,
            kernel_end: 0x20_0000,
        };
        write_boot_info(
            &m,
            &k,
            &build_cmdline("hello").unwrap(),
            Some((0x80_0000, 100)),
            &[(0xe000_0000, 0x10_0000)],
        )
        .unwrap();
        let info: HvmStartInfo = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.memmap_entries, 3);
        let r: HvmMemmapEntry = m.read_obj(GuestAddress(PVH_MEMMAP_START + 48)).unwrap();
        assert_eq!(
            (r.addr, r.size, r.type_),
            (0xe000_0000, 0x10_0000, E820_RESERVED)
        );
        assert_eq!(info.nr_modules, 1);
        let e: HvmMemmapEntry = m.read_obj(GuestAddress(PVH_MEMMAP_START + 24)).unwrap();
        assert_eq!((e.addr, e.size), (HIMEM_START, (16 << 20) - HIMEM_START));
        let mut c = [0u8; 6];
        m.read_slice(&mut c, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&c, b"hello\0");
    }
}
