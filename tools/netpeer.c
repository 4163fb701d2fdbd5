/*
 * The host side of tools/bench's network rows, in C so the host is never the
 * bottleneck being measured.
 *
 *   netpeer guest PORT N SIZE       receive the test guest's datagrams on PORT until its end
 *                                   marker, then answer its "rx-ready" with N datagrams of SIZE
 *                                   payload bytes and an end marker
 *   netpeer tap-tx TAP MAC N SIZE   ceiling for guest->host: write N frames (checksum offloaded,
 *                                   as the guest sends them) into TAP as a VMM would, while a
 *                                   child counts them on a UDP socket
 *   netpeer tap-rx TAP N SIZE       ceiling for host->guest: send N datagrams to 172.31.0.2 while
 *                                   a child reads the frames from TAP as a VMM would
 * Every mode prints "RESULT <what> frames=N bytes=B us=T" lines.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000 + (uint64_t)t.tv_nsec / 1000;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static int udp_socket(const char *ip, int port)
{
	int s = socket(AF_INET, SOCK_DGRAM, 0), big = 64 << 20;
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	if (s < 0) die("socket");
	setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof(big));
	setsockopt(s, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof(big));
	inet_pton(AF_INET, ip, &a.sin_addr);
	if (bind(s, (struct sockaddr *)&a, sizeof(a)) < 0) die("bind");
	return s;
}

static int recv_timeout(int s, char *buf, size_t len, struct sockaddr_in *from, int ms)
{
	struct pollfd p = { .fd = s, .events = POLLIN };
	if (poll(&p, 1, ms) <= 0) return -1;
	socklen_t fl = sizeof(*from);
	return (int)recvfrom(s, buf, len, 0, (struct sockaddr *)from, &fl);
}

/* Counts datagrams starting with `prefix` until one starting with `end`; times first to last. */
static void count_datagrams(int s, const char *what, const char *prefix, const char *end)
{
	char buf[2048];
	struct sockaddr_in from;
	uint64_t n = 0, bytes = 0, first = 0, last = 0;
	for (;;) {
		int r = recv_timeout(s, buf, sizeof(buf), &from, 20000);
		if (r < 0) break;
		if (!strncmp(buf, end, strlen(end))) break;
		if (strncmp(buf, prefix, strlen(prefix))) continue;
		last = now_us();
		if (!n) first = last;
		n++;
		bytes += (uint64_t)r;
	}
	printf("RESULT %s frames=%lu bytes=%lu us=%lu\n", what, n, bytes, last - first + 1);
	fflush(stdout);
}

static void send_datagrams(int s, struct sockaddr_in *to, uint64_t n, size_t size, const char *what)
{
	char buf[2048];
	memset(buf, 'x', sizeof(buf));
	uint64_t t0 = now_us(), sent = 0;
	for (uint64_t i = 0; i < n; i++) {
		int len = snprintf(buf, sizeof(buf), "host-net seq=%lu", i);
		buf[len] = 'x';
		while (sendto(s, buf, size, 0, (struct sockaddr *)to, sizeof(*to)) < 0) {
			if (errno != ENOBUFS && errno != EAGAIN) die("sendto");
			usleep(10);
		}
		sent++;
	}
	uint64_t us = now_us() - t0 + 1;
	for (int i = 0; i < 3; i++) {
		usleep(20000);
		sendto(s, "host-net end", 12, 0, (struct sockaddr *)to, sizeof(*to));
	}
	printf("RESULT %s frames=%lu bytes=%lu us=%lu\n", what, sent, sent * size, us);
	fflush(stdout);
}

static int tap_open(const char *name)
{
	struct ifreq ifr = { 0 };
	int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC), hdr = 12;
	if (fd < 0) die("open /dev/net/tun");
	strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
	ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
	if (ioctl(fd, TUNSETIFF, &ifr) < 0) die("TUNSETIFF");
	if (ioctl(fd, TUNSETVNETHDRSZ, &hdr) < 0) die("TUNSETVNETHDRSZ");
	if (ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM) < 0) die("TUNSETOFFLOAD");
	return fd;
}

static uint32_t csum_add(uint32_t sum, const uint8_t *p, size_t n)
{
	for (size_t i = 0; i + 1 < n; i += 2) sum += (uint32_t)(p[i] << 8 | p[i + 1]);
	if (n & 1) sum += (uint32_t)p[n - 1] << 8;
	return sum;
}
static uint16_t fold(uint32_t s) { while (s >> 16) s = (s & 0xffff) + (s >> 16); return (uint16_t)s; }

/* A frame from 172.31.0.2:5556 (06:00:ac:1f:00:02) to 172.31.0.1:5555 at `dst_mac`, with the
 * UDP checksum left to the host as the guest leaves it (VIRTIO_NET_HDR_F_NEEDS_CSUM). */
