/*
 * kernel_fault.c - measure the live kernel's userfault round trip: fault, event, UFFDIO_COPY, wake.
 *
 * Usage:
 *   kernel_fault N      N faults, one per page of a fresh N-page region
 *
 * A private anonymous region of N pages is registered with a userfaultfd in
 * MISSING mode.  A handler thread polls the userfaultfd, reads each
 * UFFD_EVENT_PAGEFAULT message and resolves it with a one-page UFFDIO_COPY
 * (which wakes the faulting thread).  The main thread reads the first word of
 * every page in turn: each read faults, blocks until the handler's copy, and
 * returns the value the handler put there.  The values are checked after the
 * loop.  One op is one resolved fault.
 *
 * Prints one JSON line on stdout:
 *   {"mode": "fault", "ops": ..., "seconds": ..., "ops_per_s": ...}
 * and exits non-zero with a message on stderr on any failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/types.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
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

static int uffd;
static char *region;
static unsigned long npages;
static char *srcbuf;

static void die(const char *what)
{
	fprintf(stderr, "kernel_fault: %s: %s\n", what, strerror(errno));
	exit(1);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *handler(void *arg)
{
	unsigned long done = 0;
	(void)arg;
	while (done < npages) {
		struct pollfd pfd = { .fd = uffd, .events = POLLIN };
		struct uffd_msg msg;
		if (poll(&pfd, 1, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		ssize_t n = read(uffd, &msg, sizeof(msg));
		if (n < 0) {
			if (errno == EAGAIN)
				continue;
			die("read");
		}
		if (n != sizeof(msg) || msg.event != UFFD_EVENT_PAGEFAULT) {
			fprintf(stderr, "kernel_fault: unexpected message\n");
			exit(1);
		}
		unsigned long addr = msg.arg.pagefault.address & ~(PAGE - 1);
		*(uint64_t *)srcbuf = 1000 + (addr - (unsigned long)region) / PAGE;
		struct uffdio_copy copy = {
			.dst = addr, .src = (unsigned long)srcbuf, .len = PAGE, .mode = 0,
		};
		if (ioctl(uffd, UFFDIO_COPY, &copy) < 0 && errno != EEXIST)
			die("UFFDIO_COPY");
		done++;
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: kernel_fault N\n");
		return 2;
	}
	npages = strtoul(argv[1], NULL, 10);
	if (npages == 0)
		return 2;
	uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (uffd < 0)
		die("userfaultfd");
	struct uffdio_api api = { .api = UFFD_API, .features = 0 };
	if (ioctl(uffd, UFFDIO_API, &api) < 0)
		die("UFFDIO_API");
	region = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	srcbuf = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED || srcbuf == MAP_FAILED)
		die("mmap");
	memset(srcbuf, 0, PAGE);
	struct uffdio_register reg = {
		.range = { .start = (unsigned long)region, .len = npages * PAGE },
		.mode = UFFDIO_REGISTER_MODE_MISSING,
	};
	if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
		die("UFFDIO_REGISTER");
	pthread_t th;
	if (pthread_create(&th, NULL, handler, NULL) != 0)
		die("pthread_create");
	volatile uint64_t sum = 0;
	double t0 = now();
	for (unsigned long i = 0; i < npages; i++)
		sum += *(volatile uint64_t *)(region + i * PAGE);
	double secs = now() - t0;
	pthread_join(th, NULL);
	for (unsigned long i = 0; i < npages; i++) {
		if (*(uint64_t *)(region + i * PAGE) != 1000 + i) {
			fprintf(stderr, "kernel_fault: page %lu holds the wrong value\n", i);
			return 1;
		}
	}
	printf("{\"mode\": \"fault\", \"ops\": %lu, \"seconds\": %.6f, \"ops_per_s\": %.1f}\n",
	       npages, secs, npages / secs);
	return sum == 0;
}
