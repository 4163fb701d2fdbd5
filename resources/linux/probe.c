/*
 * skiff-probe: small checks run inside the Linux guest (static, in both of its images).
 *
 *   skiff-probe avx     AVX as the CPU reports it to user mode, as the guest kernel manages it
 *                       (its /proc/cpuinfo flags) and as glibc's string functions will use it
 *   skiff-probe costs   what a system call, an anonymous page fault and fork+exec+wait cost
 */
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/platform/x86.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cpuid.h>

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

int main(int argc, char **argv)
{
	if (argc == 2 && !strcmp(argv[1], "avx"))
		return avx();
	if (argc == 2 && !strcmp(argv[1], "costs"))
		return costs();
	fprintf(stderr, "usage: skiff-probe avx|costs\n");
	return 2;
}
