/*
 * The floor for tools/bench's start-up rows: the least a VMM can do to run a PVH guest from
 * process start to its power-off. It does what every VMM must (open /dev/kvm, create the VM
 * with KVM's in-kernel irqchip and PIT, map and register the guest's RAM, load the ELF, one vCPU with
 * the CPUID KVM supports, run it, tear it down at exit) and nothing else: no devices, no
 * threads, the serial port answered inline, no checks of its input (a bench tool, run on our
 * own test guest only).
 *
 *   boot-floor ELF MIB CMDLINE   runs the guest; its serial output goes to stdout; exits when
 *                                the guest resets through the i8042 (port 0x64, 0xfe) or halts;
 *                                BOOT_FLOOR_NO_PIT=1 leaves the PIT out
 */
#include <elf.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define START_INFO 0x6000
#define MEMMAP 0x7000
#define CMDLINE 0x20000

static void die(const char *what)
{
	perror(what);
	exit(1);
}

struct hvm_start_info {
	uint32_t magic, version, flags, nr_modules;
	uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
	uint32_t memmap_entries, reserved;
};
struct hvm_memmap_entry { uint64_t addr, size; uint32_t type, reserved; };

/* Loads the ELF's segments into guest memory; returns the PVH entry point. */
static uint32_t load(const char *path, uint8_t *mem, uint64_t size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0) die(path);
	uint8_t *f = mmap(0, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (f == MAP_FAILED) die("mmap ELF");
	const Elf64_Ehdr *eh = (const void *)f;
	uint32_t entry = 0;
	for (int i = 0; i < eh->e_phnum; i++) {
		const Elf64_Phdr *ph = (const void *)(f + eh->e_phoff + (uint64_t)i * eh->e_phentsize);
		if (ph->p_type == PT_LOAD) {
			if (ph->p_paddr + ph->p_memsz > size) { fprintf(stderr, "segment past RAM\n"); exit(1); }
			memcpy(mem + ph->p_paddr, f + ph->p_offset, ph->p_filesz);
		} else if (ph->p_type == PT_NOTE) {
			for (uint64_t off = 0; off + 12 <= ph->p_filesz;) {
				const uint32_t *n = (const void *)(f + ph->p_offset + off);
				uint64_t name = (n[0] + 3) & ~3u, desc = (n[1] + 3) & ~3u;
				if (n[2] == 18 && n[0] == 4 && !memcmp(n + 3, "Xen", 4))
					entry = *(const uint32_t *)((const uint8_t *)(n + 3) + name);
				off += 12 + name + desc;
			}
		}
	}
	munmap(f, (size_t)st.st_size);
	close(fd);
	if (!entry) { fprintf(stderr, "no PVH entry note\n"); exit(1); }
	return entry;
}

int main(int argc, char **argv)
{
	if (argc != 4) { fprintf(stderr, "usage: boot-floor ELF MIB CMDLINE\n"); return 2; }
	uint64_t size = strtoull(argv[2], 0, 10) << 20;
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) die("/dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0) die("KVM_CREATE_VM");
	if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000) < 0) die("KVM_SET_TSS_ADDR");
	if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");
	/* Skiff, Firecracker and QEMU's microvm all create KVM's PIT; on a KVM PVM host its
	 * teardown at exit (stopping its kernel thread) is about half of this program's time. */
	struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
	if (!getenv("BOOT_FLOOR_NO_PIT") && ioctl(vm, KVM_CREATE_PIT2, &pit) < 0) die("KVM_CREATE_PIT2");
	uint8_t *mem = mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED) die("mmap");
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = size, .userspace_addr = (uint64_t)mem,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
	uint32_t entry = load(argv[1], mem, size);
	struct hvm_memmap_entry map[2] = { { 0, 0x9fc00, 1, 0 }, { 0x100000, size - 0x100000, 1, 0 } };
	memcpy(mem + MEMMAP, map, sizeof(map));
	strncpy((char *)mem + CMDLINE, argv[3], 2047);
	struct hvm_start_info si = { .magic = 0x336ec578, .version = 1, .cmdline_paddr = CMDLINE,
				     .memmap_paddr = MEMMAP, .memmap_entries = 2 };
	memcpy(mem + START_INFO, &si, sizeof(si));

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0) die("KVM_CREATE_VCPU");
	struct { struct kvm_cpuid2 h; struct kvm_cpuid_entry2 e[256]; } cpuid = { .h.nent = 256 };
	if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0) die("KVM_GET_SUPPORTED_CPUID");
	if (ioctl(vcpu, KVM_SET_CPUID2, &cpuid) < 0) die("KVM_SET_CPUID2");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(0, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED) die("mmap kvm_run");
	/* PVH: 32-bit protected mode, flat segments, paging off, %ebx = start info. */
	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
	struct kvm_segment code = { .base = 0, .limit = 0xffffffff, .selector = 0x8, .type = 11, .present = 1,
				    .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1 };
	struct kvm_segment data = code;
	data.type = 3;
	data.selector = 0x10;
	sregs.cs = code;
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
	sregs.cr0 = 0x11;	/* PE | ET */
	sregs.cr4 = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
	struct kvm_regs regs = { .rip = entry, .rbx = START_INFO, .rflags = 2 };
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

	char out[4096];
	size_t used = 0;
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
		if (run->exit_reason == KVM_EXIT_HLT || run->exit_reason == KVM_EXIT_SHUTDOWN)
			break;
		if (run->exit_reason == KVM_EXIT_MMIO) {
			if (!run->mmio.is_write)
				memset(run->mmio.data, 0xff, sizeof(run->mmio.data));
			continue;
		}
		if (run->exit_reason != KVM_EXIT_IO) {
			fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
			return 1;
		}
		uint8_t *data = (uint8_t *)run + run->io.data_offset;
		uint16_t port = run->io.port;
		if (run->io.direction == KVM_EXIT_IO_OUT) {
			if (port == 0x3f8 && used < sizeof(out))
				out[used++] = (char)data[0];
			if (port == 0x64 && data[0] == 0xfe)
				break;
		} else {
			/* The serial port's line status: the transmitter is always empty. */
			memset(data, port == 0x3fd ? 0x60 : 0xff, run->io.size * run->io.count);
		}
	}
	fwrite(out, 1, used, stdout);
	return 0;
}
