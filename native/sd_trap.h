/* sd_trap.h - the region table, page states, copy-on-write breaks and the
 * SIGSEGV trap.  Plain C (no Python.h). */
#ifndef SD_TRAP_H
#define SD_TRAP_H
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
    _Atomic uint64_t breaks;     /* pages broken by the trap (COW faults) */
    /* COW fault-around: where the last trap break ended and how wide it was.
     * A fault right there doubles the width (sequential writes). */
    _Atomic size_t ahead_end;
    _Atomic size_t ahead_width;
};

extern size_t sd_page_size;
extern _Atomic long sd_merged_pages;   /* pages MERGED or ZERO in this process */
/* Test hook: the next this-many copy-back mmaps of a break fail with ENOMEM,
 * as they do past vm.max_map_count (signal safe: one atomic). */
extern _Atomic int sd_test_fail_mmaps;
/* The widest COW fault-around, in pages (1 = break only the faulting page).
 * A write fault on the page right after the previous trap break breaks
 * twice as many pages as that break did, up to this many, with one copy
 * and one mapping: sequential writers pay the signal and the remap once per
 * window instead of once per page. */
extern _Atomic size_t sd_fault_around_max;
#define SD_FAULT_AROUND_DEFAULT 64
#define SD_FAULT_AROUND_LIMIT 1024

/* Table.  add returns the slot index, or -1 (ENOSPC) when full. */
int sd_region_add(void *base, size_t npages, int fd, uint8_t *state);
void sd_region_remove(int idx);
struct sd_region *sd_region_get(int idx);

/* Break the merged pages in [first, first + n) of a region back to private
 * pages (waiting for pages another thread is merging or breaking).  Returns the
 * number of pages broken, or -1 with errno set; on failure every page is still
 * either merged or private with correct content. */
long sd_break_range(struct sd_region *r, size_t first, size_t n);

/* Install the trap in front of whatever SIGSEGV handler is there, remembering
 * that one to chain to.  Returns 1 if it (re)installed, 0 if it was already in
 * front, -1 on error.  Call again to check after others (faulthandler) may have
 * replaced it. */
int sd_trap_install(void);
int sd_trap_in_front(void);
#endif
