/*
 * Skiff test guest: a freestanding PVH kernel that runs the checks named on its command line
 * and reports one PASS/FAIL line per check on COM1, then resets through the i8042 (and, for
 * VMMs without one, writes to QEMU's isa-debug-exit port 0xf4).
 *
 * Command line: checks=serial,e820,smp,timer,progress,blk,net,mmds,rng,vsock,balloon,pmem,mem,
 * snapshot mem=<MiB> cpus=<N>, and the parameters each check describes
 */
#include <stdint.h>
#include <stddef.h>
#include <stdarg.h>

#define COM1 0x3f8
#define PROGRESS_PORT 0x80
#define LAPIC_BASE 0xfee00000UL
#define AP_TRAMPOLINE 0x8000UL
#define AP_BITMAP 0x8800UL
#define AP_COUNT 0x8880UL
#define TIMER_VECTOR 64

struct hvm_start_info {
	uint32_t magic, version, flags, nr_modules;
	uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
	uint32_t memmap_entries, reserved;
};
struct hvm_memmap_entry { uint64_t addr, size; uint32_t type, reserved; };

static char cmdline[2048];
static struct hvm_memmap_entry memmap[128];
static uint32_t memmap_entries;
static int passed, failed;
static volatile uint64_t timer_ticks;
static volatile uint64_t device_irqs;
#define DEVICE_VECTOR 66

/* ---- port and MMIO access ---- */
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t mmio_read32(uintptr_t a) { return *(volatile uint32_t *)a; }
static inline void mmio_write32(uintptr_t a, uint32_t v) { *(volatile uint32_t *)a = v; }
static inline void progress(uint8_t code) { outb(PROGRESS_PORT, code); }

/* ---- serial console ---- */
static void serial_init(void)
{
	outb(COM1 + 1, 0x00);	/* no interrupts */
	outb(COM1 + 3, 0x80);	/* DLAB */
	outb(COM1 + 0, 0x01);	/* 115200 baud */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03);	/* 8N1 */
	outb(COM1 + 2, 0xc7);	/* FIFO on, cleared */
	outb(COM1 + 4, 0x03);	/* DTR, RTS */
}

static void putc(char c)
{
	if (c == '\n')
		putc('\r');
	for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++)
		;
	outb(COM1, (uint8_t)c);
}

static void puts(const char *s) { while (*s) putc(*s++); }

static void put_uint(uint64_t v, unsigned base, int width)
{
	char buf[24];
	int n = 0;
	do {
		buf[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	while (n < width)
		buf[n++] = '0';
	while (n)
		putc(buf[--n]);
}

/* printf with %s %c %d %u %x %lx %lu and a zero-padded width for %x. */
static void printf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			putc(*fmt);
			continue;
		}
		fmt++;
		int width = 0, is_long = 0;
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		if (*fmt == 'l') {
			is_long = 1;
			fmt++;
		}
		switch (*fmt) {
		case 's': puts(va_arg(ap, const char *)); break;
		case 'c': putc((char)va_arg(ap, int)); break;
		case 'd': {
			long v = is_long ? va_arg(ap, long) : va_arg(ap, int);
			if (v < 0) { putc('-'); v = -v; }
			put_uint((uint64_t)v, 10, width);
			break;
		}
		case 'u': put_uint(is_long ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10, width); break;
		case 'x': put_uint(is_long ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16, width); break;
		default: putc('%'); putc(*fmt); break;
		}
	}
	va_end(ap);
}

static void report(const char *check, int ok, const char *why)
{
	if (ok) {
		passed++;
		printf("PASS %s\n", check);
	} else {
		failed++;
		printf("FAIL %s: %s\n", check, why);
	}
}

/* ---- small string helpers ---- */
static size_t strlen(const char *s) { size_t n = 0; while (s[n]) n++; return n; }
static int starts_with(const char *s, const char *p) { while (*p) if (*s++ != *p++) return 0; return 1; }
void *memcpy(void *d, const void *s, size_t n) { uint8_t *dd = d; const uint8_t *ss = s; while (n--) *dd++ = *ss++; return d; }
void *memset(void *d, int c, size_t n) { uint8_t *dd = d; while (n--) *dd++ = (uint8_t)c; return d; }

/* Value of "key=" on the command line (up to the next space), or NULL. */
static const char *param(const char *key)
{
	size_t k = strlen(key);
	for (const char *p = cmdline; *p; p++) {
		if ((p == cmdline || p[-1] == ' ') && starts_with(p, key) && p[k] == '=')
			return p + k + 1;
	}
	return NULL;
}

static uint64_t param_uint_at(const char *v)
{
	uint64_t n = 0;
	while (*v >= '0' && *v <= '9')
		n = n * 10 + (uint64_t)(*v++ - '0');
	return n;
}

static uint64_t param_uint(const char *key, uint64_t dflt)
{
	const char *v = param(key);
	if (!v || *v < '0' || *v > '9')
		return dflt;
	return param_uint_at(v);
}

/* Whether `name` is in the comma-separated checks= list. */
static int wants(const char *name)
{
	const char *v = param("checks");
	size_t n = strlen(name);
	while (v && *v && *v != ' ') {
		if (starts_with(v, name) && (v[n] == ',' || v[n] == ' ' || v[n] == 0))
			return 1;
		while (*v && *v != ',' && *v != ' ')
			v++;
		if (*v == ',')
			v++;
	}
	return 0;
}

/* ---- interrupts ---- */
struct idt_entry { uint16_t off0, sel; uint8_t ist, type; uint16_t off1; uint32_t off2, zero; } __attribute__((packed));
static struct idt_entry idt[256] __attribute__((aligned(16)));

#define ISR(v) extern void isr_##v(void);
ISR(0) ISR(1) ISR(2) ISR(3) ISR(4) ISR(5) ISR(6) ISR(7) ISR(8) ISR(9) ISR(10) ISR(11) ISR(12)
ISR(13) ISR(14) ISR(16) ISR(17) ISR(18) ISR(19) ISR(64) ISR(65) ISR(66)

static void set_gate(int v, void (*fn)(void))
{
	uint64_t a = (uint64_t)fn;
	idt[v] = (struct idt_entry){ (uint16_t)a, 0x08, 0, 0x8e, (uint16_t)(a >> 16), (uint32_t)(a >> 32), 0 };
}

/* Ring 3 (entry.S: ring3_call): the TSS descriptor at GDT selector 0x28 (Intel SDM vol. 3,
 * 8.2.3: 16 bytes in long mode), loaded into TR for RSP0 and the I/O bitmap. */
#define TSS_SELECTOR 0x28
extern uint64_t gdt[];
extern uint8_t tss[];
uint64_t ring3_call(uint64_t (*fn)(uint64_t), uint64_t arg);

static void ring3_init(void)
{
	uint64_t base = (uint64_t)tss, limit = 104 + 8192;	/* the bitmap's last byte */
	gdt[TSS_SELECTOR / 8] = (limit & 0xffff) | (base & 0xffffff) << 16 | 0x89ull << 40 |
				(base >> 24 & 0xff) << 56;	/* present, 64-bit TSS (available) */
	gdt[TSS_SELECTOR / 8 + 1] = base >> 32;
	__asm__ volatile("ltr %w0" :: "r"(TSS_SELECTOR));
}

/* The ring the code runs in (CPL: the low bits of CS). */
static unsigned cpl(void)
{
	uint16_t cs;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	return cs & 3;
}

static void idt_init(void)
{
	void (*stubs[])(void) = { isr_0, isr_1, isr_2, isr_3, isr_4, isr_5, isr_6, isr_7, isr_8, isr_9,
				  isr_10, isr_11, isr_12, isr_13, isr_14, 0, isr_16, isr_17, isr_18, isr_19 };
	for (int i = 0; i < 20; i++)
		if (stubs[i])
			set_gate(i, stubs[i]);
	set_gate(64, isr_64);
	set_gate(65, isr_65);
	set_gate(66, isr_66);
	ring3_init();
	struct { uint16_t limit; uint64_t base; } __attribute__((packed)) d = { sizeof(idt) - 1, (uint64_t)idt };
	__asm__ volatile("lidt %0" :: "m"(d));
}

static void lapic_write(uint32_t reg, uint32_t v) { mmio_write32(LAPIC_BASE + reg, v); }
static uint32_t lapic_read(uint32_t reg) { return mmio_read32(LAPIC_BASE + reg); }

static void finish(void);

void interrupt_handler(uint64_t vector, uint64_t error, uint64_t rip, uint64_t cs)
{
	if (vector == TIMER_VECTOR) {
		timer_ticks++;
		lapic_write(0xb0, 0);	/* EOI */
		return;
	}
	if (vector >= 32) {
		if (vector == DEVICE_VECTOR)
			device_irqs++;
		lapic_write(0xb0, 0);
		return;
	}
	uint64_t cr2 = 0;
	if (vector == 14)
		__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	printf("FAIL exception: vector %lu error %lx at rip %lx in ring %lu", vector, error, rip, cs & 3);
	if (vector == 14)
		printf(" (address %lx)", cr2);
	puts("\n");
	failed++;
	finish();
}

/* Ring 3 at work: port I/O (serial), MMIO to the in-kernel LAPIC and to an address nothing
 * claims (the VMM reads all-ones), and a timer interrupt taken in ring 3 and returned to it.
 * Returns CPL | LAPIC version << 8, or ~0 when a read went wrong. */
static uint64_t ring3_work(uint64_t ticks_wanted)
{
	unsigned ring = cpl();
	printf("ring3: running in ring %u\n", ring);
	uint32_t version = lapic_read(0x30), hole = mmio_read32(0xc0000000UL);
	printf("ring3: lapic version %x, unclaimed mmio %x\n", version, hole);
	uint64_t t0 = timer_ticks, got = 0;	/* the caller has interrupts on */
	for (unsigned i = 0; i < 200000000 && (got = timer_ticks - t0) < ticks_wanted; i++)
		__asm__ volatile("pause");
	printf("ring3: timer interrupts taken in ring 3: %s, still in ring %u\n",
	       got >= ticks_wanted ? "enough" : "too few", cpl());
	if (hole != 0xffffffff || got < ticks_wanted || cpl() != 3)
		return ~0ull;
	return ring | (uint64_t)version << 8;
}

/* Faults on request in ring 3 (ring3_fault=pf: a read of unmapped memory; gp: hlt): the
 * exception handler must name the ring and end the guest. */
static uint64_t ring3_fault(uint64_t how)
{
	printf("ring3: faulting on purpose (%s)\n", how ? "hlt" : "unmapped read");
	if (how)
		__asm__ volatile("hlt");
	else
		(void)*(volatile uint64_t *)0x8000000000UL;	/* PML4 entry 1: not present */
	return 0;
}

static void check_ring3(void)
{
	const char *fault = param("ring3_fault");
	if (fault)
		ring3_call(ring3_fault, starts_with(fault, "gp"));
	lapic_write(0x3e0, 0xb);		/* divide by 1 */
	lapic_write(0x320, TIMER_VECTOR | 1u << 17);	/* periodic */
	lapic_write(0x380, 200000);
	__asm__ volatile("sti");
	uint64_t r = ring3_call(ring3_work, 3);
	__asm__ volatile("cli");
	lapic_write(0x320, 1u << 16);		/* masked */
	printf("ring3: back in ring %u, ring 3 returned %lx\n", cpl(), r);
	report("ring3", r != ~0ull && (r & 3) == 3 && (r >> 8 & 0xff) != 0 && cpl() == 0,
	       "ring 3 did not run, or its I/O or interrupts went wrong");
}

/* ---- checks ---- */

/* All RAM from 1 MiB up, plus the first MiB, adds up to the configured size. */
static void check_e820(void)
{
	uint64_t want = param_uint("mem", 0) << 20, high = 0, low = 0;
	for (uint32_t i = 0; i < memmap_entries; i++) {
		struct hvm_memmap_entry *e = &memmap[i];
		printf("e820: %16lx-%16lx type %u\n", e->addr, e->addr + e->size, e->type);
		if (e->type != 1)
			continue;
		if (e->addr >= 0x100000)
			high += e->size;
		else
			low += e->size;
	}
	if (!want)
		report("e820", 0, "no mem= on the command line");
	else if (high + 0x100000 != want || low < 0x80000)
		report("e820", 0, "RAM in the map does not match mem=");
	else
		report("e820", 1, 0);
}

static uint8_t checksum(const uint8_t *p, size_t n) { uint8_t s = 0; while (n--) s += *p++; return s; }

/* Finds the MP floating pointer in the EBDA or the BIOS ROM area. */
static const uint8_t *find_mp(void)
{
	uintptr_t ranges[][2] = { { 0x9fc00, 0xa0000 }, { 0xf0000, 0x100000 } };
	for (int r = 0; r < 2; r++)
		for (uintptr_t a = ranges[r][0]; a < ranges[r][1]; a += 16) {
			const uint8_t *p = (const uint8_t *)a;
			if (p[0] == '_' && p[1] == 'M' && p[2] == 'P' && p[3] == '_' && checksum(p, 16) == 0)
				return p;
		}
	return NULL;
}

static void spin(unsigned n) { for (volatile unsigned i = 0; i < n; i++) __asm__ volatile("pause"); }

/* Counts processors in the MP table, starts every AP with INIT/SIPI/SIPI and waits for each to
 * set its bit. */
static void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d);

static void check_smp(void)
{
	uint64_t want = param_uint("cpus", 1);
	{
		/* Threads per core in the topology the VMM gives: CPUID 0xb subleaf 0, the SMT level. */
		uint32_t a, b, c, d;
		cpuid(0xb, &a, &b, &c, &d);
		printf("smp: %u thread(s) per core\n", b & 0xffff);
	}
	const uint8_t *fp = find_mp();
	if (!fp) {
		report("smp", 0, "no MP floating pointer");
		return;
	}
	const uint8_t *table = (const uint8_t *)(uintptr_t)*(const uint32_t *)(fp + 4);
	uint16_t len = *(const uint16_t *)(table + 4), count = *(const uint16_t *)(table + 34);
	if (table[0] != 'P' || table[1] != 'C' || table[2] != 'M' || table[3] != 'P' || checksum(table, len)) {
		report("smp", 0, "bad MP configuration table");
		return;
	}
	uint8_t ids[256];
	int ncpu = 0;
	const uint8_t *e = table + 44;
	for (uint16_t i = 0; i < count && e < table + len; i++) {
		if (e[0] == 0) {
			if (e[3] & 1)
				ids[ncpu++] = e[1];
			e += 20;
		} else {
			e += 8;
		}
	}
	printf("smp: MP table lists %d processors\n", ncpu);
	if ((uint64_t)ncpu != want) {
		report("smp", 0, "processor count differs from cpus=");
		return;
	}
	extern char ap_trampoline[], ap_trampoline_end[];
	memcpy((void *)AP_TRAMPOLINE, ap_trampoline, (size_t)(ap_trampoline_end - ap_trampoline));
	memset((void *)AP_BITMAP, 0, 0x84);
	uint32_t self = lapic_read(0x20) >> 24;
	lapic_write(0xf0, 0x1ff);	/* software-enable the LAPIC */
	for (int i = 0; i < ncpu; i++) {
		if (ids[i] == self)
			continue;
		lapic_write(0x310, (uint32_t)ids[i] << 24);
		lapic_write(0x300, 0x4500);			/* INIT */
		spin(10000);
		for (int s = 0; s < 2; s++) {
			lapic_write(0x310, (uint32_t)ids[i] << 24);
			lapic_write(0x300, 0x4600 | (AP_TRAMPOLINE >> 12));	/* SIPI */
			spin(2000);
		}
	}
	volatile uint32_t *started = (volatile uint32_t *)AP_COUNT;
	for (unsigned i = 0; i < 200000000 && *started < (uint32_t)(ncpu - 1); i++)
		__asm__ volatile("pause");
	volatile uint8_t *bitmap = (volatile uint8_t *)AP_BITMAP;
	int up = 1;
	for (int i = 0; i < ncpu; i++) {
		if (ids[i] == self)
			continue;
		int ok = (bitmap[ids[i] / 8] >> (ids[i] % 8)) & 1;
		printf("smp: cpu %u %s\n", ids[i], ok ? "reported" : "did not report");
		up += ok;
	}
	printf("smp: %d of %d cpus up\n", up, ncpu);
	report("smp", up == ncpu, "not every AP started");
}

/* A one-shot LAPIC timer interrupt through the in-kernel irqchip. */
static void check_timer(void)
{
	lapic_write(0xf0, 0x1ff);
	lapic_write(0x3e0, 0xb);		/* divide by 1 */
	lapic_write(0x320, TIMER_VECTOR);	/* one-shot */
	lapic_write(0x380, 100000);
	__asm__ volatile("sti");
	for (unsigned i = 0; i < 100000000 && !timer_ticks; i++)
		__asm__ volatile("pause");
	__asm__ volatile("cli");
	report("timer", timer_ticks > 0, "no LAPIC timer interrupt");
}

/* Asks the host for a line and echoes it back. */
static void check_serial(void)
{
	char line[128];
	int n = 0;
	puts("serial: ready for input\n");
	for (unsigned polls = 0; polls < 20000000 && n < (int)sizeof(line) - 1; polls++) {
		if (!(inb(COM1 + 5) & 1))
			continue;
		char c = (char)inb(COM1);
		if (c == '\r' || c == '\n')
			break;
		line[n++] = c;
		polls = 0;
	}
	line[n] = 0;
	printf("serial: echo '%s'\n", line);
	report("serial", n > 0, "no input line from the host");
}

/* ---- virtio-mmio (virtio 1.2, 4.2.2) ---- */
#define VIRTIO_MAGIC 0x74726976
#define QSZ 128
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define IOAPIC_BASE 0xfec00000UL

struct virtq_desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct virtq_avail { uint16_t flags, idx, ring[QSZ], used_event; };
struct virtq_used_elem { uint32_t id, len; };
struct virtq_used { uint16_t flags, idx; struct virtq_used_elem ring[QSZ]; uint16_t avail_event; };

struct vq {
	struct virtq_desc desc[QSZ] __attribute__((aligned(16)));
	struct virtq_avail avail __attribute__((aligned(2)));
	struct virtq_used used __attribute__((aligned(4)));
	uint16_t last_used;
};

/* A virtio device on either transport. The checks speak the MMIO register layout (virtio 1.2,
 * 4.2.2) through vr/vw; on virtio-pci (4.1) each register maps to its common-configuration
 * field, the ISR, a queue's notification address or the device configuration. `base` + 0x100
 * is the device configuration on both. */
struct vdev {
	uintptr_t base;
	unsigned irq;	/* the IOAPIC pin (MMIO); PCI_NO_PIN on PCI, which uses MSI-X */
	struct vq q[5];	/* the balloon has up to five, vsock three */
	int pci;
	uintptr_t common, isr, notify;
	uint32_t notify_mult;
	uint16_t notify_off[5];	/* each queue's queue_notify_off, read once when it is enabled */
	uint16_t qsel;
	unsigned pci_dev;	/* its device number on bus 0 */
	uintptr_t msix_table;
};
#define PCI_NO_PIN 0xffffu
static inline uint8_t mmio_read8(uintptr_t a) { return *(volatile uint8_t *)a; }
static inline uint16_t mmio_read16(uintptr_t a) { return *(volatile uint16_t *)a; }
static inline void mmio_write8(uintptr_t a, uint8_t v) { *(volatile uint8_t *)a = v; }
static inline void mmio_write16(uintptr_t a, uint16_t v) { *(volatile uint16_t *)a = v; }

/* virtio-pci common configuration fields (virtio 1.2, 4.1.4.3). */
#define VPCI_DFSELECT 0x00
#define VPCI_DF 0x04
#define VPCI_GFSELECT 0x08
#define VPCI_GF 0x0c
#define VPCI_MSIX_CONFIG 0x10
#define VPCI_STATUS 0x14
#define VPCI_GENERATION 0x15
#define VPCI_Q_SELECT 0x16
#define VPCI_Q_SIZE 0x18
#define VPCI_Q_MSIX 0x1a
#define VPCI_Q_ENABLE 0x1c
#define VPCI_Q_NOTIFY_OFF 0x1e
#define VPCI_Q_DESC 0x20

static uint32_t vr(struct vdev *d, uint32_t off)
{
	if (!d->pci || off >= 0x100)
		return mmio_read32(d->base + off);
	switch (off) {
	case 0x10: return mmio_read32(d->common + VPCI_DF);
	case 0x34: return mmio_read16(d->common + VPCI_Q_SIZE);
	case 0x44: return mmio_read16(d->common + VPCI_Q_ENABLE);
	case 0x60: return mmio_read8(d->isr);	/* reading acknowledges (4.1.4.5) */
	case 0x70: return mmio_read8(d->common + VPCI_STATUS);
	case 0xfc: return mmio_read8(d->common + VPCI_GENERATION);
	default: return 0;
	}
}

static void vw(struct vdev *d, uint32_t off, uint32_t v)
{
	if (!d->pci || off >= 0x100) {
		mmio_write32(d->base + off, v);
		return;
	}
	switch (off) {
	case 0x14: mmio_write32(d->common + VPCI_DFSELECT, v); break;
	case 0x20: mmio_write32(d->common + VPCI_GF, v); break;
	case 0x24: mmio_write32(d->common + VPCI_GFSELECT, v); break;
	case 0x30: d->qsel = (uint16_t)v; mmio_write16(d->common + VPCI_Q_SELECT, (uint16_t)v); break;
	case 0x38: mmio_write16(d->common + VPCI_Q_SIZE, (uint16_t)v); break;
	case 0x44:
		/* MSI-X vector 0 for configuration changes, 1 + n for queue n. */
		mmio_write16(d->common + VPCI_MSIX_CONFIG, 0);
		mmio_write16(d->common + VPCI_Q_MSIX, (uint16_t)(d->qsel + 1));
		mmio_write16(d->common + VPCI_Q_ENABLE, (uint16_t)v);
		/* As a driver does, keep the queue's notification offset: a notification is then
		 * one write (an ioeventfd), not three more trips through the common configuration. */
		if (d->qsel < 5)
			d->notify_off[d->qsel] = mmio_read16(d->common + VPCI_Q_NOTIFY_OFF);
		break;
	case 0x50: {
		/* The notification address of queue v (its queue_notify_off times the multiplier). */
		uint16_t noff;
		if (v < 5) {
			noff = d->notify_off[v];
		} else {
			mmio_write16(d->common + VPCI_Q_SELECT, (uint16_t)v);
			noff = mmio_read16(d->common + VPCI_Q_NOTIFY_OFF);
			mmio_write16(d->common + VPCI_Q_SELECT, d->qsel);
		}
		mmio_write16(d->notify + (uintptr_t)noff * d->notify_mult, (uint16_t)v);
		break;
	}
	case 0x64: break;	/* the ISR read acknowledged it */
	case 0x70: mmio_write8(d->common + VPCI_STATUS, (uint8_t)v); break;
	case 0x80: case 0x84: case 0x90: case 0x94: case 0xa0: case 0xa4:
		mmio_write32(d->common + VPCI_Q_DESC + ((off - 0x80) >> 4) * 8 + (off & 4), v);
		break;
	default: break;
	}
}

