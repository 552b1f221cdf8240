/* py_testhooks.c - what tests use to provoke faults, kept out of module.c.
 *
 * Fault points (sd_fault.h) SIGKILL the process at an exact step of a merge or
 * a break, or hold the thread that gets there; the race hook changes a page under write protection; the mmap hook
 * makes breaks fail as past vm.max_map_count; _test_segfault is a genuine
 * segfault (like faulthandler._sigsegv); _test_view_copied counts the breaks
 * that took the fast path (sd_view.c).  None of them does anything unless a
 * test calls it; _fault_point is the agent's (Python) fault point.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <string.h>
#include <unistd.h>
#include "py_testhooks.h"
#include "sd_fault.h"
#include "sd_merge.h"
#include "sd_trap.h"
#include "sd_view.h"

/* Test hook: while armed, every merge run gets its first byte changed in the
 * backing after write-protection and before the compare (a write that raced
 * the coordinator's compare).  The proof must then refuse the page. */
static void
hook_change_first_byte(struct sd_region *r, size_t first, size_t n)
{
    (void)n;
    uint8_t *addr = (uint8_t *)atomic_load(&r->base) + first * sd_page_size;
    uint8_t b = (uint8_t)(addr[0] ^ 0xff);
    ssize_t unused = pwrite(r->fd, &b, 1, (off_t)(first * sd_page_size));
    (void)unused;
}

static PyObject *
py_test_race_hook(PyObject *Py_UNUSED(m), PyObject *args)
{
    int on;
    if (!PyArg_ParseTuple(args, "p", &on))
        return NULL;
    sd_merge_test_hook = on ? hook_change_first_byte : NULL;
    Py_RETURN_NONE;
}

/* Test only: _test_arm_fault(point, countdown=0, hold=False) arms one fault
 * point (a name from _FAULT_POINTS or its index; None, "none" or 0 disarms):
 * the (countdown + 1)-th time a thread passes there, the process SIGKILLs
 * itself, or with hold that thread stops there until the process ends. */
static PyObject *
py_test_arm_fault(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *point;
    long long countdown = 0;
    int hold = 0;
    if (!PyArg_ParseTuple(args, "O|Lp", &point, &countdown, &hold))
        return NULL;
    long id = -1;
    if (point == Py_None) {
        id = SD_FAULT_NONE;
    } else if (PyUnicode_Check(point)) {
        const char *name = PyUnicode_AsUTF8(point);
        if (!name)
            return NULL;
        for (int i = 0; i < SD_FAULT_COUNT; i++)
            if (strcmp(name, sd_fault_names[i]) == 0)
                id = i;
        if (id < 0) {
            PyErr_Format(PyExc_ValueError, "unknown fault point %R (see _FAULT_POINTS)", point);
            return NULL;
        }
    } else if (PyLong_Check(point) && !PyBool_Check(point)) {
        id = PyLong_AsLong(point);
        if (id == -1 && PyErr_Occurred())
            PyErr_Clear();
        if (id < 0 || id >= SD_FAULT_COUNT) {
            PyErr_Format(PyExc_ValueError, "fault point %R is out of range (0 <= id < %d)",
                         point, SD_FAULT_COUNT);
            return NULL;
        }
    } else {
        PyErr_Format(PyExc_TypeError, "fault point must be a name or an int, not %.100s",
                     Py_TYPE(point)->tp_name);
        return NULL;
    }
    if (countdown < 0 || countdown > LONG_MAX) {
        PyErr_Format(PyExc_ValueError, "countdown must be >= 0, got %lld", countdown);
        return NULL;
    }
    sd_fault_arm((int)id, (long)countdown, hold ? SD_FAULT_HOLD : SD_FAULT_KILL);
    Py_RETURN_NONE;
}

/* _fault_point(id): a fault point in Python code (the agent's); a no-op
 * unless a test armed that id. */
static PyObject *
py_fault_point(PyObject *Py_UNUSED(m), PyObject *arg)
{
    long id = PyLong_AsLong(arg);
    if (id == -1 && PyErr_Occurred())
        return NULL;
    if (id <= SD_FAULT_NONE || id >= SD_FAULT_COUNT) {
        PyErr_Format(PyExc_ValueError, "fault point %ld is out of range (1 <= id < %d)", id, SD_FAULT_COUNT);
        return NULL;
    }
    if (atomic_load(&sd_fault_armed) == id) {
        /* Armed: a held thread must not hold the GIL too. */
        Py_BEGIN_ALLOW_THREADS
        sd_fault_hit((int)id);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

/* _test_fault_held() -> int: threads held at a fault point so far. */
static PyObject *
py_test_fault_held(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(sd_fault_held());
}

static PyObject *
py_test_fail_mmaps(PyObject *Py_UNUSED(m), PyObject *args)
{
    int n;
    if (!PyArg_ParseTuple(args, "i", &n))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "n must be >= 0");
        return NULL;
    }
    atomic_store(&sd_test_fail_mmaps, n);
    Py_RETURN_NONE;
}

static PyObject *
py_test_segfault(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    /* A genuine segfault, for tests of chaining (like faulthandler._sigsegv). */
    volatile int *p = NULL;
    *p = 1;
    Py_RETURN_NONE;
}

/* _test_view_copied() -> int: pages breaks copied from a stable view so far
 * (sd_view.h); the others were copied from their own mapping. */
static PyObject *
py_test_view_copied(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromUnsignedLong(atomic_load(&sd_view_copied));
}

static PyMethodDef test_methods[] = {
    {"_test_race_hook", py_test_race_hook, METH_VARARGS, "Test only: change a run's first byte under protection."},
    {"_test_fail_mmaps", py_test_fail_mmaps, METH_VARARGS,
     "Test only: the next n copy-back mmaps of breaks fail with ENOMEM (as past vm.max_map_count)."},
    {"_test_segfault", py_test_segfault, METH_NOARGS, "Test only: a genuine segfault (NULL write)."},
    {"_test_arm_fault", py_test_arm_fault, METH_VARARGS,
     "Test only: _test_arm_fault(point, countdown=0, hold=False): the (countdown+1)-th time a thread "
     "passes the fault point (a name of _FAULT_POINTS or its index; None disarms), SIGKILL this process, "
     "or with hold stop that thread there until the process ends."},
    {"_test_fault_held", py_test_fault_held, METH_NOARGS,
     "Test only: how many threads a fault point armed with hold has stopped so far."},
    {"_test_view_copied", py_test_view_copied, METH_NOARGS,
     "Test only: pages that COW breaks copied from a stable view (not from their own mapping) so far."},
    {"_fault_point", py_fault_point, METH_O, "_fault_point(id): a fault point in Python code; no-op unless armed."},
    {NULL},
};

int sd_add_test_hooks(PyObject *m)
{
    if (PyModule_AddFunctions(m, test_methods) < 0)
        return -1;
    PyObject *names = PyTuple_New(SD_FAULT_COUNT);
    for (int i = 0; names && i < SD_FAULT_COUNT; i++) {
        PyObject *n = PyUnicode_FromString(sd_fault_names[i]);
        if (!n) {
            Py_CLEAR(names);
            break;
        }
        PyTuple_SET_ITEM(names, i, n);
    }
    if (!names || PyModule_AddObject(m, "_FAULT_POINTS", names) < 0) {
        Py_XDECREF(names);
        return -1;
    }
    return 0;
}
