/* sd_fault.h - fault injection for tests: kill the process at a named instant.
 *
 * DESIGN invariant 7 says any process may die at any instant.  The instants
 * that matter most sit between two system calls of a merge or a break, where
 * the page state, the mappings and the backing disagree for a moment; a test
 * arms one point with a countdown and the process SIGKILLs itself there, so
 * the survivors can be checked against a death at exactly that instant.
 *
 * Zero cost when disarmed: sd_fault_point() is one relaxed atomic load and a
 * compare.  Signal safe (the break points run inside the SIGSEGV trap): the
 * armed path uses only atomics and raise().  Plain C (no Python.h). */
#ifndef SD_FAULT_H
#define SD_FAULT_H
#include <stdatomic.h>

enum {
    SD_FAULT_NONE = 0,
    SD_FAULT_MERGE_PROTECTED = 1, /* merge: pages write-protected, nothing mapped */
    SD_FAULT_MERGE_MAPPED = 2,    /* merge: stable slot mapped, private copy not punched */
    SD_FAULT_MERGE_PUNCHED = 3,   /* merge: punched, MERGED not yet published */
    SD_FAULT_BREAK_COPIED = 4,    /* break: content written back, backing not mapped */
    SD_FAULT_BREAK_MAPPED = 5,    /* break: backing mapped, PRIVATE not yet published */
    SD_FAULT_AGENT_MERGED = 6,    /* agent (Python): batch merged, reply not sent */
    SD_FAULT_COUNT
};

/* Names indexed by id ("merge_protected", ...; [0] is "none"). */
extern const char *const sd_fault_names[SD_FAULT_COUNT];

extern _Atomic int sd_fault_armed;

/* Arm point id (SD_FAULT_NONE disarms): the process kills itself with SIGKILL
 * at the (countdown + 1)-th time it passes that point from now.  Returns 0, or
 * -1 if id is out of range. */
int sd_fault_arm(int id, long countdown);

void sd_fault_hit(int id);

static inline void sd_fault_point(int id)
{
    if (__builtin_expect(atomic_load_explicit(&sd_fault_armed, memory_order_relaxed) == id, 0))
        sd_fault_hit(id);
}
#endif
