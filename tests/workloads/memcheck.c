/*
 * memcheck: a memory workload that checks itself (in the manner of CRIU's zdtm tests).
 *
 * Usage: memcheck SIZE_MIB SEED READY_FILE RESULT_FILE
 *
 * Maps SIZE_MIB of anonymous private memory and fills every 4 KiB page with a pattern that
 * depends on SEED and the page's index: word 0 = "MEMCHECK", word 1 = page index, words 2..511 =
 * mix(SEED, index, word). Then writes "ready pages=N pid=P" to READY_FILE (via rename, so a reader
 * never sees a partial line) and waits. Each SIGUSR1 verifies every page and appends
 * "check#K ok=N bad=M first_bad=I" to RESULT_FILE (I = -1 when none is bad).
 *
 * No file stays open between checks (CRIU checks the sizes of open files at restore). Built by the
 * integration tests with `gcc -O2`.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / 8)
#define MAGIC 0x4b434548434d454dULL /* "MEMCHECK" little-endian */

static volatile sig_atomic_t check_requested;

static void on_usr1(int sig)
{
	(void)sig;
	check_requested = 1;
}

static uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static uint64_t expected(uint64_t seed, uint64_t idx, uint64_t w)
{
	if (w == 0)
		return MAGIC;
	if (w == 1)
		return idx;
	return mix(seed ^ (idx * WORDS + w));
}

static int write_file(const char *path, const char *text, int append)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : O_TRUNC), 0644);
	if (fd < 0)
		return -1;
	size_t len = strlen(text);
	ssize_t n = write(fd, text, len);
	if (close(fd) != 0 || n != (ssize_t)len)
		return -1;
	return 0;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: %s SIZE_MIB SEED READY_FILE RESULT_FILE\n", argv[0]);
		return 2;
	}
	unsigned long npages = strtoul(argv[1], NULL, 10) * (1UL << 20) / PAGE;
	uint64_t seed = strtoull(argv[2], NULL, 0);
	const char *ready = argv[3], *result = argv[4];

	uint64_t *mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	for (unsigned long i = 0; i < npages; i++)
		for (unsigned long w = 0; w < WORDS; w++)
			mem[i * WORDS + w] = expected(seed, i, w);

	sigset_t usr1, old;
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	sigprocmask(SIG_BLOCK, &usr1, &old);
	struct sigaction sa = { .sa_handler = on_usr1 };
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL) != 0) {
		perror("sigaction");
		return 1;
	}

	char line[256], tmp[4096];
	snprintf(line, sizeof(line), "ready pages=%lu pid=%d\n", npages, (int)getpid());
	snprintf(tmp, sizeof(tmp), "%s.tmp", ready);
	if (write_file(tmp, line, 0) != 0 || rename(tmp, ready) != 0) {
		perror("ready file");
		return 1;
	}

	for (unsigned long round = 1;; round++) {
		while (!check_requested)
			sigsuspend(&old);
		check_requested = 0;
		unsigned long ok = 0, bad = 0;
		long first_bad = -1;
		for (unsigned long i = 0; i < npages; i++) {
			int good = 1;
			for (unsigned long w = 0; w < WORDS; w++)
				if (mem[i * WORDS + w] != expected(seed, i, w)) {
					good = 0;
					break;
				}
			if (good) {
				ok++;
			} else {
				if (first_bad < 0)
					first_bad = (long)i;
				bad++;
			}
		}
		snprintf(line, sizeof(line), "check#%lu ok=%lu bad=%lu first_bad=%ld\n", round, ok, bad,
			 first_bad);
		if (write_file(result, line, 1) != 0) {
			perror("result file");
			return 1;
		}
	}
}
