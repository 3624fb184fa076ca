/*
 * memwriter: a self-checking memory workload for pre-copy and dirty-tracker tests.
 *
 * Allocates M MiB (one anonymous private mapping) and fills every 4 KiB page with a pattern that
 * identifies it: word 0 = MAGIC, word 1 = page index, word 2 = generation, words 3..511 =
 * v ^ (k * GOLDEN) with v = mix64(index * FNV ^ (generation << 40) ^ MAGIC). A page is therefore
 * verifiable on its own (tests/workloads/memwriter.py has the same function in Python). The
 * expected generation of every page is kept in a separate array, so a restored copy can check
 * that no page was lost or stale.
 *
 * Modes (combinable unless noted):
 *   -d RATE -t T   T writer threads rewrite random pages (generation + 1) at RATE MiB/s in total.
 *                  Thread t owns the pages with index % T == t, so generations never race.
 *   -l LOG         each writer thread t appends binary records to LOG.t: struct { u64
 *                  t_before_ns, t_after_ns (CLOCK_MONOTONIC); u32 page; u32 gen; } (24 bytes,
 *                  little-endian), flushed at every verification and on SIGTERM.
 *   -c PAGES       a churn thread keeps mapping and unmapping extra regions of 1..PAGES pages
 *                  (up to 8 alive, each lives ~1-20 ms), filled with pattern (MAGIC2).
 *   -L FIFO        lockstep (no writer threads): read commands, one per line, from FIFO and
 *                  answer each on FIFO.ack with one line:
 *                    w I J K ...   rewrite pages I, J, K (generation + 1)   -> "ack N"
 *                    r I N         rewrite pages I .. I+N-1                 -> "ack N"
 *                    map N         mmap N new pages, fill them              -> "ack 0xADDR"
 *                    sparse N STEP mmap N new pages, fill every STEP-th one   -> "ack 0xADDR"
 *                    unmap 0xADDR N                                          -> "ack 0"
 *                    drop 0xADDR N madvise(MADV_DONTNEED) N pages            -> "ack 0"
 *                    v             verify now                               -> the result line
 *                    q             exit                                     -> "ack bye"
 *   -r RESULT      on SIGUSR1 (and on the "v" command): pause writers, verify every page against
 *                  its expected generation, write "ok pages=N bad=0" or "bad pages=N bad=K
 *                  first=I" to RESULT (atomically: RESULT.tmp + rename), resume.
 *   -i INFO        once filled, write "addr=0x... size=... pages=... pid=..." to INFO (atomic).
 *   -b BEAT        every ~100 ms rewrite BEAT with "beat N writes W" (N counts up).
 *   -T TICKS       a tick thread wakes every 2 ms, reads one word of 4 random pages, and records
 *                  every gap > 20 ms between ticks measured with CLOCK_REALTIME (CLOCK_MONOTONIC
 *                  hides a CRIU freeze: the restored tree gets a time namespace); the last 64
 *                  gaps are rewritten to TICKS (atomically) as "gap START_NS END_NS" lines.
 *
 * SIGTERM/SIGINT: flush logs and exit 0. Exit status 2 on usage errors, 1 on system errors.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / 8)
#define MAGIC 0x6d656d7772697465ULL  /* "memwrite" */
#define MAGIC2 0x636875726e706167ULL /* "churnpag" */
#define GOLDEN 0x9E3779B97F4A7C15ULL
#define FNV 0x100000001B3ULL
#define MAX_THREADS 64
#define CHURN_SLOTS 8

static uint8_t *buf;
static size_t npages;
static _Atomic uint32_t *gens;
static int nthreads;
static double rate_mib;
static const char *log_path, *result_path, *info_path, *beat_path, *fifo_path, *ticks_path;
static size_t churn_pages;

static volatile sig_atomic_t got_usr1, got_term;
static atomic_int pause_req, paused, stop_all;
static atomic_uint_fast64_t total_writes;

static uint64_t mix64(uint64_t x)
{
	x += GOLDEN;
	x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
	x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
	return x ^ (x >> 31);
}

