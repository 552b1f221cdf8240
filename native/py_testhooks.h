/* py_testhooks.h - the test-only functions of shmdedup._native (py_testhooks.c). */
#ifndef PY_TESTHOOKS_H
#define PY_TESTHOOKS_H
#include <Python.h>

/* Add _test_* functions, _fault_point and _FAULT_POINTS to module m.
 * Returns 0, or -1 with an exception set. */
int sd_add_test_hooks(PyObject *m);
#endif
