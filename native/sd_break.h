/* sd_break.h - break_cow: copying merged pages back to private ones
 * (DESIGN invariant 3).  Plain C (no Python.h); signal safe where marked. */
#ifndef SD_BREAK_H
#define SD_BREAK_H
#include <stddef.h>
#include <stdint.h>
#include "sd_region.h"

/* Test hook: the next this-many mmaps of a break fail with ENOMEM,
 * as they do past vm.max_map_count (signal safe: one atomic). */
extern _Atomic int sd_test_fail_mmaps;

/* Break [first, first + n), pages the caller owns (moved to BREAKING from
 * state s by compare-and-swap); on an mmap ENOMEM retry with the whole merged
 * stretch around it.  populate: map the pages in at once (the trap's window,
 * about to be written).  On success the pages (and any claimed neighbours) are
 * PRIVATE.  Returns pages broken, or -1 with errno and the owned pages handed
 * back in state s.  Signal safe (the trap calls it). */
long sd_break_owned(struct sd_region *r, size_t first, size_t n, uint8_t s, int populate);

/* The same for the trap, which has no other way out than SIGBUS: past
 * vm.max_map_count, where even replacing mappings fails, it unmaps the
 * stretch and maps it again (its pages BREAKING meanwhile: a thread touching
 * one waits in the trap).  Returns as sd_break_owned, or -2 (errno ENOMEM)
 * when the stretch could not be mapped again: the caller must end the
 * process, and the pages stay BREAKING. */
long sd_break_owned_trap(struct sd_region *r, size_t first, size_t n, uint8_t s, int populate);

/* Break the merged pages in [first, first + n) of a region back to private
 * pages (waiting for pages another thread is merging or breaking).  Returns the
 * number of pages broken, or -1 with errno set; on failure every page is still
 * either merged or private with correct content. */
long sd_break_cow(struct sd_region *r, size_t first, size_t n);
#endif
