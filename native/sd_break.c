/* sd_break.c - break_cow: a merged page becomes private again.
 *
 * DESIGN invariant 3, in this order:
 *   1. pwrite the content the page maps back into the backing at its offset,
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
#include <unistd.h>
#include "sd_break.h"
#include "sd_fault.h"
#include "sd_pages.h"

_Atomic int sd_test_fail_mmaps;

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

static long break_owned(struct sd_region *r, size_t first, size_t n, uint8_t s, int may_unmap)
{
    int rc = copy_back(r, first, n, s == SD_ZERO);
    if (rc == -2 && errno == ENOMEM) {
        size_t lo = first, hi = first + n;
        if (claim_neighbours(r, &lo, &hi) > 0 || may_unmap) {
            /* Nothing claimed: the first copy_back wrote the backing already. */
            rc = hi - lo > n ? copy_back(r, lo, hi - lo, 0) : -2;
            if (rc == -2 && errno == ENOMEM && may_unmap)
                rc = remap_through_hole(r, lo, hi - lo);
            if (rc == -3) {
                errno = ENOMEM;
                return -2;
            }
            if (rc == 0) {
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
    sd_publish(r, first, n, SD_PRIVATE);
    atomic_fetch_sub(&sd_merged_pages, (long)n);
    return (long)n;
}

long sd_break_owned(struct sd_region *r, size_t first, size_t n, uint8_t s)
{
    return break_owned(r, first, n, s, 0);
}

long sd_break_owned_trap(struct sd_region *r, size_t first, size_t n, uint8_t s)
{
    return break_owned(r, first, n, s, 1);
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
        long got = sd_break_owned(r, i, j - i, s);
        if (got < 0)
            return -1;
        broken += got;
        i = j;
    }
    return broken;
}

