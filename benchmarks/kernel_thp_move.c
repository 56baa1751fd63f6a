/*
 * kernel_thp_move.c - measure the live kernel's UFFDIO_MOVE of whole 2 MiB PMDs.
 *
 * Usage:
 *   kernel_thp_move huge NPMDS MOVES    THPs (MADV_HUGEPAGE): each move is one huge PMD
 *   kernel_thp_move small NPMDS MOVES   small pages (MADV_NOHUGEPAGE): each move is 512 PTEs
 *
 * Two private anonymous regions A and B of NPMDS 2 MiB-aligned PMDs each are carved out of
 * one over-sized mapping (an unmapped PMD between them, so that they stay two VMAs), both
 * advised as the mode says.  The first word of every 4 KiB page of A is written with a
 * distinct stamp; in huge mode PAGEMAP_SCAN's PAGE_IS_HUGE must then report every PMD of A
 * huge (a PMD-mapped THP), else the program exits 3 (the THPs could not be allocated: the
 * figure is skipped, not failed).  Both regions are registered with a userfaultfd
 * (UFFD_FEATURE_MOVE, MISSING) and MOVES moves of 2 MiB each are timed: PMD i = m % NPMDS
 * moves A->B on even passes (m / NPMDS) and B->A on odd ones, its destination always empty.
 *
 * Afterwards every PMD must be at the place its number of moves says, PMD-mapped there in
 * huge mode (the kernel moved the huge PMD, it did not split it), nothing present at the
 * other place; then both regions are unregistered and every page's stamp is read back.
 *
 * Prints one JSON line on stdout:
 *   {"mode": ..., "pmds": N, "moves": M, "seconds": ..., "moves_per_s": ...,
 *    "mib_per_s": ..., "huge_before": ..., "huge_after": ...}
 * (huge_before / huge_after: PMDs of the regions PMD-mapped before and after the moves)
 * and exits non-zero with a message on stderr on any failure (3: A is not THP-backed).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/types.h>
#include <linux/userfaultfd.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define PMD (2UL << 20)
#define PAGES_PER_PMD (PMD / PAGE)
#define EXIT_NO_THP 3

/* The installed headers may predate these (Linux 5.11 / 6.7 / 6.8). */
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
#ifndef PAGEMAP_SCAN
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#define PAGE_IS_HUGE (1 << 6)
struct page_region {
	__u64 start;
	__u64 end;
	__u64 categories;
};
struct pm_scan_arg {
	__u64 size;
	__u64 flags;
	__u64 start;
	__u64 end;
	__u64 walk_end;
	__u64 vec;
	__u64 vec_len;
	__u64 max_pages;
	__u64 category_inverted;
	__u64 category_mask;
	__u64 category_anyof_mask;
	__u64 return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

static void die(const char *what)
{
	fprintf(stderr, "kernel_thp_move: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void fail(int code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fprintf(stderr, "kernel_thp_move: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	exit(code);
}

static double now(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_MONOTONIC, &ts))
		die("clock_gettime");
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static long parse_count(const char *s, const char *what)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || *end || v <= 0) {
		fprintf(stderr, "kernel_thp_move: %s must be a positive integer\n", what);
		exit(2);
	}
	return v;
}

static int open_uffd(void)
{
	int fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);

	if (fd < 0 && errno == EINVAL)	/* kernel without USER_MODE_ONLY */
		fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0)
		die("userfaultfd");
	struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_MOVE };
	if (ioctl(fd, UFFDIO_API, &api))
		die("UFFDIO_API (UFFD_FEATURE_MOVE)");
	if (!(api.features & UFFD_FEATURE_MOVE))
		fail(1, "UFFDIO_API: kernel does not offer UFFD_FEATURE_MOVE");
	return fd;
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
		fail(1, "UFFDIO_REGISTER: range does not support UFFDIO_MOVE");
}

static void uffd_unregister(int fd, char *p, size_t len)
{
	struct uffdio_range range = { .start = (uintptr_t)p, .len = len };

	if (ioctl(fd, UFFDIO_UNREGISTER, &range))
		die("UFFDIO_UNREGISTER");
}

/*
 * Bytes of [p, p + PMD) whose pages have every category of `all` and, if `any` is non-zero,
 * one of `any` (PAGEMAP_SCAN on /proc/self/pagemap; no root needed).
 */
static unsigned long pmd_bytes(int pagemap, char *p, __u64 all, __u64 any)
{
	struct page_region vec[PAGES_PER_PMD / 2 + 1];	/* matching runs are disjoint */
	struct pm_scan_arg arg = {
		.size = sizeof(arg),
		.start = (uintptr_t)p,
		.end = (uintptr_t)p + PMD,
		.vec = (uintptr_t)vec,
		.vec_len = sizeof(vec) / sizeof(vec[0]),
		.category_mask = all,
		.category_anyof_mask = any,
		.return_mask = all | any,
	};
	long n = ioctl(pagemap, PAGEMAP_SCAN, &arg);
	if (n < 0)
		die("ioctl(PAGEMAP_SCAN)");
	if (arg.walk_end != arg.end)
		fail(1, "PAGEMAP_SCAN stopped at %#lx, not %#lx", (unsigned long)arg.walk_end,
		     (unsigned long)arg.end);
	unsigned long bytes = 0;
	for (long i = 0; i < n; i++)
		bytes += vec[i].end - vec[i].start;
	return bytes;
}

static int pmd_mapped(int pagemap, char *p)
{
	return pmd_bytes(pagemap, p, PAGE_IS_PRESENT | PAGE_IS_HUGE, 0) == PMD;
}

