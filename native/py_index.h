/* py_index.h - the HashIndex type, registered by module.c. */
#ifndef SD_PY_INDEX_H
#define SD_PY_INDEX_H
#include <Python.h>
extern PyTypeObject sd_HashIndexType;
#endif
