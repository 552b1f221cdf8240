/* sd_fault.c - fault injection for tests (see sd_fault.h).
 *
 * One armed point per process, with a countdown of passes.  The countdown is
 * a fetch-and-subtract, so two threads passing the point together still kill
 * the process (or hold a thread) exactly once, at the right pass.
 * raise(SIGKILL) cannot be caught, blocked or chained: nothing of the process
 * runs after it, which is what a kill -9 from outside does, only at a known
 * instant. */
#include <signal.h>
#include <unistd.h>
#include "sd_fault.h"

const char *const sd_fault_names[SD_FAULT_COUNT] = {
    "none", "merge_protected", "merge_mapped", "merge_punched",
    "break_copied", "break_mapped", "agent_merged", "agent_registered",
};

_Atomic int sd_fault_armed;
static _Atomic long countdown;
static _Atomic int fault_action;
static _Atomic int held;

int sd_fault_held(void)
{
    return atomic_load(&held);
}

int sd_fault_arm(int id, long n, int action)
{
    if (id < 0 || id >= SD_FAULT_COUNT || (action != SD_FAULT_KILL && action != SD_FAULT_HOLD))
        return -1;
    atomic_store(&sd_fault_armed, SD_FAULT_NONE);
    atomic_store(&countdown, n);
    atomic_store(&fault_action, action);
    atomic_store(&sd_fault_armed, id);
    return 0;
}

/* Signal safe. */
void sd_fault_hit(int id)
{
    if (atomic_load(&sd_fault_armed) != id)
        return;
    if (atomic_fetch_sub(&countdown, 1) != 0)
        return;
    if (atomic_load(&fault_action) == SD_FAULT_KILL)
        raise(SIGKILL);
    atomic_fetch_add(&held, 1);
    for (;;)
        pause();   /* returns after each handled signal: hold on */
}