static uint64_t parse_hex(const char **p)
{
	uint64_t v = 0;
	if ((*p)[0] == '0' && (*p)[1] == 'x')
		*p += 2;
	for (;; (*p)++) {
		char c = **p;
		if (c >= '0' && c <= '9') v = v * 16 + (uint64_t)(c - '0');
		else if (c >= 'a' && c <= 'f') v = v * 16 + (uint64_t)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F') v = v * 16 + (uint64_t)(c - 'A' + 10);
		else return v;
	}
}

/* ---- virtio-pci: bus 0 through ECAM (Skiff's --enable-pci) ---- */
#define PCI_ECAM_BASE 0xe0000000UL
static uintptr_t ecam(unsigned dev, unsigned reg) { return PCI_ECAM_BASE + ((uintptr_t)dev << 15) + reg; }

/* Finds the first virtio-pci function of device type `id` on bus 0 (vendor 0x1af4, device
 * 0x1040 + id), walks its capabilities for the common configuration, ISR, notification and
 * device configuration structures in its BAR, and points every MSI-X vector at this CPU's
 * LAPIC with DEVICE_VECTOR. On an MMIO-only VM nothing answers at ECAM (all-ones). */
static int find_virtio_pci(uint32_t id, struct vdev *d)
{
	for (unsigned dev = 0; dev < 32; dev++) {
		if (mmio_read32(ecam(dev, 0)) != (0x1af4u | ((0x1040u + id) << 16)))
			continue;
		mmio_write16(ecam(dev, 4), 0x6);	/* memory decoding, bus master */
		uint64_t bar = (mmio_read32(ecam(dev, 0x10)) & ~0xfu) | (uint64_t)mmio_read32(ecam(dev, 0x14)) << 32;
		uintptr_t devcfg = 0, table = 0;
		unsigned msix = 0;
		d->common = d->isr = d->notify = 0;
		for (unsigned at = mmio_read8(ecam(dev, 0x34)); at; at = mmio_read8(ecam(dev, at + 1))) {
			uint8_t cap = mmio_read8(ecam(dev, at));
			if (cap == 0x11) {
				msix = at;
				table = (uintptr_t)bar + (mmio_read32(ecam(dev, at + 4)) & ~7u);
				continue;
			}
			if (cap != 0x09 || mmio_read8(ecam(dev, at + 4)) != 0)
				continue;
			uintptr_t where = (uintptr_t)bar + mmio_read32(ecam(dev, at + 8));
			switch (mmio_read8(ecam(dev, at + 3))) {
			case 1: d->common = where; break;
			case 2: d->notify = where; d->notify_mult = mmio_read32(ecam(dev, at + 16)); break;
			case 3: d->isr = where; break;
			case 4: devcfg = where; break;
			}
		}
		if (!d->common || !d->isr || !d->notify || !devcfg || !msix)
			continue;
		unsigned vectors = (mmio_read16(ecam(dev, msix + 2)) & 0x7ff) + 1;
		uint32_t self = lapic_read(0x20) >> 24;
		for (unsigned v = 0; v < vectors; v++) {
			uintptr_t e = table + 16 * v;
			mmio_write32(e, 0xfee00000u | (self << 12));
			mmio_write32(e + 4, 0);
			mmio_write32(e + 8, DEVICE_VECTOR);	/* fixed, edge */
			mmio_write32(e + 12, 0);		/* unmasked */
		}
		mmio_write16(ecam(dev, msix + 2), 0x8000);	/* MSI-X enable */
		d->pci = 1;
		d->pci_dev = dev;
		d->msix_table = table;
		d->base = devcfg - 0x100;
		d->irq = PCI_NO_PIN;
		d->qsel = 0;
		return 1;
	}
	return 0;
}

/* Finds the n-th virtio_mmio.device=<size>@<base>:<irq> entry whose device has `id`, else a
 * virtio-pci function of that type. */
static int find_virtio(uint32_t id, struct vdev *d)
{
	for (const char *p = cmdline; *p; p++) {
		if ((p != cmdline && p[-1] != ' ') || !starts_with(p, "virtio_mmio.device="))
			continue;
		const char *q = p + 19;
		while (*q && *q != '@') q++;
		if (*q != '@') continue;
		q++;
		uintptr_t base = parse_hex(&q);
		if (*q != ':') continue;
		q++;
		unsigned irq = (unsigned)param_uint_at(q);
		if (mmio_read32(base) == VIRTIO_MAGIC && mmio_read32(base + 4) == 2 && mmio_read32(base + 8) == id) {
			d->base = base;
			d->irq = irq;
			d->pci = 0;
			return 1;
		}
	}
	return find_virtio_pci(id, d);
}

static void ioapic_route(unsigned pin, uint8_t vector)
{
	if (pin == PCI_NO_PIN)
		return;	/* virtio-pci: MSI-X, programmed by find_virtio_pci */
	uint32_t self = lapic_read(0x20) >> 24;
	mmio_write32(IOAPIC_BASE, 0x11 + 2 * pin);
	mmio_write32(IOAPIC_BASE + 0x10, self << 24);
	mmio_write32(IOAPIC_BASE, 0x10 + 2 * pin);
	mmio_write32(IOAPIC_BASE + 0x10, vector);	/* fixed, physical, edge, active high, unmasked */
}

/* Driver initialisation (virtio 1.2, 3.1.1) with `nq` queues of QSZ entries. */
static const char *virtio_init(struct vdev *d, uint32_t want_features_lo, unsigned nq)
{
	vw(d, 0x70, 0);
	vw(d, 0x70, 1);
	vw(d, 0x70, 1 | 2);
	vw(d, 0x14, 1);
	if (!(vr(d, 0x10) & 1))
		return "device lacks VIRTIO_F_VERSION_1";
	vw(d, 0x14, 0);
	uint32_t lo = vr(d, 0x10) & want_features_lo;
	vw(d, 0x24, 0);
	vw(d, 0x20, lo);
	vw(d, 0x24, 1);
	vw(d, 0x20, 1);
	vw(d, 0x70, 1 | 2 | 8);
	if (!(vr(d, 0x70) & 8))
		return "FEATURES_OK not accepted";
	for (unsigned i = 0; i < nq; i++) {
		struct vq *q = &d->q[i];
		vw(d, 0x30, i);
		if (vr(d, 0x34) < QSZ)
			return "queue too small";
		vw(d, 0x38, QSZ);
		uint64_t a;
		a = (uint64_t)q->desc; vw(d, 0x80, (uint32_t)a); vw(d, 0x84, (uint32_t)(a >> 32));
		a = (uint64_t)&q->avail; vw(d, 0x90, (uint32_t)a); vw(d, 0x94, (uint32_t)(a >> 32));
		a = (uint64_t)&q->used; vw(d, 0xa0, (uint32_t)a); vw(d, 0xa4, (uint32_t)(a >> 32));
		vw(d, 0x44, 1);
	}
	vw(d, 0x70, 1 | 2 | 8 | 4);
	if (vr(d, 0x70) & 0x40)
		return "device needs reset after DRIVER_OK";
	return 0;
}

/* Makes the chain starting at descriptor `head` of queue `qi` available; notifies if asked. */
static void vq_publish(struct vdev *d, unsigned qi, uint16_t head, int notify)
{
	struct vq *q = &d->q[qi];
	q->avail.ring[q->avail.idx % QSZ] = head;
	__asm__ volatile("mfence" ::: "memory");
	q->avail.idx++;
	__asm__ volatile("mfence" ::: "memory");
	if (notify)
		vw(d, 0x50, qi);
}

/* Takes the next used element of queue `qi`, if there is one. */
static int vq_used(struct vdev *d, unsigned qi, uint32_t *id, uint32_t *len)
{
	struct vq *q = &d->q[qi];
	if (*(volatile uint16_t *)&q->used.idx == q->last_used)
		return 0;
	__asm__ volatile("mfence" ::: "memory");
	*id = q->used.ring[q->last_used % QSZ].id;
	*len = q->used.ring[q->last_used % QSZ].len;
	q->last_used++;
	return 1;
}

/* Publishes the chain at descriptor 0 of queue 0, notifies, and polls for the used element. */
static int virtq_submit(struct vdev *d, uint32_t *len)
{
	uint32_t id;
	vq_publish(d, 0, 0, 1);
	for (unsigned i = 0; i < 100000000; i++) {
		if (vq_used(d, 0, &id, len)) {
			uint32_t isr = vr(d, 0x60);
			vw(d, 0x64, isr);
			return 1;
		}
		__asm__ volatile("pause");
	}
	return 0;
}

/* ---- virtio-rng (virtio 1.2, 5.4) ---- */
static uint64_t now_us(void);
static struct vdev rngdev;
static uint8_t rng_buf[2][4096];

/* Two 4 KiB requests (the second as two descriptors of 3 KiB and 1 KiB) must come back full,
 * with bytes that differ between them and are not all zero; a request with a device-readable
 * buffer comes back empty. Parameter rng_ios= repeats the first request (for rate limits). */
static void check_rng(void)
{
	const char *why;
	uint32_t len;
	if (!find_virtio(4, &rngdev)) { report("rng", 0, "no virtio-rng device on the command line"); return; }
	if ((why = virtio_init(&rngdev, 0, 1))) { report("rng", 0, why); return; }
	rngdev.q[0].desc[0] = (struct virtq_desc){ (uint64_t)rng_buf[0], 4096, VRING_DESC_F_WRITE, 0 };
	if (!virtq_submit(&rngdev, &len) || len != 4096) { report("rng", 0, "the first request was not filled"); return; }
	rngdev.q[0].desc[0] = (struct virtq_desc){ (uint64_t)rng_buf[1], 3072, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1 };
	rngdev.q[0].desc[1] = (struct virtq_desc){ (uint64_t)rng_buf[1] + 3072, 1024, VRING_DESC_F_WRITE, 0 };
	if (!virtq_submit(&rngdev, &len) || len != 4096) { report("rng", 0, "the two-buffer request was not filled"); return; }
	unsigned same = 0, zero = 0;
	for (unsigned i = 0; i < 4096; i++) {
		same += rng_buf[0][i] == rng_buf[1][i];
		zero += rng_buf[1][i] == 0;
	}
	if (same > 64 || zero > 64) { report("rng", 0, "the bytes do not look random"); return; }
	rngdev.q[0].desc[0] = (struct virtq_desc){ (uint64_t)rng_buf[0], 16, 0, 0 };
	if (!virtq_submit(&rngdev, &len) || len != 0) { report("rng", 0, "a device-readable buffer was filled"); return; }
	uint64_t n = param_uint("rng_ios", 0);
	if (n) {
		uint64_t t0 = now_us();
		for (uint64_t i = 0; i < n; i++) {
			rngdev.q[0].desc[0] = (struct virtq_desc){ (uint64_t)rng_buf[0], 4096, VRING_DESC_F_WRITE, 0 };
			if (!virtq_submit(&rngdev, &len) || len != 4096) { report("rng", 0, "a repeated request failed"); return; }
		}
		printf("rng: %lu requests of 4096 bytes in %lu us\n", n, now_us() - t0);
	}
	report("rng", 1, 0);
}

/* ---- virtio-balloon (virtio 1.2, 5.5) ---- */
#define BALLOON_F_STATS_VQ 1
#define BALLOON_F_DEFLATE_ON_OOM 2
#define BALLOON_F_FREE_PAGE_HINT 3
#define BALLOON_F_PAGE_REPORTING 5
#define BALLOON_PFNS 256		/* frame numbers per inflate or deflate chain, as Linux */
#define BALLOON_HINT_STOP 0
#define BALLOON_HINT_DONE 1
struct balloon_stat { uint16_t tag; uint64_t val; } __attribute__((packed));
static struct vdev balloondev;
static uint32_t balloon_pfns[BALLOON_PFNS];
static struct balloon_stat balloon_stats[4];
static uint32_t balloon_cmd[2];	/* the hinting run's id, then STOP */

/* Waits until `n` more chains of queue `qi` have been used. */
static int vq_wait_used(struct vdev *d, unsigned qi, unsigned n)
{
	uint32_t id, len;
	for (unsigned i = 0; n && i < 200000000; i++) {
		if (vq_used(d, qi, &id, &len))
			n--;
		else
			__asm__ volatile("pause");
	}
	return n == 0;
}

/* Posts `n` frame numbers from balloon_pfns on queue `qi` (inflate 0, deflate 1) and waits. */
static int balloon_send_pfns(unsigned qi, unsigned n)
{
	balloondev.q[qi].desc[0] = (struct virtq_desc){ (uint64_t)balloon_pfns, n * 4, 0, 0 };
	vq_publish(&balloondev, qi, 0, 1);
	return vq_wait_used(&balloondev, qi, 1);
}

/* Pages that do not read back as zeros at offsets 0 and 2048 (a discarded page reads zeros). */
static uint64_t nonzero_pages(uint64_t addr, uint64_t pages)
{
	uint64_t n = 0;
	for (uint64_t p = 0; p < pages; p++) {
		volatile uint64_t *w = (volatile uint64_t *)(addr + p * 4096);
		n += w[0] != 0 || w[256] != 0;
	}
	return n;
}

static void balloon_fill_stats(uint64_t answers, uint64_t top, uint64_t actual)
{
	balloon_stats[0] = (struct balloon_stat){ 2, 7 };			/* major_faults */
	balloon_stats[1] = (struct balloon_stat){ 3, answers };			/* minor_faults: buffers sent */
	balloon_stats[2] = (struct balloon_stat){ 4, top - actual * 4096 };	/* free_memory */
	balloon_stats[3] = (struct balloon_stat){ 5, top };			/* total_memory */
}

/* A balloon driver. It owns balloon_area_mib (default 128, up to the end of RAM) of RAM from
 * balloon_area (MiB, default 64) and first writes balloon_touch_mib (default 32) of it, then
 * balloon_report_mib and balloon_hint_mib (default 0) after that, each page's first word and
 * its word at 2048 ("balloon: touched N MiB"). It inflates the pages of its area from the start
 * up, in chains of 256 frame numbers, towards num_pages and deflates from the top down, writing
 * `actual` after each chain ("balloon: at target N pages" when there); a deflated page must read
 * zeros ("balloon: deflated N pages, M not zero"). It looks at num_pages at start and after each
 * configuration interrupt. With statistics it posts its buffer (major_faults 7, minor_faults the
 * buffers sent so far, free_memory, total_memory the top of RAM) and sends it again whenever the
 * device hands it back. With reporting it reports balloon_report_mib as free, in 1 MiB ranges,
 * which must then read zeros; with hinting, a new run's id makes it send the id, its hint range
 * in 1 MiB ranges and STOP, and the host's DONE ends the run (the range must read zeros). It
 * runs until a key reaches the i8042 (the host's Ctrl-Alt-Del) or ticks_max (default 1200) 50 ms
 * ticks, and passes when nothing read back wrong. */
static void check_balloon(void)
{
	const char *why, *problem = 0;
	uint64_t top = 0;
	for (uint32_t i = 0; i < memmap_entries; i++)
		if (memmap[i].type == 1 && memmap[i].addr + memmap[i].size > top)
			top = memmap[i].addr + memmap[i].size;
	if (!find_virtio(5, &balloondev)) { report("balloon", 0, "no virtio-balloon device on the command line"); return; }
	uint64_t area = param_uint("balloon_area", 64) << 20;
	uint64_t area_mib = param_uint("balloon_area_mib", 128);
	if (area >= top) { report("balloon", 0, "balloon_area is beyond the end of RAM"); return; }
	if (area + (area_mib << 20) > top)
		area_mib = (top - area) >> 20;
	uint64_t touch = param_uint("balloon_touch_mib", 32), rep_mib = param_uint("balloon_report_mib", 0);
	uint64_t hint_mib = param_uint("balloon_hint_mib", 0), max = param_uint("ticks_max", 1200);
	if (touch + rep_mib + hint_mib > area_mib) { report("balloon", 0, "the regions do not fit the area"); return; }

	vw(&balloondev, 0x14, 0);
	uint32_t want = 1u << BALLOON_F_STATS_VQ | 1u << BALLOON_F_DEFLATE_ON_OOM | 1u << BALLOON_F_FREE_PAGE_HINT | 1u << BALLOON_F_PAGE_REPORTING;
	uint32_t features = vr(&balloondev, 0x10) & want;
	int stats = !!(features & 1u << BALLOON_F_STATS_VQ), hint = !!(features & 1u << BALLOON_F_FREE_PAGE_HINT);
	int reporting = !!(features & 1u << BALLOON_F_PAGE_REPORTING);
	unsigned stats_q = 2, hint_q = 2 + stats, report_q = 2 + stats + hint;
	if ((why = virtio_init(&balloondev, features, 2 + stats + hint + reporting))) { report("balloon", 0, why); return; }
	ioapic_route(balloondev.irq, DEVICE_VECTOR);
	printf("balloon: ready, features %x, area %lu MiB at %lu MiB\n", features, area_mib, area >> 20);

	uint64_t base_pfn = area >> 12, area_pages = area_mib << 8;
	uint64_t rep_at = area + (touch << 20), hint_at = rep_at + (rep_mib << 20);
	for (uint64_t p = 0; p < (touch + rep_mib + hint_mib) << 8; p++) {
		volatile uint64_t *w = (volatile uint64_t *)(area + p * 4096);
		w[0] = 0x5a5a000000000000ull | (base_pfn + p);
		w[256] = ~w[0];
	}
	printf("balloon: touched %lu MiB\n", touch + rep_mib + hint_mib);

	uint64_t answers = 0, actual = 0, configs = 0, irqs_before = device_irqs;
	if (stats) {
		balloon_fill_stats(++answers, top, 0);
		balloondev.q[stats_q].desc[0] = (struct virtq_desc){ (uint64_t)balloon_stats, sizeof(balloon_stats), 0, 0 };
		vq_publish(&balloondev, stats_q, 0, 1);
	}
	if (reporting && rep_mib) {
		struct vq *q = &balloondev.q[report_q];
		for (uint64_t i = 0; i < rep_mib && i < QSZ; i++)
			q->desc[i] = (struct virtq_desc){ rep_at + (i << 20), 1u << 20, VRING_DESC_F_WRITE | (i + 1 < rep_mib ? VRING_DESC_F_NEXT : 0), (uint16_t)(i + 1) };
		vq_publish(&balloondev, report_q, 0, 1);
		if (!vq_wait_used(&balloondev, report_q, 1))
			problem = "the reported ranges were not used";
		uint64_t bad = nonzero_pages(rep_at, rep_mib << 8);
		printf("balloon: reported %lu MiB free, %lu pages not zero\n", rep_mib, bad);
		if (bad)
			problem = problem ? problem : "reported pages did not read zero";
	}

	lapic_write(0x3e0, 0xb);			/* divide by 1 */
	lapic_write(0x320, TIMER_VECTOR | (1u << 17));	/* periodic */
	lapic_write(0x380, 1000000);
	__asm__ volatile("sti");
	uint64_t tick = 0, next = now_us(), last_cmd = BALLOON_HINT_STOP, hinted_run = 0;
	int look = 1, key = -1;
	while (tick < max) {
		if (inb(0x64) & 1) {
			key = inb(0x60);
			break;
		}
		uint32_t isr = vr(&balloondev, 0x60);
		if (isr) {
			vw(&balloondev, 0x64, isr);
			if (isr & 2) {
				configs++;
				look = 1;
			}
		}
		uint32_t id, len;
		if (stats && vq_used(&balloondev, stats_q, &id, &len)) {
			balloon_fill_stats(++answers, top, actual);
			vq_publish(&balloondev, stats_q, 0, 1);
		}
		if (look) {
			look = 0;
			uint64_t target = vr(&balloondev, 0x100), cmd = vr(&balloondev, 0x108);
			if (configs)
				printf("balloon: configuration change %lu (%lu device interrupts): target %lu pages, hint command %lu\n",
				       configs, device_irqs - irqs_before, target, cmd);
			if (target > area_pages) {
				printf("balloon: target %lu pages beyond the area's %lu\n", target, area_pages);
				target = area_pages;
			}
			uint64_t was = actual;
			while (actual < target) {
				unsigned n = target - actual < BALLOON_PFNS ? (unsigned)(target - actual) : BALLOON_PFNS;
				for (unsigned i = 0; i < n; i++)
					balloon_pfns[i] = (uint32_t)(base_pfn + actual + i);
				if (!balloon_send_pfns(0, n)) { problem = "an inflate chain was not used"; break; }
				actual += n;
				vw(&balloondev, 0x104, (uint32_t)actual);
			}
			while (actual > target) {
				unsigned n = actual - target < BALLOON_PFNS ? (unsigned)(actual - target) : BALLOON_PFNS;
				for (unsigned i = 0; i < n; i++)
					balloon_pfns[i] = (uint32_t)(base_pfn + actual - n + i);
				if (!balloon_send_pfns(1, n)) { problem = "a deflate chain was not used"; break; }
				actual -= n;
				vw(&balloondev, 0x104, (uint32_t)actual);
			}
			if (actual < was) {
				uint64_t bad = nonzero_pages(area + actual * 4096, was - actual);
				printf("balloon: deflated %lu pages, %lu not zero\n", was - actual, bad);
				if (bad)
					problem = problem ? problem : "deflated pages did not read zero";
			}
			if (actual != was || configs == 0)
				printf("balloon: at target %lu pages\n", actual);
			if (hint && cmd >= 2 && cmd != last_cmd) {
				/* A new run: its id, the hint range in 1 MiB pieces, then STOP. */
				struct vq *q = &balloondev.q[hint_q];
				unsigned n = 0;
				balloon_cmd[0] = (uint32_t)cmd;
				balloon_cmd[1] = BALLOON_HINT_STOP;
				q->desc[n] = (struct virtq_desc){ (uint64_t)&balloon_cmd[0], 4, 0, 0 };
				vq_publish(&balloondev, hint_q, (uint16_t)n++, 0);
				for (uint64_t i = 0; i < hint_mib && n < QSZ - 1; i++) {
					q->desc[n] = (struct virtq_desc){ hint_at + (i << 20), 1u << 20, VRING_DESC_F_WRITE, 0 };
					vq_publish(&balloondev, hint_q, (uint16_t)n++, 0);
				}
				q->desc[n] = (struct virtq_desc){ (uint64_t)&balloon_cmd[1], 4, 0, 0 };
				vq_publish(&balloondev, hint_q, (uint16_t)n++, 1);
				if (!vq_wait_used(&balloondev, hint_q, n))
					problem = problem ? problem : "the hinting chains were not used";
				printf("balloon: hinting run %lu sent %lu MiB\n", cmd, hint_mib);
				hinted_run = cmd;
			}
			if (cmd == BALLOON_HINT_DONE && hinted_run) {
				uint64_t bad = nonzero_pages(hint_at, hint_mib << 8);
				printf("balloon: hinting run %lu done, %lu pages not zero\n", hinted_run, bad);
				if (bad)
					problem = problem ? problem : "hinted pages did not read zero";
				hinted_run = 0;
			}
			last_cmd = cmd;
		}
		uint64_t now = now_us();
		if (now >= next) {
			tick++;
			next = now + 50000;
		}
		__asm__ volatile("hlt");
	}
	__asm__ volatile("cli");
	lapic_write(0x320, 1u << 16);	/* timer masked */
	printf("balloon: %s, actual %lu pages, %lu statistics buffers sent\n", key >= 0 ? "key from the host" : "ticks done", actual, answers);
	report("balloon", !problem, problem);
}