static void fill_page(uint64_t *p, uint64_t magic, uint64_t idx, uint64_t gen)
{
	uint64_t v = mix64(idx * FNV ^ (gen << 40) ^ magic);
	for (size_t k = 3; k < WORDS; k++)
		p[k] = v ^ (k * GOLDEN);
	p[0] = magic;
	p[1] = idx;
	p[2] = gen;
}

static int check_page(const uint64_t *p, uint64_t magic, uint64_t idx, uint64_t gen)
{
	if (p[0] != magic || p[1] != idx || p[2] != gen)
		return 0;
	uint64_t v = mix64(idx * FNV ^ (gen << 40) ^ magic);
	for (size_t k = 3; k < WORDS; k++)
		if (p[k] != (v ^ (k * GOLDEN)))
			return 0;
	return 1;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void sleep_ns(uint64_t ns)
{
	struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ULL),
			      .tv_nsec = (long)(ns % 1000000000ULL)};
	nanosleep(&ts, NULL);
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void write_atomic(const char *path, const char *text)
{
	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	FILE *f = fopen(tmp, "w");
	if (!f)
		die(tmp);
	fputs(text, f);
	if (fclose(f))
		die(tmp);
	if (rename(tmp, path))
		die(path);
}

/* Rewrite page idx with the next generation (caller owns the page). */
static void dirty_page(size_t idx)
{
	uint32_t g = atomic_load_explicit(&gens[idx], memory_order_relaxed) + 1;
	fill_page((uint64_t *)(buf + idx * PAGE), MAGIC, idx, g);
	atomic_store_explicit(&gens[idx], g, memory_order_release);
	atomic_fetch_add_explicit(&total_writes, 1, memory_order_relaxed);
}

/* ---- writer threads -------------------------------------------------------------------- */

struct writer {
	pthread_t th;
	int id;
	FILE *log;
};
static struct writer writers[MAX_THREADS];

static void *writer_main(void *arg)
{
	struct writer *w = arg;
	uint64_t rng = mix64((uint64_t)w->id + 1 + (uint64_t)getpid() * 7919);
	size_t owned = (npages + (size_t)nthreads - 1 - (size_t)w->id) / (size_t)nthreads;
	double pages_per_ns = rate_mib * 256.0 / nthreads / 1e9;
	uint64_t t0 = now_ns();
	double credit = 0;
	if (owned == 0)
		return NULL;
	while (!atomic_load(&stop_all)) {
		if (atomic_load(&pause_req)) {
			if (w->log)
				fflush(w->log);
			atomic_fetch_add(&paused, 1);
			while (atomic_load(&pause_req) && !atomic_load(&stop_all))
				sleep_ns(200000);
			atomic_fetch_sub(&paused, 1);
			t0 = now_ns();
			credit = 0;
			continue;
		}
		uint64_t t = now_ns();
		credit += (double)(t - t0) * pages_per_ns;
		t0 = t;
		if (credit > 4096)
			credit = 4096; /* don't burst after a freeze (e.g. a CRIU dump) */
		long n = (long)credit;
		credit -= (double)n;
		for (long i = 0; i < n && !atomic_load(&pause_req); i++) {
			rng = mix64(rng);
			size_t idx = (size_t)w->id + (size_t)(rng % owned) * (size_t)nthreads;
			uint64_t before = w->log ? now_ns() : 0;
			dirty_page(idx);
			if (w->log) {
				struct {
					uint64_t before, after;
					uint32_t page, gen;
				} rec = {before, now_ns(), (uint32_t)idx, atomic_load(&gens[idx])};
				fwrite(&rec, sizeof(rec), 1, w->log);
			}
		}
		sleep_ns(1000000);
	}
	return NULL;
}

static void pause_writers(void)
{
	atomic_store(&pause_req, 1);
	while (atomic_load(&paused) < nthreads)
		sleep_ns(100000);
}

static void resume_writers(void)
{
	atomic_store(&pause_req, 0);
}

/* ---- churn thread ------------------------------------------------------------------------ */

