/*
 * phaul-kdat-shim: LD_PRELOAD'ed into ONE criu process (phaul's final dump after pre-copy) so that
 * it reads its kernel-probe cache from $PHAUL_KDAT instead of /run/criu.kdat (and writes, renames
 * and unlinks that private copy, never the host's). phaul/engine/tracked_dump.py explains why:
 * that copy says "dirty tracking works", and phaul's own tracker supplies the dirty pages.
 * Built by deploy/setup.sh; without $PHAUL_KDAT it changes nothing.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>

static const char *redirect(const char *path, char *buf, size_t n)
{
	const char *to = getenv("PHAUL_KDAT");
	if (!to || !path)
		return path;
	if (strncmp(path, "/run/criu.kdat", 14) == 0 || strncmp(path, "/run/criu/criu.kdat", 19) == 0) {
		const char *tail = strstr(path, "criu.kdat") + 9; /* "" or ".tmp" */
		snprintf(buf, n, "%s%s", to, tail);
		return buf;
	}
	return path;
}

#define WRAP_OPEN(name, ...)                                                                  \
	int name(const char *path, int flags, ...)                                            \
	{                                                                                     \
		static int (*real)(const char *, int, ...);                                   \
		char buf[4096];                                                               \
		mode_t mode = 0;                                                              \
		if (!real)                                                                    \
			real = dlsym(RTLD_NEXT, #name);                                       \
		if (flags & (O_CREAT | O_TMPFILE)) {                                          \
			va_list ap;                                                           \
			va_start(ap, flags);                                                  \
			mode = va_arg(ap, mode_t);                                            \
			va_end(ap);                                                           \
		}                                                                             \
		return real(redirect(path, buf, sizeof(buf)), flags, mode);                   \
	}
WRAP_OPEN(open)
WRAP_OPEN(open64)

#define WRAP_OPENAT(name)                                                                     \
	int name(int dfd, const char *path, int flags, ...)                                   \
	{                                                                                     \
		static int (*real)(int, const char *, int, ...);                              \
		char buf[4096];                                                               \
		mode_t mode = 0;                                                              \
		if (!real)                                                                    \
			real = dlsym(RTLD_NEXT, #name);                                       \
		if (flags & (O_CREAT | O_TMPFILE)) {                                          \
			va_list ap;                                                           \
			va_start(ap, flags);                                                  \
			mode = va_arg(ap, mode_t);                                            \
			va_end(ap);                                                           \
		}                                                                             \
		return real(dfd, redirect(path, buf, sizeof(buf)), flags, mode);              \
	}
WRAP_OPENAT(openat)
WRAP_OPENAT(openat64)

int rename(const char *a, const char *b)
{
	static int (*real)(const char *, const char *);
	char ba[4096], bb[4096];
	if (!real)
		real = dlsym(RTLD_NEXT, "rename");
	return real(redirect(a, ba, sizeof(ba)), redirect(b, bb, sizeof(bb)));
}

int unlink(const char *a)
{
	static int (*real)(const char *);
	char ba[4096];
	if (!real)
		real = dlsym(RTLD_NEXT, "unlink");
	return real(redirect(a, ba, sizeof(ba)));
}
