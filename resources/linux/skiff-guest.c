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
	fprintf(stderr, "usage: skiff-guest exec CMD [ARG...] | avx | costs | forge-syscall ADDR\n");
	return 2;
}
