/* sd_trap.c - the SIGSEGV trap: copy-on-write for merged pages.
 *
 * A merged page is mapped read-only from a stable slot (or from anonymous
 * read-only memory for a zero page).  A write to it faults; the trap finds the
 * region (sd_region.c), moves the page MERGED -> BREAKING with a
 * compare-and-swap (threads faulting on the same page wait), breaks it
 * (sd_break.c: copy, remap, publish PRIVATE; DESIGN invariant 3) and returns:
 * the write is retried.
 * Pages in MERGING are waited on: the merging thread either publishes MERGED
 * (then we break it) or aborts to PRIVATE (then the write just retries).
 * Fault-around: a fault on the page right after the previous trap break of the
 * region also claims the pages after it that are in the same merged state, up
 * to twice that break's width (at most sd_fault_around_max), and breaks them
 * all with one pwrite and one mmap (populated: the writes that follow do not
 * fault again): a sequential writer pays the signal and the remap once per
 * window.  Only pages won by compare-and-swap join.
 *
 * Signal safety: the handler calls only async-signal-safe functions (pwrite,
 * mmap, munmap, sched_yield, sigaction, write, raise, getpid), keeps errno, runs on
 * the alternate stack when the thread has one (SA_ONSTACK), and reads the
 * region table with atomics only.  Faults that are not ours go to the handler
 * that was installed before us: we put it back and let the fault happen again,
 * the way faulthandler chains, so a genuine segfault is never swallowed.
 *
 * A SEGV_MAPERR on a page of a region is a break past vm.max_map_count that
 * unmapped the page's stretch for a moment (sd_break.c): the page is BREAKING,
 * the trap waits for it and the access is retried.
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
#include "sd_trap.h"

_Atomic size_t sd_fault_around_max = SD_FAULT_AROUND_DEFAULT;

static struct sigaction prev_action;        /* what we chain to */
/* A self-sent SIGSEGV while pages are merged is most likely faulthandler (or
 * another handler put in front of us) re-raising one of our COW faults after
 * restoring us: let the faulting instruction run again once. */
static _Atomic int selfsent_budget = 1;

static __thread uintptr_t tl_fault_addr __attribute__((tls_model("initial-exec")));
static __thread unsigned tl_fault_retries __attribute__((tls_model("initial-exec")));

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
        if (!sd_is_merged(s) || !atomic_compare_exchange_strong(&r->state[page], &s, SD_BREAKING))
            continue;
        size_t want = fault_around_width(r, page), n = 1;
        while (n < want && page + n < r->npages) {
            uint8_t t = s;
            if (!atomic_compare_exchange_strong(&r->state[page + n], &t, SD_BREAKING))
                break;
            n++;
        }
        long got = sd_break_owned_trap(r, page, n, s, 1);
        if (got == -2)
            fatal_break(addr, errno);       /* a hole it could not map again */
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
        struct sd_region *r = sd_region_find(addr, &page);
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
    } else if (si->si_code == SEGV_MAPERR) {
        /* A page of a region unmapped for a moment: a break past
         * vm.max_map_count (sd_break.c) owns it.  Wait, then retry. */
        uintptr_t addr = (uintptr_t)si->si_addr;
        size_t page;
        struct sd_region *r = sd_region_find(addr, &page);
        if (r) {
            uintptr_t page_addr = addr & ~(uintptr_t)(sd_page_size - 1);
            while (atomic_load_explicit(&r->state[page], memory_order_acquire) == SD_BREAKING)
                sched_yield();
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
    sd_region_unmap_all();
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
