/*
 * kernel_swap.c - measure the live kernel's MADV_PAGEOUT and swap-in rates.
 *
 * Usage:
 *   kernel_swap N            pageout of N written pages, then reads that hit the swap cache
 *   kernel_swap N CGROUP     the same pages swapped in from the swap device: the process joins
 *                            the memory cgroup CGROUP (a directory made for it), and after the
 *                            pageout the cgroup is reclaimed, which frees the swap cache
 *
 * A private anonymous region of N pages is mapped and the first word of every page written
 * (page i holds i + 1).  Every CPU's LRU batches are drained (an empty move_pages(2) of this
 * process does it), the PFNs of the pages are read from /proc/self/pagemap, and one
 * madvise(MADV_PAGEOUT) over the region is timed.  The swap device is asynchronous, so the
 * madvise returns with the writes submitted; the program then waits (polling KPF_WRITEBACK in
 * /proc/kpageflags at those PFNs, with a deadline) until the writeback has ended, and checks
 * with /proc/self/pagemap that every page is a swap entry.  mincore(2) counts the pages whose
 * folio is still in the swap cache (it reports those resident).
 *
 * Without CGROUP the reads come next: every page is read and its value checked; each read is a
 * swap-cache hit (a minor fault).  With CGROUP, the cgroup is reclaimed first (cgroup v2:
 * "1G" written to memory.reclaim; cgroup v1: memory.force_empty) until mincore says none of the
 * pages is resident (with a deadline); then the reads are swap-ins from the device (with the
 * kernel's swap readahead, so some are swap-cache hits on pages read ahead).
 *
 * Prints one JSON line on stdout:
 *   {"mode": "cache"|"device", "pages": N, "pageout_seconds": ..., "pageout_per_s": ...,
 *    "writeback_seconds": ..., "swapcache_after_pageout": ..., "reclaim_seconds": ...,
 *    "swapin_seconds": ..., "swapin_per_s": ..., "majflt": ..., "minflt": ..., "pswpin": ...}
 * (writeback_seconds: from the madvise's return to the end of the writeback; majflt / minflt:
 * this process's faults during the reads; pswpin: pages read from swap system-wide meanwhile)
 * and exits non-zero with a message on stderr on any failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif

#define PAGE 4096UL
#define PM_PRESENT (1ULL << 63)
#define PM_SWAP (1ULL << 62)
#define PM_PFN_MASK ((1ULL << 55) - 1)
#define KPF_WRITEBACK (1ULL << 8)
#define WRITEBACK_WAIT_S 30.0
#define RECLAIM_WAIT_S 20.0

static void die(const char *what)
{
	fprintf(stderr, "kernel_swap: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void fail(const char *msg, unsigned long a, unsigned long b)
{
	fprintf(stderr, "kernel_swap: ");
	fprintf(stderr, msg, a, b);
	fprintf(stderr, "\n");
	exit(1);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void pause_ms(long ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L };
	nanosleep(&ts, NULL);
}

/* Write a string to a file (a cgroup control file); 0 or errno. */
static int write_file(const char *dir, const char *name, const char *text)
{
	char path[4096];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return errno;
	int err = 0;
	if (write(fd, text, strlen(text)) < 0)
		err = errno;
	close(fd);
	return err;
}

static int file_exists(const char *dir, const char *name)
{
	char path[4096];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	return access(path, F_OK) == 0;
}

/* The pagemap entries of the region's pages. */
static void read_pagemap(int fd, char *region, unsigned long n, uint64_t *out)
{
	size_t want = n * sizeof(uint64_t);
	off_t off = (off_t)((unsigned long)region / PAGE * sizeof(uint64_t));
	size_t got = 0;
	while (got < want) {
		ssize_t r = pread(fd, (char *)out + got, want - got, off + (off_t)got);
		if (r <= 0)
			die("pread /proc/self/pagemap");
		got += (size_t)r;
	}
}

/* How many of the region's pages mincore(2) reports resident. */
static unsigned long resident(char *region, unsigned long n, unsigned char *vec)
{
	if (mincore(region, n * PAGE, vec) != 0)
		die("mincore");
	unsigned long count = 0;
	for (unsigned long i = 0; i < n; i++)
		count += vec[i] & 1;
	return count;
}

/* pswpin from /proc/vmstat: pages read from swap since boot. */
static unsigned long pswpin(void)
{
	FILE *f = fopen("/proc/vmstat", "r");
	if (!f)
		die("open /proc/vmstat");
	char key[128];
	unsigned long value, found = 0;
	while (fscanf(f, "%127s %lu", key, &value) == 2) {
		if (strcmp(key, "pswpin") == 0) {
			found = value;
			break;
		}
	}
	fclose(f);
	return found;
}