/* ---- device memory above 4 GiB (virtio-pmem, virtio-mem) ---- */
#define HIGH_MAP_GIB 64
extern uint64_t pdpt[512];
static uint64_t high_pd[HIGH_MAP_GIB - 4][512] __attribute__((aligned(4096)));

/* Extends the boot identity map (0-4 GiB) to HIGH_MAP_GIB GiB with 2 MiB write-back pages,
 * where the VMM puts device memory. Touching an address nothing backs exits to the VMM. */
static void map_device_memory(void)
{
	static int done;
	if (done++)
		return;
	for (uint64_t g = 4; g < HIGH_MAP_GIB; g++) {
		for (uint64_t i = 0; i < 512; i++)
			high_pd[g - 4][i] = ((g << 30) + (i << 21)) | 0x87;	/* U, as entry.S's map */
		pdpt[g] = (uint64_t)high_pd[g - 4] | 7;
	}
	uint64_t cr3;
	__asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) :: "memory");
}

/* ---- virtio-pmem (virtio 1.2, 5.19) ---- */
#define VIRTIO_ID_PMEM 27
#define PMEM_HOST_TEXT "SKIFF-PMEM-HOST\n"
#define PMEM_GUEST_TEXT "SKIFF-PMEM-GUEST"
#define PMEM_PATTERN_OFFSET 0x100000UL
#define PMEM_PATTERN_BYTES 4096
static struct vdev pmemdev;
static volatile uint32_t pmem_req, pmem_resp;

/* The region the device's configuration space gives (virtio_pmem_config: start, size). */
static void pmem_region(struct vdev *d, uint64_t *start, uint64_t *size)
{
	*start = vr(d, 0x100) | (uint64_t)vr(d, 0x104) << 32;
	*size = vr(d, 0x108) | (uint64_t)vr(d, 0x10c) << 32;
}

/* One request of type `type` on the device's queue; returns the status, or 1 when the device
 * did not answer with a 4-byte status. */
static int32_t pmem_request(uint32_t type)
{
	uint32_t len = 0;
	pmem_req = type;
	pmem_resp = 0x5a5a5a5a;
	pmemdev.q[0].desc[0] = (struct virtq_desc){ (uint64_t)&pmem_req, 4, VRING_DESC_F_NEXT, 1 };
	pmemdev.q[0].desc[1] = (struct virtq_desc){ (uint64_t)&pmem_resp, 4, VRING_DESC_F_WRITE, 0 };
	if (!virtq_submit(&pmemdev, &len) || len != 4)
		return 1;
	return (int32_t)pmem_resp;
}

/* The byte the guest writes at offset i of its pattern (the host test computes the same). */
static uint8_t pmem_pattern(uint64_t i) { return (uint8_t)(i * 13 + 5); }

/* Reads the first pmem device's region from its configuration space (above 4 GiB, 2 MiB
 * aligned), checks that the file starts with the host's text, writes PMEM_GUEST_TEXT and a
 * pattern at offset 1 MiB and reads it back, then FLUSHes (status 0; an unknown request type
 * gets -1). With pmem_ro=1 the device maps the file read-only: the writes must leave it as
 * it was. */
static void check_pmem(void)
{
	const char *why;
	uint64_t start, size;
	int ro = (int)param_uint("pmem_ro", 0);
	if (!find_virtio(VIRTIO_ID_PMEM, &pmemdev)) { report("pmem", 0, "no virtio-pmem device on the command line"); return; }
	if ((why = virtio_init(&pmemdev, 0, 1))) { report("pmem", 0, why); return; }
	pmem_region(&pmemdev, &start, &size);
	printf("pmem: region %lx size %lx\n", start, size);
	if (start < 0x100000000UL || (start | size) & 0x1fffff || !size) { report("pmem", 0, "the region is not 2 MiB-aligned above 4 GiB"); return; }
	if (start + size > (uint64_t)HIGH_MAP_GIB << 30) { report("pmem", 0, "the region is beyond what this guest maps"); return; }
	map_device_memory();
	volatile uint8_t *mem = (volatile uint8_t *)start;
	const char *host = PMEM_HOST_TEXT;
	for (size_t i = 0; host[i]; i++)
		if (mem[i] != (uint8_t)host[i]) { report("pmem", 0, "the region does not start with the host's text"); return; }
	if (size <= PMEM_PATTERN_OFFSET + PMEM_PATTERN_BYTES) { report("pmem", 0, "the region is too small for the pattern"); return; }
	volatile uint8_t *at = mem + PMEM_PATTERN_OFFSET;
	uint8_t before[PMEM_PATTERN_BYTES];
	for (size_t i = 0; i < PMEM_PATTERN_BYTES; i++)
		before[i] = at[i];
	const char *text = PMEM_GUEST_TEXT;
	for (size_t i = 0; i < PMEM_PATTERN_BYTES; i++)
		at[i] = i < strlen(text) ? (uint8_t)text[i] : pmem_pattern(i);
	size_t differ = 0;
	for (size_t i = 0; i < PMEM_PATTERN_BYTES; i++) {
		uint8_t want = ro ? before[i] : i < strlen(text) ? (uint8_t)text[i] : pmem_pattern(i);
		differ += at[i] != want;
	}
	printf("pmem: pattern written at +%lx, %lu bytes differ from the expected %s\n", PMEM_PATTERN_OFFSET, (uint64_t)differ, ro ? "(unchanged) file" : "pattern");
	if (differ) { report("pmem", 0, ro ? "a read-only region changed" : "the pattern did not read back"); return; }
	int32_t status = pmem_request(0);
	printf("pmem: flush status %d\n", status);
	if (status != 0) { report("pmem", 0, "the flush did not succeed"); return; }
	if (pmem_request(7) != -1) { report("pmem", 0, "an unknown request did not get -1"); return; }
	report("pmem", 1, 0);
}

/* ---- virtio-mem (virtio 1.2, 5.15) ---- */
#define VIRTIO_ID_MEM 24
#define VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE 1
enum { MEM_PLUG, MEM_UNPLUG, MEM_UNPLUG_ALL, MEM_STATE };
enum { MEM_ACK, MEM_NACK, MEM_BUSY, MEM_ERROR, MEM_NO_ANSWER = 0xffff };
enum { MEM_PLUGGED, MEM_UNPLUGGED, MEM_MIXED };
struct mem_req { uint16_t type, pad[3]; uint64_t addr; uint16_t nb_blocks, pad2[3]; };
struct mem_resp { uint16_t type, pad[3]; uint16_t state; };
static struct vdev memdev;
static struct mem_req mem_req_buf;
static struct mem_resp mem_resp_buf;
/* What check_mem left plugged (with mem_keep=1), for the snapshot check. */
static uint64_t mem_addr, mem_block, mem_kept;

/* struct virtio_mem_config: the 64-bit field at `off`. */
static uint64_t mem_config(unsigned off) { return vr(&memdev, 0x100 + off) | (uint64_t)vr(&memdev, 0x104 + off) << 32; }
#define MEM_CFG_BLOCK 0
#define MEM_CFG_ADDR 16
#define MEM_CFG_REGION 24
#define MEM_CFG_USABLE 32
#define MEM_CFG_PLUGGED 40
#define MEM_CFG_REQUESTED 48

/* One request; returns the response type (MEM_NO_ANSWER without a 10-byte answer) and, for
 * STATE, the state. */
static unsigned mem_request(uint16_t type, uint64_t addr, uint64_t nb_blocks, unsigned *state)
{
	uint32_t len = 0;
	mem_req_buf = (struct mem_req){ .type = type, .addr = addr, .nb_blocks = (uint16_t)nb_blocks };
	mem_resp_buf = (struct mem_resp){ .type = 0x5a5a, .state = 0x5a5a };
	__asm__ volatile("" ::: "memory");
	memdev.q[0].desc[0] = (struct virtq_desc){ (uint64_t)&mem_req_buf, sizeof(mem_req_buf), VRING_DESC_F_NEXT, 1 };
	memdev.q[0].desc[1] = (struct virtq_desc){ (uint64_t)&mem_resp_buf, 10, VRING_DESC_F_WRITE, 0 };
	if (!virtq_submit(&memdev, &len) || len != 10)
		return MEM_NO_ANSWER;
	__asm__ volatile("" ::: "memory");
	if (state)
		*state = mem_resp_buf.state;
	return mem_resp_buf.type;
}

/* (Un)plugs blocks [from, to) of the region, at most 65535 to a request (nb_blocks is 16-bit). */
static int mem_change(uint16_t type, uint64_t from, uint64_t to)
{
	while (from < to) {
		uint64_t n = (to - from) / mem_block;
		if (n > 0xffff)
			n = 0xffff;
		if (mem_request(type, from, n, 0) != MEM_ACK)
			return 0;
		from += n * mem_block;
	}
	return 1;
}

/* The word the guest keeps at the start of each plugged page (the host test computes it). */
static uint64_t mem_word(uint64_t gpa) { return gpa ^ 0x534b494646000000UL; }

/* Writes mem_word at every page of [from, to) and reads them all back; returns the mismatches. */
static uint64_t mem_fill_and_check(uint64_t from, uint64_t to)
{
	for (uint64_t a = from; a < to; a += 4096)
		*(volatile uint64_t *)a = mem_word(a);
	uint64_t bad = 0;
	for (uint64_t a = from; a < to; a += 4096)
		bad += *(volatile uint64_t *)a != mem_word(a);
	return bad;
}

/* Polls the configuration until `done` holds for the requested size, for mem_wait_s seconds. */
static int mem_wait(int (*done)(uint64_t requested, uint64_t plugged), uint64_t plugged)
{
	uint64_t until = now_us() + param_uint("mem_wait_s", 60) * 1000000;
	while (now_us() < until) {
		if (done(mem_config(MEM_CFG_REQUESTED), plugged))
			return 1;
		for (volatile int i = 0; i < 10000; i++)
			__asm__ volatile("pause");
	}
	return 0;
}
static int mem_grown(uint64_t requested, uint64_t plugged) { return requested > plugged; }
static int mem_shrunk(uint64_t requested, uint64_t plugged) { return requested < plugged; }

/* What a guest breaking its promise (VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE) meets at `addr`, an
 * unplugged block in a slot that stays present (mem_touch_unplugged=1): a request whose
 * response would land there goes unanswered and the device keeps working; then the guest
 * writes and reads the block, which gives it nothing: KVM cannot map the host's PROT_NONE
 * pages, so either the VM stops there (KVM_RUN fails), or, where KVM emulates the access (KVM
 * PVM emulates this guest's every instruction), it goes to the VMM as MMIO, where nothing
 * answers: the write is dropped and the read is all-ones. */
static void mem_touch_unplugged(uint64_t addr)
{
	uint32_t len = 0xffff;
	unsigned state = 0;
	mem_req_buf = (struct mem_req){ .type = MEM_STATE, .addr = mem_addr, .nb_blocks = 1 };
	__asm__ volatile("" ::: "memory");
	memdev.q[0].desc[0] = (struct virtq_desc){ (uint64_t)&mem_req_buf, sizeof(mem_req_buf), VRING_DESC_F_NEXT, 1 };
	memdev.q[0].desc[1] = (struct virtq_desc){ addr, 10, VRING_DESC_F_WRITE, 0 };
	if (!virtq_submit(&memdev, &len) || len != 0) { report("mem", 0, "a response into unplugged memory was written"); return; }
	if (mem_request(MEM_STATE, mem_addr, 1, &state) != MEM_ACK || state != MEM_PLUGGED) { report("mem", 0, "the device stopped answering"); return; }
	puts("mem: a response into unplugged memory went unanswered\n");
	printf("mem: touching the unplugged block at %lx\n", addr);
	*(volatile uint64_t *)addr = mem_word(addr);
	uint64_t got = *(volatile uint64_t *)addr;
	printf("mem: read %lx from an unplugged block\n", got);
	if (got != ~0UL) { report("mem", 0, "an unplugged block is memory"); return; }
	puts("mem: the unplugged block reads as nothing\n");
	report("mem", 1, 0);
}

/* Drives the first virtio-mem device as its driver would: refused requests first (a range
 * outside the usable region, an unaligned one, an unknown type), then waits for the host to
 * request memory, plugs blocks from the region's start up to the requested size (one more is
 * a NACK), writes a word to every page of them and reads them back. With mem_keep=1 it stops
 * there, leaving them plugged (for the snapshot check). Else it waits for the host to ask
 * for less, unplugs down to it (STATE then says unplugged; the rest keeps its words),
 * unplugs an unplugged block (an ERROR), and ends with UNPLUG_ALL, after which the region is
 * no memory to the guest. With mem_touch_unplugged=1 it ends instead by touching an unplugged
 * block (see mem_touch_unplugged). */
static void check_mem(void)
{
	const char *why;
	unsigned state = 0;
	if (!find_virtio(VIRTIO_ID_MEM, &memdev)) { report("mem", 0, "no virtio-mem device on the command line"); return; }
	if ((why = virtio_init(&memdev, 1u << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE, 1))) { report("mem", 0, why); return; }
	mem_addr = mem_config(MEM_CFG_ADDR);
	mem_block = mem_config(MEM_CFG_BLOCK);
	uint64_t size = mem_config(MEM_CFG_REGION);
	printf("mem: region %lx size %lx block %lx usable %lx\n", mem_addr, size, mem_block, mem_config(MEM_CFG_USABLE));
	if (mem_addr < 0x100000000UL || !mem_block || mem_addr % mem_block || size % mem_block) { report("mem", 0, "the region is not block-aligned above 4 GiB"); return; }
	if (mem_addr + size > (uint64_t)HIGH_MAP_GIB << 30) { report("mem", 0, "the region is beyond what this guest maps"); return; }
	map_device_memory();
	if (mem_request(MEM_PLUG, mem_addr, 1, 0) != MEM_ERROR) { report("mem", 0, "a plug outside the usable region was not an error"); return; }
	if (mem_request(MEM_STATE, mem_addr + 4096, 1, 0) != MEM_ERROR) { report("mem", 0, "an unaligned state request was not an error"); return; }
	if (mem_request(9, mem_addr, 1, 0) != MEM_ERROR) { report("mem", 0, "an unknown request was not an error"); return; }

	puts("mem: waiting for the host to request memory\n");
	if (!mem_wait(mem_grown, 0)) { report("mem", 0, "the host requested no memory"); return; }
	uint64_t requested = mem_config(MEM_CFG_REQUESTED);
	if (requested > mem_config(MEM_CFG_USABLE)) { report("mem", 0, "the usable region is smaller than the requested size"); return; }
	if (!mem_change(MEM_PLUG, mem_addr, mem_addr + requested)) { report("mem", 0, "a plug request was refused"); return; }
	uint64_t plugged = mem_config(MEM_CFG_PLUGGED);
	if (plugged != requested) { report("mem", 0, "plugged_size is not what was plugged"); return; }
	if (requested < mem_config(MEM_CFG_USABLE) && mem_request(MEM_PLUG, mem_addr + requested, 1, 0) != MEM_NACK) { report("mem", 0, "a plug past the requested size was not a NACK"); return; }
	if (mem_request(MEM_STATE, mem_addr, requested / mem_block, &state) != MEM_ACK || state != MEM_PLUGGED) { report("mem", 0, "the plugged blocks are not reported plugged"); return; }
	printf("mem: plugged %lu MiB\n", plugged >> 20);
	uint64_t bad = mem_fill_and_check(mem_addr, mem_addr + plugged);
	if (bad) { report("mem", 0, "plugged memory did not read back"); return; }
	printf("mem: wrote and read back %lu MiB\n", plugged >> 20);
	if (param_uint("mem_keep", 0)) {
		mem_kept = plugged;
		report("mem", 1, 0);
		return;
	}

	puts("mem: waiting for the host to ask for less\n");
	if (!mem_wait(mem_shrunk, plugged)) { report("mem", 0, "the host did not ask for less"); return; }
	requested = mem_config(MEM_CFG_REQUESTED);
	if (!mem_change(MEM_UNPLUG, mem_addr + requested, mem_addr + plugged)) { report("mem", 0, "an unplug request was refused"); return; }
	if (mem_config(MEM_CFG_PLUGGED) != requested) { report("mem", 0, "plugged_size did not follow the unplug"); return; }
	if (mem_request(MEM_STATE, mem_addr + requested, (plugged - requested) / mem_block, &state) != MEM_ACK || state != MEM_UNPLUGGED) { report("mem", 0, "the unplugged blocks are not reported unplugged"); return; }
	if (mem_request(MEM_UNPLUG, mem_addr + plugged - mem_block, 1, 0) != MEM_ERROR) { report("mem", 0, "unplugging an unplugged block was not an error"); return; }
	for (uint64_t a = mem_addr; a < mem_addr + requested; a += 4096)
		bad += *(volatile uint64_t *)a != mem_word(a);
	if (bad) { report("mem", 0, "the memory still plugged lost its words"); return; }
	printf("mem: unplugged to %lu MiB\n", requested >> 20);
	if (param_uint("mem_touch_unplugged", 0)) {
		mem_touch_unplugged(mem_addr + requested);
		return;
	}
	if (mem_request(MEM_UNPLUG_ALL, 0, 0, 0) != MEM_ACK || mem_config(MEM_CFG_PLUGGED) != 0) { report("mem", 0, "UNPLUG_ALL did not unplug everything"); return; }
	/* No block of the region is plugged: it is no memory at all now (its KVM slots are gone),
	 * and an access exits to the VMM, where reads of nothing return all-ones. */
	*(volatile uint64_t *)mem_addr = 0;
	if (*(volatile uint64_t *)mem_addr != ~0UL) { report("mem", 0, "unplugged memory is still memory"); return; }
	puts("mem: unplugged all; the region reads as nothing\n");
	report("mem", 1, 0);
}

/* ---- virtio-blk (virtio 1.2, 5.2) ---- */
struct blk_req { uint32_t type, reserved; uint64_t sector; };
static struct vdev blk;
static struct blk_req blk_hdr;
static volatile uint8_t blk_status;
static uint8_t blk_buf[8192] __attribute__((aligned(512)));

/* One request: header, optional data (device-writable for reads), status. Returns the status
 * byte, or 0xff when the device never answered. */
static uint8_t blk_request(uint32_t type, uint64_t sector, void *data, uint32_t len, int data_in)
{
	blk_hdr = (struct blk_req){ type, 0, sector };
	blk_status = 0xee;
	int n = 0;
	blk.q[0].desc[n] = (struct virtq_desc){ (uint64_t)&blk_hdr, sizeof(blk_hdr), VRING_DESC_F_NEXT, 1 };
	n++;
	if (len) {
		blk.q[0].desc[n] = (struct virtq_desc){ (uint64_t)data, len, (uint16_t)(VRING_DESC_F_NEXT | (data_in ? VRING_DESC_F_WRITE : 0)), (uint16_t)(n + 1) };
		n++;
	}
	blk.q[0].desc[n] = (struct virtq_desc){ (uint64_t)&blk_status, 1, VRING_DESC_F_WRITE, 0 };
	uint32_t used_len;
	if (!virtq_submit(&blk, &used_len))
		return 0xff;
	return blk_status;
}

static uint8_t host_pattern(uint64_t i) { return (uint8_t)(i * 7 + 3); }
static uint8_t guest_pattern(uint64_t i) { return (uint8_t)(i * 13 + 5) ^ 0x5a; }

/* Reads what the host put at sector 2048, writes 8 KiB at sector 4096, flushes, reads it back,
 * reads the drive id, and checks that a read past the end fails. With blk_ro=1 a write must
 * fail instead. The host test checks the written bytes in the image afterwards. */
