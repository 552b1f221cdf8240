/* sd_trap.c - the region table, copy-on-write breaks, and the SIGSEGV trap.
 *
 * A merged page is mapped read-only from a stable slot (or from anonymous
 * read-only memory for a zero page).  A write to it faults; the trap finds the
 * region, moves the page MERGED -> BREAKING with a compare-and-swap (threads
 * faulting on the same page wait), and breaks it (DESIGN invariant 3):
 *   1. pwrite the content it maps back into the backing at the page's offset,
 *   2. mmap the backing read-write there, with the region's own fd (a
 *      reopened fd would stop the kernel from merging the mappings),
 *   3. publish PRIVATE (release), and return: the write is retried.
 * Pages in MERGING are waited on: the merging thread either publishes MERGED
 * (then we break it) or aborts to PRIVATE (then the write just retries).
 * Fault-around: a fault on the page right after the previous trap break of the
 * region also claims the pages after it that are in the same merged state, up
 * to twice that break's width (at most sd_fault_around_max), and breaks them
 * all with one pwrite and one mmap: a sequential writer pays the signal and
 * the remap once per window.  Only pages won by compare-and-swap join.
 * Tests kill a process between the steps (sd_fault.h: break_copied,
 * break_mapped) to check that other processes lose nothing.
 *
 * Signal safety: the handler calls only async-signal-safe functions (pwrite,
 * mmap, sched_yield, sigaction, write, raise, getpid), keeps errno, runs on
 * the alternate stack when the thread has one (SA_ONSTACK), and reads the
 * region table with atomics only.  Faults that are not ours go to the handler
 * that was installed before us: we put it back and let the fault happen again,
 * the way faulthandler chains, so a genuine segfault is never swallowed.
 *
 * When no memory is left to break a page (tmpfs full), the trap writes one line
 * to stderr and ends the process with SIGBUS: it never returns wrong bytes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "sd_fault.h"
#include "sd_pages.h"
#include "sd_trap.h"

size_t sd_page_size;
_Atomic long sd_merged_pages;
_Atomic int sd_test_fail_mmaps;
_Atomic size_t sd_fault_around_max = SD_FAULT_AROUND_DEFAULT;

static struct sd_region regions[SD_MAX_REGIONS];
static _Atomic int regions_used;            /* high-water mark of the table */
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;

static struct sigaction prev_action;        /* what we chain to */
/* A self-sent SIGSEGV while pages are merged is most likely faulthandler (or
 * another handler put in front of us) re-raising one of our COW faults after
 * restoring us: let the faulting instruction run again once. */
static _Atomic int selfsent_budget = 1;

static __thread uintptr_t tl_fault_addr __attribute__((tls_model("initial-exec")));
static __thread unsigned tl_fault_retries __attribute__((tls_model("initial-exec")));

int sd_region_add(void *base, size_t npages, int fd, uint8_t *state)
{
    pthread_mutex_lock(&table_lock);
    for (int i = 0; i < SD_MAX_REGIONS; i++) {
        struct sd_region *r = &regions[i];
        if (atomic_load(&r->base) != 0)
            continue;
        r->npages = npages;
        r->fd = fd;
        r->state = (_Atomic uint8_t *)state;
        atomic_store(&r->breaks, 0);
        atomic_store(&r->ahead_end, SIZE_MAX);
        atomic_store(&r->ahead_width, 0);
        atomic_store_explicit(&r->base, (uintptr_t)base, memory_order_release);
        if (i + 1 > atomic_load(&regions_used))
            atomic_store(&regions_used, i + 1);
        pthread_mutex_unlock(&table_lock);
        return i;
    }
    pthread_mutex_unlock(&table_lock);
    errno = ENOSPC;
    return -1;
}

void sd_region_remove(int idx)
{
    struct sd_region *r = &regions[idx];
    long merged = 0;
    for (size_t i = 0; i < r->npages; i++) {
        uint8_t s = atomic_load(&r->state[i]);
        merged += (s == SD_MERGED || s == SD_ZERO);
    }
    atomic_fetch_sub(&sd_merged_pages, merged);
    atomic_store_explicit(&r->base, 0, memory_order_release);
}

struct sd_region *sd_region_get(int idx)
{
    return &regions[idx];
}

