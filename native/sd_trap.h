/* sd_trap.h - the SIGSEGV trap: copy-on-write for merged pages.
 * Plain C (no Python.h). */
#ifndef SD_TRAP_H
#define SD_TRAP_H
#include <stdatomic.h>
#include <stddef.h>
#include "sd_break.h"
#include "sd_region.h"

/* The widest COW fault-around, in pages (1 = break only the faulting page).
 * A write fault on the page right after the previous trap break breaks
 * twice as many pages as that break did, up to this many, with one copy
 * and one mapping: sequential writers pay the signal and the remap once per
 * window instead of once per page. */
extern _Atomic size_t sd_fault_around_max;
#define SD_FAULT_AROUND_DEFAULT 64
#define SD_FAULT_AROUND_LIMIT 1024

/* Install the trap in front of whatever SIGSEGV handler is there, remembering
 * that one to chain to.  Returns 1 if it (re)installed, 0 if it was already in
 * front, -1 on error.  Call again to check after others (faulthandler) may have
 * replaced it. */
int sd_trap_install(void);
int sd_trap_in_front(void);
#endif