static void check_blk(void)
{
	const char *why;
	if (!find_virtio(2, &blk)) {
		report("blk", 0, "no virtio-blk device on the command line");
		return;
	}
	if ((why = virtio_init(&blk, (1u << 9) | (1u << 5), 1))) {
		report("blk", 0, why);
		return;
	}
	uint64_t capacity = (uint64_t)vr(&blk, 0x100) | ((uint64_t)vr(&blk, 0x104) << 32);
	int ro = (int)param_uint("blk_ro", 0);
	printf("blk: capacity %lu sectors, irq %u\n", capacity, blk.irq);
	ioapic_route(blk.irq, DEVICE_VECTOR);
	__asm__ volatile("sti");

	if (blk_request(0, 2048, blk_buf, 4096, 1) != 0) { report("blk", 0, "read of the host's data failed"); return; }
	for (uint64_t i = 0; i < 4096; i++)
		if (blk_buf[i] != host_pattern(i)) { report("blk", 0, "host data differs"); return; }
	puts("blk: host data verified\n");

	for (uint64_t i = 0; i < sizeof(blk_buf); i++)
		blk_buf[i] = guest_pattern(i);
	uint8_t st = blk_request(1, 4096, blk_buf, sizeof(blk_buf), 0);
	if (ro) {
		if (st != 1) { report("blk", 0, "write to a read-only disk did not fail"); return; }
		puts("blk: write refused (read-only)\n");
	} else {
		if (st != 0) { report("blk", 0, "write failed"); return; }
		if (blk_request(4, 0, 0, 0, 0) != 0) { report("blk", 0, "flush failed"); return; }
		memset(blk_buf, 0, sizeof(blk_buf));
		if (blk_request(0, 4096, blk_buf, sizeof(blk_buf), 1) != 0) { report("blk", 0, "read-back failed"); return; }
		for (uint64_t i = 0; i < sizeof(blk_buf); i++)
			if (blk_buf[i] != guest_pattern(i)) { report("blk", 0, "read-back differs"); return; }
		puts("blk: wrote, flushed and read back 8192 bytes\n");
	}
	char id[21] = { 0 };
	if (blk_request(8, 0, id, 20, 1) != 0) { report("blk", 0, "get-id failed"); return; }
	printf("blk: id '%s'\n", id);
	if (blk_request(0, capacity, blk_buf, 512, 1) != 1) { report("blk", 0, "read past the end did not fail"); return; }
	puts("blk: read past the end refused\n");
	for (unsigned i = 0; i < 10000000 && !device_irqs; i++)
		__asm__ volatile("pause");
	__asm__ volatile("cli");
	printf("blk: %lu interrupts\n", device_irqs);
	report("blk", device_irqs > 0, "no interrupt through the IOAPIC");
}

/* Waits for the device to report DEVICE_NEEDS_RESET; returns whether it did. */
static int blk_wait_needs_reset(void)
{
	for (unsigned i = 0; i < 20000000; i++) {
		if (vr(&blk, 0x70) & 0x40)
			return 1;
		__asm__ volatile("pause");
	}
	return 0;
}

/* Resets the device and sets it up again from scratch, as a driver recovering would. */
static const char *blk_reinit(void)
{
	vw(&blk, 0x70, 0);
	if (vr(&blk, 0x70) != 0)
		return "status not 0 after reset";
	memset(&blk.q[0], 0, sizeof(blk.q[0]));
	return virtio_init(&blk, 1u << 9, 1);
}

/* A driver gone wrong, as a malicious guest would be: an available index more than a queue
 * ahead of the device, then a ring zeroed under a live device. Each time the device must say
 * it needs a reset (virtio 1.2, 2.1.2), the reset must complete, and a fresh set-up must work.
 * Then a storm of writes to read-only configuration bytes, which the host's log must survive. */
static void check_hostile(void)
{
	const char *why;
	if (!find_virtio(2, &blk)) { report("hostile", 0, "no virtio-blk device on the command line"); return; }
	if ((why = virtio_init(&blk, 1u << 9, 1))) { report("hostile", 0, why); return; }
	if (blk_request(0, 0, blk_buf, 512, 1) != 0) { report("hostile", 0, "first read failed"); return; }

	blk.q[0].avail.idx = (uint16_t)(blk.q[0].avail.idx + QSZ + 1);
	__asm__ volatile("mfence" ::: "memory");
	vw(&blk, 0x50, 0);
	if (!blk_wait_needs_reset()) { report("hostile", 0, "no DEVICE_NEEDS_RESET for an index past the queue"); return; }
	if (!(vr(&blk, 0x60) & 2)) { report("hostile", 0, "no configuration interrupt status"); return; }
	puts("hostile: index past the queue: device needs reset\n");
	if ((why = blk_reinit())) { report("hostile", 0, why); return; }
	for (int i = 0; i < 3; i++)
		if (blk_request(0, (uint64_t)i, blk_buf, 512, 1) != 0) { report("hostile", 0, "read after reset failed"); return; }
	puts("hostile: reset, set up again, 3 reads\n");

	blk.q[0].avail.idx = 0;
	__asm__ volatile("mfence" ::: "memory");
	vw(&blk, 0x50, 0);
	if (!blk_wait_needs_reset()) { report("hostile", 0, "no DEVICE_NEEDS_RESET for a zeroed ring"); return; }
	if ((why = blk_reinit())) { report("hostile", 0, why); return; }
	if (blk_request(0, 0, blk_buf, 512, 1) != 0) { report("hostile", 0, "read after the second reset failed"); return; }
	puts("hostile: zeroed ring: device needs reset, reset, read\n");

	unsigned storm = (unsigned)param_uint("storm", 20000);
	for (unsigned i = 0; i < storm; i++)
		vw(&blk, 0x100, i);
	if (vr(&blk, 0x100) == 0) { report("hostile", 0, "the capacity changed under a write storm"); return; }
	printf("hostile: %u writes to read-only configuration bytes\n", storm);
	report("hostile", 1, 0);
}

/* A hostile driver of a virtio-pci disk: writes to read-only and unaligned configuration
 * space, its BAR moved over RAM (and back), an MSI-X table entry past the table, a notification
 * of a queue the device does not have, common-configuration writes at bad offsets. The host
 * must log each and go on; the disk must still answer afterwards. */
static void check_pcihostile(void)
{
	const char *why;
	if (!find_virtio(2, &blk) || !blk.pci) { report("pcihostile", 0, "no virtio-pci disk"); return; }
	if ((why = virtio_init(&blk, 1u << 9, 1))) { report("pcihostile", 0, why); return; }
	if (blk_request(0, 0, blk_buf, 512, 1) != 0) { report("pcihostile", 0, "first read failed"); return; }
	unsigned dev = blk.pci_dev;
	mmio_write32(ecam(dev, 0), 0);			/* vendor and device IDs: read-only */
	mmio_write32(ecam(dev, 0x800), 0xdeadbeef);	/* extended space: nothing there */
	mmio_write16(ecam(dev, 0x41), 0xffff);		/* unaligned */
	if (mmio_read32(ecam(dev, 0)) != (0x1af4u | (0x1042u << 16))) { report("pcihostile", 0, "IDs changed"); return; }
	uint32_t bar = mmio_read32(ecam(dev, 0x10));
	mmio_write32(ecam(dev, 0x10), 0x100000);	/* over the guest's own RAM */
	if (mmio_read32(blk.common + VPCI_DF) != 0xffffffffu) { report("pcihostile", 0, "BAR still decoded at its old place"); return; }
	mmio_write32(ecam(dev, 0x10), bar);
	mmio_write32(blk.msix_table + 16 * 100, 0xfee00000u);	/* entry 100 of 2 */
	if (mmio_read32(blk.msix_table + 16 * 100) != 0) { report("pcihostile", 0, "an MSI-X entry past the table took a write"); return; }
	mmio_write16(blk.notify + 7 * blk.notify_mult, 7);	/* queue 7 of 1 */
	mmio_write8(blk.common + 0x3f, 1);
	mmio_write16(blk.common + 0x12, 9);			/* num_queues: read-only */
	if (mmio_read16(blk.common + 0x12) != 1) { report("pcihostile", 0, "num_queues changed"); return; }
	for (int i = 0; i < 3; i++)
		if (blk_request(0, (uint64_t)i, blk_buf, 512, 1) != 0) { report("pcihostile", 0, "read after the hostile writes failed"); return; }
	puts("pcihostile: config space, BAR over RAM, MSI-X entry 100, queue 7: device still answers\n");
	report("pcihostile", 1, 0);
}

/* ---- virtio-net (virtio 1.2, 5.1) ---- */
#define NET_RXQ 0
#define NET_TXQ 1
#define NET_BUF 2048
#define VNET_HDR 12
#define VIRTIO_NET_F_CSUM 0
#define VIRTIO_NET_F_GUEST_CSUM 1
#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_F_MRG_RXBUF 15
#define VNET_F_NEEDS_CSUM 1
#define GUEST_PORT 5556
#define HOST_PORT 5555

struct vnet_hdr { uint8_t flags, gso_type; uint16_t hdr_len, gso_size, csum_start, csum_offset, num_buffers; };

static struct vdev net;
static uint8_t net_rx_buf[QSZ][NET_BUF] __attribute__((aligned(64)));
static uint8_t net_tx_buf[QSZ][NET_BUF] __attribute__((aligned(64)));
static unsigned net_tx_inflight;
static uint16_t net_tx_head, net_ip_id;
static uint8_t my_mac[6] = { 6, 0, 0xac, 0x1e, 0, 2 }, peer_mac[6];
static uint32_t my_ip, peer_ip;
static int have_peer;
/* With MRG_RXBUF a frame may span several receive buffers (virtio 1.2, 5.1.6.4): net_rx_len is
 * the length each buffer offers (small in the net check, so frames do span), and net_whole
 * collects a spread frame's parts. */
static int net_mrg;
static uint32_t net_rx_len = NET_BUF, net_rx_small = NET_BUF;
static uint8_t net_whole[NET_BUF];
static struct {
	uint64_t frames, udp, partial, bad_csum, bad_frame, arp_replies;
	uint64_t merged;	/* frames that arrived in more than one buffer */
	uint64_t patterned;	/* datagrams from the host whose padding was checked */
	uint64_t got;		/* datagrams from the host with the expected payload */
	uint8_t seen[64];	/* bitmap of the host's sequence numbers */
	int end;		/* the host's end-of-burst datagram arrived */
} rx;

/* The metadata service (check_mmds): its address and MAC, once ARP found it. */
static uint32_t mmds_ip;
static uint8_t mmds_mac[6];
static int have_mmds_mac;
static void mmds_segment(const uint8_t *ip, uint16_t ip_len);

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)get16(p) << 16 | get16(p + 2); }
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)); put16(p + 2, (uint16_t)v); }

/* The Internet checksum (RFC 1071) over big-endian 16-bit words. */
static uint32_t csum_add(uint32_t sum, const uint8_t *p, size_t n)
{
	size_t i;
	for (i = 0; i + 1 < n; i += 2)
		sum += get16(p + i);
	if (n & 1)
		sum += (uint32_t)p[n - 1] << 8;
	return sum;
}
static uint16_t csum_fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)sum;
}
/* The UDP pseudo-header (RFC 768) of the IPv4 header at `ip`. */
static uint32_t udp_pseudo(const uint8_t *ip, uint16_t udp_len) { return csum_add(0, ip + 12, 8) + 17 + udp_len; }

static uint32_t parse_ip(const char *key, uint32_t dflt)
{
	const char *v = param(key);
	uint32_t ip = 0;
	if (!v)
		return dflt;
	for (int i = 0; i < 4; i++) {
		if (*v < '0' || *v > '9')
			return dflt;
		ip = ip << 8 | (uint32_t)(param_uint_at(v) & 0xff);
		while (*v >= '0' && *v <= '9')
			v++;
		if (i < 3 && *v++ != '.')
			return dflt;
	}
	return ip;
}

/* Writes `prefix` and `n` in decimal to `out`; returns the length. */
static size_t fmt_seq(char *out, const char *prefix, uint64_t n)
{
	size_t len = strlen(prefix);
	char digits[24];
	int k = 0;
	memcpy(out, prefix, len);
	do { digits[k++] = (char)('0' + n % 10); n /= 10; } while (n);
	while (k)
		out[len++] = digits[--k];
	return len;
}

/* Queues one frame (virtio-net header included) on the TX queue, reclaiming used buffers and
 * waiting for one when all are in flight. */
static int net_send(const uint8_t *frame, size_t len)
{
	uint32_t id, used_len;
	for (unsigned i = 0; net_tx_inflight == QSZ; i++) {
		if (i > 100000000)
			return 0;
		__asm__ volatile("pause");
		while (vq_used(&net, NET_TXQ, &id, &used_len))
			net_tx_inflight--;
	}
	while (vq_used(&net, NET_TXQ, &id, &used_len))
		net_tx_inflight--;
	uint16_t d = net_tx_head++ % QSZ;
	memcpy(net_tx_buf[d], frame, len);
	net.q[NET_TXQ].desc[d] = (struct virtq_desc){ (uint64_t)net_tx_buf[d], (uint32_t)len, 0, 0 };
	net_tx_inflight++;
	/* The device's "no notify" flag is read only after the new index is visible (vq_publish
	 * ends with a fence): read before, it may be a drain's that ends without seeing the index,
	 * and the frame would wait for ever (virtio 1.2, 2.7.10). */
	vq_publish(&net, NET_TXQ, d, 0);
	if (!(*(volatile uint16_t *)&net.q[NET_TXQ].used.flags & 1))
		vw(&net, 0x50, NET_TXQ);
	return 1;
}

static uint8_t frame_buf[NET_BUF];

/* An Ethernet header after a zeroed virtio-net header; returns the start of the payload. */
static uint8_t *eth_header(uint8_t *f, const uint8_t *dst, uint16_t type)
{
	memset(f, 0, VNET_HDR);
	memcpy(f + VNET_HDR, dst, 6);
	memcpy(f + VNET_HDR + 6, my_mac, 6);
	put16(f + VNET_HDR + 12, type);
	return f + VNET_HDR + 14;
}

static int send_arp(uint16_t op, const uint8_t *tha, uint32_t tpa)
{
	static const uint8_t bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff }, zero[6];
	uint8_t *a = eth_header(frame_buf, op == 1 ? bcast : tha, 0x0806);
	put16(a, 1); put16(a + 2, 0x0800); a[4] = 6; a[5] = 4; put16(a + 6, op);
	memcpy(a + 8, my_mac, 6); put32(a + 14, my_ip);
	memcpy(a + 18, op == 1 ? zero : tha, 6); put32(a + 24, tpa);
	memset(a + 28, 0, 18);	/* pad to the 60-byte Ethernet minimum */
	return net_send(frame_buf, VNET_HDR + 60);
}

/* Builds in `f` a UDP datagram to the host; with `offload` the device side fills in the UDP
 * checksum (VIRTIO_NET_HDR_F_NEEDS_CSUM, virtio 1.2, 5.1.6.2), otherwise it is computed here.
 * Returns the frame's length with its virtio-net header. */
static size_t build_udp(uint8_t *f, const void *payload, size_t plen, int offload)
{
	uint8_t *ip = eth_header(f, peer_mac, 0x0800);
	uint16_t udp_len = (uint16_t)(8 + plen);
	ip[0] = 0x45; ip[1] = 0; put16(ip + 2, (uint16_t)(20 + udp_len)); put16(ip + 4, net_ip_id++);
	put16(ip + 6, 0x4000); ip[8] = 64; ip[9] = 17; put16(ip + 10, 0);
	put32(ip + 12, my_ip); put32(ip + 16, peer_ip);
	put16(ip + 10, (uint16_t)~csum_fold(csum_add(0, ip, 20)));
	uint8_t *u = ip + 20;
	put16(u, GUEST_PORT); put16(u + 2, HOST_PORT); put16(u + 4, udp_len); put16(u + 6, 0);
	memcpy(u + 8, payload, plen);
	uint32_t pseudo = udp_pseudo(ip, udp_len);
	if (offload) {
		struct vnet_hdr *h = (struct vnet_hdr *)f;
		h->flags = VNET_F_NEEDS_CSUM;
		h->csum_start = 14 + 20;
		h->csum_offset = 6;
		put16(u + 6, csum_fold(pseudo));
	} else {
		uint16_t c = (uint16_t)~csum_fold(csum_add(pseudo, u, udp_len));
		put16(u + 6, c ? c : 0xffff);
	}
	return VNET_HDR + 14 + 20 + udp_len;
}

static int send_udp(const void *payload, size_t plen, int offload)
{
	return net_send(frame_buf, build_udp(frame_buf, payload, plen, offload));
}

/* One received frame: answers ARP for our address, learns the host's MAC from its ARP reply,
 * and checks the IPv4 and UDP checksums of datagrams for us, completing a partial one first. */
static void net_frame(uint8_t *f, uint32_t len)
{
	struct vnet_hdr *h = (struct vnet_hdr *)f;
	uint8_t *e = f + VNET_HDR;
	rx.frames++;
	/* Without MRG_RXBUF, num_buffers must be 1 (virtio 1.2, 5.1.6.4); QEMU leaves it 0. With
	 * it, net_poll checked the count when it put the parts together. */
	if (len < VNET_HDR + 14 || len > NET_BUF || (!net_mrg && h->num_buffers > 1)) {
		rx.bad_frame++;
		return;
	}
	uint32_t elen = len - VNET_HDR;
	uint16_t type = get16(e + 12);
	if (type == 0x0806 && elen >= 14 + 28) {
		uint8_t *a = e + 14;
		if (get16(a + 6) == 2 && get32(a + 14) == peer_ip) {
			memcpy(peer_mac, a + 8, 6);
			have_peer = 1;
			rx.arp_replies++;
		} else if (get16(a + 6) == 2 && mmds_ip && get32(a + 14) == mmds_ip) {
			memcpy(mmds_mac, a + 8, 6);
			have_mmds_mac = 1;
		} else if (get16(a + 6) == 1 && get32(a + 24) == my_ip) {
			uint8_t sha[6];
			memcpy(sha, a + 8, 6);
			send_arp(2, sha, get32(a + 14));
		}
		return;
	}
	if (type != 0x0800 || elen < 14 + 28)
		return;
	uint8_t *ip = e + 14;
	uint16_t ip_len = get16(ip + 2);
	if (ip[0] != 0x45 || ip_len < 28 || ip_len > elen - 14) {
		rx.bad_frame++;
		return;
	}
	if (ip[9] == 6 && mmds_ip && get32(ip + 12) == mmds_ip && get32(ip + 16) == my_ip) {
		mmds_segment(ip, ip_len);
		return;
	}
	if (ip[9] != 17 || get32(ip + 16) != my_ip)
		return;
	rx.udp++;
	if (csum_fold(csum_add(0, ip, 20)) != 0xffff) {
		rx.bad_csum++;
		return;
	}
	uint8_t *u = ip + 20;
	uint16_t udp_len = get16(u + 4);
	if (udp_len < 8 || udp_len > ip_len - 20) {
		rx.bad_frame++;
		return;
	}
	if (h->flags & VNET_F_NEEDS_CSUM) {
		/* The host left the checksum to us: sum from csum_start to the end, store it at
		 * csum_start + csum_offset, then verify the whole datagram as usual. */
		if (h->csum_start != 14 + 20 || h->csum_offset != 6) {
			rx.bad_frame++;
			return;
		}
		uint16_t c = (uint16_t)~csum_fold(csum_add(0, u, udp_len));
		put16(u + 6, c ? c : 0xffff);
		rx.partial++;
	}
	if (get16(u + 6) != 0 && csum_fold(csum_add(udp_pseudo(ip, udp_len), u, udp_len)) != 0xffff) {
		rx.bad_csum++;
		return;
	}
	const char *p = (const char *)u + 8;
	size_t plen = udp_len - 8u;
	if (get16(u + 2) != GUEST_PORT)
		return;
	if (plen >= 12 && starts_with(p, "host-net end")) {
		rx.end = 1;
	} else if (plen >= 14 && starts_with(p, "host-net seq=")) {
		uint64_t seq = param_uint_at(p + 13);
		/* Padding after a space: 'a' to 'z' over and over. */
		size_t k = 13;
		while (k < plen && p[k] != ' ')
			k++;
		if (k < plen) {
			for (size_t j = k + 1; j < plen; j++)
				if (p[j] != 'a' + (char)((j - k - 1) % 26)) {
					rx.bad_frame++;
					return;
				}
			rx.patterned++;
		}
		if (seq < sizeof(rx.seen) * 8 && !(rx.seen[seq / 8] & (1u << (seq % 8)))) {
			rx.seen[seq / 8] |= (uint8_t)(1u << (seq % 8));
		}
		rx.got++;
	}
}

static void net_give_back(uint32_t id)
{
	net.q[NET_RXQ].desc[id % QSZ] = (struct virtq_desc){ (uint64_t)net_rx_buf[id % QSZ], net_rx_len, VRING_DESC_F_WRITE, 0 };
	vq_publish(&net, NET_RXQ, (uint16_t)(id % QSZ), 0);
}

/* Handles every received frame and gives its buffers back; returns how many buffers there
 * were. A frame spread over num_buffers buffers (MRG_RXBUF) is put together first: its parts
 * are the next used elements, which the device may still be adding. */
static unsigned net_poll(void)
{
	uint32_t id, len;
	unsigned n = 0;
	while (vq_used(&net, NET_RXQ, &id, &len)) {
		n++;
		uint16_t parts = ((struct vnet_hdr *)net_rx_buf[id % QSZ])->num_buffers;
		if (!net_mrg || parts == 1) {
			if (id < QSZ)
				net_frame(net_rx_buf[id], len);
			net_give_back(id);
			continue;
		}
		int bad = parts == 0 || id >= QSZ;
		uint32_t total = 0;
		for (uint16_t k = 0; !bad; ) {
			if (len > net_rx_len || total + len > NET_BUF)
				bad = 1;
			else
				memcpy(net_whole + total, net_rx_buf[id % QSZ], len);
			total += len;
			net_give_back(id);
			if (++k == parts)
				break;
			unsigned spins = 0;
			while (!vq_used(&net, NET_RXQ, &id, &len) && ++spins < 100000000)
				__asm__ volatile("pause");
			bad = bad || spins == 100000000 || id >= QSZ;
			n++;
		}
		if (bad) {
			rx.bad_frame++;
			continue;
		}
		rx.merged++;
		net_frame(net_whole, total);
	}
	if (n && !(*(volatile uint16_t *)&net.q[NET_RXQ].used.flags & 1))
		vw(&net, 0x50, NET_RXQ);
	return n;
}

/* Brings the device up: driver set-up, MAC, interrupt route, receive buffers, and the host's
 * MAC by ARP. Returns why it failed, or 0. */