/* Signal safe. */
static struct sd_region *region_find(uintptr_t addr, size_t *page)
{
    int n = atomic_load(&regions_used);
    for (int i = 0; i < n; i++) {
        uintptr_t b = atomic_load_explicit(&regions[i].base, memory_order_acquire);
        if (b && addr >= b && addr - b < regions[i].npages * sd_page_size) {
            *page = (addr - b) / sd_page_size;
            return &regions[i];
        }
    }
    return NULL;
}

static int pwrite_full(int fd, const uint8_t *buf, size_t len, off_t off)
{
    while (len > 0) {
        ssize_t w = pwrite(fd, buf, len, off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += w;
        len -= (size_t)w;
        off += w;
    }
    return 0;
}

/* Copy pages [first, first + n) back into the backing and map it read-write
 * there.  The caller owns them (BREAKING).  Returns 0, -1 if the copy failed
 * (nothing changed but backing bytes nobody maps), -2 if the mmap failed. */
static int copy_back(struct sd_region *r, size_t first, size_t n, int zero)
{
    uintptr_t base = atomic_load(&r->base);
    uint8_t *addr = (uint8_t *)base + first * sd_page_size;
    off_t off = (off_t)(first * sd_page_size);
    size_t len = n * sd_page_size;

    /* A zero page's backing was punched at merge time: it already reads as
     * zeros, so only the mapping has to change. */
    if (!zero && pwrite_full(r->fd, addr, len, off) < 0)
        return -1;
    sd_fault_point(SD_FAULT_BREAK_COPIED);
    if (atomic_load(&sd_test_fail_mmaps) > 0 && atomic_fetch_sub(&sd_test_fail_mmaps, 1) > 0) {
        errno = ENOMEM;
        return -2;
    }
    if (mmap(addr, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, r->fd, off) == MAP_FAILED)
        return -2;
    sd_fault_point(SD_FAULT_BREAK_MAPPED);
    return 0;
}

static int is_merged(uint8_t s) { return s == SD_MERGED || s == SD_ZERO; }

/* Claim the merged neighbours of [*lo, *hi) so that one mmap can cover whole
 * mappings: replacing whole VMAs never adds one, so it cannot hit
 * vm.max_map_count.  Returns how many pages were added. */
static size_t claim_neighbours(struct sd_region *r, size_t *lo, size_t *hi)
{
    size_t added = 0;
    while (*lo > 0) {
        uint8_t s = atomic_load(&r->state[*lo - 1]);
        if (!is_merged(s) || !atomic_compare_exchange_strong(&r->state[*lo - 1], &s, SD_BREAKING))
            break;
        (*lo)--;
        added++;
    }
    while (*hi < r->npages) {
        uint8_t s = atomic_load(&r->state[*hi]);
        if (!is_merged(s) || !atomic_compare_exchange_strong(&r->state[*hi], &s, SD_BREAKING))
            break;
        (*hi)++;
        added++;
    }
    return added;
}

static void publish(struct sd_region *r, size_t first, size_t n, uint8_t s)
{
    for (size_t i = first; i < first + n; i++)
        atomic_store_explicit(&r->state[i], s, memory_order_release);
}

/* Break [first, first + n) which the caller owns; on an mmap ENOMEM retry
 * with the whole merged stretch around it.  On success the pages (and any
 * claimed neighbours) are PRIVATE.  Returns pages broken, or -1 with errno and
 * the owned pages handed back in state `s`. */
static long break_owned(struct sd_region *r, size_t first, size_t n, uint8_t s)
{
    int rc = copy_back(r, first, n, s == SD_ZERO);
    if (rc == -2 && errno == ENOMEM) {
        size_t lo = first, hi = first + n;
        if (claim_neighbours(r, &lo, &hi) > 0) {
            rc = copy_back(r, lo, hi - lo, 0);
            if (rc == 0) {
                publish(r, lo, hi - lo, SD_PRIVATE);
                atomic_fetch_sub(&sd_merged_pages, (long)(hi - lo));
                return (long)(hi - lo);
            }
            /* Give the neighbours back as MERGED: their mappings are unchanged
             * (a ZERO neighbour reads zeros from its mapping either way).  The
             * copy allocated backing pages for them that nobody maps: free them
             * first (once published, another thread may break one and write
             * its backing afresh). */
            int err = errno;
            sd_punch(r->fd, (off_t)(lo * sd_page_size), (off_t)((hi - lo) * sd_page_size));
            publish(r, lo, first - lo, SD_MERGED);
            publish(r, first + n, hi - first - n, SD_MERGED);
            errno = err;
        }
    }
    if (rc < 0) {
        int err = errno;
        /* The copy may have allocated backing pages nobody maps: free them. */
        if (s != SD_ZERO)
            sd_punch(r->fd, (off_t)(first * sd_page_size), (off_t)(n * sd_page_size));
        publish(r, first, n, s);
        errno = err;
        return -1;
    }
    publish(r, first, n, SD_PRIVATE);
    atomic_fetch_sub(&sd_merged_pages, (long)n);
    return (long)n;
}

long sd_break_range(struct sd_region *r, size_t first, size_t n)
{
    long broken = 0;
    size_t i = first, end = first + n;
    while (i < end) {
        uint8_t s = atomic_load_explicit(&r->state[i], memory_order_acquire);
        if (s == SD_PRIVATE) {
            i++;
            continue;
        }
        if (s == SD_MERGING || s == SD_BREAKING) {
            sched_yield();
            continue;
        }
        if (!is_merged(s)) {
            errno = EUCLEAN;
            return -1;
        }
        size_t j = i;
        while (j < end) {
            uint8_t expect = s;
            if (!atomic_compare_exchange_strong(&r->state[j], &expect, SD_BREAKING))
                break;
            j++;
        }
        if (j == i)
            continue;               /* lost a race: look at page i again */
        long got = break_owned(r, i, j - i, s);
        if (got < 0)
            return -1;
        broken += got;
        i = j;
    }
    return broken;
}

/* ---- the trap -------------------------------------------------------- */

static void write_str(const char *s)
{
    ssize_t unused = write(2, s, strlen(s));
    (void)unused;
}

static void fatal_break(uintptr_t addr, int err)
{
    char hex[2 + 16 + 1] = "0x";
    for (int i = 0; i < 16; i++)
        hex[2 + i] = "0123456789abcdef"[(addr >> (60 - 4 * i)) & 0xf];
    hex[18] = 0;
    write_str("shmdedup: cannot break copy-on-write of merged page at ");
    write_str(hex);
    write_str(": ");
    switch (err) {
    case ENOSPC: write_str("no space left in the shared-memory filesystem (ENOSPC: /dev/shm full)"); break;
    case ENOMEM: write_str("out of memory or of mappings (ENOMEM: vm.max_map_count?)"); break;
    case EFBIG: write_str("file too large (EFBIG)"); break;
    default: write_str("system call failed"); break;
    }
    write_str("; ending the process with SIGBUS rather than returning wrong bytes\n");
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGBUS, &dfl, NULL);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    raise(SIGBUS);
    _exit(128 + SIGBUS);
}

