/*
 * Skiff test guest: PVH entry (32-bit protected mode, paging off, %ebx = hvm_start_info),
 * switch to long mode with an identity map of the first 4 GiB, exception and timer stubs,
 * the way into ring 3 and back (ring3_call), and the real-mode trampoline the application
 * processors start in.
 */
#define PROGRESS_PORT 0x80
#define KERNEL_DS 0x10
#define USER_DS (0x18 | 3)
#define USER_CS (0x20 | 3)

/* PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18) holds the 32-bit entry point. */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4, 4, 18
	.asciz "Xen"
	.long pvh_start32

	.section .text.entry, "ax"
	.code32
	.globl pvh_start32
pvh_start32:
	cli
	movb $0x01, %al
	outb %al, $PROGRESS_PORT	/* first instruction reached */
	movl %ebx, %esi
	lgdt gdt_desc
	movl %cr4, %eax
	orl $0x20, %eax			/* PAE */
	andl $~0x300000, %eax		/* no SMEP/SMAP: ring 0 runs and reads the U pages too */
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $0xc0000080, %ecx		/* EFER.LME */
	rdmsr
	orl $0x100, %eax
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax		/* PG | PE */
	movl %eax, %cr0
	ljmp $0x08, $start64

	.code64
start64:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	leaq stack_top(%rip), %rsp
	movl %esi, %edi
	call guest_main
1:	cli
	hlt
	jmp 1b

/*
 * Entry through the Linux 64-bit boot protocol (an ELF without the PVH note): long mode with
 * the VMM's identity map, %rsi = boot_params. Switch to our own GDT and page tables.
 */
	.globl linux64_start
linux64_start:
	cli
	movb $0x01, %al
	outb %al, $PROGRESS_PORT
	movq %rsi, %r12
	lgdt gdt_desc
	movq %cr4, %rax
	andq $~0x300000, %rax		/* no SMEP/SMAP, as in pvh_start32 */
	movq %rax, %cr4
	movq $pml4, %rax
	movq %rax, %cr3
	leaq stack_top(%rip), %rsp
	pushq $0x08
	leaq 1f(%rip), %rax
	pushq %rax
	lretq
1:	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	movq %r12, %rdi
	call guest_main_linux
2:	cli
	hlt
	jmp 2b

/* Interrupt stubs: push the vector, save caller-saved registers, call the C handler. */
	.macro isr vec, has_error
	.globl isr_\vec
isr_\vec:
	.if \has_error == 0
	pushq $0
	.endif
	pushq $\vec
	jmp isr_common
	.endm

	.irp v, 0,1,2,3,4,5,7,9,16,18,19
	isr \v, 0
	.endr
	.irp v, 8,10,11,12,13,14,17
	isr \v, 1
	.endr
	isr 64, 0
	isr 65, 0
	isr 66, 0

/* #UD: at ring3_exit from ring 3 it is ring3_call's way back (see below); any other is a fault. */
	.globl isr_6
isr_6:
	cmpq $ring3_exit, (%rsp)	/* RIP */
	jne 1f
	testb $3, 8(%rsp)		/* CS: from ring 3? */
	jnz ring3_return
1:	pushq $0
	pushq $6
	jmp isr_common

isr_common:
	pushq %rax
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	movq 72(%rsp), %rdi		/* vector */
	movq 80(%rsp), %rsi		/* error code */
	movq 88(%rsp), %rdx		/* interrupted RIP */
	movq 96(%rsp), %rcx		/* interrupted CS: its low bits are the ring */
	call interrupt_handler
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rax
	addq $16, %rsp
	iretq

/*
 * uint64_t ring3_call(uint64_t (*fn)(uint64_t), uint64_t arg): runs fn(arg) in ring 3 on its
 * own stack with the caller's IF, and returns what fn returned. Ports: the TSS's I/O bitmap
 * allows them all. Interrupts and exceptions taken in ring 3 land on the kernel stack below
 * this frame (TSS RSP0). fn comes back through the ud2 at ring3_exit, which isr_6 recognises.
 * Not `int n` with a DPL-3 gate, nor syscall, nor IOPL 3 (cli, sti): KVM's PVM mode rejects
 * or reroutes those from ring 3, while #UD and the I/O bitmap work on it as on hardware.
 * Not reentrant: one vCPU, one ring-3 call at a time.
 */
	.text
	.globl ring3_call
