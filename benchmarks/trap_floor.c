/* trap_floor.c - the least an isolated copy-on-write break through a
 * SIGSEGV trap can cost on this machine, next to the kernel's own COW.
 *
 *     cc -O2 -o /tmp/trap_floor benchmarks/trap_floor.c && /tmp/trap_floor
 *
 * Not a test, and not shmdedup's code: each row writes one byte into each of
 * 20000 pages of an 80000-page mapping in random order (the vs_ksm
 * benchmark's isolated-break measurement) and prints the median of five
 * repetitions in microseconds per page.
 *
 *   kernel COW            a MAP_PRIVATE mapping of a memfd, every page
 *                         read-mapped first: the fault copies the page
 *                         (what a write to a page Linux KSM merged costs)
 *   signal + longjmp      the trap's entry and exit alone: the handler
 *                         jumps past the store, nothing is fixed
 *   mprotect, no signal   one mprotect(PROT_READ|PROT_WRITE) of one page
 *                         of a read-only mapping, from the program itself
 *   signal + mprotect     the least a trap can do to let the write through:
 *                         no copy, no new mapping, the retried store faults
 *                         the page in again
 *   signal + mmap         the handler maps one page of another object over
 *                         the faulting one (MAP_FIXED), as shmdedup's break
 *                         does, without its copy
 *
 * shmdedup's break is "signal + mmap" plus the copy of the page into the
 * worker's object (a pwrite into a hole: a page allocation and 4 KiB).
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGES 80000
#define WRITES 20000
#define REPS 5

static long pg;
static int mode, other_fd;
static sigjmp_buf jump;

enum { LONGJMP, MPROTECT, MMAP };

static void handler(int sig, siginfo_t *si, void *uc)
{
    (void)sig;
    (void)uc;
    char *a = (char *)((unsigned long)si->si_addr & ~(unsigned long)(pg - 1));
    if (mode == LONGJMP)
        siglongjmp(jump, 1);
    if (mode == MPROTECT)
        mprotect(a, (size_t)pg, PROT_READ | PROT_WRITE);
    else
        mmap(a, (size_t)pg, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, other_fd, 0);
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static char *read_only_pages(size_t len)
{
    char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    memset(m, 1, len);
    mprotect(m, len, PROT_READ);
    return m;
}

int main(void)
{
    pg = sysconf(_SC_PAGESIZE);
    size_t len = (size_t)PAGES * (size_t)pg;
    int *order = malloc(sizeof(int) * PAGES);
    for (int i = 0; i < PAGES; i++)
        order[i] = i;
    srand(5);
    for (int i = PAGES - 1; i > 0; i--) {
        int j = rand() % (i + 1), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, NULL);
    other_fd = memfd_create("trap_floor", 0);
    if (other_fd < 0 || ftruncate(other_fd, pg) < 0) {
        perror("memfd");
        return 1;
    }
    const char *names[] = {"kernel COW", "signal + longjmp", "mprotect, no signal",
                           "signal + mprotect", "signal + mmap"};
    for (int row = 0; row < 5; row++) {
        double us[REPS];
        for (int rep = 0; rep < REPS; rep++) {
            char *volatile m;   /* kept across the longjmp */
            int fd = -1;
            if (row == 0) {
                fd = memfd_create("trap_floor_cow", 0);
                if (fd < 0 || ftruncate(fd, (off_t)len) < 0) {
                    perror("memfd");
                    return 1;
                }
                m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
                volatile char sink = 0;
                for (size_t off = 0; off < len; off += (size_t)pg)
                    sink += m[off];
            } else {
                m = read_only_pages(len);
            }
            mode = row == 1 ? LONGJMP : row == 3 ? MPROTECT : MMAP;
            double t = now();
            for (int i = 0; i < WRITES; i++) {
                char *p = m + (size_t)order[i] * (size_t)pg;
                if (row == 2) {
                    mprotect(p, (size_t)pg, PROT_READ | PROT_WRITE);
                    *p = 2;
                } else if (row == 1) {
                    if (sigsetjmp(jump, 1) == 0)
                        *(volatile char *)p = 2;
                } else {
                    *(volatile char *)p = 2;
                }
            }
            us[rep] = (now() - t) / WRITES * 1e6;
            munmap(m, len);
            if (fd >= 0)
                close(fd);
        }
        qsort(us, REPS, sizeof us[0], cmp);
        printf("%-22s %6.2f us/page  (min %.2f)\n", names[row], us[REPS / 2], us[0]);
    }
    return 0;
}