/* The word written at the start of page i (of the whole of A) before the moves. */
static uint64_t stamp(size_t i)
{
	return 0x6d6d73696d000000ULL ^ (i * 0x9e3779b97f4a7c15ULL);
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s huge|small NPMDS MOVES\n", argv[0]);
		return 2;
	}
	const char *mode = argv[1];
	int huge;
	if (!strcmp(mode, "huge"))
		huge = 1;
	else if (!strcmp(mode, "small"))
		huge = 0;
	else {
		fprintf(stderr, "kernel_thp_move: unknown mode '%s'\n", mode);
		return 2;
	}
	unsigned long n = (unsigned long)parse_count(argv[2], "NPMDS");
	long moves = parse_count(argv[3], "MOVES");
	size_t len = n * PMD;

	int pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (pagemap < 0)
		die("open /proc/self/pagemap");
	int fd = open_uffd();

	/* A, one unmapped PMD, B: carved out of one mapping with a PMD of slack for alignment. */
	size_t span = 2 * len + PMD, over = span + PMD;
	char *raw = mmap(NULL, over, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (raw == MAP_FAILED)
		die("mmap");
	char *a = (char *)(((uintptr_t)raw + PMD - 1) & ~(PMD - 1));
	char *b = a + len + PMD;
	if (a > raw && munmap(raw, (size_t)(a - raw)))
		die("munmap (head)");
	if (munmap(a + len, PMD))
		die("munmap (gap)");
	if (raw + over > b + len && munmap(b + len, (size_t)(raw + over - (b + len))))
		die("munmap (tail)");
	int advice = huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE;
	if (madvise(a, len, advice) || madvise(b, len, advice))
		die(huge ? "madvise(MADV_HUGEPAGE)" : "madvise(MADV_NOHUGEPAGE)");

	/* Present before registering: afterwards a missing page would wait for a handler. */
	for (size_t i = 0; i < n * PAGES_PER_PMD; i++)
		*(volatile uint64_t *)(a + i * PAGE) = stamp(i);
	unsigned long huge_before = 0;
	for (unsigned long i = 0; i < n; i++)
		huge_before += pmd_mapped(pagemap, a + i * PMD);
	if (huge && huge_before != n)
		fail(EXIT_NO_THP, "only %lu of %lu PMDs of A are THP-backed after the writes "
		     "(THP allocation failed, or THPs are disabled for this process)", huge_before, n);
	if (!huge && huge_before)
		fail(1, "%lu of %lu PMDs of A are PMD-mapped despite MADV_NOHUGEPAGE", huge_before, n);

	uffd_register(fd, a, len);
	uffd_register(fd, b, len);

	double t0 = now();
	for (long m = 0; m < moves; m++) {
		size_t off = (size_t)(m % (long)n) * PMD;
		int back = (m / (long)n) & 1;
		struct uffdio_move mv = {
			.dst = (uintptr_t)((back ? a : b) + off),
			.src = (uintptr_t)((back ? b : a) + off),
			.len = PMD,
			.mode = UFFDIO_MOVE_MODE_DONTWAKE,	/* no waiters */
		};
		if (ioctl(fd, UFFDIO_MOVE, &mv)) {
			fprintf(stderr, "kernel_thp_move: UFFDIO_MOVE %ld: %s (moved %lld of %lu bytes)\n",
				m, strerror(errno), (long long)mv.move, PMD);
			return 1;
		}
		if (mv.move != (__s64)PMD) {
			fprintf(stderr, "kernel_thp_move: UFFDIO_MOVE %ld moved %lld of %lu bytes\n",
				m, (long long)mv.move, PMD);
			return 1;
		}
	}
	double seconds = now() - t0;

	/* PMD i moved (moves / n) times, one more if i < moves % n: in B after an odd count. */
	unsigned long huge_after = 0;
	for (unsigned long i = 0; i < n; i++) {
		long count = moves / (long)n + ((long)i < moves % (long)n);
		char *at = (count & 1 ? b : a) + i * PMD, *other = (count & 1 ? a : b) + i * PMD;
		int mapped = pmd_mapped(pagemap, at);
		huge_after += mapped;
		if (huge && !mapped)
			fail(1, "PMD %lu of %lu is no longer PMD-mapped after the moves", i, n);
		if (!huge && mapped)
			fail(1, "PMD %lu of %lu became PMD-mapped", i, n);
		if (pmd_bytes(pagemap, at, PAGE_IS_PRESENT, 0) != PMD)
			fail(1, "PMD %lu of %lu: not every page is present at its destination", i, n);
		if (pmd_bytes(pagemap, other, 0, PAGE_IS_PRESENT | PAGE_IS_SWAPPED) != 0)
			fail(1, "PMD %lu of %lu: a page is left at its source", i, n);
	}
	uffd_unregister(fd, a, len);
	uffd_unregister(fd, b, len);
	for (unsigned long i = 0; i < n; i++) {
		long count = moves / (long)n + ((long)i < moves % (long)n);
		char *at = (count & 1 ? b : a) + i * PMD;
		for (size_t j = 0; j < PAGES_PER_PMD; j++) {
			if (*(volatile uint64_t *)(at + j * PAGE) != stamp(i * PAGES_PER_PMD + j))
				fail(1, "page %lu of PMD %lu lost its contents", j, i);
		}
	}

	printf("{\"mode\": \"%s\", \"pmds\": %lu, \"moves\": %ld, \"seconds\": %.9f, "
	       "\"moves_per_s\": %.1f, \"mib_per_s\": %.1f, \"huge_before\": %lu, \"huge_after\": %lu}\n",
	       mode, n, moves, seconds, moves / seconds, moves * 2.0 / seconds, huge_before, huge_after);
	close(fd);
	close(pagemap);
	return 0;
}
