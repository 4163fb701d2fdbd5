/*
 * Skiff test guest: a freestanding PVH kernel that runs the checks named on its command line
 * and reports one PASS/FAIL line per check on COM1, then resets through the i8042 (and, for
 * VMMs without one, writes to QEMU's isa-debug-exit port 0xf4).
 *
 * Command line: checks=serial,e820,smp,timer,progress,blk,net,mmds,rng,snapshot mem=<MiB> cpus=<N>, and
 * the parameters each check describes
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
	struct { uint16_t limit; uint64_t base; } __attribute__((packed)) d = { sizeof(idt) - 1, (uint64_t)idt };
	__asm__ volatile("lidt %0" :: "m"(d));
}

static void lapic_write(uint32_t reg, uint32_t v) { mmio_write32(LAPIC_BASE + reg, v); }
static uint32_t lapic_read(uint32_t reg) { return mmio_read32(LAPIC_BASE + reg); }

static void finish(void);

void interrupt_handler(uint64_t vector, uint64_t error, uint64_t rip)
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
	printf("FAIL exception: vector %lu error %lx at rip %lx\n", vector, error, rip);
	failed++;
	finish();
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
static void check_smp(void)
{
	uint64_t want = param_uint("cpus", 1);
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

struct vdev {
	uintptr_t base;
	unsigned irq;
	struct vq q[2];
};
static uint32_t vr(struct vdev *d, uint32_t off) { return mmio_read32(d->base + off); }
static void vw(struct vdev *d, uint32_t off, uint32_t v) { mmio_write32(d->base + off, v); }

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

/* Finds the n-th virtio_mmio.device=<size>@<base>:<irq> entry whose device has `id`. */
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
			return 1;
		}
	}
	return 0;
}

static void ioapic_route(unsigned pin, uint8_t vector)
{
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

/* ---- virtio-net (virtio 1.2, 5.1) ---- */
#define NET_RXQ 0
#define NET_TXQ 1
#define NET_BUF 2048
#define VNET_HDR 12
#define VIRTIO_NET_F_CSUM 0
#define VIRTIO_NET_F_GUEST_CSUM 1
#define VIRTIO_NET_F_MAC 5
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
static struct {
	uint64_t frames, udp, partial, bad_csum, bad_frame, arp_replies;
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
	/* Without MRG_RXBUF, num_buffers must be 1 (virtio 1.2, 5.1.6.4); QEMU leaves it 0. */
	if (len < VNET_HDR + 14 || len > NET_BUF || h->num_buffers > 1) {
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
		if (seq < sizeof(rx.seen) * 8 && !(rx.seen[seq / 8] & (1u << (seq % 8)))) {
			rx.seen[seq / 8] |= (uint8_t)(1u << (seq % 8));
		}
		rx.got++;
	}
}

/* Handles every received frame and gives its buffer back; returns how many there were. */
static unsigned net_poll(void)
{
	uint32_t id, len;
	unsigned n = 0;
	while (vq_used(&net, NET_RXQ, &id, &len)) {
		if (id < QSZ)
			net_frame(net_rx_buf[id], len);
		net.q[NET_RXQ].desc[id % QSZ] = (struct virtq_desc){ (uint64_t)net_rx_buf[id % QSZ], NET_BUF, VRING_DESC_F_WRITE, 0 };
		vq_publish(&net, NET_RXQ, (uint16_t)(id % QSZ), 0);
		n++;
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
	if ((why = virtio_init(&net, (1u << VIRTIO_NET_F_CSUM) | (1u << VIRTIO_NET_F_GUEST_CSUM) | (1u << VIRTIO_NET_F_MAC), 2)))
		return why;
	vw(&net, 0x14, 0);
	if (vr(&net, 0x10) & (1u << VIRTIO_NET_F_MAC))
		for (int i = 0; i < 6; i++)
			my_mac[i] = *(volatile uint8_t *)(net.base + 0x100 + (uintptr_t)i);
	printf("net: mac %2x:%2x:%2x:%2x:%2x:%2x, irq %u\n", my_mac[0], my_mac[1], my_mac[2], my_mac[3], my_mac[4], my_mac[5], net.irq);
	ioapic_route(net.irq, DEVICE_VECTOR);
	for (uint16_t i = 0; i < QSZ; i++) {
		net.q[NET_RXQ].desc[i] = (struct virtq_desc){ (uint64_t)net_rx_buf[i], NET_BUF, VRING_DESC_F_WRITE, 0 };
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
			bench_hdr[s] = (struct blk_req){ type, 0, block * (len / 512) };
			bench_status[s] = 0xee;
			uint16_t d = (uint16_t)(3 * s);
			q->desc[d] = (struct virtq_desc){ (uint64_t)&bench_hdr[s], sizeof(struct blk_req), VRING_DESC_F_NEXT, (uint16_t)(d + 1) };
			q->desc[d + 1] = (struct virtq_desc){ BENCH_BUF + (uint64_t)s * 65536, len, (uint16_t)(VRING_DESC_F_NEXT | (type == 0 ? VRING_DESC_F_WRITE : 0)), (uint16_t)(d + 2) };
			q->desc[d + 2] = (struct virtq_desc){ (uint64_t)&bench_status[s], 1, VRING_DESC_F_WRITE, 0 };
			vq_publish(&blk, 0, d, 0);
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

/* Sequential read and write (64 KiB requests, 8 in flight; the write ends with a flush) and
 * 4 KiB random reads at queue depth 1 and 32. Parameters: bench_mib=, bench_ios=. */
static void check_blkbench(void)
{
	const char *why;
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
	uint64_t irqs_before = device_irqs, reads = 0, sent = 0, clone_id = 0;

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

	lapic_write(0xf0, 0x1ff);
	lapic_write(0x3e0, 0xb);			/* divide by 1 */
	lapic_write(0x320, TIMER_VECTOR | (1u << 17));	/* periodic */
	lapic_write(0x380, 1000000);
	printf("snapshot: ticking (disk %s, network %s, entropy %s)\n", have_blk ? "yes" : "no", have_net ? "yes" : "no", have_rng ? "yes" : "no");
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
	report("snapshot", !problem, problem);
}

/* The cost of an exit: `exits` (default 20000) writes to port 0x2f0, which no device uses in
 * Skiff, QEMU's microvm or Firecracker, timed with the TSC. */
static void check_exits(void)
{
	uint64_t n = param_uint("exits", 20000), t0 = now_us();
	for (uint64_t i = 0; i < n; i++)
		outb(0x2f0, 0);
	bench_line("exit port-write", n, 0, now_us() - t0 + 1);
	report("exits", 1, 0);
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
	if (wants("timer")) check_timer();
	if (wants("progress")) check_progress();
	if (wants("blk")) check_blk();
	if (wants("hostile")) check_hostile();
	if (wants("net")) check_net();
	if ((wants("mmds") || wants("blkbench") || wants("blkrate") || wants("netbench") || wants("ctrlaltdel") || wants("exits") || wants("ticks") || wants("snapshot") || wants("rng")) && !tsc_calibrate())
		report("tsc", 0, "cannot calibrate the TSC against the PIT");
	else {
		if (wants("blkbench")) check_blkbench();
		if (wants("blkrate")) check_blkrate();
		if (wants("mmds")) check_mmds();
		if (wants("netbench")) check_netbench();
		if (wants("exits")) check_exits();
		if (wants("rng")) check_rng();
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
