/*
 * kernel_move.c - measure the live kernel's UFFDIO_MOVE rate.
 *
 * Usage:
 *   kernel_move single N    N moves of one page each
 *   kernel_move bulk64 N    N moves of 64 pages each
 *   kernel_move bulk MIB    one move of MIB mebibytes
 *
 * Two private anonymous regions A and B are mapped; the pages of A are
 * written (so they are present) before both regions are registered with a
 * userfaultfd in MISSING mode.  The timed loop then ping-pongs the pages:
 * A->B, B->A, ...  Each ioctl is one op and its destination is always empty.
 * After the loop the data is checked at the place it should have ended up.
 *
 * Prints one JSON line on stdout:
 *   {"mode": ..., "ops": ..., "pages": ..., "seconds": ...,
 *    "ops_per_s": ..., "pages_per_s": ...}
 * and exits non-zero with a message on stderr on any failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/types.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* The installed headers may predate these (Linux 5.11 / 6.8). */
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1ULL << 16)
#endif
#ifndef UFFDIO_MOVE
#define _UFFDIO_MOVE 0x05
struct uffdio_move {
	__u64 dst;
	__u64 src;
	__u64 len;
#define UFFDIO_MOVE_MODE_DONTWAKE        ((__u64)1 << 0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1 << 1)
	__u64 mode;
	__s64 move;	/* bytes moved, or a negative errno */
};
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif

static void die(const char *what)
{
	fprintf(stderr, "kernel_move: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void fail(const char *msg)
{
	fprintf(stderr, "kernel_move: %s\n", msg);
	exit(1);
}

static int open_uffd(void)
{
	int fd = syscall(SYS_userfaultfd,
			 O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);

	if (fd < 0 && errno == EINVAL)	/* kernel without USER_MODE_ONLY */
		fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0)
		die("userfaultfd");

	struct uffdio_api api = { .api = UFFD_API,
				  .features = UFFD_FEATURE_MOVE };
	if (ioctl(fd, UFFDIO_API, &api))
		die("UFFDIO_API (UFFD_FEATURE_MOVE)");
	if (!(api.features & UFFD_FEATURE_MOVE))
		fail("UFFDIO_API: kernel does not offer UFFD_FEATURE_MOVE");
	return fd;
}

static char *map_region(size_t len)
{
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		die("mmap");
	/* Page-granular moves only, and keep the regions out of any child. */
	if (madvise(p, len, MADV_NOHUGEPAGE))
		die("madvise(MADV_NOHUGEPAGE)");
	if (madvise(p, len, MADV_DONTFORK))
		die("madvise(MADV_DONTFORK)");
	return p;
}

static void uffd_register(int fd, char *p, size_t len)
{
	struct uffdio_register reg = {
		.range = { .start = (uintptr_t)p, .len = len },
		.mode = UFFDIO_REGISTER_MODE_MISSING,
	};

	if (ioctl(fd, UFFDIO_REGISTER, &reg))
		die("UFFDIO_REGISTER");
	if (!(reg.ioctls & ((__u64)1 << _UFFDIO_MOVE)))
		fail("UFFDIO_REGISTER: range does not support UFFDIO_MOVE");
}

static void uffd_unregister(int fd, char *p, size_t len)
{
	struct uffdio_range range = { .start = (uintptr_t)p, .len = len };

	if (ioctl(fd, UFFDIO_UNREGISTER, &range))
		die("UFFDIO_UNREGISTER");
}

/* The word written at the start of page i before the moves. */
static uint64_t stamp(size_t i)
{
	return 0x6d6d73696d000000ULL ^ (i * 0x9e3779b97f4a7c15ULL);
}

static double now(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_MONOTONIC, &ts))
		die("clock_gettime");
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static long parse_count(const char *s)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || *end || v <= 0)
		fail("count must be a positive integer");
	return v;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s single|bulk64|bulk N\n", argv[0]);
		return 2;
	}
	const char *mode = argv[1];
	long n = parse_count(argv[2]);
	size_t psize = (size_t)sysconf(_SC_PAGESIZE);
	size_t npages;	/* pages per move */
	long ops;	/* number of moves */

	if (!strcmp(mode, "single")) {
		npages = 1;
		ops = n;
	} else if (!strcmp(mode, "bulk64")) {
		npages = 64;
		ops = n;
	} else if (!strcmp(mode, "bulk")) {
		npages = (size_t)n * (1024 * 1024 / psize);
		ops = 1;
	} else {
		fprintf(stderr, "kernel_move: unknown mode '%s'\n", mode);
		return 2;
	}
	size_t len = npages * psize;

	int fd = open_uffd();
	char *a = map_region(len);
	char *b = map_region(len);

	/* Make A's pages present before registering: afterwards, touching a
	 * missing page would wait for a fault handler that never comes. */
	for (size_t i = 0; i < npages; i++)
		*(uint64_t *)(a + i * psize) = stamp(i);

	uffd_register(fd, a, len);
	uffd_register(fd, b, len);

	char *src = a, *dst = b;
	double t0 = now();
	for (long op = 0; op < ops; op++) {
		struct uffdio_move mv = {
			.dst = (uintptr_t)dst,
			.src = (uintptr_t)src,
			.len = len,
			.mode = UFFDIO_MOVE_MODE_DONTWAKE,	/* no waiters */
		};
		if (ioctl(fd, UFFDIO_MOVE, &mv)) {
			fprintf(stderr, "kernel_move: UFFDIO_MOVE op %ld: %s "
				"(moved %lld of %zu bytes)\n", op,
				strerror(errno), (long long)mv.move, len);
			return 1;
		}
		if (mv.move != (__s64)len) {
			fprintf(stderr, "kernel_move: UFFDIO_MOVE op %ld moved "
				"%lld of %zu bytes\n", op,
				(long long)mv.move, len);
			return 1;
		}
		char *t = src;
		src = dst;
		dst = t;
	}
	double seconds = now() - t0;

	/* Unregister so that the emptied region can be read (as zeroes). */
	uffd_unregister(fd, a, len);
	uffd_unregister(fd, b, len);
	for (size_t i = 0; i < npages; i++) {
		if (*(uint64_t *)(src + i * psize) != stamp(i))
			fail("verify: a moved page lost its contents");
		if (*(uint64_t *)(dst + i * psize) != 0)
			fail("verify: an emptied page is not empty");
	}

	double pages = (double)ops * npages;
	printf("{\"mode\": \"%s\", \"ops\": %ld, \"pages\": %.0f, "
	       "\"seconds\": %.9f, \"ops_per_s\": %.1f, "
	       "\"pages_per_s\": %.1f}\n",
	       mode, ops, pages, seconds, ops / seconds, pages / seconds);
	close(fd);
	return 0;
}
