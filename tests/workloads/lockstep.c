/*
 * Workload for the dirty-tracker tests (tests/integration/test_uffd.py and friends).
 *
 *   lockstep lockstep CMD_FIFO ACK_FIFO NPAGES
 *       Maps NPAGES private anonymous pages (no THP), writes every page, writes the buffer's
 *       address (u64) to ACK_FIFO. Then reads commands from CMD_FIFO: u32 count, followed by
 *       count u32 ops; performs exactly those ops and acks with one byte. count == 0xffffffff
 *       exits. An op is (kind << 28) | page index:
 *         0 WRITE  store a u64 (the next value of a counter, never 0) into the page
 *         1 ZAP    madvise(MADV_DONTNEED) the page (it reads as zeros afterwards)
 *         2 REMAP  mmap(MAP_FIXED) a fresh anonymous page over it (a new VMA), then WRITE it
 *       The value of the k-th write (k = 1, 2, ...) is k, stored at byte offset 8 * (k % 512).
 *
 *   lockstep free NPAGES NTHREADS
 *       Free-running: NTHREADS threads write random pages of an NPAGES buffer as fast as they
 *       can while one more thread churns mappings (mmap, write, munmap, mremap, MADV_DONTNEED).
 *       Prints "ready" once running. Runs until killed.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void read_full(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r <= 0)
            die("read");
        p += r;
        n -= (size_t)r;
    }
}

static void write_full(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n) {
        ssize_t r = write(fd, p, n);
        if (r <= 0)
            die("write");
        p += r;
        n -= (size_t)r;
    }
}

static char *map_buffer(size_t npages) {
    char *buf = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
    if (buf == MAP_FAILED)
        die("mmap");
    madvise(buf, npages * PAGE, MADV_NOHUGEPAGE);
    for (size_t i = 0; i < npages; i++)
        buf[i * PAGE] = 1;
    return buf;
}

static int lockstep(const char *cmd_path, const char *ack_path, size_t npages) {
    char *buf = map_buffer(npages);
    int cmd = open(cmd_path, O_RDONLY);
    int ack = open(ack_path, O_WRONLY);
    if (cmd < 0 || ack < 0)
        die("open fifo");
    uint64_t addr = (uint64_t)(uintptr_t)buf;
    write_full(ack, &addr, sizeof addr);
    uint64_t counter = 0;
    uint32_t *ops = NULL;
    size_t cap = 0;
    for (;;) {
        uint32_t n;
        read_full(cmd, &n, sizeof n);
        if (n == 0xffffffffU)
            return 0;
        if (n > cap) {
            cap = n;
            ops = realloc(ops, cap * sizeof *ops);
            if (!ops)
                die("realloc");
        }
        read_full(cmd, ops, n * sizeof *ops);
        for (uint32_t i = 0; i < n; i++) {
            uint32_t kind = ops[i] >> 28, idx = ops[i] & 0x0fffffffU;
            if (idx >= npages) {
                fprintf(stderr, "bad page index %u\n", idx);
                return 2;
            }
            char *page = buf + (size_t)idx * PAGE;
            if (kind == 1) {
                if (madvise(page, PAGE, MADV_DONTNEED))
                    die("madvise");
                continue;
            }
            if (kind == 2) {
                if (mmap(page, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                         -1, 0) == MAP_FAILED)
                    die("mmap fixed");
            } else if (kind != 0) {
                fprintf(stderr, "bad op kind %u\n", kind);
                return 2;
            }
            counter++;
            memcpy(page + 8 * (counter % 512), &counter, sizeof counter);
        }
        char a = 'k';
        write_full(ack, &a, 1);
    }
}

static char *free_buf;
static size_t free_npages;

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void *writer(void *arg) {
    uint64_t seed = 0x9e3779b97f4a7c15ULL * (uintptr_t)arg + 1, n = 0;
    for (;;) {
        uint64_t r = xorshift(&seed);
        char *p = free_buf + (r % free_npages) * PAGE + ((r >> 32) % (PAGE / 64)) * 64;
        n++;
        memcpy(p, &n, sizeof n);
        memcpy(p + 8, &r, sizeof r);
    }
    return NULL;
}

#define SLOTS 8

static void *churn(void *arg) {
    (void)arg;
    char *slot[SLOTS] = {0};
    size_t len[SLOTS] = {0};
    uint64_t seed = 12345, gen = 0;
    for (;;) {
        uint64_t r = xorshift(&seed);
        int s = (int)(r % SLOTS);
        gen++;
        if (slot[s] && (r >> 8) % 4 == 0) {
            /* grow with mremap (may move) */
            size_t nlen = len[s] + PAGE * (1 + (r >> 16) % 8);
            char *p = mremap(slot[s], len[s], nlen, MREMAP_MAYMOVE);
            if (p != MAP_FAILED) {
                memset(p + len[s], (int)(gen & 0xff) | 1, nlen - len[s]);
                slot[s] = p;
                len[s] = nlen;
            }
        } else if (slot[s]) {
            munmap(slot[s], len[s]);
            slot[s] = NULL;
        } else {
            len[s] = PAGE * (1 + (r >> 16) % 64);
            slot[s] = mmap(NULL, len[s], PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (slot[s] == MAP_FAILED) {
                slot[s] = NULL;
                continue;
            }
            for (size_t o = 0; o < len[s]; o += PAGE)
                memcpy(slot[s] + o, &gen, sizeof gen);
        }
        if ((r >> 40) % 8 == 0) {
            size_t i = (r >> 20) % free_npages, n = 1 + (r >> 50) % 16;
            if (i + n > free_npages)
                n = free_npages - i;
            madvise(free_buf + i * PAGE, n * PAGE, MADV_DONTNEED);
        }
        usleep(200);
    }
    return NULL;
}

static int free_running(size_t npages, int nthreads) {
    free_npages = npages;
    free_buf = map_buffer(npages);
    pthread_t t;
    for (int i = 0; i < nthreads; i++)
        if (pthread_create(&t, NULL, writer, (void *)(uintptr_t)(i + 1)))
            die("pthread_create");
    if (pthread_create(&t, NULL, churn, NULL))
        die("pthread_create");
    printf("ready\n");
    fflush(stdout);
    for (;;)
        pause();
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "lockstep") == 0)
        return lockstep(argv[2], argv[3], strtoul(argv[4], NULL, 0));
    if (argc == 4 && strcmp(argv[1], "free") == 0)
        return free_running(strtoul(argv[2], NULL, 0), atoi(argv[3]));
    fprintf(stderr, "usage: lockstep lockstep CMD ACK NPAGES | lockstep free NPAGES NTHREADS\n");
    return 2;
}
