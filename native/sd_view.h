/* sd_view.h - the stable views a COW break may copy from.
 * Plain C (no Python.h); the trap side is signal safe. */
#ifndef SD_VIEW_H
#define SD_VIEW_H
#include <stddef.h>
#include <stdint.h>

/* A page's stable reference: where the content of a MERGED page also lives,
 * (tag << 32) | slot, tag naming a registered view; 0: nowhere known (copy
 * from the page's own mapping).  Tags are never reused (a 32-bit counter),
 * so a reference to a view that is gone can only miss, never hit another. */
static inline uint64_t sd_view_ref(uint32_t tag, uint64_t slot)
{
    return tag && slot <= UINT32_MAX ? (uint64_t)tag << 32 | slot : 0;
}

/* Pages breaks copied from a view so far (the rest came from their own
 * mapping): what tests check the fast path with. */
extern _Atomic unsigned long sd_view_copied;

/* Register a read-only mapping of a stable object (len bytes at base).
 * Returns its tag, or 0 if the table is full (the view then works, but
 * breaks of pages merged through it copy from their own mapping). */
uint32_t sd_view_add(const uint8_t *base, size_t len);

/* Unregister a view before unmapping it: returns once no break copies
 * from it any more.  Not from a signal handler. */
void sd_view_remove(uint32_t tag);

/* Trap side.  The view named by ref's tag, held until sd_view_unhold (its
 * mapping is not removed meanwhile): the index to unhold, with *base set,
 * or -1 if that view is gone.  Signal safe (atomics only). */
int sd_view_hold(uint64_t ref, const uint8_t **base, size_t *len);
void sd_view_unhold(int idx);
#endif
