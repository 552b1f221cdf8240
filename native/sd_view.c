/* sd_view.c - the table of stable views a COW break may copy from.
 *
 * A break copies a merged page's content back into the region's backing
 * (DESIGN invariant 3).  Read from the faulting address, the copy faults the
 * stable page into the very page table entry the remap then has to clear,
 * and clearing a present entry costs a TLB flush, an IPI to every other CPU
 * running a thread of the process.  Read from the worker's own view of the
 * stable object (the one its merges compare against, already faulted in),
 * the faulting address is never touched: no entry, no flush.
 *
 * So each page remembers where its content lives (its reference: the view's
 * tag and the slot, written by the merge that mapped it, sd_merge.c), and a
 * break looks the tag up here.  A view is closed while pages merged through
 * it stay mapped (a coordinator restart): its references then miss and the
 * break copies from the mapping, as before.  Tags are never reused, so a
 * stale reference cannot name another object's page.
 *
 * Concurrency: the trap (any thread, in a signal handler) holds an entry by
 * incrementing its users, then checks that the entry still carries the tag
 * and a base; sd_view_remove clears the base first, then waits until no
 * user is left.  All seq_cst: either the trap sees the cleared base, or the
 * remover sees the trap's hold and waits for it.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include "sd_view.h"

#define SD_MAX_VIEWS 16

struct sd_view {
    _Atomic uint32_t tag;       /* 0: free */
    _Atomic uintptr_t base;     /* 0 while being added or removed */
    _Atomic size_t len;
    _Atomic int users;          /* breaks copying from it now */
};

_Atomic unsigned long sd_view_copied;
static struct sd_view views[SD_MAX_VIEWS];
static _Atomic uint32_t last_tag;
static pthread_mutex_t views_lock = PTHREAD_MUTEX_INITIALIZER;

uint32_t sd_view_add(const uint8_t *base, size_t len)
{
    uint32_t tag = 0;
    pthread_mutex_lock(&views_lock);
    for (int i = 0; i < SD_MAX_VIEWS; i++) {
        struct sd_view *v = &views[i];
        if (atomic_load(&v->tag) != 0)
            continue;
        tag = atomic_fetch_add(&last_tag, 1) + 1;
        if (tag == 0)                   /* 2^32 views later: stop recording */
            break;
        atomic_store(&v->len, len);
        atomic_store(&v->base, (uintptr_t)base);
        atomic_store(&v->tag, tag);
        break;
    }
    pthread_mutex_unlock(&views_lock);
    return tag;
}

void sd_view_remove(uint32_t tag)
{
    if (tag == 0)
        return;
    pthread_mutex_lock(&views_lock);
    for (int i = 0; i < SD_MAX_VIEWS; i++) {
        struct sd_view *v = &views[i];
        if (atomic_load(&v->tag) != tag)
            continue;
        atomic_store(&v->base, 0);
        while (atomic_load(&v->users) > 0)
            sched_yield();              /* a break is copying: microseconds */
        atomic_store(&v->tag, 0);
        break;
    }
    pthread_mutex_unlock(&views_lock);
}

int sd_view_hold(uint64_t ref, const uint8_t **base, size_t *len)
{
    uint32_t tag = (uint32_t)(ref >> 32);
    if (tag == 0)
        return -1;
    for (int i = 0; i < SD_MAX_VIEWS; i++) {
        struct sd_view *v = &views[i];
        if (atomic_load(&v->tag) != tag)
            continue;
        atomic_fetch_add(&v->users, 1);
        uintptr_t b = atomic_load(&v->base);
        /* Re-read the tag after the base: a base read after the entry was
         * removed and reused belongs to another view, whose tag differs. */
        if (b == 0 || atomic_load(&v->tag) != tag) {
            atomic_fetch_sub(&v->users, 1);
            return -1;
        }
        *base = (const uint8_t *)b;
        *len = atomic_load(&v->len);
        return i;
    }
    return -1;
}

void sd_view_unhold(int idx)
{
    atomic_fetch_sub(&views[idx].users, 1);
}