/* How many pages a trap break at `page` may cover: 1, or twice the previous
 * break's width when the fault is right after it (fault-around). */
static size_t fault_around_width(struct sd_region *r, size_t page)
{
    size_t max = atomic_load_explicit(&sd_fault_around_max, memory_order_relaxed);
    if (max <= 1 || atomic_load_explicit(&r->ahead_end, memory_order_relaxed) != page)
        return 1;
    size_t w = 2 * atomic_load_explicit(&r->ahead_width, memory_order_relaxed);
    return w < max ? w : max;
}

/* Returns 1 if it broke the page, 0 if the page is private (the fault raced
 * with a merge that aborted or a break by another thread).  Pages after the
 * faulting one join the break (fault-around) only if they are in the same
 * state and this thread wins them: the first one it cannot win ends the
 * window (it never waits for a page it was not asked to break). */
static int trap_break(struct sd_region *r, size_t page, uintptr_t addr)
{
    for (;;) {
        uint8_t s = atomic_load_explicit(&r->state[page], memory_order_acquire);
        if (s == SD_PRIVATE)
            return 0;
        if (s == SD_MERGING || s == SD_BREAKING) {
            sched_yield();
            continue;
        }
        if (!is_merged(s) || !atomic_compare_exchange_strong(&r->state[page], &s, SD_BREAKING))
            continue;
        size_t want = fault_around_width(r, page), n = 1;
        while (n < want && page + n < r->npages) {
            uint8_t t = s;
            if (!atomic_compare_exchange_strong(&r->state[page + n], &t, SD_BREAKING))
                break;
            n++;
        }
        long got = break_owned(r, page, n, s);
        if (got < 0 && n > 1) {
            /* The window did not fit (tmpfs nearly full, mappings): every
             * page of it is back in state s.  The write needs one page only:
             * try that alone before giving up on the process. */
            atomic_store_explicit(&r->ahead_end, SIZE_MAX, memory_order_relaxed);
            continue;
        }
        if (got < 0)
            fatal_break(addr, errno);
        atomic_store_explicit(&r->ahead_end, page + n, memory_order_relaxed);
        atomic_store_explicit(&r->ahead_width, want, memory_order_relaxed);
        /* Pages, not faults: at the mapping limit one fault breaks a whole run. */
        atomic_fetch_add(&r->breaks, (uint64_t)got);
        return 1;
    }
}