static void *churn_main(void *arg)
{
	(void)arg;
	struct {
		uint8_t *addr;
		size_t pages;
	} slots[CHURN_SLOTS] = {{0}};
	uint64_t rng = mix64((uint64_t)getpid());
	while (!atomic_load(&stop_all)) {
		rng = mix64(rng);
		int s = (int)(rng % CHURN_SLOTS);
		if (slots[s].addr) {
			munmap(slots[s].addr, slots[s].pages * PAGE);
			slots[s].addr = NULL;
		} else {
			size_t n = 1 + (size_t)((rng >> 8) % churn_pages);
			void *a = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
				       -1, 0);
			if (a == MAP_FAILED)
				die("mmap churn");
			for (size_t i = 0; i < n; i++)
				fill_page((uint64_t *)((uint8_t *)a + i * PAGE), MAGIC2, i, 0);
			slots[s].addr = a;
			slots[s].pages = n;
		}
		sleep_ns(1000000 + (rng >> 16) % 2000000);
	}
	return NULL;
}

/* ---- tick thread (-T) ------------------------------------------------------------------------ */

#define TICK_GAPS 64
static uint64_t realtime_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void *tick_main(void *arg)
{
	(void)arg;
	uint64_t gaps[TICK_GAPS][2];
	size_t ngaps = 0;
	uint64_t rng = mix64((uint64_t)getpid() ^ 0x7469636bULL);
	uint64_t last = realtime_ns();
	while (!atomic_load(&stop_all)) {
		sleep_ns(2000000);
		for (int k = 0; k < 4; k++) {
			rng = mix64(rng);
			(void)*(volatile uint64_t *)(buf + (rng % npages) * PAGE);
		}
		uint64_t t = realtime_ns();
		if (t - last > 20000000ULL) {
			gaps[ngaps % TICK_GAPS][0] = last;
			gaps[ngaps % TICK_GAPS][1] = t;
			ngaps++;
			char text[TICK_GAPS * 48 + 1];
			size_t off = 0;
			size_t first = ngaps > TICK_GAPS ? ngaps - TICK_GAPS : 0;
			for (size_t i = first; i < ngaps; i++)
				off += (size_t)snprintf(text + off, sizeof(text) - off,
							"gap %" PRIu64 " %" PRIu64 "\n",
							gaps[i % TICK_GAPS][0], gaps[i % TICK_GAPS][1]);
			write_atomic(ticks_path, text);
		}
		last = t;
	}
	return NULL;
}

/* ---- verification -------------------------------------------------------------------------- */

static void verify(char *out, size_t outlen)
{
	size_t bad = 0, first = 0;
	for (size_t i = 0; i < npages; i++) {
		uint32_t g = atomic_load(&gens[i]);
		if (!check_page((uint64_t *)(buf + i * PAGE), MAGIC, i, g)) {
			if (!bad)
				first = i;
			bad++;
		}
	}
	if (bad)
		snprintf(out, outlen, "bad pages=%zu bad=%zu first=%zu\n", npages, bad, first);
	else
		snprintf(out, outlen, "ok pages=%zu bad=0\n", npages);
}

static void verify_and_report(char *out, size_t outlen)
{
	pause_writers();
	for (int t = 0; t < nthreads; t++)
		if (writers[t].log)
			fflush(writers[t].log);
	verify(out, outlen);
	if (result_path)
		write_atomic(result_path, out);
	resume_writers();
}

/* ---- lockstep ------------------------------------------------------------------------------ */

static FILE *ack;