static const char *net_start(void)
{
	const char *why;
	my_ip = parse_ip("net_ip", 0xac1e0002);
	peer_ip = parse_ip("net_peer", 0xac1e0001);
	if (!find_virtio(1, &net))
		return "no virtio-net device on the command line";
	uint32_t want = (1u << VIRTIO_NET_F_CSUM) | (1u << VIRTIO_NET_F_GUEST_CSUM) | (1u << VIRTIO_NET_F_MAC);
	if (param_uint("net_mrg", 1))
		want |= 1u << VIRTIO_NET_F_MRG_RXBUF;
	if ((why = virtio_init(&net, want, 2)))
		return why;
	vw(&net, 0x14, 0);
	net_mrg = ((vr(&net, 0x10) & want) >> VIRTIO_NET_F_MRG_RXBUF) & 1;
	net_rx_len = net_mrg ? net_rx_small : NET_BUF;
	printf("net: MRG_RXBUF %s, %u-byte receive buffers\n", net_mrg ? "on" : "off", net_rx_len);
	vw(&net, 0x14, 0);
	if (vr(&net, 0x10) & (1u << VIRTIO_NET_F_MAC))
		for (int i = 0; i < 6; i++)
			my_mac[i] = *(volatile uint8_t *)(net.base + 0x100 + (uintptr_t)i);
	printf("net: mac %2x:%2x:%2x:%2x:%2x:%2x, irq %u\n", my_mac[0], my_mac[1], my_mac[2], my_mac[3], my_mac[4], my_mac[5], net.irq);
	ioapic_route(net.irq, DEVICE_VECTOR);
	for (uint16_t i = 0; i < QSZ; i++) {
		net.q[NET_RXQ].desc[i] = (struct virtq_desc){ (uint64_t)net_rx_buf[i], net_rx_len, VRING_DESC_F_WRITE, 0 };
		vq_publish(&net, NET_RXQ, i, i == QSZ - 1);
	}
	/* Asked again often: right after Skiff attaches to a TAP the host may still drop what it
	 * sends (its link watch has not activated the TAP's queue yet), replies included. */
	for (unsigned i = 0; !have_peer && i < 200000000; i++) {
		if (i % 2000000 == 0 && !send_arp(1, 0, peer_ip))
			break;
		net_poll();
		__asm__ volatile("pause");
	}
	if (!have_peer)
		return "no ARP reply from the host";
	printf("net: host %2x:%2x:%2x:%2x:%2x:%2x answered ARP\n", peer_mac[0], peer_mac[1], peer_mac[2], peer_mac[3], peer_mac[4], peer_mac[5]);
	return 0;
}

/* Sends frames to the TAP and receives the host's, with checksums verified both ways: the host
 * test's UDP socket only sees datagrams whose checksums hold, and this side checks the host's
 * (completing the partial ones the TAP hands over when checksum offload is on).
 * Parameters: net_ip=, net_peer= (dotted quads), net_tx=N datagrams to send, net_rx=N to await. */
static void check_net(void)
{
	const char *why;
	uint64_t ntx = param_uint("net_tx", 8), nrx = param_uint("net_rx", 8);
	uint64_t irqs_before = device_irqs;
	/* Small receive buffers with MRG_RXBUF, so the host's datagrams span several. */
	net_rx_small = (uint32_t)param_uint("net_rxbuf", 64);
	if (net_rx_small < VNET_HDR || net_rx_small > NET_BUF)
		net_rx_small = NET_BUF;
	__asm__ volatile("sti");
	if ((why = net_start())) {
		__asm__ volatile("cli");
		report("net", 0, why);
		return;
	}

	char payload[64];
	for (uint64_t i = 0; i < ntx; i++)
		if (!send_udp(payload, fmt_seq(payload, "skiff-net seq=", i), (int)(i & 1))) {
			__asm__ volatile("cli");
			report("net", 0, "TX queue stalled");
			return;
		}
	printf("net: sent %lu datagrams (every other one with checksum offload)\n", ntx);

	for (unsigned i = 0; (rx.got < nrx && !rx.end) && i < 400000000; i++) {
		if (!net_poll())
			__asm__ volatile("pause");
	}
	/* Polling may see every frame before the first interrupt arrives: wait for one (as blk). */
	for (unsigned i = 0; i < 10000000 && device_irqs == irqs_before; i++)
		__asm__ volatile("pause");
	__asm__ volatile("cli");
	unsigned distinct = 0;
	for (unsigned i = 0; i < sizeof(rx.seen) * 8; i++)
		distinct += (rx.seen[i / 8] >> (i % 8)) & 1;
	printf("net: received %lu frames, %lu datagrams for us (%u distinct), %lu with partial checksums, %lu bad checksums, %lu malformed; %lu interrupts\n",
	       rx.frames, rx.got, distinct, rx.partial, rx.bad_csum, rx.bad_frame, device_irqs - irqs_before);
	printf("net: %lu frames in several buffers, %lu padded datagrams checked\n", rx.merged, rx.patterned);
	if (rx.bad_csum || rx.bad_frame)
		report("net", 0, "bad frames from the host");
	else if (rx.got < nrx || distinct < (nrx < 512 ? nrx : 512))
		report("net", 0, "datagrams from the host missing");
	else
		report("net", device_irqs > irqs_before, "no interrupt through the IOAPIC");
}

/* ---- the metadata service (MMDS): ARP, then HTTP over a minimal TCP client ---- */
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_ACK 0x10

/* The one connection open at a time, and what came back on it. */
static struct {
	int open, synack, fin, rst;
	uint16_t lport;
	uint32_t snd_una, snd_nxt, rcv_nxt;
	char buf[8192];
	size_t len;
} mt;
static uint64_t mmds_bad_csum, mmds_unexpected, mmds_conns;

/* Sends one segment to the service with full checksums (no offload), an MSS option on a SYN. */
static void mmds_send(uint8_t flags, const char *data, size_t dlen, uint32_t seq)
{
	uint8_t *ip = eth_header(frame_buf, mmds_mac, 0x0800);
	size_t hl = (flags & TCP_SYN) ? 24 : 20;
	uint16_t total = (uint16_t)(20 + hl + dlen), tl = (uint16_t)(hl + dlen);
	ip[0] = 0x45; ip[1] = 0; put16(ip + 2, total); put16(ip + 4, net_ip_id++);
	put16(ip + 6, 0x4000); ip[8] = 64; ip[9] = 6; put16(ip + 10, 0);
	put32(ip + 12, my_ip); put32(ip + 16, mmds_ip);
	put16(ip + 10, (uint16_t)~csum_fold(csum_add(0, ip, 20)));
	uint8_t *t = ip + 20;
	put16(t, mt.lport); put16(t + 2, 80); put32(t + 4, seq); put32(t + 8, mt.rcv_nxt);
	t[12] = (uint8_t)(hl / 4 << 4); t[13] = flags; put16(t + 14, 4096); put16(t + 16, 0); put16(t + 18, 0);
	if (hl == 24) { t[20] = 2; t[21] = 4; put16(t + 22, 1460); }
	memcpy(t + hl, data, dlen);
	put16(t + 16, (uint16_t)~csum_fold(csum_add(csum_add(0, ip + 12, 8) + 6 + tl, t, tl)));
	net_send(frame_buf, VNET_HDR + 14 + total);
}

/* A segment from the service: both checksums checked, then the connection's state moved on
 * (in-order data kept, every segment with data or FIN acknowledged). */
static void mmds_segment(const uint8_t *ip, uint16_t ip_len)
{
	const uint8_t *t = ip + 20;
	uint16_t tl = (uint16_t)(ip_len - 20);
	if (csum_fold(csum_add(0, ip, 20)) != 0xffff || tl < 20 ||
	    csum_fold(csum_add(csum_add(0, ip + 12, 8) + 6 + tl, t, tl)) != 0xffff) {
		mmds_bad_csum++;
		return;
	}
	size_t hl = (size_t)(t[12] >> 4) * 4, dlen = tl - hl;
	if (hl < 20 || hl > tl || get16(t) != 80 || get16(t + 2) != mt.lport || !mt.open) {
		mmds_unexpected++;
		return;
	}
	uint8_t flags = t[13];
	uint32_t seq = get32(t + 4), ack = get32(t + 8);
	if (flags & TCP_RST) {
		mt.rst = 1;
		return;
	}
	if ((flags & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK)) {
		if (!mt.synack && ack == mt.snd_una + 1) {
			mt.synack = 1;
			mt.rcv_nxt = seq + 1;
			mt.snd_una = ack;
		}
		mmds_send(TCP_ACK, 0, 0, mt.snd_una);
		return;
	}
	if ((flags & TCP_ACK) && ack - mt.snd_una <= mt.snd_nxt - mt.snd_una)
		mt.snd_una = ack;
	if (dlen) {
		if (seq == mt.rcv_nxt && mt.len + dlen <= sizeof(mt.buf)) {
			memcpy(mt.buf + mt.len, t + hl, dlen);
			mt.len += dlen;
			mt.rcv_nxt += (uint32_t)dlen;
		}
		mmds_send(TCP_ACK, 0, 0, mt.snd_nxt);
	}
	if (flags & TCP_FIN) {
		if (seq + dlen == mt.rcv_nxt) {
			mt.fin = 1;
			mt.rcv_nxt++;
		}
		mmds_send(TCP_ACK, 0, 0, mt.snd_nxt);
	}
}

/* Where the answer's body starts once its head and Content-Length bytes are in, else 0. */
static size_t mmds_answer_complete(void)
{
	for (size_t i = 0; i + 4 <= mt.len; i++) {
		if (mt.buf[i] != '\r' || mt.buf[i + 1] != '\n' || mt.buf[i + 2] != '\r' || mt.buf[i + 3] != '\n')
			continue;
		size_t body = i + 4, length = 0;
		for (size_t j = 0; j + 16 < i; j++)
			if (starts_with(mt.buf + j, "\r\nContent-Length: "))
				length = (size_t)param_uint_at(mt.buf + j + 18);
		return mt.len >= body + length ? body : 0;
	}
	return 0;
}

/* Waits up to `us` microseconds for `done()` while polling the receive queue; returns done(). */
static int mmds_wait(int (*done)(void), uint64_t us)
{
	uint64_t end = now_us() + us;
	while (!done() && !mt.rst && now_us() < end)
		if (!net_poll())
			__asm__ volatile("pause");
	return done();
}
static int mmds_got_synack(void) { return mt.synack; }
static int mmds_got_answer(void) { return mmds_answer_complete() != 0; }
static int mmds_closed(void) { return mt.fin && mt.snd_una == mt.snd_nxt; }

/* One HTTP exchange on a new connection: SYN (sent again every 200 ms), the request in one
 * segment (again every 500 ms until the answer is in), FIN, until the service's FIN. Returns the
 * answer's status, 0 when the exchange failed (*why says where); *body is the answer's body. */
static unsigned mmds_http(const char *req, const char **body, size_t *blen, const char **why)
{
	size_t rlen = strlen(req);
	memset(&mt, 0, sizeof(mt));
	mt.lport = (uint16_t)(40000 + mmds_conns++ % 20000);
	uint32_t iss = (uint32_t)mt.lport << 16;
	mt.snd_una = iss;
	mt.snd_nxt = iss + 1;
	mt.open = 1;
	for (int i = 0; !mmds_wait(mmds_got_synack, 200000); i++) {
		if (mt.rst || i == 10) { *why = mt.rst ? "reset during the handshake" : "no SYN-ACK"; return 0; }
		mmds_send(TCP_SYN, 0, 0, iss);
	}
	mt.snd_nxt = iss + 1 + (uint32_t)rlen;
	for (int i = 0; !mmds_wait(mmds_got_answer, i ? 500000 : 0); i++) {
		if (mt.rst || i == 10) { *why = mt.rst ? "reset before the answer" : "no answer"; return 0; }
		mmds_send(TCP_PSH | TCP_ACK, req, rlen, iss + 1);
	}
	size_t at = mmds_answer_complete();
	mmds_send(TCP_FIN | TCP_ACK, 0, 0, mt.snd_nxt);
	mt.snd_nxt++;
	for (int i = 0; !mmds_wait(mmds_closed, 500000); i++) {
		if (mt.rst || i == 10) { *why = mt.rst ? "reset while closing" : "the service did not close"; return 0; }
		mmds_send(TCP_FIN | TCP_ACK, 0, 0, mt.snd_nxt - 1);
	}
	mt.open = 0;
	*body = mt.buf + at;
	*blen = mt.len - at;
	if (mt.len < 12 || !starts_with(mt.buf, "HTTP/1.1 ")) { *why = "not an HTTP answer"; return 0; }
	return (unsigned)param_uint_at(mt.buf + 9);
}

/* Copies parameter `key` (up to the next space) into `out`, or `dflt` without it. */
static void param_copy(const char *key, const char *dflt, char *out, size_t size)
{
	const char *v = param(key);
	size_t n = 0;
	if (!v) v = dflt;
	while (v[n] && v[n] != ' ' && n + 1 < size) { out[n] = v[n]; n++; }
	out[n] = 0;
}

static void append(char *out, size_t size, const char *s)
{
	size_t n = strlen(out);
	while (*s && n + 1 < size) out[n++] = *s++;
	out[n] = 0;
}

/* Sends "METHOD PATH HTTP/1.1" with `headers` (each ending in CRLF); prints the status as
 * "mmds: round R: LABEL -> STATUS" and the body, line by line, as "mmds-body: LINE". */
static unsigned mmds_ask(unsigned round, const char *label, const char *method, const char *path,
			 const char *headers, const char **why)
{
	static char req[512];
	const char *body;
	size_t blen;
	req[0] = 0;
	append(req, sizeof(req), method); append(req, sizeof(req), " "); append(req, sizeof(req), path);
	append(req, sizeof(req), " HTTP/1.1\r\n"); append(req, sizeof(req), headers); append(req, sizeof(req), "\r\n");
	unsigned status = mmds_http(req, &body, &blen, why);
	if (!status) {
		printf("mmds: round %u: %s -> failed: %s\n", round, label, *why);
		return 0;
	}
	printf("mmds: round %u: %s -> %u\n", round, label, status);
	puts("mmds-body: ");
	for (size_t i = 0; i < blen; i++) {
		putc(body[i]);
		if (body[i] == '\n')
			puts("mmds-body: ");
	}
	putc('\n');
	return status;
}

/* One round of requests: GET of mmds_path (default /latest/meta-data/ami-id) with the token
 * of the last round (from the second round on), without a token and with a made-up one; a
 * token from PUT /latest/api/token (ttl 60); GET of mmds_path and of mmds_list (default
 * /latest/meta-data) with it, the list also as JSON. Returns why it failed, or 0. */
static const char *mmds_round(unsigned round, char *token, size_t tsize)
{
	static char path[128], list[128], hdr[256];
	const char *why = 0;
	param_copy("mmds_path", "/latest/meta-data/ami-id", path, sizeof(path));
	param_copy("mmds_list", "/latest/meta-data", list, sizeof(list));
	if (round > 1) {
		hdr[0] = 0;
		append(hdr, sizeof(hdr), "X-metadata-token: "); append(hdr, sizeof(hdr), token); append(hdr, sizeof(hdr), "\r\n");
		if (!mmds_ask(round, "GET path old-token", "GET", path, hdr, &why)) return why;
	}
	if (!mmds_ask(round, "GET path no-token", "GET", path, "", &why)) return why;
	if (!mmds_ask(round, "GET path bad-token", "GET", path, "X-metadata-token: 0123456789abcdef\r\n", &why)) return why;
	const char *body;
	size_t blen;
	unsigned status = mmds_http("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n", &body, &blen, &why);
	printf("mmds: round %u: PUT token -> %u (%lu bytes)\n", round, status, (uint64_t)blen);
	if (status != 200 || blen + 1 > tsize) return why ? why : "no token";
	memcpy(token, body, blen);
	token[blen] = 0;
	hdr[0] = 0;
	append(hdr, sizeof(hdr), "X-metadata-token: "); append(hdr, sizeof(hdr), token); append(hdr, sizeof(hdr), "\r\n");
	if (!mmds_ask(round, "GET path token", "GET", path, hdr, &why)) return why;
	if (!mmds_ask(round, "GET list token", "GET", list, hdr, &why)) return why;
	append(hdr, sizeof(hdr), "Accept: application/json\r\n");
	if (!mmds_ask(round, "GET list token json", "GET", list, hdr, &why)) return why;
	return 0;
}

/* The metadata service seen from the guest: ARP for its address (mmds_ip=, default
 * 169.254.169.254), then mmds_rounds= (default 1) rounds of HTTP exchanges (mmds_round), each
 * round after the first once the i8042 has a key (the host's SendCtrlAltDel, after a snapshot
 * is restored, say). Sets up the network as check_net does, the host's ARP answer included. */
static void check_mmds(void)
{
	static char token[128];
	uint64_t rounds = param_uint("mmds_rounds", 1);
	const char *why;
	mmds_ip = parse_ip("mmds_ip", 0xa9fea9fe);
	__asm__ volatile("sti");
	if ((why = net_start())) {
		__asm__ volatile("cli");
		report("mmds", 0, why);
		return;
	}
	for (unsigned i = 0; !have_mmds_mac && i < 50; i++) {
		send_arp(1, 0, mmds_ip);
		uint64_t end = now_us() + 100000;
		while (!have_mmds_mac && now_us() < end)
			net_poll();
	}
	if (!have_mmds_mac) {
		__asm__ volatile("cli");
		report("mmds", 0, "no ARP reply for the service's address");
		return;
	}
	printf("mmds: ARP: %u.%u.%u.%u is at %2x:%2x:%2x:%2x:%2x:%2x\n", mmds_ip >> 24, (mmds_ip >> 16) & 0xff,
	       (mmds_ip >> 8) & 0xff, mmds_ip & 0xff, mmds_mac[0], mmds_mac[1], mmds_mac[2], mmds_mac[3], mmds_mac[4], mmds_mac[5]);
	why = 0;
	for (unsigned r = 1; r <= rounds && !why; r++) {
		if (r > 1) {
			printf("mmds: round %u waits for a key\n", r);
			while (!(inb(0x64) & 1))
				net_poll();
			for (uint64_t end = now_us() + 100000; now_us() < end;)
				if (inb(0x64) & 1)
					(void)inb(0x60);
		}
		why = mmds_round(r, token, sizeof(token));
		printf("mmds: round %u done\n", r);
	}
	__asm__ volatile("cli");
	printf("mmds: %lu connections, %lu bad checksums, %lu unexpected segments\n", mmds_conns, mmds_bad_csum, mmds_unexpected);
	if (!why && (mmds_bad_csum || mmds_unexpected))
		why = "bad segments from the service";
	report("mmds", !why, why);
}

/* ---- benchmarks: identical work for every VMM, timed in the guest ---- */
static uint64_t tsc_per_us;

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi));
	return (uint64_t)hi << 32 | lo;
}

/* kvmclock (Documentation/virt/kvm/x86/msr.rst): the host keeps this structure current. */
struct pvclock {
	uint32_t version, pad0;
	uint64_t tsc_timestamp, system_time;
	uint32_t mul;
	int8_t shift;
	uint8_t flags, pad[2];
} __attribute__((aligned(64)));
static volatile struct pvclock kvmclock;
static int have_kvmclock;

static void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* Asks for kvmclock (KVM_FEATURE_CLOCKSOURCE2 in CPUID 0x40000001) at MSR 0x4b564d01. */
static int kvmclock_init(void)
{
	uint32_t a, b, c, d;
	cpuid(0x40000000, &a, &b, &c, &d);
	if (b != 0x4b4d564b || a < 0x40000001)	/* "KVMK" */
		return 0;
	cpuid(0x40000001, &a, &b, &c, &d);
	if (!(a & (1u << 3)))
		return 0;
	uint64_t v = (uint64_t)(uintptr_t)&kvmclock | 1;
	__asm__ volatile("wrmsr" :: "c"(0x4b564d01), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)));
	return kvmclock.mul != 0;
}

static uint64_t kvmclock_ns(void)
{
	uint32_t version;
	uint64_t ns;
	do {
		version = kvmclock.version;
		__asm__ volatile("" ::: "memory");
		uint64_t delta = rdtsc() - kvmclock.tsc_timestamp;
		delta = kvmclock.shift < 0 ? delta >> -kvmclock.shift : delta << kvmclock.shift;
		ns = kvmclock.system_time + (uint64_t)(((unsigned __int128)delta * kvmclock.mul) >> 32);
		__asm__ volatile("" ::: "memory");
	} while ((version & 1) || version != kvmclock.version);
	return ns;
}

/* A microsecond clock for the timed checks: kvmclock where the VMM offers it (every KVM-based
 * one does), else the TSC calibrated over 50 ms of PIT channel 2, as Linux does. */
static int tsc_calibrate(void)
{
	if (kvmclock_init()) {
		have_kvmclock = 1;
		return 1;
	}
	uint16_t latch = 1193182 / 20;
	outb(0x61, (uint8_t)((inb(0x61) & ~0x02) | 0x01));	/* gate on, speaker off */
	outb(0x43, 0xb0);					/* channel 2, lo/hi byte, mode 0 */
	outb(0x42, (uint8_t)latch);
	outb(0x42, (uint8_t)(latch >> 8));
	uint64_t t1 = rdtsc(), t2 = t1;
	for (unsigned i = 0; i < 10000000 && !(inb(0x61) & 0x20); i++)
		t2 = rdtsc();
	tsc_per_us = (t2 - t1) / 50000;
	return tsc_per_us > 0 && (inb(0x61) & 0x20);
}
static uint64_t now_us(void) { return have_kvmclock ? kvmclock_ns() / 1000 : rdtsc() / tsc_per_us; }

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

/* virtio-blk with many requests in flight: slot k uses descriptors 3k..3k+2 and a 64 KiB
 * buffer in a fixed RAM region. */
#define BLK_SLOTS 40
#define BENCH_BUF 0x1000000UL
static struct blk_req bench_hdr[BLK_SLOTS];
static volatile uint8_t bench_status[BLK_SLOTS];

/* Publishes slot s's request on blk's queue 0: a header (type, sector), `len` bytes at `buf`
 * (written by the device for a read, type 0) and the status byte, descriptors 3s to 3s + 2. */
