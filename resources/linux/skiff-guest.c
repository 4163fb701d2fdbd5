/*
 * skiff-guest: small tools of Skiff's Linux guest (static, in both of its images).
 *
 *   skiff-guest exec CMD [ARG...]    runs CMD with SIGINT and SIGQUIT back to their defaults
 *                                    (init starts its command in the background, where the
 *                                    shell ignores both, and Ctrl-C must work in it)
 *   skiff-guest avx                  AVX as the CPU reports it to user mode, as the guest
 *                                    kernel manages it (its /proc/cpuinfo flags) and as
 *                                    glibc's string functions will use it
 *   skiff-guest costs                what a system call, an anonymous page fault and
 *                                    fork+exec+wait cost
 *   skiff-guest forge-syscall ADDR   jumps to ADDR (the kernel's entry_SYSCALL_64) from user
 *                                    mode with a system call's registers set up, as no
 *                                    SYSCALL instruction would: the kernel must answer
 *                                    SIGSEGV, not run a system call
 *   skiff-guest vsock-send PORT N    connects to the host (CID 2) on vsock PORT and sends N
 *                                    bytes of the test guest's pattern, byte i being
 *                                    (i * 31) ^ (i >> 9), then its end of stream
 *   skiff-guest vsock-echo PORT      listens on vsock PORT and echoes one connection
 *   skiff-guest hold MIB SECONDS     writes every page of MIB MiB of anonymous memory, says
 *                                    so, keeps it SECONDS seconds and frees it (the balloon's
 *                                    statistics watch the guest's free memory fall meanwhile)
 */
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/platform/x86.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cpuid.h>
#include <errno.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>

/* Whether the kernel lists `flag` among the boot CPU's flags. */
static int kernel_flag(const char *flag)
{
	char line[4096];
	FILE *f = fopen("/proc/cpuinfo", "r");
	int found = 0;

	if (!f)
		return -1;
	while (!found && fgets(line, sizeof(line), f)) {
		if (strncmp(line, "flags", 5))
			continue;
		for (char *w = strtok(strchr(line, ':') + 1, " \n"); w; w = strtok(NULL, " \n"))
			found |= !strcmp(w, flag);
		break;
	}
	fclose(f);
	return found;
}

static int avx(void)
{
	unsigned int a, b, c, d;

	__cpuid(1, a, b, c, d);
	printf("avx: cpuid=%u kernel=%d glibc=%d\n", (c >> 28) & 1, kernel_flag("avx"),
	       CPU_FEATURE_ACTIVE(AVX) ? 1 : 0);
	printf("avx2: kernel=%d glibc=%d\n", kernel_flag("avx2"), CPU_FEATURE_ACTIVE(AVX2) ? 1 : 0);
	return 0;
}

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static int costs(void)
{
	const int calls = 2000, pages = 200, forks = 10;
	char *m;
	double t;

	t = now();
	for (int i = 0; i < calls; i++)
		syscall(SYS_getppid);
	printf("cost: system call %.1f us\n", (now() - t) / calls * 1e6);

	m = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		return 1;
	t = now();
	for (int i = 0; i < pages; i++)
		m[i * 4096] = 1;
	printf("cost: anonymous page fault %.1f us\n", (now() - t) / pages * 1e6);

	t = now();
	for (int i = 0; i < forks; i++) {
		pid_t p = fork();

		if (p == 0) {
			execl("/bin/true", "true", (char *)NULL);
			_exit(127);
		}
		if (p < 0 || waitpid(p, NULL, 0) != p)
			return 1;
	}
	printf("cost: fork+exec+wait %.1f ms\n", (now() - t) / forks * 1e3);
	return 0;
}

static sigjmp_buf forge_jump;

static void forge_segv(int sig)
{
	(void)sig;
	siglongjmp(forge_jump, 1);
}

static int forge_syscall(const char *addr)
{
	unsigned long target = strtoul(addr, NULL, 0);
	unsigned long flags;
	long ret;

	signal(SIGSEGV, forge_segv);
	if (sigsetjmp(forge_jump, 1)) {
		printf("forged syscall: refused (SIGSEGV)\n");
		return 0;
	}
	/*
	 * getpid's number in RAX, the return address in RCX and, in R11 (the RFLAGS that
	 * SYSRET loads), IOPL 3: what a kernel mistaking this jump for a SYSCALL would act on.
	 */
	asm volatile("lea 1f(%%rip), %%rcx\n\t"
		     "mov $0x3202, %%r11\n\t"
		     "jmp *%[target]\n"
		     "1:"
		     : "=a"(ret)
		     : "a"((long)SYS_getpid), [target] "r"(target)
		     : "rcx", "r11", "memory");
	asm volatile("pushf\n\tpop %0" : "=r"(flags));
	printf("forged syscall: ran, returned %ld, iopl %lu\n", ret, (flags >> 12) & 3);
	return 1;
}

