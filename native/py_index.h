/* py_index.h - the HashIndex and SlotIndex types, registered by module.c. */
#ifndef SD_PY_INDEX_H
#define SD_PY_INDEX_H
#include <Python.h>
extern PyTypeObject sd_HashIndexType;
extern PyTypeObject sd_SlotIndexType;
#endif