int main(int argc, char **argv)
{
	if (argc != 2 && argc != 3) {
		fprintf(stderr, "usage: kernel_swap N [CGROUP]\n");
		return 2;
	}
	unsigned long n = strtoul(argv[1], NULL, 10);
	if (n == 0)
		return 2;
	const char *cgroup = argc == 3 ? argv[2] : NULL;
	if (cgroup) {
		/* Join before touching the region, so that its pages are charged to the cgroup. */
		char pid[32];
		snprintf(pid, sizeof(pid), "%d\n", getpid());
		int err = write_file(cgroup, "cgroup.procs", pid);
		if (err) {
			errno = err;
			die("join the cgroup (cgroup.procs)");
		}
	}
	uint64_t *entries = malloc(n * sizeof(uint64_t));
	uint64_t *pfns = malloc(n * sizeof(uint64_t));
	unsigned char *vec = malloc(n);
	if (!entries || !pfns || !vec)
		die("malloc");
	int pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (pagemap < 0)
		die("open /proc/self/pagemap");
	int kpageflags = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
	if (kpageflags < 0)
		die("open /proc/kpageflags");
	char *region = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED)
		die("mmap");
	if (madvise(region, n * PAGE, MADV_NOHUGEPAGE) != 0)
		die("madvise(MADV_NOHUGEPAGE)");
	for (unsigned long i = 0; i < n; i++)
		*(uint64_t *)(region + i * PAGE) = i + 1;

	/* Drain every CPU's LRU batches: a folio still in one is off the LRU, and pageout skips it. */
	int node = 0;
	if (syscall(SYS_move_pages, 0, 0UL, NULL, &node, NULL, 0) != 0)
		die("move_pages (to drain the LRU batches)");
	read_pagemap(pagemap, region, n, entries);
	unsigned long npfns = 0;
	for (unsigned long i = 0; i < n; i++) {
		if (!(entries[i] & PM_PRESENT) || !(entries[i] & PM_PFN_MASK))
			fail("page %lu of %lu is not present before the pageout", i, n);
		pfns[npfns++] = entries[i] & PM_PFN_MASK;
	}

	double t0 = now();
	if (madvise(region, n * PAGE, MADV_PAGEOUT) != 0)
		die("madvise(MADV_PAGEOUT)");
	double t1 = now();
	double pageout = t1 - t0;

	/* Wait for the writeback the pageout started to end. */
	double deadline = t1 + WRITEBACK_WAIT_S;
	while (npfns) {
		unsigned long left = 0;
		for (unsigned long i = 0; i < npfns; i++) {
			uint64_t flags;
			if (pread(kpageflags, &flags, sizeof(flags), (off_t)(pfns[i] * sizeof(flags))) != sizeof(flags))
				die("pread /proc/kpageflags");
			if (flags & KPF_WRITEBACK)
				pfns[left++] = pfns[i];
		}
		npfns = left;
		if (!npfns)
			break;
		if (now() >= deadline)
			fail("swap writeback of %lu page(s) did not end in %lu s", npfns, (unsigned long)WRITEBACK_WAIT_S);
		pause_ms(1);
	}
	double writeback = now() - t1;

	read_pagemap(pagemap, region, n, entries);
	unsigned long swapped = 0;
	for (unsigned long i = 0; i < n; i++)
		swapped += (entries[i] & PM_SWAP) && !(entries[i] & PM_PRESENT);
	if (swapped != n)
		fail("only %lu of %lu pages are swap entries after the pageout", swapped, n);
	unsigned long cached = resident(region, n, vec);

	double reclaim = 0;
	if (cgroup) {
		int v2 = file_exists(cgroup, "memory.reclaim");
		double r0 = now();
		deadline = r0 + RECLAIM_WAIT_S;
		unsigned long left;
		while ((left = resident(region, n, vec)) != 0) {
			if (now() >= deadline)
				fail("%lu of %lu pages still in the swap cache after the cgroup's reclaim", left, n);
			int err = v2 ? write_file(cgroup, "memory.reclaim", "1G")
				     : write_file(cgroup, "memory.force_empty", "0");
			/* memory.reclaim answers EAGAIN when it freed less than asked: expected here. */
			if (err && err != EAGAIN) {
				errno = err;
				die(v2 ? "write memory.reclaim" : "write memory.force_empty");
			}
			pause_ms(1);
		}
		reclaim = now() - r0;
		read_pagemap(pagemap, region, n, entries);
		for (unsigned long i = 0; i < n; i++) {
			if (!(entries[i] & PM_SWAP) || (entries[i] & PM_PRESENT))
				fail("page %lu of %lu is no longer a swap entry after the reclaim", i, n);
		}
	}

	struct rusage ru0, ru1;
	unsigned long in0 = pswpin();
	getrusage(RUSAGE_SELF, &ru0);
	unsigned long wrong = 0;
	double s0 = now();
	for (unsigned long i = 0; i < n; i++)
		wrong += *(volatile uint64_t *)(region + i * PAGE) != i + 1;
	double swapin = now() - s0;
	getrusage(RUSAGE_SELF, &ru1);
	unsigned long in1 = pswpin();
	if (wrong)
		fail("%lu of %lu pages read back the wrong value", wrong, n);
	read_pagemap(pagemap, region, n, entries);
	for (unsigned long i = 0; i < n; i++) {
		if (!(entries[i] & PM_PRESENT))
			fail("page %lu of %lu is not present after its read", i, n);
	}

	printf("{\"mode\": \"%s\", \"pages\": %lu, \"pageout_seconds\": %.6f, \"pageout_per_s\": %.1f, "
	       "\"writeback_seconds\": %.6f, \"swapcache_after_pageout\": %lu, \"reclaim_seconds\": %.6f, "
	       "\"swapin_seconds\": %.6f, \"swapin_per_s\": %.1f, \"majflt\": %ld, \"minflt\": %ld, "
	       "\"pswpin\": %lu}\n",
	       cgroup ? "device" : "cache", n, pageout, n / pageout, writeback, cached, reclaim, swapin,
	       n / swapin, ru1.ru_majflt - ru0.ru_majflt, ru1.ru_minflt - ru0.ru_minflt, in1 - in0);
	return 0;
}