static void chain(int sig, siginfo_t *si)
{
    /* Put the previous handler back and let the fault happen again (or
     * re-send a signal that was sent): it then sees the real fault.  We are
     * re-installed at the next check (sd_trap_install). */
    sigaction(SIGSEGV, &prev_action, NULL);
    if (si->si_code <= 0)
        raise(sig);
}

static void sd_trap_handler(int sig, siginfo_t *si, void *ucontext)
{
    (void)ucontext;
    int saved_errno = errno;
    if (si->si_code == SEGV_ACCERR) {
        uintptr_t addr = (uintptr_t)si->si_addr;
        size_t page;
        struct sd_region *r = region_find(addr, &page);
        if (r) {
            uintptr_t page_addr = addr & ~(uintptr_t)(sd_page_size - 1);
            if (trap_break(r, page, addr)) {
                tl_fault_retries = 0;
                atomic_store(&selfsent_budget, 1);
                errno = saved_errno;
                return;
            }
            /* Private already: retry, but a page that keeps faulting while
             * private is a genuine protection fault, not a race. */
            if (tl_fault_addr != page_addr) {
                tl_fault_addr = page_addr;
                tl_fault_retries = 0;
            }
            if (++tl_fault_retries < 1000) {
                errno = saved_errno;
                return;
            }
        }
    } else if (si->si_code <= 0 && si->si_pid == getpid()
               && atomic_load(&sd_merged_pages) > 0 && atomic_exchange(&selfsent_budget, 0)) {
        errno = saved_errno;
        return;
    }
    chain(sig, si);
    errno = saved_errno;
}

static void ensure_altstack(void)
{
    stack_t cur;
    if (sigaltstack(NULL, &cur) == 0 && !(cur.ss_flags & SS_DISABLE))
        return;
    size_t size = 64 * 1024;
    void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return;                 /* the handler then runs on the thread's stack */
    stack_t ss = {.ss_sp = mem, .ss_size = size, .ss_flags = 0};
    if (sigaltstack(&ss, NULL) != 0)
        munmap(mem, size);
}

int sd_trap_in_front(void)
{
    struct sigaction cur;
    if (sigaction(SIGSEGV, NULL, &cur) != 0)
        return 0;
    return (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == sd_trap_handler;
}

static void atfork_child(void)
{
    /* Regions are not inherited: a child that wrote to a merged page would
     * break it in its own address space only and silently diverge from the
     * parent.  Unmap them in the child (its Region objects read as closed). */
    int n = atomic_load(&regions_used);
    for (int i = 0; i < n; i++) {
        uintptr_t b = atomic_load(&regions[i].base);
        if (!b)
            continue;
        atomic_store(&regions[i].base, 0);
        munmap((void *)b, regions[i].npages * sd_page_size);
    }
    atomic_store(&sd_merged_pages, 0);
}

int sd_trap_install(void)
{
    static int atfork_done;
    if (!atfork_done) {
        if (pthread_atfork(NULL, NULL, atfork_child) != 0)
            return -1;
        atfork_done = 1;
    }
    ensure_altstack();
    struct sigaction cur;
    if (sigaction(SIGSEGV, NULL, &cur) != 0)
        return -1;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == sd_trap_handler)
        return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = sd_trap_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    prev_action = cur;
    if (sigaction(SIGSEGV, &sa, NULL) != 0)
        return -1;
    return 1;
}