static void lockstep_command(char *line)
{
	char res[256];
	char *save = NULL;
	char *cmd = strtok_r(line, " \t\n", &save);
	if (!cmd)
		return;
	if (!strcmp(cmd, "w")) {
		long n = 0;
		for (char *tok; (tok = strtok_r(NULL, " \t\n", &save));) {
			size_t idx = strtoull(tok, NULL, 0);
			if (idx < npages) {
				dirty_page(idx);
				n++;
			}
		}
		fprintf(ack, "ack %ld\n", n);
	} else if (!strcmp(cmd, "r")) {
		char *a = strtok_r(NULL, " \t\n", &save), *b = strtok_r(NULL, " \t\n", &save);
		size_t first = a ? strtoull(a, NULL, 0) : 0, cnt = b ? strtoull(b, NULL, 0) : 0;
		long n = 0;
		for (size_t i = first; i < first + cnt && i < npages; i++, n++)
			dirty_page(i);
		fprintf(ack, "ack %ld\n", n);
	} else if (!strcmp(cmd, "map")) {
		char *a = strtok_r(NULL, " \t\n", &save);
		size_t n = a ? strtoull(a, NULL, 0) : 1;
		void *m = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
			       0);
		if (m == MAP_FAILED) {
			fprintf(ack, "err %d\n", errno);
		} else {
			for (size_t i = 0; i < n; i++)
				fill_page((uint64_t *)((uint8_t *)m + i * PAGE), MAGIC2, i, 0);
			fprintf(ack, "ack %p\n", m);
		}
	} else if (!strcmp(cmd, "sparse")) {
		char *a = strtok_r(NULL, " \t\n", &save), *b = strtok_r(NULL, " \t\n", &save);
		size_t n = a ? strtoull(a, NULL, 0) : 1, step = b ? strtoull(b, NULL, 0) : 1;
		void *m = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
			       0);
		if (m == MAP_FAILED || !step) {
			fprintf(ack, "err %d\n", errno);
		} else {
			for (size_t i = 0; i < n; i += step)
				fill_page((uint64_t *)((uint8_t *)m + i * PAGE), MAGIC2, i, 0);
			fprintf(ack, "ack %p\n", m);
		}
	} else if (!strcmp(cmd, "drop")) {
		char *a = strtok_r(NULL, " \t\n", &save), *b = strtok_r(NULL, " \t\n", &save);
		void *addr = (void *)(uintptr_t)(a ? strtoull(a, NULL, 0) : 0);
		size_t n = b ? strtoull(b, NULL, 0) : 0;
		fprintf(ack, madvise(addr, n * PAGE, MADV_DONTNEED) ? "err %d\n" : "ack 0\n", errno);
	} else if (!strcmp(cmd, "unmap")) {
		char *a = strtok_r(NULL, " \t\n", &save), *b = strtok_r(NULL, " \t\n", &save);
		void *addr = (void *)(uintptr_t)(a ? strtoull(a, NULL, 0) : 0);
		size_t n = b ? strtoull(b, NULL, 0) : 0;
		fprintf(ack, munmap(addr, n * PAGE) ? "err %d\n" : "ack 0\n", errno);
	} else if (!strcmp(cmd, "v")) {
		verify_and_report(res, sizeof(res));
		fputs(res, ack);
	} else if (!strcmp(cmd, "q")) {
		fputs("ack bye\n", ack);
		fflush(ack);
		got_term = 1;
	} else {
		fprintf(ack, "err unknown command %s\n", cmd);
	}
	fflush(ack);
}

/* ---- main ---------------------------------------------------------------------------------- */

static void on_signal(int sig)
{
	if (sig == SIGUSR1)
		got_usr1 = 1;
	else
		got_term = 1;
}

static void usage(void)
{
	fputs("usage: memwriter -m MiB [-d MiB/s -t THREADS] [-l LOG] [-c PAGES] [-L FIFO]\n"
	      "                 [-r RESULT] [-i INFO] [-b BEAT] [-T TICKS]\n",
	      stderr);
	exit(2);
}

