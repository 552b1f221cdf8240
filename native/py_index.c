/* py_index.c - shmdedup._native.HashIndex: sd_index for Python, in batches.
 *
 * Keys and values travel as uint64 / int64 buffers (numpy arrays), so one call
 * looks up or stores a whole batch with the GIL released. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "py_index.h"
#include "sd_index.h"

typedef struct {
    PyObject_HEAD
    struct sd_index ix;
} HashIndexObject;

static int
HashIndex_init(HashIndexObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity", NULL};
    Py_ssize_t cap = 1024;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n", kwlist, &cap))
        return -1;
    if (cap < 0) {
        PyErr_SetString(PyExc_ValueError, "capacity must be >= 0");
        return -1;
    }
    sd_index_free(&self->ix);
    if (sd_index_init(&self->ix, (size_t)cap * 2) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void
HashIndex_dealloc(HashIndexObject *self)
{
    sd_index_free(&self->ix);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
get_pair(PyObject *args, Py_buffer *keys, Py_buffer *vals, int writable_vals)
{
    if (!PyArg_ParseTuple(args, writable_vals ? "y*w*" : "y*y*", keys, vals))
        return -1;
    if (keys->len % 8 || vals->len != keys->len) {
        PyErr_SetString(PyExc_ValueError, "keys and values must be 8-byte buffers of the same length");
        PyBuffer_Release(keys);
        PyBuffer_Release(vals);
        return -1;
    }
    return 0;
}

/* get(keys, out): out[i] = value of keys[i] or -1. */
static PyObject *
HashIndex_get(HashIndexObject *self, PyObject *args)
{
    Py_buffer k, v;
    if (get_pair(args, &k, &v, 1) < 0)
        return NULL;
    size_t n = (size_t)k.len / 8;
    const uint64_t *keys = k.buf;
    int64_t *out = v.buf;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < n; i++)
        out[i] = sd_index_get(&self->ix, keys[i]);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&k);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

/* put(keys, vals): store each pair (later pairs win). */
static PyObject *
HashIndex_put(HashIndexObject *self, PyObject *args)
{
    Py_buffer k, v;
    if (get_pair(args, &k, &v, 0) < 0)
        return NULL;
    size_t n = (size_t)k.len / 8;
    const uint64_t *keys = k.buf;
    const int64_t *vals = v.buf;
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++)
        if (vals[i] < 0) {
            PyErr_Format(PyExc_ValueError, "values must be >= 0, got %lld", (long long)vals[i]);
            rc = -2;
        }
    if (rc == 0) {
        Py_BEGIN_ALLOW_THREADS
        for (size_t i = 0; i < n && rc == 0; i++)
            rc = sd_index_put(&self->ix, keys[i], vals[i]);
        Py_END_ALLOW_THREADS
        if (rc == -1)
            PyErr_NoMemory();
    }
    PyBuffer_Release(&k);
    PyBuffer_Release(&v);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* delete(keys) -> number removed. */
static PyObject *
HashIndex_delete(HashIndexObject *self, PyObject *args)
{
    Py_buffer k;
    if (!PyArg_ParseTuple(args, "y*", &k))
        return NULL;
    if (k.len % 8) {
        PyBuffer_Release(&k);
        PyErr_SetString(PyExc_ValueError, "keys must be a uint64 buffer");
        return NULL;
    }
    size_t n = (size_t)k.len / 8, removed = 0;
    const uint64_t *keys = k.buf;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < n; i++)
        removed += (size_t)sd_index_del(&self->ix, keys[i]);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&k);
    return PyLong_FromSize_t(removed);
}

static PyObject *
HashIndex_clear(HashIndexObject *self, PyObject *Py_UNUSED(ignored))
{
    sd_index_clear(&self->ix);
    Py_RETURN_NONE;
}

static Py_ssize_t
HashIndex_len(HashIndexObject *self)
{
    return (Py_ssize_t)self->ix.count;
}

static PyObject *
HashIndex_nbytes(HashIndexObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSize_t((self->ix.mask + 1) * 16);
}

static PyMethodDef HashIndex_methods[] = {
    {"get", (PyCFunction)HashIndex_get, METH_VARARGS, "get(keys, out): out[i] = value or -1."},
    {"put", (PyCFunction)HashIndex_put, METH_VARARGS, "put(keys, values): store pairs."},
    {"delete", (PyCFunction)HashIndex_delete, METH_VARARGS, "delete(keys) -> removed count."},
    {"clear", (PyCFunction)HashIndex_clear, METH_NOARGS, "Remove everything."},
    {NULL},
};

static PyGetSetDef HashIndex_getset[] = {
    {"nbytes", (getter)HashIndex_nbytes, NULL, "bytes the table uses", NULL},
    {NULL},
};

static PySequenceMethods HashIndex_as_sequence = {
    .sq_length = (lenfunc)HashIndex_len,
};

PyTypeObject sd_HashIndexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmdedup._native.HashIndex",
    .tp_basicsize = sizeof(HashIndexObject),
    .tp_dealloc = (destructor)HashIndex_dealloc,
    .tp_as_sequence = &HashIndex_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "HashIndex(capacity=1024): uint64 checksum -> int64 value, batch operations.",
    .tp_methods = HashIndex_methods,
    .tp_getset = HashIndex_getset,
    .tp_init = (initproc)HashIndex_init,
    .tp_new = PyType_GenericNew,
};
