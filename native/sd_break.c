/* sd_break.c - break_cow: a merged page becomes private again.
 *
 * DESIGN invariant 3, in this order:
 *   1. pwrite the content the page maps back into the backing at its offset
 *      (read from the worker's view of the stable object when the page's
 *      stable reference names a live one, sd_view.c; else from the page),
 *   2. mmap the backing read-write there, with the region's own fd (a
 *      reopened fd would stop the kernel from merging the mappings),
 *   3. publish PRIVATE (release).
 * The caller owns the pages (BREAKING, won by compare-and-swap), so no other
 * thread maps or publishes them meanwhile.  When the mmap fails with ENOMEM
 * (vm.max_map_count: a split needs new mappings) the whole merged stretch
 * around the pages is broken with one mmap, which replaces whole mappings and
 * never adds one.  Past the limit (a failed split can leave the count above
 * it, and then every mmap fails, replacing ones too) the trap, whose only
 * other way out is SIGBUS, unmaps the stretch first and maps it again: for
 * that moment the pages are BREAKING and unmapped, and a thread that touches
 * one waits in the trap (SEGV_MAPERR) as it would for any page being broken.
 * Everything here is async-signal-safe: the trap runs it.
 * Tests kill a process between the steps (sd_fault.h: break_copied,
 * break_mapped) to check that other processes lose nothing.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>
#include "sd_break.h"
#include "sd_fault.h"
#include "sd_pages.h"
#include "sd_view.h"

_Atomic int sd_test_fail_mmaps;

/* pwritev all of iov[0, cnt) at off, resuming after short writes. */
static int pwritev_full(int fd, struct iovec *iov, int cnt, off_t off)
{
    while (cnt > 0) {
        ssize_t w = pwritev(fd, iov, cnt, off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        off += w;
        while (cnt > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

#define COPY_IOVS 64

/* Write the content of pages [first, first + n) into the backing at their
 * offsets.  A page whose stable reference names a live view is read from
 * that view (sd_view.c: the faulting address stays untouched, so the remap
 * clears no page table entry and flushes no TLB); the others, and all of
 * them if the view cannot be read (EFAULT), from their own mapping.  One
 * view is held at a time: the first page's (a window mixing views, after a
 * coordinator restart, copies the rest from the mapping).  Returns 0 or -1. */
static int copy_pages(struct sd_region *r, uint8_t *addr, size_t first, size_t n)
{
    uint64_t ref0 = atomic_load_explicit(&r->ref[first], memory_order_relaxed);
    const uint8_t *vbase = NULL;
    size_t vlen = 0;
    int held = sd_view_hold(ref0, &vbase, &vlen);
    uint32_t tag = (uint32_t)(ref0 >> 32);
    struct iovec iov[COPY_IOVS];
    size_t i = 0, from_view = 0;
    int rc = 0;
    while (i < n && rc == 0) {
        size_t start = i;
        int k = 0;
        for (; i < n; i++) {
            const uint8_t *src = addr + i * sd_page_size;
            uint64_t ref = atomic_load_explicit(&r->ref[first + i], memory_order_relaxed);
            if (held >= 0 && (uint32_t)(ref >> 32) == tag
                && ((ref & UINT32_MAX) + 1) * sd_page_size <= vlen) {
                src = vbase + (ref & UINT32_MAX) * sd_page_size;
                from_view++;
            }
            if (k > 0 && (const uint8_t *)iov[k - 1].iov_base + iov[k - 1].iov_len == src) {
                iov[k - 1].iov_len += sd_page_size;
                continue;
            }
            if (k == COPY_IOVS)
                break;
            iov[k].iov_base = (void *)src;
            iov[k].iov_len = sd_page_size;
            k++;
        }
        rc = pwritev_full(r->fd, iov, k, (off_t)((first + start) * sd_page_size));
    }
    if (held >= 0) {
        sd_view_unhold(held);
        /* EFAULT: the view does not cover the slot (it cannot happen while
         * merges validate slots; the mapping is the safe way round). */
        if (rc < 0 && errno == EFAULT) {
            struct iovec all = {.iov_base = addr, .iov_len = n * sd_page_size};
            rc = pwritev_full(r->fd, &all, 1, (off_t)(first * sd_page_size));
            from_view = 0;
        }
    }
    if (rc == 0 && from_view)
        atomic_fetch_add_explicit(&sd_view_copied, from_view, memory_order_relaxed);
    return rc;
}

/* Copy pages [first, first + n) back into the backing and map it read-write
 * there.  The caller owns them (BREAKING).  Returns 0, -1 if the copy failed
 * (nothing changed but backing bytes nobody maps), -2 if the mmap failed. */
static int copy_back(struct sd_region *r, size_t first, size_t n, int zero, int populate)
{
    uintptr_t base = atomic_load(&r->base);
    uint8_t *addr = (uint8_t *)base + first * sd_page_size;
    off_t off = (off_t)(first * sd_page_size);
    size_t len = n * sd_page_size;

    /* A zero page's backing was punched at merge time: it already reads as
     * zeros, so only the mapping has to change. */
    if (!zero && copy_pages(r, addr, first, n) < 0)
        return -1;
    sd_fault_point(SD_FAULT_BREAK_COPIED);
    if (atomic_load(&sd_test_fail_mmaps) > 0 && atomic_fetch_sub(&sd_test_fail_mmaps, 1) > 0) {
        errno = ENOMEM;
        return -2;
    }
    /* A trap's fault-around window is written next, page after page:
     * populating it now saves a write fault per page (2.65 -> 2.1 us/page
     * for sequential writes).  One page: the retried write faults it in at
     * the same cost.  An explicit break (unmerge) leaves its pages to be
     * faulted in if and when they are used, and so does a window of zero
     * pages: their backing is a hole, which populating would allocate.
     * Populating cannot fail the mmap (the kernel ignores its errors: the
     * writes then fault). */
    int flags = MAP_SHARED | MAP_FIXED | (populate && !zero && n > 1 ? MAP_POPULATE : 0);
    if (mmap(addr, len, PROT_READ | PROT_WRITE, flags, r->fd, off) == MAP_FAILED)
        return -2;
    sd_fault_point(SD_FAULT_BREAK_MAPPED);
    return 0;
}

/* Claim the merged neighbours of [*lo, *hi) so that one mmap can cover whole
 * mappings: replacing whole VMAs never adds one, so it cannot hit
 * vm.max_map_count.  Returns how many pages were added. */
static size_t claim_neighbours(struct sd_region *r, size_t *lo, size_t *hi)
{
    size_t added = 0;
    while (*lo > 0) {
        uint8_t s = atomic_load(&r->state[*lo - 1]);
        if (!sd_is_merged(s) || !atomic_compare_exchange_strong(&r->state[*lo - 1], &s, SD_BREAKING))
            break;
        (*lo)--;
        added++;
    }
    while (*hi < r->npages) {
        uint8_t s = atomic_load(&r->state[*hi]);
        if (!sd_is_merged(s) || !atomic_compare_exchange_strong(&r->state[*hi], &s, SD_BREAKING))
            break;
        (*hi)++;
        added++;
    }
    return added;
}

/* Past vm.max_map_count: munmap [first, first + n) (whole mappings: no split,
 * so the count goes down) and map the backing there, whose bytes copy_back
 * wrote already.  Returns 0; -2 if the munmap failed (nothing changed); -3
 * if the mmap still fails after the munmap (the pages are a hole: the caller
 * must end the process, leaving them BREAKING so no thread reads the hole). */
static int remap_through_hole(struct sd_region *r, size_t first, size_t n)
{
    uint8_t *addr = (uint8_t *)atomic_load(&r->base) + first * sd_page_size;
    size_t len = n * sd_page_size;
    if (munmap(addr, len) != 0)
        return -2;
    for (int tries = 0; tries < 1000; tries++) {
        if (atomic_load(&sd_test_fail_mmaps) > 0 && atomic_fetch_sub(&sd_test_fail_mmaps, 1) > 0)
            errno = ENOMEM;
        else if (mmap(addr, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, r->fd,
                      (off_t)(first * sd_page_size)) != MAP_FAILED) {
            sd_fault_point(SD_FAULT_BREAK_MAPPED);
            return 0;
        }
        if (errno != ENOMEM)
            break;
        sched_yield();          /* another thread may be giving a mapping back */
    }
    return -3;
}

static long break_owned(struct sd_region *r, size_t first, size_t n, uint8_t s, int populate,
                        int may_unmap)
{
    int rc = copy_back(r, first, n, s == SD_ZERO, populate);
    if (rc == -2 && errno == ENOMEM) {
        size_t lo = first, hi = first + n;
        if (claim_neighbours(r, &lo, &hi) > 0 || may_unmap) {
            /* Nothing claimed: the first copy_back wrote the backing already. */
            rc = hi - lo > n ? copy_back(r, lo, hi - lo, 0, 0) : -2;
            if (rc == -2 && errno == ENOMEM && may_unmap)
                rc = remap_through_hole(r, lo, hi - lo);
            if (rc == -3) {
                errno = ENOMEM;
                return -2;
            }
            if (rc == 0) {
                sd_set_refs(r, lo, hi - lo, 0);
                sd_publish(r, lo, hi - lo, SD_PRIVATE);
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
            sd_publish(r, lo, first - lo, SD_MERGED);
            sd_publish(r, first + n, hi - first - n, SD_MERGED);
            errno = err;
        }
    }
    if (rc < 0) {
        int err = errno;
        /* The copy may have allocated backing pages nobody maps: free them. */
        if (s != SD_ZERO)
            sd_punch(r->fd, (off_t)(first * sd_page_size), (off_t)(n * sd_page_size));
        sd_publish(r, first, n, s);
        errno = err;
        return -1;
    }
    sd_set_refs(r, first, n, 0);
    sd_publish(r, first, n, SD_PRIVATE);
    atomic_fetch_sub(&sd_merged_pages, (long)n);
    return (long)n;
}

long sd_break_owned(struct sd_region *r, size_t first, size_t n, uint8_t s, int populate)
{
    return break_owned(r, first, n, s, populate, 0);
}

long sd_break_owned_trap(struct sd_region *r, size_t first, size_t n, uint8_t s, int populate)
{
    return break_owned(r, first, n, s, populate, 1);
}

long sd_break_cow(struct sd_region *r, size_t first, size_t n)
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
        if (!sd_is_merged(s)) {
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
        long got = sd_break_owned(r, i, j - i, s, 0);
        if (got < 0)
            return -1;
        broken += got;
        i = j;
    }
    return broken;
}