static size_t build_frame(uint8_t *f, const uint8_t *dst_mac, const char *payload, size_t plen, size_t size)
{
	static const uint8_t src_mac[6] = { 6, 0, 0xac, 0x1f, 0, 2 };
	memset(f, 0, 12);
	f[0] = 1;				/* NEEDS_CSUM */
	*(uint16_t *)(f + 6) = 34;		/* csum_start */
	*(uint16_t *)(f + 8) = 6;		/* csum_offset */
	uint8_t *e = f + 12, *ip = e + 14, *u = ip + 20;
	memcpy(e, dst_mac, 6); memcpy(e + 6, src_mac, 6); e[12] = 8; e[13] = 0;
	uint16_t ulen = (uint16_t)(8 + size), iplen = (uint16_t)(20 + ulen);
	memset(ip, 0, 20);
	ip[0] = 0x45; ip[2] = (uint8_t)(iplen >> 8); ip[3] = (uint8_t)iplen; ip[6] = 0x40; ip[8] = 64; ip[9] = 17;
	inet_pton(AF_INET, "172.31.0.2", ip + 12);
	inet_pton(AF_INET, "172.31.0.1", ip + 16);
	uint16_t c = (uint16_t)~fold(csum_add(0, ip, 20));
	ip[10] = (uint8_t)(c >> 8); ip[11] = (uint8_t)c;
	u[0] = 5556 >> 8; u[1] = 5556 & 0xff; u[2] = 5555 >> 8; u[3] = 5555 & 0xff;
	u[4] = (uint8_t)(ulen >> 8); u[5] = (uint8_t)ulen;
	memset(u + 8, 'x', size);
	memcpy(u + 8, payload, plen < size ? plen : size);
	uint16_t seed = fold(csum_add(0, ip + 12, 8) + 17 + ulen);
	u[6] = (uint8_t)(seed >> 8); u[7] = (uint8_t)seed;
	return 12 + 14 + iplen;
}

int main(int argc, char **argv)
{
	if (argc >= 5 && !strcmp(argv[1], "guest")) {
		int s = udp_socket("0.0.0.0", atoi(argv[2]));
		count_datagrams(s, "host-received", "skiff-net seq=", "skiff-net end");
		char buf[2048];
		struct sockaddr_in from;
		for (;;) {
			int r = recv_timeout(s, buf, sizeof(buf), &from, 20000);
			if (r < 0) { fprintf(stderr, "no rx-ready from the guest\n"); return 1; }
			if (!strncmp(buf, "skiff-net rx-ready", 18)) break;
		}
		send_datagrams(s, &from, strtoull(argv[3], 0, 10), strtoull(argv[4], 0, 10), "host-sent");
		return 0;
	}
	if (argc >= 6 && !strcmp(argv[1], "tap-tx")) {
		uint8_t mac[6], f[2048];
		uint64_t n = strtoull(argv[4], 0, 10);
		size_t size = strtoull(argv[5], 0, 10);
		sscanf(argv[3], "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &mac[0], &mac[1], &mac[2], &mac[3], &mac[4], &mac[5]);
		int tap = tap_open(argv[2]);
		int s = udp_socket("172.31.0.1", 5555);
		pid_t child = fork();
		if (child == 0) {
			count_datagrams(s, "host-received", "skiff-net seq=", "skiff-net end");
			_exit(0);
		}
		usleep(100000);
		char p[64];
		uint64_t t0 = now_us();
		for (uint64_t i = 0; i < n; i++) {
			size_t len = build_frame(f, mac, p, (size_t)snprintf(p, sizeof(p), "skiff-net seq=%lu", i), size);
			if (write(tap, f, len) < 0) die("write TAP");
		}
		uint64_t us = now_us() - t0 + 1;
		printf("RESULT tap-written frames=%lu bytes=%lu us=%lu\n", n, n * size, us);
		fflush(stdout);
		for (int i = 0; i < 3; i++) {
			usleep(20000);
			size_t len = build_frame(f, mac, "skiff-net end", 13, 13);
			if (write(tap, f, len) < 0) die("write TAP");
		}
		waitpid(child, 0, 0);
		return 0;
	}
	if (argc >= 5 && !strcmp(argv[1], "tap-rx")) {
		uint64_t n = strtoull(argv[3], 0, 10);
		size_t size = strtoull(argv[4], 0, 10);
		int tap = tap_open(argv[2]);
		pid_t child = fork();
		if (child == 0) {
			uint8_t f[70000];
			uint64_t got = 0, bytes = 0, first = 0, last = 0;
			struct pollfd p = { .fd = tap, .events = POLLIN };
			while (poll(&p, 1, 20000) > 0) {
				ssize_t r = read(tap, f, sizeof(f));
				if (r < 12 + 14 + 28 || f[12 + 12] != 8 || f[12 + 14 + 9] != 17) continue;
				const char *pl = (const char *)f + 12 + 14 + 28;
				if (!strncmp(pl, "host-net end", 12)) break;
				if (strncmp(pl, "host-net seq=", 13)) continue;
				last = now_us();
				if (!got) first = last;
				got++;
				bytes += (uint64_t)r - 12 - 14 - 28;
			}
			printf("RESULT tap-read frames=%lu bytes=%lu us=%lu\n", got, bytes, last - first + 1);
			fflush(stdout);
			_exit(0);
		}
		usleep(100000);
		int s = udp_socket("172.31.0.1", 5555);
		struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(5556) };
		inet_pton(AF_INET, "172.31.0.2", &to.sin_addr);
		send_datagrams(s, &to, n, size, "host-sent");
		waitpid(child, 0, 0);
		return 0;
	}
	fprintf(stderr, "usage: see the comment at the top of netpeer.c\n");
	return 2;
}
