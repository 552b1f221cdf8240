/* sd_fault.h - fault injection for tests: kill the process at a named
 * instant, or hold a thread there.
 *
 * DESIGN invariant 7 says any process may die at any instant.  The instants
 * that matter most sit between two system calls of a merge or a break, where
 * the page state, the mappings and the backing disagree for a moment; a test
 * arms one point with a countdown and the process SIGKILLs itself there, so
 * the survivors can be checked against a death at exactly that instant.
 * Armed to hold instead, the thread that reaches the point stops there for
 * good while the rest of the process runs on: a test can then end the
 * process in every way a program ends (exit, signals, exceptions) with a
 * merge or a break in flight, and check that it still ends.
 *
 * Zero cost when disarmed: sd_fault_point() is one relaxed atomic load and a
 * compare.  Signal safe (the break points run inside the SIGSEGV trap): the
 * armed path uses only atomics, raise() and pause().  Plain C (no Python.h). */
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
    SD_FAULT_AGENT_REGISTERED = 7, /* agent (Python): regions registered, its lock still held */
    SD_FAULT_COUNT
};

/* Names indexed by id ("merge_protected", ...; [0] is "none"). */
extern const char *const sd_fault_names[SD_FAULT_COUNT];

extern _Atomic int sd_fault_armed;

/* What an armed point does when its countdown runs out. */
enum { SD_FAULT_KILL = 0, SD_FAULT_HOLD = 1 };

/* Arm point id (SD_FAULT_NONE disarms): at the (countdown + 1)-th time a
 * thread passes that point from now, the process kills itself with SIGKILL
 * (SD_FAULT_KILL) or that thread stops there until the process ends
 * (SD_FAULT_HOLD: it sleeps in pause(), holding whatever it holds; signal
 * handlers still run in it).  Returns 0, or -1 if id or action is out of
 * range. */
int sd_fault_arm(int id, long countdown, int action);

void sd_fault_hit(int id);

/* Threads held at a point so far (a test waits for one to get there). */
int sd_fault_held(void);

static inline void sd_fault_point(int id)
{
    if (__builtin_expect(atomic_load_explicit(&sd_fault_armed, memory_order_relaxed) == id, 0))
        sd_fault_hit(id);
}
#endif
