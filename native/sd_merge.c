/* sd_merge.c - merging runs of worker pages onto stable slots.
 *
 * One run = consecutive pages mapping to consecutive slots, so it costs one
 * mprotect, one compare pass, one mmap and one fallocate (DESIGN: runs of >= 64
 * pages merge at ~1 us/page, single pages at ~6 us).  Per run:
 *   1. claim: CAS each page PRIVATE -> MERGING (pages in any other state are
 *      skipped: already merged, or being broken);
 *   2. mprotect(PROT_READ): from here a writer faults and the trap waits;
 *   3. compare the write-protected bytes with the slot: this is the proof
 *      (invariant 1); the coordinator's checksum and compare were hints;
 *   4. equal stretches: mmap the slot read-only over them, punch the private
 *      copy, record where the content lives (the view's tag and the slot, for
 *      the break to copy from: sd_view.c), then publish MERGED (invariant 2:
 *      a trap that sees MERGED must find the stable mapping installed and be
 *      free to write the backing);
 *   5. unequal stretches: mprotect read-write again, publish PRIVATE.
 * A death between any two of these steps loses nothing (invariant 7): the
 * backing still holds the bytes until the punch, and after it the stable slot
 * holds them; tests kill a worker exactly there (sd_fault.h: merge_protected,
 * merge_mapped, merge_punched).
 *
 * sd_merge_hints checksums a range for the coordinator to look up (a hint,
 * like every checksum: the proof above decides).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22      /* Linux 5.14; older kernels fail it with EINVAL: harmless */
#endif
#include <stdlib.h>
#include "sd_fault.h"
#include "sd_hash.h"
#include "sd_merge.h"
#include "sd_pages.h"
#include "sd_view.h"

void (*sd_merge_test_hook)(struct sd_region *r, size_t first, size_t n);

/* Map [first, first + n) (claimed, write-protected, proven equal) onto the
 * slots.  Returns 0, or -1 if the mapping could not be installed. */