static void blk_post(unsigned s, uint32_t type, uint64_t sector, uint64_t buf, uint32_t len)
{
	struct vq *q = &blk.q[0];
	uint16_t d = (uint16_t)(3 * s);
	bench_hdr[s] = (struct blk_req){ type, 0, sector };
	bench_status[s] = 0xee;
	q->desc[d] = (struct virtq_desc){ (uint64_t)&bench_hdr[s], sizeof(struct blk_req), VRING_DESC_F_NEXT, (uint16_t)(d + 1) };
	q->desc[d + 1] = (struct virtq_desc){ buf, len, (uint16_t)(VRING_DESC_F_NEXT | (type == 0 ? VRING_DESC_F_WRITE : 0)), (uint16_t)(d + 2) };
	q->desc[d + 2] = (struct virtq_desc){ (uint64_t)&bench_status[s], 1, VRING_DESC_F_WRITE, 0 };
	vq_publish(&blk, 0, d, 0);
}

/* Runs `total` requests of `len` bytes with up to `depth` in flight: reads or writes,
 * sequential from sector 0 or random (aligned) within `span` bytes. Every `phase` completions
 * (0: never) prints the time since the previous mark, without draining the queue. Returns
 * microseconds, or 0 when a request failed or the device stalled. */
static uint64_t blk_run(unsigned depth, uint64_t total, uint32_t type, uint32_t len, int random, uint64_t span, uint64_t phase)
{
	uint16_t free_slots[BLK_SLOTS];
	unsigned nfree = 0;
	for (unsigned i = 0; i < depth && i < BLK_SLOTS; i++)
		free_slots[nfree++] = (uint16_t)i;
	uint64_t issued = 0, done = 0, blocks = span / len, t0 = now_us(), mark = t0;
	struct vq *q = &blk.q[0];
	while (done < total) {
		int queued = 0;
		while (issued < total && nfree) {
			unsigned s = free_slots[--nfree];
			uint64_t block = random ? rng() % blocks : issued % blocks;
			blk_post(s, type, block * (len / 512), BENCH_BUF + (uint64_t)s * 65536, len);
			issued++;
			queued = 1;
		}
		if (queued && !(*(volatile uint16_t *)&q->used.flags & 1))
			vw(&blk, 0x50, 0);
		uint32_t id, ulen;
		unsigned spins = 0;
		while (!vq_used(&blk, 0, &id, &ulen)) {
			if (++spins > 200000000)
				return 0;
			__asm__ volatile("pause");
		}
		do {
			unsigned s = id / 3;
			if (s >= BLK_SLOTS || bench_status[s] != 0)
				return 0;
			free_slots[nfree++] = (uint16_t)s;
			done++;
			if (phase && done % phase == 0) {
				uint64_t t = now_us();
				printf("BENCH blk phase-%lu-%s-%uk-qd%u ops=%lu bytes=%lu us=%lu\n", done / phase - 1,
				       type == 0 ? "read" : "write", len / 1024, depth, phase, phase * len, t - mark);
				mark = t;
			}
		} while (vq_used(&blk, 0, &id, &ulen));
	}
	return now_us() - t0 + 1;
}

static void bench_line(const char *what, uint64_t ops, uint64_t bytes, uint64_t us)
{
	printf("BENCH %s ops=%lu bytes=%lu us=%lu\n", what, ops, bytes, us);
}

/* The benchmark loops run in ring 3 (entry.S: ring3_call) unless bench_ring=0: on a PVM host
 * the guest's user mode runs natively while its kernel mode is emulated instruction by
 * instruction, so only from ring 3 do the rows time the exits and the VMM, not the emulator.
 * A check starts with `if (bench_in_ring3(itself, name)) return;`: true once it has run there. */
static uint64_t run_check(uint64_t check)
{
	((void (*)(void))check)();
	return 0;
}

static int bench_in_ring3(void (*check)(void), const char *name)
{
	if (cpl() == 3 || param_uint("bench_ring", 3) == 0) {
		printf("bench: %s in ring %u\n", name, cpl());
		return 0;
	}
	ring3_call(run_check, (uint64_t)check);
	return 1;
}

/* `n` blocks of ten one-cycle ALU instructions (four independent chains and the loop), timed
 * with the guest's clock: the guest's own instruction rate in the ring it is called in. */
static uint64_t insn_loop(uint64_t n)
{
	uint64_t a = 0, b = 0, c = 0, d = 0, t0 = now_us();
	__asm__ volatile("1: add $1, %1; add $1, %2; add $1, %3; add $1, %4; add $1, %1\n\t"
			 "add $1, %2; add $1, %3; add $1, %4; dec %0; jnz 1b"
			 : "+r"(n), "+r"(a), "+r"(b), "+r"(c), "+r"(d));
	return now_us() - t0 + 1;
}

/* Instruction rate in ring 0 and in ring 3, as rows `cpu insns-ring0` and `cpu insns-ring3`.
 * Parameters: insns_ring0= (default 1000000: a second where ring 0 is emulated), insns_ring3=
 * (default 1000000000). */
static void check_insns(void)
{
	uint64_t n0 = param_uint("insns_ring0", 1000000) / 10, n3 = param_uint("insns_ring3", 1000000000) / 10;
	n0 = n0 ? n0 : 1;
	n3 = n3 ? n3 : 1;
	if (!have_kvmclock && !tsc_per_us && !tsc_calibrate()) {
		report("insns", 0, "no clock: neither kvmclock nor a calibrated TSC");
		return;
	}
	bench_line("cpu insns-ring0", n0 * 10, 0, insn_loop(n0));
	bench_line("cpu insns-ring3", n3 * 10, 0, ring3_call(insn_loop, n3));
	report("insns", 1, 0);
}

/* Sequential read and write (64 KiB requests, 8 in flight; the write ends with a flush) and
 * 4 KiB random reads at queue depth 1 and 32. Parameters: bench_mib=, bench_ios=. */
static void check_blkbench(void)
{
	const char *why;
	if (bench_in_ring3(check_blkbench, "blkbench"))
		return;
	uint64_t mib = param_uint("bench_mib", 64), ios = param_uint("bench_ios", 4000);
	if (!find_virtio(2, &blk)) { report("blkbench", 0, "no virtio-blk device"); return; }
	if ((why = virtio_init(&blk, 1u << 9, 1))) { report("blkbench", 0, why); return; }
	blk.q[0].avail.flags = 1;	/* polled: no interrupts */
	uint64_t span = ((uint64_t)vr(&blk, 0x100) | ((uint64_t)vr(&blk, 0x104) << 32)) * 512;
	if (span < mib << 20) { report("blkbench", 0, "disk smaller than bench_mib"); return; }
	uint64_t us, seq_ops = (mib << 20) / 65536;
	if (!(us = blk_run(8, seq_ops, 0, 65536, 0, mib << 20, 0))) goto fail;
	bench_line("blk seq-read-64k-qd8", seq_ops, mib << 20, us);
	uint64_t t0 = now_us();
	if (!blk_run(8, seq_ops, 1, 65536, 0, mib << 20, 0)) goto fail;
	if (blk_request(4, 0, 0, 0, 0) != 0) goto fail;
	bench_line("blk seq-write-64k-qd8+flush", seq_ops, mib << 20, now_us() - t0);
	if (!(us = blk_run(1, ios, 0, 4096, 1, mib << 20, 0))) goto fail;
	bench_line("blk rand-read-4k-qd1", ios, ios * 4096, us);
	if (!(us = blk_run(32, ios * 4, 0, 4096, 1, mib << 20, 0))) goto fail;
	bench_line("blk rand-read-4k-qd32", ios * 4, ios * 16384, us);
	report("blkbench", 1, 0);
	return;
fail:
	report("blkbench", 0, "a request failed or the device stalled");
}

/* Throughput phase by phase, for rate limits: sequential 64 KiB reads, rate_qd (default 32)
 * in flight, timed every rate_mib (default 4) MiB for rate_phases (default 4) phases. The queue
 * never drains between phases, so a moment the guest does not run costs no throughput, and
 * the host sees the rate change when it changes the limit. */
static void check_blkrate(void)
{
	const char *why;
	if (bench_in_ring3(check_blkrate, "blkrate"))
		return;
	uint64_t mib = param_uint("rate_mib", 4), phases = param_uint("rate_phases", 4);
	unsigned depth = (unsigned)param_uint("rate_qd", 32);
	if (!find_virtio(2, &blk)) { report("blkrate", 0, "no virtio-blk device"); return; }
	if ((why = virtio_init(&blk, 1u << 9, 1))) { report("blkrate", 0, why); return; }
	blk.q[0].avail.flags = 1;	/* polled: no interrupts */
	uint64_t span = ((uint64_t)vr(&blk, 0x100) | ((uint64_t)vr(&blk, 0x104) << 32)) * 512;
	if (span < mib << 20) { report("blkrate", 0, "disk smaller than rate_mib"); return; }
	uint64_t per_phase = (mib << 20) / 65536;
	report("blkrate", blk_run(depth, per_phase * phases, 0, 65536, 0, mib << 20, per_phase) != 0,
	       "a request failed or the device stalled");
}

/* Word w (little-endian u64) of 4 KiB block `b` as round `r` of blkdeep writes it
 * (tests/virtio_blk.rs agrees). Words, not bytes: the guest's loops run emulated. */
static uint64_t deep_word(uint64_t r, uint64_t b, uint64_t w)
{
	return (r << 48 | b << 16 | w) ^ 0x5a5a5a5a5a5a5a5aUL;
}

/* One pass of blkdeep: `n` 4 KiB requests (writes of round `r`, or reads checked against it)
 * on blocks 0..n-1 from sector `base`, all BLK_SLOTS slots in flight and published before one
 * notification, so the device sees more than its io_uring holds. 0 on a failure or stall. */
static int blk_deep_pass(uint64_t n, uint32_t type, uint64_t r, uint64_t base)
{
	uint16_t free_slots[BLK_SLOTS];
	uint64_t slot_block[BLK_SLOTS];
	unsigned nfree = 0;
	for (unsigned i = 0; i < BLK_SLOTS; i++)
		free_slots[nfree++] = (uint16_t)(BLK_SLOTS - 1 - i);
	uint64_t issued = 0, done = 0;
	while (done < n) {
		int queued = 0;
		while (issued < n && nfree) {
			unsigned s = free_slots[--nfree];
			uint64_t *buf = (uint64_t *)(BENCH_BUF + (uint64_t)s * 65536);
			for (uint64_t w = 0; w < 512; w++)
				buf[w] = type == 1 ? deep_word(r, issued, w) : 0;
			slot_block[s] = issued;
			blk_post(s, type, base + issued * 8, (uint64_t)buf, 4096);
			issued++;
			queued = 1;
		}
		if (queued)
			vw(&blk, 0x50, 0);
		uint32_t id, ulen;
		unsigned spins = 0;
		while (!vq_used(&blk, 0, &id, &ulen)) {
			if (++spins > 200000000)
				return 0;
			__asm__ volatile("pause");
		}
		do {
			unsigned s = id / 3;
			if (s >= BLK_SLOTS || bench_status[s] != 0)
				return 0;
			if (type == 0) {
				uint64_t *buf = (uint64_t *)(BENCH_BUF + (uint64_t)s * 65536);
				for (uint64_t w = 0; w < 512; w++)
					if (buf[w] != deep_word(r, slot_block[s], w))
						return 0;
			}
			free_slots[nfree++] = (uint16_t)s;
			done++;
		} while (vq_used(&blk, 0, &id, &ulen));
	}
	return 1;
}

/* Deep queue, bytes checked: deep_rounds (default 1) rounds of deep_blocks (default 96)
 * 4 KiB writes from sector deep_sector (default 8192), a flush, and the same blocks read back
 * and compared; the host then checks the last round's bytes in the image. */
static void check_blkdeep(void)
{
	const char *why;
	uint64_t n = param_uint("deep_blocks", 96), rounds = param_uint("deep_rounds", 1);
	uint64_t base = param_uint("deep_sector", 8192);
	if (!find_virtio(2, &blk)) { report("blkdeep", 0, "no virtio-blk device"); return; }
	if ((why = virtio_init(&blk, 1u << 9, 1))) { report("blkdeep", 0, why); return; }
	blk.q[0].avail.flags = 1;	/* polled: no interrupts */
	for (uint64_t r = 0; r < rounds; r++) {
		if (!blk_deep_pass(n, 1, r, base)) { report("blkdeep", 0, "a write failed or the device stalled"); return; }
		if (blk_request(4, 0, 0, 0, 0) != 0) { report("blkdeep", 0, "flush failed"); return; }
		if (!blk_deep_pass(n, 0, r, base)) { report("blkdeep", 0, "a read failed, differed, or the device stalled"); return; }
		printf("blkdeep: round %lu: %lu writes, flush, %lu reads checked, %u in flight\n", r, n, n, BLK_SLOTS);
	}
	report("blkdeep", 1, 0);
}

/* Reset with requests in flight: BLK_SLOTS 4 KiB reads published, one notification, then
 * the driver resets the device at once. After the reset no request may touch the guest:
 * the buffers (refilled with a canary) and the used ring stay as they are for a while; then
 * the device is set up again and reads. */
static void check_blkreset(void)
{
	const char *why;
	if (!find_virtio(2, &blk)) { report("blkreset", 0, "no virtio-blk device"); return; }
	if ((why = virtio_init(&blk, 1u << 9, 1))) { report("blkreset", 0, why); return; }
	blk.q[0].avail.flags = 1;
	struct vq *q = &blk.q[0];
	uint64_t *bufs = (uint64_t *)BENCH_BUF, words = BLK_SLOTS * 512;
	for (unsigned s = 0; s < BLK_SLOTS; s++) {
		blk_post(s, 0, 4096 + (uint64_t)s * 256, (uint64_t)(bufs + s * 512), 4096);	/* 128 KiB apart */
	}
	vw(&blk, 0x50, 0);
	/* Until the device is draining (it turns notifications off meanwhile, and leaves them off
	 * while its ring is full), or a bounded while: then reset. */
	for (unsigned i = 0; i < 100000 && !(*(volatile uint16_t *)&q->used.flags & 1); i++)
		__asm__ volatile("pause");
	vw(&blk, 0x70, 0);
	if (vr(&blk, 0x70) != 0) { report("blkreset", 0, "reset not taken"); return; }
	uint16_t used = *(volatile uint16_t *)&q->used.idx;
	for (uint64_t w = 0; w < words; w++)
		bufs[w] = 0x5a5a5a5a5a5a5a5aUL;
	for (unsigned s = 0; s < BLK_SLOTS; s++)
		bench_status[s] = 0x77;
	for (volatile unsigned long i = 0; i < 200000; i++)
		__asm__ volatile("pause");
	for (uint64_t w = 0; w < words; w++)
		if (bufs[w] != 0x5a5a5a5a5a5a5a5aUL) { report("blkreset", 0, "a buffer was written after the reset"); return; }
	for (unsigned s = 0; s < BLK_SLOTS; s++)
		if (bench_status[s] != 0x77) { report("blkreset", 0, "a status was written after the reset"); return; }
	if (*(volatile uint16_t *)&q->used.idx != used) { report("blkreset", 0, "the used ring moved after the reset"); return; }
	printf("blkreset: %u reads in flight at the reset, %u answered before it, nothing written after\n", BLK_SLOTS, used);
	memset(q, 0, sizeof(*q));
	if ((why = virtio_init(&blk, 1u << 9, 1))) { report("blkreset", 0, why); return; }
	if (blk_request(0, 2048, blk_buf, 4096, 1) != 0) { report("blkreset", 0, "read after the reset failed"); return; }
	for (uint64_t i = 0; i < 4096; i++)
		if (blk_buf[i] != host_pattern(i)) { report("blkreset", 0, "data read after the reset differs"); return; }
	report("blkreset", 1, 0);
}

/* Receive path of the benchmark: counts the host's datagrams by their payload prefix (no
 * checksum work: under instruction emulation that would be all we measured), hands ARP to
 * net_frame, and gives every buffer back. */
static unsigned net_poll_bench(uint64_t *got, int *end)
{
	uint32_t id, len;
	unsigned n = 0;
	while (vq_used(&net, NET_RXQ, &id, &len)) {
		uint8_t *f = net_rx_buf[id % QSZ], *e = f + VNET_HDR;
		if (len >= VNET_HDR + 14 + 28 + 12 && e[12] == 8 && e[13] == 0 && e[14 + 9] == 17) {
			const char *p = (const char *)e + 14 + 28;
			if (starts_with(p, "host-net seq="))
				(*got)++;
			else if (starts_with(p, "host-net end"))
				*end = 1;
		} else if (len >= VNET_HDR + 14 && e[12] == 8 && e[13] == 6) {
			net_frame(f, len);
		}
		vq_publish(&net, NET_RXQ, (uint16_t)(id % QSZ), 0);
		n++;
	}
	if (n && !(*(volatile uint16_t *)&net.q[NET_RXQ].used.flags & 1))
		vw(&net, 0x50, NET_RXQ);
	return n;
}

/* Frames through virtio-net both ways, with checksum offload and as little guest work per frame
 * as a driver can do: every TX buffer holds a prebuilt datagram of netbench_size payload bytes,
 * so sending is publishing a descriptor. Sends netbench_tx of them and an end marker, then says
 * "rx-ready" and counts the host's datagrams until its end marker. */
static void check_netbench(void)
{
	const char *why;
	if (bench_in_ring3(check_netbench, "netbench"))
		return;
	uint64_t ntx = param_uint("netbench_tx", 100000), size = param_uint("netbench_size", 1472);
	if (size < 16 || size > 1472) size = 1472;
	if ((why = net_start())) { report("netbench", 0, why); return; }
	net.q[NET_RXQ].avail.flags = net.q[NET_TXQ].avail.flags = 1;	/* polled: no interrupts */
	static char payload[1472];
	memset(payload, 'x', sizeof(payload));
	memcpy(payload, "skiff-net seq=", 14);
	uint32_t id, len;
	/* Let the set-up frames drain, then prebuild every TX buffer. */
	for (unsigned i = 0; net_tx_inflight && i < 100000000; i++)
		while (vq_used(&net, NET_TXQ, &id, &len))
			net_tx_inflight--;
	for (uint16_t d = 0; d < QSZ; d++) {
		uint32_t n = (uint32_t)build_udp(net_tx_buf[d], payload, size, 1);
		net.q[NET_TXQ].desc[d] = (struct virtq_desc){ (uint64_t)net_tx_buf[d], n, 0, 0 };
	}
	struct vq *q = &net.q[NET_TXQ];
	uint64_t t0 = now_us(), sent = 0, done = 0, spins = 0;
	while (done < ntx && spins < 1000000000ull) {
		while (sent < ntx && sent - done < QSZ) {
			q->avail.ring[q->avail.idx % QSZ] = (uint16_t)(sent % QSZ);
			__asm__ volatile("" ::: "memory");
			q->avail.idx++;
			sent++;
		}
		__asm__ volatile("mfence" ::: "memory");
		if (!(*(volatile uint16_t *)&q->used.flags & 1))
			vw(&net, 0x50, NET_TXQ);
		while (!vq_used(&net, NET_TXQ, &id, &len) && ++spins < 1000000000ull)
			__asm__ volatile("pause");
		done++;
		while (vq_used(&net, NET_TXQ, &id, &len))
			done++;
	}
	uint64_t us = now_us() - t0 + 1;
	net_tx_inflight = 0;
	net_tx_head = (uint16_t)(net_tx_head + sent);
	if (done < ntx) { report("netbench", 0, "TX queue stalled"); return; }
	for (int i = 0; i < 3; i++)
		send_udp("skiff-net end", 13, 0);
	bench_line("net tx-udp", ntx, ntx * size, us);

	uint64_t first = 0, last = 0, got = 0, seen = 0, next_ready = 0;
	int end = 0;
	for (spins = 0; !end && spins < 2000000000ull; spins++) {
		if (!got && now_us() >= next_ready) {
			send_udp("skiff-net rx-ready", 18, 0);
			next_ready = now_us() + 200000;
		}
		if (!net_poll_bench(&got, &end)) {
			__asm__ volatile("pause");
			continue;
		}
		if (got != seen) {
			last = now_us();
			if (!seen)
				first = last;
			seen = got;
		}
	}
	bench_line("net rx-udp", got, got * size, last - first + 1);
	report("netbench", end && got > 0, "no datagrams or no end marker from the host");
}

/* Prints "tick N" every 50 ms (TSC time) until the i8042 delivers Ctrl-Alt-Del (the host's
 * SendCtrlAltDel), then checks the scancodes. The ticks show the host whether the guest runs
 * (pause and resume tests). Parameter: ticks_max= (default 1200, one minute). */
static void check_ctrlaltdel(void)
{
	static const uint8_t want[4] = { 0x14, 0x11, 0xe0, 0x71 };	/* set 2: Ctrl, Alt, Del */
	uint8_t keys[4] = { 0 };
	unsigned n = 0;
	uint64_t max = param_uint("ticks_max", 1200), tick = 0, next = now_us();
	puts("keys: waiting for Ctrl-Alt-Del\n");
	while (n < 4 && tick <= max) {
		if (inb(0x64) & 1)
			keys[n++] = inb(0x60);
		if (now_us() >= next) {
			printf("tick %lu\n", tick++);
			next = now_us() + 50000;
		}
	}
	printf("keys: %2x %2x %2x %2x\n", keys[0], keys[1], keys[2], keys[3]);
	int ok = n == 4;
	for (unsigned i = 0; i < 4; i++)
		ok = ok && keys[i] == want[i];
	report("ctrlaltdel", ok, n < 4 ? "no key sequence from the host" : "not the Ctrl-Alt-Del sequence");
}

/* An idle guest that shows it runs: "tick N" every 50 ms, ticks_max (default 100) times, with no
 * device but the serial port (for footprint and density figures in any VMM). */
static void check_ticks(void)
{
	uint64_t max = param_uint("ticks_max", 100), next = now_us();
	for (uint64_t tick = 0; tick < max;) {
		if (now_us() >= next) {
			printf("tick %lu\n", tick++);
			next = now_us() + 50000;
		}
		__asm__ volatile("pause");
	}
	report("ticks", 1, 0);
}

