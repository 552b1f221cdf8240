/* sd_merge.h - the worker side of a merge: prove and map runs of pages. */
#ifndef SD_MERGE_H
#define SD_MERGE_H
#include <stddef.h>
#include <stdint.h>
#include "sd_trap.h"

/* Merge pages [first, first + n) of r onto stable slots [slot, slot + n)
 * (slot < 0: onto the zero page).  stable_view is a read-only mapping of the
 * whole stable object, stable_fd a read-only descriptor of it, view_tag the
 * view's tag in the table of sd_view.h (0: none; breaks of these pages then
 * copy from their own mapping).  result[i] is
 * set to 1 for each page that merged, 0 otherwise.  Returns the number merged.
 * Pages that are not PRIVATE, or whose bytes differ from the slot while
 * write-protected, are left private (DESIGN invariants 1 and 2). */
long sd_merge_run(struct sd_region *r, size_t first, size_t n, int stable_fd,
                  const uint8_t *stable_view, uint32_t view_tag, int64_t slot, uint8_t *result);

/* Checksum hints for a merge at write time (Region.merge_now): out[i] is
 * the page checksum (XXH64) of page first + i if it is PRIVATE and holds
 * data, else 0.  Holes are told apart with mincore, never read: reading a
 * hole through the mapping would allocate it.  Returns the number of pages
 * hashed, or -1 with errno set (mincore failed). */
long sd_merge_hints(struct sd_region *r, size_t first, size_t n, uint64_t *out);

/* Fault-injection hook for tests: if set, called after the pages of a run
 * are write-protected and before they are compared. */
extern void (*sd_merge_test_hook)(struct sd_region *r, size_t first, size_t n);
#endif