int main(int argc, char **argv)
{
	size_t mib = 0;
	int opt;
	nthreads = 1;
	while ((opt = getopt(argc, argv, "m:d:t:l:c:L:r:i:b:T:")) != -1) {
		switch (opt) {
		case 'm': mib = strtoull(optarg, NULL, 0); break;
		case 'd': rate_mib = strtod(optarg, NULL); break;
		case 't': nthreads = atoi(optarg); break;
		case 'l': log_path = optarg; break;
		case 'c': churn_pages = strtoull(optarg, NULL, 0); break;
		case 'L': fifo_path = optarg; break;
		case 'r': result_path = optarg; break;
		case 'i': info_path = optarg; break;
		case 'b': beat_path = optarg; break;
		case 'T': ticks_path = optarg; break;
		default: usage();
		}
	}
	if (!mib || nthreads < 1 || nthreads > MAX_THREADS || rate_mib < 0)
		usage();
	if (rate_mib == 0 || fifo_path)
		nthreads = 0; /* no writer threads */

	npages = mib * 256;
	buf = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED)
		die("mmap");
	gens = calloc(npages, sizeof(*gens));
	if (!gens)
		die("calloc");
	for (size_t i = 0; i < npages; i++)
		fill_page((uint64_t *)(buf + i * PAGE), MAGIC, i, 0);

	struct sigaction sa = {.sa_handler = on_signal, .sa_flags = SA_RESTART};
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	int cmd_fd = -1;
	FILE *cmd = NULL;
	if (fifo_path) {
		char ack_path[4096];
		snprintf(ack_path, sizeof(ack_path), "%s.ack", fifo_path);
		/* O_RDWR: opening does not block, and the writer closing does not give EOF. */
		cmd_fd = open(fifo_path, O_RDWR | O_CLOEXEC);
		if (cmd_fd < 0)
			die(fifo_path);
		int ack_fd = open(ack_path, O_RDWR | O_CLOEXEC);
		if (ack_fd < 0)
			die(ack_path);
		cmd = fdopen(cmd_fd, "r");
		ack = fdopen(ack_fd, "w");
		if (!cmd || !ack)
			die("fdopen");
	}

	for (int t = 0; t < nthreads; t++) {
		writers[t].id = t;
		if (log_path) {
			char p[4096];
			snprintf(p, sizeof(p), "%s.%d", log_path, t);
			writers[t].log = fopen(p, "w");
			if (!writers[t].log)
				die(p);
		}
		if (pthread_create(&writers[t].th, NULL, writer_main, &writers[t]))
			die("pthread_create");
	}
	pthread_t churn_th;
	if (churn_pages && pthread_create(&churn_th, NULL, churn_main, NULL))
		die("pthread_create churn");
	pthread_t tick_th;
	if (ticks_path && pthread_create(&tick_th, NULL, tick_main, NULL))
		die("pthread_create tick");

	if (info_path) {
		char text[256];
		snprintf(text, sizeof(text), "addr=%p size=%zu pages=%zu pid=%d\n", (void *)buf,
			 npages * PAGE, npages, getpid());
		write_atomic(info_path, text);
	}

	uint64_t beat = 0, last_beat = 0;
	char res[256];
	while (!got_term) {
		if (cmd) {
			struct pollfd pfd = {.fd = cmd_fd, .events = POLLIN};
			int r = poll(&pfd, 1, 100);
			if (r > 0) {
				char line[65536];
				/* Commands are written one line per write(); read one line at a time. */
				if (fgets(line, sizeof(line), cmd))
					lockstep_command(line);
				/* stdio may have buffered more lines: drain them before polling again. */
				while (!got_term && cmd->_IO_read_ptr < cmd->_IO_read_end &&
				       fgets(line, sizeof(line), cmd))
					lockstep_command(line);
			}
		} else {
			sleep_ns(10000000);
		}
		if (got_usr1) {
			got_usr1 = 0;
			verify_and_report(res, sizeof(res));
		}
		uint64_t t = now_ns();
		if (beat_path && t - last_beat >= 100000000ULL) {
			char text[128];
			last_beat = t;
			snprintf(text, sizeof(text), "beat %" PRIu64 " writes %" PRIuFAST64 "\n", ++beat,
				 atomic_load(&total_writes));
			write_atomic(beat_path, text);
		}
	}
	atomic_store(&stop_all, 1);
	for (int t = 0; t < nthreads; t++) {
		pthread_join(writers[t].th, NULL);
		if (writers[t].log)
			fclose(writers[t].log);
	}
	if (churn_pages)
		pthread_join(churn_th, NULL);
	if (ticks_path)
		pthread_join(tick_th, NULL);
	return 0;
}