/* ---- virtio-vsock (virtio 1.2, 5.10): a polled driver with a few sockets ---- */
#define VIRTIO_ID_VSOCK 19
#define VS_RXQ 0
#define VS_TXQ 1
#define VS_EVQ 2
#define VS_HDR 44
#define VS_RX_BUF 4096		/* header and data of one received packet */
#define VS_TX_DATA 4096		/* most data in one sent packet */
#define VS_TX_SLOTS (QSZ / 2)	/* packets in flight: descriptors 2s (header) and 2s+1 (data) */
#define VS_EV_BUFS 4
#define VS_BUF_ALLOC 65536	/* receive space each socket offers the host */
#define VS_MAX_CONN 16
#define VS_HOST_CID 2
#define VS_OP_REQUEST 1
#define VS_OP_RESPONSE 2
#define VS_OP_RST 3
#define VS_OP_SHUTDOWN 4
#define VS_OP_RW 5
#define VS_OP_CREDIT_UPDATE 6
#define VS_OP_CREDIT_REQUEST 7
#define VS_SHUT_BOTH 3
#define VS_HOSTILE_PORT 40000	/* source ports of the hostile mode's probes */

struct vs_hdr {
	uint64_t src_cid, dst_cid;
	uint32_t src_port, dst_port, len;
	uint16_t type, op;
	uint32_t flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

enum { VS_FREE, VS_CONNECTING, VS_OPEN, VS_CLOSING };

struct vs_conn {
	int state, echo;
	uint32_t local_port, peer_port;
	uint32_t peer_buf_alloc, peer_fwd_cnt, tx_cnt;	/* the host's credit and what we sent */
	uint32_t fwd_cnt, fwd_told;			/* what we consumed, and last told */
	uint32_t ring_head, ring_len;			/* echo data waiting to go back */
	uint32_t peer_shut;
	int credit_asked;
	uint64_t got, sent, to_send, sum_in, t0;
	uint8_t ring[VS_BUF_ALLOC];
};

static struct vdev vs;
static uint64_t vs_cid;
static uint8_t vs_rxbuf[QSZ][VS_RX_BUF] __attribute__((aligned(64)));
static uint8_t vs_txbuf[VS_TX_SLOTS][VS_HDR + VS_TX_DATA] __attribute__((aligned(64)));
static uint32_t vs_evbuf[VS_EV_BUFS];
static uint16_t vs_tx_free[VS_TX_SLOTS];
static unsigned vs_tx_nfree, vs_split;
static struct vs_conn vs_conns[VS_MAX_CONN];
static uint32_t vs_next_port = 1024;
static struct {
	uint64_t resets, done, refused, overrun, bad, hostile_rst, tx_stalls;
} vs_stat;
static int vs_ready;

/* One instruction per copy, where a byte loop costs the most under instruction emulation. */
static void vs_copy(void *d, const void *s, size_t n)
{
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) :: "memory");
}

/* What the guest sends the host: byte i is (i * 31) ^ (i >> 9), which repeats every 2^17. */
#define VS_PATTERN (1u << 17)
static uint8_t vs_pattern_table[VS_PATTERN];
static void vs_fill_pattern(void)
{
	for (uint32_t i = 0; i < VS_PATTERN; i++)
		vs_pattern_table[i] = (uint8_t)((i * 31) ^ (i >> 9));
}
static uint64_t fnv(uint64_t h, const uint8_t *p, size_t n)
{
	while (n--) {
		h ^= *p++;
		h *= 0x100000001b3ull;
	}
	return h;
}
#define FNV_INIT 0xcbf29ce484222325ull

/* The host's credit for `c`: bytes it can take now. */
static uint32_t vs_credit(struct vs_conn *c)
{
	uint32_t in_flight = c->tx_cnt - c->peer_fwd_cnt;
	return in_flight > c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_flight;
}

static void vs_reclaim(void)
{
	uint32_t id, len;
	while (vq_used(&vs, VS_TXQ, &id, &len))
		if (id / 2 < VS_TX_SLOTS)
			vs_tx_free[vs_tx_nfree++] = (uint16_t)(id / 2);
}

/* Queues one packet: `hdr` and `len` bytes of `data`, in one descriptor or (every other
 * packet, and always with `split`) a header descriptor and a data descriptor. `wflag` makes
 * the data descriptor device-writable (a hostile probe); `in_place` points the data
 * descriptor at `data` itself, which must stay as it is (static data). Returns 0 when no
 * slot frees up. */
static int vs_queue_at(const struct vs_hdr *hdr, const void *data, uint32_t len, int split, uint16_t wflag, int in_place)
{
	for (unsigned i = 0; !vs_tx_nfree; i++) {
		if (i > 50000000) {
			vs_stat.tx_stalls++;
			return 0;
		}
		__asm__ volatile("pause");
		vs_reclaim();
	}
	uint16_t s = vs_tx_free[--vs_tx_nfree], d = (uint16_t)(2 * s);
	uint8_t *b = vs_txbuf[s];
	vs_copy(b, hdr, VS_HDR);
	if (len > VS_TX_DATA && !in_place)
		len = VS_TX_DATA;
	if (data && len && !in_place)
		vs_copy(b + VS_HDR, data, len);
	if (in_place || split || (vs_split++ & 1)) {
		uint64_t at = in_place ? (uint64_t)data : (uint64_t)b + VS_HDR;
		vs.q[VS_TXQ].desc[d] = (struct virtq_desc){ (uint64_t)b, VS_HDR, len ? VRING_DESC_F_NEXT : 0, (uint16_t)(d + 1) };
		vs.q[VS_TXQ].desc[d + 1] = (struct virtq_desc){ at, len, wflag, 0 };
	} else {
		vs.q[VS_TXQ].desc[d] = (struct virtq_desc){ (uint64_t)b, VS_HDR + len, 0, 0 };
	}
	vq_publish(&vs, VS_TXQ, d, 0);
	if (!(*(volatile uint16_t *)&vs.q[VS_TXQ].used.flags & 1))
		vw(&vs, 0x50, VS_TXQ);
	return 1;
}

static int vs_queue(const struct vs_hdr *hdr, const void *data, uint32_t len, int split, uint16_t wflag)
{
	return vs_queue_at(hdr, data, len, split, wflag, 0);
}

/* Sends `op` on connection `c`, with its credit; `in_place` as vs_queue_at. */
static int vs_send_at(struct vs_conn *c, uint16_t op, uint32_t flags, const void *data, uint32_t len, int in_place)
{
	struct vs_hdr h = { vs_cid, VS_HOST_CID, c->local_port, c->peer_port, len, 1, op, flags, VS_BUF_ALLOC, c->fwd_cnt };
	if (!vs_queue_at(&h, data, len, 0, 0, in_place))
		return 0;
	c->fwd_told = c->fwd_cnt;
	c->tx_cnt += len;
	return 1;
}

static int vs_send(struct vs_conn *c, uint16_t op, uint32_t flags, const void *data, uint32_t len)
{
	return vs_send_at(c, op, flags, data, len, 0);
}

/* An RST answering a packet no socket takes. */
static void vs_rst(const struct vs_hdr *to)
{
	struct vs_hdr h = { vs_cid, VS_HOST_CID, to->dst_port, to->src_port, 0, 1, VS_OP_RST, 0, 0, 0 };
	vs_queue(&h, 0, 0, 0, 0);
}

static struct vs_conn *vs_find(uint32_t local, uint32_t peer)
{
	for (int i = 0; i < VS_MAX_CONN; i++)
		if (vs_conns[i].state != VS_FREE && vs_conns[i].local_port == local && vs_conns[i].peer_port == peer)
			return &vs_conns[i];
	return 0;
}

static struct vs_conn *vs_new(uint32_t local, uint32_t peer, int echo)
{
	for (int i = 0; i < VS_MAX_CONN; i++) {
		struct vs_conn *c = &vs_conns[i];
		if (c->state == VS_FREE) {
			memset(c, 0, sizeof(*c) - sizeof(c->ring));
			c->local_port = local;
			c->peer_port = peer;
			c->echo = echo;
			c->sum_in = FNV_INIT;
			c->t0 = now_us();
			return c;
		}
	}
	return 0;
}

/* Connects to host port `port` to send it `bytes` of the pattern. */
static struct vs_conn *vs_connect(uint32_t port, uint64_t bytes)
{
	struct vs_conn *c = vs_new(vs_next_port++, port, 0);
	if (!c)
		return 0;
	c->to_send = bytes;
	c->state = VS_CONNECTING;
	vs_send(c, VS_OP_REQUEST, 0, 0, 0);
	return c;
}

static void vs_close(struct vs_conn *c, const char *how)
{
	uint64_t us = now_us() - c->t0;
	if (c->echo == 2)
		;
	else if (c->echo)
		printf("vsock: echo port %u %s: %lu bytes in, %lu out, fnv %lx, %lu us\n", c->peer_port, how, c->got, c->sent, c->sum_in, us);
	else
		printf("vsock: to host port %u %s: %lu bytes sent, %lu us\n", c->peer_port, how, c->sent, us);
	c->state = VS_FREE;
}

/* One packet from the device. */
static void vs_packet(const struct vs_hdr *h, const uint8_t *data, uint32_t len)
{
	if (h->src_cid != VS_HOST_CID || h->dst_cid != vs_cid || h->type != 1 || h->len != len) {
		vs_stat.bad++;
		return;
	}
	if (h->dst_port >= VS_HOSTILE_PORT && h->dst_port < VS_HOSTILE_PORT + 2000) {
		vs_stat.hostile_rst += h->op == VS_OP_RST;
		return;
	}
	struct vs_conn *c = vs_find(h->dst_port, h->src_port);
	if (!c) {
		int kind = h->dst_port == 52 ? 1 : h->dst_port == 54 ? 2 : 0;
		if (h->op == VS_OP_REQUEST && kind && (c = vs_new(h->dst_port, h->src_port, kind))) {
			c->state = VS_OPEN;
			c->peer_buf_alloc = h->buf_alloc;
			c->peer_fwd_cnt = h->fwd_cnt;
			vs_send(c, VS_OP_RESPONSE, 0, 0, 0);
		} else if (h->op != VS_OP_RST) {
			vs_rst(h);
		}
		return;
	}
	c->peer_buf_alloc = h->buf_alloc;
	c->peer_fwd_cnt = h->fwd_cnt;
	c->credit_asked = 0;
	switch (h->op) {
	case VS_OP_RESPONSE:
		if (c->state == VS_CONNECTING)
			c->state = VS_OPEN;
		break;
	case VS_OP_RW:
		c->got += len;
		if (c->echo != 1) {
			/* A sink (port 54, for throughput) or a sender: taken at once, not looked at. */
			c->fwd_cnt += len;
			break;
		}
		c->sum_in = fnv(c->sum_in, data, len);
		if (len > VS_BUF_ALLOC - c->ring_len) {
			vs_stat.overrun++;
			break;
		}
		{
			uint32_t at = (c->ring_head + c->ring_len) % VS_BUF_ALLOC;
			uint32_t first = len < VS_BUF_ALLOC - at ? len : VS_BUF_ALLOC - at;
			vs_copy(c->ring + at, data, first);
			vs_copy(c->ring, data + first, len - first);
		}
		c->ring_len += len;
		break;
	case VS_OP_SHUTDOWN:
		c->peer_shut |= h->flags & VS_SHUT_BOTH;
		break;
	case VS_OP_CREDIT_REQUEST:
		vs_send(c, VS_OP_CREDIT_UPDATE, 0, 0, 0);
		break;
	case VS_OP_RST:
		if (c->state == VS_CONNECTING) {
			vs_stat.refused++;
			vs_close(c, "refused");
		} else {
			vs_stat.done += c->state == VS_CLOSING;
			vs_close(c, c->state == VS_CLOSING ? "closed" : "reset");
		}
		break;
	default:
		break;
	}
}

/* Sends what connection `c` has to send, as far as the host's credit and free slots go. */
static int vs_pump(struct vs_conn *c)
{
	int work = 0;
	if (c->state != VS_OPEN)
		return 0;
	for (;;) {
		uint32_t credit = vs_credit(c), n;
		if (!vs_tx_nfree)
			vs_reclaim();
		if (!vs_tx_nfree)
			break;
		if (c->echo == 1 && c->ring_len) {
			n = c->ring_len;
			if (n > VS_BUF_ALLOC - c->ring_head)
				n = VS_BUF_ALLOC - c->ring_head;
			if (n > VS_TX_DATA)
				n = VS_TX_DATA;
		} else if (!c->echo && c->sent < c->to_send) {
			/* Sent in place from the pattern table: packets up to the 64 KiB maximum. */
			n = c->to_send - c->sent > 65536 ? 65536 : (uint32_t)(c->to_send - c->sent);
		} else {
			break;
		}
		if (n > credit)
			n = credit;
		if (!n) {
			if (!c->credit_asked) {
				c->credit_asked = 1;
				vs_send(c, VS_OP_CREDIT_REQUEST, 0, 0, 0);
			}
			break;
		}
		const uint8_t *src;
		if (c->echo) {
			src = c->ring + c->ring_head;
		} else {
			/* The pattern repeats every VS_PATTERN bytes: sent from the table. */
			uint32_t at = (uint32_t)(c->sent % VS_PATTERN);
			if (n > VS_PATTERN - at)
				n = VS_PATTERN - at;
			src = vs_pattern_table + at;
		}
		if (c->echo) {
			/* Consumed once it is sent: the header carries the new fwd_cnt. */
			c->fwd_cnt += n;
		}
		if (!vs_send_at(c, VS_OP_RW, 0, src, n, !c->echo)) {
			if (c->echo)
				c->fwd_cnt -= n;
			break;
		}
		c->sent += n;
		if (c->echo) {
			c->ring_head = (c->ring_head + n) % VS_BUF_ALLOC;
			c->ring_len -= n;
		}
		work = 1;
	}
	if (c->fwd_cnt - c->fwd_told >= VS_BUF_ALLOC / 2 && vs_send(c, VS_OP_CREDIT_UPDATE, 0, 0, 0))
		work = 1;
	int finished = c->echo ? (c->peer_shut & 2) && !c->ring_len : c->sent == c->to_send;
	if (finished && c->echo == 2)
		printf("vsock: sink port %u: %lu bytes in %lu us\n", c->peer_port, c->got, now_us() - c->t0);
	if (finished && c->peer_shut == VS_SHUT_BOTH) {
		/* The host closed altogether: it waits for our RST (virtio 1.2, 5.10.6.6). */
		if (vs_send(c, VS_OP_RST, 0, 0, 0)) {
			vs_stat.done++;
			vs_close(c, "closed");
			work = 1;
		}
	} else if (finished && vs_send(c, VS_OP_SHUTDOWN, VS_SHUT_BOTH, 0, 0)) {
		c->state = VS_CLOSING;
		work = 1;
	}
	return work;
}

static void vs_transport_reset(void)
{
	vs_stat.resets++;
	for (int i = 0; i < VS_MAX_CONN; i++)
		vs_conns[i].state = VS_FREE;
	vs_cid = (uint64_t)vr(&vs, 0x100) | ((uint64_t)vr(&vs, 0x104) << 32);
	printf("vsock: transport reset (cid %lu)\n", vs_cid);
}

/* Handles what the device used and sends what the sockets have; returns whether anything
 * happened. */
static int vs_poll(void)
{
	uint32_t id, len;
	int work = 0, refill = 0;
	vs_reclaim();
	while (vq_used(&vs, VS_RXQ, &id, &len)) {
		id %= QSZ;
		if (len >= VS_HDR && len <= VS_RX_BUF)
			vs_packet((const struct vs_hdr *)vs_rxbuf[id], vs_rxbuf[id] + VS_HDR, len - VS_HDR);
		else
			vs_stat.bad++;
		vq_publish(&vs, VS_RXQ, (uint16_t)id, 0);
		refill = work = 1;
	}
	if (refill && !(*(volatile uint16_t *)&vs.q[VS_RXQ].used.flags & 1))
		vw(&vs, 0x50, VS_RXQ);
	while (vq_used(&vs, VS_EVQ, &id, &len)) {
		id %= VS_EV_BUFS;
		if (len >= 4 && vs_evbuf[id] == 0)
			vs_transport_reset();
		vq_publish(&vs, VS_EVQ, (uint16_t)id, 1);
		work = 1;
	}
	for (int i = 0; i < VS_MAX_CONN; i++)
		work |= vs_pump(&vs_conns[i]);
	return work;
}

/* Brings the device up: CID, receive and event buffers. Returns why it failed, or 0. */
static const char *vs_start(void)
{
	const char *why;
	if (!find_virtio(VIRTIO_ID_VSOCK, &vs))
		return "no virtio-vsock device on the command line";
	memset(vs.q, 0, sizeof(vs.q));
	if ((why = virtio_init(&vs, 0, 3)))
		return why;
	vs_cid = (uint64_t)vr(&vs, 0x100) | ((uint64_t)vr(&vs, 0x104) << 32);
	for (uint16_t i = 0; i < QSZ; i++) {
		vs.q[VS_RXQ].desc[i] = (struct virtq_desc){ (uint64_t)vs_rxbuf[i], VS_RX_BUF, VRING_DESC_F_WRITE, 0 };
		vq_publish(&vs, VS_RXQ, i, i == QSZ - 1);
	}
	for (uint16_t i = 0; i < VS_EV_BUFS; i++) {
		vs.q[VS_EVQ].desc[i] = (struct virtq_desc){ (uint64_t)&vs_evbuf[i], sizeof(vs_evbuf[i]), VRING_DESC_F_WRITE, 0 };
		vq_publish(&vs, VS_EVQ, i, i == VS_EV_BUFS - 1);
	}
	vs_tx_nfree = 0;
	for (uint16_t s = 0; s < VS_TX_SLOTS; s++)
		vs_tx_free[vs_tx_nfree++] = s;
	vs_ready = 1;
	return 0;
}

/* Publishes one raw descriptor on the transmit queue: `len` bytes at `addr` (0: the slot's own
 * buffer, which holds `hdr`), with `flags`. */
static void vs_raw(const struct vs_hdr *hdr, uint64_t addr, uint32_t len, uint16_t flags)
{
	while (!vs_tx_nfree)
		vs_reclaim();
	uint16_t s = vs_tx_free[--vs_tx_nfree], d = (uint16_t)(2 * s);
	vs_copy(vs_txbuf[s], hdr, VS_HDR);
	vs.q[VS_TXQ].desc[d] = (struct virtq_desc){ addr ? addr : (uint64_t)vs_txbuf[s], len, flags, 0 };
	vq_publish(&vs, VS_TXQ, d, 1);
}

/* Packets no well-behaved driver sends, each of which Skiff must drop or answer with an RST
 * and go on serving: a chain too short for a header, lengths past the chain or past any
 * packet, an unknown operation, another socket type, another source or destination CID, data
 * and handshake replies for no connection, a device-writable buffer, memory outside the
 * guest's, and a burst of vsock_burst (default 1000) requests to a port nobody listens on.
 * Returns the RSTs expected. */
static uint64_t vs_hostile(void)
{
	uint32_t p = VS_HOSTILE_PORT;
	uint64_t expect = 0, burst = param_uint("vsock_burst", 1000);
	static const uint8_t junk[64] = { 1, 2, 3 };
	struct vs_hdr h;
#define PROBE(op_, type_, src_, dst_, len_) (h = (struct vs_hdr){ src_, dst_, p++, 9999, len_, type_, op_, 0, VS_BUF_ALLOC, 0 })
	PROBE(VS_OP_REQUEST, 1, vs_cid, VS_HOST_CID, 0); vs_raw(&h, 0, 20, 0);
	PROBE(VS_OP_RW, 1, vs_cid, VS_HOST_CID, 0xffffffff); vs_queue(&h, junk, 0, 0, 0);
	PROBE(VS_OP_RW, 1, vs_cid, VS_HOST_CID, 100); vs_queue(&h, junk, 10, 1, 0);
	PROBE(99, 1, vs_cid, VS_HOST_CID, 0); vs_queue(&h, 0, 0, 0, 0); expect++;
	PROBE(VS_OP_REQUEST, 2, vs_cid, VS_HOST_CID, 0); vs_queue(&h, 0, 0, 0, 0); expect++;
	PROBE(VS_OP_REQUEST, 1, vs_cid + 1, VS_HOST_CID, 0); vs_queue(&h, 0, 0, 0, 0);
	PROBE(VS_OP_REQUEST, 1, vs_cid, 7, 0); vs_queue(&h, 0, 0, 0, 0);
	PROBE(VS_OP_RW, 1, vs_cid, VS_HOST_CID, 3); vs_queue(&h, junk, 3, 0, 0); expect++;
	PROBE(VS_OP_RESPONSE, 1, vs_cid, VS_HOST_CID, 0); vs_queue(&h, 0, 0, 0, 0); expect++;
	PROBE(VS_OP_SHUTDOWN, 1, vs_cid, VS_HOST_CID, 0); vs_queue(&h, 0, 0, 0, 0); expect++;
	PROBE(VS_OP_CREDIT_REQUEST, 1, vs_cid, VS_HOST_CID, 0); vs_queue(&h, 0, 0, 0, 0); expect++;
	PROBE(VS_OP_RW, 1, vs_cid, VS_HOST_CID, 8); vs_queue(&h, junk, 8, 1, VRING_DESC_F_WRITE);
	PROBE(VS_OP_REQUEST, 1, vs_cid, VS_HOST_CID, 0); vs_raw(&h, 0xfff000000000ull, VS_HDR, 0);
#undef PROBE
	for (uint64_t i = 0; i < burst; i++) {
		h = (struct vs_hdr){ vs_cid, VS_HOST_CID, VS_HOSTILE_PORT + 100 + (uint32_t)(i % 1800), 9, 0, 1, VS_OP_REQUEST, 0, VS_BUF_ALLOC, 0 };
		while (!vs_tx_nfree)
			vs_poll();
		vs_queue(&h, 0, 0, 0, 0);
		expect++;
		vs_poll();
	}
	return expect;
}

/* The vsock check: a guest socket listening on port 52 echoes every connection the host
 * makes (CONNECT 52), one on port 54 takes and drops what it gets (for throughput figures);
 * with vsock_out=N it connects to host port vsock_out_port (default 53)
 * and sends N bytes of the pattern (vsock_out_conns connections, default 1). With
 * vsock_hostile=1 it first sends the hostile packets of vs_hostile. Runs until vsock_done=N
 * connections have closed in order (default: none), a key at the i8042, or vsock_secs
 * (default 60). vsock_refused=1: the outgoing connections are expected to be refused. */