static int vsock_send(const char *port_arg, const char *bytes_arg)
{
	static unsigned char buf[65536];
	unsigned port = (unsigned)strtoul(port_arg, NULL, 10);
	unsigned long total = strtoul(bytes_arg, NULL, 10), sent = 0;
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port };
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);
	char c;

	if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof(addr))) {
		perror("vsock-send: connect");
		return 1;
	}
	while (sent < total) {
		size_t n = total - sent < sizeof(buf) ? total - sent : sizeof(buf);
		for (size_t i = 0; i < n; i++)
			buf[i] = (unsigned char)(((sent + i) * 31) ^ ((sent + i) >> 9));
		ssize_t w = write(s, buf, n);
		if (w <= 0) {
			perror("vsock-send: write");
			return 1;
		}
		sent += (unsigned long)w;
	}
	shutdown(s, SHUT_WR);
	while (read(s, &c, 1) > 0)
		;
	close(s);
	printf("vsock-send: %lu bytes to port %u\n", sent, port);
	return 0;
}

static int vsock_echo(const char *port_arg)
{
	static char buf[65536];
	unsigned port = (unsigned)strtoul(port_arg, NULL, 10);
	unsigned long total = 0;
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
	int l = socket(AF_VSOCK, SOCK_STREAM, 0), c;
	ssize_t n;

	if (l < 0 || bind(l, (struct sockaddr *)&addr, sizeof(addr)) || listen(l, 1)) {
		perror("vsock-echo: listen");
		return 1;
	}
	printf("vsock-echo: listening on port %u\n", port);
	fflush(stdout);
	c = accept(l, NULL, NULL);
	if (c < 0) {
		perror("vsock-echo: accept");
		return 1;
	}
	while ((n = read(c, buf, sizeof(buf))) > 0) {
		for (ssize_t off = 0; off < n;) {
			ssize_t w = write(c, buf + off, (size_t)(n - off));
			if (w <= 0) {
				perror("vsock-echo: write");
				return 1;
			}
			off += w;
		}
		total += (unsigned long)n;
	}
	close(c);
	printf("vsock-echo: %lu bytes echoed\n", total);
	return 0;
}

static int hold(const char *mib_arg, const char *seconds_arg)
{
	size_t len = strtoul(mib_arg, NULL, 10) << 20;
	unsigned seconds = (unsigned)strtoul(seconds_arg, NULL, 10);
	char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (!len || m == MAP_FAILED) {
		perror("hold: mmap");
		return 1;
	}
	for (size_t i = 0; i < len; i += 4096)
		m[i] = (char)(i >> 12 | 1);
	printf("hold: %s MiB touched\n", mib_arg);
	fflush(stdout);
	sleep(seconds);
	munmap(m, len);
	printf("hold: released\n");
	return 0;
}

static int exec_command(char **argv)
{
	signal(SIGINT, SIG_DFL);
	signal(SIGQUIT, SIG_DFL);
	execvp(argv[0], argv);
	fprintf(stderr, "skiff-guest: %s: %s\n", argv[0], strerror(errno));
	return 127;
}

int main(int argc, char **argv)
{
	if (argc >= 3 && !strcmp(argv[1], "exec"))
		return exec_command(argv + 2);
	if (argc == 2 && !strcmp(argv[1], "avx"))
		return avx();
	if (argc == 2 && !strcmp(argv[1], "costs"))
		return costs();
	if (argc == 3 && !strcmp(argv[1], "forge-syscall"))
		return forge_syscall(argv[2]);
	if (argc == 4 && !strcmp(argv[1], "vsock-send"))
		return vsock_send(argv[2], argv[3]);
	if (argc == 3 && !strcmp(argv[1], "vsock-echo"))
		return vsock_echo(argv[2]);
	if (argc == 4 && !strcmp(argv[1], "hold"))
		return hold(argv[2], argv[3]);
	fprintf(stderr, "usage: skiff-guest exec CMD [ARG...] | avx | costs | forge-syscall ADDR | vsock-send PORT N | vsock-echo PORT | hold MIB SECONDS\n");
	return 2;
}