static int install(struct sd_region *r, uint8_t *base, size_t first, size_t n,
                   int stable_fd, int64_t slot, uint32_t view_tag)
{
    uint8_t *addr = base + first * sd_page_size;
    size_t len = n * sd_page_size;
    void *p;
    if (slot < 0)
        p = mmap(addr, len, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    else
        p = mmap(addr, len, PROT_READ, MAP_SHARED | MAP_FIXED, stable_fd,
                 (off_t)slot * (off_t)sd_page_size);
    if (p == MAP_FAILED)
        return -1;
    sd_fault_point(SD_FAULT_MERGE_MAPPED);
    /* A failed punch only costs memory: the page is merged and correct. */
    sd_punch(r->fd, (off_t)(first * sd_page_size), (off_t)len);
    sd_fault_point(SD_FAULT_MERGE_PUNCHED);
    /* Where a break will copy these pages from: the same slots, read through
     * the view they were just proven against (sd_view.c).  Before the
     * publish, which releases it to the trap. */
    sd_set_refs(r, first, n, slot < 0 ? 0 : sd_view_ref(view_tag, (uint64_t)slot));
    sd_publish(r, first, n, slot < 0 ? SD_ZERO : SD_MERGED);
    atomic_fetch_add(&sd_merged_pages, (long)n);
    return 0;
}

static void release(struct sd_region *r, uint8_t *base, size_t first, size_t n)
{
    if (mprotect(base + first * sd_page_size, n * sd_page_size, PROT_READ | PROT_WRITE) != 0) {
        /* Cannot lift the protection (ENOMEM: mapping limit).  Leave the
         * pages to the trap as if merged onto themselves: a write then
         * copies them onto themselves and remaps read-write, or ends the
         * process loudly; it never loses bytes.  No stable reference: the
         * content lives in the backing only. */
        sd_set_refs(r, first, n, 0);
        sd_publish(r, first, n, SD_MERGED);
        atomic_fetch_add(&sd_merged_pages, (long)n);
        return;
    }
    sd_publish(r, first, n, SD_PRIVATE);
}

/* Merge claimed pages [first, first + n) onto [slot, ...). */
static long merge_claimed(struct sd_region *r, size_t first, size_t n, int stable_fd,
                          const uint8_t *stable_view, uint32_t view_tag, int64_t slot,
                          uint8_t *result)
{
    uint8_t *base = (uint8_t *)atomic_load(&r->base);
    uint8_t *addr = base + first * sd_page_size;
    /* New slots are not mapped in this worker's view yet: one populate call
     * maps the run (~0.3 us/page) where the compare would fault them in
     * (~0.55 us/page more).  Before the protection, to keep that window
     * short.  A hint: if it fails, the compare faults them in. */
    if (slot >= 0)
        (void)madvise((uint8_t *)stable_view + (size_t)slot * sd_page_size, n * sd_page_size,
                      MADV_POPULATE_READ);
    if (mprotect(addr, n * sd_page_size, PROT_READ) != 0) {
        sd_publish(r, first, n, SD_PRIVATE);
        return 0;
    }
    sd_fault_point(SD_FAULT_MERGE_PROTECTED);
    if (sd_merge_test_hook)
        sd_merge_test_hook(r, first, n);

    long merged = 0;
    size_t i = 0;
    while (i < n) {
        /* Find the stretch [i, j) whose pages all compare the same way. */
        int eq = 0;
        size_t j = i;
        for (; j < n; j++) {
            const uint8_t *page = addr + j * sd_page_size;
            int e = slot < 0 ? sd_page_is_zero(page, sd_page_size)
                             : memcmp(page, stable_view + (size_t)(slot + (int64_t)j) * sd_page_size,
                                      sd_page_size) == 0;
            if (j == i)
                eq = e;
            else if (e != eq)
                break;
        }
        if (eq && install(r, base, first + i, j - i, stable_fd,
                          slot < 0 ? -1 : slot + (int64_t)i, view_tag) == 0) {
            memset(result + i, 1, j - i);
            merged += (long)(j - i);
        } else {
            release(r, base, first + i, j - i);
        }
        i = j;
    }
    return merged;
}

long sd_merge_run(struct sd_region *r, size_t first, size_t n, int stable_fd,
                  const uint8_t *stable_view, uint32_t view_tag, int64_t slot, uint8_t *result)
{
    long merged = 0;
    size_t i = 0;
    memset(result, 0, n);
    while (i < n) {
        size_t j = i;
        while (j < n) {
            uint8_t expect = SD_PRIVATE;
            if (!atomic_compare_exchange_strong(&r->state[first + j], &expect, SD_MERGING))
                break;
            j++;
        }
        if (j == i) {
            i++;                    /* not private: leave it alone */
            continue;
        }
        merged += merge_claimed(r, first + i, j - i, stable_fd, stable_view, view_tag,
                                slot < 0 ? -1 : slot + (int64_t)i, result + i);
        i = j;
    }
    return merged;
}

long sd_merge_hints(struct sd_region *r, size_t first, size_t n, uint64_t *out)
{
    uint8_t *base = (uint8_t *)atomic_load(&r->base);
    uint8_t *addr = base + first * sd_page_size;
    unsigned char *vec = malloc(n ? n : 1);
    if (!vec)
        return -1;
    /* Residency of the backing's pages (a shm mapping reports its page
     * cache): a hole is not resident. */
    if (mincore(addr, n * sd_page_size, vec) != 0) {
        int e = errno;
        free(vec);
        errno = e;
        return -1;
    }
    long hashed = 0;
    size_t i = 0;
    while (i < n) {
        size_t j = i;
        while (j < n && (vec[j] & 1) &&
               atomic_load_explicit(&r->state[first + j], memory_order_acquire) == SD_PRIVATE)
            j++;
        if (j > i) {
            sd_xxh64_pages(addr + i * sd_page_size, j - i, sd_page_size, 0, out + i);
            hashed += (long)(j - i);
            i = j;
        } else {
            out[i++] = 0;
        }
    }
    free(vec);
    return hashed;
}
