/* py_mapping.h - the Mapping and StableView types, and the error helper
 * every binding file shares (defined in module.c). */
#ifndef SD_PY_MAPPING_H
#define SD_PY_MAPPING_H
#include <Python.h>
extern PyTypeObject sd_MappingType;
extern PyTypeObject sd_StableViewType;
/* Raise OSError(errno, "syscall: strerror") and return NULL. */
PyObject *sd_raise_errno(const char *syscall);
#endif