static void check_vsock(void)
{
	const char *why;
	if (bench_in_ring3(check_vsock, "vsock"))
		return;
	uint64_t out = param_uint("vsock_out", 0), out_conns = param_uint("vsock_out_conns", 1);
	uint64_t done_at = param_uint("vsock_done", 0), secs = param_uint("vsock_secs", 60);
	uint32_t out_port = (uint32_t)param_uint("vsock_out_port", 53);
	int hostile = (int)param_uint("vsock_hostile", 0), refused = (int)param_uint("vsock_refused", 0);
	if ((why = vs_start())) { report("vsock", 0, why); return; }
	printf("vsock: cid %lu ready, echoing on port 52\n", vs_cid);
	uint64_t expect = 0;
	if (hostile) {
		expect = vs_hostile();
		uint64_t until = now_us() + 10000000;
		while (vs_stat.hostile_rst < expect && now_us() < until)
			vs_poll();
		printf("vsock: hostile: %lu resets back of %lu expected\n", vs_stat.hostile_rst, expect);
	}
	if (out)
		vs_fill_pattern();
	for (uint64_t i = 0; out && i < out_conns; i++)
		vs_connect(out_port, out);
	uint64_t until = now_us() + secs * 1000000;
	while (now_us() < until && !(inb(0x64) & 1)) {
		if (done_at && vs_stat.done + vs_stat.refused >= done_at)
			break;
		if (!vs_poll())
			__asm__ volatile("pause");
	}
	printf("vsock: %lu closed, %lu refused, %lu overruns, %lu bad packets, %lu resets\n",
	       vs_stat.done, vs_stat.refused, vs_stat.overrun, vs_stat.bad, vs_stat.resets);
	if (vs_stat.overrun || vs_stat.bad)
		report("vsock", 0, "the host broke the protocol");
	else if (hostile && vs_stat.hostile_rst != expect)
		report("vsock", 0, "hostile packets were not all answered");
	else if (vs_stat.tx_stalls)
		report("vsock", 0, "the transmit queue stalled");
	else if (!refused && vs_stat.refused)
		report("vsock", 0, "a connection to the host was refused");
	else if (refused && vs_stat.refused < out_conns)
		report("vsock", 0, "a connection to a host port without listener was not refused");
	else if (done_at && vs_stat.done + vs_stat.refused < done_at)
		report("vsock", 0, "connections did not all finish in time");
	else
		report("vsock", 1, 0);
}

/* ---- snapshots: a guest whose state must survive being saved and restored ---- */
#define SNAP_TEXT "SKIFF-SNAPSHOT-MARKER"
#define SNAP_CLONE_ID "SKIFF-CLONE-ID "
#define SNAP_TICK_US 50000
static volatile uint64_t snap_ticks;	/* the tick counter, in guest memory: a restore carries it on */
static uint8_t snap_marker[512] __attribute__((aligned(512)));
static uint8_t snap_sector_buf[512] __attribute__((aligned(512)));

/* The disk marker: SNAP_TEXT, the seed in decimal and a newline, then the byte
 * (uint8_t)(i * 7 + seed) at every offset i after that (the host test builds the same). */
static void snap_build_marker(uint64_t seed)
{
	size_t n = fmt_seq((char *)snap_marker, SNAP_TEXT, seed);
	snap_marker[n++] = '\n';
	for (size_t i = n; i < sizeof(snap_marker); i++)
		snap_marker[i] = (uint8_t)(i * 7 + seed);
}

/* For clones restored from one snapshot, each on its own copy of the disk: reads the identity
 * the host wrote into this copy ("SKIFF-CLONE-ID <k>" at snap_sector + 1) and writes
 * "SKIFF-CLONE-SEEN <k> tick <n>" at snap_sector + 2, flushed. Only a clone whose disk is its own
 * copy can report its own k, and only its own copy then holds that record. Returns the problem,
 * or 0; *id is the identity read, 0 when the sector holds none. */
static const char *snap_clone_tick(uint64_t sector, uint64_t tick, uint64_t *id)
{
	*id = 0;
	if (blk_request(0, sector + 1, snap_sector_buf, 512, 1) != 0)
		return "reading the clone identity failed";
	if (!starts_with((const char *)snap_sector_buf, SNAP_CLONE_ID))
		return 0;
	*id = param_uint_at((const char *)snap_sector_buf + 15);
	memset(snap_sector_buf, 0, sizeof(snap_sector_buf));
	size_t n = fmt_seq((char *)snap_sector_buf, "SKIFF-CLONE-SEEN ", *id);
	n += fmt_seq((char *)snap_sector_buf + n, " tick ", tick);
	snap_sector_buf[n] = '\n';
	if (blk_request(1, sector + 2, snap_sector_buf, 512, 0) != 0 || blk_request(4, 0, 0, 0, 0) != 0)
		return "writing the clone record failed";
	return 0;
}

/* Work whose every piece of state must come through a snapshot: "snap-tick N" every 50 ms from a
 * counter in guest memory, ticks_max (default 1200, one minute) times or until the i8042 has a
 * key (the host's SendCtrlAltDel). With a virtio-blk device it first writes the marker (see
 * snap_build_marker; param snap_seed, default 1) to sector snap_sector (default 8) and flushes,
 * then reads it back at every tick; with a virtio-net device (set up as check_net does: this
 * guest 172.30.0.2 port 5556 to the host 172.30.0.1 port 5555, or net_ip=/net_peer=) it sends
 * the datagram "snap-tick N" at every tick. At every tick the clock must not have gone back nor
 * jumped more than snap_max_gap_ms (default 10000) since the last one: a restored VM continues
 * its clock (kvmclock, or the TSC), it does not restart or leap. With snap_clone=1, every tick
 * also does snap_clone_tick. Between ticks the vCPU waits in HLT for a periodic LAPIC timer
 * (about 1 ms; KVM's APIC bus runs at 1 GHz), so many restored clones can share a few host
 * CPUs; the timer only wakes the loop, the clock paces it. Each problem is printed once as
 * it happens ("FAIL snapshot: ... at tick N"); the check then fails once, with the first. */
static void check_snapshot(void)
{
	uint64_t max = param_uint("ticks_max", 1200), seed = param_uint("snap_seed", 1);
	uint64_t sector = param_uint("snap_sector", 8), max_gap = param_uint("snap_max_gap_ms", 10000) * 1000;
	int clone = (int)param_uint("snap_clone", 0), have_blk = 0, have_net = 0;
	const char *why, *problem = 0;
	uint64_t irqs_before = device_irqs, reads = 0, sent = 0, clone_id = 0, capacity = 0;

	if (find_virtio(2, &blk)) {
		/* Fresh rings, in case an earlier check used the device. */
		memset(&blk.q[0], 0, sizeof(blk.q[0]));
		if ((why = virtio_init(&blk, (1u << 9) | (1u << 5), 1))) { report("snapshot", 0, why); return; }
		snap_build_marker(seed);
		if (blk_request(1, sector, snap_marker, sizeof(snap_marker), 0) != 0 || blk_request(4, 0, 0, 0, 0) != 0) {
			report("snapshot", 0, "writing the disk marker failed");
			return;
		}
		printf("snapshot: disk marker written at sector %lu\n", sector);
		ioapic_route(blk.irq, DEVICE_VECTOR);
		have_blk = 1;
	}
	if (find_virtio(1, &net)) {
		memset(net.q, 0, sizeof(net.q));
		net_tx_inflight = 0;
		net_tx_head = 0;
		__asm__ volatile("sti");
		why = net_start();
		__asm__ volatile("cli");
		if (why) { report("snapshot", 0, why); return; }
		have_net = 1;
	}

	/* An entropy device, polled: each tick asks it for 16 bytes. */
	int have_rng = find_virtio(4, &rngdev) && !virtio_init(&rngdev, 0, 1), rng_bad = 0;
	uint64_t rng_bytes = 0;
	/* A vsock device: its port 52 echoes the host's connections between ticks, and a
	 * restored guest prints the transport reset it gets. */
	int have_vsock = find_virtio(VIRTIO_ID_VSOCK, &vs) && !vs_start();
	if (have_vsock)
		ioapic_route(vs.irq, DEVICE_VECTOR);
	/* Hot-plugged memory that check_mem left plugged: each tick checks a word in every MiB of
	 * it and asks the device for the blocks' state. */
	int mem_bad = 0;
	/* A pmem device: each tick reads the first line of its file, printed when it changes. */
	uint64_t pmem_start = 0, pmem_size = 0;
	char pmem_line[33] = "", pmem_seen[33] = "";
	if (find_virtio(VIRTIO_ID_PMEM, &pmemdev)) {
		pmem_region(&pmemdev, &pmem_start, &pmem_size);
		if (pmem_start + pmem_size <= (uint64_t)HIGH_MAP_GIB << 30)
			map_device_memory();
		else
			pmem_start = 0;
	}

	lapic_write(0xf0, 0x1ff);
	lapic_write(0x3e0, 0xb);			/* divide by 1 */
	lapic_write(0x320, TIMER_VECTOR | (1u << 17));	/* periodic */
	lapic_write(0x380, 1000000);
	printf("snapshot: ticking (disk %s, network %s, entropy %s, vsock %s, pmem %s, hot-plugged %lu MiB)\n", have_blk ? "yes" : "no", have_net ? "yes" : "no", have_rng ? "yes" : "no", have_vsock ? "yes" : "no", pmem_start ? "yes" : "no", mem_kept >> 20);
	uint64_t now = now_us(), next = now, last = now, last_tick = now;
	int key = -1, clock_back = 0, clock_jump = 0, marker_bad = 0, io_bad = 0, tx_bad = 0;
	char payload[32];
	__asm__ volatile("sti");
	while (snap_ticks < max) {
		if (inb(0x64) & 1) {
			key = inb(0x60);
			break;
		}
		now = now_us();
		if (now < last && !clock_back++) {
			printf("FAIL snapshot: the clock went back %lu us at tick %lu\n", last - now, snap_ticks);
			problem = problem ? problem : "the clock went back";
		}
		if (now < last)
			next = now;	/* carry on rather than wait for the old time to come again */
		last = now;
		if (have_vsock)
			while (vs_poll())
				;
		if (now < next) {
			__asm__ volatile("hlt");
			continue;
		}
		uint64_t tick = snap_ticks;
		if (tick && now - last_tick > max_gap && !clock_jump++) {
			printf("FAIL snapshot: the clock jumped %lu ms at tick %lu\n", (now - last_tick) / 1000, tick);
			problem = problem ? problem : "the clock jumped between two ticks";
		}
		last_tick = now;
		printf("snap-tick %lu\n", tick);
		if (have_blk) {
			/* The capacity (virtio 1.2, 5.2.4), read again each tick: a host that swaps the
			 * disk's image shows the new one's here. */
			uint64_t now_capacity = (uint64_t)vr(&blk, 0x100) | ((uint64_t)vr(&blk, 0x104) << 32);
			if (now_capacity != capacity) {
				printf("snapshot: disk capacity %lu sectors at tick %lu\n", now_capacity, tick);
				capacity = now_capacity;
			}
			memset(snap_sector_buf, 0, sizeof(snap_sector_buf));
			if (blk_request(0, sector, snap_sector_buf, 512, 1) != 0) {
				if (!io_bad++)
					printf("FAIL snapshot: reading the disk marker failed at tick %lu\n", tick);
				problem = problem ? problem : "reading the disk marker failed";
			} else {
				reads++;
				for (size_t i = 0; i < sizeof(snap_marker); i++)
					if (snap_sector_buf[i] != snap_marker[i]) {
						if (!marker_bad++)
							printf("FAIL snapshot: disk marker differs at tick %lu\n", tick);
						problem = problem ? problem : "disk marker differs";
						break;
					}
			}
			uint64_t id;
			if (clone && (why = snap_clone_tick(sector, tick, &id))) {
				if (!io_bad++)
					printf("FAIL snapshot: %s at tick %lu\n", why, tick);
				problem = problem ? problem : why;
			} else if (clone && id != clone_id) {
				printf("snap-clone: id %lu at tick %lu\n", id, tick);
				clone_id = id;
			}
		}
		if (have_net) {
			net_poll();	/* give receive buffers back, answer the host's ARP */
			if (send_udp(payload, fmt_seq(payload, "snap-tick ", tick), 0)) {
				sent++;
			} else {
				if (!tx_bad++)
					printf("FAIL snapshot: the TX queue stalled at tick %lu\n", tick);
				problem = problem ? problem : "the TX queue stalled";
			}
		}
		if (have_rng) {
			uint32_t len = 0;
			rngdev.q[0].desc[0] = (struct virtq_desc){ (uint64_t)rng_buf[0], 16, VRING_DESC_F_WRITE, 0 };
			if (virtq_submit(&rngdev, &len) && len == 16) {
				rng_bytes += len;
			} else {
				if (!rng_bad++)
					printf("FAIL snapshot: the entropy device did not answer at tick %lu\n", tick);
				problem = problem ? problem : "the entropy device stopped answering";
			}
		}
		if (mem_kept) {
			unsigned state = 0xff, answer = mem_request(MEM_STATE, mem_addr, mem_kept / mem_block, &state);
			uint64_t wrong = 0;
			for (uint64_t a = mem_addr; a < mem_addr + mem_kept; a += 1 << 20)
				wrong += *(volatile uint64_t *)a != mem_word(a);
			if ((answer != MEM_ACK || state != MEM_PLUGGED || wrong) && !mem_bad++) {
				printf("FAIL snapshot: hot-plugged memory: state %u/%u, %lu words lost at tick %lu\n", answer, state, wrong, tick);
				problem = problem ? problem : "the hot-plugged memory changed";
			}
		}
		if (pmem_start) {
			size_t n = 0;
			for (volatile char *c = (volatile char *)pmem_start; n < 32 && c[n] && c[n] != '\n'; n++)
				pmem_line[n] = c[n];
			pmem_line[n] = 0;
			int same = 1;
			for (size_t i = 0; i <= n; i++)
				same &= pmem_line[i] == pmem_seen[i];
			if (!same || !tick) {
				printf("snap-pmem: %s at tick %lu\n", pmem_line, tick);
				memcpy(pmem_seen, pmem_line, n + 1);
			}
		}
		snap_ticks = tick + 1;
		next = now + SNAP_TICK_US;
	}
	__asm__ volatile("cli");
	lapic_write(0x320, 1u << 16);	/* timer masked */
	if (key >= 0)
		printf("snapshot: key %2x from the host after %lu ticks\n", (unsigned)key, snap_ticks);
	else
		printf("snapshot: %lu ticks done\n", snap_ticks);
	printf("snapshot: %lu marker reads, %lu datagrams sent, %lu random bytes, %lu device interrupts\n", reads, sent, rng_bytes, device_irqs - irqs_before);
	if (have_vsock) {
		printf("snapshot: vsock: %lu connections closed, %lu transport resets\n", vs_stat.done, vs_stat.resets);
		if (vs_stat.overrun || vs_stat.bad)
			problem = problem ? problem : "the vsock host broke the protocol";
	}
	report("snapshot", !problem, problem);
}

/* The cost of an exit: `exits` (default 20000) writes to port 0x2f0, then as many 32-bit writes
 * to 0xc0000000 (the start of the MMIO hole), neither of which any device uses in Skiff,
 * QEMU's microvm or Firecracker; timed with the guest's clock, in ring 3 unless bench_ring=0. */
static void check_exits(void)
{
	if (bench_in_ring3(check_exits, "exits"))
		return;
	uint64_t n = param_uint("exits", 20000), t0 = now_us();
	for (uint64_t i = 0; i < n; i++)
		outb(0x2f0, 0);
	bench_line("exit port-write", n, 0, now_us() - t0 + 1);
	t0 = now_us();
	for (uint64_t i = 0; i < n; i++)
		mmio_write32(0xc0000000UL, 0);
	bench_line("exit mmio-write", n, 0, now_us() - t0 + 1);
	report("exits", 1, 0);
}

/* What the guest's CPU says, for CPU templates: CPUID leaves `cpuid_leaf` (one decimal leaf or
 * a comma-separated list, subleaf 0 each) and MSR `msr` (read with rdmsr), printed for the host
 * to check. */
static void check_cpuinfo(void)
{
	uint32_t a, b, c, d;
	const char *v = param("cpuid_leaf");
	do {
		uint32_t leaf = v ? (uint32_t)param_uint_at(v) : 0;
		cpuid(leaf, &a, &b, &c, &d);
		printf("cpuid %x: eax=%x ebx=%x ecx=%x edx=%x\n", leaf, a, b, c, d);
		while (v && *v >= '0' && *v <= '9')
			v++;
	} while (v && *v++ == ',');
	uint32_t msr = (uint32_t)param_uint("msr", 0x1a0), lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	printf("msr %x: %lx\n", msr, ((uint64_t)hi << 32) | lo);
	report("cpuinfo", 1, 0);
}

/* Boot-progress codes 0x10-0x13; the host checks their timestamps. */
static void check_progress(void)
{
	for (uint8_t c = 0x10; c < 0x14; c++)
		progress(c);
	/* Firecracker's boot-complete code, as often as asked (a guest may repeat it at will). */
	for (uint64_t n = param_uint("boot_done", 0); n; n--)
		progress(123);
	report("progress", 1, 0);
}

static void finish(void)
{
	printf("DONE passed=%d failed=%d\n", passed, failed);
	progress(0xff);
	outb(0x64, 0xfe);		/* i8042: reset the CPU */
	outb(0xf4, failed ? 1 : 0);	/* QEMU isa-debug-exit */
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* Misbehaviours on request, to test how the VMM ends a broken guest. */
static void crash(void)
{
	const char *how = param("crash");
	if (!how)
		return;
	if (starts_with(how, "mmio-exec")) {
		puts("crash: jumping into the MMIO hole\n");
		((void (*)(void))0xc0000000UL)();
	} else if (starts_with(how, "triple-fault")) {
		puts("crash: triple fault\n");
		struct { uint16_t limit; uint64_t base; } __attribute__((packed)) d = { 0, 0 };
		__asm__ volatile("lidt %0; xorl %%ecx, %%ecx; divl %%ecx" :: "m"(d) : "eax", "ecx", "edx");
	} else if (starts_with(how, "fwait")) {
		puts("crash: fwait\n");
		__asm__ volatile("fwait");
	}
}

static void copy_cmdline(uint64_t paddr)
{
	const char *c = (const char *)(uintptr_t)paddr;
	for (size_t i = 0; paddr && i < sizeof(cmdline) - 1 && c[i]; i++)
		cmdline[i] = c[i];
}

static void run_checks(const char *protocol)
{
	/* Mask the legacy PICs: interrupts come through the IOAPIC and LAPIC only. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	idt_init();
	lapic_write(0xf0, 0x1ff);	/* software-enable the local APIC */
	printf("skiff-testguest: %s boot, cmdline '%s'\n", protocol, cmdline);
	crash();
	if (wants("e820")) check_e820();
	if (wants("smp")) check_smp();
	if (wants("cpuinfo")) check_cpuinfo();
	if (wants("timer")) check_timer();
	if (wants("progress")) check_progress();
	if (wants("ring3")) check_ring3();
	if (wants("blk")) check_blk();
	if (wants("hostile")) check_hostile();
	if (wants("blkdeep")) check_blkdeep();
	if (wants("blkreset")) check_blkreset();
	if (wants("pcihostile")) check_pcihostile();
	if (wants("net")) check_net();
	if ((wants("mmds") || wants("blkbench") || wants("blkrate") || wants("netbench") || wants("ctrlaltdel") || wants("exits") || wants("ticks") || wants("snapshot") || wants("rng") || wants("vsock") || wants("balloon") || wants("pmem") || wants("mem")) && !tsc_calibrate())
		report("tsc", 0, "cannot calibrate the TSC against the PIT");
	else {
		if (wants("blkbench")) check_blkbench();
		if (wants("blkrate")) check_blkrate();
		if (wants("mmds")) check_mmds();
		if (wants("netbench")) check_netbench();
		if (wants("exits")) check_exits();
		if (wants("insns")) check_insns();
		if (wants("rng")) check_rng();
		if (wants("vsock")) check_vsock();
		if (wants("balloon")) check_balloon();
		if (wants("pmem")) check_pmem();
		if (wants("mem")) check_mem();
		if (wants("ticks")) check_ticks();
		if (wants("snapshot")) check_snapshot();
		if (wants("ctrlaltdel")) check_ctrlaltdel();
	}
	if (wants("serial")) check_serial();
	finish();
}

/* PVH entry: %ebx pointed at hvm_start_info. */
void guest_main(uint32_t start_info)
{
	struct hvm_start_info *si = (struct hvm_start_info *)(uintptr_t)start_info;
	progress(0x02);
	serial_init();
	if (si->magic != 0x336ec578) {
		puts("FAIL boot: bad hvm_start_info magic\n");
		failed++;
		finish();
	}
	copy_cmdline(si->cmdline_paddr);
	memmap_entries = si->memmap_entries < 128 ? si->memmap_entries : 128;
	memcpy(memmap, (void *)(uintptr_t)si->memmap_paddr, memmap_entries * sizeof(memmap[0]));
	run_checks("pvh");
}

/* Linux 64-bit boot protocol entry: boot_params (Documentation/x86/zero-page.rst). */
void guest_main_linux(uint64_t boot_params)
{
	const uint8_t *bp = (const uint8_t *)(uintptr_t)boot_params;
	progress(0x02);
	serial_init();
	if (*(const uint32_t *)(bp + 0x202) != 0x53726448) {
		puts("FAIL boot: boot_params header lacks HdrS\n");
		failed++;
		finish();
	}
	copy_cmdline(*(const uint32_t *)(bp + 0x228));
	uint8_t n = bp[0x1e8];
	memmap_entries = n < 128 ? n : 128;
	for (uint32_t i = 0; i < memmap_entries; i++) {
		const uint8_t *e = bp + 0x2d0 + 20 * i;
		memmap[i].addr = *(const uint64_t *)e;
		memmap[i].size = *(const uint64_t *)(e + 8);
		memmap[i].type = *(const uint32_t *)(e + 16);
	}
	run_checks("linux64");
}
