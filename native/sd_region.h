/* sd_region.h - the region table and the page states it publishes.
 * Plain C (no Python.h). */
#ifndef SD_REGION_H
#define SD_REGION_H
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* Page states: one byte per page in the region's metadata object, shared with
 * the coordinator (which only reads them).  Life cycle:
 * PRIVATE -> MERGING -> MERGED|ZERO -> BREAKING -> PRIVATE, MERGING -> PRIVATE. */
enum {
    SD_PRIVATE = 0,   /* mapped read-write from the region's own backing */
    SD_MERGING = 1,   /* write-protected while a merge proves equality */
    SD_MERGED = 2,    /* mapped read-only from a stable slot, backing punched */
    SD_BREAKING = 3,  /* a thread is copying it back; others wait */
    SD_ZERO = 4,      /* mapped to anonymous read-only memory (the zero page) */
};

#define SD_MAX_REGIONS 4096

struct sd_region {
    _Atomic uintptr_t base;      /* 0 while the table slot is free */
    size_t npages;
    int fd;                      /* the backing's own fd: remaps must use it */
    _Atomic uint8_t *state;      /* npages state bytes */
    /* Per page, private to this process: where a MERGED page's content also
     * lives (sd_view.h: view tag and slot), written by the merge that mapped
     * it before it publishes MERGED, cleared before anything else publishes
     * MERGED or PRIVATE.  0: copy a break from the page's own mapping. */
    _Atomic uint64_t *ref;
    _Atomic uint64_t breaks;     /* pages broken by the trap (COW faults) */
    /* COW fault-around: where the last trap break ended and how wide it was.
     * A fault right there doubles the width (sequential writes). */
    _Atomic size_t ahead_end;
    _Atomic size_t ahead_width;
};

extern size_t sd_page_size;
extern _Atomic long sd_merged_pages;   /* pages MERGED or ZERO in this process */

/* Table.  add returns the slot index, or -1 (ENOSPC) when full.  ref: npages
 * zeroed words, kept by the caller until after remove. */
int sd_region_add(void *base, size_t npages, int fd, uint8_t *state, uint64_t *ref);
void sd_region_remove(int idx);
struct sd_region *sd_region_get(int idx);

/* The region holding addr, with its page index in *page, or NULL.  Signal
 * safe: reads the table with atomics only. */
struct sd_region *sd_region_find(uintptr_t addr, size_t *page);

/* Unmap every region (the child side of fork: regions are not inherited).
 * Signal safe in the sense pthread_atfork needs: atomics and munmap only. */
void sd_region_unmap_all(void);

static inline int sd_is_merged(uint8_t s) { return s == SD_MERGED || s == SD_ZERO; }

/* Store state s for pages [first, first + n) with release order: whoever
 * acquires a page's state sees every mapping change made before it. */
static inline void sd_publish(struct sd_region *r, size_t first, size_t n, uint8_t s)
{
    for (size_t i = first; i < first + n; i++)
        atomic_store_explicit(&r->state[i], s, memory_order_release);
}

/* Set the stable references of pages [first, first + n) (owned by the
 * caller) to ref, ref + 1, ... (consecutive slots), or all to 0. */
static inline void sd_set_refs(struct sd_region *r, size_t first, size_t n, uint64_t ref)
{
    for (size_t i = 0; i < n; i++)
        atomic_store_explicit(&r->ref[first + i], ref ? ref + i : 0, memory_order_relaxed);
}
#endif
