/*
 * Skiff test guest: PVH entry (32-bit protected mode, paging off, %ebx = hvm_start_info),
 * switch to long mode with an identity map of the first 4 GiB, exception and timer stubs,
 * and the real-mode trampoline the application processors start in.
 */
#define PROGRESS_PORT 0x80

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

	.irp v, 0,1,2,3,4,5,6,7,9,16,18,19
	isr \v, 0
	.endr
	.irp v, 8,10,11,12,13,14,17
	isr \v, 1
	.endr
	isr 64, 0
	isr 65, 0
	isr 66, 0

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
gdt:
	.quad 0
	.quad 0x00af9b000000ffff	/* 0x08: 64-bit code */
	.quad 0x00cf93000000ffff	/* 0x10: data */
gdt_desc:
	.word gdt_desc - gdt - 1
	.long gdt

/* Identity map of 0-4 GiB in 2 MiB pages; the top GiB (MMIO) uncached. guest.c adds more
 * of the PDPT (map_device_memory) for the device memory above 4 GiB. */
	.balign 4096
	.globl pdpt
pml4:
	.quad pdpt + 3
	.fill 511, 8, 0
pdpt:
	.quad pd + 0x0003
	.quad pd + 0x1003
	.quad pd + 0x2003
	.quad pd + 0x3003
	.fill 508, 8, 0
pd:
	.set page, 0
	.rept 1536
	.quad (page << 21) | 0x83
	.set page, page + 1
	.endr
	.rept 512
	.quad (page << 21) | 0x9b
	.set page, page + 1
	.endr

	.section .bss
	.balign 16
	.globl stack_top
	.skip 16384
stack_top:
