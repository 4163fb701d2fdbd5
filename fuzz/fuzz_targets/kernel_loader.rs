//! Kernel images and initrds as a user may hand them to Skiff, broken or hostile: the input is
//! written to a file and loaded by Skiff's own loader (`load_kernel`: ELF vmlinux, PVH note,
//! bzImage), then an initrd of a size from the input is placed (`load_initrd`) and the boot
//! structures are written (`write_boot_info`), all into a small guest memory.
//!
//! Input: guest RAM in MiB (2 to 17), the initrd's size (u32, at most 8 MiB; none when bit 31
//! is set), then the kernel file.

#![no_main]

use libfuzzer_sys::fuzz_target;
use skiff::arch::x86_64::boot::{build_cmdline, load_initrd, load_kernel, write_boot_info};
use skiff::config::DEFAULT_CMDLINE;
use skiff::vstate::memory::create_guest_memory;
use skiff_fuzz::{unnamed_file, Input};
use vm_memory::{Address, GuestMemoryBackend};

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mib = 2 + u64::from(input.u8() % 16);
    let initrd_size = input.u32();
    let (_kernel_file, kernel_path) = unnamed_file(input.rest());
    let mem = create_guest_memory(mib, 46, false, skiff::config::HugePages::None).expect("guest memory");

    let Ok(kernel) = load_kernel(&mem, &kernel_path) else {
        return;
    };
    let mut initrd = None;
    if initrd_size & (1 << 31) == 0 {
        let size = u64::from(initrd_size & 0x7f_ffff);
        let (file, path) = unnamed_file(&[]);
        file.set_len(size).expect("initrd size");
        if let Ok((addr, got)) = load_initrd(&mem, &kernel, &path) {
            let ram_end = mem.last_addr().raw_value() + 1;
            assert_eq!(got, size, "initrd size");
            assert_eq!(addr % 4096, 0, "initrd at {addr:#x}");
            assert!(addr + size <= ram_end, "initrd at {addr:#x}+{size:#x}");
            initrd = Some((addr, got));
        }
    }
    let cmdline = build_cmdline(DEFAULT_CMDLINE).expect("default command line");
    let _ = write_boot_info(&mem, &kernel, &cmdline, initrd, &[]);
});
