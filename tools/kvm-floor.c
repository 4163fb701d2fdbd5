/*
 * The floor for tools/bench's exit-cost rows: the least a VMM can do per exit. A VM with a few
 * pages of memory and one vCPU running a one-instruction exit in a loop; every KVM_RUN returns
 * with KVM_EXIT_IO (or KVM_EXIT_MMIO) and goes straight back. No devices, no dispatch.
 *
 *   kvm-floor N [irqchip] [ring3] [mmio]
 *     prints "RESULT floor frames=N bytes=0 us=T".
 *     irqchip: the VM also has KVM's in-kernel PIC/IOAPIC/LAPIC, as every real VMM's has;
 *     ring3:   the loop runs in 64-bit ring 3 (identity map with the U bit, a TSS whose I/O
 *              bitmap allows the port), as the test guest's benchmark loops do, instead of
 *              real mode: on a PVM host only guest user mode runs natively;
 *     mmio:    a byte write to unbacked guest memory (0x8000) instead of `out %al, $0x80`.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what)
{
	perror(what);
	exit(1);
}

/* Guest physical layout: code, PML4, PDPT, PD, TSS (one page each from 0x1000); 0x8000 and
 * everything else up is unbacked (the MMIO target). */
#define CODE 0x1000
#define PML4 0x2000
#define TSS 0x5000
#define MEM_SIZE 0x5000
#define MMIO_TARGET 0x8000

static void ring3_long_mode(uint8_t *mem, struct kvm_sregs *sregs)
{
	uint64_t *pml4 = (uint64_t *)(mem + PML4 - CODE), *pdpt = pml4 + 512, *pd = pdpt + 512;
	pml4[0] = (PML4 + 0x1000) | 7;		/* present, writable, user */
	pdpt[0] = (PML4 + 0x2000) | 7;
	pd[0] = 0x87;				/* 2 MiB page at 0 */
	uint8_t *tss = mem + TSS - CODE;
	tss[102] = 104;				/* I/O bitmap right after the TSS: all clear... */
	tss[104 + 0x80 / 8 + 1] = 0xff;		/* ...up to port 0x87, then the closing byte */
	sregs->cr0 = 0x80000011;		/* PG, ET, PE */
	sregs->cr3 = PML4;
	sregs->cr4 = 0x20;			/* PAE */
	sregs->efer = 0x500;			/* LME, LMA */
	struct kvm_segment code = { .base = 0, .limit = 0xffffffff, .selector = 0x23, .type = 11, .present = 1,
				    .dpl = 3, .db = 0, .s = 1, .l = 1, .g = 1 };
	struct kvm_segment data = { .base = 0, .limit = 0xffffffff, .selector = 0x1b, .type = 3, .present = 1,
				    .dpl = 3, .db = 1, .s = 1, .l = 0, .g = 1 };
	sregs->cs = code;
	sregs->ss = sregs->ds = sregs->es = sregs->fs = sregs->gs = data;
	sregs->tr = (struct kvm_segment){ .base = TSS, .limit = 104 + 0x80 / 8 + 1, .selector = 0x28, .type = 11,
					  .present = 1 };
}

int main(int argc, char **argv)
{
	uint64_t n = argc > 1 ? strtoull(argv[1], 0, 10) : 100000;
	int irqchip = 0, ring3 = 0, mmio = 0;
	for (int i = 2; i < argc; i++) {
		if (!strcmp(argv[i], "irqchip")) irqchip = 1;
		else if (!strcmp(argv[i], "ring3")) ring3 = 1;
		else if (!strcmp(argv[i], "mmio")) mmio = 1;
		else {
			fprintf(stderr, "kvm-floor: unknown option '%s' (irqchip, ring3, mmio)\n", argv[i]);
			return 2;
		}
	}
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) die("/dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0) die("KVM_CREATE_VM");
	if (irqchip && ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
		die("KVM_CREATE_IRQCHIP");
	uint8_t *mem = mmap(0, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) die("mmap");
	/* 1: out %al, $0x80 | mov %al, 0x8000 (16-bit moffs, or 64-bit absolute); jmp 1b */
	const uint8_t port[] = { 0xe6, 0x80, 0xeb, 0xfc };
	const uint8_t mmio16[] = { 0xa2, 0x00, 0x80, 0xeb, 0xfb };
	const uint8_t mmio64[] = { 0x88, 0x04, 0x25, 0x00, 0x80, 0x00, 0x00, 0xeb, 0xf7 };
	if (!mmio) memcpy(mem, port, sizeof(port));
	else if (ring3) memcpy(mem, mmio64, sizeof(mmio64));
	else memcpy(mem, mmio16, sizeof(mmio16));
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = CODE, .memory_size = MEM_SIZE, .userspace_addr = (uint64_t)mem,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0) die("KVM_CREATE_VCPU");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(0, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED) die("mmap kvm_run");
	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	if (ring3)
		ring3_long_mode(mem, &sregs);
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
	struct kvm_regs regs = { .rip = CODE, .rflags = 2, .rsp = CODE };
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
	unsigned want = mmio ? KVM_EXIT_MMIO : KVM_EXIT_IO;
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (uint64_t i = 0; i < n; i++) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
		if (run->exit_reason != want) {
			fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
			return 1;
		}
	}
	clock_gettime(CLOCK_MONOTONIC, &b);
	int64_t ns = (int64_t)(b.tv_sec - a.tv_sec) * 1000000000 + (b.tv_nsec - a.tv_nsec);
	uint64_t us = (uint64_t)(ns / 1000);
	printf("RESULT floor frames=%lu bytes=0 us=%lu\n", n, us);
	return 0;
}