ring3_call:
	pushfq
	pushq %rbx
	pushq %rbp
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, ring3_kernel_rsp(%rip)
	movq %rsp, tss+4(%rip)		/* TSS.RSP0 */
	pushq $USER_DS			/* SS */
	leaq ring3_stack_top(%rip), %rax
	pushq %rax			/* RSP */
	pushfq				/* RFLAGS: the caller's, IF included */
	pushq $USER_CS			/* CS */
	leaq ring3_entry(%rip), %rax
	pushq %rax			/* RIP */
	movq %rdi, %rax
	movq %rsi, %rdi
	iretq
ring3_entry:				/* CPL 3 */
	call *%rax
	.globl ring3_exit
ring3_exit:
	ud2				/* back to ring 0 through #UD; %rax holds the result */

	.globl ring3_return
ring3_return:				/* CPL 0, from isr_6; the exception frame is dropped */
	movq ring3_kernel_rsp(%rip), %rsp
	movw $KERNEL_DS, %cx
	movw %cx, %ds
	movw %cx, %es
	movw %cx, %ss
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %rbp
	popq %rbx
	popfq				/* the caller's IF again */
	ret

/*
 * Application processor trampoline, copied to 0x8000 (SIPI vector 0x08). Real mode, DS = 0:
 * the AP sets its initial APIC id (CPUID.1:EBX[31:24]) in the bitmap at 0x8800, counts
 * itself at 0x8880 and halts.
 */
	.code16
	.globl ap_trampoline, ap_trampoline_end
ap_trampoline:
	cli
	xorw %ax, %ax
	movw %ax, %ds
	movl $1, %eax
	cpuid
	shrl $24, %ebx
	lock btsl %ebx, 0x8800
	lock incl 0x8880
2:	hlt
	jmp 2b
ap_trampoline_end:

	.section .data
	.balign 16
	.globl gdt, tss
gdt:
	.quad 0
	.quad 0x00af9b000000ffff	/* 0x08: 64-bit code */
	.quad 0x00cf93000000ffff	/* 0x10: data */
	.quad 0x00cff3000000ffff	/* 0x18: ring-3 data (sysret's order: data, then code) */
	.quad 0x00affb000000ffff	/* 0x20: ring-3 64-bit code */
	.quad 0, 0			/* 0x28: the TSS, filled in by ring3_init (guest.c) */
gdt_desc:
	.word gdt_desc - gdt - 1
	.long gdt

/* 64-bit TSS: RSP0 (the stack for interrupts taken in ring 3) and an I/O permission bitmap
 * that lets ring 3 use every port (Intel SDM vol. 1, 19.5.2: a clear bit allows the port;
 * the byte after the bitmap must be all ones). */
	.balign 16
tss:
	.fill 25, 4, 0
	.word 0, 104
	.fill 8192, 1, 0		/* I/O permission bitmap: every port allowed */
	.byte 0xff

/* Identity map of 0-4 GiB in 2 MiB pages; the top GiB (MMIO) uncached. guest.c adds more
 * of the PDPT (map_device_memory) for the device memory above 4 GiB. Every level has the
 * U bit (ring 3 may touch all of it): the benchmark loops run in ring 3 over the same code,
 * data, virtio rings and device windows as ring 0, and a test guest has nothing to keep from
 * its own user mode; ring 3 here is for speed on PVM hosts, not for isolation. */
	.balign 4096
	.globl pdpt
pml4:
	.quad pdpt + 7
	.fill 511, 8, 0
pdpt:
	.quad pd + 0x0007
	.quad pd + 0x1007
	.quad pd + 0x2007
	.quad pd + 0x3007
	.fill 508, 8, 0
pd:
	.set page, 0
	.rept 1536
	.quad (page << 21) | 0x87
	.set page, page + 1
	.endr
	.rept 512
	.quad (page << 21) | 0x9f
	.set page, page + 1
	.endr

	.section .bss
	.balign 16
	.globl stack_top
	.skip 16384
stack_top:
	.globl ring3_kernel_rsp
ring3_kernel_rsp:
	.skip 8
	.balign 16
	.skip 65536
ring3_stack_top:
